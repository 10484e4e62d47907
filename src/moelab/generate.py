"""Text in, text out: `moelab generate "prompt" ["prompt" ...] --model DIR`, in memory or with the
experts offloaded.

    text, stats = generate_text("runs/ref-8e-top2-pruned", "def main():", max_new_tokens=64,
                                resident=0.25)
    texts, stats = generate_texts("runs/ref-8e-top2-pruned", ["def main():", "Once upon a time"])

The model is any checkpoint the other commands read (moelab's or a transformers family), its
tokenizer the one saved beside it (moelab's shipped tokenizer for a moelab checkpoint without
one). In memory, a transformers checkpoint that moelab's decoder represents exactly (Mixtral,
Qwen2-MoE with zero attention biases: `moelab.hf.conversion`) runs as a moelab model, converted
as it loads (the statistics' "engine" says which ran). Decoding is greedy, or draws tokens
(`sampling=Sampling(temperature, top_p, top_k, seed)`); several prompts decode as one batch,
left-padded. With `resident` or `memory_budget` the routed experts are offloaded
(`moelab.offload`: `policy` picks the eviction and read-ahead; a routing prior from a trace,
`moelab trace`, sharpens the eviction policy), so nothing beyond the budget is loaded.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moelab.data import TOKENIZER_DIR
from moelab.files import read_json_object
from moelab.hf.checkpoint import DTYPES, Checkpoint, CheckpointError
from moelab.hf.conversion import CONVERTIBLE_FAMILIES, conversion_problems, moelab_model
from moelab.hf.loading import check_transformers_knows
from moelab.hf.multimodal import language_config
from moelab.hf.quantized import PLAIN_DTYPES, stated_dtype
from moelab.models.reference import model_dir
from moelab.models.transformer import MoETransformer, Sampling, TokenStreamer, decode_cache_length
from moelab.offload import POLICIES, RoutingPrior, load_offloaded
from moelab.offload.model import generate_ids
from moelab.trace import load_model
from moelab.validation import check_choice, check_device

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """"1.5GiB", "800MB", "123456" -> bytes."""
    match = SIZE.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GiB, 800MB or a number of bytes")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "b").lower()])


def load_tokenizer_of(path: str | os.PathLike):
    """The tokenizer saved in the checkpoint directory, else moelab's shipped one (no downloads)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "config.json").is_file():  # moelab's errors before transformers' (it reads it too)
        read_json_object(path / "config.json", "a model config")
        check_transformers_knows(path)
    source = path if _has_tokenizer(path) else TOKENIZER_DIR
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:  # transformers' advice (remote code, extra packages) does not apply
        raise ValueError(
            f"cannot read the tokenizer in {source} (tokenizer.json, tokenizer_config.json): "
            f"{str(err).splitlines()[0]}; moelab reads a tokenizer.json with its config and never runs a "
            "checkpoint's own code"
        ) from None


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def generate_text(path: str | os.PathLike, prompt: str, **options: Any) -> tuple[str, dict[str, Any]]:
    """(the prompt's continuation, statistics): `generate_texts` for one prompt."""
    texts, stats = generate_texts(path, [prompt], **options)
    return texts[0], stats


