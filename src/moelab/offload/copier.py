"""Experts copied into a pool of slots on an accelerator, overlapped with its compute.

    copier = SlotCopier(store, pool)      # pool: `ExpertStore.empty(slots, "cuda")`
    copier.load(layer, expert, slot)      # read from the files into a pinned buffer; the copy is queued
    copier.ready(slots)                   # the compute stream waits for these slots' copies
    ...kernels on the compute stream read the slots...
    copier.used(slots)                    # later copies into these slots wait for those kernels

A read fills one of a few page-locked host buffers laid out as one slot (straight from the files
where they allow, `ExpertStore.load`); a copy stream then moves it into the slot without holding
up the host or the compute stream. Events order the three:

- a buffer is refilled only after its last copy out has run (the host waits for that copy);
- a copy into a slot starts after the compute stream's last use of the slot's previous expert;
- the compute stream reads a slot only after the slot's copy.

Only the first blocks the host, so a read ahead on the cache's background thread copies while the
GPU runs the decoding's kernels, and a read on demand costs one copy's latency.

With `host=True` every routed expert is read once, at the start, into page-locked host memory
(which must hold them all), and each load is a copy from there alone: no file read, no host
buffer, nothing on the host to wait for (the layout of Mixtral-offloading: experts in host RAM,
a cache of them on the GPU).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from moelab.nn.experts import Experts
from moelab.offload.store import ExpertStore


class SlotCopier:
    """Loads `store`'s experts into `pool`'s slots (on an accelerator) through `buffers` pinned host
    buffers and a copy stream (see the module docstring); host: from a pinned host copy of every
    routed expert instead, read at once (`progress`: a callable wrapping the iterable of experts,
    e.g. tqdm). streams: the device module whose `Stream`, `Event`, `stream` and `current_stream`
    order the copies (default: the pool's device module, `torch.cuda` for a CUDA pool)."""

    def __init__(
        self, store: ExpertStore, pool: Experts, *, buffers: int = 2, host: bool = False, progress=None, streams=None
    ):
        self.device = pool.down_proj.device
        self.streams = streams if streams is not None else torch.get_device_module(self.device)
        self.store = store
        self.pool = pool
        self._stream = self.streams.Stream(self.device)
        pin = self.device.type != "cpu"
        self._position = {layer: p for p, layer in enumerate(store.moe_layers)}
        self._host: Experts | None = None  # with host=True: every routed expert, MoE layer position * E + expert
        if host:
            keys = [(layer, e) for layer in store.moe_layers for e in range(store.num_experts)]
            self._host = store.empty(len(keys), "cpu", pin_memory=pin)
            for index, key in enumerate(keys if progress is None else progress(keys)):
                store.load(*key, self._host, index)
            buffers = 0
        self._buffers = [store.empty(1, "cpu", pin_memory=pin) for _ in range(buffers)]
        self._emptied: list = [None] * buffers  # per buffer: the event after its last copy out
        self._turn = 0  # the buffer the next read fills
        for p in pool.parameters():  # freed (the cache dropped) only once the copies queued into it have run
            if p.device.type == "cuda":
                p.record_stream(self._stream)
        slots = pool.down_proj.shape[0]
        self._copied: list = [None] * slots  # per slot: the event after its last copy in
        self._used: list = [None] * slots  # per slot: the compute stream's event after its last use
        self._lock = threading.Lock()  # one read at a time (a read ahead and a read on demand share the buffers)

    @property
    def queues_only(self) -> bool:
        """Whether `load` only queues a device copy (from the host copy of every expert): nothing to
        read or wait for on the host, so a caller need not put it on a background thread."""
        return self._host is not None

    def load(self, layer: int, expert: int, slot: int) -> None:
        """Queue the copy of expert `expert` of MoE layer `layer` into `slot`: from the host copy of
        every expert, else read into a host buffer first."""
        with self._lock:
            turn = None
            if self._host is not None:
                source, index = self._host, self._position[layer] * self.store.num_experts + expert
            else:
                turn, self._turn = self._turn, (self._turn + 1) % len(self._buffers)
                if self._emptied[turn] is not None:
                    self._emptied[turn].synchronize()  # the buffer's previous expert has left it
                source, index = self._buffers[turn], 0
                self.store.load(layer, expert, source, 0)
            copied = self.streams.Event(blocking=True)  # a host waiting for it sleeps instead of spinning
            with self.streams.stream(self._stream):
                if self._used[slot] is not None:
                    self._stream.wait_event(self._used[slot])  # the slot's previous expert is no longer read
                try:
                    self._copy_in(slot, source, index)
                finally:  # after whatever copies were queued, even if one failed
                    copied.record(self._stream)
            self._copied[slot] = copied
            if turn is not None:
                self._emptied[turn] = copied

    def _copy_in(self, slot: int, source: Experts, index: int) -> None:
        """Queue the copy of `source`'s entry `index` into `slot` on the current stream."""
        for target, part in zip(self.pool.parameters(), source.parameters()):
            target[slot].copy_(part[index], non_blocking=True)

    def ready(self, slots: Iterable[int]) -> list[int]:
        """Make the caller's current stream wait until these slots' copies have run; returns the
        slots whose copy had not run yet (a query, not a wait)."""
        stream = self.streams.current_stream(self.device)
        running = []
        for slot in slots:
            copied = self._copied[slot]
            if copied is None:
                continue
            if copied.query():  # ran already: nothing to wait for, now or at the slot's next use
                self._copied[slot] = None
            else:
                running.append(slot)
                stream.wait_event(copied)
        return running

    def close(self) -> None:
        """Wait until every queued copy has run."""
        self._stream.synchronize()

    def used(self, slots: Iterable[int]) -> None:
        """Mark these slots as read by the work queued so far on the caller's current stream: a
        later copy into one of them waits for it."""
        slots = list(slots)
        if not slots:
            return
        event = self.streams.Event()
        event.record(self.streams.current_stream(self.device))
        for slot in slots:
            self._used[slot] = event
