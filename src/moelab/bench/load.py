"""`--load N`: busy processes beside a benchmark, because users' machines are rarely idle."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

# spins; every few million iterations (~0.1 s) it checks that the benchmark that started it is
# still its parent, so that none outlives a benchmark killed outright (SIGKILL skips `finally`)
_SPIN = """
import os, sys
while os.getppid() == int(sys.argv[1]):  # the benchmark's pid
    for _ in range(2_000_000):
        pass
"""


@contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen]]:
    """Run n busy loops (one fresh Python process each, one core each) for the duration of the
    block (yields them, spinning); they are terminated when it ends, however it ends, and end by
    themselves within a fraction of a second if the benchmark is killed outright."""
    if n < 0:
        raise ValueError(f"the number of busy processes must be >= 0, got {n}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):  # inside the try: one that fails to start (or Ctrl-C) ends those started before it
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid())]))
        if procs:
            time.sleep(0.5)  # past the interpreters' start-up: spinning when the block begins
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
