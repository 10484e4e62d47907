"""HEAPr (Li et al., ICLR 2026): prune "atomic experts", the single hidden neurons of routed
experts, by a second-order importance in the expert's output space, and keep every expert.

Neuron j of expert e is scored S_ej = mean_t(h_tj^2) * mean_t((w_j . g_t)^2) over the tokens
routed to e: h_tj its activation, w_j its column of the down projection, g_t the gradient of the
loss at the expert's output (the Gauss-Newton form of the paper's w_j^T H_e w_j, accumulated
without the D x D matrix). An expert no calibration token chose scores -1, so it goes first.

The budget is the paper's: `ratio` of the routed experts' neurons (so of their parameters) goes,
i.e. a layer keeps keep/E of them (Target.keep experts' worth, `share_kept`; rounded to whole
neurons, never to whole experts). Layouts ("auto", the default:
uniform, or padded where the family's shared experts take their width from the routed ones'):
- "uniform": every expert keeps its best I' = round(I keep / E) neurons; the result is
  a checkpoint with narrower experts that transformers loads (one width per model).
- "padded": the paper's global ranking: all neurons of all layers ranked together, the best
  kept; widths differ per expert, so the pruned neurons are zeroed at full width and the report
  counts the parameters of the narrow form (`total_compact`). The function is the paper's;
  the size on disk is not smaller. Protected (super) experts keep all their neurons.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from moelab.compress.methods.base import LayerDecision, Method, Target
from moelab.compress.methods.lowrank import compact_notes
from moelab.compress.stats import LayerStats
from moelab.hf.edit import LayerEdit
from moelab.hf.view import ExpertsView, MoELayerView

LAYOUTS = ("auto", "uniform", "padded")


class HEAPr(Method):
    name = "heapr"
    summary = "prune neurons inside every expert by second-order importance (HEAPr); experts get narrower"
    needs = ("routing", "neurons")
    needs_weights = True
    narrows: ClassVar[bool] = True

    def __init__(self, layout: str = "auto"):
        if layout not in LAYOUTS:
            raise ValueError(f"heapr layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.threshold: tuple[float, int, int] | None = None
        self.align = 1  # a width granularity the output needs (`settle`)

    def options(self):
        return {"layout": self.layout}

    @property
    def changes_width(self) -> bool:
        return self.layout == "uniform"

    def settle(self, width_fixed: bool, align: int = 1) -> None:
        if self.layout == "auto":
            self.layout = "padded" if width_fixed else "uniform"
        self.align = align

    def check_width(self, hidden_dim: int, num_experts: int, keep: float, where: str = "") -> None:
        if self.layout == "uniform":
            uniform_width(hidden_dim, num_experts, keep, where, self.align)

    def check_protection(self, where: str = "") -> None:
        if self.layout == "uniform":
            raise ValueError(
                f"{where}heapr's uniform layout narrows every expert alike, so it cannot spare protected (super) "
                "experts; use layout='padded' (--option layout=padded) or drop the protection"
            )

    def prepare(self, view, stats: dict[int, LayerStats], targets: dict[int, Target]) -> None:
        """The padded layout's global cut: the score (and rank among equal scores) of the last
        neuron kept when all layers' neurons are ranked together."""
        if self.layout != "padded":
            return
        ranked = []
        budget = 0
        for index in sorted(stats):
            scores = neuron_scores(stats[index], targets[index]).flatten()
            E = stats[index].num_experts
            budget += round(scores.numel() * targets[index].keep / E)
            ranked += [(-float(s), index, j) for j, s in enumerate(scores.tolist())]
        ranked.sort()
        if budget >= len(ranked):
            raise ValueError(f"heapr keeps all {len(ranked)} neurons at this ratio; raise the ratio")
        self.threshold = ranked[budget - 1] if budget else (float("inf"), -1, -1)

    def decide(self, layer: MoELayerView, stats: LayerStats, target: Target) -> LayerDecision:
        scores = neuron_scores(stats, target)  # [E, I]
        E, I = scores.shape
        if self.layout == "uniform":
            if target.protect:
                self.check_protection(f"layer {layer.index}: ")
            width = uniform_width(I, E, target.keep, f"layer {layer.index}: ", self.align)
            keep = [sorted(_ranked(row)[:width]) for row in scores]
            experts = narrowed(layer.experts, keep)
            view = dataclasses.replace(layer, experts=experts)
            notes = {"width": width}
        else:
            if self.layout == "auto":
                raise ValueError(
                    "heapr's layout 'auto' is settled per checkpoint (settle(), as compress does); give "
                    "layout='uniform' or 'padded' to call decide() directly"
                )
            if self.threshold is None:
                raise RuntimeError("heapr with the padded layout needs prepare() over every layer first")
            cut = self.threshold
            keep = [
                [j for j in range(I) if (-float(scores[e, j]), layer.index, e * I + j) <= cut]
                for e in range(E)
            ]
            view = dataclasses.replace(layer, experts=zeroed(layer.experts, keep))
            notes = {"kept_neurons": [len(k) for k in keep]}
        edit = LayerEdit(tuple((e,) for e in range(E)), view=view)
        if self.layout == "padded":
            matrices = len(layer.experts.matrices)
            notes |= compact_notes(edit, sum(len(k) for k in keep) * matrices * layer.experts.dim)
        return LayerDecision(edit, list(range(E)), None, notes)


