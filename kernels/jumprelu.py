"""JumpReLU with the rectangle straight-through estimator: Triton kernels and the torch path.

``theta = exp(log_theta)`` per (layer, feature), in float32. Forward ``a = pre * H(pre - theta)``.
Backward (Rajamanoharan et al., 2024): ``da/dpre = H(pre - theta)`` and
``da/dtheta = -(theta / eps) * rect((pre - theta) / eps)`` where ``rect(u) = 1`` for ``|u| < 1/2``;
the step ``H(pre - theta)`` (for an L0 penalty) gets ``dH/dtheta = -(1 / eps) * rect(...)`` and no
gradient in ``pre``. Threshold gradients are chained through ``log_theta`` (``* theta``).

Off Triton, :func:`jumprelu_torch` is the specification (plain autograd, the STE written as a
zero-valued term); the CPU path is the Function's torch branch (no saved masks) and, for
:func:`jumprelu_codes`, the sparse ``JumpReLUCodesFunction`` of :mod:`kernels.cpu.jumprelu`.

Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``; float64 ``pre`` or ``log_theta`` never run a
kernel): ``theta`` is computed once on the host side with torch's ``exp`` (``[L, F]``, tiny) so both
paths compare against bit-identical thresholds. ``_jumprelu_fwd_kernel`` is elementwise over
``[BLOCK_N, BLOCK_F]`` tiles of one layer (grid ``(F / BLOCK_F, N / BLOCK_N, L)``) and writes ``a``
and/or ``H``. ``_jumprelu_bwd_kernel`` writes ``grad_pre`` and per-program partial sums ``sum_n g *
rect`` into ``[L, N / BLOCK_N, F]``; a torch sum over the middle axis (fixed order, deterministic)
and the ``-theta^2 / eps`` (or ``-theta / eps`` for the step) factor finish ``grad_log_theta``. The
tanh / pre-activation loss terms are not fused here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import pick_path, triton_ok
from .codes import mask_to_codes
from .compile_check import CompileJob
from .cpu import jumprelu as cpu_jumprelu

# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _jumprelu_fwd_kernel(
    pre_ptr, theta_ptr, a_ptr, h_ptr,
    N, F,
    WRITE_A: tl.constexpr, WRITE_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid_f = tl.program_id(0)
    pid_n = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    cols = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows[:, None] < N) & (cols[None, :] < F)
    offs = (layer * N + rows[:, None]) * F + cols[None, :]
    pre = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + layer * F + cols, mask=cols < F, other=0.0)
    on = pre > theta[None, :]
    if WRITE_A:
        tl.store(a_ptr + offs, tl.where(on, pre, 0.0).to(a_ptr.dtype.element_ty), mask=m)
    if WRITE_H:
        tl.store(h_ptr + offs, tl.where(on, 1.0, 0.0).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _jumprelu_bwd_kernel(
    g_ptr, pre_ptr, theta_ptr, gpre_ptr, part_ptr,
    N, F, half_eps,
    WRITE_GPRE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``grad_pre = g * H(pre - theta)``; ``part[l, pid_n, f] = sum_{n in block} g * rect``."""
    pid_f = tl.program_id(0)
    pid_n = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    cols = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows[:, None] < N) & (cols[None, :] < F)
    offs = (layer * N + rows[:, None]) * F + cols[None, :]
    pre = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + layer * F + cols, mask=cols < F, other=0.0)[None, :]
    if WRITE_GPRE:
        tl.store(gpre_ptr + offs, tl.where(pre > theta, g, 0.0).to(gpre_ptr.dtype.element_ty),
                 mask=m)
    # same arithmetic as the torch path: |pre - theta| < eps / 2 in fp32
    inside = (tl.abs(pre - theta) < half_eps) & m
    part = tl.sum(tl.where(inside, g, 0.0), axis=0)
    n_blocks = tl.num_programs(1)
    tl.store(part_ptr + (layer * n_blocks + pid_n) * F + cols, part, mask=cols < F)


# ------------------------------------------------------------------------------------------------
# Host launchers
# ------------------------------------------------------------------------------------------------

# elementwise tiles: 32 x 128 fp32 = 16 KB per operand per program, 4 warps, no spills
BLOCKS = dict(BLOCK_N=32, BLOCK_F=128, num_warps=4)


def _grid(L: int, N: int, F: int) -> tuple[int, int, int]:
    return (triton.cdiv(F, BLOCKS["BLOCK_F"]), triton.cdiv(N, BLOCKS["BLOCK_N"]), L)


