"""Routed experts read from a checkpoint directory one at a time, for offloaded inference.

    store = ExpertStore("path/to/checkpoint", dtype=torch.float32)
    pool = store.empty(slots=12)               # stacked experts (SwiGLU or plain) with 12 uninitialised slots
    store.load(layer=3, expert=5, pool=pool, slot=0)
    one = store.read(layer=3, expert=5)        # or: an ExpertsView holding that one expert

Any checkpoint the view opens (moelab's own, every transformers family) is read through the
view's one layout (`ModelView.experts`), so a read fetches one expert's bytes from its
safetensors shard and nothing else. Every tensor read is checked finite as it arrives (an expert
once per load into a slot, never per use of a resident one): a corrupt checkpoint's Inf or NaN is
a `CheckpointError` naming its tensor, not garbage tokens. Where the files hold an expert as the
pool lays it out (the same dtype, gate/up/down, gate_up/down or (plain experts) up/down matrices
in the same orientation, no biases: moelab's own checkpoints, Mixtral, Qwen-MoE, OLMoE, DeepSeek,
Nemotron-H), `load` reads it straight into the slot's memory, one positioned read per matrix;
otherwise it reads the view and copies (converting).
Reads are serialised by a lock (a background prefetch and a synchronous miss share one file
reader); a shard that changes on disk while in use is refused.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from moelab.hf.adapters import resolve
from moelab.hf.checkpoint import DTYPES, CheckpointError, byte_view, check_finite
from moelab.hf.layouts import config_value
from moelab.hf.native import copy_expert, empty_experts, experts_from_view, gated_activation
from moelab.hf.view import ExpertsView, ModelView
from moelab.nn.experts import Experts, MLPExperts, SwiGLUExperts


class ExpertStore:
    """The routed experts of the checkpoint at `path`, read one at a time and cast to `dtype`.

    view: the checkpoint's `ModelView` (checkpoint, family: its `Checkpoint` and adapter); moe_layers:
    the indices of the decoder layers with routed experts; num_experts: E (every MoE layer has the
    same); expert_bytes: one expert's weights in `dtype`. read_bandwidth: emulate storage of this
    many bytes/s (each read lasts at least expert_bytes / read_bandwidth, holding the reader, as
    one device would; benchmarks), None: as fast as the files can be read.
    page_cache: False drops each expert's bytes from the OS page cache once read into a slot
    (`posix_fadvise`, Linux), so that every read goes to the storage device, as for a checkpoint
    far larger than memory (benchmarks; reads that convert, which go through the view, are cached).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        read_bandwidth: float | None = None,
        page_cache: bool = True,
    ):
        if read_bandwidth is not None and not read_bandwidth > 0:
            raise ValueError(f"read_bandwidth must be > 0 bytes/s (or None), got {read_bandwidth}")
        if not page_cache and not hasattr(os, "posix_fadvise"):
            raise ValueError("page_cache=False needs posix_fadvise (Linux) to drop what it reads from the page cache")
        self.read_bandwidth = read_bandwidth
        self.page_cache = page_cache
        config, ckpt, family = resolve(path)
        self.path = ckpt.directory
        self.dtype = dtype
        self.family = family
        self.checkpoint = ckpt
        ckpt.finite_only = True  # what the view reads (converted experts, the dense parts) is checked as read
        if not page_cache:
            ckpt.drop_cached()  # the first reads too
        self.view = ModelView(ckpt, config, family, family.layer_count(config))
        try:
            family.router_settings(config)  # an architecture the view does not cover, named before its tensors
        except CheckpointError:
            ckpt.close()
            raise
        self.moe_layers = family.moe_layers(ckpt, config)
        if not self.moe_layers:
            ckpt.close()
            raise CheckpointError(f"{self.path} has no layers with routed experts; there is nothing to offload")
        self.num_experts = config_value(config, *family.num_experts)
        self._lock = threading.Lock()
        self._planned: dict[tuple, list[_Read] | None] = {}  # `_reads`, per expert and pool shape
        self._targets: weakref.WeakKeyDictionary[Experts, list[dict[str, memoryview]]] = weakref.WeakKeyDictionary()
        self.expert_bytes = 0  # set below, after reading the template unthrottled
        first = self._view_of(self.moe_layers[0], 0)
        one = experts_from_view(first)
        self.expert_bytes = sum(p.numel() for p in one.parameters()) * torch.empty((), dtype=dtype).element_size()
        # the first expert's shapes and settings, its weights dropped (no expert held outside a memory budget's pool)
        weights = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
        self._template = replace(
            first, **{name: getattr(first, name).to("meta") for name in weights if getattr(first, name) is not None}
        )
        self.expert_width = self._template.hidden_dim  # I, as the files hold it

    def read(self, layer: int, expert: int) -> ExpertsView:
        """Expert `expert` of MoE layer `layer`, read from disk (a view holding that one expert)."""
        view = self._view_of(layer, expert)
        if view.up.shape[1:] != self._template.up.shape[1:]:
            raise CheckpointError(
                f"{self.path}: layer {layer}'s experts have up {list(view.up.shape[1:])} but layer "
                f"{self.moe_layers[0]}'s have {list(self._template.up.shape[1:])}; offloading needs one "
                "expert shape across layers"
            )
        return view

    def load(self, layer: int, expert: int, pool: Experts, slot: int) -> None:
        """Put expert `expert` of MoE layer `layer` into entry `slot` of `pool` (from `empty`): read
        straight into it where the files allow (see the module docstring), else read and copy.
        Weights holding Inf or NaN are refused (`check_finite`), the slot left holding them."""
        reads = self._reads(layer, expert, pool)
        if reads is None:
            copy_expert(self.read(layer, expert), pool, slot)
            return
        targets = self._targets.get(pool)
        with self._reading():
            for read in reads:
                target = byte_view(_slot_part(pool, slot, read.part)) if targets is None else targets[slot][read.part]
                uncached = not self.page_cache
                self.checkpoint.read_bytes(read.path, read.offset, target, read.name, uncached=uncached)
        for read in reads:  # after the reads: another thread's read need not wait for this check
            rows = None if read.row is None else range(read.row, read.row + 1)
            check_finite(self.path, read.name, _slot_part(pool, slot, read.part), rows)

    def _reads(self, layer: int, expert: int, pool: Experts) -> list[_Read] | None:
        """Where the expert lies, if it can be read straight into `pool` (else None); worked out
        once per expert and pool shape."""
        key = (layer, expert, type(pool), pool.dim, pool.hidden_dim,
               pool.down_bias is None, pool.dtype, pool.down_proj.device)
        if key not in self._planned:
            with self._lock:  # the checkpoint's shard handle is shared with the other thread's reads
                self._planned[key] = self._plan(layer, expert, pool)
        return self._planned[key]

    def _plan(self, layer: int, expert: int, pool: Experts) -> list[_Read] | None:
        self._check_index(layer, expert)
        layout = self.family.layout_of(self.checkpoint, layer).experts
        direct = pool.down_bias is None and pool.dtype == self.dtype and pool.down_proj.device.type == "cpu"
        if not hasattr(layout, "parts") or not direct:
            return None
        parts = layout.parts(self.checkpoint, self.family.prefix(layer), expert)
        if parts is None:
            return None
        I, D = pool.hidden_dim, pool.dim
        shapes = {"gate": (I, D), "up": (I, D), "gate_up": (2 * I, D), "down": (D, I)}
        reads = []
        for part in parts:
            raw = self.checkpoint.raw(part.name)
            stored = raw.shape if part.row is None else raw.shape[1:]
            if DTYPES.get(raw.dtype) != self.dtype or tuple(stored) != shapes[part.part]:
                return None  # converted, or refused with the shape error, by `read`
            if part.row is not None and not 0 <= part.row < raw.shape[0]:
                raise CheckpointError(
                    f"{self.path}: tensor {part.name!r} holds {raw.shape[0]} experts, but expert {part.row} was asked "
                    f"for (the config says {self.num_experts}); the checkpoint does not match its config"
                )
            where = self.checkpoint.locate(part.name, None if part.row is None else range(part.row, part.row + 1))
            reads.append(_Read(part.name, part.row, where.path, where.offset, part.part))
        return reads

    def empty(self, slots: int, device: torch.device | str = "cpu", *, pin_memory: bool = False) -> Experts:
        """`slots` uninitialised experts shaped like this checkpoint's, in the store's dtype (on a CPU
        with each slot's byte views made once, for `load` to read into). pin_memory: in page-locked
        host memory, which an accelerator copies from without blocking (a CPU pool only)."""
        if pin_memory:  # allocated pinned (no unpinned copy first: a host copy of every expert may be large)
            pool = empty_experts(self._template, slots, dtype=self.dtype, device="meta")
            for name, p in list(pool.named_parameters()):
                setattr(pool, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, pin_memory=True), requires_grad=False))
        else:
            pool = empty_experts(self._template, slots, dtype=self.dtype, device=device)
        if pool.down_proj.device.type == "cpu" and pool.down_bias is None:
            parts = ("gate", "up", "gate_up", "down") if self._template.gated else ("up", "down")
            self._targets[pool] = [
                {part: byte_view(_slot_part(pool, slot, part)) for part in parts} for slot in range(slots)
            ]
        return pool

    def computing(self, pool: Experts, layer: int) -> Experts:
        """`pool` (from `empty`, built like the first MoE layer's experts) computing as layer `layer`'s
        experts do: the pool itself, or where that layer's gated activation differs (Step 3.7's bounded
        layers cap theirs, the others do not) a shallow copy holding the same weights with its own."""
        if self.family.layer_activations is None or not isinstance(pool, SwiGLUExperts):
            return pool
        self._check_index(layer, 0)
        settings = self.family.activations(self.view.config, layer)[0]
        clamped = gated_activation(
            settings["activation"], settings.get("swiglu_alpha"), settings.get("swiglu_limit"),
            gate_softcap=settings.get("gate_softcap"), up_softcap=settings.get("up_softcap"),
        )  # fmt: skip
        if clamped == pool.clamped:
            return pool
        own = copy.copy(pool)  # its parameters are the pool's (one shared dict), so the slots' loads reach it
        own.clamped = clamped
        return own

    def _view_of(self, layer: int, expert: int) -> ExpertsView:
        self._check_index(layer, expert)
        with self._reading():
            return self.view.experts(layer, range(expert, expert + 1))

    def _check_index(self, layer: int, expert: int) -> None:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} has no routed experts; the MoE layers are {self.moe_layers}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: the layers have {self.num_experts} experts")

    @contextmanager
    def _reading(self):
        """One read at a time, lasting at least an expert's bytes over `read_bandwidth` if set."""
        with self._lock:
            start = time.perf_counter()
            yield
            if self.read_bandwidth is not None:
                time.sleep(max(0.0, self.expert_bytes / self.read_bandwidth - (time.perf_counter() - start)))

    def close(self) -> None:
        with self._lock:  # not during a read on another thread
            self.view.close()


@dataclass(frozen=True)
class _Read:
    """One positioned read of an expert's matrix: tensor `name`'s bytes for it (entry `row` of its
    first dim, None: all of it) at `offset` of shard `path`, into `part` ("gate", "up", "gate_up",
    "down") of a pool slot."""

    name: str
    row: int | None
    path: Path
    offset: int
    part: str


def _slot_part(pool: Experts, slot: int, part: str) -> torch.Tensor:
    """The view of `pool`'s entry `slot` that holds `part` ("gate", "up", "gate_up", "down"; plain
    experts: "up", "down")."""
    I = pool.hidden_dim
    if part == "down":
        return pool.down_proj[slot]
    if isinstance(pool, MLPExperts):
        return pool.up_proj[slot]
    return pool.gate_up_proj[slot, {"gate": slice(0, I), "up": slice(I, 2 * I), "gate_up": slice(None)}[part]]
