"""Adapters: one table per transformers model_type, and `open_checkpoint`.

Each family lists its on-disk layouts (the original per-expert keys that default
`save_pretrained` writes, and the fused keys of `save_original_format=False`), the config keys
of its expert count, and what its config means for routing and for which layers are sparse.
Written against, and tested on, transformers 5.24.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from moelab.files import read_json_object
from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.hf.fallback import names_experts, structural_family
from moelab.hf.float8 import FLOAT8_METHODS, Float8Checkpoint, float8_scheme
from moelab.hf.layouts import (
    Config,
    Family,
    FlatExperts,
    FusedGateUp,
    LatentKeys,
    Layout,
    NormKeys,
    PerExpert,
    RouterKeys,
    RouterMLPKeys,
    SharedFusedMLP,
    SharedMLP,
    StackedUpDown,
    TransposedGateUp,
    config_flag,
    config_value,
    swiglu,
)
from moelab.hf.multimodal import language_config, loaded_as, runs_whole
from moelab.hf.mxfp4 import Mxfp4Checkpoint
from moelab.hf.quantized import stated_dtype
from moelab.hf.stored_names import renamed_on_loading
from moelab.hf.view import ModelView
from moelab.models.reference import model_dir
from moelab.validation import is_number

# ----------------------------------------------------------------------------- router settings


def _top_k(config: Config) -> int:
    return config_value(config, "num_experts_per_tok")


def _softmax_renormalized(config: Config) -> dict:
    """Mixtral; GPT-OSS and Granite (top-k of the logits, softmax over the k: the same thing)."""
    return {"score_func": "softmax", "top_k": _top_k(config), "renormalize": True}


def _softmax_norm_topk_prob(config: Config) -> dict:
    """Qwen2/3-MoE, OLMoE: renormalised only if norm_topk_prob (class default False)."""
    return {
        "score_func": "softmax",
        "top_k": _top_k(config),
        "renormalize": config_flag(config, "norm_topk_prob", default=False),
    }


def _refuse_mlp_bias(config: Config, family: str) -> None:
    """Refuse a config whose mlp_bias gives the shared experts biases, which moelab's views do not read."""
    if config_flag(config, "mlp_bias", default=False):
        raise CheckpointError(
            f"this {family} config sets mlp_bias: its shared experts have biases, which moelab's views do not read"
        )


def _deepseek_v4(config: Config) -> dict:
    """DeepSeek-V4: sqrt(softplus) scores (scoring_func), the correction bias for selection in its
    learned layers, a token table in its hash layers; always renormalised (transformers ignores
    norm_topk_prob), × routed_scaling_factor. transformers scores with ACT2FN[scoring_func], which
    has no "softmax": only the scores both compute ("sqrtsoftplus", "sigmoid") are read."""
    _refuse_mlp_bias(config, "DeepSeek-V4")
    score_func = config_value(config, "scoring_func", default="sqrtsoftplus")
    if score_func not in ("sqrtsoftplus", "sigmoid"):
        raise CheckpointError(
            f"this DeepSeek-V4 config sets scoring_func={score_func!r}; transformers scores its routers with "
            "ACT2FN[scoring_func] (which has no 'softmax'), and moelab reads 'sqrtsoftplus' or 'sigmoid' only"
        )
    return {
        "score_func": score_func,
        "top_k": _top_k(config),
        "renormalize": True,
        "route_scale": float(config_value(config, "routed_scaling_factor", default=1.5)),
    }


def _gate_clamped_experts(config: Config, index: int) -> tuple[dict, dict]:
    """DeepSeek-V4's and GLM-5-Next's routed and shared experts alike: silu(min(gate, L)) *
    clamp(up, -L, L), L = swiglu_limit (their config classes' default 10); a hidden_act other than
    silu (which their shared experts would apply) is refused."""
    act = config_value(config, "hidden_act", default="silu")
    if act != "silu":
        raise CheckpointError(f"this config sets hidden_act={act!r}; moelab reads its clamped experts with silu only")
    settings = {"activation": "gate_clamped_swiglu", "swiglu_limit": float(config_value(config, "swiglu_limit", default=10.0))}
    return settings, settings


def _deepseek_v4_hash_layer(config: Config, index: int) -> bool:
    """mlp_layer_types ("hash_moe" / "moe"), else the first num_hash_layers (default 3) layers, as
    DeepseekV4Config fills it in."""
    kinds = config.get("mlp_layer_types")
    if kinds is None:
        return index < config_value(config, "num_hash_layers", default=3)
    if not isinstance(kinds, list) or index >= len(kinds) or kinds[index] not in ("hash_moe", "moe"):
        raise CheckpointError(
            f"config.json's mlp_layer_types must list 'hash_moe' or 'moe' for every layer; got {kinds!r}"
        )
    return kinds[index] == "hash_moe"


def _deepseek_v2(config: Config) -> dict:
    """softmax; greedy or group-limited (group score: its max); × routed_scaling_factor; never
    renormalised (transformers ignores norm_topk_prob for V2). mlp_bias (biases on the shared
    experts, DeepSeek-V2's and Unlimited OCR's, which moelab's views do not read) is refused."""
    _refuse_mlp_bias(config, "DeepSeek-V2")
    method = config_value(config, "topk_method", default="greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise CheckpointError(
            f"DeepSeek-V2 topk_method {method!r} is not supported; expected greedy or group_limited_greedy"
        )
    grouped = method == "group_limited_greedy"
    return {
        "score_func": "softmax",
        "top_k": _top_k(config),
        "renormalize": False,
        "route_scale": float(config_value(config, "routed_scaling_factor", default=1.0)),
        "n_group": config_value(config, "n_group") if grouped else 1,
        "topk_group": config_value(config, "topk_group") if grouped else 1,
    }


def _deepseek_v3_router(
    n_group: int = 8, topk_group: int = 4, route_scale: float = 2.5
) -> Callable[[Config], dict]:
    """DeepSeek-V3's router: sigmoid + correction bias for selection; groups scored by their top-2
    sum; optional renormalisation; × routed_scaling_factor. The arguments are the family config's
    defaults where config.json leaves a key out."""

    def settings(config: Config) -> dict:
        return {
            "score_func": "sigmoid",
            "top_k": _top_k(config),
            "renormalize": config_flag(config, "norm_topk_prob", default=True),
            "route_scale": float(config_value(config, "routed_scaling_factor", default=route_scale)),
            "n_group": config_value(config, "n_group", default=n_group),
            "topk_group": config_value(config, "topk_group", default=topk_group),
        }

    return settings


_deepseek_v3 = _deepseek_v3_router()
_exaone_moe = _deepseek_v3_router(n_group=1, topk_group=1)  # EXAONE-MoE: groups off unless set
_nemotron_h = _deepseek_v3_router(n_group=1, topk_group=1, route_scale=1.0)  # NemotronHConfig's defaults
_dots3_note = _deepseek_v3_router(n_group=1, topk_group=1, route_scale=1.0)  # Dots3NoteTextConfig's defaults
_KIMI_KEYS = {
    "num_experts_per_token": "num_experts_per_tok", "moe_renormalize": "norm_topk_prob", "num_expert_group": "n_group"
}


def _kimi_linear(config: Config) -> dict:
    """Kimi-Linear: DeepSeek-V3's router under its own config keys (transformers maps
    num_experts_per_tok, norm_topk_prob and n_group onto them), with KimiLinearConfig's defaults
    (top-8, no groups, routed_scaling_factor 2.446)."""
    canonical = {_KIMI_KEYS.get(key, key): value for key, value in config.items()}
    return _deepseek_v3_router(n_group=1, topk_group=1, route_scale=2.446)({"num_experts_per_tok": 8, **canonical})


def _sigmoid_renormalized(
    config: Config, scale: str | None = None, default: float = 1.0, *, after_experts: bool = False,
    top_k: tuple[str, ...] = ("num_experts_per_tok",),
) -> dict:  # fmt: skip
    """Sigmoid scores, a correction bias (where the family has one) steering selection only, always
    renormalised, x config[scale] (its class `default` where absent; after the experts' sum where
    `after_experts`); no groups. top_k: the config keys of k, first present wins."""
    settings = {"score_func": "sigmoid", "top_k": config_value(config, *top_k), "renormalize": True}
    if scale is not None:
        settings["route_scale"] = float(config_value(config, scale, default=default))
    return settings | ({"scaled_after_experts": True} if after_experts else {})


_BAILING_KEYS = {
    "moe_renormalize": "norm_topk_prob", "num_expert_group": "n_group", "num_experts_per_token": "num_experts_per_tok"
}


def _bailing_hybrid(config: Config) -> dict:
    """Ling's hybrid models (bailing_hybrid): DeepSeek-V3's router, its config keys under Ling's names
    (transformers maps norm_topk_prob, n_group and num_experts_per_tok onto them), with
    BailingHybridConfig's defaults (8 groups, 4 kept, routed_scaling_factor 2.5)."""
    canonical = {_BAILING_KEYS.get(key, key): value for key, value in config.items()}
    return _deepseek_v3_router(n_group=8, topk_group=4, route_scale=2.5)(canonical)


def _aria(config: Config) -> dict:
    """Aria: the top moe_topk logits, a softmax over them (softmax renormalised); mlp_bias (biases on
    the shared experts, which moelab's views do not read) is refused."""
    _refuse_mlp_bias(config, "Aria")
    return {"score_func": "softmax", "top_k": config_value(config, "moe_topk"), "renormalize": True}


def _aria_activations(config: Config, index: int) -> tuple[dict, dict]:
    """Aria's routed experts are SwiGLU whatever the config says (AriaExperts' SiLU); its shared experts
    gate with hidden_act: SiLU, or GELU's tanh approximation."""
    act = config_value(config, "hidden_act", default="silu")
    shared = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh_glu"}.get(act)
    if shared is None:
        raise CheckpointError(
            f"this Aria config sets hidden_act {act!r} for its shared experts; moelab reads silu and gelu_pytorch_tanh"
        )
    return {"activation": "silu"}, {"activation": shared}


def _muse_spark(config: Config) -> dict:
    """Muse Spark: sigmoid of the logits times output_multiplier (MuseSparkTextConfig's default
    1/sqrt(32)), the correction bias steering selection only, always renormalised, x
    routed_scaling_factor."""
    settings = _sigmoid_renormalized(config, "routed_scaling_factor")
    return settings | {"logit_scale": float(config_value(config, "output_multiplier", default=0.1767766952966369))}


def _afmoe(config: Config) -> dict:
    """AFMoE: the block's expert_bias steers selection only, x route_scale."""
    return _sigmoid_renormalized(config, "route_scale")


