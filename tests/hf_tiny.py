"""Tiny random transformers MoE models, one per supported family, for the checkpoint-view tests.

Every model: hidden 32, 2 layers, 4 experts of width 16, top-2 (Llama 4: top-1; DeepSeek: 8
experts in 2 groups, so that half of them can be dropped group by group; EXAONE-MoE: the same),
vocab 64, fp32.
Weights are re-drawn at unit scale (std 1/sqrt(last dim)) so that block outputs are O(0.1-1)
and an atol of 1e-5 means something; transformers' own init (std 0.02) gives outputs
near 1e-4. Configs exercise each family's options: dense layers, renormalisation, groups,
scaling, shared experts, GPT-OSS clamping, PhiMoE's jitter threshold, LFM2-MoE's conv layers;
sigmoid routers' selection-only biases are drawn in [0, 0.1] (AFMoE's, a parameter: N(0, 0.3)); ZAYA
(top-1, its only setting) gets its experts' balancing biases in [-1.02, -0.98] beside the skip expert's
-1 (which transformers sets on loading), so that tokens choose both, its residual scaling at transformers'
init (scales 1, biases 0) and its router MLP's biases N(0, 0.03), so that a layer's tokens do not all route alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from moelab.hf.layerwise import language_model_class

D = 32
COMMON = dict(vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# dense MLPs 48 wide, routed experts 16 wide, top-2: the newer families' configs
WIDTHS = dict(COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts_per_tok=2)
DEEPSEEK = dict(
    COMMON,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
    n_group=2,
    topk_group=1,
)


def _mlp(model, i):
    return model.model.layers[i].mlp


def _before_output_norm(model, i):
    """A.X K1's MoE block up to its post_mlp_layernorm (what the view reads: `Family.block_output_norm`)."""
    block = model.model.layers[i].mlp

    def run(x):
        seen = []
        hook = block.post_mlp_layernorm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            block(x)
        finally:
            hook.remove()
        return seen[0]

    return run


def gemma4_moe(layer):
    """Gemma 4's MoE part of a decoder layer on the residual x [B, S, D] after attention (no block
    module holds it): the experts on pre_feedforward_layernorm_2(x), routed by the router on x, their
    sum post_feedforward_layernorm_2'd (what the view reads; the layer adds its dense MLP beside it)."""

    def run(x):
        flat = x.reshape(-1, x.shape[-1])
        _, weights, indices = layer.router(flat)
        routed = layer.experts(layer.pre_feedforward_layernorm_2(flat), indices, weights)
        return layer.post_feedforward_layernorm_2(routed.reshape(x.shape))

    return run


def _granite_shared(model, i):
    layer = model.model.layers[i]
    return lambda x: layer.block_sparse_moe(x) + layer.shared_mlp(x)


@dataclass(frozen=True)
class Tiny:
    """config kwargs for AutoConfig.for_model; block(model, i) -> the layer-i MoE block as a
    callable on [B, S, D]; dense: the layers the config makes dense; fused: whether
    save_original_format=False writes a different layout. path: the module holding layer i's
    routed experts."""

    config: dict
    block: Callable = _mlp
    dense: tuple[int, ...] = ()
    fused: bool = True
    path: str = "model.layers.{i}.mlp"


