"""The whole MoE layer (router -> dispatch -> experts -> combine + shared, aux losses) against the
naive per-token reference (tests/reference.py): forward and backward in fp32 (1e-5, relative to
each tensor's scale), every router and setting, every expert backend, and the edge cases."""

import json

import pytest
import torch
from reference import (
    F64,
    Spec,
    assert_close,
    assert_matches,
    assert_no_near_tie,
    f64_leaf,
    f64_leaves,
    moe_forward,
    run_both,
)

from moelab.nn import (
    MoEConfig,
    MoELayer,
    MoEResult,
    ScaledRMSNorm,
    SharedExperts,
    SwiGLUExperts,
    TopKRouter,
    build_moe,
)

D, E, I = 16, 8, 8
BACKENDS = ["grouped", "loop", "grouped_mm", "triton"]
LOSSES = dict(balance_coef=0.01, z_coef=1e-3, entropy_coef=0.02)

CONFIGS = {
    "topk": dict(),
    "topk-k1": dict(top_k=1),
    "topk-no-renorm-scale": dict(top_k=2, renormalize=False, route_scale=1.5),
    "topk-sigmoid-groups": dict(top_k=3, score_func="sigmoid", n_group=4, topk_group=2, route_scale=2.5),
    "topk-softmax-groups": dict(top_k=2, n_group=4, topk_group=1),
    "topk-router-bias": dict(router_bias=True),
    "topk-aux-free-bias": dict(top_k=2, selection_bias=True),
    "topk-k=E": dict(top_k=E),
    "topk-shared": dict(num_shared=2),
    "topk-shared-gated": dict(num_shared=1, shared_gate=True, shared_hidden_dim=12),
    "topk-expert-biases": dict(expert_mlp_bias=True),
    "topk-mlp-gelu": dict(activation="gelu", expert_mlp_bias=True),
    "topk-mlp-relu": dict(activation="relu"),
    "topk-mlp-relu2": dict(activation="relu2", num_shared=1),
    "topp": dict(router="topp", top_p=0.5),
    "topp-raw-maxk": dict(router="topp", top_p=0.8, max_k=3, renormalize=False),
    "ec": dict(router="expert_choice", ec_capacity_factor=1.0),
    "ec-shared": dict(router="expert_choice", ec_capacity_factor=2.5, num_shared=1),
    "relu": dict(router="relu", activation="silu"),
    "relu-biases": dict(router="relu", router_bias=True, expert_mlp_bias=True),
    "cap-topk": dict(top_k=2, capacity_factor=1.0),
    "cap-topk-tight": dict(top_k=2, capacity_factor=0.5, num_shared=1),
    "cap-switch": dict(top_k=1, capacity_factor=1.25),
    "cap-topp": dict(router="topp", top_p=0.7, capacity_factor=0.8),
    "cap-ec": dict(router="expert_choice", ec_capacity_factor=2.0, capacity_factor=0.6),
    "cap-relu": dict(router="relu", capacity_factor=0.7),
}


def make_layer(seed=0, *, randomise=True, **overrides):
    settings = dict(dim=D, num_experts=E, hidden_dim=I, **LOSSES)
    settings.update(overrides)
    cfg = MoEConfig(**settings)
    torch.manual_seed(seed)
    layer = build_moe(cfg)
    if randomise:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            layer.router.weight.mul_(2.0)  # sharper routing: uneven loads, real drops
            for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
                if name.endswith("bias") and t is not None:  # router/expert biases start at 0
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
                if name == "router.selection_bias":
                    t.copy_(torch.randn(t.shape, generator=g) * 0.05)
                if name == "router.norm_weight":
                    t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
    return layer, Spec.from_config(cfg)


