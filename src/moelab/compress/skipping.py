"""NAEE dynamic expert skipping (Lu et al., ACL 2024) for moelab models: a token drops a chosen
expert whose combine weight is below beta_l times its largest, beta_l being the median of that
ratio (second / first weight) over the calibration tokens of layer l. By construction about
half of the calibration tokens then use one expert fewer. An inference-time option of moelab's
runtime (`MoELayer.skip_ratio`): checkpoints are unchanged, so it applies to moelab models.

    ratios = skip_ratios(Calibration("stats/"))     # {layer: beta}
    apply_dynamic_skipping(model, ratios)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moelab.compress.stats import Calibration, LayerStats, fingerprint
from moelab.files import read_json_object
from moelab.nn.moe import MoELayer


def median_skip_ratio(stats: LayerStats) -> float:
    """The median of the tokens' second-to-first weight ratio, from the statistics' histogram
    (linear within its bin)."""
    hist = stats.skip_ratios.double()
    total = float(hist.sum())
    if total == 0:
        raise ValueError(
            f"layer {stats.layer} has no skip-ratio statistics (a top-1 router has no second expert)"
        )
    cumulative = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cumulative, torch.tensor(total / 2, dtype=torch.float64)))
    before = float(cumulative[b - 1]) if b > 0 else 0.0
    inside = (total / 2 - before) / float(hist[b]) if hist[b] > 0 else 0.0
    return (b + inside) / hist.numel()


def check_skip_statistics(calibration: Calibration, model: str | os.PathLike) -> None:
    """Raise unless `calibration` was made on `model`, or on the model a compressed `model` was
    made from (its moelab_compression.json's source_fingerprint: the source's statistics serve)."""
    report = Path(model) / "moelab_compression.json"
    source = None
    if report.is_file():
        source = read_json_object(report, "a compression report").get("source_fingerprint")
    if calibration.info["model"]["fingerprint"] != source:
        calibration.check_model(fingerprint(model), model)


def skip_ratios(calibration: Calibration) -> dict[int, float]:
    """{MoE layer: beta}, NAEE's per-layer median ratio."""
    return {i: median_skip_ratio(calibration.layer(i)) for i in calibration.layers}


def apply_dynamic_skipping(model: nn.Module, ratios: dict[int, float] | None) -> None:
    """Set (or, with None, clear) the skipping ratio of each MoE layer of a moelab model; the
    keys are decoder-layer indices."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("dynamic skipping runs in moelab's runtime: pass a moelab MoETransformer")
    moe = {i: m for i, block in enumerate(layers) for m in block.modules() if isinstance(m, MoELayer)}
    if ratios is not None and set(ratios) != set(moe):
        raise ValueError(
            f"skip ratios cover layers {sorted(ratios)} but the model's MoE layers are {sorted(moe)}"
        )
    for i, layer in moe.items():
        layer.skip_ratio = None if ratios is None else float(ratios[i])
