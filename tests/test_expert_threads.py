"""Experts side by side on CPU threads (`moelab.nn.expert_threads`): the same numbers as one
expert after another, forward and backward, against the per-row reference; workers keep one
intra-op thread; grad and inference mode follow the caller; errors reach the caller."""

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close
from test_experts import _check, _experts

import moelab.nn.grouped as grouped
from moelab.nn import expert_threads
from moelab.nn.expert_threads import assign, expert_workers, for_each_expert, serial

# experts 1 and 4 get no rows; none has more than half of them, so 2 workers run the step
COUNTS = (3, 0, 4, 2, 0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threaded(monkeypatch, two_threads):
    """Every step of the tests' small sizes runs on 2 workers; returns the worker counts used."""
    monkeypatch.setattr(expert_threads, "MIN_ROWS", 0)
    used = []

    def spy(fn, counts, workers):
        used.append(workers)
        threads, started = set(), set()
        together = threading.Barrier(workers, timeout=30)  # broken unless every worker waits at once

        def recorded(e, w):
            threads.add(threading.get_ident())
            if w not in started:
                started.add(w)
                together.wait()
            fn(e, w)

        for_each_expert(recorded, counts, workers)
        assert len(threads) == workers, f"{workers} workers asked for, {len(threads)} threads ran"
        if workers > 1:
            assert threading.get_ident() not in threads

    monkeypatch.setattr(grouped, "for_each_expert", spy)
    return used


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu", "relu2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("row_weights", [False, True])
def test_threaded_experts_match_reference(threaded, kind, bias, row_weights):
    _check(_experts(kind, bias, "grouped"), kind, COUNTS, row_weights=row_weights)
    assert threaded == [2, 2], "forward and backward must both have run on 2 workers"


@pytest.mark.parametrize(
    ("counts", "workers"), [((0, 0, 10, 0, 0), 1), ((1, 1, 1, 1, 1), 2), ((9, 1, 0, 0, 1), 1), ((5, 1, 0, 4, 0), 2)]
)
def test_threaded_skewed_counts(threaded, counts, workers):
    """One expert with more than half of the rows keeps the step on the caller's thread."""
    _check(_experts("swiglu", True, "grouped"), "swiglu", counts, row_weights=True)
    assert threaded == [workers] * 2


def test_serial_keeps_forward_and_backward_on_the_callers_thread(threaded):
    """`serial()` (the benchmark's baseline) around the forward only: the backward, run after the
    block, follows the forward's choice."""
    m = _experts("swiglu", False, "grouped")
    xs = torch.randn(sum(COUNTS), 16, requires_grad=True)
    with serial():
        ys = m(xs, list(COUNTS), None)
    ys.sum().backward()
    assert threaded == [1, 1]
    m(xs, list(COUNTS), None).sum().backward()
    assert threaded == [1, 1, 2, 2]


def test_threaded_equals_sequential_and_repeats_exactly(monkeypatch, threaded):
    """Each expert's numbers come from the same operations on either path: workers change who
    computes an expert, not how, so two threaded runs agree bit for bit and match one thread."""
    runs = {}
    for name, min_rows in (("sequential", 10**9), ("threaded", 0), ("threaded again", 0)):
        monkeypatch.setattr(expert_threads, "MIN_ROWS", min_rows)
        runs[name] = _check(_experts("swiglu", True, "grouped"), "swiglu", COUNTS, row_weights=True)
    assert threaded == [1, 1, 2, 2, 2, 2]
    ys, grad_xs, grads = runs["threaded"]
    again_ys, again_grad_xs, again_grads = runs["threaded again"]
    assert torch.equal(ys, again_ys) and torch.equal(grad_xs, again_grad_xs)
    assert all(torch.equal(g, again_grads[name]) for name, g in grads.items())
    torch.testing.assert_close(ys, runs["sequential"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_xs, runs["sequential"][1], atol=1e-6, rtol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, runs["sequential"][2][name], atol=1e-6, rtol=1e-6)


def test_threaded_inference_path_matches_training_forward(threaded):
    """`MoELayer.infer` (`accumulated_mlp`, one output buffer per worker) against the training
    forward, on a layer with 64 experts."""
    from moelab.nn import MoEConfig, build_moe

    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=32, num_experts=64, top_k=8, hidden_dim=16))
    layer.small_expert_work = layer.every_expert_work = -1  # expert by expert: neither shortcut
    x = torch.randn(96, 32)
    with torch.no_grad():
        expected = layer(x)[0]
    threaded.clear()
    with torch.inference_mode():
        got = layer.infer(x)
    assert threaded == [2]
    assert_close(got, expected, 1e-5, 1e-5, "infer")


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40), st.integers(1, 4))
def test_assign_deals_every_busy_expert_once(counts, workers):
    groups = assign(counts, workers)
    assert len(groups) == workers
    dealt = sorted(e for g in groups for e in g)
    assert dealt == [e for e, n in enumerate(counts) if n]
    assert all(g == sorted(g) for g in groups)
    loads = [sum(counts[e] for e in g) for g in groups]
    # largest first to the least loaded: no worker ends more than one expert above the mean
    assert max(loads) <= sum(counts) / workers + max(counts)
    assert assign(counts, workers) == groups


