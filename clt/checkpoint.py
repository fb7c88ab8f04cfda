"""Training checkpoints: atomic writes, keep-last-K rotation, exact resume, shape checks.

Two layouts, both read by :func:`load_checkpoint` into the same single-model dict:

- ``step_XXXXXXXX.pt``: one file, written by a single process;
- ``step_XXXXXXXX/``: a parallel run's folder, ``manifest.json`` plus ``common.pt`` (step,
  scheduler, config), one ``tp{r}.pt`` per tensor-parallel rank (its feature shard of the model,
  optimizer moments and firing counter, written by data-parallel replica 0) and one
  ``rank{g}.pt`` per process (its data position and RNG). Loading merges the shards into the
  full model, so a checkpoint resumes on any number of ranks and exports as one model.
Both appear atomically (written under ``.tmp``, then renamed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kernels

from .config import Config, ConfigError, validate_config
from .parallel import (
    Mesh,
    local_states,
    merge_model_states,
    merge_optimizer_states,
    merge_tensors,
    shard_parameters,
)

PATTERN = "step_*.pt"
SHARDED_FORMAT = "clt-sharded-checkpoint/1"

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


def _write(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file, fsync and rename (a kill mid-write loses nothing)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, keep_last: int, state: dict) -> Path:
    """Write ``step_{step}.pt`` atomically, then delete all but the newest ``keep_last``."""
    path = checkpoint_path(run_dir, step)
    _write(state, path)
    _rotate(run_dir, keep_last)
    return path


def save_sharded_checkpoint(
    run_dir: Path, step: int, keep_last: int, mesh: Mesh, manifest: dict,
    common: dict, shard: dict, rank_state: dict,
) -> Path:
    """Collective: every rank of ``mesh`` calls it. Writes the folder layout described above."""
    final = run_dir / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    mesh.barrier()
    if mesh.dp_rank == 0:
        _write(shard, tmp / f"tp{mesh.tp_rank}.pt")
    _write(rank_state, tmp / f"rank{mesh.rank}.pt")
    mesh.barrier()
    if mesh.is_main:
        _write(common, tmp / "common.pt")
        manifest = {"format": SHARDED_FORMAT, "step": step, "tensor": mesh.tp_size,
                    "data": mesh.dp_size, **manifest}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(run_dir, keep_last)
    mesh.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every complete checkpoint of a run folder, oldest first (files and sharded folders)."""
    found = [p for p in Path(run_dir).glob("step_*")
             if (p.is_file() and p.suffix == ".pt") or (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: p.name.removesuffix(".pt"))


def _rotate(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint (step_*.pt or step_*/manifest.json) in {run_dir}")
    return found[-1]


def _read(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # any unpickling failure means the file is unusable
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as one full-model dict; a sharded folder is merged (``layout`` and
    ``ranks``, each process's data and RNG state, say how it was written)."""
    path = Path(path)
    if not path.is_dir():
        state = _read(path)
        if isinstance(state, dict) and "data" in state:
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


def check_compatible(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint whose config differs from ``cfg`` in a shape-defining field.

    The saved config is read through today's schema first, so a field added since it was
    written compares as its default (an older checkpoint stays loadable)."""
    try:
        saved = validate_config(saved).model_dump(mode="json")
    except ConfigError:
        pass  # compare what is there: the differences below name the fields
    current = cfg.model_dump(mode="json")
    diffs = [
        f"{'.'.join(f)}: checkpoint has {_field(saved, f)!r}, config has {_field(current, f)!r}"
        for f in SHAPE_FIELDS if _field(saved, f) != _field(current, f)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different shape:\n  "
                              + "\n  ".join(diffs))


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
