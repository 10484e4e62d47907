"""The merging methods (M-SMoE, HC-SMoE, Sub-MoE, MC-SMoE's low-rank stage) against their specs
(`../shared/research/compression.md` §2, §3, §6.7) on worked examples and naive references:
loops over tokens, experts and clusters, written from the equations."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_views import make_view, stats_with
from reference import F64, logsumexp, rms_normed, silu

from moelab.compress.merging import (
    _permuted,
    aligned_to,
    alignment,
    expert_features,
    logit_similarity,
    merged_layer,
    router_groups,
)
from moelab.compress.methods import Target, get_method
from moelab.compress.methods.hcsmoe import clusters_by_usage, hierarchical_labels, sparing_labels
from moelab.compress.methods.lowrank import check_rank_saves, low_rank_sparse
from moelab.compress.methods.submoe import kmeans_labels, subspace_merge
from moelab.compress.stats import LayerStats
from moelab.hf.edit import LayerEdit, moe_output, one_expert
from moelab.hf.view import ExpertsView, LatentView, MoELayerView, NormView

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

PROPERTY = settings(settings.get_profile("ci"), max_examples=25, deadline=None)


def ffn(view, e: int, x_t: torch.Tensor) -> torch.Tensor:
    """Expert e of a layer view on one token, from its three matrices."""
    ex = view.experts
    return ex.down[e].double() @ (silu(ex.gate[e].double() @ x_t) * (ex.up[e].double() @ x_t))


def labels_to_partition(labels) -> set[frozenset[int]]:
    clusters: dict[int, set[int]] = {}
    for i, label in enumerate(labels):
        clusters.setdefault(int(label), set()).add(i)
    return {frozenset(c) for c in clusters.values()}


# ----------------------------------------------------------------------------- the merge itself


def test_logit_similarity_is_the_shifted_cosine_of_logit_columns():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(40, 5, generator=g, dtype=F64)  # tokens x experts
    got = logit_similarity(Z.T @ Z)
    for i, j in itertools.product(range(5), repeat=2):
        a, b = Z[:, i], Z[:, j]
        cos = sum(float(a[t] * b[t]) for t in range(40)) / (float(a.norm()) * float(b.norm()))
        assert float(got[i, j]) == pytest.approx((cos + 1) / 2, abs=1e-12)


@pytest.mark.parametrize("rule", ["dominant", "weighted"])
def test_merge_is_the_frequency_weighted_average(rule):
    view = make_view(E=5, router_bias={0: 0.5, 3: -1.0})
    counts = torch.tensor([6.0, 1.0, 3.0, 0.0, 0.0], dtype=F64)
    groups = [[2, 0], [1], [3, 4]]  # [3, 4] was never used: an even average
    edit = merged_layer(view, groups, counts, router_rule=rule)
    assert edit.sources == ((2, 0), (1,), (3, 4))
    weights = [{2: 1 / 3, 0: 2 / 3}, {1: 1.0}, {3: 0.5, 4: 0.5}]
    for g, (group, w) in enumerate(zip(groups, weights)):
        for name in ("gate", "up", "down"):
            expected = sum(w[e] * getattr(view.experts, name)[e] for e in group)
            torch.testing.assert_close(getattr(edit.view.experts, name)[g], expected, rtol=0, atol=1e-15)
        lead = group[0]
        for name in ("weight", "bias"):
            values = getattr(view.router, name)
            expected = values[lead] if rule == "dominant" else sum(w[e] * values[e] for e in group)
            torch.testing.assert_close(getattr(edit.view.router, name)[g], expected, rtol=0, atol=1e-15)
    assert edit.view.experts.gate.dtype == view.experts.gate.dtype


def test_merging_folds_per_expert_scales_into_the_down_projections():
    """Gemma 4's per-expert scale multiplies each expert's output: a merge folds it into the members'
    down projections before averaging and gives the merged expert scale 1, so singleton groups compute
    the original layer and a pair is the weighted average of s_e down_e."""
    view = make_view(E=4)
    scale = torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=F64)
    view = dataclasses.replace(view, router=dataclasses.replace(view.router, expert_scale=scale))
    same = merged_layer(view, [[0], [1], [2], [3]], torch.ones(4, dtype=F64))
    assert torch.equal(same.view.router.expert_scale, torch.ones(4, dtype=F64))
    x = torch.randn(16, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe_output(same.view, x), moe_output(view, x), rtol=1e-6, atol=1e-9)  # float32 routing
    pair = merged_layer(view, [[1, 0], [2], [3]], torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=F64))
    expected = 0.75 * 2.0 * view.experts.down[1] + 0.25 * 0.5 * view.experts.down[0]
    torch.testing.assert_close(pair.view.experts.down[0], expected, rtol=0, atol=1e-15)
    assert torch.equal(pair.view.experts.down[1], -view.experts.down[2])


def test_merging_folds_per_expert_scales_into_the_down_biases_too():
    """The scale multiplies the whole expert output, down_e h + c_e: the merged bias is the weighted
    average of s_e c_e, and singleton groups compute the original layer."""
    view = make_view(E=4)
    scale = torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=F64)
    down_bias = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    view = dataclasses.replace(
        view,
        router=dataclasses.replace(view.router, expert_scale=scale),
        experts=dataclasses.replace(view.experts, down_bias=down_bias),
    )
    same = merged_layer(view, [[0], [1], [2], [3]], torch.ones(4, dtype=F64))
    x = torch.randn(16, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe_output(same.view, x), moe_output(view, x), rtol=1e-5, atol=1e-7)  # float32 routing
    pair = merged_layer(view, [[1, 0], [2], [3]], torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=F64))
    expected = 0.75 * 2.0 * down_bias[1] + 0.25 * 0.5 * down_bias[0]
    torch.testing.assert_close(pair.view.experts.down_bias[0], expected, rtol=0, atol=1e-15)


def test_merge_keeps_the_stored_dtype():
    view = make_view(E=4, dtype=torch.bfloat16)
    edit = merged_layer(view, [[0, 1], [2, 3]], torch.ones(4))
    assert edit.view.experts.down.dtype == torch.bfloat16 and edit.view.router.weight.dtype == torch.bfloat16


def test_alignment_recovers_a_permutation_and_keeps_the_function():
    view = make_view(E=1, I=7, top_k=1, seed=3)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    shuffled = _permuted(view.experts, perm)
    x = torch.randn(8, dtype=F64)
    shuffled_view = dataclasses.replace(view, experts=shuffled)
    torch.testing.assert_close(ffn(shuffled_view, 0, x), ffn(view, 0, x))  # same function
    assert not torch.equal(shuffled.gate, view.experts.gate)
    back = _permuted(shuffled, alignment(view.experts, shuffled))
    for name in ("gate", "up", "down"):
        assert torch.equal(getattr(back, name), getattr(view.experts, name)), name


@pytest.mark.parametrize("informative", ["up", "down"])
def test_alignment_of_plain_experts_reads_their_up_rows_and_down_columns(informative):
    """Experts with no gate (Nemotron-H): the up rows and the down columns both identify a neuron;
    with the other one uninformative (every neuron alike), either alone recovers the permutation."""
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(1, 6, 4, generator=g, dtype=F64), torch.randn(1, 4, 6, generator=g, dtype=F64)
    if informative == "up":
        down = torch.ones_like(down)
    else:
        up = torch.ones_like(up)
    experts = ExpertsView(None, up, down, activation="relu2")
    perm = torch.randperm(6, generator=g)
    shuffled = _permuted(experts, perm)
    back = _permuted(shuffled, alignment(experts, shuffled))
    assert torch.equal(back.up, experts.up) and torch.equal(back.down, experts.down) and back.gate is None
    assert not torch.equal(shuffled.up if informative == "up" else shuffled.down, up if informative == "up" else down)


@PROPERTY
@given(seed=st.integers(0, 10_000), twins=st.booleans())
def test_alignment_maximises_the_summed_inner_products_over_every_permutation(seed, twins):
    """Brute force over all 5! permutations of the summed inner products of gate rows, up rows and
    down columns. twins: two of the other expert's neurons share their gate and up rows, so that
    only their down columns tell them apart."""
    view = make_view(E=2, I=5, top_k=1, seed=seed)
    ref, other = one_expert(view.experts, 0), one_expert(view.experts, 1)
    if twins:
        gate, up = other.gate.clone(), other.up.clone()
        gate[0, 1], up[0, 1] = gate[0, 0], up[0, 0]
        other = dataclasses.replace(other, gate=gate, up=up)

    def similarity(perm) -> float:
        return sum(
            float(ref.gate[0, i] @ other.gate[0, j] + ref.up[0, i] @ other.up[0, j])
            + float(ref.down[0][:, i] @ other.down[0][:, j])
            for i, j in enumerate(perm)
        )

    best = max(itertools.permutations(range(5)), key=similarity)
    assert similarity(alignment(ref, other).tolist()) == pytest.approx(similarity(best), rel=1e-12)


def test_aligned_merge_of_permuted_copies_is_the_copy():
    """Two experts that are the same function with their neurons shuffled: merged after
    alignment they give that function back; averaged without alignment they do not."""
    view = make_view(E=2, I=6, top_k=1, seed=4)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    copy = _permuted(one_expert(view.experts, 0), perm)
    experts = dataclasses.replace(
        view.experts,
        gate=torch.cat([view.experts.gate[:1], copy.gate]),
        up=torch.cat([view.experts.up[:1], copy.up]),
        down=torch.cat([view.experts.down[:1], copy.down]),
    )
    view = dataclasses.replace(view, experts=experts)
    x = torch.randn(8, dtype=F64)
    aligned = merged_layer(view, [[0, 1]], torch.tensor([3.0, 1.0]), align=True).view
    plain = merged_layer(view, [[0, 1]], torch.tensor([3.0, 1.0]), align=False).view
    torch.testing.assert_close(ffn(aligned, 0, x), ffn(view, 0, x), rtol=1e-12, atol=1e-12)
    assert (ffn(plain, 0, x) - ffn(view, 0, x)).abs().max() > 1e-3


def test_fitted_router_row_is_exact_for_one_expert_and_least_squares_for_groups():
    view = make_view(E=4, router_bias={0: 0.3, 1: -0.2, 2: 0.1, 3: 0.0}, seed=5)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    fitted = merged_layer(view, [[0], [1, 2, 3]], torch.ones(4), router_rule="fit", inputs=x).view.router
    torch.testing.assert_close(fitted.weight[0], view.router.weight[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(fitted.bias[0], view.router.bias[0], rtol=0, atol=1e-10)
    z = x @ view.router.weight.T + view.router.bias
    target = torch.stack([logsumexp(z[t, 1:]) for t in range(64)])
    weighted = merged_layer(view, [[0], [1, 2, 3]], torch.ones(4), router_rule="weighted").view.router

    def error(router):
        return float(((x @ router.weight[1] + router.bias[1]) - target).square().sum())

    assert error(fitted) < error(weighted)
    # the least-squares solution itself: numpy's lstsq of [x, 1] onto the group's log-sum-exp
    design = np.concatenate([x.numpy(), np.ones((64, 1))], axis=1)
    solution = np.linalg.lstsq(design, target.numpy(), rcond=None)[0]
    torch.testing.assert_close(fitted.weight[1], torch.from_numpy(solution[:8]), rtol=0, atol=1e-10)
    torch.testing.assert_close(fitted.bias[1], torch.tensor(solution[8], dtype=F64), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="softmax router"):
        merged_layer(
            make_view(E=4, score_func="sigmoid"), [[0, 1], [2, 3]], torch.ones(4), router_rule="fit", inputs=x
        )


def test_fitted_router_row_with_fewer_samples_than_dimensions_moves_only_within_their_span():
    """Real models sample fewer tokens than the router reads dimensions (1,024 against D = 2,048 or
    4,096), so the least-squares row is not unique: an expert merged with no other keeps its row (not
    its projection on the samples' span), and a merged row is the usage-weighted average plus the
    smallest correction that reaches the group's log-sum-exp on the samples (off their span, it is the
    weighted average)."""
    view = make_view(E=4, D=8, router_bias={0: 0.3, 1: -0.2, 2: 0.1, 3: 0.0}, seed=5)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=F64)  # N = 5 < D + 1
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    fitted = merged_layer(view, [[0], [1, 2, 3]], counts, router_rule="fit", inputs=x).view.router
    torch.testing.assert_close(fitted.weight[0], view.router.weight[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(fitted.bias[0], view.router.bias[0], rtol=0, atol=1e-10)
    z = x @ view.router.weight.T + view.router.bias
    target = torch.stack([logsumexp(z[t, 1:]) for t in range(5)])
    torch.testing.assert_close(x @ fitted.weight[1] + fitted.bias[1], target, rtol=0, atol=1e-10)  # interpolates
    weighted = merged_layer(view, [[0], [1, 2, 3]], counts, router_rule="weighted").view.router
    design = torch.cat([x, torch.ones(5, 1, dtype=F64)], dim=1)  # the correction lies in its row space
    correction = torch.cat([fitted.weight[1] - weighted.weight[1], (fitted.bias[1] - weighted.bias[1])[None]])
    off_span = correction - design.T @ torch.linalg.lstsq(design.T, correction[:, None]).solution[:, 0]
    assert float(off_span.norm()) < 1e-10


def test_fitted_router_row_ignores_directions_the_float32_samples_do_not_resolve():
    """A LayerNorm with a weight g (DBRX's, Cohere's) puts every router input on the hyperplane
    x . (1 / g) = 0; stored in float32, as calibration stores its samples, they leave it by rounding
    only. The fit must not read that rounding as signal: with more samples than dimensions it once
    put a coefficient of about 1e8 along the hyperplane's normal (a DBRX merged row of norm 3e8,
    whose logits transformers' float32 matmul got 0.15 off)."""
    view = make_view(E=4, D=8, dtype=torch.float32, seed=5)
    g = torch.linspace(0.5, 2.0, 8, dtype=F64)
    raw = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = (torch.nn.functional.layer_norm(raw, (8,)) * g).float()  # N = 64 > D + 1
    fitted = merged_layer(view, [[0], [1, 2, 3]], torch.ones(4), router_rule="fit", inputs=x).view.router
    assert float(fitted.weight[1].norm()) < 10 * float(view.router.weight.norm(dim=1).max())
    exact = x.double() @ fitted.weight[1].double()
    torch.testing.assert_close((x @ fitted.weight[1]).double(), exact, rtol=0, atol=1e-5)


