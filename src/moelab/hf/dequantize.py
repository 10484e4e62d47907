"""`moelab dequantize`: a checkpoint of float8 weights rewritten with plain weights, one tensor at a time.

Two formats, both a float32 scale per block of a weight, `W[i, j] = q[i, j] * s[i // bo, j // bi]`:
- block-wise FP8 (`quant_method: "fp8"`, `weight_block_size` = [bo, bi], the scales stored as
  `<name>_scale_inv`): DeepSeek-V3/R1, Qwen3's FP8 releases, MiniMax-M2, Kimi-K2;
- llm-compressor's float-quantized FP8 (`quant_method: "compressed-tensors"`, weights' `strategy`
  tensor, channel, group or block, the scales stored as `<module>.weight_scale`): the "FP8" and
  "FP8-dynamic" releases made with llm-compressor.
The views, compression and offloading need plain weights, and transformers dequantizes such
checkpoints only by loading the whole model (with accelerate). This reads and writes one tensor
at a time: float8 weights are dequantized (in float32, a few hundred rows at a time, then cast to
`dtype`), their scales and activation scales dropped, every other tensor copied byte for byte;
config.json loses its `quantization_config`. Output as every moelab checkpoint: staged, published
whole, replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moelab.files import read_json_object
from moelab.hf.checkpoint import DTYPES, Checkpoint, CheckpointError
from moelab.hf.writer import copy_side_files, index_name
from moelab.io import LazyTensor, RawTensor, StagedOutput, atomic_write_text, save_safetensors_stream
from moelab.memory import release_freed_memory
from moelab.models.pretrained import CHECKPOINT_KIND

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
ACTIVATION_SCALES = ("activation_scale", "input_scale")
# compressed-tensors' other parameters of a quantized module (zero points, which symmetric float8 has as
# zeros or not at all, output scales), dropped with its weight's scale: not parameters of a plain model
QUANTIZATION_PARAMETERS = ("input_zero_point", "output_scale", "output_zero_point", "weight_zero_point")
PADDING = ("weight_shape_original",)  # compressed-tensors' block weights stored padded to whole blocks
KV_CACHE_SCALES = ("k_scale", "v_scale", "q_scale")  # kv_cache_scheme's scales, on the attention modules
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dequantize_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write the float8 checkpoint `source` into the new directory `out` with its float8
    weights dequantized to `dtype` (see the module docstring). Returns `out`."""
    source = Path(source).resolve()
    config = read_json_object(source / "config.json", "a model config", error=CheckpointError)
    scheme = float8_scheme(config, source)
    with (
        StagedOutput(out, CHECKPOINT_KIND, inputs=[source], overwrite=overwrite) as staging,
        Checkpoint(source) as ckpt,
    ):
        weight_map, total, by_shard = {}, 0, {}
        for key in ckpt.keys():
            if not _is_scale(ckpt, key, scheme):
                by_shard.setdefault(ckpt.shard(key), []).append(key)
        for shard in tqdm(ckpt.shards(), desc="dequantize", unit="shard", disable=quiet, leave=False):
            tensors = {key: _plain(ckpt, key, scheme, dtype) for key in by_shard.get(shard, [])}
            if not tensors:  # a shard of scales only: no file for it
                continue
            save_safetensors_stream(
                tensors, staging / shard, metadata=ckpt.metadata(shard) or {"format": "pt"}
            )
            weight_map |= dict.fromkeys(tensors, shard)
            total += sum(t.nbytes for t in tensors.values())
            del tensors
            release_freed_memory()
        if (index := index_name(source, config)) is not None:
            doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(staging / index, json.dumps(doc, indent=2) + "\n")
        copy_side_files(source, staging)
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        plain |= {key: str(dtype).removeprefix("torch.") for key in ("torch_dtype", "dtype") if key in config}
        atomic_write_text(staging / "config.json", json.dumps(plain, indent=2) + "\n")
    return Path(out)


@dataclass(frozen=True)
class Float8Scheme:
    """How a checkpoint's float8 weights are scaled: the scale beside weight `name` is
    `name + scale_suffix`, and `block(shape)` gives the [bo, bi] block one scale covers in a
    weight [..., O, I]."""

    scale_suffix: str
    block: Callable[[tuple[int, ...]], tuple[int, int]]
    kv_scales: tuple[str, ...] = ()  # attention's scales of a quantized kv cache, dropped wherever they are


def float8_scheme(config: dict, source: Path) -> Float8Scheme:
    """The scheme of a block-wise FP8 or compressed-tensors float-quantized config.json; a clear
    error for anything else."""
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors":
        return _compressed_tensors_scheme(quantization, source)
    bo, bi = fp8_block_size(config, source)
    return Float8Scheme(SCALE_SUFFIX, lambda shape: (bo, bi))


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
            f"{source / 'config.json'}: moelab dequantizes compressed-tensors checkpoints whose weights are all "
            f"float-quantized 8-bit floats with one strategy; this one has formats {sorted(map(str, formats))} and "
            f"weights {sorted(map(str, kinds))} (group sizes / block structures {sorted(sizes)})"
        )
    (kind, bits, strategy), weight = kinds.pop(), weights[0]
    if (kind, bits) != ("float", 8) or strategy not in ("tensor", "channel", "group", "block"):
        raise CheckpointError(
            f"{source / 'config.json'}: compressed-tensors weights of type {kind!r}, {bits} bits, strategy {strategy!r}; "
            "moelab dequantizes 8-bit floats with the tensor, channel, group or block strategy"
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
            f"{source / 'config.json'}: moelab dequantizes block-wise FP8 checkpoints (quantization_config with "
            f"quant_method 'fp8' and weight_block_size [rows, columns], as DeepSeek-V3 and Qwen3-FP8 ship) and "
            f"compressed-tensors float-quantized ones; this one has {quantization!r}"
        )
    return block[0], block[1]


