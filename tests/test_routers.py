"""Every router against the naive per-token reference (tests/reference.py), forward and backward,
and aux-loss-free balancing (selection_bias + attach_selection_bias_update)."""

import pytest
import torch
from reference import (
    F64,
    assert_close,
    assert_no_near_tie,
    f64_leaf,
    route_expert_choice,
    route_hash,
    route_relu,
    route_topk,
    route_topp,
)

from moelab.nn import (
    ComputeBudget,
    ExpertChoiceRouter,
    HashRouter,
    MoEConfig,
    MoELayer,
    ReLURouter,
    ScaledRMSNorm,
    SimilarityRouter,
    SparseMixerRouter,
    SwiGLUExperts,
    TopKRouter,
    TopPRouter,
    attach_selection_bias_update,
    build_moe,
)

T, D, E = 24, 12, 8

TOPK_SETTINGS = {
    "k1": dict(top_k=1),
    "k2": dict(top_k=2),
    "k2-no-renorm": dict(top_k=2, renormalize=False),
    "k3-route-scale": dict(top_k=3, route_scale=2.5),
    "k=E": dict(top_k=E),
    "k=E-no-renorm": dict(top_k=E, renormalize=False),
    "sigmoid-k2": dict(top_k=2, score_func="sigmoid"),
    "sigmoid-no-renorm-scale": dict(top_k=3, score_func="sigmoid", renormalize=False, route_scale=1.7),
    "groups-softmax": dict(top_k=3, n_group=4, topk_group=2),
    "groups-sigmoid": dict(top_k=4, score_func="sigmoid", n_group=4, topk_group=2, route_scale=2.5),
    "groups-sigmoid-1-of-2": dict(top_k=2, score_func="sigmoid", n_group=2, topk_group=1),
    "groups-of-one": dict(top_k=2, score_func="sigmoid", n_group=8, topk_group=3),
    "groups-softmax-top2": dict(top_k=3, n_group=4, topk_group=2, group_score="top2"),  # Mistral 4
    "groups-softmax-top2-1-of-2": dict(top_k=2, n_group=2, topk_group=1, group_score="top2", renormalize=False),
    "groups-softmax-top2-all-kept": dict(top_k=3, n_group=4, topk_group=4, group_score="top2"),
    "groups-softmax-top2-of-one": dict(top_k=2, n_group=8, topk_group=3, group_score="top2"),  # its best alone
    "one-group-softmax-top2": dict(top_k=2, group_score="top2"),
    "groups-sigmoid-max": dict(top_k=3, score_func="sigmoid", n_group=4, topk_group=2, group_score="max"),
    "router-bias": dict(top_k=2, bias=True),
    "expert-bias": dict(top_k=2, selection_bias=True),
    "expert-bias-sigmoid-groups": dict(top_k=3, score_func="sigmoid", n_group=4, topk_group=2, selection_bias=True),
    "expert-bias-on-logits": dict(top_k=3, score_func="sigmoid", selection_bias=True, select_on_logits=True),
    "gemma4-normed-input-expert-scale": dict(top_k=2, expert_scale=True, input_norm=True),
    "expert-scale-sigmoid-groups": dict(top_k=3, score_func="sigmoid", n_group=4, topk_group=2, expert_scale=True),
    "sqrtsoftplus-k2-scale": dict(top_k=2, score_func="sqrtsoftplus", route_scale=1.5),
    "sqrtsoftplus-bias-groups": dict(top_k=3, score_func="sqrtsoftplus", n_group=4, topk_group=2, selection_bias=True),
    "softcap-sigmoid-bias": dict(top_k=2, score_func="sigmoid", selection_bias=True, logit_softcap=1.5),  # Laguna
    "softcap-softmax": dict(top_k=2, logit_softcap=0.8),
    # Muse Spark: sigmoid(logits x output_multiplier), the correction bias steering selection, renormalised, x 2.5
    "logit-scale-sigmoid-bias": dict(top_k=2, score_func="sigmoid", selection_bias=True, logit_scale=0.4, route_scale=2.5),
    "logit-scale-softmax": dict(top_k=2, logit_scale=0.5),  # `choose`'s top-k-logits path
    "logit-scale-softcap-softmax": dict(top_k=2, logit_scale=2.0, logit_softcap=1.5),  # scaled, then capped
}


def _topk_router(name: str) -> TopKRouter:
    """TopKRouter with TOPK_SETTINGS[name]; input_norm=True: Gemma 4's form (times D^-0.5), its eps 0.5
    so that the epsilon's place shows at unit-scale inputs."""
    settings = dict(TOPK_SETTINGS[name])
    if settings.pop("input_norm", False):
        settings["input_norm"] = ScaledRMSNorm(D, 0.5, multiplier=D**-0.5)
    return TopKRouter(D, E, **settings)
TOPP_SETTINGS = {
    "p0.1": dict(top_p=0.1),
    "p0.4": dict(top_p=0.4),
    "p0.7-renorm": dict(top_p=0.7, renormalize=True),
    "p0.9-maxk2": dict(top_p=0.9, max_k=2),
    "p0.6-maxk3-renorm-bias": dict(top_p=0.6, max_k=3, renormalize=True, bias=True),
    "p1.0": dict(top_p=1.0),
}
EC_SETTINGS = {
    "c0.5": dict(capacity_factor=0.5),
    "c1": dict(capacity_factor=1.0),
    "c2": dict(capacity_factor=2.0),
    "c=E": dict(capacity_factor=float(E)),
    "c2-bias": dict(capacity_factor=2.0, bias=True),
}
RELU_SETTINGS = {"default": dict(), "bias": dict(bias=True)}


