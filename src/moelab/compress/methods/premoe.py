"""PreMoe-style task-conditioned pruning (Pei et al., 2025): keep the experts with the largest
expected selection score on the chosen domain's tokens, the mean over tokens of the raw router
logit of each chosen expert (0 where not chosen), TCESS with k = the model's top-k. Pick the
domain with `--domain` (statistics `restricted` to it); with several, their tokens are pooled.

An expert no token of the domain chose ranks below every chosen one (its score is set below
theirs): with raw logits its 0 would otherwise rank above chosen experts whose logits average
negative (sigmoid routers' often do), which keeps experts the domain never uses and drops ones it
uses (the paper's score is an expected *selection* score; the shipped code does not guard this)."""

import torch

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class PreMoe(ScoringMethod):
    name = "premoe"
    summary = "keep the experts with the largest expected selection score (TCESS) on the chosen domain"

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        tokens = stats.token_total(halves=target.halves)
        tcess = stats.total("premoe_sums", halves=target.halves).double() / max(tokens, 1.0)
        chosen = stats.total("counts", halves=target.halves) > 0
        if chosen.any():
            tcess = torch.where(chosen, tcess, tcess[chosen].min() - 1.0)
        return tcess
