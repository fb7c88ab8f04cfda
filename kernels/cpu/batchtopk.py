"""CPU performance path of the exact BatchTopK selection.

Same set as :func:`kernels.batchtopk.topk_mask_torch` (a stable descending sort), without
sorting: ``torch.topk`` gives the cut value, every entry above it is kept and the ties at the cut
go to the lowest indices.
"""

from __future__ import annotations

import torch


def topk_mask(rows: torch.Tensor, m: int) -> torch.Tensor:
    """``[S, M]`` bool mask of the ``m`` largest entries of each row, ties at the cut to the
    lower index. One batched ``topk`` over the rows (2 threads here: 134 ms for 12 rows of 4M,
    where a loop of 1-D calls took 497 ms); int32 counts (an int64 sum of a bool mask first
    copies it to int64)."""
    cut = torch.topk(rows, m, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # [S, 1]
    mask = rows > cut
    need = m - mask.sum(dim=1, dtype=torch.int32)  # [S] >= 1: the cut itself is in the top m
    ties = (rows == cut).nonzero()  # [T, 2] row-major: each row's ties by increasing index
    first = torch.searchsorted(ties[:, 0].contiguous(), torch.arange(rows.shape[0],
                                                                     device=rows.device))
    rank = torch.arange(ties.shape[0], device=rows.device) - first[ties[:, 0]]
    keep = ties[rank < need[ties[:, 0]]]
    mask[keep[:, 0], keep[:, 1]] = True
    return mask
