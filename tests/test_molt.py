"""The MoLT model against a dense model built from its definition: forward, every gradient, the
nonlinearities, AuxK and the tanh penalty in float64 (the op: tests/ops/test_molt.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _testing import F32, F64, assert_close, ref_molt
from _testing import ref_dense_activation as dense_gate

import kernels
from clt.losses import auxk_fit, tanh_penalty
from clt.model import Codes
from clt.molt import MixtureOfLinearTransforms, molt_groups

# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------

GROUPS = [(5, 2), (3, 3), (1, 4)]  # T = 9
L_, D_IN, D_OUT, N_ = 2, 8, 6, 11


def make_model(nonlinearity, dtype=F64, **kw):
    k = {"k": 3} if nonlinearity in ("topk", "batchtopk") else {}
    model = MixtureOfLinearTransforms(L_, D_IN, D_OUT, GROUPS, nonlinearity=nonlinearity,
                                      dtype=dtype, **k, **kw)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_()
    return model


def dense_gate_of(model, pre):
    """The gate as a dense ``[L, N, T]`` tensor, by each nonlinearity's definition."""
    if model.nonlinearity.kind == "topk":
        keep = torch.zeros_like(pre).scatter(-1, pre.topk(model.k, dim=-1).indices, 1.0)
        return torch.relu(pre) * keep
    if model.nonlinearity.kind == "batchtopk":
        flat = pre.flatten(1)
        keep = torch.zeros_like(flat).scatter(-1, flat.topk(pre.shape[1] * model.k).indices, 1.0)
        return torch.relu(pre) * keep.view_as(pre)
    if model.nonlinearity.kind == "jumprelu":  # the dense op, with its STE into the thresholds
        return kernels.jumprelu(pre, model.log_threshold, model.nonlinearity.jumprelu_bandwidth)
    return torch.relu(pre)


def dense_forward(model, x):
    pre = torch.baddbmm(model.b_enc.unsqueeze(1), x, model.W_enc)
    gate = dense_gate_of(model, pre)
    return model.b_dec.unsqueeze(1) + ref_molt(x, gate, list(model.U), list(model.V)), gate


@pytest.mark.parametrize("nonlinearity", ["topk", "batchtopk", "jumprelu", "relu"])
def test_model_forward_and_gradients_match_dense_model(nonlinearity):
    model = make_model(nonlinearity)
    if nonlinearity == "jumprelu":
        with torch.no_grad():  # thresholds near the pre-activations: some inside the window
            model.log_threshold.copy_(torch.empty_like(model.log_threshold).uniform_(-2.5, -0.5))
        model.nonlinearity.jumprelu_bandwidth = 0.3
    x = torch.randn(L_, N_, D_IN, dtype=F64, requires_grad=True)
    upstream = torch.randn(L_, N_, D_OUT, dtype=F64)
    params = [x] + [p for p in model.parameters()]
    yhat, codes = model(x)
    assert isinstance(codes, Codes) and codes.values.shape[:2] == (L_, N_)
    grads = torch.autograd.grad(yhat, params, upstream)
    ref_y, gate = dense_forward(model, x)
    ref_grads = torch.autograd.grad(ref_y, params, upstream)
    assert_close(yhat, ref_y, name="yhat")
    assert_close(dense_gate(codes.values, codes.indices, model.n_features), gate, name="gate")
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_close(a, b, name=f"grad {name}")
    if nonlinearity == "jumprelu":
        assert bool((ref_grads[names.index("log_threshold")] != 0).any())
        # the value-0 slots given a gradient: every real slot (mask_to_codes packs them to the
        # front of the row), and padding only where transform 0 itself is in the window
        inside = codes.pre - model.log_threshold.exp().unsqueeze(1) > -0.15
        real = torch.arange(codes.values.shape[2]) < inside.sum(-1, keepdim=True)
        assert (~real).any() and (codes.values[real] == 0).any()
        slots = model.nonlinearity.window_slots(model, codes, None)
        assert torch.equal(slots, real | inside[..., :1])


def test_model_triton_fp32_matches_dense_model():
    model = make_model("topk", dtype=F32)
    x = torch.randn(L_, N_, D_IN)
    yhat, _ = model(x)
    yhat.square().sum().backward()
    ref = make_model("topk", dtype=F32)
    ref.load_state_dict(model.state_dict())
    ref_y, _ = dense_forward(ref, x)
    ref_y.square().sum().backward()
    assert_close(yhat, ref_y, name="yhat")
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad, name=f"grad {name}", atol=1e-4, rtol=1e-3)


def test_decoder_norms_match_explicit_products():
    model = make_model("relu")
    norms = model.decoder_norms()
    explicit = torch.cat([torch.linalg.matrix_norm(U @ V) for U, V in zip(model.U, model.V,
                                                                             strict=True)], dim=1)
    assert norms.shape == (L_, model.n_features)
    assert_close(norms, explicit, name="||U V||_F")
    ins = [p for n, p in model.named_parameters() if n[0] in "UV"]
    w = torch.randn_like(norms)
    got = torch.autograd.grad((norms * w).sum(), ins)
    want = torch.autograd.grad((explicit * w).sum(), ins)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, name="grad of the norms")


