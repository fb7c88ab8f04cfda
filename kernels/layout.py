"""The decoder's row table: where each source layer's ``[F, R_s, d_out]`` block sits.

Source layer ``s`` writes to targets ``s .. s + R_s - 1`` with ``R_s = min(R, L - s)``. All
decoder weights live in one contiguous row table ``W_dec [F * P, d_out]`` with ``P = sum_s R_s``:
source ``s`` owns rows ``F * P_s .. F * (P_s + R_s)`` (``P_s`` = rows of earlier sources), viewed
as ``[F, R_s, d_out]`` so one feature's whole crosslayer write is contiguous (circuit-tracer's
layout). The row of (source ``s``, feature ``f``, target ``t``) is ``F * P_s + f * R_s + t - s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class DecoderLayout:
    """Where each source layer's ``[F, R_s, d_out]`` block sits in the row table."""

    n_layers: int
    n_features: int
    reach: int

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_features < 1:
            raise ValueError(f"need n_layers >= 1 and n_features >= 1, got {self}")
        if not 1 <= self.reach <= self.n_layers:
            raise ValueError(f"reach must be in 1..{self.n_layers}, got {self.reach}")

    def reach_of(self, source: int) -> int:
        """Number of targets source layer ``source`` writes to (``R_s``)."""
        return min(self.reach, self.n_layers - source)

    @cached_property
    def source_row_offsets(self) -> tuple[int, ...]:
        """First row of each source's block, plus the total row count at the end."""
        offsets = [0]
        for s in range(self.n_layers):
            offsets.append(offsets[-1] + self.n_features * self.reach_of(s))
        return tuple(offsets)

    @property
    def n_rows(self) -> int:
        return self.source_row_offsets[-1]

    def sources_of(self, target: int) -> range:
        """Source layers whose features write to ``target``."""
        return range(max(0, target - self.reach + 1), target + 1)

    def source_view(self, W_dec: torch.Tensor, source: int) -> torch.Tensor:
        """``[F, R_s, d_out]`` view of one source's block (no copy)."""
        lo, hi = self.source_row_offsets[source], self.source_row_offsets[source + 1]
        return W_dec[lo:hi].view(self.n_features, self.reach_of(source), W_dec.shape[-1])


def check_codes(values: torch.Tensor, indices: torch.Tensor, n_layers: int) -> None:
    """Shape checks shared by every op that consumes sparse codes ``[L, N, K]``."""
    if values.shape != indices.shape or values.dim() != 3 or values.shape[0] != n_layers:
        raise ValueError(
            f"codes must be [L={n_layers}, N, K] with matching shapes, got values "
            f"{tuple(values.shape)} and indices {tuple(indices.shape)}"
        )


_TABLES: dict[tuple[DecoderLayout, torch.device], tuple[torch.Tensor, ...]] = {}


def layout_tables(layout: DecoderLayout, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(row_offsets [L + 1], reach [L], feature_first_rows [L * F + 1])`` int64 on ``device``,
    built once per (layout, device) so a step copies nothing to the GPU: the first row of each
    source (and the total), each ``R_s``, and the first row of every (source, feature) in table
    order followed by the row count (the segment boundaries the deterministic backward
    searches for)."""
    key = (layout, device)
    if key not in _TABLES:
        offsets = torch.tensor(layout.source_row_offsets, dtype=torch.int64)
        reach = torch.tensor([layout.reach_of(s) for s in range(layout.n_layers)])
        first = offsets[:-1, None] + torch.arange(layout.n_features) * reach[:, None]  # [L, F]
        first = torch.cat([first.flatten(), offsets[-1:]])
        _TABLES[key] = tuple(t.to(device) for t in (offsets, reach, first))
    return _TABLES[key]
