"""Fixtures of the op tests."""

import pytest

import kernels


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
