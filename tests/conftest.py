"""Shared test settings. `tests/reference.py` holds the naive reference the tests compare against.

Hypothesis profiles: "default" (random examples, no per-example deadline: the first call of a
torch op can be slow) and "ci" (derandomised, reproducible from run to run); pick one with
HYPOTHESIS_PROFILE=ci.

Without a GPU, Triton (where installed) runs its kernels in its interpreter
(`tests/test_triton_grouped.py`): Triton reads TRITON_INTERPRET as it is imported, so it is set
here, before any test module imports it.
"""

import gc
import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Tokenised corpus splits are cached under pytest's cache directory (.pytest_cache/d/moelab,
    kept from run to run), not in the user's ~/.cache/moelab: MOELAB_CACHE is set for the session
    (subprocesses inherit it) and removed again at its end. MOELAB_CACHE, where set, wins; without
    the cache plugin (-p no:cacheprovider) the default stays. OMP_NUM_THREADS is set to torch's
    count likewise, so that the commands' `--threads auto` (which reads the machine's load) computes
    alike in every run of a test.

    Under pytest-xdist (`make test` runs `-n auto`), each worker takes its share of torch's threads,
    so that the workers together use the cores once. COLUMNS is set to the width the CLI's console
    takes without a terminal (160): xdist's workers, or a terminal, would set another, and the tests
    of printed lines would wrap differently."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    os.environ["COLUMNS"] = "160"
    if "MOELAB_CACHE" not in os.environ and getattr(config, "cache", None) is not None:
        os.environ["MOELAB_CACHE"] = str(config.cache.mkdir("moelab"))
        config.add_cleanup(lambda: os.environ.pop("MOELAB_CACHE", None))
    if "OMP_NUM_THREADS" not in os.environ:  # the commands' --threads auto then keeps torch's count
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # (it would follow the machine's load)
        config.add_cleanup(lambda: os.environ.pop("OMP_NUM_THREADS", None))


# Cases of fixture-parametrised tests that run with the slow tests only (`make test-slow`): each a
# further family or variant of a case the default suite keeps, moved to keep that suite under 10 minutes
SLOW_CASES = frozenset(
    {
        "tests/test_mtp.py::test_a_calibration_killed_in_the_mtp_layer_resumes_to_the_same_files[glm4_moe]",
        "tests/test_mtp.py::test_a_calibration_killed_in_the_mtp_layer_resumes_to_the_same_files[qwen3_next]",
        "tests/test_mtp.py::test_drop_needs_no_mtp_calibration[qwen3_next]",
        "tests/test_nemotron_h.py::test_every_method_compresses_the_hybrid_stack_and_transformers_reloads_it"
        "[plain-original]",
    }
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Mark `SLOW_CASES` slow before `-m "not slow"` deselects by mark."""
    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """What collection imported (torch, transformers, the test modules: several hundred thousand
    objects) lives until the end: gc.freeze() keeps the cycle collector from walking it again on
    every collection. The code's own gc.collect() (`moelab.memory.release_freed_memory`, called
    between layers and after every checkpoint written) took about 0.3 s each in a test process,
    and a test of a written model called it several times. Objects made later are collected as
    before; the session's end unfreezes them (so that the interpreter's exit frees them)."""
    gc.collect()
    gc.freeze()
    session.config.add_cleanup(gc.unfreeze)


settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _freed_memory_released(monkeypatch):
    """`moelab train` and `moelab compare`, run in a test's own process, leave glibc's memory
    policy as it is: `moelab.memory.keep_freed_memory` is process-wide, and the tests after them
    (the writer's resident-memory bounds among them) would run with freed memory kept.
    tests/test_memory.py runs the real function in a process of its own."""
    monkeypatch.setattr("moelab.memory.keep_freed_memory", lambda: False)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: for tiny models extra threads only add synchronisation
    (several times slower on the project's 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
