"""Decoder norms ``[L, F]``: the norm of each feature's whole crosslayer write.

Feature ``f`` of source ``s`` writes rows ``W_dec[s][f, 0 .. R_s - 1]`` (see
:class:`~kernels.layout.DecoderLayout`); its norm is that of their concatenation. Used by the
tanh sparsity penalty and TopK's optional ``rank_scale``. Pure torch on every device (a
reduction over the table that library kernels already run at bandwidth).
"""

from __future__ import annotations

import torch

from . import buffers
from .layout import DecoderLayout


def decoder_norms_torch(W_dec: torch.Tensor, layout: DecoderLayout) -> torch.Tensor:
    """Specification: per source, the norm over ``[R_s, d_out]`` of each feature's block, in
    fp32 (fp64 for fp64 input) and cast back."""
    acc = torch.promote_types(W_dec.dtype, torch.float32)
    return torch.stack([
        torch.linalg.vector_norm(layout.source_view(W_dec, s).to(acc), dim=(1, 2))
        for s in range(layout.n_layers)
    ]).to(W_dec.dtype)


class DecoderNormsFunction(torch.autograd.Function):
    """``[L, F]`` whole-write norms from per-row norms. Its backward writes one ``W_dec``-sized
    gradient ``W_dec * (g / norm)`` per row; autograd through a norm of each source's block
    (a slice of ``W_dec``) zero-fills and adds one ``W_dec``-sized gradient per source (12 GB
    of memset and adds a step at L=12, d=768, F=4096: 6 s of a JumpReLU step)."""

    @staticmethod
    def forward(ctx, W_dec, layout):
        acc = torch.promote_types(W_dec.dtype, torch.float32)
        row_sq = torch.linalg.vector_norm(W_dec, dim=1, dtype=acc).square()  # [n_rows]
        offsets, F = layout.source_row_offsets, layout.n_features
        norms = torch.stack([row_sq[offsets[s] : offsets[s + 1]].view(F, -1).sum(1)
                             for s in range(layout.n_layers)]).sqrt()  # [L, F]
        ctx.save_for_backward(W_dec, norms)
        ctx.layout = layout
        return norms.to(W_dec.dtype)

    @staticmethod
    def backward(ctx, grad):
        W_dec, norms = ctx.saved_tensors
        layout = ctx.layout
        # d||w|| / dw = w / ||w||, and 0 at w = 0 (torch's subgradient)
        scale = torch.where(norms > 0, grad.to(norms.dtype) / norms, torch.zeros_like(norms))
        per_row = torch.cat([scale[s].repeat_interleave(layout.reach_of(s))
                             for s in range(layout.n_layers)])  # [n_rows]
        out = buffers.empty(W_dec.shape, W_dec.dtype, W_dec.device)
        torch.mul(W_dec, per_row.unsqueeze(1).to(W_dec.dtype), out=out)
        return out, None  # not mul's return value: an alias of out that autograd would not
        # accumulate into in place (it sums out-of-place into a fresh W_dec-sized tensor)


def decoder_norms(W_dec: torch.Tensor, layout: DecoderLayout) -> torch.Tensor:
    """``[L, F]`` norm of each feature's whole write, concatenated over all its targets."""
    if W_dec.dim() != 2 or W_dec.shape[0] != layout.n_rows:
        raise ValueError(f"W_dec must be [{layout.n_rows}, d_out], got {tuple(W_dec.shape)}")
    return DecoderNormsFunction.apply(W_dec, layout)
