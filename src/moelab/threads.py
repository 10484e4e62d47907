"""Intra-op threads that match the cores actually free.

On a busy machine, an operation split over more threads than there are free cores waits at
every barrier for whichever thread the OS has descheduled. The grouped expert kernel runs many
small operations per step, so it suffered most: on the project's 2-core machine, with one busy
process beside it, the e64k8 layer's forward+backward ran 3x faster on 1 thread than on 2
(`docs/benchmarks.md`). It now runs its experts on single-threaded workers
(`moelab.nn.expert_threads`), which removes most of that; every other operation still splits.
`free_cores` counts the cores no other process is using right now.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_cores(samples: int = 5, interval: float = 0.01, loadavg: str = "/proc/loadavg") -> int:
    """Available cores minus the other runnable tasks (the kernel's running count in
    /proc/loadavg, the least of `samples` readings `interval` s apart, less the reading thread
    itself), at least 1. Without /proc/loadavg: every available core."""
    cores = available_cores()
    try:
        running = []
        for i in range(samples):
            if i:
                time.sleep(interval)
            with open(loadavg) as f:
                running.append(int(f.read().split()[3].split("/")[0]))
    except (OSError, ValueError, IndexError):
        return cores
    return max(1, min(cores, cores - (min(running) - 1)))


def resumed_threads(recorded: int | None, results: str, quiet: bool = False) -> int | None:
    """The intra-op thread count a resumed run goes on with, or None to keep torch's: `recorded`,
    the count its first part ran on (a matmul's sums depend on it: another count, as "auto" may
    resolve on a busier or idler machine, gives other `results` than an uninterrupted run's,
    bit for bit), where torch's count now differs. None where nothing was recorded (a run of an
    older moelab), or where this machine has fewer cores than `recorded`: more threads than cores
    would slow every step several times, so a warning says the results will differ."""
    now = torch.get_num_threads()
    if recorded is None or recorded == now:
        return None
    if recorded > available_cores():
        warnings.warn(
            f"the run ran on {recorded} intra-op threads and this machine has {available_cores()} cores: it "
            f"goes on with {now}, so its {results} will differ from an uninterrupted run's (bit for bit)",
            stacklevel=3,
        )
        return None
    if not quiet:
        print(f"resuming on {recorded} intra-op threads, as the run ran (not {now}): its {results} then match an "
              "uninterrupted run's", file=sys.stderr)  # fmt: skip
    return recorded


def check_threads(threads: int | str | None) -> None:
    """A thread setting is an integer >= 1, "auto" (the free cores) or None (torch's default)."""
    if threads is None or threads == "auto":
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1 or 'auto' (the free cores), got {threads!r}")


def resolve_threads(threads: int | str | None) -> int | None:
    """A thread setting -> the count to use: an int as is, "auto" the free cores now, None None."""
    check_threads(threads)
    return free_cores() if threads == "auto" else threads


@contextmanager
def intra_op_threads(threads: int | str | None) -> Iterator[int]:
    """Run the block on `threads` intra-op threads (`resolve_threads`; None: torch's count as it
    is), then put torch's count back; yields the count in use."""
    previous = torch.get_num_threads()
    count = resolve_threads(threads)
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
