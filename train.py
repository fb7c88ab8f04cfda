"""Train a crosslayer transcoder on a frozen language model's MLPs.

    python train.py configs/topk-clt.json                       # the embedded offline default
    python train.py configs/topk-clt.json --set train.steps=50 --set model.n_features=512
    python train.py --resume runs/NAME                          # continue from the last checkpoint
    python train.py --help                                      # every config field

Reads top to bottom: config -> seed -> data -> model -> standardization (or resume) -> optimizer
-> loop (log, evaluate, checkpoint) -> summary -> teardown. Single process: tensor/data
parallelism under torchrun is not implemented yet and is refused with a clear message.
Exit status: 0 done, 1 training diverged (NaN/inf loss; the last good checkpoint is kept),
2 bad config, command line or checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from clt.checkpoint import (
    CheckpointError,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clt.config import main_config
from clt.data import build_source
from clt.evaluate import MODES, evaluate_run, format_table
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


def profiler(run_dir: Path, steps: int, device: torch.device):
    """torch.profiler over ``steps`` steps after one warmup step, written as a Chrome trace."""
    if steps == 0:
        return contextlib.nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trace = run_dir / "profile_trace.json"
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
    if cfg.parallel.data * cfg.parallel.tensor > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("parallel.data/parallel.tensor > 1 and torchrun launches are not implemented yet")
    tcfg = cfg.train
    resume = None
    if args.resume:
        try:
            path = latest_checkpoint(Path(args.resume))
            resume = load_checkpoint(path)
            check_compatible(resume["config"], cfg, path)
        except CheckpointError as exc:
            fail(str(exc))
    torch.manual_seed(tcfg.seed)

    device = resolve_device(tcfg.device)
    source = build_source(cfg, device)
    model = build_model(cfg, source.d_in, source.d_out, device)
    if resume is None:
        fit_batch = min(tcfg.batch_tokens, cfg.data.standardize_tokens)
        model.standardizer.fit(
            iter(lambda: source.next_batch(fit_batch), None), cfg.data.standardize_tokens
        )
    heldout = source.heldout_batches(cfg.eval.tokens)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler(device.type) if tcfg.mixed_precision == "fp16" else None
    counter = FiringCounter(model.n_layers, model.n_features, device)
    first_step = 1
    if resume is not None:
        # standardization statistics come from the checkpoint, never re-estimated
        try:
            load_model_state(model, resume["model"], path)
        except CheckpointError as exc:
            fail(str(exc))
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        counter.load_state_dict(resume["counter"])
        if scaler is not None and "scaler" in resume:
            scaler.load_state_dict(resume["scaler"])
        source.load_state_dict(resume["data"])
        set_rng_state(resume["rng"])
        first_step = resume["step"] + 1
    run_dir = Path(args.resume) if args.resume else make_run_dir(cfg)
    weights = loss_weights(cfg)
    batches = standardized_batches(model, source, tcfg.batch_tokens // tcfg.grad_accum)
    log = MetricsLog(run_dir, cfg)
    print(f"run {run_dir}: L={model.n_layers} d_in={model.d_in} d_out={model.d_out} "
          f"F={model.n_features} R={model.reach} {model.nonlinearity}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"standardized on {int(model.standardizer.n_tokens)} tokens, from step {first_step}")

    def save(step: int) -> Path:
        return save_checkpoint(run_dir, step, cfg.checkpoint.keep_last, {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "counter": counter.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "data": source.state_dict(), "rng": rng_state(),
            "config": cfg.model_dump(mode="json"),
        })

    nonfinite = torch.zeros((), device=device)
    eval_metrics: dict[str, float] = {}
    start = time.perf_counter()
    steps = range(first_step, tcfg.steps + 1)
    try:
        with profiler(run_dir, tcfg.profile_steps, device) as prof:
            progress = tqdm(steps, unit="step", initial=first_step - 1, total=tcfg.steps)
            for step in progress:
                metrics = train_step(model, optimizer, scheduler, batches, weights, step - 1, tcfg,
                                     scaler, counter)
                nonfinite += metrics.pop("nonfinite")
                if prof is not None:
                    prof.step()
                last = step == tcfg.steps
                check_now = last or any(step % every == 0 for every in
                                        (cfg.logging.every, cfg.eval.every, cfg.checkpoint.every))
                if check_now and nonfinite.item() > 0:
                    good = sorted(run_dir.glob("step_*.pt"))
                    fail(f"the loss became NaN or inf at or before step {step}; stopped without "
                         f"saving. Last good checkpoint: {good[-1] if good else 'none'}", status=1)
                if step % cfg.logging.every == 0 or last:
                    tokens = (step - first_step + 1) * tcfg.batch_tokens
                    metrics["dead_fraction"] = model.dead_mask(weights.dead_tokens).float().mean(1)
                    metrics["lr"] = scheduler.get_last_lr()[0]
                    metrics["tokens"] = step * tcfg.batch_tokens
                    metrics["tokens_per_s"] = tokens / (time.perf_counter() - start)
                    flat = log.log(step, metrics, frequency_histogram(counter.read_and_reset()))
                    progress.set_postfix(tokens=f"{int(flat['tokens']):,}",
                                         loss=f"{flat['loss']:.4g}", fvu=f"{flat['fvu_total']:.3f}",
                                         l0=f"{flat['l0/mean']:.1f}",
                                         tok_s=f"{flat['tokens_per_s']:.0f}")
                if step % cfg.eval.every == 0 or last:
                    held_out = evaluate(model, heldout)
                    plots = write_plots(run_dir, step, held_out)
                    eval_metrics = log.log(step, held_out, images=plots)
                    progress.write(f"step {step}: held-out FVU {eval_metrics['eval/fvu_total']:.4f}"
                                   f", L0 {eval_metrics['eval/l0/mean']:.1f}")
                if step % cfg.checkpoint.every == 0 or last:
                    save(step)
        replacement = None
        if cfg.data.source == "lm" and cfg.eval.replacement_tokens > 0:
            replacement = evaluate_run(run_dir, cfg.eval.replacement_tokens, device)
            log.log(tcfg.steps, {f"replacement/{mode}/{name}": value
                                 for mode in MODES for name, value in replacement[mode].items()})
    finally:
        log.close()
        source.close()
    if eval_metrics:
        per_layer = " ".join(f"{eval_metrics[f'eval/fvu/l{i}']:.3f}"
                             for i in range(model.n_layers))
        print(f"done in {time.perf_counter() - start:.0f} s: held-out FVU "
              f"{eval_metrics['eval/fvu_total']:.4f} (per layer {per_layer}), mean L0 "
              f"{eval_metrics['eval/l0/mean']:.1f}, run folder {run_dir}")
    if replacement is not None:
        print(format_table([replacement]))


if __name__ == "__main__":
    main()
