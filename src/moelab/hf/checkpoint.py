"""Lazy, read-only access to the tensors of a safetensors checkpoint directory.

`Checkpoint(dir)` maps every tensor name to its shard, from the files transformers'
`from_pretrained` reads: the file config.json's `transformers_weights` names, else
`model.safetensors` alone, else `model.safetensors.index.json`; a directory with none of them
(which transformers does not load) is read from the headers of all its `*.safetensors` files, a
tensor name in two of them refused. `get(name)` reads
one tensor with plain file reads, so a model larger than RAM can be read piece by piece;
`Checkpoint(dir, shapes_only=True)` reads shard headers only. Pickle weights (`pytorch_model.bin`,
`*.pt`, ...) are refused, never unpickled. Shard names in the index must be files inside the
directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from moelab.files import file_inside, open_safetensors, read_json_object
from moelab.io import LazyTensor, RawTensor
from moelab.validation import non_finite_names

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# weights in any format: beside an edited or converted checkpoint they would be stale copies of the source
WEIGHT_FILE = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|pkl|pickle|h5|msgpack|gguf|onnx|onnx_data|ot|tflite|npz|npy)"
)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint directory that moelab cannot read as asked: missing or mismatched files,
    tensors or config entries. The message says what was expected, what was found and the fix."""


