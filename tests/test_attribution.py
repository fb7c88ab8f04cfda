"""Attribution graphs and circuit-tracer's scores on tiny LMs.

Edges are checked against explicit Jacobians of a linearized forward written here from the LM's
weights (frozen attention patterns and norm scales read from a clean run); scores against the
dense definition ``w ((I - N)^-1 - I)`` and a hand-computed graph; the end-to-end cases are a
transcoder that reproduces every MLP output (both scores 1) and one with no active feature.
"""

import math

import pytest
import torch
from _testing import assert_close

from clt.attribution import (
    AttributionGraph,
    attribute,
    attribution_scores,
    graph_scores,
    node_influence,
    normalize_rows,
    select_logits,
)
from clt.data.lm import load_lm
from clt.model import CrossLayerTranscoder

BOS = 256
T = 8
HOOKS = {"hook_mlp_in": "hook_resid_mid", "ln2.hook_normalized": "ln2.hook_normalized"}


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    """Attribution logic is under test, not the kernels: use the fast torch paths."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


def _tiny(n_layers=2, **options):
    return load_lm("tiny", tiny={"n_layers": n_layers, "d_model": 32, "d_mlp": 64, "n_ctx": 16,
                                 **options})


@pytest.fixture(scope="module")
def lm():
    return _tiny()


@pytest.fixture(scope="module")
def prompt():
    toks = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(3))
    toks[0] = BOS
    return toks


def _random_clt(n_layers, reach=None, k=3, seed=0, skip=False):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(n_layers, 32, 32, 12, reach=reach, nonlinearity="topk", k=k,
                               skip=skip)
    with torch.no_grad():
        if skip:
            clt.W_skip.normal_(0, 0.2)
        st = clt.standardizer
        st.in_mean.normal_(0, 0.1), st.in_std.uniform_(0.5, 2)
        st.out_mean.normal_(0, 0.1), st.out_std.uniform_(0.5, 2)
        clt.b_dec.normal_()
        clt.b_enc.normal_(1, 0.1)  # the top 3 are positive: k active features everywhere
    return clt.eval()


# ---- an independent linearized forward -----------------------------------------------------


def _frozen(lm, tokens):
    """Clean-run values the linearization freezes: patterns, norm scales, MLP outputs."""
    with torch.no_grad():
        logits, cache = lm.run_with_cache(tokens[None])
    return logits[0].double(), {name: value[0].double() for name, value in cache.items()}


def _linearized_reads(lm, tokens, clt, layers, input_hook, graph, cache, z_feat, z_err, z_tok):
    """Feature pre-activations and logit-direction reads of the linearized model, as a function
    of one coefficient per feature node, error node (layer, position) and token node.

    Written from the weights: ``resid = z_tok * W_E[tok] + W_pos``; per block a frozen-LN
    attention ``sum_h pattern_h (ln1(resid) W_V + b_V) W_O + b_O``; MLP output = b_dec (raw) +
    sum of ``z * a * W_dec`` of the feature nodes writing there + ``z_err * error`` (+ the skip
    connection ``x_in @ W_skip``, a linear path at every position as in circuit-tracer), the
    true output at BOS and where no layer is trained; logits read the frozen ln_final at T-1.
    At all-ones coefficients this is the LM's own forward.
    """
    folded = clt.folded_copy()  # raw-scale weights through the model's own fold
    n_layers = lm.cfg.n_layers
    index = {layer: i for i, layer in enumerate(layers)}
    feats = graph.features.tolist()
    acts = graph.activations.double()
    mlp_out = torch.stack([cache[f"blocks.{layer}.hook_mlp_out"] for layer in range(n_layers)])
    constant = torch.zeros_like(mlp_out)  # b_dec where trained, the true output at BOS
    for i, layer in enumerate(layers):
        constant[layer, 1:] = folded.b_dec[i].double()
    constant[:, 0] = mlp_out[:, 0]
    recon = constant.clone()
    for n, (layer, pos, f) in enumerate(feats):
        s = index[layer]
        block = folded.decoder_view(s).double()
        for r in range(block.shape[1]):
            recon[layers[s + r], pos] += acts[n] * block[f, r]
    if folded.W_skip is not None:
        for i, layer in enumerate(layers):
            clean = cache[f"blocks.{layer}.{HOOKS[input_hook]}"] @ folded.W_skip[i].double()
            recon[layer, 1:] += clean[1:]
            constant[layer, 0] -= clean[0]  # the skip path is added back in the forward
    errors = mlp_out - recon

    def norm(x, name, ln):
        x = x - x.mean(-1, keepdim=True)
        x = x / cache[f"{name}.hook_scale"]
        return x if ln is None else x * ln.w.double() + ln.b.double()

    resid = z_tok[:, None] * lm.W_E[tokens].double() + lm.W_pos[: len(tokens)].double()
    reads = torch.zeros(len(feats), dtype=torch.float64)
    for layer in range(n_layers):
        block = lm.blocks[layer]
        attn = block.attn
        x = norm(resid, f"blocks.{layer}.ln1", block.ln1)
        v = torch.einsum("td,hde->hte", x, attn.W_V.double()) + attn.b_V.double()[:, None]
        z = cache[f"blocks.{layer}.attn.hook_pattern"] @ v  # [H, T, d_head]
        resid = resid + torch.einsum("hte,hed->td", z, attn.W_O.double()) + attn.b_O.double()
        if layer in index:
            s = index[layer]
            x_in = resid if input_hook == "hook_mlp_in" else norm(resid, f"blocks.{layer}.ln2",
                                                                  None)
            for n, (fl, pos, f) in enumerate(feats):
                if fl == layer:
                    reads[n] = x_in[pos] @ folded.W_enc[s, :, f].double() + folded.b_enc[s, f]
        out = constant[layer] + z_err[layer][:, None] * errors[layer]
        if layer in index and folded.W_skip is not None:
            out = out + x_in @ folded.W_skip[index[layer]].double()
        for n, (fl, pos, f) in enumerate(feats):
            s = index[fl]
            r = layers.index(layer) - s if layer in index else -1
            if 0 <= r < folded.decoder_view(s).shape[1]:
                out = out.index_add(0, torch.tensor([pos]), (z_feat[n] * acts[n] * folded
                                    .decoder_view(s)[f, r].double())[None])
        resid = resid + out
    final = norm(resid, "ln_final", lm.ln_final)[-1]
    logits = final @ lm.W_U.double() + lm.b_U.double()
    W_U = lm.W_U.double()
    directions = (W_U[:, graph.logit_tokens] - W_U.mean(1, keepdim=True)).T
    return torch.cat([reads, directions @ final]), logits


@pytest.mark.parametrize("layers, reach, input_hook, n_lm, skip", [
    ([0, 1], None, "hook_mlp_in", 2, False),
    ([0, 1], 1, "ln2.hook_normalized", 2, False),
    ([1], None, "hook_mlp_in", 2, False),
    ([0, 2], None, "hook_mlp_in", 3, False),
    ([0, 1], 1, "hook_mlp_in", 2, True),
    ([0, 1], None, "ln2.hook_normalized", 2, True),
], ids=["clt", "plt-ln2", "layer1-only", "layers0,2-of-3", "skip-plt", "skip-clt-ln2"])
def test_edges_equal_jacobians_of_the_linearized_model(prompt, layers, reach, input_hook, n_lm,
                                                       skip):
    lm = _tiny(n_lm)
    clt = _random_clt(len(layers), reach, skip=skip)
    graph = attribute(lm, clt, prompt, layers, input_hook=input_hook, batch_size=7)
    logits, cache = _frozen(lm, prompt)
    n_f = graph.n_features
    assert n_f == len(layers) * 3 * (T - 1)  # TopK k = 3 at every non-BOS position
    assert (graph.features[:, 1] > 0).all()  # nothing at BOS

    def f(z_feat, z_err, z_tok):
        return _linearized_reads(lm, prompt, clt, layers, input_hook, graph, cache, z_feat,
                                 z_err, z_tok)[0]

    ones = (torch.ones(n_f, dtype=torch.float64),
            torch.ones(n_lm, T, dtype=torch.float64), torch.ones(T, dtype=torch.float64))
    reads, lin_logits = _linearized_reads(lm, prompt, clt, layers, input_hook, graph, cache,
                                          *ones)
    # at the operating point the linearized model is the LM (and the CLT's pre-activations)
    assert_close(lin_logits, logits[-1], atol=1e-4, rtol=1e-4, name="logits")
    J_feat, J_err, J_tok = torch.autograd.functional.jacobian(f, ones)
    expected = torch.cat([J_feat, J_err.flatten(1), J_tok], dim=1)  # [rows, nodes w/o logits]
    edges = graph.edges.double()
    scale = expected.abs().max()
    assert_close(edges[:, : graph.logit_nodes.start], expected, atol=1e-5 * scale, rtol=1e-4,
                 name="edges")
    assert (graph.edges[:, graph.logit_nodes] == 0).all()
    assert (graph.edges[:, graph.errors].view(-1, n_lm, T)[:, :, 0] == 0).all()  # BOS error 0
    assert expected[:n_f, graph.errors].abs().max() > 0  # errors reach features: not vacuous


def test_nodes_and_activations_match_a_dense_encoding(lm, prompt):
    clt = _random_clt(2)
    graph = attribute(lm, clt, prompt, [0, 1])
    _, cache = _frozen(lm, prompt)
    folded = clt.folded_copy()
    expected = []
    for s in range(2):
        x = cache[f"blocks.{s}.hook_resid_mid"][1:]
        pre = x @ folded.W_enc[s].double() + folded.b_enc[s].double()  # [T-1, F]
        top = pre.topk(3, dim=-1)
        for p in range(T - 1):
            for v, f in zip(top.values[p].tolist(), top.indices[p].tolist(), strict=True):
                if v > 0:
                    expected.append((s, p + 1, f, v))
    expected.sort()
    assert graph.features.tolist() == [list(e[:3]) for e in expected]
    assert_close(graph.activations.double(), torch.tensor([e[3] for e in expected]),
                 atol=1e-5, rtol=1e-5)


def test_batch_size_does_not_change_the_graph(lm, prompt):
    clt = _random_clt(2)
    one = attribute(lm, clt, prompt, [0, 1], batch_size=1)
    for batch in (5, 64):
        other = attribute(lm, clt, prompt, [0, 1], batch_size=batch)
        assert_close(other.edges, one.edges, atol=1e-6, rtol=1e-5)


# ---- scores --------------------------------------------------------------------------------


def _graph(edges, n_features, n_layers, n_pos, probs):
    n_logits = len(probs)
    return AttributionGraph(torch.zeros(n_pos, dtype=torch.int64),
                            torch.zeros(n_features, 3, dtype=torch.int64),
                            torch.ones(n_features), torch.arange(n_logits),
                            torch.tensor(probs, dtype=torch.float64), edges, n_layers)


def test_scores_on_a_hand_computed_graph():
    # nodes: feature, error, token, logit. logit <- 3 feature, -1 error; feature <- 2 err, 2 tok
    edges = torch.tensor([[0.0, 2.0, -2.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    graph = _graph(edges, 1, 1, 1, [1.0])
    influence = node_influence(graph)
    # feature 0.75; error 0.25 + 0.75 * 0.5; token 0.75 * 0.5
    assert influence.tolist() == pytest.approx([0.75, 0.625, 0.375, 0.0])
    replacement, completeness = graph_scores(graph)
    assert replacement == pytest.approx(0.375)
    # c = (0.5, 1, 1, 0.75) weighted by influence + logit weight (0.75, 0.625, 0.375, 1)
    assert completeness == pytest.approx((0.375 + 0.625 + 0.375 + 0.75) / 2.75)


def test_scores_equal_the_dense_definition():
    """Random DAG: influence = w ((I - N)^-1 - I) on circuit-tracer's dense adjacency."""
    gen = torch.Generator().manual_seed(0)
    n_f, n_layers, n_pos, probs = 6, 2, 3, [0.5, 0.3, 0.1]
    n_nodes = n_f + (n_layers + 1) * n_pos + len(probs)
    edges = torch.randn(n_f + len(probs), n_nodes, generator=gen, dtype=torch.float64)
    edges[:n_f, :n_f] = edges[:n_f, :n_f].tril(-1)  # features read earlier features only
    edges[:, n_nodes - len(probs):] = 0
    edges[2] = 0  # a feature without inputs
    graph = _graph(edges, n_f, n_layers, n_pos, probs)
    A = normalize_rows(graph.adjacency())
    w = torch.zeros(n_nodes, dtype=torch.float64)
    w[-len(probs):] = torch.tensor(probs, dtype=torch.float64)
    influence = w @ (torch.linalg.inv(torch.eye(n_nodes, dtype=torch.float64) - A)
                     - torch.eye(n_nodes, dtype=torch.float64))
    assert_close(node_influence(graph), influence)
    errors, tokens = graph.errors, graph.token_nodes
    replacement = influence[tokens].sum() / (influence[tokens].sum() + influence[errors].sum())
    out = influence + w
    completeness = ((1 - A[:, errors].sum(1)) * out).sum() / out.sum()
    assert graph_scores(graph) == pytest.approx((float(replacement), float(completeness)),
                                                rel=1e-12)


