"""Graph-of-tokens routing against naive loops: the similarity and attention graphs, the mixed
distribution, top-k selection and weights, forward and backward, and causality."""

import pytest
import torch

from moelab.nn import AttentionRouter, MoEConfig, SimilarityRouter, build_moe


def naive_similarity(router: SimilarityRouter, x):
    """P~_i = sum_{j <= i} A_ij P_j, A_i. = softmax_j((W_s x_i) . x_j / tau) over j <= i."""
    B, S, _ = x.shape
    probs = (x.reshape(B * S, -1).float() @ router.weight.float().T).softmax(-1).view(B, S, -1)
    W = torch.eye(x.shape[-1]) if router.similarity is None else router.similarity.weight.float()
    out = torch.zeros_like(probs)
    for b in range(B):
        for i in range(S):
            q = W @ x[b, i].float()
            scores = torch.stack([q @ x[b, j].float() for j in range(i + 1)]) / router.tau
            a = scores.softmax(0)
            out[b, i] = sum(a[j] * probs[b, j] for j in range(i + 1))
    return out


def naive_attention_mix(probs, q, k):
    """mean over heads h of sum_{j <= i} softmax_j(q_hi . k_gj / sqrt(Dh)) P_j (GQA: g = h // (H/G))."""
    B, H, S, Dh = q.shape
    G = k.shape[1]
    out = torch.zeros_like(probs)
    for b in range(B):
        for h in range(H):
            kh = k[b, h // (H // G)]
            for i in range(S):
                a = (kh[: i + 1] @ q[b, h, i] / Dh**0.5).softmax(0)
                out[b, i] += (a[:, None] * probs[b, : i + 1]).sum(0) / H
    return out


def check_topk(routing, mixed, k, renormalize=True):
    weights, indices = mixed.reshape(-1, mixed.shape[-1]).topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    assert torch.equal(routing.indices, indices)
    torch.testing.assert_close(routing.weights, weights)


@pytest.mark.parametrize("learned", [True, False])
def test_similarity_routing_matches_a_naive_loop_forward_and_backward(learned):
    torch.manual_seed(0)
    router = SimilarityRouter(8, 5, 2, learned=learned, tau=1.5)
    if learned:
        with torch.no_grad():
            router.similarity.weight.add_(0.3 * torch.randn(8, 8))
    x = torch.randn(2, 7, 8, requires_grad=True)
    routing = router(x)
    mixed = naive_similarity(router, x)
    torch.testing.assert_close(routing.probs, mixed.reshape(14, 5))
    check_topk(routing, mixed, 2)
    g = torch.randn_like(routing.weights)
    params = [x, router.weight] + ([router.similarity.weight] if learned else [])
    got = torch.autograd.grad(routing.weights, params, g)
    weights = mixed.reshape(14, 5).gather(-1, routing.indices)
    want = torch.autograd.grad(weights / weights.sum(-1, keepdim=True), params, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_similarity_temperature_defaults_to_the_square_root_of_the_dim():
    """tau = sqrt(D) unless given: the default router mixes as one built with tau = sqrt(16) = 4."""
    torch.manual_seed(0)
    default = SimilarityRouter(16, 5, 2)
    assert default.tau == 4.0
    explicit = SimilarityRouter(16, 5, 2, tau=4.0)
    explicit.load_state_dict(default.state_dict())
    x = 3 * torch.randn(2, 6, 16)
    torch.testing.assert_close(default(x).probs, naive_similarity(explicit, x).reshape(12, 5))


def test_attention_routing_matches_a_naive_loop_forward_and_backward():
    torch.manual_seed(0)
    router = AttentionRouter(8, 4, 2, renormalize=False)
    x = torch.randn(2, 6, 8, requires_grad=True)
    q = torch.randn(2, 4, 6, 4, requires_grad=True)
    k = torch.randn(2, 2, 6, 4, requires_grad=True)
    routing = router(x, {"q": q, "k": k})
    probs = (x.reshape(12, 8) @ router.weight.T).softmax(-1).view(2, 6, 4)
    mixed = naive_attention_mix(probs, q, k)
    torch.testing.assert_close(routing.probs, mixed.reshape(12, 4))
    check_topk(routing, mixed, 2, renormalize=False)
    g = torch.randn_like(routing.weights)
    params = [x, q, k, router.weight]
    got = torch.autograd.grad(routing.weights, params, g)
    want = torch.autograd.grad(mixed.reshape(12, 4).gather(-1, routing.indices), params, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_graph_routing_is_causal_and_mixes_earlier_tokens():
    torch.manual_seed(0)
    router = SimilarityRouter(8, 4, 1)
    x = torch.randn(1, 9, 8)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 4, 8)
    a, b = router(x), router(changed)
    assert torch.equal(a.probs[:5], b.probs[:5]) and not torch.allclose(a.probs[5:], b.probs[5:])
    plain = (x[0] @ router.weight.T).softmax(-1)
    torch.testing.assert_close(a.probs[0], plain[0])  # the first token's only neighbour is itself
    assert not torch.allclose(a.probs[1:], plain[1:])


def test_graph_routers_need_sequences_and_attention_context():
    layer = build_moe(MoEConfig(dim=8, num_experts=4, hidden_dim=4, router="graph_sim"))
    with pytest.raises(ValueError, match=r"routes whole sequences; it needs input \[batch, seq, dim\]"):
        layer(torch.randn(5, 8))
    layer = build_moe(MoEConfig(dim=8, num_experts=4, hidden_dim=4, router="graph_attn"))
    with pytest.raises(ValueError, match="needs the block's attention queries and keys"):
        layer(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="tau must be > 0"):
        SimilarityRouter(8, 4, 2, tau=0.0)


@pytest.mark.parametrize("router", ["graph_sim", "graph_attn"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)], ids=["no-positions", "no-sequences"])
def test_graph_routed_layer_takes_an_empty_batch(router, shape):
    """An empty input [B, 0, D] or [0, S, D] (an empty micro-batch) gives an empty output, finite
    losses and a backward, as every token-wise router does (the router reshaped to [0, -1], which
    torch cannot infer, and failed)."""
    layer = build_moe(MoEConfig(dim=8, num_experts=4, hidden_dim=4, router=router, z_coef=1e-3, entropy_coef=1e-2))
    x = torch.zeros(*shape, 8, requires_grad=True)
    context = {"q": torch.zeros(*shape[:1], 2, *shape[1:], 4), "k": torch.zeros(*shape[:1], 1, *shape[1:], 4)}
    y, result = layer(x, context=context if router == "graph_attn" else None)
    assert y.shape == x.shape and result.tokens_per_expert.tolist() == [0] * 4
    assert all(torch.isfinite(v) for v in result.losses.values())
    (y.sum() + result.loss).backward()
    assert x.grad.shape == x.shape
