"""``molt_apply`` on its three paths (the torch specification, the CPU path, the Triton kernels
through the interpreter) against a float64 loop over every (layer, token, slot): output and every
gradient. The MoLT model and the kernels' edge cases are in tests/test_molt.py."""

from __future__ import annotations

import math

import pytest
import torch
from _testing import F32, F64, assert_close, leaf, run_on_path

from kernels import molt_apply

GROUPS = [(3, 2), (1, 3)]  # (rank, transforms): T = 5, ranks not powers of two


def make_problem(L=2, N=7, K=3, d_in=5, d_out=6):
    """Codes with padding (value 0, index 0) mid-row, a transform named twice by one token."""
    T = sum(c for _, c in GROUPS)
    indices = torch.randint(0, T, (L, N, K))
    values = torch.rand(L, N, K, dtype=F64) + 0.1
    values[:, 1::3, 1], indices[:, 1::3, 1] = 0, 0
    indices[:, 2::4, -1] = indices[:, 2::4, 0]
    x = torch.randn(L, N, d_in, dtype=F64)
    Us = [torch.randn(L, c, d_out, r, dtype=F64) / math.sqrt(r * d_out) for r, c in GROUPS]
    Vs = [torch.randn(L, c, r, d_in, dtype=F64) / math.sqrt(d_in) for r, c in GROUPS]
    return x, values, indices, Us, Vs


def ref_molt(x, values, indices, Us, Vs):
    """``y[l, n] = sum_j v[l, n, j] * U_t @ (V_t @ x[l, n])`` by a Python loop."""
    mats = [(U[:, t], V[:, t]) for U, V in zip(Us, Vs, strict=True) for t in range(U.shape[1])]
    L, N, K = values.shape
    rows = []
    for li in range(L):
        for n in range(N):
            y = 0
            for j in range(K):
                U, V = mats[int(indices[li, n, j])]
                y = y + values[li, n, j] * (U[li] @ (V[li] @ x[li, n]))
            rows.append(y)
    return torch.stack(rows).view(L, N, -1)


@pytest.mark.parametrize("zero_slot_grad", [True, False], ids=["zero-slots", "live-only"])
@pytest.mark.parametrize("path", ["torch", "cpu", "triton"])
def test_molt_apply_every_path(path, zero_slot_grad, monkeypatch):
    run_on_path(path, monkeypatch)
    dtype = F32 if path == "triton" else F64
    x, values, indices, Us, Vs = make_problem()
    ins = [leaf(t, dtype) for t in (x, values, *Us, *Vs)]
    y = molt_apply(ins[0], ins[1], indices, ins[2:4], ins[4:], zero_slot_grad=zero_slot_grad)
    upstream = torch.randn(y.shape, dtype=F64)
    got = torch.autograd.grad(y, ins, upstream.to(dtype))
    refs = [leaf(t) for t in (x, values, *Us, *Vs)]
    want_y = ref_molt(refs[0], refs[1], indices, refs[2:4], refs[4:])
    want = list(torch.autograd.grad(want_y, refs, upstream))
    if not zero_slot_grad:  # value-0 slots pass no gradient to their value
        want[1] = want[1] * (values != 0)
    assert_close(y, want_y, name="y")
    for name, g, w in zip(["x", "values", "U0", "U1", "V0", "V1"], got, want, strict=True):
        assert_close(g, w, name=f"grad {name}")
