"""``sparse_decode_many`` (several decodes, one decoder gradient) and recycled gradient buffers.

Against the float64 dense reference of ``_testing``: each decode's output, and the gradients of a
loss on all outputs w.r.t. every decode's values, the shared ``W_dec`` and ``b_dec``. Both paths:
the torch path in float64 (and float32 with every source forced to gathers or GEMMs), the Triton
kernels through the interpreter in float32 and bf16, deterministic and atomic. The decodes mix a
TopK-like set (many distinct features, gathers) with an AuxK-like one (a few features on every
token, dense GEMMs in the torch path) of another K. Donated buffers are NaN-filled, so a row the
backward forgets to write fails, and the gradient must land in the donated memory.
"""

from __future__ import annotations

import math

import pytest
import torch
from _testing import assert_close, decode_cpu, pooled_buffers, ref_decode

import kernels.cpu.decode as cpu_decode
import kernels.decode as decode_mod
from kernels import DecoderLayout, buffers, sparse_decode, sparse_decode_many

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def _empty_pool():
    buffers.clear()
    yield
    buffers.clear()


def make_sets(L, N, F, K, R, d_out, dtype, aux_features=3, k_aux=4):
    """Main codes (padding and repeats included), AuxK-like codes naming ``aux_features``
    features per layer on every token, and a decoder."""
    gen = torch.Generator().manual_seed(1)
    layout = DecoderLayout(L, F, R)
    values = torch.randn(L, N, K, generator=gen).relu()
    indices = torch.randint(0, F, (L, N, K), generator=gen)
    indices[:, 1::3, -1] = indices[:, 1::3, 0]
    dead = torch.randperm(F, generator=gen)[:aux_features]
    aux_values = torch.randn(L, N, k_aux, generator=gen).relu()
    aux_indices = dead[torch.randint(0, aux_features, (L, N, k_aux), generator=gen)]
    W_dec = torch.randn(layout.n_rows, d_out, generator=gen) / math.sqrt(K * R)
    b_dec = torch.randn(L, d_out, generator=gen)
    cast = [t.to(dtype) for t in (values, aux_values, W_dec, b_dec)]
    return layout, (cast[0], indices), (cast[1], aux_indices), cast[2], cast[3]


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def run(decode_many, main, aux, W_dec, b_dec, layout, ups, dtype=None, used=(True, True)):
    """Outputs and gradients (main values, aux values, W_dec, b_dec) of ``sum <up, out>`` over
    the used outputs."""
    v, v_aux, W, b = leaf(main[0], dtype), leaf(aux[0], dtype), leaf(W_dec, dtype), \
        leaf(b_dec, dtype)
    outs = decode_many([(v, main[1], b), (v_aux, aux[1], None)], W, layout)
    loss = sum((o * u.to(o.dtype)).sum()
               for o, u, keep in zip(outs, ups, used, strict=True) if keep)
    g = torch.autograd.grad(loss, [v, v_aux, W, b], allow_unused=True)
    return outs, [torch.zeros_like(t) if gi is None else gi
                  for gi, t in zip(g, (v, v_aux, W, b), strict=True)]


def reference(layout):
    L, F, R = layout.n_layers, layout.n_features, layout.reach

    def decode_many(sets, W, _layout):
        return [ref_decode(v, i, W, b, L, F, R) for v, i, b in sets]

    return decode_many


def check(got, want, tol=None, used=(True, True)):
    kw = {} if tol is None else dict(atol=tol[0], rtol=tol[1])
    for name, o, r, keep in zip(["main out", "aux out"], got[0], want[0], used, strict=True):
        if keep:
            assert_close(o, r, name=name, **kw)
    for name, g, w in zip(["main values", "aux values", "W_dec", "b_dec"], got[1], want[1],
                          strict=True):
        assert_close(g, w, name=f"grad {name}", **kw)


SHAPES = [(3, 10, 16, 3, 3, 5), (4, 7, 12, 2, 2, 9)]


@pytest.mark.parametrize("used", [(True, True), (True, False), (False, True)],
                         ids=["both", "main-only", "aux-only"])
@pytest.mark.parametrize("L, N, F, K, R, d_out", SHAPES)
def test_torch_path_matches_separate_decodes(L, N, F, K, R, d_out, used):
    layout, main, aux, W_dec, b_dec = make_sets(L, N, F, K, R, d_out, F64)
    ups = [torch.randn(L, N, d_out, dtype=F64) for _ in range(2)]
    got = run(sparse_decode_many, main, aux, W_dec, b_dec, layout, ups, used=used)
    want = run(reference(layout), main, aux, W_dec, b_dec, layout, ups, used=used)
    check(got, want, used=used)


