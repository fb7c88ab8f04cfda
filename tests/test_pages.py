"""Graph and feature pages of a tiny run, rendered in a real headless Chromium.

The pruning is checked against a dense reference written here from circuit-tracer's
definitions, the graph JSON against pydantic models mirroring circuit-tracer's frontend
(``frontend/graph_models.py``, ``frontend/feature_models.py``), the feature scan against a
brute-force float64 scan of the same held-out tokens, and the pages through their DOM.
"""

import gzip
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from _browser import browser_page  # noqa: F401  (fixture)
from _testing import TINY_LM, write_run_config
from pydantic import BaseModel

import train
from clt import features as feat
from clt.config import EvalConfig
from clt.data.lm import lm_activations
from clt.features import main as features_main
from clt.graph import build_graph, cantor, prune
from clt.graph import main as graph_main
from clt.pages import write_run_pages
from clt.pages.common import encode_prompt, load_run_as_exported

PROMPT = "To be, or not"
TOKENS = 256  # held-out tokens scanned: 16 sequences of 16 non-BOS tokens
TOP = 6


@pytest.fixture(scope="module", autouse=True)
def torch_ops():
    """The pages are under test, not the kernels: the fast torch paths, for the module-scoped
    fixtures too (the run, its conversion, the commands)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLT_FORCE_TORCH", "1")
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pages")
    path, run = write_run_config(
        tmp, "topk", "lm", name="tiny", model={"n_features": 32}, nonlinearity={"k": 4},
        data={"lm": {**TINY_LM, "producer_thread": False}}, train={"steps": 4},
        eval={"every": 4, "tokens": 64, "replacement_tokens": 0},
        checkpoint={"every": 4, "keep_last": 1})
    train.main([str(path)])
    return run


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run_as_exported(run_dir, log=lambda s: None)


@pytest.fixture(scope="module")
def outputs(run_dir, tmp_path_factory):
    """The two commands' outputs; the scan runs in chunks of 3 sequences (merging top-k)."""
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feat, "CHUNK_ELEMENTS", 17 * 32 * 3)
        features_main([str(run_dir), str(out / "features"), "--tokens", str(TOKENS),
                       "--top", str(TOP)])
    graph_main([str(run_dir), str(out / "graph"), "--prompt", PROMPT,
                "--feature-pages", str(out / "features")])
    return out


# ---- circuit-tracer's formats, as pydantic models written from its frontend ----------------


class Metadata(BaseModel):
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1


class QParams(BaseModel):
    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class Node(BaseModel):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None


class Link(BaseModel):
    source: str
    target: str
    weight: float


class GraphModel(BaseModel):
    metadata: Metadata
    qParams: QParams
    nodes: list[Node]
    links: list[Link]


class Example(BaseModel):
    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool
    tokens: list[str]


class ExamplesQuantile(BaseModel):
    quantile_name: str
    examples: list[Example]


