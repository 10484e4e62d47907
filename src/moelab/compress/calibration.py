"""The calibration pass: one run over calibration data, layer by layer, that records in every
MoE layer what the compression methods need (`moelab calibrate`, and `moelab compress` when it
is given no statistics).

    calibrate("path/to/checkpoint", "stats/", calib="corpus:code,german")
    stats = Calibration("stats/"); stats.layer(3).total("reap_sums")

The checkpoint runs one decoder layer at a time (`moelab.hf.layerwise`): peak memory is one
decoder layer plus the calibration activations, whatever the model's size. Each MoE block is
computed eagerly and shown to the observers (`moelab.compress.observers`); each layer's
statistics are written as soon as it is done, and the hidden states are saved every
`snapshot_seconds`, so a killed run resumes from there and gives the same files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelab.compress.distributed import agreed, barrier, join_torchrun, reduce_statistics
from moelab.compress.gradients import (
    backward_layer,
    backward_sweep,
    load_snapshot,
    save_snapshot,
    save_tape,
    snapshot_step,
    with_carry,
)
from moelab.compress.mixture import DEFAULT_SPEC, Mixture, build_mixture
from moelab.compress.observers import (
    DEFAULT_OBSERVERS,
    EASY_EP_UNREADABLE,
    OBSERVERS,
    PARTIAL,
    MoECall,
    Observer,
    Tokens,
    block_residuals,
    eager_moe,
)
from moelab.compress.stats import (
    KIND,
    RESUME_NAME,
    STATS_VERSION,
    Calibration,
    LayerStats,
    fingerprint,
    layer_stats,
    read_info,
    write_info,
    write_layer,
)
from moelab.hf.adapters import NATIVE
from moelab.hf.layerwise import LayerwiseModel
from moelab.io import StagedOutput, clear_staging
from moelab.models.reference import model_dir
from moelab.threads import intra_op_threads, resumed_threads
from moelab.trace.model import checkpoint_encoder
from moelab.validation import check_choice, check_field_types

COVERAGE_MIN_TOKENS = 8  # an expert routed fewer tokens than this has unreliable statistics


@dataclass(kw_only=True)
class CalibrationOptions:
    """tokens: calibration budget, split over the sources by weight; seq_len: window length
    (capped at the model's); batch_size: windows per forward pass; sample_tokens: MoE inputs
    kept per layer for methods that re-run a layer (NAEE; 0: none); observers: which
    statistics to record; dtype: what the layers compute in; snapshot_seconds: how often the
    hidden states are saved for resuming."""

    tokens: int = 16384
    seq_len: int = 256
    batch_size: int = 8
    sample_tokens: int = 1024
    observers: tuple[str, ...] = DEFAULT_OBSERVERS
    dtype: str = "float32"
    snapshot_seconds: float = 30.0

    def __post_init__(self):
        if isinstance(self.observers, list):
            self.observers = tuple(self.observers)
        check_field_types(self)  # a float seq_len fails deep in the run, a str observers letter by letter
        for name in ("tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"calibration {name} must be >= 1, got {getattr(self, name)}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0, got {self.sample_tokens}")
        for name in self.observers:
            check_choice("observer", name, OBSERVERS)
        check_choice("calibration dtype", self.dtype, ("float32", "bfloat16", "float64"))

    def settings(self) -> dict:
        """What the statistics depend on (not how often they are snapshot)."""
        return {k: v for k, v in asdict(self).items() if k != "snapshot_seconds"} | {
            "observers": list(self.observers)
        }


def calibrate(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    calib: str | Sequence[str] | Mixture = DEFAULT_SPEC,
    options: CalibrationOptions | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    mtp: bool = True,
) -> Calibration:
    """Record the calibration statistics of the checkpoint `model` on `calib` (specs, see
    `moelab.compress.mixture`, or a `Mixture` from `build_mixture`) into the new directory `out`
    (resuming a killed run into the same `out`). Under torchrun, every process takes its share of
    the batches and the statistics are summed over them (rank 0 writes). mtp: also calibrate the
    checkpoint's multi-token prediction layer (`run_calibration`). Returns the opened statistics.
    `model` may be a shipped model's name."""
    model = model_dir(model)
    options = options or CalibrationOptions()
    rank, world = join_torchrun()
    if world == 1:
        with StagedOutput(out, KIND, inputs=[model], overwrite=overwrite, resume=True) as staging:
            run_calibration(model, staging, calib, options, quiet=quiet, mtp=mtp)
        return Calibration(out)
    import torch.distributed as dist

    staged = StagedOutput(out, KIND, inputs=[model], overwrite=overwrite, resume=True) if rank == 0 else None
    shared = [None]
    if rank == 0:
        try:
            shared[0] = str(staged.open())
        except ValueError as err:
            shared[0] = err
    dist.broadcast_object_list(shared, src=0)
    if isinstance(shared[0], ValueError):
        raise shared[0]
    try:
        run_calibration(model, Path(shared[0]), calib, options, quiet=quiet or rank > 0, mtp=mtp)
        dist.barrier()
    except BaseException:
        if staged is not None:
            staged.abort(keep=True)
        raise
    if staged is not None:
        staged.publish()
    dist.barrier()
    return Calibration(out)


def calibration_mixture(
    model: str | os.PathLike, calib: str | Sequence[str], options: CalibrationOptions, quiet: bool = False
) -> Mixture:
    """The calibration windows for `model`, tokenised with its own tokenizer."""
    runner_config = _config(model)
    native = "model_type" not in runner_config
    encoder = checkpoint_encoder(model, native=native)
    if encoder is None and not native:
        raise ValueError(
            f"{model} has no tokenizer files (tokenizer.json); moelab needs the model's tokenizer to tokenise "
            "the calibration text: save it beside the weights (tokenizer.save_pretrained)"
        )
    seq_len = min(options.seq_len, _max_positions(runner_config))
    return build_mixture(calib, tokens=options.tokens, seq_len=seq_len, encoder=encoder, quiet=quiet)


def run_calibration(
    model: str | os.PathLike,
    directory: Path,
    calib: str | Sequence[str] | Mixture,
    options: CalibrationOptions,
    *,
    quiet: bool = False,
    mtp: bool = True,
    required: Sequence[str] = (),
) -> dict:
    """Calibrate `model` into the directory `directory` (moelab's own, e.g. a staging
    directory), continuing what it holds if it was made for the same model, data and settings.
    required: the statistics the caller's method cannot do without (`Method.requires`); a layer where
    one could not be read (EASY-EP's, `PARTIAL`) stops the calibration there, with the reason,
    rather than after the last layer.
    In a torch.distributed group, this process takes every world-th batch and the statistics
    are summed over the group; rank 0 writes them. mtp: also calibrate the checkpoint's
    multi-token prediction layer, if it has one (False: its statistics are left out, as
    `compress(mtp="drop")` needs none). Returns calibration.json's content."""
    model = Path(model)
    rank, world = join_torchrun()
    mixture = calib if isinstance(calib, Mixture) else calibration_mixture(model, calib, options, quiet)
    dtype = getattr(torch, options.dtype)
    with LayerwiseModel(model, dtype=dtype) as runner, contextlib.ExitStack() as threads:
        info = {
            "model": {
                "path": str(model.resolve()),
                "family": runner.family.name,
                "fingerprint": fingerprint(model),
            },
            "mixture": mixture.describe(),
            "settings": options.settings() | {"seq_len": mixture.seq_len},
            "moe_layers": runner.moe_layers,
            "mtp_layers": runner.mtp_layers if mtp else [],
            "stats_version": STATS_VERSION,  # a killed run of an older layout starts again
        }
        previous = read_info(directory)
        # mtp_layers: absent from calibrations made before moelab ran MTP layers (none then)
        same_job = previous is not None and all(
            previous.get(k, [] if k == "mtp_layers" else None) == v for k, v in info.items()
        )
        if same_job and previous.get("complete"):
            return previous
        _check_vocab(mixture, runner)
        backward = [name for name in options.observers if OBSERVERS[name].backward]
        predicted_tokens = sum(w.ids.numel() - 1 for w in mixture.windows)
        if backward and predicted_tokens == 0:
            raise ValueError(
                f"the backward sweep ({', '.join(backward)} statistics: heapr, moelab's recipe) follows the loss of "
                "predicting each next token, and these calibration windows are one token long; give more tokens "
                "(--calib-tokens) or longer windows (--seq-len)"
            )
        if backward:
            runner.check_backward()
        if info["mtp_layers"]:
            runner.check_mtp()
            _check_mtp_windows(info["mtp_layers"][0], mixture, backward)
        batches = mixture.batches(options.batch_size)
        if len(batches) < world:  # a process without a batch has nothing to run the layers on
            raise ValueError(
                f"the calibration data make {len(batches)} batch(es) of up to {options.batch_size} windows, fewer "
                f"than the {world} processes: run at most {len(batches)}, or give more tokens (--calib-tokens) "
                "or smaller batches (--batch-size)"
            )
        windows = batches[rank::world]
        states = runner.embed([torch.stack([w.ids for w in batch]) for batch in windows])
        tokens = [_tokens(batch) for batch in windows]
        resume_file = directory / (RESUME_NAME if world == 1 else f"resume-{rank}-of-{world}.safetensors")
        # done: the last step of the forward pass done (`LayerwiseModel.schedule`: the layers in order, but a
        # loop's once a pass)
        steps = len(runner.schedule)
        # a killed run resumes with as many processes as it ran on: its snapshots and tapes are theirs
        # (recorded since calibrations of this moelab; an older record is taken as this many)
        same_run = same_job and previous.get("processes", world) == world
        forward_done = same_run and previous["done"] == steps - 1  # killed in the backward sweep
        # a snapshot resumes the run only with its record: one saved after the last calibration.json
        # (killed between the two writes) holds the states of a later step
        resumable = same_run and snapshot_step(resume_file, "done") == previous["done"]
        start = previous["done"] + 1 if resumable or forward_done else 0
        start = agreed(start, world, "min")
        # the layers done were computed on the recorded thread count: the rest on it too (same statistics)
        resumed = resumed_threads(previous.get("threads"), "statistics", quiet) if start else None
        threads.enter_context(intra_op_threads(resumed))
        mtp_pending = bool(info["mtp_layers"]) and not (same_run and previous.get("mtp_done"))
        if 0 < start < steps or (start == steps and mtp_pending):
            states, runner.carry = load_snapshot(resume_file, len(states), dtype)
        elif start == 0 and rank == 0:
            clear_staging(directory)
        barrier(world)  # no process writes into the directory before rank 0 has cleared it
        seconds = previous.get("seconds", 0.0) if start > 0 else 0.0
        coverage = dict(previous.get("coverage", {})) if start > 0 else {}
        info |= {
            "done": start - 1,
            "mtp_done": not mtp_pending,
            "complete": False,
            "seconds": seconds,
            "coverage": coverage,
            "processes": world,
            "threads": torch.get_num_threads(),  # a resumed run goes on with it (`resumed_threads`)
        }
        if start == steps and "backward_next" in previous:  # killed in the backward sweep
            info["backward_next"] = previous["backward_next"]
        if rank == 0:
            write_info(directory, info)
        began, snapped = time.perf_counter() - seconds, time.perf_counter()
        looping: dict[int, list[Observer]] = {}  # a looped layer's observers, until its last pass
        for step in tqdm(range(start, steps), desc=f"calibrate {model.name}", unit="layer", disable=quiet):
            index = runner.schedule[step]
            if backward:
                save_tape(directory, rank, world, index, states, runner.carry_taped_by(index))
            stats = _calibrate_layer(runner, index, states, tokens, mixture, options, world, step=step, looping=looping)
            if stats is not None:
                _check_read(stats, required)
                coverage[str(index)] = int((stats.counts.sum((0, 1)) < COVERAGE_MIN_TOKENS).sum())
                if rank == 0:
                    write_layer(directory, stats)
            now = time.perf_counter()
            last = step == steps - 1
            after = runner.num_layers if last else runner.schedule[step + 1]  # the layer run next
            info |= {"seconds": round(now - began, 3), "coverage": coverage}
            # inside a loop the run also holds what its passes read: a killed run resumes from before it
            due = runner.resumable_after(step) and agreed(now - snapped >= options.snapshot_seconds, world, "max")
            if last or due:
                if not last or mtp_pending:  # the MTP layer starts from the last layer's output
                    save_snapshot(with_carry(states, runner.carry_read_by(after)), resume_file, "done", step)
                if last and backward:
                    save_tape(directory, rank, world, after, states, runner.carry_taped_by(after))
                info["done"] = step
                barrier(world)  # calibration.json records the step once every process has saved its files
                if rank == 0:
                    write_info(directory, info)
                snapped = now
        ids = [torch.stack([w.ids for w in batch]) for batch in windows]
        if mtp_pending:
            index = runner.mtp_layers[0]
            stats = _calibrate_mtp(runner, ids, states, windows, mixture, options, backward, world)
            _check_read(stats, required)
            coverage[str(index)] = int((stats.counts.sum((0, 1)) < COVERAGE_MIN_TOKENS).sum())
            info |= {"mtp_done": True, "coverage": coverage}
            if rank == 0:
                write_layer(directory, stats)
                write_info(directory, info)
        if backward:
            del states
            backward_sweep(
                runner,
                directory,
                ids,
                tokens,
                names=backward,
                num_sources=len(mixture.sources),
                predicted_tokens=predicted_tokens,
                info=info,
                resume_file=resume_file,
                snapshot_seconds=options.snapshot_seconds,
                rank=rank,
                world=world,
                quiet=quiet,
            )
        elapsed = time.perf_counter() - began
        info |= {
            "done": steps - 1,
            "complete": True,
            "seconds": round(elapsed, 3),
            "tokens_per_second": round(mixture.num_tokens / max(elapsed, 1e-9), 1),
            "processes": world,
        }
        clear_staging(directory, only=[resume_file.name])
        barrier(world)  # complete once every process has removed its snapshot (a complete run is not resumed)
        if rank == 0:
            write_info(directory, info)
    return info


def _check_read(stats: LayerStats, required: Sequence[str]) -> None:
    """Refuse a layer's statistics that lack one of those `required` that an observer could have left unread."""
    for name in (name for name in required if name in PARTIAL):
        if getattr(stats, name) is None:
            raise ValueError(
                f"layer {stats.layer}: calibration stopped here, where it could not read {name!r}, which the method "
                f"needs: {EASY_EP_UNREADABLE}; choose another method (reap, frequency, moelab, ...)"
            )


def _calibrate_mtp(
    runner: LayerwiseModel,
    ids: list[torch.Tensor],
    states: list[torch.Tensor],
    windows: list,
    mixture: Mixture,
    options: CalibrationOptions,
    backward: list[str],
    world: int,
) -> LayerStats:
    """The statistics of the multi-token prediction layer's block, which reads the last decoder
    layer's outputs `states` and the next tokens (`LayerwiseModel.mtp_states`), on this
    process's batches of windows of 2 tokens or more (position i of a window: its tokens i and
    i + 1); with the backward observers `backward`, also theirs, from the gradient of the layer's
    own loss (its drafts of token i + 2, `LayerwiseModel.mtp_head_gradients`)."""
    index = runner.mtp_layers[0]
    starts, total = {}, 0  # each window's first MTP position in the whole mixture
    for window in mixture.windows:
        starts[window.start] = total
        total += window.ids.numel() - 1
    kept = [b for b, batch in enumerate(ids) if batch.shape[1] >= 2]
    ids = [ids[b] for b in kept]
    inputs = runner.mtp_states(ids, [states[b] for b in kept])
    tokens = [_tokens(windows[b], starts) for b in kept]
    outputs = list(inputs)
    stats = _calibrate_layer(runner, index, outputs, tokens, mixture, options, world, total_tokens=total)
    if backward:
        predicted = sum(max(w.ids.numel() - 2, 0) for w in mixture.windows)
        grads = runner.mtp_head_gradients(ids, outputs, 1.0 / predicted)
        results = backward_layer(runner, index, inputs, grads, tokens, backward, len(mixture.sources))
        reduce_statistics(results, world)
        for name, value in results.items():
            setattr(stats, name, value)
    return stats


def _check_mtp_windows(index: int, mixture: Mixture, backward: list[str]) -> None:
    """Refuse, before any layer runs, windows that give the multi-token prediction layer `index`
    nothing to read (one token each), or with the backward observers `backward`, nothing for its
    drafts of the token after next to predict (fewer than 3 tokens each)."""
    if all(w.ids.numel() < 2 for w in mixture.windows):
        raise ValueError(
            f"the multi-token prediction layer {index} reads each token with the next one, and every calibration "
            "window is one token long; give longer windows (--seq-len), or leave the layer out (compress --mtp drop, calibrate --no-mtp)"
        )
    if backward and all(w.ids.numel() < 3 for w in mixture.windows):
        raise ValueError(
            f"the backward sweep of the multi-token prediction layer {index} follows the loss of its drafts of the "
            "token after next, and every calibration window is shorter than 3 tokens; give longer windows "
            "(--seq-len), or leave the layer out (compress --mtp drop, calibrate --no-mtp)"
        )


def _calibrate_layer(
    runner, index, states, tokens, mixture: Mixture, options: CalibrationOptions, world: int, total_tokens=None,
    *, step: int | None = None, looping: dict[int, list[Observer]] | None = None,
):  # fmt: skip
    """Run decoder layer `index` over every batch of hidden states (replaced by its outputs);
    for an MoE layer, the statistics of its block (summed over the process group). total_tokens:
    the tokens the layer sees over the whole mixture (default: all of them). step: where in the
    runner's schedule it runs (default: `index`); a looped layer (Inkling 2 Loop's, run several
    times a forward pass) keeps its observers in `looping` ({layer: observers}) from pass to pass
    and gives the statistics of all of them after its last (None before): its block sees the
    mixture's tokens once a pass, pass p's at positions p x total_tokens + their own."""
    view = runner.moe_view(index)
    passes, number = runner.passes(index), 0 if step is None else runner.pass_number(step)
    calls: list[MoECall] = []

    def run_moe(moe, x, context=None):
        found = residual(x)  # before the block's own modules run
        call = eager_moe(moe, x, context=context)
        call.residual = found
        calls.append(call)
        return call.output.view_as(x)

    observers = []
    total = mixture.num_tokens if total_tokens is None else total_tokens
    if view is not None and number > 0:
        observers = looping.pop(index)
    elif view is not None:
        E, D = view.router.num_experts, view.router.dim
        extra = {"total_tokens": total * passes, "sample_tokens": options.sample_tokens}
        names = [
            n
            for n in options.observers
            if not OBSERVERS[n].backward and (n != "inputs" or options.sample_tokens)
        ]
        observers = [OBSERVERS[name](E, len(mixture.sources), D, extra) for name in names]
    with (
        runner.layer(index, run_moe=run_moe if view is not None else None, step=step) as run,
        block_residuals(view.router.dim) if view is not None else contextlib.nullcontext() as residual,
    ):
        for b, hidden in enumerate(states):
            states[b] = run(b, hidden)
            if view is not None:
                call = calls.pop()
                seen = dataclasses.replace(tokens[b], position=tokens[b].position + number * total)
                for observer in observers:
                    observer.update(call, seen, states[b])
    if view is None:
        return None
    if number < passes - 1:
        looping[index] = observers
        return None
    results = {k: v for observer in observers for k, v in observer.result().items()}
    reduce_statistics(results, world)
    return layer_stats(index, tuple(mixture.source_names), results)


def _tokens(batch, mtp_starts: dict[int, int] | None = None) -> Tokens:
    """Where each token of a batch of windows comes from, flattened row-major; with `mtp_starts`
    ({window start: its first position among the MTP layer's}), where each of the multi-token
    prediction layer's positions does (all of a window's tokens but the last)."""
    S = batch[0].ids.numel() - (mtp_starts is not None)
    source = torch.tensor([w.source for w in batch]).repeat_interleave(S)
    half = torch.tensor([w.half for w in batch]).repeat_interleave(S)
    starts = [w.start if mtp_starts is None else mtp_starts[w.start] for w in batch]
    position = torch.cat([start + torch.arange(S) for start in starts])
    return Tokens(source, half, position)


def _check_vocab(mixture: Mixture, runner: LayerwiseModel) -> None:
    vocab = _vocab_size(runner.view.config)
    top = max(int(w.ids.max()) for w in mixture.windows)
    if top >= vocab:
        raise ValueError(
            f"calibration token id {top} is outside {runner.path}'s vocabulary ({vocab}): the text was tokenised "
            "with another tokenizer; save the model's tokenizer beside its weights"
        )


def _config(model: str | os.PathLike) -> dict:
    from moelab.hf.adapters import resolve

    config, checkpoint, family = resolve(model)
    checkpoint.close()
    if family is NATIVE:
        config = {k: v for k, v in config.items() if k != "model_type"}
    return config


def _max_positions(config: dict) -> int:
    text = _text_config(config)
    for key in ("max_seq_len", "max_position_embeddings", "n_positions", "max_seq_length"):
        if isinstance(text.get(key), int) and text[key] > 0:
            return text[key]
    return 2048


def _vocab_size(config: dict) -> int:
    return int(_text_config(config).get("vocab_size"))


def _text_config(config: dict) -> dict:
    """The language model's settings: a multimodal config's `text_config`, else the config."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config
