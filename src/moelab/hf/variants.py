"""Routing and expert variants of released MoE families that `moelab.nn` does not have yet.

Shape legend: T tokens, D model dim, E experts, K slots per token, N routed rows, I expert hidden dim.

They plug into `moelab.nn.MoELayer` like the core modules, and are written as plain readable
references (no fused backend). Candidates to move into `moelab.nn`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.nn.experts import SwiGLUExperts
from moelab.nn.routers import Router, Routing


class SparseMixerRouter(Router):
    """PhiMoE's sparsemixer at inference (transformers `sparsemixer`, training=False).

    For each of the K rounds: m = the best logit not yet chosen; the slot's weight is the
    softmax, over the not-yet-chosen logits l with (m - l) / max(|l|, m) <= 2 * jitter_eps, taken
    at m. The weights are not renormalised. (Training's Gumbel sampling and Heun-style gradient
    are not reproduced.) probs: softmax of the logits, for the balance losses.
    """

    def __init__(self, dim: int, num_experts: int, *, jitter_eps: float, top_k: int = 2):
        super().__init__(dim, num_experts)
        self.jitter_eps = jitter_eps
        self.top_k = top_k

    def forward(self, x: Tensor) -> Routing:
        logits = self.router_logits(x)
        remaining = logits
        indices, weights = [], []
        for _ in range(self.top_k):
            best, index = remaining.max(dim=-1, keepdim=True)
            far = (best - logits) / logits.abs().clamp(min=best) > 2 * self.jitter_eps
            weights.append(remaining.masked_fill(far, float("-inf")).softmax(-1).gather(-1, index))
            indices.append(index)
            remaining = remaining.scatter(-1, index, float("-inf"))
        return Routing(torch.cat(indices, -1), torch.cat(weights, -1), logits, logits.softmax(-1))


class ClampedSwiGLUExperts(SwiGLUExperts):
    """GPT-OSS experts: [g, u] = gate_up_proj x + gate_up_bias, g' = min(g, limit),
    u' = clamp(u, -limit, limit), y = down_proj (g' * sigmoid(alpha * g') * (u' + 1)) + down_bias.

    Same parameters as `SwiGLUExperts` (gate rows first); the routing weight scales y.
    """

    def __init__(
        self, num_experts: int, dim: int, hidden_dim: int, *, alpha: float, limit: float, bias: bool = True
    ):
        super().__init__(num_experts, dim, hidden_dim, bias=bias)
        self.alpha = alpha
        self.limit = limit

    def forward(self, xs: Tensor, counts: Sequence[int], row_weights: Tensor | None = None) -> Tensor:
        self._check(xs)
        ys = []
        for e, rows in enumerate(xs.split(list(counts))):
            gate_bias = None if self.gate_up_bias is None else self.gate_up_bias[e]
            gate, up = F.linear(rows, self.gate_up_proj[e], gate_bias).chunk(2, dim=-1)
            gate = gate.clamp(max=self.limit)
            hidden = gate * torch.sigmoid(self.alpha * gate) * (up.clamp(-self.limit, self.limit) + 1)
            ys.append(
                F.linear(hidden, self.down_proj[e], None if self.down_bias is None else self.down_bias[e])
            )
        ys = torch.cat(ys)
        return ys if row_weights is None else ys * row_weights[:, None].to(ys.dtype)


class InputScaledSwiGLUExperts(SwiGLUExperts):
    """Llama 4 experts: the routing weight w scales the expert's input, y = expert(w * x), not
    its output. Same parameters and backends as `SwiGLUExperts`."""

    def forward(self, xs: Tensor, counts: Sequence[int], row_weights: Tensor | None = None) -> Tensor:
        if row_weights is not None:
            xs = xs * row_weights[:, None].to(xs.dtype)
        return super().forward(xs, counts)