def test_select_logits_cumulative_probability():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05])
    W_U = torch.randn(4, 5, dtype=torch.float64)
    ids, p, vecs = select_logits(probs.log(), W_U, max_n_logits=10, desired_logit_prob=0.85)
    assert ids.tolist() == [1, 2, 3]  # 0.5, 0.8, 0.9: the token that crosses 0.85 is kept
    assert p.tolist() == pytest.approx([0.5, 0.3, 0.1])
    assert_close(vecs, (W_U[:, [1, 2, 3]] - W_U.mean(1, keepdim=True)).T)
    assert select_logits(probs.log(), W_U, max_n_logits=2)[0].tolist() == [1, 2]


# ---- end to end: an exact transcoder scores 1, one without features 0 ----------------------


def _exact_clt(lm, tokens, layers):
    """A TopK (k = 1) CLT whose feature p fires only at position p and, with its crosslayer
    writes, reproduces every MLP output at the non-BOS positions of ``tokens`` (to rounding):
    encoders are the pseudo-inverse of the inputs; layer 0's features write half of layer 1's
    output, layer 1's features the other half."""
    _, cache = _frozen(lm, tokens)
    L, n = len(layers), len(tokens) - 1
    clt = CrossLayerTranscoder(L, 32, 32, n, nonlinearity="topk", k=1).eval()
    with torch.no_grad():
        clt.W_dec.zero_()
        for i, layer in enumerate(layers):
            clt.W_enc[i] = torch.linalg.pinv(cache[f"blocks.{layer}.hook_resid_mid"][1:]).float()
        x = torch.stack([cache[f"blocks.{layer}.hook_resid_mid"][1:] for layer in layers])
        codes = clt.encode(x.float())
        assert (codes.indices[..., 0] == torch.arange(n)).all()  # feature p fires at p only
        a = codes.values[..., 0].double()  # [L, n], ~1
        y = [cache[f"blocks.{layer}.hook_mlp_out"][1:] for layer in layers]
        clt.decoder_view(0)[:, 0] = (y[0] / a[0, :, None]).float()
        clt.decoder_view(0)[:, 1] = (0.5 * y[1] / a[0, :, None]).float()
        clt.decoder_view(1)[:, 0] = (0.5 * y[1] / a[1, :, None]).float()
        assert_close(clt.reconstruct(x.float()), torch.stack(y).float(), atol=1e-5, rtol=1e-5)
    return clt


