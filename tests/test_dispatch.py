"""plan_dispatch (grouping, capacity dropping with GShard priority) and the local dispatcher
(gather rows, weighted combine, and their gradients) against the naive reference."""

import math

import pytest
import torch
from reference import F64, RefRouting, apply_capacity, assert_close, f64_leaf

from moelab.nn import LocalDispatcher, plan_dispatch
from moelab.nn.dispatch import expert_capacity


def _random_indices(T, K, E, *, empty=0.0, seed=0, skew=False):
    """[T, K] distinct experts per token (top-k style), some slots -1 with probability `empty`."""
    g = torch.Generator().manual_seed(seed)
    if skew:  # most tokens prefer the low experts: forces drops
        scores = torch.rand(T, E, generator=g) + torch.linspace(1, 0, E)
    else:
        scores = torch.rand(T, E, generator=g)
    idx = scores.topk(K, dim=-1).indices
    if empty:
        idx = idx.masked_fill(torch.rand(T, K, generator=g) < empty, -1)
    return idx


def _as_ref(indices):
    T, K = indices.shape
    choices = [[(j, int(e), None) for j, e in enumerate(row.tolist()) if e >= 0] for row in indices]
    return RefRouting(choices, torch.zeros(T, 0), torch.zeros(T, 0), K)