def generate_texts(
    path: str | os.PathLike,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    resident: float | None = None,
    memory_budget: int | None = None,
    prior: RoutingPrior | None = None,
    policy: str = "reuse",
    compile: bool = False,
    dtype: torch.dtype | str = "auto",
    device: str = "cpu",
    host_memory: bool = False,
    streamer: TokenStreamer | None = None,
    sampling: Sampling | None = None,
    ignore_eos: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """(each prompt's continuation, up to the tokenizer's end-of-text token unless ignore_eos;
    statistics: "steps" decoded (max_new_tokens, or fewer where every prompt's text ended),
    "seconds" and "tokens_per_s" of the decoding, the prompts included (tokens/s: the steps'
    tokens of every prompt), "threads" (torch's intra-op threads), "later_tokens_per_s": the rate of the
    steps after the first two (without the prompts' pass and the first one-token step, where a
    compiled step is traced; None for fewer than 3 tokens, and on a GPU without a streamer, which
    would wait for every step), "dtype" it computed in, and with offloading the expert cache's).
    The prompts decode as one
    batch, each left-padded to the longest (`attention_mask` of `MoETransformer.generate`), as each
    would alone. resident or memory_budget (bytes; it keeps room for the KV cache of every prompt's
    positions and, in a model with recurrent layers, each prompt's state: `_kv_cache_tokens`,
    kv_cache_sequences and the padded prompt's kv_cache_prompt_tokens of `load_offloaded`):
    offload the routed experts (`load_offloaded`), with
    `prior` (routing statistics, e.g. `RoutingPrior.from_trace`) for the eviction policy if given, and `policy` (a name of
    `moelab.offload.POLICIES`: eviction and read-ahead). compile: decode with a compiled
    static step (`MoETransformer.generate(compile=True)`; moelab checkpoints, in memory or
    offloaded without read-ahead; the one-time compilation, seconds, is part of the time). dtype
    ("auto": `decode_dtype`), device: what the model computes in and where ("cuda": an offloaded
    model's cache in GPU memory;
    host_memory: every expert also kept in pinned host memory, `load_offloaded`). streamer: told
    each step's tokens (`MoETransformer.generate`; e.g. transformers' `TextStreamer(tokenizer,
    skip_prompt=True)`, which prints one prompt's continuation as it decodes). sampling: draw each
    token (`moelab.models.Sampling`; one seed and the same prompts give one text), else greedy.
    ignore_eos: decode max_new_tokens whatever comes (as benchmarks do). `path` may be a shipped
    model's name."""
    path = model_dir(path)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; for one prompt call generate_text")
    empty = [i for i, prompt in enumerate(prompts) if not prompt]
    if not prompts or empty:
        which = "the prompt is" if len(prompts) <= 1 else f"prompts {empty} (from 0) are"
        raise ValueError(f"{which} empty; give some text to continue")
    for i, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # bytes a shell passed that are not UTF-8 (surrogate escapes)
            which = "the prompt" if len(prompts) == 1 else f"prompt {i} (from 0)"
            raise ValueError(
                f"{which} is not UTF-8 text (byte {prompt[err.start]!r} at position {err.start}); "
                "give the prompt in UTF-8"
            ) from None
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(dtype, str) and dtype != "auto":
        raise ValueError(f"dtype is 'auto' or a torch.dtype (torch.bfloat16, torch.float32), got {dtype!r}")
    check_device(device)
    offloaded = resident is not None or memory_budget is not None
    check_choice("offload policy", policy, POLICIES)
    eviction, predictor, prefetch_factor = POLICIES[policy]
    if compile and offloaded and predictor is not None:
        raise ValueError(
            f"compile=True cannot read ahead (policy {policy!r}); use the policy 'reuse' or 'lru' (--policy), or "
            "drop compile (--compile)"
        )
    tokenizer = load_tokenizer_of(path)
    eos = None if ignore_eos else tokenizer.eos_token_id
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    config_path = Path(path) / "config.json"
    # a multimodal release's vocabulary and context are its language model's (text_config)
    config = language_config(read_json_object(config_path, "a model config")) if config_path.is_file() else {}
    _check_vocabulary(path, config, encoded)
    ids, mask = _left_padded(encoded, prompts, device)
    dtype = decode_dtype(path, config, device) if dtype == "auto" else dtype
    # the clock needs each step's tokens on the host: on a GPU only where a streamer takes them anyway
    clock = _StepClock(streamer) if streamer is not None or device == "cpu" else None
    if not offloaded:
        model = model_in_memory(path, dtype, config).to(device)
        start = time.perf_counter()
        out = generate_ids(
            model, ids, max_new_tokens, attention_mask=mask, compile=compile, streamer=clock,
            sampling=sampling, eos_token_id=eos,
        )  # fmt: skip
        stats = _speed(start, out, out.shape[1] - ids.shape[1]) | _later_rate(clock)
        stats["engine"] = "moelab" if isinstance(model, MoETransformer) else "transformers"
        return _continuations(tokenizer, out, ids.shape[1], eos), stats | {"dtype": dtype}
    kv_cache_tokens = None if memory_budget is None else _kv_cache_tokens(config, ids, max_new_tokens, compile)
    # the padded prompt's positions (at most those the room counts: a prompt past the context is refused naming it)
    prompt_tokens = None if kv_cache_tokens is None else min(ids.shape[1], kv_cache_tokens // ids.shape[0])
    model = load_offloaded(
        path, resident=resident, memory_budget=memory_budget, kv_cache_tokens=kv_cache_tokens,
        kv_cache_sequences=ids.shape[0], kv_cache_prompt_tokens=prompt_tokens,
        prior=prior, eviction=eviction, predictor=predictor,
        prefetch_factor=prefetch_factor, dtype=dtype, device=device, host_memory=host_memory,
    )  # fmt: skip
    try:
        start = time.perf_counter()
        out = model.generate(
            ids, max_new_tokens, attention_mask=mask, compile=compile, streamer=clock, sampling=sampling,
            eos_token_id=eos,
        )  # fmt: skip
        stats = _speed(start, out, out.shape[1] - ids.shape[1]) | _later_rate(clock)
        decode = model.cache.stats.get(len(prompts))  # a decode step: one token per prompt
        stats |= {
            "slots": model.cache.slots,
            "decode_hit_rate": None if decode is None else decode.hit_rate,
            "experts_read": model.cache.total().misses + model.cache.prefetch_stats.issued,
            "prefetch_accuracy": model.cache.prefetch_stats.accuracy,
            "dtype": dtype,
        }
    finally:
        model.close()
    return _continuations(tokenizer, out, ids.shape[1], eos), stats


def decode_dtype(path: str | os.PathLike, config: dict, device: str) -> torch.dtype:
    """What `generate` computes in by default ("auto"): bf16 where the checkpoint holds its weights
    in bf16 (config.json's `dtype` or `torch_dtype`; a quantized one's dequantized dtype,
    `stated_dtype`; else the most common of its stored floating-point tensors': moelab's
    checkpoints) and the device multiplies in it natively (a GPU; a CPU with a native bf16 matmul,
    oneDNN's AVX512-BF16 or AMX); float32 otherwise: fp16 weights too (not every family runs in
    fp16), and on a CPU without one (bf16 runs tens of times slower than float32 there)."""
    stated = config.get("dtype") or config.get("torch_dtype")
    if "quantization_config" in config:
        stored = stated_dtype(config)
    elif stated is not None:
        stored = PLAIN_DTYPES.get(stated, torch.float32)
    else:
        stored = _stored_dtype(path)
    if stored != torch.bfloat16:
        return torch.float32
    return stored if device != "cpu" or cpu_multiplies_bf16() else torch.float32


def _stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The most common dtype of the checkpoint's floating-point tensors (float32 where it has none
    moelab reads, or no safetensors files)."""
    try:
        with Checkpoint(path) as checkpoint:
            names = Counter(checkpoint.entry(key)[0] for key in checkpoint.keys())
    except CheckpointError:  # no *.safetensors: what loads it says why
        return torch.float32
    plain = set(PLAIN_DTYPES.values())
    return next((DTYPES[name] for name, _ in names.most_common() if DTYPES.get(name) in plain), torch.float32)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has a native bf16 matmul (oneDNN's check: AVX512-BF16 or AMX)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()



def _kv_cache_tokens(config: dict, ids: torch.Tensor, max_new_tokens: int, compile: bool) -> int:
    """The room for the KV cache that a memory budget keeps: every sequence's positions, rounded
    as a compiled step rounds them where the model runs as moelab's (only moelab's compile) and at
    most the model's context (a longer call is refused when it starts, not by the budget)."""
    moelab_runs = config.get("model_type") in (None, *CONVERTIBLE_FAMILIES)
    limit = config.get("max_seq_len") or config.get("max_position_embeddings")
    return ids.shape[0] * decode_cache_length(ids.shape[1], max_new_tokens, compile and moelab_runs, limit)


