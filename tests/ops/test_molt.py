"""``molt_apply`` on its three paths (the torch specification, the CPU path, the Triton kernels
through the interpreter) against a dense float64 reference: output and every gradient (x, values,
each U_g, each V_g).

The reference shares no code with ``kernels/molt.py``: the gate is scattered to a dense
``[L, N, T]`` tensor and every transform is applied to every token, ``y = sum_t gate[., t] * U_t
V_t x``, with ``U_t V_t`` formed explicitly. Awkward shapes: N and d not multiples of the blocks,
ranks that are not powers of two, padding slots, an all-padding row, a transform picked twice by
one token and one that no token picks. The MoLT model is in tests/test_molt.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _testing import BF16, F32, F64, assert_close, leaf, ref_molt, run_on_path
from _testing import ref_dense_activation as dense_gate

from kernels import molt as molt_mod
from kernels import molt_apply

# (L, N, K, d_in, d_out, [(rank, count), ...])
SHAPES = {
    "L1-N5-K1-one-group": (1, 5, 1, 7, 6, [(3, 4)]),
    "L2-N21-K3-ranks17-5-1": (2, 21, 3, 37, 19, [(17, 2), (5, 3), (1, 4)]),
    "L3-N9-K4-ranks4-2": (3, 9, 4, 16, 16, [(4, 3), (2, 6)]),
}


def make_problem(L, N, K, d_in, d_out, groups, dtype=F64, seed=0):
    """Codes with padding (value 0, index 0), an all-padding row, a transform named twice by one
    token, and one transform (the last of group 0) that no token names; weights near the model's
    init scale so that outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(c for _, c in groups)
    unused = groups[0][1] - 1
    indices = torch.randint(0, T - 1, (L, N, K), generator=g)
    indices = torch.where(indices >= unused, indices + 1, indices)  # skip the unused id
    values = torch.rand(L, N, K, generator=g, dtype=F64) + 0.1
    values[:, 1::3, K // 2] = 0  # padding mid-row
    indices[:, 1::3, K // 2] = 0
    values[0, 0] = 0  # all-padding row
    indices[0, 0] = 0
    if K > 1:
        indices[:, 2::4, -1] = indices[:, 2::4, 0]  # the same transform twice in one row
    x = torch.randn(L, N, d_in, generator=g, dtype=F64)
    Us = [torch.randn(L, c, d_out, r, generator=g, dtype=F64) / math.sqrt(r * d_out)
          for r, c in groups]
    Vs = [torch.randn(L, c, r, d_in, generator=g, dtype=F64) / math.sqrt(d_in) for r, c in groups]
    return [t.to(dtype) for t in (x, values)], indices.to(torch.int32), \
        [t.to(dtype) for t in Us], [t.to(dtype) for t in Vs]


def run_op(xv, indices, Us, Vs, upstream, **kw):
    ins = [leaf(t) for t in (*xv, *Us, *Vs)]
    G = len(Us)
    y = molt_apply(ins[0], ins[1], indices, ins[2 : 2 + G], ins[2 + G :], **kw)
    return y, torch.autograd.grad(y, ins, upstream.to(y.dtype))


def run_ref(xv, indices, Us, Vs, upstream):
    ins = [leaf(t, F64) for t in (*xv, *Us, *Vs)]
    G = len(Us)
    T = sum(U.shape[1] for U in Us)
    y = ref_molt(ins[0], dense_gate(ins[1], indices, T), ins[2 : 2 + G], ins[2 + G :])
    return y, torch.autograd.grad(y, ins, upstream.to(F64))


GRAD_NAMES = ["x", "values"]


def check(got, want, groups, tol=None):
    (y, grads), (ref_y, ref_grads) = got, want
    kw = {} if tol is None else dict(atol=tol[0], rtol=tol[1])
    names = GRAD_NAMES + [f"U{g}" for g in range(len(groups))] + [f"V{g}" for g in
                                                                    range(len(groups))]
    assert_close(y, ref_y, name="y", **kw)
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_close(a, b, name=f"grad {name}", **kw)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_path_matches_dense_reference_float64(shape):
    xv, idx, Us, Vs = make_problem(*shape)
    upstream = torch.randn(shape[0], shape[1], shape[4], dtype=F64)
    got = run_op(xv, idx, Us, Vs, upstream)
    check(got, run_ref(xv, idx, Us, Vs, upstream), shape[5])


def test_gradcheck_torch_path():
    xv, idx, Us, Vs = make_problem(1, 4, 2, 5, 3, [(2, 2), (1, 2)])
    ins = [leaf(t) for t in (*xv, *Us, *Vs)]
    assert torch.autograd.gradcheck(
        lambda x, v, U0, U1, V0, V1: molt_apply(x, v, idx, [U0, U1], [V0, V1]), ins)


def test_zero_slot_grad_off_zeroes_only_the_value0_slots():
    shape = SHAPES["L2-N21-K3-ranks17-5-1"]
    xv, idx, Us, Vs = make_problem(*shape)
    upstream = torch.randn(shape[0], shape[1], shape[4], dtype=F64)
    (y, grads) = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=False)
    ref_y, ref_grads = run_ref(xv, idx, Us, Vs, upstream)
    zero = xv[1] == 0
    assert zero.any() and bool((grads[1][zero] == 0).all())
    assert bool((ref_grads[1][zero] != 0).any())  # the exact gradient there is not 0
    assert_close(grads[1][~zero], ref_grads[1][~zero], name="grad values (nonzero slots)")
    for a, b in zip([y, grads[0], *grads[2:]], [ref_y, ref_grads[0], *ref_grads[2:]],
                    strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("zero_slot_grad", [True, False], ids=["zero-slots", "live-only"])
@pytest.mark.parametrize("shape", list(SHAPES.values())[1:], ids=list(SHAPES.keys())[1:])
def test_triton_fp32_matches_reference(shape, zero_slot_grad):
    xv, idx, Us, Vs = make_problem(*shape, dtype=F32)
    upstream = torch.randn(shape[0], shape[1], shape[4])
    assert molt_mod.interpreter_on()
    got = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=zero_slot_grad)
    want = run_ref(xv, idx, Us, Vs, upstream)
    if not zero_slot_grad:
        want[1][1].masked_fill_(xv[1] == 0, 0)
    check(got, want, shape[5])


def test_triton_bf16_matches_reference():
    shape = SHAPES["L3-N9-K4-ranks4-2"]
    xv, idx, Us, Vs = make_problem(*shape, dtype=BF16)
    upstream = torch.randn(shape[0], shape[1], shape[4]).to(BF16)
    got = run_op(xv, idx, Us, Vs, upstream)
    assert got[0].dtype == BF16 and all(g.dtype == BF16 for g in got[1])
    check(got, run_ref(xv, idx, Us, Vs, upstream), shape[5])


def test_triton_writes_every_output_element(monkeypatch):
    """Every ``torch.empty`` of the Triton forward and backward is NaN (ints -1): an element a
    kernel forgot to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)

    monkeypatch.setattr(molt_mod.torch, "empty",
                        lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(molt_mod.torch, "empty_like",
                        lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))
    shape = SHAPES["L2-N21-K3-ranks17-5-1"]
    xv, idx, Us, Vs = make_problem(*shape, dtype=F32)
    upstream = torch.randn(shape[0], shape[1], shape[4])
    got = run_op(xv, idx, Us, Vs, upstream)
    monkeypatch.undo()
    check(got, run_ref(xv, idx, Us, Vs, upstream), shape[5])


def test_triton_forward_out_buffer_poisoned(poison):
    shape = SHAPES["L3-N9-K4-ranks4-2"]
    (x, v), idx, Us, Vs = make_problem(*shape, dtype=F32)
    out = poison((shape[0], shape[1], shape[4]))
    molt_mod.molt_fwd(x, v, idx, Us, Vs, out=out)
    ref = ref_molt(x.double(), dense_gate(v.double(), idx, 9), [U.double() for U in Us],
                   [V.double() for V in Vs])
    assert_close(out, ref, name="y")


def test_triton_backward_is_deterministic():
    shape = SHAPES["L3-N9-K4-ranks4-2"]
    xv, idx, Us, Vs = make_problem(*shape, dtype=F32)
    upstream = torch.randn(shape[0], shape[1], shape[4])
    a, b = run_op(xv, idx, Us, Vs, upstream), run_op(xv, idx, Us, Vs, upstream)
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(p, q) for p, q in zip(a[1], b[1], strict=True))


def test_triton_no_active_entry():
    xv, idx, Us, Vs = make_problem(1, 6, 2, 8, 5, [(3, 2)], dtype=F32)
    xv[1].zero_()
    upstream = torch.randn(1, 6, 5)
    y, grads = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=False)
    assert bool((y == 0).all()) and all(bool((g == 0).all()) for g in grads)


def test_dispatch(monkeypatch):
    """Triton for fp32 under the interpreter; torch for float64 and with CLT_FORCE_TORCH=1."""
    calls = []
    real = molt_mod.molt_fwd
    monkeypatch.setattr(molt_mod, "molt_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    (x, v), idx, Us, Vs = make_problem(1, 4, 2, 5, 3, [(2, 3)], dtype=F32)
    molt_apply(x, v, idx, Us, Vs)
    assert calls == [1]
    molt_apply(x.double(), v.double(), idx, [U.double() for U in Us], [V.double() for V in Vs])
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    molt_apply(x, v, idx, Us, Vs)
    assert calls == [1]


def test_bad_inputs_raise():
    (x, v), idx, Us, Vs = make_problem(2, 4, 2, 5, 3, [(2, 3)])
    with pytest.raises(ValueError, match=r"x must be \[L, N, d_in\]"):
        molt_apply(x[0], v, idx, Us, Vs)
    with pytest.raises(ValueError, match="codes"):
        molt_apply(x, v[:, :, :1], idx, Us, Vs)
    with pytest.raises(ValueError, match="in N"):
        molt_apply(x[:, :3], v, idx, Us, Vs)
    with pytest.raises(ValueError, match="group 0 needs U"):
        molt_apply(x, v, idx, [Us[0][:, :, :, :1]], Vs)
    with pytest.raises(ValueError, match="group 0 needs U"):
        molt_apply(x, v, idx, Us, [Vs[0][..., :4]])
    with pytest.raises(ValueError, match="one U and one V"):
        molt_apply(x, v, idx, Us, Vs + Vs)
    with pytest.raises(ValueError, match="share a dtype"):
        molt_apply(x, v, idx, [Us[0].float()], Vs)
    for bad in (3, -1):
        idx_bad = idx.clone()
        idx_bad[1, 2, 0] = bad
        with pytest.raises(ValueError, match=r"transform ids must be in \[0, 3\)"):
            molt_apply(x, v, idx_bad, Us, Vs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_triton_gpu_shape_matches_torch_path(dtype):
    """A GPT-2-small-sized layer on CUDA: Triton against the float64 torch path."""
    shape = (2, 2048, 16, 768, 768, [(512, 4), (256, 8), (128, 16), (64, 32), (32, 64)])
    xv, idx, Us, Vs = make_problem(*shape, dtype=dtype)
    move = [t.cuda() for t in (*xv, *Us, *Vs)]
    xv, Us, Vs, idx = move[:2], move[2:7], move[7:], idx.cuda()
    upstream = torch.randn(shape[0], shape[1], shape[4], device="cuda")
    got = run_op(xv, idx, Us, Vs, upstream)
    want = run_op([t.double() for t in xv], idx, [U.double() for U in Us],
                  [V.double() for V in Vs], upstream)
    check(got, want, shape[5], tol=(2e-3, 2e-3) if dtype == F32 else None)


@pytest.mark.parametrize("zero_slot_grad", [True, False], ids=["zero-slots", "live-only"])
@pytest.mark.parametrize("path", ["torch", "cpu", "triton"])
def test_molt_apply_every_path(path, zero_slot_grad, monkeypatch):
    run_on_path(path, monkeypatch)
    shape = SHAPES["L2-N21-K3-ranks17-5-1"]
    dtype = F32 if path == "triton" else F64
    xv, idx, Us, Vs = make_problem(*shape, dtype=dtype)
    upstream = torch.randn(shape[0], shape[1], shape[4])
    got = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=zero_slot_grad)
    want = run_ref(xv, idx, Us, Vs, upstream)
    if not zero_slot_grad:  # value-0 slots pass no gradient to their value
        want[1][1].masked_fill_(xv[1] == 0, 0)
    check(got, want, shape[5])


def test_zero_slot_grad_mask_selects_value0_slots():
    """A bool mask: exact ``grad_values`` at the value-0 slots it names, 0 at the others."""
    shape = SHAPES["L2-N21-K3-ranks17-5-1"]
    xv, idx, Us, Vs = make_problem(*shape)
    upstream = torch.randn(shape[0], shape[1], shape[4], dtype=F64)
    zero = xv[1] == 0
    named = zero & (torch.arange(shape[1]).view(1, -1, 1) % 2 == 0)
    assert named.any() and (zero & ~named).any()
    _, grads = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=named)
    _, ref_grads = run_ref(xv, idx, Us, Vs, upstream)
    assert_close(grads[1][~zero | named], ref_grads[1][~zero | named], name="grad values")
    assert bool((grads[1][zero & ~named] == 0).all())
    with pytest.raises(ValueError, match="bool tensor shaped like values"):
        molt_apply(xv[0], xv[1], idx, Us, Vs, zero_slot_grad=named[:, :3])
