"""The compression bench's report: report.md (tables), summary.json (every number) and PNG plots
(quality per method, perplexity change per domain, quality against size).

Per cell: perplexity overall and per domain; quality kept (base / compressed perplexity) and the
raw increase; the worst domain (largest relative increase); KL(base || compressed) per token and
top-1 agreement; the degenerate-generation rate; parameters stored, in compact form (low-rank
or zeroed neurons counted as removed) and active per token; compression time (a fresh process:
decisions + router fit + writing and checking; the shared calibration is reported once) and its
peak resident memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moelab.compress.bench import by_reason, percent
from moelab.compress.methods import METHODS
from moelab.eval.evaluate import ALL
from moelab.io import atomic_write_bytes, atomic_write_text
from moelab.plots import plt, png

PLOT_FILES = ("quality.png", "domains.png", "tradeoff.png")
REPORT_FILES = ("report.md", "summary.json", *PLOT_FILES)
KIND_COLORS = {
    "pruning": "tab:blue",
    "merging": "tab:orange",
    "neurons": "tab:green",
    "recipe": "tab:red",
    "external": "tab:gray",
}


def kind(cell: dict[str, Any]) -> str:
    """pruning, merging, neurons (HEAPr), recipe (moelab's), external (another tool) or ablation."""
    if cell["tool"] != "moelab":
        return "ablation" if cell["tool"] == "ablation" else "external"
    if cell["method"] == "moelab":
        return "recipe"
    method = METHODS[cell["method"]]
    return "merging" if method.merges else "neurons" if method.narrows else "pruning"


def derived(result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The numbers the tables show for one evaluated cell."""
    ppl, base_ppl = result["perplexity"], base["perplexity"]
    change = {d: ppl[d] / base_ppl[d] - 1 for d in ppl}
    worst = max((d for d in change if d != ALL), key=lambda d: change[d])
    params = result["job"].get("parameters", {}).get("after", {})
    return {
        "change": change[ALL],
        "kept": base_ppl[ALL] / ppl[ALL],
        "worst_domain": worst,
        "worst_change": change[worst],
        "domain_change": change,
        "compact_parameters": params.get("total_compact", result["parameters"]["total"]),
    }


def write_report(root: Path, summary: dict[str, Any]) -> None:
    base = summary["base"]
    for result in summary["cells"]:
        if result.get("evaluated"):
            result["derived"] = derived(result, base)
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=1) + "\n")
    general, model = _general(summary["cells"]), Path(summary["model"]).name
    atomic_write_bytes(root / "quality.png", _plot_quality(general, model))
    atomic_write_bytes(root / "domains.png", _plot_domains(general, model))
    atomic_write_bytes(root / "tradeoff.png", _plot_tradeoff(general, base, model))
    atomic_write_text(root / "report.md", markdown(summary))


def markdown(summary: dict[str, Any]) -> str:
    base, options = summary["base"], summary["options"]
    domains = [d for d in base["perplexity"] if d != ALL]
    calib = summary["calibration"]["all"]
    lines = [
        f"# Compression bench: {Path(summary['model']).name}",
        "",
        f"Calibration: {options['calib_tokens']:,} tokens of `{calib['mixture']}` (one pass with every "
        f"statistic and the backward sweep: {calib['seconds']:.0f} s), shared by every cell. Evaluation: "
        f"{options['eval_tokens']:,} test tokens per domain ({len(domains)} domains), {options['prompts']} "
        f"prompt{'s' * (options['prompts'] != 1)} per domain for the degenerate-generation rate, against the uncompressed model. Time and peak memory: "
        "each compression in a fresh process (decisions, router fit, writing and checking the checkpoint).",
        "",
        f"Uncompressed: perplexity {base['perplexity'][ALL]:.1f}, {base['parameters']['total']:,} parameters "
        f"({base['parameters']['active']:,} active per token), degenerate rate {_rate(base['degenerate_rate'])}.",
        "",
        COLUMNS,
        "",
    ]
    for reason, names in by_reason(options.get("left_out") or {}).items():
        lines += [f"Left out {', '.join(f'`{n}`' for n in names)}: {reason}", ""]
    general = _general(summary["cells"])
    for ratio in sorted({r["cell"]["ratio"] for r in general}):
        rows = sorted(
            (r for r in general if r["cell"]["ratio"] == ratio),
            key=lambda r: r["derived"]["change"] if r.get("evaluated") else float("inf"),
        )
        lines += [
            f"## {percent(ratio)}% removed",
            "",
            _main_table(rows),
            "",
            _domain_table(rows, base, domains),
            "",
        ]
    domain_rows = [r for r in summary["cells"] if r["cell"]["calib"] != "all"]
    if domain_rows:
        lines += [_domain_mode(summary, domain_rows), ""]
    ablations = [r for r in summary["cells"] if r["cell"]["tool"] == "ablation"]
    if ablations:
        lines += [_ablation_table(ablations), ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in PLOT_FILES]
    return "\n".join(lines) + "\n"


COLUMNS = (
    "Columns: increase, the perplexity over the uncompressed model's, minus 1; kept, the uncompressed "
    "perplexity over this one; worst domain, the domain of largest increase; KL, KL(uncompressed || compressed) "
    "in nats per token; top-1, the share of tokens whose most likely next token the two models agree on; "
    "degenerate, the share of greedy continuations that loop; parameters, stored; compact, with low-rank "
    "factors and zeroed neurons counted as removed; active, per token; time and peak RSS, of the compression "
    "alone (the shared calibration not counted); stability, the Jaccard similarity of "
    "the experts kept when deciding on each half of the calibration data (1: the halves agree; blank for a "
    "method that scores no data, or where a half of the calibration data is empty)."
)


def _main_table(rows: list[dict]) -> str:
    lines = [
        "| method | kind | ppl | increase | kept | worst domain | KL | top-1 | degenerate | parameters | compact "
        "| active | time (s) | peak RSS (MB) | stability |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell, job = r["cell"], r["job"]
        name = r["name"].rsplit("-", 1)[0]
        if not r.get("evaluated"):
            lines.append(f"| {name} | {kind(cell)} | not evaluated: {_short(r['problem'])} |" + " |" * 12)
            continue
        d = r["derived"]
        stability = job.get("stability_jaccard")
        lines.append(
            f"| {name} | {kind(cell)} | {r['perplexity'][ALL]:.1f} | {d['change']:+.1%} | {d['kept']:.1%} | "
            f"{d['worst_domain']} {d['worst_change']:+.1%} | {r['kl']:.3f} | {r['top1_agreement']:.1%} | "
            f"{_rate(r['degenerate_rate'])} | {r['parameters']['total']:,} | {d['compact_parameters']:,} | "
            f"{r['parameters']['active']:,} | {job['wall_seconds']:.1f} | {job['peak_rss_mb']:.0f} | "
            f"{'' if stability is None else f'{stability:.2f}'} |"
        )
    return "\n".join(lines)


def _domain_table(rows: list[dict], base: dict, domains: list[str]) -> str:
    lines = [
        "| method | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
        "| (uncompressed) | " + " | ".join(f"{base['perplexity'][d]:.1f}" for d in domains) + " |",
    ]
    for r in rows:
        if r.get("evaluated"):
            cells = (f"{r['perplexity'][d]:.1f} ({r['derived']['domain_change'][d]:+.1%})" for d in domains)
            lines.append(f"| {r['name'].rsplit('-', 1)[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _domain_mode(summary: dict, rows: list[dict]) -> str:
    """In-domain and out-of-domain perplexity of the domain cells and the task-agnostic ones."""
    domain = rows[0]["cell"]["calib"]
    base = summary["base"]["perplexity"]
    others = [d for d in base if d not in (ALL, domain)]
    agnostic = [
        r
        for r in summary["cells"]
        if r["cell"]["calib"] == "all"
        and r["cell"]["method"] == rows[-1]["cell"]["method"]
        and r["cell"]["tool"] == "moelab"
        and not r["cell"]["router_fit"]
        and r["cell"]["ratio"] in {x["cell"]["ratio"] for x in rows}
    ]
    lines = [
        f"## Domain mode: calibrated on `{domain}` only",
        "",
        f"In-domain: perplexity on `{domain}`; out-of-domain: the mean over the other {len(others)} domains. The "
        "task-agnostic row is the best general method calibrated on every domain, at the same ratio.",
        "",
        "| removed | method | calibration | in-domain ppl (change) | out-of-domain ppl (change) |",
        "|---|---|---|---|---|",
    ]
    base_out = np.mean([base[d] for d in others])
    for r in sorted(rows + agnostic, key=lambda r: (r["cell"]["ratio"], r["cell"]["calib"] == "all")):
        if not r.get("evaluated"):
            continue
        ppl = r["perplexity"]
        out = float(np.mean([ppl[d] for d in others]))
        where = "task-agnostic" if r["cell"]["calib"] == "all" else domain
        lines.append(
            f"| {percent(r['cell']['ratio'])}% | {r['cell']['method']} | {where} | {ppl[domain]:.1f} "
            f"({ppl[domain] / base[domain] - 1:+.1%}) | {out:.1f} ({out / base_out - 1:+.1%}) |"
        )
    return "\n".join(lines)


def _general(cells: list[dict]) -> list[dict]:
    """The cells of the main tables: calibrated on every domain, not ablations."""
    return [r for r in cells if r["cell"]["calib"] == "all" and r["cell"]["tool"] != "ablation"]


def _ablation_table(rows: list[dict]) -> str:
    """The Super Experts check: the flagged experts' outputs zeroed against as many others."""
    lines = [
        "## Super experts",
        "",
        "The experts the Super Experts rule flags (largest output above the 99.5th percentile of all experts' "
        "maxima and a tenth of the largest, first 75 % of the layers) get zero output weights; the control zeroes "
        "as many other experts, drawn at random in the same layers. Nothing else changes.",
        "",
        "| zeroed | experts (layer: ids) | ppl | increase | worst domain | KL | top-1 | degenerate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        zeroed = "; ".join(f"{i}: {ids}" for i, ids in r["job"]["zeroed"].items()) or "none"
        if not r.get("evaluated"):
            lines.append(f"| {r['cell']['method']} | {zeroed} | {r['problem']} | | | | | |")
            continue
        d = r["derived"]
        lines.append(
            f"| {r['cell']['method']} | {zeroed} | {r['perplexity'][ALL]:.1f} | {d['change']:+.1%} | "
            f"{d['worst_domain']} {d['worst_change']:+.1%} | {r['kl']:.3f} | {r['top1_agreement']:.1%} | "
            f"{_rate(r['degenerate_rate'])} |"
        )
    return "\n".join(lines)


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def _evaluated(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("evaluated")]


def _kind_handles(rows: list[dict]) -> tuple[list, list[str]]:
    """The legend of the kinds (colours) among the evaluated `rows`: handles and names."""
    kinds = [k for k in KIND_COLORS if any(kind(r["cell"]) == k for r in _evaluated(rows))]
    return [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS[k]) for k in kinds], kinds


def _plot_quality(rows: list[dict], model: str) -> bytes:
    """Per ratio: each cell's overall perplexity increase (bar) and its worst domain's (dot)."""
    ratios = sorted({r["cell"]["ratio"] for r in rows})
    most = max(sum(r["cell"]["ratio"] == ratio for r in rows) for ratio in ratios)  # bars of the fullest panel
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 1.3 + 0.32 * most))
    for ax, ratio in zip(np.atleast_1d(axes), ratios):
        cells = sorted(
            _evaluated([r for r in rows if r["cell"]["ratio"] == ratio]),
            key=lambda r: -r["derived"]["change"],
        )
        y = np.arange(len(cells))
        changes = [100 * r["derived"]["change"] for r in cells]
        bars = ax.barh(y, changes, color=[KIND_COLORS[kind(r["cell"])] for r in cells])
        ax.bar_label(bars, [f"{c:+.1f}" for c in changes], fontsize=7, padding=4)  # a +0.2 % bar is a sliver
        ax.scatter([100 * r["derived"]["worst_change"] for r in cells], y, color="k", s=12, zorder=3,
                   label="worst domain")  # fmt: skip
        ax.set_yticks(y, [r["name"].rsplit("-", 1)[0] for r in cells], fontsize=8)
        ax.set_xlabel("perplexity increase over the uncompressed model (%)")
        ax.set_title(f"{percent(ratio)}% removed")
        ax.grid(axis="x", alpha=0.3)
    handles, names = _kind_handles(rows)
    handles.append(plt.Line2D([], [], color="k", marker="o", ls="", markersize=4))
    fig.suptitle(f"{model}: perplexity increase per method")
    fig.tight_layout()  # the axis labels inside the figure, the legend below them (it covered them)
    fig.legend(handles, [*names, "worst domain"], loc="upper center", ncol=6, bbox_to_anchor=(0.5, 0))
    return png(fig)


