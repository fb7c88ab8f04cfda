"""Nonlinearities: each one object owns its selection (calling the kernels), its state, its loss
terms, what feature-sharded processes exchange for it and how it exports.

A nonlinearity is a dataclass whose fields are its config arguments (``nonlinearity.<field>``);
``clt.registry.NONLINEARITIES`` names the built-ins, and a config may name a user's subclass by
import path (see ``examples/plugins``). The methods take the encoder (``clt.encoder.SparseEncoder``)
they act for, whose ``shard`` says which features this process holds.

Exchange under tensor parallelism (DESIGN.md, "Distributed"): TopK proposes each process's local
top k per (layer, token) and keeps the candidates in the global top k (ties to the lower feature
id); BatchTopK keeps the exact global winners of the whole batch (every replica's tokens);
JumpReLU and ReLU are elementwise and exchange nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

import kernels

from .encoder import Codes, layer_rows
from .losses import l0_penalty, preact_loss
from .registry import NONLINEARITIES

if TYPE_CHECKING:
    from .encoder import SparseEncoder


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class Nonlinearity:
    """Base class. Subclasses implement :meth:`encode`; class attributes describe the rest."""

    kind: ClassVar[str] = ""
    # kept on the codes (dense [L, N, F]): the losses of JumpReLU and ReLU read it
    keeps_pre: ClassVar[bool] = False
    # circuit-tracer's activation of the exported model ("jump_relu", "relu"), or None: the
    # model is converted to JumpReLU first (clt.convert)
    exports_as: ClassVar[str | None] = None
    # conversion method clt.convert uses by default when exports_as is None
    conversion: ClassVar[str] = "calibrate"
    # value-0 slots of the codes carry a gradient the encoder needs (JumpReLU's STE window)
    zero_slot_grad: ClassVar[bool] = False

    # active features per (token, layer) when the count is fixed (the TopK family, whose
    # dataclass field it is); AuxK and the conversion to JumpReLU apply to those
    k: ClassVar[int | None] = None
    # the selection ranks by decoder norms (TopK's option): folding the standardizer into the
    # weights would change it
    rank_by_decoder_norm: ClassVar[bool] = False

    def check(self, n_features: int) -> None:
        """Raise ``ValueError`` for arguments a model of ``n_features`` features cannot use."""
        if self.k is not None and not 1 <= self.k <= n_features:
            raise ValueError(f"{self.kind or type(self).__name__} needs 1 <= k <= "
                             f"n_features={n_features}, got {self.k}")

    def init_state(self, enc: SparseEncoder, device: Any) -> None:
        """Register this nonlinearity's parameters and buffers on ``enc``; the ``threshold``
        buffer (one per layer) is BatchTopK's inference threshold, kept by every model so that
        checkpoints share one layout."""
        enc.register_buffer("threshold", torch.zeros(enc.n_layers, device=device))

    def encode(self, enc: SparseEncoder, x: torch.Tensor, layer: int | None) -> Codes:
        raise NotImplementedError

    def encode_with_aux(self, enc: SparseEncoder, x: torch.Tensor, dead: torch.Tensor | None,
                        k_aux: int) -> tuple[Codes, Codes | None]:
        """``(encode(x), AuxK codes)``; see ``SparseEncoder.encode_with_aux``."""
        aux = None if dead is None else enc.auxk_codes(x, dead, k_aux)
        return self.encode(enc, x, None), aux

    def loss_terms(self, enc: SparseEncoder, codes: Codes, weights: Any, ramp: float,
                   dec_norms: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """This nonlinearity's own loss terms (weighted, summed over every shard's features)."""
        return {}

    def needs_decoder_norms(self, weights: Any) -> bool:
        return False

    def thresholds(self, enc: SparseEncoder) -> torch.Tensor | None:
        """``[L, F]`` activation thresholds of an exportable model (JumpReLU), else None."""
        return None

    def window_slots(self, enc: SparseEncoder, codes: Codes,
                     layer: int | None) -> bool | torch.Tensor:
        """Which value-0 slots must pass a gradient (see ``zero_slot_grad``): False for all."""
        return False

    def ema_thresholds(self, enc: SparseEncoder) -> torch.Tensor:
        """``[L, F]`` inference thresholds kept while training (BatchTopK's EMA)."""
        raise ValueError(f"only BatchTopK keeps an EMA threshold (this model is {self.kind!r}): "
                         f"calibrate on held-out data instead")

    def trained_counts(self, enc: SparseEncoder, x: torch.Tensor) -> torch.Tensor:
        """``[L, F]`` firing counts of the training selection on standardized ``x`` (for
        calibrating the JumpReLU thresholds that reproduce it)."""
        raise ValueError(f"no trained selection to match for {self.kind!r}: pass target_l0")


@dataclass
class TopK(Nonlinearity):
    """The ``k`` largest pre-activations of each (token, layer), relu'd."""

    k: int = _help("Active features per (token, layer), >= 1.")  # type: ignore[misc]
    rank_by_decoder_norm: bool = _help(  # type: ignore[misc]
        "Rank TopK candidates by pre-activation times decoder norm.", default=False)

    kind: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (got {self.k})")

    def _scale(self, enc: SparseEncoder, layer: int | None) -> torch.Tensor | None:
        return layer_rows(enc.decoder_norms(), layer) if self.rank_by_decoder_norm else None

    def encode(self, enc: SparseEncoder, x: torch.Tensor, layer: int | None) -> Codes:
        scale = self._scale(enc, layer)
        pre, idx = kernels.encode_topk(x, layer_rows(enc.W_enc, layer),
                                       layer_rows(enc.b_enc, layer),
                                       min(self.k, enc.n_features), scale)
        return enc.keep_global(pre, idx, self.k, self._score(pre, idx, scale))

    @staticmethod
    def _score(pre: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor | None):
        if scale is None:
            return None
        return pre.detach() * scale.gather(1, idx.flatten(1)).view_as(idx)

    def encode_with_aux(self, enc: SparseEncoder, x: torch.Tensor, dead: torch.Tensor | None,
                        k_aux: int) -> tuple[Codes, Codes | None]:
        """Both selections in one encoder op (one ``W_enc`` gradient)."""
        if dead is None:
            return self.encode(enc, x, None), None
        n_dead = enc.global_dead_count(dead)
        K = min(k_aux, int(n_dead.max()))  # the same on every process: so are the collectives
        scale = self._scale(enc, None)
        pre, idx, aux_pre, aux_idx = enc.topk_with_candidates(
            x, min(self.k, enc.n_features), dead, K, scale)
        codes = enc.keep_global(pre, idx, self.k, self._score(pre, idx, scale))
        aux = None if K == 0 else enc.keep_global(aux_pre, aux_idx, torch.clamp(n_dead, max=K))
        return codes, aux

    def trained_counts(self, enc: SparseEncoder, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(enc, x, None)
        return codes.fire_counts(enc.n_features)


@dataclass
class BatchTopK(Nonlinearity):
    """The ``N * k`` largest pre-activations of a batch per layer (or ``N * k * L`` over all
    layers), relu'd, while training; at inference a JumpReLU at the EMA of the smallest kept
    value."""

    k: int = _help("Mean active features per (token, layer), >= 1.")  # type: ignore[misc]
    batchtopk_scope: Literal["layer", "global"] = _help(
        "Select N*k per layer ('layer') or N*k*L across all layers ('global').",
        default="layer")
    threshold_ema_decay: float = _help(
        "Decay in (0, 1) of the EMA of the smallest kept value, the threshold used at "
        "inference.", default=0.99)

    kind: ClassVar[str] = "batchtopk"
    conversion: ClassVar[str] = "ema"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (got {self.k})")
        if not 0 < self.threshold_ema_decay < 1:
            raise ValueError(f"threshold_ema_decay must be in (0, 1) (got "
                             f"{self.threshold_ema_decay})")

    def init_state(self, enc: SparseEncoder, device: Any) -> None:
        n = enc.n_layers if self.batchtopk_scope == "layer" else 1
        enc.register_buffer("threshold", torch.zeros(n, device=device))

    def encode(self, enc: SparseEncoder, x: torch.Tensor, layer: int | None) -> Codes:
        """Selects on a detached ``pre``: the winners' values get their gradient from
        ``SparseEncoder.with_encoder_grad``."""
        if layer is not None and enc.training and self.batchtopk_scope == "global":
            raise ValueError("global BatchTopK selects across layers: encode all layers at once")
        with torch.no_grad():
            pre = enc.pre_activations(x, layer)
        if not enc.training:
            theta = enc.threshold.view(-1, 1, 1)  # [L or 1, 1, 1]
            theta = layer_rows(theta, layer) if theta.shape[0] > 1 else theta
            values, indices = kernels.mask_to_codes(pre, pre > theta)
        elif enc.shard.world_size == 1:
            values, indices, min_kept = kernels.batchtopk(pre, self.k, self.batchtopk_scope)
            if layer is None:
                self._update_threshold(enc, min_kept)
        else:
            values, indices = self._global_batchtopk(enc, pre, layer)
        return enc.with_encoder_grad(x, pre, layer, values, indices)

    def _global_batchtopk(self, enc: SparseEncoder, pre: torch.Tensor, layer: int | None):
        """The exact winners of the batch of every process: each proposes its local winners,
        keyed by their flat index in the batch one process would see (replicas' tokens
        concatenated), and keeps those in the global selection."""
        shard, (L, N, Fl) = enc.shard, pre.shape
        scope = self.batchtopk_scope
        k_cand = min(self.k * shard.dp_size, Fl)  # a process never holds more winners than this
        cand = kernels.batchtopk_mask(pre, k_cand, scope)
        nz = cand.nonzero()  # [count, 3] row-major, so each layer's block is contiguous
        lay, tok, feat = nz.unbind(1)
        n_global, F = N * shard.dp_size, shard.total
        key = (shard.dp_rank * N + tok) * F + shard.offset + feat
        S = L if scope == "layer" else 1
        if scope == "global":
            key = key + lay * n_global * F
        values = pre[lay, tok, feat]
        m = n_global * self.k * (1 if scope == "layer" else L)
        keep = shard.keep_top(values.view(S, -1), key.view(S, -1), m, "world").flatten()
        mask = torch.zeros_like(cand)
        mask[lay[keep], tok[keep], feat[keep]] = True
        out_values, indices = kernels.mask_to_codes(pre, mask)
        # smallest kept value of the whole batch, the same on every process
        mine = torch.where(keep.view(S, -1), values.view(S, -1), torch.inf).amin(dim=1)
        if layer is None:
            self._update_threshold(enc, (-shard.world_max(-mine)).clamp(min=0))
        return torch.relu(out_values), indices

    @torch.no_grad()
    def _update_threshold(self, enc: SparseEncoder, min_kept: torch.Tensor) -> None:
        if int(enc.threshold_updates) == 0:
            enc.threshold.copy_(min_kept)
        else:
            enc.threshold.lerp_(min_kept.to(enc.threshold.dtype), 1 - self.threshold_ema_decay)
        enc.threshold_updates += 1

    def ema_thresholds(self, enc: SparseEncoder) -> torch.Tensor:
        """``[L, F]`` inference thresholds (per layer or global EMA), float64 on the host."""
        ema = enc.threshold.detach().double().cpu()
        per_layer = ema.expand(enc.n_layers) if ema.numel() == 1 else ema
        return per_layer.view(-1, 1).expand(enc.n_layers, enc.n_features).clone()

    def trained_counts(self, enc: SparseEncoder, x: torch.Tensor) -> torch.Tensor:
        pre = enc.pre_activations(x)
        return (kernels.batchtopk_mask(pre, self.k, self.batchtopk_scope) & (pre > 0)).sum(dim=1)


@dataclass
class JumpReLU(Nonlinearity):
    """``pre * (pre > theta)`` with a learned float32 ``log_threshold [L, F]`` and a
    straight-through gradient (rectangle kernel of width ``jumprelu_bandwidth``)."""

    jumprelu_init_threshold: float = _help("Initial JumpReLU threshold, > 0.", default=0.1)
    jumprelu_bandwidth: float = _help("Width eps of the rectangle kernel of JumpReLU's STE, > 0.",
                                      default=0.1)

    kind: ClassVar[str] = "jumprelu"
    keeps_pre: ClassVar[bool] = True
    exports_as: ClassVar[str | None] = "jump_relu"
    zero_slot_grad: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")

    def init_state(self, enc: SparseEncoder, device: Any) -> None:
        enc.log_threshold = nn.Parameter(torch.full(
            (enc.n_layers, enc.n_features), math.log(self.jumprelu_init_threshold),
            dtype=torch.float32, device=device))
        super().init_state(enc, device)

    def encode(self, enc: SparseEncoder, x: torch.Tensor, layer: int | None) -> Codes:
        pre = enc.pre_activations(x, layer)  # [L, N, F]
        values, indices = kernels.jumprelu_codes(pre, layer_rows(enc.log_threshold, layer),
                                                 self.jumprelu_bandwidth)
        return Codes(values, indices, pre)

    def needs_decoder_norms(self, weights: Any) -> bool:
        return weights.preact_coef > 0

    def loss_terms(self, enc: SparseEncoder, codes: Codes, weights: Any, ramp: float,
                   dec_norms: torch.Tensor | None) -> dict[str, torch.Tensor]:
        terms = {}
        if weights.preact_coef > 0:
            preact = preact_loss(codes.pre, enc.log_threshold.exp(), dec_norms)
            terms["preact"] = weights.preact_coef * enc.shard.sum_features(preact)
        if weights.l0_coef > 0:
            l0 = l0_penalty(codes.pre, enc.log_threshold, self.jumprelu_bandwidth)
            terms["l0"] = weights.l0_coef * ramp * enc.shard.sum_features(l0)
        return terms

    def thresholds(self, enc: SparseEncoder) -> torch.Tensor:
        return enc.log_threshold.detach().exp()

    def window_slots(self, enc: SparseEncoder, codes: Codes,
                     layer: int | None) -> bool | torch.Tensor:
        """Value-0 slots inside the STE window below the threshold (their gradient reaches the
        threshold); padding slots (value 0, index 0) are left out, so they do not pile onto
        feature 0 in a backward."""
        if not torch.is_grad_enabled():
            return False
        if codes.pre is None:
            return True
        with torch.no_grad():
            idx = codes.indices.long()
            log_theta = layer_rows(enc.log_threshold, layer)  # exp in >= fp32, as jumprelu_codes
            theta = log_theta.to(torch.promote_types(log_theta.dtype, torch.float32)).exp()
            theta = theta.gather(1, idx.flatten(1)).view_as(idx)
            # the same arithmetic as jumprelu_codes' selection, so every window slot is kept
            return codes.pre.gather(-1, idx) - theta > -self.jumprelu_bandwidth / 2


@dataclass
class ReLU(Nonlinearity):
    """``relu(pre)``: sparse only through the loss (tanh sparsity, pre-activation loss)."""

    kind: ClassVar[str] = "relu"
    keeps_pre: ClassVar[bool] = True
    exports_as: ClassVar[str | None] = "relu"

    def encode(self, enc: SparseEncoder, x: torch.Tensor, layer: int | None) -> Codes:
        pre = enc.pre_activations(x, layer)
        return Codes(*kernels.relu_codes(pre), pre)

    def needs_decoder_norms(self, weights: Any) -> bool:
        return weights.preact_coef > 0

    def loss_terms(self, enc: SparseEncoder, codes: Codes, weights: Any, ramp: float,
                   dec_norms: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if weights.preact_coef <= 0:
            return {}
        preact = enc.shard.sum_features(preact_loss(codes.pre, None, dec_norms))
        return {"preact": weights.preact_coef * preact}


def make_nonlinearity(kind: str | Nonlinearity, **options: Any) -> Nonlinearity:
    """A nonlinearity object from a kind (registered name or import path) and keyword options;
    options the kind does not take are left out (``CrossLayerTranscoder``'s keyword
    constructor passes every nonlinearity's settings)."""
    if isinstance(kind, Nonlinearity):
        return kind
    names = {f.name for f in fields(NONLINEARITIES.resolve(kind))}
    return NONLINEARITIES.build(kind, {k: v for k, v in options.items() if k in names})