def _lfm2_moe(config: Config) -> dict:
    """LFM2-MoE: sigmoid, the block's expert_bias (if use_expert_bias) steers selection only,
    renormalised if norm_topk_prob, x routed_scaling_factor; no groups. transformers adds 1e-6 to
    the chosen scores' sum, moelab 1e-20: the weights differ by a factor 1 + 1e-6 / sum, 1e-6
    where the chosen scores sum to about 1, 0.1 % for a token whose chosen scores sum to 1e-3
    (router logits near -8)."""
    return {
        "score_func": "sigmoid",
        "top_k": _top_k(config),
        "renormalize": config_flag(config, "norm_topk_prob", default=True),
        "route_scale": float(config_value(config, "routed_scaling_factor", default=1.0)),
    }


def _hy_v3(config: Config) -> dict:
    """Hunyuan 3 (HY-V3): sigmoid, the block's correction bias steers selection only, always
    renormalised, x router_scaling_factor (HYV3Config's default 2.826); no groups. mlp_bias
    (biases on the shared and dense MLPs, which moelab's views do not read) is refused."""
    _refuse_mlp_bias(config, "Hunyuan 3")
    return _sigmoid_renormalized(config, "router_scaling_factor", 2.826)


def _laguna(config: Config) -> dict:
    """Laguna: sigmoid, the correction bias steers selection only, always renormalised, the routed
    output x moe_routed_scaling_factor; no groups; moe_router_logit_softcapping c > 0: the logits are
    c * tanh(logits / c) first. Router weights applied to the experts' input are refused."""
    softcap = config_value(config, "moe_router_logit_softcapping", default=0.0) or 0.0
    if not (is_number(softcap) and math.isfinite(softcap) and softcap >= 0):
        raise CheckpointError(
            f"this Laguna config sets moe_router_logit_softcapping {softcap!r}; transformers reads a number >= 0 "
            "(0: no capping)"
        )
    if config_flag(config, "moe_apply_router_weight_on_input", default=False):
        raise CheckpointError(
            "this Laguna config sets moe_apply_router_weight_on_input: the router weights scale the experts' "
            "input, where moelab's routers weight their output (transformers does not run it either)"
        )
    settings = _sigmoid_renormalized(config, "moe_routed_scaling_factor", after_experts=True)
    return settings | ({"logit_softcap": float(softcap)} if softcap > 0 else {})


def _kolibri1(config: Config) -> dict:
    """Kolibri1: the top-k of the logits plus the correction bias (before the sigmoid), weights the
    sigmoid of the chosen logits, renormalised if norm_topk_prob (class default False); no scaling
    or groups."""
    return {
        "score_func": "sigmoid",
        "top_k": _top_k(config),
        "renormalize": config_flag(config, "norm_topk_prob", default=False),
        "select_on_logits": True,
    }


def _step3p5(config: Config) -> dict:
    """Step 3.7's language model (step3p5): sigmoid, the correction bias steers selection only,
    always renormalised, x moe_router_scaling_factor; no groups. The release names its top-k
    moe_top_k (an alias transformers maps onto num_experts_per_tok)."""
    return _sigmoid_renormalized(
        config, "moe_router_scaling_factor", after_experts=True, top_k=("num_experts_per_tok", "moe_top_k")
    )


def _mistral4(config: Config) -> dict:
    """Mistral 4: softmax, renormalised if norm_topk_prob (class default True), x
    routed_scaling_factor; limited to the topk_group best of n_group expert groups (class
    defaults 1 and 1: no limit), each scored by the sum of its two best softmax scores."""
    return _mistral_softmax(config, renormalize=config_flag(config, "norm_topk_prob", default=True))


def _mistral_large4(config: Config) -> dict:
    """Mistral Large 4: Mistral 4's router, always renormalised."""
    return _mistral_softmax(config, renormalize=True)


def _mistral_softmax(config: Config, renormalize: bool) -> dict:
    return {
        "score_func": "softmax",
        "top_k": _top_k(config),
        "renormalize": renormalize,
        "route_scale": float(config_value(config, "routed_scaling_factor", default=1.0)),
        "n_group": config_value(config, "n_group", default=1),
        "topk_group": config_value(config, "topk_group", default=1),
        "group_score": "top2",
    }


def _sigmoid_norm_topk_prob(config: Config) -> dict:
    """Flint: top-k of the sigmoid scores (no correction bias), renormalised if norm_topk_prob
    (class default True); no scaling or groups."""
    return {"score_func": "sigmoid", "top_k": _top_k(config), "renormalize": config_flag(config, "norm_topk_prob", True)}


def _cohere2_moe(config: Config) -> dict:
    """Cohere2-MoE: the top-k of the logits, then a softmax over the k (expert_selection_fn "softmax",
    the default: renormalised softmax) or their sigmoid, renormalised if norm_topk_prob ("sigmoid");
    no groups. With shared experts averaged with the routed ones (`_cohere2_moe_averaged`) the
    routed half is the router's route_scale 0.5, which transformers applies after the experts."""
    selection = config_value(config, "expert_selection_fn", default="softmax")
    if selection not in ("softmax", "sigmoid"):
        raise CheckpointError(f"this Cohere2-MoE config sets expert_selection_fn {selection!r}; transformers and "
                              "moelab read 'softmax' or 'sigmoid'")  # fmt: skip
    renormalize = selection == "softmax" or config_flag(config, "norm_topk_prob", default=True)
    settings = {"score_func": selection, "top_k": _top_k(config), "renormalize": renormalize}
    return settings | ({"route_scale": 0.5, "scaled_after_experts": True} if _cohere2_moe_averaged(config) else {})


def _cohere2_moe_averaged(config: Config) -> bool:
    """Cohere2-MoE's block output is (routed + shared) / 2 where it has shared experts and
    shared_expert_combination_strategy is "average" (its class default), routed + shared with "sum"."""
    strategy = config_value(config, "shared_expert_combination_strategy", default="average")
    if strategy not in ("average", "sum"):
        raise CheckpointError(
            f"this Cohere2-MoE config sets shared_expert_combination_strategy {strategy!r}; transformers and moelab "
            "read 'average' or 'sum'"
        )
    return config_value(config, "num_shared_experts", default=0) > 0 and strategy == "average"


def _cohere2_moe_activations(config: Config, index: int) -> tuple[dict, dict] | None:
    """Averaged shared experts (`_cohere2_moe_averaged`): their SwiGLU's output halved."""
    if not _cohere2_moe_averaged(config):
        return None
    return swiglu(config), {"activation": "silu", "output_scale": 0.5}


def _softmax_top_k(config: Config) -> dict:
    """Jamba: top-k of the softmax over all experts, never renormalised."""
    return {"score_func": "softmax", "top_k": _top_k(config), "renormalize": False}


_ERNIE_NORM_MIN = 1e-6  # far below any k/E: the floor never binds


def _ernie4_5_moe(config: Config) -> dict:
    """ERNIE 4.5 MoE: softmax, the correction bias (moe_statics) steers selection only,
    renormalised, no scaling. transformers divides by max(sum, moe_norm_min): the plain sum for
    the class default 1e-12 (the chosen softmax scores sum to about k/E or more), but a larger
    floor, which moelab's routers do not have, is refused."""
    if config_flag(config, "use_bias", default=False):
        raise CheckpointError(
            "this ERNIE 4.5 MoE config sets use_bias: its shared experts have biases, which moelab's views do "
            "not read"
        )
    norm_min = config_value(config, "moe_norm_min", default=1e-12)
    if not norm_min <= _ERNIE_NORM_MIN:
        raise CheckpointError(
            f"this ERNIE 4.5 MoE config sets moe_norm_min {norm_min!r}: transformers divides the routing weights "
            f"by at least that, where moelab's routers divide by their sum; moelab reads moe_norm_min up to "
            f"{_ERNIE_NORM_MIN:g}"
        )
    return {"score_func": "softmax", "top_k": config_value(config, "moe_k", "num_experts_per_tok"), "renormalize": True}


def _minimax_m2(config: Config) -> dict:
    """MiniMax-M2: sigmoid, the block's e_score_correction_bias steers selection only, always
    renormalised, no scaling (transformers reads no scoring_func / use_routing_bias key)."""
    return _sigmoid_renormalized(config)


def _minimax_m3(config: Config) -> dict:
    """MiniMax-M3: sigmoid, the correction bias steers selection only, always renormalised, the routed
    sum x routed_scaling_factor (MiniMaxM3VLTextConfig's default 2.0) before the shared experts' output
    is added."""
    return _sigmoid_renormalized(config, "routed_scaling_factor", 2.0, after_experts=True)


def _minimax_m3_activations(config: Config, index: int) -> tuple[dict, dict]:
    """MiniMax-M3's routed and shared experts: GPT-OSS's clamped SwiGLU (gate and up not interleaved),
    with swiglu_alpha and swiglu_limit (class defaults 1.702 and 7.0)."""
    clamped = {
        "activation": "clamped_swiglu",
        "swiglu_alpha": float(config_value(config, "swiglu_alpha", default=1.702)),
        "swiglu_limit": float(config_value(config, "swiglu_limit", default=7.0)),
    }
    return clamped, clamped


def _hunyuan_v1_moe(config: Config) -> dict:
    """Hunyuan-MoE V1: softmax, top moe_topk, renormalised. moe_topk may list one k per layer;
    only a list of one k is read (the settings are the model's, not a layer's)."""
    k = config_value(config, "moe_topk", "num_experts_per_tok")
    if isinstance(k, list):
        if len(set(k)) != 1:
            raise CheckpointError(
                f"config.json's moe_topk gives layers different top-k values {k}; moelab's views take one "
                "top-k for the model"
            )
        k = k[0]
    return {"score_func": "softmax", "top_k": k, "renormalize": True}


def _sparsemixer(config: Config) -> dict:
    """PhiMoE: transformers' sparsemixer always picks 2 experts, whatever num_experts_per_tok says."""
    return {
        "score_func": "sparsemixer",
        "top_k": 2,
        "renormalize": False,
        "jitter_eps": float(config_value(config, "router_jitter_noise", default=0.01)),
    }


def _llama4(config: Config) -> dict:
    """top-k of the logits, sigmoid of each chosen logit (= sigmoid then top-k), no renormalisation."""
    return {"score_func": "sigmoid", "top_k": _top_k(config), "renormalize": False}


_JETMOE_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh_glu"}


