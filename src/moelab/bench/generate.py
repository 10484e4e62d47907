"""`moelab bench generate`: decode speed of moelab's `generate` against transformers' on the
same weights, and against the machine's memory-bandwidth bound, all measured in one run.

For each model (a moelab checkpoint; its transformers counterpart is built in memory from
`export_state`, Mixtral where the model maps to it, else Qwen2-MoE; a model no transformers
family computes, e.g. with top-p routing, is timed without it) and batch size: random
prompts of `prompt_tokens`, then `new_tokens` greedy tokens, in `dtype` (fp32 or bf16), on `device`
(a CPU's `threads` intra-op threads, or a CUDA GPU). Every round runs both implementations once,
in a shuffled order; tokens/s is the median over rounds and `ratio` the median of the per-round
ratios (transformers' time / moelab's), so both sides of a ratio saw the same machine load. The greedy tokens are compared too.
The time is the decode steps', from the first new token (which the prompt pass yields; each
`generate` is given a streamer that notes when it arrives) to the last: new_tokens - 1 tokens a
sequence. The prompt pass's median is reported apart (`prompt_s`). (On a GPU the streamer's copies
of each step's tokens to the host make moelab's steps wait for each other, as transformers' do anyway.)

With `skip` ratios, moelab also decodes with NAEE's dynamic skipping at each ratio β (a chosen
expert whose weight is below β times the token's largest is dropped), timed in the same rounds,
and the model's test perplexity and experts per token are measured at each β. With `top_p`
thresholds, a model with top-p routers (adaptive k, "harder tokens need more experts") decodes
with its routers' threshold set to each, measured the same way.

The bound: a decode step must read every weight it uses once (attention, norms, routers, the
output head, the experts its tokens were routed to, counted from the routing of an untimed
moelab run: a routing variant's own, skipped experts left out) and the KV cache so far. bound tokens/s = measured read bandwidth (a matrix-vector
product over a 256 MB matrix: what a perfect decode step would reach) / bytes per token,
with the bandwidth measured again in every round beside the timed runs, so that the fraction of
the bound (the median of the per-round fractions) holds when the machine's speed drifts. On a small
model the weights may stay in the CPU's caches, which the bound (DRAM bandwidth)
does not credit.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from moelab.bench.layer import DTYPES, synchronize
from moelab.bench.load import busy_processes
from moelab.bench.machine import device_name, openmp_env, source_commit
from moelab.bench.rounds import bound_tokens_per_s, fraction_of_bound, speedup
from moelab.bench.skipping import loss_and_experts, test_batches
from moelab.compress.skipping import apply_dynamic_skipping
from moelab.files import read_json_object
from moelab.hf.export import export_problems, exported_model
from moelab.models import MoETransformer, load_pretrained
from moelab.nn.routers import TopPRouter, skip_weak_experts
from moelab.threads import intra_op_threads
from moelab.validation import check_device, is_int

JSON_FORMAT = "moelab-bench-generate/1"


@dataclass(frozen=True)
class GenerateOptions:
    """batch_sizes: sequences decoded together; prompt_tokens, new_tokens: per sequence; dtype:
    the weights' and activations' ("fp32" or "bf16", both implementations);
    rounds: timed rounds per implementation; threads: intra-op threads; load: busy processes
    beside the benchmark (`moelab.bench.load`); skip: NAEE dynamic-skipping ratios to time beside
    plain decoding; eval_tokens: test tokens for the perplexity at each skipping ratio; compile:
    also time `generate(compile=True)` (the compiled static step; its one-time compilation is in
    the untimed warm-up)."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_tokens: int = 16
    new_tokens: int = 64
    rounds: int = 3
    threads: int = 1
    load: int = 0
    skip: tuple[float, ...] = ()
    top_p: tuple[float, ...] = ()
    eval_tokens: int = 4096
    compile: bool = False
    dtype: str = "fp32"
    device: str = "cpu"

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "rounds", "threads"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.new_tokens < 2:  # the first token comes from the prompt pass: no decode step to time
            raise ValueError(f"new_tokens must be >= 2 (a decode step after the prompt), got {self.new_tokens}")
        if not self.batch_sizes or any(not is_int(b) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if not is_int(self.load) or self.load < 0:
            raise ValueError(f"load must be an integer >= 0 (busy processes), got {self.load!r}")
        if any(not 0 < ratio <= 1 for ratio in self.skip):
            raise ValueError(f"dynamic-skipping ratios must lie in (0, 1], got {list(self.skip)}")
        if any(not 0 < p <= 1 for p in self.top_p):
            raise ValueError(f"top-p thresholds must lie in (0, 1], got {list(self.top_p)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not is_int(self.eval_tokens) or self.eval_tokens < 16:
            raise ValueError(f"eval_tokens must be an integer >= 16, got {self.eval_tokens!r}")
        check_device(self.device)


def memory_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5, device: str = "cpu") -> float:
    """Read bandwidth: the bytes per second a matrix-vector product streams from an fp32 matrix
    far larger than any CPU cache (the operation a decode step is made of; best of `repeats`,
    on this process's threads), or on a GPU from its memory (a GPU's cache is tens of MB)."""
    matrix = torch.ones(megabytes * 2**18 // 4096, 4096, device=device)
    vector = torch.ones(4096, device=device)
    torch.mv(matrix, vector)
    best = min(_timed(lambda: torch.mv(matrix, vector), device) for _ in range(repeats))
    return matrix.nbytes / best / 1e9


def _timed(fn, device: str = "cpu") -> float:
    """Seconds `fn` takes, waiting for a GPU's queued work on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def family_for(model: MoETransformer) -> str | None:
    """Mixtral where the model maps to it exactly, else Qwen2-MoE, else None (no transformers
    family computes it: top-p routing, UoE, ...)."""
    for family in ("mixtral", "qwen2_moe"):
        if not export_problems(model.config, family):
            return family
    return None


def bytes_per_step(
    model: MoETransformer, experts_per_layer: dict[int, float], batch: int, context: float
) -> float:
    """Bytes a decode step of `batch` sequences must read: every parameter but the routed experts
    and the embedding (one row per sequence), the experts in `experts_per_layer` (distinct
    experts a step routes to, by layer), and the KV cache at `context` positions."""
    expert_params = {id(p) for layer in model.moe_layers.values() for p in layer.experts.parameters()}
    size = 0.0
    for name, p in model.named_parameters():  # tied weights appear once
        if id(p) in expert_params:
            continue
        if p is model.embed.weight and p is not model.lm_head.weight:
            size += batch * p[0].nbytes
        else:
            size += p.nbytes
    for index, distinct in experts_per_layer.items():
        experts = model.moe_layers[index].experts
        size += distinct * sum(p.nbytes for p in experts.parameters()) / experts.num_experts
    cfg = model.config
    size += (
        2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * context * model.embed.weight.element_size()
    )
    return size


def distinct_experts_per_step(
    model: MoETransformer, prompts: torch.Tensor, new_tokens: int
) -> dict[int, float]:
    """Mean number of distinct experts each MoE layer routes a decode step's tokens to (an
    untimed `generate`; prefill calls excluded): the routed experts whose weights a step reads,
    not zero-computation (identity) experts, which read none, nor those dynamic skipping drops."""
    counts: dict[int, list[int]] = {i: [] for i in model.moe_layers}

    def hook(index):
        layer = model.moe_layers[index]
        num_experts = layer.num_experts  # the router's choices past these are identity experts

        def record(module, args, routing):
            if args[0].shape[0] == prompts.shape[0]:  # one token per sequence: a decode step
                indices = routing.indices
                if layer.skip_ratio is not None:  # dropped after the router, as `MoELayer._route` drops them
                    indices, _ = skip_weak_experts(indices, routing.weights, layer.skip_ratio, num_experts)
                chosen = indices[(indices >= 0) & (indices < num_experts)]
                counts[index].append(int(chosen.unique().numel()))

        return record

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in model.moe_layers.items()]
    try:
        model.generate(prompts, new_tokens, greedy=True)
    finally:
        for handle in handles:
            handle.remove()
    return {i: statistics.mean(c) for i, c in counts.items() if c}


def measure_model(
    name: str,
    model_dir: Path,
    model: MoETransformer,
    options: GenerateOptions,
    progress=None,
) -> list[dict]:
    """One row per batch size: tokens/s of each implementation, its ratio to transformers, the
    bound and each implementation's fraction of it. `model` is `model_dir` loaded."""
    family = family_for(model)
    n = options.new_tokens
    run = {"moelab": lambda ids, streamer=None: model.generate(ids, n, greedy=True, streamer=streamer)}
    if family is not None:
        hf = exported_model(model_dir, family).to(options.device, DTYPES[options.dtype])
        hf.generation_config.eos_token_id = None  # decode exactly new_tokens, as moelab's generate does
        hf.generation_config.pad_token_id = 0
        run["transformers"] = lambda ids, streamer=None: hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, streamer=streamer
        )
    base = "transformers" if family is not None else "moelab"  # what ratios and token checks refer to
    if options.compile:  # a copy of its own: its compiled step keeps the weights row-major (see generate)
        compiled = copy.deepcopy(model)
        run["moelab_compiled"] = lambda ids, streamer=None: compiled.generate(
            ids, n, greedy=True, compile=True, streamer=streamer
        )
    for variant, (setting, value) in routing_variants(options).items():
        run[f"moelab_{variant}"] = _with_setting(model, setting, value, n)
    steps = n - 1  # timed: the decode steps after the prompt pass
    rows = []
    for batch in options.batch_sizes:
        if progress is not None:
            progress(f"{name} batch {batch}")
        prompts = torch.randint(
            0,
            model.config.vocab_size,
            (batch, options.prompt_tokens),
            generator=torch.Generator().manual_seed(batch),
        ).to(options.device)
        with torch.no_grad():
            outputs = {impl: go(prompts) for impl, go in run.items()}  # warm-up, and the tokens compared
            times: dict[str, list[float]] = {impl: [] for impl in run}  # the decode steps' seconds
            prompt_times: dict[str, list[float]] = {impl: [] for impl in run}
            bandwidths = []  # GB/s, one per round
            order = [*run, None]  # None: measure the read bandwidth
            for _ in range(options.rounds):
                random.shuffle(order)
                for impl in order:
                    if impl is None:
                        bandwidths.append(memory_bandwidth_gb_s(repeats=3, device=options.device))
                        continue
                    prompt_s, decode_s = _timed_decode(run[impl], prompts, options.device)
                    prompt_times[impl].append(prompt_s)
                    times[impl].append(decode_s)
            distinct = distinct_experts_per_step(model, prompts, options.new_tokens)
            variant_distinct = {}  # a routing variant reads the experts it routes to, not plain routing's
            for variant, setting in routing_variants(options).items():
                with routing_setting(model, *setting):
                    variant_distinct[f"moelab_{variant}"] = distinct_experts_per_step(model, prompts, options.new_tokens)
        context = options.prompt_tokens + options.new_tokens / 2  # the mean cache a decode step reads
        step_bytes = bytes_per_step(model, distinct, batch, context)
        variant_bytes = {impl: bytes_per_step(model, d, batch, context) for impl, d in variant_distinct.items()}
        bounds = {  # tokens/s, one per round
            impl: [bound_tokens_per_s(gb_s, variant_bytes.get(impl, step_bytes) / batch) for gb_s in bandwidths]
            for impl in run
        }
        speed = {impl: batch * steps / statistics.median(t) for impl, t in times.items()}
        new = slice(options.prompt_tokens, None)
        rows.append({
            "model": name,
            "family": family,
            "batch": batch,
            "tokens_per_s": speed,
            "ratio_vs_transformers": {
                impl: speedup(times[base], t) for impl, t in times.items()
            } if family is not None else None,
            "speedup_vs_moelab": {  # the routing variants' speed-up over plain moelab, same rounds
                impl: speedup(times["moelab"], t) for impl, t in times.items()
            },
            "fraction_of_bound": {  # each against its own bound (a routing variant's: the experts it reads)
                impl: fraction_of_bound(batch * steps, t, bounds[impl]) for impl, t in times.items()
            },
            "prompt_s": {impl: statistics.median(t) for impl, t in prompt_times.items()},
            "bytes_per_token": step_bytes / batch,
            "distinct_experts_per_layer": statistics.mean(distinct.values()) if distinct else 0.0,
            "memory_bandwidth_gb_s": statistics.median(bandwidths),
            "bound_tokens_per_s": statistics.median(bounds["moelab"]),
            "routing_variant_bytes_per_token": {impl: b / batch for impl, b in variant_bytes.items()},
            "same_greedy_tokens": {  # as transformers' (as plain moelab's without a transformers family)
                impl: float((out[:, new] == outputs[base][:, new]).all(-1).float().mean())
                for impl, out in outputs.items()
            },
        })  # fmt: skip
    return rows


