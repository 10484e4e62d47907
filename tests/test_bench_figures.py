"""`moelab bench plot` and `--plot`: the figures draw the results' numbers, and the PNGs follow the
output rules (new, or moelab's own with --overwrite)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from moelab.bench import figures, generate, layer, offload
from moelab.cli import app
from moelab.plots import plain_log_ticks, plt, png

runner = CliRunner()


def _layer_doc() -> dict:
    results = [
        {"config": c, "dtype": d, "mode": m, "impl": i, "tokens_per_s": 1000.0, "ratio_vs_dense": r}
        for c, d, m, i, r in [
            ("e8k2", "fp32", "fwd", "moelab", 1.13), ("e8k2", "fp32", "fwd", "hf", 0.92),
            ("e8k2", "fp32", "fwd", "dense", 1.0), ("e64k8", "fp32", "fwdbwd", "moelab", 0.86),
            ("e64k8", "fp32", "fwdbwd", "hf", 0.6), ("e64k8", "fp32", "fwdbwd", "dense", 1.0),
            ("e8k2", "bf16", "fwd", "moelab", 0.64), ("e8k2", "bf16", "fwd", "dense", 1.0),
        ]
    ]  # fmt: skip
    skewed = [
        {"config": "e64k8", "dtype": "fp32", "mode": "fwdbwd", "impl": "moelab", "ratio_vs_dense": 0.89},
        {"config": "e64k8", "dtype": "fp32", "mode": "fwdbwd", "impl": "dense", "ratio_vs_dense": 1.0},
    ]
    setup = {"tokens": 4096, "bf16_tokens": 512, "threads": 2, "load": 1}
    return {"format": layer.JSON_FORMAT, "results": results, "skewed": skewed, "memory": [], "setup": setup}


def _generate_doc() -> dict:
    def row(model, batch, moelab, transformers, bound):
        return {
            "model": model, "family": "mixtral", "batch": batch,
            "tokens_per_s": {"moelab": moelab, "transformers": transformers},
            "ratio_vs_transformers": {"moelab": moelab / transformers, "transformers": 1.0},
            "bound_tokens_per_s": bound,
        }  # fmt: skip

    results = [row("a", 1, 300.0, 150.0, 1000.0), row("a", 8, 900.0, 800.0, 4000.0), row("b", 1, 250.0, 100.0, 900.0)]
    setup = {"dtype": "fp32", "threads": 1, "new_tokens": 64, "device_name": "a CPU"}
    return {"format": generate.JSON_FORMAT, "setup": setup, "results": results, "routing_quality": {}}


def _offload_doc() -> dict:
    def row(resident, policy, hit_rate, vs_memory, compiled=False):
        return {"resident": resident, "policy": policy, "compiled": compiled, "hit_rate": hit_rate, "vs_memory": vs_memory}

    rows = [
        row(0.05, "lru", 0.0, 0.79), row(0.25, "lru", 0.45, 0.83), row(1.0, "lru", 1.0, 0.9),
        row(0.05, "lookahead", 0.84, 0.58), row(0.25, "lookahead", 0.9, 0.57), row(1.0, "lookahead", 1.0, 0.86),
        row(0.05, "lru", 0.0, 1.5, compiled=True), row(0.25, "lru", 0.45, 1.7, compiled=True),
    ]  # fmt: skip
    model = {"model": "ref", "experts": 48, "rows": rows}
    return {"format": offload.JSON_FORMAT, "options": {"threads": 1, "read_gbps": 2.0}, "models": [model]}


def test_each_benchmarks_format_has_its_figure():
    assert set(figures._FIGURES) == {layer.JSON_FORMAT, generate.JSON_FORMAT, offload.JSON_FORMAT}


def _lines(ax) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


def test_the_layer_figure_draws_each_implementations_ratio_to_dense():
    fig = figures.figure(_layer_doc())
    fp32, bf16 = fig.axes
    assert fp32.get_title() == "fp32, 4096 tokens" and bf16.get_title() == "bf16, 512 tokens"
    bars = {label: [round(p.get_height(), 3) for p in c] for c, label in zip(fp32.containers, ("moelab", "hf"))}
    assert bars == {"moelab": [1.13, 0.86, 0.89], "hf": [0.92, 0.6]}  # the skewed group has no hf bar
    assert [t.get_text() for t in fp32.get_xticklabels()] == ["e8k2\nfwd", "e64k8\nfwdbwd", "e64k8\nfwdbwd\nskewed"]
    assert [round(p.get_height(), 3) for p in bf16.containers[0]] == [0.64]
    assert "1 busy process" in fig._suptitle.get_text()
    plt.close(fig)


def test_the_generate_figure_draws_tokens_per_s_against_batch_with_the_bound():
    fig = figures.figure(_generate_doc())
    a, b = fig.axes
    assert _lines(a) == {"moelab": [300.0, 900.0], "transformers": [150.0, 800.0], "read-bandwidth bound": [1000.0, 4000.0]}
    assert list(a.get_lines()[0].get_xdata()) == [1, 8]
    assert [t.get_text() for t in a.texts] == ["2.00×", "1.12×"]
    assert _lines(b)["moelab"] == [250.0] and b.get_title() == "b (transformers: mixtral)"
    plt.close(fig)


def test_the_offload_figure_draws_hit_rates_and_speed_against_the_share_resident():
    fig = figures.figure(_offload_doc())
    hits, speed = fig.axes
    assert _lines(hits) == {"lru": [0.0, 45.0, 100.0], "lookahead": [84.0, 90.0, 100.0], "goal: 85 % at 25 %": [85.0]}
    assert list(hits.get_lines()[0].get_xdata()) == [5.0, 25.0, 100.0]
    lines = _lines(speed)
    assert lines["lru"] == [0.79, 0.83, 0.9] and lines["lru compiled"] == [1.5, 1.7]
    assert lines["lookahead"] == [0.58, 0.57, 0.86]
    assert "2.0 GB/s" in fig._suptitle.get_text()
    plt.close(fig)


def test_variants_beside_the_known_implementations_get_colours_of_their_own():
    """`--skip` and `--top-p` add rows such as moelab_skip0.5: never drawn in a known one's colour."""
    doc = _generate_doc()
    for row in doc["results"]:
        for name, speed in (("moelab_skip0.2", 280.0), ("moelab_skip0.5", 260.0)):
            row["tokens_per_s"][name] = speed
            row["ratio_vs_transformers"][name] = speed / row["tokens_per_s"]["transformers"]
    fig = figures.figure(doc)
    colours = [line.get_color() for line in fig.axes[0].get_lines()]
    assert len(set(colours)) == len(colours) == 5  # moelab, transformers, two variants, the bound
    plt.close(fig)


