"""Export a moelab MoETransformer checkpoint in a standard transformers family's format.

Shape legend: D model dim, E experts, I expert hidden dim, Is shared-expert width.

moelab's decoder (pre-RMSNorm blocks, causal GQA attention with rotate-half RoPE, SwiGLU dense
or top-k softmax MoE FFNs, optional shared expert and tied embeddings) is, weight for weight:

- "qwen2_moe": any such model. Dense layers go to `mlp_only_layers`; renormalisation to
  `norm_topk_prob`. Qwen2-MoE always has q/k/v biases (written as zeros) and a sigmoid-gated
  shared expert: an ungated moelab shared expert gets a zero gate (sigmoid(0) = 1/2) and twice
  its down projection, a model without one a zero shared expert of width 1. Both are exact.
- "mixtral": every layer MoE, renormalised top-k, no shared expert.

Anything else (sigmoid scores, group limits, route scaling, router or expert biases, the
aux-loss-free selection bias, capacity dropping, other routers or activations) has no exact
counterpart in these families, and `export_checkpoint` refuses it with the reasons. The export
is checked before it is reported: transformers loads it strictly and its logits match moelab's
to 1e-4.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from moelab.data.tokenizer import TOKENIZER_DIR, load_tokenizer
from moelab.files import read_json_object
from moelab.hf.adapters import FAMILIES, NATIVE, resolve
from moelab.hf.checkpoint import CheckpointError, side_files
from moelab.hf.loading import load_causal_lm
from moelab.hf.postconditions import postcondition_error
from moelab.hf.view import MoELayerView, SharedView, check_no_layers_beyond
from moelab.io import StagedOutput, atomic_write_text, check_output_dir, copy_side_file, save_safetensors
from moelab.models.config import ModelConfig
from moelab.models.pretrained import CHECKPOINT_KIND
from moelab.models.reference import model_dir as checkpoint_dir
from moelab.validation import did_you_mean

EXPORT_FAMILIES = ("qwen2_moe", "mixtral")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# moelab key <-> transformers key, for everything outside the MoE blocks ({i}: a layer, {attn}:
# an attention projection, {mlp}: a dense FFN projection)
NAME_PAIRS = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.{attn}_proj.weight", "model.layers.{i}.self_attn.{attn}_proj.weight"),
    ("layers.{i}.ffn.{mlp}_proj.weight", "model.layers.{i}.mlp.{mlp}_proj.weight"),
)
_FIELDS = {"i": r"\d+", "attn": "[qkvo]", "mlp": "gate|up|down"}


def renamed(key: str, *, to_transformers: bool) -> str | None:
    """`key`'s name on the other side of `NAME_PAIRS` (a moelab key's transformers name, or the
    reverse), None where it has none."""
    for pair in NAME_PAIRS:
        source, target = pair if to_transformers else pair[::-1]
        pattern = re.escape(source).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m[1]}>{_FIELDS[m[1]]})", pattern)
        if match := re.fullmatch(pattern, key):
            return target.format(**match.groupdict())
    return None


def export_problems(config: ModelConfig, family: str) -> list[str]:
    """Why `config`'s model cannot be written exactly as `family` (empty: it can)."""
    if family not in EXPORT_FAMILIES:
        raise ValueError(
            f"unknown export family {family!r}{did_you_mean(family, EXPORT_FAMILIES)}; choose one of "
            f"{list(EXPORT_FAMILIES)}"
        )
    moe, problems = config.moe, []
    if moe is None:
        uoe = "Union-of-Experts layers and " if "uoe" in config.layer_kinds else ""
        return [f"{uoe}no MoE layers (moelab exports MoE models only)"]
    checks = [
        (moe.router != "topk", f"router={moe.router!r} (only token-choice 'topk')"),
        (moe.activation != "swiglu", f"activation={moe.activation!r} (only 'swiglu')"),
        (moe.score_func != "softmax", f"score_func={moe.score_func!r} (only 'softmax')"),
        (moe.n_group != 1, f"group-limited routing n_group={moe.n_group}"),
        (moe.route_scale != 1.0, f"route_scale={moe.route_scale}"),
        (moe.router_bias, "a router bias"),
        (moe.expert_mlp_bias, "expert biases"),
        (moe.selection_bias, "the aux-loss-free selection bias (DeepSeek-V3 has one, but MLA attention)"),
        (moe.capacity_factor is not None, f"capacity dropping (capacity_factor={moe.capacity_factor})"),
        (moe.chain_iterations != 1, f"Chain-of-Experts iterations ({moe.chain_iterations})"),
        (moe.residual_from_norm, "residual_from_norm"),
        (moe.latent_dim is not None, f"latent experts (latent_dim={moe.latent_dim})"),
        (moe.identity_experts > 0, f"identity (zero-computation) experts (identity_experts={moe.identity_experts})"),
        (moe.reuse_layers != 1, f"experts shared across layers (reuse_layers={moe.reuse_layers})"),
        ("uoe" in config.layer_kinds, "Union-of-Experts layers"),
    ]
    if family == "mixtral":
        checks += [
            ("dense" in config.layer_kinds, "dense layers (Mixtral has MoE in every layer; use qwen2_moe)"),
            (moe.num_shared > 0, "a shared expert (Mixtral has none; use qwen2_moe)"),
            (moe.renormalize is False, "renormalize=False (Mixtral always renormalises; use qwen2_moe)"),
        ]
    problems += [what for bad, what in checks if bad]
    return problems


