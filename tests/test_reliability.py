"""Nothing a user does loses, mixes or silently trusts bad data; every failure is one clear line.

Each test runs the real command line (``train.py``, ``python -m clt.export``, torchrun) as a
careless user would and asserts the exit status, that stderr is a few lines without a
traceback, and that no earlier checkpoint or run changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _testing import SYNTHETIC, write_run_config

from clt.checkpoint import (
    CheckpointError,
    TrainingState,
    clean_run_dir,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)
from clt.parallel import Mesh

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "CLT_FORCE_TORCH": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
               timeout=timeout)


def assert_fails_cleanly(proc: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    """Exit ``status``, at most three lines on stderr, the last an ``error: ...``, no traceback,
    and every needle in that message."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert 1 <= len(lines) <= 3 and "error: " in lines[-1], proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the lock file's holder line aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def trained(tmp_path: Path, name: str = "run", **sections) -> tuple[Path, Path]:
    config, run_dir = write_run_config(tmp_path, "topk", name=name, **sections)
    done = run("train.py", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    return config, run_dir


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def can_mount() -> bool:
    """A private mount namespace (root on Linux): real tmpfs and read-only mounts for tests."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"],
        capture_output=True).returncode == 0


def run_on_mount(folder: Path, options: str, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` with a fresh tmpfs mounted (``-o options``) on ``folder``, visible to
    that command only."""
    script = (f'mount -t tmpfs -o {options} tmpfs "$1" && shift && exec "$@"')
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(folder),
                           sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


# ---- run folders: reuse, concurrency, names ------------------------------------------------


def test_a_second_trainer_or_resume_of_a_live_run_is_refused(tmp_path):
    config, run_dir = write_run_config(
        tmp_path, "topk", train={"steps": 100_000}, logging={"every": 1000},
        eval={"every": 100_000}, checkpoint={"every": 20, "keep_last": 2})
    live = subprocess.Popen([sys.executable, "train.py", str(config)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run_dir):
            assert live.poll() is None and time.monotonic() < deadline, live.stderr.read()
            time.sleep(0.2)
        second = run("train.py", str(config))
        assert_fails_cleanly(second, 2, "in use by another trainer", f"pid {live.pid}")
        resumed = run("train.py", "--resume", str(run_dir))
        assert_fails_cleanly(resumed, 2, "in use by another trainer")
        assert live.poll() is None  # the live run goes on
    finally:
        live.send_signal(signal.SIGKILL)  # a crash: no cleanup, the lock dies with the process
        live.wait()
    killed_at = load_checkpoint(list_checkpoints(run_dir)[-1])["step"]
    done = run("train.py", "--resume", str(run_dir), "--set", f"train.steps={killed_at + 5}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["step"] == killed_at + 5


def test_a_reused_run_name_is_refused_and_the_run_untouched(tmp_path):
    config, run_dir = trained(tmp_path)
    before = snapshot(run_dir)
    again = run("train.py", str(config), "--set", "train.lr=0.1")
    assert_fails_cleanly(again, 2, "already exists and is not empty", f"--resume {run_dir}")
    assert snapshot(run_dir) == before
    escape = run("train.py", str(config), "--set", "logging.run_name=../escaped")
    assert_fails_cleanly(escape, 2, "logging.run_name")
    assert not (tmp_path / "escaped").exists()


def test_unusable_run_folders_fail_before_anything_loads(tmp_path):
    config, _ = write_run_config(tmp_path, "topk")
    (tmp_path / "a_file").write_text("x")
    under_file = run("train.py", str(config), "--set", f"logging.run_dir={tmp_path / 'a_file'}")
    assert_fails_cleanly(under_file, 2, "is a file, not a folder")
    (tmp_path / "ro").mkdir()
    args = ("train.py", str(config), "--set", f"logging.run_dir={tmp_path / 'ro'}")
    if can_mount():  # a read-only mount refuses root too
        readonly = run_on_mount(tmp_path / "ro", "ro,size=64k", *args)
    else:
        (tmp_path / "ro").chmod(0o555)
        readonly = run(*args)
    assert_fails_cleanly(readonly, 2, "is not writable")


# ---- export never destroys a run ------------------------------------------------------------


def test_export_refuses_its_own_run_and_every_folder_around_it(tmp_path, capsys):
    from clt.export import main

    _, run_dir = trained(tmp_path, train={"steps": 3}, checkpoint={"every": 3})
    before = snapshot(tmp_path)
    for out in (run_dir, run_dir / "sub", run_dir.parent, tmp_path):
        with pytest.raises(SystemExit) as exc:  # in-process: four interpreter starts saved
            main([str(run_dir), str(out), "--overwrite", "--tokens", "64"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and str(out) in err, err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([str(run_dir), str(tmp_path / "a_file" / "out")])
    assert exc.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == {**before, "a_file": snapshot(tmp_path)["a_file"]}


# ---- checkpoints: atomic sharded folders, checksums ------------------------------------------


def test_a_kill_before_the_sharded_rename_resumes_from_the_last_complete_checkpoint(tmp_path):
    config, run_dir = write_run_config(tmp_path, "topk", parallel={"tensor": 2})
    killed = torchrun("tests/scripts/kill_before_rename.py", "6", str(config))
    assert killed.returncode != 0
    leftover = [p for p in run_dir.iterdir() if p.name.startswith(".step_00000006")]
    assert len(leftover) == 1 and (leftover[0] / "manifest.json").is_file()  # complete, unnamed
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000003"]
    done = torchrun("train.py", "--resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from step 4" in done.stdout and leftover[0].name in done.stderr
    assert not leftover[0].exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000006", "step_00000008"]


def test_interrupted_writes_and_rotations_are_never_candidates_and_are_cleaned(tmp_path):
    _, run_dir = trained(tmp_path)  # step_6.pt and step_8.pt
    (run_dir / ".step_00000009.pt.123.tmp").write_bytes(b"half")
    (run_dir / "step_00000007.pt.sha256").write_text("0" * 64 + "  step_00000007.pt\n")
    for name in ("step_00000010.tmp", ".step_00000011.x.tmp", ".step_00000002.y.deleting",
                 "step_00000012"):  # old fixed temp name, unique temp, half-rotated, no manifest
        (run_dir / name).mkdir()
        (run_dir / name / "tp0.pt").write_bytes(b"shard")
    (run_dir / "step_00000010.tmp" / "manifest.json").write_text("{}")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000006.pt", "step_00000008.pt"]
    removed = clean_run_dir(run_dir)
    assert sorted(removed) == sorted([".step_00000009.pt.123.tmp", "step_00000007.pt.sha256",
                                      "step_00000010.tmp", ".step_00000011.x.tmp",
                                      ".step_00000002.y.deleting", "step_00000012"])
    assert {p.name for p in run_dir.iterdir()} >= {"step_00000006.pt", "step_00000008.pt",
                                                   "step_00000008.pt.sha256", "config.json"}


def test_a_corrupted_checkpoint_is_skipped_with_a_reason_on_resume_and_load(tmp_path):
    config, run_dir = trained(tmp_path, data={"synthetic": {**SYNTHETIC, "d_out": 16}})
    newest = run_dir / "step_00000008.pt"
    flip_byte(newest)
    corrupted = newest.read_bytes()
    done = run("train.py", "--resume", str(run_dir), "--set", "train.steps=9")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped checkpoint step_00000008.pt" in done.stderr and "corrupted" in done.stderr
    assert "from step 7" in done.stdout
    # kept for inspection under another name, out of the candidates and of rotation
    assert (run_dir / "step_00000008.pt.corrupt").read_bytes() == corrupted
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000006.pt", "step_00000009.pt"]
    exported = run("-m", "clt.export", str(run_dir), str(tmp_path / "out"), "--tokens", "64")
    assert exported.returncode == 0, exported.stderr
    flip_byte(run_dir / "step_00000009.pt")
    before = snapshot(run_dir)
    exported = run("-m", "clt.export", str(run_dir), str(tmp_path / "out2"), "--tokens", "64")
    assert exported.returncode == 0 and "step 6" in exported.stdout  # the newest that verifies
    assert "skipped checkpoint step_00000009.pt" in exported.stderr
    assert snapshot(run_dir) == before  # export reads, it never moves or deletes
    flip_byte(run_dir / "step_00000006.pt")
    failed = run("-m", "clt.export", str(run_dir), str(tmp_path / "out3"), "--tokens", "64")
    assert_fails_cleanly(failed, 2, "no usable checkpoint")


def test_sharded_checkpoint_files_are_verified(tmp_path):
    from clt.config import load_config
    from clt.trainer import FiringCounter, build_model, build_optimizer, build_scheduler

    config, run_dir = write_run_config(tmp_path, "topk")
    cfg = load_config(config)
    model = build_model(cfg, 16, 12, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.train)
    state = TrainingState(model, optimizer, build_scheduler(optimizer, cfg.train),
                          FiringCounter(3, 32, torch.device("cpu")), None, None)
    run_dir.mkdir(parents=True)
    manifest = {"layout": [3, 32, 3], "param_names": [n for n, _ in model.named_parameters()]}
    path = save_sharded_checkpoint(run_dir, 5, 2, Mesh.single(), manifest,
                                   {"step": 5, "config": cfg.model_dump(mode="json")},
                                   {"model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(),
                                    "counter": state.counter.state_dict()},
                                   {"data": {}, "rng": None})
    recorded = json.loads((path / "manifest.json").read_text())["sha256"]
    assert sorted(recorded) == ["common.pt", "rank0.pt", "tp0.pt"]
    assert verify_checkpoint(path) is True
    flip_byte(path / "tp0.pt")
    with pytest.raises(CheckpointError, match="tp0.pt is corrupted"):
        latest_good_checkpoint(run_dir)


# ---- divergence and resume overrides ---------------------------------------------------------


def test_finite_loss_with_inf_gradients_stops_the_run(tmp_path):
    config, run_dir = write_run_config(tmp_path, "topk", train={"lr": 1e6})
    proc = run("train.py", str(config))
    assert_fails_cleanly(proc, 1, "gradient norm became NaN or inf", "Last good checkpoint: none")
    assert not list_checkpoints(run_dir)  # nothing saved after the divergence


def test_nonfinite_weights_stop_the_run_and_name_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    import clt.trainer
    import train

    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    config, run_dir = write_run_config(tmp_path, "topk", train={"grad_clip": None})
    real = clt.trainer.train_step

    def poison_after_4(model, *args, **kwargs):
        metrics = real(model, *args, **kwargs)
        if args[4] == 3:  # 0-based: the 4th step ends with an inf weight, loss still finite
            with torch.no_grad():
                model.W_dec[0, 0] = float("inf")
        return metrics

    monkeypatch.setattr(train, "train_step", poison_after_4)
    with pytest.raises(SystemExit) as exc:
        train.main([str(config)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "the weights became NaN or inf at or before step 4" in err
    assert "step_00000003.pt" in err
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000003.pt"]


def test_resume_applies_a_new_learning_rate_and_refuses_stream_changes(tmp_path):
    schedule = {"decay": "constant", "steps": 6}
    config, run_dir = trained(tmp_path, train=schedule, checkpoint={"every": 3, "keep_last": 3})
    before = snapshot(run_dir)
    refused = run("train.py", "--resume", str(run_dir), "--set", "train.seed=7",
                  "--set", "train.steps=9")
    assert_fails_cleanly(refused, 2, "train.seed: checkpoint has 0, now 7")
    reshaped = run("train.py", "--resume", str(run_dir), "--set", "data.synthetic.d_in=20")
    assert_fails_cleanly(reshaped, 2, "different shape", "data.synthetic")
    assert snapshot(run_dir) == before
    done = run("train.py", "--resume", str(run_dir), "--set", "train.lr=0.0005",
               "--set", "train.steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    note = next(x for x in lines if x.get("event") == "resume")
    assert note["step"] == 6 and note["train.lr"] == [0.003, 0.0005]
    assert [x["lr"] for x in lines if "lr" in x and x["step"] > 6] == [0.0005, 0.0005]
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 0.0005
    state = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0005
    finished = run("train.py", "--resume", str(run_dir))
    assert_fails_cleanly(finished, 2, "nothing to train")


# ---- disk, cache and data problems -----------------------------------------------------------


def test_a_full_disk_fails_in_one_line_and_keeps_the_checkpoints_before(tmp_path, monkeypatch,
                                                                       capsys):
    sections = {"checkpoint": {"every": 3, "keep_last": 5}, "eval": {"every": 100}}
    if can_mount():  # a real full disk: a tmpfs with room for the first checkpoint only
        size = (trained(tmp_path / "probe", **sections)[1] / "step_00000003.pt").stat().st_size
        config, run_dir = write_run_config(tmp_path / "small", "topk", **sections)
        run_dir.parent.mkdir()
        copy = tmp_path / "copy"  # the run as the tmpfs held it, copied out before unmounting
        script = ('mount -t tmpfs -o size=$1 tmpfs "$2" && "$3" train.py "$4"; rc=$?; '
                  'cp -a "$2/run" "$5"; exit $rc')
        proc = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", str(size * 3 // 2 + 24 * 1024),
             str(run_dir.parent), sys.executable, str(config), str(copy)],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert_fails_cleanly(proc, 1, "No space left on device", "intact")
        run_dir = copy
    else:  # no mount namespace (not root): the second checkpoint's writes fail like a full disk
        import clt.checkpoint
        import train

        config, run_dir = write_run_config(tmp_path, "topk", **sections)
        saves, real_save = [], clt.checkpoint.save_checkpoint

        def disk_full(self, b):
            raise OSError(28, "No space left on device")

        def second_fills_the_disk(*args, **kwargs):
            saves.append(1)
            if len(saves) == 2:
                monkeypatch.setattr(clt.checkpoint._HashingWriter, "write", disk_full)
            return real_save(*args, **kwargs)

        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
        monkeypatch.setattr(clt.checkpoint, "save_checkpoint", second_fills_the_disk)
        with pytest.raises(SystemExit) as exc:
            train.main([str(config)])
        assert exc.value.code == 1
        assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000003.pt"]
    assert verify_checkpoint(run_dir / "step_00000003.pt")
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def lm_config(tmp_path: Path, name: str, **sections):
    lm = {"name": "tiny", "tiny_n_layers": 2, "tiny_d_model": 32, "tiny_d_mlp": 64,
          "seq_len": 17, "buffer_tokens": 512, "lm_batch_size": 4,
          "cache_dir": str(tmp_path / "cache"), "cache_shard_tokens": 64}
    sections = {"train": {"steps": 3}, **sections}
    return write_run_config(tmp_path, "topk", "lm", name=name, data={"lm": lm},
                            eval={"every": 3, "tokens": 64, "replacement_tokens": 0}, **sections)


def test_activation_cache_problems_are_one_line(tmp_path):
    config, _ = lm_config(tmp_path, "fill")
    done = run("train.py", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    shard = sorted((tmp_path / "cache").glob("shard-*.safetensors"))[0]
    flip_byte(shard, offset=shard.stat().st_size - 10)
    config, _ = lm_config(tmp_path, "corrupt")
    corrupted = run("train.py", str(config))
    assert_fails_cleanly(corrupted, 2, shard.name, "corrupted")
    other, _ = lm_config(tmp_path, "other", train={"steps": 3, "seed": 1})
    mismatch = run("train.py", str(other))
    assert_fails_cleanly(mismatch, 2, "made for other activations", "seed 0 (this run: 1)")
    (tmp_path / "cache" / "manifest.json").write_text("{not json")
    config, _ = lm_config(tmp_path, "garbled")
    garbled = run("train.py", str(config))
    assert_fails_cleanly(garbled, 2, "manifest.json is unreadable")


def test_a_held_out_split_smaller_than_eval_tokens_is_named(tmp_path):
    config, run_dir = write_run_config(
        tmp_path, "topk", "lm", eval={"every": 3, "tokens": 64, "replacement_tokens": 0})
    proc = run("train.py", str(config), "--set", "data.lm.heldout_fraction=0.0")
    assert_fails_cleanly(proc, 2, "eval.tokens = 64", "data.lm.heldout_fraction")
    assert not list_checkpoints(run_dir)
