"""moelab's recipe (`--method moelab`), built from what the compression bench shows: no single
expert score wins on every model; the layer's own output is the best judge of a kept set; merging
everything (HC-SMoE) costs more than it saves, but folding a dropped expert into a close kept one
can help where it lowers the layer's error; and at the same parameter budget, narrowing every
expert (HEAPr) can keep far more than removing experts.

Two strategies, judged by the relative squared error  sum ||y - y'||^2 / sum ||y||^2  of each
edited layer's output y' against the original's y on the sampled layer inputs x [N, D]:

- "experts" (remove `ratio` of the experts), per MoE layer:
  1. protect the super experts (the Super Experts rule on the calibration's largest outputs), as
     far as the kept count allows;
  2. candidates: the kept sets of REAP, EAN, soft counts, frequency, EASY-EP and router-weight
     scores, and NAEE's search; the one with the lowest error wins;
  3. fold: every dropped expert, most used first, is tried merged into its nearest kept expert
     (mean outputs over x, HC-SMoE's features; same routing group), neurons aligned to the kept
     one, in six variants: its share of the merge (its usage, 10 % or 30 %) times the router row
     (the kept expert's, M-SMoE's dominant rule, or for softmax routers a row fitted to the pair's
     joint probability); the best variant stays when it lowers the error.
- "neurons" (remove `ratio` of the routed experts' parameters): HEAPr's uniform layout.

"auto" (default) runs both on every layer and keeps the one with the lower summed error (one
expert count and one width per model: no format stores a mix), except where the family's shared
experts take their width from the routed ones' (then "experts"). Last, the router is
re-calibrated (`moelab.compress.router_fit`, `fit_steps` Adam steps; 0: off). The errors are
measured on the same sample the choices are made on; the router fit keeps only what improves
its held-out quarter.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from moelab.compress.merging import aligned_to, expert_features, merged_layer, router_groups
from moelab.compress.methods.base import LayerDecision, Method, Target, check_protected, super_expert_ids
from moelab.compress.methods.ean import EAN
from moelab.compress.methods.easy_ep import EasyEP
from moelab.compress.methods.frequency import Frequency
from moelab.compress.methods.heapr import HEAPr
from moelab.compress.methods.naee import NAEE
from moelab.compress.methods.reap import REAP
from moelab.compress.methods.router_weight import RouterWeight
from moelab.compress.methods.soft_count import SoftCount
from moelab.compress.router_fit import RouterFit, refit_router
from moelab.compress.stats import LayerStats
from moelab.hf.edit import LayerEdit, apply_edit, moe_output
from moelab.hf.view import MoELayerView

CANDIDATES = (REAP, EAN, SoftCount, Frequency, EasyEP, RouterWeight)


def _layer_error(layer: MoELayerView, stats: LayerStats):
    """error(edit) -> the relative squared error  sum ||y - y'||^2 / sum ||y||^2  of the edited
    layer's output y' against the original's y on the sampled layer inputs (float64)."""
    x = stats.inputs
    if x is None or x.numel() == 0 or not (x != 0).any():
        raise ValueError("moelab's recipe needs sampled layer inputs; calibrate with sample_tokens > 0")
    x = x.double()
    reference = moe_output(layer, x)
    scale = float(reference.pow(2).sum())

    def error(edit: LayerEdit) -> float:
        edited = (
            moe_output(layer, x, keep=edit.selection)
            if edit.view is None
            else moe_output(apply_edit(layer, edit), x)
        )
        return float((reference - edited).pow(2).sum()) / scale

    return error


STRATEGIES = ("auto", "experts", "neurons")


