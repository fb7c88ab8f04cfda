"""JumpReLU and its STE (``jumprelu``, ``jumprelu_step``, ``jumprelu_codes``) on every path against
float64 formulas and finite differences of smoothed objectives.
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from _testing import (
    BF16,
    F32,
    F64,
    Spy,
    assert_close,
    grads,
    leaf,
    make_decoder,
    ref_decode_dense,
)

from kernels import (
    DecoderLayout,
    jumprelu,
    jumprelu_codes,
    jumprelu_step,
    mask_to_codes,
    sparse_decode,
)

# the package re-exports functions named like their modules: fetch the modules themselves
jr = importlib.import_module("kernels.jumprelu")


def rect(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


def smoothed_jump(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Smooth-in-theta stand-in for ``pre * H(pre - theta)``; its theta-derivative is the STE.

    ``a_s(theta) = integral_theta^inf (t / eps) * rect((pre - t) / eps) dt``: with
    ``lo, hi = pre -+ eps/2`` that is ``pre - (clamp(theta, lo, hi)^2 - lo^2) / (2 eps)``, which
    is ``pre`` for ``theta <= lo`` (the whole window integrates to ``pre``), 0 for
    ``theta >= hi``, and has ``d a_s / d theta = -(theta / eps) * rect((pre - theta) / eps)``,
    exactly the JumpReLU threshold STE. So a finite difference of ``sum w * a_s`` is the STE
    gradient with upstream ``w``, and autograd through it is an independent STE reference.
    """
    lo, hi = pre - eps / 2, pre + eps / 2
    return pre - (torch.clamp(theta.expand_as(pre), lo, hi) ** 2 - lo**2) / (2 * eps)


