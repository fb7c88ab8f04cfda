"""Training checkpoints: atomic writes, keep-last-K rotation, exact resume, shape checks.

Two layouts, both read by :func:`load_checkpoint` into the same single-model dict:

- ``step_XXXXXXXX.pt``: one file, written by a single process;
- ``step_XXXXXXXX/``: a parallel run's folder, ``manifest.json`` plus ``common.pt`` (step,
  scheduler, config), one ``tp{r}.pt`` per tensor-parallel rank (its feature shard of the model,
  optimizer moments and firing counter, written by data-parallel replica 0) and one
  ``rank{g}.pt`` per process (its data position and RNG). Loading merges the shards into the
  full model, so a checkpoint resumes on any number of ranks and exports as one model.
Both appear atomically: written under a temp name unique to the writer (``.step_...tmp``, never
a checkpoint candidate), then renamed. Every file carries a sha256: a single file in its sidecar
``step_XXXXXXXX.pt.sha256`` (``sha256sum -c`` format), a folder's files in ``manifest.json``,
written last. Loading verifies them; :func:`latest_good_checkpoint` falls back past a corrupted
checkpoint and says why. Rotation renames a folder out of the candidates before deleting it, and
:func:`clean_run_dir` removes what a killed writer or rotation left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kernels

from .atomic import atomic_write
from .config import Config, ConfigError, validate_config
from .parallel import (
    Mesh,
    local_states,
    merge_model_states,
    merge_optimizer_states,
    merge_tensors,
    shard_parameters,
)

SHARDED_FORMAT = "clt-sharded-checkpoint/1"
# a checkpoint's name: step_XXXXXXXX.pt (one file) or step_XXXXXXXX (a sharded folder)
CHECKPOINT_NAME = re.compile(r"step_(\d{8})(\.pt)?")
SUM_SUFFIX = ".sha256"
# what a killed writer or rotation leaves: unique temp names, folders renamed for deletion, and
# the fixed temp names of earlier versions (step_XXXXXXXX.pt.tmp, step_XXXXXXXX.tmp/)
LEFTOVER = re.compile(r"\.step_\d{8}.*\.(tmp|deleting)|step_\d{8}(\.pt)?\.tmp")

# Config fields that fix parameter shapes or the meaning of the weights: a checkpoint can only
# be resumed under a config that agrees on all of them.
SHAPE_FIELDS = (
    ("model", "n_features"), ("model", "reach"), ("model", "layers"), ("model", "skip"),
    ("model", "architecture"), ("model", "molt_rank_groups"),
    ("nonlinearity", "kind"), ("nonlinearity", "batchtopk_scope"),
    ("data", "source"), ("data", "synthetic"),
    ("data", "lm", "name"), ("data", "lm", "input_hook"), ("data", "lm", "output_hook"),
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or incompatible with the config."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"step_{step:08d}.pt"


class _HashingWriter(io.RawIOBase):
    """A write-only file object that hashes what passes through (``torch.save`` writes its
    zip archive sequentially, so the digest is the file's)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()
        self.error: OSError | None = None  # torch.save hides it behind a zip-writer error

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        try:
            return self.f.write(b)
        except OSError as exc:
            self.error = exc
            raise


def _save_tmp(obj: Any, path: Path) -> tuple[Path, str]:
    """``torch.save`` to a temp name unique to this writer beside ``path``, fsynced; returns it
    and the file's sha256. A failure (e.g. a full disk) removes the partial file and re-raises
    the ``OSError`` naming ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(error, OSError) and not error.filename:
            error.filename = str(path)
        if error is not exc:
            raise error from None
        raise
    return Path(tmp), writer.sha.hexdigest()


def _write(obj: Any, path: Path) -> str:
    """``torch.save`` atomically (a kill mid-write loses nothing); returns the sha256."""
    tmp, digest = _save_tmp(obj, path)
    os.replace(tmp, path)
    return digest


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def save_checkpoint(run_dir: Path, step: int, keep_last: int, state: dict) -> Path:
    """Write ``step_{step}.pt`` atomically, its checksum sidecar before it appears, then delete
    all but the newest ``keep_last``."""
    path = checkpoint_path(run_dir, step)
    tmp, digest = _save_tmp(state, path)
    try:
        atomic_write(path.with_name(path.name + SUM_SUFFIX), f"{digest}  {path.name}\n")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)
    _rotate(run_dir, keep_last)
    return path


def save_sharded_checkpoint(
    run_dir: Path, step: int, keep_last: int, mesh: Mesh, manifest: dict,
    common: dict, shard: dict, rank_state: dict,
) -> Path:
    """Collective: every rank of ``mesh`` calls it. Writes the folder layout described above
    into a temp folder whose manifest (with every file's sha256) is written last, then renames
    it into place."""
    final = run_dir / f"step_{step:08d}"
    tmp = None
    if mesh.is_main:
        tmp = tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=run_dir)
    tmp = Path(mesh.broadcast_object(tmp))
    digests = {}
    if mesh.dp_rank == 0:
        digests[f"tp{mesh.tp_rank}.pt"] = _write(shard, tmp / f"tp{mesh.tp_rank}.pt")
    digests[f"rank{mesh.rank}.pt"] = _write(rank_state, tmp / f"rank{mesh.rank}.pt")
    every = mesh.gather_objects(digests)  # also the barrier: every shard is on disk
    if mesh.is_main:
        digests = {"common.pt": _write(common, tmp / "common.pt")}
        for part in every:
            digests.update(part)
        manifest = {"format": SHARDED_FORMAT, "step": step, "tensor": mesh.tp_size,
                    "data": mesh.dp_size, **manifest, "sha256": dict(sorted(digests.items()))}
        atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1))
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _rotate(run_dir, keep_last)
    mesh.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every complete checkpoint of a run folder, oldest first: ``step_XXXXXXXX.pt`` files and
    ``step_XXXXXXXX/`` folders with a manifest (temp and half-deleted ones never count)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name)
             and (p.is_file() if p.suffix == ".pt" else (p / "manifest.json").is_file())]
    return sorted(found, key=lambda p: p.name.removesuffix(".pt"))


def _discard(path: Path) -> None:
    """Delete a checkpoint so that no kill leaves a half of it that looks complete: a folder is
    first renamed out of the candidates, a file goes before its checksum."""
    if path.is_dir():
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".deleting",
                                      dir=path.parent))
        os.replace(path, trash)
        shutil.rmtree(trash)
    else:
        path.unlink()
        path.with_name(path.name + SUM_SUFFIX).unlink(missing_ok=True)


def _rotate(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _discard(old)


def clean_run_dir(run_dir: Path) -> list[str]:
    """Remove what a killed writer or rotation left in ``run_dir`` (temp files and folders,
    folders renamed for deletion, checksums without their checkpoint, checkpoint-named folders
    without a manifest). Only safe while holding the run's lock. Returns the names removed."""
    run_dir = Path(run_dir)
    removed = []
    for p in sorted(run_dir.iterdir()):
        name = p.name
        checked = name.removesuffix(SUM_SUFFIX)  # the checkpoint a checksum file belongs to
        orphan_sum = (checked != name and CHECKPOINT_NAME.fullmatch(checked)
                      and not p.with_name(checked).is_file())
        incomplete = (CHECKPOINT_NAME.fullmatch(name) and p.is_dir()
                      and not (p / "manifest.json").is_file())
        if LEFTOVER.fullmatch(name) or orphan_sum or incomplete:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(name)
    return removed


def verify_checkpoint(path: Path) -> bool:
    """Check every file of a checkpoint against its recorded sha256. Raises ``CheckpointError``
    naming the file that differs or is missing; returns False for a checkpoint written before
    checksums existed (nothing to verify), True when verified."""
    path = Path(path)
    if path.is_dir():
        try:
            recorded = json.loads((path / "manifest.json").read_text()).get("sha256")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: unreadable manifest.json: {exc}") from None
        if recorded is None:
            return False
    else:
        sidecar = path.with_name(path.name + SUM_SUFFIX)
        if not sidecar.is_file():
            return False
        try:
            recorded = {path.name: sidecar.read_text().split()[0]}
        except (OSError, IndexError) as exc:
            raise CheckpointError(f"checkpoint {path}: unreadable {sidecar.name}: {exc}") from None
        path = path.parent
    for name, digest in recorded.items():
        try:
            actual = sha256_file(path / name)
        except OSError as exc:
            raise CheckpointError(f"checkpoint file {path / name} cannot be read: "
                                  f"{exc.strerror}") from None
        if actual != digest:
            raise CheckpointError(f"checkpoint file {path / name} is corrupted (its sha256 "
                                  "differs from the one recorded when it was written)")
    return True


def latest_good_checkpoint(
    run_dir: Path, warn: Callable[[str], None] | None = None, load: bool = True,
) -> tuple[Path, dict | None, list[Path]]:
    """``(path, state, skipped)``: the newest checkpoint whose files verify (and load, with
    ``load``; else ``state`` is None) and the newer ones that do not, each reported by a
    ``warn`` line saying why. Raises ``CheckpointError`` when none is usable."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint (step_*.pt or step_*/manifest.json) in {run_dir}: "
                              "a run that stopped before its first checkpoint cannot be resumed "
                              "(start it again under another logging.run_name)")
    reasons, skipped = [], []
    for path in reversed(found):
        state = None
        try:
            if load:
                state = load_checkpoint(path)
            else:
                verify_checkpoint(path)
        except CheckpointError as exc:
            reasons.append(str(exc))
            skipped.append(path)
            if warn is not None:
                warn(f"warning: skipped checkpoint {path.name}: {exc}")
            continue
        return path, state, skipped
    raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(reasons))


def quarantine(path: Path) -> Path:
    """Rename a checkpoint that failed verification to ``NAME.corrupt`` (and its checksum):
    kept for inspection, never again a candidate, and not counted by rotation."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    sidecar = path.with_name(path.name + SUM_SUFFIX)
    if sidecar.is_file():
        os.replace(sidecar, target.with_name(target.name + SUM_SUFFIX))
    return target


def _read(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # any unpickling failure means the file is unusable
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load_checkpoint(path: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint as one full-model dict, its checksums verified first; a sharded folder is
    merged (``layout`` and ``ranks``, each process's data and RNG state, say how it was
    written)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    if not path.is_dir():
        state = _read(path)
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointError(f"checkpoint {path} holds no training state")
        if "data" in state:
            state.setdefault("layout", {"tensor": 1, "data": 1})
            state.setdefault("ranks", [{"data": state["data"], "rng": state.get("rng")}])
        return state
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != SHARDED_FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        tensor, data = int(manifest["tensor"]), int(manifest["data"])
        layout = kernels.DecoderLayout(*manifest["layout"])
        names = list(manifest["param_names"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest.json: {exc}") from exc
    missing = [f for f in [*(f"tp{r}.pt" for r in range(tensor)),
                           *(f"rank{g}.pt" for g in range(tensor * data)), "common.pt"]
               if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    shards = [_read(path / f"tp{r}.pt", mmap=True) for r in range(tensor)]
    counter = {"counts": merge_tensors("counts", [s["counter"]["counts"] for s in shards], layout),
               "tokens": shards[0]["counter"]["tokens"]}
    ranks = [_read(path / f"rank{g}.pt") for g in range(tensor * data)]
    return {**_read(path / "common.pt"),
            "model": merge_model_states([s["model"] for s in shards], layout),
            "optimizer": merge_optimizer_states([s["optimizer"] for s in shards], names, layout),
            "counter": counter, "layout": {"tensor": tensor, "data": data}, "ranks": ranks,
            "data": ranks[0]["data"], "rng": ranks[0]["rng"]}


def _field(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _as_today(saved: dict) -> dict:
    """A saved config read through today's schema (defaults for fields added since); as it is
    when it no longer validates, so that the differences name the fields."""
    try:
        return validate_config(saved).model_dump(mode="json")
    except ConfigError:
        return saved


def check_compatible(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint whose config differs from ``cfg`` in a shape-defining field.

    The saved config is read through today's schema first, so a field added since it was
    written compares as its default (an older checkpoint stays loadable)."""
    saved = _as_today(saved)
    current = cfg.model_dump(mode="json")
    diffs = [
        f"{'.'.join(f)}: checkpoint has {_field(saved, f)!r}, config has {_field(current, f)!r}"
        for f in SHAPE_FIELDS if _field(saved, f) != _field(current, f)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different shape: "
                              + "; ".join(diffs))


# Fields a resume may change (prefixes end with "."): they take effect from the next step.
# Any other difference would change the data stream or the objective mid-run and is refused.
RESUME_MAY_CHANGE = (
    "train.lr", "train.betas", "train.weight_decay", "train.steps", "train.warmup_steps",
    "train.decay", "train.min_lr_ratio", "train.grad_clip", "train.profile_steps",
    "train.device", "logging.", "eval.", "checkpoint.", "parallel.",
    "data.lm.producer_thread", "data.lm.prefetch_batches", "data.lm.cache_dir",
    "data.lm.cache_shard_tokens",
)
# where a run lives is the folder being resumed, whatever a config file given with it says
RESUME_IGNORES = ("logging.run_dir", "logging.run_name")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested dict's leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: dict, cfg: Config, path: Path) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint's value, new value)}`` of every field a resume changes. Raises
    ``CheckpointError`` listing the changes a resume cannot make (shape, data stream,
    objective) and a ``train.steps`` that the checkpoint already reached."""
    check_compatible(saved, cfg, path)
    old, new = _flatten(_as_today(saved)), _flatten(cfg.model_dump(mode="json"))
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in RESUME_IGNORES}
    refused = [f"{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in changes.items()
               if not any(k == f or (f.endswith(".") and k.startswith(f))
                          for f in RESUME_MAY_CHANGE)]
    if refused:
        raise CheckpointError(
            f"--resume cannot change {'; '.join(refused)}: that would change the data stream or "
            "the objective of a run in progress (start a new run instead)")
    return changes


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_state(model: torch.nn.Module, state: dict, path: Path) -> None:
    """``load_state_dict`` with a message that names the checkpoint and the mismatching tensors."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc


@dataclass
class TrainingState:
    """Everything a training run checkpoints, saved and restored for one process of any layout."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    counter: Any  # clt.trainer.FiringCounter
    scaler: Any  # torch.amp.GradScaler | None
    source: Any  # the activation source (data position)

    def save(self, run_dir: Path, step: int, cfg: Config, mesh: Mesh) -> Path:
        """One file for a single process; a sharded folder (collective) under torchrun."""
        common = {"step": step, "scheduler": self.scheduler.state_dict(),
                  "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                  "config": cfg.model_dump(mode="json")}
        shard = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "counter": self.counter.state_dict()}
        rank_state = {"data": self.source.state_dict(), "rng": rng_state()}
        if mesh.world_size == 1:
            return save_checkpoint(run_dir, step, cfg.checkpoint.keep_last,
                                   {**common, **shard, **rank_state})
        manifest = {"layout": [self.model.n_layers, cfg.model.n_features, self.model.reach],
                    "param_names": shard_parameters(self.model)}
        return save_sharded_checkpoint(run_dir, step, cfg.checkpoint.keep_last, mesh, manifest,
                                       common, shard, rank_state)

    def restore(self, state: dict, path: Path, n_features: int, mesh: Mesh) -> int:
        """Load a merged checkpoint (``load_checkpoint``) into this rank's objects, re-sharding
        the model, optimizer and counter; data positions and RNG resume exactly when the process
        layout is unchanged. Returns the first step to run."""
        model_state, optimizer_state, counter_state = local_states(state, self.model, mesh,
                                                                   n_features)
        load_model_state(self.model, model_state, path)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.counter.load_state_dict(counter_state)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state["layout"] == {"tensor": mesh.tp_size, "data": mesh.dp_size}:
            self.source.load_state_dict(state["ranks"][mesh.rank]["data"])
            set_rng_state(state["ranks"][mesh.rank]["rng"])
        elif mesh.is_main:
            print(f"warning: {path} was written by {state['layout']} ranks, this run has "
                  f"tensor={mesh.tp_size}, data={mesh.dp_size}: the model and optimizer are "
                  "re-sharded, the data streams start afresh from the beginning",
                  file=sys.stderr)
        return state["step"] + 1
