"""Write-back: rewrite a checkpoint after layer-level edits to its routed experts.

Shape legend: E experts before the edit, E' after, D model dim, I expert hidden dim, T tokens.

`write_checkpoint(source, out, {layer: LayerEdit})` (what an edit means: `moelab.hf.edit`)
copies everything else untouched, shard by shard (one shard plus one layer in memory), keeps the
source's on-disk layout, renumbers experts 0..E'-1, edits config.json as JSON (only the expert
count and width keys), records `moelab_expert_map.json` and checks its output before it reports
success (`moelab.hf.postconditions`):

- the written checkpoint reads back through the view with E' experts in every MoE layer,
  agreeing with config.json;
- every edited layer computes what the edit means on the original: for selected experts, the
  original layer with the dropped experts' router logits (and selection scores) set to -inf
  before top-k (`masked_moe_layer`); for replaced tensors, the edited view; no NaN/Inf;
- transformers (or moelab, for its own checkpoints) loads it strictly, with no missing,
  unexpected or mismatched keys, and its forward pass is finite (where it fits in memory,
  `reload_fits`; else skipped with a warning).

A quantized source (FP8, MXFP4: `moelab.hf.quantized`) is written as plain weights in the dtype its
config.json states, or with `keep_quantized` in its own format (`moelab.hf.requantize`).

Everything is written into a staging directory beside `out` and renamed into place at the end
(`moelab.io.StagedOutput`: `out` must be new, or moelab's checkpoint to replace with
`overwrite`, and never the source, inside it or above it).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moelab.files import read_json_object
from moelab.hf.adapters import NATIVE, resolve
from moelab.hf.checkpoint import INDEX_NAME, WEIGHT_FILE, Checkpoint, CheckpointError
from moelab.hf.edit import LayerEdit, apply_edit, check_edit, moe_output
from moelab.hf.expert_map import FORMAT as EXPERT_MAP_FORMAT
from moelab.hf.expert_map import read_expert_map
from moelab.hf.layouts import Config, Family, config_entry
from moelab.hf.multimodal import nested_config
from moelab.hf.postconditions import LayerCheck, check_reload, check_written
from moelab.hf.requantize import check_quantized_output, check_still_quantized, quantized_experts
from moelab.hf.view import ModelView, MoELayerView, RouterView, stored_layers
from moelab.io import (
    LazyTensor,
    RawTensor,
    StagedOutput,
    atomic_write_text,
    copy_side_file,
    save_safetensors_stream,
)
from moelab.memory import available_memory, release_freed_memory
from moelab.models.pretrained import CHECKPOINT_KIND

EXPERT_MAP_NAME = "moelab_expert_map.json"
CHECK_TOKENS = 64


def drop_experts(
    source: str | os.PathLike,
    out: str | os.PathLike,
    drop: Mapping[int, Iterable[int]] | Iterable[int],
    **kwargs: Any,
) -> Path:
    """Write `source` without the experts `drop`: a list of ids (dropped in every MoE layer, a
    multi-token prediction layer's included) or {layer index: ids}. Keyword arguments go to
    `write_checkpoint`. Returns `out`."""
    config, ckpt, family = resolve(source)
    ckpt.close()
    E = config_entry(config, family.num_experts)[1]
    if not isinstance(drop, Mapping):
        ids = list(drop)
        drop = {i: ids for i in family.moe_layers(ckpt, config) + family.mtp_layers}
    drop = {i: list(ids) for i, ids in drop.items()}
    if not any(drop.values()):
        raise ValueError("drop names no experts; nothing would change (pass the expert ids to drop)")
    return write_checkpoint(source, out, {i: LayerEdit.drop(ids, E) for i, ids in drop.items()}, **kwargs)


def write_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    edits: Mapping[int, LayerEdit],
    *,
    reload: bool | None = None,
    keep_quantized: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write `source` with `edits` ({MoE layer index: LayerEdit}) applied into the new directory
    `out` (see the module docstring). reload: also load the result with transformers (or moelab)
    as a postcondition; that loads the whole model into memory: None (default) runs it where it
    fits (`reload_fits`), True always, False never. keep_quantized: write a quantized source (FP8,
    MXFP4) in its own format (`moelab.hf.requantize`), not as plain weights. overwrite: replace the
    checkpoint moelab wrote to `out` before. Returns `out`."""
    source = Path(source).resolve()
    with StagedOutput(out, CHECKPOINT_KIND, inputs=[source], overwrite=overwrite) as staging:
        write_edited(
            source, staging, edits, reload=reload, keep_quantized=keep_quantized, quiet=quiet, name=Path(out).name
        )
    return Path(out)


def write_edited(
    source: str | os.PathLike,
    directory: Path,
    edits: Mapping[int, LayerEdit],
    *,
    reload: bool | None = None,
    keep_quantized: bool = False,
    quiet: bool = False,
    name: str | None = None,
) -> bool:
    """The body of `write_checkpoint`: write `source` with `edits` into the new, empty `directory`
    and check it (no output-directory checks: for callers that stage a larger output around it,
    like `moelab compress`). name: the output's, shown on the progress bar and in warnings.
    Returns whether transformers' whole-model reload check ran."""
    source = Path(source).resolve()
    config, ckpt, family = resolve(source)
    try:
        plan = _Plan.make(config, ckpt, family, edits, keep_quantized)
        name = name or directory.name
        checks = _write(plan, directory, name, quiet)
        copy_side_files(source, directory)
        written = nested_config(plan.new_config, read_json_object(source / "config.json", "a model config"))
        atomic_write_text(directory / "config.json", json.dumps(written, indent=2) + "\n")
        atomic_write_text(directory / EXPERT_MAP_NAME, json.dumps(plan.expert_map(source), indent=2) + "\n")
        check_written(directory, checks)
        if keep_quantized:
            check_still_quantized(ckpt, family, plan.edits, directory)
        reloaded = bool(reload or (reload is None and reload_fits(directory, name) and transformers_reads(plan, name)))
        if reloaded:  # where the output fails, the source is loaded to see whose fault it is: if it fits
            check_reload(directory, family, quiet, source=source if reload_fits(source, warn=False) else None)
        return reloaded
    finally:
        ckpt.close()


def transformers_reads(plan: _Plan, name: str) -> bool:
    """Whether transformers can load the layout the output keeps; where it cannot, a warning says
    the reload check was skipped (LongCat-Flash as released stores gate and up for its E experts
    alone, where transformers sizes them for the E + Z identity experts too, `PerExpert.padded`)."""
    Z, index = plan.family.identity_count(plan.config), next(iter(plan.edits))  # edits: never empty
    layout = plan.family.layout_of(plan.ckpt, index)
    if not (Z and layout.padded) or layout.stored_padding(plan.ckpt, plan.family.prefix(index)):
        return True
    warnings.warn(
        f"the whole-model reload check was skipped: {name} keeps the source's layout, gate and up stored for the "
        f"experts alone, which transformers cannot load (it sizes them for the {Z} identity experts too; the source "
        "does not load either); every edited layer was checked through moelab's reader",
        stacklevel=3,
    )
    return False


RELOAD_MARGIN = 2.0  # peak over the weights loaded: transformers 1.3x (bf16 files), 1.8x (dequantizing FP8); moelab 1.3x (float32)


def reload_fits(directory: Path, name: str | None = None, *, warn: bool = True) -> bool:
    """Whether transformers' whole-model reload of the checkpoint at `directory` fits in memory:
    its weights as loaded (quantized ones dequantized) times RELOAD_MARGIN within what the kernel
    reports available (a moelab checkpoint's in float32: `load_pretrained` builds the model in it).
    Where it does not and `warn`, a warning says the check was skipped (name: the output's, where
    `directory` stages it)."""
    available = available_memory()
    _, ckpt, family = resolve(directory)
    try:
        shapes = ckpt.with_shapes_only()
        tensors = [shapes.get(key) for key in shapes.keys()]
        needed = RELOAD_MARGIN * sum(
            t.numel() * 4 if family is NATIVE and t.is_floating_point() else t.nbytes for t in tensors
        )
    finally:
        ckpt.close()
    if available is None or needed <= available:
        return True
    if warn:
        warnings.warn(
            f"the whole-model reload check was skipped: loading {name or directory.name} takes about "
            f"{needed / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available (every edited layer was checked "
            "through moelab's reader); pass reload=True (--reload) to run it anyway",
            stacklevel=3,
        )
    return False


# ----------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """What will be written: per edited layer its prefix, layout, home shard and edit; the
    keys that disappear; the new config."""

    config: Config
    ckpt: Checkpoint
    family: Family
    edits: dict[int, LayerEdit]
    num_experts: int
    removed: set[str]
    home: dict[int, str]  # edited layer -> the shard its new tensors go to
    new_config: Config
    keep_quantized: bool  # quantized weights written in the source's format (`moelab.hf.requantize`)

    @classmethod
    def make(
        cls,
        config: Config,
        ckpt: Checkpoint,
        family: Family,
        edits: Mapping[int, LayerEdit],
        keep_quantized: bool,
    ) -> _Plan:
        edits = dict(edits)
        if not edits:
            raise ValueError("no edits: pass {layer index: LayerEdit} for at least one MoE layer")
        moe_layers, mtp_layers = family.moe_layers(ckpt, config), family.mtp_layers
        if bad := sorted(set(edits) - set(moe_layers + mtp_layers)):
            mtp = f" and multi-token prediction layers {mtp_layers}" if mtp_layers else ""
            raise ValueError(f"layers {bad} are not MoE layers of {ckpt.directory}; MoE layers: {moe_layers}{mtp}")
        edited = moe_layers + [i for i in mtp_layers if i in edits]  # an MTP layer not edited is left out
        key, E = config_entry(config, family.num_experts)
        settings = family.router_settings(config)
        for index, edit in edits.items():
            check_edit(index, edit, E, settings, family.identity_count(config))
        _check_expert_map(ckpt.directory, E)
        counts = {i: len(edits[i].sources) if i in edits else E for i in edited}
        widths = _widths(config, family, edits, edited)
        if keep_quantized:
            check_quantized_output(ckpt, family, edits)
        new_config = copy.deepcopy(config) if keep_quantized else ckpt.written_config(config)
        if len(set(counts.values())) > 1 or len(set(widths.values())) > 1:
            per_layer = ", ".join(f"layer {i}: {counts[i]} x {widths[i]}" for i in edited)
            raise ValueError(
                f"the edit leaves MoE layers with different expert counts or widths ({per_layer}; experts x "
                f"width), but config.json holds one {key}"
                + ("" if family is NATIVE else " and transformers cannot build per-layer counts")
                + " and moelab's ModelConfig also has a single MoEConfig. Edit every MoE layer to the same "
                "count and width"
            )
        if family.expert_count_shared_with is not None and counts[moe_layers[0]] != E:
            raise ValueError(
                f"{family.name}'s {key} also sizes {family.expert_count_shared_with}, which this edit leaves as it "
                f"is: transformers could not load {counts[moe_layers[0]]} MoE experts beside {E} of those. Only edits "
                "that keep the expert count can be written (e.g. heapr, which narrows the experts)"
            )
        for name in family.num_experts:
            _set_present(new_config, name, counts[moe_layers[0]])
        if family is NATIVE:
            _cap_compute_budget(new_config["moe"], counts[moe_layers[0]])
        sparse = family.is_moe_layer
        if sparse is not None and (made_dense := [i for i in edited if not sparse(new_config, i)]):
            raise ValueError(
                f"with {counts[moe_layers[0]]} expert(s) per layer, {family.name}'s config.json would make MoE layers "
                f"{made_dense} dense (transformers builds a plain MLP there, which the experts' tensors cannot fill); "
                "keep more experts"
            )
        if any(edit.view is not None for edit in edits.values()):
            width_key, before = config_entry(config, family.expert_width)
            dense = family.dense_width_follows and len(moe_layers) < family.layer_count(config)
            if (family.shared_width_follows or dense) and widths[moe_layers[0]] != before:
                what = "shared experts" if family.shared_width_follows else "dense layers' MLPs"
                raise ValueError(
                    f"{family.name}'s {what} take their width from {width_key} too, so the routed experts "
                    f"cannot get narrower ({before} -> {widths[moe_layers[0]]}) on their own; keep their width "
                    "(e.g. heapr with layout='padded' zeroes pruned neurons at full width)"
                )
            _set_present(new_config, width_key, widths[moe_layers[0]])
            moe = new_config.get("moe") if family is NATIVE else None
            if moe and moe.get("num_shared") and moe.get("shared_hidden_dim") is None:
                moe["shared_hidden_dim"] = moe["num_shared"] * before  # it followed the experts' width
        removed, home = set(), {}
        if extra := unbuilt_layers(config, ckpt, family, edited=edits):
            removed.update(key for keys in extra.values() for key in keys)
            for key in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):
                _set_present(new_config, key, 0)
            warnings.warn(
                f"the stored layers {', '.join(sorted(extra))} (multi-token prediction modules, such as DeepSeek-V3's "
                f"past {family.num_layers[0]} or Qwen3-Next's and Nemotron-H's mtp.*; transformers does not build "
                "them) hold routed experts this edit does not reach: they are left out of the output "
                "(num_nextn_predict_layers set to 0), which would otherwise disagree with its expert count",
                stacklevel=4,
            )
        for index in edits:
            prefix = family.prefix(index)
            layout = family.layout_of(ckpt, index)
            removed.update(layout.router.keys(ckpt, prefix) + layout.experts.keys(ckpt, prefix))
            home[index] = ckpt.shard(prefix + layout.router.weight)
        if keep_quantized:  # scales go with their weights; a layer left out goes whole (kv cache scales too)
            removed.update(part for key in list(removed) for part in ckpt.stored_parts(key))
            removed.update(key for key in ckpt.stored_keys() if key.startswith(tuple(extra)))
        return cls(config, ckpt, family, edits, E, removed, home, new_config, keep_quantized)

    def expert_map(self, source: Path) -> dict[str, Any]:
        """layer -> sources, kept and merged original ids, composed with the source's own map (whose
        "source", the checkpoint those ids number, it keeps)."""
        record = _read_expert_map(source)
        previous = record["layers"]
        layers = {}
        for index, edit in sorted(self.edits.items()):
            before = previous.get(str(index), {}).get("sources")
            sources = [
                sorted(o for e in group for o in (before[e] if before else [e])) for group in edit.sources
            ]
            layers[str(index)] = {
                "sources": sources,
                "kept": [group[0] for group in sources if len(group) == 1],
                "merge_groups": [group for group in sources if len(group) > 1],
                "tensors_replaced": edit.view is not None,
            }
        return {
            "format": EXPERT_MAP_FORMAT,
            "source": record["source"],
            "family": self.family.name,
            "layers": {**{k: v for k, v in previous.items() if k not in layers}, **layers},
        }


def _widths(
    config: Config, family: Family, edits: dict[int, LayerEdit], moe_layers: list[int]
) -> dict[int, Any]:
    """Each MoE layer's expert width after the edit; "as before" where the edit does not say."""
    views = {i: edit.view for i, edit in edits.items() if edit.view is not None}
    if not views:
        return dict.fromkeys(moe_layers, "as before")
    before = config_entry(config, family.expert_width)[1]
    return {i: views[i].experts.hidden_dim if i in views else before for i in moe_layers}


