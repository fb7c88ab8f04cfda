"""NpySource: activations stored as ``.npy`` arrays, ``x.npy [T, L, d_in]`` and ``y.npy
[T, L, d_out]`` (float32 or float16), read through memory maps.

The first ``heldout_tokens`` rows are the held-out split; training reads the rest in order,
looping. Process ``i`` of ``n`` takes the ``i``-th slice of every global batch, so the slices of a
tensor-parallel group concatenate to exactly the batch one process would read, and data-parallel
replicas read disjoint tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from clt.data.sources import Source


@dataclass
class NpySource(Source):
    folder: str = field(metadata={"help": "Folder holding x.npy [T, L, d_in] and y.npy "
                                  "[T, L, d_out]."})
    heldout_tokens: int = field(default=256, metadata={"help": "Rows at the start kept for "
                                                       "evaluation, >= 2."})

    kind: ClassVar[str] = "npy"

    def __post_init__(self) -> None:
        if self.heldout_tokens < 2:
            raise ValueError(f"heldout_tokens must be >= 2 (got {self.heldout_tokens})")
        x, y = self._arrays()
        if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
            raise ValueError(f"folder {self.folder}: x.npy and y.npy must be [T, L, d] with the "
                             f"same T and L (got {x.shape} and {y.shape})")
        if x.shape[0] <= self.heldout_tokens:
            raise ValueError(f"heldout_tokens leaves no training rows in {self.folder} "
                             f"({x.shape[0]} rows, {self.heldout_tokens} held out)")

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        folder = Path(self.folder)
        try:
            return (np.load(folder / "x.npy", mmap_mode="r"),
                    np.load(folder / "y.npy", mmap_mode="r"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"folder cannot be read: {exc}") from None

    def n_layers(self) -> int:
        return self._arrays()[0].shape[1]

    def build(self, cfg: Any, device: Any, shard: tuple[int, int]) -> NpyStream:
        return NpyStream(*self._arrays(), self.heldout_tokens, shard)


class NpyStream:
    """The activation stream the trainer reads (see ``clt.data.sources``)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, heldout: int, shard: tuple[int, int]):
        self.x, self.y, self.heldout = x, y, heldout
        self.rank, self.processes = shard
        self.d_in, self.d_out = x.shape[2], y.shape[2]
        self.position = 0  # training rows consumed by all processes together

    def _rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        def take(a: np.ndarray) -> torch.Tensor:  # [n, L, d] -> [L, n, d], float32
            return torch.from_numpy(np.ascontiguousarray(a[rows], dtype=np.float32)) \
                .permute(1, 0, 2).contiguous()
        return take(self.x), take(self.y)

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_train = self.x.shape[0] - self.heldout
        start = self.position + self.rank * n
        rows = self.heldout + (start + np.arange(n)) % n_train
        self.position += n * self.processes
        return self._rows(rows)

    def heldout_batches(self, n_tokens: int, batch: int = 4096) -> list[tuple[torch.Tensor, ...]]:
        if n_tokens > self.heldout:
            raise ValueError(f"only {self.heldout} held-out rows (heldout_tokens)")
        return [self._rows(np.arange(lo, min(lo + batch, n_tokens)))
                for lo in range(0, n_tokens, batch)]

    def state_dict(self) -> dict:
        return {"position": self.position, "shard": [self.rank, self.processes]}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def close(self) -> None:
        pass
