"""moelab.analyze: statistics against hand-computed worked examples, and the report end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from hf_tiny import build
from typer.testing import CliRunner

from moelab.analyze import (
    analyze,
    analyze_trace,
    chunk_activity,
    imbalance,
    mutual_information,
    row_normalise,
    super_experts,
    write_report,
)
from moelab.cli import app
from moelab.models import MoETransformer, save_pretrained, tiny
from moelab.trace import LayerRouting, TraceInfo, TraceOptions, TraceWriter, open_trace

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------- worked example
#
# Two sequences of 4 tokens (sequence 0 from domain 1 "b", sequence 1 from domain 0 "a"), written
# as two shards. Layer 0: E=3, K=2 (-1 = empty slot); layer 2: E=2, K=1.
#
#   token        t0     t1     t2     t3      t4     t5     t6      t7
#   layer 0      {0,1}  {0,1}  {0,2}  {0}     {1,2}  {1,2}  {2}     {2,1}
#   layer 2      0      0      1      1       1      1      0       1
#
# Layer 0: load [4, 5, 5], mean 14/3, population std sqrt(2)/3 -> CV sqrt(2)/14, max/mean 15/14.
#   domain a: [0, 3, 4], domain b: [4, 2, 1]. Co-activation off-diagonal: (0,1) 2, (0,2) 1, (1,2) 3.
#   CLS_1 = 1 - 14/24; CLS_2: chunks {0,1} {0,2} {1,2} {1,2} -> 1 - 8/12; CLS_3: {0,1,2}, {1,2}
#   (t3 and t7 are partial chunks, skipped) -> 1 - 5/6; CLS_4: {0,1,2} {1,2} -> 1 - 5/6.
# Layer 2: load [3, 5], CV 1/4, max/mean 5/4; CLS_2: chunks {0} {1} {1} {0,1} -> 1 - 5/8;
#   CLS_3 and CLS_4: every chunk fires both experts -> 0.
# Affinity 0 -> 2: A = [[2, 2], [2, 3], [1, 4]]; P(j | i) rows [.5 .5], [.4 .6], [.2 .8].

L0 = [[0, 1], [0, 1], [0, 2], [0, -1], [1, 2], [1, 2], [2, -1], [2, 1]]
L2 = [[0], [0], [1], [1], [1], [1], [0], [1]]
ENTROPY0 = [1.0, 0.5, 1.5, 1.0, 0.0, 2.0, 1.0, 0.5]  # exact in float16; mean 0.9375


def _mi_by_definition(joint: list[list[float]]) -> float:
    """sum p(a,b) log2(p(a,b) / (p(a) p(b))), the textbook formula."""
    total = sum(map(sum, joint))
    pa = [sum(row) / total for row in joint]
    pb = [sum(col) / total for col in zip(*joint)]
    return sum(
        (v / total) * math.log2((v / total) / (pa[i] * pb[j]))
        for i, row in enumerate(joint)
        for j, v in enumerate(row)
        if v
    )


def _fake_trace(path, identity_experts=()):
    info = TraceInfo(model="fake", family="moelab", num_layers=3, layers=[0, 2], num_experts=[3, 2], top_k=[2, 1],
                     domains=["a", "b"], settings={"expert_stats": True}, identity_experts=list(identity_experts))
    with TraceWriter(path, info, shard_tokens=4) as writer:
        for seq, domain in ((slice(0, 4), 1), (slice(4, 8), 0)):
            routing = {
                0: LayerRouting(torch.tensor(L0[seq]), torch.full((4, 2), 0.5), torch.tensor(ENTROPY0[seq])),
                2: LayerRouting(torch.tensor(L2[seq]), torch.ones(4, 1), torch.zeros(4)),
            }
            writer.add(torch.arange(4)[None], domain, routing)
        return writer.close(
            {0: torch.tensor([1.0, 2.0, 40.0]), 2: torch.tensor([3.0, 1.0])}, {0: torch.tensor([5.0])}
        )


def test_statistics_of_the_worked_example(tmp_path):
    trace = _fake_trace(tmp_path / "trace")
    assert len(trace.info.shards) == 2  # the statistics stream across shards
    summary = analyze_trace(trace, chunk_lens=(1, 2, 3, 4))
    l0, l2 = summary["layers"]["0"], summary["layers"]["2"]
    assert l0["load"] == [4, 5, 5] and l2["load"] == [3, 5]
    assert l0["cv"] == pytest.approx(math.sqrt(2) / 14) and l0["max_over_mean"] == pytest.approx(15 / 14)
    assert l2["cv"] == pytest.approx(0.25) and l2["max_over_mean"] == pytest.approx(1.25)
    assert l0["experts_per_token"] == pytest.approx(14 / 8)
    assert l0["domain_load"] == {"a": [0, 3, 4], "b": [4, 2, 1]}
    assert l0["domain_mi_bits"] == pytest.approx(_mi_by_definition([[4, 2, 1], [0, 3, 4]]))
    assert l2["domain_mi_bits"] == pytest.approx(_mi_by_definition([[2, 2], [1, 3]]))
    assert l0["coactivation"] == [[4, 2, 1], [2, 5, 3], [1, 3, 5]]
    assert l0["coactivation_conditional"][0] == pytest.approx([1, 2 / 4, 1 / 4])
    assert l0["routing_entropy_bits"] == pytest.approx(0.9375)
    assert l0["cls"] == pytest.approx({"1": 1 - 14 / 24, "2": 1 - 8 / 12, "3": 1 - 5 / 6, "4": 1 - 5 / 6})
    assert l2["cls"] == pytest.approx({"1": 0.5, "2": 1 - 5 / 8, "3": 0.0, "4": 0.0})
    assert l0["weight_sum"] == pytest.approx([2.0, 2.5, 2.5])
    assert l0["load_fraction"] == pytest.approx([4 / 14, 5 / 14, 5 / 14])  # of the 14 assignments
    assert l0["max_entropy_bits"] == pytest.approx(math.log2(3)) and l2["max_entropy_bits"] == 1.0
    assert l0["load_entropy_bits"] == pytest.approx(-sum(p * math.log2(p) for p in (4 / 14, 5 / 14, 5 / 14)))
    assert l0["domain_entropy_bits"] == pytest.approx(1.0)  # 7 assignments from each domain
    (affinity,) = summary["affinity"]
    assert (affinity["from"], affinity["to"]) == (0, 2)
    assert affinity["counts"] == [[2, 2], [2, 3], [1, 4]]
    conditional = torch.tensor(affinity["conditional"])
    torch.testing.assert_close(conditional, torch.tensor([[0.5, 0.5], [0.4, 0.6], [0.2, 0.8]]))
    assert affinity["mi_bits"] == pytest.approx(_mi_by_definition([[2, 2], [2, 3], [1, 4]]))
    assert summary["domains"] == {"a": 4, "b": 4} and summary["tokens"] == 8
    # 6 candidates [1, 2, 40, 3, 1, 5(shared)]; 99.5th percentile 40 - 0.025 * 35 = 39.125
    assert summary["super_experts"]["super_experts"] == [
        {"layer": 0, "expert": 2, "max_output": 40.0, "over_median": 40 / 2.5}
    ]


def test_identity_experts_of_the_worked_example(tmp_path):
    """Layer 0's expert 2 an identity expert (LongCat-Flash's): still counted in the load, but the
    imbalance (load [4, 5]: CV 1/9, max/mean 10/9) and the CLS (over 2 experts: CLS_1 1 - 9/16,
    CLS_2 chunks {0,1} {0} {1} {1}: 1 - 5/8) are over the experts with weights, 9 of whose
    assignments make 9/8 a token, and the identity expert takes 5 of the 14."""
    summary = analyze_trace(_fake_trace(tmp_path / "trace", identity_experts=[1, 0]), chunk_lens=(1, 2))
    l0, l2 = summary["layers"]["0"], summary["layers"]["2"]
    assert l0["load"] == [4, 5, 5] and l0["identity_experts"] == 1 and l2["identity_experts"] == 0
    assert l0["cv"] == pytest.approx(1 / 9) and l0["max_over_mean"] == pytest.approx(10 / 9)
    assert l0["experts_per_token"] == pytest.approx(14 / 8) and l0["computed_experts_per_token"] == pytest.approx(9 / 8)
    assert l0["identity_share"] == pytest.approx(5 / 14) and l2["identity_share"] == 0.0
    assert l0["cls"] == pytest.approx({"1": 1 - 9 / 16, "2": 1 - 5 / 8})
    assert l2["cv"] == pytest.approx(0.25)  # layer 2 as before
    assert summary["expert_max_output"]["0"] == [1.0, 2.0]  # the identity expert ranks no output
    assert [s["expert"] for s in summary["super_experts"]["super_experts"]] == [-1]  # 40 was the identity expert's


def test_report_load_plot_is_over_the_mean_of_the_experts_with_weights(tmp_path):
    """The load heatmap's 1 is the mean load of a layer's experts with weights, the mean of the table's
    max/mean: a row's largest among them is its max/mean, with identity experts too (over every
    choice, a LongCat-Flash layer read 1.72 beside its max/mean of 2.27); their load is on that
    scale; a layer whose experts ran no token is NaN, and a layer without identity experts unchanged."""
    from moelab.analyze.report import _load_figure, plt

    summary = analyze_trace(_fake_trace(tmp_path / "trace", identity_experts=[1, 0]))
    summary["layers"]["3"] = dict(summary["layers"]["2"], num_experts=3, identity_experts=1,
                                   load=[0.0, 0.0, 4.0], load_fraction=[0.0, 0.0, 1.0])  # fmt: skip
    fig = _load_figure(summary)
    grid = fig.axes[0].images[0].get_array()
    title = fig.axes[0].get_title()
    plt.close(fig)
    assert title == "expert load over the layer's mean\n(of its experts with weights; 1 = balanced)"  # not "uniform"
    l0, l2 = summary["layers"]["0"], summary["layers"]["2"]
    assert grid[0].tolist() == pytest.approx([4 / 4.5, 5 / 4.5, 5 / 4.5])  # load [4, 5 | 5]: mean 4.5
    assert max(grid[0, :2]) == pytest.approx(l0["max_over_mean"])
    assert grid[1, :2].tolist() == pytest.approx([3 / 4, 5 / 4]) and max(grid[1, :2]) == l2["max_over_mean"]
    assert grid.mask[1, 2] and grid.mask[2].all()  # layer 2 has 2 experts; layer 3's ran no token


def test_small_statistics():
    assert imbalance(torch.tensor([1.0, 1, 1, 5])) == pytest.approx({"cv": math.sqrt(3) / 2, "max_over_mean": 2.5})
    assert imbalance(torch.tensor([2.0, 2, 2])) == {"cv": 0.0, "max_over_mean": 1.0}
    assert mutual_information(torch.tensor([[2.0, 0], [0, 2]])) == pytest.approx(1.0)
    assert mutual_information(torch.tensor([[1.0, 1], [1, 1]])) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.tensor([[3.0, 1], [1, 3]])) == pytest.approx(_mi_by_definition([[3, 1], [1, 3]]))
    with pytest.raises(ValueError, match="at least one assignment"):
        imbalance(torch.zeros(3))
    # Independent: rounding makes H(a) + H(b) - H(a, b) about -4e-16 here; the MI is never negative.
    assert mutual_information(torch.outer(torch.tensor([9.0, 2, 6]), torch.tensor([7.0, 6, 4]))) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        mutual_information(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="chunk_len must be >= 1"):
        chunk_activity(torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, dtype=torch.long), torch.arange(4), 0)
    # A row summing to 0 (an expert never chosen) stays 0 rather than 0 / 0 = NaN.
    assert row_normalise(torch.tensor([[1.0, 3], [0, 0]])).tolist() == [[0.25, 0.75], [0.0, 0.0]]


def test_chunk_activity_of_several_sequences_against_a_loop():
    """Sequences of different lengths in one call: each sequence's chunks of L tokens, the
    partial last one skipped, counted by a loop over sequences and chunks."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 4]
    active = torch.rand(sum(lengths), 4, generator=g) < 0.3
    sequence = torch.cat([torch.full((n,), q) for q, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    for L in (1, 2, 3, 5):
        pairs = chunks = start = 0
        for n in lengths:
            for c in range(n // L):
                pairs += int(active[start + c * L : start + (c + 1) * L].any(0).sum())
                chunks += 1
            start += n
        assert chunk_activity(active, sequence, positions, L) == (pairs, chunks)


def test_super_expert_rule():
    """threshold = max(99.5th percentile, max / 10), candidates above it in the first 75% of MoE layers."""
    flat = torch.ones(300)
    # Percentile rule: 302 values, position 0.995 * 301 = 299.495 between 1 and 20 -> 10.405 (> 100 / 10).
    found = super_experts({0: torch.cat([flat, torch.tensor([100.0, 20.0])])}, {})
    assert found["threshold"] == pytest.approx(1 + 0.495 * 19)
    assert [(s["layer"], s["expert"]) for s in found["super_experts"]] == [(0, 300), (0, 301)]
    # Ratio rule: the percentile lands near 9.2, max / 10 = 10 wins; 9.5 is not a super expert.
    found = super_experts({0: torch.cat([flat, torch.tensor([100.0, 9.0, 9.5])])}, {})
    assert found["threshold"] == pytest.approx(10.0)
    assert [s["expert"] for s in found["super_experts"]] == [300]
    # A candidate equal to the threshold (here max / 10 = 10) is not above it.
    found = super_experts({0: torch.cat([flat, torch.tensor([100.0, 10.0])])}, {})
    assert found["threshold"] == 10.0 and [s["expert"] for s in found["super_experts"]] == [300]
    # Layers: 4 MoE layers -> the first 3 are searched; shared experts are candidates (expert -1).
    stats = {i: torch.ones(100) for i in range(4)}
    stats[3] = torch.cat([torch.ones(99), torch.tensor([500.0])])
    found = super_experts(stats, {1: torch.tensor([400.0])})
    assert found["layers"] == [0, 1, 2]
    assert [(s["layer"], s["expert"]) for s in found["super_experts"]] == [(1, -1)]
    # A candidate in a layer not searched still sets the threshold: 5000 / 10 > 400.
    found = super_experts(stats, {1: torch.tensor([400.0]), 3: torch.tensor([5000.0])})
    assert found["threshold"] == pytest.approx(500.0) and found["super_experts"] == []
    nothing = {"threshold": None, "layers": [], "super_experts": []}
    assert super_experts({0: torch.zeros(4)}, {}) == nothing == super_experts({}, {})
    # An overflowed output (a float16 model's inf or NaN) leaves the rule to the finite candidates: an
    # inf is a super expert, a NaN is not, and the 100 is still found (the threshold was inf or NaN).
    for overflow, flagged in ((math.inf, [301, 300]), (math.nan, [300])):
        found = super_experts({0: torch.cat([flat, torch.tensor([100.0, overflow])])}, {})
        assert found["threshold"] == pytest.approx(10.0) and [s["expert"] for s in found["super_experts"]] == flagged
        assert found["super_experts"][-1]["over_median"] == 100.0
    assert [s["expert"] for s in super_experts({0: torch.tensor([0.0, math.inf])}, {})["super_experts"]] == [1]


# ---------------------------------------------------------------------- end to end


def _tiny_native(path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), vocab_size=8192)  # the shipped tokenizer's vocabulary
    save_pretrained(MoETransformer(cfg), path)


def test_analyze_native_model_writes_html_png_json(tmp_path):
    _tiny_native(tmp_path / "model")
    html_path = analyze(tmp_path / "model", tmp_path / "out", split="test", domains=["code", "german"],
                        options=TraceOptions(max_tokens=600, seq_len=64), quiet=True)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["domains"] == {"code": 300, "german": 300}
    assert (report["trace_settings"]["data"], report["trace_settings"]["split"]) == ("corpus", "test")
    assert set(report["layers"]) == {"1"} and report["layers"]["1"]["tokens"] == 600
    assert list(report["layers"]["1"]["cls"]) == ["1", "8", "64"]  # the default chunk lengths
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["coactivation.png", "layer_metrics.png", "load.png", "specialisation.png", "super_experts.png"]
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == len(plots) and "Super experts" in html
    assert "Needs at least two MoE layers" in html  # one MoE layer: no affinity plot, and a reason
    assert report["trace_settings"]["dtype"] == "float32"
    # The trace written beside the report can be analysed again without the model.
    again = analyze(out / "trace", tmp_path / "again", quiet=True)
    assert json.loads((again.parent / "report.json").read_text())["layers"] == report["layers"]
    with pytest.raises(ValueError, match="is an analysis, not a model or a trace; analyse its trace again with"):
        analyze(out, tmp_path / "third", quiet=True)
    with pytest.raises(ValueError, match="is an analysis, not a model or a trace; give the model or trace it was"):
        analyze(tmp_path / "again", tmp_path / "third", quiet=True)  # made from a trace: holds none


def test_analyze_transformers_model(tmp_path):
    build("qwen2_moe").save_pretrained(tmp_path / "model")
    from moelab.trace import load_model, trace_model

    loaded = load_model(tmp_path / "model")
    streams = {"x": torch.randint(0, 64, (200,)).numpy(), "y": torch.randint(0, 64, (200,)).numpy()}
    trace = trace_model(loaded, streams, tmp_path / "trace", TraceOptions(max_tokens=400, seq_len=50), quiet=True)
    html_path = analyze(tmp_path / "trace", tmp_path / "report", chunk_lens=(2, 5), quiet=True)
    report = json.loads((html_path.parent / "report.json").read_text())
    assert list(report["layers"]["1"]["cls"]) == ["2", "5"]  # the chunk lengths asked for
    assert report["family"] == "qwen2_moe" and report["checks"]["1"]["mismatched"] == 0
    assert report["shared_max_output"]["1"] > 0  # Qwen2-MoE's shared expert is a candidate
    assert open_trace(tmp_path / "trace").info.num_tokens == trace.info.num_tokens == 400
    assert "Routing check" in html_path.read_text()


def test_cli_trace_and_analyze(tmp_path):
    _tiny_native(tmp_path / "model")
    runner = CliRunner()
    result = runner.invoke(app, ["trace", str(tmp_path / "model"), "--out", str(tmp_path / "trace"),
                                 "--domain", "bible", "--max-tokens", "128", "--seq-len", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert open_trace(tmp_path / "trace").info.domains == ["bible"]
    result = runner.invoke(app, ["analyze", str(tmp_path / "trace"), "--out", str(tmp_path / "report"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "report.html").is_file()


def test_analyze_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="chunk lengths must be >= 1"):
        analyze(None, tmp_path, chunk_lens=(0,))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        analyze(tmp_path / "missing", tmp_path / "out")
    # A trace is analysed as recorded: every data option is refused, not silently ignored.
    trace = _fake_trace(tmp_path / "trace").directory
    for option in ({"data": tmp_path / "notes.txt"}, {"split": "test"}, {"options": TraceOptions(max_tokens=64)}):
        with pytest.raises(ValueError, match="is a trace: it is analysed as it was recorded"):
            analyze(trace, tmp_path / "out", **option)
    # The model and the data are inputs: an output inside either is refused before anything is written.
    for name in ("model", "data"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("some text")
        with pytest.raises(ValueError, match=f"the output {re.escape(str(tmp_path / name / 'out'))} lies inside"):
            analyze(tmp_path / "model", tmp_path / name / "out", data=tmp_path / "data")
        assert [p.name for p in (tmp_path / name).iterdir()] == ["notes.txt"]


def test_super_expert_report_when_most_experts_never_ran_and_the_largest_is_not_searched(tmp_path):
    """More than half the candidates 0 (few tokens, many experts): over_median is null, and the
    report stays strict JSON (it held Infinity, which JSON parsers refuse). The largest candidate in
    the MoE layers after the first 75 % is not flagged; the report counts it instead of saying nothing."""
    from moelab.analyze.report import write_report

    found = super_experts({0: torch.tensor([0.0, 0.0, 0.0, 5.0])}, {})
    assert found["super_experts"] == [{"layer": 0, "expert": 3, "max_output": 5.0, "over_median": None}]
    trace = _fake_trace(tmp_path / "trace")
    summary = analyze_trace(trace, chunk_lens=(1,))
    summary["expert_max_output"] = {"0": [0.0, 0.0, 0.0], "2": [0.0, 9.0]}
    summary["shared_max_output"] = {}
    summary["super_experts"] = super_experts({0: torch.zeros(3), 2: torch.tensor([0.0, 9.0])}, {})
    assert summary["super_experts"]["layers"] == [0] and summary["super_experts"]["super_experts"] == []
    html = write_report(summary, tmp_path / "report").read_text()
    assert "1 candidate(s) above the threshold in the layers not searched" in html
    summary["super_experts"], summary["expert_max_output"] = found, {"0": [0.0, 0.0, 0.0, 5.0]}
    summary["layers"]["0"]["routing_entropy_bits"] = float("nan")  # e.g. from an overflowed bf16 model
    write_report(summary, tmp_path / "report2")
    parsed = json.loads((tmp_path / "report2" / "report.json").read_text(), parse_constant=pytest.fail)
    assert parsed["super_experts"]["super_experts"][0]["over_median"] is None
    assert parsed["layers"]["0"]["routing_entropy_bits"] is None


def test_expert_stats_of_another_model_are_refused(tmp_path):
    from safetensors.torch import save_file

    trace = _fake_trace(tmp_path / "trace")
    stats = trace.directory / "expert_stats.safetensors"
    save_file({"layer0.expert_max": torch.ones(32), "layer2.expert_max": torch.ones(2)}, stats)
    with pytest.raises(ValueError, match=r"layer0.expert_max has shape \[32\], expected \[3\]"):
        analyze_trace(open_trace(trace.directory))
    save_file({"layer0.expert_max": torch.ones(3)}, stats)
    with pytest.raises(ValueError, match="no layer2.expert_max"):
        analyze_trace(open_trace(trace.directory))
    routed = {"layer0.expert_max": torch.ones(3), "layer2.expert_max": torch.ones(2)}
    save_file(routed | {"layer1.expert_max": torch.ones(3)}, stats)
    with pytest.raises(ValueError, match="unexpected layer1.expert_max"):
        analyze_trace(open_trace(trace.directory))
    save_file(routed | {"layer2.shared_max": torch.ones(2)}, stats)
    with pytest.raises(ValueError, match=r"layer2.shared_max has shape \[2\], expected \[1\]"):
        analyze_trace(open_trace(trace.directory))


def test_a_trace_without_expert_stats_reports_none(tmp_path):
    trace = _fake_trace(tmp_path / "trace")
    trace.info.settings["expert_stats"] = False
    summary = analyze_trace(trace)
    assert summary["super_experts"] is None and summary["expert_max_output"] is None


def _top1_trace(path, layers: dict[int, list[int]], num_experts: list[int]):
    """One sequence of domain "a", top-1 routing {layer: expert of each token (-1 = none)}."""
    info = TraceInfo(model="fake", family="moelab", num_layers=max(layers) + 1, layers=list(layers),
                     num_experts=num_experts, top_k=[1] * len(layers), domains=["a"])
    T = len(next(iter(layers.values())))
    with TraceWriter(path, info) as writer:
        writer.add(torch.zeros(1, T, dtype=torch.long), 0,
                   {i: LayerRouting(torch.tensor(e)[:, None], torch.ones(T, 1), torch.zeros(T)) for i, e in layers.items()})
        return writer.close({i: torch.arange(1.0, E + 1) for i, E in zip(layers, num_experts)}, {})


def test_an_unchosen_expert_a_chunk_longer_than_every_sequence_and_degenerate_traces(tmp_path):
    """An expert no token chose keeps a zero row in P(j | i) and in the affinity's P(next | i), not
    0 / 0 = NaN; the CLS of a chunk length no sequence reaches is None; a manifest without the
    expert_stats setting (settings {}) still reports the super experts; layers no token routed
    through both of have an affinity MI of 0; a trace of empty sequences is refused when written,
    and when analysed (an older moelab wrote them)."""
    trace = _top1_trace(tmp_path / "trace", {0: [0, 1, 0, 1], 1: [0, 1, 1, 1]}, [3, 2])
    assert trace.info.settings == {}
    summary = analyze_trace(trace, chunk_lens=(2, 5))
    l0 = summary["layers"]["0"]
    assert l0["coactivation_conditional"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert summary["affinity"][0]["conditional"] == [[0.5, 0.5], [0.0, 1.0], [0.0, 0.0]]
    assert l0["cls"] == {"2": pytest.approx(1 - 4 / 6), "5": None}  # chunks {0, 1} {0, 1} of 3 experts
    assert summary["super_experts"]["threshold"] == pytest.approx(2.98)  # 99.5th percentile of [1, 1, 2, 2, 3]
    disjoint = analyze_trace(_top1_trace(tmp_path / "disjoint", {0: [0, -1], 1: [-1, 1]}, [2, 2]))
    assert disjoint["affinity"][0]["counts"] == [[0, 0], [0, 0]] and disjoint["affinity"][0]["mi_bits"] == 0.0
    with pytest.raises(ValueError, match="no tokens were traced"):  # the writer refuses an empty trace
        _top1_trace(tmp_path / "empty", {0: []}, [3])
    old = _top1_trace(tmp_path / "old", {0: [0]}, [3])
    old.info.shards.clear()  # as an older moelab wrote one: empty sequences in a 0-token shard
    with pytest.raises(ValueError, match="holds no tokens; trace some data first"):
        analyze_trace(old)


def test_report_heatmaps_grey_the_conditionals_on_nothing(tmp_path):
    """P(j | i) of an expert i never chosen (co-activation, affinity) and P(expert | domain) of a domain
    without assignments are undefined, 0 in report.json: the heatmaps show those rows grey (NaN) and
    the titles say so, where a 0 read as "never chosen together" or "never sent on"; rows that are
    defined are as report.json has them."""
    from moelab.analyze.report import (
        _affinity_figure,
        _coactivation_figure,
        _coactivation_shown,
        _domain_share,
        _specialisation_figure,
        plt,
    )

    summary = analyze_trace(_top1_trace(tmp_path / "trace", {0: [0, 1, 0, 1], 1: [0, 1, 1, 1]}, [3, 2]))
    summary["domains"]["empty"], summary["layers"]["0"]["domain_load"]["empty"] = 0, [0.0, 0.0, 0.0]  # no token
    l0 = summary["layers"]["0"]
    coactivation = _coactivation_shown(l0)
    assert np.isnan(coactivation[2]).all() and coactivation[0, 1] == 0.0 and np.isnan(coactivation[0, 0])
    share = _domain_share(l0)
    assert share[0].tolist() == [0.5, 0.5, 0.0] and np.isnan(share[1]).all()
    fig = _affinity_figure(summary)
    affinity = fig.axes[0].images[0].get_array()
    assert affinity.mask[2].all() and not affinity.mask[:2].any()
    assert affinity[:2].tolist() == summary["affinity"][0]["conditional"][:2]
    assert fig._suptitle.get_text().endswith("grey rows: experts i never chosen (undefined)")
    plt.close(fig)
    for figure, note in ((_coactivation_figure, "experts i never chosen"), (_specialisation_figure, "domains without")):
        fig = figure(summary)
        assert note in fig._suptitle.get_text() and fig.axes[0].images[0].get_array().mask[-1].all()
        plt.close(fig)
    summary["affinity"][0]["counts"][2] = [1, 0]  # every expert chosen: no note
    fig = _affinity_figure(summary)
    assert fig._suptitle.get_text() == "inter-layer affinity P(expert j at next MoE layer | expert i)"
    plt.close(fig)


def test_a_layer_that_routes_no_token_is_reported_not_refused(tmp_path):
    """A ReLU router may choose no expert for any token of a layer: the layer's load imbalance and
    entropies are None (the report shows "-"), not an error that stops the whole analysis, and the
    other layers' numbers are unchanged."""
    routed = {0: [0, 1, 0, 1], 1: [1, 0, 0, 1]}
    summary = analyze_trace(_top1_trace(tmp_path / "trace", {0: routed[0], 1: [-1, -1, -1, -1]}, [3, 2]))
    quiet = summary["layers"]["1"]
    assert quiet["load"] == [0.0, 0.0] and quiet["experts_per_token"] == 0.0 and quiet["tokens"] == 4
    assert all(quiet[k] is None for k in ("cv", "max_over_mean", "load_entropy_bits", "domain_mi_bits",
                                           "domain_entropy_bits"))  # fmt: skip
    both = analyze_trace(_top1_trace(tmp_path / "both", routed, [3, 2]))
    assert summary["layers"]["0"] == both["layers"]["0"]
    html = write_report(summary, tmp_path / "report").read_text()
    assert "<td>1</td><td>2</td><td>0</td><td>-</td><td>-</td>" in html  # layer 1, 2 experts, 0 a token, CV, max/mean


def _cells(html: str, tag: str = "td") -> list[str]:
    return re.findall(f"<{tag}>(.*?)</{tag}>", html)


def test_report_tables_put_each_value_under_its_header():
    """The HTML tables: floats to 4 significant digits, None as '-', text escaped; the per-layer
    table puts each statistic in its column and a chunk length no window held as '-'."""
    from moelab.analyze.report import _layer_table, _table

    table = _table(["a<b", "n"], [[0.123456, None], ["<i>", 3]])
    assert _cells(table, "th") == ["a&lt;b", "n"] and _cells(table) == ["0.1235", "-", "&lt;i&gt;", "3"]
    stats = dict(num_experts=8, experts_per_token=2.0, cv=0.5, max_over_mean=2.0, routing_entropy_bits=1.5,
                 domain_mi_bits=0.25)  # fmt: skip
    layers = {"0": dict(stats, cls={1: 0.75, 64: None}), "2": dict(stats, cv=0.125, experts_per_token=1.375,
                                                                  cls={1: 0.5, 64: 0.0})}  # fmt: skip
    table = _layer_table({"layers": layers})
    assert _cells(table, "th") == ["layer", "experts", "experts/token", "CV", "max/mean", "entropy (bits)",
                                   "I(expert;domain) (bits)", "CLS_1", "CLS_64"]  # fmt: skip
    assert _cells(table) == ["0", "8", "2", "0.5", "2", "1.5", "0.25", "0.75", "-", "2", "8", "1.375", "0.125", "2",
                             "1.5", "0.25", "0.5", "0"]  # fmt: skip


def test_report_tables_of_super_experts_count_the_unsearched_candidates():
    """The super-expert section: why there is no table (no statistics, no output, none found), and
    the candidates strictly above the threshold in the unsearched layers, shared experts included."""
    from moelab.analyze.report import _super_table

    assert "were not recorded" in _super_table({"super_experts": None})
    assert _super_table({"super_experts": {"threshold": None}}) == "<p>No expert produced any output.</p>"
    found = {"threshold": 50.0, "layers": [0], "super_experts": []}
    summary = {"super_experts": found, "expert_max_output": {"0": [1.0, 99.0], "1": [50.0, 60.0, 2.0]},
               "shared_max_output": {"1": 70.0, "0": 80.0}}  # fmt: skip
    html = _super_table(summary)
    assert html.startswith("<p>threshold 50; searched MoE layers [0]; 2 candidate(s) above the threshold in the layers")
    assert html.endswith("<p>No super experts in the searched layers.</p>")
    summary["expert_max_output"]["1"], summary["shared_max_output"] = [2.0], {}
    assert _super_table(summary).startswith("<p>threshold 50; searched MoE layers [0]</p>")
    found["super_experts"] = [{"layer": 0, "expert": 1, "max_output": 99.0, "over_median": 12.5},
                              {"layer": 0, "expert": -1, "max_output": 80.0, "over_median": None}]  # fmt: skip
    table = _super_table(summary)
    assert _cells(table, "th") == ["layer", "expert", "max |output|", "x median"]
    assert _cells(table) == ["0", "1", "99", "12.5", "0", "shared", "80", "-"]


def test_report_tables_page_notes_follow_the_model_and_the_trace():
    """The page names the data and its split, adds the low-precision note to the routing check of a
    bf16/fp16 model and the scaled-input note for Llama 4, and says why an affinity plot is missing."""
    from moelab.analyze.report import _html

    stats = dict(num_experts=4, cv=0.5, max_over_mean=2.0, routing_entropy_bits=1.5, domain_mi_bits=0.25, cls={})
    summary = {"model": "m", "family": "llama4_text", "tokens": 1000, "domains": {"code": 600, "german": 400},
               "trace_settings": {"data": "corpus", "split": "validation", "seq_len": 64, "dtype": "bfloat16"},
               "layers": {"0": stats}, "checks": {"0": {"tokens": 9, "mismatched": 1, "max_weight_error": 0.5}},
               "super_experts": None}  # fmt: skip
    page = _html(summary, {})
    assert ("1,000 tokens of corpus, validation split in windows of at most 64, the model in bfloat16; domains: "
            "code (600), german (400)") in page
    assert _cells(page.split("</table>")[0], "th")[:3] == ["layer", "experts", "experts/token"]
    assert _cells(page.split("</table>")[0])[:3] == ["0", "4", "-"]  # a summary without experts_per_token
    for column in ("experts/token: the experts chosen", "CV: the coefficient of variation", "max/mean: the busiest", "CLS_L: chunk-level sparsity"):
        assert column in page  # the layer table's columns are explained under it
    assert "The model ran in bfloat16" in page and "scaled inputs" in page and "Needs at least two MoE layers" in page
    assert _cells(page.split("Routing check")[1]) == ["0", "9", "1", "0.5"]
    summary.update(family="mixtral", trace_settings={"dtype": "float16"})
    page = _html(summary, {"affinity": "AAAA"})
    assert "1,000 tokens of given token streams in windows of at most ?, the model in float16" in page
    assert "The model ran in float16" in page
    assert "scaled inputs" not in page and "Needs at least two" not in page and 'src="data:image/png;base64,AAAA"' in page
    summary.update(trace_settings={"dtype": "float32"}, checks={})
    page = _html(summary, {})
    assert "The model ran in" not in page and "Routing check" not in page and "Identity experts" not in page
    identity = dict(stats, num_experts=6, identity_experts=2, identity_share=0.25)  # LongCat-Flash's
    summary["layers"] = {"0": identity, "1": identity, "3": dict(identity, num_experts=10)}
    page = _html(summary, {})
    assert ("Identity experts, which return their input and compute nothing (past the dashed line): layers 0, 1: "
            "experts 4-5; layer 3: experts 8-9; their load is over the same mean") in page
    assert _cells(page.split("<table>")[1])[8] == "4 + 2 identity (25% of the assignments)"
    skip = dict(stats, num_experts=5, identity_experts=1, identity_share=0.5)  # ZAYA's skip expert
    summary.update(layers={"0": skip}, identity_returns="zero")
    page = _html(summary, {})
    assert "Skip experts, which add nothing and compute nothing (past the dashed line): layer 0: expert 4;" in page
    assert _cells(page.split("<table>")[1])[1] == "4 + 1 skip (50% of the assignments)"


def test_report_says_mutual_information_of_one_domain_is_zero_by_definition():
    """A trace of one domain (or of several, all but one without tokens): the page and the per-layer
    plot say I(expert; domain) is 0 by definition; its flat line at 0 read as a finding."""
    from moelab.analyze.report import _html, _metrics_figure, plt

    stats = dict(num_experts=4, cv=0.5, max_over_mean=2.0, routing_entropy_bits=1.5, max_entropy_bits=2.0,
                 domain_mi_bits=0.0, cls={"1": 0.5})  # fmt: skip
    summary = {"model": "m", "family": "moelab", "tokens": 64, "domains": {"code": 64}, "trace_settings": {},
               "layers": {"0": stats, "1": stats}, "checks": {}, "super_experts": None}  # fmt: skip
    for domains, said in (({"code": 64}, True), ({"code": 64, "german": 0}, True), ({"code": 32, "german": 32}, False)):
        summary["domains"] = domains
        assert ("I(expert;domain) is 0 by definition" in _html(summary, {})) == said
        fig = _metrics_figure(summary)
        assert fig.axes[2].get_title().endswith("one domain: 0 by definition") == said
        plt.close(fig)


def test_report_tables_helpers_for_json_and_plots():
    """report.json has no NaN or infinity at any depth; grids show at most MAX_PANELS layers, evenly
    spaced with both ends; P(expert | domain) normalises each domain's row (NaN: grey where it has no
    assignments); co-activation greys its diagonal."""
    from moelab.analyze.report import MAX_PANELS, _domain_share, _finite, _shown, _without_diagonal

    nan, inf = float("nan"), float("inf")
    assert _finite({"a": [1.0, nan, (inf, 2)], "b": {"c": -inf, "d": "x"}, "e": 3}) == {
        "a": [1.0, None, [None, 2]], "b": {"c": None, "d": "x"}, "e": 3}  # fmt: skip
    assert _shown(list(range(MAX_PANELS))) == list(range(MAX_PANELS))
    for n in (MAX_PANELS + 1, 40):
        shown = _shown(list(range(n)))
        assert len(shown) == MAX_PANELS and shown == sorted(set(shown)) and shown[0] == 0 and shown[-1] == n - 1
    assert _shown(list(range(40)))[:3] == [0, 3, 5]
    share = _domain_share({"domain_load": {"code": [3, 1], "german": [0, 0], "x": [1, 4]}})
    assert share[[0, 2]].tolist() == [[0.75, 0.25], [0.2, 0.8]] and np.isnan(share[1]).all()  # german: undefined
    shown = _without_diagonal([[1.0, 0.5], [0.25, 1.0]])
    assert shown[0, 1] == 0.5 and shown[1, 0] == 0.25 and math.isnan(shown[0, 0]) and math.isnan(shown[1, 1])


def _hidden_points(fig) -> int:
    """Data points (line vertices, scatter points) that lie under a legend of `fig`'s axes."""
    fig.canvas.draw()
    hidden = 0
    for ax in fig.axes:
        if (legend := ax.get_legend()) is None:
            continue
        box = legend.get_window_extent()
        points = [line.get_xydata() for line in ax.get_lines()] + [c.get_offsets() for c in ax.collections]
        hidden += sum(box.count_contains(ax.transData.transform(xy)) for xy in points if len(xy))
    return hidden



def test_report_per_layer_legends_sit_above_the_data():
    """The per-layer panels' legends lie above their data however the values fill a panel (24
    layers of random values: matplotlib's loc="best" put the CLS legend over some points)."""
    from moelab.analyze.report import _metrics_figure, plt

    g = torch.Generator().manual_seed(0)
    rand = lambda: float(torch.rand((), generator=g))  # noqa: E731
    layers = {str(i): dict(cv=rand(), max_over_mean=1 + rand(), routing_entropy_bits=2 + rand(), max_entropy_bits=3.0,
                           domain_mi_bits=rand(), cls={"1": rand(), "8": rand(), "64": rand()}) for i in range(24)}  # fmt: skip
    fig = _metrics_figure({"layers": layers})
    assert _hidden_points(fig) == 0
    plt.close(fig)


def test_report_super_experts_legend_and_names_beside_the_plot():
    """The super-expert plot's legend and its list of the flagged experts, one line a layer, lie
    beside the axes: the legend covered points, and labels at the points of two super experts of
    one layer were drawn over each other."""
    from moelab.analyze.report import _flagged_list, _super_figure, plt

    assert _flagged_list({}) == "no super experts"
    many = {i: [f"expert {e}" for e in range(6)] for i in range(12)}
    assert _flagged_list(many).split("\n")[1:] == [
        f"layer {i}: expert 0, expert 1, expert 2, expert 3 +2" for i in range(9)] + ["+3 more layers"]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    expert_max = {str(i): (torch.rand(64, generator=g) * 5).tolist() for i in range(24)}
    expert_max["2"][3], expert_max["2"][9], expert_max["3"][0] = 400.0, 380.0, 390.0
    found = super_experts({int(i): torch.tensor(v) for i, v in expert_max.items()}, {2: torch.tensor([300.0])})
    assert [(s["layer"], s["expert"]) for s in found["super_experts"]] == [(2, 3), (3, 0), (2, 9), (2, -1)]
    fig = _super_figure({"super_experts": found, "expert_max_output": expert_max, "shared_max_output": {"2": 300.0}})
    assert _hidden_points(fig) == 0
    (ax,) = fig.axes
    boxes = [ax.get_legend().get_window_extent(), *(text.get_window_extent() for text in ax.texts)]
    assert not any(box.overlaps(ax.get_window_extent()) for box in boxes)
    assert not any(a.overlaps(b) for n, a in enumerate(boxes) for b in boxes[n + 1 :])
    assert [text.get_text() for text in ax.texts] == ["super experts\nlayer 2: expert 3, expert 9, shared\nlayer 3: expert 0"]
    plt.close(fig)


def test_statistics_against_loops_over_random_traces(tmp_path):
    """Random traces (1 to 6 experts, k up to E, empty slots, identity experts, sequences of 1 to 9
    tokens over several shards, a domain with no tokens): each statistic as a loop over tokens."""
    import random

    def mi(joint):
        total = sum(map(sum, joint))
        return _mi_by_definition(joint) if total else None

    for seed in range(12):
        rnd = random.Random(seed)
        layers = sorted(rnd.sample(range(5), rnd.randint(1, 3)))
        E = [rnd.randint(1, 6) for _ in layers]
        K = [rnd.randint(1, e) for e in E]
        Z = [rnd.randint(0, e - 1) for e in E]
        info = TraceInfo(model="m", family="moelab", num_layers=5, layers=layers, num_experts=E, top_k=K,
                         domains=["a", "b", "unused"], identity_experts=Z)  # fmt: skip
        seqs = []  # (domain, [{layer: chosen experts} per token])
        with TraceWriter(tmp_path / str(seed), info, shard_tokens=rnd.randint(1, 12)) as writer:
            for _ in range(rnd.randint(1, 5)):
                B, S, domain = rnd.randint(1, 3), rnd.randint(1, 9), rnd.randrange(2)
                chosen = {l: [[e if rnd.random() > 0.3 else -1 for e in rnd.sample(range(n), k)] for _ in range(B * S)]
                          for l, n, k in zip(layers, E, K)}  # fmt: skip
                writer.add(torch.zeros(B, S, dtype=torch.long), domain,
                           {l: LayerRouting(torch.tensor(c), torch.ones(B * S, len(c[0])), torch.zeros(B * S))
                            for l, c in chosen.items()})  # fmt: skip
                seqs += [(domain, [{l: set(chosen[l][b * S + s]) - {-1} for l in layers} for s in range(S)])
                         for b in range(B)]  # fmt: skip
            trace = writer.close({l: torch.ones(n) for l, n in zip(layers, E)})
        summary = analyze_trace(trace, chunk_lens=(1, 2, 3))
        tokens = [(d, t) for d, ts in seqs for t in ts]
        assert summary["domains"]["unused"] == 0 and summary["tokens"] == len(tokens)
        for l, n, z in zip(layers, E, Z):
            got = summary["layers"][str(l)]
            load = [sum(e in t[l] for _, t in tokens) for e in range(n)]
            computed = load[: n - z]
            assert got["load"] == load
            if sum(computed):
                mean = sum(computed) / len(computed)
                std = math.sqrt(sum((x - mean) ** 2 for x in computed) / len(computed))
                assert got["cv"] == pytest.approx(std / mean, abs=1e-12)
                assert got["max_over_mean"] == pytest.approx(max(computed) / mean)
            assert got["identity_share"] == (pytest.approx(1 - sum(computed) / sum(load)) if sum(load) else None)
            joint = [[sum(e in t[l] for d, t in tokens if d == m) for e in range(n)] for m in range(3)]
            assert got["domain_mi_bits"] == (pytest.approx(mi(joint), abs=1e-12) if sum(load) else None)
            assert got["coactivation"] == [[sum(i in t[l] and j in t[l] for _, t in tokens) for j in range(n)]
                                           for i in range(n)]  # fmt: skip
            for L in (1, 2, 3):
                chunks = [set().union(*(t[l] for t in ts[c * L : (c + 1) * L])) for _, ts in seqs
                          for c in range(len(ts) // L)]  # fmt: skip
                pairs = sum(len(c & set(range(n - z))) for c in chunks)
                assert got["cls"][str(L)] == (pytest.approx(1 - pairs / (len(chunks) * (n - z))) if chunks else None)
        assert len(summary["affinity"]) == len(layers) - 1
        for a, (i, j) in zip(summary["affinity"], zip(layers, layers[1:])):
            counts = [[sum(x in t[i] and y in t[j] for _, t in tokens) for y in range(E[layers.index(j)])]
                      for x in range(E[layers.index(i)])]  # fmt: skip
            assert (a["from"], a["to"]) == (i, j) and a["counts"] == counts
            assert a["mi_bits"] == pytest.approx(mi(counts) or 0.0, abs=1e-12)


def test_report_heatmaps_share_one_colour_scale_and_number_every_expert(tmp_path):
    """The per-layer heatmaps of a figure have one colour range, 0 to the largest probability of any
    layer (a range per panel made a colour mean another probability in each layer), and with at most
    16 experts every expert has its tick."""
    from moelab.analyze.report import _coactivation_figure, _specialisation_figure, plt

    summary = analyze_trace(_top1_trace(tmp_path / "trace", {0: [0, 1, 2, 0, 1, 2], 1: [0, 0, 0, 0, 0, 1]}, [3, 3]))
    for figure, top in ((_specialisation_figure, 5 / 6), (_coactivation_figure, 1.0)):  # top-1: P(j | i) all 0
        fig = figure(summary)
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert [image.get_clim() for image in images] == [pytest.approx((0.0, top))] * 2
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2"]
        plt.close(fig)
