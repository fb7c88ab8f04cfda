"""The ops of ``kernels/`` against naive float64 formulas: outputs and every gradient.

The references below are written to be obviously right rather than fast: dense ``[L, N, F]``
activations, explicit row arithmetic into the decoder table, full sorts, Python loops over rows.
They share no code with ``kernels/`` beyond the public functions under test.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from _testing import (
    TOLERANCES,
    assert_close,
    ref_decode,
    ref_decode_dense,
    ref_dense_activation,
    ref_first_row,
)

import kernels.decode as decode_mod
import kernels.topk as topk_mod
from kernels import (
    DecoderLayout,
    batchtopk,
    batchtopk_mask,
    decoder_norms,
    encode_topk,
    exact_topk_mask,
    jumprelu,
    jumprelu_codes,
    jumprelu_step,
    mask_to_codes,
    relu_codes,
    sparse_decode,
)

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DTYPE_ID = {F64: "fp64", F32: "fp32", BF16: "bf16"}


def dtypes(*ds):
    return pytest.mark.parametrize("dtype", ds, ids=[DTYPE_ID[d] for d in ds])


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that records gradients."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def grads(out: torch.Tensor, inputs, upstream: torch.Tensor):
    return torch.autograd.grad(out, inputs, upstream)


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------


def ref_codes(src: torch.Tensor, mask: torch.Tensor):
    """Padded codes by a Python loop: each row's picked features in increasing order."""
    L, N, F = mask.shape
    K = max(int(mask.sum(-1).max()), 1)
    values = torch.zeros(L, N, K, dtype=F64)
    indices = torch.zeros(L, N, K, dtype=torch.long)
    for li in range(L):
        for n in range(N):
            ids = [f for f in range(F) if mask[li, n, f]]
            values[li, n, : len(ids)] = src[li, n, ids].to(F64)
            indices[li, n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return values, indices


def ref_topk_mask(flat: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` first entries of a full stable descending sort: ties go to the lower index."""
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:m]] = True
    return mask


def dense_upstream(G: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, F: int):
    """``[L, N, F]`` upstream gradient: slot ``j < count`` of each row lands on its feature."""
    L, N, _ = G.shape
    dense = torch.zeros(L, N, F, dtype=F64)
    for li in range(L):
        for n in range(N):
            c = int(counts[li, n])
            dense[li, n, indices[li, n, :c]] += G[li, n, :c].to(F64)
    return dense


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


# ----------------------------------------------------------------------------------------------
# DecoderLayout
# ----------------------------------------------------------------------------------------------


def test_layout_offsets_and_sources():
    layout = DecoderLayout(n_layers=4, n_features=3, reach=2)
    assert [layout.reach_of(s) for s in range(4)] == [2, 2, 2, 1]
    assert layout.source_row_offsets == (0, 6, 12, 18, 21)
    assert layout.n_rows == 21
    for L, R in [(4, 1), (4, 2), (4, 4), (5, 3), (1, 1)]:
        layout = DecoderLayout(L, 7, R)
        for s in range(L + 1):
            assert layout.source_row_offsets[s] == ref_first_row(L, 7, R, s)
        for t in range(L):
            brute = [s for s in range(L) if s <= t < s + min(R, L - s)]
            assert list(layout.sources_of(t)) == brute


def test_layout_source_view_is_a_view():
    L, F, R, d_out = 4, 3, 3, 5
    layout = DecoderLayout(L, F, R)
    W = torch.randn(layout.n_rows, d_out)
    for s in range(L):
        R_s = min(R, L - s)
        view = layout.source_view(W, s)
        assert view.shape == (F, R_s, d_out)
        assert view._base is W
        assert view.data_ptr() == W.data_ptr() + ref_first_row(L, F, R, s) * d_out * W.itemsize
        for f in range(F):
            for r in range(R_s):
                assert torch.equal(view[f, r], W[ref_first_row(L, F, R, s) + f * R_s + r])
    layout.source_view(W, 2)[1, 0, 3] = 123.0
    assert W[ref_first_row(L, F, R, 2) + 1 * 2 + 0, 3] == 123.0


@pytest.mark.parametrize("L, F, R", [(3, 4, 0), (3, 4, 4), (3, 4, -1), (0, 4, 1), (3, 0, 1)])
def test_layout_rejects_invalid(L, F, R):
    with pytest.raises(ValueError):
        DecoderLayout(L, F, R)


# ----------------------------------------------------------------------------------------------
# sparse_decode
# ----------------------------------------------------------------------------------------------


def make_codes(L: int, N: int, F: int, K: int, dtype: torch.dtype):
    """Random codes with the awkward cases: an all-padding row and repeated indices in a row."""
    values = torch.randn(L, N, K, dtype=dtype)
    indices = torch.randint(0, F, (L, N, K), dtype=torch.int32)
    values[0, 0], indices[0, 0] = 0, 0  # all-padding row
    if K > 1:
        indices[:, 1::3, -1] = indices[:, 1::3, 0]  # the same feature twice in one row
    return values, indices


def make_decoder(layout: DecoderLayout, d_out: int, K: int, dtype: torch.dtype):
    # scaled so outputs stay O(1) whatever the number of summed rows (matters for bf16)
    W_dec = torch.randn(layout.n_rows, d_out, dtype=dtype) / math.sqrt(K * layout.reach)
    return W_dec, torch.randn(layout.n_layers, d_out, dtype=dtype)


DECODE_SHAPES = [
    pytest.param(L, N, F, K, R, d, id=f"L{L}-N{N}-F{F}-K{K}-R{R}-d{d}")
    for L, N, F, K, R, d in [
        (3, 5, 16, 4, 3, 7),  # CLT
        (3, 5, 16, 4, 1, 7),  # PLT
        (4, 6, 12, 3, 2, 33),  # window, d_out not a power of two
        (5, 4, 10, 6, 5, 33),  # CLT
        (4, 6, 12, 1, 3, 8),  # K = 1
        (1, 5, 8, 3, 1, 7),  # L = 1
        (3, 1, 16, 5, 3, 7),  # N = 1
    ]
]


@dtypes(F64, F32)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("L, N, F, K, R, d_out", DECODE_SHAPES)
def test_sparse_decode(L, N, F, K, R, d_out, bias, dtype):
    layout = DecoderLayout(L, F, R)
    values, indices = make_codes(L, N, F, K, dtype)
    W_dec, b_dec = make_decoder(layout, d_out, K, dtype)
    upstream = torch.randn(L, N, d_out, dtype=F64)

    ins = [leaf(values), leaf(W_dec)] + ([leaf(b_dec)] if bias else [])
    out = sparse_decode(ins[0], indices, ins[1], ins[2] if bias else None, layout)
    assert out.dtype == dtype and out.shape == (L, N, d_out)
    got = grads(out, ins, upstream.to(dtype))

    refs = [leaf(t, F64) for t in ins]
    expected = ref_decode(refs[0], indices, refs[1], refs[2] if bias else None, L, F, R)
    want = grads(expected, refs, upstream)

    assert_close(out, expected, name="out")
    for name, g, w in zip(["values", "W_dec", "b_dec"], got, want, strict=False):
        assert_close(g, w, name=f"grad {name}")


@pytest.mark.parametrize("ratio", [0, 10**9], ids=["gather", "gemm"])
@dtypes(F64, F32)
@pytest.mark.parametrize("L, N, F, K, R, d_out", DECODE_SHAPES)
def test_sparse_decode_torch_paths(L, N, F, K, R, d_out, dtype, ratio, monkeypatch):
    """The torch path called directly (fp32 included, which the public op sends to the
    interpreter here), with every source forced to the gather or to the dense-GEMM branch."""
    monkeypatch.setattr(decode_mod, "DENSE_RATIO", ratio)
    layout = DecoderLayout(L, F, R)
    values, indices = make_codes(L, N, F, K, dtype)
    W_dec, b_dec = make_decoder(layout, d_out, K, dtype)
    upstream = torch.randn(L, N, d_out, dtype=F64)
    ins = [leaf(values), leaf(W_dec), leaf(b_dec)]
    out = decode_mod.sparse_decode_torch(ins[0], indices, ins[1], ins[2], layout)
    got = grads(out, ins, upstream.to(dtype))
    refs = [leaf(t, F64) for t in ins]
    expected = ref_decode(refs[0], indices, refs[1], refs[2], L, F, R)
    want = grads(expected, refs, upstream)
    assert_close(out, expected, name="out")
    for name, g, w in zip(["values", "W_dec", "b_dec"], got, want, strict=True):
        assert_close(g, w, name=f"grad {name}")


def test_sparse_decode_torch_mixes_paths_per_source(monkeypatch):
    """One source with few distinct features (dense GEMMs), the others with many (gathers)."""
    monkeypatch.setattr(decode_mod, "DENSE_RATIO", 1)
    L, N, F, K, R, d_out = 3, 40, 64, 2, 3, 5
    layout = DecoderLayout(L, F, R)
    values, indices = make_codes(L, N, F, K, F64)
    indices[1] = indices[1] % 2  # source 1 names 2 <= DENSE_RATIO * K features
    W_dec, b_dec = make_decoder(layout, d_out, K, F64)
    assert torch.unique(indices[0]).numel() > K and torch.unique(indices[1]).numel() <= K
    upstream = torch.randn(L, N, d_out, dtype=F64)
    ins = [leaf(values), leaf(W_dec)]
    got = grads(decode_mod.sparse_decode_torch(ins[0], indices, ins[1], None, layout), ins,
                upstream)
    expected = ref_decode(ins[0], indices, ins[1], None, L, F, R)
    for name, g, w in zip(["values", "W_dec"], got, grads(expected, ins, upstream), strict=True):
        assert_close(g, w, name=f"grad {name}")


@pytest.mark.parametrize("L, N, F, K, R, d_out", DECODE_SHAPES[:4])
def test_sparse_decode_bf16_forward(L, N, F, K, R, d_out):
    layout = DecoderLayout(L, F, R)
    values, indices = make_codes(L, N, F, K, BF16)
    W_dec, b_dec = make_decoder(layout, d_out, K, BF16)
    out = sparse_decode(values, indices, W_dec, b_dec, layout)
    assert out.dtype == BF16
    # the reference sees the same bf16-rounded inputs, so only the op's own rounding counts
    assert_close(out, ref_decode(values, indices, W_dec, b_dec, L, F, R), name="out bf16")


def test_sparse_decode_int64_indices_match_int32():
    layout = DecoderLayout(3, 8, 2)
    values, indices = make_codes(3, 4, 8, 3, F64)
    W_dec, b_dec = make_decoder(layout, 5, 3, F64)
    a = sparse_decode(values, indices, W_dec, b_dec, layout)
    b = sparse_decode(values, indices.long(), W_dec, b_dec, layout)
    assert torch.equal(a, b)


def test_sparse_decode_gradcheck():
    L, N, F, K, R, d_out = 3, 3, 5, 2, 2, 3
    layout = DecoderLayout(L, F, R)
    values, indices = make_codes(L, N, F, K, F64)
    W_dec, b_dec = make_decoder(layout, d_out, K, F64)
    assert torch.autograd.gradcheck(
        lambda v, w, b: sparse_decode(v, indices, w, b, layout),
        (leaf(values), leaf(W_dec), leaf(b_dec)),
    )


def test_sparse_decode_rejects_bad_shapes():
    L, N, F, K, d_out = 3, 4, 6, 2, 5
    layout = DecoderLayout(L, F, 2)
    values, indices = make_codes(L, N, F, K, F32)
    W_dec, b_dec = make_decoder(layout, d_out, K, F32)

    def raises(*args, shape):
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            sparse_decode(*args, layout)

    raises(values[:, :, :1], indices, W_dec, b_dec, shape=(3, 4, 1))  # values vs indices
    raises(values[:2], indices[:2], W_dec, b_dec, shape=(2, 4, 2))  # wrong L
    raises(values[0], indices[0], W_dec, b_dec, shape=(4, 2))  # not 3-D
    raises(values, indices, W_dec[1:], b_dec, shape=layout.n_rows - 1)  # row count
    raises(values, indices, W_dec.flatten(), b_dec, shape=(W_dec.numel(),))  # not 2-D
    raises(values, indices, W_dec, b_dec[0], shape=(d_out,))  # bias without layers
    raises(values, indices, W_dec, b_dec[:, :1], shape=(L, 1))  # bias would broadcast


# ----------------------------------------------------------------------------------------------
# decoder_norms
# ----------------------------------------------------------------------------------------------


@dtypes(F64, F32)
@pytest.mark.parametrize(
    "L, F, R, d_out",
    [
        pytest.param(*s, id="L{}-F{}-R{}-d{}".format(*s))
        for s in [(3, 5, 3, 7), (4, 6, 2, 33), (3, 4, 1, 8), (1, 3, 1, 5)]
    ],
)
def test_decoder_norms(L, F, R, d_out, dtype):
    layout = DecoderLayout(L, F, R)
    W_dec = torch.randn(layout.n_rows, d_out, dtype=dtype)
    W_dec[ref_first_row(L, F, R, 0) + 1 * min(R, L) : ref_first_row(L, F, R, 0) + 2 * min(R, L)] = 0
    W = leaf(W_dec)
    norms = decoder_norms(W, layout)
    upstream = torch.randn(L, F, dtype=F64)
    (got,) = grads(norms, [W], upstream.to(dtype))

    W_ref = leaf(W_dec, F64)
    rows = []
    for s in range(L):
        R_s = min(R, L - s)
        first = ref_first_row(L, F, R, s)
        # feature f's whole write: its rows for every target, concatenated
        rows.append(
            torch.stack(
                [
                    torch.cat([W_ref[first + f * R_s + r] for r in range(R_s)]).norm()
                    for f in range(F)
                ]
            )
        )
    expected = torch.stack(rows)
    (want,) = grads(expected, [W_ref], upstream)
    assert norms.shape == (L, F) and norms[0, 1] == 0
    assert_close(norms, expected, name="norms")
    assert_close(got, want, name="grad W_dec")  # zero feature: gradient 0, not NaN


def test_decoder_norms_gradcheck():
    layout = DecoderLayout(3, 4, 2)
    W = leaf(torch.randn(layout.n_rows, 3, dtype=F64))
    assert torch.autograd.gradcheck(lambda w: decoder_norms(w, layout), (W,))


# ----------------------------------------------------------------------------------------------
# encode_topk
# ----------------------------------------------------------------------------------------------


def make_encoder(L: int, N: int, d_in: int, F: int, dtype: torch.dtype):
    x = torch.randn(L, N, d_in, dtype=dtype)
    W_enc = torch.randn(L, d_in, F, dtype=dtype) / math.sqrt(d_in)
    b_enc = torch.randn(L, F, dtype=dtype)
    return x, W_enc, b_enc


def ref_pre(x, W_enc, b_enc) -> torch.Tensor:
    return torch.einsum("lnd,ldf->lnf", x.to(F64), W_enc.to(F64)) + b_enc.to(F64).unsqueeze(1)


def assert_separated(score: torch.Tensor, k: int, gap: float = 1e-5) -> None:
    """Precondition: the k-th and (k+1)-th scores of every row differ, so the set is unique."""
    if k < score.shape[-1]:
        top = torch.topk(score, k + 1, dim=-1).values
        assert (top[..., k - 1] - top[..., k]).min() > gap, "test input has a near tie at the cut"


ENCODE_SHAPES = [
    pytest.param(L, N, d_in, F, k, id=f"L{L}-N{N}-din{d_in}-F{F}-k{k}")
    for L, N, d_in, F, k in [
        (3, 7, 5, 16, 4),
        (2, 9, 6, 12, 1),  # k = 1
        (2, 5, 4, 8, 8),  # k = F
        (1, 3, 7, 33, 5),  # F not a power of two
    ]
]


@dtypes(F64, F32)
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
    monkeypatch.setattr(topk_mod, "DENSE_RATIO", ratio)
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
    monkeypatch.setattr(topk_mod, "DENSE_RATIO", ratio)
    monkeypatch.setattr(decode_mod, "DENSE_RATIO", ratio)
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
            out = decode_mod.sparse_decode_torch(torch.relu(values), indices, params[2],
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


# ----------------------------------------------------------------------------------------------
# batchtopk
# ----------------------------------------------------------------------------------------------


def make_pre(kind: str, shape) -> torch.Tensor:
    if kind == "ties":  # few distinct values: ties at the cut are the rule, not the exception
        return torch.randint(-3, 4, shape).to(F64)
    if kind == "negative":  # most kept values are negative and must come out as 0
        return torch.randn(shape, dtype=F64) - 2.0
    return torch.randn(shape, dtype=F64)


def ref_batchtopk_mask(pre: torch.Tensor, k: int, scope: str) -> torch.Tensor:
    L, N, F = pre.shape
    if scope == "global":
        return ref_topk_mask(pre.flatten(), L * N * k).view(L, N, F)
    return torch.stack([ref_topk_mask(pre[li].flatten(), N * k).view(N, F) for li in range(L)])


@dtypes(F64, F32)
@pytest.mark.parametrize("kind", ["randn", "ties", "negative"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize(
    "L, N, F, k",
    [
        pytest.param(*s, id="L{}-N{}-F{}-k{}".format(*s))
        for s in [(3, 4, 10, 2), (2, 5, 7, 3), (1, 3, 6, 1), (3, 2, 4, 4)]
    ],
)
def test_batchtopk(L, N, F, k, scope, kind, dtype):
    pre = leaf(make_pre(kind, (L, N, F)), dtype)
    pre64 = pre.detach().to(F64)
    values, indices, min_kept = batchtopk(pre, k, scope)

    mask = ref_batchtopk_mask(pre64, k, scope)
    assert torch.equal(batchtopk_mask(pre, k, scope), mask)
    want_values, want_indices = ref_codes(pre64.clamp(min=0), mask)
    assert indices.dtype == torch.int32
    assert torch.equal(indices.long(), want_indices)
    assert_close(values, want_values, name="values")
    kept = torch.where(mask, pre64, torch.inf)
    want_min = kept.amin(dim=(1, 2)) if scope == "layer" else kept.amin().view(1)
    assert_close(min_kept, want_min.clamp(min=0), name="min_kept")

    upstream = torch.randn(values.shape, dtype=F64)
    (got,) = grads(values, [pre], upstream.to(dtype))
    ref_pre_leaf = leaf(pre64)
    counts = mask.sum(-1)
    dense_g = dense_upstream(upstream, want_indices, counts, F)
    (want,) = torch.autograd.grad(torch.relu(ref_pre_leaf) * mask, [ref_pre_leaf], dense_g)
    assert_close(got, want, name="grad pre")
    assert not got[~(mask & (pre64 > 0))].any(), "gradient leaked outside kept positive entries"


def test_exact_topk_mask_ties_go_to_lower_index():
    flat = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    assert exact_topk_mask(flat, 3).tolist() == [False, True, True, True, False, False, False]
    assert torch.equal(exact_topk_mask(flat, 7), torch.ones(7, dtype=torch.bool))


def test_batchtopk_rejects_bad_input():
    pre = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="scope"):
        batchtopk(pre, 1, "token")
    pre[1, 2, 3] = float("nan")
    for scope in ["layer", "global"]:
        with pytest.raises(ValueError, match="NaN"):
            batchtopk(pre, 1, scope)
    with pytest.raises(ValueError):
        batchtopk(torch.randn(2, 3, 4), 5, "layer")  # more winners than entries


# ----------------------------------------------------------------------------------------------
# jumprelu
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# mask_to_codes / relu_codes
# ----------------------------------------------------------------------------------------------


@dtypes(F64, F32)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0], ids=["empty", "d0.3", "full"])
def test_mask_to_codes(density, dtype):
    L, N, F = 3, 5, 9
    src = leaf(torch.randn(L, N, F, dtype=dtype))
    mask = torch.rand(L, N, F) < density
    if 0 < density < 1:
        mask[0, 0] = False  # an empty row
        mask[1, 2] = True  # a full row: K = F
    values, indices = mask_to_codes(src, mask)
    want_values, want_indices = ref_codes(src.detach(), mask)
    counts = mask.sum(-1)
    assert values.shape == indices.shape == (L, N, max(int(counts.max()), 1))
    assert indices.dtype == torch.int32 and values.dtype == dtype
    assert torch.equal(indices.long(), want_indices)
    assert_close(values, want_values, name="values")
    # round trip: back to dense is src * mask
    dense = ref_dense_activation(values.detach(), indices, F)
    assert_close(dense, src.detach().to(F64) * mask, name="round trip")

    upstream = torch.randn(values.shape, dtype=F64)
    (got,) = grads(values, [src], upstream.to(dtype))
    assert_close(got, dense_upstream(upstream, want_indices, counts, F), name="grad src")


def test_mask_to_codes_empty_and_bad_shapes():
    values, indices = mask_to_codes(torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.bool))
    assert values.shape == indices.shape == (2, 3, 1)
    assert not values.any() and not indices.any()
    with pytest.raises(ValueError, match=re.escape("(2, 3, 5)")):
        mask_to_codes(torch.randn(2, 3, 4), torch.zeros(2, 3, 5, dtype=torch.bool))


@dtypes(F64, F32)
def test_relu_codes(dtype):
    L, N, F = 3, 6, 11
    pre = leaf(torch.randn(L, N, F, dtype=dtype))
    values, indices = relu_codes(pre)
    mask = pre.detach() > 0
    want_values, want_indices = ref_codes(pre.detach(), mask)
    assert torch.equal(indices.long(), want_indices)
    assert_close(values, want_values, name="values")
    upstream = torch.randn(values.shape, dtype=F64)
    (got,) = grads(values, [pre], upstream.to(dtype))
    ref_leaf = leaf(pre, F64)
    dense_g = dense_upstream(upstream, want_indices, mask.sum(-1), F)
    (want,) = torch.autograd.grad(torch.relu(ref_leaf), [ref_leaf], dense_g)
    assert_close(got, want, name="grad pre")


# ----------------------------------------------------------------------------------------------
# the comparison helper itself
# ----------------------------------------------------------------------------------------------


def test_assert_close_reports_mismatches(poison):
    expected = torch.arange(6, dtype=F32).view(2, 3)
    actual = poison((2, 3))  # an op that wrote nothing
    actual[0] = expected[0]
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, name="out")
    msg = str(info.value)
    assert "3 of 6 elements differ" in msg and "RMS relative error" in msg
    assert "at (1, 0): actual nan, expected 3" in msg
    assert_close(expected + 1e-6, expected)  # within the float32 tolerance
    assert set(TOLERANCES) == {F64, F32, BF16}
