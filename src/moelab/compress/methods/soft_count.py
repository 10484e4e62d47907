"""Soft-count pruning (S-prune, HC-SMoE's baseline): keep the experts with the most router
probability mass over all calibration tokens, chosen or not."""

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class SoftCount(ScoringMethod):
    name = "soft_count"
    summary = "keep the experts with the most router probability over all tokens (S-prune)"

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        return stats.total("soft_counts", halves=target.halves)
