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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import kernels
from kernels import DecoderLayout

from .encoder import Architecture, Codes, SparseEncoder, layer_rows
from .nonlinearities import Nonlinearity, make_nonlinearity

__all__ = ["Codes", "CrossLayerTranscoder", "Transcoder", "codes_in_range", "layer_rows"]


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


class CrossLayerTranscoder(SparseEncoder):
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

    shardable = True
    writes_features = True

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        d_out: int,
        n_features: int,
        reach: int | None = None,
        nonlinearity: str | Nonlinearity = "topk",
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
        """``nonlinearity``: an object (``clt.nonlinearities``) or a kind, built from the keyword
        settings it takes (the others are ignored)."""
        super().__init__()
        bounds = list(prefix_bounds or [])
        if bounds and (bounds != sorted(set(bounds)) or bounds[0] < 1 or bounds[-1] != n_features):
            raise ValueError(f"prefix_bounds must increase from >= 1 to n_features, got {bounds}")
        nonlinearity = make_nonlinearity(
            nonlinearity, k=k, batchtopk_scope=batchtopk_scope,
            threshold_ema_decay=threshold_ema_decay, rank_by_decoder_norm=rank_by_decoder_norm,
            jumprelu_init_threshold=jumprelu_init_threshold, jumprelu_bandwidth=jumprelu_bandwidth)
        self.layout = DecoderLayout(n_layers, n_features, reach or n_layers)
        factory = {"dtype": dtype, "device": device}
        self._init_encoder(n_layers, d_in, d_out, n_features, nonlinearity, factory)
        self.W_dec = nn.Parameter(torch.empty(self.layout.n_rows, d_out, **factory))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, **factory))
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_in, d_out, **factory)) if skip else None
        self.prefix_bounds = tuple(bounds) or None
        self._init_state(device)
        self.reset_parameters()

    @property
    def reach(self) -> int:
        return self.layout.reach

    def prefix_ranges(self) -> list[tuple[int, int]]:
        """Matryoshka groups as ``[lo, hi)`` ranges of this module's feature indices (a feature
        shard's cut of the whole model's groups, possibly empty)."""
        off, n = self.shard.offset, self.n_features
        bounds = [0, *(self.prefix_bounds or [self.shard.total])]
        return [(min(max(lo - off, 0), n), min(max(hi - off, 0), n))
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

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

    def decode(self, codes: Codes, bias: bool = True) -> torch.Tensor:
        """Sparse codes -> standardized ``[L, N, d_out]``; ``bias=False`` for AuxK."""
        return self.decode_many([codes], [bias])[0]

    def decode_many(self, codes: Sequence[Codes], biases: Sequence[bool]) -> list[torch.Tensor]:
        """:meth:`decode` of several code sets through one decoder gradient
        (``kernels.sparse_decode_many``). Feature shards decode their own features and sum the
        partials (main and AuxK, or Matryoshka's groups, in one all-reduce when they stack);
        then ``b_dec`` is added."""
        shard = self.shard
        sets = [(c.values, c.indices, self.b_dec if b and shard.tp_size == 1 else None)
                for c, b in zip(codes, biases, strict=True)]
        # only the value-0 slots of JumpReLU (its STE window) carry a gradient the encoder uses
        parts = kernels.sparse_decode_many(sets, self.W_dec, self.layout,
                                           zero_slot_grad=self.nonlinearity.zero_slot_grad)
        if shard.tp_size == 1:
            return parts
        if all(p.shape == parts[0].shape for p in parts):
            parts = list(shard.sum_features(torch.stack(parts)).unbind(0))
        else:
            parts = [shard.sum_features(p) for p in parts]
        return [p + self.b_dec.unsqueeze(1) if b else p
                for p, b in zip(parts, biases, strict=True)]

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

    @torch.no_grad()
    def folded_copy(self) -> CrossLayerTranscoder:
        """A copy whose weights read raw inputs and write raw outputs (identity standardizer).

        ``pre`` is unchanged by the fold, so codes, thresholds and the selection are identical:
        ``W_enc' = W_enc / std_in``, ``b_enc' = b_enc - (mean_in / std_in) @ W_enc``,
        ``W_dec'[., t, :] = W_dec[., t, :] * std_out[t]``, ``b_dec' = b_dec * std_out + mean_out``
        and, with a skip connection, ``W_skip' = W_skip / std_in * std_out`` and ``b_dec'`` less
        ``(mean_in / std_in) @ W_skip * std_out``.
        """
        if self.nonlinearity.rank_by_decoder_norm:
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


@dataclass
class Transcoder(Architecture):
    """Features with decoder rows: a CLT (``reach`` null), a PLT (``reach`` 1) or, with the
    output hook equal to the input hook, an SAE."""

    reach: int | None = field(default=None, metadata={"help": (  # type: ignore[assignment]
        "Decoder reach R: a feature writes to its own layer and the next R-1. null = all "
        "later layers (a CLT); 1 = a per-layer transcoder.")})
    skip: bool = field(default=False, metadata={"help": (
        "Add a linear skip connection W_skip [L, d_in, d_out] (zero at init) from each layer's "
        "input to its output.")})
    matryoshka_prefixes: list[float] | None = field(default=None, metadata={"help": (
        "Matryoshka: nested dictionaries made of the first fraction of the features, increasing "
        "and ending at 1, e.g. [0.0625, 0.125, 0.25, 0.5, 1]; each fraction times n_features must "
        "be a whole number. The reconstruction loss averages over the prefixes (weights: "
        "loss.matryoshka_weights). null = one dictionary.")})

    module = CrossLayerTranscoder

    def __post_init__(self) -> None:
        if self.reach is not None and self.reach < 1:
            raise ValueError(f"reach must be >= 1 or null (got {self.reach})")
        if self.matryoshka_prefixes is not None and not self.matryoshka_prefixes:
            raise ValueError("matryoshka_prefixes must be null or hold at least one fraction")

    def reach_of(self, n_layers: int) -> int:
        return self.reach or n_layers

    def prefix_bounds(self, n_features: int) -> list[int] | None:
        """Matryoshka prefix sizes in features."""
        fractions = self.matryoshka_prefixes
        return None if fractions is None else [round(f * n_features) for f in fractions]

    def build(self, n_layers: int, d_in: int, d_out: int, n_features: int,
              nonlinearity: Nonlinearity, device: Any) -> CrossLayerTranscoder:
        return CrossLayerTranscoder(n_layers, d_in, d_out, n_features, reach=self.reach,
                                    nonlinearity=nonlinearity, skip=self.skip,
                                    prefix_bounds=self.prefix_bounds(n_features), device=device)

    def config_problems(self, cfg: Any) -> list[tuple[str, str]]:
        return self._matryoshka_problems(cfg) + self._reach_problems(cfg)

    def _matryoshka_problems(self, cfg: Any) -> list[tuple[str, str]]:
        fractions, weights = self.matryoshka_prefixes, cfg.loss.matryoshka_weights
        f = cfg.model.n_features
        if fractions is None:
            return [("loss.matryoshka_weights", "needs model.matryoshka_prefixes")] if weights \
                else []
        problems = []
        sizes = [x * f for x in fractions]
        if fractions != sorted(set(fractions)) or fractions[0] <= 0 or fractions[-1] != 1:
            problems.append(("model.matryoshka_prefixes", "must increase strictly within (0, 1] "
                             f"and end at 1 (got {fractions})"))
        elif any(abs(n - round(n)) > 1e-9 for n in sizes):
            problems.append(("model.matryoshka_prefixes", f"fractions of n_features = {f} must be "
                             f"whole numbers of features (got {[round(n, 3) for n in sizes]})"))
        if weights is not None and len(weights) != len(fractions):
            problems.append(("loss.matryoshka_weights", f"needs one weight per prefix "
                             f"({len(fractions)}), got {len(weights)}"))
        return problems

    def _reach_problems(self, cfg: Any) -> list[tuple[str, str]]:
        reach, n = self.reach, cfg.n_layers
        if reach is not None and n is not None and reach > n:
            return [("model.reach", f"must be between 1 and the {n} trained layers (got {reach})")]
        if cfg.is_sae and self.reach_of(n or 1) != 1:
            lm = cfg.data.lm
            hooks = f"data.lm.output_hook == data.lm.input_hook == '{lm.input_hook}'"
            return [("model.reach", f"must be 1 for an SAE ({hooks}) (got "
                     f"{'null' if reach is None else reach})")]
        return []