def tokens(*shape, seed=1):
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_reference(name, backend):
    layer, spec = make_layer(**CONFIGS[name], backend=backend)
    both = run_both(layer, spec, tokens(2, 12))
    assert_no_near_tie(both.ref.routing, ordered=spec.capacity_factor is not None)
    assert_matches(both, layer)
    if "cap" in name:
        assert 0 < both.ref.capacity.dropped_fraction < 1, "the capacity test should drop something"
    n = both.ref.routing.num_assignments() / 24
    assert float(both.result.experts_per_token) == pytest.approx(n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_layer_with_norms_around_its_router_and_experts_matches_reference(backend, shared):
    """Gemma 4's form: the router reads its own RMS norm of x (times D^-0.5) and scales each chosen
    weight by its expert's scale; the experts read another norm of x and their sum is normed again,
    before any shared experts are added. Forward and backward, and `infer` (the inference path)."""
    eps = 0.5  # large enough that a misplaced epsilon shows at unit-scale inputs
    torch.manual_seed(0)
    router = TopKRouter(D, E, 2, expert_scale=True, input_norm=ScaledRMSNorm(D, eps, multiplier=D**-0.5))
    layer = MoELayer(
        router,
        SwiGLUExperts(E, D, I, backend=backend),
        SharedExperts(D, 12) if shared else None,
        expert_norm=ScaledRMSNorm(D, eps),
        routed_norm=ScaledRMSNorm(D, eps),
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.weight.mul_(8.0)  # the normed input is ~D^-0.5 per entry: logits O(1)
        for name, p in layer.named_parameters():
            if name.endswith(("scale", "norm.weight")):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    spec = Spec(norm_eps=eps, router_norm_multiplier=D**-0.5)
    both = run_both(layer, spec, tokens(2, 12))
    assert_no_near_tie(both.ref.routing, ordered=False)
    assert_matches(both, layer)
    with torch.no_grad():
        assert_close(layer.eval().infer(tokens(2, 12)), both.ref.y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_latent_layer_with_normed_latent_and_output_normed_experts_matches_reference(backend, shared):
    """Muse Spark's form: a sigmoid router with a correction bias reads x and scales its logits; the
    experts read expert_norm(down @ x), each one's output is scaled then normed (post_expert_norm)
    before its weight, and the sum is projected back up. Forward and backward on every backend, and
    `infer` on many tokens and on one (the gathered decode path)."""
    from moelab.nn.latent import LatentProjection

    eps, R = 0.5, 12  # eps large enough that a misplaced epsilon shows at unit-scale inputs
    torch.manual_seed(0)
    router = TopKRouter(D, E, 2, score_func="sigmoid", selection_bias=True, route_scale=2.5, logit_scale=0.4)
    experts = SwiGLUExperts(E, R, I, backend=backend, output_norm=ScaledRMSNorm(R, eps, scale_first=True))
    layer = MoELayer(
        router, experts, SharedExperts(D, 12) if shared else None,
        latent=LatentProjection(D, R), expert_norm=ScaledRMSNorm(R, eps),
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.selection_bias.copy_(0.1 * torch.randn(E, generator=g))
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    spec = Spec(score_func="sigmoid", route_scale=2.5, norm_eps=eps, logit_scale=0.4)
    both = run_both(layer, spec, tokens(2, 12))
    assert_no_near_tie(both.ref.routing, ordered=False)
    assert_matches(both, layer)
    x = tokens(2, 12).view(-1, D)
    with torch.no_grad():
        layer.eval()
        assert_close(layer.infer(x), both.ref.y.view(-1, D), what="infer")
        assert_close(torch.cat([layer.infer(x[t : t + 1]) for t in range(24)]), both.ref.y.view(-1, D), what="infer, one token")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_with_no_tokens_gets_exactly_zero_gradient(backend):
    layer, spec = make_layer(top_k=2, selection_bias=True, backend=backend)
    with torch.no_grad():
        layer.router.selection_bias[3] = -10.0  # never selected
    both = run_both(layer, spec, tokens(24))
    assert_matches(both, layer)
    assert both.result.tokens_per_expert[3] == 0
    for name in ("gate_up_proj", "down_proj"):
        grad = getattr(layer.experts, name).grad
        assert torch.all(grad[3] == 0), name
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_to_one_expert(backend, capacity_factor, top_k):
    layer, spec = make_layer(top_k=top_k, router_bias=True, capacity_factor=capacity_factor, backend=backend)
    with torch.no_grad():
        layer.router.bias.zero_()
        layer.router.bias[2] = 30.0  # expert 2 is every token's first choice
    T = 24
    both = run_both(layer, spec, tokens(T))
    assert_matches(both, layer)
    assert both.result.tokens_per_expert[2] == T
    if top_k == 1:
        assert both.result.tokens_per_expert.sum() == T
        for e in range(E):
            if e != 2:
                assert torch.all(layer.experts.gate_up_proj.grad[e] == 0)
    if capacity_factor is not None:
        capacity = -(-T * top_k // E)  # ceil(1.0 * T*K / E)
        assert float(both.result.dropped_fraction) == pytest.approx((T - capacity) / (T * top_k))
        if top_k == 1:  # tokens after the first `capacity` got nothing: exactly zero output
            assert torch.all(both.y[capacity:] == 0)
            assert torch.any(both.y[:capacity] != 0)


@pytest.mark.parametrize("backend", ["grouped", "loop"])
@pytest.mark.parametrize("router", ["topp", "relu"])
def test_an_idle_expert_and_every_token_on_one_under_dynamic_k(router, backend):
    """top-p and the ReLU router choose a variable number of experts per token: a router bias of -30
    on expert 3 leaves it without tokens (exactly zero gradient, the others some); +30 on expert 2
    gives it every token (top-p: its probability passes p alone, so it is each token's only expert).
    Expert choice has no such cases: each expert takes its C tokens whatever the scores."""
    layer, spec = make_layer(router=router, router_bias=True, backend=backend, **({"top_p": 0.5} if router == "topp" else {}))
    T = 24
    for bias, expert in ((-30.0, 3), (30.0, 2)):
        with torch.no_grad():
            layer.router.bias.zero_()
            layer.router.bias[expert] = bias
        layer.zero_grad()
        both = run_both(layer, spec, tokens(T))
        assert_matches(both, layer)
        load = both.result.tokens_per_expert
        grad = layer.experts.gate_up_proj.grad
        others = [e for e in range(E) if e != expert]
        if bias < 0:
            assert load[3] == 0 and torch.all(grad[3] == 0) and grad[others].abs().sum() > 0
        else:
            assert load[2] == T and grad[2].abs().sum() > 0
            if router == "topp":
                assert load.sum() == T and torch.all(grad[others] == 0)


@pytest.mark.parametrize("name", ["topk", "topk-k=E", "topp", "ec", "relu", "cap-topk", "topk-shared-gated"])
def test_single_token(name):
    layer, spec = make_layer(**CONFIGS[name])
    both = run_both(layer, spec, tokens(1))
    assert_matches(both, layer)


def test_expert_choice_tokens_with_no_expert():
    """Expert choice with c = 0.5: some tokens are picked by no expert. Their output is exactly 0
    and (without aux losses, which see every token) so is their input gradient."""
    layer, spec = make_layer(router="expert_choice", ec_capacity_factor=0.5, balance_coef=0.0, z_coef=0.0, entropy_coef=0.0)
    both = run_both(layer, spec, tokens(24))
    assert_matches(both, layer)
    lonely = [t for t in range(24) if not both.ref.routing.choices[t]]
    assert lonely, "expected tokens without experts"
    assert torch.all(both.y[lonely] == 0)
    assert torch.all(both.x.grad[lonely] == 0)
    assert float(both.result.experts_per_token) == pytest.approx(both.ref.routing.num_assignments() / 24)


def test_relu_router_token_with_no_active_expert():
    """A token whose router logits are all <= 0 gets no expert (BlockFFN), output 0."""
    layer, spec = make_layer(router="relu", router_bias=True, balance_coef=0.0, z_coef=0.0, entropy_coef=0.0)
    x = tokens(6)
    with torch.no_grad():
        layer.router.bias.fill_(-0.5)
        x[2] = 0.0  # logits = bias < 0
    both = run_both(layer, spec, x)
    assert_matches(both, layer)
    assert both.ref.routing.choices[2] == []
    assert torch.all(both.y[2] == 0)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_no_assignment_at_all(capacity_factor):
    """Every router logit negative: nothing is routed; nothing is dropped either (and likewise
    for an empty input)."""
    layer, spec = make_layer(router="relu", router_bias=True, capacity_factor=capacity_factor, **dict.fromkeys(LOSSES, 0.0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.fill_(-1.0)
    x = tokens(5).requires_grad_(True)
    y, result = layer(x)
    assert torch.all(y == 0) and result.tokens_per_expert.sum() == 0
    assert float(result.dropped_fraction) == 0.0, "no assignment was dropped"
    y.sum().backward()
    _, result = layer(torch.zeros(0, D))
    assert float(result.dropped_fraction) == 0.0, "no assignment was dropped (empty input)"


@pytest.mark.parametrize("router", ["topk", "topp", "expert_choice", "relu"])
def test_empty_input_output_and_backward(router):
    """T = 0 is supported: an empty output, and backward runs."""
    layer, _ = make_layer(router=router)
    x = torch.zeros(0, D, requires_grad=True)
    y, result = layer(x)
    assert y.shape == (0, D)
    (y.sum() + sum(v for v in result.losses.values() if torch.isfinite(v))).backward()
    assert x.grad is None or x.grad.shape == (0, D)
    for name, p in layer.named_parameters():  # nothing to learn from no tokens
        assert p.grad is None or torch.all(p.grad == 0), name
    assert result.tokens_per_expert.tolist() == [0] * E


@pytest.mark.parametrize("router", ["topk", "topp", "expert_choice", "relu"])
def test_empty_input_gives_finite_losses_and_stats(router):
    """T = 0 (an empty micro-batch, an expert-parallel rank with no tokens) must not turn the aux
    losses or the statistics into NaN: a NaN loss poisons the whole training loss."""
    layer, spec = make_layer(router=router)
    y, result = layer(torch.zeros(0, D))
    for name, value in result.losses.items():
        assert torch.isfinite(value), f"loss {name} is {value} for empty input"
    assert torch.isfinite(result.loss)
    assert torch.isfinite(result.experts_per_token), result.experts_per_token
    # and the reference's convention: a mean over no tokens is 0
    both = run_both(layer, spec, torch.zeros(2, 0, D))
    assert set(both.result.losses) == {"balance", "z", "entropy"}
    assert_matches(both, layer)


@pytest.mark.parametrize("shape", [(2, 12), (3, 1, 4), (24,), ()])
def test_leading_dims(shape):
    layer, spec = make_layer(num_shared=1)
    both = run_both(layer, spec, tokens(*shape))
    assert both.y.shape == (*shape, D)
    assert_matches(both, layer)


def test_non_contiguous_input():
    layer, spec = make_layer()
    x = tokens(12, 2).transpose(0, 1)  # [2, 12, D], not contiguous
    assert not x.is_contiguous()
    both = run_both(layer, spec, x)
    assert_matches(both, layer)


@pytest.mark.parametrize("name", ["topk", "cap-topk", "topp", "ec", "relu-biases", "topk-shared-gated"])
def test_backends_agree_with_each_other(name):
    """grouped / loop / grouped_mm: same output and gradients (fp32 rounding), including under
    y.sum().backward() (a zero-stride output gradient)."""
    results = []
    for backend in BACKENDS:
        layer, _ = make_layer(**CONFIGS[name], backend=backend)
        x = tokens(2, 12).requires_grad_(True)
        y, res = layer(x)
        (y.sum() + res.loss).backward()
        results.append((y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    for y, gx, grads in results[1:]:
        assert_close(y, results[0][0], what="y")
        assert_close(gx, results[0][1], what="grad x")
        for n in grads:
            assert_close(grads[n], results[0][2][n], what=f"grad {n}")


# bf16 keeps 8 significant bits (2^-8 ~ 4e-3 relative per rounding) and a token's output
# sums k experts' SwiGLU MLPs, each rounded at every op. Stated tolerance, relative to the
# tensor's scale (max |reference|): outputs 2.5e-2, gradients 5e-2 (measured worst cases on
# these configs: 1.1e-2 and 1.4e-2). Aux losses are computed in float32: 1e-4 relative.
BF16_Y_TOL, BF16_GRAD_TOL = 2.5e-2, 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["topk", "topk-sigmoid-groups", "topp", "ec", "relu", "cap-topk", "topk-shared"])
def test_bf16_within_tolerance(name, backend):
    """A bf16 layer on bf16 input vs the float64 reference on the same bf16 values upcast.
    The router runs in float32 on the upcast values, so routing decisions are the reference's."""
    layer, spec = make_layer(**CONFIGS[name], backend=backend)
    layer = layer.to(torch.bfloat16)
    x = tokens(2, 12).to(torch.bfloat16)
    leaves = f64_leaves(layer)
    xr = f64_leaf(x)
    xl = x.clone().requires_grad_(True)
    y, result = layer(xl)
    assert y.dtype == torch.bfloat16
    ref = moe_forward(xr, leaves, spec)
    scale = float(ref.y.detach().abs().max())
    err = float((y.detach().to(F64) - ref.y.detach()).abs().max())
    assert err <= BF16_Y_TOL * scale, f"bf16 output error {err} > {BF16_Y_TOL} * {scale}"
    for n, value in ref.losses.items():
        torch.testing.assert_close(result.losses[n].to(F64), value.detach(), atol=1e-5, rtol=1e-4)
    # gradients: within bf16 tolerance relative to each tensor's scale
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    ((y.to(F64) * G).sum() + result.loss.to(F64)).backward()
    ((ref.y * G).sum() + ref.loss).backward()
    pairs = [("x", xl.grad, xr.grad)] + [(n, p.grad, leaves[n].grad) for n, p in layer.named_parameters()]
    for n, actual, expected in pairs:
        scale = float(expected.abs().max())
        err = float((actual.to(F64) - expected).abs().max())
        assert err <= BF16_GRAD_TOL * scale + 1e-6, f"bf16 grad {n}: max error {err} vs scale {scale}"


# ----------------------------------------------------------------------------- losses and result


@pytest.mark.parametrize("router", ["topk", "topp", "expert_choice", "relu"])
def test_losses_only_nonzero_coefficients_and_weighted(router):
    layer, spec = make_layer(router=router, balance_coef=0.0, z_coef=0.0, entropy_coef=0.0)
    x = tokens(20)
    y, result = layer(x)
    assert result.losses == {} and float(result.loss) == 0.0
    all_three = dict(balance_coef=1, z_coef=1, entropy_coef=1)
    for coefs in [dict(balance_coef=0.5), dict(z_coef=0.25), dict(entropy_coef=2.0), all_three]:
        layer, spec = make_layer(router=router, **{**dict.fromkeys(LOSSES, 0.0), **coefs})
        both = run_both(layer, spec, x)
        expected = {k.removesuffix("_coef") for k, v in coefs.items() if v}
        assert set(both.result.losses) == expected
        assert_matches(both, layer)
        assert torch.allclose(both.result.loss, sum(both.result.losses.values()))


def test_balance_loss_is_one_when_uniform():
    """Perfectly uniform routing (zero router weight, k = E): every f_e = P_e = 1/E."""
    layer, _ = make_layer(top_k=E, balance_coef=1.0, z_coef=0.0, entropy_coef=0.0, randomise=False)
    with torch.no_grad():
        layer.router.weight.zero_()
    _, result = layer(tokens(10))
    assert result.losses["balance"].item() == pytest.approx(1.0)


def test_expert_choice_balance_loss_is_constant_so_it_is_off_by_default():
    """Under expert choice each expert takes C tokens: f_e = 1/E, so the loss E * sum_e f_e P_e
    is sum_e P_e = 1 whatever the router's weights, with a zero gradient. MoEConfig's default
    balance_coef is then 0 (0.01 for the routers it balances), and an explicit one is kept."""
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="expert_choice", balance_coef=1.0))
    _, result = layer(tokens(12))
    assert result.losses["balance"].item() == pytest.approx(1.0)
    result.losses["balance"].backward()
    assert layer.router.weight.grad.abs().max() < 1e-6
    assert MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="expert_choice").balance_coef == 0.0
    assert MoEConfig(dim=D, num_experts=E, hidden_dim=I).balance_coef == 0.01
    _, result = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="expert_choice"))(tokens(12))
    assert "balance" not in result.losses


def test_trace_returns_routing():
    layer, _ = make_layer()
    _, result = layer(tokens(5))
    assert result.routing is None
    layer.trace = True
    _, result = layer(tokens(5))
    assert result.routing is not None and result.routing.indices.shape == (5, 2)


def test_merge_results():
    layer, _ = make_layer()
    _, a = layer(tokens(5, seed=1))
    _, b = layer(tokens(5, seed=2))
    m = MoEResult.merge([a, b])
    assert torch.equal(m.tokens_per_expert, a.tokens_per_expert + b.tokens_per_expert)
    for n in a.losses:
        torch.testing.assert_close(m.losses[n], a.losses[n] + b.losses[n])


def test_merge_results_by_hand():
    """`MoEResult.merge` as documented: losses, loads and experts per token add up, the dropped
    fraction is the mean, a metric is the mean over the results that report it, logits are
    finite only if every pass's are, routings are dropped."""
    def result(dropped, epk, metrics, finite):
        return MoEResult(
            losses={"z": torch.tensor(1.0)}, tokens_per_expert=torch.tensor([1.0, 2.0]),
            dropped_fraction=torch.tensor(dropped), experts_per_token=torch.tensor(epk),
            metrics={k: torch.tensor(v) for k, v in metrics.items()},
            logits_finite=None if finite is None else torch.tensor(finite),
        )

    m = MoEResult.merge([
        result(0.1, 1.5, {"tls": 0.2, "cls": 0.6}, True),
        result(0.3, 2.0, {"tls": 0.4}, False),
        result(0.5, 0.5, {"tls": 0.9}, None),
    ])
    assert m.losses["z"].item() == 3.0 and m.tokens_per_expert.tolist() == [3.0, 6.0]
    assert m.dropped_fraction.item() == pytest.approx(0.3)
    assert m.experts_per_token.item() == pytest.approx(4.0)
    assert m.metrics["tls"].item() == pytest.approx(0.5) and m.metrics["cls"].item() == pytest.approx(0.6)
    assert m.routing is None and not bool(m.logits_finite)
    assert bool(MoEResult.merge([result(0.0, 1.0, {}, True), result(0.0, 1.0, {}, True)]).logits_finite)
    assert MoEResult.merge([result(0.0, 1.0, {}, None)]).logits_finite is None

def test_layer_with_explicit_modules_matches_config():
    """MoELayer(router, experts) built by hand = build_moe of the equivalent config."""
    layer, spec = make_layer(balance_coef=0.0, z_coef=0.0, entropy_coef=0.0)
    manual = MoELayer(TopKRouter(D, E, 2), SwiGLUExperts(E, D, I))
    manual.load_state_dict(layer.state_dict())
    x = tokens(7)
    torch.testing.assert_close(manual(x)[0], layer(x)[0])


# ----------------------------------------------------------------------------- config


def test_config_round_trip_dict_and_json():
    cfg = MoEConfig(
        dim=32, num_experts=16, hidden_dim=24, router="topk", top_k=4, score_func="sigmoid", n_group=4, topk_group=2,
        route_scale=2.5, selection_bias=True, num_shared=1, shared_gate=True, capacity_factor=1.25, z_coef=1e-3,
        backend="loop",
    )
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for router in ("topp", "expert_choice", "relu"):
        c = MoEConfig(dim=8, num_experts=4, hidden_dim=4, router=router, max_k=2 if router == "topp" else None)
        assert MoEConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_config_built_layer_state_dict_round_trip():
    layer, _ = make_layer(selection_bias=True, num_shared=1)
    cfg = MoEConfig(dim=D, num_experts=E, hidden_dim=I, selection_bias=True, num_shared=1, **LOSSES)
    again = build_moe(MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))))
    again.load_state_dict(layer.state_dict())
    x = tokens(9)
    torch.testing.assert_close(again(x)[0], layer(x)[0])


