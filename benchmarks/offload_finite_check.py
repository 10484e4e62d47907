"""Offloaded decoding with and without the finite check of each expert loaded from the files
(`moelab.offload.store`), A/B in one process: rounds interleaved (order alternating), the check
swapped out for a no-op in the B rounds; the ratio is the median of the per-round ratios.

    python benchmarks/offload_finite_check.py                       # ref-8e-top2, 25 % resident
    python benchmarks/offload_finite_check.py ref-32e-top4-shared --resident 0.05 --rounds 11
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moelab.offload.store as store
from moelab.models.reference import MODELS_DIR
from moelab.offload import load_offloaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="ref-8e-top2")
    parser.add_argument("--resident", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_offloaded(MODELS_DIR / args.model, resident=args.resident)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 8000, (1, 16), generator=generator) for _ in range(args.prompts)]
    checked = store.check_finite

    def tokens_per_s(check) -> float:
        store.check_finite = check
        start = time.perf_counter()
        for prompt in prompts:
            model.generate(prompt, args.new_tokens)
        return len(prompts) * args.new_tokens / (time.perf_counter() - start)

    tokens_per_s(checked)  # warm-up
    ratios = []
    for r in range(args.rounds):
        order = (checked, None) if r % 2 == 0 else (None, checked)
        speed = {check: tokens_per_s(check or (lambda *_, **__: None)) for check in order}
        ratios.append(speed[checked] / speed[None])
    store.check_finite = checked
    print(
        f"{args.model}, {args.resident:.0%} resident: checked / unchecked tokens/s, median "
        f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