def test_expert_workers_decides_by_size_balance_and_device(monkeypatch, two_threads):
    monkeypatch.setattr(expert_threads, "MIN_ROWS", 100)
    cpu = torch.device("cpu")
    assert expert_workers([50, 50, 0], cpu) == 2
    assert expert_workers([40, 30, 0], cpu) == 1  # fewer rows than MIN_ROWS
    assert expert_workers([200, 0, 0], cpu) == 1  # fewer experts with rows than threads
    assert expert_workers([3900, 100, 48, 48], cpu) == 1  # one expert would hold a worker for most of the step
    assert expert_workers([60, 50, 0], torch.device("cuda")) == 1
    torch.set_num_threads(1)
    assert expert_workers([50, 50, 0], cpu) == 1


@pytest.mark.parametrize(
    "context",
    [
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        lambda: __import__("torch.utils.flop_counter").utils.flop_counter.FlopCounterMode(display=False),
        lambda: torch.device("cpu"),  # a torch-function mode
        lambda: torch.profiler.profile(),
        serial,
    ],
    ids=["autocast", "flop-counter", "device-context", "profiler", "serial"],
)
def test_thread_local_state_keeps_the_callers_thread(monkeypatch, two_threads, context):
    """State the workers would not see (each of these is per thread in torch) would change what
    the step computes or records: measured, FlopCounterMode counted 393,216 FLOPs of 5,111,808
    and the profiler 1 of 17 matmuls when the experts ran on workers."""
    monkeypatch.setattr(expert_threads, "MIN_ROWS", 0)
    with context():
        assert expert_workers([50, 50], torch.device("cpu")) == 1
    assert expert_workers([50, 50], torch.device("cpu")) == 2


def test_vmap_and_jit_trace_keep_the_callers_thread(monkeypatch, two_threads):
    monkeypatch.setattr(expert_threads, "MIN_ROWS", 0)
    seen = []
    probe = lambda x: seen.append(expert_workers([50, 50], torch.device("cpu"))) or x * 2  # noqa: E731
    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.jit.trace(probe, torch.ones(2), check_trace=False)
    assert seen and set(seen) == {1}


def test_serial_is_per_thread(monkeypatch, two_threads):
    monkeypatch.setattr(expert_threads, "MIN_ROWS", 0)
    other = []
    with serial():
        thread = threading.Thread(target=lambda: other.append(serial_depth()))
        thread.start()
        thread.join()
        assert serial_depth() == 1
    assert other == [0] and serial_depth() == 0


def serial_depth() -> int:
    return getattr(expert_threads._local, "serial", 0)


def test_workers_run_at_the_same_time():
    both = threading.Barrier(2, timeout=30)  # broken, and the call raises, unless both wait at once
    for_each_expert(lambda e, w: both.wait(), [1, 1], 2)


def _fresh_pool(monkeypatch):
    """Make the next call start a new pool (restored, and the new one shut down, afterwards)."""
    for name in ("_pool", "_pool_size"):
        monkeypatch.setattr(expert_threads, name, getattr(expert_threads, name))
    expert_threads._pool, expert_threads._pool_size = None, 0


def test_workers_stay_single_threaded_and_the_caller_keeps_its_count(monkeypatch, two_threads):
    """torch sets a new thread's intra-op count from the process-wide one at its first parallel
    operation; a worker that picked up 2 there would start OpenMP teams of its own, after which
    libgomp stops spinning between the caller's operations (measured: the caller's small
    operations 2.8x slower for the rest of the process)."""
    _fresh_pool(monkeypatch)
    seen = []

    def fn(e, w):
        torch.randn(200_000).sin_()  # a parallel operation: the thread's first
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    try:
        for_each_expert(fn, [1, 1, 1, 1], 2)
        assert torch.get_num_threads() == 2
        assert len(seen) == 4
        assert all(name.startswith("moelab-experts") and n == 1 for name, n in seen), seen
    finally:
        expert_threads._pool.shutdown()


