"""`moelab demo` end to end on a small random MoE (the shipped reference model is tested in the
slow suite)."""

from __future__ import annotations

import json
import math

import pytest

from moelab.compress import Calibration
from moelab.demo import run_demo
from moelab.eval import domain_losses
from moelab.models import ModelConfig, MoETransformer, load_pretrained, save_pretrained
from moelab.models.reference import REFERENCE_MODELS, reference_model_dir
from moelab.nn import MoEConfig

# a tiny model: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(tmp_path):
    cfg = ModelConfig(
        vocab_size=8192,
        dim=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2),
    )
    return save_pretrained(MoETransformer(cfg), tmp_path / "model")


def test_demo_measures_routes_compresses_and_compares(tmp_path, model_dir):
    summary = run_demo(
        tmp_path / "out",
        model_dir=model_dir,
        prune=1,
        eval_tokens=64,
        trace_tokens=800,
        calib_tokens=512,
        quiet=True,
    )
    stats = Calibration(tmp_path / "out" / "calibration")
    assert set(summary["compressed"]) == {"frequency", "reap", "moelab"}
    for layer, dropped in summary["compressed"]["frequency"]["dropped_experts"].items():
        counts = stats.layer(int(layer)).total("counts")
        assert counts[dropped[0]] == counts.min()  # the least-chosen expert goes
    for method, result in summary["compressed"].items():
        if method != "moelab":
            assert load_pretrained(result["dir"]).config.moe.num_experts == 3
        assert set(result["perplexity"]) == set(summary["perplexity"]) >= {"code", "all"}
    # the recipe removes the same share of the routed parameters (1 of 4 experts' worth), give or take
    # the router rows that removing experts also drops
    routed = 2 * 4 * 3 * 32 * 32  # layers x experts x (gate, up, down) x D x I
    removed = summary["model_info"]["total_params"] - summary["compressed"]["moelab"]["total_params"]
    assert abs(removed - routed / 4) <= 2 * 32 * 2, removed
    assert summary["eval_split"] == "test"
    assert (tmp_path / "out" / "analysis" / "report.html").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_demo_without_pruning(tmp_path, model_dir, capsys):
    """quiet: only the final line naming the summary and the report, even with a console given (the CLI
    passes its own)."""
    from rich.console import Console

    summary = run_demo(
        tmp_path / "out", model_dir=model_dir, prune=0, eval_tokens=32, trace_tokens=200, quiet=True,
        console=Console(width=400),  # the paths on one line
    )  # fmt: skip
    out = tmp_path / "out"
    assert capsys.readouterr().out == f"summary: {out / 'summary.json'}; routing report: {out / 'analysis' / 'report.html'}\n"
    assert summary["compressed"] == {} and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".moelab-output.json",
        "analysis",
        "summary.json",
    ]


def test_demo_bad_inputs(tmp_path, model_dir):
    with pytest.raises(ValueError, match="--prune must lie in"):
        run_demo(tmp_path / "out", model_dir=model_dir, prune=3, quiet=True)
    with pytest.raises(ValueError, match="unknown reference model"):
        reference_model_dir("ref-64e")


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_shipped_reference_models_stay_within_budget(name):
    """Each shipped model (weights, config, tokenizer) stays under 50 MB."""
    files = [p for p in reference_model_dir(name).iterdir() if p.is_file()]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) < 50_000_000


@pytest.mark.slow
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_shipped_reference_models_load_and_beat_chance(name):
    model = load_pretrained(reference_model_dir(name))
    assert model.config.moe is not None and model.config.vocab_size == 8192
    loss = domain_losses(model, max_tokens=2048)["all"].loss
    assert loss < 0.6 * math.log(8192)  # uniform guessing scores log(V) = 9.0 nats


def test_the_routing_table_shows_a_layer_that_routed_no_token():
    """A layer whose router chose no expert for any token (imbalance and MI None in the analysis)
    is a row of "-", not a TypeError that stops the demo after it has traced the model."""
    from rich.console import Console

    from moelab.demo import _routing_table

    none = dict(max_over_mean=None, cv=None, routing_entropy_bits=0.0, domain_mi_bits=None)
    routed = dict(max_over_mean=1.5, cv=0.25, routing_entropy_bits=0.75, domain_mi_bits=0.125)
    console = Console(width=120, record=True)
    console.print(_routing_table({"tokens": 8, "layers": {"0": routed, "1": none}}))
    rows = [line.split("│")[1:-1] for line in console.export_text().splitlines() if line.count("│") == 6]
    assert [[cell.strip() for cell in row] for row in rows[-2:]] == [
        ["0", "1.50", "0.25", "0.75", "0.125"],
        ["1", "-", "-", "0.00", "-"],
    ]
