"""Giving freed memory back to the operating system between the layers of a long job.

glibc keeps freed blocks below its (growing) mmap threshold in the process's heap, so a job that
reads one layer after another (calibration, the checkpoint writer) would see its resident memory
creep up by the fragments of every layer; `release_freed_memory` returns them
(`malloc_trim`). Elsewhere (other C libraries, other systems) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


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
