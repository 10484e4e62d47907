"""A pool of expert slots shared by every MoE layer, filled from an `ExpertStore`.

    cache = ExpertCache(store, slots=12, eviction="reuse", prior=prior)
    slots = cache.fetch(layer, [3, 5], tokens=1)    # resident now (read from disk on a miss), pinned
    cache.prefetch(next_layer, scores, p, limit=4)  # background reads of the likely next experts
    ...compute on cache.pool with `slots`...
    cache.release()                                 # unpin

`pool` is one stacked-experts module with `slots` entries (`SwiGLUExperts` or `MLPExperts`), so a layer
computes on its experts' slots with the same kernels as a model held in memory. The pool is
global: a layer may hold more or fewer slots than another, as the eviction policy decides.

Eviction (which resident expert gives up its slot):
- "lru": the least recently used (Mixtral-offloading's cache).
- "reuse": the expert expected to be needed furthest in the future. Decoding visits the MoE layers
  in a fixed cycle of L, so an expert of a layer d visits ahead that a token needs with
  probability p is next needed after about d + L (1 - p) / p layer visits. p comes from the last
  prediction for that layer (`prefetch`), else from habit (`habit`: a moving average of the
  expert's recent use, for the reuse between consecutive tokens, averaged with its calibration
  frequency); an expert of the layer just run is d = L ahead. LRU evicts by the past alone; this
  uses the known visiting order (SpecMD's point: expert access is predictable, so a policy built
  for temporal locality leaves hits on the table).

A prefetch may take any other layer's slot (that layer is read ahead for in turn before it runs)
but not a likelier expert of its own layer. Loads for `prefetch` run on one background thread
while the current layer computes; a `fetch` of an expert still loading waits for it (a "late"
hit), a read on demand (a miss) goes before queued read-aheads, and a queued read-ahead whose
slot is given to another expert before it started is dropped. One already running is finished
before a read on demand writes its slot; a read-ahead into that slot queues behind it (the one
reader thread keeps their order). Which slot goes never depends on how far a background read has
got, so the hits and misses of a run are reproducible. Statistics are kept per number of tokens
in the layer call (decode steps of batch B call every layer with B tokens; a prefill with more).

A pool on an accelerator is filled through a `SlotCopier` (pinned host buffers, a copy stream):
`fetch` makes the current stream wait for its slots' copies and `release` marks them used by the
work queued so far, which later copies into them wait for. From a host copy of every expert
(`host_memory`) a load only queues a device copy, so read-aheads are queued on the calling thread
(no background thread, no late hits on the host).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from moelab.offload.copier import SlotCopier
from moelab.offload.predict import RoutingPrior
from moelab.offload.store import ExpertStore

EVICTIONS = ("lru", "reuse")
RECENCY_DECAY = 0.5  # per visit of a layer: consecutive tokens often reuse an expert


@dataclass
class CacheStats:
    """requests: experts asked for by `fetch`; hits: resident and loaded; late: resident but still
    loading from a prefetch (waited for); misses: read from disk on demand; wait_s: time `fetch`
    spent blocked on reads. On an accelerator, late_copies: hits (late ones included) whose copy
    into the pool had not run yet when `fetch` returned (waited for by the device, not the host).
    needed, foreseen: `PrefetchStats`'s, at these calls (`recall`: e.g. the decode steps' alone)."""

    requests: int = 0
    hits: int = 0
    late: int = 0
    misses: int = 0
    wait_s: float = 0.0
    late_copies: int = 0
    needed: int = 0
    foreseen: int = 0

    @property
    def hit_rate(self) -> float:
        """Requests served without a read on demand (late hits included)."""
        return (self.hits + self.late) / self.requests if self.requests else float("nan")

    @property
    def recall(self) -> float:
        """`PrefetchStats.recall` at these calls."""
        return self.foreseen / self.needed if self.needed else float("nan")

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"hit_rate": self.hit_rate, "recall": self.recall}


@dataclass
class PrefetchStats:
    """issued: experts read ahead by `prefetch`; used: those the layer then asked for (accuracy:
    used / issued, a precision; a read-ahead dropped before it started, its slot given to another
    expert, read nothing and counts in neither, even where a later chunk of the call asks for
    it). needed: experts asked for at visits a prediction was made for; foreseen: those of them
    the prediction named, resident or read ahead (recall: foreseen / needed, Mixtral-offloading's
    "speculative loading recall")."""

    issued: int = 0
    used: int = 0
    needed: int = 0
    foreseen: int = 0

    @property
    def accuracy(self) -> float:
        return self.used / self.issued if self.issued else float("nan")

    @property
    def recall(self) -> float:
        return self.foreseen / self.needed if self.needed else float("nan")

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"accuracy": self.accuracy, "recall": self.recall}


class ExpertCache:
    """`slots` resident experts of `store`'s checkpoint (see the module docstring).

    eviction: "lru" or "reuse"; prior: calibration statistics for "reuse" (optional; its
    frequencies are read when the cache is built);
    device: where the pool lives (on an accelerator, experts reach it through pinned host buffers
    and a copy stream, `SlotCopier`; host_memory: from a pinned host copy of every expert, read at
    the start with `progress`; streams: the device module ordering those copies, default the
    device's own). stats[tokens]: `CacheStats` of the layer calls with that many tokens;
    prefetch_stats: `PrefetchStats` over all calls.
    """

    def __init__(
        self,
        store: ExpertStore,
        slots: int,
        *,
        eviction: str = "reuse",
        prior: RoutingPrior | None = None,
        device: torch.device | str = "cpu",
        host_memory: bool = False,
        progress=None,
        streams=None,
    ):
        if eviction not in EVICTIONS:
            raise ValueError(f"unknown eviction policy {eviction!r}; choose one of {EVICTIONS}")
        total = len(store.moe_layers) * store.num_experts
        if not 1 <= slots <= total:
            raise ValueError(f"slots must lie in 1..{total} (every routed expert of the model), got {slots}")
        on_host = torch.device(device).type == "cpu" and streams is None
        if host_memory and on_host:
            raise ValueError(
                "host_memory keeps every expert in host memory for a cache on a GPU; a CPU's cache is in host "
                "memory already (hold every expert with slots = all of them, resident=1.0)"
            )
        self.store = store
        self.slots = slots
        self.eviction = eviction
        self.prior = prior
        self.pool = store.empty(slots, device)
        self._copier = None
        if not on_host:
            self._copier = SlotCopier(store, self.pool, host=host_memory, progress=progress, streams=streams)
        self._position = {layer: p for p, layer in enumerate(store.moe_layers)}
        L, E = len(self._position), store.num_experts
        # [L, E] each expert's calibration frequency (1/E without a prior)
        self._frequency = np.full((L, E), 1.0 / E, dtype=np.float32)
        if prior is not None:
            self._frequency = torch.stack([prior.frequency[layer].float() for layer in store.moe_layers]).numpy()
        # [L, L] visits from the current layer (row) to each layer's next visit (column): 1..L.
        ahead = (np.arange(L)[None, :] - np.arange(L)[:, None]) % L
        self._ahead = np.where(ahead == 0, L, ahead)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="moelab-prefetch")
        self.closed = False
        self._no_demand = threading.Event()  # cleared while `_load` reads on demand: read-aheads wait
        self._no_demand.set()
        self._clear()

    def _clear(self) -> None:
        """Forget everything the pool held and every count: the state of a new cache."""
        L, E = len(self._position), self.store.num_experts
        self._slot_of: dict[tuple[int, int], int] = {}
        self._owner: list[tuple[int, int] | None] = [None] * self.slots
        # The owners again, for scoring every slot at once: MoE layer position * E + expert (an index
        # into `_wait`'s entries).
        self._owner_entry = np.zeros(self.slots, dtype=np.int64)
        self._used_at = np.zeros(self.slots, dtype=np.int64)  # the clock at each slot's last use (LRU)
        self._clock = 0
        self._loading: dict[int, Future] = {}  # slot -> the read-ahead into it of its current expert
        self._overtaken: dict[int, list[Future]] = {}  # slot -> running read-aheads of experts it no longer holds
        self._pinned: set[int] = set()
        # [L, E] visits between a layer's visit and an expert's use at it, L (1 - p) / p (see the module
        # docstring), from each expert's chance p of being needed at its layer's next visit.
        self._wait = np.zeros((L, E))
        self._wait_known = [False] * L  # per layer position: the row holds the last prediction (or habit)
        self._prefetched: dict[int, set[int]] = {}  # layer -> its read-aheads since its last visit
        # {layer visited last: its read-aheads its calls have not asked for yet} (a call fetched in
        # chunks asks chunk by chunk; a read-ahead dropped before its chunk read nothing: not used)
        self._unused: dict[int, set[int]] = {}
        self._foreseen: dict[int, set[int]] = {}  # layer -> the experts its last prediction named
        self._recency = np.zeros((L, E))  # [L, E] moving average of "chosen at a visit" of each layer's experts
        self._visited = np.zeros(L, dtype=bool)  # per layer position: fetched at least once
        self._count: dict[int, int] = {}  # layer -> experts of it in the pool
        self._current = self.store.moe_layers[0]
        self.stats: dict[int, CacheStats] = {}
        self.prefetch_stats = PrefetchStats()

    # ------------------------------------------------------------------ public

    def fill(self, experts: list[tuple[int, int]]) -> None:
        """Load these (layer, expert) pairs now, in order, while free slots remain (a warm start)."""
        for key in experts:
            if key in self._slot_of or None not in self._owner:
                continue
            slot = self._owner.index(None)
            self._assign(slot, key)
            self._load(slot, key)  # frees the slot again if it fails

    def restart(self, experts: list[tuple[int, int]]) -> None:
        """Start again from an empty pool and zero counts, then `fill` it with `experts`: the
        cache's state when new with the same warm start (e.g. after a compiled step's warm-up;
        the affinity predictor's memory of the last choices, `OffloadedExperts.chosen`, is the
        experts')."""
        overtaken = [read for reads in self._overtaken.values() for read in reads]
        wait([*self._loading.values(), *overtaken])  # background reads finish (a failed read-ahead is dropped)
        self._clear()
        self.fill(experts)

    def fetch(self, layer: int, experts: list[int], tokens: int, *, visit: list[int] | None = None) -> list[int]:
        """Make `experts` of `layer` resident and pin them until `release`; returns their slots.
        At most `slots` experts at once. `tokens`: the layer call's token count (for `stats`).
        visit: where `experts` is one chunk of a layer call that asks for more than the pool holds,
        every expert the call asks for at its first chunk and [] at the later ones: the call counts
        as one visit of the layer (habit, prefetch accuracy); default `experts`."""
        self._check_open()
        if len(experts) > self.slots - len(self._pinned):
            raise ValueError(
                f"{len(experts)} experts asked for at once, but only {self.slots - len(self._pinned)} of "
                f"{self.slots} slots are free; ask for fewer at a time"
            )
        self._current = layer
        stats = self.stats.setdefault(tokens, CacheStats())
        if visit is None or len(visit):
            self._visit(layer, experts if visit is None else visit, stats)
        unused = self._unused.get(layer)
        if unused:
            used = unused.intersection(experts)
            unused -= used
            self.prefetch_stats.used += len(used)
        stats.requests += len(experts)
        start = time.perf_counter()
        found = {e: self._slot_of[layer, e] for e in experts if (layer, e) in self._slot_of}
        pinned_before = set(self._pinned)
        self._pinned.update(found.values())  # first, so that a miss below cannot evict them
        try:
            late = self._finish_reads(found)
            resident = set(found.values()) if self._copier is not None else None  # the hits, for late_copies
            stats.late += late
            stats.hits += len(found) - late
            for expert in experts:
                if expert not in found:
                    stats.misses += 1
                    slot = found[expert] = self._victim()
                    self._assign(slot, (layer, expert))
                    self._pinned.add(slot)
                    self._load(slot, (layer, expert))
        except BaseException:  # an interrupted or failed read: nothing stays pinned by this call
            self._pinned = pinned_before
            raise
        for slot in found.values():
            self._touch(slot)
        if self._copier is not None:
            stats.late_copies += len(resident.intersection(self._copier.ready(found.values())))
        stats.wait_s += time.perf_counter() - start
        return [found[e] for e in experts]

    def _visit(self, layer: int, experts: list[int], stats: CacheStats) -> None:
        """Count a call of `layer` asking for `experts`: their recent use (habit), the prediction's
        recall (over all calls and in `stats`, the call's size's); the layer's read-aheads become
        the ones its fetches may use (`_unused`)."""
        position = self._position[layer]
        recency = self._recency[position]
        recency *= RECENCY_DECAY
        recency[experts] += 1 - RECENCY_DECAY
        self._visited[position] = True
        self._wait_known[position] = False  # habit until the next prediction, computed when asked
        self._unused = {layer: self._prefetched.pop(layer, set())}
        foreseen = self._foreseen.pop(layer, None)
        if foreseen is not None:
            needed, named = len(set(experts)), len(foreseen.intersection(experts))
            for counts in (self.prefetch_stats, stats):
                counts.needed += needed
                counts.foreseen += named

    def _finish_reads(self, found: dict[int, int]) -> int:
        """Wait for the read-aheads into the slots of `found` ({expert: slot}, pinned); return how
        many were still running and then succeeded (late hits). An expert whose read-ahead failed
        leaves `found` and the pool (it is then read on demand, a miss, where a lasting fault raises)."""
        late = 0
        for expert, slot in list(found.items()):
            read = self._loading.get(slot)
            if read is None:
                continue
            running = not read.done()
            try:
                read.result()
                late += running
            except BaseException:
                if not read.done():  # the wait was interrupted: the read goes on, for the next fetch to wait for
                    raise
                self._unassign(slot)
                self._pinned.discard(slot)
                del found[expert]
            del self._loading[slot]
        return late

    def prefetch(self, layer: int, scores: Tensor, probability: Tensor, limit: int) -> None:
        """Start reading up to `limit` experts of `layer` with the highest `scores` [E] (> 0) that are
        not resident, on the background thread, into slots the eviction policy frees.
        probability: [E] the chance each is needed at that layer's next visit (for "reuse")."""
        self._check_open()
        self._set_wait(self._position[layer], probability.detach().float().cpu().numpy())
        values = scores.tolist()
        order = sorted(range(len(values)), key=values.__getitem__, reverse=True)  # stable: ties in expert order
        named = [e for e in order[:limit] if values[e] > 0]
        self._foreseen[layer] = set(named)
        wanted = [e for e in named if (layer, e) not in self._slot_of]
        issued = self._prefetched.setdefault(layer, set())
        for expert in wanted:
            slot = self._victim(instead_of=(layer, expert))
            if slot is None:
                break
            self._assign(slot, (layer, expert))
            try:
                if self._copier is not None and self._copier.queues_only:  # a device copy, queued at once
                    self._copier.load(layer, expert, slot)
                else:
                    self._loading[slot] = self._reader.submit(self._read_ahead, slot, (layer, expert))
            except BaseException:
                self._unassign(slot)
                raise
            issued.add(expert)
            self.prefetch_stats.issued += 1

    def habit(self, layer: int) -> Tensor:
        """[E] the chance each expert of `layer` is needed at its next visit, from habit alone: the
        mean of a moving average of its recent use and its calibration frequency (1/E without a
        prior)."""
        return torch.from_numpy(self._habit([self._position[layer]])[0])

    def _habit(self, positions: list[int]) -> np.ndarray:
        """[len(positions), E] float32 `habit` of the MoE layers at these positions."""
        frequency = self._frequency[positions]
        recent = (self._recency[positions].astype(np.float32) + frequency) / 2
        return np.where(self._visited[positions, None], recent, frequency)

    def release(self) -> None:
        """Unpin the slots `fetch` handed out (on an accelerator: once the work queued on the current
        stream, which reads them, has run, they may be written)."""
        if self._copier is not None:
            self._copier.used(self._pinned)
        self._pinned.clear()

    def holds_all(self, layer: int) -> bool:
        """Whether every expert of `layer` is in the pool (then there is nothing to prefetch)."""
        return self._count.get(layer, 0) == self.store.num_experts

    def resident(self) -> set[tuple[int, int]]:
        """The (layer, expert) pairs in the pool (loading ones included)."""
        return set(self._slot_of)

    def total(self) -> CacheStats:
        """`stats` summed over every call size."""
        out = CacheStats()
        for s in self.stats.values():
            for name in ("requests", "hits", "late", "misses", "wait_s", "late_copies", "needed", "foreseen"):
                setattr(out, name, getattr(out, name) + getattr(s, name))
        return out

    def close(self) -> None:
        """Drop the read-aheads not started, wait for the running one (and, on an accelerator, the
        copies) and stop the reader thread; the cache serves nothing afterwards. A dropped read-ahead
        read nothing: it leaves `prefetch_stats.issued` (as one dropped for its slot does)."""
        self.closed = True
        for slot, read in list(self._loading.items()):
            if self._dropped(slot, read):
                del self._loading[slot]
                self._unassign(slot)
        self._reader.shutdown(wait=True, cancel_futures=True)
        if self._copier is not None:
            self._copier.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this offloaded model was closed (close()); open it again with load_offloaded")

    # ------------------------------------------------------------------ internals

    def _assign(self, slot: int, key: tuple[int, int]) -> None:
        old = self._owner[slot]
        if old is not None:
            del self._slot_of[old]
            self._count[old[0]] -= 1
        self._count[key[0]] = self._count.get(key[0], 0) + 1
        self._owner[slot] = key
        self._slot_of[key] = slot
        self._owner_entry[slot] = self._position[key[0]] * self.store.num_experts + key[1]
        self._touch(slot)

    def _unassign(self, slot: int) -> None:
        """Free `slot`: its expert is no longer in the pool (its read failed or was interrupted)."""
        old = self._owner[slot]
        if old is not None:
            del self._slot_of[old]
            self._count[old[0]] -= 1
            self._owner[slot] = None

    def _touch(self, slot: int) -> None:
        """Mark `slot` as the most recently used."""
        self._used_at[slot] = self._clock
        self._clock += 1

    def _load(self, slot: int, key: tuple[int, int]) -> None:
        """Read expert `key` into `slot` now, on the caller's thread, ahead of queued read-aheads;
        if the read fails or is interrupted, the slot is freed (it holds no expert whole)."""
        self._no_demand.clear()
        try:
            self._put(slot, key)
        except BaseException:
            self._unassign(slot)
            raise
        finally:
            self._no_demand.set()

    def _read_ahead(self, slot: int, key: tuple[int, int]) -> None:
        """Read expert `key` into `slot` on the background thread, after any read on demand."""
        self._no_demand.wait()
        self._put(slot, key)

    def _put(self, slot: int, key: tuple[int, int]) -> None:
        if self._copier is None:
            self.store.load(*key, self.pool, slot)
        else:
            self._copier.load(*key, slot)

    def _victim(self, instead_of: tuple[int, int] | None = None) -> int | None:
        """A slot to reuse: a free one, else the policy's choice among the unpinned loaded slots
        (ties: the least recently used). instead_of: a prefetch candidate, which takes any other
        layer's slot (that layer will be prefetched for in turn before it runs) but not a likelier
        expert of its own layer; None if there is no such slot (`fetch` checks that unpinned slots
        remain). The choice never depends on how far background reads have got (decided as if loads
        were instant), so hits and misses are reproducible. Every slot is scored at once (numpy): a
        Python loop over them cost 23-107 us a miss at 24-180 slots and ~1 ms at 1,536."""
        if None in self._owner:  # free (an overtaken read-ahead into it is waited for below)
            victim = self._owner.index(None)
        elif len(self._pinned) == self.slots:
            return None
        else:
            victim = self._policy_victim(instead_of)
            if victim is None:
                return None
        # A read-ahead into the victim: dropped if not started, else finished before a read on demand
        # writes the slot; a read-ahead's own read queues behind it on the one reader thread.
        if victim in self._loading:
            read = self._loading.pop(victim)
            if not self._dropped(victim, read):
                self._overtaken[victim] = [r for r in self._overtaken.get(victim, []) if not r.done()] + [read]
        if instead_of is None:
            for read in self._overtaken.pop(victim, []):
                wait([read])  # its error, if any, is dropped with its expert
        return victim

    def _dropped(self, slot: int, read: Future) -> bool:
        """Cancel `read`, the read-ahead into `slot` of the expert it holds, if it has not started;
        whether it was (then it read nothing and is not counted as read ahead)."""
        if not read.cancel():
            return False
        layer, expert = self._owner[slot]
        self._prefetched.get(layer, set()).discard(expert)
        self._unused.get(layer, set()).discard(expert)  # a later chunk of the layer's call reads it on demand
        self.prefetch_stats.issued -= 1
        return True

    def _policy_victim(self, instead_of: tuple[int, int] | None) -> int | None:
        """The eviction policy's choice among the unpinned slots, all of them loaded (see `_victim`)."""
        pinned = list(self._pinned)
        if self.eviction == "lru":
            used_at = self._used_at.copy()
            used_at[pinned] = self._clock
            return int(used_at.argmin())
        score = self._next_uses(self._owner_entry)
        if pinned:
            score[pinned] = -np.inf
        ties = np.flatnonzero(score == score.max())
        victim = int(ties[0] if len(ties) == 1 else ties[self._used_at[ties].argmin()])
        if instead_of is not None and self._owner[victim][0] == instead_of[0]:
            entry = self._position[instead_of[0]] * self.store.num_experts + instead_of[1]
            here = self._next_uses(np.array([entry]))
            if score[victim] <= here[0]:
                return None  # a likelier expert of the same layer would go
        return victim

    def _next_uses(self, entries: np.ndarray) -> np.ndarray:
        """Expected layer visits until each expert (entries: MoE layer position * E + expert) is
        needed (see the module docstring), from the last prediction for its layer since the
        layer's last fetch, else from habit."""
        stale = [position for position, known in enumerate(self._wait_known) if not known]
        if stale:
            self._set_wait(stale, self._habit(stale))
        ahead = self._ahead[self._position[self._current]].take(entries // self.store.num_experts)
        return ahead + self._wait.reshape(-1).take(entries)

    def _set_wait(self, positions: int | list[int], chance: np.ndarray) -> None:
        """Rows `positions` of `_wait` from chance: [E] or [len(positions), E] each expert's chance of
        being needed at its layer's next visit."""
        p = np.fmin(np.fmax(chance.astype(np.float64), 1e-3), 1.0)  # a NaN chance counts as unlikely
        L = len(self._wait_known)
        self._wait[positions] = L * (1 - p) / p
        for position in [positions] if isinstance(positions, int) else positions:
            self._wait_known[position] = True
