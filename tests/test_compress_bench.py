"""`moelab compress-bench` on a tiny model: every cell compressed, evaluated and reported from
one calibration; a killed bench keeps its finished cells; another protocol in the same
directory is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_compress import moelab_model

import moelab.compress.bench as bench
import moelab.compress.bench_report as bench_report
from moelab.compress.bench import BenchOptions, run_bench
from moelab.compress.bench_report import REPORT_FILES
from moelab.models import load_pretrained, save_pretrained

# a tiny model: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(calib_tokens=512, seq_len=32, sample_tokens=64, eval_tokens=64, prompts=1, gen_tokens=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model with one super expert planted: expert 3 of layer 0 writes 30x larger outputs."""
    path = moelab_model(tmp_path_factory.mktemp("model") / "m")
    model = load_pretrained(path)
    with torch.no_grad():
        model.layers[0].ffn.experts.down_proj[3] *= 30
    return save_pretrained(model, path.with_name("planted"))


@pytest.fixture
def jobs_in_process(monkeypatch):
    """The cells' compression jobs run in this process, as `bench.run_job` runs them in a fresh one
    (whose imports cost seconds a cell); `test_a_refused_cell_is_one_line_naming_it` keeps real ones."""

    def run_job(name, code, args, *, python=None, script=None):
        began, printed = time.perf_counter(), io.StringIO()
        with monkeypatch.context() as m, contextlib.redirect_stdout(printed):
            m.setattr(sys, "argv", ["-c", *args])
            exec(code, {"__name__": "__main__"})
        return json.loads(printed.getvalue().splitlines()[-1]) | {"wall_seconds": time.perf_counter() - began}

    monkeypatch.setattr(bench, "run_job", run_job)


@pytest.mark.usefixtures("jobs_in_process")
def test_bench_reports_every_cell_and_resumes(tiny, tmp_path, monkeypatch):
    options = BenchOptions(methods=("hc_smoe", "heapr"), ratios=(0.25,), router_fit=3, **TINY)
    calls = []
    real_child, real_quality = bench.run_job, bench._quality

    def child(name, code, args, **kw):
        calls.append(args[1])
        return real_child(name, code, args, **kw)

    def quality(path, base, opts):
        if path.parent.name == "heapr-25":
            raise KeyboardInterrupt  # killed while evaluating the third cell
        return real_quality(path, base, opts)

    monkeypatch.setattr(bench, "run_job", child)
    monkeypatch.setattr(bench, "_quality", quality)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny, tmp_path / "b", options, quiet=True)
    finished = {p.parent.name: p.read_bytes() for p in (tmp_path / "b" / "cells").glob("*/cell.json")}
    assert set(finished) == {"hc_smoe-25"}

    monkeypatch.setattr(bench, "_quality", real_quality)
    calls.clear()
    summary = run_bench(tiny, tmp_path / "b", options, quiet=True)
    assert [p.split("/")[-2] for p in calls] == [
        "heapr-25", "hc_smoe+fit-25", "heapr+fit-25", "zero-super_experts", "zero-random_experts"
    ]  # fmt: skip
    for name, data in finished.items():  # kept byte for byte
        assert (tmp_path / "b" / "cells" / name / "cell.json").read_bytes() == data
    names = [c["name"] for c in summary["cells"]]
    assert names == [
        "hc_smoe-25", "heapr-25", "hc_smoe+fit-25", "heapr+fit-25", "zero-super_experts", "zero-random_experts"
    ]  # fmt: skip
    base = summary["base"]["perplexity"]["all"]
    for cell in summary["cells"]:
        assert cell["evaluated"], cell
        d = cell["derived"]
        assert d["change"] == pytest.approx(cell["perplexity"]["all"] / base - 1)
        assert d["kept"] == pytest.approx(base / cell["perplexity"]["all"])
        assert d["worst_change"] == max(v for k, v in d["domain_change"].items() if k != "all")
        assert cell["job"]["peak_rss_mb"] > 0 and cell["job"]["wall_seconds"] > 0
    zeroed = {
        c["cell"]["method"]: c["job"]["zeroed"] for c in summary["cells"] if c["cell"]["tool"] == "ablation"
    }
    assert zeroed["super_experts"] == {"0": [3]} and zeroed["random_experts"].keys() == {"0"}
    for layer, ids in zeroed["super_experts"].items():  # as many others, in the same layers
        assert len(ids) == len(zeroed["random_experts"][layer]) and not set(ids) & set(
            zeroed["random_experts"][layer]
        )
    heapr = next(c for c in summary["cells"] if c["name"] == "heapr-25")
    assert heapr["parameters"]["routed_experts"] == summary["base"]["parameters"]["routed_experts"] * 3 // 4
    for name in REPORT_FILES:
        assert (tmp_path / "b" / name).stat().st_size > 0
    report = (tmp_path / "b" / "report.md").read_text()
    assert (
        "| hc_smoe+fit | merging |" in report
        and "| heapr | neurons |" in report
        and "## Super experts" in report
        and "1 prompt per domain for" in report  # TINY's one prompt, not "1 prompts"
    )
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["cells"][0]["name"] == "hc_smoe-25"

    # statistics an older moelab fingerprinted differently are made again, not refused cell after cell
    info_path = tmp_path / "b" / "calibration" / "calibration.json"
    info = json.loads(info_path.read_text())
    info["model"]["fingerprint"] = info["model"]["fingerprint"].split(":")[-1]
    info_path.write_text(json.dumps(info))
    summary = run_bench(tiny, tmp_path / "b", options, quiet=True)
    assert json.loads(info_path.read_text())["model"]["fingerprint"].startswith("2:")
    assert [c["name"] for c in summary["cells"]] == names


