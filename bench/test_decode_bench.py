"""Sparse crosslayer decode: the Triton kernels, the torch sparse path and a dense baseline.

    .venv/bin/python -m pytest bench/test_decode_bench.py

Modes ``fwd``, ``bwd`` (backward of a forward done outside the timer) and ``fwd+bwd``, each for
``dense`` (one GEMM per source over all F features of a ``[L, N, F]`` activation, what earlier
trainers do), ``torch`` (the CPU path of :mod:`kernels.cpu.decode`), and on CUDA
``triton`` (deterministic decoder gradient, the default) and ``triton-atomic``. Shapes: a
GPT-2-small CLT on GPU (L=12, d_out=768, F=8192, k=16, N=4096), on CPU L=6, d_out=256,
F=2048, k=16, N=512 (the file then takes ~40 s). The Triton
rows are skipped without CUDA (the interpreter is for tests, not timings).

``extra_info`` holds the effective GB/s (bytes of the active decoder rows the mode touches plus
the activations it writes / reads, see ``BYTES``) and ``dense_over_ours``; the terminal summary
prints ``dense / ours`` per (mode, impl) from medians and mins of this run (shared CPUs are noisy:
only ratios within one run mean anything).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _bench import CUDA, DEVICE, run_info, sync

from kernels import DecoderLayout, sparse_decode
from kernels.decode import SparseDecodeFunction

if CUDA:
    L, N, D_OUT, F, K = 12, 4096, 768, 8192, 16
else:
    L, N, D_OUT, F, K = 6, 512, 256, 2048, 16
LAYOUT = DecoderLayout(L, F, reach=L)  # CLT
PAIRS = sum(LAYOUT.reach_of(s) for s in range(L))  # (source, target) pairs: L(L+1)/2
ROUNDS = 10 if CUDA else 4
FP32 = 4  # bytes

# forward: every active (token, slot, target) row read once, the output written once;
# backward: the rows read again (grad values) and the gradient rows written (grad W), grad_out
# read; the dense baseline is charged the same useful bytes (its ratio is what matters)
ROW_BYTES = N * K * PAIRS * D_OUT * FP32
ACT_BYTES = L * N * D_OUT * FP32
BYTES = {
    "fwd": ROW_BYTES + ACT_BYTES,
    "bwd": 2 * ROW_BYTES + ACT_BYTES,
    "fwd+bwd": 3 * ROW_BYTES + 2 * ACT_BYTES,
}
IMPLS = ["dense", "torch", "triton", "triton-atomic"]  # dense first: the others divide by it
# names in the shared terminal summary (16 columns)
SHORT = {"fwd": "fwd", "bwd": "bwd", "fwd+bwd": "f+b", "torch": "torch", "triton": "triton",
         "triton-atomic": "atomic"}

# mode -> impl -> (median, min) seconds, for dense_over_ours
_SEEN: dict[str, dict[str, tuple[float, float]]] = {}


@pytest.fixture(scope="module")
def problem() -> SimpleNamespace:
    """One TopK CLT batch: codes, decoder, upstream gradient, and the dense activation."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    p = SimpleNamespace()
    p.indices = torch.randint(0, F, (L, N, K), generator=gen, device=DEVICE, dtype=torch.int32)
    p.values = torch.rand(L, N, K, generator=gen, device=DEVICE).requires_grad_(True)
    W = torch.randn(LAYOUT.n_rows, D_OUT, generator=gen, device=DEVICE) * (L * D_OUT) ** -0.5
    p.W_dec = W.requires_grad_(True)
    p.b_dec = torch.zeros(L, D_OUT, device=DEVICE, requires_grad=True)
    p.grad_out = torch.randn(L, N, D_OUT, generator=gen, device=DEVICE)
    # [L, N, F]: what a dense-decoding trainer holds for the same codes
    dense = torch.zeros(L, N, F, device=DEVICE)
    dense.scatter_add_(-1, p.indices.long(), p.values.detach())
    p.acts = dense.requires_grad_(True)
    return p


