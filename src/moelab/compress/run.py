"""`moelab compress`: statistics (calibrated now, or reused), one decision per MoE layer, and a
checkpoint written by the checked writer.

    compress("path/to/checkpoint", "pruned/", method="reap", ratio=0.25)

The output is the source's own format (transformers and vLLM load it unchanged), plus
`moelab_compression.json` (method, options, ratio, per-layer kept, merged and dropped experts with
their scores, the calibration data's digest, versions, timings: enough to reproduce the run)
and, when the statistics were calibrated for this run, `moelab_calibration/` (reuse them with
`--stats pruned/moelab_calibration`). Everything is built in a staging directory that a killed
(or failed) run leaves and the next run into the same output takes over: calibration resumes
from its last saved layer if its model, data and settings are the same, and decisions are kept
if the job is the same, so the result is the same as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import moelab
from moelab.compress.calibration import CalibrationOptions, calibration_mixture, run_calibration
from moelab.compress.methods import LayerDecision, Method, ScoringMethod, Target, get_method, plan_target
from moelab.compress.methods.base import check_protected, share_kept, super_expert_ids
from moelab.compress.methods.easy_ep import EasyEP
from moelab.compress.mixture import DEFAULT_SPEC, Mixture
from moelab.compress.observers import OBSERVERS
from moelab.compress.router_fit import HOLDOUT_EVERY, RouterFit, refit_router
from moelab.compress.stats import Calibration, LayerStats, fingerprint
from moelab.eval.evaluate import parameter_counts
from moelab.hf.adapters import resolve
from moelab.hf.edit import LayerEdit
from moelab.hf.layouts import config_entry, config_value
from moelab.hf.requantize import check_keep_quantized
from moelab.hf.view import ModelView, MoELayerView, check_no_layers_beyond
from moelab.hf.writer import unbuilt_layers, write_edited
from moelab.io import StagedOutput, atomic_write_text, clear_staging
from moelab.models.pretrained import CHECKPOINT_KIND
from moelab.models.reference import model_dir
from moelab.validation import check_choice, check_not_str

REPORT_NAME = "moelab_compression.json"
STATS_DIR = "moelab_calibration"
REPORT_FORMAT = "moelab-compression/1"
BUDGETS = ("layer", "global")
MTP_POLICIES = ("prune", "drop")


def compress(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "reap",
    ratio: float = 0.25,
    calib: str | Sequence[str] | Mixture | None = None,
    stats: str | os.PathLike | None = None,
    calib_options: CalibrationOptions | None = None,
    protect_super_experts: bool = False,
    domains: Sequence[str] | None = None,
    budget: str = "layer",
    method_options: dict[str, Any] | None = None,
    router_fit: RouterFit | None = None,
    keep_quantized: bool = False,
    mtp: str = "prune",
    overwrite: bool = False,
    reload: bool | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Remove `ratio` of the routed experts of every MoE layer of the checkpoint `model` with
    `method` (see `moelab.compress.methods.METHODS`) and write the result to `out` (see the
    module docstring). calib: the calibration data (default: the shipped corpus; with `stats`,
    checked against the data the statistics were made on); stats: a statistics directory to use
    instead of calibrating;
    protect_super_experts: never drop an expert the Super Experts rule flags; domains: compute
    scores on these calibration sources only (PreMoe, EASY-EP: domain-specific pruning);
    budget: "layer" (the same ratio in every layer) or "global" (scores ranked across layers:
    refused when it gives layers different expert counts, which no target format stores);
    router_fit: re-calibrate every edited layer's router afterwards (`moelab.compress.router_fit`);
    keep_quantized: write a quantized source (FP8, MXFP4) in its own format, kept experts byte for byte
    and merged or narrowed ones quantized as it quantizes, instead of plain weights in the dtype it states;
    mtp: what becomes of a multi-token prediction layer with routed experts (DeepSeek-V3's, GLM-4.5's,
    which vLLM and SGLang draft tokens with): "prune" decides its experts with the same method and
    ratio on its own statistics (calibrated on what its drafter sees), "drop" leaves it out of the
    output (num_nextn_predict_layers 0: no MTP speculative decoding);
    reload: the writer's whole-model reload with transformers (`write_checkpoint`; None: where it fits
    in memory).
    Returns the report (also in out/moelab_compression.json). `model` may be a shipped model's name."""
    started = time.perf_counter()
    check_not_str("domains", domains, "calibration sources")
    model = model_dir(model)
    chosen = get_method(method, **(method_options or {}))
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")
    if budget == "global" and not isinstance(chosen, ScoringMethod):
        raise ValueError(f"a global budget ranks scores across layers; {method!r} does not score experts")
    check_choice("mtp policy", mtp, MTP_POLICIES)
    mtp_layers = _mtp_layers(model, mtp)
    # refused before calibrating, the multi-token prediction layer compress edits too
    align = check_keep_quantized(model, mtp_layers=mtp_layers) if keep_quantized else 1
    keep = _planned(model, chosen, ratio, align, mtp_layers)  # checks before any calibration: shapes only, no weights read
    if protect_super_experts:
        chosen.check_protection()
    fit = router_fit or RouterFit()
    needs = chosen.needs + (("inputs",) if fit.steps else ())
    options = calib_options or CalibrationOptions()
    missing = tuple(dict.fromkeys(name for name in needs if name not in options.observers))
    options = dataclasses.replace(options, observers=options.observers + missing)
    if stats is None:  # refused before calibrating
        _check_sample_size(chosen, fit, options.sample_tokens)
    inputs = [model, stats]
    timings: dict[str, float] = {}
    with StagedOutput(out, CHECKPOINT_KIND, inputs=inputs, overwrite=overwrite, resume=True) as staging:
        begin = time.perf_counter()
        calibration = _statistics(model, staging, calib, stats, options, domains, quiet, mtp == "prune", chosen.requires)
        _check_needs(chosen.name, needs, calibration)
        _check_mtp_statistics(keep, calibration)
        _check_sample_size(chosen, fit, calibration.info["settings"].get("sample_tokens", 0))
        timings["calibration_s"] = round(time.perf_counter() - begin, 3)
        protect = _protected(calibration) if protect_super_experts else {}
        sources = tuple(domains) if domains else None
        targets = {i: Target(n, frozenset(protect.get(i, ()))) for i, (_, n) in keep.items()}
        for i, target in targets.items():
            check_protected(keep[i][0], target.keep, target.protect, f"layer {i}: ")
        begin = time.perf_counter()
        report = _report(
            model, out, chosen, ratio, calibration, stats, protect_super_experts, protect, sources, budget, fit
        )
        report["mtp"] = {"policy": mtp, "layers": mtp_layers}
        decisions = _decide(model, staging, chosen, calibration, sources, targets, budget, report, quiet)
        timings["decisions_s"] = round(time.perf_counter() - begin, 3)
        if fit.steps:
            begin = time.perf_counter()
            _refit_routers(model, decisions, calibration, sources, fit, report, quiet)
            timings["router_fit_s"] = round(time.perf_counter() - begin, 3)
        begin = time.perf_counter()
        edits = {i: d.edit for i, d in decisions.items()}
        clear_staging(staging, [p.name for p in staging.iterdir() if p.name not in (STATS_DIR, REPORT_NAME)])
        report["keep_quantized"] = keep_quantized
        report["reload_checked"] = write_edited(
            model, staging, edits, reload=reload, keep_quantized=keep_quantized, quiet=quiet, name=Path(out).name
        )
        timings["write_s"] = round(time.perf_counter() - begin, 3)
        report["parameters"] = {"before": parameter_counts(model), "after": _after(staging, report)}
        report["timings"] = timings | {"total_s": round(time.perf_counter() - started, 3)}
        report["complete"] = True
        _write_report(staging, report)
    return report


