"""The structural fallback (model_types without an adapter) never gives a silently wrong reading.

Tiny random models of MoE families transformers supports natively but moelab has no table for:
those whose block keeps tensors the structural layout does not read (a sigmoid correction bias
on the block itself, as exaone_moe, afmoe and lfm2_moe do: they have adapters now, so their
checkpoints are renamed to an unknown model_type, or their adapter is taken away) are refused
by name; those whose tensors it
reads but whose routing it would get wrong (flint's sigmoid without a bias, cohere2_moe's
averaged shared expert or sigmoid option: their adapters taken away) are refused by running
transformers' own block; those
it reads right (glm4_moe, dots1, cohere2_moe's default) open and match transformers' block.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hf_tiny import COMMON, D
from safetensors.torch import load_file, save_file
from test_layerwise import assert_layers_are_transformers
from transformers import AutoConfig, AutoModelForCausalLM

from moelab.hf import FAMILIES, CheckpointError, MoELayerView, fallback, moe_layer_from_view, open_checkpoint
from moelab.hf.layerwise import LayerwiseModel

SMALL = dict(COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts_per_tok=2)
DEEPSEEK_LIKE = dict(SMALL, first_k_dense_replace=0, n_group=1, topk_group=1)
CONFIGS = {
    "exaone_moe": dict(DEEPSEEK_LIKE, num_experts=8, num_shared_experts=1),
    "afmoe": dict(SMALL, num_experts=4, num_dense_layers=0),
    "lfm2_moe": dict(SMALL, num_experts=4, num_dense_layers=0, layer_types=["full_attention"] * 2),
    "glm4_moe": dict(
        DEEPSEEK_LIKE, n_routed_experts=8, n_shared_experts=1, n_group=2, routed_scaling_factor=2.0
    ),
    "dots1": dict(DEEPSEEK_LIKE, n_routed_experts=8, n_shared_experts=1),
    "cohere2_moe": dict(SMALL, intermediate_size=16, num_experts=4),
    # their experts are intermediate_size wide, and their configs have no moe_intermediate_size
    "minimax": dict(COMMON, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["full_attention"] * 2),
    "flex_olmo": dict(COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                      eos_token_id=1),
    "flint": dict(SMALL, num_experts=4, shared_expert_intermediate_size=16, mlp_only_layers=[]),
    "kimi_linear": dict(
        DEEPSEEK_LIKE, num_experts=8, num_expert_group=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, mlp_layer_types=["dense", "sparse"], layer_types=["full_attention"] * 2,
        pad_token_id=0,
    ),
    # tensors transformers renames or splits on loading (its conversion mapping)
    "mimo_v2_flash": dict(SMALL, n_routed_experts=4, v_head_dim=8, sliding_window=16),
    "axk2": dict(
        DEEPSEEK_LIKE, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4, n_group=2, routed_scaling_factor=1.5,
        index_topk=4, index_head_dim=8, index_n_heads=2, gated_norm_rank=4,
    ),
    "lara_mini": dict(
        SMALL, shared_expert_intermediate_size=24, num_experts=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, sliding_window=16,
    ),
}
# the tensor each refused family keeps on its block, besides router, experts and shared experts
BLOCK_BIAS = {
    "exaone_moe": "model.layers.0.mlp.e_score_correction_bias",
    "afmoe": "model.layers.0.mlp.expert_bias",
    "lfm2_moe": "model.layers.0.feed_forward.expert_bias",
}


def _save(path, model_type: str, **overrides):
    """A random fp32 model with unit-scale weights and its routing biases drawn in [0, 0.5], saved."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
        for name, b in model.named_buffers():
            if name.endswith(("correction_bias", "expert_bias")):
                b.uniform_(0, 0.5)
    model.save_pretrained(path)
    return model


def _rename(path, model_type: str = "my_new_moe") -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))


@pytest.mark.parametrize("model_type", sorted(BLOCK_BIAS))
def test_block_tensors_the_layout_does_not_read_are_refused(tmp_path, model_type):
    """These families have adapters: renamed to a model_type transformers has never heard of,
    only the name check stands between their bias and a reading without it."""
    _save(tmp_path, model_type)
    _rename(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=rf"holds {BLOCK_BIAS[model_type]}, which moelab's structural reading .* does not use: moelab "
        r"cannot read the routing of model_type 'my_new_moe'.*file an adapter",
    ):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="cannot read the routing"):
        LayerwiseModel(tmp_path)


