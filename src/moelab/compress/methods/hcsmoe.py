"""HC-SMoE (Chen et al., ICML 2025): cluster a layer's experts by what they compute, the mean
output of each expert over calibration tokens (every expert on every token: its characteristic
activation), with hierarchical agglomerative clustering (average linkage, Euclidean distance, as
the paper's main setting; `linkage` chooses another) into E' clusters; merge each cluster by
usage-frequency-weighted averaging. The merged expert's router row is the members'
frequency-weighted average. Protected (super) experts stay unmerged, each a cluster of its own, and
the others are clustered into the remaining count (`sparing_labels`).

The activations come from the calibration's sampled block inputs (`--sample-tokens`, 1,024 by
default) rather than all calibration tokens, which keeps the dense pass bounded. With
group-limited routing each routing group is clustered on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage

from moelab.compress.merging import (
    ROUTER_RULES,
    expert_features,
    fits_router_rows,
    merged_layer,
    router_groups,
)
from moelab.compress.methods.base import LayerDecision, Method, Target
from moelab.compress.stats import LayerStats
from moelab.hf.view import MoELayerView, RouterView

LINKAGES = ("average", "single", "complete", "ward")


class HCSMoE(Method):
    name = "hc_smoe"
    summary = "cluster experts by their mean outputs (hierarchical, average linkage) and merge each cluster"
    needs = ("routing", "inputs")
    needs_weights = True
    merges = True

    def __init__(self, linkage: str = "average", router_rule: str = "weighted"):
        if linkage not in LINKAGES:
            raise ValueError(f"hc_smoe linkage must be one of {LINKAGES}, got {linkage!r}")
        if router_rule not in ROUTER_RULES:
            raise ValueError(f"hc_smoe router_rule must be one of {ROUTER_RULES}, got {router_rule!r}")
        self.linkage, self.router_rule = linkage, router_rule

    def options(self):
        return {"linkage": self.linkage, "router_rule": self.router_rule}

    def check_router(self, router: RouterView, where: str = "") -> None:
        if self.router_rule == "fit" and not fits_router_rows(router):
            scores = "caps its logits" if router.score_func == "softmax" else f"scores with {router.score_func}"
            raise ValueError(
                f"{where}hc_smoe's router_rule='fit' fits each merged expert a row whose softmax probability is its "
                f"members' joint one, but this router {scores}; use router_rule=weighted or dominant"
            )

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        features = expert_features(layer, _inputs(stats, self.name)).double()
        counts = stats.total("counts", halves=target.halves)
        per_group = target.keep // layer.router.n_group
        groups = []
        for members in router_groups(layer.router):
            labels = sparing_labels(
                features[members].numpy(), per_group, [e in target.protect for e in members],
                lambda points, k: hierarchical_labels(points, k, self.linkage),
            )  # fmt: skip
            groups += clusters_by_usage(members, labels, counts, target.protect)
        edit = merged_layer(
            layer, groups, counts, router_rule=self.router_rule, inputs=stats.inputs, router_inputs=stats.router_inputs
        )
        return LayerDecision.merged(edit)


def hierarchical_labels(points: np.ndarray, k: int, method: str) -> np.ndarray:
    """[n] the cluster of each of points [n, d] when agglomerative clustering (Euclidean distance,
    `method` linkage) has merged them into k clusters."""
    return cut_tree(linkage(points, method=method), n_clusters=k)[:, 0]


def sparing_labels(
    points: np.ndarray, k: int, protected: list[bool], cluster: Callable[[np.ndarray, int], np.ndarray]
) -> np.ndarray:
    """[n] the cluster of each of points [n, d], k clusters in all: each protected point alone, the
    others clustered by `cluster(points, k)` into the k - p left (p protected points; where p = k,
    each joins the nearest protected point, Euclidean, the first of equals)."""
    protected = np.asarray(protected, dtype=bool)
    p, rest = int(protected.sum()), ~protected
    labels = np.empty(len(points), dtype=np.int64)
    labels[protected] = np.arange(p)
    if k - p >= rest.sum():
        labels[rest] = p + np.arange(rest.sum())
    elif k > p:
        labels[rest] = p + cluster(points[rest], k - p)
    else:
        distances = ((points[rest][:, None] - points[protected][None]) ** 2).sum(-1)
        labels[rest] = distances.argmin(1)
    return labels


def clusters_by_usage(members, labels, counts, protect) -> list[list[int]]:
    """The clusters of `members` (one label each), each led by its most used (or protected)
    expert, ordered by their leaders. A cluster holding two protected experts is an error."""
    clusters: dict[int, list[int]] = {}
    for e, label in zip(members, labels):
        clusters.setdefault(int(label), []).append(e)
    led = []
    for cluster in clusters.values():
        if sum(e in protect for e in cluster) > 1:
            raise ValueError(
                f"protected experts {sorted(e for e in cluster if e in protect)} fell into one cluster; merge fewer"
            )
        led.append(sorted(cluster, key=lambda e: (e not in protect, -float(counts[e]), e)))
    return sorted(led, key=lambda g: g[0])


def _inputs(stats: LayerStats, name: str):
    x = stats.inputs
    if x is None or x.numel() == 0 or not (x != 0).any():
        raise ValueError(f"{name} needs sampled layer inputs; calibrate with sample_tokens > 0")
    return x