def check_plan(indices, E, cf):
    plan = plan_dispatch(indices, E, cf)
    T, K = indices.shape
    ref = apply_capacity(_as_ref(indices), E, cf)
    valid = [int((indices == e).sum()) for e in range(E)]
    assert plan.tokens_per_expert.tolist() == valid  # load before dropping
    kept_per_expert = [0] * E
    for t, j in ref.kept:
        kept_per_expert[int(indices[t, j])] += 1
    assert list(plan.counts) == kept_per_expert
    N = sum(kept_per_expert)
    assert plan.num_rows == N and plan.slots.shape == (N,)
    kept = {(t, j) for t in range(T) for j in range(K) if plan.slot_rows[t * K + j] < N}
    assert kept == ref.kept
    assert abs(float(plan.dropped_fraction) - ref.dropped_fraction) < 1e-7
    # rows grouped by expert, consistent with slot_rows and token_ids
    experts_of_rows = indices.reshape(-1)[plan.slots]
    assert torch.all(experts_of_rows[1:] >= experts_of_rows[:-1])
    assert torch.equal(plan.token_ids, plan.slots // K)
    assert torch.equal(plan.slot_rows[plan.slots], torch.arange(N))
    if cf is not None:
        assert max(kept_per_expert, default=0) <= ref.capacity
    return plan


@pytest.mark.parametrize("cf", [None, 0.25, 0.5, 1.0, 1.25, 2.0, 8.0])
@pytest.mark.parametrize("T,K,E", [(1, 1, 1), (1, 3, 4), (17, 2, 4), (40, 4, 16), (33, 8, 8)])
@pytest.mark.parametrize("empty", [0.0, 0.3])
@pytest.mark.parametrize("skew", [False, True])
def test_plan_matches_reference(T, K, E, cf, empty, skew):
    check_plan(_random_indices(T, K, E, empty=empty, skew=skew, seed=T * K + E), E, cf)


def test_gshard_priority_by_slot_then_token():
    """Expert 0 is the second choice of tokens 0..2 and the first choice of token 3: with
    capacity 1 the first choice (token 3) wins although it comes later."""
    indices = torch.tensor([[1, 0], [2, 0], [3, 0], [0, 1]])
    # 8 assignments over 4 experts, cf 0.5 -> C = 1
    assert expert_capacity(8, 4, 0.5) == 1
    plan = check_plan(indices, 4, 0.5)
    assert plan.slot_rows[3 * 2 + 0] < plan.num_rows  # token 3 slot 0 kept
    assert all(plan.slot_rows[t * 2 + 1] == plan.num_rows for t in range(3))  # others' slot 1 dropped
    # expert 1: token 0 (slot 0) beats token 3 (slot 1)
    assert plan.slot_rows[0] < plan.num_rows and plan.slot_rows[3 * 2 + 1] == plan.num_rows
    assert float(plan.dropped_fraction) == pytest.approx(4 / 8)


def test_capacity_counts_valid_assignments_only():
    """C = ceil(cf * (valid assignments) / E): empty slots do not raise the capacity."""
    indices = torch.tensor([[0, -1, -1, -1], [0, -1, -1, -1], [0, -1, -1, -1], [1, -1, -1, -1]])
    plan = check_plan(indices, 2, 1.0)  # 4 valid assignments, E = 2 -> C = 2
    assert plan.counts == (2, 1)
    assert float(plan.dropped_fraction) == pytest.approx(1 / 4)


def test_all_slots_empty():
    plan = check_plan(torch.full((5, 3), -1), 4, 1.0)
    assert plan.num_rows == 0 and plan.counts == (0, 0, 0, 0)
    assert float(plan.dropped_fraction) == 0.0


@pytest.mark.parametrize("bad", [4, 5, 100, -2], ids=lambda v: f"index={v}")
def test_out_of_range_indices_are_rejected(bad):
    """E = 4: an index of 4 must not be mistaken for an empty slot (-1)."""
    indices = torch.tensor([[0, bad], [1, 2]])
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        plan_dispatch(indices, 4)


def test_bad_plan_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"\[tokens, slots\]"):
        plan_dispatch(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        plan_dispatch(torch.tensor([[0]]), 4, 0.0)


@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("empty", [0.0, 0.4])
def test_dispatch_and_combine_match_reference(cf, empty):
    """rows = x[token of each kept assignment] with its weight; combine(f(rows)) = per token, the
    sum over its kept slots; gradients of x and the weights by autograd on the loops."""
    T, K, E, D = 13, 3, 5, 4
    indices = _random_indices(T, K, E, empty=empty, seed=7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    weights = torch.rand(T, K, generator=g).masked_fill(indices < 0, 0).requires_grad_(True)
    plan = plan_dispatch(indices, E, cf)
    disp = LocalDispatcher()
    batch = disp.dispatch(x, weights, plan)
    assert batch.counts == plan.counts
    # a row-wise non-linear "expert" (depends on the expert) so that the test sees row order
    expert_of_row = indices.reshape(-1)[plan.slots].to(torch.float32)
    ys = torch.tanh(batch.rows * (1 + expert_of_row[:, None])) * batch.row_weights[:, None]
    y = disp.combine(ys, plan, batch)

    kept = apply_capacity(_as_ref(indices), E, cf).kept
    xr, wr = f64_leaf(x), f64_leaf(weights)
    rows = []
    for t in range(T):
        acc = xr.new_zeros(D)
        for j in range(K):
            e = int(indices[t, j])
            if e >= 0 and (t, j) in kept:
                acc = acc + torch.tanh(xr[t] * (1 + e)) * wr[t, j]
        rows.append(acc)
    ref = torch.stack(rows)
    assert_close(y, ref, what="combined y")
    G = torch.randn(T, D, generator=g, dtype=F64)
    (y.double() * G).sum().backward()
    (ref * G).sum().backward()
    assert_close(x.grad, xr.grad, what="grad x")
    assert_close(weights.grad, wr.grad, what="grad weights")


def test_dispatch_is_deterministic():
    indices = _random_indices(64, 4, 8, seed=3, empty=0.2)
    x = torch.randn(64, 16, requires_grad=True)
    w = torch.rand(64, 4)
    grads = []
    for _ in range(2):
        plan = plan_dispatch(indices, 8, 1.0)
        disp = LocalDispatcher()
        batch = disp.dispatch(x, w, plan)
        y = disp.combine(batch.rows * batch.row_weights[:, None], plan, batch)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
        grads.append((y.detach(), gx))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_expert_capacity_formula():
    assert expert_capacity(10, 4, 1.0) == math.ceil(10 / 4)
    assert expert_capacity(10, 4, 1.25) == math.ceil(1.25 * 10 / 4)
    assert expert_capacity(1, 16, 0.1) == 1
