"""CPU performance path of :func:`kernels.jumprelu.jumprelu_codes`.

Sparse in both directions: the forward packs the window entries of ``pre`` without a dense ``a``,
the backward reads only the code slots and writes one dense ``grad_pre``. The same results as the
specification (``jumprelu`` then ``mask_to_codes`` of the window), without its ``[L, N, F]``
temporaries.
"""

from __future__ import annotations

import torch

from .. import jumprelu as jr  # kernels.jumprelu imports this module: jr.* at call time
from ..codes import mask_to_codes


class JumpReLUCodesFunction(torch.autograd.Function):
    """Torch path of :func:`jumprelu_codes`, sparse in both directions: the forward packs the
    window entries of ``pre`` without a dense ``a``, the backward reads only the code slots (the
    STE is 0 outside the window: ``H = 0`` and ``rect = 0`` there) and writes one dense
    ``grad_pre``. Dense autograd through ``jumprelu`` and ``mask_to_codes`` allocates about ten
    ``[L, N, F]`` temporaries (a zeroed scatter target, the masks, ``rect``'s difference, ...):
    at L=12, N=1024, F=4096 each is a fresh 200 MB."""

    @staticmethod
    def forward(ctx, pre, log_theta, eps):
        theta = jr.theta_of(log_theta).squeeze(1)  # [L, F]
        window = jr.window_of(pre, theta.unsqueeze(1), eps)
        picked, indices = mask_to_codes(pre, window)  # [L, N, K], padding 0 / index 0
        counts = window.sum(dim=-1, dtype=torch.int32)  # [L, N]
        real = torch.arange(picked.shape[-1], device=pre.device) < counts.unsqueeze(-1)
        theta_slot = theta.gather(1, indices.flatten(1).long()).view(picked.shape)
        on = (picked > theta_slot) & real
        ctx.save_for_backward(picked, indices, theta_slot, theta, real, on)
        ctx.eps, ctx.shape, ctx.theta_dtype = eps, pre.shape, log_theta.dtype
        ctx.mark_non_differentiable(indices)
        return picked * on, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        picked, indices, theta_slot, theta, real, on = ctx.saved_tensors
        idx = indices.long()
        grad_pre = grad_log_theta = None
        if ctx.needs_input_grad[0]:  # dH/dpre = 0 a.e.: the gradient of the active entries
            grad_pre = grad_values.new_zeros(ctx.shape)
            grad_pre.scatter_add_(2, idx, grad_values * on)  # padding adds 0 to feature 0
        if ctx.needs_input_grad[1]:  # -(theta / eps) * rect * g, chained through exp
            rect = ((picked - theta_slot).abs() < ctx.eps / 2) & real
            dtheta = -(theta_slot / ctx.eps) * rect * grad_values.to(theta_slot.dtype)
            summed = theta.new_zeros(theta.shape).scatter_add_(1, idx.flatten(1),
                                                               dtheta.flatten(1))
            grad_log_theta = (summed * theta).to(ctx.theta_dtype)
        return grad_pre, grad_log_theta, None
