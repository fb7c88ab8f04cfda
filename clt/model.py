"""The crosslayer transcoder: encoder, sparse nonlinearity, sparse crosslayer decoder.

Single-device by design; parallelism is applied from outside. Everything here runs on
standardized activations: ``x [L, N, d_in]`` in, ``yhat [L, N, d_out]`` out (see ``Standardizer``).
Reach ``R`` covers the family: ``R = L`` a CLT, ``R = 1`` a per-layer transcoder (PLT), and an SAE
is a PLT whose output hook is its input hook.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from kernels import DecoderLayout

from .standardize import Standardizer

NONLINEARITIES = ("topk", "batchtopk", "jumprelu", "relu")


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


def init_encoder(
    module: nn.Module, n_layers: int, d_in: int, d_out: int, n_features: int,
    nonlinearity: str, k: int | None, batchtopk_scope: str, threshold_ema_decay: float,
    rank_by_decoder_norm: bool, jumprelu_bandwidth: float, factory: dict,
) -> None:
    """Validate and set the sparse encoder's settings and ``W_enc [L, d_in, F]``, ``b_enc [L, F]``
    (shared by the transcoder and the MOLT gate; registration order is the checkpoints')."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    if nonlinearity in ("topk", "batchtopk") and not (k and 1 <= k <= n_features):
        raise ValueError(f"{nonlinearity} needs 1 <= k <= n_features={n_features}, got {k}")
    module.n_layers, module.d_in, module.d_out, module.n_features = n_layers, d_in, d_out, \
        n_features
    module.nonlinearity, module.k = nonlinearity, k
    module.batchtopk_scope, module.threshold_ema_decay = batchtopk_scope, threshold_ema_decay
    module.rank_by_decoder_norm = rank_by_decoder_norm
    module.jumprelu_bandwidth = jumprelu_bandwidth
    module.W_enc = nn.Parameter(torch.empty(n_layers, d_in, n_features, **factory))
    module.b_enc = nn.Parameter(torch.zeros(n_layers, n_features, **factory))


def init_gate_state(module: nn.Module, jumprelu_init_threshold: float, device) -> None:
    """JumpReLU's float32 ``log_threshold [L, F]``, the BatchTopK inference ``threshold``, the
    ``tokens_since_fired`` counters and the standardizer of an encoder set by ``init_encoder``."""
    L, F = module.n_layers, module.n_features
    if module.nonlinearity == "jumprelu":
        init = math.log(jumprelu_init_threshold)
        module.log_threshold = nn.Parameter(
            torch.full((L, F), init, dtype=torch.float32, device=device))
    n_thresholds = L if module.batchtopk_scope == "layer" else 1
    module.register_buffer("threshold", torch.zeros(n_thresholds, device=device))
    module.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.int64))
    module.register_buffer("tokens_since_fired",
                           torch.zeros(L, F, dtype=torch.int64, device=device))
    module.standardizer = Standardizer(L, module.d_in, module.d_out).to(device)


def layer_rows(t: torch.Tensor, layer: int | None) -> torch.Tensor:
    """Rows ``[layer, layer + 1)`` of a per-layer tensor, or ``t`` itself for all layers: a full
    slice ``t[:]`` would cost autograd a zeroed ``t``-sized gradient and a copy into it."""
    return t if layer is None else t[layer : layer + 1]


def codes_in_range(codes: Codes, lo: int, hi: int) -> Codes:
    """The slots of ``codes`` whose feature lies in ``[lo, hi)``, packed to the front of each row
    (``K`` cut to the largest count; other slots become padding), differentiable in the values."""
    inside = (codes.indices >= lo) & (codes.indices < hi)
    order = torch.argsort((~inside).to(torch.int8), dim=-1, stable=True)  # members first
    K = max(int(inside.sum(dim=-1).max()) if inside.numel() else 0, 1)
    order = order[..., :K]
    keep = inside.gather(-1, order)
    values = codes.values.gather(-1, order) * keep
    indices = torch.where(keep, codes.indices.gather(-1, order), 0)
    return Codes(values, indices)


def _dead_columns(dead: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cols, spare)`` ``[L, D]``: each layer's dead features in increasing order, then
    spare (live) columns, flagged in ``spare``."""
    cols = torch.sort((~dead).to(torch.uint8), dim=1, stable=True).indices[:, :D]
    spare = torch.arange(D, device=dead.device) >= dead.sum(dim=1, keepdim=True)
    return cols, spare


def _no_candidates(x: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, N, K]`` AuxK candidates of a batch with no dead feature: all padding."""
    L, N, _ = x.shape
    return (x.new_full((L, N, K), -math.inf),
            torch.zeros(L, N, K, dtype=torch.int64, device=x.device))


