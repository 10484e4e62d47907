"""Float8 checkpoints read as plain ones: `Float8Checkpoint` gives every float8 weight times its
scales, so that views, calibration, compression and offloading read an FP8 release directly, with
no dequantized copy on disk (`moelab dequantize` writes one, for other tools).

Two formats, both a scale per block of a weight, `W[i, j] = q[i, j] * s[i // bo, j // bi]`:
- block-wise FP8 (`quant_method: "fp8"`, `weight_block_size` = [bo, bi], the scales stored as
  `<name>_scale_inv`): DeepSeek-V3/R1, Qwen3's FP8 releases, MiniMax-M2, Kimi-K2. DeepSeek-V4's
  releases store them as `<module>.scale` (which transformers renames to `<module>.weight_scale_inv`),
  in float32 or ue8m0 (`scale_fmt: "ue8m0"`: float8_e8m0fnu, or bytes b meaning 2 ** (b - 127)),
  and where `expert_dtype` is "fp4" (in quantization_config, or beside it in config.json) their
  routed experts are FP4: int8 [O, I / 2], two e2m1 values a byte, the low nibble first
  (`moelab.hf.mxfp4.e2m1_values`), one scale per row per 32 columns (the block read off the
  scales' shape, as transformers' `Fp8Dequantize` reads it);
- llm-compressor's float-quantized FP8 (`quant_method: "compressed-tensors"`, weights' `strategy`
  tensor, channel, group or block, the scales stored as `<module>.weight_scale`): the "FP8" and
  "FP8-dynamic" releases made with llm-compressor.
The plain checkpoint holds every float8 weight dequantized (in float32, a few hundred rows at a
time, then cast to the checkpoint's dtype), no scales or activation scales, every other tensor as
stored, and a config.json without `quantization_config` (`plain_config`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moelab.hf.checkpoint import DTYPES, Checkpoint, CheckpointError
from moelab.hf.mxfp4 import e2m1_values, quantized_mxfp4
from moelab.hf.quantized import DequantizedCheckpoint

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT8_METHODS = ("fp8", "compressed-tensors")  # quant_method values whose float8 weights moelab reads
SCALE_SUFFIX = "_scale_inv"
ACTIVATION_SCALES = ("activation_scale", "input_scale")
# compressed-tensors' other parameters of a quantized module (zero points, which symmetric float8 has as
# zeros or not at all, output scales), dropped with its weight's scale: not parameters of a plain model
QUANTIZATION_PARAMETERS = ("input_zero_point", "output_scale", "output_zero_point", "weight_zero_point")
PADDING = ("weight_shape_original",)  # compressed-tensors' block weights stored padded to whole blocks
KV_CACHE_SCALES = ("k_scale", "v_scale", "q_scale")  # kv_cache_scheme's scales, on the attention modules


@dataclass(frozen=True)
class Float8Scheme:
    """How a checkpoint's float8 weights are scaled: the scale beside weight `name` is
    `name + scale_suffix`, and `block(shape)` gives the [bo, bi] block one scale covers in a
    weight [..., O, I]."""

    scale_suffix: str
    block: Callable[[tuple[int, ...]], tuple[int, int]]
    kv_scales: tuple[str, ...] = ()  # attention's scales of a quantized kv cache, dropped wherever they are
    module_scale: bool = False  # a weight `<module>.weight`'s scale may be `<module>.scale` (DeepSeek-V4)
    fp4: bool = False  # int8 weights with scales are packed FP4 (expert_dtype "fp4": DeepSeek-V4's experts)

    def scale_names(self, name: str) -> tuple[str, ...]:
        """The names weight `name`'s scale may be stored under, the first stored one its scale."""
        if self.module_scale and name.endswith(".weight"):
            return name + self.scale_suffix, name.removesuffix("weight") + "scale"
        return (name + self.scale_suffix,)