def export_checkpoint(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    family: str,
    *,
    tokenizer: str | os.PathLike | None = "auto",
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write the moelab checkpoint `model_dir` (`moelab.models.save_pretrained`) to the new
    directory `out` as a `family` checkpoint (see EXPORT_FAMILIES). tokenizer: "auto" (default)
    for the checkpoint's own tokenizer with the files beside it (generation config, chat template,
    ...: a model `moelab import` wrote keeps its own), or moelab's shipped tokenizer for a model of
    its vocabulary that has none (another is refused); a directory of tokenizer.json and friends;
    None for weights only.
    Refuses models that do not map exactly; checks the result against moelab's logits."""
    model_dir = checkpoint_dir(model_dir).resolve()  # a directory, or a shipped model's name
    check_output_dir(out, CHECKPOINT_KIND, inputs=[model_dir], overwrite=overwrite)
    tensors, hf_config = export_state(model_dir, family, tokenizer=tokenizer)  # the model's problems first
    tokenizer = export_tokenizer(model_dir, tokenizer)
    with StagedOutput(out, CHECKPOINT_KIND, inputs=[model_dir, tokenizer], overwrite=overwrite) as staging:
        save_safetensors(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(staging / "config.json", json.dumps(hf_config, indent=2) + "\n")
        if tokenizer == model_dir:
            for side in side_files(model_dir):
                copy_side_file(side, staging / side.name, model_dir)
        elif tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    copy_side_file(tokenizer / name, staging / name, tokenizer)
        _check_logits(model_dir, staging, quiet)
    return Path(out)


def export_tokenizer(model_dir: Path, tokenizer: str | os.PathLike | None) -> Path | None:
    """The tokenizer directory an export of `model_dir` takes (`export_checkpoint`'s rule)."""
    if tokenizer != "auto":
        return None if tokenizer is None else Path(tokenizer).resolve()
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return model_dir
    vocab = read_json_object(model_dir / "config.json", "a model config").get("vocab_size")
    shipped = load_tokenizer().get_vocab_size()
    if vocab != shipped:  # not a model of moelab's tokenizer (e.g. imported without its tokenizer)
        raise ValueError(
            f"{model_dir} has no tokenizer and its vocabulary ({vocab}) is not that of moelab's shipped tokenizer "
            f"({shipped}); pass its tokenizer (tokenizer=DIR, --tokenizer DIR), or export the weights alone "
            "(tokenizer=None, --no-tokenizer)"
        )
    return TOKENIZER_DIR.resolve()


def export_state(
    model_dir: str | os.PathLike,
    family: str,
    *,
    tokenizer: str | os.PathLike | None = "auto",
    fused: bool = False,
) -> tuple[dict[str, Tensor], dict]:
    """The moelab checkpoint `model_dir` as `family` tensors and its config.json dict, without
    writing anything; refuses models that do not map exactly. tokenizer: as `export_checkpoint`
    takes it (its bos/eos/pad ids go into the config). Tensors are named as
    `save_pretrained` writes them (per expert), or with `fused` as the transformers module's
    state_dict names them (stacked experts)."""
    if (Path(model_dir) / "config.json").is_file():  # the model's problems before its tensors: a model
        _check_exportable(Path(model_dir), family)  # without MoE layers is no checkpoint `resolve` opens
    config, ckpt, adapter = resolve(Path(model_dir))
    try:
        if adapter is not NATIVE:
            raise ValueError(f"{model_dir} is not a moelab checkpoint (its config.json has a model_type)")
        model_config = ModelConfig.from_dict(config)
        check_no_layers_beyond(ckpt, config, adapter, model_config.n_layers)
        token_ids = _token_ids(export_tokenizer(Path(model_dir), tokenizer), model_config.vocab_size)
        tensors, shared_width = _tensors(ckpt, config, family, fused)
        dtypes = collections.Counter(t.dtype for t in tensors.values() if t.is_floating_point())
        dtype = str(dtypes.most_common(1)[0][0]).removeprefix("torch.")  # as stored: bf16 stays bf16
        return tensors, _hf_config(model_config, family, shared_width, token_ids, dtype)
    finally:
        ckpt.close()


def _check_exportable(model_dir: Path, family: str) -> None:
    """Refuse the checkpoint `model_dir` by its config.json: a transformers one, or a moelab model
    that does not map exactly onto `family` (`export_problems`)."""
    config = read_json_object(model_dir / "config.json", "a model config")
    if "model_type" in config:
        raise ValueError(f"{model_dir} is not a moelab checkpoint (its config.json has a model_type)")
    if problems := export_problems(ModelConfig.from_dict(config), family):
        raise ValueError(f"{model_dir} cannot be exported exactly as {family}: it has " + "; ".join(problems))


def exported_model(model_dir: str | os.PathLike, family: str):
    """The transformers model (fp32, eval mode) of `export_state`, built in memory: what
    `export_checkpoint` would write and `from_pretrained` load, for side-by-side benchmarks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors, hf_config = export_state(model_dir, family, tokenizer=None, fused=True)
    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type", "dtype")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if hf_config["tie_word_embeddings"] else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"transformers' {family} model does not take the export: missing "
                              f"{sorted(set(missing) - tied)[:3]}, unused {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model.eval()


def _tensors(ckpt, config: dict, family: str, fused: bool) -> tuple[dict[str, Tensor], int]:
    """Every tensor under its `family` name (MoE blocks through the family's per-expert layout,
    or its fused in-memory one), and the shared-expert width written."""
    target = FAMILIES[family]
    # layouts[0]: the original per-expert format that default save_pretrained writes; [1]: fused
    layout = target.layouts[1 if fused else 0]
    tensors, shared_width = {}, 0
    moe_prefixes = []
    for index in range(config["n_layers"]):
        layer = NATIVE.read_layer(ckpt, config, index)
        if not isinstance(layer, MoELayerView):
            continue
        native_prefix, prefix = NATIVE.layer_prefix.format(n=index), target.layer_prefix.format(n=index)
        moe_prefixes.append(native_prefix + "ffn.")
        tensors |= layout.router.encode(layer.router, prefix) | layout.experts.encode(layer.experts, prefix)
        if layout.shared is not None:
            shared = _qwen2_shared(layer)
            shared_width = shared.gate.shape[0]
            tensors |= layout.shared.encode(shared, prefix)
    for key in ckpt.keys():
        if key.startswith(tuple(moe_prefixes)):
            continue
        name = renamed(key, to_transformers=True)
        if name is None:
            raise ValueError(
                f"the checkpoint tensor {key!r} has no counterpart in {family}; it cannot be exported"
            )
        tensors[name] = ckpt.get(key)
    if family == "qwen2_moe":  # Qwen2-MoE attention always has q/k/v biases
        for key in [
            k for k in tensors if re.fullmatch(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.weight", k)
        ]:
            weight = tensors[key]
            tensors[key.removesuffix("weight") + "bias"] = weight.new_zeros(weight.shape[0])
    return {k: t.contiguous() for k, t in tensors.items()}, shared_width


def _qwen2_shared(layer: MoELayerView) -> SharedView:
    """The layer's shared expert as Qwen2-MoE's sigmoid-gated one, computing the same thing."""
    shared, D = layer.shared, layer.experts.dim
    like = layer.experts.gate
    if shared is None:  # a zero expert of width 1 adds exactly 0
        return SharedView(
            like.new_zeros(1, D), like.new_zeros(1, D), like.new_zeros(D, 1), like.new_zeros(1, D)
        )
    if shared.sigmoid_gate is None:  # sigmoid(0) = 1/2, undone by doubling down (exact in binary)
        return SharedView(shared.gate, shared.up, 2 * shared.down, like.new_zeros(1, D))
    return shared


def hf_aux_loss_coef(balance_coef: float, top_k: int, moe_layers: int, *, inverse: bool = False) -> float:
    """transformers' router_aux_loss_coef that weighs the balance loss as moelab's `balance_coef`
    does (inverse=True: the other way). moelab sums E * sum_e f_e P_e over its MoE layers, f_e
    a share of the K * T assignments; transformers' Mixtral/Qwen2-MoE loss is E * sum_e f_e P_e
    once, f_e and P_e averaged over the layers and f_e counted per token (K choices each). Where
    the layers route alike, the losses agree for router_aux_loss_coef = balance_coef * L / K.
    Written to 12 digits; read back as the shortest decimal that is written so again, so that
    export and import each give back the coefficient the other was given."""
    if moe_layers == 0:
        return balance_coef
    scale = moe_layers / top_k
    if not inverse:
        return float(f"{balance_coef * scale:.12g}")
    exact = balance_coef / scale
    shortest = (float(f"{exact:.{digits}g}") for digits in range(1, 18))
    return next((c for c in shortest if hf_aux_loss_coef(c, top_k, moe_layers) == balance_coef), exact)


def _hf_config(cfg: ModelConfig, family: str, shared_width: int, token_ids: dict[str, int], dtype: str) -> dict:
    """config.json for `family`, written as JSON (legacy `rope_theta` beside `rope_parameters`,
    for older readers); dtype: the weights' ("float32", "bfloat16", ...)."""
    moe = cfg.moe
    common = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": hf_aux_loss_coef(moe.balance_coef, moe.top_k, cfg.layer_kinds.count("moe")),
        "dtype": dtype,
        **token_ids,
    }
    if family == "mixtral":
        return {
            **common,
            "intermediate_size": moe.hidden_dim,
            "num_local_experts": moe.num_experts,
            "sliding_window": None,
        }
    return {
        **common,
        "intermediate_size": cfg.dense_hidden_dim,
        "moe_intermediate_size": moe.hidden_dim,
        "shared_expert_intermediate_size": shared_width,
        "num_experts": moe.num_experts,
        "norm_topk_prob": moe.renormalize is not False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, kind in enumerate(cfg.layer_kinds) if kind == "dense"],
        "qkv_bias": True,
        "use_sliding_window": False,
    }


