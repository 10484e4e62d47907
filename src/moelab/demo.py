"""The main job on built-in defaults (`moelab demo`, `make run`): open the shipped reference MoE,
measure it, show how it routes, compress it, and compare.

    1. the model: parameters, active parameters, FLOPs per token;
    2. validation perplexity on each corpus domain;
    3. its routing (`moelab analyze`): load balance, expert x domain specialisation, the HTML report;
    4. a first compression: drop the least-used experts of every layer (frequency pruning, written
       back as a checkpoint the writer checks), then the perplexities of both, side by side.

Everything lands in `out/` (report.html, summary.md, summary.json, the pruned checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from moelab.analyze import analyze
from moelab.eval import domain_losses
from moelab.hf.writer import drop_experts
from moelab.io import atomic_write_text, output_dir
from moelab.models import load_pretrained, model_info
from moelab.models.reference import reference_model_dir
from moelab.trace import TraceOptions

KIND = "demo"


def run_demo(
    out: str | Path = "runs/demo",
    *,
    model_dir: str | Path | None = None,
    prune: int = 2,
    eval_tokens: int = 8192,
    trace_tokens: int = 24000,
    overwrite: bool = False,
    console: Console | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the four steps on `model_dir` (default: the shipped ref-8e-top2) into `out`, dropping
    the `prune` least-used experts per MoE layer. A previous demo in `out` is replaced only with
    `overwrite`. Returns the summary (also in out/summary.json)."""
    console = console or Console(quiet=quiet)
    model_dir = reference_model_dir() if model_dir is None else Path(model_dir)
    model = load_pretrained(model_dir).eval()
    cfg = model.config
    if cfg.moe is None:
        raise ValueError(f"{model_dir} is a dense model; the demo needs an MoE model")
    if not 0 <= prune <= cfg.moe.num_experts - cfg.moe.top_k:
        raise ValueError(
            f"--prune must lie in [0, num_experts - top_k = {cfg.moe.num_experts - cfg.moe.top_k}], got {prune}"
        )

    pruned_name = f"pruned-{cfg.moe.num_experts - prune}e"
    entries = ["analysis", "summary.json"] + ([pruned_name] if prune else [])
    with output_dir(out, KIND, entries=entries, inputs=[model_dir], overwrite=overwrite) as claimed:
        return _run_steps(
            model_dir, model, claimed.path, prune, pruned_name, eval_tokens, trace_tokens, console, quiet
        )


def _run_steps(
    model_dir: Path,
    model,
    out: Path,
    prune: int,
    pruned_name: str,
    eval_tokens: int,
    trace_tokens: int,
    console: Console,
    quiet: bool,
) -> dict[str, Any]:
    cfg = model.config
    seq_len = min(256, cfg.max_seq_len)
    info = model_info(cfg, seq_len=seq_len)
    console.rule(f"[bold]1/4 the model: {model_dir.name}")
    console.print(
        f"{cfg.n_layers} layers, D={cfg.dim}, {cfg.moe.num_experts} experts top-{cfg.moe.top_k}"
        + (f" + {cfg.moe.num_shared} shared" if cfg.moe.num_shared else "")
        + f"; {info['total_params']:,} parameters, {info['active_params']:,} active per token, "
        f"{info['flops_per_token']:,} FLOPs/token"
    )

    console.rule("[bold]2/4 validation perplexity per domain")
    original = domain_losses(model, seq_len=seq_len, max_tokens=eval_tokens, quiet=quiet)
    console.print(_perplexity_table(original, None, info, None))

    console.rule("[bold]3/4 routing")
    options = TraceOptions(max_tokens=trace_tokens, seq_len=seq_len)
    report = analyze(model_dir, out / "analysis", options=options, quiet=quiet)
    routing = json.loads((out / "analysis" / "report.json").read_text())
    console.print(_routing_table(routing))
    console.print(_specialisation_table(routing))
    console.print(f"full report: {report}")

    if prune:
        console.rule(f"[bold]4/4 compress: drop the {prune} least-used experts per layer, compare")
        pruned = _prune_least_used(model_dir, out / pruned_name, routing, prune, eval_tokens, seq_len, quiet)
        console.print(_perplexity_table(original, pruned["losses"], info, pruned["info"]))
    else:
        console.rule("[bold]4/4 compress: skipped (--prune 0)")
        pruned = None

    summary = {
        "model": str(model_dir),
        "model_info": {k: info[k] for k in ("total_params", "active_params", "flops_per_token")},
        "perplexity": {d: v.perplexity for d, v in original.items()},
        "routing": {
            layer: {k: stats[k] for k in ("cv", "max_over_mean", "domain_mi_bits", "routing_entropy_bits")}
            for layer, stats in routing["layers"].items()
        },
        "pruned": None
        if pruned is None
        else {
            "dir": str(pruned["dir"]),
            "dropped_experts": {str(k): v for k, v in pruned["dropped"].items()},
            "total_params": pruned["info"]["total_params"],
            "perplexity": {d: v.perplexity for d, v in pruned["losses"].items()},
        },
        "report": str(report),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    console.print(f"\nsummary: {out / 'summary.json'}; routing report: {report}")
    return summary


def _prune_least_used(
    model_dir: Path,
    pruned_dir: Path,
    routing: dict[str, Any],
    prune: int,
    eval_tokens: int,
    seq_len: int,
    quiet: bool,
) -> dict[str, Any]:
    """Drop the `prune` least-loaded experts of every MoE layer (loads from the routing report),
    write the checkpoint to `pruned_dir` and measure it: {"dir", "dropped", "info", "losses"}."""
    dropped = {
        int(layer): sorted(range(len(stats["load"])), key=lambda e: stats["load"][e])[:prune]
        for layer, stats in routing["layers"].items()
    }
    drop_experts(model_dir, pruned_dir, dropped, quiet=quiet)
    model = load_pretrained(pruned_dir).eval()
    return {
        "dir": pruned_dir,
        "dropped": dropped,
        "info": model_info(model.config, seq_len=seq_len),
        "losses": domain_losses(model, seq_len=seq_len, max_tokens=eval_tokens, quiet=quiet),
    }


def _routing_table(routing: dict[str, Any]) -> Table:
    """Per MoE layer: load balance, routing entropy and specialisation (MI with the domain)."""
    table = Table(title=f"routing of {routing['tokens']:,} validation tokens")
    for column in ("layer", "load max/mean", "load CV", "entropy (bits)", "MI(expert; domain) (bits)"):
        table.add_column(column, justify="right")
    for layer, stats in routing["layers"].items():
        table.add_row(
            layer,
            f"{stats['max_over_mean']:.2f}",
            f"{stats['cv']:.2f}",
            f"{stats['routing_entropy_bits']:.2f}",
            f"{stats['domain_mi_bits']:.3f}",
        )
    return table


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


def _perplexity_table(original, pruned, info, pruned_info) -> Table:
    title = "validation perplexity" + (
        "" if pruned is None else f" (params {info['total_params']:,} -> {pruned_info['total_params']:,})"
    )
    table = Table(title=title)
    table.add_column("domain")
    table.add_column("original", justify="right")
    if pruned is not None:
        table.add_column("pruned", justify="right")
        table.add_column("change", justify="right")
    for domain, value in original.items():
        row = [domain, f"{value.perplexity:.1f}"]
        if pruned is not None:
            after = pruned[domain].perplexity
            row += [f"{after:.1f}", f"{after / value.perplexity - 1:+.1%}"]
        table.add_row(*row)
    return table