def unbuilt_layers(
    config: Config, ckpt: Checkpoint, family: Family, edited: Iterable[int] = ()
) -> dict[str, list[str]]:
    """{prefix: its keys} of the multi-token prediction modules (which transformers does not
    build) that hold routed experts the edit does not reach, so that the output leaves them out:
    the family's `mtp` layers not among the `edited` ones (each module whole, under its root:
    `model.layers.61.` for DeepSeek-V3, `mtp.` for Qwen3-Next), other stored layers past the
    model's layer count, and, where a layer under the family's `mtp_prefix` has routed experts, the
    module under its root (Nemotron-H's spans `mtp.layers.0.` and `mtp.layers.1.`, DeepSeek-V4's
    `mtp.0.`: all of `mtp.`)."""

    def has_experts(prefix: str) -> bool:
        return any(layout.experts.present(ckpt, prefix) for layout in family.layouts)

    def under(root: str) -> list[str]:
        return [key for key in ckpt.keys() if key.startswith(root)]

    edited, known = set(edited), {module.block for module in family.mtp}
    found = {module.root: under(module.root) for module in family.mtp if module.index not in edited}
    count, layer = family.layer_count(config), family.layer_prefix.format
    found |= {
        layer(n=i): keys
        for i, keys in stored_layers(ckpt, family.layer_prefix).items()
        if i >= count and layer(n=i) not in known and has_experts(layer(n=i))
    }
    if family.mtp_prefix is not None:
        mtp = {
            family.mtp_prefix.format(n=i): keys for i, keys in stored_layers(ckpt, family.mtp_prefix).items()
        }
        if any(has_experts(prefix) for prefix in mtp if prefix not in known):  # the module whole, under its root
            root = family.mtp_prefix.partition("{n}")[0].removesuffix("layers.")  # mtp.layers.{n}., mtp.{n}.: mtp.
            found[root] = [key for key in under(root) if not key.startswith(tuple(known))]
    return found


