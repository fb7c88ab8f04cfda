"""FlooredTopK: TopK that also drops winners below a floor, so a token with weak evidence
activates fewer than k features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from clt.encoder import Codes
from clt.nonlinearities import TopK


@dataclass
class FlooredTopK(TopK):
    """The ``k`` largest pre-activations of each (token, layer) that exceed ``floor``.

    Subclassing ``TopK`` keeps its selection kernel, its tensor-parallel exchange (local
    candidates, then the global top k), AuxK and the JumpReLU conversion for export; the floor is
    elementwise, so it needs no exchange of its own.
    """

    floor: float = field(default=0.0, metadata={"help": "Winners with a pre-activation at or "
                                                "below this are dropped, >= 0."})

    kind: ClassVar[str] = "floored_topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.floor >= 0:
            raise ValueError(f"floor must be >= 0 (got {self.floor})")

    def _floored(self, codes: Codes) -> Codes:
        values = torch.where(codes.values > self.floor, codes.values,
                             torch.zeros_like(codes.values))
        return Codes(values, codes.indices, codes.pre)

    def encode(self, enc, x, layer):
        return self._floored(super().encode(enc, x, layer))

    def encode_with_aux(self, enc, x, dead, k_aux):
        codes, aux = super().encode_with_aux(enc, x, dead, k_aux)
        return self._floored(codes), aux
