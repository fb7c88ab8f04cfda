"""Training library: builds the model, optimizer and schedule from a config and runs steps.

``train.py`` composes these top to bottom; tests call them directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

import kernels

from .encoder import SparseEncoder
from .losses import LossOutput, LossWeights, compute_losses
from .parallel import GradSync, Mesh, clip_grad_norm, parallelize
from .registry import ComponentError

if TYPE_CHECKING:  # pydantic stays off the import path of the step itself (GPU bench machines)
    from .config import Config, TrainConfig


class ActivationStream(Protocol):
    """What the trainer needs from a data source (LM activations or a planted dictionary)."""

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_model(
    cfg: Config, d_in: int, d_out: int, device: torch.device, mesh: Mesh | None = None
) -> SparseEncoder:
    """The config's architecture with its nonlinearity, built whole (every process draws the
    same initial weights from the same seed); in a multi-process ``mesh``, then cut to this
    rank's feature shard by ``clt.parallel.parallelize``."""
    n_layers = cfg.n_layers
    if n_layers is None:
        raise ValueError("the number of trained layers is unknown: set model.layers")
    try:
        model = cfg.model.component.build(n_layers, d_in, d_out, cfg.model.n_features,
                                          cfg.nonlinearity.build(), device)
    except ValueError as exc:  # an architecture's check of the widths: known only from the data
        raise ComponentError(f"model.architecture {cfg.model.architecture}: {exc}") from exc
    return model if mesh is None else parallelize(model, mesh)


def loss_weights(cfg: Config) -> LossWeights:
    values = cfg.loss.model_dump(exclude={"extra"})
    if values["matryoshka_weights"] is not None:
        values["matryoshka_weights"] = tuple(values["matryoshka_weights"])
    return LossWeights(**values, extra=tuple(term.build() for term in cfg.loss.extra))


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW, fused (one pass over each parameter, its gradient and both moments) on CUDA
    and on CPU, where torch >= 2.4 has a fused kernel too. On 2 CPU threads at L=12, d=768,
    F=4096 (283 M parameters) a step takes 0.11 s fused against 0.6-1.5 s for the default
    foreach implementation, whose temporaries are parameter-sized."""
    params = list(model.parameters())
    fused = len({p.device.type for p in params}) == 1 and params[0].device.type in ("cuda", "cpu")
    cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay,
               fused=fused or None)


def lr_factor(tcfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine / linear decay to ``min_lr_ratio`` (or constant)."""

    def factor(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / tcfg.warmup_steps
        if tcfg.decay == "constant":
            return 1.0
        progress = (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps)
        progress = min(1.0, progress)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if tcfg.decay == "cosine" else 1 - progress
        return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * shape

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(tcfg))


def standardized_batches(
    model: SparseEncoder, source: ActivationStream, n: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless standardized batches from a source, on the model's device."""
    device = model.W_enc.device
    while True:
        x, y = source.next_batch(n)
        x = x.to(device, model.W_enc.dtype, non_blocking=True)
        y = y.to(device, model.W_enc.dtype, non_blocking=True)
        yield model.standardizer.inputs(x), model.standardizer.targets(y)


def autocast(device: torch.device, mixed_precision: str):
    """Autocast context for the forward pass (``"no"``: a no-op)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def recycle_grads(model: torch.nn.Module) -> None:
    """``zero_grad(set_to_none=True)`` that on the host first donates each gradient to
    ``kernels.buffers``, where this step's ops that write a parameter-sized gradient (decoder,
    TopK encoder) take it as their output: the same memory serves every step instead of ~1 GB of
    fresh, page-faulting allocations (see ``kernels/buffers.py``). On CUDA the caching allocator
    does this already, and donated buffers would only raise the forward's peak memory."""
    kernels.buffers.clear()
    for p in model.parameters():
        if p.grad is not None and p.grad.device.type == "cpu":
            kernels.buffers.donate(p.grad)
        p.grad = None


