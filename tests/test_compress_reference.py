"""moelab.compress against naive references: the eager MoE pass, every calibration statistic
(recomputed token by token with Python loops from `tests/reference.py`), `combine`, every
scoring method on hand-made statistics, `select_top`, `plan_target`, NAEE against a brute-force
search, and hypothesis properties of the statistics."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_views import make_view
from reference import (
    F64,
    Spec,
    assert_close,
    assert_no_near_tie,
    expert_ffn,
    f64_leaves,
    moe_forward,
    rms_normed,
    route,
    sigmoid,
    silu,
)

from moelab.compress.methods import METHODS, Target, get_method, plan_target, select_top
from moelab.compress.methods.base import ScoringMethod, check_protected, super_expert_ids
from moelab.compress.observers import (
    DEFAULT_OBSERVERS,
    OBSERVERS,
    SKIP_BINS,
    Tokens,
    combine,
    eager_moe,
    per_expert,
)
from moelab.compress.stats import PER_SOURCE, LayerStats, layer_stats
from moelab.hf.native import moe_layer_from_view
from moelab.hf.view import IdentityRows, MoELayerView, RouterView
from moelab.nn import HashRouter, MoEConfig, MoELayer, ScaledRMSNorm, SwiGLUExperts, TopKRouter, build_moe
from moelab.nn.routers import Routing

SUMS = ("counts", "soft_counts", "gate_sums", "premoe_sums", "ean_sums", "reap_sums", "easyep_sums")
PROPERTY = settings(
    settings.get_profile("ci"),
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny layers: one intra-op thread is faster on the project's 2-core machine."""


# ----------------------------------------------------------------------------- layers


def spec_of(view: MoELayerView) -> Spec:
    r = view.router
    return Spec(
        top_k=r.top_k,
        score_func=r.score_func,
        renormalize=r.renormalize,
        route_scale=r.route_scale,
        n_group=r.n_group,
        topk_group=r.topk_group,
    )


def params(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layer's parameters and buffers as float64 constants (reference.py's names)."""
    return {k: v.detach() for k, v in f64_leaves(layer).items()}


def shared_down(x_t: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The shared experts' down projection on one token, before any sigmoid gate."""
    return p["shared.down_proj.weight"] @ (
        silu(p["shared.gate_proj.weight"] @ x_t) * (p["shared.up_proj.weight"] @ x_t)
    )


@dataclasses.dataclass
class Batch:
    """One MoE call: x [T, D] its input, tokens, h [T, D] the residual stream entering the block."""

    x: torch.Tensor
    tokens: Tokens
    h: torch.Tensor


