"""Structural fallback for an unknown model_type: find the router and experts by name and shape.

It recognises the layouts most families share: per-expert `<block>.experts.{e}.<gate>/<up>/<down>.weight`
(gate_proj/up_proj/down_proj or w1/w3/w2) or fused `<block>.experts.gate_up_proj [E, 2I, D]` +
`down_proj [E, D, I]`, a router `<block>.<name>.weight [E, D]` whose name says gate or router (plus
its `bias` / `e_score_correction_bias` if present) and `<block>.shared_expert(s).*_proj` (plus
`shared_expert_gate`). Routing is read from the usual config keys. The result is an ordinary
`Family` named "<model_type> (structural)"; layers without a router are dense.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from moelab.hf.checkpoint import Checkpoint
from moelab.hf.layouts import (
    Config,
    Family,
    FusedGateUp,
    Layout,
    PerExpert,
    RouterKeys,
    SharedMLP,
    config_entry,
    config_value,
)

_LAYER = re.compile(r"(?P<stem>(?:.+\.)?(?:layers|blocks|h)\.)(?P<n>\d+)\.(?P<rest>.+)")
_PER_EXPERT = re.compile(r"(?P<block>.+)\.experts\.0\.(?P<proj>[^.]+)\.weight")
_PROJ_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_SHARED_NAMES = ("shared_expert", "shared_experts")
_NUM_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_NUM_LAYERS = ("num_hidden_layers", "n_layers", "num_layers")
_HIDDEN = ("hidden_size", "d_model")


def structural_family(config: Config, ckpt: Checkpoint) -> Family | None:
    """A Family for this checkpoint found by structure, or None if it shows no MoE layer."""
    try:
        experts_key, E = config_entry(config, _NUM_EXPERTS)
        D = config_value(config, *_HIDDEN)
        config_value(config, *_NUM_LAYERS)
    except ValueError:
        return None
    layers: dict[tuple[str, int], set[str]] = {}
    for key in ckpt.keys():
        if m := _LAYER.fullmatch(key):
            layers.setdefault((m["stem"], int(m["n"])), set()).add(m["rest"])
    for (stem, n), rests in sorted(layers.items()):
        prefix = f"{stem}{n}."
        found = _experts(rests)
        if found is None:
            continue
        block, experts = found
        router = _router(ckpt, prefix, block, rests, (E, D))
        if router is None:
            continue
        shared = next(
            (
                _shared(block, name, rests)
                for name in _SHARED_NAMES
                if f"{block}.{name}.gate_proj.weight" in rests
            ),
            None,
        )
        return Family(
            name=f"{config.get('model_type')} (structural)",
            layouts=(Layout(router, experts, shared),),
            num_experts=(experts_key,),
            router_settings=_routing(sigmoid_default=router.selection_bias is not None),
            is_moe_layer=None,
            layer_prefix=stem + "{n}.",
            num_layers=_NUM_LAYERS,
            hidden_size=_HIDDEN,
            expert_width=("moe_intermediate_size",),
        )
    return None


def _experts(rests: set[str]) -> tuple[str, PerExpert | FusedGateUp] | None:
    """(block, experts layout) of one layer's keys (relative to the layer), if it has experts."""
    for rest in sorted(rests):
        if rest.endswith(".experts.gate_up_proj") and rest.replace("gate_up_proj", "down_proj") in rests:
            block = rest.removesuffix(".experts.gate_up_proj")
            return block, FusedGateUp(rest, f"{block}.experts.down_proj")
        if m := _PER_EXPERT.fullmatch(rest):
            block = m["block"]
            for names in _PROJ_NAMES:
                if all(f"{block}.experts.0.{p}.weight" in rests for p in names):
                    return block, PerExpert(*(f"{block}.experts.{{e}}.{p}.weight" for p in names))
    return None


def _router(
    ckpt: Checkpoint, prefix: str, block: str, rests: set[str], shape: tuple[int, int]
) -> RouterKeys | None:
    """The one [E, D] weight in the block, outside the experts, named like a gate or router."""
    candidates = [
        rest
        for rest in sorted(rests)
        if rest.startswith(block + ".")
        and rest.endswith(".weight")
        and ".experts." not in rest
        and "shared" not in rest
        and any(word in rest.removeprefix(block) for word in ("gate", "router"))
        and ckpt.shape(prefix + rest) == shape
    ]
    if len(candidates) != 1:
        return None
    module = candidates[0].removesuffix("weight")
    optional = {name: module + name for name in ("bias", "e_score_correction_bias") if module + name in rests}
    return RouterKeys(
        candidates[0], bias=optional.get("bias"), selection_bias=optional.get("e_score_correction_bias")
    )


def _shared(block: str, name: str, rests: set[str]) -> SharedMLP:
    gate = f"{block}.shared_expert_gate.weight"
    return SharedMLP(
        *(f"{block}.{name}.{p}_proj.weight" for p in ("gate", "up", "down")),
        sigmoid_gate=gate if gate in rests else None,
    )


def _routing(sigmoid_default: bool) -> Callable[[Config], dict]:
    """Routing from the usual config keys: `scoring_func` (default: sigmoid if the router has
    a correction bias, else softmax), num_experts_per_tok, norm_topk_prob (default True),
    routed_scaling_factor, n_group / topk_group."""

    def settings(config: Config) -> dict:
        return {
            "score_func": config_value(
                config, "scoring_func", default="sigmoid" if sigmoid_default else "softmax"
            ),
            "top_k": config_value(config, "num_experts_per_tok", "moe_top_k", "top_k"),
            "renormalize": config_value(config, "norm_topk_prob", default=True),
            "route_scale": float(config_value(config, "routed_scaling_factor", default=1.0)),
            "n_group": config_value(config, "n_group", default=1),
            "topk_group": config_value(config, "topk_group", default=1),
        }

    return settings
