"""Run a checkpoint's MoE layer natively: `moe_layer_from_view(view) -> moelab.nn.MoELayer`.

The modules are built on the meta device and then take the view's tensors as their parameters
(no random init, no copies beyond the fused gate_up, the view's dtype kept), so analysis and
compression can run one layer of a model larger than RAM.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from moelab.hf.view import ExpertsView, LatentView, MoELayerView, NormView, RouterView, SharedView
from moelab.nn.experts import Experts, MLPExperts, SharedExperts, SwiGLUExperts
from moelab.nn.grouped import (
    CappedSwiGLU,
    ClampedSwiGLU,
    GateClampedSwiGLU,
    GatedActivation,
    GeluTanhGLU,
    SoftcappedSwiGLU,
)
from moelab.nn.latent import LatentProjection
from moelab.nn.mlp_router import MLPRouter
from moelab.nn.moe import MoELayer
from moelab.nn.norms import ScaledRMSNorm
from moelab.nn.routers import HashRouter, Router, TopKRouter
from moelab.nn.sparsemixer import SparseMixerRouter


def moe_layer_from_view(layer: MoELayerView) -> MoELayer:
    """A moelab MoE layer that computes what the checkpoint's block computes at inference
    (router jitter and other training-only noise aside). forward(x [..., D]) -> (y, MoEResult)."""
    return MoELayer(
        router_from_view(layer.router),
        experts_from_view(layer.experts),
        shared_from_view(layer.shared),
        latent=latent_from_view(layer.latent),
        expert_norm=norm_from_view(layer.expert_norm),
        routed_norm=norm_from_view(layer.routed_norm),
        output_bias=layer.output_bias,
        identity_experts=layer.router.identity_experts,
        identity_returns=identity_returns(layer.router),
    )


def identity_returns(router: RouterView) -> str:
    """What a slot on one of the router's zero-computation experts adds (`MoELayer(identity_returns=)`)."""
    return "input" if router.identity is None else router.identity.returns


def expert_input(layer: MoELayerView, x: Tensor) -> Tensor:
    """x [N, D] -> what the layer's routed experts read: x, or down @ x in a latent block, through
    the expert norm where the block has one (Gemma 4, Muse Spark)."""
    if layer.latent is not None:
        x = x @ layer.latent.down.to(x.dtype).T
    return x if layer.expert_norm is None else norm_from_view(layer.expert_norm)(x)


def routed_output(layer: MoELayerView, y: Tensor) -> Tensor:
    """y [N, I or L], routed experts' outputs -> their part of the block's output [N, D]: y, or up @ y
    in a latent block (linear: per expert or summed alike). A routed norm (Gemma 4) is not applied:
    it acts on the sum alone (`summed_routed_output`)."""
    return y if layer.latent is None else y @ layer.latent.up.to(y.dtype).T


def summed_routed_output(layer: MoELayerView, y: Tensor) -> Tensor:
    """y [N, I or L], the routed experts' weighted sum -> their part of the block's output [N, D]:
    `routed_output`, then the routed norm where the block has one (Gemma 4)."""
    y = routed_output(layer, y)
    return y if layer.routed_norm is None else norm_from_view(layer.routed_norm)(y)


def norm_from_view(view: NormView | None) -> ScaledRMSNorm | None:
    """The view's norm as a module holding its weight (computing in float32 whatever the weight's dtype)."""
    return None if view is None else _holding(_norm, view, {"weight": view.weight})


def _norm(view: NormView, cast_first: bool = False) -> ScaledRMSNorm:
    return ScaledRMSNorm(
        view.weight.shape[0], view.eps, multiplier=view.multiplier, cast_first=cast_first, scale_first=view.scale_first
    )


def latent_from_view(view: LatentView | None) -> LatentProjection | None:
    if view is None:
        return None
    return _holding(lambda v: LatentProjection(v.down.shape[1], v.down.shape[0]), view,
                    {"down_proj.weight": view.down, "up_proj.weight": view.up})  # fmt: skip


def router_from_view(view: RouterView) -> Router:
    """The view's router as a moelab router holding its tensors."""
    state = {"weight": view.with_identity_rows("weight")}
    for name in ("bias", "selection_bias", "expert_scale", "token_experts"):
        if getattr(view, name) is not None:
            state[name] = view.with_identity_rows(name)
    if view.input_norm is not None:
        state["input_norm.weight"] = view.input_norm.weight
    if view.mlp is not None:
        state |= view.mlp.tensors()
    return _holding(_router, view, state)


