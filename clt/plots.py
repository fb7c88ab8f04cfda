"""PNG figures of a run: feature density per layer, and FVU / L0 per layer."""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Firing frequencies below this are drawn in the "never" bar (log10 of 0 is -inf).
NEVER = 1e-10


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on training machines).
    Deferred: it takes ~0.5 s of every command's start (train.py imports this module) and only
    a drawing needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_feature_density(freq: torch.Tensor, path: Path, title: str = "") -> Path:
    """One histogram of log10(firing frequency) per layer; ``freq [L, F]`` fires per token."""
    freq = freq.detach().double().cpu()
    L = freq.shape[0]
    cols = min(L, 4)
    rows = math.ceil(L / cols)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for layer, ax in enumerate(axes.flat):
        if layer >= L:
            ax.axis("off")
            continue
        f = freq[layer]
        never = int((f < NEVER).sum())
        ax.hist(f[f >= NEVER].log10().numpy(), bins=40, range=(-8, 0), color="tab:blue")
        ax.set_title(f"layer {layer}: {never} never fired", fontsize=9)
        ax.set_xlabel("log10 fires per token", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "feature density (held-out)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_layer_metrics(fvu: torch.Tensor, l0: torch.Tensor, path: Path, title: str = "") -> Path:
    """Bars of FVU and L0 per layer."""
    fvu, l0 = fvu.detach().float().cpu(), l0.detach().float().cpu()
    layers = list(range(len(fvu)))
    plt = _pyplot()
    fig, (ax_fvu, ax_l0) = plt.subplots(1, 2, figsize=(8, 3))
    ax_fvu.bar(layers, fvu.numpy(), color="tab:red")
    ax_fvu.set(xlabel="layer", ylabel="FVU", title="fraction of variance unexplained")
    ax_l0.bar(layers, l0.numpy(), color="tab:green")
    ax_l0.set(xlabel="layer", ylabel="L0", title="active features per token")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