def test_fitted_router_row_of_a_bf16_router_fits_beside_a_massive_activation_channel():
    """The cut-off is the float32 samples' precision, not the bf16 router's: beside a channel 300x
    the others (LLMs' massive activations) every other direction's singular value is under bf16's
    eps times the largest, and cutting there left the fit near the plain weighted average. The row
    is the float64 least-squares fit (a naive lstsq over every direction), rounded to bf16."""
    view = make_view(E=4, D=16, dtype=torch.bfloat16, seed=2)  # a router without bias
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    x[:, 3] *= 300
    fitted = merged_layer(view, [[0], [1, 2, 3]], torch.ones(4), router_rule="fit", inputs=x).view.router
    average = view.router.weight[1:].double().mean(0)
    target = torch.logsumexp(x.double() @ view.router.weight[1:].double().T, dim=1)
    expected = average + torch.linalg.lstsq(x.double(), (target - x.double() @ average)[:, None]).solution[:, 0]
    torch.testing.assert_close(fitted.weight[1].double(), expected, rtol=2**-7, atol=0)  # to bf16 rounding


def test_fitted_router_row_reads_the_inputs_through_the_routers_norm():
    """Gemma 4's router reads n(x) = x / sqrt(mean(x^2) + eps) * g * m: the merged row is the least-squares
    fit, on n(x), of the group's log-sum-exp of its members' logits on n(x)."""
    view = make_view(E=4, seed=5)
    g = torch.linspace(0.5, 2.0, 8, dtype=F64)
    norm = NormView(g, eps=1e-6, multiplier=8**-0.5)
    view = dataclasses.replace(view, router=dataclasses.replace(view.router, input_norm=norm))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=F64) * torch.rand(64, 1, dtype=F64) * 4
    fitted = merged_layer(view, [[0], [1, 2, 3]], torch.ones(4), router_rule="fit", inputs=x).view.router
    normed = torch.stack([rms_normed(x[t], g, 1e-6) * 8**-0.5 for t in range(64)])
    z = normed @ view.router.weight.T
    target = torch.stack([logsumexp(z[t, 1:]) for t in range(64)])
    solution = np.linalg.lstsq(normed.numpy(), target.numpy(), rcond=None)[0]
    torch.testing.assert_close(fitted.weight[0], view.router.weight[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(fitted.weight[1], torch.from_numpy(solution), rtol=0, atol=1e-10)


def test_fitted_router_row_keeps_the_joint_probability_under_a_logit_scale():
    """Logits s (W x + b) (logit_scale s): the merged row's scaled logit follows the log-sum-exp of its
    members' scaled logits, so two members with one row merge into that row with bias b + log(2) / s
    (their joint probability, twice one's); a softcap's tanh has no such row: refused, as HC-SMoE's
    router_rule='fit' is before calibrating."""
    from moelab.compress.methods.hcsmoe import HCSMoE

    view = make_view(E=4, router_bias={0: 0.3, 1: -0.2, 2: 0.1, 3: 0.0}, seed=5)
    weight, bias = view.router.weight.clone(), view.router.bias.clone()
    weight[2], bias[2] = weight[1], bias[1]
    router = dataclasses.replace(view.router, weight=weight, bias=bias, logit_scale=0.5)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    edit = merged_layer(dataclasses.replace(view, router=router), [[0], [1, 2], [3]], torch.ones(4), router_rule="fit", inputs=x)
    torch.testing.assert_close(edit.view.router.weight[1], weight[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(edit.view.router.bias[1], bias[1] + math.log(2) / 0.5, rtol=0, atol=1e-10)
    capped = dataclasses.replace(view, router=dataclasses.replace(router, logit_softcap=2.0))
    with pytest.raises(ValueError, match="without a logit softcap"):
        merged_layer(capped, [[0], [1, 2], [3]], torch.ones(4), router_rule="fit", inputs=x)
    with pytest.raises(ValueError, match="but this router caps its logits; use router_rule=weighted"):
        HCSMoE(router_rule="fit").check_router(capped.router)


def test_router_groups_split_experts_like_the_router():
    assert router_groups(make_view(E=8, n_group=4, topk_group=2).router) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert router_groups(make_view(E=3, top_k=1).router) == [[0, 1, 2]]


# ----------------------------------------------------------------------------- M-SMoE


def _gram_with_twins(twins: dict[int, int], E: int, seed: int = 0) -> torch.Tensor:
    """A logit Gram matrix over 50 tokens where expert j's logit column is expert twins[j]'s plus
    a little noise (so j resembles it most)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(50, E, generator=g, dtype=F64)
    for j, i in twins.items():
        Z[:, j] = Z[:, i] + 0.1 * torch.randn(50, generator=g, dtype=F64)
    return Z.T @ Z


def test_m_smoe_worked_example():
    """Counts [10, 1, 8, 2, 6, 3], keep 3: the dominant experts are 0, 2, 4; expert 3 resembles 0,
    1 resembles 2 and 5 resembles 4, so the groups are {0, 3}, {2, 1}, {4, 5}, each with its
    dominant expert's router row and the frequency-weighted average of its aligned members."""
    view = make_view(E=6, seed=6)
    stats = stats_with([10, 1, 8, 2, 6, 3], logit_gram=_gram_with_twins({3: 0, 1: 2, 5: 4}, 6))
    decision = get_method("m_smoe").decide(view, stats, Target(3))
    assert decision.merge_groups == [[0, 3], [2, 1], [4, 5]] and decision.kept == []
    assert decision.edit.sources == ((0, 3), (2, 1), (4, 5))
    for g, lead in enumerate((0, 2, 4)):
        assert torch.equal(decision.edit.view.router.weight[g], view.router.weight[lead])
    perm = alignment(one_expert(view.experts, 2), one_expert(view.experts, 1))
    expected = (8 * view.experts.up[2] + view.experts.up[1][perm]) / 9
    torch.testing.assert_close(decision.edit.view.experts.up[1], expected, rtol=0, atol=1e-15)


def test_m_smoe_protected_experts_are_dominant():
    view = make_view(E=6, seed=6)
    stats = stats_with([10, 1, 8, 2, 6, 3], logit_gram=_gram_with_twins({3: 0, 1: 2, 5: 4}, 6))
    decision = get_method("m_smoe").decide(view, stats, Target(3, protect=frozenset({5})))
    assert decision.edit.sources == ((0, 3), (2, 1), (5, 4))  # 5 leads; 4, its twin, joins it


def test_m_smoe_merges_within_routing_groups():
    view = make_view(E=8, n_group=2, topk_group=1, seed=7)
    stats = stats_with([5, 4, 3, 2, 9, 1, 1, 1], logit_gram=_gram_with_twins({4: 0, 5: 1}, 8))
    decision = get_method("m_smoe").decide(view, stats, Target(4))
    for group in decision.edit.sources:
        assert len({e // 4 for e in group}) == 1, f"{group} crosses a routing group"
    assert len(decision.edit.sources) == 4


def test_m_smoe_without_statistics_is_refused():
    with pytest.raises(ValueError, match="logit Gram"):
        get_method("m_smoe").decide(make_view(E=4), stats_with([1, 1, 1, 1]), Target(2))


def _two_domain_stats(code_gram, math_gram, counts) -> LayerStats:
    """Statistics of sources code and math (each in half 0) with the same counts and their own Gram."""
    one = stats_with(counts)
    twice = {n: getattr(one, n).repeat(1, 2, 1) for n in ("tokens", "counts", "soft_counts", "gate_sums", "premoe_sums")}
    gram = torch.zeros(2, 2, len(counts), len(counts), dtype=F64)
    gram[0, 0], gram[0, 1] = code_gram, math_gram
    return dataclasses.replace(one, sources=("code", "math"), logit_gram=gram, **twice)


def test_m_smoe_on_some_domains_takes_their_similarity():
    """Expert 3 resembles expert 0 on code and expert 2 on math: restricted to a domain, M-SMoE
    joins it where that domain's router logits say (and on both, by the summed Gram)."""
    code, math_ = _gram_with_twins({3: 0, 1: 2}, 4, seed=1), _gram_with_twins({3: 2, 1: 0}, 4, seed=2)
    stats, target, view = _two_domain_stats(code, math_, [4, 1, 3, 1]), Target(2), make_view(E=4, seed=6)
    m_smoe = get_method("m_smoe", align=False)
    assert m_smoe.decide(view, stats.restricted(["code"]), target).edit.sources == ((0, 3), (2, 1))
    assert m_smoe.decide(view, stats.restricted(["math"]), target).edit.sources == ((0, 1), (2, 3))
    both = logit_similarity(code + math_)
    expected = m_smoe.decide(view, stats_with([8, 2, 6, 2], logit_gram=code + math_), target)
    assert m_smoe.decide(view, stats, target).edit.sources == expected.edit.sources
    assert torch.equal(logit_similarity(stats.gram()), both)


def test_m_smoe_on_some_domains_of_whole_data_gram_statistics_is_refused():
    """Statistics of an older moelab hold the Gram of all the data (whole_logit_gram [E, E]): used
    whole they still merge, restricted to some domains (or to a half) they are refused."""
    code, math_ = _gram_with_twins({3: 0, 1: 2}, 4, seed=1), _gram_with_twins({3: 2, 1: 0}, 4, seed=2)
    new = _two_domain_stats(code, math_, [4, 1, 3, 1])
    old = dataclasses.replace(new, logit_gram=None, whole_logit_gram=code + math_)
    view, m_smoe = make_view(E=4, seed=6), get_method("m_smoe", align=False)
    assert m_smoe.decide(view, old, Target(2)).edit.sources == m_smoe.decide(view, new, Target(2)).edit.sources
    assert m_smoe.decide(view, old.restricted(["math", "code"]), Target(2)).edit.sources == (
        m_smoe.decide(view, new, Target(2)).edit.sources
    )
    for stats, target in ((old.restricted(["math"]), Target(2)), (old, Target(2, halves=(0,)))):
        with pytest.raises(ValueError, match="all the calibration data only.*calibrate again"):
            m_smoe.decide(view, stats, target)


def test_mc_smoe_low_rank_stage():
    view = make_view(E=4, seed=8)
    stats = stats_with([4, 3, 2, 1], logit_gram=_gram_with_twins({2: 0, 3: 1}, 4))
    plain = get_method("m_smoe").decide(view, stats, Target(2))
    compressed = get_method("m_smoe", mc_rank=2, mc_sparse=0.0).decide(view, stats, Target(2))
    for g in range(2):
        W = plain.edit.view.experts.gate[g]
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(compressed.edit.view.experts.gate[g], (U[:, :2] * S[:2]) @ Vh[:2])
    notes = compressed.notes
    assert notes["compact_parameters"] == 2 * 3 * 2 * (5 + 8)  # 2 experts x 3 matrices x r (out + in)
    assert notes["stored_parameters"] == 2 * 3 * 5 * 8
    # at r >= out in / (out + in) = 40 / 13, or with many sparse rows, a matrix counts as stored (40):
    # gate and up are 5 x 8, down 8 x 5 (S keeps round(0.4 x 5) = 2 and round(0.4 x 8) = 3 rows)
    for options, per_expert in (
        ({"mc_rank": 3, "mc_sparse": 0.0}, 3 * 39),
        ({"mc_rank": 4, "mc_sparse": 0.0}, 3 * 40),
        ({"mc_rank": 1, "mc_sparse": 1.0}, 3 * 40),
        ({"mc_rank": 1, "mc_sparse": 0.4}, 2 * (13 + 2 * 8) + 13 + 3 * 5),
    ):
        notes = get_method("m_smoe", **options).decide(view, stats, Target(2)).notes
        assert notes == {"compact_parameters": 2 * per_expert, "stored_parameters": 2 * 3 * 40}, options


# ----------------------------------------------------------------------------- low rank + sparse


def test_low_rank_sparse_is_the_truncated_svd_plus_the_largest_residual_rows():
    view = make_view(E=2, I=6, D=9, seed=9)
    edit = LayerEdit(((0,), (1,)), view=view)
    same, _ = low_rank_sparse(edit, rank=6, sparse=0.0)
    torch.testing.assert_close(same.view.experts.down, view.experts.down, rtol=0, atol=1e-12)
    low, count = low_rank_sparse(edit, rank=2, sparse=0.0)
    for W, A in zip(view.experts.up, low.view.experts.up):  # Eckart-Young: the error is the tail
        S = torch.linalg.svdvals(W)
        assert float((W - A).norm()) == pytest.approx(float(S[2:].square().sum().sqrt()), rel=1e-10)
    assert count == 2 * 3 * 2 * (6 + 9)
    both, count = low_rank_sparse(edit, rank=2, sparse=0.5)  # S: half of each matrix's rows, whole
    for name, rows, cols in (("gate", 6, 9), ("down", 9, 6)):
        matrices = (getattr(edit.view.experts, name) for edit in (edit, low, both))
        for W, A, B in zip(*matrices):
            residual = W - A
            norms = sorted(((float(residual[i].norm()), i) for i in range(rows)), reverse=True)
            largest = sorted(i for _, i in norms[: round(0.5 * rows)])  # the rows whose loss costs most
            changed = sorted(i for i in range(rows) if (B[i] != A[i]).any())
            assert changed == largest, name
            torch.testing.assert_close(B[largest], W[largest], rtol=0, atol=1e-12)  # those rows exact
    assert count == 2 * (2 * min(2 * (6 + 9) + 3 * 9, 6 * 9) + (2 * (9 + 6) + round(4.5) * 6))  # 57 > 54 stored
    _, count = low_rank_sparse(edit, rank=2, sparse=0.3)  # S rows: round(1.8) = 2 of 6, round(2.7) = 3 of 9
    assert count == 2 * (2 * (2 * (6 + 9) + 2 * 9) + (2 * (9 + 6) + 3 * 6))
    with pytest.raises(ValueError, match="rank >= 1"):
        low_rank_sparse(edit, rank=0, sparse=0.1)


@pytest.mark.parametrize("I, D", [(6, 9), (32, 32), (1, 5), (96, 64)])
@pytest.mark.parametrize("sparse", [0.0, 0.3, 0.5, 0.9])
def test_check_rank_saves_refuses_exactly_the_ranks_whose_factors_fill_a_matrix(I, D, sparse):
    """The largest accepted rank, against a loop over ranks counting each matrix's factors and
    sparse rows (gate and up I x D, down D x I) against its size."""
    def saves(r):
        return all(r * (o + i) + round(sparse * o) * i < o * i for o, i in ((I, D), (D, I)))

    for r in range(1, I + D + 2):
        if saves(r):
            check_rank_saves("mc_rank", r, D, I, sparse)
        else:
            with pytest.raises(ValueError, match=f"mc_rank={r} saves nothing on experts of {I} x {D}") as refused:
                check_rank_saves("mc_rank", r, D, I, sparse)
            if not saves(1):  # the fix: a lower mc_sparse only where some rank saves without its rows
                lower_sparse = sparse > 0 and 1 * (I + D) < I * D
                assert ("lower mc_sparse" in str(refused.value)) == lower_sparse, str(refused.value)


# ----------------------------------------------------------------------------- HC-SMoE


def test_expert_features_are_mean_outputs_of_every_expert_on_every_token():
    view = make_view(E=4, seed=10)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    got = expert_features(view, x)
    for e in range(4):
        expected = sum(ffn(view, e, x[t]) for t in range(12)) / 12
        torch.testing.assert_close(got[e].double(), expected, rtol=1e-5, atol=1e-6)
    # Gemma 4's per-expert scales multiply each output, as a merge averages them (scale_folded)
    scale = torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=F64)
    scaled = dataclasses.replace(view, router=dataclasses.replace(view.router, expert_scale=scale))
    torch.testing.assert_close(expert_features(scaled, x), got * scale[:, None].float(), rtol=1e-6, atol=1e-7)


def test_expert_features_of_a_latent_block_are_projected_up_as_the_block_adds_them():
    """Nemotron 3 Super's latent MoE: each expert reads down @ x and adds up @ f_e to the output;
    its characteristic activation is the mean of the latter, in the model's space [D]."""
    inner, outer = make_view(E=4, D=3, seed=10), make_view(E=4, D=8, seed=11)
    g = torch.Generator().manual_seed(5)
    latent = LatentView(torch.randn(3, 8, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64))
    view = MoELayerView(0, outer.router, inner.experts, None, latent)
    x = torch.randn(12, 8, generator=g, dtype=F64)
    got = expert_features(view, x)
    assert got.shape == (4, 8)
    for e in range(4):
        expected = sum(latent.up @ ffn(inner, e, latent.down @ x[t]) for t in range(12)) / 12
        torch.testing.assert_close(got[e].double(), expected, rtol=1e-5, atol=1e-6)

def naive_agglomerative(points: np.ndarray, k: int, method: str) -> set[frozenset[int]]:
    """Merge the two closest clusters until k remain; cluster distance by linkage: average
    (mean pairwise), single (min), complete (max)."""
    reduce = {"average": np.mean, "single": np.min, "complete": np.max}[method]
    clusters = [[i] for i in range(len(points))]
    while len(clusters) > k:
        best = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            d = reduce([np.linalg.norm(points[i] - points[j]) for i in clusters[a] for j in clusters[b]])
            if best is None or d < best[0]:
                best = (d, a, b)
        _, a, b = best
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return {frozenset(c) for c in clusters}


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 9),
    method=st.sampled_from(["average", "single", "complete"]),
    data=st.data(),
)
def test_hierarchical_clustering_matches_naive_agglomeration(seed, n, method, data):
    k = data.draw(st.integers(1, n))
    points = np.random.default_rng(seed).normal(size=(n, 3))
    assert labels_to_partition(hierarchical_labels(points, k, method)) == naive_agglomerative(
        points, k, method
    )


def _layer_of_families(families: list[list[int]], seed: int):
    """A layer whose experts come in families of near-copies (expert = its family's first expert
    plus 1 % noise)."""
    view = make_view(E=sum(len(f) for f in families), seed=seed)
    g = torch.Generator().manual_seed(seed)
    tensors = {name: getattr(view.experts, name).clone() for name in ("gate", "up", "down")}
    for family in families:
        for e in family[1:]:
            for t in tensors.values():
                t[e] = t[family[0]] * (1 + 0.01 * torch.randn(t[e].shape, generator=g, dtype=F64))
    return dataclasses.replace(view, experts=dataclasses.replace(view.experts, **tensors))


@pytest.mark.parametrize("method", ["hc_smoe", "sub_moe"])
def test_output_clustering_finds_families_of_experts(method):
    view = _layer_of_families([[0, 3], [1, 4, 5], [2]], seed=11)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    stats = stats_with([1, 9, 5, 4, 2, 3], inputs=x)
    decision = get_method(method).decide(view, stats, Target(3))
    assert decision.edit.sources == ((1, 5, 4), (2,), (3, 0))  # led by the most used, ordered by leader
    assert decision.kept == [2] and decision.merge_groups == [[1, 5, 4], [3, 0]]
    for g, weights in ((0, {1: 9, 5: 3, 4: 2}), (2, {3: 4, 0: 1})):  # the usage counts, not another statistic
        for name in ("gate", "up", "down"):
            stacked = getattr(view.experts, name)
            expected = sum(w * stacked[e] for e, w in weights.items()) / sum(weights.values())
            torch.testing.assert_close(getattr(decision.edit.view.experts, name)[g], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("method", "groups_the_scaled_copy"), [("sub_moe", True), ("hc_smoe", False)])
def test_sub_moe_clusters_by_direction_and_hc_smoe_by_distance(method, groups_the_scaled_copy):
    """Expert 1 is expert 0 with its down projection 5x: its mean output has the same direction,
    4x the length away. Sub-MoE's K-means on normalised outputs (cosine) merges the two; HC-SMoE's
    Euclidean clustering does not."""
    view = make_view(E=4, seed=12)
    down = view.experts.down.clone()
    down[1] = 5 * down[0]
    gate, up = view.experts.gate.clone(), view.experts.up.clone()
    gate[1], up[1] = gate[0], up[0]
    view = dataclasses.replace(view, experts=dataclasses.replace(view.experts, gate=gate, up=up, down=down))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    decision = get_method(method).decide(view, stats_with([4, 3, 2, 1], inputs=x), Target(3))
    together = any({0, 1} <= set(group) for group in decision.merge_groups)
    assert together == groups_the_scaled_copy, decision.merge_groups


def test_clusters_by_usage_refuses_two_protected_experts_in_one_cluster():
    assert clusters_by_usage([4, 5, 6], [0, 1, 0], torch.tensor([0, 0, 0, 0, 1.0, 2, 3]), frozenset()) == [
        [5],
        [6, 4],
    ]
    with pytest.raises(ValueError, match=r"protected experts \[4, 6\] fell into one cluster"):
        clusters_by_usage([4, 5, 6], [0, 1, 0], torch.ones(7), frozenset({4, 6}))


@pytest.mark.parametrize("method", ["hc_smoe", "sub_moe"])
def test_protected_experts_of_one_family_stay_apart(method):
    """Super experts 1 and 4 are near-copies, so clustering put them in one cluster (an error, after
    the calibration): each now stays alone and the others are clustered into what is left; where
    the protected experts fill the layer's count, every other expert joins the nearest of them."""
    view = _layer_of_families([[0, 3], [1, 4, 5], [2]], seed=11)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    stats, m = stats_with([1, 9, 5, 4, 2, 3], inputs=x), get_method(method)
    apart = m.decide(view, stats, Target(4, protect=frozenset({1, 4})))
    assert apart.edit.sources == ((1,), (2, 5), (3, 0), (4,)) and apart.kept == [1, 4]
    assert m.decide(view, stats, Target(3, protect=frozenset({1, 4}))).edit.sources == ((1,), (2, 3, 5, 0), (4,))
    filled = m.decide(view, stats, Target(2, protect=frozenset({0, 1})))
    assert filled.edit.sources == ((0, 3), (1, 2, 5, 4))


def test_sparing_labels_keeps_protected_points_alone():
    """Points on a line, 0 and 1 protected: alone; the rest split by `cluster` into k - 2; with
    k = 2, each joins the nearest protected point; with k >= n, everyone alone."""
    points = np.array([[0.0], [10.0], [0.5], [9.0], [20.0], [21.0]])
    protected = [True, True, False, False, False, False]

    def halves(rest, k):  # a stand-in clustering: the first k - 1 alone, the rest together
        return np.minimum(np.arange(len(rest)), k - 1)

    assert sparing_labels(points, 3, protected, halves).tolist() == [0, 1, 2, 2, 2, 2]
    assert sparing_labels(points, 4, protected, halves).tolist() == [0, 1, 2, 3, 3, 3]
    assert sparing_labels(points, 2, protected, halves).tolist() == [0, 1, 0, 1, 1, 1]
    assert sparing_labels(points, 6, protected, halves).tolist() == [0, 1, 2, 3, 4, 5]
    assert sparing_labels(points, 2, [False] * 6, halves).tolist() == [0, 1, 1, 1, 1, 1]


def test_merging_methods_refuse_missing_inputs():
    with pytest.raises(ValueError, match="sampled layer inputs"):
        get_method("hc_smoe").decide(make_view(E=4), stats_with([1, 1, 1, 1]), Target(2))


# ----------------------------------------------------------------------------- Sub-MoE


def _naive_subspace_merge(W: list[torch.Tensor], w: list[float], r: int) -> torch.Tensor:
    """compression.md §3.2 steps 4-6, with explicit column slicing: W_cat = [W_1 ... W_m] = U S V^T,
    V_i^T = V^T[:, i*in:(i+1)*in], merged = U_r S_r (sum_i w_i V_i^T)[:r]."""
    inp = W[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(W, dim=1), full_matrices=False)
    v = sum(wi * Vh[:, i * inp : (i + 1) * inp] for i, wi in enumerate(w))
    return (U[:, :r] * S[:r]) @ v[:r]


def test_sub_moe_merge_follows_the_column_block_split():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(3, 7, 5, generator=g, dtype=F64)
    freq = torch.tensor([2.0, 1.0, 1.0], dtype=F64)
    w = [0.5, 0.25, 0.25]
    average = sum(wi * Wi for wi, Wi in zip(w, W))
    full = subspace_merge(W, [[0, 1, 2]], freq, rank=None)[0]
    torch.testing.assert_close(full, average, rtol=0, atol=1e-12)  # no truncation: plain averaging
    for r in (1, 3, 5):
        got = subspace_merge(W, [[0, 1, 2]], freq, rank=r)[0]
        torch.testing.assert_close(got, _naive_subspace_merge(list(W), w, r), rtol=0, atol=1e-12)
        U = torch.linalg.svd(torch.cat(list(W), dim=1), full_matrices=False).U[:, :r]
        torch.testing.assert_close(got, U @ U.T @ average, rtol=0, atol=1e-12)  # the projected average
    # the public re-implementation's reshape interleaves rows: a different matrix
    U, S, Vh = torch.linalg.svd(torch.cat(list(W), dim=1), full_matrices=False)
    buggy = (U * S) @ sum(wi * Vi for wi, Vi in zip(w, Vh.reshape(3, Vh.shape[0], -1)))
    assert (buggy - average).norm() > 0.1 * average.norm()


def test_sub_moe_folds_per_expert_scales_into_the_down_projections():
    """Gemma 4's per-expert scale multiplies each expert's output; the merged experts get scale 1, so
    Sub-MoE's subspace merge (untruncated: the usage-weighted average) is of the members' s_e down_e."""
    view = _layer_of_families([[0, 3], [1, 4, 5], [2]], seed=11)
    scale = torch.tensor([0.5, 2.0, -1.0, 1.5, 3.0, 0.25], dtype=F64)
    view = dataclasses.replace(view, router=dataclasses.replace(view.router, expert_scale=scale))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    counts = torch.tensor([1, 9, 5, 4, 2, 3], dtype=F64)
    decision = get_method("sub_moe").decide(view, stats_with(counts.tolist(), inputs=x), Target(3))
    assert torch.equal(decision.edit.view.router.expert_scale, torch.ones(3, dtype=F64))
    for g, group in enumerate(decision.edit.sources):
        w = counts[list(group)] / counts[list(group)].sum()
        expected = sum(wi * scale[e] * view.experts.down[e] for wi, e in zip(w, group))
        torch.testing.assert_close(decision.edit.view.experts.down[g], expected, rtol=1e-12, atol=1e-12)


def test_sub_moe_reports_the_factored_size():
    view = _layer_of_families([[0, 3], [1, 4, 5], [2]], seed=11)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    decision = get_method("sub_moe", rank=2).decide(view, stats_with([1, 9, 5, 4, 2, 3], inputs=x), Target(3))
    # per group and matrix: min(r, out, m * in) * (out + in); gate/up are 5 x 8, down 8 x 5
    assert decision.notes["compact_parameters"] == 3 * 3 * 2 * (5 + 8)
    assert decision.notes["stored_parameters"] == 3 * 3 * 5 * 8


@PROPERTY
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_kmeans_gives_exactly_k_clusters_reproducibly(seed, k):
    points = np.random.default_rng(seed).normal(size=(6, 4))
    labels = kmeans_labels(points, k, seed)
    assert len(set(labels.tolist())) == k
    assert np.array_equal(labels, kmeans_labels(points, k, seed))


def test_kmeans_finds_separated_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0], [0, 10], [-10, -10]])
    points = np.concatenate([c + 0.1 * rng.normal(size=(3, 2)) for c in centres])
    assert labels_to_partition(kmeans_labels(points, 3, 0)) == {
        frozenset({0, 1, 2}),
        frozenset({3, 4, 5}),
        frozenset({6, 7, 8}),
    }


