"""The report of a comparison: report.md (tables), summary.json (the same numbers) and PNG plots
(validation loss over tokens, final loss per domain, training loss, expert load per layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import EngFormatter, MaxNLocator

from moelab.files import read_json_object
from moelab.io import atomic_write_bytes, atomic_write_text, clear_staging
from moelab.plots import plt, png
from moelab.train.config import read_config_file
from moelab.train.logging import read_log

FLOPS_TOLERANCE = 0.10


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One variant's numbers from its results.json and log.jsonl, and its recipe (the train section
    of its config.yaml; None for a run directory without one)."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} not found: the run in {run_dir} has not finished")
    results = read_json_object(results_path, "the results of a finished run")
    records = read_log(run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    last_load = (
        {int(layer): np.array(load) for layer, load in evals[-1].get("load", {}).items()} if evals else {}
    )
    info = results["model_info"]
    config_path = run_dir / "config.yaml"
    recipe = read_config_file(config_path).get("train") if config_path.is_file() else None
    return {
        "recipe": recipe,
        "eval_loss": results["eval_loss"],
        "tokens": results["tokens"],
        "tokens_per_second": results["tokens_per_second"],
        "total_params": info["total_params"],
        "active_params": info["active_params"],
        "active_non_embedding_params": info["active_non_embedding_params"],
        "flops_per_token": info["flops_per_token"],
        "experts_per_token": info.get("experts_per_token", {}),
        "load_imbalance": float(np.mean([l.max() / l.mean() for l in last_load.values()]))
        if last_load
        else None,
        "load": {layer: load.tolist() for layer, load in last_load.items()},
        "eval_curve": [(r["step"], r["loss"]["all"]) for r in evals],
        "train_curve": [(r["step"], r["loss"]) for r in train],
        "tokens_per_step": results["tokens"] // max(results["steps"], 1),
        "metrics": {k: v for k, v in (train[-1] if train else {}).items() if k.startswith("metrics/")},
    }


PLOT_FILES = ("val_loss.png", "train_loss.png", "domain_loss.png", "expert_load.png")
THROUGHPUT_NAME = "throughput.json"
REPORT_FILES = ("report.md", "summary.json", THROUGHPUT_NAME, *PLOT_FILES)


def summarize_variant(out_dir: Path, run_names: list[str]) -> dict[str, Any]:
    """One variant's numbers over its runs `out_dir/<run>` (one per seed): `summarize_run`'s, with
    the losses, speeds, loads, experts per token (and the active parameters and FLOPs counted at
    it), metrics and curves averaged over seeds; with more than one seed also
    "eval_loss_std" (per domain, sample standard deviation), "eval_loss_range" (max - min of the
    overall loss), "eval_band" [(step, min, max)] and "per_seed" rows (each run's loss, speed and
    training curve)."""
    summaries = [summarize_run(out_dir / name) for name in run_names]
    out = dict(summaries[0])
    if len(summaries) == 1:
        return out
    losses = {d: np.array([s["eval_loss"][d] for s in summaries]) for d in out["eval_loss"]}
    out["eval_loss"] = {d: float(v.mean()) for d, v in losses.items()}
    out["eval_loss_std"] = {d: float(v.std(ddof=1)) for d, v in losses.items()}
    out["eval_loss_range"] = float(np.ptp(losses["all"]))
    out["tokens_per_second"] = float(np.mean([s["tokens_per_second"] for s in summaries]))
    for key in ("eval_curve", "train_curve"):
        steps = [step for step, _ in out[key]]
        values = np.array([[value for _, value in s[key]] for s in summaries])  # [seeds, points]
        out[key] = list(zip(steps, values.mean(0).tolist()))
        if key == "eval_curve":
            out["eval_band"] = list(zip(steps, values.min(0).tolist(), values.max(0).tolist()))
    out["load"] = {layer: np.mean([s["load"][layer] for s in summaries], axis=0).tolist() for layer in out["load"]}
    if out["load_imbalance"] is not None:
        out["load_imbalance"] = float(np.mean([s["load_imbalance"] for s in summaries]))
    for key in ("experts_per_token", "metrics"):
        out[key] = {k: float(np.mean([s[key][k] for s in summaries])) for k in out[key]}
    for key in ("active_params", "active_non_embedding_params", "flops_per_token"):  # at the measured k
        out[key] = round(float(np.mean([s[key] for s in summaries])))
    out["per_seed"] = [
        {"run": name, "eval_loss": s["eval_loss"], "tokens_per_second": s["tokens_per_second"], "train_curve": s["train_curve"]}
        for name, s in zip(run_names, summaries)
    ]
    return out


def beyond_spread(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two variants' mean losses differ by more than the seed-to-seed spread: the larger of
    their ranges (max - min over seeds). None with one seed (no spread to compare against)."""
    if "eval_loss_range" not in a or "eval_loss_range" not in b:
        return None
    return abs(a["eval_loss"]["all"] - b["eval_loss"]["all"]) > max(a["eval_loss_range"], b["eval_loss_range"])