def _token_ids(tokenizer: str | os.PathLike | None, vocab_size: int) -> dict[str, int]:
    """bos/eos/pad ids of the tokenizer that goes with the export, checked against the vocab."""
    if tokenizer is None:
        return {}
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot read the tokenizer in {tokenizer} ({str(err).splitlines()[0]}); pass a directory of "
            "tokenizer.json and tokenizer_config.json, or tokenizer=None (--no-tokenizer) for weights only"
        ) from None
    if len(tok) > vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer} has {len(tok)} tokens but the model's vocab_size is "
            f"{vocab_size}; pass the tokenizer the model was trained with, or tokenizer=None for weights only"
        )
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {key: value for key, value in ids.items() if value is not None}


def _check_logits(model_dir: Path, staging: Path, quiet: bool) -> None:
    """transformers' logits of the export equal moelab's to 1e-4 (relative to their scale)."""
    from moelab.models import load_pretrained

    native = load_pretrained(model_dir).eval()
    try:
        exported = load_causal_lm(staging, quiet=quiet, dtype=torch.float32)
    except CheckpointError as err:
        raise postcondition_error(str(err)) from err
    cfg = native.config
    ids = torch.randint(
        0, cfg.vocab_size, (2, min(cfg.max_seq_len, 16)), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = native.float()(ids).logits
        got = exported(ids).logits
    scale = max(1.0, expected.abs().max().item())
    error = (got - expected).abs().max().item()
    if not torch.isfinite(got).all() or error > 1e-4 * scale:
        raise postcondition_error(
            f"the exported model's logits differ from moelab's by {error:.3g} (max |logit| {scale:.3g})"
        )
