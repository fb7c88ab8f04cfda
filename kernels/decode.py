"""Sparse crosslayer decode: Triton kernels (forward, backward), the torch specification, the op.

The decoder's row table is described in :mod:`kernels.layout`: the row of (source ``s``,
feature ``f``, target ``t``) is ``F * P_s + f * R_s + t - s``.

    out[t, n] = b_dec[t] + sum_{s <= t < s + R_s} sum_j v[s, n, j] * W_dec[s][idx[s, n, j], t - s]

with ``v = values`` and ``idx = indices``.

Backward, with ``row(s, n, j, t)`` the row above and ``g = grad_out``:

    grad_values[s, n, j] = sum_{t = s}^{s + R_s - 1} <g[t, n], W_dec[row(s, n, j, t)]>
    grad_W_dec[row]      = sum_{(s, n, j, t) -> row} values[s, n, j] * g[t, n]
    grad_b_dec[t]        = sum_n g[t, n]

Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``), fp32 accumulation, int64 offsets:

- ``_decode_fwd_kernel``: one program per (block of tokens, target, block of d_out) loops over the
  sources reaching its target and their K slots and gathers the named rows; slots holding 0
  (padding) mask their row load, so they cost no memory traffic. No atomics.
- ``_decode_bwd_kernel``: one program per (block of flattened (token, slot) entries, source) walks
  the source's ``R_s`` targets and d_out, and reduces ``<g, W_row>`` into ``grad_values``. With
  ``ATOMIC_GRAD_W`` it also ``atomic_add``s ``value * g`` into the rows (the fast, non
  deterministic decoder gradient: the ``g`` tile is already in registers).
- ``_decode_bwd_grad_w_kernel`` (deterministic decoder gradient, the default): the nonzero entries
  are sorted by (source, feature) with a stable torch sort, ``searchsorted`` gives each feature's
  segment, and one program per (feature, source, block of d_out) sums its segment in a fixed order
  and writes all ``R_s`` rows of the feature (zeros for inactive features: every element of
  ``grad_W_dec`` is written exactly once, no memset, no atomics, bitwise reproducible).

Why deterministic is the default (argued from traffic; not yet timed on a GPU, the benchmark has
both as ``triton`` / ``triton-atomic``): at GPT-2-small size (L=12, N=4096, k=16, d_out=768,
F=8192, fp32) the active (token, slot, target) rows are ``N*k*L(L+1)/2*d_out*4`` B = 15.7 GB. The
atomic variant reads them once and issues as many fp32 read-modify-writes into a 2 GB table that
does not fit L2, after a 2 GB memset (~49 GB); the deterministic one reads them once, gathers as
much of grad_out (151 MB, partly L2-resident) and writes the table once (~34 GB), and the
training run is reproducible.

Float64 inputs never run a kernel (the kernels compute in fp32; fp64 is for references and
gradcheck). Off Triton the op runs :func:`sparse_decode_torch`, the specification (a gather of
the named rows per source, plain autograd), or with ``kernels.cpu_fast_paths`` on (opt-in)
the CPU performance path of :mod:`kernels.cpu.decode`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import buffers
from ._dispatch import fit_block, interpreter_on, pick_path
from .compile_check import CompileJob
from .cpu import decode as cpu_decode
from .layout import DecoderLayout, check_codes, layout_tables

# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _decode_fwd_kernel(
    values_ptr,  # [L, N, K]
    indices_ptr,  # [L, N, K]
    W_ptr,  # [F * P, d_out]
    b_ptr,  # [L, d_out] (unused without HAS_BIAS)
    row_off_ptr,  # [L + 1] int64, first row of each source
    out_ptr,  # [L, N, d_out]
    N,
    K,
    d_out,
    n_layers,
    reach,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_n = tl.cast(pid_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.cast(pid_d, tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < d_out
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for s in range(tl.maximum(t - reach + 1, 0), t + 1):
        R_s = tl.minimum(reach, n_layers - s)
        # row of (s, f, t) = first row of s + f * R_s + (t - s)
        base = tl.load(row_off_ptr + s) + (t - s)
        code = (tl.cast(s, tl.int64) * N + offs_n) * K  # [BLOCK_N], slot 0 of each token
        for j in range(K):
            v = tl.load(values_ptr + code + j, mask=mask_n, other=0.0).to(tl.float32)
            idx = tl.load(indices_ptr + code + j, mask=mask_n, other=0).to(tl.int64)
            rows = base + idx * R_s
            # padded slots (value 0) and tokens past N: masked load, no memory traffic
            live = (v != 0.0)[:, None] & mask_d[None, :]
            w = tl.load(W_ptr + rows[:, None] * d_out + offs_d[None, :], mask=live, other=0.0)
            acc += v[:, None] * w.to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + tl.cast(t, tl.int64) * d_out + offs_d, mask=mask_d, other=0.0)
        acc += b.to(tl.float32)[None, :]
    out_ptrs = out_ptr + (tl.cast(t, tl.int64) * N + offs_n[:, None]) * d_out + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _decode_bwd_kernel(
    values_ptr,  # [L, N, K]
    indices_ptr,  # [L, N, K]
    W_ptr,  # [F * P, d_out]
    grad_out_ptr,  # [L, N, d_out]
    row_off_ptr,  # [L + 1] int64
    grad_values_ptr,  # [L, N, K]
    grad_W_ptr,  # [F * P, d_out] fp32, zeroed (only with ATOMIC_GRAD_W)
    N,
    K,
    d_out,
    n_layers,
    reach,
    ATOMIC_GRAD_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    n_entries = tl.cast(N, tl.int64) * K
    # entry m = n * K + j of source s
    offs_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_entries
    code = tl.cast(s, tl.int64) * n_entries + offs_m
    idx = tl.load(indices_ptr + code, mask=mask_m, other=0).to(tl.int64)
    tok = offs_m // K
    R_s = tl.minimum(reach, n_layers - s).to(tl.int64)
    first = tl.load(row_off_ptr + s) + idx * R_s  # [BLOCK_M] row of target s
    if ATOMIC_GRAD_W:
        v = tl.load(values_ptr + code, mask=mask_m, other=0.0).to(tl.float32)
        live = mask_m & (v != 0.0)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r in range(R_s):
        rows = first + r
        g_rows = tl.cast(s + r, tl.int64) * N + tok
        for d0 in range(0, d_out, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < d_out
            mask = mask_m[:, None] & mask_d[None, :]
            w = tl.load(W_ptr + rows[:, None] * d_out + offs_d[None, :], mask=mask, other=0.0)
            g = tl.load(grad_out_ptr + g_rows[:, None] * d_out + offs_d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * g, axis=1)
            if ATOMIC_GRAD_W:
                tl.atomic_add(grad_W_ptr + rows[:, None] * d_out + offs_d[None, :],
                              v[:, None] * g, mask=live[:, None] & mask_d[None, :], sem="relaxed")
    tl.store(grad_values_ptr + code, acc.to(grad_values_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _decode_bwd_grad_w_kernel(
    values_ptr,  # [L, N, K]
    grad_out_ptr,  # [L, N, d_out]
    row_off_ptr,  # [L + 1] int64
    perm_ptr,  # [L * N * K] int64, flattened entry ids sorted by (source, feature)
    seg_ptr,  # [L * F + 1] int64, feature s * F + f owns perm[seg[i] : seg[i + 1]]
    grad_W_ptr,  # [F * P, d_out]
    N,
    K,
    F,
    d_out,
    n_layers,
    reach,
    ACCUMULATE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    f = tl.program_id(0)
    s = tl.program_id(1)
    pid_d = tl.program_id(2)
    feat = tl.cast(s, tl.int64) * F + f
    start = tl.load(seg_ptr + feat)
    end = tl.load(seg_ptr + feat + 1)
    R_s = tl.minimum(reach, n_layers - s).to(tl.int64)
    row0 = tl.load(row_off_ptr + s) + tl.cast(f, tl.int64) * R_s
    offs_d = tl.cast(pid_d, tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_out
    for r in range(R_s):
        g_base = tl.cast(s + r, tl.int64) * N
        # a fixed summation order (sorted entries, fixed blocks): bitwise reproducible
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < end
            p = tl.load(perm_ptr + offs_e, mask=mask_e, other=0)
            v = tl.load(values_ptr + p, mask=mask_e, other=0.0).to(tl.float32)
            tok = (p // K) % N
            g = tl.load(grad_out_ptr + (g_base + tok)[:, None] * d_out + offs_d[None, :],
                        mask=mask_e[:, None] & mask_d[None, :], other=0.0)
            acc += v[:, None] * g.to(tl.float32)
        total = tl.sum(acc, axis=0)
        ptrs = grad_W_ptr + (row0 + r) * d_out + offs_d
        if ACCUMULATE:  # add to rows this feature's entries touch; leave the others unread
            touched = mask_d & (end > start)
            total += tl.load(ptrs, mask=touched, other=0.0).to(tl.float32)
            tl.store(ptrs, total.to(grad_W_ptr.dtype.element_ty), mask=touched)
        else:
            tl.store(ptrs, total.to(grad_W_ptr.dtype.element_ty), mask=mask_d)


# ------------------------------------------------------------------------------------------------
# Host launchers
# ------------------------------------------------------------------------------------------------

# GPU block sizes (rows = tokens or (token, slot) entries per program, columns of d_out), from
# the sm_90 compile check (registers at 4 warps, fp32 / bf16 W): every [rows, BLOCK_D] gathered
# tile costs ~6 registers per element (a 64-bit address per element for W and grad_out), so
# 16 x 128 keeps the forward and the grad_W reduction at ~96 registers; the fused backward holds
# W, grad_out and the atomic target at once and needs 16 x 64 (~167 with atomics, 126 without;
# 16 x 128 reaches 255 and a stack frame). compile_jobs() holds all at 0 spills.
# Under the interpreter every program is a Python loop: small blocks keep tiny shapes tiny.
GPU_BLOCKS = {"fwd": (16, 128), "bwd": (16, 64), "grad_w": (16, 128)}
INTERPRET_BLOCKS = (8, 32)


def _blocks(
    kernel: str, rows: int, d_out: int, block_rows: int | None, block_d: int | None
) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_D)``: the per-kernel caps, shrunk to small problems, or overrides."""
    cap_rows, cap_d = INTERPRET_BLOCKS if interpreter_on() else GPU_BLOCKS[kernel]
    floor = 1 if interpreter_on() else 16
    return (fit_block(cap_rows, rows, floor) if block_rows is None else block_rows,
            fit_block(cap_d, d_out, floor) if block_d is None else block_d)