@pytest.mark.slow  # moved out of the default run, which must stay under 10 minutes (`make test-slow` runs it)
@pytest.mark.usefixtures("jobs_in_process")
def test_domain_cells_and_protocol_check(tiny, tmp_path, capfd):
    options = BenchOptions(
        methods=("frequency", "reap"), ratios=(0.25,), domain="code", domain_ratios=(0.5,), **TINY
    )
    summary = run_bench(tiny, tmp_path / "b", options, quiet=True)
    assert capfd.readouterr() == ("", ""), "quiet: no progress bars (the calibrations' included)"
    domain_cells = [c["name"] for c in summary["cells"] if c["cell"]["calib"] == "code"]
    best = min(
        (c for c in summary["cells"] if c["cell"]["calib"] == "all" and c["cell"]["ratio"] == 0.25),
        key=lambda c: c["perplexity"]["all"],
    )["cell"]["method"]
    assert domain_cells == ["easy_ep@code-50", "premoe@code-50", "naee@code-50", f"{best}@code-50"]
    assert f"{best}-50" in [c["name"] for c in summary["cells"]]  # the task-agnostic baseline
    assert "## Domain mode: calibrated on `code` only" in (tmp_path / "b" / "report.md").read_text()
    with pytest.raises(ValueError, match="another calibration"):
        run_bench(tiny, tmp_path / "b", BenchOptions(**(TINY | {"calib_tokens": 1024})), quiet=True)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown compression method 'nope'"):
        BenchOptions(methods=("nope",))
    with pytest.raises(ValueError, match=r"ratios lie in \(0, 1\)"):
        BenchOptions(ratios=(1.0,))
    with pytest.raises(ValueError, match="not a Python interpreter"):
        BenchOptions(llmcompressor_python="/nonexistent/python")
    with pytest.raises(ValueError, match="method frequency given twice"):
        BenchOptions(methods=("frequency", "reap", "frequency"))
    with pytest.raises(ValueError, match="ratio 0.25 given twice"):
        BenchOptions(ratios=(0.25, 0.5, 0.25))
    with pytest.raises(ValueError, match=r"ratios \[0.25, 0.2500000001\] name the same cells \(25 %\)"):
        BenchOptions(ratios=(0.25, 0.2500000001))
    with pytest.raises(ValueError, match=r"name the same cells \(50 %\)"):  # the domain's too
        BenchOptions(ratios=(0.5,), domain_ratios=(0.5000001,))
    # two ratios that round to one percent used to share (and overwrite) one cell directory
    assert [bench.Cell("reap", r).name for r in (0.25, 0.254, 1 / 3)] == ["reap-25", "reap-25.4", "reap-33.3333"]


# ----------------------------------------------------------------------------- the report


def _result(name: str, method: str, ratio: float, ppl: tuple[float, float, float] | None, **cell) -> dict:
    """A cell's result as run_bench records it: perplexity on (code, german, all), or not
    evaluated when `ppl` is None."""
    cell = {"method": method, "ratio": ratio, "router_fit": 0, "router_lr": None, "calib": "all",
            "tool": "moelab"} | cell  # fmt: skip
    job = {"wall_seconds": 2.0, "peak_rss_mb": 300.0, "parameters": {"after": {}}, "zeroed": {}}
    if ppl is None:
        return {"cell": cell, "name": name, "job": job, "evaluated": False, "problem": f"{name} failed"}
    return {
        "cell": cell, "name": name, "job": job, "evaluated": True, "kl": 0.01, "top1_agreement": 0.9,
        "perplexity": dict(zip(("code", "german", "all"), ppl)), "degenerate_rate": 0.25,
        "parameters": {"total": 900, "active": 500},
    }  # fmt: skip


def _summary(cells: list[dict]) -> dict:
    base = {"perplexity": {"code": 10.0, "german": 20.0, "all": 15.0}, "degenerate_rate": None,
            "parameters": {"total": 1000, "active": 600}}  # fmt: skip
    return {
        "model": "/models/tiny", "base": base, "cells": cells,
        "options": {"calib_tokens": 512, "eval_tokens": 64, "prompts": 1},
        "calibration": {"all": {"mixture": "corpus", "seconds": 3.0}},
    }  # fmt: skip


def test_the_derived_numbers_and_kinds():
    """change and kept are against the base's perplexity; the worst domain is the domain (never
    the pooled 'all') of largest relative increase; the compact count is the job's when it has one."""
    from moelab.compress.bench_report import derived, kind

    base = _summary([])["base"]
    result = _result("frequency-25", "frequency", 0.25, (11.0, 21.0, 18.0))  # +10 %, +5 %, +20 %
    d = derived(result, base)
    assert d["change"] == pytest.approx(0.2) and d["kept"] == pytest.approx(15 / 18)
    assert (d["worst_domain"], d["worst_change"]) == ("code", pytest.approx(0.1))
    assert d["domain_change"]["german"] == pytest.approx(0.05) and d["compact_parameters"] == 900
    result["job"]["parameters"]["after"]["total_compact"] = 700
    assert derived(result, base)["compact_parameters"] == 700
    kinds = {(tool, method): kind({"tool": tool, "method": method}) for tool, method in [
        ("moelab", "frequency"), ("moelab", "hc_smoe"), ("moelab", "heapr"), ("moelab", "moelab"),
        ("ablation", "super_experts"), ("llm-compressor", "reap"),
    ]}  # fmt: skip
    assert list(kinds.values()) == ["pruning", "merging", "neurons", "recipe", "ablation", "external"]


