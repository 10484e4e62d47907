"""Soft-count pruning (S-prune, HC-SMoE's baseline): keep the experts with the most router
probability mass over all calibration tokens, chosen or not. The probability is the router's
own: softmax of the logits, or for a sigmoid router (DeepSeek-V3, Llama 4) the sigmoids
normalised to sum 1 per token, where the paper, written for softmax routers, would apply a
softmax to logits that were never one. With identity experts (LongCat-Flash's zero-computation
experts) it is the router's probability over all E + Z choices, not renormalised over the E
experts: the identity experts' share is usage too (a token that gives them mass runs fewer
experts), as the top-k counts leave out their slots."""

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class SoftCount(ScoringMethod):
    name = "soft_count"
    summary = "keep the experts with the most router probability over all tokens (S-prune)"

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        return stats.total("soft_counts", halves=target.halves)
