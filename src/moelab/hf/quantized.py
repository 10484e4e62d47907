"""Quantized checkpoints read as the plain checkpoints they stand for.

`DequantizedCheckpoint` is a `Checkpoint` whose quantized weights read as plain ones: `keys()`
lists the plain names (no scales), `get(name)` decodes a weight from its stored parts in the
checkpoint's dtype, `shape(name)` is its plain shape, `stored(name)` what a plain copy holds and
`written_config(config)` that copy's config.json. Views, calibration, compression and offloading
read it as any checkpoint. The formats: `moelab.hf.float8` (block-wise FP8, compressed-tensors FP8)
and `moelab.hf.mxfp4` (GPT-OSS's MXFP4 experts).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import Tensor

from moelab.hf.checkpoint import DTYPES, Checkpoint, CheckpointError, _rows
from moelab.io import LazyTensor, RawTensor

PLAIN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DequantizedCheckpoint(Checkpoint):
    """A checkpoint whose quantized weights read as plain ones (see the module docstring). A format
    records each decoded weight with `_decodes(name, shape, home)` while it opens, and decodes it
    in `_decode(name, rows)`."""

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype, *, shapes_only: bool = False):
        super().__init__(directory, shapes_only=shapes_only)
        self.dtype = dtype
        self._shapes: dict[str, tuple[int, ...]] = {}  # decoded weight -> its plain shape
        self._homes: dict[str, str] = {}  # decoded weight -> the stored tensor whose shard holds it
        self._plain: list[str] = []
        self._plain_set: set[str] = set()

    def _decodes(self, name: str, shape: tuple[int, ...], home: str) -> None:
        """Plain weight `name` of `shape` is decoded from stored tensors beside `home`."""
        self._shapes[name], self._homes[name] = tuple(shape), home
        self._lists(name)

    def _lists(self, name: str) -> None:
        """`name` is a plain tensor's name (decoded, or stored as it is)."""
        self._plain.append(name)
        self._plain_set.add(name)

    def _decode(self, name: str, rows: range | None) -> Tensor:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return list(self._plain)

    def __contains__(self, name: str) -> bool:
        return name in self._plain_set

    def stored_keys(self) -> list[str]:
        """Every tensor name in the files, scales included."""
        return super().keys()

    def decodes(self, name: str) -> bool:
        """Whether plain tensor `name` is decoded from quantized parts (not stored as it is)."""
        return name in self._shapes

    def get(self, name: str, rows: range | None = None) -> Tensor:
        if name not in self._shapes:
            if name not in self:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.directory}")
            return super().get(name, rows)
        shape = self._shapes[name]
        if rows is not None:
            rows = _rows(name, rows, shape)
        if self.shapes_only:
            return torch.empty(
                shape if rows is None else (len(rows), *shape[1:]), dtype=self.dtype, device="meta"
            )
        out = self._decode(name, rows)
        if not torch.isfinite(out).all():  # NaN codes in the files, or values beyond the dtype (fp16's 65504)
            raise CheckpointError(
                f"{self.directory}: {name} holds NaN or Inf once dequantized to {str(self.dtype).removeprefix('torch.')}: "
                "read it in a wider dtype (bf16, fp32) if it overflowed, else the weights are corrupt"
            )
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._shapes else super().shape(name)

    def shard(self, name: str) -> str:
        return super().shard(self._homes.get(name, name))

    def stored(self, name: str) -> RawTensor | LazyTensor:
        if name not in self._shapes:
            return super().stored(name)
        return LazyTensor(self.dtype, self._shapes[name], lambda: self.get(name))

    def written_config(self, config: dict) -> dict:
        return plain_config(config, self.dtype)

    def stored_value(self, key: str) -> Tensor:
        """A stored tensor's values as stored, scales included (a shapes-only checkpoint reads them too)."""
        raw = self.raw(key)
        data = bytearray(raw.nbytes)
        self.read_bytes(raw.path, raw.offset, memoryview(data), key)
        return torch.frombuffer(data, dtype=DTYPES[raw.dtype]).reshape(raw.shape) if data else torch.empty(0)

    def _stores(self, key: str) -> bool:
        return Checkpoint.__contains__(self, key)


def stated_dtype(config: dict) -> torch.dtype:
    """The dtype config.json states for the model (`dtype`, or the older `torch_dtype`); bf16 where
    it states none, or a quantized one."""
    return PLAIN_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.bfloat16)


def plain_config(config: dict, dtype: torch.dtype) -> dict:
    """config.json of the plain checkpoint: no `quantization_config`, its dtype `dtype`."""
    plain = {k: copy.deepcopy(v) for k, v in config.items() if k != "quantization_config"}
    return plain | {
        key: str(dtype).removeprefix("torch.") for key in ("torch_dtype", "dtype") if key in config
    }