def _longcat_flash(config: Config) -> dict:
    """LongCat-Flash: softmax in float32 over the E experts and the Z identity experts together,
    the top moe_topk of the scores plus the correction bias (selection only), never renormalised,
    x routed_scaling_factor. Only identity zero-computation experts (zero_expert_type) are read, and
    norm_topk_prob and router_bias, which transformers ignores and the release's own code reads, must
    be false."""
    kind = config_value(config, "zero_expert_type", default="identity")
    if kind not in ("identity", None):
        raise CheckpointError(
            f"this LongCat-Flash config sets zero_expert_type {kind!r}; moelab reads identity zero-computation experts only"
        )
    for flag, what in (("norm_topk_prob", "renormalises the chosen weights"), ("router_bias", "adds the classifier's bias")):
        if config_flag(config, flag, default=False):
            raise CheckpointError(
                f"this LongCat-Flash config sets {flag}: the release's own code {what}, transformers does not, so the "
                "two compute different routings and moelab will not pick one (where the model was trained without it, set it false)"
            )
    return {
        "score_func": "softmax",
        "top_k": config_value(config, "moe_topk", "num_experts_per_tok", default=12),
        "renormalize": False,
        "route_scale": config_value(config, "routed_scaling_factor", default=6.0),
    }


def _zaya(config: Config) -> dict:
    """ZAYA: softmax over the E experts and the skip expert together, the top num_experts_per_tok
    of the probabilities plus the balancing biases (selection only), never renormalised."""
    return {"score_func": "softmax", "top_k": _top_k(config), "renormalize": False}


def _inkling2(config: Config) -> dict:
    """Inkling 2: sigmoid scores (scoring_func, the only one moelab reads for it), a correction bias
    steering selection only, renormalised, x route_scale (Inkling2TextConfig's default 8)."""
    if (scoring := config_value(config, "scoring_func", default="sigmoid")) != "sigmoid":
        raise CheckpointError(
            f"this config sets scoring_func={scoring!r}; moelab reads Inkling 2's router with 'sigmoid' only"
        )
    return _sigmoid_renormalized(config, "route_scale", default=8.0)


def _inkling2_experts(config: Config) -> dict:
    """Inkling 2's experts: softcap(g, mlp_gate_softcap) * sigmoid(g) * softcap(u, mlp_up_softcap)
    (Inkling2TextConfig's defaults 4 and 25); hidden_act is not read (the sigmoid is fixed)."""
    return {
        "activation": "softcapped_swiglu",
        "gate_softcap": float(config_value(config, "mlp_gate_softcap", default=4.0)),
        "up_softcap": float(config_value(config, "mlp_up_softcap", default=25.0)),
    }


def _jetmoe_experts(config: Config) -> dict:
    """JetMoE's experts: activation_function(x W[:I]^T) * (x W[I:]^T) on input_linear's rows; silu
    (SwiGLU, its class default) and gelu_pytorch_tanh are read, any other activation refused."""
    act = config_value(config, "activation_function", default="silu")
    if act not in _JETMOE_ACTIVATIONS:
        raise CheckpointError(
            f"this JetMoE config sets activation_function={act!r}; moelab reads its experts with "
            f"{' or '.join(map(repr, _JETMOE_ACTIVATIONS))} only"
        )
    return {"activation": _JETMOE_ACTIVATIONS[act]}


def _dbrx(config: Config) -> dict:
    """softmax, top-k, then divided by the p-norm of the k weights (p = moe_normalize_expert_weights:
    transformers' default 1.0 where absent; an explicit null: not normalised)."""
    ffn = config.get("ffn_config")
    p = ffn.get("moe_normalize_expert_weights", 1.0) if isinstance(ffn, dict) else 1.0
    if p not in (None, 1):
        raise CheckpointError(
            f"DBRX moe_normalize_expert_weights={p} (a {p}-norm) is not supported; only 1 (sum to one) "
            "or null (no normalisation)"
        )
    return {
        "score_func": "softmax",
        "top_k": config_value(config, "ffn_config.moe_top_k"),
        "renormalize": p is not None,
    }


def _native(config: Config) -> dict:
    """moelab's own TopKRouter (softmax, sigmoid or sqrt-softplus, groups, aux-loss-free bias as
    correction bias) or HashRouter (its table `token_experts`)."""
    moe = _native_config(config).moe
    if moe.router not in ("topk", "hash") or moe.chain_iterations != 1 or moe.reuse_layers != 1:
        raise CheckpointError(
            f"this moelab checkpoint has router={moe.router!r}, chain_iterations={moe.chain_iterations}, "
            f"reuse_layers={moe.reuse_layers}; the checkpoint view (which offloading, compression and the "
            "writer read) covers top-k and hash-routed MoE layers (router 'topk' or 'hash', no chain or reuse) "
            "only: run this model in memory"
        )
    return {
        "score_func": moe.score_func,
        "top_k": moe.top_k,
        "renormalize": True if moe.renormalize is None else moe.renormalize,
        "route_scale": moe.route_scale,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "group_score": moe.group_score,
    }


def _native_config(config: Config):
    from moelab.models.config import ModelConfig  # moelab.models imports moelab.nn, not moelab.hf

    try:
        return ModelConfig.from_dict(config)
    except ValueError as err:
        raise CheckpointError(f"config.json is not a valid moelab ModelConfig: {err}") from None


# ----------------------------------------------------------------------------- expert settings


def _gpt_oss_experts(config: Config) -> dict:
    return {
        "activation": "clamped_swiglu",
        "swiglu_alpha": float(config_value(config, "swiglu_alpha", default=1.702)),
        "swiglu_limit": float(config_value(config, "swiglu_limit", default=7.0)),
    }


def _llama4_experts(config: Config) -> dict:
    return {**swiglu(config), "scale_input": True}


def _silu_experts(config: Config) -> dict:
    """Experts whose activation is SiLU whatever hidden_act says (LFM2-MoE; Step 3.7, whose "swigluoai"
    transformers reads as SiLU)."""
    return {"activation": "silu"}


def _step3p5_activations(config: Config, i: int) -> tuple[dict, dict] | None:
    """Step 3.7's layers whose swiglu_limits (routed experts) or swiglu_limits_shared entry is set
    (the release's 43 and 44) cap silu(gate) and clamp up to that bound ("capped_swiglu"); a 0 or
    missing entry: plain SwiGLU. (Its hidden_act, the release's "swigluoai", is read as SiLU, as
    transformers does.)"""
    routed, shared = (_layer_entry(config, key, i) for key in ("swiglu_limits", "swiglu_limits_shared"))
    if not routed and not shared:
        return None
    return _capped(routed), _capped(shared)


def _layer_entry(config: Config, key: str, i: int) -> float:
    values = config.get(key) or []
    return float(values[i] or 0) if i < len(values) else 0.0


def _capped(limit: float) -> dict:
    return {"activation": "capped_swiglu", "swiglu_limit": limit} if limit else {"activation": "silu"}


def _nemotron_h_experts(config: Config) -> dict:
    """Plain experts, act(up x) with mlp_hidden_act (relu2: relu(x)²); no biases (mlp_bias gives the
    shared experts and the latent projections some)."""
    if config_flag(config, "mlp_bias", default=False):
        raise CheckpointError(
            "this Nemotron-H config sets mlp_bias: its shared experts and latent projections have biases, which "
            "moelab's views do not read"
        )
    return {"activation": config_value(config, "mlp_hidden_act", default="relu2")}


def _native_experts(config: Config) -> dict:
    """moelab's SwiGLU experts, or its plain MLP ones (`MLPExperts`: gelu, relu, silu, relu2)."""
    activation = _native_config(config).moe.activation
    return {"activation": "silu" if activation == "swiglu" else activation}


def _dbrx_experts(config: Config) -> dict:
    return {"activation": config_value(config, "ffn_config.ffn_act_fn.name", default="silu")}


# ----------------------------------------------------------------------------- sparse layers


def _qwen_sparse_layer(config: Config, i: int) -> bool:
    return (
        i not in (config.get("mlp_only_layers") or [])
        and (i + 1) % config_value(config, "decoder_sparse_step", default=1) == 0
    )


def _flint_sparse_layer(config: Config, i: int) -> bool:
    """Qwen's rule, where an absent mlp_only_layers makes the first two layers dense (FlintConfig's default)."""
    mlp_only = config.get("mlp_only_layers")
    return _qwen_sparse_layer({**config, "mlp_only_layers": [0, 1] if mlp_only is None else mlp_only}, i)


def _deepseek_sparse_layer(default_first_dense: int) -> Callable[[Config, int], bool]:
    return lambda config, i: i >= config_value(config, "first_k_dense_replace", default=default_first_dense)


def _first_dense_layers(key: str, default: int) -> Callable[[Config, int], bool]:
    """Layers from `key` on are sparse (AFMoE, LFM2-MoE: num_dense_layers)."""
    return lambda config, i: i >= config_value(config, key, default=default)


def _mlp_layer_types(config: Config, i: int, first_dense: int = 1, layer_freq: bool = False) -> bool:
    """mlp_layer_types ("dense" / "sparse" per layer, what the configs of EXAONE-MoE, Kimi-Linear,
    HY-V3, Laguna, dots3, A.X K1 and Cohere2-MoE write), else the first `first_k_dense_replace`
    layers are dense (`first_dense` where the key is absent too, as the config classes fill it in);
    with `layer_freq` (A.X K1, dots3), of the others only every moe_layer_freq-th (or those dots3's
    list of flags marks) is sparse."""
    kinds = config.get("mlp_layer_types")
    if kinds is None:
        freq = config_value(config, "moe_layer_freq", default=1) if layer_freq else 1
        every = bool(freq[i]) if isinstance(freq, list) else i % freq == 0
        return every and i >= config_value(config, "first_k_dense_replace", default=first_dense)
    if not isinstance(kinds, list) or i >= len(kinds) or kinds[i] not in ("dense", "sparse"):
        raise CheckpointError(
            f"config.json's mlp_layer_types must list 'dense' or 'sparse' for each of the "
            f"{config_value(config, 'num_hidden_layers')} layers, got {kinds!r}"
        )
    return kinds[i] == "sparse"


def _first_layer_dense(config: Config, i: int) -> bool:
    """mlp_layer_types, else layer 0 dense and the others sparse: HY-V3's, Hunyuan 4's, Laguna's and
    ERNIE-4.5-VL's config classes fill it in so, whatever first_k_dense_replace (ERNIE-4.5-VL's releases:
    moe_layer_start_index, which transformers 5.24 no longer reads) says."""
    return _mlp_layer_types({**config, "first_k_dense_replace": 1}, i)


