"""The decoder-only MoE language model: config validation and round trips, layer placement,
causality per router, gradients, KV-cache decoding, checkpoints, and a tiny overfit run."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from moelab.models import (
    KVCache,
    ModelConfig,
    MoETransformer,
    load_pretrained,
    preset,
    save_pretrained,
    tiny,
)
from moelab.models.transformer import Sampling, masked_attention, sample_next_token
from moelab.nn import MoELayer, SwiGLU

ROUTERS = {
    "topk": dict(),
    "topp": dict(router="topp", top_p=0.5),
    "relu": dict(router="relu", activation="silu"),
    "expert_choice": dict(router="expert_choice", ec_capacity_factor=1.0),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(moe_fields=None, **overrides) -> ModelConfig:
    """The tiny preset with MoEConfig fields `moe_fields` and ModelConfig fields `overrides` replaced."""
    cfg = tiny()
    if moe_fields is not None:
        overrides["moe"] = dataclasses.replace(cfg.moe, **moe_fields)
    return dataclasses.replace(cfg, **overrides)


def make_model(seed=0, **kwargs) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(make_config(**kwargs))


def random_ids(batch=2, seq=16, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "cfg",
    [
        make_config(),
        make_config(moe_fields=dict(router="topp", top_p=0.3, max_k=3, num_shared=1), tie_embeddings=True),
        make_config(layer_types=["moe", "dense"]),
        make_config(moe=None, first_k_dense=0, n_kv_heads=None),
    ],
    ids=["tiny", "topp-shared-tied", "layer-types", "dense"],
)
def test_config_round_trips_through_dict_json_and_yaml(cfg, tmp_path):
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for name in ("config.json", "config.yaml", "config.yml", "config.YML"):
        cfg.save(tmp_path / name)
        assert ModelConfig.load(tmp_path / name) == cfg


def test_config_derives_defaults_and_moe_dim():
    data = {
        "vocab_size": 64,
        "dim": 48,
        "n_layers": 2,
        "n_heads": 4,
        "moe": {"num_experts": 4, "hidden_dim": 16},
    }
    cfg = ModelConfig.from_dict(data)
    assert cfg.moe.dim == 48 and cfg.n_kv_heads == 4 and cfg.head_dim == 12
    assert cfg.dense_hidden_dim == 128  # 8/3 * 48 = 128, already a multiple of 64
    small_dim = ModelConfig.from_dict({**data, "dim": 32, "moe": None})
    assert small_dim.dense_hidden_dim == 128  # 8/3 * 32 = 85.3, rounded up to a multiple of 64


def test_presets():
    assert preset("tiny") == tiny()
    with pytest.raises(ValueError, match="did you mean 'small'"):
        preset("smal")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_heads=5), r"dim \(32\) must be divisible by n_heads \(5\)"),
        (dict(n_heads=8, n_kv_heads=3), r"n_kv_heads \(3\) must divide n_heads \(8\)"),
        (dict(dim=24, n_heads=8), "head_dim = dim / n_heads = 3 must be even"),
        (
            dict(moe=dict(num_experts=4, hidden_dim=8, top_k=5)),
            r"ModelConfig.moe: top_k must lie in \[1, num_experts=4\]",
        ),
        (
            dict(moe=dict(num_experts=4, hidden_dim=8, dim=16)),
            r"moe.dim \(16\) must equal ModelConfig.dim \(32\)",
        ),
        (dict(moe=dict(num_experts=4, hiden_dim=8)), "did you mean 'hidden_dim'"),
        (dict(n_layer=2), "unknown ModelConfig field 'n_layer' \\(did you mean 'n_layers'\\?\\)"),
        (dict(norm_eps="1e-5"), "norm_eps must be float, got str '1e-5' \\(YAML reads 1e-5 as a string"),
        (dict(layer_types=["moe"]), "layer_types has 1 entries but n_layers is 2"),
        (dict(layer_types=["moe", "mo"]), "unknown kind 'mo' \\(did you mean 'moe'\\?\\)"),
        (dict(first_k_dense=2), r"first_k_dense \(2\) must lie in \[0, n_layers=2\)"),
        (dict(moe=None, layer_types=["dense", "moe"]), "'moe' layers but moe is None"),
        (dict(layer_types=["dense", "dense"]), "moe is set but layer_types has no 'moe' layer"),
        (dict(vocab_size=0), "vocab_size must be >= 1"),
        (dict(moe_every=0), "moe_every must be >= 1, got 0"),
        (dict(n_kv_heads=0), r"n_kv_heads \(0\) must divide n_heads"),
        (dict(norm_eps=0.0), "norm_eps must be > 0, got 0.0"),
        (dict(rope_theta=0.0), "rope_theta must be > 0, got 0.0"),
        (dict(init_std=0.0), "init_std must be > 0, got 0.0"),
        (dict(max_seq_len=0), "max_seq_len must be >= 1, got 0"),
        (dict(dense_hidden_dim=0), "dense_hidden_dim must be >= 1, got 0"),
        (dict(first_k_dense=-1), r"first_k_dense \(-1\) must lie in \[0, n_layers=2\)"),
    ],
)
def test_bad_configs_fail_at_config_time(change, message):
    data = make_config().to_dict()
    data.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(data)


def test_a_missing_field_is_a_value_error_naming_it():
    data = make_config().to_dict()
    del data["vocab_size"]
    with pytest.raises(ValueError, match=r"^ModelConfig: .*missing 1 required keyword-only argument: 'vocab_size'"):
        ModelConfig.from_dict(data)


def test_config_load_rejects_unknown_suffix_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="use a .json, .yaml or .yml file"):
        tiny().save(tmp_path / "config.toml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of ModelConfig fields"):
        ModelConfig.load(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "overrides, kinds",
    [
        (dict(n_layers=4, first_k_dense=0), ["moe"] * 4),
        (dict(n_layers=4, first_k_dense=1), ["dense", "moe", "moe", "moe"]),
        (dict(n_layers=5, first_k_dense=0, moe_every=2), ["moe", "dense", "moe", "dense", "moe"]),
        (dict(n_layers=6, first_k_dense=1, moe_every=2), ["dense", "moe", "dense", "moe", "dense", "moe"]),
        (dict(n_layers=3, moe_every=2, layer_types=["dense", "dense", "moe"]), ["dense", "dense", "moe"]),
        (dict(n_layers=3, moe=None), ["dense"] * 3),
        (dict(n_layers=3, moe=None, first_k_dense=3), ["dense"] * 3),  # no MoE layer to leave
    ],
)
def test_layer_kinds_place_the_right_ffn(overrides, kinds):
    cfg = make_config(**overrides)
    assert cfg.layer_kinds == kinds
    model = MoETransformer(cfg)
    assert [type(b.ffn) for b in model.layers] == [MoELayer if k == "moe" else SwiGLU for k in kinds]
    assert sorted(model.moe_layers) == [i for i, kind in enumerate(kinds) if kind == "moe"]


# ----------------------------------------------------------------------------- forward


def test_forward_outputs_and_losses():
    model = make_model(moe_fields=dict(z_coef=1e-3, entropy_coef=1e-2), first_k_dense=0)
    ids = random_ids()
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    out = model(ids, targets)
    assert out.logits.shape == (2, 16, 128)
    assert sorted(out.moe_results) == [0, 1]
    assert set(out.aux_losses) == {"balance", "z", "entropy"}
    for name, value in out.aux_losses.items():
        torch.testing.assert_close(value, sum(r.losses[name] for r in out.moe_results.values()))
    torch.testing.assert_close(out.aux_loss, sum(r.loss for r in out.moe_results.values()))
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert model(ids).loss is None


def test_dense_model_has_zero_aux_loss():
    out = make_model(moe=None, first_k_dense=0)(random_ids())
    assert out.aux_loss.item() == 0.0 and out.aux_losses == {} and out.moe_results == {}


def test_forward_rejects_bad_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="exceed ModelConfig.max_seq_len"):
        model(random_ids(seq=65))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="targets must have input_ids' shape"):
        model(random_ids(), random_ids(seq=8))



def test_expert_choice_refuses_lm_mode_unless_allowed():
    with pytest.raises(
        ValueError,
        match=r"MoE layers \[1\] route non-causally \(ExpertChoiceRouter\).*allow_noncausal_routing",
    ):
        make_model(moe_fields=ROUTERS["expert_choice"])(random_ids())
    model = make_model(moe_fields=ROUTERS["expert_choice"], allow_noncausal_routing=True)
    ids = random_ids()
    changed = ids.clone()
    changed[:, 9:] = random_ids(seed=2)[:, 9:]
    # the leak the check guards against: earlier positions change with later tokens
    assert not torch.allclose(model(ids).logits[:, :9], model(changed).logits[:, :9], atol=1e-5)


def test_capacity_dropping_refuses_lm_mode_unless_allowed():
    with pytest.raises(ValueError, match=r"route non-causally \(capacity dropping\)"):
        make_model(moe_fields=dict(capacity_factor=1.0))(random_ids())
    make_model(moe_fields=dict(capacity_factor=1.0), allow_noncausal_routing=True)(random_ids())


@pytest.mark.parametrize("kind", ROUTERS)
def test_every_router_parameter_gets_a_gradient(kind):
    model = make_model(
        moe_fields=dict(ROUTERS[kind], router_bias=True), first_k_dense=0, allow_noncausal_routing=True
    )
    ids = random_ids()
    out = model(ids, ids)
    (out.loss + out.aux_loss).backward()
    for i, layer in model.moe_layers.items():
        for name, p in layer.router.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i} router.{name} got no gradient"


def test_weight_init_scales():
    model = make_model(init_std=0.05, n_layers=8, first_k_dense=0)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert model.layers[0].ffn.experts.down_proj.std().item() == pytest.approx(0.05 / 4, rel=0.1)
    assert model.layers[0].attn_norm.weight.eq(1).all()


def test_tied_embeddings_share_one_tensor():
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight


# ----------------------------------------------------------------------------- decoding


def greedy_by_recomputing(model, ids, max_new_tokens):
    for _ in range(max_new_tokens):
        next_ids = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["topk", "topp"])
def test_kv_cache_greedy_equals_recomputing_the_sequence(kind):
    model = make_model(moe_fields=ROUTERS[kind], init_std=0.2).eval()
    prompt = random_ids(batch=3, seq=5)
    with torch.no_grad():
        expected = greedy_by_recomputing(model, prompt, 12)
    assert torch.equal(model.generate(prompt, 12, greedy=True), expected)


def test_chunked_prefill_with_cache_matches_full_forward():
    model = make_model().eval()
    ids = random_ids(seq=20)
    cache = KVCache(model.config, batch_size=2, max_len=20)
    with torch.no_grad():
        full = model(ids).logits
        parts = [model(ids[:, a:b], kv_cache=cache, start_pos=a).logits for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed the KV cache's max_len"):
        model(ids[:, :1], kv_cache=cache, start_pos=20)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    model = make_model(init_std=0.2).eval()
    prompt = random_ids(seq=4)
    sample = lambda seed, **kw: model.generate(prompt, 8, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(sample(0, temperature=0.8), sample(0, temperature=0.8))
    assert torch.equal(sample(0, top_p=1e-6), model.generate(prompt, 8, greedy=True))
    assert torch.equal(sample(3, top_k=1, temperature=2.0), model.generate(prompt, 8, greedy=True))
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        model.generate(prompt, 2, top_k=0)
    for ignored in (dict(temperature=0.5), dict(top_p=0.9), dict(top_k=3), dict(generator=torch.Generator())):
        with pytest.raises(ValueError, match=f"greedy=True takes the argmax, so {next(iter(ignored))} would be ignored"):
            model.generate(prompt, 2, greedy=True, **ignored)
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="top_k must be an integer"):
            Sampling(top_k=bad)
    numpy_numbers = Sampling(temperature=np.float32(0.5), top_p=np.float64(0.5), top_k=np.int64(3))
    assert [type(v) for v in (numpy_numbers.temperature, numpy_numbers.top_p, numpy_numbers.top_k)] == [float, float, int]
    assert torch.equal(sample(1, top_k=np.int64(3)), sample(1, top_k=3))
    for bad, message in ((True, "a Python number"), ("0.9", "a Python number"), (1.5, "a number in"), (0.0, "a number in")):
        with pytest.raises(ValueError, match=f"top_p must be {message}"):  # True would pass as 1.0
            Sampling(top_p=bad)
        with pytest.raises(ValueError, match=f"top_p must be {message}"):
            model.generate(prompt, 2, top_p=bad)
    logits = torch.randn(3, 50) * 4
    assert torch.equal(sample_next_token(logits, temperature=1e-45), logits.argmax(-1))  # not inf / inf
    assert model.generate(prompt, 60, greedy=True).shape[1] == model.config.max_seq_len == 64  # fills it
    with pytest.raises(ValueError, match=r"^prompt \(4 tokens\) \+ max_new_tokens \(61\) must fit ModelConfig.max_seq_len"):
        model.generate(prompt[:1], 61)
    with pytest.raises(ValueError, match=r"^the prompts, padded to one length, \(4 tokens\) \+ max_new_tokens \(61\)"):
        model.generate(prompt, 61)
    # inf: logits / inf = 0, every token alike; None (transformers' "not set") was a TypeError from 0 < None
    for bad in (0, float("inf"), float("nan"), None):
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            model.generate(prompt, 2, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            Sampling(temperature=bad)
    for bad, shown in ((True, "bool True"), ("2", "str '2'"), (torch.tensor(0.7), r"Tensor tensor\(0.7000\)")):
        with pytest.raises(ValueError, match=f"temperature must be a Python number \\(float\\), got {shown}"):
            Sampling(temperature=bad)


def test_a_sampling_seed_is_one_torch_s_generators_take():
    """A seed outside torch.Generator's range [-2**63, 2**64) is refused by Sampling itself, naming
    the range (torch's own 'Overflow when unpacking long long' came from the first draw); numpy's
    integers are seeds like Python's (as top_k takes them)."""
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\), got -?\d+"):
            Sampling(seed=bad)
    for bad in (True, 1.0, "3"):
        with pytest.raises(ValueError, match="seed must be an integer"):
            Sampling(seed=bad)
    for edge in (2**64 - 1, -(2**63)):
        Sampling(seed=edge).generator("cpu")
    seed = Sampling(seed=np.int64(7)).seed
    assert type(seed) is int and seed == 7


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly():
    """Four equally likely tokens (0.25 each, exact): a nucleus of 0.5 is two of them, the second
    reaching 0.5 exactly; a third (whose mass before it is 0.5) is never drawn."""
    logits = torch.zeros(400, 4)
    drawn = sample_next_token(logits, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert len(drawn.unique()) == 2
    assert len(sample_next_token(logits, top_p=0.75, generator=torch.Generator().manual_seed(0)).unique()) == 3


@pytest.mark.parametrize("seed", range(5))
def test_top_k_then_top_p_keep_the_tokens_transformers_keeps(seed):
    """The tokens `sample_next_token` may draw (temperature, then top-k, then top-p over the
    renormalised top-k) are those transformers' own warpers leave finite, on random logits."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(seed)
    logits = torch.randn(4, 50) * 3
    cases = [(0.7, 5, 0.8), (1.3, 20, 0.5), (1.0, 3, None), (1.0, None, 0.9), (1.0, 50, 1.0)]
    for temperature, top_k, top_p in cases:
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k is not None:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p is not None:
            warped = TopPLogitsWarper(top_p)(None, warped)
        draws = torch.stack([
            sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=torch.Generator().manual_seed(i))
            for i in range(400)
        ])  # fmt: skip
        drawn = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, draws.T, True)
        allowed = warped.isfinite()
        assert not (drawn & ~allowed).any(), (temperature, top_k, top_p)
        if top_k is not None and top_k <= 5:
            assert torch.equal(drawn, allowed), (temperature, top_k, top_p)


def sampled_probs(monkeypatch, logits: torch.Tensor, **options) -> torch.Tensor:
    """The [B, V] probabilities `sample_next_token(logits, **options)` draws from (its `_draw`'s input,
    normalised)."""
    from moelab.models import transformer

    seen = []
    monkeypatch.setattr(transformer, "_draw", lambda probs, generator: seen.append(probs) or probs.argmax(-1))
    sample_next_token(logits, **options)
    return seen[0] / seen[0].sum(-1, keepdim=True)


def transformers_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """softmax of the logits after transformers' warpers (temperature, top-k, top-p; top_p 1.0 none, as
    its `generate` adds none)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, 0.99), (1.0, None, 0.999), (0.7, 40, 0.9), (1.5, None, 0.5), (0.3, None, 1.0), (1.0, 8192, None)],
)
def test_the_filtered_distribution_is_transformers_at_a_large_vocabulary(monkeypatch, temperature, top_k, top_p):
    """64 rows of V = 8,192 random logits: the tokens kept are exactly those transformers' warpers
    keep, and their probabilities equal its own to float32's rounding. The nucleus's boundary
    is found in float64 sums (float32's, summed from the largest down, kept a token too many or too
    few in 5 of the 64 rows at top_p 0.999), and top_p 1.0 keeps every token (float32's sums reached 1
    before the tail, which was then dropped: 85 % of the tokens, of probability up to 9e-9, at
    temperature 0.3)."""
    logits = torch.randn(64, 8192, generator=torch.Generator().manual_seed(0)) * 3
    ours = sampled_probs(monkeypatch, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    theirs = transformers_probs(logits, temperature, top_k, top_p)
    assert torch.equal(ours > 0, theirs > 0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


def test_top_k_keeps_the_k_largest_logits_where_tempered_probabilities_round_equal(monkeypatch):
    """Logits 1e-6 apart at temperature 100 differ by 1e-8 when tempered, whose exp rounds to the same
    float32: top-k on those probabilities kept all three as tied with the k-th; transformers' top-k,
    on the tempered logits, keeps k (top_k 1 is greedy at any temperature)."""
    logits = torch.tensor([[0.0, -1e-6, -2e-6, -5.0]])
    for k in (1, 2):
        probs = sampled_probs(monkeypatch, logits, temperature=100.0, top_k=k)
        assert torch.equal(probs > 0, transformers_probs(logits, 100.0, k, None) > 0)
        assert (probs > 0).sum() == k
    draws = sample_next_token(logits.expand(200, -1), temperature=100.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (draws == 0).all()


def test_top_p_applies_to_the_renormalised_top_k():
    """probs 0.5, 0.3, 0.2: top-k 2 leaves 0.625 and 0.375, whose first alone reaches top-p 0.6;
    over the unrenormalised 0.5 the second would be kept too."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    def draws(**kw) -> set[int]:
        seeded = [torch.Generator().manual_seed(i) for i in range(200)]
        return {int(sample_next_token(logits, top_k=2, generator=g, **kw)) for g in seeded}

    assert draws(top_p=0.6) == {0}
    assert draws() == {0, 1}


@pytest.mark.parametrize("u, expected", [(0.0, [2, 0]), (0.25, [2, 0]), (0.4, [2, 6]), (0.5, [4, 6]), (0.999, [4, 6]), (1.0, [4, 6])])
def test_a_draw_takes_the_token_whose_interval_holds_it_and_never_one_of_probability_zero(monkeypatch, u, expected):
    """The uniform draw u lands in the cumulative probabilities: row 0 [0, 0, .5, 0, .5, 0, 0] gives
    token 2 below u = .5 and token 4 from it, never the empty ones around them, also at u = 0
    and at u * sum rounded to the sum itself (u = 1); row 1 [.3, 0, 0, 0, 0, 0, .7] token 0 below .3,
    then token 6."""
    from moelab.models import transformer

    probs = torch.tensor([[0, 0, 0.5, 0, 0.5, 0, 0], [0.3, 0, 0, 0, 0, 0, 0.7]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, u))
    assert transformer._draw(probs, None).tolist() == expected


def test_a_token_far_below_float32s_resolution_near_1_keeps_its_own_interval(monkeypatch):
    """A row of V = 2**16: one token of 1 - 6.5e-5, then 2**16 - 1 of 1e-9 each (float32's cumulative
    sums near 1 move in steps of 6e-8). u in the middle of a small token's interval draws that
    token (the first ones, then every 1,000th, the last ones), as it does the large one's."""
    from moelab.models import transformer

    V, small = 2**16, 1e-9
    probs = torch.full((V,), small)
    probs[0] = 1 - (V - 1) * small
    tokens = torch.cat([torch.arange(4), torch.arange(1000, V, 1000), torch.arange(V - 3, V)])
    bounds = probs.double().cumsum(0)
    middles = (bounds[tokens] - probs[tokens].double() / 2) / bounds[-1]
    monkeypatch.setattr(torch, "rand", lambda shape, dtype, **kw: middles[:, None].to(dtype))
    assert torch.equal(transformer._draw(probs.expand(len(tokens), -1), None), tokens)


def test_a_batch_hands_searchsorted_contiguous_values(monkeypatch):
    """Each row's total, a column of the [B, V] cumulative sums, is searched for as a contiguous
    [B, 1]: torch.searchsorted warns of non-contiguous values (once a process, as a UserWarning)."""
    searchsorted = torch.searchsorted

    def contiguous_values_only(cdf, values, **kw):
        assert values.is_contiguous()
        return searchsorted(cdf, values, **kw)

    monkeypatch.setattr(torch, "searchsorted", contiguous_values_only)
    assert sample_next_token(torch.randn(3, 10), generator=torch.Generator().manual_seed(0)).shape == (3,)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_logits_that_are_no_distribution_are_refused_when_sampling(bad):
    """A row of NaN logits, or one where every token is -inf (softmax gives NaN), has no token to draw:
    an error, not a token; a row with some -inf tokens is fine, and never draws them."""
    logits = torch.tensor([[0.0, 1.0, -math.inf], [bad] * 3])
    with pytest.raises(ValueError, match="cannot sample: a row of logits has no finite maximum"):
        sample_next_token(logits, generator=torch.Generator().manual_seed(0))
    draws = sample_next_token(logits[:1].expand(200, -1), generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "top_k, top_p, support",
    [(None, None, [0, 1, 2, 3, 4, 5]), (3, None, [0, 1, 2]), (None, 0.7, [0, 1])],
)
def test_sampling_frequencies_follow_the_tempered_softmax_over_the_support(top_k, top_p, support):
    """20k seeded draws from fixed logits at temperature 0.8: each token's frequency is its
    softmax(logits / T) probability renormalised over the kept tokens (within 0.015; 4.5 sigma)."""
    logits = torch.tensor([2.0, 1.2, 0.5, 0.0, -0.5, -1.5])
    probs = (logits / 0.8).softmax(-1)  # 0.60 0.22 0.09 0.05 ...: top-p 0.7 keeps the first two
    expected = torch.zeros(6)
    expected[support] = probs[support] / probs[support].sum()
    draws = sample_next_token(
        logits.expand(20_000, -1), temperature=0.8, top_k=top_k, top_p=top_p,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert (freq[expected == 0] == 0).all()
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_each_row_of_a_batch_draws_its_own_distribution_by_chi_square():
    """Three rows of V = 8 with their own logits (some -inf, some cut by top-k 6), each drawn 30k
    times as rows of one batch from one seeded generator: each row's counts pass a chi-square
    test against its own tempered, top-k softmax (p > 0.001), and its probability-0 tokens never come."""
    from scipy.stats import chi2

    inf = math.inf
    logits = torch.tensor([
        [2.0, 1.0, 0.5, -inf, 0.0, -1.0, -2.0, -3.0],
        [-inf, -inf, 3.0, 3.0, 1.0, 0.0, -0.5, -inf],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    ])  # fmt: skip
    n = 30_000
    draws = sample_next_token(
        logits.repeat(n, 1), temperature=1.3, top_k=6, generator=torch.Generator().manual_seed(0)
    ).view(n, 3)
    for row in range(3):
        kept = logits[row] >= logits[row].topk(6).values[-1]
        expected = torch.where(kept, logits[row] / 1.3, -inf).softmax(-1) * n
        counts = torch.bincount(draws[:, row], minlength=8)
        assert (counts[expected == 0] == 0).all(), row
        seen = expected > 0
        statistic = float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())
        assert chi2.sf(statistic, int(seen.sum()) - 1) > 1e-3, (row, statistic)


def test_generation_stops_at_eos_and_pads_with_it():
    model = make_model(init_std=0.2).eval()
    prompt = random_ids(seq=4)
    free = model.generate(prompt, 10, greedy=True)
    eos = free[0, 6].item()  # sequence 0 emits it by its third new token
    out = model.generate(prompt, 10, greedy=True, eos_token_id=eos)
    ends = []
    for row, free_row in zip(out, free, strict=True):
        hits = (free_row[4:] == eos).nonzero()
        ends.append(5 + hits[0].item() if len(hits) else free.shape[1])
        assert torch.equal(row[: ends[-1]], free_row[: ends[-1]]) and (row[ends[-1] :] == eos).all()
    assert model.generate(prompt[:1], 10, greedy=True, eos_token_id=eos).shape[1] == ends[0]  # stops early


def test_generate_refuses_the_tokens_of_non_finite_logits():
    """A NaN in the weights makes NaN logits, whose argmax is no token of the model's: refused."""
    model = make_model().eval()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="the logits held NaN or Inf while decoding"):
        model.generate(random_ids(seq=4), 2, greedy=True)


def test_no_new_tokens_returns_the_prompts():
    """max_new_tokens=0 decodes nothing, a one-token prompt too (its KV cache holds the prompt)."""
    model = make_model().eval()
    for seq in (1, 3):
        ids = random_ids(batch=2, seq=seq)
        assert torch.equal(model.generate(ids, 0, greedy=True), ids)
    for bad in (-1, 2.5):  # -1 was refused as a prompt too long for the context, 2.5 deep in torch
        with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer >= 0 .*, got {bad}$"):
            model.generate(ids, bad, greedy=True)


def left_padded(prompts: list[torch.Tensor], pad_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of several lengths as one [B, S] batch with padding (taken from pad_ids) before
    each, and its attention_mask."""
    S = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([pad_ids[i, : S - len(p)], p]) for i, p in enumerate(prompts)])
    mask = torch.stack([torch.arange(S) >= S - len(p) for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize("kind", ["topk", "topp", "shared"])
def test_a_left_padded_batch_decodes_each_prompt_as_it_would_alone(kind):
    """Each sequence of a padded batch gives the tokens it gives alone (float64, so no near-tie
    flips an argmax), whatever the padding's token ids; a mask of ones changes nothing."""
    fields = {"shared": dict(num_shared=1, shared_gate=True)}.get(kind, ROUTERS.get(kind))
    model = make_model(moe_fields=fields, init_std=0.2).to(torch.float64).eval()
    prompts = [random_ids(batch=1, seq=n, seed=n)[0] for n in (5, 2, 7, 1)]
    ids, mask = left_padded(prompts, torch.zeros(4, 7, dtype=torch.long))
    out = model.generate(ids, 9, attention_mask=mask, greedy=True)
    assert out.shape == (4, 16) and torch.equal(out[:, :7], ids)
    for row, prompt in zip(out, prompts, strict=True):
        alone = model.generate(prompt[None], 9, greedy=True)[0]
        assert torch.equal(row[7:], alone[len(prompt) :]), (kind, len(prompt))
    garbage, _ = left_padded(prompts, random_ids(batch=4, seq=7, seed=9))
    assert torch.equal(model.generate(garbage, 9, attention_mask=mask, greedy=True)[:, 7:], out[:, 7:])
    full = random_ids(batch=2, seq=4)
    ones = model.generate(full, 5, attention_mask=torch.ones_like(full), greedy=True)
    assert torch.equal(ones, model.generate(full, 5, greedy=True))


@pytest.mark.parametrize("static", [False, True])
def test_a_padded_batch_s_positions_and_mask_equal_a_loop_over_its_slots(static):
    """Slot s of sequence b (after pads[b] padding slots) sits at position s - pads[b] and attends
    to the keys pads[b] <= j <= s; a padding slot attends to itself alone, so that even
    `masked_attention` (the static step's, a plain softmax) leaves it finite: NaN there would
    reach every query through the cache (0 x NaN). The static step masks the whole cache."""
    model = make_model().eval()
    cache = KVCache(model.config, batch_size=2, max_len=8)
    pads, start, S = torch.tensor([3, 0]), 1, 5
    cos, sin, _, _, mask = model._rope_and_mask(S, cache, torch.tensor(start) if static else start, pads)
    keys = 8 if static else start + S
    assert mask.shape == (2, 1, S, keys) and cos.shape == sin.shape == (2, 1, S, model.config.head_dim)
    for b, p in enumerate(pads.tolist()):
        for i in range(S):
            s = start + i
            assert mask[b, 0, i].tolist() == [j == s if s < p else p <= j <= s for j in range(keys)], (b, s)
            position = max(s - p, 0)
            assert torch.equal(cos[b, 0, i], model.rope_cos[position])
            assert torch.equal(sin[b, 0, i], model.rope_sin[position])
    H, G, Dh = model.config.n_heads, model.config.n_kv_heads, model.config.head_dim
    k, v = torch.randn(2, G, keys, Dh), torch.randn(2, G, keys, Dh)
    assert masked_attention(torch.randn(2, H, S, Dh), k, v, mask).isfinite().all()


@pytest.mark.parametrize("per_sequence", [False, True])
def test_masked_attention_is_sdpa_with_grouped_keys(per_sequence):
    """`masked_attention` (the static decode step's) equals torch's SDPA (enable_gqa) under the same
    boolean mask: one [S, P] for the batch, or one per sequence [B, 1, S, P] (B = G here, so a mask
    broadcast over the key groups instead of the sequences would not raise)."""
    B, H, G, S, P, Dh = 2, 4, 2, 3, 6, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, Dh, generator=g)
    k, v = torch.randn(2, B, G, P, Dh, generator=g)
    causal = torch.arange(P) <= torch.arange(P - S, P)[:, None]  # [S, P]: the last S positions
    mask = torch.stack([causal, causal & (torch.arange(P) >= 3)])[:, None] if per_sequence else causal
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(masked_attention(q, k, v, mask), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("residual_from_norm", [False, True])
def test_an_moe_block_adds_its_ffn_output_to_x_or_to_the_normed_x(residual_from_norm):
    """A block computes x + attn(attn_norm(x)) = x', then x' + ffn(ffn_norm(x')), or with
    residual_from_norm (Chain-of-Experts' reference block) ffn_norm(x') + ffn(ffn_norm(x')), on the
    training path and the decode path alike."""
    model = make_model(moe_fields=dict(residual_from_norm=residual_from_norm), first_k_dense=0, init_std=0.2)
    block = model.eval().layers[0]
    x = torch.randn(2, 5, model.config.dim, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope_cos[:5], model.rope_sin[:5]
    with torch.no_grad():
        attended = x + block.attn(block.attn_norm(x), cos, sin, None, 0, None)[0]
        normed = block.ffn_norm(attended)
        want = (normed if residual_from_norm else attended) + block.ffn(normed)[0]
        for infer in (False, True):
            got = block(x, cos, sin, None, 0, None, infer=infer)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"infer={infer}")


def test_a_left_padded_batch_stops_at_eos_and_samples_reproducibly():
    model = make_model(init_std=0.2).to(torch.float64).eval()
    prompts = [random_ids(batch=1, seq=n, seed=n)[0] for n in (3, 6)]
    ids, mask = left_padded(prompts, torch.zeros(2, 6, dtype=torch.long))
    free = model.generate(ids, 8, attention_mask=mask, greedy=True)
    eos = free[1, 8].item()
    out = model.generate(ids, 8, attention_mask=mask, greedy=True, eos_token_id=eos)
    for row, free_row in zip(out, free, strict=True):
        hits = (free_row[6:] == eos).nonzero()
        end = 7 + hits[0].item() if len(hits) else free.shape[1]
        assert torch.equal(row[:end], free_row[:end]) and (row[end:] == eos).all()
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    first, again = (model.generate(ids, 6, attention_mask=mask, generator=seeded()) for _ in "ab")
    assert torch.equal(first, again)


class Recorder:
    """A streamer (transformers' protocol) that keeps what it is told."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_a_streamer_is_told_the_prompts_each_step_s_tokens_and_the_end():
    model = make_model(init_std=0.2).eval()
    prompt = random_ids(seq=4)
    streamer = Recorder()
    out = model.generate(prompt, 6, greedy=True, streamer=streamer)
    assert streamer.ended == 1 and len(streamer.puts) == 7
    assert torch.equal(streamer.puts[0], prompt)
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), out[:, 4:])
    eos = out[0, 5].item()  # the steps told are the steps run, however early the batch stops
    stopped = Recorder()
    short = model.generate(prompt, 6, greedy=True, eos_token_id=eos, streamer=stopped)
    assert len(stopped.puts) == short.shape[1] - 4 + 1 and stopped.ended == 1
    assert torch.equal(torch.stack(stopped.puts[1:], dim=1), short[:, 4:])


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(2, 3, dtype=torch.long), r"must have input_ids' shape \[2, 4\], got \[2, 3\]"),
        (torch.tensor([[0, 1, 1, 1], [1, 1, 2, 1]]), "must hold 1 for the prompts' tokens and 0 for padding"),
        (torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]), r"rows \[1\] pad after their tokens.*'left'"),
        (torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]]), r"rows \[0\] are all padding"),
    ],
)
def test_generate_rejects_a_bad_attention_mask(mask, match):
    model = make_model().eval()
    with pytest.raises(ValueError, match=match):
        model.generate(random_ids(batch=2, seq=4), 2, attention_mask=mask)


def test_models_routing_whole_sequences_recompute_each_padded_prompt_alone():
    """A padded batch of a model that recomputes the prefix decodes each prompt without its padding
    (every architecture: test_architectures); a mask that pads nothing is no padding."""
    model = make_model(moe_fields=dict(router="graph_sim"), init_std=0.2).eval()
    assert model.needs_sequences
    ids = random_ids(batch=2, seq=4)
    out = model.generate(ids, 3, greedy=True, attention_mask=torch.tensor([[0, 1, 1, 1], [1] * 4]))
    assert torch.equal(out[0, 1:], model.generate(ids[:1, 1:], 3, greedy=True)[0])
    assert torch.equal(out[1], model.generate(ids[1:], 3, greedy=True)[0])
    assert torch.equal(model.generate(ids, 2, greedy=True, attention_mask=torch.ones_like(ids)),
                       model.generate(ids, 2, greedy=True))  # fmt: skip


@pytest.mark.parametrize(
    "moe_fields", [ROUTERS["expert_choice"], dict(capacity_factor=1.0)], ids=["expert_choice", "capacity"]
)
def test_non_causal_routing_decodes_what_the_full_forward_computes(moe_fields):
    """Expert choice and capacity dropping route a token by the others routed with it: a one-token
    step would route as no full forward does (every expert picks the one token), so generate
    recomputes the prefix: its greedy tokens are the full forward's argmax, step by step, and a
    batch's (padded or not) those of each sequence alone."""
    model = make_model(moe_fields=moe_fields, allow_noncausal_routing=True, init_std=0.2).eval()
    assert not model.decodes_from_cache
    ids = random_ids(batch=1, seq=6)
    out = model.generate(ids, 6, greedy=True)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(ids, 6, greedy=True, compile=True), out)  # no one-token step to compile
    both = torch.cat([ids, random_ids(batch=1, seq=6, seed=2)])
    assert torch.equal(model.generate(both, 6, greedy=True)[:1], out)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = model.generate(both[:, 1:], 6, greedy=True, attention_mask=mask)
    assert torch.equal(padded[0, 1:], model.generate(ids[:, 2:], 6, greedy=True)[0])


def test_generate_refuses_empty_prompts_foreign_ids_and_compiling_past_hooks():
    model = make_model().eval()
    with pytest.raises(ValueError, match=r"hold no tokens \(\[batch, 0\]\)"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    for run in (model, lambda ids: model.generate(ids, 2)):  # torch's reshape of 0 elements to [0, S, -1] failed
        with pytest.raises(ValueError, match=r"hold no sequences \(\[0, seq\]\)"):
            run(torch.zeros(0, 4, dtype=torch.long))
    for bad in (-1, model.config.vocab_size):
        ids = random_ids(batch=1, seq=4)
        ids[0, 2] = bad
        with pytest.raises(ValueError, match="token ids outside the vocabulary"):
            model.generate(ids, 2)
        with pytest.raises(ValueError, match="token ids outside the vocabulary"):
            model(ids)
    model.layers[0].attn.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="calls no forward hooks"):
        model.generate(random_ids(batch=1, seq=4), 2, compile=True)


def test_generating_in_training_mode_leaves_the_balancing_load_alone():
    """The aux-loss-free bias moves by the load of training forwards; decoding (in training mode,
    without gradients) adds none to it."""
    model = make_model(moe_fields=dict(selection_bias=True))
    model.generate(random_ids(batch=1, seq=4), 3, greedy=True)
    assert all(float(m.router.tokens_per_expert.sum()) == 0 for m in model.moe_layers.values())
    model(random_ids(batch=1, seq=4)).logits.sum().backward()
    assert all(float(m.router.tokens_per_expert.sum()) > 0 for m in model.moe_layers.values())


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_gives_identical_logits(tmp_path, tied):
    model = make_model(moe_fields=dict(selection_bias=True), tie_embeddings=tied)
    with torch.no_grad():
        model.layers[1].ffn.router.selection_bias.copy_(torch.randn(4))  # a buffer, not a parameter
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    torch.testing.assert_close(
        loaded.layers[1].ffn.router.selection_bias, model.layers[1].ffn.router.selection_bias
    )
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    ids = random_ids()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_over_an_existing_checkpoint_needs_overwrite_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(make_model(seed=0), target)
    second = make_model(seed=1)
    with pytest.raises(ValueError, match="already holds moelab's checkpoint; pass --overwrite"):
        save_pretrained(second, target)
    (target / "README.md").write_text("the user's")
    with pytest.raises(ValueError, match="README.md was not written by moelab"):
        save_pretrained(second, target, overwrite=True)
    (target / "README.md").unlink()
    save_pretrained(second, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(target)) == [".moelab-output.json", "config.json", "model.safetensors"]
    ids = random_ids()
    assert torch.equal(load_pretrained(target)(ids).logits, second(ids).logits)


def test_loading_into_a_mismatched_config_lists_the_keys(tmp_path):
    save_pretrained(make_model(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(n_layers=3, layer_types=["dense", "moe", "moe"])
    data["moe"]["num_experts"] = 8
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        load_pretrained(tmp_path)
    message = str(info.value)
    assert "missing (9): layers.2.attn.k_proj.weight" in message
    assert (
        "wrong shape (3): layers.1.ffn.experts.down_proj: checkpoint [4, 32, 32] vs model [8, 32, 32]"
        in message
    )
    assert "layers.1.ffn.router.weight" in message


def test_load_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- training


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    ids = random_ids(batch=4, seq=32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        out = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
    assert out.loss.item() < 0.1


def test_checkpoints_saved_with_the_old_selection_bias_names_load(tmp_path):
    """Before the rename: MoEConfig.aux_free_bias / expert_bias and the buffer router.expert_bias."""
    from safetensors.torch import load_file, save_file

    model = make_model(moe_fields=dict(selection_bias=True))
    with torch.no_grad():
        model.layers[1].ffn.router.selection_bias.copy_(torch.randn(4))
    save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["moe"]["aux_free_bias"] = config["moe"].pop("selection_bias")
    config["moe"]["expert_bias"] = config["moe"].pop("expert_mlp_bias")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    old = {k.replace("router.selection_bias", "router.expert_bias"): v for k, v in tensors.items()}
    assert any(k.endswith("router.expert_bias") for k in old)
    save_file(old, tmp_path / "m" / "model.safetensors")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.moe.selection_bias
    torch.testing.assert_close(loaded.layers[1].ffn.router.selection_bias, model.layers[1].ffn.router.selection_bias)
