"""`moelab compress-bench MODEL --out DIR`: every compression method on one protocol.

    moelab compress-bench ref-32e-top4-shared --out runs/cbench
    run_bench("ckpt/", "runs/cbench", BenchOptions(ratios=(0.25, 0.5)))

One calibration with every observer (the backward sweep HEAPr needs included) in
`out/calibration`, reused by every cell; one evaluation protocol (`moelab eval` on the same
held-out windows: the corpus test split, against the uncompressed model). A cell is a method at a
ratio: pruning and merging methods remove that share of each layer's routed experts, HEAPr that
share of their parameters (the same parameter budget). With `router_fit`, every cell also runs
with the router re-calibrated afterwards (`+fit`). With `domain`, a second calibration on that
domain alone and the domain cells (EASY-EP, PreMoe, NAEE and the best general method, calibrated
on the domain, against the best general method calibrated on everything) at `domain_ratios`.
With `llmcompressor_python` (the interpreter of an environment with llm-compressor; transformers
checkpoints only), llm-compressor's REAP on the same calibration windows. Two ablations test the
Super Experts claim: the flagged experts' outputs zeroed, against as many random others.

Each cell's compression runs in a fresh process (its wall time and peak resident memory) into
`out/cells/NAME/model`; its evaluation goes to `out/cells/NAME/cell.json`, written last, so a
killed bench keeps every finished cell and redoes only the others. `report.md`, `summary.json`
and the PNG plots (`moelab.compress.bench_report`) are rewritten from the cells at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moelab.compress.calibration import (
    CalibrationOptions,
    _config,
    _max_positions,
    calibrate,
    calibration_mixture,
)
from moelab.compress.methods import METHODS
from moelab.compress.methods.easy_ep import EasyEP
from moelab.compress.observers import DEFAULT_OBSERVERS, EASY_EP_UNREADABLE
from moelab.compress.run import check_compression
from moelab.compress.stats import STATS_VERSION, Calibration, fingerprint
from moelab.eval.evaluate import ALL, EvalOptions, evaluate
from moelab.hf.adapters import NATIVE, resolve
from moelab.io import StagedOutput, atomic_write_text, output_dir
from moelab.models.pretrained import CHECKPOINT_KIND
from moelab.models.reference import model_dir

KIND = "compression benchmark"
FORMAT = "moelab-compress-bench/1"
CELL_NAME = "cell.json"
GENERAL_METHODS = tuple(m for m in METHODS if m != "premoe")  # PreMoe is domain-specific by design
DOMAIN_METHODS = ("easy_ep", "premoe", "naee")
CELL_PATTERNS = {"cells": r"[\w.+@-]+/", "cells/*": r"cell\.json|model/|windows\.npy|reap\.json"}  # its files
GENERAL = "all"  # the calibration of every domain


@dataclass(kw_only=True)
class BenchOptions:
    """methods, ratios: the cells; router_fit: Adam steps of the `+fit` variants (0: none);
    calib_tokens, seq_len, sample_tokens: the calibration; eval_tokens, prompts: the evaluation
    (per domain), gen_tokens: each prompt's greedy continuation; domain, domain_ratios: the domain cells,
    domain_methods: the domain-specific methods among them (`DOMAIN_METHODS`, or those of them the model
    takes: `methods_for`); llmcompressor_python: the interpreter that runs llm-compressor's REAP;
    left_out: methods the model does not take, each with why (`methods_for`), for the report."""

    methods: Sequence[str] = GENERAL_METHODS
    ratios: Sequence[float] = (0.25, 0.5)
    router_fit: int = 0
    router_lr: float = 1e-3
    calib_tokens: int = 16384
    seq_len: int = 256
    sample_tokens: int = 1024
    eval_tokens: int = 4096
    prompts: int = 2
    gen_tokens: int = 48
    domain: str | None = None
    domain_ratios: Sequence[float] = (0.5, 0.75)
    domain_methods: Sequence[str] = DOMAIN_METHODS
    llmcompressor_python: str | None = None
    left_out: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in (*self.methods, *self.domain_methods):
            if name not in METHODS:
                raise ValueError(f"unknown compression method {name!r}; choose from {list(METHODS)}")
        for label, values in (("method", self.methods), ("domain method", self.domain_methods), ("ratio", self.ratios),
                              ("domain ratio", self.domain_ratios)):  # fmt: skip
            if twice := sorted({v for v in values if list(values).count(v) > 1}):
                raise ValueError(f"{label} {', '.join(map(str, twice))} given twice; give each once")
        ratios = sorted({*self.ratios, *self.domain_ratios})  # the task-agnostic cells run at both
        names = [percent(r) for r in ratios]
        if clash := [r for r, name in zip(ratios, names) if names.count(name) > 1]:
            raise ValueError(
                f"ratios {clash} name the same cells ({', '.join(sorted({percent(r) for r in clash}))} %); give "
                "ratios that differ in the first 6 significant digits of their percentage"
            )
        for ratio in (*self.ratios, *self.domain_ratios):
            if not 0 < ratio < 1:
                raise ValueError(f"ratios lie in (0, 1), got {ratio}")
        if self.router_fit < 0:
            raise ValueError(f"router_fit needs steps >= 0, got {self.router_fit}")
        if self.llmcompressor_python is not None and not Path(self.llmcompressor_python).is_file():
            raise ValueError(
                f"{self.llmcompressor_python} is not a Python interpreter; give the python of an environment "
                "with llm-compressor (benchmarks/llmcompressor_reap/setup.sh makes one in .venv-llmc)"
            )

    def calibration(self) -> CalibrationOptions:
        return CalibrationOptions(
            tokens=self.calib_tokens,
            seq_len=self.seq_len,
            sample_tokens=self.sample_tokens,
            observers=DEFAULT_OBSERVERS + ("neurons",),
        )


@dataclass(frozen=True)
class Cell:
    """One compression of the bench. calib: GENERAL or the domain the statistics come from;
    tool: "moelab", "llm-compressor" or "ablation" (method "super_experts": the experts the
    Super Experts rule flags get zero output weights; "random_experts": as many others in the
    same layers)."""

    method: str
    ratio: float
    router_fit: int = 0
    router_lr: float | None = None  # of the router fit, where there is one
    calib: str = GENERAL
    tool: str = "moelab"

    @property
    def name(self) -> str:
        if self.tool == "ablation":
            return f"zero-{self.method}"
        tool = "" if self.tool == "moelab" else "llmc-"
        fit = "+fit" if self.router_fit else ""
        where = "" if self.calib == GENERAL else f"@{self.calib}"
        return f"{tool}{self.method}{fit}{where}-{percent(self.ratio)}"


def percent(ratio: float) -> str:
    """A ratio as the percentage cell names and headings give: 0.25 -> "25", 0.254 -> "25.4"."""
    return f"{ratio * 100:g}"


def run_bench(
    model: str | os.PathLike,
    out: str | os.PathLike,
    options: BenchOptions | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run (or finish) the bench of `model` (a directory or a shipped model's name) into `out` and
    write its report; returns the summary."""
    from moelab.compress.bench_report import REPORT_FILES, write_report

    options = options or BenchOptions()
    model = model_dir(model)
    config, checkpoint, family = resolve(model)  # a clear error for what is not a checkpoint
    checkpoint.close()
    if options.llmcompressor_python and family is NATIVE:
        raise ValueError(
            f"llm-compressor runs transformers checkpoints; {model} is moelab's own format (export it first: "
            "moelab export)"
        )
    _check_cells(model, options)
    say = (lambda *a: None) if quiet else print
    entries = ["bench.json", "calibration", "cells", "base.json", *REPORT_FILES]
    if options.domain:
        entries.append(f"calibration-{options.domain}")
    with output_dir(
        out, KIND, entries=entries, inputs=[model], overwrite=overwrite, resume=True, patterns=CELL_PATTERNS
    ) as claimed:
        root = claimed.path
        _check_same_bench(root, model, options)
        stats = {GENERAL: _calibrate(model, root / "calibration", "corpus", options, say, quiet)}
        options = _without_missing_statistics(options, stats[GENERAL])
        base = _base(model, root / "base.json", options, say)
        cells = [Cell(m, r) for r in options.ratios for m in options.methods]
        fit = dict(router_fit=options.router_fit, router_lr=options.router_lr)
        cells += [dataclasses.replace(c, **fit) for c in cells if options.router_fit]
        if options.llmcompressor_python:
            cells += [Cell("reap", r, tool="llm-compressor") for r in options.ratios]
        cells += [Cell(which, 0.0, tool="ablation") for which in ABLATIONS]
        results = [_cell(model, root, cell, stats, options, say) for cell in cells]
        if options.domain:
            domain = options.domain
            stats[domain] = _calibrate(
                model, root / f"calibration-{domain}", f"corpus:{domain}", options, say, quiet
            )
            options = _without_missing_statistics(options, stats[domain])
            best = _best_general(results, options.ratios)
            domain_cells = [
                Cell(m, r, calib=domain) for r in options.domain_ratios for m in (*options.domain_methods, best)
            ]
            domain_cells += [Cell(best, r) for r in options.domain_ratios if r not in options.ratios]
            cells += dict.fromkeys(domain_cells)
            results += [_cell(model, root, cell, stats, options, say) for cell in dict.fromkeys(domain_cells)]
        results += _earlier_cells(root, cells, calibrations=set(stats))
        summary = {
            "format": FORMAT,
            "model": str(model),
            "options": _describe(options),
            "calibration": {k: _calibration_facts(v) for k, v in stats.items()},
            "base": base,
            "cells": results,
        }
        write_report(root, summary)
        return summary


