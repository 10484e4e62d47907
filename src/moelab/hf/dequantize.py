"""`moelab dequantize`: a block-wise FP8 checkpoint rewritten with plain weights, one shard at a time.

DeepSeek-V3/R1, Qwen3's FP8 releases, MiniMax-M2 and Kimi-K2 ship their linear weights as
float8 (`quant_method: "fp8"` in config.json's `quantization_config`) with one float32 scale per
block of `weight_block_size` = [bo, bi] entries: `W[i, j] = q[i, j] * s[i // bo, j // bi]`, the
scales stored as `<name>_scale_inv`. The views, compression and offloading need plain weights, and
transformers dequantizes such checkpoints only by loading the whole model (with accelerate). This
reads and writes one tensor at a time: float8 weights are dequantized (in float32, then cast to `dtype`),
their scales dropped, every other tensor copied byte for byte; config.json loses its
`quantization_config`. Output as every moelab checkpoint: staged, published whole, replaced only
with `overwrite`.
"""

from __future__ import annotations

import json
import os
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
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dequantize_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write the block-wise FP8 checkpoint `source` into the new directory `out` with its float8
    weights dequantized to `dtype` (see the module docstring). Returns `out`."""
    source = Path(source).resolve()
    config = read_json_object(source / "config.json", "a model config", error=CheckpointError)
    block = fp8_block_size(config, source)
    with (
        StagedOutput(out, CHECKPOINT_KIND, inputs=[source], overwrite=overwrite) as staging,
        Checkpoint(source) as ckpt,
    ):
        weight_map, total = {}, 0
        for shard in tqdm(ckpt.shards(), desc="dequantize", unit="shard", disable=quiet, leave=False):
            tensors = {key: _plain(ckpt, key, block, dtype) for key in ckpt.keys()
                       if ckpt.shard(key) == shard and not _is_scale(ckpt, key)}  # fmt: skip
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


def fp8_block_size(config: dict, source: Path) -> tuple[int, int]:
    """The [bo, bi] block of a block-wise FP8 config.json; a clear error for anything else."""
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    block = quantization.get("weight_block_size") if isinstance(quantization, dict) else None
    if method != "fp8" or not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"{source / 'config.json'}: moelab dequantizes block-wise FP8 checkpoints (quantization_config with "
            f"quant_method 'fp8' and weight_block_size [rows, columns], as DeepSeek-V3 and Qwen3-FP8 ship); this one "
            f"has {quantization!r}"
        )
    return block[0], block[1]


def dequantized(
    q: Tensor, scales: Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """q: [..., O, I] float8, scales: [..., ceil(O / bo), ceil(I / bi)] -> [..., O, I] in `dtype`:
    every entry times its block's scale, computed in float32 one row of blocks at a time (beside
    the output, memory for bo rows of float32 only)."""
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
    if tuple(scales.shape) != want:
        raise CheckpointError(
            f"scales of shape {list(scales.shape)} do not tile a weight of shape {list(q.shape)} in blocks of "
            f"{bo} x {bi} (expected {list(want)}); the checkpoint does not match its weight_block_size"
        )
    out = torch.empty(q.shape, dtype=dtype)
    matrices, row_scales, outs = q.reshape(-1, O, I), scales.reshape(-1, *want[-2:]), out.view(-1, O, I)
    for m in range(matrices.shape[0]):
        for r in range(want[-2]):
            rows = slice(r * bo, (r + 1) * bo)
            per_column = row_scales[m, r].float().repeat_interleave(bi)[:I]
            outs[m, rows] = (matrices[m, rows].float() * per_column).to(dtype)
    return out


def _is_scale(ckpt: Checkpoint, key: str) -> bool:
    """A scale the plain weights no longer use: every `*_scale_inv` (DeepSeek-V3's fp8_cast_bf16
    drops them all, a weight's or not), and a float8 weight's activation scale (static activation
    schemes: `activation_scale`, `input_scale`), which transformers drops when it dequantizes."""
    if key.endswith(SCALE_SUFFIX):
        return True
    module, _, name = key.rpartition(".")
    weight = f"{module}.weight"
    return name in ACTIVATION_SCALES and weight in ckpt and DTYPES.get(ckpt.raw(weight).dtype) in FLOAT8


def _plain(ckpt: Checkpoint, key: str, block: tuple[int, int], dtype: torch.dtype) -> LazyTensor | RawTensor:
    """Tensor `key` as the output holds it: dequantized when it is written if float8, else the
    stored bytes."""
    raw = ckpt.raw(key)
    if DTYPES.get(raw.dtype) in (torch.int8, torch.uint8) and key + SCALE_SUFFIX in ckpt:
        raise CheckpointError(
            f"{ckpt.directory}: {key} is stored as {DTYPES[raw.dtype]} with a {key}{SCALE_SUFFIX} (packed FP4 or another "
            "format than block-wise FP8); moelab dequantizes float8 weights only, and would drop its scale"
        )
    if DTYPES.get(raw.dtype) not in FLOAT8:
        return raw
    if key + SCALE_SUFFIX not in ckpt:
        raise CheckpointError(
            f"{ckpt.directory}: {key} is float8 but has no {key}{SCALE_SUFFIX}; it cannot be dequantized"
        )
    return LazyTensor(
        dtype,
        tuple(raw.shape),
        lambda: dequantized(ckpt.get(key), ckpt.get(key + SCALE_SUFFIX), block, dtype),
    )
