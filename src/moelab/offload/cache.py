"""A pool of expert slots shared by every MoE layer, filled from an `ExpertStore`.

    cache = ExpertCache(store, slots=12, eviction="reuse", prior=prior)
    slots = cache.fetch(layer, [3, 5], tokens=1)    # resident now (read from disk on a miss), pinned
    cache.prefetch(next_layer, scores, p, limit=4)  # background reads of the likely next experts
    ...compute on cache.pool with `slots`...
    cache.release()                                 # unpin

`pool` is one stacked-experts module with `slots` entries (`SwiGLUExperts` layout), so a layer
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
hit). Which slot goes never depends on how far a background read has got, so the hits and misses
of a run are reproducible. Statistics are kept per number of tokens
in the layer call (decode steps of batch B call every layer with B tokens; a prefill with more).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from moelab.offload.predict import RoutingPrior
from moelab.offload.store import ExpertStore

EVICTIONS = ("lru", "reuse")
RECENCY_DECAY = 0.5  # per visit of a layer: consecutive tokens often reuse an expert


@dataclass
class CacheStats:
    """requests: experts asked for by `fetch`; hits: resident and loaded; late: resident but still
    loading from a prefetch (waited for); misses: read from disk on demand; wait_s: time `fetch`
    spent blocked on reads."""

    requests: int = 0
    hits: int = 0
    late: int = 0
    misses: int = 0
    wait_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Requests served without a read on demand (late hits included)."""
        return (self.hits + self.late) / self.requests if self.requests else float("nan")

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"hit_rate": self.hit_rate}


@dataclass
class PrefetchStats:
    """issued: experts read ahead by `prefetch`; used: those the layer then asked for."""

    issued: int = 0
    used: int = 0

    @property
    def accuracy(self) -> float:
        return self.used / self.issued if self.issued else float("nan")

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"accuracy": self.accuracy}


