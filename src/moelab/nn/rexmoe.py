"""ReXMoE (Tan et al. 2025): routers that reuse the experts of adjacent layers.

Shape legend: E experts owned by one layer, r layers per reuse group, P = r*E experts in a pool.

RECONSTRUCTION: no public code exists and only the abstract was available; this follows
`research/architectures.md` §6.1. The MoE layers are cut into groups of r consecutive MoE
layers. A group owns one pool of r*E stacked experts (each expert one set of weights; layer j
of the group owns experts j*E .. (j+1)*E - 1), and every layer of the group routes top-k over
the whole pool with its own router of r*E outputs: the only extra parameters are the larger
routers. Load balancing is computed per layer over the pool (an expert's load from the other
layers of its group is not added).

Progressive Scaling Routing (PSR): foreign experts start masked and are unmasked gradually.
`set_reuse_progress(model, f)` unmasks the first round(f * (r-1)*E) foreign experts of every
router (nearest layers first, then by index); `attach_progressive_scaling` does so after every
optimizer step on a linear ramp. Without either, every expert of the pool is a candidate. The
mask is part of the state dict (`router.candidates`), so a checkpoint saved mid-ramp reloads
routing as it did.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.nn.routers import TopKRouter


class ReuseRouter(TopKRouter):
    """Top-k router over a pool of `reuse * num_local` experts; `position` is this layer's place
    in its group (it owns experts position*num_local .. (position+1)*num_local - 1)."""

    def __init__(self, dim: int, num_local: int, reuse: int, position: int, top_k: int, **kwargs):
        if reuse < 1 or not 0 <= position < reuse:
            raise ValueError(f"need reuse >= 1 and 0 <= position < reuse, got reuse={reuse}, position={position}")
        if top_k > num_local:
            raise ValueError(
                f"top_k ({top_k}) must not exceed the {num_local} experts a layer owns (PSR starts with those)"
            )
        super().__init__(dim, reuse * num_local, top_k, **kwargs)
        self.num_local, self.reuse, self.position = num_local, reuse, position
        distance = [abs(e // num_local - position) for e in range(reuse * num_local)]  # to the owning layer
        # foreign experts in unmasking order: nearest owning layer first, then by index
        foreign = sorted((e for e, d in enumerate(distance) if d > 0), key=lambda e: (distance[e], e))
        self.register_buffer("unmask_order", torch.tensor(foreign, dtype=torch.long), persistent=False)
        # the PSR mask is saved with the weights: a checkpoint written mid-ramp routes as it did
        self.register_buffer("candidates", torch.ones(reuse * num_local, dtype=torch.bool))
        self.whole_pool = True  # every expert a candidate: routing skips the mask (a decode step 13 % faster)
        self.register_load_state_dict_post_hook(lambda module, _: module._note_pool())

    @property
    def masked(self) -> Tensor | None:
        return None if self.whole_pool else self.candidates

    def _note_pool(self) -> None:
        self.whole_pool = bool(self.candidates.all())

    @torch.no_grad()
    def set_progress(self, fraction: float) -> None:
        """Make the own experts and the first round(fraction * foreign) foreign ones candidates."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"PSR progress must lie in [0, 1], got {fraction}")
        mask = torch.zeros(self.num_experts, dtype=torch.bool, device=self.weight.device)
        mask[self.position * self.num_local : (self.position + 1) * self.num_local] = True
        mask[self.unmask_order[: round(fraction * len(self.unmask_order))]] = True
        self.candidates = mask
        self._note_pool()


def set_reuse_progress(model: nn.Module, fraction: float) -> None:
    """Set the PSR progress (0 = own experts only, 1 = the whole pool) of every ReXMoE router."""
    routers = [m for m in model.modules() if isinstance(m, ReuseRouter)]
    if not routers:
        raise ValueError("model has no ReXMoE router (MoEConfig.reuse_layers > 1); nothing to schedule")
    for router in routers:
        router.set_progress(fraction)


def attach_progressive_scaling(optimizer: torch.optim.Optimizer, model: nn.Module, ramp_steps: int):
    """Start PSR at 0 now and raise it linearly to 1 over `ramp_steps` optimizer steps (a step
    post-hook, like `attach_selection_bias_update`). Returns the hook handle."""
    if ramp_steps < 1:
        raise ValueError(f"ramp_steps must be >= 1, got {ramp_steps}")
    set_reuse_progress(model, 0.0)
    steps = 0

    def hook(*_):
        nonlocal steps
        steps += 1
        set_reuse_progress(model, min(steps / ramp_steps, 1.0))

    return optimizer.register_step_post_hook(hook)
