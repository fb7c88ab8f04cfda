"""Data parallelism: gradient averaging over replicas, and one batch for a tensor-parallel group."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .mesh import Mesh


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
