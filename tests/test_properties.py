"""Hypothesis property tests: random shapes and router settings, layer == naive reference
(forward and backward), plus invariants (shape, finiteness, load accounting)."""

import math

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import RefRouting, Spec, apply_capacity, assert_matches, run_both

from moelab.nn import MoEConfig, ScaledRMSNorm, build_moe, plan_dispatch
from moelab.nn.routers import min_group_size

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


@st.composite
def configs(draw):
    E = draw(st.integers(1, 16))
    router = draw(st.sampled_from(["topk", "topp", "expert_choice", "relu"]))
    kw = dict(
        dim=draw(st.sampled_from([4, 8, 12])),
        num_experts=E,
        hidden_dim=draw(st.sampled_from([4, 8])),
        router=router,
        activation=draw(st.sampled_from(["swiglu", "swiglu", "gelu", "silu", "relu"])),
        expert_mlp_bias=draw(st.booleans()),
        router_bias=draw(st.booleans()),
        backend=draw(st.sampled_from(["grouped", "loop", "grouped_mm"])),
        capacity_factor=draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 1.5]))),
        balance_coef=draw(st.sampled_from([0.0, 0.01])),
        z_coef=draw(st.sampled_from([0.0, 1e-3])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
    )
    if draw(st.booleans()):
        kw.update(num_shared=1, shared_gate=draw(st.booleans()))
    if router == "topk":
        Z = draw(st.sampled_from([0, 0, 1, 3]))  # identity experts (LongCat-Flash)
        E_choices = E + Z
        k = draw(st.integers(1, E_choices))
        kw.update(
            identity_experts=Z,
            top_k=k,
            score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
            renormalize=draw(st.booleans()),
            route_scale=draw(st.sampled_from([1.0, 2.5])),
            selection_bias=draw(st.booleans()),
        )
        group_score = draw(st.sampled_from([None, "max", "top2"]))
        least = min_group_size(kw["score_func"], 2, group_score)  # "top2" groups hold two experts at least
        groups = [g for g in range(2, E_choices + 1) if E_choices % g == 0 and E_choices // g >= least]
        if groups and draw(st.booleans()):
            n_group = draw(st.sampled_from(groups))
            min_groups = math.ceil(k / (E_choices // n_group))
            kw.update(n_group=n_group, topk_group=draw(st.integers(min_groups, n_group)), group_score=group_score)
    elif router == "topp":
        kw.update(
            top_p=draw(st.floats(0.05, 1.0)),
            max_k=draw(st.one_of(st.none(), st.integers(1, E))),
            renormalize=draw(st.booleans()),
        )
    elif router == "expert_choice":
        kw.update(ec_capacity_factor=draw(st.floats(0.1, float(E))))
    return MoEConfig(**kw)


def _with_norms(layer, dim: int, eps: float, g: torch.Generator) -> None:
    """Gemma 4's norms around a top-k layer's router and experts, and its per-expert weight scale."""
    router = layer.router
    router.input_norm = ScaledRMSNorm(dim, eps, multiplier=dim**-0.5)
    router.expert_scale = torch.nn.Parameter(1 + 0.5 * torch.randn(router.num_experts, generator=g))
    layer.expert_norm, layer.routed_norm = ScaledRMSNorm(dim, eps), ScaledRMSNorm(dim, eps)
    with torch.no_grad():
        router.weight.mul_(dim**0.5)  # the normed input is ~dim^-0.5 per entry
        for norm in (router.input_norm, layer.expert_norm, layer.routed_norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(dim, generator=g))


@settings(max_examples=40, **SETTINGS)
@given(cfg=configs(), T=st.integers(1, 40), seed=st.integers(0, 2**16), normed=st.booleans())
def test_layer_equals_reference(cfg, T, seed, normed):
    """normed: a top-k layer with Gemma 4's norms around its router and experts."""
    torch.manual_seed(seed)
    layer = build_moe(cfg)
    layer.trace = True
    g = torch.Generator().manual_seed(seed)
    normed = normed and cfg.router == "topk"
    if normed:
        _with_norms(layer, cfg.dim, 0.5, g)
    with torch.no_grad():
        layer.router.weight.mul_(2.0)
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if t is not None and (name.endswith("bias") or name == "router.norm_weight"):
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    x = torch.randn(T, cfg.dim, generator=g)
    spec = Spec.from_config(cfg)
    if normed:
        spec.norm_eps, spec.router_norm_multiplier = 0.5, cfg.dim**-0.5
    both = run_both(layer, spec, x)
    # float32 vs float64 may break a near-tie differently; such examples prove nothing
    assume(both.ref.routing.safe_margin(ordered=cfg.capacity_factor is not None) > 1e-6)
    assume(both.ref.routing.min_rms > 1e-2)

    y, result = both.y, both.result
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert all(torch.isfinite(v) for v in result.losses.values())
    E = layer.num_experts  # identity experts' slots are no assignments
    valid = int(((result.routing.indices >= 0) & (result.routing.indices < E)).sum())
    expected = sum(e < E for t in range(T) for e in both.ref.routing.experts(t))
    assert int(result.tokens_per_expert.sum()) == valid == expected
    assert 0.0 <= float(result.dropped_fraction) <= 1.0
    # The ReLU router's RMS norm saturates (a_hat ~ sqrt(E) for a token with one active
    # expert): its true gradient is ~0, computed as a difference of O(1/a) terms, so float32
    # keeps ~4 fewer digits there than elsewhere. 1e-4 for its gradients, 1e-5 for everything else.
    assert_matches(both, layer, grad_tol=1e-4 if cfg.router == "relu" else None)


@st.composite
def index_tables(draw):
    E = draw(st.integers(1, 16))
    T = draw(st.integers(0, 40))
    K = draw(st.integers(1, E))
    rows = [draw(st.permutations(range(E)))[:K] for _ in range(T)]
    empty = draw(st.floats(0.0, 1.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    idx = torch.tensor(rows, dtype=torch.long).reshape(T, K)
    idx = idx.masked_fill(torch.rand(T, K, generator=g) < empty, -1)
    return idx, E


@settings(max_examples=150, **SETTINGS)
@given(table=index_tables(), cf=st.one_of(st.none(), st.floats(0.05, 4.0)))
def test_plan_dispatch_equals_reference(table, cf):
    indices, E = table
    T, K = indices.shape
    plan = plan_dispatch(indices, E, cf)
    choices = [[(j, int(e), None) for j, e in enumerate(row.tolist()) if e >= 0] for row in indices]
    ref = apply_capacity(RefRouting(choices, torch.zeros(T, 0), torch.zeros(T, 0), K), E, cf)
    kept = {(t, j) for t in range(T) for j in range(K) if plan.slot_rows[t * K + j] < plan.num_rows}
    assert kept == ref.kept
    assert int(plan.tokens_per_expert.sum()) == int((indices >= 0).sum())
    assert sum(plan.counts) == plan.num_rows == len(ref.kept)
    assert abs(float(plan.dropped_fraction) - ref.dropped_fraction) < 1e-6
