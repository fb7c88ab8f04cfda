"""``encode_at``: pre-activations gathered at given features with TopK's sparse encoder backward.
"""

from __future__ import annotations

import pytest
import torch
from _testing import (
    F32,
    F64,
    assert_close,
    make_encoder,
)

from kernels import (
    encode_at,
)


@pytest.mark.parametrize("dtype, force_torch", [(F64, True), (F32, True), (F32, False)],
                         ids=["torch-fp64", "torch-fp32", "triton-fp32"])
def test_encode_at_matches_dense_autograd(dtype, force_torch, monkeypatch):
    """``encode_at`` (BatchTopK's encoder gradient): values and gradients of x, W_enc, b_enc equal
    dense autograd through ``pre = x @ W + b`` and a gather, repeated features and all."""
    if force_torch:
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    x, W, b = make_encoder(3, 9, 6, 20, dtype)
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




def test_encode_at_specification(spec_path, monkeypatch):
    """``encode_at_torch`` (dense autograd of the recomputed pre-activations) passes the test."""
    test_encode_at_matches_dense_autograd(F64, True, monkeypatch)