def _without_missing_statistics(options: BenchOptions, stats: Calibration) -> BenchOptions:
    """The options without the method whose statistic the calibration could not record in some
    layer (EASY-EP's, where the decoder layer changes the MoE block's output before adding it: seen
    only once the layers have run), as a general and as a domain method, named with why in
    `left_out`."""
    if EasyEP.name not in (*options.methods, *options.domain_methods):
        return options
    layers = stats.layers_without("easyep_sums")
    if not layers:
        return options
    why = f"{EasyEP.name}: {EASY_EP_UNREADABLE} (MoE layers {layers})"
    return dataclasses.replace(
        options,
        methods=tuple(m for m in options.methods if m != EasyEP.name),
        domain_methods=tuple(m for m in options.domain_methods if m != EasyEP.name),
        left_out={**options.left_out, EasyEP.name: why},
    )


def methods_for(model: Path, ratios: Sequence[float], methods: Sequence[str] = GENERAL_METHODS) -> tuple[tuple[str, ...], dict[str, str]]:
    """The methods of `methods` the model takes at every ratio (what `run_bench` would otherwise
    refuse before its first cell: EASY-EP on a model with several residual streams, expert removal
    where the expert count also sizes another module, ...), and for each one left out, why."""
    kept, left_out = [], {}
    for method in methods:
        try:
            for ratio in ratios:
                check_compression(model, method, ratio)
        except ValueError as err:
            left_out[method] = str(err)
        else:
            kept.append(method)
    return tuple(kept), left_out


