"""Sparse ops against the dense baseline of earlier trainers, at a CPU-sized TopK CLT shape.

    .venv/bin/python -m pytest bench

Groups put the two implementations side by side: ``decode-fwd``, ``decode-fwd+bwd``,
``encode-fwd``, ``encode-fwd+bwd``, each with ``sparse`` (the public op, whatever path it
dispatches to) and ``dense`` (what earlier trainers do). The terminal summary prints
``dense / sparse`` from medians (and mins) measured in this run; absolute times on shared CPUs
are noise.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _bench import CUDA, DEVICE, run_info, sync

from kernels import DecoderLayout, encode_topk, sparse_decode

L, N, D_IN, D_OUT, F, K = 6, 1024, 256, 256, 2048, 16
LAYOUT = DecoderLayout(L, F, reach=L)  # CLT
PAIRS = sum(LAYOUT.reach_of(s) for s in range(L))  # (source, target) pairs: L(L+1)/2 = 21
ROUNDS = 7
FP32 = 4  # bytes

# Arithmetic of each (group, impl), for GFLOP/s, and the sparse decode's gathered bytes, for GB/s
DECODE_FWD_FLOP = {"sparse": 2 * N * K * PAIRS * D_OUT, "dense": 2 * N * F * PAIRS * D_OUT}
ENCODE_FWD_FLOP = 2 * L * N * D_IN * F
FLOP = {
    "decode-fwd": DECODE_FWD_FLOP,
    # backward: one product for the activation gradient, one for the decoder gradient
    "decode-fwd+bwd": {impl: 3 * flop for impl, flop in DECODE_FWD_FLOP.items()},
    "encode-fwd": {"sparse": ENCODE_FWD_FLOP, "dense": ENCODE_FWD_FLOP},
    "encode-fwd+bwd": {
        "sparse": ENCODE_FWD_FLOP + 2 * 2 * L * N * K * D_IN,
        "dense": 3 * ENCODE_FWD_FLOP,
    },
}
DECODE_ROW_BYTES = N * K * PAIRS * D_OUT * FP32  # decoder rows read by one sparse decode


@pytest.fixture(scope="module")
def problem() -> SimpleNamespace:
    """One TopK CLT batch: inputs, parameters, its codes and the dense activation they stand for."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=gen) * scale).to(DEVICE)
        return t.requires_grad_(grad)

    p = SimpleNamespace(
        x=randn(L, N, D_IN),
        W_enc=randn(L, D_IN, F, scale=F**-0.5),
        b_enc=randn(L, F, scale=0.0),
        W_dec=randn(LAYOUT.n_rows, D_OUT, scale=(L * D_OUT) ** -0.5),
        b_dec=randn(L, D_OUT, scale=0.0),
    )
    with torch.no_grad():
        pre_values, indices = encode_topk(p.x, p.W_enc, p.b_enc, K)
    p.indices = indices
    p.values = pre_values.relu().requires_grad_(True)  # [L, N, K]
    # [L, N, F]: what a dense-decoding trainer holds for the same codes
    dense = torch.zeros(L, N, F, device=DEVICE).scatter(-1, indices, p.values.detach())
    p.acts = dense.requires_grad_(True)
    p.grad_out = randn(L, N, D_OUT, grad=False)
    p.grad_codes = randn(L, N, K, grad=False)
    p.grad_dense = randn(L, N, F, grad=False)
    return p


def dense_decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Dense crosslayer decode: ``[L, N, F]`` activations, one GEMM per (source, target) with
    the source's ``[F, R_s, d_out]`` block (a strided ``[F, d_out]`` slice, no copy)."""
    outs = [b_dec[t].expand(N, D_OUT) for t in range(L)]
    for s in range(L):
        W_s = LAYOUT.source_view(W_dec, s)
        for r in range(W_s.shape[1]):
            outs[s + r] = outs[s + r] + acts[s] @ W_s[:, r]
    return torch.stack(outs)


