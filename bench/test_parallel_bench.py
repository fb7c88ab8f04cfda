"""Tensor / data parallel step on CPU (gloo) at a tiny shape: keeps ``bench/parallel_step.py``
working and checks its byte counts against the collectives' sizes. For the numbers, run the
script itself at a larger shape (see its docstring)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parallel_step  # noqa: E402


def test_parallel_step_reports_time_and_bytes(capsys):
    L, d, F, N = 2, 32, 256, 64
    rows = {r["layout"]: r for r in parallel_step.main(
        ["--L", str(L), "--d", str(d), "--F", str(F), "--N", str(N), "--steps", "1",
         "--threads", "2"])}
    print(capsys.readouterr().out)
    assert rows["TP=1"]["sent_bytes"] == 0
    # DP=2: the gradient all-reduce (2 (P-1)/P * 4 bytes per parameter) plus a few statistics
    grads = rows["DP=2"]["params"] * 4
    assert grads <= rows["DP=2"]["sent_bytes"] < grads * 1.05
    # TP=2: at least the decoder-output all-reduce and the gathered half of x and y
    act = L * N * d * 4
    assert rows["TP=2"]["sent_bytes"] >= act + act
    assert rows["TP=2"]["params"] < rows["TP=1"]["params"]
