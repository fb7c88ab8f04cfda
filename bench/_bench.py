"""What every benchmark file shares: the device, a synchronising barrier and the run facts that
go into each benchmark's ``extra_info`` (imported by name: ``bench/`` is on ``sys.path``)."""

import os
import platform

import torch
import triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync() -> None:
    """Wait for queued GPU work, so a timed call ends when its kernels end."""
    if CUDA:
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu"


def run_info() -> dict:
    """Device, thread counts and versions of this run, for ``benchmark.extra_info``."""
    return dict(device=device_name(), threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                torch=torch.__version__, triton=triton.__version__)
