"""Routing statistics, accumulated shard by shard over a trace.

Shape legend: N tokens, K slots, E experts of a layer, E' experts of the next MoE layer,
M domains, L chunk length.

Definitions (all counts are over (token, chosen expert) assignments unless said otherwise):
- load[e]: assignments to expert e. Imbalance: coefficient of variation std/mean (population
  std) and max/mean of the load.
- specialisation: domain_load[m, e], the assignments of domain m's tokens to expert e; the
  mutual information I(expert; domain) in bits of the joint distribution domain_load / total.
- co-activation[i, j]: tokens that chose both i and j (diagonal: tokens that chose i);
  P(j | i) = co-activation[i, j] / co-activation[i, i].
- routing entropy: the mean over tokens of the entropy (bits) of the router's distribution.
- inter-layer affinity A[i, j]: tokens that chose i at one MoE layer and j at the next;
  P(j at the next layer | i) = A[i, j] / sum_j A[i, j] (rows sum to 1).
- chunk-level sparsity CLS_L (BlockFFN): 1 - (active (chunk, expert) pairs) / (chunks * E) over
  chunks of L consecutive tokens of a sequence; partial chunks are skipped. CLS_1 = TLS.
- identity experts (LongCat-Flash's zero-computation ones, a trace's choices past a layer's E
  experts with weights): counted as experts in the load, co-activation and affinity; the imbalance
  and the CLS are over the E experts; identity_share is their share of the assignments and
  computed_experts_per_token the experts with weights a token runs.
- super experts (Su et al. 2025): candidates are every routed expert's max |down output| and
  each layer's shared experts (expert -1); threshold = max(99.5th percentile of all
  candidates, max / 10); super experts are the candidates above it in the first 75% of the
  MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moelab.nn.blockffn import active_experts
from moelab.trace.store import Trace, TraceShard


def imbalance(load: Tensor) -> dict[str, float]:
    """load: [E] -> {"cv": std / mean, "max_over_mean": max / mean} (population std)."""
    load = load.double()
    mean = load.mean()
    if mean <= 0:
        raise ValueError("load imbalance needs at least one assignment")
    return {"cv": float(load.std(correction=0) / mean), "max_over_mean": float(load.max() / mean)}


def entropy_of(counts: Tensor) -> float:
    """counts: [n] non-negative -> entropy in bits of counts / sum."""
    p = counts.double().flatten()
    p = p / p.sum()
    return float(torch.special.entr(p).sum() / math.log(2))


def mutual_information(joint: Tensor) -> float:
    """joint: [A, B] counts of (a, b) pairs -> I(a; b) in bits = H(a) + H(b) - H(a, b)."""
    if joint.sum() <= 0:
        raise ValueError("mutual information needs at least one (a, b) pair")
    return max(entropy_of(joint.sum(1)) + entropy_of(joint.sum(0)) - entropy_of(joint), 0.0)


def row_normalise(matrix: Tensor) -> Tensor:
    """[A, B] -> each row divided by its sum (rows summing to 0 stay 0)."""
    matrix = matrix.double()
    return matrix / matrix.sum(1, keepdim=True).clamp(min=1e-300)


def chunk_activity(active: Tensor, sequence: Tensor, positions: Tensor, chunk_len: int) -> tuple[int, int]:
    """active: [N, E] bool; sequence, positions: [N] (tokens of a sequence contiguous, in order)
    -> (active (chunk, expert) pairs, complete chunks) for chunks of `chunk_len` tokens."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    key = sequence * (int(positions.max()) + 1 if positions.numel() else 1) + positions // chunk_len
    _, chunk, size = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    fired = torch.zeros(size.shape[0], active.shape[1]).index_add_(0, chunk, active.float()) > 0
    complete = size == chunk_len
    return int(fired[complete].sum()), int(complete.sum())


