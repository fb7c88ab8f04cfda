"""TopK encode (``encode_topk``, with AuxK's ``aux``): the torch specification, the CPU path and the
Triton kernels (interpreter) against float64 formulas; outputs, every gradient, the tie rule.
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
    assert_separated,
    decode_cpu,
    dtypes,
    grads,
    leaf,
    make_decoder,
    make_encoder,
    ref_pre,
    run_on_path,
)

from kernels import (
    DecoderLayout,
    buffers,
    encode_topk,
    sparse_decode,
)

# the package re-exports functions named like their modules: fetch the modules themselves
tk = importlib.import_module("kernels.topk")
decode_mod = importlib.import_module("kernels.decode")
cpu_topk = importlib.import_module("kernels.cpu.topk")
cpu_decode = importlib.import_module("kernels.cpu.decode")


ENCODE_SHAPES = [
    pytest.param(L, N, d_in, F, k, id=f"L{L}-N{N}-din{d_in}-F{F}-k{k}")
    for L, N, d_in, F, k in [
        (3, 7, 5, 16, 4),
        (2, 9, 6, 12, 1),  # k = 1
        (2, 5, 4, 8, 8),  # k = F
        (1, 3, 7, 33, 5),  # F not a power of two
    ]
]


# fp64 runs the CPU path (and, in test_encode_topk_specification, the specification); fp32 and
# bf16 through the kernels are test_encode_topk_triton's
@dtypes(F64)
@pytest.mark.parametrize("ranked", [False, True], ids=["plain", "rank_scale"])
@pytest.mark.parametrize("L, N, d_in, F, k", ENCODE_SHAPES)
def test_encode_topk(L, N, d_in, F, k, ranked, dtype):
    x, W_enc, b_enc = make_encoder(L, N, d_in, F, dtype)
    # a few features with a tiny scale so ranking by pre * scale really differs from pre
    scale = (torch.rand(L, F, dtype=dtype) + 0.1) if ranked else None
    if ranked:
        scale[:, ::3] = 0.01
        scale.requires_grad_(True)
    ins = [leaf(x), leaf(W_enc), leaf(b_enc)]
    values, indices = encode_topk(*ins, k, rank_scale=scale)
    assert values.shape == indices.shape == (L, N, k) and values.dtype == dtype

    refs = [leaf(t, F64) for t in ins]
    pre = ref_pre(*refs)  # [L, N, F]
    score = pre if scale is None else pre * scale.detach().to(F64).unsqueeze(1)
    assert_separated(score.detach(), k)
    ref_idx = torch.topk(score, k, dim=-1).indices.sort(-1).values
    order = indices.sort(-1)
    assert torch.equal(order.values, ref_idx), "selected feature sets differ"
    ranked_by = score.detach().gather(-1, indices)
    assert (ranked_by[..., :-1] >= ranked_by[..., 1:]).all(), "slots not in decreasing score"

    upstream = torch.randn(L, N, k, dtype=F64)
    got = grads(values, ins, upstream.to(dtype))
    # reference: dense pre, gathered at the reference's own (sorted) indices; the upstream
    # weights follow each slot's feature, so both sides weight the same entries the same way
    ref_values = pre.gather(-1, ref_idx)
    want = grads(ref_values, refs, upstream.gather(-1, order.indices))
    assert_close(values, pre.gather(-1, indices), name="values (pre, not pre * scale)")
    for name, g, w in zip(["x", "W_enc", "b_enc"], got, want, strict=True):
        assert_close(g, w, name=f"grad {name}")
    if scale is not None:
        (g_scale,) = torch.autograd.grad(values, [scale], upstream.to(dtype), allow_unused=True)
        assert g_scale is None, "rank_scale must not be differentiated"


@pytest.mark.parametrize("ratio", [0, 10**9], ids=["gather", "gemm"])
@dtypes(F64, F32)
@pytest.mark.parametrize("L, N, d_in, F, k", ENCODE_SHAPES)
def test_encode_topk_torch_backward_paths(L, N, d_in, F, k, dtype, ratio, monkeypatch):
    """The torch backward (fp32 included) with every layer forced to the embedding_bag gathers or
    to the dense GEMMs, against the float64 gradients of ``pre`` gathered at the op's slots."""
    monkeypatch.setattr(cpu_topk, "DENSE_RATIO", ratio)
    ins = [leaf(t) for t in make_encoder(L, N, d_in, F, dtype)]
    values, indices = encode_topk(*ins, k, impl="torch")
    upstream = torch.randn(L, N, k, dtype=F64)
    got = grads(values, ins, upstream.to(dtype))
    refs = [leaf(t, F64) for t in ins]
    want = grads(ref_pre(*refs).gather(-1, indices), refs, upstream)
    for name, g, w in zip(["x", "W_enc", "b_enc"], got, want, strict=True):
        assert_close(g, w, name=f"grad {name}")


