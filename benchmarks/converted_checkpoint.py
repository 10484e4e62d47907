"""A transformers checkpoint decoded by transformers and, converted (`moelab.hf.conversion`), by
moelab, in one process: tokens/s of each and their ratio (median of same-round ratios).

    moelab export src/moelab/assets/models/ref-8e-top2 --family mixtral --out /tmp/mixtral-8e
    python benchmarks/converted_checkpoint.py /tmp/mixtral-8e --batch 1 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moelab.hf.conversion import moelab_model
from moelab.hf.loading import load_causal_lm
from moelab.offload.model import generate_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Mixtral or zero-bias Qwen2-MoE checkpoint directory")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {
        "transformers": load_causal_lm(args.checkpoint, quiet=True, dtype=torch.float32),
        "moelab": moelab_model(args.checkpoint, dtype=torch.float32),
    }
    vocab = models["moelab"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    speeds = {name: [] for name in models}
    for round_ in range(args.rounds):
        for name in list(models)[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            generate_ids(models[name], ids, args.new_tokens)
            speeds[name].append(args.batch * args.new_tokens / (time.perf_counter() - start))
    ratio = statistics.median(m / t for m, t in zip(speeds["moelab"], speeds["transformers"], strict=True))
    medians = ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in speeds.items())
    print(f"tokens/s: {medians}; moelab / transformers {ratio:.2f}")


if __name__ == "__main__":
    main()
