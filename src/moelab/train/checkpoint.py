"""Resumable training checkpoints, written atomically.

    out/checkpoints/step-000200/                      one process
        model/model.safetensors, model/config.json   (moelab.models.save_pretrained)
        train_state.pt                                (optimizer, scheduler, data position, RNG)

    out/checkpoints/step-000200/                      under torchrun
        dcp/                                          (model and optimizer, torch.distributed.checkpoint:
                                                       every rank writes its shards)
        model/config.json, train_state.pt             (the rest, from rank 0)

Either kind resumes under any degrees, or in one process (`restore_checkpoint`), and
`consolidate_checkpoint` turns a distributed one into a model directory every command reads.

A checkpoint is assembled in a hidden staging directory and appears by one rename, and an old
one disappears by one rename before it is deleted (`moelab.io`), so a run killed at any moment
leaves only complete checkpoints in view; `list_checkpoints` also ignores any directory without
moelab's output marker. `train_state.pt` holds only tensors and plain containers and is read back with
`torch.load(weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from moelab.data import TOKENIZER_DIR
from moelab.distributed import Parallel
from moelab.distributed.state import (
    first_failure,
    load_full_state,
    load_training_state,
    read_checkpoint,
    training_state,
)
from moelab.io import OutputError, StagedOutput, check_output_dir, clean_leftovers, is_output, remove_output
from moelab.models import ModelConfig, MoETransformer, load_pretrained, save_pretrained
from moelab.models.pretrained import CHECKPOINT_KIND, CONFIG_NAME, write_model_files
from moelab.train.collectives import shared_from_rank0

DCP_NAME = "dcp"
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
        _write_state(staging / STATE_NAME, {"step": step, **state})
    _remove_old(out_dir, keep)
    return target


def save_distributed_checkpoint(
    out_dir: Path,
    step: int,
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    parallel: Parallel,
) -> None:
    """`save_checkpoint` for a torchrun run: every rank calls it. Rank 0 stages the directory;
    every rank writes its shards of the model and optimizer into it with DCP; rank 0 adds the
    config and the rest of the state (identical on every rank), publishes it by one rename and
    deletes all but the `keep` newest checkpoints."""
    dcp_state = training_state(model, optimizer, parallel)
    staged, staging, error = None, None, None
    if parallel.rank == 0:
        # overwrite: a checkpoint of this step from an earlier, interrupted attempt
        staged = StagedOutput(checkpoint_dir(out_dir, step), KIND, overwrite=True)
        try:
            staging = staged.open()
        except Exception as err:
            error = err
    staging = shared_from_rank0(parallel, staging, error)
    try:
        dcp.save(dcp_state, checkpoint_id=str(staging / DCP_NAME))  # returns once every rank has written
    except BaseException as err:  # raised on every rank
        if staged is not None:
            staged.abort()
        if isinstance(err, CheckpointException):  # a shard write failed (a full disk, ...): its own error
            raise first_failure(err) from None
        raise
    if staged is not None:
        try:
            (staging / "model").mkdir()
            model.config.save(staging / "model" / CONFIG_NAME)
            _write_state(staging / STATE_NAME, {"step": step, **state})
            staged.publish()
            _remove_old(out_dir, keep)
        except Exception as err:
            staged.abort()
            error = err
    shared_from_rank0(parallel, None, error)  # no rank goes on past a checkpoint rank 0 failed to write


def _write_state(path: Path, state: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _remove_old(out_dir: Path, keep: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep]:
        try:
            remove_output(old, KIND)
        except OutputError as err:
            warnings.warn(f"kept the old checkpoint {old}: {err}", stacklevel=3)


def restore_checkpoint(
    path: Path,
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    build_optimizer: Callable[[MoETransformer], torch.optim.Optimizer],
    device: torch.device,
    parallel: Parallel | None,
) -> tuple[int, dict[str, Any]]:
    """Load checkpoint `path` of either kind into the freshly built `model` and `optimizer`
    (parallelized already when `parallel` is set). Returns (step, the rest of the state).
    build_optimizer: makes the optimizer of a one-process model (to read a one-process
    checkpoint's optimizer state before it is split over the ranks)."""
    if (path / DCP_NAME).is_dir():
        state = _read_state(path, device)
        try:
            load_training_state(model, optimizer, path / DCP_NAME, parallel)
        except Exception as err:
            raise ValueError(
                f"cannot load {path / DCP_NAME} into this model ({err}); it was saved by another model, "
                "or is incomplete: delete this checkpoint to resume from an older one"
            ) from None
        return int(state.pop("step")), state
    checkpoint = load_checkpoint(path, device)
    state = checkpoint.state
    _check_keys(state, ("optimizer",), path / STATE_NAME)
    if parallel is None:
        model.load_state_dict(checkpoint.model.state_dict())
        optimizer.load_state_dict(_regrouped(state.pop("optimizer"), model, optimizer))
    else:
        full_optimizer = build_optimizer(checkpoint.model)
        full_optimizer.load_state_dict(_regrouped(state.pop("optimizer"), checkpoint.model, full_optimizer))
        load_full_state(model, optimizer, checkpoint.model, full_optimizer, parallel)
    return checkpoint.step, state


def _regrouped(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state_dict `saved` by a moelab that decayed the experts' [E, n] biases (every
    2-D parameter but the embedding in the first group), with its parameters regrouped as
    `optimizer` groups them (`build_optimizer`), each keeping its own state; else `saved` itself."""
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes == [len(g["params"]) for g in optimizer.param_groups]:
        return saved
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p.ndim >= 2 and id(p) not in embedding for p in params]
    old = [p for p, d in zip(params, decayed) if d] + [p for p, d in zip(params, decayed) if not d]
    if sizes != [sum(decayed), len(params) - sum(decayed)] or len(optimizer.param_groups) != 2:
        return saved  # not that grouping: AdamW's own error
    index = {id(p): i for p, i in zip(old, (i for g in saved["param_groups"] for i in g["params"]))}
    groups = [
        {**settings, "params": [index[id(p)] for p in group["params"]]}
        for settings, group in zip(saved["param_groups"], optimizer.param_groups)
    ]
    return {**saved, "param_groups": groups}


def consolidate_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A training checkpoint (distributed or not) as a model directory (`save_pretrained`
    format, with the tokenizer) in `out`, in one process."""
    path = Path(path)
    check_output_dir(out, CHECKPOINT_KIND, inputs=[path], overwrite=overwrite)  # before reading anything
    if (path / "checkpoints").is_dir() and not (path / STATE_NAME).is_file():
        newest = list_checkpoints(path)[-1:]
        raise ValueError(
            f"{path} is a training run, not one of its checkpoints: consolidate one of {path / 'checkpoints'}/step-N"
            + (f" (the newest: {newest[0]})" if newest else "")
        )
    if not (path / DCP_NAME).is_dir():
        model = load_checkpoint(path).model
    else:
        model = MoETransformer(ModelConfig.load(path / "model" / CONFIG_NAME))
        weights = model.state_dict()
        try:
            read_checkpoint({"model": weights}, path / DCP_NAME)
        except Exception as err:
            raise ValueError(f"cannot read the distributed checkpoint {path / DCP_NAME}: {err}") from None
        model.load_state_dict(weights)
    save_pretrained(model, out, overwrite=overwrite, extra_files=sorted(TOKENIZER_DIR.glob("*.json")))
    return Path(out)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under `out_dir`, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and is_output(p, KIND)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def unreadable_checkpoints(out_dir: Path) -> list[Path]:
    """What is named like a checkpoint under `out_dir` but is not a complete one moelab can read."""
    root = out_dir / "checkpoints"
    named = [p for p in root.iterdir() if PATTERN.match(p.name)] if root.is_dir() else []
    return sorted(p for p in named if not is_output(p, KIND))


def clean_checkpoints(out_dir: Path) -> None:
    """Remove what a killed run left among the checkpoints (half-written or half-deleted ones)."""
    clean_leftovers(out_dir / "checkpoints", PATTERN.fullmatch)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (weights via safetensors, the rest with
    `weights_only=True`)."""
    state = _read_state(path, device)
    model = load_pretrained(path / "model", device=device)
    return Checkpoint(step=int(state.pop("step")), model=model, state=state)


STATE_KEYS = (  # what every resume reads (a one-process checkpoint also holds "optimizer")
    "step", "scheduler", "loader", "rng", "train_seconds", "window", "eval_window", "eval_loss", "measured_experts",
)


def _read_state(path: Path, device: torch.device | str) -> dict[str, Any]:
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: {path} is not a complete training checkpoint")
    try:
        state = torch.load(state_file, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's message goes on to suggest unpickling it anyway
        raise ValueError(
            f"cannot read {state_file}: it holds pickled objects other than tensors and plain data, which "
            "moelab never loads; delete this checkpoint to resume from an older one"
        ) from None
    except Exception as err:  # corrupt or foreign file
        raise ValueError(
            f"cannot read {state_file} ({str(err).splitlines()[0]}); delete this checkpoint to resume from an "
            "older one"
        ) from None
    _check_keys(state, STATE_KEYS, state_file)
    return state


def _check_keys(state: Any, keys: tuple[str, ...], state_file: Path) -> None:
    if missing := [k for k in keys if not isinstance(state, dict) or k not in state]:
        raise ValueError(
            f"{state_file} lacks {missing}: it is not a training state this moelab wrote; delete this "
            "checkpoint to resume from an older one"
        )
