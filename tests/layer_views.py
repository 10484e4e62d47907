"""Random MoE layer views and hand-made statistics for the compression tests."""

from __future__ import annotations

import torch
from reference import F64

from moelab.compress.observers import SKIP_BINS
from moelab.compress.stats import LayerStats
from moelab.hf.view import ExpertsView, MoELayerView, RouterView, SharedView


def make_view(
    E: int = 6,
    D: int = 8,
    I: int = 5,
    *,
    top_k: int = 2,
    score_func: str = "softmax",
    renormalize: bool = True,
    route_scale: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    router_bias: dict[int, float] | None = None,
    selection_bias: bool = False,
    shared: bool = False,
    shared_gate: bool = False,
    scale_input: bool = False,
    zero_down: tuple[int, ...] = (),
    dtype: torch.dtype = F64,
    seed: int = 0,
    index: int = 0,
) -> MoELayerView:
    """A random MoE layer view at unit scale (logits and outputs O(1))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=F64) * fan_in**-0.5).to(dtype)

    weight = rnd(E, D, fan_in=D) * 2
    bias = None
    if router_bias is not None:
        bias = torch.zeros(E, dtype=dtype)
        for e, b in router_bias.items():
            bias[e] = b
    router = RouterView(
        weight,
        score_func,
        top_k,
        renormalize,
        route_scale=route_scale,
        n_group=n_group,
        topk_group=topk_group,
        bias=bias,
        selection_bias=rnd(E, fan_in=100) if selection_bias else None,
    )
    down = rnd(E, D, I, fan_in=I)
    for e in zero_down:
        down[e] = 0
    experts = ExpertsView(rnd(E, I, D, fan_in=D), rnd(E, I, D, fan_in=D), down, scale_input=scale_input)
    shared_view = None
    if shared:
        shared_view = SharedView(
            rnd(7, D, fan_in=D),
            rnd(7, D, fan_in=D),
            rnd(D, 7, fan_in=7),
            rnd(1, D, fan_in=D) if shared_gate else None,
        )
    return MoELayerView(index, router, experts, shared_view)


def stats_with(counts, **fields) -> LayerStats:
    """Statistics of one source and one half holding the usage counts [E], plus any other
    `LayerStats` fields given (a logit_gram given [E, E] is that half's and source's). The soft
    counts, gate and PreMoe sums are the counts in other orders (reversed, rotated by one and by
    two), so that a method reading the wrong one of them gets other numbers."""
    counts = torch.tensor(counts, dtype=F64)

    def cells(values: torch.Tensor) -> torch.Tensor:
        held = torch.zeros(2, 1, *values.shape, dtype=F64)
        held[0, 0] = values
        return held

    if fields.get("logit_gram") is not None and fields["logit_gram"].dim() == 2:
        fields["logit_gram"] = cells(fields["logit_gram"])

    return LayerStats(
        0,
        ("corpus",),
        tokens=torch.tensor([[float(counts.sum())], [0.0]], dtype=F64),
        counts=cells(counts),
        soft_counts=cells(counts.flip(0)),
        gate_sums=cells(counts.roll(1)),
        premoe_sums=cells(counts.roll(2)),
        skip_ratios=torch.zeros(SKIP_BINS, dtype=F64),
        **fields,
    )


class OneLayerModel:
    """The model view `Method.prepare` reads, holding one MoE layer (index 0); `reads` records
    each layer() call's (index, routed)."""

    def __init__(self, layer: MoELayerView):
        self._layer, self.reads = layer, []

    def layer(self, index: int, *, routed: bool = True) -> MoELayerView:
        assert index == 0
        self.reads.append((index, routed))
        return self._layer
