"""One whole CLT training step (TopK, BatchTopK, JumpReLU): ours, a dense baseline, the floor.

    .venv/bin/python -m pytest bench/test_step.py

A step is forward, every loss term (AuxK with dead features for the TopK family; the tanh
sparsity and pre-activation losses for JumpReLU), backward, the dead-feature counters and one
Adam step (fused on CUDA, as ``clt.trainer.build_optimizer`` builds it). Impls per group
``step-<nonlinearity>``:

- ``sparse`` (ours): ``CrossLayerTranscoder`` + ``compute_losses``, whatever path the ops dispatch
  to (Triton on CUDA, torch on CPU);
- ``dense``: what earlier trainers do with the same parameters: a dense ``[L, N, F]`` activation
  (scatter of the TopK / BatchTopK winners, or the dense JumpReLU), the decoder as a Python loop of
  one einsum per (source, target) over all F features, AuxK as a second dense decode, and the dense
  encoder backward through ``pre``;
- ``floor`` (DESIGN.md, "Performance model"): the library GEMM of the encoder forward plus the
  optimizer step over all parameters, at the same shape; for JumpReLU also the encoder backward
  GEMM (its pre-activation loss keeps a dense encoder backward by nature).

Shapes (``CLT_BENCH_SHAPE`` picks one; fp32 parameters, TF32 only with ``CLT_BENCH_TF32=1``, like
torch's default):

- ``issue-gpu``, the default on CUDA: L=12, d=768, F=16384, k=16, N=8192 (a GPT-2-small CLT);
- ``issue-cpu``: L=12, d=768, F=4096, k=16, N=1024, the issue's CPU shape, where its CPU targets
  apply. The dense baseline alone is ~1.5 TFLOP a step (25-30 s on 2 idle threads here; the
  issue quotes ~12 s), so select a nonlinearity (3-4 minutes for TopK):
  ``CLT_BENCH_SHAPE=issue-cpu .venv/bin/python -m pytest bench/test_step.py -k "topk and not
  batchtopk"``. On a shared machine ours suffers most from other load (its many small parallel
  ops wait on both threads): compare only runs on an idle machine, and two commits with
  ``bench/step_ab.py`` (alternating processes);
- ``quick``, the default on CPU: L=6, d=256, F=2048, k=16, N=512 (the file takes about a minute on
  2 threads);
- ``issue``: ``issue-gpu`` on CUDA, ``issue-cpu`` on CPU.

``DEAD = F // 64`` features per layer are dead, so AuxK runs with ``k_aux = DEAD``.

``test_dense_baseline_matches_ours`` first checks in float64 at a tiny shape that the dense
baseline computes the same loss and gradients as ours, so the ratios compare the same step.
``extra_info`` holds the device, versions, shape, ``peak_mem_gib`` (CUDA ``max_memory_allocated``
of one step, parameters and Adam state included; ``None`` on CPU) and the ratios; the end of the
session prints ``ours / floor`` and ``dense / ours`` (medians, and mins: on shared CPUs only ratios
within one run mean anything).
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from _bench import CUDA, DEVICE, device_name, run_info, sync

import kernels

try:  # clt.model / clt.losses / clt.trainer need only torch and kernels (not pydantic)
    from clt.losses import (
        DEFAULT_AUXK_K,
        LossWeights,
        auxk_fit,
        compute_losses,
        preact_loss,
        reconstruction_loss,
    )
    from clt.model import CrossLayerTranscoder
    from clt.trainer import build_optimizer as trainer_optimizer
    from clt.trainer import recycle_grads

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - only on a machine missing a dependency
    IMPORT_ERROR = f"clt.model / clt.losses do not import here: {exc!r}"

pytestmark = pytest.mark.skipif(IMPORT_ERROR is not None, reason=IMPORT_ERROR or "")

SHAPES = {  # name -> (L, d, F, k, N)
    "issue-gpu": (12, 768, 16384, 16, 8192),
    "issue-cpu": (12, 768, 4096, 16, 1024),
    "quick": (6, 256, 2048, 16, 512),
}
SHAPE = os.environ.get("CLT_BENCH_SHAPE", "issue-gpu" if CUDA else "quick")
if SHAPE == "issue":
    SHAPE = "issue-gpu" if CUDA else "issue-cpu"
if SHAPE not in SHAPES:
    raise ValueError(f"CLT_BENCH_SHAPE must be issue or one of {sorted(SHAPES)}, got {SHAPE!r}")
L, D, F, K, N = SHAPES[SHAPE]
ROUNDS = 5 if CUDA else 3
DEAD = F // 64
DEAD_TOKENS = 100_000
TF32 = CUDA and os.environ.get("CLT_BENCH_TF32", "0") == "1"
NONLINEARITIES = ["topk", "batchtopk", "jumprelu"]
IMPLS = ["floor", "sparse", "dense"]  # floor first, dense last: the ratios need the others
LR, BETAS = 1e-3, (0.9, 0.999)
STEP = 10**6  # past any sparsity warmup: the penalty runs at full weight


def weights_for(nonlinearity: str) -> LossWeights:
    """The presets' loss terms: AuxK for the TopK family, tanh sparsity + pre-act for JumpReLU."""
    if nonlinearity == "jumprelu":
        return LossWeights(sparsity_coef=0.05, sparsity_c=1.0, preact_coef=3e-6)
    return LossWeights(auxk_alpha=1 / 32, auxk_k=None, dead_tokens=DEAD_TOKENS)


