"""Gradient buffers of stacked expert weights, kept on a CPU from one backward to the next.

glibc serves a block larger than its mmap threshold (at most 32 MB) from fresh pages and hands it
back to the OS when it is freed, so such a block is page-faulted in again at every step: the
kernel zeroes it a page at a time. A stacked expert weight is E/k times the size of a dense layer
of the same active compute, so its gradient crosses that threshold long before the dense layer's:
an e64k8 layer of D = 512 (64 experts of width 352) writes 138 MB of expert gradients a step,
about 20 ms of page faults in a 190 ms training step at 1,024 tokens on 2 cores, where the dense
layer's 17 MB come from memory glibc keeps.

`empty_gradient_like(weight)` hands out a buffer of the weight's shape from the weight's own pool
of storages, where one is free, else a new one that joins the pool. A storage is free when the
pool's reference is its only one: no tensor is on its memory any more (the one handed out last
time, as `param.grad` or anywhere else, and every view or `detach()` of it has been dropped:
`optimizer.zero_grad()` sets gradients to None by default), and no one else holds the storage
object (`t.untyped_storage()`). A gradient a caller still holds (accumulation with
`zero_grad(set_to_none=False)`, gradients kept for later) is not handed out again, nor is one
in shared memory (torch.multiprocessing sends a CPU tensor that way: the receiving process maps
the same memory, which no count here sees): it leaves the pool. autograd keeps the returned
buffer as `param.grad` without copying it (it is the only tensor on it).

A weight's pool lives as long as the weight (it is keyed by the weight's identity, weakly): once
the model is gone, so is its gradient memory. While it lives, its pool keeps as much memory as the
most gradients of that weight alive at once (one, two when gradients accumulate), which a training
step holds anyway, also between steps and after training; `release()` (which
`moelab.memory.release_freed_memory` calls) empties every pool. Only contiguous CPU tensors of at
least `MIN_BYTES` are pooled; other devices have allocators that keep freed memory (CUDA's caching
allocator).
"""

from __future__ import annotations

import sys
import threading

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

MIN_BYTES = 8 * 2**20  # below, glibc's heap serves and keeps the block anyway



class _Slot:
    """One pooled storage."""

    __slots__ = ("storage",)

    def __init__(self, storage: object):
        self.storage = storage

    def is_free(self) -> bool:
        """No tensor on the storage's memory (in C++, the storage object's own reference is its one
        owner) and no one but this slot holding the storage object (a user's `t.untyped_storage()`
        is this same object: its Python count is then above that of an object a slot alone holds).
        In torch 2.13 a tensor on the memory also raises the Python count; the C++ count is asked
        as well, which says so whatever torch does with the Python object."""
        return (
            torch._C._storage_Use_Count(self.storage._cdata) == 1
            and sys.getrefcount(self.storage) == sys.getrefcount(_UNSHARED.storage)
        )


_UNSHARED = _Slot(object())  # the Python reference count of an object a slot alone holds
_pools: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> its slots
_lock = threading.Lock()


def empty_gradient_like(weight: Tensor) -> Tensor:
    """`torch.empty_like(weight)`, on a recycled storage where `weight` is a contiguous CPU tensor
    of at least `MIN_BYTES`, a plain tensor or Parameter (not a subclass such as DTensor or a fake
    tensor). Traced by torch.compile, a plain `torch.empty_like`: the pool's lock and reference
    counts would break the graph, and the autograd.Function around the backward would no longer
    compile whole."""
    pooled = type(weight) in (Tensor, torch.nn.Parameter) and weight.device.type == "cpu" and weight.is_contiguous()
    if not pooled or weight.nbytes < MIN_BYTES or torch.compiler.is_compiling():
        return torch.empty_like(weight)
    with _lock:
        pool = _pools.setdefault(weight, [])
        for slot in list(pool):
            if not slot.is_free():
                continue
            # in shared memory another process may map it; another size: the weight's data was replaced
            if slot.storage.is_shared() or slot.storage.nbytes() != weight.nbytes:
                pool.remove(slot)
                continue
            return torch.empty(0, dtype=weight.dtype).set_(slot.storage, 0, weight.shape)
        buffer = torch.empty(weight.shape, dtype=weight.dtype)
        pool.append(_Slot(buffer.untyped_storage()))
        return buffer


def release() -> None:
    """Forget every pooled storage: memory no tensor uses goes back to the allocator."""
    with _lock:
        _pools.clear()


def pooled_bytes() -> int:
    """Bytes of the storages the pool holds (free or handed out)."""
    with _lock:
        return sum(slot.storage.nbytes() for pool in _pools.values() for slot in pool)