def _deepseek_ocr2_sparse_layer(config: Config, i: int) -> bool:
    """mlp_layer_types, which DeepseekOcr2TextConfig has no default for (its decoder layers index it:
    transformers builds no model from a config without it, nor reads first_k_dense_replace)."""
    if config.get("mlp_layer_types") is None:
        raise CheckpointError(
            "this DeepSeek-OCR 2 config sets no mlp_layer_types, which transformers' DeepseekOcr2TextConfig does "
            "not fill in (nor read first_k_dense_replace for): add text_config.mlp_layer_types, 'dense' or "
            "'sparse' for each layer (the first first_k_dense_replace layers dense)"
        )
    return _mlp_layer_types(config, i)


def _glm5_next_sparse_layer(config: Config, i: int) -> bool:
    """mlp_layer_types, else the first three layers dense, as Glm5NextTextConfig fills it in: it has no
    first_k_dense_replace (a config.json that sets it, as GLM releases do, sets it for nothing). A
    multi-token prediction layer (num_hidden_layers on) is read as the last decoder layer's kind, as
    the layer-by-layer runs build it."""
    i = min(i, config_value(config, "num_hidden_layers") - 1)
    return _mlp_layer_types({**config, "first_k_dense_replace": 3}, i)


def _legacy_mlp_layer_types(config: Config, i: int) -> bool:
    return _mlp_layer_types(config, i, layer_freq=True)


def _step3p5_sparse_layer(config: Config, i: int) -> bool:
    """mlp_layer_types (`_mlp_layer_types`), else the release's moe_layers_enum ("3,4,...": the
    sparse layers), else layers 3 on, as Step3p7TextConfig fills them in."""
    if "mlp_layer_types" in config:
        return _mlp_layer_types(config, i)
    enum = config.get("moe_layers_enum")
    if enum is None:
        return i >= 3
    return i in {int(n) for n in (enum.split(",") if isinstance(enum, str) else enum) if str(n).strip()}


def _ernie_sparse_layer(config: Config, i: int) -> bool:
    """Every moe_layer_interval-th layer (counting from 1) from moe_layer_start_index to
    moe_layer_end_index (-1: the last layer), transformers' defaults 1, 1 and -1."""
    end = config_value(config, "moe_layer_end_index", default=-1)
    end = config_value(config, "num_hidden_layers") - 1 if end == -1 else end
    return (
        (i + 1) % config_value(config, "moe_layer_interval", default=1) == 0
        and config_value(config, "moe_layer_start_index", default=1) <= i <= end
    )


def _jamba_sparse_layer(config: Config, i: int) -> bool:
    """Every expert_layer_period-th layer from expert_layer_offset (transformers' defaults 2 and 1),
    where num_experts > 1."""
    period = config_value(config, "expert_layer_period", default=2)
    offset = config_value(config, "expert_layer_offset", default=1)
    return config_value(config, "num_experts", default=16) > 1 and i % period == offset


_NEMOTRON_H_PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def _nemotron_h_sparse_layer(config: Config, i: int) -> bool:
    """layers_block_type[i] == "moe" (transformers' key), else hybrid_override_pattern[i] == "E"
    (the key NVIDIA's config.json files write)."""
    kinds = config.get("layers_block_type")
    if kinds is None and isinstance(config.get("hybrid_override_pattern"), str):
        kinds = [_NEMOTRON_H_PATTERN.get(c, c) for c in config["hybrid_override_pattern"]]
    if not isinstance(kinds, list) or i >= len(kinds):
        raise CheckpointError(
            f"config.json's layers_block_type (or hybrid_override_pattern) must name every decoder layer's kind, "
            f"got {kinds!r}"
        )
    return kinds[i] == "moe"


def _native_sparse_layer(config: Config, i: int) -> bool:
    return _native_config(config).layer_kinds[i] == "moe"


def _llama4_sparse_layer(config: Config, i: int) -> bool:
    layers = config.get("moe_layers")
    if layers is None:  # transformers' default: every `interleave_moe_layer_step`-th layer
        step = config_value(config, "interleave_moe_layer_step", default=1)
        layers = range(step - 1, config_value(config, "num_hidden_layers"), step)
    return i in layers


# ----------------------------------------------------------------------------- key tables


_MUSE_SPARK_LAYOUT = Layout(
    RouterKeys("mlp.gate.weight", selection_bias="mlp.gate.e_score_correction_bias"),
    FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    latent=LatentKeys("mlp.pre_expert_proj.weight", "mlp.post_expert_proj.weight"),
    norms=NormKeys(experts="mlp.pre_expert_norm.weight", expert_output="mlp.experts.post_expert_norm.weight",
                   eps_default=1e-5, unit_offset=True),  # MuseSparkTextConfig's rms_norm_eps, post_norm_eps 1e-8
)
"""Muse Spark's MoE block (no conversion mapping: saved under these names either way): the router reads
x, the experts a latent of moe_hidden_size, pre_expert_norm(pre_expert_proj @ x), each expert's output
normed (post_expert_norm) before its weight, their sum projected back (post_expert_proj); its norms
scale by 1 + their weight."""

_GEMMA4_LAYOUT = Layout(
    RouterKeys("router.proj.weight", expert_scale="router.per_expert_scale"),
    FusedGateUp("experts.gate_up_proj", "experts.down_proj"),
    norms=NormKeys("router.scale", "pre_feedforward_layernorm_2.weight", "post_feedforward_layernorm_2.weight"),
)
"""Gemma 4's MoE (enable_moe_block): the router and experts are modules of the decoder layer itself,
beside its dense MLP (which moelab leaves to the layer, as it leaves any dense part): router(x) on the
residual x after attention, RMS-normed with no weight, times router.scale and hidden_size^-0.5; the
experts read pre_feedforward_layernorm_2(x) and their weighted sum is post_feedforward_layernorm_2'd
before the layer adds the dense MLP's output."""


def _gemma4(config: Config) -> dict:
    """Gemma 4: softmax over all experts, top top_k_experts renormalised, then x the chosen expert's
    per_expert_scale (`RouterView.expert_scale`)."""
    return {"score_func": "softmax", "top_k": config_value(config, "top_k_experts"), "renormalize": True}


def _gemma4_experts(config: Config) -> dict:
    """Gated GELU with tanh approximation (hidden_activation gelu_pytorch_tanh, Gemma's default)."""
    activation = config_value(config, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise CheckpointError(
            f"this Gemma 4 config sets hidden_activation {activation!r}; moelab's experts read Gemma's gated "
            "gelu_pytorch_tanh only"
        )
    return {"activation": "gelu_tanh_glu"}


def _gemma4_sparse_layer(config: Config, i: int) -> bool:
    """Every layer of a config with enable_moe_block, none otherwise (a dense Gemma 4)."""
    return config_flag(config, "enable_moe_block", default=False)


def _qwen2_moe_layouts(
    shared: SharedMLP | None = None, selection_bias: str | None = None
) -> tuple[Layout, ...]:
    """The qwen2_moe pattern (Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3): per-expert gate/up/down_proj
    under mlp.experts.{e}, or the fused mlp.experts.gate_up_proj / down_proj."""
    router = RouterKeys("mlp.gate.weight", selection_bias=selection_bias)
    return (
        Layout(
            router, PerExpert(*(f"mlp.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down"))), shared
        ),
        Layout(router, FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), shared),
    )


def _w1w3w2_layouts(fused_router: str) -> tuple[Layout, ...]:
    """Mixtral and PhiMoE: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down) on disk,
    renamed to mlp.* (router `fused_router`) when saved fused."""
    per_expert = PerExpert(*(f"block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2")))
    return (
        Layout(RouterKeys("block_sparse_moe.gate.weight"), per_expert),
        Layout(RouterKeys(fused_router), FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    )


def _granite_layouts(shared: SharedFusedMLP | None = None) -> tuple[Layout, ...]:
    """Fused on disk as input_linear / output_linear / router.layer, or under the in-memory names."""
    moe = "block_sparse_moe."
    return (
        Layout(
            RouterKeys(moe + "router.layer.weight"),
            FusedGateUp(moe + "input_linear.weight", moe + "output_linear.weight"),
            shared,
        ),
        Layout(
            RouterKeys(moe + "router.weight"),
            FusedGateUp(moe + "experts.gate_up_proj", moe + "experts.down_proj"),
            shared,
        ),
    )


def _exaone_moe_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe pattern with shared experts; the correction bias is mlp.e_score_correction_bias
    on disk (transformers renames it to the router's), mlp.gate.e_score_correction_bias fused."""
    shared = _shared("mlp.shared_experts")
    per_expert, _ = _qwen2_moe_layouts(shared, selection_bias="mlp.e_score_correction_bias")
    _, fused = _qwen2_moe_layouts(shared, selection_bias=_DEEPSEEK_BIAS)
    return per_expert, fused


def _kimi_linear_layouts() -> tuple[Layout, ...]:
    """Moonshot's layout on disk: block_sparse_moe.gate (weight, e_score_correction_bias),
    experts.{e}.w1 (gate) / w3 (up) / w2 (down), shared_experts; transformers' own in memory
    (mlp., fused experts), as DeepSeek-V3's fused layout."""
    block = "block_sparse_moe."
    router = RouterKeys(block + "gate.weight", selection_bias=block + "gate.e_score_correction_bias")
    per_expert = PerExpert(*(f"{block}experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2")))
    _, fused = _qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias=_DEEPSEEK_BIAS)
    return Layout(router, per_expert, _shared(block + "shared_experts")), fused


def _bailing_hybrid_layouts() -> tuple[Layout, ...]:
    """Ling's layout on disk: per-expert gate/up/down_proj, the router's correction bias its
    mlp.gate.expert_bias; transformers' fused experts and e_score_correction_bias in memory."""
    per_expert, fused = _qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias="mlp.gate.expert_bias")
    return per_expert, dataclasses.replace(fused, router=RouterKeys("mlp.gate.weight", selection_bias=_DEEPSEEK_BIAS))


# transformers' renames of Kimi-Linear's other tensors: the dense layers' MLPs are stored under
# block_sparse_moe too, the linear attention's forget gate directly under self_attn; its q, k and v
# convolutions, which transformers concatenates on loading, are read so
_KIMI_RENAMES = ((".mlp.", ".block_sparse_moe."), ("self_attn.forget_gate.", "self_attn."))
_KIMI_CONVOLUTIONS = (("self_attn.conv1d.", tuple(f"self_attn.{p}_conv1d." for p in "qkv")),)


def _afmoe_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe experts; the router is mlp.router.gate, its bias the block's mlp.expert_bias."""
    router = RouterKeys("mlp.router.gate.weight", selection_bias="mlp.expert_bias")
    shared = _shared("mlp.shared_experts")
    return tuple(Layout(router, lay.experts, shared) for lay in _qwen2_moe_layouts())


