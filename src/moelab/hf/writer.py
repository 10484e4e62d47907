"""Write-back: rewrite a checkpoint after layer-level edits to its routed experts.

Shape legend: E experts before the edit, E' after, D model dim, I expert hidden dim, T tokens.

An edit says, per MoE layer, where each new expert comes from (`LayerEdit.sources`: one
original id for a kept expert, several for a merged one) and, unless the experts were only
selected, the new router and expert tensors (an edited `MoELayerView`). `write_checkpoint`
copies everything else untouched, shard by shard (one shard plus one layer in memory), keeps the
source's on-disk layout, renumbers experts 0..E'-1, edits config.json as JSON (only the expert
count and width keys), records `moelab_expert_map.json` and checks its output before it reports
success:

- the written checkpoint reads back through the view with E' experts in every MoE layer,
  agreeing with config.json;
- every edited layer computes what the edit means on the original: for selected experts, the
  original layer with the dropped experts' router logits (and selection scores) set to -inf
  before top-k (`masked_moe_layer`); for replaced tensors, the edited view; no NaN/Inf;
- transformers (or moelab, for its own checkpoints) loads it strictly, with no missing,
  unexpected or mismatched keys, and its forward pass is finite.

Everything is written into a staging directory beside `out` and renamed into place at the end
(`moelab.io.StagedOutput`: `out` must be new, or moelab's checkpoint to replace with
`overwrite`, and never the source, inside it or above it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moelab.hf.adapters import NATIVE, resolve
from moelab.hf.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint, CheckpointError
from moelab.hf.layouts import Config, Family, config_entry, config_value
from moelab.hf.native import moe_layer_from_view
from moelab.hf.view import ModelView, MoELayerView
from moelab.io import StagedOutput, atomic_write_text, copy_side_file, save_safetensors
from moelab.models.pretrained import CHECKPOINT_KIND
from moelab.nn.moe import MoELayer

EXPERT_MAP_NAME = "moelab_expert_map.json"
CHECK_TOKENS = 64


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
        object.__setattr__(self, "sources", tuple(tuple(_expert_id(e) for e in group) for group in self.sources))
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


def drop_experts(
    source: str | os.PathLike,
    out: str | os.PathLike,
    drop: Mapping[int, Iterable[int]] | Iterable[int],
    **kwargs: Any,
) -> Path:
    """Write `source` without the experts `drop`: a list of ids (dropped in every MoE layer) or
    {layer index: ids}. Keyword arguments go to `write_checkpoint`. Returns `out`."""
    config, ckpt, family = resolve(source)
    ckpt.close()
    E = config_entry(config, family.num_experts)[1]
    if not isinstance(drop, Mapping):
        ids = list(drop)
        drop = {i: ids for i in _moe_layers(family, ckpt, config)}
    drop = {i: list(ids) for i, ids in drop.items()}
    if not any(drop.values()):
        raise ValueError("drop names no experts; nothing would change (pass the expert ids to drop)")
    return write_checkpoint(source, out, {i: LayerEdit.drop(ids, E) for i, ids in drop.items()}, **kwargs)


def write_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    edits: Mapping[int, LayerEdit],
    *,
    reload: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write `source` with `edits` ({MoE layer index: LayerEdit}) applied into the new directory
    `out` (see the module docstring). reload: also load the result with transformers (or moelab)
    as a postcondition; that loads the whole model into memory, so turn it off only for models
    larger than RAM. overwrite: replace the checkpoint moelab wrote to `out` before. Returns `out`."""
    source = Path(source).resolve()
    config, ckpt, family = resolve(source)
    try:
        plan = _Plan.make(config, ckpt, family, edits)
        with StagedOutput(out, CHECKPOINT_KIND, inputs=[source], overwrite=overwrite) as staging:
            checks = _write(plan, staging, Path(out).name, quiet)
            _copy_side_files(source, staging)
            atomic_write_text(staging / "config.json", json.dumps(plan.new_config, indent=2) + "\n")
            atomic_write_text(staging / EXPERT_MAP_NAME, json.dumps(plan.expert_map(source), indent=2) + "\n")
            _check_written(plan, staging, checks)
            if reload:
                _check_reload(staging, family, quiet)
    finally:
        ckpt.close()
    return Path(out)


