"""CPU performance path of the sparse decode (what a training step runs on a CPU).

Same results as :func:`kernels.decode.sparse_decode_torch` (the specification) up to rounding,
organised for a CPU: grouped by source, the forward is one ``embedding_bag`` per source over its
``[F, R_s * d_out]`` block (a feature's whole crosslayer write is one row), in cache-sized chunks
of tokens (``CHUNK_BYTES``); ``grad_W_dec`` is the forward transposed, one ``embedding_bag``
whose bags are the table's rows (each summing ``value * grad_out`` over the slots that read it,
so each row is written once and nothing ``W_dec``-sized is zeroed or added), into a buffer from
:mod:`kernels.buffers` (last step's gradient where the trainer donated it); ``grad_values`` are
sampled products ``<G_s[n], W_s[f]>``. Sources whose codes name few distinct features (AuxK) use
dense GEMMs over those rows instead (``DENSE_RATIO``). Nothing of size ``[N, F]`` exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F_

from .. import buffers
from ..layout import DecoderLayout

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


def decode_fwd(
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


def decode_bwd(
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


