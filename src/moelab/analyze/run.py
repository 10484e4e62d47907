"""`analyze`: trace a model (or reuse a trace) and write the report: what `moelab analyze` runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from moelab.analyze.report import write_report
from moelab.analyze.stats import analyze_trace
from moelab.io import StagedOutput, is_output
from moelab.models.reference import model_dir
from moelab.trace import TraceOptions, is_trace, open_trace, trace_from_files

DEFAULT_CHUNK_LENS = (1, 8, 64)
KIND = "routing analysis"


def analyze(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    data: str | os.PathLike = "corpus",
    split: str = "validation",
    domains: Sequence[str] | None = None,
    options: TraceOptions | None = None,
    chunk_lens: Sequence[int] = DEFAULT_CHUNK_LENS,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Trace `model` (default: the shipped reference model) on `data` into out/trace, or read
    `model` as an existing trace directory, then write out/report.html, out/report.json and
    out/plots/*.png. An existing analysis in `out` is replaced only with `overwrite`. Returns
    the HTML path. `model` may be a shipped model's name."""
    if any(L < 1 for L in chunk_lens):
        raise ValueError(f"chunk lengths must be >= 1, got {list(chunk_lens)}")
    model = model_dir(model)  # the directory the output must stay out of, the default's too
    from_trace = is_trace(model)
    if not from_trace and is_output(model, KIND):
        trace = Path(model) / "trace"
        again = f"analyse its trace again with `{trace}`" if is_trace(trace) else "give the model or trace it was made from"
        raise ValueError(f"{model} is an analysis, not a model or a trace; {again}")
    reads_data = data != "corpus" or split != "validation" or domains or options not in (None, TraceOptions())
    if from_trace and reads_data:
        raise ValueError(
            f"{model} is a trace: it is analysed as it was recorded, so the data options (--data, --split, "
            "--domain, --max-tokens, --seq-len, --batch-size) do not apply; drop them, or give the model"
        )
    inputs = [model, data if data != "corpus" else None]
    with StagedOutput(out, KIND, inputs=inputs, overwrite=overwrite) as staging:  # the old one stays till then
        if from_trace:
            trace = open_trace(model)
        else:
            trace = trace_from_files(
                model, staging / "trace", data=data, split=split, domains=domains, options=options, quiet=quiet
            )
        html = write_report(analyze_trace(trace, chunk_lens=chunk_lens), staging)
    return Path(out).resolve() / html.name
