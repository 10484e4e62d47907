"""Parameter and FLOP accounting against instantiated models: parameter counts against
`model.parameters()`, active counts against the experts' own tensors, and forward FLOPs against
torch's FLOP counter on a real forward pass."""

import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moelab.models import (
    MoETransformer,
    active_params,
    count_params,
    experts_per_token_by_layer,
    flops_per_token,
    model_info,
    param_counts,
    small,
    tiny,
)
from moelab.nn import UoEConfig


def variant(moe_fields=None, **overrides):
    cfg = tiny()
    if moe_fields is not None:
        overrides["moe"] = dataclasses.replace(cfg.moe, **moe_fields)
    return dataclasses.replace(cfg, **overrides)


CONFIGS = {
    "tiny": variant(),
    "tied": variant(tie_embeddings=True),
    "dense": variant(moe=None, first_k_dense=0),
    "mqa-interleaved": variant(n_layers=4, n_kv_heads=1, first_k_dense=0, moe_every=2),
    "topp": variant(moe_fields=dict(router="topp", top_p=0.6, max_k=3)),
    "relu-router-bias": variant(moe_fields=dict(router="relu", activation="silu", router_bias=True)),
    "expert-choice": variant(moe_fields=dict(router="expert_choice"), allow_noncausal_routing=True),
    "gelu-expert-bias": variant(moe_fields=dict(activation="gelu", expert_mlp_bias=True)),
    "swiglu-expert-bias": variant(moe_fields=dict(expert_mlp_bias=True, top_k=1)),
    "shared-gated": variant(moe_fields=dict(num_shared=1, shared_gate=True, shared_hidden_dim=24)),
    "shared-2": variant(moe_fields=dict(num_shared=2)),
    "aux-free-sigmoid": variant(moe_fields=dict(selection_bias=True, score_func="sigmoid", top_k=3)),
    "graph-sim-identity": variant(moe_fields=dict(router="graph_sim", graph_learned=False)),
}


