"""Matryoshka CLTs, skip connections and MOLTs through the trainer: float64 references for the
prefix losses and every gradient, exact folding and export of skip transcoders, tiny end-to-end
runs with evaluation (the MOLT op and model have their own tests in test_molt.py)."""

from __future__ import annotations

import pytest
import torch
from _testing import (
    fit_random_standardizer,
    ref_decode_dense,
    ref_dense_activation,
    write_run_config,
)

import train
from clt.evaluate import evaluate_run
from clt.export import ExportError, export_circuit_tracer, export_run, load_exported
from clt.losses import LossWeights, auxk_fit, compute_losses, reconstruction_loss
from clt.model import Codes, CrossLayerTranscoder, codes_in_range
from clt.molt import MixtureOfLinearTransforms
from clt.trainer import load_run

L, D_IN, D_OUT, F, N = 3, 6, 5, 16, 9
BOUNDS = [2, 4, 8, 16]


def make(kind: str, reach: int | None = None, **kwargs) -> CrossLayerTranscoder:
    k = {"k": 4} if kind in ("topk", "batchtopk") else {}
    model = CrossLayerTranscoder(L, D_IN, D_OUT, F, reach=reach, nonlinearity=kind,
                                 jumprelu_init_threshold=0.05, dtype=torch.float64, **k, **kwargs)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_(0, 0.2)
        if model.W_skip is not None:
            model.W_skip.normal_(0, 0.1)
    return model


def data(d_out: int = D_OUT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, N, D_IN, generator=g, dtype=torch.float64),
            torch.randn(L, N, d_out, generator=g, dtype=torch.float64))


def test_codes_in_range_packs_the_members_in_order():
    values = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]])
    indices = torch.tensor([[[7, 1, 3, 12], [9, 8, 15, 14]]])
    part = codes_in_range(Codes(values, indices), 2, 10)
    assert part.values.tolist() == [[[1.0, 3.0], [5.0, 6.0]]]
    assert part.indices.tolist() == [[[7, 3], [9, 8]]]
    empty = codes_in_range(Codes(values, indices), 0, 1)  # no member: one padding slot
    assert empty.values.tolist() == [[[0.0], [0.0]]] and empty.indices.tolist() == [[[0], [0]]]


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("reach", [None, 1], ids=["CLT", "PLT"])
@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
def test_matryoshka_loss_and_gradients_match_explicit_prefix_decodes(kind, reach, skip):
    weights = (1.0, 0.5, 2.0, 1.0)
    model = make(kind, reach, skip=skip, prefix_bounds=BOUNDS)
    twin = make(kind, reach, skip=skip, prefix_bounds=BOUNDS)
    twin.load_state_dict(model.state_dict())
    x, y = data()
    w = LossWeights(matryoshka_weights=weights, auxk_alpha=0.0)
    out = compute_losses(model, x, y, w, step=0)
    out.total.backward()
    # reference: one dense activation, each prefix decoded densely on its own
    codes = twin.encode(x)
    A = ref_dense_activation(codes.values, codes.indices, F)
    losses, yhats = [], []
    for bound in BOUNDS:
        keep = (torch.arange(F) < bound).double()
        yhat = ref_decode_dense(A * keep, twin.W_dec, twin.b_dec, L, F, reach or L)
        if skip:
            yhat = yhat + torch.bmm(x, twin.W_skip)
        yhats.append(yhat)
        losses.append(reconstruction_loss(y, yhat))
    ref = sum(wi * li for wi, li in zip(weights, losses, strict=True)) / sum(weights)
    ref.backward()
    torch.testing.assert_close(out.terms["mse"], ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.yhat, yhats[-1], atol=1e-12, rtol=1e-12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-12, msg=name)
    # the prefixes really differ (each group holds active features)
    assert all(not torch.allclose(a, b) for a, b in zip(yhats, yhats[1:], strict=False))


def test_matryoshka_with_one_prefix_is_the_plain_loss():
    plain = make("topk")
    nested = make("topk", prefix_bounds=[F])
    nested.load_state_dict(plain.state_dict())
    x, y = data()
    a = compute_losses(plain, x, y, LossWeights(), step=0)
    b = compute_losses(nested, x, y, LossWeights(), step=0)
    torch.testing.assert_close(a.total, b.total, atol=1e-12, rtol=1e-12)


def test_bad_prefixes_are_refused():
    for bounds in ([4, 2, 16], [0, 16], [4, 8], [4, 4, 16]):
        with pytest.raises(ValueError, match="prefix_bounds"):
            make("topk", prefix_bounds=bounds)


