"""The compiled decode step captured in a CUDA graph: one launch per token instead of one per
kernel (a small model's decode step on a GPU is hundreds of short kernels, each launched from
Python otherwise)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class DecodeGraph:
    """`step(model, ids, cache, position)`, the compiled static decode step (`position` a []
    tensor), captured once into a CUDA graph over fixed buffers: the token ids [B, 1], the
    position and the KV cache. Each call copies its ids and position into the buffers and replays
    the graph; it returns the graph's logits buffer [B, V], which the next call overwrites."""

    def __init__(self, step: Callable, model, ids: Tensor, cache, position: int):
        self.ids = ids.clone()
        self.position = torch.tensor(position, device=ids.device)
        # The warm-up writes the cache at `position` what the first replay writes again.
        self.graph, self.logits = capture(lambda: step(model, self.ids, cache, self.position), ids.device)

    def __call__(self, ids: Tensor, position: int) -> Tensor:
        self.ids.copy_(ids)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits


def capture(fn: Callable[[], Tensor], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """fn() run once on a side stream of `device` (compiling, the libraries' lazy set-up:
    torch.cuda.graph's warm-up), then captured: (the graph, fn's output buffer that each replay
    rewrites)."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out
