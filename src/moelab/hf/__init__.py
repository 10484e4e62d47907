"""Open transformers (and moelab) MoE checkpoints as per-layer views, read lazily from
safetensors; write them back after edits; export moelab models to transformers formats.

view = open_checkpoint("path/to/checkpoint")
for layer in view.layers():          # one layer's tensors at a time
    if isinstance(layer, MoELayerView):
        moe = moe_layer_from_view(layer)   # a moelab.nn.MoELayer

drop_experts("ckpt", "pruned", {1: [0, 5]})           # or write_checkpoint(src, out, {i: LayerEdit})
export_checkpoint("moelab_ckpt", "hf_ckpt", "qwen2_moe")
"""

from moelab.hf.adapters import FAMILIES, open_checkpoint
from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.hf.edit import LayerEdit, apply_edit, masked_moe_layer
from moelab.hf.export import EXPORT_FAMILIES, export_checkpoint
from moelab.hf.native import moe_layer_from_view
from moelab.hf.postconditions import WriteCheckError
from moelab.hf.view import (
    DenseLayerView,
    ExpertsView,
    LatentView,
    ModelView,
    MoELayerView,
    RouterView,
    SharedView,
)
from moelab.hf.writer import drop_experts, write_checkpoint

__all__ = [
    "EXPORT_FAMILIES",
    "FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "DenseLayerView",
    "LayerEdit",
    "WriteCheckError",
    "ExpertsView",
    "LatentView",
    "ModelView",
    "MoELayerView",
    "RouterView",
    "SharedView",
    "apply_edit",
    "drop_experts",
    "export_checkpoint",
    "masked_moe_layer",
    "moe_layer_from_view",
    "open_checkpoint",
    "write_checkpoint",
]