def _after(staging: Path, report: dict[str, Any]) -> dict[str, int]:
    """The written checkpoint's parameter counts; where layers were written at full width but
    are smaller in a compact form (MC-SMoE's low rank, Sub-MoE's subspace, HEAPr's zeroed
    neurons), also "total_compact": the count in that form."""
    after = parameter_counts(staging)
    notes = [e["notes"] for e in report["layers"].values() if "compact_parameters" in e["notes"]]
    if notes:
        after["total_compact"] = after["total"] - sum(
            n["stored_parameters"] - n["compact_parameters"] for n in notes
        )
    return after


def check_compression(model: str | os.PathLike, method: str, ratio: float, **method_options: Any) -> None:
    """Raise the error `compress` would give for this method and ratio on `model` before
    calibrating (reads the shard headers only); for jobs that run many compressions later."""
    _planned(Path(model), get_method(method, **method_options), ratio, mtp_layers=_mtp_layers(Path(model), "prune"))


def _planned(
    model: Path, method: Method, ratio: float, align: int = 1, mtp_layers: Sequence[int] = ()
) -> dict[int, tuple[Any, int | float]]:
    """{MoE layer (and multi-token prediction layer `mtp_layers`): (its RouterView, the experts it
    keeps)}; for a method that narrows experts instead, how many experts' worth of parameters it
    keeps (in widths that are multiples of `align`: a quantized output's blocks)."""
    planned = {}
    for i, layer in _layer_views(model, method, align, mtp_layers).items():
        router, where = layer.router, f"layer {i}: "
        keep = share_kept(router.num_experts, ratio) if method.narrows else plan_target(router, ratio, where)
        method.check_width(layer.experts.hidden_dim, router.num_experts, keep, where)
        method.check_matrices(layer.experts.dim, layer.experts.hidden_dim, where)
        planned[i] = (router, keep)
    return planned


