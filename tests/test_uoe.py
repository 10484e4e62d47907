"""Union-of-Experts: equivalence with the dense transformer, selective attention against a naive
per-(sequence, head) loop (forward and backward), and the router's causal and reference
selection against naive re-implementations."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.models import ModelConfig, MoETransformer
from moelab.nn import SelectiveAttention, UoEConfig, UoERouter, split_dense_mlp
from moelab.nn.rope import rope_tables
from moelab.train.config import RunConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


DENSE = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32, dense_hidden_dim=64)


def uoe_from_dense(dense: MoETransformer, uoe: UoEConfig) -> MoETransformer:
    """A UoE model holding the dense model's weights: attention as is, the FFN cut into slices."""
    model = MoETransformer(dataclasses.replace(dense.config, uoe=uoe, first_k_dense=0))
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    for i, block in enumerate(dense.layers):
        for name, tensor in split_dense_mlp(block.ffn, uoe.mlp_experts).items():
            state[f"layers.{i}.ffn.experts.{name}"] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".router." in k for k in missing)
    return model


@pytest.mark.parametrize("gate", ["none", "router"])
def test_all_experts_with_unit_gates_equal_the_dense_transformer(gate):
    torch.manual_seed(0)
    dense = MoETransformer(DENSE)
    model = uoe_from_dense(dense, UoEConfig(attn_top_k=4, mlp_experts=4, mlp_top_k=4, gate=gate))
    with torch.no_grad():  # a zero router is uniform: every gate is n * (1/n) / 1 = 1
        for name, p in model.named_parameters():
            if ".router." in name:
                p.zero_()
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    expected = dense(ids).logits
    got = model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert not torch.allclose(uoe_from_dense(dense, UoEConfig(attn_top_k=2, mlp_top_k=4))(ids).logits, expected)


