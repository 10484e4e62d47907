"""`ScaledRMSNorm` in bf16 against the formulas of the norms it stands for, written out here: where
each one rounds to bf16 changes the bits, so each order is checked bit for bit."""

import pytest
import torch

from moelab.nn.norms import ScaledRMSNorm

D, EPS, MULTIPLIER = 64, 1e-6, 64**-0.5


def _normed(h):
    """h [..., D] float32 / sqrt(mean(h^2) + eps), as Gemma's norms compute it."""
    return h * torch.pow(h.pow(2).mean(-1, keepdim=True) + EPS, -0.5)


def _plain(x, weight):
    """Gemma 4's `pre/post_feedforward_layernorm_2` (multiplier 1 there; here D^-0.5): all in float32,
    rounded once."""
    return (_normed(x.float()) * weight.float() * MULTIPLIER).to(x.dtype)


def _cast_first(x, weight):
    """Gemma 4's router (`Gemma4TextRouter`): normed in float32, rounded, then `* scale * D^-0.5` in bf16."""
    return _normed(x.float()).to(x.dtype) * weight.to(x.dtype) * MULTIPLIER


def _scale_first(x, weight):
    """Muse Spark's `MuseSparkTextInputScaledRMSNorm`: x * weight in float32, rounded, then normed."""
    scaled = (x.float() * weight.float() * MULTIPLIER).to(x.dtype)
    return _normed(scaled.float()).to(x.dtype)


ORDERS = {"plain": _plain, "cast_first": _cast_first, "scale_first": _scale_first}


@pytest.mark.parametrize("order", list(ORDERS))
def test_each_order_rounds_where_its_model_rounds(order):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(256, D, generator=g)).bfloat16()
    norm = ScaledRMSNorm(D, EPS, multiplier=MULTIPLIER, **({order: True} if order != "plain" else {}))
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(D, generator=g))
        norm.bfloat16()
        got = norm(x)
        want = ORDERS[order](x, norm.weight)
        others = [n for n, f in ORDERS.items() if n != order and torch.equal(f(x, norm.weight), want)]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert not others, f"the data must tell {order} from {others}"
