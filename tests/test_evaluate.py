"""Replacement-model evaluation: exact and zero transcoders, KL direction, BOS, runs and the CLI."""

import math
from pathlib import Path

import pytest
import torch
from _testing import TINY_LM, write_run_config

import train
from clt.data.lm import hook_names, lm_activations, load_lm
from clt.evaluate import kl_divergence, main, replacement_metrics
from clt.model import CrossLayerTranscoder

LAYERS = [0, 1, 2]
BOS = 256


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    """Evaluation logic is under test, not the kernels: use the fast torch paths."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny", tiny={"n_layers": 3, "d_model": 32, "d_mlp": 64, "n_ctx": 16})


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 256, (4, 16), generator=gen)
    toks[:, 0] = BOS
    return toks


class MLPTranscoder:
    """An exact per-layer "transcoder": the LM's own MLP applied to its input ``hook_resid_mid``
    (the tiny model has pre-LN blocks: ``hook_mlp_out = mlp(ln2(resid_mid))``), times ``scale``."""

    def __init__(self, lm, layers, scale=1.0):
        self.lm, self.layers, self.scale = lm, layers, scale

    def reconstruct(self, x):
        blocks = [self.lm.blocks[layer] for layer in self.layers]
        return torch.stack([b.mlp(b.ln2(x[i])) * self.scale for i, b in enumerate(blocks)])


class LookupTranscoder:
    """Returns the cached true MLP outputs, after checking it was given the true inputs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def reconstruct(self, x):
        assert torch.equal(x, self.x)
        return self.y.clone()


class ZeroTranscoder:
    def __init__(self, d_out):
        self.d_out = d_out

    def reconstruct(self, x):
        return x.new_zeros(x.shape[0], x.shape[1], self.d_out)


def test_exact_lookup_open_loop_matches_the_lm(lm, tokens):
    x, y = lm_activations(lm, tokens, LAYERS, "hook_mlp_in", "hook_mlp_out")
    stub = LookupTranscoder(x[:, :, 1:].flatten(1, 2), y[:, :, 1:].flatten(1, 2))
    m = replacement_metrics(lm, stub, tokens, LAYERS, mode="open")
    assert m["ce_delta"] == 0 and m["kl"] == 0 and m["top1_agreement"] == 1
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-12)
    assert m["ce_zero"] != m["ce_orig"]
    assert m["n_positions"] == 4 * 14  # predictions at positions 1..T-2


@pytest.mark.parametrize("mode", ["open", "closed"])
@pytest.mark.parametrize("layers", [LAYERS, [1, 2]])
def test_exact_mlp_transcoder_both_modes(lm, tokens, mode, layers):
    m = replacement_metrics(lm, MLPTranscoder(lm, layers), tokens, layers, mode=mode,
                            batch_size=3)
    assert abs(m["ce_delta"]) < 1e-6 and abs(m["kl"]) < 1e-9
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["top1_agreement"] == 1.0


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_zero_transcoder_recovers_nothing(lm, tokens, mode):
    m = replacement_metrics(lm, ZeroTranscoder(32), tokens, LAYERS, mode=mode)
    assert m["ce_repl"] == m["ce_zero"]
    assert m["ce_recovered"] == 0
    assert m["kl"] > 0 and m["top1_agreement"] < 1


def test_kl_direction_hand_computed():
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.1],
                                                                       dtype=torch.float64)
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert float(kl_divergence(p.log(), q.log())) == pytest.approx(kl_pq, rel=1e-12)
    assert float(kl_divergence(q.log() + 3.0, p.log())) == pytest.approx(kl_qp, rel=1e-12)
    assert abs(kl_pq - kl_qp) > 0.1


def test_reported_kl_is_original_against_replacement(lm, tokens):
    """The metric uses P_original as the reference: recompute it from the two runs' logits."""
    _, out_names = zip(*(hook_names(layer, "hook_mlp_in", "hook_mlp_out") for layer in LAYERS),
                       strict=True)

    def zero(value, hook):
        value = value.clone()
        value[:, 1:] = 0
        return value

    with torch.no_grad():
        orig = lm(tokens)[:, 1:-1]
        repl = lm.run_with_hooks(tokens, fwd_hooks=[(n, zero) for n in out_names])[:, 1:-1]
    m = replacement_metrics(lm, ZeroTranscoder(32), tokens, LAYERS, mode="open")
    forward = float(kl_divergence(orig, repl).mean())
    backward = float(kl_divergence(repl, orig).mean())
    assert m["kl"] == pytest.approx(forward, rel=1e-9)
    assert abs(forward - backward) > 1e-3 * forward


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_bos_position_is_untouched(lm, tokens, mode):
    seen = []
    for layer in LAYERS:
        lm.add_hook(f"blocks.{layer}.hook_resid_post",
                    lambda value, hook: seen.append((hook.name, value.clone())), is_permanent=True)
    try:
        replacement_metrics(lm, ZeroTranscoder(32), tokens, LAYERS, mode=mode)
    finally:
        lm.reset_hooks(including_permanent=True)
    runs = {}
    for name, value in seen:
        runs.setdefault(name, []).append(value)
    for values in runs.values():
        original = values[0]
        assert len(values) == 3  # original, zero-ablated, replacement
        for patched in values[1:]:
            assert torch.equal(patched[:, 0], original[:, 0])
            assert not torch.allclose(patched[:, 1:], original[:, 1:])


