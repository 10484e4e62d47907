"""PreMoe-style task-conditioned pruning (Pei et al., 2025): keep the experts with the largest
expected selection score on the chosen domain's tokens, the mean over tokens of the raw router
logit of each chosen expert (0 where not chosen), TCESS with k = the model's top-k. Pick the
domain with `--domain` (statistics `restricted` to it); with several, their tokens are pooled."""

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class PreMoe(ScoringMethod):
    name = "premoe"
    summary = "keep the experts with the largest expected selection score (TCESS) on the chosen domain"

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        tokens = stats.token_total(halves=target.halves)
        return stats.total("premoe_sums", halves=target.halves) / max(tokens, 1.0)
