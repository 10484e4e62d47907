"""Open transformers MoE checkpoints as per-layer views, read lazily from safetensors.

view = open_checkpoint("path/to/checkpoint")
for layer in view.layers():          # one layer's tensors at a time
    if isinstance(layer, MoELayerView):
        moe = moe_layer_from_view(layer)   # a moelab.nn.MoELayer
"""

from moelab.hf.adapters import FAMILIES, open_checkpoint
from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.hf.native import moe_layer_from_view
from moelab.hf.view import DenseLayerView, ExpertsView, ModelView, MoELayerView, RouterView, SharedView

__all__ = [
    "FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "DenseLayerView",
    "ExpertsView",
    "ModelView",
    "MoELayerView",
    "RouterView",
    "SharedView",
    "moe_layer_from_view",
    "open_checkpoint",
]
