"""Feature pages: one streaming scan of held-out text, a page per feature and a sortable index.

    python -m clt.features RUN_DIR OUT_DIR [--tokens N] [--features 3:17,5:0-99] [--top K]

writes into OUT_DIR

- ``index.html`` (+ ``index-data.js``): every scanned feature, sortable and filterable by layer,
  firing density, max activation and crosslayer spread, paged so that hundreds of thousands of
  rows stay fast; each row links to
- ``feature.html?layer=L&feature=F``: one page per feature (data in ``data/l{L}/b{F//256}.js``,
  loaded with a script tag, so the pages work from ``file://`` with no server): firing density
  and a histogram of its nonzero activations, the top activating contexts with per-token
  shading, the decoder norm per target layer (what makes a CLT feature crosslayer), and the top
  and bottom output logits of its decoder through the unembedding;
- ``circuit-tracer/``: the feature files circuit-tracer's viewer reads for a local transcoder
  (``serve(..., features_dir=OUT_DIR/circuit-tracer)``): ``index.json.gz`` holds, per LM layer
  ``l``, ``{"filename": "layer_{l}.bin", "offsets": [F + 1 byte offsets]}``; in the ``.bin`` each
  feature is a 4-byte little-endian length then that many bytes of zlib-compressed JSON of
  circuit-tracer's feature ``Model`` (``frontend/feature_models.py``: ``examples_quantiles``,
  ``top_logits``, ``bottom_logits``, ``act_min``, ``act_max``, ``quantile_values``,
  ``histogram``, ``activation_frequency``); the viewer fetches a byte range per feature and
  names features by ``cantor(layer, feature)``, as the graph JSON does. A feature left out by
  ``--features`` has an empty record.

**Definitions.** Features are the run's **as exported** (:mod:`clt.pages.common`: JumpReLU after
conversion), read on raw activations: ``a = pre * (pre > theta)`` with the folded weights. The
scan reads the first ``ceil(tokens / (T - 1))`` held-out sequences; BOS positions never have
features and are not counted. Density: firing tokens / scanned non-BOS tokens. Top contexts:
the ``top`` largest activations of the feature (ties: any order), each with the activations of
the feature on ``BEFORE`` tokens before and ``AFTER`` after it in the same sequence.
Histogram: ``BINS`` equal bins over ``[0, act_max]`` of the nonzero activations; percentiles
(``quantile_values``) are read from it (exact to one bin). Decoder norm per target layer: the
raw-scale ``||W_dec[f, t]||``; **crosslayer spread**: the share of the squared decoder norm that
goes beyond the feature's own layer, ``1 - ||W_dec[f, s]||^2 / sum_t ||W_dec[f, t]||^2`` (0 for
a per-layer transcoder). Output logits: ``(sum_t W_dec[f, t]) @ W_U``, the direct path, the final
norm ignored.

**Memory** is bounded by the dictionary, not the text: per selected feature ``top`` values,
token ids and ``(BEFORE + 1 + AFTER)`` float16 window activations, plus a ``BINS``-bin int32
histogram (about 0.6 KB per feature at the defaults: ~300 MB for 500k features); one chunk's
dense activations ``[chunk tokens, F]`` of one layer at a time (``CHUNK_ELEMENTS``); the
scanned token ids (4 bytes per token). The histogram range grows by doubling: bins cover
``[0, 2^e)`` with ``2^e`` above the largest value so far, and pairs of bins merge when a larger
value arrives, so one pass suffices.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import kernels

from .pages.common import (
    ExportedRun,
    PagesError,
    check_out_dir,
    load_run_as_exported,
    run_cli,
    staged_output,
    token_strings,
)
from .pages.html import feature_index_page, feature_page

DEFAULT_TOKENS = 16384
TOP = 12
BEFORE, AFTER = 12, 4
BINS = 64
BLOCK = 256  # features per data file of the pages
N_LOGITS = 10
CHUNK_ELEMENTS = 1 << 24  # dense activations of one layer and chunk (64 MB in float32)
MARKER = ".clt-features"


# ---- the scan ------------------------------------------------------------------------------


@dataclass
class LayerScan:
    """Running statistics of the selected features ``ids [n]`` of one transcoder layer."""

    ids: torch.Tensor  # [n] feature indices
    counts: torch.Tensor  # [n] int64 firing tokens
    hi: torch.Tensor  # [n] float64 histogram range 2^e (0 before the first firing)
    hist: torch.Tensor  # [n, BINS] int32
    top_values: torch.Tensor  # [top, n] float32, descending (-inf: empty slot)
    top_rows: torch.Tensor  # [top, n] int64 token row = sequence * T + position
    windows: torch.Tensor  # [top, n, W] float16, NaN outside the sequence


@dataclass
class Scan:
    layers: list[LayerScan]
    tokens: torch.Tensor  # [n_seq, T] int32: the scanned sequences
    n_tokens: int  # non-BOS tokens scanned
    before: int
    after: int


def _grow_histograms(scan: LayerScan, chunk_max: torch.Tensor) -> None:
    """Widen the ranges of the features whose ``chunk_max [n]`` reached their ``hi``."""
    need = (chunk_max >= scan.hi) & (chunk_max > 0)
    if not need.any():
        return
    idx = need.nonzero().flatten()
    _, exponent = torch.frexp(chunk_max[idx].double())  # 2^e > value
    new_hi = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent)
    old = scan.hi[idx]
    bins = scan.hist.shape[1]
    fired = old > 0
    shift = torch.zeros_like(exponent)
    shift[fired] = (new_hi[fired] / old[fired]).log2().round().long().to(shift.dtype)
    for g in shift[fired].unique().tolist():
        rows = idx[fired & (shift == g)]
        merged = torch.zeros(len(rows), bins, dtype=scan.hist.dtype)
        if g >= int(math.log2(bins)):
            merged[:, 0] = scan.hist[rows].sum(1)
        else:
            merged[:, : bins >> g] = scan.hist[rows].view(len(rows), bins >> g, 1 << g).sum(-1)
        scan.hist[rows] = merged
    scan.hi[idx] = new_hi


def _update(scan: LayerScan, acts: torch.Tensor, first_row: int, T: int, before: int,
            after: int) -> None:
    """Fold one chunk ``acts [B * T, n]`` (rows ``first_row ..``, BOS rows zero) into ``scan``."""
    n_rows, n = acts.shape
    fired = acts > 0
    scan.counts += fired.sum(0)
    # histogram of the nonzero values
    _grow_histograms(scan, acts.max(0).values)
    r, c = fired.nonzero(as_tuple=True)
    if r.numel():
        bins = scan.hist.shape[1]
        where = (acts[r, c].double() / scan.hi[c] * bins).long().clamp_(max=bins - 1)
        flat = scan.hist.view(-1)
        flat.index_add_(0, c * bins + where, torch.ones_like(where, dtype=flat.dtype))
    # top activations: this chunk's best, merged with the running ones
    k = min(scan.top_values.shape[0], n_rows)
    values, rows = acts.topk(k, dim=0)  # [k, n]
    B = n_rows // T
    seq, pos = rows // T, rows % T
    offsets = torch.arange(-before, after + 1)
    at = pos[..., None] + offsets  # [k, n, W]
    inside = (at >= 0) & (at < T)
    cols = torch.arange(n)[None, :, None].expand_as(at)
    windows = acts.view(B, T, n)[seq[..., None].expand_as(at), at.clamp(0, T - 1), cols]
    windows = windows.masked_fill(~inside, math.nan).half()
    all_values = torch.cat([scan.top_values, values])
    best, order = all_values.topk(scan.top_values.shape[0], dim=0)
    scan.top_values = best
    scan.top_rows = torch.cat([scan.top_rows, rows + first_row]).gather(0, order)
    all_windows = torch.cat([scan.windows, windows])
    scan.windows = all_windows.gather(0, order[..., None].expand(-1, -1, all_windows.shape[2]))


def folded_weights(run: ExportedRun) -> dict[str, Any]:
    """Raw-scale weights of the exported model (float32): ``W_enc [L, d_in, F]``, ``b_enc``,
    ``theta [L, F]`` (None for ReLU) and per source the decoder block ``[F, R_s, d_out]``."""
    model = run.model.folded_copy()
    theta = None
    if model.nonlinearity.exports_as == "jump_relu":
        theta = model.log_threshold.detach().float().exp()
    return {"W_enc": model.W_enc.detach().float(), "b_enc": model.b_enc.detach().float(),
            "theta": theta,
            "W_dec": [model.decoder_view(s).detach().float() for s in range(model.n_layers)]}


@torch.no_grad()
def scan_features(run: ExportedRun, selection: list[torch.Tensor], n_tokens: int,
                  top: int = TOP, before: int = BEFORE, after: int = AFTER, bins: int = BINS,
                  progress: bool = True) -> Scan:
    """Stream the first ``ceil(n_tokens / (T - 1))`` held-out sequences once through the LM and
    the exported transcoder; ``selection[i]``: feature ids of transcoder layer ``i``."""
    # deferred: clt.data.lm imports transformer_lens (seconds), which `--help` and argument
    # errors should not wait for
    from .data.lm import lm_activations

    if bins < 1 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two, got {bins}")
    weights = folded_weights(run)
    T = run.cfg.data.lm.seq_len
    n_seq = math.ceil(n_tokens / (T - 1))
    widest = max(1, max(len(s) for s in selection))
    # the run's LM batch, fewer sequences if one layer's dense activations would pass the cap
    batch = max(1, min(n_seq, run.cfg.data.lm.lm_batch_size, CHUNK_ELEMENTS // (T * widest)))
    W = before + 1 + after
    scans = [LayerScan(ids, torch.zeros(len(ids), dtype=torch.int64),
                       torch.zeros(len(ids), dtype=torch.float64),
                       torch.zeros(len(ids), bins, dtype=torch.int32),
                       torch.full((top, len(ids)), -math.inf),
                       torch.zeros(top, len(ids), dtype=torch.int64),
                       torch.full((top, len(ids), W), math.nan, dtype=torch.float16))
             for ids in selection]
    W_enc = [weights["W_enc"][i][:, ids].contiguous() for i, ids in enumerate(selection)]
    b_enc = [weights["b_enc"][i][ids] for i, ids in enumerate(selection)]
    theta = None if weights["theta"] is None else [weights["theta"][i][ids]
                                                   for i, ids in enumerate(selection)]
    device = run.model.W_enc.device
    tokens, done = [], 0
    bar = tqdm(total=n_seq * (T - 1), unit="tok", desc="scanning features", disable=not progress)
    for chunk in run.heldout(batch):
        chunk = chunk[: n_seq - done]
        B = chunk.shape[0]
        x, _ = lm_activations(run.lm, chunk, run.layers, run.input_hook, run.output_hook)
        for i, scan in enumerate(scans):
            if not len(scan.ids):
                continue
            xi = x[i].reshape(B * T, -1).to(device, torch.float32)
            pre = torch.addmm(b_enc[i], xi, W_enc[i])  # [B * T, n]
            acts = torch.relu(pre) if theta is None else pre * (pre > theta[i])
            acts.view(B, T, -1)[:, 0] = 0  # BOS: no features
            _update(scan, acts.cpu(), done * T, T, before, after)
        tokens.append(chunk.to(torch.int32))
        done += B
        bar.update(B * (T - 1))
        if done >= n_seq:
            break
    bar.close()
    if not done:
        raise PagesError("the held-out split is empty")
    return Scan(scans, torch.cat(tokens), done * (T - 1), before, after)


# ---- per-feature records -------------------------------------------------------------------


def _percentiles(hist: list[int], width: float) -> list[float]:
    """Values at 1..100 % of the histogram's mass, linear inside a bin."""
    total = sum(hist)
    out, cumulative, b = [], 0, 0
    for q in range(1, 101):
        target = total * q / 100
        while b < len(hist) - 1 and cumulative + hist[b] < target:
            cumulative += hist[b]
            b += 1
        inside = (target - cumulative) / hist[b] if hist[b] else 1.0
        out.append((b + min(max(inside, 0.0), 1.0)) * width)
    return out


