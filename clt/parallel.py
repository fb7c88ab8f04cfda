"""Tensor (feature-sharded) and data parallelism over torch.distributed, applied from outside the
single-device model (DESIGN.md, "Distributed").

Ranks form a 2-D mesh ``(data, tensor)``: global rank ``g = dp_rank * tensor + tp_rank``, so the
ranks of one tensor-parallel (TP) group are neighbours (one node, NVLink). In a TP group each rank
owns ``F / P`` consecutive features of every layer (encoder columns, biases, thresholds, decoder
rows, dead-feature counters); ``b_dec`` and the standardizer are replicated. Every collective is
explicit, inside autograd functions where gradients cross it:

- TopK: each rank proposes its local top-k per (layer, token); the candidates' scores and global
  feature ids are all-gathered and each rank keeps those of its candidates that are in the global
  top k (ties to the lower feature id).
- BatchTopK: each rank proposes its local winners; the exact global winners of the whole batch
  (all data-parallel replicas included, as one process with the concatenated batch would select)
  are chosen from the gathered candidates, ordered by their flat index in that batch.
- JumpReLU / ReLU are elementwise: nothing to exchange.
- Decode: each rank decodes its own features; one all-reduce of ``[L, N, d_out]`` (backward: the
  identity, because the loss is replicated) completes the output, then ``b_dec`` is added. The
  main and AuxK decodes (or Matryoshka's groups) share that one all-reduce, stacked.
- Loss terms that sum over features (sparsity, pre-activation, L0) are all-reduced the same way;
  AuxK selects across shards like TopK.
Data parallel replicas read different tokens; gradients are averaged by bucketed all-reduces that
start while backward still runs; firing statistics are summed over replicas so dead-feature
masks (and AuxK) agree everywhere.

``Mesh.single()`` is the single process: every collective is the identity, so the training
library calls the same functions with or without a process group.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import kernels

from .model import Codes, CrossLayerTranscoder, layer_rows

# ---- the mesh --------------------------------------------------------------------------------


@dataclass
class Mesh:
    """Ranks and process groups of a ``(data, tensor)`` mesh; sizes 1 are the single process."""

    tp_size: int = 1
    dp_size: int = 1
    rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    world_group: Any = None
    # bytes this rank sends through collectives (ring algorithms: an all-reduce of B bytes over
    # P ranks sends 2 (P-1)/P B, an all-gather of B bytes per rank sends (P-1) B)
    comm_bytes: int = field(default=0, compare=False)

    @classmethod
    def single(cls) -> Mesh:
        return cls()

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (identities when the group has one rank) ----------------------------

    def _count(self, t: torch.Tensor, size: int, reduce: bool = True) -> None:
        sent = t.numel() * t.element_size() * (size - 1)
        self.comm_bytes += 2 * sent // size if reduce else sent

    def tp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank partials over the TP group; backward passes the gradient through (every
        rank holds the same replicated loss)."""
        if self.tp_size == 1:
            return t
        self._count(t, self.tp_size)
        return _SumOverGroup.apply(t, self.tp_group)

    @torch.no_grad()
    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a statistic (no gradient) over data-parallel replicas, out of place."""
        if self.dp_size == 1:
            return t
        out = t.clone()
        self._count(out, self.dp_size)
        dist.all_reduce(out, group=self.dp_group)
        return out

    @torch.no_grad()
    def world_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        out = t.clone()
        self._count(out, self.world_size)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.world_group)
        return out

    @torch.no_grad()
    def gather(self, t: torch.Tensor, group: str) -> torch.Tensor:
        """``[P, *t.shape]`` of every rank's ``t`` in the ``"tp"`` or ``"world"`` group, in rank
        order (all ranks pass the same shape)."""
        size = self.tp_size if group == "tp" else self.world_size
        if size == 1:
            return t.unsqueeze(0)
        out = t.new_empty(size, *t.shape)
        self._count(t, size, reduce=False)
        pg = self.tp_group if group == "tp" else self.world_group
        if t.is_cuda:
            dist.all_gather_into_tensor(out, t.contiguous(), group=pg)
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.unbind(0)), t.contiguous(), group=pg)
        return out

    def gather_features(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Concatenate a per-feature tensor's shards along ``dim`` (TP group): the full ``F``."""
        if self.tp_size == 1:
            return t
        return torch.cat(list(self.gather(t, "tp").unbind(0)), dim=dim)

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with global rank 0's values."""
        if self.world_size == 1:
            return
        for t in tensors:
            dist.broadcast(t, src=0, group=self.world_group)

    def broadcast_object(self, obj: Any) -> Any:
        """Global rank 0's ``obj`` (picklable) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.world_group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.world_group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.world_group)

    @torch.no_grad()
    def dp_mean_metrics(self, metrics: dict[str, torch.Tensor | float]) -> dict:
        """Average metric tensors over data-parallel replicas (for logging)."""
        if self.dp_size == 1:
            return metrics
        return {name: self.dp_sum(torch.as_tensor(v, dtype=torch.float64)) / self.dp_size
                for name, v in metrics.items()}


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, group: Any) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def init_mesh(tensor: int, data: int, timeout_s: float, backend: str | None = None) -> Mesh:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``MASTER_*``) and build
    the TP and DP groups. A single process without torchrun gets ``Mesh.single()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tensor * data:
        raise ValueError(f"parallel.tensor * parallel.data = {tensor * data} but {world} "
                         "processes were launched (torchrun --nproc_per_node * --nnodes)")
    if world == 1:
        return Mesh.single()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return mesh_from_group(tensor, data, timeout_s)


def mesh_from_group(tensor: int, data: int, timeout_s: float = 600.0) -> Mesh:
    """The mesh over an initialised default process group (every rank must call this).
    ``timeout_s`` bounds every collective of the sub-groups (they do not inherit the default
    group's timeout)."""
    rank = dist.get_rank()
    timeout = datetime.timedelta(seconds=timeout_s)
    tp_group = dp_group = None
    for d in range(data):  # new_group is collective: every rank creates every group, in order
        group = dist.new_group([d * tensor + t for t in range(tensor)], timeout=timeout)
        if rank // tensor == d:
            tp_group = group
    for t in range(tensor):
        group = dist.new_group([d * tensor + t for d in range(data)], timeout=timeout)
        if rank % tensor == t:
            dp_group = group
    return Mesh(tensor, data, rank, tp_group, dp_group, dist.group.WORLD)


def shutdown(mesh: Mesh) -> None:
    """Leave the process group (``train.py``'s last checkpoint ends with a barrier, so no rank
    leaves while a peer still completes a collective)."""
    if mesh.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ---- exact selection from gathered candidates -------------------------------------------------


def select_top(score: torch.Tensor, key: torch.Tensor, m: int | torch.Tensor) -> torch.Tensor:
    """Bool ``[S, C]``: per row the ``m`` entries with the largest ``score``, ties to the smaller
    ``key`` (keys are distinct within a row). ``m`` may be ``[S]`` per row."""
    order = key.argsort(dim=-1)
    ranked = score.gather(-1, order).argsort(dim=-1, descending=True, stable=True)
    m = torch.as_tensor(m, device=score.device).expand(score.shape[0]).unsqueeze(1)
    keep_ranked = torch.arange(score.shape[1], device=score.device).unsqueeze(0) < m
    keep_sorted = torch.zeros_like(keep_ranked).scatter_(-1, ranked, keep_ranked)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _keep_mine(mesh: Mesh, score: torch.Tensor, key: torch.Tensor, m, group: str) -> torch.Tensor:
    """Gather ``[S, c]`` candidates of every rank of ``group`` and return the keep mask of this
    rank's own ``c`` candidates under the exact global selection of ``m`` per row."""
    scores, keys = mesh.gather(score, group), mesh.gather(key, group)  # [P, S, c]
    P, S, c = scores.shape

    def rows(t: torch.Tensor) -> torch.Tensor:  # [S, P * c]: each row's candidates of all ranks
        return t.permute(1, 0, 2).reshape(S, P * c)

    keep = select_top(rows(scores), rows(keys), m).view(S, P, c)
    me = mesh.tp_rank if group == "tp" else mesh.rank
    return keep[:, me]


# ---- the feature-sharded model ----------------------------------------------------------------


class ShardedCLT(CrossLayerTranscoder):
    """This rank's ``F / P`` features of a ``CrossLayerTranscoder`` with ``n_features = F``.

    Parameters and buffers have the single-device names with the feature dimension cut to the
    local shard (see ``SHARDED``), so a state dict of this module is one shard of the full one.
    ``forward``, ``encode``, ``decode`` and ``auxk_codes`` return what the full model would, with
    codes holding this rank's features only (local indices).
    """

    def __init__(self, mesh: Mesh, n_features: int, k: int | None = None, **kwargs: Any) -> None:
        P = mesh.tp_size
        if n_features % P:
            raise ValueError(f"n_features={n_features} must be divisible by the {P} TP ranks")
        local = n_features // P
        self.global_features = n_features  # before super().__init__: reset_parameters reads it
        super().__init__(n_features=local, k=None if k is None else min(k, local), **kwargs)
        self.mesh, self.k = mesh, k
        self.feature_offset = mesh.tp_rank * local
        if self.nonlinearity in ("topk", "batchtopk") and not (k and 1 <= k <= n_features):
            raise ValueError(f"{self.nonlinearity} needs 1 <= k <= n_features={n_features}")

    def _features_total(self, n_features: int) -> int:
        return self.global_features

    def prefix_ranges(self) -> list[tuple[int, int]]:
        """The full model's Matryoshka ranges cut to this shard (possibly empty)."""
        off, n = self.feature_offset, self.n_features
        return [(min(max(lo - off, 0), n), min(max(hi - off, 0), n))
                for lo, hi in super().prefix_ranges()]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        bound = 1 / math.sqrt(self.global_features)  # the full model's init, not the shard's
        self.W_enc.uniform_(-bound, bound)

    def encode(self, x: torch.Tensor, layer: int | None = None) -> Codes:
        if self.nonlinearity != "topk" or self.mesh.tp_size == 1:
            return super().encode(x, layer)  # BatchTopK selects in _batchtopk below
        self._check_inputs(x, layer)
        rows = slice(None) if layer is None else slice(layer, layer + 1)
        scale = self.decoder_norms()[rows] if self.rank_by_decoder_norm else None
        W, b = layer_rows(self.W_enc, layer), layer_rows(self.b_enc, layer)
        pre, idx = kernels.encode_topk(x, W, b, min(self.k, self.n_features), scale)
        return self._global_topk(pre, idx, scale)

    def _global_topk(self, pre: torch.Tensor, idx: torch.Tensor,
                     scale: torch.Tensor | None) -> Codes:
        """This rank's local TopK candidates that are in each token's global top k."""
        score = pre.detach() if scale is None else pre.detach() * scale.gather(
            1, idx.flatten(1)).view_as(idx)
        keep = self._keep_per_token(score, idx, self.k)
        return Codes(torch.where(keep, torch.relu(pre), torch.zeros_like(pre)), idx)

    def _global_auxk(self, pre: torch.Tensor, idx: torch.Tensor, n_dead: torch.Tensor,
                     K: int) -> Codes:
        """This rank's AuxK candidates that are in each token's global top ``K`` dead ones."""
        keep = self._keep_per_token(pre.detach(), idx, torch.clamp(n_dead, max=K))
        return Codes(torch.where(keep, torch.relu(pre), torch.zeros_like(pre)), idx)

    def encode_with_aux(
        self, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int
    ) -> tuple[Codes, Codes | None]:
        if self.mesh.tp_size == 1 or dead is None or self.nonlinearity != "topk":
            return super().encode_with_aux(x, dead, k_aux)
        self._check_inputs(x)
        n_dead = self.mesh.tp_sum(dead.sum(dim=1))  # [L] dead features of the full model
        K = min(k_aux, int(n_dead.max()))  # the same on every rank: so are the collectives
        scale = self.decoder_norms() if self.rank_by_decoder_norm else None
        pre, idx, aux_pre, aux_idx = self.topk_candidates(x, dead, K, scale)
        codes = self._global_topk(pre, idx, scale)
        return codes, None if K == 0 else self._global_auxk(aux_pre, aux_idx, n_dead, K)

    def _keep_per_token(self, score: torch.Tensor, idx: torch.Tensor, m) -> torch.Tensor:
        """Keep mask ``[L, N, c]`` of this rank's candidates in each token's global top ``m``."""
        L, N, c = score.shape
        keys = (idx + self.feature_offset).flatten(0, 1)
        m = m if isinstance(m, int) else m.repeat_interleave(N)
        return _keep_mine(self.mesh, score.flatten(0, 1), keys, m, "tp").view(L, N, c)

    def _batchtopk(self, x: torch.Tensor, pre: torch.Tensor, layer: int | None) -> Codes:
        if not self.training:
            return super()._batchtopk(x, pre, layer)  # inference threshold: elementwise
        mesh, (L, N, Fl) = self.mesh, pre.shape
        scope = self.batchtopk_scope
        k_cand = min(self.k * mesh.dp_size, Fl)  # a rank never holds more winners than this
        cand = kernels.batchtopk_mask(pre, k_cand, scope)
        nz = cand.nonzero()  # [count, 3] row-major, so each layer's block is contiguous
        lay, tok, feat = nz.unbind(1)
        # flat index in the batch one process would see: replicas' tokens concatenated
        n_global, F = N * mesh.dp_size, self.global_features
        key = ((mesh.dp_rank * N + tok) * F + self.feature_offset + feat)
        S = L if scope == "layer" else 1
        if scope == "global":
            key = key + lay * n_global * F
        values = pre.detach()[lay, tok, feat]
        m = n_global * self.k * (1 if scope == "layer" else L)
        keep = _keep_mine(mesh, values.view(S, -1), key.view(S, -1), m, "world").flatten()
        mask = torch.zeros_like(cand)
        mask[lay[keep], tok[keep], feat[keep]] = True
        out_values, indices = kernels.mask_to_codes(pre.detach(), mask)
        with torch.no_grad():  # smallest kept value of the whole batch, the same on every rank
            mine = torch.where(keep.view(S, -1), values.view(S, -1), torch.inf).amin(dim=1)
            min_kept = -mesh.world_max(-mine)
            if layer is None:
                self._update_threshold(min_kept.clamp(min=0))
        return self._with_encoder_grad(x, pre, layer, torch.relu(out_values), indices)

    def decode_many(self, codes: Sequence[Codes], biases: Sequence[bool]) -> list[torch.Tensor]:
        if self.mesh.tp_size == 1:
            return super().decode_many(codes, biases)
        parts = super().decode_many(codes, [False] * len(codes))
        if all(p.shape == parts[0].shape for p in parts):  # main + AuxK: one all-reduce
            parts = list(self.mesh.tp_sum(torch.stack(parts)).unbind(0))
        else:
            parts = [self.mesh.tp_sum(p) for p in parts]
        return [p + self.b_dec.unsqueeze(1) if b else p
                for p, b in zip(parts, biases, strict=True)]

    def auxk_codes(self, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> Codes | None:
        if self.mesh.tp_size == 1:
            return super().auxk_codes(x, dead, k_aux)
        n_dead = self.mesh.tp_sum(dead.sum(dim=1))  # [L] dead features of the full model
        if int(n_dead.max()) == 0:
            return None  # the same answer on every rank, so every rank skips the collectives
        K = min(k_aux, int(n_dead.max()))
        return self._global_auxk(*self.auxk_candidates(x, dead, K), n_dead, K)


# ---- which tensors are sharded, and how -------------------------------------------------------

# Feature dimension of each per-feature tensor (parameters, buffers, optimizer moments, counters).
SHARDED = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "tokens_since_fired": 1, "counts": 1}
DECODER = "W_dec"


def _decoder_blocks(W_dec: torch.Tensor, layout: kernels.DecoderLayout) -> list[torch.Tensor]:
    return [layout.source_view(W_dec, s) for s in range(layout.n_layers)]


def shard_tensor(name: str, full: torch.Tensor, rank: int, size: int,
                 layout: kernels.DecoderLayout) -> torch.Tensor:
    """Rank ``rank``'s slice of one full-model tensor (``layout`` is the full model's)."""
    local = layout.n_features // size
    if name == DECODER:
        blocks = [b[rank * local:(rank + 1) * local] for b in _decoder_blocks(full, layout)]
        return torch.cat([b.reshape(-1, full.shape[-1]) for b in blocks]).clone()
    if name in SHARDED:
        return full.narrow(SHARDED[name], rank * local, local).clone()
    return full.clone()


def merge_tensors(name: str, shards: Sequence[torch.Tensor],
                  layout: kernels.DecoderLayout) -> torch.Tensor:
    """Inverse of ``shard_tensor``: the full tensor from every rank's shard, in rank order."""
    if name == DECODER:
        local = kernels.DecoderLayout(layout.n_layers, layout.n_features // len(shards),
                                      layout.reach)
        per_source = zip(*[_decoder_blocks(s, local) for s in shards], strict=True)
        return torch.cat([torch.cat(blocks).reshape(-1, shards[0].shape[-1])
                          for blocks in per_source])
    if name in SHARDED:
        return torch.cat(list(shards), dim=SHARDED[name])
    return shards[0]


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def shard_model_state(full: dict, rank: int, size: int, layout: kernels.DecoderLayout) -> dict:
    return {k: shard_tensor(_leaf(k), v, rank, size, layout) for k, v in full.items()}


def merge_model_states(shards: Sequence[dict], layout: kernels.DecoderLayout) -> dict:
    return {k: merge_tensors(_leaf(k), [s[k] for s in shards], layout) for k in shards[0]}


def shard_optimizer_state(full: dict, names: list[str], rank: int, size: int,
                          layout: kernels.DecoderLayout) -> dict:
    """Slice an Adam ``state_dict`` (moments shaped like their parameter) for one rank;
    ``names[i]`` is the parameter name of optimizer index ``i``."""
    def one(i, state):
        return {k: shard_tensor(names[i], v, rank, size, layout) if _is_moment(v) else v
                for k, v in state.items()}
    return {"state": {i: one(i, s) for i, s in full["state"].items()},
            "param_groups": full["param_groups"]}


def merge_optimizer_states(shards: Sequence[dict], names: list[str],
                           layout: kernels.DecoderLayout) -> dict:
    def one(i):
        states = [s["state"][i] for s in shards]
        return {k: merge_tensors(names[i], [s[k] for s in states], layout)
                if _is_moment(v) else v for k, v in states[0].items()}
    return {"state": {i: one(i) for i in shards[0]["state"]},
            "param_groups": shards[0]["param_groups"]}


def _is_moment(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0  # Adam's "step" is a 0-d tensor


def shard_parameters(model: CrossLayerTranscoder) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def local_states(state: dict, model: CrossLayerTranscoder, mesh: Mesh,
                 n_features: int) -> tuple[dict, dict, dict]:
    """This rank's model, optimizer and firing-counter states from a full (merged) checkpoint
    of a model with ``n_features`` features: re-sharding for any tensor-parallel size."""
    if mesh.tp_size == 1:
        return state["model"], state["optimizer"], state["counter"]
    layout = kernels.DecoderLayout(model.n_layers, n_features, model.reach)
    r, P = mesh.tp_rank, mesh.tp_size
    counter = {**state["counter"],
               "counts": shard_tensor("counts", state["counter"]["counts"], r, P, layout)}
    return (shard_model_state(state["model"], r, P, layout),
            shard_optimizer_state(state["optimizer"], shard_parameters(model), r, P, layout),
            counter)


# ---- data parallel gradients and the global gradient norm -------------------------------------


class GradSync:
    """Average gradients over the data-parallel group with bucketed async all-reduces.

    Buckets (about ``bucket_mb`` each, parameters in reverse registration order, the order in
    which backward produces them) start as soon as all their gradients are accumulated in the
    last micro-batch (``arm()`` before its backward), always in bucket order so every rank issues
    the same collectives in the same order; ``finish()`` starts what is left and waits.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], mesh: Mesh,
                 bucket_mb: float = 25.0) -> None:
        self.mesh = mesh
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed(list(params)):
            if size and size + p.numel() * p.element_size() > bucket_mb * 2**20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): b for b, ps in enumerate(self.buckets) for p in ps}
        self.ready = [0] * len(self.buckets)
        self.pending: list[tuple[int, torch.Tensor, Any]] = []
        self.armed = False
        self.next_bucket = 0
        if mesh.dp_size > 1:
            for ps in self.buckets:
                for p in ps:
                    p.register_post_accumulate_grad_hook(self._on_grad)

    def arm(self) -> None:
        self.armed = True
        self.ready = [0] * len(self.buckets)
        self.next_bucket = 0

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        b = self.bucket_of[id(p)]
        self.ready[b] += 1
        while (self.next_bucket < len(self.buckets)
               and self.ready[self.next_bucket] == len(self.buckets[self.next_bucket])):
            self._launch(self.next_bucket)

    def _launch(self, b: int) -> None:
        grads = []
        for p in self.buckets[b]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads)
        self.mesh._count(flat, self.mesh.dp_size)
        work = dist.all_reduce(flat, group=self.mesh.dp_group, async_op=True)
        self.pending.append((b, flat, work))
        self.next_bucket = b + 1

    def finish(self) -> None:
        if self.mesh.dp_size == 1:
            return
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
        for b, flat, work in self.pending:
            work.wait()
            flat /= self.mesh.dp_size
            offset = 0
            for p in self.buckets[b]:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.pending.clear()
        self.armed = False


def clip_grad_norm(model: torch.nn.Module, max_norm: float, mesh: Mesh) -> torch.Tensor:
    """``clip_grad_norm_`` over the full model: sharded gradients' squares summed over the TP
    group, replicated ones (``b_dec``) counted once."""
    sharded = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    replicated = torch.zeros_like(sharded)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().float().pow(2).sum()
        if _leaf(name) in SHARDED or _leaf(name) == DECODER:
            sharded += sq
        else:
            replicated += sq
    total = (mesh.tp_sum(sharded) + replicated).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


# ---- input replication in a TP group ----------------------------------------------------------


class ShardedSource:
    """A data source seen through the TP group: each rank draws ``n / P`` tokens from its own
    stream and the slices are all-gathered, so every rank of the group holds the same batch
    (the LM runs once per token). Held-out batches are the same on every rank already."""

    def __init__(self, source: Any, mesh: Mesh) -> None:
        self.source, self.mesh = source, mesh
        self.d_in, self.d_out = source.d_in, source.d_out

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        P = self.mesh.tp_size
        if n % P:
            raise ValueError(f"a batch of {n} tokens cannot be split over {P} TP ranks")
        x, y = self.source.next_batch(n // P)
        if P == 1:
            return x, y
        return (torch.cat(list(self.mesh.gather(x, "tp").unbind(0)), dim=1),
                torch.cat(list(self.mesh.gather(y, "tp").unbind(0)), dim=1))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)  # heldout_batches, state_dict, close, ...