def _set_present(config: Config, dotted: str, value: Any) -> None:
    """Set config["a"]["b"] for "a.b" where that key exists (aliases that are absent stay absent)."""
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        node[last] = value


def _cap_compute_budget(moe: dict, kept: int) -> None:
    """A moelab config's computation budget (moe.computed_experts_target, LongCat-Flash's K_e) above
    the `kept` experts per layer is capped to them, with a warning: the most a token can compute
    (the config would not load otherwise)."""
    target = moe.get("computed_experts_target")
    if target is not None and target > kept:
        moe["computed_experts_target"] = float(kept)
        warnings.warn(
            f"moe.computed_experts_target {target} (experts computed per token) is more than the {kept} experts "
            f"the edit keeps per layer: written as {float(kept)}",
            stacklevel=5,  # where _Plan.make's own warnings point
        )


def _check_expert_map(source: Path, num_experts: int) -> None:
    """The source's own expert map (it was written by moelab before) names every expert it holds."""
    for index, layer in _read_expert_map(source)["layers"].items():
        if len(layer.get("sources", ())) != num_experts:
            raise ValueError(
                f"{source / EXPERT_MAP_NAME} lists {len(layer.get('sources', ()))} experts for layer {index}, but the "
                f"checkpoint holds {num_experts}: the map does not belong to these weights (they changed after "
                "moelab wrote it); restore the weights, or move the map away to start a new record"
            )


