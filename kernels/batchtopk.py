"""Exact BatchTopK selection: Triton radix select and the torch path.

Keep the ``m`` largest pre-activations of a whole batch: ``m = N * k`` of each layer's ``[N, F]``
(scope ``"layer"``) or ``m = L * N * k`` of all ``[L, N, F]`` (scope ``"global"``). Kept values
go through relu.

**Tie rule** (every path): the set is exactly what a stable descending sort keeps
(:func:`topk_mask_torch`, the specification): values equal to the cut go to the lower flat index,
row-major over each layer's ``[N, F]`` (scope layer) or over ``[L, N, F]`` (scope global), so the
selection is deterministic. ``-0.0`` ties with ``+0.0``. The CPU path
(:mod:`kernels.cpu.batchtopk`) takes the cut from ``torch.topk`` and ranks the ties by index.

Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``; float64 input never runs a kernel): a
radix select on order-preserving 32-bit keys of the fp32 values (``-0.0`` canonicalised to
``+0.0`` so it ties with ``+0.0`` as in a sort), batched over segments (layers, or one global
segment). Four passes of ``_radix_hist_kernel`` (grid ``(M / BLOCK, S)``) histogram the next 8 bits
of the keys that share the already-fixed high bits (``tl.histogram`` per block, int32
``atomic_add`` into ``[S, 256]``: integer, so deterministic); between passes a few torch ops on
``[S, 256]`` pick the bin holding the ``r``-th largest remaining key, without a host sync. After
four passes the cut key is exact and ``r`` is the number of ties at the cut to keep.
``_tie_count_kernel`` counts ties per block, a torch cumsum turns that into each block's first
tie rank, and ``_select_kernel`` writes ``key > cut or (key == cut and tie rank < r)``. Reads the
input 6 times, no sort, no ``[S, M]`` index tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import pick_path
from .codes import mask_to_codes
from .compile_check import CompileJob
from .cpu import batchtopk as cpu_batchtopk

# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _ukey(x):
    """uint32 key whose unsigned order is the fp32 order (NaN excluded by the caller)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 -> +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order = float order
    return (ordered ^ (-2147483647 - 1)).to(tl.uint32, bitcast=True)  # flip sign: unsigned order


@triton.jit
def _radix_hist_kernel(
    x_ptr, prefix_ptr, hist_ptr,
    M, shift, hi_mask,
    BLOCK: tl.constexpr,
):
    """``hist[s, b] += #{i in block : key & hi_mask == prefix[s], (key >> shift) & 255 == b}``."""
    pid = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    u = _ukey(tl.load(x_ptr + seg * M + offs, mask=ok, other=0.0).to(tl.float32))
    prefix = tl.load(prefix_ptr + seg).to(tl.uint32)
    match = ok & ((u & hi_mask.to(tl.uint32)) == prefix)
    b = ((u >> shift.to(tl.uint32)) & 255).to(tl.int32)
    h = tl.histogram(b, 256, mask=match)
    tl.atomic_add(hist_ptr + seg * 256 + tl.arange(0, 256), h)


