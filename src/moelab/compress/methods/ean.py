"""EAN pruning: keep the experts with the largest summed output norm over their routed tokens,
sum_{t routed to e} ||f_e(x_t)||_2."""

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class EAN(ScoringMethod):
    name = "ean"
    summary = "keep the experts with the largest summed output norm over their routed tokens"
    needs = ("routing", "outputs")

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        return stats.total("ean_sums", halves=target.halves)