def _lfm2_moe_layouts() -> tuple[Layout, ...]:
    """feed_forward.experts.{e}.w1 (gate) / w3 (up) / w2 (down) on disk, fused under the same
    block; router feed_forward.gate, its bias the block's feed_forward.expert_bias where the config
    has use_expert_bias."""
    ff = "feed_forward."
    router = RouterKeys(ff + "gate.weight", selection_bias=ff + "expert_bias", optional=True)
    per_expert = PerExpert(*(f"{ff}experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2")))
    return (
        Layout(router, per_expert),
        Layout(router, FusedGateUp(ff + "experts.gate_up_proj", ff + "experts.down_proj")),
    )


def _minimax_m2_layouts() -> tuple[Layout, ...]:
    """Mixtral's layouts plus the block's correction bias: block_sparse_moe.e_score_correction_bias
    on disk, mlp.e_score_correction_bias fused."""
    per_expert, fused = _w1w3w2_layouts("mlp.gate.weight")
    return (
        Layout(dataclasses.replace(per_expert.router, selection_bias="block_sparse_moe.e_score_correction_bias"),
               per_expert.experts),
        Layout(dataclasses.replace(fused.router, selection_bias="mlp.e_score_correction_bias"), fused.experts),
    )  # fmt: skip


def _minimax_m3_layouts() -> tuple[Layout, ...]:
    """MiniMax-M3 as released: Mixtral's block_sparse_moe (experts.{e}.w1/w3/w2, gate, the block's
    e_score_correction_bias) with shared_experts.gate_proj/up_proj/down_proj; fused in memory: mlp.*
    with the correction bias under the gate and the shared experts' gate and up in one gate_up_proj."""
    per_expert, fused = _w1w3w2_layouts("mlp.gate.weight")
    return (
        Layout(dataclasses.replace(per_expert.router, selection_bias="block_sparse_moe.e_score_correction_bias"),
               per_expert.experts, _shared("block_sparse_moe.shared_experts")),
        Layout(dataclasses.replace(fused.router, selection_bias="mlp.gate.e_score_correction_bias"), fused.experts,
               SharedFusedMLP("mlp.shared_experts.gate_up_proj.weight", "mlp.shared_experts.down_proj.weight")),
    )  # fmt: skip


def _hunyuan_v1_moe_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe experts; router mlp.gate.wg; shared expert mlp.shared_mlp."""
    router, shared = RouterKeys("mlp.gate.wg.weight"), _shared("mlp.shared_mlp")
    return tuple(Layout(router, lay.experts, shared) for lay in _qwen2_moe_layouts())


def _ernie4_5_moe_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe pattern with shared experts; the correction bias, one row [1, E], is
    mlp.moe_statics.e_score_correction_bias on disk, mlp.gate.moe_statics.e_score_correction_bias fused."""
    shared = _shared("mlp.shared_experts")
    per_expert, fused = _qwen2_moe_layouts(shared)
    bias = "moe_statics.e_score_correction_bias"
    return (
        Layout(RouterKeys("mlp.gate.weight", selection_bias=f"mlp.{bias}", selection_bias_row=True),
               per_expert.experts, shared),
        Layout(RouterKeys("mlp.gate.weight", selection_bias=f"mlp.gate.{bias}", selection_bias_row=True),
               fused.experts, shared),
    )  # fmt: skip


def _ernie4_5_vl_moe_layouts() -> tuple[Layout, ...]:
    """ERNIE-4.5-VL's text experts (mlp.text_moe in memory) and shared experts. On disk: the text router
    mlp.gate.weight [D, E] (the vision router's is weight_1), the correction biases as rows [2, E] (text,
    vision), the experts mlp.experts.{e} of both blocks in one list of 2E (text 0..E-1, then vision);
    fused: ERNIE 4.5's under mlp.text_moe."""
    shared, bias = _shared("mlp.shared_experts"), "moe_statics.e_score_correction_bias"
    router = RouterKeys("mlp.gate.weight", selection_bias=f"mlp.{bias}", selection_bias_row=True,
                        selection_bias_rows=2, transposed=True)
    experts = PerExpert(*(f"mlp.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")), blocks=2)
    fused = RouterKeys("mlp.text_moe.gate.weight", selection_bias=f"mlp.text_moe.gate.{bias}", selection_bias_row=True)
    return (
        Layout(router, experts, shared),
        Layout(fused, FusedGateUp("mlp.text_moe.experts.gate_up_proj", "mlp.text_moe.experts.down_proj"), shared),
    )  # fmt: skip


def _hy_v4_layouts() -> tuple[Layout, ...]:
    """Hunyuan 4: DeepSeek-V3's router (mlp.gate, its e_score_correction_bias), transformers' fused
    experts, shared experts whose gate projection is stored as linear_gate (gate_proj in memory)."""
    router = RouterKeys("mlp.gate.weight", selection_bias="mlp.gate.e_score_correction_bias")
    experts = FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    stored = SharedMLP(*(f"mlp.shared_experts.{p}.weight" for p in ("linear_gate", "up_proj", "down_proj")))
    return Layout(router, experts, stored), Layout(router, experts, _shared("mlp.shared_experts"))


def _hy_v4_experts(config: Config) -> dict:
    """Hunyuan 4's routed experts: silu(min(gate, L)) * clamp(up, -L, L), L = swiglu_limit (HYV4Config's
    default 10); its shared experts plain SwiGLU."""
    return {"activation": "gate_clamped_swiglu", "swiglu_limit": float(config_value(config, "swiglu_limit", default=10.0))}


def _deepseek_v4_layouts() -> tuple[Layout, ...]:
    """As save_pretrained and the release store it (under layers.N. in the release): ffn.gate
    (its correction bias ffn.gate.bias, its hash table ffn.gate.tid2eid), per-expert w1 / w3 / w2, shared
    experts w1 / w3 / w2; in transformers' names: mlp.gate (e_score_correction_bias, tid2eid), fused
    experts, shared gate_proj / up_proj / down_proj."""
    return (
        Layout(RouterKeys("ffn.gate.weight", selection_bias="ffn.gate.bias", token_experts="ffn.gate.tid2eid", optional=True),
               PerExpert(*(f"ffn.experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2"))),
               SharedMLP(*(f"ffn.shared_experts.{w}.weight" for w in ("w1", "w3", "w2")))),
        Layout(RouterKeys("mlp.gate.weight", selection_bias="mlp.gate.e_score_correction_bias",
                          token_experts="mlp.gate.tid2eid", optional=True),
               FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), _shared("mlp.shared_experts")),
    )  # fmt: skip


def _hy_v3_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe experts. On disk: router mlp.router.gate, its correction bias the block's
    mlp.expert_bias, shared experts mlp.shared_mlp; fused, transformers' names: mlp.gate,
    mlp.e_score_correction_bias, mlp.shared_experts."""
    per_expert, fused = _qwen2_moe_layouts()
    return (
        Layout(RouterKeys("mlp.router.gate.weight", selection_bias="mlp.expert_bias"), per_expert.experts,
               _shared("mlp.shared_mlp")),
        Layout(RouterKeys("mlp.gate.weight", selection_bias="mlp.e_score_correction_bias"), fused.experts,
               _shared("mlp.shared_experts")),
    )  # fmt: skip


def _laguna_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe experts. On disk: the correction bias is mlp.experts.e_score_correction_bias,
    the shared expert mlp.shared_expert; fused, transformers' names: mlp.gate.e_score_correction_bias,
    mlp.shared_experts."""
    per_expert, fused = _qwen2_moe_layouts()
    return (
        Layout(RouterKeys("mlp.gate.weight", selection_bias="mlp.experts.e_score_correction_bias"),
               per_expert.experts, _shared("mlp.shared_expert")),
        Layout(RouterKeys("mlp.gate.weight", selection_bias=_DEEPSEEK_BIAS), fused.experts,
               _shared("mlp.shared_experts")),
    )  # fmt: skip


def _axk1_layouts() -> tuple[Layout, ...]:
    """DeepSeek-V3's, the correction bias optional (A.X K1's releases route without one, which
    transformers reads as zeros)."""
    router = RouterKeys("mlp.gate.weight", selection_bias=_DEEPSEEK_BIAS, optional=True)
    return tuple(dataclasses.replace(lay, router=router) for lay in _qwen2_moe_layouts(_shared("mlp.shared_experts")))


def _kolibri1_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe pattern with shared experts; the correction bias is stored beside the block,
    as moe.router.expert_bias (mlp.gate.e_score_correction_bias fused, transformers' name)."""
    per_expert, fused = _qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias=_DEEPSEEK_BIAS)
    router = RouterKeys("mlp.gate.weight", selection_bias="moe.router.expert_bias")
    return dataclasses.replace(per_expert, router=router), fused


# transformers' renames of Kolibri1's sandwich norms (in memory, on disk)
_KOLIBRI1_RENAMES = (("post_self_attn_layernorm", "post_attn_norm"), ("post_mlp_layernorm", "post_ffn_norm"))


def _step3p5_layouts() -> tuple[Layout, ...]:
    """On disk: moe.gate with its correction bias moe.router_bias, experts stacked one tensor per
    projection (moe.gate_proj / up_proj / down_proj), shared expert share_expert; fused,
    transformers' names (DeepSeek-V3's)."""
    _, fused = _qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias=_DEEPSEEK_BIAS)
    stacked = StackedUpDown("moe.up_proj.weight", "moe.down_proj.weight", gate="moe.gate_proj.weight")
    return Layout(RouterKeys("moe.gate.weight", selection_bias="moe.router_bias"), stacked, _shared("share_expert")), fused


def _mistral_large4_layouts() -> tuple[Layout, ...]:
    """Mistral's own names on disk (what default `save_pretrained` writes, the language model at the
    root): gate, experts.{e}.w1 (gate) / w3 (up) / w2 (down), shared_experts.w1 / w3 / w2; fused,
    DeepSeek-V3's layout without a correction bias."""
    per_expert = PerExpert(*(f"experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2")))
    shared = SharedMLP(*(f"shared_experts.{w}.weight" for w in ("w1", "w3", "w2")))
    return (Layout(RouterKeys("gate.weight"), per_expert, shared),
            *_qwen2_moe_layouts(_shared("mlp.shared_experts"))[1:])  # fmt: skip


