"""The training loop behind `moelab train`.

    run = RunConfig.load("configs/reference/ref-8e-top2.yaml")
    result = train(run, "runs/ref-8e-top2")            # or resume=True after an interruption

One step: `grad_accum` micro-batches of `batch_size` x `seq_len` tokens, loss = LM loss + the
MoE layers' weighted auxiliary losses, global-norm clipping, AdamW, then the LR schedule
(linear warmup, cosine decay) and, for aux-loss-free routers, the expert-bias update (an
optimizer step hook). Every `checkpoint_every` steps the whole state is checkpointed (model,
optimizer, scheduler, data position, RNG); `resume=True` continues from the newest checkpoint
and produces bit-identical weights to an uninterrupted run on the same machine and threads (on
CPU; on CUDA that also needs `torch.use_deterministic_algorithms(True)`, which is not set here).

Outputs in `out_dir`: config.yaml (the resolved run config), log.jsonl and tensorboard/ (train
and per-domain eval metrics), checkpoints/, and at the end model/ (weights, config.json and the
tokenizer, loadable with `moelab.models.load_pretrained`) and results.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from moelab.data import TOKENIZER_DIR, TokenWindows
from moelab.distributed import Parallel, ParallelConfig, init_parallel
from moelab.distributed.parallelize import (
    check_parallel_model,
    clip_grad_norm_,
    parallelize,
    scale_expert_gradients,
)
from moelab.distributed.state import full_model_state
from moelab.eval import domain_losses
from moelab.io import OutputDir, atomic_write_text, check_output_dir, is_output, output_dir
from moelab.models import MoETransformer, model_info, save_pretrained
from moelab.nn import MoELayer, attach_selection_bias_update
from moelab.nn.blockffn import AdaptiveCoefficient
from moelab.nn.rexmoe import ReuseRouter, set_reuse_progress
from moelab.nn.routers import NON_FINITE_LOGITS, TopKRouter
from moelab.threads import intra_op_threads, resumed_threads
from moelab.train.checkpoint import (
    clean_checkpoints,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    save_distributed_checkpoint,
    unreadable_checkpoints,
)
from moelab.train.collectives import agreed_flag, collective_failure, reduce_step_metrics, shared_from_rank0
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.logging import LOG_NAME, RunLog

CONFIG_NAME = "config.yaml"
RESULTS_NAME = "results.json"
KIND = "training run"
RUN_ENTRIES = (CONFIG_NAME, LOG_NAME, "tensorboard", "checkpoints", "model", RESULTS_NAME)
RESUME_HINT = " and start again (or --resume, resume=True, to continue it)"
RUN_PATTERNS = {"checkpoints": r"step-\d+/", "tensorboard": r"events\.out\.tfevents\..+"}  # its files there


@dataclass
class TrainResult:
    """What a finished run reports (also written to `out_dir/results.json`)."""

    out_dir: Path
    steps: int
    tokens: int
    tokens_per_second: float
    eval_loss: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "steps": self.steps,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "eval_loss": self.eval_loss,
        }


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of `cfg.lr`: linear
    warmup to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or the token embedding). The
    experts' biases are [E, n] stacks, matrices by shape: a name ending in "bias" leaves them out."""
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.ndim >= 2 and id(p) not in embedding and not name.endswith("bias")
            (decay if matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


class _Window:
    """Train metrics accumulated between two log lines (losses, load per layer, tokens, time)."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.sums: dict[str, float] = defaultdict(float)
        self.load: dict[int, Tensor] = {}
        self.experts: dict[int, float] = defaultdict(float)
        self.last: dict[str, float] = {}
        if state is not None:
            self.steps, self.tokens, self.seconds = state["steps"], state["tokens"], state["seconds"]
            self.sums.update(state["sums"])
            self.load.update(state["load"])
            self.experts.update(state["experts"])
            self.last.update(state["last"])

    def add(self, stats: dict[str, Any], tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        for name, value in stats["scalars"].items():
            self.sums[name] += value
        self.last.update(stats["last"])
        for layer, load in stats["load"].items():
            self.load[layer] = self.load.get(layer, 0) + load
        for layer, k in stats["experts_per_token"].items():
            self.experts[layer] += k

    def record(self) -> dict[str, Any]:
        """Means over the window's steps (values in `last`, such as the lr, as of its last step)."""
        record = {name: value / self.steps for name, value in self.sums.items()}
        record.update(self.last)
        record["tokens_per_second"] = self.tokens / max(self.seconds, 1e-9)
        if self.load:
            ratios = [float(load.max() / load.mean().clamp_min(1e-9)) for load in self.load.values()]
            record["load_imbalance"] = sum(ratios) / len(ratios)
        return record

    def experts_per_token(self) -> dict[int, float]:
        """Mean experts per token of each MoE layer over the window."""
        return {layer: k / self.steps for layer, k in self.experts.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "sums": dict(self.sums),
            "load": dict(self.load),
            "experts": dict(self.experts),
            "last": dict(self.last),
        }


class _Interrupt:
    """While active, Ctrl-C (SIGINT) only sets `requested`, so the loop stops between two steps
    with a consistent state to checkpoint; a second Ctrl-C interrupts at once (one within 2 s of
    the first counts as the first: torchrun forwards the terminal's Ctrl-C to its workers, which
    got it already)."""

    def __init__(self):
        self.requested = False
        self.first = 0.0
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.requested and time.monotonic() - self.first < 2.0:
            return  # torchrun forwards the terminal's Ctrl-C again at once: still the first one
        if self.requested:
            signal.signal(signal.SIGINT, self.previous)
            signal.raise_signal(signal.SIGINT)
            return
        self.requested, self.first = True, time.monotonic()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(
    run: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    quiet: bool = False,
) -> TrainResult:
    """Train `run` into `out_dir` (see the module docstring); `resume=True` continues the run
    already there from its newest checkpoint, `overwrite=True` replaces it with a new one.
    inputs: files the run was read from (its run file), which `out_dir` must not contain. Ctrl-C
    stops after the current step, checkpoints and raises KeyboardInterrupt."""
    device = resolve_device(run.train.device)
    try:
        parallel = init_parallel(run.parallel, device)
    except dist.DistStoreError as err:  # the processes did not all join in time
        timeout = (run.parallel or ParallelConfig()).timeout_s
        raise ValueError(
            f"the processes did not all start within parallel.timeout_s = {timeout:g} s "
            f"({str(err).splitlines()[0][:120]}); start every rank together, or raise parallel.timeout_s"
        ) from None
    finished = False
    try:
        result = _claim_and_train(run, Path(out_dir), device, parallel, resume, overwrite, inputs, quiet)
        finished = True
        return result
    except RuntimeError as err:
        failure = None if parallel is None else collective_failure(err, parallel)
        if failure is None:
            raise
        raise failure from None
    finally:
        if parallel is not None:
            parallel.close(wait=finished)  # after an error the other ranks may never arrive


def _claim_and_train(
    run: RunConfig,
    out_dir: Path,
    device: torch.device,
    parallel: Parallel | None,
    resume: bool,
    overwrite: bool,
    inputs: Sequence[str | Path],
    quiet: bool,
) -> TrainResult:
    """Check the run (the model, its data, the degrees), claim `out_dir` (rank 0; its outcome is
    every rank's), then train. Everything that can fail before the first step fails before the
    claim: an --overwrite clears the old run only for one that starts."""
    cfg = run.train
    error = None
    if parallel is None or parallel.rank == 0:  # the output directory is rank 0's to judge
        try:
            _check_output(out_dir, inputs, resume, overwrite)
        except Exception as err:
            error = err
    shared_from_rank0(parallel, None, error)
    torch.manual_seed(cfg.seed)
    model = MoETransformer(run.model)  # built whole on the CPU; under torchrun only shards reach the device
    chunk_coef = _adaptive_chunk_coefficient(model, cfg)
    if parallel is not None:
        if cfg.batch_size % parallel.world:
            raise ValueError(
                f"train.batch_size ({cfg.batch_size}) is the global batch and must be divisible by the "
                f"{parallel.world} processes; each rank trains on batch_size / world sequences"
            )
        check_parallel_model(model, parallel.ep)
    loader = TokenWindows.from_corpus(
        cfg.domains, "train", cfg.seq_len, cfg.batch_size, cfg.seed, cfg.mixture, quiet=quiet
    )
    top = max(int(tokens.max()) for tokens in loader.arrays.values())
    if top >= run.model.vocab_size:
        raise ValueError(
            f"model.vocab_size ({run.model.vocab_size}) does not cover the training corpus, read with "
            f"moelab's tokenizer: its token ids reach {top}; set model.vocab_size to at least {top + 1}"
        )
    with contextlib.ExitStack() as stack:
        start, error = None, None
        if parallel is None or parallel.rank == 0:  # one process owns the output directory
            try:
                claimed = stack.enter_context(
                    output_dir(
                        out_dir,
                        KIND,
                        entries=RUN_ENTRIES,
                        inputs=inputs,
                        overwrite=overwrite,
                        resume=resume,
                        resume_hint=RESUME_HINT,
                        patterns=RUN_PATTERNS,
                    )
                )
                start = _prepare_run(run, claimed, resume)
            except Exception as err:
                error = err
        start = shared_from_rank0(parallel, start, error)
        with intra_op_threads(cfg.threads):
            return _train(run, out_dir, device, start, model, loader, chunk_coef, quiet, parallel)


def _check_output(out_dir: Path, inputs: Sequence[str | Path], resume: bool, overwrite: bool) -> None:
    """The output directory's errors, before anything else's (and before anything is cleared)."""
    if not resume:
        check_output_dir(out_dir, KIND, inputs=inputs, overwrite=overwrite, hint=RESUME_HINT)
    elif not is_output(out_dir, KIND):
        check_output_dir(out_dir, KIND, inputs=inputs)  # a directory that is not moelab's: that error
        raise ValueError(f"--resume: {out_dir} holds no training run; start the run without --resume")


def _train(
    run: RunConfig,
    out_dir: Path,
    device: torch.device,
    start: Path | None,
    model: MoETransformer,
    loader: TokenWindows,
    chunk_coef: AdaptiveCoefficient | None,
    quiet: bool,
    parallel: Parallel | None,
) -> TrainResult:
    """Train the freshly built (seeded) `model` on `loader` (see `_claim_and_train`)."""
    cfg = run.train
    rank0 = parallel is None or parallel.rank == 0
    quiet = quiet or not rank0
    if parallel is not None:
        parallelize(model, parallel)
    model.to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    reuse = cfg.reuse_ramp_steps > 0 and any(isinstance(m, ReuseRouter) for m in model.modules())
    # the loop's own state: everything in it goes into checkpoints, so a resumed run (and its
    # logs and results) continues exactly where it stopped
    step, train_seconds = 0, 0.0
    window, eval_window = _Window(), _Window()
    eval_loss: dict[str, float] = {}
    measured_experts: dict[int, float] = {}
    if start is not None:
        step, state = restore_checkpoint(
            start, model, optimizer, lambda full: build_optimizer(full, cfg), device, parallel
        )
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
        train_seconds = float(state["train_seconds"])
        window, eval_window = _Window(state["window"]), _Window(state["eval_window"])
        eval_loss, measured_experts = state["eval_loss"], state["measured_experts"]
        if chunk_coef is not None:
            chunk_coef.load_state_dict(state["chunk_coef"])
            _set_chunk_coef(model, chunk_coef.value)
        _resume_threads(state, cfg, quiet)
    _attach_bias_updates(optimizer, model, run, parallel)

    def save(at: int) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "rng": rng,
            "train_seconds": train_seconds,
            "window": window.state_dict(),
            "eval_window": eval_window.state_dict(),
            "eval_loss": eval_loss,
            "measured_experts": measured_experts,
            "threads": torch.get_num_threads(),  # the weights' bytes depend on it (`_resume_threads`)
        }
        if chunk_coef is not None:
            state["chunk_coef"] = chunk_coef.state_dict()
        if parallel is None:
            state["optimizer"] = optimizer.state_dict()
            save_checkpoint(out_dir, at, model, state, keep=cfg.keep_checkpoints)
        else:
            save_distributed_checkpoint(out_dir, at, model, optimizer, state, cfg.keep_checkpoints, parallel)

    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()
    )
    log = RunLog(out_dir, resume_step=step if start is not None else None) if rank0 else None
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=f"train {out_dir.name}",
        unit="step",
        disable=quiet,
        dynamic_ncols=True,
    )
    saved_step = step if start is not None else None  # None: no checkpoint yet
    try:
        with _Interrupt() as interrupt:
            while step < cfg.steps:
                began = time.perf_counter()
                if reuse:
                    set_reuse_progress(model, min(1.0, step / cfg.reuse_ramp_steps))
                stats = train_step(model, optimizer, loader, cfg, device, autocast, parallel)
                stats["last"] = {"lr": scheduler.get_last_lr()[0]}
                scheduler.step()
                if chunk_coef is not None:
                    raw = stats["scalars"].get("aux/chunk_sparsity", 0.0) / chunk_coef.value
                    _set_chunk_coef(model, chunk_coef.step(raw))
                    stats["last"]["chunk_sparsity_coef"] = chunk_coef.value
                seconds = time.perf_counter() - began
                step += 1
                train_seconds += seconds
                window.add(stats, cfg.tokens_per_step, seconds)
                eval_window.add(stats, cfg.tokens_per_step, seconds)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = window.record()
                    if log is not None:
                        log.write(step, "train", record)
                    bar.set_postfix(_postfix(record), refresh=False)
                    window = _Window()
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    eval_loss = _evaluate(model, cfg, parallel)
                    measured_experts = eval_window.experts_per_token()
                    load = {str(layer): (l / l.sum()).tolist() for layer, l in eval_window.load.items()}
                    experts = {str(layer): k for layer, k in measured_experts.items()}
                    if log is not None:
                        log.write(step, "eval", {"loss": eval_loss, "load": load, "experts_per_token": experts})
                    if not quiet:
                        bar.write(
                            f"step {step}: val loss {eval_loss['all']:.4f} "
                            + " ".join(f"{d}={v:.3f}" for d, v in eval_loss.items() if d != "all")
                        )
                    eval_window = _Window()
                stop = agreed_flag(interrupt.requested, parallel)  # every rank stops after the same step
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                    if log is not None:
                        log.flush()  # every record up to the checkpoint's step is on disk before it
                    save(step)
                    saved_step = step
                if stop:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if saved_step is None:  # stopped in the first steps, before a checkpoint could be saved
            done = "no checkpoint yet: the run starts again"
        else:
            done = "checkpoint saved" if saved_step == step else f"last checkpoint at step {saved_step}"
        bar.write(f"interrupted at step {step} ({done})", file=sys.stderr)  # how to go on: the caller says
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()

    result = TrainResult(
        out_dir=out_dir,
        steps=step,
        tokens=step * cfg.tokens_per_step,
        tokens_per_second=step * cfg.tokens_per_step / max(train_seconds, 1e-9),
        eval_loss=eval_loss,
    )
    if parallel is not None:  # the whole model, gathered to rank 0, which writes it
        full = full_model_state(model, parallel)
        if rank0:
            model = MoETransformer(run.model)
            model.load_state_dict(full)
    error = None
    if rank0:
        try:
            _write_final(model, run, out_dir, result, measured_experts)
        except Exception as err:
            error = err
    shared_from_rank0(parallel, None, error)  # no rank returns before the model is written
    return result