def routing_variants(options: GenerateOptions) -> dict[str, tuple[str, float]]:
    """{name: (setting, value)} of the inference-time routing variants timed beside plain decoding:
    "skip0.2": NAEE dynamic skipping at β = 0.2, "topp0.4": top-p routers' threshold set to 0.4."""
    return {f"skip{r:g}": ("skip", r) for r in options.skip} | {f"topp{p:g}": ("top_p", p) for p in options.top_p}


@contextlib.contextmanager
def routing_setting(model: MoETransformer, setting: str, value: float):
    """Run `model` with dynamic skipping at ratio `value` ("skip") or its top-p routers' threshold
    at `value` ("top_p": adaptive k), restored afterwards."""
    if setting == "skip":
        apply_dynamic_skipping(model, dict.fromkeys(model.moe_layers, value))
        try:
            yield
        finally:
            apply_dynamic_skipping(model, None)
        return
    routers = [moe.router for moe in model.moe_layers.values() if isinstance(moe.router, TopPRouter)]
    if not routers:
        raise ValueError(
            "--top-p sets the threshold of top-p routers (adaptive k), but this model has none; pass a model "
            "trained with router='topp' (e.g. configs/models/topp.yaml)"
        )
    trained = [router.top_p for router in routers]
    for router in routers:
        router.top_p = value
    try:
        yield
    finally:
        for router, p in zip(routers, trained):
            router.top_p = p