def smoothed_step(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``clamp((pre - theta) / eps + 1/2, 0, 1)``: its theta-derivative is ``-(1/eps) rect``."""
    return torch.clamp((pre - theta) / eps + 0.5, 0.0, 1.0)


def ref_jumprelu(pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 JumpReLU with the STE in plain autograd: value and pre-gradient from
    ``pre * H(pre - theta)``, threshold gradient from :func:`smoothed_jump`."""
    theta = log_theta.to(F64).exp().unsqueeze(1)  # [L, 1, F]
    p = pre.detach().to(F64)
    a_s = smoothed_jump(p, theta, eps)
    return pre.to(F64) * (p > theta.detach()) + (a_s - a_s.detach())


EPS = 0.1


def make_jump(L: int, N: int, F: int, pre_dtype, theta_dtype, eps: float = EPS):
    """``log_theta`` and ``pre`` spread around the thresholds, including inside the rectangle
    window on both sides of theta, but never within ``0.02 * eps`` of ``theta`` or of a window
    edge, so float32 thresholds and float64 references agree on every comparison."""
    log_theta = torch.empty(L, F, dtype=theta_dtype).uniform_(-1.0, 0.0)
    theta = log_theta.to(F64).exp().unsqueeze(1)
    u = torch.empty(L, N, F, dtype=F64).uniform_(-3.0, 3.0)
    near = ((u.unsqueeze(-1) - torch.tensor([-0.5, 0.0, 0.5], dtype=F64)).abs() < 0.02).any(-1)
    u = torch.where(near, u + 0.05, u)
    pre = (theta + eps * u).to(pre_dtype)
    below = (pre.to(F64) < theta) & (pre.to(F64) > theta - eps / 2)
    assert below.any(), "need entries in (theta - eps/2, theta)"
    return pre, log_theta


JUMP_DTYPES = pytest.mark.parametrize(
    "pre_dtype, theta_dtype",
    [(F64, F64), (F64, F32), (F32, F32)],
    ids=["pre64-theta64", "pre64-theta32", "pre32-theta32"],
)


@JUMP_DTYPES
def test_jumprelu_forward_and_grads(pre_dtype, theta_dtype):
    L, N, F = 3, 8, 16
    pre0, log_theta0 = make_jump(L, N, F, pre_dtype, theta_dtype)
    pre, log_theta = leaf(pre0), leaf(log_theta0)
    a = jumprelu(pre, log_theta, EPS)
    upstream = torch.randn(L, N, F, dtype=F64)
    g_pre, g_lt = grads(a, [pre, log_theta], upstream.to(pre_dtype))

    p, theta = pre0.to(F64), log_theta0.to(F64).exp().unsqueeze(1)
    step = (p > theta).to(F64)
    assert a.dtype == pre_dtype and g_lt.dtype == theta_dtype
    assert torch.equal(a.to(F64), p * step)
    assert_close(g_pre, upstream * step, name="grad pre")
    want = (upstream * (-(theta / EPS) * rect((p - theta) / EPS))).sum(1) * theta.squeeze(1)
    assert_close(g_lt, want, name="grad log_theta")
    # independent second reference: autograd through the smoothed objective
    ref_pre_leaf, ref_lt = leaf(pre0, F64), leaf(log_theta0, F64)
    ref_a = ref_jumprelu(ref_pre_leaf, ref_lt, EPS)
    want_pre, want_lt = grads(ref_a, [ref_pre_leaf, ref_lt], upstream)
    assert_close(g_pre, want_pre, name="grad pre (smoothed ref)")
    assert_close(g_lt, want_lt, name="grad log_theta (smoothed ref)")


def _fd_log_theta(objective, log_theta: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central finite difference of a scalar objective w.r.t. every log_theta entry."""
    out = torch.zeros_like(log_theta)
    for i in range(log_theta.numel()):
        e = torch.zeros_like(log_theta).view(-1)
        e[i] = h
        e = e.view_as(log_theta)
        out.view(-1)[i] = (objective(log_theta + e) - objective(log_theta - e)) / (2 * h)
    return out


def test_jumprelu_threshold_grad_is_fd_of_smoothed_objective():
    # The STE is the exact theta-derivative of smoothed_jump (see its docstring), so with
    # upstream weights w the STE gradient must equal the finite difference of
    # sum w * smoothed_jump(pre, exp(log_theta)): piecewise quadratic in theta, inputs kept
    # 0.02 * eps away from the kinks, so the central difference is exact up to rounding.
    L, N, F = 2, 16, 6
    pre, log_theta = make_jump(L, N, F, F64, F64)
    w = torch.randn(L, N, F, dtype=F64)

    def objective(lt):
        return (w * smoothed_jump(pre, lt.exp().unsqueeze(1), EPS)).sum()

    fd = _fd_log_theta(objective, log_theta)
    lt = leaf(log_theta)
    (ste,) = grads(jumprelu(pre, lt, EPS), [lt], w)
    assert (fd != 0).sum() > F, "too few entries inside the window for a meaningful check"
    assert_close(ste, fd, atol=1e-7, rtol=1e-6, name="STE vs FD")


@JUMP_DTYPES
def test_jumprelu_step(pre_dtype, theta_dtype):
    L, N, F = 3, 8, 16
    pre0, log_theta0 = make_jump(L, N, F, pre_dtype, theta_dtype)
    pre, log_theta = leaf(pre0), leaf(log_theta0)
    h = jumprelu_step(pre, log_theta, EPS)
    upstream = torch.randn(L, N, F, dtype=F64)
    g_pre, g_lt = torch.autograd.grad(
        h, [pre, log_theta], upstream.to(pre_dtype), allow_unused=True
    )
    p, theta = pre0.to(F64), log_theta0.to(F64).exp().unsqueeze(1)
    assert h.dtype == pre_dtype and torch.equal(h.to(F64), (p > theta).to(F64))
    assert g_pre is None or not g_pre.any(), "the step must not send gradient to pre"
    want = (upstream * (-(1 / EPS) * rect((p - theta) / EPS))).sum(1) * theta.squeeze(1)
    assert_close(g_lt, want, name="grad log_theta")


def test_jumprelu_step_threshold_grad_is_fd_of_smoothed_step():
    # d/dtheta clamp((pre - theta)/eps + 1/2, 0, 1) = -(1/eps) rect((pre - theta)/eps): exactly
    # the L0 STE, so FD of the smoothed sum (piecewise linear in theta) must match it
    L, N, F = 2, 16, 6
    pre, log_theta = make_jump(L, N, F, F64, F64)
    w = torch.randn(L, N, F, dtype=F64)
    fd = _fd_log_theta(
        lambda lt: (w * smoothed_step(pre, lt.exp().unsqueeze(1), EPS)).sum(), log_theta
    )
    lt = leaf(log_theta)
    (ste,) = grads(jumprelu_step(pre, lt, EPS), [lt], w)
    assert (fd != 0).sum() > F
    assert_close(ste, fd, atol=1e-7, rtol=1e-6, name="STE vs FD")


def test_jumprelu_rejects_bad_arguments():
    pre, log_theta = torch.randn(2, 3, 4), torch.zeros(2, 4)
    for fn in [jumprelu, jumprelu_step, jumprelu_codes]:
        with pytest.raises(ValueError, match=re.escape("(2, 5)")):
            fn(pre, torch.zeros(2, 5), EPS)
        with pytest.raises(ValueError, match="bandwidth"):
            fn(pre, log_theta, 0.0)


@JUMP_DTYPES
@pytest.mark.parametrize(
    "L, N, F, R, d_out",
    [
        pytest.param(*s, id="L{}-N{}-F{}-R{}-d{}".format(*s))
        for s in [(3, 8, 16, 2, 7), (2, 5, 12, 2, 33)]
    ],
)
def test_jumprelu_codes_decode_matches_dense(L, N, F, R, d_out, pre_dtype, theta_dtype):
    layout = DecoderLayout(L, F, R)
    pre0, log_theta0 = make_jump(L, N, F, pre_dtype, theta_dtype)
    W_dec0, b_dec0 = make_decoder(layout, d_out, 8, pre_dtype)
    upstream = torch.randn(L, N, d_out, dtype=F64)

    ins = [leaf(pre0), leaf(log_theta0), leaf(W_dec0), leaf(b_dec0)]
    values, indices = jumprelu_codes(ins[0], ins[1], EPS)
    out = sparse_decode(values, indices, ins[2], ins[3], layout)
    got = grads(out, ins, upstream.to(pre_dtype))

    refs = [leaf(t, F64) for t in ins]
    expected = ref_decode_dense(ref_jumprelu(refs[0], refs[1], EPS), refs[2], refs[3], L, F, R)
    want = grads(expected, refs, upstream)

    assert_close(out, expected, name="out")
    for name, g, w in zip(["pre", "log_theta", "W_dec", "b_dec"], got, want, strict=True):
        assert_close(g, w, name=f"grad {name}")
    assert got[1].dtype == theta_dtype

    # the check bites: codes holding only the active entries lose the window below theta
    pre, lt = leaf(pre0), leaf(log_theta0)
    theta = lt.detach().to(F64).exp().unsqueeze(1)
    active_only = mask_to_codes(jumprelu(pre, lt, EPS), pre0.to(F64) > theta)
    out_active = sparse_decode(*active_only, W_dec0, b_dec0, layout)
    (g_lt,) = grads(out_active, [lt], upstream.to(pre_dtype))
    assert (g_lt.to(F64) - want[1]).abs().max() > 1e-2


@pytest.mark.parametrize("force_torch", [True, False], ids=["torch", "auto"])
def test_jumprelu_codes_fp32_sparse_torch_path(force_torch, monkeypatch):
    """float32 codes through the torch path's sparse backward (``CLT_FORCE_TORCH``) and through
    the default dispatch: value and gradients of pre and log_theta as the float64 reference."""
    if force_torch:
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    L, N, F = 3, 8, 16
    pre0, log_theta0 = make_jump(L, N, F, F32, F32)
    ins = [leaf(pre0), leaf(log_theta0)]
    values, indices = jumprelu_codes(ins[0], ins[1], EPS)
    up = torch.randn(values.shape, dtype=F64)
    got = grads(values, ins, up.to(F32))
    refs = [leaf(t, F64) for t in ins]
    theta = refs[1].detach().exp().unsqueeze(1)
    held = (pre0.to(F64) - theta > -EPS / 2).sum(-1, keepdim=True)  # window entries per row
    real = torch.arange(values.shape[-1]) < held  # padding slots pass no gradient
    expected = ref_jumprelu(refs[0], refs[1], EPS).gather(-1, indices.long()) * real
    want = grads(expected, refs, up)
    assert_close(values, expected.detach(), name="values")
    for name, g, w in zip(["pre", "log_theta"], got, want, strict=True):
        assert_close(g, w, name=f"grad {name}")


def test_jumprelu_codes_window_edge_matches_rect():
    # pre exactly at float32(theta - eps/2) where that rounds up: the STE rectangle
    # |pre - theta| < eps/2 holds (pre - theta is exact), so the codes must hold the entry
    # or its threshold gradient is silently lost
    eps = 0.3
    log_theta = torch.tensor([[math.log(0.9), 0.0]], dtype=F32)
    theta = log_theta.exp()
    pre = (theta - eps / 2).view(1, 1, 2)
    assert ((pre - theta.unsqueeze(1)).abs() < eps / 2).all(), "inputs no longer on the edge"
    lt_dense, lt_codes = leaf(log_theta), leaf(log_theta)
    (want,) = grads(jumprelu(pre, lt_dense, eps).sum(), [lt_dense], torch.tensor(1.0))
    values, _ = jumprelu_codes(pre, lt_codes, eps)
    (got,) = grads(values.sum(), [lt_codes], torch.tensor(1.0))
    assert want.ne(0).all()
    assert_close(got, want, name="grad log_theta at the window edge")


def make_jump_wide(L, N, F, pre_dtype):
    """Like :func:`make_jump` with margins wide enough for bf16 ``pre`` (fp32 thresholds)."""
    log_theta = torch.empty(L, F).uniform_(-1.0, 0.0)
    theta = log_theta.to(F64).exp().unsqueeze(1)
    u = torch.empty(L, N, F, dtype=F64).uniform_(-3.0, 3.0)
    near = ((u.unsqueeze(-1) - torch.tensor([-0.5, 0.0, 0.5], dtype=F64)).abs() < 0.05).any(-1)
    u = torch.where(near, u + 0.1, u)  # bf16 rounding (~4e-3 * theta) stays off every edge
    return (theta + EPS * u).to(pre_dtype), log_theta


def ref_jump_grads(pre, log_theta, g, step: bool):
    p, theta = pre.to(F64), log_theta.to(F64).exp().unsqueeze(1)
    rect = ((p - theta).abs() < EPS / 2).to(F64)
    coef = 1 / EPS if step else theta / EPS
    g_lt = (g * (-coef * rect)).sum(1) * theta.squeeze(1)
    return g * (p > theta), g_lt


@pytest.mark.parametrize("pre_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "L, N, F", [pytest.param(*s, id="L{}-N{}-F{}".format(*s)) for s in [(2, 7, 5), (3, 37, 130)]]
)
def test_jumprelu_triton(monkeypatch, L, N, F, pre_dtype):
    spy_f, spy_b = Spy(monkeypatch, jr, "jumprelu_fwd"), Spy(monkeypatch, jr, "jumprelu_bwd")
    pre0, lt0 = make_jump_wide(L, N, F, pre_dtype)
    pre, lt = leaf(pre0), leaf(lt0)
    a = jumprelu(pre, lt, EPS)
    g = torch.randn(L, N, F, dtype=F64)
    g_pre, g_lt = torch.autograd.grad(a, [pre, lt], g.to(pre_dtype))
    assert (spy_f.calls, spy_b.calls) == (1, 1), "the Triton path did not run"
    theta = lt0.to(F64).exp().unsqueeze(1)
    assert a.dtype == pre_dtype and torch.equal(a.to(F64), pre0.to(F64) * (pre0.to(F64) > theta))
    want_pre, want_lt = ref_jump_grads(pre0, lt0, g.to(pre_dtype).to(F64), step=False)
    assert torch.equal(g_pre.to(F64), want_pre)
    assert g_lt.dtype == F32
    assert_close(g_lt, want_lt, atol=1e-4, name="grad log_theta")

    pre, lt = leaf(pre0), leaf(lt0)
    h = jumprelu_step(pre, lt, EPS)
    assert torch.equal(h.to(F64), (pre0.to(F64) > theta).to(F64))
    g_pre, g_lt = torch.autograd.grad(h, [pre, lt], g.to(pre_dtype), allow_unused=True)
    assert g_pre is None
    _, want_lt = ref_jump_grads(pre0, lt0, g.to(pre_dtype).to(F64), step=True)
    assert_close(g_lt, want_lt, atol=1e-4, name="grad log_theta (step)")


def test_jumprelu_launchers_overwrite_poisoned_outputs(poison):
    L, N, F = 2, 33, 131
    pre, lt = make_jump_wide(L, N, F, F32)
    theta = lt.exp().contiguous()
    a, h = jr.jumprelu_fwd(pre, theta, True, True, out=(poison((L, N, F)), poison((L, N, F))))
    assert not a.isnan().any() and not h.isnan().any()
    g = torch.randn(L, N, F)
    g_pre, g_lt = jr.jumprelu_bwd(g, pre, theta, EPS, out=poison((L, N, F)))
    assert not g_pre.isnan().any() and not g_lt.isnan().any()


def test_jumprelu_float64_takes_the_torch_path(monkeypatch):
    spy = Spy(monkeypatch, jr, "jumprelu_fwd")
    pre, lt = make_jump_wide(1, 3, 4, F64)
    jumprelu(pre, lt, EPS)
    jumprelu(pre.float(), lt.double(), EPS)
    assert spy.calls == 0
    jumprelu(pre.float(), lt, EPS)
    assert spy.calls == 1




def test_jumprelu_specification(spec_path, monkeypatch):
    """``jumprelu_torch`` (the STE as a zero-valued term under plain autograd) passes the fp64
    tests of ``jumprelu``, ``jumprelu_step`` and ``jumprelu_codes``, without the CPU path's
    Function."""
    spy = Spy(monkeypatch, jr.JumpReLUFunction, "apply")
    for dtypes_ in [(F64, F64), (F64, F32)]:
        test_jumprelu_forward_and_grads(*dtypes_)
        test_jumprelu_step(*dtypes_)
        test_jumprelu_codes_decode_matches_dense(3, 8, 16, 2, 7, *dtypes_)
    assert spy.calls == 0