def _mtp_layers(model: Path, mtp: str) -> list[int]:
    """The multi-token prediction layer `compress` edits with the rest: none where `mtp` is
    "drop". Refuses "prune" where the checkpoint stores such layers with routed experts that
    moelab cannot run (Nemotron-H's mtp.*, chains of several)."""
    config, checkpoint, family = resolve(model)
    checkpoint.close()
    check_no_layers_beyond(checkpoint, config, family, family.layer_count(config))  # not MTP layers: a bad config
    if mtp == "drop":
        return []
    layers = family.mtp_layers
    ours = {module.root for module in family.mtp}
    if (others := sorted(set(unbuilt_layers(config, checkpoint, family)) - ours)) or len(layers) > 1:
        which = ", ".join(others or sorted(ours))
        raise ValueError(
            f"{model} stores multi-token prediction layers with routed experts ({which}) that moelab cannot "
            "calibrate (it runs one layer stored as DeepSeek-V3's or Qwen3-Next's: `moelab.hf.mtp`); "
            "leave them out of the output with --mtp drop (mtp='drop'; no MTP speculative decoding then)"
        )
    return layers


def _layer_views(model: Path, method: Method, align: int = 1, mtp_layers: Sequence[int] = ()) -> dict[int, MoELayerView]:
    """{MoE layer: its MoELayerView} (and the multi-token prediction layers `mtp_layers`), read
    from shard headers only (shapes, no weights); settles the method's automatic options for the
    checkpoint and refuses one that narrows experts on a family whose shared experts' (or dense
    layers') width follows theirs."""
    config, checkpoint, family = resolve(model)
    checkpoint.close()
    with _view(model, shapes_only=True) as view:
        layers = {i: view.layer(i) for i in [*range(view.num_layers), *mtp_layers]}
    shared = any(isinstance(layer, MoELayerView) and layer.shared is not None for layer in layers.values())
    dense = any(not isinstance(layer, MoELayerView) for layer in layers.values())
    follows = (
        "shared experts" if family.shared_width_follows and shared
        else "dense layers' MLPs" if family.dense_width_follows and dense
        else None
    )  # fmt: skip
    method.settle(width_fixed=follows is not None, align=align)
    if method.changes_width and follows is not None:
        raise ValueError(
            f"{method.name} with these options makes the routed experts narrower, but {family.name}'s {follows} "
            f"take their width from the same config key; use an option that keeps the width (heapr: layout='padded', --option layout=padded)"
        )
    if family.expert_count_shared_with is not None and not method.keeps_count:
        key = config_entry(config, family.num_experts)[0]
        raise ValueError(
            f"{method.name} removes or merges experts, but {family.name}'s {key} also sizes "
            f"{family.expert_count_shared_with}, which compression leaves as it is: transformers could not load the "
            "output. Use a method that keeps every expert and narrows them (heapr, or moelab with strategy='neurons')"
        )
    moe_layers = {i: layer for i, layer in layers.items() if isinstance(layer, MoELayerView)}
    if not moe_layers:
        raise ValueError(f"{model} has no MoE layers; there are no experts to remove")
    # the residual streams of the model's hyper-connections (Hunyuan 4's hc_mult, Qwen4-Exp's hc_count)
    streams = int(config_value(config, "hc_mult", "hc_count", default=1))
    for i, layer in moe_layers.items():
        method.check_router(layer.router, f"layer {i}: ")
        if method.name == EasyEP.name and (layer.routed_norm is not None or streams > 1):
            why = "norms again after its MoE (Gemma 4)" if streams == 1 else f"splits into {streams} streams (hyper-connections)"
            raise ValueError(
                f"layer {i}: EASY-EP weighs each expert by how far the routed output turns the residual stream, "
                f"which this model's decoder layer {why}: moelab cannot read that turn; choose another method "
                "(reap, frequency, moelab, ...)"
            )
    return moe_layers


