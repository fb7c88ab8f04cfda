"""The sparse encoder every architecture shares, and what it shares with other processes.

``SparseEncoder`` holds ``W_enc [L, d_in, F]``, ``b_enc [L, F]``, the nonlinearity's state
(thresholds), the dead-feature counters and the standardizer; the nonlinearity object
(``clt.nonlinearities``) selects the codes, and AuxK's dead-feature candidates come from here.
A transcoder and a MOLT add their decoders on top.

``Shard`` is what a model needs to know about other processes: which slice of the features it
holds and the collectives over them. The single process's ``Shard`` is the identity;
``clt.parallel.parallelize`` installs a mesh-backed one from outside, so nothing here (nor in the
losses) imports the parallel code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

import kernels

from .standardize import Standardizer

if TYPE_CHECKING:
    from .nonlinearities import Nonlinearity


@dataclass
class Codes:
    """Sparse activations of one batch.

    ``values``/``indices`` are ``[L, N, K]`` (padded slots have value 0). ``pre`` is the dense
    ``[L, N, F]`` pre-activation, kept only by the nonlinearities whose losses need it (JumpReLU,
    ReLU); the TopK family never keeps it.
    """

    values: torch.Tensor
    indices: torch.Tensor
    pre: torch.Tensor | None = None

    def fire_counts(self, n_features: int) -> torch.Tensor:
        """``[L, F]`` how many tokens of the batch each feature fired on (value > 0)."""
        L = self.values.shape[0]
        counts = torch.zeros(L, n_features, dtype=torch.int64, device=self.values.device)
        active = (self.values.detach() > 0).to(torch.int64).flatten(1)
        return counts.scatter_add_(1, self.indices.long().flatten(1), active)

    def l0(self) -> torch.Tensor:
        """``[L]`` mean number of active (positive) features per token."""
        return (self.values.detach() > 0).sum(dim=-1).float().mean(dim=1)


class Shard:
    """The features of one process and the collectives over the processes that hold the others.

    One process holds them all: every collective is the identity. ``offset``/``total``: this
    process's first feature and the model's feature count; ``tp_size``: processes sharing the
    features, ``world_size``/``dp_size``/``dp_rank``: all processes and the data-parallel
    replicas (BatchTopK and AuxK see the batch of every replica).
    """

    tp_size = dp_size = world_size = 1
    dp_rank = 0

    def __init__(self, total: int, offset: int = 0) -> None:
        self.total, self.offset = total, offset

    def sum_features(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of per-process partials over the feature shards; the gradient passes through
        (every process holds the same replicated loss)."""
        return t

    def sum_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a statistic (no gradient) over data-parallel replicas."""
        return t

    def world_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def keep_top(self, score: torch.Tensor, key: torch.Tensor, m, group: str) -> torch.Tensor:
        """Keep mask ``[S, c]`` of this process's candidates (``key``: global ids, distinct in a
        row) in each row's ``m`` largest ``score`` over the ``"tp"`` or ``"world"`` group,
        ties to the smaller key."""
        raise NotImplementedError("one process selects locally: nothing to gather")


def layer_rows(t: torch.Tensor, layer: int | None) -> torch.Tensor:
    """Rows ``[layer, layer + 1)`` of a per-layer tensor, or ``t`` itself for all layers: a full
    slice ``t[:]`` would cost autograd a zeroed ``t``-sized gradient and a copy into it."""
    return t if layer is None else t[layer : layer + 1]


def _dead_columns(dead: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cols, spare)`` ``[L, D]``: each layer's dead features in increasing order, then
    spare (live) columns, flagged in ``spare``."""
    cols = torch.sort((~dead).to(torch.uint8), dim=1, stable=True).indices[:, :D]
    spare = torch.arange(D, device=dead.device) >= dead.sum(dim=1, keepdim=True)
    return cols, spare


def no_candidates(x: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, N, K]`` AuxK candidates of a batch with no dead feature: all padding."""
    L, N, _ = x.shape
    return (x.new_full((L, N, K), -math.inf),
            torch.zeros(L, N, K, dtype=torch.int64, device=x.device))


def pad_candidates(
    v: torch.Tensor, ids: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, N, k]`` candidates padded to ``K`` slots (``-inf``, index 0)."""
    k = v.shape[-1]
    if k == K:
        return v, ids
    return (torch.nn.functional.pad(v, (0, K - k), value=-math.inf),
            torch.nn.functional.pad(ids, (0, K - k), value=0))