def make_batches(D: int, sizes: list[int], S: int, dtype: torch.dtype, seed: int = 1) -> list[Batch]:
    """Calls of `sizes` tokens; global positions are a permutation of range(sum(sizes)), spread
    over the calls, so that a statistic indexed by position cannot rely on call order."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    positions = torch.randperm(total, generator=g)
    batches, start = [], 0
    for n in sizes:
        x = torch.randn(n, D, generator=g, dtype=F64).to(dtype)
        h = torch.randn(n, D, generator=g, dtype=F64).to(dtype)
        tok = Tokens(
            torch.randint(0, S, (n,), generator=g),
            torch.randint(0, 2, (n,), generator=g),
            positions[start : start + n],
        )
        batches.append(Batch(x, tok, h))
        start += n
    return batches


# ----------------------------------------------------------------------------- naive statistics


def observe(layer: MoELayer, batches: list[Batch], S: int, options: dict, names=DEFAULT_OBSERVERS) -> dict:
    """The observers' results after seeing every batch (the decoder layer's output being h + block)."""
    E, D = layer.router.weight.shape
    observers = [OBSERVERS[n](E, S, D, options) for n in names]
    with torch.no_grad():
        for b in batches:
            call = eager_moe(layer, b.x)
            out = b.h + call.output
            for o in observers:
                o.update(call, b.tokens, out)
    return {k: v for o in observers for k, v in o.result().items()}


def observed_stats(view: MoELayerView, sizes: list[int], dtype: torch.dtype, seed: int) -> LayerStats:
    """A layer's statistics over calls of `sizes` tokens (2 sources; every token's input sampled)
    from the forward observers, plus random HEAPr neuron sums (zero for experts no token chose;
    activation and gradient sums differ)."""
    S = 2
    batches = make_batches(view.experts.dim, sizes, S, dtype, seed=seed)
    options = {"total_tokens": sum(sizes), "sample_tokens": sum(sizes)}
    stats = layer_stats(0, ("a", "b"), observe(moe_layer_from_view(view), batches, S, options, DEFAULT_OBSERVERS))
    shape = (2, S, view.experts.num_experts, view.experts.hidden_dim)
    neurons = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * (stats.counts[..., None] > 0)
    stats.neuron_act_sums, stats.neuron_grad_sums = neurons, neurons.flip(-1)
    return stats


def naive_stats(layer: MoELayer, spec: Spec, batches: list[Batch], S: int, options: dict) -> dict:
    """Every statistic of `moelab.compress.observers`, token by token, slot by slot, from the
    definitions (compression.md §1, §5, §6.1-6.4), in float64."""
    p = params(layer)
    E, D = p["router.weight"].shape
    scale_input = getattr(layer.experts, "scale_input", False)
    has_shared = "shared.gate_proj.weight" in p
    sums = {name: torch.zeros(2, S, E, dtype=F64) for name in SUMS}
    tokens = torch.zeros(2, S, dtype=F64)
    skip = [0] * SKIP_BINS
    max_output = [0.0] * E
    shared_max = 0.0
    total, wanted = options["total_tokens"], options["sample_tokens"]
    size = min(wanted, total)
    sampled = {i * total // size: i for i in range(size)}  # position floor(i * total / N) -> row i
    inputs = torch.zeros(size, D, dtype=torch.float32)
    input_sources = torch.zeros(size, dtype=torch.int64)
    logit_gram = torch.zeros(2, S, E, E, dtype=F64)
    for b in batches:
        x = b.x.to(F64)
        R = route(x, p, spec)
        assert_no_near_tie(R, ordered=False)
        for t in range(x.shape[0]):
            s, half, pos = int(b.tokens.source[t]), int(b.tokens.half[t]), int(b.tokens.position[t])
            tokens[half, s] += 1
            for e in range(E):
                sums["soft_counts"][half, s, e] += float(R.probs[t, e])
                for j in range(E):
                    logit_gram[half, s, e, j] += float(R.logits[t, e]) * float(R.logits[t, j])
            routed = torch.zeros(D, dtype=F64)
            norms = []
            for _, e, w in R.choices[t]:
                w = float(w)
                f = expert_ffn(w * x[t] if scale_input else x[t], e, p)
                c = f if scale_input else w * f
                sums["counts"][half, s, e] += 1
                sums["gate_sums"][half, s, e] += w
                sums["premoe_sums"][half, s, e] += float(R.logits[t, e])
                sums["ean_sums"][half, s, e] += float(f.norm())
                sums["reap_sums"][half, s, e] += float(c.norm())
                max_output[e] = max(max_output[e], float(f.abs().max()))
                routed = routed + c
                norms.append((e, float(c.norm())))
            if R.num_slots >= 2:
                ws = sorted((abs(float(w)) for _, _, w in R.choices[t]), reverse=True) + [0.0, 0.0]
                ratio = ws[1] / ws[0] if ws[0] > 0 else 0.0
                skip[min(int(ratio * SKIP_BINS), SKIP_BINS - 1)] += 1
            if has_shared:
                shared_max = max(shared_max, float(shared_down(x[t], p).abs().max()))
            h = b.h[t].to(F64)
            cos = float(h @ (h + routed)) / max(float(h.norm()) * float((h + routed).norm()), 1e-8)
            turn = max(0.0, 1.0 - cos)
            for e, n in norms:
                sums["easyep_sums"][half, s, e] += n * turn
            if pos in sampled:
                inputs[sampled[pos]] = b.x[t].float()
                input_sources[sampled[pos]] = s
    return {
        "tokens": tokens,
        **sums,
        "skip_ratios": torch.tensor(skip, dtype=F64),
        "max_output": torch.tensor(max_output, dtype=F64),
        "shared_max": torch.tensor([shared_max], dtype=F64),
        "inputs": inputs,
        "input_sources": input_sources,
        "logit_gram": logit_gram,
    }


def check_stats(got: dict, expected: dict, tol: float, exact_skip: bool = True) -> None:
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for name in ("tokens", "counts", "input_sources"):
        assert torch.equal(got[name], expected[name]), f"{name}: {got[name]} != {expected[name]}"
    if exact_skip:
        assert torch.equal(got["skip_ratios"], expected["skip_ratios"]), "skip_ratios histogram"
    else:
        assert float(got["skip_ratios"].sum()) == float(expected["skip_ratios"].sum())
    for name in (
        "soft_counts",
        "gate_sums",
        "premoe_sums",
        "ean_sums",
        "reap_sums",
        "easyep_sums",
        "max_output",
        "shared_max",
        "inputs",
        "logit_gram",
    ):
        assert got[name].shape == expected[name].shape, name
        assert_close(got[name], expected[name], atol=tol, rtol=tol, what=name)


# ----------------------------------------------------------------------------- 1. eager_moe


def _group_cfg(**kw) -> MoEConfig:
    return MoEConfig(dim=8, num_experts=8, hidden_dim=6, balance_coef=0.0, **kw)


EAGER_LAYERS = {
    "softmax_renormalised": lambda: build_moe(_group_cfg(top_k=2, renormalize=True)),
    "softmax_raw": lambda: build_moe(_group_cfg(top_k=3, renormalize=False)),
    "sigmoid_groups": lambda: build_moe(
        _group_cfg(
            top_k=2, score_func="sigmoid", n_group=4, topk_group=2, selection_bias=True, route_scale=2.5
        )
    ),
    "softmax_groups": lambda: build_moe(_group_cfg(top_k=2, n_group=2, topk_group=1)),
    "shared": lambda: build_moe(_group_cfg(top_k=2, num_shared=1)),
    "shared_gated": lambda: build_moe(_group_cfg(top_k=2, num_shared=2, shared_gate=True)),
    "top_p_empty_slots": lambda: build_moe(_group_cfg(router="topp", top_p=0.3, max_k=4)),
    "scale_input": lambda: MoELayer(
        TopKRouter(8, 8, 1, renormalize=False), SwiGLUExperts(8, 8, 6, scale_input=True)
    ),
}


def _eager_layer(name: str) -> tuple[MoELayer, Spec]:
    torch.manual_seed(3)
    layer = EAGER_LAYERS[name]().double().eval()
    if getattr(layer.router, "selection_bias", None) is not None:
        layer.router.selection_bias.normal_(0, 0.1)
    r = layer.router
    if name == "top_p_empty_slots":
        spec = Spec(router="topp", top_p=0.3, max_k=4, renormalize=False)
    else:
        spec = Spec(
            top_k=r.top_k,
            score_func=r.score_func,
            renormalize=r.renormalize,
            route_scale=r.route_scale,
            n_group=r.n_group,
            topk_group=r.topk_group,
        )
    return layer, spec


@pytest.mark.parametrize("name", list(EAGER_LAYERS))
def test_eager_moe_equals_layer_and_naive_slots(name):
    layer, spec = _eager_layer(name)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        call = eager_moe(layer, x)
        y = layer(x)[0]
    T, K = 15, layer.router.top_k
    assert call.output.shape == (T, 8) and call.outputs.shape == (T, K, 8) == call.contributions.shape
    torch.testing.assert_close(call.output, y.reshape(T, 8), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(call.routed + (0 if call.shared is None else call.shared), call.output)
    # Every slot against the naive MLP of its expert on its token; the routing against the reference.
    p = params(layer)
    xt = x.reshape(T, 8)
    R = route(xt, p, spec)
    assert_no_near_tie(R, ordered=True)
    scale_input = name == "scale_input"
    empty = 0
    for t in range(T):
        chosen = {e: float(w) for _, e, w in R.choices[t]}
        got = {int(e): float(w) for e, w in zip(call.routing.indices[t], call.routing.weights[t]) if e >= 0}
        assert got.keys() == chosen.keys(), (t, got, chosen)
        for e, w in got.items():
            assert w == pytest.approx(chosen[e], rel=1e-6)
        for k in range(K):
            e, w = int(call.routing.indices[t, k]), float(call.routing.weights[t, k])
            if e < 0:
                empty += 1
                assert not call.outputs[t, k].any() and not call.contributions[t, k].any(), (
                    "empty slot not zero"
                )
                continue
            expected = expert_ffn(w * xt[t] if scale_input else xt[t], e, p)
            assert_close(call.outputs[t, k], expected, atol=1e-12, rtol=1e-12, what=f"output t={t} k={k}")
            contribution = expected if scale_input else w * expected
            assert_close(call.contributions[t, k], contribution, atol=1e-12, rtol=1e-12, what="contribution")
    assert (empty > 0) == (name == "top_p_empty_slots")
    if "shared" in name:
        for t in range(T):
            down = shared_down(xt[t], p)
            assert_close(call.shared_down[t], down, atol=1e-12, rtol=1e-12, what="shared_down")
            gate = sigmoid(p["shared.gate.weight"][0] @ xt[t]) if "gated" in name else 1.0
            assert_close(call.shared[t], gate * down, atol=1e-12, rtol=1e-12, what="shared")
        assert ("gated" in name) == (not torch.allclose(call.shared, call.shared_down))
    else:
        assert call.shared is None and call.shared_down is None


def test_eager_moe_of_a_block_with_norms_around_its_experts():
    """Gemma 4's form: each slot's output is its expert on the experts' norm of x, the block's output
    the routed norm of the weighted sum (what the layer computes), and the EASY-EP observer, which
    cannot tell the residual apart in such a layer, keeps nothing."""
    torch.manual_seed(3)
    layer = MoELayer(
        TopKRouter(8, 8, 2, expert_scale=True, input_norm=ScaledRMSNorm(8, 0.5, multiplier=8**-0.5)),
        SwiGLUExperts(8, 8, 6),
        expert_norm=ScaledRMSNorm(8, 0.5),
        routed_norm=ScaledRMSNorm(8, 0.5),
    ).double().eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("scale", "norm.weight")):
                p.normal_(1, 0.5)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        call = eager_moe(layer, x)
        torch.testing.assert_close(call.output, layer(x)[0], atol=1e-12, rtol=1e-12)
    p = params(layer)
    for t in range(12):
        normed = rms_normed(x[t], p["expert_norm.weight"], 0.5)
        for k in range(2):
            e = int(call.routing.indices[t, k])
            assert_close(call.outputs[t, k], expert_ffn(normed, e, p), atol=1e-12, rtol=1e-12, what=f"t={t} k={k}")
        assert_close(call.output[t], rms_normed(call.routed[t], p["routed_norm.weight"], 0.5), 1e-12, 1e-12)
    observer = OBSERVERS["contribution"](8, 1, 8, {})
    tokens = Tokens(torch.zeros(12, dtype=torch.long), torch.zeros(12, dtype=torch.long), torch.arange(12))
    observer.update(call, tokens, x + call.output)
    assert observer.result() == {}


def test_eager_moe_scale_input_is_not_output_scaling():
    """Llama 4: f(w x) differs from w f(x); the eager pass must take the weight on the input."""
    layer, _ = _eager_layer("scale_input")
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    layer.router.weight.data *= 0.3  # top-1 softmax weights well below 1
    with torch.no_grad():
        call = eager_moe(layer, x)
    p = params(layer)
    for t in range(6):
        e, w = int(call.routing.indices[t, 0]), float(call.routing.weights[t, 0])
        assert w < 0.9
        assert not torch.allclose(call.outputs[t, 0], w * expert_ffn(x[t], e, p), atol=1e-6)
        torch.testing.assert_close(call.contributions[t, 0], call.outputs[t, 0])


def test_eager_moe_float32_and_bfloat16_layers():
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        layer, _ = _eager_layer("shared_gated")
        layer = layer.to(dtype)
        x = torch.randn(10, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
        with torch.no_grad():
            call = eager_moe(layer, x)
            y = layer(x)[0]
        assert call.outputs.dtype == dtype
        assert_close(call.output.float(), y.float(), atol=tol, rtol=tol, what=str(dtype))


# ----------------------------------------------------------------------------- 2. observers


OBSERVER_LAYERS = {
    "softmax_renormalised": {},
    "softmax_raw": {"renormalize": False, "top_k": 3},
    "sigmoid_groups": {
        "E": 8,
        "score_func": "sigmoid",
        "n_group": 4,
        "topk_group": 2,
        "selection_bias": True,
        "route_scale": 2.5,
    },
    "shared_gated": {"shared": True, "shared_gate": True},
    "shared": {"shared": True, "renormalize": False},
    "scale_input": {"scale_input": True, "top_k": 1, "renormalize": False},
    "expert_without_tokens": {"router_bias": {2: -30.0}},
    "all_tokens_to_one_expert": {"top_k": 1, "router_bias": {4: 30.0}},
    "k_equals_E": {"E": 4, "top_k": 4, "renormalize": False},
}


@pytest.mark.parametrize("name", list(OBSERVER_LAYERS))
def test_observers_equal_naive_loops(name):
    S = 3
    view = make_view(**OBSERVER_LAYERS[name], seed=11)
    layer = moe_layer_from_view(view)
    batches = make_batches(view.experts.dim, [9, 14, 7], S, F64)
    options = {"total_tokens": 30, "sample_tokens": 7}  # positions 0, 4, 8, 12, 17, 21, 25
    got = observe(layer, batches, S, options)
    expected = naive_stats(layer, spec_of(view), batches, S, options)
    check_stats(got, expected, tol=1e-5)
    E, K = view.router.num_experts, view.router.top_k
    # The case's point holds in the data, so that the comparison above covers it.
    counts = got["counts"].sum((0, 1))
    assert float(got["tokens"].sum()) == 30 and float(counts.sum()) == 30 * K
    assert (got["tokens"] > 0).all(), "every (half, source) cell has tokens"
    if name == "expert_without_tokens":
        assert counts[2] == 0
        for field in ("gate_sums", "premoe_sums", "ean_sums", "reap_sums", "easyep_sums"):
            assert not got[field][..., 2].any(), field
        assert got["max_output"][2] == 0 and (got["max_output"][[0, 1, 3, 4, 5]] > 0).all()
    if name == "all_tokens_to_one_expert":
        assert counts.tolist() == [0, 0, 0, 0, 30, 0]
        assert not got["skip_ratios"].any()  # k = 1: no second weight
    if name == "k_equals_E":
        assert counts.tolist() == [30] * E
        torch.testing.assert_close(got["counts"], got["tokens"][..., None].expand(2, S, E))
        # Every expert on every token, unrenormalised: gate sums are the soft counts.
        torch.testing.assert_close(got["gate_sums"], got["soft_counts"], rtol=1e-6, atol=1e-6)
    if view.shared is None:
        assert got["shared_max"].tolist() == [0.0]
    else:
        assert float(got["shared_max"]) > 0
    sample = torch.cat([b.x for b in batches])[torch.argsort(torch.cat([b.tokens.position for b in batches]))]
    torch.testing.assert_close(got["inputs"], sample[[0, 4, 8, 12, 17, 21, 25]].float(), rtol=0, atol=0)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_soft_counts_are_the_routers_probabilities_from_the_logits(score_func):
    """Written out from the router's weight alone: softmax of x W^T, or for a sigmoid router
    sigmoid(x W^T) normalised to sum 1 per token (the router's own probabilities), summed per
    half and source. A selection bias shifts the choice, never these probabilities."""
    view = make_view(E=6, score_func=score_func, selection_bias=score_func == "sigmoid", seed=3)
    batches = make_batches(view.experts.dim, [9, 7], 2, F64, seed=4)
    got = observe(moe_layer_from_view(view), batches, 2, {"total_tokens": 16, "sample_tokens": 4})
    expected = torch.zeros(2, 2, 6, dtype=F64)
    for b in batches:
        for t in range(b.x.shape[0]):
            z = [float(b.x[t].double() @ view.router.weight[e].double()) for e in range(6)]
            if score_func == "softmax":
                p = [math.exp(v - max(z)) for v in z]
            else:
                p = [1 / (1 + math.exp(-v)) for v in z]
            expected[int(b.tokens.half[t]), int(b.tokens.source[t])] += torch.tensor(p, dtype=F64) / sum(p)
    torch.testing.assert_close(got["soft_counts"], expected, rtol=1e-5, atol=1e-6)


def test_observers_single_token():
    view = make_view(seed=5)
    layer = moe_layer_from_view(view)
    batches = make_batches(view.experts.dim, [1], 2, F64, seed=7)
    options = {"total_tokens": 1, "sample_tokens": 4}
    got = observe(layer, batches, 2, options)
    check_stats(got, naive_stats(layer, spec_of(view), batches, 2, options), tol=1e-5)
    assert float(got["tokens"].sum()) == 1 and float(got["counts"].sum()) == 2
    assert got["inputs"].shape == (1, view.experts.dim)
    assert float(got["skip_ratios"].sum()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_observers_low_precision_layers(dtype):
    """fp32 and bf16 layers: the statistics are those of the naive float64 computation on the
    same (rounded) weights, within the precision of the layer's dtype."""
    S = 2
    view = make_view(shared=True, seed=21, dtype=dtype)
    layer = moe_layer_from_view(view)
    assert layer.experts.gate_up_proj.dtype == dtype
    batches = make_batches(view.experts.dim, [12, 8], S, dtype, seed=3)
    options = {"total_tokens": 20, "sample_tokens": 20}
    got = observe(layer, batches, S, options)
    expected = naive_stats(layer, spec_of(view), batches, S, options)
    check_stats(got, expected, tol=1e-5 if dtype == torch.float32 else 4e-2)
    for name, value in got.items():  # statistics in full precision, whatever the layer's
        assert value.dtype in (F64, torch.float32, torch.int64 if name == "input_sources" else F64), name
        assert torch.isfinite(value).all(), name


def test_observers_top_p_empty_slots():
    """A variable-k router: empty slots add to no statistic."""
    S = 2
    torch.manual_seed(0)
    layer = build_moe(_group_cfg(router="topp", top_p=0.3, max_k=4)).double()
    batches = make_batches(8, [10, 10], S, F64, seed=9)
    options = {"total_tokens": 20, "sample_tokens": 5}
    got = observe(layer, batches, S, options)
    expected = naive_stats(
        layer, Spec(router="topp", top_p=0.3, max_k=4, renormalize=False), batches, S, options
    )
    check_stats(got, expected, tol=1e-5)
    assert 20 <= float(got["counts"].sum()) < 20 * 4


def test_input_sample_positions():
    """N positions spread evenly over all T tokens: floor(i * T / N) for i < N (all, if N >= T)."""
    view = make_view(seed=2)
    layer = moe_layer_from_view(view)
    batches = make_batches(view.experts.dim, [13, 10, 9], 1, F64, seed=4)
    everything = torch.cat([b.x for b in batches])[
        torch.argsort(torch.cat([b.tokens.position for b in batches]))
    ]
    for wanted, positions in (
        (5, [0, 6, 12, 19, 25]),
        (7, [0, 4, 9, 13, 18, 22, 27]),
        (20, [i * 32 // 20 for i in range(20)]),
        (40, list(range(32))),
        (1, [0]),
    ):
        got = observe(layer, batches, 1, {"total_tokens": 32, "sample_tokens": wanted}, names=("inputs",))
        assert got["inputs"].shape == (len(positions), 8)
        torch.testing.assert_close(got["inputs"], everything[positions].float(), rtol=0, atol=0)
    got = observe(layer, batches, 1, {"total_tokens": 32, "sample_tokens": 20}, names=("inputs",))
    assert (got["inputs"][-1] == everything[30].float()).all(), "the sample reaches the end of the data"


def test_input_sample_keeps_the_token_ids_a_hash_router_reads():
    """A hash-routed layer (DeepSeek-V4's) is re-run on its sampled inputs with their token ids, so
    the sample records them beside the inputs (the routing of those tokens follows from them); a
    layer routed by its gate records none."""
    view = make_view(seed=2)
    layer = moe_layer_from_view(view)
    E, D = layer.router.weight.shape
    batches = make_batches(D, [13, 10, 9], 1, F64, seed=4)
    ids = [torch.randint(0, 50, (b.x.shape[0],), generator=torch.Generator().manual_seed(i)) for i, b in enumerate(batches)]
    order = torch.argsort(torch.cat([b.tokens.position for b in batches]))
    positions = [0, 4, 9, 13, 18, 22, 27]
    options = {"total_tokens": 32, "sample_tokens": 7}
    assert "router_inputs" not in observe(layer, batches, 1, options, names=("inputs",))
    layer.router = HashRouter(D, E, 50, view.router.top_k)
    sample = OBSERVERS["inputs"](E, 1, D, options)
    with torch.no_grad():
        for b, token_ids in zip(batches, ids):
            call = eager_moe(layer, b.x, context={"input_ids": token_ids})
            assert torch.equal(call.routing.indices, layer.router.token_experts[token_ids])
            sample.update(call, b.tokens, b.h + call.output)
    got = sample.result()
    assert torch.equal(got["router_inputs"], torch.cat(ids)[order][positions])
    torch.testing.assert_close(got["inputs"], torch.cat([b.x for b in batches])[order][positions].float(), rtol=0, atol=0)


def test_skip_ratios_compare_weight_magnitudes_as_dynamic_skip_does():
    """A combine weight may be negative (a learned per-expert scale, Gemma 4's, takes either sign):
    the histogram counts |second| / |first| by magnitude, the ratio `dynamic_skip` compares."""
    from moelab.compress.observers import MoECall
    from moelab.nn.routers import dynamic_skip

    indices = torch.tensor([[0, 1], [2, 0], [1, 2]])
    weights = torch.tensor([[-0.75, 0.375], [0.5, -0.125], [0.25, -0.5]])  # ratios 0.5, 0.25, 0.5
    routing = Routing(indices, weights, torch.zeros(3, 3), torch.zeros(3, 3))
    call = MoECall(torch.zeros(3, 4), routing, torch.zeros(3, 2, 4), None, None)
    zeros = torch.zeros(3, dtype=torch.long)
    observer = OBSERVERS["routing"](3, 1, 4, {})
    observer.update(call, Tokens(zeros, zeros, torch.arange(3)), call.output)
    expected = torch.zeros(SKIP_BINS, dtype=F64)
    expected[50], expected[25] = 2, 1
    assert torch.equal(observer.result()["skip_ratios"], expected)
    assert dynamic_skip(routing, 0.3).indices.tolist() == [[0, 1], [2, -1], [1, 2]]  # 0.25 < 0.3 alone goes


def test_per_expert_skips_empty_slots():
    """Slot values land on their slot's expert; an empty slot (-1) adds nothing, whatever its value."""
    indices = torch.tensor([[2, 0], [1, -1], [-1, -1]])
    values = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0]])
    routing = Routing(indices, torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3, 3))
    assert per_expert(routing, values, 3).tolist() == [[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- 3. combine


ROUTER_FLOAT32_SUMS = ("soft_counts", "gate_sums", "premoe_sums", "logit_gram", "reap_sums", "easyep_sums")


@pytest.mark.parametrize("name", ["shared_gated", "sigmoid_groups"])
def test_combine_of_disjoint_parts_is_the_whole(name):
    S = 2
    view = make_view(**OBSERVER_LAYERS[name], seed=13)
    layer = moe_layer_from_view(view)
    batches = make_batches(view.experts.dim, [11, 9], S, F64, seed=5)
    options = {"total_tokens": 20, "sample_tokens": 10}
    whole = observe(layer, batches, S, options)

    def part(keep):  # the tokens of every call for which keep(position) holds
        out = []
        for b in batches:
            m = keep(b.tokens.position)
            out.append(
                Batch(b.x[m], Tokens(b.tokens.source[m], b.tokens.half[m], b.tokens.position[m]), b.h[m])
            )
        return out

    splits = [
        (part(lambda pos: pos % 2 == 0), part(lambda pos: pos % 2 == 1)),  # interleaved tokens
        (batches[:1], batches[1:]),  # whole calls, as two processes would
    ]
    for a, b in splits:
        sa, sb = observe(layer, a, S, options), observe(layer, b, S, options)
        for merged in (combine(sa, sb), combine(sb, sa)):
            assert set(merged) == set(whole)
            for key, value in whole.items():
                # The router computes in float32 whatever the input, and its GEMM may round a token's
                # logits differently in a call of other tokens (MKL's blocking depends on the batch):
                # sums of router quantities agree to float32 rounding, the rest exactly.
                tol = 1e-5 if key in ROUTER_FLOAT32_SUMS else 1e-12
                torch.testing.assert_close(merged[key], value, rtol=tol, atol=tol, msg=key)
        # maxima are maxima (not sums), sums are sums
        assert torch.equal(combine(sa, sb)["max_output"], torch.maximum(sa["max_output"], sb["max_output"]))
        assert (sa["max_output"] > 0).any() and (sb["max_output"] > 0).any()
        assert not torch.allclose(sa["max_output"] + sb["max_output"], whole["max_output"])
        assert torch.equal(combine(sa, sb)["counts"], sa["counts"] + sb["counts"])
    # a part with no tokens at all is the neutral element
    empty = observe(layer, [], S, options)
    for key, value in combine(whole, empty).items():
        assert torch.equal(value, whole[key]), key


# ----------------------------------------------------------------------------- 4. scoring methods

SOURCES = ("code", "math")


def hand_stats(**changes) -> LayerStats:
    """A worked example, E = 4, two sources, two halves; cells are [half][source][expert].
    Totals over everything: counts [11, 0, 20, 25], tokens 28 (code 20, math 8)."""

    def t(rows):
        return torch.tensor(rows, dtype=F64)

    fields = {
        "tokens": t([[10, 4], [10, 4]]),
        "counts": t([[[1, 0, 9, 10], [4, 0, 1, 3]], [[2, 0, 8, 10], [4, 0, 2, 2]]]),
        "soft_counts": t([[[2.5, 1.5, 3, 3], [2, 0.5, 0.5, 1]], [[2, 2, 3, 3], [2.5, 0.5, 0.5, 0.5]]]),
        "gate_sums": t([[[0.5, 0, 4, 5.5], [3, 0, 0.25, 0.75]], [[1, 0, 3.5, 5.5], [2.5, 0, 1, 0.5]]]),
        "premoe_sums": t([[[1, 0, -2, 6], [3, 0, 0.2, 1.5]], [[1.4, 0, -1, 5], [3, 0, 0, 1.5]]]),
        "ean_sums": t([[[2, 0, 5, 10], [20, 0, 5, 5]], [[2, 0, 5, 10], [20, 0, 5, 5]]]),
        "reap_sums": t([[[2, 0, 15, 12], [8, 0, 2, 3]], [[4, 0, 14, 12], [8, 0, 4, 3]]]),
        "easyep_sums": t([[[0, 0, 15, 5], [1.5, 0, 0.25, 0.25]], [[0, 0, 15, 5], [1.5, 0, 0.25, 0.25]]]),
        "skip_ratios": torch.zeros(SKIP_BINS, dtype=F64),
        "max_output": t([1.0, 0.0, 2.0, 3.0]),
        "shared_max": t([0.0]),
    }
    fields.update(changes)
    return LayerStats(0, SOURCES, **fields)


HAND = [
    # method, target, sources (the statistics restricted to them; None: all), exact scores, kept
    ("frequency", Target(2), None, [11, 0, 20, 25], [2, 3]),
    ("frequency", Target(2), ("math",), [8, 0, 3, 5], [0, 3]),
    ("frequency", Target(3, halves=(1,)), None, [6, 0, 10, 12], [0, 2, 3]),
    ("soft_count", Target(2), None, [9, 4.5, 7, 7.5], [0, 3]),
    ("soft_count", Target(2, halves=(0,)), ("code",), [2.5, 1.5, 3, 3], [2, 3]),
    ("router_weight", Target(2), None, [7, 0, 8.75, 12.25], [2, 3]),
    ("router_weight", Target(2), ("math",), [5.5, 0, 1.25, 1.25], [0, 2]),  # tie 2/3: lower id
    ("ean", Target(2), None, [44, 0, 20, 30], [0, 3]),
    ("ean", Target(1), ("code",), [4, 0, 10, 20], [3]),
    # REAP: means over routed tokens, sums [22, 0, 35, 30] / counts [11, 0, 20, 25]; by sums it
    # would keep [2, 3]. The never-routed expert 1 scores 0, not NaN.
    ("reap", Target(2), None, [2.0, 0.0, 1.75, 1.2], [0, 2]),
    ("reap", Target(2), ("math",), [2.0, 0.0, 2.0, 1.2], [0, 2]),
    ("reap", Target(3, halves=(0,)), None, [2.0, 0.0, 1.7, 15 / 13], [0, 2, 3]),
    # EASY-EP: code [0, 0, 30, 10] / 40 + math [3, 0, 0.5, 0.5] / 4; unnormalised would keep [2, 3].
    ("easy_ep", Target(2), None, [0.75, 0.0, 0.875, 0.375], [0, 2]),
    ("easy_ep", Target(2), ("code",), [0.0, 0.0, 0.75, 0.25], [2, 3]),
    # PreMoe: logit sums over the chosen sources' tokens only. Expert 1, never chosen, ranks below
    # every chosen expert (1 below the lowest): its raw 0 would keep it over expert 2's mean -0.1.
    ("premoe", Target(2), None, [0.3, -1.1, -0.1, 0.5], [0, 3]),
    ("premoe", Target(3), None, [0.3, -1.1, -0.1, 0.5], [0, 2, 3]),
    ("premoe", Target(2), ("math",), [0.75, -0.975, 0.025, 0.375], [0, 3]),
    ("premoe", Target(2, halves=(1,)), None, [4.4 / 14, -1 / 14 - 1, -1 / 14, 6.5 / 14], [0, 3]),
]


@pytest.mark.parametrize(
    "method,target,sources,scores,kept", HAND, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(HAND)]
)
def test_scoring_methods_on_a_worked_example(method, target, sources, scores, kept):
    view = make_view(E=4, seed=0)
    stats = hand_stats() if sources is None else hand_stats().restricted(sources)
    decision = get_method(method).decide(view, stats, target)
    assert decision.scores == pytest.approx(scores, rel=1e-12, abs=1e-12)
    assert decision.kept == kept
    assert decision.edit.selection == kept


def test_reap_is_the_papers_mean_over_routed_tokens():
    """S_j = (1/|X_j|) sum_{x in X_j} g_j(x) ||f_j(x)||, from per-token records, against REAP on the
    sums those records make."""
    g = torch.Generator().manual_seed(0)
    E, records = 5, []  # (half, source, expert, g, ||f||)
    for _ in range(60):
        e = int(torch.randint(0, E - 1, (1,), generator=g))  # expert 4 is never routed
        records.append(
            (
                int(torch.randint(0, 2, (1,), generator=g)),
                int(torch.randint(0, 2, (1,), generator=g)),
                e,
                float(torch.rand(1, generator=g)),
                float(torch.rand(1, generator=g) * 10),
            )
        )
    counts, reap = torch.zeros(2, 2, E, dtype=F64), torch.zeros(2, 2, E, dtype=F64)
    for h, s, e, gate, norm in records:
        counts[h, s, e] += 1
        reap[h, s, e] += gate * norm
    zeros = torch.zeros(2, 2, E, dtype=F64)
    stats = LayerStats(
        0,
        SOURCES,
        torch.ones(2, 2),
        counts,
        zeros,
        zeros,
        zeros,
        torch.zeros(SKIP_BINS),
        reap_sums=reap,
        ean_sums=zeros,
    )
    for sources in (None, ("math",)):
        chosen = [r for r in records if sources is None or SOURCES[r[1]] in sources]
        paper = []
        for j in range(E):
            mine = [gate * norm for _, _, e, gate, norm in chosen if e == j]
            paper.append(sum(mine) / len(mine) if mine else 0.0)
        restricted = stats if sources is None else stats.restricted(sources)
        scores = get_method("reap").score(make_view(E=E), restricted, Target(2))
        assert scores.tolist() == pytest.approx(paper, rel=1e-12)
        assert paper[4] == 0.0


def test_methods_from_observed_statistics():
    """End to end on a real layer: REAP, EAN and frequency scores from the observers' statistics
    equal the per-token definitions."""
    view = make_view(router_bias={5: -30.0}, seed=8)
    layer = moe_layer_from_view(view)
    batches = make_batches(8, [16, 16], 2, F64, seed=6)
    stats = layer_stats(0, SOURCES, observe(layer, batches, 2, {"total_tokens": 32, "sample_tokens": 8}))
    p = params(layer)
    routed = [[] for _ in range(6)]  # per expert: (g, ||f||)
    for b in batches:
        R = route(b.x, p, spec_of(view))
        for t in range(b.x.shape[0]):
            for _, e, w in R.choices[t]:
                routed[e].append((float(w), float(expert_ffn(b.x[t], e, p).norm())))
    reap = [sum(w * n for w, n in r) / len(r) if r else 0.0 for r in routed]
    ean = [sum(n for _, n in r) for r in routed]
    assert routed[5] == []
    assert get_method("reap").score(view, stats, Target(3)).tolist() == pytest.approx(reap, rel=1e-5)
    assert get_method("ean").score(view, stats, Target(3)).tolist() == pytest.approx(ean, rel=1e-5)
    assert get_method("frequency").score(view, stats, Target(3)).tolist() == [len(r) for r in routed]


def test_easy_ep_source_without_importance_adds_nothing():
    zero_math = hand_stats().easyep_sums.clone()
    zero_math[:, 1] = 0
    decision = get_method("easy_ep").decide(make_view(E=4), hand_stats(easyep_sums=zero_math), Target(2))
    assert decision.scores == pytest.approx([0.0, 0.0, 0.75, 0.25])


def _half_only(stats: LayerStats, half: int) -> LayerStats:
    """The statistics with every per-source sum of the other half zeroed."""
    cut = {n: getattr(stats, n).clone() for n in PER_SOURCE if getattr(stats, n) is not None}
    for value in cut.values():
        value[1 - half] = 0
    return dataclasses.replace(stats, **cut)


@pytest.mark.parametrize("method", sorted({m for m, *_ in HAND}))
@pytest.mark.parametrize("half", [0, 1])
def test_scores_on_one_half_read_that_half_alone(method, half):
    """Scoring on one half equals scoring all of statistics whose other half is zero."""
    stats = hand_stats()
    differ = {n: torch.stack([getattr(stats, n)[0], getattr(stats, n)[0].flip(-1)]) for n in SUMS}
    stats = dataclasses.replace(stats, tokens=torch.tensor([[10.0, 4], [6, 3]], dtype=F64), **differ)
    view, m = make_view(E=4, seed=0), get_method(method)
    on_half = m.score(view, stats, Target(2, halves=(half,)))
    alone = m.score(view, _half_only(stats, half), Target(2))
    assert on_half.tolist() == pytest.approx(alone.tolist(), rel=1e-12, abs=1e-12)


def test_restricted_keeps_every_per_source_statistic_of_those_sources():
    """Every [H, S, ...] statistic, HEAPr's neuron sums and the logit Gram included, is cut to the
    chosen sources."""
    g = torch.Generator().manual_seed(0)
    names = ("neuron_act_sums", "neuron_grad_sums")
    gram = torch.rand(2, 2, 4, 4, generator=g, dtype=F64)
    stats = hand_stats(**{n: torch.rand(2, 2, 4, 3, generator=g, dtype=F64) for n in names}, logit_gram=gram)
    math_only = stats.restricted(["math"])
    shapes = {f.name: getattr(getattr(stats, f.name), "shape", ()) for f in dataclasses.fields(stats)}
    per_source = [name for name, shape in shapes.items() if shape[:2] == (2, 2)]  # [H, S, ...]
    assert {"tokens", "counts", "neuron_grad_sums", "logit_gram"} <= set(per_source)
    for name in per_source:
        assert torch.equal(getattr(math_only, name), getattr(stats, name)[:, [1]]), name
    assert stats.token_total(["math"]) == 8 and stats.token_total(["math"], halves=(1,)) == 4


def test_random_is_seeded_per_layer():
    stats = hand_stats()
    runs = {}
    for seed in (0, 1):
        for index in (0, 1):
            view = make_view(E=8, index=index)
            a = get_method("random", seed=seed).decide(view, stats, Target(4))
            b = get_method("random", seed=seed).decide(view, stats, Target(4))
            assert a.scores == b.scores and a.kept == b.kept, "not reproducible"
            assert len(a.kept) == 4 and a.kept == sorted(a.kept)
            assert a.kept == sorted(sorted(range(8), key=lambda e: -a.scores[e])[:4])
            runs[seed, index] = a.scores
    assert runs[0, 0] != runs[0, 1], "same stream for every layer"
    assert runs[0, 0] != runs[1, 0], "the seed is ignored"


def test_every_method_is_covered():
    """Scoring methods here; NAEE, random below; the merging methods in test_compress_merging.py;
    HEAPr in test_compress_heapr.py; moelab's recipe in test_compress_recipe.py."""
    merging, narrowing = {"m_smoe", "hc_smoe", "sub_moe"}, {"heapr"}
    assert set(METHODS) == {m for m, *_ in HAND} | {"random", "naee"} | merging | narrowing | {"moelab"}


def test_non_finite_scores_are_refused():
    """A score that is NaN or infinite cannot rank experts: decide() refuses it."""

    class Broken(ScoringMethod):
        def score(self, layer, stats, target):
            return torch.tensor([1.0, float("nan"), 2.0, 3.0])

    with pytest.raises(ValueError, match="not 4 finite numbers"):
        Broken().decide(make_view(E=4), hand_stats(), Target(2))
def test_select_top():
    flat = torch.ones(6, dtype=F64)
    assert select_top(flat, 2) == [0, 1]  # ties: lower id
    assert select_top(torch.tensor([1.0, 3, 3, 2]), 2) == [1, 2]
    assert select_top(torch.tensor([1.0, 3, 3, 2]), 1) == [1]
    assert select_top(torch.tensor([5.0, 4, 3, 2, 1, 0]), 3, frozenset({5})) == [0, 1, 5]  # protected first
    assert select_top(torch.tensor([5.0, 4, 3, 2, 1, 0]), 2, frozenset({4, 5})) == [4, 5]
    # groups keep keep / n_group each, even where another group scores higher everywhere
    scores = torch.tensor([1.0, 2, 3, 4, 10, 20, 30, 40])
    assert select_top(scores, 4, n_group=2) == [2, 3, 6, 7]
    assert select_top(scores, 4) == [4, 5, 6, 7]
    assert select_top(scores, 4, frozenset({0}), n_group=2) == [0, 3, 6, 7]
    assert select_top(scores, 4, n_group=4) == [1, 3, 5, 7]


def _router(E, k, n_group=1, topk_group=1, score_func="softmax", group_score=None) -> RouterView:
    return RouterView(torch.zeros(E, 4), score_func, k, True, n_group=n_group, topk_group=topk_group, group_score=group_score)


def _removed_by(router: RouterView, ratio: float) -> int:
    return router.num_experts - plan_target(router, ratio)


def test_plan_target_accepts():
    assert plan_target(_router(8, 2), 0.25) == 6
    assert plan_target(_router(8, 2), 0.75) == 2
    assert plan_target(_router(60, 4), 0.5) == 30
    assert plan_target(_router(100, 2), 0.29) == 71  # 100 x 0.29 = 28.999999999999996 in floats
    assert plan_target(_router(8, 2), 0.45) == 5  # removes int(3.6) = 3, not round(3.6) = 4
    assert plan_target(_router(16, 2, n_group=4, topk_group=2, score_func="sigmoid"), 0.5) == 8


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_plan_target_ratio_outside_the_interval(ratio):
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\), got"):
        plan_target(_router(8, 2), ratio)


