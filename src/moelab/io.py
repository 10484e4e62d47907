"""Outputs that never lose a user's data.

Files: `atomic_write_bytes`, `atomic_write_text` and `save_safetensors` write a temporary file
beside the target, flush it to disk, then rename it over the target, so a reader sees the old
file or the new one, never a torn one.

Directories: every command that writes a directory claims it through one contract.

- The directory is new (or empty), or moelab's own output of the same kind: a marker file
  (`.moelab-output.json`) names the kind and the entries moelab wrote there.
- An existing output is replaced only with `overwrite=True` (`--overwrite`), and only when every
  entry in it is moelab's; otherwise the foreign entries are named and nothing is touched.
- It never is, contains or lies inside an input of the command, nor lies inside another
  moelab output but while a command writes that one (the outputs it nests in its own).
- One process at a time: a lock file beside it (`.NAME.moelab-lock`, an flock that dies with its
  process) makes a second run into the same output fail with "in use".
- What a killed run left beside it (hidden staging and trash directories) is removed by the next
  run into the same output, and an old output that was moved aside to be replaced is put back.

There are two ways to fill an output:

- `StagedOutput(out, kind)` (a context manager): the directory is built in a hidden staging
  directory beside `out` and appears whole, by one rename (checkpoints, traces);
- `output_dir(out, kind, entries=...)`: the directory is filled step by step (a training run,
  an analysis, a comparison); `entries` names what moelab writes into it.

Beside `out`, moelab only ever creates hidden `.NAME.moelab-*` entries, which exist while it runs
(or, after a kill, until the next run into the same output). Deletions and renames of outputs
happen only in this module.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.files import inside_checkpoint

MARKER = ".moelab-output.json"
MARKER_FORMAT = "moelab-output/1"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.moelab-(?P<what>lock|staging|old|trash|tmp)(?P<suffix>-[0-9a-z_]+)?$")


class OutputError(ValueError):
    """An output path moelab may not write: it says what is there and what to do instead."""


class OutputInUseError(OutputError):
    """Another moelab process is writing the same output."""


# ----------------------------------------------------------------------------- files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    with _temporary_beside(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, made atomic and durable (see `atomic_write_bytes`)."""
    from safetensors.torch import save_file

    with _temporary_beside(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)


@dataclass(frozen=True)
class RawTensor:
    """A tensor stored in a safetensors file, by location: `nbytes` bytes at byte `offset` of
    `path`, with the file's dtype name ("BF16", ...) and shape. `save_safetensors_stream` copies
    such tensors byte for byte, without loading them."""

    path: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


SAFETENSORS_DTYPES = {
    torch_name: st_name
    for st_name, torch_name in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
        ("I64", "int64"), ("I32", "int32"),
        ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    )
}  # fmt: skip
_COPY_CHUNK = 1 << 24