# ----------------------------------------------------------------------------------------------
# problem: model, optimizer, batch, dead features
# ----------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The trainer's own optimizer (Adam, fused on CUDA) with the bench's settings."""
    settings = SimpleNamespace(optimizer="adam", lr=LR, betas=BETAS, weight_decay=0.0)
    return trainer_optimizer(model, settings)


def make_problem(nonlinearity: str, L: int, D: int, F: int, K: int, N: int, n_dead: int,
                 dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    p = SimpleNamespace(nonlinearity=nonlinearity, weights=weights_for(nonlinearity))
    p.model = CrossLayerTranscoder(
        L, D, D, F, nonlinearity=nonlinearity, k=None if nonlinearity == "jumprelu" else K,
        dtype=dtype, device=DEVICE,
    ).train()
    # standardized activations in, targets out: [L, N, d]
    p.x = torch.randn(L, N, D, generator=gen).to(DEVICE, dtype)
    p.y = torch.randn(L, N, D, generator=gen).to(DEVICE, dtype)
    if nonlinearity == "jumprelu":
        calibrate_thresholds(p.model, p.x, K)
    # [L, F]: n_dead random features per layer have not fired for DEAD_TOKENS tokens
    order = torch.rand(L, F, generator=gen).argsort(dim=1)[:, :n_dead]
    dead = torch.zeros(L, F, dtype=torch.bool).scatter_(1, order, True)
    p.dead_counts = torch.where(dead, DEAD_TOKENS, 0).to(DEVICE)
    p.opt = build_optimizer(p.model)
    return p


@torch.no_grad()
def calibrate_thresholds(model: CrossLayerTranscoder, x: torch.Tensor, k: int) -> None:
    """Per-layer JumpReLU threshold at which ``k`` features per token fire on this batch (at init
    the encoder's pre-activations are small, so the default threshold would fire ~20% of F)."""
    pre = model.pre_activations(x).flatten(1)  # [L, N * F]
    theta = pre.topk(k * x.shape[1], dim=1).values[:, -1].clamp_min(1e-3)  # [L]
    model.log_threshold.copy_(theta.log().unsqueeze(1).expand_as(model.log_threshold))


def reset_dead(p: SimpleNamespace) -> None:
    """Every round starts with the same dead features (a step revives those that fire)."""
    p.model.tokens_since_fired.copy_(p.dead_counts)


# ----------------------------------------------------------------------------------------------
# the three steps
# ----------------------------------------------------------------------------------------------


def ours_loss(p: SimpleNamespace) -> tuple[torch.Tensor, Callable[[], None]]:
    out = compute_losses(p.model, p.x, p.y, p.weights, STEP)
    fire_counts = out.codes.fire_counts(p.model.n_features)
    return out.total, lambda: p.model.update_dead_stats(fire_counts, p.x.shape[1])


def dense_decoder_blocks(model: CrossLayerTranscoder) -> list[tuple[torch.Tensor, ...]]:
    """``blocks[s][t - s]``: the ``[F, d_out]`` matrix of each (source, target) pair, as separate
    tensors the way per-pair decoder parameters of earlier trainers are (split / unbind: their
    backward assembles ``W_dec``'s gradient once, not one full-size zero-padded copy per pair)."""
    F, d_out, layout = model.n_features, model.d_out, model.layout
    sizes = [F * layout.reach_of(s) for s in range(model.n_layers)]
    return [blk.view(F, -1, d_out).unbind(1) for blk in model.W_dec.split(sizes)]


def dense_decode(model: CrossLayerTranscoder, A: torch.Tensor, bias: bool) -> torch.Tensor:
    """``A [L, N, F]`` -> ``[L, N, d_out]``: one GEMM over all F features per (source, target)."""
    blocks = dense_decoder_blocks(model)
    outs = []
    for t in range(model.n_layers):
        acc = model.b_dec[t] if bias else None
        for s in model.layout.sources_of(t):
            part = torch.einsum("nf,fd->nd", A[s], blocks[s][t - s])
            acc = part if acc is None else acc + part
        outs.append(acc)
    return torch.stack(outs)


def dense_activation(model: CrossLayerTranscoder, pre: torch.Tensor) -> torch.Tensor:
    """``[L, N, F]`` activation the way dense trainers build it (scatter of the winners)."""
    if model.nonlinearity.kind == "topk":
        v, i = pre.topk(model.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, v.relu())
    if model.nonlinearity.kind == "batchtopk":  # scope "layer": N * k winners per layer
        flat = pre.flatten(1)
        v, i = flat.topk(model.k * pre.shape[1], dim=1)
        return torch.zeros_like(flat).scatter(1, i, v.relu()).view_as(pre)
    return kernels.jumprelu(pre, model.log_threshold, model.nonlinearity.jumprelu_bandwidth)


def dense_auxk(model, pre, y, yhat, weights) -> torch.Tensor | None:
    """AuxK (``clt.losses.auxk_fit``) on a dense activation of the top dead pre-activations."""
    dead = model.dead_mask(weights.dead_tokens)  # [L, F]
    n_dead = int(dead.sum(dim=1).max())
    if n_dead == 0:
        return None
    k_aux = min(weights.auxk_k or DEFAULT_AUXK_K, model.n_features, n_dead)
    v, i = pre.masked_fill(~dead.unsqueeze(1), -math.inf).topk(k_aux, dim=-1)
    A_aux = torch.zeros_like(pre).scatter(-1, i, v.relu())  # [L, N, F]
    return auxk_fit(model, dead, y, yhat, dense_decode(model, A_aux, bias=False))


def dense_loss(p: SimpleNamespace) -> tuple[torch.Tensor, Callable[[], None]]:
    model, w = p.model, p.weights
    pre = model.pre_activations(p.x)  # [L, N, F]
    A = dense_activation(model, pre)  # [L, N, F], kept for the decoder backward
    yhat = dense_decode(model, A, bias=True)
    total = reconstruction_loss(p.y, yhat)
    if model.nonlinearity.kind == "jumprelu":
        norms = model.decoder_norms()  # [L, F]
        tanh = torch.tanh(w.sparsity_c * A * norms.unsqueeze(1)).sum(dim=-1).mean(dim=-1).sum()
        total = total + w.sparsity_coef * tanh
        total = total + w.preact_coef * preact_loss(pre, model.log_threshold.exp(), norms)
    else:
        aux = dense_auxk(model, pre, p.y, yhat, w)
        if aux is not None:
            total = total + w.auxk_alpha * aux

    @torch.no_grad()
    def update_dead() -> None:
        model.tokens_since_fired += p.x.shape[1]
        model.tokens_since_fired[(A > 0).any(dim=1)] = 0

    return total, update_dead


def train_step(p: SimpleNamespace, loss_fn) -> None:
    """``clt.trainer.train_step`` without the scheduler and the metrics (one micro-batch); the
    dense baseline runs through it too (its own ops allocate as they always did; only the shared
    loss helpers, e.g. the decoder norms' backward, take a recycled buffer)."""
    recycle_grads(p.model)  # the trainer's zero_grad: on the host it donates last step's grads
    loss, update_dead = loss_fn(p)
    loss.backward()
    kernels.buffers.clear()
    update_dead()
    p.opt.step()
    sync()


def floor_step(p: SimpleNamespace) -> None:
    model = p.model
    if model.nonlinearity.kind == "jumprelu":  # the dense encoder backward belongs to its floor
        pre = model.pre_activations(p.x)
        pre.backward(p.grad_pre)
    else:
        with torch.no_grad():
            model.pre_activations(p.x)
    p.opt.step()
    sync()


# ----------------------------------------------------------------------------------------------
# correctness of the baseline, then the benchmarks
# ----------------------------------------------------------------------------------------------


CHECK_DTYPES = [torch.float64] + ([torch.float32] if CUDA else [])


@pytest.mark.parametrize("dtype", CHECK_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_dense_baseline_matches_ours(nonlinearity, dtype):
    """Tiny shape, some features dead so AuxK runs: the dense step computes ours' loss, gradients
    and dead counters, so the benchmark compares the same work. float64 takes the ops' torch
    paths; on CUDA float32 also runs ours through the Triton kernels (looser tolerance)."""
    p = make_problem(nonlinearity, L=3, D=8, F=32, K=4, N=16, n_dead=6, dtype=dtype)
    params = list(p.model.parameters())
    results = []
    for loss_fn in (ours_loss, dense_loss):
        reset_dead(p)
        loss, update_dead = loss_fn(p)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        update_dead()
        results.append((loss.detach(), grads, p.model.tokens_since_fired.clone()))
    (l_ours, g_ours, d_ours), (l_dense, g_dense, d_dense) = results
    tols = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}
    torch.testing.assert_close(l_dense, l_ours, **tols[dtype])
    for (name, q), a, b in zip(p.model.named_parameters(), g_ours, g_dense, strict=True):
        a = torch.zeros_like(q) if a is None else a
        b = torch.zeros_like(q) if b is None else b
        # by the parameter's dtype: JumpReLU's log-threshold stays float32 in a float64 model
        tol = tols[dtype] if q.dtype == torch.float64 else tols[torch.float32]
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    assert torch.equal(d_dense, d_ours)


_SEEN: dict[str, dict[str, dict]] = {}  # nonlinearity -> impl -> stats


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def _tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = TF32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_step(benchmark, timings, _tf32, request, nonlinearity, impl):
    _register_summary(request.config)
    benchmark.group = f"step-{nonlinearity}"
    oom = None
    try:
        p = make_problem(nonlinearity, L, D, F, K, N, DEAD)
        if impl == "floor":
            for q in p.model.parameters():
                q.grad = torch.randn_like(q) * 1e-3
            if nonlinearity == "jumprelu":
                p.grad_pre = torch.randn(L, N, F, device=DEVICE) / (N * F)
            step = partial(floor_step, p)
        else:
            loss_fn = ours_loss if impl == "sparse" else dense_loss
            step = partial(train_step, p, loss_fn)
        reset_dead(p)
        step()  # Adam's state is created lazily: the first step is not representative
        benchmark.pedantic(step, setup=partial(reset_dead, p), rounds=ROUNDS, warmup_rounds=1,
                           iterations=1)
        peak = None
        if CUDA:
            reset_dead(p)
            sync()
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
    if oom is not None:  # outside the handler: its traceback no longer holds the tensors
        p = step = None
        _free()
        pytest.skip(f"{impl} step does not fit on this GPU at L={L} N={N} F={F}: {oom}")
    stats = benchmark.stats.stats
    timings.setdefault(benchmark.group, {})[impl] = (stats.median, stats.min)
    seen = _SEEN.setdefault(nonlinearity, {})
    seen[impl] = dict(median=stats.median, min=stats.min, peak=peak)
    info = benchmark.extra_info
    info.update(impl=impl, nonlinearity=nonlinearity,
                shape=dict(L=L, d_in=D, d_out=D, F=F, k=K, N=N, dead_per_layer=DEAD),
                dtype="float32", tf32=TF32, **run_info(), peak_mem_gib=peak,
                n_params=sum(q.numel() for q in p.model.parameters()))
    if impl == "sparse" and "floor" in seen:
        info["ours_over_floor"] = stats.median / seen["floor"]["median"]
    if impl == "dense" and "sparse" in seen:
        info["dense_over_ours"] = stats.median / seen["sparse"]["median"]
    p = step = None
    _free()


class _Summary:
    """Prints ``ours / floor`` and ``dense / ours`` after the whole session (conftest's style)."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not _SEEN:
            return
        tr = terminalreporter
        where = f"{device_name()}, L={L} d={D} F={F} k={K} N={N}, {torch.get_num_threads()} thr"
        tr.write_sep("-", f"whole step, same run ({where})")
        tr.write_line(f"{'nonlinearity':<13}{'floor ms':>10}{'ours ms':>10}{'dense ms':>10}"
                      f"{'ours/floor':>17}{'dense/ours':>17}{'peak GiB f/o/d':>20}")
        for nl, impls in _SEEN.items():
            ms = [f"{impls[i]['median'] * 1e3:10.1f}" if i in impls else f"{'-':>10}"
                  for i in ("floor", "sparse", "dense")]
            ratios = [_ratio(impls, a, b) for a, b in (("sparse", "floor"), ("dense", "sparse"))]
            peaks = "/".join(
                "n/a" if impls.get(i, {}).get("peak") is None else f"{impls[i]['peak']:.1f}"
                for i in ("floor", "sparse", "dense"))
            tr.write_line(f"{nl:<13}{''.join(ms)}{ratios[0]:>17}{ratios[1]:>17}{peaks:>20}")
        tr.write_line("ratios: median (min); peak memory: CUDA max_memory_allocated of one step, "
                      "n/a on CPU")


def _ratio(impls: dict, num: str, den: str) -> str:
    if num not in impls or den not in impls:
        return "-"
    med = impls[num]["median"] / impls[den]["median"]
    low = impls[num]["min"] / impls[den]["min"]
    return f"{med:.2f}x ({low:.2f}x)"


def _register_summary(config) -> None:
    if not config.pluginmanager.has_plugin("clt-step-summary"):
        config.pluginmanager.register(_Summary(), "clt-step-summary")
