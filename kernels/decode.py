"""Sparse crosslayer decode: the torch path (specification and CPU implementation).

Source layer ``s`` writes to targets ``s .. s + R_s - 1`` with ``R_s = min(R, L - s)``. All
decoder weights live in one contiguous row table ``W_dec [F * P, d_out]`` with ``P = sum_s R_s``:
source ``s`` owns rows ``F * P_s .. F * (P_s + R_s)`` (``P_s`` = rows of earlier sources), viewed
as ``[F, R_s, d_out]`` so one feature's whole crosslayer write is contiguous (circuit-tracer's
layout). The row of (source ``s``, feature ``f``, target ``t``) is ``F * P_s + f * R_s + t - s``.

    out[t, n] = b_dec[t] + sum_{s <= t < s + R_s} sum_j values[s, n, j] * W_dec[s][indices[s, n, j], t - s]

Only the rows named by the codes are read: per target, one ``embedding_bag`` over the
concatenated slots of every source that reaches it, so nothing of size ``[N, F]`` exists and
autograd keeps only the codes for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F_


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


def _target_rows(indices: torch.Tensor, layout: DecoderLayout, target: int) -> torch.Tensor:
    """Row ids ``[N, K * n_sources]`` that target ``target`` reads, int64 (no overflow)."""
    rows = []
    for s in layout.sources_of(target):
        base = layout.source_row_offsets[s] + (target - s)
        rows.append(base + indices[s].long() * layout.reach_of(s))
    return torch.cat(rows, dim=1)


def sparse_decode_torch(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    layout: DecoderLayout,
) -> torch.Tensor:
    """Torch path of :func:`sparse_decode`; differentiable in values, W_dec and b_dec."""
    L, N, _ = values.shape
    outs = []
    for t in range(L):
        sources = layout.sources_of(t)
        rows = _target_rows(indices, layout, t)
        # [N, K * n_sources], same slot order as rows
        weights = torch.cat([values[s] for s in sources], dim=1).to(W_dec.dtype)
        out_t = F_.embedding_bag(rows, W_dec, per_sample_weights=weights, mode="sum")
        outs.append(out_t if b_dec is None else out_t + b_dec[t])
    return torch.stack(outs)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    layout: DecoderLayout,
) -> torch.Tensor:
    """Decode sparse codes into crosslayer outputs.

    Args:
        values: ``[L, N, K]`` code values; padded slots hold 0.
        indices: ``[L, N, K]`` feature ids in ``[0, F)`` (int32 or int64).
        W_dec: ``[F * P, d_out]`` decoder row table (see :class:`DecoderLayout`).
        b_dec: ``[L, d_out]`` decoder bias, or None for a bias-free decode (AuxK).
        layout: the row layout of ``W_dec``.

    Returns:
        ``[L, N, d_out]`` outputs in ``W_dec``'s dtype.
    """
    check_codes(values, indices, layout.n_layers)
    if W_dec.dim() != 2 or W_dec.shape[0] != layout.n_rows:
        raise ValueError(f"W_dec must be [{layout.n_rows}, d_out], got {tuple(W_dec.shape)}")
    # a [d_out] or [L, 1] bias would broadcast silently in the torch path
    if b_dec is not None and b_dec.shape != (layout.n_layers, W_dec.shape[1]):
        raise ValueError(
            f"b_dec must be [{layout.n_layers}, {W_dec.shape[1]}], got {tuple(b_dec.shape)}"
        )
    return sparse_decode_torch(values, indices, W_dec, b_dec, layout)


def decoder_norms(W_dec: torch.Tensor, layout: DecoderLayout) -> torch.Tensor:
    """``[L, F]`` norm of each feature's whole write, concatenated over all its targets."""
    return torch.stack(
        [layout.source_view(W_dec, s).flatten(1).norm(dim=1) for s in range(layout.n_layers)]
    )