def _plot_domains(rows: list[dict], model: str) -> bytes:
    """Heat map: perplexity change of every cell on every domain."""
    cells = sorted(_evaluated(rows), key=lambda r: (r["cell"]["ratio"], r["derived"]["change"]))
    domains = [d for d in cells[0]["perplexity"] if d != ALL] if cells else []
    values = np.array([[100 * r["derived"]["domain_change"][d] for d in domains] for r in cells]).reshape(
        len(cells), len(domains)
    )
    fig, ax = plt.subplots(figsize=(1.0 * len(domains) + 3, 0.5 + 0.28 * len(cells)))
    limit = max(float(np.abs(values).max()) if values.size else 1.0, 1.0)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(cells)), [r["name"] for r in cells], fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            dark = abs(values[i, j]) > 0.6 * limit  # the colour map's ends: white text
            ax.text(j, i, f"{values[i, j]:+.0f}", ha="center", va="center", fontsize=6, c="w" if dark else "k")
    fig.colorbar(image, ax=ax, label="perplexity change (%)")
    ax.set_title(f"{model}: perplexity change per domain")
    return png(fig)


def _plot_tradeoff(rows: list[dict], base: dict, model: str) -> bytes:
    """Quality against size: stored parameters (left) and active parameters per token (right)
    against perplexity; the three best cells of each ratio are labelled; the legend, below, gives
    the kinds (colours) and ratios (markers)."""
    cells = _evaluated(rows)
    smallest = min((c["cell"]["ratio"] for c in cells), default=0.0)
    best = {
        r["name"]
        for ratio in {c["cell"]["ratio"] for c in cells}
        for r in sorted((c for c in cells if c["cell"]["ratio"] == ratio), key=lambda c: c["perplexity"][ALL])[:3]
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, (label, size) in zip(
        axes,
        (("stored parameters, compact form (millions)", lambda r: r["derived"]["compact_parameters"]),
         ("active parameters per token (millions)", lambda r: r["parameters"]["active"])),
    ):  # fmt: skip
        for r in cells:
            x, y = size(r) / 1e6, r["perplexity"][ALL]
            marker = "o" if r["cell"]["ratio"] == smallest else "s"
            ax.scatter(x, y, color=KIND_COLORS[kind(r["cell"])], marker=marker, s=22)
            if r["name"] in best:
                ax.annotate(r["name"], (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
        base_size = base["parameters"]["total" if ax is axes[0] else "active"] / 1e6
        ax.scatter(base_size, base["perplexity"][ALL], color="k", marker="*", s=90)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (all domains)")
    handles, names = _kind_handles(cells)
    handles.append(plt.Line2D([], [], color="k", marker="*", ls="", markersize=10))
    names.append("uncompressed")
    handles.append(plt.Line2D([], [], color="grey", marker="o", ls="", markersize=5))
    names.append(f"{percent(smallest)} % removed")
    if any(c["cell"]["ratio"] != smallest for c in cells):
        handles.append(plt.Line2D([], [], color="grey", marker="s", ls="", markersize=5))
        names.append("more removed")
    fig.suptitle(f"{model}: quality against size")
    fig.tight_layout()
    fig.legend(handles, names, loc="upper center", ncol=len(names), bbox_to_anchor=(0.5, 0))
    return png(fig)
