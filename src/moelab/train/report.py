"""The report of a comparison: report.md (tables), summary.json (the same numbers) and PNG plots
(validation loss over tokens, final loss per domain, training loss, expert load per layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moelab.files import read_json_object
from moelab.io import atomic_write_bytes, atomic_write_text
from moelab.plots import plt, png
from moelab.train.logging import read_log

FLOPS_TOLERANCE = 0.10


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One variant's numbers from its results.json and log.jsonl."""
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
    return {
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
REPORT_FILES = ("report.md", "summary.json", *PLOT_FILES)


def write_report(out_dir: Path, names: list[str]) -> Path:
    """Summarize the runs `out_dir/<name>` and write report.md, summary.json and the plots."""
    runs = {name: summarize_run(out_dir / name) for name in names}
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
    for name, data in plots.items():
        atomic_write_bytes(out_dir / name, data)
    atomic_write_text(out_dir / "summary.json", json.dumps(runs, indent=2) + "\n")
    path = out_dir / "report.md"
    atomic_write_text(path, _markdown(runs, list(plots)))
    return path


def _markdown(runs: dict[str, dict], plots: list[str]) -> str:
    names = list(runs)
    first = runs[names[0]]
    lines = [
        "# Comparison",
        "",
        f"Every variant trained on the same data, seed and schedule: {first['tokens']:,} tokens "
        f"({first['tokens_per_step']:,} per step). FLOPs/token is the forward cost at the measured "
        f"experts per token, relative to `{names[0]}`; variants more than {FLOPS_TOLERANCE:.0%} away "
        "are marked as not compute-matched.",
        "",
        "| variant | val loss | ppl | active params | total params | FLOPs/token | × first | tokens/s | load max/mean | experts/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        loss = run["eval_loss"]["all"]
        ks = list(run["experts_per_token"].values())
        mark = "" if run["compute_matched"] else " (not matched)"
        lines.append(
            f"| {name} | {loss:.4f} | {np.exp(loss):.1f} | {run['active_params']:,} | {run['total_params']:,} | "
            f"{run['flops_per_token']:,} | {run['flops_ratio']:.2f}{mark} | {run['tokens_per_second']:,.0f} | "
            + (f"{run['load_imbalance']:.2f}" if run["load_imbalance"] is not None else "–")
            + " | "
            + (f"{np.mean(ks):.2f}" if ks else "–")
            + " |"
        )
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
        lines += ["", "## Architecture metrics (last logged training window)", ""]
        for name, metrics in metric_rows:
            lines.append(
                f"- **{name}**: "
                + ", ".join(f"{k.removeprefix('metrics/')} = {v:.3f}" for k, v in metrics.items())
            )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plot_curves(runs: dict[str, dict], key: str, title: str, smooth: int = 1) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        if not run[key]:
            continue
        steps, values = map(np.array, zip(*run[key], strict=True))
        if smooth > 1 and len(values) >= smooth:
            values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1 :]
        ax.plot(steps * run["tokens_per_step"] / 1e6, values, label=name)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
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
        ax.bar(x + i * width, [runs[name]["eval_loss"][d] for d in domains], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, domains, rotation=20)
    low = min(runs[n]["eval_loss"][d] for n in names for d in domains)
    ax.set_ylim(bottom=max(0.0, low - 0.5))
    ax.set_ylabel("final validation loss")
    ax.set_title("validation loss per domain")
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
        image = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
        ax.set_title(f"{name}: expert load / uniform share", fontsize=9)
        fig.colorbar(image, ax=ax)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    return png(fig)
