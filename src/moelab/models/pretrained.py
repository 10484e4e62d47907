"""Checkpoints of `MoETransformer`: a directory with `model.safetensors` and `config.json`.

The state dict is saved as is (persistent buffers such as the aux-loss-free `expert_bias`
included), except that a tensor shared by several modules is stored once, under its first name:
a tied LM head as `embed.weight`, a ReXMoE expert pool under its group's first layer. Tensors
are read with safetensors only, never pickle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from moelab.files import load_safetensors
from moelab.io import save_safetensors
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def shared_aliases(model: MoETransformer) -> set[str]:
    """State-dict names whose tensor is the same object as an earlier name's (tied LM head,
    ReXMoE expert pools); they are not stored."""
    seen: set[int] = set()
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.add(name)
        seen.add(id(tensor))
    return aliases


def save_pretrained(model: MoETransformer, directory: str | os.PathLike) -> Path:
    """Write `directory/model.safetensors` and `directory/config.json`.

    Both files are written into a temporary directory beside the target first. A new directory
    then appears by one rename; into an existing one each file is renamed over its old version
    (weights first), so a reader never sees a partly written file. Returns the directory.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    staging.chmod(directory.parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would stick to a new directory
    try:
        save_safetensors(_tensors_to_save(model), staging / WEIGHTS_NAME, metadata={"format": "pt"})
        model.config.save(staging / CONFIG_NAME)
        if not directory.exists():
            os.replace(staging, directory)
        else:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_pretrained(directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> MoETransformer:
    """Rebuild the model from `directory/config.json` and load `directory/model.safetensors`."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).exists():
            raise FileNotFoundError(
                f"{directory / name} not found; expected a directory written by save_pretrained"
            )
    config = ModelConfig.load(directory / CONFIG_NAME)
    tensors = load_safetensors(directory / WEIGHTS_NAME, device=str(device))
    model = MoETransformer(config).to(device)
    try:
        load_state(model, tensors)
    except ValueError as err:
        raise ValueError(f"{directory / WEIGHTS_NAME}: {err}") from None
    return model


def _tensors_to_save(model: MoETransformer) -> dict[str, Tensor]:
    aliases = shared_aliases(model)  # safetensors refuses shared storage
    return {name: t.contiguous() for name, t in model.state_dict().items() if name not in aliases}


def load_state(model: MoETransformer, tensors: dict[str, Tensor]) -> None:
    """Copy `tensors` (a state dict as `save_pretrained` stores it) into `model`, or raise a
    ValueError listing every missing, unexpected, wrongly shaped and wrongly typed (integer for
    floating point or back) key."""
    aliases = shared_aliases(model)
    expected = {name: t for name, t in model.state_dict().items() if name not in aliases}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    found = [(name, t, expected[name]) for name, t in sorted(tensors.items()) if name in expected]
    mismatched = [
        f"{name}: checkpoint {list(t.shape)} vs model {list(want.shape)}"
        for name, t, want in found
        if t.shape != want.shape
    ]
    mistyped = [
        f"{name}: checkpoint {t.dtype} vs model {want.dtype}"
        for name, t, want in found
        if t.is_floating_point() != want.is_floating_point()
    ]
    if missing or unexpected or mismatched or mistyped:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", mismatched),
                ("wrong dtype", mistyped),
            )
            if keys
        ]
        raise ValueError(
            "checkpoint does not fit the model built from its config; "
            + "; ".join(problems)
            + ". Check that config.json is the one the weights were saved with"
        )
    model.load_state_dict(tensors, strict=False)
