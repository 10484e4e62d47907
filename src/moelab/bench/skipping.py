"""`moelab bench skip`: NAEE dynamic skipping in moelab's runtime, against the same model without
it, timed in interleaved rounds in one process (forward passes over corpus windows, the MoE
layers' skip ratios from calibration statistics), with the loss both ways and the experts each
token used."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor

from moelab.bench.rounds import speedup
from moelab.compress.skipping import apply_dynamic_skipping, check_skip_statistics, skip_ratios
from moelab.compress.stats import Calibration
from moelab.data import IGNORE_INDEX, eval_batches, tokenize_split
from moelab.models import load_pretrained

JSON_FORMAT = "moelab-bench-skip/1"


@dataclass(kw_only=True)
class SkipOptions:
    tokens: int = 4096
    seq_len: int = 256
    batch_size: int = 8
    rounds: int = 5
    split: str = "test"


DOMAINS = ("code", "bible", "english", "german", "spanish", "italian", "polish", "russian")


def test_batches(
    tokens: int, seq_len: int, batch_size: int, split: str = "test", quiet: bool = False
) -> list[tuple[Tensor, Tensor]]:
    """(inputs, targets) batches of about `tokens` tokens, an equal share from every corpus domain;
    more than the split's smallest domain can give its share of is refused (not cut short).
    quiet: no tokenizing bars where a split is not cached yet."""
    streams = {d: tokenize_split(d, split, quiet=quiet) for d in DOMAINS}
    share = tokens // len(DOMAINS) + 1  # inputs and the targets one token on
    smallest = min(DOMAINS, key=lambda d: len(streams[d]))
    if len(streams[smallest]) < share:
        most = len(DOMAINS) * (len(streams[smallest]) - 1)
        raise ValueError(
            f"the corpus's {split} split holds {len(streams[smallest]):,} tokens of {smallest}: at most {most:,} "
            f"tokens come in equal shares from its {len(DOMAINS)} domains, not {tokens:,}; ask for fewer"
        )
    stream = torch.cat([torch.from_numpy(streams[d][:share].astype("int64")) for d in DOMAINS])
    return list(eval_batches(stream.numpy(), seq_len, batch_size))


@torch.no_grad()
def loss_and_experts(model, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean next-token loss (nats) over the batches and the experts a token used, averaged over
    the MoE layers; both weighted by each batch's tokens (a shorter last batch counts less)."""
    loss = tokens = experts = 0.0
    for inputs, targets in batches:
        out = model(inputs)
        mask = targets != IGNORE_INDEX
        n = int(mask.sum())
        loss += float(F.cross_entropy(out.logits[mask], targets[mask], reduction="sum"))
        tokens += n
        experts += n * sum(float(res.experts_per_token) for res in out.moe_results.values()) / len(
            out.moe_results
        )
    return {"loss": loss / tokens, "experts_per_token": experts / tokens}


@torch.no_grad()
def run(model_dir: Path, stats_dir: Path, options: SkipOptions, quiet: bool = False) -> dict:
    """Plain and skipping decoding of the test split, interleaved; quiet: no tokenizing bars."""
    calibration = Calibration(stats_dir)
    check_skip_statistics(calibration, model_dir)
    model = load_pretrained(model_dir).eval()
    ratios = skip_ratios(calibration)
    batches = test_batches(options.tokens, options.seq_len, options.batch_size, options.split, quiet=quiet)
    seconds = {"plain": [], "skipping": []}
    measured = {}
    for mode in seconds:  # warm-up, untimed
        apply_dynamic_skipping(model, ratios if mode == "skipping" else None)
        model(batches[0][0])
    for r in range(options.rounds):
        for mode in ("plain", "skipping") if r % 2 == 0 else ("skipping", "plain"):
            apply_dynamic_skipping(model, ratios if mode == "skipping" else None)
            began = time.perf_counter()
            measured[mode] = loss_and_experts(model, batches)
            seconds[mode].append(time.perf_counter() - began)
    apply_dynamic_skipping(model, None)
    total = sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)
    doc = {"format": JSON_FORMAT, "model": str(model_dir), "ratios": {str(k): v for k, v in ratios.items()}}
    for mode in seconds:
        doc[mode] = measured[mode] | {"tokens_per_s": total / statistics.median(seconds[mode])}
    doc["speedup"] = speedup(seconds["plain"], seconds["skipping"])  # within each round: robust to drift
    return doc


def render(doc: dict) -> Table:
    table = Table(title=f"NAEE dynamic skipping on {Path(doc['model']).name} (median of interleaved rounds)")
    for column in ("", "tokens/s", "experts/token", "loss (nats)", "perplexity"):
        table.add_column(column, justify="right")
    for mode in ("plain", "skipping"):
        m = doc[mode]
        table.add_row(mode, f"{m['tokens_per_s']:,.0f}", f"{m['experts_per_token']:.2f}", f"{m['loss']:.4f}",
                      f"{torch.tensor(m['loss']).exp():.1f}")  # fmt: skip
    table.caption = f"speed-up {doc['speedup']:.2f}x; betas " + ", ".join(
        f"L{k} {v:.2f}" for k, v in doc["ratios"].items()
    )
    return table