TINY = {
    "mixtral": Tiny(dict(COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": Tiny(
        dict(
            COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
        ),
        dense=(0,),
    ),
    "qwen3_moe": Tiny(
        dict(
            COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
        dense=(0,),
    ),
    "olmoe": Tiny(
        dict(
            COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0
        )
    ),
    "deepseek_v2": Tiny(
        dict(DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
        dense=(0,),
    ),
    "deepseek_v3": Tiny(dict(DEEPSEEK, q_lora_rank=16, routed_scaling_factor=2.5), dense=(0,)),
    "phimoe": Tiny(
        dict(
            COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.3
        )
    ),
    "gpt_oss": Tiny(
        dict(
            COMMON,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            swiglu_limit=0.5,
        ),
        fused=False,
    ),
    "granitemoe": Tiny(
        dict(COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
        block=lambda model, i: model.model.layers[i].block_sparse_moe,
        path="model.layers.{i}.block_sparse_moe",
    ),
    "granitemoeshared": Tiny(
        dict(
            COMMON,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
        ),
        block=_granite_shared,
        path="model.layers.{i}.block_sparse_moe",
    ),
    "granitemoehybrid": Tiny(
        dict(
            COMMON,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
            layer_types=["mamba", "attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
        ),
        block=_granite_shared,
        path="model.layers.{i}.block_sparse_moe",
    ),
    "llama4_text": Tiny(
        dict(
            COMMON,
            intermediate_size=16,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            moe_layers=[1],
            layer_types=["chunked_attention", "full_attention"],
            attention_chunk_size=32,
            no_rope_layers=[1, 0],
        ),
        block=lambda model, i: model.model.layers[i].feed_forward,
        dense=(0,),
        fused=False,
        path="model.layers.{i}.feed_forward",
    ),
    "kimi_linear": Tiny(
        dict(
            WIDTHS,
            num_experts=8,
            num_shared_experts=1,
            n_group=2,  # saved as num_expert_group, num_experts_per_tok as num_experts_per_token
            topk_group=1,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            mlp_layer_types=["dense", "sparse"],
            layer_types=["full_attention", "linear_attention"],  # the MoE layer's attention: Kimi Delta Attention
            linear_attn_config={"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4},
            num_key_value_heads=4,  # its multi-head latent attention gives every head its keys
            pad_token_id=0,
        ),
        dense=(0,),
    ),
    "mistral4": Tiny(
        dict(DEEPSEEK, q_lora_rank=16, routed_scaling_factor=1.5, pad_token_id=0),  # groups scored by their top 2
        dense=(0,),
        fused=False,
    ),
    "axk1": Tiny(dict(DEEPSEEK, q_lora_rank=16, routed_scaling_factor=1.5), block=_before_output_norm, dense=(0,)),
    "sarvam_moe": Tiny(  # GLM-4.5's model; on disk, its attention's q, k and v are one fused tensor
        dict(WIDTHS, head_dim=8, n_routed_experts=4, attention_bias=True, routed_scaling_factor=1.5, pad_token_id=0),
        dense=(0,),
    ),
    "exaone_moe": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            num_experts=8,
            num_shared_experts=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
            sliding_window=16,
        ),
        dense=(0,),
    ),
    "dots3_note_text": Tiny(
        dict(
            WIDTHS,
            num_attention_heads=4,
            num_key_value_heads=4,  # its multi-head latent attention gives every head its keys
            head_dim=16,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            index_head_dim=8,
            index_n_heads=2,
            index_topk=4,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            shared_experts_intermediate_size=24,
            mlp_layer_types=["dense", "sparse"],
            layer_types=["sliding_attention", "indexed_attention"],
            sliding_window=16,
            # its sliding layers' own attention settings (per_layer_config)
            swa_num_attention_heads=2,
            swa_num_key_value_heads=2,
            swa_q_lora_rank=8,
            swa_kv_lora_rank=8,
            swa_head_dim=16,
            swa_qk_nope_head_dim=8,
            swa_v_head_dim=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        dense=(0,),
    ),
    "afmoe": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            num_experts=4,
            num_shared_experts=2,
            num_dense_layers=1,
            route_scale=1.5,
            sliding_window=16,
        ),
        dense=(0,),
    ),
    "lfm2_moe": Tiny(
        dict(
            WIDTHS,
            num_experts=4,
            num_dense_layers=0,
            routed_scaling_factor=2.0,
            layer_types=["conv", "full_attention"],
        ),
        block=lambda model, i: model.model.layers[i].feed_forward,
        path="model.layers.{i}.feed_forward",
    ),
    "hy_v3": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            num_experts=4,
            num_shared_experts=1,
            router_scaling_factor=1.5,
            mlp_layer_types=["dense", "sparse"],
        ),
        dense=(0,),
    ),
    "hy_v4": Tiny(  # hyper-connections (2 residual streams), DSA-style indexed attention
        dict(
            DEEPSEEK,
            q_lora_rank=16,
            routed_scaling_factor=1.5,
            mlp_layer_types=["dense", "sparse"],
            index_topk=4,
            index_head_dim=8,
            index_n_heads=2,
            hc_mult=2,
            swiglu_limit=0.5,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        dense=(0,),
    ),
    "deepseek_v4": Tiny(  # hyper-connections (2 residual streams), compressed attention; hash routing: DEEPSEEK_V4_HASH
        dict(
            COMMON,
            num_key_value_heads=1,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            q_lora_rank=16,
            partial_rotary_factor=0.5,
            mlp_layer_types=["moe", "moe"],
            layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            hc_mult=2,
            swiglu_limit=0.5,
            sliding_window=8,
            o_groups=2,
            o_lora_rank=8,
            index_n_heads=2,
            index_head_dim=8,
            index_topk=4,
            num_nextn_predict_layers=0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "bailing_hybrid": Tiny(  # layer 0 dense with linear attention (KDA), layer 1 MoE with full attention
        dict(
            DEEPSEEK,
            num_local_experts=8,
            layer_group_size=2,
            head_dim=8,
            routed_scaling_factor=1.5,
            num_mtp_layers=0,
            pad_token_id=0,
        ),
        dense=(0,),
    ),
    "aria_text": Tiny(
        dict(COMMON, head_dim=8, intermediate_size=16, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=2),
    ),
    "laguna": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            num_experts=4,
            shared_expert_intermediate_size=24,
            moe_routed_scaling_factor=1.5,
            moe_router_logit_softcapping=1.0,  # the logits are O(1): the tanh cap bites
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
        ),
        dense=(0,),
    ),
    "kolibri1": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            num_local_experts=4,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
        ),
    ),
    "flint": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            num_experts=4,
            shared_expert_intermediate_size=24,
            mlp_only_layers=[0],
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
        ),
        dense=(0,),
    ),
    "cohere2_moe": Tiny(
        dict(
            COMMON,
            head_dim=8,
            intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            expert_selection_fn="sigmoid",
            num_shared_experts=1,  # averaged with the routed experts (shared_expert_combination_strategy's default)
            first_k_dense_replace=1,
            prefix_dense_intermediate_size=48,
        ),
        dense=(0,),
    ),
    "minimax_m2": Tiny(
        dict(COMMON, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    ),
    "minimax_m3_vl_text": Tiny(
        dict(
            COMMON,
            head_dim=8,
            rotary_dim=4,
            intermediate_size=16,
            dense_intermediate_size=48,
            shared_intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            routed_scaling_factor=1.5,
            swiglu_limit=0.5,
            mlp_layer_types=["dense", "sparse"],
            layer_types=["full_attention", "minimax_m3_sparse"],
            index_n_heads=2,
            index_head_dim=8,
            index_block_size=4,
            index_topk_blocks=2,
        ),
        dense=(0,),
    ),
    "hunyuan_v1_moe": Tiny(
        dict(COMMON, head_dim=8, intermediate_size=16, num_experts=4, moe_topk=2),
    ),
    "ernie4_5_moe": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            num_experts=4,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
        ),
        dense=(0,),
    ),
    "jamba": Tiny(
        dict(
            COMMON,
            intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=0,
            use_mamba_kernels=False,
        ),
        block=lambda model, i: model.model.layers[i].feed_forward,
        dense=(0,),
        path="model.layers.{i}.feed_forward",
    ),
    "nemotron_h": Tiny(
        dict(
            WIDTHS,
            head_dim=8,
            n_routed_experts=8,
            moe_shared_expert_intermediate_size=24,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            layers_block_type=["full_attention", "moe"],  # plain relu² experts; Mamba-2 layers: test_nemotron_h
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=8,
            n_groups=2,
            chunk_size=8,
            pad_token_id=0,
        ),
        block=lambda model, i: model.model.layers[i].mixer,
        dense=(0,),
        path="model.layers.{i}.mixer",
    ),
    "gemma4_text": Tiny(
        dict(
            COMMON,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            top_k_experts=2,
            enable_moe_block=True,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=64,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
            per_layer_config={"01": {"head_dim": 16}},
        ),
        block=lambda model, i: gemma4_moe(model.model.layers[i]),
        fused=False,
        path="model.layers.{i}",
    ),
    "longcat_flash": Tiny(  # 4 experts and 2 identity experts, top-2 of the 6; two attention sublayers a layer
        dict(
            vocab_size=64, hidden_size=D, num_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=4, zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=16, ffn_hidden_size=48,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8,
            routed_scaling_factor=2.5,
        ),  # fmt: skip
    ),
    "zaya": Tiny(  # an MLP router (12 wide) over 4 experts and the skip expert, top-1; CCA attention
        dict(
            COMMON, eos_token_id=1, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=1,
            router_hidden_size=12,
        ),  # fmt: skip
    ),
    "jetmoe": Tiny(  # GELU-gated experts (silu is the class default: test_hf_view), mlp.bias on the block's output
        dict(
            COMMON, kv_channels=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
            activation_function="gelu_pytorch_tanh",
        ),  # fmt: skip
        fused=False,  # no conversion mapping: saved fused or not, the same names
    ),
    "inkling2_text": Tiny(  # softcapped experts (caps that act on unit-scale weights); a block boundary every layer
        dict(
            COMMON, unpadded_vocab_size=64, eos_token_id=1, head_dim=8, swa_num_attention_heads=4,  # sliding: 1 KV head
            swa_num_key_value_heads=1, swa_head_dim=8, sliding_window_size=16, d_rel=4, rel_extent=16,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, route_scale=2.5,
            n_layers_per_attn_res_block=1, layer_types=["hybrid_sliding", "hybrid"], mlp_gate_softcap=0.5,
            mlp_up_softcap=0.75,
        ),  # fmt: skip
    ),
    "dbrx": Tiny(
        dict(
            vocab_size=64,
            d_model=D,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
        ),
        block=lambda model, i: model.transformer.blocks[i].ffn,
        fused=False,
        path="transformer.blocks.{i}.ffn",
    ),
}