def _resume_threads(state: dict[str, Any], cfg: TrainConfig, quiet: bool) -> None:
    """Continue on the intra-op thread count the checkpointed steps ran on, where the run leaves
    the count to the machine (train.threads unset or "auto"): a matmul's sums depend on it, so
    "auto" resolved otherwise on a busier or idler machine gave other weights than the
    uninterrupted run's, without a word. On a machine with fewer cores than that count (another
    machine), the count stays and a warning says the weights will differ: more threads than cores
    would slow every step several times. A set count is the run's own (config.yaml: a resume with
    another is refused); a checkpoint from before the count was recorded keeps the count now."""
    if cfg.threads in (None, "auto") and (count := resumed_threads(state.get("threads"), "weights", quiet)):
        torch.set_num_threads(count)


def train_step(
    model, optimizer, loader, cfg: TrainConfig, device: torch.device, autocast, parallel: Parallel | None = None
) -> dict[str, Any]:
    """One optimizer step over `cfg.grad_accum` micro-batches. Returns the step's scalar metrics
    (loss, each aux loss, each model metric, grad norm, mean experts per token, with a capacity
    limit the mean fraction of assignments dropped), and per MoE layer its load ([E] counts, as
    routed: before any drop) and experts per token; under torchrun each rank trains on its slice of
    every micro-batch and the metrics are those of the whole batch (means and load sums over the
    ranks)."""
    optimizer.zero_grad(set_to_none=True)
    moe_config = getattr(getattr(model, "config", None), "moe", None)
    dropping = getattr(moe_config, "capacity_factor", None) is not None
    scalars: dict[str, float] = defaultdict(float)
    load: dict[int, Tensor] = {}
    experts_per_token: dict[int, float] = defaultdict(float)
    for _ in range(cfg.grad_accum):
        inputs, targets = next(loader)
        if parallel is not None:
            rows = slice(parallel.rank * len(inputs) // parallel.world, (parallel.rank + 1) * len(inputs) // parallel.world)
            inputs, targets = inputs[rows], targets[rows]
        with autocast:
            out = model(inputs.to(device), targets=targets.to(device), return_logits=not cfg.chunked_loss)
        ((out.loss + out.aux_loss) / cfg.grad_accum).backward()
        scalars["loss"] += out.loss.item() / cfg.grad_accum
        for name, value in out.aux_losses.items():
            scalars[f"aux/{name}"] += value.item() / cfg.grad_accum
        for name, value in out.metrics.items():  # architecture metrics, e.g. BlockFFN's TLS and CLS
            scalars[f"metrics/{name}"] += float(value) / cfg.grad_accum
        for layer, result in out.moe_results.items():
            if result.logits_finite is not None and not result.logits_finite:  # the layer left it to us
                raise ValueError(f"MoE layer {layer}: {NON_FINITE_LOGITS}")
            if dropping and result.dropped_fraction is not None:  # the load below is the routers', before it
                share = float(result.dropped_fraction) / len(out.moe_results)
                scalars["dropped_fraction"] += share / cfg.grad_accum
            if result.tokens_per_expert is not None:
                counts = result.tokens_per_expert.detach().float().cpu()
                load[layer] = load[layer] + counts if layer in load else counts
            if result.experts_per_token is not None:
                experts_per_token[layer] += result.experts_per_token.item() / cfg.grad_accum
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    if parallel is None:
        scalars["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    else:
        scale_expert_gradients(model, parallel)
        scalars["grad_norm"] = float(clip_grad_norm_(list(model.parameters()), max_norm, parallel))
        reduce_step_metrics(scalars, load, experts_per_token, parallel)
    if not math.isfinite(scalars["loss"]):  # every rank sees the reduced loss, so every rank stops
        raise ValueError(
            f"the training loss is {scalars['loss']}: the run diverged; lower train.lr, or clip gradients "
            "(train.grad_clip > 0)"
        )
    if not math.isfinite(scalars["grad_norm"]):  # clipping would spread it to every weight and AdamW's moments
        fp32 = ", or train in fp32 (train.dtype: fp32)" if cfg.dtype != "fp32" else ""
        raise ValueError(
            f"the gradient norm is {scalars['grad_norm']} at a finite loss ({scalars['loss']:.4g}): an overflow in "
            f"the backward pass; the step was not applied. Lower train.lr{fp32}"
        )
    optimizer.step()
    if experts_per_token:
        scalars["experts_per_token"] = sum(experts_per_token.values()) / len(experts_per_token)
    return {"scalars": dict(scalars), "load": load, "experts_per_token": dict(experts_per_token)}


def _prepare_run(run: RunConfig, claimed: OutputDir, resume: bool) -> Path | None:
    """Check a resumed run's config, clean what a killed attempt left and write the resolved
    config; return the checkpoint to resume from (None: start from step 0)."""
    out_dir = claimed.path
    start = None
    if resume:
        check_same_run(run, out_dir)
        clean_checkpoints(out_dir)
        start = latest_checkpoint(out_dir)
        if unreadable := unreadable_checkpoints(out_dir):
            raise ValueError(
                f"--resume: {', '.join(map(str, unreadable))} are not checkpoints this moelab can read (damaged, "
                "or written by another version); move them out of the run (or delete them) to resume from an "
                "older checkpoint"
            )
        if (out_dir / RESULTS_NAME).exists():
            raise ValueError(
                f"the run in {out_dir} has finished; pass --overwrite to train it again, or choose another --out"
            )
        if start is None:  # killed before its first checkpoint: starting again is resuming it
            claimed.clear()
    run.save(out_dir / CONFIG_NAME)
    return start


def check_same_run(run: RunConfig, out_dir: Path) -> None:
    """Raise a ValueError listing the differences if the run in `out_dir` was made with another config."""
    config_path = out_dir / CONFIG_NAME
    if not config_path.exists():
        return
    saved = RunConfig.load(config_path).to_dict()
    mine = run.to_dict()
    diffs = [d for section in ("model", "train") for d in _differences(saved[section], mine[section], section)]
    if diffs:
        raise ValueError(
            f"the run in {out_dir} was made with a different config ({config_path}): "
            + "; ".join(diffs)
            + ". Use the same config, or another output directory"
        )


def _differences(saved: dict, mine: dict, prefix: str) -> list[str]:
    """"prefix.key: run A, now B" for every field that changed, looking into nested sections."""
    diffs = []
    for key in dict.fromkeys([*mine, *saved]):
        a, b = saved.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}.{key}")
        elif a != b:
            diffs.append(f"{prefix}.{key}: run {a!r}, now {b!r}")
    return diffs


def _attach_bias_updates(optimizer, model, run: RunConfig, parallel: Parallel | None) -> None:
    if any(isinstance(m, TopKRouter) and m.selection_bias is not None for m in model.modules()):
        group = None if parallel is None else parallel.world_group  # the bias moves by the global load
        attach_selection_bias_update(optimizer, model, rate=run.model.moe.bias_update_rate, group=group)


def _adaptive_chunk_coefficient(model, cfg: TrainConfig) -> AdaptiveCoefficient | None:
    if not cfg.adaptive_chunk_sparsity:
        return None
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.coefs["chunk_sparsity"]]
    if not layers:
        raise ValueError(
            "train.adaptive_chunk_sparsity needs MoE layers with moe.chunk_sparsity_coef > 0 (BlockFFN)"
        )
    return AdaptiveCoefficient(
        initial=layers[0].coefs["chunk_sparsity"], warmup=cfg.warmup_steps, window=cfg.chunk_sparsity_window
    )