def test_config_unknown_field_suggests_close_name():
    data = MoEConfig(dim=8, num_experts=4, hidden_dim=4).to_dict()
    data["num_expert"] = data.pop("num_experts")
    with pytest.raises(ValueError, match=r"unknown MoEConfig field 'num_expert'.*did you mean 'num_experts'"):
        MoEConfig.from_dict(data)
    data = MoEConfig(dim=8, num_experts=4, hidden_dim=4).to_dict()
    data["topk"] = 2
    with pytest.raises(ValueError, match=r"did you mean 'top_k'"):
        MoEConfig.from_dict(data)


def test_config_renormalize_default_follows_the_router_kind():
    """Top-k renormalises by default (Mixtral/Qwen3); top-p keeps the raw probabilities (the paper)."""
    from moelab.nn import MoEConfig, build_moe

    assert build_moe(MoEConfig(dim=8, num_experts=4, hidden_dim=4)).router.renormalize is True
    assert build_moe(MoEConfig(dim=8, num_experts=4, hidden_dim=4, router="topp")).router.renormalize is False
    assert build_moe(MoEConfig(dim=8, num_experts=4, hidden_dim=4, router="topp", renormalize=True)).router.renormalize


IDENTITY_CONFIGS = {
    "identity": dict(identity_experts=3),
    "identity-k1": dict(identity_experts=2, top_k=1),
    "identity-no-renorm-shared": dict(identity_experts=2, top_k=3, renormalize=False, route_scale=6.0, num_shared=1),
    "identity-aux-free-bias": dict(identity_experts=4, selection_bias=True),
    "identity-groups": dict(identity_experts=4, top_k=2, n_group=4, topk_group=2, score_func="sigmoid"),
    "identity-k=E+Z": dict(identity_experts=2, top_k=E + 2),
    "identity-capacity": dict(identity_experts=3, capacity_factor=0.75),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(IDENTITY_CONFIGS))
