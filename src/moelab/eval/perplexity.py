"""Per-domain validation loss and perplexity of a causal LM on the shipped corpus.

losses = domain_losses(model, seq_len=256, max_tokens=16384)
losses["german"].loss, losses["german"].perplexity, losses["all"].tokens
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from moelab.data import IGNORE_INDEX, eval_batches, list_domains, tokenize_split
from moelab.validation import check_not_str

ALL = "all"


@dataclass(frozen=True)
class DomainLoss:
    """Mean next-token cross-entropy (nats) over `tokens` targets, and its perplexity (e^700 at
    most, as `evaluate` reports it: a broken model's loss of 710 overflowed a float)."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700))


@torch.no_grad()
def domain_losses(
    model: nn.Module,
    domains: Sequence[str] | None = None,
    *,
    split: str = "validation",
    seq_len: int = 256,
    batch_size: int = 16,
    max_tokens: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    quiet: bool = True,
    group: dist.ProcessGroup | None = None,
) -> dict[str, DomainLoss]:
    """The loss of `model` (called as `model(ids).logits`, logits: [B, S, V]) on each domain's
    `split`, scoring `max_tokens` predicted tokens (None = all; from the first max_tokens + 1), in windows of
    `seq_len`; key "all" holds the token-weighted mean over the domains. The model is put in eval
    mode for the call and restored after. The last window is padded; padded positions are not
    scored, but routers that look across the batch (expert choice, capacity limits) see them.
    group: the ranks of a parallel model (every rank calls this): each scores its share of every
    batch's rows (a rank left without rows runs one unscored row, so every rank makes the same
    calls) and the sums are all-reduced."""
    check_not_str("domains", domains, "domain names")
    names = list_domains() if domains is None else list(domains)
    if not names:
        raise ValueError("domain_losses needs at least one domain (None = all of them)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict[str, DomainLoss] = {}
    try:
        for name in tqdm(names, desc=f"eval {split}", unit="domain", disable=quiet, leave=False):
            tokens = tokenize_split(name, split, quiet=quiet)
            if max_tokens is not None:
                tokens = tokens[: max_tokens + 1]
            total, count = 0.0, 0
            for inputs, targets in eval_batches(tokens, seq_len, batch_size):
                if group is not None:
                    inputs, targets = _rank_rows(inputs, targets, dist.get_rank(group), dist.get_world_size(group))
                inputs, targets = inputs.to(device), targets.to(device)
                autocast = (
                    torch.autocast(device.type, dtype=autocast_dtype)
                    if autocast_dtype is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    logits = model(inputs).logits
                total += F.cross_entropy(
                    logits.float().flatten(0, 1),
                    targets.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
                count += int((targets != IGNORE_INDEX).sum())
            if group is not None:
                sums = torch.tensor([total, count], dtype=torch.float64)
                dist.all_reduce(sums, group=group)
                total, count = sums[0].item(), int(sums[1].item())
            results[name] = DomainLoss(total / count, count)
    finally:
        model.train(was_training)
    tokens = sum(r.tokens for r in results.values())
    results[ALL] = DomainLoss(sum(r.loss * r.tokens for r in results.values()) / tokens, tokens)
    return results


def _rank_rows(inputs: Tensor, targets: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """This rank's contiguous share of a batch's rows [B, S]; one unscored row if it has none."""
    rows = torch.tensor_split(torch.arange(len(inputs)), world)[rank]
    if len(rows) == 0:
        return inputs[:1], torch.full_like(targets[:1], IGNORE_INDEX)
    return inputs[rows], targets[rows]
