"""Parameter and FLOP accounting from a `ModelConfig` alone (no model is built).

Symbols: V vocabulary, D model dim, L layers, H query heads, G key/value heads, Dh head dim,
F dense FFN width, E experts, I expert width, Is shared-expert width, S sequence length,
k experts per token.

Conventions:
- total params: every parameter once (a tied LM head shares the embedding's table), equal to
  `sum(p.numel() for p in MoETransformer(config).parameters())`. Buffers (RoPE tables, the
  aux-loss-free `selection_bias`) are not parameters.
- active params: the parameters one token uses. Routed experts count k of E per MoE layer;
  everything else (attention, routers, shared experts, dense FFNs, norms, and the vocabulary
  tables) counts in full.
- non-embedding: without the vocabulary tables (token embedding and LM head, one table if tied),
  so tied and untied models report the same non-embedding counts.
- k per MoE layer: the measured mean experts per token when given (`MoEResult.experts_per_token`),
  else the nominal value: top_k for "topk" (`computed_experts_target` where a computation budget
  sets it), "hash" and the graph routers, ec_capacity_factor for
  "expert_choice" (its average), and the upper bound (max_k, or E) for "topp" and "relu", whose
  k depends on the data - pass measured values for those. Capacity dropping is ignored (counts
  are before dropping).
- Chain-of-Experts (C iterations): k counts the expert calls of all iterations (nominal C *
  top_k); C routers; shared experts and latent projections run C times (FLOPs), but their
  parameters count once. Active routed parameters are min(k, E) experts.
- ReXMoE: a group's pool of r*E experts counts once (E per layer); each router has r*E outputs;
  k experts of the pool are active.
- Mixture of Latent Experts: experts of dim R (3*R*I each) plus the shared projections 2*D*R.
- Graph-of-tokens: "graph_sim" adds its D*D similarity (if learned) and, per token, S*(D + E)
  multiply-adds for the token graph; "graph_attn" adds S*H*(Dh + E) (attention(Q, K, P)).
- UoE: the attention projections count attn_top_k / H of 4*D^2 and the MLP experts mlp_top_k /
  E of 3*D*F as active (exact in causal selection, where every token takes exactly k); each
  head attends over its share f = attn_top_k / H of the tokens, so the score terms are
  2 * attn_top_k * f * Dh * S multiply-adds per token. Reference selection pads every head to
  the largest routed count, so it spends more than this nominal value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moelab.models.config import ModelConfig
from moelab.nn import MoEConfig
from moelab.nn.config import TOP_K_ROUTERS

COMPONENTS = (
    "embedding", "lm_head", "attention", "norms", "dense_ffn", "router", "routed_experts", "shared_experts", "latent",
)


@dataclass
class _Cost:
    """One part of the model: parameters by component, the active share of them, multiply-adds
    per token of its matmuls (`macs`) and of its sequence-length terms (`seq_macs` * S)."""

    params: dict[str, float] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)
    macs: float = 0.0
    seq_macs: float = 0.0

    def add(self, component: str, params: float, active: float | None = None, uses: float = 1.0) -> None:
        """`params` of `component`, of which `active` are used per token (default all), each
        used `uses` times (CoE iterations) by a matmul."""
        active = params if active is None else active
        self.params[component] = self.params.get(component, 0) + params
        self.active[component] = self.active.get(component, 0) + active
        self.macs += uses * active


def _expert_params(moe: MoEConfig) -> int:
    """One routed expert's parameters (dim R for latent experts)."""
    D, I = moe.expert_dim, moe.hidden_dim
    if moe.activation == "swiglu":
        return 3 * D * I + (2 * I + D) * moe.expert_mlp_bias
    return 2 * D * I + (I + D) * moe.expert_mlp_bias


def _shared_params(moe: MoEConfig) -> int:
    if not moe.num_shared:
        return 0
    width = moe.shared_hidden_dim or moe.num_shared * moe.hidden_dim
    return 3 * moe.dim * width + moe.dim * moe.shared_gate


def _attention(config: ModelConfig, cost: _Cost) -> None:
    D, Dh, H = config.dim, config.head_dim, config.n_heads
    cost.add("attention", D * Dh * 2 * (H + config.n_kv_heads))
    cost.seq_macs += 2 * H * Dh


def _moe(config: ModelConfig, k: float, cost: _Cost) -> None:
    moe = config.moe
    D, C, R = config.dim, moe.chain_iterations, moe.num_router_experts
    router = (R + moe.identity_experts) * (D + moe.router_bias + (moe.router == "relu"))
    if moe.router == "graph_sim":
        router += D * D * moe.graph_learned
        cost.seq_macs += C * (D + R)
    if moe.router == "graph_attn":
        cost.seq_macs += C * config.n_heads * (config.head_dim + R)
    cost.add("router", C * router, uses=1)
    expert = _expert_params(moe)
    cost.add("routed_experts", moe.num_experts * expert, min(k, R) * expert, uses=0)
    cost.macs += k * expert
    cost.add("shared_experts", _shared_params(moe), uses=C)
    if moe.latent_dim is not None:
        cost.add("latent", 2 * D * moe.latent_dim, uses=C)


