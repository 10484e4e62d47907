"""Graph-of-tokens routing (Nguyen et al. 2025, arXiv 2505.00792): similarity-aware and
attention-aware (S)MoE.

Shape legend: B sequences, S positions, T = B*S tokens, D model dim, E experts, K top-k,
H query heads, G key/value heads, Dh head dim.

RECONSTRUCTION: no public code exists and only the abstract was available; the equations follow
`research/architectures.md` §5. A token's expert choice is made to depend on related tokens:

    P = softmax(X W_r^T)                       [B, S, E]  the usual router distribution
    P~ = A P                                   [B, S, E]  mixed over a token graph A [B, S, S]
    top-k of P~_t; combine weights P~_t,e (renormalised over the k chosen if `renormalize`)

- similarity-aware: A_ij = softmax_j((x_i W_s)^T x_j / tau) over j <= i (W_s: [D, D] learned,
  or the identity; tau defaults to sqrt(D)).
- attention-aware: A = mean over heads of the preceding self-attention's probabilities; A P is
  computed as attention(Q, K, P) with the block's queries and keys, so A is never materialised.

Both graphs are causally masked (j <= i), so the routing of token t sees only tokens <= t and
is safe in a causal LM. They need whole sequences, so a model with these routers decodes
without a KV cache (it recomputes the prefix). `Routing.probs` is P~, the distribution the
selection uses (the balance and entropy losses see it).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.routers import Router, Routing, check_top_k
from moelab.validation import is_positive_finite


class GraphRouter(Router):
    """Base: top-k over a token-graph mixture of the router distribution. `forward(x [B, S, D],
    context) -> Routing` with [T, K] indices and weights."""

    needs_sequences = True

    def __init__(self, dim: int, num_experts: int, top_k: int, *, renormalize: bool = True, bias: bool = False):
        super().__init__(dim, num_experts, bias=bias)
        check_top_k(top_k, num_experts)
        self.top_k = top_k
        self.renormalize = renormalize

    def mix(self, x: Tensor, probs: Tensor, context: dict[str, Tensor]) -> Tensor:
        """x: [B, S, D], probs: [B, S, E] -> A probs: [B, S, E]."""
        raise NotImplementedError

    def forward(self, x: Tensor, context: dict[str, Tensor] | None = None) -> Routing:
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} needs x of shape [batch, seq, {self.dim}], got {list(x.shape)}")
        B, S, D = x.shape
        E = self.num_experts
        logits = self.router_logits(x.reshape(B * S, D))
        mixed = self.mix(x, logits.softmax(-1).view(B, S, E), context or {}).reshape(B * S, E)
        weights, indices = mixed.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(indices, weights, logits, mixed)


class SimilarityRouter(GraphRouter):
    """Similarity-aware routing: A = causal softmax((X W_s) X^T / tau). `similarity: Linear(D, D)`
    (identity at init) if `learned`, else W_s = I."""

    def __init__(
        self, dim: int, num_experts: int, top_k: int, *, learned: bool = True, tau: float | None = None, **kwargs
    ):
        super().__init__(dim, num_experts, top_k, **kwargs)
        if tau is not None and not is_positive_finite(tau):
            raise ValueError(f"graph temperature tau must be > 0 and finite (or None: sqrt(dim)), got {tau}")
        self.tau = math.sqrt(dim) if tau is None else tau
        self.similarity = nn.Linear(dim, dim, bias=False) if learned else None
        if self.similarity is not None:
            nn.init.eye_(self.similarity.weight)

    def mix(self, x: Tensor, probs: Tensor, context: dict[str, Tensor]) -> Tensor:
        keys = x.float()
        queries = keys if self.similarity is None else F.linear(keys, self.similarity.weight.float())
        return F.scaled_dot_product_attention(queries, keys, probs, is_causal=True, scale=1.0 / self.tau)


class AttentionRouter(GraphRouter):
    """Attention-aware routing: A = the block attention's probabilities averaged over heads.
    context["q"]: [B, H, S, Dh] and context["k"]: [B, G, S, Dh] (after RoPE), as the attention
    used them; no parameters beyond the router's."""

    def mix(self, x: Tensor, probs: Tensor, context: dict[str, Tensor]) -> Tensor:
        if "q" not in context or "k" not in context:
            raise ValueError("attention-aware routing needs the block's attention queries and keys (context 'q', 'k')")
        q, k = context["q"].float(), context["k"].float()
        values = probs.unsqueeze(1).expand(-1, k.shape[1], -1, -1)  # [B, G, S, E]
        mixed = F.scaled_dot_product_attention(q, k, values, is_causal=True, enable_gqa=True)  # [B, H, S, E]
        return mixed.mean(1)