def _randomise(router: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter and buffer the router has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 1.5 / D**0.5)
        if router.bias is not None:
            router.bias.copy_(torch.randn(E, generator=g) * 0.3)
        if getattr(router, "selection_bias", None) is not None:
            router.selection_bias.copy_(torch.randn(E, generator=g) * 0.1)
        if hasattr(router, "norm_weight"):
            router.norm_weight.copy_(1 + 0.5 * torch.randn(E, generator=g))
        if getattr(router, "expert_scale", None) is not None:
            router.expert_scale.copy_(1 + 0.5 * torch.randn(E, generator=g))
        if router.input_norm is not None:
            router.input_norm.weight.copy_(1 + 0.5 * torch.randn(D, generator=g))


def _ref(router, x, w, b, g, extra):
    if isinstance(router, TopKRouter):
        eb = None if router.selection_bias is None else router.selection_bias.to(F64)
        norm = router.input_norm
        return route_topk(
            x, w, b, top_k=router.top_k, score_func=router.score_func, renormalize=router.renormalize,
            route_scale=router.route_scale, n_group=router.n_group, topk_group=router.topk_group,
            group_score=router.group_score, selection_bias=eb,
            select_on_logits=router.select_on_logits, expert_scale=extra.get("expert_scale"),
            input_norm=None if norm is None else (extra["input_norm.weight"], norm.eps, norm.multiplier),
            logit_softcap=router.logit_softcap, logit_scale=router.logit_scale,
        )
    if isinstance(router, TopPRouter):
        return route_topp(x, w, b, top_p=router.top_p, max_k=router.top_k, renormalize=router.renormalize)
    if isinstance(router, ExpertChoiceRouter):
        return route_expert_choice(x, w, b, capacity_factor=router.capacity_factor)
    return route_relu(x, w, b, norm_weight=g, eps=router.eps)


def check_router(router, x, *, seed=0):
    """Indices (exact slots), weights, logits, probs and the gradients of all of them w.r.t. x and
    the router parameters equal the reference's."""
    xr = f64_leaf(x)
    w = f64_leaf(router.weight)
    b = None if router.bias is None else f64_leaf(router.bias)
    norm_leaf = f64_leaf(router.norm_weight) if isinstance(router, ReLURouter) else None
    extra = {
        name: f64_leaf(router.get_parameter(name))
        for name in ("expert_scale", "input_norm.weight")
        if name in dict(router.named_parameters())
    }  # TopKRouter's per-expert scale and input norm (Gemma 4)
    ref = _ref(router, xr, w, b, norm_leaf, extra)
    assert_no_near_tie(ref, ordered=True)  # exact slots are compared below

    xl = x.clone().requires_grad_(True)
    routing = router(xl)
    K = ref.num_slots
    assert routing.indices.shape == (x.shape[0], K) and routing.indices.dtype == torch.int64
    assert routing.weights.shape == (x.shape[0], K) and routing.weights.dtype == torch.float32
    assert routing.logits.shape == routing.probs.shape == (x.shape[0], E)

    expected_idx = torch.full((x.shape[0], K), -1, dtype=torch.long)
    weight_rows = []
    for t, choice in enumerate(ref.choices):
        row = [xr.new_zeros(())] * K
        for slot, e, wt in choice:
            expected_idx[t, slot] = e
            row[slot] = wt
        weight_rows.append(torch.stack(row))
    ref_weights = torch.stack(weight_rows)
    assert torch.equal(routing.indices, expected_idx), (routing.indices, expected_idx)
    assert torch.all(routing.weights[routing.indices < 0] == 0), "empty slots must have weight 0"
    assert_close(routing.weights.double(), ref_weights.detach())
    assert_close(routing.logits.double(), ref.logits.detach())
    assert_close(routing.probs.double(), ref.probs.detach())

    g = torch.Generator().manual_seed(seed)
    shapes = (ref_weights.shape, (x.shape[0], E), (x.shape[0], E))
    gw, gl, gp = (torch.randn(s, generator=g, dtype=F64) for s in shapes)
    router.zero_grad(set_to_none=True)
    for weights, logits, probs in [(routing.weights, routing.logits, routing.probs), (ref_weights, ref.logits, ref.probs)]:
        ((weights.double() * gw).sum() + (logits.double() * gl).sum() + (probs.double() * gp).sum()).backward()
    assert_close(xl.grad.double(), xr.grad)
    assert_close(router.weight.grad.double(), w.grad)
    if b is not None:
        assert_close(router.bias.grad.double(), b.grad)
    if norm_leaf is not None:
        assert_close(router.norm_weight.grad.double(), norm_leaf.grad)
    for name, leaf in extra.items():
        assert_close(router.get_parameter(name).grad.double(), leaf.grad, what=name)
    return routing, ref


def _x(seed=1, n=T):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(TOPK_SETTINGS))
def test_topk_router_matches_reference(name):
    torch.manual_seed(0)
    router = _topk_router(name)
    _randomise(router, seed=3)
    check_router(router, _x())


