"""The analysis report: PNG plots (matplotlib, Agg) and one self-contained HTML page.

`write_report(summary, out)` writes out/report.json (the numbers), out/plots/*.png and
out/report.html (the same plots embedded as base64, plus tables).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from moelab.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from moelab.plots import plain_log_ticks  # noqa: E402

MAX_PANELS = 16  # grids of per-layer heatmaps show at most this many layers, evenly spaced




def write_report(summary: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write report.json, plots/*.png and report.html into `out`; returns the HTML path."""
    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(_finite(summary), indent=1, allow_nan=False))  # strict JSON
    figures = {
        "load": _load_figure(summary),
        "layer_metrics": _metrics_figure(summary),
        "specialisation": _specialisation_figure(summary),
        "coactivation": _coactivation_figure(summary),
        "affinity": _affinity_figure(summary),
        "super_experts": _super_figure(summary),
    }
    images = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / "plots" / f"{name}.png", buffer.getvalue())
        images[name] = base64.b64encode(buffer.getvalue()).decode("ascii")
    path = out / "report.html"
    atomic_write_text(path, _html(summary, images))
    return path


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (an overflowed bf16 output, say) as None: JSON null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------- figures


def _layers(summary: dict[str, Any]) -> list[str]:
    return list(summary["layers"])


def _shown(items: list) -> list:
    if len(items) <= MAX_PANELS:
        return items
    picks = np.linspace(0, len(items) - 1, MAX_PANELS).round().astype(int)
    return [items[i] for i in sorted(set(picks))]


def _row_shares(counts) -> np.ndarray:
    """[A, B] counts -> each row over its sum; a row summing to 0 (nothing to condition on) NaN: grey."""
    counts = np.array(counts, dtype=float)
    total = counts.sum(1, keepdims=True)
    return np.divide(counts, total, out=np.full_like(counts, np.nan), where=total > 0)


def _domain_share(stats: dict[str, Any]) -> np.ndarray:
    """[M, E] P(expert | domain); a domain without assignments here: a NaN row."""
    return _row_shares(list(stats["domain_load"].values()))


def _relative_load(stats: dict[str, Any]) -> np.ndarray:
    """[E] each expert's load over the mean load of the experts with weights, the mean of the table's
    max/mean (1 = balanced among them; identity experts on the same scale, not in the mean); NaN
    where those experts ran no token."""
    load = np.array(stats["load"], dtype=float)
    mean = load[: stats["num_experts"] - stats.get("identity_experts", 0)].mean()
    return load / mean if mean > 0 else np.full_like(load, np.nan)


def _load_figure(summary: dict[str, Any]):
    layers = _layers(summary)
    E = max(summary["layers"][i]["num_experts"] for i in layers)
    grid = np.full((len(layers), E), np.nan)
    for r, i in enumerate(layers):
        stats = summary["layers"][i]
        grid[r, : stats["num_experts"]] = _relative_load(stats)
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * E, 16), 1 + 0.35 * len(layers)))
    # grey: no value (a layer with fewer experts, or whose experts ran no token)
    image = ax.imshow(grid, aspect="auto", cmap=plt.get_cmap("viridis").with_extremes(bad="lightgrey"))
    for r, i in enumerate(layers):  # a dashed line before a layer's identity experts (LongCat-Flash's)
        stats = summary["layers"][i]
        if stats.get("identity_experts"):
            edge = stats["num_experts"] - stats["identity_experts"] - 0.5
            ax.plot([edge, edge], [r - 0.5, r + 0.5], color="white", linestyle="--", linewidth=1.5)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_xlabel("expert")
    identity = any(summary["layers"][i].get("identity_experts") for i in layers)
    ax.set_title("expert load over the layer's mean\n" + ("(of its experts with weights; 1 = balanced)" if identity else "(1 = balanced)"))
    fig.colorbar(image, ax=ax)
    return fig


def _without_diagonal(matrix: list[list[float]]) -> np.ndarray:
    shown = np.array(matrix, dtype=float)
    np.fill_diagonal(shown, np.nan)
    return shown