def _statistics(
    model: Path, staging: Path, calib, stats, options: CalibrationOptions, domains, quiet: bool, mtp: bool = True,
    required: Sequence[str] = (),
) -> Calibration:
    """The statistics to decide with: `stats` checked against the model, or a calibration of
    `model` on `calib` made (or resumed) inside the output. domains: checked to be among the
    calibration sources before any calibration; mtp: whether a calibration made here runs the
    multi-token prediction layer (not where compress drops it); required: the statistics the method
    cannot do without (`Method.requires`: a calibration made here stops at a layer that lacks one)."""
    if stats is not None:
        calibration = Calibration(stats)
        calibration.check_model(fingerprint(model), model)
        _check_domains(domains, calibration.sources)
        if calib is not None:  # the data asked for must be the data the statistics saw
            tokens, seq_len = calibration.windows()
            used = CalibrationOptions(tokens=tokens, seq_len=seq_len)
            mixture = calib if isinstance(calib, Mixture) else calibration_mixture(model, calib, used, quiet)
            calibration.check_mixture(mixture.digest, mixture.spec)
        clear_staging(staging, [STATS_DIR])  # an earlier run's calibration: these statistics replace it
        return calibration
    calib = DEFAULT_SPEC if calib is None else calib
    mixture = calib if isinstance(calib, Mixture) else calibration_mixture(model, calib, options, quiet)
    _check_domains(domains, mixture.source_names)
    directory = staging / STATS_DIR
    directory.mkdir(exist_ok=True)
    run_calibration(model, directory, mixture, options, quiet=quiet, mtp=mtp, required=required)
    return Calibration(directory)


def _check_domains(domains: Sequence[str] | None, sources: list[str]) -> None:
    if unknown := [d for d in domains or () if d not in sources]:
        raise ValueError(
            f"--domain {unknown} are not among the calibration sources {sources}; name sources of the "
            "calibration mixture (--calib corpus:DOMAIN,...)"
        )


def _check_sample_size(method: Method, fit: RouterFit, sample_tokens: int) -> None:
    """Refuse a calibration that would keep too few sampled MoE inputs: none for a method that
    re-runs layers on them, fewer than HOLDOUT_EVERY for the router re-calibration (which holds out
    one in HOLDOUT_EVERY)."""
    if "inputs" in method.needs and sample_tokens == 0:
        raise ValueError(
            f"{method.name!r} (with these options) re-runs layers on sampled MoE inputs, which a calibration "
            "with sample_tokens=0 does not keep; calibrate with sample_tokens > 0"
        )
    if (fit.steps or method.fits_routers) and sample_tokens < HOLDOUT_EVERY:
        which = "router re-calibration"
        if not fit.steps:
            which = f"the {which} of {method.name!r} (its fit_steps option)"
        raise ValueError(
            f"{which} fits the routers on sampled MoE inputs, holding out one in {HOLDOUT_EVERY}; "
            f"calibrate with sample_tokens >= {HOLDOUT_EVERY}, got {sample_tokens}"
        )


def _check_mtp_statistics(keep: dict[int, Any], calibration: Calibration) -> None:
    """Refuse statistics without the multi-token prediction layer the job edits (made before
    moelab ran it)."""
    if missing := [i for i in keep if i not in calibration.layers + calibration.mtp_layers]:
        raise ValueError(
            f"the statistics in {calibration.directory} have none for the multi-token prediction layer {missing} "
            "(made before moelab calibrated such layers); calibrate again, or leave the layer out with --mtp drop"
        )


