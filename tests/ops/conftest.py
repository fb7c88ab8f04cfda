"""Fixtures of the op tests, and a faster Triton interpreter reduction for them."""

import pytest

import kernels


def _faster_interpreter() -> None:
    """Two speed-ups of the Triton interpreter for these tests; kernels and GPUs are untouched.

    - ``xor_sum`` / ``or`` reductions through numpy: the interpreter otherwise loops over every
      element in Python (``ReduceOps.generic_reduce``), and ``tl.topk`` / ``tl.sort`` are bitonic
      networks built on ``xor_sum``. Same integers (the fused TopK forward's values and indices
      checked bit for bit); 4-7x less time for the TopK kernel tests.
    - The list of ``triton.language`` builtins it patches is read once: it re-patches the
      language on every call of a ``@triton.jit`` helper inside a kernel (``tl.sum``,
      ``tl.max``, ...), and ``inspect.getmembers`` of the modules was most of that time.

    Skipped (the stock interpreter runs) where a Triton version lacks what they replace."""
    import inspect

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    ops = interpreter.ReduceOps
    combine = [getattr(tl.standard, n, None) for n in ("_xor_combine", "_or_combine")]
    if hasattr(ops, "apply_impl") and None not in combine \
            and not getattr(ops, "_numpy_bitwise", False):
        ufuncs = dict(zip(combine, (np.bitwise_xor, np.bitwise_or), strict=True))
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

    patch_attr = getattr(interpreter, "_patch_attr", None)
    if patch_attr is not None and hasattr(interpreter, "_patch_builtin") \
            and not getattr(interpreter, "_builtins_cached", False):
        builtins: dict[int, list] = {}  # module or class -> its builtins, read while unpatched

        def _patch_builtin(pkg, builder, scope):
            if id(pkg) not in builtins:
                builtins[id(pkg)] = [(name, member) for name, member in inspect.getmembers(pkg)
                                     if tl.core.is_builtin(member)]
            for name, member in builtins[id(pkg)]:
                patch_attr(pkg, name, member, builder, scope)

        interpreter._patch_builtin = _patch_builtin
        interpreter._builtins_cached = True


if kernels._dispatch.interpreter_on():
    _faster_interpreter()


@pytest.fixture
def spec_path(monkeypatch):
    """Runs the test body on the torch specification of each op: the CPU fast paths off, Triton
    off (``CLT_FORCE_TORCH=1``)."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    with kernels.cpu_fast_paths(False):
        yield


@pytest.fixture(autouse=True)
def _restore_cpu_fast_paths():
    """Whatever a test sets, the next one starts with the CPU fast paths on (as in the trainer,
    tests/conftest.py)."""
    yield
    kernels.cpu_fast_paths(True)