def _coactivation_shown(stats: dict[str, Any]) -> np.ndarray:
    """[E, E] P(j | i) without its diagonal; the row of an expert never chosen (P(j | i) undefined,
    0 in report.json) NaN: grey, not the 0 of "never chosen together"."""
    shown = _without_diagonal(stats["coactivation_conditional"])
    shown[np.diagonal(np.array(stats["coactivation"])) == 0] = np.nan
    return shown


def _layer_axis(ax, layers: list[int]) -> None:
    """x = MoE layer index: integer ticks, and room on both sides of a single layer."""
    ax.set_xlabel("layer")
    if len(layers) <= 16:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)


def _metrics_figure(summary: dict[str, Any]):
    layers = _layers(summary)
    x = [int(i) for i in layers]
    stats = [summary["layers"][i] for i in layers]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].plot(x, [s["cv"] for s in stats], "o-", label="CV")
    axes[0, 0].plot(x, [s["max_over_mean"] for s in stats], "s-", label="max / mean")
    axes[0, 0].set_title("load imbalance")
    axes[0, 1].plot(x, [s["routing_entropy_bits"] for s in stats], "o-", label="mean per-token router entropy")
    uniform = [s["max_entropy_bits"] for s in stats]
    axes[0, 1].plot(x, uniform, "k--", marker="_", ms=16, label="log2 E (uniform)")
    axes[0, 1].set_title("routing entropy (bits)")
    axes[1, 0].plot(x, [s["domain_mi_bits"] for s in stats], "o-", label="I(expert; domain)")
    one_domain = "\none domain: 0 by definition" if _one_domain(summary) else ""
    axes[1, 0].set_title("expert-domain mutual information (bits)" + one_domain)
    for L in stats[0]["cls"]:
        if all(s["cls"][L] is None for s in stats):  # no window held a whole chunk of L tokens
            continue
        axes[1, 1].plot(x, [s["cls"][L] if s["cls"][L] is not None else np.nan for s in stats], "o-", label=f"L={L}")
    axes[1, 1].set_title("chunk-level sparsity CLS_L")
    for ax in axes.flat:
        _layer_axis(ax, x)
        ax.margins(y=0.1)
        ax.legend(fontsize=8, loc="upper center", ncol=min(len(ax.get_legend_handles_labels()[1]), 4))
    fig.tight_layout()
    for ax in axes.flat:
        _room_for_legend(ax)
    return fig


def _one_domain(summary: dict[str, Any]) -> bool:
    """Whether the trace's tokens come from one domain (where I(expert; domain) is 0 whatever the routing)."""
    return sum(tokens > 0 for tokens in summary.get("domains", {}).values()) == 1


def _room_for_legend(ax) -> None:
    """Raise the top of `ax`'s y range so that its legend (at the top) sits above every data point."""
    renderer = ax.figure.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer).height / ax.get_window_extent(renderer).height
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top + (top - bottom) * (legend + 0.03) / (1 - legend - 0.03))


