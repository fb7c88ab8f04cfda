"""Train a crosslayer transcoder on a frozen language model's MLPs.

    python train.py configs/topk-clt.json                       # the embedded offline default
    python train.py configs/topk-clt.json --set train.steps=50 --set model.n_features=512
    python train.py --resume runs/NAME                          # continue from the last checkpoint
    python train.py --help                                      # every config field
    torchrun --standalone --nproc_per_node=2 train.py configs/topk-clt.json \
        --set parallel.tensor=2                                 # feature-sharded over 2 processes

Reads top to bottom: config -> process group -> seed -> data -> model -> standardization (or
resume) -> optimizer -> loop (log, evaluate, checkpoint) -> summary -> teardown. Under torchrun
every process runs this file; rank 0 logs, plots and evaluates the replacement model.
Exit status: 0 done, 1 training diverged (NaN/inf loss; the last good checkpoint is kept) or a
rank failed, 2 bad config, command line or checkpoint.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from clt.checkpoint import (
    CheckpointError,
    TrainingState,
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from clt.config import main_config
from clt.data import build_source
from clt.evaluate import MODES, evaluate_run, format_table
from clt.parallel import GradSync, Mesh, ShardedSource, init_mesh, shutdown
from clt.plots import plot_feature_density, plot_layer_metrics
from clt.trainer import (
    FiringCounter,
    MetricsLog,
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    frequency_histogram,
    loss_weights,
    make_run_dir,
    resolve_device,
    standardized_batches,
    train_step,
)


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def profiler(run_dir: Path, steps: int, device: torch.device, mesh: Mesh):
    """torch.profiler over ``steps`` steps after one warmup step, written as a Chrome trace
    (one per rank in a parallel run)."""
    if steps == 0:
        return contextlib.nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    suffix = f"_rank{mesh.rank}" if mesh.world_size > 1 else ""
    trace = run_dir / f"profile_trace{suffix}.json"
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
        on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace)),
    )


def write_plots(run_dir: Path, step: int, held_out: dict) -> dict[str, Path]:
    """Feature density and per-layer FVU / L0 as PNG in the run folder (overwritten each eval)."""
    freq = held_out.pop("eval/freq")
    return {
        "plots/feature_density": plot_feature_density(
            freq, run_dir / "feature_density.png", f"feature density, held-out, step {step}"),
        "plots/layers": plot_layer_metrics(
            held_out["eval/fvu"], held_out["eval/l0"], run_dir / "layers.png", f"step {step}"),
    }


def main(argv: list[str] | None = None) -> None:
    cfg, args = main_config(argv)
    try:
        mesh = init_mesh(cfg.parallel.tensor, cfg.parallel.data, cfg.parallel.timeout_s)
    except ValueError as exc:
        fail(str(exc))
    try:
        train(cfg, args, mesh)
    except Exception as exc:
        if mesh.world_size > 1:  # name the rank: the other ranks only see a broken collective
            print(f"error: rank {mesh.rank} of {mesh.world_size} failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    finally:
        shutdown(mesh)


def train(cfg, args, mesh: Mesh) -> None:
    tcfg = cfg.train
    resume = path = None
    if args.resume:
        try:
            path = latest_checkpoint(Path(args.resume))
            resume = load_checkpoint(path)
            check_compatible(resume["config"], cfg, path)
        except CheckpointError as exc:
            fail(str(exc))
    torch.manual_seed(tcfg.seed + mesh.tp_rank)  # feature shards differ, replicas agree

    device = resolve_device(tcfg.device)
    source = build_source(cfg, device, shard=(mesh.rank, mesh.world_size))
    if mesh.tp_size > 1:
        source = ShardedSource(source, mesh)
    model = build_model(cfg, source.d_in, source.d_out, device, mesh)
    if resume is None:
        fit_batch = min(tcfg.batch_tokens, cfg.data.standardize_tokens)
        fit_batch = max(fit_batch - fit_batch % mesh.tp_size, mesh.tp_size)
        model.standardizer.fit(
            iter(lambda: source.next_batch(fit_batch), None), cfg.data.standardize_tokens
        )
        mesh.broadcast_(model.standardizer.buffers())  # one set of statistics for every rank
    heldout = source.heldout_batches(cfg.eval.tokens)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler(device.type) if tcfg.mixed_precision == "fp16" else None
    counter = FiringCounter(model.n_layers, model.n_features, device)
    state = TrainingState(model, optimizer, scheduler, counter, scaler, source)
    first_step = 1
    if resume is not None:
        try:  # standardization statistics come from the checkpoint, never re-estimated
            first_step = state.restore(resume, path, cfg.model.n_features, mesh)
        except CheckpointError as exc:
            fail(str(exc))
    run_dir = Path(args.resume) if args.resume else make_run_dir(cfg) if mesh.is_main else None
    run_dir = Path(mesh.broadcast_object(str(run_dir)))
    weights = loss_weights(cfg)
    batches = standardized_batches(model, source,
                                   tcfg.batch_tokens // tcfg.grad_accum // mesh.dp_size)
    grad_sync = GradSync(model.parameters(), mesh) if mesh.dp_size > 1 else None
    log = MetricsLog(run_dir, cfg, write=mesh.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    if mesh.is_main:
        print(f"run {run_dir}: L={model.n_layers} d_in={model.d_in} d_out={model.d_out} "
              f"F={cfg.model.n_features} R={model.reach} {model.nonlinearity}, "
              f"{n_params:,} parameters{' per tensor-parallel rank' if mesh.tp_size > 1 else ''}"
              f", standardized on {int(model.standardizer.n_tokens)} tokens, from step "
              f"{first_step}; processes: tensor={mesh.tp_size} x data={mesh.dp_size}")

    nonfinite = torch.zeros((), device=device)
    eval_metrics: dict[str, float] = {}
    start = time.perf_counter()
    steps = range(first_step, tcfg.steps + 1)
    try:
        with profiler(run_dir, tcfg.profile_steps, device, mesh) as prof:
            progress = tqdm(steps, unit="step", initial=first_step - 1, total=tcfg.steps,
                            disable=not mesh.is_main)
            for step in progress:
                metrics = train_step(model, optimizer, scheduler, batches, weights, step - 1, tcfg,
                                     scaler, counter, mesh, grad_sync)
                nonfinite += metrics.pop("nonfinite")
                if prof is not None:
                    prof.step()
                last = step == tcfg.steps
                check_now = last or any(step % every == 0 for every in
                                        (cfg.logging.every, cfg.eval.every, cfg.checkpoint.every))
                if check_now and mesh.world_max(nonfinite).item() > 0:
                    good = list_checkpoints(run_dir)
                    fail(f"the loss became NaN or inf at or before step {step}; stopped without "
                         f"saving. Last good checkpoint: {good[-1] if good else 'none'}", status=1)
                if step % cfg.logging.every == 0 or last:
                    tokens = (step - first_step + 1) * tcfg.batch_tokens
                    metrics = mesh.dp_mean_metrics(metrics)
                    dead = model.dead_mask(weights.dead_tokens).float()
                    metrics["dead_fraction"] = mesh.gather_features(dead).mean(1)
                    metrics["lr"] = scheduler.get_last_lr()[0]
                    metrics["tokens"] = step * tcfg.batch_tokens
                    metrics["tokens_per_s"] = tokens / (time.perf_counter() - start)
                    freq = mesh.gather_features(counter.read_and_reset())
                    flat = log.log(step, metrics, frequency_histogram(freq))
                    progress.set_postfix(tokens=f"{int(flat['tokens']):,}",
                                         loss=f"{flat['loss']:.4g}", fvu=f"{flat['fvu_total']:.3f}",
                                         l0=f"{flat['l0/mean']:.1f}",
                                         tok_s=f"{flat['tokens_per_s']:.0f}")
                if step % cfg.eval.every == 0 or last:
                    held_out = evaluate(model, heldout, mesh)
                    plots = write_plots(run_dir, step, held_out) if mesh.is_main else {}
                    held_out.pop("eval/freq", None)
                    eval_metrics = log.log(step, held_out, images=plots)
                    if mesh.is_main:
                        progress.write(f"step {step}: held-out FVU "
                                       f"{eval_metrics['eval/fvu_total']:.4f}, L0 "
                                       f"{eval_metrics['eval/l0/mean']:.1f}")
                if step % cfg.checkpoint.every == 0 or last:
                    state.save(run_dir, step, cfg, mesh)
        replacement = None
        if mesh.is_main and cfg.data.source == "lm" and cfg.eval.replacement_tokens > 0:
            replacement = evaluate_run(run_dir, cfg.eval.replacement_tokens, device)
            log.log(tcfg.steps, {f"replacement/{mode}/{name}": value
                                 for mode in MODES for name, value in replacement[mode].items()})
    finally:
        log.close()
        source.close()
    if eval_metrics and mesh.is_main:
        per_layer = " ".join(f"{eval_metrics[f'eval/fvu/l{i}']:.3f}"
                             for i in range(model.n_layers))
        print(f"done in {time.perf_counter() - start:.0f} s: held-out FVU "
              f"{eval_metrics['eval/fvu_total']:.4f} (per layer {per_layer}), mean L0 "
              f"{eval_metrics['eval/l0/mean']:.1f}, run folder {run_dir}")
    if replacement is not None:
        print(format_table([replacement]))


if __name__ == "__main__":
    main()