def _read_expert_map(source: Path) -> dict[str, Any]:
    """The expert map `source` holds (moelab wrote it), else an empty one naming `source`."""
    path = source / EXPERT_MAP_NAME
    return read_expert_map(path) if path.is_file() else {"source": str(source), "layers": {}}


# ----------------------------------------------------------------------------- writing


def _write(plan: _Plan, staging: Path, name: str, quiet: bool) -> dict[int, LayerCheck]:
    """Write the weight shards and index into `staging`; return each edited layer's check."""
    ckpt, family = plan.ckpt, plan.family
    view = ModelView(ckpt, plan.config, family, family.layer_count(plan.config))
    by_shard: dict[str, list[str]] = {}
    for key in ckpt.stored_keys() if plan.keep_quantized else ckpt.keys():
        if key not in plan.removed:
            by_shard.setdefault(ckpt.shard(key), []).append(key)
    layers_of: dict[str, list[int]] = {}
    for index, shard in plan.home.items():
        layers_of.setdefault(shard, []).append(index)
    shards = [s for s in ckpt.shards() if by_shard.get(s) or layers_of.get(s)]
    index_file = index_name(ckpt.directory, plan.config)
    has_index = index_file is not None
    names = _shard_names(ckpt.shards(), shards, has_index)
    weight_map, total, checks = {}, 0, {}
    for shard in tqdm(
        shards,
        desc=f"write {name}",
        unit="shard",
        disable=quiet,
        leave=False,
    ):
        tensors: dict[str, Tensor | RawTensor | LazyTensor] = {}
        for index in sorted(layers_of.get(shard, [])):
            new_tensors, checks[index] = _edited_layer(plan, view, index)
            tensors.update(new_tensors)
        for key in by_shard.get(shard, []):  # copied byte for byte (float8 ones dequantized unless kept)
            tensors[key] = ckpt.raw(key) if plan.keep_quantized else ckpt.stored(key)
        save_safetensors_stream(
            tensors, staging / names[shard], metadata=ckpt.metadata(shard) or {"format": "pt"}
        )
        weight_map.update(dict.fromkeys(tensors, names[shard]))
        total += sum(
            t.numel() * t.element_size() if isinstance(t, Tensor) else t.nbytes for t in tensors.values()
        )
        del tensors
        release_freed_memory()
    if has_index:
        index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(staging / index_file, json.dumps(index_doc, indent=2) + "\n")
    return checks


