"""Which processes do what in a run under torchrun: `ParallelConfig` (the run file's `parallel:`
section) and `Parallel`, the process group and `DeviceMesh` built from it.

    parallel:
      expert: 2        # experts split over 2 ranks (EP)
      data: 2          # ranks holding the same expert shard (their data-parallel replicas)
      timeout_s: 600   # a collective that waits longer fails with an error instead of hanging

world size = data x expert. Every rank reads its own slice of each batch (`train.batch_size` is
the global batch: batch_size / world sequences per rank), so tokens per step do not depend on the
degrees and a run resumes under other degrees on the same trajectory. The mesh is
("dp", "ep") of shape (data, expert): rank = d * expert + e, so an expert-parallel group is
`expert` consecutive ranks (the all-to-all stays within a node when it fits). Non-expert
parameters are sharded with FSDP2 over all ranks; expert parameters are split over "ep" and
their shards sharded with FSDP2 over "dp" (`moelab.distributed.parallelize`).
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _set_pg_timeout

from moelab.validation import check_field_types, check_known_fields


@dataclass(kw_only=True)
class ParallelConfig:
    """expert: the expert-parallel degree (experts split over this many ranks); data: the
    data-parallel degree of the expert shards (None: world size / expert); timeout_s: how long a
    collective may wait for the other ranks before the run fails."""

    expert: int = 1
    data: int | None = None
    timeout_s: float = 600.0

    def __post_init__(self):
        check_field_types(self)
        if self.expert < 1 or (self.data is not None and self.data < 1):
            raise ValueError(f"parallel.expert and parallel.data must be >= 1, got {self.expert} and {self.data}")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")

    @classmethod
    def from_dict(cls, data: object) -> ParallelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"'parallel' must be a mapping of ParallelConfig fields, got {data!r}")
        check_known_fields(cls, data, label="parallel")
        return cls(**data)


@dataclass
class Parallel:
    """The running process group. mesh: ("dp", "ep"); world_mesh: 1-D over every rank."""

    config: ParallelConfig
    mesh: DeviceMesh
    world_mesh: DeviceMesh
    owns_group: bool = False  # `init_parallel` started the process group, so `close` ends it

    def close(self, *, wait: bool = True) -> None:
        """End the process group if this run started it: after a barrier (`wait`), so that no rank
        tears its side down while another still uses it (gloo can abort a process that exits
        while a peer is mid-collective)."""
        if not self.owns_group or not dist.is_initialized():
            return
        if wait:
            dist.barrier(group=self.world_group)
        dist.destroy_process_group()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return dist.get_world_size()

    @property
    def ep(self) -> int:
        return self.mesh["ep"].size()

    @property
    def ep_rank(self) -> int:
        return self.mesh["ep"].get_local_rank()

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh["ep"].get_group()

    @property
    def world_group(self) -> dist.ProcessGroup:
        return self.world_mesh.get_group()


def torchrun_world() -> int | None:
    """The number of processes torchrun started; None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"])


def init_parallel(config: ParallelConfig | None, device: torch.device) -> Parallel | None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) and build the mesh; None outside
    torchrun (a plain one-process run; under torchrun even one process takes the parallel path,
    which is how a single GPU checks it). Raises a ValueError naming the fix when the degrees do
    not fit the world."""
    world = torchrun_world()
    config = config or ParallelConfig()
    if world is None:
        if config.expert > 1 or (config.data or 1) > 1:
            warnings.warn(
                f"one process: parallel.expert = {config.expert} and parallel.data = {config.data} apply under "
                "torchrun only (torchrun --nproc-per-node N -m moelab train ...)",
                stacklevel=2,
            )
        return None
    if config.data is None and world % config.expert:
        raise ValueError(
            f"parallel.expert ({config.expert}) must divide the {world} process(es) torchrun started "
            "(--nproc-per-node x --nnodes); choose an expert-parallel degree that divides it"
        )
    data = config.data if config.data is not None else world // config.expert
    if data * config.expert != world:
        raise ValueError(
            f"parallel.data ({data}) x parallel.expert ({config.expert}) = {data * config.expert} does not match "
            f"the {world} process(es) torchrun started; make their product the world size "
            f"(--nproc-per-node x --nnodes), or leave parallel.data out"
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    owns_group = not dist.is_initialized()
    if owns_group:
        # on GPUs the small host-side reductions (metrics, flags, validation sums) go over gloo
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    mesh = init_device_mesh(device.type, (data, config.expert), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
    for group in {mesh.get_group("dp"), mesh.get_group("ep"), world_mesh.get_group("world")}:
        # a group smaller than the world is new, with torch's default timeout (30 min), not timeout_s
        _set_pg_timeout(timedelta(seconds=config.timeout_s), group)
    resolved = ParallelConfig(expert=config.expert, data=data, timeout_s=config.timeout_s)
    return Parallel(resolved, mesh, world_mesh, owns_group)


def exit_process(code: int = 0) -> NoReturn:
    """Leave a torchrun worker process at once, after flushing its output. A normal interpreter
    exit runs C++ static destructors, and after a gloo run one of them occasionally aborts the
    process ("terminate called without an active exception", about 1 exit in 12 here), so that
    torchrun reports a finished run as failed; exiting here skips them. Call it only once the
    process group is closed and every file is written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A TCP port free on this machine now, for a local process group (tests, benchmarks; another
    process may still take it before the group binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