def router_features(view: RouterView, x: Tensor, states: Tensor | None = None) -> Tensor:
    """x [N, D] -> what the router's rows read [N, D or R] in x's dtype: x, through its input norm
    (Gemma 4's) or its MLP (ZAYA's, which also reads `states` [N, R], the router states handed in;
    None: none, the first layer's)."""
    if view.mlp is not None:
        return router_from_view(view).features(x, states).to(x.dtype)
    return x if view.input_norm is None else norm_from_view(view.input_norm).to(x.dtype)(x)


def experts_from_view(view: ExpertsView) -> Experts:
    """The view's routed experts as stacked moelab experts holding its tensors: `SwiGLUExperts`
    (gate and up fused, with the view's output norm) or, for plain experts, `MLPExperts`."""
    if not view.gated:
        state = {"up_proj": view.up, "down_proj": view.down}
        if _has_bias(view):
            zeros = view.up.new_zeros
            E, I, D = view.up.shape
            state["up_bias"] = zeros(E, I) if view.up_bias is None else view.up_bias
            state["down_bias"] = zeros(E, D) if view.down_bias is None else view.down_bias
        return _holding(_experts, view, state)
    state = {"gate_up_proj": _gate_up(view), "down_proj": view.down}
    if _has_bias(view):
        E, I, D = view.gate.shape
        zeros = view.gate.new_zeros
        gate_bias = zeros(E, I) if view.gate_bias is None else view.gate_bias
        up_bias = zeros(E, I) if view.up_bias is None else view.up_bias
        state["gate_up_bias"] = torch.cat([gate_bias, up_bias], dim=1)
        state["down_bias"] = zeros(E, D) if view.down_bias is None else view.down_bias
    experts = _holding(_experts, view, state)
    experts.output_norm = norm_from_view(view.output_norm)
    return experts


