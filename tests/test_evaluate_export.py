"""What users trace: the exported (JumpReLU) model scored next to the trained one, per-feature
threshold calibration, and optional metrics that cannot be computed reported as skipped."""

import json

import pytest
import torch
from _testing import TINY_LM, write_run_config

import train
from clt import attribution
from clt.attribution import attribution_scores
from clt.convert import (
    calibrate_thresholds,
    conversion_report,
    convert,
    from_circuit_tracer,
    trained_counts,
)
from clt.data.lm import lm_activations
from clt.data.synthetic import PlantedDictionary
from clt.evaluate import _lm_and_stream, evaluate_run, load_run, main
from clt.model import CrossLayerTranscoder


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


def _lm_run(tmp_path, kind, name, **sections):
    path, run_dir = write_run_config(
        tmp_path, kind, "lm", name=name,
        data={"lm": {**TINY_LM, "producer_thread": False}}, train={"steps": 4},
        checkpoint={"every": 4, "keep_last": 1}, **sections)
    train.main([str(path)])
    return run_dir


def test_per_feature_thresholds_match_each_features_trained_count():
    """Each feature fires on exactly as many calibration tokens as under TopK (so each layer's
    L0 too), and the held-out FVU is no worse than with one threshold per layer."""
    L = 3
    source = PlantedDictionary(n_layers=L, d_in=16, d_out=16, n_true_features=24,
                               active_per_layer=2, seed=3)
    torch.manual_seed(0)
    model = CrossLayerTranscoder(L, 16, 16, 32, nonlinearity="topk", k=4)
    model.standardizer.fit(iter(lambda: source.next_batch(512), None), 2048)
    model.eval()
    calibration = source.heldout_batches(4096, batch=1024)
    counts, n = trained_counts(model, calibration)
    assert n == 4096 and counts.sum() == 4 * 4096 * L
    theta = calibrate_thresholds(model, calibration, per_feature=True)
    assert theta.shape == (L, 32) and bool((theta > 0).all())
    assert not bool((theta == theta[:, :1]).all())  # not one value per layer
    jr = convert(model, "calibrate", calibration)  # convert's default is per feature
    assert torch.equal(jr.log_threshold, theta.log().float())
    fired = torch.zeros(L, 32, dtype=torch.int64)
    for x, _ in calibration:
        a = jr.encode(model.standardizer.inputs(x))
        fired.scatter_add_(1, a.indices.long().flatten(1), (a.values > 0).long().flatten(1))
    assert torch.equal(fired, counts)
    fresh = [source.next_batch(4096)]
    per_layer = convert(model, "calibrate", calibration, target_l0=4.0)
    fvu_feature = conversion_report(model, jr, fresh)["after"]["fvu_total"]
    fvu_layer = conversion_report(model, per_layer, fresh)["after"]["fvu_total"]
    assert fvu_feature <= fvu_layer * 1.02
    with pytest.raises(ValueError, match="per_feature=False"):
        calibrate_thresholds(model, calibration, target_l0=4.0, per_feature=True)


def test_exported_scores_equal_scores_of_the_model_loaded_back(tmp_path):
    """evaluate_run scores the trained TopK model and its export (labelled); the export's scores
    are those of the model read back from the files it writes."""
    run_dir = _lm_run(tmp_path, "topk", "topk", eval={"every": 4, "tokens": 64,
                                                      "replacement_tokens": 0})
    out = tmp_path / "export"
    result = evaluate_run(run_dir, n_tokens=64, modes=("open",), graph_prompts=3,
                          graph_prompt_tokens=9, export_dir=out)
    m = result["open"]
    assert m["graph_prompts"] == m["exported_graph_prompts"] == 3
    for key in ("replacement_score", "completeness_score"):
        assert 0 < m[f"exported_{key}"] < 1 and m[f"exported_{key}_se"] >= 0
    exported = result["exported"]
    assert exported["nonlinearity"] == "jumprelu" and len(exported["l0"]) == 2
    # per-feature calibration on these very tokens: each layer's L0 is the trained one
    assert exported["l0"] == pytest.approx(result["l0"], abs=1e-6)
    # the exported FVU is the conversion's, on the trained model's standardized targets
    cfg, model, _ = load_run(run_dir, torch.device("cpu"))
    lm, stream = _lm_and_stream(cfg, torch.device("cpu"), 4)
    x, y = lm_activations(lm, next(iter(stream)), [0, 1], "hook_mlp_in", "hook_mlp_out")
    pairs = [(x[:, :, 1:].flatten(1, 2), y[:, :, 1:].flatten(1, 2))]  # the 64 tokens used
    report = conversion_report(model, convert(model, batches=pairs), pairs)
    assert result["fvu_total"] == pytest.approx(report["before"]["fvu_total"], rel=1e-5)
    assert exported["fvu_total"] == pytest.approx(report["after"]["fvu_total"], rel=1e-5)

    back, layers, hooks = from_circuit_tracer(out)
    assert layers == [0, 1] and back.nonlinearity.kind == "jumprelu"
    lm, stream = _lm_and_stream(cfg, torch.device("cpu"), 3)
    prompts = next(iter(stream))[:, :9]
    again = attribution_scores(lm, back, prompts, layers, *hooks)
    assert again["replacement_score"] == pytest.approx(m["exported_replacement_score"], rel=1e-6)
    assert again["completeness_score"] == pytest.approx(m["exported_completeness_score"],
                                                        rel=1e-6)


def test_a_graph_that_does_not_fit_is_skipped_and_the_run_ends_as_trained(
        tmp_path, monkeypatch, capsys):
    """A dense (barely trained) JumpReLU model's graph exceeds max_edge_bytes: the final
    evaluation reports the graph scores as skipped with the reason and a hint, the CE metrics
    are still computed, nothing non-numeric is logged, and train.py returns normally."""
    monkeypatch.setattr(attribution, "MAX_EDGE_BYTES", 1000)
    run_dir = _lm_run(tmp_path, "jumprelu", "dense", model={"n_features": 32, "reach": 1},
                      eval={"every": 4, "tokens": 64, "replacement_tokens": 32,
                            "graph_prompts": 2})
    out = capsys.readouterr().out
    assert "skipped: graph scores (trained model)" in out
    assert "max_edge_bytes" in out and "fewer tokens per prompt" in out
    assert "[closed] CE recovered" in out
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for rec in logged for k, v in rec.items() if k.startswith("replacement/")}
    assert "replacement/open/ce_recovered" in final
    assert not any("score" in k for k in final)
    assert all(isinstance(v, int | float) for v in final.values())
    # the command line prints the same row and exits 0
    main([str(run_dir), "--tokens", "32", "--graph-prompts", "1"])
    assert "skipped: graph scores (trained model)" in capsys.readouterr().out