def write_report(out_dir: Path, groups: dict[str, list[str]]) -> Path:
    """Summarize each variant's runs `out_dir/<run>` ({variant: its run names, one per seed}) and
    write report.md, summary.json and the plots."""
    runs = {name: summarize_variant(out_dir, run_names) for name, run_names in groups.items()}
    speeds_path = out_dir / THROUGHPUT_NAME
    speeds = read_json_object(speeds_path, "side-by-side throughput") if speeds_path.exists() else {}
    for name, run in runs.items():
        run["side_by_side"] = speeds.get(name)
    names = list(runs)
    base = runs[names[0]]["flops_per_token"]
    for run in runs.values():
        run["flops_ratio"] = run["flops_per_token"] / base
        run["compute_matched"] = abs(run["flops_ratio"] - 1) <= FLOPS_TOLERANCE
    plots = {
        "val_loss.png": _plot_curves(runs, "eval_curve", "validation loss (all domains)"),
        "train_loss.png": _plot_curves(runs, "train_curve", "training loss", smooth=5),
        "domain_loss.png": _plot_domains(runs),
    }
    load_plot = _plot_load(runs)
    if load_plot is not None:
        plots["expert_load.png"] = load_plot
    else:  # an earlier run's plot of variants this comparison no longer has
        clear_staging(out_dir, only=["expert_load.png"])
    for name, data in plots.items():
        atomic_write_bytes(out_dir / name, data)
    atomic_write_text(out_dir / "summary.json", json.dumps(runs, indent=2) + "\n")
    path = out_dir / "report.md"
    atomic_write_text(path, _markdown(runs, list(plots)))
    return path


