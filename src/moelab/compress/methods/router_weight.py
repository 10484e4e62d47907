"""Router-weight pruning: keep the experts whose combine weights, over the tokens routed to
them, add up to the most (REAP's `weighted_expert_frequency_sum`). The weights are those the model
applies, renormalised over the top k where it renormalises; MC-MoE's "activated weight" sums the
probabilities before that renormalisation, which `soft_count`'s statistics do not restrict to the
routed tokens, so it is not offered as such."""

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class RouterWeight(ScoringMethod):
    name = "router_weight"
    summary = "keep the experts with the largest sum of combine weights over their routed tokens"

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        return stats.total("gate_sums", halves=target.halves)
