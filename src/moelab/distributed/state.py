"""Model and optimizer state of a parallel run as torch.distributed.checkpoint (DCP) saves it,
so a checkpoint saved under one set of degrees loads under any other, or in one process.

DCP stores each tensor by its global shape and the offsets of the pieces the ranks hold. FSDP's
DTensors already say that for the non-expert parameters. An expert parameter is, to FSDP, this
rank's expert-parallel shard [L, ...] split over "dp"; for the checkpoint it is gathered over
"dp" and described as rows [e*L, (e+1)*L) of the global [E, ...] tensor (`_to_global`). Loading
reverses that (`_to_local`). In one process the state is plain full tensors, which DCP fills from
whatever pieces were saved.

    state = training_state(model, optimizer, parallel)      # {"model": ..., "optim": ...}
    dcp.save(state, checkpoint_id=path)
    load_training_state(model, optimizer, path, parallel)   # any degrees, or parallel=None
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moelab.distributed.mesh import Parallel
from moelab.distributed.parallelize import expert_parameter_names

OPTIMIZER_TENSORS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state shaped like the parameter


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallel | None) -> dict[str, Any]:
    """{"model": FQN -> tensor, "optim": FQN-keyed optimizer state}, expert entries global (see
    the module docstring). Initialises the optimizer's state if it has none yet."""
    model_state, optim_state = get_state_dict(model, optimizer)
    if parallel is not None:  # new containers: get_state_dict's may be the optimizer's own
        experts = expert_parameter_names(model)
        model_state = {n: _to_global(t, parallel) if n in experts else t for n, t in model_state.items()}
        optim_state = {
            "state": {
                n: {k: _to_global(t, parallel) if n in experts and k in OPTIMIZER_TENSORS else t for k, t in entry.items()}
                for n, entry in optim_state["state"].items()
            },
            "param_groups": optim_state["param_groups"],
        }
    return {"model": model_state, "optim": optim_state}


def load_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, parallel: Parallel | None
) -> None:
    """Fill `model` and `optimizer` from the DCP checkpoint at `path` (saved under any degrees)."""
    state = training_state(model, optimizer, parallel)
    saved = _saved_optimizer_entries(path)
    # parameters that never had a gradient (e.g. routers of UoE's gate="none") have no saved state
    state["optim"]["state"] = {n: e for n, e in state["optim"]["state"].items() if n in saved}
    groups = [list(group["params"]) for group in state["optim"]["param_groups"]]  # FQNs, as this moelab groups them
    read_checkpoint(state, path)
    state["optim"]["param_groups"] = _regrouped(state["optim"]["param_groups"], groups)
    if parallel is not None:  # expert entries back to this rank's shard, laid out as FSDP holds it
        template_model, template_optim = get_state_dict(model, optimizer)
        for name in expert_parameter_names(model):
            state["model"][name] = _like(state["model"][name].to_local(), template_model[name])
            entry = state["optim"]["state"].get(name)
            for key in OPTIMIZER_TENSORS if entry is not None else ():
                entry[key] = _like(entry[key].to_local(), template_optim["state"][name][key])
    _set_state(model, optimizer, state["model"], state["optim"])


def _regrouped(saved: list[dict], groups: list[list[str]]) -> list[dict]:
    """The saved AdamW groups (settings and parameter FQNs) with the parameters grouped as
    `groups` (FQNs per group of `build_optimizer`), each group keeping its saved settings: a
    checkpoint of a moelab that decayed the experts' [E, n] biases (in the first group) left the
    first group without any settings (torch matches a saved group to the last group holding one
    of its parameters), and the step failed on a missing key. Different group counts: `saved`."""
    if len(saved) != len(groups):
        return saved
    return [{**settings, "params": names} for settings, names in zip(saved, groups)]


def read_checkpoint(state: dict[str, Any], path: Path) -> None:
    """`dcp.load` of `state`'s entries from `path`, in place (in one process too), unpickling
    nothing but plain data (see `CheckedReader`)."""
    CheckedReader(path).read_metadata()  # its error, before DCP logs the failure on every rank
    with warnings.catch_warnings():  # DCP warns that it reads in one process: intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=CheckedReader(path), planner=WeightsOnlyLoadPlanner())
        except CheckpointException as err:
            failure = first_failure(err)
            raise ValueError(f"{type(failure).__name__}: {failure}") from None


