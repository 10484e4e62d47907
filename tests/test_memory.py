"""moelab.memory: garbage is collected and glibc's malloc_trim(0) is called when there is one;
no C library (or one without malloc_trim) leaves the call a no-op; `available_memory` is the
kernel's MemAvailable, or a cgroup's (container, batch job) room where that is less, read from
stand-in /proc and /sys trees."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
import weakref

import pytest

from moelab import memory


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
