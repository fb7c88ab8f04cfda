"""Run folders: one trainer at a time, never reused by accident, never escaped by a name.

A run folder ``RUN_DIR/NAME`` belongs to one run. A fresh run claims it only while it is absent
or empty; a resume claims an existing one. Either way the claimant holds an exclusive
``fcntl.flock`` on ``RUN/.lock`` for its whole life (the kernel drops it when the process ends,
so a crashed trainer leaves no stale lock), so a second trainer or a resume of a live run is
refused at once instead of mixing checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from pathlib import Path

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"


class RunDirError(ValueError):
    """A run folder that cannot be used: taken, in use, not writable, or a bad name."""


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run subfolder (it must stay one folder inside run_dir)."""
    if not name or name.strip() != name:
        return "must be a non-empty folder name without leading or trailing spaces"
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        return "must be a single folder name inside logging.run_dir (no '/', '\\', '.' or '..')"
    return None


def is_run_folder(path: Path) -> bool:
    """A folder this trainer wrote a run into (its config plus a checkpoint, log or lock)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return False
    return any((path / marker).exists() for marker in (LOCK_FILE, "metrics.jsonl")) or any(
        path.glob("step_*"))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, what: str = "run folder") -> None:
    """Raise ``RunDirError`` unless files can be created in ``folder`` (or where it would be
    created). Checked before any model or data loads, so a bad place fails in a second."""
    folder = Path(folder)
    base = _nearest_existing(folder.absolute())
    if not base.is_dir():
        raise RunDirError(f"cannot create {what} {folder}: {base} is a file, not a folder")
    try:  # a real write: permission bits tell nothing about read-only mounts or root
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if base == folder.absolute() else f" ({base} is where it would be created)"
        raise RunDirError(f"{what} {folder} is not writable{where}: {exc.strerror}") from None


def check_output_dir(out_dir: Path, marker: str, overwrite: bool, what: str,
                     inside_run: bool = False) -> Path:
    """Refuse an output folder of a command (export, pages) that would put anything at risk:
    one that is or lies inside a run folder (unless ``inside_run``: the run's own pages), one
    that contains a run folder, a non-empty one that is not a previous output of the same
    command (``marker``, a file that command writes into every output), a previous output
    unless ``overwrite``, or an unwritable place. Raises ``RunDirError``; returns the folder,
    resolved."""
    out = Path(out_dir).expanduser().absolute().resolve()
    for folder in () if inside_run else (out, *out.parents):
        if is_run_folder(folder):
            where = "is" if folder == out else "lies inside"
            raise RunDirError(f"{out_dir} {where} the run folder {folder}: write the {what} "
                              "to a folder outside every run")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out_dir} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        nested = next((d for d, _, _ in os.walk(out) if is_run_folder(Path(d))), None)
        if nested is not None:
            raise RunDirError(f"{out_dir} contains the run folder {nested}: refusing to "
                              "replace it")
        if not (out / marker).is_file():
            raise RunDirError(f"{out_dir} exists, is not empty and is not a previous output of "
                              f"the {what} (no {marker}): choose a new or empty folder")
        if not overwrite:
            raise RunDirError(f"{out_dir} holds a previous {what}: pass --overwrite to replace "
                              "it, or choose another folder")
    check_writable(out, what=f"{what} folder")
    return out


class RunLock:
    """The exclusive lock of one run folder, held until :meth:`release` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        path = self.run_dir / LOCK_FILE
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot lock run folder {run_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            raise RunDirError(f"run folder {run_dir} is in use by another trainer ({holder}); "
                              "wait for it to finish or use another logging.run_name") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim_new(run_dir: Path) -> RunLock:
    """Create and lock ``run_dir`` for a fresh run; refuse one that holds anything already."""
    run_dir = Path(run_dir)
    check_writable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run folder {run_dir}: {exc.strerror}") from None
    lock = RunLock(run_dir)
    taken = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if taken:
        lock.release()
        shown = ", ".join(taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise RunDirError(f"run folder {run_dir} already exists and is not empty ({shown}): "
                          f"continue it with --resume {run_dir}, or set another "
                          "logging.run_name")
    return lock


def claim_existing(run_dir: Path) -> RunLock:
    """Lock an existing run folder to resume it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run folder")
    check_writable(run_dir)
    return RunLock(run_dir)