def by_reason(left_out: Mapping[str, str]) -> dict[str, list[str]]:
    """{method: why it was left out} -> {why: the methods}, each reason once (a reason that opens
    with its method's name stated without it)."""
    reasons: dict[str, list[str]] = {}
    for method, reason in left_out.items():
        reasons.setdefault(reason.removeprefix(f"{method} "), []).append(method)
    return reasons


def _check_cells(model: Path, options: BenchOptions) -> None:
    """The errors a cell or the domain calibration would raise hours into the bench, now: every
    method at every ratio it will run at (shard headers only), the domain's text, and generations
    that fit the model's context."""
    prompt_tokens, context = _eval_options(options).prompt_tokens, _max_positions(_config(model))
    if options.prompts and prompt_tokens + options.gen_tokens > context:  # evaluate's check, after the calibration
        raise ValueError(
            f"the degenerate-generation check's prompts ({prompt_tokens} tokens) and continuations "
            f"({options.gen_tokens}) exceed the context of {context} tokens of {model}; skip the check (--prompts 0)"
        )
    runs = {(m, r) for m in options.methods for r in options.ratios}
    if options.domain and not any(m not in (*DOMAIN_METHODS, "moelab") for m in options.methods):
        raise ValueError(
            f"the domain cells (--domain {options.domain}) compare with the best general paper method, and "
            f"{list(options.methods)} holds none; add one (e.g. --method reap)"
        )
    if options.domain:
        runs |= {(m, r) for m in (*options.domain_methods, *options.methods) for r in options.domain_ratios}
        calibration_mixture(model, f"corpus:{options.domain}", options.calibration(), quiet=True)
    for method, ratio in sorted(runs):
        try:
            check_compression(model, method, ratio)
        except ValueError as err:
            raise ValueError(f"{method} at ratio {ratio}: {err}") from None


