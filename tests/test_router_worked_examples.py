"""Router and loss equations on tiny examples worked by hand (the numbers in the docstrings), and
the edge cases every router must take (one token, k = E, bf16 as its fp32 upcast, an expert no
token chooses, every token on one expert, a gradient to the router weight) for the routers the
per-router reference tests of tests/test_routers.py and tests/test_moe_layer.py leave out."""

import math

import pytest
import torch

from moelab.nn import (
    AttentionRouter,
    ExpertChoiceRouter,
    HashRouter,
    MoEConfig,
    MoELayer,
    ReLURouter,
    SimilarityRouter,
    SparseMixerRouter,
    SwiGLUExperts,
    TopKRouter,
    TopPRouter,
    UoERouter,
    build_moe,
)
from moelab.nn.losses import load_balancing_loss, router_entropy_loss, router_z_loss
from moelab.nn.mlp_router import MLPRouter
from moelab.nn.rexmoe import ReuseRouter

pytestmark = pytest.mark.usefixtures("one_thread")


def logit_router(router, logits):
    """Set router (weight [E, E]) to the identity, so that routing x = logits sees those logits."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts))
    return torch.tensor(logits, dtype=torch.float32)


# ----------------------------------------------------------------------------- losses


def test_switch_balance_loss_by_hand():
    """E * sum_e f_e P_e with P = the mean probabilities, [0.625, 0.375] over the two tokens
    [0.75, 0.25] and [0.5, 0.5]: top-1 on expert 0 for both, f = [1, 0], loss 2 * 0.625 = 1.25;
    each token on both experts (or one each, an empty slot skipped), f = [0.5, 0.5], loss 1."""
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert load_balancing_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.25)
    assert load_balancing_loss(probs, torch.tensor([[0, 1], [1, 0]])).item() == pytest.approx(1.0)
    assert load_balancing_loss(probs, torch.tensor([[0, -1], [1, -1]])).item() == pytest.approx(1.0)


def test_z_loss_and_entropy_by_hand():
    """z-loss: mean over tokens of logsumexp^2: logits [0, 0] and [log 3, 0] have logsumexp log 2
    and log 4, so (1 + 4) / 2 * log(2)^2. Entropy: [0.5, 0.5] has log 2, [1, 0] none: mean log(2) / 2."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2)
    assert router_entropy_loss(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).item() == pytest.approx(math.log(2.0) / 2)


# ----------------------------------------------------------------------------- routers


def test_topk_softmax_before_topk_renormalised_or_not_by_hand():
    """Logits [2, 1, 0, -1], top-2: experts 0 and 1; renormalised, sigmoid(1) and sigmoid(-1) (a
    softmax over the two logits); raw, their softmax over all four, e^2 / Z and e / Z."""
    z = math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    for renormalize, expected in ((True, [1 / (1 + math.exp(-1)), 1 / (1 + math.e)]), (False, [math.exp(2) / z, math.e / z])):
        router = TopKRouter(4, 4, 2, renormalize=renormalize)
        routing = router(logit_router(router, [[2.0, 1.0, 0.0, -1.0]]))
        assert routing.indices.tolist() == [[0, 1]]
        torch.testing.assert_close(routing.weights, torch.tensor([expected]))


def test_aux_loss_free_bias_by_hand():
    """DeepSeek-V3: sigmoid scores of logits [0, 1, 2, -1]; a bias of 2 on expert 0 makes the
    top-2 of score + bias experts 2 and 0, weighted by their un-biased scores renormalised,
    s_2 / (s_0 + s_2) and s_0 / (s_0 + s_2), times route_scale 2.5. Loads [3, 1, 0, 4] (mean 2) then
    move the bias by rate * sign(2 - load): the overloaded experts 0 and 3 down, 1 and 2 up."""
    router = TopKRouter(4, 4, 2, score_func="sigmoid", selection_bias=True, route_scale=2.5)
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    routing = router(logit_router(router, [[0.0, 1.0, 2.0, -1.0]]))
    s0, s2 = 0.5, 1 / (1 + math.exp(-2))
    assert routing.indices.tolist() == [[0, 2]]
    torch.testing.assert_close(routing.weights, torch.tensor([[2.5 * s0 / (s0 + s2), 2.5 * s2 / (s0 + s2)]]))
    with torch.no_grad():
        router.selection_bias.zero_()
        router.tokens_per_expert.copy_(torch.tensor([3.0, 1.0, 0.0, 4.0]))
    router.update_selection_bias(0.001)
    assert router.selection_bias.tolist() == pytest.approx([-0.001, 0.001, 0.001, -0.001])


