"""Reading user files: an unreadable or malformed input becomes one ValueError that names the
file (and, for JSON and YAML, the line) and says what was expected.

Weights are read with safetensors only, never pickle; YAML with a safe loader that also refuses
a key given twice (plain PyYAML keeps the last one silently).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError, safe_open

ErrorType = type[ValueError]


def read_text(path: str | os.PathLike, error: ErrorType = ValueError) -> str:
    """The UTF-8 text of the file `path` (FileNotFoundError if there is none), without a leading
    byte-order mark (Windows editors write one: it is no text, and JSON refused it)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, expected a file")
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from None


def parse_json(
    text: str, source: str | os.PathLike, error: ErrorType = ValueError, first_line: int = 1
) -> Any:
    """`json.loads(text)`; a syntax error names `source` and the line (`source:line: ...`), counting
    from `first_line` (a JSON-lines record's line number)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = first_line + err.lineno - 1
        raise error(f"{source}:{line}: not valid JSON: {err.msg} (line {line}, column {err.colno})") from None


def read_json(path: str | os.PathLike, error: ErrorType = ValueError) -> Any:
    return parse_json(read_text(path, error), path, error)


def read_json_object(path: str | os.PathLike, what: str, error: ErrorType = ValueError) -> dict[str, Any]:
    """The JSON object in `path`; `what` says what it should hold, for the error on anything else."""
    data = read_json(path, error)
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, expected {what} (a JSON object)")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports it
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep one of them", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, source: str | os.PathLike) -> Any:
    """Safe-load YAML `text`; a syntax error or a duplicate key names `source` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        context = f" ({err.context})" if err.context and err.problem else ""
        raise ValueError(f"{where}: not valid YAML: {err.problem or err.context}{context}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML: {err}") from None


def read_config_file(path: str | os.PathLike) -> Any:
    """The parsed content of a .json, .yaml or .yml file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return parse_json(text, path)
    if suffix in (".yaml", ".yml"):
        return parse_yaml(text, path)
    raise ValueError(f"{path}: unknown config format {suffix!r}; use a .json, .yaml or .yml file")


def open_safetensors(path: str | os.PathLike, device: str = "cpu", error: ErrorType = ValueError):
    """`safetensors.safe_open(path)` (a context manager; reads the header only); a file that is
    missing, a directory, unreadable, truncated or corrupt raises `error` naming it."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, expected a safetensors file")
    try:
        return safe_open(path, framework="pt", device=device)
    except SafetensorError as err:
        raise error(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt, re-create or "
            "re-download it"
        ) from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """Every tensor of a safetensors file, {name: Tensor}, as `safetensors.torch.load_file`."""
    with open_safetensors(path, device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def file_inside(directory: Path, name: Any, source: str | os.PathLike, error: ErrorType = ValueError) -> Path:
    """`directory / name` for a file name read from `source` (an index, a manifest): a relative
    path without '..' that stays inside `directory` (see `inside_checkpoint`), symlinks resolved."""
    inside = isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts
    if not inside or not inside_checkpoint((directory / name).resolve(), directory):
        raise error(
            f"{source} names the file {name!r}, which is not a file inside {directory} (absolute paths, '..' "
            f"and links out of the directory are refused); re-create {Path(source).name}"
        )
    return directory / name


def inside_checkpoint(target: Path, root: Path) -> bool:
    """Whether the resolved path `target` is one of the checkpoint directory `root`'s own files:
    inside it, or, for a Hugging Face cache snapshot (`.../snapshots/<revision>/`, whose files
    are links to `../../blobs/<hash>`), inside its repository's `blobs/`."""
    root = root.resolve()
    homes = [root]
    if root.parent.name == "snapshots":
        homes.append(root.parent.parent / "blobs")
    return any(target == home or target.is_relative_to(home) for home in homes)
