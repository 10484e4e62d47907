"""The interface every compression method implements, and the selection rule of the pruning ones.

Shape legend: E routed experts of a layer, E' kept.

A method turns one MoE layer's view and its calibration statistics into a `LayerDecision`: the
`LayerEdit` the writer applies, the experts kept, and (for scoring methods) each expert's score.
It never opens a file. `Target` says what the layer must come down to; feasibility (E' >= top_k,
E' a multiple of n_group, protected experts that fit) is checked by `plan_target` before any
calibration runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from moelab.compress.stats import LayerStats
from moelab.hf.edit import LayerEdit
from moelab.hf.view import MoELayerView, RouterView
from moelab.nn.routers import check_groups


@dataclass(frozen=True)
class Target:
    """What one layer must come down to. keep: E' experts (for a method that narrows experts, the
    experts' worth of parameters kept, which may be fractional: `share_kept`); protect: original
    ids that must stay (super experts); halves: the halves of the calibration data to use ((0, 1):
    all). To decide on some calibration sources only, pass the statistics `restricted` to them."""

    keep: int | float
    protect: frozenset[int] = frozenset()
    halves: tuple[int, ...] = (0, 1)

    def on_half(self, half: int) -> Target:
        return Target(self.keep, self.protect, (half,))


@dataclass
class LayerDecision:
    """edit: what the writer does; kept: the original ids kept unchanged (in order); scores: [E]
    each expert's importance (higher = kept first), None for methods that do not score; notes:
    method-specific facts for the report (a search's budget, its loss, ...); merge_groups: the
    groups of original ids merged into one expert each (merging methods)."""

    edit: LayerEdit
    kept: list[int]
    scores: list[float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    merge_groups: list[list[int]] = field(default_factory=list)

    @classmethod
    def merged(cls, edit: LayerEdit, notes: dict[str, Any] | None = None) -> LayerDecision:
        """The decision of a merging method: every group of `edit.sources` becomes one expert."""
        groups = [list(g) for g in edit.sources]
        return cls(
            edit, [g[0] for g in groups if len(g) == 1], None, notes or {}, [g for g in groups if len(g) > 1]
        )


class Method:
    """A compression method. name: its registry name; needs: the observers
    (`moelab.compress.observers`) whose statistics it reads; needs_weights: whether it reads the
    layer's tensors (the others get a view of the shapes only, read from the shard headers);
    requires: the statistics it cannot decide a layer without among those an observer may leave
    unread (`PARTIAL`): a calibration for it stops at the first layer that lacks one."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("routing",)
    requires: ClassVar[tuple[str, ...]] = ()
    needs_weights: ClassVar[bool] = False  # decide() reads the layer's tensors, not only its settings
    merges: ClassVar[bool] = False  # its edits merge groups of experts into one each
    narrows: ClassVar[bool] = False  # its edits keep every expert and remove neurons inside them

    @property
    def changes_width(self) -> bool:
        """Its edits give the routed experts another hidden width."""
        return False

    @property
    def keeps_count(self) -> bool:
        """Its edits keep every expert (they narrow them): the expert count stays."""
        return self.narrows

    @property
    def fits_routers(self) -> bool:
        """Its decisions re-calibrate routers on the sampled MoE inputs (`moelab.compress.router_fit`)."""
        return False

    def check_router(self, router: RouterView, where: str = "") -> None:
        """Refuse, before any calibration, a router this method's edits cannot be written for."""

    def check_width(self, hidden_dim: int, num_experts: int, keep: float, where: str = "") -> None:
        """For a method that narrows experts (with these options): refuse, before any calibration,
        to keep `keep` experts' worth of the E experts' `hidden_dim` neurons where its edits could
        not."""

    def check_matrices(self, dim: int, hidden_dim: int, where: str = "") -> None:
        """Refuse, before any calibration, expert matrices of hidden_dim x dim (gate, up) and
        dim x hidden_dim (down) that these options could not make smaller."""

    def check_protection(self, where: str = "") -> None:
        """Refuse, before any calibration, to protect (super) experts where its edits cannot keep
        them whole."""

    def settle(self, width_fixed: bool, align: int = 1) -> None:
        """Resolve automatic options for the checkpoint: width_fixed, its routed experts' width
        cannot change (the family's shared experts follow it); align, a narrowed width must be a
        multiple of it (the blocks of a quantized output)."""

    @property
    def rewrites(self) -> bool:
        """Its edits hold new expert tensors, not a subset of the old."""
        return self.merges or self.narrows

    def prepare(self, view, stats: dict[int, LayerStats], targets: dict[int, Target]) -> None:
        """Called with the model's view (shapes only unless `needs_weights`) and every layer's
        statistics before the per-layer decisions (a method that ranks or chooses across layers
        does it here)."""

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's settings, for the report."""
        return {}


class ScoringMethod(Method):
    """Score every expert of a layer and keep the highest (`select_top`). data_driven: the
    scores come from the calibration data (so the kept set's stability across the data's halves
    means something)."""

    data_driven: ClassVar[bool] = True

    def score(self, layer: MoELayerView, stats: LayerStats, target: Target) -> Tensor:
        """[E] float64 importance of each expert."""
        raise NotImplementedError

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        scores = self.score(layer, stats, target).double()
        if scores.shape != (layer.router.num_experts,) or not torch.isfinite(scores).all():
            raise ValueError(
                f"{self.name}: layer {layer.index} scores are not {layer.router.num_experts} finite numbers"
            )
        kept = select_top(scores, target.keep, target.protect, layer.router.n_group)
        return LayerDecision(LayerEdit.keep(kept), kept, scores.tolist())


def select_top(
    scores: Tensor, keep: int, protect: frozenset[int] = frozenset(), n_group: int = 1
) -> list[int]:
    """The `keep` experts with the highest scores ([E]), protected ones first; with group-limited
    routing, keep/n_group from every group. Ties go to the lower id. Sorted ids."""
    E = scores.shape[0]
    size, per_group = E // n_group, keep // n_group
    kept: list[int] = []
    for group in range(n_group):
        ids = range(group * size, (group + 1) * size)
        ranked = sorted(ids, key=lambda e: (e not in protect, -float(scores[e]), e))
        kept += ranked[:per_group]
    return sorted(kept)


def experts_worth_kept(E: int, ratio: float, where: str = "") -> int:
    """E - int(E * ratio): what removing `ratio` of E experts (or of their parameters) keeps,
    refused unless it removes at least one expert's worth."""
    if not 0 < ratio < 1:
        raise ValueError(f"the ratio of experts to remove must lie in (0, 1), got {ratio}")
    removed = int(E * ratio + 1e-9)
    if removed < 1:
        raise ValueError(
            f"{where}removing {ratio:.0%} of {E} experts removes none (int({E} x {ratio}) = 0); raise the ratio to "
            f"at least {_ratio(1, E)}"
        )
    return E - removed


def share_kept(E: int, ratio: float) -> float:
    """E (1 - ratio): the experts' worth of parameters a method that narrows experts keeps when it
    removes `ratio` of them (neurons, so not rounded to whole experts)."""
    if not 0 < ratio < 1:
        raise ValueError(f"the ratio of parameters to remove must lie in (0, 1), got {ratio}")
    return E * (1 - ratio)


def plan_target(router: RouterView, ratio: float, where: str = "") -> int:
    """E' for removing `ratio` of a layer's experts (int(E * ratio) of them, at least one), checked
    against the router: E' plus its identity experts >= top_k, E' a multiple of n_group (every group
    keeping the same number), and at least 2 per group where a group is scored by its two best
    (`RouterView.min_group_size`); where not, the error names the nearest numbers that work."""
    E, k, n_group, Z = router.num_experts, router.top_k, router.n_group, router.identity_experts
    keep = experts_worth_kept(E, ratio, where)
    removed = E - keep
    if keep + Z < k:
        advice = (
            f"remove at most {E + Z - k} (ratio <= {(E + Z - k) / E:.4g})"
            if k < E + Z
            else "its router picks every expert (top_k = E), so no expert can go: narrow them instead (method heapr)"
        )
        identity = f" (beside its {Z} identity experts)" if Z else ""
        raise ValueError(
            f"{where}removing {removed} of {E} experts leaves {keep}{identity}, fewer than the {k} the router picks "
            "per token; " + advice
        )
    if n_group > 1 and Z:
        raise ValueError(
            f"{where}its expert groups span the {Z} identity experts, which cannot lose any: no expert can go; "
            "narrow them instead (method heapr)"
        )
    problem = _groups_problem(router, keep) if n_group > 1 else None
    if problem is not None:
        closest = sorted(sorted((r for r in range(1, E) if _groups_problem(router, E - r) is None), key=lambda r: abs(r - removed))[:2])
        advice = (
            f"remove {' or '.join(str(r) for r in closest)} experts (ratio {' or '.join(_ratio(r, E) for r in closest)})"
            if closest
            else f"no number of removed experts leaves every group enough for the routing (top_k={k}, "
            f"topk_group={router.topk_group}); this layer cannot lose experts"
        )
        if keep % n_group:
            problem = f"group-limited routing splits the {E} experts into n_group={n_group} groups, so the {keep} kept must be a multiple of {n_group}"
        else:
            problem = f"keeping {keep} of {E} experts: {problem}"
        raise ValueError(f"{where}{problem}; {advice}")
    return keep


def _ratio(removed: int, E: int) -> str:
    """removed / E to 4 significant digits, rounded up where rounding to nearest would give a
    ratio that removes one expert fewer (int(E * ratio) = removed - 1: 1/3 -> 0.3334, not 0.3333)."""
    text = f"{removed / E:.4g}"
    if int(E * float(text) + 1e-9) != removed:
        scale = 10 ** (3 - math.floor(math.log10(removed / E)))
        text = f"{math.ceil(removed / E * scale) / scale:.4g}"
    return text


def _groups_problem(router: RouterView, keep: int) -> str | None:
    """Why `keep` experts cannot be split into the router's groups (`check_groups`), None if they can."""
    try:
        check_groups(keep, router.top_k, router.n_group, router.topk_group, router.min_group_size)
    except ValueError as err:
        return str(err)
    return None


def super_expert_ids(layers: dict[int, LayerStats]) -> dict[int, list[int]]:
    """{layer: routed experts} the Super Experts rule (`moelab.analyze.stats.super_experts`) flags
    from the calibration's largest expert outputs; shared experts are never dropped anyway."""
    from moelab.analyze.stats import super_experts

    if any(s.max_output is None for s in layers.values()):
        raise ValueError("protecting super experts needs the 'outputs' statistics; calibrate with them")
    shared = {
        i: s.shared_max for i, s in layers.items() if s.shared_max is not None and float(s.shared_max.max()) > 0
    }
    found = super_experts({i: s.max_output for i, s in layers.items()}, shared)
    protect: dict[int, list[int]] = {}
    for entry in found["super_experts"]:
        if entry["expert"] >= 0:
            protect.setdefault(entry["layer"], []).append(entry["expert"])
    return {i: sorted(ids) for i, ids in protect.items()}


def check_protected(router: RouterView, keep: int, protect: frozenset[int], where: str = "") -> None:
    """The protected experts fit in what a layer keeps (per group with group-limited routing)."""
    size, per_group = router.num_experts // router.n_group, keep // router.n_group
    for group in range(router.n_group):
        inside = sorted(e for e in protect if group * size <= e < (group + 1) * size)
        if len(inside) > per_group:
            scope = f"group {group}" if router.n_group > 1 else "the layer"
            raise ValueError(
                f"{where}{len(inside)} protected experts {inside} in {scope}, but it keeps only {per_group}; "
                "remove fewer experts, or do not protect super experts"
            )
