"""A bf16 checkpoint decoded in bf16 (what `generate`'s `dtype="auto"` picks on a CPU with a native
bf16 matmul) against the same checkpoint in fp32 (what it decoded in before): greedy batch-1
decoding in memory and offloaded (the pool then holds its experts in bf16, half the bytes), A/B in
one process with rounds interleaved; the ratio is the median of the per-round ratios.

    python benchmarks/bf16_checkpoint.py                      # ref-8e-top2 as a bf16 Mixtral, 1 thread
    python benchmarks/bf16_checkpoint.py --load 1 --json /tmp/bf16.json

The checkpoint is the shipped model exported as Mixtral (`moelab export`) with its tensors and
config.json in bf16, written to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelab.bench.load import busy_processes
from moelab.bench.machine import device_name, source_commit
from moelab.bench.script import parse_script_arguments
from moelab.generate import cpu_multiplies_bf16, generate_text
from moelab.hf.export import export_checkpoint
from moelab.io import atomic_write_text
from moelab.models.reference import reference_model_dir

JSON_FORMAT = "moelab-bench-bf16-checkpoint/1"
SETTINGS = {"in memory": None, "offloaded, every expert resident": 1.0, "offloaded, 25 % resident": 0.25}


def bf16_checkpoint(out: Path) -> Path:
    """The shipped ref-8e-top2 as a Mixtral checkpoint stored in bf16."""
    export_checkpoint(reference_model_dir(), out, "mixtral", quiet=True)
    for shard in out.glob("*.safetensors"):
        tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}, indent=2))
    return out


def measure(path: Path, resident: float | None, new_tokens: int, rounds: int) -> dict:
    """tokens/s after the first two steps in each dtype, their ratio and whether the texts agree."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rates: dict[str, list[float]] = {name: [] for name in dtypes}
    texts = {}
    for _ in range(rounds + 1):  # the first round warms up
        for name, dtype in dtypes.items():
            text, stats = generate_text(path, "The king said", max_new_tokens=new_tokens, dtype=dtype,
                                        resident=resident, ignore_eos=True)  # fmt: skip
            texts[name] = text
            rates[name].append(stats["later_tokens_per_s"])
    rates = {name: r[1:] for name, r in rates.items()}
    return {
        "resident": resident,
        "tokens_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "bf16_over_fp32": statistics.median(b / f for b, f in zip(rates["bf16"], rates["fp32"])),
        "same_text": texts["fp32"] == texts["bf16"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parse_script_arguments(parser, JSON_FORMAT)
    results = []
    with tempfile.TemporaryDirectory() as tmp, busy_processes(args.load):
        path = bf16_checkpoint(Path(tmp) / "ref-8e-top2-bf16")
        for label, resident in SETTINGS.items():
            row = measure(path, resident, args.new_tokens, args.rounds)
            speed = row["tokens_per_s"]
            print(f"{label}: fp32 {speed['fp32']:,.0f}, bf16 {speed['bf16']:,.0f} tokens/s, "
                  f"bf16 / fp32 {row['bf16_over_fp32']:.2f}, same text {row['same_text']}", flush=True)  # fmt: skip
            results.append(row | {"setting": label})
    if args.json:
        setup = {"threads": args.threads, "load": args.load, "new_tokens": args.new_tokens, "rounds": args.rounds,
                 "native_bf16": cpu_multiplies_bf16(), "device_name": device_name("cpu"), "commit": source_commit(),
                 "torch": torch.__version__}  # fmt: skip
        atomic_write_text(args.json, json.dumps({"format": JSON_FORMAT, "setup": setup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