def test_a_png_carries_moelabs_mark_and_only_its_own_are_recognised(tmp_path):
    own, foreign, text = tmp_path / "own.png", tmp_path / "foreign.png", tmp_path / "text.png"
    own.write_bytes(figures.png_of(_offload_doc()))
    fig, _ = plt.subplots()
    foreign.write_bytes(png(fig))
    text.write_text("not a picture")
    assert Image.open(io.BytesIO(own.read_bytes())).format == "PNG"
    assert [figures.is_own_png(p) for p in (own, foreign, text, tmp_path / "missing.png")] == [True, False, False, False]


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"format": "moelab-bench-distributed/1"}, r"no figure for a result of format 'moelab-bench-distributed/1'"),
        ({"format": offload.JSON_FORMAT, "models": [{"model": "x"}]}, r"offload/1 result is incomplete or malformed"),
        ({"format": generate.JSON_FORMAT, "results": [{"model": "a", "batch": 1}]}, r"incomplete or malformed"),
    ],
    ids=["other-format", "offload-cut-short", "generate-cut-short"],
)
def test_a_result_it_cannot_draw_is_refused_and_leaves_no_figure_open(doc, message):
    before = plt.get_fignums()
    with pytest.raises(ValueError, match=message):
        figures.figure(doc)
    assert plt.get_fignums() == before


def test_bench_plot_writes_beside_the_result_and_replaces_only_its_own(tmp_path):
    result = tmp_path / "r.json"
    result.write_text(json.dumps(_generate_doc()))
    assert runner.invoke(app, ["bench", "plot", str(result)]).exit_code == 0
    drawn = tmp_path / "r.png"
    assert figures.is_own_png(drawn)
    again = runner.invoke(app, ["bench", "plot", str(result)])
    assert again.exit_code != 0 and "--overwrite" in str(again.exception)
    assert runner.invoke(app, ["bench", "plot", str(result), "--overwrite"]).exit_code == 0

    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"\x89PNG a user's picture")
    refused = runner.invoke(app, ["bench", "plot", str(result), "--out", str(foreign), "--overwrite"])
    assert "was not written by moelab" in str(refused.exception)
    assert foreign.read_bytes() == b"\x89PNG a user's picture"
    same = runner.invoke(app, ["bench", "plot", str(result), "--out", str(result)])
    assert "would both be" in str(same.exception) and json.loads(result.read_text())["format"] == generate.JSON_FORMAT

    other = tmp_path / "d.json"
    other.write_text(json.dumps({"format": "moelab-bench-distributed/1"}))
    refused = runner.invoke(app, ["bench", "plot", str(other)])
    assert "is not a result `moelab bench plot` draws" in str(refused.exception)
    assert not (tmp_path / "d.png").exists()


