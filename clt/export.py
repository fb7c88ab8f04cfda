"""Export a trained transcoder in circuit-tracer's on-disk formats.

    python -m clt.export RUN_DIR OUT_DIR [--threshold ema|calibrate] [--tokens N] [--overwrite]

Formats (circuit-tracer 0.5.0, see DESIGN.md "Export"): circuit-tracer reads raw hook
activations and writes raw MLP outputs, so the standardizer is folded into a copy of the weights
first (``model.folded_copy()``; the model itself is never touched). Layer ``i`` of a file is LM
block ``i``: the trained layers must be ``0..L-1``. One width ``d_model`` for inputs and outputs.

- CLT (reach == L), ``model_kind: cross_layer_transcoder``, per source layer ``i``:
  ``W_enc_{i}.safetensors``: ``W_enc_{i} [F, d_model]`` (our ``W_enc[i]`` transposed),
  ``b_enc_{i} [F]``, ``b_dec_{i} [d_model]``, and for JumpReLU ``threshold_{i} [F]`` (raw
  threshold, a feature is active where ``pre > threshold``);
  ``W_dec_{i}.safetensors``: ``W_dec_{i} [F, L - i, d_model]`` (slot ``j`` writes layer ``i + j``).
- Per-layer transcoders (reach 1), ``model_kind: transcoder_set``: ``layer_{i}.safetensors`` with
  ``W_enc [F, d_model]``, ``W_dec [F, d_model]``, ``b_enc [F]``, ``b_dec [d_model]`` and for
  JumpReLU ``activation_function.threshold [F]``.
- ``config.yaml``: ``model_kind``, ``feature_input_hook`` / ``feature_output_hook`` (block-relative
  transformer-lens names; our ``hook_mlp_in`` is ``hook_resid_mid``), plus informational keys the
  loader ignores (``model_name``, ``layers``, ``n_layers``, ``d_model``, ``d_transcoder``,
  ``activation_function``); a ReLU transcoder set also gets ``activation: relu``.

ReLU models have no threshold entries (circuit-tracer then applies ReLU). TopK/BatchTopK models
must go through ``clt.convert`` first; reach strictly between 1 and L has no format.
All tensors are written in the model's dtype (``dtype`` overrides). Writes go to a temporary
folder renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

import kernels

from .convert import ConversionError, conversion_report, convert, format_report
from .data import build_source
from .model import CrossLayerTranscoder
from .runs import RunDirError, check_output_dir
from .trainer import load_run

# Our block-relative hook names -> the transformer-lens names circuit-tracer's configs use
# (clt.data.lm.HOOK_ALIASES, repeated here so export does not import transformer-lens).
TL_HOOK_NAMES = {"hook_mlp_in": "hook_resid_mid"}
# written into every export: --overwrite replaces a folder only if it holds this file
EXPORT_MARKER = ".clt-export.json"
DEFAULT_TOKENS = 4096
EVAL_CHUNK = 1024


class ExportError(ValueError):
    """A model, run folder or destination that cannot be exported."""


# ---- writing -------------------------------------------------------------------------------


def _check_exportable(
    model: CrossLayerTranscoder, layers: Sequence[int] | None, converted: bool = False
) -> list[int]:
    """Raise ExportError unless ``model`` has a circuit-tracer format; returns the layers.
    ``converted``: check as if a TopK-family model were already converted to JumpReLU."""
    if not model.writes_features:
        raise ExportError(f"circuit-tracer has no format for a {type(model).__name__}: it has no "
                          "feature decoder rows")
    L = model.n_layers
    if model.nonlinearity.exports_as is None and not converted:
        raise ExportError(
            f"circuit-tracer has no {model.nonlinearity.kind} activation: convert the model to "
            f"JumpReLU "
            f"first with clt.convert (convert / to_jumprelu with ema_thresholds or "
            f"calibrate_thresholds)")
    if 1 < model.reach < L:
        raise ExportError(
            f"reach {model.reach} of {L} layers has no circuit-tracer format: it stores either a "
            f"full crosslayer transcoder (reach == L) or per-layer transcoders (reach == 1)")
    if model.W_skip is not None and model.reach != 1:
        raise ExportError("circuit-tracer's crosslayer transcoder files (W_enc_i / W_dec_i) have "
                          "no skip connection; only per-layer transcoders (reach 1) store W_skip")
    if model.d_in != model.d_out:
        raise ExportError(f"circuit-tracer's formats have one width d_model for inputs and "
                          f"outputs; this model has d_in={model.d_in}, d_out={model.d_out}")
    layers = list(range(L)) if layers is None else [int(i) for i in layers]
    if layers != list(range(L)):
        raise ExportError(
            f"circuit-tracer indexes transcoder files by LM block 0..n-1: the trained layers must "
            f"be 0..{L - 1}, got {layers}")
    return layers


def _tensors(model: CrossLayerTranscoder, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The safetensors entries of the folded JumpReLU/ReLU ``model`` (name -> tensor)."""

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype).contiguous()

    L = model.n_layers
    theta = None
    if model.nonlinearity.exports_as == "jump_relu":
        # the model's own arithmetic: exp in (at least) float32, compared with pre
        lt = model.log_threshold.detach()
        theta = lt.to(torch.promote_types(lt.dtype, torch.float32)).exp()
    entries: dict[str, torch.Tensor] = {}
    for i in range(L):
        W_enc, b_enc, b_dec = model.W_enc[i].T, model.b_enc[i], model.b_dec[i]
        W_dec = model.decoder_view(i)  # [F, R_i, d_out]
        if model.reach == 1:
            entries[f"layer_{i}.safetensors/W_enc"] = prep(W_enc)
            entries[f"layer_{i}.safetensors/W_dec"] = prep(W_dec[:, 0])
            entries[f"layer_{i}.safetensors/b_enc"] = prep(b_enc)
            entries[f"layer_{i}.safetensors/b_dec"] = prep(b_dec)
            if theta is not None:
                entries[f"layer_{i}.safetensors/activation_function.threshold"] = prep(theta[i])
            if model.W_skip is not None:  # circuit-tracer applies ``x @ W_skip.T``
                entries[f"layer_{i}.safetensors/W_skip"] = prep(model.W_skip[i].T)
        else:
            entries[f"W_enc_{i}.safetensors/W_enc_{i}"] = prep(W_enc)
            entries[f"W_enc_{i}.safetensors/b_enc_{i}"] = prep(b_enc)
            entries[f"W_enc_{i}.safetensors/b_dec_{i}"] = prep(b_dec)
            if theta is not None:
                entries[f"W_enc_{i}.safetensors/threshold_{i}"] = prep(theta[i])
            entries[f"W_dec_{i}.safetensors/W_dec_{i}"] = prep(W_dec)
    return entries