def train_step(
    model: SparseEncoder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    weights: LossWeights,
    step: int,
    tcfg: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    counter: FiringCounter | None = None,
    mesh: Mesh | None = None,
    grad_sync: GradSync | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches; returns detached metric tensors
    (no host sync here: the caller decides when to read them, e.g. ``nonfinite``).

    With a ``mesh``: losses are replicated in the tensor-parallel group, ``grad_sync`` averages
    gradients over data-parallel replicas (overlapping the last backward), firing counts are
    summed over replicas (so every replica's dead-feature mask agrees), and the gradient norm is
    the full model's. Metrics are this replica's (see ``Mesh.dp_mean_metrics``).
    """
    mesh = mesh or Mesh.single()
    model.train()
    recycle_grads(model)
    sums: dict[str, torch.Tensor] = {}
    device = model.W_enc.device
    for micro in range(tcfg.grad_accum):
        x, y = next(batches)
        with autocast(device, tcfg.mixed_precision):
            out = compute_losses(model, x, y, weights, step)
        loss = out.total / tcfg.grad_accum
        if grad_sync is not None and micro == tcfg.grad_accum - 1:
            grad_sync.arm()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        fire_counts = mesh.dp_sum(out.codes.fire_counts(model.n_features))  # [L, F local]
        n_tokens = x.shape[1] * mesh.dp_size
        model.update_dead_stats(fire_counts, n_tokens)
        if counter is not None:
            counter.update(fire_counts, n_tokens)
        for name, value in _metrics(out, mesh).items():
            sums[name] = sums.get(name, 0) + value / tcfg.grad_accum
    kernels.buffers.clear()  # donations no op took are freed before the optimizer step
    if grad_sync is not None:
        grad_sync.finish()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_nonfinite = torch.zeros((), device=device)
    if tcfg.grad_clip is not None:
        if mesh.tp_size > 1:
            sums["grad_norm"] = clip_grad_norm(model, tcfg.grad_clip, mesh)
        else:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        if scaler is None:  # fp16 overflows are the scaler's to skip, not a divergence
            grad_nonfinite = (~torch.isfinite(sums["grad_norm"])).float()
    # [loss, gradient norm, weights]: the weights are checked by the caller when it syncs
    sums["nonfinite"] = torch.stack([(sums["nonfinite"] > 0).float(), grad_nonfinite,
                                     torch.zeros_like(grad_nonfinite)])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return sums


def retune_optimizer(optimizer: torch.optim.Optimizer, scheduler, tcfg: TrainConfig) -> None:
    """Give a restored optimizer and schedule this config's learning rate, betas, weight decay
    and schedule (``load_state_dict`` brings back the checkpoint's); from the next step on."""
    factor = lr_factor(tcfg)
    scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
    scheduler.base_lrs = [tcfg.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(initial_lr=tcfg.lr, lr=tcfg.lr * factor(scheduler.last_epoch),
                     betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


@torch.no_grad()
def nonfinite_weights(model: torch.nn.Module) -> torch.Tensor:
    """1.0 if any parameter holds NaN or inf, else 0.0, on the model's device (no host sync;
    a max-abs reduction per parameter, no parameter-sized temporary)."""
    peaks = torch.stack([torch.linalg.vector_norm(p.detach().float(), float("inf"))
                         for p in model.parameters()])
    return (~torch.isfinite(peaks)).any().float()


def _metrics(out: LossOutput, mesh: Mesh) -> dict[str, torch.Tensor]:
    total = out.total.detach()
    metrics = {"loss": total, "nonfinite": (~torch.isfinite(total)).float()}
    metrics.update({f"loss/{k}": v.detach() for k, v in out.terms.items()})
    metrics["fvu"] = out.fvu
    metrics["fvu_total"] = out.fvu_total
    metrics["l0"] = mesh.tp_sum(out.codes.l0())  # codes hold this rank's features only
    return metrics


class FiringCounter:
    """How often each feature fired since the last read, for the frequency histogram."""

    def __init__(self, n_layers: int, n_features: int, device: torch.device) -> None:
        self.counts = torch.zeros(n_layers, n_features, device=device)
        self.tokens = 0

    @torch.no_grad()
    def update(self, fire_counts: torch.Tensor, n_tokens: int) -> None:
        self.counts += fire_counts
        self.tokens += n_tokens

    def read_and_reset(self) -> torch.Tensor:
        """``[L, F]`` firing frequency (fires per token) over the window; resets the window."""
        freq = self.counts / max(self.tokens, 1)
        self.counts = torch.zeros_like(self.counts)
        self.tokens = 0
        return freq

    def state_dict(self) -> dict:
        return {"counts": self.counts, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].to(self.counts.device)
        self.tokens = state["tokens"]


# log10 frequency bins of the feature-density histogram: never fired, then decades up to 1
FREQ_BIN_EDGES = [-8, -7, -6, -5, -4, -3, -2, -1, 0]


def frequency_histogram(freq: torch.Tensor) -> dict[str, float]:
    """Fraction of features per log10-frequency decade (``[-inf]`` = never fired in the window)."""
    flat = freq.flatten().double().cpu()
    out = {"freq_hist/never": float((flat == 0).double().mean())}
    log = flat[flat > 0].log10()
    lo = float("-inf")
    for edge in FREQ_BIN_EDGES:
        out[f"freq_hist/le_1e{edge}"] = float(((log > lo) & (log <= edge)).sum()) / flat.numel()
        lo = edge
    return out


@torch.no_grad()
def evaluate(
    model: SparseEncoder, batches: list[tuple[torch.Tensor, torch.Tensor]],
    mesh: Mesh | None = None,
) -> dict[str, torch.Tensor]:
    """Held-out metrics in eval mode: FVU per layer and total (ratios of sums over all tokens),
    L0 per layer, and ``eval/freq [L, F]``, each feature's firing frequency (for plots; not a
    scalar metric: pop it before logging). A sharded model is evaluated by every rank of its
    tensor-parallel group (the forward is collective); ``freq`` covers all ``F`` features."""
    mesh = mesh or Mesh.single()
    was_training = model.training
    model.eval()
    err = fires = y_sum = y_sq = 0
    tokens = 0
    for x_raw, y_raw in batches:
        device, dtype = model.W_enc.device, model.W_enc.dtype
        x = model.standardizer.inputs(x_raw.to(device, dtype))
        y = model.standardizer.targets(y_raw.to(device, dtype))
        yhat, codes = model(x)
        err = err + (y - yhat).pow(2).sum(dim=(1, 2))
        y_sum = y_sum + y.sum(dim=1)
        y_sq = y_sq + y.pow(2).sum(dim=(1, 2))
        fires = fires + codes.fire_counts(model.n_features)
        tokens += x.shape[1]
    model.train(was_training)
    var = y_sq - y_sum.pow(2).sum(dim=-1) / tokens
    freq = mesh.gather_features(fires).double() / tokens
    return {"eval/fvu": err / var, "eval/fvu_total": err.sum() / var.sum(),
            "eval/l0": freq.sum(dim=1).float(), "eval/freq": freq}


class MetricsLog:
    """Metrics as JSON lines in the run folder (readable without wandb), plus wandb if enabled.
    ``write=False`` (every rank but 0 of a parallel run) only flattens."""

    def __init__(self, run_dir: Path, cfg: Config, write: bool = True) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1) if write else None
        self.wandb = None
        if write and cfg.logging.wandb_mode != "disabled":
            # deferred: wandb takes ~1 s to import and only a run with wandb on needs it
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, name=run_dir.name, dir=str(run_dir),
                mode=cfg.logging.wandb_mode, config=cfg.model_dump(mode="json"),
            )

    def log(
        self, step: int, metrics: dict[str, torch.Tensor | float],
        extra: dict[str, float] | None = None, images: dict[str, Path] | None = None,
    ) -> dict[str, float]:
        """Write one JSON line; PNG ``images`` go to wandb (the files stay in the run folder)."""
        flat = {**flatten_metrics(metrics), **(extra or {})}
        if self.file is None:
            return flat
        self.file.write(json.dumps({"step": step, **flat}) + "\n")
        if self.wandb is not None:
            # deferred: wandb takes ~1 s to import and only a run with wandb on needs it
            import wandb

            pictures = {k: wandb.Image(str(p)) for k, p in (images or {}).items()}
            self.wandb.log({**flat, **pictures}, step=step)
        return flat

    def note(self, step: int, event: str, details: dict) -> None:
        """A line that records an event of the run (e.g. a resume that changed the config)."""
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "event": event, **details}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def flatten_metrics(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Per-layer tensors become ``name/l{i}`` plus ``name/mean``; scalars stay as they are."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            values = value.detach().float().cpu().tolist()
            flat.update({f"{name}/l{i}": v for i, v in enumerate(values)})
            flat[f"{name}/mean"] = sum(values) / len(values)
        else:
            flat[name] = float(value)
    return flat


def new_run_dir(cfg: Config) -> Path:
    """``logging.run_dir / logging.run_name``, or a fresh name from the time and process id."""
    name = cfg.logging.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    return Path(cfg.logging.run_dir) / name


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", warn=None,
             error: type[Exception] | None = None):
    """``(config, model in eval mode, step)`` of a run folder's newest checkpoint that verifies
    (a newer corrupted one is skipped with a ``warn`` line, default stderr).

    Raises ``CheckpointError`` (missing folder, config or checkpoint; a checkpoint that does not
    fit its config), ``ConfigError`` (an invalid ``config.json``), ``ComponentError`` (a
    component that cannot be imported or built) or an ``OSError``; with
    ``error``, any of them as that exception class, with the same one-line message (what the
    evaluation, export and page commands report).
    """
    # deferred: clt.checkpoint and clt.config import pydantic, which the step's import path
    # must not need (GPU bench machines)
    from .checkpoint import CheckpointError
    from .config import ConfigError

    if error is None:
        return _load_run(Path(run_dir), device, warn)
    try:
        return _load_run(Path(run_dir), device, warn)
    except (ConfigError, CheckpointError, ComponentError, OSError) as exc:
        raise error(str(exc)) from None


def _load_run(run_dir: Path, device: str | torch.device, warn):
    # deferred: pydantic (through clt.checkpoint and clt.config) stays off the step's import path
    from .checkpoint import CheckpointError, check_compatible, latest_good_checkpoint
    from .config import load_config

    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    cfg = load_config(run_dir / "config.json")
    warn = warn or (lambda line: print(line, file=sys.stderr))
    path, state, _ = latest_good_checkpoint(run_dir, warn)
    if "config" in state:
        check_compatible(state["config"], cfg, path)
    weights = state["model"]
    # every SparseEncoder's standardizer holds [L, d_in] and [L, d_out] statistics
    widths = [weights.get(f"standardizer.{k}_mean") for k in ("in", "out")]
    if any(w is None or w.dim() != 2 for w in widths):
        raise CheckpointError(f"checkpoint {path} holds no standardizer statistics: not a "
                              "model of this trainer")
    d_in, d_out = (w.shape[1] for w in widths)
    model = build_model(cfg, d_in, d_out, torch.device(device))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit its config: {exc}") from None
    return cfg, model.eval(), int(state.get("step", 0))
