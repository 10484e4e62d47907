"""`moelab compare`: equal-recipe runs, the FLOPs check, the report files, and resumption."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from moelab.train import TrainConfig
from moelab.train.compare import compare, load_recipe, load_variants
from moelab.train.report import summarize_run

BASE = {"vocab_size": 8192, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32}
RECIPE = {
    "steps": 3,
    "batch_size": 2,
    "seq_len": 16,
    "warmup_steps": 1,
    "eval_every": 3,
    "eval_tokens": 64,
    "checkpoint_every": 3,
    "log_every": 1,
    "threads": 1,
    "domains": ["code", "russian"],
}


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def variants(tmp_path):
    dense = write(tmp_path / "dense.yaml", {**BASE, "dense_hidden_dim": 64})
    moe = write(tmp_path / "moe.yaml", {**BASE, "moe": {"num_experts": 4, "hidden_dim": 32, "top_k": 2}})
    wide = write(tmp_path / "wide.yaml", {**BASE, "moe": {"num_experts": 4, "hidden_dim": 128, "top_k": 2}})
    return [dense, moe, wide]


def test_compare_writes_report_and_flags_unmatched_flops(tmp_path, variants):
    out = tmp_path / "cmp"
    report = compare(variants, TrainConfig(**RECIPE), out, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["dense", "moe", "wide"]
    # dense (SwiGLU 64) and moe (2 experts of 32) do the same FFN work; wide does 4x the FFN work
    assert summary["moe"]["compute_matched"] and summary["moe"]["flops_ratio"] == pytest.approx(1.0, abs=0.02)
    assert not summary["wide"]["compute_matched"]
    assert summary["dense"]["load_imbalance"] is None and summary["moe"]["load_imbalance"] >= 1.0
    shares = summary["moe"]["load"].values()  # the last eval's load: imbalance is max / mean, per layer
    assert summary["moe"]["load_imbalance"] == pytest.approx(sum(max(s) * len(s) for s in shares) / len(shares))
    text = report.read_text()
    assert "| wide |" in text and "(not matched)" in text and "| code | russian |" in text
    assert ("Recipe: 3 steps of 2 × 16 tokens, AdamW at lr 0.003 (1 warmup steps, cosine to 0.1× lr), weight decay "
            "0.1, gradient clip 1, fp32; validation every 3 steps on at most 64 tokens per domain.") in text
    for name in ("val_loss.png", "train_loss.png", "domain_loss.png", "expert_load.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # the numbers in the table are the runs' own
    run = summarize_run(out / "moe")
    assert f"| {run['eval_loss']['all']:.4f} | {math.exp(run['eval_loss']['all']):.1f} |" in text  # loss, ppl
    # training speed measured side by side, once, for every variant
    speeds = json.loads((out / "throughput.json").read_text())
    assert list(speeds) == ["dense", "moe", "wide"] and speeds["dense"]["vs_first"] == 1.0
    assert all(s["tokens_per_second"] > 0 and s["vs_first"] > 0 for s in speeds.values())
    assert summary["wide"]["side_by_side"] == speeds["wide"]
    assert f"| {speeds['moe']['tokens_per_second']:,.0f} | {speeds['moe']['vs_first']:.2f} |" in text


def test_a_run_is_summarised_by_its_last_eval_and_train_records(tmp_path):
    """The summary's load and imbalance are the last evaluation's, its metrics the last training
    record's, and its curves every record's, in order (a log written by hand)."""
    info = {"total_params": 10, "active_params": 6, "active_non_embedding_params": 4, "flops_per_token": 12}
    results = {"eval_loss": {"all": 2.0}, "tokens": 64, "steps": 4, "tokens_per_second": 1.0, "model_info": info}
    (tmp_path / "results.json").write_text(json.dumps(results))
    records = [
        {"kind": "train", "step": 1, "loss": 3.0, "metrics/tls": 0.1, "lr": 1.0},
        {"kind": "eval", "step": 2, "loss": {"all": 2.5}, "load": {"0": [0.5, 0.5]}},
        {"kind": "train", "step": 4, "loss": 2.2, "metrics/tls": 0.7, "lr": 1.0},
        {"kind": "eval", "step": 4, "loss": {"all": 2.0}, "load": {"0": [0.75, 0.25], "1": [0.5, 0.5]}},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = summarize_run(tmp_path)
    assert run["metrics"] == {"metrics/tls": 0.7}
    assert run["load"] == {0: [0.75, 0.25], 1: [0.5, 0.5]}
    assert run["load_imbalance"] == pytest.approx((1.5 + 1.0) / 2)
    assert run["eval_curve"] == [(2, 2.5), (4, 2.0)] and run["train_curve"] == [(1, 3.0), (4, 2.2)]
    assert run["tokens_per_step"] == 16


def test_compare_keeps_finished_runs_and_refuses_changed_recipes(tmp_path, variants):
    out = tmp_path / "cmp"
    compare(variants[:2], TrainConfig(**RECIPE), out, quiet=True)
    stamps = [(out / name).stat().st_mtime_ns for name in ("moe/results.json", "throughput.json")]
    compare(variants[:2], TrainConfig(**RECIPE), out, quiet=True)
    assert [(out / name).stat().st_mtime_ns for name in ("moe/results.json", "throughput.json")] == stamps
    compare(variants[1::-1], TrainConfig(**RECIPE), out, quiet=True)  # the same runs, the other one first
    speeds = json.loads((out / "throughput.json").read_text())
    assert list(speeds) == ["moe", "dense"] and speeds["moe"]["vs_first"] == 1.0  # measured again
    assert (out / "moe/results.json").stat().st_mtime_ns == stamps[0]
    with pytest.raises(ValueError, match="train.lr"):
        compare(variants[:2], TrainConfig(**{**RECIPE, "lr": 1e-4}), out, quiet=True)
    assert (out / "expert_load.png").exists()
    compare(variants[:1], TrainConfig(**RECIPE), out, quiet=True)  # the dense model alone: no load to plot
    assert not (out / "expert_load.png").exists(), "the earlier comparison's load plot is stale"
    assert "expert_load.png" not in (out / "report.md").read_text()


def test_compare_input_errors(tmp_path, variants):
    with pytest.raises(ValueError, match="named 'dense'"):
        load_variants([variants[0], variants[0]])
    with pytest.raises(ValueError, match="at least one"):
        load_variants([])
    bad = write(tmp_path / "recipe.yaml", {"steps": 3, "lr_max": 1.0})
    with pytest.raises(ValueError, match="unknown train field 'lr_max'"):
        load_recipe(bad)
    run_file = write(tmp_path / "run.yaml", {"model": "tiny", "train": RECIPE})
    assert load_recipe(run_file).steps == 3
    with pytest.raises(ValueError, match="is a run file"):
        load_variants([run_file])
    short = write(tmp_path / "short.yaml", {**BASE, "max_seq_len": 8})
    with pytest.raises(ValueError, match="variant 'short': train.seq_len"):
        compare([short], TrainConfig(**RECIPE), tmp_path / "cmp", quiet=True)


def test_compare_with_seeds_reports_means_spreads_and_verdicts(tmp_path, variants):
    out = tmp_path / "cmp"
    report = compare(variants[:2], TrainConfig(**RECIPE), out, seeds=3, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["dense", "moe"]
    for name in ("dense", "moe"):
        variant = summary[name]
        rows = variant["per_seed"]
        assert [r["run"] for r in rows] == [f"{name}-seed{s}" for s in (0, 1, 2)]
        losses = [r["eval_loss"]["all"] for r in rows]
        assert len(set(losses)) == 3, "each seed changes the initialisation and the data order"
        assert variant["eval_loss"]["all"] == pytest.approx(sum(losses) / 3)
        mean = sum(losses) / 3
        assert variant["eval_loss_std"]["all"] == pytest.approx((sum((x - mean) ** 2 for x in losses) / 2) ** 0.5)
        assert variant["eval_loss_range"] == pytest.approx(max(losses) - min(losses))
        seed_runs = [summarize_run(out / run["run"]) for run in rows]  # every seed is an ordinary run
        assert [s["eval_loss"] for s in seed_runs] == [r["eval_loss"] for r in rows]
        assert variant["tokens_per_second"] == pytest.approx(sum(s["tokens_per_second"] for s in seed_runs) / 3)
        for key in ("metrics", "experts_per_token"):  # means over seeds (equal over seeds at fixed top-k)
            assert variant[key] == pytest.approx({k: sum(s[key][k] for s in seed_runs) / 3 for k in variant[key]})
        assert all(low <= mean <= high for (_, low, high), (_, mean) in zip(variant["eval_band"], variant["eval_curve"]))
        curves = [[loss for _, loss in s["eval_curve"]] for s in seed_runs]
        assert [[low, high] for _, low, high in variant["eval_band"]] == [[min(c), max(c)] for c in zip(*curves)]
        for layer, load in variant["load"].items():
            assert load == pytest.approx([sum(x) / 3 for x in zip(*(s["load"][int(layer)] for s in seed_runs))])
        assert variant["tokens_per_step"] == 2 * 16
    moe_runs = [summarize_run(out / f"moe-seed{s}") for s in (0, 1, 2)]
    assert len({r["load_imbalance"] for r in moe_runs}) == 3
    assert summary["moe"]["load_imbalance"] == pytest.approx(sum(r["load_imbalance"] for r in moe_runs) / 3)
    text = report.read_text()
    assert "± " in text and "seed-to-seed ranges" in text and "| moe-seed2 |" in text
    [verdict_row] = [line for line in text.splitlines() if line.startswith("| moe | ") and "spread |" in line]
    assert verdict_row.endswith(("| beyond the spread |", "| within the spread |"))
    assert "the same data and schedule, each with seeds 0, 1, 2" in text
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        compare(variants[:2], TrainConfig(**RECIPE), tmp_path / "other", seeds=0, quiet=True)


def test_beyond_spread_rule():
    from moelab.train.report import beyond_spread

    a = {"eval_loss": {"all": 1.00}, "eval_loss_range": 0.10}
    assert beyond_spread(a, {"eval_loss": {"all": 1.05}, "eval_loss_range": 0.02}) is False  # 0.05 < 0.10
    assert beyond_spread(a, {"eval_loss": {"all": 0.85}, "eval_loss_range": 0.02}) is True  # 0.15 > 0.10
    assert beyond_spread(a, {"eval_loss": {"all": 0.85}}) is None  # one seed: no spread to judge by


def test_side_by_side_throughput_is_the_median_over_rounds(monkeypatch):
    """With a fake clock: each variant's untimed first step is left out, tokens/s is its tokens
    per step (batch x seq_len x grad_accum) over its median step time, and vs_first the median of
    the per-round ratios first / this."""
    from types import SimpleNamespace

    from moelab.train import throughput
    from moelab.train.config import RunConfig

    now = [0.0]
    durations = {0: [100.0, 1.0, 1.0], 1: [100.0, 2.0, 4.0]}  # by seed; the first is untimed

    def stepper(run):
        steps = iter(durations[run.train.seed])

        def step():
            now[0] += next(steps)

        return step

    monkeypatch.setattr(throughput, "_stepper", stepper)
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    model = {**BASE, "dense_hidden_dim": 64}
    runs = {
        "a": RunConfig.from_dict({"model": model, "train": {**RECIPE, "seed": 0}}),
        "b": RunConfig.from_dict({"model": model, "train": {**RECIPE, "seed": 1, "grad_accum": 2}}),
    }
    speeds = throughput.interleaved_throughput(runs, rounds=2)
    assert speeds == {
        "a": {"tokens_per_second": pytest.approx(2 * 16 / 1.0), "vs_first": pytest.approx(1.0)},
        "b": {"tokens_per_second": pytest.approx(2 * 16 * 2 / 3.0), "vs_first": pytest.approx((1 / 2 + 1 / 4) / 2)},
    }


def test_expert_load_plot_scale_reaches_the_busiest_expert(monkeypatch):
    """The load heat map's colour scale runs from 0 through 1 (uniform, the colour map's middle) to
    the busiest expert: it ended at 2, and an expert at 3.2x its share looked like one at 2x."""
    from moelab.train import report

    monkeypatch.setattr(report, "png", lambda fig: fig)
    load = {"0": [0.05, 0.15, 0.4, 0.4], "1": [0.8, 0.1, 0.05, 0.05]}  # layer 1, expert 0: 3.2x uniform
    fig = report._plot_load({"moe": {"load": load}, "dense": {"load": {}}})
    (image,) = fig.axes[0].get_images()
    assert image.norm(0.0) == 0.0 and image.norm(1.0) == 0.5 and image.norm(3.2) == pytest.approx(1.0)
    report.plt.close(fig)


def test_curve_and_domain_plots_say_what_is_drawn(monkeypatch):
    """Tokens on the x axis in plain units (a tiny run read 0.0015 millions), the training loss's
    running mean named only where it was taken, the domain plot's unit and error bars named."""
    from moelab.train import report

    monkeypatch.setattr(report, "png", lambda fig: fig)
    curve = [(step, 9.0 - 0.1 * step) for step in range(1, 7)]
    runs = {"a": {"train_curve": curve, "eval_curve": curve[:2], "tokens_per_step": 256,
                  "eval_loss": {"all": 8.0, "code": 8.1}, "eval_loss_std": {"all": 0.1, "code": 0.2},
                  "per_seed": [{}, {}]}}  # fmt: skip
    fig = report._plot_curves(runs, "train_curve", "training loss", smooth=5)
    ax = fig.axes[0]
    assert ax.get_title() == "training loss (running mean of 5 logged values)" and ax.get_xlabel() == "training tokens"
    assert list(ax.get_lines()[0].get_xdata()) == [5 * 256, 6 * 256]
    assert ax.xaxis.get_major_formatter()(1536, 0) == "1.536k"
    report.plt.close(fig)
    fig = report._plot_curves(runs, "eval_curve", "validation loss", smooth=5)  # 2 points: not smoothed
    assert fig.axes[0].get_title() == "validation loss"
    report.plt.close(fig)
    fig = report._plot_domains(runs)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "final validation loss (nats/token)" and "± 1 std over 2 seeds" in ax.get_title()
    report.plt.close(fig)
