"""train.py end to end: every nonlinearity, exact resume, atomic checkpoints, divergence, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _testing import write_run_config

import clt.checkpoint
import clt.trainer
import kernels
import train
from clt.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    """The trainer's logic is under test here, not the kernels (tested on their own): run the
    torch paths instead of Triton-through-the-interpreter to keep these end-to-end runs fast."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


write_config = write_run_config


def final_state(run_dir: Path) -> dict:
    return torch.load(sorted(run_dir.glob("step_*.pt"))[-1], weights_only=False)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "relu"])
def test_end_to_end_each_nonlinearity(tmp_path, kind, capsys):
    config, run_dir = write_config(tmp_path, kind)
    train.main([str(config)])
    assert sorted(p.name for p in run_dir.glob("step_*.pt")) == ["step_00000006.pt",
                                                                   "step_00000008.pt"]
    assert load_config(run_dir / "config.json") == load_config(config)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6, 8]
    assert {"fvu_total", "l0/mean", "dead_fraction/mean", "lr", "tokens_per_s",
            "freq_hist/never"} <= set(lines[-2])
    assert "held-out FVU" in capsys.readouterr().out
    for png in ("feature_density.png", "layers.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("source", ["synthetic", "lm"])
def test_resume_is_bit_exact(tmp_path, source, monkeypatch):
    full_cfg, full_dir = write_config(tmp_path / "full", "batchtopk", source)
    train.main([str(full_cfg)])

    cut_cfg, cut_dir = write_config(tmp_path / "cut", "batchtopk", source)
    real_step = clt.trainer.train_step

    def killed_after_5(*args, **kwargs):
        if args[5] == 5:  # 0-based step index: the 6th step never happens
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", killed_after_5)
    with pytest.raises(KeyboardInterrupt):
        train.main([str(cut_cfg)])
    assert final_state(cut_dir)["step"] == 3
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(["--resume", str(cut_dir)])

    full, resumed = final_state(full_dir), final_state(cut_dir)
    assert resumed["step"] == full["step"] == 8
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert torch.equal(full["counter"]["counts"], resumed["counter"]["counts"])


def test_resume_refuses_a_different_shape(tmp_path, capsys):
    config, run_dir = write_config(tmp_path)
    train.main([str(config)])
    with pytest.raises(SystemExit) as exc:
        train.main([str(config), "--resume", str(run_dir), "--set", "model.n_features=64"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model.n_features: checkpoint has 32, config has 64" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        train.main([str(config), "--resume", str(tmp_path / "empty")])
    assert exc.value.code == 2 and "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "nowhere/config.json" in capsys.readouterr().err


def test_checkpoint_from_before_new_config_fields_still_resumes(tmp_path):
    """A config saved before a field existed (here model.skip and model.architecture) compares
    as that field's default, not as a different shape."""
    config, run_dir = write_config(tmp_path, train={"steps": 3})
    train.main([str(config)])
    path = run_dir / "step_00000003.pt"
    state = torch.load(path, weights_only=False)
    for field in ("skip", "architecture", "molt_rank_groups"):
        state["config"]["model"].pop(field, None)  # molt_rank_groups: only in older configs
    torch.save(state, path)
    (run_dir / "step_00000003.pt.sha256").unlink()  # as written before checksums existed
    train.main([str(config), "--resume", str(run_dir), "--set", "train.steps=4"])
    assert (run_dir / "step_00000004.pt").is_file()


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    config, run_dir = write_config(tmp_path, checkpoint={"every": 3, "keep_last": 1})
    real_save = torch.save
    calls = []

    def crash_on_second(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(clt.checkpoint.torch, "save", crash_on_second)
    with pytest.raises(SystemExit) as exc:
        train.main([str(config)])
    assert exc.value.code == 1
    monkeypatch.setattr(clt.checkpoint.torch, "save", real_save)
    assert [p.name for p in run_dir.glob("step_*.pt")] == ["step_00000003.pt"]
    assert not list(run_dir.glob(".*.tmp"))  # the partial file is gone
    assert clt.checkpoint.load_checkpoint(run_dir / "step_00000003.pt")["step"] == 3


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    config, run_dir = write_config(tmp_path)
    real = clt.trainer.compute_losses

    def nan_from_step_4(model, x, y, weights, step, *args):
        out = real(model, x, y, weights, step, *args)
        if step >= 4:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(clt.trainer, "compute_losses", nan_from_step_4)
    with pytest.raises(SystemExit) as exc:
        train.main([str(config)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "NaN or inf at or before step 6" in err and "step_00000003.pt" in err
    assert [p.name for p in run_dir.glob("step_*.pt")] == ["step_00000003.pt"]


def test_wandb_offline_run_is_written(tmp_path):
    config, run_dir = write_config(tmp_path, train={"steps": 2}, logging={"wandb_mode": "offline"})
    train.main([str(config)])
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_bad_config_exits_2_without_traceback(tmp_path):
    config, _ = write_config(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config),
                           "--set", "nonlinearity.k=1000"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "config error: nonlinearity.k: must be <= model.n_features = 32" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind, precision", [("topk", "bf16"), ("jumprelu", "fp16")])
def test_mixed_precision_keeps_float32_master_weights(tmp_path, kind, precision):
    config, run_dir = write_config(tmp_path, kind, train={"mixed_precision": precision,
                                                           "steps": 3})
    train.main([str(config)])
    state = final_state(run_dir)
    assert all(v.dtype == torch.float32 for k, v in state["model"].items()
               if k in ("W_enc", "W_dec", "b_enc", "b_dec", "log_threshold"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert (state["scaler"] is not None) == (precision == "fp16")


def test_lm_run_ends_with_replacement_metrics(tmp_path, capsys):
    config, run_dir = write_config(tmp_path, "topk", "lm", train={"steps": 3},
                                   eval={"replacement_tokens": 64})
    train.main([str(config)])
    out = capsys.readouterr().out
    assert "[open]" in out and "[closed]" in out and "held-out FVU" in out
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"replacement/open/ce_recovered", "replacement/closed/kl"} <= set(last)


def test_lm_run_writes_its_pages_when_asked(tmp_path):
    config, run_dir = write_config(tmp_path, "topk", "lm", train={"steps": 2},
                                   eval={"every": 2, "tokens": 64, "replacement_tokens": 0,
                                         "graph_prompt_tokens": 8, "pages": True},
                                   checkpoint={"every": 2})
    train.main([str(config)])
    pages = run_dir / "pages"
    assert (pages / "index.html").is_file() and (pages / "features" / "index.html").is_file()
    assert (pages / "graph" / "index.html").is_file()


def test_cpu_fast_paths_are_opt_in(monkeypatch):
    """A bare ``import kernels`` runs each op's torch specification (a fresh process: this one
    opted in, tests/conftest.py); ``train.main`` opts in to the CPU paths (here: before its config
    fails to load), unless ``CLT_CPU_FAST=0``."""
    env = {k: v for k, v in os.environ.items() if k != "CLT_CPU_FAST"}
    done = subprocess.run([sys.executable, "-c", "import kernels; "
                           "print(kernels.cpu_fast_paths.enabled())"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
    monkeypatch.delenv("CLT_CPU_FAST", raising=False)
    for env_value, want in ((None, True), ("0", False)):
        if env_value is not None:
            monkeypatch.setenv("CLT_CPU_FAST", env_value)
        with kernels.cpu_fast_paths(False):  # restored afterwards
            with pytest.raises(SystemExit):
                train.main(["configs/topk-clt.json", "--set", "train.steps=0"])
            assert kernels.cpu_fast_paths.enabled() is want