def test_aligning_once_is_aligning_in_every_merge():
    """aligned_to keeps every expert's function, and merging its result without alignment is
    merging the original with alignment (what moelab's recipe relies on to align once)."""
    view = make_view(E=5, I=6, seed=7)
    aligned = aligned_to(view.experts, {3: 1, 4: 1, 2: 0})
    x = torch.randn(11, 8, dtype=F64)
    torch.testing.assert_close(moe_output(dataclasses.replace(view, experts=aligned), x), moe_output(view, x))
    groups, weights = [[0, 2], [1, 3, 4]], torch.tensor([3.0, 1, 2, 5, 1])
    once = merged_layer(dataclasses.replace(view, experts=aligned), groups, weights).view
    every = merged_layer(view, groups, weights, align=True).view
    for name in ("gate", "up", "down"):
        torch.testing.assert_close(getattr(once.experts, name), getattr(every.experts, name))


# ----------------------------------------------------------------------------- gaps found by mutation testing


def test_alignment_moves_expert_biases_with_their_neurons():
    """GPT-OSS experts carry gate/up biases per hidden neuron: permuting (and aligning) an expert
    must move them with their rows, or the expert computes something else."""
    view = make_view(E=3, I=6, seed=13)
    g = torch.Generator().manual_seed(7)
    experts = dataclasses.replace(
        view.experts,
        gate_bias=torch.randn(3, 6, generator=g, dtype=F64),
        up_bias=torch.randn(3, 6, generator=g, dtype=F64),
        down_bias=torch.randn(3, 8, generator=g, dtype=F64),
    )
    view = dataclasses.replace(view, experts=experts)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    shuffled = _permuted(one_expert(experts, 0), perm)
    assert torch.equal(shuffled.gate_bias[0], experts.gate_bias[0][perm])
    assert torch.equal(shuffled.up_bias[0], experts.up_bias[0][perm])
    assert torch.equal(shuffled.down_bias, experts.down_bias[:1])
    x = torch.randn(10, 8, generator=g, dtype=F64)
    aligned = dataclasses.replace(view, experts=aligned_to(experts, {1: 0, 2: 0}))
    torch.testing.assert_close(moe_output(aligned, x), moe_output(view, x), rtol=1e-12, atol=1e-12)