@pytest.mark.parametrize("ratio", [0, 10**9], ids=["gather", "gemm"])
def test_torch_paths_under_cpu_autocast(ratio, monkeypatch):
    """A bf16 autocast step through both torch paths (encoder backward, decode forward and
    backward; gather and GEMM branches): fp32 parameters get fp32 gradients close to the fp32
    step's. Autocast makes the codes bf16 while W_enc and W_dec stay fp32."""
    monkeypatch.setattr(cpu_topk, "DENSE_RATIO", ratio)
    monkeypatch.setattr(cpu_decode, "DENSE_RATIO", ratio)
    L, N, d_in, F, k, R, d_out = 3, 16, 8, 24, 3, 3, 6
    layout = DecoderLayout(L, F, R)
    x, W_enc, b_enc = make_encoder(L, N, d_in, F, F32)
    W_dec, b_dec = make_decoder(layout, d_out, k, F32)
    upstream = torch.randn(L, N, d_out)
    results = []
    for amp in (False, True):
        params = [leaf(t) for t in (W_enc, b_enc, W_dec, b_dec)]
        with torch.autocast("cpu", dtype=BF16, enabled=amp):
            values, indices = encode_topk(x, params[0], params[1], k, impl="torch")
            out = decode_cpu(torch.relu(values), indices, params[2],
                                                 params[3], layout)
        results.append(grads(out.float(), params, upstream))
    for name, g, w in zip(["W_enc", "b_enc", "W_dec", "b_dec"], *reversed(results), strict=True):
        assert g.dtype == F32, name
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05, msg=lambda m, n=name: f"{n}: {m}")


def test_encode_topk_gradcheck():
    x, W_enc, b_enc = make_encoder(2, 4, 3, 6, F64)
    assert_separated(ref_pre(x, W_enc, b_enc), 2, gap=1e-3)
    assert torch.autograd.gradcheck(
        lambda *a: encode_topk(*a, 2)[0], (leaf(x), leaf(W_enc), leaf(b_enc))
    )


def test_encode_topk_rejects_bad_arguments():
    L, N, d_in, F = 2, 3, 4, 6
    x, W_enc, b_enc = make_encoder(L, N, d_in, F, F32)
    for k in [0, F + 1]:
        with pytest.raises(ValueError, match="k must be"):
            encode_topk(x, W_enc, b_enc, k)
    for args in [(x, W_enc[:, 1:], b_enc), (x, W_enc[:1], b_enc), (x, W_enc, b_enc[:, 1:])]:
        with pytest.raises(ValueError, match=re.escape(str(tuple(args[1].shape)))):
            encode_topk(*args, 2)
    for bad in [torch.ones(F), torch.ones(L, 1), torch.ones(L, F + 1)]:
        with pytest.raises(ValueError, match="rank_scale"):
            encode_topk(x, W_enc, b_enc, 2, rank_scale=bad)


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_topk_family_saves_nothing_dense_for_backward():
    # N > d_in and L * N * F larger than x, W_enc and the decoder table, so a saved tensor of
    # L * N * F elements or with an [N, F] face can only be a dense activation-sized buffer
    L, N, d_in, F, k, R, d_out = 2, 64, 8, 32, 4, 2, 6
    layout = DecoderLayout(L, F, R)
    x, W_enc, b_enc = (leaf(t) for t in make_encoder(L, N, d_in, F, F32))
    W_dec, b_dec = (leaf(t) for t in make_decoder(layout, d_out, k, F32))
    big = L * N * F
    assert max(x.numel(), W_enc.numel(), W_dec.numel()) < big and len({N, d_in, L, d_out}) == 4

    def dense_face(shape):
        return math.prod(shape) >= big or (len(shape) > 1 and shape[-1] == F and N in shape)

    def sparse_step():
        values, indices = encode_topk(x, W_enc, b_enc, k)
        sparse_decode(torch.relu(values), indices, W_dec, b_dec, layout).sum().backward()

    def dense_step():  # the recorder must catch what a dense-decoding trainer keeps
        pre = torch.baddbmm(b_enc.unsqueeze(1), x, W_enc)
        values, indices = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))  # [L, N, F]
        out = [acts[s] @ layout.source_view(W_dec, s).flatten(1) for s in range(L)]
        sum(o.sum() for o in out).backward()

    assert any(dense_face(s) for s in _saved_shapes(dense_step))
    saved = _saved_shapes(sparse_step)
    assert saved and not [s for s in saved if dense_face(s)], saved


