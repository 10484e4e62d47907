"""`moelab bench distributed`: training throughput over 1, 2, 4 ... processes, expert
parallelism on and off, with the time spent in the exchanges and the bytes they move.

For each process count N and layout (N = 1: one process, no collectives; N > 1: "dp" = FSDP2
over N data-parallel ranks with the experts replicated, "ep" = the experts split over the N
ranks, each also FSDP-sharded), N processes are spawned (gloo on CPU, intra-op threads = the
free cores / N) and run the trainer's `train_step` on random tokens of the model's vocabulary:
`warmup` steps, then `steps` timed steps (tokens/s = global tokens per step over the median
step), then 2 steps under torch.profiler for the share of step time inside collectives (rank
0's): the EP exchange (all-to-all) and FSDP's gathers and reductions (all-gather,
reduce-scatter, all-reduce; also the trainer's few metric reductions). Gloo runs collectives on
its own threads, so a share counts waiting for peers too; it is an upper bound of what the
exchanges cost. Bytes: what the forward passes sent across ranks in the expert exchange
(`ExpertParallelDispatcher.bytes_sent`, all ranks), doubled for the backward pass (it mirrors
the forward), against the count for uniform routing: 2 x tokens x k x (EP-1)/EP x (2D+1) x 4
bytes per MoE layer (rows and their weights out, results back; k measured).

On one CPU machine the processes share its cores and memory bandwidth, so the curve only
indicates how the code scales; the ratios are to the one-process run measured in the same
invocation.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.multiprocessing as mp
from rich.table import Table

from moelab.bench.load import busy_processes
from moelab.distributed import free_port
from moelab.distributed.parallelize import check_parallel_model
from moelab.models import ModelConfig, MoETransformer

JSON_FORMAT = "moelab-bench-distributed/1"
COMM = {"ep": ("all_to_all",), "fsdp": ("all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce")}


@dataclass(frozen=True)
class DistributedOptions:
    """procs: process counts; batch_size (global sequences per step) x seq_len tokens; warmup
    and steps: untimed and timed steps per cell; rounds: passes over all the cells (a cell's
    numbers are medians over rounds; its ratio to one process is the median of the ratios
    within each round, whose two sides saw the machine at about the same time); load: busy
    processes beside the benchmark."""

    procs: tuple[int, ...] = (1, 2, 4)
    batch_size: int = 8
    seq_len: int = 256
    warmup: int = 2
    steps: int = 5
    rounds: int = 2
    load: int = 0

    def __post_init__(self):
        if not self.procs or min(self.procs) < 1:
            raise ValueError(f"--procs must be process counts >= 1, got {list(self.procs)}")
        for n in self.procs:
            if self.batch_size % n:
                raise ValueError(f"--batch-size {self.batch_size} must be divisible by every process count, not by {n}")


def run(model: ModelConfig, options: DistributedOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Every (process count, layout) cell; see the module docstring. A model the parallel path
    cannot run at all is refused before any cell; expert parallelism is timed at the process
    counts that divide its experts. progress: told which cell runs now (None: nothing shown)."""
    with torch.device("meta"):
        built = MoETransformer(model)
    check_parallel_model(built, 1)
    layouts = [
        (n, layout)
        for n in options.procs
        for layout in (("dp", "ep") if n > 1 else ("one",))
        if layout != "ep" or _splits(built, n)
    ]
    measured: dict[tuple[int, str], list[dict]] = {cell: [] for cell in layouts}
    with busy_processes(options.load):
        for r in range(options.rounds):
            for n, layout in layouts:
                if progress is not None:
                    progress(f"round {r + 1}/{options.rounds}: {n} process(es), {layout}")
                measured[(n, layout)].append(_cell(model, options, n, layout))
    base = next((runs for (n, _), runs in measured.items() if n == 1), None)
    cells = []
    for runs in measured.values():  # the ratio within each round, then its median: robust to drift
        ratios = None if base is None else [r["tokens_per_second"] / b["tokens_per_second"] for r, b in zip(runs, base)]
        cells.append(_median(runs) | {"vs_one_process": None if ratios is None else statistics.median(ratios)})
    return {"format": JSON_FORMAT, "options": asdict(options), "model": model.to_dict(), "cells": cells}


def _splits(model: MoETransformer, ep: int) -> bool:
    try:
        check_parallel_model(model, ep)
    except ValueError:
        return False
    return True


def _cell(model: ModelConfig, options: DistributedOptions, n: int, layout: str) -> dict:
    out = mp.get_context("spawn").Manager().dict()
    args = (free_port(), model.to_dict(), options, n, layout, out)
    mp.spawn(_worker, args=args, nprocs=n, join=True)
    return dict(out["result"])


def _median(runs: list[dict]) -> dict:
    """A cell's numbers: the median over rounds of each."""
    first = runs[0]
    return {key: statistics.median(r[key] for r in runs) if isinstance(value, float) else value for key, value in first.items()}


