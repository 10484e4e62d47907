"""`--load N`: busy processes beside a benchmark, because users' machines are rarely idle."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen]]:
    """Run n busy loops (`while True: pass`, one fresh Python process each, one core each) for
    the duration of the block (yields them); they are terminated when it ends, however it ends."""
    if n < 0:
        raise ValueError(f"the number of busy processes must be >= 0, got {n}")
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
