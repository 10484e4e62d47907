"""The routed experts of a compiled step as one op the compiler does not look into.

A compiled decode step (`MoETransformer.generate(compile=True)`) must be one graph, but beyond
a few tokens `MoELayer.infer` plans its dispatch on the host (how many rows each expert gets) and
goes expert by expert, and offloaded experts (`moelab.offload`) fetch what the routing chose into
their cache. `routed_experts` wraps that eager code in a custom op: the graph calls it like any
kernel (no graph break, no guard), and it runs the layer's own `MoELayer.run_experts`.

The op names its layer by `id()`; every `MoELayer` registers itself when built or copied
(`register`), weakly, so the op never keeps a layer alive.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register(layer) -> None:
    """Make `layer` (a `MoELayer`) callable from `routed_experts` under its `id()`."""
    _LAYERS[id(layer)] = layer


@torch.library.custom_op("moelab::routed_experts", mutates_args=())
def routed_experts(rows: Tensor, indices: Tensor, weights: Tensor, layer: int) -> Tensor:
    """rows: [T, D or latent rank] with their routing (indices, weights: [T, K]) through the routed
    experts of the layer registered as `layer` (its eager `MoELayer.run_experts`) -> rows' shape."""
    module = _LAYERS.get(layer)
    if module is None:
        raise RuntimeError(
            f"internal error: a compiled step calls MoE layer id {layer}, which no longer exists (a compiled "
            "step is traced again whenever its model's modules change; please report this)"
        )
    return module.run_experts(rows, indices, weights)


@routed_experts.register_fake
def _(rows: Tensor, indices: Tensor, weights: Tensor, layer: int) -> Tensor:
    return rows.new_empty(rows.shape)
