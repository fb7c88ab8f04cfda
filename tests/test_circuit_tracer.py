"""Our exports read by circuit-tracer itself, and its attribution graphs against ours.

Runs only where circuit-tracer is installed (the second environment of ``.ci/run``, built from
``constraints-circuit-tracer.txt``); skipped elsewhere unless ``CLT_REQUIRE_CIRCUIT_TRACER=1``,
which turns the missing package into a failure (so CI cannot pass by skipping). Tiny random LMs
and transcoders only, no network.
"""

import importlib.util
import os

import pytest
import torch
from _testing import assert_close, fit_random_standardizer

from clt.attribution import attribute, attribution_scores, graph_scores
from clt.convert import convert, from_circuit_tracer
from clt.data.lm import load_lm
from clt.export import export_circuit_tracer
from clt.model import CrossLayerTranscoder

if importlib.util.find_spec("circuit_tracer") is None:
    if os.environ.get("CLT_REQUIRE_CIRCUIT_TRACER") == "1":
        raise ImportError("CLT_REQUIRE_CIRCUIT_TRACER=1 but circuit-tracer is not installed")
    pytest.skip("circuit-tracer is not installed (see constraints-circuit-tracer.txt)",
                allow_module_level=True)

from circuit_tracer import attribute as ct_attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores  # noqa: E402

from clt.tracer import load_transcoders, replacement_model  # noqa: E402

BOS = 256
N_LAYERS, D, F = 3, 32, 24


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny", tiny={"n_layers": N_LAYERS, "d_model": D, "d_mlp": 64, "n_ctx": 16})


class _ByteTokenizer:
    """What circuit-tracer asks of a tokenizer for token-id prompts: the special ids (our BOS
    leads every prompt, so it prepends nothing) and labels for the logit nodes."""

    all_special_ids = [BOS]
    bos_token_id, padding_side, vocab_size = BOS, "right", 260

    @staticmethod
    def decode(ids):
        return str(ids)


def _prompts(n, T=8, seed=3):
    toks = torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))
    toks[:, 0] = BOS
    return toks


def _activations(lm, tokens):
    """Raw ``x [L, N, d]`` at ``hook_resid_mid`` of every layer (BOS dropped)."""
    names = [f"blocks.{i}.hook_resid_mid" for i in range(N_LAYERS)]
    with torch.no_grad():
        _, cache = lm.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n][:, 1:].flatten(0, 1) for n in names])


def _exported(lm, tmp_path, reach, skip=False, seed=0):
    """A TopK model (random weights, non-trivial standardizer) converted to JumpReLU with
    per-feature thresholds on the LM's activations, and its export folder."""
    torch.manual_seed(seed)
    model = CrossLayerTranscoder(N_LAYERS, D, D, F, reach=reach, nonlinearity="topk", k=4,
                                 skip=skip)
    fit_random_standardizer(model, seed)
    if skip:
        with torch.no_grad():
            model.W_skip.normal_(0, 0.1)
    x = _activations(lm, _prompts(8, seed=seed + 1))
    converted = convert(model.eval(), batches=[x]).eval()
    out = export_circuit_tracer(converted, tmp_path / f"export-r{reach}", "hook_mlp_in",
                                "hook_mlp_out")
    return converted, out


def _dense(codes, F):
    dense = codes.values.new_zeros(*codes.values.shape[:2], F)
    return dense.scatter_add(-1, codes.indices.long(), codes.values)


@pytest.mark.parametrize("reach, skip", [(None, False), (1, False), (1, True)],
                         ids=["clt", "plt", "plt-skip"])
def test_circuit_tracer_loads_our_export(lm, tmp_path, reach, skip):
    """load_clt / load_transcoder_set read our files; features and reconstructions match ours
    on fresh activations (not the calibration ones)."""
    ours, folder = _exported(lm, tmp_path, reach, skip)
    theirs = load_transcoders(folder)
    kind = type(theirs).__name__
    assert kind == ("CrossLayerTranscoder" if reach is None else "TranscoderSet")
    x = _activations(lm, _prompts(4, seed=11))  # [L, N, d] raw
    with torch.no_grad():
        yhat, codes = ours(ours.standardizer.inputs(x))
        ours_out = ours.standardizer.restore_targets(yhat)
        ours_acts = _dense(codes, F)
        their_acts = theirs.encode(x)
        if reach is None:
            their_out = theirs(x)
        else:
            their_out = theirs.decode(their_acts, x)
    assert (ours_acts != 0).any() and (ours_acts == 0).any()
    assert torch.equal(ours_acts != 0, their_acts != 0)
    assert_close(their_acts, ours_acts, atol=1e-5, rtol=1e-5)
    assert_close(their_out, ours_out, atol=1e-4, rtol=1e-5)


def test_loaded_back_model_equals_the_export(lm, tmp_path):
    """clt.convert.from_circuit_tracer reads the files back into our model class unchanged."""
    ours, folder = _exported(lm, tmp_path, None)
    back, layers, hooks = from_circuit_tracer(folder)
    assert layers == list(range(N_LAYERS)) and hooks == ("hook_mlp_in", "hook_mlp_out")
    x = _activations(lm, _prompts(4, seed=12))
    assert_close(back.reconstruct(x), ours.reconstruct(x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("reach", [None, 1], ids=["clt", "plt"])
def test_attribute_scores_equal_ours(lm, tmp_path, reach):
    """circuit-tracer's attribute() + compute_graph_scores on its replacement model of our LM
    give our native graph, nodes and scores (all layers trained, so its error nodes are ours)."""
    ours, folder = _exported(lm, tmp_path, reach)
    model = replacement_model(lm, load_transcoders(folder))
    model.tokenizer = _ByteTokenizer()  # the tiny LM reads byte ids, it has no tokenizer
    for prompt in _prompts(2, seed=21):
        graph = ct_attribute(prompt, model, batch_size=16)
        native = attribute(lm, ours, prompt, list(range(N_LAYERS)))
        assert graph.selected_features.numel() == native.n_features
        active = graph.active_features[graph.selected_features]  # [n_f, 3] layer, pos, feature
        assert torch.equal(active.cpu(), native.features)
        assert torch.equal(graph.logit_targets.cpu() if torch.is_tensor(graph.logit_targets)
                           else torch.tensor([t.vocab_idx for t in graph.logit_targets]),
                           native.logit_tokens)
        assert_close(graph.adjacency_matrix.double(), native.adjacency().double(), atol=1e-4,
                     rtol=1e-4)
        theirs = compute_graph_scores(graph)
        mine = graph_scores(native)
        assert theirs[0] == pytest.approx(mine[0], rel=1e-5)
        assert theirs[1] == pytest.approx(mine[1], rel=1e-5)
    scores = attribution_scores(lm, ours, _prompts(2, seed=21), list(range(N_LAYERS)))
    assert 0 < scores["replacement_score"] < 1
