"""Random pruning: a baseline that keeps a uniformly random set of experts (seeded per layer)."""

import torch

from moelab.compress.methods.base import ScoringMethod, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class RandomPrune(ScoringMethod):
    name = "random"
    summary = "keep a random set of experts (a baseline; seed 0, one stream per layer)"
    data_driven = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target):
        return torch.rand(
            layer.router.num_experts, generator=torch.Generator().manual_seed(self.seed + layer.index)
        )

    def options(self):
        return {"seed": self.seed}