class MoelabRecipe(Method):
    name = "moelab"
    summary = (
        "moelab's recipe: remove experts (the kept set the layer output prefers among every score's and NAEE's, "
        "super experts protected, dropped experts folded in where that helps) or narrow them (HEAPr), whichever "
        "reproduces the layers better, then re-calibrate the router"
    )
    needs_weights = True
    merges = True

    def __init__(
        self,
        strategy: str = "auto",
        fold: bool = True,
        fit_steps: int = 50,
        fit_lr: float = 1e-3,
        protect_super: bool = True,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"moelab strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy, self.fold, self.protect_super = strategy, fold, protect_super
        self.fit = RouterFit(fit_steps, fit_lr)
        self.needs = ("routing", "outputs", "contribution", "inputs") + (
            ("neurons",) if strategy != "experts" else ()
        )
        self.heapr = HEAPr(layout="uniform")
        self.protected: dict[int, list[int]] = {}
        self.errors: dict[str, float] = {}  # the strategies' summed layer errors (auto)
        self._pruned: dict[int, tuple[LayerEdit, dict]] = {}

    def options(self):
        return {
            "strategy": self.strategy,
            "fold": self.fold,
            "fit_steps": self.fit.steps,
            "fit_lr": self.fit.lr,
            "protect_super": self.protect_super,
        }

    @property
    def changes_width(self) -> bool:
        return self.strategy == "neurons"

    def settle(self, width_fixed: bool) -> None:
        """Narrower experts need their own width in the config; where shared experts share it,
        "auto" removes experts."""
        if width_fixed and self.strategy == "auto":
            self.strategy = "experts"

    def prepare(self, view, stats: dict[int, LayerStats], targets: dict[int, Target]) -> None:
        """Super experts; with "auto", both strategies on every layer, and the one with the lower
        summed layer error (the expert path's decisions are kept for `decide`)."""
        self.protected = super_expert_ids(stats) if self.protect_super else {}
        if self.strategy != "auto":
            return
        errors = {"experts": 0.0, "neurons": 0.0}
        for index in sorted(targets):
            layer, target = view.layer(index), targets[index]
            error = _layer_error(layer, stats[index])
            self._pruned[index] = self._remove_experts(layer, stats[index], target, error)
            errors["experts"] += self._pruned[index][1]["error"]
            errors["neurons"] += error(self.heapr.decide(layer, stats[index], target).edit)
        self.errors = errors
        self.strategy = min(errors, key=lambda k: (errors[k], k))

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        if self.strategy == "neurons":
            decision = self.heapr.decide(layer, stats, target)
            decision.notes["error"] = _layer_error(layer, stats)(decision.edit)
        else:
            if layer.index not in self._pruned:
                self._pruned[layer.index] = self._remove_experts(
                    layer, stats, target, _layer_error(layer, stats)
                )
            edit, notes = self._pruned.pop(layer.index)
            decision = LayerDecision.merged(edit, notes)
        decision.notes["strategy"] = self.strategy
        if self.errors:
            decision.notes["strategy_errors"] = self.errors
        if self.fit.steps:
            decision.edit, decision.notes["router_fit"] = refit_router(
                layer, decision.edit, stats.inputs, self.fit
            )
        return decision

    def _remove_experts(
        self, layer: MoELayerView, stats: LayerStats, target: Target, error
    ) -> tuple[LayerEdit, dict]:
        """The expert path: the best candidate kept set, then the folds (edit, notes)."""
        target = self._with_super_experts(layer, target)
        candidates = {cls.name: cls().decide(layer, stats, target).kept for cls in CANDIDATES}
        candidates[NAEE.name] = NAEE().decide(layer, stats, target).kept
        errors = {name: error(LayerEdit.keep(kept)) for name, kept in candidates.items()}
        chosen = min(errors, key=lambda name: (errors[name], name))
        edit, best = LayerEdit.keep(candidates[chosen]), errors[chosen]
        notes = {"candidate_errors": errors, "chosen": chosen, "protected": sorted(target.protect)}
        if self.fold:
            edit, best, notes["folded"] = self._fold(
                layer, stats, candidates[chosen], stats.inputs.double(), error, best
            )
        notes["error"] = best
        return edit, notes

    def _with_super_experts(self, layer: MoELayerView, target: Target) -> Target:
        """The target with this layer's super experts protected too, unless they do not fit."""
        protect = target.protect | frozenset(self.protected.get(layer.index, ()))
        try:
            check_protected(layer.router, target.keep, protect)
        except ValueError:
            return target
        return dataclasses.replace(target, protect=protect)

    def _fold(self, layer, stats, kept: list[int], x: Tensor, error, best: float):
        """(edit, its error, [[kept expert, dropped expert, variant], ...] folds that stayed).
        Variants of one fold: the dropped expert's share of the merge (its usage, or 10 % or 30 %
        of the pair) and the router row (the kept expert's, or for softmax routers the row fitted
        to the pair's joint probability, `merged_layer`'s "fit" rule); the best one is tried."""
        counts = stats.total("counts").double().clamp(min=1e-9)
        features = expert_features(layer, x)
        group_of = {e: g for g, members in enumerate(router_groups(layer.router)) for e in members}
        rules = ("dominant", "fit") if layer.router.score_func == "softmax" else ("dominant",)
        groups, weights = {e: [e] for e in kept}, counts.clone()
        edit, folded = LayerEdit.keep(kept), []
        dropped = [e for e in range(layer.router.num_experts) if e not in groups]
        nearest = {
            d: min(
                (e for e in kept if group_of[e] == group_of[d]),
                key=lambda e: (float((features[e] - features[d]).norm()), e),
            )
            for d in dropped
        }
        aligned = dataclasses.replace(
            layer, experts=aligned_to(layer.experts, nearest)
        )  # once, not per trial
        for d in sorted(dropped, key=lambda e: (-float(counts[e]), e)):
            j = nearest[d]
            trial_groups = {e: members + [d] if e == j else members for e, members in groups.items()}
            trials = []
            for share in ("usage", 0.1, 0.3):
                w = weights.clone()
                w[d] = counts[d] if share == "usage" else weights[j] * share / (1 - share)
                for rule in rules:
                    trial = merged_layer(aligned, list(trial_groups.values()), w, router_rule=rule, inputs=x)
                    trials.append((error(trial), f"{share}/{rule}", trial, w))
            trial_error, variant, trial, w = min(trials, key=lambda t: t[0])
            if trial_error < best:
                groups, weights, edit, best = trial_groups, w, trial, trial_error
                folded.append([j, d, variant])
        return edit, best, folded
