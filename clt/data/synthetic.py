"""Synthetic activations from a planted sparse crosslayer dictionary.

Each source layer ``s`` has ``n_true`` ground-truth features; a token activates
``active_per_layer`` of them per layer with magnitudes in ``[0.5, 1.5]``. A feature reads one
random unit direction of ``x[s]`` and writes a random vector to every target ``t >= s``, so
``y[t]`` depends on the features of all earlier layers: a crosslayer transcoder can explain it,
a per-layer transcoder (which sees only ``x[t]``) cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_


class PlantedDictionary:
    """A stream of ``(x [L, n, d_in], y [L, n, d_out])`` batches with known structure."""

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        d_out: int,
        n_true_features: int = 256,
        active_per_layer: int = 4,
        noise: float = 0.0,
        seed: int = 0,
        shard: int = 0,
    ) -> None:
        if not 1 <= active_per_layer <= n_true_features:
            raise ValueError(f"active_per_layer must be in 1..{n_true_features}, "
                             f"got {active_per_layer}")
        g = torch.Generator().manual_seed(seed)
        self.n_layers, self.d_in, self.d_out = n_layers, d_in, d_out
        self.active, self.noise, self.seed = active_per_layer, noise, seed
        self.n_true = n_true_features
        # [L, n_true, d_in] unit read directions
        self.enc = F_.normalize(torch.randn(n_layers, n_true_features, d_in, generator=g), dim=-1)
        # [L_source, n_true, L_target, d_out]; writes to targets before the source are zero
        dec = torch.randn(n_layers, n_true_features, n_layers, d_out, generator=g) / d_out**0.5
        causal = torch.ones(n_layers, n_layers).triu().view(n_layers, 1, n_layers, 1)
        self.dec = dec * causal
        # the same dictionary everywhere; each data-parallel shard samples its own tokens
        self.generator = torch.Generator().manual_seed(seed + 1 + 100_003 * shard)

    def sample_codes(self, n: int) -> torch.Tensor:
        """``[L, n, n_true]`` ground-truth activations."""
        L, g = self.n_layers, self.generator
        chosen = torch.rand(L, n, self.n_true, generator=g).topk(self.active, dim=-1).indices
        magnitude = 0.5 + torch.rand(L, n, self.active, generator=g)
        return torch.zeros(L, n, self.n_true).scatter_(2, chosen, magnitude)

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.sample_codes(n)
        x = torch.einsum("lni,lid->lnd", a, self.enc)
        y = torch.einsum("sni,sitd->tnd", a, self.dec)
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=self.generator)
            y = y + self.noise * torch.randn(y.shape, generator=self.generator)
        return x, y

    def heldout_batches(self, n_tokens: int, batch: int = 4096) -> list[tuple[torch.Tensor, ...]]:
        """Fixed evaluation batches: the same tokens on every call, from a separate stream."""
        stream = self.generator
        self.generator = torch.Generator().manual_seed(self.seed + 2)
        try:
            sizes = [min(batch, n_tokens - i) for i in range(0, n_tokens, batch)]
            return [self.next_batch(n) for n in sizes]
        finally:
            self.generator = stream

    def close(self) -> None:
        """Nothing to release (the LM source stops its producer here)."""

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