def test_topp_keeps_experts_until_the_mass_reaches_p_by_hand():
    """Probabilities [0.5, 0.3, 0.15, 0.05]: p = 0.4 keeps expert 0 alone (0.5 crosses it); p = 0.6
    keeps 0 and 1 (0.5 before expert 1 is < 0.6, 0.8 before expert 2 is not), weighted by the raw
    probabilities; max_k = 1 caps p = 0.9 at one expert."""
    x = [[math.log(v) for v in (0.5, 0.3, 0.15, 0.05)]]
    for top_p, max_k, kept in ((0.4, None, [0]), (0.6, None, [0, 1]), (0.9, 1, [0])):
        router = TopPRouter(4, 4, top_p, max_k=max_k)
        routing = router(logit_router(router, x))
        assert routing.indices[0, routing.indices[0] >= 0].tolist() == kept
        torch.testing.assert_close(routing.weights[0, : len(kept)], torch.tensor([0.5, 0.3][: len(kept)]))


def test_expert_choice_picks_tokens_per_expert_by_hand():
    """Three tokens, three experts, c = 1: capacity ceil(3 * 1 / 3) = 1. Probabilities [0.6, 0.35,
    0.05], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]: expert 0 takes token 0 (0.6), expert 1 token 0 too
    (0.35), expert 2 token 2 (0.7). Token 0 gets two experts, token 1 none (dropped), token 2 one."""
    router = ExpertChoiceRouter(3, 3, capacity_factor=1.0)
    rows = [[0.6, 0.35, 0.05], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]]
    routing = router(logit_router(router, [[math.log(v) for v in row] for row in rows]))
    assert routing.indices.tolist() == [[0, 1, -1], [-1, -1, -1], [-1, -1, 2]]
    torch.testing.assert_close(routing.weights, torch.tensor([[0.6, 0.35, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.7]]))


def test_relu_router_rms_norm_by_hand():
    """BlockFFN: logits [2, -1, 0, 1] -> a = relu = [2, 0, 0, 1] (a logit of 0 is inactive), mean
    a^2 = 5/4, a_hat = a / sqrt(5/4 + eps) = [4, 0, 0, 2] / sqrt(5) (eps 1e-12); the gate is g * a_hat with
    g = [1, 1, 1, 0.5]; p = a_hat / (sum a_hat + 1e-5) ~ [2/3, 0, 0, 1/3]."""
    router = ReLURouter(4, 4, eps=1e-12)
    with torch.no_grad():
        router.norm_weight.copy_(torch.tensor([1.0, 1.0, 1.0, 0.5]))
    routing = router(logit_router(router, [[2.0, -1.0, 0.0, 1.0]]))
    assert routing.indices.tolist() == [[0, -1, -1, 3]]
    root5 = math.sqrt(5)
    torch.testing.assert_close(routing.weights, torch.tensor([[4 / root5, 0.0, 0.0, 1 / root5]]))
    torch.testing.assert_close(routing.probs, torch.tensor([[2 / 3, 0.0, 0.0, 1 / 3]]), atol=1e-5, rtol=0)