def _logits(run: ExportedRun, blocks: list[torch.Tensor], i: int, ids: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top values, top ids, bottom values, bottom ids) ``[n, N_LOGITS]`` of the decoder's total
    write of features ``ids`` of layer ``i`` through ``W_U``, 512 features at a time."""
    W_U = run.lm.W_U.detach().float().cpu()
    k = min(N_LOGITS, W_U.shape[1])
    write = blocks[i][ids].sum(1)  # [n, d_out]
    parts = [[], [], [], []]
    for start in range(0, len(ids), 512):
        logits = write[start : start + 512] @ W_U
        hi, hi_ids = logits.topk(k, dim=1)
        lo, lo_ids = logits.topk(k, dim=1, largest=False)
        for part, t in zip(parts, (hi, hi_ids, lo, lo_ids), strict=True):
            part.append(t)
    return tuple(torch.cat(p) if p else torch.zeros(0, k) for p in parts)


class _Strings:
    """Token id -> display string, decoded once per id."""

    def __init__(self, run: ExportedRun) -> None:
        self.run, self.cache = run, {}

    def __call__(self, ids: list[int]) -> list[str]:
        missing = [i for i in dict.fromkeys(ids) if i not in self.cache]
        if missing:
            self.cache.update(zip(missing, token_strings(self.run, missing), strict=True))
        return [self.cache[i] for i in ids]


def feature_records(run: ExportedRun, scan: Scan, progress: bool = True
                    ) -> list[list[dict[str, Any]]]:
    """Per transcoder layer, the record of each selected feature (the pages' data)."""
    blocks = folded_weights(run)["W_dec"]
    T = scan.tokens.shape[1]
    flat_tokens = scan.tokens.flatten().tolist()
    strings = _Strings(run)
    bins = scan.layers[0].hist.shape[1] if scan.layers else BINS
    out = []
    total = sum(len(s.ids) for s in scan.layers)
    bar = tqdm(total=total, unit="feature", desc="writing features", disable=not progress)
    for i, layer_scan in enumerate(scan.layers):
        lm_layer = run.layers[i]
        ids = layer_scan.ids
        norms = blocks[i][ids].norm(dim=-1) if len(ids) else torch.zeros(0, 1)  # [n, R_s]
        targets = run.layers[i : i + blocks[i].shape[1]]
        hi_v, hi_i, lo_v, lo_i = (t.tolist() for t in _logits(run, blocks, i, ids))
        # one conversion per layer: per-feature tensor indexing costs more than the work
        top_values = layer_scan.top_values.T.tolist()  # [n][top]
        top_rows = layer_scan.top_rows.T.tolist()
        windows = layer_scan.windows.permute(1, 0, 2).float().numpy()  # [n, top, W]
        counts, his = layer_scan.counts.tolist(), layer_scan.hi.tolist()
        hists, norm_rows = layer_scan.hist.tolist(), norms.tolist()
        records = []
        for j, f in enumerate(ids.tolist()):
            count = counts[j]
            contexts = []
            for slot, value in enumerate(top_values[j]):
                if not value > 0:
                    break
                seq, pos = divmod(top_rows[j][slot], T)
                window = windows[j, slot]
                keep = ~np.isnan(window)  # a contiguous run: NaN only past the sequence ends
                offset, n_keep = int(keep.argmax()), int(keep.sum())
                first = pos - scan.before + offset
                acts = np.round(window[offset : offset + n_keep], 5).tolist()
                token_ids = flat_tokens[seq * T + first : seq * T + first + n_keep]
                contexts.append({"seq": seq, "pos": pos, "act": value, "start": first,
                                 "tokens": strings(token_ids), "acts": acts})
            max_act = contexts[0]["act"] if contexts else 0.0
            hist = hists[j]
            width = his[j] / bins
            used = min(bins, math.floor(max_act / width) + 1) if count and width else 0
            n2 = [v * v for v in norm_rows[j]]
            spread = 1 - n2[0] / sum(n2) if sum(n2) > 0 else 0.0
            records.append({
                "layer": lm_layer, "feature": f, "count": count, "tokens": scan.n_tokens,
                "density": count / scan.n_tokens, "max": max_act,
                "hist": hist[:used], "hist_width": width,
                "quantiles": _percentiles(hist[:used], width) if used else [],
                "decoder": {"layers": targets, "norms": [round(v, 6) for v in norm_rows[j]]},
                "spread": spread,
                "top_logits": list(zip(strings(hi_i[j]), [round(v, 4) for v in hi_v[j]],
                                       strict=True)),
                "bottom_logits": list(zip(strings(lo_i[j]), [round(v, 4) for v in lo_v[j]],
                                          strict=True)),
                "contexts": contexts,
            })
            bar.update(1)
        out.append(records)
    bar.close()
    return out


# ---- circuit-tracer's feature files --------------------------------------------------------


def circuit_tracer_feature(record: dict[str, Any], transcoder_id: str) -> dict[str, Any]:
    """One record as circuit-tracer's feature ``Model`` (``frontend/feature_models.py``)."""
    examples = [{"tokens_acts_list": c["acts"], "train_token_ind": c["pos"] - c["start"],
                 "is_repeated_datapoint": False, "tokens": c["tokens"]}
                for c in record["contexts"]]
    n_bins = len(record["hist"])
    return {
        "transcoder_id": transcoder_id,
        "index": record["feature"],
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}],
        "top_logits": [t for t, _ in record["top_logits"]],
        "bottom_logits": [t for t, _ in record["bottom_logits"]],
        "act_min": 0.0,
        "act_max": n_bins * record["hist_width"] if n_bins else 0.0,
        "quantile_values": record["quantiles"],
        "histogram": [float(c) for c in record["hist"]],
        "activation_frequency": record["density"],
    }


