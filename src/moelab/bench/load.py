"""`--load N`: busy processes beside a benchmark, because users' machines are rarely idle."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen]]:
    """Run n busy loops (`while True: pass`, one fresh Python process each, one core each) for
    the duration of the block (yields them, spinning); they are terminated when it ends, however
    it ends."""
    if n < 0:
        raise ValueError(f"the number of busy processes must be >= 0, got {n}")
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(0.5)  # past the interpreters' start-up: spinning when the block begins
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
