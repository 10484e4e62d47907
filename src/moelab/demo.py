"""The main job on built-in defaults (`moelab demo`, `make run`): open the shipped reference MoE,
measure it, show how it routes, compress it, and compare.

    1. the model: parameters, active parameters, FLOPs per token;
    2. held-out (test split) perplexity on each corpus domain;
    3. its routing (`moelab analyze`): load balance, expert x domain specialisation, the HTML report;
    4. compression: one calibration pass on the validation split (with the backward sweep), then
       `prune` experts of every layer removed by frequency pruning and by REAP, and the same share
       of the routed parameters removed by moelab's recipe (`moelab compress`, written by the
       checked writer), and the perplexities side by side.

Everything lands in `out/`: analysis/ (report.html), calibration/, frequency-<E'>e/,
reap-<E'>e/ and moelab-<kept %>pct/ (the compressed checkpoints), summary.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from moelab.analyze import analyze
from moelab.compress import CalibrationOptions, calibrate, compress
from moelab.compress.observers import DEFAULT_OBSERVERS
from moelab.eval import domain_losses
from moelab.io import atomic_write_text, output_dir
from moelab.models import load_pretrained, model_info
from moelab.models.reference import model_dir as checkpoint_dir
from moelab.trace import TraceOptions

KIND = "demo"
METHODS = ("frequency", "reap", "moelab")
EVAL_SPLIT = "test"  # calibration reads the validation split


def run_demo(
    out: str | Path = "runs/demo",
    *,
    model_dir: str | Path | None = None,
    prune: int = 2,
    eval_tokens: int = 8192,
    trace_tokens: int = 24000,
    calib_tokens: int = 16384,
    overwrite: bool = False,
    console: Console | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the four steps on `model_dir` (default: the shipped ref-8e-top2) into `out`, removing
    `prune` experts per MoE layer. A previous demo in `out` is replaced only with `overwrite`.
    Returns the summary (also in out/summary.json). quiet: no progress bars or tables, only the
    final line naming the summary and the report (as other commands keep their "wrote" line)."""
    final = console or Console()
    console = Console(quiet=True) if quiet else final
    model_dir = checkpoint_dir(model_dir)  # None: the default shipped model; or a shipped model's name
    model = load_pretrained(model_dir).eval()
    cfg = model.config
    if cfg.moe is None:
        raise ValueError(f"{model_dir} is a dense model; the demo needs an MoE model")
    if not 0 <= prune <= cfg.moe.num_experts - cfg.moe.top_k:
        raise ValueError(
            f"--prune must lie in [0, num_experts - top_k = {cfg.moe.num_experts - cfg.moe.top_k}], got {prune}"
        )
    E = cfg.moe.num_experts
    kept = f"{E - prune}e" if prune else ""
    names = {method: f"{method}-{kept}" for method in METHODS[:2]} if prune else {}
    if prune:  # the recipe removes the same share of the routed parameters, not necessarily experts
        names["moelab"] = f"moelab-{round(100 * (E - prune) / E)}pct"
    entries = ["analysis", "summary.json"] + (["calibration", *names.values()] if prune else [])
    with output_dir(out, KIND, entries=entries, inputs=[model_dir], overwrite=overwrite) as claimed:
        out = claimed.path
        seq_len = min(256, cfg.max_seq_len)
        info = model_info(cfg, seq_len=seq_len)
        console.rule(f"[bold]1/4 the model: {model_dir.name}")
        console.print(
            f"{cfg.n_layers} layers, D={cfg.dim}, {cfg.moe.num_experts} experts top-{cfg.moe.top_k}"
            + (f" + {cfg.moe.num_shared} shared" if cfg.moe.num_shared else "")
            + f"; {info['total_params']:,} parameters, {info['active_params']:,} active per token, "
            f"{info['flops_per_token']:,} FLOPs/token"
        )

        def perplexity(m):
            return domain_losses(m, split=EVAL_SPLIT, seq_len=seq_len, max_tokens=eval_tokens, quiet=quiet)

        console.rule(f"[bold]2/4 {EVAL_SPLIT} perplexity per domain")
        original = perplexity(model)
        console.print(_perplexity_table(original, {}, info))

        console.rule("[bold]3/4 routing")
        report = analyze(
            model_dir,
            out / "analysis",
            options=TraceOptions(max_tokens=trace_tokens, seq_len=seq_len),
            quiet=quiet,
        )
        routing = json.loads((out / "analysis" / "report.json").read_text())
        console.print(_routing_table(routing))
        console.print(_specialisation_table(routing))
        console.print(f"full report: {report}")

        compressed = {}
        if prune:
            console.rule(
                f"[bold]4/4 compress: remove {prune} of {E} experts per layer (frequency, REAP) "
                f"or {prune / E:.0%} of the routed parameters (moelab's recipe)"
            )
            options = CalibrationOptions(
                tokens=calib_tokens, seq_len=seq_len, observers=(*DEFAULT_OBSERVERS, "neurons")
            )
            stats = calibrate(model_dir, out / "calibration", options=options, quiet=quiet).directory
            for method, name in names.items():
                result = compress(
                    model_dir, out / name, method=method, ratio=prune / E, stats=stats, quiet=quiet
                )
                pruned = load_pretrained(out / name).eval()
                compressed[method] = {
                    "dir": str(out / name),
                    "dropped_experts": {layer: entry["dropped"] for layer, entry in result["layers"].items()},
                    "stability_jaccard": result["stability_jaccard"],
                    "info": model_info(pruned.config, seq_len=seq_len),
                    "losses": perplexity(pruned),
                }
            console.print(_perplexity_table(original, compressed, info))
        else:
            console.rule("[bold]4/4 compress: skipped (--prune 0)")

        summary = {
            "model": str(model_dir),
            "model_info": {k: info[k] for k in ("total_params", "active_params", "flops_per_token")},
            "eval_split": EVAL_SPLIT,
            "perplexity": {d: v.perplexity for d, v in original.items()},
            "routing": {
                layer: {
                    k: stats[k] for k in ("cv", "max_over_mean", "domain_mi_bits", "routing_entropy_bits")
                }
                for layer, stats in routing["layers"].items()
            },
            "compressed": {
                method: {
                    "dir": c["dir"],
                    "dropped_experts": c["dropped_experts"],
                    "stability_jaccard": c["stability_jaccard"],
                    "total_params": c["info"]["total_params"],
                    "perplexity": {d: v.perplexity for d, v in c["losses"].items()},
                }
                for method, c in compressed.items()
            },
            "report": str(report),
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        console.print()
        final.print(f"summary: {out / 'summary.json'}; routing report: {report}")
        return summary


def _routing_table(routing: dict[str, Any]) -> Table:
    """Per MoE layer: load balance, routing entropy and specialisation (MI with the domain)."""
    table = Table(title=f"routing of {routing['tokens']:,} validation tokens")
    for column in ("layer", "load max/mean", "load CV", "entropy (bits)", "MI(expert; domain) (bits)"):
        table.add_column(column, justify="right")
    for layer, stats in routing["layers"].items():
        table.add_row(
            layer,
            _number(stats["max_over_mean"], ".2f"),
            _number(stats["cv"], ".2f"),
            _number(stats["routing_entropy_bits"], ".2f"),
            _number(stats["domain_mi_bits"], ".3f"),
        )
    return table


def _number(value: float | None, spec: str) -> str:
    """`value` formatted, or "-" where the analysis has none (a layer whose router chose no expert)."""
    return "-" if value is None else format(value, spec)


def _specialisation_table(routing: dict[str, Any]) -> Table:
    """Each domain's most used expert per layer, with the share of the domain's tokens it takes."""
    layers = routing["layers"]
    table = Table(title="most used expert per domain (share of the domain's tokens routed to it)")
    table.add_column("domain")
    for layer in layers:
        table.add_column(f"L{layer}", justify="right")
    for domain in routing["domains"]:
        cells = []
        for stats in layers.values():
            load = stats["domain_load"][domain]
            share = max(load) / max(sum(load), 1) * stats["experts_per_token"]
            cells.append(f"{load.index(max(load))} ({share:.0%})")
        table.add_row(domain, *cells)
    return table


def _perplexity_table(original, compressed: dict[str, dict], info) -> Table:
    """Perplexity per domain of the original and of each compressed model, with the change."""
    sizes = ", ".join(f"{m} {c['info']['total_params']:,}" for m, c in compressed.items())
    table = Table(
        title=f"{EVAL_SPLIT} perplexity"
        + (f" (params {info['total_params']:,} -> {sizes})" if compressed else "")
    )
    table.add_column("domain")
    table.add_column("original", justify="right")
    for method in compressed:
        table.add_column(method, justify="right")
        table.add_column("change", justify="right")
    for domain, value in original.items():
        row = [domain, f"{value.perplexity:.1f}"]
        for c in compressed.values():
            after = c["losses"][domain].perplexity
            row += [f"{after:.1f}", f"{after / value.perplexity - 1:+.1%}"]
        table.add_row(*row)
    return table