def test_m_smoe_similarity_is_the_cosine_not_the_inner_product():
    """Expert 2's logit column is expert 0's (cos ~ 1); expert 1's column is 100x longer and only
    partly aligned with it (cos ~ 0.3), so its raw inner product with expert 2 is ~30x larger. The
    paper's cosine joins 2 to 0."""
    g = torch.Generator().manual_seed(8)
    Z = torch.randn(50, 3, generator=g, dtype=F64)
    Z[:, 2] = Z[:, 0] + 0.05 * torch.randn(50, generator=g, dtype=F64)
    Z[:, 1] = 100 * (0.3 * Z[:, 0] + Z[:, 1])
    gram = Z.T @ Z
    assert gram[2, 1] > 10 * gram[2, 0]  # the inner product would pick expert 1
    stats = stats_with([5, 4, 1], logit_gram=gram)
    decision = get_method("m_smoe", align=False).decide(make_view(E=3, seed=6), stats, Target(2))
    assert decision.edit.sources == ((0, 2), (1,))


def test_m_smoe_ties_go_to_the_lower_id():
    """Counts tie for dominance (2, 2, 2): experts 0 and 1 lead; experts 2 (orthogonal to both)
    and 3 (equally like both) tie in similarity and join the lower id, 0."""
    Z = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=F64)  # tokens x E
    stats = stats_with([2, 2, 2, 1], logit_gram=Z.T @ Z)
    decision = get_method("m_smoe", align=False).decide(make_view(E=4, seed=6), stats, Target(2))
    assert decision.edit.sources == ((0, 2, 3), (1,))


