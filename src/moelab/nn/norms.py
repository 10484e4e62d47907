"""The RMS norms some MoE blocks put around their router and experts (Gemma 4's MoE).

Shape legend: D model dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ScaledRMSNorm(nn.Module):
    """x [..., D] -> x / sqrt(mean(x^2) + eps) * weight * multiplier, computed in float32 (float64
    for float64 x) and cast back to x's dtype (as Gemma's norms compute it: `torch.pow(mean + eps,
    -0.5)`); weight: [D]. Gemma 4's router reads its input so, with multiplier D^-0.5
    (`Gemma4TextRouter`); its experts' input and their summed output with multiplier 1
    (`pre_feedforward_layernorm_2`, `post_feedforward_layernorm_2`). cast_first: cast back before the
    weight and multiplier, which then apply in x's dtype (Gemma 4's router, whose norm has no weight
    of its own and is followed by `* scale * hidden_size**-0.5`)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, multiplier: float = 1.0, cast_first: bool = False):
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"ScaledRMSNorm.eps must be >= 0, got {eps}")
        self.dim, self.eps, self.multiplier, self.cast_first = dim, eps, multiplier, cast_first
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ScaledRMSNorm expects input [..., {self.dim}], got {list(x.shape)}")
        h = x if x.element_size() >= 4 else x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.cast_first:
            h = h.to(x.dtype)
        h = h * self.weight.to(h.dtype)
        if self.multiplier != 1.0:
            h = h * self.multiplier
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, multiplier={self.multiplier}, cast_first={self.cast_first}"
