"""Attribution-graph pages: prune a graph as circuit-tracer does, write its JSON and one page.

    python -m clt.graph RUN_DIR --prompt "To be, or not to" OUT_DIR [--feature-pages DIR]

writes into OUT_DIR

- ``<slug>.json``: the pruned graph in circuit-tracer's frontend format (``metadata``,
  ``qParams``, ``nodes``, ``links``), and ``graph-metadata.json`` listing it, so circuit-tracer's
  local server shows it: ``serve(data_dir=OUT_DIR, features_dir=FEATURES/circuit-tracer)``;
- ``index.html``: one self-contained page (the same JSON inline, no network, no server): the
  prompt's tokens along the bottom, nodes by layer (rows) and position (columns), edges with
  width by weight and colour by sign; hover for values, click for a node's strongest inputs and
  outputs and, for a feature, the link to its feature page (``clt.features``).

The graph is :func:`clt.attribution.attribute` of the run **as exported**
(:func:`clt.pages.common.load_run_as_exported`: TopK/BatchTopK converted to JumpReLU).

**Pruning** (circuit-tracer's ``graph.py::prune_graph``, same definitions, computed in float64 on
the rows that have incoming edges; read at decoderesearch/circuit-tracer 4bb8c0e):

1. Node influence ``I = w N + w N^2 + ...`` (``N``: ``|A|`` with rows normalized to sum 1,
   ``w``: the logit probabilities), as in the graph scores. Keep the nodes with the largest
   influence that together hold ``node_threshold`` (0.8) of the total (the smallest kept score
   is the first whose cumulative share reaches the threshold); tokens and logits always stay.
2. Zero the rows and columns of dropped nodes, renormalize, recompute the influence ``I'`` and
   give each edge the score ``N'[t, s] * (I'[t] + w[t])``; keep the edges with the largest
   scores holding ``edge_threshold`` (0.98) of the total.
3. Repeat until nothing changes: drop feature and error nodes without a kept outgoing edge and
   feature nodes without a kept incoming edge, and the edges of dropped nodes.

Every node's ``influence`` field is the cumulative share of influence of the nodes ranked at or
above it (circuit-tracer's ``cumulative_scores``). As in circuit-tracer's
``create_graph_files``, the written graph has the kept nodes that touch a kept edge plus every
token and logit node, and the kept edges (``source`` -> ``target`` node ids, raw weight
``A[target, source]``). One difference: an edge of weight zero is never written (circuit-tracer
keeps zero-weight entries only when ``edge_threshold`` is 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kernels

from .attribution import AttributionGraph, attribute, node_influence
from .pages.common import (
    PagesError,
    check_out_dir,
    encode_prompt,
    load_run_as_exported,
    run_cli,
    staged_output,
    token_strings,
)
from .pages.html import graph_page

NODE_THRESHOLD = 0.8
EDGE_THRESHOLD = 0.98
MARKER = ".clt-graph"
FEATURE_TYPE = "cross layer transcoder"


@dataclass
class Pruned:
    """Masks of one pruned graph: ``nodes [n_nodes]``, ``edges [n_rows, n_nodes]`` over the rows
    of ``graph.edges`` (target row, source column), ``cumulative [n_nodes]`` scores."""

    nodes: torch.Tensor
    edges: torch.Tensor
    cumulative: torch.Tensor


def find_threshold(scores: torch.Tensor, share: float, n_total: int | None = None) -> float:
    """Smallest score among the largest ones that hold ``share`` of ``scores.sum()``.

    ``n_total``: the length of the full score vector when ``scores`` leaves out entries known to
    be zero (a threshold past every nonzero entry is then 0).
    """
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype)))
    if n_total is not None and n_total > ordered.numel() and index >= ordered.numel():
        return 0.0
    return float(ordered[min(index, ordered.numel() - 1)])


def _influence(normalized: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor
               ) -> torch.Tensor:
    """``w N + w N^2 + ...`` over the row form (``normalized [n_rows, n_nodes]``, ``weights``
    on the rows)."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(10_000):
        mass = current[rows]
        if not mass.any():
            return total
        current = mass @ normalized
        total += current
    raise RuntimeError("influence did not vanish: the graph has a cycle")