def apply_edit(layer: MoELayerView, edit: LayerEdit) -> MoELayerView:
    """The layer after `edit`, with the original's dtypes: original experts selected by
    `edit.sources`, or `edit.view`'s tensors checked against the original's settings."""
    if edit.view is None:
        idx = torch.tensor(edit.selection)
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        router = dataclasses.replace(
            layer.router, **{name: pick(getattr(layer.router, name)) for name in _ROUTER_TENSORS}
        )
        experts = dataclasses.replace(
            layer.experts, **{name: pick(getattr(layer.experts, name)) for name in _EXPERT_TENSORS}
        )
        return dataclasses.replace(layer, router=router, experts=experts)
    new = edit.view
    _check_same_settings(layer, new)
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
            name: _cast(getattr(new.experts, name), getattr(layer.experts, name), layer.experts.gate)
            for name in _EXPERT_TENSORS
        },
    )
    return dataclasses.replace(layer, router=router, experts=experts)


def masked_moe_layer(layer: MoELayerView, keep: Sequence[int]) -> MoELayer:
    """The original layer, with every expert outside `keep` masked out of routing: its router
    logit is -inf before scoring (so softmax renormalises over the kept experts) and its
    selection score is -inf (so a correction bias cannot pick it). What dropping those experts
    should compute. forward(x [..., D]) -> (y, MoEResult)."""
    moe = moe_layer_from_view(layer)
    dropped = torch.tensor(sorted(set(range(layer.router.num_experts)) - set(keep)), dtype=torch.long)
    router = moe.router
    logits = router.router_logits
    router.router_logits = lambda x: logits(x).index_fill(-1, dropped, float("-inf"))  # this instance only
    if getattr(router, "expert_bias", None) is not None:
        router.expert_bias.index_fill_(0, dropped, float("-inf"))
    return moe


# ----------------------------------------------------------------------------- planning

_ROUTER_TENSORS = ("weight", "bias", "correction_bias")
_EXPERT_TENSORS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


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

    @classmethod
    def make(cls, config: Config, ckpt: Checkpoint, family: Family, edits: Mapping[int, LayerEdit]) -> _Plan:
        edits = dict(edits)
        if not edits:
            raise ValueError("no edits: pass {layer index: LayerEdit} for at least one MoE layer")
        moe_layers = _moe_layers(family, ckpt, config)
        if bad := sorted(set(edits) - set(moe_layers)):
            raise ValueError(f"layers {bad} are not MoE layers of {ckpt.directory}; MoE layers: {moe_layers}")
        key, E = config_entry(config, family.num_experts)
        settings = family.router_settings(config)
        for index, edit in edits.items():
            _check_edit(index, edit, E, settings)
        counts = {i: len(edits[i].sources) if i in edits else E for i in moe_layers}
        widths = _widths(config, family, edits, moe_layers)
        new_config = copy.deepcopy(config)
        if len(set(counts.values())) > 1 or len(set(widths.values())) > 1:
            per_layer = ", ".join(f"layer {i}: {counts[i]} x {widths[i]}" for i in moe_layers)
            raise ValueError(
                f"the edit leaves MoE layers with different expert counts or widths ({per_layer}; experts x "
                f"width), but config.json holds one {key}"
                + ("" if family is NATIVE else " and transformers cannot build per-layer counts")
                + " and moelab's ModelConfig also has a single MoEConfig. Edit every MoE layer to the same "
                "count and width"
            )
        for name in family.num_experts:
            _set_present(new_config, name, counts[moe_layers[0]])
        if any(edit.view is not None for edit in edits.values()):
            width_key = config_entry(config, family.expert_width)[0]
            _set_present(new_config, width_key, widths[moe_layers[0]])
        removed, home = set(), {}
        for index in edits:
            prefix = family.layer_prefix.format(n=index)
            layout = family.layout_of(ckpt, index)
            removed.update(layout.router.keys(ckpt, prefix) + layout.experts.keys(ckpt, prefix))
            home[index] = ckpt.shard(prefix + layout.router.weight)
        return cls(config, ckpt, family, edits, E, removed, home, new_config)

    def expert_map(self, source: Path) -> dict[str, Any]:
        """layer -> sources, kept and merged original ids, composed with the source's own map."""
        previous = _read_expert_map(source)
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
            "format": "moelab-expert-map/1",
            "source": str(source),
            "family": self.family.name,
            "layers": {**{k: v for k, v in previous.items() if k not in layers}, **layers},
        }