class FeatureModel(BaseModel):
    transcoder_id: str
    index: int
    examples_quantiles: list[ExamplesQuantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


# ---- references ----------------------------------------------------------------------------


def _reference_prune(A, n_f, n_tok, probs, node_t, edge_t):
    """circuit-tracer's ``prune_graph`` on the dense adjacency ``A [n, n]`` (target rows),
    float64; returns (node mask, edge mask)."""
    n_logits = probs.shape[0]
    fixed = n_tok + n_logits

    def normalize(M):
        M = M.abs()
        return M / M.sum(1, keepdim=True).clamp(min=1e-10)

    def influence(M, w):
        current = w @ M
        total = current.clone()
        while current.any():
            current = current @ M
            total += current
        return total

    def threshold(scores, share):
        ordered = scores.flatten().sort(descending=True).values
        cumulative = ordered.cumsum(0) / ordered.sum()
        i = min(int(torch.searchsorted(cumulative, share)), ordered.numel() - 1)
        return ordered[i]

    w = torch.zeros(A.shape[0], dtype=torch.float64)
    w[-n_logits:] = probs
    score = influence(normalize(A), w)
    node = score >= threshold(score, node_t)
    node[-fixed:] = True
    P = A.clone()
    P[~node] = 0
    P[:, ~node] = 0
    NP = normalize(P)
    edge_scores = NP * (influence(NP, w) + w)[:, None]
    edge = edge_scores >= threshold(edge_scores, edge_t)
    old = node.clone()
    node[:-fixed] &= edge[:, :-fixed].any(0)
    node[:n_f] &= edge[:n_f].any(1)
    while not torch.equal(node, old):
        old = node.clone()
        edge[~node] = False
        edge[:, ~node] = False
        node[:-fixed] &= edge[:, :-fixed].any(0)
        node[:n_f] &= edge[:n_f].any(1)
    return node, edge


def _reference_counts(graph, node, edge):
    """Nodes and edges circuit-tracer's ``create_graph_files`` writes for these masks."""
    dst, src = edge.nonzero(as_tuple=True)
    kept = [(int(s), int(d)) for s, d in zip(src, dst, strict=True) if node[s] and node[d]]
    linked = {i for pair in kept for i in pair}
    always = set(range(graph.token_nodes.start, graph.n_nodes))
    nodes = {int(i) for i in node.nonzero().flatten() if int(i) in linked or int(i) in always}
    return nodes, kept


def _brute_force(run, n_tokens):
    """float64 activations ``[L, S, T, F]`` of the exported features on the first held-out
    sequences (BOS zeroed), and those sequences."""
    T = run.cfg.data.lm.seq_len
    n_seq = math.ceil(n_tokens / (T - 1))
    tokens = next(iter(run.heldout(n_seq)))
    x, _ = lm_activations(run.lm, tokens, run.layers, run.input_hook, run.output_hook)
    model = run.model.folded_copy()
    theta = model.log_threshold.detach().float().exp().double()  # [L, F], as exported
    pre = torch.einsum("lstd,ldf->lstf", x.double(), model.W_enc.detach().double())
    pre = pre + model.b_enc.detach().double()[:, None, None]
    acts = pre * (pre > theta[:, None, None])
    acts[:, :, 0] = 0
    return acts, tokens


def _firing_bounds(run, n_tokens):
    """``[L, F]`` firing counts of the brute-force scan with every pre-activation within 1e-5
    (relative) of its threshold counted as not firing, and as firing: a calibrated threshold is
    a midpoint of two held-out values, so float32 and float64 can disagree on such tokens."""
    T = run.cfg.data.lm.seq_len
    tokens = next(iter(run.heldout(math.ceil(n_tokens / (T - 1)))))
    x, _ = lm_activations(run.lm, tokens, run.layers, run.input_hook, run.output_hook)
    model = run.model.folded_copy()
    theta = model.log_threshold.detach().float().exp().double()[:, None, None]
    pre = torch.einsum("lstd,ldf->lstf", x.double(), model.W_enc.detach().double())
    pre = (pre + model.b_enc.detach().double()[:, None, None])[:, :, 1:]
    return ((pre > theta * (1 + 1e-5)).sum((1, 2)), (pre > theta * (1 - 1e-5)).sum((1, 2)))


# ---- tests ---------------------------------------------------------------------------------


def test_eval_config_has_pages_off_by_default():
    assert EvalConfig().pages is False
    assert EvalConfig(pages=True).pages is True


@pytest.mark.parametrize("node_t, edge_t", [(0.8, 0.98), (0.5, 0.9), (1.0, 0.999)])
def test_prune_equals_circuit_tracer_dense_definition(run, node_t, edge_t):
    _, graph, pruned = build_graph(run, encode_prompt(run, PROMPT), node_t, edge_t)
    pruned = prune(graph, node_t, edge_t)
    node, edge = _reference_prune(graph.adjacency().double(), graph.n_features, graph.n_pos,
                                  graph.logit_probabilities.double(), node_t, edge_t)
    assert torch.equal(pruned.nodes, node)
    dense = torch.zeros_like(edge)
    dense[graph.row_nodes()] = pruned.edges
    assert torch.equal(dense, edge)
    if (node_t, edge_t) == (0.8, 0.98):
        assert 0 < int(node[: graph.n_features].sum()) < graph.n_features


def test_graph_json_round_trips_through_circuit_tracer_models(run, outputs):
    data = json.loads((outputs / "graph" / "to-be-or-not.json").read_text())
    model = GraphModel.model_validate(data)
    dumped = model.model_dump()
    assert dumped == {k: v for k, v in data.items() if k != "clt"}
    listing = json.loads((outputs / "graph" / "graph-metadata.json").read_text())
    assert [Metadata.model_validate(g) for g in listing["graphs"]] == [model.metadata]

    tokens = encode_prompt(run, PROMPT)
    _, graph, _ = build_graph(run, tokens)
    node, edge = _reference_prune(graph.adjacency().double(), graph.n_features, graph.n_pos,
                                  graph.logit_probabilities.double(), 0.8, 0.98)
    ref_nodes, ref_edges = _reference_counts(graph, node, edge)
    assert len(model.nodes) == len(ref_nodes) and len(model.links) == len(ref_edges)
    assert model.metadata.prompt_tokens[0] == "<bos>" and len(model.metadata.prompt_tokens) == \
        len(tokens)
    ids = [n.node_id for n in model.nodes]
    assert len(set(ids)) == len(ids)
    assert len({n.jsNodeId for n in model.nodes if n.feature_type != "cross layer transcoder"}) \
        == sum(n.feature_type != "cross layer transcoder" for n in model.nodes)
    by_id = {n.node_id: n for n in model.nodes}
    adjacency = graph.adjacency()
    index = {}
    for i in ref_nodes:  # node index -> id, from the layout alone
        if i < graph.n_features:
            layer, pos, f = graph.features[i].tolist()
            index[i] = f"{layer}_{f}_{pos}"
            n = by_id[index[i]]
            assert n.feature == cantor(layer, f) and n.layer == str(layer) and n.ctx_idx == pos
            assert n.activation == pytest.approx(float(graph.activations[i]))
        elif i < graph.token_nodes.start:
            layer, pos = divmod(i - graph.errors.start, graph.n_pos)
            index[i] = f"{layer}_-1_{pos}"
        elif i < graph.logit_nodes.start:
            pos = i - graph.token_nodes.start
            index[i] = f"E_{int(tokens[pos])}_{pos}"
        else:
            j = i - graph.logit_nodes.start
            index[i] = f"{graph.n_layers + 1}_{int(graph.logit_tokens[j])}_{graph.n_pos - 1}"
            assert by_id[index[i]].token_prob == pytest.approx(
                float(graph.logit_probabilities[j]))
    assert set(index.values()) == set(ids)
    links = {(link.source, link.target): link.weight for link in model.links}
    assert links == {(index[s], index[d]): pytest.approx(float(adjacency[d, s]))
                     for s, d in ref_edges}


def test_graph_page_in_chromium(run, outputs, browser_page):  # noqa: F811
    data = json.loads((outputs / "graph" / "to-be-or-not.json").read_text())
    page = browser_page()
    page.goto((outputs / "graph" / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#nodes .node").count() == len(data["nodes"])
    assert page.locator("#edges .edge").count() == len(data["links"])
    assert page.locator("#n-edges").inner_text() == str(len(data["links"]))
    n_features = sum(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
    assert page.locator("#nodes .node.feature").count() == n_features > 0
    assert page.locator("#edges .edge.neg").count() == sum(x["weight"] < 0
                                                           for x in data["links"])
    # the edge filter hides the edges below a share of the largest |weight|
    page.locator("#edge-filter").fill("10")
    biggest = max(abs(x["weight"]) for x in data["links"])
    strong = sum(abs(x["weight"]) >= 0.1 * biggest * (1 - 1e-9) for x in data["links"])
    assert page.locator("#n-shown").inner_text() == str(strong)
    shown = page.locator("#edges .edge").evaluate_all(
        "els => els.filter(e => getComputedStyle(e).display !== 'none').length")
    assert shown == strong < len(data["links"])
    page.locator("#edge-filter").fill("0")
    # click the most influential feature node: its inputs, outputs and its page
    node = min((n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"),
               key=lambda n: n["influence"])
    page.locator(f"#nodes [data-id='{node['node_id']}']").click(force=True)
    degree_in = sum(x["target"] == node["node_id"] for x in data["links"])
    degree_out = sum(x["source"] == node["node_id"] for x in data["links"])
    assert page.locator("#inputs li").count() == min(12, degree_in)
    assert page.locator("#outputs li").count() == min(12, degree_out)
    assert page.locator("#edges .edge.hl").count() == degree_in + degree_out
    strongest = max((x for x in data["links"] if x["target"] == node["node_id"]),
                    key=lambda x: abs(x["weight"]))
    assert page.locator("#inputs li").first.get_attribute("data-id") == strongest["source"]
    layer, f, _ = node["node_id"].split("_")
    page.locator("#feature-link").click()
    page.wait_for_selector("body[data-ready='1']")
    assert page.url.split("/")[-1] == f"feature.html?layer={layer}&feature={f}"
    assert page.locator("#title").inner_text() == f"Layer {layer} · feature {f}"
    assert page.locator(".context").count() > 0
    assert page.errors == []


def test_feature_pages_top_contexts_equal_a_brute_force_scan(run, outputs,
                                                               browser_page):  # noqa: F811
    acts, tokens = _brute_force(run, TOKENS)  # [L, S, T, F]
    L, S, T, F = acts.shape
    flat = acts.flatten(1, 2)  # [L, S*T, F]
    count = (flat > 0).sum(1)  # [L, F]
    summary = json.loads((outputs / "features" / "summary.json").read_text())
    assert summary["tokens"] == S * (T - 1) == TOKENS and summary["scanned"] == L * F
    # the busiest and the rarest firing feature of each layer, in the browser
    chosen = []
    for i in range(L):
        firing = (count[i] > 0).nonzero().flatten()
        chosen += [(i, int(count[i].argmax())), (i, int(firing[count[i][firing].argmin()]))]
    page = browser_page()
    for i, f in chosen:
        layer = run.layers[i]
        page.goto((outputs / "features" / "feature.html").as_uri() +
                  f"?layer={layer}&feature={f}")
        page.wait_for_selector("body[data-ready='1']")
        density = float(page.locator("#density").inner_text().rstrip("%"))
        assert density == pytest.approx(100 * int(count[i, f]) / (S * (T - 1)), rel=2e-3)
        stats = page.locator("#stats").inner_text()
        assert f"({int(count[i, f])} of {S * (T - 1)} tokens)" in stats, stats
        shown = page.locator(".context").evaluate_all(
            "els => els.map(e => [+e.dataset.seq, +e.dataset.pos, +e.dataset.act, "
            "[...e.querySelectorAll('.tok')].map(t => +t.dataset.act)])")
        expected = flat[i, :, f].topk(min(TOP, int(count[i, f]))).values
        assert len(shown) == len(expected)
        assert [v for _, _, v, _ in shown] == pytest.approx(expected.tolist(), rel=1e-5)
        for seq, pos, value, window in shown:
            assert acts[i, seq, pos, f].item() == pytest.approx(value, rel=1e-5)
            start = max(0, pos - feat.BEFORE)
            ref = acts[i, seq, start : pos + feat.AFTER + 1, f]
            assert window == pytest.approx(ref.tolist(), rel=2e-3, abs=1e-3)  # float16
            peak = page.locator(f".context[data-seq='{seq}'][data-pos='{pos}'] .tok.peak")
            assert peak.count() == 1
    assert page.errors == []


def test_every_feature_record_equals_the_brute_force_scan(run, outputs):
    acts, _ = _brute_force(run, TOKENS)
    low, high = _firing_bounds(run, TOKENS)
    flat = acts.flatten(1, 2)
    T = acts.shape[2]
    for i, layer in enumerate(run.layers):
        for block in sorted((outputs / "features" / "data" / f"l{layer}").glob("b*.js")):
            text = block.read_text()
            records = json.loads(text[text.index("(") + 1 : text.rindex(")")])
            for r in records:
                f = r["feature"]
                column = flat[i, :, f]
                assert low[i, f] <= r["count"] == sum(r["hist"]) <= high[i, f]
                top = column.topk(TOP)
                values = [v for v in top.values.tolist() if v > 0]
                assert [c["act"] for c in r["contexts"]] == pytest.approx(values, rel=1e-5)
                for c in r["contexts"]:
                    assert column[c["seq"] * T + c["pos"]].item() == pytest.approx(c["act"],
                                                                                 rel=1e-5)
                if values:  # histogram over [0, act_max]: max in the last bin
                    assert (len(r["hist"]) - 1) * r["hist_width"] <= values[0] < \
                        len(r["hist"]) * r["hist_width"]
                norms = run.model.folded_copy().decoder_view(i)[f].norm(dim=-1)
                assert r["decoder"]["norms"] == pytest.approx(norms.tolist(), rel=1e-4)


def test_histograms_that_grow_by_doubling_equal_direct_binning():
    torch.manual_seed(0)
    n, bins = 5, 16
    scan = feat.LayerScan(torch.arange(n), torch.zeros(n, dtype=torch.int64),
                          torch.zeros(n, dtype=torch.float64),
                          torch.zeros(n, bins, dtype=torch.int32),
                          torch.full((3, n), -math.inf), torch.zeros(3, n, dtype=torch.int64),
                          torch.full((3, n, 3), math.nan, dtype=torch.float16))
    chunks = []
    for scale in (0.01, 0.5, 0.3, 40.0, 2.0, 1000.0):  # growth by 1 and by many doublings
        a = torch.relu(torch.randn(4 * 6, n)) * scale * torch.rand(n)
        a[:, 0] = 0  # a feature that never fires
        a.view(4, 6, n)[:, 0] = 0
        chunks.append(a)
        feat._update(scan, a, 0, 6, 1, 1)
    values = torch.cat(chunks)
    for j in range(n):
        v = values[:, j][values[:, j] > 0].double()
        assert int(scan.counts[j]) == v.numel()
        if not v.numel():
            assert scan.hist[j].sum() == 0 and scan.hi[j] == 0
            continue
        hi = float(scan.hi[j])
        assert hi / 2 <= float(v.max()) < hi and math.log2(hi).is_integer()
        direct = torch.bincount((v / hi * bins).long(), minlength=bins)
        assert scan.hist[j].tolist() == direct.tolist()


def read_circuit_tracer_feature(folder: Path, layer: int, feature: int) -> dict[str, Any]:
    """One feature read back the way circuit-tracer's viewer does (byte range, length, zlib),
    independently of the writer in clt/features.py."""
    with gzip.open(folder / "index.json.gz", "rt") as fh:
        entry = json.load(fh)[layer]
    start, end = entry["offsets"][feature], entry["offsets"][feature + 1]
    with open(folder / entry["filename"], "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    (length,) = struct.unpack("<I", data[:4])
    return json.loads(zlib.decompress(data[4 : 4 + length]))


def test_circuit_tracer_feature_files(run, outputs):
    folder = outputs / "features" / "circuit-tracer"
    F = run.model.n_features
    import gzip

    with gzip.open(folder / "index.json.gz", "rt") as fh:
        index = json.load(fh)
    for layer in run.layers:
        offsets = index[layer]["offsets"]
        assert len(offsets) == F + 1 and offsets == sorted(offsets)
        assert (folder / index[layer]["filename"]).stat().st_size == offsets[-1]
    layer = run.layers[-1]
    text = (outputs / "features" / "data" / f"l{layer}" / "b0.js").read_text()
    records = json.loads(text[text.index("(") + 1 : text.rindex(")")])
    for r in records[:5]:
        model = FeatureModel.model_validate(read_circuit_tracer_feature(folder, layer,
                                                                        r["feature"]))
        assert model.index == r["feature"] and model.activation_frequency == r["density"]
        examples = model.examples_quantiles[0].examples
        assert len(examples) == len(r["contexts"])
        for e, c in zip(examples, r["contexts"], strict=True):
            assert len(e.tokens) == len(e.tokens_acts_list)
            assert e.tokens_acts_list[e.train_token_ind] == pytest.approx(c["act"], rel=2e-3)
        assert model.act_max >= r["max"] and len(model.quantile_values) == (100 if r["hist"]
                                                                             else 0)
        assert model.top_logits == [t for t, _ in r["top_logits"]]


def test_index_page_sorts_filters_and_links(run, outputs, browser_page):  # noqa: F811
    page = browser_page()
    page.goto((outputs / "features" / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']")
    n = run.model.n_layers * run.model.n_features
    assert page.locator("tr.feature-row").count() == min(100, n)
    densities = page.locator("tr.feature-row td:nth-child(3)").all_inner_texts()
    values = [float(d.rstrip("%")) for d in densities]
    assert values == sorted(values, reverse=True)
    page.select_option("#f-layer", str(run.layers[1]))
    layers = page.locator("tr.feature-row td:nth-child(1)").all_inner_texts()
    assert set(layers) == {str(run.layers[1])} and len(layers) == run.model.n_features
    page.click("th[data-k='spread']")
    spreads = [float(v) for v in
               page.locator("tr.feature-row td:nth-child(5)").all_inner_texts()]
    assert spreads == sorted(spreads, reverse=True)
    first = page.locator("a.feature-link").first
    f = first.inner_text()
    first.click()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#title").inner_text() == f"Layer {run.layers[1]} · feature {f}"
    assert page.errors == []


def test_as_exported_thresholds_equal_clt_export(run, run_dir, tmp_path):
    from clt.export import export_run, load_exported

    export_run(run_dir, tmp_path / "export", log=lambda s: None)
    exported = load_exported(tmp_path / "export")
    theta = run.model.log_threshold.detach().float().exp()
    for i in range(run.model.n_layers):
        assert torch.equal(exported["threshold"][i], theta[i])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_commands_refuse_to_destroy_data(run_dir, outputs, tmp_path, capsys):
    def refused(main, args, words):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        line = _error_line(capsys)
        assert all(w in line for w in words), line

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("data")
    refused(graph_main, [str(run_dir), str(full), "--prompt", PROMPT], ["not empty"])
    refused(graph_main, [str(run_dir), str(full), "--prompt", PROMPT, "--overwrite"],
            ["not a previous output"])
    refused(features_main, [str(run_dir), str(outputs / "graph"), "--overwrite"],
            ["not a previous output"])
    assert (full / "keep.txt").read_text() == "data"
    for target in (run_dir, run_dir / "pages", run_dir.parent):
        refused(graph_main, [str(run_dir), str(target), "--prompt", PROMPT], ["run folder"])
    # a previous output that now holds a run folder is not replaced
    copy = tmp_path / "graph"
    graph_main([str(run_dir), str(copy), "--prompt", PROMPT])
    capsys.readouterr()
    (copy / "nested").mkdir()
    (copy / "nested" / "config.json").write_text("{}")
    (copy / "nested" / "step_00000004.pt").write_text("")
    refused(graph_main, [str(run_dir), str(copy), "--prompt", PROMPT, "--overwrite"],
            ["contains the run folder"])
    (copy / "nested" / "step_00000004.pt").unlink()
    graph_main([str(run_dir), str(copy), "--prompt", "be", "--overwrite"])
    capsys.readouterr()
    assert not (copy / "nested").exists() and (copy / "be.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders
    # bad input: one line, exit 2
    refused(graph_main, [str(tmp_path / "nope"), str(tmp_path / "o1"), "--prompt", PROMPT],
            ["no such run folder"])
    refused(graph_main, [str(run_dir), str(tmp_path / "o2"), "--prompt", "  "], ["empty"])
    refused(graph_main, [str(run_dir), str(tmp_path / "o3"), "--prompt", PROMPT,
                         "--edge-threshold", "1.5"], ["edge threshold"])
    for spec, words in (("0:32", ["out of range"]), ("7:1", ["not a trained layer"]),
                        ("0:x", ["bad --features"]), ("0:5-2", ["reversed"])):
        refused(features_main, [str(run_dir), str(tmp_path / "o4"), "--features", spec], words)
    refused(features_main, [str(run_dir), str(tmp_path / "o5"), "--tokens", "0"], ["--tokens"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()


def test_feature_subset(run, run_dir, tmp_path):
    layer = run.layers[1]
    summary = feat.write_features(run_dir, tmp_path / "sub", 64, f"{layer}:3,{layer}:5-6",
                                  log=lambda s: None)
    assert summary["scanned"] == 3
    with __import__("gzip").open(tmp_path / "sub" / "circuit-tracer" / "index.json.gz",
                                 "rt") as fh:
        offsets = json.load(fh)[layer]["offsets"]
    sizes = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert [i for i, s in enumerate(sizes) if s] == [3, 5, 6]
    assert not (tmp_path / "sub" / "data" / f"l{run.layers[0]}").exists()


def test_write_run_pages_and_wandb(run_dir, browser_page):  # noqa: F811
    logged = {}

    class FakeRun:
        def log(self, values):
            logged.update(values)

        def log_artifact(self, artifact):
            logged["artifact"] = artifact

    out = write_run_pages(run_dir, None, "cpu", log=lambda s: None, wandb_run=FakeRun(),
                          n_tokens=32)
    assert out == run_dir / "pages"
    for name in ("index.html", "graph/index.html", "features/index.html",
                 "features/feature.html", "features/circuit-tracer/index.json.gz"):
        assert (out / name).is_file(), name
    assert "registerIndex" in logged["pages/features"].html
    assert logged["artifact"].type == "html"
    again = write_run_pages(run_dir, None, "cpu", log=lambda s: None, wandb_run=FakeRun(),
                            n_tokens=32)
    assert again == out and not [p for p in run_dir.iterdir() if p.name.startswith(".pages")]
    # the run's pages link to each other: index -> graph -> a feature node -> its page
    data = json.loads(next(p for p in (out / "graph").glob("*.json")
                           if p.name != "graph-metadata.json").read_text())
    page = browser_page()
    page.goto((out / "index.html").as_uri())
    page.click("#graph-link")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#nodes .node").count() == len(data["nodes"])
    node = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    page.locator(f"#nodes [data-id='{node['node_id']}']").click(force=True)
    page.locator("#feature-link").click()
    page.wait_for_selector("body[data-ready='1']")
    layer, f, _ = node["node_id"].split("_")
    assert page.locator("#title").inner_text() == f"Layer {layer} · feature {f}"
    assert page.errors == []


def test_write_run_pages_of_an_sae_has_features_and_no_graph(tmp_path):
    path, sae = write_run_config(
        tmp_path, "topk", "lm", name="sae", model={"n_features": 16, "reach": 1},
        data={"lm": {**TINY_LM, "producer_thread": False, "output_hook": "hook_mlp_in"}},
        train={"steps": 2}, eval={"every": 2, "tokens": 64, "replacement_tokens": 0},
        checkpoint={"every": 2, "keep_last": 1})
    train.main([str(path)])
    out = write_run_pages(sae, None, log=lambda s: None, n_tokens=32)
    assert (out / "features" / "index.html").is_file() and not (out / "graph").exists()
    assert "No attribution graph" in (out / "index.html").read_text()


def test_write_run_pages_refuses_a_foreign_pages_folder(tmp_path):
    from clt.pages.common import PagesError

    fake = tmp_path / "run"
    (fake / "pages").mkdir(parents=True)
    (fake / "pages" / "notes.txt").write_text("mine")
    with pytest.raises(PagesError, match="not a previous output"):
        write_run_pages(fake, None, log=lambda s: None)
    assert (fake / "pages" / "notes.txt").read_text() == "mine"


def test_pages_are_self_contained(outputs):
    for page in [outputs / "graph" / "index.html", *(outputs / "features").glob("*.html")]:
        text = page.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "<link" not in text, page
    graph = Path(outputs / "graph" / "index.html").read_text()
    assert "<script src" not in graph


def test_graph_page_renders_1500_nodes_and_15000_edges(tmp_path, browser_page):  # noqa: F811
    """A synthetic graph the size of a 30-layer prompt's: every node and edge drawn, quickly."""
    import time

    from clt.pages.html import graph_page

    gen = torch.Generator().manual_seed(0)
    T, n_layers = 32, 30
    nodes = [{"node_id": f"E_{p}_{p}", "feature": p, "layer": "E", "ctx_idx": p,
              "feature_type": "embedding", "jsNodeId": f"E_{p}-{p}"} for p in range(T)]
    for i in range(1400):
        layer, pos = i % n_layers, int(torch.randint(1, T, (1,), generator=gen))
        nodes.append({"node_id": f"{layer}_{i}_{pos}", "feature": cantor(layer, i),
                      "layer": str(layer), "ctx_idx": pos, "activation": 1.0, "influence": 0.5,
                      "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{i}-0"})
    nodes += [{"node_id": f"31_{v}_{T - 1}", "feature": v, "layer": "31", "ctx_idx": T - 1,
               "feature_type": "logit", "jsNodeId": f"L_{v}-{T - 1}", "token_prob": 0.1,
               "clerp": f'Output "t{v}" (p=0.100)'} for v in range(10)]
    pairs = torch.randint(0, len(nodes), (15000, 2), generator=gen).tolist()
    links = [{"source": nodes[a]["node_id"], "target": nodes[b]["node_id"],
              "weight": float(torch.randn(1, generator=gen))} for a, b in pairs]
    data = {"metadata": {"slug": "big", "scan": "/x", "transcoder_list": [],
                         "prompt_tokens": [f"t{p}" for p in range(T)], "prompt": "big",
                         "node_threshold": 0.8, "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": nodes, "links": links, "clt": {"n_layers": n_layers}}
    (tmp_path / "index.html").write_text(graph_page(data, None))
    page = browser_page()
    start = time.perf_counter()
    page.goto((tmp_path / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']")
    elapsed = time.perf_counter() - start
    assert page.locator("#nodes .node").count() == len(nodes)
    assert page.locator("#edges .edge").count() == len(links)
    page.locator("#nodes .node.feature").nth(7).click(force=True)
    assert page.locator("#node-title").count() == 1
    assert elapsed < 20, f"the page took {elapsed:.1f} s to draw"
    assert page.errors == []
