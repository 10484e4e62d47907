"""RoPE (`moelab.nn.rope`) against the textbook rotation, pair by pair in float64: dimension i
turns with i + Dh/2 by the angle position * theta^(-2i/Dh), forward and backward."""

import math

import pytest
import torch

from moelab.nn.rope import apply_rope, rope_tables


def naive_rope(x: torch.Tensor, positions: list[int], theta: float) -> torch.Tensor:
    """x: [S, Dh] float64 at `positions` -> each pair (x_i, x_{i+h}) rotated, one number at a time."""
    S, Dh = x.shape
    half = Dh // 2
    rows = []
    for s, p in enumerate(positions):
        row = [None] * Dh
        for i in range(half):
            angle = p * theta ** (-2 * i / Dh)
            a, b = x[s, i], x[s, i + half]
            row[i] = a * math.cos(angle) - b * math.sin(angle)
            row[i + half] = b * math.cos(angle) + a * math.sin(angle)
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("Dh,theta", [(8, 10000.0), (16, 500.0)])
def test_apply_rope_rotates_each_pair_by_its_angle_forward_and_backward(Dh, theta):
    torch.manual_seed(0)
    cos, sin = rope_tables(Dh, 64, theta)
    positions = [0, 1, 5, 63]
    x = torch.randn(len(positions), Dh, dtype=torch.float64, requires_grad=True)
    got = apply_rope(x, cos[positions].double(), sin[positions].double())
    want = naive_rope(x, positions, theta)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the tables are float32
    g = torch.randn_like(got)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0], rtol=1e-6, atol=1e-6
    )
    assert torch.equal(got[0], x[0])  # position 0 does not turn


def test_apply_rope_broadcasts_over_batch_and_heads_and_keeps_dtype():
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(2, 3, 5, 8)  # [B, H, S, Dh]
    y = apply_rope(x, cos[:5], sin[:5])
    assert y.shape == x.shape and y.dtype == x.dtype
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(y[b, h], apply_rope(x[b, h], cos[:5], sin[:5]))
    half = x.view(2, 3, 5, 2, 4)  # each pair keeps its length
    torch.testing.assert_close(half.pow(2).sum(3), y.view(2, 3, 5, 2, 4).pow(2).sum(3))
