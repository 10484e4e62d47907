"""Calibration observers and statistics: cases the naive-loop comparisons of
`test_compress_reference.py` do not reach (found by mutation testing)."""

from __future__ import annotations

import torch
from layer_views import make_view
from reference import F64, silu
from test_compress_reference import params

from moelab.compress.observers import ContributionObserver, MoECall, Tokens, eager_moe
from moelab.hf.native import moe_layer_from_view
from moelab.nn.routers import Routing


def test_kept_hidden_activations_are_detached_and_are_each_slots_activation():
    """The backward sweep's hidden [T, K, I] is each slot's silu(gate) * up, and holds no autograd
    graph (it is kept for the whole layer's calls; only its gradient hook sees the graph)."""
    layer = moe_layer_from_view(make_view(seed=4))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    call = eager_moe(layer, x, keep_hidden=True)
    assert call.output.requires_grad
    assert not call.hidden.requires_grad and call.hidden.grad_fn is None
    p, I = params(layer), layer.experts.hidden_dim
    for t in range(5):
        for k in range(call.routing.indices.shape[1]):
            W = p["experts.gate_up_proj"][int(call.routing.indices[t, k])]
            expected = silu(W[:I] @ x[t].detach()) * (W[I:] @ x[t].detach())
            torch.testing.assert_close(call.hidden[t, k], expected, rtol=1e-12, atol=1e-12)


def test_easy_ep_importance_is_never_negative_when_float32_rounds_cos_above_one():
    """max(0, 1 - cos): a routed output tiny beside the residual turns it by less than float32
    resolves, and cos(h, h + y) rounds to just above 1 for some tokens; those add 0, not a
    negative importance. One expert per token, so each token is its own cell."""
    T, D = 64, 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=g) * 1e5
    y = torch.randn(T, 1, D, generator=g)
    cos = torch.nn.functional.cosine_similarity(h, h + y[:, 0], dim=-1)
    assert (cos > 1).any(), "the case needs tokens whose cos rounds above 1"
    routing = Routing(torch.arange(T)[:, None], torch.ones(T, 1), torch.zeros(T, T), torch.zeros(T, T))
    call = MoECall(torch.zeros(T, D), routing, y, None, None)
    observer = ContributionObserver(T, 1, D, {})
    zeros = torch.zeros(T, dtype=torch.int64)
    observer.update(call, Tokens(zeros, zeros, torch.arange(T)), h + y[:, 0])
    sums = observer.result()["easyep_sums"][0, 0]
    assert (sums >= 0).all(), sums.min()
    assert not sums[cos > 1].any()