@pytest.mark.parametrize("reach", [None, 1], ids=["CLT", "PLT"])
@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_skip_connection_output_gradient_and_fold(kind, reach):
    model = fit_random_standardizer(make(kind, reach, skip=True)).eval()
    fresh = CrossLayerTranscoder(L, D_IN, D_OUT, F, reach=reach, nonlinearity=kind, k=4,
                                 skip=True)
    assert torch.count_nonzero(fresh.W_skip) == 0
    x, _ = data()
    yhat, codes = model(x)
    assert_close = torch.testing.assert_close
    assert_close(yhat, model.decode(codes) + torch.einsum("lnd,lde->lne", x, model.W_skip))
    yhat.sum().backward()
    assert_close(model.W_skip.grad, torch.einsum("lnd,lne->lde", x, torch.ones_like(yhat)))
    x_raw = x * 2 + 1
    assert_close(model.folded_copy().reconstruct(x_raw), model.reconstruct(x_raw),
                 atol=1e-12, rtol=1e-12)


def test_skip_plt_exports_w_skip_and_the_reader_reproduces_it(tmp_path):
    model = fit_random_standardizer(CrossLayerTranscoder(
        L, D_IN, D_IN, F, reach=1, nonlinearity="jumprelu", jumprelu_init_threshold=0.05,
        skip=True, dtype=torch.float64)).eval()
    with torch.no_grad():
        model.W_skip.normal_(0, 0.2)
    out = export_circuit_tracer(model, tmp_path / "plt")
    reader = load_exported(out)
    assert reader["W_skip"][0].shape == (D_IN, D_IN)
    x_raw = torch.randn(L, N, D_IN, dtype=torch.float64)
    torch.testing.assert_close(reader["reconstruct"](x_raw), model.reconstruct(x_raw),
                               atol=1e-10, rtol=1e-10)
    clt = CrossLayerTranscoder(L, D_IN, D_IN, F, nonlinearity="relu", skip=True)
    with pytest.raises(ExportError, match="no skip connection"):
        export_circuit_tracer(clt, tmp_path / "clt")


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
def test_matryoshka_skip_clt_trains_end_to_end(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    config, run_dir = write_run_config(
        tmp_path, kind, model={"n_features": 32, "skip": True,
                               "matryoshka_prefixes": [0.125, 0.25, 0.5, 1]},
        loss={"dead_tokens": 64, "matryoshka_weights": [1, 1, 1, 2],
              **({"sparsity_coef": 0.1} if kind == "jumprelu" else {})})
    train.main([str(config)])
    cfg, model, step = load_run(run_dir)
    assert step == 8 and model.prefix_bounds == (4, 8, 16, 32)
    assert model.W_skip is not None and torch.count_nonzero(model.W_skip) > 0  # it trained


MOLT_MODEL = {"architecture": "molt", "n_features": 12, "reach": 1,
              "molt_rank_groups": [[4, 4], [2, 8]]}


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_molt_trains_end_to_end_and_has_no_export_format(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    loss = {"sparsity_coef": 0.1} if kind == "jumprelu" else {"dead_tokens": 32}
    config, run_dir = write_run_config(tmp_path, kind, model=MOLT_MODEL, loss=loss)
    train.main([str(config)])
    cfg, model, step = load_run(run_dir)
    assert isinstance(model, MixtureOfLinearTransforms) and step == 8
    assert [tuple(g) for g in model.rank_groups] == [(4, 4), (2, 8)]
    with pytest.raises(ExportError, match="no format for a MixtureOfLinearTransforms"):
        export_run(run_dir, tmp_path / "out", n_tokens=64, log=lambda *_: None)


def test_molt_auxk_decodes_the_dead_transforms_of_the_input():
    model = MixtureOfLinearTransforms(L, D_IN, D_OUT, [(3, 4), (2, 8)], k=3, dtype=torch.float64)
    with torch.no_grad():
        model.tokens_since_fired[:, [0, 5, 11]] = 1000
    x, y = data()
    weights = LossWeights(auxk_alpha=0.5, auxk_k=2, dead_tokens=100)
    out = compute_losses(model, x, y, weights, step=0)
    dead = model.dead_mask(100)
    e_aux = model.decode(x, model.auxk_codes(x, dead, 2), bias=False)
    expected = 0.5 * auxk_fit(model, dead, y, out.yhat, e_aux)
    torch.testing.assert_close(out.terms["auxk"], expected, atol=1e-12, rtol=1e-12)
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_molt_lm_run_gets_replacement_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    config, run_dir = write_run_config(tmp_path, "topk", source="lm", model=MOLT_MODEL,
                                       train={"steps": 4}, eval={"every": 4, "tokens": 64,
                                                                 "replacement_tokens": 0})
    train.main([str(config)])
    result = evaluate_run(run_dir, 64, torch.device("cpu"))
    for mode in ("open", "closed"):
        assert 0 < result[mode]["ce_repl"] < 20
        assert "replacement_score" not in result[mode]  # no attribution graph for a MOLT
    assert len(result["fvu"]) == 2
