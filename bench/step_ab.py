"""A/B of one training step (``bench/test_step.py``'s sparse step) between two checkouts, in
alternating fresh processes, so that both see the same machine load over time:

    .venv/bin/python bench/step_ab.py OTHER_CHECKOUT [--nonlinearity topk] [--pairs 4] [--steps 8]

Each process builds the problem at the ``issue-cpu`` shape (``CLT_BENCH_SHAPE`` overrides),
runs one warm-up step and ``--steps`` timed steps and reports their median; the summary gives,
per checkout, the median of those medians and the overall minimum. ``OTHER_CHECKOUT`` is a
plain copy of another commit, e.g. ``git worktree add ../base <commit>`` (no venv of its own:
this one runs both, the checkout's own ``clt`` and ``kernels`` first on the path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def worker(tree: Path, nonlinearity: str, steps: int) -> None:
    """One process: the step of ``tree``'s bench/test_step.py, timed ``steps`` times."""
    sys.path[:0] = [str(tree), str(tree / "bench")]
    os.chdir(tree)
    import test_step as b  # the checkout's own: imported once the path is set

    import kernels

    if hasattr(kernels, "cpu_fast_paths"):  # what train.py runs (older checkouts: always on)
        kernels.cpu_fast_paths(True)
    p = b.make_problem(nonlinearity, b.L, b.D, b.F, b.K, b.N, b.DEAD)
    times = []
    for i in range(steps + 1):
        b.reset_dead(p)
        start = time.perf_counter()
        b.train_step(p, b.ours_loss)
        if i:  # the first step warms the allocator and the thread pool
            times.append(time.perf_counter() - start)
    print(statistics.median(times), min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout")
    parser.add_argument("--nonlinearity", default="topk", choices=["topk", "batchtopk", "jumprelu"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.nonlinearity, args.steps)
    if args.pairs < 1 or args.steps < 1:
        sys.exit(f"error: --pairs and --steps must be >= 1 (got {args.pairs}, {args.steps})")
    trees = {"this": HERE, "other": args.other.resolve()}
    if not (trees["other"] / "bench" / "test_step.py").is_file():
        sys.exit(f"error: {args.other} is not a checkout of this project (no bench/test_step.py)")
    env = {**os.environ, "CLT_BENCH_SHAPE": os.environ.get("CLT_BENCH_SHAPE", "issue-cpu")}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for pair in range(args.pairs):
        for name, tree in trees.items():
            done = subprocess.run(
                [sys.executable, __file__, str(args.other), "--worker", str(tree),
                 "--nonlinearity", args.nonlinearity, "--steps", str(args.steps)],
                env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"error: the step of {tree} failed:\n{done.stderr[-2000:]}")
            med, low = map(float, done.stdout.split()[-2:])
            results[name].append((med, low))
            print(f"pair {pair + 1}: {name:5s} median {med:.3f} s, min {low:.3f} s", flush=True)
    for name, rows in results.items():
        medians, lows = [m for m, _ in rows], [lo for _, lo in rows]
        print(f"{name} ({trees[name]}): median of medians {statistics.median(medians):.3f} s, "
              f"min {min(lows):.3f} s")


if __name__ == "__main__":
    main()
