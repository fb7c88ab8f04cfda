"""Fixtures of the op tests, and a faster Triton interpreter reduction for them."""

import pytest

import kernels


def _numpy_bitwise_reductions() -> None:
    """Let the Triton interpreter reduce ``xor_sum`` / ``or`` with numpy: it otherwise falls back
    to a Python loop over every element (``ReduceOps.generic_reduce``), and ``tl.topk`` /
    ``tl.sort`` are bitonic networks built on ``xor_sum``. Same integers (checked bit for bit on
    the fused TopK forward's values and indices), 4-7x less time for the TopK kernel tests. Only
    the interpreter's fallback is replaced; kernels and the GPU are untouched."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    ops = interpreter.ReduceOps
    if getattr(ops, "_numpy_bitwise", False):
        return
    ufuncs = {tl.standard._xor_combine: np.bitwise_xor, tl.standard._or_combine: np.bitwise_or}
    slow = ops.apply_impl

    def apply_impl(self, input):
        ufunc = ufuncs.get(self.combine_fn)
        if ufunc is None or len(input) != 1:
            return slow(self, input)
        data = input[0].handle.data
        return self.to_tensor(ufunc.reduce(data, axis=self.axis, keepdims=self.keep_dims),
                              input[0].dtype)

    ops.apply_impl = apply_impl
    ops._numpy_bitwise = True


if kernels._dispatch.interpreter_on():
    _numpy_bitwise_reductions()


@pytest.fixture
def spec_path(monkeypatch):
    """Runs the test body on the torch specification of each op: the CPU fast paths off, Triton
    off (``CLT_FORCE_TORCH=1``)."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    with kernels.cpu_fast_paths(False):
        yield


@pytest.fixture(autouse=True)
def _restore_cpu_fast_paths():
    """Whatever a test sets, the next one starts with the CPU fast paths on (the default)."""
    yield
    kernels.cpu_fast_paths(True)