def jumprelu_fwd(pre, theta, write_a=True, write_h=False, out=None):
    """``(a, H)`` (``None`` where not asked) of contiguous ``pre [L, N, F]``, fp32 ``theta [L, F]``.
    """
    L, N, F = pre.shape
    a, h = out if out is not None else (
        torch.empty_like(pre) if write_a else None, torch.empty_like(pre) if write_h else None
    )
    _jumprelu_fwd_kernel[_grid(L, N, F)](
        pre_ptr=pre, theta_ptr=theta, a_ptr=a if write_a else pre, h_ptr=h if write_h else pre,
        N=N, F=F, WRITE_A=write_a, WRITE_H=write_h, **BLOCKS,
    )
    return a, h


def jumprelu_bwd(grad, pre, theta, eps, step=False, need_pre=True, out=None):
    """``(grad_pre or None, grad_log_theta fp32 [L, F])`` of ``a`` (or of ``H`` with ``step``)."""
    L, N, F = pre.shape
    grad = grad.contiguous()
    grid = _grid(L, N, F)
    grad_pre = (out if out is not None else torch.empty_like(pre)) if need_pre else None
    part = torch.empty(L, grid[1], F, device=pre.device, dtype=torch.float32)
    half_eps = float(torch.tensor(eps / 2, dtype=torch.float32))
    _jumprelu_bwd_kernel[grid](
        g_ptr=grad, pre_ptr=pre, theta_ptr=theta, gpre_ptr=grad_pre if need_pre else pre,
        part_ptr=part, N=N, F=F, half_eps=half_eps, WRITE_GPRE=need_pre, **BLOCKS,
    )
    # d/dlog_theta = theta * d/dtheta; d/dtheta = -(theta / eps) * rect (a) or -(1 / eps) (H)
    coef = theta / eps if not step else torch.ones_like(theta) / eps
    return grad_pre, -(coef * part.sum(dim=1)) * theta


# ------------------------------------------------------------------------------------------------
# autograd (Triton, or the CPU torch branch), the torch specification and the public ops
# ------------------------------------------------------------------------------------------------


def theta_of(log_theta: torch.Tensor) -> torch.Tensor:
    """``[L, 1, F]`` thresholds in at least float32 (bf16 thresholds would round away steps)."""
    return log_theta.to(torch.promote_types(log_theta.dtype, torch.float32)).exp().unsqueeze(1)


def _rect(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


class JumpReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, log_theta, eps, step):
        theta = theta_of(log_theta)
        ctx.eps, ctx.theta_dtype, ctx.step = eps, log_theta.dtype, step
        ctx.triton = triton_ok("jumprelu", pre, log_theta)
        if ctx.triton:
            pre = pre.contiguous()
            a, h = jumprelu_fwd(pre, theta.squeeze(1).contiguous(), write_a=not step,
                                write_h=step)
            out = h if step else a
        else:
            out = (pre > theta).to(pre.dtype) if step else pre * (pre > theta)
        ctx.save_for_backward(pre, theta)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pre, theta = ctx.saved_tensors
        need_pre = ctx.needs_input_grad[0] and not ctx.step
        if ctx.triton:
            grad_pre, g_lt = jumprelu_bwd(grad_out, pre, theta.squeeze(1).contiguous(), ctx.eps,
                                          step=ctx.step, need_pre=need_pre)
            g_lt = g_lt.to(ctx.theta_dtype) if ctx.needs_input_grad[1] else None
            return grad_pre, g_lt, None, None
        grad_pre = grad_out * (pre > theta) if need_pre else None
        grad_log_theta = None
        if ctx.needs_input_grad[1]:
            # chain rule through theta = exp(log_theta): d/dlog_theta = theta * d/dtheta
            coef = (1.0 / ctx.eps) if ctx.step else (theta / ctx.eps)
            dtheta = -coef * _rect(pre, theta, ctx.eps) * grad_out
            grad_log_theta = (dtheta.sum(dim=1) * theta.squeeze(1)).to(ctx.theta_dtype)
        return grad_pre, grad_log_theta, None, None