@pytest.mark.parametrize("E", [3, 8, 9, 12, 60, 128])
def test_plan_target_ratio_removing_nothing_suggests_a_ratio_that_works(E):
    router = _router(E, 1)
    with pytest.raises(ValueError, match="removes none") as err:
        plan_target(router, 0.5 / E, "layer 3: ")
    message = str(err.value)
    assert message.startswith("layer 3: ")
    least = float(re.search(r"at least ([0-9.e-]+)$", message).group(1))
    assert _removed_by(router, least) == 1, message


def test_plan_target_fewer_than_top_k():
    router = _router(8, 3)
    with pytest.raises(ValueError, match=r"leaves 2, fewer than the 3 .*remove at most 5 \(ratio <= 0.625\)"):
        plan_target(router, 0.75)
    assert _removed_by(router, 0.625) == 5
    with pytest.raises(ValueError, match=r"picks every expert \(top_k = E\), so no expert can go"):
        plan_target(_router(4, 4), 0.25)  # was: "remove at most 0 (ratio <= 0)", which no ratio meets


def _suggestions(message: str) -> list[tuple[int, float]]:
    found = re.search(r"remove ([0-9 or]+) experts \(ratio ([0-9. ore-]+)\)", message)
    assert found, message
    removed = [int(v) for v in found.group(1).split(" or ")]
    ratios = [float(v) for v in found.group(2).split(" or ")]
    assert len(removed) == len(ratios)
    return list(zip(removed, ratios))


