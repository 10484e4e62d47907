"""PhiMoE's sparsemixer router, at inference.

Shape legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.nn.routers import Router, Routing, check_top_k
from moelab.validation import is_number


class SparseMixerRouter(Router):
    """PhiMoE's sparsemixer at inference (transformers `sparsemixer`, training=False).

    For each of the K rounds: m = the best logit not yet chosen; the slot's weight is the
    softmax, over the not-yet-chosen logits l with (m - l) / max(|l|, m) <= 2 * jitter_eps, taken
    at m. The weights are not renormalised. (Training's Gumbel sampling and Heun-style gradient
    are not reproduced.) probs: softmax of the logits, for the balance losses.

    forward(x [T, D]) -> Routing(indices [T, K], weights [T, K], logits [T, E], probs [T, E]).
    """

    def __init__(self, dim: int, num_experts: int, *, jitter_eps: float, top_k: int = 2, bias: bool = False):
        super().__init__(dim, num_experts, bias=bias)
        check_top_k(top_k, num_experts)
        if not (is_number(jitter_eps) and math.isfinite(jitter_eps) and jitter_eps >= 0):
            raise ValueError(f"jitter_eps must be >= 0 and finite, got {jitter_eps}")
        self.jitter_eps = jitter_eps
        self.top_k = top_k

    def forward(self, x: Tensor) -> Routing:
        logits = self.router_logits(x)
        remaining = logits
        indices, weights = [], []
        for _ in range(self.top_k):
            best, index = remaining.max(dim=-1, keepdim=True)  # [T, 1]
            far = (best - logits) / logits.abs().clamp(min=best) > 2 * self.jitter_eps  # [T, E]
            weights.append(remaining.masked_fill(far, float("-inf")).softmax(-1).gather(-1, index))
            indices.append(index)
            remaining = remaining.scatter(-1, index, float("-inf"))
        return Routing(torch.cat(indices, -1), torch.cat(weights, -1), logits, logits.softmax(-1))