def dense_decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``[L, N, F]`` activations, one GEMM per source over all F features against its whole
    ``[F, R_s * d_out]`` block (the strongest dense form: L GEMMs, not L(L+1)/2 thin ones)."""
    outs = [b_dec[t].expand(N, D_OUT) for t in range(L)]
    for s in range(L):
        R_s = LAYOUT.reach_of(s)
        # [N, R_s, d_out]
        write = (acts[s] @ LAYOUT.source_view(W_dec, s).view(F, R_s * D_OUT)).view(N, R_s, D_OUT)
        for r in range(R_s):
            outs[s + r] = outs[s + r] + write[:, r]
    return torch.stack(outs)


def forward_fn(p: SimpleNamespace, impl: str):
    if impl == "dense":
        return lambda: dense_decode(p.acts, p.W_dec, p.b_dec)
    if impl == "torch":
        # the CPU path (kernels.cpu.decode) through the op's autograd Function, kernels off
        return lambda: SparseDecodeFunction.apply(p.W_dec, LAYOUT, True, False, True, p.values,
                                                  p.indices, p.b_dec)[0]
    det = impl == "triton"
    return lambda: sparse_decode(p.values, p.indices, p.W_dec, p.b_dec, LAYOUT, deterministic=det)


def test_impls_agree(problem):
    """Benchmark only what is correct: every implementation, output and gradients, at this shape."""
    p = problem
    impls = IMPLS if CUDA else IMPLS[:2]
    results = {}
    for impl in impls:
        p.acts.grad = p.values.grad = p.W_dec.grad = None
        out = forward_fn(p, impl)()
        out.backward(p.grad_out)
        # grad of the codes: the dense one gathered at the codes' feature ids
        g_codes = (p.acts.grad.gather(-1, p.indices.long()) if impl == "dense"
                   else p.values.grad)
        results[impl] = [out.detach(), g_codes, p.W_dec.grad]
    for impl in impls[1:]:
        for name, a, b in zip(["out", "grad values", "grad W_dec"], results[impl],
                              results["dense"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{impl} {name}")
    p.acts.grad = p.values.grad = p.W_dec.grad = None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_decode(benchmark, timings, problem, mode, impl):
    if impl.startswith("triton") and not CUDA:
        pytest.skip("Triton rows need CUDA (the interpreter is for tests, not timings)")
    if impl == "triton-atomic" and mode == "fwd":
        pytest.skip("the same forward kernel as triton")
    p = problem
    fwd = forward_fn(p, impl)
    leaves = [p.acts if impl == "dense" else p.values, p.W_dec, p.b_dec]

    def setup():
        for leaf in leaves:
            leaf.grad = None
        # bwd: the forward runs here, outside the timer
        return ((fwd(),) if mode == "bwd" else ()), {}

    def call(out=None):
        if mode == "fwd":
            with torch.no_grad():
                fwd()
        elif mode == "bwd":
            out.backward(p.grad_out)
        else:
            fwd().backward(p.grad_out)
        sync()

    benchmark.group = f"decode-{mode}"
    info = benchmark.extra_info
    info.update(
        impl=impl,
        shape=dict(L=L, N=N, d_out=D_OUT, F=F, k=K, reach=LAYOUT.reach),
        **run_info(),
        bytes=BYTES[mode],
    )
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    if CUDA:
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    median, fastest = benchmark.stats.stats.median, benchmark.stats.stats.min
    info["gb_per_s"] = BYTES[mode] / median / 1e9
    seen = _SEEN.setdefault(mode, {})
    seen[impl] = (median, fastest)
    if impl != "dense" and "dense" in seen:
        info["dense_over_ours"] = seen["dense"][0] / median
        # the shared summary of bench/conftest.py prints dense / "sparse" per group
        name = f"dec {SHORT[mode]} {SHORT[impl]}"
        timings[name] = {"dense": seen["dense"], "sparse": (median, fastest)}
