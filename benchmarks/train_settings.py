"""Whole training steps under two settings, each in fresh processes that alternate: step time and
peak resident memory.

    python benchmarks/train_settings.py --compare keep-memory --json docs/results/bench_keep_memory_cpu.json
    python benchmarks/train_settings.py --compare chunked-loss --json docs/results/bench_chunked_loss_cpu.json

--compare keep-memory: glibc's default memory policy against freed memory kept
(`moelab.memory.keep_freed_memory`, what `moelab train` and `moelab compare` turn on; process-wide,
hence a process per setting). --compare chunked-loss: the LM loss through the whole [tokens, vocab]
logits against chunk by chunk (`TrainConfig.chunked_loss`), both with freed memory kept, as
`moelab train` runs.

A case is a run file, optionally with the model width replaced (`PATH:DIM`); the steps are
`moelab.train.trainer.train_step` on random tokens at the run file's batch size and sequence
length, AdamW included, on the cores free when the process starts (`--threads auto`, as `moelab
train` runs). Each process times `--steps` steps after `--warmup`; the table gives each process's
median step. `--load N` runs N busy processes beside them all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moelab.bench.load import busy_processes
from moelab.bench.machine import openmp_env
from moelab.io import atomic_write_text, check_output_file, has_json_format
from moelab.memory import keep_freed_memory
from moelab.threads import resolve_threads

JSON_FORMATS = {"keep-memory": "moelab-bench-keep-memory/1", "chunked-loss": "moelab-bench-chunked-loss/1"}
SETTINGS = {"keep-memory": ("default", "keep"), "chunked-loss": ("whole", "chunked")}
CASES = ("configs/reference/ref-32e-top4-shared.yaml", "configs/reference/ref-8e-top2.yaml:768")


def run_steps(case: str, setting: str, steps: int, warmup: int) -> dict:
    """In this process: the case's training steps under `setting` (one of SETTINGS' values), timed
    -> {"step_s": [...], "max_rss_mb": ...}."""
    from moelab.models import MoETransformer
    from moelab.train import RunConfig
    from moelab.train.trainer import build_optimizer, train_step

    if setting != "default" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() took no effect here (glibc only)")
    torch.set_num_threads(resolve_threads("auto"))
    path, _, dim = case.partition(":")
    run = RunConfig.load(Path(path))
    model_config = run.model
    if dim:
        width = int(dim)
        model_config = dataclasses.replace(model_config, dim=width, moe=dataclasses.replace(model_config.moe, dim=width))
    torch.manual_seed(0)
    model = MoETransformer(model_config)
    cfg = run.train  # keep-memory: the run file's loss
    if setting in SETTINGS["chunked-loss"]:
        cfg = dataclasses.replace(cfg, chunked_loss=setting == "chunked")
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, model_config.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=generator)
            yield tokens[:, :-1], tokens[:, 1:]

    loader, times = batches(), []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        train_step(model, optimizer, loader, cfg, torch.device("cpu"), contextlib.nullcontext())
        times.append(time.perf_counter() - start)
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": times[warmup:], "max_rss_mb": max_rss_mb, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=list(SETTINGS), required=True, help="the two settings to time")
    parser.add_argument("--case", action="append", help=f"a run file, or PATH:DIM (default: {', '.join(CASES)})")
    parser.add_argument("--pairs", type=int, default=3, help="processes per policy and case, alternating")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--load", type=int, default=0, help="busy processes beside the benchmark")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--overwrite", action="store_true", help="replace this benchmark's earlier JSON there")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = args.case or list(CASES)
    if args.child:
        print(json.dumps(run_steps(cases[0], args.child, args.steps, args.warmup)))
        return
    json_format, settings = JSON_FORMATS[args.compare], SETTINGS[args.compare]
    if args.json is not None:
        check_output_file(args.json, overwrite=args.overwrite, is_own=lambda p: has_json_format(p, json_format))
    results = {case: {setting: [] for setting in settings} for case in cases}
    with busy_processes(args.load):
        for case in cases:
            for _ in range(args.pairs):
                for setting in settings:
                    command = [sys.executable, __file__, "--compare", args.compare, "--child", setting, "--case", case,
                               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
                    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    results[case][setting].append(json.loads(out.splitlines()[-1]))
    first, second = settings
    print(f"| case | step ms, {first} (each process's median) | {second} | peak RSS MB, {first} | {second} |")
    print("|---|---|---|---|---|")
    for case, runs in results.items():
        medians = {s: ", ".join(f"{statistics.median(r['step_s']) * 1e3:.0f}" for r in runs[s]) for s in runs}
        rss = {s: ", ".join(f"{r['max_rss_mb']:.0f}" for r in runs[s]) for s in runs}
        print(f"| {case} | {medians[first]} | {medians[second]} | {rss[first]} | {rss[second]} |")
    if args.json is not None:
        setup = {"torch": torch.__version__, "load": args.load, "openmp_env": openmp_env(),
                 "steps": args.steps, "warmup": args.warmup}  # fmt: skip
        doc = {"format": json_format, "setup": setup, "results": results}
        atomic_write_text(args.json, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
