"""Encode-side kernels: encode + each nonlinearity (fwd, fwd+bwd; TopK also bwd alone), exact
BatchTopK selection and JumpReLU fwd+bwd, each against its torch path, a dense baseline and the
floor of the encode: the bare GEMM.

    .venv/bin/python -m pytest bench/test_encode_bench.py

Impls per group: ``triton`` (CUDA only; the interpreter is far too slow to time, so it is skipped
on CPU), ``torch`` (the op's torch path, forced with ``impl="torch"`` / ``CLT_FORCE_TORCH``) and
``dense`` (bmm + topk + a dense ``[L, N, F]`` backward, or ``torch.topk`` on the flattened batch).
The encode groups ``encode-{topk,batchtopk,jumprelu,relu}-{fwd,fwd+bwd}`` time ``encode_topk``
(TopK) or ``CrossLayerTranscoder.pre_activations`` (a ``baddbmm``) + the op (the others; ReLU has
no Triton kernel, its op is the torch ``relu_codes``). JumpReLU and ReLU run at about ``k`` active
features per token (threshold, or a bias shift, at the normal quantile), the regime of a trained
model. The floor is a bare ``torch.bmm`` ``[L, N, d_in] x [L, d_in, F]`` forward (group
``encode-floor``; the module fixture ``floor`` times it once for the ratios).
GPU shape L=12, d_in=768, F=16384, k=16, N=8192; a small CPU shape otherwise. ``extra_info``
holds TFLOP/s (encode) or GB/s (selection, JumpReLU), ``dense_over_impl`` and, for the encode
groups, ``impl_over_floor`` and ``floor_ms``, all from this run; the terminal summary prints the
floor ratios of every encode group.
"""

from __future__ import annotations

import importlib
import math
import time
from types import SimpleNamespace

import pytest
import torch
from _bench import CUDA, DEVICE, run_info, sync

from kernels import encode_topk, relu_codes

btk, jr = (importlib.import_module(f"kernels.{m}") for m in ("batchtopk", "jumprelu"))
cpu_btk = importlib.import_module("kernels.cpu.batchtopk")

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
    "encode-topk-fwd": dict(triton=ENC_FLOP, torch=ENC_FLOP, dense=ENC_FLOP),
    "encode-topk-bwd": dict(triton=SPARSE_BWD_FLOP, torch=SPARSE_BWD_FLOP, dense=2 * ENC_FLOP),
    "encode-topk-fwd+bwd": dict(triton=ENC_FLOP + SPARSE_BWD_FLOP,
                                torch=ENC_FLOP + SPARSE_BWD_FLOP, dense=3 * ENC_FLOP),
}
NONLINEARITIES = ("topk", "batchtopk", "jumprelu", "relu")
PHASES = ("fwd", "fwd+bwd")
# the ``pre`` of the batchtopk / jumprelu / relu paths is a dense baddbmm: its backward is dense
for _nl in NONLINEARITIES[1:]:
    FLOP[f"encode-{_nl}-fwd"] = dict.fromkeys(("triton", "torch", "dense"), ENC_FLOP)
    FLOP[f"encode-{_nl}-fwd+bwd"] = dict.fromkeys(("triton", "torch", "dense"), 3 * ENC_FLOP)
# pre ~ N(0, 1 + 0.1**2): this cut keeps about K of F features per token
SPARSE_CUT = float(torch.special.ndtri(torch.tensor(1 - K / F, dtype=torch.float64))) * math.sqrt(
    1.01)
_RESULTS: dict[str, dict[str, float]] = {}
_FLOOR: dict[str, float] = {}  # "fwd": median seconds of the bare bmm


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
    # encode groups: JumpReLU at threshold SPARSE_CUT, ReLU on pre shifted down by it
    ns.log_theta_enc = torch.full((L, F), math.log(SPARSE_CUT), device=DEVICE).requires_grad_(True)
    ns.b_relu = (ns.b.detach() - SPARSE_CUT).requires_grad_(True)
    return ns


