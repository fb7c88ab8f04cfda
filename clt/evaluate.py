"""Replacement-model evaluation: splice a transcoder into the frozen LM and measure the damage.

    python -m clt.evaluate RUN_DIR [--tokens N]            # one run, as a table
    python -m clt.evaluate --compare RUN_A RUN_B ...        # runs side by side, one column each

Definitions (all metrics share them):

- Tokens ``[B, T]`` are packed held-out sequences whose position 0 is BOS. The transcoder's output
  replaces the output hook (``blocks.{l}.hook_mlp_out``) of every trained layer at positions
  ``1..T-1``; the BOS position 0 is never touched (BOS activations are outliers the transcoder was
  not trained on). Zero ablation, the baseline of "CE recovered", zeroes the same positions only.
- Predictions are scored at positions ``1..T-2`` (targets ``2..T-1``): the prediction made at BOS
  depends on the BOS position only, which is identical in every run, so it is excluded. Every
  metric is a plain mean over all ``B * (T-2)`` scored positions (no per-sequence averaging).
- ``ce_*``: next-token cross-entropy in nats of the original LM, the replacement and the
  zero-ablated model; ``ce_delta = ce_repl - ce_orig``;
  ``ce_recovered = (ce_zero - ce_repl) / (ce_zero - ce_orig)`` (1: as good as the LM, 0: as bad
  as deleting those MLP outputs; NaN when ablation changes nothing).
- ``kl``: ``KL(P_orig || P_repl) = sum_v p_orig (log p_orig - log p_repl)``, the original model
  as the reference distribution, in nats.
- ``top1_agreement``: fraction of positions where both models' argmax next token is the same.
- Modes: ``"open"`` feeds the transcoder the ORIGINAL model's input activations at every layer
  (one clean forward, then one patched forward); ``"closed"`` is the full replacement model: the
  transcoder reads the input hooks of the patched run itself, so errors compound across layers.
  Closed loop is one forward pass: each trained layer's input hook records the (patched-run)
  input, and each output hook writes the output for that target computed from the inputs of all
  sources recorded so far (a source ``s`` only writes targets ``t >= s``, so this is causal;
  sources after ``t`` are passed as zeros and cannot influence target ``t``).

Reconstruction metrics of ``evaluate_run`` (FVU per layer and total, L0 per layer) come from
``clt.trainer.evaluate`` on the non-BOS tokens of the same held-out sequences.

Graph scores of ``evaluate_run`` (``replacement_score``, ``completeness_score``, their standard
errors ``*_se`` and ``graph_prompts`` in the ``"open"`` dict: the attribution graph reads the
features from the original model's activations, as the open loop does): circuit-tracer's
replacement and completeness scores of the unpruned attribution graphs of the first
``eval.graph_prompts`` held-out sequences, cut to ``eval.graph_prompt_tokens`` tokens (BOS
first), mean and standard error over prompts; definitions in :mod:`clt.attribution`. Only for
transcoders that write ``hook_mlp_out`` (not SAEs, not MOLTs).

The exported model: circuit-tracer only ever sees the JumpReLU conversion ``clt.export`` writes
(:func:`clt.convert.convert`: per-feature thresholds calibrated to the trained selection for
TopK, the EMA threshold for BatchTopK, folded standardization). For TopK / BatchTopK runs
``evaluate_run`` builds that model from the same held-out tokens and reports its FVU and L0
(``result["exported"]``) and its graph scores (``exported_*`` keys of the ``"open"`` dict);
JumpReLU and ReLU runs are exported as trained, so their scores are the exported ones.

An optional metric that cannot be computed (today: graph scores whose edge rows exceed
``max_edge_bytes``, e.g. a still-dense JumpReLU model) is left out of the mode dicts and listed in
``result["skipped"]`` (metric -> reason and hint); the rest of the evaluation still runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

import kernels

from .attribution import GraphTooLarge, attribution_scores
from .convert import convert
from .data import frozen_lm, heldout_stream
from .export import ExportError, export_circuit_tracer
from .model import Codes
from .trainer import evaluate, load_run

MODES = ("open", "closed")
DEFAULT_TOKENS = 4096

# Rows of the printed table: (key in the flat result, label, format).
_REPLACEMENT_ROWS = (
    ("ce_orig", "CE original (nats)", "{:.4f}"),
    ("ce_repl", "CE replacement (nats)", "{:.4f}"),
    ("ce_zero", "CE zero-ablation (nats)", "{:.4f}"),
    ("ce_delta", "delta CE (repl - orig)", "{:+.4f}"),
    ("ce_recovered", "CE recovered", "{:.4f}"),
    ("kl", "KL(orig || repl) (nats)", "{:.5f}"),
    ("top1_agreement", "top-1 agreement", "{:.4f}"),
)
# Rows present only where the graph scores were computed (the "open" dict); a score with a
# standard error ("<key>_se") prints as "mean +- se".
_GRAPH_ROWS = (
    ("replacement_score", "graph replacement score (trained model)", "{:.4f}"),
    ("completeness_score", "graph completeness score (trained model)", "{:.4f}"),
    ("graph_prompts", "graph prompts", "{}"),
    ("exported_replacement_score", "graph replacement score (exported JumpReLU)", "{:.4f}"),
    ("exported_completeness_score", "graph completeness score (exported JumpReLU)", "{:.4f}"),
)
GRAPH_HINT = ("fewer tokens per prompt (--graph-tokens / eval.graph_prompt_tokens): the edge rows "
              "grow with the square of the prompt length")


class EvaluationError(ValueError):
    """A run folder that cannot be evaluated (missing, no checkpoint, no LM source)."""


# ---- metrics on logits ---------------------------------------------------------------------


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` per position over the last (vocabulary) dim, from logits, in nats.

    ``P`` is the reference: ``sum_v p (log p - log q)``; computed in float64.
    """
    logp = F.log_softmax(logits_p.double(), dim=-1)
    logq = F.log_softmax(logits_q.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy (float64) of ``logits [..., V]``, ``targets [...]``."""
    logp = F.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ---- splicing the transcoder into the LM ---------------------------------------------------


def _reconstruct(clt_model: Any, x: torch.Tensor) -> torch.Tensor:
    """``clt_model.reconstruct`` on raw ``x [L, N, d_in]``, in the model's device and dtype.

    Anything with a ``reconstruct`` method works (tests use stubs); the result comes back in
    ``x``'s device and dtype.
    """
    weight = getattr(clt_model, "W_enc", None)
    xin = x if weight is None else x.to(weight.device, weight.dtype)
    return clt_model.reconstruct(xin).to(x.device, x.dtype)


def _set_after_bos(value: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``value [B, T, d]`` with positions ``1..T-1`` replaced by ``new [B, T-1, d]``."""
    out = value.clone()
    out[:, 1:] = new.to(value.dtype)
    return out


class _ClosedLoop:
    """Output of target ``i`` from the inputs of sources ``0..i`` (closed loop, one target at a
    time).

    Any object with ``reconstruct``: sources after ``i`` are passed as zeros (they cannot reach
    target ``i``), one full reconstruction per target. A transcoder (``writes_features``) in eval
    mode takes a fast path with the same result: each source is encoded once, when its input
    arrives (``model.encode(x, layer=i)``), and the codes seen so far are decoded (L encodes per
    forward instead of ``L * L``).
    """

    def __init__(self, clt_model: Any, n_layers: int) -> None:
        self.model = clt_model
        self.fast = (getattr(clt_model, "writes_features", False) and not clt_model.training
                     and clt_model.W_skip is None)  # the fast path decodes codes only
        self.n_layers = n_layers
        self.codes: list[Any] = []

    def target(self, captured: list[torch.Tensor | None], i: int) -> torch.Tensor:
        if not self.fast:
            seen = captured[: i + 1]
            x = torch.stack([*seen, *[torch.zeros_like(seen[0])] * (self.n_layers - i - 1)])
            return _reconstruct(self.model, x)[i]
        model, x_raw = self.model, captured[i]
        st = model.standardizer
        x = x_raw.to(model.W_enc.device, model.W_enc.dtype)  # [N, d_in]
        x = ((x - st.in_mean[i].to(x.dtype)) / st.in_std[i].to(x.dtype)).unsqueeze(0)
        assert len(self.codes) == i, "sources must arrive in layer order"
        self.codes.append(model.encode(x, layer=i))
        # codes [L, N, K] of the sources seen so far; later sources are all padding
        K = max(c.values.shape[-1] for c in self.codes)
        values = x.new_zeros(self.n_layers, x.shape[1], K)
        indices = torch.zeros(values.shape, dtype=torch.int64, device=x.device)
        for s, c in enumerate(self.codes):
            values[s, :, : c.values.shape[-1]] = c.values[0]
            indices[s, :, : c.values.shape[-1]] = c.indices[0]
        y = st.restore_targets(model.decode(Codes(values, indices)))[i]
        return y.to(x_raw.device, x_raw.dtype)


@torch.no_grad()
def _batch_logits(
    lm, clt_model, tokens: torch.Tensor, in_names: list[str], out_names: list[str], mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[B, T, V]`` of the original, zero-ablated and replacement models on one batch."""
    # deferred: clt.data.lm imports transformer_lens (seconds); train.py imports this module
    from .data.lm import FORWARD_LOCK

    B, T = tokens.shape
    L = len(in_names)
    mask = torch.ones_like(tokens)
    wanted = set(in_names)

    def zero(value: torch.Tensor, hook) -> torch.Tensor:
        return _set_after_bos(value, torch.zeros_like(value[:, 1:]))

    with FORWARD_LOCK:
        orig, cache = lm.run_with_cache(tokens, names_filter=lambda n: n in wanted,
                                        attention_mask=mask)
        zeroed = lm.run_with_hooks(tokens, fwd_hooks=[(n, zero) for n in out_names],
                                   attention_mask=mask)
        if mode == "open":
            x = torch.stack([cache[n][:, 1:] for n in in_names])  # [L, B, T-1, d_in]
            y = _reconstruct(clt_model, x.flatten(1, 2)).unflatten(1, (B, T - 1))

            def write_open(i: int):
                return lambda value, hook: _set_after_bos(value, y[i])

            hooks = [(n, write_open(i)) for i, n in enumerate(out_names)]
        else:
            step = _ClosedLoop(clt_model, L)
            captured: list[torch.Tensor | None] = [None] * L

            def capture(i: int):
                def hook_fn(value: torch.Tensor, hook) -> None:
                    captured[i] = value[:, 1:].flatten(0, 1)  # [B*(T-1), d_in]

                return hook_fn

            def write_closed(i: int):
                def hook_fn(value: torch.Tensor, hook) -> torch.Tensor:
                    assert all(c is not None for c in captured[: i + 1]), "input hook not seen"
                    y = step.target(captured, i)  # [B*(T-1), d_out]
                    return _set_after_bos(value, y.unflatten(0, (B, T - 1)))

                return hook_fn

            # Capture before write: for an SAE the input and output hook are the same point.
            hooks = []
            for i in range(L):
                hooks += [(in_names[i], capture(i)), (out_names[i], write_closed(i))]
        repl = lm.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask)
    return orig, zeroed, repl


@torch.no_grad()
def replacement_metrics(
    lm,
    clt_model,
    tokens: torch.Tensor,
    layers: Sequence[int],
    input_hook: str = "hook_mlp_in",
    output_hook: str = "hook_mlp_out",
    mode: str = "open",
    batch_size: int | None = None,
) -> dict[str, float]:
    """Replacement-model metrics of ``clt_model`` spliced into ``lm`` on ``tokens [B, T]``.

    ``layers`` are the LM blocks the transcoder was trained on (its layer ``i`` is block
    ``layers[i]``); ``clt_model`` needs ``reconstruct(x_raw [L, N, d_in]) -> [L, N, d_out]``
    (raw activations, layer-major). ``mode`` is "open" or "closed" (see the module docstring
    for every definition). ``batch_size`` sequences go through the LM at a time (all at once by
    default). Returns ``ce_orig``, ``ce_repl``, ``ce_zero``, ``ce_delta``, ``ce_recovered``,
    ``kl``, ``top1_agreement`` and ``n_positions``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens must be [B, T] with T >= 3 (BOS, a scored position, a target), "
                         f"got {tuple(tokens.shape)}")
    if not layers:
        raise ValueError("layers must not be empty")
    # deferred: clt.data.lm imports transformer_lens (seconds); train.py imports this module
    from .data.lm import layer_hook_names

    in_names, out_names = layer_hook_names(list(layers), input_hook, output_hook)
    missing = sorted({n for n in in_names + out_names if n not in lm.hook_dict})
    if missing:
        raise ValueError(f"hooks not found in the model: {missing}")
    was_training = getattr(clt_model, "training", None)
    if was_training:
        clt_model.eval()  # inference behaviour (BatchTopK: its EMA threshold)
    tokens = tokens.to(lm.cfg.device)
    step = batch_size or tokens.shape[0]
    sums = {"ce_orig": 0.0, "ce_repl": 0.0, "ce_zero": 0.0, "kl": 0.0, "top1": 0.0}
    n = 0
    try:
        for start in range(0, tokens.shape[0], step):
            batch = tokens[start : start + step]
            orig, zeroed, repl = _batch_logits(lm, clt_model, batch, in_names, out_names, mode)
            scored = slice(1, batch.shape[1] - 1)  # predictions at 1..T-2
            targets = batch[:, 2:]
            lo, lz, lr = orig[:, scored], zeroed[:, scored], repl[:, scored]
            sums["ce_orig"] += float(_cross_entropy(lo, targets).sum())
            sums["ce_zero"] += float(_cross_entropy(lz, targets).sum())
            sums["ce_repl"] += float(_cross_entropy(lr, targets).sum())
            sums["kl"] += float(kl_divergence(lo, lr).sum())
            sums["top1"] += float((lo.argmax(-1) == lr.argmax(-1)).sum())
            n += targets.numel()
    finally:
        if was_training:
            clt_model.train()
    ce_orig, ce_repl, ce_zero = sums["ce_orig"] / n, sums["ce_repl"] / n, sums["ce_zero"] / n
    gap = ce_zero - ce_orig
    return {
        "ce_orig": ce_orig,
        "ce_repl": ce_repl,
        "ce_zero": ce_zero,
        "ce_delta": ce_repl - ce_orig,
        "ce_recovered": (ce_zero - ce_repl) / gap if gap != 0 else math.nan,
        "kl": sums["kl"] / n,
        "top1_agreement": sums["top1"] / n,
        "n_positions": n,
    }


# ---- evaluating a run folder ---------------------------------------------------------------


def _reconstruction(model, pairs) -> dict[str, Any]:
    """Held-out FVU and L0 of ``model`` (and of its JumpReLU conversion, ``exported``, for the
    TopK family), and the converted model (None when it exports as it is)."""
    recon = evaluate(model, pairs)
    out: dict[str, Any] = {"fvu": [float(v) for v in recon["eval/fvu"]],
                           "fvu_total": float(recon["eval/fvu_total"]),
                           "l0": [float(v) for v in recon["eval/l0"]]}
    converted = None
    if model.writes_features and model.nonlinearity.exports_as is None:
        converted = convert(model, batches=pairs).eval()
        # FVU is measured on standardized targets: the converted model keeps the trained one's
        # standardizer, so its FVU compares with the trained FVU (the folded copy's would be a
        # raw-scale FVU, dominated by the highest-variance dimensions)
        after = evaluate(converted, pairs)
        out["exported"] = {"nonlinearity": converted.nonlinearity.kind,
                           "fvu": [float(v) for v in after["eval/fvu"]],
                           "fvu_total": float(after["eval/fvu_total"]),
                           "l0": [float(v) for v in after["eval/l0"]]}
    return out, converted


def _evaluate_without_lm(run_dir: Path, cfg, model, step: int, n_tokens: int,
                         device: torch.device) -> dict[str, Any]:
    """Reconstruction metrics of a run whose activations do not come from an LM (a planted
    dictionary or a plug-in source), on the source's held-out batches."""
    source = cfg.data.component.build(cfg, device, (0, 1))
    try:
        pairs = source.heldout_batches(n_tokens)
    except ValueError as exc:
        raise EvaluationError(f"{run_dir}: {n_tokens} held-out tokens cannot be served: "
                              f"{exc}; evaluate fewer with --tokens") from None
    finally:
        source.close()
    recon, _ = _reconstruction(model, pairs)
    return {"run": str(run_dir), "step": step, "tokens": sum(x.shape[1] for x, _ in pairs),
            **recon, "skipped": {"replacement metrics": f"need an LM-backed run (data.source "
                                 f"is {cfg.data.source!r})"}}


def _lm_and_stream(cfg, device: torch.device, batch_size: int):
    """The run's frozen LM (as ``clt.data.build_source`` loads it) and its held-out stream."""
    lm, tokenizer, ids = frozen_lm(cfg, device)
    return lm, heldout_stream(cfg, tokenizer, ids, batch_size)


def evaluate_run(
    run_dir: str | Path,
    n_tokens: int = DEFAULT_TOKENS,
    device: str | torch.device = "cpu",
    modes: Sequence[str] = MODES,
    graph_prompts: int | None = None,
    graph_prompt_tokens: int | None = None,
    max_edge_bytes: int | None = None,
    export_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder's latest checkpoint on held-out text.

    Uses the first ``ceil(n_tokens / (T-1))`` held-out sequences (the non-BOS token count is
    then at least ``n_tokens``; fewer if the held-out split ends first). Returns ``run``,
    ``step``, ``tokens`` (non-BOS tokens used), ``fvu`` (list per layer), ``fvu_total``, ``l0``
    (list per layer) and one dict of :func:`replacement_metrics` per mode under its name; the
    ``"open"`` dict also holds the graph scores (module docstring) unless there are no graph
    prompts, the transcoder does not write ``hook_mlp_out`` or is a MOLT.
    ``graph_prompts`` and ``graph_prompt_tokens`` default to the run's ``eval`` config;
    ``max_edge_bytes`` bounds one attribution graph (default ``clt.attribution.MAX_EDGE_BYTES``).
    TopK / BatchTopK runs also get ``exported`` (FVU and L0 of the JumpReLU conversion) and
    ``exported_*`` graph scores; metrics that could not be computed are listed in ``skipped``
    (module docstring). ``export_dir``: also write the exported model scored here (or the
    trained one, for JumpReLU / ReLU runs) there in circuit-tracer's format
    (:func:`clt.export.export_circuit_tracer`; the folder must be absent or empty).
    """
    # deferred: clt.data.lm imports transformer_lens (seconds); train.py imports this module
    from .data.lm import lm_activations

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    run_dir = Path(run_dir)
    device = torch.device(device)
    cfg, model, step = load_run(run_dir, device, error=EvaluationError)
    if not cfg.data.component.has_lm:
        if export_dir is not None:
            raise EvaluationError(f"{run_dir}: --export needs an LM-backed run (data.source is "
                                  f"{cfg.data.source!r})")
        return _evaluate_without_lm(run_dir, cfg, model, step, n_tokens, device)
    lm_cfg = cfg.data.lm
    n_prompts = cfg.eval.graph_prompts if graph_prompts is None else graph_prompts
    prompt_len = cfg.eval.graph_prompt_tokens if graph_prompt_tokens is None \
        else graph_prompt_tokens
    if n_prompts < 0 or prompt_len < 2:
        raise ValueError(f"need graph_prompts >= 0 and graph_prompt_tokens >= 2, got "
                         f"{n_prompts} and {prompt_len}")
    lm, stream = _lm_and_stream(cfg, device, lm_cfg.lm_batch_size)
    layers = cfg.resolved_layers or list(range(lm.cfg.n_layers))
    n_seq = math.ceil(n_tokens / (lm_cfg.seq_len - 1))
    n_load = max(n_seq, n_prompts)
    batches, total = [], 0
    for batch in stream:
        batches.append(batch[: n_load - total])
        total += batches[-1].shape[0]
        if total >= n_load:
            break
    if not batches:
        raise EvaluationError(f"{run_dir}: the held-out split is empty")
    loaded = torch.cat(batches)  # [n_load, T]
    tokens, prompts = loaded[:n_seq], loaded[:n_prompts, :prompt_len]

    pairs = []
    for batch in tokens.split(lm_cfg.lm_batch_size):
        x, y = lm_activations(lm, batch, layers, lm_cfg.input_hook, lm_cfg.output_hook)
        pairs.append((x[:, :, 1:].flatten(1, 2), y[:, :, 1:].flatten(1, 2)))  # drop BOS
    recon, converted = _reconstruction(model, pairs)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "step": step,
        "tokens": tokens.shape[0] * (tokens.shape[1] - 1),
        **recon,
    }
    for mode in modes:
        result[mode] = replacement_metrics(lm, model, tokens, layers, lm_cfg.input_hook,
                                           lm_cfg.output_hook, mode,
                                           batch_size=lm_cfg.lm_batch_size)
    # what the export files hold
    exported = None if converted is None else converted.folded_copy().eval()
    # graphs need features that write the MLP outputs (not an SAE) and a transcoder's own
    # encoder/decoder (not a MOLT); a skip connection is a linear path of the graph's model
    graphable = lm_cfg.output_hook == "hook_mlp_out" and model.writes_features
    skipped: dict[str, str] = {}
    if "open" in modes and len(prompts) and graphable:
        for prefix, label, scored in (("", "trained model", model),
                                      ("exported_", "exported JumpReLU", exported)):
            if scored is None:
                continue
            scores = _graph_scores(lm, scored, prompts, layers, cfg, max_edge_bytes)
            if isinstance(scores, str):
                skipped[f"graph scores ({label})"] = scores
            else:
                result["open"].update({prefix + key: v for key, v in scores.items()})
    if skipped:
        result["skipped"] = skipped
    result["layers"] = list(layers)
    if export_dir is not None:
        export_circuit_tracer(model if exported is None else exported, export_dir,
                              lm_cfg.input_hook, lm_cfg.output_hook, layers,
                              model_name=lm_cfg.name)
        result["export_dir"] = str(export_dir)
    return result


def _graph_scores(lm, model, prompts, layers, cfg, max_edge_bytes) -> dict[str, Any] | str:
    """:func:`clt.attribution.attribution_scores` of ``model`` on ``prompts``, or the reason
    (with a hint) why they cannot be computed."""
    lm_cfg = cfg.data.lm
    try:
        return attribution_scores(lm, model, prompts, layers, lm_cfg.input_hook,
                                  lm_cfg.output_hook, cfg.eval.graph_batch,
                                  max_edge_bytes=max_edge_bytes)
    except GraphTooLarge as exc:
        return f"{exc}; hint: {GRAPH_HINT}"


# ---- command line --------------------------------------------------------------------------


def _rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) rows of one result, in table order."""
    rows = [("step", str(result["step"])), ("held-out tokens", str(result["tokens"])),
            ("FVU total", f"{result['fvu_total']:.4f}"),
            ("L0 mean", f"{sum(result['l0']) / len(result['l0']):.2f}")]
    if "exported" in result:
        exported = result["exported"]
        rows += [("FVU total (exported JumpReLU)", f"{exported['fvu_total']:.4f}"),
                 ("L0 mean (exported JumpReLU)",
                  f"{sum(exported['l0']) / len(exported['l0']):.2f}")]
    layers = result.get("layers", range(len(result["fvu"])))
    rows += [(f"FVU layer {layer}", f"{v:.4f}") for layer, v in zip(layers, result["fvu"],
                                                                      strict=True)]
    rows += [(f"L0 layer {layer}", f"{v:.1f}") for layer, v in zip(layers, result["l0"],
                                                                    strict=True)]
    for mode in MODES:
        if mode not in result:
            continue
        m = result[mode]
        for key, label, fmt in _REPLACEMENT_ROWS + _GRAPH_ROWS:
            if key in m:
                se = f" +- {m[f'{key}_se']:.4f}" if f"{key}_se" in m else ""
                rows.append((f"[{mode}] {label}", fmt.format(m[key]) + se))
    rows += [(f"skipped: {metric}", reason)
             for metric, reason in result.get("skipped", {}).items()]
    return rows


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Runs side by side: one row per metric, one column per run (a missing row shows '-')."""
    columns = [dict(_rows(r)) for r in results]
    labels: list[str] = []
    for r in results:
        labels += [label for label, _ in _rows(r) if label not in labels]
    headers = ["metric", *(Path(r["run"]).name or r["run"] for r in results)]
    body = [[label, *(col.get(label, "-") for col in columns)] for label in labels]
    widths = [max(len(row[i]) for row in [headers, *body]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in body)])


def main(argv: Sequence[str] | None = None) -> None:
    kernels.cpu_fast_paths(True)  # opt in to the ops' CPU performance paths
    parser = argparse.ArgumentParser(
        prog="python -m clt.evaluate",
        description="Reconstruction and replacement-model metrics of trained run folders.",
    )
    parser.add_argument("run_dir", nargs="?", help="run folder (config.json, step_*.pt)")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="evaluate several runs and print them side by side")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"held-out non-BOS tokens to evaluate on (default {DEFAULT_TOKENS})")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--graph-prompts", type=int, default=None, metavar="P",
                        help="held-out prompts for the graph scores, 0 = skip (default: the "
                        "run's eval.graph_prompts)")
    parser.add_argument("--graph-tokens", type=int, default=None, metavar="T",
                        help="tokens per graph prompt, BOS included (default: the run's "
                        "eval.graph_prompt_tokens)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also write the scored exported model (JumpReLU conversion of a "
                        "TopK/BatchTopK run) to DIR in circuit-tracer's format (one run only)")
    args = parser.parse_args(argv)
    runs = ([args.run_dir] if args.run_dir else []) + (args.compare or [])
    if args.export and len(runs) != 1:
        parser.error("--export takes one run")
    if not runs:
        parser.error("give a RUN_DIR or --compare RUN_DIR [RUN_DIR ...]")
    if args.tokens < 1:
        parser.error(f"--tokens must be >= 1, got {args.tokens}")
    if args.graph_prompts is not None and args.graph_prompts < 0:
        parser.error(f"--graph-prompts must be >= 0, got {args.graph_prompts}")
    if args.graph_tokens is not None and args.graph_tokens < 2:
        parser.error(f"--graph-tokens must be >= 2, got {args.graph_tokens}")
    results = []
    for run in runs:
        try:
            results.append(evaluate_run(run, n_tokens=args.tokens, device=args.device,
                                        graph_prompts=args.graph_prompts,
                                        graph_prompt_tokens=args.graph_tokens,
                                        export_dir=args.export))
        except (EvaluationError, ExportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    print(format_table(results))


if __name__ == "__main__":
    main()
