"""Turn a TopK / BatchTopK transcoder into a JumpReLU one for inference and export.

circuit-tracer (and most inference tooling) knows ReLU and JumpReLU only, so a TopK-family model
is exported as a JumpReLU with one threshold per (layer, feature). Two threshold sources:

- ``ema_thresholds(model)``: BatchTopK's own inference rule. Its eval mode already is a JumpReLU at
  the EMA of the smallest kept pre-activation (per layer, or one global value), so the converted
  model gives the same codes (up to the float32 rounding of ``exp(log(theta))``).
- ``calibrate_thresholds(model, batches, per_feature=True)`` (what ``convert`` uses for TopK,
  and so ``clt.export``): per (layer, feature), the
  threshold at which the JumpReLU fires on exactly as many of the given held-out tokens as the
  trained selection (TopK's top-k, BatchTopK's batch top-k) fires that feature: between its
  ``c``-th and ``c+1``-th largest pre-activation, ``c`` its trained firing count. Per-layer L0
  then matches the trained one exactly (ties aside) and each feature keeps its own density: a
  frequent feature with small pre-activations is not cut off by a threshold set by the others.
  A feature the trained selection never picked on these tokens gets a threshold at its largest
  pre-activation there (it stays silent on them).
- ``calibrate_thresholds(model, batches)``: per layer, the single threshold at
  which the JumpReLU's mean L0 on the tokens equals a target (default: the trained model's own L0
  there, about ``k`` for TopK): between the ``m``-th and ``m+1``-th largest pre-activation of the
  layer, ``m = round(target * tokens)``, found by a streaming top-``m``.

Thresholds are strictly positive, so the converted model never emits a negative activation
(``pre > theta > 0``). ``conversion_report`` gives L0 and FVU per layer before and after.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .model import CrossLayerTranscoder
from .nonlinearities import JumpReLU
from .trainer import evaluate

Batch = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


class ConversionError(ValueError):
    """A model or threshold that cannot be converted to JumpReLU."""


def _full_thresholds(model: CrossLayerTranscoder, thresholds) -> torch.Tensor:
    """Any of scalar, ``[L]``, ``[L, 1]``, ``[1, F]``, ``[L, F]`` -> float64 ``[L, F]``."""
    L, F = model.n_layers, model.n_features
    t = torch.as_tensor(thresholds, dtype=torch.float64).detach().cpu()
    if t.dim() == 1 and t.shape[0] == L and L != F:
        t = t.view(L, 1)
    elif t.dim() == 1 and t.shape[0] == L:
        raise ConversionError(f"ambiguous thresholds of shape [{L}] with L == F == {L}: "
                              f"pass [L, 1] or [1, F]")
    try:
        t = t.expand(L, F).clone()
    except RuntimeError:
        raise ConversionError(f"thresholds of shape {tuple(t.shape)} do not broadcast to "
                              f"[L={L}, F={F}]") from None
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        bad = t[~(torch.isfinite(t) & (t > 0))]
        raise ConversionError(f"JumpReLU thresholds must be finite and > 0 (a threshold <= 0 "
                              f"would let negative pre-activations through); got "
                              f"{bad.numel()} bad values, e.g. {bad.flatten()[0].item():g}")
    return t


def to_jumprelu(model: CrossLayerTranscoder, thresholds) -> CrossLayerTranscoder:
    """A JumpReLU copy of ``model`` (weights, standardizer and buffers shared by value, never
    in place) with ``log_threshold = log(thresholds)``.

    ``thresholds``: strictly positive, broadcastable to ``[L, F]`` (a scalar, one per layer as
    ``[L]`` or ``[L, 1]``, or one per feature ``[L, F]``). ``log_threshold`` is float32 like in a
    trained JumpReLU model; ``exp`` of it reproduces the threshold to float32 rounding.
    """
    theta = _full_thresholds(model, thresholds)
    out = copy.deepcopy(model)  # no constructor: it would draw a fresh init from the global RNG
    out.nonlinearity = JumpReLU()  # it does not rank by decoder norm: folding is then allowed
    log_theta = theta.log().to(torch.float32).to(model.W_enc.device)
    if "log_threshold" in out._parameters:
        del out._parameters["log_threshold"]
    out.log_threshold = nn.Parameter(log_theta)
    return out


def ema_thresholds(model: CrossLayerTranscoder) -> torch.Tensor:
    """``[L, F]`` thresholds from a BatchTopK model's inference EMA (per layer or global)."""
    try:
        ema = model.nonlinearity.ema_thresholds(model)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if int(model.threshold_updates) == 0:
        raise ConversionError("the BatchTopK EMA threshold was never updated (untrained model): "
                              "calibrate on held-out data instead")
    if not bool((ema > 0).all()):
        raise ConversionError(f"the BatchTopK EMA threshold is not positive "
                              f"({model.threshold.tolist()}): a JumpReLU needs threshold > 0, "
                              f"calibrate on held-out data instead")
    return ema