def _closed_loop_reference(lm, clt, tokens, layers):
    """Closed loop the slow way: one forward per layer, each patched with all earlier outputs."""
    in_names, out_names = zip(*(hook_names(layer, "hook_mlp_in", "hook_mlp_out")
                                for layer in layers), strict=True)
    B, T = tokens.shape
    xs, ys = [], []

    def patch(i):
        def fn(value, hook):
            value = value.clone()
            value[:, 1:] = ys[i].unflatten(0, (B, T - 1))
            return value
        return fn

    with torch.no_grad():
        for i in range(len(layers)):
            hooks = [(out_names[j], patch(j)) for j in range(i)]
            with lm.hooks(fwd_hooks=hooks):
                _, cache = lm.run_with_cache(tokens, names_filter=in_names[i])
            xs.append(cache[in_names[i]][:, 1:].flatten(0, 1))
            x = torch.stack(xs + [torch.zeros_like(xs[0])] * (len(layers) - i - 1))
            ys.append(clt.reconstruct(x)[i])
        hooks = [(out_names[j], patch(j)) for j in range(len(layers))]
        return lm.run_with_hooks(tokens, fwd_hooks=hooks)


def test_closed_loop_compounds_and_matches_a_layer_by_layer_reference(lm, tokens):
    clt = CrossLayerTranscoder(3, 32, 32, 16, nonlinearity="topk", k=4).eval()
    with torch.no_grad():
        clt.b_dec.normal_()
    open_m = replacement_metrics(lm, clt, tokens, LAYERS, mode="open")
    closed = replacement_metrics(lm, clt, tokens, LAYERS, mode="closed")
    assert closed["ce_repl"] != pytest.approx(open_m["ce_repl"], rel=1e-4)
    ref = _closed_loop_reference(lm, clt, tokens, LAYERS)
    with torch.no_grad():
        orig = lm(tokens)
    assert closed["kl"] == pytest.approx(float(kl_divergence(orig[:, 1:-1],
                                                             ref[:, 1:-1]).mean()), rel=1e-5)
    # a half-scale exact transcoder: closed loop differs from open loop (errors compound)
    half = MLPTranscoder(lm, LAYERS, scale=0.5)
    assert (replacement_metrics(lm, half, tokens, LAYERS, mode="closed")["kl"]
            != pytest.approx(replacement_metrics(lm, half, tokens, LAYERS, mode="open")["kl"]))


class Wrapped:
    """Hides the model's type: replacement_metrics then takes its generic ``reconstruct`` path."""

    def __init__(self, model):
        self.reconstruct = model.reconstruct


@pytest.mark.parametrize("kind, options", [
    ("topk", {"k": 3, "rank_by_decoder_norm": True}), ("topk", {"k": 5, "reach": 2}),
    ("batchtopk", {"k": 3, "batchtopk_scope": "layer"}), ("batchtopk", {"k": 3,
                                                                      "batchtopk_scope": "global"}),
    ("jumprelu", {"jumprelu_init_threshold": 0.2}), ("relu", {"reach": 1}),
])
def test_closed_loop_fast_path_matches_generic_reconstruct(lm, tokens, kind, options):
    clt = CrossLayerTranscoder(3, 32, 32, 16, nonlinearity=kind, **options)
    with torch.no_grad():
        clt.b_dec.normal_()
        clt.b_enc.normal_(0.2)
        clt.threshold.fill_(0.3)
        st = clt.standardizer
        st.in_mean.normal_(0, 0.1), st.in_std.uniform_(0.5, 2)
        st.out_mean.normal_(0, 0.1), st.out_std.uniform_(0.5, 2)
    generic = replacement_metrics(lm, Wrapped(clt.eval()), tokens, LAYERS, mode="closed")
    clt.train()  # replacement_metrics switches to inference mode and back

    def no_full_reconstruct(x):
        raise AssertionError("the fast path must not reconstruct all layers")

    clt.reconstruct = no_full_reconstruct
    fast = replacement_metrics(lm, clt, tokens, LAYERS, mode="closed")
    assert clt.training
    for key in ("ce_repl", "kl", "top1_agreement"):
        assert fast[key] == pytest.approx(generic[key], rel=1e-5, abs=1e-9), key
    assert fast["kl"] > 0


# ---- evaluate_run and the command line -----------------------------------------------------


def _train_run(tmp_path: Path, name: str, k: int) -> Path:
    path, run_dir = write_run_config(
        tmp_path, "topk", "lm", name=name, nonlinearity={"k": k},
        data={"lm": {**TINY_LM, "producer_thread": False}}, train={"steps": 4},
        eval={"every": 4, "tokens": 64, "replacement_tokens": 0},
        checkpoint={"every": 4, "keep_last": 1})
    train.main([str(path)])
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLT_FORCE_TORCH", "1")
        return _train_run(tmp, "k2", 2), _train_run(tmp, "k6", 6)


