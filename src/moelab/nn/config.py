"""`MoEConfig`: one serialisable description of an MoE layer, and `build_moe` to build it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moelab.nn.chain import ChainOfExperts
from moelab.nn.experts import ACTIVATIONS, Experts, MLPExperts, SharedExperts, SwiGLUExperts
from moelab.nn.graph_routing import AttentionRouter, SimilarityRouter
from moelab.nn.grouped import BACKENDS
from moelab.nn.latent import LatentProjection
from moelab.nn.moe import MoELayer
from moelab.nn.rexmoe import ReuseRouter
from moelab.nn.routers import (
    SCORE_FUNCS,
    ComputeBudget,
    ExpertChoiceRouter,
    HashRouter,
    ReLURouter,
    Router,
    TopKRouter,
    TopPRouter,
    check_groups,
    check_top_k,
    group_scoring,
    min_group_size,
)
from moelab.validation import check_choice, check_field_types, check_known_fields, is_positive_finite

ROUTERS = ("topk", "topp", "expert_choice", "relu", "graph_sim", "graph_attn", "hash")
TOP_K_ROUTERS = ("topk", "graph_sim", "graph_attn", "hash")
EXPERT_ACTIVATIONS = ("swiglu", *ACTIVATIONS)


@dataclass(kw_only=True)
class MoEConfig:
    """An MoE layer. Validated on construction; `to_dict`/`from_dict` round-trip through JSON/YAML.

    dim: model width D. num_experts: routed experts E. hidden_dim: each expert's width I.
    router: "topk" (token choice), "topp" (dynamic top-p), "expert_choice", "relu" (BlockFFN),
        "graph_sim" / "graph_attn" (similarity- / attention-aware graph-of-tokens routing,
        `moelab.nn.graph_routing`; they see the sequence, so they need input [B, S, D]), "hash"
        (Roller et al.'s hash layers, DeepSeek-V4's first layers: each token id's experts fixed by a
        random table, the gate only weighing them, `HashRouter`; the layer needs the token ids in
        its context, and the table the model's vocabulary: built by `moelab.models`).
    top_k: experts per token for "topk", "hash" and the graph routers.
    score_func, renormalize, route_scale: top-k scoring ("topk", "hash"); n_group, topk_group,
        group_score: "topk"'s expert groups (see TopKRouter; group_score None: by score_func).
        renormalize defaults to True for "topk" (Mixtral, Qwen3) and False for "topp" (the
        paper's raw probabilities). With top_k=1 it makes every weight 1, so the router learns from
        the auxiliary losses alone; Switch-style top-1 layers set renormalize=False.
    selection_bias: aux-loss-free balancing bias for "topk" (update it with
        `moelab.nn.attach_selection_bias_update`); bias_update_rate: its step size gamma.
    router_bias: a learned bias on the router logits (GPT-OSS).
    top_p, max_k: dynamic top-p threshold and cap. ec_capacity_factor: expert choice's average
        experts per token.
    activation: "swiglu" or a plain MLP activation; expert_mlp_bias: biases in the experts' MLPs.
    num_shared: always-on shared experts (fused to width num_shared * hidden_dim, or
        shared_hidden_dim if given); shared_gate: Qwen-style sigmoid gate on them.
    capacity_factor: None = dropless; else Switch/GShard token dropping.
    balance_coef, z_coef, entropy_coef: auxiliary-loss coefficients (balance_coef None: 0.01, or 0
        for expert choice, whose experts each take the same number of tokens: the loss is 1
        whatever the router does, with no gradient).
    locality_coef, chunk_sparsity_coef, chunk_len: BlockFFN's objectives (paper: 2e-3, 5e-2
        adaptive, 64).
    backend: expert MLP backend ("auto", "grouped", "loop", "grouped_mm", "triton"; see moelab.nn.grouped).
    chain_iterations: Chain-of-Experts iterations C (`moelab.nn.chain`), each with its own router
        over the same experts; 1 = a plain MoE layer.
    residual_from_norm: the block adds the FFN output to its *normalised* input and drops the
        pre-norm residual stream (CoE's reference code does this for its CoE and MoE runs alike);
        False (default) is the usual x + FFN(norm(x)). Read by `moelab.models`.
    graph_learned, graph_tau: "graph_sim"'s learned similarity W_s (else the identity) and its
        temperature (None = sqrt(dim)).
    latent_dim: Mixture of Latent Experts (`moelab.nn.latent`): experts work in a shared latent
        space of this rank R; hidden_dim is then their width in that space. None = off.
    reuse_layers: ReXMoE (`moelab.nn.rexmoe`): groups of this many consecutive MoE layers share
        a pool of reuse_layers * num_experts experts, each layer routing over the whole pool
        ("topk" only); 1 = off. Built by `moelab.models`.
    sparsity_window: chunk length L of the CLS metric reported for variable-k routers (paper: 8).
    identity_experts: Z zero-computation experts ("topk"; LongCat-Flash's, MoE++'s copy experts):
        the router chooses among num_experts + Z, and a slot on one of the Z returns the token's
        input times its weight, so a token may run fewer than top_k experts (`MoELayer`).
    computed_experts_target: LongCat-Flash's computation budget K_e (with identity_experts and
        selection_bias): the bias update steers the experts' average count per token to it, each
        expert's bias moved by bias_update_rate times the gap between its share of the slots and
        K_e / (top_k * num_experts), the identity experts' held (`moelab.nn.ComputeBudget`); the
        steps are shares (at most 1), not DeepSeek's signs: a rate of 0.1-1 moves as fast as 1e-3
        there. None: the bias balances every choice.
    """

    dim: int
    num_experts: int
    hidden_dim: int
    router: str = "topk"
    top_k: int = 2
    score_func: str = "softmax"
    renormalize: bool | None = None
    route_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str | None = None
    selection_bias: bool = False
    bias_update_rate: float = 1e-3
    router_bias: bool = False
    top_p: float = 0.4
    max_k: int | None = None
    ec_capacity_factor: float = 2.0
    activation: str = "swiglu"
    expert_mlp_bias: bool = False
    num_shared: int = 0
    shared_hidden_dim: int | None = None
    shared_gate: bool = False
    capacity_factor: float | None = None
    balance_coef: float | None = None
    z_coef: float = 0.0
    entropy_coef: float = 0.0
    locality_coef: float = 0.0
    chunk_sparsity_coef: float = 0.0
    chunk_len: int = 64
    backend: str = "auto"
    chain_iterations: int = 1
    residual_from_norm: bool = False
    graph_learned: bool = True
    graph_tau: float | None = None
    latent_dim: int | None = None
    reuse_layers: int = 1
    sparsity_window: int = 8
    identity_experts: int = 0
    computed_experts_target: float | None = None

    def __post_init__(self):
        check_field_types(self)
        if self.balance_coef is None:
            self.balance_coef = 0.0 if self.router == "expert_choice" else 0.01
        for name in ("dim", "num_experts", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        check_choice("router", self.router, ROUTERS)
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_choice("activation", self.activation, EXPERT_ACTIVATIONS)
        check_choice("backend", self.backend, tuple(BACKENDS))
        if self.identity_experts < 0:
            raise ValueError(f"MoEConfig.identity_experts must be >= 0 (0 turns them off), got {self.identity_experts}")
        if self.router in TOP_K_ROUTERS:
            check_top_k(self.top_k, self.num_choices)
        if self.router == "topk":
            group_scoring(self.score_func, self.group_score)
            # groups of one under "top2" train (the router takes the best min(2, size)), but no checkpoint
            # view reads them (transformers' routers need two): refused here, before anything is trained
            check_groups(
                self.num_choices, self.top_k, self.n_group, self.topk_group,
                min_group_size(self.score_func, self.n_group, self.group_score),
            )  # fmt: skip
        if self.identity_experts and (self.latent_dim is not None or self.reuse_layers > 1):
            raise ValueError(
                "MoEConfig.identity_experts return the layer's input: they take no latent_dim (latent experts) "
                "and no reuse_layers > 1 (ReXMoE's shared pool)"
            )
        if self.router == "topp":
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"MoEConfig.top_p must lie in (0, 1], got {self.top_p}")
            if self.max_k is not None:
                check_top_k(self.max_k, self.num_experts, name="max_k")
        if self.router == "expert_choice" and not 0.0 < self.ec_capacity_factor <= self.num_experts:
            raise ValueError(
                f"MoEConfig.ec_capacity_factor (average experts per token) must lie in (0, {self.num_experts}], "
                f"got {self.ec_capacity_factor}"
            )
        if self.selection_bias and self.router != "topk":
            raise ValueError("selection_bias applies to router='topk' only")
        if self.num_shared < 0:
            raise ValueError(f"MoEConfig.num_shared must be >= 0, got {self.num_shared}")
        if self.shared_hidden_dim is not None and self.shared_hidden_dim < 1:
            raise ValueError(
                f"MoEConfig.shared_hidden_dim must be >= 1 or None (num_shared * hidden_dim), got {self.shared_hidden_dim}"
            )
        if self.chunk_len < 1:
            raise ValueError(f"MoEConfig.chunk_len must be >= 1, got {self.chunk_len}")
        coefficients = ("balance_coef", "z_coef", "entropy_coef", "locality_coef", "chunk_sparsity_coef")
        for name in (*coefficients, "bias_update_rate"):
            if not getattr(self, name) >= 0:  # a negative coefficient rewards what the loss penalises
                raise ValueError(f"MoEConfig.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if not self.route_scale > 0:
            raise ValueError(
                f"MoEConfig.route_scale must be > 0 (it multiplies the routed output), got {self.route_scale}"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")
        for name in ("chain_iterations", "reuse_layers", "sparsity_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.graph_tau is not None and self.graph_tau <= 0:
            raise ValueError(f"MoEConfig.graph_tau must be > 0 or None (sqrt(dim)), got {self.graph_tau}")
        if self.latent_dim is not None and not 1 <= self.latent_dim <= self.dim:
            raise ValueError(f"MoEConfig.latent_dim must lie in [1, dim={self.dim}] or be None, got {self.latent_dim}")
        if self.reuse_layers > 1 and (self.router != "topk" or self.n_group > 1):
            raise ValueError("MoEConfig.reuse_layers > 1 (ReXMoE) needs router='topk' without expert groups (n_group=1)")
        if self.router == "hash" and self.chain_iterations > 1:
            raise ValueError(
                "MoEConfig.router='hash' fixes each token's experts, so Chain-of-Experts' iterations (chain_iterations > 1) "
                "would route each token to the same experts again; use router='topk' for a chain"
            )
        self._check_read_fields()
        if self.computed_experts_target is not None:
            self._check_budget()

    def _check_budget(self) -> None:
        target, most = self.computed_experts_target, min(self.top_k, self.num_experts)
        if not (is_positive_finite(target) and target <= most):
            raise ValueError(
                f"MoEConfig.computed_experts_target (experts computed per token) must lie in (0, min(top_k, "
                f"num_experts) = {most}], got {target!r}"
            )

    def _check_read_fields(self) -> None:
        """Refuse a setting the layer would not read (route_scale=2 with router='graph_sim' used to
        build a layer with 1): each such field must keep its default."""
        topk, graph = self.router == "topk", self.router in ("graph_sim", "graph_attn")
        variable_k = self.router in ("topp", "relu", "expert_choice")
        read_where = {
            "top_k": ("router 'topk', 'hash' or a graph router: top-p, ReLU and expert choice set their own k",
                      self.router in TOP_K_ROUTERS),
            **dict.fromkeys(("score_func", "route_scale"), ("router 'topk' or 'hash'", topk or self.router == "hash")),
            "n_group": ("router='topk'", topk),
            **dict.fromkeys(("topk_group", "group_score"), ("router='topk' with expert groups, n_group > 1",
                                                            topk and self.n_group > 1)),
            "sparsity_window": ("a router of variable k: 'topp', 'relu' or 'expert_choice'", variable_k),
            "renormalize": ("router 'topk', 'topp', 'hash' or a graph router", topk or graph or self.router in ("topp", "hash")),
            "top_p": ("router='topp'", self.router == "topp"),
            "max_k": ("router='topp'", self.router == "topp"),
            "ec_capacity_factor": ("router='expert_choice'", self.router == "expert_choice"),
            "graph_learned": ("router='graph_sim'", self.router == "graph_sim"),
            "graph_tau": ("router='graph_sim'", self.router == "graph_sim"),
            "bias_update_rate": ("selection_bias=True", self.selection_bias),
            "shared_hidden_dim": ("num_shared >= 1", self.num_shared > 0),
            "shared_gate": ("num_shared >= 1", self.num_shared > 0),
            "identity_experts": ("router='topk'", topk),
            # the budget steers the selection bias of a router with identity experts
            "computed_experts_target": ("identity_experts >= 1 and selection_bias=True",
                                        topk and self.identity_experts > 0 and self.selection_bias),
        }
        for field in dataclasses.fields(self):
            where, read = read_where.get(field.name, ("", True))
            value = getattr(self, field.name)
            if not read and value != field.default:
                raise ValueError(
                    f"MoEConfig.{field.name}={value!r} has no effect without {where} "
                    f"(router={self.router!r}); leave it at its default {field.default!r}"
                )

    @property
    def num_router_experts(self) -> int:
        """Experts one router chooses among: num_experts, or the ReXMoE pool reuse_layers * num_experts."""
        return self.num_experts * self.reuse_layers

    @property
    def num_choices(self) -> int:
        """What one token's router chooses among: the routed experts and the identity experts."""
        return self.num_experts + self.identity_experts

    @property
    def expert_dim(self) -> int:
        """The width of the experts' input and output: dim, or latent_dim for latent experts."""
        return self.dim if self.latent_dim is None else self.latent_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        """A config from its dict; the names of moelab before 0.2 are read as today's."""
        data = {RENAMED_FIELDS.get(key, key): value for key, value in data.items()}
        check_known_fields(cls, data)
        return cls(**data)


# fields renamed so that the selection bias has one name everywhere (configs saved earlier still load)
RENAMED_FIELDS = {"aux_free_bias": "selection_bias", "expert_bias": "expert_mlp_bias"}


def build_router(cfg: MoEConfig, reuse_position: int = 0, vocab_size: int | None = None) -> Router:
    """The router of a config; reuse_position: a ReXMoE layer's place in its group; vocab_size: the
    model's vocabulary, which a hash router's table covers."""
    common = {"bias": cfg.router_bias}
    if cfg.router == "hash":
        if vocab_size is None:
            raise ValueError(
                "router='hash' fixes the experts of every token id: build the layer with the model's vocab_size "
                "(build_moe(cfg, vocab_size=...); a ModelConfig passes its own)"
            )
        renormalize = True if cfg.renormalize is None else cfg.renormalize
        return HashRouter(
            cfg.dim, cfg.num_experts, vocab_size, cfg.top_k, score_func=cfg.score_func, renormalize=renormalize,
            route_scale=cfg.route_scale, **common,
        )  # fmt: skip
    if cfg.router == "topk":
        topk = dict(
            score_func=cfg.score_func,
            renormalize=True if cfg.renormalize is None else cfg.renormalize,
            route_scale=cfg.route_scale,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            group_score=cfg.group_score,
            selection_bias=cfg.selection_bias,
            **common,
        )
        if cfg.reuse_layers > 1:
            return ReuseRouter(cfg.dim, cfg.num_experts, cfg.reuse_layers, reuse_position, cfg.top_k, **topk)
        target = cfg.computed_experts_target
        budget = None if target is None else ComputeBudget(cfg.num_experts, target)
        return TopKRouter(cfg.dim, cfg.num_choices, cfg.top_k, budget=budget, **topk)
    if cfg.router in ("graph_sim", "graph_attn"):
        renormalize = True if cfg.renormalize is None else cfg.renormalize
        if cfg.router == "graph_attn":
            return AttentionRouter(cfg.dim, cfg.num_experts, cfg.top_k, renormalize=renormalize, **common)
        return SimilarityRouter(
            cfg.dim, cfg.num_experts, cfg.top_k, learned=cfg.graph_learned, tau=cfg.graph_tau,
            renormalize=renormalize, **common,
        )
    if cfg.router == "topp":
        return TopPRouter(
            cfg.dim, cfg.num_experts, cfg.top_p, max_k=cfg.max_k, renormalize=bool(cfg.renormalize), **common
        )
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(cfg.dim, cfg.num_experts, capacity_factor=cfg.ec_capacity_factor, **common)
    return ReLURouter(cfg.dim, cfg.num_experts, **common)


def build_experts(cfg: MoEConfig, num_experts: int | None = None) -> Experts:
    """The routed experts of a config (num_experts of them, default cfg.num_experts)."""
    num_experts = num_experts or cfg.num_experts
    if cfg.activation == "swiglu":
        return SwiGLUExperts(num_experts, cfg.expert_dim, cfg.hidden_dim, bias=cfg.expert_mlp_bias, backend=cfg.backend)
    return MLPExperts(
        num_experts, cfg.expert_dim, cfg.hidden_dim,
        activation=cfg.activation, bias=cfg.expert_mlp_bias, backend=cfg.backend,
    )


def build_moe(
    cfg: MoEConfig, *, experts: Experts | None = None, reuse_position: int = 0, vocab_size: int | None = None
) -> MoELayer | ChainOfExperts:
    """Build the layer a config describes: an `MoELayer`, or a `ChainOfExperts` around one when
    chain_iterations > 1. experts: a pool shared with other layers (ReXMoE, see `moelab.models`),
    of which this layer sits at `reuse_position` of its group; vocab_size: the model's vocabulary
    (router="hash")."""
    if experts is None:
        experts = build_experts(cfg, cfg.num_router_experts)
    shared = None
    if cfg.num_shared:
        width = cfg.shared_hidden_dim or cfg.num_shared * cfg.hidden_dim
        shared = SharedExperts(cfg.dim, width, gated=cfg.shared_gate)
    layer = MoELayer(
        build_router(cfg, reuse_position, vocab_size),
        experts,
        shared,
        capacity_factor=cfg.capacity_factor,
        balance_coef=cfg.balance_coef,
        z_coef=cfg.z_coef,
        entropy_coef=cfg.entropy_coef,
        locality_coef=cfg.locality_coef,
        chunk_sparsity_coef=cfg.chunk_sparsity_coef,
        chunk_len=cfg.chunk_len,
        latent=None if cfg.latent_dim is None else LatentProjection(cfg.dim, cfg.latent_dim),
        sparsity_window=cfg.sparsity_window,
        identity_experts=cfg.identity_experts,
    )
    return layer if cfg.chain_iterations == 1 else ChainOfExperts(layer, cfg.chain_iterations)
