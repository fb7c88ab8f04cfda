"""``train.py`` under torchrun on CPU (gloo): tensor- and data-parallel runs, sharded checkpoints
that resume on another layout and load as one model, and no hang when a rank fails."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _testing import SYNTHETIC, newest_checkpoint, write_run_config

from clt.export import export_run, load_exported
from clt.trainer import load_run

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLT_FORCE_TORCH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def test_tensor_parallel_run_resumes_on_one_process_and_exports(tmp_path, monkeypatch):
    synthetic = {**SYNTHETIC, "d_out": SYNTHETIC["d_in"]}  # the export format has one width
    config, run_dir = write_run_config(tmp_path, "topk", parallel={"tensor": 2},
                                       data={"synthetic": synthetic})
    done = torchrun("train.py", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor=2 x data=1" in done.stdout
    path = newest_checkpoint(run_dir)
    assert path.name == "step_00000008" and (path / "tp1.pt").is_file()
    assert steps_logged(run_dir) == [2, 4, 6, 8]
    cfg, model, step = load_run(run_dir)  # merged into one single-device model
    assert step == 8 and model.W_enc.shape[-1] == 32 and model.n_features == 32
    # the two shards were initialised differently (no duplicated features)
    assert not torch.allclose(model.W_enc[..., :16], model.W_enc[..., 16:])
    export_run(run_dir, tmp_path / "exported", n_tokens=64, log=lambda *_: None)
    exported = load_exported(tmp_path / "exported")
    assert exported["W_enc"][0].shape == (32, 16) and exported["W_dec"][0].shape == (32, 3, 16)
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    import train

    train.main(["--resume", str(run_dir), "--set", "parallel.tensor=1", "--set",
                "train.steps=10"])
    assert newest_checkpoint(run_dir).name == "step_00000010.pt"
    assert steps_logged(run_dir)[-1] == 10


def test_data_parallel_lm_run_shards_the_token_stream(tmp_path):
    config, run_dir = write_run_config(tmp_path, "batchtopk", source="lm",
                                       parallel={"data": 2}, train={"steps": 4},
                                       eval={"every": 4, "tokens": 64, "replacement_tokens": 0})
    done = torchrun("train.py", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    path = newest_checkpoint(run_dir)
    ranks = [torch.load(path / f"rank{g}.pt", weights_only=False) for g in range(2)]
    streams = [r["data"]["tokens"] for r in ranks]
    assert [s["shard"] for s in streams] == [[0, 2], [1, 2]]
    assert streams[0]["position"] == streams[1]["position"] > 0


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_stops_every_rank(tmp_path, mode):
    config, _ = write_run_config(tmp_path, "topk", parallel={"tensor": 2, "timeout_s": 10.0})
    start = time.monotonic()
    done = torchrun("tests/scripts/faulty_rank.py", mode, str(config), timeout=240)
    assert done.returncode != 0
    assert time.monotonic() - start < 200
    if mode == "raise":
        assert "error: rank 1 of 2 failed: RuntimeError: injected failure" in done.stderr


def test_tensor_parallel_resume_on_the_same_layout_is_exact(tmp_path):
    train_cfg = {"steps": 8, "decay": "constant", "warmup_steps": 0}
    whole, whole_dir = write_run_config(tmp_path, "batchtopk", name="whole",
                                        parallel={"tensor": 2}, train=train_cfg)
    part, part_dir = write_run_config(tmp_path, "batchtopk", name="part",
                                      parallel={"tensor": 2}, train={**train_cfg, "steps": 4})
    for args in (["train.py", str(whole)], ["train.py", str(part)],
                 ["train.py", "--resume", str(part_dir), "--set", "train.steps=8"]):
        done = torchrun(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "from step 5" in done.stdout
    a, b = (torch.load(newest_checkpoint(d) / "tp1.pt", weights_only=False)
            for d in (whole_dir, part_dir))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