@pytest.mark.parametrize("model_type", sorted(BLOCK_BIAS))
def test_running_transformers_block_refuses_them_too(tmp_path, monkeypatch, model_type):
    """The second line of defence alone: without the name check (and without their adapter), the
    outputs tell."""
    monkeypatch.setattr(fallback, "_check_claimed", lambda *args: None)
    monkeypatch.delitem(FAMILIES, model_type)
    _save(tmp_path, model_type)
    with pytest.raises(
        CheckpointError, match=r"softmax scores.*no correction bias\) differs from transformers'"
    ):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("flint", {}),
        ("cohere2_moe", {"expert_selection_fn": "sigmoid"}),
        ("cohere2_moe", {"num_shared_experts": 1}),
    ],
    ids=["flint-sigmoid", "cohere2_moe-sigmoid", "cohere2_moe-averaged-shared"],
)
def test_a_reading_that_differs_from_transformers_block_is_refused(tmp_path, monkeypatch, model_type, overrides):
    """Every tensor of these blocks is one the layout reads; only running transformers' block
    shows that moelab would compute something else (their adapters, which read them, taken away)."""
    monkeypatch.delitem(FAMILIES, model_type, raising=False)
    _save(tmp_path, model_type, **overrides)
    with pytest.raises(
        CheckpointError,
        match=rf"structural reading of layer 0 \(softmax scores, top-2.*\) differs from transformers' "
        rf"\w+SparseMoeBlock \(model\.layers\.0\.mlp\) by up to .*cannot read the routing of model_type "
        rf"'{model_type}'",
    ):
        open_checkpoint(tmp_path)


def test_kimi_linears_top_k_is_read_and_its_expert_groups_are_refused(tmp_path, monkeypatch):
    """Kimi-Linear (its adapter taken away) saves its top-k as num_experts_per_token and its
    groups as num_expert_group: the fallback reads the first, so that the check against
    transformers' block (not a missing top-k) refuses the groups it does not read."""
    monkeypatch.delitem(FAMILIES, "kimi_linear")
    _save(tmp_path, "kimi_linear")
    assert json.loads((tmp_path / "config.json").read_text())["num_experts_per_token"] == 2
    with pytest.raises(
        CheckpointError,
        match=r"structural reading of layer 1 \(sigmoid scores, top-2, .*\) differs from transformers' KimiLinearMoE",
    ):
        open_checkpoint(tmp_path)


def test_a_block_that_reads_tensors_stored_elsewhere_is_refused(tmp_path):
    """transformers' block holds a parameter the checkpoint keeps outside the block's prefix (here:
    the router's correction bias moved out of it): moelab's reading of the block cannot include it."""
    _save(tmp_path, "glm4_moe")
    tensors = load_file(tmp_path / "model.safetensors")
    for i in range(2):
        bias = tensors.pop(f"model.layers.{i}.mlp.gate.e_score_correction_bias")
        tensors[f"model.layers.{i}.moved_bias"] = bias
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"Glm4MoeMoE \(model\.layers\.0\.mlp\) also holds "
        r"model\.layers\.0\.mlp\.gate\.e_score_correction_bias, not stored under model\.layers\.0\.mlp",
    ):
        open_checkpoint(tmp_path)


def test_corrupt_weights_are_named_as_such(tmp_path):
    """NaN in the block's weights: both outputs are NaN, and the error says why."""
    _save(tmp_path, "glm4_moe")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.shared_experts.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"NaN or Inf in layer 0's MoE block: corrupt weights"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("model_type", ["glm4_moe", "dots1", "cohere2_moe"])
def test_families_read_right_open_and_match_transformers(tmp_path, monkeypatch, model_type):
    monkeypatch.delitem(FAMILIES, model_type, raising=False)  # cohere2_moe has an adapter
    model = _save(tmp_path, model_type)
    torch.manual_seed(1)
    x = torch.randn(2, 7, D)
    with open_checkpoint(tmp_path) as view:
        assert view.family == f"{model_type} (structural)"
        layers = [layer for layer in view.layers() if isinstance(layer, MoELayerView)]
        assert [layer.index for layer in layers] == [0, 1]
        for layer in layers:
            with torch.no_grad():
                expected = model.model.layers[layer.index].mlp(x)
                got, _ = moe_layer_from_view(layer)(x)
            assert expected.abs().max() > 0.1
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["mimo_v2_flash", "axk2", "lara_mini"])
def test_tensors_transformers_renames_or_splits_on_loading_run_layer_by_layer(tmp_path, model_type, one_thread):
    """The fallback reads the plain renames and splits of transformers' conversion mapping (MiMo-V2-Flash's
    attention sinks stored as attention_sink_bias, A.X K2's q_gate_proj as q_b_proj, Lara-Mini's
    linear_attn.norm as out_norm and its in_proj_qkv, _z, _b and _a as one in_proj), so their decoder
    layers run layer by layer as transformers runs them."""
    model = _save(tmp_path, model_type)
    stored = load_file(tmp_path / "model.safetensors")
    assert not any(("sinks" in k or "q_gate_proj" in k or "in_proj_qkv" in k) for k in stored)
    torch.manual_seed(1)
    assert_layers_are_transformers(tmp_path, model, [torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (1, 5))])