ROWS_PER_STEP = 128  # rows dequantized together: a few MB of float32 beside the output


def dequantized(
    q: Tensor, scales: Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """q: [..., O, I] float8, scales: [..., ceil(O / bo), ceil(I / bi)] (one scale for a whole
    weight may be stored as [1] or []) -> [..., O, I] in `dtype`: every entry times its block's
    scale, computed in float32 ROWS_PER_STEP rows at a time."""
    O, I = q.shape[-2:]
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
    want = (*q.shape[:-2], -(-O // bo), -(-I // bi))
    if scales.numel() == 1 and want[-2:] == (1, 1) and q.dim() == 2:
        scales = scales.reshape(1, 1)
    if tuple(scales.shape) != want:
        raise CheckpointError(
            f"scales of shape {list(scales.shape)} do not tile a weight of shape {list(q.shape)} in blocks of "
            f"{bo} x {bi} (expected {list(want)}); the checkpoint does not match its quantization_config"
        )
    out = torch.empty(q.shape, dtype=dtype)
    matrices, row_scales, outs = q.reshape(-1, O, I), scales.reshape(-1, *want[-2:]), out.view(-1, O, I)
    for m in range(matrices.shape[0]):
        for start in range(0, O, ROWS_PER_STEP):
            stop = min(start + ROWS_PER_STEP, O)
            per_entry = (
                row_scales[m, torch.arange(start, stop) // bo].float().repeat_interleave(bi, dim=1)[:, :I]
            )
            outs[m, start:stop] = (matrices[m, start:stop].float() * per_entry).to(dtype)
    return out


def _is_scale(ckpt: Checkpoint, key: str, scheme: Float8Scheme) -> bool:
    """A scale the plain weights no longer use: a float8 weight's scale, every `*_scale_inv`
    (DeepSeek-V3's fp8_cast_bf16 drops them all, a weight's or not), and a float8 weight's activation
    scale (static activation schemes: `activation_scale`, `input_scale`), which transformers drops
    when it dequantizes."""
    if key.endswith(SCALE_SUFFIX):
        return True
    if key.endswith(scheme.scale_suffix) and _is_float8(ckpt, key.removesuffix(scheme.scale_suffix)):
        return True
    module, _, name = key.rpartition(".")
    if name in scheme.kv_scales:
        return True
    return name in (*ACTIVATION_SCALES, *QUANTIZATION_PARAMETERS, *PADDING) and _is_float8(
        ckpt, f"{module}.weight"
    )


def _is_float8(ckpt: Checkpoint, key: str) -> bool:
    return key in ckpt and DTYPES.get(ckpt.raw(key).dtype) in FLOAT8


def _plain(ckpt: Checkpoint, key: str, scheme: Float8Scheme, dtype: torch.dtype) -> LazyTensor | RawTensor:
    """Tensor `key` as the output holds it: dequantized when it is written if float8, else the
    stored bytes."""
    raw, scale = ckpt.raw(key), key + scheme.scale_suffix
    if DTYPES.get(raw.dtype) in (torch.int8, torch.uint8) and scale in ckpt:
        raise CheckpointError(
            f"{ckpt.directory}: {key} is stored as {DTYPES[raw.dtype]} with a {scale} (packed FP4 or another "
            "format than float8 weights); moelab dequantizes float8 weights only, and would drop its scale"
        )
    if DTYPES.get(raw.dtype) not in FLOAT8:
        return raw
    if scale not in ckpt:
        raise CheckpointError(
            f"{ckpt.directory}: {key} is float8 but has no {scale}; it cannot be dequantized"
        )
    module = key.removesuffix("weight")
    if module + "weight_g_idx" in ckpt:
        raise CheckpointError(
            f"{ckpt.directory}: {key} has a {module}weight_g_idx (activation-ordered groups); moelab dequantizes "
            "float8 weights whose groups are runs of columns only"
        )
    if (
        module + "weight_zero_point" in ckpt
        and ckpt.get(module + "weight_zero_point").float().count_nonzero()
    ):
        raise CheckpointError(
            f"{ckpt.directory}: {key} has nonzero {module}weight_zero_point; moelab dequantizes symmetric float8 only"
        )
    block, shape = scheme.block(tuple(raw.shape)), tuple(raw.shape)
    if (original := module + PADDING[0]) in ckpt:  # stored padded to whole blocks: cut back to this shape
        shape = (*shape[:-2], *(int(n) for n in ckpt.get(original).tolist()[-2:]))
        if not all(0 < n <= m for n, m in zip(shape[-2:], raw.shape[-2:])):
            raise CheckpointError(
                f"{ckpt.directory}: {original} {list(shape)} does not fit {key} {list(raw.shape)}"
            )

    def value() -> Tensor:
        out = dequantized(ckpt.get(key), ckpt.get(scale), block, dtype)
        return out if shape == out.shape else out[..., : shape[-2], : shape[-1]].contiguous()

    return LazyTensor(dtype, shape, value)