def _with_setting(model: MoETransformer, setting: str, value: float, new_tokens: int):
    """generate under `routing_setting(model, setting, value)`."""

    def generate(ids: torch.Tensor, streamer=None) -> torch.Tensor:
        with routing_setting(model, setting, value):
            return model.generate(ids, new_tokens, greedy=True, streamer=streamer)

    return generate


class _FirstTokenClock:
    """A streamer (`generate`'s, transformers' too) that notes when the first new token arrives:
    its second `put`, after the prompts'. The token comes to the host, so the prompt pass is done."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, ids: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _timed_decode(generate, prompts: torch.Tensor, device: str = "cpu") -> tuple[float, float]:
    """(seconds to the first new token: the prompt pass, seconds from it to the last: the decode
    steps) of `generate(prompts, streamer=...)`."""
    clock = _FirstTokenClock()
    synchronize(device)
    start = time.perf_counter()
    generate(prompts, streamer=clock)
    synchronize(device)
    end = time.perf_counter()
    return clock.first - start, end - clock.first


def routing_quality(model: MoETransformer, options: GenerateOptions, quiet: bool = False) -> dict[str, dict[str, float]]:
    """{"none" or a `routing_variants` name: test perplexity and experts per token}; quiet: no
    tokenizing bars."""
    batches = [
        (inputs.to(options.device), targets.to(options.device))
        for inputs, targets in test_batches(options.eval_tokens, min(256, model.config.max_seq_len), 8, quiet=quiet)
    ]
    top = max(int(inputs.max()) for inputs, _ in batches)
    if top >= model.config.vocab_size:
        raise ValueError(
            f"the corpus's token id {top} is outside the model's vocabulary ({model.config.vocab_size}): "
            "the perplexity under --skip / --top-p needs a model trained with moelab's tokenizer"
        )
    quality = {}
    variants = {"none": None} | routing_variants(options)
    for name, variant in variants.items():
        with routing_setting(model, *variant) if variant else contextlib.nullcontext():
            measured = loss_and_experts(model, batches)
        quality[name] = {"perplexity": math.exp(measured["loss"]), "experts_per_token": measured["experts_per_token"]}
    return quality


def check_context(name: str, config: dict, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse a benchmark whose prompts and new tokens pass the context of the model `name` (its
    config.json `config`: moelab's max_seq_len, a transformers language model's
    max_position_embeddings; not checked where it states neither)."""
    context = config.get("max_seq_len") or config.get("max_position_embeddings")
    if isinstance(context, int) and prompt_tokens + new_tokens > context:
        raise ValueError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} pass {name}'s context of {context} tokens; "
            "ask for fewer"
        )


