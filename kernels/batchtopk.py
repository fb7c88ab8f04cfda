"""Exact BatchTopK selection (torch path).

Keep the ``m`` largest pre-activations of a whole batch: ``m = N * k`` of each layer's ``[N, F]``
(scope ``"layer"``) or ``m = L * N * k`` of all ``[L, N, F]`` (scope ``"global"``). The set is
exactly what a dense descending sort would keep, with ties at the cut broken by the smaller flat
index, so the result is deterministic. Kept values go through relu.
"""

from __future__ import annotations

import torch

from .codes import mask_to_codes


def exact_topk_mask(flat: torch.Tensor, m: int) -> torch.Tensor:
    """Bool mask of the ``m`` largest entries of a 1-D tensor; ties go to the lower index."""
    if not 0 < m <= flat.numel():
        raise ValueError(f"cannot keep {m} of {flat.numel()} entries")
    if torch.isnan(flat).any():
        raise ValueError("BatchTopK input contains NaN")
    cut = torch.topk(flat, m, sorted=False).values.min()
    mask = flat > cut
    need = m - int(mask.sum())
    at_cut = (flat == cut).nonzero().squeeze(1)[:need]
    mask[at_cut] = True
    return mask


def batchtopk_mask(pre: torch.Tensor, k: int, scope: str) -> torch.Tensor:
    """``[L, N, F]`` bool mask of the BatchTopK winners."""
    L, N, F = pre.shape
    detached = pre.detach()
    if scope == "layer":
        return torch.stack([exact_topk_mask(detached[l].flatten(), N * k) for l in range(L)]).view(
            L, N, F
        )
    if scope == "global":
        return exact_topk_mask(detached.flatten(), L * N * k).view(L, N, F)
    raise ValueError(f"BatchTopK scope must be 'layer' or 'global', got {scope!r}")


def batchtopk(
    pre: torch.Tensor, k: int, scope: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK codes and the smallest kept value.

    Args:
        pre: ``[L, N, F]`` pre-activations.
        k: average active features per (token, layer).
        scope: ``"layer"`` (``N*k`` winners per layer) or ``"global"`` (``L*N*k`` overall).

    Returns:
        ``values [L, N, K]`` (relu of the kept pre-activations, differentiable), ``indices`` int32,
        and ``min_kept`` (``[L]`` for scope layer, ``[1]`` for global): the smallest kept
        pre-activation clamped at 0, the threshold that reproduces the selection at inference.
    """
    mask = batchtopk_mask(pre, k, scope)
    values, indices = mask_to_codes(pre, mask)
    with torch.no_grad():
        kept = torch.where(mask, pre, torch.full_like(pre, torch.inf))
        min_kept = kept.amin(dim=(1, 2)) if scope == "layer" else kept.amin().view(1)
        min_kept = min_kept.clamp(min=0)
    return torch.relu(values), indices, min_kept
