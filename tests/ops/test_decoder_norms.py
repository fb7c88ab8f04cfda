"""``decoder_norms`` against explicit float64 norms: output and gradient.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _testing import (
    BF16,
    F32,
    F64,
    assert_close,
    dtypes,
    grads,
    leaf,
    ref_first_row,
)

from kernels import (
    DecoderLayout,
    decoder_norms,
)

# the package re-exports functions named like their modules: fetch the modules themselves
dn = importlib.import_module("kernels.decoder_norms")


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




@dtypes(F64, F32, BF16)
def test_decoder_norms_specification(dtype):
    """The op (its Function's one-pass row norms) equals the specification per source."""
    layout = DecoderLayout(4, 6, 2)
    W_dec = torch.randn(layout.n_rows, 9).to(dtype)
    assert_close(decoder_norms(W_dec, layout), dn.decoder_norms_torch(W_dec, layout))