def test_tanh_penalty_is_the_molt_penalty():
    """``sum_t tanh(c * ||U_t V_t||_F * gate_t)`` through the existing loss helper."""
    model = make_model("relu")
    x = torch.randn(L_, N_, D_IN, dtype=F64)
    _, codes = model(x)
    got = tanh_penalty(codes, model.decoder_norms(), c=2.0)
    _, gate = dense_forward(model, x)
    explicit = torch.cat([torch.linalg.matrix_norm(U @ V) for U, V in zip(model.U, model.V,
                                                                             strict=True)], dim=1)
    want = torch.tanh(2.0 * gate * explicit.unsqueeze(1)).sum(-1).mean(-1).sum()
    assert_close(got, want, name="penalty")


def test_per_layer_encode_decode_matches_forward():
    model = make_model("topk").eval()
    x = torch.randn(L_, N_, D_IN, dtype=F64)
    yhat, _ = model(x)
    for layer in range(L_):
        codes = model.encode(x[layer : layer + 1], layer=layer)
        got = model.decode(x[layer : layer + 1], codes, layer=layer)
        assert_close(got, yhat[layer : layer + 1])
    with pytest.raises(ValueError, match="layer must be in"):
        model.decode(x[:1], codes, layer=L_)


def test_auxk_through_the_loss_helper():
    """``auxk_fit`` (written for reach) takes the MOLT's per-layer decode as it is."""
    model = make_model("topk")
    dead = torch.zeros(L_, model.n_features, dtype=torch.bool)
    dead[1, [0, 6]] = True  # dead transforms in layer 1 only
    x, y = torch.randn(L_, N_, D_IN, dtype=F64), torch.randn(L_, N_, D_OUT, dtype=F64)
    yhat, _ = model(x)
    e_aux = model.decode(x, model.auxk_codes(x, dead, k_aux=2), bias=False)
    loss = auxk_fit(model, dead, y, yhat, e_aux)
    e = (y - yhat).detach()
    ratio = (e - e_aux).pow(2).sum(dim=(1, 2)) / (e - e.mean(1, keepdim=True)).pow(2).sum((1, 2))
    var_y = (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)) / N_
    assert_close(loss, ratio[1] * var_y[1], name="AuxK (layer 1 only)")


def test_auxk_codes_decode_without_bias():
    model = make_model("topk")
    dead = torch.zeros(L_, model.n_features, dtype=torch.bool)
    dead[:, [1, 4, 8]] = True
    x = torch.randn(L_, N_, D_IN, dtype=F64)
    codes = model.auxk_codes(x, dead, k_aux=2)
    assert set(codes.indices.unique().tolist()) <= {1, 4, 8}
    e_aux = model.decode(x, codes, bias=False)
    gate = dense_gate(codes.values, codes.indices, model.n_features)
    assert_close(e_aux, ref_molt(x, gate, list(model.U), list(model.V)), name="e_aux")


def test_init_scale_is_rank_independent():
    """Each rank group starts with ``||U_t V_t||_F ~ 1/3`` (see ``reset_parameters``)."""
    model = MixtureOfLinearTransforms(1, 256, 192, [(64, 4), (16, 16), (2, 64)], k=4)
    norms = model.decoder_norms()[0]
    for lo, hi in model.transform_ranges():
        assert abs(norms[lo:hi].mean().item() - 1 / 3) < 0.03
    bound = 1 / math.sqrt(model.n_features)
    assert model.W_enc.abs().max() <= bound and model.W_enc.abs().max() > 0.9 * bound


def test_molt_groups_and_attributes():
    assert molt_groups(3) == [(512, 3), (256, 6), (128, 12), (64, 24), (32, 48)]
    assert molt_groups(1, (8, 4)) == [(8, 1), (4, 2)]
    model = make_model("jumprelu")
    assert (model.n_layers, model.d_in, model.d_out, model.n_features) == (L_, D_IN, D_OUT, 9)
    assert model.transform_ranges() == [(0, 2), (2, 5), (5, 9)]
    assert model.transform_ranks().tolist() == [5, 5, 3, 3, 3, 1, 1, 1, 1]
    assert model.log_threshold.dtype == F32 and model.log_threshold.shape == (L_, 9)
    assert [tuple(U.shape) for U in model.U] == [(L_, 2, D_OUT, 5), (L_, 3, D_OUT, 3),
                                                  (L_, 4, D_OUT, 1)]
    assert model.tokens_since_fired.shape == (L_, 9)
    model.update_dead_stats(torch.tensor([[1] + [0] * 8, [0] * 9]), n_tokens=5)
    assert model.dead_mask(5).sum().item() == 17
    assert {"U.0", "V.2", "W_enc", "b_dec", "standardizer.in_std"} <= set(model.state_dict())


def test_model_bad_arguments_raise():
    with pytest.raises(ValueError, match="rank_groups"):
        MixtureOfLinearTransforms(1, 4, 4, [], k=1)
    with pytest.raises(ValueError, match="rank_groups"):
        MixtureOfLinearTransforms(1, 4, 4, [(0, 2)], k=1)
    with pytest.raises(ValueError, match="1 <= k <= n_features=2"):
        MixtureOfLinearTransforms(1, 4, 4, [(2, 2)], k=3)
    with pytest.raises(ValueError, match="nonlinearity"):
        MixtureOfLinearTransforms(1, 4, 4, [(2, 2)], nonlinearity="gelu")
    with pytest.raises(ValueError, match="molt_groups"):
        molt_groups(0)
    model = make_model("relu")
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(L_, N_, D_IN + 1, dtype=F64))