def model_in_memory(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, config: dict | None = None
) -> torch.nn.Module:
    """The model at `path` (config.json: `config`, read if not given) in eval mode, as `generate`
    runs it: a moelab checkpoint, or a transformers one as a moelab model where it converts exactly
    (`moelab.hf.conversion`: it decodes faster so), else transformers' own model."""
    if config is None:
        config = read_json_object(Path(path) / "config.json", "a model config")
    if "model_type" in config and not conversion_problems(path):
        return moelab_model(path, dtype=dtype)
    return load_model(path, dtype=dtype, quiet=True).model


def _check_vocabulary(path: str | os.PathLike, config: dict, encoded: list[list[int]]) -> None:
    """Refuse prompts whose token ids the model (config.json: `config`) has no embedding for (a
    checkpoint without a tokenizer of its own gets moelab's, which may not be its own)."""
    vocab_size = config.get("vocab_size")
    largest = max(max(ids, default=0) for ids in encoded)
    if isinstance(vocab_size, int) and largest >= vocab_size:
        whose = "its own tokenizer" if _has_tokenizer(Path(path)) else f"moelab's tokenizer ({path} has none)"
        raise ValueError(
            f"the prompt encodes to token id {largest} with {whose}, past the model's vocabulary of "
            f"{vocab_size} tokens (config.json's vocab_size): the two do not belong together; save the "
            "model's own tokenizer beside it (tokenizer.json), or correct config.json"
        )


