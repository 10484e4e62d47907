"""Resumable training checkpoints, written atomically.

    out/checkpoints/step-000200/
        model/model.safetensors, model/config.json   (moelab.models.save_pretrained)
        train_state.pt                                (optimizer, scheduler, data position, RNG)

A checkpoint is assembled in a hidden staging directory and appears by one rename, so a run
killed at any moment leaves only complete checkpoints behind; `latest_checkpoint` ignores
anything else. `train_state.pt` holds only tensors and plain containers and is read back with
`torch.load(weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.models import MoETransformer, load_pretrained, save_pretrained

PATTERN = re.compile(r"^step-(\d+)$")
STATE_NAME = "train_state.pt"


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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    staging.chmod(target.parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would stick to the checkpoint
    try:
        save_pretrained(model, staging / "model")
        with open(staging / STATE_NAME, "wb") as f:
            torch.save({"step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():  # a checkpoint of this step from an earlier, interrupted attempt
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under `out_dir`, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


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