def float8_scheme(config: dict, source: Path) -> Float8Scheme:
    """The scheme of a block-wise FP8 or compressed-tensors float-quantized config.json; a clear
    error for anything else."""
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors":
        return _compressed_tensors_scheme(quantization, source)
    bo, bi = fp8_block_size(config, source)
    expert_dtype = quantization.get("expert_dtype", config.get("expert_dtype"))  # V4 keeps it beside, V4.1 in it
    scale_fmt = quantization.get("scale_fmt")
    if expert_dtype not in (None, "fp8", "fp4") or scale_fmt not in (None, "float", "ue8m0"):
        raise CheckpointError(
            f"{source / 'config.json'}: block-wise FP8 with expert_dtype {expert_dtype!r} and scale_fmt {scale_fmt!r}; "
            "moelab (as transformers) reads expert_dtype 'fp8' or 'fp4' and scale_fmt 'float' or 'ue8m0'"
        )
    # transformers renames every `<module>.scale` of an FP8 checkpoint to `<module>.weight_scale_inv`
    return Float8Scheme(SCALE_SUFFIX, lambda shape: (bo, bi), module_scale=True, fp4=expert_dtype == "fp4")


def _compressed_tensors_scheme(quantization: dict, source: Path) -> Float8Scheme:
    """llm-compressor's float-quantized weights: one 8-bit float strategy for every group."""
    groups = quantization.get("config_groups")
    weights = [g.get("weights") for g in groups.values()] if isinstance(groups, dict) else []
    formats = {g.get("format") or quantization.get("format") for g in groups.values()} if weights else set()
    kinds = {(w.get("type"), w.get("num_bits"), w.get("strategy")) for w in weights if isinstance(w, dict)}
    sizes = {
        json.dumps([w.get("group_size"), w.get("block_structure")]) for w in weights if isinstance(w, dict)
    }
    if (
        not formats
        or not formats <= {"float-quantized", "naive-quantized"}  # naive: the older name, same tensors
        or len(kinds) != 1
        or len(sizes) != 1
        or not weights
        or not all(isinstance(w, dict) for w in weights)
    ):
        raise CheckpointError(
            f"{source / 'config.json'}: moelab reads compressed-tensors checkpoints whose weights are all "
            f"float-quantized 8-bit floats with one strategy; this one has formats {sorted(map(str, formats))} and "
            f"weights {sorted(map(str, kinds))} (group sizes / block structures {sorted(sizes)})"
        )
    (kind, bits, strategy), weight = kinds.pop(), weights[0]
    if (kind, bits) != ("float", 8) or strategy not in ("tensor", "channel", "group", "block"):
        raise CheckpointError(
            f"{source / 'config.json'}: compressed-tensors weights of type {kind!r}, {bits} bits, strategy {strategy!r}; "
            "moelab reads 8-bit floats with the tensor, channel, group or block strategy"
        )
    size, structure = weight.get("group_size"), weight.get("block_structure")
    blocks = {
        "tensor": lambda shape: (shape[-2], shape[-1]),
        "channel": lambda shape: (1, shape[-1]),
        "group": lambda shape: (1, size),
        "block": lambda shape: tuple(structure),
    }
    if (strategy == "group" and not _positive_ints([size])) or (
        strategy == "block" and not _positive_ints(structure, 2)
    ):
        raise CheckpointError(
            f"{source / 'config.json'}: the {strategy} strategy's size is {size or structure!r}"
        )
    kv_scales = KV_CACHE_SCALES if quantization.get("kv_cache_scheme") else ()
    return Float8Scheme("_scale", blocks[strategy], kv_scales)


def _positive_ints(values, count: int | None = None) -> bool:
    return (
        isinstance(values, list)
        and (count is None or len(values) == count)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    )


def fp8_block_size(config: dict, source: Path) -> tuple[int, int]:
    """The [bo, bi] block of a block-wise FP8 config.json; a clear error for anything else."""
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    block = quantization.get("weight_block_size") if isinstance(quantization, dict) else None
    if method != "fp8" or not _positive_ints(block, 2):
        raise CheckpointError(
            f"{source / 'config.json'}: moelab reads block-wise FP8 checkpoints (quantization_config with "
            f"quant_method 'fp8' and weight_block_size [rows, columns], as DeepSeek-V3 and Qwen3-FP8 ship) and "
            f"compressed-tensors float-quantized ones; this one has {quantization!r}"
        )
    return block[0], block[1]


ROWS_PER_STEP = 128  # rows dequantized together: a few MB of float32 beside the output


