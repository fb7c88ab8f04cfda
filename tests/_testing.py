"""The one comparison helper of the op tests, and the tolerances that go with each dtype."""

from __future__ import annotations

import math

import pytest
import torch

import kernels

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DTYPE_ID = {F64: "fp64", F32: "fp32", BF16: "bf16"}

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


def ref_molt(x: torch.Tensor, gate: torch.Tensor, Us, Vs) -> torch.Tensor:
    """MoLT ``[L, N, d_out]`` from a dense gate ``[L, N, T]``: every transform on every token,
    ``U_t V_t`` formed explicitly (no code shared with ``kernels/molt.py``)."""
    out, o = 0, 0
    for U, V in zip(Us, Vs, strict=True):
        for t in range(U.shape[1]):
            M = U[:, t] @ V[:, t]  # [L, d_out, d_in]
            out = out + gate[:, :, o + t, None] * torch.bmm(x, M.transpose(1, 2))
        o += U.shape[1]
    return out


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


# ----------------------------------------------------------------------------------------------
# helpers of the op tests (tests/ops)
# ----------------------------------------------------------------------------------------------


def make_codes(L: int, N: int, F: int, K: int, dtype: torch.dtype):
    """Random codes with the awkward cases: an all-padding row and repeated indices in a row."""
    values = torch.randn(L, N, K, dtype=dtype)
    indices = torch.randint(0, F, (L, N, K), dtype=torch.int32)
    values[0, 0], indices[0, 0] = 0, 0  # all-padding row
    if K > 1:
        indices[:, 1::3, -1] = indices[:, 1::3, 0]  # the same feature twice in one row
    return values, indices

def make_decoder(layout, d_out: int, K: int, dtype: torch.dtype):
    # scaled so outputs stay O(1) whatever the number of summed rows (matters for bf16)
    W_dec = torch.randn(layout.n_rows, d_out, dtype=dtype) / math.sqrt(K * layout.reach)
    return W_dec, torch.randn(layout.n_layers, d_out, dtype=dtype)

def ref_codes(src: torch.Tensor, mask: torch.Tensor):
    """Padded codes by a Python loop: each row's picked features in increasing order."""
    L, N, F = mask.shape
    K = max(int(mask.sum(-1).max()), 1)
    values = torch.zeros(L, N, K, dtype=F64)
    indices = torch.zeros(L, N, K, dtype=torch.long)
    for li in range(L):
        for n in range(N):
            ids = [f for f in range(F) if mask[li, n, f]]
            values[li, n, : len(ids)] = src[li, n, ids].to(F64)
            indices[li, n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return values, indices

def dense_upstream(G: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, F: int):
    """``[L, N, F]`` upstream gradient: slot ``j < count`` of each row lands on its feature."""
    L, N, _ = G.shape
    dense = torch.zeros(L, N, F, dtype=F64)
    for li in range(L):
        for n in range(N):
            c = int(counts[li, n])
            dense[li, n, indices[li, n, :c]] += G[li, n, :c].to(F64)
    return dense


def dtypes(*ds):
    return pytest.mark.parametrize("dtype", ds, ids=[DTYPE_ID[d] for d in ds])


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that records gradients."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def grads(out: torch.Tensor, inputs, upstream: torch.Tensor):
    return torch.autograd.grad(out, inputs, upstream)


def make_encoder(L: int, N: int, d_in: int, F: int, dtype: torch.dtype):
    """``x [L, N, d_in]``, ``W_enc [L, d_in, F]``, ``b_enc [L, F]``, drawn in fp32 and cast."""
    x = torch.randn(L, N, d_in).to(dtype)
    W_enc = (torch.randn(L, d_in, F) / math.sqrt(d_in)).to(dtype)
    b_enc = torch.randn(L, F).to(dtype)
    return x, W_enc, b_enc


def ref_pre(x, W_enc, b_enc) -> torch.Tensor:
    return torch.einsum("lnd,ldf->lnf", x.to(F64), W_enc.to(F64)) + b_enc.to(F64).unsqueeze(1)


def assert_separated(score: torch.Tensor, k: int, gap: float = 1e-5) -> None:
    """Precondition: the k-th and (k+1)-th scores of every row differ, so the set is unique."""
    if k < score.shape[-1]:
        top = torch.topk(score, k + 1, dim=-1).values
        assert (top[..., k - 1] - top[..., k]).min() > gap, "test input has a near tie at the cut"


class Spy:
    """Count calls of a launcher while forwarding to it."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls = 0
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)


def decode_cpu(values, indices, W_dec, b_dec, layout):
    """``sparse_decode`` through the CPU path of ``kernels.cpu.decode`` (its autograd Function
    with the kernels off), whatever the interpreter and ``kernels.cpu_fast_paths`` say."""
    from kernels.decode import SparseDecodeFunction

    return SparseDecodeFunction.apply(W_dec, layout, True, False, True, values, indices, b_dec)[0]


def run_on_path(path: str, monkeypatch) -> None:
    """Select ``"torch"`` (the specification), ``"cpu"`` (the CPU fast path) or ``"triton"``
    (the kernels, through the interpreter on CPU) for the rest of a test (tests/ops/conftest.py
    turns the fast paths back on after it)."""
    if path != "triton":
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
    kernels.cpu_fast_paths(path == "cpu")


def pooled_buffers() -> int:
    """Gradient buffers ``kernels.buffers`` holds for donation."""
    return sum(len(v) for v in kernels.buffers._POOL.values())


def newest_checkpoint(run_dir):
    """Path of a run folder's newest complete checkpoint."""
    from clt.checkpoint import list_checkpoints  # pydantic: off the op tests' import path

    found = list_checkpoints(run_dir)
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]
