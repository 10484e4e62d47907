"""Compression methods by name. Adding one: a file with a `Method` subclass, and a line here."""

from __future__ import annotations

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
    """The method registered as `name`, built with `options`."""
    check_choice("compression method", name, METHODS)
    try:
        return METHODS[name](**options)
    except TypeError as err:
        raise ValueError(
            f"method {name!r} does not take these options ({err}); see `moelab compress --help`"
        ) from None


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
