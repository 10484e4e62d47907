"""Checkpoints of `MoETransformer`: a directory with `model.safetensors` and `config.json`.

The state dict is saved as is (persistent buffers such as the aux-loss-free `selection_bias`
included), except that a tensor shared by several modules is stored once, under its first name:
a tied LM head as `embed.weight`, a ReXMoE expert pool under its group's first layer. Tensors
are read with safetensors only, never pickle.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from moelab.files import load_safetensors
from moelab.io import StagedOutput, copy_side_file, save_safetensors
from moelab.models.config import ModelConfig
from moelab.models.reference import model_dir
from moelab.models.transformer import MoETransformer
from moelab.validation import non_finite_names

WEIGHTS_NAME = "model.safetensors"
_RENAMED_BUFFER = re.compile(r"router\.expert_bias$")  # the selection bias's name before moelab 0.2
CONFIG_NAME = "config.json"
CHECKPOINT_KIND = "checkpoint"  # the output kind (`moelab.io`) of every model checkpoint moelab writes


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


def save_pretrained(
    model: MoETransformer,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write `directory/model.safetensors` and `directory/config.json` (plus copies of
    `extra_files`, e.g. tokenizer files).

    The directory is built beside the target and appears whole by one rename; an existing
    checkpoint there is replaced only with `overwrite` (see `moelab.io`). Returns the directory.
    """
    with StagedOutput(directory, CHECKPOINT_KIND, overwrite=overwrite) as staging:
        write_model_files(model, staging)
        for path in map(Path, extra_files):
            copy_side_file(path, staging / path.name, path.parent)
    return Path(directory)


def write_model_files(model: MoETransformer, directory: Path) -> None:
    """The checkpoint files of `model` in the new directory `directory` (no output checks: for
    writers that stage a larger output around it, like training checkpoints)."""
    directory.mkdir(exist_ok=True)
    save_safetensors(_tensors_to_save(model), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    model.config.save(directory / CONFIG_NAME)


def load_pretrained(directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> MoETransformer:
    """Rebuild the model from `directory/config.json` and load `directory/model.safetensors`
    (`directory`: a path, or a shipped reference model's name, "ref-8e-top2" say)."""
    directory = model_dir(directory)
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


def load_state(model: MoETransformer, tensors: dict[str, Tensor], *, assign: bool = False) -> None:
    """Copy `tensors` (a state dict as `save_pretrained` stores it) into `model` (assign: make them
    its parameters, as `load_state_dict(assign=True)`; ties are then the caller's to restore), or
    raise a ValueError listing every missing, unexpected, wrongly shaped and wrongly typed (integer
    for floating point or back) key."""
    aliases = shared_aliases(model)
    tensors = {_RENAMED_BUFFER.sub("router.selection_bias", name): t for name, t in tensors.items()}
    expected = {name: t for name, t in model.state_dict().items() if name not in aliases}
    # ReXMoE checkpoints saved before the PSR mask was stored keep the model's: every expert a candidate
    missing = sorted(
        name for name in expected.keys() - tensors.keys() if not name.endswith(".router.candidates")
    )
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
    if bad := non_finite_names(sorted(tensors.items())):
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"NaN or Inf in {', '.join(bad[:3])}{more}: the weights are corrupt")
    model.load_state_dict(tensors, strict=False, assign=assign)
