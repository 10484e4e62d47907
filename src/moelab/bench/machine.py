"""What a benchmark ran on, for its JSON: the device's name and the source's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from moelab.threads import available_cores


def device_name(device: str) -> str:
    """The GPU's name on CUDA; on a CPU its model name (from /proc/cpuinfo where there is one) and
    the cores this process may use."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {available_cores()} cores"


def openmp_env() -> dict[str, str]:
    """The OpenMP settings in the environment (GOMP_*, OMP_*, KMP_*): how long idle threads spin,
    which the `moelab` command sets (GOMP_SPINCOUNT, moelab/__init__.py), changes the timings."""
    return {k: v for k, v in os.environ.items() if k.startswith(("GOMP_", "OMP_", "KMP_"))}


def source_commit() -> str | None:
    """The git commit of moelab's source (with "+changes" if its files differ from it), or None
    where moelab is not run from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        subprocess.run(  # moelab's own checkout, not another repository moelab was installed inside
            ["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here, capture_output=True, timeout=10, check=True
        )
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")
