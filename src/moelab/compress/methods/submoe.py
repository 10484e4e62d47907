"""Sub-MoE (Li, Zhu et al., 2025): cluster a layer's experts with K-means on their L2-normalised
mean outputs (cosine similarity of what they compute), then merge each cluster in a shared
subspace: for each matrix, the members' weights are concatenated along the input dimension,
W_cat = [W_1 ... W_m] = U S V^T (one SVD); V^T splits into one block of columns per member,
V_i^T = V^T[:, i*in:(i+1)*in], and the merged matrix is U_r S_r (sum_i w_i V_i^T)_r with
usage-frequency weights w_i. The router row is the members' weighted average.

The split takes column blocks, as the paper intends; a public re-implementation reshapes V^T
instead, which interleaves rows and gives a different (wrong) matrix. Without truncation
(`rank=None`) the merge equals plain frequency-weighted averaging, exactly; with `rank` r the
merged matrix is that average projected on the top-r left singular subspace of the group. The
result is written at full width (transformers has no factored expert layout); the report gives
the factored parameter count (a matrix counted whole where its factors would be larger). Clusters come from the calibration's sampled block inputs;
K-means is seeded (k-means++), and each routing group of group-limited routers is clustered on
its own. Protected (super) experts stay unmerged, as in HC-SMoE (`sparing_labels`), and are not
truncated either: a cluster led by one is merged at full rank (a protected expert alone: as it is),
and counted whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from moelab.compress.merging import expert_features, merged_layer, router_groups, scale_folded
from moelab.compress.methods.base import LayerDecision, Method, Target
from moelab.compress.methods.hcsmoe import _inputs, clusters_by_usage, sparing_labels
from moelab.compress.methods.lowrank import check_rank_saves, compact_notes
from moelab.compress.stats import LayerStats
from moelab.hf.edit import LayerEdit
from moelab.hf.view import MoELayerView


class SubMoE(Method):
    name = "sub_moe"
    summary = (
        "cluster experts by K-means on normalised mean outputs, merge each cluster in a shared SVD subspace"
    )
    needs = ("routing", "inputs")
    needs_weights = True
    merges = True

    def __init__(self, rank: int | None = None, seed: int = 0):
        if rank is not None and rank < 1:
            raise ValueError(f"sub_moe rank must be >= 1 (or None for no truncation), got {rank}")
        self.rank, self.seed = rank, seed

    def check_matrices(self, dim: int, hidden_dim: int, where: str = "") -> None:
        if self.rank is not None:
            check_rank_saves("rank", self.rank, dim, hidden_dim, where=where)

    def options(self):
        return {"rank": self.rank, "seed": self.seed}

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        features = expert_features(layer, _inputs(stats, self.name)).double()
        features = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
        counts = stats.total("counts", halves=target.halves)
        per_group = target.keep // layer.router.n_group
        groups = []
        for g, members in enumerate(router_groups(layer.router)):
            seed = self.seed + 1000 * layer.index + g
            labels = sparing_labels(
                features[members].numpy(), per_group, [e in target.protect for e in members],
                lambda points, k: kmeans_labels(points, k, seed),
            )  # fmt: skip
            groups += clusters_by_usage(members, labels, counts, target.protect)
        weights = counts.double()
        edit = merged_layer(layer, groups, weights, router_rule="weighted")  # router rows, and the average
        folded = scale_folded(layer)  # the merged experts' scale is 1 (`merged_layer`)
        ranks = [None if group[0] in target.protect else self.rank for group in groups]  # leaders: protected first
        merged = {name: subspace_merge(getattr(folded, name), groups, weights, ranks) for name in folded.matrices}
        experts = dataclasses.replace(
            edit.view.experts,
            **{name: t.to(getattr(layer.experts, name).dtype) for name, t in merged.items()},
        )
        view = dataclasses.replace(edit.view, experts=experts)
        edit = LayerEdit(edit.sources, view=view)
        notes = {} if self.rank is None else compact_notes(edit, _factored(layer, groups, ranks))
        return LayerDecision.merged(edit, notes)


def kmeans_labels(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """K-means (k-means++ starts, seeded) of points [n, d] into exactly k non-empty clusters:
    restarts with other seeds if a run leaves a cluster empty."""
    if k >= len(points):
        return np.arange(len(points))
    for attempt in range(20):
        _, labels = kmeans2(points, k, minit="++", seed=np.random.default_rng(seed + attempt), iter=50)
        if len(set(labels.tolist())) == k:
            return labels
    raise ValueError(f"K-means found fewer than {k} clusters in 20 tries; merge fewer experts")


def subspace_merge(
    weights_by_expert: torch.Tensor, groups, freq: torch.Tensor, rank: int | None | list[int | None]
) -> torch.Tensor:
    """[E', out, in]: each group's matrices merged in their shared left subspace (see the module
    docstring), truncated to `rank` (one for all groups, or one per group; None: not truncated, a
    group of one then its matrix as it is). weights_by_expert: [E, out, in]."""
    ranks = rank if isinstance(rank, list) else [rank] * len(groups)
    merged = []
    for group, rank in zip(groups, ranks, strict=True):
        if len(group) == 1 and rank is None:
            merged.append(weights_by_expert[group[0]])
            continue
        W = weights_by_expert[list(group)].double()  # [m, out, in]
        w = freq[list(group)].double()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(group))
        m, out, inp = W.shape
        U, S, Vh = torch.linalg.svd(torch.cat(list(W), dim=1), full_matrices=False)  # W_cat [out, m*in]
        blocks = Vh.reshape(-1, m, inp).permute(1, 0, 2)  # [m, r, in]: V_i^T = Vh[:, i*in:(i+1)*in]
        v = torch.einsum("m,mri->ri", w, blocks)
        r = S.numel() if rank is None else min(rank, S.numel())
        merged.append(((U[:, :r] * S[:r]) @ v[:r]).to(weights_by_expert.dtype))
    return torch.stack(merged)


def _factored(layer: MoELayerView, groups, ranks: list[int | None]) -> int:
    """Parameters of the groups' compact form: per matrix, U_r S_r (out x r) + V_merged (r x in),
    or the matrix itself (out x in) where that is smaller (r >= out in / (out + in)) or the group's
    rank is None (not truncated)."""
    E, I, D = layer.experts.up.shape
    shapes = {"gate": (I, D), "up": (I, D), "down": (D, I)}
    per_matrix = [shapes[name] for name in layer.experts.matrices]
    return sum(
        o * i if r is None else min(min(r, o, len(g) * i) * (o + i), o * i)
        for g, r in zip(groups, ranks, strict=True) for o, i in per_matrix
    )  # fmt: skip