def naive_selective_attention(attn: SelectiveAttention, x, chosen, gates, cos, sin, compact):
    """Loop over (sequence, head): gather the head's tokens in order, project, rotate, attend
    causally, project out, scale by the gate and add back. x: [B, S, D]; chosen, gates: [B, S, H]."""
    B, S, D = x.shape
    H, Dh = attn.n_heads, attn.head_dim
    y = torch.zeros_like(x)
    outs = []
    for b in range(B):
        rows = [torch.zeros(D, dtype=x.dtype) for _ in range(S)]
        for h in range(H):
            sel = chosen[b, :, h].nonzero().flatten()
            if len(sel) == 0:
                continue
            hs = slice(h * Dh, (h + 1) * Dh)
            xs = x[b, sel]
            q = xs @ attn.q_proj.weight[hs].T
            k = xs @ attn.k_proj.weight[hs].T
            v = xs @ attn.v_proj.weight[hs].T
            pos = torch.arange(len(sel)) if compact else sel
            # rope_tables' sin carries rotate-half's minus in its first half: undo it for the plain formula
            c, s = cos[pos].double(), sin[pos].double() * torch.tensor([-1.0, 1.0]).repeat_interleave(Dh // 2)
            rot = lambda t: t * c + torch.cat([-t[:, Dh // 2 :], t[:, : Dh // 2]], -1) * s  # noqa: E731
            q, k = rot(q), rot(k)
            scores = q @ k.T / Dh**0.5
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            o = scores.softmax(-1) @ v @ attn.o_proj.weight[:, hs].T
            for j, t in enumerate(sel.tolist()):
                rows[t] = rows[t] + gates[b, t, h] * o[j]
        outs.append(torch.stack(rows))
    return y + torch.stack(outs)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("config", [UoEConfig(attn_top_k=2), UoEConfig(attn_top_k=1, attn_expert_top_k=3, balance_coef=0.01)], ids=["k2", "k1-es3"])
def test_selective_attention_matches_a_naive_loop_forward_and_backward(config, compact):
    torch.manual_seed(0)
    attn = SelectiveAttention(32, 4, dataclasses.replace(config, positions="compact" if compact else "real")).double()
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    y, result = attn(x, cos[:11], sin[:11])
    routing = attn.router(x)
    chosen = (routing.indices >= 0).view(2, 11, 4)
    gates = routing.weights.view(2, 11, 4).double()
    expected = naive_selective_attention(attn, x, chosen, gates, cos, sin, compact)
    torch.testing.assert_close(y, expected)
    assert torch.equal(result.tokens_per_expert, chosen.sum((0, 1)))
    g = torch.randn_like(y)
    params = [x, attn.q_proj.weight, attn.o_proj.weight, attn.router.weight]
    got = torch.autograd.grad(y, params, g, retain_graph=True)
    want = torch.autograd.grad(expected, params, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the router runs in float32


def test_selective_attention_reports_heads_per_token_and_its_scaled_balance_loss():
    """Each token picks attn_top_k = 2 of the 4 heads (so 2 experts per token, not 2 / H), and the
    balance loss is balance_coef times the Switch loss of the head routing, by hand: E sum f_e P_e."""
    torch.manual_seed(0)
    attn = SelectiveAttention(32, 4, UoEConfig(attn_top_k=2, balance_coef=0.5))
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(2, 11, 32)
    _, result = attn(x, cos[:11], sin[:11])
    routing = attn.router(x)
    assert result.experts_per_token.item() == 2.0
    chosen = (routing.indices >= 0).float()  # [22, 4]: one slot per head
    switch = 4 * (chosen.sum(0) / chosen.sum() * routing.probs.mean(0)).sum()
    torch.testing.assert_close(result.losses["balance"], 0.5 * switch)


def naive_causal_choice(router: UoERouter, x):
    """Per token: its top-k experts (among the k_s its prefix keeps), gates n * s / sum s."""
    B, S, D = x.shape
    chosen = torch.zeros(B, S, router.num_experts, dtype=torch.bool)
    gates = torch.zeros(B, S, router.num_experts)
    for b in range(B):
        for t in range(S):
            s = (router.weight.float() @ x[b, t].float()).softmax(-1)
            allowed = torch.ones_like(s, dtype=torch.bool)
            if router.expert_weight is not None:
                sp = (router.expert_weight.float() @ x[b, : t + 1].float().mean(0)).softmax(-1)
                allowed = torch.zeros_like(allowed)
                allowed[sp.topk(router.expert_top_k).indices] = True
                s = s * sp
            top = s.masked_fill(~allowed, -1).topk(router.k).indices
            chosen[b, t, top] = True
            gates[b, t, top] = router.k * s[top] / s[top].sum()
    return chosen, gates


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000),
    experts=st.integers(2, 6),
    data=st.data(),
)
def test_causal_router_matches_naive_token_choice(seed, experts, data):
    k = data.draw(st.integers(1, experts))
    expert_top_k = data.draw(st.one_of(st.none(), st.integers(k, experts)))
    torch.manual_seed(seed)
    router = UoERouter(8, experts, k, expert_top_k=expert_top_k)
    x = torch.randn(2, 7, 8)
    routing = router(x)
    chosen, gates = naive_causal_choice(router, x)
    assert torch.equal((routing.indices >= 0).view(2, 7, -1), chosen)
    torch.testing.assert_close(routing.weights.view(2, 7, -1), gates)
    assert ((routing.indices >= 0).sum(-1) == k).all()


@pytest.mark.parametrize("fraction", [None, 0.5, 0.35, 0.05])
def test_reference_selection_matches_the_reference_code(fraction):
    """top-k mask, normalise across the batch, then the top L' tokens per (sequence, expert); L'
    is the largest routed count (attention) or int(fraction * S) (MLP; 0.35 * 10 = 3.5 -> 3), at
    least 1 (0.05 * 10 -> 1); gates unused."""
    torch.manual_seed(0)
    router = UoERouter(8, 4, 2, selection="reference", gate="none", token_fraction=fraction)
    x = torch.randn(3, 10, 8)
    routing = router(x)
    probs = (x.reshape(-1, 8) @ router.weight.T).softmax(-1).view(3, 10, 4)
    mask = torch.zeros_like(probs).scatter_(-1, probs.topk(2, dim=-1).indices, 1.0)
    normalised = probs * mask / ((probs * mask).sum(0, keepdim=True) + 1e-8)
    width = int((normalised > 0).sum(1).max()) if fraction is None else max(1, int(fraction * 10))
    expected = torch.zeros(3, 10, 4, dtype=torch.bool)
    for b in range(3):
        for e in range(4):
            expected[b, normalised[b, :, e].topk(width).indices, e] = True
    assert torch.equal((routing.indices >= 0).view(3, 10, 4), expected)
    assert torch.equal(routing.weights.view(3, 10, 4), expected.float())
    assert not router.causal


def test_split_dense_mlp_rejects_uneven_slices():
    from moelab.nn import SwiGLU

    with pytest.raises(ValueError, match="width 10 must be divisible by the 4 experts"):
        split_dense_mlp(SwiGLU(8, 10), 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"expert_top_k": 1}, r"expert_top_k \(1\) must lie in \[top_k=2, 4 experts\]"),
        ({"expert_top_k": 5}, r"expert_top_k \(5\) must lie in \[top_k=2, 4 experts\]"),
        ({"selection": "global"}, "unknown selection .global."),
        ({"gate": "softmax"}, "unknown gate .softmax."),
        ({"token_fraction": 1.5}, r"token_fraction must lie in \(0, 1\]"),
    ],
)
def test_router_refuses_bad_settings_itself(options, message):
    """Built directly (not through UoEConfig), the router checks its settings: an expert_top_k below
    top_k used to route tokens to experts their sequence had dropped, one above E to fail in topk."""
    with pytest.raises(ValueError, match=message):
        UoERouter(8, 4, 2, **options)
    with pytest.raises(ValueError, match=r"UoEConfig.mlp_expert_top_k \(1\) must lie in \[mlp_top_k=2"):
        UoEConfig(mlp_top_k=2, mlp_expert_top_k=1)
    with pytest.raises(ValueError, match="token_fraction=0.25 has no effect with selection='causal'"):
        UoEConfig(token_fraction=0.25)
    UoEConfig(token_fraction=0.25, selection="reference")


