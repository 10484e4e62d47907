"""MoE building blocks: routers, stacked experts, dispatch, auxiliary losses and the layer."""

from moelab.nn.chain import ChainOfExperts
from moelab.nn.config import MoEConfig, build_moe
from moelab.nn.dispatch import DispatchPlan, ExpertBatch, LocalDispatcher, plan_dispatch
from moelab.nn.experts import MLPExperts, SharedExperts, SwiGLU, SwiGLUExperts
from moelab.nn.graph_routing import AttentionRouter, SimilarityRouter
from moelab.nn.grouped import (
    CappedSwiGLU,
    ClampedSwiGLU,
    GateClampedSwiGLU,
    GeluTanhGLU,
    SoftcappedSwiGLU,
    grouped_mlp,
)
from moelab.nn.latent import LatentProjection
from moelab.nn.losses import load_balancing_loss, router_entropy_loss, router_z_loss
from moelab.nn.moe import MoELayer, MoEResult
from moelab.nn.norms import ScaledRMSNorm
from moelab.nn.rexmoe import ReuseRouter, attach_progressive_scaling, set_reuse_progress
from moelab.nn.routers import (
    ComputeBudget,
    ExpertChoiceRouter,
    HashRouter,
    ReLURouter,
    Router,
    Routing,
    TopKRouter,
    TopPRouter,
    attach_selection_bias_update,
)
from moelab.nn.sparsemixer import SparseMixerRouter
from moelab.nn.uoe import SelectiveAttention, UoEConfig, UoERouter, split_dense_mlp

__all__ = [
    "AttentionRouter",
    "ChainOfExperts",
    "ComputeBudget",
    "CappedSwiGLU",
    "ClampedSwiGLU",
    "GateClampedSwiGLU",
    "GeluTanhGLU",
    "SoftcappedSwiGLU",
    "SparseMixerRouter",
    "LatentProjection",
    "ReuseRouter",
    "ScaledRMSNorm",
    "SelectiveAttention",
    "SimilarityRouter",
    "UoEConfig",
    "UoERouter",
    "attach_progressive_scaling",
    "set_reuse_progress",
    "split_dense_mlp",
    "DispatchPlan",
    "ExpertBatch",
    "ExpertChoiceRouter",
    "HashRouter",
    "LocalDispatcher",
    "MLPExperts",
    "MoEConfig",
    "MoELayer",
    "MoEResult",
    "ReLURouter",
    "Router",
    "Routing",
    "SharedExperts",
    "SwiGLU",
    "SwiGLUExperts",
    "TopKRouter",
    "TopPRouter",
    "attach_selection_bias_update",
    "build_moe",
    "grouped_mlp",
    "load_balancing_loss",
    "plan_dispatch",
    "router_entropy_loss",
    "router_z_loss",
]
