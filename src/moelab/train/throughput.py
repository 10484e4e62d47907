"""Training throughput of several variants, measured side by side.

    speeds = interleaved_throughput({"dense": run_a, "moe": run_b}, rounds=5)
    speeds["moe"]["vs_first"]          # median over rounds of (first's step time / moe's)

Runs trained one after the other see different machine loads (another job starts, the CPU
warms up), so their tokens/s are not comparable. Here every variant gets a freshly initialised
model, optimizer and data loader of its recipe, one untimed step, and then `rounds` rounds in
which each takes one training step (`train_step`, the trainer's own), in a shuffled order: both
sides of a ratio were timed within the same round, seconds apart.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time

import torch

from moelab.data import TokenWindows
from moelab.models import MoETransformer
from moelab.threads import intra_op_threads
from moelab.train.config import RunConfig
from moelab.train.trainer import build_optimizer, resolve_device, train_step


def interleaved_throughput(runs: dict[str, RunConfig], rounds: int = 5) -> dict[str, dict[str, float]]:
    """{name: {"tokens_per_second": median over rounds, "vs_first": median of the per-round ratios
    of the first variant's step time to this one's}} (see the module docstring). Threads: the
    first run's recipe's."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    first = next(iter(runs.values())).train
    with intra_op_threads(first.threads):
        steps = {name: _stepper(run) for name, run in runs.items()}
        for step in steps.values():
            step()  # untimed: allocations, first-call overheads
        times: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    base = times[next(iter(runs))]
    out = {}
    for name, run in runs.items():
        cfg = run.train
        tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        out[name] = {
            "tokens_per_second": tokens / statistics.median(times[name]),
            "vs_first": statistics.median(b / t for b, t in zip(base, times[name])),
        }
    return out


def _stepper(run: RunConfig):
    """A function that takes one training step of a fresh model of `run`."""
    cfg = run.train
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = MoETransformer(run.model).to(device).train()
    optimizer = build_optimizer(model, cfg)
    loader = TokenWindows.from_corpus(cfg.domains, "train", cfg.seq_len, cfg.batch_size, cfg.seed, cfg.mixture)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()
    return lambda: train_step(model, optimizer, loader, cfg, device, autocast)