@pytest.mark.parametrize(
    "E,k,n_group,topk_group,score_func,ratio,expected",
    [
        (8, 2, 4, 2, "softmax", 0.3, [4]),  # removes 2, keeps 6: only removing 4 keeps 1 per group
        (16, 4, 4, 2, "softmax", 0.2, [4, 8]),
        (16, 2, 4, 2, "sigmoid", 0.7, [4, 8]),  # removing 12 would leave 1 per group
        (256, 8, 8, 4, "sigmoid", 0.15, [32, 40]),  # DeepSeek-V3; 40 / 256 = 0.15625
        (64, 6, 8, 3, "softmax", 0.2, [8, 16]),
    ],
)
def test_plan_target_groups_suggest_ratios_that_work(E, k, n_group, topk_group, score_func, ratio, expected):
    router = _router(E, k, n_group, topk_group, score_func)
    with pytest.raises(ValueError, match=rf"must be a multiple of {n_group}") as err:
        plan_target(router, ratio)
    suggestions = _suggestions(str(err.value))
    assert [r for r, _ in suggestions] == expected
    for removed, suggested in suggestions:
        assert _removed_by(router, suggested) == removed, (removed, suggested, str(err.value))


def test_plan_target_groups_with_no_valid_ratio():
    # 8 experts, 4 groups, topk_group 1, top-2: every group must keep 2, so nothing can go
    router = _router(8, 2, n_group=4, topk_group=1)
    with pytest.raises(
        ValueError, match="multiple of 4; no number of removed experts .* cannot lose experts"
    ):
        plan_target(router, 0.3)
    with pytest.raises(ValueError, match=r"keeping 4 of 8 experts: top_k \(2\) exceeds the 1 experts"):
        plan_target(router, 0.5)