def _names_in_child(queue) -> None:
    names, together = set(), threading.Barrier(2, timeout=30)

    def fn(e, w):
        names.add(threading.current_thread().name)
        together.wait()

    for_each_expert(fn, [1, 1], 2)
    queue.put(sorted(names))


def test_a_forked_child_starts_its_own_pool(two_threads):
    """A child made by fork (a DataLoader worker) inherits the pool object without its threads;
    submitting to it would wait forever."""
    import multiprocessing

    for_each_expert(lambda e, w: None, [1, 1], 2)  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_names_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's pool")
    assert child.exitcode == 0
    names = queue.get(timeout=5)
    assert len(names) == 2 and all(n.startswith("moelab-experts") for n in names)


@pytest.mark.parametrize("process_wide", [1, 3])
def test_starting_the_pool_keeps_the_process_wide_thread_count(monkeypatch, two_threads, process_wide):
    """The count a new thread starts with (set by whoever called torch.set_num_threads last)
    is the same after the pool started as before; the caller keeps its own."""
    _fresh_pool(monkeypatch)
    in_new_thread = expert_threads._in_new_thread
    in_new_thread(lambda: torch.set_num_threads(process_wide))  # this thread keeps 2
    try:
        for_each_expert(lambda e, w: None, [1, 1], 2)
        assert torch.get_num_threads() == 2
        assert in_new_thread(torch.get_num_threads) == process_wide
    finally:
        expert_threads._pool.shutdown()
        torch.set_num_threads(2)


def test_no_new_threads_at_exit_runs_everything_on_the_callers_thread(monkeypatch):
    """At interpreter exit (an atexit handler) a pool takes no new work: the step still runs."""
    _fresh_pool(monkeypatch)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(expert_threads.ThreadPoolExecutor, "submit", refuse)
    ran = []
    for_each_expert(lambda e, w: ran.append((e, threading.get_ident())), [3, 1, 1, 1], 2)
    assert sorted(e for e, _ in ran) == [0, 1, 2, 3]
    assert {t for _, t in ran} == {threading.get_ident()}


def test_grad_and_inference_mode_follow_the_caller():
    w = torch.ones(3, requires_grad=True)
    outputs = {}

    def fn(e, worker):
        outputs[e] = w * e

    with torch.no_grad():
        for_each_expert(fn, [1, 1], 2)
    assert not any(t.requires_grad for t in outputs.values())
    for_each_expert(fn, [1, 1], 2)
    assert all(t.requires_grad for t in outputs.values())
    with torch.inference_mode():
        buffer = torch.zeros(2)

        def write(e, worker):  # an in-place write into an inference tensor needs inference mode
            buffer[e] = e + 1

        for_each_expert(write, [1, 1], 2)
    assert buffer.tolist() == [1.0, 2.0]


def test_an_error_in_a_worker_reaches_the_caller_after_every_worker_stopped():
    done = []

    def fn(e, worker):
        if e == 0:
            raise RuntimeError("expert 0 failed")
        done.append(e)

    with pytest.raises(RuntimeError, match="expert 0 failed"):
        for_each_expert(fn, [5, 1, 1, 1], 2)  # expert 0 alone on worker 0; 1-3 on worker 1
    assert sorted(done) == [1, 2, 3]


def test_a_compiled_step_keeps_the_callers_thread(monkeypatch, two_threads):
    monkeypatch.setattr(expert_threads, "MIN_ROWS", 0)
    cpu = torch.device("cpu")
    compiled = torch.compile(lambda x: x * expert_workers([50, 50], cpu), backend="eager", fullgraph=True)
    assert compiled(torch.ones(2)).tolist() == [1.0, 1.0]
    assert expert_workers([50, 50], cpu) == 2


def test_assign_breaks_ties_to_the_lower_worker_and_the_lower_expert():
    """Equal counts: experts in index order, each to the least-loaded worker, ties to the lower one."""
    assert assign([5, 5, 5], 2) == [[0, 2], [1]]
    assert assign([2, 7, 2, 0], 3) == [[1], [0], [2]]


def test_a_larger_step_grows_the_pool(monkeypatch):
    """A pool started for 2 workers is replaced by one of 3 when a step asks for 3 (else the third
    worker's experts would queue behind the others)."""
    _fresh_pool(monkeypatch)
    try:
        for_each_expert(lambda e, w: None, [1, 1], 2)
        assert expert_threads._pool_size == 2
        for_each_expert(lambda e, w: None, [1, 1, 1], 3)
        assert expert_threads._pool_size == 3 and expert_threads._pool._max_workers == 3
        for_each_expert(lambda e, w: None, [1, 1], 2)  # a smaller step keeps the larger pool
        assert expert_threads._pool_size == 3
    finally:
        expert_threads._pool.shutdown()
