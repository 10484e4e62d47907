"""Rotary position embeddings (RoPE) in the rotate-half layout of transformers' Llama.

Shape legend: S positions, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin: [max_len, Dh] (dimension i pairs with i + Dh/2), computed in float64; sin's
    first half negated, the sign of rotate-half folded in (what `apply_rope` takes)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [..., S, Dh]; cos, sin: [S, Dh] from `rope_tables`, or broadcastable to x -> x rotated by
    its positions' angles: x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], as
    [x2, x1] times the table's signed sin (the same numbers as negating x2; 2 operations fewer)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