@dataclass(frozen=True)
class LazyTensor:
    """A tensor `save_safetensors_stream` computes only when it writes it (`make()`, which must
    give this dtype and shape), so that a file of computed tensors holds one in memory at a time."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def save_safetensors_stream(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file (atomically, as `save_safetensors`) from in-memory tensors,
    `RawTensor`s, which are copied from their files in chunks, and `LazyTensor`s, computed as they
    are written: writing a shard that is mostly unchanged, or computed, holds only the changed
    tensors, or one at a time, in memory."""
    entries, header, offset = [], {}, 0
    for name, value in tensors.items():
        if isinstance(value, RawTensor):
            dtype, shape, nbytes = value.dtype, list(value.shape), value.nbytes
        elif isinstance(value, LazyTensor):
            dtype, shape, nbytes = SAFETENSORS_DTYPES[str(value.dtype).removeprefix("torch.")], list(value.shape), value.nbytes
        else:
            value = value.detach().contiguous().cpu()
            dtype, shape = SAFETENSORS_DTYPES[str(value.dtype).removeprefix("torch.")], list(value.shape)
            nbytes = value.numel() * value.element_size()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        entries.append(value)
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with _temporary_beside(Path(path)) as tmp, open(tmp, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for value in entries:
            if isinstance(value, RawTensor):
                with open(value.path, "rb") as source:
                    source.seek(value.offset)
                    left = value.nbytes
                    while left:
                        chunk = source.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise OSError(f"{value.path} ended before its tensor did; it is truncated")
                        out.write(chunk)
                        left -= len(chunk)
            elif isinstance(value, LazyTensor):
                _write_made(out, value)  # made, written and released before the next one is made
            elif value.numel():
                out.write(memoryview(value.view(-1).view(torch.uint8).numpy()))


def _write_made(out, lazy: LazyTensor) -> None:
    made = lazy.make().detach().contiguous().cpu()
    if made.dtype != lazy.dtype or tuple(made.shape) != tuple(lazy.shape):
        raise ValueError(f"a lazy tensor promised {lazy.dtype} {list(lazy.shape)}, made {made.dtype} {list(made.shape)}")
    if made.numel():
        out.write(memoryview(made.view(-1).view(torch.uint8).numpy()))


@contextmanager
def _temporary_beside(path: Path) -> Iterator[str]:
    """A temporary file name beside `path`; once the caller has written it, it is flushed to disk,
    given the usual permissions (mkstemp's are 0600) and renamed over `path`."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.moelab-tmp-")
            break
        except FileNotFoundError:  # a parent a refused run had made, and removed empty in between (`_lock`)
            continue
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    is_own: Callable[[Path], bool],
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """A single output file (a benchmark's JSON): new, or with `overwrite` one that `is_own`
    recognises as moelab's; not a link, not inside an input directory. Returns the resolved path;
    the caller writes it atomically."""
    path = _output_path(path, "file")
    _check_inputs(path, inputs)
    _check_parents(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for the output")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"{path} is not a regular file; give a file name for the output")
        if not is_own(path):
            raise OutputError(
                f"{path} exists and was not written by moelab as this command's output (it replaces only such a "
                "file): choose another name"
            )
        if not overwrite:
            raise OutputError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    return path


def write_output_file(
    path: str | os.PathLike, data: bytes, *, overwrite: bool, is_own: Callable[[Path], bool]
) -> None:
    """Write the single output file `path`, claimed with `check_output_file` before the work,
    atomically; checked again first, since a file may have appeared there while the command ran
    (a user's, or another run's result), and it is replaced only as the claim allows."""
    try:
        path = check_output_file(path, overwrite=overwrite, is_own=is_own)
    except OutputError as err:
        raise OutputError(f"{err} (it appeared while this command ran; the results were not written)") from None
    atomic_write_bytes(path, data)


def has_json_format(path: Path, fmt: str) -> bool:
    """Whether `path` holds a JSON object whose "format" is `fmt` (moelab's own result files)."""
    try:
        return json.loads(path.read_text()).get("format") == fmt
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        return False


# ----------------------------------------------------------------------------- directories


@dataclass(frozen=True)
class OutputDir:
    """A claimed output directory. resumed: it held moelab's output of this kind, kept as it was."""

    path: Path
    resumed: bool

    def clear(self) -> None:
        """Delete every entry moelab wrote here (start again in the same claimed directory)."""
        marker = _read_marker(self.path)
        _check_no_foreign(self.path, marker)
        for name in marker["entries"]:
            if (self.path / name).exists() or (self.path / name).is_symlink():
                _discard(self.path / name)


@contextmanager
def output_dir(
    out: str | os.PathLike,
    kind: str,
    *,
    entries: Iterable[str],
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    resume: bool = False,
    resume_hint: str = "",
    patterns: Mapping[str, str] | None = None,
) -> Iterator[OutputDir]:
    """Claim `out` for an output of `kind` that is filled step by step, holding its lock until
    the block ends. entries: the names moelab writes directly inside it. An existing output of
    the same kind is cleared first with `overwrite`, kept with `resume`, refused otherwise
    (`resume_hint` tells how to continue it). patterns: {entry directory: a regular expression of
    the names moelab writes in it}, so that `--overwrite` refuses a user's file added there."""
    out = _output_path(out)
    _check_inputs(out, inputs)
    _check_enclosing(out)
    with _lock(out):
        created = not out.exists()
        marker = _inspect(out, kind)
        if marker is not None and (overwrite or not resume):
            _check_replaceable(out, kind, marker, overwrite, resume_hint)
            OutputDir(out, resumed=False).clear()
        resumed = marker is not None and not overwrite
        out.mkdir(parents=True, exist_ok=True)
        earlier = set(marker["entries"]) if marker is not None else set()
        owned = set(entries) | (earlier if resumed else set())
        # leftovers of a replaced output's entries go too; a resumed job's nested outputs take their staging over
        _clean_leftovers(out, None, keep_staging=resumed, owns=(set(entries) | earlier).__contains__)
        _write_marker(out, kind, owned, patterns=patterns)
        try:
            yield OutputDir(out, resumed)
        except BaseException:
            if created:  # a run that failed before writing anything leaves no claimed, empty output behind
                _remove_if_empty(out)
            raise


def _remove_if_empty(directory: Path) -> None:
    """Remove `directory` if it holds nothing but markers and empty directories."""
    entries = [p for p in directory.rglob("*") if p.name != MARKER]
    if all(p.is_dir() and not p.is_symlink() for p in entries):
        shutil.rmtree(directory)


class StagedOutput:
    """Build the output directory `out` of `kind` in a staging directory beside it, then publish
    it by one rename (replacing an existing output of the same kind only with `overwrite`).

        with StagedOutput(out, "checkpoint", inputs=[source]) as staging:
            ...write files into staging...     # published on success, discarded on error

    `open()` / `publish()` / `abort()` do the same for writers that stream across calls. With
    `resume`, the staging directory a killed (or failed, or Ctrl-C'd) run left is taken over
    (`resumed` tells), so a long job can continue from what it had written; the caller checks
    that it belongs to the same job.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        kind: str,
        *,
        inputs: Iterable[str | os.PathLike | None] = (),
        overwrite: bool = False,
        resume: bool = False,
    ):
        self.out = _output_path(out)
        self.kind = kind
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.resume = resume
        self.resumed = False
        self.staging: Path | None = None
        self._unlock: Callable[[], None] | None = None

    def open(self) -> Path:
        """Take the lock, check `out`, clean what killed runs left; returns the staging directory."""
        _check_inputs(self.out, self.inputs)
        _check_enclosing(self.out)
        lock = _lock(self.out)
        lock.__enter__()
        self._unlock = lambda: lock.__exit__(None, None, None)
        try:
            marker = _inspect(self.out, self.kind)
            if marker is not None:
                _check_replaceable(self.out, self.kind, marker, self.overwrite)
            previous = self._previous_staging() if self.resume else None
            _clean_leftovers(self.out.parent, self.out.name, held=True, keep=previous)
            self.staging = previous or _sibling(self.out, "staging")
            if previous is None:
                self.staging.mkdir()
            self.resumed = previous is not None
        except BaseException:
            self._release()
            raise
        return self.staging

    def publish(self) -> Path:
        """Mark the staging directory as moelab's and move it to `out`. Returns `out`."""
        try:
            names = [p.name for p in self.staging.iterdir()]
            _write_marker(self.staging, self.kind, names, parts=_parts(self.staging))
            old = None
            if self.out.exists():
                marker = _read_marker(self.out)
                if marker is None and not any(self.out.iterdir()):
                    self.out.rmdir()
                else:  # checked again: files may have appeared while the output was built
                    _check_replaceable(self.out, self.kind, marker, self.overwrite)
                    old = _sibling(self.out, "old")
                    os.rename(self.out, old)
            os.rename(self.staging, self.out)
            if old is not None:
                _discard(old)
        finally:
            self._release()
        return self.out

    def abort(self, *, keep: bool = False) -> None:
        """Discard the staging directory (or, with `keep` and anything in it, leave it for a
        resumed run to take over); `out` stays as it was."""
        self._release(keep=keep)

    def _previous_staging(self) -> Path | None:
        """The newest staging directory a killed run left for this output, if any."""
        found = [
            entry
            for entry in self.out.parent.iterdir()
            if (match := _leftover(entry.name))
            and match["name"] == self.out.name
            and match["what"] == "staging"
            and entry.is_dir()
            and not entry.is_symlink()
        ]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.publish()
        else:  # a resumable job keeps its work for the next run (after an error or Ctrl-C, as after a kill)
            self.abort(keep=self.resume)

    def _release(self, keep: bool = False) -> None:
        if self.staging is not None and self.staging.exists() and not (keep and any(self.staging.iterdir())):
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
        if self._unlock is not None:
            self._unlock()
            self._unlock = None


def check_output_dir(
    out: str | os.PathLike,
    kind: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    hint: str = "",
) -> None:
    """The checks `StagedOutput` makes when it opens, without claiming `out`: to fail before slow
    work (loading a model) rather than after it. hint: how else to go on (as `output_dir`'s
    resume_hint)."""
    out = _output_path(out)
    _check_inputs(out, inputs)
    _check_enclosing(out)
    marker = _inspect(out, kind)
    if marker is not None:
        _check_replaceable(out, kind, marker, overwrite, hint)


def is_output(path: str | os.PathLike, kind: str) -> bool:
    """Whether `path` is a complete moelab output of `kind`."""
    try:
        marker = _read_marker(Path(path))
    except OutputError:
        return False
    return marker is not None and marker["kind"] == kind


def remove_output(path: str | os.PathLike, kind: str) -> None:
    """Delete the moelab output `path` of `kind` (a rotated training checkpoint, say). It first
    disappears from its directory by one rename, so it is never seen half-deleted. Refuses if
    anything in it was not written by moelab."""
    path = Path(path)
    marker = _read_marker(path)
    if marker is None or marker["kind"] != kind:
        raise OutputError(f"{path} is not a moelab {kind}; moelab does not delete it")
    _check_no_foreign(path, marker)
    _discard(path)


def clear_staging(directory: str | os.PathLike, only: Iterable[str] | None = None) -> None:
    """Delete the entries (or the entries named in `only`) of a directory moelab is building:
    a `StagedOutput`'s staging directory or a part of it, when its content must be made again."""
    directory = Path(directory)
    names = [p.name for p in directory.iterdir()] if only is None else list(only)
    for name in names:
        path = directory / name
        if path.exists() or path.is_symlink():
            _discard(path)


def clean_leftovers(directory: str | os.PathLike, owns: Callable[[str], Any]) -> None:
    """Remove what killed runs left in `directory` (hidden staging and trash directories, stale
    locks) for the outputs whose names `owns` accepts, and put back outputs moved aside for a
    replacement that never happened. Only for a directory whose outputs are all written under one
    lock the caller holds (a run's checkpoints)."""
    _clean_leftovers(Path(directory), None, owns=owns)


def copy_side_file(
    src: Path, dst: Path, root: Path, skip: Callable[[Path], bool] | None = None
) -> str | None:
    """Copy the file or directory `src` of the checkpoint `root` to `dst`. A symlink whose target
    lies outside `root` is copied as a link to that target, never by content (a crafted
    checkpoint must not copy, say, ~/.ssh into an output the user may publish); returns a note
    saying so, else None. A Hugging Face cache snapshot's links into its own `blobs/` count as
    inside. A link back to a directory being copied (a loop) is not followed. skip: files, at any
    depth, to leave behind (a directory they leave empty is not made)."""
    return _copy_side(src, dst, root, skip or (lambda path: False), frozenset({root.resolve()}))


def _copy_side(src: Path, dst: Path, root: Path, skip: Callable[[Path], bool], copying: frozenset) -> str | None:
    if not src.is_dir() and skip(src):  # a file or a link to one, inside the checkpoint or not
        return None
    if src.is_symlink() and not inside_checkpoint(src.resolve(), root):
        os.symlink(src.resolve(), dst)
        return f"{src.name} is a link to {src.resolve()}, outside {root}: copied as a link, not its content"
    if src.is_dir():
        real = src.resolve()
        if real in copying:
            return f"{src} is a link back to {real}, a directory being copied: not followed"
        dst.mkdir()
        notes = [_copy_side(e, dst / e.name, root, skip, copying | {real}) for e in sorted(src.iterdir())]
        if not any(dst.iterdir()):
            dst.rmdir()
        return "; ".join(n for n in notes if n) or None
    shutil.copy2(src, dst)
    return None


# ----------------------------------------------------------------------------- internals


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _output_path(path: str | os.PathLike, what: str = "directory") -> Path:
    """The absolute path of an output, which must not be a link: moelab writes where it was told,
    not where a link points (links among its parents are followed)."""
    given = Path(path).expanduser()
    if given.is_symlink():
        raise OutputError(
            f"{path} is a link (to {given.resolve()}); moelab does not write through a link to an output: give "
            f"the {what}'s own path or a new name"
        )
    return given.resolve()


def _sibling(out: Path, what: str) -> Path:
    """A hidden name beside `out` for moelab's own bookkeeping (lock, staging, old, trash)."""
    suffix = "" if what == "lock" else f"-{os.getpid():x}{uuid.uuid4().hex[:8]}"
    return out.parent / f".{out.name}.moelab-{what}{suffix}"


def _check_parents(out: Path) -> None:
    """Every existing ancestor of `out` is a directory and the nearest one is writable (tried
    with a temporary file: permission bits do not tell, for root or on special file systems)."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {out}: {parent} is a file, not a directory")
            try:
                with tempfile.TemporaryFile(dir=parent):
                    pass
            except OSError as err:
                raise OutputError(
                    f"cannot write {out}: {parent} is not writable ({err.strerror}); choose another output path"
                ) from None
            return


def _check_inputs(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """`out` is none of the inputs, above none and inside none: checked before anything is created
    (the lock file beside `out`, its missing parents), so that a refused run leaves no trace there."""
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = _resolve(given)
        if out == source or out in source.parents:
            what = "is" if out == source else "contains"
            raise OutputError(
                f"the output {out} {what} the input {source}; writing there could replace the input: "
                "choose an output path outside it"
            )
        if source.is_dir() and source in out.parents:
            raise OutputError(
                f"the output {out} lies inside the input {source}; choose an output path outside it"
            )


def _check_enclosing(out: Path) -> None:
    """`out` lies inside no other moelab output, unless this process or one that started it is
    writing that one now (its lock is held: the outputs a command nests in its own, as a demo's
    analysis/, an analysis's trace/ and a compress bench's jobs' cells). Written into one at
    rest, it would change what that output holds (an analysis's report would no longer describe
    its trace) and leave it one `--overwrite` refuses; written by another command while that one
    runs, it would be taken for the running command's own."""
    for parent in out.parents:
        marker = _read_marker(parent)
        if marker is not None:
            if not _is_locked(parent):
                raise OutputError(
                    f"the output {out} lies inside {parent}, moelab's {marker['kind']}: writing there would change "
                    f"what that {marker['kind']} holds; choose an output path outside it"
                )
            holder = _lock_holder(parent)
            if holder is not None and holder["pid"] not in _own_processes():
                raise OutputError(
                    f"the output {out} lies inside {parent}, which another moelab process is writing now "
                    f"({_describe(json.dumps(holder))}); choose an output path outside it"
                )
            return


def _lock_holder(out: Path) -> dict | None:
    """What the process holding `out`'s lock wrote in it ({"pid", "since", "command"}), or None
    where it cannot be read (a lock being taken)."""
    try:
        holder = json.loads(_sibling(out, "lock").read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _own_processes() -> set[int]:
    """This process and the ones that started it (their parents, up the tree where /proc shows
    it; elsewhere this one's parent only)."""
    pids, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])  # the field after the state: the parent's pid
    return pids


def _is_locked(out: Path) -> bool:
    """Whether a process (this one included) holds `out`'s lock: a moelab job is writing it."""
    try:
        fd = os.open(_sibling(out, "lock"), os.O_RDONLY)
    except OSError:  # no lock file: nobody writes it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the shared lock, if taken
    return False


def _inspect(out: Path, kind: str) -> dict | None:
    """Check `out` against the contract (its relation to the inputs: `_check_inputs`); its marker
    if it holds moelab's output of `kind`, None if it is new or empty."""
    _check_parents(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; the output must be a directory: choose another path")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out} is not writable; choose another output directory")
    marker = _read_marker(out)
    if marker is None:
        raise OutputError(
            f"{out} exists and was not written by moelab (it has no {MARKER}); moelab never writes into or "
            "replaces a directory it did not create: choose a new output directory"
        )
    if marker["kind"] != kind:
        raise OutputError(
            f"{out} holds another kind of moelab output ({marker['kind']}, not {kind}); choose another output directory"
        )
    return marker


def _read_marker(directory: Path) -> dict | None:
    path = directory / MARKER
    if not path.is_file() or not directory.is_dir():
        return None
    try:
        marker = json.loads(path.read_text())
        if marker.get("format") != MARKER_FORMAT:
            raise ValueError(f"format {marker.get('format')!r}")
        if not isinstance(marker.get("kind"), str) or not all(
            isinstance(e, str) and e and "/" not in e and e not in (".", "..") for e in marker.get("entries")
        ):
            raise ValueError("bad 'kind' or 'entries'")
        parts, patterns = marker.get("parts", {}), marker.get("patterns", {})
        if not isinstance(parts, dict) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in parts.values()
        ):
            raise ValueError("bad 'parts'")
        if not isinstance(patterns, dict) or not all(isinstance(p, str) for p in patterns.values()):
            raise ValueError("bad 'patterns'")
        for pattern in patterns.values():
            re.compile(pattern)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, re.error) as err:
        raise OutputError(
            f"{path} is damaged ({err}); moelab cannot tell which files in {directory} it wrote, so it "
            "leaves them alone: choose another output directory"
        ) from None
    return marker


def _write_marker(
    directory: Path,
    kind: str,
    entries: Iterable[str],
    parts: dict[str, list[str]] | None = None,
    patterns: Mapping[str, str] | None = None,
) -> None:
    """parts: {subdirectory: its entries}; patterns: {subdirectory: a regular expression of the
    names moelab writes in it, a name ending in "/" for a directory} (for outputs filled step by
    step; "cells/*" stands for every directory in cells/)."""
    doc = {"format": MARKER_FORMAT, "kind": kind, "entries": sorted(set(entries) - {MARKER})}
    if parts:
        doc["parts"] = parts
    if patterns:
        doc["patterns"] = dict(patterns)
    atomic_write_text(directory / MARKER, json.dumps(doc, indent=1) + "\n")


def _parts(directory: Path, prefix: str = "") -> dict[str, list[str]]:
    """{path relative to `directory`: its entries} for every directory inside it that is not an
    output of its own (a report's plots/): what the marker records, so that `--overwrite` finds
    files added to them later."""
    parts = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and _read_marker(entry) is None:
            parts[prefix + entry.name] = sorted(p.name for p in entry.iterdir())
            parts |= _parts(entry, f"{prefix}{entry.name}/")
    return parts


def _check_replaceable(out: Path, kind: str, marker: dict | None, overwrite: bool, hint: str = "") -> None:
    """`out`, holding moelab's output of `kind` (`marker`), may be replaced."""
    if marker is None:
        raise OutputError(f"{out} changed while moelab wrote its replacement; nothing was replaced")
    if not overwrite:
        raise OutputError(
            f"{out} already holds moelab's {kind}; pass --overwrite (overwrite=True) to replace it{hint}, or "
            "choose another output directory"
        )
    _check_no_foreign(out, marker)


def _check_no_foreign(out: Path, marker: dict) -> None:
    foreign = _foreign_entries(out, marker)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise OutputError(
            f"cannot replace {out}: {shown} {'was' if len(foreign) == 1 else 'were'} not written by moelab; "
            f"move {'it' if len(foreign) == 1 else 'them'} out of it first, or choose another output directory"
        )


def _foreign_entries(out: Path, marker: dict) -> list[Path]:
    """Entries of `out` that moelab did not write (looking into owned outputs with markers, and
    into the directories the marker lists as parts or gives a pattern of names)."""
    parts = marker.get("parts") or {}
    patterns = {part: re.compile(pattern) for part, pattern in (marker.get("patterns") or {}).items()}
    return _foreign_in(out, set(marker["entries"]).__contains__, parts, patterns, "")


def _foreign_in(
    directory: Path, owns: Callable[[str], Any], parts: dict, patterns: dict, prefix: str, by_pattern: bool = False
) -> list[Path]:
    """by_pattern: `owns` is a pattern of names (a directory it names is an output of its own, with
    a marker), not the list of entries moelab wrote."""
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name == MARKER or _leftover(entry.name, lambda name: owns(name) or owns(name + "/")):
            continue
        is_dir = entry.is_dir() and not entry.is_symlink()
        if not (owns(entry.name) or (is_dir and owns(entry.name + "/"))):  # a pattern "x/" names directories
            foreign.append(entry)
        elif is_dir:
            inner, part = _read_marker(entry), prefix + entry.name
            pattern = patterns.get(part) or patterns.get(prefix + "*")  # "cells/*": any directory in cells/
            if inner is not None:
                foreign += _foreign_entries(entry, inner)
            elif part in parts:
                foreign += _foreign_in(entry, set(parts[part]).__contains__, parts, patterns, part + "/")
            elif pattern is not None:
                foreign += _foreign_in(entry, pattern.fullmatch, parts, patterns, part + "/", by_pattern=True)
            elif by_pattern:  # moelab writes such a directory whole, with a marker: one without is not moelab's
                foreign += sorted(entry.iterdir())
    return foreign


def _leftover(name: str, owns: Callable[[str], Any] = lambda name: True) -> re.Match | None:
    """The match of `name` if it is one moelab gives its bookkeeping beside an output (`_sibling`,
    `_temporary_beside`: a lock, or a staging, old, trash or temporary entry with its random
    suffix) for an output name that `owns` accepts; else None."""
    match = _LEFTOVER.match(name)
    if match is None or (match["what"] == "lock") != (match["suffix"] is None):
        return None
    return match if owns(match["name"]) or match["name"] == MARKER else None


def _discard(path: Path) -> None:
    """Delete a file, link or directory; a directory is first renamed to a hidden trash name, so
    it is gone from view at once even if the deletion is interrupted."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    trash = _sibling(path, "trash")
    os.rename(path, trash)
    shutil.rmtree(trash)


def _clean_leftovers(
    directory: Path,
    name: str | None,
    *,
    held: bool = False,
    keep: Path | None = None,
    keep_staging: bool = False,
    owns: Callable[[str], Any] = lambda name: True,
) -> None:
    """Remove the leftovers of killed runs in `directory`: of the output `name` (whose lock the
    caller holds if `held`), or of every output there that `owns` accepts and whose lock nobody
    holds; `keep` stays, and with `keep_staging` every staging directory (for the resumable jobs
    inside to take over)."""
    if not directory.is_dir():
        return
    by_name: dict[str, list[tuple[Path, str]]] = {}
    for entry in sorted(directory.iterdir()):
        match = _leftover(entry.name, owns)
        if keep_staging and match is not None and match["what"] == "staging":
            continue
        if match is not None and (name is None or match["name"] == name) and entry != keep:
            by_name.setdefault(match["name"], []).append((entry, match["what"]))
    for target, found in by_name.items():
        if held:
            _remove_leftovers(directory / target, found)
            continue
        fd = _try_lock(directory / target)
        if fd is None:
            continue  # a live run is writing this output
        try:
            _remove_leftovers(directory / target, found)
        finally:
            _unlock(directory / target, fd)


def _remove_leftovers(target: Path, found: list[tuple[Path, str]]) -> None:
    for entry, what in found:
        if what == "lock":
            continue
        if what == "old" and not target.exists():  # killed between moving out the old and in the new
            os.rename(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold `out`'s lock file (beside it) for the block, or raise OutputInUseError at once. The
    parents of `out` it creates go again when the block ends if they are empty (a refused or
    failed run leaves no `runs/` behind)."""
    _check_parents(out)
    try:
        created = _make_parents(out)
    except OSError as err:
        raise OutputError(
            f"cannot create {out.parent} ({err.strerror}); choose another output path"
        ) from None
    try:
        with _held_lock(out):
            yield
    finally:
        for parent in created:
            try:
                parent.rmdir()
            except OSError:  # not empty (the output, another run's): kept, and so are the ones above it
                break


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parents of `out`; returns those this call made, deepest first (not one
    another process made meanwhile, which `_lock` must not remove). One that was there and goes
    meanwhile (a failed run removing, empty, the parent it made) is made again, as this call's."""
    created = []
    while missing := [parent for parent in out.parents if not parent.exists()]:
        try:
            missing[-1].mkdir()  # the topmost missing one
        except FileExistsError:  # another process made it: not ours
            if not missing[-1].is_dir():
                raise
            continue
        except FileNotFoundError:  # its own parent went meanwhile: look again
            continue
        created.append(missing[-1])
    return created[::-1]


@contextmanager
def _held_lock(out: Path) -> Iterator[None]:
    """`_lock`'s lock file itself, in a parent directory that exists."""
    fd = _try_lock(out)
    if fd is None:
        try:
            holder = _sibling(out, "lock").read_text()
        except OSError:
            holder = ""
        raise OutputInUseError(
            f"{out} is in use by another moelab process ({_describe(holder)}); wait for it to finish or "
            "choose another output directory"
        )
    try:
        holder = {
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        yield
    finally:
        _unlock(out, fd)


def _try_lock(out: Path) -> int | None:
    """Lock `out`'s lock file: its descriptor, or None if another process holds it."""
    path = _sibling(out, "lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a parent another refused run had just created, and removed empty
            out.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as err:
            raise OutputError(
                f"cannot write beside {out} ({err.strerror}); choose another output path"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: retry


def _unlock(out: Path, fd: int) -> None:
    """Release a lock: the file goes first, so nobody locks a file that is about to vanish."""
    _sibling(out, "lock").unlink(missing_ok=True)
    os.close(fd)


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']}, since {info['since']}: {info['command'][:120]}"
    except (ValueError, KeyError, TypeError):
        return "starting up"