@pytest.mark.parametrize(
    "command",
    [["layer", "--quick"], ["generate", "ref-8e-top2"], ["offload", "ref-8e-top2"]],
    ids=["layer", "generate", "offload"],
)
def test_a_plot_path_holding_a_users_file_is_refused_before_the_benchmark_runs(tmp_path, monkeypatch, command):
    """`--plot` over a file moelab did not draw is refused before anything is timed, with or
    without --overwrite, and the file is left as it was (the PNG is written only at the end)."""
    module = {"layer": layer, "generate": generate, "offload": offload}[command[0]]
    monkeypatch.setattr(module, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG a user's picture")
    for extra in ([], ["--overwrite"]):
        refused = runner.invoke(app, ["bench", *command, "--plot", str(mine), *extra])
        assert isinstance(refused.exception, ValueError) and "was not written by moelab" in str(refused.exception)
    assert mine.read_bytes() == b"\x89PNG a user's picture"


def test_the_bound_of_a_single_batch_size_is_drawn_and_the_ratio_label_needs_transformers():
    """A result of batch 1 alone: the bound is one point, which a dotted line without a marker does
    not draw; a result without transformers (--top-p alone) labels no ratios to it."""
    doc = _generate_doc()
    doc["results"] = [r for r in doc["results"] if r["batch"] == 1]
    fig = figures.figure(doc)
    bound = next(line for line in fig.axes[0].get_lines() if line.get_label() == "read-bandwidth bound")
    assert list(bound.get_ydata()) == [1000.0] and bound.get_marker() not in ("None", "", None)
    assert "× transformers" in fig.axes[0].get_ylabel()
    plt.close(fig)
    for row in doc["results"]:
        del row["tokens_per_s"]["transformers"], row["ratio_vs_transformers"]["transformers"]
    fig = figures.figure(doc)
    assert fig.axes[0].get_ylabel() == "decoded tokens/s"
    plt.close(fig)


def test_the_offload_figure_draws_the_compiled_model_in_memory_beside_the_compiled_rows():
    """Compiled offloaded rows over the eager model in memory can exceed 1: the compiled model in
    memory is drawn on the same scale, so that they are not read as faster than no offloading."""
    doc = _offload_doc()
    doc["models"][0]["in_memory_compiled_vs_memory"] = 2.15
    fig = figures.figure(doc)
    lines = _lines(fig.axes[1])
    assert lines["in memory"] == [1.0, 1.0] and lines["in memory, compiled"] == [2.15, 2.15]
    assert "eager" in fig.axes[1].get_ylabel()
    plt.close(fig)
    del doc["models"][0]["in_memory_compiled_vs_memory"]  # a result written before the ratio was recorded
    doc["models"][0].update(in_memory_tokens_per_s=300.0, in_memory_compiled_tokens_per_s=600.0)
    fig = figures.figure(doc)
    assert _lines(fig.axes[1])["in memory, compiled"] == [2.0, 2.0]
    plt.close(fig)


@pytest.mark.parametrize(
    "low, high, labels",
    [(0.2, 2, {"0.2", "0.3", "0.4", "0.6", "1", "2"}), (3, 30, {"3", "4", "6", "10", "20", "30"}),
     (2000, 60000, {"2000", "3000", "6000", "10000", "20000", "30000", "60000"}),
     (2e-5, 3e6, {"0.00001", "0.001", "0.1", "10", "1000", "100000"})],
)  # fmt: skip
def test_plain_log_ticks_label_in_plain_numbers_below_1_and_above_10000(low, high, labels):
    """matplotlib's LogFormatter wrote 0.2 as 2e-01 and 20000 as 2e+04 (the super-experts plot
    spans values below 1, a GPU's decode tokens/s passes 10^4)."""
    fig, ax = plt.subplots()
    try:
        ax.plot([0, 1], [low, high])
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        fig.canvas.draw()
        low_, high_ = ax.get_ylim()
        shown = {
            tick.get_text() for tick in [*ax.get_yticklabels(), *ax.yaxis.get_minorticklabels()]
            if tick.get_text() and low_ <= tick.get_position()[1] <= high_
        }  # fmt: skip
    finally:
        plt.close(fig)
    assert labels <= shown and all("e" not in text for text in shown), shown