def _uoe(config: ModelConfig, cost: _Cost) -> None:
    uoe, D, H, Dh = config.uoe, config.dim, config.n_heads, config.head_dim
    E, F = uoe.mlp_experts, config.dense_hidden_dim
    cost.add("attention", 4 * D * D, uoe.attn_top_k / H * 4 * D * D)
    cost.seq_macs += 2 * uoe.attn_top_k**2 / H * Dh
    for experts, selection in ((H, uoe.attn_expert_top_k), (E, uoe.mlp_expert_top_k)):
        cost.add("router", experts * (D + uoe.router_bias) + experts * D * (selection is not None))
    cost.add("routed_experts", 3 * D * F, uoe.mlp_top_k / E * 3 * D * F)


def _costs(config: ModelConfig, experts_per_token: Mapping[int, float] | None) -> _Cost:
    """The whole model's cost (vocabulary tables included, their matmul not)."""
    D, V = config.dim, config.vocab_size
    ks = experts_per_token_by_layer(config, experts_per_token)
    cost = _Cost(params=dict.fromkeys(COMPONENTS, 0), active=dict.fromkeys(COMPONENTS, 0))
    cost.add("embedding", V * D, uses=0)
    cost.add("lm_head", 0 if config.tie_embeddings else V * D, uses=0)
    cost.add("norms", (2 * config.n_layers + 1) * D, uses=0)
    for i, kind in enumerate(config.layer_kinds):
        if kind == "uoe":
            _uoe(config, cost)
            continue
        _attention(config, cost)
        if kind == "moe":
            _moe(config, ks[i], cost)
        else:
            cost.add("dense_ffn", 3 * D * config.dense_hidden_dim)
    return cost


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters by component, summed over layers (each includes its biases, if any):

    embedding V*D; lm_head V*D (0 if tied); attention L * D*Dh*(2H + 2G); norms (2L + 1) * D;
    dense_ffn 3*D*F per dense layer; and per MoE layer: router E*D (+ E bias, + E ReLU gain; C
    of them for Chain-of-Experts, r*E outputs for ReXMoE, + D*D graph similarity), routed_experts
    E * 3*D*I for SwiGLU or E * 2*D*I for a plain MLP (+ E*(2I + D) or E*(I + D) biases; D -> R
    for latent experts), shared_experts 3*D*Is (+ D for the shared gate), latent 2*D*R. A UoE
    layer counts 4*D^2 attention, its routers, and 3*D*F routed experts.
    """
    return {name: round(value) for name, value in _costs(config, None).params.items()}


def nominal_experts_per_token(moe: MoEConfig) -> float:
    """k a config implies (all Chain-of-Experts iterations together): top_k (the computation
    budget's target where set: the average its bias steers to), ec_capacity_factor, or the cap of a
    data-dependent router."""
    if moe.router in TOP_K_ROUTERS:
        k = moe.top_k if moe.computed_experts_target is None else moe.computed_experts_target
    elif moe.router == "expert_choice":
        k = moe.ec_capacity_factor
    elif moe.router == "topp" and moe.max_k is not None:
        k = moe.max_k
    else:
        k = moe.num_experts  # top-p without a cap, or ReLU: data-dependent, at most E
    return moe.chain_iterations * k


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
        limit = config.moe.chain_iterations * config.moe.num_router_experts
        if not 0 <= k <= limit:
            raise ValueError(
                f"experts_per_token[{i}] = {k} must lie in [0, num_experts={limit}]"
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
    active = _costs(config, experts_per_token).active
    if not embeddings:
        active = {name: value for name, value in active.items() if name not in ("embedding", "lm_head")}
    return round(sum(active.values()))


def flops_per_token(
    config: ModelConfig, seq_len: int, experts_per_token: Mapping[int, float] | None = None
) -> int:
    """Forward FLOPs per token at context length seq_len:

        2 * (matmul multiply-adds per token + V*D) + 2 * (sequence multiply-adds per position) * seq_len

    The first term is one multiply-add per weight use of every matmul: attention projections,
    routers, k experts, shared experts, dense FFNs and the LM head (V*D, tied or not; the embedding
    lookup is free); for a plain model this is the active non-embedding parameters less the norm
    gains. Biases, if any, are counted as weights (a negligible overcount). The second is
    attention scores QK^T and the weighted sum of V, 4 * L * H * Dh * seq_len for plain
    attention, over the full seq_len (no discount for the causal mask, as in PaLM, nanoGPT and
    torchtitan), plus the token graphs of graph-of-tokens routing. Training (forward +
    backward) is ~3x this.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    cost = _costs(config, experts_per_token)
    return round(2 * (cost.macs + config.vocab_size * config.dim) + 2 * cost.seq_macs * seq_len)


def model_info(
    config: ModelConfig, *, seq_len: int | None = None, experts_per_token: Mapping[int, float] | None = None
) -> dict[str, Any]:
    """A JSON-ready summary: total_params, non_embedding_params, active_params,
    active_non_embedding_params, flops_per_token (at seq_len, default max_seq_len), seq_len,
    layer_types, experts_per_token (k used per MoE layer) and params_by_component."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
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