def _moe_layers(family: Family, ckpt: Checkpoint, config: Config) -> list[int]:
    return [
        i for i in range(config_value(config, *family.num_layers)) if family.layout_of(ckpt, i) is not None
    ]


def _check_edit(index: int, edit: LayerEdit, E: int, settings: dict[str, Any]) -> None:
    """Ids in range, enough experts for top-k, group-limited routing kept valid."""
    where = f"layer {index}"
    ids = [e for group in edit.sources for e in group]
    if bad := sorted(e for e in ids if e >= E):
        raise ValueError(f"{where}: expert ids {bad} out of range; the layer has experts 0..{E - 1}")
    new_E, top_k = len(edit.sources), settings["top_k"]
    if new_E < top_k:
        raise ValueError(
            f"{where}: the edit leaves {new_E} experts but the router picks top_k={top_k} per token; keep at "
            f"least {top_k} experts (or lower num_experts_per_tok first)"
        )
    n_group, topk_group = settings.get("n_group", 1), settings.get("topk_group", 1)
    if n_group == 1:
        return
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
    if top_k > topk_group * size:
        raise ValueError(
            f"{where}: top_k={top_k} exceeds the {topk_group * size} experts of the topk_group={topk_group} "
            f"groups left after the edit; keep more experts per group"
        )
    if settings["score_func"] == "sigmoid" and size < 2:
        raise ValueError(
            f"{where}: DeepSeek-V3-style routing adds each group's two best experts, so every group must "
            f"keep at least 2 experts (the edit keeps {size}); keep more experts per group"
        )


def _widths(
    config: Config, family: Family, edits: dict[int, LayerEdit], moe_layers: list[int]
) -> dict[int, Any]:
    """Each MoE layer's expert width after the edit; "as before" where the edit does not say."""
    views = {i: edit.view for i, edit in edits.items() if edit.view is not None}
    if not views:
        return dict.fromkeys(moe_layers, "as before")
    before = config_entry(config, family.expert_width)[1]
    return {i: views[i].experts.hidden_dim if i in views else before for i in moe_layers}


def _check_same_settings(layer: MoELayerView, new: MoELayerView) -> None:
    """The writer changes tensors and counts; routing and activation settings live in config.json."""
    fields = {
        "router": (
            layer.router,
            new.router,
            ("score_func", "top_k", "renormalize", "route_scale", "n_group", "topk_group", "jitter_eps"),
        ),
        "experts": (
            layer.experts,
            new.experts,
            ("activation", "swiglu_alpha", "swiglu_limit", "scale_input"),
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
    same_shared = (new.shared is None) == (layer.shared is None) and (
        new.shared is None
        or all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b.to(a.dtype)))
            for a, b in (
                (getattr(layer.shared, n), getattr(new.shared, n))
                for n in ("gate", "up", "down", "sigmoid_gate")
            )
        )
    )
    if not same_shared:
        raise ValueError(
            f"layer {layer.index}: the edited view changes the shared experts; the writer copies shared "
            "experts unchanged, so keep the original `shared` in the view"
        )