@pytest.mark.parametrize("rule", [dict(score_func="sigmoid"), dict(group_score="top2")], ids=["sigmoid", "mistral4"])
def test_plan_target_groups_scored_by_their_two_best_need_two_per_group(rule):
    """Sigmoid groups, or softmax ones scored by their two best scores (Mistral 4's), keep two experts each."""
    router = _router(16, 2, n_group=4, topk_group=2, **rule)
    with pytest.raises(
        ValueError, match="scores each group by its 2 best experts, so every group needs at least 2"
    ):
        plan_target(router, 0.75)  # keeps 4: one per group
    with pytest.raises(ValueError, match=r"keeping 4 of 16 experts: .*; remove 4 or 8 experts \(ratio 0.25 or 0.5\)"):
        plan_target(router, 0.75)  # the nearest numbers that work
    assert plan_target(_router(16, 2, n_group=4, topk_group=2), 0.75) == 4  # softmax groups may
    with pytest.raises(ValueError, match=r"top_k \(4\) exceeds"):
        plan_target(_router(16, 4, n_group=4, topk_group=2), 0.75)


def test_plan_target_counts_the_identity_experts_among_what_top_k_takes():
    """LongCat-Flash's router takes top_k of its experts and identity experts together: 4 experts and
    2 identity experts top-4 may keep 2 experts, not 1; groups spanning identity experts lose none."""
    identity = IdentityRows(torch.zeros(2, 4))
    router = RouterView(torch.zeros(4, 4), "softmax", 4, False, identity=identity)
    assert plan_target(router, 0.5) == 2
    with pytest.raises(ValueError, match=r"leaves 1 \(beside its 2 identity experts\), fewer than the 4 .* remove at most 2"):
        plan_target(router, 0.75)
    grouped = RouterView(torch.zeros(6, 4), "softmax", 2, False, n_group=2, topk_group=1, identity=identity)
    with pytest.raises(ValueError, match="groups span the 2 identity experts, which cannot lose any"):
        plan_target(grouped, 0.5)


