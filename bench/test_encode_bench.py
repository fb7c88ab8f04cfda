"""Encode-side kernels: fused encode + TopK (fwd, bwd, fwd+bwd), exact BatchTopK selection and
JumpReLU fwd+bwd, each against its torch path and a dense baseline.

    cd /work/main && .venv/bin/python -m pytest bench/test_encode_bench.py

Impls per group: ``triton`` (CUDA only; the interpreter is far too slow to time, so it is skipped
on CPU), ``torch`` (the op's torch path, forced with ``impl="torch"`` / ``CLT_FORCE_TORCH``) and
``dense`` (bmm + topk + a dense ``[L, N, F]`` backward, or ``torch.topk`` on the flattened batch).
GPU shape L=12, d_in=768, F=16384, k=16, N=8192; a small CPU shape otherwise. ``extra_info``
holds TFLOP/s (encode) or GB/s (selection, JumpReLU) and ``dense / impl`` ratios from this run.
"""

from __future__ import annotations

import importlib
import platform
from types import SimpleNamespace

import pytest
import torch
import triton

from kernels import encode_topk

btk, jr = (importlib.import_module(f"kernels.{m}") for m in ("batchtopk", "jumprelu"))

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    L, N, D_IN, F, K = 12, 8192, 768, 16384, 16
else:
    L, N, D_IN, F, K = 2, 512, 128, 2048, 16
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 5
EPS = 0.1
ENC_FLOP = 2 * L * N * D_IN * F
# sparse backward: grad_x and grad_W_enc each k gathered rows of d_in per (layer, token)
SPARSE_BWD_FLOP = 2 * 2 * L * N * K * D_IN
FLOP = {
    "encode-fwd": dict(triton=ENC_FLOP, torch=ENC_FLOP, dense=ENC_FLOP),
    "encode-bwd": dict(triton=SPARSE_BWD_FLOP, torch=SPARSE_BWD_FLOP, dense=2 * ENC_FLOP),
    "encode-fwd+bwd": dict(triton=ENC_FLOP + SPARSE_BWD_FLOP, torch=ENC_FLOP + SPARSE_BWD_FLOP,
                           dense=3 * ENC_FLOP),
}
_RESULTS: dict[str, dict[str, float]] = {}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def p() -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, DTYPE).requires_grad_(True)

    ns = SimpleNamespace(x=randn(L, N, D_IN), W=randn(L, D_IN, F, scale=D_IN**-0.5),
                         b=randn(L, F, scale=0.1))
    ns.g_codes = torch.randn(L, N, K, generator=gen).to(DEVICE, DTYPE)
    ns.g_dense = torch.randn(L, N, F, generator=gen).to(DEVICE, DTYPE)
    ns.pre = torch.randn(L, N, F, generator=gen).to(DEVICE, DTYPE)
    ns.log_theta = torch.full((L, F), -0.5, device=DEVICE).requires_grad_(True)
    return ns


def _skip_triton(impl: str) -> None:
    if impl == "triton" and not CUDA:
        pytest.skip("Triton kernels are timed on CUDA only (the interpreter is not a benchmark)")


def _record(benchmark, group: str, impl: str, fn, setup=None, work=None, unit="tflop") -> None:
    benchmark.group = group
    info = benchmark.extra_info
    info.update(impl=impl, shape=dict(L=L, N=N, d_in=D_IN, F=F, k=K), dtype=str(DTYPE),
                device=torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton.__version__)

    def call():
        fn()
        _sync()

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if CUDA:
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    _RESULTS.setdefault(group, {})[impl] = median
    if work is not None:
        info["tflop_per_s" if unit == "tflop" else "gb_per_s"] = work / median / (
            1e12 if unit == "tflop" else 1e9)
    dense = _RESULTS[group].get("dense")
    if dense is not None and impl != "dense":
        info["dense_over_impl"] = dense / median


def _encode(impl: str, p):
    if impl == "dense":
        pre = torch.baddbmm(p.b.unsqueeze(1), p.x, p.W)  # [L, N, F]
        values, indices = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return encode_topk(p.x, p.W, p.b, K, impl="fused" if impl == "triton" else "torch")[0]


def _clear(p):
    for t in (p.x, p.W, p.b, p.log_theta):
        t.grad = None


# dense first in each group so the ratios of the others can be recorded
ENC_IMPLS = pytest.mark.parametrize("impl", ["dense", "torch", "triton"])


@ENC_IMPLS
def test_encode_fwd(benchmark, p, impl):
    _skip_triton(impl)
    with torch.no_grad():
        _record(benchmark, "encode-fwd", impl, lambda: _encode(impl, p),
                work=FLOP["encode-fwd"][impl])


@ENC_IMPLS
def test_encode_bwd(benchmark, p, impl):
    _skip_triton(impl)
    state = {}
    grad = p.g_dense if impl == "dense" else p.g_codes

    def setup():
        _clear(p)
        state["out"] = _encode(impl, p)

    _record(benchmark, "encode-bwd", impl, lambda: state["out"].backward(grad), setup=setup,
            work=FLOP["encode-bwd"][impl])


@ENC_IMPLS
def test_encode_fwd_bwd(benchmark, p, impl):
    _skip_triton(impl)
    grad = p.g_dense if impl == "dense" else p.g_codes
    _record(benchmark, "encode-fwd+bwd", impl, lambda: _encode(impl, p).backward(grad),
            setup=lambda: _clear(p), work=FLOP["encode-fwd+bwd"][impl])


@pytest.mark.parametrize("impl", ["dense", "torch", "triton"])
def test_batchtopk_select(benchmark, p, impl):
    """Per-layer exact selection of N*k winners; ``dense`` is ``torch.topk`` on each flattened
    layer (values only, no tie rule), ``torch`` the op's torch path."""
    _skip_triton(impl)
    pre = p.pre.detach()
    m = N * K
    fns = {
        "dense": lambda: torch.topk(pre.view(L, -1), m, dim=1, sorted=False),
        "torch": lambda: [btk._torch_topk_mask(pre[i].flatten(), m) for i in range(L)],
        "triton": lambda: btk.select_mask(pre.view(L, -1), m),
    }
    _record(benchmark, "batchtopk-select", impl, fns[impl], work=pre.numel() * pre.element_size(),
            unit="gb")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_jumprelu_fwd_bwd(benchmark, p, impl, monkeypatch):
    """JumpReLU forward + backward (pre and log_theta); GB/s counts pre, a, grad_a, grad_pre."""
    _skip_triton(impl)
    if impl == "torch":
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    pre = p.pre.detach().requires_grad_(True)

    def fn():
        jr.jumprelu(pre, p.log_theta, EPS).backward(p.pre)

    def setup():
        pre.grad = None
        p.log_theta.grad = None

    _record(benchmark, "jumprelu-fwd+bwd", impl, fn, setup=setup,
            work=4 * pre.numel() * pre.element_size(), unit="gb")
    if impl == "torch":
        monkeypatch.delenv("CLT_FORCE_TORCH")


def test_triton_and_torch_agree(p):
    """Benchmark only what is correct: on CUDA the fused op selects what the torch path does."""
    if not CUDA:
        pytest.skip("CUDA only")
    with torch.no_grad():
        _, i_t = encode_topk(p.x, p.W, p.b, K, impl="fused")
        _, i_r = encode_topk(p.x.float(), p.W.float(), p.b.float(), K, impl="torch")
    agree = (i_t.sort(-1).values == i_r.sort(-1).values).float().mean().item()
    assert agree > 0.99, agree  # bf16 GEMM rounding may swap near-ties at the cut
