"""Structural fallback for an unknown model_type: find the router and experts by name and shape.

It recognises the layouts most families share: per-expert `<block>.experts.{e}.<gate>/<up>/<down>.weight`
(gate_proj/up_proj/down_proj or w1/w3/w2) or fused `<block>.experts.gate_up_proj [E, 2I, D]` +
`down_proj [E, D, I]`, a router `<block>.<name>.weight [E, D]` whose name says gate or router (plus
its `bias` / `e_score_correction_bias` if present) and `<block>.shared_expert(s).*_proj` (plus
`shared_expert_gate`). Routing is read from the usual config keys. The result is an ordinary
`Family` named "<model_type> (structural)"; layers without a router are dense.

A reading that may be wrong is refused, never returned: a MoE block holding tensors the layout
above does not use (a routing bias kept on the block itself, expert biases, ...) is refused, and
where transformers knows the model_type natively (no remote code), the first MoE layer is run
through transformers' own MoE block (built from config.json, only that block's tensors read) and
through moelab's reading of it, on a few random tokens; outputs that differ are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.hf.layouts import (
    Config,
    Family,
    FusedGateUp,
    Layout,
    PerExpert,
    RouterKeys,
    SharedMLP,
    config_entry,
    config_flag,
    config_value,
)
from moelab.hf.multimodal import language_renames
from moelab.hf.stored_names import conversion_shards, conversion_splits
from moelab.memory import release_freed_memory

_LAYER = re.compile(r"(?P<stem>(?:.+\.)?(?:layers|blocks|h)\.)(?P<n>\d+)\.(?P<rest>.+)")
_PER_EXPERT = re.compile(r"(?P<block>.+)\.experts\.0\.(?P<proj>[^.]+)\.weight")
_PROJ_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_SHARED_NAMES = ("shared_expert", "shared_experts")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_NUM_LAYERS = ("num_hidden_layers", "n_layers", "num_layers")
_HIDDEN = ("hidden_size", "d_model")
_CHECK_TOKENS = 8
_EXPERT_WIDTH = ("moe_intermediate_size", "intermediate_size")
_SHARED_WIDTH = re.compile(r"shared.*(intermediate|ffn|hidden)_(size|dim)")  # a width key of their own
_CHECK_RTOL = 1e-4


def names_experts(config: Config) -> bool:
    """Whether config.json sets anything about experts: a key naming them, at any depth, with a value
    (num_experts, n_routed_experts, num_experts_per_tok, DBRX's ffn_config.moe_num_experts, ...), as a
    dense model's does not (a family's own count key may be one `EXPERT_COUNT_KEYS` lacks)."""
    return any(
        ("expert" in key.lower() and bool(value)) or (isinstance(value, dict) and names_experts(value))
        for key, value in config.items()
    )


def structural_family(config: Config, ckpt: Checkpoint) -> Family | None:
    """A Family for this checkpoint found by structure, or None if it shows no MoE layer."""
    try:
        experts_key, E = config_entry(config, EXPERT_COUNT_KEYS)
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
        family = Family(
            name=f"{config.get('model_type')} (structural)",
            layouts=(Layout(router, experts, shared),),
            num_experts=(experts_key,),
            router_settings=_routing(sigmoid_default=router.selection_bias is not None),
            is_moe_layer=None,
            layer_prefix=stem + "{n}.",
            stored_renames=language_renames(stem),
            stored_splits=conversion_splits(config.get("model_type")),
            stored_shards=conversion_shards(config.get("model_type")),
            num_layers=_NUM_LAYERS,
            hidden_size=_HIDDEN,
            expert_width=_expert_width(config),
            # a multiple of the routed width (DeepSeek's n_shared_experts x moe_intermediate_size: GLM-4.5,
            # GLM-5, DeepSeek-V3.2; Cohere2-MoE's num_shared_experts x intermediate_size), unless the config
            # gives the shared experts a width of their own (Qwen's shared_expert_intermediate_size,
            # dots3_note's shared_experts_intermediate_size)
            shared_width_follows=shared is not None and not any(_SHARED_WIDTH.search(key) for key in config),
        )
        same_stem = {f"{stem}{k}.": keys for (s, k), keys in sorted(layers.items()) if s == stem}
        _check_claimed(ckpt, config, family.layouts[0], block, same_stem)
        _checked_once(ckpt, config, family, n, f"{prefix}{block}")
        return family
    return None


def _expert_width(config: Config) -> tuple[str, ...]:
    """The config key of the routed experts' width: the first of _EXPERT_WIDTH that transformers' config
    class for the model_type declares (Cohere2-MoE's, FlexOlmo's and MiniMax's experts are
    intermediate_size wide: they have no moe_intermediate_size), the first where it declares none
    or transformers does not know the model_type."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    declared = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else object
    return (tuple(key for key in _EXPERT_WIDTH if hasattr(declared, key)) or _EXPERT_WIDTH)[:1]


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
    a correction bias, else softmax), num_experts_per_tok (or num_experts_per_token, moe_top_k,
    top_k), norm_topk_prob (default True),
    routed_scaling_factor, n_group / topk_group."""

    def settings(config: Config) -> dict:
        return {
            "score_func": config_value(
                config, "scoring_func", default="sigmoid" if sigmoid_default else "softmax"
            ),
            "top_k": config_value(config, "num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k"),
            "renormalize": config_flag(config, "norm_topk_prob", default=True),
            "route_scale": float(config_value(config, "routed_scaling_factor", default=1.0)),
            "n_group": config_value(config, "n_group", default=1),
            "topk_group": config_value(config, "topk_group", default=1),
        }

    return settings


def _check_claimed(
    ckpt: Checkpoint, config: Config, layout: Layout, block: str, layers: dict[str, set[str]]
) -> None:
    """Refuse a MoE block, in any layer (layers: {layer prefix: its keys, relative}), that holds
    tensors `layout` does not read: moelab would compute the block without them."""
    experts, shared, router = layout.experts, layout.shared, layout.router
    patterns = [router.weight, router.bias, router.selection_bias]
    if isinstance(experts, PerExpert):
        patterns += [experts.gate, experts.up, experts.down]
    else:
        patterns += [experts.gate_up, experts.down]
    if shared is not None:
        patterns += [shared.gate, shared.up, shared.down, shared.sigmoid_gate]
    claimed = re.compile("|".join(re.escape(p).replace(r"\{e\}", r"\d+") for p in patterns if p is not None))
    for prefix, rests in layers.items():
        unclaimed = sorted(r for r in rests if r.startswith(block + ".") and not claimed.fullmatch(r))
        if unclaimed and experts.present(ckpt, prefix):
            raise CheckpointError(
                f"{ckpt.directory}: the MoE block {prefix}{block} holds "
                f"{', '.join(prefix + rest for rest in unclaimed)}, which moelab's structural reading "
                f"(router weight and bias, experts, shared experts) does not use: {_cannot(config)}"
            )


def _cannot(config: Config) -> str:
    model_type = config.get("model_type")
    return (
        f"moelab cannot read the routing of model_type {model_type!r}. Convert the checkpoint to a supported "
        f"family, or file an adapter for {model_type!r} (moelab.hf.adapters)"
    )


# a checkpoint's files as they were checked (path, size, mtime) -> the check's refusal, None if it passed
_CHECKED: dict[tuple, str | None] = {}


def _checked_once(ckpt: Checkpoint, config: Config, family: Family, index: int, block: str) -> None:
    """`_check_against_transformers`, run once per process for the same files: a checkpoint is
    opened several times by one command (a write opens its source two or three times)."""
    stats = {name: (ckpt.directory / name).stat() for name in ("config.json", *ckpt.shards())}
    files = tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats.items())
    key = (str(ckpt.directory.resolve()), files)
    if key not in _CHECKED:
        try:
            _check_against_transformers(ckpt, config, family, index, block)
        except CheckpointError as err:
            _CHECKED[key] = str(err)
            raise
        _CHECKED[key] = None
    if _CHECKED[key] is not None:
        raise CheckpointError(_CHECKED[key])


def _check_against_transformers(
    ckpt: Checkpoint, config: Config, family: Family, index: int, block: str
) -> None:
    """Where transformers knows the model_type natively: refuse the reading of MoE layer `index`
    if it computes other outputs than transformers' own block (`block` on disk) for a few random
    hidden states [1, T, D]. Costs a meta skeleton of the model and up to about four copies of one
    MoE layer's tensors (fp32): about 2 s and 4.5x a bf16 layer's size at its peak, once per
    checkpoint and process (`_checked_once`)."""
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        return
    D = config_value(config, *_HIDDEN)
    x = torch.randn(1, _CHECK_TOKENS, D, generator=torch.Generator().manual_seed(0))
    hf_block = _transformers_block(ckpt, config, block)
    what = f"transformers' {type(hf_block).__name__} ({block})"
    try:
        with torch.no_grad():
            out = hf_block(x)
    except Exception as err:  # noqa: BLE001 - whatever stops transformers' block stops the check
        raise CheckpointError(
            f"{ckpt.directory}: {what} fails on hidden states [1, {_CHECK_TOKENS}, {D}] "
            f"({type(err).__name__}: {err}), so moelab cannot check its structural reading: {_cannot(config)}"
        ) from err
    expected = out[0] if isinstance(out, tuple) else out  # some blocks return (y, router logits)
    del hf_block, out
    release_freed_memory()
    if not isinstance(expected, torch.Tensor) or expected.numel() != x.numel():
        raise CheckpointError(
            f"{ckpt.directory}: {what} does not return hidden states shaped like its input "
            f"[1, {_CHECK_TOKENS}, {D}], so moelab cannot check its structural reading: {_cannot(config)}"
        )
    from moelab.hf.native import moe_layer_from_view  # imports moelab.nn: only where a check runs

    layer = family.read_layer(ckpt, config, index)
    with torch.no_grad():
        got = moe_layer_from_view(layer).float()(x)[0]
    expected = expected.reshape(got.shape).float()
    if not torch.isfinite(expected).all():
        raise CheckpointError(f"{ckpt.directory}: NaN or Inf in layer {index}'s MoE block: corrupt weights")
    error, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    if not error <= _CHECK_RTOL * max(scale, 1e-6):
        r = layer.router
        raise CheckpointError(
            f"{ckpt.directory}: moelab's structural reading of layer {index} ({r.score_func} scores, "
            f"top-{r.top_k}, renormalize={r.renormalize}, route_scale={r.route_scale}, "
            f"{'a' if r.selection_bias is not None else 'no'} correction bias) differs from {what} by up "
            f"to {error:.3g} (outputs up to {scale:.3g}) on random hidden states: {_cannot(config)}"
        )


def _transformers_block(ckpt: Checkpoint, config: Config, block: str) -> torch.nn.Module:
    """transformers' module for the MoE block stored under `block`, in fp32, holding the
    checkpoint's tensors under `block` as transformers' own loading reads and converts them (the
    rest of the model stays on the meta device)."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging

    from moelab.hf.layerwise import transformers_skeleton

    try:
        hf_config = AutoConfig.from_pretrained(ckpt.directory, local_files_only=True, trust_remote_code=False)
        hf_config._experts_implementation = "eager"  # transformers' reference loop, any dtype and device
        model = transformers_skeleton(hf_config)
    except Exception as err:  # noqa: BLE001 - a config.json transformers cannot build a model from
        raise CheckpointError(
            f"{ckpt.directory}: transformers cannot build its model_type {config.get('model_type')!r} model "
            f"from config.json ({type(err).__name__}: {err}), so moelab cannot check its structural reading "
            f"against transformers' MoE block: {_cannot(config)}"
        ) from err
    tensors = {key: ckpt.get(key) for key in ckpt.keys() if key.startswith(block + ".")}
    load = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), dtype=torch.float32)
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(model, tensors, load)
    finally:
        if bar:
            logging.enable_progress_bar()
    del tensors
    loaded = set(model.state_dict()) - info.missing_keys
    if not loaded or info.conversion_errors or info.mismatched_keys:
        shapes = ", ".join(f"{n} {list(a)} vs {list(b)}" for n, a, b in sorted(info.mismatched_keys))
        problem = (
            f"shapes differ: {shapes}" if info.mismatched_keys
            else f"conversion failed: {info.conversion_errors}" if info.conversion_errors
            else "its model has none of them"
        )  # fmt: skip
        raise CheckpointError(
            f"{ckpt.directory}: transformers cannot load the tensors under {block} into its model built from "
            f"config.json ({problem}); config.json does not describe these weights"
        )
    name = ".".join(_common_prefix([key.split(".")[:-1] for key in loaded]))
    module = model.get_submodule(name)
    unread = sorted(f"{name}.{key}" for key in module.state_dict() if f"{name}.{key}" not in loaded)
    if unread:
        raise CheckpointError(
            f"{ckpt.directory}: transformers' {type(module).__name__} ({name}) also holds "
            f"{', '.join(unread)}, not stored under {block} (transformers may read them from elsewhere in "
            f"the layer), so moelab's structural reading of the block misses them: {_cannot(config)}"
        )
    return module.eval()


def _common_prefix(names: list[list[str]]) -> list[str]:
    """The leading parts all of `names` share."""
    common = []
    for parts in zip(*names):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return common