def test_the_report_tables():
    """report.md: per ratio, the general cells by increasing perplexity change, the ones not
    evaluated last (a long problem shortened), every row as many columns as its header; the domain
    mode compares the domain cells with the same method calibrated on every domain (no router
    fit); the Super Experts table lists the zeroed experts."""
    from moelab.compress.bench_report import markdown

    cells = [
        _result("frequency-25", "frequency", 0.25, (11.0, 21.0, 18.0)),
        _result("hc_smoe-25", "hc_smoe", 0.25, None) | {"problem": "x" * 140},
        _result("reap-25", "reap", 0.25, (10.5, 22.0, 16.5)),
        _result("heapr-25", "heapr", 0.25, None) | {"problem": "y" * 141},
        _result("easy_ep@code-50", "easy_ep", 0.5, (12.0, 25.0, 19.0), calib="code"),
        _result("frequency@code-50", "frequency", 0.5, (13.0, 21.0, 17.0), calib="code"),
        _result("frequency+fit-50", "frequency", 0.5, (10.0, 20.0, 15.0), router_fit=3),
        _result("frequency-50", "frequency", 0.5, (15.0, 30.0, 22.5)),
        _result("zero-super_experts", "super_experts", 0.0, (12.0, 24.0, 18.0), tool="ablation"),
        _result("zero-random_experts", "random_experts", 0.0, None, tool="ablation"),
    ]
    cells[0]["job"]["parameters"]["after"]["total_compact"] = 700
    cells[8]["job"]["zeroed"] = {"0": [3]}
    summary = _summary(cells)
    for r in cells:
        if r["evaluated"]:
            r["derived"] = bench_report.derived(r, summary["base"])
    report = markdown(summary)
    tables = [b.splitlines() for b in report.split("\n\n") if b.startswith("|")]
    for table in tables:
        assert all(row.count("|") == table[0].count("|") for row in table), table
    main = [row.split(" | ")[0] for row in tables[0][2:]]
    assert main == ["| reap", "| frequency", "| hc_smoe", "| heapr"] and "frequency@code" not in report
    assert "| frequency | pruning | 18.0 | +20.0% | 83.3% | code +10.0% |" in tables[0][3]
    assert "| 25% | 900 | 700 | 500 | 2.0 | 300 |" in tables[0][3]
    assert f"| hc_smoe | merging | not evaluated: {'x' * 140} |" in report
    assert f"| heapr | neurons | not evaluated: {'y' * 137}... |" in report
    assert "degenerate rate -." in report
    assert "## Domain mode: calibrated on `code` only" in report
    domain = [row for row in report.splitlines() if row.startswith("| 50% |")]
    assert domain == [
        "| 50% | easy_ep | code | 12.0 (+20.0%) | 25.0 (+25.0%) |",
        "| 50% | frequency | code | 13.0 (+30.0%) | 21.0 (+5.0%) |",
        "| 50% | frequency | task-agnostic | 15.0 (+50.0%) | 30.0 (+50.0%) |",
    ]
    assert "| super_experts | 0: [3] | 18.0 | +20.0% | code +20.0% |" in report
    assert "| random_experts | none | zero-random_experts failed |" in report


def test_the_report_files_with_one_ratio_and_a_cell_not_evaluated(tmp_path):
    """write_report derives the numbers of the evaluated cells only, and draws the plots of a
    single ratio with a cell that could not be evaluated."""
    cells = [
        _result("frequency-25", "frequency", 0.25, (11.0, 21.0, 18.0)),
        _result("reap-25", "reap", 0.25, None),
    ]
    bench_report.write_report(tmp_path, _summary(cells))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert ["derived" in r for r in summary["cells"]] == [True, False]
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("ratios", [(0.25,), (0.25, 0.5)])
def test_the_quality_plot_legend_lies_below_the_axis_labels(monkeypatch, ratios):
    """quality.png: the legend of kinds, below the panels, covers neither the bars nor the x-axis
    label (it was drawn over the label; one cell a ratio left the panel too short for both)."""
    monkeypatch.setattr(bench_report, "png", lambda fig: fig)
    summary = _summary([])
    rows = [_result(f"{m}-{r}", m, r, (11.0, 21.0, 18.0)) for r in ratios for m in ("frequency", "reap")[: len(ratios)]]
    for r in rows:
        r["derived"] = bench_report.derived(r, summary["base"])
    fig = bench_report._plot_quality(rows, "tiny")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert len(fig.axes) == len(ratios) and all(ax.get_xlabel() for ax in fig.axes)
    assert not any(legend.get_window_extent(renderer).overlaps(ax.get_tightbbox(renderer)) for ax in fig.axes)
    bench_report.plt.close(fig)


def test_the_plots_name_the_model_and_their_legends_the_kinds_drawn(monkeypatch):
    """Each plot names the model; the legends list the kinds of the cells drawn (not every kind),
    and tradeoff.png has its own legend of kinds, the uncompressed model and the ratios' markers
    (it sent the reader to quality.png for the colours)."""
    monkeypatch.setattr(bench_report, "png", lambda fig: fig)
    summary = _summary([])
    rows = [_result("frequency-25", "frequency", 0.25, (11.0, 21.0, 18.0)),
            _result("moelab-50", "moelab", 0.5, (10.5, 20.5, 16.0))]  # fmt: skip
    for r in rows:
        r["derived"] = bench_report.derived(r, summary["base"])
    quality = bench_report._plot_quality(rows, "tiny")
    assert [t.get_text() for t in quality.legends[0].get_texts()] == ["pruning", "recipe", "worst domain"]
    tradeoff = bench_report._plot_tradeoff(rows, summary["base"], "tiny")
    names = [t.get_text() for t in tradeoff.legends[0].get_texts()]
    assert names == ["pruning", "recipe", "uncompressed", "25 % removed", "more removed"]
    domains = bench_report._plot_domains(rows, "tiny")
    assert "tiny" in quality._suptitle.get_text() and "tiny" in tradeoff._suptitle.get_text()
    assert "tiny" in domains.axes[0].get_title()
    for fig in (quality, tradeoff, domains):
        bench_report.plt.close(fig)


