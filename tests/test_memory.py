"""moelab.memory: garbage is collected and glibc's malloc_trim(0) is called when there is one;
no C library (or one without malloc_trim) leaves the call a no-op; `keep_freed_memory` sets
glibc's mmap count and trim threshold, and a large block freed and asked for again then comes
without page faults (in a process of its own); `available_memory` is the kernel's MemAvailable,
or a cgroup's (container, batch job) room where that is less, read from stand-in /proc and /sys
trees."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
import subprocess
import sys
import weakref

import pytest

from moelab import memory
from moelab.memory import keep_freed_memory  # conftest replaces the module's attribute in every test


@pytest.fixture
def fresh_libc():
    """`_libc` is cached: look the library up again in the test, and again after it."""
    memory._libc.cache_clear()
    yield
    memory._libc.cache_clear()


class _Node:
    pass


def test_release_freed_memory_collects_reference_cycles():
    """A cycle is only freed by the cycle collector; automatic collection is off here."""
    node = _Node()
    node.self = node
    ref = weakref.ref(node)
    del node
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert ref() is not None
        memory.release_freed_memory()
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


def test_release_freed_memory_trims_with_no_padding(monkeypatch):
    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(memory, "_libc", Libc)
    memory.release_freed_memory()
    assert calls == [0]
    monkeypatch.setattr(memory, "_libc", lambda: None)
    memory.release_freed_memory()  # no C library: nothing to call, no error
    assert calls == [0]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_libc_is_glibc_with_malloc_trim(fresh_libc):
    libc = memory._libc()
    assert libc is not None and hasattr(libc, "malloc_trim")
    memory.release_freed_memory()


def test_libc_without_malloc_trim_or_unloadable_is_none(monkeypatch, fresh_libc):
    class Musl:  # a C library that has no malloc_trim
        def __init__(self, name):
            self.name = name

    def unloadable(name):
        raise OSError(f"cannot load {name}")

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert memory._libc() is None
    memory._libc.cache_clear()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so")
    monkeypatch.setattr(ctypes, "CDLL", Musl)
    assert memory._libc() is None
    memory._libc.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", unloadable)
    assert memory._libc() is None


def test_keep_freed_memory_maps_no_block_alone_and_trims_only_beyond_2_gb(monkeypatch):
    calls = []

    class Libc:
        def __init__(self, result=1):
            self.result = result

        def mallopt(self, param, value):
            calls.append((param, value))
            return self.result

    monkeypatch.setattr(memory, "_libc", Libc)
    assert keep_freed_memory() is True
    assert calls == [(memory.M_MMAP_MAX, 0), (memory.M_TRIM_THRESHOLD, 2**31 - 1)] and memory.M_MMAP_MAX == -4
    monkeypatch.setattr(memory, "_libc", lambda: Libc(result=0))  # glibc refused a value
    assert keep_freed_memory() is False and len(calls) == 4
    monkeypatch.setattr(memory, "_libc", lambda: type("NoMallopt", (), {})())
    assert keep_freed_memory() is False
    monkeypatch.setattr(memory, "_libc", lambda: None)
    assert keep_freed_memory() is False


# Page faults of allocating, filling and freeing a 64 MB tensor, the fewest of 5 times after 10, before
# and after keep_freed_memory (a fresh process: the setting is process-wide). A block torch asks for
# (posix_memalign) is a little larger than one it freed, so the heap grows until two freed blocks
# have merged: then the next one comes from them.
_FAULTS = """
import resource, torch
from moelab.memory import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def steady():
    return min([faults() for _ in range(15)][10:])

plain = steady()
assert keep_freed_memory()
print(plain, steady())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's parameters are glibc's")
def test_a_freed_block_comes_back_without_page_faults_once_memory_is_kept():
    plain, kept = map(int, subprocess.run([sys.executable, "-c", _FAULTS], check=True, capture_output=True,
                                          text=True).stdout.split())  # fmt: skip
    # glibc maps a 64 MB block afresh each time: 16,384 pages of 4 KB (fewer with huge pages)
    assert kept < 100 and plain > 10 * max(kept, 1), (plain, kept)


GIB = 2**30


def _tree(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_memavailable_alone_or_a_cgroups_room_where_it_is_smaller(tmp_path):
    meminfo = {"proc/meminfo": f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable: {48 * GIB // 1024} kB\n"}
    assert memory.available_memory(_tree(tmp_path / "host", meminfo)) == 48 * GIB
    v2 = {"sys/fs/cgroup/memory.max": f"{8 * GIB}\n", "sys/fs/cgroup/memory.current": f"{3 * GIB}\n",
          "sys/fs/cgroup/memory.stat": f"anon {2 * GIB}\ninactive_file {1 * GIB}\n"}  # fmt: skip
    assert memory.available_memory(_tree(tmp_path / "v2", meminfo | v2)) == 6 * GIB  # 8 - (3 - 1): file pages reclaim
    unlimited = v2 | {"sys/fs/cgroup/memory.max": "max\n"}
    assert memory.available_memory(_tree(tmp_path / "max", meminfo | unlimited)) == 48 * GIB
    v1 = {"sys/fs/cgroup/memory/memory.limit_in_bytes": f"{4 * GIB}\n",
          "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{5 * GIB}\n",
          "sys/fs/cgroup/memory/memory.stat": "total_inactive_file 0\n"}  # fmt: skip
    assert memory.available_memory(_tree(tmp_path / "v1", meminfo | v1)) == 0  # over its limit already
    assert memory.available_memory(_tree(tmp_path / "only", v2)) == 6 * GIB and memory.available_memory(tmp_path / "none") is None
