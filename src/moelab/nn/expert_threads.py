"""Experts side by side on CPU threads, one intra-op thread each.

An expert step is many small operations (per expert: two to six GEMMs of a few hundred rows and
a handful of element-wise ones), each split over torch's intra-op threads and ending at a
barrier. On an idle 2-core machine that costs 5-13 % of a 64-expert layer's training step;
when another process holds a core, every barrier waits for the thread the OS has descheduled
(measured: that layer's step at 1,024 tokens 16x slower than idle). Running different experts
on different threads, each single-threaded, leaves one barrier per step (`docs/benchmarks.md`,
"Experts on threads").

`for_each_expert(fn, counts, workers)` calls fn(e, worker) for every expert with rows, spread
over `expert_workers(counts, device)` threads: torch's intra-op thread count (which
`--threads auto` matches to the free cores) for balanced steps of at least MIN_ROWS rows on a
CPU; `serial()` keeps a block on the caller's thread. Experts are dealt to workers by row
count, largest first, so what each worker computes depends only on the counts and the thread
count, never on timing. fn must write only its own expert's outputs (or a buffer of its own
worker's).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

# Below this many routed rows (256 tokens at top-8) handing experts to threads costs more than
# it saves on an idle machine (`docs/benchmarks.md`).
MIN_ROWS = 2048

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_local = threading.local()  # .serial: depth of `serial()` blocks on this thread


def _reset_after_fork() -> None:
    """A forked child inherits the pool object (and maybe a held lock) but none of its threads."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _in_new_thread(fn: Callable[[], T]) -> T:
    """fn() on a fresh thread (one whose intra-op count comes from the process-wide one)."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def _start_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` threads, each set to one intra-op thread; call with _pool_lock held.

    torch gives a thread its intra-op count at its first parallel operation (get_num_threads
    counts as one), from a process-wide count that `torch.set_num_threads` also sets. Each
    worker makes that first call before setting 1 (a worker that set 1 first and later picked
    up 2 there would start OpenMP teams of its own, and libgomp, seeing more threads than cores,
    would stop spinning between the caller's operations: measured 2.8x slower). The
    process-wide count is then put back from a thread of its own, leaving the caller's as it is.
    """
    global _pool, _pool_size
    if _pool is not None and _pool_size >= workers:
        return _pool
    process_wide = _in_new_thread(torch.get_num_threads)
    started = threading.Barrier(workers + 1, timeout=60)

    def single_threaded() -> None:
        torch.get_num_threads()
        torch.set_num_threads(1)
        started.wait()

    pool = ThreadPoolExecutor(workers, thread_name_prefix="moelab-experts")
    try:
        for _ in range(workers):  # every thread starts and sets its count before we go on
            pool.submit(single_threaded)
        started.wait()
    except BaseException:
        started.abort()
        pool.shutdown(wait=False)
        raise
    finally:
        _in_new_thread(lambda: torch.set_num_threads(process_wide))
    if _pool is not None:
        _pool.shutdown(wait=False)  # its queued work still runs
    _pool, _pool_size = pool, workers
    return pool


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
    """Inside this block, this thread's steps run their experts one after another on it (the
    benchmark's baseline; a step's backward follows its forward)."""
    _local.serial = getattr(_local, "serial", 0) + 1
    try:
        yield
    finally:
        _local.serial -= 1


def _caller_state_reaches_workers() -> bool:
    """False where thread-local state the workers would not see changes what a step computes or
    records: autocast, jit tracing, functorch transforms (vmap, grad),
    torch-function or dispatch modes (FlopCounterMode, `with torch.device(...)`), the profiler."""
    return not (
        torch.is_autocast_enabled("cpu")
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._autograd._profiler_enabled()
    )


def expert_workers(counts: Sequence[int], device: torch.device) -> int:
    """How many threads to run the experts on: torch's intra-op thread count W when the step is
    on a CPU, has at least MIN_ROWS rows, at least W experts with rows and none with more than
    a W-th of them (one expert with most rows would run on one core); otherwise 1 (expert after
    expert on the caller's thread, on all its intra-op threads). Tracing by torch.compile,
    `serial()` and caller state the workers would not see (`_caller_state_reaches_workers`) also
    keep the caller's thread."""
    if torch.compiler.is_compiling():  # before any call Dynamo would break the graph on
        return 1
    workers, rows = torch.get_num_threads(), sum(counts)
    if workers < 2 or getattr(_local, "serial", 0) or device.type != "cpu" or rows < MIN_ROWS:
        return 1
    if sum(1 for n in counts if n) < workers or max(counts) * workers > rows:
        return 1
    return workers if _caller_state_reaches_workers() else 1


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

    groups = assign(counts, workers)
    futures: list[Future] = []
    with _pool_lock:  # a caller asking for a larger pool replaces it only between submissions
        try:
            pool = _start_pool(workers)
            futures = [pool.submit(run, w, experts) for w, experts in enumerate(groups)]
        except RuntimeError:  # no new threads at interpreter exit: the rest on this thread
            pass
    for w in range(len(futures), workers):
        run(w, groups[w])
    for future in futures:
        future.exception()  # wait for all before raising any
    for future in futures:
        future.result()
