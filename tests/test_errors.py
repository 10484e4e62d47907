"""Bad input raises a clear error that names the fix (checked with pytest.raises(match=...))."""

import re

import pytest
import torch

from moelab.nn import (
    ExpertChoiceRouter,
    LatentProjection,
    MLPExperts,
    MoEConfig,
    MoELayer,
    ReLURouter,
    SwiGLUExperts,
    TopKRouter,
    TopPRouter,
    build_moe,
    grouped_mlp,
)

D, E, I = 16, 4, 8


def _layer(**kw):
    torch.manual_seed(0)
    return build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, **kw))


# ----------------------------------------------------------------------------- input tensors


def test_wrong_last_dim():
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 16\], got \[3, 15\]"):
        _layer()(torch.randn(3, 15))


def test_router_wants_2d_tokens():
    with pytest.raises(ValueError, match=r"flatten leading dims with x\.reshape\(-1, dim\)"):
        TopKRouter(D, E, 2)(torch.randn(2, 3, D))


def test_scalar_input():
    """A 0-d tensor has no feature dim: a ValueError naming the expected shape, not an IndexError."""
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        _layer()(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(dtype):
    with pytest.raises(ValueError, match="floating-point"):
        _layer()(torch.ones(3, D, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_input_dtype_differs_from_layer_dtype(dtype):
    """An fp32 layer fed bf16/fp64 input must say so and name the fix (cast the input or the
    layer), not fail deep inside a matmul with 'expected m1 and m2 to have the same dtype'."""
    with pytest.raises((ValueError, TypeError), match=r"(?s)dtype.*\.to\("):
        _layer()(torch.randn(3, D, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(bad):
    x = torch.randn(5, D)
    x[3, 7] = bad
    with pytest.raises(ValueError, match=r"router logits contain NaN or Inf.*gradient clipping"):
        _layer()(x)


def test_non_finite_router_weight():
    layer = _layer()
    with torch.no_grad():
        layer.router.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="router logits contain NaN or Inf"):
        layer(torch.randn(5, D))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_logits_near_the_float32_limit_pass_and_one_non_finite_among_them_does_not(bad):
    """The CPU check sums the logits in float64: logits of 3e38, whose float32 sum overflows, pass."""
    router = TopKRouter(D, E, 2)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :E] = torch.eye(E)  # logits = x[:, :E]
    x = torch.zeros(3, D)
    x[:, :E] = 3e38
    router(x)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        router(x)


@pytest.mark.parametrize("router", [lambda: TopPRouter(D, E, 0.5), lambda: ExpertChoiceRouter(D, E), lambda: ReLURouter(D, E)])
def test_non_finite_input_every_router(router):
    x = torch.randn(5, D)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        router()(x)


# ----------------------------------------------------------------------------- router settings


@pytest.mark.parametrize("k", [0, -1, E + 1])
def test_top_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"top_k must lie in \[1, num_experts={E}\], got {k}"):
        TopKRouter(D, E, k)
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, num_experts"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, top_k=k)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.0001, 2.0])
def test_top_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        TopPRouter(D, E, p)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="topp", top_p=p)


def test_max_k_out_of_range():
    with pytest.raises(ValueError, match=r"max_k must lie in \[1, num_experts=4\]"):
        TopPRouter(D, E, 0.5, max_k=5)
    with pytest.raises(ValueError, match=r"max_k must lie in"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="topp", max_k=0)


@pytest.mark.parametrize("n_group", [3, 5, 0])
def test_n_group_must_divide_num_experts(n_group):
    with pytest.raises(ValueError, match=rf"n_group \({n_group}\) must be >= 1 and divide num_experts \(8\)"):
        TopKRouter(D, 8, 2, n_group=n_group, topk_group=1)
    with pytest.raises(ValueError, match=r"divide num_experts"):
        MoEConfig(dim=D, num_experts=8, hidden_dim=I, n_group=n_group)


def test_topk_group_too_small_for_k():
    # 8 experts in 4 groups of 2; keeping 1 group leaves 2 experts < top_k = 3
    with pytest.raises(ValueError, match=r"raise topk_group or lower top_k"):
        TopKRouter(D, 8, 3, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match=r"raise topk_group or lower top_k"):
        MoEConfig(dim=D, num_experts=8, hidden_dim=I, top_k=3, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match=r"topk_group must lie in \[1, n_group=4\]"):
        TopKRouter(D, 8, 2, n_group=4, topk_group=5)


def test_unknown_group_score():
    with pytest.raises(ValueError, match=r"group_score must be one of \('max', 'top2'\) \(or None: by score_func\), got 'sum'"):
        TopKRouter(D, 8, 2, n_group=4, topk_group=2, group_score="sum")
    with pytest.raises(ValueError, match=r"group_score must be one of"):
        MoEConfig(dim=D, num_experts=8, hidden_dim=I, n_group=4, topk_group=2, group_score="sum")


def test_a_config_with_groups_of_one_scored_by_their_two_best_is_refused():
    """moelab's router would train it (the best min(2, size) of a group), but no checkpoint view
    reads it back (transformers' top-2 group routers need two experts a group): refused up front."""
    for settings in (dict(score_func="sigmoid"), dict(group_score="top2")):
        with pytest.raises(ValueError, match=r"every group needs at least 2"):
            MoEConfig(dim=D, num_experts=4, hidden_dim=I, n_group=4, topk_group=2, **settings)
    MoEConfig(dim=D, num_experts=4, hidden_dim=I, n_group=4, topk_group=2)  # softmax groups scored by their best


def test_unknown_score_func():
    with pytest.raises(ValueError, match=r"score_func must be one of"):
        TopKRouter(D, E, 2, score_func="softplus")
    with pytest.raises(ValueError, match=r"unknown score_func 'sigmod' \(did you mean 'sigmoid'\?\)"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, score_func="sigmod")


@pytest.mark.parametrize("c", [0.0, -1.0, E + 0.5])
def test_expert_choice_capacity_factor(c):
    with pytest.raises(ValueError, match=rf"capacity_factor \(average experts per token\) must lie in \(0, {E}\]"):
        ExpertChoiceRouter(D, E, capacity_factor=c)


@pytest.mark.parametrize("c", [0.0, E + 0.5])
def test_config_validates_expert_choice_capacity_factor(c):
    """MoEConfig promises validation on construction: a bad ec_capacity_factor must fail there,
    not later in build_moe."""
    with pytest.raises(ValueError, match="ec_capacity_factor"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="expert_choice", ec_capacity_factor=c)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(router="graph_sim", route_scale=2.0), "route_scale=2.0 has no effect without router 'topk' or 'hash'"),
        (dict(router="topp", score_func="sigmoid"), "score_func='sigmoid' has no effect without router 'topk' or 'hash'"),
        (dict(router="graph_attn", n_group=2, topk_group=1), "n_group=2 has no effect"),
        (dict(router="expert_choice", renormalize=True), "renormalize=True has no effect without router 'topk'"),
        (dict(router="topk", top_p=0.9), "top_p=0.9 has no effect without router='topp'"),
        (dict(router="topk", max_k=3), "max_k=3 has no effect without router='topp'"),
        (dict(router="topp", ec_capacity_factor=1.0), "ec_capacity_factor=1.0 has no effect"),
        (dict(router="graph_attn", graph_tau=2.0), "graph_tau=2.0 has no effect without router='graph_sim'"),
        (dict(bias_update_rate=0.1), "bias_update_rate=0.1 has no effect without selection_bias=True"),
        (dict(shared_gate=True), "shared_gate=True has no effect without num_shared >= 1"),
        (dict(shared_hidden_dim=16), "shared_hidden_dim=16 has no effect without num_shared >= 1"),
        (dict(router="topp", top_k=1), "top_k=1 has no effect without router 'topk', 'hash' or a graph router: top-p"),
        (dict(router="expert_choice", top_k=3), "top_k=3 has no effect"),
        (dict(topk_group=2), "topk_group=2 has no effect without router='topk' with expert groups, n_group > 1"),
        (dict(group_score="top2"), "group_score='top2' has no effect without router='topk' with expert groups"),
        (dict(sparsity_window=4), "sparsity_window=4 has no effect without a router of variable k"),
    ],
)
def test_a_setting_the_layer_would_not_read_is_refused(options, named):
    """Each named setting, left at its default, builds; changed where the layer never reads it, it is
    refused by name, instead of building a layer that silently ignores it."""
    with pytest.raises(ValueError, match=re.escape(named) + ".*leave it at its default"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, **options)
    defaults = {name: MoEConfig.__dataclass_fields__[name].default for name in options if name != "router"}
    MoEConfig(dim=D, num_experts=E, hidden_dim=I, router=options.get("router", "topk"), **defaults)