def index_name(source: Path, config: Config) -> str | None:
    """The source's index, rewritten under its own name: the one config.json's `transformers_weights`
    names (the output's config.json names it too), else model.safetensors.index.json where it is."""
    named = config.get("transformers_weights")
    if isinstance(named, str) and named.endswith(".index.json"):
        return named
    return INDEX_NAME if (source / INDEX_NAME).is_file() else None


def _shard_names(before: list[str], after: list[str], has_index: bool) -> dict[str, str]:
    """Keep the source's shard names unless shards disappeared (then renumber -0000i-of-0000n)."""
    if before == after or not has_index:
        return {s: s for s in after}
    return {s: f"model-{i:05d}-of-{len(after):05d}.safetensors" for i, s in enumerate(after, 1)}


def _edited_layer(plan: _Plan, view: ModelView, index: int) -> tuple[dict[str, Tensor], LayerCheck]:
    """The on-disk tensors of edited layer `index`, and the output its written form must give."""
    original = view.layer(index)
    if not isinstance(original, MoELayerView):
        raise CheckpointError(f"layer {index} of {plan.ckpt.directory} reads as dense; it cannot be edited")
    edit = plan.edits[index]
    x = torch.randn(
        CHECK_TOKENS,
        original.router.dim,  # the model dim (a latent block's experts read another)
        generator=torch.Generator().manual_seed(index),
        dtype=torch.float64,
    )
    ids = _check_router_input(original.router, index)
    edited = apply_edit(original, edit)
    prefix = plan.family.prefix(index)
    layout = plan.family.layout_of(plan.ckpt, index)
    padding = edited.router.identity_experts if layout.stored_padding(plan.ckpt, prefix) else 0
    tensors = layout.encode(edited, prefix, plan.ckpt, padding)
    for key, t in tensors.items():  # before quantizing: MXFP4 has no NaN or Inf to carry them
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"layer {index}: the edited tensor {key} has NaN or Inf; fix the edit")
    quantized = {}
    if plan.keep_quantized:
        edited, quantized = quantized_experts(plan.ckpt, layout.experts, prefix, edited, edit)
    expected = moe_output(original, x, edit.selection, ids) if edit.view is None else moe_output(edited, x, ids=ids)
    del original  # one layer of source tensors at a time: only the edited ones are kept
    plain = {k: t for k, t in tensors.items() if not any(p in quantized for p in plan.ckpt.stored_parts(k))}
    return plain | quantized, LayerCheck(x, expected, ids)  # the quantized parts in place of the plain tensors