def jumprelu_torch(pre: torch.Tensor, log_theta: torch.Tensor, eps: float,
                   step: bool = False) -> torch.Tensor:
    """Specification of :func:`jumprelu` (``step``: of :func:`jumprelu_step`), plain autograd in
    fp32: ``a = pre * H(pre - theta)`` (or ``H``) plus a term that is 0 in value and whose
    gradient is the STE's ``d/dtheta = -(theta / eps) * rect`` (``-(1 / eps) * rect`` for ``H``);
    autograd chains it through ``theta = exp(log_theta)``."""
    theta = theta_of(log_theta)  # [L, 1, F]
    p = pre.to(torch.promote_types(pre.dtype, torch.float32))
    on = (p > theta).to(p.dtype)
    rect = ((p - theta).abs() < eps / 2).to(p.dtype)
    coef = 1.0 / eps if step else theta.detach() / eps
    ste = -coef * rect * (theta - theta.detach())  # value 0
    return ((on if step else p * on) + ste).to(pre.dtype)


def _check(pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> None:
    if pre.dim() != 3 or log_theta.shape != (pre.shape[0], pre.shape[2]):
        raise ValueError(
            f"JumpReLU: pre must be [L, N, F] and log_theta [L, F], got {tuple(pre.shape)} and "
            f"{tuple(log_theta.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"JumpReLU bandwidth must be > 0, got {eps}")


def jumprelu(pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``pre * H(pre - exp(log_theta))`` with the rectangle STE.

    ``pre [L, N, F]``, ``log_theta [L, F]``; returns ``a`` in ``pre``'s dtype.
    """
    _check(pre, log_theta, eps)
    if pick_path("jumprelu", pre, log_theta) == "torch":
        return jumprelu_torch(pre, log_theta, eps)
    return JumpReLUFunction.apply(pre, log_theta, eps, False)


def jumprelu_step(pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``H(pre - exp(log_theta))`` with the STE threshold gradient (for an L0 penalty)."""
    _check(pre, log_theta, eps)
    if pick_path("jumprelu", pre, log_theta) == "torch":
        return jumprelu_torch(pre, log_theta, eps, step=True)
    return JumpReLUFunction.apply(pre, log_theta, eps, True)


def jumprelu_codes(
    pre: torch.Tensor, log_theta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU as sparse codes, exact in every gradient.

    The codes hold every entry with ``pre > theta - eps/2``: the active ones and the zero-valued
    ones inside the rectangle window below ``theta``. The latter carry the decode's gradient
    ``dL/da`` that the threshold's STE needs; dropping them (as a plain sparse decode would)
    silently halves the threshold gradient.
    """
    _check(pre, log_theta, eps)
    if pick_path("jumprelu", pre, log_theta) == "cpu":
        return cpu_jumprelu.JumpReLUCodesFunction.apply(pre, log_theta, eps)
    a = jumprelu(pre, log_theta, eps)
    return mask_to_codes(a, window_of(pre.detach(), theta_of(log_theta.detach()), eps))


def window_of(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``[L, N, F]`` bool: the entries the codes hold, ``pre - theta > -eps/2`` (the same
    arithmetic as ``_rect``: ``pre > theta - eps/2`` rounds differently and can drop an entry the
    rectangle holds, e.g. float32 pre == fl(theta - eps/2) with that rounding up). One layer at a
    time: the float difference is a cache-sized [N, F] slice, not a pre-sized temporary."""
    window = torch.empty(pre.shape, dtype=torch.bool, device=pre.device)
    for layer in range(pre.shape[0]):
        torch.gt(pre[layer] - theta[layer], -eps / 2, out=window[layer])
    return window


# ------------------------------------------------------------------------------------------------
# compile check (``kernels.compile_check.all_jobs``)
# ------------------------------------------------------------------------------------------------


def compile_jobs(arch: int) -> list[CompileJob]:
    """Both kernels at the GPU tiles, bf16 ``pre``; no stack, no spills."""
    blocks = {k: v for k, v in BLOCKS.items() if k != "num_warps"}
    warps = BLOCKS["num_warps"]
    return [
        CompileJob(_jumprelu_fwd_kernel,
                   {"pre_ptr": "*bf16", "theta_ptr": "*fp32", "a_ptr": "*bf16", "h_ptr": "*bf16",
                    "N": "i32", "F": "i32"}, {"WRITE_A": True, "WRITE_H": True, **blocks},
                   arch, warps),
        CompileJob(_jumprelu_bwd_kernel,
                   {"g_ptr": "*bf16", "pre_ptr": "*bf16", "theta_ptr": "*fp32",
                    "gpre_ptr": "*bf16", "part_ptr": "*fp32", "N": "i32", "F": "i32",
                    "half_eps": "fp32"}, {"WRITE_GPRE": True, **blocks}, arch, warps),
    ]
