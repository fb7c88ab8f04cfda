"""JumpReLU with the rectangle straight-through estimator (torch path).

``theta = exp(log_theta)`` per (layer, feature), in float32. Forward ``a = pre * H(pre - theta)``.
Backward (Rajamanoharan et al., 2024): ``da/dpre = H(pre - theta)`` and
``da/dtheta = -(theta / eps) * rect((pre - theta) / eps)`` where ``rect(u) = 1`` for ``|u| < 1/2``;
the step ``H(pre - theta)`` (for an L0 penalty) gets ``dH/dtheta = -(1 / eps) * rect(...)`` and no
gradient in ``pre``. Threshold gradients are chained through ``log_theta`` (``* theta``).
"""

from __future__ import annotations

import torch

from .codes import mask_to_codes


def _theta(log_theta: torch.Tensor) -> torch.Tensor:
    """``[L, 1, F]`` thresholds in at least float32 (bf16 thresholds would round away steps)."""
    return log_theta.to(torch.promote_types(log_theta.dtype, torch.float32)).exp().unsqueeze(1)


def _rect(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


class JumpReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, log_theta, eps):
        theta = _theta(log_theta)
        ctx.save_for_backward(pre, theta)
        ctx.eps, ctx.theta_dtype = eps, log_theta.dtype
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad_a):
        pre, theta = ctx.saved_tensors
        grad_pre = grad_a * (pre > theta) if ctx.needs_input_grad[0] else None
        grad_log_theta = None
        if ctx.needs_input_grad[1]:
            # chain rule through theta = exp(log_theta): d/dlog_theta = theta * d/dtheta
            dtheta = -(theta / ctx.eps) * _rect(pre, theta, ctx.eps) * grad_a
            grad_log_theta = (dtheta.sum(dim=1) * theta.squeeze(1)).to(ctx.theta_dtype)
        return grad_pre, grad_log_theta, None


class JumpReLUStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, log_theta, eps):
        theta = _theta(log_theta)
        ctx.save_for_backward(pre, theta)
        ctx.eps, ctx.theta_dtype = eps, log_theta.dtype
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_h):
        pre, theta = ctx.saved_tensors
        dtheta = -(1.0 / ctx.eps) * _rect(pre, theta, ctx.eps) * grad_h
        return None, (dtheta.sum(dim=1) * theta.squeeze(1)).to(ctx.theta_dtype), None


def _check(pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> None:
    if pre.dim() != 3 or log_theta.shape != (pre.shape[0], pre.shape[2]):
        raise ValueError(
            f"JumpReLU: pre must be [L, N, F] and log_theta [L, F], got {tuple(pre.shape)} and "
            f"{tuple(log_theta.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"JumpReLU bandwidth must be > 0, got {eps}")


def jumprelu(pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``pre * H(pre - exp(log_theta))`` with the rectangle STE; ``pre [L, N, F]``, ``log_theta [L, F]``."""
    _check(pre, log_theta, eps)
    return JumpReLUFunction.apply(pre, log_theta, eps)


def jumprelu_step(pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``H(pre - exp(log_theta))`` with the STE threshold gradient (for an L0 penalty)."""
    _check(pre, log_theta, eps)
    return JumpReLUStepFunction.apply(pre, log_theta, eps)


def jumprelu_codes(
    pre: torch.Tensor, log_theta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU as sparse codes, exact in every gradient.

    The codes hold every entry with ``pre > theta - eps/2``: the active ones and the zero-valued
    ones inside the rectangle window below ``theta``. The latter carry the decode's gradient
    ``dL/da`` that the threshold's STE needs; dropping them (as a plain sparse decode would)
    silently halves the threshold gradient.
    """
    a = jumprelu(pre, log_theta, eps)
    theta = _theta(log_theta.detach())
    # same arithmetic as _rect: ``pre > theta - eps/2`` rounds differently and can drop an entry
    # the rectangle holds (e.g. float32 pre == fl(theta - eps/2) with that rounding up)
    return mask_to_codes(a, pre.detach() - theta > -eps / 2)
