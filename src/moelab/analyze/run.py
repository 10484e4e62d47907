"""`analyze`: trace a model (or reuse a trace) and write the report: what `moelab analyze` runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from moelab.analyze.report import write_report
from moelab.analyze.stats import analyze_trace
from moelab.trace import TraceOptions, is_trace, open_trace, trace_from_files

DEFAULT_CHUNK_LENS = (1, 8, 64)


def analyze(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    data: str | os.PathLike = "corpus",
    split: str = "validation",
    domains: Sequence[str] | None = None,
    options: TraceOptions | None = None,
    chunk_lens: Sequence[int] = DEFAULT_CHUNK_LENS,
    quiet: bool = False,
) -> Path:
    """Trace `model` (default: the shipped reference model) on `data` into out/trace, or read
    `model` as an existing trace directory, then write out/report.html, out/report.json and
    out/plots/*.png. Returns the HTML path."""
    if any(L < 1 for L in chunk_lens):
        raise ValueError(f"chunk lengths must be >= 1, got {list(chunk_lens)}")
    out = Path(out)
    if model is not None and is_trace(model):
        trace = open_trace(model)
    else:
        trace = trace_from_files(
            model, out / "trace", data=data, split=split, domains=domains, options=options, quiet=quiet
        )
    return write_report(analyze_trace(trace, chunk_lens=chunk_lens), out)
