"""Triton encode-side kernels (fused encode + TopK, sparse encoder backward, JumpReLU, exact
BatchTopK) against float64 references, through the interpreter at tiny shapes.

The public ops dispatch here under ``TRITON_INTERPRET=1`` (see ``tests/conftest.py``); float64
inputs are routed to the torch path by design (checked below), so the references are float64 and
the kernels run in fp32 / bf16. Every launcher is also called with NaN-poisoned ``out=`` buffers.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from _testing import assert_close

from kernels import batchtopk_mask, encode_topk, exact_topk_mask, jumprelu, jumprelu_step
from kernels.compile_check import CompileJob, compile_for_gpu

# the package re-exports functions named like their modules: fetch the modules themselves
tk, jr, btk = (importlib.import_module(f"kernels.{m}") for m in ("topk", "jumprelu", "batchtopk"))

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not tk.interpreter_on(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


class Spy:
    """Count calls of a launcher while forwarding to it."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls = 0
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)


# ----------------------------------------------------------------------------------------------
# fused encode + TopK and the sparse encoder backward
# ----------------------------------------------------------------------------------------------


def make_encoder(L, N, d_in, F, dtype):
    x = torch.randn(L, N, d_in).to(dtype)
    W = (torch.randn(L, d_in, F) / math.sqrt(d_in)).to(dtype)
    b = torch.randn(L, F).to(dtype)
    return x, W, b


def ref_pre(x, W, b) -> torch.Tensor:
    return torch.einsum("lnd,ldf->lnf", x.to(F64), W.to(F64)) + b.to(F64).unsqueeze(1)


def assert_separated(score: torch.Tensor, k: int, gap: float) -> None:
    if k < score.shape[-1]:
        top = torch.topk(score, k + 1, dim=-1).values
        assert (top[..., k - 1] - top[..., k]).min() > gap, "test input has a near tie at the cut"


