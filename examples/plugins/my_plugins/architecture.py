"""TiedTranscoder: a per-layer transcoder whose decoder is its encoder transposed (tied weights),
as an architecture plug-in. Feature ``i`` of layer ``l`` reads and writes the same direction
``w = W_enc[l, :, i]``: ``yhat[l] = b_dec[l] + sum_j v_j w_{i_j}``, so the input and output
widths must be equal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from clt.encoder import Architecture, Codes, SparseEncoder, layer_rows
from clt.nonlinearities import Nonlinearity


class TiedTranscoderModule(SparseEncoder):
    """``W_enc [L, d, F]`` (shared by encoder and decoder), ``b_enc [L, F]``, ``b_dec [L, d]``.

    What the trainer asks of a ``SparseEncoder`` subclass: ``outputs`` (the reconstructions and
    the AuxK output), ``decoder_norms`` (rank-by-norm selection, sparsity penalties) and
    ``forward`` / ``reconstruct`` (evaluation). Selection, thresholds, dead-feature counters, AuxK
    candidates and the standardizer come from ``SparseEncoder``.
    """

    def __init__(self, n_layers: int, d: int, n_features: int, nonlinearity: Nonlinearity,
                 init_norm: float, device: Any = None) -> None:
        super().__init__()
        self._init_encoder(n_layers, d, d, n_features, nonlinearity, {"device": device})
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d, device=device))
        self._init_state(device)
        with torch.no_grad():  # random directions of norm init_norm (from the global seed)
            w = torch.randn(n_layers, d, n_features, device=device)
            self.W_enc.copy_(init_norm * w / w.norm(dim=1, keepdim=True))

    def decoder_norms(self) -> torch.Tensor:
        """``[L, F]``: a feature's decoder row is its encoder column."""
        return self.W_enc.norm(dim=1)

    def decode(self, codes: Codes, bias: bool = True, layer: int | None = None) -> torch.Tensor:
        """``[L, N, d]`` sum of each token's active directions, weighted by their values."""
        W = layer_rows(self.W_enc, layer).transpose(1, 2)  # [L, F, d]
        layers = torch.arange(W.shape[0], device=W.device).view(-1, 1, 1)
        rows = W[layers, codes.indices.long()]  # [L, N, K, d]
        out = (codes.values.unsqueeze(-1) * rows).sum(dim=2)
        return out + layer_rows(self.b_dec, layer).unsqueeze(1) if bias else out

    def outputs(self, x: torch.Tensor, codes: Codes, aux: Codes | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``([yhat], e_aux)``: AuxK's dead features decode without the bias."""
        return [self.decode(codes)], None if aux is None else self.decode(aux, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Codes]:
        codes = self.encode(x)
        return self.decode(codes), codes


@dataclass
class TiedTranscoder(Architecture):
    """A per-layer transcoder with tied weights (``model.architecture`` =
    ``my_plugins.architecture:TiedTranscoder``); its argument sits beside it in ``model``."""

    init_norm: float = field(default=1.0, metadata={"help": "Norm of each feature's direction "
                                                    "at init, > 0."})

    kind: ClassVar[str] = "tied_transcoder"
    module = TiedTranscoderModule  # shardable is False: the config keeps it to one process

    def __post_init__(self) -> None:
        if not self.init_norm > 0:
            raise ValueError(f"init_norm must be > 0 (got {self.init_norm})")

    def build(self, n_layers: int, d_in: int, d_out: int, n_features: int,
              nonlinearity: Nonlinearity, device: Any) -> TiedTranscoderModule:
        if d_in != d_out:
            raise ValueError(f"tied weights need equal input and output widths "
                             f"(got d_in={d_in}, d_out={d_out})")
        return TiedTranscoderModule(n_layers, d_in, n_features, nonlinearity, self.init_norm,
                                    device)