def _worker(rank: int, port: int, model: dict, options: DistributedOptions, n: int, layout: str, out) -> None:
    import torch.distributed as dist

    from moelab.distributed import ExpertParallelDispatcher, ParallelConfig, exit_process, init_parallel
    from moelab.distributed.parallelize import parallelize
    from moelab.models import MoETransformer
    from moelab.threads import free_cores
    from moelab.train import TrainConfig
    from moelab.train.trainer import build_optimizer, train_step

    if n > 1:  # one process: the plain path, no process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n))
    torch.set_num_threads(max(1, free_cores() // n))
    config = ModelConfig.from_dict(model)
    parallel = init_parallel(ParallelConfig(expert=n if layout == "ep" else 1), torch.device("cpu")) if n > 1 else None
    try:
        torch.manual_seed(0)
        net = MoETransformer(config)
        if parallel is not None:
            parallelize(net, parallel)
        cfg = TrainConfig(steps=1, batch_size=options.batch_size, seq_len=options.seq_len, device="cpu")
        optimizer = build_optimizer(net, cfg)
        batches = _random_batches(config.vocab_size, options.batch_size, options.seq_len)

        def step() -> dict:
            return train_step(net, optimizer, batches, cfg, torch.device("cpu"), contextlib.nullcontext(), parallel)

        for _ in range(options.warmup):
            step()
        dispatchers = [m.dispatcher for m in net.modules() if isinstance(getattr(m, "dispatcher", None), ExpertParallelDispatcher)]
        for d in dispatchers:
            d.bytes_sent = 0
        seconds, experts_per_token = [], []
        for _ in range(options.steps):
            began = time.perf_counter()
            stats = step()
            seconds.append(time.perf_counter() - began)
            experts_per_token.append(stats["scalars"].get("experts_per_token", 0.0))
        sent = torch.tensor(float(sum(d.bytes_sent for d in dispatchers)))
        shares = _comm_shares(step)
        if parallel is not None:
            dist.all_reduce(sent)
        if rank == 0:
            tokens = options.batch_size * options.seq_len
            step_time = statistics.median(seconds)
            measured = 2 * sent.item() / options.steps
            out["result"] = {
                "procs": n,
                "layout": layout,
                "step_seconds": step_time,
                "tokens_per_second": tokens / step_time,
                "ep_exchange_share": shares["ep"],
                "fsdp_share": shares["fsdp"],
                "ep_bytes_per_step": measured,
                "ep_bytes_uniform": _uniform_bytes(config, tokens, statistics.mean(experts_per_token), n if layout == "ep" else 1),
            }
    finally:
        if parallel is not None:
            dist.destroy_process_group()
    exit_process(0)  # see exit_process: a normal exit may abort after a gloo run


def _comm_shares(step) -> dict[str, float]:
    """Shares of 2 profiled steps' wall time inside each kind of collective (this rank)."""
    from torch.profiler import ProfilerActivity, profile

    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    wall = time.perf_counter() - began
    totals = dict.fromkeys(COMM, 0.0)
    for event in prof.key_averages():
        if not event.key.startswith("gloo:") and not event.key.startswith("nccl:"):
            continue
        for kind, names in COMM.items():
            if any(name in event.key for name in names):
                totals[kind] += event.cpu_time_total / 1e6
    return {kind: total / wall for kind, total in totals.items()}


def _uniform_bytes(config: ModelConfig, tokens: int, experts_per_token: float, ep: int) -> float:
    """Expert-exchange bytes per step (all ranks, forward and backward) if every expert got the
    same share of the rows. experts_per_token: routed rows per token and MoE layer, measured (a
    Chain-of-Experts layer's iterations added up)."""
    layers = sum(kind in ("moe", "uoe") for kind in config.layer_kinds)
    if ep == 1 or layers == 0:
        return 0.0
    return 2 * tokens * experts_per_token * layers * (ep - 1) / ep * (2 * config.dim + 1) * 4


def _random_batches(vocab: int, batch_size: int, seq_len: int):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]



def render(doc: dict) -> Table:
    load = doc["options"].get("load", 0)
    table = Table(
        title="training step, processes on one machine (ratios to one process in this run)"
        + (f", {load} busy process(es) beside" if load else "")
    )
    for column in ("procs", "layout", "tokens/s", "vs 1 proc", "EP share", "FSDP share", "EP MB/step", "uniform"):
        table.add_column(column, justify="right")
    for c in doc["cells"]:
        ratio = "" if c["vs_one_process"] is None else f"{c['vs_one_process']:.2f}x"
        table.add_row(
            str(c["procs"]), c["layout"], f"{c['tokens_per_second']:,.0f}", ratio,
            f"{c['ep_exchange_share']:.0%}", f"{c['fsdp_share']:.0%}",
            f"{c['ep_bytes_per_step'] / 1e6:.2f}", f"{c['ep_bytes_uniform'] / 1e6:.2f}",
        )
    return table