def test_exact_transcoder_scores_one(lm, prompt):
    clt = _exact_clt(lm, prompt, [0, 1])
    graph = attribute(lm, clt, prompt, [0, 1])
    assert graph.n_features == 2 * (T - 1)
    replacement, completeness = graph_scores(graph)
    assert replacement == pytest.approx(1.0, abs=1e-5)
    assert completeness == pytest.approx(1.0, abs=1e-5)
    # with the MLP outputs halved the features explain only half: the error nodes take over
    with torch.no_grad():
        clt.W_dec.mul_(0.5)
    half = graph_scores(attribute(lm, clt, prompt, [0, 1]))
    assert half[0] < 0.9 and half[1] < 0.95


def _separated_lm():
    """A tiny RMS-norm LM whose tokens can reach the logits only through MLP outputs: the
    embeddings live in the first half of the residual stream, attention writes only there, and
    the unembedding reads only the second half (the MLPs read and write everything)."""
    lm = _tiny(normalization_type="RMS")
    half = lm.cfg.d_model // 2
    with torch.no_grad():
        lm.embed.W_E[:, half:] = 0
        for block in lm.blocks:
            block.attn.W_O[..., half:] = 0
            block.attn.b_O[half:] = 0
        lm.unembed.W_U[:half] = 0
    return lm


