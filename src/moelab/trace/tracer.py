"""`trace_model`: run labelled calibration tokens through a model and write its routing trace."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moelab.io import check_output_dir
from moelab.models.reference import model_dir
from moelab.trace.capture import RoutingCapture
from moelab.trace.data import batches, count_tokens, load_streams
from moelab.trace.model import LoadedModel, load_model, wrap_model
from moelab.trace.store import KIND, Trace, TraceInfo, TraceWriter
from moelab.validation import check_field_types


@dataclass(kw_only=True)
class TraceOptions:
    """max_tokens: token budget, split evenly over the domains. seq_len: window length (capped
    at the model's). batch_size: windows per forward pass. logits: also store the full router
    logits (float16). expert_stats: record each expert's max |down output| (Super Experts).
    shard_tokens: tokens per shard file."""

    max_tokens: int = 20000
    seq_len: int = 256
    batch_size: int = 8
    logits: bool = False
    expert_stats: bool = True
    shard_tokens: int = 65536

    def __post_init__(self):
        check_field_types(self)  # a float seq_len failed mid-trace, slicing the windows


def trace_model(
    model: LoadedModel | nn.Module,
    streams: dict[str, np.ndarray],
    out: str | os.PathLike,
    options: TraceOptions | None = None,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike | None] = (),
    source: dict[str, str] | None = None,
    quiet: bool = False,
) -> Trace:
    """Trace `model` on `streams` ({domain: token ids [n]}, see `moelab.trace.data.load_streams`)
    and write the trace to the new directory `out` (a previous trace there is replaced only with
    `overwrite`; `inputs`, the files read, must lie outside it). source: where the streams came
    from ({"data": ..., "split": ...}), recorded in the settings. Returns the opened trace."""
    options = options or TraceOptions()
    loaded = model if isinstance(model, LoadedModel) else wrap_model(model)
    seq_len = min(options.seq_len, loaded.max_seq_len)
    plan = list(
        batches(streams, max_tokens=options.max_tokens, seq_len=seq_len, batch_size=options.batch_size)
    )
    _check_vocab(plan, loaded.vocab_size)
    total = count_tokens(streams, options.max_tokens)
    is_moelab = loaded.view is None
    start = time.perf_counter()
    with RoutingCapture(loaded.model, loaded.view, expert_stats=options.expert_stats) as capture:
        info = TraceInfo(
            model=loaded.name,
            family=capture.family,
            num_layers=len(getattr(loaded.model, "layers", [])) if is_moelab else loaded.view.num_layers,
            layers=capture.layers,
            num_experts=list(capture.num_experts.values()),
            top_k=list(capture.top_k.values()),
            identity_experts=list(capture.identity_experts.values()),
            identity_returns=capture.identity_returns,
            domains=list(streams),
            logits=options.logits,
            settings={
                **asdict(options),
                "seq_len": seq_len,
                "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                **(source or {}),
            },
        )
        writer = TraceWriter(out, info, shard_tokens=options.shard_tokens, overwrite=overwrite, inputs=inputs)
        with writer, torch.inference_mode():
            loaded.model.eval()
            for batch in tqdm(plan, desc="tracing", unit="batch", disable=quiet, leave=False):
                if is_moelab:
                    loaded.model(batch.token_ids)
                else:
                    loaded.model(input_ids=batch.token_ids, use_cache=False)
                writer.add(batch.token_ids, batch.domain, capture.pop())
            elapsed = time.perf_counter() - start
            info.settings |= {
                "seconds": round(elapsed, 3),
                "tokens_per_second": round(total / max(elapsed, 1e-9), 1),
            }
            return writer.close(capture.expert_max, capture.shared_max, capture.checks)


def _check_vocab(plan, vocab_size: int) -> None:
    top = max(int(b.token_ids.max()) for b in plan)
    if top >= vocab_size:
        raise ValueError(
            f"token id {top} is outside the model's vocabulary ({vocab_size}): the data was tokenised with "
            "another tokenizer; save the model's tokenizer beside its weights or pass pre-tokenised data"
        )


def trace_from_files(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    data: str | os.PathLike = "corpus",
    split: str = "validation",
    domains: Sequence[str] | None = None,
    options: TraceOptions | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> Trace:
    """Load `model` (default: the shipped reference model) and `data` (see
    `moelab.trace.data.load_streams`) and trace it into `out`: what `moelab trace` runs. `model`
    may be a shipped model's name."""
    model = model_dir(model)  # the directory the output must stay out of, the default's too
    inputs = [model, data if data != "corpus" else None]
    check_output_dir(out, KIND, inputs=inputs, overwrite=overwrite)  # before the slow load
    loaded = load_model(model, quiet=quiet)
    if loaded.view is not None and loaded.encoder is None:  # moelab's tokenizer means nothing to this model
        raise ValueError(
            f"{model} has no tokenizer files (tokenizer.json); moelab needs the model's tokenizer to read the "
            "text: save it beside the weights (tokenizer.save_pretrained)"
        )
    streams = load_streams(data, split=split, domains=domains, encoder=loaded.encoder, quiet=quiet)
    source = {"data": str(data)} | ({"split": split} if str(data) == "corpus" else {})
    return trace_model(
        loaded, streams, out, options, overwrite=overwrite, inputs=inputs, source=source, quiet=quiet
    )
