"""The `moelab` command line: one entry point, one verb per job."""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="moelab: build, train, inspect and compress Mixture-of-Experts transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks, reported as ratios to baselines measured in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
# piped or redirected output: rich would cut its tables to 80 columns ("ref-8e-to…"); give them room
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace moelab's earlier output there (never files moelab did not write).")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Also draw the results as a PNG here (as `moelab bench plot` draws the --json file).")]
BenchQuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress: the results' tables only.")]
ThreadsOpt = Annotated[str, typer.Option("--threads", help="torch's intra-op threads: a count, or 'auto': the cores no other process is using when the command starts (OMP_NUM_THREADS instead, where it is set); on a busy core every split operation waits.")]
TrainThreadsOpt = Annotated[str | None, typer.Option("--threads", help="torch's intra-op threads: a count, or 'auto': the cores no other process is using when the command starts (OMP_NUM_THREADS instead, where it is set); given, it replaces the run file's train.threads (a resumed run needs the same); default: the run file's, else 'auto'.", show_default=False)]
KeepMemoryOpt = Annotated[bool, typer.Option("--keep-memory/--no-keep-memory", help="Keep freed memory in the process for the next step (glibc): a step's large activations are not page-faulted in again every step, and resident memory stays near the peak (docs/training.md).")]


@bench_app.command("layer")
def bench_layer(
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="1024 tokens, 2 rounds, no memory pass: a smoke run in about a minute (ratios run lower than at 4096).")] = False,
    configs: Annotated[list[str] | None, typer.Option("--config", help="e8k2 and/or e64k8 (default both).")] = None,
    dtypes: Annotated[list[str] | None, typer.Option("--dtype", help="fp32 and/or bf16 (default both).")] = None,
    modes: Annotated[list[str] | None, typer.Option("--mode", help="fwd and/or fwdbwd (default both).")] = None,
    tokens: Annotated[int | None, typer.Option(min=1, help="Tokens per step (default 4096; --quick 1024).")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Timed rounds per implementation (default 5; --quick 2).")] = None,
    skew: Annotated[float, typer.Option(help="Router bias ramp for the skewed-routing pass (0 = skip).")] = 2.0,
    memory: Annotated[bool, typer.Option(help="Measure peak memory of one fwd+bwd step per implementation.")] = True,
    load: Annotated[int, typer.Option("--load", min=0, help="Busy processes to run beside the benchmark (a machine that is not idle).")] = 0,
    threads: Annotated[str, typer.Option("--threads", help="Intra-op threads, or 'auto': the cores free once --load runs.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    plot: PlotOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: BenchQuietOpt = False,
) -> None:
    """MoE layer tokens/s vs a dense FFN of equal active FLOPs, a naive loop and transformers.

    E=8/k=2 and E=64/k=8 at equal active FLOPs, fp32 and bf16, forward and forward+backward,
    on the free cores (--threads). bf16 runs at most 512 tokens on CPUs without native bf16 matmul.
    """
    from moelab.bench import layer as bench

    if json_path is not None:
        bench.check_json_path(json_path, overwrite)
    _claim_plot(plot, overwrite, json_path)
    options = bench.BenchOptions.create(
        quick=quick, configs=configs, dtypes=dtypes, modes=modes, tokens=tokens, rounds=rounds, skew=skew, memory=memory,
        load=load, threads=_thread_setting(threads), device=device,
    )
    doc = bench.run(options, progress=None if quiet else console)
    console.print(bench.render_table(doc))
    if doc["memory"]:
        console.print(bench.render_memory(doc))
    if json_path is not None:
        bench.write_json(doc, json_path, overwrite)
        console.print(f"wrote {json_path}")
    _write_plot(plot, doc, overwrite)


@bench_app.command("generate")
def bench_generate(
    models: Annotated[list[str] | None, typer.Argument(help="Shipped reference model names or moelab checkpoint directories (default: both reference models).", show_default=False)] = None,
    batch: Annotated[list[int] | None, typer.Option("--batch", help="Batch sizes (default 1, 8 and 32).")] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Greedy tokens per sequence.")] = 64,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length.")] = 16,
    rounds: Annotated[int, typer.Option(min=1, help="Timed rounds per implementation, interleaved.")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="Intra-op threads.")] = 1,
    load: Annotated[int, typer.Option("--load", min=0, help="Busy processes to run beside the benchmark.")] = 0,
    skip: Annotated[list[float] | None, typer.Option("--skip", help="NAEE dynamic-skipping ratios to time beside plain decoding, with the test perplexity at each.")] = None,
    top_p: Annotated[list[float] | None, typer.Option("--top-p", help="Top-p thresholds to decode with (models with top-p routers: adaptive k), timed beside plain decoding, with the test perplexity at each.")] = None,
    compile_step: Annotated[bool, typer.Option("--compile", help="Also time generate(compile=True), the compiled static decode step.")] = False,
    dtype: Annotated[str, typer.Option(help="fp32 or bf16: both implementations' weights and activations.")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    plot: PlotOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: BenchQuietOpt = False,
) -> None:
    """Decode tokens/s: moelab's generate vs transformers' on the same weights, and vs the memory-bandwidth bound."""
    from moelab.bench import generate as bench

    _claim_json(json_path, bench.JSON_FORMAT, overwrite, tuple(_model_dirs(models).values()))
    _claim_plot(plot, overwrite, json_path, tuple(_model_dirs(models).values()))
    options = bench.GenerateOptions(
        batch_sizes=tuple(batch or (1, 8, 32)), prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds,
        threads=threads, load=load, skip=tuple(skip or ()), top_p=tuple(top_p or ()), compile=compile_step,
        dtype=dtype, device=device,
    )
    with _progress("bench generate", quiet) as progress:
        doc = bench.run(_model_dirs(models), options, progress=progress, quiet=quiet)
    console.print(bench.render(doc))
    if doc["routing_quality"]:
        console.print(bench.render_routing(doc))
    _write_json(json_path, doc, overwrite)
    _write_plot(plot, doc, overwrite)


