"""Column-major weight matrices for decoding on a CPU.

A decode step multiplies one row per sequence by every weight matrix, y = x W^T with W: [out,
in]. Stored row-major (torch's default), CPU BLAS runs that as `out` dot products of `in`
numbers each; stored column-major (the same [out, in] tensor with strides (1, out)), it streams
W^T's rows of `out` numbers, one scaled add per input. On short rows the first form reads the
weights from memory far below the machine's bandwidth: ref-8e-top2's output head, [8192, 256],
at 8 GB/s against 21 GB/s column-major on the 2-core AMD EPYC (fp32, 1 thread, caches flushed);
square and wide matrices are about even either way (0.95-1.1x), tall ones gain 1.25-1.45x.
Products of many rows (prefill, training) run equally fast in either layout (within 3 %). In
bf16 torch's own products gained nothing from it (0.94-1.02x; several rows over large matrices
lost up to 1.5x), but one row over a column-major bf16 matrix runs as `embedding_bag`
(`moelab.nn.linear.one_row_linear`), 1.5x faster decoding at batch 1; so float32 matrices move
for every batch size and bf16 ones for batch 1 (at larger batches they are stored row-major).
A compiled step runs faster on row-major weights (Inductor prepacks them for MKL), so
`generate(compile=True)` stores them row-major (docs/benchmarks.md, "Column-major weights").

`use_decode_layout(model)` stores the matrices a decode step multiplies column-major, in place:
the same Parameter objects (tied weights stay tied), shapes and values, other strides. Their
`state_dict()` tensors are then transposed views: `.view()` on them fails and
`safetensors.torch.save_file` asks for `.contiguous()` (moelab's writers call it), and FSDP
refuses them (`use_row_major_layout` stores them back; moelab's `parallelize` calls it).

Matrices that a step multiplies by the same rows (an attention block's query, key and value
projections, named by its `side_by_side_projections`) go side by side: adjacent column blocks of one
column-major matrix (`side_by_side`), so that one product serves them all (one call instead of
three: 1.05-1.06x faster batch-1 decoding of the shipped models, fp32 and bf16). Each keeps its
own Parameter, shape and values; a cast or `use_row_major_layout` gives each its own storage again,
and so does the first forward a gradient flows through (`store_apart`). Only plain projections
go (`plain_projections`: moelab's `Linear`, no bias, hooks or parametrizations).

Training never sees these layouts. torch's fused optimizers (`fused=True`) step a weight, its
gradient and its state (made in the weight's layout of the time) as flat blocks of memory, so a
weight moved between a backward and its step, or after the optimizer made its state, would be
stepped wrongly (measured: 0.04-3.6 off after one Adam step), and a weight with gaps between its
columns cannot be stepped so at all. So `use_decode_layout` leaves weights that have a gradient
where they are, and marks the model (`decode_layout_in_use`): `MoETransformer.forward` stores
everything row-major again before a forward that a gradient flows through. DDP records the
layout when it wraps a model, before any forward: where torch.distributed is initialised,
`generate` stores the weights row-major again before it returns (elsewhere, call
`use_row_major_layout` before wrapping a model that decoded in DDP or the like).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moelab.nn.experts import Experts
from moelab.nn.hooks import forward_hooked
from moelab.nn.linear import Linear


def decode_layout_weights(model: nn.Module, batch: int = 1) -> list[nn.Parameter]:
    """The matrices `use_decode_layout` stores column-major for decoding `batch` sequences: every
    `nn.Linear` weight (the output head, and the embedding tied to it, included) and every experts
    module's stacked matrices ([E, out, in]: each expert's matrix) on a CPU, in float32, and in
    bf16 at batch 1 (their one-row products then run through `moelab.nn.linear.one_row_linear`);
    not those of UoE blocks (they view their weights per head or expert)."""
    return [w for w in _matrices(model) if _decodes_column_major(w, batch)]


def _decodes_column_major(weight: Tensor, batch: int = 1) -> bool:
    dtypes = (torch.float32, torch.bfloat16) if batch == 1 else (torch.float32,)
    return weight.device.type == "cpu" and weight.dtype in dtypes


def _matrices(model: nn.Module) -> list[nn.Parameter]:
    """Every plain (not distributed) `nn.Linear` weight and stacked experts' matrix outside UoE
    blocks, on any device and in any dtype: what either layout may have moved (a model moved
    or cast after decoding keeps its strides)."""
    uoe_blocks = [block for block in getattr(model, "layers", ()) if getattr(block, "kind", None) == "uoe"]
    skipped = {id(module) for block in uoe_blocks for module in block.modules()}
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if id(module) in skipped:
            continue
        if isinstance(module, nn.Linear):
            candidates = (module.weight,)
        elif isinstance(module, Experts):
            candidates = module._stacked_weights() or ()
        else:
            continue
        for weight in candidates:
            if type(weight.data) is Tensor and weight.dim() >= 2:
                found.setdefault(id(weight), weight)
    return list(found.values())


def is_column_major(weight: Tensor) -> bool:
    """Whether each [out, in] matrix of `weight` ([..., out, in]) is stored column-major: on its
    own, or as a column block of a wider one (`side_by_side`)."""
    if weight.mT.is_contiguous():
        return True
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) > weight.shape[0]


def side_by_side(weights: Sequence[Tensor]) -> Tensor | None:
    """The [sum of outs, in] matrix whose row blocks are `weights` ([out_i, in] each), where they
    are stored as adjacent column blocks of one column-major matrix (as `use_decode_layout` stores
    an attention block's projections), in order; else None. (Called at every decode step: a few
    calls per weight. Each weight starts where the previous one ends, inside the first's storage,
    so all lie in that storage.)"""
    first = weights[0]
    rows, columns = sum(w.shape[0] for w in weights), first.shape[1]
    pointer, size = first.data_ptr(), first.element_size()
    for w in weights:
        if w.stride() != (1, rows) or w.shape[1] != columns or w.dtype != first.dtype:
            return None
        if w.data_ptr() != pointer:
            return None
        pointer += w.shape[0] * size
    start = first.storage_offset() * size
    if start + ((columns - 1) * rows + rows) * size > first.untyped_storage().nbytes():
        return None
    return first.as_strided((rows, columns), (1, rows))


def plain_projections(modules: Sequence[nn.Module]) -> bool:
    """Whether each module is exactly moelab's `Linear` without a bias, hooks or parametrizations
    (and no global module hooks are set): what one product over their weights side by side may
    stand in for. Called at every decode step: plain lookups."""
    plain = all(type(m) is Linear and m._parameters.get("bias") is None for m in modules)
    return plain and not forward_hooked(modules)


def store_apart(weights: Sequence[nn.Parameter]) -> int:
    """Give weights stored side by side their own row-major storage again, in place (before a
    gradient flows to them: see the module docstring); return how many moved."""
    return 0 if side_by_side(weights) is None else _store(list(weights), column_major=False)


def _side_by_side_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The weights of each module's `side_by_side_projections` (names of children that one step
    multiplies by the same rows), where they are `plain_projections` and none has a gradient."""
    groups = []
    for module in model.modules():
        if names := getattr(module, "side_by_side_projections", None):
            children = [getattr(module, name) for name in names]
            weights = [child.weight for child in children] if plain_projections(children) else []
            if weights and all(w.grad is None for w in weights):
                groups.append(weights)
    return groups