def test_identity_experts_match_reference(name, backend):
    """Zero-computation experts (LongCat-Flash): a slot on one of the router's last Z choices adds
    its weight times the token's input; forward and backward against the per-token reference; the
    load, experts_per_token and capacity count the experts with weights only."""
    layer, spec = make_layer(**IDENTITY_CONFIGS[name], backend=backend)
    assert layer.num_experts == E and layer.router.num_experts == E + spec.identity_experts
    both = run_both(layer, spec, tokens(2, 12))
    assert_no_near_tie(both.ref.routing, ordered=spec.capacity_factor is not None)
    assert_matches(both, layer)
    slots = [e for t in range(24) for e in both.ref.routing.experts(t)]
    assert any(e >= E for e in slots) and any(e < E for e in slots), "the test should use both kinds"
    assert float(both.result.experts_per_token) == pytest.approx(sum(e < E for e in slots) / 24)
    if spec.capacity_factor is not None:
        assert 0 < both.ref.capacity.dropped_fraction < 1, "the capacity test should drop something"
    with torch.no_grad():
        assert_close(layer.eval().infer(tokens(2, 12)), both.ref.y, what="infer")


@pytest.mark.parametrize("T", [1, 3, 40])
def test_identity_experts_infer_equals_forward_on_every_path(T):
    """`infer`'s paths (gathered, expert by expert, one grouped_mm call, every expert) take the
    identity experts' slots as empty ones and add their share once, as `forward` does."""
    from test_decode import PATHS

    layer, _ = make_layer(identity_experts=3, top_k=3)
    x = tokens(T)
    with torch.no_grad():
        expected = layer(x)[0]
        for path, choose in PATHS.items():
            assert_close(choose(layer).infer(x), expected, what=f"always {path}")