class Checkpoint:
    """The tensors of one checkpoint directory, read lazily.

    keys(): every tensor name; `name in ckpt`; shape(name) reads a shard header only;
    get(name) reads one tensor (at most one shard's header handle is open at a time); read_into
    reads one straight into a tensor, keeping the shards it reads open; `close()` closes them all.
    shapes_only: get(name) returns a tensor on the meta device with the stored shape and dtype,
    read from the shard header (no weights are read): enough to check a model's layout.
    finite_only: get(name) refuses a floating-point tensor holding Inf or NaN (`check_finite`),
    for a reader that checks nothing after it (offloading's expert loads).
    """

    finite_only = False

    def __init__(self, directory: str | os.PathLike, *, shapes_only: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory; pass a checkpoint directory")
        self.shapes_only = shapes_only
        self._shard_of = _index(self.directory)
        self._open: tuple[str, object, set[str]] | None = None  # (shard file, safe_open handle, its keys)
        self._headers: dict[
            str, tuple[int, dict]
        ] = {}  # shard -> (data start, {name: (dtype, shape, begin, end)})
        self._stats: dict[Path, tuple[int, int, int]] = {}  # shard path -> (inode, size, mtime) at its header read
        self._located: dict[str, RawTensor] = {}  # `locate`'s tensors, located once
        self._files: dict[Path, int] = {}  # read_bytes's open shards (file descriptors)
        weakref.finalize(self, _close_files, self._files)  # closed with the checkpoint, if `close` never is

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def get(self, name: str, rows: range | None = None) -> Tensor:
        """The tensor `name`, as stored (dtype included); a meta tensor if shapes_only. rows: read
        only these entries of its first dim (a step-1 range; e.g. some experts of a stacked
        tensor). Read with plain file reads, not through a memory map, so that the shard's pages do
        not stay in the process's memory; a shard that changed on disk since this checkpoint first
        read it, or while this read ran, is refused."""
        if self.shapes_only:
            header = self._handle(name).get_slice(name)
            dtype = header.get_dtype()
            if dtype not in DTYPES:
                raise CheckpointError(f"tensor {name!r} in {self.directory} has the unsupported dtype {dtype}")
            shape = header.get_shape()
            if rows is not None:
                shape = [len(_rows(name, rows, shape)), *shape[1:]]
            return torch.empty(shape, dtype=DTYPES[dtype], device="meta")
        raw = self.locate(name, rows)
        if raw.dtype not in DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.directory} has the unsupported dtype {raw.dtype}")
        offset, nbytes, shape = raw.offset, raw.nbytes, raw.shape
        data = bytearray(nbytes)
        with _still_there(), open(raw.path, "rb") as f:
            self._check_unchanged(raw.path, os.fstat(f.fileno()))
            f.seek(offset)
            if f.readinto(data) != nbytes:
                raise CheckpointError(f"{raw.path} ends inside tensor {name!r}; it is truncated, re-download it")
            self._check_unchanged(raw.path, os.fstat(f.fileno()))  # not rewritten while read: else mixed bytes
        tensor = torch.frombuffer(data, dtype=DTYPES[raw.dtype]) if nbytes else torch.empty(0, dtype=DTYPES[raw.dtype])
        if self.finite_only:
            check_finite(self.directory, name, tensor, rows)
        return tensor.reshape(shape)

    def read_into(self, name: str, out: Tensor, row: int | None = None) -> None:
        """Read tensor `name`, or entry `row` of its first dim, straight into `out`: a contiguous CPU
        tensor of its stored dtype and shape (one positioned read into `out`'s memory, no buffer in
        between). A shard that changed on disk since this checkpoint first read it is refused."""
        raw = self.locate(name, None if row is None else range(row, row + 1))
        offset, shape = raw.offset, raw.shape if row is None else raw.shape[1:]
        if DTYPES.get(raw.dtype) != out.dtype or tuple(out.shape) != tuple(shape):
            raise ValueError(
                f"cannot read tensor {name!r} ({raw.dtype} {list(shape)}) into a {out.dtype} {list(out.shape)} tensor"
            )
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(
                f"read_into needs a contiguous CPU tensor, got a {'' if out.is_contiguous() else 'non-'}contiguous "
                f"one on {out.device}"
            )
        self.read_bytes(raw.path, offset, byte_view(out), name)

    def read_bytes(
        self, path: Path, offset: int, target: memoryview, name: str, *, uncached: bool = False
    ) -> None:
        """Fill `target` (a writable byte view) with the bytes of shard `path` from `offset` (the data of
        tensor `name`, located by `raw`): one positioned read, no buffer in between. The shard stays
        open between calls (`close` closes it) and is checked unchanged before and after each read:
        rewritten in place, even while being read, or replaced by another file (unlinking the open
        one moves its change time), it is refused. uncached: read
        the bytes from the storage device, not the OS page cache (`posix_fadvise`, Linux): dropped
        from the cache before the read (other reads of the file, and the kernel's read-ahead past
        them, may have brought them in) and after it, and no read-ahead past them."""
        fd = self._files.get(path)
        if fd is None:
            with _still_there():
                fd = self._files[path] = os.open(path, os.O_RDONLY)
        self._check_unchanged(path, os.fstat(fd))
        done, nbytes = 0, len(target)
        if uncached:  # whole pages: the kernel drops only those inside the range
            page = os.sysconf("SC_PAGE_SIZE")
            start, end = offset // page * page, -(-(offset + nbytes) // page) * page
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_RANDOM)
        while done < nbytes:
            got = os.preadv(fd, [target[done:]], offset + done)
            if got == 0:
                raise CheckpointError(f"{path} ends inside tensor {name!r}; it is truncated, re-download it")
            done += got
        if uncached:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        self._check_unchanged(path, os.fstat(fd))  # not rewritten while read: else mixed bytes

    def _check_unchanged(self, path: Path, stat: os.stat_result) -> None:
        if _identity(stat) != self._stats[path]:
            raise CheckpointError(
                f"{path} changed on disk while moelab was reading it (size, time or inode differ from when it "
                "was opened); do not rewrite a checkpoint that is in use: wait for the writer, then reopen it"
            )

    def locate(self, name: str, rows: range | None = None) -> RawTensor:
        """Where tensor `name`, or these entries of its first dim (a step-1 range), lie in its shard."""
        if name not in self._located:
            self._located[name] = self.raw(name)
        raw = self._located[name]
        if rows is None:
            return raw
        rows = _rows(name, rows, raw.shape)
        row_bytes = raw.nbytes // raw.shape[0] if raw.shape[0] else 0
        return dataclasses.replace(
            raw, offset=raw.offset + rows.start * row_bytes, nbytes=len(rows) * row_bytes, shape=(len(rows), *raw.shape[1:])
        )

    def raw(self, name: str) -> RawTensor:
        """Where tensor `name` lies in its shard (for copying it without loading it)."""
        self._handle(name)  # checks the shard (readable, the name in it)
        shard = self._shard_of[name]
        start, entries = self._header(shard)
        dtype, shape, begin, end = entries[name]
        return RawTensor(self.directory / shard, start + begin, end - begin, dtype, tuple(shape))

    def entry(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of stored tensor `name`, from its shard's header alone (read
        once per shard; no shard is opened for it, so scanning every name of a checkpoint of many
        shards stays cheap)."""
        if name not in self._shard_of:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.directory}")
        shard = self._shard_of[name]
        entries = self._header(shard)[1]
        if name not in entries:
            raise CheckpointError(
                f"{INDEX_NAME} in {self.directory} maps {name!r} to {shard}, but that shard has no such "
                "tensor; the index does not match its shards (re-create the index or re-download the shards)"
            )
        dtype, shape, _, _ = entries[name]
        return dtype, tuple(shape)

    def _header(self, shard: str) -> tuple[int, dict]:
        if shard not in self._headers:
            with _still_there():
                self._stats[self.directory / shard] = _identity(os.stat(self.directory / shard))
                self._headers[shard] = _read_header(self.directory / shard)
        return self._headers[shard]

    def stored(self, name: str) -> RawTensor | LazyTensor:
        """Tensor `name` as a copy of this checkpoint holds it, for `save_safetensors_stream`: where
        its bytes lie (copied, never loaded)."""
        return self.raw(name)

    def stored_parts(self, name: str) -> list[str]:
        """The stored tensors that tensor `name` is made of, and those that go with it: itself here; a
        quantized format's reader (`moelab.hf.quantized`) adds its scales and activation scales."""
        return [name] if name in self else []

    def with_shapes_only(self) -> Checkpoint:
        """This checkpoint read with shapes and dtypes only (see `shapes_only`): what it has read
        of the files (index, shard headers, a quantized format's tables) shared, not read again;
        its open files its own."""
        twin = copy.copy(self)
        twin.shapes_only, twin._open, twin._files = True, None, {}
        weakref.finalize(twin, _close_files, twin._files)
        return twin

    def written_config(self, config: dict) -> dict:
        """config.json of a copy of this checkpoint made of `stored` tensors (a copy of `config`)."""
        return copy.deepcopy(config)

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

    def drop_cached(self) -> None:
        """Drop every shard's bytes from the OS page cache (`posix_fadvise`, Linux; pages another
        process or mapping holds stay), so that the next reads go to the storage device."""
        for shard in sorted(set(self._shard_of.values())):
            fd = os.open(self.directory / shard, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Close the open shards (they reopen when read again)."""
        self._close_handle()
        _close_files(self._files)

    def _close_handle(self) -> None:
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
            self._close_handle()
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
    """tensor name -> shard file name, from the weights transformers reads (see the module
    docstring). Raises for missing shards, names in two shards and pickle-only checkpoints."""
    explicit = _explicit_weights(directory)
    if explicit is not None and not explicit.endswith(".safetensors.index.json"):
        return _names_in(directory, [explicit])
    if explicit is None and (directory / WEIGHTS_NAME).is_file():
        return _names_in(directory, [WEIGHTS_NAME])  # transformers ignores an index beside it
    index_path = directory / (explicit or INDEX_NAME)
    if index_path.exists():
        weight_map = _weight_map(index_path)
        missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
        if missing:
            raise CheckpointError(
                f"{index_path} lists shard(s) {', '.join(missing)}, missing from {directory}; "
                "copy or re-download the missing shard files"
            )
        stored = _names_in(directory, sorted(set(weight_map.values())))
        if unlisted := sorted(set(stored) - set(weight_map)):
            raise CheckpointError(
                f"{stored[unlisted[0]]} holds {len(unlisted)} tensor(s) that {index_path.name} does not list "
                f"({', '.join(unlisted[:3])}); the index does not match its shards (transformers would load them, "
                "a copy that follows the index would drop them): re-create the index"
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
    return _names_in(directory, shards)


def _names_in(directory: Path, shards: list[str]) -> dict[str, str]:
    """tensor name -> shard file name, from the shards' headers; a name in two shards is refused."""
    shard_of: dict[str, str] = {}
    for shard in shards:
        path = directory / shard
        if path.is_symlink() and not path.exists():  # found now, so not `_removed`: a link to nothing
            raise CheckpointError(
                f"{path} links to {os.readlink(path)}, which does not exist; re-download the checkpoint "
                "(or remove the broken link)"
            )
        with open_safetensors(path, error=CheckpointError) as f:
            for name in f.keys():
                if name in shard_of:
                    raise CheckpointError(
                        f"{directory}: tensor {name!r} is in both {shard_of[name]} and {shard}, and no "
                        f"{WEIGHTS_NAME} or {INDEX_NAME} says which file holds the model; remove the "
                        "stray file, or write an index"
                    )
                shard_of[name] = shard
    return shard_of


def _explicit_weights(directory: Path) -> str | None:
    """The weights file config.json's `transformers_weights` names (transformers reads it instead
    of model.safetensors or the index): a .safetensors file or a .safetensors.index.json."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    name = read_json_object(config_path, "a model config", error=CheckpointError).get("transformers_weights")
    if name is None:
        return None
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise CheckpointError(
            f"{config_path} sets transformers_weights to {name!r}, expected a .safetensors or "
            ".safetensors.index.json file name; fix or remove it"
        )
    path = file_inside(directory, name, config_path, error=CheckpointError)
    if not path.is_file():
        raise CheckpointError(f"{config_path} sets transformers_weights to {name!r}, not a file in {directory}")
    return name


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name; every shard a file name inside its directory."""
    index = read_json_object(index_path, "a safetensors index with a weight_map", error=CheckpointError)
    weight_map = index.get("weight_map")
    fix = "re-create the index, or delete it to read the directory's *.safetensors files"
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index_path} has no weight_map (a JSON object of tensor name: shard file); {fix}"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{index_path} maps {name!r} to {shard!r}, expected a shard file name; {fix}"
            )
    for shard in set(weight_map.values()):
        file_inside(index_path.parent, shard, index_path, error=CheckpointError)
    return weight_map