def _heatmaps(
    panels: list[tuple[str, Any]],
    title: str,
    ylabels: list[str] | None = None,
    labels: tuple[str | None, str | None] = (None, None),
):
    """One heatmap per panel (name, matrix), all on one colour scale (0 to the largest value of any
    panel: a colour means the same probability in every layer); labels: the (x, y) axis labels."""
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")  # left-out cells, not the maximum's white
    finite = [v for _, m in panels for v in np.ravel(np.array(m, dtype=float)) if np.isfinite(v)]
    vmax = max(finite, default=0.0) or 1.0  # all grey or all 0: any range
    for ax, (name, matrix) in zip(axes.flat, panels):
        matrix = np.array(matrix, dtype=float)
        image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        if matrix.shape[1] <= 16:  # every expert numbered (integer ticks skipped the odd ones)
            ax.set_xticks(range(matrix.shape[1]), range(matrix.shape[1]), fontsize=7)
        if ylabels is not None:
            ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
        elif matrix.shape[0] <= 16:
            ax.set_yticks(range(matrix.shape[0]), range(matrix.shape[0]), fontsize=7)
        ax.set_xlabel(labels[0] or "", fontsize=8)
        ax.set_ylabel(labels[1] or "", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _grey_rows_note(counts: list, rows: str) -> str:
    """A title's note where any of `counts` (the matrices [A, B] conditioned on their rows) has a row
    summing to 0, grey in the plot (`rows`: what those rows are), else ""."""
    return f"\ngrey rows: {rows} (undefined)" if any(not np.array(c).sum(1).all() for c in counts) else ""


def _grid_figure(summary: dict[str, Any], title: str, matrix_of, ylabels=None, labels=(None, None)):
    panels = [(f"layer {i}", matrix_of(summary["layers"][i])) for i in _shown(_layers(summary))]
    return _heatmaps(panels, title, ylabels, labels)


def _specialisation_figure(summary: dict[str, Any]):
    rows = [list(summary["layers"][i]["domain_load"].values()) for i in _shown(_layers(summary))]
    title = "P(expert | domain)" + _grey_rows_note(rows, "domains without assignments")
    return _grid_figure(summary, title, _domain_share, list(summary["domains"]), labels=("expert", None))


def _coactivation_figure(summary: dict[str, Any]):
    counts = [summary["layers"][i]["coactivation"] for i in _shown(_layers(summary))]
    title = "co-activation P(j chosen | i chosen) (diagonal, always 1, left out: grey)"
    title += _grey_rows_note(counts, "experts i never chosen")
    return _grid_figure(summary, title, _coactivation_shown, labels=("expert j", "expert i"))


def _affinity_figure(summary: dict[str, Any]):
    if not summary["affinity"]:
        return None
    shown = _shown(summary["affinity"])
    panels = [(f"layer {a['from']} -> {a['to']}", _row_shares(a["counts"])) for a in shown]
    labels = ("expert j at the next MoE layer", "expert i")
    title = "inter-layer affinity P(expert j at next MoE layer | expert i)"
    note = _grey_rows_note([a["counts"] for a in shown], "experts i never chosen")
    return _heatmaps(panels, title + note, labels=labels)


def _flagged_list(flagged: dict[int, list[str]], max_lines: int = 10, per_line: int = 4) -> str:
    """{layer: its super experts' names} -> "super experts" and one line per layer, at most
    `max_lines` layers and `per_line` names a line (the rest counted; the table lists them all)."""
    def line(layer: int, names: list[str]) -> str:
        more = f" +{len(names) - per_line}" if len(names) > per_line else ""
        return f"layer {layer}: {', '.join(names[:per_line])}{more}"

    lines = [line(i, names) for i, names in sorted(flagged.items())]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [f"+{len(lines) - max_lines + 1} more layers"]
    return "\n".join(["super experts", *lines] if lines else ["no super experts"])


def _super_figure(summary: dict[str, Any]):
    found = summary["super_experts"]
    if not found or found["threshold"] is None:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    spread = {i: np.linspace(-0.3, 0.3, len(v)) for i, v in summary["expert_max_output"].items()}  # by expert
    for i, values in summary["expert_max_output"].items():
        ax.scatter(int(i) + spread[i], values, s=8, c="tab:blue")
    for i, value in summary["shared_max_output"].items():
        ax.scatter([int(i)], [value], marker="D", s=24, c="tab:green")
    flagged = {}  # {layer: names of its super experts}, listed beside the plot: labels at the points overlap
    for s in found["super_experts"]:
        shared = s["expert"] == -1
        x = s["layer"] + (0.0 if shared else spread[str(s["layer"])][s["expert"]])
        ax.scatter([x], [s["max_output"]], s=80, facecolors="none", edgecolors="red")
        flagged.setdefault(s["layer"], []).append("shared" if shared else f"expert {s['expert']}")
    ax.axhline(found["threshold"], color="red", ls="--", lw=1, label="threshold")
    unsearched = [int(i) for i in summary["expert_max_output"] if int(i) not in found["layers"]]
    for i in unsearched:
        ax.axvspan(i - 0.5, i + 0.5, color="lightgrey", alpha=0.5, lw=0)
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    _layer_axis(ax, [int(i) for i in summary["expert_max_output"]])
    ax.set_ylabel("max |down-projection output|")
    ax.set_title("max |down-projection output| per expert (in a layer, experts left to right by index)")
    handles, names = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls="", marker="o", ms=9, mfc="none", mec="red"))
    names.append("super expert")
    if summary["shared_max_output"]:
        handles.append(Line2D([], [], ls="", marker="D", ms=5, c="tab:green"))
        names.append("shared experts")
    if unsearched:
        handles.append(Patch(color="lightgrey", alpha=0.5))
        names.append("not searched (after the\nfirst 75 % of MoE layers)")
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.text(1.01, 0, _flagged_list(flagged), transform=ax.transAxes, va="bottom", fontsize=8, color="red")
    return fig