def _markdown(runs: dict[str, dict], plots: list[str]) -> str:
    names = list(runs)
    first = runs[names[0]]
    training = "the same data, seed and schedule"
    if "per_seed" in first:
        seeds = [row["run"].rsplit("-seed", 1)[1] for row in first["per_seed"]]
        training = f"the same data and schedule, each with seeds {', '.join(seeds)}"
    lines = [
        "# Comparison",
        "",
        f"Every variant trained on {training}: {first['tokens']:,} tokens "
        f"({first['tokens_per_step']:,} per step). FLOPs/token is the forward cost at the measured "
        f"experts per token, relative to `{names[0]}`; variants more than {FLOPS_TOLERANCE:.0%} away "
        "are marked as not compute-matched.",
        "",
        *([_recipe_line(first["recipe"]), ""] if first.get("recipe") else []),
        "Training speed was measured side by side once every run had finished: interleaved training "
        "steps of fresh models, the ratio to the first variant's step time taken within each round "
        "(median over rounds); the runs' own tokens/s, timed at different moments, are in summary.json.",
        "",
        "| variant | val loss | ppl | active params | total params | FLOPs/token | × first | tokens/s (side by side) | speed × first | load max/mean | experts/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        loss = run["eval_loss"]["all"]
        shown = f"{loss:.4f}" + (f" ± {run['eval_loss_std']['all']:.4f}" if "per_seed" in run else "")
        ks = list(run["experts_per_token"].values())
        mark = "" if run["compute_matched"] else " (not matched)"
        lines.append(
            f"| {name} | {shown} | {np.exp(loss):.1f} | {run['active_params']:,} | {run['total_params']:,} | "
            f"{run['flops_per_token']:,} | {run['flops_ratio']:.2f}{mark} | {_speed(run)} | "
            + (f"{run['load_imbalance']:.2f}" if run["load_imbalance"] is not None else "–")
            + " | "
            + (f"{np.mean(ks):.2f}" if ks else "–")
            + " |"
        )
    if "per_seed" in first:
        lines += _seed_sections(runs)
    domains = [d for d in first["eval_loss"] if d != "all"]
    lines += [
        "",
        "## Validation loss per domain",
        "",
        "| variant | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(f"{run['eval_loss'][d]:.3f}" for d in domains) + " |")
    metric_rows = [(name, run["metrics"]) for name, run in runs.items() if run["metrics"]]
    if metric_rows:
        seeds = ", mean over seeds" if "per_seed" in first else ""
        lines += ["", f"## Architecture metrics (last logged training window{seeds})", ""]
        for name, metrics in metric_rows:
            lines.append(
                f"- **{name}**: "
                + ", ".join(f"{k.removeprefix('metrics/')} = {v:.3f}" for k, v in metrics.items())
            )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _recipe_line(recipe: dict[str, Any]) -> str:
    """The shared training recipe (a run's train section) in one sentence."""
    accum = f" × {recipe['grad_accum']} accumulated" if recipe.get("grad_accum", 1) > 1 else ""
    return (
        f"Recipe: {recipe['steps']:,} steps of {recipe['batch_size']} × {recipe['seq_len']} tokens{accum}, "
        f"AdamW at lr {recipe['lr']:g} ({recipe['warmup_steps']} warmup steps, cosine to {recipe['min_lr_ratio']:g}× "
        f"lr), weight decay {recipe['weight_decay']:g}, gradient clip {recipe['grad_clip']:g}, {recipe['dtype']}; "
        f"validation every {recipe['eval_every']} steps on at most {recipe['eval_tokens']:,} tokens per domain."
    )


def _speed(run: dict) -> str:
    """The side-by-side tokens/s and ratio cells ("–" where not measured)."""
    speed = run.get("side_by_side")
    if speed is None:
        return "– | –"
    return f"{speed['tokens_per_second']:,.0f} | {speed['vs_first']:.2f}"


def _seed_sections(runs: dict[str, dict]) -> list[str]:
    """The per-seed table and the differences from the first variant, judged against the spread."""
    names = list(runs)
    first = runs[names[0]]
    seeds = len(first["per_seed"])
    lines = [
        "",
        f"Validation losses are means ± sample standard deviations over {seeds} seeds (initialisation "
        "and data order); the plots show the mean and, shaded, the range over seeds.",
        "",
        "## Differences from the first variant",
        "",
        "A difference counts as real (\"beyond the spread\") only if the two means differ by more than "
        "the larger of the two variants' seed-to-seed ranges (max - min of the validation loss over seeds).",
        "",
        f"| variant | val loss − {names[0]} | seed range (this / {names[0]}) | verdict |",
        "|---|---:|---:|---|",
    ]
    for name in names[1:]:
        run = runs[name]
        delta = run["eval_loss"]["all"] - first["eval_loss"]["all"]
        verdict = "beyond the spread" if beyond_spread(run, first) else "within the spread"
        lines.append(
            f"| {name} | {delta:+.4f} | {run['eval_loss_range']:.4f} / {first['eval_loss_range']:.4f} | {verdict} |"
        )
    lines += ["", "## Every seed", "", "| run | val loss | tokens/s |", "|---|---:|---:|"]
    for run in runs.values():
        for row in run["per_seed"]:
            lines.append(f"| {row['run']} | {row['eval_loss']['all']:.4f} | {row['tokens_per_second']:,.0f} |")
    return lines


def _plot_curves(runs: dict[str, dict], key: str, title: str, smooth: int = 1) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    smoothed = False  # a curve shorter than `smooth` is drawn as logged
    for name, run in runs.items():
        if not run[key]:
            continue
        steps, values = map(np.array, zip(*run[key], strict=True))
        if smooth > 1 and len(values) >= smooth:
            values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1 :]
            smoothed = True
        (line,) = ax.plot(steps * run["tokens_per_step"], values, label=name, marker="o" if len(values) < 3 else None)
        if key == "eval_curve" and "eval_band" in run:
            band_steps, low, high = map(np.array, zip(*run["eval_band"], strict=True))
            ax.fill_between(band_steps * run["tokens_per_step"], low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 500, 1.5k, 820k, 2M: a tiny run's read 0.0015 millions
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title + (f" (running mean of {smooth} logged values)" if smoothed else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def _plot_domains(runs: dict[str, dict]) -> bytes:
    names = list(runs)
    domains = [d for d in runs[names[0]]["eval_loss"] if d != "all"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7, len(domains) * 1.1), 4.2))
    x = np.arange(len(domains))
    for i, name in enumerate(names):
        std = runs[name].get("eval_loss_std")
        errors = None if std is None else [std[d] for d in domains]
        ax.bar(x + i * width, [runs[name]["eval_loss"][d] for d in domains], width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, domains, rotation=20)
    low = min(runs[n]["eval_loss"][d] for n in names for d in domains)
    ax.set_ylim(bottom=max(0.0, low - 0.5))
    ax.set_ylabel("final validation loss (nats/token)")
    seeds = len(runs[names[0]].get("per_seed", []))
    ax.set_title("validation loss per domain" + (f" (error bars: ± 1 std over {seeds} seeds)" if seeds else ""))
    ax.legend(fontsize=8, ncol=2)
    return png(fig)


def _plot_load(runs: dict[str, dict]) -> bytes | None:
    moe = {name: run for name, run in runs.items() if run["load"]}
    if not moe:
        return None
    fig, axes = plt.subplots(len(moe), 1, figsize=(8, 1.2 + 1.1 * len(moe) * 1.4), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], moe.items(), strict=True):
        layers = sorted(run["load"])
        grid = np.array([np.array(run["load"][l]) * len(run["load"][l]) for l in layers])
        # white at 1 (uniform); the top of the scale is the busiest expert, not a clip at 2
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(grid.max())))
        image = ax.imshow(grid, aspect="auto", cmap="coolwarm", norm=norm)
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
        ax.set_title(f"{name}: expert load / uniform share", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return png(fig)