def _check_same_bench(root: Path, model: Path, options: BenchOptions) -> None:
    """A resumed bench continues only with the same model (path and weights) and protocol (cells
    may be added)."""
    path = root / "bench.json"
    protocol = {
        "model": str(model.resolve()),
        "calibration": dataclasses.asdict(options.calibration()),
        "eval": dataclasses.asdict(_eval_options(options)),
        "fingerprint": fingerprint(model),
    }
    protocol = json.loads(json.dumps(protocol))  # as read back (tuples become lists)
    if path.is_file():
        earlier = json.loads(path.read_text())
        earlier.setdefault("fingerprint", protocol["fingerprint"])  # a bench begun before it was recorded
        if "max_tokens" in earlier["eval"]:  # a bench begun before EvalOptions.max_tokens was eval_tokens
            earlier["eval"]["eval_tokens"] = earlier["eval"].pop("max_tokens")
        version, now = earlier["fingerprint"].partition(":")[0], protocol["fingerprint"].partition(":")[0]
        if version != now:  # another moelab's fingerprint (its statistics are made again): not comparable
            earlier["fingerprint"] = protocol["fingerprint"]
        if earlier["model"] == protocol["model"] and earlier["fingerprint"] != protocol["fingerprint"]:
            raise ValueError(
                f"{model} has changed since the bench in {root} began (its fingerprint differs); its baseline "
                "and cells describe the old weights. Use another --out, or --overwrite to start again"
            )
        if earlier != protocol:
            changed = sorted(k for k in protocol if earlier.get(k) != protocol[k])
            raise ValueError(
                f"{root} holds a bench with another {', '.join(changed)}; its cells are not comparable with "
                "these. Use another --out, or --overwrite to start again"
            )
    atomic_write_text(path, json.dumps(protocol, indent=1) + "\n")


def _calibrate(model: Path, directory: Path, spec: str, options: BenchOptions, say, quiet: bool) -> Calibration:
    """The bench's statistics in `directory`: kept from an earlier run if they belong to `model`
    and this moelab's statistics version (a calibration published whole; a killed one is resumed),
    else made (again)."""
    again = False
    if (directory / "calibration.json").is_file():
        calibration = Calibration(directory)
        try:
            calibration.check_model(fingerprint(model), model)
            if calibration.version < STATS_VERSION:  # e.g. EASY-EP's sums not read
                raise ValueError(f"the statistics in {directory} were made by an older moelab (statistics version "
                                 f"{calibration.version}, not {STATS_VERSION})")  # fmt: skip
            return calibration
        except ValueError as err:  # another moelab version's fingerprint or statistics, or a changed model
            say(f"calibrating again: {err}")
            again = True
    say(f"calibrating on {spec} ({options.calib_tokens:,} tokens, backward sweep included)")
    return calibrate(model, directory, calib=spec, options=options.calibration(), overwrite=again, quiet=quiet)


def _eval_options(options: BenchOptions) -> EvalOptions:
    return EvalOptions(
        eval_tokens=options.eval_tokens,
        seq_len=options.seq_len,
        prompts=options.prompts,
        gen_tokens=options.gen_tokens,
    )


def _base(model: Path, path: Path, options: BenchOptions, say) -> dict[str, Any]:
    """The uncompressed model on the protocol (computed once)."""
    if path.is_file():
        return json.loads(path.read_text())
    say("evaluating the uncompressed model")
    report = evaluate(model, options=_eval_options(options), quiet=True)
    base = {
        "perplexity": {d: v["perplexity"] for d, v in report["domains"].items()},
        "degenerate_rate": report.get("generation", {}).get("model", {}).get("rate"),
        "parameters": report["parameters"],
        "tokens_per_second": report["tokens_per_second"],
    }
    atomic_write_text(path, json.dumps(base, indent=1) + "\n")
    return base


def _cell(model: Path, root: Path, cell: Cell, stats: dict[str, Calibration], options, say) -> dict[str, Any]:
    """The cell's result: read when finished earlier, else compressed in a child process and
    evaluated."""
    directory = root / "cells" / cell.name
    done = directory / CELL_NAME
    if done.is_file():
        result = json.loads(done.read_text())
        if not _same_cell(result.get("cell", {}), cell):
            raise ValueError(
                f"{directory} holds the cell {result.get('cell')}, not {dataclasses.asdict(cell)}; use another "
                "--out, or --overwrite to start again"
            )
        say(f"{cell.name}: finished earlier, kept")
        return result
    directory.mkdir(parents=True, exist_ok=True)
    say(f"{cell.name}: compressing")
    if cell.tool == "llm-compressor":
        job = _llmcompressor(model, directory, cell, options)
    elif cell.tool == "ablation":
        args = [str(model), str(directory / "model"), str(stats[GENERAL].directory), cell.method]
        job = run_job(f"cell {cell.name}", _ABLATION_JOB, args)
        if not job["zeroed"]:
            result = {"cell": dataclasses.asdict(cell), "name": cell.name, "job": job, "evaluated": False,
                      "problem": "the Super Experts rule flags no expert in this model"}  # fmt: skip
            atomic_write_text(done, json.dumps(result, indent=1) + "\n")
            return result
    else:
        args = [str(model), str(directory / "model"), json.dumps(_job_args(cell, stats, options))]
        job = run_job(f"cell {cell.name}", _COMPRESS_JOB, args)
    say(f"{cell.name}: evaluating")
    result = {"cell": dataclasses.asdict(cell), "name": cell.name, "job": job}
    result |= _quality(directory / "model", model, options)
    atomic_write_text(done, json.dumps(result, indent=1) + "\n")
    return result


