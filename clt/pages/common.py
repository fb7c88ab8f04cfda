"""What the page commands share: safe output folders, the run "as exported", token strings.

**Output folders.** Every command writes a whole folder and never destroys data:

- an OUT_DIR that is a run folder (``config.json`` beside ``step_*`` checkpoints), lies inside
  one or contains one is refused (``inside_run=True`` lets ``train.py`` write ``RUN/pages``);
- an existing non-empty OUT_DIR is refused unless ``overwrite``, and ``overwrite`` replaces
  only a folder holding this command's marker file (a previous output of the same command);
- the output is written into a temporary folder next to OUT_DIR and renamed into place, so an
  interrupted command leaves either the old folder or the new one.

**As exported.** ``clt.export`` writes TopK/BatchTopK runs as JumpReLU (``clt.convert``):
BatchTopK at its EMA threshold, TopK calibrated to the trained L0 on the first
``EXPORT_TOKENS`` held-out non-BOS activations (in the buffer dtype). :func:`load_run_as_exported`
repeats that recipe on the same tokens, so the graph and the feature pages show the features
circuit-tracer loads from the export.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..convert import ConversionError, convert
from ..data import TINY_BOS, TINY_SEP, _byte_ids, frozen_lm, heldout_stream
from ..runs import RunDirError, check_output_dir
from ..trainer import load_run

if TYPE_CHECKING:
    from ..data.tokens import TokenStream

EXPORT_TOKENS = 4096  # clt.export.DEFAULT_TOKENS: held-out tokens of the threshold calibration


class PagesError(ValueError):
    """Bad input of a page command: reported as one ``error: ...`` line, exit status 2."""


# ---- output folders ------------------------------------------------------------------------


def check_out_dir(out_dir: str | Path, marker: str, overwrite: bool,
                  inside_run: bool = False) -> Path:
    """``clt.runs.check_output_dir`` for the pages (module docstring), raising
    :class:`PagesError`; returns the folder resolved. ``marker``: the file this command
    writes."""
    try:
        return check_output_dir(Path(out_dir), marker, overwrite, "pages", inside_run)
    except RunDirError as exc:
        raise PagesError(str(exc)) from None


@contextlib.contextmanager
def staged_output(out: Path, marker: str, info: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success write the marker (``info`` as
    JSON) and move the folder to ``out`` (replacing a previous output, which
    :func:`check_out_dir` vetted). On failure the temporary folder is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        (tmp / marker).write_text(json.dumps(info, indent=1) + "\n")
        if out.is_dir() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            if out.is_dir():
                out.rmdir()
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def run_cli(main: Callable[[], None]) -> None:
    """Run a command's body; a :class:`PagesError` becomes one ``error:`` line and exit 2."""
    try:
        main()
    except PagesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


# ---- the run, as exported ------------------------------------------------------------------


@dataclass
class ExportedRun:
    """A run loaded for the pages: its config, the converted transcoder (JumpReLU or ReLU,
    standardizer kept), the frozen LM and a factory of fresh held-out token streams."""

    run_dir: Path
    cfg: Any
    step: int
    model: Any  # clt.model.CrossLayerTranscoder, converted
    kind: str  # the trained nonlinearity
    thresholds: str  # "ema", "calibrate" or "none"
    lm: Any
    layers: list[int]
    heldout: Callable[[int], Any]  # batch size -> TokenStream over the held-out split
    bos_id: int

    @property
    def input_hook(self) -> str:
        return self.cfg.data.lm.input_hook

    @property
    def output_hook(self) -> str:
        return self.cfg.data.lm.output_hook


