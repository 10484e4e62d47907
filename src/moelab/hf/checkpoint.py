"""Lazy, read-only access to the tensors of a safetensors checkpoint directory.

`Checkpoint(dir)` maps every tensor name to its shard, from `model.safetensors.index.json` or,
without an index, from the headers of the directory's `*.safetensors` files. `get(name)` reads
one tensor and keeps at most one shard open, so a model larger than RAM can be read piece by
piece. Pickle weights (`pytorch_model.bin`, `*.pt`, ...) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint directory that moelab cannot read as asked: missing or mismatched files,
    tensors or config entries. The message says what was expected, what was found and the fix."""


class Checkpoint:
    """The tensors of one checkpoint directory, read lazily.

    keys(): every tensor name; `name in ckpt`; shape(name) reads a shard header only;
    get(name) reads one tensor. At most one shard is open at a time (`close()` closes it).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory; pass a checkpoint directory")
        self._shard_of = _index(self.directory)
        self._open: tuple[str, object, set[str]] | None = None  # (shard file, safe_open handle, its keys)

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def get(self, name: str) -> Tensor:
        """The tensor `name`, as stored (dtype included)."""
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`, read from its shard's header."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def shard(self, name: str) -> str:
        """The file name of the shard that holds tensor `name`."""
        if name not in self._shard_of:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.directory}")
        return self._shard_of[name]

    def shards(self) -> list[str]:
        """The shard file names, in order."""
        return sorted(set(self._shard_of.values()))

    def metadata(self, shard: str) -> dict[str, str]:
        """The string metadata in a shard's header (transformers writes {"format": "pt"})."""
        with _safe_open(self.directory / shard) as f:
            return f.metadata() or {}

    def close(self) -> None:
        if self._open is not None:
            self._open[1].__exit__(None, None, None)
            self._open = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, name: str):
        shard = self._shard_of.get(name)
        if shard is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.directory}")
        if self._open is None or self._open[0] != shard:
            self.close()
            handle = _safe_open(self.directory / shard)
            self._open = (shard, handle, set(handle.keys()))
        _, handle, shard_keys = self._open
        if name not in shard_keys:
            raise CheckpointError(
                f"{INDEX_NAME} in {self.directory} maps {name!r} to {shard}, but that shard has no such "
                "tensor; the index does not match its shards (re-create the index or re-download the shards)"
            )
        return handle


def _index(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index if there is one, else from every
    `*.safetensors` file's header. Raises for missing shards and pickle-only checkpoints."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
        if missing:
            raise CheckpointError(
                f"{index_path} lists shard(s) {', '.join(missing)}, missing from {directory}; "
                "copy or re-download the missing shard files"
            )
        return weight_map
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(
                f"{directory} holds only pickle weights ({', '.join(pickles)}); moelab never unpickles "
                "(loading a pickle can run arbitrary code). Convert the checkpoint to safetensors first, "
                "e.g. on a trusted machine: transformers' model.save_pretrained(out_dir) writes safetensors"
            )
        raise CheckpointError(f"no *.safetensors weights (and no {INDEX_NAME}) in {directory}")
    shard_of = {}
    for shard in shards:
        with _safe_open(directory / shard) as f:
            shard_of.update(dict.fromkeys(f.keys(), shard))
    return shard_of


def _safe_open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt, re-download it"
        ) from err
