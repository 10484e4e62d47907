"""`MoEConfig`: one serialisable description of an MoE layer, and `build_moe` to build it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moelab.validation import did_you_mean
from moelab.nn.experts import ACTIVATIONS, MLPExperts, SharedExperts, SwiGLUExperts
from moelab.nn.grouped import BACKENDS
from moelab.nn.moe import MoELayer
from moelab.nn.routers import (
    SCORE_FUNCS,
    ExpertChoiceRouter,
    ReLURouter,
    TopKRouter,
    TopPRouter,
    check_groups,
    check_top_k,
)

ROUTERS = ("topk", "topp", "expert_choice", "relu")
EXPERT_ACTIVATIONS = ("swiglu", *ACTIVATIONS)


@dataclass(kw_only=True)
class MoEConfig:
    """An MoE layer. Validated on construction; `to_dict`/`from_dict` round-trip through JSON/YAML.

    dim: model width D. num_experts: routed experts E. hidden_dim: each expert's width I.
    router: "topk" (token choice), "topp" (dynamic top-p), "expert_choice", "relu" (BlockFFN).
    top_k: experts per token for "topk".
    score_func, renormalize, route_scale, n_group, topk_group: top-k scoring (see TopKRouter).
        renormalize defaults to True for "topk" (Mixtral, Qwen3) and False for "topp" (the
        paper's raw probabilities).
    aux_free_bias: aux-loss-free balancing bias for "topk" (update it with
        `moelab.nn.attach_expert_bias_update`); bias_update_rate: its step size gamma.
    router_bias: a learned bias on the router logits (GPT-OSS).
    top_p, max_k: dynamic top-p threshold and cap. ec_capacity_factor: expert choice's average
        experts per token.
    activation: "swiglu" or a plain MLP activation; expert_bias: biases in the experts.
    num_shared: always-on shared experts (fused to width num_shared * hidden_dim, or
        shared_hidden_dim if given); shared_gate: Qwen-style sigmoid gate on them.
    capacity_factor: None = dropless; else Switch/GShard token dropping.
    balance_coef, z_coef, entropy_coef: auxiliary-loss coefficients.
    locality_coef, chunk_sparsity_coef, chunk_len: BlockFFN's objectives (paper: 2e-3, 5e-2
        adaptive, 64).
    backend: expert MLP backend ("auto", "grouped", "loop", "grouped_mm"; see moelab.nn.grouped).
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
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    router_bias: bool = False
    top_p: float = 0.4
    max_k: int | None = None
    ec_capacity_factor: float = 2.0
    activation: str = "swiglu"
    expert_bias: bool = False
    num_shared: int = 0
    shared_hidden_dim: int | None = None
    shared_gate: bool = False
    capacity_factor: float | None = None
    balance_coef: float = 0.01
    z_coef: float = 0.0
    entropy_coef: float = 0.0
    locality_coef: float = 0.0
    chunk_sparsity_coef: float = 0.0
    chunk_len: int = 64
    backend: str = "auto"

    def __post_init__(self):
        for name in ("dim", "num_experts", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check_choice("router", self.router, ROUTERS)
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("activation", self.activation, EXPERT_ACTIVATIONS)
        _check_choice("backend", self.backend, tuple(BACKENDS))
        if self.router == "topk":
            check_top_k(self.top_k, self.num_experts)
            check_groups(self.num_experts, self.top_k, self.n_group, self.topk_group)
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
        if self.aux_free_bias and self.router != "topk":
            raise ValueError("aux_free_bias applies to router='topk' only")
        if self.num_shared < 0:
            raise ValueError(f"MoEConfig.num_shared must be >= 0, got {self.num_shared}")
        if self.chunk_len < 1:
            raise ValueError(f"MoEConfig.chunk_len must be >= 1, got {self.chunk_len}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(
                    f"unknown MoEConfig field {key!r}{did_you_mean(key, known)}; valid fields: {sorted(known)}"
                )
        return cls(**data)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}{did_you_mean(value, choices)}; choose one of {list(choices)}")


def build_router(cfg: MoEConfig):
    common = {"bias": cfg.router_bias}
    if cfg.router == "topk":
        return TopKRouter(
            cfg.dim,
            cfg.num_experts,
            cfg.top_k,
            score_func=cfg.score_func,
            renormalize=True if cfg.renormalize is None else cfg.renormalize,
            route_scale=cfg.route_scale,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            balance_bias=cfg.aux_free_bias,
            **common,
        )
    if cfg.router == "topp":
        return TopPRouter(cfg.dim, cfg.num_experts, cfg.top_p, max_k=cfg.max_k, renormalize=bool(cfg.renormalize), **common)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(cfg.dim, cfg.num_experts, capacity_factor=cfg.ec_capacity_factor, **common)
    return ReLURouter(cfg.dim, cfg.num_experts, **common)


def build_moe(cfg: MoEConfig) -> MoELayer:
    """Build the layer a config describes."""
    if cfg.activation == "swiglu":
        experts = SwiGLUExperts(cfg.num_experts, cfg.dim, cfg.hidden_dim, bias=cfg.expert_bias, backend=cfg.backend)
    else:
        experts = MLPExperts(
            cfg.num_experts,
            cfg.dim,
            cfg.hidden_dim,
            activation=cfg.activation,
            bias=cfg.expert_bias,
            backend=cfg.backend,
        )
    shared = None
    if cfg.num_shared:
        width = cfg.shared_hidden_dim or cfg.num_shared * cfg.hidden_dim
        shared = SharedExperts(cfg.dim, width, gated=cfg.shared_gate)
    return MoELayer(
        build_router(cfg),
        experts,
        shared,
        capacity_factor=cfg.capacity_factor,
        balance_coef=cfg.balance_coef,
        z_coef=cfg.z_coef,
        entropy_coef=cfg.entropy_coef,
        locality_coef=cfg.locality_coef,
        chunk_sparsity_coef=cfg.chunk_sparsity_coef,
        chunk_len=cfg.chunk_len,
    )
