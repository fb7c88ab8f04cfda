"""Shared test setup: offline, CPU-friendly, deterministic.

``TRITON_INTERPRET`` must be set before anything imports triton: Triton kernels then run on CPU
tensors through the interpreter (tiny shapes only).
"""

import os
import random

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402  (after the environment: torch may pull in triton)

torch.set_num_threads(1)  # tiny shapes: threads only add overhead (8x slower on a busy machine)

import kernels  # noqa: E402

# the ops run as train.py runs them: the CPU performance paths on (the op tests pick each path)
kernels.cpu_fast_paths(True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def poison():
    """``poison(shape, dtype, device)``: an output buffer whose unwritten elements fail loudly.

    Pass it where a kernel would use ``torch.empty``: floats are NaN, integers -1 (an invalid
    feature id), so a row a sparse kernel forgot to write cannot pass a comparison.
    """

    def make(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    return make


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