def load_run_as_exported(run_dir: str | Path, device: str | torch.device = "cpu",
                         log: Callable[[str], None] = print,
                         check: Callable[[Any, Any], None] | None = None) -> ExportedRun:
    """Load ``run_dir``'s latest checkpoint and convert it as ``clt.export`` does.

    ``check(cfg, model)`` runs before the LM is loaded (to refuse bad options early)."""
    # deferred: clt.data.lm imports transformer_lens (seconds); train.py imports this module
    from ..data.lm import lm_activations

    run_dir = Path(run_dir)
    device = torch.device(device)
    if not run_dir.is_dir():
        raise PagesError(f"{run_dir}: no such run folder")
    cfg, model, step = load_run(run_dir, device, error=PagesError)
    if cfg.data.source != "lm":
        raise PagesError(f"{run_dir}: pages need an LM-backed run (data.source is "
                         f"{cfg.data.source!r})")
    if not model.writes_features:
        raise PagesError(f"{run_dir}: pages need a transcoder's own features, this run is a "
                         f"{type(model).__name__}")
    if check is not None:
        check(cfg, model)
    lm_cfg = cfg.data.lm
    lm, tokenizer, ids = frozen_lm(cfg, device, chatter=io.StringIO())

    def heldout(batch_size: int) -> TokenStream:
        return heldout_stream(cfg, tokenizer, ids, batch_size)

    layers = cfg.resolved_layers or list(range(lm.cfg.n_layers))
    kind = cfg.nonlinearity.kind
    method = "none" if model.nonlinearity.exports_as is not None else model.nonlinearity.conversion
    batches = None
    if method == "calibrate":
        # clt.export's calibration tokens: the first EXPORT_TOKENS non-BOS held-out activations
        method = "calibrate"
        buffer = torch.bfloat16 if lm_cfg.buffer_dtype == "bfloat16" else torch.float32
        xs, total = [], 0
        for batch in heldout(lm_cfg.lm_batch_size):
            x, _ = lm_activations(lm, batch, layers, lm_cfg.input_hook, lm_cfg.output_hook)
            xs.append(x[:, :, 1:].flatten(1, 2).to(device, buffer))
            total += xs[-1].shape[1]
            if total >= EXPORT_TOKENS:
                break
        if total < EXPORT_TOKENS:
            raise PagesError(f"{run_dir}: the held-out split has only {total} tokens, "
                             f"{EXPORT_TOKENS} are needed to calibrate the JumpReLU thresholds")
        batches = [torch.cat(xs, dim=1)[:, :EXPORT_TOKENS]]
    try:
        converted = convert(model, None if method == "none" else method, batches)
    except ConversionError as exc:
        raise PagesError(str(exc)) from None
    log(f"run {run_dir} step {step}: {kind} -> {converted.nonlinearity.kind} "
        f"(thresholds: {method})")
    bos = ids.get("bos_id")
    if bos is None:
        bos = heldout(1).bos_id
    return ExportedRun(run_dir, cfg, step, converted.eval(), kind, method, lm, layers, heldout,
                       int(bos))


# ---- tokens as text ------------------------------------------------------------------------


def token_strings(run: ExportedRun, ids) -> list[str]:
    """Display strings of token ids: decoded one by one, newlines and tabs made visible; the
    tiny LM's byte ids as characters (BOS and SEP by name)."""
    ids = [int(i) for i in ids]
    if run.cfg.data.lm.name == "tiny":
        names = {TINY_BOS: "<bos>", TINY_SEP: "<sep>"}
        out = [names.get(i, chr(i) if 32 <= i < 127 else f"\\x{i:02x}") for i in ids]
    else:
        tok = run.lm.tokenizer
        out = [tok.decode([i]) for i in ids]
        if run.bos_id is not None:
            out = ["<bos>" if i == run.bos_id else s for i, s in zip(ids, out, strict=True)]
    return [s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵") for s in out]


def encode_prompt(run: ExportedRun, prompt: str) -> torch.Tensor:
    """``[T]`` token ids of ``prompt`` with the run's BOS first (as in training sequences)."""
    if not prompt.strip():
        raise PagesError("the prompt is empty")
    if run.cfg.data.lm.name == "tiny":
        ids = _byte_ids(prompt)
    else:
        ids = run.lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_ctx = run.lm.cfg.n_ctx
    if len(ids) + 1 > n_ctx:
        raise PagesError(f"the prompt has {len(ids)} tokens, the LM reads at most {n_ctx - 1} "
                         f"after BOS")
    return torch.tensor([run.bos_id, *ids], dtype=torch.int64)