def use_decode_layout(model: nn.Module, batch: int = 1) -> int:
    """Store `decode_layout_weights(model, batch)` column-major and the model's other CPU bf16
    matrices row-major, in place; return how many moved (0 when all already are: a model whose
    bf16 decoding alternates batch 1 with larger batches copies its bf16 matrices at each switch).
    Copies one matrix at a time (its bytes, briefly, twice); called in or out of inference mode,
    it leaves each parameter the kind it was (trainable, or an inference tensor where it was made
    in inference mode). Weights with a gradient stay where they are, and the model is marked
    `decode_layout_in_use` (see the module docstring)."""
    cpu_bf16 = [w for w in _matrices(model) if _decodes_column_major(w) and w.dtype == torch.bfloat16]
    bf16 = cpu_bf16 if batch > 1 else []  # stored row-major again
    weights = [w for w in decode_layout_weights(model, batch) if w.grad is None]
    model.decode_layout_in_use = True
    chosen = {id(w) for w in weights}
    groups = [
        group for group in _side_by_side_groups(model)
        if all(id(w) in chosen for w in group) and len({(w.dtype, w.device, w.shape[1]) for w in group}) == 1
    ]  # fmt: skip
    grouped = {id(w) for group in groups for w in group}
    alone = [w for w in weights if id(w) not in grouped]
    moved = sum(_store_side_by_side(group) for group in groups)
    return moved + _store(alone, column_major=True) + _store(bf16, column_major=False)


def use_row_major_layout(model: nn.Module, *, keep_decode_layout: bool = False) -> int:
    """Undo `use_decode_layout`: store those matrices row-major again, on any device and in any
    dtype (what FSDP requires: `moelab.distributed.parallelize` calls it); return how many moved.
    keep_decode_layout: leave the ones `use_decode_layout` moves (CPU float32 and bf16) as they are
    (`MoETransformer` restores the others after every move or cast)."""
    weights = [w for w in _matrices(model) if not (keep_decode_layout and _decodes_column_major(w))]
    if not keep_decode_layout:
        model.decode_layout_in_use = False
    return _store(weights, column_major=False)


def _store_side_by_side(weights: list[nn.Parameter]) -> int:
    """Store `weights` ([out_i, in] each) as adjacent column blocks of one new column-major matrix
    (`side_by_side`), in place; return how many moved (0 if they already are)."""
    if side_by_side(weights) is not None:
        return 0
    first = weights[0]
    rows = sum(w.shape[0] for w in weights)
    with torch.inference_mode(first.is_inference()), torch.no_grad():  # see `_store`
        columns = torch.empty(first.shape[1], rows, dtype=first.dtype, device=first.device)
        start = 0
        for weight in weights:
            block = columns[:, start : start + weight.shape[0]]
            block.copy_(weight.data.mT)
            weight.data = block.mT
            start += weight.shape[0]
    return len(weights)


def _store(weights: list[nn.Parameter], column_major: bool) -> int:
    moved = 0
    for weight in weights:
        if is_column_major(weight) if column_major else weight.is_contiguous():
            continue
        # the copy is made in the mode the parameter was made in: a normal tensor stays trainable
        # (generate runs in inference mode), one made in inference mode stays an inference tensor
        with torch.inference_mode(weight.is_inference()), torch.no_grad():
            weight.data = weight.data.mT.contiguous().mT if column_major else weight.data.contiguous()
        moved += 1
    return moved
