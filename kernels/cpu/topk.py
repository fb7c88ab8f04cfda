"""CPU performance path of the TopK encode (what a training step runs on a CPU).

Same results as :func:`kernels.topk.encode_topk_torch` (the specification), organised for a CPU:
the forward keeps one layer's ``[N, F]`` pre-activations alive at a time and selects with
``torch.topk`` plus a cheap tie fix (:func:`topk_rows`); the backward reads only the codes
(``embedding_bag`` gathers, or dense GEMMs for codes that name few features, ``DENSE_RATIO``) and
writes the ``W_enc``-sized gradient into a donated buffer (:mod:`kernels.buffers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from .. import buffers


def topk_rows(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries of each row of ``score [..., F]``,
    ordered by decreasing value and, among equal values, increasing index: the kernels' tie rule
    (the lower feature index wins), which ``torch.topk`` does not promise. ``torch.topk`` of
    ``k + 1`` does the work: its answer can only break the rule in a row where two neighbours of
    the sorted top ``k + 1`` are equal (a tie inside the kept set, or across the cut: both rare
    with real-valued scores), and those rows are redone by a stable sort. One host sync."""
    values, indices = torch.topk(score, min(k + 1, score.shape[-1]), dim=-1)
    redo = (values[..., 1:] == values[..., :-1]).any(-1)  # [...]
    if bool(redo.any()):
        rows = redo.nonzero(as_tuple=True)
        fixed = torch.sort(score[rows], dim=-1, descending=True, stable=True)
        values[rows] = fixed.values[..., : values.shape[-1]]
        indices[rows] = fixed.indices[..., : values.shape[-1]]
    return values[..., :k], indices[..., :k]


def encode_fwd(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, rank_scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [L, N, k] in x's dtype, indices int64)``: per layer one library GEMM into
    ``pre [N, F]`` and :func:`topk_rows` (only one layer's ``pre`` is alive at a time)."""
    values, indices = [], []
    for layer in range(x.shape[0]):
        pre = torch.addmm(b_enc[layer], x[layer], W_enc[layer])  # [N, F]
        score = pre if rank_scale is None else pre * rank_scale[layer]
        idx = topk_rows(score, k)[1]
        values.append(pre.gather(1, idx))
        indices.append(idx)
    return torch.stack(values), torch.stack(indices)


# A layer whose [N, F] gradient has at least one nonzero in DENSE_RATIO columns per row (AuxK:
# every token picks among the same few dead features) takes dense GEMMs, as in the decode's
# CPU path; a sparse one (TopK: k of F) takes embedding_bag gathers.
DENSE_RATIO = 8


def encode_bwd(grad_values, x, W_enc, indices, needs_x, needs_w, needs_b):
    """Gradients of ``values = pre.gather(indices)`` w.r.t. x, W_enc, b_enc from the codes only.

    Per layer, with ``g`` the gradient of the ``N * k`` slots: ``grad_x[n]`` is one
    ``embedding_bag`` over the rows of ``W_enc^T`` (bag: the token's slots) and ``grad W_enc^T[f]``
    one over the rows of ``x`` (bag: the slots naming ``f``, sorted by feature; empty bags give
    the zero columns), so no ``[N * k, d_in]`` product and no zeroed ``[F, d_in]`` buffer exist.
    A layer with ``F <= DENSE_RATIO * k`` scatters ``g`` into a dense ``[N, F]`` matrix instead.
    """
    L, N, k = indices.shape
    d_in, F = W_enc.shape[1:]
    grad_x = torch.empty_like(x) if needs_x else None
    # W_enc-sized: last step's gradient where the trainer donated it (kernels.buffers)
    grad_W = buffers.empty(W_enc.shape, W_enc.dtype, W_enc.device) if needs_w else None
    grad_b = grad_values.new_empty(L, F) if needs_b else None
    tokens = torch.arange(0, N * k, k, device=x.device)  # bag offsets: k slots per token
    # one working dtype: under autocast the codes' gradient is bf16 while W_enc stays fp32, and
    # embedding_bag wants its weight and per-sample weights alike
    work = torch.promote_types(torch.promote_types(grad_values.dtype, W_enc.dtype), x.dtype)
    for layer in range(L):
        g = grad_values[layer].reshape(-1).to(work)  # [N * k]
        idx = indices[layer].reshape(-1).long()
        if F <= DENSE_RATIO * k:
            tok = torch.arange(N, device=x.device).repeat_interleave(k)
            G = g.new_zeros(N, F).index_put_((tok, idx), g, accumulate=True)  # [N, F]
            if needs_x:
                grad_x[layer] = G @ W_enc[layer].t().to(work)
            if needs_w:
                grad_W[layer] = x[layer].t().to(work) @ G
            if needs_b:
                grad_b[layer] = G.sum(0)
            continue
        if needs_x:
            W_t = W_enc[layer].t().to(work).contiguous()  # [F, d_in]: gathered columns as rows
            grad_x[layer] = F_.embedding_bag(idx, W_t, tokens, per_sample_weights=g, mode="sum")
        if needs_w:
            feature, order = torch.sort(idx, stable=True)
            counts = torch.bincount(feature, minlength=F)
            starts = torch.cumsum(counts, 0) - counts
            grad_W[layer] = F_.embedding_bag(order // k, x[layer].to(work), starts,
                                             per_sample_weights=g[order], mode="sum").t()
        if needs_b:
            grad_b[layer] = g.new_zeros(F).index_add_(0, idx, g)
    return grad_x, grad_W, grad_b
