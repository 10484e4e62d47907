"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.nn.blockffn import activation_locality_loss, chunk_sparsification_loss
from moelab.nn.dispatch import LocalDispatcher, plan_dispatch
from moelab.nn.experts import Experts, SharedExperts
from moelab.nn.losses import load_balancing_loss, router_entropy_loss, router_z_loss
from moelab.nn.routers import Router, Routing


@dataclass
class MoEResult:
    """What a forward pass reports besides its output.

    losses: coefficient-weighted auxiliary losses by name ("balance", "z", "entropy",
        "locality", "chunk_sparsity"), only
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

    @classmethod
    def merge(cls, results: list[MoEResult]) -> MoEResult:
        """Combine the results of several routed passes over the same tokens (e.g. the iterations
        of a Chain-of-Experts layer): losses and loads add up, experts per token add up, the
        dropped fraction is averaged, routings are kept only if every pass traced."""
        losses: dict[str, Tensor] = {}
        for result in results:
            for name, value in result.losses.items():
                losses[name] = losses[name] + value if name in losses else value
        return cls(
            losses=losses,
            tokens_per_expert=torch.stack([r.tokens_per_expert for r in results]).sum(0),
            dropped_fraction=torch.stack([r.dropped_fraction for r in results]).mean(),
            experts_per_token=torch.stack([r.experts_per_token for r in results]).sum(),
            routing=None,
        )

    @property
    def loss(self) -> Tensor:
        if not self.losses:
            device = None if self.tokens_per_expert is None else self.tokens_per_expert.device
            return torch.zeros((), device=device)
        return torch.stack(list(self.losses.values())).sum()


class MoELayer(nn.Module):
    """A sparse FFN: `forward(x [..., D]) -> (y [..., D], MoEResult)`.

    router: any `moelab.nn.routers.Router`; experts: stacked experts (`SwiGLUExperts`,
    `MLPExperts`); shared: optional always-on `SharedExperts` added to the routed output.
    capacity_factor: None for dropless dispatch (the default), else each expert keeps at most
    ceil(capacity_factor * T*K / E) assignments and the rest are dropped (Switch/GShard).
    balance_coef, z_coef, entropy_coef: weights of the auxiliary losses in `MoEResult.losses`.
    locality_coef, chunk_sparsity_coef, chunk_len: BlockFFN's activation-locality and chunk
        sparsification losses (`moelab.nn.blockffn`); they need input [B, S, D].
    trace: if True, every forward pass also returns its `Routing` in `MoEResult.routing`.
    dispatcher: how rows reach the experts; `LocalDispatcher` (default) or an expert-parallel
        one (`moelab.distributed`), in which case `experts` holds this rank's experts only.
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
        locality_coef: float = 0.0,
        chunk_sparsity_coef: float = 0.0,
        chunk_len: int = 64,
        trace: bool = False,
        dispatcher: LocalDispatcher | None = None,
    ):
        super().__init__()
        dispatcher = dispatcher or LocalDispatcher()
        local = dispatcher.num_local_experts(router.num_experts)
        if local != experts.num_experts or router.dim != experts.dim:
            raise ValueError(
                f"router ({router.num_experts} experts, {local} on this rank, dim {router.dim}) does not match "
                f"experts ({experts.num_experts} experts, dim {experts.dim})"
            )
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        self.router = router
        self.experts = experts
        self.shared = shared
        self.capacity_factor = capacity_factor
        self.coefs = {
            "balance": balance_coef,
            "z": z_coef,
            "entropy": entropy_coef,
            "locality": locality_coef,
            "chunk_sparsity": chunk_sparsity_coef,
        }
        self.chunk_len = chunk_len
        self.trace = trace
        self.dispatcher = dispatcher

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def causal(self) -> bool:
        """Whether a token's output depends on that token alone (safe in a causal LM): the router
        must be causal, and capacity dropping must be off (who is dropped depends on the batch)."""
        return self.router.causal and self.capacity_factor is None

    def forward(self, x: Tensor, router: Router | None = None) -> tuple[Tensor, MoEResult]:
        """x: [..., D] -> (y [..., D], MoEResult). `router` replaces the layer's own for this call
        (Chain-of-Experts routes each iteration with its own router over the same experts)."""
        router = self.router if router is None else router
        dim = router.dim
        if x.dim() == 0 or x.shape[-1] != dim:
            raise ValueError(f"MoE layer expects input [..., {dim}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE layer expects a floating-point input, got {x.dtype}")
        param_dtype = next(self.experts.parameters()).dtype
        if x.dtype != param_dtype:
            raise ValueError(
                f"input dtype {x.dtype} differs from the layer's parameters ({param_dtype}); "
                f"cast one of them (x.to({param_dtype}) or layer.to({x.dtype}))"
            )
        shape = x.shape
        x = x.reshape(-1, dim)
        routing = router(x)
        plan = plan_dispatch(routing.indices, self.num_experts, self.capacity_factor)
        batch = self.dispatcher.dispatch(x, routing.weights, plan)
        ys = self.experts(batch.rows, batch.counts, batch.row_weights)
        y = self.dispatcher.combine(ys, plan, batch)
        if self.shared is not None:
            y = y + self.shared(x)
        result = MoEResult(
            losses=self._losses(routing, shape[:-1]),
            tokens_per_expert=plan.tokens_per_expert,
            dropped_fraction=plan.dropped_fraction,
            experts_per_token=(routing.indices >= 0).sum() / max(x.shape[0], 1),
            routing=routing if self.trace else None,
        )
        return y.view(shape), result

    def _losses(self, routing: Routing, token_shape: torch.Size) -> dict[str, Tensor]:
        """The weighted auxiliary losses; token_shape is the input's shape without D ([B, S] for
        sequences), which the sequence-level BlockFFN losses need."""
        if (self.coefs["locality"] or self.coefs["chunk_sparsity"]) and len(token_shape) != 2:
            raise ValueError("the locality and chunk-sparsity losses need input of shape [batch, seq, dim]")
        compute = {
            "balance": lambda: load_balancing_loss(routing.probs, routing.indices),
            "z": lambda: router_z_loss(routing.logits),
            "entropy": lambda: router_entropy_loss(routing.probs),
            "locality": lambda: activation_locality_loss(routing.logits.view(*token_shape, -1)),
            "chunk_sparsity": lambda: chunk_sparsification_loss(routing.probs.view(*token_shape, -1), self.chunk_len),
        }
        return {name: coef * compute[name]() for name, coef in self.coefs.items() if coef}
