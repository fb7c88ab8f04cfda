"""Per (layer, dim) standardization of inputs and targets.

Statistics are estimated once, streaming, in float64 (Chan et al.'s parallel merge of batch means
and sums of squared deviations, stable where ``E[x^2] - E[x]^2`` is not), stored as buffers so they
travel with every checkpoint, and folded into the weights on export.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# A dimension whose std is below this is constant in the data: leave it unscaled.
MIN_STD = 1e-6


class RunningMoments:
    """Streaming float64 mean and variance over the token axis of ``[L, n, d]`` batches."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # [L, d]
        self.m2: torch.Tensor | None = None  # [L, d] sum of squared deviations

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to(device="cpu", dtype=torch.float64)
        n = batch.shape[1]
        if n == 0:
            return
        mean_b = batch.mean(dim=1)
        m2_b = ((batch - mean_b.unsqueeze(1)) ** 2).sum(dim=1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"batch shape {tuple(batch.shape)} does not match earlier batches")
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n / total)
        self.count = total

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and std ``[L, d]`` (float64); constant dims get std 1."""
        if self.mean is None or self.count < 2:
            raise ValueError("need at least 2 tokens to estimate standardization statistics")
        std = (self.m2 / self.count).sqrt()
        return self.mean, torch.where(std < MIN_STD, torch.ones_like(std), std)


def _like(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[L, d]`` statistic as ``[L, 1, d]`` in the activations' dtype."""
    return stat.to(x.dtype).unsqueeze(1)


class Standardizer(nn.Module):
    """Affine per (layer, dim) maps ``x -> (x - mean) / std``; identity until fitted."""

    def __init__(self, n_layers: int, d_in: int, d_out: int) -> None:
        super().__init__()
        # float64 like the estimate: folding into the weights then loses nothing
        f64 = {"dtype": torch.float64}
        self.register_buffer("in_mean", torch.zeros(n_layers, d_in, **f64))
        self.register_buffer("in_std", torch.ones(n_layers, d_in, **f64))
        self.register_buffer("out_mean", torch.zeros(n_layers, d_out, **f64))
        self.register_buffer("out_std", torch.ones(n_layers, d_out, **f64))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("n_tokens", torch.tensor(0, dtype=torch.int64))

    @torch.no_grad()
    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_tokens: int) -> int:
        """Estimate from ``(x [L, n, d_in], y [L, n, d_out])`` batches until ``n_tokens`` are seen.

        Returns the number of tokens used (all of every batch consumed, so at least n_tokens
        unless the iterable ran out first, which is an error).
        """
        moments_in, moments_out = RunningMoments(), RunningMoments()
        for x, y in batches:
            moments_in.update(x)
            moments_out.update(y)
            if moments_in.count >= n_tokens:
                break
        if moments_in.count < n_tokens:
            raise ValueError(f"data ran out after {moments_in.count} of {n_tokens} tokens")
        in_mean, in_std = moments_in.mean_std()
        out_mean, out_std = moments_out.mean_std()
        for name, value in (("in_mean", in_mean), ("in_std", in_std), ("out_mean", out_mean),
                            ("out_std", out_std)):
            buf = getattr(self, name)
            if buf.shape != value.shape:
                raise ValueError(f"{name}: data gives {tuple(value.shape)}, model has "
                                 f"{tuple(buf.shape)}")
            buf.copy_(value)
        self.fitted.fill_(True)
        self.n_tokens.fill_(moments_in.count)
        return moments_in.count

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[L, N, d_in]`` raw inputs -> standardized."""
        return (x - _like(self.in_mean, x)) / _like(self.in_std, x)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """``[L, N, d_out]`` raw targets -> standardized."""
        return (y - _like(self.out_mean, y)) / _like(self.out_std, y)

    def restore_targets(self, y_std: torch.Tensor) -> torch.Tensor:
        """Standardized outputs -> raw MLP-output scale."""
        return y_std * _like(self.out_std, y_std) + _like(self.out_mean, y_std)

    @torch.no_grad()
    def reset_(self) -> None:
        """Back to the identity (after the statistics were folded into the weights)."""
        self.in_mean.zero_()
        self.in_std.fill_(1)
        self.out_mean.zero_()
        self.out_std.fill_(1)