# transformers' renames of Mistral Large 4's other tensors (in memory, on disk), applied in turn to
# the vision-language model's names: the language model's root, then its modules
_MISTRAL_LARGE4_RENAMES = (
    ("model.language_model.embed_tokens.", "tok_embeddings."), ("model.language_model.rotary_emb.", "lerope."),
    ("model.language_model.", ""), ("lm_head.", "output."),
    ("self_attn.q_proj.", "attention.wq."), ("self_attn.kv_a_proj_with_mqa.", "attention.wkv_a_with_mqa."),
    ("self_attn.kv_b_proj.", "attention.wkv_b."), ("self_attn.o_proj.", "attention.wo."),
    ("self_attn.kv_a_layernorm.", "attention.kv_a_norm."), ("softmax_scaling.scale", "ssmax_scaling.s"),
    ("softmax_scaling.bias", "ssmax_scaling.b"), ("self_attn.", "attention."),
    ("input_layernorm.", "attention_norm."), ("post_attention_layernorm.", "ffn_norm."),
    ("mlp.gate_proj.", "feed_forward.w1."), ("mlp.up_proj.", "feed_forward.w3."), ("mlp.down_proj.", "feed_forward.w2."),
)  # fmt: skip


def _sarvam_moe_layouts() -> tuple[Layout, ...]:
    """DeepSeek-V3's (GLM-4.5's), the correction bias stored as mlp.gate.expert_bias."""
    per_expert, fused = _qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias=_DEEPSEEK_BIAS)
    return dataclasses.replace(per_expert, router=RouterKeys("mlp.gate.weight", selection_bias="mlp.gate.expert_bias")), fused


# transformers' renames and split of Sarvam-MoE's other tensors (in memory, on disk)
_SARVAM_RENAMES = (
    ("model.embed_tokens.", "model.word_embeddings."), ("self_attn.o_proj.", "attention.dense."),
    ("self_attn.q_norm.", "attention.query_layernorm."), ("self_attn.k_norm.", "attention.key_layernorm."),
)
_SARVAM_SPLITS = ((("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."), "attention.query_key_value."),)


