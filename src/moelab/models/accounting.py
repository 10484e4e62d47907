"""Parameter and FLOP accounting from a `ModelConfig` alone (no model is built).

Symbols: V vocabulary, D model dim, L layers, H query heads, G key/value heads, Dh head dim,
F dense FFN width, E experts, I expert width, Is shared-expert width, S sequence length,
k experts per token.

Conventions:
- total params: every parameter once (a tied LM head shares the embedding's table), equal to
  `sum(p.numel() for p in MoETransformer(config).parameters())`. Buffers (RoPE tables, the
  aux-loss-free `expert_bias`) are not parameters.
- active params: the parameters one token uses. Routed experts count k of E per MoE layer;
  everything else (attention, routers, shared experts, dense FFNs, norms, and the vocabulary
  tables) counts in full.
- non-embedding: without the vocabulary tables (token embedding and LM head, one table if tied),
  so tied and untied models report the same non-embedding counts.
- k per MoE layer: the measured mean experts per token when given (`MoEResult.experts_per_token`),
  else the nominal value: top_k for "topk", ec_capacity_factor for "expert_choice" (its average),
  and the upper bound (max_k, or E) for "topp" and "relu", whose k depends on the data - pass
  measured values for those. Capacity dropping is ignored (counts are before dropping).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moelab.models.config import ModelConfig
from moelab.nn import MoEConfig


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters by component, summed over layers (each includes its biases, if any):

    embedding V*D; lm_head V*D (0 if tied); attention L * D*Dh*(2H + 2G); norms (2L + 1) * D;
    dense_ffn 3*D*F per dense layer; and per MoE layer: router E*D (+ E bias, + E ReLU gain),
    routed_experts E * 3*D*I for SwiGLU or E * 2*D*I for a plain MLP (+ E*(2I + D) or E*(I + D)
    biases), shared_experts 3*D*Is (+ D for the shared gate).
    """
    D, V, L = config.dim, config.vocab_size, config.n_layers
    kinds = config.layer_kinds
    n_moe = kinds.count("moe")
    counts = {
        "embedding": V * D,
        "lm_head": 0 if config.tie_embeddings else V * D,
        "attention": L * D * config.head_dim * 2 * (config.n_heads + config.n_kv_heads),
        "norms": (2 * L + 1) * D,
        "dense_ffn": kinds.count("dense") * 3 * D * config.dense_hidden_dim,
        "router": 0,
        "routed_experts": 0,
        "shared_experts": 0,
    }
    if n_moe:
        moe = config.moe
        counts["router"] = n_moe * moe.num_experts * (D + moe.router_bias + (moe.router == "relu"))
        counts["routed_experts"] = n_moe * moe.num_experts * _expert_params(moe)
        counts["shared_experts"] = n_moe * _shared_params(moe)
    return counts


def _expert_params(moe: MoEConfig) -> int:
    """One routed expert's parameters."""
    D, I = moe.dim, moe.hidden_dim
    if moe.activation == "swiglu":
        return 3 * D * I + (2 * I + D) * moe.expert_bias
    return 2 * D * I + (I + D) * moe.expert_bias


def _shared_params(moe: MoEConfig) -> int:
    if not moe.num_shared:
        return 0
    width = moe.shared_hidden_dim or moe.num_shared * moe.hidden_dim
    return 3 * moe.dim * width + moe.dim * moe.shared_gate


def nominal_experts_per_token(moe: MoEConfig) -> float:
    """k a config implies: top_k, ec_capacity_factor, or the cap of a data-dependent router."""
    if moe.router == "topk":
        return moe.top_k
    if moe.router == "expert_choice":
        return moe.ec_capacity_factor
    if moe.router == "topp" and moe.max_k is not None:
        return moe.max_k
    return moe.num_experts  # top-p without a cap, or ReLU: data-dependent, at most E


def experts_per_token_by_layer(
    config: ModelConfig, experts_per_token: Mapping[int, float] | None = None
) -> dict[int, float]:
    """k for every MoE layer index: the measured value where given, else the nominal one.

    experts_per_token: measured mean experts per token by MoE layer index, e.g.
    `{i: r.experts_per_token.item() for i, r in output.moe_results.items()}`.
    """
    layers = [i for i, kind in enumerate(config.layer_kinds) if kind == "moe"]
    measured = dict(experts_per_token or {})
    for i, k in measured.items():
        if i not in layers:
            raise ValueError(
                f"experts_per_token has layer {i}, which is not an MoE layer; MoE layers: {layers}"
            )
        if not 0 <= k <= config.moe.num_experts:
            raise ValueError(
                f"experts_per_token[{i}] = {k} must lie in [0, num_experts={config.moe.num_experts}]"
            )
    return {i: float(measured.get(i, nominal_experts_per_token(config.moe))) for i in layers}


def count_params(config: ModelConfig) -> int:
    """Total parameters (see the module docstring)."""
    return sum(param_counts(config).values())


def active_params(
    config: ModelConfig, experts_per_token: Mapping[int, float] | None = None, *, embeddings: bool = True
) -> int:
    """Parameters one token uses: routed experts count k/E per MoE layer (k measured per layer where
    given, else nominal). `embeddings=False` leaves out the vocabulary tables (non-embedding)."""
    counts = param_counts(config)
    ks = experts_per_token_by_layer(config, experts_per_token)
    active = sum(counts.values()) - counts["routed_experts"]
    if ks:
        per_layer = config.moe.num_experts * _expert_params(config.moe)
        active += sum(k / config.moe.num_experts * per_layer for k in ks.values())
    if not embeddings:
        active -= counts["embedding"] + counts["lm_head"]
    return round(active)


def flops_per_token(
    config: ModelConfig, seq_len: int, experts_per_token: Mapping[int, float] | None = None
) -> int:
    """Forward FLOPs per token at context length seq_len:

        2 * (active non-embedding params - norm gains + V*D) + 4 * L * H * Dh * seq_len

    The first term is one multiply-add per active weight of every matmul: attention projections,
    routers, k experts, shared experts, dense FFNs and the LM head (V*D, tied or not; the embedding
    lookup is free). Biases, if any, are counted as weights (a negligible overcount). The second
    is attention scores QK^T and the weighted sum of V over the full seq_len (no discount for the
    causal mask, as in PaLM, nanoGPT and torchtitan). Training (forward + backward) is ~3x this.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    matmul = active_params(config, experts_per_token, embeddings=False) - param_counts(config)["norms"]
    matmul += config.vocab_size * config.dim
    attention = 4 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 2 * matmul + attention


def model_info(
    config: ModelConfig, *, seq_len: int | None = None, experts_per_token: Mapping[int, float] | None = None
) -> dict[str, Any]:
    """A JSON-ready summary: total_params, non_embedding_params, active_params,
    active_non_embedding_params, flops_per_token (at seq_len, default max_seq_len), seq_len,
    layer_types, experts_per_token (k used per MoE layer) and params_by_component."""
    seq_len = seq_len or config.max_seq_len
    counts = param_counts(config)
    total = sum(counts.values())
    return {
        "total_params": total,
        "non_embedding_params": total - counts["embedding"] - counts["lm_head"],
        "active_params": active_params(config, experts_per_token),
        "active_non_embedding_params": active_params(config, experts_per_token, embeddings=False),
        "flops_per_token": flops_per_token(config, seq_len, experts_per_token),
        "seq_len": seq_len,
        "layer_types": config.layer_kinds,
        "experts_per_token": experts_per_token_by_layer(config, experts_per_token),
        "params_by_component": counts,
    }
