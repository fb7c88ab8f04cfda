import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from clt.data.activations import ActivationSource  # noqa: E402
from clt.data.lm import lm_activations, load_lm  # noqa: E402
from clt.data.tokens import TokenStream  # noqa: E402

BOS, SEP = 256, 257
TINY = {"n_layers": 4, "d_model": 32, "d_mlp": 64, "n_heads": 4, "d_vocab": 260, "n_ctx": 32}
LAYERS = [0, 2, 3]
SEQ_LEN, BATCH = 32, 8  # 248 non-BOS tokens per LM batch
BUFFER = 512
WORDS = "now is the winter of our discontent made glorious summer by this sun of york".split()


def byte_tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def model():
    return load_lm("tiny", tiny=TINY)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    lines = [
        json.dumps({"text": f"play {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))})
        for i in range(300)
    ]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "docs.jsonl", tmp_path_factory.mktemp("cache")


def make_stream(corpus, seed: int = 0) -> TokenStream:
    path, cache = corpus
    return TokenStream(
        byte_tokens,
        str(path),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=seed,
        bos_id=BOS,
        sep_id=SEP,
        heldout_fraction=0.2,
        cache_dir=cache,
    )


def make_source(model, corpus, seed: int = 0, **options) -> ActivationSource:
    options = {"buffer_tokens": BUFFER, **options}
    return ActivationSource(model, make_stream(corpus), LAYERS, seed=seed, **options)


def rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, ...]]:
    """Each token's activations over all layers as one hashable row."""
    joined = torch.cat([x, y], dim=-1).transpose(0, 1).flatten(1)  # [n, L * (d_in + d_out)]
    return sorted(map(tuple, joined.tolist()))


def test_shapes_dtype_and_device(model, corpus):
    source = make_source(model, corpus, dtype=torch.bfloat16)
    x, y = source.next_batch(50)
    assert x.shape == (3, 50, 32) and y.shape == (3, 50, 32)
    assert x.dtype == y.dtype == torch.bfloat16 and x.device.type == "cpu"
    # The first fill overshoots the buffer by less than one LM batch; 50 were served.
    assert BUFFER - 50 <= source.buffered < BUFFER + 248 - 50


def test_every_token_served_once_and_bos_never(model, corpus):
    source = make_source(model, corpus)
    served = [source.next_batch(37) for _ in range(20)]  # several refills
    n_sequences = source.tokens.position
    remaining = (source._x[:, : source.buffered], source._y[:, : source.buffered])
    manual = make_stream(corpus)
    tokens = torch.cat([next(manual) for _ in range(n_sequences // BATCH)])
    x, y = lm_activations(model, tokens, LAYERS, "hook_resid_mid", "hook_mlp_out")
    bos_x = x[0, 0, 0]
    expected = rows(x[:, :, 1:].flatten(1, 2), y[:, :, 1:].flatten(1, 2))
    got_x = torch.cat([b[0] for b in served] + [remaining[0]], dim=1)
    got_y = torch.cat([b[1] for b in served] + [remaining[1]], dim=1)
    assert rows(got_x, got_y) == expected
    assert not (got_x[0] == bos_x).all(dim=-1).any()


def test_deterministic_given_seed(model, corpus):
    a, b, c = (make_source(model, corpus, seed=s) for s in (0, 0, 1))
    for _ in range(6):
        xa, ya = a.next_batch(64)
        xb, yb = b.next_batch(64)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.next_batch(64)[0], c.next_batch(64)[0])


def test_resume_gives_the_same_next_batches(model, corpus):
    source = make_source(model, corpus, seed=3)
    for _ in range(5):
        source.next_batch(50)
    state = source.state_dict()
    expected = [source.next_batch(50) for _ in range(6)]  # crosses a refill
    resumed = make_source(model, corpus, seed=3)
    resumed.load_state_dict(state)
    assert resumed.buffered == len(state["buffer_ids"])
    for want_x, want_y in expected:
        got_x, got_y = resumed.next_batch(50)
        torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)


def test_heldout_batches_are_fixed_and_from_the_heldout_split(model, corpus):
    source = make_source(model, corpus)
    first = source.heldout_batches(100, batch_tokens=40)
    assert [x.shape[1] for x, _ in first] == [40, 40, 20]
    assert first is source.heldout_batches(100, batch_tokens=40)
    fresh = make_source(model, corpus, seed=7).heldout_batches(100, batch_tokens=40)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, fresh, strict=True))
    # They are the held-out stream's tokens, in order, BOS dropped.
    heldout = next(make_stream(corpus).with_split("heldout", loop=False))
    x, y = lm_activations(model, heldout, LAYERS, "hook_resid_mid", "hook_mlp_out")
    torch.testing.assert_close(first[0][0], x[:, :, 1:].flatten(1, 2)[:, :40], rtol=0, atol=0)
    torch.testing.assert_close(first[0][1], y[:, :, 1:].flatten(1, 2)[:, :40], rtol=0, atol=0)
    with pytest.raises(ValueError, match="held-out split has only"):
        source.heldout_batches(10**6)


def test_sample_tokens_totals(model, corpus):
    source = make_source(model, corpus)
    chunks = list(source.sample_tokens(300, batch_tokens=128))
    assert [x.shape[1] for x, _ in chunks] == [128, 128, 44]


def test_bad_input_raises(model, corpus):
    source = make_source(model, corpus)
    with pytest.raises(ValueError, match="n_tokens"):
        source.next_batch(BUFFER + 1)
    with pytest.raises(ValueError, match="layers"):
        make_source(model, corpus).load_state_dict({**source.state_dict(), "layers": [1]})