WIDTH_ALIGN = 8  # torch._grouped_mm, transformers' default experts kernel, needs rows of 16 bytes: 8 bf16 numbers


def uniform_width(hidden_dim: int, num_experts: int, keep: float, where: str = "", align: int = 1) -> int:
    """The neurons each expert keeps in the uniform layout, round(I keep / E), refused where it
    keeps none or all of them. Experts of at least 8 x WIDTH_ALIGN neurons, a multiple of it (every
    real checkpoint's), keep the nearest multiple of WIDTH_ALIGN, so that the narrowed checkpoint
    still runs on grouped GEMMs in bf16 (an odd width fails there: "strides should be multiple of
    16 bytes"). align: a granularity the output's format needs (a quantized source written in its
    own format: whole float8 blocks, MXFP4 groups): the nearest multiple of it that keeps some but
    not all neurons."""
    exact, share = hidden_dim * keep / num_experts, keep / num_experts
    width = round(exact)
    if align > 1:
        if hidden_dim % align or hidden_dim < 2 * align:
            raise ValueError(
                f"{where}the experts' {hidden_dim} neurons cannot be narrowed in whole blocks of {align}, as the "
                "quantized output stores them; write plain weights (without keep_quantized)"
            )
        width = min(max(align * round(exact / align), align), hidden_dim - align)
    elif hidden_dim % WIDTH_ALIGN == 0 and hidden_dim >= 8 * WIDTH_ALIGN:
        width = min(max(WIDTH_ALIGN * round(exact / WIDTH_ALIGN), WIDTH_ALIGN), hidden_dim - WIDTH_ALIGN)
    if width < 1:
        raise ValueError(f"{where}keeping {share:.1%} of each expert's {hidden_dim} neurons keeps none; lower the ratio")
    if width >= hidden_dim:
        raise ValueError(
            f"{where}keeping {share:.1%} of each expert's {hidden_dim} neurons keeps all of them; raise the ratio "
            f"to at least {1 / hidden_dim:.3g}"
        )
    return width


def neuron_scores(stats: LayerStats, target: Target) -> Tensor:
    """[E, I] float64 HEAPr importance of every neuron (-1 for experts no token chose; +inf for
    protected experts, which keep every neuron)."""
    act = stats.total("neuron_act_sums", halves=target.halves)
    grad = stats.total("neuron_grad_sums", halves=target.halves)
    n = stats.total("counts", halves=target.halves)[:, None]
    scores = (act / n.clamp(min=1)) * (grad / n.clamp(min=1))
    scores = torch.where(n > 0, scores, torch.full_like(scores, -1.0))
    scores[sorted(target.protect)] = float("inf")
    return scores


def _ranked(row: Tensor) -> list[int]:
    """Neuron ids by decreasing score, ties to the lower id."""
    return sorted(range(row.numel()), key=lambda j: (-float(row[j]), j))


def narrowed(experts: ExpertsView, keep: list[list[int]]) -> ExpertsView:
    """The experts with only the neurons `keep[e]` (the same number for every expert)."""
    index = torch.tensor(keep, dtype=torch.long)  # [E, I']

    def rows(t: Tensor | None) -> Tensor | None:  # [E, I, ...] -> [E, I', ...]
        if t is None:
            return None
        return torch.stack([t[e, index[e]] for e in range(t.shape[0])])

    down = torch.stack([experts.down[e][:, index[e]] for e in range(experts.down.shape[0])])
    return dataclasses.replace(
        experts,
        gate=rows(experts.gate),
        up=rows(experts.up),
        down=down,
        gate_bias=rows(experts.gate_bias),
        up_bias=rows(experts.up_bias),
    )


def zeroed(experts: ExpertsView, keep: list[list[int]]) -> ExpertsView:
    """The experts at full width with every neuron not in `keep[e]` zeroed (gate and up rows,
    their biases, and the down column): it contributes nothing."""
    E, I, _ = experts.up.shape
    mask = torch.zeros(E, I, dtype=torch.bool)
    for e, ids in enumerate(keep):
        mask[e, ids] = True

    def rows(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        m = mask.view(E, I, *([1] * (t.dim() - 2)))
        return torch.where(m, t, torch.zeros((), dtype=t.dtype))

    return dataclasses.replace(
        experts,
        gate=rows(experts.gate),
        up=rows(experts.up),
        down=torch.where(mask[:, None, :], experts.down, torch.zeros((), dtype=experts.down.dtype)),
        gate_bias=rows(experts.gate_bias),
        up_bias=rows(experts.up_bias),
    )
