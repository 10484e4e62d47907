"""The language-model loss without the [N, V] logits: `chunked_cross_entropy`.

`F.cross_entropy(lm_head(h).float(), targets)` holds the logits, their log-softmax and, in the
backward, two gradients of that size: at 4,096 tokens and a vocabulary of 8,192, four fp32 tensors
of 134 MB, more than the rest of a small model's step holds. Here the rows go through the output
head a chunk at a time, and each chunk's gradients with respect to the hidden states and the head's
weight are computed at once, while its logits are at hand (the gradient of the mean cross-entropy
with respect to the logits is (softmax - one-hot) / targets counted; the 1 / count, and the 0 of
an ignored target, are taken on the [n, D] sides of the products); the backward only scales them by
the incoming gradient. Peak memory: one chunk's logits (32 MB of float32: 1,024 rows at V = 8,192),
a gradient of the hidden states [N, D] and a float32 one of the weight [V, D]. Time: a whole step of
the loss (forward and backward, 4,096 tokens, D = 256, V = 8,192, fp32, 2 threads) took the same as
the whole-logits loss (290 against 286-314 ms, interleaved); chunks of 512 rows took 4-7 % longer.

Numerics: each chunk's logits are `h @ weight.T` in the inputs' dtype (under autocast, its dtype),
taken to float32 for the softmax, as `F.cross_entropy(lm_head(h).float(), ...)` computes them; the
weight's gradient is summed over the chunks in float32 (float64 for a float64 weight).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
# each chunk's float32 logits take about this many bytes (fewer rows for a larger vocabulary)
CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 128


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of `vocab_size`: CHUNK_BYTES of float32 logits, at least
    MIN_CHUNK_ROWS (a GEMM of fewer rows runs slower a row)."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size))


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, rows: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets`, over the targets
    that are not -100, as `F.cross_entropy(F.linear(hidden, weight).float(), targets)` (NaN when
    every target is -100), computed `rows` rows at a time (default `chunk_rows`).

    hidden: [N, D]; weight: [V, D] (the output head's, bias-free); targets: [N] in [0, V) or -100.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] expected, got {list(hidden.shape)} and {list(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = {list(hidden.shape[:1])}, got {list(targets.shape)}")
    vocab = weight.shape[0]
    in_range = ((targets >= 0) & (targets < vocab)) | (targets == IGNORE_INDEX)
    if targets.device.type == "cpu":
        if not bool(in_range.all()):
            bad = targets[~in_range][0].item()
            raise ValueError(f"target {bad} is outside the vocabulary [0, {vocab}) and not -100 (ignored)")
    else:  # no host synchronisation: fails the next one
        torch._assert_async(in_range.all(), "a target is outside the vocabulary and not -100")
    # under no_grad or inference_mode autograd still says the inputs need gradients: none are made then
    recorded = torch.is_grad_enabled()
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, rows or chunk_rows(vocab), recorded)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, rows: int, recorded: bool) -> Tensor:
        need_hidden, need_weight = (recorded and needed for needed in ctx.needs_input_grad[:2])
        counted = targets != IGNORE_INDEX
        count = counted.sum().to(torch.float32)  # the loss is NaN with nothing counted, its gradient 0, as torch's
        scale = 1 / count.clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        summed = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=summed, device=weight.device) if need_weight else None
        # the products' dtype: autocast's where it is on (`@` then casts), else the inputs'
        autocast = torch.is_autocast_enabled(hidden.device.type)
        in_place = not autocast and hidden.dtype == weight.dtype
        for start in range(0, hidden.shape[0], rows):
            end = start + rows
            h, picked, keep = hidden[start:end], targets[start:end].clamp(min=0)[:, None], counted[start:end]
            log_probs = torch.log_softmax((h @ weight.t()).float(), dim=-1)  # [n, V]
            total -= torch.where(keep, log_probs.gather(1, picked)[:, 0], 0).sum()  # an ignored row's NaN too
            if not (need_hidden or need_weight):
                continue
            grad = log_probs.exp_()  # the softmax, in place: (softmax - one-hot) row by row
            grad.scatter_add_(1, picked, -keep[:, None].to(grad.dtype))
            grad = grad.to(h.dtype if in_place else torch.float32)
            # each row's factor (0 where ignored, else 1 / count, float32) taken on the [n, D] sides of
            # the products, not on the [n, V] gradient (two passes over it fewer)
            factor = (keep * scale)[:, None]
            if need_hidden and in_place:
                torch.mm(grad, weight, out=grad_hidden[start:end])
                grad_hidden[start:end] *= factor
            elif need_hidden:
                grad_hidden[start:end] = (grad @ weight) * factor
            if need_weight:
                scaled = (h * factor).to(h.dtype)
                if in_place and grad_weight.dtype == h.dtype:
                    grad_weight.addmm_(grad.t(), scaled)
                else:
                    grad_weight += grad.t() @ scaled
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    @once_differentiable  # the gradients were made in the forward, outside any graph
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