@pytest.mark.parametrize("name", list(TOPK_SETTINGS))
def test_topk_router_choice_for_inference_matches_the_reference(name):
    """`choose` (the inference path; softmax renormalised over the top k: a softmax over the top k
    logits) gives the reference's indices and weights, and their gradients."""
    torch.manual_seed(0)
    router = _topk_router(name)
    _randomise(router, seed=3)
    x = _x()
    check_router(router, x)  # forward against the reference
    xl = x.clone().requires_grad_(True)
    indices, weights = router.choose(xl)
    routing = router(x)
    assert torch.equal(indices, routing.indices)
    assert_close(weights.double(), routing.weights.double())
    grad_out = torch.randn(weights.shape, generator=torch.Generator().manual_seed(5))
    (x_grad,) = torch.autograd.grad((weights * grad_out).sum(), xl)
    xf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((router(xf).weights * grad_out).sum(), xf)
    assert_close(x_grad.double(), expected.double())


def test_the_choice_for_inference_checks_its_logits_and_keeps_hooks():
    """A NaN or +inf logit is refused as by `forward`; with a forward hook on the router, or logits
    of the instance's own, `choose` calls `forward` (a trace's tap sees the routing)."""
    for router in (TopKRouter(D, E, top_k=2), TopKRouter(D, E, top_k=2, logit_softcap=1.0)):
        for bad in (float("nan"), float("inf")):  # a cap would turn an inf logit into the cap: checked before it
            x = _x()
            x[3, 0] = bad
            for route in (router.choose, router):
                with pytest.raises(ValueError, match="router logits contain NaN or Inf"):
                    route(x)
    router = TopKRouter(D, E, top_k=2)
    seen = []
    router.register_forward_hook(lambda module, args, out: seen.append(out))
    indices, _ = router.choose(_x())
    assert len(seen) == 1 and torch.equal(seen[0].indices, indices)
    masked = TopKRouter(D, E, top_k=2)  # an instance's own logits (moelab.hf.edit masks experts so)
    logits = masked.router_logits
    masked.router_logits = lambda x: logits(x).index_fill(-1, torch.tensor([0, 1, 2]), float("-inf"))
    indices, weights = masked.choose(_x())
    assert indices.min() >= 3 and torch.equal(weights, masked(_x()).weights)