def sparse_decode_fwd(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    layout: DecoderLayout,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Triton forward: ``[L, N, d_out]`` in ``W_dec``'s dtype (into ``out`` when given)."""
    L, N, K = values.shape
    d_out = W_dec.shape[1]
    values, indices, W_dec = values.contiguous(), indices.contiguous(), W_dec.contiguous()
    if out is None:
        out = torch.empty(L, N, d_out, dtype=W_dec.dtype, device=W_dec.device)
    row_off = layout_tables(layout, W_dec.device)[0]
    block_n, block_d = _blocks("fwd", N, d_out, block_n, block_d)
    grid = (triton.cdiv(N, block_n), L, triton.cdiv(d_out, block_d))
    _decode_fwd_kernel[grid](
        values_ptr=values, indices_ptr=indices, W_ptr=W_dec,
        b_ptr=W_dec if b_dec is None else b_dec.contiguous(), row_off_ptr=row_off, out_ptr=out,
        N=N, K=K, d_out=d_out, n_layers=L, reach=layout.reach,
        HAS_BIAS=b_dec is not None, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out


def sparse_decode_bwd(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    layout: DecoderLayout,
    *,
    need_values: bool = True,
    need_W: bool = True,
    deterministic: bool = True,
    grad_values: torch.Tensor | None = None,
    grad_W: torch.Tensor | None = None,
    accumulate: bool = False,
    block_rows: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton backward: ``(grad_values, grad_W_dec)``, each None when not needed.

    ``grad_values`` / ``grad_W`` are optional output buffers (fully overwritten), or with
    ``accumulate`` ``grad_W`` is required and this decode's gradient is added to it (only the
    rows its codes read are touched). The atomic variant (``deterministic=False``) accumulates
    into a zeroed fp32 table of its own instead.
    """
    if accumulate and grad_W is None:
        raise ValueError("sparse_decode_bwd: accumulate=True needs the grad_W to add to")
    L, N, K = values.shape
    d_out = W_dec.shape[1]
    grad_out, values, indices = grad_out.contiguous(), values.contiguous(), indices.contiguous()
    W_dec = W_dec.contiguous()
    row_off, reach, feature_rows = layout_tables(layout, W_dec.device)
    atomic = need_W and not deterministic
    gW_atomic = None
    if atomic:
        # fp32 accumulation target of the atomics, whatever W's dtype
        gW_atomic = torch.zeros(W_dec.shape, dtype=torch.float32, device=W_dec.device)
    if need_values or atomic:
        if grad_values is None:
            grad_values = torch.empty_like(values)
        bm, bd = _blocks("bwd", N * K, d_out, block_rows, block_d)
        grid = (triton.cdiv(N * K, bm), L)
        _decode_bwd_kernel[grid](
            values_ptr=values, indices_ptr=indices, W_ptr=W_dec, grad_out_ptr=grad_out,
            row_off_ptr=row_off, grad_values_ptr=grad_values,
            grad_W_ptr=gW_atomic if atomic else grad_values,
            N=N, K=K, d_out=d_out, n_layers=L, reach=layout.reach,
            ATOMIC_GRAD_W=atomic, BLOCK_M=bm, BLOCK_D=bd,
        )
    if not need_W:
        return (grad_values if need_values else None), None
    if atomic:
        if grad_W is None:
            grad_W = gW_atomic.to(W_dec.dtype)
        else:
            grad_W.add_(gW_atomic) if accumulate else grad_W.copy_(gW_atomic)
        return (grad_values if need_values else None), grad_W
    # deterministic: sort the nonzero entries by (source, feature); zeros carry no gradient and
    # get the key n_rows, past every feature, so no segment holds them
    keys = row_off[:L, None, None] + indices.long() * reach[:, None, None]  # [L, N, K]
    keys = keys.masked_fill(values == 0, layout.n_rows).flatten()
    sorted_keys, perm = torch.sort(keys, stable=True)
    seg = torch.searchsorted(sorted_keys, feature_rows)  # [L * F + 1]
    if grad_W is None:
        grad_W = torch.empty_like(W_dec)
    be, bd = _blocks("grad_w", N * K, d_out, block_rows, block_d)
    grid = (layout.n_features, L, triton.cdiv(d_out, bd))
    _decode_bwd_grad_w_kernel[grid](
        values_ptr=values, grad_out_ptr=grad_out, row_off_ptr=row_off, perm_ptr=perm,
        seg_ptr=seg, grad_W_ptr=grad_W,
        N=N, K=K, F=layout.n_features, d_out=d_out, n_layers=L, reach=layout.reach,
        ACCUMULATE=accumulate, BLOCK_E=be, BLOCK_D=bd,
    )
    return (grad_values if need_values else None), grad_W


# ------------------------------------------------------------------------------------------------
# autograd, the torch specification and the public op
# ------------------------------------------------------------------------------------------------


class SparseDecodeFunction(torch.autograd.Function):
    """Autograd of one or more decodes through one ``W_dec`` (``kernels``: the Triton launchers,
    else the CPU path of :mod:`kernels.cpu.decode`); ``codes`` is ``values, indices, b_dec`` per
    decode. It saves only the codes and ``W_dec``; the decodes share one decoder gradient
    (autograd through a gather, or one call per decode, would build one ``W_dec``-sized gradient
    each and add them up)."""

    @staticmethod
    def forward(ctx, W_dec, layout, deterministic, kernels, zero_slot_grad, *codes):
        sets = [codes[i : i + 3] for i in range(0, len(codes), 3)]
        ctx.save_for_backward(W_dec, *[t for v, i, _ in sets for t in (v, i)])
        ctx.layout, ctx.deterministic, ctx.kernels = layout, deterministic, kernels
        ctx.zero_slot_grad = zero_slot_grad
        ctx.b_dtypes = [None if b is None else b.dtype for *_, b in sets]
        ctx.set_materialize_grads(False)  # an unused output (e.g. AuxK's, skipped) costs nothing
        fwd = sparse_decode_fwd if kernels else cpu_decode.decode_fwd
        return tuple(fwd(v, i, W_dec, b, layout) for v, i, b in sets)

    @staticmethod
    def backward(ctx, *grad_outs):
        W_dec, *flat = ctx.saved_tensors
        codes = list(zip(flat[0::2], flat[1::2], strict=True))
        need_w = ctx.needs_input_grad[0]
        need_v = list(ctx.needs_input_grad[5::3])
        need_b = list(ctx.needs_input_grad[7::3])
        # the gradient of a .sum() arrives expanded (stride 0): the kernels need it dense
        grad_outs = [None if g is None else g.contiguous() for g in grad_outs]
        if ctx.kernels:
            grad_values, grad_W = _triton_backward(grad_outs, codes, W_dec, ctx.layout, need_v,
                                                   need_w, ctx.deterministic)
        elif need_w or any(need_v):
            grad_values, grad_W = cpu_decode.decode_bwd(
                grad_outs, codes, W_dec, ctx.layout, need_values=need_v, need_W=need_w,
                zero_slot_grad=ctx.zero_slot_grad)
        else:
            grad_values, grad_W = [None] * len(codes), None
        grads = []
        for g, gv, nb, b_dtype in zip(grad_outs, grad_values, need_b, ctx.b_dtypes, strict=True):
            gb = None
            if nb and g is not None:
                acc = torch.promote_types(g.dtype, torch.float32)  # fp32 or fp64
                gb = g.sum(1, dtype=acc).to(b_dtype)
            grads += [gv, None, gb]
        return grad_W, None, None, None, None, *grads


def _triton_backward(grad_outs, codes, W_dec, layout, need_v, need_w, deterministic):
    """Per decode one Triton backward; the first writes the decoder gradient (into a recycled
    buffer), the others add to it."""
    grad_values, grad_W = [], None
    for (values, indices), g, nv in zip(codes, grad_outs, need_v, strict=True):
        if g is None:
            grad_values.append(torch.zeros_like(values) if nv else None)
            continue
        if not (nv or need_w):
            grad_values.append(None)
            continue
        target = grad_W if grad_W is not None or not need_w else \
            buffers.empty(W_dec.shape, W_dec.dtype, W_dec.device)
        gv, gw = sparse_decode_bwd(g, values, indices, W_dec, layout, need_values=nv,
                                   need_W=need_w, deterministic=deterministic, grad_W=target,
                                   accumulate=grad_W is not None)
        grad_values.append(gv)
        grad_W = gw if need_w else None
    return grad_values, grad_W


def sparse_decode_torch(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    layout: DecoderLayout,
) -> torch.Tensor:
    """Specification of :func:`sparse_decode` (plain autograd): per source, gather the named
    ``[R_s, d_out]`` writes, weight them by the values and add them into the source's targets;
    computed in fp32 (fp64 for fp64 inputs) and cast to ``W_dec``'s dtype."""
    L, N, _ = values.shape
    acc = torch.promote_types(W_dec.dtype, torch.float32)
    out = W_dec.new_zeros(L, N, W_dec.shape[1], dtype=acc)
    for s in range(L):
        W_s = layout.source_view(W_dec, s).to(acc)  # [F, R_s, d_out]
        writes = W_s[indices[s].long()]  # [N, K, R_s, d_out]
        part = (values[s].to(acc)[:, :, None, None] * writes).sum(1)  # [N, R_s, d_out]
        targets = torch.arange(s, s + layout.reach_of(s), device=out.device)
        out = out.index_add(0, targets, part.transpose(0, 1))
    if b_dec is not None:
        out = out + b_dec.to(acc).unsqueeze(1)
    return out.to(W_dec.dtype)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    layout: DecoderLayout,
    *,
    deterministic: bool = True,
) -> torch.Tensor:
    """Decode sparse codes into crosslayer outputs.

    Runs the Triton kernels on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``) when values,
    W_dec and b_dec are fp32 or bf16, otherwise the CPU fast path (``kernels.cpu_fast_paths``,
    opt-in) or the torch specification :func:`sparse_decode_torch` (float64 included,
    and always with ``CLT_FORCE_TORCH=1``).

    Args:
        values: ``[L, N, K]`` code values; padded slots hold 0.
        indices: ``[L, N, K]`` feature ids in ``[0, F)`` (int32 or int64).
        W_dec: ``[F * P, d_out]`` decoder row table (see :class:`DecoderLayout`).
        b_dec: ``[L, d_out]`` decoder bias, or None for a bias-free decode (AuxK).
        layout: the row layout of ``W_dec``.
        deterministic: Triton backward of ``W_dec`` by a sorted segmented reduction (bitwise
            reproducible, the default) instead of fp32 atomics.

    Returns:
        ``[L, N, d_out]`` outputs in ``W_dec``'s dtype.
    """
    return sparse_decode_many([(values, indices, b_dec)], W_dec, layout,
                              deterministic=deterministic)[0]


def sparse_decode_many(
    codes: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    W_dec: torch.Tensor,
    layout: DecoderLayout,
    *,
    deterministic: bool = True,
    zero_slot_grad: bool = True,
) -> list[torch.Tensor]:
    """:func:`sparse_decode` of several code sets ``(values, indices, b_dec)`` (each may have its
    own N and K) through one ``W_dec``, with one decoder gradient for all: the main decode and
    AuxK's, or Matryoshka's groups, write one ``W_dec``-sized gradient instead of one each plus
    their sum (at L=12, d=768, F=4096 a fresh 1 GB table and a 1 GB add per extra decode).

    ``zero_slot_grad=False`` promises that the gradient of slots holding 0 is discarded upstream
    (padding; relu'd values): the torch path then computes ``grad_values`` only at nonzero slots
    and returns 0 elsewhere. Leave it True where a zero slot's gradient matters (JumpReLU's STE
    window). The Triton path and the specification compute every slot either way."""
    if not codes:
        raise ValueError("sparse_decode_many needs at least one (values, indices, b_dec)")
    if W_dec.dim() != 2 or W_dec.shape[0] != layout.n_rows:
        raise ValueError(f"W_dec must be [{layout.n_rows}, d_out], got {tuple(W_dec.shape)}")
    paths = set()
    for values, indices, b_dec in codes:
        check_codes(values, indices, layout.n_layers)
        # a [d_out] or [L, 1] bias would broadcast silently in the torch path
        if b_dec is not None and b_dec.shape != (layout.n_layers, W_dec.shape[1]):
            raise ValueError(
                f"b_dec must be [{layout.n_layers}, {W_dec.shape[1]}], got {tuple(b_dec.shape)}"
            )
        floats = [values, W_dec] + ([] if b_dec is None else [b_dec])
        path = pick_path("decode", *floats, others=(indices,))
        if path == "triton" and (values.numel() == 0 or W_dec.shape[1] == 0):
            path = "cpu"  # nothing to launch
        paths.add(path)
    if "torch" in paths:
        return [sparse_decode_torch(v, i, W_dec, b, layout) for v, i, b in codes]
    flat = [t for triple in codes for t in triple]
    return list(SparseDecodeFunction.apply(W_dec, layout, deterministic, paths == {"triton"},
                                           zero_slot_grad, *flat))


# ------------------------------------------------------------------------------------------------
# compile check (``kernels.compile_check.all_jobs``)
# ------------------------------------------------------------------------------------------------


def compile_jobs(arch: int) -> list[CompileJob]:
    """Every kernel at the launchers' GPU block sizes (and BLOCK_D 64 where that is the cap for
    d_out <= 64), fp32 and bf16 tables, int32 and int64 indices; no stack, no spills."""
    ints = {"N": "i32", "K": "i32", "d_out": "i32", "n_layers": "i32", "reach": "i32"}
    jobs = []
    for w, idx in (("*fp32", "*i32"), ("*bf16", "*i64")):
        rows, bd = GPU_BLOCKS["fwd"]
        for block_d in sorted({64, bd}):
            jobs.append(CompileJob(
                _decode_fwd_kernel,
                {"values_ptr": w, "indices_ptr": idx, "W_ptr": w, "b_ptr": w,
                 "row_off_ptr": "*i64", "out_ptr": w, **ints},
                {"HAS_BIAS": True, "BLOCK_N": rows, "BLOCK_D": block_d}, arch))
        rows, bd = GPU_BLOCKS["bwd"]
        for atomic in (True, False):
            jobs.append(CompileJob(
                _decode_bwd_kernel,
                {"values_ptr": w, "indices_ptr": idx, "W_ptr": w, "grad_out_ptr": w,
                 "row_off_ptr": "*i64", "grad_values_ptr": w, "grad_W_ptr": "*fp32", **ints},
                {"ATOMIC_GRAD_W": atomic, "BLOCK_M": rows, "BLOCK_D": bd}, arch))
        rows, bd = GPU_BLOCKS["grad_w"]
        for block_d, accumulate in [(b, False) for b in sorted({64, bd})] + [(bd, True)]:
            jobs.append(CompileJob(
                _decode_bwd_grad_w_kernel,
                {"values_ptr": w, "grad_out_ptr": w, "row_off_ptr": "*i64", "perm_ptr": "*i64",
                 "seg_ptr": "*i64", "grad_W_ptr": w, "N": "i32", "K": "i32", "F": "i32",
                 "d_out": "i32", "n_layers": "i32", "reach": "i32"},
                {"ACCUMULATE": accumulate, "BLOCK_E": rows, "BLOCK_D": block_d}, arch))
    return jobs