@pytest.mark.parametrize("options", [{}, {"mc_sparse": 0.4}])
def test_mc_smoe_sparse_fraction_reaches_the_compression(options):
    """mc_sparse (default 0.1, the README's final_threshold: keep 10 % of S's rows) is the sparse
    fraction low_rank_sparse gets."""
    view = make_view(E=4, seed=8)
    stats = stats_with([4, 3, 2, 1], logit_gram=_gram_with_twins({2: 0, 3: 1}, 4))
    plain = get_method("m_smoe").decide(view, stats, Target(2))
    compressed = get_method("m_smoe", mc_rank=1, **options).decide(view, stats, Target(2))
    expected, _ = low_rank_sparse(plain.edit, 1, options.get("mc_sparse", 0.1))
    for name in ("gate", "up", "down"):
        torch.testing.assert_close(
            getattr(compressed.edit.view.experts, name), getattr(expected.view.experts, name), rtol=0, atol=0
        )


@pytest.mark.parametrize("method", ["average", "single", "complete"])
def test_hierarchical_clustering_matches_naive_agglomeration_on_fixed_cases(method):
    """Non-trivial sizes (the property test's derandomised draws are mostly k = 1 or k = n)."""
    for seed in range(15):
        points = np.random.default_rng(seed).normal(size=(8, 3))
        for k in (2, 3, 5):
            assert labels_to_partition(hierarchical_labels(points, k, method)) == naive_agglomerative(
                points, k, method
            ), (seed, k)


