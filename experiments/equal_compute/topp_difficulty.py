"""Does dynamic top-p routing send harder tokens to more experts? (An et al., "Harder Tasks Need
More Experts")

For a trained top-p model, every validation token gets a difficulty (its next-token loss) and an
expert count (experts chosen, averaged over the MoE layers). Reports the Spearman correlation
between the two, the mean expert count per loss quartile, and per domain.

    python experiments/equal_compute/topp_difficulty.py runs/equal_compute/topp/model --out topp_difficulty.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moelab.data import IGNORE_INDEX, eval_batches, list_domains, tokenize_split
from moelab.io import atomic_write_text
from moelab.models import load_pretrained
from moelab.nn import MoELayer


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of x, ties sharing their mean rank."""
    ranks = np.empty(len(x))
    ranks[x.argsort(kind="stable")] = np.arange(len(x))
    _, group = np.unique(x, return_inverse=True)
    return (np.bincount(group, ranks) / np.bincount(group))[group]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


@torch.no_grad()
def measure(model_dir: Path, tokens_per_domain: int, seq_len: int) -> dict:
    model = load_pretrained(model_dir).eval()
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.trace = True
    losses, counts, domains = [], [], []
    for domain in list_domains():
        tokens = tokenize_split(domain, "validation")[: tokens_per_domain + 1]
        for inputs, targets in eval_batches(tokens, seq_len, 8):
            out = model(inputs)
            nll = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), reduction="none")
            per_layer = [(r.routing.indices >= 0).sum(-1).float() for r in out.moe_results.values()]
            experts = torch.stack(per_layer).mean(0)  # [B*S]
            keep = targets.flatten() != IGNORE_INDEX
            losses.append(nll[keep])
            counts.append(experts[keep])
            domains += [domain] * int(keep.sum())
    loss, experts = torch.cat(losses).numpy(), torch.cat(counts).numpy()
    quartiles = np.quantile(loss, [0.25, 0.5, 0.75])
    bins = np.digitize(loss, quartiles)
    domains = np.array(domains)
    return {
        "tokens": int(len(loss)),
        "spearman_loss_vs_experts": spearman(loss, experts),
        "mean_experts": float(experts.mean()),
        "mean_experts_by_loss_quartile": [float(experts[bins == q].mean()) for q in range(4)],
        "loss_quartile_edges": quartiles.tolist(),
        "by_domain": {
            d: {
                "mean_loss": float(loss[domains == d].mean()),
                "mean_experts": float(experts[domains == d].mean()),
            }
            for d in list_domains()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="a trained top-p model directory (moelab format)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--tokens-per-domain", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    result = measure(args.model, args.tokens_per_domain, args.seq_len)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