def _cast(new: Tensor | None, old: Tensor | None, like: Tensor) -> Tensor | None:
    """`new` in the dtype the source stores this tensor in (or its layer's main tensor's)."""
    return None if new is None else new.to((old if old is not None else like).dtype).contiguous()


def _set_present(config: Config, dotted: str, value: Any) -> None:
    """Set config["a"]["b"] for "a.b" where that key exists (aliases that are absent stay absent)."""
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        node[last] = value


def _read_expert_map(source: Path) -> dict[str, Any]:
    path = source / EXPERT_MAP_NAME
    return json.loads(path.read_text())["layers"] if path.is_file() else {}


# ----------------------------------------------------------------------------- writing


@dataclass
class _LayerCheck:
    """x [T, D] (float64) and what the edited layer must output on it."""

    x: Tensor
    expected: Tensor


def _write(plan: _Plan, staging: Path, name: str, quiet: bool) -> dict[int, _LayerCheck]:
    """Write the weight shards and index into `staging`; return each edited layer's check."""
    ckpt, family = plan.ckpt, plan.family
    view = ModelView(ckpt, plan.config, family, config_value(plan.config, *family.num_layers))
    by_shard: dict[str, list[str]] = {}
    for key in ckpt.keys():
        if key not in plan.removed:
            by_shard.setdefault(ckpt.shard(key), []).append(key)
    layers_of: dict[str, list[int]] = {}
    for index, shard in plan.home.items():
        layers_of.setdefault(shard, []).append(index)
    shards = [s for s in ckpt.shards() if by_shard.get(s) or layers_of.get(s)]
    has_index = (ckpt.directory / INDEX_NAME).is_file()
    names = _shard_names(ckpt.shards(), shards, has_index)
    weight_map, total, checks = {}, 0, {}
    for shard in tqdm(
        shards,
        desc=f"write {name}",
        unit="shard",
        disable=quiet,
        leave=False,
    ):
        tensors: dict[str, Tensor] = {}
        for index in sorted(layers_of.get(shard, [])):
            new_tensors, checks[index] = _edited_layer(plan, view, index)
            tensors.update(new_tensors)
        for key in by_shard.get(shard, []):
            tensors[key] = ckpt.get(key)
        save_safetensors(tensors, staging / names[shard], metadata=ckpt.metadata(shard) or {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, names[shard]))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if has_index:
        index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(staging / INDEX_NAME, json.dumps(index_doc, indent=2) + "\n")
    return checks


def _shard_names(before: list[str], after: list[str], has_index: bool) -> dict[str, str]:
    """Keep the source's shard names unless shards disappeared (then renumber -0000i-of-0000n)."""
    if before == after or not has_index:
        return {s: s for s in after}
    return {s: f"model-{i:05d}-of-{len(after):05d}.safetensors" for i, s in enumerate(after, 1)}


def _edited_layer(plan: _Plan, view: ModelView, index: int) -> tuple[dict[str, Tensor], _LayerCheck]:
    """The on-disk tensors of edited layer `index`, and the output its written form must give."""
    original = view.layer(index)
    if not isinstance(original, MoELayerView):
        raise CheckpointError(f"layer {index} of {plan.ckpt.directory} reads as dense; it cannot be edited")
    edit = plan.edits[index]
    edited = apply_edit(original, edit)
    prefix = plan.family.layer_prefix.format(n=index)
    layout = plan.family.layout_of(plan.ckpt, index)
    tensors = layout.router.encode(edited.router, prefix) | layout.experts.encode(edited.experts, prefix)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"layer {index}: the edited tensor {key} has NaN or Inf; fix the edit")
    reference = (
        masked_moe_layer(original, edit.selection) if edit.view is None else moe_layer_from_view(edited)
    )
    x = torch.randn(
        CHECK_TOKENS,
        original.experts.dim,
        generator=torch.Generator().manual_seed(index),
        dtype=torch.float64,
    )
    return tensors, _LayerCheck(x, _run(reference, x))


