"""EASY-EP (Dong et al., 2025): domain-specific pruning by output-aware importance weighted by
each token's change of direction:

    I_e = sum_t g_e(x_t) ||f_e(x_t)|| * max(0, 1 - cos(h_t, h_t + y_t))

over the tokens routed to e (h_t: the residual stream entering the block, y_t: the routed
experts' output). Several calibration sources (domains) are mixed as the reference code does:
each source's scores are normalised to sum 1 in the layer, then added.
"""

import torch

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class EasyEP(ScoringMethod):
    name = "easy_ep"
    summary = "keep the experts with the largest output-aware, direction-change-weighted importance (per domain, mixed)"
    needs = ("routing", "outputs", "contribution")
    requires = ("easyep_sums",)

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        total = torch.zeros(stats.num_experts, dtype=torch.float64)
        for source in stats.sources:
            scores = stats.total("easyep_sums", [source], target.halves)
            total += scores / scores.sum() if scores.sum() > 0 else scores
        return total
