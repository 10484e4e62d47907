"""What a background reader of experts costs the decoding beside it, on a CPU.

Decodes with the shipped `ref-8e-top2` held in memory (1 thread, batch 1, 64 greedy tokens) while
another worker reads its experts from the checkpoint's files into a small pool at a set rate (as a
read-ahead would, but reading nothing the decoding uses), and reports tokens/s against decoding
alone, each round running every variant once (ratios: medians of the per-round ratios):

- none: decoding alone;
- thread: a Python thread calling `ExpertStore.load` (the offload cache's reader);
- raw thread: a Python thread doing nothing but the positioned reads (`os.preadv` per matrix);
- process: a separate process calling `ExpertStore.load` (no interpreter lock shared with the decoding).

    python benchmarks/reader_interference.py [--rate 4000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import threading
import time

import torch

from moelab.models import load_pretrained
from moelab.models.reference import reference_model_dir
from moelab.offload import ExpertStore

KINDS = ("none", "thread", "raw thread", "process")


def read_experts(stop, rate: float, count, raw: bool = False) -> None:
    """Read expert after expert into a 4-slot pool at `rate` experts/s until `stop` is set,
    counting them in `count`; raw: only the positioned reads, planned beforehand."""
    store = ExpertStore(reference_model_dir())
    pool = store.empty(4)
    keys = [(layer, e) for layer in store.moe_layers for e in range(store.num_experts)]
    if raw:
        views = store._targets[pool]  # noqa: SLF001 - each slot's byte views, as the store's direct reads use
        files = {}
        plans = [[(files.setdefault(r.path, os.open(r.path, os.O_RDONLY)), r.offset, r.part)
                  for r in store._reads(*key, pool)] for key in keys]  # fmt: skip  # noqa: SLF001
    i = 0
    while not stop.is_set():
        start = time.perf_counter()
        if raw:
            for fd, offset, part in plans[i % len(plans)]:
                os.preadv(fd, [views[i % 4][part]], offset)
        else:
            store.load(*keys[i % len(keys)], pool, i % 4)
        i += 1
        with count.get_lock():
            count.value += 1
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - start)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=4000, help="experts read per second (default 4000)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_pretrained(reference_model_dir()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def decode() -> float:
        start = time.perf_counter()
        model.generate(ids, 64, greedy=True)
        return 64 / (time.perf_counter() - start)

    decode()  # warm-up
    speed: dict[str, list[float]] = {k: [] for k in KINDS}
    reads: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            stop, count = mp.Event(), mp.Value("i", 0)
            worker = None
            if kind == "process":
                worker = mp.get_context("fork").Process(target=read_experts, args=(stop, args.rate, count))
            elif kind != "none":
                worker = threading.Thread(target=read_experts, args=(stop, args.rate, count, kind == "raw thread"))
            if worker is not None:
                worker.start()
                time.sleep(0.3)  # the worker under way
            before, start = count.value, time.perf_counter()
            speed[kind].append(decode())
            reads[kind].append((count.value - before) / (time.perf_counter() - start))
            stop.set()
            if worker is not None:
                worker.join()
    print(f"{'reader':<12}{'tokens/s':>10}{'vs none':>9}{'reads/s':>9}")
    for kind in KINDS:
        ratio = statistics.median(a / b for a, b in zip(speed[kind], speed["none"]))
        print(f"{kind:<12}{statistics.median(speed[kind]):>10.0f}{ratio:>9.2f}{statistics.median(reads[kind]):>9.0f}")


if __name__ == "__main__":
    main()