def run(models: dict[str, Path], options: GenerateOptions, progress=None, quiet: bool = False) -> dict:
    """The whole benchmark over `models` ({name: moelab checkpoint directory}); the JSON document.
    progress: called with what is measured now; quiet: no tokenizing bars."""
    for name, path in models.items():  # every one before the first is measured
        config = read_json_object(Path(path) / "config.json", "a model config")
        check_context(name, config, options.prompt_tokens, options.new_tokens)
    with intra_op_threads(options.threads), busy_processes(options.load):
        rows, quality = [], {}
        for name, path in models.items():
            model = load_pretrained(path).eval().to(options.device, DTYPES[options.dtype])
            rows += measure_model(name, path, model, options, progress)
            if routing_variants(options):
                quality[name] = routing_quality(model, options, quiet)
    return {
        "format": JSON_FORMAT,
        "setup": {**asdict(options), "torch": torch.__version__, "transformers": _transformers_version(),
                  # the fractions of the bound use each round's own measurement; this is the median of the cells'
                  "memory_bandwidth_gb_s": statistics.median(r["memory_bandwidth_gb_s"] for r in rows),
                  "bandwidth_measure": "read: fp32 matrix-vector product over 256 MB",
                  "device_name": device_name(options.device), "commit": source_commit(), "openmp_env": openmp_env()},
        "results": rows,
        "routing_quality": quality,
    }  # fmt: skip


