"""Chain-of-Experts (Wang et al. 2025, arXiv 2506.18945): C routed passes over the same experts.

    z_0 = x;  z_t = z_{t-1} + MoE_t(z_{t-1}),  t = 1..C

Each iteration t has its own router; the routed experts and the shared experts are reused in
every iteration (the shared experts therefore run C times, as in the reference code). With
C = 1 this is exactly the plain MoE layer.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from moelab.nn.moe import MoELayer, MoEResult


class ChainOfExperts(nn.Module):
    """`forward(x [..., D]) -> (sum_t MoE_t(z_{t-1}) [..., D], MoEResult)`.

    Returns the chain's update z_C - x, so that a block adds it to the
    residual stream it chooses (the reference code adds it to the normalised input and drops the
    pre-norm stream; see `moelab.models`). `layer` supplies iteration 1's router, the experts,
    the shared experts and the loss settings; iterations 2..C get fresh routers of the same kind.
    """

    def __init__(self, layer: MoELayer, iterations: int):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"Chain-of-Experts needs iterations >= 1, got {iterations}")
        self.layer = layer
        self.extra_routers = nn.ModuleList(_fresh_copy(layer.router) for _ in range(iterations - 1))

    @property
    def iterations(self) -> int:
        return 1 + len(self.extra_routers)

    @property
    def causal(self) -> bool:
        return self.layer.causal

    def forward(self, x: Tensor, *, context: dict[str, Tensor] | None = None) -> tuple[Tensor, MoEResult]:
        """x: [..., D] -> (z_C - x, the iterations' merged MoEResult)."""
        z, total, results = x, None, []
        for router in [self.layer.router, *self.extra_routers]:
            update, result = self.layer(z, router=router, context=context)
            z = z + update
            total = update if total is None else total + update
            results.append(result)
        return total, MoEResult.merge(results)

    def infer(self, x: Tensor, *, context: dict[str, Tensor] | None = None) -> Tensor:
        """forward's output alone, each iteration through the layer's decode path (`MoELayer.infer`)."""
        z, total = x, None
        for router in [self.layer.router, *self.extra_routers]:
            update = self.layer.infer(z, router, context=context)
            z = z + update
            total = update if total is None else total + update
        return total


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with its gate re-initialised (same kind, independent weights)."""
    clone = copy.deepcopy(module)
    nn.init.normal_(clone.weight, std=clone.dim**-0.5)
    return clone
