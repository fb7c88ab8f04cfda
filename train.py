"""Train a crosslayer transcoder on a frozen language model's MLPs.

    python train.py configs/topk-clt.json                       # the embedded offline default
    python train.py configs/topk-clt.json --set train.steps=50 --set model.n_features=512
    python train.py --help                                      # every config field

Reads top to bottom: config -> seed -> data -> model -> standardization -> optimizer -> loop
(log, evaluate, checkpoint) -> teardown. Single process; tensor/data parallelism (torchrun) and
--resume are not implemented yet and are refused with a clear message.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from clt.config import main_config
from clt.data import build_source
from clt.trainer import (
    MetricsLog,
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    loss_weights,
    make_run_dir,
    resolve_device,
    save_checkpoint,
    standardized_batches,
    train_step,
)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    cfg, args = main_config(argv)
    if args.resume:
        fail("--resume is not implemented yet (checkpoints are written, resuming is not)")
    if cfg.parallel.data * cfg.parallel.tensor > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("parallel.data/parallel.tensor > 1 and torchrun launches are not implemented yet")
    if cfg.train.mixed_precision != "no":
        fail("train.mixed_precision other than 'no' is not implemented yet")
    torch.manual_seed(cfg.train.seed)
    tcfg = cfg.train

    device = resolve_device(tcfg.device)
    source = build_source(cfg, device)
    model = build_model(cfg, source.d_in, source.d_out, device)
    fit_batch = min(tcfg.batch_tokens, cfg.data.standardize_tokens)
    n_fit = model.standardizer.fit(
        iter(lambda: source.next_batch(fit_batch), None), cfg.data.standardize_tokens
    )
    heldout = source.heldout_batches(cfg.eval.tokens)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    weights = loss_weights(cfg)
    batches = standardized_batches(model, source, tcfg.batch_tokens // tcfg.grad_accum)
    run_dir = make_run_dir(cfg)
    log = MetricsLog(run_dir, cfg)
    print(f"run {run_dir}: L={model.n_layers} d_in={model.d_in} d_out={model.d_out} "
          f"F={model.n_features} R={model.reach} {model.nonlinearity}, standardized on "
          f"{n_fit} tokens, {sum(p.numel() for p in model.parameters()):,} parameters")

    try:
        start, progress = time.perf_counter(), tqdm(range(1, tcfg.steps + 1), unit="step")
        for step in progress:
            metrics = train_step(model, optimizer, scheduler, batches, weights, step - 1, tcfg)
            last = step == tcfg.steps
            if step % cfg.logging.every == 0 or last:
                tokens = step * tcfg.batch_tokens
                metrics["dead_fraction"] = model.dead_mask(weights.dead_tokens).float().mean(1)
                metrics["lr"] = scheduler.get_last_lr()[0]
                metrics["tokens"] = tokens
                metrics["tokens_per_s"] = tokens / (time.perf_counter() - start)
                flat = log.log(step, metrics)
                progress.set_postfix(loss=f"{flat['loss']:.3g}", fvu=f"{flat['fvu/mean']:.3f}",
                                     l0=f"{flat['l0/mean']:.1f}",
                                     tok_s=f"{flat['tokens_per_s']:.0f}")
            if step % cfg.eval.every == 0 or last:
                flat = log.log(step, evaluate(model, heldout))
                progress.write(f"step {step}: held-out FVU {flat['eval/fvu/mean']:.4f}, "
                               f"L0 {flat['eval/l0/mean']:.1f}")
            if step % cfg.checkpoint.every == 0 or last:
                save_checkpoint(run_dir, step, cfg.checkpoint.keep_last, {
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "data": source.state_dict(),
                    "config": cfg.model_dump(mode="json"),
                })
    finally:
        log.close()
        source.close()


if __name__ == "__main__":
    main()
