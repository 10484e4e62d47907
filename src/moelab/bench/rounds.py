"""The arithmetic of a benchmark timed in rounds: every implementation once per round, in a
shuffled order, so that each round's timings were taken minutes apart at most. A shared machine's
speed drifts between rounds (by +-25 % here), so a ratio is taken within each round and the
median of those is reported; the ratio of two medians would mix rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def speedup(baseline: Sequence[float], times: Sequence[float]) -> float:
    """How many times faster than `baseline` the runs of `times` were: the median over rounds of
    baseline[r] / times[r] (seconds, one of each per round)."""
    if len(baseline) != len(times) or not times:
        raise ValueError(f"need one time of each per round, got {len(baseline)} and {len(times)}")
    return statistics.median(b / t for b, t in zip(baseline, times))


def bound_tokens_per_s(bandwidth_gb_s: float, bytes_per_token: float) -> float:
    """The tokens/s that reading `bytes_per_token` at `bandwidth_gb_s` allows."""
    return bandwidth_gb_s * 1e9 / bytes_per_token


def fraction_of_bound(tokens: int, times: Sequence[float], bounds: Sequence[float]) -> float:
    """The median over rounds of the speed reached (tokens / times[r]) over that round's bound
    (`bound_tokens_per_s` at the bandwidth measured in the round)."""
    if len(times) != len(bounds) or not times:
        raise ValueError(f"need one time and one bound per round, got {len(times)} and {len(bounds)}")
    return statistics.median(tokens / t / b for t, b in zip(times, bounds))
