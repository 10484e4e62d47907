"""Expert parallelism: each rank of a process group holds E / W of the routed experts.

Shape legend: T local tokens, D model dim, E experts in all, W ranks, L = E / W experts per
rank, N rows this rank routes, R rows this rank's experts receive.

Rank r owns global experts [r*L, (r+1)*L). Routers, plans and the combine run on every rank
for its own tokens, unchanged; `ExpertParallelDispatcher` only adds the two exchanges:

    dispatch: rows grouped by global expert are contiguous per destination rank, so one
              all_to_all_single (counts first, then rows and row weights, uneven splits)
              delivers them; received rows are regrouped by local expert.
    combine:  the inverse permutation, one all_to_all_single back, then the usual sum per token.

Gradients flow through both exchanges (`all_to_all_single_autograd`). Works with gloo on CPU
and NCCL on GPUs. `bytes_sent` counts what the forward passes sent to other ranks (rows, row
weights and results; the backward pass sends as much again, the received amounts in reverse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moelab.nn.dispatch import DispatchPlan, ExpertBatch, LocalDispatcher
from moelab.nn.experts import Experts
from moelab.nn.moe import MoELayer


@dataclass(frozen=True)
class _Exchange:
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    to_expert_order: Tensor  # [R] received (source-major) row -> local-expert-major position
    to_source_order: Tensor  # [R] its inverse


class ExpertParallelDispatcher(LocalDispatcher):
    """Send each routed row to the rank that owns its expert, and the result back."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes_sent = 0  # forward rows, row weights and results sent to other ranks

    def num_local_experts(self, num_experts: int) -> int:
        if num_experts % self.world_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the {self.world_size} expert-parallel ranks")
        return num_experts // self.world_size

    def dispatch(self, x: Tensor, weights: Tensor, plan: DispatchPlan) -> ExpertBatch:
        local = super().dispatch(x, weights, plan)  # rows grouped by global expert
        W, L = self.world_size, self.num_local_experts(len(plan.counts))
        send_counts = torch.tensor(plan.counts, dtype=torch.long, device=x.device).view(W, L)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [source rank, local expert]
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        row_bytes = local.rows.shape[1] * local.rows.element_size() + local.row_weights.element_size()
        self.bytes_sent += (sum(send_splits) - send_splits[self.rank]) * row_bytes
        rows = all_to_all_single_autograd(local.rows, recv_splits, send_splits, self.group)
        row_weights = all_to_all_single_autograd(local.row_weights, recv_splits, send_splits, self.group)
        expert_of_row = torch.arange(L, device=x.device).repeat(W).repeat_interleave(recv_counts.flatten())
        to_expert_order = torch.argsort(expert_of_row, stable=True)
        exchange = _Exchange(send_splits, recv_splits, to_expert_order, torch.argsort(to_expert_order))
        return ExpertBatch(
            rows.index_select(0, to_expert_order),
            row_weights.index_select(0, to_expert_order),
            tuple(recv_counts.sum(0).tolist()),
            exchange,
        )

    def combine(self, ys: Tensor, plan: DispatchPlan, batch: ExpertBatch) -> Tensor:
        ex: _Exchange = batch.exchange
        self.bytes_sent += (sum(ex.recv_splits) - ex.recv_splits[self.rank]) * ys.shape[1] * ys.element_size()
        back = all_to_all_single_autograd(ys.index_select(0, ex.to_source_order), ex.send_splits, ex.recv_splits, self.group)
        return super().combine(back, plan, batch)


def shard_experts(layer: MoELayer, group: dist.ProcessGroup | None = None) -> MoELayer:
    """Turn a full MoE layer (built identically on every rank) into this rank's expert-parallel
    shard: keep experts [rank*L, (rank+1)*L) and dispatch over `group`. Modifies `layer`."""
    dispatcher = ExpertParallelDispatcher(group)
    L = dispatcher.num_local_experts(layer.num_experts)
    keep = slice(dispatcher.rank * L, (dispatcher.rank + 1) * L)
    experts: Experts = layer.experts
    for name, param in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, torch.nn.Parameter(param.detach()[keep].clone(), requires_grad=param.requires_grad))
    experts.num_experts = L
    layer.dispatcher = dispatcher
    return layer
