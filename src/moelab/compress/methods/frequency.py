"""Frequency pruning (F-prune): keep the experts the router picks most often."""

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class Frequency(ScoringMethod):
    name = "frequency"
    summary = "keep the experts chosen most often (top-k selections over the calibration tokens)"

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        return stats.total("counts", halves=target.halves)
