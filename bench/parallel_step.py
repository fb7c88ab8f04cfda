"""Step time and communication of tensor- and data-parallel CLT training on CPU (gloo), plus the
communication model at the GPU shape.

    .venv/bin/python bench/parallel_step.py                      # L=6 d=256 F=4096 N=1024 k=16
    .venv/bin/python bench/parallel_step.py --L 12 --d 768 --F 4096 --N 1024

One TopK CLT training step (forward, MSE + AuxK with F/64 dead features, backward, Adam, the
dead-feature update) as ``clt.trainer.train_step`` runs it, for TP=1 (one process), TP=2 and
DP=2 (two processes over gloo; the batch is N tokens in every case: TP ranks each produce N/2 and
all-gather them, DP replicas each take N/2). The machine's cores are split evenly between the
processes, so the TP=1 process gets all of them. Reported per layout: median step time, and the
bytes each rank sends per step (``Mesh.comm_bytes``: ring all-reduce 2 (P-1)/P B, all-gather
(P-1) B). On 2 shared CPU cores gloo runs over loopback TCP, so the CPU times show overheads, not
NVLink scaling: the second table projects the GPU shape from the counted bytes (see DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt.losses import LossWeights  # noqa: E402
from clt.model import CrossLayerTranscoder  # noqa: E402
from clt.parallel import GradSync, Mesh, ShardedSource, mesh_from_group, parallelize  # noqa: E402
from clt.trainer import build_optimizer, build_scheduler, train_step  # noqa: E402

LAYOUTS = [("TP=1", 1, 1), ("TP=2", 2, 1), ("DP=2", 1, 2)]  # (name, tensor, data)


class RandomSource:
    """Fixed random activations; each process its own stream (like a sharded LM source)."""

    def __init__(self, L: int, d: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.L, self.d_in, self.d_out = L, d, d

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.L, n, self.d_in, generator=self.g)
        return x, torch.randn(self.L, n, self.d_out, generator=self.g)


def run_layout(mesh: Mesh, args: argparse.Namespace) -> dict:
    kwargs = {"n_layers": args.L, "d_in": args.d, "d_out": args.d, "n_features": args.F,
              "nonlinearity": "topk", "k": args.k}
    model = parallelize(CrossLayerTranscoder(**kwargs), mesh)
    with torch.no_grad():  # F/64 dead features per layer, so AuxK runs
        model.tokens_since_fired[:, : model.n_features // 64] = 10**9
    tcfg = SimpleNamespace(optimizer="adam", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                           warmup_steps=0, decay="constant", min_lr_ratio=1.0, steps=10**6,
                           grad_accum=1, mixed_precision="no", grad_clip=None)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    source = RandomSource(args.L, args.d, seed=mesh.rank)
    if mesh.tp_size > 1:
        source = ShardedSource(source, mesh)
    n = args.N // mesh.dp_size
    batches = iter(lambda: source.next_batch(n), None)
    weights = LossWeights(dead_tokens=10**8)
    sync = GradSync(model.parameters(), mesh) if mesh.dp_size > 1 else None
    times, sent = [], []
    for step in range(args.steps + 1):  # step 0 warms up
        mesh.barrier()
        before, start = mesh.comm_bytes, time.perf_counter()
        train_step(model, optimizer, scheduler, batches, weights, step, tcfg, mesh=mesh,
                   grad_sync=sync)
        mesh.barrier()
        if step:
            times.append(time.perf_counter() - start)
            sent.append(mesh.comm_bytes - before)
    return {"step_s": statistics.median(times), "sent_bytes": statistics.median(sent),
            "params": sum(p.numel() for p in model.parameters())}


def _entry(rank: int, world: int, tp: int, store: str, args: argparse.Namespace,
           out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = run_layout(mesh_from_group(tp, world // tp), args)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, tp, dp in LAYOUTS:
        if tp * dp == 1:
            torch.set_num_threads(args.threads)
            result = run_layout(Mesh.single(), args)
        else:
            with tempfile.TemporaryDirectory() as folder:
                mp.spawn(_entry, args=(tp * dp, tp, f"{folder}/store", args, folder),
                         nprocs=tp * dp, join=True)
                result = json.loads(Path(folder, "rank0.json").read_text())
        rows.append({"layout": name, **result})
    return rows


def projection(L: int, d: int, F: int, N: int, k: int, gbps: float) -> list[str]:
    """Bytes per rank per step of TP=P at the GPU shape, from the collectives the code issues:
    input all-gather (x and y), TopK candidate gather (fp32 score + int64 id), the decoder-output
    all-reduce (main and AuxK outputs stacked), AuxK candidate gather; and DP=P's gradient
    all-reduce."""
    lines = [f"| layout | sent per rank per step | at {gbps:.0f} GB/s |", "|---|---|---|"]
    params = L * d * F + L * F + F * d * L * (L + 1) // 2 + L * d
    for P in (2, 4, 8):
        act = L * N * d * 4
        tp = ((P - 1) / P * 2 * act  # x and y gathered: each rank produced N/P tokens
              + (P - 1) * L * N * k * 12 * 2  # TopK and AuxK candidates
              + 2 * 2 * (P - 1) / P * act)  # decoder all-reduce of [2, L, N, d_out]
        dp = 2 * (P - 1) / P * params * 4
        for name, sent in ((f"TP={P}", tp), (f"DP={P}", dp)):
            lines.append(f"| {name} | {sent / 2**20:,.0f} MiB | {sent / gbps / 1e6:.1f} ms |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("L", 6), ("d", 256), ("F", 4096), ("N", 1024), ("k", 16),
                          ("steps", 3), ("threads", os.cpu_count() or 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--nvlink-gbps", type=float, default=300.0,
                        help="assumed achieved bus bandwidth per GPU for the projection")
    args = parser.parse_args(argv)
    rows = measure(args)
    base = rows[0]["step_s"]
    print(f"CPU, gloo, L={args.L} d={args.d} F={args.F} N={args.N} k={args.k}, "
          f"{args.threads} threads in all, torch {torch.__version__}")
    print("| layout | step (s) | vs TP=1 | sent per rank per step | parameters per rank |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x | "
              f"{r['sent_bytes'] / 2**20:,.1f} MiB | {r['params']:,} |")
    print("\nGPU shape L=12 d=768 F=16384 N=8192 k=16 (model, not measured):")
    print("\n".join(projection(12, 768, 16384, 8192, 16, args.nvlink_gbps)))
    return rows


if __name__ == "__main__":
    main()
