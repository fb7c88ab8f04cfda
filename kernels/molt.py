"""MOLT: a sparse mixture of low-rank linear transforms, computed only for the active transforms.

Per layer ``l`` a gate names ``K`` transforms per token (sparse codes, padded slots hold 0) and

    y[l, n] = sum_j values[l, n, j] * U[l, t] @ (V[l, t] @ x[l, n]),   t = indices[l, n, j]

Transforms come in rank groups: group ``g`` holds ``T_g`` transforms of rank ``r_g``,
``U_g [L, T_g, d_out, r_g]``, ``V_g [L, T_g, r_g, d_in]``, and owns the transform ids
``o_g .. o_g + T_g - 1`` (``o_g`` = transforms of earlier groups; ``T = sum T_g``).

**Plan** (shared by both paths, torch ops): every (layer, token, slot) entry that takes part
(value != 0; in the backward of ``values`` also the value-0 slots ``zero_slot_grad`` names) gets
the key of its *expert*, the pair (layer, transform), in group-major order
``key = L * o_g + l * T_g + (t - o_g)``: the experts of a group are then contiguous and expert
``e = l * T_g + (t - o_g)`` of group ``g`` is row ``e`` of ``U_g.view(L * T_g, d_out, r_g)``. A
stable sort by key groups the entries by expert (``perm``), ``searchsorted`` gives each expert's
segment. One host sync per call reads the group boundaries (buffer sizes, grids) and the index
range (a ValueError for ids outside ``[0, T)``).

With ``h[p] = V_e x[n(p)]`` (``[P_g, r_g]``) and ``g = grad_y``, the backward is

    grad_values[p] = <U_e^T g[n(p)], h[p]>           (gu[p] = U_e^T g[n(p)])
    grad_U[e]      = sum_{p in e} v[p] g[n(p)] h[p]^T
    grad_V[e]      = sum_{p in e} (v[p] gu[p]) x[n(p)]^T
    grad_x[n]      = sum_{p of n} (v[p] gu[p]) @ V_e

``h`` is recomputed in the backward (it is ``[P, r]`` per group, as large as ``x`` when ``K * r``
reaches ``d_in``); autograd keeps only ``x``, the codes and the weights.

Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``; float64 takes the torch path):

- ``_molt_gemm_kernel``: a grouped GEMM over *tiles* (``BLOCK_P`` consecutive entries of one
  expert; a tile table built with torch ops maps program -> (expert, first entry)). Each program
  gathers its entries' rows of ``A`` (``x`` or ``grad_y`` by token, or a pair-major buffer such as
  ``h``), multiplies by the expert's matrix read through strides (so ``V``, ``V^T``, ``U``, ``U^T``
  are all the same kernel) with ``tl.dot``, optionally scales rows by the gate value, and writes
  pair-major rows. An expert's weights are read by its tiles only: once per ``BLOCK_P`` entries,
  not once per token.
- ``_molt_wgrad_kernel``: one program per (expert, tile of the ``[I, J]`` weight gradient) sums
  ``A[p]^T C[p]`` over the expert's segment in a fixed order; every element is written (zeros for
  experts nobody selected). Deterministic, no atomics.
- ``_molt_combine_kernel``: ``out[l, n] = sum_j buf[pos[l, n, j]]`` over a token's slots
  (``pos`` = sorted position, -1 for slots that took no part): the up-projections ``z`` (forward)
  and ``grad_x`` contributions are written pair-major and summed per token here instead of with
  atomics, so the results are bitwise reproducible. Costs one ``[P, d]`` fp32 write and read.

Off Triton, the CPU path (:mod:`kernels.cpu.molt`, with ``kernels.cpu_fast_paths`` on)
uses the same plan and loops over the active experts; the specification
:func:`molt_apply_torch` gathers every slot's matrices (dense, plain autograd).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._dispatch import cpu_fast_paths, dot_precision, fit_block, interpreter_on, triton_ok
from .compile_check import CompileJob
from .cpu import molt as cpu_molt
from .layout import check_codes

# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _molt_gemm_kernel(
    a_ptr,  # [rows, KD]: x / grad_y as [L * N, KD] (GATHER_A) or a pair-major buffer
    b_ptr,  # expert matrices, element (e, k, c) at e * stride_be + k * stride_bk + c * stride_bc
    out_ptr,  # [rows, C] pair-major
    tok_ptr,  # [P] int64 token row (l * N + n) of each sorted entry
    scale_ptr,  # [P] gate value of each sorted entry (SCALE)
    seg_ptr,  # [L * T + 1] int64 first sorted entry of each expert
    tile_e_ptr,  # [n_tiles] int64 expert of each tile
    tile_p_ptr,  # [n_tiles] int64 first sorted entry of each tile
    tile0, e0, a_base, out_base,
    KD, C, stride_be, stride_bk, stride_bc,
    GATHER_A: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``out[p - out_base, c] = (scale[p]) * sum_k A[row(p), k] * B[e, k, c]`` for the entries
    ``p`` of one tile (all of one expert ``e``)."""
    tile = tile0 + tl.program_id(0)
    pid_c = tl.program_id(1)
    e = tl.load(tile_e_ptr + tile)
    p0 = tl.load(tile_p_ptr + tile)
    end = tl.load(seg_ptr + e + 1)
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask_p = offs_p < end
    if GATHER_A:
        rows = tl.load(tok_ptr + offs_p, mask=mask_p, other=0)
    else:
        rows = offs_p - a_base
    cols = tl.cast(pid_c, tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    b_base = b_ptr + (e - e0) * stride_be
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        k = k0 + kk.to(tl.int64)
        mask_k = k < KD
        a = tl.load(a_ptr + rows[:, None] * KD + k[None, :],
                    mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + k[:, None] * stride_bk + cols[None, :] * stride_bc,
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            # the interpreter's bf16 arithmetic is wrong, and A (an fp32 buffer) may meet bf16 B
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SCALE:
        acc = acc * tl.load(scale_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + (offs_p - out_base)[:, None] * C + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _molt_wgrad_kernel(
    a_ptr,  # [rows, I]: grad_y as [L * N, I] (GATHER_A) or a pair-major buffer
    c_ptr,  # [rows, J]: x as [L * N, J] (GATHER_C) or a pair-major buffer
    scale_ptr,  # [P] gate value of each sorted entry (SCALE)
    tok_ptr,  # [P] int64 token row of each sorted entry
    seg_ptr,  # [L * T + 1] int64
    out_ptr,  # [E_g, I, J]
    e0, a_base, c_base, I, J,
    GATHER_A: tl.constexpr, GATHER_C: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``out[e, i, j] = sum_{p in seg(e0 + e)} (scale[p]) * A[row(p), i] * C[row(p), j]``."""
    e = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    start = tl.load(seg_ptr + e0 + e)
    end = tl.load(seg_ptr + e0 + e + 1)
    ii = tl.cast(pid_i, tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = tl.cast(pid_j, tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = ii < I
    mask_j = jj < J
    pp = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    # a fixed summation order (sorted entries, fixed blocks): bitwise reproducible
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + pp
        mask_p = offs_p < end
        if GATHER_A or GATHER_C:
            tok = tl.load(tok_ptr + offs_p, mask=mask_p, other=0)
        if GATHER_A:
            rows_a = tok
        else:
            rows_a = offs_p - a_base
        if GATHER_C:
            rows_c = tok
        else:
            rows_c = offs_p - c_base
        # [BLOCK_I, BLOCK_P]: A's rows read transposed
        a = tl.load(a_ptr + rows_a[None, :] * I + ii[:, None],
                    mask=mask_i[:, None] & mask_p[None, :], other=0.0)
        c = tl.load(c_ptr + rows_c[:, None] * J + jj[None, :],
                    mask=mask_p[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        if SCALE:
            s = tl.load(scale_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s[None, :]).to(c.dtype)
        acc = tl.dot(a, c, acc, input_precision=PRECISION)
    out = out_ptr + (tl.cast(e, tl.int64) * I + ii[:, None]) * J + jj[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])


@triton.jit
def _molt_combine_kernel(
    buf_ptr,  # [P, C] pair-major fp32
    pos_ptr,  # [R * K] int64 sorted position of each slot, -1 where the slot took no part
    out_ptr,  # [R, C]
    R, K, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[r, c] = sum_j buf[pos[r * K + j], c]`` in slot order."""
    rows = tl.cast(tl.program_id(0), tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.cast(tl.program_id(1), tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < R
    mask_c = cols < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for j in range(K):
        p = tl.load(pos_ptr + rows * K + j, mask=mask_r, other=-1)
        live = (p >= 0)[:, None] & mask_c[None, :]
        acc += tl.load(buf_ptr + p[:, None] * C + cols[None, :], mask=live, other=0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])


# ------------------------------------------------------------------------------------------------
# Host launchers
# ------------------------------------------------------------------------------------------------

# GPU tiles (sm_90 compile check, compile_jobs(): no stack, no spills at 4 warps, fp32 and
# bf16). The grouped GEMM's tile is BLOCK_P entries of one expert: 64 keeps an expert with ~100
# tokens (N=4096, K=16, 512 transforms per layer) at two tiles; tl.dot needs every dim >= 16.
GEMM_BLOCKS_GPU = dict(BLOCK_P=64, BLOCK_C=64, BLOCK_K=32)
WGRAD_BLOCKS_GPU = dict(BLOCK_I=64, BLOCK_J=64, BLOCK_P=32)
COMBINE_BLOCKS_GPU = dict(BLOCK_R=16, BLOCK_C=128)
# under the interpreter every program is numpy calls: the smallest tl.dot tiles
GEMM_BLOCKS_INTERP = dict(BLOCK_P=16, BLOCK_C=16, BLOCK_K=16)
WGRAD_BLOCKS_INTERP = dict(BLOCK_I=16, BLOCK_J=16, BLOCK_P=16)
COMBINE_BLOCKS_INTERP = dict(BLOCK_R=8, BLOCK_C=32)


def gemm_blocks(blocks: dict, precision: str) -> dict:
    """Tiles of the grouped GEMM for a ``tl.dot`` precision: an ieee fp32 dot runs on CUDA cores
    and at ``BLOCK_K`` 32 ptxas keeps an 8 B stack frame at sm_90; 16 keeps it at 0."""
    return {**blocks, "BLOCK_K": min(blocks["BLOCK_K"], 16)} if precision == "ieee" else blocks


@dataclass
class MoltPlan:
    """Entries sorted by expert (see the module docstring); host ints where launches need them.

    ``perm [P]`` flat slot ids (``(l * N + n) * K + j``) in sorted order, ``tok [P]`` their token
    rows ``l * N + n``, ``val [P]`` their gate values, ``seg [L * T + 1]`` expert segment starts,
    ``pos [L * N * K]`` the inverse of ``perm`` (-1 for slots that take no part);
    ``group_entries[g]`` / ``group_experts[g]`` the ``[lo, hi)`` ranges of group ``g``.
    """

    perm: torch.Tensor
    tok: torch.Tensor
    val: torch.Tensor
    seg: torch.Tensor
    pos: torch.Tensor
    group_entries: list[tuple[int, int]]
    group_experts: list[tuple[int, int]]
    seg_host: list[int] | None = None  # torch path: every expert's segment on the host
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None  # Triton: (tile expert, first entry)
    group_tiles: list[tuple[int, int]] | None = None


def make_plan(
    values: torch.Tensor,
    indices: torch.Tensor,
    sizes: Sequence[int],
    *,
    zero_slots: bool | torch.Tensor = False,
    block_p: int | None = None,
) -> MoltPlan:
    """Sort the taking-part entries by expert: value != 0, plus the value-0 slots that
    ``zero_slots`` names (True: all of them; a bool ``[L, N, K]`` tensor: those).

    ``block_p``: also build the Triton tile table for tiles of that many entries; without it, read
    every expert's segment to the host (the torch path loops over them).
    """
    L, N, K = values.shape
    dev = values.device
    T = sum(sizes)
    first = [sum(sizes[:g]) for g in range(len(sizes))]
    # per transform id t: key = kb[t] + l * kt[t] (group-major expert order)
    kb = torch.cat([L * o + torch.arange(s, device=dev) for o, s in zip(first, sizes, strict=True)])
    kt = torch.cat([torch.full((s,), s, device=dev) for s in sizes])
    idx = indices.reshape(L, N * K).long()
    if zero_slots is True:
        take = torch.ones_like(idx, dtype=torch.bool)
    else:
        take = values.reshape(L, -1) != 0
        if isinstance(zero_slots, torch.Tensor):
            take = take | zero_slots.reshape(L, -1)
    safe = idx.clamp(0, T - 1)  # out-of-range ids are reported below, after the one sync
    layer = torch.arange(L, device=dev).unsqueeze(1)
    keys = torch.where(take, kb[safe] + layer * kt[safe], L * T).flatten()
    sorted_keys, perm = torch.sort(keys, stable=True)
    seg = torch.searchsorted(sorted_keys, torch.arange(L * T + 1, device=dev))
    bounds = [L * o for o in first] + [L * T]
    ids = torch.where(take, idx, 0)
    sync = [seg[bounds], ids.min().view(1) if ids.numel() else seg.new_zeros(1),
            ids.max().view(1) if ids.numel() else seg.new_zeros(1)]
    tile_cum = None
    if block_p is not None:
        counts = seg[1:] - seg[:-1]
        tile_cum = torch.cumsum(torch.div(counts + block_p - 1, block_p, rounding_mode="floor"), 0)
        tile_cum = torch.cat([tile_cum.new_zeros(1), tile_cum])  # [L * T + 1] exclusive
        sync.append(tile_cum[bounds])
    else:
        sync.append(seg)
    host = torch.cat(sync).tolist()  # the one host sync of the call
    G = len(sizes)
    entry_bounds, lo_id, hi_id = host[: G + 1], host[G + 1], host[G + 2]
    if lo_id < 0 or hi_id >= T:
        raise ValueError(f"molt_apply: transform ids must be in [0, {T}), got {lo_id}..{hi_id}")
    P = entry_bounds[-1]
    perm = perm[:P]
    flat_tok = torch.div(perm, K, rounding_mode="floor")
    pos = torch.full((L * N * K,), -1, dtype=torch.int64, device=dev)
    pos[perm] = torch.arange(P, device=dev)
    plan = MoltPlan(
        perm=perm, tok=flat_tok, val=values.reshape(-1)[perm], seg=seg, pos=pos,
        group_entries=list(zip(entry_bounds[:-1], entry_bounds[1:], strict=True)),
        group_experts=list(zip(bounds[:-1], bounds[1:], strict=True)),
    )
    if block_p is None:
        plan.seg_host = host[G + 3 :]
        return plan
    tb = host[G + 3 :]
    plan.group_tiles = list(zip(tb[:-1], tb[1:], strict=True))
    tile_ids = torch.arange(tb[-1], device=dev)
    # expert of tile i: the last expert whose first tile is <= i (empty experts own no tile)
    tile_e = torch.searchsorted(tile_cum, tile_ids, right=True) - 1
    tile_p = seg[tile_e] + (tile_ids - tile_cum[tile_e]) * block_p
    plan.tiles = (tile_e, tile_p)
    return plan


def _gemm(a, b, out, plan, g, blocks, *, gather, scale, b_strides, KD, C, a_base=0, out_base=0):
    """Launch ``_molt_gemm_kernel`` over group ``g``'s tiles."""
    t0, t1 = plan.group_tiles[g]
    if t1 == t0:
        return
    precision = dot_precision(b.dtype)
    blocks = gemm_blocks(blocks, precision)
    # tl.dot needs every dim >= 16
    block_c = fit_block(blocks["BLOCK_C"], C, 16)
    block_k = fit_block(blocks["BLOCK_K"], KD, 16)
    dtypes = {a.dtype, b.dtype}
    grid = (t1 - t0, triton.cdiv(C, block_c))
    _molt_gemm_kernel[grid](
        a_ptr=a, b_ptr=b, out_ptr=out, tok_ptr=plan.tok, scale_ptr=plan.val if scale else plan.seg,
        seg_ptr=plan.seg, tile_e_ptr=plan.tiles[0], tile_p_ptr=plan.tiles[1],
        tile0=t0, e0=plan.group_experts[g][0], a_base=a_base, out_base=out_base,
        KD=KD, C=C, stride_be=b_strides[0], stride_bk=b_strides[1], stride_bc=b_strides[2],
        GATHER_A=gather, SCALE=scale, BLOCK_P=blocks["BLOCK_P"], BLOCK_C=block_c,
        BLOCK_K=block_k, PRECISION=precision,
        UPCAST=not a.is_cuda or len(dtypes) > 1,
    )


def _wgrad(a, c, out, plan, g, blocks, *, gather_a, gather_c, scale, I, J, base=0):
    """Launch ``_molt_wgrad_kernel`` over group ``g``'s experts (writes all of ``out``)."""
    e0, e1 = plan.group_experts[g]
    block_i, block_j = fit_block(blocks["BLOCK_I"], I, 16), fit_block(blocks["BLOCK_J"], J, 16)
    grid = (e1 - e0, triton.cdiv(I, block_i), triton.cdiv(J, block_j))
    _molt_wgrad_kernel[grid](
        a_ptr=a, c_ptr=c, scale_ptr=plan.val if scale else plan.seg, tok_ptr=plan.tok,
        seg_ptr=plan.seg, out_ptr=out, e0=e0, a_base=base, c_base=base, I=I, J=J,
        GATHER_A=gather_a, GATHER_C=gather_c, SCALE=scale, BLOCK_I=block_i, BLOCK_J=block_j,
        BLOCK_P=blocks["BLOCK_P"], PRECISION=dot_precision(out.dtype),
        UPCAST=not a.is_cuda or a.dtype != c.dtype,
    )


def _combine(buf, pos, out, K, blocks):
    R, C = out.shape
    block_c = fit_block(blocks["BLOCK_C"], C)
    grid = (triton.cdiv(R, blocks["BLOCK_R"]), triton.cdiv(C, block_c))
    _molt_combine_kernel[grid](buf_ptr=buf, pos_ptr=pos, out_ptr=out, R=R, K=K, C=C,
                               BLOCK_R=blocks["BLOCK_R"], BLOCK_C=block_c)
    return out


def _blocks(device: torch.device) -> tuple[dict, dict, dict]:
    if device.type == "cpu" and interpreter_on():
        return GEMM_BLOCKS_INTERP, WGRAD_BLOCKS_INTERP, COMBINE_BLOCKS_INTERP
    return GEMM_BLOCKS_GPU, WGRAD_BLOCKS_GPU, COMBINE_BLOCKS_GPU


def molt_fwd(x, values, indices, Us, Vs, out=None):
    """Triton forward: ``y [L, N, d_out]`` in x's dtype (``out`` optional, fully overwritten)."""
    L, N, d_in = x.shape
    K = values.shape[2]
    d_out = Us[0].shape[2]
    gemm_b, _, comb_b = _blocks(x.device)
    x, values = x.contiguous(), values.contiguous()
    plan = make_plan(values, indices, [U.shape[1] for U in Us], block_p=gemm_b["BLOCK_P"])
    P = plan.group_entries[-1][1]
    z = torch.empty(P, d_out, device=x.device, dtype=torch.float32)  # v * U V x per entry
    x2 = x.view(L * N, d_in)
    for g, (U, V) in enumerate(zip(Us, Vs, strict=True)):
        lo, hi = plan.group_entries[g]
        r = U.shape[3]
        U, V = U.contiguous(), V.contiguous()
        h = torch.empty(hi - lo, r, device=x.device, dtype=torch.float32)
        # h = V_e x: B[e, k = d, c = rank] = V[e, c, d]
        _gemm(x2, V, h, plan, g, gemm_b, gather=True, scale=False,
              b_strides=(r * d_in, 1, d_in), KD=d_in, C=r, out_base=lo)
        # z = v * U_e h: B[e, k = rank, c = d_out] = U[e, c, k]
        _gemm(h, U, z, plan, g, gemm_b, gather=False, scale=True,
              b_strides=(d_out * r, 1, r), KD=r, C=d_out, a_base=lo)
    if out is None:
        out = torch.empty(L, N, d_out, device=x.device, dtype=x.dtype)
    _combine(z, plan.pos, out.view(L * N, d_out), K, comb_b)
    return out


def molt_bwd(grad_out, x, values, indices, Us, Vs, *, need_x, need_values, need_w,
             zero_slot_grad=True):
    """Triton backward: ``(grad_x, grad_values, [grad_U_g], [grad_V_g])`` (None where not needed;
    ``need_w`` is a per-group ``(need_U, need_V)`` list). Returned buffers are fully written."""
    L, N, d_in = x.shape
    K = values.shape[2]
    d_out = Us[0].shape[2]
    dev = x.device
    gemm_b, wgrad_b, comb_b = _blocks(dev)
    x, values, grad_out = x.contiguous(), values.contiguous(), grad_out.contiguous()
    plan = make_plan(values, indices, [U.shape[1] for U in Us],
                     zero_slots=zero_slot_grad if need_values else False,
                     block_p=gemm_b["BLOCK_P"])
    P = plan.group_entries[-1][1]
    x2, g2 = x.view(L * N, d_in), grad_out.view(L * N, d_out)
    dots = torch.empty(P, device=dev, dtype=torch.float32) if need_values else None
    gx_pairs = torch.empty(P, d_in, device=dev, dtype=torch.float32) if need_x else None
    grad_Us, grad_Vs = [], []
    for g, (U, V) in enumerate(zip(Us, Vs, strict=True)):
        lo, hi = plan.group_entries[g]
        n_exp, r = U.shape[0] * U.shape[1], U.shape[3]
        need_U, need_V = need_w[g]
        U, V = U.contiguous(), V.contiguous()
        h = torch.empty(hi - lo, r, device=dev, dtype=torch.float32)
        _gemm(x2, V, h, plan, g, gemm_b, gather=True, scale=False,
              b_strides=(r * d_in, 1, d_in), KD=d_in, C=r, out_base=lo)
        # gu = U_e^T g: B[e, k = d_out, c = rank] = U[e, k, c]
        gu = torch.empty(hi - lo, r, device=dev, dtype=torch.float32)
        _gemm(g2, U, gu, plan, g, gemm_b, gather=True, scale=False,
              b_strides=(d_out * r, r, 1), KD=d_out, C=r, out_base=lo)
        if need_values:
            dots[lo:hi] = (gu * h).sum(dim=1)
        gh = gu.mul_(plan.val[lo:hi].to(torch.float32).unsqueeze(1))  # v * gu, in place
        grad_U = grad_V = None
        if need_U:
            grad_U = torch.empty(n_exp, d_out, r, device=dev, dtype=U.dtype)
            _wgrad(g2, h, grad_U, plan, g, wgrad_b, gather_a=True, gather_c=False, scale=True,
                   I=d_out, J=r, base=lo)
            grad_U = grad_U.view_as(U)
        if need_V:
            grad_V = torch.empty(n_exp, r, d_in, device=dev, dtype=V.dtype)
            _wgrad(gh, x2, grad_V, plan, g, wgrad_b, gather_a=False, gather_c=True, scale=False,
                   I=r, J=d_in, base=lo)
            grad_V = grad_V.view_as(V)
        grad_Us.append(grad_U)
        grad_Vs.append(grad_V)
        if need_x:
            # gh @ V_e: B[e, k = rank, c = d_in] = V[e, k, c]
            _gemm(gh, V, gx_pairs, plan, g, gemm_b, gather=False, scale=False,
                  b_strides=(r * d_in, d_in, 1), KD=r, C=d_in, a_base=lo)
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x)
        _combine(gx_pairs, plan.pos, grad_x.view(L * N, d_in), K, comb_b)
    grad_values = None
    if need_values:
        grad_values = values.new_zeros(L * N * K)
        grad_values[plan.perm] = dots.to(values.dtype)
        grad_values = grad_values.view_as(values)
    return grad_x, grad_values, grad_Us, grad_Vs


# ------------------------------------------------------------------------------------------------
# autograd, the torch specification and the public op
# ------------------------------------------------------------------------------------------------


class MoltFunction(torch.autograd.Function):
    """Autograd of both paths; saves only ``x``, the codes and the weights (``h`` is recomputed).
    Inputs after the flags: the ``G`` tensors ``U_g`` then the ``G`` tensors ``V_g``."""

    @staticmethod
    def forward(ctx, x, values, indices, zero_slot_grad, kernels, *weights):
        G = len(weights) // 2
        Us, Vs = weights[:G], weights[G:]
        ctx.save_for_backward(x, values, indices, *weights)
        ctx.zero_slot_grad, ctx.kernels = zero_slot_grad, kernels
        fwd = molt_fwd if kernels else cpu_molt.molt_fwd
        return fwd(x, values, indices, Us, Vs)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices, *weights = ctx.saved_tensors
        G = len(weights) // 2
        need = ctx.needs_input_grad
        need_w = [(need[5 + g], need[5 + G + g]) for g in range(G)]
        bwd = molt_bwd if ctx.kernels else cpu_molt.molt_bwd
        grad_x, grad_values, grad_Us, grad_Vs = bwd(
            grad_out, x, values, indices, weights[:G], weights[G:], need_x=need[0],
            need_values=need[1], need_w=need_w, zero_slot_grad=ctx.zero_slot_grad,
        )
        return grad_x, grad_values, None, None, None, *grad_Us, *grad_Vs


def _as_list(w: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [w] if isinstance(w, torch.Tensor) else list(w)


def _check(x, values, indices, Us, Vs) -> None:
    if x.dim() != 3:
        raise ValueError(f"molt_apply: x must be [L, N, d_in], got {tuple(x.shape)}")
    L, N, d_in = x.shape
    check_codes(values, indices, L)
    if values.shape[1] != N:
        raise ValueError(f"molt_apply: codes {tuple(values.shape)} do not match x "
                         f"{tuple(x.shape)} in N")
    if not Us or len(Us) != len(Vs):
        raise ValueError(f"molt_apply: need one U and one V per rank group, got {len(Us)} U and "
                         f"{len(Vs)} V")
    d_out = Us[0].shape[2] if Us[0].dim() == 4 else -1
    for g, (U, V) in enumerate(zip(Us, Vs, strict=True)):
        ok = (U.dim() == 4 and V.dim() == 4 and U.shape[0] == L and V.shape[0] == L
              and U.shape[1] == V.shape[1] and U.shape[2] == d_out and V.shape[3] == d_in
              and U.shape[3] == V.shape[2] and U.shape[3] >= 1)
        if not ok:
            raise ValueError(
                f"molt_apply: group {g} needs U [L={L}, T_g, d_out, r] and V [L, T_g, r, "
                f"d_in={d_in}] with d_out shared by all groups, got U {tuple(U.shape)} and V "
                f"{tuple(V.shape)}"
            )
        if U.dtype != x.dtype or V.dtype != x.dtype:
            raise ValueError(f"molt_apply: x, U and V must share a dtype, got {x.dtype}, "
                             f"{U.dtype}, {V.dtype} (group {g})")


def molt_apply_torch(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    U: torch.Tensor | Sequence[torch.Tensor],
    V: torch.Tensor | Sequence[torch.Tensor],
    *,
    zero_slot_grad: bool | torch.Tensor = True,
) -> torch.Tensor:
    """Specification of :func:`molt_apply`: every slot's ``U_t`` and ``V_t`` gathered
    (``[L, N, K, d, r]``: tiny shapes only), fp32 compute cast back, plain autograd."""
    Us, Vs = _as_list(U), _as_list(V)
    T = sum(U_g.shape[1] for U_g in Us)
    idx = indices.long()
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < T:
        raise ValueError(f"molt_apply: transform ids must be in [0, {T}), got "
                         f"{int(idx.min())}..{int(idx.max())}")
    if zero_slot_grad is not True:  # value-0 slots not named pass no gradient to their value
        named = values != 0 if zero_slot_grad is False else (values != 0) | zero_slot_grad
        values = torch.where(named, values, values.detach())
    acc = torch.promote_types(x.dtype, torch.float32)
    L = x.shape[0]
    layer = torch.arange(L, device=x.device)[:, None, None]
    y, first = 0, 0
    for U_g, V_g in zip(Us, Vs, strict=True):
        local = idx - first
        mine = (local >= 0) & (local < U_g.shape[1])  # [L, N, K] slots of this group
        t = local.clamp(0, U_g.shape[1] - 1)
        h = V_g.to(acc)[layer, t] @ x.to(acc)[:, :, None, :, None]  # [L, N, K, r, 1]
        z = (U_g.to(acc)[layer, t] @ h).squeeze(-1)  # [L, N, K, d_out]
        y = y + ((values.to(acc) * mine).unsqueeze(-1) * z).sum(2)
        first += U_g.shape[1]
    return y.to(x.dtype)


def molt_apply(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    U: torch.Tensor | Sequence[torch.Tensor],
    V: torch.Tensor | Sequence[torch.Tensor],
    *,
    zero_slot_grad: bool | torch.Tensor = True,
) -> torch.Tensor:
    """Sparse mixture of low-rank transforms: ``y[l, n] = sum_j v[l,n,j] U_t V_t x[l, n]``.

    Differentiable in ``x``, ``values`` and every ``U_g`` / ``V_g`` (not ``indices``). Runs the
    Triton kernels on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``) for fp32 / bf16 / fp16,
    otherwise the CPU path (``kernels.cpu_fast_paths``, opt-in) or the specification
    :func:`molt_apply_torch` (float64 included, and always with ``CLT_FORCE_TORCH=1``). One host
    sync per forward and per backward (the plan's group sizes).

    Args:
        x: ``[L, N, d_in]`` inputs (``L`` layers, each with its own transforms; L may be 1).
        values: ``[L, N, K]`` gate values; slots holding 0 add nothing (padding).
        indices: ``[L, N, K]`` transform ids in ``[0, T)`` (int32 or int64), ``T = sum_g T_g``;
            group ``g`` owns ids ``sum_{g' < g} T_g' ..`` in the order given.
        U: ``U_g [L, T_g, d_out, r_g]`` for each rank group (a tensor for a single group).
        V: ``V_g [L, T_g, r_g, d_in]``, same groups. ``x``, ``U``, ``V`` share one dtype.
        zero_slot_grad: which value-0 slots get their exact ``grad_values``
            (``<g, U_t V_t x>``; the others get 0 and cost nothing in the backward). True: all
            (the exact gradient of every slot); False: none (right for TopK / BatchTopK / ReLU
            codes, whose value-0 slots pass no gradient on); a bool ``[L, N, K]`` tensor: those
            slots (JumpReLU: the value-0 slots inside the STE window carry the threshold
            gradient, while padding, all pointing at transform 0, would pile onto one expert).

    Returns:
        ``y [L, N, d_out]`` in x's dtype (no bias).
    """
    Us, Vs = _as_list(U), _as_list(V)
    _check(x, values, indices, Us, Vs)
    if isinstance(zero_slot_grad, torch.Tensor) and (
        zero_slot_grad.dtype != torch.bool or zero_slot_grad.shape != values.shape
    ):
        raise ValueError(f"molt_apply: zero_slot_grad must be a bool or a bool tensor shaped like "
                         f"values {tuple(values.shape)}, got {zero_slot_grad.dtype} "
                         f"{tuple(zero_slot_grad.shape)}")
    floats = [x, values, *Us, *Vs]
    kernels = triton_ok("molt", *floats, others=(indices,)) and values.numel() > 0 \
        and x.shape[2] > 0
    if not kernels and not cpu_fast_paths.enabled():
        return molt_apply_torch(x, values, indices, Us, Vs, zero_slot_grad=zero_slot_grad)
    return MoltFunction.apply(x, values, indices, zero_slot_grad, kernels, *Us, *Vs)


# ------------------------------------------------------------------------------------------------
# compile check (``kernels.compile_check.all_jobs``)
# ------------------------------------------------------------------------------------------------


def compile_jobs(arch: int) -> list[CompileJob]:
    """Every kernel variant the launchers use, at the GPU block sizes, fp32 and bf16; no stack,
    no spills."""
    ints = {"tile0": "i32", "e0": "i32", "a_base": "i32", "out_base": "i32", "KD": "i32",
            "C": "i32", "stride_be": "i32", "stride_bk": "i32", "stride_bc": "i32"}
    jobs = []
    for w, precisions in (("*fp32", ("tf32", "ieee")), ("*bf16", ("tf32",))):
        for precision in precisions:
            # gathered x / grad_y rows (h, gu), and pair-major fp32 h / gh (z, grad_x pairs)
            for gather, scale, a in ((True, False, w), (False, True, "*fp32")):
                sig = {"a_ptr": a, "b_ptr": w, "out_ptr": "*fp32", "tok_ptr": "*i64",
                       "scale_ptr": w, "seg_ptr": "*i64", "tile_e_ptr": "*i64",
                       "tile_p_ptr": "*i64", **ints}
                jobs.append(CompileJob(_molt_gemm_kernel, sig, dict(
                    GATHER_A=gather, SCALE=scale, PRECISION=precision, UPCAST=a != w,
                    **gemm_blocks(GEMM_BLOCKS_GPU, precision)), arch))
            # grad_U (gathered grad_y, scaled, with h) and grad_V (gh with gathered x)
            for ga, gc, scale, a, c in ((True, False, True, w, "*fp32"),
                                        (False, True, False, "*fp32", w)):
                sig = {"a_ptr": a, "c_ptr": c, "scale_ptr": w, "tok_ptr": "*i64",
                       "seg_ptr": "*i64", "out_ptr": w, "e0": "i32", "a_base": "i32",
                       "c_base": "i32", "I": "i32", "J": "i32"}
                jobs.append(CompileJob(_molt_wgrad_kernel, sig, dict(
                    GATHER_A=ga, GATHER_C=gc, SCALE=scale, PRECISION=precision, UPCAST=a != c,
                    **WGRAD_BLOCKS_GPU), arch))
        jobs.append(CompileJob(
            _molt_combine_kernel,
            {"buf_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": w, "R": "i32", "K": "i32",
             "C": "i32"}, dict(COMBINE_BLOCKS_GPU), arch))
    return jobs