def _run(layer: MoELayer, x: Tensor) -> Tensor:
    with torch.no_grad():
        return layer.double()(x)[0]


def _copy_side_files(source: Path, staging: Path) -> None:
    """Tokenizer, generation config, README, ...: everything but weights, config and expert map.
    Pickle weights are left behind: they would be stale copies of the unedited model. Links to
    outside the checkpoint are copied as links (with a warning), never by content."""
    for entry in sorted(source.iterdir()):
        name = entry.name
        if (
            name.startswith(".")
            or name.endswith(".safetensors")
            or name.endswith(PICKLE_SUFFIXES)
            or name in (INDEX_NAME, "config.json", EXPERT_MAP_NAME)
        ):
            continue
        if note := copy_side_file(entry, staging / name, source):
            warnings.warn(note, stacklevel=3)


# ----------------------------------------------------------------------------- postconditions


class WriteCheckError(CheckpointError):
    """The written checkpoint failed a postcondition; nothing was written to `out`."""


def _fail(what: str) -> WriteCheckError:
    return WriteCheckError(
        f"write-back postcondition failed, nothing was written: {what}. This is a moelab bug or an edit "
        "this family cannot express; please report it with the edit"
    )


def _check_written(plan: _Plan, staging: Path, checks: dict[int, _LayerCheck]) -> None:
    """The output reads back through the view, with the new count in every MoE layer, and every
    edited layer computes what its check expects."""
    config, ckpt, family = resolve(staging)
    try:
        view = ModelView(ckpt, config, family, config_value(config, *family.num_layers))
        E = config_entry(config, family.num_experts)[1]
        for index in _moe_layers(family, ckpt, config):
            rows = ckpt.shape(
                family.layer_prefix.format(n=index) + family.layout_of(ckpt, index).router.weight
            )[0]
            if rows != E:
                raise _fail(f"layer {index} has {rows} router rows but config.json says {E} experts")
        for index, check in checks.items():
            layer = view.layer(index)  # also checks the experts on disk against config.json
            got = _run(moe_layer_from_view(layer), check.x)
            scale = max(1.0, check.expected.abs().max().item())
            if not torch.isfinite(got).all():
                raise _fail(f"layer {index} outputs NaN or Inf")
            error = (got - check.expected).abs().max().item()
            if error > 1e-5 * scale:
                raise _fail(
                    f"layer {index} differs from the edit applied to the original (masked-router simulation "
                    f"for selected experts) by {error:.3g} (max |output| {scale:.3g})"
                )
    except WriteCheckError:
        raise
    except CheckpointError as err:
        raise _fail(f"the written checkpoint does not read back: {err}") from err
    finally:
        ckpt.close()


def _check_reload(staging: Path, family: Family, quiet: bool) -> None:
    """Strict load with the library that owns the format, then a finite forward pass."""
    if family is NATIVE:
        from moelab.models import load_pretrained

        try:
            model = load_pretrained(staging)
        except ValueError as err:
            raise _fail(f"moelab.models.load_pretrained refuses it: {err}") from err
        vocab = model.config.vocab_size
        with torch.no_grad():
            logits = model.eval()(torch.arange(8)[None] % vocab).logits
    else:
        model = load_transformers_strict(staging, quiet)
        vocab = model.config.get_text_config().vocab_size
        with torch.no_grad():
            logits = model.eval()(torch.arange(8)[None] % vocab).logits
    if not torch.isfinite(logits).all():
        raise _fail("the reloaded model's logits contain NaN or Inf")


def load_transformers_strict(path: Path, quiet: bool, **kwargs: Any):
    """AutoModelForCausalLM from the local `path` (no hub, no remote code), in eval mode; a
    WriteCheckError if any key is missing, unexpected or mismatched."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    if quiet:
        logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, local_files_only=True, trust_remote_code=False, **kwargs
        )
    finally:
        if bars:
            logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise _fail(f"transformers loads it with {problems}")
    return model.eval()
