"""`Linear`: `nn.Linear` with a faster product for one row of bf16 on a CPU, as decoding runs.

A decode step of batch 1 multiplies one row by every weight matrix. torch's bf16 `F.linear` of
one row costs 15-24 us on `ref-8e-top2`'s [128-384, 256] matrices on the 2-core AMD EPYC (caches
warm; 172 us for the [8192, 256] output head). `embedding_bag` in "sum" mode with the row as its
per-sample weights computes the same product from the weight's transpose [in, out]: the sum over
inputs i of x_i times row i, scaled adds over `out` numbers accumulated in float32, rounded to
bf16 once, as `F.linear` rounds (a sum exactly halfway between two bf16 numbers may round the
other way): 4.6-8 us (the head 81 us). It reads that transpose row by row, so the weight must
be stored column-major (`moelab.models.decode_layout`, which `generate` applies on a CPU at
batch 1). Several rows could each make a bag, but each bag reads the weight
again: decoding a 1.2 GB model (`benchmarks/large_model.py`) at batch 4 so took 1.27x as long
as on row-major weights, so only one row takes it. In float32 it was slower inside a decode
step (0.91-0.93x), so only bf16 takes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (inputs, device) -> (indices 0..inputs-1, offsets [0]): one bag of every input row
_BAGS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def one_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, x: [..., in], weight: [out, in] -> [..., out]; for one bf16 row
    on a CPU without gradients or a bias, over a column-major weight, as `embedding_bag` (see the
    module docstring), else `F.linear` itself (a bias added after the bag would round the sum
    twice, where `F.linear` rounds once)."""
    if bias is not None or not _takes_bag(x, weight):
        return F.linear(x, weight, bias)
    key = (weight.shape[1], x.device)
    bag = _BAGS.get(key)
    if bag is None:
        zero = torch.zeros(1, dtype=torch.long, device=x.device)
        bag = _BAGS[key] = (torch.arange(key[0], device=x.device), zero)
    y = torch.embedding_bag(weight.mT, bag[0], bag[1], False, 0, False, x.reshape(-1), False)[0]
    return y.view(*x.shape[:-1], weight.shape[0])


def _takes_bag(x: Tensor, weight: Tensor) -> bool:
    return (
        weight.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.dim() == 2
        and x.numel() == weight.shape[1]
        and weight.mT.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    )


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters, state and results) whose one-row bf16 products on a CPU go
    through `one_row_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return one_row_linear(x, self.weight, self.bias)
