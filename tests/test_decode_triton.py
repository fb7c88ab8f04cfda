"""The Triton sparse decode (through the interpreter) against a float64 dense reference.

Outputs and every gradient (values, W_dec, b_dec) for CLT / PLT / window layouts, both decoder
gradient variants, bf16, int32 / int64 indices, awkward sizes; every kernel output is NaN-poisoned
before the call, and the kernels compile for sm_80 / sm_90 at production block sizes without
spills. The reference shares no code with ``kernels/decode.py``: a dense ``[L, N, F]`` activation
and one dense product per (source, target) with explicit row arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from _testing import assert_close, ref_decode

from kernels import DecoderLayout, sparse_decode
from kernels import decode as decode_mod
from kernels.compile_check import CompileJob, compile_for_gpu

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


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


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


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
    ref = decode_mod.sparse_decode_torch(ref_ins[0], indices, ref_ins[1], ref_ins[2], layout)
    check(got, (ref, torch.autograd.grad(ref, ref_ins, upstream.to(F64))))
    if deterministic:
        again = run_op(values.to(dtype), indices, W_dec, b_dec, layout, upstream)
        assert all(torch.equal(a, b) for a, b in zip(got[1], again[1], strict=True))


def _compile_jobs() -> list[CompileJob]:
    """Every kernel at the launchers' GPU block sizes (and BLOCK_D 64 where that is the cap for
    d_out <= 64), fp32 and bf16 tables, int32 and int64 indices, for sm_80 and sm_90."""
    ints = {"N": "i32", "K": "i32", "d_out": "i32", "n_layers": "i32", "reach": "i32"}
    jobs = []
    for arch in (80, 90):
        for w, idx in (("*fp32", "*i32"), ("*bf16", "*i64")):
            rows, bd = decode_mod.GPU_BLOCKS["fwd"]
            for block_d in sorted({64, bd}):
                jobs.append(CompileJob(
                    decode_mod._decode_fwd_kernel,
                    {"values_ptr": w, "indices_ptr": idx, "W_ptr": w, "b_ptr": w,
                     "row_off_ptr": "*i64", "out_ptr": w, **ints},
                    {"HAS_BIAS": True, "BLOCK_N": rows, "BLOCK_D": block_d}, arch))
            rows, bd = decode_mod.GPU_BLOCKS["bwd"]
            for atomic in (True, False):
                jobs.append(CompileJob(
                    decode_mod._decode_bwd_kernel,
                    {"values_ptr": w, "indices_ptr": idx, "W_ptr": w, "grad_out_ptr": w,
                     "row_off_ptr": "*i64", "grad_values_ptr": w, "grad_W_ptr": "*fp32",
                     **ints},
                    {"ATOMIC_GRAD_W": atomic, "BLOCK_M": rows, "BLOCK_D": bd}, arch))
            rows, bd = decode_mod.GPU_BLOCKS["grad_w"]
            for block_d, accumulate in [(b, False) for b in sorted({64, bd})] + [(bd, True)]:
                jobs.append(CompileJob(
                    decode_mod._decode_bwd_grad_w_kernel,
                    {"values_ptr": w, "grad_out_ptr": w, "row_off_ptr": "*i64",
                     "perm_ptr": "*i64", "seg_ptr": "*i64", "grad_W_ptr": w,
                     "N": "i32", "K": "i32", "F": "i32", "d_out": "i32", "n_layers": "i32",
                     "reach": "i32"},
                    {"ACCUMULATE": accumulate, "BLOCK_E": rows, "BLOCK_D": block_d}, arch))
    return jobs


def test_kernels_compile_for_sm80_sm90_without_spills():
    jobs = _compile_jobs()
    usages = compile_for_gpu(jobs)
    report = [
        f"{u.name} {j.signature['values_ptr']} {j.constexprs}: {u.registers} regs, "
        f"stack {u.stack_bytes}, spill {u.spill_bytes}"
        for j, u in zip(jobs, usages, strict=True)
    ]
    print("\n".join(report))
    assert all(u.spill_bytes == 0 and u.stack_bytes == 0 for u in usages), "\n".join(report)
