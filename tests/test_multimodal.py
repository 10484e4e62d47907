"""Multimodal MoE checkpoints (Qwen3.5-MoE, Llama 4, Mistral Large 4): the language model is read from
config.json's text_config and from the tensors under model.language_model. (Qwen3.5), language_model.model.
(Llama 4) or the root (Mistral Large 4, under Mistral's own names), checked against transformers' blocks, compressed with its config.json written back in
its own shape and the vision tower copied untouched, and decoded offloaded. Qwen3-Omni-MoE: its thinker's language
model (thinker_config.text_config, thinker.model.), the talker and code2wav copied untouched. DeepSeek-OCR 2:
its language model stored under model. beside its SAM and vision encoders (model.sam_model, model.qwen2_model)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hf_tiny import DEEPSEEK, TINY, _unit_scale, add_mtp_layer, build_multimodal, gemma4_moe
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_qwen4_exp import QWEN4_EXP
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from moelab.compress import CalibrationOptions, compress
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import CheckpointError, drop_experts, open_checkpoint
from moelab.hf.adapters import resolve
from moelab.hf.edit import moe_output
from moelab.hf.loading import load_causal_lm
from moelab.hf.modules import decoder_layers
from moelab.hf.multimodal import language_config, nested_config, text_model_type
from moelab.hf.view import MoELayerView
from moelab.offload import load_offloaded

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=32)
COMMON = dict(vocab_size=8192, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Unlimited OCR's and DeepSeek-OCR 2's language model (DeepSeek-V2's router, group-limited) and SAM tower
OCR_TEXT = dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, topk_method="group_limited_greedy",
                routed_scaling_factor=1.5, mlp_layer_types=["dense", "sparse"], pad_token_id=0)  # fmt: skip
OCR_SAM = dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=64,
               patch_size=16, window_size=2, global_attn_indexes=[0], mlp_dim=32, downsample_channels=[16, 32])  # fmt: skip
MODELS = {
    "qwen3_5_moe": (
        dict(
            COMMON, num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2, linear_num_value_heads=4,
            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        ),
        dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32),
        "model.language_model.layers.", "num_experts", "mlp",
    ),
    "llama4": (
        dict(
            COMMON, num_hidden_layers=2, intermediate_size=16, intermediate_size_mlp=48, num_local_experts=4,
            num_experts_per_tok=1, interleave_moe_layer_step=1,
        ),
        dict(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32,
            projector_output_dim=32, vision_output_dim=32, image_size=28, patch_size=14,
        ),
        "language_model.model.layers.", "num_local_experts", "feed_forward",
    ),
    "qwen3_vl_moe": (
        dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
             num_experts_per_tok=2, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}),
        dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32),
        "model.language_model.layers.", "num_local_experts", "mlp",
    ),
    "glm4v_moe": (
        dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
             rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 0], "partial_rotary_factor": 0.5,
                              "rope_theta": 10000.0}),
        dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32),
        "model.language_model.layers.", "n_routed_experts", "mlp",
    ),
    "kimi_k25": (
        dict(DEEPSEEK, vocab_size=8192, q_lora_rank=16, model_type="deepseek_v3"),
        dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=32, pos_emb_height=4,
             pos_emb_width=4),
        "language_model.model.layers.", "n_routed_experts", "mlp",
    ),
    "dots3_note": (
        dict(TINY["dots3_note_text"].config, vocab_size=8192),
        dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, mlp_layer_types=["dense"],
             adapter_in_dim=32, adapter_out_dim=32),
        "model.layers.", "n_routed_experts", "mlp",
    ),
    "step3p7": (
        dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
             num_experts_per_tok=2, share_expert_dim=24, moe_router_scaling_factor=1.5,
             mlp_layer_types=["dense", "sparse"], layer_types=["sliding_attention", "full_attention"],
             sliding_window=16, num_sliding_attention_heads=2, swiglu_limits=[0.0, 0.5],
             swiglu_limits_shared=[0.0, 0.7]),
        dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14, mlp_ratio=1.0),
        "model.layers.", "n_routed_experts", "mlp",
    ),
    "mistral_large4": (
        dict(COMMON, num_hidden_layers=4, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=1.5, n_group=2,
             topk_group=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, index_topk=4,
             index_head_dim=16, index_n_heads=2,
             indexer_types=["full", "shared", "full", "shared"], kv_source_layers=[0, 0, 2, 3]),
        dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
             patch_size=14, image_size=28),
        "layers.", "n_routed_experts", "mlp",
    ),
    "gemma4": (  # its router and experts inline in the decoder layer (see hf_tiny's gemma4_text)
        dict(TINY["gemma4_text"].config, vocab_size=8192, vocab_size_per_layer_input=8192),
        dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             head_dim=16, patch_size=4, position_embedding_size=64),
        "model.language_model.layers.", "num_experts", gemma4_moe,
    ),
    "minimax_m3_vl": (  # stored under the release's names: block_sparse_moe, per-expert w1/w3/w2, index_*_proj
        dict(TINY["minimax_m3_vl_text"].config, vocab_size=8192),
        dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14),
        "language_model.model.layers.", "num_local_experts", "mlp",
    ),
    "aria": (  # its experts stored transposed, as fc1 / fc2
        dict(TINY["aria_text"].config, vocab_size=8192, pad_token_id=0),
        dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        "language_model.model.layers.", "moe_num_experts", "mlp",
    ),
    "hy_v4_vl": (  # its language model stored under model. and held under model.language_model.
        dict(TINY["hy_v4"].config, vocab_size=8192,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, out_hidden_size=32),
        "model.layers.", "n_routed_experts", "mlp",
    ),
    "unlimited_ocr": (  # DeepSeek-V2's router; its language model stored under model., held under model.language_model.
        dict(OCR_TEXT),
        dict(sam_config=dict(OCR_SAM), encoder_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14)),
        "model.layers.", "n_routed_experts", "mlp",
    ),
    "deepseek_ocr2": (  # Unlimited OCR's language model (DeepSeek-V2's router), its dense layers named by mlp_layer_types
        dict(OCR_TEXT),
        dict(sam_config=dict(OCR_SAM), encoder_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, num_key_value_heads=2)),
        "model.layers.", "n_routed_experts", "mlp",
    ),
    "glm5_next": (  # clamped experts, hyper-connections, KDA and indexed attention (a "shared" indexer layer)
        dict(COMMON, vocab_size=8192, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
             num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16,
             q_lora_rank=16, qk_rope_head_dim=0, v_head_dim=8, qk_nope_head_dim=8,
             mlp_layer_types=["dense", "sparse", "sparse"],
             layer_types=["linear_attention", "indexed_attention", "indexed_attention"],
             indexer_types=["full", "full", "shared"], index_topk=4, index_head_dim=8, index_n_heads=2, index_kpool=2,
             linear_head_dim=8, linear_num_heads=4, hc_mult=2, swiglu_limit=0.5, n_group=2, topk_group=1,
             pad_token_id=0),
        dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32),
        "model.language_model.layers.", "n_routed_experts", "mlp",
    ),
    "qwen3_omni_moe": (  # the thinker's language model, under thinker.model. (see qwen3_omni_moe)
        dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
             num_experts_per_tok=2),
        dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32),
        "thinker.model.layers.", "num_experts", "mlp",
    ),
    "ernie4_5_vl_moe": (  # text and vision experts (16 and 8 wide) in one list of 2E on disk, sharing moe_num_experts
        dict(COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=[16, 8], moe_num_experts=4,
             moe_k=2, moe_num_shared_experts=1,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32),
        "model.layers.", "moe_num_experts", "mlp",
    ),
    "qwen4_exp": (  # its n-gram table stored as shards (see test_qwen4_exp)
        dict(QWEN4_EXP, split_ngram_parts=3),
        dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32),
        "model.language_model.layers.", "num_experts", "mlp",
    ),
    "muse_spark": (  # a latent block: experts on a normed 24-wide latent, each one's output normed; layer 0 dense
        # (two sparse layers: offloaded pools compute with each one's own output norm)
        dict(COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, moe_hidden_size=24,
             num_local_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5, output_multiplier=0.5,
             mlp_layer_types=["dense", "sparse", "sparse"], eos_token_id=1, bos_token_id=2),
        dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        "model.language_model.layers.", "num_local_experts", "mlp",
    ),
}  # fmt: skip
# whose expert count sizes other experts too (ERNIE-4.5-VL's vision experts): only narrowed, never pruned
COUNT_SHARED = {"ernie4_5_vl_moe"}
# the config entries of the towers and projectors besides the vision tower
OTHER_TOWERS = {
    "minimax_m3_vl": dict(projector_hidden_size=32, merged_hidden_size=64),
    "kimi_k25": dict(mm_hidden_size=32),
    "muse_spark": dict(audio_config=dict(hidden_sizes=[8, 8, 8, 32], out_hidden_size=32)),
    "dots3_note": dict(audio_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         downsample_hidden_size=16, adapter_input_size=32, adapter_out_dim=32)),
}  # fmt: skip


def qwen3_omni_moe(text: dict, vision: dict, seed: int = 0, audio_output: bool = True):
    """A random fp32 Qwen3-Omni-MoE: a thinker (`text` its language model's config entries, `vision` its
    vision encoder's, a tiny audio encoder), a talker (another MoE, with a shared expert) and code2wav,
    unit-scale weights, stored as the releases are (thinker.model.layers.N, thinker.lm_head, thinker.visual,
    thinker.audio_tower, talker., code2wav.). The thinker states vision_start_token_id, as the releases do
    (transformers' text generation reads it; its config class has no default)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    talker = dict(text, vocab_size=64, num_experts=4, shared_expert_intermediate_size=16)
    config = Qwen3OmniMoeConfig(
        thinker_config=dict(
            text_config=text, vision_config=vision, vision_start_token_id=8100,
            audio_config=dict(encoder_layers=1, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32,
                              output_dim=32, downsample_hidden_size=8, num_mel_bins=16),
        ),
        talker_config=dict(
            text_config=talker, thinker_hidden_size=text["hidden_size"], num_code_groups=4, spatial_merge_size=2,
            code_predictor_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=48, num_code_groups=4),
        ),
        code2wav_config=dict(codebook_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=32, num_quantizers=4, decoder_dim=16,
                             upsample_rates=[2, 2], upsampling_ratios=[2]),
        enable_audio_output=audio_output,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _unit_scale(Qwen3OmniMoeForConditionalGeneration(config).float())


def text_settings(config: dict) -> dict:
    """Where config.json keeps the language model's settings: text_config, or the thinker's (Qwen3-Omni-MoE)."""
    return config["thinker_config"]["text_config"] if "thinker_config" in config else config["text_config"]


def multimodal_model(path: Path, family: str) -> Path:
    """A tiny vision-language model of `family`, stored as its releases are. Kimi-K2.5 (which
    transformers loads only as a vision-language model): language_model.model.layers.N and an
    untied language_model.lm_head, as moonshotai/Kimi-K2.5 stores them (transformers 5.24 saves the
    tiny model's layers as `blocks` and ties its head)."""
    text, vision, *_ = MODELS[family]
    if family == "qwen3_omni_moe":
        qwen3_omni_moe(text, vision).save_pretrained(path)
    else:
        build_multimodal(family, text, vision, **OTHER_TOWERS.get(family, {})).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    if family == "kimi_k25":
        tensors = load_file(path / "model.safetensors")
        tensors = {
            k.replace("language_model.model.blocks.", "language_model.model.layers."): v
            for k, v in tensors.items()
        }
        tensors["language_model.lm_head.weight"] = torch.randn(8192, 32) * 32**-0.5
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=sorted(MODELS))
def source(request, tmp_path_factory) -> Path:
    return multimodal_model(tmp_path_factory.mktemp(request.param) / "src", request.param)


def family_of(source: Path) -> str:
    return json.loads((source / "config.json").read_text())["model_type"]


def test_the_language_model_is_read_where_the_release_stores_it(source):
    """Every MoE layer read through the view computes transformers' own block (the text causal LM
    transformers loads from the same files) on random hidden states."""
    _, _, stem, _, block = MODELS[family_of(source)]
    assert any(k.startswith(stem) for k in load_file(source / "model.safetensors"))
    model = load_causal_lm(source, allow_unexpected=True)  # Kimi-K2.5: its DeepSeek-V3 text model
    x = torch.randn(6, 32)
    with open_checkpoint(source) as view:
        layers = [view.layer(i) for i in range(view.num_layers)]
    moe = [(index, layer) for index, layer in enumerate(layers) if isinstance(layer, MoELayerView)]
    assert moe and moe[-1][0] == len(layers) - 1  # Kimi-K2.5's and GLM-4.5V's first layer is dense
    _, decoder = decoder_layers(model, len(layers))  # Qwen3-VL-MoE: the vision-language model's own
    for index, layer in moe:
        with torch.no_grad():  # block: the MoE block's name in the decoder layer, or what computes it (Gemma 4)
            want = (getattr(decoder[index], block) if isinstance(block, str) else block(decoder[index]))(x[None])
        want = (want[0] if isinstance(want, tuple) else want).reshape(6, 32)
        torch.testing.assert_close(moe_output(layer, x.double()).float(), want, atol=1e-5, rtol=1e-5)


def test_unlimited_ocr_with_biased_shared_experts_is_refused(tmp_path):
    """Unlimited OCR's mlp_bias gives its shared experts biases (DeepSeek-V2's MLP), which views do not
    read: refused rather than computed without them."""
    text, vision, *_ = MODELS["unlimited_ocr"]
    build_multimodal("unlimited_ocr", dict(text, mlp_bias=True), vision).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="sets mlp_bias: its shared experts have biases"):
        open_checkpoint(tmp_path).layer(1)


