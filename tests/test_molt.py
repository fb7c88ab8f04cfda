"""MOLT: the sparse op (torch path and Triton through the interpreter) and the model.

References share no code with ``kernels/molt.py``: the gate is scattered to a dense ``[L, N, T]``
tensor and every transform is applied to every token, ``y = sum_t gate[., t] * U_t V_t x``, with
``U_t V_t`` formed explicitly. Outputs and every gradient (x, values, each U_g, each V_g) are
compared in float64 (torch path) and fp32 / bf16 (Triton), on awkward shapes: N and d not
multiples of the blocks, ranks that are not powers of two, padding slots, an all-padding row, a
transform picked twice by one token and one that no token picks.
"""

from __future__ import annotations

import math

import pytest
import torch
from _testing import assert_close

import kernels
from clt.losses import auxk_fit, tanh_penalty
from clt.model import Codes
from clt.molt import MixtureOfLinearTransforms, molt_groups
from kernels import molt as molt_mod
from kernels import molt_apply

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16

# (L, N, K, d_in, d_out, [(rank, count), ...])
SHAPES = {
    "L1-N5-K1-one-group": (1, 5, 1, 7, 6, [(3, 4)]),
    "L2-N21-K3-ranks17-5-1": (2, 21, 3, 37, 19, [(17, 2), (5, 3), (1, 4)]),
    "L3-N9-K4-ranks4-2": (3, 9, 4, 16, 16, [(4, 3), (2, 6)]),
}


