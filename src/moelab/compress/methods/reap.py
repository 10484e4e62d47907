"""REAP (Lasby et al., 2026): keep the experts with the largest router-weighted output norm,
averaged over the tokens routed to them:

    S_e = (1 / |X_e|) sum_{x in X_e} g_e(x) ||f_e(x)||_2,    X_e = tokens whose top-k holds e

g_e is the combine weight the model really uses (renormalised over the top-k where the model
renormalises, the sigmoid/correction-bias rule for DeepSeek-V3-style routers), not a softmax
recomputed over the logits; an expert no token chose scores 0.
"""

import torch

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class REAP(ScoringMethod):
    name = "reap"
    summary = "keep the experts with the largest mean router-weighted output norm over their routed tokens"
    needs = ("routing", "outputs")

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        sums = stats.total("reap_sums", halves=target.halves)
        counts = stats.total("counts", halves=target.halves)
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