def test_selection_bias_only_for_topk():
    with pytest.raises(ValueError, match="selection_bias applies to router='topk' only"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="topp", selection_bias=True)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "field,value,hint",
    [
        ("router", "top_k", "topk"),
        ("router", "expert-choice", "expert_choice"),
        ("activation", "swiglue", "swiglu"),
        ("activation", "gelu_new", "gelu"),
        ("backend", "groupedmm", "grouped_mm"),
        ("backend", "loops", "loop"),
    ],
)
def test_unknown_names_suggest_the_close_one(field, value, hint):
    with pytest.raises(ValueError, match=rf"unknown {field} '{value}' \(did you mean '{hint}'\?\); choose one of"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, **{field: value})


def test_unknown_backend_and_activation_on_modules():
    with pytest.raises(ValueError, match=r"unknown experts backend 'cuda'; choose one of"):
        SwiGLUExperts(E, D, I, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; choose one of"):
        MLPExperts(E, D, I, activation="tanh")
    w_in, w_out = torch.randn(E, I, D), torch.randn(E, D, I)
    with pytest.raises(ValueError, match=r"unknown experts backend 'fast'"):
        grouped_mlp(torch.randn(2, D), [2, 0, 0, 0], None, w_in, None, w_out, None, backend="fast", gated=False)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        grouped_mlp(torch.randn(2, D), [2, 0, 0, 0], None, w_in, None, w_out, None, activation="swish", gated=False)


def test_unknown_config_field():
    with pytest.raises(ValueError, match=r"did you mean 'capacity_factor'"):
        MoEConfig.from_dict({"dim": D, "num_experts": E, "hidden_dim": I, "capacityfactor": 1.0})


# ----------------------------------------------------------------------------- sizes and capacity


def test_router_and_experts_disagree_on_num_experts():
    with pytest.raises(ValueError, match=r"router \(8 experts.*does not match experts \(4 experts"):
        MoELayer(TopKRouter(D, 8, 2), SwiGLUExperts(4, D, I))


def test_router_and_experts_disagree_on_dim():
    with pytest.raises(ValueError, match=r"dim 16\) does not match experts \(4 experts, dim 12\)"):
        MoELayer(TopKRouter(D, E, 2), SwiGLUExperts(E, 12, I))


def test_latent_projection_must_match_the_router_dim():
    """The experts (dim 4) match the latent rank, but the projection reads inputs of dim 20, not
    the router's 16: refused rather than failing at the first forward."""
    with pytest.raises(ValueError, match=r"latent projection dim 20 does not match the router's dim 16"):
        MoELayer(TopKRouter(D, E, 2), SwiGLUExperts(E, 4, I), latent=LatentProjection(20, 4))


def test_latent_rank_lies_between_1_and_the_dim():
    assert LatentProjection(D, D).rank == D  # the full rank is allowed
    for rank in (0, D + 1):
        with pytest.raises(ValueError, match=rf"latent rank must lie in \[1, dim={D}\], got {rank}"):
            LatentProjection(D, rank)


def test_bad_sparsity_window():
    with pytest.raises(ValueError, match=r"sparsity_window must be >= 1, got 0"):
        MoELayer(ReLURouter(D, E), SwiGLUExperts(E, D, I), sparsity_window=0)

@pytest.mark.parametrize("cf", [0.0, -0.5])
def test_bad_capacity_factor(cf):
    with pytest.raises(ValueError, match=r"capacity_factor must be > 0 \(or None for dropless\)"):
        MoELayer(TopKRouter(D, E, 2), SwiGLUExperts(E, D, I), capacity_factor=cf)
    with pytest.raises(ValueError, match=r"capacity_factor must be > 0 or None \(dropless\)"):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, capacity_factor=cf)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("balance_coef", -1.0, r"balance_coef must be >= 0 \(0 turns it off\), got -1.0"),
        ("z_coef", -1e-3, "z_coef must be >= 0"),
        ("entropy_coef", -2.0, "entropy_coef must be >= 0"),
        ("bias_update_rate", -0.1, "bias_update_rate must be >= 0"),
        ("route_scale", 0.0, r"route_scale must be > 0 \(it multiplies the routed output\), got 0.0"),
    ],
)
def test_coefficients_of_the_wrong_sign(field, value, message):
    """A negative coefficient rewards what its loss penalises, and trained silently before."""
    with pytest.raises(ValueError, match=message):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, **{field: value})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_shared=-1), "num_shared must be >= 0, got -1"),
        (dict(router="graph_sim", graph_tau=0.0), r"graph_tau must be > 0 or None \(sqrt\(dim\)\), got 0.0"),
        (dict(chunk_len=0), "chunk_len must be >= 1, got 0"),
    ],
)
def test_out_of_range_settings_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(dim=D, num_experts=E, hidden_dim=I, **options)


def test_top_p_of_one_is_allowed():
    """top_p lies in (0, 1]: 1.0 (every expert up to max_k) is a valid setting."""
    assert MoEConfig(dim=D, num_experts=E, hidden_dim=I, router="topp", top_p=1.0).top_p == 1.0


@pytest.mark.parametrize("field", ["dim", "num_experts", "hidden_dim"])
def test_non_positive_sizes(field):
    kw = dict(dim=D, num_experts=E, hidden_dim=I, top_k=1)
    kw[field] = 0
    with pytest.raises(ValueError, match=rf"{field} must be >= 1, got 0"):
        MoEConfig(**kw)


def test_counts_must_cover_rows():
    with pytest.raises(ValueError, match=r"counts must have one entry per expert \(4\) summing to the 3 rows"):
        SwiGLUExperts(E, D, I)(torch.randn(3, D), [1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"experts expect rows of shape \[N, 16\]"):
        SwiGLUExperts(E, D, I)(torch.randn(3, 8), [3, 0, 0, 0])


def test_blockffn_losses_need_sequences():
    layer = _layer(router="relu", locality_coef=1e-3)
    with pytest.raises(ValueError, match=r"need input of shape \[batch, seq, dim\]"):
        layer(torch.randn(6, D))