def test_the_check_runs_once_per_checkpoint_files(tmp_path, monkeypatch):
    """A command opens its checkpoint several times (a write: two or three); the check against
    transformers' block (a whole MoE layer in fp32) runs once for the same files, again once they change."""
    _save(tmp_path, "glm4_moe")
    calls = []
    real = fallback._check_against_transformers
    monkeypatch.setattr(fallback, "_check_against_transformers", lambda *args: (calls.append(1), real(*args)))
    for _ in range(3):
        open_checkpoint(tmp_path).close()
    assert len(calls) == 1
    config = tmp_path / "config.json"
    config.write_text(config.read_text() + " ")  # the same settings, another file
    open_checkpoint(tmp_path).close()
    assert len(calls) == 2


@pytest.mark.parametrize(
    "extra",
    ["model.layers.1.mlp.expert_bias", "model.layers.0.mlp.experts.0.down_proj.weight_scale_inv"],
    ids=["later-layer", "name-extending-a-read-one"],
)
def test_an_unread_block_tensor_transformers_check_does_not_see_is_refused(tmp_path, extra):
    """The check against transformers runs layer 0 and loads only the tensors its block has: an
    unread tensor in another MoE layer, or one whose name merely starts like a read one, is
    refused by name."""
    _save(tmp_path, "glm4_moe")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[extra] = torch.zeros(8)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"holds {re.escape(extra)}, which moelab's structural reading"):
        open_checkpoint(tmp_path)


def test_a_refused_checkpoint_is_refused_again_when_reopened(tmp_path, monkeypatch):
    """The check runs once per checkpoint files; its refusal stands for every later open."""
    monkeypatch.delitem(FAMILIES, "flint")
    _save(tmp_path, "flint")
    for _ in range(2):
        with pytest.raises(CheckpointError, match="differs from transformers'"):
            open_checkpoint(tmp_path)


def test_norm_topk_prob_missing_from_config_json_is_renormalised(tmp_path):
    """The structural reading's default (renormalise) is what transformers does for glm4_moe."""
    _save(tmp_path, "glm4_moe")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["norm_topk_prob"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open_checkpoint(tmp_path) as view:
        assert view.layer(0).router.renormalize


@pytest.mark.parametrize(
    "model_type, config, follows",
    [
        ("glm4_moe", None, True),  # shared experts: n_shared_experts x moe_intermediate_size
        ("dots1", None, True),
        # Cohere2-MoE's summed shared experts: num_shared_experts x intermediate_size, its routed width
        ("cohere2_moe", dict(
            CONFIGS["cohere2_moe"], num_shared_experts=1, shared_expert_combination_strategy="sum"
        ), True),
        # dots3_note's (its adapter taken away): n_shared_experts x shared_experts_intermediate_size, a
        # width key of their own
        ("dots3_note_text", dict(
            DEEPSEEK_LIKE, n_routed_experts=8, n_shared_experts=1, shared_experts_intermediate_size=24,
            num_key_value_heads=4, pad_token_id=0,
        ), False),
    ],
)  # fmt: skip
def test_shared_experts_follow_the_routed_width_only_without_a_width_of_their_own(
    tmp_path, monkeypatch, model_type, config, follows
):
    """A structural family's shared experts follow the routed experts' width key (routed experts
    cannot get narrower alone) where transformers computes their width from it, not where the
    config gives them a width key of their own (which narrowing leaves alone)."""
    from moelab.hf.adapters import resolve

    if config is not None:
        monkeypatch.setitem(CONFIGS, model_type, config)
    if model_type in FAMILIES:
        monkeypatch.delitem(FAMILIES, model_type)
    _save(tmp_path, model_type)
    _, checkpoint, family = resolve(tmp_path)
    checkpoint.close()
    assert family.name == f"{model_type} (structural)" and family.layouts[0].shared is not None
    assert family.shared_width_follows is follows
    assert isinstance(family.expert_width, tuple) and hash(family)  # a Family's fields are tuples: it hashes


@pytest.mark.parametrize("model_type", ["cohere2_moe", "minimax", "flex_olmo"])
def test_narrowed_experts_are_written_to_the_width_key_transformers_reads(tmp_path, monkeypatch, model_type):
    """These families' experts are intermediate_size wide (their transformers configs have no
    moe_intermediate_size, which Cohere2-MoE's config.json here carries all the same): HEAPr's
    narrower experts are written there by the structural reading (Cohere2-MoE's adapter taken away),
    and the output reloads."""
    monkeypatch.delitem(FAMILIES, model_type, raising=False)
    from test_compress import TOKENIZER_DIR
    from test_compress_heapr import BACKWARD
    from transformers import PreTrainedTokenizerFast

    from moelab.compress import calibrate, compress

    _save(tmp_path / "m", model_type, vocab_size=8192)  # the shipped corpus' tokenizer
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path / "m")
    stats = calibrate(tmp_path / "m", tmp_path / "s", options=BACKWARD, quiet=True).directory
    report = compress(tmp_path / "m", tmp_path / "out", method="heapr", ratio=0.25, stats=stats, quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert report["options"] == {"layout": "uniform"} and report["reload_checked"]
    assert config["intermediate_size"] == 12
    assert config.get("moe_intermediate_size") == CONFIGS[model_type].get("moe_intermediate_size")