def prune(graph: AttributionGraph, node_threshold: float = NODE_THRESHOLD,
          edge_threshold: float = EDGE_THRESHOLD) -> Pruned:
    """circuit-tracer's pruning of ``graph`` (module docstring)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    rows = graph.row_nodes()
    n_f, n_nodes = graph.n_features, graph.n_nodes
    fixed = graph.token_nodes.start  # tokens and logits from here on
    weights = torch.zeros(rows.shape[0], dtype=torch.float64)
    weights[n_f:] = graph.logit_probabilities.double()

    # one float64 [n_rows, n_nodes] matrix, transformed in place (|A|, pruned, normalized,
    # edge scores), plus one normalized copy for the node influence
    work = graph.edges.double().abs_()
    influence = node_influence(graph, work / work.sum(1, keepdim=True).clamp(min=1e-10))
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[fixed:] = True

    work[~node_mask[rows]] = 0
    work[:, ~node_mask] = 0
    work.div_(work.sum(1, keepdim=True).clamp(min=1e-10))
    pruned_influence = _influence(work, rows, weights)[rows] + weights
    scores = work.mul_(pruned_influence[:, None])
    # zero scores sort last and add nothing: the threshold comes from the positive ones
    threshold = find_threshold(scores[scores > 0], edge_threshold, n_nodes * n_nodes)
    edge_mask = scores >= threshold
    del work, scores
    edge_mask &= graph.edges != 0

    while True:
        before = node_mask.clone()
        edge_mask[~node_mask[rows]] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:fixed] &= edge_mask[:, :fixed].any(0)  # an outgoing edge
        node_mask[:n_f] &= edge_mask[:n_f].any(1)  # an incoming edge
        if torch.equal(node_mask, before):
            break
    edge_mask[~node_mask[rows]] = False
    edge_mask[:, ~node_mask] = False

    ordered, order = influence.sort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum()
    return Pruned(node_mask, edge_mask, cumulative)


# ---- circuit-tracer's frontend JSON --------------------------------------------------------


def cantor(x: int, y: int) -> int:
    """circuit-tracer's feature index of (layer, feature): the Cantor pairing."""
    return (x + y) * (x + y + 1) // 2 + y


def graph_json(graph: AttributionGraph, pruned: Pruned, token_text: list[str],
               logit_text: list[str], slug: str, scan: str, prompt: str,
               node_threshold: float = NODE_THRESHOLD) -> dict[str, Any]:
    """The pruned graph as circuit-tracer's frontend ``Model`` (``graph_models.py``)."""
    n_f, T, n_layers = graph.n_features, graph.n_pos, graph.n_layers
    err0, tok0, log0 = graph.errors.start, graph.token_nodes.start, graph.logit_nodes.start
    cumulative = pruned.cumulative.tolist()
    tokens = graph.tokens.tolist()
    nodes: dict[int, dict[str, Any]] = {}
    for i in pruned.nodes.nonzero().flatten().tolist():
        base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                "reverse_ctx_idx": 0, "clerp": "", "influence": cumulative[i],
                "activation": None}
        if i < n_f:
            layer, pos, feature = graph.features[i].tolist()
            node = {"node_id": f"{layer}_{feature}_{pos}", "feature": cantor(layer, feature),
                    "layer": str(layer), "ctx_idx": pos, "feature_type": FEATURE_TYPE,
                    "jsNodeId": f"{layer}_{feature}-0",
                    "activation": float(graph.activations[i])}
        elif i < tok0:
            layer, pos = divmod(i - err0, T)
            # feature index -1 in both ids: never equal to a feature node's
            node = {"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer),
                    "ctx_idx": pos, "feature_type": "mlp reconstruction error",
                    "jsNodeId": f"{layer}_-1-{pos}"}
        elif i < log0:
            pos = i - tok0
            node = {"node_id": f"E_{tokens[pos]}_{pos}", "feature": pos, "layer": "E",
                    "ctx_idx": pos, "feature_type": "embedding",
                    "jsNodeId": f"E_{tokens[pos]}-{pos}"}
        else:
            j = i - log0
            vocab = int(graph.logit_tokens[j])
            prob = float(graph.logit_probabilities[j])
            node = {"node_id": f"{n_layers + 1}_{vocab}_{T - 1}", "feature": vocab,
                    "layer": str(n_layers + 1), "ctx_idx": T - 1, "feature_type": "logit",
                    "jsNodeId": f"L_{vocab}-{T - 1}", "token_prob": prob,
                    "is_target_logit": j == 0,
                    "clerp": f'Output "{logit_text[j]}" (p={prob:.3f})', "influence": None}
        nodes[i] = {**base, **node}
    rows = graph.row_nodes()
    targets, sources = pruned.edges.nonzero(as_tuple=True)
    weights = graph.edges[targets, sources].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
             for t, s, w in zip(rows[targets].tolist(), sources.tolist(), weights, strict=True)
             if s in nodes and t in nodes]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values()
            if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": token_text,
                "prompt": prompt, "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
               "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


# ---- building and writing ------------------------------------------------------------------


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:40] or "graph"


