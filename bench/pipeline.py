"""Whole-pipeline figure: tokens/s of ``train.py`` and where a step's wall time goes.

    .venv/bin/python bench/pipeline.py                    # default config
    .venv/bin/python bench/pipeline.py configs/topk-clt.json --steps 40 \
        --profile-steps 20 --set model.n_features=4096

Runs ``train.main`` in this process on the given config (default ``configs/topk-clt.json``, the
offline SmolLM2 default: LM forward + CLT) for ``--steps`` steps with ``train.profile_steps``,
evaluation and the replacement-model metrics off until the last step, into a temporary run
folder. Before it starts, three functions are wrapped in ``torch.profiler.record_function``
labels (no file of the project is changed):

- ``pipeline/train_step``: ``clt.trainer.train_step`` as ``train.py`` calls it;
- ``pipeline/data``: each ``next()`` of ``standardized_batches`` inside it (taking a batch from
  the activation buffer, standardizing it, moving it to the device, and, when the buffer runs
  low, waiting for the producer or running the LM itself);
- ``pipeline/lm_forward``: ``clt.data.lm.lm_activations``, the LM forward with its hooks. It
  usually runs in the producer thread, which torch.profiler does not record, so its wall time is
  also timed directly (per thread).

From the Chrome trace of the profiled steps (steps 2 .. profile_steps + 1; step 1 is the
profiler's warmup) it reports tokens/s over the profiled steps (and ``train.py``'s own
``tokens_per_s``, which includes the first buffer fill), and the shares of the profiled wall
time in the CLT step (train_step minus data), data movement (ops inside ``pipeline/data`` that
are not the LM), waiting for LM activations (the idle rest of ``pipeline/data``) and the LM
forward (on the main thread, plus the producer thread's, which overlaps the CLT step). Not a
pytest benchmark: the first buffer fill alone runs ~260 LM batches (~15 s on 2 threads), so
``pytest bench`` does not pay for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import clt.data.activations as activations  # noqa: E402
import train  # noqa: E402

LABELS = ("pipeline/train_step", "pipeline/data", "pipeline/lm_forward")


class LMTimer:
    """Wall-clock spans of the LM forward per thread (torch.profiler sees the main thread only)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, fn):
        def lm_activations(*args, **kwargs):
            t0 = time.perf_counter()
            with torch.profiler.record_function("pipeline/lm_forward"):
                out = fn(*args, **kwargs)
            with self._lock:
                self.spans.append((threading.current_thread().name, t0, time.perf_counter()))
            return out

        return lm_activations

    def seconds(self, start: float, end: float, main: bool) -> float:
        """LM seconds inside ``[start, end]`` on the main thread (or on the other threads)."""
        main_name = threading.main_thread().name
        return sum(max(0.0, min(b, end) - max(a, start)) for name, a, b in self.spans
                   if (name == main_name) == main)


def install(timer: LMTimer, step_spans: list[tuple[float, float]]) -> None:
    """Wrap the three functions in the places ``train.main`` looks them up."""
    activations.lm_activations = timer.wrap(activations.lm_activations)
    batches_fn, step_fn = train.standardized_batches, train.train_step

    def standardized_batches(*args, **kwargs):
        inner = batches_fn(*args, **kwargs)
        while True:
            with torch.profiler.record_function("pipeline/data"):
                batch = next(inner)
            yield batch

    def train_step(*args, **kwargs):
        t0 = time.perf_counter()
        with torch.profiler.record_function("pipeline/train_step"):
            out = step_fn(*args, **kwargs)
        step_spans.append((t0, time.perf_counter()))
        return out

    train.standardized_batches, train.train_step = standardized_batches, train_step