def _median_s(fn, rounds: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="module")
def floor(p) -> float:
    """Median seconds of the encode's floor: a bare ``torch.bmm`` of the same shape (forward)."""
    with torch.no_grad():
        _FLOOR["fwd"] = _median_s(lambda: torch.bmm(p.x, p.W), 2 * ROUNDS + 1)
    return _FLOOR["fwd"]


def _skip_triton(impl: str) -> None:
    if impl == "triton" and not CUDA:
        pytest.skip("Triton kernels are timed on CUDA only (the interpreter is not a benchmark)")


def _record(benchmark, group: str, impl: str, fn, setup=None, work=None, unit="tflop") -> None:
    benchmark.group = group
    info = benchmark.extra_info
    info.update(impl=impl, shape=dict(L=L, N=N, d_in=D_IN, F=F, k=K), dtype=str(DTYPE),
                **run_info())

    def call():
        fn()
        sync()

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
    if group.startswith("encode-") and "fwd" in _FLOOR:
        info["floor_ms"] = _FLOOR["fwd"] * 1e3
        info["impl_over_floor"] = median / _FLOOR["fwd"]


def _encode(impl: str, p):
    if impl == "dense":
        pre = torch.baddbmm(p.b.unsqueeze(1), p.x, p.W)  # [L, N, F]
        values, indices = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return encode_topk(p.x, p.W, p.b, K, impl="fused" if impl == "triton" else "torch")[0]


def _clear(p):
    for t in (p.x, p.W, p.b, p.log_theta, p.log_theta_enc, p.b_relu):
        t.grad = None


def _encode_nl(nl: str, impl: str, p) -> torch.Tensor:
    """Encode + one nonlinearity: codes values (``torch`` / ``triton``) or the dense ``[L, N, F]``
    activation (``dense``), what the caller's backward starts from."""
    if nl == "topk":
        return _encode(impl, p)
    b = p.b_relu if nl == "relu" else p.b
    pre = torch.baddbmm(b.unsqueeze(1), p.x, p.W)  # CrossLayerTranscoder.pre_activations
    if impl == "dense":
        if nl == "batchtopk":  # torch.topk over each flattened layer, no tie rule
            flat = pre.view(L, N * F)
            values, indices = flat.topk(N * K, dim=1, sorted=False)
            return torch.zeros_like(flat).scatter(1, indices, values.relu()).view(L, N, F)
        if nl == "jumprelu":
            return jr.jumprelu(pre, p.log_theta_enc, EPS)  # the dense activation (torch path)
        return pre.relu()
    if nl == "batchtopk":
        return btk.batchtopk(pre, K, "layer")[0]
    if nl == "jumprelu":
        return jr.jumprelu_codes(pre, p.log_theta_enc, EPS)[0]
    return relu_codes(pre)[0]


def _grad_for(out: torch.Tensor, p) -> torch.Tensor:
    if out.shape == (L, N, F):
        return p.g_dense
    if out.shape == (L, N, K):
        return p.g_codes
    return torch.ones_like(out)  # codes with a data-dependent width


# dense first in each group so the ratios of the others can be recorded
ENC_IMPLS = pytest.mark.parametrize("impl", ["dense", "torch", "triton"])


def test_encode_floor(benchmark, p, floor):
    """The bare forward GEMM, the floor every encode is measured against."""
    with torch.no_grad():
        _record(benchmark, "encode-floor", "floor", lambda: torch.bmm(p.x, p.W), work=ENC_FLOP)


@ENC_IMPLS
def test_encode_fwd(benchmark, p, floor, impl):
    _skip_triton(impl)
    with torch.no_grad():
        _record(benchmark, "encode-topk-fwd", impl, lambda: _encode(impl, p),
                work=FLOP["encode-topk-fwd"][impl])


@ENC_IMPLS
def test_encode_bwd(benchmark, p, floor, impl):
    _skip_triton(impl)
    state = {}
    grad = p.g_dense if impl == "dense" else p.g_codes

    def setup():
        _clear(p)
        state["out"] = _encode(impl, p)

    _record(benchmark, "encode-topk-bwd", impl, lambda: state["out"].backward(grad), setup=setup,
            work=FLOP["encode-topk-bwd"][impl])