@pytest.mark.parametrize("ratio", [0, 10**9], ids=["gather", "gemm"])
def test_torch_path_fp32_every_branch(ratio, monkeypatch):
    """float32 through the torch path (the public op would take the interpreter here), every
    source forced to gathers or to GEMMs."""
    monkeypatch.setattr(cpu_decode, "DENSE_RATIO", ratio)
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    layout, main, aux, W_dec, b_dec = make_sets(3, 10, 16, 3, 3, 5, F32)
    ups = [torch.randn(3, 10, 5) for _ in range(2)]
    got = run(sparse_decode_many, main, aux, W_dec, b_dec, layout, ups)
    want = run(reference(layout), main, aux, W_dec, b_dec, layout, ups, dtype=F64)
    check(got, want)


def test_torch_path_chunks_rows(monkeypatch):
    """Several decoder-gradient chunks, some with no entries at all (zeros written)."""
    monkeypatch.setattr(cpu_decode, "CHUNK_BYTES", 5 * 8 * 3)  # 3 rows of d_out=5 float64
    layout, main, aux, W_dec, b_dec = make_sets(3, 4, 40, 2, 3, 5, F64)
    ups = [torch.randn(3, 4, 5, dtype=F64) for _ in range(2)]
    check(run(sparse_decode_many, main, aux, W_dec, b_dec, layout, ups),
          run(reference(layout), main, aux, W_dec, b_dec, layout, ups))


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("used", [(True, True), (False, True)], ids=["both", "aux-only"])
def test_triton_path_matches_reference(dtype, deterministic, used):
    # two row blocks (8) and two d_out blocks (32) of the interpreter's tiles
    layout, main, aux, W_dec, b_dec = make_sets(3, 9, 9, 3, 3, 33, dtype)
    ups = [torch.randn(3, 9, 33) for _ in range(2)]

    def decode_many(sets, W, lay):
        return sparse_decode_many(sets, W, lay, deterministic=deterministic)

    got = run(decode_many, main, aux, W_dec, b_dec, layout, ups, used=used)
    want = run(reference(layout), main, aux, W_dec, b_dec, layout, ups, dtype=F64, used=used)
    check(got, want, used=used)


def test_accumulating_launcher_adds_only_touched_rows():
    """``sparse_decode_bwd(accumulate=True)`` adds this decode's gradient and leaves rows no code
    reads bitwise unchanged."""
    layout, (values, indices), _, W_dec, _ = make_sets(3, 6, 16, 2, 3, 8, F32)
    indices = indices % 5  # features 5.. are never read
    grad_out = torch.randn(3, 6, 8)
    before = torch.randn_like(W_dec)
    _, fresh = decode_mod.sparse_decode_bwd(grad_out, values, indices, W_dec, layout,
                                            need_values=False)
    _, summed = decode_mod.sparse_decode_bwd(grad_out, values, indices, W_dec, layout,
                                             need_values=False, grad_W=before.clone(),
                                             accumulate=True)
    assert_close(summed, before + fresh, name="accumulated grad W_dec")
    read = torch.zeros(layout.n_rows, dtype=torch.bool)
    for s in range(3):
        lo = layout.source_row_offsets[s]
        R_s = layout.reach_of(s)
        for f in range(5):
            read[lo + f * R_s : lo + (f + 1) * R_s] = True
    assert torch.equal(summed[~read], before[~read])
    with pytest.raises(ValueError, match="accumulate"):
        decode_mod.sparse_decode_bwd(grad_out, values, indices, W_dec, layout, accumulate=True)


@pytest.mark.parametrize("force_torch", [True, False], ids=["torch", "triton"])
def test_donated_buffer_becomes_the_gradient(force_torch, monkeypatch):
    """A NaN-filled donated buffer: the decoder gradient is written into it (autograd installs it
    as ``.grad`` without a copy) and every element is overwritten."""
    if force_torch:
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    layout, main, aux, W_dec, b_dec = make_sets(3, 10, 16, 3, 3, 5, F32)
    W = leaf(W_dec)
    donated = torch.full_like(W_dec, float("nan"))
    ptr = donated.data_ptr()
    buffers.donate(donated)
    del donated  # the donor's contract: no other reference (autograd would copy, not adopt it)
    assert pooled_buffers() == 1
    outs = sparse_decode_many([(main[0], main[1], b_dec), (aux[0], aux[1], None)], W, layout)
    (outs[0].square().sum() + outs[1].sum()).backward()
    assert pooled_buffers() == 0
    assert W.grad.data_ptr() == ptr
    ref_W = leaf(W_dec)
    refs = reference(layout)([(main[0], main[1], b_dec), (aux[0], aux[1], None)], ref_W, layout)
    (refs[0].square().sum() + refs[1].sum()).backward()
    assert_close(W.grad, ref_W.grad, name="grad W_dec")


