"""Routing analysis: statistics streamed over a routing trace, and an HTML/PNG/JSON report.

    from moelab.analyze import analyze
    analyze("path/to/model", "out/")     # traces out/trace, writes out/report.{html,json}, out/plots/

`analyze_trace(trace)` returns the numbers as a dict; `write_report(summary, out)` draws them.
"""

from moelab.analyze.report import write_report
from moelab.analyze.run import analyze
from moelab.analyze.stats import (
    analyze_trace,
    chunk_activity,
    entropy_of,
    imbalance,
    mutual_information,
    row_normalise,
    super_experts,
)

__all__ = [
    "analyze",
    "analyze_trace",
    "chunk_activity",
    "entropy_of",
    "imbalance",
    "mutual_information",
    "row_normalise",
    "super_experts",
    "write_report",
]
