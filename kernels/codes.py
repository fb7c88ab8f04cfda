"""Sparse codes ``values/indices [L, N, K]`` from a dense selection mask (torch path).

Shared by every nonlinearity whose active count varies per row (BatchTopK, JumpReLU, ReLU):
``K`` is the largest count of any (layer, token) row; shorter rows are padded with value 0 and
index 0, which the decode treats as a no-op.

No Triton kernel and no CPU fast path: ``nonzero`` and an indexed copy are library kernels on
every device, so each op here is its own specification (checked against a Python loop in
tests/ops/test_codes.py).
"""

from __future__ import annotations

import torch


def mask_to_codes(src: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``src[mask]`` into padded codes, slots in increasing feature order.

    Args:
        src: ``[L, N, F]`` values to pick from (gradients flow back to the picked entries only;
            autograd keeps the coordinates, not ``src``).
        mask: ``[L, N, F]`` bool selection.

    Returns:
        ``values [L, N, K]`` in ``src``'s dtype and ``indices [L, N, K]`` int32, ``K >= 1``.
    """
    if src.shape != mask.shape or src.dim() != 3:
        raise ValueError(f"src {tuple(src.shape)} and mask {tuple(mask.shape)} must be [L, N, F]")
    L, N, _ = src.shape
    # nonzero() is row-major, so entries of one row are contiguous and sorted by feature
    nz = mask.nonzero()  # [nnz, 3]
    counts = mask.sum(dim=-1, dtype=torch.int32).flatten()  # [L * N] (int64 would copy mask)
    K = max(int(counts.max()) if counts.numel() else 0, 1)
    row = nz[:, 0] * N + nz[:, 1]
    row_start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(nz.shape[0], device=src.device) - row_start[row]
    picked = src[nz[:, 0], nz[:, 1], nz[:, 2]]
    values = src.new_zeros(L * N, K).index_put((row, pos), picked)
    indices = torch.zeros(L * N, K, dtype=torch.int32, device=src.device)
    indices[row, pos] = nz[:, 2].to(torch.int32)
    return values.view(L, N, K), indices.view(L, N, K)


def relu_codes(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU as sparse codes: the entries with ``pre > 0`` (their gradient is 1, elsewhere 0)."""
    return mask_to_codes(pre, pre > 0)
