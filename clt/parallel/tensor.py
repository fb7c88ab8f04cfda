"""Feature sharding applied from outside a built single-device model (DESIGN.md, "Distributed").

:func:`parallelize` cuts a model's per-feature tensors to this rank's ``F / P`` consecutive
features of every layer (encoder columns, biases, thresholds, decoder rows, dead-feature
counters; ``b_dec`` and the standardizer stay replicated) and installs a mesh-backed
``clt.encoder.Shard``, through which the model and its nonlinearity exchange what they need:

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

Every rank builds the whole model from the same seed before cutting it, so a sharded run starts
from exactly the single process's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import kernels

from ..encoder import Shard, SparseEncoder
from .mesh import Mesh

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



class MeshShard(Shard):
    """The ``clt.encoder.Shard`` of one rank of a mesh: features ``[offset, offset + F / P)``."""

    def __init__(self, mesh: Mesh, total: int, offset: int) -> None:
        super().__init__(total, offset)
        self.mesh = mesh
        self.tp_size, self.dp_size = mesh.tp_size, mesh.dp_size
        self.world_size, self.dp_rank = mesh.world_size, mesh.dp_rank

    def sum_features(self, t: torch.Tensor) -> torch.Tensor:
        return self.mesh.tp_sum(t)

    def sum_replicas(self, t: torch.Tensor) -> torch.Tensor:
        return self.mesh.dp_sum(t)

    def world_max(self, t: torch.Tensor) -> torch.Tensor:
        return self.mesh.world_max(t)

    def keep_top(self, score: torch.Tensor, key: torch.Tensor, m, group: str) -> torch.Tensor:
        return _keep_mine(self.mesh, score, key, m, group)


@torch.no_grad()
def parallelize(model: SparseEncoder, mesh: Mesh) -> SparseEncoder:
    """Shard ``model`` (built whole, the same on every rank) over ``mesh``'s tensor-parallel
    group in place and return it: this rank keeps its slice of every per-feature parameter and
    buffer. Without tensor parallelism only the shard object changes (BatchTopK and AuxK then
    see every data-parallel replica's batch). One process: the model as it is."""
    if mesh.world_size == 1:
        return model
    F, P, r = model.n_features, mesh.tp_size, mesh.tp_rank
    if not model.shardable:
        raise ValueError(f"{type(model).__name__} trains in one process "
                         f"(parallel.tensor and parallel.data must be 1)")
    if F % P:
        raise ValueError(f"n_features={F} must be divisible by the {P} TP ranks")
    local = F // P
    if P > 1:
        full_layout = model.layout
        for name, p in list(model.named_parameters(recurse=False)):
            part = shard_tensor(name, p.detach(), r, P, full_layout)
            setattr(model, name, nn.Parameter(part, requires_grad=p.requires_grad))
        for name, b in list(model.named_buffers(recurse=False)):
            model._buffers[name] = shard_tensor(name, b, r, P, full_layout)
        model.n_features = local
        model.layout = kernels.DecoderLayout(model.n_layers, local, full_layout.reach)
    model.shard = MeshShard(mesh, F, r * local)
    return model


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


def shard_parameters(model: SparseEncoder) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def local_states(state: dict, model: SparseEncoder, mesh: Mesh,
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


