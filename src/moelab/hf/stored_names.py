"""How transformers maps the names a checkpoint stores onto its modules' names when it loads it (its
conversion mapping, `transformers.conversion_mapping`), as `Family.stored_renames`, `stored_splits` and
`stored_shards`: what the runs that load tensors by name (layer by layer, offloaded) must read likewise.
Renames are read as transformers applies them, to the checkpoint's own names (`renamed_on_loading`);
splits and concatenations only in their plain forms (one name part, along dim 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from moelab.hf.checkpoint import Checkpoint

_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _conversions(model_type: str | None) -> list:
    """transformers' conversion mapping for the model_type: how it renames, splits and concatenates
    stored tensors on loading (what the layer-by-layer and offloaded runs must read likewise)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return list(get_checkpoint_conversion_mapping(model_type) or ())


def _plain(pattern: str) -> str | None:
    """A conversion pattern as the plain name part it matches (escaped dots undone), None for a
    regular expression that matches more than one name (anchors, groups, wildcards)."""
    text = pattern.replace("\\.", ".")
    return None if re.search(r"[\\^$*+?()\[\]{}|]", text) else text


def conversion_shards(model_type: str | None) -> tuple[tuple[str, str], ...]:
    """`Family.stored_shards` as transformers' conversion mapping for the model_type declares them: its
    converters that concatenate one pattern's shards along dim 0 (Qwen4-Exp's n-gram embedding)."""
    from transformers.core_model_loading import Concatenate, WeightConverter

    return tuple(
        (c.target_patterns[0], c.source_patterns[0])
        for c in _conversions(model_type)
        if isinstance(c, WeightConverter)
        and len(c.source_patterns) == len(c.target_patterns) == len(c.operations) == 1
        and isinstance(c.operations[0], Concatenate)
        and c.operations[0].dim == 0
        and "*" in c.source_patterns[0]
    )


def renamed_on_loading(model_types: Iterable[str | None], keys: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`Family.stored_renames` (in memory, on disk), one pair per stored name in `keys` that the
    conversion mappings of `model_types` rename: their renames applied in turn, as transformers
    applies them when it loads (regular expressions, chains: Hunyuan 4's hc_pre.hc_attn_layer.hc_fn is
    attn_hc.fn in memory; MiMo-V2-Flash's attention_sink_bias is sinks; a multimodal model's first,
    then its language model's). Routed experts' per-expert tensors are left out (the layouts read them)."""
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [c for t in model_types if t for c in _conversions(t) if isinstance(c, WeightRenaming)]
    if not renamings:
        return ()
    pairs = ((apply_renamings(key, renamings), key) for key in keys if not _PER_EXPERT.search(key))
    return tuple((memory, disk) for memory, disk in pairs if memory != disk)


def conversion_splits(model_type: str | None) -> tuple[tuple[tuple[str, ...], str], ...]:
    """`Family.stored_splits` from the conversion mapping's converters that split one stored tensor
    along dim 0 into parts sized like their parameters (Lara-Mini's linear_attn.in_proj into in_proj_qkv,
    _z, _b and _a), as moelab reads them."""
    from transformers.core_model_loading import Split, WeightConverter

    splits = []
    for c in _conversions(model_type):
        if not (isinstance(c, WeightConverter) and len(c.source_patterns) == 1 and len(c.target_patterns) > 1):
            continue
        if [type(op) for op in c.operations] != [Split] or c.operations[0].dim != 0:
            continue
        parts, fused = tuple(_plain(p) for p in c.target_patterns), _plain(c.source_patterns[0])
        if fused and all(parts):
            splits.append((parts, fused))
    return tuple(splits)


def conversion_merges(model_types: Iterable[str | None]) -> tuple[tuple[str, tuple[str, ...], object], ...]:
    """(the in-memory name part, the stored name parts, transformers' converter) of the tensors that
    transformers' conversion mappings for `model_types` build from several stored ones (Inkling 2
    Loop's message_input.query from its two middle_cycle_cross_pass query tensors); routed experts'
    tensors (the layouts read them) left out."""
    from transformers.core_model_loading import WeightConverter

    merges = []
    for c in (c for t in model_types if t for c in _conversions(t)):
        if not (isinstance(c, WeightConverter) and len(c.source_patterns) > 1 and len(c.target_patterns) == 1):
            continue
        target, sources = _plain(c.target_patterns[0]), tuple(_plain(p) for p in c.source_patterns)
        if target and all(sources) and ".experts." not in f".{target}":
            merges.append((target, sources, c))
    return tuple(merges)


def read_merged(
    checkpoint: Checkpoint, name: str, model_types: Iterable[str | None], stored_as: Callable[[str], str]
) -> Tensor | None:
    """Tensor `name` (absent from the checkpoint) where the checkpoint stores it as the several
    tensors transformers merges on loading by one operation of its conversion mapping
    (`conversion_merges`), each under the name `stored_as` gives (the family's renames applied),
    built by that operation as transformers builds it; None where it does not."""
    for target, sources, converter in conversion_merges(model_types):
        stored = [stored_as(name.replace(target, source)) for source in sources]
        if target not in name or len(converter.operations) != 1 or not all(k in checkpoint for k in stored):
            continue
        parts = {pattern: checkpoint.get(k) for pattern, k in zip(converter.source_patterns, stored)}
        merged = converter.operations[0].convert(parts, converter.source_patterns, converter.target_patterns)
        return merged[converter.target_patterns[0]]
    return None
