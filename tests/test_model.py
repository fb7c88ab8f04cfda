"""CrossLayerTranscoder against dense float64 references: init, layout, every nonlinearity's
forward and gradients, AuxK, dead-feature state, BatchTopK thresholds, standardization folding."""

import math

import pytest
import torch
from _testing import fit_random_standardizer

from clt.losses import DEFAULT_AUXK_K, LossWeights, auxk_fit, compute_losses
from clt.model import CrossLayerTranscoder
from clt.standardize import RunningMoments, Standardizer

L, D_IN, D_OUT, F = 3, 6, 5, 12


def make(kind="topk", reach=None, dtype=torch.float64, **kw):
    k = kw.pop("k", 3) if kind in ("topk", "batchtopk") else None
    return CrossLayerTranscoder(L, D_IN, D_OUT, F, reach=reach, nonlinearity=kind, k=k,
                                dtype=dtype, **kw)


def dense_decoder(model):
    """``[L_source, F, L_target, d_out]`` dense crosslayer decoder built row by row from the
    layout formula ``row = F * P_s + f * R_s + (t - s)``, zero where ``t`` is out of reach."""
    W = model.W_dec
    dense = W.new_zeros(L, F, L, D_OUT)
    offset = 0
    for s in range(L):
        R_s = min(model.reach, L - s)
        for f in range(F):
            for r in range(R_s):
                dense[s, f, s + r] = W[offset + f * R_s + r]
        offset += F * R_s
    return dense


def dense_activation(model, x):
    """Dense float64 reference of each nonlinearity: ``[L, N, F]``."""
    pre = torch.einsum("lnd,ldf->lnf", x, model.W_enc) + model.b_enc[:, None]
    if model.nonlinearity.kind == "topk":
        idx = pre.detach().topk(model.k, dim=-1).indices
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, True)
        return torch.relu(pre) * mask
    if model.nonlinearity.kind == "batchtopk":
        flat = pre.detach().reshape(L, -1)
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
        n_keep = x.shape[1] * model.k
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :n_keep], True)
        return torch.relu(pre) * mask.view_as(pre)
    if model.nonlinearity.kind == "jumprelu":
        theta = model.log_threshold.exp()[:, None]
        eps = model.nonlinearity.jumprelu_bandwidth
        # pre * H(pre - theta) plus a zero-valued term whose theta-derivative is the STE's
        # -(theta/eps) * rect((pre - theta)/eps); H itself has no gradient
        step = (pre > theta).to(pre.dtype)
        rect = ((pre - theta).abs() < eps / 2).to(pre.dtype)
        ste = -(theta.detach() / eps) * rect * (theta - theta.detach())
        return pre * step + ste
    return torch.relu(pre)


def dense_reference(model, x):
    a = dense_activation(model, x)
    return torch.einsum("snf,sftd->tnd", a, dense_decoder(model)) + model.b_dec[:, None]


def test_init_bounds_and_dtypes():
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(4, 32, 24, 256, nonlinearity="jumprelu", dtype=torch.bfloat16)
    plt_ = CrossLayerTranscoder(4, 32, 24, 256, reach=1, nonlinearity="relu")
    assert clt.W_enc.abs().max() <= 1 / math.sqrt(256)
    assert clt.W_enc.float().std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)
    assert clt.W_dec.float().abs().max() <= 1 / math.sqrt(4 * 24) + 1e-3
    assert clt.W_dec.float().abs().max() > 0.9 / math.sqrt(4 * 24)
    assert plt_.W_dec.abs().max() <= 1 / math.sqrt(24)
    assert plt_.W_dec.abs().max() > 0.9 / math.sqrt(24)
    assert clt.b_enc.abs().sum() == 0 and clt.b_dec.abs().sum() == 0
    # thresholds stay float32 under bf16 weights
    assert clt.log_threshold.dtype == torch.float32 and clt.W_enc.dtype == torch.bfloat16
    assert torch.allclose(clt.log_threshold.exp(), torch.tensor(0.1))


@pytest.mark.parametrize("reach", [None, 1, 2], ids=["CLT", "PLT", "R2"])
def test_decoder_is_one_parameter_with_per_source_views(reach):
    model = make(reach=reach)
    R = model.reach
    assert model.W_dec.shape == (F * sum(min(R, L - s) for s in range(L)), D_OUT)
    for s in range(L):
        view = model.decoder_view(s)
        assert view.shape == (F, min(R, L - s), D_OUT)
        assert view.untyped_storage().data_ptr() == model.W_dec.untyped_storage().data_ptr()
        assert view.is_contiguous()