def _no_features(n_layers):
    clt = CrossLayerTranscoder(n_layers, 32, 32, 12, nonlinearity="relu")
    with torch.no_grad():
        clt.b_enc.fill_(-1e4)  # nothing ever fires
    return clt.eval()


def test_transcoder_without_features_replacement_zero_completeness_half(prompt):
    graph = attribute(_separated_lm(), _no_features(2), prompt, [0, 1])
    assert graph.n_features == 0
    replacement, completeness = graph_scores(graph)
    assert replacement == 0.0
    # circuit-tracer's completeness counts nodes without inputs (errors, tokens) as complete:
    # all influence lands on error nodes, whose weight equals the logits' weight
    assert completeness == pytest.approx(0.5, abs=1e-12)


def test_without_features_completeness_is_half_of_one_plus_replacement(lm, prompt):
    """On a generic LM tokens also reach the logits directly (residual stream, attention)."""
    replacement, completeness = graph_scores(attribute(lm, _no_features(2), prompt, [0, 1]))
    assert 0 < replacement < 1
    assert completeness == pytest.approx((1 + replacement) / 2, abs=1e-9)


def test_attribution_scores_average_prompts(lm, prompt):
    clt = _random_clt(2)
    other = prompt.roll(1)
    other[0] = BOS
    prompts = torch.stack([prompt, other])
    result = attribution_scores(lm, clt, prompts, [0, 1])
    each = [graph_scores(attribute(lm, clt, p, [0, 1])) for p in prompts]
    assert result["graph_prompts"] == 2
    assert result["replacement_score"] == pytest.approx((each[0][0] + each[1][0]) / 2)
    assert result["completeness_score"] == pytest.approx((each[0][1] + each[1][1]) / 2)
    assert all(0 < r < 1 and 0 < c < 1 for r, c in each)


def test_bad_inputs(lm, prompt):
    clt = _random_clt(2)
    with pytest.raises(TypeError, match="feature decoder rows"):
        attribute(lm, object(), prompt, [0, 1])
    with pytest.raises(ValueError, match="hook_mlp_out"):
        attribute(lm, clt, prompt, [0, 1], output_hook="hook_mlp_in")
    with pytest.raises(ValueError, match="strictly increasing"):
        attribute(lm, clt, prompt, [1, 0])
    with pytest.raises(ValueError, match="2 layers"):
        attribute(lm, clt, prompt, [1])
    with pytest.raises(ValueError, match=r"one prompt \[T\]"):
        attribute(lm, clt, prompt[None], [0, 1])
    with pytest.raises(ValueError, match="max_edge_bytes"):
        attribute(lm, clt, prompt, [0, 1], max_edge_bytes=1000)
    with pytest.raises(ValueError, match="batch_size"):
        attribute(lm, clt, prompt, [0, 1], batch_size=0)
    # a logit without any input: no influence anywhere, the replacement score is undefined
    assert math.isnan(graph_scores(_graph(torch.zeros(1, 3), 0, 1, 1, [1.0]))[0])