def build_graph(run, tokens: torch.Tensor, node_threshold: float = NODE_THRESHOLD,
                edge_threshold: float = EDGE_THRESHOLD, batch_size: int | None = None,
                slug: str | None = None, prompt: str | None = None
                ) -> tuple[dict[str, Any], AttributionGraph, Pruned]:
    """(circuit-tracer JSON, unpruned graph, masks) of ``tokens [T]`` (BOS first) on an
    :class:`~clt.pages.common.ExportedRun`."""
    cfg = run.cfg
    if cfg.data.lm.output_hook != "hook_mlp_out":
        raise PagesError(f"attribution graphs need features that write hook_mlp_out (this run's "
                         f"output hook is {cfg.data.lm.output_hook!r})")
    graph = attribute(run.lm, run.model, tokens, run.layers, run.input_hook, run.output_hook,
                      batch_size or cfg.eval.graph_batch)
    pruned = prune(graph, node_threshold, edge_threshold)
    token_text = token_strings(run, graph.tokens.tolist())
    logit_text = token_strings(run, graph.logit_tokens.tolist())
    if prompt is None:
        prompt = "".join(token_text[1:])
    data = graph_json(graph, pruned, token_text, logit_text, slug or slugify(prompt),
                      str(run.run_dir.resolve()), prompt, node_threshold)
    data["clt"] = {"run": str(run.run_dir), "step": run.step, "layers": run.layers,
                   "n_layers": graph.n_layers, "trained": run.kind,
                   "nonlinearity": run.model.nonlinearity.kind, "thresholds": run.thresholds,
                   "edge_threshold": edge_threshold, "unpruned_features": graph.n_features}
    return data, graph, pruned


def write_graph_files(folder: Path, data: dict[str, Any], feature_pages: str | None) -> None:
    """``<slug>.json``, ``graph-metadata.json`` and ``index.html`` into ``folder``."""
    slug = data["metadata"]["slug"]
    (folder / f"{slug}.json").write_text(json.dumps(data))
    (folder / "graph-metadata.json").write_text(
        json.dumps({"graphs": [data["metadata"]]}, indent=1))
    (folder / "index.html").write_text(graph_page(data, feature_pages))


def write_graph(run_dir: str | Path, out_dir: str | Path, prompt: str,
                node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD,
                feature_pages: str | Path | None = None, overwrite: bool = False,
                device: str = "cpu", slug: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """The command: build, prune and write the graph of ``prompt``; returns the JSON."""
    for name, value in (("node threshold", node_threshold), ("edge threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise PagesError(f"the {name} must be in [0, 1], got {value}")
    if not prompt.strip():
        raise PagesError("the prompt is empty")
    out = check_out_dir(out_dir, MARKER, overwrite)
    run = load_run_as_exported(run_dir, device, log)
    tokens = encode_prompt(run, prompt)
    data, graph, _ = build_graph(run, tokens, node_threshold, edge_threshold, slug=slug,
                                 prompt=prompt)
    link = None
    if feature_pages is not None:
        link = Path(os.path.relpath(Path(feature_pages).resolve(), out)).as_posix() + "/"
    with staged_output(out, MARKER, {"command": "clt.graph", "run": str(run_dir),
                                     "prompt": prompt}) as tmp:
        write_graph_files(tmp, data, link)
    log(f"graph of {len(tokens)} tokens: {graph.n_features} active features, "
        f"{len(data['nodes'])} nodes and {len(data['links'])} edges after pruning "
        f"(node threshold {node_threshold}, edge threshold {edge_threshold}) -> {out}")
    return data


def main(argv: Sequence[str] | None = None) -> None:
    kernels.cpu_fast_paths(True)  # opt in to the ops' CPU performance paths
    parser = argparse.ArgumentParser(
        prog="python -m clt.graph",
        description="Attribution graph of a prompt on a run's transcoder (as exported), pruned "
                    "as circuit-tracer does: circuit-tracer's graph JSON and a self-contained "
                    "HTML page.")
    parser.add_argument("run_dir", help="run folder (config.json, step_*)")
    parser.add_argument("out_dir", help="folder to write (absent or empty)")
    parser.add_argument("--prompt", required=True, help="the prompt (BOS is prepended)")
    parser.add_argument("--node-threshold", type=float, default=NODE_THRESHOLD,
                        help=f"share of node influence kept (default {NODE_THRESHOLD})")
    parser.add_argument("--edge-threshold", type=float, default=EDGE_THRESHOLD,
                        help=f"share of edge influence kept (default {EDGE_THRESHOLD})")
    parser.add_argument("--feature-pages", default=None, metavar="DIR",
                        help="output folder of python -m clt.features: feature nodes link to "
                             "their pages there")
    parser.add_argument("--slug", default=None, help="graph name (default: from the prompt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it holds a previous output of this command")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    run_cli(lambda: write_graph(args.run_dir, args.out_dir, args.prompt, args.node_threshold,
                                args.edge_threshold, args.feature_pages, args.overwrite,
                                args.device, args.slug))


if __name__ == "__main__":
    main()
