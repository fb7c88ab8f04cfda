import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from clt.data.activations import ActivationSource  # noqa: E402
from clt.data.cache import ActivationCache  # noqa: E402
from clt.data.lm import lm_activations, load_lm  # noqa: E402
from clt.data.producer import Prefetcher  # noqa: E402
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


_OPEN: list[ActivationSource] = []


@pytest.fixture(autouse=True)
def _close_sources():
    """Stop every producer thread a test started."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def make_source(model, corpus, seed: int = 0, **options) -> ActivationSource:
    options = {"buffer_tokens": BUFFER, **options}
    source = ActivationSource(model, make_stream(corpus), LAYERS, seed=seed, **options)
    _OPEN.append(source)
    return source


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
    n_sequences = source.position  # consumed; the producer thread may be ahead
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


@pytest.mark.parametrize("threaded", [True, False])
def test_resume_gives_the_same_next_batches(model, corpus, threaded):
    source = make_source(model, corpus, seed=3, producer_thread=threaded)
    for _ in range(5):
        source.next_batch(50)
    state = source.state_dict()
    expected = [source.next_batch(50) for _ in range(6)]  # crosses a refill
    resumed = make_source(model, corpus, seed=3, producer_thread=threaded)
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


def key_counts(x: torch.Tensor, y: torch.Tensor, times: torch.Tensor | None = None) -> Counter:
    """How often each token row (all layers' x and y) occurs, optionally weighted per row."""
    joined = torch.cat([x, y], dim=-1).transpose(0, 1).flatten(1)  # [n, L * (d_in + d_out)]
    weights = [1] * joined.shape[0] if times is None else times.tolist()
    counts: Counter = Counter()
    for row, w in zip(map(tuple, joined.tolist()), weights, strict=True):
        counts[row] += w
    return counts


def test_thread_does_not_change_the_batches(model, corpus):
    plain = make_source(model, corpus, seed=5, producer_thread=False)
    threaded = [make_source(model, corpus, seed=5, prefetch_batches=d) for d in (1, 4)]
    for _ in range(8):  # several refills
        want_x, want_y = plain.next_batch(90)
        for source in threaded:
            got_x, got_y = source.next_batch(90)
            assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    assert all(s.state_dict()["tokens"] == plain.state_dict()["tokens"] for s in threaded)


@pytest.mark.parametrize("reuse", [1, 2, 3])
def test_reuse_factor_serves_each_token_exactly_that_often(model, corpus, reuse):
    source = make_source(model, corpus, reuse_factor=reuse)
    served = [source.next_batch(61) for _ in range(25)]
    for x, _ in served:  # never twice in one batch
        assert len(key_counts(x[:, :, :4], x[:, :, :4])) == len(set(map(tuple, x[0].tolist())))
    n_sequences = source.position
    manual = make_stream(corpus)
    tokens = torch.cat([next(manual) for _ in range(n_sequences // BATCH)])
    x, y = lm_activations(model, tokens, LAYERS, "hook_resid_mid", "hook_mlp_out")
    expected = key_counts(x[:, :, 1:].flatten(1, 2), y[:, :, 1:].flatten(1, 2))
    got = key_counts(torch.cat([b[0] for b in served], 1), torch.cat([b[1] for b in served], 1))
    left = source._left[: source.buffered]
    got += key_counts(source._x[:, : source.buffered], source._y[:, : source.buffered], left)
    assert got == Counter({row: reuse * n for row, n in expected.items()})
    assert sum(got.values()) > 2 * BUFFER  # the test crossed refills


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_refill_fraction(model, corpus, fraction):
    source = make_source(model, corpus, refill_fraction=fraction, producer_thread=False)
    below = BUFFER - int(BUFFER * fraction)
    lowest, refills = BUFFER, 0
    for _ in range(80):
        before = source.buffered
        source.next_batch(20)
        if source.buffered + 20 > before:  # refilled before serving
            refills += 1
            assert before < max(20, below) and source.buffered + 20 >= BUFFER
        lowest = min(lowest, source.buffered)
    assert refills >= 2
    assert lowest >= below - 20


def test_producer_error_is_reraised_with_its_traceback(model, corpus):
    source = make_source(model, corpus, prefetch_batches=1)
    calls = 0
    original = source._activations

    def flaky(batch):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ZeroDivisionError("boom in the producer")
        return original(batch)

    source._activations = flaky
    with pytest.raises(ZeroDivisionError, match="boom") as info:
        for _ in range(20):
            source.next_batch(100)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "flaky" in frames and "_chunks" in frames
    source.close()
    assert not any(t.name == "clt-activation-producer" for t in threading.enumerate())


def test_close_stops_a_blocked_producer(model, corpus):
    source = make_source(model, corpus, prefetch_batches=1)
    source.next_batch(10)  # the producer now waits on a full queue
    thread = source._producer._thread
    source.close()
    assert not thread.is_alive()
    source.close()  # twice is fine


def test_prefetcher_keeps_order_and_stops_early():
    items = list(Prefetcher(iter(range(50)), depth=3))
    assert items == list(range(50))
    started = threading.Event()

    def endless():
        started.set()
        i = 0
        while True:
            yield i
            i += 1

    prefetcher = Prefetcher(endless(), depth=2)
    assert [next(prefetcher) for _ in range(5)] == [0, 1, 2, 3, 4]
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    with pytest.raises(StopIteration):
        next(prefetcher)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter([]), depth=0)


# ---- on-disk cache ----------------------------------------------------------------------------

IDENTITY = {"model": "tiny", "layers": LAYERS, "input_hook": "hook_resid_mid",
            "output_hook": "hook_mlp_out", "dtype": "float32", "seq_len": SEQ_LEN, "seed": 0}


def no_model():
    raise AssertionError("the LM must not be loaded when the cache has the activations")


def cached_source(model, corpus, folder, **options) -> ActivationSource:
    cache = ActivationCache(folder, IDENTITY, shard_tokens=600)
    return make_source(model, corpus, cache=cache, device="cpu", **options)


def test_cache_round_trip_is_bit_exact(model, corpus, tmp_path):
    live = make_source(model, corpus, producer_thread=False)
    want = [live.next_batch(70) for _ in range(12)]
    want_heldout = live.heldout_batches(100)
    writer = cached_source(model, corpus, tmp_path)
    for want_x, want_y in want:
        x, y = writer.next_batch(70)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    writer.heldout_batches(100)
    writer.close()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["layers"] == LAYERS and len(manifest["shards"]) >= 2
    assert manifest["sequences"] >= writer.position
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    reader = cached_source(no_model, corpus, tmp_path)
    for want_x, want_y in want:
        x, y = reader.next_batch(70)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    got_heldout = reader.heldout_batches(100)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(got_heldout, want_heldout, strict=True))
    # Resume inside the cache: no LM either.
    state = reader.state_dict()
    ahead = [reader.next_batch(70) for _ in range(2)]
    resumed = cached_source(no_model, corpus, tmp_path)
    resumed.load_state_dict(state)
    for want_x, _ in ahead:
        assert torch.equal(resumed.next_batch(70)[0], want_x)
    # Past the cache's end the LM is loaded and the stream continues bitwise as the live run.
    loads = []

    def loader():
        loads.append(1)
        return model

    extended = cached_source(loader, corpus, tmp_path)
    # the writer's producer may have cached chunks ahead of what was read: go past all of them
    cached_tokens = manifest["sequences"] * (SEQ_LEN - 1)
    more = [live.next_batch(70) for _ in range(cached_tokens // 70 - len(want) + 4)]
    for want_x, want_y in want + more:
        x, y = extended.next_batch(70)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert loads == [1]


def write_cache(model, corpus, folder) -> dict:
    writer = cached_source(model, corpus, folder)
    for _ in range(6):
        writer.next_batch(70)
    writer.close()
    return json.loads((folder / "manifest.json").read_text())


def test_cache_rejects_a_truncated_or_corrupted_shard(model, corpus, tmp_path):
    manifest = write_cache(model, corpus, tmp_path)
    shard = tmp_path / manifest["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        cached_source(no_model, corpus, tmp_path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    source = cached_source(no_model, corpus, tmp_path)
    with pytest.raises(ValueError, match=f"{shard.name}.*sha256"):
        source.next_batch(10)


@pytest.mark.parametrize(
    "change", [{"layers": [0, 1]}, {"output_hook": "hook_mlp_in"}, {"model": "gpt2"},
               {"dtype": "bfloat16"}]
)
def test_cache_rejects_a_mismatched_manifest(model, corpus, tmp_path, change):
    write_cache(model, corpus, tmp_path)
    with pytest.raises(ValueError, match="manifest.json was made for other activations"):
        ActivationCache(tmp_path, {**IDENTITY, **change})


def test_build_source_cache_skips_the_lm(corpus, tmp_path, monkeypatch):
    from clt.config import Config
    from clt.data import build_source

    path, _ = corpus
    raw = json.loads((Path(__file__).parents[1] / "configs" / "topk-clt.json").read_text())
    raw["model"]["layers"] = [0, 1]
    raw["train"]["batch_tokens"] = 256  # what the buffer below holds
    raw["data"]["lm"] = {"name": "tiny", "dataset": str(path), "seq_len": 16,
                         "buffer_tokens": 256, "lm_batch_size": 4, "heldout_fraction": 0.2,
                         "cache_dir": str(tmp_path / "acts"), "cache_shard_tokens": 100,
                         "tiny_n_layers": 2, "tiny_d_model": 16, "tiny_d_mlp": 32}
    cfg = Config.model_validate(raw)
    first = build_source(cfg, torch.device("cpu"))
    want = [first.next_batch(50) for _ in range(4)]
    first.close()
    import clt.data.lm as lm_module

    monkeypatch.setattr(lm_module, "load_lm", lambda *a, **k: no_model())
    second = build_source(cfg, torch.device("cpu"))
    assert (second.d_in, second.d_out) == (first.d_in, first.d_out) == (16, 16)
    for want_x, want_y in want:
        x, y = second.next_batch(50)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert not second.model_loaded
    second.close()