def test_similarity_graph_mixes_earlier_tokens_by_hand():
    """Two tokens x_0 = [1, 0], x_1 = [0, 1] (D = E = 2, identity router: P_t = softmax(x_t)),
    W_s = I, tau = 1: token 0 sees itself only; token 1 weighs x_0 and itself by softmax([0, 1]),
    so P~_1 = (P_0 + e P_1) / (1 + e)."""
    router = SimilarityRouter(2, 2, 1, learned=False, tau=1.0)
    x = logit_router(router, [[1.0, 0.0], [0.0, 1.0]])
    p0, p1 = x[0].softmax(-1), x[1].softmax(-1)
    routing = router(x[None])
    torch.testing.assert_close(routing.probs, torch.stack([p0, (p0 + math.e * p1) / (1 + math.e)]))
    assert routing.indices.tolist() == [[0], [1]]


# ----------------------------------------------------------------------------- edge cases

D, E = 8, 4


def _q_k(x):
    """Attention queries and keys [B, 2, S, 4], [B, 1, S, 4] for x [B, S, D] (attention-aware routing),
    bf16 numbers in x's dtype."""
    g = torch.Generator().manual_seed(3)
    B, S, _ = x.shape
    q, k = (torch.randn(B, heads, S, 4, generator=g).bfloat16().to(x.dtype) for heads in (2, 1))
    return {"q": q, "k": k}


