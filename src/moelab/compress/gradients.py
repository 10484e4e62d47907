"""The calibration pass's backward sweep: the gradient of the language-model loss, carried from
the output head down through the decoder layers one layer at a time, for the statistics that
need it (HEAPr's per-neuron terms, `moelab.compress.observers.NeuronObserver`).

Shape legend: B sequences, S tokens each, D model dim.

The loss is the mean next-token cross-entropy over every calibration token (the windows' first
tokens predict nothing), so the gradients do not depend on how the windows are batched or split
over processes. The forward sweep saves each layer's input states to a tape file in the
statistics directory (with the carried value the layer reads, `LayerwiseModel.carry_taped_by`;
Inkling 2's block_states, of which each layer reads a prefix, once, with the last layer's output);
the backward sweep reads them from the last layer to the first, recomputes
each layer under autograd (its weights need no gradient) and hands the gradient with respect to
its input to the layer below. Peak memory stays one decoder layer plus its activations. The
gradients are saved every `snapshot_seconds` like the hidden states of the forward sweep, so a
killed run resumes the sweep where it was, with the same result.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moelab.compress.distributed import agreed, barrier, reduce_statistics
from moelab.compress.observers import OBSERVERS, MoECall, Tokens, eager_moe
from moelab.compress.stats import read_layer, write_info, write_layer
from moelab.files import load_safetensors, open_safetensors
from moelab.hf.layerwise import LayerwiseModel
from moelab.io import clear_staging, save_safetensors


def tape_file(directory: Path, rank: int, world: int, index: int) -> Path:
    """The states entering decoder layer `index` (index = num_layers: the last layer's output),
    one tensor per batch of this process."""
    return directory / f"tape-{rank}-of-{world}-{index:05d}.safetensors"


def save_tape(
    directory: Path, rank: int, world: int, index: int, states: list[Tensor], carry: list[Tensor | None] = ()
) -> None:
    """Save the states entering layer `index` (and what the layer before handed it: `carry`)."""
    save_safetensors(with_carry(states, carry), tape_file(directory, rank, world, index))


def with_carry(states: list[Tensor], carry: list[Tensor | None], prefix: str = "batch") -> dict[str, Tensor]:
    """{<prefix><b>: states[b], <prefix>carry<b>: carry[b] where it is not None}: a snapshot of the
    layer-by-layer run (prefix "batch": its states and `carry`; "grad": the backward sweep's gradients and
    `carry_grad`). The forward's carried values are saved as carry<b>."""
    saved = {f"{prefix}{b}": s.contiguous() for b, s in enumerate(states)}
    return saved | {f"{_carry_prefix(prefix)}{b}": c.contiguous() for b, c in enumerate(carry) if c is not None}


def save_snapshot(tensors: dict[str, Tensor], path: Path, key: str, step: int) -> None:
    """Save a resume snapshot (`with_carry`) tagged with the step that calibration.json records with
    it under `key` ("done": the forward pass's last step, "backward_next": the backward sweep's next
    layer). The record is written after the snapshot: a run killed between the two finds them
    disagree (`snapshot_step`) and does not resume from the snapshot."""
    save_safetensors(tensors, path, metadata={key: str(step)})


def snapshot_step(path: Path, key: str) -> int | None:
    """The step a snapshot was saved for under `key` (`save_snapshot`); None where there is no
    snapshot or it has no such tag (saved by a moelab before the tags)."""
    if not path.is_file():
        return None
    with open_safetensors(path) as f:
        value = (f.metadata() or {}).get(key)
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def load_snapshot(
    path: Path, count: int, dtype: torch.dtype, prefix: str = "batch"
) -> tuple[list[Tensor], list[Tensor | None]]:
    """(states or gradients in `dtype`, carried values or their gradients) of a snapshot (`with_carry`)
    of `count` batches."""
    saved = load_safetensors(path)
    carried = _carry_prefix(prefix)
    return [saved[f"{prefix}{b}"].to(dtype) for b in range(count)], [saved.get(f"{carried}{b}") for b in range(count)]


def _carry_prefix(prefix: str) -> str:
    return "carry" if prefix == "batch" else f"{prefix}carry"


def backward_sweep(
    runner: LayerwiseModel,
    directory: Path,
    ids: list[Tensor],
    tokens: list[Tokens],
    *,
    names: list[str],
    num_sources: int,
    predicted_tokens: int,
    info: dict,
    resume_file: Path,
    snapshot_seconds: float,
    rank: int,
    world: int,
    quiet: bool,
) -> None:
    """Run the backward sweep over this process's batches (`ids` [B, S] each, with their
    `tokens`) and add the statistics of the observers `names` to every MoE layer's file in
    `directory`. info["backward_next"] is the next layer to process (saved with the gradients,
    and those of block_states gathered so far: `LayerwiseModel.carry_grad`, in `resume_file`);
    a sweep that finds both continues from there; -1: the sweep is done (recorded before its tapes
    are removed)."""
    dtype = runner.dtype
    top = runner.num_layers - 1
    tapes = [tape_file(directory, rank, world, i).name for i in range(top + 2)]
    start = info.get("backward_next")
    if start == -1:  # the sweep finished and was recorded: killed while its tapes were removed
        clear_staging(directory, tapes)
        return
    # the final input's carry: block_states, which it reads and every layer reads a prefix of
    final, final_carry = load_snapshot(tape_file(directory, rank, world, top + 1), len(ids), dtype)
    # every process resumes from its gradients, or none does (a snapshot whose record was not written)
    if agreed(start is not None and snapshot_step(resume_file, "backward_next") == start, world, "min"):
        grads, runner.carry_grad = load_snapshot(resume_file, len(ids), dtype, prefix="grad")
    else:
        runner.carry = final_carry
        grads = runner.head_gradients(ids, final, 1.0 / predicted_tokens)
        start = top
    del final
    snapped = time.perf_counter()
    for index in tqdm(range(start, -1, -1), desc="backward sweep", unit="layer", disable=quiet):
        # the carry: what the layer before handed this one in the forward sweep
        states, taped = load_snapshot(tape_file(directory, rank, world, index), len(ids), dtype)
        runner.carry = runner.carry_from_tapes(index, taped, final_carry)
        results = backward_layer(runner, index, states, grads, tokens, names, num_sources)
        if results is not None:
            _add_to_layer(directory, index, results, world, rank)
        now = time.perf_counter()
        if index > 0 and agreed(now - snapped >= snapshot_seconds, world, "max"):
            save_snapshot(with_carry(grads, runner.carry_grad, prefix="grad"), resume_file, "backward_next", index - 1)
            info["backward_next"] = index - 1
            barrier(world)  # calibration.json records the snapshot once every process has saved its gradients
            if rank == 0:
                write_info(directory, info)
            snapped = now
    # recorded before the tapes go: a run killed while they go finds the sweep done, not tapes missing
    info["backward_next"] = -1
    barrier(world)
    if rank == 0:
        write_info(directory, info)
    clear_staging(directory, tapes)


def backward_layer(
    runner: LayerwiseModel,
    index: int,
    states: list[Tensor],
    grads: list[Tensor],
    tokens: list[Tokens],
    names: list[str],
    num_sources: int,
) -> dict[str, Tensor] | None:
    """Carry the gradients `grads` with respect to layer `index`'s output (one per batch of its
    input `states`) to its input, in place; returns the statistics of the observers `names` of
    its MoE block on this process's batches (None for a dense layer)."""
    view = runner.moe_view(index)
    calls: list[MoECall] = []

    def run_moe(moe, x, context=None):
        call = eager_moe(moe, x, context=context, keep_hidden=True)
        calls.append(call)
        return call.output.view_as(x)

    observers = []
    if view is not None:
        E, D = view.router.num_experts, view.router.dim
        options = {"hidden_dim": view.experts.hidden_dim}
        observers = [OBSERVERS[name](E, num_sources, D, options) for name in names]
    with runner.layer_backward(index, run_moe=run_moe if view is not None else None) as vjp:
        for b, hidden in enumerate(states):
            grads[b] = vjp(b, hidden, grads[b])
            if view is not None:
                call = calls.pop()
                for observer in observers:
                    observer.update(call, tokens[b], hidden)
    if view is None:
        return None
    return {k: v for observer in observers for k, v in observer.result().items()}


def _add_to_layer(directory: Path, index: int, results: dict[str, Tensor], world: int, rank: int) -> None:
    """Sum the statistics over the process group and write them into the layer's file."""
    reduce_statistics(results, world)
    if rank == 0:
        stats = read_layer(directory, index, ())
        for name, value in results.items():
            setattr(stats, name, value)
        write_layer(directory, stats)