def test_hc_smoe_clusters_mean_outputs_with_the_chosen_linkage():
    """The partition HC-SMoE merges is the naive agglomeration of the experts' mean outputs with
    its linkage (average by default); on this layer the three linkages disagree."""
    view = make_view(E=8, seed=2)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2), dtype=F64).float()
    features = expert_features(view, x).double().numpy()
    expected = {m: naive_agglomerative(features, 3, m) for m in ("average", "single", "complete")}
    assert len(set(map(frozenset, expected.values()))) == 3
    stats = stats_with([8, 7, 6, 5, 4, 3, 2, 1], inputs=x)
    for method in (None, "average", "single", "complete"):
        options = {} if method is None else {"linkage": method}
        decision = get_method("hc_smoe", **options).decide(view, stats, Target(3))
        assert {frozenset(g) for g in decision.edit.sources} == expected[method or "average"], method


def test_hc_smoe_router_rows_and_protected_leaders():
    """Default router row: the members' usage-weighted average; router_rule=dominant: the leader's.
    A protected expert stays alone (its row and weights kept) even where its near-copy (3) would
    join it."""
    view = _layer_of_families([[0, 3], [1, 4, 5], [2]], seed=11)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    stats = stats_with([1, 9, 5, 4, 2, 3], inputs=x)
    weighted = get_method("hc_smoe").decide(view, stats, Target(3)).edit
    rows = view.router.weight
    torch.testing.assert_close(weighted.view.router.weight[0], (9 * rows[1] + 3 * rows[5] + 2 * rows[4]) / 14)
    torch.testing.assert_close(weighted.view.router.weight[2], (4 * rows[3] + rows[0]) / 5)
    protect = Target(3, protect=frozenset({0}))
    dominant = get_method("hc_smoe", router_rule="dominant").decide(view, stats, protect)
    assert dominant.edit.sources == ((0,), (1, 2, 5, 4), (3,))
    for g, lead in enumerate((0, 1, 3)):
        assert torch.equal(dominant.edit.view.router.weight[g], rows[lead])
    assert clusters_by_usage([4, 5, 6], [0, 1, 0], torch.tensor([0, 0, 0, 0, 1.0, 2, 3]), frozenset({4})) == [
        [4, 6],
        [5],
    ]