def dense_encode(x, W_enc, b_enc) -> torch.Tensor:
    """Dense TopK encoder: ``[L, N, F]`` pre-activations, top-k, scattered back into a dense
    ``[L, N, F]`` activation (whose backward is two more dense GEMMs)."""
    pre = torch.baddbmm(b_enc.unsqueeze(1), x, W_enc)
    values, indices = pre.topk(K, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def run(benchmark, timings, group: str, impl: str, fn, params) -> None:
    """Time ``fn`` (gradients of ``params`` cleared before each round) and record the result."""

    def setup():
        for param in params:
            param.grad = None

    def call():
        fn()
        sync()

    benchmark.group = group
    info = benchmark.extra_info
    info.update(
        impl=impl,
        shape=dict(L=L, N=N, d_in=D_IN, d_out=D_OUT, F=F, k=K, reach=LAYOUT.reach),
        **run_info(),
        flop=FLOP[group][impl],
    )
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if CUDA:
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    median = benchmark.stats.stats.median
    timings.setdefault(group, {})[impl] = (median, benchmark.stats.stats.min)
    info["gflop_per_s"] = FLOP[group][impl] / median / 1e9
    if group.startswith("decode") and impl == "sparse":
        info["decoder_row_gb_per_s"] = DECODE_ROW_BYTES / median / 1e9


IMPLS = pytest.mark.parametrize("impl", ["sparse", "dense"])


def test_sparse_and_dense_agree(problem):
    """The two sides of each group compute the same thing (benchmark only what is correct)."""
    p = problem
    with torch.no_grad():
        sparse = sparse_decode(p.values, p.indices, p.W_dec, p.b_dec, LAYOUT)
        torch.testing.assert_close(sparse, dense_decode(p.acts, p.W_dec, p.b_dec))
        values, indices = encode_topk(p.x, p.W_enc, p.b_enc, K)
        dense = torch.zeros(L, N, F, device=DEVICE).scatter(-1, indices, values.relu())
        torch.testing.assert_close(dense, dense_encode(p.x, p.W_enc, p.b_enc))


@IMPLS
def test_decode_fwd(benchmark, timings, problem, impl):
    p = problem
    fns = {
        "sparse": lambda: sparse_decode(p.values, p.indices, p.W_dec, p.b_dec, LAYOUT),
        "dense": lambda: dense_decode(p.acts, p.W_dec, p.b_dec),
    }
    run(benchmark, timings, "decode-fwd", impl, fns[impl], [])


@IMPLS
def test_decode_fwd_bwd(benchmark, timings, problem, impl):
    p = problem
    fns = {
        "sparse": lambda: sparse_decode(p.values, p.indices, p.W_dec, p.b_dec, LAYOUT).backward(
            p.grad_out
        ),
        "dense": lambda: dense_decode(p.acts, p.W_dec, p.b_dec).backward(p.grad_out),
    }
    acts = p.values if impl == "sparse" else p.acts
    run(benchmark, timings, "decode-fwd+bwd", impl, fns[impl], [acts, p.W_dec, p.b_dec])


@IMPLS
def test_encode_fwd(benchmark, timings, problem, impl):
    p = problem
    fns = {
        "sparse": lambda: encode_topk(p.x, p.W_enc, p.b_enc, K),
        "dense": lambda: dense_encode(p.x, p.W_enc, p.b_enc),
    }
    run(benchmark, timings, "encode-fwd", impl, fns[impl], [])


@IMPLS
def test_encode_fwd_bwd(benchmark, timings, problem, impl):
    p = problem
    fns = {
        # upstream gradient of the relu'd codes [L, N, k] vs of the dense activation [L, N, F]
        "sparse": lambda: encode_topk(p.x, p.W_enc, p.b_enc, K)[0].relu().backward(p.grad_codes),
        "dense": lambda: dense_encode(p.x, p.W_enc, p.b_enc).backward(p.grad_dense),
    }
    run(benchmark, timings, "encode-fwd+bwd", impl, fns[impl], [p.x, p.W_enc, p.b_enc])