def _inputs(batch: Batch) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def _standardized(model: CrossLayerTranscoder, batch: Batch) -> torch.Tensor:
    x = _inputs(batch).to(model.W_enc.device, model.W_enc.dtype)
    return model.standardizer.inputs(x)


def _chunks(model: CrossLayerTranscoder, batches: Iterable[Batch], chunk: int):
    """Standardized ``x [L, n <= chunk, d_in]`` pieces of raw batches (bounded memory: the dense
    pre-activations of a piece are ``[L, chunk, F]``)."""
    for batch in batches:
        x = _inputs(batch)
        for start in range(0, x.shape[1], chunk):
            yield _standardized(model, x[:, start : start + chunk])


@torch.no_grad()
def trained_counts(
    model: CrossLayerTranscoder, batches: Iterable[Batch], chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """``([L, F] int64 firing counts, tokens)`` of the model's TRAINING selection on raw batches:
    TopK's top-k (positive entries), BatchTopK's exact batch top-k over each ``chunk`` tokens (EMA
    untouched; ``chunk`` plays the training batch size)."""
    L, F = model.n_layers, model.n_features
    counts = torch.zeros(L, F, dtype=torch.int64)
    tokens = 0
    for x in _chunks(model, batches, chunk):
        try:
            counts += model.nonlinearity.trained_counts(model, x).cpu()
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
        tokens += x.shape[1]
    if tokens == 0:
        raise ConversionError("no held-out tokens given")
    return counts, tokens


@torch.no_grad()
def trained_l0(
    model: CrossLayerTranscoder, batches: Iterable[Batch], chunk: int = 1024
) -> torch.Tensor:
    """``[L]`` mean L0 per token of the model's TRAINING selection on raw batches (see
    :func:`trained_counts`)."""
    counts, tokens = trained_counts(model, batches, chunk)
    return counts.sum(dim=1).double() / tokens


@torch.no_grad()
def calibrate_thresholds(
    model: CrossLayerTranscoder,
    batches: Sequence[Batch],
    target_l0: float | Sequence[float] | torch.Tensor | None = None,
    chunk: int = 1024,
    per_feature: bool = False,
) -> torch.Tensor:
    """``[L, F]`` JumpReLU thresholds matching the trained selection on held-out ``batches``.

    ``per_feature``: one threshold per (layer, feature), see :func:`_per_feature_thresholds`
    (what :func:`convert` uses); needs a TopK/BatchTopK model and no ``target_l0``.
    Otherwise one threshold per layer, matching a mean L0 per layer:

    ``batches``: RAW held-out inputs, ``x [L, N, d_in]`` or ``(x, y)`` pairs as
    ``clt.trainer.evaluate`` takes them; they are standardized with the model's standardizer.
    ``target_l0``: mean active features per token, a scalar or one per layer; default
    :func:`trained_l0` on the same batches (about ``k`` for TopK).

    Per layer, with ``n`` tokens and ``m = round(target * n)``: the threshold is the midpoint of
    the ``m``-th and ``m+1``-th largest pre-activations (floored at 0), so exactly ``m`` entries
    pass ``pre > theta`` on these tokens (ties aside). With fewer than ``m`` positive
    pre-activations the threshold sits below the smallest positive one (L0 falls short).
    Streaming: one layer and ``chunk`` tokens of dense pre-activations at a time, plus the
    running ``m + 1`` largest values per layer.
    """
    batches = list(batches)
    if not batches or sum(_inputs(b).shape[1] for b in batches) == 0:
        raise ConversionError("calibration needs at least one held-out token")
    L, F = model.n_layers, model.n_features
    if per_feature:
        if target_l0 is not None:
            raise ConversionError("per-feature thresholds match each feature's trained firing "
                                  "count; a target_l0 needs per_feature=False")
        return _per_feature_thresholds(model, batches, chunk)
    if target_l0 is None:
        target = trained_l0(model, batches, chunk)
    else:
        target = torch.as_tensor(target_l0, dtype=torch.float64).flatten().expand(L).clone()
    if not bool(((target > 0) & (target <= F)).all()):
        raise ConversionError(f"target L0 must be in (0, F={F}], got {target.tolist()}")
    n = sum(_inputs(b).shape[1] for b in batches)
    m = [min(max(1, round(float(t) * n)), n * F) for t in target]
    top: list[torch.Tensor | None] = [None] * L  # the m+1 largest values so far, descending
    smallest_pos = [math.inf] * L
    for x in _chunks(model, batches, chunk):
        for layer in range(L):
            flat = model.pre_activations(x[layer : layer + 1], layer).flatten()
            pos = flat[flat > 0]
            if pos.numel():
                smallest_pos[layer] = min(smallest_pos[layer], float(pos.min()))
            both = flat if top[layer] is None else torch.cat([top[layer], flat])
            top[layer] = both.topk(min(m[layer] + 1, both.numel())).values
    theta = torch.empty(L, dtype=torch.float64)
    for layer in range(L):
        vals = top[layer].double().cpu()
        v_m = float(vals[m[layer] - 1])
        v_next = float(vals[m[layer]]) if vals.numel() > m[layer] else -math.inf
        if v_m > 0:
            theta[layer] = (v_m + max(v_next, 0.0)) / 2
        elif math.isfinite(smallest_pos[layer]):
            theta[layer] = smallest_pos[layer] / 2
        else:  # nothing positive at all: any positive threshold gives L0 = 0
            theta[layer] = 1.0
    return theta.view(L, 1).expand(L, F).clone()


@torch.no_grad()
def _per_feature_thresholds(model: CrossLayerTranscoder, batches: list[Batch], chunk: int
                            ) -> torch.Tensor:
    """``[L, F]``: feature ``f`` of a layer fires on ``c_f`` tokens under the trained selection
    (:func:`trained_counts`); its threshold is the midpoint of its ``c_f``-th and ``c_f+1``-th
    largest pre-activation over the tokens (the latter floored at 0), so ``pre > theta`` holds
    on exactly ``c_f`` tokens (ties aside). ``c_f = 0``: its largest pre-activation (no token
    passes). A non-positive result (only when the selection kept a non-positive value, or the
    feature's largest pre-activation is <= 0) becomes the smallest positive threshold of the
    layer, 1.0 if none: thresholds must be > 0.

    Two passes over ``batches``: the counts, then per layer a running top-``(max c + 1)`` per
    feature over ``chunk``-token pieces (memory ``(max c + 1 + chunk) * F`` per layer).
    """
    counts, n = trained_counts(model, batches, chunk)
    L, F = counts.shape
    theta = torch.empty(L, F, dtype=torch.float64)
    for layer in range(L):
        c = counts[layer]  # [F]
        depth = min(int(c.max()) + 1, n)
        top = None  # [<= depth, F] largest pre-activations per feature, descending
        for x in _chunks(model, batches, chunk):
            pre = model.pre_activations(x[layer : layer + 1], layer)[0]  # [n_chunk, F]
            both = pre if top is None else torch.cat([top, pre])
            top = both.topk(min(depth, both.shape[0]), dim=0).values
        top = top.double().cpu()
        cols = torch.arange(F)
        v_c = top[(c - 1).clamp(min=0), cols]  # c-th largest (c >= 1)
        below = c < top.shape[0]
        v_next = torch.where(below, top[c.clamp(max=top.shape[0] - 1), cols],
                             torch.zeros(F, dtype=torch.float64)).clamp(min=0)
        t = torch.where(c > 0, (v_c + v_next) / 2, top[0])
        good = t > 0
        floor = float(t[good].min()) if bool(good.any()) else 1.0
        theta[layer] = torch.where(good, t, torch.full_like(t, floor))
    return theta


def convert(
    model: CrossLayerTranscoder,
    method: str | None = None,
    batches: Sequence[Batch] | None = None,
    target_l0=None,
) -> CrossLayerTranscoder:
    """JumpReLU copy of a TopK/BatchTopK model; JumpReLU and ReLU models come back as copies.

    ``method``: ``"ema"`` (BatchTopK only, its default) or ``"calibrate"`` (needs ``batches``;
    TopK's default): per-feature thresholds matching the trained selection on ``batches``, or,
    with an explicit ``target_l0``, one threshold per layer matching that mean L0.
    """
    if model.nonlinearity.exports_as is not None:
        return copy.deepcopy(model)
    method = method or model.nonlinearity.conversion
    if method == "ema":
        return to_jumprelu(model, ema_thresholds(model))
    if method == "calibrate":
        if not batches:
            raise ConversionError("calibrating thresholds needs held-out batches")
        theta = calibrate_thresholds(model, batches, target_l0, per_feature=target_l0 is None)
        return to_jumprelu(model, theta)
    raise ConversionError(f"threshold method must be 'ema' or 'calibrate', got {method!r}")


def conversion_report(
    original: CrossLayerTranscoder,
    converted: CrossLayerTranscoder,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, dict[str, list[float] | float]]:
    """``{"before": ..., "after": ...}`` each with ``fvu`` and ``l0`` per layer and
    ``fvu_total``, from :func:`clt.trainer.evaluate` on raw held-out ``(x, y)`` batches
    (eval mode: BatchTopK at its EMA threshold)."""
    out = {}
    for name, model in (("before", original), ("after", converted)):
        metrics = evaluate(model, batches)
        out[name] = {"fvu": [float(v) for v in metrics["eval/fvu"]],
                     "l0": [float(v) for v in metrics["eval/l0"]],
                     "fvu_total": float(metrics["eval/fvu_total"])}
    return out


def format_report(report: dict[str, dict]) -> str:
    """The report as a small table, one row per layer."""
    before, after = report["before"], report.get("after", report["before"])
    lines = [f"{'layer':>5}  {'L0 before':>9}  {'L0 after':>9}  {'FVU before':>10}  "
             f"{'FVU after':>10}"]
    for i, (l0_b, l0_a, f_b, f_a) in enumerate(zip(before["l0"], after["l0"], before["fvu"],
                                                   after["fvu"], strict=True)):
        lines.append(f"{i:>5}  {l0_b:>9.2f}  {l0_a:>9.2f}  {f_b:>10.4f}  {f_a:>10.4f}")
    lines.append(f"{'total':>5}  {'':>9}  {'':>9}  {before['fvu_total']:>10.4f}  "
                 f"{after['fvu_total']:>10.4f}")
    return "\n".join(lines)


@torch.no_grad()
def from_circuit_tracer(folder) -> tuple[CrossLayerTranscoder, list[int], tuple[str, str]]:
    """Read an exported folder (``clt.export``'s circuit-tracer files) back into our model class:
    ``(model, layers, (input_hook, output_hook))``, a JumpReLU (or ReLU) transcoder on raw
    activations (identity standardizer) whose codes and outputs are those of the files.

    JumpReLU thresholds come back as ``log_threshold = log(threshold)`` in float32, so
    ``exp`` of it may differ from the file's value by a float32 rounding step. Hooks are given as
    the run config names them (``hook_resid_mid`` is ``hook_mlp_in``)."""
    # deferred: clt.export imports clt.convert (cycle)
    from .export import TL_HOOK_NAMES, load_exported

    files = load_exported(folder)
    L, kind = files["n_layers"], files["kind"]
    F, d_in = files["W_enc"][0].shape
    clt_kind = kind == "cross_layer_transcoder"
    d_out = files["W_dec"][0].shape[-1]
    jumprelu = files["threshold"][0] is not None
    skip = not clt_kind and files["W_skip"][0] is not None
    dtype = files["W_enc"][0].dtype
    model = CrossLayerTranscoder(L, d_in, d_out, F, reach=None if clt_kind else 1,
                                 nonlinearity="jumprelu" if jumprelu else "relu", skip=skip,
                                 dtype=dtype)
    model.W_enc.copy_(torch.stack([w.T for w in files["W_enc"]]))
    model.b_enc.copy_(torch.stack(files["b_enc"]))
    model.b_dec.copy_(torch.stack(files["b_dec"]))
    for s in range(L):
        block = files["W_dec"][s]
        model.decoder_view(s).copy_(block if clt_kind else block[:, None])
        if skip:
            model.W_skip[s].copy_(files["W_skip"][s].T)
    if jumprelu:
        theta = torch.stack(files["threshold"]).to(torch.float32)
        model.log_threshold.data = theta.log().to(model.log_threshold.device)
    config = files["config"]
    back = {v: k for k, v in TL_HOOK_NAMES.items()}
    hooks = (back.get(config["feature_input_hook"], config["feature_input_hook"]),
             back.get(config["feature_output_hook"], config["feature_output_hook"]))
    return model.eval(), list(config.get("layers", range(L))), hooks
