"""The decoder-only MoE language model: config and presets, the model, checkpoints, accounting."""

from moelab.models.accounting import (
    active_params,
    count_params,
    experts_per_token_by_layer,
    flops_per_token,
    model_info,
    param_counts,
)
from moelab.models.config import PRESETS, ModelConfig, preset, small, tiny
from moelab.models.decode_layout import use_decode_layout
from moelab.models.pretrained import load_pretrained, load_state, save_pretrained
from moelab.models.transformer import KVCache, ModelOutput, MoETransformer, Sampling, sample_next_token

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "MoETransformer",
    "Sampling",
    "active_params",
    "count_params",
    "experts_per_token_by_layer",
    "flops_per_token",
    "load_pretrained",
    "load_state",
    "model_info",
    "param_counts",
    "preset",
    "sample_next_token",
    "save_pretrained",
    "small",
    "tiny",
    "use_decode_layout",
]