def scale_grid(
    weight: tuple[int, ...], scales: tuple[int, ...], block: tuple[int, int]
) -> tuple[int, ...] | None:
    """The shape scales [..., ceil(O / bo), ceil(I / bi)] of a weight [..., O, I] in blocks `block`
    take; None where `scales` is that grid, or one scale for a whole 2-D weight stored as [1] or []."""
    (O, I), (bo, bi) = weight[-2:], block
    want = (*weight[:-2], -(-O // bo), -(-I // bi))
    one = len(weight) == 2 and want == (1, 1) and tuple(scales) in ((), (1,), (1, 1))
    return None if one or tuple(scales) == want else want


def dequantized(
    q: Tensor, scales: Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """q: [..., O, I] float8 (or int8 [..., O, I / 2]: packed FP4, two e2m1 values a byte, the low
    nibble first), scales: [..., ceil(O / bo), ceil(I / bi)] (one scale for a whole weight may be
    stored as [1] or []) -> [..., O, I] in `dtype`: every entry times its block's scale, computed in
    float32 ROWS_PER_STEP rows at a time."""
    packed = q.dtype == torch.int8
    O, I = q.shape[-2], q.shape[-1] * (2 if packed else 1)
    bo, bi = block
    if (
        scales.dtype == torch.uint8
    ):  # ue8m0 exponents as bytes (MXFP8): 2 ** (byte - 127), as transformers reads them
        scales = (scales.float() - 127).exp2()
    elif not scales.dtype.is_floating_point:
        raise CheckpointError(
            f"scales of dtype {scales.dtype} for a weight of shape {list(q.shape)}: moelab reads float scales and "
            "ue8m0 bytes only"
        )
    if (want := scale_grid((*q.shape[:-1], I), tuple(scales.shape), block)) is not None:
        raise CheckpointError(
            f"scales of shape {list(scales.shape)} do not tile a weight of shape {list(q.shape)} in blocks of "
            f"{bo} x {bi} (expected {list(want)}); the checkpoint does not match its quantization_config"
        )
    out = torch.empty((*q.shape[:-1], I), dtype=dtype)
    matrices, outs = q.reshape(-1, O, q.shape[-1]), out.view(-1, O, I)
    row_scales = scales.reshape(-1, -(-O // bo), -(-I // bi))
    for m in range(matrices.shape[0]):
        for start in range(0, O, ROWS_PER_STEP):
            stop = min(start + ROWS_PER_STEP, O)
            per_entry = (
                row_scales[m, torch.arange(start, stop) // bo].float().repeat_interleave(bi, dim=1)[:, :I]
            )
            codes = matrices[m, start:stop]
            values = e2m1_values(codes) if packed else codes.float()
            outs[m, start:stop] = (values * per_entry).to(dtype)
    return out


def quantize(
    w: Tensor,
    block: tuple[int, int],
    dtype: torch.dtype = torch.float8_e4m3fn,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """w [O, I] -> (q [O, I] in float8 `dtype`, scales [ceil(O / bo), ceil(I / bi)] in
    `scale_dtype`) with `dequantized(q, scales, block)` close to w: each block divided by its
    largest |entry| over the format's largest finite value (an all-zero block by 1), as
    DeepSeek-V3's and llm-compressor's quantizers make FP8 weights. A scale_dtype narrower than
    float32 holds the scale rounded up (so no entry passes the largest value, and none underflows
    to 0), and the block is divided by the scale as stored; no scale is under float32's smallest
    normal number. A ValueError where a scale overflows it, or w holds inf or nan."""
    (O, I), (bo, bi) = w.shape, block
    rows, cols, top = -(-O // bo), -(-I // bi), torch.finfo(dtype).max
    padded = torch.zeros(rows * bo, cols * bi)
    padded[:O, :I] = w.float()
    blocks = padded.reshape(rows, bo, cols, bi)
    amax = blocks.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("the weight holds a non-finite entry (inf or nan), which no scale quantizes")
    # a block of float32 subnormals: amax / top would underflow to 0 (and 0 / 0 to NaN)
    exact = torch.where(amax > 0, (amax / top).clamp(min=torch.finfo(torch.float32).smallest_normal), 1.0)
    scales = exact.to(scale_dtype)
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, scales.new_tensor(math.inf)), scales)
    if not torch.isfinite(scales).all():
        raise ValueError(
            f"a block's largest |entry| {amax.max().item():.4g} needs a scale beyond {scale_dtype}'s range"
        )
    q = (blocks / scales.float()[:, None, :, None]).clamp(-top, top).reshape(rows * bo, cols * bi)[:O, :I]
    return q.to(dtype), scales


FP4_GROUP = 32  # DeepSeek-V4's FP4 experts: one scale per row per 32 columns


def quantize_fp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [O, I] (I a multiple of FP4_GROUP) -> (packed int8 [O, I / 2], ue8m0 exponents uint8
    [O, I / 32]) as DeepSeek-V4 stores its FP4 experts (`dequantized` reads them back with block
    (1, 32)): each row's groups of 32 columns scaled by the smallest power of two 2 ** (b - 127)
    that brings the group's largest |entry| within 6 (e2m1's largest; an all-zero group: 2 ** -127),
    every entry then the nearest e2m1 value, a tie to the even code (0.25 -> 0, 0.75 -> 1, 5 -> 4,
    ...: `quantized_mxfp4`), the sign bit set on every negative entry (one that rounds to zero is -0), two codes
    a byte, the low nibble first. These are GPT-OSS's MXFP4 groups of the transposed weight:
    `quantized_mxfp4(w.T)`, its [O, I / 32, 16] bytes read as rows of I / 2."""
    O, I = w.shape
    if I % FP4_GROUP:
        raise ValueError(f"an FP4 weight's input dim is whole groups of {FP4_GROUP}; got {list(w.shape)}")
    blocks, exponents = quantized_mxfp4(w.T)
    return blocks.reshape(O, I // 2).view(torch.int8), exponents


def fp4_scales(exponents: Tensor, dtype: torch.dtype) -> Tensor:
    """ue8m0 exponents (uint8 b: 2 ** (b - 127)) stored as `dtype`: uint8 as they are,
    float8_e8m0fnu (the same bytes), or a float dtype's 2 ** (b - 127); a ValueError where the float
    dtype does not hold every such power of two exactly (float16's range)."""
    if dtype == torch.uint8:
        return exponents
    if dtype == torch.float8_e8m0fnu:
        return exponents.view(torch.float8_e8m0fnu)
    if not dtype.is_floating_point or dtype in FLOAT8:
        raise ValueError(f"FP4 scales are stored as uint8, float8_e8m0fnu or a float dtype, not {dtype}")
    powers = torch.exp2(exponents.float() - 127)
    scales = powers.to(dtype)
    if not torch.equal(scales.float(), powers):
        raise ValueError(f"{dtype} cannot hold every FP4 scale exactly (powers of two, 2 ** -127 to 2 ** 127)")
    return scales


class Float8Checkpoint(DequantizedCheckpoint):
    """A checkpoint of float8 weights read as the plain checkpoint `moelab dequantize` writes
    (`DequantizedCheckpoint`; see the module docstring): every float8 weight times its scales, the
    scales hidden. Every float8 weight is checked when the checkpoint opens (its scale present,
    symmetric, groups of columns), so that a format moelab would misread is refused before anything
    runs."""

    def __init__(
        self,
        directory: str | os.PathLike,
        scheme: Float8Scheme,
        dtype: torch.dtype = torch.bfloat16,
        *,
        shapes_only: bool = False,
    ):
        super().__init__(directory, dtype, shapes_only=shapes_only)
        self.scheme = scheme
        self._blocks: dict[str, tuple[int, int]] = {}  # quantized weight -> the block one scale covers
        self._scales: dict[str, str] = {}  # quantized weight -> its scale
        for key in self.stored_keys():
            if not self._is_scale(key):
                self._check(key)
        if not self._shapes:
            raise CheckpointError(
                f"{self.directory / 'config.json'} describes float8 weights, but no tensor is stored as float8: the "
                "checkpoint does not match its quantization_config (remove it if the weights are plain)"
            )

    def _decode(self, name: str, rows: range | None) -> Tensor:
        shape = self._shapes[name]
        if rows is not None and len(shape) < 3:  # rows of one matrix: dequantized whole (blocks span rows)
            return self._decode(name, None)[rows.start : rows.stop].clone()
        scale = Checkpoint.get(self, self._scales[name])
        if rows is not None and scale.dim() == len(shape):  # stacked experts, each with its own scales
            scale = scale[rows.start : rows.stop]
        out = dequantized(Checkpoint.get(self, name, rows), scale, self._blocks[name], self.dtype)
        return out if out.shape[-2:] == shape[-2:] else out[..., : shape[-2], : shape[-1]].contiguous()

    def companions(self, key: str) -> dict[str, str]:
        """{stored name: its name relative to the module} of quantized weight `key` and the tensors
        that go with it: its scale, activation scales and other quantization parameters, and the
        padded shape. Renaming the module renames them all."""
        module = key.removesuffix("weight")
        names = ["weight", self.scale_of(key).removeprefix(module)]
        names += [
            n for n in (*ACTIVATION_SCALES, *QUANTIZATION_PARAMETERS, *PADDING) if self._stores(module + n)
        ]
        return {module + n: n for n in names}

    def written_config(self, config: dict) -> dict:
        """The plain checkpoint's config.json: without DeepSeek-V4's `expert_dtype` beside
        `quantization_config` either (no expert is FP4 there)."""
        return {k: v for k, v in super().written_config(config).items() if k != "expert_dtype"}

    def stored_parts(self, name: str) -> list[str]:
        return list(self.companions(name)) if self.is_quantized(name) else super().stored_parts(name)

    def is_float8(self, key: str) -> bool:
        """Whether the files store tensor `key` as a float8 weight (with scales)."""
        return self._stores(key) and DTYPES.get(self.entry(key)[0]) in FLOAT8

    def is_fp4(self, key: str) -> bool:
        """Whether the files store tensor `key` as a packed FP4 weight with its scale (int8 where
        expert_dtype is "fp4": DeepSeek-V4's experts)."""
        return (
            self.scheme.fp4
            and self._stores(key)
            and self.entry(key)[0] == "I8"
            and self.scale_of(key) is not None
        )

    def is_quantized(self, key: str) -> bool:
        """Whether the files store tensor `key` as a quantized weight (float8 or FP4) with a scale."""
        return self.is_float8(key) or self.is_fp4(key)

    def scale_of(self, key: str) -> str | None:
        """The stored scale of weight `key` (`Float8Scheme.scale_names`), or None."""
        return next((n for n in self.scheme.scale_names(key) if self._stores(n)), None)

    def block(self, key: str) -> tuple[int, int]:
        """The [bo, bi] block one scale of quantized weight `key` covers."""
        return self._blocks[key]

    def _is_scale(self, key: str) -> bool:
        """A scale the plain weights no longer use: a float8 weight's scale, every `*_scale_inv`
        (DeepSeek-V3's fp8_cast_bf16 drops them all, a weight's or not), and a float8 weight's
        activation scale (static activation schemes: `activation_scale`, `input_scale`), which
        transformers drops when it dequantizes."""
        suffix = self.scheme.scale_suffix
        if key.endswith(SCALE_SUFFIX) or (key.endswith(suffix) and self.is_quantized(key.removesuffix(suffix))):
            return True
        if self.scheme.module_scale and key.endswith(".scale"):  # DeepSeek-V4's `<module>.scale`
            weight = key.removesuffix("scale") + "weight"
            if self.is_quantized(weight) and self.scale_of(weight) == key:
                return True
        module, _, name = key.rpartition(".")
        if name in self.scheme.kv_scales:
            return True
        return name in (*ACTIVATION_SCALES, *QUANTIZATION_PARAMETERS, *PADDING) and self.is_float8(
            f"{module}.weight"
        )

    def _check(self, key: str) -> None:
        """List stored tensor `key`, a float8 (or packed FP4, `_check_fp4`) weight with its scale,
        block and plain shape; refuse what would be misread."""
        (dtype, stored), scale = self.entry(key), self.scale_of(key)
        if self.is_fp4(key):
            self._check_fp4(key, stored, scale)
            return
        if DTYPES.get(dtype) in (torch.int8, torch.uint8) and scale is not None:
            raise CheckpointError(
                f"{self.directory}: {key} is stored as {DTYPES[dtype]} with a {scale} (packed FP4 or another format "
                "than float8 weights), but quantization_config's expert_dtype is not 'fp4'; moelab reads float8 "
                "weights, and int8 ones as packed FP4 (two e2m1 values a byte, as DeepSeek-V4 ships its experts) "
                "where expert_dtype is 'fp4': set it so if that is this format, else dequantize the checkpoint "
                "with the tool that made it"
            )
        if DTYPES.get(dtype) not in FLOAT8:
            if scale is not None and scale == key.removesuffix("weight") + "scale":  # transformers multiplies it in
                raise CheckpointError(
                    f"{self.directory}: {key} is stored as {DTYPES.get(dtype, dtype)}, not float8, but has a scale "
                    f"{scale}, which transformers renames to its weight_scale_inv and multiplies in; moelab reads "
                    "scales of float8 and FP4 weights only. Fold the scale into the weight (or drop it if the weight "
                    "is already plain)"
                )
            self._lists(key)
            return
        if scale is None:
            raise CheckpointError(
                f"{self.directory}: {key} is float8 but has no {' or '.join(self.scheme.scale_names(key))}; it cannot "
                "be dequantized"
            )
        self._scales[key] = scale
        if len(stored) < 2:
            raise CheckpointError(
                f"{self.directory}: {key} is a float8 tensor of shape {list(stored)} with a scale {scale}; moelab reads "
                "float8 weights [..., rows, columns] only"
            )
        module = key.removesuffix("weight")
        if self._stores(module + "weight_g_idx"):
            raise CheckpointError(
                f"{self.directory}: {key} has a {module}weight_g_idx (activation-ordered groups); moelab reads "
                "float8 weights whose groups are runs of columns only"
            )
        zero_point = module + "weight_zero_point"
        if self._stores(zero_point) and self.stored_value(zero_point).float().count_nonzero():
            raise CheckpointError(
                f"{self.directory}: {key} has nonzero {zero_point}; moelab reads symmetric float8 only"
            )
        shape = stored
        if self._stores(original := module + PADDING[0]):  # stored padded to whole blocks: cut back
            shape = (*shape[:-2], *(int(n) for n in self.stored_value(original).tolist()[-2:]))
            if not all(0 < n <= m for n, m in zip(shape[-2:], stored[-2:])):
                raise CheckpointError(
                    f"{self.directory}: {original} {list(shape)} does not fit {key} {list(stored)}"
                )
        self._blocks[key] = block = self.scheme.block(stored)
        scale_dtype, grid = self.entry(scale)
        if not (DTYPES.get(scale_dtype, torch.int8).is_floating_point or scale_dtype == "U8"):
            raise CheckpointError(
                f"{self.directory}: {scale} is {DTYPES.get(scale_dtype, scale_dtype)}; moelab reads float scales and "
                f"ue8m0 bytes (uint8) only, so {key} cannot be dequantized"
            )
        if (want := scale_grid(stored, grid, block)) is not None:
            raise CheckpointError(
                f"{self.directory}: {scale} {list(grid)} do not tile {key} {list(stored)} in blocks of {block[0]} x "
                f"{block[1]} (expected {list(want)}); the checkpoint does not match its quantization_config"
            )
        self._decodes(key, shape, key)

    def _check_fp4(self, key: str, stored: tuple[int, ...], scale: str) -> None:
        """List packed FP4 weight `key` (int8 [..., O, I / 2]) with its scale [..., O / bo, I / bi]:
        the block read off the scales' shape, whole blocks only (as transformers requires)."""
        (scale_dtype, grid), shape = self.entry(scale), (*stored[:-1], 2 * stored[-1])
        if (
            len(shape) < 2
            or len(grid) != len(shape)
            or tuple(grid[:-2]) != tuple(shape[:-2])
            or not all(g > 0 and n % g == 0 for n, g in zip(shape[-2:], grid[-2:]))
            or not (DTYPES.get(scale_dtype, torch.int8).is_floating_point or scale_dtype == "U8")
        ):
            raise CheckpointError(
                f"{self.directory}: {key} (packed FP4, {list(shape)} once unpacked) and its scale {scale} "
                f"({scale_dtype} {list(grid)}) do not fit: expected float or ue8m0 scales [..., rows / bo, columns / bi] "
                "in whole blocks; the checkpoint does not match its quantization_config"
            )
        self._scales[key], self._blocks[key] = scale, (shape[-2] // grid[-2], shape[-1] // grid[-1])
        self._decodes(key, shape, key)
