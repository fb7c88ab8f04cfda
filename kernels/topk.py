"""Fused encode + TopK with a sparse encoder backward (torch path).

Per (layer, token) keep the ``k`` largest pre-activations ``pre = x @ W_enc + b_enc``. The
selection is done one layer at a time so at most one ``[N, F]`` block exists, and backward uses
only the selected entries: ``grad W_enc[:, f] = sum_{(n, j): idx = f} g[n, j] * x[n]``, which costs
``O(N * k * d_in)`` instead of a dense ``[N, F]`` GEMM, and no ``[L, N, F]`` tensor is kept.
"""

from __future__ import annotations

import torch


def _encode_topk_fwd(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, rank_scale
) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = [], []
    for layer in range(x.shape[0]):
        pre = torch.addmm(b_enc[layer], x[layer], W_enc[layer])  # [N, F]
        score = pre if rank_scale is None else pre * rank_scale[layer]
        idx = torch.topk(score, k, dim=-1).indices
        values.append(pre.gather(1, idx))
        indices.append(idx)
    return torch.stack(values), torch.stack(indices)


def _encode_topk_bwd(grad_values, x, W_enc, indices, needs_x, needs_w, needs_b):
    """Gradients of ``values = pre.gather(indices)`` w.r.t. x, W_enc, b_enc from the codes only."""
    L, N, k = indices.shape
    d_in, F = W_enc.shape[1:]
    grad_x = torch.empty_like(x) if needs_x else None
    grad_W = torch.empty_like(W_enc) if needs_w else None
    grad_b = grad_values.new_zeros(L, F) if needs_b else None
    for layer in range(L):
        g = grad_values[layer]  # [N, k]
        idx = indices[layer].reshape(-1)  # [N * k]
        if needs_x:
            # [N, k, d_in] columns of W_enc picked by the codes
            cols = W_enc[layer].t().contiguous().index_select(0, idx).view(N, k, d_in)
            grad_x[layer] = torch.einsum("nk,nkd->nd", g, cols)
        if needs_w:
            contrib = (g.unsqueeze(-1) * x[layer].unsqueeze(1)).reshape(N * k, d_in)
            grad_W[layer] = x.new_zeros(F, d_in).index_add_(0, idx, contrib).t()
        if needs_b:
            grad_b[layer].index_add_(0, idx, g.reshape(-1))
    return grad_x, grad_W, grad_b


class EncodeTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, rank_scale):
        values, indices = _encode_topk_fwd(x, W_enc, b_enc, k, rank_scale)
        ctx.save_for_backward(x, W_enc, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, indices = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grads = _encode_topk_bwd(grad_values, x, W_enc, indices, needs_x, needs_w, needs_b)
        return *grads, None, None


def encode_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    rank_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k pre-activations per (layer, token), differentiable in x, W_enc and b_enc.

    Args:
        x: ``[L, N, d_in]`` inputs.
        W_enc: ``[L, d_in, F]``; b_enc: ``[L, F]``.
        k: features kept per row, ``1 <= k <= F``.
        rank_scale: optional ``[L, F]`` non-negative weights (e.g. decoder norms): rows are ranked by
            ``pre * rank_scale`` but the returned values are ``pre``. Not differentiated.

    Returns:
        ``values [L, N, k]`` (pre-activations, apply relu for TopK codes) and ``indices [L, N, k]``
        int64, ordered by decreasing score.
    """
    L, N, d_in = x.shape
    if W_enc.shape[:2] != (L, d_in) or b_enc.shape != (L, W_enc.shape[2]):
        raise ValueError(
            f"encode_topk: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, b_enc "
            f"{tuple(b_enc.shape)} do not agree on [L, N, d_in] x [L, d_in, F] + [L, F]"
        )
    if not 1 <= k <= W_enc.shape[2]:
        raise ValueError(f"encode_topk: k must be in 1..{W_enc.shape[2]}, got {k}")
    if rank_scale is not None:
        # an [F] or [L, 1] scale would broadcast silently into a different ranking
        if rank_scale.shape != b_enc.shape:
            raise ValueError(
                f"encode_topk: rank_scale must be [L, F] = {tuple(b_enc.shape)}, got "
                f"{tuple(rank_scale.shape)}"
            )
        rank_scale = rank_scale.detach()
    return EncodeTopKFunction.apply(x, W_enc, b_enc, k, rank_scale)
