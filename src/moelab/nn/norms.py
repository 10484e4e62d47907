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
    of its own and is followed by `* scale * hidden_size**-0.5`). scale_first: the weight and
    multiplier scale x first (in float32, cast back to x's dtype) and the product is then normalised,
    nothing after (Muse Spark's post_expert_norm, `MuseSparkTextInputScaledRMSNorm`, weight 1 + its
    stored one); eps must then be > 0, so that a zero row (an empty slot's) stays zero."""

    def __init__(
        self, dim: int, eps: float = 1e-6, *, multiplier: float = 1.0, cast_first: bool = False,
        scale_first: bool = False,
    ):  # fmt: skip
        super().__init__()
        if not (eps > 0 if scale_first else eps >= 0):
            raise ValueError(f"ScaledRMSNorm.eps must be {'> 0 with scale_first' if scale_first else '>= 0'}, got {eps}")
        if cast_first and scale_first:
            raise ValueError("ScaledRMSNorm takes cast_first or scale_first, not both")
        self.dim, self.eps, self.multiplier, self.cast_first = dim, eps, multiplier, cast_first
        self.scale_first = scale_first
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ScaledRMSNorm expects input [..., {self.dim}], got {list(x.shape)}")
        if self.scale_first:
            x = self._scaled(_at_least_float32(x)).to(x.dtype)
            return _rms_normalised(_at_least_float32(x), self.eps).to(x.dtype)
        h = _rms_normalised(_at_least_float32(x), self.eps)
        if self.cast_first:
            h = h.to(x.dtype)
        return self._scaled(h).to(x.dtype)

    def _scaled(self, h: Tensor) -> Tensor:
        """h [..., D] times the weight (in h's dtype) and the multiplier."""
        h = h * self.weight.to(h.dtype)
        return h if self.multiplier == 1.0 else h * self.multiplier

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, eps={self.eps}, multiplier={self.multiplier}, cast_first={self.cast_first}, "
            f"scale_first={self.scale_first}"
        )


def _at_least_float32(x: Tensor) -> Tensor:
    """x in float32, or as it is where it is wider (float64)."""
    return x if x.element_size() >= 4 else x.float()


def _rms_normalised(h: Tensor, eps: float) -> Tensor:
    """h [..., D] / sqrt(mean(h^2) + eps), in h's dtype (`torch.pow(mean + eps, -0.5)`, as Gemma's norms)."""
    return h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