# Families whose on-disk layout is one of the patterns above under other names: the view and write
# tests check their reading and writing; test_compress's whole REAP run (calibration, scoring, writing)
# on each of them adds about 3 s and nothing family-specific, so it runs with the slow tests.
COMPRESS_SLOW = frozenset(
    {
        "exaone_moe", "afmoe", "lfm2_moe", "minimax_m2", "hunyuan_v1_moe", "jamba", "ernie4_5_moe", "granitemoehybrid",
        "kimi_linear", "nemotron_h", "hy_v3", "laguna", "kolibri1", "dots3_note_text", "mistral4", "flint", "axk1", "sarvam_moe", "cohere2_moe",
        "minimax_m3_vl_text", "bailing_hybrid", "hy_v4", "aria_text", "deepseek_v4",
    }
)


def build(family: str, seed: int = 0, **overrides):
    """A random fp32 model of `family` with unit-scale weights (see the module docstring);
    `overrides` change config entries (e.g. vocab_size). A family outside TINY (one the view
    reads structurally) takes its whole config from `overrides`. A vocab_size override applies to
    Gemma 4's per-layer input embedding too."""
    torch.manual_seed(seed)
    base = TINY[family].config if family in TINY else {}
    if "vocab_size" in overrides and "vocab_size_per_layer_input" in base:
        overrides.setdefault("vocab_size_per_layer_input", overrides["vocab_size"])
    cls, config = language_model_class(AutoConfig.for_model(family, **{**base, **overrides}))
    return _unit_scale(cls._from_config(config, dtype=torch.float32))


