"""The one place that chooses between a Triton kernel and its torch path.

Triton runs when the tensors are on CUDA, or on CPU tensors when the Triton interpreter is on
(``TRITON_INTERPRET=1``, how the test suite runs kernels without a GPU). ``CLT_FORCE_TORCH=1``
forces the torch path everywhere (debugging, or a GPU whose Triton is broken).
"""

from __future__ import annotations

import os

import torch


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def torch_forced() -> bool:
    return os.environ.get("CLT_FORCE_TORCH", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors."""
    if torch_forced():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_on() and all(t.device.type == "cpu" for t in tensors)