@pytest.mark.parametrize("setting", ["logit_softcap", "logit_scale"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_a_logit_softcap_or_scale_must_be_positive_and_finite(setting, value):
    with pytest.raises(ValueError, match=f"{setting} must be a positive finite number"):
        TopKRouter(D, E, top_k=2, **{setting: value})


def test_the_choice_for_inference_keeps_rexmoe_masks():
    """A ReXMoE router partway through its progressive schedule (no selection bias) masks the
    experts that are not yet candidates: `choose` must not take its plain top-k of the logits,
    which would pick masked experts, but route as `forward` does."""
    from moelab.nn.rexmoe import ReuseRouter

    torch.manual_seed(0)
    router = ReuseRouter(D, 4, 2, 0, 2)  # a pool of 8, experts 0-3 its own
    router.set_progress(0.0)  # only the own experts 0-3 are candidates
    x = _x() * 3
    assert router.router_logits(x).topk(2, dim=-1).indices.max() >= 4, "some token should prefer a masked expert"
    indices, weights = router.choose(x)
    routing = router(x)
    assert indices.max() < 4
    assert torch.equal(indices, routing.indices) and torch.equal(weights, routing.weights)


@pytest.mark.parametrize("bad", ["wide", "narrow", "int"])
def test_a_router_called_directly_rejects_bad_input(bad):
    """The router's own checks (not only the layer's): x must be [T, dim] and floating point; an
    integer x would otherwise be cast to float and routed silently."""
    router = TopKRouter(D, E, top_k=2)
    x = {"wide": torch.randn(3, D + 1), "narrow": torch.randn(3, D - 1), "int": torch.ones(3, D, dtype=torch.long)}[bad]
    match = "floating-point" if bad == "int" else rf"router expects x of shape \[tokens, {D}\]"
    with pytest.raises(ValueError, match=match):
        router(x)


@pytest.mark.parametrize("router", [TopKRouter, TopPRouter, ExpertChoiceRouter, ReLURouter])
@pytest.mark.parametrize("sizes", [dict(dim=0, num_experts=E), dict(dim=D, num_experts=0)])
def test_routers_refuse_empty_sizes(router, sizes):
    extra = {TopKRouter: dict(top_k=1), TopPRouter: dict(top_p=0.5)}.get(router, {})
    with pytest.raises(ValueError, match=r"(dim|num_experts) must be >= 1"):
        router(**sizes, **extra)


@pytest.mark.parametrize("name", list(TOPP_SETTINGS))
def test_topp_router_matches_reference(name):
    torch.manual_seed(0)
    router = TopPRouter(D, E, **TOPP_SETTINGS[name])
    _randomise(router, seed=4)
    routing, ref = check_router(router, _x())
    # variable k: the number of experts really varies across tokens (except where capped)
    counts = (routing.indices >= 0).sum(-1)
    if name in ("p0.4", "p0.7-renorm", "p0.6-maxk3-renorm-bias"):
        assert counts.min() < counts.max()
    if name == "p1.0":
        assert (counts == E).all()


@pytest.mark.parametrize("name", list(EC_SETTINGS))
def test_expert_choice_router_matches_reference(name):
    torch.manual_seed(0)
    router = ExpertChoiceRouter(D, E, **EC_SETTINGS[name])
    _randomise(router, seed=5)
    routing, _ = check_router(router, _x())
    per_expert = torch.stack([(routing.indices == e).sum(0) for e in range(E)]).sum(-1)
    assert per_expert.tolist() == [router.capacity(T)] * E
    if EC_SETTINGS[name]["capacity_factor"] <= 1.0:
        assert ((routing.indices >= 0).sum(-1) == 0).any(), "expected some tokens with zero experts"


@pytest.mark.parametrize("name", list(RELU_SETTINGS))
def test_relu_router_matches_reference(name):
    torch.manual_seed(0)
    router = ReLURouter(D, E, **RELU_SETTINGS[name])
    _randomise(router, seed=6)
    routing, _ = check_router(router, _x())
    counts = (routing.indices >= 0).sum(-1)
    assert counts.min() < counts.max()


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(score_func="sigmoid", route_scale=2.5), dict(score_func="softmax", renormalize=False)],
    ids=["sqrtsoftplus", "sigmoid-scaled", "softmax-raw"],
)
def test_hash_router_matches_reference(settings):
    """DeepSeek-V4's hash routing: each token's experts come from its id's row of the table (a row
    naming an expert twice included), weighted by the learned gate's scores, forward and backward."""
    torch.manual_seed(0)
    V, K = 10, 3
    router = HashRouter(D, E, V, K, **settings)
    _randomise(router, seed=8)
    table = torch.stack([torch.randperm(E)[:K] for _ in range(V)])
    table[4] = torch.tensor([2, 5, 2])  # after a merge: expert 2 twice
    router.token_experts.copy_(table)
    ids = torch.randint(0, V, (T,))
    ids[0] = 4
    x = _x()
    xr, w = f64_leaf(x), f64_leaf(router.weight)
    ref = route_hash(xr, w, ids.tolist(), table.tolist(), score_func=router.score_func,
                     renormalize=router.renormalize, route_scale=router.route_scale)  # fmt: skip
    xl = x.clone().requires_grad_(True)
    routing = router(xl, ids)
    assert torch.equal(routing.indices, table[ids])
    expected = torch.stack([torch.stack([wt for _, _, wt in choice]) for choice in ref.choices])
    assert_close(routing.weights.double(), expected.detach())
    assert_close(routing.logits.double(), ref.logits.detach())
    assert_close(routing.probs.double(), ref.probs.detach())
    g = torch.randn(expected.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    (routing.weights.double() * g).sum().backward()
    (expected * g).sum().backward()
    assert_close(xl.grad.double(), xr.grad)
    assert_close(router.weight.grad.double(), w.grad)
    indices, weights = router.choose(x, ids)  # the inference path's: the chosen experts' scores alone
    assert torch.equal(indices, routing.indices)
    assert_close(weights.double(), expected.detach())


def test_hash_router_needs_the_token_ids():
    router = HashRouter(D, E, 10, 2)
    for ids, match in ((None, "pass the 24 tokens' ids"), (torch.zeros(3, dtype=torch.long), "got \\[3\\]"),
                       (torch.zeros(T), "integer token ids"), (torch.full((T,), 10), "token id 10 is outside the hash table's vocabulary 0..9"),
                       (torch.full((T,), -1), "token id -1 is outside")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            router(_x(), ids)


def test_hash_routed_layer_runs_the_tables_experts():
    """An MoE layer with a hash router computes, on its training and inference paths, the naive sum
    over each token's table row of weight x expert output, and refuses input without token ids."""
    torch.manual_seed(0)
    V, K = 10, 2
    layer = build_moe(MoEConfig(dim=D, num_experts=E, top_k=K, hidden_dim=16))
    router = HashRouter(D, E, V, K)
    _randomise(router, seed=9)
    router.token_experts.copy_(torch.stack([torch.randperm(E)[:K] for _ in range(V)]))
    layer.router = router
    ids = torch.randint(0, V, (3, 5))
    x = torch.randn(3, 5, D)
    routing = router(x.reshape(-1, D), ids.reshape(-1))
    flat = x.reshape(-1, D)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(K):
            e = int(routing.indices[t, k])
            expected[t] += routing.weights[t, k] * layer.experts(flat[t : t + 1], [0] * e + [1] + [0] * (E - e - 1))[0]
    y, _ = layer(x, context={"input_ids": ids})
    assert_close(y.reshape(-1, D).double(), expected.double().detach())
    with torch.no_grad():
        assert_close(layer.infer(x, context={"input_ids": ids}).reshape(-1, D).double(), expected.double())
    with pytest.raises(ValueError, match="pass the 15 tokens' ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"give ids of shape \[3, 5\]"):
        layer(x, context={"input_ids": ids[:, :4]})


def test_expert_choice_capacity_rule():
    router = ExpertChoiceRouter(D, E, capacity_factor=2.0)
    assert [router.capacity(n) for n in (1, 3, 4, 5, 24)] == [1, 1, 1, 2, 6]
    assert ExpertChoiceRouter(D, 2, capacity_factor=2.0).capacity(5) == 5  # capped at T


@pytest.mark.parametrize(
    "router",
    [
        lambda: TopKRouter(D, E, 2),
        lambda: TopKRouter(D, E, 3, score_func="sigmoid", n_group=4, topk_group=2),
        lambda: TopPRouter(D, E, 0.5),
        lambda: ExpertChoiceRouter(D, E, capacity_factor=1.0),
        lambda: ReLURouter(D, E),
    ],
)
def test_single_token_and_bf16_input(router):
    torch.manual_seed(0)
    r = router()
    _randomise(r, seed=7)
    check_router(r, _x(seed=2, n=1))
    # router maths is float32 whatever the input dtype: bf16 input routes like its fp32 upcast
    x = _x(seed=2).to(torch.bfloat16)
    a, b = r(x), r(x.float())
    assert a.weights.dtype == torch.float32 and torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights, atol=0, rtol=0)


# ----------------------------------------------------------------------------- aux-loss-free bias


def test_expert_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    router = TopKRouter(D, E, 2, selection_bias=True)
    x = _x()
    plain = router(x)
    with torch.no_grad():
        router.selection_bias[5] = 10.0  # expert 5 wins every token's first slot
    biased = router(x)
    assert (biased.indices[:, 0] == 5).all()
    scores = plain.logits.softmax(-1)
    chosen = scores.gather(1, biased.indices)
    torch.testing.assert_close(biased.weights, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(biased.probs, plain.probs)  # losses see the un-biased distribution


def test_a_bias_on_the_logits_chooses_otherwise_than_on_the_scores():
    """Kolibri1's rule (top-k of logits + bias) against DeepSeek-V3's (scores + bias): the same bias
    picks other experts (sigmoid flattens large logits, so a bias moves a strong expert's score less
    than its logit), and the weights stay the chosen experts' sigmoid scores either way."""
    torch.manual_seed(0)
    on_scores = TopKRouter(D, E, 2, score_func="sigmoid", selection_bias=True)
    on_logits = TopKRouter(D, E, 2, score_func="sigmoid", selection_bias=True, select_on_logits=True)
    on_logits.load_state_dict(on_scores.state_dict())
    with torch.no_grad():
        for router in (on_scores, on_logits):
            router.weight.mul_(8)
            router.selection_bias.copy_(torch.linspace(0, 0.7, E))
    x = _x()
    a, b = on_scores(x), on_logits(x)
    assert not torch.equal(a.indices, b.indices)
    expected = torch.topk(b.logits + on_logits.selection_bias, 2).indices
    assert torch.equal(b.indices, expected)
    chosen = b.logits.sigmoid().gather(1, b.indices)
    torch.testing.assert_close(b.weights, chosen / chosen.sum(-1, keepdim=True))


def test_a_bias_on_the_logits_is_refused_with_expert_groups():
    with pytest.raises(ValueError, match="select_on_logits with expert groups is not defined"):
        TopKRouter(D, E, 2, score_func="sigmoid", n_group=2, topk_group=1, select_on_logits=True)


def test_expert_bias_is_a_buffer_without_gradient():
    router = TopKRouter(D, E, 2, selection_bias=True)
    assert "selection_bias" not in dict(router.named_parameters())
    assert "selection_bias" in router.state_dict()
    assert "tokens_per_expert" not in router.state_dict()  # a transient counter
    with torch.no_grad():
        router.selection_bias.copy_(torch.randn(E))
    routing = router(_x())
    (routing.weights.sum() + routing.probs.pow(2).sum()).backward()
    assert not router.selection_bias.requires_grad and router.selection_bias.grad is None
    assert router.weight.grad is not None


def _reference_load(layer, x, bias):
    """Tokens per expert that the reference top-k picks with the given bias."""
    W = layer.router.weight.detach().to(F64)
    ref = route_topk(x.to(F64).reshape(-1, D), W, top_k=layer.router.top_k, selection_bias=bias.to(F64))
    load = torch.zeros(E)
    for t in range(len(ref.choices)):
        for e in ref.experts(t):
            load[e] += 1
    return load


def test_attach_selection_bias_update_moves_bias_by_sign_of_load_gap():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=D, num_experts=E, hidden_dim=8, top_k=2, selection_bias=True, balance_coef=0.0)
    layer = build_moe(cfg)
    with torch.no_grad():
        layer.router.weight.mul_(3)  # an unbalanced router
    rate = 0.01
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    handle = attach_selection_bias_update(opt, layer, rate)
    weights_before = layer.router.weight.detach().clone()
    for step in range(3):
        bias = layer.router.selection_bias.clone()
        xs = [torch.randn(2, 16, D) for _ in range(2)]  # two micro-batches before the step
        load = sum(_reference_load(layer, x, bias) for x in xs)
        for x in xs:
            y, res = layer(x)
            y.pow(2).mean().backward()
        assert layer.router.tokens_per_expert.tolist() == load.tolist()
        opt.step()
        opt.zero_grad()
        expected = bias + rate * torch.sign(load.mean() - load)
        assert torch.equal(layer.router.selection_bias, expected), (layer.router.selection_bias, expected)
        assert layer.router.tokens_per_expert.abs().sum() == 0, "counter must reset after the update"
        assert not torch.equal(expected, bias)
    assert not torch.equal(layer.router.weight, weights_before)  # the optimizer still updates weights

    # eval mode does not count tokens, so the next step leaves the bias alone
    layer.eval()
    bias = layer.router.selection_bias.clone()
    layer(torch.randn(8, D))[0].sum().backward()
    assert layer.router.tokens_per_expert.abs().sum() == 0
    opt.step()
    assert torch.equal(layer.router.selection_bias, bias)

    # once removed, the hook no longer runs
    layer.train()
    handle.remove()
    layer(torch.randn(8, D))[0].sum().backward()
    opt.step()
    assert torch.equal(layer.router.selection_bias, bias)


def test_attach_selection_bias_update_covers_every_layer():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=D, num_experts=E, hidden_dim=8, selection_bias=True)
    model = torch.nn.ModuleList([build_moe(cfg), build_moe(cfg)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    attach_selection_bias_update(opt, model, rate=0.5)
    for layer in model:
        layer(torch.randn(32, D) * 3)[0].sum().backward()
    opt.step()
    for layer in model:
        assert layer.router.selection_bias.abs().sum() > 0
        assert set(layer.router.selection_bias.unique().tolist()) <= {-0.5, 0.0, 0.5}


def test_selection_bias_update_leaves_rexmoe_masked_experts_alone():
    """Experts the progressive schedule still masks take no load; they keep their bias, and the mean
    load the others are held to is the candidates' (before, a masked expert's bias rose every step)."""
    from moelab.nn.rexmoe import ReuseRouter

    torch.manual_seed(0)
    router = ReuseRouter(D, 4, 2, 0, 2, selection_bias=True)  # a pool of 8, experts 0-3 its own
    router.set_progress(0.5)  # own experts and the 2 nearest foreign ones: 4 and 5
    candidates = router.candidates.clone()
    router.train()
    routing = router(torch.randn(64, D) * 3)
    assert candidates[routing.indices].all()
    load = torch.bincount(routing.indices.flatten(), minlength=8).float()
    assert torch.equal(router.tokens_per_expert, load)
    router.update_selection_bias(0.25)
    mean = load[candidates].mean()
    expected = torch.where(candidates, 0.25 * torch.sign(mean - load), torch.zeros(8))
    assert torch.equal(router.selection_bias, expected)
    assert (router.selection_bias[~candidates] == 0).all() and router.selection_bias[candidates].abs().sum() > 0


def test_compute_budget_moves_each_experts_bias_by_its_share_gap_and_holds_the_identity_experts():
    """LongCat-Flash's rule on a worked example: 2 experts and 2 identity experts, top-2, K_e = 1,
    loads [3, 1, 0, 4] over 4 tokens: each expert's bias moves by rate * (K_e / (K N) - T_i / (K T)),
    = 0.5 * (1/4 - 3/8) and 0.5 * (1/4 - 1/8); the identity experts' stay."""
    router = TopKRouter(D, 4, 2, renormalize=False, selection_bias=True, budget=ComputeBudget(2, 1.0))
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        router.tokens_per_expert.copy_(torch.tensor([3.0, 1.0, 0.0, 4.0]))
    router.update_selection_bias(0.5)
    expected = torch.tensor([0.1 - 0.0625, 0.2 + 0.0625, 0.3, 0.4])
    assert torch.allclose(router.selection_bias, expected, atol=1e-7, rtol=0)
    assert not router.tokens_per_expert.any()


@pytest.mark.parametrize("target", [0.5, 1.8])
def test_compute_budget_steers_the_experts_computed_per_token_to_its_target(target):
    """From a start far from the target (about 1.3 of top-2 among 8 experts and 4 identity experts),
    the updates bring the experts computed per token to K_e and even out the experts' loads; the
    plain update (no budget) balances all 12 choices and stays near 2 * 8 / 12."""
    torch.manual_seed(0)
    x = torch.randn(2048, D)

    def computed_after_updates(target):
        cfg = MoEConfig(
            dim=D, num_experts=8, identity_experts=4, hidden_dim=8, top_k=2, renormalize=False,
            selection_bias=True, computed_experts_target=target, bias_update_rate=0.5 if target else 1e-2,
        )  # fmt: skip
        layer = build_moe(cfg)
        for _ in range(60):
            layer(x)[0].sum().backward()
            load = layer.router.tokens_per_expert.clone()
            layer.router.update_selection_bias(cfg.bias_update_rate)
        return load[:8].sum().item() / len(x), load[:8]

    start, _ = computed_after_updates(None)
    assert abs(start - 2 * 8 / 12) < 0.1 and abs(start - target) > 0.4
    computed, expert_loads = computed_after_updates(target)
    assert abs(computed - target) < 0.02, computed
    assert expert_loads.max() < 1.2 * expert_loads.mean(), expert_loads


def test_compute_budget_needs_identity_experts_a_selection_bias_and_a_target_within_top_k():
    needs = r"computed_experts_target=1.0 has no effect without identity_experts >= 1 and selection_bias=True"
    with pytest.raises(ValueError, match=needs + r" \(router='topk'\)"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=8, selection_bias=True, computed_experts_target=1.0)
    with pytest.raises(ValueError, match=needs):
        MoEConfig(dim=D, num_experts=E, hidden_dim=8, identity_experts=2, computed_experts_target=1.0)
    with pytest.raises(ValueError, match=needs + r" \(router='topp'\)"):  # not "set selection_bias", which topp refuses
        MoEConfig(dim=D, num_experts=E, hidden_dim=8, router="topp", computed_experts_target=1.0)
    for bad in (0.0, 2.5, -1.0):
        with pytest.raises(ValueError, match=r"computed_experts_target .* must lie in \(0, min\(top_k, num_experts\) = 2\]"):
            MoEConfig(dim=D, num_experts=E, hidden_dim=8, identity_experts=2, selection_bias=True, computed_experts_target=bad)
    with pytest.raises(ValueError, match="build the router with selection_bias=True"):
        TopKRouter(D, 6, 2, budget=ComputeBudget(4, 1.0))
    with pytest.raises(ValueError, match=r"num_experts must be an int in \[1, 6\)"):
        TopKRouter(D, 6, 2, selection_bias=True, budget=ComputeBudget(6, 1.0))
    with pytest.raises(ValueError, match=r"target .* must lie in \(0, min\(top_k, num_experts\) = 1\]"):
        TopKRouter(D, 6, 2, selection_bias=True, budget=ComputeBudget(1, 1.5))


def test_rexmoe_masked_experts_are_not_chosen_whatever_their_selection_bias():
    """A masked expert scores 0; a large selection bias must not bring it back into the choice
    (the mask applies after the bias is added)."""
    from moelab.nn.rexmoe import ReuseRouter

    torch.manual_seed(0)
    router = ReuseRouter(D, 4, 2, 0, 2, selection_bias=True)  # a pool of 8, experts 0-3 its own
    router.set_progress(0.0)  # only the own experts are candidates
    with torch.no_grad():
        router.selection_bias[4:] = 10.0
    routing = router(_x())
    assert routing.indices.max() < 4 and torch.all(routing.weights > 0)


def test_load_is_counted_only_in_training_forwards_with_gradients():
    """tokens_per_expert counts a forward in training mode with gradients enabled, not one in eval
    mode nor one under no_grad (e.g. the first pass of reentrant activation checkpointing, whose
    recomputation would count the tokens a second time)."""
    torch.manual_seed(0)
    router = TopKRouter(D, E, 2, selection_bias=True)
    x = _x()
    router.eval()
    router(x)
    router.train()
    with torch.no_grad():
        router(x)
    assert not router.tokens_per_expert.any()
    routing = router(x)
    expected = torch.bincount(routing.indices.flatten(), minlength=E).float()
    assert torch.equal(router.tokens_per_expert, expected)

def test_selection_bias_and_load_counter_stay_float32_when_the_router_is_cast():
    """A bf16 counter stops at 256 (256 + 1 rounds to 256) and a bf16 bias of 0.5 cannot take a step
    of 1e-3; casting the layer keeps both float32, its weights cast."""
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=8, selection_bias=True)).to(torch.bfloat16)
    router = layer.router
    assert router.weight.dtype == torch.bfloat16
    assert router.selection_bias.dtype == router.tokens_per_expert.dtype == torch.float32
    with torch.no_grad():
        router.selection_bias.fill_(0.5)
    y, _ = layer(torch.randn(2048, D, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert router.tokens_per_expert.sum() == 2048 * 2 and router.tokens_per_expert.max() > 256
    router.update_selection_bias(1e-3)
    steps = torch.tensor([0.5 - 1e-3, 0.5, 0.5 + 1e-3], dtype=torch.float32)
    assert torch.isin(router.selection_bias, steps).all()
    assert (router.selection_bias != 0.5).any()
    assert layer.to(torch.float16).router.selection_bias.dtype == torch.float32  # any cast down
    assert layer.to(torch.float64).router.selection_bias.dtype == torch.float64  # up is kept
    router.selection_bias = router.selection_bias.to(torch.bfloat16)  # as load_state_dict(assign=True) may leave it
    assert layer.to(torch.bfloat16).router.selection_bias.dtype == torch.float32


def test_attach_selection_bias_update_needs_a_balancing_router():
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=8))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="selection_bias=True"):
        attach_selection_bias_update(opt, layer)
    with pytest.raises(ValueError, match="selection_bias=True"):
        layer.router.update_selection_bias(0.1)