def test_a_token_routed_to_identity_experts_alone_returns_its_weighted_input():
    """All of a token's slots on identity experts: its output is the sum of their weights times x,
    no expert runs, and its gradient reaches the router's identity rows."""
    layer, spec = make_layer(identity_experts=2, top_k=2, renormalize=False)
    with torch.no_grad():
        layer.router.weight[E:] = 0.0
        layer.router.weight[:E] = -layer.router.weight[:E].abs()
    x = torch.ones(1, D)  # the experts' logits < 0, the identity experts' 0: both chosen
    y, result = layer(x)
    probs = torch.softmax(layer.router.weight.detach() @ x[0], -1)
    assert_close(y, probs[E:].sum() * x)
    assert result.tokens_per_expert.sum() == 0 and float(result.experts_per_token) == 0
    y.sum().backward()
    assert layer.router.weight.grad[E:].abs().sum() > 0


@pytest.mark.parametrize("bad, match", [
    (dict(identity_experts=-1), "identity_experts must be >= 0"),
    (dict(identity_experts=2, latent_dim=8), "no latent_dim"),
    (dict(identity_experts=2, router="topp"), "identity_experts=2 has no effect without router='topk'"),
    (dict(identity_experts=2, top_k=E + 3), "top_k"),
])  # fmt: skip
def test_identity_experts_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, **bad)


