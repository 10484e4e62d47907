"""Distributed MoE over torch.distributed (gloo on CPU, NCCL on GPUs): expert parallelism, FSDP2
and checkpoints that reshard, for `moelab train` under torchrun."""

from moelab.distributed.expert_parallel import ExpertParallelDispatcher, shard_experts
from moelab.distributed.mesh import (
    Parallel,
    ParallelConfig,
    exit_process,
    free_port,
    init_parallel,
    torchrun_world,
)

__all__ = [
    "ExpertParallelDispatcher",
    "Parallel",
    "ParallelConfig",
    "exit_process",
    "free_port",
    "init_parallel",
    "shard_experts",
    "torchrun_world",
]
