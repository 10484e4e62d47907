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
     one, in six variants: its weight in the merge (its usage, or 10 % or 30 % of a pair with
     the kept expert's own weight; a second fold into the same expert adds to the group) times
     the router row (the kept expert's, M-SMoE's dominant rule, or for softmax routers a row
     fitted to the pair's joint probability); the best variant stays when it lowers the error.
- "neurons" (remove `ratio` of the routed experts' parameters): HEAPr's uniform layout, then
  every expert's down projection refitted by ridge least squares so that its kept neurons make
  up for the pruned ones on the sampled tokens routed to it (`compensated`), where that lowers
  the error.

"auto" (default) runs both on every layer (the expert path before its folds, which only lower
its error) and keeps the one with the lower summed error (one
expert count and one width per model: no format stores a mix), except where the family's shared
experts take their width from the routed ones', where experts are protected
(`--protect-super-experts`: the neuron path narrows every expert alike) or where the uniform width
would keep every neuron; then "experts". Last, the router is
re-calibrated on the expert path (`moelab.compress.router_fit`, `fit_steps` Adam steps; 0: off;
on the neuron path it found nothing to gain on the reference models, where the refitted down
projections already reproduce the layer). The errors are
measured on the same sample the choices are made on; the router fit keeps only what improves
its held-out quarter.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from moelab.compress.merging import aligned_to, expert_features, fits_router_rows, merged_layer, router_groups
from moelab.compress.methods.base import LayerDecision, Method, Target, check_protected, super_expert_ids
from moelab.compress.methods.ean import EAN
from moelab.compress.methods.easy_ep import EasyEP
from moelab.compress.methods.frequency import Frequency
from moelab.compress.methods.heapr import HEAPr, uniform_width
from moelab.compress.methods.naee import NAEE
from moelab.compress.methods.reap import REAP
from moelab.compress.methods.router_weight import RouterWeight
from moelab.compress.methods.soft_count import SoftCount
from moelab.compress.router_fit import RouterFit, refit_router
from moelab.compress.stats import LayerStats
from moelab.hf.edit import LayerEdit, apply_edit, moe_output, one_expert, route_tokens
from moelab.hf.native import expert_input, experts_from_view, router_from_view
from moelab.hf.view import MoELayerView

CANDIDATES = (REAP, EAN, SoftCount, Frequency, EasyEP, RouterWeight)
NAEE_SKIP = 4.0


def compensated(
    layer: MoELayerView, narrowed: MoELayerView, x: Tensor, ids: Tensor | None = None, ridge: float = 1e-2
) -> MoELayerView:
    """`narrowed` with every expert's down projection refitted so that its kept neurons make up
    for the pruned ones: per expert e, over the sampled tokens routed to e (weights g, its combine
    weights), W' = argmin sum_t g_t^2 ||f_e(x_t) - b_e - W h_t||^2 + lam ||W - W_0||^2, h the
    narrowed expert's hidden activations, W_0 its down projection, lam = ridge x the mean diagonal
    of sum_t g_t^2 h_t h_t^T (float64, closed form). In a latent block the experts read down @ x
    and the fit is in the latent space, before the up projection; f_e is the expert's output before
    its output norm where it has one (Muse Spark's post_expert_norm, kept as it is). ids [N]: the
    sampled tokens' ids (`LayerStats.router_inputs`), which a hash router reads."""
    with torch.no_grad():
        return _compensated(layer, narrowed, x, ids, ridge)


def _compensated(
    layer: MoELayerView, narrowed: MoELayerView, x: Tensor, ids: Tensor | None, ridge: float
) -> MoELayerView:
    routing = route_tokens(router_from_view(layer.router).double(), x, ids)
    downs = []
    for e in range(layer.router.num_experts):
        rows, slots = (routing.indices == e).nonzero(as_tuple=True)
        W0 = narrowed.experts.down[e].double()
        if len(rows) == 0:
            downs.append(W0)
            continue
        xs, g = expert_input(layer, x[rows]), routing.weights[rows, slots].double()[:, None]
        full = experts_from_view(dataclasses.replace(one_expert(layer.experts, e), output_norm=None)).double()
        narrow = experts_from_view(one_expert(narrowed.experts, e)).double()
        bias = 0 if narrowed.experts.down_bias is None else narrowed.experts.down_bias[e].double()
        h, y = narrow.hidden(xs, [len(rows)]) * g, (full(xs, [len(rows)]) - bias) * g
        gram = h.T @ h
        lam = ridge * float(gram.diagonal().mean()) + 1e-12
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        downs.append(torch.linalg.solve(gram + lam * eye, h.T @ y + lam * W0.T).T)
    experts = dataclasses.replace(narrowed.experts, down=torch.stack(downs).to(narrowed.experts.down.dtype))
    return dataclasses.replace(narrowed, experts=experts)


def _layer_error(layer: MoELayerView, stats: LayerStats):
    """error(edit) -> the relative squared error  sum ||y - y'||^2 / sum ||y||^2  of the edited
    layer's output y' against the original's y on the sampled layer inputs (float64; y is computed
    on the first call, so a decision made earlier costs nothing)."""
    x = stats.inputs
    if x is None or x.numel() == 0 or not (x != 0).any():
        raise ValueError("moelab's recipe needs sampled layer inputs; calibrate with sample_tokens > 0")
    x, ids = x.double(), stats.router_inputs
    reference: list[Tensor] = []

    def error(edit: LayerEdit) -> float:
        if not reference:
            reference.append(moe_output(layer, x, ids=ids))
        edited = (
            moe_output(layer, x, keep=edit.selection, ids=ids)
            if edit.view is None
            else moe_output(apply_edit(layer, edit), x, ids=ids)
        )
        return float((reference[0] - edited).pow(2).sum() / reference[0].pow(2).sum())

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
        self.heapr = HEAPr(layout="uniform")
        self.protected: dict[int, list[int]] = {}
        self.errors: dict[str, float] = {}  # the strategies' summed layer errors (auto)
        self._kept: dict[int, tuple[list[int], dict]] = {}  # the choices made in prepare
        self._narrowed: dict[int, LayerDecision] = {}

    def options(self):
        return {
            "strategy": self.strategy,
            "fold": self.fold,
            "fit_steps": self.fit.steps,
            "fit_lr": self.fit.lr,
            "protect_super": self.protect_super,
        }

    @property
    def needs(self) -> tuple[str, ...]:
        """The neuron path needs the backward sweep's statistics (not once `settle` rules it out)."""
        neurons = ("neurons",) if self.strategy != "experts" else ()
        return ("routing", "outputs", "contribution", "inputs") + neurons

    @property
    def changes_width(self) -> bool:
        return self.strategy == "neurons"

    @property
    def keeps_count(self) -> bool:
        return self.strategy == "neurons"

    @property
    def fits_routers(self) -> bool:
        return self.fit.steps > 0 and self.strategy != "neurons"

    def check_width(self, hidden_dim: int, num_experts: int, keep: float, where: str = "") -> None:
        if self.strategy == "neurons":  # the neuron path is HEAPr's uniform layout
            self.heapr.check_width(hidden_dim, num_experts, keep, where)

    def check_protection(self, where: str = "") -> None:
        if self.strategy == "neurons":
            raise ValueError(
                f"{where}moelab's neuron path (strategy 'neurons') narrows every expert alike, so it cannot spare "
                "protected (super) experts; use strategy 'experts' or 'auto' (--option strategy=auto: it then removes "
                "experts), or drop the protection"
            )

    def settle(self, width_fixed: bool, align: int = 1) -> None:
        """Narrower experts need their own width in the config; where shared experts share it,
        "auto" removes experts. align: the neuron path's widths are multiples of it."""
        if width_fixed and self.strategy == "auto":
            self.strategy = "experts"
        self.heapr.settle(width_fixed=False, align=align)

    def prepare(self, view, stats: dict[int, LayerStats], targets: dict[int, Target]) -> None:
        """Super experts; with "auto", both strategies on every layer (the expert path before its
        folds, which only lower its error), and the one with the lower summed layer error. NAEE's
        search, the slow candidate, is skipped when the scores' best sets already lose to the
        neuron path by more than `NAEE_SKIP`x (it would have to beat them by that much)."""
        self.protected = super_expert_ids(stats) if self.protect_super else {}
        if self.strategy == "auto" and not self._narrowable(view, targets):
            self.strategy = "experts"
        if self.strategy != "auto":
            return
        errors = {"experts": 0.0, "neurons": 0.0}
        layers, scored = {}, {}
        for index in sorted(targets):
            layer, target = view.layer(index), targets[index]
            error = _layer_error(layer, stats[index])
            layers[index] = (layer, error)
            self._narrowed[index] = self._narrow(layer, stats[index], target, error)
            errors["neurons"] += self._narrowed[index].notes["error"]
            scored[index] = self._best_kept(layer, stats[index], target, error, search=False)
            errors["experts"] += scored[index][1]["error"]
        if errors["experts"] <= NAEE_SKIP * errors["neurons"]:  # close enough for NAEE to matter
            errors["experts"] = 0.0
            for index, (layer, error) in layers.items():
                scored[index] = self._best_kept(layer, stats[index], targets[index], error)
                errors["experts"] += scored[index][1]["error"]
        self.errors = errors
        self.strategy = min(errors, key=lambda k: (errors[k], k))
        if self.strategy == "experts":
            self._kept, self._narrowed = scored, {}

    def _narrowable(self, view, targets: dict[int, Target]) -> bool:
        """Whether the neuron path applies to every layer: no protected experts (it narrows every
        expert alike) and a uniform width that keeps some but not all neurons (read from the
        experts' shapes: their weights are not read)."""
        if any(target.protect for target in targets.values()):
            return False
        for index, target in targets.items():
            experts = view.layer(index, routed=False).experts
            try:
                uniform_width(experts.hidden_dim, experts.num_experts, target.keep, align=self.heapr.align)
            except ValueError:
                return False
        return True

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        error = _layer_error(layer, stats)
        if self.strategy == "neurons":
            decision = self._narrowed.pop(layer.index, None) or self._narrow(layer, stats, target, error)
        else:
            kept, notes = self._kept.pop(layer.index, None) or self._best_kept(layer, stats, target, error)
            edit = LayerEdit.keep(kept)
            if self.fold:
                x = stats.inputs.double()
                edit, notes["error"], notes["folded"] = self._fold(
                    layer, stats, kept, x, error, notes["error"]
                )
            decision = LayerDecision.merged(edit, notes)
            if self.fit.steps:
                decision.edit, notes["router_fit"] = refit_router(
                    layer, decision.edit, stats.inputs, self.fit, stats.router_inputs
                )
        decision.notes["strategy"] = self.strategy
        if self.errors:
            decision.notes["strategy_errors"] = self.errors
        return decision

    def _narrow(self, layer: MoELayerView, stats: LayerStats, target: Target, error) -> LayerDecision:
        """The neuron path: HEAPr's narrowed experts, with the down projections refitted
        (`compensated`) where that lowers the layer's error."""
        if target.protect:
            self.check_protection(f"layer {layer.index}: ")
        decision = self.heapr.decide(layer, stats, target)
        refit = LayerEdit(
            decision.edit.sources, compensated(layer, decision.edit.view, stats.inputs.double(), stats.router_inputs)
        )
        errors = {"heapr": error(decision.edit), "compensated": error(refit)}
        if errors["compensated"] < errors["heapr"]:
            decision.edit = refit
        decision.notes |= {"candidate_errors": errors, "error": min(errors.values())}
        return decision

    def _best_kept(
        self, layer: MoELayerView, stats: LayerStats, target: Target, error, search: bool = True
    ) -> tuple[list[int], dict]:
        """The expert path's kept set: the candidate with the lowest error (kept ids, notes);
        search: NAEE's search among the candidates."""
        target = self._with_super_experts(layer, target)
        # EASY-EP's statistic is missing where its observer cannot read the layer (several residual streams,
        # Qwen4-Exp's and Hunyuan 4's; a routed sum normed again, Gemma 4's): the other candidates remain
        usable = [cls for cls in CANDIDATES if cls is not EasyEP or stats.easyep_sums is not None]
        candidates = {cls.name: cls().decide(layer, stats, target).kept for cls in usable}
        if search:
            candidates[NAEE.name] = NAEE().decide(layer, stats, target).kept
        errors = {name: error(LayerEdit.keep(kept)) for name, kept in candidates.items()}
        chosen = min(errors, key=lambda name: (errors[name], name))
        notes = {"candidate_errors": errors, "chosen": chosen, "protected": sorted(target.protect)}
        return candidates[chosen], notes | {"error": errors[chosen]}

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
        Variants of one fold: the dropped expert's weight in the merge (its usage, or 10 % or 30 %
        of a pair with the kept expert's own weight) and the router row (the kept expert's, or
        for softmax routers the row fitted to the pair's joint probability, `merged_layer`'s
        "fit" rule); the best one is tried."""
        counts = stats.total("counts").double().clamp(min=1e-9)
        features = expert_features(layer, x)
        group_of = {e: g for g, members in enumerate(router_groups(layer.router)) for e in members}
        rules = ("dominant", "fit") if fits_router_rows(layer.router) else ("dominant",)
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
                    trial = merged_layer(
                        aligned, list(trial_groups.values()), w, router_rule=rule, inputs=x,
                        router_inputs=stats.router_inputs,
                    )  # fmt: skip
                    trials.append((error(trial), f"{share}/{rule}", trial, w))
            trial_error, variant, trial, w = min(trials, key=lambda t: t[0])
            if trial_error < best:
                groups, weights, edit, best = trial_groups, w, trial, trial_error
                folded.append([j, d, variant])
        return edit, best, folded
