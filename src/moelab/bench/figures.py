"""Figures of the speed benchmarks' results: `moelab bench plot RESULT.json`, and `--plot` on
`moelab bench layer`, `generate` and `offload`. One PNG per result file, drawn from its JSON
alone (so a result measured on another machine can be drawn here):

- layer: each implementation's tokens/s over the dense FFN's (the baseline of the same rounds),
  one panel per dtype, a group of bars per shape and mode;
- generate: tokens/s against batch size per implementation, with the read-bandwidth bound;
- offload: per model, the expert-cache hit rate (top) and tokens/s over the model in memory, eager
  (bottom; the compiled model in memory a dashed line) against the share of experts resident, one
  line per cache policy.

The PNG carries the text chunk Software = "moelab bench plot": the mark by which `--overwrite`
knows a file it may replace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moelab.files import read_json_object
from moelab.plots import plain_log_ticks, plt, png

SOFTWARE = "moelab bench plot"
GOAL_HIT_RATE = (0.25, 0.85)  # the inference issue's goal: >= 85 % hits with a quarter of the experts resident


def png_of(doc: dict) -> bytes:
    """The figure of a benchmark's JSON result (`doc`, as `moelab bench ... --json` writes it), as PNG bytes."""
    return png(figure(doc), metadata={"Software": SOFTWARE})


def figure(doc: dict):
    """The matplotlib figure of `doc`; a result of another kind is refused naming the kinds drawn."""
    draw = _FIGURES.get(doc.get("format"))
    if draw is None:
        kinds = ", ".join(sorted(_FIGURES))
        raise ValueError(f"no figure for a result of format {doc.get('format')!r}: `moelab bench plot` draws {kinds}")
    open_before = set(plt.get_fignums())
    try:
        return draw(doc)
    except (KeyError, TypeError, IndexError, AttributeError) as err:  # a result file edited or cut short
        for number in set(plt.get_fignums()) - open_before:
            plt.close(number)
        raise ValueError(
            f"the {doc['format']} result is incomplete or malformed ({type(err).__name__}: {err}): draw a file "
            "that `moelab bench ... --json` wrote"
        ) from None


def read_result(path: str | Path) -> dict:
    """A benchmark result file, checked to be one `figure` draws."""
    doc = read_json_object(path, "a benchmark result")
    if doc.get("format") not in _FIGURES:
        kinds = ", ".join(sorted(_FIGURES))
        raise ValueError(
            f"{path} is not a result `moelab bench plot` draws (format {doc.get('format')!r}; it draws {kinds}): "
            "give the --json file of `moelab bench layer`, `generate` or `offload`"
        )
    return doc


