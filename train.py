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
Exit status: 0 done, 1 training diverged (NaN/inf loss, gradient norm or weights; the last good
checkpoint is kept), an I/O failure (e.g. a full disk) or a failed rank, 2 bad config, command
line, run folder (taken, locked, unwritable), checkpoint or data. Errors are one line.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import kernels
from clt.checkpoint import (
    CheckpointError,
    TrainingState,
    clean_run_dir,
    latest_good_checkpoint,
    load_checkpoint,
    quarantine,
    resume_changes,
)
from clt.config import main_config, save_config
from clt.data import DataError, build_source
from clt.data.cache import CacheError
from clt.evaluate import MODES, evaluate_run, format_table
from clt.pages import write_run_pages
from clt.pages.common import PagesError
from clt.parallel import GradSync, Mesh, ShardedSource, init_mesh, shutdown
from clt.plots import plot_feature_density, plot_layer_metrics
from clt.registry import ComponentError
from clt.runs import RunDirError, RunLock, claim_existing, claim_new
from clt.trainer import (
    FiringCounter,
    MetricsLog,
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    frequency_histogram,
    loss_weights,
    new_run_dir,
    nonfinite_weights,
    resolve_device,
    retune_optimizer,
    standardized_batches,
    train_step,
)

# what the divergence check watches, in the order of train_step's "nonfinite" flags
DIVERGENCE_CHECKS = ("loss", "gradient norm", "weights")


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def last_good_checkpoint(run_dir: Path) -> str:
    try:
        return str(latest_good_checkpoint(run_dir, load=False)[0])
    except CheckpointError:
        return "none"


def stop_if_diverged(flags: torch.Tensor, step: int, run_dir: Path) -> None:
    """Exit 1 if any divergence flag is set, naming what diverged and the last checkpoint that
    verifies (nothing is saved after the divergence)."""
    names = [name for name, flag in zip(DIVERGENCE_CHECKS, flags.tolist(), strict=True) if flag > 0]
    if names:
        fail(f"training diverged: the {' and the '.join(names)} became NaN or inf at or before "
             f"step {step}; stopped without saving. Last good checkpoint: "
             f"{last_good_checkpoint(run_dir)} (resume it with a lower train.lr)", status=1)


