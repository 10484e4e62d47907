"""Find the pieces of an MoE model in memory: its decoder layers and, in a layer, the router,
the routed experts, the shared experts' down projection and the MoE block that holds them.

Works by names and shapes on any transformers MoE family (and on moelab's own models), so the
routing capture and the layer-by-layer runner share one way of finding them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

SHARED_DOWN = re.compile(r"(^|\.)shared\w*\.(down_proj|output_linear)$")


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """(its name, the model's list of decoder layers): its one ModuleList of `num_layers` blocks
    named layers/blocks/h."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) == num_layers
        and name.rsplit(".", 1)[-1] in ("layers", "blocks", "h")
    ]
    if len(lists) != 1:
        raise ValueError(
            f"cannot find {type(model).__name__}'s decoder layers: expected one ModuleList named layers/blocks "
            f"with {num_layers} entries (config.json's layer count), found {len(lists)}"
        )
    return lists[0]


def beside_language_model(model: nn.Module) -> list[str]:
    """The modules of a vision-language `model` (a skeleton run on text alone: Qwen3-VL-MoE) that
    text never reaches: those holding parameters outside its language model (`get_decoder()`) and
    output head, the vision tower and its projector; none for a causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or decoder is model:
        return []
    text = {id(p) for part in (decoder, head) if part is not None for p in part.parameters()}
    outside = [
        name
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters()) and all(id(p) not in text for p in module.parameters())
    ]
    return [name for name in outside if not any(name.startswith(other + ".") for other in outside)]


@dataclass(frozen=True)
class MoEModules:
    """The MoE modules of one decoder layer, by their names inside it. block: the smallest module
    holding the router and the routed experts ("": the decoder layer itself, Gemma 4); shared_down: the shared experts' down projection
    (None if the layer has none); shared_in_block: whether the block computes the shared experts
    (else the decoder layer adds them itself, as Granite-MoE-Shared does)."""

    router: str
    experts: str
    block: str
    shared_down: str | None

    @property
    def shared_in_block(self) -> bool:
        return self.shared_down is not None and _inside(self.shared_down, self.block)


def find_moe_modules(
    layer: nn.Module, index: int, num_experts: int, dim: int, block: str | None = None
) -> MoEModules:
    """In decoder layer `index`: the router (the innermost module named gate/router holding a [E, D] weight),
    the routed experts (named experts) and the shared experts' down projection, if any. block: the
    family's MoE block (`Family.moe_block`), where the layer holds another module with a router
    (JetMoE's attention experts): the search stays inside it, and a block whose experts are no module
    of their own (JetMoE's input_linear / output_linear) is its own experts module."""
    root = layer if block is None else layer.get_submodule(block)
    within = "" if block is None else block + "."
    modules = dict(root.named_modules())
    routers = [
        name
        for name, m in modules.items()
        if name.rsplit(".", 1)[-1] in ("gate", "router")
        and any(p.shape == (num_experts, dim) for p in m.parameters())
    ]
    # a router module around the gate that holds its weight (AFMoE: mlp.router.gate): the gate
    routers = [name for name in routers if not any(other.startswith(name + ".") for other in routers)]
    experts = [name for name in modules if name.rsplit(".", 1)[-1] == "experts"]
    shared = [name for name in modules if SHARED_DOWN.search(name)]
    bare = block is not None and not experts  # the block runs its experts itself
    if len(routers) != 1 or len(experts) != (0 if bare else 1) or len(shared) > 1:
        raise ValueError(
            f"layer {index}: expected one router module (named gate/router, weight [{num_experts}, {dim}]) and "
            f"one experts module{f' in {block}' if block else ''}, found {len(routers)} and {len(experts)} (and "
            f"{len(shared)} shared down projections); this model's block layout is not supported"
        )
    router, experts_name = within + routers[0], block if bare else within + experts[0]
    parent = block if block is not None else _common_parent(router, experts_name)
    return MoEModules(router, experts_name, parent, within + shared[0] if shared else None)


def _common_parent(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split(".")[:-1], b.split(".")[:-1]):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _inside(name: str, parent: str) -> bool:
    return name.startswith(parent + ".")
