"""``encode_topk(..., aux=...)``: TopK and AuxK's selection among given columns in one op; and
``encode_at``: gathered pre-activations with the sparse encoder backward (BatchTopK).

The reference is two plain ops: ``encode_topk`` over all features, and a float64 top-k of the
gathered columns' pre-activations (``x @ W_enc[:, :, cols] + b``, spare columns at ``-inf``).
Outputs (values, indices, AuxK values and feature ids) and the gradients of a loss on both
outputs w.r.t. x, W_enc and b_enc, for the torch path (float64) and the Triton kernels through
the interpreter (fused and two-step, float32), with layers of different dead counts.
"""

from __future__ import annotations

import math

import pytest
import torch
from _testing import assert_close

from kernels import buffers, encode_at, encode_topk

F64, F32 = torch.float64, torch.float32


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


@pytest.mark.parametrize("dtype, force_torch", [(F64, True), (F32, True), (F32, False)],
                         ids=["torch-fp64", "torch-fp32", "triton-fp32"])
def test_encode_at_matches_dense_autograd(dtype, force_torch, monkeypatch):
    """``encode_at`` (BatchTopK's encoder gradient): values and gradients of x, W_enc, b_enc equal
    dense autograd through ``pre = x @ W + b`` and a gather, repeated features and all."""
    if force_torch:
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    (x, W, b), _, _ = make_problem(dtype=dtype)
    L, N, _ = x.shape
    indices = torch.randint(0, W.shape[2], (L, N, 5))
    indices[:, :, -1] = indices[:, :, 0]  # a feature twice in one row
    ins = [t.clone().requires_grad_(True) for t in (x, W, b)]
    with torch.no_grad():
        pre = torch.baddbmm(b.unsqueeze(1), x, W)
    got = encode_at(*ins, pre, indices)
    refs = [t.double().clone().requires_grad_(True) for t in (x, W, b)]
    want = torch.baddbmm(refs[2].unsqueeze(1), refs[0], refs[1]).gather(-1, indices)
    assert_close(got, want, name="values")
    up = torch.randn(got.shape, dtype=F64)
    for name, g, w in zip(["x", "W_enc", "b_enc"], torch.autograd.grad(got, ins, up.to(dtype)),
                          torch.autograd.grad(want, refs, up), strict=True):
        assert_close(g, w, name=f"grad {name}")
    with pytest.raises(ValueError, match="encode_at"):
        encode_at(x, W, b, pre[:, :2], indices)
