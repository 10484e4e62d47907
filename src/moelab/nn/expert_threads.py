"""Experts side by side on CPU threads, one intra-op thread each.

An expert step is many small operations (per expert: two to six GEMMs of a few hundred rows and
a handful of element-wise ones), each split over torch's intra-op threads and ending at a
barrier. On an idle 2-core machine that costs 5-13 % of a 64-expert layer's training step;
when another process holds a core, every barrier waits for the thread the OS has descheduled
and a step runs up to 10x slower. Running different experts on different threads, each
single-threaded, leaves one barrier per step (`docs/benchmarks.md`, "Experts on threads").

`for_each_expert(fn, counts, workers)` calls fn(e, worker) for every expert with rows, spread
over `expert_workers(counts, device)` threads: torch's intra-op thread count (which
`--threads auto` matches to the free cores) for steps of at least MIN_ROWS rows on a CPU.
Experts are dealt to workers by row count, largest first, so what each worker computes
depends only on the counts and the thread count, never on timing. fn must write only its own
expert's outputs (or a buffer of its own worker's).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

# Below this many routed rows (256 tokens at top-8) handing experts to threads costs more than
# it saves on an idle machine (`docs/benchmarks.md`).
MIN_ROWS = 2048

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # a forked child inherits the pool object but not its threads
_pool_lock = threading.Lock()
_serial = 0  # inside `serial()`


def _start_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` threads, each set to one intra-op thread. `torch.set_num_threads`
    also sets the count new threads start with, so the caller's count is put back once every
    worker has set its own."""
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_size < workers or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=True)
            caller_threads = torch.get_num_threads()
            started = threading.Barrier(workers + 1)

            def single_threaded() -> None:
                # torch sets a thread's count from the process-wide one at its first parallel
                # operation (get_num_threads counts as one): do that now, then set 1, or the
                # first operation here would undo it once the caller's count is put back.
                torch.get_num_threads()
                torch.set_num_threads(1)
                started.wait()

            _pool = ThreadPoolExecutor(workers, thread_name_prefix="moelab-experts")
            for _ in range(workers):  # every thread starts and sets its count before we go on
                _pool.submit(single_threaded)
            started.wait()
            torch.set_num_threads(caller_threads)
            _pool_size, _pool_pid = workers, os.getpid()
        return _pool


def assign(counts: Sequence[int], workers: int) -> list[list[int]]:
    """Experts with rows dealt to `workers` lists: largest first to the least-loaded worker
    (ties to the lower index), each list in expert order."""
    loads, groups = [0] * workers, [[] for _ in range(workers)]
    for e in sorted((e for e, n in enumerate(counts) if n), key=lambda e: (-counts[e], e)):
        w = min(range(workers), key=lambda w: (loads[w], w))
        loads[w] += counts[e]
        groups[w].append(e)
    return [sorted(g) for g in groups]


@contextmanager
def serial() -> Iterator[None]:
    """Inside this block, experts run one after another on the caller's thread (the benchmark's
    baseline; a step's backward follows its forward)."""
    global _serial
    _serial += 1
    try:
        yield
    finally:
        _serial -= 1


def expert_workers(counts: Sequence[int], device: torch.device) -> int:
    """How many threads to run the experts on: torch's intra-op thread count when the step is
    on a CPU, has at least MIN_ROWS rows and at least two experts with rows; otherwise 1
    (expert after expert on the caller's thread). Autocast (thread-local), tracing by
    torch.compile and `serial()` keep everything on the caller's thread."""
    busy = sum(1 for n in counts if n)
    if _serial or device.type != "cpu" or busy < 2 or sum(counts) < MIN_ROWS:
        return 1
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return 1
    return min(torch.get_num_threads(), busy)


def for_each_expert(fn: Callable[[int, int], None], counts: Sequence[int], workers: int) -> None:
    """fn(e, w) for every expert e with rows, on worker w < workers (workers = 1: in expert order
    on this thread). Grad and inference mode (thread-local) follow the caller's; once every
    worker has stopped, the exception of the lowest-numbered worker that raised is raised here."""
    if workers <= 1:
        for e, n in enumerate(counts):
            if n:
                fn(e, 0)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(w: int, experts: list[int]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for e in experts:
                fn(e, w)

    pool = _start_pool(workers)
    futures = [pool.submit(run, w, experts) for w, experts in enumerate(assign(counts, workers))]
    for future in futures:
        future.exception()  # wait for all before raising any
    for future in futures:
        future.result()
