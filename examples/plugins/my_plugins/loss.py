"""WeightedL1: the L1 sparsity penalty ``sum_i a_i * ||W_dec_i||`` (Anthropic's linear form of
the tanh penalty), as an extra loss term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from clt.losses import LossContext, LossTerm


@dataclass
class WeightedL1(LossTerm):
    """Activations times their feature's decoder norm, summed over features, averaged over
    tokens, summed over layers (the units of the reconstruction loss)."""

    kind: ClassVar[str] = "weighted_l1"

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        norms = ctx.model.decoder_norms()  # [L, F] of this process's features
        idx = ctx.codes.indices.long()
        weighted = ctx.codes.values * norms.gather(1, idx.flatten(1)).view_as(idx)
        # a sum over features: every feature shard adds its part
        return ctx.sum_features(weighted.sum(dim=-1).mean(dim=-1).sum())
