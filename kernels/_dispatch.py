"""The one place that chooses the path of every op, and the settings all kernels share.

Each public op runs one of three paths:

- ``"triton"``: the Triton kernels, when the tensors are on CUDA, or on CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1``, how the test suite runs kernels without a
  GPU), and every floating tensor has a dtype the op's kernels admit (:data:`TRITON_DTYPES`);
- ``"cpu"``: the CPU performance path of ``kernels/cpu/<op>.py`` (buffer donation, dense-ratio
  switches, chunking, sampled products), off unless a caller opts in (:func:`cpu_fast_paths`;
  the trainer and the evaluation tools do);
- ``"torch"``: the readable torch specification next to each op (``<op>_torch``).

``CLT_FORCE_TORCH=1`` forces a torch path everywhere (debugging, or a GPU whose Triton is
broken); ``CLT_CPU_FAST=0`` keeps the CPU fast paths off even where a caller opts in.
"""

from __future__ import annotations

import os

import torch
import triton

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# The dtype admission table: the floating dtypes each op's kernels take (they compute in fp32).
# float64 (references, gradcheck) never runs a kernel. The decode's kernels store their output in
# W_dec's dtype and were only checked in fp32 / bf16.
TRITON_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "encode_topk": (F32, BF16, F16),
    "batchtopk": (F32, BF16, F16),
    "jumprelu": (F32, BF16, F16),
    "decode": (F32, BF16),
    "molt": (F32, BF16, F16),
}


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def torch_forced() -> bool:
    return os.environ.get("CLT_FORCE_TORCH", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when Triton may run on these tensors' devices (dtype aside)."""
    if torch_forced():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_on() and all(t.device.type == "cpu" for t in tensors)


def triton_ok(op: str, *floats: torch.Tensor, others: tuple[torch.Tensor, ...] = ()) -> bool:
    """True when ``op``'s kernels run: devices allow Triton and every tensor of ``floats`` has a
    dtype of ``TRITON_DTYPES[op]`` (``others``, e.g. indices, only count for the device)."""
    return use_triton(*floats, *others) and all(t.dtype in TRITON_DTYPES[op] for t in floats)


class cpu_fast_paths:
    """Turn the CPU performance paths (``kernels/cpu/``) on or off; off by default, so that a user
    of these ops gets each op's torch specification; ``train.py`` and the ``clt`` tools opt in.

    Off, every op off Triton runs its torch specification: slower on a CPU, same results up to
    rounding and the order of equal-valued slots. ``CLT_CPU_FAST=0`` in the environment keeps
    them off whatever a caller asks. Works as a call and as a context manager::

        kernels.cpu_fast_paths(True)           # from now on
        with kernels.cpu_fast_paths(False):    # in this block only
            ...
    """

    _enabled: bool = False

    def __init__(self, enabled: bool) -> None:
        self.prev = cpu_fast_paths._enabled
        cpu_fast_paths._enabled = bool(enabled) and os.environ.get("CLT_CPU_FAST") != "0"

    def __enter__(self) -> cpu_fast_paths:
        return self

    def __exit__(self, *exc) -> None:
        cpu_fast_paths._enabled = self.prev

    @staticmethod
    def enabled() -> bool:
        return cpu_fast_paths._enabled


def pick_path(op: str, *floats: torch.Tensor, others: tuple[torch.Tensor, ...] = ()) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"`` for one call of ``op`` (see the module docstring)."""
    if triton_ok(op, *floats, others=others):
        return "triton"
    return "cpu" if cpu_fast_paths.enabled() else "torch"


# ------------------------------------------------------------------------------------------------
# block sizes
# ------------------------------------------------------------------------------------------------


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return triton.next_power_of_2(max(n, 1))


def fit_block(cap: int, n: int, floor: int = 1) -> int:
    """A block size for an axis of ``n``: ``cap``, shrunk to the power of two covering ``n``, not
    below ``floor`` (16 where the axis enters a ``tl.dot``, whose operands need 16)."""
    return min(cap, max(floor, next_pow2(n)))


def on_gpu(t: torch.Tensor) -> bool:
    """Production (GPU) tiles for ``t``: on CUDA, or compiled without the interpreter. Under the
    interpreter every tile is numpy calls, so the ops use small tiles there."""
    return t.is_cuda or not interpreter_on()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 inputs use TF32 only where torch's own matmul would
    (``allow_tf32``), so kernels agree with the torch path; bf16 / fp16 run on tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
