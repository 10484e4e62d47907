"""Experts side by side on CPU threads (`moelab.nn.expert_threads`): the same numbers as one
expert after another, forward and backward, against the per-row reference; workers keep one
intra-op thread; grad and inference mode follow the caller; errors reach the caller."""

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close
from test_experts import COUNTS, _check, _experts

import moelab.nn.grouped as grouped
from moelab.nn import expert_threads
from moelab.nn.expert_threads import assign, expert_workers, for_each_expert, serial


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
        return for_each_expert(fn, counts, workers)

    monkeypatch.setattr(grouped, "for_each_expert", spy)
    return used


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("row_weights", [False, True])
def test_threaded_experts_match_reference(threaded, kind, bias, row_weights):
    _check(_experts(kind, bias, "grouped"), kind, COUNTS, row_weights=row_weights)
    assert threaded == [2, 2], "forward and backward must both have run on 2 workers"


@pytest.mark.parametrize("counts", [(0, 0, 10, 0, 0), (1, 1, 1, 1, 1), (9, 1, 0, 0, 1), (7, 0, 0, 0, 0)])
def test_threaded_skewed_counts(threaded, counts):
    _check(_experts("swiglu", True, "grouped"), "swiglu", counts, row_weights=True)
    busy = sum(1 for n in counts if n)
    assert threaded == [min(2, busy)] * 2


def test_serial_keeps_forward_and_backward_on_the_callers_thread(threaded):
    """`serial()` (the benchmark's baseline) around the forward only: the backward, run after the
    block, follows the forward's choice."""
    m = _experts("swiglu", False, "grouped")
    xs = torch.randn(10, 16, requires_grad=True)
    with serial():
        ys = m(xs, [3, 0, 6, 1, 0], None)
    ys.sum().backward()
    assert threaded == [1, 1]
    m(xs, [3, 0, 6, 1, 0], None).sum().backward()
    assert threaded == [1, 1, 2, 2]


def test_threaded_equals_sequential_and_repeats_exactly(monkeypatch, two_threads):
    """Each expert's numbers come from the same operations on either path: workers change who
    computes an expert, not how, so two threaded runs agree bit for bit and match one thread."""
    runs = {}
    for name, min_rows in (("sequential", 10**9), ("threaded", 0), ("threaded again", 0)):
        monkeypatch.setattr(expert_threads, "MIN_ROWS", min_rows)
        runs[name] = _check(_experts("swiglu", True, "grouped"), "swiglu", COUNTS, row_weights=True)
    for a, b in zip(runs["threaded"], runs["threaded again"]):
        for x, y in zip(*(t.values() if isinstance(t, dict) else [t] for t in (a, b))):
            assert torch.equal(x, y)
    ys, grad_xs, grads = runs["threaded"]
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
    x = torch.randn(96, 32)
    with torch.no_grad():
        expected = layer(x)[0]
    with torch.inference_mode():
        got = layer.infer(x)
    assert 2 in threaded
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


def test_expert_workers_decides_by_size_device_and_mode(monkeypatch, two_threads):
    monkeypatch.setattr(expert_threads, "MIN_ROWS", 100)
    cpu = torch.device("cpu")
    assert expert_workers([60, 50, 0], cpu) == 2
    assert expert_workers([60, 30, 0], cpu) == 1  # fewer rows than MIN_ROWS
    assert expert_workers([200, 0, 0], cpu) == 1  # one expert has every row
    assert expert_workers([60, 50, 0], torch.device("cuda")) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert expert_workers([60, 50, 0], cpu) == 1
    torch.set_num_threads(1)
    assert expert_workers([60, 50, 0], cpu) == 1


def _fresh_pool(monkeypatch):
    """Make the next call start a new pool (restored, and the new one shut down, afterwards)."""
    for name in ("_pool", "_pool_size", "_pool_pid"):
        monkeypatch.setattr(expert_threads, name, getattr(expert_threads, name))
    expert_threads._pool = None


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


def test_a_forked_child_starts_its_own_pool(monkeypatch):
    """A child made by fork inherits the pool object without its threads; using it would hang."""
    _fresh_pool(monkeypatch)
    first = expert_threads._start_pool(2)
    monkeypatch.setattr(expert_threads, "_pool_pid", -1)  # as seen from a child
    try:
        second = expert_threads._start_pool(2)
        assert second is not first
        assert first.submit(lambda: 1).result() == 1, "the parent's pool is not the child's to shut down"
    finally:
        first.shutdown()
        second.shutdown()


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