def _pad_candidates(
    v: torch.Tensor, ids: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, N, k]`` candidates padded to ``K`` slots (``-inf``, index 0)."""
    k = v.shape[-1]
    if k == K:
        return v, ids
    return (torch.nn.functional.pad(v, (0, K - k), value=-math.inf),
            torch.nn.functional.pad(ids, (0, K - k), value=0))


class CrossLayerTranscoder(nn.Module):
    """Crosslayer transcoder with decoder reach ``R``.

    Parameters: ``W_enc [L, d_in, F]``, ``b_enc [L, F]``, ``W_dec [F * P, d_out]`` (one row table
    for all sources, see ``kernels.DecoderLayout``), ``b_dec [L, d_out]``, for JumpReLU
    ``log_threshold [L, F]`` (float32 even when the rest is bf16) and with ``skip=True`` a linear
    skip connection ``W_skip [L, d_in, d_out]`` (zero at init: ``yhat[t] += x[t] @ W_skip[t]``).
    ``prefix_bounds``: Matryoshka prefixes, the feature counts ``F_1 < ... < F_G = F`` of the
    nested dictionaries whose reconstructions :meth:`outputs` returns.
    Buffers: the standardizer, ``tokens_since_fired [L, F]`` and, for BatchTopK, the EMA
    ``threshold`` used at inference.
    """

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        d_out: int,
        n_features: int,
        reach: int | None = None,
        nonlinearity: str = "topk",
        k: int | None = None,
        batchtopk_scope: str = "layer",
        threshold_ema_decay: float = 0.99,
        rank_by_decoder_norm: bool = False,
        jumprelu_init_threshold: float = 0.1,
        jumprelu_bandwidth: float = 0.1,
        skip: bool = False,
        prefix_bounds: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        bounds = list(prefix_bounds or [])
        if bounds and (bounds != sorted(set(bounds)) or bounds[0] < 1
                       or bounds[-1] != self._features_total(n_features)):
            raise ValueError(f"prefix_bounds must increase from >= 1 to n_features, got {bounds}")
        self.layout = DecoderLayout(n_layers, n_features, reach or n_layers)
        factory = {"dtype": dtype, "device": device}
        init_encoder(self, n_layers, d_in, d_out, n_features, nonlinearity, k, batchtopk_scope,
                     threshold_ema_decay, rank_by_decoder_norm, jumprelu_bandwidth, factory)
        self.W_dec = nn.Parameter(torch.empty(self.layout.n_rows, d_out, **factory))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, **factory))
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_in, d_out, **factory)) if skip else None
        self.prefix_bounds = tuple(bounds) or None
        init_gate_state(self, jumprelu_init_threshold, device)
        self.reset_parameters()

    @property
    def reach(self) -> int:
        return self.layout.reach

    def _features_total(self, n_features: int) -> int:
        """Features of the whole model (``ShardedCLT`` holds a slice of them)."""
        return n_features

    def prefix_ranges(self) -> list[tuple[int, int]]:
        """Matryoshka groups as ``[lo, hi)`` ranges of this module's feature indices."""
        bounds = [0, *(self.prefix_bounds or [self._features_total(self.n_features)])]
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DESIGN init: ``W_enc ~ U(+-1/sqrt(F))``, ``W_dec ~ U(+-1/sqrt(R * d_out))`` (which is
        ``1/sqrt(L * d_out)`` for a CLT and ``1/sqrt(d_out)`` for a PLT), biases 0."""
        enc_bound = 1 / math.sqrt(self.n_features)
        dec_bound = 1 / math.sqrt(self.reach * self.d_out)
        self.W_enc.uniform_(-enc_bound, enc_bound)
        self.W_dec.uniform_(-dec_bound, dec_bound)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def decoder_view(self, source: int) -> torch.Tensor:
        """``[F, R_s, d_out]`` decoder block of one source layer (a view, for export)."""
        return self.layout.source_view(self.W_dec, source)

    def decoder_norms(self) -> torch.Tensor:
        """``[L, F]`` norm of each feature's whole crosslayer write."""
        return kernels.decoder_norms(self.W_dec, self.layout)

    def pre_activations(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Dense ``[L, N, F]`` pre-activations (only for nonlinearities that need them), or
        ``[1, N, F]`` of one source ``layer``."""
        return torch.baddbmm(layer_rows(self.b_enc, layer).unsqueeze(1), x,
                             layer_rows(self.W_enc, layer))

    def encode(self, x: torch.Tensor, layer: int | None = None) -> Codes:
        """Standardized ``x [L, N, d_in]`` -> sparse codes.

        ``layer``: encode that one source layer only, from ``x [1, N, d_in]`` (closed-loop
        evaluation feeds layers one at a time). Only valid where the nonlinearity is per layer:
        always at inference, and in training except for BatchTopK with the global scope.
        """
        rows = slice(None) if layer is None else slice(layer, layer + 1)
        self._check_inputs(x, layer)
        if layer is not None and self.training and self.batchtopk_scope == "global" \
                and self.nonlinearity == "batchtopk":
            raise ValueError("global BatchTopK selects across layers: encode all layers at once")
        if self.nonlinearity == "topk":
            scale = self.decoder_norms()[rows] if self.rank_by_decoder_norm else None
            values, indices = kernels.encode_topk(x, layer_rows(self.W_enc, layer),
                                                  layer_rows(self.b_enc, layer), self.k, scale)
            return Codes(torch.relu(values), indices)
        if self.nonlinearity == "batchtopk":  # selects on a detached pre, see _batchtopk
            with torch.no_grad():
                pre = self.pre_activations(x, layer)
            return self._batchtopk(x, pre, layer)
        pre = self.pre_activations(x, layer)  # [L, N, F]
        if self.nonlinearity == "jumprelu":
            values, indices = kernels.jumprelu_codes(pre, layer_rows(self.log_threshold, layer),
                                                     self.jumprelu_bandwidth)
            return Codes(values, indices, pre)
        return Codes(*kernels.relu_codes(pre), pre)

    def _batchtopk(self, x: torch.Tensor, pre: torch.Tensor, layer: int | None) -> Codes:
        """Exact BatchTopK while training; at inference a JumpReLU at the EMA threshold. ``pre``
        is detached: the winners' values get their gradient from :meth:`_with_encoder_grad`."""
        if self.training:
            values, indices, min_kept = kernels.batchtopk(pre, self.k, self.batchtopk_scope)
            if layer is None:
                self._update_threshold(min_kept)
            return self._with_encoder_grad(x, pre, layer, values, indices)
        theta = self.threshold.view(-1, 1, 1)  # [L or 1, 1, 1]
        theta = layer_rows(theta, layer) if theta.shape[0] > 1 else theta
        values, indices = kernels.mask_to_codes(pre, pre > theta)
        return self._with_encoder_grad(x, pre, layer, values, indices)

    def _with_encoder_grad(self, x: torch.Tensor, pre: torch.Tensor, layer: int | None,
                           values: torch.Tensor, indices: torch.Tensor) -> Codes:
        """Codes whose positive ``values`` (picked from the detached ``pre``) are differentiable
        in the encoder through ``kernels.encode_at``'s sparse backward (padding and values <= 0
        pass no gradient, as through a relu), instead of a dense ``[L, N, F]`` pre-activation
        gradient and a dense ``x^T @ grad`` GEMM per layer."""
        if not torch.is_grad_enabled():
            return Codes(values, indices)
        exact = kernels.encode_at(x, layer_rows(self.W_enc, layer), layer_rows(self.b_enc, layer),
                                  pre, indices)
        return Codes(torch.where(values > 0, exact, torch.zeros_like(exact)), indices)

    @torch.no_grad()
    def _update_threshold(self, min_kept: torch.Tensor) -> None:
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(min_kept)
        else:
            self.threshold.lerp_(min_kept.to(self.threshold.dtype), 1 - self.threshold_ema_decay)
        self.threshold_updates += 1

    def decode(self, codes: Codes, bias: bool = True) -> torch.Tensor:
        """Sparse codes -> standardized ``[L, N, d_out]``; ``bias=False`` for AuxK."""
        return self.decode_many([codes], [bias])[0]

    def decode_many(self, codes: Sequence[Codes], biases: Sequence[bool]) -> list[torch.Tensor]:
        """:meth:`decode` of several code sets through one decoder gradient
        (``kernels.sparse_decode_many``)."""
        sets = [(c.values, c.indices, self.b_dec if b else None)
                for c, b in zip(codes, biases, strict=True)]
        # only JumpReLU's value-0 slots (its STE window) carry a gradient the encoder uses
        return kernels.sparse_decode_many(sets, self.W_dec, self.layout,
                                          zero_slot_grad=self.nonlinearity == "jumprelu")

    def skip_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[L, N, d_out]`` skip-connection term ``x[t] @ W_skip[t]``, or None without one."""
        return None if self.W_skip is None else torch.bmm(x, self.W_skip)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Codes]:
        codes = self.encode(x)
        return self.outputs(x, codes)[0][-1], codes

    def outputs(
        self, x: torch.Tensor, codes: Codes, aux: Codes | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(prefixes, e_aux)``: the reconstructions ``[L, N, d_out]`` of the nested prefixes,
        smallest first (just ``[yhat]`` without Matryoshka), and the bias-free decode of the
        ``aux`` codes (AuxK; None without them), all in one :meth:`decode_many`, so the whole
        step writes one decoder gradient. With Matryoshka each active feature is decoded once,
        in its own group's decode; prefixes are cumulative sums of those partial decodes (bias
        and skip in all)."""
        skip = self.skip_output(x)
        if self.prefix_bounds is None:
            groups, biases = [codes], [True]
        else:
            groups = [codes_in_range(codes, lo, hi) for lo, hi in self.prefix_ranges()]
            biases = [False] * len(groups)
        if aux is not None:
            groups, biases = groups + [aux], biases + [False]
        parts = self.decode_many(groups, biases)
        e_aux = parts.pop() if aux is not None else None
        if self.prefix_bounds is None:
            return [parts[0] if skip is None else parts[0] + skip], e_aux
        base = self.b_dec.unsqueeze(1)
        base = base if skip is None else base + skip
        prefixes, total = [], None
        for part in parts:
            total = part if total is None else total + part
            prefixes.append(base + total)
        return prefixes, e_aux

    def reconstruct(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw hook activations in, raw MLP-output-scale reconstruction out."""
        yhat, _ = self(self.standardizer.inputs(x_raw))
        return self.standardizer.restore_targets(yhat)

    def dead_mask(self, dead_tokens: int) -> torch.Tensor:
        """``[L, F]`` bool: features that have not fired for ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= dead_tokens

    @torch.no_grad()
    def update_dead_stats(self, fire_counts: torch.Tensor, n_tokens: int) -> None:
        """Advance the tokens-since-fired counters by one batch of ``n_tokens`` tokens, given its
        ``[L, F]`` ``Codes.fire_counts`` (computed once per step, shared with the metrics)."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fire_counts > 0] = 0

    def auxk_codes(self, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> Codes | None:
        """Top ``k_aux`` pre-activations among dead features only (AuxK), or None if none dead.

        Encodes only the dead columns of each layer, so the cost scales with the dead count.
        """
        n_dead = int(dead.sum(dim=1).max())
        if n_dead == 0:
            return None
        pre, indices = self.auxk_candidates(x, dead, min(k_aux, n_dead))
        return Codes(torch.relu(pre), indices)  # relu(-inf) = 0: empty slots are padding

    def encode_with_aux(
        self, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int
    ) -> tuple[Codes, Codes | None]:
        """``(encode(x), auxk_codes(x, dead, k_aux))`` (no AuxK codes without ``dead``). For TopK
        both selections run in one encoder op, so the step writes one ``W_enc`` gradient."""
        if dead is None or self.nonlinearity != "topk":
            return self.encode(x), None if dead is None else self.auxk_codes(x, dead, k_aux)
        self._check_inputs(x)
        n_dead = int(dead.sum(dim=1).max())
        scale = self.decoder_norms() if self.rank_by_decoder_norm else None
        pre, idx, aux_pre, aux_idx = self.topk_candidates(x, dead, min(k_aux, n_dead), scale)
        aux = None if n_dead == 0 else Codes(torch.relu(aux_pre), aux_idx)
        return Codes(torch.relu(pre), idx), aux

    def topk_candidates(
        self, x: torch.Tensor, dead: torch.Tensor, K: int, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """TopK's pre-activations and indices over this module's features (ranked by ``pre *
        scale`` where a ``[L, F]`` scale is given), and the :meth:`auxk_candidates` ``(pre,
        indices)`` with ``K`` slots (``K = 0``: no AuxK), in one ``kernels.encode_topk`` call."""
        k = min(self.k, self.n_features)
        D = int(dead.sum(dim=1).max()) if K > 0 else 0
        if D == 0:
            values, indices = kernels.encode_topk(x, self.W_enc, self.b_enc, k, scale)
            return values, indices, *_no_candidates(x, K)
        cols, spare = _dead_columns(dead, D)
        values, indices, aux_pre, aux_idx = kernels.encode_topk(
            x, self.W_enc, self.b_enc, k, scale, aux=(cols, spare, min(K, D)))
        return values, indices, *_pad_candidates(aux_pre, aux_idx, K)

    def auxk_candidates(
        self, x: torch.Tensor, dead: torch.Tensor, K: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[L, N, K]`` largest pre-activations of each layer's dead features and their feature
        indices, by decreasing value; slots beyond a layer's dead count hold ``-inf`` (index 0).

        One ``encode_topk`` over all layers' dead columns, gathered into ``[L, d_in, D]``
        (``D``: the largest dead count; a layer's spare columns get a ``-inf`` bias, so they never
        win): autograd then scatters one ``W_enc``-sized gradient, not one per layer plus a
        per-layer sum (at L=12, F=4096 that was 12 zeroed and added 150 MB tensors a step). TopK
        training gets these from :meth:`topk_candidates` instead, with no extra gradient."""
        D = int(dead.sum(dim=1).max())
        if D == 0:
            return _no_candidates(x, K)
        cols, spare = _dead_columns(dead, D)
        W = self.W_enc.gather(2, cols.unsqueeze(1).expand(-1, self.d_in, -1))  # [L, d_in, D]
        b = self.b_enc.gather(1, cols).masked_fill(spare, -math.inf)
        v, i = kernels.encode_topk(x, W, b, min(K, D))
        ids = cols.gather(1, i.flatten(1)).view_as(i).masked_fill(v == -math.inf, 0)
        return _pad_candidates(v, ids, K)

    @torch.no_grad()
    def folded_copy(self) -> CrossLayerTranscoder:
        """A copy whose weights read raw inputs and write raw outputs (identity standardizer).

        ``pre`` is unchanged by the fold, so codes, thresholds and the selection are identical:
        ``W_enc' = W_enc / std_in``, ``b_enc' = b_enc - (mean_in / std_in) @ W_enc``,
        ``W_dec'[., t, :] = W_dec[., t, :] * std_out[t]``, ``b_dec' = b_dec * std_out + mean_out``
        and, with a skip connection, ``W_skip' = W_skip / std_in * std_out`` and ``b_dec'`` less
        ``(mean_in / std_in) @ W_skip * std_out``.
        """
        if self.rank_by_decoder_norm:
            raise ValueError("folding rescales decoder norms, which would change a TopK model "
                             "ranked by decoder norm: convert it to JumpReLU before exporting")
        folded = copy.deepcopy(self)
        st = self.standardizer  # float64 statistics: fold in float64, round once
        W_enc, b_enc = self.W_enc.double(), self.b_enc.double()
        folded.W_enc.copy_(W_enc / st.in_std.unsqueeze(-1))
        folded.b_enc.copy_(b_enc - torch.einsum("ld,ldf->lf", st.in_mean / st.in_std, W_enc))
        for s in range(self.n_layers):
            R_s = self.layout.reach_of(s)
            block = self.decoder_view(s).double() * st.out_std[s : s + R_s].unsqueeze(0)
            folded.decoder_view(s).copy_(block)
        b_dec = self.b_dec.double()
        if self.W_skip is not None:  # x_std @ W = x_raw @ (W / std_in) - (mean_in / std_in) @ W
            W_skip = self.W_skip.double() / st.in_std.unsqueeze(-1)
            b_dec = b_dec - torch.einsum("ld,lde->le", st.in_mean, W_skip)
            folded.W_skip.copy_(W_skip * st.out_std.unsqueeze(1))
        folded.b_dec.copy_(b_dec * st.out_std + st.out_mean)
        folded.standardizer.reset_()
        return folded

    def _check_inputs(self, x: torch.Tensor, layer: int | None = None) -> None:
        n_layers = self.n_layers if layer is None else 1
        if layer is not None and not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in 0..{self.n_layers - 1}, got {layer}")
        if x.dim() != 3 or x.shape[0] != n_layers or x.shape[2] != self.d_in:
            raise ValueError(
                f"expected x of shape [L={n_layers}, N, d_in={self.d_in}], got {tuple(x.shape)}"
            )