@pytest.mark.parametrize("selection", ["causal", "reference"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)], ids=["no-positions", "no-sequences"])
def test_an_empty_batch_gives_an_empty_output(selection, shape):
    """Selective attention and the UoE MLP layer take an empty input [B, 0, D] or [0, S, D] (an
    empty micro-batch): an empty output, finite losses, and a backward (the router reshaped to
    [.., -1], which torch cannot infer for no elements, and failed)."""
    from moelab.nn import MoELayer, SwiGLUExperts

    torch.manual_seed(0)
    config = UoEConfig(attn_top_k=2, selection=selection, balance_coef=0.1)
    attn = SelectiveAttention(16, 4, config)
    mlp = MoELayer(config.router(16, 4, "mlp"), SwiGLUExperts(4, 16, 8), balance_coef=0.1)
    cos, sin = rope_tables(4, 16, 10000.0)
    x = torch.zeros(*shape, 16, requires_grad=True)
    y, result = attn(x, cos[: shape[1]], sin[: shape[1]])
    z, mlp_result = mlp(x)
    for out, res in ((y, result), (z, mlp_result)):
        assert out.shape == x.shape and res.tokens_per_expert.sum() == 0
        assert torch.isfinite(res.loss)
    (y.sum() + z.sum() + result.loss + mlp_result.loss).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_a_gated_top_1_router_without_a_balance_loss_is_refused(part):
    """With one expert per token the causal gate n * s / sum s is exactly 1, so gate='router' would
    leave the router (and the expert-selection gate) without any gradient, silently as gate='none'
    (the LRA reference's 1 of 2 heads). Training it is refused, naming the fixes (the model still
    runs); with a balance loss the router learns from it and the setting is taken, as with the
    reference selection, whose gates vary."""
    k = {f"{part}_top_k": 1}
    model = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16, dense_hidden_dim=64,
                        first_k_dense=0, moe=None, uoe=UoEConfig(**k, balance_coef=0.0))  # fmt: skip
    MoETransformer(model)  # runs
    with pytest.raises(ValueError, match=rf"UoEConfig.{part}_top_k=1 with gate='router'.*no gradient.*top_k >= 2"):
        RunConfig(model=model, train=TrainConfig(steps=1, seq_len=16))
    for fine in (dict(balance_coef=0.01), dict(gate="none"), dict(selection="reference")):
        UoEConfig(**k, **fine).check_trains()
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, requires_grad=True)
    for router in (UoERouter(8, 4, 1), UoERouter(8, 4, 1, expert_top_k=2)):  # every gate exactly 1
        routing = router(x)
        assert torch.equal(routing.weights, (routing.indices >= 0).float())
