"""An on-disk cache of LM activations: sharded safetensors files plus a `manifest.json`.

Shards hold whole LM batches of the train stream in stream order, BOS positions dropped:
`x [L, n, d_in]`, `y [L, n, d_out]` and the token ids `tokens [s, seq_len]` of their `s`
sequences (`n = s * (seq_len - 1)`). The manifest names the model, layers, hooks, dtype, text and
stream options the activations came from, and each shard's sequence range, shapes, size and
sha256. Every file is written to a temporary name and renamed, and the manifest is rewritten only
after its shards are complete, so an interrupted writer never leaves a half shard that the
manifest references. Held-out activations are cached the same way, one file per token count.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..atomic import atomic_write

MANIFEST = "manifest.json"
FORMAT = 1


class CacheError(ValueError):
    """A cache folder that cannot serve this run: unreadable, corrupted or made for other
    activations. Deleting the folder (or setting another ``data.lm.cache_dir``) makes the next
    run rebuild it from the LM."""


class Chunk(NamedTuple):
    """Activations of consecutive train-stream sequences `[first, first + len(tokens))`."""

    first: int
    x: torch.Tensor  # [L, n, d_in]
    y: torch.Tensor  # [L, n, d_out]
    tokens: torch.Tensor  # [s, seq_len]

    @property
    def stop(self) -> int:
        return self.first + self.tokens.shape[0]


class ActivationCache:
    """Read and extend the cache in `folder` for activations described by `identity`.

    `identity` (model, layers, hooks, dtype, text, seq_len, seed, ...) must equal the manifest's,
    else `CacheError`. Shard sizes are checked on open and hashes when a shard is read.
    `shard_tokens`: tokens per shard written (rounded up to whole LM batches).
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], shard_tokens: int = 2**16):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder = Path(folder).expanduser()
        self.identity = json.loads(json.dumps(identity))  # as it reads back from JSON
        self.shard_tokens = shard_tokens
        self.per_sequence = int(identity["seq_len"]) - 1
        self.manifest = self._open()
        self._pending: list[Chunk] = []
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None  # last shard read
        # The producer thread writes shards while the consumer may cache held-out activations.
        self._lock = threading.RLock()

    # ---- reading -------------------------------------------------------------------------

    @property
    def sequences(self) -> int:
        """Train-stream sequences cached, from sequence 0 on."""
        return int(self.manifest["sequences"])

    @property
    def widths(self) -> tuple[int, int] | None:
        """`(d_in, d_out)` of the cached activations, or None while the cache is empty."""
        if self.manifest.get("d_in") is None:
            return None
        return int(self.manifest["d_in"]), int(self.manifest["d_out"])

    def chunks(self, start: int, batch_size: int) -> Iterator[Chunk]:
        """Cached chunks of `batch_size` sequences from sequence `start` to the cache's end."""
        position = start
        while position < self.sequences:
            stop = min(position + batch_size, self.sequences)
            yield self.read(position, stop)
            position = stop

    def read(self, first: int, stop: int) -> Chunk:
        """The cached sequences `[first, stop)` as one chunk (may span shards)."""
        with self._lock:
            return self._read(first, stop)

    def _read(self, first: int, stop: int) -> Chunk:
        if not 0 <= first < stop <= self.sequences:
            raise ValueError(f"sequences [{first}, {stop}) are not in the cache")
        parts = []
        for index, shard in enumerate(self.manifest["shards"]):
            lo = max(first, shard["first_sequence"])
            hi = min(stop, shard["first_sequence"] + shard["n_sequences"])
            if lo >= hi:
                continue
            tensors = self._shard(index)
            a, b = lo - shard["first_sequence"], hi - shard["first_sequence"]
            per = self.per_sequence
            parts.append(
                (
                    tensors["x"][:, a * per : b * per],
                    tensors["y"][:, a * per : b * per],
                    tensors["tokens"][a:b],
                )
            )
        x = torch.cat([p[0] for p in parts], dim=1)
        y = torch.cat([p[1] for p in parts], dim=1)
        tokens = torch.cat([p[2] for p in parts])
        return Chunk(first, x, y, tokens)

    def heldout(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached held-out activations of the first `n_tokens` tokens, or None."""
        entry = self.manifest.get("heldout", {}).get(str(n_tokens))
        if entry is None:
            return None
        tensors = self._load_file(entry)
        return tensors["x"], tensors["y"]

    # ---- writing -------------------------------------------------------------------------

    def add(self, chunk: Chunk) -> None:
        """Queue a chunk that continues the cache; whole shards are written as they fill.

        Chunks that do not start where the cache (plus queued chunks) ends are ignored.
        """
        with self._lock:
            end = self._pending[-1].stop if self._pending else self.sequences
            if chunk.first != end:
                return
            self._pending.append(_to_cpu(chunk))
            if sum(c.x.shape[1] for c in self._pending) >= self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        """Write queued chunks as one shard and commit it to the manifest."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        chunks, self._pending = self._pending, []
        first = chunks[0].first
        tensors = {
            "x": torch.cat([c.x for c in chunks], dim=1).contiguous(),
            "y": torch.cat([c.y for c in chunks], dim=1).contiguous(),
            "tokens": torch.cat([c.tokens for c in chunks]).contiguous(),
        }
        n_sequences = tensors["tokens"].shape[0]
        name = f"shard-{first:010d}-{first + n_sequences:010d}.safetensors"
        entry = self._write_file(name, tensors)
        entry.update(first_sequence=first, n_sequences=n_sequences)
        manifest = dict(self.manifest)
        manifest["shards"] = [*manifest["shards"], entry]
        manifest["sequences"] = first + n_sequences
        manifest["tokens"] = manifest["sequences"] * self.per_sequence
        manifest["d_in"], manifest["d_out"] = tensors["x"].shape[-1], tensors["y"].shape[-1]
        self._commit(manifest)

    def put_heldout(self, n_tokens: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Cache the held-out activations `x [L, n, d_in]`, `y [L, n, d_out]`."""
        tensors = {"x": x.detach().cpu().contiguous(), "y": y.detach().cpu().contiguous()}
        with self._lock:
            entry = self._write_file(f"heldout-{n_tokens}.safetensors", tensors)
            manifest = dict(self.manifest)
            manifest["heldout"] = {**manifest.get("heldout", {}), str(n_tokens): entry}
            self._commit(manifest)

    # ---- files ---------------------------------------------------------------------------

    def _open(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        if not path.is_file():
            return {
                "format": FORMAT,
                **self.identity,
                "sequences": 0,
                "tokens": 0,
                "d_in": None,
                "d_out": None,
                "shards": [],
                "heldout": {},
            }
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"activation cache manifest {path} is unreadable: {err}") from None
        if manifest.get("format") != FORMAT:
            raise CacheError(
                f"activation cache manifest {path} has format {manifest.get('format')!r}, "
                f"expected {FORMAT}"
            )
        mismatched = [
            f"{key} {manifest.get(key)!r} (this run: {value!r})"
            for key, value in self.identity.items()
            if manifest.get(key) != value
        ]
        if mismatched:
            raise CacheError(
                f"activation cache {path} was made for other activations: "
                f"{'; '.join(mismatched)}. Set another data.lm.cache_dir"
            )
        expected = 0
        for shard in manifest["shards"]:
            if shard["first_sequence"] != expected:
                raise CacheError(f"activation cache {path}: shard {shard['file']} is out of order")
            expected += shard["n_sequences"]
        if expected != manifest["sequences"]:
            raise CacheError(
                f"activation cache {path}: shards hold {expected} sequences, "
                f"the manifest says {manifest['sequences']}"
            )
        for entry in [*manifest["shards"], *manifest.get("heldout", {}).values()]:
            self._check_size(entry)
        return manifest

    def _check_size(self, entry: dict[str, Any]) -> Path:
        path = self.folder / entry["file"]
        if not path.is_file():
            raise CacheError(f"activation cache file {path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CacheError(
                f"activation cache file {path} is truncated or corrupted: {size} bytes, "
                f"the manifest says {entry['bytes']}"
            )
        return path

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = (index, self._load_file(self.manifest["shards"][index]))
        return self._loaded[1]

    def _load_file(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        path = self._check_size(entry)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise CacheError(
                f"activation cache file {path} is corrupted: sha256 {digest}, "
                f"the manifest says {entry['sha256']}"
            )
        try:
            tensors = load_safetensors(data)
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise CacheError(f"activation cache file {path} is unreadable: {err}") from None
        for key in ("x", "y"):
            if list(tensors[key].shape) != entry[f"{key}_shape"]:
                raise CacheError(
                    f"activation cache file {path}: {key} has shape "
                    f"{list(tensors[key].shape)}, the manifest says "
                    f"{entry[f'{key}_shape']}"
                )
        return tensors

    def _write_file(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        data = save_safetensors(tensors, metadata={"format": str(FORMAT)})
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / name, data)
        return {
            "file": name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "x_shape": list(tensors["x"].shape),
            "y_shape": list(tensors["y"].shape),
            "tokens": tensors["x"].shape[1],
        }

    def _commit(self, manifest: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / MANIFEST, json.dumps(manifest, indent=1))
        self.manifest = manifest


def _to_cpu(chunk: Chunk) -> Chunk:
    return Chunk(chunk.first, chunk.x.cpu(), chunk.y.cpu(), chunk.tokens.cpu())