def _where(setup: dict) -> str:
    """"2 thread(s)" on a CPU, the GPU's name on CUDA (files written before the device option: CPU)."""
    return setup["device_name"] if setup.get("device") == "cuda" else f"{setup['threads']} thread(s)"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def render(doc: dict) -> Table:
    setup = doc["setup"]
    table = Table(
        title=f"Greedy decode, {setup.get('dtype', 'fp32')}, {_where(setup)}, {setup['new_tokens']} new tokens"
        + (f", {setup['load']} busy process(es) beside" if setup["load"] else ""),
        caption=f"tok/s: the decode steps' (the prompt pass left out); bound: read bandwidth (measured every "
        f"round, median {setup['memory_bandwidth_gb_s']:.1f} GB/s) / bytes a token must read; "
        "x transformers: median of same-round ratios",
    )
    for column in ("model", "batch", "impl", "tok/s", "x transformers", "of bound", "same tokens"):
        table.add_column(column, justify="right")
    for r in doc["results"]:
        for impl, speed in r["tokens_per_s"].items():
            ratio = "-" if r["ratio_vs_transformers"] is None else f"{r['ratio_vs_transformers'][impl]:.2f}"
            table.add_row(
                f"{r['model']} ({r['family'] or 'no transformers family'})", str(r["batch"]), impl, f"{speed:,.0f}",
                ratio, f"{r['fraction_of_bound'][impl]:.1%}", f"{r['same_greedy_tokens'][impl]:.0%}",
            )  # fmt: skip
    return table


def render_routing(doc: dict) -> Table:
    """Inference-time routing variants (dynamic skipping, top-p thresholds): test perplexity,
    experts per token and decode speed-up of each."""
    table = Table(title="routing at decode: dynamic skipping (skipβ), top-p threshold (toppP); speed-up ÷ plain moelab, same rounds")
    batches = sorted({r["batch"] for r in doc["results"]})
    for column in ("model", "variant", "perplexity", "change", "experts/token", *(f"speed-up b{b}" for b in batches)):
        table.add_column(column, justify="right")
    for model, quality in doc["routing_quality"].items():
        base = quality["none"]["perplexity"]
        rows = {r["batch"]: r["speedup_vs_moelab"] for r in doc["results"] if r["model"] == model}
        for name, q in quality.items():
            impl = "moelab" if name == "none" else f"moelab_{name}"
            speedups = [f"{rows[b][impl]:.2f}" for b in batches]
            table.add_row(model, name, f"{q['perplexity']:.1f}", f"{q['perplexity'] / base - 1:+.1%}",
                          f"{q['experts_per_token']:.2f}", *speedups)  # fmt: skip
    return table
