"""What the ranks of a torchrun training run agree on: rank 0's decisions (and errors), the
interrupt flag, and each step's metrics over the whole batch. With `parallel=None` (one
process) each helper is the identity."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from moelab.distributed import Parallel

T = TypeVar("T")


def shared_from_rank0(parallel: Parallel | None, value: T, error: Exception | None) -> T:
    """Rank 0's `value` on every rank; if rank 0 failed (`error`), every rank raises it (rank 0
    the original, the others a ValueError with its message), so no rank waits for a collective."""
    if parallel is None:
        if error is not None:
            raise error
        return value
    message = None if error is None else f"{type(error).__name__}: {error}"
    box: list[Any] = [value, message]
    dist.broadcast_object_list(box, src=0, group=parallel.world_group)
    if box[1] is not None:
        if error is not None:
            raise error
        raise ValueError(f"rank 0 stopped the run: {box[1]}")
    return box[0]


def agreed_flag(flag: bool, parallel: Parallel | None) -> bool:
    """True on every rank if it is True on any (an interrupt some ranks saw first)."""
    if parallel is None:
        return flag
    t = torch.tensor(float(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel.world_group)
    return bool(t.item())


def reduce_step_metrics(
    scalars: dict[str, float], load: dict[int, Tensor], experts_per_token: dict[int, float], parallel: Parallel
) -> None:
    """In place: the scalars and experts per token as means over the ranks (each rank's are means
    over its equal share of the batch), the loads summed. One all-reduce."""
    names, layers = sorted(scalars), sorted(experts_per_token)
    load_layers = sorted(load)
    packed = torch.cat(
        [
            torch.tensor([scalars[n] for n in names] + [experts_per_token[i] for i in layers], dtype=torch.float64),
            *(load[i].double() for i in load_layers),
        ]
    )
    dist.all_reduce(packed, group=parallel.world_group)
    means = (packed[: len(names) + len(layers)] / parallel.world).tolist()
    for n, v in zip(names, means[: len(names)]):
        scalars[n] = v
    for i, v in zip(layers, means[len(names) :]):
        experts_per_token[i] = v
    offset = len(names) + len(layers)
    for i in load_layers:
        n = load[i].numel()
        load[i] = packed[offset : offset + n].float()
        offset += n


COLLECTIVE_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Watchdog")


def collective_failure(err: RuntimeError, parallel: Parallel) -> ValueError | None:
    """A one-line error for a collective that timed out or lost its peer (None for other errors)."""
    text = str(err)
    if not any(marker in text for marker in COLLECTIVE_FAILURES):
        return None
    detail = text.split("] ", 1)[-1].splitlines()[0][:200]
    return ValueError(
        f"rank {parallel.rank}: a collective failed ({detail}); another rank died, hangs or is far slower "
        f"(collectives wait up to parallel.timeout_s = {parallel.config.timeout_s:g} s). Its log says why; "
        "continue with --resume from the last complete checkpoint"
    )
