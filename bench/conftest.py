"""Benchmark setup: fixed thread count, and a summary of ``dense / sparse`` ratios per group.

CPU machines here are shared and noisy, so only ratios measured in the same run mean anything:
every benchmark stores its median and min under (group, impl) and the terminal summary divides
them (the min is the least disturbed by other processes; the median is pytest-benchmark's figure).

``CLT_BENCH_SMOKE=1`` (``make bench-smoke``, run by CI) times every benchmark once, without warmup:
the numbers mean nothing, but every benchmark and its correctness checks run, so none rots.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402  (after OMP_NUM_THREADS: the thread pool reads it once)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import kernels  # noqa: E402

kernels.cpu_fast_paths(True)  # the benchmarks time the ops as train.py runs them

# group -> impl -> (median, min) seconds, filled by the users of the ``timings`` fixture
_TIMINGS: dict[str, dict[str, tuple[float, float]]] = {}


SMOKE = os.environ.get("CLT_BENCH_SMOKE", "0") == "1"


@pytest.fixture
def benchmark(benchmark):
    """pytest-benchmark's fixture; in smoke mode ``pedantic`` runs one round, no warmup."""
    if SMOKE:
        pedantic = benchmark.pedantic

        def once(target, args=(), kwargs=None, setup=None, **_):
            return pedantic(target, args=args, kwargs=kwargs, setup=setup, rounds=1,
                            warmup_rounds=0, iterations=1)

        benchmark.pedantic = once
    return benchmark


@pytest.fixture
def timings() -> dict[str, dict[str, tuple[float, float]]]:
    return _TIMINGS


def pytest_terminal_summary(terminalreporter) -> None:
    if not _TIMINGS:
        return
    tr = terminalreporter
    tr.write_sep("-", f"dense / sparse, same run, {torch.get_num_threads()} threads")
    tr.write_line(f"{'group':<16}{'dense ms':>10}{'sparse ms':>11}{'median':>9}{'min':>8}")
    for group, impls in sorted(_TIMINGS.items()):
        if "dense" in impls and "sparse" in impls:
            (d_med, d_min), (s_med, s_min) = impls["dense"], impls["sparse"]
            tr.write_line(
                f"{group:<16}{d_med * 1e3:10.1f}{s_med * 1e3:11.1f}"
                f"{d_med / s_med:8.2f}x{d_min / s_min:7.2f}x"
            )