def test_merging_methods_refuse_all_zero_inputs():
    """Sampled inputs that are all zeros are a calibration without samples (the buffer's fill)."""
    with pytest.raises(ValueError, match="sampled layer inputs"):
        stats = stats_with([1, 1, 1, 1], inputs=torch.zeros(5, 8))
        get_method("sub_moe").decide(make_view(E=4), stats, Target(2))


def test_sub_moe_truncates_every_matrix_and_counts_the_factored_size():
    """With rank r each of gate, up and down is its group's subspace merge (§3.2 steps 4-6, column
    slices) with usage weights; the factored size is min(r, out, m * in) (out + in) per matrix."""
    view = _layer_of_families([[0, 3], [1, 4, 5], [2]], seed=11)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    counts = [1, 9, 5, 4, 2, 3]
    decision = get_method("sub_moe", rank=2).decide(view, stats_with(counts, inputs=x), Target(3))
    assert decision.edit.sources == ((1, 5, 4), (2,), (3, 0))
    for g, group in enumerate(decision.edit.sources):
        w = [counts[e] / sum(counts[e] for e in group) for e in group]
        for name in ("gate", "up", "down"):
            W = [getattr(view.experts, name)[e] for e in group]
            expected = _naive_subspace_merge(W, w, 2)
            got = getattr(decision.edit.view.experts, name)[g]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # a matrix counts min(r, out, m * in) (out + in), or out x in = 40 where that is smaller (from r = 4:
    # 4 x 13 > 40): never more than stored
    for rank, compact in ((3, 3 * 3 * 3 * 13), (4, 3 * 3 * 40), (100, 3 * 3 * 40)):
        notes = get_method("sub_moe", rank=rank).decide(view, stats_with(counts, inputs=x), Target(3)).notes
        assert notes == {"compact_parameters": compact, "stored_parameters": 3 * 3 * 40}, rank