def empty_experts(view: ExpertsView, num_experts: int, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> Experts:
    """Stacked experts like the view's (shapes, biases, activation) but `num_experts` of them, with
    uninitialised weights in `dtype` that need no gradient: slots to copy experts into (with no
    output norm: a layer's own, `with_output_norm`)."""
    with torch.device("meta"):
        module = _experts(view, num_experts)
    # cast on the meta device first: memory for the slots in `dtype` only, never a float32 copy beside them
    return module.to(dtype).to_empty(device=device).requires_grad_(False)


def with_output_norm(experts: Experts, norm: NormView | None) -> Experts:
    """Stacked experts (a pool of slots, `empty_experts`) computing with a layer's output norm
    (`ExpertsView.output_norm`): themselves where it is None, else a shallow copy holding the same
    weights, with the norm in their dtype and on their device."""
    if norm is None:
        return experts
    own = copy.copy(experts)  # its parameters are the pool's (one shared dict), so the slots' loads reach it
    own._modules = dict(experts._modules)  # a norm of its own, not the pool's
    own.output_norm = norm_from_view(norm).to(experts.down_proj.device, experts.dtype)
    return own


def copy_expert(view: ExpertsView, experts: SwiGLUExperts | MLPExperts, slot: int) -> None:
    """Write the view's one expert into entry `slot` of stacked experts built like it
    (`empty_experts`), casting to their dtype."""
    if not view.gated:
        experts.up_proj[slot].copy_(view.up[0])
        experts.down_proj[slot].copy_(view.down[0])
        for target, bias in ((experts.up_bias, view.up_bias), (experts.down_bias, view.down_bias)):
            if target is not None:
                target[slot].zero_() if bias is None else target[slot].copy_(bias[0])
        return
    I = view.hidden_dim
    experts.gate_up_proj[slot, :I].copy_(view.gate[0])
    experts.gate_up_proj[slot, I:].copy_(view.up[0])
    experts.down_proj[slot].copy_(view.down[0])
    if experts.gate_up_bias is not None:
        for part, bias in ((slice(0, I), view.gate_bias), (slice(I, 2 * I), view.up_bias)):
            target = experts.gate_up_bias[slot, part]
            target.zero_() if bias is None else target.copy_(bias[0])
        experts.down_bias[slot].zero_() if view.down_bias is None else experts.down_bias[slot].copy_(view.down_bias[0])


def shared_from_view(view: SharedView | None) -> SharedExperts | None:
    if view is None:
        return None
    state = {"up_proj.weight": view.up, "down_proj.weight": view.down}
    if view.gate is not None:
        state["gate_proj.weight"] = view.gate
    if view.sigmoid_gate is not None:
        state["gate.weight"] = view.sigmoid_gate
    return _holding(_shared, view, state)


def _holding(build, view, state: dict[str, Tensor]):
    """`build(view)` on the meta device, then given `state`'s tensors as its own (no copies);
    buffers not in the state (load counters) start at 0."""
    with torch.device("meta"):
        module = build(view)
    module.load_state_dict({k: t.contiguous() for k, t in state.items()}, strict=True, assign=True)
    for sub in module.modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(sub, name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    return module


def _gate_up(view: ExpertsView) -> Tensor:
    """[E, 2I, D]: gate rows, then up rows. When the view's gate and up are the two halves of one
    fused tensor (the layout most checkpoints store), that tensor itself, not a copy."""
    gate, up, base = view.gate, view.up, view.gate._base
    I = gate.shape[1]
    fused = (
        base is not None
        and up._base is base
        and base.shape == (gate.shape[0], 2 * I, gate.shape[2])
        and gate.stride() == up.stride() == base.stride()
        and gate.storage_offset() == base.storage_offset()
        and up.storage_offset() == base.storage_offset() + I * base.stride(1)
    )
    return base if fused else torch.cat([gate, up], dim=1)


def _router(view: RouterView) -> Router:
    E, D = view.num_choices, view.weight.shape[1]
    if view.score_func == "sparsemixer":
        return SparseMixerRouter(D, E, jitter_eps=view.jitter_eps, top_k=view.top_k)
    if view.token_experts is not None:
        return HashRouter(
            D, E, view.token_experts.shape[0], view.top_k, score_func=view.score_func,
            renormalize=view.renormalize, route_scale=view.route_scale, bias=view.bias is not None,
        )  # fmt: skip
    if view.mlp is not None:
        return MLPRouter(
            view.mlp.dim, D, E, view.top_k, eps=view.mlp.norm.eps, reads_state=view.mlp.state_scale is not None,
            **_top_k_settings(view),
        )  # fmt: skip
    return TopKRouter(
        D,
        E,
        view.top_k,
        input_norm=None if view.input_norm is None else _norm(view.input_norm, cast_first=True),
        **_top_k_settings(view),
    )


def _top_k_settings(view: RouterView) -> dict:
    """The `TopKRouter` settings of the view's router besides its sizes and input norm."""
    return dict(
        score_func=view.score_func,
        renormalize=view.renormalize,
        route_scale=view.route_scale,
        n_group=view.n_group,
        topk_group=view.topk_group,
        group_score=view.group_score,
        selection_bias=view.selection_bias is not None,
        select_on_logits=view.select_on_logits,
        bias=view.bias is not None,
        expert_scale=view.expert_scale is not None,
        logit_softcap=view.logit_softcap,
        logit_scale=view.logit_scale,
    )


def _has_bias(view: ExpertsView) -> bool:
    return any(b is not None for b in (view.gate_bias, view.up_bias, view.down_bias))


def _experts(view: ExpertsView, num_experts: int | None = None) -> Experts:
    E, I, D = view.up.shape
    E = E if num_experts is None else num_experts
    bias = _has_bias(view)
    if not view.gated:
        return MLPExperts(E, D, I, activation=view.activation, bias=bias)
    return SwiGLUExperts(E, D, I, bias=bias, clamped=_gated_activation(view), scale_input=view.scale_input)


def _gated_activation(view: ExpertsView | SharedView) -> GatedActivation | None:
    """The two-input activation a view's "clamped_swiglu", "capped_swiglu", "gelu_tanh_glu",
    "gate_clamped_swiglu" or "softcapped_swiglu" names; None for SwiGLU."""
    return gated_activation(
        view.activation, view.swiglu_alpha, view.swiglu_limit, gate_softcap=view.gate_softcap,
        up_softcap=view.up_softcap,
    )  # fmt: skip


def gated_activation(
    activation: str,
    swiglu_alpha: float | None = None,
    swiglu_limit: float | None = None,
    *,
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> GatedActivation | None:
    """The two-input activation that ExpertsView settings name (`SwiGLUExperts.clamped`): "clamped_swiglu",
    "capped_swiglu", "gelu_tanh_glu", "gate_clamped_swiglu" or "softcapped_swiglu"; None for SwiGLU (and
    plain activations)."""
    if activation == "softcapped_swiglu":
        return SoftcappedSwiGLU(gate_softcap, up_softcap)
    if activation == "clamped_swiglu":
        return ClampedSwiGLU(alpha=swiglu_alpha, limit=swiglu_limit)
    if activation == "capped_swiglu":
        return CappedSwiGLU(swiglu_limit)
    if activation == "gate_clamped_swiglu":
        return GateClampedSwiGLU(swiglu_limit)
    return GeluTanhGLU() if activation == "gelu_tanh_glu" else None


def _shared(view: SharedView | None) -> SharedExperts | None:
    if view is None:
        return None
    Is, D = view.up.shape
    activation = "swiglu" if view.gate is not None else view.activation
    return SharedExperts(
        D, Is, gated=view.sigmoid_gate is not None, activation=activation, clamped=_gated_activation(view),
        output_scale=view.output_scale,
    )  # fmt: skip
