"""The one comparison helper of the op tests, and the tolerances that go with each dtype."""

from __future__ import annotations

import torch

# (atol, rtol) for a result computed in this dtype and compared with a float64 reference. Inputs
# are O(1) and sums run over at most a few hundred terms: fp32 keeps ~1e-6 relative per op,
# bf16 rounds every stored value to 8 mantissa bits (~4e-3).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (6e-2, 3e-2),
}

_SHOW = 5


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise; NaN matches NaN.

    Tolerances default to ``TOLERANCES[actual.dtype]``. On failure the message gives the max abs
    error and where, the RMS relative error, and the first mismatching indices with both values.
    """
    default_atol, default_rtol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    both_nan = a.isnan() & e.isnan()
    err = (a - e).abs()
    ok = (err <= atol + rtol * e.abs()) | both_nan | (a == e)  # a == e: equal infinities
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    finite = err.nan_to_num(nan=float("inf"))
    worst = int(finite.flatten().argmax())
    worst_idx = tuple(torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
    # RMS of the error over RMS of the reference: one number for "how wrong overall"
    rms_rel = err[~both_nan].square().mean().sqrt() / e[~both_nan].square().mean().sqrt()
    lines = [
        f"{name}: {bad.shape[0]} of {a.numel()} elements differ (shape {tuple(a.shape)}, "
        f"{actual.dtype} vs {expected.dtype}, atol={atol:g}, rtol={rtol:g})",
        f"  max abs error {finite.flatten()[worst].item():.3e} "
        f"at {tuple(int(i) for i in worst_idx)}",
        f"  RMS relative error {rms_rel.item():.3e}",
    ]
    for idx in bad[:_SHOW].tolist():
        i = tuple(idx)
        lines.append(f"  at {i}: actual {a[i].item():.8g}, expected {e[i].item():.8g}")
    if bad.shape[0] > _SHOW:
        lines.append(f"  ... and {bad.shape[0] - _SHOW} more")
    raise AssertionError("\n".join(lines))


def ref_first_row(L: int, F: int, R: int, s: int) -> int:
    """First table row of source ``s``: ``F * P_s`` with ``P_s = sum_{s' < s} min(R, L - s')``."""
    return F * sum(min(R, L - q) for q in range(s))


def ref_dense_activation(values: torch.Tensor, indices: torch.Tensor, F: int) -> torch.Tensor:
    """``[L, N, F]`` float64 activation of the codes; repeated indices add up, padding adds 0."""
    L, N, _ = values.shape
    dense = torch.zeros(L, N, F, dtype=torch.float64)
    return dense.scatter_add(2, indices.long(), values.to(torch.float64))


def ref_decode_dense(A, W_dec, b_dec, L: int, F: int, R: int) -> torch.Tensor:
    """Dense float64 decode ``out[t] = b[t] + sum_s A[s] @ W_s[:, t - s, :]``, rows by explicit
    arithmetic (independent of ``DecoderLayout``)."""
    N, d_out = A.shape[1], W_dec.shape[1]
    W = W_dec.to(torch.float64)
    out = [torch.zeros(N, d_out, dtype=torch.float64) for _ in range(L)]
    for s in range(L):
        R_s = min(R, L - s)
        for t in range(s, s + R_s):
            # row of (source s, feature f, target t) = F * P_s + f * R_s + (t - s)
            rows = ref_first_row(L, F, R, s) + torch.arange(F) * R_s + (t - s)
            out[t] = out[t] + A[s].to(torch.float64) @ W[rows]
    if b_dec is not None:
        out = [o + b_dec[t].to(torch.float64) for t, o in enumerate(out)]
    return torch.stack(out)


def ref_decode(values, indices, W_dec, b_dec, L: int, F: int, R: int) -> torch.Tensor:
    """Dense float64 reference of ``sparse_decode``."""
    return ref_decode_dense(ref_dense_activation(values, indices, F), W_dec, b_dec, L, F, R)


def fit_random_standardizer(model, seed: int = 5):
    """Give ``model`` a non-trivial standardizer and biases (for folding / export tests)."""
    g = torch.Generator().manual_seed(seed)
    st = model.standardizer
    with torch.no_grad():
        st.in_mean.normal_(generator=g)
        st.in_std.uniform_(0.2, 3.0, generator=g)
        st.out_mean.normal_(generator=g)
        st.out_std.uniform_(0.2, 3.0, generator=g)
        model.b_enc.normal_(0, 0.2, generator=g)
        model.b_dec.normal_(generator=g)
    return model


SYNTHETIC = {"n_layers": 3, "d_in": 16, "d_out": 12, "n_true_features": 24, "active_per_layer": 2}
TINY_LM = {"name": "tiny", "tiny_n_layers": 2, "tiny_d_model": 32, "tiny_d_mlp": 64,
           "seq_len": 17, "buffer_tokens": 512, "lm_batch_size": 4}


def write_run_config(folder, kind: str = "topk", source: str = "synthetic", name: str = "run",
                     **sections):
    """A tiny, fast ``train.py`` config in ``folder``; returns ``(config path, run folder)``.

    ``sections`` update the default sections key by key (``data={"lm": {...}}`` replaces ``lm``).
    """
    import json
    from pathlib import Path

    folder = Path(folder)
    k = {"k": 3} if kind in ("topk", "batchtopk") else {}
    data = ({"source": "synthetic", "synthetic": SYNTHETIC, "standardize_tokens": 512}
            if source == "synthetic" else
            {"source": "lm", "standardize_tokens": 256, "lm": dict(TINY_LM)})
    raw = {
        "model": {"n_features": 32},
        "nonlinearity": {"kind": kind, **k},
        "loss": {"sparsity_coef": 0.1} if kind in ("jumprelu", "relu") else {"dead_tokens": 64},
        "data": data,
        "train": {"steps": 8, "batch_tokens": 64, "lr": 3e-3, "device": "cpu"},
        "logging": {"wandb_mode": "disabled", "every": 2, "run_dir": str(folder / "runs"),
                    "run_name": name},
        "eval": {"every": 4, "tokens": 128},
        "checkpoint": {"every": 3, "keep_last": 2},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path, folder / "runs" / name
