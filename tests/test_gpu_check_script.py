"""benchmarks/gpu_check.py runs only on a GPU, lent rarely and for minutes: what can fail before one
is lent is checked here (its arguments, its sections, every moelab name it imports)."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_every_moelab_name_it_imports_exists():
    """The imports inside its functions too (they run only on the GPU, minutes in)."""
    imports = [node for node in ast.walk(ast.parse(SCRIPT.read_text())) if isinstance(node, ast.ImportFrom)]
    names = [(node.module, alias.name) for node in imports if node.module.startswith("moelab") for alias in node.names]
    assert len(names) > 10
    missing = [f"{module}.{name}" for module, name in names if not hasattr(importlib.import_module(module), name)]
    assert not missing


def test_unknown_section_is_refused_before_cuda_is_asked_for():
    result = subprocess.run([sys.executable, str(SCRIPT), "--only", "layer", "no_such_section"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "unknown section(s) no_such_section" in result.stderr and "torchrun_nccl" in result.stderr