# ----------------------------------------------------------------------------- 5. NAEE


def naee_stats(view: MoELayerView, N: int, seed: int = 0) -> LayerStats:
    E, D = view.router.num_experts, view.experts.dim
    inputs = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
    zeros = torch.zeros(2, 1, E, dtype=F64)
    return LayerStats(
        view.index,
        ("all",),
        torch.ones(2, 1),
        zeros,
        zeros,
        zeros,
        zeros,
        torch.zeros(SKIP_BINS),
        inputs=inputs,
    )


def fresh(view: MoELayerView) -> MoELayerView:
    """A copy of the view with tensors of its own (nothing the code under test did to the view's
    tensors reaches the reference)."""
    clone = lambda t: None if t is None else t.clone()
    router = dataclasses.replace(
        view.router,
        weight=clone(view.router.weight),
        bias=clone(view.router.bias),
        selection_bias=clone(view.router.selection_bias),
    )
    return dataclasses.replace(view, router=router)


def naee_loss(view: MoELayerView, x: torch.Tensor, kept: tuple[int, ...], chunk: int) -> float:
    """sum over chunks of ||Z - Z_K||_F (compression.md §5.1), token by token in float64 from the
    layer's parameters (`reference.moe_forward`), not from moelab's masking: Z_K is the layer whose
    dropped experts have router logit -inf before the softmax (so top-k is re-chosen among the
    kept ones and their probabilities renormalised over them) and selection score -inf."""
    p = params(moe_layer_from_view(fresh(view)))
    E = p["router.weight"].shape[0]
    dropped = [e for e in range(E) if e not in kept]
    masked = dict(p)
    for name in ("router.bias", "router.selection_bias"):
        if name in p or name == "router.bias":
            value = p[name].clone() if name in p else torch.zeros(E, dtype=F64)
            value[dropped] = float("-inf")
            masked[name] = value
    with torch.no_grad():
        z = moe_forward(x, p, spec_of(view)).y
        zk = moe_forward(x, masked, spec_of(view)).y
    return sum(float((z[i : i + chunk] - zk[i : i + chunk]).norm()) for i in range(0, x.shape[0], chunk))


