"""`moelab bench offload`: decoding with the routed experts offloaded, at several cache sizes,
against a no-prefetch LRU cache (the Mixtral-offloading baseline) and the model held in memory.

For each model (a moelab checkpoint or a local transformers checkpoint): a routing prior is
measured on `calibration_tokens` of the corpus's train split (`RoutingPrior.measure`), then
`prompts` prompts of `prompt_tokens` test-split tokens are decoded greedily for `new_tokens`
tokens each, batch 1, on `threads` intra-op threads:

- in memory: the model loaded whole;
- for each resident fraction of the routed experts and each policy (`moelab.offload.POLICIES`),
  from the same warm start: no read-ahead with "lru" (LRU eviction) or "reuse" (reuse-distance
  eviction, `load_offloaded`'s default), and reuse-distance eviction with each layer's experts
  read ahead when its decoder layer starts, scored by the inter-layer affinity, the layer's
  router on the decoder layer's input (reading 1x, "lookahead-x1", or 1.5x the experts a token
  uses) or both.

With `compile`, the policies without read-ahead ("lru", "reuse") are also timed decoding with
moelab's compiled static step (`generate(compile=True)`: the fetch and the experts inside it as
one opaque op; moelab checkpoints only), traced by the warm-up decoding below; the model in
memory is timed compiled once as well (its own rounds, after the offloaded ones). A transformers checkpoint that does not convert to a moelab model
(`moelab.hf.conversion`) has no compiled rows.

Every cell is timed in `rounds` rounds, each on a freshly loaded offloaded model warmed up as the
model in memory was (a first decoding, untimed: its one-time work such as the decode layout, or
a compiled step's trace), then restarted from the same warm start (`ExpertCache.restart`: so with
the same hits), and paired with a run of the model in memory (alternating which goes first); tokens/s is the median
over rounds and "vs memory" the median of the per-round ratios, so both sides of a ratio saw the
same machine load. Reported per cell: the decode hit rate (experts found resident at their layer; "late" hits, still
loading from a prefetch, included and also given apart; on a GPU also the hits whose copy into
GPU memory was still running), prefetch accuracy (read-aheads then used, a precision; over all calls) and recall
(experts needed at the decode steps that the prediction had named: Mixtral-offloading's figure), experts read from disk per new
token and tokens/s (both over whole `generate` calls: the prompt passes' reads and time included, on
both sides of the ratio), its ratio to the model in memory, and whether the tokens equal the in-memory model's (they must
on a CPU; on a GPU the prompt pass runs other kernels in memory, equal up to rounding). The experts are read from the checkpoint's files through the OS
page cache: a small model's files stay cached, so tokens/s here prices the reading and copying,
not a disk, unless `read_gbps` emulates a device of that bandwidth (each read then lasts at least
an expert's bytes over it, one read at a time) or `page_cache` is False (each expert's pages are
dropped from the page cache before and after its read, so every read goes to the storage device,
as for a checkpoint far larger than memory); hit rates do not depend on the storage.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.table import Table

from moelab.bench.generate import check_context
from moelab.bench.layer import DTYPES, synchronize
from moelab.bench.machine import device_name, openmp_env, source_commit
from moelab.bench.skipping import test_batches
from moelab.data.tokenizer import load_tokenizer
from moelab.files import read_json_object
from moelab.generate import model_in_memory
from moelab.hf.multimodal import language_config
from moelab.models import MoETransformer
from moelab.offload import POLICIES, RoutingPrior, load_offloaded
from moelab.offload.model import generate_ids, warm_start
from moelab.threads import intra_op_threads
from moelab.trace import load_model
from moelab.validation import check_choice, check_device, is_int

JSON_FORMAT = "moelab-bench-offload/1"


@dataclass(frozen=True)
class OffloadOptions:
    """resident: fractions of the routed experts the cache holds; prompts, prompt_tokens,
    new_tokens: the decoding; calibration_tokens: train-split tokens for the routing prior;
    threads: intra-op threads; rounds: timed rounds per cell; read_gbps: emulated storage GB/s
    (None: the files as fast as the OS serves them); page_cache: False reads every expert from
    the storage device, past the OS page cache; compile: also time
    the compiled step; dtype: "fp32" or "bf16"; device: "cpu" or "cuda" (the model and the cache
    in GPU memory, experts copied from host buffers, `moelab.offload.copier`); host_memory: on a
    GPU, copy from a pinned host copy of every expert instead of reading the files."""

    resident: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0)
    prompts: int = 8
    prompt_tokens: int = 16
    new_tokens: int = 64
    calibration_tokens: int = 8192
    threads: int = 1
    rounds: int = 2
    read_gbps: float | None = None
    page_cache: bool = True
    compile: bool = False
    dtype: str = "fp32"
    device: str = "cpu"
    host_memory: bool = False

    def __post_init__(self):
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_device(self.device)
        if self.host_memory and self.device == "cpu":
            raise ValueError("host_memory needs device='cuda' (on a CPU the cache is in host memory already)")
        if not self.resident or any(not 0 < r <= 1 for r in self.resident):
            raise ValueError(f"resident fractions must lie in (0, 1], got {list(self.resident)}")
        for name in ("prompts", "prompt_tokens", "new_tokens", "threads", "rounds"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.new_tokens < 2:
            raise ValueError(
                f"new_tokens must be >= 2, got {self.new_tokens}: the first comes from the prompt's pass, and "
                "the hit rates are over the one-token steps after it"
            )
        if self.prompt_tokens < 2:
            raise ValueError(
                f"prompt_tokens must be >= 2, got {self.prompt_tokens}: the cache counts its hits per layer call's "
                "token count, and a one-token prompt's pass would be counted among the one-token decode steps"
            )
        if self.read_gbps is not None and not self.read_gbps > 0:
            raise ValueError(f"read_gbps must be > 0 (GB/s of emulated storage), got {self.read_gbps}")
        if not is_int(self.calibration_tokens) or self.calibration_tokens < 256:
            raise ValueError(f"calibration_tokens must be an integer >= 256, got {self.calibration_tokens!r}")


def _decode(
    model, prompts: list[torch.Tensor], new_tokens: int, compile: bool = False
) -> tuple[list[torch.Tensor], float]:
    device = prompts[0].device
    synchronize(device)
    start = time.perf_counter()
    out = [generate_ids(model, p, new_tokens, compile=compile) for p in prompts]
    synchronize(device)
    return out, time.perf_counter() - start


def measure_model(path: Path, options: OffloadOptions, progress=None, quiet: bool = False) -> dict:
    """Every cell of the module docstring for the checkpoint at `path`; quiet: no tokenizing bars."""
    loaded = load_model(path, quiet=True)
    seq_len = min(256, loaded.max_seq_len)
    calibration = [x for x, _ in test_batches(options.calibration_tokens, seq_len, 8, split="train", quiet=quiet)]
    prior = RoutingPrior.measure(loaded.model, calibration, loaded.view)
    del loaded  # the model in memory is loaded below as generate runs it
    too_few = f"the test split has too few tokens for {options.prompts} prompts of {options.prompt_tokens}; ask for fewer prompts"
    try:
        windows = test_batches(options.prompts * seq_len, seq_len, options.prompts, quiet=quiet)[0][0]
    except ValueError:  # more than the smallest domain's share
        raise ValueError(too_few) from None
    if windows.shape[0] < options.prompts or options.prompt_tokens > windows.shape[1]:
        raise ValueError(too_few)
    prompts = [windows[i : i + 1, : options.prompt_tokens].to(options.device) for i in range(options.prompts)]
    dtype = DTYPES[options.dtype]
    # the model in memory as `moelab generate` runs it (a convertible transformers checkpoint converted,
    # as `load_offloaded` runs it too), as it loads in that dtype
    memory_model = model_in_memory(path, dtype).to(options.device)
    _decode(memory_model, prompts[:1], 2)  # warm-up
    reference, _ = _decode(memory_model, prompts, options.new_tokens)
    tokens = options.prompts * options.new_tokens
    bandwidth = None if options.read_gbps is None else options.read_gbps * 1e9
    compiles = options.compile and isinstance(memory_model, MoETransformer)
    cells = [(policy, setting, False) for policy, setting in POLICIES.items()]
    cells += [(policy, POLICIES[policy], True) for policy in ("lru", "reuse") if compiles]
    rows, memory_times = [], []
    for resident in options.resident:
        for policy, (eviction, predictor, factor), compiled in cells:
            if progress:
                progress(f"{path.name}: {resident:.0%} resident, {policy}{' compiled' if compiled else ''}")
            ratios, times = [], []
            for round_ in range(options.rounds):  # each round from the same warm start: the same hits
                model = load_offloaded(
                    path, resident=resident, eviction=eviction, predictor=predictor, prefetch_factor=factor,
                    prior=prior, read_bandwidth=bandwidth, page_cache=options.page_cache, dtype=dtype,
                    device=options.device, host_memory=options.host_memory,
                )  # fmt: skip
                try:
                    # warmed up as the model in memory was (a compiled step: traced), then the cache
                    # started again: a first call's one-time work (the decode layout) is not timed
                    _decode(model.model, prompts[:1], options.new_tokens if compiled else 2, compile=compiled)
                    model.cache.restart(warm_start(model.cache.store, prior, model.cache.slots))
                    offloaded = partial(_decode, model.model, prompts, options.new_tokens, compile=compiled)
                    if round_ % 2:  # alternate which side runs first
                        got, seconds = offloaded()
                        memory = _decode(memory_model, prompts, options.new_tokens)[1]
                    else:
                        memory = _decode(memory_model, prompts, options.new_tokens)[1]
                        got, seconds = offloaded()
                    cache = model.cache
                finally:
                    model.close()
                ratios.append(memory / seconds)
                times.append(seconds)
                memory_times.append(memory)
            decode = cache.stats[1]
            reads = cache.total().misses + cache.prefetch_stats.issued
            rows.append({
                "resident": resident, "policy": policy, "compiled": compiled, "slots": cache.slots,
                "hit_rate": decode.hit_rate, "late_rate": decode.late / decode.requests,
                "late_copy_rate": decode.late_copies / decode.requests,
                "prefetch_accuracy": cache.prefetch_stats.accuracy,
                "prefetch_recall": decode.recall,  # the decode steps', as the hit rate (a prompt pass's names every expert)
                "reads_per_token": reads / tokens, "tokens_per_s": tokens / statistics.median(times),
                "vs_memory": statistics.median(ratios),
                "same_tokens": all(torch.equal(a, b) for a, b in zip(reference, got)),
            })  # fmt: skip
    in_memory = tokens / statistics.median(memory_times)
    in_memory_compiled = compiled_vs_memory = None
    if compiles:
        _decode(memory_model, prompts[:1], options.new_tokens, compile=True)  # trace
        pairs = []  # (eager, compiled) seconds of one round, in alternating order
        for round_ in range(options.rounds):
            compiled_first = bool(round_ % 2)
            first = _decode(memory_model, prompts, options.new_tokens, compile=compiled_first)[1]
            second = _decode(memory_model, prompts, options.new_tokens, compile=not compiled_first)[1]
            pairs.append((second, first) if compiled_first else (first, second))
        in_memory_compiled = tokens / statistics.median(c for _, c in pairs)
        compiled_vs_memory = statistics.median(e / c for e, c in pairs)
    return {
        "model": path.name,
        "experts": len(prior.layers) * int(prior.frequency[prior.layers[0]].numel()),
        "expert_bytes": cache.store.expert_bytes,
        "in_memory_tokens_per_s": in_memory,
        "in_memory_compiled_tokens_per_s": in_memory_compiled,
        "in_memory_compiled_vs_memory": compiled_vs_memory,  # median of same-round ratios
        "rows": rows,
    }


def run(models: dict[str, Path], options: OffloadOptions, progress=None, quiet: bool = False) -> dict:
    for path in models.values():  # every one before the first is measured
        _check_model(path, options)
    with intra_op_threads(options.threads):
        results = [measure_model(path, options, progress, quiet) for path in models.values()]
    return {
        "format": JSON_FORMAT, "options": options.__dict__, "torch": torch.__version__,
        "device_name": device_name(options.device), "commit": source_commit(), "openmp_env": openmp_env(),
        "models": results,
    }  # fmt: skip


def _check_model(path: Path, options: OffloadOptions) -> None:
    """The bench decodes moelab's corpus in moelab's tokenizer's ids: the model must embed them all,
    and hold a prompt and its new tokens in its context."""
    config = language_config(read_json_object(path / "config.json", "a model config"))
    check_context(path.name, config, options.prompt_tokens, options.new_tokens)
    vocab = config.get("vocab_size")
    needed = load_tokenizer().get_vocab_size()
    if isinstance(vocab, int) and vocab < needed:
        raise ValueError(
            f"{path} has a vocabulary of {vocab} tokens, but bench offload decodes moelab's corpus in moelab's "
            f"tokenizer's {needed} ids; benchmark a model of that tokenizer (or of a vocabulary at least as large)"
        )


def render(doc: dict) -> Table:
    table = Table(title="offloaded decoding (batch 1): hit rate and speed against LRU and the model in memory")
    for column in ("model", "resident", "policy", "hit rate", "late", "prefetch acc.", "recall", "reads/token", "tok/s", "vs memory", "same tokens"):
        table.add_column(column, justify="left" if column in ("model", "policy") else "right")  # fmt: skip
    for m in doc["models"]:
        table.add_row(m["model"], "in memory", "", "", "", "", "", "", f"{m['in_memory_tokens_per_s']:.0f}", "1.00", "")
        if m.get("in_memory_compiled_tokens_per_s"):
            compiled, ratio = m["in_memory_compiled_tokens_per_s"], m["in_memory_compiled_vs_memory"]
            table.add_row("", "in memory", "compiled", "", "", "", "", "", f"{compiled:.0f}", f"{ratio:.2f}", "")
        for r in m["rows"]:
            accuracy, recall = (_share(r.get(name)) for name in ("prefetch_accuracy", "prefetch_recall"))
            table.add_row(
                "", f"{r['resident']:.0%} ({r['slots']})", r["policy"] + (" compiled" if r.get("compiled") else ""),
                f"{r['hit_rate']:.1%}", f"{r['late_rate']:.0%}",
                accuracy, recall, f"{r['reads_per_token']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['vs_memory']:.2f}",
                "yes" if r["same_tokens"] else "NO",
            )  # fmt: skip
    return table


def _share(value: float | None) -> str:
    """A fraction as a percentage; "-" where there is none (NaN: nothing read ahead; None: a
    result file from before the figure)."""
    return "-" if value is None or value != value else f"{value:.0%}"