def make_problem(L, N, K, d_in, d_out, groups, dtype=F64, seed=0):
    """Codes with padding (value 0, index 0), an all-padding row, a transform named twice by one
    token, and one transform (the last of group 0) that no token names; weights near the model's
    init scale so that outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(c for _, c in groups)
    unused = groups[0][1] - 1
    indices = torch.randint(0, T - 1, (L, N, K), generator=g)
    indices = torch.where(indices >= unused, indices + 1, indices)  # skip the unused id
    values = torch.rand(L, N, K, generator=g, dtype=F64) + 0.1
    values[:, 1::3, K // 2] = 0  # padding mid-row
    indices[:, 1::3, K // 2] = 0
    values[0, 0] = 0  # all-padding row
    indices[0, 0] = 0
    if K > 1:
        indices[:, 2::4, -1] = indices[:, 2::4, 0]  # the same transform twice in one row
    x = torch.randn(L, N, d_in, generator=g, dtype=F64)
    Us = [torch.randn(L, c, d_out, r, generator=g, dtype=F64) / math.sqrt(r * d_out)
          for r, c in groups]
    Vs = [torch.randn(L, c, r, d_in, generator=g, dtype=F64) / math.sqrt(d_in) for r, c in groups]
    return [t.to(dtype) for t in (x, values)], indices.to(torch.int32), \
        [t.to(dtype) for t in Us], [t.to(dtype) for t in Vs]


def dense_gate(values, indices, T):
    L, N, _ = values.shape
    return values.new_zeros(L, N, T).scatter_add(2, indices.long(), values)


def ref_molt(x, gate, Us, Vs):
    """``[L, N, d_out]``: every transform on every token, ``U_t V_t`` formed explicitly."""
    out, o = 0, 0
    for U, V in zip(Us, Vs, strict=True):
        for t in range(U.shape[1]):
            M = U[:, t] @ V[:, t]  # [L, d_out, d_in]
            out = out + gate[:, :, o + t, None] * torch.bmm(x, M.transpose(1, 2))
        o += U.shape[1]
    return out


def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


def run_op(xv, indices, Us, Vs, upstream, **kw):
    ins = leaves([*xv, *Us, *Vs])
    G = len(Us)
    y = molt_apply(ins[0], ins[1], indices, ins[2 : 2 + G], ins[2 + G :], **kw)
    return y, torch.autograd.grad(y, ins, upstream.to(y.dtype))


def run_ref(xv, indices, Us, Vs, upstream):
    ins = leaves([*xv, *Us, *Vs], F64)
    G = len(Us)
    T = sum(U.shape[1] for U in Us)
    y = ref_molt(ins[0], dense_gate(ins[1], indices, T), ins[2 : 2 + G], ins[2 + G :])
    return y, torch.autograd.grad(y, ins, upstream.to(F64))


GRAD_NAMES = ["x", "values"]


def check(got, want, groups, tol=None):
    (y, grads), (ref_y, ref_grads) = got, want
    kw = {} if tol is None else dict(atol=tol[0], rtol=tol[1])
    names = GRAD_NAMES + [f"U{g}" for g in range(len(groups))] + [f"V{g}" for g in
                                                                    range(len(groups))]
    assert_close(y, ref_y, name="y", **kw)
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_close(a, b, name=f"grad {name}", **kw)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_path_matches_dense_reference_float64(shape):
    xv, idx, Us, Vs = make_problem(*shape)
    upstream = torch.randn(shape[0], shape[1], shape[4], dtype=F64)
    got = run_op(xv, idx, Us, Vs, upstream)
    check(got, run_ref(xv, idx, Us, Vs, upstream), shape[5])


def test_gradcheck_torch_path():
    xv, idx, Us, Vs = make_problem(1, 4, 2, 5, 3, [(2, 2), (1, 2)])
    ins = leaves([*xv, *Us, *Vs])
    assert torch.autograd.gradcheck(
        lambda x, v, U0, U1, V0, V1: molt_apply(x, v, idx, [U0, U1], [V0, V1]), ins)


def test_zero_slot_grad_off_zeroes_only_the_value0_slots():
    shape = SHAPES["L2-N21-K3-ranks17-5-1"]
    xv, idx, Us, Vs = make_problem(*shape)
    upstream = torch.randn(shape[0], shape[1], shape[4], dtype=F64)
    (y, grads) = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=False)
    ref_y, ref_grads = run_ref(xv, idx, Us, Vs, upstream)
    zero = xv[1] == 0
    assert zero.any() and bool((grads[1][zero] == 0).all())
    assert bool((ref_grads[1][zero] != 0).any())  # the exact gradient there is not 0
    assert_close(grads[1][~zero], ref_grads[1][~zero], name="grad values (nonzero slots)")
    for a, b in zip([y, grads[0], *grads[2:]], [ref_y, ref_grads[0], *ref_grads[2:]],
                    strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("zero_slot_grad", [True, False], ids=["zero-slots", "live-only"])
@pytest.mark.parametrize("shape", list(SHAPES.values())[1:], ids=list(SHAPES.keys())[1:])
def test_triton_fp32_matches_reference(shape, zero_slot_grad):
    xv, idx, Us, Vs = make_problem(*shape, dtype=F32)
    upstream = torch.randn(shape[0], shape[1], shape[4])
    assert molt_mod.interpreter_on()
    got = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=zero_slot_grad)
    want = run_ref(xv, idx, Us, Vs, upstream)
    if not zero_slot_grad:
        want[1][1].masked_fill_(xv[1] == 0, 0)
    check(got, want, shape[5])


def test_triton_bf16_matches_reference():
    shape = SHAPES["L3-N9-K4-ranks4-2"]
    xv, idx, Us, Vs = make_problem(*shape, dtype=BF16)
    upstream = torch.randn(shape[0], shape[1], shape[4]).to(BF16)
    got = run_op(xv, idx, Us, Vs, upstream)
    assert got[0].dtype == BF16 and all(g.dtype == BF16 for g in got[1])
    check(got, run_ref(xv, idx, Us, Vs, upstream), shape[5])


def test_triton_writes_every_output_element(monkeypatch):
    """Every ``torch.empty`` of the Triton forward and backward is NaN (ints -1): an element a
    kernel forgot to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)

    monkeypatch.setattr(molt_mod.torch, "empty",
                        lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(molt_mod.torch, "empty_like",
                        lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))
    shape = SHAPES["L2-N21-K3-ranks17-5-1"]
    xv, idx, Us, Vs = make_problem(*shape, dtype=F32)
    upstream = torch.randn(shape[0], shape[1], shape[4])
    got = run_op(xv, idx, Us, Vs, upstream)
    monkeypatch.undo()
    check(got, run_ref(xv, idx, Us, Vs, upstream), shape[5])


def test_triton_forward_out_buffer_poisoned(poison):
    shape = SHAPES["L3-N9-K4-ranks4-2"]
    (x, v), idx, Us, Vs = make_problem(*shape, dtype=F32)
    out = poison((shape[0], shape[1], shape[4]))
    molt_mod.molt_fwd(x, v, idx, Us, Vs, out=out)
    ref = ref_molt(x.double(), dense_gate(v.double(), idx, 9), [U.double() for U in Us],
                   [V.double() for V in Vs])
    assert_close(out, ref, name="y")


def test_triton_backward_is_deterministic():
    shape = SHAPES["L3-N9-K4-ranks4-2"]
    xv, idx, Us, Vs = make_problem(*shape, dtype=F32)
    upstream = torch.randn(shape[0], shape[1], shape[4])
    a, b = run_op(xv, idx, Us, Vs, upstream), run_op(xv, idx, Us, Vs, upstream)
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(p, q) for p, q in zip(a[1], b[1], strict=True))


