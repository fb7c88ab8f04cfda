"""MOLT: a sparse mixture of low-rank linear transforms per layer (a transcoder alternative).

Each of ``L`` layers (any subset of the LM's layers: one row of the activations each) has a gate
encoder and ``T`` transforms ``U_t V_t`` of a few ranks. On standardized ``x [L, N, d_in]``:

    gate = nonlinearity(x @ W_enc + b_enc)                    # sparse codes, [L, N, K]
    yhat = b_dec + sum_t gate_t * U_t (V_t x)                  # [L, N, d_out], active t only

No crosslayer writes. Transforms come in rank groups ``[(rank, count), ...]`` (e.g.
:func:`molt_groups`): group ``g`` holds ``U_g [L, T_g, d_out, r_g]``, ``V_g [L, T_g, r_g, d_in]``
and the transform ids ``o_g .. o_g + T_g - 1`` in the configured order. The sparsity penalty
``tanh(c * ||U_t V_t||_F * gate_t)`` is ``clt.losses.tanh_penalty(codes, decoder_norms(), c)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import kernels
from kernels import DecoderLayout

from .model import Codes, CrossLayerTranscoder, init_encoder, init_gate_state, layer_rows

DEFAULT_RANKS = (512, 256, 128, 64, 32)


def molt_groups(n: int, ranks: Sequence[int] = DEFAULT_RANKS) -> list[tuple[int, int]]:
    """Rank groups ``[(ranks[0], n), (ranks[1], 2n), (ranks[2], 4n), ...]``: each halving of
    the rank doubles the count, so every group holds about the same number of parameters."""
    if n < 1 or not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"molt_groups needs n >= 1 and positive ranks, got n={n}, {ranks}")
    return [(int(r), n * 2**i) for i, r in enumerate(ranks)]


class MixtureOfLinearTransforms(nn.Module):
    """Sparse mixture of linear transforms over ``L`` layers.

    Parameters: gate encoder ``W_enc [L, d_in, T]``, ``b_enc [L, T]``; per rank group ``U[g]``
    ``[L, T_g, d_out, r_g]`` and ``V[g]`` ``[L, T_g, r_g, d_in]`` (``nn.ParameterList``s, state
    dict keys ``U.0``, ``V.0``, ...); ``b_dec [L, d_out]``; for JumpReLU ``log_threshold [L, T]``
    (float32). Buffers: the standardizer, ``tokens_since_fired [L, T]`` and, for BatchTopK, the
    inference ``threshold``. ``n_features`` is ``T``: the gate is a dictionary of transforms.
    """

    # The gate is a CLT encoder: the same parameters, nonlinearities, dead-feature statistics and
    # AuxK candidate search. These methods touch only W_enc, b_enc, the thresholds, the buffers
    # and decoder_norms(), so they are shared as they are rather than written twice.
    pre_activations = CrossLayerTranscoder.pre_activations
    encode = CrossLayerTranscoder.encode
    _batchtopk = CrossLayerTranscoder._batchtopk
    _with_encoder_grad = CrossLayerTranscoder._with_encoder_grad
    _update_threshold = CrossLayerTranscoder._update_threshold
    _check_inputs = CrossLayerTranscoder._check_inputs
    dead_mask = CrossLayerTranscoder.dead_mask
    update_dead_stats = CrossLayerTranscoder.update_dead_stats
    auxk_codes = CrossLayerTranscoder.auxk_codes
    auxk_candidates = CrossLayerTranscoder.auxk_candidates
    reconstruct = CrossLayerTranscoder.reconstruct
    prefix_bounds = None  # one dictionary of transforms: no Matryoshka prefixes

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        d_out: int,
        rank_groups: Sequence[tuple[int, int]],
        nonlinearity: str = "topk",
        k: int | None = None,
        batchtopk_scope: str = "layer",
        threshold_ema_decay: float = 0.99,
        rank_by_decoder_norm: bool = False,
        jumprelu_init_threshold: float = 0.1,
        jumprelu_bandwidth: float = 0.1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        groups = [(int(r), int(c)) for r, c in rank_groups]
        if not groups or any(r < 1 or c < 1 for r, c in groups):
            raise ValueError(f"rank_groups must be non-empty [(rank, count), ...] with positive "
                             f"entries, got {rank_groups}")
        n_features = sum(c for _, c in groups)
        if n_layers < 1 or d_in < 1 or d_out < 1:
            raise ValueError(f"need n_layers, d_in, d_out >= 1, got {n_layers}, {d_in}, {d_out}")
        self.rank_groups = groups
        # per layer, like a PLT: what code written for reach (AuxK's reached layers, checkpoint
        # manifests) reads; there is no W_dec row table behind it
        self.layout = DecoderLayout(n_layers, n_features, reach=1)
        factory = {"dtype": dtype, "device": device}
        init_encoder(self, n_layers, d_in, d_out, n_features, nonlinearity, k, batchtopk_scope,
                     threshold_ema_decay, rank_by_decoder_norm, jumprelu_bandwidth, factory)
        self.U = nn.ParameterList(
            [nn.Parameter(torch.empty(n_layers, c, d_out, r, **factory)) for r, c in groups]
        )
        self.V = nn.ParameterList(
            [nn.Parameter(torch.empty(n_layers, c, r, d_in, **factory)) for r, c in groups]
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, **factory))
        init_gate_state(self, jumprelu_init_threshold, device)
        self.reset_parameters()

    @property
    def reach(self) -> int:
        return 1

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``W_enc ~ U(+-1/sqrt(T))`` as a CLT's; ``V ~ U(+-1/sqrt(d_in))``,
        ``U ~ U(+-1/sqrt(r * d_out))``, biases 0.

        Why: with standardized ``x`` (unit variance per dim) each of the ``r`` coordinates of
        ``V x`` has variance 1/3, and each entry of ``U V`` has variance ``1 / (9 d_in d_out)``, so
        ``||U_t V_t||_F ~ 1/3`` and ``||U_t V_t x|| ~ 1/3`` for *every* rank: the groups start on
        an equal footing in the output and in the tanh penalty, at the scale of a per-layer
        transcoder's decoder row (``1/sqrt(3) * ||row||`` units: ``U(+-1/sqrt(d_out))`` rows have
        norm ~0.58).
        """
        bound = 1 / math.sqrt(self.n_features)
        self.W_enc.uniform_(-bound, bound)
        for (r, _), U, V in zip(self.rank_groups, self.U, self.V, strict=True):
            V.uniform_(-1 / math.sqrt(self.d_in), 1 / math.sqrt(self.d_in))
            U.uniform_(-1 / math.sqrt(r * self.d_out), 1 / math.sqrt(r * self.d_out))
        self.b_enc.zero_()
        self.b_dec.zero_()

    def transform_ranges(self) -> list[tuple[int, int]]:
        """``[lo, hi)`` transform ids of each rank group, in the configured order."""
        bounds = [0]
        for _, count in self.rank_groups:
            bounds.append(bounds[-1] + count)
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def transform_ranks(self) -> torch.Tensor:
        """``[T]`` rank of each transform id."""
        return torch.cat([torch.full((c,), r, dtype=torch.int64) for r, c in self.rank_groups])

    def decoder_norms(self) -> torch.Tensor:
        """``[L, T]`` Frobenius norms ``||U_t V_t||_F`` without forming ``U_t V_t``:
        ``||U V||_F^2 = trace((U^T U)(V V^T)) = sum((U^T U) * (V V^T))`` (both Grams symmetric),
        ``r^2 (d_in + d_out)`` FMAs per transform instead of ``r d_in d_out``. Differentiable; the
        backward keeps the two ``[L, T_g, r, r]`` Grams of each group."""
        norms = []
        for U, V in zip(self.U, self.V, strict=True):
            acc = torch.promote_types(U.dtype, torch.float32)
            U, V = U.to(acc), V.to(acc)
            utu = torch.einsum("ltor,ltos->ltrs", U, U)  # [L, T_g, r, r]
            vvt = torch.einsum("ltrd,ltsd->ltrs", V, V)
            sq = (utu * vvt).sum(dim=(-2, -1))
            # rounding can leave a zero transform's square slightly negative; tiny keeps sqrt'
            norms.append(sq.clamp_min(torch.finfo(acc).tiny).sqrt())
        return torch.cat(norms, dim=1).to(self.b_dec.dtype)

    def decode(self, x: torch.Tensor, codes: Codes, bias: bool = True,
               layer: int | None = None) -> torch.Tensor:
        """Standardized ``[L, N, d_out]`` output of the gated transforms on ``x [L, N, d_in]``.

        ``bias=False`` for AuxK (the dead transforms' output without ``b_dec``); ``layer``: the
        one layer of ``x [1, N, d_in]`` and ``codes`` (closed-loop evaluation, with
        ``encode(x, layer=...)``).
        """
        rows = slice(None) if layer is None else slice(layer, layer + 1)
        self._check_inputs(x, layer)
        Us = [layer_rows(U, layer) for U in self.U]
        Vs = [layer_rows(V, layer) for V in self.V]
        out = kernels.molt_apply(x, codes.values, codes.indices, Us, Vs,
                                 zero_slot_grad=self._window_slots(codes, rows))
        return out + layer_rows(self.b_dec, layer).unsqueeze(1) if bias else out

    def _window_slots(self, codes: Codes, rows: slice) -> bool | torch.Tensor:
        """Value-0 slots whose gradient matters: JumpReLU codes hold the entries inside the STE
        window below the threshold (value 0, gradient needed for the threshold); the other
        nonlinearities' value-0 slots pass no gradient on. Padding slots (value 0, index 0) are
        left out, so they do not pile onto transform 0 in the backward."""
        if self.nonlinearity != "jumprelu" or not torch.is_grad_enabled():
            return False
        if codes.pre is None:
            return True
        with torch.no_grad():
            idx = codes.indices.long()
            log_theta = self.log_threshold[rows]  # exp in at least fp32, as jumprelu_codes
            theta = log_theta.to(torch.promote_types(log_theta.dtype, torch.float32)).exp()
            theta = theta.gather(1, idx.flatten(1)).view_as(idx)
            # the same arithmetic as jumprelu_codes' selection, so every window slot is kept
            return codes.pre.gather(-1, idx) - theta > -self.jumprelu_bandwidth / 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Codes]:
        codes = self.encode(x)
        return self.decode(x, codes), codes