# ---------------------------------------------------------------------- HTML

SECTIONS = (
    ("load", "Expert load", "Assignments per expert over the mean of the layer's experts (1 = balanced; the busiest one's is its max/mean)."),
    ("layer_metrics", "Per-layer summary",
     "Imbalance, routing entropy, expert-domain mutual information, chunk-level sparsity."),
    ("specialisation", "Expert x domain specialisation",
     "For each domain, the share of its assignments each expert receives."),
    ("coactivation", "Co-activation", "How often expert j is chosen together with expert i, given i."),
    ("affinity", "Inter-layer affinity", "Where a token that chose expert i goes at the next MoE layer."),
    ("super_experts", "Super experts", "Max |down-projection output| per expert (Su et al. 2025)."),
)


LAYER_LEGEND = (
    "experts/token: the experts chosen per token, averaged over tokens (the top-k of a fixed top-k router); CV: the coefficient of variation (std / mean) of the experts' load; max/mean: the busiest expert's load over "
    "the mean (1 = balanced); entropy: the router distribution's entropy, averaged over tokens (log2 E bits = "
    "uniform); I(expert;domain): how much the chosen expert tells of the text's domain; CLS_L: chunk-level "
    "sparsity, the share of (chunk of L consecutive tokens, expert) pairs that no token of the chunk is routed to "
    "(CLS_1: token-level, 1 - k/E for a fixed top-k)."
)

ONE_DOMAIN = " With one domain, as here, the expert tells nothing of it: I(expert;domain) is 0 by definition."


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _layer_table(summary: dict[str, Any]) -> str:
    chunk_lens = list(next(iter(summary["layers"].values()))["cls"])
    header = ["layer", "experts", "experts/token", "CV", "max/mean", "entropy (bits)", "I(expert;domain) (bits)"]
    header += [f"CLS_{L}" for L in chunk_lens]
    rows = [
        [i, _experts_cell(s, _identity_name(summary)), s.get("experts_per_token"), s["cv"], s["max_over_mean"],
         s["routing_entropy_bits"], s["domain_mi_bits"]]
        + [s["cls"][L] if s["cls"][L] is not None else "-" for L in chunk_lens]
        for i, s in summary["layers"].items()
    ]
    return _table(header, rows)


def _identity_name(summary: dict[str, Any]) -> str:
    """What the report calls the choices past the experts: "skip" where a slot on one adds nothing
    (ZAYA's), else "identity" (LongCat-Flash's return their input; traces before the distinction)."""
    return "skip" if summary.get("identity_returns") == "zero" else "identity"


def _identity_note(summary: dict[str, Any]) -> str:
    """Which experts of the plots are identity or skip experts (zero-computation ones: past a dashed
    line in the load plot), "" where none is."""
    ranges = {}
    for i, layer in summary["layers"].items():
        if Z := layer.get("identity_experts", 0):
            ranges.setdefault((layer["num_experts"] - Z, layer["num_experts"] - 1), []).append(i)
    notes = [
        f"layer{'s' * (len(ls) > 1)} {', '.join(ls)}: " + (f"expert {a}" if a == b else f"experts {a}-{b}")
        for (a, b), ls in ranges.items()
    ]
    if not notes:
        return ""
    what = {"skip": "Skip experts, which add nothing", "identity": "Identity experts, which return their input"}
    return (f"{what[_identity_name(summary)]} and compute nothing (past the dashed line): {'; '.join(notes)}; "
            "their load is over the same mean, that of the experts with weights.")