ENCODE_SHAPES = [
    pytest.param(*s, id="L{}-N{}-din{}-F{}-k{}".format(*s))
    for s in [
        (2, 7, 5, 33, 5),  # nothing a multiple of a block, k not a power of two
        (2, 9, 6, 12, 1),  # k = 1
        (1, 5, 4, 8, 8),  # k = F
        (1, 6, 3, 20, 20),  # k = F, not a power of two (KP = 32 > F)
        (1, 20, 40, 70, 3),  # several row, column and d_in tiles
    ]
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ranked", [False, True], ids=["plain", "rank_scale"])
@pytest.mark.parametrize("L, N, d_in, F, k", ENCODE_SHAPES)
def test_encode_topk_triton(monkeypatch, L, N, d_in, F, k, ranked, dtype):
    fwd, bwd = Spy(monkeypatch, tk, "encode_topk_fwd"), Spy(monkeypatch, tk, "encode_topk_bwd")
    x, W, b = make_encoder(L, N, d_in, F, dtype)
    scale = (torch.rand(L, F) + 0.1).to(dtype) if ranked else None
    if ranked:
        scale[:, ::3] = 0.01
    ins = [leaf(x), leaf(W), leaf(b)]
    values, indices = encode_topk(*ins, k, rank_scale=scale)
    assert fwd.calls == 1, "the Triton forward did not run"
    assert values.shape == indices.shape == (L, N, k)
    assert values.dtype == dtype and indices.dtype == torch.int64

    refs = [leaf(t, F64) for t in ins]
    pre = ref_pre(*refs)
    score = pre if scale is None else pre * scale.to(F64).unsqueeze(1)
    assert_separated(score.detach(), k, gap=1e-4)
    want_idx = torch.topk(score.detach(), k, dim=-1).indices
    assert torch.equal(indices, want_idx), "selected features (or their order) differ"
    assert_close(values, pre.detach().gather(-1, indices), name="values")

    upstream = torch.randn(L, N, k, dtype=F64)
    got = torch.autograd.grad(values, ins, upstream.to(dtype))
    assert bwd.calls == 1, "the Triton backward did not run"
    want = torch.autograd.grad(pre.gather(-1, want_idx), refs, upstream)
    # bf16 gradients are rounded once from an fp32 sum: relative to the largest entry
    for name, g, w in zip(["x", "W_enc", "b_enc"], got, want, strict=True):
        assert g.dtype == dtype
        atol = 2e-2 * float(w.abs().max()) if dtype == BF16 else None
        assert_close(g, w, atol=atol, name=f"grad {name}")


def test_encode_topk_ties_go_to_lower_index():
    # W = 0: every row's pre is the bias, whose values repeat across features and tiles
    L, N, d_in, F, k = 2, 5, 4, 40, 6
    x = torch.randn(L, N, d_in)
    W = torch.zeros(L, d_in, F)
    b = torch.tensor([float(f % 3) for f in range(F)]).expand(L, F).contiguous()
    b[1, ::5] = -0.0  # -0.0 ties with +0.0
    values, indices = encode_topk(x, W, b, k)
    for layer in range(L):
        order = torch.sort(-b[layer], stable=True).indices[:k]  # stable: lower index first
        assert torch.equal(indices[layer], order.expand(N, k)), layer
    assert torch.equal(values, b.gather(1, indices.view(L, -1)).view(L, N, k))


def test_encode_topk_large_k_not_power_of_two():
    L, N, d_in, F, k = 1, 4, 8, 64, 37  # KP = 64
    x, W, b = make_encoder(L, N, d_in, F, F32)
    values, indices = encode_topk(x, W, b, k)
    pre = ref_pre(x, W, b)
    assert_separated(pre, k, gap=1e-4)
    assert torch.equal(indices, torch.topk(pre, k, dim=-1).indices)


def test_encode_topk_launchers_overwrite_poisoned_outputs(poison):
    L, N, d_in, F, k = 2, 19, 7, 37, 3
    x, W, b = make_encoder(L, N, d_in, F, F32)
    scale = torch.rand(L, F) + 0.5
    for rs in [None, scale]:
        out = (poison((L, N, k)), poison((L, N, k), torch.int64))
        values, indices = tk.encode_topk_fwd(x, W, b, k, rs, out=out)
        assert values is out[0] and not values.isnan().any() and (indices >= 0).all()
    g = torch.randn(L, N, k)
    # a feature nobody selected must still get its (zero) gradient written
    assert indices.unique().numel() < F
    out = (poison((L, N, d_in)), poison((L, d_in, F)), poison((L, F)))
    gx, gw, gb = tk.encode_topk_bwd(g, x, W, indices, True, True, True, out=out)
    assert all(a is o for a, o in zip((gx, gw, gb), out, strict=True))
    for t in (gx, gw, gb):
        assert not t.isnan().any()
    want = tk._encode_topk_bwd(g, x, W, indices, True, True, True)
    for name, got_t, want_t in zip(["x", "W", "b"], (gx, gw, gb), want, strict=True):
        assert_close(got_t, want_t, name=f"grad {name}")


def make_awkward(L, N, d_in, F, dtype, gen):
    """Inputs whose rows stress the selection: layer 0 has ``b_enc`` constant, so its tokens with
    ``x = 0`` (every third) tie across all ``F`` features; layer 1 has ``b_enc <= -20``, so every
    pre-activation is negative (and its ``x = 0`` tokens tie again, at a negative value)."""
    x = torch.randn(L, N, d_in, generator=gen)
    x[:, ::3] = 0.0
    W = torch.randn(L, d_in, F, generator=gen) / math.sqrt(d_in)
    b = torch.full((L, F), 0.5)
    b[1] = -20.0 - torch.rand(F, generator=gen)
    b[1, : F - 2] = -21.0  # negative ties at the cut of the x = 0 rows once k > 2
    return x.to(dtype), W.to(dtype), b.to(dtype)


def ref_topk_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k indices of a float64 score, largest first, ties to the lower index."""
    return torch.sort(-score, dim=-1, stable=True).indices[..., :k]


AWKWARD_SHAPES = [
    pytest.param(*s, id="N{}-din{}-F{}-k{}".format(*s))
    for s in [
        (7, 5, 23, 1),  # k = 1
        (7, 5, 23, 23),  # k = F, F not a power of two (KP = 32)
        (9, 11, 37, 6),  # F over several 16-wide tiles, d_in over one
        (6, 19, 13, 13),  # k = F < BLOCK_F, d_in over two tiles
    ]
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N, d_in, F, k", AWKWARD_SHAPES)
def test_encode_topk_awkward_rows(monkeypatch, poison, N, d_in, F, k, dtype):
    """All-equal rows select the first k features, negative-only rows return their (negative)
    pre-activations; outputs and every gradient against float64, and relu on top gives zero
    values and zero gradients for the negative layer."""
    fwd, bwd = Spy(monkeypatch, tk, "encode_topk_fwd"), Spy(monkeypatch, tk, "encode_topk_bwd")
    L = 2
    gen = torch.Generator().manual_seed(N * 1000 + F * 10 + k)
    x, W, b = make_awkward(L, N, d_in, F, dtype, gen)
    ins = [leaf(x), leaf(W), leaf(b)]
    values, indices = encode_topk(*ins, k)
    assert (fwd.calls, values.dtype) == (1, dtype)

    refs = [leaf(t, F64) for t in ins]
    pre = ref_pre(*refs)
    tied = torch.zeros(L, N, dtype=torch.bool)
    tied[:, ::3] = True
    assert (pre.detach()[1] < 0).all(), "layer 1 must be negative-only"
    assert (pre.detach()[0, ::3] == 0.5).all() and (pre.detach()[1, ::3, : F - 2] == -21).all()
    assert_separated(pre.detach()[~tied], k, gap=1e-4)  # the other rows need a clear cut
    want_idx = ref_topk_stable(pre.detach(), k)
    assert torch.equal(indices[0, ::3], torch.arange(k).expand_as(indices[0, ::3])), "ties"
    assert torch.equal(indices, want_idx), "selected features (or their order) differ"
    want_values = pre.gather(-1, want_idx)
    assert_close(values, want_values, name="values")
    assert (values[1] < 0).all()

    upstream = torch.randn(L, N, k, dtype=F64, generator=gen)
    got = torch.autograd.grad(values, ins, upstream.to(dtype))
    want = torch.autograd.grad(want_values, refs, upstream)
    assert bwd.calls == 1
    for name, g, w in zip(["x", "W_enc", "b_enc"], got, want, strict=True):
        assert g.dtype == dtype
        atol = 2e-2 * float(w.abs().max()) if dtype == BF16 else None
        assert_close(g, w, atol=atol, name=f"grad {name}")
    # only the selected features of each layer get a W_enc / b_enc gradient
    chosen = torch.zeros(L, F, dtype=torch.bool).scatter_(1, indices.view(L, -1), True)
    assert (got[1].abs().sum(1)[~chosen] == 0).all() and (got[2][~chosen] == 0).all()

    # relu on top (what the model does): the negative layer is all zeros and passes no gradient
    values, _ = encode_topk(*ins, k)
    codes = torch.relu(values)
    assert (codes[1] == 0).all()
    got = torch.autograd.grad(codes, ins, upstream.to(dtype))
    want = torch.autograd.grad(torch.relu(ref_pre(*refs).gather(-1, want_idx)), refs, upstream)
    for name, g, w in zip(["x", "W_enc", "b_enc"], got, want, strict=True):
        atol = 2e-2 * float(w.abs().max()) if dtype == BF16 else None
        assert_close(g, w, atol=atol, name=f"grad {name} through relu")
    assert (got[0][1] == 0).all() and (got[1][1] == 0).all() and (got[2][1] == 0).all()

    if dtype == F32:
        # the launchers fill NaN-poisoned buffers on these rows too
        out = (poison((L, N, k)), poison((L, N, k), torch.int64))
        v, i = tk.encode_topk_fwd(x, W, b, k, out=out)
        assert v is out[0] and torch.equal(i, indices) and not v.isnan().any()
        out = (poison((L, N, d_in)), poison((L, d_in, F)), poison((L, F)))
        g = upstream.float()
        grads = tk.encode_topk_bwd(g, x, W, indices, True, True, True, out=out)
        want = tk._encode_topk_bwd(g.double(), x.double(), W.double(), indices, True, True, True)
        for name, gt, w, o in zip(["x", "W", "b"], grads, want, out, strict=True):
            assert gt is o and not gt.isnan().any()
            assert_close(gt, w, name=f"poisoned grad {name}")


def test_encode_topk_float64_takes_the_torch_path(monkeypatch):
    spy = Spy(monkeypatch, tk, "encode_topk_fwd")
    x, W, b = make_encoder(1, 3, 4, 8, F64)
    values, _ = encode_topk(x, W, b, 2)
    assert spy.calls == 0 and values.dtype == F64
    encode_topk(x.float(), W.float(), b.float(), 2)
    assert spy.calls == 1


def test_encode_topk_two_step_matches_fused():
    x, W, b = make_encoder(2, 9, 6, 21, F32)
    ins1, ins2 = [leaf(t) for t in (x, W, b)], [leaf(t) for t in (x, W, b)]
    v1, i1 = encode_topk(*ins1, 4, impl="fused")
    v2, i2 = encode_topk(*ins2, 4, impl="two_step")
    assert torch.equal(i1, i2)
    g = torch.randn_like(v1)
    for a, c in zip(torch.autograd.grad(v1, ins1, g), torch.autograd.grad(v2, ins2, g),
                    strict=True):
        assert_close(a, c)
    with pytest.raises(ValueError, match="impl"):
        encode_topk(x, W, b, 2, impl="dense")


# ----------------------------------------------------------------------------------------------
# JumpReLU
# ----------------------------------------------------------------------------------------------

EPS = 0.1


def make_jump(L, N, F, pre_dtype):
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
    pre0, lt0 = make_jump(L, N, F, pre_dtype)
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
    pre, lt = make_jump(L, N, F, F32)
    theta = lt.exp().contiguous()
    a, h = jr.jumprelu_fwd(pre, theta, True, True, out=(poison((L, N, F)), poison((L, N, F))))
    assert not a.isnan().any() and not h.isnan().any()
    g = torch.randn(L, N, F)
    g_pre, g_lt = jr.jumprelu_bwd(g, pre, theta, EPS, out=poison((L, N, F)))
    assert not g_pre.isnan().any() and not g_lt.isnan().any()


def test_jumprelu_float64_takes_the_torch_path(monkeypatch):
    spy = Spy(monkeypatch, jr, "jumprelu_fwd")
    pre, lt = make_jump(1, 3, 4, F64)
    jumprelu(pre, lt, EPS)
    jumprelu(pre.float(), lt.double(), EPS)
    assert spy.calls == 0
    jumprelu(pre.float(), lt, EPS)
    assert spy.calls == 1


# ----------------------------------------------------------------------------------------------
# exact BatchTopK selection
# ----------------------------------------------------------------------------------------------


def ref_select(x: torch.Tensor, m: int) -> torch.Tensor:
    """Dense stable sort: the m largest, ties to the lower index."""
    order = torch.sort(-x.to(F64), stable=True).indices[:m]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


def make_values(kind: str, shape) -> torch.Tensor:
    if kind == "ties":  # few distinct values, ties straddle block boundaries
        return torch.randint(-3, 4, shape).float()
    if kind == "zeros":  # +0.0 and -0.0 must tie
        return torch.randint(-1, 2, shape).float() * torch.where(torch.rand(shape) < 0.5, 0.0, 1.0)
    if kind == "neg0":
        x = torch.randint(-1, 2, shape).float()
        return torch.where(x == 0, torch.where(torch.rand(shape) < 0.5, -0.0, 0.0), x)
    if kind == "wide":  # magnitudes over many exponents: every radix pass matters
        return torch.randn(shape) * torch.exp(torch.randn(shape) * 8)
    return torch.randn(shape)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["randn", "ties", "neg0", "wide"])
@pytest.mark.parametrize(
    "M, m", [pytest.param(*s, id="M{}-m{}".format(*s)) for s in [(700, 1), (700, 77), (513, 513)]]
)
def test_exact_topk_mask_triton(monkeypatch, M, m, kind, dtype):
    spy = Spy(monkeypatch, btk, "select_mask")
    x = make_values(kind, (M,)).to(dtype)
    got = exact_topk_mask(x, m)
    assert spy.calls == 1
    assert torch.equal(got, ref_select(x, m))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_batchtopk_mask_triton(monkeypatch, scope, kind):
    spy = Spy(monkeypatch, btk, "select_mask")
    L, N, F, k = 3, 9, 37, 3
    pre = make_values(kind, (L, N, F))
    got = batchtopk_mask(pre, k, scope)
    assert spy.calls == 1
    if scope == "layer":
        want = torch.stack([ref_select(pre[layer].flatten(), N * k) for layer in range(L)])
    else:
        want = ref_select(pre.flatten(), L * N * k)
    assert torch.equal(got, want.view(L, N, F))


def test_select_mask_overwrites_poisoned_output(poison):
    x = torch.randn(2, 300)
    mask = btk.select_mask(x, 17, out=poison((2, 300), torch.int8))
    assert set(mask.view(torch.int8).unique().tolist()) <= {0, 1}
    assert torch.equal(mask, torch.stack([ref_select(r, 17) for r in x]))


def test_batchtopk_float64_takes_the_torch_path(monkeypatch):
    spy = Spy(monkeypatch, btk, "select_mask")
    batchtopk_mask(torch.randn(2, 3, 4, dtype=F64), 1, "layer")
    assert spy.calls == 0


# 1000 random cases against the dense stable sort: sizes, cut positions, value distributions and
# scopes drawn from a per-case seed (the failure message names it, ``random_case(seed)``
# rebuilds it). Chunked so one chunk of 250 fails on its own.

SELECT_KINDS = ("normal", "ties", "equal", "negative", "zeros", "wide", "bf16grid", "mixture")
N_SELECT_CASES, SELECT_CHUNK = 1000, 250


def random_values(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` fp32 values (no NaN) of one distribution."""

    def rand_int(lo, hi, size=()):
        return torch.randint(lo, hi, size if size else (1,), generator=gen)

    if kind == "normal":
        return torch.randn(n, generator=gen) * float(torch.rand(1, generator=gen) * 4 + 0.01)
    if kind == "ties":  # a small integer range: long runs of ties, across blocks too
        r = int(rand_int(1, 5))
        return rand_int(-r, r + 1, (n,)).float()
    if kind == "equal":  # one value everywhere, possibly -0.0 or negative
        v = [0.0, -0.0, 1.0, -1.0, -3.5, 2.0**-20, -(2.0**30)][int(rand_int(0, 7))]
        return torch.full((n,), v)
    if kind == "negative":  # every value < 0 (the top is the least negative)
        return -torch.rand(n, generator=gen) * 10.0 ** float(rand_int(-3, 4)) - 2.0**-10
    if kind == "zeros":  # +0.0 / -0.0 mixed with a few +-1: signed zeros must tie
        x = rand_int(-1, 2, (n,)).float()
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        return torch.where(x == 0, 0.0 * sign, x)
    if kind == "wide":  # exponents from ~2**-60 to ~2**60: every radix pass matters
        e = (torch.randn(n, generator=gen) * 20).clamp(-60, 60)
        return torch.randn(n, generator=gen) * torch.exp2(e)
    if kind == "bf16grid":  # bf16-representable: the low 16 key bits are all zero
        return (torch.randn(n, generator=gen) * 3).to(BF16).float()
    # mixture: each entry drawn from one of the other kinds
    parts = torch.stack([random_values(k, n, gen) for k in SELECT_KINDS[:-1]])
    pick = torch.randint(0, parts.shape[0], (n,), generator=gen)
    return parts.gather(0, pick[None])[0]


def random_case(seed: int) -> dict:
    """One selection problem: a flat ``exact_topk_mask`` or a small ``[L, N, F]`` BatchTopK."""
    gen = torch.Generator().manual_seed(seed)

    def rint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    kind = SELECT_KINDS[rint(0, len(SELECT_KINDS) - 1)]
    dtype = [F32, F32, BF16, torch.float16][rint(0, 3)]
    if rint(0, 9) < 6:
        # sizes around the interpreter's 256-wide block more often than elsewhere
        M = rint(1, 300) if rint(0, 2) else rint(240, 300)
        m = [1, M, rint(1, M), rint(1, M)][rint(0, 3)]
        shape, scope = (M,), None
    else:
        L, N, F = rint(1, 3), rint(1, 12), rint(1, 25)
        k, scope = rint(1, F), ("layer", "global")[rint(0, 1)]
        shape, m = (L, N, F), k
    x = random_values(kind, math.prod(shape), gen)
    if dtype == torch.float16:  # keep the values finite after the cast
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype).view(shape)
    return dict(seed=seed, kind=kind, dtype=dtype, x=x, m=m, scope=scope)


