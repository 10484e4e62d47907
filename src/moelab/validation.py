"""Small helpers for error messages that name the fix."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' if none is close."""
    hint = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    """Raise a ValueError naming `name`, the closest valid choice and all of them, unless
    `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}{did_you_mean(value, choices)}; choose one of {choices}")


def check_field_types(cfg: object) -> None:
    """Reject dataclass field values of the wrong type, naming the field (a hand-written YAML `1e-5`
    is a string, not a float; `true` is not an int). Floats accept ints; bools are not ints."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        hint = hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed = tuple(typing.get_origin(t) or t for t in options)
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        if float in allowed:
            allowed += (int,)
        if isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)):
            continue
        hint = " (YAML reads 1e-5 as a string; write 1.0e-5)" if isinstance(value, str) and float in allowed else ""
        raise ValueError(f"{type(cfg).__name__}.{f.name} must be {names}, got {type(value).__name__} {value!r}{hint}")


def check_known_fields(cls: type, data: Iterable[str], label: str | None = None) -> None:
    """Raise a ValueError naming the first key of `data` that is not a field of dataclass `cls`,
    with the closest field and all of them (`label` names the section; default the class name)."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise ValueError(
                f"unknown {label or cls.__name__} field {key!r}{did_you_mean(key, known)}; valid fields: {known}"
            )