def first_failure(err: CheckpointException) -> BaseException:
    """The exception of the first rank that failed, out of DCP's CheckpointException (a
    BaseException that every rank raises, with every failed rank's exception and frames)."""
    failure = next(iter(err.failures.values()))
    return failure[0] if isinstance(failure, tuple) else failure


# What DCP's metadata file may name: its own record types, torch's sizes, dtypes and layouts, a path.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")
        return super().find_class(module, name)


class CheckedReader(FileSystemReader):
    """DCP's file reader, but its metadata file (a pickle) is read by an unpickler that builds
    only DCP's own record types: a crafted checkpoint cannot run code (torch's reader unpickles
    anything). Tensors are read weights-only, as torch reads them."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as file:
            try:
                metadata = _MetadataUnpickler(file).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
                raise ValueError(f"{path} is not a readable checkpoint index ({err}); nothing was loaded") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not a checkpoint index (it holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but the non-tensor entries (optimizer settings) are checked to unpickle
    weights-only (plain data) before torch unpickles them."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn} is not plain data ({err})") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _saved_optimizer_entries(path: Path) -> set[str]:
    """Names of the parameters whose optimizer state the DCP checkpoint at `path` holds."""
    keys = CheckedReader(path).read_metadata().state_dict_metadata
    prefix = "optim.state."
    return {key[len(prefix) :].rsplit(".", 1)[0] for key in keys if key.startswith(prefix)}


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    full_model: torch.nn.Module,
    full_optimizer: torch.optim.Optimizer,
    parallel: Parallel,
) -> None:
    """Fill the parallel `model` and `optimizer` from a one-process model and optimizer (a
    checkpoint saved without torchrun): every rank slices its experts and its FSDP shards."""
    full_model_state, full_optim_state = get_state_dict(full_model, full_optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    experts = expert_parameter_names(model)
    model_state = {
        name: _like(_ep_slice(full_model_state[name], name in experts, parallel), like)
        for name, like in model_state.items()
    }
    optim_state = {
        "state": {
            name: {
                key: _like(_ep_slice(full_optim_state["state"][name][key], name in experts and key in OPTIMIZER_TENSORS, parallel), like)
                for key, like in entry.items()
            }
            for name, entry in optim_state["state"].items()
            if name in full_optim_state["state"]  # parameters that never had a gradient have no state
        },
        "param_groups": full_optim_state["param_groups"],  # the saved learning rates
    }
    _set_state(model, optimizer, model_state, optim_state)


def full_model_state(model: torch.nn.Module, parallel: Parallel) -> dict[str, Tensor]:
    """Every parameter and buffer whole (experts gathered over "ep" too), on the CPU, on rank 0;
    the other ranks take part in the collectives and get {}."""
    experts = expert_parameter_names(model)
    rank0 = parallel.rank == 0
    first_replica = parallel.mesh["dp"].get_local_rank() == 0  # the "ep" group that holds rank 0
    full = {}
    for name, value in model.state_dict().items():
        tensor = value.full_tensor() if isinstance(value, DTensor) else value
        if name in experts and parallel.ep > 1 and first_replica:
            pieces = [torch.empty_like(tensor) for _ in range(parallel.ep)] if rank0 else None
            dist.gather(tensor.contiguous(), pieces, group=parallel.ep_group, group_dst=0)
            tensor = torch.cat(pieces) if rank0 else tensor
        if rank0:
            full[name] = tensor.detach().cpu()
    return full


def _set_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load both, the model strictly; the optimizer state may lack parameters that never had a
    gradient (they keep a fresh state, which no step ever reads)."""
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(strict=False))


def _to_global(value: Tensor, parallel: Parallel) -> DTensor:
    """This rank's expert shard [L, ...] (a DTensor over "dp") as rows of the global [E, ...]."""
    local = value.full_tensor() if isinstance(value, DTensor) else value
    return DTensor.from_local(local, parallel.mesh["ep"], [Shard(0)], run_check=False)


def _ep_slice(full: Tensor, is_expert: bool, parallel: Parallel) -> Tensor:
    if not is_expert:
        return full
    L = full.shape[0] // parallel.ep
    return full[parallel.ep_rank * L : (parallel.ep_rank + 1) * L]


def _like(full: Tensor, like: Tensor) -> Tensor:
    """`full` (this rank's whole view of a tensor) laid out as `like`: sharded the same way if it
    is a DTensor (each rank keeps its own piece, no communication)."""
    if not isinstance(like, DTensor):
        return full.to(like.device, like.dtype)
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