def super_experts(
    expert_max: dict[int, Tensor],
    shared_max: dict[int, Tensor],
    *,
    quantile: float = 0.995,
    ratio: float = 10.0,
    layer_fraction: float = 0.75,
) -> dict[str, Any]:
    """expert_max: {layer: [E] max |down output|}; shared_max: {layer: [1]} -> {"threshold",
    "layers" (the MoE layers searched: the first max(1, int(fraction * n)) of them),
    "super_experts": [{"layer", "expert" (-1 = shared), "max_output", "over_median" (None where the
    median candidate is 0: more than half the experts never ran)}]}. The threshold and the median are
    over the finite candidates: an infinite one (an overflowed output) is above it, a NaN one never."""
    layers = sorted(expert_max)
    candidates = [(i, e, float(v)) for i in layers for e, v in enumerate(expert_max[i].tolist())]
    candidates += [(i, -1, float(v)) for i, v in sorted(shared_max.items())]
    values = torch.tensor([v for *_, v in candidates], dtype=torch.float64)
    if not (values > 0).any():
        return {"threshold": None, "layers": [], "super_experts": []}
    # An overflowed output (inf or NaN: a low-precision model) would make the threshold inf or NaN and
    # hide every super expert: the threshold and the median are the finite candidates'; an inf is above.
    finite = values[values.isfinite()] if values.isfinite().any() else values.new_zeros(1)
    threshold = max(float(torch.quantile(finite, quantile)), float(finite.max()) / ratio)
    searched = layers[: max(1, int(len(layers) * layer_fraction))]
    median = float(torch.quantile(finite, 0.5))
    found = [
        {"layer": i, "expert": e, "max_output": v, "over_median": v / median if median > 0 else None}
        for i, e, v in candidates
        if v > threshold and i in searched
    ]
    return {"threshold": threshold, "layers": searched, "super_experts": sorted(found, key=lambda s: -s["max_output"])}


@dataclass
class LayerAccumulator:
    """Running counts of one MoE layer (see the module docstring)."""

    num_experts: int
    num_domains: int
    chunk_lens: Sequence[int]
    identity: int = 0  # the last `identity` of the num_experts choices are identity experts
    tokens: int = 0
    entropy_sum: float = 0.0
    load: Tensor = field(init=False)
    weight_sum: Tensor = field(init=False)
    domain_load: Tensor = field(init=False)
    coactivation: Tensor = field(init=False)
    chunk_pairs: dict[int, int] = field(init=False)
    chunks: dict[int, int] = field(init=False)

    def __post_init__(self):
        E = self.num_experts
        self.load = torch.zeros(E, dtype=torch.float64)
        self.weight_sum = torch.zeros(E, dtype=torch.float64)
        self.domain_load = torch.zeros(self.num_domains, E, dtype=torch.float64)
        self.coactivation = torch.zeros(E, E, dtype=torch.float64)
        self.chunk_pairs = dict.fromkeys(self.chunk_lens, 0)
        self.chunks = dict.fromkeys(self.chunk_lens, 0)

    def update(self, shard: TraceShard, active: Tensor, layer: int) -> None:
        """active: [N, E] bool, the shard's chosen experts at this layer."""
        routing = shard.layers[layer]
        a = active.double()
        self.tokens += shard.num_tokens
        self.entropy_sum += float(routing.entropy.double().sum())
        self.load += a.sum(0)
        valid = routing.indices >= 0
        self.weight_sum.index_add_(0, routing.indices[valid], routing.weights[valid].double())
        self.domain_load.index_add_(0, shard.domain, a)
        self.coactivation += a.T @ a
        computed = active[:, : self.num_experts - self.identity]
        for L in self.chunk_lens:
            pairs, chunks = chunk_activity(computed, shard.sequence, shard.positions, L)
            self.chunk_pairs[L] += pairs
            self.chunks[L] += chunks

    def summary(self, domains: list[str]) -> dict[str, Any]:
        """The layer's statistics; the load's imbalance and entropies are None where no token chose
        any expert here (a ReLU router may choose none)."""
        E, computed = self.num_experts, self.num_experts - self.identity
        total, computed_total = float(self.load.sum()), float(self.load[:computed].sum())
        assigned = total > 0
        return {
            "num_experts": E,
            "identity_experts": self.identity,
            "tokens": self.tokens,
            "load": self.load.tolist(),
            "load_fraction": (self.load / max(total, 1.0)).tolist(),
            "weight_sum": self.weight_sum.tolist(),
            **(imbalance(self.load[:computed]) if computed_total > 0 else {"cv": None, "max_over_mean": None}),
            "experts_per_token": total / max(self.tokens, 1),
            "computed_experts_per_token": computed_total / max(self.tokens, 1),
            "identity_share": (total - computed_total) / total if assigned else None,
            "routing_entropy_bits": self.entropy_sum / max(self.tokens, 1),
            "max_entropy_bits": math.log2(E),
            "load_entropy_bits": entropy_of(self.load) if assigned else None,
            "domain_mi_bits": mutual_information(self.domain_load) if assigned else None,
            "domain_entropy_bits": entropy_of(self.domain_load.sum(1)) if assigned else None,
            "domain_load": {d: self.domain_load[m].tolist() for m, d in enumerate(domains)},
            "coactivation": self.coactivation.tolist(),
            "coactivation_conditional": _conditional(self.coactivation).tolist(),
            "cls": {
                str(L): 1.0 - self.chunk_pairs[L] / (self.chunks[L] * computed) if self.chunks[L] else None
                for L in self.chunk_lens
            },
        }


