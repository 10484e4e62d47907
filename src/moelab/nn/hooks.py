"""Whether a module's forward may be stood in for: fast paths that skip calling a module (or
compute what it would return another way) must not skip a hook someone registered on it."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules import module as module_hooks


def forward_hooked(modules: Iterable[nn.Module]) -> bool:
    """Whether any of `modules` has a forward (pre-)hook, or a global module hook is set. Plain
    lookups: called at every decode step."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
