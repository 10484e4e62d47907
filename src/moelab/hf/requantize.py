"""Writing an edited layer's experts in a quantized source's own format (`keep_quantized` of
`moelab.hf.writer`; `moelab compress --keep-quantized`).

Float8 sources (`moelab.hf.float8`) whose experts are modules of their own (DeepSeek-V4's FP4
experts among them), and GPT-OSS's MXFP4 (`moelab.hf.mxfp4`): a kept expert is the source's stored bytes (weights, scales, activation
scales) under its new number; a merged or narrowed one is quantized as the source quantizes, and
the layer the writer checks gets the dequantized values of what is written. `check_keep_quantized`
refuses what cannot be written so before anything is calibrated and gives the width granularity
narrowing needs; `check_still_quantized` is the postcondition that nothing was written plain.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from moelab.hf.adapters import resolve
from moelab.hf.checkpoint import DTYPES, Checkpoint
from moelab.hf.edit import LayerEdit
from moelab.hf.float8 import (
    ACTIVATION_SCALES,
    FP4_GROUP,
    Float8Checkpoint,
    dequantized,
    fp4_scales,
    quantize,
    quantize_fp4,
)
from moelab.hf.layouts import Family, PerExpert, TransposedGateUp, expert_indices
from moelab.hf.mxfp4 import BLOCKS, GROUP_BYTES, SCALES, Mxfp4Checkpoint, dequantized_mxfp4, quantized_mxfp4
from moelab.hf.postconditions import postcondition_error
from moelab.hf.view import MoELayerView
from moelab.io import RawTensor


def check_keep_quantized(
    source: str | os.PathLike, layers: Iterable[int] | None = None, mtp_layers: Iterable[int] = ()
) -> int:
    """keep_quantized's refusals (`check_quantized_output`) for editing MoE layers `layers` of
    `source` (default: all) and its multi-token prediction layers `mtp_layers`, from its headers:
    for callers that check before they calibrate. Returns the granularity a narrowed width needs
    (`_width_align`)."""
    config, ckpt, family = resolve(source)
    try:
        layers = [*(family.moe_layers(ckpt, config) if layers is None else layers), *mtp_layers]
        check_quantized_output(ckpt, family, layers)
        return _width_align(ckpt, family, layers)
    finally:
        ckpt.close()


def _width_align(ckpt: Float8Checkpoint | Mxfp4Checkpoint, family: Family, layers: list[int]) -> int:
    """The multiple a narrowed expert width must be for the quantized output to store it as the
    source does: an MXFP4 group (32: down_proj's input dim), or the float8 blocks along the width
    (gate and up rows, down columns) where the source's experts are whole blocks of a fixed size
    (1 where a block follows the weight's shape: per-tensor and per-channel scales), or FP4's block
    read off its scales (DeepSeek-V4's: 32 down columns), in every layer
    of `layers` (one width for all)."""
    if not layers:
        return 1
    if isinstance(ckpt, Mxfp4Checkpoint):
        return 2 * GROUP_BYTES
    align = 1
    for index in layers:
        prefix = family.prefix(index)
        for part in family.layout_of(ckpt, index).experts.parts(ckpt, prefix, 0):
            dim = -1 if part.part == "down" else -2  # where the expert's width lies in this weight
            if ckpt.is_fp4(part.name):  # DeepSeek-V4's FP4: the block read off its scales (down: 32 columns)
                align = math.lcm(align, ckpt.block(part.name)[dim])
                continue
            if not ckpt.is_float8(part.name):
                continue
            shape = ckpt.entry(part.name)[1]
            probe = list(shape)
            probe[dim] += 1
            size = ckpt.scheme.block(shape)[dim]
            if ckpt.scheme.block(tuple(probe))[dim] == size and shape[dim] % size == 0:
                align = math.lcm(align, size)
    return align


def check_quantized_output(ckpt: Checkpoint, family: Family, edits: Iterable[int]) -> None:
    """keep_quantized needs a quantized source whose edited layers (`edits`: their indices) store
    their experts as its releases do: float8 (or DeepSeek-V4's FP4) ones as modules of their own,
    each projection quantized in all of a layer's experts or in none, with a router that is not
    quantized; MXFP4 ones (GPT-OSS) stacked and transposed, both projections MXFP4."""
    if not isinstance(ckpt, Float8Checkpoint | Mxfp4Checkpoint):
        raise ValueError(
            f"keep_quantized writes a quantized checkpoint (FP8, MXFP4) in its own format, but {ckpt.directory} is not "
            "one (its weights are plain, or quantized otherwise); write it without keep_quantized"
        )
    for index in edits:
        layout, prefix = family.layout_of(ckpt, index), family.prefix(index)
        if isinstance(ckpt, Mxfp4Checkpoint):
            experts = layout.experts
            if not isinstance(experts, TransposedGateUp) or not all(
                ckpt.decodes(prefix + name) for name in (experts.gate_up, experts.down)
            ):
                raise ValueError(
                    f"keep_quantized: layer {index} of {ckpt.directory} does not store its experts as GPT-OSS's MXFP4 "
                    "(gate_up_proj and down_proj blocks and scales); write plain weights (without keep_quantized)"
                )
            continue
        if not isinstance(layout.experts, PerExpert):
            raise ValueError(
                f"keep_quantized: layer {index} of {ckpt.directory} stores its experts stacked "
                f"({type(layout.experts).__name__}); moelab writes float8 experts stored one module each (as the "
                "FP8 releases store them). Write plain weights (without keep_quantized)"
            )
        if ckpt.is_quantized(prefix + layout.router.weight):
            raise ValueError(
                f"keep_quantized: layer {index}'s router weight is float8; moelab edits plain routers only"
            )
        _check_one_format(ckpt, layout.experts, prefix, index)


def _check_one_format(ckpt: Float8Checkpoint, experts: PerExpert, prefix: str, index: int) -> None:
    """Every expert of layer `index` stores each projection as expert 0 does, quantized or plain,
    with the same companions (scale, activation scales): transformers stacks a layer's experts in
    one format, and a merged expert has one."""
    first = experts.parts(ckpt, prefix, 0)
    for e in expert_indices(ckpt, prefix + experts.down):
        for part, reference in zip(experts.parts(ckpt, prefix, e), first):
            if ckpt.is_quantized(part.name) != ckpt.is_quantized(reference.name):
                quantized, plain = (reference, part) if ckpt.is_quantized(reference.name) else (part, reference)
                raise ValueError(
                    f"keep_quantized: layer {index} stores {quantized.name} quantized but {plain.name} plain; "
                    "transformers loads a layer's experts in one format, so the output could not be loaded either. "
                    "Write plain weights (without keep_quantized)"
                )
            if ckpt.is_quantized(part.name) and (
                (has := set(ckpt.companions(part.name).values()))
                != (want := set(ckpt.companions(reference.name).values()))
            ):
                raise ValueError(
                    f"keep_quantized: layer {index}'s {part.name} is stored with {sorted(has)}, but "
                    f"{reference.name} with {sorted(want)}: the checkpoint is incomplete (a missing scale or "
                    "activation scale). Write plain weights (without keep_quantized)"
                )


def check_still_quantized(
    ckpt: Checkpoint, family: Family, edits: Mapping[int, LayerEdit], directory: Path
) -> None:
    """keep_quantized's postcondition: every expert weight of the edited layers that the source
    stores quantized (float8, MXFP4) is stored so in the output too, part by part (a quantizer that
    silently skips experts is a failure users report of llm-compressor and ModelOpt)."""
    _, written, _ = resolve(directory)

    def quantized(checkpoint: Checkpoint, name: str) -> bool:
        return checkpoint.stored_parts(name) != [name]

    try:
        for index, edit in edits.items():
            prefix, experts = family.prefix(index), family.layout_of(ckpt, index).experts
            if isinstance(experts, TransposedGateUp):  # MXFP4: the stacked projections
                pairs = [(prefix + n, [prefix + n]) for n in (experts.gate_up, experts.down)]
            else:  # float8: each part of expert 0 in the source, that part of every expert written
                parts = [experts.parts(written, prefix, e) for e in range(len(edit.sources))]
                pairs = [
                    (p.name, [each[i].name for each in parts])
                    for i, p in enumerate(experts.parts(ckpt, prefix, 0))
                ]
            for source, outputs in pairs:
                if quantized(ckpt, source) and (plain := [n for n in outputs if not quantized(written, n)]):
                    raise postcondition_error(
                        f"layer {index}'s expert weights {', '.join(plain[:3])} are stored plain, but the source stores "
                        "them quantized and keep_quantized was asked for"
                    )
    finally:
        written.close()


def quantized_experts(
    ckpt: Float8Checkpoint | Mxfp4Checkpoint, layout, prefix: str, edited: MoELayerView, edit: LayerEdit
) -> tuple[MoELayerView, dict[str, Tensor | RawTensor]]:
    """The edited layer's experts in the source's format, and the layer a reader of them gets
    (`_float8_experts`, `_mxfp4_experts`)."""
    if isinstance(ckpt, Mxfp4Checkpoint):
        return _mxfp4_experts(ckpt, layout, prefix, edited, edit)
    return _float8_experts(ckpt, layout, prefix, edited, edit)


def _mxfp4_experts(
    ckpt: Mxfp4Checkpoint, layout: TransposedGateUp, prefix: str, edited: MoELayerView, edit: LayerEdit
) -> tuple[MoELayerView, dict[str, Tensor]]:
    """GPT-OSS's MXFP4 experts after the edit: a kept expert (one source, tensors unchanged) is the
    source's blocks and scales; any other (merged, narrowed) is quantized (`quantized_mxfp4`), and
    the layer gets its dequantized values."""
    plain = layout.encode(edited.experts, prefix)
    stored, changed = {}, False
    for name in (prefix + layout.gate_up, prefix + layout.down):
        value, source_blocks, source_scales = plain[name], None, None
        blocks, scales = [], []
        for j, group in enumerate(edit.sources):
            if len(group) == 1 and (edit.view is None or (
                value.shape[1:] == ckpt.shape(name)[1:] and torch.equal(value[j], ckpt.get(name, range(group[0], group[0] + 1))[0])
            )):  # fmt: skip
                if source_blocks is None:
                    source_blocks, source_scales = (
                        ckpt.stored_value(name + BLOCKS),
                        ckpt.stored_value(name + SCALES),
                    )
                blocks.append(source_blocks[group[0]])
                scales.append(source_scales[group[0]])
                continue
            if value.shape[1] % 32:
                raise ValueError(
                    f"keep_quantized: {name} is {list(value.shape[1:])} per expert, its input dim not whole MXFP4 groups "
                    "of 32; narrow to a multiple of 32, or write plain weights (without keep_quantized)"
                )
            new_blocks, new_scales = quantized_mxfp4(value[j])
            blocks.append(new_blocks)
            scales.append(new_scales)
            value[j] = dequantized_mxfp4(new_blocks, new_scales, value.dtype)
            changed = True
        stored |= {name + BLOCKS: torch.stack(blocks), name + SCALES: torch.stack(scales)}
    if changed:
        parts = layout.decode(plain[prefix + layout.gate_up], plain[prefix + layout.down])
        edited = dataclasses.replace(edited, experts=dataclasses.replace(edited.experts, **parts))
    return edited, stored


def _float8_experts(
    ckpt: Float8Checkpoint, layout: PerExpert, prefix: str, edited: MoELayerView, edit: LayerEdit
) -> tuple[MoELayerView, dict[str, Tensor | RawTensor]]:
    """The edited layer's experts as the float8 source stores them, and the layer a reader of them
    gets. A kept expert (one source, tensors unchanged) is the source's bytes, scales and
    activation scales under its new name; any other weight (merged, narrowed) is quantized in the
    source's blocks (`_requantized`; FP4 ones as DeepSeek-V4's, `_requantized_fp4`), and the layer
    gets its dequantized values."""
    values = {name: getattr(edited.experts, name).clone() for name in ("gate", "up", "down")
              if getattr(edited.experts, name) is not None}  # fmt: skip
    stored: dict[str, Tensor | RawTensor] = {}
    for j, group in enumerate(edit.sources):
        members = [layout.parts(ckpt, prefix, e) for e in group]  # each source expert's parts
        for i, part in enumerate(layout.parts(ckpt, prefix, j)):
            source, value = members[0][i].name, values[part.part][j]
            if not ckpt.is_quantized(source):
                continue  # a plain weight: written as encoded
            if len(group) == 1 and (
                edit.view is None
                or (value.shape == ckpt.shape(source) and torch.equal(value, ckpt.get(source)))
            ):
                module = part.name.removesuffix("weight")
                stored |= {
                    module + relative: ckpt.raw(name) for name, relative in ckpt.companions(source).items()
                }
                continue
            if ckpt.is_fp4(source):
                new, scale = _requantized_fp4(ckpt, part.name, value, source)
                block = ckpt.block(source)
            else:
                new, scale = _requantized(ckpt, part.name, value, [m[i].name for m in members])
                block = ckpt.scheme.block(tuple(value.shape))
            stored |= new
            values[part.part][j] = dequantized(new[part.name], new[scale], block, ckpt.dtype)
    experts = dataclasses.replace(edited.experts, **values)
    return dataclasses.replace(edited, experts=experts), stored


def _requantized(
    ckpt: Float8Checkpoint, name: str, value: Tensor, sources: list[str]
) -> tuple[dict[str, Tensor], str]:
    """New float8 weight `name` holding `value` (made from the weights `sources`), in the float8
    type, blocks and scale layout of the first source, its scale named as the source's
    (`<name>_scale_inv`, DeepSeek-V4's `<module>.scale`), with each activation scale the largest of
    the sources' (the merged expert sees all their tokens); and the name of its scale."""
    module = name.removesuffix("weight")
    source_scale, scale_name = _scale_beside(ckpt, sources[0], name)
    first, block = ckpt.raw(sources[0]), ckpt.scheme.block(tuple(value.shape))
    first_scale = ckpt.raw(source_scale)
    if DTYPES.get(first_scale.dtype) not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"keep_quantized: {name} is a new expert weight, but the source's scales are {first_scale.dtype} (powers of "
            "two); moelab quantizes new float8 weights with float scales only. Write plain weights"
        )
    companions = ckpt.companions(sources[0])
    if other := [
        n for n, rel in companions.items() if n != source_scale and rel not in ("weight", *ACTIVATION_SCALES)
    ]:
        raise ValueError(
            f"keep_quantized: {name} is a new expert weight, and moelab does not make its {other[0]}; write plain "
            "weights (without keep_quantized)"
        )
    if any(n % b == 0 and m % b != 0 for n, m, b in zip(first.shape[-2:], value.shape, block)):
        raise ValueError(
            f"keep_quantized: {name} is {list(value.shape)}, not whole {block[0]} x {block[1]} blocks as the source's "
            "weights are (float8 kernels need whole blocks); narrow to a multiple of the block, or write plain weights"
        )
    try:
        q, scales = quantize(value, block, DTYPES[first.dtype], DTYPES[first_scale.dtype])
    except ValueError as err:
        raise ValueError(f"keep_quantized: {name}: {err}; write plain weights") from None
    if len(first_scale.shape) != 2:  # one scale for the whole weight, stored as [1] or []
        scales = scales.reshape(first_scale.shape)
    out = {name: q, scale_name: scales}
    for relative in set(companions.values()) & set(ACTIVATION_SCALES):
        out[module + relative] = torch.stack(
            [ckpt.stored_value(s.removesuffix("weight") + relative) for s in sources]
        ).amax(dim=0)
    return out, scale_name


def _requantized_fp4(ckpt: Float8Checkpoint, name: str, value: Tensor, source: str) -> tuple[dict[str, Tensor], str]:
    """New FP4 weight `name` holding `value`, packed as DeepSeek-V4's experts (`quantize_fp4`: one
    power-of-two scale per row per 32 columns) with its scale under the name and in the dtype of
    source weight `source`'s (`<module>.scale`: float8_e8m0fnu, ue8m0 bytes or float); and the
    name of its scale."""
    (scale, scale_name), block = _scale_beside(ckpt, source, name), ckpt.block(source)
    if other := [n for n in ckpt.companions(source) if n not in (source, scale)]:
        raise ValueError(
            f"keep_quantized: {name} is a new expert weight, and moelab does not make its {other[0]}; write plain "
            "weights (without keep_quantized)"
        )
    if block != (1, FP4_GROUP):
        raise ValueError(
            f"keep_quantized: {name} is a new expert weight, but the source's FP4 scales each cover {block[0]} x "
            f"{block[1]}; moelab quantizes new FP4 weights with one scale per row per {FP4_GROUP} columns "
            "(DeepSeek-V4's). Write plain weights (without keep_quantized)"
        )
    if value.shape[-1] % FP4_GROUP:
        raise ValueError(
            f"keep_quantized: {name} is {list(value.shape)}, its input dim not whole FP4 groups of {FP4_GROUP} (one "
            f"scale per row per {FP4_GROUP} columns); narrow to a multiple of {FP4_GROUP}, or write plain weights "
            "(without keep_quantized)"
        )
    packed, exponents = quantize_fp4(value)
    try:
        scales = fp4_scales(exponents, DTYPES[ckpt.raw(scale).dtype])
    except ValueError as err:
        raise ValueError(f"keep_quantized: {name}'s new scales: {err}; write plain weights") from err
    return {name: packed, scale_name: scales}, scale_name


def _scale_beside(ckpt: Float8Checkpoint, source: str, name: str) -> tuple[str, str]:
    """(the stored scale of source weight `source`, the name the scale of new weight `name` takes:
    the same relative to its module, `<name>_scale_inv` or DeepSeek-V4's `<module>.scale`)."""
    scale = ckpt.scale_of(source)
    return scale, name.removesuffix("weight") + scale.removeprefix(source.removesuffix("weight"))