def write_circuit_tracer_features(folder: Path, run: ExportedRun,
                                  records: list[list[dict[str, Any]]]) -> None:
    """``index.json.gz`` and ``layer_{l}.bin`` (module docstring) into ``folder``."""
    folder.mkdir()
    n_features = run.model.n_features
    index: list[dict[str, Any] | None] = [None] * (max(run.layers) + 1)
    for i, layer_records in enumerate(records):
        lm_layer = run.layers[i]
        by_feature = {r["feature"]: r for r in layer_records}
        name = f"layer_{lm_layer}.bin"
        offsets = [0]
        with open(folder / name, "wb") as fh:
            for f in range(n_features):
                record = by_feature.get(f)
                if record is not None:
                    model = circuit_tracer_feature(record, f"{run.run_dir.name}/layer_{lm_layer}")
                    blob = zlib.compress(json.dumps(model).encode())
                    fh.write(struct.pack("<I", len(blob)) + blob)
                    offsets.append(offsets[-1] + 4 + len(blob))
                else:
                    offsets.append(offsets[-1])
        index[lm_layer] = {"filename": name, "offsets": offsets}
    with gzip.open(folder / "index.json.gz", "wt") as fh:
        json.dump(index, fh)


# ---- writing the pages ---------------------------------------------------------------------


