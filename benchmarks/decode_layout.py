"""Eager decoding on row-major against column-major weights (`moelab.models.decode_layout`), A/B
in one process: two copies of each model, one with `decode_layout = False` (kept row-major), the
other as `generate` leaves it; rounds interleaved, the ratio the median of the per-round ratios.

    python benchmarks/decode_layout.py                                  # both shipped models, fp32, 1 thread
    python benchmarks/decode_layout.py --threads 2 --json /tmp/layout.json
    python benchmarks/decode_layout.py --load 1                         # one busy process beside
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from moelab.bench.layer import DTYPES
from moelab.bench.load import busy_processes
from moelab.bench.machine import device_name, source_commit
from moelab.bench.script import parse_script_arguments
from moelab.io import atomic_write_text
from moelab.models import load_pretrained
from moelab.models.reference import reference_model_dir

MODELS = ("ref-8e-top2", "ref-32e-top4-shared")
JSON_FORMAT = "moelab-bench-decode-layout/1"


def measure(name: str, batch: int, new_tokens: int, rounds: int, dtype: torch.dtype) -> dict:
    """tokens/s of greedy decoding on each layout, their ratio, and whether the tokens agree."""
    column = load_pretrained(reference_model_dir(name)).eval().to(dtype)
    row = copy.deepcopy(column)  # loaded row-major, and kept so
    row.decode_layout = False
    prompts = torch.randint(0, column.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
    models = {"row_major": row, "column_major": column}
    tokens = {layout: model.generate(prompts, new_tokens, greedy=True) for layout, model in models.items()}  # warm-up
    seconds: dict[str, list[float]] = {layout: [] for layout in models}
    for _ in range(rounds):
        for layout, model in models.items():
            start = time.perf_counter()
            model.generate(prompts, new_tokens, greedy=True)
            seconds[layout].append(time.perf_counter() - start)
    return {
        "model": name,
        "batch": batch,
        "tokens_per_s": {layout: batch * new_tokens / statistics.median(s) for layout, s in seconds.items()},
        "column_over_row": statistics.median(r / c for r, c in zip(seconds["row_major"], seconds["column_major"])),
        "same_tokens": bool(torch.equal(tokens["row_major"], tokens["column_major"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, help="default: both shipped models")
    parser.add_argument("--batch", action="append", type=int, help="default: 1, 8 and 32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parse_script_arguments(parser, JSON_FORMAT)
    results = []
    with busy_processes(args.load):
        for name in args.model or MODELS:
            for batch in args.batch or (1, 8, 32):
                row = measure(name, batch, args.new_tokens, args.rounds, DTYPES[args.dtype])
                speed = row["tokens_per_s"]
                print(
                    f"{name} batch {batch}: row-major {speed['row_major']:,.0f}, column-major "
                    f"{speed['column_major']:,.0f} tokens/s, ratio {row['column_over_row']:.2f}, "
                    f"same tokens {row['same_tokens']}",
                    flush=True,
                )
                results.append(row)
    if args.json:
        setup = {"threads": args.threads, "load": args.load, "dtype": args.dtype, "new_tokens": args.new_tokens, "rounds": args.rounds,
                 "device_name": device_name("cpu"), "commit": source_commit(), "torch": torch.__version__}  # fmt: skip
        doc = {"format": JSON_FORMAT, "setup": setup, "results": results}
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
