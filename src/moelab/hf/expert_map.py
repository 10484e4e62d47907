"""`moelab_expert_map.json`: which original experts each expert of an edited checkpoint came from.

    {"format": "moelab-expert-map/1", "source": "<the original checkpoint>", "family": "<adapter name>",
     "layers": {"<layer>": {"sources": [[0], [2, 5], [7]], "kept": [0, 7], "merge_groups": [[2, 5]],
                            "tensors_replaced": true}}}

sources[j]: the original expert ids new expert j is made from, distinct within a layer; kept: the
ids of the single-source experts, merge_groups: the groups of several, both in sources order
(sources are composed over successive edits); tensors_replaced: the last edit rewrote the layer's
expert tensors rather than slicing them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from moelab.files import read_json_object
from moelab.hf.checkpoint import CheckpointError
from moelab.validation import is_int

FORMAT = "moelab-expert-map/1"
FIELDS = ("format", "source", "family", "layers")
LAYER_FIELDS = ("sources", "kept", "merge_groups", "tensors_replaced")
_LAYER_NUMBER = re.compile(r"0|[1-9][0-9]*")


def read_expert_map(path: str | os.PathLike) -> dict[str, Any]:
    """The expert map in the file `path`, checked field by field; a CheckpointError naming the
    file and the first problem otherwise."""
    path = Path(path)
    doc = read_json_object(path, "a moelab expert map", error=CheckpointError)
    try:
        _check_map(doc)
    except ValueError as err:
        raise CheckpointError(
            f"{path}: {err}; the checkpoint writer makes this file: re-create the checkpoint, do not edit it"
        ) from None
    return doc


def _check_map(doc: dict[str, Any]) -> None:
    _check_fields(doc, FIELDS, "the map")
    if doc["format"] != FORMAT:
        raise ValueError(f"format is {doc['format']!r}, expected {FORMAT!r}")
    for name in ("source", "family"):
        if not isinstance(doc[name], str):
            raise ValueError(f"{name} must be a string, got {doc[name]!r}")
    if not isinstance(doc["layers"], dict):
        raise ValueError(f"layers must be an object of layer number: entry, got {doc['layers']!r}")
    for key, layer in doc["layers"].items():
        if not _LAYER_NUMBER.fullmatch(key):
            raise ValueError(f"layer key {key!r} is not a layer number such as '0' or '12'")
        if not isinstance(layer, dict):
            raise ValueError(f"layer {key} must be an object with {', '.join(LAYER_FIELDS)}, got {layer!r}")
        _check_layer(layer, f"layer {key}")


def _check_layer(layer: dict[str, Any], where: str) -> None:
    _check_fields(layer, LAYER_FIELDS, where)
    sources = layer["sources"]
    groups = isinstance(sources, list) and sources and all(isinstance(g, list) and g for g in sources)
    if not groups or not all(is_int(e) and e >= 0 for group in sources for e in group):
        raise ValueError(
            f"{where}: sources must be a non-empty list of non-empty lists of expert ids >= 0, got {sources}"
        )
    ids = [e for group in sources for e in group]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: sources name an expert twice: {sources}")
    expected = {
        "kept": [group[0] for group in sources if len(group) == 1],
        "merge_groups": [group for group in sources if len(group) > 1],
    }
    for name, value in expected.items():
        if not _same(layer[name], value):
            raise ValueError(f"{where}: {name} is {layer[name]!r}, but sources {sources} make it {value}")
    if not isinstance(layer["tensors_replaced"], bool):
        raise ValueError(f"{where}: tensors_replaced must be true or false, got {layer['tensors_replaced']}")


def _same(a: Any, b: Any) -> bool:
    """a == b with the same types throughout (1.0 and True are not 1)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _check_fields(data: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    """`data` has exactly the keys `fields`."""
    missing = [name for name in fields if name not in data]
    unknown = [name for name in data if name not in fields]
    if missing or unknown:
        found = "; ".join(
            f"{label} {', '.join(map(repr, names))}"
            for label, names in (("no", missing), ("unknown", unknown))
            if names
        )
        raise ValueError(f"{where} has {found}; expected the fields {', '.join(fields)}")