def trace_shares(trace_path: Path) -> dict[str, float]:
    """Seconds per label over the profiled steps, and the op time inside ``pipeline/data``."""
    events = [e for e in json.loads(trace_path.read_text())["traceEvents"]
              if e.get("ph") == "X" and e.get("tid") == e.get("pid")]
    steps = [e for e in events if e["name"].startswith("ProfilerStep")]
    totals: dict[str, float] = defaultdict(float)
    totals["wall"] = sum(e["dur"] for e in steps) / 1e6
    for e in events:
        if e["name"] in LABELS:
            totals[e["name"]] += e["dur"] / 1e6
    # ops directly under pipeline/data (outermost only) that are not the LM: data movement
    data = sorted((e for e in events if e["name"] == "pipeline/data"), key=lambda e: e["ts"])
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    moved = 0.0
    for window in data:
        lo, hi = window["ts"], window["ts"] + window["dur"]
        end = lo
        for op in ops:
            if op["ts"] < end or op["ts"] < lo:
                continue
            if op["ts"] >= hi:
                break
            end = op["ts"] + op["dur"]
            moved += op["dur"]
    lm_main = totals["pipeline/lm_forward"]
    totals["data_ops"] = max(0.0, moved / 1e6 - lm_main)
    totals["steps"] = len(steps)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "topk-clt.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=15)
    parser.add_argument("--set", action="append", default=[], help="extra train.py overrides")
    args = parser.parse_args()
    if not 0 < args.profile_steps < args.steps - 1:
        parser.error("need 0 < --profile-steps < --steps - 1")
    timer, step_spans = LMTimer(), []
    install(timer, step_spans)
    with tempfile.TemporaryDirectory(prefix="clt-pipeline-") as tmp:
        overrides = [
            f"train.steps={args.steps}", f"train.profile_steps={args.profile_steps}",
            f"train.warmup_steps={min(30, args.steps - 1)}", "eval.replacement_tokens=0",
            f"eval.every={args.steps}", f"checkpoint.every={args.steps}",
            "logging.wandb_mode=disabled", f"logging.run_dir={tmp}", *args.set,
        ]
        argv = [args.config] + [arg for o in overrides for arg in ("--set", o)]
        train.main(argv)
        run_dir = next(p for p in Path(tmp).iterdir() if p.is_dir())
        shares = trace_shares(run_dir / "profile_trace.json")
        cfg = json.loads((run_dir / "config.json").read_text())
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_tok_s = next((m["tokens_per_s"] for m in reversed(last) if "tokens_per_s" in m),
                           None)
    # the profiler's schedule: step 1 is its warmup, steps 2 .. profile_steps + 1 are recorded
    profiled = step_spans[1 : 1 + args.profile_steps]
    start, end = profiled[0][0], profiled[-1][1]
    lm_other = timer.seconds(start, end, main=False)
    wall = shares["wall"]
    batch = cfg["train"]["batch_tokens"]
    step = shares["pipeline/train_step"] - shares["pipeline/data"]
    wait = max(0.0, shares["pipeline/data"] - shares["data_ops"] - shares["pipeline/lm_forward"])
    rows = [
        ("CLT step (forward, losses, backward, Adam)", step),
        ("data movement (buffer gather, standardize, copy)", shares["data_ops"]),
        ("LM forward on the main thread", shares["pipeline/lm_forward"]),
        ("waiting for the producer's LM activations", wait),
        ("other (logging, loop)", max(0.0, wall - shares["pipeline/train_step"])),
    ]
    model, nl = cfg["model"], cfg["nonlinearity"]
    print(f"\n--- pipeline: {Path(args.config).name}, L={len(model['layers'] or [])} "
          f"F={model['n_features']} {nl['kind']} k={nl.get('k')}, batch {batch} tokens, "
          f"{torch.get_num_threads()} threads, {int(shares['steps'])} profiled steps ---")
    print(f"tokens/s over the profiled steps: {batch * shares['steps'] / wall:,.0f}  "
          f"(train.py's tokens_per_s since start, first buffer fill included: "
          f"{train_tok_s:,.0f})")
    for name, seconds in rows:
        print(f"  {name:<52}{seconds / shares['steps'] * 1e3:9.1f} ms/step {seconds / wall:7.1%}")
    print(f"  {'LM forward in the producer thread (overlaps)':<52}"
          f"{lm_other / shares['steps'] * 1e3:9.1f} ms/step {lm_other / (end - start):7.1%}")


if __name__ == "__main__":
    main()
