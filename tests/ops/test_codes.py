"""``mask_to_codes`` / ``relu_codes`` against a Python loop, and the comparison helper itself.
"""

from __future__ import annotations

import re

import pytest
import torch
from _testing import (
    BF16,
    F32,
    F64,
    TOLERANCES,
    assert_close,
    dense_upstream,
    dtypes,
    grads,
    leaf,
    ref_codes,
    ref_dense_activation,
)

from kernels import (
    mask_to_codes,
    relu_codes,
)


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


