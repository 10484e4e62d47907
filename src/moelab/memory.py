"""Giving freed memory back to the operating system between the layers of a long job, and
asking how much it has.

glibc keeps freed blocks below its (growing) mmap threshold in the process's heap, so a job that
reads one layer after another (calibration, the checkpoint writer) would see its resident memory
creep up by the fragments of every layer; `release_freed_memory` returns them
(`malloc_trim`). Elsewhere (other C libraries, other systems) it does nothing.
`available_memory` is what the kernel says a new allocation can take (Linux's MemAvailable).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache
from pathlib import Path


@cache
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc only)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def available_memory() -> int | None:
    """Bytes the kernel reports available for new allocations without swapping (Linux's
    MemAvailable); None where it does not say."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)
