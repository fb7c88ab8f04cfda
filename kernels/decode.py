"""Sparse crosslayer decode: Triton kernels (forward, backward) and the torch path.

Source layer ``s`` writes to targets ``s .. s + R_s - 1`` with ``R_s = min(R, L - s)``. All
decoder weights live in one contiguous row table ``W_dec [F * P, d_out]`` with ``P = sum_s R_s``:
source ``s`` owns rows ``F * P_s .. F * (P_s + R_s)`` (``P_s`` = rows of earlier sources), viewed
as ``[F, R_s, d_out]`` so one feature's whole crosslayer write is contiguous (circuit-tracer's
layout). The row of (source ``s``, feature ``f``, target ``t``) is ``F * P_s + f * R_s + t - s``.

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

Float64 inputs always take the torch path (the kernels compute in fp32; fp64 is for references
and gradcheck). The torch path is the specification and the CPU path, also grouped by source: the
forward is one ``embedding_bag`` per source over its ``[F, R_s * d_out]`` block (a feature's whole
crosslayer write is one row); ``grad_W_dec`` is the forward transposed, one ``embedding_bag`` whose
bags are the table's rows (each summing ``value * grad_out`` over the slots that read it, so each
row is written once and nothing ``W_dec``-sized is zeroed or added); ``grad_values`` are sampled
products ``<G_s[n], W_s[f]>``. Sources whose codes name few distinct features (AuxK) use dense
GEMMs over those rows instead (``DENSE_RATIO``). Nothing of size ``[N, F]`` exists and autograd
keeps only the codes for backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F_
import triton
import triton.language as tl

from . import buffers
from ._dispatch import interpreter_on, use_triton


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


# GPU block sizes (rows = tokens or (token, slot) entries per program, columns of d_out), from
# the sm_90 compile check (registers at 4 warps, fp32 / bf16 W): every [rows, BLOCK_D] gathered
# tile costs ~6 registers per element (a 64-bit address per element for W and grad_out), so
# 16 x 128 keeps the forward and the grad_W reduction at ~96 registers; the fused backward holds
# W, grad_out and the atomic target at once and needs 16 x 64 (~167 with atomics, 126 without;
# 16 x 128 reaches 255 and a stack frame). tests/test_decode_triton.py holds all at 0 spills.
# Under the interpreter every program is a Python loop: small blocks keep tiny shapes tiny.
GPU_BLOCKS = {"fwd": (16, 128), "bwd": (16, 64), "grad_w": (16, 128)}
INTERPRET_BLOCKS = (8, 32)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _blocks(
    kernel: str, rows: int, d_out: int, block_rows: int | None, block_d: int | None
) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_D)``: the per-kernel caps, shrunk to small problems, or overrides."""
    cap_rows, cap_d = INTERPRET_BLOCKS if interpreter_on() else GPU_BLOCKS[kernel]
    floor = 1 if interpreter_on() else 16
    if block_rows is None:
        block_rows = min(cap_rows, max(floor, triton.next_power_of_2(max(rows, 1))))
    if block_d is None:
        block_d = min(cap_d, max(floor, triton.next_power_of_2(max(d_out, 1))))
    return block_rows, block_d


_TABLES: dict[tuple[DecoderLayout, torch.device], tuple[torch.Tensor, ...]] = {}