def _check_needs(method: str, needs: tuple[str, ...], calibration: Calibration) -> None:
    have = calibration.info["settings"]["observers"]
    if calibration.info["settings"].get("sample_tokens", 0) == 0:
        have = [n for n in have if n != "inputs"]
    missing = [n for n in needs if n not in have]
    if missing:
        raise ValueError(
            f"{method!r} (with these options) needs the {missing} statistics, which {calibration.directory} lacks; "
            f"calibrate again with them (observers: {list(OBSERVERS)}; 'neurons' is the backward sweep, `moelab "
            "calibrate --backward`; 'inputs' (NAEE, router re-calibration) needs sample_tokens > 0)"
        )


def _protected(calibration: Calibration) -> dict[int, list[int]]:
    """{layer: experts} the Super Experts rule flags (shared experts are never dropped anyway), in
    the main model's layers: the rule ranks them together (a quantile over their experts, the first
    3/4 of them searched), so a multi-token prediction layer, which comes after them and reads other
    inputs, is left out of it and does not move what it flags there."""
    return super_expert_ids({i: calibration.layer(i) for i in calibration.layers})


def _decide(
    model: Path,
    staging: Path,
    method: Method,
    calibration: Calibration,
    sources: tuple[str, ...] | None,
    targets: dict[int, Target],
    budget: str,
    report: dict[str, Any],
    quiet: bool,
) -> dict[int, LayerDecision]:
    """Every layer's decision on the calibration `sources` (None: all; kept from an earlier,
    killed run of the same job when there is one), with the stability of the kept set between
    the two halves of the calibration data."""
    previous = _read_report(staging)
    same_job = previous is not None and all(previous.get(k) == report[k] for k in _JOB_KEYS)
    done = previous.get("layers", {}) if same_job else {}
    with _view(model, shapes_only=not method.needs_weights) as view:
        stats = {i: _layer_stats(calibration, i, sources) for i in targets}
        if budget == "global":
            _check_global_budget(method, view, stats, targets)
        method.prepare(view, stats, targets)
        decisions = {}
        for index in tqdm(sorted(targets), desc=f"{method.name}", unit="layer", disable=quiet):
            if str(index) in done and not method.rewrites:  # new tensors are recomputed (deterministically)
                entry = done[str(index)]
                decisions[index] = LayerDecision(
                    LayerEdit.keep(entry["kept"]), entry["kept"], entry.get("scores")
                )
                report["layers"][str(index)] = entry
                continue
            layer = view.layer(index)
            decision = method.decide(layer, stats[index], targets[index])
            entry = _layer_entry(layer, decision, stats[index], targets[index])
            entry["stability_jaccard"] = _stability(method, layer, stats[index], targets[index])
            decisions[index] = decision
            report["layers"][str(index)] = entry
            _write_report(staging, report)  # a killed run keeps the layers decided so far
    values = [e["stability_jaccard"] for e in report["layers"].values() if e["stability_jaccard"] is not None]
    report["stability_jaccard"] = sum(values) / len(values) if values else None
    return decisions


def _refit_routers(
    model: Path,
    decisions: dict[int, LayerDecision],
    calibration: Calibration,
    sources: tuple[str, ...] | None,
    fit: RouterFit,
    report: dict[str, Any],
    quiet: bool,
) -> None:
    """Replace every decision's edit by one with its router re-calibrated on the sampled inputs
    of `sources`; the losses go to the layer's report notes. Recomputed on resume (deterministic)."""
    with _view(model, shapes_only=False) as view:
        for index in tqdm(sorted(decisions), desc="router fit", unit="layer", disable=quiet):
            decision = decisions[index]
            stats = _layer_stats(calibration, index, sources)
            decision.edit, notes = refit_router(view.layer(index), decision.edit, stats.inputs, fit, stats.router_inputs)
            report["layers"][str(index)]["notes"]["router_fit"] = notes


def _layer_stats(calibration: Calibration, index: int, sources: tuple[str, ...] | None) -> LayerStats:
    stats = calibration.layer(index)
    return stats if sources is None else stats.restricted(sources)


_JOB_KEYS = (
    "source_fingerprint",
    "mtp",
    "method",
    "options",
    "ratio",
    "calibration",
    "protected",
    "sources",
    "budget",
    "router_fit",
)