def _conditional(coactivation: Tensor) -> Tensor:
    """P(j | i) = C[i, j] / C[i, i] (rows of unused experts stay 0)."""
    return coactivation / coactivation.diagonal()[:, None].clamp(min=1e-300)


def analyze_trace(trace: Trace, *, chunk_lens: Sequence[int] = (1, 8, 64)) -> dict[str, Any]:
    """Every statistic of the module docstring, streamed over `trace`'s shards, as a JSON-able dict:
    {"model", "family", "tokens", "domains", "layers": {layer: ...}, "affinity": [...],
    "super_experts": {...}, "checks", "trace_settings"}."""
    info = trace.info
    layers = info.layers
    acc = {i: LayerAccumulator(info.experts_of(i), len(info.domains), chunk_lens, info.identity_of(i)) for i in layers}
    pairs = list(zip(layers[:-1], layers[1:]))
    affinity = {(a, b): torch.zeros(info.experts_of(a), info.experts_of(b), dtype=torch.float64) for a, b in pairs}
    domain_tokens = torch.zeros(len(info.domains), dtype=torch.long)
    for shard in trace.shards():
        domain_tokens += torch.bincount(shard.domain, minlength=len(info.domains))
        active = {i: active_experts(shard.layers[i].indices, info.experts_of(i)) for i in layers}
        for i in layers:
            acc[i].update(shard, active[i], i)
        for a, b in pairs:
            affinity[a, b] += active[a].double().T @ active[b].double()
    if not any(a.tokens for a in acc.values()):
        raise ValueError(f"the trace in {trace.directory} holds no tokens; trace some data first")
    expert_max, shared_max = trace.expert_stats()
    # identity experts (choices past a layer's experts with weights) have no output of their own to rank
    expert_max = {i: t[: info.experts_of(i) - info.identity_of(i)] for i, t in expert_max.items()}
    recorded = info.settings.get("expert_stats", True)
    return {
        "model": info.model,
        "family": info.family,
        "tokens": info.num_tokens,
        "domains": dict(zip(info.domains, domain_tokens.tolist())),
        "layers": {str(i): acc[i].summary(info.domains) for i in layers},
        "affinity": [
            {
                "from": a,
                "to": b,
                "counts": m.tolist(),
                "conditional": row_normalise(m).tolist(),
                "mi_bits": mutual_information(m) if m.sum() > 0 else 0.0,
            }
            for (a, b), m in affinity.items()
        ],
        "expert_max_output": {str(i): t.tolist() for i, t in expert_max.items()} if recorded else None,
        "shared_max_output": {str(i): float(t[0]) for i, t in shared_max.items()} if recorded else None,
        "super_experts": super_experts(expert_max, shared_max) if recorded else None,
        "identity_returns": info.identity_returns,
        "checks": info.checks,
        "trace_settings": info.settings,
    }