def test_triton_no_active_entry():
    xv, idx, Us, Vs = make_problem(1, 6, 2, 8, 5, [(3, 2)], dtype=F32)
    xv[1].zero_()
    upstream = torch.randn(1, 6, 5)
    y, grads = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=False)
    assert bool((y == 0).all()) and all(bool((g == 0).all()) for g in grads)


def test_dispatch(monkeypatch):
    """Triton for fp32 under the interpreter; torch for float64 and with CLT_FORCE_TORCH=1."""
    calls = []
    real = molt_mod.molt_fwd
    monkeypatch.setattr(molt_mod, "molt_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    (x, v), idx, Us, Vs = make_problem(1, 4, 2, 5, 3, [(2, 3)], dtype=F32)
    molt_apply(x, v, idx, Us, Vs)
    assert calls == [1]
    molt_apply(x.double(), v.double(), idx, [U.double() for U in Us], [V.double() for V in Vs])
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    molt_apply(x, v, idx, Us, Vs)
    assert calls == [1]


def test_bad_inputs_raise():
    (x, v), idx, Us, Vs = make_problem(2, 4, 2, 5, 3, [(2, 3)])
    with pytest.raises(ValueError, match=r"x must be \[L, N, d_in\]"):
        molt_apply(x[0], v, idx, Us, Vs)
    with pytest.raises(ValueError, match="codes"):
        molt_apply(x, v[:, :, :1], idx, Us, Vs)
    with pytest.raises(ValueError, match="in N"):
        molt_apply(x[:, :3], v, idx, Us, Vs)
    with pytest.raises(ValueError, match="group 0 needs U"):
        molt_apply(x, v, idx, [Us[0][:, :, :, :1]], Vs)
    with pytest.raises(ValueError, match="group 0 needs U"):
        molt_apply(x, v, idx, Us, [Vs[0][..., :4]])
    with pytest.raises(ValueError, match="one U and one V"):
        molt_apply(x, v, idx, Us, Vs + Vs)
    with pytest.raises(ValueError, match="share a dtype"):
        molt_apply(x, v, idx, [Us[0].float()], Vs)
    for bad in (3, -1):
        idx_bad = idx.clone()
        idx_bad[1, 2, 0] = bad
        with pytest.raises(ValueError, match=r"transform ids must be in \[0, 3\)"):
            molt_apply(x, v, idx_bad, Us, Vs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_triton_gpu_shape_matches_torch_path(dtype):
    """A GPT-2-small-sized layer on CUDA: Triton against the float64 torch path."""
    shape = (2, 2048, 16, 768, 768, molt_groups(4))
    xv, idx, Us, Vs = make_problem(*shape, dtype=dtype)
    move = [t.cuda() for t in (*xv, *Us, *Vs)]
    xv, Us, Vs, idx = move[:2], move[2:7], move[7:], idx.cuda()
    upstream = torch.randn(shape[0], shape[1], shape[4], device="cuda")
    got = run_op(xv, idx, Us, Vs, upstream)
    want = run_op([t.double() for t in xv], idx, [U.double() for U in Us],
                  [V.double() for V in Vs], upstream)
    check(got, want, shape[5], tol=(2e-3, 2e-3) if dtype == F32 else None)


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


def test_zero_slot_grad_mask_selects_value0_slots():
    """A bool mask: exact ``grad_values`` at the value-0 slots it names, 0 at the others."""
    shape = SHAPES["L2-N21-K3-ranks17-5-1"]
    xv, idx, Us, Vs = make_problem(*shape)
    upstream = torch.randn(shape[0], shape[1], shape[4], dtype=F64)
    zero = xv[1] == 0
    named = zero & (torch.arange(shape[1]).view(1, -1, 1) % 2 == 0)
    assert named.any() and (zero & ~named).any()
    _, grads = run_op(xv, idx, Us, Vs, upstream, zero_slot_grad=named)
    _, ref_grads = run_ref(xv, idx, Us, Vs, upstream)
    assert_close(grads[1][~zero | named], ref_grads[1][~zero | named], name="grad values")
    assert bool((grads[1][zero & ~named] == 0).all())
    with pytest.raises(ValueError, match="bool tensor shaped like values"):
        molt_apply(xv[0], xv[1], idx, Us, Vs, zero_slot_grad=named[:, :3])