@pytest.mark.slow
def test_every_method_on_glm_5_next(tmp_path):
    """GLM-5-Next's clamped experts behind hyper-connections, KDA and indexed attention: every method
    from one calibration passes the writer's checks (strict reload included); EASY-EP is refused by
    name (several residual streams)."""
    from moelab.compress import METHODS, calibrate

    source = multimodal_model(tmp_path / "src", "glm5_next")
    options = CalibrationOptions(tokens=512, seq_len=32, batch_size=4, sample_tokens=64, observers=CalibrationOptions().observers + ("neurons",))
    stats = calibrate(source, tmp_path / "stats", options=options, quiet=True).directory
    for method in sorted(METHODS):
        domains = ["code"] if method == "premoe" else None
        if method == "easy_ep":
            with pytest.raises(ValueError, match="layer 1: EASY-EP weighs each expert by how far"):
                compress(source, tmp_path / method, method=method, stats=stats, quiet=True)
            continue
        report = compress(source, tmp_path / method, method=method, ratio=0.5, stats=stats, domains=domains, quiet=True)
        assert report["complete"], method


def test_glm_5_next_s_sparse_layers_are_transformers_whatever_first_k_dense_replace_says(tmp_path):
    """Glm5NextTextConfig fills in an absent mlp_layer_types as three dense layers, then sparse ones, and
    has no first_k_dense_replace: a config.json that sets it (as GLM releases do) changes nothing."""
    text, vision, *_ = MODELS["glm5_next"]
    text = {k: v for k, v in text.items() if k != "mlp_layer_types"} | dict(
        num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["indexed_attention"], indexer_types=["full"] * 4
    )
    build_multimodal("glm5_next", text, vision).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["text_config"]["mlp_layer_types"]
    config["text_config"]["first_k_dense_replace"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_causal_lm(tmp_path)
    _, decoder = decoder_layers(model, 4)
    with open_checkpoint(tmp_path) as view:
        sparse = [isinstance(view.layer(i), MoELayerView) for i in range(4)]
    assert sparse == [hasattr(layer.mlp, "experts") for layer in decoder] == [False, False, False, True]


def test_glm_5_next_s_mtp_layer_is_refused_by_name_or_dropped(tmp_path):
    """GLM-5-Next's multi-token prediction layer (decoder layer num_hidden_layers, DeepSeek-V3's way) is
    read as a layer of the last one's kind, past mlp_layer_types; moelab's drafter cannot feed its
    hyper-connections, so the default run refuses it by name and --mtp drop leaves it out."""
    source = multimodal_model(tmp_path / "src", "glm5_next")
    add_mtp_layer(source)
    with open_checkpoint(source) as view:
        assert view.mtp_layers == [3] and isinstance(view.layer(3), MoELayerView)
    with pytest.raises(CheckpointError, match="hyper-connections .* compress with --mtp drop"):
        compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    with pytest.warns(UserWarning, match="left out of the output"):
        report = compress(source, tmp_path / "drop", method="reap", ratio=0.5, calib_options=SMALL, mtp="drop", quiet=True)
    assert report["mtp"]["policy"] == "drop" and report["reload_checked"]


def test_kv_bytes_per_token_are_what_glm_5_next_caches(tmp_path):
    """GLM-5-Next's indexed layers cache the compressed latent and, where they run their own pooled
    indexer, its key beside the pool's gate score and a valid flag (2 x index_head_dim + 1); its KDA
    layers and a layer sharing the previous selection cache no indexer key."""
    from moelab.offload.model import kv_bytes_per_token

    model = load_causal_lm(multimodal_model(tmp_path / "src", "glm5_next"))
    with torch.no_grad():
        cache = model(torch.randint(0, 64, (2, 5)), use_cache=True).past_key_values
    held = sum(
        getattr(layer, name).nbytes
        for layer in cache.layers
        for name in ("keys", "values", "indexer_keys")
        if getattr(layer, name, None) is not None
    )
    assert kv_bytes_per_token(model, torch.float32) * 2 * 5 == held == 2 * 5 * 4 * (16 + (16 + 17))


@pytest.mark.parametrize("family", ["glm5_next", "qwen3_5_moe"])
def test_state_bytes_per_sequence_are_what_the_language_model_caches(family, tmp_path):
    """The language model of GLM-5-Next (a KDA layer) and Qwen3.5-MoE (3 Gated DeltaNet layers): its
    cache's recurrent state per sequence is state_bytes_per_sequence, which load_offloaded counts on
    the whole model's skeleton."""
    from test_offload import assert_state_is_what_transformers_holds

    source = multimodal_model(tmp_path / "src", family)
    state = assert_state_is_what_transformers_holds(load_causal_lm(source))
    conv, heads = {"glm5_next": (96, 1), "qwen3_5_moe": (64, 3)}[family]  # channels, layers of 4 heads of 8 x 8
    assert state == heads * (conv * 4 * 4 + 4 * 8 * 8 * 4)
    offloaded = load_offloaded(source, memory_budget=10**9, kv_cache_tokens=20, kv_cache_sequences=2)
    offloaded.close()
    assert offloaded.state_bytes == state  # the whole model's skeleton, its vision tower set aside


def test_compress_writes_config_json_in_its_shape_and_copies_the_vision_tower(source, tmp_path):
    """Half the experts pruned (ERNIE-4.5-VL, whose vision experts share the count: every expert narrowed
    instead, the count kept)."""
    _, _, stem, key, _ = MODELS[family_of(source)]
    kept = family_of(source) in COUNT_SHARED
    method = "heapr" if kept else "reap"
    report = compress(source, tmp_path / "out", method=method, ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["reload_checked"]  # transformers loaded the output strictly
    before, after = (json.loads((p / "config.json").read_text()) for p in (source, tmp_path / "out"))
    count = text_settings(before)[key] // (1 if kept else 2)
    assert text_settings(after)[key] == count and key not in after
    assert after == nested_config(language_config(after), before) and after.keys() == before.keys()
    written, original = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(source / "model.safetensors"),
    )
    language = (stem.removesuffix("layers."), "lm_head", "language_model.")
    if stem == "model.layers.":  # the towers may be stored under model. too (Unlimited OCR's model.sam_model)
        language = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")
    if stem == "layers.":  # Mistral Large 4: the language model at the root, under Mistral's names
        language = ("layers.", "tok_embeddings.", "norm.", "output.", "lerope.")
    tower = [k for k in original if not k.startswith(language)]
    assert tower and all(torch.equal(written[k], original[k]) for k in tower)
    with open_checkpoint(tmp_path / "out") as view:
        assert view.layer(view.num_layers - 1).router.num_experts == count


def test_offloaded_decoding_gives_transformers_tokens(source):
    """...holding none of the vision tower's tensors (Qwen3-VL-MoE and GLM-4.5V decode as their
    vision-language model, whose tower text never reaches)."""
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    model = load_causal_lm(source, allow_unexpected=True)
    # with the mask moelab passes: transformers' Step 3.7 decodes a prompt without one wrongly from its
    # second token on (its cached steps disagree with a full forward pass)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    offloaded = load_offloaded(source, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(ids, 6), want)
        held = [name for name, _ in offloaded.model.named_parameters()]
        assert held and not [name for name in held if "visual" in name or "vision" in name or "audio" in name]
    finally:
        offloaded.close()


def test_only_a_vision_language_skeleton_has_modules_text_never_reaches(source):
    from moelab.hf.layerwise import skeleton
    from moelab.hf.modules import beside_language_model

    config, ckpt, family = resolve(source)
    ckpt.close()
    outside = beside_language_model(skeleton(source, config, family))
    towers = {"qwen3_vl_moe": ["model.visual"], "glm4v_moe": ["model.visual"],
              "step3p7": ["model.vision_model", "model.multi_modal_projector"],
              "mistral_large4": ["model.vision_tower", "model.multi_modal_projector"],
              "gemma4": ["model.vision_tower", "model.embed_vision"], "hy_v4_vl": ["model.vision_tower"],
              "unlimited_ocr": ["model.vision_tower", "model.multi_modal_projector"],
              "deepseek_ocr2": ["model.vision_tower", "model.multi_modal_projector"], "glm5_next": ["model.visual"],
              "qwen3_omni_moe": ["model.audio_tower", "model.visual"],
              "ernie4_5_vl_moe": ["model.vision_tower", "model.resampler_model"],
              "muse_spark": ["model.vision_tower", "model.vision_adapter", "model.vision_projection", "model.audio_tower"]}  # fmt: skip
    assert outside == towers.get(family_of(source), [])


@pytest.mark.slow  # moved out of the default run, which must stay under 10 minutes (`make test-slow` runs it)
def test_qwen3_5_s_mtp_module_is_compressed_with_the_language_model(tmp_path):
    source = multimodal_model(tmp_path / "src", "qwen3_5_moe")
    add_mtp_layer(source)
    report = compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["mtp"] == {"policy": "prune", "layers": [4]}
    assert load_file(tmp_path / "out" / "model.safetensors")["mtp.layers.0.mlp.gate.weight"].shape[0] == 4
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"]
        == 1
    )
    with pytest.warns(UserWarning, match="left out of the output"):
        compress(
            source, tmp_path / "drop", method="reap", ratio=0.5, calib_options=SMALL, mtp="drop", quiet=True
        )
    written = json.loads((tmp_path / "drop" / "config.json").read_text())
    assert written["text_config"]["mtp_num_hidden_layers"] == 0 and "mtp_num_hidden_layers" not in written
    assert not [k for k in load_file(tmp_path / "drop" / "model.safetensors") if k.startswith("mtp.")]


