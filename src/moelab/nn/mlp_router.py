"""A top-k router that reads its input through a small MLP and carries a state from layer to layer
(ZAYA's router, with its "EDA" state).

Shape legend: T tokens, D model dim, R the MLP's width, E choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.norms import ScaledRMSNorm
from moelab.nn.routers import TopKRouter, _float, expert_scores


class MLPRouter(TopKRouter):
    """`TopKRouter` whose `weight` [E, R] reads features of x rather than x:

        r = down_proj(x) (+ state * state_scale where the layer reads the state: every ZAYA layer but the first)
        features = gelu(fc2(gelu(fc1(norm(r)))))          # norm: RMS norm over R, gelu exact (erf)
        logits = features @ weight.T

    `state` [T, R] is the r of the router of the layer before (`next_state`), handed on by the
    model (an MoE layer's `context["router_states"]`, `context_input`); None reads none. All of it,
    the softmax too, runs in x's dtype where that is narrower than float32 (as transformers'
    ZayaRouter runs in the model's: bf16 rounds each step and the probabilities, which it selects and
    weighs by), else in float32; the logits and scores come out in float32. Pruning and merging edit
    `weight`'s rows (ZAYA's out_proj) alone.
    """

    context_input = "router_states"

    def __init__(self, dim: int, width: int, num_experts: int, top_k: int, *, eps: float, reads_state: bool, **kwargs):
        super().__init__(width, num_experts, top_k, **kwargs)  # weight [E, R]: the features' rows
        if kwargs.get("input_norm") is not None:
            raise ValueError("an MLP router reads x through its MLP; it takes no input_norm")
        self.dim = dim  # what it reads: x [T, D]
        self.down_proj = nn.Linear(dim, width)
        self.state_scale = nn.Parameter(torch.ones(width)) if reads_state else None
        self.norm = ScaledRMSNorm(width, eps, cast_first=True)  # ZayaRMSNorm: weight x the normed r in r's dtype
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def next_state(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """x [T, D], the state handed in [T, R] | None -> r [T, R] in the router's dtype (`compute_dtype`),
        the state this router hands the next layer's."""
        dtype = compute_dtype(x)
        r = _linear(x, self.down_proj, dtype)
        if state is not None and self.state_scale is not None:
            if state.shape != r.shape:
                raise ValueError(
                    f"router state has shape {list(state.shape)}; the router reads one [{r.shape[-1]}] per token of "
                    f"its input: give [{r.shape[0]}, {r.shape[-1]}]"
                )
            r = r + state.to(dtype) * self.state_scale.to(dtype)
        return r

    def features(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """x [T, D], state [T, R] | None -> the MLP's features [T, R] in the router's dtype (`compute_dtype`)."""
        h = self.norm(self.next_state(x, state))
        h = F.gelu(_linear(h, self.fc1, h.dtype))
        return F.gelu(_linear(h, self.fc2, h.dtype))

    def unscaled_logits(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """`Router.unscaled_logits`: the features' logits [T, E], rounded to the router's dtype, in float32."""
        h = self.features(x, state)
        bias = None if self.bias is None else self.bias.to(h.dtype)
        return _float(F.linear(h, self.weight.to(h.dtype), bias))

    def scores(self, logits: Tensor, x: Tensor) -> Tensor:
        """`TopKRouter.scores`, computed in the router's dtype (`compute_dtype`), in float32."""
        return _float(expert_scores(logits.to(compute_dtype(x)), self.score_func))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an `MLPRouter` computes in on x: x's where it is narrower than float32 (bf16, fp16), else float32."""
    return x.dtype if x.element_size() < 4 else torch.float32


def _linear(x: Tensor, linear: nn.Linear, dtype: torch.dtype) -> Tensor:
    """x [T, in] -> linear(x) [T, out], computed in `dtype`."""
    return F.linear(x.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype))