def expert_tensor_params(model):
    """Routed-expert parameters per MoE layer, counted from the model."""
    return {i: sum(p.numel() for p in layer.experts.parameters()) for i, layer in model.moe_layers.items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_param_counts_match_the_model(name):
    cfg = CONFIGS[name]
    model = MoETransformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    counts = param_counts(cfg)
    assert counts["embedding"] == model.embed.weight.numel()
    assert counts["routed_experts"] == sum(expert_tensor_params(model).values())
    assert counts["attention"] == sum(sum(p.numel() for p in b.attn.parameters()) for b in model.layers)


@pytest.mark.parametrize("name", CONFIGS)
def test_active_params_count_k_of_e_experts(name):
    cfg = CONFIGS[name]
    model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    ks = experts_per_token_by_layer(cfg)
    inactive = sum((1 - ks[i] / cfg.moe.num_experts) * n for i, n in expert_tensor_params(model).items())
    assert active_params(cfg) == round(total - inactive)
    vocab = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    assert active_params(cfg, embeddings=False) == round(total - inactive - vocab)


def counted_forward_flops(model, ids):
    """FLOPs per token of one forward pass by torch's counter (the math attention backend
    decomposes into counted matmuls), and the measured experts per token of each MoE layer."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids)
    measured = {i: r.experts_per_token.item() for i, r in out.moe_results.items()}
    return counter.get_total_flops() / ids.numel(), measured


@pytest.mark.parametrize(
    "name", ["tiny", "tied", "dense", "mqa-interleaved", "shared-gated", "aux-free-sigmoid"]
)
def test_flops_per_token_match_the_flop_counter(name):
    cfg = CONFIGS[name]
    flops, _ = counted_forward_flops(MoETransformer(cfg), torch.randint(0, cfg.vocab_size, (2, 24)))
    assert flops_per_token(cfg, 24) == flops


@pytest.mark.parametrize("name", ["topp", "relu-router-bias", "expert-choice"])
def test_variable_k_flops_use_the_measured_experts_per_token(name):
    cfg = CONFIGS[name]
    flops, measured = counted_forward_flops(MoETransformer(cfg), torch.randint(0, cfg.vocab_size, (2, 24)))
    # biases and the ReLU router's gain count as weights in the formula: a tiny overcount
    assert flops_per_token(cfg, 24, measured) == pytest.approx(flops, rel=1e-3)
    assert active_params(cfg, measured) < count_params(cfg)


def test_nominal_experts_per_token():
    nominal = lambda name: experts_per_token_by_layer(CONFIGS[name])  # noqa: E731
    assert nominal("tiny") == {1: 2.0}
    assert nominal("topp") == {1: 3.0}  # max_k: an upper bound
    assert nominal("relu-router-bias") == {1: 4.0}  # every expert: an upper bound
    assert nominal("expert-choice") == {1: 2.0}  # ec_capacity_factor
    ec = variant(moe_fields=dict(router="expert_choice", ec_capacity_factor=1.5), allow_noncausal_routing=True)
    assert experts_per_token_by_layer(ec) == {1: 1.5}  # not top_k, which keeps its default 2
    budget = variant(moe_fields=dict(identity_experts=2, selection_bias=True, computed_experts_target=1.25))
    assert experts_per_token_by_layer(budget) == {1: 1.25}  # LongCat's K_e: the average its bias steers to
    assert experts_per_token_by_layer(variant(moe_fields=dict(identity_experts=2))) == {1: 2.0}  # at most top_k
    assert nominal("mqa-interleaved") == {0: 2.0, 2: 2.0}
    assert nominal("dense") == {}


def test_measured_experts_per_token_are_validated():
    with pytest.raises(ValueError, match=r"layer 0, which is not an MoE layer; MoE layers: \[1\]"):
        active_params(tiny(), {0: 1.0})
    with pytest.raises(ValueError, match=r"experts_per_token\[1\] = 5 must lie in \[0, num_experts=4\]"):
        flops_per_token(tiny(), 16, {1: 5})
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        flops_per_token(tiny(), 0)
    with pytest.raises(ValueError, match=r"experts_per_token\[1\] = -0.5 must lie in \[0, num_experts=4\]"):
        active_params(tiny(), {1: -0.5})
    # both ends of [0, E] are valid (a ReLU router may pick no expert, or every one)
    assert active_params(tiny(), {1: 0.0}) < active_params(tiny(), {1: 4.0}) == count_params(tiny())


def test_chain_of_experts_with_more_expert_calls_than_experts():
    """C * top_k = 3 * 2 = 6 expert calls per token on 4 latent experts with a graph router: FLOPs
    (by torch's counter) count all 6 calls and C runs of the latent projections and token graphs;
    the measured k = 6 > E is valid; every expert counts once as active, so active == total."""
    cfg = variant(
        moe_fields=dict(chain_iterations=3, top_k=2, latent_dim=16, router="graph_sim", graph_learned=False)
    )
    model = MoETransformer(cfg)
    flops, measured = counted_forward_flops(model, torch.randint(0, cfg.vocab_size, (2, 24)))
    assert measured == {1: 6.0}
    assert flops_per_token(cfg, 24) == flops_per_token(cfg, 24, measured) == flops
    total = sum(p.numel() for p in model.parameters())
    assert count_params(cfg) == active_params(cfg) == active_params(cfg, measured) == total


def test_uoe_active_params_take_the_share_of_heads_and_slices():
    """UoE with 2 of 4 heads and 1 of 2 MLP slices per token (H != E), routers with biases: the
    count matches the model, and a token uses half of the attention projections and of the slices."""
    uoe = UoEConfig(attn_top_k=2, mlp_experts=2, mlp_top_k=1, router_bias=True, balance_coef=0.01)
    cfg = variant(moe=None, uoe=uoe, n_kv_heads=None, first_k_dense=0)
    model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert count_params(cfg) == total
    projections = sum(p.numel() for b in model.layers for n, p in b.attn.named_parameters() if "router" not in n)
    slices = sum(p.numel() for b in model.layers for p in b.ffn.experts.parameters())
    assert active_params(cfg) == total - projections / 2 - slices / 2


def test_flop_formula_by_hand():
    cfg = small()  # V 8192, D 256, L 8, H 8, G 4, Dh 32, tied; 8 experts of width 384, top-2
    D, V, L, S = 256, 8192, 8, 512
    per_layer = 2 * D * 256 + 2 * D * 128 + 8 * D + 2 * 3 * D * 384  # q,o + k,v + router + 2 experts
    assert flops_per_token(cfg, S) == 2 * (L * per_layer + V * D) + 4 * L * 8 * 32 * S


def test_model_info_is_json_ready_and_consistent():
    cfg = CONFIGS["tied"]
    info = json.loads(json.dumps(model_info(cfg)))
    assert info["total_params"] == count_params(cfg)
    assert info["non_embedding_params"] == count_params(cfg) - cfg.vocab_size * cfg.dim
    assert info["active_params"] == active_params(cfg) < info["total_params"]
    assert info["active_non_embedding_params"] == active_params(cfg, embeddings=False)
    assert (
        info["flops_per_token"] == flops_per_token(cfg, cfg.max_seq_len)
        and info["seq_len"] == cfg.max_seq_len
    )
    assert info["layer_types"] == ["dense", "moe"] and info["experts_per_token"] == {"1": 2.0}
    assert sum(info["params_by_component"].values()) == info["total_params"]


def test_model_info_uses_the_measured_experts_per_token():
    """An untied model with measured k: every count in the summary takes it, and non-embedding
    leaves out both vocabulary tables."""
    cfg, measured = CONFIGS["relu-router-bias"], {1: 1.5}
    info = model_info(cfg, seq_len=16, experts_per_token=measured)
    assert info["non_embedding_params"] == count_params(cfg) - 2 * cfg.vocab_size * cfg.dim
    assert info["active_params"] == active_params(cfg, measured) < active_params(cfg)
    assert info["active_non_embedding_params"] == active_params(cfg, measured, embeddings=False)
    assert info["flops_per_token"] == flops_per_token(cfg, 16, measured) < flops_per_token(cfg, 16)
    assert info["experts_per_token"] == {1: 1.5}


def test_small_preset_size():
    """The sizes small()'s docstring gives: ~23M parameters (8 layers, tied), ~8M active."""
    info = model_info(small())
    assert info["total_params"] == pytest.approx(23e6, rel=0.05)
    assert info["active_params"] == pytest.approx(8e6, rel=0.1)