class SparseEncoder(nn.Module):
    """Encoder, nonlinearity state, dead-feature statistics and standardizer of a sparse
    dictionary; subclasses add a decoder (``decoder_norms``, ``outputs``).

    Registration order (the checkpoints' and the optimizer's): ``W_enc``, ``b_enc``, the
    subclass's decoder parameters, then :meth:`_init_state`: the nonlinearity's parameters
    (JumpReLU's ``log_threshold``), the ``threshold`` / ``threshold_updates`` buffers (BatchTopK's
    inference EMA), ``tokens_since_fired`` and the standardizer.
    """

    prefix_bounds = None  # Matryoshka prefixes: a transcoder may set them
    reach = 1  # layers a feature writes to: its own and the next reach - 1
    # clt.parallel.parallelize may spread it over processes (features over tensor-parallel
    # ranks, batches over data-parallel replicas); the config refuses parallel settings otherwise
    shardable = False
    writes_features = False  # decoder rows per feature: what exports and attribution graphs read

    def _init_encoder(self, n_layers: int, d_in: int, d_out: int, n_features: int,
                      nonlinearity: Nonlinearity, factory: dict) -> None:
        if n_layers < 1 or d_in < 1 or d_out < 1 or n_features < 1:
            raise ValueError(f"need n_layers, d_in, d_out, n_features >= 1, got {n_layers}, "
                             f"{d_in}, {d_out}, {n_features}")
        nonlinearity.check(n_features)
        self.n_layers, self.d_in, self.d_out, self.n_features = n_layers, d_in, d_out, n_features
        self.nonlinearity = nonlinearity
        self.shard = Shard(n_features)
        self.W_enc = nn.Parameter(torch.empty(n_layers, d_in, n_features, **factory))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, n_features, **factory))

    def _init_state(self, device) -> None:
        L, F = self.n_layers, self.n_features
        self.nonlinearity.init_state(self, device)
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("tokens_since_fired",
                             torch.zeros(L, F, dtype=torch.int64, device=device))
        self.standardizer = Standardizer(L, self.d_in, self.d_out).to(device)

    @property
    def k(self) -> int | None:
        """Active features per (token, layer) of the TopK family, else None."""
        return self.nonlinearity.k

    def decoder_norms(self) -> torch.Tensor:
        raise NotImplementedError

    def pre_activations(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Dense ``[L, N, F]`` pre-activations (only for nonlinearities that need them), or
        ``[1, N, F]`` of one source ``layer``."""
        return torch.baddbmm(layer_rows(self.b_enc, layer).unsqueeze(1), x,
                             layer_rows(self.W_enc, layer))

    def encode(self, x: torch.Tensor, layer: int | None = None) -> Codes:
        """Standardized ``x [L, N, d_in]`` -> sparse codes (this process's features).

        ``layer``: encode that one source layer only, from ``x [1, N, d_in]`` (closed-loop
        evaluation feeds layers one at a time); valid where the nonlinearity is per layer.
        """
        self._check_inputs(x, layer)
        return self.nonlinearity.encode(self, x, layer)

    def encode_with_aux(
        self, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int
    ) -> tuple[Codes, Codes | None]:
        """``(codes, AuxK codes)``: the one entry point of a training step's encoder. The AuxK
        codes are the top ``k_aux`` pre-activations of dead features (None without ``dead``
        or when none is dead); a nonlinearity may produce both in one op (TopK)."""
        self._check_inputs(x)
        return self.nonlinearity.encode_with_aux(self, x, dead, k_aux)

    def with_encoder_grad(self, x: torch.Tensor, pre: torch.Tensor, layer: int | None,
                          values: torch.Tensor, indices: torch.Tensor) -> Codes:
        """Codes whose positive ``values`` (picked from a detached ``pre``) are differentiable
        in the encoder through ``kernels.encode_at``'s sparse backward (padding and values <= 0
        pass no gradient, as through a relu), instead of a dense ``[L, N, F]`` pre-activation
        gradient and a dense ``x^T @ grad`` GEMM per layer."""
        if not torch.is_grad_enabled():
            return Codes(values, indices)
        exact = kernels.encode_at(x, layer_rows(self.W_enc, layer), layer_rows(self.b_enc, layer),
                                  pre, indices)
        return Codes(torch.where(values > 0, exact, torch.zeros_like(exact)), indices)

    def dead_mask(self, dead_tokens: int) -> torch.Tensor:
        """``[L, F]`` bool: features that have not fired for ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= dead_tokens

    @torch.no_grad()
    def update_dead_stats(self, fire_counts: torch.Tensor, n_tokens: int) -> None:
        """Advance the tokens-since-fired counters by one batch of ``n_tokens`` tokens, given its
        ``[L, F]`` ``Codes.fire_counts`` (computed once per step, shared with the metrics)."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fire_counts > 0] = 0

    def global_dead_count(self, dead: torch.Tensor) -> torch.Tensor:
        """``[L]`` dead features of the whole model (every shard)."""
        return self.shard.sum_features(dead.sum(dim=1))

    def auxk_codes(self, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> Codes | None:
        """Top ``k_aux`` pre-activations among dead features only (AuxK; over every shard's
        dead features), or None if none is dead. Encodes only the dead columns of each layer,
        so the cost scales with the dead count."""
        n_dead = self.global_dead_count(dead)
        K = min(k_aux, int(n_dead.max()))  # the same on every process: so are the collectives
        if K == 0:
            return None
        return self.keep_global(*self.auxk_candidates(x, dead, K), torch.clamp(n_dead, max=K))

    def keep_global(self, pre: torch.Tensor, idx: torch.Tensor, m, score=None) -> Codes:
        """Codes of this process's candidates ``[L, N, c]`` (local ids) that are in each token's
        global top ``m`` (an int or ``[L]``) by ``score`` (default ``pre``); one process keeps
        them all (its candidates are its top ``m`` already)."""
        if self.shard.tp_size == 1:
            return Codes(torch.relu(pre), idx)  # relu(-inf) = 0: empty slots are padding
        score = pre.detach() if score is None else score
        L, N, c = score.shape
        keys = (idx + self.shard.offset).flatten(0, 1)
        m = m if isinstance(m, int) else m.repeat_interleave(N)
        keep = self.shard.keep_top(score.flatten(0, 1), keys, m, "tp").view(L, N, c)
        return Codes(torch.where(keep, torch.relu(pre), torch.zeros_like(pre)), idx)

    def auxk_candidates(
        self, x: torch.Tensor, dead: torch.Tensor, K: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[L, N, K]`` largest pre-activations of each layer's dead features and their feature
        indices, by decreasing value; slots beyond a layer's dead count hold ``-inf`` (index 0).

        One ``encode_topk`` over all layers' dead columns, gathered into ``[L, d_in, D]``
        (``D``: the largest dead count; a layer's spare columns get a ``-inf`` bias, so they never
        win): autograd then scatters one ``W_enc``-sized gradient, not one per layer plus a
        per-layer sum (at L=12, F=4096 that was 12 zeroed and added 150 MB tensors a step)."""
        D = int(dead.sum(dim=1).max())
        if D == 0:
            return no_candidates(x, K)
        cols, spare = _dead_columns(dead, D)
        W = self.W_enc.gather(2, cols.unsqueeze(1).expand(-1, self.d_in, -1))  # [L, d_in, D]
        b = self.b_enc.gather(1, cols).masked_fill(spare, -math.inf)
        v, i = kernels.encode_topk(x, W, b, min(K, D))
        ids = cols.gather(1, i.flatten(1)).view_as(i).masked_fill(v == -math.inf, 0)
        return pad_candidates(v, ids, K)

    def topk_with_candidates(
        self, x: torch.Tensor, k: int, dead: torch.Tensor, K: int, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """The top ``k`` pre-activations and indices of this process's features (ranked by
        ``pre * scale`` where a ``[L, F]`` scale is given) and the :meth:`auxk_candidates`
        ``(pre, indices)`` with ``K`` slots (``K = 0``: no AuxK), in one ``kernels.encode_topk``
        call, so the step writes one ``W_enc`` gradient."""
        D = int(dead.sum(dim=1).max()) if K > 0 else 0
        if D == 0:
            values, indices = kernels.encode_topk(x, self.W_enc, self.b_enc, k, scale)
            return values, indices, *no_candidates(x, K)
        cols, spare = _dead_columns(dead, D)
        values, indices, aux_pre, aux_idx = kernels.encode_topk(
            x, self.W_enc, self.b_enc, k, scale, aux=(cols, spare, min(K, D)))
        return values, indices, *pad_candidates(aux_pre, aux_idx, K)

    def reconstruct(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw hook activations in, raw MLP-output-scale reconstruction out."""
        yhat, _ = self(self.standardizer.inputs(x_raw))
        return self.standardizer.restore_targets(yhat)

    def _check_inputs(self, x: torch.Tensor, layer: int | None = None) -> None:
        n_layers = self.n_layers if layer is None else 1
        if layer is not None and not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in 0..{self.n_layers - 1}, got {layer}")
        if x.dim() != 3 or x.shape[0] != n_layers or x.shape[2] != self.d_in:
            raise ValueError(
                f"expected x of shape [L={n_layers}, N, d_in={self.d_in}], got {tuple(x.shape)}"
            )


class Architecture:
    """An architecture component (``model.architecture`` in the config): a dataclass whose
    fields are its arguments (the ``model`` section's fields beyond ``n_features``, ``layers``
    and ``architecture``) and that builds the module.

    ``build`` returns a ``SparseEncoder`` subclass whose ``outputs(x, codes, aux)`` gives
    ``(reconstructions, aux_output)`` (see ``clt.model.CrossLayerTranscoder.outputs``).
    """

    kind: str = ""
    module: ClassVar[type[SparseEncoder]] = SparseEncoder  # what ``build`` returns

    def reach_of(self, n_layers: int) -> int:
        """Layers a feature of a model of ``n_layers`` layers writes to (1: per layer)."""
        return 1

    def build(self, n_layers: int, d_in: int, d_out: int, n_features: int,
              nonlinearity: Nonlinearity, device: Any) -> SparseEncoder:
        raise NotImplementedError

    def config_problems(self, cfg: Any) -> list[tuple[str, str]]:
        """``(field path, message)`` for settings this architecture cannot serve."""
        return []
