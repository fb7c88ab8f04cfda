"""Pages to look at a trained transcoder: an attribution graph and feature pages.

    python -m clt.graph RUN_DIR --prompt "..." OUT_DIR     # clt/graph.py
    python -m clt.features RUN_DIR OUT_DIR                 # clt/features.py

:func:`write_run_pages` writes both into ``RUN_DIR/pages/`` at the end of training
(``eval.pages: true``): the graph of the first held-out sequence cut to
``eval.graph_prompt_tokens`` tokens, and the feature pages of every feature; with wandb on, the
folder is logged as an artifact and the feature index as an HTML panel.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import check_out_dir, load_run_as_exported, staged_output
from .html import run_index_page

PAGES_MARKER = ".clt-pages"


def write_run_pages(run_dir: str | Path, cfg: Any = None, device: str = "cpu",
                    log: Callable[[str], None] = print, wandb_run: Any = None,
                    n_tokens: int | None = None) -> Path:
    """Write ``run_dir/pages/`` (``index.html``, ``graph/``, ``features/``), replacing a
    previous one; returns the folder. ``cfg`` is accepted for the caller's convenience (the
    run folder's own ``config.json`` is what is read). ``wandb_run``: a wandb run to log the
    pages to (default: the active one, if any)."""
    # deferred: clt.features and clt.graph import clt.pages.common, which runs this package's
    # __init__ first (cycle)
    from ..features import DEFAULT_TOKENS, build_features
    from ..graph import build_graph, write_graph_files

    start = time.perf_counter()
    run_dir = Path(run_dir)
    out = check_out_dir(run_dir / "pages", PAGES_MARKER, overwrite=True, inside_run=True)
    run = load_run_as_exported(run_dir, device, log)
    data = None
    if run.output_hook == "hook_mlp_out":  # an SAE's features do not write the MLP outputs
        prompt_len = min(run.cfg.eval.graph_prompt_tokens, run.cfg.data.lm.seq_len)
        data, _, _ = build_graph(run, next(iter(run.heldout(1)))[0, :prompt_len])
    with staged_output(out, PAGES_MARKER, {"command": "clt.pages", "run": str(run_dir)}) as tmp:
        if data is not None:
            (tmp / "graph").mkdir()
            write_graph_files(tmp / "graph", data, "../features/")
        (tmp / "features").mkdir()
        summary = build_features(run, tmp / "features", n_tokens or DEFAULT_TOKENS,
                                 progress=False)
        (tmp / "index.html").write_text(run_index_page(str(run_dir), data, summary))
    graph = "no graph (features write " + run.output_hook + ")" if data is None else \
        f"graph: {len(data['nodes'])} nodes, {len(data['links'])} edges"
    log(f"pages: {out / 'index.html'} ({graph}; {summary['scanned']} features on "
        f"{summary['tokens']} tokens) in {time.perf_counter() - start:.0f} s")
    _log_to_wandb(out, wandb_run)
    return out


def _log_to_wandb(out: Path, wandb_run: Any) -> None:
    """The pages folder as an artifact and the feature index (data inline) as an HTML panel."""
    if wandb_run is None:
        wandb = sys.modules.get("wandb")
        wandb_run = getattr(wandb, "run", None) if wandb is not None else None
    if wandb_run is None:
        return
    # deferred: wandb takes ~1 s to import and only a run with wandb on needs it
    import wandb

    index = (out / "features" / "index.html").read_text()
    data = (out / "features" / "index-data.js").read_text()
    standalone = index.replace('<script src="index-data.js"></script>',
                               f"<script>{data}</script>")
    wandb_run.log({"pages/features": wandb.Html(standalone, inject=False)})
    artifact = wandb.Artifact(f"pages-{out.parent.name}", type="html")
    artifact.add_dir(str(out))
    wandb_run.log_artifact(artifact)
