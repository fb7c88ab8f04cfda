"""The ``(data, tensor)`` process mesh over torch.distributed and its collectives; imports no
model code (DESIGN.md, "Distributed").

Ranks form a 2-D mesh: global rank ``g = dp_rank * tensor + tp_rank``, so the ranks of one
tensor-parallel (TP) group are neighbours (one node, NVLink). ``Mesh.single()`` is the single
process: every collective is the identity.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


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


