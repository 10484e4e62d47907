"""`moelab dequantize`: a quantized checkpoint rewritten with plain weights, one tensor at a time.

moelab's own commands read block-wise FP8, llm-compressor's FP8 and GPT-OSS's MXFP4 releases
directly (`moelab.hf.quantized`); this writes the plain checkpoint they read, for tools that
cannot: quantized weights dequantized as they are written (one in memory at a time), their scales
and activation scales dropped, every other tensor copied byte for byte, shard names and the index
kept, and config.json without its `quantization_config` (a multimodal release's: its dtype set in
text_config too, `moelab.hf.multimodal`). Output as every moelab checkpoint: staged,
published whole, replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelab.files import read_json_object
from moelab.hf.adapters import check_checkpoint_dir, open_weights
from moelab.hf.checkpoint import CheckpointError
from moelab.hf.multimodal import language_config, nested_config
from moelab.hf.writer import copy_side_files, index_name
from moelab.io import StagedOutput, atomic_write_text, save_safetensors_stream
from moelab.memory import release_freed_memory
from moelab.models.pretrained import CHECKPOINT_KIND

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dequantize_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write the quantized checkpoint `source` into the new directory `out` with its quantized
    weights dequantized to `dtype` (see the module docstring). Returns `out`."""
    source = Path(source).resolve()
    check_checkpoint_dir(source, "a quantized checkpoint directory")
    stored = read_json_object(source / "config.json", "a model config", error=CheckpointError)
    config = language_config(stored)  # a multimodal release's language model (its dtype and quantization)
    if config.get("quantization_config") is None:
        raise CheckpointError(f"{source / 'config.json'} has no quantization_config: its weights are plain already")
    with (
        StagedOutput(out, CHECKPOINT_KIND, inputs=[source], overwrite=overwrite) as staging,
        open_weights(source, config, dtype) as ckpt,
    ):
        weight_map, total, by_shard = {}, 0, {}
        for key in ckpt.keys():
            by_shard.setdefault(ckpt.shard(key), []).append(key)
        for shard in tqdm(ckpt.shards(), desc="dequantize", unit="shard", disable=quiet, leave=False):
            tensors = {key: ckpt.stored(key) for key in by_shard.get(shard, [])}
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
        written = nested_config(ckpt.written_config(config), stored)  # each key where the source has it
        atomic_write_text(staging / "config.json", json.dumps(written, indent=2) + "\n")
    return Path(out)