@pytest.mark.parametrize("reach", [None, 1, 2], ids=["CLT", "PLT", "R2"])
@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "relu"])
def test_forward_and_gradients_match_dense_reference(kind, reach):
    torch.manual_seed(1)
    model = make(kind, reach=reach, jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.4)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_()
        if kind == "jumprelu":
            model.log_threshold.add_(torch.randn(L, F) * 0.3)
    x = torch.randn(L, 7, D_IN, dtype=torch.float64)
    grad_out = torch.randn(L, 7, D_OUT, dtype=torch.float64)
    params = [p for p in model.parameters()]

    yhat, codes = model(x)
    grads = torch.autograd.grad((yhat * grad_out).sum(), params)
    ref = dense_reference(model, x)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), params)

    torch.testing.assert_close(yhat, ref, atol=1e-12, rtol=1e-10)
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads, strict=True):
        # log_threshold is float32 by design: its gradient is compared at float32 tolerance
        tol = {"atol": 1e-12, "rtol": 1e-10} if g.dtype == torch.float64 else {}
        torch.testing.assert_close(g, rg, **tol, msg=f"grad of {name}")
    if kind == "jumprelu":
        assert grads[-1].abs().sum() > 0, "threshold gradient must not vanish in this setup"


def test_topk_family_keeps_no_dense_tensor_for_backward():
    model = make("topk", dtype=torch.float32)
    N = 64  # N * F > every parameter, so a saved [L, N, F] tensor is recognisable
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(L, N, D_IN)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compute_losses(model, x, torch.randn(L, N, D_OUT),
                             LossWeights(sparsity_coef=0.1), step=1)
    out.total.backward()
    assert saved and all(math.prod(s) < L * N * F for s in saved), saved


def test_input_shape_error_names_the_shape():
    with pytest.raises(ValueError, match=r"\[L=3, N, d_in=6\]"):
        make()(torch.randn(3, 4, 7, dtype=torch.float64))


def test_dead_stats_count_tokens_and_reset_on_fire():
    model = make("topk", k=2)
    x = torch.randn(L, 10, D_IN, dtype=torch.float64)
    _, codes = model(x)
    model.update_dead_stats(codes.fire_counts(F), 10)
    fired = codes.fire_counts(F) > 0
    assert (model.tokens_since_fired[fired] == 0).all()
    assert (model.tokens_since_fired[~fired] == 10).all()
    model.update_dead_stats(codes.fire_counts(F), 10)
    assert (model.tokens_since_fired[~fired] == 20).all()
    assert torch.equal(model.dead_mask(20), ~fired)


def test_batchtopk_threshold_ema_and_inference():
    model = make("batchtopk", k=2, threshold_ema_decay=0.5)
    x1, x2 = (torch.randn(L, 16, D_IN, dtype=torch.float64) for _ in range(2))

    def smallest_kept(x):
        pre = model.pre_activations(x).detach().reshape(L, -1)
        return pre.topk(16 * 2, dim=1).values[:, -1].clamp(min=0).float()

    model(x1)
    torch.testing.assert_close(model.threshold, smallest_kept(x1))
    model(x2)
    torch.testing.assert_close(model.threshold, 0.5 * smallest_kept(x1) + 0.5 * smallest_kept(x2))
    model.eval()
    _, codes = model(x1)
    pre = model.pre_activations(x1)
    expected = (pre > model.threshold.view(L, 1, 1)).sum(-1)
    assert torch.equal((codes.values > 0).sum(-1), expected)


def auxk_loss(model, x, y, yhat, weights):
    """The AuxK term alone: the top k_aux dead features fit the residual, decoded bias-free."""
    dead = model.dead_mask(weights.dead_tokens)
    codes = model.auxk_codes(x, dead, weights.auxk_k or DEFAULT_AUXK_K)
    if codes is None:
        return None
    return auxk_fit(model, dead, y, yhat, model.decode(codes, bias=False))


def test_auxk_absent_when_nothing_dead():
    model = make("topk")
    x = torch.randn(L, 8, D_IN, dtype=torch.float64)
    y = torch.randn(L, 8, D_OUT, dtype=torch.float64)
    out = compute_losses(model, x, y, LossWeights(dead_tokens=1), step=0)
    assert "auxk" not in out.terms
    yhat, _ = model(x)
    assert auxk_loss(model, x, y, yhat, LossWeights(dead_tokens=1)) is None


