"""The `moelab` command line: verbs exist, help reads, and the benchmark keeps its JSON contract."""

import json

from typer.testing import CliRunner

from moelab.cli import app

runner = CliRunner()


def test_help_lists_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("bench", "demo", "version"):
        assert verb in result.output


def test_bench_layer_json_contract(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "layer", "--config", "e8k2", "--dtype", "fp32", "--mode", "fwd", "--mode", "fwdbwd",
            "--tokens", "64", "--rounds", "1", "--skew", "0", "--no-memory", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert {(r["mode"], r["impl"]) for r in rows} >= {(m, i) for m in ("fwd", "fwdbwd") for i in ("moelab", "dense", "loop")}
    for row in rows:
        assert set(row) == {"config", "dtype", "mode", "impl", "tokens_per_s", "ratio_vs_dense"}
        assert row["config"] == "e8k2" and row["dtype"] == "fp32"
        assert row["tokens_per_s"] > 0 and row["ratio_vs_dense"] > 0
    assert all(r["ratio_vs_dense"] == 1.0 for r in rows if r["impl"] == "dense")


def test_bench_layer_rejects_unknown_config():
    result = runner.invoke(app, ["bench", "layer", "--config", "e9k3", "--tokens", "8", "--rounds", "1"])
    assert result.exit_code != 0
    assert "unknown config 'e9k3'" in str(result.exception) + result.output


def test_info_json_matches_the_instantiated_model(tmp_path):
    from moelab.models import MoETransformer, tiny

    path = tmp_path / "model.yaml"
    tiny().save(path)
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["total_params"] == sum(p.numel() for p in MoETransformer(tiny()).parameters())
    assert 0 < summary["active_params"] < summary["total_params"]
    assert summary["flops_per_token"] > 2 * summary["active_non_embedding_params"]


def test_main_prints_user_errors_without_traceback(monkeypatch, capsys):
    import pytest

    from moelab import cli

    monkeypatch.setattr("sys.argv", ["moelab", "info", "no-such-preset"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: unknown preset 'no-such-preset'") and captured.err.count("\n") == 1