@triton.jit
def _tie_count_kernel(x_ptr, cut_ptr, count_ptr, M, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    u = _ukey(tl.load(x_ptr + seg * M + offs, mask=ok, other=0.0).to(tl.float32))
    cut = tl.load(cut_ptr + seg).to(tl.uint32)
    ties = tl.sum((ok & (u == cut)).to(tl.int32), axis=0)
    tl.store(count_ptr + seg * tl.num_programs(0) + pid, ties)


@triton.jit
def _select_kernel(x_ptr, cut_ptr, need_ptr, base_ptr, mask_ptr, M, BLOCK: tl.constexpr):
    """``mask = key > cut | (key == cut & tie rank < need)``; ``base`` = ties in earlier blocks."""
    pid = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    u = _ukey(tl.load(x_ptr + seg * M + offs, mask=ok, other=0.0).to(tl.float32))
    cut = tl.load(cut_ptr + seg).to(tl.uint32)
    need = tl.load(need_ptr + seg)
    tie = ok & (u == cut)
    rank = tl.load(base_ptr + seg * tl.num_programs(0) + pid) + tl.cumsum(tie.to(tl.int64), 0) - 1
    sel = (u > cut) | (tie & (rank < need))
    tl.store(mask_ptr + seg * M + offs, sel.to(tl.int8), mask=ok)


# ------------------------------------------------------------------------------------------------
# Host launcher
# ------------------------------------------------------------------------------------------------

BLOCK_GPU, BLOCK_INTERP = 4096, 256
NUM_WARPS = 8


def select_mask(x: torch.Tensor, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[S, M]`` bool mask of the ``m`` largest of each row of ``x [S, M]`` (fp32/bf16/fp16,
    no NaN), ties to the lower index; ``out`` an optional ``[S, M]`` int8 buffer."""
    S, M = x.shape
    x = x.contiguous()
    dev = x.device
    BLOCK = BLOCK_GPU if x.is_cuda else BLOCK_INTERP
    grid = (triton.cdiv(M, BLOCK), S)
    # prefix / need as int64 so the uint32 bit patterns above 2**31 stay positive in torch
    prefix = torch.zeros(S, dtype=torch.int64, device=dev)
    need = torch.full((S,), m, dtype=torch.int64, device=dev)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(S, 256, dtype=torch.int32, device=dev)
        hi_mask = (0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF  # the bits fixed by earlier passes
        _radix_hist_kernel[grid](
            x_ptr=x, prefix_ptr=prefix, hist_ptr=hist, M=M, shift=shift, hi_mask=hi_mask,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
        # at_or_above[s, b]: matching keys whose next 8 bits are >= b
        at_or_above = hist.long().flip(1).cumsum(1).flip(1)
        b = (at_or_above >= need[:, None]).sum(1) - 1  # largest bin still holding the need-th
        above = torch.where(b < 255, at_or_above.gather(1, (b + 1).clamp(max=255)[:, None])[:, 0],
                            torch.zeros_like(b))
        need = need - above
        prefix = prefix | (b << shift)
    cut = prefix  # [S] int64 holding the uint32 key of the m-th largest value
    counts = torch.empty(S, grid[0], dtype=torch.int32, device=dev)
    _tie_count_kernel[grid](x_ptr=x, cut_ptr=cut, count_ptr=counts, M=M, BLOCK=BLOCK,
                            num_warps=NUM_WARPS)
    base = (counts.long().cumsum(1) - counts.long()).contiguous()  # ties in earlier blocks
    mask = out if out is not None else torch.empty(S, M, dtype=torch.int8, device=dev)
    _select_kernel[grid](x_ptr=x, cut_ptr=cut, need_ptr=need, base_ptr=base, mask_ptr=mask,
                         M=M, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return mask.view(torch.bool)


# ------------------------------------------------------------------------------------------------
# the torch specification and the public ops (a selection: no autograd Function; the kept
# values' gradient flows through mask_to_codes)
# ------------------------------------------------------------------------------------------------


def topk_mask_torch(rows: torch.Tensor, m: int) -> torch.Tensor:
    """Specification: ``[S, M]`` bool mask of the ``m`` largest entries of each row, equal
    values by increasing index (a stable descending sort; the first ``m`` places win)."""
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :m]
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(1, order, True)


def _topk_mask(rows: torch.Tensor, m: int) -> torch.Tensor:
    """The one selection: Triton, the CPU path or the specification (``_dispatch``)."""
    path = pick_path("batchtopk", rows)
    if path == "triton":
        return select_mask(rows, m)
    return cpu_batchtopk.topk_mask(rows, m) if path == "cpu" else topk_mask_torch(rows, m)


def _check(flat: torch.Tensor, m: int) -> None:
    if not 0 < m <= flat.numel():
        raise ValueError(f"cannot keep {m} of {flat.numel()} entries")
    if torch.isnan(flat).any():
        raise ValueError("BatchTopK input contains NaN")


def exact_topk_mask(flat: torch.Tensor, m: int) -> torch.Tensor:
    """Bool mask of the ``m`` largest entries of a 1-D tensor; ties go to the lower index."""
    _check(flat, m)
    return _topk_mask(flat.view(1, -1), m).view(-1)


def batchtopk_mask(pre: torch.Tensor, k: int, scope: str) -> torch.Tensor:
    """``[L, N, F]`` bool mask of the BatchTopK winners."""
    L, N, F = pre.shape
    detached = pre.detach()
    if scope not in ("layer", "global"):
        raise ValueError(f"BatchTopK scope must be 'layer' or 'global', got {scope!r}")
    S, m = (L, N * k) if scope == "layer" else (1, L * N * k)
    _check(detached.flatten(), m if scope == "global" else N * k)
    if m > detached.numel() // S:
        raise ValueError(f"cannot keep {m} of {detached.numel() // S} entries")
    # one batched select over all segments (layers, or the one global segment)
    return _topk_mask(detached.reshape(S, -1), m).view(L, N, F)


def batchtopk(
    pre: torch.Tensor, k: int, scope: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK codes and the smallest kept value.

    Args:
        pre: ``[L, N, F]`` pre-activations.
        k: average active features per (token, layer).
        scope: ``"layer"`` (``N*k`` winners per layer) or ``"global"`` (``L*N*k`` overall).

    Returns:
        ``values [L, N, K]`` (relu of the kept pre-activations, differentiable), ``indices`` int32,
        and ``min_kept`` (``[L]`` for scope layer, ``[1]`` for global): the smallest kept
        pre-activation clamped at 0, the threshold that reproduces the selection at inference.
    """
    mask = batchtopk_mask(pre, k, scope)
    values, indices = mask_to_codes(pre, mask)
    with torch.no_grad():  # the kept values in row-major order: each layer keeps exactly N * k
        kept = pre.detach()[mask].view(pre.shape[0] if scope == "layer" else 1, -1)
        min_kept = kept.amin(dim=1).clamp(min=0)
    return torch.relu(values), indices, min_kept


# ------------------------------------------------------------------------------------------------
# compile check (``kernels.compile_check.all_jobs``)
# ------------------------------------------------------------------------------------------------


def compile_jobs(arch: int) -> list[CompileJob]:
    """The three selection kernels at the GPU block size; no stack, no spills."""
    blk = {"BLOCK": BLOCK_GPU}
    return [
        CompileJob(_radix_hist_kernel, {"x_ptr": "*fp32", "prefix_ptr": "*i64",
                                        "hist_ptr": "*i32", "M": "i32", "shift": "i32",
                                        "hi_mask": "i64"}, blk, arch, NUM_WARPS),
        CompileJob(_tie_count_kernel, {"x_ptr": "*fp32", "cut_ptr": "*i64", "count_ptr": "*i32",
                                       "M": "i32"}, blk, arch, NUM_WARPS),
        CompileJob(_select_kernel, {"x_ptr": "*fp32", "cut_ptr": "*i64", "need_ptr": "*i64",
                                    "base_ptr": "*i64", "mask_ptr": "*i8", "M": "i32"},
                   blk, arch, NUM_WARPS),
    ]