def test_pool_keeps_only_whole_plain_tensors():
    t = torch.zeros(4, 6)
    buffers.donate(t[:2])  # a view: other tensors still read the storage
    buffers.donate(t.t())  # not contiguous
    buffers.donate(torch.zeros(3, requires_grad=True))
    assert pooled_buffers() == 0
    buffers.donate(t)
    buffers.donate(t)  # the same memory twice is kept once
    assert pooled_buffers() == 1
    assert buffers.empty((4, 6), t.dtype, t.device).data_ptr() == t.data_ptr()
    assert buffers.empty((4, 6), t.dtype, t.device).data_ptr() != t.data_ptr()  # pool empty


def test_sparse_decode_many_rejects_bad_input():
    layout, (values, indices), _, W_dec, b_dec = make_sets(3, 4, 8, 2, 3, 5, F64)
    with pytest.raises(ValueError, match="at least one"):
        sparse_decode_many([], W_dec, layout)
    with pytest.raises(ValueError, match="b_dec"):
        sparse_decode_many([(values, indices, b_dec[0])], W_dec, layout)
    with pytest.raises(ValueError, match="codes must be"):
        sparse_decode_many([(values, indices, None), (values[:2], indices[:2], None)], W_dec,
                           layout)
    with pytest.raises(ValueError, match="W_dec"):
        sparse_decode_many([(values, indices, None)], W_dec[1:], layout)
    # the single-decode op is the one-set case
    torch.testing.assert_close(sparse_decode(values, indices, W_dec, b_dec, layout),
                               sparse_decode_many([(values, indices, b_dec)], W_dec, layout)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_cuda_main_and_auxk_at_production_blocks(dtype, deterministic):
    """Real CUDA, production block sizes: TopK codes and AuxK-like codes (64 features, 64 slots)
    through one W_dec against the float64 torch path of the same decodes (also on CUDA)."""
    L, N, F, K, R, d_out = 6, 1000, 512, 16, 6, 200
    layout, main, aux, W_dec, b_dec = make_sets(L, N, F, K, R, d_out, F32, aux_features=64,
                                                k_aux=64)
    main, aux = tuple(t.cuda() for t in main), tuple(t.cuda() for t in aux)
    W_dec, b_dec = W_dec.cuda(), b_dec.cuda()
    ups = [torch.randn(L, N, d_out, device="cuda") for _ in range(2)]

    def decode_many(sets, W, lay):
        return sparse_decode_many(sets, W, lay, deterministic=deterministic)

    got = run(decode_many, main, aux, W_dec, b_dec, layout, ups, dtype=dtype)
    want = run(reference_torch_path, main, aux, W_dec, b_dec, layout, ups, dtype=F64)
    check(got, want)


def reference_torch_path(sets, W, layout):
    """Each decode separately through the float64 torch path (the reference on CUDA tensors)."""
    return [decode_cpu(v, i, W, b, layout) for v, i, b in sets]


def test_zero_slot_grad_off_skips_only_zero_slots(monkeypatch):
    """``zero_slot_grad=False`` (torch path): value gradients equal the full ones at nonzero
    slots and are 0 at zero slots (padding); W_dec and b_dec gradients are unchanged."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    layout, main, aux, W_dec, b_dec = make_sets(3, 10, 16, 3, 3, 5, F64)
    ups = [torch.randn(3, 10, 5, dtype=F64) for _ in range(2)]
    assert (main[0] == 0).any() and (main[0] != 0).any()

    def decode_many(sets, W, lay):
        return sparse_decode_many(sets, W, lay, zero_slot_grad=False)

    got = run(decode_many, main, aux, W_dec, b_dec, layout, ups)
    full = run(sparse_decode_many, main, aux, W_dec, b_dec, layout, ups)
    for g, f, v in zip(got[1][:2], full[1][:2], (main[0], aux[0]), strict=True):
        assert_close(g, torch.where(v != 0, f, torch.zeros_like(f)), name="grad values")
    for g, f in zip(got[1][2:], full[1][2:], strict=True):
        assert_close(g, f, name="grad W_dec / b_dec")


@pytest.mark.parametrize("L, N, F, K, R, d_out", SHAPES)
def test_specification_matches_separate_decodes(L, N, F, K, R, d_out, spec_path):
    """With the CPU fast paths off every decode of the set runs the specification."""
    for used in [(True, True), (True, False), (False, True)]:
        test_torch_path_matches_separate_decodes(L, N, F, K, R, d_out, used)