def _job_args(cell: Cell, stats: dict[str, Calibration], options: BenchOptions) -> dict[str, Any]:
    return {
        "method": cell.method,
        "ratio": cell.ratio,
        "stats": str(stats[cell.calib].directory),
        "router_fit": [cell.router_fit, options.router_lr if cell.router_lr is None else cell.router_lr],
    }


_COMPRESS_JOB = """
import json, sys, time
began = time.perf_counter()
from moelab.compress import compress
from moelab.compress.router_fit import RouterFit
args = json.loads(sys.argv[3])
report = compress(sys.argv[1], sys.argv[2], method=args["method"], ratio=args["ratio"], stats=args["stats"],
                  router_fit=RouterFit(*args["router_fit"]), overwrite=True, quiet=True)
seconds = time.perf_counter() - began
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
layers = report["layers"].values()
stability = report["stability_jaccard"]
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "timings": report["timings"],
                  "parameters": report["parameters"], "stability_jaccard": stability,
                  "experts_kept": [len(e["kept"]) + len(e["merge_groups"]) for e in layers]}))
"""


ABLATIONS = ("super_experts", "random_experts")
_ABLATION_JOB = """
import dataclasses, json, sys, time
began = time.perf_counter()
import torch
from moelab.compress.methods.base import super_expert_ids
from moelab.compress.stats import Calibration
from moelab.hf import open_checkpoint
from moelab.hf.edit import LayerEdit
from moelab.hf.writer import write_checkpoint
model, out, stats, which = sys.argv[1:5]
calibration = Calibration(stats)
chosen = super_expert_ids({i: calibration.layer(i) for i in calibration.layers})
generator = torch.Generator().manual_seed(0)
edits = {}
with open_checkpoint(model) as view:
    for i, ids in chosen.items():
        layer = view.layer(i)
        E = layer.router.num_experts
        if which == "random_experts":  # as many others, in the same layers
            others = [e for e in range(E) if e not in ids]
            ids = sorted(others[j] for j in torch.randperm(len(others), generator=generator)[: len(ids)].tolist())
            chosen[i] = ids
        down = layer.experts.down.clone()
        down[ids] = 0
        bias = layer.experts.down_bias
        if bias is not None:
            bias = bias.clone()
            bias[ids] = 0
        experts = dataclasses.replace(layer.experts, down=down, down_bias=bias)
        edits[i] = LayerEdit(tuple((e,) for e in range(E)), dataclasses.replace(layer, experts=experts))
if edits:
    write_checkpoint(model, out, edits, overwrite=True, quiet=True)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - began, "peak_rss_mb": peak / 1024,
                  "zeroed": {str(i): ids for i, ids in chosen.items()}}))
"""


def _llmcompressor(model: Path, directory: Path, cell: Cell, options: BenchOptions) -> dict[str, Any]:
    """llm-compressor's REAP in its own environment, on the bench's calibration windows."""
    mixture = calibration_mixture(model, "corpus", options.calibration())
    windows = directory / "windows.npy"
    np.save(windows, np.stack([w.ids.numpy() for w in mixture.windows]))
    script = Path(__file__).resolve().parent / "llmcompressor_job.py"
    # llm-compressor writes the model into a staging directory, published with moelab's marker
    with StagedOutput(directory / "model", CHECKPOINT_KIND, inputs=[model], overwrite=True) as staging:
        args = [str(model), str(windows), str(cell.ratio), str(staging), str(directory / "reap.json")]
        return run_job(f"cell {cell.name}", None, args, python=options.llmcompressor_python, script=script)


