"""Training objective of a CLT (DESIGN.md, "The math").

All terms share one normalisation so their coefficients are comparable: a sum over features and
``d_out``, a mean over tokens, a sum over layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

import kernels

from .encoder import Codes, SparseEncoder

# Cap on AuxK's k when the config leaves it unset (Gao et al. use 512).
DEFAULT_AUXK_K = 512


@dataclass(frozen=True)
class LossWeights:
    """Coefficients of the objective (the ``loss`` section of the config)."""

    sparsity_coef: float = 0.0
    sparsity_c: float = 1.0
    sparsity_warmup_steps: int = 0
    l0_coef: float = 0.0
    preact_coef: float = 0.0
    auxk_alpha: float = 1 / 32
    auxk_k: int | None = None
    dead_tokens: int = 10_000_000
    matryoshka_weights: tuple[float, ...] | None = None  # per prefix; None = equal weights
    extra: tuple[LossTerm, ...] = ()  # users' terms (loss.extra), each weighted by its coef


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    yhat: torch.Tensor
    codes: Codes
    fvu: torch.Tensor  # [L], detached
    fvu_total: torch.Tensor  # all layers' squared error over all layers' variance, detached


class _LayerSquaredError(torch.autograd.Function):
    """``[L]`` ``sum_{n, d} (a - b)^2`` per layer, differentiable in ``a`` only (``b`` is a
    target). One ``a``-sized temporary forward (``a - b``, kept for backward) and one backward;
    autograd through ``(a - b).pow(2).sum(...)`` allocates five (sub, pow, and pow's backward
    pow, mul, mul), and ``mse_loss`` three. At ``[12, 1024, 768]`` fp32 each fresh temporary is
    a 36 MiB mmap whose page faults alone cost ~7 ms on the 2-core machines here."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a - b
        ctx.save_for_backward(diff)
        return squared_norms(diff)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        return diff * (2 * grad).to(diff.dtype).view(-1, 1, 1), None


def layer_squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[L]`` squared error of ``a [L, N, d]`` against the target ``b`` (no gradient to ``b``),
    summed over tokens and ``d``."""
    return _LayerSquaredError.apply(a, b.detach())


def reconstruction_loss(y: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over ``d_out``, averaged over tokens, summed over layers: every layer
    has the same N tokens, so this is one sum over all of them divided by N."""
    return layer_squared_error(yhat, y).sum() / y.shape[1]


def matryoshka_loss(
    y: torch.Tensor, prefixes: list[torch.Tensor], weights: tuple[float, ...] | None
) -> torch.Tensor:
    """Weighted mean over the nested prefixes of each prefix's :func:`reconstruction_loss`."""
    w = weights or (1.0,) * len(prefixes)
    if len(w) != len(prefixes):
        raise ValueError(f"{len(w)} Matryoshka weights for {len(prefixes)} prefixes")
    losses = torch.stack([reconstruction_loss(y, yhat) for yhat in prefixes])
    return (losses * losses.new_tensor(w)).sum() / sum(w)