def _report(
    model, out, method, ratio, calibration, stats, protect_super, protect, sources, budget, fit
) -> dict[str, Any]:
    info = calibration.info
    return {
        "format": REPORT_FORMAT,
        "moelab": moelab.__version__,
        "source": str(model.resolve()),
        "source_fingerprint": info["model"]["fingerprint"],
        "method": method.name,
        "options": method.options(),
        "ratio": ratio,
        "budget": budget,
        "router_fit": dataclasses.asdict(fit),
        "sources": list(sources) if sources else None,
        "calibration": {
            "statistics": str(Path(stats).resolve()) if stats is not None else STATS_DIR,
            "mixture": info["mixture"],
            "settings": info["settings"],
            "coverage_thin_experts": info.get("coverage", {}),
        },
        "protect_super_experts": protect_super,
        "protected": {str(i): ids for i, ids in protect.items()},
        "layers": {},
        "complete": False,
    }


def _layer_entry(
    layer: MoELayerView, decision: LayerDecision, stats: LayerStats, target: Target
) -> dict[str, Any]:
    """The report of one layer. dropped_probability_mass: the mean router probability of the
    dropped experts over the calibration tokens; without top-k renormalisation (Qwen2-MoE,
    OLMoE) the kept experts' combine weights grow by about 1 / (1 - that mass) after pruning."""
    E = layer.router.num_experts
    merged = {e for group in decision.merge_groups for e in group}
    dropped = [e for e in range(E) if e not in decision.kept and e not in merged]
    mass = float(stats.total("soft_counts")[dropped].sum()) / max(stats.token_total(), 1.0)
    return {
        "experts": E,
        "kept": decision.kept,
        "merge_groups": decision.merge_groups,
        "dropped": dropped,
        "scores": decision.scores,
        "protected": sorted(target.protect),
        "dropped_probability_mass": mass,
        "notes": decision.notes,
    }


def _stability(method: Method, layer: MoELayerView, stats: LayerStats, target: Target) -> float | None:
    """Jaccard similarity of the kept sets decided on each half of the calibration data
    (scoring methods; 1 = the data agree)."""
    if not isinstance(method, ScoringMethod) or not method.data_driven or min(stats.tokens.sum(1)) == 0:
        return None
    a, b = (set(method.decide(layer, stats, target.on_half(h)).kept) for h in (0, 1))
    return len(a & b) / len(a | b)


def _check_global_budget(
    method: ScoringMethod, view, stats: dict[int, LayerStats], targets: dict[int, Target]
) -> None:
    """Rank every expert of every layer by its score, normalised to sum 1 in its layer (signed
    scores, such as PreMoe's mean logits, first shifted to start at 0), keep the best overall (at
    least top_k per layer), and refuse unless every layer keeps as many."""
    ranked = []
    for index, target in targets.items():
        layer = view.layer(index)
        scores = method.score(layer, stats[index], target).double()
        scores = scores - scores.min().clamp(max=0)  # a negative sum left raw scores: other layers' scales
        scores = scores / scores.sum() if scores.sum() > 0 else scores
        ranked += [(float(s), index, e) for e, s in enumerate(scores)]
    total = sum(t.keep for t in targets.values())
    counts = {i: 0 for i in targets}
    for _, index, _ in sorted(ranked, reverse=True)[:total]:
        counts[index] += 1
    if len(set(counts.values())) > 1:
        per_layer = ", ".join(f"layer {i}: {n}" for i, n in sorted(counts.items()))
        raise ValueError(
            f"the global budget keeps different numbers of experts per layer ({per_layer}); transformers, vLLM "
            "and moelab's own format store one expert count for all layers, so this cannot be written. Use "
            "the per-layer budget (--budget layer)"
        )


def _view(model: Path, *, shapes_only: bool) -> ModelView:
    """The checkpoint's view; with shapes_only its tensors are meta tensors from the headers
    (enough for methods that decide from statistics alone)."""
    config, checkpoint, family = resolve(model)
    if shapes_only:
        checkpoint.close()
        checkpoint = checkpoint.with_shapes_only()
    return ModelView(checkpoint, config, family, family.layer_count(config))


def _read_report(directory: Path) -> dict | None:
    path = directory / REPORT_NAME
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return None
    return report if isinstance(report, dict) and report.get("format") == REPORT_FORMAT else None


def _write_report(directory: Path, report: dict[str, Any]) -> None:
    atomic_write_text(directory / REPORT_NAME, json.dumps(report, indent=1) + "\n")