def _check_router_input(router: RouterView, index: int) -> Tensor | None:
    """The per-token input the router of layer `index` reads beside x on the write check's tokens
    (`Router.context_input`): random token ids [T] for a hash router, random router states [T, R]
    (float64) for an MLP router that reads them (ZAYA's); None for others."""
    generator = torch.Generator().manual_seed(index)
    if router.token_experts is not None:
        return torch.randint(0, router.token_experts.shape[0], (CHECK_TOKENS,), generator=generator)
    if router.mlp is not None and router.mlp.state_scale is not None:
        return torch.randn(CHECK_TOKENS, router.mlp.width, generator=generator, dtype=torch.float64)
    return None


def copy_side_files(source: Path, staging: Path) -> None:
    """Tokenizer, generation config, README, ...: everything but weights, config and moelab's
    own files about the source (its expert map, compression report and statistics, remade for the
    output). Weights in any other format or folder (pickles, `original/*.pth`, ONNX, GGUF, ...)
    are left behind: they would be stale copies of the unedited model. Links to outside the
    checkpoint are copied as links (with a warning), never by content."""
    for entry in sorted(source.iterdir()):
        name = entry.name
        if name.startswith((".", "moelab_")) or name.endswith(".index.json") or name == "config.json":
            continue
        if note := copy_side_file(entry, staging / name, source, skip=_is_weight_file):
            warnings.warn(note, stacklevel=3)


def _is_weight_file(path: Path) -> bool:
    return WEIGHT_FILE.fullmatch(path.name) is not None