@pytest.mark.parametrize("reach", [None, 1], ids=["CLT", "PLT"])
def test_auxk_matches_dense_formula_on_dead_features_only(reach):
    torch.manual_seed(3)
    model = make("topk", reach=reach)
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[0, [1, 4, 5, 9]] = True  # only layer 0 has dead features
    model.tokens_since_fired[dead] = 100
    weights = LossWeights(dead_tokens=100, auxk_k=2)
    N = 9
    x = torch.randn(L, N, D_IN, dtype=torch.float64)
    y = torch.randn(L, N, D_OUT, dtype=torch.float64)
    yhat = dense_reference(model, x).detach()

    loss = auxk_loss(model, x, y, yhat, weights)
    grads = torch.autograd.grad(loss, [model.W_enc, model.W_dec])

    # dense reference: pre on all columns, -inf on live ones, top-2, decode without bias
    pre = torch.einsum("lnd,ldf->lnf", x, model.W_enc) + model.b_enc[:, None]
    masked = pre.masked_fill(~dead[:, None], -math.inf)
    idx = masked.detach().topk(2, dim=-1).indices
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, True) & dead[:, None]
    a = torch.relu(pre) * keep
    e = y - yhat
    e_aux = torch.einsum("snf,sftd->tnd", a, dense_decoder(model))
    var = lambda t: (t - t.mean(1, keepdim=True)).pow(2).sum((1, 2))  # noqa: E731
    reached = [0] if reach == 1 else list(range(L))
    ref = sum((e - e_aux)[t].pow(2).sum() / var(e)[t] * var(y)[t] / N for t in reached)
    ref_grads = torch.autograd.grad(ref, [model.W_enc, model.W_dec])

    torch.testing.assert_close(loss, ref)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)
    live_cols = grads[0][0][:, ~dead[0]]
    assert live_cols.abs().sum() == 0 and grads[0][1:].abs().sum() == 0


@pytest.mark.parametrize("sizes", [[5, 1, 17, 3], [64], [2, 2, 2, 2, 2]], ids=str)
def test_running_moments_match_two_pass_float64(sizes):
    data = torch.randn(L, sum(sizes), 4, dtype=torch.float64) * 1e-2 + 1e4
    moments = RunningMoments()
    for chunk in data.split(sizes, dim=1):
        moments.update(chunk)
    mean, std = moments.mean_std()
    var, ref_mean = torch.var_mean(data, dim=1, unbiased=False)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(std, var.sqrt(), rtol=1e-9, atol=0)


def test_constant_dimension_gets_unit_std():
    moments = RunningMoments()
    data = torch.randn(1, 50, 3, dtype=torch.float64)
    data[..., 1] = 7.0
    moments.update(data)
    mean, std = moments.mean_std()
    assert std[0, 1] == 1 and mean[0, 1] == 7


def test_standardizer_fit_stops_and_reports_errors():
    st = Standardizer(L, D_IN, D_OUT)
    batches = [(torch.randn(L, 10, D_IN), torch.randn(L, 10, D_OUT)) for _ in range(5)]
    assert st.fit(iter(batches), 25) == 30 and bool(st.fitted) and int(st.n_tokens) == 30
    with pytest.raises(ValueError, match="ran out after 50 of 100"):
        Standardizer(L, D_IN, D_OUT).fit(iter(batches), 100)
    with pytest.raises(ValueError, match="in_mean"):
        Standardizer(L, D_IN + 1, D_OUT).fit(iter(batches), 10)


fitted = fit_random_standardizer


@pytest.mark.parametrize("reach", [None, 1, 2], ids=["CLT", "PLT", "R2"])
@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "relu"])
def test_folding_standardization_is_exact(kind, reach):
    model = fitted(make(kind, reach=reach, dtype=torch.float64)).eval()
    model.threshold.fill_(0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_raw = torch.randn(L, 11, D_IN, dtype=torch.float64) * 2 + 1
    folded = model.folded_copy()
    torch.testing.assert_close(folded.reconstruct(x_raw), model.reconstruct(x_raw),
                               atol=1e-12, rtol=1e-12)
    _, codes = model(model.standardizer.inputs(x_raw))
    _, codes_f = folded(x_raw)
    assert torch.equal(codes.indices, codes_f.indices)
    assert (folded.standardizer.in_std == 1).all() and (folded.standardizer.out_mean == 0).all()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"folding modified the original {name}"


def test_folding_refuses_decoder_norm_ranking():
    with pytest.raises(ValueError, match="decoder norm"):
        make("topk", rank_by_decoder_norm=True).folded_copy()


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "relu"])
def test_encoding_one_layer_matches_the_full_encode_at_inference(kind):
    model = make(kind, rank_by_decoder_norm=kind == "topk").eval()
    model.threshold.fill_(0.1)
    x = torch.randn(L, 9, D_IN, dtype=torch.float64)
    full = model.encode(x)
    for i in range(L):
        one = model.encode(x[i : i + 1], layer=i)
        K = one.values.shape[-1]
        torch.testing.assert_close(one.values[0], full.values[i, :, :K])
        assert (full.values[i, :, K:] == 0).all()
        active = one.values[0] != 0
        assert torch.equal(one.indices[0][active].long(), full.indices[i, :, :K][active].long())
    with pytest.raises(ValueError, match="global BatchTopK"):
        make("batchtopk", batchtopk_scope="global").encode(x[:1], layer=0)
