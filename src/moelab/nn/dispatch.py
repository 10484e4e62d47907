"""Dispatch: move token rows to their experts and back.

Shape legend: T tokens, D model dim, E experts, K slots per token, N routed rows (token-expert
assignments that are kept; N = T*K when every slot is used and nothing is dropped, and always in
a plan made without host counts, whose empty slots keep rows).

The MoE layer runs three explicit steps:

    plan = plan_dispatch(indices, num_experts, capacity_factor)  # sort assignments by expert
    batch = dispatcher.dispatch(x, weights, plan)                # gather rows [N, D] (+ exchange)
    ys = experts(batch.rows, batch.counts, batch.row_weights)   # grouped MLP, rows scaled by weight
    y = dispatcher.combine(ys, plan, batch)                      # (exchange back,) sum per token [T, D]

`dispatch` and `combine` are the exchange points: an expert-parallel dispatcher overrides them
to send rows (and their routing weights) to the rank that owns their expert (all_to_all) and
back, without touching routers or experts. Both directions are gathers followed by a
fixed-order sum over the K slots, never a scatter-add, so results are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """Where every assignment goes. Built by `plan_dispatch`; read by dispatch and combine.

    slots:      [N] (token, slot) of each routed row, flattened as t*K + k; rows grouped by expert.
    token_ids:  [N] source token of each routed row (slots // K).
    slot_rows:  [T*K] routed row of each (token, slot), or N for empty and dropped slots (none in
                a plan without host counts: every slot has a row).
    counts:     E python ints, routed rows per expert (the grouped matmul's group sizes); or, for
                a plan made without a host synchronisation (`plan_dispatch(host_counts=False)`),
                an [E] tensor on the routing's device: then every (token, slot) has a row, the
                empty slots' rows after all experts' rows, and the experts must return zeros
                for those rows (see `Experts.takes_device_counts`).
    tokens_per_expert: [E] assignments per expert before capacity dropping (the load).
    dropped_fraction:  [] fraction of assignments dropped by the capacity limit.
    num_tokens, top_k: T and K.
    slot_rows_by_slot: [K, T] routed row of each slot, clamped to a valid row (see `slot_mask`):
                what the combine's forward and the dispatch's backward read.
    slot_owns_row: [T, K] bool, whether a slot owns a routed row; None if every slot does.
    """

    slots: Tensor
    token_ids: Tensor
    slot_rows: Tensor
    counts: tuple[int, ...] | Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    num_tokens: int
    top_k: int
    slot_rows_by_slot: Tensor
    slot_owns_row: Tensor | None

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def has_empty_slots(self) -> bool:
        """Whether some slots have no row (empty or dropped): never in a plan without host counts,
        whose empty slots have rows that the experts zero."""
        return self.num_rows < self.num_tokens * self.top_k

    def slot_mask(self, dtype: torch.dtype) -> Tensor | None:
        """[T, K] 1 for slots that own a routed row, 0 for empty or dropped ones; None if all do."""
        return None if self.slot_owns_row is None else self.slot_owns_row.to(dtype)


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Switch/GShard capacity: ceil(capacity_factor * T*K / E) rows per expert."""
    return math.ceil(capacity_factor * num_assignments / num_experts)


def plan_dispatch(
    indices: Tensor, num_experts: int, capacity_factor: float | None = None, *, host_counts: bool = True
) -> DispatchPlan:
    """Sort the (token, slot) assignments of `indices: [T, K]` by expert.

    Slots with index -1 get no row. With a `capacity_factor`, each expert keeps at most
    `expert_capacity(T*K, E, capacity_factor)` assignments: first choices before second choices,
    earlier tokens before later ones (GShard priority); the rest are dropped and contribute 0.

    host_counts=False (dropless only) reads nothing back to the host: the counts stay an [E]
    tensor and every slot keeps a row, the empty ones sorted after all experts' rows (see
    `DispatchPlan.counts`), so a GPU step never waits for the routing; `torch._grouped_mm` takes
    such counts.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be [tokens, slots], got shape {list(indices.shape)}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
    if capacity_factor is not None and not host_counts:
        raise ValueError("capacity dropping decides on the host who is dropped; plan it with host_counts=True")
    T, K = indices.shape
    flat = indices.reshape(-1)
    load = _bincount(flat + 1, num_experts)  # [E + 1]: empty slots, then expert 0..E-1
    tokens_per_expert = load[1:]
    # Empty slots get key E so that they sort after every expert's rows.
    key = flat.masked_fill(flat == -1, num_experts)
    dropped = torch.zeros((), device=indices.device)
    if host_counts:
        counts = load.tolist()  # the one host sync of the plan
        num_empty, counts = counts[0], counts[1:]
        num_rows = T * K - num_empty
        if capacity_factor is not None:
            capacity = expert_capacity(num_rows, num_experts, capacity_factor)
            key = _drop_over_capacity(key, T, K, num_experts, capacity)
            counts = [min(n, capacity) for n in counts]
            kept = sum(counts)
            dropped = torch.tensor((num_rows - kept) / max(num_rows, 1), device=indices.device)
            num_rows = kept
        counts = tuple(counts)
    else:
        counts, num_rows = tokens_per_expert, T * K

    order = torch.argsort(key, stable=True)[:num_rows]
    slot_rows = torch.full((T * K,), num_rows, dtype=torch.long, device=indices.device)
    slot_rows[order] = torch.arange(num_rows, device=indices.device)
    by_slot = slot_rows.view(T, K).t()
    has_empty = num_rows < T * K
    return DispatchPlan(
        slots=order,
        token_ids=order // K,
        slot_rows=slot_rows,
        counts=counts,
        tokens_per_expert=tokens_per_expert,
        dropped_fraction=dropped,
        num_tokens=T,
        top_k=K,
        slot_rows_by_slot=(by_slot.clamp(max=num_rows - 1) if has_empty else by_slot).contiguous(),
        slot_owns_row=(slot_rows < num_rows).view(T, K) if has_empty else None,
    )


def _bincount(shifted: Tensor, num_experts: int) -> Tensor:
    """Slots per value of `indices + 1` in [0, E]; a scatter-add, so the shape is static under
    torch.compile, and an index outside [-1, E-1] falls outside the buckets and is rejected."""
    try:
        return torch.zeros(num_experts + 1, dtype=torch.long, device=shifted.device).scatter_add_(
            0, shifted, torch.ones_like(shifted)
        )
    except RuntimeError:
        raise ValueError(
            f"expert indices must lie in [-1, {num_experts - 1}] (-1 = empty slot); some lie outside. "
            "Check the router's num_experts against the experts'"
        ) from None


def _drop_over_capacity(key: Tensor, T: int, K: int, num_experts: int, capacity: int) -> Tensor:
    """Mark as empty (key = E) the assignments past each expert's capacity, in slot-major priority."""
    slot_major = key.view(T, K).t().reshape(-1)  # position p = j*T + t
    order = torch.argsort(slot_major, stable=True)
    sorted_keys = slot_major[order]
    group_start = torch.searchsorted(sorted_keys, sorted_keys, right=False)
    rank = torch.arange(order.numel(), device=key.device) - group_start
    over = (rank >= capacity) & (sorted_keys < num_experts)
    # Back to slot-major positions, then to token-major slots; static shapes (no boolean indexing).
    drop = torch.zeros_like(over).scatter_(0, order, over).view(K, T).t().reshape(-1)
    return key.masked_fill(drop, num_experts)


def _sum_slots(rows: Tensor, src: Tensor, mask: Tensor | None) -> Tensor:
    """out[t] = sum_k mask[t, k] * src[rows[k, t]]; rows: [K, T], mask: [T, K] or None."""
    out = src.index_select(0, rows[0])
    if mask is not None:
        out.mul_(mask[:, :1])
    picked = torch.empty_like(out)
    for k in range(1, rows.shape[0]):
        torch.index_select(src, 0, rows[k], out=picked)
        if mask is None:
            out.add_(picked)
        else:
            out.addcmul_(picked, mask[:, k : k + 1])
    return out


class _GatherRows(torch.autograd.Function):
    """Dispatch: xs = x[token_ids]. Its backward sums each token's rows slot by slot (a fixed
    order, no scatter-add), so gradients are deterministic."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: DispatchPlan) -> Tensor:
        ctx.plan = plan
        return x.index_select(0, plan.token_ids)

    @staticmethod
    def backward(ctx, grad_xs: Tensor):
        if ctx.plan.num_rows == 0:  # nothing was gathered (every assignment empty or dropped)
            return grad_xs.new_zeros(ctx.plan.num_tokens, grad_xs.shape[1]), None
        return _sum_slots(ctx.plan.slot_rows_by_slot, grad_xs.contiguous(), ctx.plan.slot_mask(grad_xs.dtype)), None


class _SumSlots(torch.autograd.Function):
    """Combine: y[t] = sum of the rows of token t, slot by slot; the adjoint of `_GatherRows`."""

    @staticmethod
    def forward(ctx, ys: Tensor, plan: DispatchPlan) -> Tensor:
        ctx.plan = plan
        return _sum_slots(plan.slot_rows_by_slot, ys, plan.slot_mask(ys.dtype))

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return grad_y.index_select(0, ctx.plan.token_ids), None


@dataclass(frozen=True)
class ExpertBatch:
    """The rows a rank's experts process, as `dispatch` hands them over.

    rows: [N_local, D] grouped by local expert; row_weights: [N_local] routing weight of each
    row; counts: rows per local expert (python ints, or an [E] tensor: `DispatchPlan.counts`);
    exchange: whatever `combine` needs to send the results back (None for the local dispatcher).
    """

    rows: Tensor
    row_weights: Tensor
    counts: tuple[int, ...] | Tensor
    exchange: Any = None


class LocalDispatcher:
    """Single-process dispatch. Stateless (no parameters); an expert-parallel subclass sends rows
    to the rank that owns their expert in `dispatch` and the results back in `combine`."""

    def num_local_experts(self, num_experts: int) -> int:
        return num_experts

    def dispatch(self, x: Tensor, weights: Tensor, plan: DispatchPlan) -> ExpertBatch:
        """x: [T, D], weights: [T, K] -> the rows grouped by expert [N, D] with their weights."""
        row_weights = weights.reshape(-1).index_select(0, plan.slots)
        return ExpertBatch(_GatherRows.apply(x, plan), row_weights, plan.counts)

    def combine(self, ys: Tensor, plan: DispatchPlan, batch: ExpertBatch) -> Tensor:
        """ys: [N, D] weighted expert outputs -> y: [T, D], each token's rows summed."""
        if plan.num_rows == 0:
            return ys.new_zeros(plan.num_tokens, ys.shape[1]) + 0 * ys.sum()
        return _SumSlots.apply(ys, plan)