def test_a_changed_model_or_cell_is_refused_not_reported_with_old_numbers(tmp_path, monkeypatch):
    """The same path with other weights: its baseline and cells are the old model's (they used to
    be reported as the new one's). A cell.json of other router-fit settings is not replaced."""
    options = BenchOptions(**TINY)
    monkeypatch.setattr(bench, "fingerprint", lambda model: "2:aaaa")
    bench._check_same_bench(tmp_path, tmp_path / "m", options)
    bench._check_same_bench(tmp_path, tmp_path / "m", options)  # unchanged: resumes
    begun = json.loads((tmp_path / "bench.json").read_text())
    begun["eval"]["max_tokens"] = begun["eval"].pop("eval_tokens")  # as written before the rename
    (tmp_path / "bench.json").write_text(json.dumps(begun))
    bench._check_same_bench(tmp_path, tmp_path / "m", options)  # the same protocol: resumes
    assert "eval_tokens" in json.loads((tmp_path / "bench.json").read_text())["eval"]
    monkeypatch.setattr(bench, "fingerprint", lambda model: "3:bbbb")  # another moelab's: not comparable
    bench._check_same_bench(tmp_path, tmp_path / "m", options)
    monkeypatch.setattr(bench, "fingerprint", lambda model: "3:cccc")
    with pytest.raises(ValueError, match="has changed since the bench .* began"):
        bench._check_same_bench(tmp_path, tmp_path / "m", options)

    cell = bench.Cell("reap", 0.25, router_fit=5, router_lr=1e-3)
    (tmp_path / "cells" / cell.name).mkdir(parents=True)
    earlier = dataclasses.asdict(dataclasses.replace(cell, router_lr=1e-2))
    (tmp_path / "cells" / cell.name / "cell.json").write_text(json.dumps({"cell": earlier, "name": cell.name}))
    with pytest.raises(ValueError, match=r"holds the cell .*'router_lr': 0.01.*, not .*; use another --out"):
        bench._cell(tmp_path / "m", tmp_path, cell, {}, options, say=lambda *a: None)
    for plain in (bench.Cell("reap", 0.5), bench.Cell("frequency", 0.5, router_fit=5, router_lr=1e-3)):
        # cells written before router_lr was kept: resumed, not refused
        (tmp_path / "cells" / plain.name).mkdir()
        old = {k: v for k, v in dataclasses.asdict(plain).items() if k != "router_lr"}
        (tmp_path / "cells" / plain.name / "cell.json").write_text(json.dumps({"cell": old, "name": plain.name}))
        assert bench._cell(tmp_path / "m", tmp_path, plain, {}, options, say=lambda *a: None)["cell"] == old
    # cells of earlier runs stay in the report (cells may be added), once: "reap-12" is an older
    # name of this run's "reap-12.5"
    twelve = bench.Cell("reap", 0.125)
    (tmp_path / "cells" / "reap-12").mkdir()
    (tmp_path / "cells" / "reap-12" / "cell.json").write_text(
        json.dumps({"cell": dataclasses.asdict(twelve), "name": "reap-12"})
    )
    kept = bench._earlier_cells(tmp_path, [plain, twelve], calibrations={bench.GENERAL})
    assert sorted(r["name"] for r in kept) == [cell.name, "reap-50"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(domain="klingon"), "klingon"),
        (dict(ratios=(0.9,)), "frequency at ratio 0.9: layer 0: .* fewer than the 2 the router picks"),
        (dict(domain="code", domain_ratios=(0.95,)), "at ratio 0.95: layer 0: "),
        (dict(domain="code", methods=("moelab", "naee")), "compare with the best general paper method"),
    ],
)
def test_cells_that_would_fail_are_refused_before_calibrating(tiny, tmp_path, monkeypatch, options, message):
    monkeypatch.setattr(bench, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(ValueError, match=message):
        run_bench(tiny, tmp_path / "b", BenchOptions(**({"methods": ("frequency",)} | TINY | options)), quiet=True)
    assert not list(tmp_path.iterdir())


def test_a_refused_cell_is_one_line_naming_it(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"^cell frequency-25: .* holds no calibration statistics[^\n]*$"):
        bench.run_job("cell frequency-25", bench._COMPRESS_JOB, [str(tiny), str(tmp_path / "out"), json.dumps(
            {"method": "frequency", "ratio": 0.25, "stats": str(tmp_path / "stats"), "router_fit": [0, 1e-3]}
        )])


def test_a_job_runs_in_a_fresh_process_and_returns_its_last_line():
    """What `jobs_in_process` stands in for: the arguments reach the job, its last stdout line is
    its result."""
    code = "import json, os, sys; print('progress'); print(json.dumps({'args': sys.argv[1:], 'pid': os.getpid()}))"
    result = bench.run_job("echo", code, ["a", "b c"])
    assert result["args"] == ["a", "b c"] and result["pid"] != os.getpid() and result["wall_seconds"] > 0


def test_llm_compressors_model_is_published_as_moelabs_output(tiny, tmp_path, monkeypatch):
    """llm-compressor's job writes the model into a staging directory, which appears whole with
    moelab's marker (an unmarked model directory in a cell would stop --overwrite as not moelab's)."""
    from moelab.io import is_output
    from moelab.models.pretrained import CHECKPOINT_KIND

    def job(name, code, args, *, python=None, script=None):
        assert not (tmp_path / "model").exists(), "written into staging, not in place"
        (Path(args[3]) / "model.safetensors").write_text("weights")
        return {"seconds": 1.0}

    monkeypatch.setattr(bench, "run_job", job)
    cell = bench.Cell("reap", 0.25, tool="llm-compressor")
    assert bench._llmcompressor(tiny, tmp_path, cell, BenchOptions(**TINY)) == {"seconds": 1.0}
    assert is_output(tmp_path / "model", CHECKPOINT_KIND) and (tmp_path / "model" / "model.safetensors").is_file()


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a killed process that nobody reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's")
def test_a_job_dies_with_the_bench_that_started_it(tmp_path):
    """A bench killed outright (kill -9 skips every cleanup) takes its running job with it: a job
    left over would go on writing into the bench's output while the next run starts."""
    pid_file = tmp_path / "job.pid"
    job = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    starter = f"from moelab.compress.bench import run_job; run_job('sleeper', {job!r}, [])"
    bench_process = subprocess.Popen([sys.executable, "-c", starter])
    try:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        job_pid = int(pid_file.read_text())
        assert _running(job_pid)
    finally:
        bench_process.kill()
        bench_process.wait()
    for _ in range(100):
        if not _running(job_pid):
            break
        time.sleep(0.1)
    assert not _running(job_pid), "the job outlived the bench that started it"


def test_a_job_does_not_import_from_the_working_directory(tmp_path, monkeypatch):
    """`python -c` puts the working directory first on sys.path; a job run from a directory that
    holds a json.py must still import the standard library's json."""
    (tmp_path / "json.py").write_text("raise SystemExit('imported the working directory json.py')\n")
    monkeypatch.chdir(tmp_path)
    code = "import json; print(json.dumps({'ok': True}))"
    assert bench.run_job("echo", code, [])["ok"] is True


def test_a_script_job_runs_as_python_script_would(tmp_path):
    """llm-compressor's job is a script: it runs as `__main__` with the script first in sys.argv
    and its directory first on sys.path (a module beside it imports); a class it defines pickles."""
    (tmp_path / "beside.py").write_text("VALUE = 42\n")
    script = tmp_path / "job.py"
    script.write_text(
        "import json, pickle, sys, beside\nclass Point: pass\npickle.dumps(Point())\n"
        "print(json.dumps({'argv': sys.argv, 'name': __name__, 'beside': beside.VALUE}))\n"
    )
    result = bench.run_job("script", None, ["a", "b c"], script=script)
    assert result == {"argv": [str(script), "a", "b c"], "name": "__main__", "beside": 42} | {
        "wall_seconds": result["wall_seconds"]
    }


def test_a_job_started_by_a_wrapper_script_runs(tmp_path):
    """An interpreter given as a shell script that starts python (without exec): the job's parent
    is then the script, not the bench, and the job still runs."""
    wrapper = tmp_path / "python.sh"
    wrapper.write_text(f"#!/bin/sh\n{sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    script = tmp_path / "job.py"
    script.write_text("import json; print(json.dumps({'ok': True}))\n")
    assert bench.run_job("wrapped", None, [], python=str(wrapper), script=script)["ok"] is True


# ----------------------------------------------------------------------------- gaps mutation testing found


def test_the_main_table_shows_kl_top1_and_a_zero_stability():
    """Each column holds its own number: KL and top-1 agreement apart, and a stability (Jaccard) of
    exactly 0 printed as 0.00 (a blank is kept for cells without one)."""
    from moelab.compress.bench_report import markdown

    cells = [
        _result("frequency-25", "frequency", 0.25, (11.0, 21.0, 18.0)) | {"kl": 0.012, "top1_agreement": 0.875},
        _result("reap-25", "reap", 0.25, (10.5, 22.0, 16.5)),
    ]
    cells[0]["job"]["stability_jaccard"] = 0.0
    summary = _summary(cells)
    for r in cells:
        r["derived"] = bench_report.derived(r, summary["base"])
    rows = {row.split(" | ")[0]: row for row in markdown(summary).splitlines() if " | pruning | " in row}
    assert rows["| frequency"].endswith("| 0.012 | 87.5% | 25% | 900 | 900 | 500 | 2.0 | 300 | 0.00 |")
    assert rows["| reap"].endswith("| 0.010 | 90.0% | 25% | 900 | 900 | 500 | 2.0 | 300 |  |")


def test_the_report_says_what_each_column_of_the_main_table_is():
    """Under the intro, one line names every column of the main table past method, kind and ppl
    (a blank stability and KL's unit were explained nowhere in report.md)."""
    from moelab.compress.bench_report import markdown

    cells = [_result("frequency-25", "frequency", 0.25, (11.0, 21.0, 18.0))]
    summary = _summary(cells)
    cells[0]["derived"] = bench_report.derived(cells[0], summary["base"])
    lines = markdown(summary).splitlines()
    (legend,) = [line for line in lines if line.startswith("Columns: ")]
    header = next(line for line in lines if line.startswith("| method | kind |"))
    columns = [c.strip() for c in header.strip("|").split("|")][3:]
    assert columns[0] == "increase" and columns[-1] == "stability"
    assert all(re.search(rf"(: |; |and ){re.escape(c.split(' (')[0])}[ ,]", legend) for c in columns), columns
    assert "in nats per token" in legend and "blank for a method that scores no data" in legend


def test_the_report_names_the_methods_left_out_once_per_reason():
    from moelab.compress.bench_report import markdown

    summary = _summary([])
    summary["options"]["left_out"] = {"reap": "reap removes experts", "ean": "ean removes experts", "easy_ep": "no"}
    lines = markdown(summary).splitlines()
    assert "Left out `reap`, `ean`: removes experts" in lines and "Left out `easy_ep`: no" in lines


def test_the_super_experts_table_gives_the_worst_domains_own_change():
    """The ablation row's worst domain carries that domain's increase, not the overall one."""
    from moelab.compress.bench_report import markdown

    cells = [_result("zero-super_experts", "super_experts", 0.0, (12.0, 21.0, 16.5), tool="ablation")]
    cells[0]["job"]["zeroed"] = {"1": [0, 5]}
    summary = _summary(cells)
    cells[0]["derived"] = bench_report.derived(cells[0], summary["base"])  # code +20 %, german +5 %, all +10 %
    assert "| super_experts | 1: [0, 5] | 16.5 | +10.0% | code +20.0% | 0.010 | 90.0% | 25% |" in markdown(summary)


def test_the_best_general_method_is_the_lowest_perplexity_plain_paper_method_at_the_largest_ratio():
    """Router-fit variants, moelab's recipe, domain methods and cells not evaluated are
    passed over; a better method at a smaller ratio does not count."""
    results = [
        _result("frequency-25", "frequency", 0.25, (10.0, 20.0, 14.0)),  # best, but at the smaller ratio
        _result("reap-25", "reap", 0.25, (10.0, 20.0, 19.0)),
        _result("frequency-50", "frequency", 0.5, (10.0, 20.0, 21.0)),
        _result("reap-50", "reap", 0.5, (10.0, 20.0, 20.0)),
        _result("hc_smoe-50", "hc_smoe", 0.5, None),
        _result("frequency+fit-50", "frequency", 0.5, (10.0, 20.0, 15.0), router_fit=3),
        _result("moelab-50", "moelab", 0.5, (10.0, 20.0, 15.0)),
        _result("naee-50", "naee", 0.5, (10.0, 20.0, 15.0)),
    ]
    assert bench._best_general(results, (0.25, 0.5)) == "reap"
    assert bench._best_general(results, (0.5, 0.25)) == "reap"
    with pytest.raises(ValueError, match="keep at least one general method"):
        bench._best_general(results[4:], (0.5,))


def test_earlier_cells_of_another_domain_are_left_out_of_the_report(tmp_path):
    """A cell calibrated on a domain this run does not calibrate on is not reported with its cells."""
    for cell in (bench.Cell("reap", 0.5, calib="code"), bench.Cell("reap", 0.25)):
        (tmp_path / "cells" / cell.name).mkdir(parents=True)
        (tmp_path / "cells" / cell.name / "cell.json").write_text(
            json.dumps({"cell": dataclasses.asdict(cell), "name": cell.name})
        )
    kept = bench._earlier_cells(tmp_path, [], calibrations={bench.GENERAL})
    assert [r["name"] for r in kept] == ["reap-25"]
    kept = bench._earlier_cells(tmp_path, [], calibrations={bench.GENERAL, "code"})
    assert sorted(r["name"] for r in kept) == ["reap-25", "reap@code-50"]


def test_a_zero_ratio_and_negative_router_fit_steps_are_refused():
    with pytest.raises(ValueError, match=r"ratios lie in \(0, 1\), got 0.0"):
        BenchOptions(ratios=(0.0,))
    with pytest.raises(ValueError, match=r"ratios lie in \(0, 1\), got 0.0"):
        BenchOptions(domain_ratios=(0.0,))
    with pytest.raises(ValueError, match="router_fit needs steps >= 0, got -1"):
        BenchOptions(router_fit=-1)
    assert BenchOptions(router_fit=0).router_fit == 0


def test_cells_of_other_tools_fits_and_domains_get_their_own_names():
    """Each kind of cell has its own directory: llm-compressor's REAP is not moelab's reap-25."""
    names = [
        bench.Cell("reap", 0.25).name,
        bench.Cell("reap", 0.25, tool="llm-compressor").name,
        bench.Cell("reap", 0.25, router_fit=3).name,
        bench.Cell("reap", 0.25, calib="code").name,
        bench.Cell("super_experts", 0.0, tool="ablation").name,
    ]
    assert names == ["reap-25", "llmc-reap-25", "reap+fit-25", "reap@code-25", "zero-super_experts"]


def test_a_job_refusing_its_checkpoint_is_one_line_too():
    """A CheckpointError in the job (a checkpoint it cannot read) is a refusal like a ValueError."""
    # a class of that name, as moelab.hf's would print (importing moelab.hf costs seconds)
    code = "class CheckpointError(Exception): pass\nraise CheckpointError('no weights in x')"
    with pytest.raises(ValueError, match=r"^cell c: no weights in x$"):
        bench.run_job("cell c", code, [])


def test_a_domain_ratio_that_is_also_a_general_ratio_runs_the_task_agnostic_cell_once(tmp_path, monkeypatch):
    """The task-agnostic baseline of the domain mode is the general cell where the ratio is one of
    the general ones (run and reported once), and its own cell where it is not. Every step that
    computes is stubbed: only run_bench's choice of cells runs."""
    ran = []

    def cell(model, root, c, stats, options, say):
        ran.append(c.name)
        ppl = {"reap": 10.0, "frequency": 12.0}.get(c.method, 11.0)
        return {"cell": dataclasses.asdict(c), "name": c.name, "evaluated": True, "perplexity": {"all": ppl}}

    class Checkpoint:
        def close(self):
            pass

    monkeypatch.setattr(bench, "resolve", lambda model: (None, Checkpoint(), None))
    monkeypatch.setattr(bench, "_check_cells", lambda model, options: None)
    monkeypatch.setattr(bench, "fingerprint", lambda model: "2:aaaa")
    monkeypatch.setattr(bench, "_calibrate", lambda *a: object())
    monkeypatch.setattr(bench, "_without_missing_statistics", lambda options, stats: options)
    monkeypatch.setattr(bench, "_calibration_facts", lambda calibration: {})
    monkeypatch.setattr(bench, "_base", lambda *a: {})
    monkeypatch.setattr(bench, "_cell", cell)
    monkeypatch.setattr(bench_report, "write_report", lambda root, summary: None)
    options = BenchOptions(
        methods=("frequency", "reap"), ratios=(0.25, 0.5), domain="code", domain_ratios=(0.5, 0.75)
    )
    summary = run_bench(tmp_path / "m", tmp_path / "b", options, quiet=True)
    names = [c["name"] for c in summary["cells"]]
    assert names == ran and len(set(names)) == len(names), names
    assert names[-9:] == [
        "easy_ep@code-50", "premoe@code-50", "naee@code-50", "reap@code-50",
        "easy_ep@code-75", "premoe@code-75", "naee@code-75", "reap@code-75", "reap-75",
    ]  # fmt: skip
    assert names.count("reap-50") == 1


def test_generations_longer_than_the_context_are_refused_before_the_calibration(tiny, tmp_path):
    """The tiny model's context is 64 tokens: prompts of 32 and continuations of 48 do not fit. The
    bench says so before it claims its output, with the flag it takes; before, it calibrated first
    and then told to lower --prompt-tokens or --new-tokens, which compress-bench does not have."""
    options = BenchOptions(methods=("reap",), ratios=(0.25,), **{**TINY, "gen_tokens": 48})
    with pytest.raises(ValueError, match=r"\(32 tokens\) and continuations \(48\) exceed the context of 64 tokens") as err:
        run_bench(tiny, tmp_path / "b", options, quiet=True)
    assert str(err.value).endswith("skip the check (--prompts 0)") and not (tmp_path / "b").exists()


def test_a_resumed_bench_reads_the_baseline_it_evaluated_before(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: pytest.fail("evaluated the base again"))
    (tmp_path / "base.json").write_text(json.dumps({"perplexity": {"all": 15.0}}))
    assert bench._base(tmp_path / "m", tmp_path / "base.json", BenchOptions(**TINY), say=print) == {
        "perplexity": {"all": 15.0}
    }


def test_the_report_gives_each_domains_own_change_the_base_sizes_and_skips_a_failed_domain_cell():
    """The per-domain table holds each domain's change (not the overall one), the header the base's
    stored and active parameters, and a domain cell not evaluated is left out of the domain mode."""
    from moelab.compress.bench_report import markdown

    cells = [
        _result("frequency-50", "frequency", 0.5, (11.0, 21.0, 18.0)),  # +10 %, +5 %, +20 %
        _result("easy_ep@code-50", "easy_ep", 0.5, None, calib="code"),
        _result("frequency@code-50", "frequency", 0.5, (13.0, 21.0, 17.0), calib="code"),
    ]
    summary = _summary(cells)
    for r in cells:
        if r["evaluated"]:
            r["derived"] = bench_report.derived(r, summary["base"])
    report = markdown(summary)
    assert "Uncompressed: perplexity 15.0, 1,000 parameters (600 active per token), degenerate rate -." in report
    assert "| frequency | 11.0 (+10.0%) | 21.0 (+5.0%) |" in report.splitlines()
    assert [row for row in report.splitlines() if row.startswith("| 50% |")] == [
        "| 50% | frequency | code | 13.0 (+30.0%) | 21.0 (+5.0%) |",
        "| 50% | frequency | task-agnostic | 11.0 (+10.0%) | 21.0 (+5.0%) |",
    ]


def test_by_default_the_bench_runs_the_methods_the_model_takes_and_names_the_others(tmp_path, monkeypatch):
    """JetMoE's expert count also sizes its attention experts: only HEAPr (which narrows every
    expert) runs; each method left out is printed with the reason, and run_bench gets the rest."""
    from hf_tiny import build
    from typer.testing import CliRunner

    from moelab.cli import app
    from moelab.compress.bench import methods_for

    build("jetmoe").save_pretrained(tmp_path / "jet")
    kept, left_out = methods_for(tmp_path / "jet", (0.25, 0.5))
    assert kept == ("heapr",) and "reap" in left_out and "removes or merges experts" in left_out["reap"]
    seen = []
    monkeypatch.setattr("moelab.compress.bench.run_bench", lambda model, out, options, **kw: seen.append(options))
    result = CliRunner().invoke(app, ["compress-bench", str(tmp_path / "jet"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert [o.methods for o in seen] == [("heapr",)] and set(seen[0].left_out) == set(left_out)
    line = next(line for line in result.output.splitlines() if line.startswith("left out "))
    assert "reap" in line and line.count("removes or merges experts") == 1, "one line, the reason once"
    assert sum(line.startswith("left out ") for line in result.output.splitlines()) == 1


def test_the_domain_cells_run_the_domain_methods_the_model_takes(tmp_path, monkeypatch):
    """Gemma 4 takes no EASY-EP: with --domain (and with or without --method) its domain cells run
    PreMoe and NAEE, EASY-EP named as left out, and run_bench's checks pass (they refused the whole
    bench on EASY-EP, a method no option can leave out); a model no domain method runs on is refused
    naming why."""
    from hf_tiny import build
    from transformers import PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from moelab.cli import app
    from moelab.compress.bench import _check_cells
    from moelab.data.tokenizer import TOKENIZER_DIR

    for name, family, experts in (("gemma", "gemma4_text", dict(num_experts=8)), ("jet", "jetmoe", {})):
        build(family, **experts).save_pretrained(tmp_path / name)
        PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path / name)
    seen = []
    monkeypatch.setattr("moelab.compress.bench.run_bench", lambda model, out, options, **kw: seen.append(options))
    for extra in ([], ["--method", "reap", "--quiet"]):
        args = ["compress-bench", str(tmp_path / "gemma"), "--out", str(tmp_path / "b"), "--domain", "code", *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert seen[-1].domain_methods == ("premoe", "naee") and "easy_ep" not in seen[-1].methods
        assert any(line.startswith("left out easy_ep:") for line in result.output.splitlines()), result.output
        assert f"report: {tmp_path / 'b' / 'report.md'}" in result.output.replace("\n", ""), result.output  # --quiet too
        _check_cells(tmp_path / "gemma", seen[-1])
    assert seen[0].methods[0] == "frequency" and seen[1].methods == ("reap",)
    result = CliRunner().invoke(app, ["compress-bench", str(tmp_path / "jet"), "--out", str(tmp_path / "c"), "--domain", "code"])
    assert result.exit_code != 0 and len(seen) == 2
    assert "no domain method (--domain) runs on" in str(result.exception)


def test_a_domain_calibration_without_easy_ep_statistics_leaves_easy_ep_out_and_says_why():
    """A layer where calibration could read no EASY-EP statistic (seen only once the layers ran)
    drops EASY-EP's domain cells, named in left_out, instead of failing the bench in its cell."""
    from types import SimpleNamespace

    def calibration(missing: set[int]):
        return SimpleNamespace(layers_without=lambda name: sorted(missing) if name == "easyep_sums" else [])

    options = BenchOptions(methods=("reap", "easy_ep"), domain="code", domain_methods=("easy_ep", "premoe", "naee"),
                           left_out={"ean": "no"})  # fmt: skip
    assert bench._without_missing_statistics(options, calibration(set())) == options
    dropped = bench._without_missing_statistics(options, calibration({3}))
    assert dropped.methods == ("reap",) and dropped.domain_methods == ("premoe", "naee")
    assert dropped.left_out["ean"] == "no" and "(MoE layers [3])" in dropped.left_out["easy_ep"]
    assert "turns the residual stream" in dropped.left_out["easy_ep"]


def test_a_general_calibration_without_easy_ep_statistics_runs_no_general_easy_ep_cell(tmp_path, monkeypatch):
    """EASY-EP is a general method too (the default methods hold it where compress's static checks
    pass); where the general calibration recorded no statistic its cells were run and failed the
    bench (the job refuses easy_ep then): they are left out, saying why."""
    from types import SimpleNamespace

    def cell(model, root, c, stats, options, say):
        if c.method == "easy_ep":
            raise ValueError(f"cell {c.name}: the calibration statistics have no 'easyep_sums'")
        return {"cell": dataclasses.asdict(c), "name": c.name, "evaluated": True, "perplexity": {"all": 10.0}}

    class Checkpoint:
        def close(self):
            pass

    unreadable = SimpleNamespace(layers_without=lambda name: [1])
    monkeypatch.setattr(bench, "resolve", lambda model: (None, Checkpoint(), None))
    monkeypatch.setattr(bench, "_check_cells", lambda model, options: None)
    monkeypatch.setattr(bench, "fingerprint", lambda model: "2:aaaa")
    monkeypatch.setattr(bench, "_calibrate", lambda *a: unreadable)
    monkeypatch.setattr(bench, "_calibration_facts", lambda calibration: {})
    monkeypatch.setattr(bench, "_base", lambda *a: {})
    monkeypatch.setattr(bench, "_cell", cell)
    monkeypatch.setattr(bench_report, "write_report", lambda root, summary: None)
    summary = run_bench(tmp_path / "m", tmp_path / "b", BenchOptions(methods=("reap", "easy_ep"), ratios=(0.5,)),
                        quiet=True)  # fmt: skip
    assert [c["cell"]["method"] for c in summary["cells"] if c["cell"]["tool"] == "moelab"] == ["reap"]
    assert summary["options"]["methods"] == ["reap"] and "(MoE layers [1])" in summary["options"]["left_out"]["easy_ep"]


@pytest.mark.parametrize("version", [None, 1, 2])
def test_statistics_of_an_older_moelab_are_made_again(tmp_path, monkeypatch, version):
    """A bench resumed after an upgrade kept its calibration whatever made it: statistics before
    version 2 have no EASY-EP sums to read, so easy_ep was left out saying the model's layers cannot
    be read. They are calibrated again, as statistics of another fingerprint version are."""
    from moelab.compress.stats import write_info

    directory = tmp_path / "calibration"
    directory.mkdir()
    info = {"model": {"path": str(tmp_path / "m"), "fingerprint": "2:abc"}, "moe_layers": [1], "complete": True,
            "mixture": {"spec": "corpus", "sources": [{"domain": "code"}]}, "settings": {"observers": ["routing"]}}  # fmt: skip
    write_info(directory, info if version is None else {**info, "stats_version": version})
    made, said = [], []
    monkeypatch.setattr(bench, "fingerprint", lambda model: "2:abc")
    monkeypatch.setattr(bench, "calibrate", lambda model, out, **kwargs: made.append(kwargs["overwrite"]) or "made")
    got = bench._calibrate(tmp_path / "m", directory, "corpus", BenchOptions(), said.append, quiet=True)
    if version == 2:
        assert got.directory == directory and made == [] and said == []
    else:
        assert got == "made" and made == [True] and "made by an older moelab" in said[0]
