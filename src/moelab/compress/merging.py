"""Merging a layer's experts: groups of experts become one expert each, by frequency-weighted
averaging (after aligning their hidden neurons, optionally), with a router row per group.

Shape legend: E experts, E' groups, D model dim, I expert hidden dim, N sampled tokens.

Used by the merging methods (M-SMoE, HC-SMoE, Sub-MoE): they decide the groups and the weights;
`merged_layer` builds the edited layer view the writer writes and checks. transformers' formats
hold one router row per expert, so a merged expert gets one row: its dominant member's
("dominant", M-SMoE's centre) or the members' frequency-weighted average ("weighted"). With
group-limited routing every group of the router is merged on its own, so experts stay in their
router group (`router_groups`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from moelab.hf.edit import EXPERT_TENSORS, LayerEdit, one_expert, remapped_token_experts
from moelab.hf.native import expert_input, experts_from_view, routed_output, router_features
from moelab.hf.view import ExpertsView, MoELayerView, RouterView

ROUTER_RULES = ("dominant", "weighted", "fit")


def router_groups(router: RouterView) -> list[list[int]]:
    """The experts of each routing group (one group without group-limited routing)."""
    size = router.num_experts // router.n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(router.n_group)]


def expert_features(layer: MoELayerView, x: Tensor) -> Tensor:
    """[E, D] every expert's mean output over the tokens x [N, D] (HC-SMoE's characteristic
    activations: each expert run on every token, unweighted; in a latent block, projected up as the
    block's output; times the expert's own scale where the router has one, Gemma 4's, as a merge
    averages them: `scale_folded`), one expert at a time in float32."""
    z = expert_input(layer, x.float())
    scale = layer.router.expert_scale
    features = []
    with torch.no_grad():
        for e in range(layer.router.num_experts):
            expert = experts_from_view(one_expert(layer.experts, e)).float()
            mean = expert(z, [z.shape[0]]).mean(0)
            features.append(mean if scale is None else mean * scale[e].float())
    return routed_output(layer, torch.stack(features))


def scale_folded(layer: MoELayerView) -> ExpertsView:
    """The layer's experts with the router's per-expert scales (Gemma 4's `expert_scale`, which
    multiply each expert's output) folded into their down projections and biases [E, D, I], [E, D],
    in float64; the experts as they are without."""
    experts, scale = layer.experts, layer.router.expert_scale
    if scale is None:
        return experts
    s = scale.double()
    down_bias = None if experts.down_bias is None else experts.down_bias.double() * s[:, None]
    return dataclasses.replace(experts, down=experts.down.double() * s[:, None, None], down_bias=down_bias)


def logit_similarity(gram: Tensor) -> Tensor:
    """[E, E] M-SMoE's router-logit similarity, (cos + 1) / 2 of two experts' logit columns over
    the calibration tokens, from their Gram matrix sum_t z_t z_t^T [E, E]."""
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / (norms[:, None] * norms[None, :]) + 1) / 2


def alignment(reference: ExpertsView, other: ExpertsView) -> Tensor:
    """[I] the permutation of `other`'s hidden neurons that best matches `reference`'s (both one
    expert): maximise the summed inner products of gate rows (gated experts), up rows and down
    columns (`linear_sum_assignment`; float64, so ties are not an artefact of rounding). Applying
    it keeps the expert's function: out[:, perm] and rows[perm]."""

    def neuron_rows(expert: ExpertsView) -> list[Tensor]:
        rows = ([expert.gate[0]] if expert.gated else []) + [expert.up[0], expert.down[0].T]
        return [t.double() for t in rows]

    pairs = zip(neuron_rows(reference), neuron_rows(other))
    cost = sum(r @ o.T for r, o in pairs)  # [I, I]: similarity of reference neuron i, other neuron j
    _, perm = linear_sum_assignment(cost.numpy(), maximize=True)
    return torch.as_tensor(perm, dtype=torch.long)


def aligned_to(experts: ExpertsView, partners: dict[int, int]) -> ExpertsView:
    """The experts with each expert d of `partners` ({d: j}) having its hidden neurons permuted to
    match expert j's (`alignment`); the layer computes the same. Lets a caller align once and
    try many merges with align=False."""
    stacked = {name: getattr(experts, name) for name in EXPERT_TENSORS if getattr(experts, name) is not None}
    stacked = {name: t.clone() for name, t in stacked.items()}
    for d, j in partners.items():
        moved = _permuted(one_expert(experts, d), alignment(one_expert(experts, j), one_expert(experts, d)))
        for name in stacked:
            stacked[name][d] = getattr(moved, name)[0]
    return dataclasses.replace(experts, **stacked)


def merged_layer(
    layer: MoELayerView,
    groups: Sequence[Sequence[int]],
    weights: Tensor,
    *,
    router_rule: str = "weighted",
    align: bool = False,
    inputs: Tensor | None = None,
    router_inputs: Tensor | None = None,
) -> LayerEdit:
    """The edit that merges each of `groups` (lists of original ids, the first one the group's
    dominant member) into one expert: tensors averaged with `weights` [E] (usage frequencies;
    groups whose weights are all 0 average evenly), after aligning every member to the dominant
    one if `align`; router row by `router_rule`: "fit" (softmax routers) regresses, on the
    sampled block inputs `inputs` [N, D], a row whose logit follows the group's log-sum-exp of its
    members' logits, so the merged expert keeps the probability its members had together (on what
    the rows read: an MLP router's features of the inputs and of the router states handed to them,
    `router_inputs` [N, R], `LayerStats.router_inputs`), as the weighted average's row plus the
    smallest correction (`_fitted_row`). Where
    the router scales each expert's weight (Gemma 4's `expert_scale`), the members' scales are
    folded into their down projections before averaging (the scale multiplies the expert's output,
    linear in down) and the merged expert's scale is 1.
    Returns the LayerEdit (sources = the groups)."""
    if router_rule not in ROUTER_RULES:
        raise ValueError(f"router rule must be one of {ROUTER_RULES}, got {router_rule!r}")
    experts, router = layer.experts, layer.router
    merged: dict[str, list[Tensor]] = {
        name: [] for name in EXPERT_TENSORS if getattr(experts, name) is not None
    }
    rows: dict[str, list[Tensor]] = {
        n: [] for n in ("weight", "bias", "selection_bias") if getattr(router, n) is not None
    }
    for group in groups:
        w = weights[list(group)].double()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(group))
        members = [one_expert(experts, e) for e in group]
        if align:
            members = [members[0]] + [_permuted(m, alignment(members[0], m)) for m in members[1:]]
        for name in merged:
            stacked = torch.stack([getattr(m, name)[0].double() for m in members])
            if router.expert_scale is not None and name in ("down", "down_bias"):
                scale = router.expert_scale[list(group)].double()
                stacked = stacked * scale.view(-1, *[1] * (stacked.dim() - 1))
            merged[name].append(torch.einsum("m,m...->...", w, stacked))
        for name in rows:
            values = getattr(router, name)[list(group)].double()
            rows[name].append(
                values[0] if router_rule == "dominant" else torch.einsum("m,m...->...", w, values)
            )
        if router_rule == "fit":
            rows["weight"][-1], fitted_bias = _fitted_row(router, group, w, inputs, router_inputs)
            if "bias" in rows:
                rows["bias"][-1] = fitted_bias
    new_experts = dataclasses.replace(
        experts, **{n: torch.stack(v).to(getattr(experts, n).dtype) for n, v in merged.items()}
    )
    scale = None if router.expert_scale is None else router.expert_scale.new_ones(len(groups))  # folded into down
    rows = {n: torch.stack(v).to(getattr(router, n).dtype) for n, v in rows.items()}
    table = None if router.token_experts is None else remapped_token_experts(router, groups, rows["weight"])
    new_router = dataclasses.replace(router, expert_scale=scale, token_experts=table, **rows)
    view = dataclasses.replace(layer, router=new_router, experts=new_experts)
    return LayerEdit(tuple(tuple(g) for g in groups), view=view)


