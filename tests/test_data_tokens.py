import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from clt.data.tokens import TokenStream, epoch_order, shakespeare_files  # noqa: E402

BOS, SEP = 256, 257
WORDS = "thou art more lovely and temperate rough winds do shake the darling buds of may".split()


def byte_tokens(text: str) -> list[int]:
    """A tokenizer-free stand-in: UTF-8 bytes are token ids."""
    return list(text.encode("utf-8"))


def make_docs(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for i in range(n)]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets-cache")


def stream(path: Path, cache: Path, **options) -> TokenStream:
    defaults = dict(seq_len=16, batch_size=4, text_column="body", bos_id=BOS, sep_id=SEP)
    return TokenStream(byte_tokens, str(path), cache_dir=cache, **{**defaults, **options})


def documents_in(batches: list[torch.Tensor]) -> set[str]:
    """Whole documents inside packed batches (the partial first and last ones are dropped)."""
    body = torch.cat([b[:, 1:] for b in batches]).flatten().tolist()
    pieces, current = [], []
    for token in body:
        if token == SEP:
            pieces.append(bytes(current).decode())
            current = []
        else:
            current.append(token)
    return set(pieces[1:])


def test_packing_concatenates_documents_behind_bos(jsonl, cache, docs):
    s = stream(jsonl, cache, heldout_fraction=0.0, loop=False, seed=3)
    batches = list(s)
    seqs = torch.cat(batches)
    assert seqs.dtype == torch.int64 and seqs.shape[1] == 16
    assert all(b.shape[0] == 4 for b in batches[:-1])
    assert (seqs[:, 0] == BOS).all() and not (seqs[:, 1:] == BOS).any()
    expected = []
    for i in epoch_order(len(docs), seed=3, epoch=0):
        expected += byte_tokens(docs[i]) + [SEP]
    body = seqs[:, 1:].flatten().tolist()
    assert body == expected[: len(body)]
    assert len(expected) - len(body) < 15  # only the final partial sequence is dropped
    assert s.position == len(seqs)


def test_heldout_disjoint_from_train(jsonl, cache, docs):
    train = list(stream(jsonl, cache, heldout_fraction=0.3, loop=False))
    heldout = list(stream(jsonl, cache, heldout_fraction=0.3, loop=False, split="heldout"))
    train_docs, heldout_docs = documents_in(train), documents_in(heldout)
    assert len(heldout_docs) > 10 and len(train_docs) > 50
    assert not train_docs & heldout_docs
    assert (train_docs | heldout_docs) <= set(docs)


def test_heldout_split_ignores_seed(jsonl, cache):
    a = list(stream(jsonl, cache, split="heldout", loop=False, seed=0, heldout_fraction=0.3))
    b = list(stream(jsonl, cache, split="heldout", loop=False, seed=9, heldout_fraction=0.3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_deterministic_given_seed_and_loops_over_epochs(jsonl, cache):
    first = [next(stream(jsonl, cache, seed=1)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    a, b, c = stream(jsonl, cache, seed=1), stream(jsonl, cache, seed=1), stream(jsonl, cache)
    # More batches than one epoch holds: the train stream loops, reshuffled.
    n_epoch = len(list(stream(jsonl, cache, seed=1, loop=False)))
    batches_a = [next(a) for _ in range(n_epoch + 5)]
    batches_b = [next(b) for _ in range(n_epoch + 5)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b, strict=True))
    assert not torch.equal(batches_a[0], next(c))


def test_resume_from_position(jsonl, cache):
    s = stream(jsonl, cache, seed=2)
    for _ in range(7):
        next(s)
    state = s.state_dict()
    expected = [next(s) for _ in range(5)]
    resumed = stream(jsonl, cache, seed=2)
    resumed.load_state_dict(state)
    assert resumed.position == 28
    assert all(torch.equal(x, next(resumed)) for x in expected)
    assert torch.equal(resumed.sequences_at([30, 28])[1], expected[0][0])
    with pytest.raises(ValueError, match="seed"):
        stream(jsonl, cache, seed=5).load_state_dict(state)


def test_parquet_and_streaming_local_files(tmp_path, jsonl, cache, docs):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": docs}), path)
    from_parquet = list(stream(path, cache, split="heldout", heldout_fraction=0.3, loop=False))
    from_jsonl = list(stream(jsonl, cache, split="heldout", heldout_fraction=0.3, loop=False))
    streamed = list(
        stream(jsonl, cache, split="heldout", heldout_fraction=0.3, loop=False, streaming=True)
    )
    for other in (from_jsonl, streamed):
        assert all(torch.equal(x, y) for x, y in zip(from_parquet, other, strict=True))
    train_streamed = stream(jsonl, cache, streaming=True, seed=4)
    assert next(train_streamed).shape == (4, 16)


def test_glob_and_text_files(tmp_path, cache, docs):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("\n\n".join(docs[i * 10 : i * 10 + 10]))
    s = TokenStream(
        byte_tokens,
        str(tmp_path / "part*.txt"),
        seq_len=32,
        batch_size=2,
        heldout_fraction=0.0,
        bos_id=BOS,
        sep_id=SEP,
        loop=False,
        cache_dir=cache,
    )
    assert documents_in(list(s)) <= set(docs[:30])


def test_shakespeare_default(cache):
    assert len(shakespeare_files()) > 70
    s = TokenStream(byte_tokens, seq_len=64, batch_size=3, bos_id=BOS, sep_id=SEP, cache_dir=cache)
    batch = next(s)
    assert batch.shape == (3, 64) and (batch[:, 0] == BOS).all()
    heldout = next(s.with_split("heldout"))
    assert heldout.shape == (3, 64)


def test_bad_input_raises(jsonl, cache, tmp_path):
    with pytest.raises(ValueError, match="split"):
        stream(jsonl, cache, split="test")
    with pytest.raises(ValueError, match="seq_len"):
        stream(jsonl, cache, seq_len=1)
    with pytest.raises(ValueError, match="column"):
        stream(jsonl, cache, text_column="text")
    with pytest.raises(ValueError, match="matches no files"):
        stream(tmp_path / "nothing*.jsonl", cache)
    with pytest.raises(ValueError, match="bos_id"):
        TokenStream(byte_tokens, str(jsonl), text_column="body", cache_dir=cache)
    with pytest.raises(ValueError, match="no non-empty documents"):
        next(stream(jsonl, cache, split="heldout", heldout_fraction=0.0))
