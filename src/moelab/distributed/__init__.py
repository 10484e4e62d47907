"""Distributed MoE: expert parallelism over torch.distributed (gloo on CPU, NCCL on GPUs)."""

from moelab.distributed.expert_parallel import ExpertParallelDispatcher, shard_experts

__all__ = ["ExpertParallelDispatcher", "shard_experts"]