class ExpertCache:
    """`slots` resident experts of `store`'s checkpoint (see the module docstring).

    eviction: "lru" or "reuse"; prior: calibration statistics for "reuse" (optional);
    device: where the pool lives. stats[tokens]: `CacheStats` of the layer calls with that many
    tokens; prefetch_stats: `PrefetchStats` over all calls.
    """

    def __init__(
        self,
        store: ExpertStore,
        slots: int,
        *,
        eviction: str = "reuse",
        prior: RoutingPrior | None = None,
        device: torch.device | str = "cpu",
    ):
        if eviction not in EVICTIONS:
            raise ValueError(f"unknown eviction policy {eviction!r}; choose one of {EVICTIONS}")
        total = len(store.moe_layers) * store.num_experts
        if not 1 <= slots <= total:
            raise ValueError(f"slots must lie in 1..{total} (every routed expert of the model), got {slots}")
        self.store = store
        self.slots = slots
        self.eviction = eviction
        self.prior = prior
        self.pool = store.empty(slots, device)
        self._position = {layer: p for p, layer in enumerate(store.moe_layers)}
        self._uniform = torch.full((store.num_experts,), 1.0 / store.num_experts)  # frequency without a prior
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="moelab-prefetch")
        self._clear()

    def _clear(self) -> None:
        """Forget everything the pool held and every count: the state of a new cache."""
        self._slot_of: dict[tuple[int, int], int] = {}
        self._owner: list[tuple[int, int] | None] = [None] * self.slots
        self._loading: dict[int, Future] = {}
        self._pinned: set[int] = set()
        self._recent: OrderedDict[int, None] = OrderedDict()  # slots, least recently used first
        self._chance: dict[int, list[float]] = {}  # layer -> each expert's chance of being needed next visit
        self._prefetched: dict[int, set[int]] = {}
        self._recency: dict[int, list[float]] = {}  # layer -> [E] moving average of "chosen at a visit"
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
            self._load(slot, key)

    def restart(self, experts: list[tuple[int, int]]) -> None:
        """Start again from an empty pool and zero counts, then `fill` it with `experts`: the
        cache's state when new with the same warm start (e.g. after a compiled step's warm-up;
        the affinity predictor's memory of the last choices, `OffloadedExperts.chosen`, is the
        experts')."""
        wait(list(self._loading.values()))  # background reads finish (a failed read-ahead is dropped)
        self._clear()
        self.fill(experts)

    def fetch(self, layer: int, experts: list[int], tokens: int) -> list[int]:
        """Make `experts` of `layer` resident and pin them until `release`; returns their slots.
        At most `slots` experts at once. `tokens`: the layer call's token count (for `stats`)."""
        if len(experts) > self.slots - len(self._pinned):
            raise ValueError(
                f"{len(experts)} experts asked for at once, but only {self.slots - len(self._pinned)} of "
                f"{self.slots} slots are free; ask for fewer at a time"
            )
        self._current = layer
        # Python floats, not a tensor: tensor operations cost more than the rest of a decode
        # step's fetch (3 against 22 us a hit of two experts; see docs/benchmarks.md).
        recency = self._recency.setdefault(layer, [0.0] * self.store.num_experts)
        recency[:] = [r * RECENCY_DECAY for r in recency]
        for expert in experts:
            recency[expert] += 1 - RECENCY_DECAY
        self._chance.pop(layer, None)  # habit until the next prediction for it, computed when asked (`_next_use`)
        prefetched = self._prefetched.pop(layer, set())
        self.prefetch_stats.used += len(prefetched.intersection(experts))
        stats = self.stats.setdefault(tokens, CacheStats())
        stats.requests += len(experts)
        start = time.perf_counter()
        found = {e: self._slot_of[layer, e] for e in experts if (layer, e) in self._slot_of}
        self._pinned.update(found.values())  # first, so that a miss below cannot evict them
        reads = [self._loading.pop(slot) for slot in found.values() if slot in self._loading]
        late = sum(not read.done() for read in reads)
        for read in reads:
            read.result()  # waits; a failed background read surfaces here
        stats.late += late
        stats.hits += len(found) - late
        for expert in experts:
            if expert not in found:
                stats.misses += 1
                slot = found[expert] = self._victim()
                self._assign(slot, (layer, expert))
                self._load(slot, (layer, expert))
                self._pinned.add(slot)
        for slot in found.values():
            self._recent.move_to_end(slot)
        stats.wait_s += time.perf_counter() - start
        return [found[e] for e in experts]

    def prefetch(self, layer: int, scores: Tensor, probability: Tensor, limit: int) -> None:
        """Start reading up to `limit` experts of `layer` with the highest `scores` [E] (> 0) that are
        not resident, on the background thread, into slots the eviction policy frees.
        probability: [E] the chance each is needed at that layer's next visit (for "reuse")."""
        self._chance[layer] = probability.tolist()
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        wanted = [e for e in order[:limit] if scores[e] > 0 and (layer, e) not in self._slot_of]
        issued = self._prefetched.setdefault(layer, set())
        for expert in wanted:
            slot = self._victim(instead_of=(layer, expert))
            if slot is None:
                break
            self._assign(slot, (layer, expert))
            self._loading[slot] = self._reader.submit(self._load, slot, (layer, expert))
            issued.add(expert)
            self.prefetch_stats.issued += 1

    def habit(self, layer: int) -> Tensor:
        """[E] the chance each expert of `layer` is needed at its next visit, from habit alone: the
        mean of a moving average of its recent use and its calibration frequency (1/E without a
        prior)."""
        frequency = self._uniform if self.prior is None else self.prior.frequency[layer]
        recency = self._recency.get(layer)
        return frequency.clone() if recency is None else (torch.tensor(recency, dtype=frequency.dtype) + frequency) / 2

    def release(self) -> None:
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
            for name in ("requests", "hits", "late", "misses", "wait_s"):
                setattr(out, name, getattr(out, name) + getattr(s, name))
        return out

    def close(self) -> None:
        """Wait for background reads and stop the reader thread."""
        self._reader.shutdown(wait=True)

    # ------------------------------------------------------------------ internals

    def _assign(self, slot: int, key: tuple[int, int]) -> None:
        old = self._owner[slot]
        if old is not None:
            del self._slot_of[old]
            self._count[old[0]] -= 1
        self._count[key[0]] = self._count.get(key[0], 0) + 1
        self._owner[slot] = key
        self._slot_of[key] = slot
        self._recent[slot] = None
        self._recent.move_to_end(slot)

    def _load(self, slot: int, key: tuple[int, int]) -> None:
        """Read expert `key` into `slot` (on the caller's thread)."""
        self.store.load(*key, self.pool, slot)

    def _victim(self, instead_of: tuple[int, int] | None = None) -> int | None:
        """A slot to reuse: a free one, else the policy's choice among the unpinned loaded slots.
        instead_of: a prefetch candidate, which takes any other layer's slot (that layer will be
        prefetched for in turn before it runs) but not a likelier expert of its own layer; None
        if there is no such slot (`fetch` checks that unpinned slots remain). The choice never
        depends on how far background reads have got, so hits and misses are reproducible."""
        if None in self._owner:
            return self._owner.index(None)
        candidates = [s for s in self._recent if s not in self._pinned]  # decided as if loads were instant
        if not candidates:
            return None
        if self.eviction == "lru":
            victim = candidates[0]
        else:
            victim = max(candidates, key=lambda s: self._next_use(self._owner[s]))
            if instead_of is not None and self._owner[victim][0] == instead_of[0]:
                if self._next_use(self._owner[victim]) <= self._next_use(instead_of):
                    return None  # a likelier expert of the same layer would go
        if victim in self._loading:  # a prefetch still reading into it: let it finish first
            self._loading.pop(victim).result()
        return victim

    def _next_use(self, key: tuple[int, int]) -> float:
        """Expected layer visits until expert `key` is needed (see the module docstring)."""
        layer, expert = key
        if layer not in self._chance:  # no prediction since the layer's last fetch (or ever): habit
            self._chance[layer] = self.habit(layer).tolist()
        L = len(self._position)
        ahead = (self._position[layer] - self._position[self._current]) % L or L
        p = min(max(self._chance[layer][expert], 1e-3), 1.0)
        return ahead + L * (1 - p) / p
