"""The decoder layout and ``sparse_decode`` (specification, CPU path, Triton via the interpreter)
against a dense float64 decode: outputs and every gradient.
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
    decode_cpu,
    dtypes,
    grads,
    leaf,
    make_codes,
    make_decoder,
    ref_decode,
    ref_first_row,
)

from kernels import (
    DecoderLayout,
    sparse_decode,
)

# the package re-exports functions named like their modules: fetch the modules themselves
decode_mod = importlib.import_module("kernels.decode")
cpu_decode = importlib.import_module("kernels.cpu.decode")


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


# fp64 runs the CPU path (and, in test_sparse_decode_specification, the specification); fp32
# through the kernels is test_decode_fp32's, on SHAPES
@dtypes(F64)
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
    monkeypatch.setattr(cpu_decode, "DENSE_RATIO", ratio)
    layout = DecoderLayout(L, F, R)
    values, indices = make_codes(L, N, F, K, dtype)
    W_dec, b_dec = make_decoder(layout, d_out, K, dtype)
    upstream = torch.randn(L, N, d_out, dtype=F64)
    ins = [leaf(values), leaf(W_dec), leaf(b_dec)]
    out = decode_cpu(ins[0], indices, ins[1], ins[2], layout)
    got = grads(out, ins, upstream.to(dtype))
    refs = [leaf(t, F64) for t in ins]
    expected = ref_decode(refs[0], indices, refs[1], refs[2], L, F, R)
    want = grads(expected, refs, upstream)
    assert_close(out, expected, name="out")
    for name, g, w in zip(["values", "W_dec", "b_dec"], got, want, strict=True):
        assert_close(g, w, name=f"grad {name}")


def test_sparse_decode_torch_mixes_paths_per_source(monkeypatch):
    """One source with few distinct features (dense GEMMs), the others with many (gathers)."""
    monkeypatch.setattr(cpu_decode, "DENSE_RATIO", 1)
    L, N, F, K, R, d_out = 3, 40, 64, 2, 3, 5
    layout = DecoderLayout(L, F, R)
    values, indices = make_codes(L, N, F, K, F64)
    indices[1] = indices[1] % 2  # source 1 names 2 <= DENSE_RATIO * K features
    W_dec, b_dec = make_decoder(layout, d_out, K, F64)
    assert torch.unique(indices[0]).numel() > K and torch.unique(indices[1]).numel() <= K
    upstream = torch.randn(L, N, d_out, dtype=F64)
    ins = [leaf(values), leaf(W_dec)]
    got = grads(decode_cpu(ins[0], indices, ins[1], None, layout), ins,
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


def make_problem(L, N, F, K, R, d_out, dtype=F32, w_dtype=None, index_dtype=torch.int32):
    """Codes with an all-padding row, padding mid-row and repeated indices, and a decoder."""
    layout = DecoderLayout(L, F, R)
    values = torch.randn(L, N, K)
    indices = torch.randint(0, F, (L, N, K))
    values[0, 0] = 0  # all-padding row
    values[:, 2::4, K // 2] = 0  # padding in the middle of rows
    if K > 1:
        indices[:, 1::3, -1] = indices[:, 1::3, 0]  # the same feature twice in one row
    W_dec = torch.randn(layout.n_rows, d_out) / math.sqrt(K * R)
    b_dec = torch.randn(L, d_out)
    w_dtype = w_dtype or dtype
    return layout, values.to(dtype), indices.to(index_dtype), W_dec.to(w_dtype), b_dec.to(w_dtype)


def run_op(values, indices, W_dec, b_dec, layout, upstream, **kw):
    ins = [leaf(values), leaf(W_dec)] + ([] if b_dec is None else [leaf(b_dec)])
    out = sparse_decode(ins[0], indices, ins[1], None if b_dec is None else ins[2], layout, **kw)
    return out, torch.autograd.grad(out, ins, upstream.to(out.dtype))


def run_ref(values, indices, W_dec, b_dec, layout, upstream):
    ins = [leaf(values, F64), leaf(W_dec, F64)] + ([] if b_dec is None else [leaf(b_dec, F64)])
    b = None if b_dec is None else ins[2]
    L, F, R = layout.n_layers, layout.n_features, layout.reach
    out = ref_decode(ins[0], indices, ins[1], b, L, F, R)
    return out, torch.autograd.grad(out, ins, upstream.to(F64))


def check(got, want, tol=None):
    (out, grads), (ref_out, ref_grads) = got, want
    kw = {} if tol is None else dict(atol=tol[0], rtol=tol[1])
    assert_close(out, ref_out, name="out", **kw)
    assert len(grads) == len(ref_grads)
    for name, g, w in zip(["values", "W_dec", "b_dec"], grads, ref_grads, strict=False):
        assert_close(g, w, name=f"grad {name}", **kw)


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` / ``empty_like`` of a test here is NaN (or -1): an element a kernel
    forgets to write fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the Triton launchers, to prove the kernel path really ran."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = decode_mod.sparse_decode_fwd, decode_mod.sparse_decode_bwd

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(decode_mod, "sparse_decode_fwd", count("fwd", fwd))
    monkeypatch.setattr(decode_mod, "sparse_decode_bwd", count("bwd", bwd))
    return calls


SHAPES = [
    pytest.param(L, N, F, K, R, d, id=f"L{L}-N{N}-F{F}-K{K}-R{R}-d{d}")
    for L, N, F, K, R, d in [
        (3, 5, 16, 4, 3, 7),  # CLT
        (3, 5, 16, 4, 1, 7),  # PLT
        (4, 6, 12, 3, 2, 33),  # window, d_out not a power of two
        (4, 9, 12, 1, 3, 33),  # K = 1, N not a multiple of the block (8)
        (2, 17, 4, 5, 2, 7),  # F < K: many repeats, segments longer than a block
        (1, 5, 8, 3, 1, 7),  # L = 1
        (3, 1, 16, 5, 3, 7),  # N = 1
    ]
]


VARIANT = pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])


@VARIANT
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("L, N, F, K, R, d_out", SHAPES)
def test_decode_fp32(L, N, F, K, R, d_out, bias, deterministic, spy):
    layout, values, indices, W_dec, b_dec = make_problem(L, N, F, K, R, d_out)
    b_dec = b_dec if bias else None
    upstream = torch.randn(L, N, d_out)
    got = run_op(values, indices, W_dec, b_dec, layout, upstream, deterministic=deterministic)
    assert got[0].dtype == F32 and spy == {"fwd": 1, "bwd": 1}
    check(got, run_ref(values, indices, W_dec, b_dec, layout, upstream))


@VARIANT
@pytest.mark.parametrize("L, N, F, K, R, d_out", SHAPES[:3])
def test_decode_bf16_int64(L, N, F, K, R, d_out, deterministic, spy):
    layout, values, indices, W_dec, b_dec = make_problem(
        L, N, F, K, R, d_out, dtype=BF16, index_dtype=torch.int64
    )
    upstream = torch.randn(L, N, d_out).to(BF16)
    got = run_op(values, indices, W_dec, b_dec, layout, upstream, deterministic=deterministic)
    assert [g.dtype for g in [got[0], *got[1]]] == [BF16] * 4 and spy["bwd"] == 1
    # the reference sees the same bf16-rounded inputs: only the op's own rounding counts
    check(got, run_ref(values, indices, W_dec, b_dec, layout, upstream))


def test_decode_fp32_values_bf16_weights(spy):
    layout, values, indices, W_dec, b_dec = make_problem(3, 6, 8, 3, 2, 33, w_dtype=BF16)
    upstream = torch.randn(3, 6, 33).to(BF16)
    out, (g_v, g_w, g_b) = run_op(values, indices, W_dec, b_dec, layout, upstream)
    assert (out.dtype, g_v.dtype, g_w.dtype, g_b.dtype) == (BF16, F32, BF16, BF16)
    ref = run_ref(values, indices, W_dec, b_dec, layout, upstream)
    check((out, (g_v.to(BF16), g_w, g_b)), ref)


def test_int32_and_int64_indices_agree_bitwise():
    layout, values, indices, W_dec, b_dec = make_problem(3, 7, 8, 3, 2, 9)
    upstream = torch.randn(3, 7, 9)
    a = run_op(values, indices, W_dec, b_dec, layout, upstream)
    b = run_op(values, indices.long(), W_dec, b_dec, layout, upstream)
    for x, y in zip([a[0], *a[1]], [b[0], *b[1]], strict=True):
        assert torch.equal(x, y)


def test_deterministic_backward_is_bitwise_reproducible():
    # 40 tokens x 4 slots onto 3 features: every segment spans several entry blocks
    layout, values, indices, W_dec, b_dec = make_problem(3, 40, 3, 4, 3, 33)
    upstream = torch.randn(3, 40, 33)
    first = run_op(values, indices, W_dec, b_dec, layout, upstream)
    second = run_op(values, indices, W_dec, b_dec, layout, upstream)
    for x, y in zip(first[1], second[1], strict=True):
        assert torch.equal(x, y)
    atomic = run_op(values, indices, W_dec, b_dec, layout, upstream, deterministic=False)
    check(atomic, first)


@pytest.mark.parametrize("need", ["values", "W_dec"])
def test_partial_gradients(need, spy):
    layout, values, indices, W_dec, b_dec = make_problem(3, 5, 8, 3, 2, 7)
    v = leaf(values) if need == "values" else values
    w = leaf(W_dec) if need == "W_dec" else W_dec
    upstream = torch.randn(3, 5, 7)
    (g,) = torch.autograd.grad(sparse_decode(v, indices, w, b_dec, layout), [v, w][
        need == "W_dec"], upstream)
    _, (ref_v, ref_w, _) = run_ref(values, indices, W_dec, b_dec, layout, upstream)
    assert_close(g, ref_v if need == "values" else ref_w, name=f"grad {need}")
    assert spy["bwd"] == 1


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_launchers_fill_given_buffers(deterministic, poison):
    """Explicit NaN buffers, several blocks per axis (block overrides): every element written."""
    L, N, F, K, R, d_out = 3, 9, 6, 3, 2, 33
    layout, values, indices, W_dec, b_dec = make_problem(L, N, F, K, R, d_out)
    grad_out = torch.randn(L, N, d_out)
    blocks = dict(block_d=16)
    out = poison((L, N, d_out))
    res = decode_mod.sparse_decode_fwd(values, indices, W_dec, b_dec, layout, out=out,
                                       block_n=4, **blocks)
    assert res is out
    g_v, g_w = poison(values.shape), poison(W_dec.shape)
    res_v, res_w = decode_mod.sparse_decode_bwd(
        grad_out, values, indices, W_dec, layout, deterministic=deterministic,
        grad_values=g_v, grad_W=g_w, block_rows=4, **blocks,
    )
    assert res_v is g_v and res_w is g_w
    ref_out, (ref_v, ref_w, _) = run_ref(values, indices, W_dec, b_dec, layout, grad_out)
    assert_close(out, ref_out, name="out")
    assert_close(g_v, ref_v, name="grad values")
    assert_close(g_w, ref_w, name="grad W_dec")


def test_dispatch(monkeypatch, spy):
    layout, values, indices, W_dec, b_dec = make_problem(3, 4, 8, 2, 3, 5)
    upstream = torch.randn(3, 4, 5)
    # float64 always takes the torch path (kernels compute in fp32): exact to fp64 tolerance
    got64 = run_op(values.double(), indices, W_dec.double(), b_dec.double(), layout, upstream)
    assert spy == {"fwd": 0, "bwd": 0}
    check(got64, run_ref(values, indices, W_dec, b_dec, layout, upstream), tol=(1e-10, 1e-9))
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    forced = run_op(values, indices, W_dec, b_dec, layout, upstream)
    assert spy == {"fwd": 0, "bwd": 0}
    monkeypatch.delenv("CLT_FORCE_TORCH")
    triton_path = run_op(values, indices, W_dec, b_dec, layout, upstream)
    assert spy == {"fwd": 1, "bwd": 1}
    check(triton_path, forced)


@pytest.mark.gpu
@VARIANT
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R", [1, 3, 6], ids=["PLT", "window", "CLT"])
def test_decode_cuda_production_blocks(R, dtype, deterministic):
    """Real CUDA at production block sizes against the float64 torch path (also on CUDA)."""
    L, N, F, K, d_out = 6, 1000, 512, 16, 200
    layout = DecoderLayout(L, F, R)
    values = torch.randn(L, N, K, device="cuda").relu()  # ~half the slots are padding
    indices = torch.randint(0, F, (L, N, K), device="cuda", dtype=torch.int32)
    W_dec = (torch.randn(layout.n_rows, d_out, device="cuda") / math.sqrt(K * R)).to(dtype)
    b_dec = torch.randn(L, d_out, device="cuda").to(dtype)
    upstream = torch.randn(L, N, d_out, device="cuda").to(dtype)
    got = run_op(values.to(dtype), indices, W_dec, b_dec, layout, upstream,
                 deterministic=deterministic)
    ref_ins = [leaf(t, F64) for t in (values.to(dtype), W_dec, b_dec)]
    ref = decode_cpu(ref_ins[0], indices, ref_ins[1], ref_ins[2], layout)
    check(got, (ref, torch.autograd.grad(ref, ref_ins, upstream.to(F64))))
    if deterministic:
        again = run_op(values.to(dtype), indices, W_dec, b_dec, layout, upstream)
        assert all(torch.equal(a, b) for a, b in zip(got[1], again[1], strict=True))




@pytest.mark.parametrize("L, N, F, K, R, d_out", DECODE_SHAPES)
def test_sparse_decode_specification(L, N, F, K, R, d_out, spec_path, monkeypatch):
    """``sparse_decode_torch`` (what runs with ``kernels.cpu_fast_paths(False)``) passes the fp64
    test of the op, bias or not, without touching the CPU path."""
    spy = Spy(monkeypatch, cpu_decode, "decode_fwd")
    for bias in (True, False):
        test_sparse_decode(L, N, F, K, R, d_out, bias, F64)
    assert spy.calls == 0