@pytest.mark.parametrize("method", ["reap", pytest.param("heapr", marks=pytest.mark.slow)])
def test_glm_4_5v_s_mtp_layer_is_calibrated_through_the_vision_language_model(tmp_path, method):
    """GLM-4.5V runs as its vision-language model, whose base model holds the language model (and
    its final norm, which the MTP layer's inputs and drafts go through) one level down."""
    source = multimodal_model(tmp_path / "src", "glm4v_moe")
    add_mtp_layer(source)
    report = compress(source, tmp_path / "out", method=method, ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["mtp"] == {"policy": "prune", "layers": [2]} and report["reload_checked"]
    if method == "reap":  # HEAPr narrows experts instead
        assert load_file(tmp_path / "out" / "model.safetensors")["model.language_model.layers.2.mlp.gate.weight"].shape[0] == 4


def test_nested_config_puts_each_key_back_where_the_file_had_it():
    original = {
        "model_type": "vlm", "tie_word_embeddings": False, "quantization_config": {"quant_method": "fp8"},
        "text_config": {"model_type": "vlm_text", "num_experts": 8, "tie_word_embeddings": True, "dtype": "bfloat16"},
        "dtype": "bfloat16",
    }  # fmt: skip
    merged = language_config(original)
    assert merged["model_type"] == "vlm_text" and merged["num_experts"] == 8 and "text_config" not in merged
    edited = {k: v for k, v in merged.items() if k != "quantization_config"} | {
        "num_experts": 4,
        "dtype": "float16",
    }
    assert nested_config(edited, original) == {
        "model_type": "vlm", "tie_word_embeddings": False, "dtype": "float16",
        "text_config": {"model_type": "vlm_text", "num_experts": 4, "tie_word_embeddings": True, "dtype": "float16"},
    }  # fmt: skip
    text = {"model_type": "mixtral", "num_local_experts": 8}
    assert (
        language_config(text) is text
        and nested_config(text | {"num_local_experts": 4}, text)["num_local_experts"] == 4
    )


def test_a_text_config_without_a_model_type_is_the_one_transformers_builds(tmp_path):
    """config.json's text_config may leave its model_type out (transformers' config class gives the
    text config its own): moelab reads the language model's family, and a pruned checkpoint keeps
    the file's shape (no model_type added to text_config, the multimodal one at the top)."""
    path = multimodal_model(tmp_path / "src", "qwen3_vl_moe")
    config = json.loads((path / "config.json").read_text())
    assert config["text_config"].pop("model_type") == text_model_type("qwen3_vl_moe") == "qwen3_vl_moe_text"
    (path / "config.json").write_text(json.dumps(config))
    with open_checkpoint(path) as view:
        assert view.family == "qwen3_vl_moe_text (structural)"  # as with its model_type given
    drop_experts(path, tmp_path / "out", [0, 5], quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "qwen3_vl_moe" and "model_type" not in written["text_config"]
    assert written["text_config"]["num_local_experts"] == 6
    assert text_model_type("kimi_k25") is None and text_model_type("no_such_model") is None


def test_dequantize_writes_the_dtype_where_the_language_model_reads_it(tmp_path):
    """A multimodal FP8 release dequantized to fp16 states fp16 in text_config too (transformers'
    text model and moelab read it there), whether its quantization_config sits at the top or in
    text_config (where moelab reads it as quantized too)."""
    from quantized_tiny import fp8_release

    from moelab.hf.dequantize import dequantize_checkpoint

    fp8_release(multimodal_model(tmp_path / "plain", "qwen3_5_moe"), tmp_path / "top")
    nested = tmp_path / "nested"
    nested.mkdir()
    for path in (tmp_path / "top").iterdir():
        (nested / path.name).write_bytes(path.read_bytes())
    config = json.loads((nested / "config.json").read_text())
    config["text_config"]["quantization_config"] = config.pop("quantization_config")
    (nested / "config.json").write_text(json.dumps(config))
    for source in (tmp_path / "top", nested):
        out = dequantize_checkpoint(source, tmp_path / f"out_{source.name}", dtype=torch.float16, quiet=True)
        written = json.loads((out / "config.json").read_text())
        assert written["dtype"] == written["text_config"]["dtype"] == "float16"
        assert "quantization_config" not in written and "quantization_config" not in written["text_config"]
        assert written["vision_config"] == config["vision_config"]
        assert resolve(out)[0]["dtype"] == "float16"
        model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert next(model.parameters()).dtype == torch.float16


def test_generate_checks_prompts_against_the_language_model_s_vocabulary(source, tmp_path):
    """The vocabulary (and context) generate checks prompts against is text_config's."""
    from moelab.generate import generate_text

    small = tmp_path / "small"
    small.mkdir()
    for path in source.iterdir():
        (small / path.name).write_bytes(path.read_bytes())
    config = json.loads((small / "config.json").read_text())
    (text_settings(config) if "text_config" in config or "thinker_config" in config else config)["vocab_size"] = 100
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocabulary of 100 tokens"):
        generate_text(small, "some words that encode to ids past a hundred", max_new_tokens=2)


def test_nested_config_keeps_a_key_the_edit_adds_in_text_config():
    """A setting the edit adds to the language model's goes into text_config, not nowhere; nested
    dicts (rope scaling) come back whole, and the top level's keys stay the top level's."""
    original = {
        "model_type": "vlm", "vision_config": {"depth": 1},
        "text_config": {"num_experts": 8, "rope_scaling": {"type": "yarn", "factor": 4.0}},
    }  # fmt: skip
    edited = language_config(original) | {"num_experts": 4, "num_nextn_predict_layers": 0}
    assert nested_config(edited, original) == {
        "model_type": "vlm", "vision_config": {"depth": 1},
        "text_config": {
            "num_experts": 4, "rope_scaling": {"type": "yarn", "factor": 4.0}, "num_nextn_predict_layers": 0,
        },
    }  # fmt: skip
    assert nested_config(language_config(original), original) == original


def test_trace_and_eval_read_the_language_model_s_vocabulary_and_context(source):
    """A release run as its vision-language model (Qwen3-VL-MoE, GLM-4.5V) keeps vocab_size and
    max_position_embeddings in its text config only: trace and eval read them there, not a
    missing top-level entry (an AttributeError) nor a 2,048-token default."""
    from moelab.eval.evaluate import LoadedLM
    from moelab.trace.model import load_model, wrap_model

    text = text_settings(json.loads((source / "config.json").read_text()))
    loaded = load_model(source, quiet=True)
    assert (loaded.vocab_size, loaded.max_seq_len) == (text["vocab_size"], text["max_position_embeddings"])
    wrapped = wrap_model(loaded.model, loaded.view)
    assert (wrapped.vocab_size, wrapped.max_seq_len) == (text["vocab_size"], text["max_position_embeddings"])
    assert LoadedLM(source).max_len == text["max_position_embeddings"]


def test_generation_past_the_language_model_s_context_is_refused(source):
    from moelab.offload.model import generate_ids

    model = load_causal_lm(source, allow_unexpected=True)
    model.config.get_text_config().max_position_embeddings = 8  # the language model's context
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_ids(model, torch.tensor([[1, 5, 9]]), 6)


def test_a_config_transformers_refuses_is_a_checkpoint_error(tmp_path):
    """load_causal_lm reads the config before it picks the class to load: a config transformers'
    validation refuses is a CheckpointError naming the checkpoint, as it was from from_pretrained."""
    from moelab.hf.checkpoint import CheckpointError

    for name, config in {
        "rope": {"model_type": "qwen3_moe", "rope_scaling": 5},
        "layers": {"model_type": "qwen3_vl_moe", "text_config": {"num_hidden_layers": "two"}},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=f"transformers cannot load {tmp_path / name}"):
            load_causal_lm(tmp_path / name, quiet=True)


def test_bench_offload_checks_the_language_model_s_vocabulary(tmp_path):
    """A config.json stating a vocabulary at the top and another in text_config: the language model's
    (the one the embedding has) decides whether moelab's tokenizer's ids fit."""
    from moelab.bench.offload import OffloadOptions, _check_model

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 9000, "text_config": {"vocab_size": 64}}))
    with pytest.raises(ValueError, match="vocabulary of 64 tokens"):
        _check_model(tmp_path, OffloadOptions())


