"""The calibration pass under torchrun: joining the process group, agreeing on a value, and
summing statistics over the processes. Outside torchrun every helper is the identity."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from moelab.compress.observers import MAXIMA, PARTIAL


def join_torchrun() -> tuple[int, int]:
    """(rank, world size): of the process group torchrun set up (joined here if needed: gloo, and
    where CUDA is there NCCL for CUDA tensors beside it; the statistics, kept on the CPU, go over
    gloo, which plain NCCL would refuse), or (0, 1) outside torchrun."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def agreed(value, world: int, how: str):
    """`value` (a number or a bool) agreed over the process group: its min or max."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if how == "min" else dist.ReduceOp.MAX)
    return type(value)(t.item())


def barrier(world: int) -> None:
    """Wait until every process of the group has come here (nothing to wait for where world == 1)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def reduce_statistics(results: dict[str, Tensor], world: int) -> None:
    """Sum (maxima: max) every statistic over the process group, in place; one that some process
    could not record from its data (`PARTIAL`) is dropped by all (else the sums would pair
    different statistics, or wait forever)."""
    if world == 1:
        return
    import torch.distributed as dist

    for name in PARTIAL:
        if not agreed(name in results, world, "min"):
            results.pop(name, None)

    for name, value in results.items():
        dist.all_reduce(value, op=dist.ReduceOp.MAX if name in MAXIMA else dist.ReduceOp.SUM)