def _left_padded(
    encoded: list[list[int]], prompts: Sequence[str], device: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts' token ids as one [B, S] batch, each padded on the left to the longest (with
    token 0, never attended to), and its attention_mask (None where all are equally long)."""
    for ids, prompt in zip(encoded, prompts, strict=True):
        if not ids:
            raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    S = max(len(ids) for ids in encoded)
    batch = torch.tensor([[0] * (S - len(ids)) + ids for ids in encoded], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (S - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return batch, None if bool(mask.all()) else mask


def _continuations(tokenizer, out: torch.Tensor, prompt_len: int, eos: int | None) -> list[str]:
    """Each row's new tokens as text, up to its first `eos` (not included)."""
    rows = out[:, prompt_len:].tolist()
    return [tokenizer.decode(row[: row.index(eos)] if eos in row else row) for row in rows]


class _StepClock:
    """A streamer that notes when the prompts and each step's tokens come (a GPU's tokens are copied
    to the host as they come, so each note follows its step's work), and passes them on to `inner`."""

    def __init__(self, inner: TokenStreamer | None):
        self.inner, self.times, self.batch = inner, [], 1

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.batch = value.shape[0]
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    def later_rate(self) -> dict[str, float | None]:
        """{"later_tokens_per_s": new tokens/s of the steps after the first two} (see generate_texts)."""
        steps = len(self.times) - 1  # the first note is the prompts'
        if steps < 3:
            return {"later_tokens_per_s": None}
        return {"later_tokens_per_s": self.batch * (steps - 2) / (self.times[-1] - self.times[2])}


def _later_rate(clock: _StepClock | None) -> dict[str, float | None]:
    return {"later_tokens_per_s": None} if clock is None else clock.later_rate()


def _speed(start: float, out: torch.Tensor, steps: int) -> dict[str, float | int]:
    """The decode steps run, seconds since `start` (time.perf_counter) once `out` is computed (a
    GPU's queued work waited for), tokens/s (the steps' tokens of every sequence of the batch) and
    torch's intra-op threads."""
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    seconds = time.perf_counter() - start
    return {
        "steps": steps, "seconds": seconds, "tokens_per_s": out.shape[0] * steps / seconds,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
