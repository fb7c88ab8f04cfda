"""Recycled gradient buffers: the last step's parameter gradients become this step's outputs.

A CLT's decoder gradient is ``W_dec``-sized (~1 GB at L=12, d=768, F=4096 in fp32) and autograd
allocates it anew every step. On the host a fresh block costs the kernel's first-touch page
faults: glibc hands blocks over 32 MiB back to the kernel on ``free``, and touching them again
costs ~0.2 s per GiB on the 2-core VMs here (2.9 GiB, ~0.6 s, of a 2 s TopK step at that shape:
more than the optimizer step). So the trainer donates the previous step's gradients here instead
of dropping them (``clt.trainer.recycle_grads``), and the ops that write a parameter-sized
gradient (decoder, TopK encoder) take their output buffer from here. Autograd then installs the
op's output as ``.grad`` without a copy, so the same memory serves step after step. CUDA's
caching allocator already reuses memory: the trainer donates on the host only.

Contract: a donor never reads a donated tensor again (its contents become garbage, and the ops
overwrite every element).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_POOL: dict[tuple, list[torch.Tensor]] = {}
MAX_PER_KEY = 2  # a step needs one gradient per parameter; a second covers two same-shape ones


def _key(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> tuple:
    return tuple(shape), dtype, torch.device(device)


def donate(t: torch.Tensor) -> None:
    """Offer ``t``'s memory to the next op that needs an output of its shape, dtype and device.
    Only plain contiguous tensors that are not views are kept (a view would hand out memory
    that other tensors still read). Never touches ``t.untyped_storage()``: its Python object
    would stay attached to the storage as a second user, and autograd only accumulates a
    gradient in place into a tensor whose storage has one user (otherwise it adds the next
    one out of place into a fresh, page-faulting tensor)."""
    if not t.is_contiguous() or t.requires_grad or t._base is not None \
            or t.storage_offset() != 0:
        return
    kept = _POOL.setdefault(_key(t.shape, t.dtype, t.device), [])
    if len(kept) < MAX_PER_KEY and all(k.data_ptr() != t.data_ptr() for k in kept):
        kept.append(t)


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor: a donated one when the pool has that shape, else a new one."""
    kept = _POOL.get(_key(shape, dtype, device))
    return kept.pop() if kept else torch.empty(tuple(shape), dtype=dtype, device=device)


def clear() -> None:
    """Drop every donated buffer (frees their memory)."""
    _POOL.clear()