# Starts a job, then becomes it (exec: the job runs as `python -P -c CODE` or `python SCRIPT`
# would, same process): on Linux the kernel kills it when the bench that started it dies, however
# it dies (kill -9 included: a job outliving its bench would go on writing into the bench's
# output); a bench that died before that was set up is seen here. Not covered: processes the job
# starts itself, and an interpreter given as a wrapper script that runs python without `exec`.
_JOB_START = """
import sys
if sys.path[:1] == [""]:  # the working directory, which -c puts first: nothing is imported from there
    del sys.path[0]
import os
bench, command = int(sys.argv[1]), sys.argv[2:]
if sys.platform == "linux":
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG, kept across exec
if os.getppid() != bench:  # the bench has ended, or a wrapper script started this interpreter
    try:
        os.kill(bench, 0)
    except ProcessLookupError:
        sys.exit("the bench that started this job has ended")
os.execv(sys.executable, [sys.executable, *command])
"""


def run_job(
    name: str, code: str | None, args: list[str], *, python: str | None = None, script: Path | None = None
) -> dict:
    """Run the job `name` (Python `code`, or a `script`) in a fresh process, which dies with this
    one; its last stdout line is its JSON result. A job that refuses its input (a ValueError)
    raises it as one line."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    job = ["-P", "-c", code] if code is not None else [str(script)]  # -P: not from the working directory either
    command = [python or sys.executable, "-c", _JOB_START, str(os.getpid()), *job, *args]
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        kind, _, message = last.partition(": ")
        if kind.endswith(("ValueError", "CheckpointError")):  # a refusal: its message, as compress gives it
            raise ValueError(f"{name}: {message}")
        raise RuntimeError(f"the job {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result | {"wall_seconds": time.perf_counter() - began}


def _quality(path: Path, base: Path, options: BenchOptions) -> dict[str, Any]:
    """The compressed model on the protocol, against the base: perplexity per domain, KL, top-1,
    degenerate generations, parameters; or why it could not be evaluated (a checkpoint
    transformers cannot load exactly)."""
    from moelab.hf import CheckpointError

    try:
        report = evaluate(path, base=base, options=_eval_options(options), quiet=True)
    except (CheckpointError, ValueError) as err:
        return {"evaluated": False, "problem": str(err).splitlines()[0][:300]}
    generation = report.get("generation", {})
    return {
        "evaluated": True,
        "perplexity": {d: v["perplexity"] for d, v in report["domains"].items()},
        "kl": report["agreement"][ALL]["kl"],
        "top1_agreement": report["agreement"][ALL]["top1_agreement"],
        "degenerate_rate": generation.get("model", {}).get("rate"),
        "parameters": report["parameters"],
    }


def _same_cell(stored: dict[str, Any], cell: Cell) -> bool:
    """Whether a cell.json's cell is `cell`; one written before moelab kept the router fit's
    learning rate (its lr then the default, which no CLI option changed) matches any."""
    wanted = dataclasses.asdict(cell)
    if "router_lr" not in stored:
        wanted.pop("router_lr")
    return stored == wanted


def _earlier_cells(root: Path, cells: list[Cell], calibrations: set[str]) -> list[dict]:
    """The finished cells of earlier runs of this bench (same model and protocol) that this run did
    not ask for, calibrated on everything or on this run's domain, so that the report keeps them:
    cells may be added. A cell this run made too is not added again under an older name (a ratio
    of a fractional percentage was named by its rounded one)."""
    found = [json.loads(p.read_text()) for p in sorted((root / "cells").glob(f"*/{CELL_NAME}"))]
    return [
        r
        for r in found
        if r["cell"]["calib"] in calibrations and not any(_same_cell(r["cell"], cell) for cell in cells)
    ]


def _best_general(results: list[dict], ratios: Sequence[float]) -> str:
    """The general paper method (not moelab's recipe) with the lowest overall perplexity at the
    largest ratio."""
    ratio = max(ratios)
    plain = [
        r
        for r in results
        if r.get("evaluated")
        and r["cell"]["ratio"] == ratio
        and r["cell"]["tool"] == "moelab"
        and not r["cell"]["router_fit"]
        and r["cell"]["method"] not in (*DOMAIN_METHODS, "moelab")
    ]
    if not plain:
        raise ValueError("the domain cells need the general cells' results; keep at least one general method")
    return min(plain, key=lambda r: r["perplexity"][ALL])["cell"]["method"]


def _calibration_facts(calibration: Calibration) -> dict[str, Any]:
    info = calibration.info
    return {"mixture": info["mixture"]["spec"], "seconds": info["seconds"]}


def _describe(options: BenchOptions) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()}