def build_multimodal(family: str, text: dict, vision: dict, seed: int = 0, **overrides):
    """A random fp32 vision-language model of `family` (Qwen3.5-MoE, Llama 4, ...) whose language
    model is `text` (config entries) and vision tower `vision`, unit-scale weights; saved, it is
    stored as the releases are (the language model under model.language_model. or
    language_model.model.)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, text_config=text, vision_config=vision, **overrides)
    return _unit_scale(AutoModelForImageTextToText.from_config(config, dtype=torch.float32))


def _unit_scale(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, max(p.shape[-1], 1) ** -0.5 if p.dim() > 1 else 0.3)  # a zero-width one: empty
        # a selection bias, buffer or parameter (Laguna's, AFMoE's, ERNIE 4.5's), small beside the scores:
        # drawn N(0, 0.3) it outweighs them and every token chooses the same experts
        for name, b in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.uniform_(0, 0.1)
            if name.endswith("balancing_biases"):  # ZAYA's: the skip expert's is -1 (transformers sets it so
                b.uniform_(-1.02, -0.98)[-1] = -1.0  # on loading), the experts' about as low, so tokens skip too
            if name.endswith(("hidden_states_scale", "residual_scale")):  # ZAYA's residual scaling, as transformers
                b.fill_(1.0)  # inits it: drawn N(0, 0.3) its biases outweigh the tokens' embeddings, and a layer's
            if name.endswith(("hidden_states_bias", "residual_bias")):  # tokens all route alike (to one expert,
                b.zero_()  # or all skip); so do the router MLP's biases at that scale
            if name.endswith(("gate.down_proj.bias", "gate.router_mlp.fc1.bias", "gate.router_mlp.fc2.bias")):
                b.normal_(0, 0.03)
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash table: distinct experts per token id
                E = model.config.get_text_config().n_routed_experts
                b.copy_(torch.rand(b.shape[0], E).argsort(-1)[:, : b.shape[1]])
    return model.eval()


def load(path, dtype=torch.float32):
    """The saved model, reloaded by transformers with its readable (eager) experts."""
    cls, _ = language_model_class(AutoConfig.from_pretrained(path))
    return cls.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


def block_output(family: str, model, index: int, x: torch.Tensor) -> torch.Tensor:
    """transformers' MoE block of layer `index` on x [B, S, D] -> [B, S, D] (tuples unwrapped)."""
    with torch.no_grad():
        out = TINY[family].block(model, index)(x)
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