@pytest.mark.parametrize("original", [True, False], ids=["stacked", "fused"])
def test_step_3_7_s_bounded_layers_compute_transformers_block(tmp_path, original):
    """Step 3.7's layer 1 caps silu(gate) and clamps up (routed experts at 0.5, the shared expert at
    0.7, as the release does at 7 and 16 on its last layers): saved either way, the view's layer
    computes transformers' block, which the caps change (plain SwiGLU would not)."""
    text, vision, *_ = MODELS["step3p7"]
    model = build_multimodal("step3p7", text, vision)
    model.save_pretrained(tmp_path, save_original_format=original)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    with open_checkpoint(tmp_path) as view:
        layer = view.layer(1)
        assert (layer.experts.activation, layer.experts.swiglu_limit) == ("capped_swiglu", 0.5)
        assert (layer.shared.activation, layer.shared.swiglu_limit) == ("capped_swiglu", 0.7)
        got = moe_output(layer, x.double()).float()
    block = model.model.language_model.layers[1].mlp
    with torch.no_grad():
        want = block(x[None])[0]
        block.experts.limit, block.shared_experts.limit = float("inf"), float("inf")
        plain = block(x[None])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - plain).abs().max() > 0.05


def test_offloaded_step_3_7_caps_only_its_bounded_layers(tmp_path):
    """The offloaded pool is built like the first MoE layer's experts (plain SwiGLU here); layer 2 caps
    its experts (as the release's last layers do): decoded offloaded, each layer computes its own."""
    text, vision, *_ = MODELS["step3p7"]
    text = dict(text, num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
                layer_types=["sliding_attention", "full_attention", "full_attention"],
                swiglu_limits=[0.0, 0.0, 0.5], swiglu_limits_shared=[0.0, 0.0, 0.7])  # fmt: skip
    torch.manual_seed(0)
    model = build_multimodal("step3p7", text, vision)
    model.save_pretrained(tmp_path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    offloaded = load_offloaded(tmp_path, resident=0.5)
    try:
        with torch.no_grad():
            got = offloaded.model(ids)
        torch.testing.assert_close(getattr(got, "logits", got).float(), want, atol=1e-4, rtol=1e-4)
    finally:
        offloaded.close()


@pytest.mark.parametrize("original", [True, False], ids=["mistral-names", "transformers-names"])
def test_mistral_large_4_runs_layer_by_layer_as_transformers(tmp_path, original, one_thread):
    """Mistral Large 4 layer by layer: its DSA layers hand their top-k tokens on, a layer reuses an
    earlier one's latent KV, and its tensors are stored under Mistral's names (default save_pretrained)
    or transformers' own: every layer's output is the vision-language model's on text."""
    from test_layerwise import assert_layers_are_transformers

    text, vision, *_ = MODELS["mistral_large4"]
    model = build_multimodal("mistral_large4", text, vision)
    model.save_pretrained(tmp_path, save_original_format=original)
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_layers_are_transformers(tmp_path, model, [ids])


def test_step_3_7_s_top_k_reads_under_its_release_name(tmp_path):
    """Step 3.7's release names its top-k moe_top_k (Step3p7TextConfig's alias of num_experts_per_tok):
    the view reads it, as transformers does."""
    text, vision, *_ = MODELS["step3p7"]
    model = build_multimodal("step3p7", text, vision)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["moe_top_k"] = config["text_config"].pop("num_experts_per_tok")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open_checkpoint(tmp_path) as view:
        assert view.layer(1).router.top_k == model.config.text_config.num_experts_per_tok


def omni_source(path: Path, original: bool) -> Path:
    """The tiny Qwen3-Omni-MoE as released (thinker.model.layers.N, per-expert tensors) or as transformers
    saves it with save_original_format=False (thinker.model.language_model.layers.N, fused experts)."""
    if original:
        return multimodal_model(path, "qwen3_omni_moe")
    text, vision, *_ = MODELS["qwen3_omni_moe"]
    qwen3_omni_moe(text, vision).save_pretrained(path, save_original_format=False)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_qwen3_omni_moe_writes_its_thinker_and_copies_the_talker_and_encoders(tmp_path, original):
    """Qwen3-Omni-MoE pruned: only thinker_config.text_config's num_experts changes in config.json (the
    talker's MoE, its own num_experts included, is left as it is); every tensor outside the thinker's MoE
    blocks (talker., code2wav., the thinker's encoders, attention, embeddings) is copied byte for byte;
    transformers loads the whole model strictly, and its thinker's logits are the masked original's."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from moelab.hf import masked_moe_layer
    from moelab.hf.adapters import FAMILIES
    from moelab.hf.layerwise import install_moe
    from moelab.hf.modules import find_moe_modules

    source, out = omni_source(tmp_path / "src", original), tmp_path / "out"
    drop = {0: [1, 2, 5, 6], 1: [0, 3, 4, 7]}
    drop_experts(source, out, drop, quiet=True)
    before, after = (json.loads((p / "config.json").read_text()) for p in (source, out))
    assert text_settings(after)["num_experts"] == 4 and after["talker_config"]["text_config"]["num_local_experts"] == 4
    text_settings(after)["num_experts"] = 8
    assert after == before
    moe = tuple(f"thinker.model.{'' if original else 'language_model.'}layers.{i}.mlp." for i in drop)
    stored, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k for k in stored if not k.startswith(moe)} == {k for k in written if not k.startswith(moe)}
    assert all(torch.equal(written[k], v) for k, v in stored.items() if not k.startswith(moe))
    assert any(k.startswith("talker.model.layers.0.mlp.experts.") for k in written) and any(
        k.startswith("code2wav.") for k in written
    )
    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    masked = load_causal_lm(source)  # the thinker, its MoE blocks routing around the dropped experts
    _, layers = decoder_layers(masked, 2)
    with open_checkpoint(source) as view:
        for layer in view.layers():
            keep = [e for e in range(8) if e not in drop[layer.index]]
            found = find_moe_modules(layers[layer.index], layer.index, layer.router.num_choices, layer.router.weight.shape[1])
            install_moe(layers[layer.index], layer.index, found, masked_moe_layer(layer, keep), None,
                        FAMILIES["qwen3_omni_moe_text"])  # fmt: skip
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = masked(input_ids=ids).logits, model.eval().thinker(input_ids=ids).logits
        unmasked = load_causal_lm(source)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (want - unmasked).abs().max() > 1e-3, "dropping experts changed nothing"


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_qwen3_omni_moe_s_thinker_runs_layer_by_layer_and_decodes_offloaded_as_transformers(tmp_path, original, one_thread):
    """The thinker's decoder layers run layer by layer give what they give in the whole model's forward
    pass; decoded offloaded, the thinker's greedy tokens are those of transformers' text generation (the
    whole model's generate without audio, and the thinker's own)."""
    from test_layerwise import assert_layers_are_transformers
    from transformers import Qwen3OmniMoeForConditionalGeneration

    source = omni_source(tmp_path / "src", original)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(source).eval()
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_layers_are_transformers(source, model.thinker, [ids, ids[:1, :5]])
    prompt = torch.tensor([[1, 5, 9, 33, 2]])
    mask = torch.ones_like(prompt)
    whole = model.generate(prompt, attention_mask=mask, return_audio=False, thinker_max_new_tokens=6,
                           thinker_do_sample=False)  # fmt: skip
    thinker = model.thinker.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(whole, thinker)
    offloaded = load_offloaded(source, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(prompt, 6), whole)
    finally:
        offloaded.close()


def test_qwen3_omni_moe_s_thinker_router_reads_its_own_defaults_and_dense_layers(tmp_path):
    """The thinker's router is Qwen3-MoE's (softmax, top-k) but its config class renormalises by default
    (norm_topk_prob true where config.json leaves it out); decoder_sparse_step and mlp_only_layers make
    layers dense as transformers builds them. Each MoE layer computes transformers' block."""
    from transformers import AutoConfig

    text, vision, *_ = MODELS["qwen3_omni_moe"]
    for settings, sparse in (({}, [True, True, True]), ({"norm_topk_prob": False, "decoder_sparse_step": 2}, [False, True, False]),
                             ({"mlp_only_layers": [1]}, [True, False, True])):  # fmt: skip
        path = tmp_path / str(len(list(tmp_path.iterdir())))
        qwen3_omni_moe(dict(text, num_hidden_layers=3, **settings), vision, audio_output=False).save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        if not settings:
            del text_settings(config)["norm_topk_prob"]
            (path / "config.json").write_text(json.dumps(config))
        model = load_causal_lm(path)
        assert model.config.text_config.norm_topk_prob == AutoConfig.from_pretrained(path).thinker_config.text_config.norm_topk_prob
        _, decoder = decoder_layers(model, 3)
        x = torch.randn(6, 32)
        with open_checkpoint(path) as view:
            assert view.family == "qwen3_omni_moe_text"
            assert [isinstance(view.layer(i), MoELayerView) for i in range(3)] == sparse
            assert [hasattr(layer.mlp, "experts") for layer in decoder] == sparse
            for i in (i for i in range(3) if sparse[i]):
                layer = view.layer(i)
                assert layer.router.renormalize == settings.get("norm_topk_prob", True)
                with torch.no_grad():
                    want = decoder[i].mlp(x[None])[0]
                torch.testing.assert_close(moe_output(layer, x.double()).float(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_every_method_and_router_fit_on_qwen3_omni_moe(tmp_path):
    """Every method on the thinker from one calibration, and router re-calibration after pruning: each
    output passes the writer's checks (the thinker reloaded strictly by transformers, every edited layer
    compared with the masked original); the talker's experts are left as they are."""
    from moelab.compress import METHODS, calibrate
    from moelab.compress.router_fit import RouterFit

    source = multimodal_model(tmp_path / "src", "qwen3_omni_moe")
    options = CalibrationOptions(tokens=512, seq_len=32, batch_size=4, sample_tokens=64,
                                 observers=CalibrationOptions().observers + ("neurons",))  # fmt: skip
    stats = calibrate(source, tmp_path / "stats", options=options, quiet=True).directory
    talker = {k: v for k, v in load_file(source / "model.safetensors").items() if k.startswith("talker.")}
    for method in sorted(METHODS):
        domains = ["code"] if method == "premoe" else None
        report = compress(source, tmp_path / method, method=method, ratio=0.5, stats=stats, domains=domains, quiet=True)
        assert report["complete"] and report["reload_checked"], method
    written = load_file(tmp_path / "reap" / "model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in talker.items())
    report = compress(source, tmp_path / "fit", method="reap", ratio=0.5, calib_options=SMALL,
                      router_fit=RouterFit(5, 1e-2), quiet=True)  # fmt: skip
    assert report["complete"] and all("router_fit" in e["notes"] for e in report["layers"].values())


@pytest.mark.parametrize("typed", [True, False], ids=["model-types", "implied"])
def test_qwen3_omni_moe_s_language_config_is_its_thinker_s_text_config(typed):
    """Qwen3-Omni-MoE keeps its language model's settings two levels down (thinker_config.text_config,
    beside talker_config's own text_config): read over the thinker's keys and the release's, and written
    back where the file had each one (the talker's untouched; model_types transformers implies stay out)."""
    thinker = {"model_type": "qwen3_omni_moe_thinker", "dtype": "bfloat16", "vision_config": {"depth": 1},
               "text_config": {"model_type": "qwen3_omni_moe_text", "num_experts": 128, "dtype": "bfloat16"}}
    original = {"model_type": "qwen3_omni_moe", "dtype": "bfloat16", "thinker_config": thinker,
                "talker_config": {"text_config": {"num_experts": 128, "model_type": "qwen3_omni_moe_talker_text"}}}  # fmt: skip
    if not typed:
        del thinker["model_type"], thinker["text_config"]["model_type"]
    merged = language_config(original)
    assert merged["model_type"] == "qwen3_omni_moe_text" and merged["num_experts"] == 128
    assert "thinker_config" not in merged and merged["vision_config"] == {"depth": 1}
    assert nested_config(merged, original) == original
    edited = merged | {"num_experts": 64, "dtype": "float16", "num_nextn_predict_layers": 0}
    written = nested_config(edited, original)
    assert written["dtype"] == written["thinker_config"]["dtype"] == "float16"
    assert written["thinker_config"]["text_config"] == {
        **thinker["text_config"], "num_experts": 64, "dtype": "float16", "num_nextn_predict_layers": 0
    }
    assert written["talker_config"] == original["talker_config"] and written.keys() == original.keys()
    assert ("model_type" in written["thinker_config"]) == typed
    odd = {"model_type": ["qwen3_omni_moe"], "thinker_config": thinker}  # refused later, by resolve, by name
    assert language_config(odd) is odd


def ocr2_source(path: Path, original: bool, **text) -> Path:
    """The tiny DeepSeek-OCR 2 as transformers saves it by default (the release's names: model.layers.N,
    per-expert tensors, model.sam_model, model.qwen2_model) or with save_original_format=False
    (model.language_model.layers.N, fused experts, model.vision_tower); `text` over its text config."""
    base, vision, *_ = MODELS["deepseek_ocr2"]
    build_multimodal("deepseek_ocr2", dict(base, **text), vision).save_pretrained(path, save_original_format=original)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_deepseek_ocr2_writes_its_language_model_and_copies_the_towers(tmp_path, original):
    """DeepSeek-OCR 2 pruned: only text_config's n_routed_experts changes in config.json; every tensor
    outside the MoE blocks (SAM and the vision encoder, projector, view separator, attention, embeddings)
    is copied byte for byte; transformers loads the whole model strictly, and its logits are the masked
    original's."""
    from transformers import DeepseekOcr2ForConditionalGeneration

    from moelab.hf import masked_moe_layer
    from moelab.hf.adapters import FAMILIES
    from moelab.hf.layerwise import install_moe
    from moelab.hf.modules import find_moe_modules

    source, out = ocr2_source(tmp_path / "src", original), tmp_path / "out"
    drop = {1: [1, 2, 5, 6]}
    drop_experts(source, out, drop, quiet=True)
    before, after = (json.loads((p / "config.json").read_text()) for p in (source, out))
    assert after["text_config"]["n_routed_experts"] == 4
    after["text_config"]["n_routed_experts"] = 8
    assert after == before
    moe = f"model.{'' if original else 'language_model.'}layers.1.mlp."
    stored, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k for k in stored if not k.startswith(moe)} == {k for k in written if not k.startswith(moe)}
    assert all(torch.equal(written[k], v) for k, v in stored.items() if not k.startswith(moe))
    assert any("sam_" in k for k in written) and any("view_sep" in k for k in written)
    model, info = DeepseekOcr2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    masked = load_causal_lm(source)  # the vision-language model, its MoE block routing around the dropped experts
    _, layers = decoder_layers(masked, 2)
    with open_checkpoint(source) as view:
        layer = view.layer(1)  # layer 0 is dense
        keep = [e for e in range(8) if e not in drop[1]]
        found = find_moe_modules(layers[1], 1, layer.router.num_choices, layer.router.weight.shape[1])
        install_moe(layers[1], 1, found, masked_moe_layer(layer, keep), None, FAMILIES["deepseek_ocr2_text"])
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = masked(input_ids=ids).logits, model.eval()(input_ids=ids).logits
        unmasked = load_causal_lm(source)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (want - unmasked).abs().max() > 1e-3, "dropping experts changed nothing"


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_deepseek_ocr2_runs_layer_by_layer_and_decodes_offloaded_as_transformers(tmp_path, original, one_thread):
    """DeepSeek-OCR 2's decoder layers run layer by layer give what they give in transformers' forward
    pass of the whole model on text; decoded offloaded, its greedy tokens are transformers' generate's."""
    from transformers import DeepseekOcr2ForConditionalGeneration

    source = ocr2_source(tmp_path / "src", original)
    model = DeepseekOcr2ForConditionalGeneration.from_pretrained(source, experts_implementation="eager").eval()
    with layerwise_and_offloaded_as(model, source):
        pass


PROMPT = torch.tensor([[1, 5, 9, 33, 2]])


@contextlib.contextmanager
def layerwise_and_offloaded_as(model, source: Path):
    """Checks that `source`'s decoder layers run layer by layer as in transformers' `model`, and that
    offloaded (half the experts resident) it decodes `model`'s greedy tokens of PROMPT; yields the
    offloaded model for more checks (closed after)."""
    from test_layerwise import assert_layers_are_transformers

    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_layers_are_transformers(source, model, [ids, ids[:1, :5]])
    want = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=6, do_sample=False)
    offloaded = load_offloaded(source, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(PROMPT, 6), want)
        yield offloaded
    finally:
        offloaded.close()


@pytest.mark.parametrize(
    "settings", [dict(topk_method="greedy"), dict(topk_method="greedy", routed_scaling_factor=None, n_group=None),
                 dict(mlp_layer_types=["sparse", "sparse", "dense"], num_hidden_layers=3)],
    ids=["greedy", "greedy-defaults", "mlp-layer-types"],
)  # fmt: skip
def test_deepseek_ocr2_s_router_and_dense_layers_are_transformers(tmp_path, settings):
    """Greedy or group-limited routing, routed_scaling_factor 1 where config.json leaves it out (its
    config class's default), and the MoE layers mlp_layer_types names: each MoE layer computes
    transformers' block, the dense ones are dense in both."""
    source = ocr2_source(tmp_path / "src", True, **{k: v for k, v in settings.items() if v is not None})
    config = json.loads((source / "config.json").read_text())
    for key in (k for k, v in settings.items() if v is None):
        del config["text_config"][key]
    (source / "config.json").write_text(json.dumps(config))
    model = load_causal_lm(source)
    n = config["text_config"]["num_hidden_layers"]
    _, decoder = decoder_layers(model, n)
    x = torch.randn(6, 32)
    with open_checkpoint(source) as view:
        assert view.family == "deepseek_ocr2_text"
        sparse = [isinstance(view.layer(i), MoELayerView) for i in range(n)]
        assert sparse == [hasattr(layer.mlp, "experts") for layer in decoder] == [
            t == "sparse" for t in config["text_config"]["mlp_layer_types"]
        ]
        for i in (i for i in range(n) if sparse[i]):
            with torch.no_grad():
                want = decoder[i].mlp(x[None])[0]
            torch.testing.assert_close(moe_output(view.layer(i), x.double()).float(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [("mlp_layer_types", None, r"sets no mlp_layer_types.*add text_config\.mlp_layer_types"),
     ("mlp_bias", True, r"sets mlp_bias: its shared experts have biases"),
     ("num_experts_per_tok", None, r"sets none of num_experts_per_tok"),
     ("n_group", None, r"sets none of n_group"),
     ("topk_method", "noaux_tc", r"topk_method 'noaux_tc' is not supported")],
    ids=["no-mlp-layer-types", "mlp-bias", "no-top-k", "no-n-group", "topk-method"],
)  # fmt: skip
def test_what_deepseek_ocr2_s_language_model_cannot_be_read_as_is_refused_by_name(tmp_path, key, value, message):
    """A DeepSeek-OCR 2 config transformers builds no model from (no mlp_layer_types, which
    DeepseekOcr2TextConfig leaves None; no num_experts_per_tok; group-limited routing without n_group),
    biased shared experts (mlp_bias) and a topk_method transformers' router has no branch for: each refused
    naming the key, rather than read as something else."""
    source = ocr2_source(tmp_path / "src", True)
    config = json.loads((source / "config.json").read_text())
    config["text_config"].pop(key, None)
    if value is not None:
        config["text_config"][key] = value
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        with open_checkpoint(source) as view:
            [view.layer(i) for i in range(view.num_layers)]


def ernie_vl_source(path: Path, original: bool) -> Path:
    """The tiny ERNIE-4.5-VL as the releases store it (original: model.layers.N, the text and vision
    experts in one list mlp.experts.{0..2E-1}, the routers transposed, the correction biases as rows [2, E])
    or as transformers saves it with save_original_format=False (mlp.text_moe / mlp.vision_moe, fused)."""
    if original:
        return multimodal_model(path, "ernie4_5_vl_moe")
    text, vision, *_ = MODELS["ernie4_5_vl_moe"]
    build_multimodal("ernie4_5_vl_moe", text, vision).save_pretrained(path, save_original_format=False)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_ernie_4_5_vl_narrows_its_text_experts_and_copies_its_vision_experts(tmp_path, original):
    """ERNIE-4.5-VL's text experts narrowed (HEAPr): config.json unchanged, every tensor but the text
    experts (the vision experts, the vision router, its correction-bias row, the text router and shared
    experts) copied byte for byte; transformers loads the whole model strictly and computes the vision
    block as before. Pruning is refused by name: moe_num_experts sizes the vision experts too."""
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    source, out = ernie_vl_source(tmp_path / "src", original), tmp_path / "out"
    with pytest.raises(ValueError, match="reap removes or merges experts, but ernie4_5_vl_moe_text's moe_num_experts"):
        compress(source, tmp_path / "reap", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    report = compress(source, out, method="heapr", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["reload_checked"]
    assert json.loads((out / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    stored, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    text = ("model.layers.1.mlp.experts.0.", "model.layers.1.mlp.experts.1.", "model.layers.1.mlp.experts.2.",
            "model.layers.1.mlp.experts.3.") if original else ("model.language_model.layers.1.mlp.text_moe.experts.",)  # fmt: skip
    assert written.keys() == stored.keys()
    changed = sorted(k for k in stored if not torch.equal(written[k], stored[k]))
    assert changed and all(k.startswith(text) for k in changed)
    model, info = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    before = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(source)
    x = torch.randn(6, 32)
    with torch.no_grad():
        vision = [m.model.language_model.layers[1].mlp.vision_moe(x)[0] for m in (before, model)]
    torch.testing.assert_close(vision[1], vision[0], atol=0, rtol=0)


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_ernie_4_5_vl_runs_layer_by_layer_and_decodes_offloaded_on_text(tmp_path, original, one_thread):
    """ERNIE-4.5-VL's decoder layers run layer by layer as in transformers' forward pass on text, and
    decoded offloaded its greedy tokens are transformers'; the vision experts are neither read nor run:
    a stand-in holds their place, refusing image and video tokens."""
    source = ernie_vl_source(tmp_path / "src", original)
    with layerwise_and_offloaded_as(load_causal_lm(source), source) as offloaded:
        assert not [name for name, _ in offloaded.model.named_parameters() if "vision" in name]
        with pytest.raises(CheckpointError, match="its mlp.vision_moe .* is not loaded"):
            offloaded.model(PROMPT, moe_mm_token_type_ids=torch.tensor([[0, 0, 1, 1, 0]]))


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_ernie_4_5_vl_counts_its_vision_experts_as_routed(tmp_path, original):
    """A token runs top_k of a block's experts: ERNIE-4.5-VL's vision experts, stored beside the text
    ones (mlp.experts.{E..2E-1}) or under mlp.vision_moe, are active at top_k / E as the text experts
    are (they were counted wholly active)."""
    from moelab.eval.evaluate import parameter_counts

    source = ernie_vl_source(tmp_path / "src", original)
    with safe_open(source / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    text_config = json.loads((source / "config.json").read_text())["text_config"]
    E, k = text_config["moe_num_experts"], text_config["moe_k"]
    expert = re.compile(r".*\.mlp\.(experts\.\d+\.|(text|vision)_moe\.experts\.)")
    vision = re.compile(r".*\.mlp\.(experts\.(\d+)\.|vision_moe\.experts\.)")
    routed = {key: math.prod(shape) for key, shape in shapes.items() if expert.match(key)}
    vision_n = sum(
        n for key, n in routed.items() if (m := vision.match(key)) and (m[2] is None or int(m[2]) >= E)
    )
    counts = parameter_counts(source)
    text_n = counts["routed_experts"]
    assert vision_n and text_n + vision_n == sum(routed.values())
    assert counts["active"] == counts["total"] - (text_n - text_n * k // E) - (vision_n - vision_n * k // E)


@pytest.mark.slow
def test_every_method_on_muse_spark(tmp_path):
    """Muse Spark's latent blocks (a normed latent input, each expert's output normed before its weight,
    scaled router logits): every method from one calibration passes the writer's checks, the language
    model reloaded strictly by transformers."""
    from moelab.compress import METHODS, calibrate

    source = multimodal_model(tmp_path / "src", "muse_spark")
    options = CalibrationOptions(tokens=512, seq_len=32, batch_size=4, sample_tokens=64,
                                 observers=CalibrationOptions().observers + ("neurons",))  # fmt: skip
    stats = calibrate(source, tmp_path / "stats", options=options, quiet=True).directory
    for method in sorted(METHODS):
        domains = ["code"] if method == "premoe" else None
        if method == "easy_ep":  # its decoder layer norms and gates the block's output before adding it
            with pytest.raises(ValueError, match="no 'easyep_sums'.*EASY-EP weighs each expert by how far"):
                compress(source, tmp_path / method, method=method, stats=stats, quiet=True)
            continue
        report = compress(source, tmp_path / method, method=method, ratio=0.5, stats=stats, domains=domains, quiet=True)
        assert report["complete"] and report["reload_checked"], method


def test_muse_spark_norms_take_the_class_defaults_where_the_config_leaves_their_eps_out(tmp_path):
    """MuseSparkTextConfig's rms_norm_eps 1e-5 (the experts' input norm) and post_norm_eps 1e-8 (each
    expert's output norm), as transformers builds the model from such a config (the default was 1e-6)."""
    source = multimodal_model(tmp_path / "src", "muse_spark")
    config = json.loads((source / "config.json").read_text())
    for key in ("rms_norm_eps", "post_norm_eps"):
        config["text_config"].pop(key, None)
    (source / "config.json").write_text(json.dumps(config))
    with open_checkpoint(source) as view:
        layer = view.layer(1)
    assert layer.expert_norm.eps == 1e-5 and layer.experts.output_norm.eps == 1e-8
