"""Peak memory of `moelab dequantize` on a synthetic block-wise FP8 checkpoint, against the memory
of just starting it (importing torch and moelab's modules it uses), both the peak resident set of a
fresh process.

    python benchmarks/dequantize_memory.py                      # 8 weights of [4096, 16384]: 512 MiB FP8
    python benchmarks/dequantize_memory.py --weights 4 --rows 8192 --cols 8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

BLOCK = (128, 128)


def make_checkpoint(directory: Path, weights: int, rows: int, cols: int) -> int:
    """A one-shard FP8 checkpoint of `weights` float8 matrices with their block scales; its bytes."""
    directory.mkdir()
    tensors = {}
    for i in range(weights):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = (torch.randn(rows, cols) * 10).to(
            torch.float8_e4m3fn
        )
        tensors[f"model.layers.{i}.mlp.up_proj.weight_scale_inv"] = torch.rand(
            -(-rows // BLOCK[0]), -(-cols // BLOCK[1])
        )
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    quantization = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    (directory / "config.json").write_text(
        json.dumps({"model_type": "qwen3_moe", "quantization_config": quantization})
    )
    return (directory / "model.safetensors").stat().st_size


# runs `moelab *argv` in this fresh process and prints its peak resident set (VmHWM: the process's own,
# unlike getrusage's maxrss, which a child inherits from the parent it was forked from)
_LAUNCH = """
import sys
import moelab.hf.dequantize  # torch and what the command imports, also for the start-up figure
from moelab import cli
sys.argv = ["moelab", *sys.argv[1:]]
try:
    if len(sys.argv) > 1:
        cli.main()
except SystemExit as done:
    assert not done.code, done.code
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss_mib(argv: list[str]) -> tuple[float, float]:
    """(peak resident MiB, seconds) of a fresh process running `moelab *argv` (none: just starting)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCH, *argv], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=16384)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fp8"
        size = make_checkpoint(source, options.weights, options.rows, options.cols)
        startup, _ = peak_rss_mib([])
        peak, seconds = peak_rss_mib(["dequantize", str(source), "--out", str(Path(tmp) / "bf16"), "--quiet"])
        one = options.rows * options.cols * 2 / 2**20
        print(
            f"FP8 checkpoint {size / 2**20:.0f} MiB -> bf16 {2 * size / 2**20:.0f} MiB in {seconds:.1f} s; peak RSS "
            f"{peak:.0f} MiB, of which {startup:.0f} MiB starting the command; one bf16 weight is {one:.0f} MiB"
        )


if __name__ == "__main__":
    main()