def _experts_cell(layer: dict[str, Any], name: str) -> str:
    """A layer's experts: "E", or "E + Z identity (share of the assignments)" (LongCat-Flash; name
    "skip" for ZAYA's skip expert)."""
    Z = layer.get("identity_experts", 0)
    if not Z:
        return str(layer["num_experts"])
    share = "" if layer["identity_share"] is None else f" ({layer['identity_share']:.0%} of the assignments)"
    return f"{layer['num_experts'] - Z} + {Z} {name}{share}"


def _super_table(summary: dict[str, Any]) -> str:
    found = summary["super_experts"]
    if found is None:
        return "<p>Expert statistics were not recorded in this trace.</p>"
    if found["threshold"] is None:
        return "<p>No expert produced any output.</p>"
    note = f"<p>threshold {found['threshold']:.4g}; searched MoE layers {found['layers']}"
    above = sum(
        v > found["threshold"]
        for i, values in summary["expert_max_output"].items()
        if int(i) not in found["layers"]
        for v in [*values, summary["shared_max_output"].get(i, 0.0)]
    )
    if above:
        note += f"; {above} candidate(s) above the threshold in the layers not searched (after the first 75 %)"
    note += "</p>"
    if not found["super_experts"]:
        return note + "<p>No super experts in the searched layers.</p>"
    rows = [[s["layer"], "shared" if s["expert"] == -1 else s["expert"], s["max_output"], s["over_median"]]
            for s in found["super_experts"]]
    return note + _table(["layer", "expert", "max |output|", "x median"], rows)


def _html(summary: dict[str, Any], images: dict[str, str]) -> str:
    title = f"moelab routing analysis: {summary['model']}"
    domains = ", ".join(f"{d} ({n:,})" for d, n in summary["domains"].items())
    settings = summary.get("trace_settings", {})
    split = f", {settings['split']} split" if "split" in settings else ""
    source = settings.get("data", "given token streams") + split
    dtype = f", the model in {html.escape(settings['dtype'])}" if "dtype" in settings else ""
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>family {html.escape(summary['family'])}; {summary['tokens']:,} tokens of {html.escape(source)} "
        f"in windows of at most {settings.get('seq_len', '?')}{dtype}; domains: {html.escape(domains)}</p>",
        _layer_table(summary),
        f"<p>{html.escape(LAYER_LEGEND + ONE_DOMAIN * _one_domain(summary))}</p>",
    ]
    if summary["checks"]:
        rows = [[i, c["tokens"], c["mismatched"], c["max_weight_error"]] for i, c in summary["checks"].items()]
        low = settings.get("dtype") in ("bfloat16", "float16")
        precision = (f" The model ran in {settings['dtype']}: a few mismatched tokens can be near-ties that the "
                     "block's lower-precision routing broke the other way." if low else "")
        parts += ["<h2>Routing check</h2>",
                  f"<p>Routing recomputed from the checkpoint view against what each block used.{precision}</p>",
                  _table(["layer", "tokens", "mismatched", "max weight error"], rows)]
    for name, heading, text in SECTIONS:
        if name == "super_experts" and summary["family"] == "llama4_text":
            text += " Llama 4 scales an expert's input by its routing weight, so these outputs are of scaled inputs."
        if name == "load" and (identity := _identity_note(summary)):
            text += f" {identity}"
        parts.append(f"<h2>{heading}</h2><p>{text}</p>")
        if name in images:
            parts.append(f'<img alt="{name}" src="data:image/png;base64,{images[name]}">')
        elif name == "affinity":
            parts.append("<p>Needs at least two MoE layers.</p>")
        if name == "super_experts":
            parts.append(_super_table(summary))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