def ref_case_mask(case: dict) -> torch.Tensor:
    x, m, scope = case["x"], case["m"], case["scope"]
    if scope is None:
        return ref_select(x, m)
    L, N, F = x.shape
    if scope == "layer":
        return torch.stack([ref_select(x[layer].flatten(), N * m) for layer in range(L)]).view(
            L, N, F)
    return ref_select(x.flatten(), L * N * m).view(L, N, F)


@pytest.mark.parametrize("chunk", range(N_SELECT_CASES // SELECT_CHUNK))
def test_batchtopk_matches_dense_sort_on_random_cases(monkeypatch, chunk):
    spy = Spy(monkeypatch, btk, "select_mask")
    seen = set()
    for seed in range(chunk * SELECT_CHUNK, (chunk + 1) * SELECT_CHUNK):
        case = random_case(seed)
        x, m, scope = case["x"], case["m"], case["scope"]
        got = exact_topk_mask(x, m) if scope is None else batchtopk_mask(x, m, scope)
        want = ref_case_mask(case)
        if not torch.equal(got, want):
            diff = (got != want).nonzero().tolist()[:5]
            raise AssertionError(
                f"seed {seed}: {case['kind']} {case['dtype']} shape {tuple(x.shape)} m={m} "
                f"scope={scope}: selection differs from the dense sort at {diff}"
            )
        seen.add((case["kind"], scope))
    assert spy.calls == SELECT_CHUNK, "the Triton select did not run for every case"
    # every distribution and every scope came up in this chunk
    assert {kind for kind, _ in seen} == set(SELECT_KINDS)
    assert {scope for _, scope in seen} == {None, "layer", "global"}


# ----------------------------------------------------------------------------------------------
# every kernel compiles for sm_80 / sm_90 at the launchers' GPU tile sizes, without spills
# ----------------------------------------------------------------------------------------------


def _jobs() -> list[CompileJob]:
    i32 = "i32"
    fwd_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "scale_ptr": "*bf16",
               "val_ptr": "*fp32", "idx_ptr": "*i64", "N": i32, "D": i32, "F": i32, "k": i32}
    fwd32 = {**fwd_sig, **{p: "*fp32" for p in ["x_ptr", "w_ptr", "b_ptr", "scale_ptr"]}}

    def fwd_consts(kp, scale, precision):
        blocks = tk.fwd_blocks(kp, gpu=True, precision=precision)
        warps, _ = blocks.pop("num_warps"), blocks.pop("num_stages")
        consts = dict(HAS_SCALE=scale, KP=kp, PRECISION=precision, UPCAST=False, **blocks)
        return consts, warps

    specs = []
    for sig, kp, scale, prec in [(fwd_sig, 16, False, "tf32"), (fwd_sig, 16, True, "tf32"),
                                 (fwd32, 16, False, "ieee"), (fwd_sig, 64, False, "tf32")]:
        consts, warps = fwd_consts(kp, scale, prec)
        specs.append((tk._encode_topk_fwd_kernel, sig, consts, warps))
    specs += [
        (tk._gather_pre_kernel,
         {"x_ptr": "*bf16", "wt_ptr": "*bf16", "b_ptr": "*bf16", "idx_ptr": "*i64",
          "val_ptr": "*fp32", "N": i32, "D": i32, "F": i32, "k": i32}, tk.GATHER_BLOCKS, 4),
        (tk._encode_topk_bwd_dw_kernel,
         {"x_ptr": "*bf16", "g_ptr": "*bf16", "order_ptr": "*i64", "seg_ptr": "*i64",
          "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": i32, "D": i32, "F": i32, "k": i32},
         {"HAS_DB": True, **tk.DW_BLOCKS}, 4),
        (tk._encode_topk_bwd_dx_kernel,
         {"g_ptr": "*bf16", "idx_ptr": "*i64", "wt_ptr": "*bf16", "dx_ptr": "*fp32",
          "N": i32, "D": i32, "F": i32, "k": i32}, tk.DX_BLOCKS, 4),
    ]
    jblocks = {k: v for k, v in jr.BLOCKS.items() if k != "num_warps"}
    specs += [
        (jr._jumprelu_fwd_kernel,
         {"pre_ptr": "*bf16", "theta_ptr": "*fp32", "a_ptr": "*bf16", "h_ptr": "*bf16",
          "N": i32, "F": i32}, {"WRITE_A": True, "WRITE_H": True, **jblocks},
         jr.BLOCKS["num_warps"]),
        (jr._jumprelu_bwd_kernel,
         {"g_ptr": "*bf16", "pre_ptr": "*bf16", "theta_ptr": "*fp32", "gpre_ptr": "*bf16",
          "part_ptr": "*fp32", "N": i32, "F": i32, "half_eps": "fp32"},
         {"WRITE_GPRE": True, **jblocks}, jr.BLOCKS["num_warps"]),
    ]
    blk = {"BLOCK": btk.BLOCK_GPU}
    specs += [
        (btk._radix_hist_kernel, {"x_ptr": "*fp32", "prefix_ptr": "*i64", "hist_ptr": "*i32",
                                  "M": i32, "shift": i32, "hi_mask": "i64"}, blk, btk.NUM_WARPS),
        (btk._tie_count_kernel, {"x_ptr": "*fp32", "cut_ptr": "*i64", "count_ptr": "*i32",
                                 "M": i32}, blk, btk.NUM_WARPS),
        (btk._select_kernel, {"x_ptr": "*fp32", "cut_ptr": "*i64", "need_ptr": "*i64",
                              "base_ptr": "*i64", "mask_ptr": "*i8", "M": i32}, blk, btk.NUM_WARPS),
    ]
    return [CompileJob(fn, sig, dict(consts), arch=arch, num_warps=warps)
            for fn, sig, consts, warps in specs for arch in (80, 90)]


def test_kernels_compile_for_sm80_sm90_without_spills():
    jobs = _jobs()
    usages = compile_for_gpu(jobs)
    report = "\n".join(f"{u.name}: {u.registers} regs, stack {u.stack_bytes}, spill "
                       f"{u.spill_bytes}" for u in usages)
    print(report)
    for job, usage in zip(jobs, usages, strict=True):
        assert 0 < usage.registers <= 255 and usage.spill_bytes == 0, report
        # a stack frame is a near-spill: none anywhere except the CUDA-core (ieee) fp32 GEMM,
        # which keeps at most a small one (see kernels.topk.fwd_blocks)
        limit = 32 if job.constexprs.get("PRECISION") == "ieee" else 0
        assert usage.stack_bytes <= limit, report
