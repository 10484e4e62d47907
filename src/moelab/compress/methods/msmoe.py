"""M-SMoE (Li et al., ICLR 2024, "Merge, Then Compress"): the most used experts of a layer are
dominant; every other expert joins the dominant expert whose router logits it resembles most
(cosine over the calibration tokens); each group's hidden neurons are aligned to its dominant
expert (weight matching, `linear_sum_assignment`) and the group is averaged, weighted by usage
frequency. The merged expert keeps its dominant expert's router row.

The alignment's reference is the dominant expert, the one the members are averaged into (as in
REAP's port); the paper's Switch pipeline aligns every expert to expert 0 of its layer beforehand
(members then meet only through expert 0), and its Mixtral path aligns nothing (`align=False`).

moelab allocates the same number of groups in every layer (the paper's global allocation gives
layers different expert counts, which no target format stores) and merges within each routing
group of group-limited routers. `mc_rank` adds MC-SMoE's compression of the merged experts
without its distillation: each merged matrix replaced by its best rank-r approximation plus the
`mc_sparse` fraction of its residual's rows of largest norm (the paper's row-structured S; written
at full width; the report gives the factored parameter count).
"""

from __future__ import annotations

from moelab.compress.merging import logit_similarity, merged_layer, router_groups
from moelab.compress.methods.base import LayerDecision, Method, Target
from moelab.compress.methods.lowrank import check_rank_saves, compact_notes, low_rank_sparse
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView


class MSMoE(Method):
    name = "m_smoe"
    summary = "merge each expert into the dominant (most used) expert with the most similar router logits"
    needs = ("routing",)
    needs_weights = True
    merges = True

    def __init__(self, align: bool = True, mc_rank: int | None = None, mc_sparse: float = 0.1):
        if mc_rank is not None and mc_rank < 1:
            raise ValueError(f"m_smoe mc_rank must be >= 1 (or None for no low-rank step), got {mc_rank}")
        if not 0 <= mc_sparse <= 1:
            raise ValueError(f"m_smoe mc_sparse must lie in [0, 1] (a fraction of the residual entries), got {mc_sparse}")
        self.align, self.mc_rank, self.mc_sparse = align, mc_rank, mc_sparse

    def options(self):
        return {"align": self.align, "mc_rank": self.mc_rank, "mc_sparse": self.mc_sparse}

    def check_matrices(self, dim: int, hidden_dim: int, where: str = "") -> None:
        if self.mc_rank is not None:
            check_rank_saves("mc_rank", self.mc_rank, dim, hidden_dim, self.mc_sparse, where)

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        counts = stats.total("counts", halves=target.halves)
        similarity = logit_similarity(stats.gram(target.halves))
        per_group = target.keep // layer.router.n_group
        groups = []
        for members in router_groups(layer.router):
            ranked = sorted(members, key=lambda e: (e not in target.protect, -float(counts[e]), e))
            dominant = ranked[:per_group]
            joined = {d: [d] for d in dominant}
            for e in ranked[per_group:]:
                best = max(dominant, key=lambda d: (float(similarity[e, d]), -d))
                joined[best].append(e)
            groups += [joined[d] for d in sorted(dominant)]
        edit = merged_layer(layer, groups, counts, router_rule="dominant", align=self.align)
        if self.mc_rank is None:
            return LayerDecision.merged(edit)
        edit, factored = low_rank_sparse(edit, self.mc_rank, self.mc_sparse)
        return LayerDecision.merged(edit, compact_notes(edit, factored))