def kept_sets(E: int, keep: int, n_group: int = 1, protect=frozenset()):
    size = E // n_group
    for kept in itertools.combinations(range(E), keep):
        if protect <= set(kept) and all(
            sum(1 for e in kept if e // size == g) == keep // n_group for g in range(n_group)
        ):
            yield kept


def greedy_reference(view, x, E, keep, chunk, n_group=1, protect=frozenset()):
    kept, size, evaluated = set(range(E)), E // n_group, set()
    while len(kept) > keep:
        losses = {}
        for e in sorted(kept):
            left_in_group = sum(1 for f in kept if f // size == e // size)
            if e in protect or left_in_group == keep // n_group:
                continue
            candidate = tuple(sorted(kept - {e}))
            losses[e] = naee_loss(view, x, candidate, chunk)
            evaluated.add(candidate)
        kept.remove(min(losses, key=lambda e: (losses[e], -e)))  # a tie drops the higher id
    return sorted(kept), len(evaluated)


def test_naee_drops_an_expert_that_changes_nothing():
    """An expert the router never picks: masking it out changes no output (its softmax share is
    e^-30), so NAEE drops it, exhaustively and greedily. (An expert with zero output that *is*
    routed does change the output when dropped: its tokens go to another expert.)"""
    view = make_view(E=5, router_bias={3: -30.0}, seed=4)
    stats = naee_stats(view, 16)
    for max_candidates, search in ((5000, "exhaustive"), (1, "greedy backward elimination")):
        decision = get_method("naee", max_candidates=max_candidates).decide(view, stats, Target(4))
        assert decision.kept == [0, 1, 2, 4], decision.notes
        assert decision.notes["search"] == search
        assert decision.notes["loss"] < 1e-5  # the router's float32 rounding
        assert decision.scores is None and decision.edit.selection == [0, 1, 2, 4]
    # dropping any routed expert does change the output
    x = stats.inputs.double()
    assert min(naee_loss(view, x, kept, 128) for kept in kept_sets(5, 4) if 3 in kept) > 1e-3


def test_naee_ties_keep_the_lower_ids_in_both_searches():
    """Two never-routed experts: dropping either loses exactly nothing; the lower ids stay, whether
    every set is tried or experts are dropped greedily."""
    view = make_view(E=5, router_bias={3: -30.0, 4: -30.0}, seed=4)
    stats = naee_stats(view, 16)
    for max_candidates in (5000, 1):
        decision = get_method("naee", max_candidates=max_candidates).decide(view, stats, Target(4))
        assert decision.notes["loss"] == 0.0 and decision.kept == [0, 1, 2, 3], decision.notes


@pytest.mark.parametrize(
    "kw,keep,chunk",
    [
        ({"E": 5, "zero_down": (1,), "router_bias": {1: 1.5}}, 3, 4),
        ({"E": 6, "renormalize": False, "shared": True}, 3, 5),
        (
            {
                "E": 8,
                "score_func": "sigmoid",
                "n_group": 2,
                "topk_group": 1,
                "selection_bias": True,
                "route_scale": 2.5,
            },
            4,
            4,
        ),
    ],
)
def test_naee_exhaustive_equals_brute_force(kw, keep, chunk):
    view = make_view(**kw, seed=9)
    before = fresh(view)
    stats = naee_stats(view, 10, seed=1)
    x = stats.inputs.double()
    E, n_group = view.router.num_experts, view.router.n_group
    losses = {kept: naee_loss(view, x, kept, chunk) for kept in kept_sets(E, keep, n_group)}
    best = min(losses, key=lambda kept: (losses[kept], kept))
    assert sorted(losses.values())[1] - losses[best] > 1e-4, "a near-tie: change the seed"
    decision = get_method("naee", chunk=chunk).decide(view, stats, Target(keep))
    assert decision.kept == list(best), (decision.notes, sorted(losses.items(), key=lambda kv: kv[1])[:3])
    assert decision.notes["search"] == "exhaustive"
    assert decision.notes["evaluated"] == len(losses)
    assert decision.notes["loss"] == pytest.approx(losses[best], rel=1e-6)  # moelab's router runs in float32
    assert decision.notes["tokens"] == 10
    # The loss sums per-chunk norms: not the norm of the whole difference.
    whole = naee_loss(view, x, best, 10**6)
    assert decision.notes["loss"] != pytest.approx(whole, rel=1e-6)
    # and the method leaves the layer it was given as it was
    for name in ("weight", "bias", "selection_bias"):
        a, b = getattr(view.router, name), getattr(before.router, name)
        assert (a is None and b is None) or torch.equal(a, b), f"NAEE changed the view's router {name}"


@pytest.mark.parametrize(
    "kw,keep,protect",
    [
        ({"E": 6, "router_bias": {4: -30.0}}, 3, frozenset()),
        ({"E": 6}, 3, frozenset({2})),
        ({"E": 8, "n_group": 2, "topk_group": 1}, 4, frozenset({1})),
    ],
)
def test_naee_greedy_equals_reference_greedy(kw, keep, protect):
    view = make_view(**kw, seed=12)
    stats = naee_stats(view, 12, seed=2)
    E, n_group = view.router.num_experts, view.router.n_group
    expected, evaluated = greedy_reference(view, stats.inputs.double(), E, keep, 128, n_group, protect)
    decision = get_method("naee", max_candidates=2).decide(view, stats, Target(keep, protect))
    assert decision.notes["search"] == "greedy backward elimination"
    assert decision.kept == expected
    assert decision.notes["evaluated"] == evaluated
    assert protect <= set(decision.kept)
    size = E // n_group
    assert [sum(1 for e in decision.kept if e // size == g) for g in range(n_group)] == [
        keep // n_group
    ] * n_group
    if 4 in kw.get("router_bias", {}):
        assert 4 not in decision.kept


@pytest.mark.parametrize(
    "E,n_group,topk_group,keep,protect,candidates",
    [
        (5, 1, 1, 3, frozenset(), 10),  # C(5, 3)
        (5, 1, 1, 3, frozenset({0}), 6),  # C(4, 2)
        (8, 4, 2, 4, frozenset(), 16),  # one of 2 in each of 4 groups: 2^4, not C(8, 4) = 70
        (8, 4, 2, 4, frozenset({0}), 8),
        (8, 2, 1, 4, frozenset(), 36),  # C(4, 2)^2
    ],
)
def test_naee_search_switches_at_max_candidates(E, n_group, topk_group, keep, protect, candidates):
    view = make_view(E=E, n_group=n_group, topk_group=topk_group, seed=1)
    stats = naee_stats(view, 6)
    assert len(list(kept_sets(E, keep, n_group, protect))) == candidates
    at = get_method("naee", max_candidates=candidates).decide(view, stats, Target(keep, protect))
    assert at.notes["search"] == "exhaustive" and at.notes["evaluated"] == candidates
    below = get_method("naee", max_candidates=candidates - 1).decide(view, stats, Target(keep, protect))
    assert below.notes["search"] == "greedy backward elimination"


def test_naee_needs_inputs():
    view = make_view(E=4)
    for inputs in (None, torch.zeros(0, 8), torch.zeros(5, 8)):
        stats = dataclasses.replace(naee_stats(view, 4), inputs=inputs)
        with pytest.raises(ValueError, match="naee needs sampled layer inputs"):
            get_method("naee").decide(view, stats, Target(2))
    with pytest.raises(ValueError, match="max_candidates and chunk >= 1"):
        get_method("naee", chunk=0)


# ----------------------------------------------------------------------------- 6. properties


@st.composite
def property_cases(draw):
    E = draw(st.integers(2, 8))
    k = draw(st.integers(1, E))
    kw = {
        "E": E,
        "top_k": k,
        "score_func": draw(st.sampled_from(["softmax", "sigmoid"])),
        "renormalize": draw(st.booleans()),
        "shared": draw(st.booleans()),
        "scale_input": draw(st.sampled_from([False, False, True])),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }
    if draw(st.booleans()):
        kw["router_bias"] = {draw(st.integers(0, E - 1)): draw(st.sampled_from([-30.0, 30.0]))}
    sizes = draw(st.lists(st.integers(1, 10), min_size=1, max_size=2).filter(lambda s: sum(s) <= 20))
    return kw, sizes


@PROPERTY
@given(case=property_cases(), sample=st.integers(0, 25))
def test_statistics_properties(case, sample):
    kw, sizes = case
    view = make_view(D=6, I=4, **kw)
    layer = moe_layer_from_view(view)
    k, T, S = kw["top_k"], sum(sizes), 2
    batches = make_batches(6, sizes, S, kw["dtype"], seed=kw["seed"])
    with torch.no_grad():
        for b in batches:
            tol = 1e-5 if kw["dtype"] == torch.float32 else 3e-2
            assert_close(eager_moe(layer, b.x).output.float(), layer(b.x)[0].float(), atol=tol, rtol=tol)
    names = tuple(n for n in DEFAULT_OBSERVERS if n != "inputs" or sample)
    got = observe(layer, batches, S, {"total_tokens": T, "sample_tokens": sample}, names)
    tokens = got["tokens"]
    assert float(tokens.sum()) == T
    # every token fills its k slots, in its own (half, source) cell; k distinct experts each
    torch.testing.assert_close(got["counts"].sum(-1), tokens * k, rtol=0, atol=0)
    assert (got["counts"] <= tokens[..., None]).all()
    torch.testing.assert_close(got["soft_counts"].sum(-1), tokens, rtol=1e-5, atol=1e-5)
    assert float(got["skip_ratios"].sum()) == (T if k >= 2 else 0)
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
    for name in ("counts", "soft_counts", "ean_sums", "reap_sums", "easyep_sums", "max_output", "shared_max"):
        assert (got[name] >= 0).all(), name
    routed_to = got["counts"] > 0
    assert (got["gate_sums"] >= 0).all() and not (got["gate_sums"][~routed_to]).any()
    for name in ("ean_sums", "reap_sums", "easyep_sums", "premoe_sums"):
        assert not got[name][~routed_to].any(), f"{name} of an expert no token chose"
    assert (~(got["max_output"] > 0) | got["counts"].sum((0, 1)).gt(0)).all()
    if kw["renormalize"] and not kw["scale_input"]:  # weights <= 1: what an expert adds is at most its output
        assert (got["reap_sums"] <= got["ean_sums"] * (1 + 1e-2) + 1e-6).all()
    if kw["renormalize"]:
        torch.testing.assert_close(got["gate_sums"].sum(-1), tokens, rtol=1e-5, atol=1e-5)
    assert (got["shared_max"] > 0).item() == kw["shared"]
    if sample:
        assert got["inputs"].shape == (min(sample, T), 6)


def test_check_protected():
    router = make_view(E=8, top_k=2, n_group=2, topk_group=1, score_func="sigmoid").router
    check_protected(router, 4, frozenset({0, 5}))
    check_protected(router, 4, frozenset({0, 1, 4, 5}))  # a group may keep only protected experts
    with pytest.raises(ValueError, match=r"3 protected experts \[0, 1, 2\] in group 0, but it keeps only 2"):
        check_protected(router, 4, frozenset({0, 1, 2}))


def test_super_expert_ids_flag_expert_zero_and_skip_the_shared_expert():
    """Expert 0 is an expert like the others; a shared super expert (id -1) is never listed."""
    assert super_expert_ids({0: hand_stats(max_output=torch.tensor([100.0, 1, 1, 1], dtype=F64))}) == {0: [0]}
    assert super_expert_ids({0: hand_stats(shared_max=torch.tensor([100.0], dtype=F64))}) == {}


# ----------------------------------------------------------------------------- NAEE dynamic skipping


def test_dynamic_skip_drops_weak_experts_and_keeps_the_weight():
    from moelab.nn.routers import Routing, dynamic_skip

    indices = torch.tensor([[3, 1], [0, 2], [4, -1]])
    weights = torch.tensor([[0.7, 0.3], [0.55, 0.45], [1.0, 0.0]])
    routing = Routing(indices, weights, torch.zeros(3, 5), torch.zeros(3, 5))
    skipped = dynamic_skip(routing, 0.5)  # 0.3 < 0.5 * 0.7 goes; 0.45 >= 0.5 * 0.55 stays
    assert skipped.indices.tolist() == [[3, -1], [0, 2], [4, -1]]
    torch.testing.assert_close(skipped.weights, torch.tensor([[1.0, 0.0], [0.55, 0.45], [1.0, 0.0]]))
    assert dynamic_skip(routing, 0.0).indices.tolist() == indices.tolist()
    at_the_threshold = Routing(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.25]]), torch.zeros(1, 5), torch.zeros(1, 5))
    assert dynamic_skip(at_the_threshold, 0.5).indices.tolist() == [[0, 1]]  # 0.25 = 0.5 * 0.5: not below, kept
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        dynamic_skip(routing, 1.5)