def test_identity_experts_must_leave_an_expert_with_weights():
    router = TopKRouter(D, 4, 2)
    with pytest.raises(ValueError, match=r"identity_experts must be an int in \[0, 4\)"):
        MoELayer(router, SwiGLUExperts(1, D, I), identity_experts=4)
    with pytest.raises(ValueError, match=r"router \(2 experts and 2 identity experts.*does not match experts \(4 experts"):
        MoELayer(router, SwiGLUExperts(4, D, I), identity_experts=2)


def test_sparsity_metrics_of_a_variable_k_layer_count_the_experts_with_weights():
    """A top-p router over 8 experts and 4 identity experts (built by hand: MoEConfig takes identity
    experts with top-k only): TLS is the share of the 8 experts a token leaves idle, an identity
    expert's slot idling nothing."""
    from moelab.nn import TopPRouter

    torch.manual_seed(0)
    layer = MoELayer(TopPRouter(D, E + 4, 0.9), SwiGLUExperts(E, D, I), identity_experts=4, trace=True)
    with torch.no_grad():
        layer.router.weight.mul_(4.0)
        result = layer(tokens(2, 12))[1]
    chosen = result.routing.indices
    computed = ((chosen >= 0) & (chosen < E)).sum(-1).float()
    assert (chosen >= E).any(), "the test should route to identity experts"
    assert result.metrics["tls"].item() == pytest.approx(1 - (computed / E).mean().item())