def fits_router_rows(router: RouterView) -> bool:
    """Whether the 'fit' router rule applies: softmax scores of logits linear in the row (a
    logit_scale s multiplies them; a softcap's tanh has no row for a group's joint mass)."""
    return router.score_func == "softmax" and router.logit_softcap is None


def _fitted_row(
    router: RouterView, group: Sequence[int], w: Tensor, x: Tensor | None, states: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(row [D], bias []) whose logit best matches, in least squares over x [N, D], the
    log-sum-exp of the group members' logits (their joint softmax mass, up to the normaliser);
    with a logit_scale s, the row's scaled logit the members' scaled ones (the target is
    logsumexp(s z) / s); the fit is on what the rows read (`router_features`): the normed x of a router
    with an input norm (Gemma 4's), the MLP's features [N, R] of x and the router states `states` of an
    MLP router (ZAYA's: the row is out_proj's). The fit is of the correction to the members'
    `w`-weighted average row [m] (and bias), smallest where the samples leave it free (fewer samples
    than the rows read, N < D + 1, as on real models): off the samples' span the row stays the
    average, and a group of one keeps its row. Directions whose singular value in the samples is below
    the samples' own precision (the eps of their dtype, float32, relative to the largest) are left out
    of the fit: there the samples differ from a hyperplane by rounding only (a LayerNorm with a weight,
    DBRX's, puts every input on one), and fitting it gave rows of norm 1e8 whose logits no float32
    matmul reproduces. (Not the router's bf16 eps: beside a massive-activation channel 300x the others,
    every other direction would fall below it and the fit would be the plain average.)"""
    if x is None or not fits_router_rows(router):
        raise ValueError("the 'fit' router rule needs a softmax router without a logit softcap and the sampled block inputs")
    resolution = torch.finfo(x.dtype).eps
    x = router_features(router, x.double(), states)
    W = router.weight[list(group)].double()
    b = None if router.bias is None else router.bias[list(group)].double()
    z = x @ W.T + (0 if b is None else b)
    target = torch.logsumexp(z * router.logit_scale, dim=1) / router.logit_scale
    row, bias = w @ W, (torch.zeros((), dtype=x.dtype) if b is None else w @ b)
    design = x if b is None else torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    residual = target - (x @ row + bias)
    # gelsd: the minimum-norm solution over the singular values above rcond times the largest
    correction = torch.linalg.lstsq(design, residual[:, None], rcond=resolution, driver="gelsd").solution[:, 0]
    return row + correction[: x.shape[1]], bias + correction[x.shape[1]] if b is not None else bias


def _permuted(expert: ExpertsView, perm: Tensor) -> ExpertsView:
    """One expert with its hidden neurons reordered (the same function)."""

    def rows(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[:, perm]

    return dataclasses.replace(
        expert,
        gate=rows(expert.gate),
        up=rows(expert.up),
        down=expert.down[:, :, perm],
        gate_bias=rows(expert.gate_bias),
        up_bias=rows(expert.up_bias),
    )