def _js(name: str, value: Any) -> str:
    """A script that hands ``value`` to ``window[name]`` (``</`` escaped for inline safety)."""
    text = json.dumps(value, separators=(",", ":")).replace("</", "<\\/")
    return f"window.{name}({text});\n"


def write_feature_files(folder: Path, run: ExportedRun, scan: Scan,
                        records: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Pages, data files and circuit-tracer's files into ``folder``; returns the summary."""
    data = folder / "data"
    rows = []
    for layer_records in records:
        if not layer_records:
            continue
        layer = layer_records[0]["layer"]
        (data / f"l{layer}").mkdir(parents=True)
        blocks: dict[int, list[dict[str, Any]]] = {}
        for r in layer_records:
            blocks.setdefault(r["feature"] // BLOCK, []).append(r)
            top = r["contexts"][0] if r["contexts"] else None
            label = "".join(top["tokens"][top["pos"] - top["start"] :][:1]) if top else ""
            rows.append([r["layer"], r["feature"], r["density"], r["max"], r["spread"], label])
        for b, block in blocks.items():
            (data / f"l{layer}" / f"b{b}.js").write_text(_js("registerFeatures", block))
    summary = {"run": str(run.run_dir), "step": run.step, "layers": run.layers,
               "n_features": run.model.n_features, "trained": run.kind,
               "nonlinearity": run.model.nonlinearity.kind, "thresholds": run.thresholds,
               "tokens": scan.n_tokens, "sequences": int(scan.tokens.shape[0]),
               "block": BLOCK, "scanned": len(rows)}
    (folder / "index-data.js").write_text(_js("registerIndex", {"summary": summary,
                                                                "rows": rows}))
    (folder / "index.html").write_text(feature_index_page(summary))
    (folder / "feature.html").write_text(feature_page(summary))
    write_circuit_tracer_features(folder / "circuit-tracer", run, records)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def parse_selection(spec: str | None, n_layers: int, n_features: int, layers: list[int]
                    ) -> list[torch.Tensor]:
    """``--features``: comma-separated ``LAYER:IDS`` with IDS ``a``, ``a-b`` or ``*``
    (``LAYER``: an LM layer of the run); None: every feature."""
    if spec is None:
        return [torch.arange(n_features) for _ in range(n_layers)]
    chosen: list[set[int]] = [set() for _ in range(n_layers)]
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\*|\d+(?:\s*-\s*\d+)?)\s*", part)
        if not m:
            raise PagesError(f"bad --features entry {part!r}: use LAYER:ID, LAYER:A-B or "
                             f"LAYER:*, comma-separated")
        layer = int(m.group(1))
        if layer not in layers:
            raise PagesError(f"--features: layer {layer} is not a trained layer {layers}")
        ids = m.group(2).replace(" ", "")
        if ids == "*":
            lo, hi = 0, n_features - 1
        elif "-" in ids:
            lo, hi = (int(v) for v in ids.split("-"))
        else:
            lo = hi = int(ids)
        if not 0 <= lo <= hi < n_features:
            raise PagesError(f"--features: ids {ids} out of range 0..{n_features - 1} (or "
                             f"reversed)")
        chosen[layers.index(layer)].update(range(lo, hi + 1))
    return [torch.tensor(sorted(c), dtype=torch.int64) for c in chosen]


def build_features(run: ExportedRun, folder: Path, n_tokens: int = DEFAULT_TOKENS,
                   selection: str | None = None, top: int = TOP,
                   progress: bool = True) -> dict[str, Any]:
    """Scan and write the feature pages of an exported run into (an existing) ``folder``."""
    chosen = parse_selection(selection, run.model.n_layers, run.model.n_features, run.layers)
    scan = scan_features(run, chosen, n_tokens, top=top, progress=progress)
    records = feature_records(run, scan, progress)
    return write_feature_files(folder, run, scan, records)


def write_features(run_dir: str | Path, out_dir: str | Path, n_tokens: int = DEFAULT_TOKENS,
                   selection: str | None = None, top: int = TOP, overwrite: bool = False,
                   device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """The command (module docstring); returns the summary."""
    if n_tokens < 1:
        raise PagesError(f"--tokens must be >= 1, got {n_tokens}")
    if top < 1:
        raise PagesError(f"--top must be >= 1, got {top}")
    out = check_out_dir(out_dir, MARKER, overwrite)

    def check(cfg, model) -> None:
        layers = cfg.resolved_layers or list(range(model.n_layers))
        parse_selection(selection, model.n_layers, model.n_features, layers)

    run = load_run_as_exported(run_dir, device, log, check)
    with staged_output(out, MARKER, {"command": "clt.features", "run": str(run_dir)}) as tmp:
        summary = build_features(run, tmp, n_tokens, selection, top)
    log(f"{summary['scanned']} features over {summary['tokens']} held-out tokens -> "
        f"{out / 'index.html'}")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    kernels.cpu_fast_paths(True)  # opt in to the ops' CPU performance paths
    parser = argparse.ArgumentParser(
        prog="python -m clt.features",
        description="Feature pages of a run's transcoder (as exported): density, histogram, top "
                    "contexts, decoder norms per target layer, output logits; an index page; "
                    "circuit-tracer's feature files.")
    parser.add_argument("run_dir", help="run folder (config.json, step_*)")
    parser.add_argument("out_dir", help="folder to write (absent or empty)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"held-out tokens to scan (default {DEFAULT_TOKENS})")
    parser.add_argument("--features", default=None, metavar="SPEC",
                        help="only these features: LAYER:ID, LAYER:A-B or LAYER:*, "
                             "comma-separated (LAYER: an LM layer), e.g. '3:17,5:0-99'")
    parser.add_argument("--top", type=int, default=TOP,
                        help=f"top activating contexts per feature (default {TOP})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it holds a previous output of this command")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    run_cli(lambda: write_features(args.run_dir, args.out_dir, args.tokens, args.features,
                                   args.top, args.overwrite, args.device))


if __name__ == "__main__":
    main()