def _close_files(files: dict[Path, int]) -> None:
    for fd in files.values():
        os.close(fd)
    files.clear()


def check_finite(directory: Path, name: str, tensor: Tensor, rows: range | None = None) -> None:
    """Refuse tensor `name` of the checkpoint in `directory` (or these entries of its first dim)
    where it holds Inf or NaN: a corrupt checkpoint, which would decode to garbage, not an error.
    Float8 codes are left to their dequantized values (`DequantizedCheckpoint.get` checks those)."""
    if tensor.element_size() > 1 and non_finite_names([(name, tensor)]):
        where = name if rows is None else f"{name}[{rows.start}:{rows.stop}]"
        raise CheckpointError(
            f"{directory}: {where} holds Inf/NaN: the checkpoint is corrupt; re-download it or write it again "
            "from a sound copy"
        )


def byte_view(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (a target for `Checkpoint.read_bytes`)."""
    return memoryview(tensor.detach().view(torch.uint8).numpy()).cast("B")


@contextmanager
def _still_there():
    """A shard that was there when the checkpoint was opened (its index checked) but is gone now:
    a clear error instead of FileNotFoundError."""
    try:
        yield
    except FileNotFoundError as err:
        raise _removed(err.filename) from None


def _removed(path) -> CheckpointError:
    return CheckpointError(
        f"{path} was removed while moelab was using the checkpoint (it was there when opened); do not "
        "delete or move a checkpoint that is in use: restore the file, then reopen the checkpoint"
    )


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file's content may have: its inode, size, modification time, and the
    inode's change time (a rewrite that sets the modification time back, as `rsync --inplace -t`
    does, still moves it)."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _rows(name: str, rows: range, shape: list[int] | tuple[int, ...]) -> range:
    """rows, checked to be a step-1 range inside the first dim of tensor `name`'s shape."""
    if not shape or rows.step != 1 or not 0 <= rows.start <= rows.stop <= shape[0]:
        raise CheckpointError(
            f"cannot read rows {rows} of tensor {name!r} with shape {list(shape)}; expected a step-1 range "
            "inside its first dim"
        )
    return rows


def _read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, {name: (dtype, shape, begin, end)}) from a safetensors header
    (which safetensors has already validated when the shard was opened)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    entries = {
        name: (entry["dtype"], entry["shape"], *entry["data_offsets"])
        for name, entry in header.items()
        if name != "__metadata__"
    }
    return 8 + size, entries


def _safe_open(path: Path):
    """A shard of an opened checkpoint (every shard was there when it opened)."""
    if not path.exists():
        raise _removed(path)
    return open_safetensors(path, error=CheckpointError)


# files of a checkpoint directory that do not go with its weights to another format
_NOT_SIDE_FILES = re.compile(r"config\.json|\..*|.*\.index\.json|.*\.py")


def side_files(path: Path) -> list[Path]:
    """The files beside a checkpoint's weights and config.json that go with it (tokenizer files,
    chat template, generation config, license, moelab's expert map, ...): not weights, indexes,
    code or hidden files."""
    return sorted(
        p for p in path.iterdir()
        if p.is_file() and not _NOT_SIDE_FILES.fullmatch(p.name) and not WEIGHT_FILE.fullmatch(p.name)
    )
