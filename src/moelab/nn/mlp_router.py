"""A top-k router that reads its input through a small MLP and carries a state from layer to layer
(ZAYA's router, with its "EDA" state).

Shape legend: T tokens, D model dim, R the MLP's width, E choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.norms import ScaledRMSNorm
from moelab.nn.routers import TopKRouter, _float


class MLPRouter(TopKRouter):
    """`TopKRouter` whose `weight` [E, R] reads features of x rather than x:

        r = down_proj(x) (+ state * state_scale where the layer reads the state: every ZAYA layer but the first)
        features = gelu(fc2(gelu(fc1(norm(r)))))          # norm: RMS norm over R, gelu exact (erf)
        logits = features @ weight.T

    `state` [T, R] is the r of the router of the layer before (`next_state`), handed on by the
    model (an MoE layer's `context["router_states"]`, `context_input`); None reads none. Everything
    runs in float32. Pruning and merging edit `weight`'s rows (ZAYA's out_proj) alone.
    """

    context_input = "router_states"

    def __init__(self, dim: int, width: int, num_experts: int, top_k: int, *, eps: float, reads_state: bool, **kwargs):
        super().__init__(width, num_experts, top_k, **kwargs)  # weight [E, R]: the features' rows
        if kwargs.get("input_norm") is not None:
            raise ValueError("an MLP router reads x through its MLP; it takes no input_norm")
        self.dim = dim  # what it reads: x [T, D]
        self.down_proj = nn.Linear(dim, width)
        self.state_scale = nn.Parameter(torch.ones(width)) if reads_state else None
        self.norm = ScaledRMSNorm(width, eps)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def next_state(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """x [T, D], the state handed in [T, R] | None -> r [T, R] in float32, the state this router
        hands the next layer's."""
        r = F.linear(_float(x), _float(self.down_proj.weight), _float(self.down_proj.bias))
        if state is not None and self.state_scale is not None:
            if state.shape != r.shape:
                raise ValueError(
                    f"router state has shape {list(state.shape)}; the router reads one [{r.shape[-1]}] per token of "
                    f"its input: give [{r.shape[0]}, {r.shape[-1]}]"
                )
            r = r + _float(state) * _float(self.state_scale)
        return r

    def features(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """x [T, D], state [T, R] | None -> the MLP's features [T, R] in float32."""
        h = self.norm(self.next_state(x, state))
        h = F.gelu(F.linear(h, _float(self.fc1.weight), _float(self.fc1.bias)))
        return F.gelu(F.linear(h, _float(self.fc2.weight), _float(self.fc2.bias)))
