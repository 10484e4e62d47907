"""Resumable training checkpoints, written atomically.

    out/checkpoints/step-000200/
        model/model.safetensors, model/config.json   (moelab.models.save_pretrained)
        train_state.pt                                (optimizer, scheduler, data position, RNG)

A checkpoint is assembled in a hidden staging directory and appears by one rename, and an old
one disappears by one rename before it is deleted (`moelab.io`), so a run killed at any moment
leaves only complete checkpoints in view; `list_checkpoints` also ignores any directory without
moelab's output marker. `train_state.pt` holds only tensors and plain containers and is read back with
`torch.load(weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.io import OutputError, StagedOutput, clean_leftovers, is_output, remove_output
from moelab.models import MoETransformer, load_pretrained
from moelab.models.pretrained import write_model_files

PATTERN = re.compile(r"^step-(\d+)$")
STATE_NAME = "train_state.pt"
KIND = "training checkpoint"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model and everything else needed to continue where it stopped."""

    step: int
    model: MoETransformer
    state: dict[str, Any]


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(
    out_dir: Path, step: int, model: MoETransformer, state: dict[str, Any], keep: int
) -> Path:
    """Write `model` and `state` (tensors and plain containers only) as checkpoint `step`, then
    delete all but the `keep` newest checkpoints. Returns the checkpoint directory."""
    target = checkpoint_dir(out_dir, step)
    # overwrite: a checkpoint of this step from an earlier, interrupted attempt
    with StagedOutput(target, KIND, overwrite=True) as staging:
        write_model_files(model, staging / "model")
        with open(staging / STATE_NAME, "wb") as f:
            torch.save({"step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
    for old in list_checkpoints(out_dir)[:-keep]:
        try:
            remove_output(old, KIND)
        except OutputError as err:
            warnings.warn(f"kept the old checkpoint {old}: {err}", stacklevel=2)
    return target


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under `out_dir`, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and is_output(p, KIND)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def clean_checkpoints(out_dir: Path) -> None:
    """Remove what a killed run left among the checkpoints (half-written or half-deleted ones)."""
    clean_leftovers(out_dir / "checkpoints")


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (weights via safetensors, the rest with
    `weights_only=True`)."""
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: {path} is not a complete training checkpoint")
    try:
        state = torch.load(state_file, map_location=device, weights_only=True)
    except Exception as err:  # corrupt or foreign file
        raise ValueError(
            f"cannot read {state_file} ({err}); delete this checkpoint to resume from an older one"
        ) from None
    model = load_pretrained(path / "model", device=device)
    return Checkpoint(step=int(state.pop("step")), model=model, state=state)
