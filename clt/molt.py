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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import kernels

from .encoder import Architecture, Codes, SparseEncoder, layer_rows
from .nonlinearities import Nonlinearity, make_nonlinearity

DEFAULT_RANKS = (512, 256, 128, 64, 32)


def molt_groups(n: int, ranks: Sequence[int] = DEFAULT_RANKS) -> list[tuple[int, int]]:
    """Rank groups ``[(ranks[0], n), (ranks[1], 2n), (ranks[2], 4n), ...]``: each halving of
    the rank doubles the count, so every group holds about the same number of parameters."""
    if n < 1 or not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"molt_groups needs n >= 1 and positive ranks, got n={n}, {ranks}")
    return [(int(r), n * 2**i) for i, r in enumerate(ranks)]


class MixtureOfLinearTransforms(SparseEncoder):
    """Sparse mixture of linear transforms over ``L`` layers.

    Parameters: gate encoder ``W_enc [L, d_in, T]``, ``b_enc [L, T]``; per rank group ``U[g]``
    ``[L, T_g, d_out, r_g]`` and ``V[g]`` ``[L, T_g, r_g, d_in]`` (``nn.ParameterList``s, state
    dict keys ``U.0``, ``V.0``, ...); ``b_dec [L, d_out]``; for JumpReLU ``log_threshold [L, T]``
    (float32). Buffers: the standardizer, ``tokens_since_fired [L, T]`` and, for BatchTopK, the
    inference ``threshold``. ``n_features`` is ``T``: the gate is a dictionary of transforms.
    """

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        d_out: int,
        rank_groups: Sequence[tuple[int, int]],
        nonlinearity: str | Nonlinearity = "topk",
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
        nonlinearity = make_nonlinearity(
            nonlinearity, k=k, batchtopk_scope=batchtopk_scope,
            threshold_ema_decay=threshold_ema_decay, rank_by_decoder_norm=rank_by_decoder_norm,
            jumprelu_init_threshold=jumprelu_init_threshold, jumprelu_bandwidth=jumprelu_bandwidth)
        self.rank_groups = groups
        factory = {"dtype": dtype, "device": device}
        self._init_encoder(n_layers, d_in, d_out, n_features, nonlinearity, factory)
        self.U = nn.ParameterList(
            [nn.Parameter(torch.empty(n_layers, c, d_out, r, **factory)) for r, c in groups]
        )
        self.V = nn.ParameterList(
            [nn.Parameter(torch.empty(n_layers, c, r, d_in, **factory)) for r, c in groups]
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, **factory))
        self._init_state(device)
        self.reset_parameters()

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
        self._check_inputs(x, layer)
        Us = [layer_rows(U, layer) for U in self.U]
        Vs = [layer_rows(V, layer) for V in self.V]
        out = kernels.molt_apply(x, codes.values, codes.indices, Us, Vs,
                                 zero_slot_grad=self.nonlinearity.window_slots(self, codes, layer))
        return out + layer_rows(self.b_dec, layer).unsqueeze(1) if bias else out

    def outputs(
        self, x: torch.Tensor, codes: Codes, aux: Codes | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``([yhat], e_aux)``: the output and the bias-free output of the AuxK codes' transforms
        (None without them); the transforms act on the input, so both read ``x``."""
        e_aux = None if aux is None else self.decode(x, aux, bias=False)
        return [self.decode(x, codes)], e_aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Codes]:
        codes = self.encode(x)
        return self.decode(x, codes), codes


@dataclass
class MOLT(Architecture):
    """A sparse mixture of low-rank linear transforms per layer: the nonlinearity gates the
    transforms; ``model.n_features`` is the number of transforms. One process only."""

    molt_rank_groups: list[list[int]] = field(metadata={"help": (
        "MOLT transforms as [[rank, count], ...], e.g. [[64, 16], [32, 32], [16, 64], [8, 128]]; "
        "the counts must sum to n_features.")})

    module = MixtureOfLinearTransforms

    def __post_init__(self) -> None:
        if not self.molt_rank_groups or any(len(g) != 2 or min(g) < 1
                                            for g in self.molt_rank_groups):
            raise ValueError(f"molt_rank_groups must be non-empty [[rank, count], ...] with "
                             f"positive entries (got {self.molt_rank_groups})")

    def build(self, n_layers: int, d_in: int, d_out: int, n_features: int,
              nonlinearity: Nonlinearity, device: Any) -> MixtureOfLinearTransforms:
        return MixtureOfLinearTransforms(n_layers, d_in, d_out,
                                         [tuple(g) for g in self.molt_rank_groups],
                                         nonlinearity=nonlinearity, device=device)

    def config_problems(self, cfg: Any) -> list[tuple[str, str]]:
        total = sum(count for _, count in self.molt_rank_groups)
        problems = []
        if total != cfg.model.n_features:
            problems.append(("model.n_features", f"must equal the number of MOLT transforms, "
                             f"{total} (the counts of model.molt_rank_groups) "
                             f"(got {cfg.model.n_features})"))
        if cfg.loss.matryoshka_weights is not None:
            problems.append(("loss.matryoshka_weights", "not available for a MOLT"))
        return problems
