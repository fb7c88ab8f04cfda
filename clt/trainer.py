"""Training library: builds the model, optimizer and schedule from a config and runs steps.

``train.py`` composes these top to bottom; tests call them directly.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from .config import Config, TrainConfig, save_config
from .losses import LossOutput, LossWeights, compute_losses
from .model import CrossLayerTranscoder


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


def build_model(cfg: Config, d_in: int, d_out: int, device: torch.device) -> CrossLayerTranscoder:
    n_layers = cfg.n_layers
    if n_layers is None:
        raise ValueError("the number of trained layers is unknown: set model.layers")
    nl = cfg.nonlinearity
    return CrossLayerTranscoder(
        n_layers=n_layers,
        d_in=d_in,
        d_out=d_out,
        n_features=cfg.model.n_features,
        reach=cfg.model.reach,
        nonlinearity=nl.kind,
        k=nl.k,
        batchtopk_scope=nl.batchtopk_scope,
        threshold_ema_decay=nl.threshold_ema_decay,
        rank_by_decoder_norm=nl.rank_by_decoder_norm,
        jumprelu_init_threshold=nl.jumprelu_init_threshold,
        jumprelu_bandwidth=nl.jumprelu_bandwidth,
        device=device,
    )


def loss_weights(cfg: Config) -> LossWeights:
    return LossWeights(**cfg.loss.model_dump())


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW, fused on CUDA (one kernel over all parameters)."""
    fused = all(p.is_cuda for p in model.parameters())
    cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=tcfg.lr, betas=tcfg.betas,
               weight_decay=tcfg.weight_decay, fused=fused or None)


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
    model: CrossLayerTranscoder, source: ActivationStream, n: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless standardized batches from a source, on the model's device."""
    device = model.W_enc.device
    while True:
        x, y = source.next_batch(n)
        x = x.to(device, model.W_enc.dtype, non_blocking=True)
        y = y.to(device, model.W_enc.dtype, non_blocking=True)
        yield model.standardizer.inputs(x), model.standardizer.targets(y)


def train_step(
    model: CrossLayerTranscoder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    weights: LossWeights,
    step: int,
    tcfg: TrainConfig,
) -> dict[str, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches; returns detached metric tensors
    (no host sync here: the caller decides when to read them)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for _ in range(tcfg.grad_accum):
        x, y = next(batches)
        out = compute_losses(model, x, y, weights, step)
        (out.total / tcfg.grad_accum).backward()
        model.update_dead_stats(out.codes)
        for name, value in _metrics(out).items():
            sums[name] = sums.get(name, 0) + value / tcfg.grad_accum
    if tcfg.grad_clip is not None:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return sums


def _metrics(out: LossOutput) -> dict[str, torch.Tensor]:
    metrics = {"loss": out.total.detach()}
    metrics.update({f"loss/{k}": v.detach() for k, v in out.terms.items()})
    metrics["fvu"] = out.fvu
    metrics["l0"] = out.codes.l0()
    return metrics


@torch.no_grad()
def evaluate(
    model: CrossLayerTranscoder, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """FVU per layer (ratio of sums over all held-out tokens) and L0 per layer, eval mode."""
    was_training = model.training
    model.eval()
    err = l0 = y_sum = y_sq = 0
    tokens = 0
    for x_raw, y_raw in batches:
        device, dtype = model.W_enc.device, model.W_enc.dtype
        x = model.standardizer.inputs(x_raw.to(device, dtype))
        y = model.standardizer.targets(y_raw.to(device, dtype))
        yhat, codes = model(x)
        err = err + (y - yhat).pow(2).sum(dim=(1, 2))
        y_sum = y_sum + y.sum(dim=1)
        y_sq = y_sq + y.pow(2).sum(dim=(1, 2))
        l0 = l0 + (codes.values > 0).sum(dim=(1, 2)).float()
        tokens += x.shape[1]
    model.train(was_training)
    var = y_sq - y_sum.pow(2).sum(dim=-1) / tokens
    return {"eval/fvu": err / var, "eval/l0": l0 / tokens}


class MetricsLog:
    """Metrics as JSON lines in the run folder (readable without wandb), plus wandb if enabled."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb = None
        if cfg.logging.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, name=run_dir.name, dir=str(run_dir),
                mode=cfg.logging.wandb_mode, config=cfg.model_dump(mode="json"),
            )

    def log(self, step: int, metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
        flat = flatten_metrics(metrics)
        self.file.write(json.dumps({"step": step, **flat}) + "\n")
        if self.wandb is not None:
            self.wandb.log(flat, step=step)
        return flat

    def close(self) -> None:
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


def make_run_dir(cfg: Config) -> Path:
    name = cfg.logging.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    run_dir = Path(cfg.logging.run_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    return run_dir


def save_checkpoint(run_dir: Path, step: int, keep_last: int, state: dict) -> Path:
    """Write ``step_{step}.pt`` atomically (a kill mid-write leaves earlier checkpoints intact),
    then delete all but the newest ``keep_last``."""
    path = run_dir / f"step_{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(run_dir.glob("step_*.pt"))[:-keep_last]:
        old.unlink()
    return path
