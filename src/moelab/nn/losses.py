"""Router auxiliary losses. Each is reported on its own and weighted by its own coefficient.

Shape legend: T tokens, E experts, K slots per token. Means over tokens are 0 (not NaN) for T = 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def load_balancing_loss(probs: Tensor, indices: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Switch/GShard balance loss: E * sum_e f_e * P_e.

    probs: [T, E] router distribution; indices: [T, K] chosen experts (-1 = empty slot).
    f_e is the fraction of the assignments that went to e (all K choices counted, as in
    DeepSeek; for K = 1 this is Switch's loss) and P_e the mean probability of e. Equals 1
    under perfectly uniform routing, whatever K, and for a variable k (top-p, ReLU routers)
    whatever the mean k; transformers' Mixtral loss counts f_e per token instead, K times this
    (`moelab.hf.export.hf_aux_loss_coef` converts the coefficients). Gradient flows through P only.
    group: data-parallel ranks whose tokens form one batch (each with as many tokens): f_e is
    then the fraction over all of them, so the mean of the ranks' losses, and of their gradients,
    is the loss of the whole batch.
    """
    num_experts = probs.shape[-1]
    flat = indices.reshape(-1)
    valid = flat >= 0
    counts = torch.zeros(num_experts, device=probs.device).index_add_(
        0, flat.clamp(min=0), valid.to(torch.float32)
    )
    if group is not None:
        dist.all_reduce(counts, group=group)
    fraction = counts / counts.sum().clamp(min=1)
    mean_probs = probs.float().sum(0) / max(probs.shape[0], 1)
    return num_experts * (fraction * mean_probs).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2. logits: [T, E]."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).sum() / max(logits.shape[0], 1)


def router_entropy_loss(probs: Tensor) -> Tensor:
    """Mean per-token entropy -sum_e p log p of probs: [T, E] (dynamic top-p's loss: lowering it
    stops the router from flattening p to activate many experts)."""
    p = probs.float()
    return -(p * torch.log(p.clamp(min=1e-20))).sum() / max(p.shape[0], 1)
