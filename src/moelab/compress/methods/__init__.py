"""Compression methods by name. Adding one: a file with a `Method` subclass, and a line here."""

from __future__ import annotations

import types
import typing
from typing import Any

from moelab.compress.methods.base import LayerDecision, Method, ScoringMethod, Target, plan_target, select_top
from moelab.compress.methods.ean import EAN
from moelab.compress.methods.easy_ep import EasyEP
from moelab.compress.methods.frequency import Frequency
from moelab.compress.methods.hcsmoe import HCSMoE
from moelab.compress.methods.heapr import HEAPr
from moelab.compress.methods.msmoe import MSMoE
from moelab.compress.methods.naee import NAEE
from moelab.compress.methods.premoe import PreMoe
from moelab.compress.methods.random_prune import RandomPrune
from moelab.compress.methods.reap import REAP
from moelab.compress.methods.recipe import MoelabRecipe
from moelab.compress.methods.router_weight import RouterWeight
from moelab.compress.methods.soft_count import SoftCount
from moelab.compress.methods.submoe import SubMoE
from moelab.validation import check_choice

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Frequency,
        SoftCount,
        RouterWeight,
        EAN,
        REAP,
        EasyEP,
        PreMoe,
        NAEE,
        RandomPrune,
        MSMoE,
        HCSMoE,
        SubMoE,
        HEAPr,
        MoelabRecipe,
    )
}


def get_method(name: str, **options: Any) -> Method:
    """The method registered as `name`, built with `options` (each of the type its constructor
    declares: `align="False"` is refused, not read as true)."""
    check_choice("compression method", name, METHODS)
    hints = typing.get_type_hints(METHODS[name].__init__)
    for key, value in options.items():
        if key in hints:
            _check_option_type(name, key, value, hints[key])
    try:
        return METHODS[name](**options)
    except TypeError as err:
        raise ValueError(
            f"method {name!r} does not take these options ({err}); see `moelab compress --help`"
        ) from None


def _check_option_type(method: str, key: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)

    def fits(kind: type) -> bool:
        if kind is bool or isinstance(value, bool):
            return kind is bool and isinstance(value, bool)
        return isinstance(value, kind) or (kind is float and number)

    if not any(fits(kind) for kind in allowed):
        names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)
        raise ValueError(
            f"{method} option {key}={value!r} must be {names} (on the command line, values are JSON: "
            f"--option {key}=true, =3, =0.5, =null)"
        )


__all__ = [
    "METHODS",
    "LayerDecision",
    "Method",
    "ScoringMethod",
    "Target",
    "get_method",
    "plan_target",
    "select_top",
]