def test_evaluate_run_on_a_tiny_run(runs):
    from clt.evaluate import evaluate_run

    result = evaluate_run(runs[0], n_tokens=64)
    assert result["step"] == 4 and result["tokens"] == 64  # 4 sequences of 16 non-BOS tokens
    assert len(result["fvu"]) == len(result["l0"]) == 2
    assert all(0 < v <= 2 for v in result["l0"])
    assert 0 < result["fvu_total"] < 10
    for mode in ("open", "closed"):
        m = result[mode]
        assert m["n_positions"] == 4 * 15 and m["kl"] >= 0 and 0 <= m["top1_agreement"] <= 1
        assert m["ce_delta"] == pytest.approx(m["ce_repl"] - m["ce_orig"])
    # graph scores: the first eval.graph_prompts (4) held-out sequences (all 17 tokens of each)
    assert "replacement_score" not in result["closed"]
    assert result["open"]["graph_prompts"] == 4
    assert 0 < result["open"]["replacement_score"] < 1
    assert 0.5 < result["open"]["completeness_score"] < 1


def test_evaluate_run_graph_scores_are_the_mean_over_held_out_prompts(runs):
    from clt.attribution import attribute, graph_scores
    from clt.evaluate import _lm_and_stream, evaluate_run, load_run

    result = evaluate_run(runs[0], n_tokens=16, modes=("open",), graph_prompts=6,
                          graph_prompt_tokens=9)
    cfg, model, _ = load_run(runs[0], torch.device("cpu"))
    lm, stream = _lm_and_stream(cfg, torch.device("cpu"), 6)
    prompts = next(iter(stream))[:, :9]
    assert prompts.shape == (6, 9) and (prompts[:, 0] == BOS).all()
    scores = [graph_scores(attribute(lm, model, p, [0, 1])) for p in prompts]
    assert result["open"]["graph_prompts"] == 6
    assert result["open"]["replacement_score"] == pytest.approx(
        sum(r for r, _ in scores) / 6, rel=1e-6)
    assert result["open"]["completeness_score"] == pytest.approx(
        sum(c for _, c in scores) / 6, rel=1e-6)
    none = evaluate_run(runs[0], n_tokens=16, modes=("open",), graph_prompts=0)
    assert "replacement_score" not in none["open"]


@pytest.mark.parametrize("name, model, output_hook, graph", [
    ("sae", {"reach": 1}, "hook_mlp_in", False),
    ("skip-plt", {"reach": 1, "skip": True}, "hook_mlp_out", True),
])
def test_evaluate_run_graph_scores_by_kind(tmp_path, name, model, output_hook, graph):
    """An SAE's features write its input hook, not the MLP outputs: no attribution graph. A
    skip connection is a linear path of the graph's model: scores."""
    from clt.evaluate import evaluate_run

    path, run_dir = write_run_config(
        tmp_path, "topk", "lm", name=name, model={"n_features": 32, **model},
        data={"lm": {**TINY_LM, "producer_thread": False, "output_hook": output_hook}},
        train={"steps": 2}, eval={"every": 2, "tokens": 64, "replacement_tokens": 0},
        checkpoint={"every": 2, "keep_last": 1})
    train.main([str(path)])
    result = evaluate_run(run_dir, n_tokens=16, modes=("open",), graph_prompts=2)
    assert "ce_repl" in result["open"]
    assert ("replacement_score" in result["open"]) == graph


def test_cli_table_compare_and_errors(runs, tmp_path, capsys):
    main([str(runs[0]), "--tokens", "32"])
    out = capsys.readouterr().out
    for label in ("FVU total", "FVU layer 1", "L0 layer 0", "[open] CE recovered",
                  "[closed] KL(orig || repl)", "[closed] top-1 agreement", "delta CE",
                  "[open] graph replacement score", "[open] graph completeness score"):
        assert label in out
    assert "[closed] graph" not in out
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "k2"] and set(lines[1]) == {"-", " "}

    main(["--compare", str(runs[0]), str(runs[1]), "--tokens", "32", "--graph-prompts", "0"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["metric", "k2", "k6"]
    assert "graph" not in out
    for bad in (["--graph-prompts", "-1"], ["--graph-tokens", "1"]):
        with pytest.raises(SystemExit) as exc:
            main([str(runs[0]), *bad])
        assert exc.value.code == 2 and bad[0] in capsys.readouterr().err

    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text((runs[0] / "config.json").read_text())
    for bad, why in ((tmp_path / "nowhere", "no such run folder"),
                     (tmp_path, "no such config file"), (no_checkpoint, "no checkpoint")):
        with pytest.raises(SystemExit) as exc:
            main([str(bad)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["--compare", str(runs[0]), str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "nowhere" in capsys.readouterr().err