@bench_app.command("offload")
def bench_offload(
    models: Annotated[list[str] | None, typer.Argument(help="Shipped reference model names or checkpoint directories, moelab's or transformers' (default: both reference models).", show_default=False)] = None,
    resident: Annotated[list[float] | None, typer.Option("--resident", help="Fractions of the routed experts the cache holds (default 0.05, 0.25, 0.5 and 1).")] = None,
    prompts: Annotated[int, typer.Option(min=1, help="Prompts decoded (batch 1).")] = 8,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Greedy tokens per prompt (the first from the prompt's pass, the hit rates over the rest).")] = 64,
    threads: Annotated[int, typer.Option(min=1, help="Intra-op threads.")] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Timed rounds per cell, each paired with the model in memory.")] = 2,
    read_gbps: Annotated[float | None, typer.Option("--read-gbps", help="Emulate storage of this many GB/s (default: the files as fast as the OS serves them).")] = None,
    page_cache: Annotated[bool, typer.Option("--page-cache/--no-page-cache", help="--no-page-cache: read every expert from the storage device, past the OS page cache (Linux).")] = True,
    compile_step: Annotated[bool, typer.Option("--compile", help="Also time the policies without read-ahead, and the model in memory, with the compiled static decode step (moelab checkpoints and the transformers ones that convert; the others are timed eagerly only).")] = False,
    dtype: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu or cuda (the model and the expert cache in GPU memory).")] = "cpu",
    host_memory: Annotated[bool, typer.Option("--host-memory", help="With --device cuda: keep every routed expert in pinned host memory and copy to the GPU from there (no file reads).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    plot: PlotOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: BenchQuietOpt = False,
) -> None:
    """Offloaded decoding: expert-cache hit rate, prefetch accuracy and tokens/s against an LRU cache and the model in memory."""
    from moelab.bench import offload as bench

    models_at = _model_dirs(models, "a checkpoint directory, moelab's or a transformers family's")
    _claim_json(json_path, bench.JSON_FORMAT, overwrite, tuple(models_at.values()))
    _claim_plot(plot, overwrite, json_path, tuple(models_at.values()))
    options = bench.OffloadOptions(
        resident=tuple(resident or (0.05, 0.25, 0.5, 1.0)), prompts=prompts, new_tokens=new_tokens, threads=threads,
        rounds=rounds, read_gbps=read_gbps, page_cache=page_cache, compile=compile_step, dtype=dtype,
        device=device, host_memory=host_memory,
    )
    with _progress("bench offload", quiet) as progress:
        doc = bench.run(models_at, options, progress=progress, quiet=quiet)
    console.print(bench.render(doc))
    _write_json(json_path, doc, overwrite)
    _write_plot(plot, doc, overwrite)


@bench_app.command("distributed")
def bench_distributed(
    model: Annotated[str | None, typer.Argument(help="A model config file or preset to train (default: the repository's configs/models/moe_top2.yaml).", show_default=False)] = None,
    procs: Annotated[list[int] | None, typer.Option("--procs", help="Process counts (default 1, 2 and 4).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Global sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="Tokens per sequence.")] = 256,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per cell (after 2 warmup steps).")] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="Passes over all the cells; each cell reports medians over them.")] = 2,
    load: Annotated[int, typer.Option("--load", min=0, help="Busy processes to run beside the benchmark.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    overwrite: OverwriteOpt = False,
    quiet: BenchQuietOpt = False,
) -> None:
    """Training tokens/s over 1, 2, 4 processes, expert parallelism on and off, the share of step time in the exchanges and the bytes they move against the count for uniform routing."""
    from moelab.bench import distributed as bench
    from moelab.train.config import load_model_config

    _claim_json(json_path, bench.JSON_FORMAT, overwrite)
    options = bench.DistributedOptions(
        procs=tuple(procs or (1, 2, 4)), batch_size=batch_size, seq_len=seq_len, steps=steps, rounds=rounds, load=load
    )
    if model is None:  # the repository's config, wherever the command runs from
        model = str(Path(__file__).resolve().parents[2] / "configs" / "models" / "moe_top2.yaml")
        if not Path(model).is_file():
            raise ValueError("give a model config file or preset: the default, configs/models/moe_top2.yaml, ships with moelab's repository, not with this install")
    config = load_model_config(model)
    with _progress("bench distributed", quiet) as progress:
        doc = bench.run(config, options, progress=progress)
    console.print(bench.render(doc))
    _write_json(json_path, doc, overwrite)


@contextmanager
def _progress(what: str, quiet: bool = False) -> Iterator[Callable[[str], None] | None]:
    """A spinner naming `what`, and the callback that adds the step measured now; quiet: neither (None)."""
    if quiet:
        yield None
        return
    with console.status(what) as status:
        yield lambda step: status.update(f"{what}: {step}")


def _thread_setting(threads: str) -> int | str:
    """--threads as given: a number, else the word ('auto'; anything else is refused by its user)."""
    return int(threads) if threads.isdecimal() else threads  # not isdigit: int("²") fails


def _use_threads(ctx: typer.Context, threads: str) -> None:
    """The rest of the command on `--threads` intra-op threads (`moelab.threads.resolve_threads`);
    torch's count is put back when the command ends."""
    from moelab.threads import intra_op_threads

    setting = _thread_setting(threads)
    if setting == "auto" and os.environ.get("OMP_NUM_THREADS"):  # e.g. torchrun's workers: 1 each
        setting = None
    ctx.with_resource(intra_op_threads(setting))


def _keep_memory(keep: bool) -> None:
    """`--keep-memory`: freed memory stays in this process (`moelab.memory.keep_freed_memory`)."""
    if keep:
        from moelab.memory import keep_freed_memory

        keep_freed_memory()


def _claim_json(path: Path | None, json_format: str, overwrite: bool, inputs: tuple[Path | str | None, ...] = ()) -> None:
    """Check, before any work, that `path` (if given) may be written: new, or moelab's own JSON of
    this format with --overwrite; never inside an input (a model directory, data, statistics)."""
    from moelab.io import check_output_file, has_json_format

    if path is not None:
        check_output_file(path, overwrite=overwrite, is_own=lambda p: has_json_format(p, json_format), inputs=inputs)


def _write_json(path: Path | None, doc: dict, overwrite: bool) -> None:
    """Write `doc` to `path` (if given) atomically, checked again as `_claim_json` checked it, and say so."""
    from moelab.io import has_json_format, write_output_file

    if path is not None:
        data = (json.dumps(doc, indent=1) + "\n").encode()
        write_output_file(path, data, overwrite=overwrite, is_own=lambda p: has_json_format(p, doc["format"]))
        console.print(f"wrote {path}")


def _model_dirs(models: list[str] | None, kind: str = "a moelab checkpoint directory") -> dict[str, Path]:
    """{name: checkpoint directory} for shipped reference model names or paths (default: every
    reference model); `kind`: what the command takes, for the error."""
    from moelab.models.reference import REFERENCE_MODELS

    dirs = {m: _model_dir(m) for m in models or REFERENCE_MODELS}
    for path in dirs.values():  # every one before the first is timed
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a checkpoint (no config.json); give {kind}")
    return dirs


def _model_dir(model: str | Path | None) -> Path:
    """`moelab.models.reference.model_dir` (a path, or a shipped model's name; None: the default
    shipped model), refusing a name that is neither."""
    from moelab.models.reference import REFERENCE_MODELS, model_dir
    from moelab.validation import did_you_mean

    path = model_dir(model)
    if not path.exists():
        raise ValueError(
            f"no model at {model}: give a checkpoint directory or a shipped model, one of "
            f"{list(REFERENCE_MODELS)}{did_you_mean(str(model), REFERENCE_MODELS)}"
        )
    return path


@bench_app.command("compress")
def bench_compress(
    work: Annotated[Path, typer.Option("--work", help="Directory for the generated checkpoint and its compressed copy.")] = Path("runs/bench-compress"),
    family: Annotated[str, typer.Option("--family", help="qwen3_moe or mixtral.")] = "qwen3_moe",
    size_gb: Annotated[float, typer.Option("--size-gb", help="Size of the generated checkpoint in bf16, in whole layers: one (about 0.24 GB) at the least.")] = 4.0,
    tokens: Annotated[int, typer.Option(min=1, help="Calibration tokens.")] = 2048,
    baseline: Annotated[bool, typer.Option(help="Also measure transformers loading the same checkpoint.")] = True,
    fp8: Annotated[bool, typer.Option("--fp8", help="Generate the model as a block-wise FP8 release (float8 projections, 128 x 128 block scales), as DeepSeek-V3 ships.")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the generated checkpoints in --work.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    overwrite: OverwriteOpt = False,
    quiet: BenchQuietOpt = False,
) -> None:
    """Calibrate and REAP-prune a generated checkpoint larger than memory: peak RSS, time, tokens/s."""

    from moelab.bench import compress as bench
    from moelab.io import OutputError, output_dir

    if json_path is not None and work.resolve() in (json_path.resolve(), *json_path.resolve().parents):
        raise OutputError(
            f"--json {json_path} lies inside --work {work}, moelab's scratch (cleared after the run unless --keep): "
            "write the JSON elsewhere"
        )
    _claim_json(json_path, bench.JSON_FORMAT, overwrite, (work,))  # before --work is claimed: a refusal touches nothing
    options = bench.BenchOptions(family=family, size_gb=size_gb, tokens=tokens, baseline=baseline, fp8=fp8)
    bench.check_disk_space(work, options.size_gb, overwrite)
    with output_dir(work, "benchmark scratch", entries=["source", "pruned"], overwrite=overwrite) as claimed:
        try:
            doc = bench.run(options, claimed.path, progress=None if quiet else console)
        finally:  # the generated checkpoints (gigabytes) go however the run ends
            if not keep:
                claimed.clear()
    console.print(bench.render(doc))
    _write_json(json_path, doc, overwrite)


@bench_app.command("skip")
def bench_skip(
    stats: Annotated[Path, typer.Option("--stats", help="Calibration statistics of the model (moelab calibrate).")],
    model: Annotated[str | None, typer.Argument(help="A moelab checkpoint directory or a shipped model's name: ref-8e-top2 (the default), ref-32e-top4-shared (dynamic skipping runs in moelab's runtime).", show_default=False)] = None,
    tokens: Annotated[int, typer.Option(min=1, help="Test-split tokens, over the corpus domains.")] = 4096,
    rounds: Annotated[int, typer.Option(min=1, help="Timed rounds per mode, interleaved.")] = 5,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    overwrite: OverwriteOpt = False,
    quiet: BenchQuietOpt = False,
) -> None:
    """NAEE dynamic skipping in moelab's runtime: tokens/s, experts per token and loss, with and without."""
    from moelab.bench import skipping as bench

    _claim_json(json_path, bench.JSON_FORMAT, overwrite, (_model_dir(model), stats))
    doc = bench.run(_model_dir(model), stats, bench.SkipOptions(tokens=tokens, rounds=rounds), quiet=quiet)
    console.print(bench.render(doc))
    _write_json(json_path, doc, overwrite)


@bench_app.command("plot")
def bench_plot(
    result: Annotated[Path, typer.Argument(help="The --json file of `moelab bench layer`, `generate` or `offload`.")],
    out: Annotated[Path | None, typer.Option("--out", help="The PNG to write (default: the result's name with .png).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Draw a benchmark's JSON result as a PNG: the layer's ratios to dense, decode tokens/s against batch size, offloading's hit rates and speed against the experts resident."""
    from moelab.bench.figures import read_result

    doc = read_result(result)
    out = result.with_suffix(".png") if out is None else out
    _claim_plot(out, overwrite, result)
    _write_plot(out, doc, overwrite)


def _claim_plot(
    path: Path | None, overwrite: bool, json_path: Path | None = None, inputs: tuple[Path | str | None, ...] = ()
) -> None:
    """Check, before any work, that the PNG `path` (if given) may be written, as `_claim_json`
    does for JSON (a PNG moelab drew may be replaced), and that it is not the JSON file as well."""
    from moelab.bench.figures import is_own_png
    from moelab.io import check_output_file

    if path is None:
        return
    if json_path is not None and path.resolve() == json_path.resolve():
        raise ValueError(f"the PNG and the JSON result would both be {path}: give the PNG its own name")
    check_output_file(path, overwrite=overwrite, is_own=is_own_png, inputs=inputs)


def _write_plot(path: Path | None, doc: dict, overwrite: bool) -> None:
    """Draw `doc` to the PNG `path` (if given) atomically, checked again as `_claim_plot` checked it, and say so."""
    from moelab.bench.figures import is_own_png, png_of
    from moelab.io import write_output_file

    if path is not None:
        write_output_file(path, png_of(doc), overwrite=overwrite, is_own=is_own_png)
        console.print(f"wrote {path}")


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("runs/demo"),
    model: Annotated[str | None, typer.Option("--model", help="A moelab MoE model directory or a shipped model's name (default: ref-8e-top2).")] = None,
    prune: Annotated[int, typer.Option(min=0, help="Experts to drop per layer in the compression step (moelab's recipe removes as many experts' worth of parameters; 0 = skip).")] = 2,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer evaluation and routing tokens (about 40 s on 2 idle cores, against about a minute).")] = False,
    overwrite: OverwriteOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or tables: only the final line, naming the summary and the report.")] = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """The main job on built-in defaults: the shipped reference MoE's per-domain perplexity, its
    routing report, and its compression (frequency pruning, REAP, moelab's recipe) compared with it."""
    _use_threads(ctx, threads)
    from moelab.demo import run_demo

    tokens = {"eval_tokens": 4096, "trace_tokens": 8000} if quick else {}
    run_demo(out, model_dir=None if model is None else _model_dir(model), prune=prune, overwrite=overwrite, console=console, quiet=quiet, **tokens)


@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="A run config (.yaml/.json) with 'model' and 'train' sections.")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<config name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the run in --out again from step 0.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    expert_parallel: Annotated[int | None, typer.Option("--expert-parallel", min=1, help="Under torchrun: split the experts over this many ranks (the run file's parallel.expert).")] = None,
    threads: TrainThreadsOpt = None,
    keep_memory: KeepMemoryOpt = True,
) -> None:
    """Train a model: checkpoints, log.jsonl and TensorBoard logs, per-domain validation. Under
    torchrun (`torchrun --nproc-per-node N -m moelab train ...`) on N processes: docs/distributed.md."""
    _use_threads(ctx, threads or "auto")
    import dataclasses

    from moelab.distributed import ParallelConfig
    from moelab.train import RunConfig
    from moelab.train import train as run_training

    run = RunConfig.load(config)
    if threads is not None:
        run.train = dataclasses.replace(run.train, threads=_thread_setting(threads))
    if expert_parallel is not None:
        run.parallel = dataclasses.replace(run.parallel or ParallelConfig(), expert=expert_parallel, data=None)
    out = out or Path("runs") / config.stem
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again; pass one of them")
    _keep_memory(keep_memory)
    try:
        result = run_training(run, out, resume=resume, overwrite=overwrite, inputs=[config], quiet=quiet)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            _say_how_to_continue_training(out, resume, overwrite)
        raise
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        console.print(f"done: {result.steps} steps, {result.tokens:,} tokens, {result.tokens_per_second:,.0f} tokens/s, "
                      f"val loss {result.eval_loss['all']:.4f}; model in {out / 'model'}")


def _say_how_to_continue_training(out: Path, resume: bool, overwrite: bool) -> None:
    """After Ctrl-C in `train`: the command that continues the run in `out` (the trainer has said
    at which step it stopped), or, before its first checkpoint, the one that starts it: the same
    command, or with --resume where the run was claimed without it (the same command is refused)."""
    from moelab.io import is_output
    from moelab.train.checkpoint import latest_checkpoint
    from moelab.train.trainer import KIND

    if latest_checkpoint(out) is None:
        claimed = is_output(out, KIND) and not (resume or overwrite)
        again = "with --resume" if claimed else "again"
        print(f"interrupted before the first checkpoint in {out}: run the same command {again} to start", file=sys.stderr)
        return
    again = "again" if resume else "with --resume instead of --overwrite" if overwrite else "with --resume"
    print(f"interrupted: run the same command {again} to continue the run in {out}", file=sys.stderr)


@app.command()
def consolidate(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint, RUN/checkpoints/step-NNNNNN (from torchrun or one process).")],
    out: Annotated[Path, typer.Option("--out", help="The model directory to write (save_pretrained format, with the tokenizer).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model moelab wrote there before.")] = False,
) -> None:
    """Turn a training checkpoint, e.g. a distributed one saved under torchrun, into one model
    directory that every other command reads."""
    from moelab.train.checkpoint import consolidate_checkpoint

    console.print(f"model in {consolidate_checkpoint(checkpoint, out, overwrite=overwrite)}")


@app.command()
def compare(
    ctx: typer.Context,
    configs: Annotated[list[str], typer.Argument(help="Model config files (.yaml/.json) or preset names, one per variant.")],
    recipe: Annotated[Path, typer.Option("--train", help="The shared training recipe: TrainConfig fields, or a run file's train section.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: one run per variant plus report.md, summary.json and plots.")],
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Train each variant with this many seeds (the recipe's seed and the next ones); the report gives means, spreads and which differences exceed the seed-to-seed spread.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Train every variant again instead of resuming the comparison in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    threads: TrainThreadsOpt = None,
    keep_memory: KeepMemoryOpt = True,
) -> None:
    """Train several variants on one recipe (equal tokens) and report loss, per-domain loss,
    params, FLOPs/token, speed and expert load. Re-running resumes and keeps finished variants."""
    _use_threads(ctx, threads or "auto")
    import dataclasses

    from moelab.train.compare import compare as run_compare
    from moelab.train.compare import load_recipe

    recipe_config = load_recipe(recipe)
    if threads is not None:
        recipe_config = dataclasses.replace(recipe_config, threads=_thread_setting(threads))
    _keep_memory(keep_memory)
    with _resumable(out, clears=overwrite):  # finished variants are kept, the interrupted one resumed
        report = run_compare(
            configs, recipe_config, out, seeds=seeds, overwrite=overwrite, inputs=[recipe], quiet=quiet
        )
    console.print(f"report: {report}")


@app.command()
def info(
    config: Annotated[str, typer.Argument(help="A model or run config file (.json/.yaml) or a preset name (tiny, small).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    seq_len: Annotated[int | None, typer.Option(min=1, help="Sequence length for attention FLOPs (default: max_seq_len).")] = None,
) -> None:
    """Total and active parameters and forward FLOPs per token of a model config."""
    import json

    from moelab.models import model_info
    from moelab.train.config import load_model_config

    cfg = load_model_config(config)
    summary = model_info(cfg, seq_len=seq_len)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{config}: {cfg.n_layers} layers ({', '.join(sorted(set(summary['layer_types'])))})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("total_params", "non_embedding_params", "active_params", "active_non_embedding_params",
                "flops_per_token", "seq_len"):
        table.add_row(key, f"{summary[key]:,}")
    console.print(table)


ModelArg = Annotated[str | None, typer.Argument(help="A moelab or local transformers checkpoint directory, or a shipped model's name: ref-8e-top2 (the default), ref-32e-top4-shared.", show_default=False)]
DataOpt = Annotated[str, typer.Option(help="'corpus' (the shipped corpus), a .txt/.jsonl file or a directory of them.")]
SplitOpt = Annotated[str, typer.Option(help="Corpus split.")]
DomainOpt = Annotated[list[str] | None, typer.Option("--domain", help="Only these domains (repeatable; default all).")]
MaxTokensOpt = Annotated[int, typer.Option(min=1, help="Token budget, split evenly over the domains.")]
SeqLenOpt = Annotated[int, typer.Option(min=1, help="Tokens per sequence window.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Windows per forward pass.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


def _check_split(ctx: typer.Context, data: str) -> None:
    """--split picks a split of the shipped corpus: refuse it beside --data of one's own, which is
    read whole (the split was ignored without a word)."""
    if data != "corpus" and ctx.get_parameter_source("split").name == "COMMANDLINE":
        raise ValueError(f"--split picks a split of the shipped corpus, and --data {data} is read whole; leave --split out")


@app.command("trace")
def trace_cmd(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", help="New trace directory.")] = Path("runs/trace"),
    data: DataOpt = "corpus",
    split: SplitOpt = "validation",
    domains: DomainOpt = None,
    max_tokens: MaxTokensOpt = 20000,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    logits: Annotated[bool, typer.Option("--logits", help="Also store full router logits (float16).")] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """Record every MoE layer's routing (experts, weights, entropy; domain-labelled) on calibration text."""
    _check_split(ctx, data)
    _use_threads(ctx, threads)
    from moelab.trace import TraceOptions, trace_from_files

    options = TraceOptions(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, logits=logits)
    trace = trace_from_files(
        _model_dir(model), out, data=data, split=split, domains=domains, options=options, overwrite=overwrite, quiet=quiet
    )
    info = trace.info
    console.print(f"traced {info.num_tokens:,} tokens through {len(info.layers)} MoE layers "
                  f"({info.settings['tokens_per_second']:,.0f} tokens/s) into {out}")


@app.command()
def analyze(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="A moelab or local transformers checkpoint directory, a shipped model's name: ref-8e-top2 (the default), ref-32e-top4-shared; or a trace directory (moelab trace) to report on without running the model.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Report directory.")] = Path("runs/analysis"),
    data: DataOpt = "corpus",
    split: SplitOpt = "validation",
    domains: DomainOpt = None,
    max_tokens: MaxTokensOpt = 20000,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """Routing report of a model (or an existing trace directory): load, specialisation, entropy,
    co-activation, inter-layer affinity, chunk sparsity, super experts -> HTML + PNG + JSON."""
    _check_split(ctx, data)
    _use_threads(ctx, threads)
    from moelab.analyze import analyze as run_analysis
    from moelab.trace import TraceOptions

    options = TraceOptions(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)
    path = run_analysis(
        _model_dir(model), out, data=data, split=split, domains=domains, options=options, overwrite=overwrite, quiet=quiet
    )
    console.print(f"wrote {path} (numbers in {out / 'report.json'}, plots in {out / 'plots'})")


@app.command()
def export(
    model_dir: Annotated[str, typer.Argument(help="A moelab checkpoint directory (save_pretrained) or a shipped model's name.")],
    family: Annotated[str, typer.Option("--family", help="Target format: qwen2_moe or mixtral.")],
    out: Annotated[Path, typer.Option("--out", help="New directory for the transformers checkpoint.")],
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="A tokenizer directory to write beside the weights (default: the checkpoint's own, with its generation config and other side files, else moelab's shipped one for a model of its vocabulary).")] = None,
    no_tokenizer: Annotated[bool, typer.Option("--no-tokenizer", help="Weights only, without a tokenizer.")] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a moelab MoE checkpoint in a transformers family's format (checked: logits match to 1e-4)."""
    from moelab.hf.export import export_checkpoint

    if no_tokenizer and tokenizer is not None:
        raise ValueError("--tokenizer and --no-tokenizer exclude each other; give one")
    chosen = None if no_tokenizer else tokenizer or "auto"
    path = export_checkpoint(_model_dir(model_dir), out, family, tokenizer=chosen, overwrite=overwrite, quiet=quiet)
    console.print(f"wrote {path} ({family}; loads with transformers.AutoModelForCausalLM.from_pretrained)")


@app.command("import")
def import_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A transformers checkpoint directory: mixtral, or qwen2_moe with zero attention biases.")],
    out: Annotated[Path, typer.Option("--out", help="New directory for the moelab checkpoint.")],
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a transformers MoE checkpoint as a moelab one, which decodes on moelab's fast path (the
    inverse of export; checked: logits match to 1e-4)."""
    from moelab.hf.conversion import import_checkpoint

    path = import_checkpoint(model_dir, out, overwrite=overwrite, quiet=quiet)
    console.print(f"wrote {path} (a moelab checkpoint: moelab.models.load_pretrained, moelab generate --model)")


@app.command()
def dequantize(
    model_dir: Annotated[Path, typer.Argument(help="A quantized checkpoint moelab reads: block-wise FP8 (DeepSeek-V3, Qwen3-FP8, MiniMax-M2, Kimi-K2), compressed-tensors FP8, or GPT-OSS's MXFP4.")],
    out: Annotated[Path, typer.Option("--out", help="New directory for the dequantized checkpoint.")],
    dtype: Annotated[str, typer.Option("--dtype", help="The weights' dtype: bf16, fp16 or fp32.")] = "bf16",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a quantized checkpoint with plain weights, one tensor at a time (memory: one dequantized
    tensor), for tools that read plain weights only (moelab's own commands read it as it is)."""
    from moelab.hf.dequantize import OUT_DTYPES, dequantize_checkpoint

    if dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
    path = dequantize_checkpoint(model_dir, out, dtype=OUT_DTYPES[dtype], overwrite=overwrite, quiet=quiet)
    console.print(f"wrote {path} ({dtype} weights)")


CalibOpt = Annotated[list[str] | None, typer.Option("--calib", help="Calibration data: corpus, corpus:code,german, corpus:code=3,german=1, a .txt/.jsonl file or directory (repeatable; default corpus).")]
CalibTokensOpt = Annotated[int, typer.Option("--calib-tokens", min=1, help="Calibration token budget, split over the sources by weight.")]
SampleTokensOpt = Annotated[int, typer.Option("--sample-tokens", min=0, help="MoE inputs kept per layer for methods that re-run layers (NAEE).")]


def _calibration_options(tokens: int, seq_len: int, batch_size: int, sample_tokens: int, backward: bool = False):
    from moelab.compress import CalibrationOptions
    from moelab.compress.observers import DEFAULT_OBSERVERS

    observers = DEFAULT_OBSERVERS + (("neurons",) if backward else ())
    return CalibrationOptions(tokens=tokens, seq_len=seq_len, batch_size=batch_size, sample_tokens=sample_tokens,
                              observers=observers)


def _check_reused_settings(ctx: typer.Context, stats: Path) -> None:
    """Refuse a calibration setting given beside --stats that the statistics were not made with:
    they are reused as they are, and the setting used to be ignored without a word."""
    from moelab.compress.stats import Calibration

    flags = {"tokens": "--calib-tokens", "seq_len": "--seq-len", "sample_tokens": "--sample-tokens"}
    # typer's own copy of click's enum: compared by name
    typed = [name for name in flags if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    if not typed:  # nothing to compare: the statistics are checked against the model where compress reads them
        return
    calibration = Calibration(stats)
    tokens, seq_len = calibration.windows()  # checked: an edited calibration.json is named, not a KeyError
    sample_tokens = calibration.info["settings"].get("sample_tokens", 0)
    made_with = {"tokens": tokens, "seq_len": seq_len, "sample_tokens": sample_tokens}
    for name in typed:
        given, flag = ctx.params[name], flags[name]
        if given != made_with[name]:
            raise ValueError(
                f"{flag} {given}: the statistics in {stats} were made with {made_with[name]} and --stats reuses "
                f"them as they are; drop {flag}, or leave out --stats to calibrate again"
            )


@contextmanager
def _resumable(out: Path, clears: bool = False) -> Iterator[None]:
    """Ctrl-C in a resumable job (calibrate, compress, compress-bench, compare) says how to go on:
    what it has done stays for the next run into `out` (docs/outputs.md); it used to stop without a
    word. On a line of its own: a progress bar may have left the cursor at the end of its line.
    clears: the command run again would clear `out` (compress-bench's and compare's --overwrite:
    they write in place), so the hint leaves that flag out."""
    try:
        yield
    except KeyboardInterrupt:
        again = "the same command again without --overwrite" if clears else "the same command again"
        print(f"\ninterrupted: run {again} to resume (what is done is kept for {out})", file=sys.stderr)
        raise


def _method_options(pairs: list[str] | None) -> dict:
    """KEY=VALUE strings as method options; values are read as JSON where they parse (numbers,
    true/false/null), else kept as strings."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option takes KEY=VALUE (e.g. layout=padded), got {pair!r}")
        if key.strip() in options:
            raise ValueError(f"--option {key.strip()} is given twice; give each option once")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


@app.command()
def calibrate(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", help="New directory for the statistics.")] = Path("runs/calibration"),
    calib: CalibOpt = None,
    tokens: CalibTokensOpt = 16384,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    sample_tokens: SampleTokensOpt = 1024,
    backward: Annotated[bool, typer.Option("--backward", help="Also run the backward sweep: the per-neuron gradient statistics HEAPr needs (a loss gradient carried down layer by layer; about three times the time).")] = False,
    mtp: Annotated[bool, typer.Option("--mtp/--no-mtp", help="Also calibrate a multi-token prediction layer with routed experts (DeepSeek-V3's, Qwen3-Next's: what compress --mtp prune needs).")] = True,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """Record, in one pass layer by layer, every statistic the compression methods need (resumable)."""
    _use_threads(ctx, threads)
    from moelab.compress import calibrate as run_calibrate

    options = _calibration_options(tokens, seq_len, batch_size, sample_tokens, backward)
    with _resumable(out):
        stats = run_calibrate(_model_dir(model), out, calib=calib or "corpus", options=options, mtp=mtp,
                              overwrite=overwrite, quiet=quiet)
    info = stats.info
    thin = sum(info.get("coverage", {}).values())
    mtp = f" and the multi-token prediction layer {info['mtp_layers'][0]}" if info.get("mtp_layers") else ""
    console.print(f"calibrated {info['mixture']['tokens']:,} tokens through {len(info['moe_layers'])} MoE layers{mtp} "
                  f"({info['tokens_per_second']:,.0f} tokens/s) into {out}; experts routed fewer than 8 tokens: {thin}")


@app.command()
def compress(
    ctx: typer.Context,
    model: ModelArg = None,
    method: Annotated[str, typer.Option("--method", help="pruning: frequency, soft_count, router_weight, ean, reap, easy_ep, premoe, naee, random; merging: m_smoe, hc_smoe, sub_moe; neurons: heapr; moelab's recipe: moelab.")] = "reap",
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of each MoE layer's routed experts to remove, in (0, 1): int(E x ratio) experts (heapr: that fraction of their parameters; moelab: int(E x ratio) experts' worth of parameters, whole experts or neurons).")] = 0.25,
    option: Annotated[list[str] | None, typer.Option("--option", help="A method option KEY=VALUE (repeatable): m_smoe align, mc_rank, mc_sparse; hc_smoe linkage, router_rule; sub_moe rank, seed; naee max_candidates, chunk; heapr layout; moelab strategy, fold, fit_steps, fit_lr, protect_super; random seed.")] = None,
    out: Annotated[Path, typer.Option("--out", help="New directory for the compressed checkpoint.")] = Path("runs/compressed"),
    calib: CalibOpt = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="Reuse these calibration statistics (moelab calibrate, or an earlier output's moelab_calibration/).")] = None,
    domains: Annotated[list[str] | None, typer.Option("--domain", help="Score experts on these calibration domains only (repeatable; domain-specific pruning).")] = None,
    protect_super_experts: Annotated[bool, typer.Option("--protect-super-experts", help="Never drop an expert the Super Experts rule flags.")] = False,
    budget: Annotated[str, typer.Option("--budget", help="layer: the same ratio in every layer; global: rank scores across layers (refused when layers would differ).")] = "layer",
    recalibrate_router: Annotated[int, typer.Option("--recalibrate-router", min=0, help="Afterwards, fit each edited layer's router for this many Adam steps to reproduce the original layer's output (0: off).")] = 0,
    router_lr: Annotated[float, typer.Option("--router-lr", help="Learning rate of the router re-calibration.")] = 1e-3,
    reload: Annotated[bool | None, typer.Option("--reload/--no-reload", help="Load the written checkpoint whole with transformers as a last check (default: where it fits in memory; every edited layer is checked either way).", show_default=False)] = None,
    keep_quantized: Annotated[bool, typer.Option("--keep-quantized", help="A quantized source (FP8, DeepSeek-V4's FP4 experts, GPT-OSS's MXFP4) is written in its own format (kept experts byte for byte, merged or narrowed ones quantized as it quantizes), not as plain weights in the dtype its config.json states.")] = False,
    mtp: Annotated[str, typer.Option("--mtp", help="A multi-token prediction layer with routed experts (DeepSeek-V3's, GLM-4.5's): prune (decide its experts like the others', on its own statistics) or drop (leave it out: no MTP speculative decoding).")] = "prune",
    tokens: CalibTokensOpt = 16384,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    sample_tokens: SampleTokensOpt = 1024,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """Compress the routed experts (prune, merge or narrow them; moelab's recipe picks per layer)
    and write a checkpoint in the source's own format (a transformers one loads unchanged)."""
    _use_threads(ctx, threads)
    from moelab.compress import compress as run_compress
    from moelab.compress.router_fit import RouterFit

    if stats is not None:
        _check_reused_settings(ctx, stats)
    options = _calibration_options(tokens, seq_len, batch_size, sample_tokens)
    with _resumable(out):
        report = run_compress(_model_dir(model), out, method=method, ratio=ratio, calib=calib,
                              stats=stats, calib_options=options, protect_super_experts=protect_super_experts,
                              domains=domains, budget=budget, method_options=_method_options(option),
                              router_fit=RouterFit(recalibrate_router, router_lr), keep_quantized=keep_quantized,
                              mtp=mtp, reload=reload, overwrite=overwrite, quiet=quiet)
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    routed = f"{before['routed_experts']:,} -> {after['routed_experts']:,}"
    removed = 1 - after["routed_experts"] / before["routed_experts"]
    stability = report["stability_jaccard"]
    compact = f" ({after['total_compact']:,} in compact form)" if "total_compact" in after else ""
    console.print(f"wrote {out}: {method} took the routed experts' parameters from {routed} (-{removed:.0%}), "
                  f"the model's {before['total']:,} -> {after['total']:,}{compact}"
                  + ("" if stability is None else f"; kept-set stability (Jaccard of two data halves) {stability:.2f}")
                  + f"; report in {out / 'moelab_compression.json'}")


@app.command("compress-bench")
def compress_bench(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for the bench (resumed when it holds one: finished cells are kept).")] = Path("runs/compress-bench"),
    methods: Annotated[list[str] | None, typer.Option("--method", help="Only these methods (repeatable; default: every general method the model takes).")] = None,
    ratios: Annotated[list[float] | None, typer.Option("--ratio", help="Ratios to remove (repeatable; default 0.25 and 0.5).")] = None,
    router_fit: Annotated[int, typer.Option("--router-fit", min=0, help="Also run every cell with its router re-calibrated for this many steps (0: not).")] = 0,
    domain: Annotated[str | None, typer.Option("--domain", help="Also the domain cells: calibrate on this corpus domain alone, remove 50 % and 75 %.")] = None,
    llmcompressor_python: Annotated[Path | None, typer.Option("--llmcompressor-python", help="Python of an environment with llm-compressor: adds its REAP (transformers checkpoints).")] = None,
    calib_tokens: CalibTokensOpt = 16384,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", min=1, help="Test tokens per domain.")] = 4096,
    prompts: Annotated[int, typer.Option(min=0, help="Prompts per domain for the degenerate-generation rate (at most: a short domain gives one per distinct offset).")] = 2,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """Every compression method on one calibration and one evaluation: report.md, summary.json and plots."""
    _use_threads(ctx, threads)
    from moelab.compress.bench import DOMAIN_METHODS, BenchOptions, by_reason, methods_for, run_bench
    model = _model_dir(model)
    ratios = tuple(ratios or (0.25, 0.5))
    # the general methods run at the domain ratios too where there are domain cells (the best one does)
    checked = tuple(dict.fromkeys((*ratios, *BenchOptions.domain_ratios))) if domain else ratios

    left_out: dict[str, str] = {}

    def taken(candidates, what: str) -> tuple[str, ...]:  # those the model takes; the others named with the reason
        kept, refused = methods_for(model, checked, candidates)
        if not kept:
            raise ValueError(f"no {what} runs on {model}: {next(iter(refused.values()))}")
        for reason, names in by_reason(refused).items():  # one line per reason
            console.print(f"[yellow]left out {', '.join(names)}:[/yellow] {reason}", markup=True, highlight=False)
        left_out.update(refused)
        return kept

    methods = tuple(methods) if methods else taken(BenchOptions.methods, "compression method")
    # the domain cells' methods (no option names them): those the model takes (Gemma 4 takes no EASY-EP)
    domain_methods = taken(DOMAIN_METHODS, "domain method (--domain)") if domain else DOMAIN_METHODS
    options = BenchOptions(methods=methods, ratios=ratios, domain_methods=domain_methods,
                           router_fit=router_fit, calib_tokens=calib_tokens, eval_tokens=eval_tokens, prompts=prompts,
                           domain=domain, llmcompressor_python=str(llmcompressor_python) if llmcompressor_python else None,
                           left_out=left_out)
    with _resumable(out, clears=overwrite):
        run_bench(model, out, options, overwrite=overwrite, quiet=quiet)
    console.print(f"report: {out / 'report.md'}")  # --quiet too (it silences progress, as compare's)


@app.command("generate")
def generate_cmd(
    ctx: typer.Context,
    prompts: Annotated[list[str], typer.Argument(help="The text to continue; several prompts decode as one batch.")],
    model: Annotated[str | None, typer.Option("--model", help="A checkpoint directory, moelab's or transformers', or a shipped model's name (default: ref-8e-top2).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to add.")] = 64,
    resident: Annotated[float | None, typer.Option("--resident", help="Offload the routed experts, keeping this fraction of them in memory (0-1].")] = None,
    memory_budget: Annotated[str | None, typer.Option("--memory-budget", help="Offload the routed experts to fit the whole model in this much memory, e.g. 2GiB.")] = None,
    prior: Annotated[Path | None, typer.Option("--prior", help="A routing trace (moelab trace) whose statistics guide the expert cache.")] = None,
    policy: Annotated[str, typer.Option("--policy", help="With --resident / --memory-budget, the expert cache's eviction and read-ahead: lru, reuse, affinity, lookahead-x1, lookahead or both (affinity and both need --prior; docs/benchmarks.md).")] = "reuse",
    compile_step: Annotated[bool, typer.Option("--compile", help="Decode with a compiled static step (moelab checkpoints, in memory or offloaded without read-ahead; compiling takes seconds, paid once).")] = False,
    dtype: Annotated[str, typer.Option(help="auto, fp32 or bf16; auto: bf16 for a bf16 checkpoint where the device multiplies in it natively (a GPU; a CPU with AVX512-BF16 or AMX), else fp32.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda (offloaded: the expert cache in GPU memory).")] = "cpu",
    host_memory: Annotated[bool, typer.Option("--host-memory", help="Offloaded on cuda: keep every routed expert in pinned host memory and copy to the GPU from there (no file reads).")] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sample each token from softmax(logits / temperature) instead of taking the most likely one.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Sample from the smallest set of most likely tokens whose probability reaches this (0-1].")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="Sample from the k most likely tokens.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the sampling (default 0): one seed and the same prompts, one text.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Decode --max-new-tokens whatever comes, past the end-of-text token (default: a text ends there).")] = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """Continue prompts (one printed as it is decoded, several as one batch), greedily or, with any
    of --temperature / --top-p / --top-k, sampling (temperature 1 unless given); the model in memory
    or its routed experts offloaded (--resident / --memory-budget)."""
    _use_threads(ctx, threads)
    from transformers import TextStreamer

    from moelab.bench.layer import DTYPES
    from moelab.generate import generate_texts, load_tokenizer_of, parse_size
    from moelab.models.transformer import Sampling
    from moelab.offload import RoutingPrior
    from moelab.validation import check_choice

    check_choice("dtype", dtype, ["auto", *DTYPES])
    sampling = None
    if (temperature, top_p, top_k) != (None, None, None):
        temperature = 1.0 if temperature is None else temperature
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed or 0)
    elif seed is not None:
        raise ValueError("--seed seeds sampling: add --temperature, --top-p or --top-k (else it is greedy)")
    if model is None and _is_checkpoint_dir(prompts[0]):  # `moelab generate DIR "text"`
        raise ValueError(
            f"the first prompt {prompts[0]!r} is a checkpoint directory, not text: give the model as --model {prompts[0]}"
        )
    path = _model_dir(model)
    offloaded = resident is not None or memory_budget is not None
    offload_only = {"--prior": prior is not None, "--policy": policy != "reuse", "--host-memory": host_memory}
    if unused := [flag for flag, given in offload_only.items() if given and not offloaded]:
        raise ValueError(f"{', '.join(unused)}: for offloaded experts; add --resident or --memory-budget")
    streamer = None
    if len(prompts) == 1:  # printed as it comes (transformers' streamer takes a batch of one)
        tokenizer = load_tokenizer_of(path)  # the end-of-text token ends the text, unprinted
        streamer = _PromptFirst(TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=not ignore_eos), prompts[0])
    try:
        texts, stats = generate_texts(
            path, prompts, max_new_tokens=max_new_tokens, resident=resident,
            memory_budget=None if memory_budget is None else parse_size(memory_budget),
            prior=None if prior is None else RoutingPrior.from_trace(prior), policy=policy, compile=compile_step,
            dtype=DTYPES.get(dtype, dtype), device=device, host_memory=host_memory, streamer=streamer,
            sampling=sampling, ignore_eos=ignore_eos,
        )  # fmt: skip
    except BaseException:  # an error (a corrupt expert read mid-way) or Ctrl-C: end the text printed so far
        if streamer is not None and streamer.started:
            console.print()
        raise
    if streamer is None:
        for prompt, text in zip(prompts, texts, strict=True):
            console.print(prompt + text, markup=False, highlight=False, soft_wrap=True)
    compiling = " (compiling included)" if compile_step else ""
    tokens = f"{len(prompts)} x {stats['steps']}" if len(prompts) > 1 else f"{stats['steps']}"
    later = stats["later_tokens_per_s"]
    later = "" if later is None else f"; {later:.1f} tokens/s after the first two"
    speed = f"{stats['tokens_per_s']:.1f} tokens/s{compiling}{later}"
    on = f"{stats['threads']} thread{'s' * (stats['threads'] > 1)}, {str(stats['dtype']).removeprefix('torch.')}"
    tokens += " token" if tokens == "1" else " tokens"
    console.print(f"[dim]{tokens} in {stats['seconds']:.2f} s, {speed}, {on}[/dim]")
    if "slots" in stats:
        hit = "-" if stats["decode_hit_rate"] is None else f"{stats['decode_hit_rate']:.1%}"
        console.print(f"[dim]expert cache: {stats['slots']} slots, decode hit rate {hit}, {stats['experts_read']} experts read[/dim]")


def _is_checkpoint_dir(text: str) -> bool:
    """Whether `text` names a directory with a config.json (False for text no path can be: a name
    longer than the file system allows)."""
    try:
        return (Path(text) / "config.json").is_file()
    except OSError:  # ENAMETOOLONG, which pathlib does not take as "no such file"
        return False


class _PromptFirst:
    """A streamer that prints the prompt once decoding starts (after every check has passed), then
    passes each step's tokens on to `inner`."""

    def __init__(self, inner, prompt: str):
        self.inner, self.prompt, self.started = inner, prompt, False

    def put(self, value) -> None:
        if not self.started:
            self.started = True
            console.print(self.prompt, end="", markup=False, highlight=False, soft_wrap=True)
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model: ModelArg = None,
    base: Annotated[str | None, typer.Option("--base", help="The model this one was made from (a directory or a shipped model's name): adds KL, top-1 agreement and its own numbers.")] = None,
    data: DataOpt = "corpus",
    split: Annotated[str, typer.Option(help="Corpus split (test by default: calibration uses validation).")] = "test",
    domains: DomainOpt = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", min=1, help="Test tokens per domain (as compress-bench's; trace's --max-tokens is a total).")] = 8192,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    prompts: Annotated[int, typer.Option(min=0, help="Prompts per domain for the degenerate-generation check (at most: a short domain gives one per distinct offset; 0: skip).")] = 4,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Each prompt's length in tokens.")] = 32,
    gen_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Greedy tokens generated after each prompt (as bench generate's --new-tokens).")] = 48,
    dynamic_skip: Annotated[Path | None, typer.Option("--dynamic-skip", help="Run the model (a moelab one) with NAEE dynamic skipping, ratios from these calibration statistics.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = "auto",
) -> None:
    """Perplexity per domain; against a base: KL and top-1 agreement; degenerate generations; size and speed."""
    _check_split(ctx, data)
    _use_threads(ctx, threads)
    from moelab.eval.evaluate import EVAL_FORMAT, EvalOptions, evaluate, render_report

    inputs = (_model_dir(model), base and _model_dir(base), None if data == "corpus" else data, dynamic_skip)
    _claim_json(json_path, EVAL_FORMAT, overwrite, inputs)
    options = EvalOptions(data=data, split=split, domains=domains, eval_tokens=eval_tokens, seq_len=seq_len,
                          batch_size=batch_size, prompts=prompts, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                          dynamic_skip=str(dynamic_skip) if dynamic_skip else None)
    report = evaluate(_model_dir(model), base=None if base is None else _model_dir(base), options=options, quiet=quiet)
    console.print(render_report(report))
    _write_json(json_path, report, overwrite)


@app.command()
def version() -> None:
    """Print moelab's and its key dependencies' versions."""
    import torch

    import moelab

    table = Table(show_header=False)
    table.add_row("moelab", moelab.__version__)
    table.add_row("torch", torch.__version__)
    try:
        import transformers

        table.add_row("transformers", transformers.__version__)
    except ImportError:
        table.add_row("transformers", "not installed")
    console.print(table)


def _one_line_summaries(*groups: typer.Typer) -> None:
    """Give each command the first paragraph of its docstring, on one line, as its short help: the
    command list of `moelab --help` kept that paragraph's line breaks ("its\n routing report")."""
    for group in groups:
        for command in group.registered_commands:
            if command.short_help is None and command.callback is not None and command.callback.__doc__:
                first_paragraph = inspect.cleandoc(command.callback.__doc__).split("\n\n")[0]
                command.short_help = " ".join(first_paragraph.split())


_one_line_summaries(app, bench_app)


def main() -> None:
    """Console entry point. A user mistake (a bad option or argument, a broken config, checkpoint,
    trace or data file, an unknown name) prints one line, `error: ...`, on stderr and exits with
    status 2; any other exception is a bug and keeps its traceback."""
    import yaml
    from safetensors import SafetensorError

    from moelab.data import CorpusIntegrityError
    from moelab.distributed import exit_process, torchrun_world

    user_errors = (
        ValueError,  # moelab's own checks, CheckpointError, JSON and UTF-8 decoding
        OSError,  # a missing or unreadable file, a full disk: the file and the system's reason
        yaml.YAMLError,
        SafetensorError,
        CorpusIntegrityError,
    )
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as err:  # click's usage errors: a bad option value, a missing argument, ...
        if message := err.format_message():  # empty when a bare command printed its help instead
            command = getattr(getattr(err, "ctx", None), "command_path", None)
            _error(message.rstrip(".") + (f" (see '{command} --help')" if command else ""))
        raise SystemExit(2) from None
    except user_errors as err:
        _error(f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err))
        raise SystemExit(2) from None
    if torchrun_world() is not None:  # a torchrun worker: see exit_process
        exit_process(code or 0)
    if code:  # typer's exit code, e.g. 130 after Ctrl-C
        raise SystemExit(code)


def _error(message: str) -> None:
    """`error: <message>` on stderr as one line, however long (no wrapping, no panel)."""
    print("error:", " ".join(message.split()), file=sys.stderr)


if __name__ == "__main__":
    main()