def test_sub_moe_group_never_used_is_an_even_merge():
    W = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    got = subspace_merge(W, [[0, 1], [2]], torch.zeros(3, dtype=F64), rank=None)
    torch.testing.assert_close(got[0], (W[0] + W[1]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], W[2], rtol=0, atol=1e-12)


def test_low_rank_sparse_rank_above_the_matrix_rank_counts_the_matrix():
    """r = min(50, 6, 9) = 6 per matrix, whose factors (6 (6 + 9) = 90) are larger than the matrix (54)."""
    view = make_view(E=1, I=6, D=9, top_k=1, seed=9)
    edit = LayerEdit(((0,),), view=view)
    same, count = low_rank_sparse(edit, rank=50, sparse=0.0)
    assert count == 3 * 6 * 9
    torch.testing.assert_close(same.view.experts.gate, view.experts.gate, rtol=0, atol=1e-12)
    for sparse in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparse in \[0, 1\]"):
            low_rank_sparse(edit, rank=2, sparse=sparse)


def test_sub_moe_keeps_a_protected_expert_whole_at_any_rank():
    """A protected (super) expert stays alone, and with `rank` it is not truncated either: its
    matrices as they are (rank 2 of these 5 x 8 matrices changed them), counted whole (40 each)."""
    view = _layer_of_families([[0, 3], [1, 4, 5], [2]], seed=11)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5), dtype=F64).float()
    stats = stats_with([1, 9, 5, 4, 2, 3], inputs=x)
    decision = get_method("sub_moe", rank=2).decide(view, stats, Target(3, protect=frozenset({2})))
    alone = decision.edit.sources.index((2,))
    for name in ("gate", "up", "down"):
        assert torch.equal(getattr(decision.edit.view.experts, name)[alone], getattr(view.experts, name)[2]), name
    # the other two groups: 2 (5 + 8) = 26 a matrix
    assert decision.notes["compact_parameters"] == 3 * 40 + 2 * 3 * 26
