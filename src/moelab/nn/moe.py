"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.nn.dispatch import LocalDispatcher, plan_dispatch
from moelab.nn.experts import Experts, SharedExperts
from moelab.nn.losses import load_balancing_loss, router_entropy_loss, router_z_loss
from moelab.nn.routers import Router, Routing


@dataclass
class MoEResult:
    """What a forward pass reports besides its output.

    losses: coefficient-weighted auxiliary losses by name ("balance", "z", "entropy"), only
        those with a non-zero coefficient; `loss` is their sum (0 if none).
    tokens_per_expert: [E] assignments per expert (the load, before capacity dropping).
    dropped_fraction: [] fraction of assignments dropped by the capacity limit (0 if dropless).
    experts_per_token: [] mean number of experts a token was sent to.
    routing: the router's full output when the layer was asked to trace, else None.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    tokens_per_expert: Tensor | None = None
    dropped_fraction: Tensor | None = None
    experts_per_token: Tensor | None = None
    routing: Routing | None = None

    @property
    def loss(self) -> Tensor:
        if not self.losses:
            return torch.zeros(())
        return torch.stack(list(self.losses.values())).sum()


class MoELayer(nn.Module):
    """A sparse FFN: `forward(x [..., D]) -> (y [..., D], MoEResult)`.

    router: any `moelab.nn.routers.Router`; experts: stacked experts (`SwiGLUExperts`,
    `MLPExperts`); shared: optional always-on `SharedExperts` added to the routed output.
    capacity_factor: None for dropless dispatch (the default), else each expert keeps at most
    ceil(capacity_factor * T*K / E) assignments and the rest are dropped (Switch/GShard).
    balance_coef, z_coef, entropy_coef: weights of the auxiliary losses in `MoEResult.losses`.
    trace: if True, every forward pass also returns its `Routing` in `MoEResult.routing`.
    """

    def __init__(
        self,
        router: Router,
        experts: Experts,
        shared: SharedExperts | None = None,
        *,
        capacity_factor: float | None = None,
        balance_coef: float = 0.0,
        z_coef: float = 0.0,
        entropy_coef: float = 0.0,
        trace: bool = False,
    ):
        super().__init__()
        if router.num_experts != experts.num_experts or router.dim != experts.dim:
            raise ValueError(
                f"router ({router.num_experts} experts, dim {router.dim}) does not match experts "
                f"({experts.num_experts} experts, dim {experts.dim})"
            )
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        self.router = router
        self.experts = experts
        self.shared = shared
        self.capacity_factor = capacity_factor
        self.coefs = {"balance": balance_coef, "z": z_coef, "entropy": entropy_coef}
        self.trace = trace
        self.dispatcher = LocalDispatcher()

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x: Tensor) -> tuple[Tensor, MoEResult]:
        dim = self.router.dim
        if x.shape[-1] != dim:
            raise ValueError(f"MoE layer expects input [..., {dim}], got {list(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, dim)
        routing = self.router(x)
        plan = plan_dispatch(routing.indices, self.num_experts, self.capacity_factor)
        xs, row_weights, counts = self.dispatcher.dispatch(x, routing.weights, plan)
        ys = self.experts(xs, counts, row_weights)
        y = self.dispatcher.combine(ys, plan)
        if self.shared is not None:
            y = y + self.shared(x)
        result = MoEResult(
            losses=self._losses(routing),
            tokens_per_expert=plan.tokens_per_expert,
            dropped_fraction=plan.dropped_fraction,
            experts_per_token=(routing.indices >= 0).sum(-1).float().mean(),
            routing=routing if self.trace else None,
        )
        return y.view(shape), result

    def _losses(self, routing: Routing) -> dict[str, Tensor]:
        compute = {
            "balance": lambda: load_balancing_loss(routing.probs, routing.indices),
            "z": lambda: router_z_loss(routing.logits),
            "entropy": lambda: router_entropy_loss(routing.probs),
        }
        return {name: coef * compute[name]() for name, coef in self.coefs.items() if coef}
