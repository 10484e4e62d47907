"""Router re-calibration: after experts are pruned, merged or narrowed, fit the router alone so
that the edited layer reproduces the original layer's output (layer-local distillation from the
base model; experts, shared experts and a correction bias frozen).

Shape legend: N sampled tokens, D model dim, E' experts after the edit.

    loss(W, b) = sum_n || y_base(x_n) - y_edited(x_n; W, b) ||^2  /  sum_n || y_base(x_n) ||^2

x: the calibration's sampled MoE inputs (`inputs` statistic, [N, D]); y_base: the original layer
in float64 (`moe_output`); y_edited: the edited layer in float32 with trainable router weight
[E', D] (an MLP router's, ZAYA's, [E', R] on its features; and bias; over the identity experts' too where the
router has them, LongCat-Flash's, ZAYA's). A layer that outputs zero on every sampled token of either part
(ZAYA's skip expert chosen by all) has nothing to fit and keeps the edit's router. Every fourth sampled token is held out; full-batch Adam runs `steps` steps and
the router with the lowest held-out loss is kept (the edit's own router included), so the fit
never makes the held-out loss worse. The top-k choice is not differentiable; the gradient flows
through the combine weights, which is also what restores them for softmax routers without top-k
renormalisation, whose kept weights pruning shifts. Deterministic for a given thread count.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from moelab.hf.edit import LayerEdit, apply_edit, layer_output, moe_output
from moelab.hf.native import moe_layer_from_view
from moelab.hf.view import MoELayerView
from moelab.nn.moe import MoELayer
from moelab.validation import check_field_types

HOLDOUT_EVERY = 4  # every 4th sampled token is held out


@dataclasses.dataclass(frozen=True)
class RouterFit:
    """steps: Adam steps (0: no re-calibration); lr: Adam's learning rate."""

    steps: int = 0
    lr: float = 1e-3

    def __post_init__(self):
        check_field_types(self)
        if self.steps < 0:
            raise ValueError(f"router re-calibration needs steps >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"router re-calibration needs a learning rate > 0, got {self.lr}")


def refit_router(
    layer: MoELayerView, edit: LayerEdit, inputs: Tensor | None, fit: RouterFit, ids: Tensor | None = None
) -> tuple[LayerEdit, dict[str, float | str]]:
    """(the edit with the fitted router, notes: train and held-out loss before and after, and the
    step kept; "skipped": why not, where the layer's output is zero). `layer`: the original layer; `inputs`: [N, D] its sampled inputs, `ids` the router's
    per-token input (`LayerStats.router_inputs`: a hash router's token ids [N], an MLP router's states [N, R])."""
    if inputs is None or inputs.shape[0] < HOLDOUT_EVERY or not (inputs != 0).any():
        raise ValueError(
            f"router re-calibration needs sampled layer inputs; layer {layer.index}'s statistics have fewer than "
            f"{HOLDOUT_EVERY} (calibrate with sample_tokens >= {HOLDOUT_EVERY})"
        )
    edited = apply_edit(layer, edit)
    x = inputs.float()
    target = moe_output(layer, x, ids=ids).float()
    held = torch.zeros(x.shape[0], dtype=torch.bool)
    held[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY] = True
    if not all((target[part] != 0).any() for part in (held, ~held)):  # every token's slots add nothing (ZAYA's skip)
        return LayerEdit(edit.sources, edited), {"steps": fit.steps, "lr": fit.lr, "skipped": "the layer outputs zero"}
    student = _student(edited)
    params = [p for p in student.router.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=fit.lr)

    def losses() -> tuple[Tensor, Tensor]:
        error = (layer_output(student, x, ids) - target).pow(2).sum(-1)
        scale = target.pow(2).sum(-1)
        return error[~held].sum() / scale[~held].sum(), error[held].sum() / scale[held].sum()

    train, heldout = losses()
    notes: dict[str, float | str] = {
        "steps": fit.steps,
        "lr": fit.lr,
        "train_before": _value(train),
        "heldout_before": _value(heldout),
    }
    best, best_step, best_state = _value(heldout), 0, [p.detach().clone() for p in params]
    for step in range(1, fit.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        train.backward()
        optimizer.step()
        train, heldout = losses()
        if _value(heldout) < best:
            best, best_step, best_state = _value(heldout), step, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, kept in zip(params, best_state):
            p.copy_(kept)
        train, heldout = losses()
    notes |= {"train_after": float(train), "heldout_after": float(heldout), "best_step": best_step}
    if best_step == 0:  # nothing better than the edit's own router
        return LayerEdit(edit.sources, edited), notes
    dtype = edited.router.weight.dtype
    router = edited.router.with_rows(
        student.router.weight.detach().to(dtype),
        None if edited.router.bias is None else student.router.bias.detach().to(dtype),
    )
    return LayerEdit(edit.sources, dataclasses.replace(edited, router=router)), notes


def _value(loss: Tensor) -> float:
    return float(loss.detach())


def _student(edited: MoELayerView) -> MoELayer:
    """The edited layer in float32 on copies of its tensors; only the router's weight and bias
    train (identity experts' rows included)."""
    layer = moe_layer_from_view(edited).float()
    layer.router.weight = torch.nn.Parameter(edited.router.with_identity_rows("weight").detach().float().clone())
    if edited.router.bias is not None:
        layer.router.bias = torch.nn.Parameter(edited.router.with_identity_rows("bias").detach().float().clone())
    for name, p in layer.named_parameters():
        p.requires_grad_(name in ("router.weight", "router.bias"))
    return layer.eval()  # inference routing: no jitter, no load counters