def squared_norms(t: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """``[L]`` ``sum_{n, d} (t - center)^2`` per layer (``center [L, 1, d]`` or 0), no gradient.

    One layer at a time, so each temporary is a cache-resident ``[N, d]`` slice, not a fresh
    ``t``-sized block, with ``sum``'s cascaded accumulation (a one-pass ``vector_norm`` over
    ``[1024, 768]`` loses ~2e-5 relative in fp32, ``torch.var``'s Welford pass is 7x slower)."""
    t = t.detach()
    acc = torch.promote_types(t.dtype, torch.float32)  # bf16 squares and sums in fp32

    def layer(i: int) -> torch.Tensor:
        row = t[i].to(acc)
        return (row if center is None else row - center[i]).pow(2).sum()

    return torch.stack([layer(i) for i in range(t.shape[0])])


def total_variance(y: torch.Tensor) -> torch.Tensor:
    """``[L]`` ``sum_n ||y_n - mean(y)||^2`` over the batch."""
    acc = torch.promote_types(y.dtype, torch.float32)
    return squared_norms(y, y.detach().mean(dim=1, keepdim=True, dtype=acc))


def sparsity_ramp(step: int, warmup_steps: int) -> float:
    """Linear ramp of the sparsity coefficient from 0 to 1 over ``warmup_steps`` steps."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def tanh_penalty(codes: Codes, dec_norms: torch.Tensor, c: float) -> torch.Tensor:
    """``sum_i tanh(c * a_i * ||W_dec_i||)`` from the sparse codes (padding contributes 0)."""
    norms = dec_norms.gather(1, codes.indices.long().flatten(1)).view_as(codes.values)
    return torch.tanh(c * codes.values * norms).sum(dim=-1).mean(dim=-1).sum()


def preact_loss(pre: torch.Tensor, theta: torch.Tensor | None, dec_norms: torch.Tensor):
    """``sum_i relu(theta_i - pre_i) * ||W_dec_i||`` (summed over features, averaged over
    tokens, summed over layers); ``theta = 0`` for ReLU."""
    if theta is None:
        theta = torch.zeros_like(dec_norms)
    return _PreactLoss.apply(pre, theta, dec_norms)


class _PreactLoss(torch.autograd.Function):
    """:func:`preact_loss` one layer at a time: every temporary is a cache-sized ``[N, F]`` slice
    and the backward writes one ``pre``-sized gradient. Autograd through ``relu(theta - pre) *
    norm`` allocates about seven ``[L, N, F]`` tensors (200 MB each at L=12, N=1024,
    F=4096)."""

    @staticmethod
    def forward(ctx, pre, theta, norms):
        ctx.save_for_backward(pre, theta, norms)
        acc = torch.promote_types(pre.dtype, torch.float32)
        total = pre.new_zeros((), dtype=acc)
        for i in range(pre.shape[0]):
            gap = (theta[i].to(acc) - pre[i]).clamp_min_(0)  # [N, F]
            total = total + gap.sum(dim=0) @ norms[i].to(acc)
        return (total / pre.shape[1]).to(torch.promote_types(pre.dtype, norms.dtype))

    @staticmethod
    def backward(ctx, grad):
        pre, theta, norms = ctx.saved_tensors
        need_pre, need_theta, need_norms = ctx.needs_input_grad
        acc = torch.promote_types(pre.dtype, torch.float32)
        g = grad.to(acc) / pre.shape[1]
        grad_pre = torch.empty_like(pre) if need_pre else None
        grad_theta = torch.empty_like(theta) if need_theta else None
        grad_norms = torch.empty_like(norms) if need_norms else None
        for i in range(pre.shape[0]):
            gap = theta[i].to(acc) - pre[i]  # [N, F]
            below = gap > 0
            if need_pre:  # d/dpre relu(theta - pre) * norm = -norm where theta > pre
                torch.mul(below, -g * norms[i].to(acc), out=grad_pre[i])
            if need_theta:
                grad_theta[i] = g * norms[i].to(acc) * below.sum(dim=0, dtype=acc)
            if need_norms:
                grad_norms[i] = g * gap.clamp_min_(0).sum(dim=0)
        return grad_pre, grad_theta, grad_norms


def l0_penalty(pre: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Number of active JumpReLU features, with the STE gradient into the thresholds."""
    step = kernels.jumprelu_step(pre, log_threshold, bandwidth)
    return step.sum(dim=-1).mean(dim=-1).sum()


def auxk_fit(
    model: SparseEncoder,
    dead: torch.Tensor,
    y: torch.Tensor,
    yhat: torch.Tensor,
    e_aux: torch.Tensor,
    e: torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK: the top ``k_aux`` dead features fit the detached residual ``e = y - yhat``.

    Per target layer reached by a dead feature, ``||e - e_aux||^2 / ||e - mean(e)||^2`` (e_aux is
    decoded without bias) times that layer's target variance ``||y - mean(y)||^2 / N``. The factor
    puts the term in the reconstruction loss's units: Gao et al. weigh a normalised aux loss
    against a normalised MSE; ours is unnormalised (summed over ``d_out``), so without it
    ``alpha`` would be ``~d_out`` times weaker than intended. ``e``: the residual when computed
    already.

    With data parallelism the variances are those of the whole batch (all replicas) and the
    replica's share of the numerator is scaled so that the averaged gradients equal one process's.
    """
    shard = model.shard
    e = (y - yhat).detach() if e is None else e
    has_dead = model.global_dead_count(dead) > 0  # [L] over the features of every shard
    # target t is reached from sources max(0, t - reach + 1) .. t
    reached = torch.stack([has_dead[max(0, t - model.reach + 1) : t + 1].any()
                           for t in range(model.n_layers)])
    var_e, var_y = batch_variance(e, shard), batch_variance(y.detach(), shard)
    ratio = layer_squared_error(e_aux, e) * shard.dp_size / var_e.clamp_min(1e-12)
    scale = var_y / (y.shape[1] * shard.dp_size)
    return (ratio * scale)[reached].sum()


def batch_variance(t: torch.Tensor, shard) -> torch.Tensor:
    """``[L]`` :func:`total_variance` of the batch of all data-parallel replicas (no gradient;
    ``shard``: a ``clt.encoder.Shard``)."""
    if shard.dp_size == 1:
        return total_variance(t)
    t = t.double()
    n = t.new_tensor([t.shape[1]] * t.shape[0])
    moments = shard.sum_replicas(torch.stack([t.pow(2).sum(dim=(1, 2)), n]))  # [2, L]
    s1 = shard.sum_replicas(t.sum(dim=1))  # [L, d]
    return (moments[0] - s1.pow(2).sum(dim=-1) / moments[1]).to(torch.float32)


@dataclass
class LossContext:
    """What an extra loss term sees of one micro-batch (standardized units)."""

    model: SparseEncoder
    x: torch.Tensor  # [L, N, d_in]
    y: torch.Tensor  # [L, N, d_out], the target
    yhat: torch.Tensor  # [L, N, d_out], the reconstruction
    codes: Codes  # this process's features
    step: int
    # sum over every feature shard of a per-process partial (identity in one process); a term
    # that sums over features must pass its sum through it so every process holds the total
    sum_features: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LossTerm:
    """An extra term of the objective (``loss.extra`` in the config: ``{"kind": ..., "coef":
    ..., <its fields>}``), added as ``coef * term(ctx)`` under the name ``kind``'s last part.
    Subclasses are dataclasses (their fields are the config arguments) with ``__call__``."""

    coef: float = field(default=1.0, metadata={"help": "Weight of the term, >= 0."})

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not self.coef >= 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")

    @property
    def name(self) -> str:
        return self.kind.rpartition(":")[2].rpartition(".")[2] or type(self).__name__

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        raise NotImplementedError


def compute_losses(
    model: SparseEncoder,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: LossWeights,
    step: int,
) -> LossOutput:
    """Forward pass and every loss term on standardized ``x [L, N, d_in]``, ``y [L, N, d_out]``.

    A feature-sharded model (``clt.parallel.parallelize``) sums the terms that sum over features
    over its shards (``model.shard``), so every process holds the same total."""
    dead = None
    if model.k is not None and weights.auxk_alpha > 0:  # AuxK: the TopK family
        dead = model.dead_mask(weights.dead_tokens)
    # main and AuxK share one encoder op (TopK) and one decode: one gradient each
    codes, aux = model.encode_with_aux(x, dead, weights.auxk_k or DEFAULT_AUXK_K)
    prefixes, e_aux = model.outputs(x, codes, aux)
    yhat = prefixes[-1]
    if len(prefixes) == 1:
        terms = {"mse": reconstruction_loss(y, yhat)}
    else:
        terms = {"mse": matryoshka_loss(y, prefixes, weights.matryoshka_weights)}
    nl = model.nonlinearity
    needs_norms = weights.sparsity_coef > 0 or nl.needs_decoder_norms(weights)
    dec_norms = model.decoder_norms() if needs_norms else None
    ramp = sparsity_ramp(step, weights.sparsity_warmup_steps)
    if weights.sparsity_coef > 0:
        penalty = tanh_penalty(codes, dec_norms, weights.sparsity_c)
        terms["sparsity"] = weights.sparsity_coef * ramp * model.shard.sum_features(penalty)
    terms.update(nl.loss_terms(model, codes, weights, ramp, dec_norms))
    e = (y - yhat).detach()  # the residual: AuxK's target and the FVU's numerator
    if e_aux is not None:  # None when no feature is dead
        terms["auxk"] = weights.auxk_alpha * auxk_fit(model, dead, y, yhat, e_aux, e)
    if weights.extra:
        ctx = LossContext(model, x, y, yhat, codes, step, model.shard.sum_features)
        for term in weights.extra:
            terms[term.name] = term.coef * term(ctx)
    total = torch.stack(list(terms.values())).sum()
    sq_err, var_y = squared_norms(e), total_variance(y)
    return LossOutput(total=total, terms=terms, yhat=yhat, codes=codes, fvu=sq_err / var_y,
                      fvu_total=sq_err.sum() / var_y.sum())