def heldout_batches(source, cfg) -> list:
    """The evaluation tokens, or a clear error naming the fields when the split is too small."""
    try:
        return source.heldout_batches(cfg.eval.tokens)
    except ValueError as exc:
        raise DataError(f"eval.tokens = {cfg.eval.tokens} held-out tokens cannot be served: "
                        f"{exc} (lower eval.tokens or raise data.lm.heldout_fraction)") from None


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
    kernels.cpu_fast_paths(True)  # opt in to the ops' CPU performance paths (kernels/cpu)
    cfg, args = main_config(argv)
    try:
        mesh = init_mesh(cfg.parallel.tensor, cfg.parallel.data, cfg.parallel.timeout_s)
    except ValueError as exc:
        fail(str(exc))
    lock = None
    try:
        run_dir, lock = claim_run_dir(cfg, args, mesh)
        train(cfg, args, mesh, run_dir)
    except (RunDirError, CheckpointError, CacheError, DataError, ComponentError) as exc:
        fail(rank_prefix(mesh) + str(exc))
    except OSError as exc:  # a full disk, a folder that became unwritable, ...
        what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        fail(f"{rank_prefix(mesh)}{what}; checkpoints written before are intact", status=1)
    except Exception as exc:
        if mesh.world_size > 1:  # name the rank: the other ranks only see a broken collective
            print(f"error: {rank_prefix(mesh)}{type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    finally:
        if lock is not None:
            lock.release()
        shutdown(mesh)


def rank_prefix(mesh: Mesh) -> str:
    return f"rank {mesh.rank} of {mesh.world_size} failed: " if mesh.world_size > 1 else ""


def claim_run_dir(cfg, args, mesh: Mesh) -> tuple[Path, RunLock | None]:
    """Lock the run folder before anything loads (rank 0; the others learn the outcome): a new
    run takes an absent or empty folder, a resume an existing one, cleaned of what an
    interrupted writer left. A second trainer on the same folder is refused here."""
    error = lock = run_dir = None
    if mesh.is_main:
        run_dir = Path(args.resume) if args.resume else new_run_dir(cfg)
        try:
            if args.resume:
                lock = claim_existing(run_dir)
                removed = clean_run_dir(run_dir)
                if removed:
                    print(f"removed {', '.join(removed)} (left by an interrupted run) from "
                          f"{run_dir}", file=sys.stderr)
            else:
                lock = claim_new(run_dir)
                save_config(cfg, run_dir / "config.json")
        except RunDirError as exc:
            error = str(exc)
    error, run_dir = mesh.broadcast_object((error, str(run_dir)))
    if error is not None:
        raise RunDirError(error)
    return Path(run_dir), lock


def resume_state(cfg, run_dir: Path, mesh: Mesh):
    """``(path, state, changes)`` of the newest checkpoint that verifies and loads (rank 0
    chooses; newer broken ones are skipped with a warning and quarantined) and the config fields
    this resume changes."""
    path = state = None
    if mesh.is_main:
        try:
            path, state, skipped = latest_good_checkpoint(
                run_dir, warn=lambda m: print(m, file=sys.stderr))
            for bad in skipped:  # out of the way of rotation, which would keep it over good ones
                print(f"moved it to {quarantine(bad).name}", file=sys.stderr)
        except CheckpointError as exc:
            path = exc
    path = mesh.broadcast_object(path)
    if isinstance(path, CheckpointError):
        raise CheckpointError(str(path))
    if state is None:  # the other ranks read what rank 0 verified
        state = load_checkpoint(path, verify=False)
    changes = resume_changes(state["config"], cfg, path)
    if state["step"] >= cfg.train.steps:
        raise CheckpointError(f"{path} is at step {state['step']} and train.steps is "
                              f"{cfg.train.steps}: nothing to train (add --set train.steps=N "
                              f"with N > {state['step']} to continue)")
    return path, state, changes


class Loop:
    """The steps of the training loop besides the optimizer step: the divergence check, the
    training log, the held-out evaluation (every rank computes; rank 0 writes)."""

    def __init__(self, cfg, mesh: Mesh, run_dir: Path, model, scheduler, counter, weights,
                 heldout: list, log: MetricsLog, first_step: int) -> None:
        self.cfg, self.mesh, self.run_dir, self.model = cfg, mesh, run_dir, model
        self.scheduler, self.counter, self.weights = scheduler, counter, weights
        self.heldout, self.log, self.first_step = heldout, log, first_step
        self.start = time.perf_counter()

    @staticmethod
    def due(step: int, *every: int) -> bool:
        return any(step % n == 0 for n in every)

    def stop_if_diverged(self, nonfinite: torch.Tensor, step: int) -> None:
        """One host sync: the weights' check joins the step flags, the max over every rank."""
        nonfinite[-1] += nonfinite_weights(self.model)
        stop_if_diverged(self.mesh.world_max(nonfinite), step, self.run_dir)

    def log_training(self, step: int, metrics: dict, progress) -> None:
        mesh, tcfg = self.mesh, self.cfg.train
        tokens = (step - self.first_step + 1) * tcfg.batch_tokens
        metrics = mesh.dp_mean_metrics(metrics)
        dead = self.model.dead_mask(self.weights.dead_tokens).float()
        metrics["dead_fraction"] = mesh.gather_features(dead).mean(1)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["tokens"] = step * tcfg.batch_tokens
        metrics["tokens_per_s"] = tokens / (time.perf_counter() - self.start)
        freq = mesh.gather_features(self.counter.read_and_reset())
        flat = self.log.log(step, metrics, frequency_histogram(freq))
        progress.set_postfix(tokens=f"{int(flat['tokens']):,}", loss=f"{flat['loss']:.4g}",
                             fvu=f"{flat['fvu_total']:.3f}", l0=f"{flat['l0/mean']:.1f}",
                             tok_s=f"{flat['tokens_per_s']:.0f}")

    def evaluate(self, step: int, progress) -> dict[str, float]:
        """Held-out metrics, plots; exit 1 when the held-out FVU is not finite."""
        held_out = evaluate(self.model, self.heldout, self.mesh)
        plots = write_plots(self.run_dir, step, held_out) if self.mesh.is_main else {}
        held_out.pop("eval/freq", None)
        metrics = self.log.log(step, held_out, images=plots)
        if not math.isfinite(metrics["eval/fvu_total"]):
            fail(f"training diverged: the held-out FVU is {metrics['eval/fvu_total']} at step "
                 f"{step}; stopped without saving. Last good checkpoint: "
                 f"{last_good_checkpoint(self.run_dir)}", status=1)
        if self.mesh.is_main:
            progress.write(f"step {step}: held-out FVU {metrics['eval/fvu_total']:.4f}, L0 "
                           f"{metrics['eval/l0/mean']:.1f}")
        return metrics


def train(cfg, args, mesh: Mesh, run_dir: Path) -> None:
    tcfg = cfg.train
    resume = path = None
    changes: dict = {}
    if args.resume:
        path, resume, changes = resume_state(cfg, run_dir, mesh)
    torch.manual_seed(tcfg.seed)  # every process builds the same whole model, then its shard

    device = resolve_device(tcfg.device)
    try:
        source = build_source(cfg, device, shard=(mesh.rank, mesh.world_size))
    except CacheError:
        raise
    except ValueError as exc:
        raise DataError(f"data: {exc}") from None
    if mesh.tp_size > 1:
        source = ShardedSource(source, mesh)
    log = None
    try:  # the producer thread stops on every way out: a failure before the loop included
        model = build_model(cfg, source.d_in, source.d_out, device, mesh)
        if resume is None:
            fit_batch = min(tcfg.batch_tokens, cfg.data.standardize_tokens)
            fit_batch = max(fit_batch - fit_batch % mesh.tp_size, mesh.tp_size)
            model.standardizer.fit(
                iter(lambda: source.next_batch(fit_batch), None), cfg.data.standardize_tokens
            )
            mesh.broadcast_(model.standardizer.buffers())  # one set of statistics for every rank
        heldout = heldout_batches(source, cfg)
        optimizer = build_optimizer(model, tcfg)
        scheduler = build_scheduler(optimizer, tcfg)
        scaler = torch.amp.GradScaler(device.type) if tcfg.mixed_precision == "fp16" else None
        counter = FiringCounter(model.n_layers, model.n_features, device)
        state = TrainingState(model, optimizer, scheduler, counter, scaler, source)
        first_step = 1
        if resume is not None:  # standardization statistics come from the checkpoint
            first_step = state.restore(resume, path, cfg.model.n_features, mesh)
            if any(name.startswith("train.") for name in changes):
                retune_optimizer(optimizer, scheduler, tcfg)
        weights = loss_weights(cfg)
        batches = standardized_batches(model, source,
                                       tcfg.batch_tokens // tcfg.grad_accum // mesh.dp_size)
        grad_sync = GradSync(model.parameters(), mesh) if mesh.dp_size > 1 else None
        log = MetricsLog(run_dir, cfg, write=mesh.is_main)
        if changes and mesh.is_main:  # the run's config says what it now trains with
            cfg.logging = cfg.logging.model_copy(
                update={"run_dir": str(run_dir.parent), "run_name": run_dir.name})
            save_config(cfg, run_dir / "config.json")
            log.note(first_step - 1, "resume", {k: list(v) for k, v in changes.items()})
            print("resume changes "
                  + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items()))
        n_params = sum(p.numel() for p in model.parameters())
        if mesh.is_main:
            print(f"run {run_dir}: L={model.n_layers} d_in={model.d_in} d_out={model.d_out} "
                  f"F={cfg.model.n_features} R={model.reach} {cfg.nonlinearity.kind}, "
                  f"{n_params:,} parameters"
                  f"{' per tensor-parallel rank' if mesh.tp_size > 1 else ''}, standardized "
                  f"on {int(model.standardizer.n_tokens)} tokens, from step "
                  f"{first_step}; processes: tensor={mesh.tp_size} x data={mesh.dp_size}")

        loop = Loop(cfg, mesh, run_dir, model, scheduler, counter, weights, heldout, log,
                    first_step)
        nonfinite = torch.zeros(len(DIVERGENCE_CHECKS), device=device)  # loss, grad norm, weights
        eval_metrics: dict[str, float] = {}
        with profiler(run_dir, tcfg.profile_steps, device, mesh) as prof:
            # rank 0 draws a bar on a terminal only (logs and captured stderr stay readable)
            progress = tqdm(range(first_step, tcfg.steps + 1), unit="step",
                            initial=first_step - 1, total=tcfg.steps,
                            disable=None if mesh.is_main else True)
            for step in progress:
                metrics = train_step(model, optimizer, scheduler, batches, weights, step - 1, tcfg,
                                     scaler, counter, mesh, grad_sync)
                nonfinite += metrics.pop("nonfinite")
                if prof is not None:
                    prof.step()
                last = step == tcfg.steps
                if last or loop.due(step, cfg.logging.every, cfg.eval.every, cfg.checkpoint.every):
                    loop.stop_if_diverged(nonfinite, step)  # never a checkpoint of a diverged run
                if last or loop.due(step, cfg.logging.every):
                    loop.log_training(step, metrics, progress)
                if last or loop.due(step, cfg.eval.every):
                    eval_metrics = loop.evaluate(step, progress)
                if last or loop.due(step, cfg.checkpoint.every):
                    state.save(run_dir, step, cfg, mesh)
        replacement = None
        if mesh.is_main and cfg.data.source == "lm" and cfg.eval.replacement_tokens > 0:
            replacement = evaluate_run(run_dir, cfg.eval.replacement_tokens, device)
            log.log(tcfg.steps, {f"replacement/{mode}/{name}": value
                                 for mode in MODES for name, value in replacement[mode].items()})
        if mesh.is_main and cfg.data.source == "lm" and cfg.eval.pages:
            try:  # the run is saved: a page that cannot be drawn must not fail it
                write_run_pages(run_dir, cfg, device, log=print, wandb_run=log.wandb)
            except PagesError as exc:
                print(f"pages skipped: {exc}", file=sys.stderr)
    finally:
        if log is not None:
            log.close()
        source.close()
    if eval_metrics and mesh.is_main:
        per_layer = " ".join(f"{eval_metrics[f'eval/fvu/l{i}']:.3f}"
                             for i in range(model.n_layers))
        print(f"done in {time.perf_counter() - loop.start:.0f} s: held-out FVU "
              f"{eval_metrics['eval/fvu_total']:.4f} (per layer {per_layer}), mean L0 "
              f"{eval_metrics['eval/l0/mean']:.1f}, run folder {run_dir}")
    if replacement is not None:
        print(format_table([replacement]))


if __name__ == "__main__":
    main()
