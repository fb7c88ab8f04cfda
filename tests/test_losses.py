"""Loss terms against naive float64 formulas written here."""

import pytest
import torch

from clt.losses import (
    LossWeights,
    compute_losses,
    layer_squared_error,
    preact_loss,
    reconstruction_loss,
    sparsity_ramp,
    squared_norms,
    tanh_penalty,
    total_variance,
)
from clt.model import Codes, CrossLayerTranscoder

L, N, D, F = 2, 6, 4, 10


def test_reconstruction_loss_sums_dims_and_layers_averages_tokens():
    y, yhat = torch.randn(L, N, D, dtype=torch.float64), torch.randn(L, N, D, dtype=torch.float64)
    expected = sum(((y[l, n] - yhat[l, n]) ** 2).sum() for l in range(L) for n in range(N)) / N
    torch.testing.assert_close(reconstruction_loss(y, yhat), expected)


def fvu_per_layer(y: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
    """The FVU ``compute_losses`` reports, from the same two helpers."""
    return squared_norms(y - yhat) / total_variance(y)


def test_fvu_is_a_ratio_of_sums_not_a_mean_of_ratios():
    y = torch.randn(L, N, D, dtype=torch.float64)
    y[..., 0] *= 100  # dims with very different variance make the two definitions differ
    yhat = y + torch.randn_like(y)
    fvu = fvu_per_layer(y, yhat)
    for l in range(L):
        num = sum(((y[l, n] - yhat[l, n]) ** 2).sum() for n in range(N))
        mean = y[l].mean(dim=0)
        den = sum(((y[l, n] - mean) ** 2).sum() for n in range(N))
        torch.testing.assert_close(fvu[l], num / den)
        per_dim = ((y[l] - yhat[l]) ** 2).sum(0) / ((y[l] - mean) ** 2).sum(0)
        assert not torch.isclose(fvu[l], per_dim.mean())
    torch.testing.assert_close(fvu_per_layer(y, y), torch.zeros(L, dtype=torch.float64))
    mean_pred = y.mean(dim=1, keepdim=True).expand_as(y)
    torch.testing.assert_close(fvu_per_layer(y, mean_pred), torch.ones(L, dtype=torch.float64))


def test_tanh_penalty_uses_concatenated_decoder_norm():
    model = CrossLayerTranscoder(L, D, D, F, nonlinearity="relu", dtype=torch.float64)
    values = torch.rand(L, N, 3, dtype=torch.float64)
    values[0, 0, 2] = 0  # a padded slot
    indices = torch.randint(0, F, (L, N, 3))
    norms = model.decoder_norms()
    c = 0.7
    expected = 0.0
    for s in range(L):
        # feature f of source s writes [W_dec[s][f, 0], ..., W_dec[s][f, R_s - 1]]
        concat = model.decoder_view(s).reshape(F, -1)
        for n in range(N):
            for j in range(3):
                a, f = values[s, n, j], indices[s, n, j]
                expected += torch.tanh(c * a * concat[f].norm())
    expected /= N
    torch.testing.assert_close(tanh_penalty(Codes(values, indices), norms, c), expected)


@pytest.mark.parametrize("with_theta", [True, False], ids=["jumprelu", "relu"])
def test_preact_loss_formula(with_theta):
    pre = torch.randn(L, N, F, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(L, F, dtype=torch.float64) if with_theta else None
    norms = torch.rand(L, F, dtype=torch.float64)
    t = theta if with_theta else torch.zeros(L, F, dtype=torch.float64)
    expected = sum(
        max(0.0, float(t[l, f] - pre.detach()[l, n, f])) * float(norms[l, f])
        for l in range(L) for n in range(N) for f in range(F)
    ) / N
    loss = preact_loss(pre, theta, norms)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, pre)
    torch.testing.assert_close(grad, -(pre.detach() < t[:, None]).double() * norms[:, None] / N)
    # every input's gradient (the hand-written backward) against finite differences
    args = (pre, t.clone().requires_grad_(True), norms.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda p, th, nm: preact_loss(p, th, nm), args)


def test_sparsity_ramp():
    assert [sparsity_ramp(s, 4) for s in (0, 1, 2, 4, 9)] == [0, 0.25, 0.5, 1, 1]
    assert sparsity_ramp(0, 0) == 1


def test_compute_losses_terms_follow_the_weights():
    torch.manual_seed(0)
    x, y = torch.randn(L, N, D), torch.randn(L, N, D)
    jump = CrossLayerTranscoder(L, D, D, F, nonlinearity="jumprelu")
    w = LossWeights(sparsity_coef=0.5, sparsity_warmup_steps=10, l0_coef=0.1, preact_coef=0.2)
    out = compute_losses(jump, x, y, w, step=5)
    assert set(out.terms) == {"mse", "sparsity", "preact", "l0"}
    codes = jump.encode(x)
    ramp = 0.5
    torch.testing.assert_close(out.terms["sparsity"],
                               0.5 * ramp * tanh_penalty(codes, jump.decoder_norms(), 1.0))
    torch.testing.assert_close(out.total, sum(out.terms.values()))
    topk = CrossLayerTranscoder(L, D, D, F, nonlinearity="topk", k=2)
    assert set(compute_losses(topk, x, y, LossWeights(), step=0).terms) == {"mse"}


def test_layer_squared_error_value_and_gradients():
    """The hand-written backward against autograd's own (float64 gradcheck); no gradient to
    the target; total_variance and squared_norms against the plain formulas."""
    a = torch.randn(L, N, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(L, N, D, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer_squared_error(a, b), (a - b).pow(2).sum(dim=(1, 2)))
    assert torch.autograd.gradcheck(lambda t: layer_squared_error(t, b), (a,))
    (grad_b,) = torch.autograd.grad(layer_squared_error(a, b).sum(), b, allow_unused=True)
    assert grad_b is None
    y = torch.randn(L, N, D, dtype=torch.float64) * 3 + 5
    torch.testing.assert_close(total_variance(y), (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)))
    torch.testing.assert_close(squared_norms(y), y.pow(2).sum((1, 2)))
    y32 = y.float()  # accumulation in fp32 keeps ~1e-7 relative, not the 2e-5 of vector_norm
    torch.testing.assert_close(total_variance(y32).double(), total_variance(y), rtol=1e-6, atol=0)