@pytest.mark.parametrize("top_p,expected", [(0.25, 1), (0.2500001, 2), (0.5, 2), (0.75, 3), (0.76, 4), (1.0, 4)])
def test_topp_threshold_is_strict(top_p, expected):
    """Four equally likely experts (probabilities exactly 0.25; masses before them exactly 0,
    0.25, 0.5, 0.75): an expert is kept iff the mass before it is < top_p, so a cumulative
    probability that lands exactly on top_p stops there (the expert that reaches p is the last)."""
    router = TopPRouter(D, 4, top_p)
    with torch.no_grad():
        router.weight.zero_()
    routing = router(_x(n=3))
    assert torch.all(routing.probs == 0.25)
    assert ((routing.indices >= 0).sum(-1) == expected).all()
    assert torch.all(routing.weights[routing.indices >= 0] == 0.25)


@pytest.mark.parametrize("max_k", [None, 2])
def test_topp_one_keeps_max_k_experts_even_when_peaked(max_k):
    """top_p = 1 is in the allowed range (0, 1]: the mass before any expert is < 1 (every softmax
    probability is > 0), so every token keeps max_k experts. A peaked router (one logit 20 above
    the rest: the others' probabilities ~2e-9) must not lose them to float32 rounding of the
    cumulative sum to exactly 1.0."""
    router = TopPRouter(D, 4, 1.0, max_k=max_k, bias=True)
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([20.0, 0.0, 0.0, 0.0]))
    x = _x(n=3)
    ref = route_topp(x.double(), router.weight.double(), router.bias.double(), top_p=1.0, max_k=max_k)
    assert [len(c) for c in ref.choices] == [max_k or 4] * 3
    routing = router(x)
    assert ((routing.indices >= 0).sum(-1) == (max_k or 4)).all(), routing.indices


