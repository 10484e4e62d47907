"""NAEE expert pruning (Lu et al., ACL 2024): keep the set of experts whose layer, with the
others masked out of routing, best reproduces the original layer's output on calibration tokens:

    min over kept sets K of  sum_chunks || Z - Z_K ||_F

Z: the original MoE block's output on the sampled block inputs X (the `inputs` statistic);
Z_K: the block with every expert outside K given router logit -inf before top-k (what dropping
them computes; `masked_moe_layer`), in float64 (the router's scores in float32, as moelab's routers
always compute them: losses within ~1e-7 relative of an all-float64 reference). The Frobenius norm
is not squared and is summed
over chunks of `chunk` tokens, as the reference code sums it over its batches. Those are larger:
8 sequences of 2,048 tokens, 16 batches of its 262,144 calibration tokens; moelab's default of
1,024 sampled tokens in chunks of 128 gives 8.

Search: every kept set when there are at most `max_candidates` of them (C(8, 2) = 28 for
Mixtral at 25 %), else greedy backward elimination (drop, one at a time, the expert whose
removal raises the loss least: sum over steps of the experts left evaluations). Both searches
keep the lower ids on an exact tie. With
group-limited routing, every group drops the same number of experts. The decision's notes give
the search used, the number of sets evaluated and the best loss.
"""

from __future__ import annotations

import itertools
import math

import torch

from moelab.compress.methods.base import LayerDecision, Method, Target
from moelab.compress.stats import LayerStats
from moelab.hf.edit import LayerEdit, layer_output, masked_moe_layer
from moelab.hf.native import moe_layer_from_view
from moelab.hf.view import MoELayerView


class NAEE(Method):
    name = "naee"
    summary = (
        "keep the expert set whose masked layer best reproduces the layer output (enumeration or greedy)"
    )
    needs = ("routing", "inputs")
    needs_weights = True

    def __init__(self, max_candidates: int = 5000, chunk: int = 128):
        if max_candidates < 1 or chunk < 1:
            raise ValueError(f"naee needs max_candidates and chunk >= 1, got {max_candidates} and {chunk}")
        self.max_candidates = max_candidates
        self.chunk = chunk

    def options(self):
        return {"max_candidates": self.max_candidates, "chunk": self.chunk}

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        x = stats.inputs
        if x is None or x.numel() == 0 or not (x != 0).any():
            raise ValueError(
                f"naee needs sampled layer inputs; layer {layer.index}'s statistics have none (calibrate with "
                "sample_tokens > 0)"
            )
        x = x.double()
        with torch.no_grad():
            reference = layer_output(moe_layer_from_view(layer).double(), x, stats.router_inputs)
        E, n_group = layer.router.num_experts, layer.router.n_group
        losses: dict[tuple[int, ...], float] = {}

        def loss(kept: tuple[int, ...]) -> float:
            if kept not in losses:
                with torch.no_grad():
                    out = layer_output(masked_moe_layer(layer, kept).double(), x, stats.router_inputs)
                losses[kept] = float(sum(d.norm() for d in (reference - out).split(self.chunk)))
            return losses[kept]

        exhaustive = _count(E, target, n_group) <= self.max_candidates
        if exhaustive:
            best = min(_candidates(E, target, n_group), key=lambda kept: (loss(kept), kept))
        else:
            best = _greedy(E, target, n_group, loss)
        kept = list(best)
        notes = {
            "search": "exhaustive" if exhaustive else "greedy backward elimination",
            "evaluated": len(losses),
            "loss": losses[best],
            "tokens": int(x.shape[0]),
        }
        return LayerDecision(LayerEdit.keep(kept), kept, None, notes)


def _count(E: int, target: Target, n_group: int) -> int:
    """How many kept sets `_candidates` yields."""
    size, per_group = E // n_group, target.keep // n_group
    total = 1
    for group in range(n_group):
        fixed = sum(1 for e in range(group * size, (group + 1) * size) if e in target.protect)
        total *= math.comb(size - fixed, per_group - fixed)
    return total


def _candidates(E: int, target: Target, n_group: int):
    """Every kept set of size target.keep that holds the protected experts and keeps the same
    number in every group, in lexicographic order."""
    size, per_group = E // n_group, target.keep // n_group
    per = []
    for group in range(n_group):
        ids = range(group * size, (group + 1) * size)
        fixed = [e for e in ids if e in target.protect]
        free = [e for e in ids if e not in target.protect]
        per.append(
            [tuple(sorted(fixed + list(c))) for c in itertools.combinations(free, per_group - len(fixed))]
        )
    for combo in itertools.product(*per):
        yield tuple(sorted(e for part in combo for e in part))


def _greedy(E: int, target: Target, n_group: int, loss) -> tuple[int, ...]:
    """Drop experts one at a time, always the one whose removal gives the lowest loss (on a tie
    the higher id, so that lower ids stay, as in the exhaustive search and `select_top`)."""
    size = E // n_group
    kept = set(range(E))
    drops_left = [size - target.keep // n_group] * n_group
    while sum(drops_left):
        options = [e for e in sorted(kept) if e not in target.protect and drops_left[e // size] > 0]
        best = min(options, key=lambda e: (loss(tuple(sorted(kept - {e}))), -e))
        kept.remove(best)
        drops_left[best // size] -= 1
    return tuple(sorted(kept))
