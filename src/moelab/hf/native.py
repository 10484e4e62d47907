"""Run a checkpoint's MoE layer natively: `moe_layer_from_view(view) -> moelab.nn.MoELayer`.

The modules are built on the meta device and then take the view's tensors as their parameters
(no random init, no copies beyond the fused gate_up, the view's dtype kept), so analysis and
compression can run one layer of a model larger than RAM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.hf.view import ExpertsView, MoELayerView, RouterView, SharedView
from moelab.nn.experts import Experts, SharedExperts, SwiGLUExperts
from moelab.nn.grouped import ClampedSwiGLU
from moelab.nn.moe import MoELayer
from moelab.nn.routers import Router, TopKRouter
from moelab.nn.sparsemixer import SparseMixerRouter


def moe_layer_from_view(layer: MoELayerView) -> MoELayer:
    """A moelab MoE layer that computes what the checkpoint's block computes at inference
    (router jitter and other training-only noise aside). forward(x [..., D]) -> (y, MoEResult)."""
    with torch.device("meta"):
        module = MoELayer(_router(layer.router), _experts(layer.experts), _shared(layer.shared))
    module.load_state_dict(_state(layer), strict=True, assign=True)
    for sub in module.modules():  # non-persistent buffers (load counters) are not in the state: start at 0
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(sub, name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    return module


def _router(view: RouterView) -> Router:
    E, D = view.weight.shape
    if view.score_func == "sparsemixer":
        return SparseMixerRouter(D, E, jitter_eps=view.jitter_eps, top_k=view.top_k)
    return TopKRouter(
        D,
        E,
        view.top_k,
        score_func=view.score_func,
        renormalize=view.renormalize,
        route_scale=view.route_scale,
        n_group=view.n_group,
        topk_group=view.topk_group,
        balance_bias=view.correction_bias is not None,
        bias=view.bias is not None,
    )


def _experts(view: ExpertsView) -> Experts:
    E, I, D = view.gate.shape
    bias = any(b is not None for b in (view.gate_bias, view.up_bias, view.down_bias))
    clamped = (
        ClampedSwiGLU(alpha=view.swiglu_alpha, limit=view.swiglu_limit)
        if view.activation == "clamped_swiglu"
        else None
    )
    return SwiGLUExperts(E, D, I, bias=bias, clamped=clamped, scale_input=view.scale_input)


def _shared(view: SharedView | None) -> SharedExperts | None:
    if view is None:
        return None
    Is, D = view.gate.shape
    return SharedExperts(D, Is, gated=view.sigmoid_gate is not None)


def _state(layer: MoELayerView) -> dict[str, Tensor]:
    """The MoELayer state dict made of the view's tensors (missing expert biases are zeros)."""
    router, experts, shared = layer.router, layer.experts, layer.shared
    state = {"router.weight": router.weight}
    if router.bias is not None:
        state["router.bias"] = router.bias
    if router.correction_bias is not None:
        state["router.expert_bias"] = router.correction_bias
    state["experts.gate_up_proj"] = torch.cat([experts.gate, experts.up], dim=1)
    state["experts.down_proj"] = experts.down
    if any(b is not None for b in (experts.gate_bias, experts.up_bias, experts.down_bias)):
        E, I, D = experts.gate.shape
        zeros = experts.gate.new_zeros
        gate_bias = zeros(E, I) if experts.gate_bias is None else experts.gate_bias
        up_bias = zeros(E, I) if experts.up_bias is None else experts.up_bias
        state["experts.gate_up_bias"] = torch.cat([gate_bias, up_bias], dim=1)
        state["experts.down_bias"] = zeros(E, D) if experts.down_bias is None else experts.down_bias
    if shared is not None:
        state |= {
            "shared.gate_proj.weight": shared.gate,
            "shared.up_proj.weight": shared.up,
            "shared.down_proj.weight": shared.down,
        }
        if shared.sigmoid_gate is not None:
            state["shared.gate.weight"] = shared.sigmoid_gate
    return {name: tensor.contiguous() for name, tensor in state.items()}