def test_a_layer_with_skipping_equals_the_layer_on_the_kept_slots():
    from moelab.nn.routers import dynamic_skip

    view = make_view(E=6, top_k=2, seed=3)
    layer = moe_layer_from_view(view).double()
    x = torch.randn(20, view.experts.dim, generator=torch.Generator().manual_seed(5), dtype=F64)
    routing = dynamic_skip(layer.router(x), 0.6)
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(routing.indices[t].tolist(), routing.weights[t].tolist()):
            if e >= 0:
                expected[t] += w * expert_ffn(x[t], e, {k: v.double() for k, v in layer.state_dict().items()})
    layer.skip_ratio = 0.6
    y, result = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert 1 <= float(result.experts_per_token) < 2


def test_dynamic_skip_leaves_identity_experts_slots_alone():
    """Slots past num_experts (identity experts, LongCat-Flash's) cost nothing to run: they are
    never skipped, and neither set the token's largest weight nor take a skipped expert's weight,
    as the calibration's ratio (second to first weight of the experts with weights) counts them."""
    from moelab.nn.routers import Routing, dynamic_skip

    indices = torch.tensor([[4, 0, 1], [2, 5, 3]])  # E = 4: choices 4 and 5 are identity experts
    weights = torch.tensor([[0.9, 0.4, 0.3], [0.6, 0.05, 0.1]])
    routing = Routing(indices, weights, torch.zeros(2, 6), torch.zeros(2, 6))
    skipped = dynamic_skip(routing, 0.5, num_experts=4)  # 0.3 >= 0.5 * 0.4 stays; 0.1 < 0.5 * 0.6 goes
    assert skipped.indices.tolist() == [[4, 0, 1], [2, 5, -1]]
    torch.testing.assert_close(skipped.weights, torch.tensor([[0.9, 0.4, 0.3], [0.7, 0.05, 0.0]]))


def test_a_layer_with_identity_experts_skips_its_experts_alone():
    """NAEE skipping in a layer with identity experts, forward and infer: the experts' slots
    weighed against the token's largest expert weight, the identity experts' shares unchanged."""
    from moelab.nn import MoEConfig, build_moe
    from moelab.nn.routers import skip_weak_experts

    torch.manual_seed(4)
    E = 4
    layer = build_moe(MoEConfig(dim=8, num_experts=E, hidden_dim=4, identity_experts=2, top_k=3, renormalize=False))
    layer = layer.double().eval()
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    routing = layer.router(x)
    experts = routing.indices < E
    indices, weights = skip_weak_experts(
        routing.indices.where(experts, -1), routing.weights.where(experts, 0.0), 0.6
    )  # the experts' slots alone
    state = {k: v.double() for k, v in layer.state_dict().items()}
    expected = (routing.weights.double() * ~experts).sum(-1, keepdim=True) * x
    for t in range(x.shape[0]):
        for e, w in zip(indices[t].tolist(), weights[t].tolist()):
            if e >= 0:
                expected[t] += w * expert_ffn(x[t], e, state)
    assert (~experts).any(-1).logical_and(experts.sum(-1) >= 2).any(), "the test should skip beside identity slots"
    layer.skip_ratio = 0.6
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.infer(x), expected, rtol=1e-10, atol=1e-10)


def test_skip_ratio_is_the_histogram_median():
    from moelab.compress.skipping import median_skip_ratio

    hist = torch.zeros(SKIP_BINS, dtype=F64)
    hist[30], hist[70] = 3, 1  # 4 tokens: half of them at or below bin 30
    stats = LayerStats(0, ("a",), *(torch.zeros(2, 1, 2, dtype=F64) for _ in range(5)), skip_ratios=hist)
    assert median_skip_ratio(stats) == pytest.approx((30 + 2 / 3) / SKIP_BINS)


def test_skip_ratio_median_in_the_first_bin_and_between_bins():
    """The median inside bin 0 (no bins before it); with the tokens split evenly between two bins,
    the lower middle (torch.median's convention): the top of the lower bin."""
    from moelab.compress.skipping import median_skip_ratio

    def median(**bins):
        hist = torch.zeros(SKIP_BINS, dtype=F64)
        for b, n in bins.items():
            hist[int(b[1:])] = n
        zeros = (torch.zeros(2, 1, 2) for _ in range(5))
        return median_skip_ratio(LayerStats(0, ("a",), *zeros, skip_ratios=hist))

    assert median(b0=3, b50=1) == pytest.approx((2 / 3) / SKIP_BINS)
    assert median(b30=2, b70=2) == pytest.approx(31 / SKIP_BINS)


def test_dynamic_skipping_refuses_ratios_for_other_layers():
    from test_model import make_model

    from moelab.compress.skipping import apply_dynamic_skipping

    model = make_model()
    moe = [i for i, block in enumerate(model.layers) if block.kind == "moe"]
    with pytest.raises(ValueError, match="skip ratios cover layers"):
        apply_dynamic_skipping(model, {i + 100: 0.5 for i in moe})
