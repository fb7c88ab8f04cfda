"""Training checkpoints: atomic writes, keep-last-K rotation, exact resume, shape checks."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config

PATTERN = "step_*.pt"

# Config fields that fix parameter shapes or the meaning of the weights: a checkpoint can only
# be resumed under a config that agrees on all of them.
SHAPE_FIELDS = (
    ("model", "n_features"), ("model", "reach"), ("model", "layers"),
    ("nonlinearity", "kind"), ("nonlinearity", "batchtopk_scope"),
    ("data", "source"), ("data", "synthetic"),
    ("data", "lm", "name"), ("data", "lm", "input_hook"), ("data", "lm", "output_hook"),
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or incompatible with the config."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"step_{step:08d}.pt"


def save_checkpoint(run_dir: Path, step: int, keep_last: int, state: dict) -> Path:
    """Write ``step_{step}.pt`` atomically (temp file, fsync, rename: a kill mid-write leaves the
    earlier checkpoints intact), then delete all but the newest ``keep_last``."""
    path = checkpoint_path(run_dir, step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(run_dir.glob(PATTERN))[:-keep_last]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path:
    found = sorted(Path(run_dir).glob(PATTERN))
    if not found:
        raise CheckpointError(f"no checkpoint ({PATTERN}) in {run_dir}")
    return found[-1]


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the file is unusable
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def _field(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_compatible(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint whose config differs from ``cfg`` in a shape-defining field."""
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