def block_choices(model, family: str):
    """Test-side hooks on each MoE block's experts (or, for Llama 4, its router) that record
    the top-k indices and weights the block actually used, independent of RoutingCapture."""
    seen: dict[int, list] = {}
    handles = []
    layers = model.transformer.blocks if family == "dbrx" else model.model.layers
    for i, layer in enumerate(layers):
        named = dict(layer.named_modules())
        experts = next((m for n, m in named.items() if n.rsplit(".", 1)[-1] == "experts"), None)  # not shared_experts
        if (experts is None and family != "jetmoe") or i in TINY[family].dense:
            continue
        seen[i] = []
        if family == "jetmoe":  # experts are mlp's own input_linear/output_linear (self_attention.experts: its attention)
            handles.append(layer.mlp.router.register_forward_hook(lambda m, a, out, i=i: seen[i].append(jetmoe_used(out))))
        elif family == "llama4_text":
            router = next(m for n, m in named.items() if n.endswith("router"))
            k = model.config.num_experts_per_tok
            handles.append(router.register_forward_hook(
                lambda m, a, out, i=i: seen[i].append(tuple(reversed(out[0].topk(k, dim=-1))))))
        else:
            handles.append(experts.register_forward_pre_hook(
                lambda m, a, i=i: seen[i].append((a[1].reshape(-1, a[1].shape[-1]), a[2].reshape(-1, a[2].shape[-1])))))
    return seen, handles


def jetmoe_used(out):
    """JetMoE's gating output (slot order sorted by expert, batch index, gates in that order, expert
    sizes, logits) -> the (indices, weights) [T, K] its block used."""
    sorted_slots, batch_index, gates, sizes, logits = out
    T = logits.shape[0]
    experts = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    index, weights = torch.empty(T * (len(gates) // T), dtype=torch.long), torch.empty(len(gates))
    index[sorted_slots], weights[sorted_slots] = experts, gates
    return index.view(T, -1), weights.view(T, -1)


def add_mtp_layer(path, seed: int = 1) -> dict[str, torch.Tensor]:
    """Give the tiny checkpoint saved at `path` a multi-token prediction layer, stored as its
    family's releases store it, and return the layer's tensors:

    - DeepSeek-V3 / GLM-4.5 (GLM-4.5V: under model.language_model.): decoder layer `num_hidden_layers` (the last layer's tensor names)
      beside its enorm, hnorm, eh_proj, shared_head.norm, shared_head.head and a copy of the
      embedding; num_nextn_predict_layers 1;
    - Qwen3-Next / Qwen3.5: `mtp.layers.0.` (the last full-attention
      layer's names) beside mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden, mtp.fc and mtp.norm
      (norms zero-centred: they scale by 1 + weight); mtp_num_hidden_layers 1.

    New values at unit scale, norms near their identity."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from moelab.hf.multimodal import language_config

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    n, V = language_config(config)["num_hidden_layers"], language_config(config)["vocab_size"]
    tensors = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)

    def drawn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * (shape[-1] ** -0.5 if len(shape) > 1 else 0.3)

    def layer_copy(source: str, prefix: str) -> dict[str, torch.Tensor]:
        copied = {prefix + k[len(source) :]: drawn(*v.shape) for k, v in tensors.items() if k.startswith(source)}
        for name in [k for k in copied if k.endswith("e_score_correction_bias")]:
            copied[name] = torch.rand(copied[name].shape, generator=generator) * 0.1
        return copied

    if language_config(config)["model_type"].startswith("qwen3"):  # Qwen3-Next's way
        types = language_config(config)["layer_types"]
        last = max(i for i, kind in enumerate(types) if kind == "full_attention")
        stem = "model.language_model.layers." if "text_config" in config else "model.layers."
        mtp = layer_copy(f"{stem}{last}.", "mtp.layers.0.")
        mtp |= {f"mtp.{name}.weight": drawn(D) for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
        mtp["mtp.fc.weight"] = drawn(D, 2 * D)
        (config["text_config"] if "text_config" in config else config)["mtp_num_hidden_layers"] = 1
    else:  # DeepSeek-V3's (GLM-4.5V: under model.language_model.)
        root = "model.language_model." if "text_config" in config else "model."
        prefix = f"{root}layers.{n}."
        mtp = layer_copy(f"{root}layers.{n - 1}.", prefix)
        mtp |= {prefix + f"{name}.weight": 1 + drawn(D) for name in ("enorm", "hnorm", "shared_head.norm")}
        mtp |= {
            prefix + "eh_proj.weight": drawn(D, 2 * D),
            prefix + "shared_head.head.weight": drawn(V, D),
            prefix + "embed_tokens.weight": tensors[f"{root}embed_tokens.weight"].clone(),
        }
        (config["text_config"] if "text_config" in config else config)["num_nextn_predict_layers"] = 1
    save_file(tensors | mtp, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return mtp
