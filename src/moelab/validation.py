"""Small helpers for error messages that name the fix."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
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


def check_not_str(label: str, value: object, items: str) -> None:
    """Refuse a str where a list of `items` goes: a str is a Sequence[str], read letter by letter."""
    if isinstance(value, str):
        raise ValueError(f"{label} is a list of {items}, got the str {value!r}; write [{value!r}]")


def non_finite_names(named: Iterable[tuple[str, object]]) -> list[str]:
    """The names of the floating-point tensors among (name, tensor) pairs that hold NaN or Inf (a
    corrupt checkpoint: decoding on it gives garbage, not an error)."""
    import torch

    floating = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return [name for name, t in floating if not t.is_meta and not _all_finite(t)]


FINITE_CHUNK = 1 << 24  # elements checked at once: a mask of 16 MB, whatever the tensor's size


def _all_finite(t, chunk: int = FINITE_CHUNK) -> bool:
    """Whether every element of `t` is finite: yes where its sum is (an Inf or NaN anywhere makes
    the sum one; a pass with no mask, 50-90x faster than `isfinite` on a CPU), else, the sum
    perhaps overflowed, `torch.isfinite(t).all()` a slice along the first dimension at a time: a
    layer's stacked experts (billions of elements in a large model) would otherwise need a
    boolean mask as large. Read detached (a parameter's sum builds no graph); float8, which torch
    neither sums nor (e4m3fn) checks on a CPU, a chunk at a time as float16, which holds its values."""
    import torch

    t = t.detach()
    if t.element_size() == 1:
        return all(_all_finite(part.to(torch.float16), chunk) for part in t.reshape(-1).split(chunk))
    if math.isfinite(t.sum()):
        return True
    if t.dim() == 0 or t.numel() <= chunk:
        return bool(torch.isfinite(t).all())
    row = t.numel() // t.shape[0]
    parts = t.unbind(0) if row > chunk else t.split(chunk // row)
    return all(_all_finite(part, chunk) for part in parts)


def check_device(device: str) -> None:
    """A benchmark's device: "cpu", or "cuda" where a CUDA GPU is visible."""
    check_choice("device", device, ("cpu", "cuda"))
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available (torch.cuda.is_available() is False)")


def is_int(value: object) -> bool:
    """An integer (numpy's included), not a bool and not an integral float such as 2.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (an int, a float, numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_finite(value: object) -> bool:
    """A real number > 0 and finite (a scale, a cap), not a bool."""
    return is_number(value) and math.isfinite(value) and value > 0


def check_field_types(cfg: object) -> None:
    """Reject dataclass field values of the wrong type, naming the field (a hand-written YAML `1e-5`
    is a string, not a float; `true` is not an int; `2.0` is not an int). Floats accept ints and
    must be finite (YAML `.nan` and JSON `NaN` are floats); bools are not ints. The items of
    list, tuple and dict fields are checked too."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if _matches(value, hint):
            continue
        numeric = _matches(0.0, hint)
        if isinstance(value, float) and not math.isfinite(value) and numeric:
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be a finite number, got {value}")
        note = " (YAML reads 1e-5 as a string; write 1.0e-5)" if isinstance(value, str) and numeric else ""
        raise ValueError(
            f"{type(cfg).__name__}.{f.name} must be {_type_name(hint)}, got {type(value).__name__} {value!r}{note}"
        )


def _options(hint: object) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _matches(value: object, hint: object) -> bool:
    """Whether `value` fits the type `hint`, one of its options if it is a union."""
    return any(_fits(value, option) for option in _options(hint))


def _fits(value: object, t: object) -> bool:
    origin, args = typing.get_origin(t) or t, typing.get_args(t)
    if t is typing.Any:
        return True
    if t is type(None):
        return value is None
    if t is float:
        finite = not isinstance(value, float) or math.isfinite(value)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and finite
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if not isinstance(value, origin):
        return False
    if origin is list and args:
        return all(_matches(item, args[0]) for item in value)
    if origin is tuple and args:
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        return len(value) == len(items) and all(map(_matches, value, items))
    if origin is dict and args:
        return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True


def _type_name(hint: object) -> str:
    """'int or None', 'list[str]', ...: how a type reads in an error message."""
    names = []
    for option in _options(hint):
        args = typing.get_args(option)
        t = typing.get_origin(option) or option
        name = "None" if option is type(None) else "..." if option is Ellipsis else getattr(t, "__name__", str(t))
        names.append(f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name)
    return " or ".join(names)


def check_known_fields(cls: type, data: Iterable[str], label: str | None = None) -> None:
    """Raise a ValueError naming the first key of `data` that is not a field of dataclass `cls`,
    with the closest field and all of them (`label` names the section; default the class name)."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise ValueError(
                f"unknown {label or cls.__name__} field {key!r}{did_you_mean(key, known)}; valid fields: {known}"
            )