def is_own_png(path: Path) -> bool:
    """Whether `path` is a PNG this module wrote (its Software text chunk)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def _layer(doc: dict):
    """moelab ÷ dense (and every other implementation's ratio): bars per shape and mode, a panel per dtype."""
    rows = doc["results"] + [dict(r, mode=r["mode"] + "\nskewed") for r in doc.get("skewed", [])]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    impls = [i for i in _LAYER_IMPLS if any(r["impl"] == i for r in rows)]  # dense: the dashed line at 1
    setup, colors = doc.get("setup", {}), _colors(impls)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.2), squeeze=False, sharey=True)
    for ax, dtype in zip(axes[0], dtypes):
        ours = [r for r in rows if r["dtype"] == dtype]
        groups = list(dict.fromkeys((r["config"], r["mode"]) for r in ours))
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            ratio = {(r["config"], r["mode"]): r["ratio_vs_dense"] for r in ours if r["impl"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * width for i, g in enumerate(groups) if g in ratio]
            bars = ax.bar(xs, [ratio[g] for g in groups if g in ratio], width, label=impl, color=colors[impl])
            if impl == "moelab":
                ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="dense")
        ax.set_xticks(range(len(groups)), [f"{config}\n{mode}" for config, mode in groups], fontsize=8)
        tokens = setup.get("bf16_tokens" if dtype == "bf16" else "tokens", setup.get("tokens", "?"))
        ax.set_title(f"{dtype}, {tokens} tokens")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("tokens/s ÷ dense FFN of equal active FLOPs")
    load = f", {setup['load']} busy process(es) beside" if setup.get("load") else ""
    fig.suptitle(f"MoE layer, {setup.get('threads', '?')} thread(s){load}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0))
    return fig


def _generate(doc: dict):
    """tokens/s against batch size (both axes log), one panel per model, with the bound."""
    models = list(dict.fromkeys(r["model"] for r in doc["results"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = sorted((r for r in doc["results"] if r["model"] == model), key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        impls = list(dict.fromkeys(name for r in rows for name in r["tokens_per_s"]))
        colors = _colors(impls)
        labelled = [i for i in impls if i != "transformers"]
        for impl in impls:
            speeds = [r["tokens_per_s"].get(impl, float("nan")) for r in rows]
            ax.plot(batches, speeds, marker="o", label=impl, color=colors[impl])
            if impl != "transformers" and "transformers" in impls:
                for b, s, r in zip(batches, speeds, rows):
                    ax.annotate(f"{r['ratio_vs_transformers'][impl]:.2f}×", (b, s), fontsize=7, color=colors[impl],
                                xytext=(4, 11 * labelled.index(impl) - 10), textcoords="offset points")  # fmt: skip
        # the marker: a dotted line through one batch size (a result of batch 1 alone) draws nothing
        bound = [r["bound_tokens_per_s"] for r in rows]
        ax.plot(batches, bound, "k:", marker="_", ms=14, label="read-bandwidth bound")
        family = rows[0].get("family")
        ax.set_title(model + (f" (transformers: {family})" if family else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    compared = any("transformers" in r["tokens_per_s"] for r in doc["results"])
    axes[0][0].set_ylabel("decoded tokens/s" + (" (labels: × transformers)" if compared else ""))
    setup = doc.get("setup", {})
    parts = [
        setup.get("dtype"),
        setup.get("threads") and f"{setup['threads']} thread(s)",
        setup.get("new_tokens") and f"{setup['new_tokens']} new tokens",
        setup.get("device_name") or setup.get("device"),
    ]
    fig.suptitle(", ".join(["greedy decoding", *(str(p) for p in parts if p)]))
    return fig


def _offload(doc: dict):
    """Per model: hit rate (top) and tokens/s ÷ in memory (bottom) against the share resident."""
    models = doc["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7.5), squeeze=False, sharex=True)
    for column, m in enumerate(models):
        hits, speed = axes[0][column], axes[1][column]
        residents = sorted({r["resident"] for r in m["rows"]})
        policies = list(dict.fromkeys(r["policy"] for r in m["rows"]))
        colors = _colors(policies)
        for policy in policies:
            for compiled in (False, True):
                rows = sorted(
                    (r for r in m["rows"] if r["policy"] == policy and bool(r.get("compiled")) == compiled),
                    key=lambda r: r["resident"],
                )
                if not rows:
                    continue
                xs = [100 * r["resident"] for r in rows]
                style = dict(color=colors[policy], marker="o", ls="--" if compiled else "-")
                if not compiled:  # a compiled row has the same hits as the eager one
                    hits.plot(xs, [100 * r["hit_rate"] for r in rows], label=policy, **style)
                speed.plot(xs, [r["vs_memory"] for r in rows], label=policy + (" compiled" if compiled else ""), **style)
        hits.plot(100 * GOAL_HIT_RATE[0], 100 * GOAL_HIT_RATE[1], "k*", ms=11, label="goal: 85 % at 25 %")
        speed.axhline(1.0, color="k", lw=0.8, ls=":", label="in memory")
        if compiled_in_memory := _compiled_in_memory(m):  # the compiled rows' own reference, on the same scale
            speed.axhline(compiled_in_memory, color="k", lw=0.8, ls="--", label="in memory, compiled")
        hits.set_title(f"{m['model']}: {m['experts']} routed experts")
        hits.set_ylabel("decode hit rate (%)")
        hits.set_ylim(0, 102)
        speed.set_ylabel("tokens/s ÷ the model in memory (eager)")
        speed.set_xlabel("routed experts resident (%)")
        speed.set_xscale("log")
        speed.set_xticks([100 * r for r in residents], [f"{100 * r:g}" for r in residents])
        hits.grid(alpha=0.3)
        hits.legend(fontsize=7)
        speed.grid(alpha=0.3)  # its legend below it: inside, it covered the slowest policies' points
        speed.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    options = doc.get("options", {})
    storage = f"storage emulated at {options['read_gbps']} GB/s" if options.get("read_gbps") else "files in page cache"
    fig.suptitle(f"offloaded decoding, batch 1, {options.get('threads', '?')} thread(s), {storage}")
    return fig


def _compiled_in_memory(model: dict) -> float | None:
    """The compiled model in memory's tokens/s over the eager one's (None: not measured); results
    written before the same-round ratio was recorded give the ratio of the two medians."""
    if model.get("in_memory_compiled_vs_memory"):
        return model["in_memory_compiled_vs_memory"]
    if model.get("in_memory_compiled_tokens_per_s"):
        return model["in_memory_compiled_tokens_per_s"] / model["in_memory_tokens_per_s"]
    return None


_LAYER_IMPLS = ("moelab", "serial", "triton", "loop", "hf")
_COLORS = {
    "moelab": "C0", "transformers": "C1", "moelab_compiled": "C2", "dense": "C7", "hf": "C1", "loop": "C3",
    "serial": "C4", "triton": "C5", "lru": "C3", "reuse": "C7", "affinity": "C4", "lookahead-x1": "C9",
    "lookahead": "C0", "both": "C2",
}  # fmt: skip


def _colors(names: list[str]) -> dict[str, str]:
    """A colour per name: its own for the implementations and policies moelab benchmarks, others
    (a skip ratio, a top-p threshold) from colours none of those take."""
    spare = iter(("C6", "C8", "teal", "navy", "darkgoldenrod", "crimson", "k"))
    return {name: _COLORS.get(name) or next(spare, "k") for name in names}


# the benchmarks' JSON_FORMAT, spelled out: drawing a result needs none of the benchmarks' imports (torch)
_FIGURES: dict[str, Callable[[dict], object]] = {
    "moelab-bench-layer/1": _layer,
    "moelab-bench-generate/1": _generate,
    "moelab-bench-offload/1": _offload,
}