def _jamba_layouts() -> tuple[Layout, ...]:
    """The qwen2_moe pattern under feed_forward, router feed_forward.router."""
    router = RouterKeys("feed_forward.router.weight")
    per_expert = PerExpert(*(f"feed_forward.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")))
    fused = FusedGateUp("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
    return Layout(router, per_expert), Layout(router, fused)


def _nemotron_h_layouts() -> tuple[Layout, ...]:
    """Plain experts under mixer: experts.{e}.up_proj / down_proj on disk, stacked
    experts.up_proj / down_proj fused; router mixer.gate with its correction bias; a plain shared
    expert mixer.shared_experts; with moe_latent_size, the latent projections mixer.fc1_latent_proj
    (down) and fc2_latent_proj (up)."""
    router = RouterKeys("mixer.gate.weight", selection_bias="mixer.gate.e_score_correction_bias")
    shared = SharedMLP(None, "mixer.shared_experts.up_proj.weight", "mixer.shared_experts.down_proj.weight")
    per_expert = PerExpert(None, "mixer.experts.{e}.up_proj.weight", "mixer.experts.{e}.down_proj.weight")
    latent = LatentKeys("mixer.fc1_latent_proj.weight", "mixer.fc2_latent_proj.weight")
    return (
        Layout(router, per_expert, shared, latent),
        Layout(router, StackedUpDown("mixer.experts.up_proj", "mixer.experts.down_proj"), shared, latent),
    )


def _shared(name: str, sigmoid_gate: str | None = None) -> SharedMLP:
    return SharedMLP(*(f"{name}.{p}_proj.weight" for p in ("gate", "up", "down")), sigmoid_gate=sigmoid_gate)


_GPT_OSS_EXPERTS = TransposedGateUp(
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
    interleaved=True,
    gate_up_bias="mlp.experts.gate_up_proj_bias",
    down_bias="mlp.experts.down_proj_bias",
)
_ARIA_LAYOUTS = tuple(
    Layout(RouterKeys("mlp.router.weight"), TransposedGateUp(f"mlp.experts.{up}", f"mlp.experts.{down}", interleaved=False),
           _shared("mlp.shared_experts"))
    for up, down in (("fc1.weight", "fc2.weight"), ("gate_up_proj", "down_proj"))
)  # fmt: skip
"""Aria's experts stored transposed, [E, D, 2I] and [E, I, D]: as fc1 / fc2 on disk, gate_up_proj /
down_proj in memory."""
_LLAMA4_EXPERTS = TransposedGateUp(
    "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj", interleaved=False
)
_DBRX_EXPERTS = FlatExperts(
    "ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2", "ffn_config.ffn_hidden_size"
)
_LONGCAT_ROUTER = RouterKeys(
    "mlp.router.classifier.weight", bias="mlp.router.classifier.bias",
    selection_bias="mlp.router.e_score_correction_bias", optional=True,
)  # fmt: skip
# gate and up stored for the E experts and, as transformers saves them, for the Z identity ones too
_LONGCAT_LAYOUTS = (
    Layout(_LONGCAT_ROUTER, PerExpert(*(f"mlp.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")), padded=True)),
    Layout(_LONGCAT_ROUTER, FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj", padded=True)),
)

_ZAYA_LAYOUT = Layout(
    RouterKeys("mlp.gate.router_mlp.out_proj.weight", selection_bias="mlp.gate.balancing_biases"),
    FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    router_mlp=RouterMLPKeys("mlp.gate.", "router_states_scale", "router_mlp.norm", "router_mlp.fc1", "router_mlp.fc2"),
)
"""ZAYA's MoE block (mlp): the router's MLP (down_proj H -> R, the carried state's scale, norm, fc1, fc2)
then out_proj [E + 1, R], whose last row is the skip expert's, as are the last balancing bias and
probability."""

_JETMOE_LAYOUT = Layout(
    RouterKeys("mlp.router.layer.weight"), FusedGateUp("mlp.input_linear.weight", "mlp.output_linear.weight"),
    output_bias="mlp.bias",
)
"""JetMoE's MoE block (mlp): the router's top-k logits softmaxed, experts fused as Granite's
(input_linear [E, 2I, D], activated rows first; output_linear [E, D, I]), plus mlp.bias [D] on the
block's output. Its attention (self_attention.experts: a mixture of attention heads with a router
of its own) is no part of it, and is left as it is."""
_INKLING2_LAYOUTS = (
    Layout(RouterKeys("mlp.gate.weight", selection_bias="mlp.gate.bias"),
           FusedGateUp("mlp.experts.w13_weight", "mlp.experts.w2_weight", interleaved=True)),
    Layout(RouterKeys("mlp.gate.weight", selection_bias="mlp.gate.e_score_correction_bias"),
           FusedGateUp("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
)  # fmt: skip
"""Inkling 2's MoE block (mlp): as released and saved by default, under model.llm., the correction bias
stored as mlp.gate.bias and gate_up as w13_weight [E, 2I, D] with gate and up rows alternating, down as
w2_weight; in transformers' names with save_original_format=False."""
_GRANITE_SHARED = SharedFusedMLP("shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight")
_QWEN2_SHARED = _shared("mlp.shared_expert", sigmoid_gate="mlp.shared_expert_gate.weight")
_DEEPSEEK_BIAS = "mlp.gate.e_score_correction_bias"

_NATIVE_FFN = "ffn."
_NATIVE_ROUTER = RouterKeys(_NATIVE_FFN + "router.weight", bias=_NATIVE_FFN + "router.bias",
                            selection_bias=_NATIVE_FFN + "router.selection_bias",
                            token_experts=_NATIVE_FFN + "router.token_experts", optional=True)  # fmt: skip
_NATIVE_SHARED = SharedMLP(*(f"{_NATIVE_FFN}shared.{p}_proj.weight" for p in ("gate", "up", "down")),
                           sigmoid_gate=_NATIVE_FFN + "shared.gate.weight", optional_gate=True)  # fmt: skip
_NATIVE_LATENT = LatentKeys(_NATIVE_FFN + "latent.down_proj.weight", _NATIVE_FFN + "latent.up_proj.weight")
NATIVE = Family(
    "moelab",
    layouts=tuple(
        Layout(_NATIVE_ROUTER, experts(*(f"{_NATIVE_FFN}experts.{name}" for name in names)), _NATIVE_SHARED, _NATIVE_LATENT)
        for experts, names in (
            (FusedGateUp, ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")),  # SwiGLUExperts
            (StackedUpDown, ("up_proj", "down_proj", "up_bias", "down_bias")),  # MLPExperts
        )
    ),
    num_experts=("moe.num_experts",),
    identity_experts=lambda config: config_value(config, "moe.identity_experts", default=0),
    router_settings=_native,
    expert_settings=_native_experts,
    is_moe_layer=_native_sparse_layer,
    hash_routed=lambda config, i: _native_config(config).moe.router == "hash",
    layer_prefix="layers.{n}.",
    num_layers=("n_layers",),
    hidden_size=("dim",),
    expert_width=("moe.hidden_dim",),
    block_returns="moelab",
    layer_returns_tuple=True,
)
"""moelab's own checkpoints (`moelab.models.save_pretrained`): recognised by a config.json with
no model_type and a `moe` section."""

_MOE_WIDTH = ("moe_intermediate_size",)

# fmt: off
_FAMILIES = (
    Family("gemma4_text", layouts=(_GEMMA4_LAYOUT,), num_experts=("num_experts",), router_settings=_gemma4,
           expert_settings=_gemma4_experts, is_moe_layer=_gemma4_sparse_layer, expert_width=_MOE_WIDTH,
           inline_routed_norm="post_feedforward_layernorm_2"),
    Family("mixtral", layouts=_w1w3w2_layouts("mlp.gate.weight"),
           num_experts=("num_local_experts", "num_experts"), router_settings=_softmax_renormalized),
    Family("phimoe", layouts=_w1w3w2_layouts("mlp.router.weight"), num_experts=("num_local_experts",),
           router_settings=_sparsemixer),
    Family("qwen2_moe", layouts=_qwen2_moe_layouts(shared=_QWEN2_SHARED), num_experts=("num_experts",),
           router_settings=_softmax_norm_topk_prob, is_moe_layer=_qwen_sparse_layer, expert_width=_MOE_WIDTH),
    Family("qwen3_moe", layouts=_qwen2_moe_layouts(), num_experts=("num_experts", "num_local_experts"),
           router_settings=_softmax_norm_topk_prob, is_moe_layer=_qwen_sparse_layer, expert_width=_MOE_WIDTH),
    Family("olmoe", layouts=_qwen2_moe_layouts(), num_experts=("num_experts", "num_local_experts"),
           router_settings=_softmax_norm_topk_prob),
    Family("deepseek_v2", layouts=_qwen2_moe_layouts(shared=_shared("mlp.shared_experts")),
           num_experts=("n_routed_experts", "num_experts"),
           router_settings=_deepseek_v2, is_moe_layer=_deepseek_sparse_layer(default_first_dense=0),
           expert_width=_MOE_WIDTH, shared_width_follows=True),
    Family("unlimited_ocr_text", layouts=_qwen2_moe_layouts(shared=_shared("mlp.shared_experts")),
           num_experts=("n_routed_experts", "num_experts"), router_settings=_deepseek_v2, is_moe_layer=_mlp_layer_types,
           expert_width=_MOE_WIDTH, shared_width_follows=True),
    Family("deepseek_v3",
           layouts=_qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias=_DEEPSEEK_BIAS),
           num_experts=("n_routed_experts", "num_local_experts"),
           router_settings=_deepseek_v3, is_moe_layer=_deepseek_sparse_layer(default_first_dense=3),
           expert_width=_MOE_WIDTH, shared_width_follows=True),
    # Mistral 4: DeepSeek-V3's fused layout, the only one (transformers has no conversion mapping for it)
    Family("mistral4", layouts=_qwen2_moe_layouts(_shared("mlp.shared_experts"))[1:], num_experts=("n_routed_experts",),
           router_settings=_mistral4, is_moe_layer=_deepseek_sparse_layer(default_first_dense=0),
           expert_width=_MOE_WIDTH, shared_width_follows=True),
    Family("mistral_large4_text", layouts=_mistral_large4_layouts(), num_experts=("n_routed_experts",),
           router_settings=_mistral_large4, is_moe_layer=_mlp_layer_types, expert_width=_MOE_WIDTH,
           shared_width_follows=True, stored_renames=_MISTRAL_LARGE4_RENAMES, original_prefix=""),
    Family("axk1", layouts=_axk1_layouts(), num_experts=("n_routed_experts", "num_local_experts"),
           router_settings=_deepseek_v3, is_moe_layer=_legacy_mlp_layer_types, expert_width=_MOE_WIDTH,
           shared_width_follows=True, block_output_norm="post_mlp_layernorm",
           stored_renames=(("mlp.post_mlp_layernorm", "post_mlp_layernorm"),)),  # stored beside the block
    Family("sarvam_moe", layouts=_sarvam_moe_layouts(), num_experts=("n_routed_experts", "num_experts"),
           router_settings=_deepseek_v3_router(n_group=1, topk_group=1),
           is_moe_layer=_deepseek_sparse_layer(default_first_dense=1), expert_width=_MOE_WIDTH,
           shared_width_follows=True, stored_renames=_SARVAM_RENAMES, stored_splits=_SARVAM_SPLITS),
    Family("exaone_moe", layouts=_exaone_moe_layouts(), num_experts=("num_experts",),
           router_settings=_exaone_moe, is_moe_layer=_mlp_layer_types, expert_width=_MOE_WIDTH,
           shared_width_follows=True),
    Family("kimi_linear", layouts=_kimi_linear_layouts(), num_experts=("num_experts", "num_local_experts"),
           router_settings=_kimi_linear, is_moe_layer=_mlp_layer_types, expert_width=_MOE_WIDTH,
           shared_width_follows=True, stored_renames=_KIMI_RENAMES, stored_shards=_KIMI_CONVOLUTIONS),
    Family("bailing_hybrid", layouts=_bailing_hybrid_layouts(), num_experts=("num_experts", "num_local_experts"),
           router_settings=_bailing_hybrid, is_moe_layer=lambda config, i: _mlp_layer_types(config, i, first_dense=2),
           expert_width=_MOE_WIDTH, shared_width_follows=True, stored_shards=_KIMI_CONVOLUTIONS),
    Family("aria_text", layouts=_ARIA_LAYOUTS, num_experts=("moe_num_experts",), router_settings=_aria,
           layer_activations=_aria_activations, shared_width_follows=True),
    Family("dots3_note_text",
           layouts=_qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias=_DEEPSEEK_BIAS),
           num_experts=("n_routed_experts", "num_local_experts"), router_settings=_dots3_note,
           is_moe_layer=_legacy_mlp_layer_types, expert_width=_MOE_WIDTH),
    Family("step3p5", layouts=_step3p5_layouts(), num_experts=("n_routed_experts", "moe_num_experts"),
           router_settings=_step3p5, is_moe_layer=_step3p5_sparse_layer, expert_settings=_silu_experts,
           layer_activations=_step3p5_activations,
           expert_width=_MOE_WIDTH, stored_renames=(("model.language_model.", "model."),)),
    Family("afmoe", layouts=_afmoe_layouts(), num_experts=("num_experts",), router_settings=_afmoe,
           is_moe_layer=_first_dense_layers("num_dense_layers", default=1), expert_width=_MOE_WIDTH,
           shared_width_follows=True),
    Family("lfm2_moe", layouts=_lfm2_moe_layouts(), num_experts=("num_experts",), router_settings=_lfm2_moe,
           is_moe_layer=_first_dense_layers("num_dense_layers", default=2), expert_settings=_silu_experts,
           expert_width=_MOE_WIDTH, selection_bias_flag="use_expert_bias"),
    Family("minimax_m2", layouts=_minimax_m2_layouts(), num_experts=("num_local_experts",),
           router_settings=_minimax_m2),
    Family("minimax_m3_vl_text", layouts=_minimax_m3_layouts(), num_experts=("num_local_experts",),
           router_settings=_minimax_m3, layer_activations=_minimax_m3_activations,
           is_moe_layer=lambda config, i: _mlp_layer_types({**config, "first_k_dense_replace": 0}, i, layer_freq=True),
           stored_renames=tuple((f"self_attn.indexer.{p}.", f"self_attn.index_{p}.") for p in ("q_proj", "k_proj", "q_norm", "k_norm")),
           stored_shards=(("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),), loads_multimodal=True),
    Family("hunyuan_v1_moe", layouts=_hunyuan_v1_moe_layouts(), num_experts=("num_experts", "num_local_experts"),
           router_settings=_hunyuan_v1_moe, shared_width_follows=True),
    Family("ernie4_5_moe", layouts=_ernie4_5_moe_layouts(), num_experts=("moe_num_experts", "num_experts"),
           router_settings=_ernie4_5_moe, is_moe_layer=_ernie_sparse_layer, expert_width=_MOE_WIDTH,
           shared_width_follows=True),
    # ERNIE-4.5-VL's language model: its text experts and router (ERNIE 4.5's) as the MoE block; its
    # vision experts and router, which moe_num_experts sizes too, copied as they are
    Family("ernie4_5_vl_moe_text", layouts=_ernie4_5_vl_moe_layouts(), num_experts=("moe_num_experts", "num_experts"),
           router_settings=_ernie4_5_moe, is_moe_layer=_first_layer_dense, expert_width=("moe_intermediate_size.0",),
           shared_width_follows=True, moe_block="mlp.text_moe", vision_block="mlp.vision_moe", block_returns="flat",
           expert_count_shared_with="the vision experts (mlp.vision_moe)",
           routed_elsewhere=("mlp.vision_moe.experts.gate_up_proj", "mlp.vision_moe.experts.down_proj")),
    Family("hy_v3", layouts=_hy_v3_layouts(), num_experts=("num_experts", "num_local_experts"),
           router_settings=_hy_v3, is_moe_layer=_first_layer_dense, expert_width=_MOE_WIDTH,
           shared_width_follows=True),
    Family("hy_v4", layouts=_hy_v4_layouts(), num_experts=("n_routed_experts", "num_local_experts"),
           router_settings=_deepseek_v3_router(n_group=1, topk_group=1, route_scale=2.827),
           expert_settings=_hy_v4_experts, is_moe_layer=_first_layer_dense, expert_width=_MOE_WIDTH,
           shared_width_follows=True),
    Family("deepseek_v4", layouts=_deepseek_v4_layouts(), num_experts=("n_routed_experts", "num_local_experts"),
           router_settings=_deepseek_v4, layer_activations=_gate_clamped_experts, hash_routed=_deepseek_v4_hash_layer,
           expert_width=_MOE_WIDTH, shared_width_follows=True, original_prefix="", mtp_prefix="mtp.{n}."),
    # GLM-5-Next (GLM-5.3-Flash, through its glm5_next_text language model): DeepSeek-V3's router and
    # layout, clamped experts, hyper-connections, KDA linear-attention and indexed-attention layers
    Family("glm5_next_text",
           layouts=_qwen2_moe_layouts(_shared("mlp.shared_experts"), selection_bias=_DEEPSEEK_BIAS),
           num_experts=("n_routed_experts", "num_local_experts"),
           router_settings=_deepseek_v3_router(n_group=1, topk_group=1), layer_activations=_gate_clamped_experts,
           is_moe_layer=_glm5_next_sparse_layer,
           expert_width=_MOE_WIDTH, shared_width_follows=True, stored_shards=_KIMI_CONVOLUTIONS),
    Family("laguna", layouts=_laguna_layouts(), num_experts=("num_experts",), router_settings=_laguna,
           is_moe_layer=_first_layer_dense, expert_width=_MOE_WIDTH),
    Family("kolibri1", layouts=_kolibri1_layouts(), num_experts=("num_local_experts", "num_experts"),
           router_settings=_kolibri1, expert_width=_MOE_WIDTH, stored_renames=_KOLIBRI1_RENAMES),
    Family("flint", layouts=_qwen2_moe_layouts(_shared("mlp.shared_expert")), num_experts=("num_experts",),
           router_settings=_sigmoid_norm_topk_prob, is_moe_layer=_flint_sparse_layer, expert_width=_MOE_WIDTH,
           stored_renames=(("self_attn.sinks", "self_attn.softmax_offset"),)),
    Family("cohere2_moe", layouts=_qwen2_moe_layouts(_shared("mlp.shared_experts")), num_experts=("num_experts",),
           router_settings=_cohere2_moe, is_moe_layer=lambda config, i: _mlp_layer_types(config, i, first_dense=0),
           layer_activations=_cohere2_moe_activations, shared_width_follows=True, dense_width_follows=True),  # dense layers: prefix_dense_intermediate_size or it
    Family("jamba", layouts=_jamba_layouts(), num_experts=("num_experts",), router_settings=_softmax_top_k,
           is_moe_layer=_jamba_sparse_layer, dense_width_follows=True),
    Family("nemotron_h", layouts=_nemotron_h_layouts(), num_experts=("n_routed_experts", "num_local_experts"),
           router_settings=_nemotron_h, is_moe_layer=_nemotron_h_sparse_layer, expert_settings=_nemotron_h_experts,
           num_layers=("layers_block_type", "hybrid_override_pattern", "num_hidden_layers"),
           expert_width=_MOE_WIDTH, original_prefix="backbone."),
    Family("gpt_oss",
           layouts=(Layout(RouterKeys("mlp.router.weight", bias="mlp.router.bias"), _GPT_OSS_EXPERTS),),
           num_experts=("num_local_experts", "num_experts"),
           router_settings=_softmax_renormalized, expert_settings=_gpt_oss_experts, block_returns="tuple"),
    Family("granitemoe", layouts=_granite_layouts(), num_experts=("num_local_experts",),
           router_settings=_softmax_renormalized),
    Family("granitemoeshared", layouts=_granite_layouts(_GRANITE_SHARED), num_experts=("num_local_experts",),
           router_settings=_softmax_renormalized),
    Family("granitemoehybrid", layouts=_granite_layouts(_GRANITE_SHARED), num_experts=("num_local_experts",),
           router_settings=_softmax_renormalized,
           is_moe_layer=lambda config, i: config_value(config, "num_local_experts", default=0) > 0),
    # LongCat-Flash: each decoder layer's MoE block (mlp, beside its two dense mlps) also chooses
    # among zero_expert_num identity experts (class default 256)
    Family("longcat_flash", layouts=_LONGCAT_LAYOUTS, num_experts=("n_routed_experts",), router_settings=_longcat_flash,
           identity_experts=lambda config: config_value(config, "zero_expert_num", default=256) or 0,
           num_layers=("num_layers",), expert_width=("expert_ffn_hidden_size",), moe_block="mlp"),
    Family("jetmoe", layouts=(_JETMOE_LAYOUT,), num_experts=("num_local_experts",),
           router_settings=_softmax_renormalized, expert_settings=_jetmoe_experts, moe_block="mlp",
           expert_count_shared_with="the attention's experts (self_attention.experts)",
           routed_elsewhere=("self_attention.experts.input_linear.weight", "self_attention.experts.output_linear.weight")),
    # ZAYA: an MLP router carrying its state from layer to layer (the block reads the previous layer's
    # router state and hands its own on) over E experts and one skip expert, which adds nothing
    Family("zaya", layouts=(_ZAYA_LAYOUT,), num_experts=("num_experts",), router_settings=_zaya,
           identity_experts=lambda config: 1, identity_returns="zero", identity_selection_bias=-1.0,
           expert_width=_MOE_WIDTH,
           block_returns="router_states"),
    # Inkling 2 (through its inkling2_text language model): every layer's mlp; attention residuals over
    # blocks of layers (block_states), carried by the layer-by-layer runs (`LayerwiseModel.carry`)
    Family("inkling2_text", layouts=_INKLING2_LAYOUTS, num_experts=("n_routed_experts", "num_local_experts"),
           router_settings=_inkling2, expert_settings=_inkling2_experts, expert_width=_MOE_WIDTH,
           original_prefix="model.llm."),
    # Muse Spark (through its muse_spark_text language model): the mlp of the layers mlp_layer_types makes "sparse"
    Family("muse_spark_text", layouts=(_MUSE_SPARK_LAYOUT,), num_experts=("num_local_experts",),
           router_settings=_muse_spark, is_moe_layer=lambda config, i: _mlp_layer_types(config, i, first_dense=0),
           expert_width=_MOE_WIDTH),
    Family("llama4_text",
           layouts=(Layout(RouterKeys("feed_forward.router.weight"), _LLAMA4_EXPERTS,
                           _shared("feed_forward.shared_expert")),),
           num_experts=("num_local_experts",),
           router_settings=_llama4, is_moe_layer=_llama4_sparse_layer, expert_settings=_llama4_experts,
           block_returns="tuple", shared_width_follows=True),
    Family("dbrx", layouts=(Layout(RouterKeys("ffn.router.layer.weight"), _DBRX_EXPERTS),),
           num_experts=("ffn_config.moe_num_experts",),
           router_settings=_dbrx, expert_settings=_dbrx_experts,
           layer_prefix="transformer.blocks.{n}.", num_layers=("n_layers",), hidden_size=("d_model",),
           expert_width=("ffn_config.ffn_hidden_size",)),
)
# fmt: on
FAMILIES: dict[str, Family] = {family.name: family for family in _FAMILIES}
# Hunyuan 4 VL's language model: Hunyuan 4's modules under another model_type
FAMILIES["hy_v4_vl_text"] = dataclasses.replace(FAMILIES["hy_v4"], name="hy_v4_vl_text")
# Inkling 2 Loop's language model: Inkling 2's decoder layers, some of them run several times a forward
FAMILIES["inkling2_loop_text"] = dataclasses.replace(FAMILIES["inkling2_text"], name="inkling2_loop_text")
# DeepSeek-OCR 2's language model: Unlimited OCR's modules (DeepSeek-V2's router and MLPs, Llama's
# attention), its MoE layers named by mlp_layer_types only
FAMILIES["deepseek_ocr2_text"] = dataclasses.replace(
    FAMILIES["unlimited_ocr_text"], name="deepseek_ocr2_text", is_moe_layer=_deepseek_ocr2_sparse_layer
)
# Qwen3-Omni-MoE's thinker's language model: Qwen3-MoE's modules, norm_topk_prob true unless config.json says not
FAMILIES["qwen3_omni_moe_text"] = dataclasses.replace(
    FAMILIES["qwen3_moe"], name="qwen3_omni_moe_text",
    router_settings=lambda config: _softmax_norm_topk_prob({"norm_topk_prob": True, **config}),
)  # fmt: skip


# model_types whose MoE blocks compute what moelab's views cannot express: refused by name, with why
_REFUSED: dict[str, str] = {}


def family_of(config: Config, checkpoint: Checkpoint, wrapper: str | None = None) -> Family | None:
    """The adapter for this config.json (its language model's settings: `language_config`), None if
    neither a table nor the fallback fits; wrapper: the model_type of the multimodal model around the
    language model, whose renames transformers applies first (Hunyuan 4 VL's text stored under
    `model.`, held under `model.language_model.`)."""
    if "model_type" not in config and isinstance(config.get("moe"), dict):
        return NATIVE
    if (why := _REFUSED.get(config.get("model_type"))) is not None:
        raise CheckpointError(f"model_type {config['model_type']!r} is not supported: {why}")
    family = FAMILIES.get(config.get("model_type"))
    family = family.stored_as(checkpoint) if family else structural_family(config, checkpoint)
    if family is None:
        return None
    # the names transformers' conversion mapping renames on loading, for the runs that read tensors by name
    renamed = renamed_on_loading((wrapper, config.get("model_type")), checkpoint.keys())
    family = dataclasses.replace(family, stored_renames=(*family.stored_renames, *renamed)) if renamed else family
    return family.with_mtp(checkpoint, config)


def open_checkpoint(path: str | os.PathLike) -> ModelView:
    """Open a local transformers checkpoint directory (config.json + safetensors) as a ModelView.

    The adapter is chosen by config.json's model_type (a moelab checkpoint has none and a `moe`
    section); an unknown model_type gets a structural fallback (router and experts found by name
    and shape) where the checkpoint allows one, refused where its reading may be wrong (see
    `moelab.hf.fallback`: checked against transformers' own MoE block where transformers knows the
    model_type).
    Quantized checkpoints read as their dequantized weights (`open_weights`): block-wise FP8,
    compressed-tensors FP8 and GPT-OSS's MXFP4; others are refused: their experts are not plain weights.
    Tensors are read later, one layer at a time. `path` may be a shipped model's name.
    """
    config, checkpoint, family = resolve(model_dir(path))
    return ModelView(checkpoint, config, family, family.layer_count(config))


def open_weights(path: Path, config: Config, dtype: torch.dtype | None = None) -> Checkpoint:
    """The weights of checkpoint `path` (config.json `config`): plain ones as stored, quantized ones
    read as plain (`moelab.hf.quantized`) in `dtype` (default: the one config.json states); a
    quantization moelab does not read is refused with what to do."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return Checkpoint(path)
    if not isinstance(quantization, dict):
        raise CheckpointError(
            f"{path / 'config.json'}: quantization_config is {quantization!r}; transformers and moelab read an object "
            "with a quant_method (remove it if the weights are plain)"
        )
    method = quantization.get("quant_method", "unknown")
    dtype = dtype or stated_dtype(config)
    if method in FLOAT8_METHODS:
        return Float8Checkpoint(path, float8_scheme(config, path), dtype)
    if method == "mxfp4":
        return Mxfp4Checkpoint(path, dtype)
    raise CheckpointError(
        f"{path / 'config.json'} describes a quantized checkpoint (quant_method {method!r}); moelab reads plain "
        "weights, float8 ones (quant_method 'fp8' or compressed-tensors FP8) and GPT-OSS's mxfp4. Dequantize it "
        "first, e.g. load it with transformers (dequantize=True where the method supports it) and save_pretrained "
        "the dense model"
    )


def check_checkpoint_dir(path: Path, kind: str = "a checkpoint directory (moelab's or a transformers family's)") -> None:
    """Refuse `path` unless it is a directory with a config.json, naming what it is instead and the
    `kind` of directory to pass."""
    if not (path / "config.json").exists():
        what = (
            f"no such directory {path}" if not path.exists()
            else f"{path} is a file, not a directory" if not path.is_dir()
            else f"no config.json in {path}"
        )  # fmt: skip
        raise CheckpointError(f"{what}; pass {kind}")


def resolve(path: str | os.PathLike) -> tuple[Config, Checkpoint, Family]:
    """(config.json, lazy checkpoint, adapter) of a local checkpoint directory; see `open_checkpoint`."""
    path = Path(path)
    config_path = path / "config.json"
    check_checkpoint_dir(path)
    stored = read_json_object(config_path, "a model config", error=CheckpointError)
    config = language_config(stored)
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"{config_path}: model_type must be a string such as 'mixtral', got {model_type!r}")
    checkpoint = open_weights(path, config)
    try:
        wrapper = stored.get("model_type") if stored is not config else None
        whole = isinstance(wrapper, str) and isinstance(model_type, str) and runs_whole(wrapper, model_type)
        family = family_of(config, checkpoint, loaded_as(stored) if whole else None)
    except BaseException:
        checkpoint.close()
        raise
    if family is None:
        checkpoint.close()
        if not names_experts(config):
            raise CheckpointError(
                f"{config_path} (model_type {model_type!r}) describes a model without MoE layers: none of its settings "
                "names experts (num_experts, num_local_experts, ...); moelab opens Mixture-of-Experts checkpoints"
            )
        raise CheckpointError(
            f"model_type {model_type!r} in {config_path} is not a supported MoE family and no router/experts "
            f"tensors were found by name and shape. Supported families: {', '.join(sorted(FAMILIES))}"
        )
    return config, checkpoint, family
