"""Turn a model built identically on every rank into this rank's part of a parallel run.

`parallelize(model, parallel)`:
- expert parallelism: each MoE layer keeps experts [e*L, (e+1)*L) of its "ep" rank e and
  exchanges rows with all-to-all (`shard_experts`), when the EP degree is above 1;
- FSDP2: each MoE layer's expert shard is `fully_shard`-ed over "dp" (the ranks holding the same
  experts), then each block and the whole model over all ranks;
- global statistics: the balance losses count the load of the whole batch (`stats_group`).

Gradients: FSDP averages a non-expert gradient over all W ranks. An expert's local gradient
already sums the contributions of every EP rank's tokens (they reach it through the all-to-all),
so after FSDP has averaged it over "dp" it is divided by the EP degree as well
(`scale_expert_gradients`, after the backward passes of a step): both then equal the gradient
of the mean loss over the global batch. (FSDP2 could divide by W itself,
`set_gradient_divide_factor`, but that needs a pre-scaled reduce-scatter gloo does not have.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moelab.distributed.expert_parallel import shard_experts
from moelab.distributed.mesh import Parallel
from moelab.models import MoETransformer
from moelab.models.decode_layout import use_row_major_layout
from moelab.nn import MoELayer, SelectiveAttention


def expert_layers(model: torch.nn.Module) -> dict[str, MoELayer]:
    """The MoE layers by module name (a Chain-of-Experts layer's shared experts once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def expert_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the routed experts' parameters, the ones expert parallelism splits."""
    return {
        f"{name}.experts.{p}" for name, layer in expert_layers(model).items() for p, _ in layer.experts.named_parameters()
    }


def check_parallel_model(model: MoETransformer, ep: int) -> None:
    """Clear errors for models an expert-parallel degree of `ep` (1: data parallel only) cannot split."""
    moe = model.config.moe
    if moe is not None and moe.reuse_layers > 1:
        raise ValueError(
            "ReXMoE's shared expert pools (moe.reuse_layers > 1) cannot run under torchrun yet; train it in one process"
        )
    if ep > 1 and not expert_layers(model):
        raise ValueError(
            f"parallel.expert = {ep} splits routed experts, and this model has none (no MoE layer); leave "
            "parallel.expert out (data parallel over every process)"
        )
    for name, layer in expert_layers(model).items():
        if layer.num_experts % ep:
            raise ValueError(
                f"{name} has {layer.num_experts} experts, not divisible by parallel.expert = {ep}; "
                f"choose an expert-parallel degree that divides {layer.num_experts}"
            )


def parallelize(model: MoETransformer, parallel: Parallel) -> MoETransformer:
    """Shard `model` in place for `parallel` (see the module docstring) and return it."""
    check_parallel_model(model, parallel.ep)
    use_row_major_layout(model)  # FSDP takes contiguous parameters only (a model that decoded may not be)
    for layer in expert_layers(model).values():
        if parallel.ep > 1:
            shard_experts(layer, parallel.ep_group)
        layer.stats_group = parallel.world_group
        fully_shard(layer.experts, mesh=parallel.mesh["dp"])
    for module in model.modules():
        if isinstance(module, SelectiveAttention):
            module.stats_group = parallel.world_group
    for block in model.layers:
        fully_shard(block, mesh=parallel.world_mesh)
    fully_shard(model, mesh=parallel.world_mesh)
    return model


@torch.no_grad()
def scale_expert_gradients(model: torch.nn.Module, parallel: Parallel) -> None:
    """Divide the expert gradients (averaged over "dp" by FSDP) by the EP degree; call once per
    step, after the backward passes."""
    if parallel.ep == 1:
        return
    for layer in expert_layers(model).values():
        for p in layer.experts.parameters():
            if p.grad is not None:
                p.grad.div_(parallel.ep)


def clip_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float, parallel: Parallel) -> Tensor:
    """Global-norm clipping over FSDP-sharded gradients: every gradient element lives on exactly
    one rank (FSDP shards over "dp" or all ranks, expert parallelism splits over "ep"), so the
    squared norm is the sum over all ranks of the local shards' squares. Returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    squares = torch.zeros((), device=device, dtype=torch.float64)
    for g in local:
        squares += g.detach().double().pow(2).sum()
    dist.all_reduce(squares, group=parallel.world_group)
    total = squares.sqrt().float()
    if math.isfinite(max_norm):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in local:
            g.mul_(scale.to(g.dtype))
    return total
