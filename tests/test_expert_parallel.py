"""Expert parallelism over 2 gloo processes equals the single-process layer, forward and backward
(float64, so that the different summation order of the exchanged rows stays below the tolerance)."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from processes import spawn

from moelab.distributed import free_port, shard_experts
from moelab.nn import MoEConfig, build_moe

WORLD = 2
CONFIGS = {
    "topk": MoEConfig(dim=16, num_experts=8, hidden_dim=12, top_k=2, num_shared=1, balance_coef=0.01),
    "topp with capacity": MoEConfig(dim=16, num_experts=4, hidden_dim=8, router="topp", top_p=0.6, capacity_factor=1.0),
}



def _tokens(rank: int) -> torch.Tensor:
    # Uneven token counts per rank, and ones that pile onto few experts on rank 1.
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(7 + 6 * rank, 16, generator=g, dtype=torch.float64) * (1 + 3 * rank)


def _worker(rank: int, port: int, name: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from moelab.distributed import shard_experts

        torch.manual_seed(0)
        layer = shard_experts(build_moe(CONFIGS[name]).double())
        x = _tokens(rank).requires_grad_(True)
        y, result = layer(x)
        (y.pow(2).sum() + result.loss).backward()
        out[rank] = {
            "y": y.detach(),
            "grad_x": x.grad,
            "grads": {n: p.grad for n, p in layer.named_parameters()},
            "bytes_sent": layer.dispatcher.bytes_sent,
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_expert_parallel_matches_single_process(name):
    """Outputs and gradients equal the single-process layer's; bytes_sent counts the rows the routing exchanges."""
    torch.manual_seed(0)
    full = build_moe(CONFIGS[name]).double()
    xs = [_tokens(r).requires_grad_(True) for r in range(WORLD)]
    ys, results = zip(*(full(x) for x in xs))
    sum(y.pow(2).sum() + res.loss for y, res in zip(ys, results)).backward()

    out = mp.Manager().dict()
    spawn(_worker, args=(free_port(), name, out), nprocs=WORLD)

    L = full.num_experts // WORLD
    for rank in range(WORLD):
        torch.testing.assert_close(out[rank]["y"], ys[rank].detach(), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out[rank]["grad_x"], xs[rank].grad, atol=1e-10, rtol=1e-10)
        for pname, grad in out[rank]["grads"].items():
            if pname.startswith("experts."):  # local shard: gradient over every rank's tokens
                torch.testing.assert_close(grad, full.get_parameter(pname).grad[rank * L : (rank + 1) * L], atol=1e-10, rtol=1e-10)
    if CONFIGS[name].capacity_factor is None:  # every routed row is exchanged: count them from the routing
        owner = [(full.router(x).indices // L) for x in xs]
        row, result = 16 * 8 + 4, 16 * 8  # a float64 row and its float32 routing weight; a float64 result
        for rank in range(WORLD):
            sent = int((owner[rank] != rank).sum())
            returned = sum(int((owner[s] == rank).sum()) for s in range(WORLD) if s != rank)
            assert out[rank]["bytes_sent"] == sent * row + returned * result
    # Replicated parameters (router, shared experts) see only their rank's tokens: the ranks' sum is the full gradient.
    for pname, param in full.named_parameters():
        if not pname.startswith("experts."):
            total = sum(out[r]["grads"][pname] for r in range(WORLD))
            torch.testing.assert_close(total, param.grad, atol=1e-10, rtol=1e-10)


def _group(monkeypatch, *, rank: int, size: int, global_rank: int, world: int) -> object:
    """A stand-in expert-parallel group (no process group: shard_experts runs no collective)."""
    group = object()
    monkeypatch.setattr(dist, "get_rank", lambda g=None: rank if g is group else global_rank)
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: size if g is group else world)
    return group


def test_shard_keeps_the_experts_of_its_rank_in_the_expert_group(monkeypatch):
    """EP 2 x DP 2, global rank 3 = EP rank 1: the shard is experts [4, 8) of 8 (by the rank and
    size in the expert group, not the world's), their values as they were, a frozen one still frozen."""
    group = _group(monkeypatch, rank=1, size=2, global_rank=3, world=4)
    torch.manual_seed(0)
    full = build_moe(CONFIGS["topk"])
    full.experts.down_proj.requires_grad_(False)
    layer = shard_experts(copy.deepcopy(full), group)
    assert layer.experts.num_experts == 4 and layer.dispatcher.rank == 1 and layer.dispatcher.world_size == 2
    for pname, param in full.experts.named_parameters():
        shard = layer.experts.get_parameter(pname)
        assert torch.equal(shard, param[4:8]) and shard.requires_grad == param.requires_grad, pname


def test_experts_the_group_does_not_divide_are_refused(monkeypatch):
    group = _group(monkeypatch, rank=0, size=3, global_rank=0, world=3)
    with pytest.raises(ValueError, match=r"num_experts \(8\) must be divisible by the 3 expert-parallel"):
        shard_experts(build_moe(CONFIGS["topk"]), group)
