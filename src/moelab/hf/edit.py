"""What an edit of one MoE layer means: `LayerEdit`, the edited layer (`apply_edit`), what
dropping experts should compute (`masked_moe_layer`) and which edits a router allows (`check_edit`).

Shape legend: E experts before the edit, E' after, D model dim, I expert hidden dim.

An edit says, per MoE layer, where each new expert comes from (`LayerEdit.sources`: one
original id for a kept expert, several for a merged one) and, unless the experts were only
selected, the new router and expert tensors (an edited `MoELayerView`). The writer
(`moelab.hf.writer`) turns edits into a checkpoint; compression methods produce them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moelab.hf.native import (
    expert_input,
    experts_from_view,
    moe_layer_from_view,
    router_from_view,
    shared_from_view,
    summed_routed_output,
)
from moelab.hf.view import ExpertsView, MoELayerView, RouterView
from moelab.nn.moe import MoELayer
from moelab.nn.routers import Router, Routing, check_groups, min_group_size


@dataclass(frozen=True, eq=False)
class LayerEdit:
    """What happens to one MoE layer's routed experts.

    sources[j]: the original expert ids new expert j is made from; one id for a kept (or
        narrowed) expert, several for a merged one. Ids appear at most once.
    view: the edited layer whose router and routed-expert tensors are written (E' = len(sources)
        experts; narrower experts and new router rows go here). None: experts are only selected,
        so the writer slices the original tensors. Shared experts are written unchanged.
    """

    sources: tuple[tuple[int, ...], ...]
    view: MoELayerView | None = None

    def __post_init__(self):
        object.__setattr__(
            self, "sources", tuple(tuple(_expert_id(e) for e in group) for group in self.sources)
        )
        ids = [e for group in self.sources for e in group]
        if not self.sources or any(not group for group in self.sources):
            raise ValueError("LayerEdit.sources needs at least one expert, and every group at least one id")
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError(
                f"LayerEdit.sources must name distinct expert ids >= 0, got {list(self.sources)}"
            )
        if self.view is None and any(len(group) > 1 for group in self.sources):
            raise ValueError("merged experts (groups of several ids) need their new tensors: pass view=")
        if self.view is not None and self.view.router.num_experts != len(self.sources):
            raise ValueError(
                f"LayerEdit.view has {self.view.router.num_experts} experts but sources lists "
                f"{len(self.sources)}; give one source group per new expert"
            )

    @classmethod
    def keep(cls, ids: Iterable[int]) -> LayerEdit:
        """Keep the experts `ids` (renumbered in increasing order), drop the rest."""
        return cls(tuple((e,) for e in sorted(set(ids))))

    @classmethod
    def drop(cls, ids: Iterable[int], num_experts: int) -> LayerEdit:
        """Drop the experts `ids` of a layer with `num_experts`, keep the rest."""
        ids = {_expert_id(e) for e in ids}
        if bad := sorted(e for e in ids if not 0 <= e < num_experts):
            raise ValueError(f"cannot drop experts {bad}: the layer has experts 0..{num_experts - 1}")
        return cls.keep(e for e in range(num_experts) if e not in ids)

    @property
    def selection(self) -> list[int] | None:
        """The kept original ids if this edit only selects experts, else None."""
        return [group[0] for group in self.sources] if self.view is None else None


def _expert_id(value: Any) -> int:
    """An expert id given as an integer (Python or numpy/torch scalar); 1.7, "3" or True is an error."""
    try:
        if not isinstance(value, bool):
            return value.__index__()
    except (AttributeError, TypeError):
        pass
    raise ValueError(f"expert ids are integers, got {type(value).__name__} {value!r}")


def apply_edit(layer: MoELayerView, edit: LayerEdit) -> MoELayerView:
    """The layer after `edit`, with the original's dtypes: original experts selected by
    `edit.sources`, or `edit.view`'s tensors checked against the original's settings."""
    if edit.view is None:
        idx = torch.tensor(edit.selection)
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        router = layer.router
        table = None if router.token_experts is None else remapped_token_experts(router, edit.sources, pick(router.weight))
        router = dataclasses.replace(
            router, token_experts=table, **{name: pick(getattr(router, name)) for name in _ROUTER_TENSORS}
        )
        experts = dataclasses.replace(
            layer.experts, **{name: pick(getattr(layer.experts, name)) for name in EXPERT_TENSORS}
        )
        return dataclasses.replace(layer, router=router, experts=experts)
    new = edit.view
    check_same_settings(layer, new)
    router = dataclasses.replace(
        new.router,
        **{
            name: _cast(getattr(new.router, name), getattr(layer.router, name), layer.router.weight)
            for name in _ROUTER_TENSORS
        },
    )
    experts = dataclasses.replace(
        new.experts,
        **{
            name: _cast(getattr(new.experts, name), getattr(layer.experts, name), layer.experts.up)
            for name in EXPERT_TENSORS
        },
    )
    return dataclasses.replace(layer, router=router, experts=experts)


def masked_moe_layer(layer: MoELayerView, keep: Sequence[int]) -> MoELayer:
    """The original layer, with every expert outside `keep` masked out of routing: its router
    logit is -inf before scoring (so softmax renormalises over the kept experts) and its
    selection score is -inf (so a correction bias cannot pick it); a hash router's table names
    the kept experts that stand in for the dropped ones (`remapped_token_experts`). What dropping
    those experts should compute. forward(x [..., D]) -> (y, MoEResult)."""
    moe = moe_layer_from_view(layer)
    _mask_router(moe.router, layer.router, keep)
    return moe


def moe_output(
    layer: MoELayerView, x: Tensor, keep: Sequence[int] | None = None, ids: Tensor | None = None
) -> Tensor:
    """x [T, D] -> [T, D]: what `layer` computes (with the experts outside `keep` masked out of
    routing, as `masked_moe_layer`), in float64, holding one expert's weights in float64 at a
    time, so that layers of any size can be checked exactly. ids: the router's per-token input
    (`route_tokens`): the tokens' ids [T], which a hash-routed layer (`RouterView.token_experts`)
    routes by, or the router states [T, R] an MLP router reads (`RouterView.mlp`)."""
    x = x.double()
    router = router_from_view(layer.router).double()
    if keep is not None:
        _mask_router(router, layer.router, keep)
    with torch.no_grad():
        routing = route_tokens(router, x, ids)
        z = expert_input(layer, x)
        y = torch.zeros_like(z)
        for e in routing.indices.unique().tolist():
            if e < 0:
                continue
            tokens, slots = (routing.indices == e).nonzero(as_tuple=True)
            weights = routing.weights[tokens, slots]
            if e >= layer.experts.num_experts:  # an identity expert returns what the experts read, or nothing
                if layer.router.identity.returns == "input":
                    y.index_add_(0, tokens, z[tokens] * weights[:, None])
                continue
            expert = experts_from_view(one_expert(layer.experts, e)).double()
            y.index_add_(0, tokens, expert(z[tokens], [len(tokens)], weights))
        y = summed_routed_output(layer, y)
        if layer.shared is not None:
            y += shared_from_view(layer.shared).double()(x)
        if layer.output_bias is not None:
            y += layer.output_bias.double()
    return y


def route_tokens(router: Router, x: Tensor, ids: Tensor | None = None) -> Routing:
    """The router on x [N, D] -> its Routing of the N tokens; ids: the per-token input the router
    reads (`Router.context_input`): a hash router's token ids [N], an MLP router's states [N, R]
    (None: none, the first layer's)."""
    return router(x, ids) if router.context_input else router(x)


def layer_output(moe: MoELayer, x: Tensor, ids: Tensor | None = None) -> Tensor:
    """The layer's output on x [N, D] -> [N, D]; ids: the router's per-token input (`route_tokens`)."""
    return moe(x, context=None if ids is None else {moe.router.context_input: ids})[0]


def _mask_router(router, view: RouterView, keep: Sequence[int]) -> None:
    kept = torch.tensor(sorted(set(keep)), dtype=torch.long)
    if view.token_experts is not None:  # the kept experts that stand in for the dropped ones, original ids
        sources = tuple((e,) for e in kept.tolist())
        router.token_experts = kept[remapped_token_experts(view, sources, view.weight[kept]).long()]
    dropped = torch.tensor(sorted(set(range(view.num_experts)) - set(keep)), dtype=torch.long)
    logits = router.router_logits
    router.router_logits = lambda x, *inputs, **options: logits(x, *inputs, **options).index_fill(
        -1, dropped, float("-inf")
    )  # this instance only
    if getattr(router, "selection_bias", None) is not None:  # a copy: the router holds the view's own tensor
        router.selection_bias = router.selection_bias.index_fill(0, dropped, float("-inf"))


def remapped_token_experts(router: RouterView, sources: Sequence[Sequence[int]], new_weight: Tensor) -> Tensor:
    """A hash router's table (`RouterView.token_experts` [V, K]) after an edit whose new expert j
    comes from the original ids `sources[j]` and has router row new_weight[j] ([E', D]): a slot naming
    one of j's sources names j; one naming a dropped expert names the new expert whose router row
    is nearest to the dropped one's (cosine), among those not already in that token's row. A
    token so keeps K distinct experts (K <= E'), and where a merge joined two of its experts, the
    merged one twice (each slot with its own weight, as the token's two experts had)."""
    table, E = router.token_experts, router.num_experts
    target = torch.full((E,), -1, dtype=torch.long)
    for j, group in enumerate(sources):
        target[list(group)] = j
    new = target[table.long()]
    dropped = (target < 0).nonzero()[:, 0]
    if not dropped.numel():
        return new.to(table.dtype)
    unit = lambda w: torch.nn.functional.normalize(w.double(), dim=-1)  # noqa: E731
    nearest = (unit(router.weight[dropped]) @ unit(new_weight).T).argsort(dim=-1, descending=True, stable=True)
    rank = torch.full((E,), -1, dtype=torch.long)
    rank[dropped] = torch.arange(len(dropped))
    for slot in range(table.shape[1]):
        holes = (new[:, slot] < 0).nonzero()[:, 0]
        if not holes.numel():
            continue
        candidates = nearest[rank[table[holes, slot].long()]]  # [n, E'] best first
        taken = (new[holes, :, None] == candidates[:, None, :]).any(1)  # already in the token's row
        new[holes, slot] = candidates.gather(1, (~taken).long().argmax(-1, keepdim=True))[:, 0]
    return new.to(table.dtype)


def one_expert(experts: ExpertsView, e: int) -> ExpertsView:
    """Expert `e` of a layer as a one-expert view (slices, no copies)."""
    pick = lambda t: None if t is None else t[e : e + 1]  # noqa: E731
    return dataclasses.replace(experts, **{name: pick(getattr(experts, name)) for name in EXPERT_TENSORS})


_ROUTER_TENSORS = ("weight", "bias", "selection_bias", "expert_scale")
EXPERT_TENSORS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def check_edit(index: int, edit: LayerEdit, E: int, settings: dict[str, Any], identity: int = 0) -> None:
    """Ids in range, enough experts for top-k (taken among them and the `identity` experts),
    group-limited routing kept valid (groups spanning identity experts keep every expert)."""
    where = f"layer {index}"
    ids = [e for group in edit.sources for e in group]
    if bad := sorted(e for e in ids if e >= E):
        raise ValueError(f"{where}: expert ids {bad} out of range; the layer has experts 0..{E - 1}")
    new_E, top_k = len(edit.sources), settings["top_k"]
    if new_E + identity < top_k:
        beside = f" beside its {identity} identity experts" if identity else ""
        raise ValueError(
            f"{where}: the edit leaves {new_E} experts{beside} but the router picks top_k={top_k} per token; keep at "
            f"least {top_k - identity} experts (or lower num_experts_per_tok first)"
        )
    n_group, topk_group = settings.get("n_group", 1), settings.get("topk_group", 1)
    if n_group == 1:
        return
    if identity and new_E != E:
        raise ValueError(f"{where}: the router's groups span its {identity} identity experts, which no edit can keep "
                         "in place while the experts' count changes; keep every expert (narrow them)")
    if new_E % n_group:
        raise ValueError(
            f"{where}: group-limited routing splits experts into n_group={n_group} groups, so the new count "
            f"{new_E} must be a multiple of {n_group}; keep the same number of experts in every group"
        )
    size, old_size = new_E // n_group, E // n_group
    moved = [
        (j, group) for j, group in enumerate(edit.sources) if any(e // old_size != j // size for e in group)
    ]
    if moved:
        kept_per_group = [sum(1 for g in edit.sources if g[0] // old_size == k) for k in range(n_group)]
        raise ValueError(
            f"{where}: group-limited routing (n_group={n_group}) needs every group to keep {size} experts of "
            f"its own, in group order; the edit keeps {kept_per_group} per group (new expert {moved[0][0]} "
            f"comes from {list(moved[0][1])}). Prune equally per group, or set n_group=1 and topk_group=1 in "
            "config.json first (that changes the routing)"
        )
    try:
        min_size = min_group_size(settings["score_func"], n_group, settings.get("group_score"))
        check_groups(new_E, top_k, n_group, topk_group, min_size)
    except ValueError as err:
        raise ValueError(f"{where}: after the edit, {err}; keep more experts per group") from None


def check_same_settings(layer: MoELayerView, new: MoELayerView) -> None:
    """The writer changes tensors and counts; routing and activation settings live in config.json."""
    fields = {
        "router": (
            layer.router,
            new.router,
            ("score_func", "top_k", "renormalize", "route_scale", "n_group", "topk_group", "group_score",
             "jitter_eps", "select_on_logits", "hash_routed", "logit_softcap", "logit_scale"),
        ),
        "experts": (
            layer.experts,
            new.experts,
            ("activation", "swiglu_alpha", "swiglu_limit", "gate_softcap", "up_softcap", "scale_input"),
        ),
    }
    for part, (old, edited, names) in fields.items():
        for name in names:
            if getattr(old, name) != getattr(edited, name):
                raise ValueError(
                    f"layer {layer.index}: the edited {part} has {name}={getattr(edited, name)!r} but the "
                    f"checkpoint's is {getattr(old, name)!r}; the writer keeps config.json's routing and "
                    "activation settings, so edit tensors only"
                )
    if new.experts.dim != layer.experts.dim:
        raise ValueError(
            f"layer {layer.index}: the edited experts have dim {new.experts.dim}, "
            f"expected {layer.experts.dim}"
        )
    for part, names, what in (
        ("shared", ("gate", "up", "down", "sigmoid_gate"), "shared experts"),
        ("latent", ("down", "up"), "latent projections"),
        ("expert_norm", _NORM_FIELDS, "experts' input norm"),
        ("routed_norm", _NORM_FIELDS, "routed output norm"),
        ("router.input_norm", _NORM_FIELDS, "router's input norm"),
        ("experts.output_norm", _NORM_FIELDS, "experts' output norm"),
        ("router.mlp", _ROUTER_MLP_FIELDS, "router's MLP"),
        ("router.mlp.norm", _NORM_FIELDS, "router's MLP"),
    ):
        old, edited = (
            functools.reduce(lambda owner, name: None if owner is None else getattr(owner, name), part.split("."), view)
            for view in (layer, new)  # None past a part the view lacks (router.mlp.norm without an MLP router)
        )
        if not _same_tensors(old, edited, names):
            raise ValueError(
                f"layer {layer.index}: the edited view changes the {what}; the writer copies the {what} "
                f"unchanged, so keep the original `{part}` in the view"
            )
    if not _same(layer.output_bias, new.output_bias):
        raise ValueError(
            f"layer {layer.index}: the edited view changes the block's output bias; the writer copies it "
            "unchanged (it does not depend on the routing), so keep the original `output_bias` in the view"
        )


_NORM_FIELDS = ("weight", "eps", "multiplier", "scale_first")
_ROUTER_MLP_FIELDS = ("down", "down_bias", "fc1", "fc1_bias", "fc2", "fc2_bias", "state_scale")  # and its norm


def _same_tensors(old, new, names: tuple[str, ...]) -> bool:
    """Both None, or the same tensors `names` (None where the other is None; any dtype)."""
    if (old is None) != (new is None):
        return False
    pairs = [] if old is None else [(getattr(old, n), getattr(new, n)) for n in names]
    return all(_same(a, b) for a, b in pairs)


def _same(a, b) -> bool:
    """Equal tensors (any dtype), or equal settings."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.equal(a, b.to(a.dtype))
    return (a is None) == (b is None) and (a is None or a == b)


def _cast(new: Tensor | None, old: Tensor | None, like: Tensor) -> Tensor | None:
    """`new` in the dtype the source stores this tensor in (or its layer's main tensor's)."""
    return None if new is None else new.to((old if old is not None else like).dtype).contiguous()