def _set_chunk_coef(model, value: float) -> None:
    for m in model.modules():
        if isinstance(m, MoELayer) and m.coefs["chunk_sparsity"]:
            m.coefs["chunk_sparsity"] = value


def _evaluate(model, cfg: TrainConfig, parallel: Parallel | None) -> dict[str, float]:
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else None
    losses = domain_losses(
        model,
        cfg.domains,
        seq_len=cfg.seq_len,
        batch_size=cfg.eval_batch_size,
        max_tokens=cfg.eval_tokens,
        autocast_dtype=dtype,
        group=None if parallel is None else parallel.world_group,  # each rank its share of the rows
    )
    return {name: value.loss for name, value in losses.items()}


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_second']:.0f}"}
    aux = sum(v for k, v in record.items() if k.startswith("aux/"))
    if aux:
        shown["aux"] = f"{aux:.4f}"
    if "load_imbalance" in record:
        shown["imb"] = f"{record['load_imbalance']:.2f}"
    return shown


def _write_final(
    model: MoETransformer,
    run: RunConfig,
    out_dir: Path,
    result: TrainResult,
    experts_per_token: dict[int, float],
) -> None:
    """The trained model as a pretrained directory (weights, config, tokenizer) and results.json,
    whose model_info counts active parameters and FLOPs at the measured experts per token (the
    last eval window's mean; the nominal k where nothing was measured)."""
    # overwrite: a model saved by an attempt killed before results.json
    save_pretrained(
        model, out_dir / "model", overwrite=True, extra_files=sorted(TOKENIZER_DIR.glob("*.json"))
    )
    summary = result.to_dict()
    kinds = run.model.layer_kinds
    moe_layers = {
        i: k for i, k in experts_per_token.items() if kinds[i] == "moe"
    }  # UoE layers route a fixed k
    summary["model_info"] = model_info(
        run.model, seq_len=run.train.seq_len, experts_per_token=moe_layers or None
    )
    atomic_write_text(out_dir / RESULTS_NAME, json.dumps(summary, indent=2) + "\n")