def _config(model: CrossLayerTranscoder, input_hook: str, output_hook: str,
            layers: list[int], model_name: str | None) -> dict[str, Any]:
    clt = model.reach != 1  # one layer, reach 1: a transcoder set of one
    cfg: dict[str, Any] = {
        "model_kind": "cross_layer_transcoder" if clt else "transcoder_set",
        "feature_input_hook": TL_HOOK_NAMES.get(input_hook, input_hook),
        "feature_output_hook": TL_HOOK_NAMES.get(output_hook, output_hook),
    }
    if model_name is not None:
        cfg["model_name"] = model_name
    if model.nonlinearity.exports_as == "relu" and not clt:
        cfg["activation"] = "relu"
    cfg.update({
        "activation_function": model.nonlinearity.exports_as,
        "n_layers": model.n_layers,
        "layers": layers,
        "d_model": model.d_in,
        "d_transcoder": model.n_features,
    })
    return cfg


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """``clt.runs.check_output_dir`` for an export: never into a run folder, and ``overwrite``
    replaces only an earlier export (it holds ``EXPORT_MARKER``)."""
    try:
        check_output_dir(out_dir, EXPORT_MARKER, overwrite, "export")
    except RunDirError as exc:
        raise ExportError(str(exc)) from None


def _replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out_dir`` (an earlier export only if allowed)."""
    check_out_dir(out_dir, overwrite)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
        return
    if out_dir.is_dir():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


def export_circuit_tracer(
    model: CrossLayerTranscoder,
    out_dir: str | Path,
    input_hook: str = "hook_mlp_in",
    output_hook: str = "hook_mlp_out",
    layers: Sequence[int] | None = None,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    model_name: str | None = None,
) -> Path:
    """Write ``model`` (JumpReLU or ReLU, reach 1 or L) to ``out_dir`` in circuit-tracer's format.

    ``input_hook`` / ``output_hook``: block-relative hooks as in the run config (``hook_mlp_in``
    is written as ``hook_resid_mid``). ``layers``: the LM blocks trained (must be ``0..L-1``;
    default that). The standardizer is folded into a copy first. ``dtype``: of every written
    tensor (default: the model's). Refuses a non-empty ``out_dir`` unless ``overwrite``.
    Returns ``out_dir``.
    """
    layers = _check_exportable(model, layers)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    folded = model.folded_copy()
    dtype = dtype or model.W_enc.dtype
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _tensors(folded, dtype).items():
        file, name = key.split("/", 1)
        files.setdefault(file, {})[name] = tensor
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for file, tensors in files.items():
            save_file(tensors, str(tmp / file))
        config = _config(model, input_hook, output_hook, layers, model_name)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"model_name": model_name}) + "\n")
        _replace_dir(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


# ---- an independent reader -----------------------------------------------------------------


def load_exported(out_dir: str | Path) -> dict[str, Any]:
    """Read an exported folder from the format alone (no model code) into plain tensors.

    Returns ``config`` (the yaml), ``kind``, ``n_layers``, per layer lists ``W_enc`` ``[F, d]``,
    ``b_enc``, ``b_dec``, ``threshold`` (None for ReLU), ``W_dec`` (``[F, L-i, d]`` for a CLT,
    ``[F, d]`` for a transcoder set) and ``W_skip`` (a set's optional ``[d, d]``, applied as
    ``x @ W_skip.T``), and two functions on raw ``x [L, N, d]``:
    ``encode(x) -> a [L, N, F]`` (``relu`` or ``pre * (pre > threshold)`` of
    ``pre = x @ W_enc.T + b_enc``) and ``reconstruct(x) -> out [L, N, d]``
    (``out[t] = b_dec[t] + sum_{s <= t} a_s @ W_dec_s[:, t - s]``; a set: ``a_t @ W_dec_t``).
    """
    out_dir = Path(out_dir)
    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    kind = config["model_kind"]
    r: dict[str, Any] = {"config": config, "kind": kind, "W_enc": [], "b_enc": [], "b_dec": [],
                         "threshold": [], "W_dec": [], "W_skip": []}
    if kind == "cross_layer_transcoder":
        L = len(list(out_dir.glob("W_enc_*.safetensors")))
        for i in range(L):
            enc = load_file(str(out_dir / f"W_enc_{i}.safetensors"))
            r["W_enc"].append(enc[f"W_enc_{i}"])
            r["b_enc"].append(enc[f"b_enc_{i}"])
            r["b_dec"].append(enc[f"b_dec_{i}"])
            r["threshold"].append(enc.get(f"threshold_{i}"))
            r["W_dec"].append(load_file(str(out_dir / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"])
    elif kind == "transcoder_set":
        L = len(list(out_dir.glob("layer_*.safetensors")))
        for i in range(L):
            t = load_file(str(out_dir / f"layer_{i}.safetensors"))
            for key in ("W_enc", "b_enc", "b_dec", "W_dec"):
                r[key].append(t[key])
            r["threshold"].append(t.get("activation_function.threshold"))
            r["W_skip"].append(t.get("W_skip"))
    else:
        raise ValueError(f"unknown model_kind {kind!r}")
    r["n_layers"] = L

    def encode(x: torch.Tensor) -> torch.Tensor:
        acts = []
        for i in range(L):
            W = r["W_enc"][i].to(x.dtype)
            pre = x[i] @ W.T + r["b_enc"][i].to(x.dtype)
            theta = r["threshold"][i]
            acts.append(torch.relu(pre) if theta is None else pre * (pre > theta.to(x.dtype)))
        return torch.stack(acts)

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        a = encode(x)
        out = []
        for t in range(L):
            y = r["b_dec"][t].to(x.dtype).expand(x.shape[1], -1).clone()
            if kind == "transcoder_set":
                y = y + a[t] @ r["W_dec"][t].to(x.dtype)
                if r["W_skip"][t] is not None:
                    y = y + x[t] @ r["W_skip"][t].to(x.dtype).T
            else:
                for s in range(t + 1):
                    y = y + a[s] @ r["W_dec"][s][:, t - s].to(x.dtype)
            out.append(y)
        return torch.stack(out)

    r["encode"], r["reconstruct"] = encode, reconstruct
    return r


# ---- run folders and the command line ------------------------------------------------------


def _heldout(cfg, device: torch.device, n_tokens: int):
    with contextlib.redirect_stdout(sys.stderr):  # transformer-lens prints "Moving model..."
        source = build_source(cfg, device)
    try:
        batches = source.heldout_batches(n_tokens)
    finally:
        source.close()
    # pieces of EVAL_CHUNK tokens (views): evaluation holds dense [L, n, F] pre-activations
    return [(x[:, i : i + EVAL_CHUNK], y[:, i : i + EVAL_CHUNK])
            for x, y in batches for i in range(0, x.shape[1], EVAL_CHUNK)]


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    threshold: str | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    overwrite: bool = False,
    device: str = "cpu",
    log=print,
) -> dict[str, Any]:
    """Load a run, convert it to JumpReLU if needed, report L0/FVU, export. Returns the report."""
    if n_tokens < 1:
        raise ExportError(f"--tokens must be >= 1, got {n_tokens}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)  # before anything loads
    cfg, model, step = load_run(run_dir, device, error=ExportError)
    nl = model.nonlinearity
    kind = cfg.nonlinearity.kind
    if threshold is not None and nl.exports_as is not None:
        raise ExportError(f"--threshold applies to TopK/BatchTopK runs only (this one is {kind!r})")
    if threshold == "ema" and nl.conversion != "ema":
        raise ExportError(f"--threshold ema needs a BatchTopK run (this one is {kind!r})")
    if cfg.data.source == "lm":
        input_hook, output_hook = cfg.data.lm.input_hook, cfg.data.lm.output_hook
        model_name = cfg.data.lm.name
    else:
        input_hook, output_hook, model_name = "hook_mlp_in", "hook_mlp_out", None
    layers = cfg.resolved_layers or list(range(model.n_layers))
    _check_exportable(model, layers, converted=True)  # fail fast, before loading data
    batches = _heldout(cfg, torch.device(device), n_tokens)
    try:
        converted = convert(model, threshold, batches)
    except ConversionError as exc:
        raise ExportError(str(exc)) from None
    report = conversion_report(model, converted, batches)
    method = (threshold or nl.conversion) if nl.exports_as is None else "none"
    log(f"run {run_dir} step {step}: {kind} -> {converted.nonlinearity.kind} (thresholds: "
        f"{method}), "
        f"{sum(b[0].shape[1] for b in batches)} held-out tokens")
    log(format_report(report))
    export_circuit_tracer(converted, out_dir, input_hook, output_hook, layers,
                          overwrite=overwrite, model_name=model_name)
    log(f"exported to {out_dir}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    kernels.cpu_fast_paths(True)  # opt in to the ops' CPU performance paths
    parser = argparse.ArgumentParser(
        prog="python -m clt.export",
        description="Export a run's latest checkpoint in circuit-tracer's format (TopK/BatchTopK "
                    "runs are converted to JumpReLU first).")
    parser.add_argument("run_dir", help="run folder (config.json, step_*.pt)")
    parser.add_argument("out_dir", help="folder to write (must be absent or empty)")
    parser.add_argument("--threshold", choices=("ema", "calibrate"), default=None,
                        help="JumpReLU thresholds of a TopK-family run: BatchTopK's EMA "
                             "(BatchTopK default) or calibrated to the trained L0 on held-out "
                             "activations (TopK default)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"held-out tokens for calibration and the report "
                             f"(default {DEFAULT_TOKENS})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it holds an earlier export (nothing else)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    try:
        export_run(args.run_dir, args.out_dir, args.threshold, args.tokens, args.overwrite,
                   args.device)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # e.g. the disk filled up while writing (nothing is half-written)
        print(f"error: {exc.strerror or exc}: {exc.filename or args.out_dir}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
