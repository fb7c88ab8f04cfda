"""Fused encode + TopK with a sparse encoder backward: Triton kernels, torch specification, op.

Per (layer, token) keep the ``k`` largest pre-activations ``pre = x @ W_enc + b_enc``. Backward
uses only the selected entries: ``grad W_enc[:, f] = sum_{(n, j): idx = f} g[n, j] * x[n]``, which
costs ``O(N * k * d_in)`` instead of a dense ``[N, F]`` GEMM, and no ``[L, N, F]`` tensor is kept.

**Tie rule** (every path): among equal scores the lower feature index ranks first, so the set
kept at the k-th value and the order of the slots are deterministic. The Triton kernel packs it
into its keys; the torch specification (:func:`encode_topk_torch`) is a stable descending sort;
the CPU path (:mod:`kernels.cpu.topk`) fixes ``torch.topk``'s choice where it differs.

Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``; float64 inputs never run a kernel):

- ``_encode_topk_fwd_kernel``: one program per (``BLOCK_N`` tokens, layer). It walks the feature
  axis in ``BLOCK_F`` tiles, computes each tile of ``pre`` with ``tl.dot`` (fp32 accumulation) and
  merges it into a running per-row top-``KP`` list. ``tl.topk`` returns values only, so a score is
  packed with its column into one int64 key: the high 32 bits are an order-preserving integer of
  the fp32 score, the low 32 bits ``2**31 - 1 - col``, so equal scores rank the **lower feature
  index first** (the documented tie rule; ``-0.0`` is canonicalised to ``+0.0`` first). ``KP`` is
  ``k`` rounded up to a power of two (``tl.topk`` needs one); the first ``k`` of the running
  top-``KP`` are the top-``k``. Only ``values/indices [L, N, k]`` are written.
- ``_gather_pre_kernel`` (only with ``rank_scale``): the packed key holds ``pre * scale``, so the
  returned ``pre`` values are recomputed at the selected columns, ``x[n] . W_enc[:, f] + b[f]``.
- ``_encode_topk_bwd_dw_kernel``: the selected ``(n, j)`` entries of each layer are stably sorted by
  feature (torch, on the host side of the launch); one program per (``BLOCK_F`` features,
  ``BLOCK_D`` input dims, layer) sums ``g * x[n]`` over each feature's segment in a fixed order
  (deterministic, no atomics) and writes every element of its ``grad_W_enc`` tile (zeros for
  features nobody selected) plus, from the ``d``-block 0 programs, ``grad_b_enc``.
- ``_encode_topk_bwd_dx_kernel``: ``grad_x[n] = sum_j g[n, j] * W_enc[:, idx[n, j]]``, reading the
  gathered columns as rows of a transposed copy ``W_enc^T [L, F, d_in]`` (contiguous rows: a
  gather of ``W_enc`` columns would touch one 32-byte sector per element).

Two-step alternative (library GEMM into ``pre [N, F]`` per layer + a Triton row top-k): it pays an
``N * F`` write and read per layer (at L=12, N=8192, F=16384 fp32 that is 6.4 GB per step, ~2.5 ms
at 2.6 TB/s) but runs the GEMM at cuBLAS speed. The fused kernel wins when its GEMM reaches
a good fraction of cuBLAS; the selection (bitonic merges on int64 keys on CUDA cores) is the risk.
``encode_topk(..., impl=...)`` is the dispatch hook; measure on a GPU before changing the default.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import cpu_fast_paths, dot_precision, next_pow2, on_gpu, triton_ok
from .compile_check import CompileJob
from .cpu import topk as cpu_topk

# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _packed_key(score, cols):
    """int64 key ordering by (score desc, col asc): order-preserving int32 of the fp32 score in
    the high half (sign-magnitude flipped to two's complement), ``2**31 - 1 - col`` in the low."""
    bits = (score + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 -> +0.0, equal scores tie
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)


@triton.jit
def _unpack_key(key):
    """(fp32 score, int64 col) from a packed key."""
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 2147483647 - (key & 0xFFFFFFFF)


@triton.jit
def _encode_topk_fwd_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, val_ptr, idx_ptr,
    N, D, F, k,
    HAS_SCALE: tl.constexpr, KP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dd = tl.arange(0, BLOCK_D)
    ff = tl.arange(0, BLOCK_F)
    x_rows = x_ptr + layer * N * D + rows[:, None] * D  # [BLOCK_N, 1]
    w_layer = w_ptr + layer * D * F
    # below every real key (their high half is >= -2**31, their low half >= 1)
    running = tl.full([BLOCK_N, KP], -9223372036854775807 - 1, tl.int64)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + ff.to(tl.int64)
        col_ok = cols < F
        acc = tl.zeros([BLOCK_N, BLOCK_F], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd.to(tl.int64)
            a = tl.load(x_rows + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
            w = tl.load(w_layer + d[:, None] * F + cols[None, :],
                        mask=(d[:, None] < D) & col_ok[None, :], other=0.0)
            if UPCAST:
                # the interpreter's bf16 arithmetic is wrong: dot in fp32 there (bf16 products
                # are exact in fp32: equal to the GPU's bf16 tensor-core dot up to sum order)
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        pre = acc + tl.load(b_ptr + layer * F + cols, mask=col_ok, other=0.0).to(tl.float32)
        score = pre
        if HAS_SCALE:
            score = pre * tl.load(scale_ptr + layer * F + cols, mask=col_ok, other=0.0).to(
                tl.float32
            )
        key = tl.where(col_ok[None, :], _packed_key(score, cols[None, :]), -9223372036854775807 - 1)
        # skip the merge when no row of the tile beats its current KP-th key (common once the
        # running lists have filled: a tile rarely holds a new top-k entry for any of the rows)
        beats = tl.max(key, axis=1) > tl.min(running, axis=1)
        if tl.max(beats.to(tl.int32), axis=0) > 0:
            cand = tl.topk(key, KP, dim=1)  # [BLOCK_N, KP]
            both = tl.reshape(tl.join(running, cand), [BLOCK_N, 2 * KP])
            running = tl.topk(both, KP, dim=1)
    score, col = _unpack_key(running)
    slots = tl.arange(0, KP)
    out = (layer * N + rows[:, None]) * k + slots[None, :]
    out_ok = row_ok[:, None] & (slots[None, :] < k)
    tl.store(val_ptr + out, score, mask=out_ok)
    tl.store(idx_ptr + out, col, mask=out_ok)


@triton.jit
def _gather_pre_kernel(
    x_ptr, wt_ptr, b_ptr, idx_ptr, val_ptr,
    N, D, F, k,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``val[l, n, j] = x[l, n] . W_enc^T[l, idx[l, n, j]] + b[l, idx]``; one program per
    (``BLOCK_N`` tokens, layer), a loop over the ``k`` slots."""
    pid_n = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dd = tl.arange(0, BLOCK_D)
    for j in range(0, k):
        slot = (layer * N + rows) * k + j
        f = tl.load(idx_ptr + slot, mask=row_ok, other=0)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd.to(tl.int64)
            m = row_ok[:, None] & (d[None, :] < D)
            a = tl.load(x_ptr + (layer * N + rows[:, None]) * D + d[None, :], mask=m, other=0.0)
            w = tl.load(wt_ptr + (layer * F + f[:, None]) * D + d[None, :], mask=m, other=0.0)
            acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)
        bias = tl.load(b_ptr + layer * F + f, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(val_ptr + slot, acc + bias, mask=row_ok)


@triton.jit
def _encode_topk_bwd_dw_kernel(
    x_ptr, g_ptr, order_ptr, seg_ptr, dw_ptr, db_ptr,
    N, D, F, k,
    HAS_DB: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """``dW[l, d, f] = sum_{e in seg(l, f)} g[l, e] * x[l, e // k, d]`` over the entries ``e``
    (flat ``n * k + j``) of layer ``l`` stably sorted by feature; ``seg`` holds ``[L, F + 1]``
    segment starts. Every element of the ``[BLOCK_D, BLOCK_F]`` tile is written."""
    pid_f = tl.program_id(0)
    pid_d = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    f0 = pid_f.to(tl.int64) * BLOCK_F
    ff = tl.arange(0, BLOCK_F)
    d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    ee = tl.arange(0, BLOCK_E)
    tile = tl.zeros([BLOCK_D, BLOCK_F], tl.float32)
    gsum = tl.zeros([BLOCK_F], tl.float32)
    n_feat = tl.minimum(F - f0, BLOCK_F)
    for fl in range(0, n_feat):
        start = tl.load(seg_ptr + layer * (F + 1) + f0 + fl)
        end = tl.load(seg_ptr + layer * (F + 1) + f0 + fl + 1)
        col = tl.zeros([BLOCK_D], tl.float32)
        gs = tl.zeros([BLOCK_E], tl.float32)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + ee
            e_ok = e < end
            flat = tl.load(order_ptr + layer * N * k + e, mask=e_ok, other=0)  # n * k + j
            g = tl.load(g_ptr + layer * N * k + flat, mask=e_ok, other=0.0).to(tl.float32)
            n = flat // k
            xr = tl.load(x_ptr + (layer * N + n[:, None]) * D + d[None, :],
                         mask=e_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            col += tl.sum(xr * g[:, None], axis=0)
            gs += g
        tile = tl.where(ff[None, :] == fl, col[:, None], tile)
        gsum = tl.where(ff == fl, tl.sum(gs, axis=0), gsum)
    cols = f0 + ff
    tl.store(dw_ptr + layer * D * F + d[:, None] * F + cols[None, :], tile,
             mask=d_ok[:, None] & (cols[None, :] < F))
    if HAS_DB:
        if pid_d == 0:
            tl.store(db_ptr + layer * F + cols, gsum, mask=cols < F)


@triton.jit
def _encode_topk_bwd_dx_kernel(
    g_ptr, idx_ptr, wt_ptr, dx_ptr,
    N, D, F, k,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dx[l, n, d] = sum_j g[l, n, j] * W_enc^T[l, idx[l, n, j], d]``; one program per
    (``BLOCK_N`` tokens, ``BLOCK_D`` dims, layer)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (d[None, :] < D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, k):
        slot = (layer * N + rows) * k + j
        f = tl.load(idx_ptr + slot, mask=row_ok, other=0)
        g = tl.load(g_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
        w = tl.load(wt_ptr + (layer * F + f[:, None]) * D + d[None, :], mask=m, other=0.0)
        acc += g[:, None] * w.to(tl.float32)
    tl.store(dx_ptr + (layer * N + rows[:, None]) * D + d[None, :], acc, mask=m)


# ------------------------------------------------------------------------------------------------
# Host launchers
# ------------------------------------------------------------------------------------------------

# Production tile sizes on a GPU (checked for spills at sm_80 / sm_90: compile_jobs()); tiny tiles
# under the interpreter, where every tile is a numpy call.
# BLOCK_N=64, BLOCK_F=64, BLOCK_D=32, 8 warps: 187 (bf16) / 245 (fp32) registers at sm_90 for
# KP=16, no stack; 128-wide tiles or 4 warps spill (the int64 keys and the bitonic merge
# temporaries dominate, not the accumulator). KP >= 64 halves BLOCK_N for the same reason.
FWD_BLOCKS_GPU = dict(BLOCK_N=64, BLOCK_F=64, BLOCK_D=32, num_warps=8, num_stages=3)
FWD_BLOCKS_INTERP = dict(BLOCK_N=16, BLOCK_F=16, BLOCK_D=16, num_warps=4, num_stages=1)
GATHER_BLOCKS = dict(BLOCK_N=32, BLOCK_D=32)
DW_BLOCKS = dict(BLOCK_F=32, BLOCK_D=64, BLOCK_E=32)
DX_BLOCKS = dict(BLOCK_N=32, BLOCK_D=64)


def fwd_blocks(KP: int, gpu: bool = True, precision: str = "tf32") -> dict:
    """Tile sizes of the fused forward for a padded ``k`` of ``KP``."""
    blocks = dict(FWD_BLOCKS_GPU if gpu else FWD_BLOCKS_INTERP)
    blocks["BLOCK_F"] = max(blocks["BLOCK_F"], KP)  # tl.topk(tile, KP) needs KP <= BLOCK_F
    if gpu and KP >= 64:
        blocks["BLOCK_N"] = 32
    # an ieee fp32 dot runs on CUDA cores and needs more registers: at 64 x 64 x 32 tiles ptxas
    # keeps an 80-168 B stack frame; 32 x 64 x 16 gives 255 registers, stack 0 (sm_80) / 16 B
    # (sm_90), LOCAL 0. fp32 with TF32 allowed and bf16 use the tensor-core tiles above.
    if gpu and precision == "ieee":
        blocks.update(BLOCK_N=32, BLOCK_D=16)
    return blocks


def encode_topk_fwd(x, W_enc, b_enc, k, rank_scale=None, out=None):
    """Launch the fused forward; ``out`` optional ``(values fp32-or-x-dtype, indices int64)``."""
    L, N, D = x.shape
    F = W_enc.shape[2]
    x, W_enc, b_enc = x.contiguous(), W_enc.contiguous(), b_enc.contiguous()
    KP = next_pow2(k)
    precision = dot_precision(x.dtype)
    blocks = fwd_blocks(KP, gpu=on_gpu(x), precision=precision)
    values, indices = out if out is not None else (
        torch.empty(L, N, k, device=x.device, dtype=torch.float32),
        torch.empty(L, N, k, device=x.device, dtype=torch.int64),
    )
    scale = rank_scale.contiguous() if rank_scale is not None else b_enc
    grid = (triton.cdiv(N, blocks["BLOCK_N"]), L)
    _encode_topk_fwd_kernel[grid](
        x_ptr=x, w_ptr=W_enc, b_ptr=b_enc, scale_ptr=scale, val_ptr=values, idx_ptr=indices,
        N=N, D=D, F=F, k=k, HAS_SCALE=rank_scale is not None, KP=KP, PRECISION=precision,
        UPCAST=not x.is_cuda, **blocks,
    )
    if rank_scale is not None:
        # the kernel's values are pre * scale: recompute pre at the selected columns
        _gather_pre_kernel[(triton.cdiv(N, GATHER_BLOCKS["BLOCK_N"]), L)](
            x_ptr=x, wt_ptr=W_enc.transpose(1, 2).contiguous(), b_ptr=b_enc, idx_ptr=indices,
            val_ptr=values, N=N, D=D, F=F, k=k, **GATHER_BLOCKS,
        )
    return values, indices


def encode_topk_bwd(grad_values, x, W_enc, indices, needs_x, needs_w, needs_b, out=None):
    """Sparse backward: ``(grad_x, grad_W_enc, grad_b_enc)`` (``None`` where not needed), every
    returned buffer fully overwritten; ``out`` optional preallocated triple."""
    L, N, D = x.shape
    F, k = W_enc.shape[2], indices.shape[2]
    g = grad_values.contiguous()
    x, indices = x.contiguous(), indices.contiguous()
    grad_x, grad_W, grad_b = out if out is not None else (
        torch.empty(L, N, D, device=x.device, dtype=torch.float32) if needs_x else None,
        torch.empty(L, D, F, device=x.device, dtype=torch.float32) if needs_w else None,
        torch.empty(L, F, device=x.device, dtype=torch.float32) if needs_b else None,
    )
    if needs_x:
        # [L, F, d_in]: gathered W_enc columns become contiguous rows
        wt = W_enc.transpose(1, 2).contiguous()
        grid = (triton.cdiv(N, DX_BLOCKS["BLOCK_N"]), triton.cdiv(D, DX_BLOCKS["BLOCK_D"]), L)
        _encode_topk_bwd_dx_kernel[grid](g_ptr=g, idx_ptr=indices, wt_ptr=wt, dx_ptr=grad_x,
                                         N=N, D=D, F=F, k=k, **DX_BLOCKS)
    if needs_w or needs_b:
        # entries (n * k + j) of each layer grouped by feature, in increasing n * k + j
        sorted_f, order = torch.sort(indices.view(L, N * k), dim=1, stable=True)
        bounds = torch.arange(F + 1, device=x.device).expand(L, F + 1).contiguous()
        seg = torch.searchsorted(sorted_f, bounds)  # [L, F + 1] segment starts
        dw = grad_W if needs_w else torch.empty(L, D, F, device=x.device, dtype=torch.float32)
        db = grad_b if needs_b else dw
        grid = (triton.cdiv(F, DW_BLOCKS["BLOCK_F"]), triton.cdiv(D, DW_BLOCKS["BLOCK_D"]), L)
        _encode_topk_bwd_dw_kernel[grid](
            x_ptr=x, g_ptr=g, order_ptr=order, seg_ptr=seg, dw_ptr=dw, db_ptr=db,
            N=N, D=D, F=F, k=k, HAS_DB=needs_b, **DW_BLOCKS,
        )
    return grad_x, grad_W, grad_b


# ------------------------------------------------------------------------------------------------
# autograd, the torch specification and the public ops
# ------------------------------------------------------------------------------------------------


def _triton_ok(x, W_enc, b_enc) -> bool:
    """Triton for fp32 / bf16 / fp16 with matching x and W_enc; float64 (gradcheck, references)
    and mixed dtypes take a torch path."""
    return triton_ok("encode_topk", x, W_enc, b_enc) and W_enc.dtype == x.dtype


class EncodeTopKFunction(torch.autograd.Function):
    """TopK encode, and optionally AuxK's top ``k_aux`` among the columns ``aux_cols [L, D]``
    (``aux_spare [L, D]``: columns that never win) in the same op, so both write one ``W_enc``
    gradient (two ops would each build a ``W_enc``-sized one, the gathered columns' through a
    zeroed scatter, and autograd would add them)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, rank_scale, impl, aux_cols, aux_spare, k_aux):
        if impl == "fused":
            values, indices = encode_topk_fwd(x, W_enc, b_enc, k, rank_scale)
            values = values.to(x.dtype)
        else:
            values, indices = cpu_topk.encode_fwd(x, W_enc, b_enc, k, rank_scale)
        ctx.triton_bwd = impl in ("fused", "two_step")
        ctx.b_dtype = b_enc.dtype
        ctx.mark_non_differentiable(indices)
        if aux_cols is None:
            ctx.save_for_backward(x, W_enc, indices)
            return values, indices
        aux_values, pos = _aux_topk_fwd(x, W_enc, b_enc, aux_cols, aux_spare, k_aux)
        never = aux_values == -math.inf  # slots past a layer's column count
        aux_indices = aux_cols.gather(1, pos.flatten(1)).view_as(pos).masked_fill(never, 0)
        ctx.save_for_backward(x, W_enc, indices, aux_cols, pos, never)
        ctx.mark_non_differentiable(aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux=None, _grad_aux_indices=None):
        x, W_enc, indices, *aux = ctx.saved_tensors
        grads = _encoder_grads(ctx, grad_values, x, W_enc, indices)
        if aux and grad_aux is not None:
            _add_aux_grads(grads, grad_aux, x, W_enc, *aux)
        return *grads, None, None, None, None, None, None


def _aux_topk_fwd(x, W_enc, b_enc, cols, spare, k):
    """``[L, N, k]`` largest pre-activations among the columns ``cols [L, D]`` of each layer
    (spare columns get a ``-inf`` bias, so they never win) and their positions in ``cols``. A few
    dead columns: one small batched GEMM, whatever the device."""
    W = W_enc.gather(2, cols.unsqueeze(1).expand(-1, W_enc.shape[1], -1))  # [L, d_in, D]
    b = b_enc.gather(1, cols).to(x.dtype).masked_fill(spare, -math.inf)
    pre = torch.baddbmm(b.unsqueeze(1), x, W.to(x.dtype))  # [L, N, D]
    return cpu_topk.topk_rows(pre, k)


def _add_aux_grads(grads, grad_aux, x, W_enc, cols, pos, never) -> None:
    """Add AuxK's gradients into the main ``[grad_x, grad_W_enc, grad_b_enc]`` in place: the
    slot gradients scattered into a dense ``[L, N, D]`` over the few columns, two small GEMMs,
    and a scatter-add into the named columns."""
    L, N, _ = x.shape
    D = cols.shape[1]
    g = grad_aux.masked_fill(never, 0)
    G = g.new_zeros(L, N, D).scatter_add_(2, pos, g)  # [L, N, D]
    gx, gw, gb = grads
    if gw is not None:
        dW = torch.bmm(x.transpose(1, 2).to(G.dtype), G)  # [L, d_in, D]
        gw.scatter_add_(2, cols.unsqueeze(1).expand(-1, x.shape[2], -1), dW.to(gw.dtype))
    if gb is not None:
        gb.scatter_add_(1, cols, G.sum(1).to(gb.dtype))
    if gx is not None:
        W = W_enc.gather(2, cols.unsqueeze(1).expand(-1, W_enc.shape[1], -1))
        gx.add_(torch.bmm(G, W.transpose(1, 2).to(G.dtype)).to(gx.dtype))


class EncodeAtFunction(torch.autograd.Function):
    """Pre-activations gathered at given features, with TopK's sparse encoder backward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, indices):
        ctx.save_for_backward(x, W_enc, indices)
        ctx.triton_bwd = _triton_ok(x, W_enc, b_enc)
        ctx.b_dtype = b_enc.dtype
        ctx.mark_non_differentiable(indices)
        return pre.gather(-1, indices.long())

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc, indices = ctx.saved_tensors
        return *_encoder_grads(ctx, grad_values, x, W_enc, indices.long()), None, None


def _encoder_grads(ctx, grad_values, x, W_enc, indices) -> list[torch.Tensor | None]:
    """``[grad_x, grad_W_enc, grad_b_enc]`` (None where not needed) of values gathered at
    ``indices`` from ``x @ W_enc + b_enc``: the Triton sparse backward (fp32 results cast to the
    inputs' dtypes) or the torch path, as ``ctx.triton_bwd`` says."""
    needs = ctx.needs_input_grad[:3]
    if not ctx.triton_bwd:
        return list(cpu_topk.encode_bwd(grad_values, x, W_enc, indices, *needs))
    grads = encode_topk_bwd(grad_values, x, W_enc, indices, *needs)
    return [None if g is None else g.to(dtype)
            for g, dtype in zip(grads, (x.dtype, W_enc.dtype, ctx.b_dtype), strict=True)]


def _pre_torch(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """``[L, N, F]`` pre-activations ``x @ W_enc + b_enc`` in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.baddbmm(b_enc.to(acc).unsqueeze(1), x.to(acc), W_enc.to(acc))


def _top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest of each row, equal scores by increasing index: a stable sort."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def encode_topk_torch(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    rank_scale: torch.Tensor | None = None,
    aux: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Specification of :func:`encode_topk` (dense, plain autograd, fp32 compute, cast back)."""
    pre = _pre_torch(x, W_enc, b_enc)  # [L, N, F]
    score = pre if rank_scale is None else pre * rank_scale.to(pre.dtype).unsqueeze(1)
    indices = _top_indices(score, k)
    out = (pre.gather(-1, indices).to(x.dtype), indices)
    if aux is None:
        return out
    cols, spare, k_aux = aux  # [L, D]: AuxK's columns; spare ones never win
    L, N, _ = pre.shape
    sub = pre.gather(-1, cols.long().unsqueeze(1).expand(L, N, -1))  # [L, N, D]
    sub = sub.masked_fill(spare.unsqueeze(1), -math.inf)
    pos = _top_indices(sub, k_aux)
    aux_values = sub.gather(-1, pos)
    aux_indices = cols.long().gather(1, pos.flatten(1)).view_as(pos)
    return (*out, aux_values.to(x.dtype), aux_indices.masked_fill(aux_values == -math.inf, 0))


def encode_at_torch(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Specification of :func:`encode_at`: the values of ``pre`` at ``indices``, the gradients of
    ``(x @ W_enc + b_enc).gather(-1, indices)`` (dense, plain autograd)."""
    indices = indices.long()
    at = _pre_torch(x, W_enc, b_enc).gather(-1, indices)
    return pre.detach().gather(-1, indices) + (at - at.detach()).to(pre.dtype)


def encode_at(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """``pre.gather(-1, indices)``, differentiable in ``x``, ``W_enc`` and ``b_enc`` as if
    ``pre = x @ W_enc + b_enc`` had been computed with autograd, but through TopK's sparse
    backward: for selections made on a dense, detached ``pre`` (BatchTopK), the ``[L, N, F]``
    pre-activation gradient and its dense ``x^T @ grad`` GEMM never exist.

    Args:
        x: ``[L, N, d_in]``; W_enc: ``[L, d_in, F]``; b_enc: ``[L, F]``.
        pre: ``[L, N, F]`` the pre-activations of exactly these (not differentiated).
        indices: ``[L, N, K]`` feature ids; every slot gets its gradient (mask padding slots'
            values to zero so they pass none).

    Returns:
        ``[L, N, K]`` pre-activations at ``indices``.
    """
    L, N, d_in = x.shape
    if W_enc.shape[:2] != (L, d_in) or b_enc.shape != (L, W_enc.shape[2]) \
            or pre.shape != (L, N, W_enc.shape[2]) or indices.shape[:2] != (L, N):
        raise ValueError(
            f"encode_at: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, b_enc "
            f"{tuple(b_enc.shape)}, pre {tuple(pre.shape)} and indices {tuple(indices.shape)} "
            "do not agree on [L, N, d_in] x [L, d_in, F] -> [L, N, F], [L, N, K]"
        )
    if not _triton_ok(x, W_enc, b_enc) and not cpu_fast_paths.enabled():
        return encode_at_torch(x, W_enc, b_enc, pre, indices)
    return EncodeAtFunction.apply(x, W_enc, b_enc, pre.detach(), indices)


def encode_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    rank_scale: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    aux: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Top-k pre-activations per (layer, token), differentiable in x, W_enc and b_enc.

    Args:
        x: ``[L, N, d_in]`` inputs.
        W_enc: ``[L, d_in, F]``; b_enc: ``[L, F]``.
        k: features kept per row, ``1 <= k <= F``.
        rank_scale: optional ``[L, F]`` non-negative weights (e.g. decoder norms): rows are ranked
            by ``pre * rank_scale`` but the returned values are ``pre``. Not differentiated.
        impl: ``"auto"`` (fused Triton kernels where Triton runs and the dtype is fp32 / bf16 /
            fp16, else torch), ``"fused"``, ``"two_step"`` (library GEMM + torch top-k forward,
            Triton sparse backward) or ``"torch"`` (the specification :func:`encode_topk_torch`,
            or with ``kernels.cpu_fast_paths(True)`` the CPU path of :mod:`kernels.cpu.topk`).
            Keyword only.
        aux: AuxK in the same op, ``(columns [L, D], spare [L, D] bool, k_aux)``: also the top
            ``k_aux`` pre-activations (unscaled) among each layer's ``columns`` (its dead
            features; ``spare`` columns never win). Both selections then write one ``W_enc``
            gradient. Keyword only.

    Returns:
        ``values [L, N, k]`` (pre-activations, apply relu for TopK codes) and ``indices [L, N, k]``
        int64, ordered by decreasing score; equal scores rank the lower feature index first (on
        every path, so the kept set is the same where ties straddle the k-th place).
        With ``aux`` also ``aux_values [L, N, k_aux]`` (``-inf`` where a layer has fewer than
        ``k_aux`` non-spare columns) and their feature ids ``aux_indices`` (0 at those slots).
    """
    L, N, d_in = x.shape
    if W_enc.shape[:2] != (L, d_in) or b_enc.shape != (L, W_enc.shape[2]):
        raise ValueError(
            f"encode_topk: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, b_enc "
            f"{tuple(b_enc.shape)} do not agree on [L, N, d_in] x [L, d_in, F] + [L, F]"
        )
    if not 1 <= k <= W_enc.shape[2]:
        raise ValueError(f"encode_topk: k must be in 1..{W_enc.shape[2]}, got {k}")
    if rank_scale is not None:
        # an [F] or [L, 1] scale would broadcast silently into a different ranking
        if rank_scale.shape != b_enc.shape:
            raise ValueError(
                f"encode_topk: rank_scale must be [L, F] = {tuple(b_enc.shape)}, got "
                f"{tuple(rank_scale.shape)}"
            )
        rank_scale = rank_scale.detach()
    if impl == "auto":
        impl = "fused" if _triton_ok(x, W_enc, b_enc) else "torch"
    elif impl not in ("fused", "two_step", "torch"):
        raise ValueError(f"encode_topk: impl must be auto, fused, two_step or torch, got {impl!r}")
    spec = impl == "torch" and not cpu_fast_paths.enabled()
    if aux is None:
        if spec:
            return encode_topk_torch(x, W_enc, b_enc, k, rank_scale)
        return EncodeTopKFunction.apply(x, W_enc, b_enc, k, rank_scale, impl, None, None, None)
    cols, spare, k_aux = aux
    if cols.dim() != 2 or cols.shape[0] != L or spare.shape != cols.shape \
            or spare.dtype != torch.bool:
        raise ValueError(f"encode_topk: aux columns must be [L={L}, D] with a bool spare mask of "
                         f"that shape, got {tuple(cols.shape)} and {tuple(spare.shape)}")
    if not 1 <= k_aux <= cols.shape[1]:
        raise ValueError(f"encode_topk: k_aux must be in 1..{cols.shape[1]}, got {k_aux}")
    if spec:
        return encode_topk_torch(x, W_enc, b_enc, k, rank_scale, aux=(cols, spare, k_aux))
    return EncodeTopKFunction.apply(x, W_enc, b_enc, k, rank_scale, impl, cols.long(), spare,
                                    k_aux)


# ------------------------------------------------------------------------------------------------
# compile check (``kernels.compile_check.all_jobs``)
# ------------------------------------------------------------------------------------------------


def compile_jobs(arch: int) -> list[CompileJob]:
    """Every kernel at the launchers' GPU tiles: the fused forward plain, ranked, as an ieee fp32
    dot (which may keep a small stack frame, see :func:`fwd_blocks`) and at ``KP`` 64."""
    i32 = "i32"
    fwd_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "scale_ptr": "*bf16",
               "val_ptr": "*fp32", "idx_ptr": "*i64", "N": i32, "D": i32, "F": i32, "k": i32}
    fwd32 = {**fwd_sig, **{p: "*fp32" for p in ["x_ptr", "w_ptr", "b_ptr", "scale_ptr"]}}
    jobs = []
    for sig, kp, scale, precision in [(fwd_sig, 16, False, "tf32"), (fwd_sig, 16, True, "tf32"),
                                      (fwd32, 16, False, "ieee"), (fwd_sig, 64, False, "tf32")]:
        blocks = fwd_blocks(kp, gpu=True, precision=precision)
        warps, _ = blocks.pop("num_warps"), blocks.pop("num_stages")
        jobs.append(CompileJob(
            _encode_topk_fwd_kernel, sig,
            dict(HAS_SCALE=scale, KP=kp, PRECISION=precision, UPCAST=False, **blocks),
            arch=arch, num_warps=warps, max_stack_bytes=32 if precision == "ieee" else 0))
    jobs += [
        CompileJob(_gather_pre_kernel,
                   {"x_ptr": "*bf16", "wt_ptr": "*bf16", "b_ptr": "*bf16", "idx_ptr": "*i64",
                    "val_ptr": "*fp32", "N": i32, "D": i32, "F": i32, "k": i32},
                   dict(GATHER_BLOCKS), arch=arch),
        CompileJob(_encode_topk_bwd_dw_kernel,
                   {"x_ptr": "*bf16", "g_ptr": "*bf16", "order_ptr": "*i64", "seg_ptr": "*i64",
                    "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": i32, "D": i32, "F": i32, "k": i32},
                   {"HAS_DB": True, **DW_BLOCKS}, arch=arch),
        CompileJob(_encode_topk_bwd_dx_kernel,
                   {"g_ptr": "*bf16", "idx_ptr": "*i64", "wt_ptr": "*bf16", "dx_ptr": "*fp32",
                    "N": i32, "D": i32, "F": i32, "k": i32}, dict(DX_BLOCKS), arch=arch),
    ]
    return jobs
