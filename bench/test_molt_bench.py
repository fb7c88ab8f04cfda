"""MOLT: the sparse op (torch path; Triton on CUDA) against the dense loop over all transforms.

    .venv/bin/python -m pytest bench/test_molt_bench.py

``dense`` applies every transform to every token and weighs it by the dense ``[L, N, T]`` gate,
in its strongest form: two GEMMs per rank group (``x @ [V_1; ...; V_T]^T``, scaled by the gate,
then ``@ [U_1 ... U_T]^T``), what a trainer without the sparse op does. ``torch`` is
:func:`kernels.molt_apply` on the torch path (the CPU path: one pair of GEMMs per active
transform over its gathered tokens), ``triton`` the kernels (CUDA only; the interpreter is for
tests). Modes ``fwd`` and ``fwd+bwd`` (gradients of x, the gate values, every U and V).

Shapes: CPU one layer, d=576 (SmolLM2), ranks (128, 64, 32) x counts (8, 16, 32), N=1024, K=8;
GPU one layer, d=768 (GPT-2 small), ranks (512, ..., 32) x counts (16, ..., 256) (T=496),
N=4096, K=16. ``extra_info`` holds the FLOPs each form does and ``dense_over_ours``; the
terminal summary prints ``dense / ours`` from the medians and mins of this run.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from _bench import CUDA, DEVICE, run_info, sync

from kernels import molt_apply
from kernels.molt import molt_apply_torch

if CUDA:
    L, N, D, K = 1, 4096, 768, 16
    GROUPS = [(512, 16), (256, 32), (128, 64), (64, 128), (32, 256)]
else:
    L, N, D, K = 1, 1024, 576, 8
    GROUPS = [(128, 8), (64, 16), (32, 32)]
T = sum(c for _, c in GROUPS)
ROUNDS = 10 if CUDA else 5
IMPLS = ["dense", "torch", "triton"]  # dense first: the others divide by it
SHORT = {"fwd": "fwd", "fwd+bwd": "f+b"}
# forward FMAs: dense runs every transform on every token, sparse K transforms per token (gate
# uniform over transforms, so a group gets K * T_g / T of the slots)
FLOPS = {
    "dense": 2 * L * N * sum(c * r * 2 * D for r, c in GROUPS),
    "sparse": 2 * L * N * K * sum(c * r * 2 * D for r, c in GROUPS) / T,
}

_SEEN: dict[str, dict[str, tuple[float, float]]] = {}


@pytest.fixture(scope="module")
def problem() -> SimpleNamespace:
    """One batch: inputs, TopK-like gate codes (K distinct transforms per token), weights at the
    model's init scale, and the same gate as a dense ``[L, N, T]`` tensor."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    p = SimpleNamespace()
    p.x = torch.randn(L, N, D, generator=gen, device=DEVICE).requires_grad_(True)
    scores = torch.rand(L, N, T, generator=gen, device=DEVICE)
    p.indices = scores.topk(K, dim=-1).indices.to(torch.int32)
    p.values = torch.rand(L, N, K, generator=gen, device=DEVICE).requires_grad_(True)
    p.Us = [(torch.rand(L, c, D, r, generator=gen, device=DEVICE) - 0.5).mul_(2 / (r * D) ** 0.5)
            .requires_grad_(True) for r, c in GROUPS]
    p.Vs = [(torch.rand(L, c, r, D, generator=gen, device=DEVICE) - 0.5).mul_(2 / D**0.5)
            .requires_grad_(True) for r, c in GROUPS]
    gate = torch.zeros(L, N, T, device=DEVICE).scatter_add_(-1, p.indices.long(), p.values.detach())
    p.gate = gate.requires_grad_(True)
    p.grad_out = torch.randn(L, N, D, generator=gen, device=DEVICE)
    return p


def dense_molt(x, gate, Us, Vs):
    """Every transform on every token, weighed by the dense gate: two GEMMs per rank group."""
    out, o = 0, 0
    for U, V in zip(Us, Vs, strict=True):
        T_g, r = U.shape[1], U.shape[3]
        h = torch.bmm(x, V.reshape(L, T_g * r, D).transpose(1, 2))  # [L, N, T_g * r]
        h = (h.view(L, N, T_g, r) * gate[:, :, o : o + T_g, None]).view(L, N, T_g * r)
        out = out + torch.bmm(h, U.transpose(2, 3).reshape(L, T_g * r, D))
        o += T_g
    return out


def forward_fn(p: SimpleNamespace, impl: str):
    if impl == "dense":
        return lambda: dense_molt(p.x, p.gate, p.Us, p.Vs)
    if impl == "torch":
        if CUDA:  # the torch path on CUDA tensors: through the public op with Triton forced off
            return lambda: _forced_torch(p)
        return lambda: molt_apply(p.x, p.values, p.indices, p.Us, p.Vs, zero_slot_grad=False)
    return lambda: molt_apply(p.x, p.values, p.indices, p.Us, p.Vs, zero_slot_grad=False)


def _forced_torch(p):
    os.environ["CLT_FORCE_TORCH"] = "1"
    try:
        return molt_apply(p.x, p.values, p.indices, p.Us, p.Vs, zero_slot_grad=False)
    finally:
        del os.environ["CLT_FORCE_TORCH"]


def _leaves(p, impl):
    return [p.x, p.gate if impl == "dense" else p.values, *p.Us, *p.Vs]


def test_impls_agree(problem):
    """Benchmark only what is correct: output and every gradient of each form at this shape."""
    p = problem
    impls = IMPLS if CUDA else IMPLS[:2]
    results = {}
    for impl in impls:
        out = forward_fn(p, impl)()
        grads = list(torch.autograd.grad(out, _leaves(p, impl), p.grad_out))
        if impl == "dense":  # the dense gate's gradient at the codes' slots
            grads[1] = grads[1].gather(-1, p.indices.long())
        results[impl] = [out.detach(), *grads]
    with torch.no_grad():
        spec = molt_apply_torch(p.x, p.values, p.indices, p.Us, p.Vs)
    torch.testing.assert_close(spec, results["dense"][0], rtol=1e-4, atol=1e-4)
    for impl in impls[1:]:
        for i, (a, b) in enumerate(zip(results[impl], results["dense"], strict=True)):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=f"{impl} tensor {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_molt(benchmark, timings, problem, mode, impl):
    if impl == "triton" and not CUDA:
        pytest.skip("Triton rows need CUDA (the interpreter is for tests, not timings)")
    p = problem
    fwd = forward_fn(p, impl)
    leaves = _leaves(p, impl)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                fwd()
        else:
            torch.autograd.grad(fwd(), leaves, p.grad_out)
        sync()

    benchmark.group = f"molt-{mode}"
    info = benchmark.extra_info
    info.update(
        impl=impl,
        shape=dict(L=L, N=N, d=D, K=K, groups=GROUPS),
        **run_info(),
        fwd_flops=FLOPS["dense" if impl == "dense" else "sparse"],
    )
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
    if CUDA:
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    median, fastest = benchmark.stats.stats.median, benchmark.stats.stats.min
    seen = _SEEN.setdefault(mode, {})
    seen[impl] = (median, fastest)
    if impl != "dense" and "dense" in seen:
        info["dense_over_ours"] = seen["dense"][0] / median
        # the shared summary of bench/conftest.py prints dense / "sparse" per group
        name = f"molt {SHORT[mode]} {impl}"
        timings[name] = {"dense": seen["dense"], "sparse": (median, fastest)}