def test_sparsemixer_worked_example_at_the_threshold():
    """PhiMoE's sparsemixer at inference, logits [1, 0.5, 0, -1] and jitter_eps 0.25 (threshold
    2 * eps = 0.5): round 1 takes expert 0 and keeps the logits l with (1 - l) / max(|l|, 1) <= 0.5,
    i.e. 1 and 0.5 (exactly at the threshold: kept, as transformers' strict `>` masks): weight
    softmax([1, 0.5])[0] = sigmoid(0.5). Round 2 takes expert 1 among [0.5, 0, -1]: (0.5 - 0) /
    max(0, 0.5) = 1 > 0.5 masks 0, so its weight is 1. probs is the plain softmax of the logits."""
    from moelab.nn import SparseMixerRouter

    router = SparseMixerRouter(4, 4, jitter_eps=0.25, top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    routing = router(x)
    assert routing.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(routing.weights, torch.tensor([[torch.sigmoid(torch.tensor(0.5)).item(), 1.0]]))
    torch.testing.assert_close(routing.probs, x.softmax(-1))
    SparseMixerRouter(4, 4, jitter_eps=0.0)  # eps = 0: only ties with the best logit share its weight
    with pytest.raises(ValueError, match="jitter_eps must be >= 0"):
        SparseMixerRouter(4, 4, jitter_eps=-0.1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4, 2, 2, 0, 3), r"top_k \(3\) must not exceed the 2 experts a layer owns"),
        ((4, 2, 2, 2, 1), "need reuse >= 1 and 0 <= position < reuse, got reuse=2, position=2"),
        ((4, 2, 2, -1, 1), "need reuse >= 1 and 0 <= position < reuse"),
    ],
)
def test_rexmoe_router_refuses_bad_settings(args, message):
    """ReuseRouter(dim, num_local, reuse, position, top_k): a layer's top-k must fit in the experts
    it owns (progressive scaling starts with those alone), its position lie inside its group, and
    the progress in [0, 1]."""
    from moelab.nn.rexmoe import ReuseRouter

    with pytest.raises(ValueError, match=message):
        ReuseRouter(*args)
    router = ReuseRouter(4, 2, 2, 1, 2)  # top_k = num_local and the last position: allowed
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"PSR progress must lie in \[0, 1\]"):
            router.set_progress(fraction)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TopKRouter(D, E, 2, route_scale=0.0), r"route_scale must be a positive finite number .*, got 0.0"),
        (lambda: TopKRouter(D, E, 2, route_scale=float("nan")), "route_scale must be a positive finite number"),
        (lambda: HashRouter(D, E, 10, 2, route_scale=-1.0), "route_scale must be a positive finite number"),
        (lambda: ReLURouter(D, E, eps=0.0), r"eps must be a positive finite number .*, got 0.0"),
        (lambda: ReLURouter(D, E, eps=float("nan")), "eps must be a positive finite number"),
        (lambda: SparseMixerRouter(D, E, jitter_eps=0.1, top_k=1.5), "top_k must be an integer, got float 1.5"),
        (lambda: SparseMixerRouter(D, E, jitter_eps=float("nan")), "jitter_eps must be >= 0 and finite, got nan"),
        (lambda: SimilarityRouter(D, E, 2, tau=float("nan")), r"graph temperature tau must be > 0 and finite \(or None: sqrt\(dim\)\), got nan"),
        (lambda: MoELayer(TopKRouter(D, E, 2), SwiGLUExperts(E, D, 4), capacity_factor=float("nan")),
         r"capacity_factor must be > 0 \(or None for dropless\) and finite, got nan"),
        (lambda: TopKRouter(D, E, 2, selection_bias=True).update_selection_bias(float("nan")),
         "selection bias update rate must be a finite number >= 0"),
        (lambda: attach_selection_bias_update(torch.optim.SGD([torch.zeros(1)], lr=0.1),
                                              TopKRouter(D, E, 2, selection_bias=True), rate=-1e-3),
         r"bias update rate must be a finite number >= 0 \(0 leaves the bias\), got -0.001"),
    ],
)  # fmt: skip
def test_routers_built_directly_refuse_bad_numbers(build, message):
    """What MoEConfig refuses, the routers (and the layer) refuse when built directly: a route scale
    of 0, < 0 or NaN (zero, flipped or NaN outputs), a ReLU router's eps of 0 (NaN gates for a token
    with no active expert: 0 * rsqrt(0)), a sparsemixer's fractional top_k or NaN jitter, a NaN graph
    temperature or capacity factor, a NaN or negative bias step (it would move the bias the wrong way)."""
    with pytest.raises(ValueError, match=message):
        build()
