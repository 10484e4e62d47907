"""Which experts the next MoE layer will want: the predictions behind prefetching and eviction.

Shape legend: T tokens, K experts per token, E experts of a layer.

A `RoutingPrior` holds what a routing trace on calibration text says (`moelab trace`, or
`RoutingPrior.measure` on a model): per MoE layer, how often each expert is chosen, and per pair
of consecutive MoE layers the inter-layer affinity P(j at the next layer | i at this one), the
statistic `moelab analyze` reports. When the decoder layer of MoE layer b starts (before its
attention), b's experts are scored by

- "affinity": per token, the sum over its chosen experts i at the previous MoE layer a of
  P(j | i), divided by K (EdgeMoE / ExpertFlow's inter-layer affinity);
- "lookahead": b's own router applied to the decoder layer's input (the residual stream after a,
  normalised by b's pre-MoE norm; b's attention changes it little: Mixtral-offloading's
  speculative loading), per token 1 for each of its top-k choices plus its normalised score, so
  that the choices come first and the score ranks the rest. On `ref-8e-top2` (2,048 test tokens)
  its top K+1 hold 88 % of the second MoE layer's choices, against 49 % for the same router on
  the previous MoE layer's input (where this predictor first looked); it also predicts a token's
  first MoE layer, from the embedding;
- "both": the sum of the two: the lookahead's choices first, the rest ranked by router score plus
  affinity.

Each part is at most 1 per token (2 for the lookahead); the summed scores over T tokens divided
by T times that maximum serve as the chance an expert is needed at b (for eviction).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.hf.view import ModelView
from moelab.trace import RoutingCapture, Trace, open_trace

PREDICTORS = ("affinity", "lookahead", "both")


@dataclass(frozen=True)
class RoutingPrior:
    """layers: MoE layer indices in order; frequency[layer]: [E] the fraction of tokens that chose
    each expert (sums to K); affinity[layer]: [E_a, E_b] P(expert j at the next MoE layer |
    expert i at `layer`), rows summing to 1 (uniform for an expert the trace never saw)."""

    layers: tuple[int, ...]
    frequency: dict[int, Tensor]
    affinity: dict[int, Tensor]

    def for_experts(self, num_experts: int) -> RoutingPrior:
        """This prior over the first `num_experts` choices of every layer: the experts with weights
        where traces also record a router's identity experts past them (LongCat-Flash's), which
        nothing fetches."""
        E = num_experts
        return RoutingPrior(
            self.layers, {i: f[:E] for i, f in self.frequency.items()}, {i: a[:E, :E] for i, a in self.affinity.items()}
        )

    @classmethod
    def from_trace(cls, trace: Trace | str | os.PathLike) -> RoutingPrior:
        """Count choices and consecutive-layer co-choices over every token of a routing trace (or
        the trace directory `moelab trace` wrote)."""
        if not isinstance(trace, Trace):
            trace = open_trace(trace)
        counter = _Counter({i: trace.info.experts_of(i) for i in trace.info.layers})
        for shard in trace.shards():
            counter.add({i: routing.indices for i, routing in shard.layers.items()})
        return counter.prior(f"the trace in {trace.directory}")

    @classmethod
    @torch.no_grad()
    def measure(cls, model: nn.Module, batches: Iterable[Tensor], view: ModelView | None = None) -> RoutingPrior:
        """Run `model` (moelab's or a transformers model; view: its checkpoint view) on batches of
        token ids [B, S] and count its routing as `from_trace` does."""
        with RoutingCapture(model, view, expert_stats=False) as capture:
            counter = _Counter(capture.num_experts)
            for ids in batches:
                model(ids) if view is None else model(input_ids=ids, use_cache=False)
                counter.add({i: routing.indices for i, routing in capture.pop().items()})
        return counter.prior("the calibration batches")

    def affinity_scores(self, layer: int, indices: Tensor) -> Tensor:
        """indices: [T, K] the experts chosen at `layer` (-1 = empty) -> [E_next] expected choices
        of each expert of the next MoE layer over the T tokens."""
        chosen = indices[indices >= 0]
        return self.affinity[layer].index_select(0, chosen.cpu()).sum(0)


class _Counter:
    """Choice and consecutive-layer co-choice counts, fed [N, K] indices per MoE layer."""

    def __init__(self, num_experts: dict[int, int]):
        self.layers = tuple(sorted(num_experts))
        self.E = num_experts
        self.counts = {i: torch.zeros(E, dtype=torch.float64) for i, E in num_experts.items()}
        self.pairs = {a: torch.zeros(self.E[a], self.E[b], dtype=torch.float64) for a, b in self._consecutive()}
        self.tokens = 0

    def _consecutive(self):
        return zip(self.layers[:-1], self.layers[1:])

    def add(self, indices: dict[int, Tensor]) -> None:
        active = {i: _one_hot(indices[i], self.E[i]) for i in self.layers}
        self.tokens += active[self.layers[0]].shape[0]
        for i in self.layers:
            self.counts[i] += active[i].sum(0)
        for a, b in self._consecutive():
            self.pairs[a] += active[a].T @ active[b]

    def prior(self, source: str) -> RoutingPrior:
        if self.tokens == 0:
            raise ValueError(f"{source} hold no tokens; a routing prior needs some calibration text")
        affinity = {}
        for a, m in self.pairs.items():
            rows = m.sum(1, keepdim=True)
            affinity[a] = torch.where(rows > 0, m / rows.clamp(min=1), 1.0 / m.shape[1]).float()
        frequency = {i: (c / self.tokens).float() for i, c in self.counts.items()}
        return RoutingPrior(self.layers, frequency, affinity)


def lookahead_scores(indices: Tensor, probs: Tensor) -> Tensor:
    """The next layer's router on this layer's input: indices: [T, K] its choices (-1 = empty),
    probs: [T, E] its scores -> [E], summed over tokens, 1 for each choice plus the token's
    normalised score (so the choices come first and the rest are ranked by score)."""
    E = probs.shape[1]
    chosen = indices[indices >= 0]
    scores = (probs / probs.sum(1, keepdim=True).clamp(min=1e-12)).sum(0).float().cpu()
    return scores + torch.bincount(chosen.cpu(), minlength=E).float()


def _one_hot(indices: Tensor, num_experts: int) -> Tensor:
    """indices: [N, K] (-1 = empty) -> [N, E] float64, 1 where a token chose an expert."""
    active = torch.zeros(indices.shape[0], num_experts + 1, dtype=torch.float64)
    active.scatter_(1, torch.where(indices >= 0, indices, num_experts).long(), 1.0)
    return active[:, :num_experts]