def _layout_tables(layout: DecoderLayout, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(row_offsets [L + 1], reach [L], feature_first_rows [L * F + 1])`` int64 on ``device``,
    built once per (layout, device) so a step copies nothing to the GPU: the first row of each
    source (and the total), each ``R_s``, and the first row of every (source, feature) in table
    order followed by the row count (the segment boundaries the deterministic backward
    searches for)."""
    key = (layout, device)
    if key not in _TABLES:
        offsets = torch.tensor(layout.source_row_offsets, dtype=torch.int64)
        reach = torch.tensor([layout.reach_of(s) for s in range(layout.n_layers)])
        first = offsets[:-1, None] + torch.arange(layout.n_features) * reach[:, None]  # [L, F]
        first = torch.cat([first.flatten(), offsets[-1:]])
        _TABLES[key] = tuple(t.to(device) for t in (offsets, reach, first))
    return _TABLES[key]


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
    row_off = _layout_tables(layout, W_dec.device)[0]
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
    row_off, reach, feature_rows = _layout_tables(layout, W_dec.device)
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


@dataclass(frozen=True)
class DecoderLayout:
    """Where each source layer's ``[F, R_s, d_out]`` block sits in the row table."""

    n_layers: int
    n_features: int
    reach: int

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_features < 1:
            raise ValueError(f"need n_layers >= 1 and n_features >= 1, got {self}")
        if not 1 <= self.reach <= self.n_layers:
            raise ValueError(f"reach must be in 1..{self.n_layers}, got {self.reach}")

    def reach_of(self, source: int) -> int:
        """Number of targets source layer ``source`` writes to (``R_s``)."""
        return min(self.reach, self.n_layers - source)

    @cached_property
    def source_row_offsets(self) -> tuple[int, ...]:
        """First row of each source's block, plus the total row count at the end."""
        offsets = [0]
        for s in range(self.n_layers):
            offsets.append(offsets[-1] + self.n_features * self.reach_of(s))
        return tuple(offsets)

    @property
    def n_rows(self) -> int:
        return self.source_row_offsets[-1]

    def sources_of(self, target: int) -> range:
        """Source layers whose features write to ``target``."""
        return range(max(0, target - self.reach + 1), target + 1)

    def source_view(self, W_dec: torch.Tensor, source: int) -> torch.Tensor:
        """``[F, R_s, d_out]`` view of one source's block (no copy)."""
        lo, hi = self.source_row_offsets[source], self.source_row_offsets[source + 1]
        return W_dec[lo:hi].view(self.n_features, self.reach_of(source), W_dec.shape[-1])


def check_codes(values: torch.Tensor, indices: torch.Tensor, n_layers: int) -> None:
    """Shape checks shared by every op that consumes sparse codes ``[L, N, K]``."""
    if values.shape != indices.shape or values.dim() != 3 or values.shape[0] != n_layers:
        raise ValueError(
            f"codes must be [L={n_layers}, N, K] with matching shapes, got values "
            f"{tuple(values.shape)} and indices {tuple(indices.shape)}"
        )


# A source whose codes name few distinct features (AuxK: the same dead features on every token)
# decodes as dense GEMMs over those features' rows; one whose codes name many (TopK: ~F distinct
# features over a batch) as gathers. The GEMM does u / K times the FMAs of the gathers (u distinct
# features, K slots per token) but runs ~20x faster per FMA on a CPU (MKL vs embedding_bag), so it
# wins up to u ~ 8 K. At L=12, d=768, F=4096, N=1024 on 1 thread, AuxK's 64 dead features x 64
# slots, fwd + bwd: 1742 ms through embedding_bag's autograd, 680 ms as GEMMs (about half of it the
# page faults of the fresh W_dec-sized gradient). Per feature instead of per source (hot features
# as GEMM columns, the rest gathered) measured slower: a skinny [N, 8] GEMM is not 20x faster.
DENSE_RATIO = 8


# Bytes of output per embedding_bag call of the torch path (forward: a chunk of tokens; decoder
# gradient: a chunk of table rows), so every product stays cache-sized and below glibc's 32 MiB
# mmap threshold (freed blocks are reused, not faulted in again). At L=12, d=768, F=4096, N=1024
# on 2 threads the 1 GB decoder gradient takes 90 ms in 3 MiB chunks, 290 ms as one call (its
# fresh table-sized output page-faults) and 350 ms in 48 MiB chunks; the forward of a 12-target
# source 16 ms in chunks, 23 ms as one [N, 12 * 768] product.
CHUNK_BYTES = 3 * 2**20


def _source_codes(values: torch.Tensor, indices: torch.Tensor, source: int, dtype: torch.dtype):
    """Flat ``(values [N * K] in dtype, indices [N * K] int64)`` of one source."""
    return values[source].reshape(-1).to(dtype), indices[source].reshape(-1).long()


def _dense_columns(
    idx: torch.Tensor, K: int, n_features: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(cols [u], pos [N * K])`` with ``idx = cols[pos]`` when the ``u`` distinct features of
    the slots are few enough for dense GEMMs (``u <= DENSE_RATIO * K``), else None. A count per
    feature, not ``torch.unique``: its sort cost ~100 ms per source on a busy 2-core machine."""
    present = torch.bincount(idx, minlength=n_features) > 0  # [F]
    cols = present.nonzero().squeeze(1)
    if cols.numel() > DENSE_RATIO * K:
        return None
    return cols, (torch.cumsum(present, 0) - 1)[idx]


def _dense_codes(v: torch.Tensor, pos: torch.Tensor, N: int, n_cols: int) -> torch.Tensor:
    """``[N, u]`` dense codes over the distinct features (a repeated feature sums its slots)."""
    tok = torch.arange(N, device=v.device).repeat_interleave(pos.numel() // max(N, 1))
    return v.new_zeros(N, n_cols).index_put_((tok, pos), v, accumulate=True)


def _per_sample_dots(G_s: torch.Tensor, W_s: torch.Tensor, idx: torch.Tensor, K: int,
                     slots: torch.Tensor | None = None) -> torch.Tensor:
    """Dot products ``<G_s[n], W_s[idx[n * K + j]]>`` of the ``slots`` ``n * K + j`` (all by
    default), grouped by feature: the sampled product ``W_s @ G_s^T`` at a CSR pattern whose rows
    are the features and whose entries are the tokens of their slots (sorted), so each row of
    ``W_s`` is read once and the ``G_s`` rows come from cache (15-20% faster than token-major
    rows at L=12, F=4096, d=768, N=1024)."""
    N, F = G_s.shape[0], W_s.shape[0]
    tokens = torch.arange(0, idx.numel(), device=idx.device) if slots is None else slots
    feature, order = torch.sort(idx if slots is None else idx[slots], stable=True)
    counts = torch.bincount(feature, minlength=F)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    dtype = torch.promote_types(G_s.dtype, torch.float32)  # no bf16 sampled_addmm on CPU
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, tokens[order] // K,
                                          G_s.new_zeros(order.shape, dtype=dtype), (F, N))
    dots = torch.sparse.sampled_addmm(pattern, W_s.to(dtype), G_s.to(dtype).t(), beta=0.0)
    return torch.empty_like(dots.values()).index_copy_(0, order, dots.values())


def sparse_decode_fwd_torch(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    layout: DecoderLayout,
) -> torch.Tensor:
    """Torch forward: ``[L, N, d_out]``, one product per source over its ``[F, R_s * d_out]``
    block (a feature's whole crosslayer write is one row), added into the output's ``R_s``
    target layers: gathers in chunks of tokens whose ``[n, R_s * d_out]`` product stays
    cache-sized (``CHUNK_BYTES``), dense sources as one GEMM per target accumulated in place, so
    no ``[N, R_s * d_out]`` temporary exists (at L=12, d=768 that was a fresh 36 MiB block per
    large source, and a transposed copy of the output)."""
    L, N, K = values.shape
    d_out = W_dec.shape[1]
    out = W_dec.new_zeros(L, N, d_out)
    offsets = torch.arange(0, N * K, K, device=values.device)
    for s in range(L):
        R_s = layout.reach_of(s)
        W_s = layout.source_view(W_dec, s)  # [F, R_s, d_out]
        v, idx = _source_codes(values, indices, s, W_dec.dtype)
        dense = _dense_columns(idx, K, layout.n_features)
        if dense is not None:
            cols, pos = dense
            A = _dense_codes(v, pos, N, cols.numel())  # [N, u]
            W_cols = W_s.index_select(0, cols)  # [u, R_s, d_out]
            for r in range(R_s):
                out[s + r].addmm_(A, W_cols[:, r])
            continue
        rows = max(1, CHUNK_BYTES // max(1, R_s * d_out * W_dec.element_size()))
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            part = F_.embedding_bag(idx[n0 * K : n1 * K], W_s.flatten(1), offsets[: n1 - n0],
                                    per_sample_weights=v[n0 * K : n1 * K], mode="sum")
            out[s : s + R_s, n0:n1] += part.view(n1 - n0, R_s, d_out).transpose(0, 1)
    if b_dec is None:
        return out
    if torch.promote_types(out.dtype, b_dec.dtype) == out.dtype:
        return out.add_(b_dec.unsqueeze(1))
    return out + b_dec.unsqueeze(1)


def sparse_decode_bwd_torch(
    grad_outs: Sequence[torch.Tensor | None],
    codes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    W_dec: torch.Tensor,
    layout: DecoderLayout,
    *,
    need_values: Sequence[bool],
    need_W: bool = True,
    zero_slot_grad: bool = True,
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """Torch backward of several decodes through one ``W_dec``: ``([grad_values per decode],
    grad_W_dec)``; a decode whose ``grad_out`` is None contributes nothing (zeros). With
    ``zero_slot_grad=False`` slots of value 0 get gradient 0 (see :func:`sparse_decode_many`).

    ``grad_W_dec`` is the forwards transposed: one ``embedding_bag`` whose bags are the rows of
    the table, each summing ``value * grad_out[t, n]`` over the nonzero slots ``(s, n, j)`` of
    every decode that read it (the pairs sorted by row), so every row is written once and rows
    nobody read get an empty bag (zeros). It runs in chunks of rows (``CHUNK_BYTES`` of output:
    cache-sized pieces instead of one table-sized temporary) into a buffer from
    ``kernels.buffers`` (last step's gradient where the trainer donated it). Dense-GEMM sources
    then add their rows as ``A^T @ grad_out[t]`` per target. ``grad_values`` are the sampled
    products ``<G_s[n], W_s[f]>`` at every slot, padding included, with ``G_s [N, R_s * d_out]``
    the gradients of the source's targets side by side (dense sources: per-target GEMMs).
    """
    L, d_out = layout.n_layers, W_dec.shape[1]
    grad_values: list[torch.Tensor | None] = []
    # gather sources of every decode: table row, row of the stacked grad_outs, value
    rows, g_rows, weights, tables, dense_parts = [], [], [], [], []
    for (values, indices), grad_out, need_v in zip(codes, grad_outs, need_values, strict=True):
        if grad_out is None:
            grad_values.append(torch.zeros_like(values) if need_v else None)
            continue
        N, K = values.shape[1:]
        grad_out = grad_out.contiguous()
        G = None  # [N, L, d_out], built for the first gather source (dense ones read grad_out)
        gv = torch.empty_like(values) if need_v else None
        first_row = sum(t.shape[0] for t in tables)  # of this grad_out in the stacked table
        gathers = False
        for s in range(L):
            R_s = layout.reach_of(s)
            W_s = layout.source_view(W_dec, s).flatten(1)  # [F, R_s * d_out]
            v, idx = _source_codes(values, indices, s, W_dec.dtype)
            dense = _dense_columns(idx, K, layout.n_features)
            if dense is not None:
                cols, pos = dense
                A = _dense_codes(v, pos, N, cols.numel())  # [N, u]
                dense_parts.append((s, cols, A, grad_out))
                if need_v:  # [N, u]: one GEMM per target, accumulated
                    W_cols = layout.source_view(W_dec, s).index_select(0, cols)  # [u, R_s, d]
                    dots = A.new_zeros(N, cols.numel())
                    for r in range(R_s):
                        dots.addmm_(grad_out[s + r], W_cols[:, r].t())
                    dots = dots.gather(1, pos.view(N, K))
                    gv[s] = dots if zero_slot_grad else dots * (v.view(N, K) != 0)
                continue
            if G is None:
                G = grad_out.transpose(0, 1).contiguous()
            G_s = G[:, s : s + R_s].reshape(N, R_s * d_out)
            if need_W:
                gathers = True
                live = (v != 0).nonzero().squeeze(1)  # slot ids n * K + j
                r = torch.arange(R_s, device=idx.device).unsqueeze(1)  # target t = s + r
                rows.append((layout.source_row_offsets[s] + idx[live] * R_s + r).flatten())
                g_rows.append((first_row + (s + r) * N + live // K).flatten())
                weights.append(v[live].expand(R_s, -1).flatten())
            if need_v and zero_slot_grad:
                gv[s] = _per_sample_dots(G_s, W_s, idx, K).view(N, K).to(values.dtype)
            elif need_v:  # only the nonzero slots: padding (BatchTopK's up to ~2x) costs nothing
                slots = (v != 0).nonzero().squeeze(1)
                gv[s] = 0
                gv[s].view(-1)[slots] = _per_sample_dots(G_s, W_s, idx, K, slots).to(gv.dtype)
        if gathers:
            tables.append(grad_out.view(L * N, d_out))
        grad_values.append(gv)
    if not need_W:
        return grad_values, None
    grad_W = buffers.empty(W_dec.shape, W_dec.dtype, W_dec.device)
    if rows:
        table = tables[0] if len(tables) == 1 else torch.cat(tables)
        _bag_rows_into(grad_W, torch.cat(rows), torch.cat(g_rows), torch.cat(weights), table)
    else:  # only dense sources (AuxK)
        grad_W.zero_()
    for s, cols, A, grad_out in dense_parts:  # A^T @ grad_out[t] into each target's rows
        block = layout.source_view(grad_W, s)  # [F, R_s, d_out]
        for r in range(layout.reach_of(s)):
            block[:, r].index_add_(0, cols, A.t() @ grad_out[s + r])
    return grad_values, grad_W


def _bag_rows_into(
    out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, weights: torch.Tensor,
    table: torch.Tensor,
) -> None:
    """``out[r] = sum_{e: rows[e] = r} weights[e] * table[src[e]]`` for every row of ``out``
    (zeros where no entry names it), one ``embedding_bag`` per chunk of rows."""
    n_rows = out.shape[0]
    rows, order = torch.sort(rows, stable=True)
    src, weights = src[order], weights[order]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts  # [n_rows] first entry of each row
    chunk = max(1, CHUNK_BYTES // max(1, out.shape[1] * out.element_size()))
    firsts = list(range(0, n_rows, chunk))
    bounds = torch.cat([starts[firsts], counts.new_tensor([rows.numel()])]).tolist()
    for c, r0 in enumerate(firsts):
        r1, a, b = min(r0 + chunk, n_rows), bounds[c], bounds[c + 1]
        if a == b:
            out[r0:r1].zero_()
            continue
        out[r0:r1] = F_.embedding_bag(src[a:b], table, starts[r0:r1] - a,
                                      per_sample_weights=weights[a:b], mode="sum")


class SparseDecodeFunction(torch.autograd.Function):
    """Autograd of one or more decodes through one ``W_dec`` (``kernels``: the Triton launchers,
    else the torch path); ``codes`` is ``values, indices, b_dec`` per decode. It saves only the
    codes and ``W_dec``; the decodes share one decoder gradient (autograd through
    ``embedding_bag``, or one call per decode, would build one ``W_dec``-sized gradient each and
    add them up)."""

    @staticmethod
    def forward(ctx, W_dec, layout, deterministic, kernels, zero_slot_grad, *codes):
        sets = [codes[i : i + 3] for i in range(0, len(codes), 3)]
        ctx.save_for_backward(W_dec, *[t for v, i, _ in sets for t in (v, i)])
        ctx.layout, ctx.deterministic, ctx.kernels = layout, deterministic, kernels
        ctx.zero_slot_grad = zero_slot_grad
        ctx.b_dtypes = [None if b is None else b.dtype for *_, b in sets]
        ctx.set_materialize_grads(False)  # an unused output (e.g. AuxK's, skipped) costs nothing
        fwd = sparse_decode_fwd if kernels else sparse_decode_fwd_torch
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
            grad_values, grad_W = sparse_decode_bwd_torch(
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
    """Torch path of :func:`sparse_decode`; differentiable in values, W_dec and b_dec."""
    return SparseDecodeFunction.apply(W_dec, layout, True, False, True, values, indices,
                                      b_dec)[0]


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
    W_dec and b_dec are fp32 or bf16, the torch path otherwise (float64 included, and always with
    ``CLT_FORCE_TORCH=1``).

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
    window). The Triton path computes every slot either way."""
    if not codes:
        raise ValueError("sparse_decode_many needs at least one (values, indices, b_dec)")
    if W_dec.dim() != 2 or W_dec.shape[0] != layout.n_rows:
        raise ValueError(f"W_dec must be [{layout.n_rows}, d_out], got {tuple(W_dec.shape)}")
    kernels_ok = True
    for values, indices, b_dec in codes:
        check_codes(values, indices, layout.n_layers)
        # a [d_out] or [L, 1] bias would broadcast silently in the torch path
        if b_dec is not None and b_dec.shape != (layout.n_layers, W_dec.shape[1]):
            raise ValueError(
                f"b_dec must be [{layout.n_layers}, {W_dec.shape[1]}], got {tuple(b_dec.shape)}"
            )
        floats = [values, W_dec] + ([] if b_dec is None else [b_dec])
        kernels_ok = kernels_ok and (
            use_triton(indices, *floats)
            and all(t.dtype in KERNEL_DTYPES for t in floats)
            and values.numel() > 0
            and W_dec.shape[1] > 0
        )
    flat = [t for triple in codes for t in triple]
    return list(SparseDecodeFunction.apply(W_dec, layout, deterministic, kernels_ok,
                                           zero_slot_grad, *flat))


class DecoderNormsFunction(torch.autograd.Function):
    """``[L, F]`` whole-write norms from per-row norms. Its backward writes one ``W_dec``-sized
    gradient ``W_dec * (g / norm)`` per row; autograd through a norm of each source's block
    (a slice of ``W_dec``) zero-fills and adds one ``W_dec``-sized gradient per source (12 GB
    of memset and adds a step at L=12, d=768, F=4096: 6 s of a JumpReLU step)."""

    @staticmethod
    def forward(ctx, W_dec, layout):
        acc = torch.promote_types(W_dec.dtype, torch.float32)
        row_sq = torch.linalg.vector_norm(W_dec, dim=1, dtype=acc).square()  # [n_rows]
        offsets, F = layout.source_row_offsets, layout.n_features
        norms = torch.stack([row_sq[offsets[s] : offsets[s + 1]].view(F, -1).sum(1)
                             for s in range(layout.n_layers)]).sqrt()  # [L, F]
        ctx.save_for_backward(W_dec, norms)
        ctx.layout = layout
        return norms.to(W_dec.dtype)

    @staticmethod
    def backward(ctx, grad):
        W_dec, norms = ctx.saved_tensors
        layout = ctx.layout
        # d||w|| / dw = w / ||w||, and 0 at w = 0 (torch's subgradient)
        scale = torch.where(norms > 0, grad.to(norms.dtype) / norms, torch.zeros_like(norms))
        per_row = torch.cat([scale[s].repeat_interleave(layout.reach_of(s))
                             for s in range(layout.n_layers)])  # [n_rows]
        out = buffers.empty(W_dec.shape, W_dec.dtype, W_dec.device)
        torch.mul(W_dec, per_row.unsqueeze(1).to(W_dec.dtype), out=out)
        return out, None  # not mul's return value: an alias of out that autograd would not
        # accumulate into in place (it sums out-of-place into a fresh W_dec-sized tensor)


def decoder_norms(W_dec: torch.Tensor, layout: DecoderLayout) -> torch.Tensor:
    """``[L, F]`` norm of each feature's whole write, concatenated over all its targets."""
    if W_dec.dim() != 2 or W_dec.shape[0] != layout.n_rows:
        raise ValueError(f"W_dec must be [{layout.n_rows}, d_out], got {tuple(W_dec.shape)}")
    return DecoderNormsFunction.apply(W_dec, layout)
