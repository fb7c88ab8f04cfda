"""CPU performance path of MOLT (what a training step runs on a CPU).

The plan of :func:`kernels.molt.make_plan` (entries sorted by expert), then per active expert two
GEMMs over its gathered tokens into its entries' rows and one ``embedding_bag`` that sums each
token's slots (the combine), in fp32 (fp64 for fp64 inputs). Neither direction forms a
``[N, T, r]`` tensor or a dense ``[N, T]`` gate; same results as the specification
:func:`kernels.molt.molt_apply_torch` up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from .. import molt  # the plan (kernels.molt imports this module: read molt.* at call time)


def _experts(plan: molt.MoltPlan, g: int):
    """``(local expert, lo, hi)`` of group ``g``'s experts that hold entries."""
    e0, e1 = plan.group_experts[g]
    seg = plan.seg_host
    for e in range(e0, e1):
        if seg[e + 1] > seg[e]:
            yield e - e0, seg[e], seg[e + 1]


def _pair_buffer(plan: molt.MoltPlan, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[P + 1, width]`` per-entry rows; the extra zero row is where unused slots point."""
    P = plan.perm.numel()
    buf = torch.empty(P + 1, width, device=plan.perm.device, dtype=dtype)
    buf[P] = 0
    return buf


def _combine_torch(buf: torch.Tensor, plan: molt.MoltPlan, K: int) -> torch.Tensor:
    """``[L * N, width]`` sums of each token's slots' rows: one ``embedding_bag`` (bags of ``K``
    slots; unused slots read the zero row). A per-expert ``index_add_`` instead was half of the
    CPU step (a single-threaded scatter, ~6 ms per expert at N=1024, d=576)."""
    pos = torch.where(plan.pos < 0, buf.shape[0] - 1, plan.pos)
    offsets = torch.arange(0, pos.numel(), K, device=pos.device)
    return F_.embedding_bag(pos, buf, offsets, mode="sum")


def molt_fwd(x, values, indices, Us, Vs):
    """Torch forward: per active expert ``z = v * (x[tok] @ V_e^T) @ U_e^T`` into its entries'
    rows, then each token sums its slots' rows."""
    L, N, d_in = x.shape
    K = values.shape[2]
    d_out = Us[0].shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    plan = molt.make_plan(values, indices, [U.shape[1] for U in Us])
    x2 = x.reshape(L * N, d_in)
    z = _pair_buffer(plan, d_out, acc)
    for g, (U, V) in enumerate(zip(Us, Vs, strict=True)):
        U2, V2 = U.flatten(0, 1), V.flatten(0, 1)  # [E_g, d_out, r], [E_g, r, d_in]
        for e, lo, hi in _experts(plan, g):
            h = x2.index_select(0, plan.tok[lo:hi]).to(acc) @ V2[e].to(acc).t()  # [c, r]
            # the gate scales the [c, r] side, and the product lands in place: no [c, d] temps
            h.mul_(plan.val[lo:hi].to(acc).unsqueeze(1))
            torch.mm(h, U2[e].to(acc).t(), out=z[lo:hi])
    return _combine_torch(z, plan, K).view(L, N, d_out).to(x.dtype)


def molt_bwd(grad_out, x, values, indices, Us, Vs, *, need_x, need_values, need_w,
                   zero_slot_grad=True):
    """Torch backward, same contract as :func:`kernels.molt.molt_bwd`."""
    L, N, d_in = x.shape
    K = values.shape[2]
    d_out = Us[0].shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    plan = molt.make_plan(values, indices, [U.shape[1] for U in Us],
                     zero_slots=zero_slot_grad if need_values else False)
    x2, g2 = x.reshape(L * N, d_in), grad_out.reshape(L * N, d_out)
    gx_pairs = _pair_buffer(plan, d_in, acc) if need_x else None
    dots = torch.zeros(plan.perm.numel(), device=x.device, dtype=acc)
    grad_Us, grad_Vs = [], []
    for g, (U, V) in enumerate(zip(Us, Vs, strict=True)):
        need_U, need_V = need_w[g]
        U2, V2 = U.flatten(0, 1), V.flatten(0, 1)
        gU = torch.zeros_like(U2) if need_U else None
        gV = torch.zeros_like(V2) if need_V else None
        for e, lo, hi in _experts(plan, g):
            tok = plan.tok[lo:hi]
            v = plan.val[lo:hi].to(acc).unsqueeze(1)  # [c, 1]
            xs, gs = x2.index_select(0, tok).to(acc), g2.index_select(0, tok).to(acc)
            Ue, Ve = U2[e].to(acc), V2[e].to(acc)
            h = xs @ Ve.t()  # [c, r]
            gu = gs @ Ue  # [c, r]
            dots[lo:hi] = (gu * h).sum(dim=1)
            gh = gu.mul_(v)
            # v scales the [c, r] factors, never a [c, d] one
            if need_U:
                gU[e] = (gs.t() @ h.mul_(v)).to(U.dtype)
            if need_V:
                gV[e] = (gh.t() @ xs).to(V.dtype)
            if need_x:
                torch.mm(gh, Ve, out=gx_pairs[lo:hi])
        grad_Us.append(None if gU is None else gU.view_as(U))
        grad_Vs.append(None if gV is None else gV.view_as(V))
    grad_values = None
    if need_values:
        grad_values = values.new_zeros(L * N * K)
        grad_values[plan.perm] = dots.to(values.dtype)
        grad_values = grad_values.view_as(values)
    grad_x = _combine_torch(gx_pairs, plan, K).view(L, N, d_in).to(x.dtype) if need_x else None
    return grad_x, grad_values, grad_Us, grad_Vs