ROUTERS = {  # name: (build(k), call(router, x [B, S, D]))
    "sparsemixer": (lambda k: SparseMixerRouter(D, E, jitter_eps=1.0, top_k=k), lambda r, x: r(x.reshape(-1, D))),
    "hash": (lambda k: HashRouter(D, E, 16, k), lambda r, x: r(x.reshape(-1, D), torch.arange(x.shape[0] * x.shape[1]) % 16)),
    "graph_sim": (lambda k: SimilarityRouter(D, E, k), lambda r, x: r(x)),
    "graph_attn": (lambda k: AttentionRouter(D, E, k), lambda r, x: r(x, _q_k(x))),
    "uoe": (lambda k: UoERouter(D, E, k, expert_top_k=E), lambda r, x: r(x)),
    "uoe-reference": (lambda k: UoERouter(D, E, k, selection="reference"), lambda r, x: r(x)),
    "rexmoe": (lambda k: _own_experts_only(ReuseRouter(D, E // 2, 2, 1, min(k, E // 2))), lambda r, x: r(x.reshape(-1, D))),
}


def _own_experts_only(router: ReuseRouter) -> ReuseRouter:
    """A ReXMoE router at the start of progressive scaling: its own experts (2 and 3) the candidates."""
    router.set_progress(0.0)
    return router


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("shape", [(1, 1), (3, 5)], ids=["one-token", "batch"])
def test_k_equal_to_e_bf16_and_a_gradient_to_the_router(name, shape):
    """With k = E (ReXMoE: every expert its layer owns, 2 and 3) every candidate is chosen where the
    router picks per token (not the reference's per-expert selection, not a hash table), routing bf16 input gives the
    indices and weights of its fp32 upcast (the router runs in fp32), and a loss on the weights
    reaches the router weight with a finite, non-zero gradient, one token included."""
    build, call = ROUTERS[name]
    torch.manual_seed(0)
    router = build(E)
    x = torch.randn(*shape, D, generator=torch.Generator().manual_seed(1))
    routing = call(router, x)
    K = routing.indices.shape[1]
    if name not in ("uoe-reference", "hash"):
        chosen = routing.indices.sort(-1).values
        first = 2 if name == "rexmoe" else 0
        assert torch.equal(chosen, torch.arange(first, first + K).expand_as(chosen)), routing.indices
    low = call(router, x.bfloat16())
    upcast = call(router, x.bfloat16().float())
    assert low.weights.dtype == torch.float32 and torch.equal(low.indices, upcast.indices)
    torch.testing.assert_close(low.weights, upcast.weights, atol=0, rtol=0)
    grad_out = torch.randn(routing.weights.shape, generator=torch.Generator().manual_seed(2))
    (routing.weights * grad_out).sum().backward()
    assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0


BIASED_ROUTERS = {  # name: build(k), with a router bias; each takes x [B, S, D]
    "sparsemixer": lambda k: SparseMixerRouter(D, E, jitter_eps=1.0, top_k=k, bias=True),
    "uoe": lambda k: UoERouter(D, E, k, bias=True),
    "uoe-experts-per-sequence": lambda k: UoERouter(D, E, k, expert_top_k=E, bias=True),
    "mlp": lambda k: MLPRouter(D, 6, E, k, eps=1e-6, reads_state=False, bias=True),  # ZAYA's
}


def _call_biased(router, x):
    return router(x) if isinstance(router, UoERouter) else router(x.reshape(-1, D))


@pytest.mark.parametrize("name", list(BIASED_ROUTERS))
@pytest.mark.parametrize("shape", [(1, 1), (3, 5)], ids=["one-token", "batch"])
def test_an_idle_expert_and_every_token_on_one(name, shape):
    """A router bias of -30 on expert 3 leaves it unchosen, +30 on expert 2 makes it every token's
    choice; the weights stay finite and a loss on them reaches the router weight. The MLP router
    (which computes in bf16 on bf16 input, as transformers' ZAYA router does: tests/test_zaya.py)
    also takes k = E: every expert, once per token."""
    torch.manual_seed(0)
    router = BIASED_ROUTERS[name](2)
    x = torch.randn(*shape, D, generator=torch.Generator().manual_seed(1))
    T = shape[0] * shape[1]
    for bias, expert, chosen in ((-30.0, 3, False), (30.0, 2, True)):
        with torch.no_grad():
            router.bias.zero_()
            router.bias[expert] = bias
        router.zero_grad()
        routing = _call_biased(router, x)
        picks = (routing.indices == expert).sum(-1)
        assert torch.equal(picks, torch.full((T,), int(chosen))), routing.indices
        assert ((routing.indices >= 0).sum(-1) == 2).all() and torch.isfinite(routing.weights).all()
        grad_out = torch.randn(routing.weights.shape, generator=torch.Generator().manual_seed(2))
        (routing.weights * grad_out).sum().backward()  # not the sum: renormalised weights sum to a constant
        assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0
    if name == "mlp":
        every = BIASED_ROUTERS[name](E)(x.reshape(-1, D))
        assert torch.equal(every.indices.sort(-1).values, torch.arange(E).expand(T, E))
        assert every.weights.sum(-1).allclose(torch.ones(T))  # renormalised over all E


@pytest.mark.parametrize("router", ["graph_sim", "graph_attn"])
def test_graph_routed_layer_with_an_idle_expert_and_every_token_on_one(router):
    """A router bias of -30 on expert 3 leaves it without tokens (its weights get exactly zero
    gradient, the others some); +30 on expert 2 puts every token's first choice there."""
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=4, router=router, router_bias=True))
    x = torch.randn(2, 6, D)
    context = _q_k(x) if router == "graph_attn" else None
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -30.0]))
    y, result = layer(x, context=context)
    (y.square().sum() + result.loss).backward()
    assert result.tokens_per_expert[3] == 0 and result.tokens_per_expert.sum() == 2 * 12
    grad = layer.experts.gate_up_proj.grad
    assert torch.all(grad[3] == 0) and grad[:3].abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 30.0, 0.0]))
    routing = layer.router(x, context or {})
    assert (routing.indices[:, 0] == 2).all()


def test_a_hash_table_that_never_names_an_expert_and_names_one_for_every_token():
    """A table [V, 2] naming expert 2 first for every token id and never expert 3: expert 3 gets no
    token and exactly zero gradient, expert 2 gets every token, and the learned gate's weights
    still reach the router weight."""
    torch.manual_seed(0)
    router = HashRouter(D, E, 16, 2)
    with torch.no_grad():
        router.token_experts.copy_(torch.stack([torch.full((16,), 2), torch.arange(16) % 2], dim=1))
    layer = MoELayer(router, SwiGLUExperts(E, D, 4))
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(2))
    y, result = layer(x, context={"input_ids": ids})
    (y.square().sum()).backward()
    assert result.tokens_per_expert.tolist()[2:] == [12, 0] and result.tokens_per_expert.sum() == 24
    grad = layer.experts.gate_up_proj.grad
    assert torch.all(grad[3] == 0) and grad[2].abs().sum() > 0
    assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0