TRITON_SHAPES = [
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
@pytest.mark.parametrize("L, N, d_in, F, k", TRITON_SHAPES)
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
    want = cpu_topk.encode_bwd(g, x, W, indices, True, True, True)
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
    got = torch.autograd.grad(values, ins, upstream.to(dtype), retain_graph=True)
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
        want = cpu_topk.encode_bwd(g.double(), x.double(), W.double(), indices, True, True, True)
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


def make_problem(L=3, N=9, d=6, F=20, dtype=F64):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(L, N, d, generator=gen)
    W = torch.randn(L, d, F, generator=gen)
    b = torch.randn(L, F, generator=gen)
    dead_counts = [4, 2, 0][:L]  # layer 2 has no dead feature: every column spare
    D = max(dead_counts)
    cols = torch.stack([torch.randperm(F, generator=gen)[:D] for _ in range(L)])
    spare = torch.arange(D) >= torch.tensor(dead_counts).unsqueeze(1)
    return [t.to(dtype) for t in (x, W, b)], cols, spare


def reference(x, W, b, k, cols, spare, k_aux):
    values, indices = encode_topk(x, W, b, k, impl="torch")
    Wc = W.gather(2, cols.unsqueeze(1).expand(-1, W.shape[1], -1))
    bc = b.gather(1, cols).masked_fill(spare, -math.inf)
    pre = torch.baddbmm(bc.unsqueeze(1), x, Wc)
    aux_values, pos = pre.topk(k_aux, dim=-1)
    ids = cols.gather(1, pos.flatten(1)).view_as(pos).masked_fill(aux_values == -math.inf, 0)
    return values, indices, aux_values, ids


def loss_of(values, aux_values, up, up_aux):
    return (values * up).sum() + (torch.relu(aux_values) * up_aux).sum()


@pytest.mark.parametrize("impl, dtype", [("torch", F64), ("fused", F32), ("two_step", F32)])
def test_matches_two_separate_ops(impl, dtype):
    (x, W, b), cols, spare = make_problem(dtype=dtype)
    k, k_aux = 3, 2
    ins = [t.clone().requires_grad_(True) for t in (x, W, b)]
    got = encode_topk(*ins, k, impl=impl, aux=(cols, spare, k_aux))
    refs = [t.double().clone().requires_grad_(True) for t in (x, W, b)]
    want = reference(*refs, k, cols, spare, k_aux)
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    assert_close(got[0], want[0], name="values")
    assert_close(got[2], want[2], name="aux values")  # -inf at layer 2 on both sides
    up = torch.randn(got[0].shape, dtype=F64)
    up_aux = torch.randn(got[2].shape, dtype=F64)
    g = torch.autograd.grad(loss_of(got[0], got[2], up.to(dtype), up_aux.to(dtype)), ins)
    w = torch.autograd.grad(loss_of(want[0], want[2], up, up_aux), refs)
    for name, a, e in zip(["x", "W_enc", "b_enc"], g, w, strict=True):
        assert_close(a, e, name=f"grad {name}")


def test_encoder_gradient_lands_in_a_donated_buffer():
    """One ``W_enc`` gradient for both selections: the NaN-filled donated buffer, overwritten."""
    (x, W, b), cols, spare = make_problem(dtype=F32)
    Wl = W.clone().requires_grad_(True)
    donated = torch.full_like(W, float("nan"))
    ptr = donated.data_ptr()
    buffers.clear()
    buffers.donate(donated)
    del donated  # the donor keeps no reference
    try:
        v, _, av, _ = encode_topk(x, Wl, b, 3, impl="torch", aux=(cols, spare, 2))
        loss_of(v, av, 1.0, 1.0).backward()
    finally:
        buffers.clear()
    assert Wl.grad.data_ptr() == ptr
    ref = W.double().clone().requires_grad_(True)
    rv, _, rav, _ = reference(x.double(), ref, b.double(), 3, cols, spare, 2)
    loss_of(rv, rav, 1.0, 1.0).backward()
    assert_close(Wl.grad, ref.grad, name="grad W_enc")


def test_rejects_bad_aux():
    (x, W, b), cols, spare = make_problem()
    with pytest.raises(ValueError, match="aux columns"):
        encode_topk(x, W, b, 3, aux=(cols[:2], spare[:2], 2))
    with pytest.raises(ValueError, match="aux columns"):
        encode_topk(x, W, b, 3, aux=(cols, spare.long(), 2))
    with pytest.raises(ValueError, match="k_aux"):
        encode_topk(x, W, b, 3, aux=(cols, spare, cols.shape[1] + 1))




# ----------------------------------------------------------------------------------------------
# the torch specification, and the one tie rule on every path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranked", [False, True], ids=["plain", "rank_scale"])
@pytest.mark.parametrize("L, N, d_in, F, k", ENCODE_SHAPES)
def test_encode_topk_specification(L, N, d_in, F, k, ranked, spec_path, monkeypatch):
    """``encode_topk_torch`` (what runs with ``kernels.cpu_fast_paths(False)``) passes the fp64
    test of the op, AuxK included, without touching the CPU path."""
    spy = Spy(monkeypatch, cpu_topk, "encode_fwd")
    test_encode_topk(L, N, d_in, F, k, ranked, F64)
    test_matches_two_separate_ops("torch", F64)
    assert spy.calls == 0


def ref_tie_order(score: torch.Tensor, k: int) -> list[list[int]]:
    """Per row the k best features by (score desc, index asc), by Python's sort."""
    return [sorted(range(len(row)), key=lambda f, r=row: (-r[f], f))[:k]
            for row in score.tolist()]


def tie_rows(case: str, F: int) -> torch.Tensor:
    """``[3, F]`` scores with exact ties: across the interpreter's 16-wide feature blocks and at
    the cut, all equal, and -0.0 against +0.0."""
    if case == "all-equal":
        return torch.full((3, F), 0.5)
    rows = torch.randint(-3, 3, (3, F)).float()  # ~F/6 copies of every value
    rows[0, [5, 17, 20]] = 7.0  # one tie group across both blocks
    rows[1, 1], rows[1, 3] = -0.0, 0.0  # equal scores: the lower index ranks first
    rows[1, rows[1] > 0] = -1.0
    return rows


@pytest.mark.parametrize("path", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("case, k", [("blocks", 2), ("blocks", 9), ("blocks", 23),
                                     ("all-equal", 1), ("all-equal", 5), ("all-equal", 23)],
                         ids=["blocks-k2", "blocks-k9", "blocks-kF", "equal-k1", "equal-k5",
                              "equal-kF"])
def test_encode_topk_ties_go_to_the_lower_index_on_every_path(case, k, path, monkeypatch):
    """The tie rule of ``encode_topk`` (lower feature index first, in the kept set and in the
    slot order) on the specification, the CPU path and the kernel, with ties spread over the
    interpreter's 16-wide feature blocks, at the cut (k = 2, 9), all-equal rows and k = F.
    ``x = 0``, so the scores are exactly the bias."""
    F = 23  # two 16-wide blocks; k = F pads KP to 32
    run_on_path(path, monkeypatch)
    b = tie_rows(case, F)  # [L = 3, F]: one case row per layer, one token
    values, indices = encode_topk(torch.zeros(3, 1, 4), torch.zeros(3, 4, F), b, k)
    want = ref_tie_order(b, k)
    assert indices[:, 0].tolist() == want, path
    assert torch.equal(values[:, 0], b.gather(1, torch.tensor(want)))