@ENC_IMPLS
def test_encode_fwd_bwd(benchmark, p, floor, impl):
    _skip_triton(impl)
    grad = p.g_dense if impl == "dense" else p.g_codes
    _record(benchmark, "encode-topk-fwd+bwd", impl, lambda: _encode(impl, p).backward(grad),
            setup=lambda: _clear(p), work=FLOP["encode-topk-fwd+bwd"][impl])


# dense first within each group; ReLU has no Triton kernel
NL_CASES = [
    pytest.param(nl, phase, impl, id=f"{nl}-{phase}-{impl}")
    for nl in NONLINEARITIES[1:]
    for phase in PHASES
    for impl in ("dense", "torch", "triton")
    if not (nl == "relu" and impl == "triton")
]


@pytest.mark.parametrize("nl, phase, impl", NL_CASES)
def test_encode_nonlinearity(benchmark, p, floor, monkeypatch, nl, phase, impl):
    """``pre_activations`` + BatchTopK / JumpReLU / ReLU codes, fwd or fwd+bwd; ``dense`` and
    ``torch`` run with ``CLT_FORCE_TORCH=1``, ``triton`` without."""
    _skip_triton(impl)
    if impl == "triton":
        monkeypatch.delenv("CLT_FORCE_TORCH", raising=False)
    else:
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    group = f"encode-{nl}-{phase}"
    if phase == "fwd":
        def fn():
            with torch.no_grad():
                _encode_nl(nl, impl, p)
    else:
        def fn():
            out = _encode_nl(nl, impl, p)
            out.backward(_grad_for(out, p))
    _record(benchmark, group, impl, fn, setup=(lambda: _clear(p)) if phase != "fwd" else None,
            work=FLOP[group][impl])


@pytest.mark.parametrize("impl", ["dense", "torch", "triton"])
def test_batchtopk_select(benchmark, p, impl):
    """Per-layer exact selection of N*k winners; ``dense`` is ``torch.topk`` on each flattened
    layer (values only, no tie rule), ``torch`` the op's CPU path."""
    _skip_triton(impl)
    pre = p.pre.detach()
    m = N * K
    fns = {
        "dense": lambda: torch.topk(pre.view(L, -1), m, dim=1, sorted=False),
        "torch": lambda: cpu_btk.topk_mask(pre.view(L, -1), m),
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


# ------------------------------------------------------------------------------------------------
# terminal summary: every encode group against the floor
# ------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:8.2f}x" if a is not None and b is not None else f"{'-':>9}"


class _FloorSummary:
    """Prints ``impl / floor`` and ``dense / impl`` (medians of this run) after the session."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        floor_s = _FLOOR.get("fwd")
        rows = [(nl, ph, _RESULTS.get(f"encode-{nl}-{ph}", {}))
                for nl in NONLINEARITIES for ph in PHASES]
        if floor_s is None or not any(r for *_, r in rows):
            return
        tr = terminalreporter
        tr.write_sep("-", f"encode vs the floor (bare bmm fwd {floor_s * 1e3:.2f} ms), medians, "
                          f"L={L} N={N} d_in={D_IN} F={F} k={K} {DTYPE} on {DEVICE}, "
                          f"{torch.get_num_threads()} threads")
        head = ("nonlin", "phase", "dense ms", "torch ms", "triton ms", "dense/fl", "torch/fl",
                "triton/fl", "dense/torch", "dense/triton")
        tr.write_line(f"{head[0]:<10}{head[1]:<8}" + "".join(f"{h:>10}" for h in head[2:5])
                      + "".join(f"{h:>13}" for h in head[5:]))
        for nl, ph, r in rows:
            d, t, g = r.get("dense"), r.get("torch"), r.get("triton")
            ms = "".join(f"{v * 1e3:10.2f}" if v is not None else f"{'-':>10}" for v in (d, t, g))
            ratios = [_ratio(d, floor_s), _ratio(t, floor_s), _ratio(g, floor_s), _ratio(d, t),
                      _ratio(d, g)]
            tr.write_line(f"{nl:<10}{ph:<8}{ms}" + "".join(f"{x:>13}" for x in ratios))


@pytest.fixture(scope="module", autouse=True)
def _floor_summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("encode-floor-summary"):
        manager.register(_FloorSummary(), "encode-floor-summary")
