"""`moelab bench layer`: MoE layer throughput against baselines measured in the same run.

Implementations, all with the same router (a Mixtral-style top-k `TopKRouter`):
  moelab: `MoELayer` (sort by expert -> grouped matmul -> fixed-order weighted combine); forward-only
          rounds run `MoELayer.infer`, the inference path.
  serial: the same `MoELayer` with its experts one after another on torch's intra-op threads
          (`moelab.nn.expert_threads.serial()`) instead of side by side on single-threaded workers.
  triton: the same `MoELayer` on the "triton" experts backend (moelab's Triton grouped GEMM for
          fp32 and fp16, the fused SwiGLU for every dtype), on CUDA with Triton installed.
  dense:  a SwiGLU FFN of width k*I, the same active FLOPs per token: the practical ceiling.
  loop:   the naive per-expert loop that indexes stacked weights `W[e]` under autograd.
  hf:     transformers' `MixtralExperts` with its default `grouped_mm` experts backend.

Every round runs each implementation once, in a shuffled order; tokens/s is the median over
rounds, and `ratio_vs_dense` the median over rounds of t_dense / t_impl within the round, so
that both sides of a ratio saw the same machine load.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import Tensor, nn

from moelab.bench.load import busy_processes
from moelab.bench.machine import openmp_env
from moelab.bench.rounds import speedup
from moelab.io import check_output_file, has_json_format, write_output_file
from moelab.nn import MoELayer, SwiGLUExperts, TopKRouter, triton_swiglu
from moelab.nn.expert_threads import serial
from moelab.threads import check_threads, resolve_threads
from moelab.validation import check_device, is_int

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("moelab", "serial", "triton", "dense", "loop", "hf")
JSON_FORMAT = "moelab-bench-layer/1"


@dataclass(frozen=True)
class LayerShape:
    name: str
    num_experts: int
    top_k: int
    hidden_dim: int
    dim: int = 512


# Equal active FLOPs: k * I = 2816 for both (the systems study's shapes).
SHAPES = {
    "e8k2": LayerShape("e8k2", num_experts=8, top_k=2, hidden_dim=1408),
    "e64k8": LayerShape("e64k8", num_experts=64, top_k=8, hidden_dim=352),
}


class DenseSwiGLU(nn.Module):
    """Dense SwiGLU FFN: x [T, D] -> [T, D] with gate/up fused as [2H, D]."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def naive_loop(router: TopKRouter, experts: SwiGLUExperts, x: Tensor) -> Tensor:
    """The per-expert loop of transformers' eager path, indexing `W[e]` inside autograd."""
    routing = router(x)
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(routing.indices == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, experts.down_proj[e])
        out.index_add_(0, token, y * routing.weights[token, slot, None].to(y.dtype))
    return out


def hf_experts(shape: LayerShape, experts: SwiGLUExperts) -> nn.Module | None:
    """transformers' MixtralExperts sharing moelab's expert weights, or None if unavailable."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        return None
    config = MixtralConfig(
        hidden_size=shape.dim,
        intermediate_size=shape.hidden_dim,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        experts_implementation="grouped_mm",
    )
    module = MixtralExperts(config)
    if getattr(module.config, "_experts_implementation", None) != "grouped_mm":
        return None  # a transformers without the experts-implementation switch
    module.gate_up_proj = experts.gate_up_proj
    module.down_proj = experts.down_proj
    return module


def _router(shape: LayerShape, skew: float, device: str) -> TopKRouter:
    router = TopKRouter(shape.dim, shape.num_experts, shape.top_k)
    if skew:
        # A bias ramp on the router logits makes the expert load uneven (max/mean about 2-3).
        router.bias = nn.Parameter(torch.linspace(skew, 0.0, shape.num_experts))
    return router.to(device)


@dataclass(frozen=True)
class Impl:
    """One implementation: `fn` x [T, D] -> [T, D], and the parameters its steps give gradients."""

    fn: Callable[[Tensor], Tensor]
    parameters: tuple[nn.Parameter, ...]

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def build_impls(shape: LayerShape, dtype: torch.dtype, skew: float = 0.0, device: str = "cpu") -> dict[str, Impl]:
    """Every implementation; all share router and expert weights."""
    router = _router(shape, skew, device)
    experts = SwiGLUExperts(shape.num_experts, shape.dim, shape.hidden_dim)
    moe = MoELayer(router, experts).to(device=device, dtype=dtype)
    dense = DenseSwiGLU(shape.dim, shape.top_k * shape.hidden_dim).to(device=device, dtype=dtype)
    def run_moelab(x: Tensor) -> Tensor:
        # forward-only runs the inference path (what evaluation and generation call), fwdbwd training's
        return moe(x)[0] if torch.is_grad_enabled() else moe.infer(x)

    def run_serial(x: Tensor) -> Tensor:
        with serial():  # the backward follows the forward's choice
            return run_moelab(x)

    def run_triton(x: Tensor) -> Tensor:
        default, experts.backend = experts.backend, "triton"  # the autograd graph keeps the forward's choice
        try:
            return run_moelab(x)
        finally:
            experts.backend = default

    moe_parameters = tuple(moe.parameters())
    impls = {"moelab": Impl(run_moelab, moe_parameters), "serial": Impl(run_serial, moe_parameters)}
    if torch.device(device).type == "cuda" and triton_swiglu.runs_on(torch.device(device), dtype):
        impls["triton"] = Impl(run_triton, moe_parameters)
    impls["dense"] = Impl(dense, tuple(dense.parameters()))
    impls["loop"] = Impl(lambda x: naive_loop(router, experts, x), moe_parameters)
    hf = hf_experts(shape, experts)
    if hf is not None:
        hf = hf.to(device)

        def run_hf(x: Tensor) -> Tensor:
            routing = router(x)
            return hf(x, routing.indices, routing.weights.to(x.dtype))

        impls["hf"] = Impl(run_hf, (*router.parameters(), *hf.parameters()))
    return impls


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a GPU's; a CPU has none)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_step(impl: Impl, x: Tensor, grad: Tensor, mode: str) -> float:
    """Seconds for one forward (inference mode) or forward+backward step. A forward+backward step
    starts without gradients, as a training step after `optimizer.zero_grad()` does (set_to_none,
    PyTorch's default): its gradients are new tensors, not added to the last step's."""
    for p in impl.parameters:
        p.grad = None
    synchronize(x.device)
    start = time.perf_counter()
    if mode == "fwd":
        with torch.inference_mode():
            impl(x)
    else:
        impl(x.detach().requires_grad_(True)).backward(grad)
    synchronize(x.device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class BenchOptions:
    configs: tuple[str, ...] = tuple(SHAPES)
    dtypes: tuple[str, ...] = tuple(DTYPES)
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    tokens: int = 4096
    rounds: int = 5
    skew: float = 2.0
    memory: bool = True
    device: str = "cpu"
    load: int = 0  # busy processes beside the benchmark (`moelab.bench.load`)
    threads: int | str = "auto"  # intra-op threads, or "auto": the cores free once the load runs

    @classmethod
    def create(cls, *, quick: bool = False, configs=None, dtypes=None, modes=None, tokens=None, rounds=None,
               skew: float = 2.0, memory: bool = True, device: str = "cpu", load: int = 0,
               threads: int | str = "auto") -> BenchOptions:
        """Defaults, or the --quick ones, overridden by what the caller gave (None: the default); validated."""
        options = cls(
            configs=tuple(configs or SHAPES),
            dtypes=tuple(dtypes or DTYPES),
            modes=tuple(modes or ("fwd", "fwdbwd")),
            tokens=(1024 if quick else 4096) if tokens is None else tokens,
            rounds=(2 if quick else 5) if rounds is None else rounds,
            skew=skew,
            memory=memory and not quick,
            device=device,
            load=load,
            threads=threads,
        )
        check_threads(options.threads)
        check_device(options.device)
        for name, values, valid in (
            ("config", options.configs, SHAPES),
            ("dtype", options.dtypes, DTYPES),
            ("mode", options.modes, ("fwd", "fwdbwd")),
        ):
            for value in values:
                if value not in valid:
                    raise ValueError(f"unknown {name} {value!r}; choose from {list(valid)}")
        for name in ("tokens", "rounds"):
            if not is_int(getattr(options, name)) or getattr(options, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(options, name)!r}")
        if not is_int(options.load) or options.load < 0:
            raise ValueError(f"load must be an integer >= 0 (busy processes), got {options.load!r}")
        if not math.isfinite(options.skew):
            raise ValueError(f"skew must be a finite number (0 = no skewed pass), got {options.skew}")
        return options

    def tokens_for(self, dtype: str) -> int:
        """CPUs without a native bf16 matmul run bf16 tens of times slower than fp32, so there
        bf16 uses at most 512 tokens (ratios stay comparable within the run); CPUs with one
        (AVX512-BF16, AMX: oneDNN says so) use the full token count."""
        if dtype == "bf16" and self.device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return min(self.tokens, 512)
        return self.tokens


def measure(
    shape: LayerShape, dtype: str, mode: str, tokens: int, rounds: int, skew: float = 0.0, device: str = "cpu"
) -> list[dict]:
    """Interleaved timing of every implementation; returns one JSON row per implementation."""
    torch.manual_seed(0)
    impls = build_impls(shape, DTYPES[dtype], skew, device)
    x = torch.randn(tokens, shape.dim, dtype=DTYPES[dtype], device=device)
    grad = torch.randn_like(x)
    for fn in impls.values():  # warm-up
        time_step(fn, x, grad, mode)
    times: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            times[name].append(time_step(impls[name], x, grad, mode))
    return [
        {
            "config": shape.name,
            "dtype": dtype,
            "mode": mode,
            "impl": name,
            "tokens_per_s": tokens / statistics.median(ts),
            "ratio_vs_dense": speedup(times["dense"], ts),
            "moelab_speedup": speedup(ts, times["moelab"]),
        }
        for name, ts in times.items()
    ]


def expert_load_imbalance(shape: LayerShape, tokens: int, skew: float) -> float:
    """max/mean expert load of the benchmark's router at this skew."""
    torch.manual_seed(0)
    router = _router(shape, skew, "cpu")
    with torch.no_grad():
        load = torch.bincount(router(torch.randn(tokens, shape.dim)).indices.flatten(), minlength=shape.num_experts)
    return float(load.max() / load.float().mean())


def peak_memory_mb(config: str, impl: str, tokens: int, device: str = "cpu") -> float:
    """Extra peak memory (MB) of one fp32 forward+backward step over the memory in use before it.

    On CPU each measurement runs in a fresh process (Linux) and reads its peak resident set
    size; on CUDA it reads the allocator's peak.
    """
    if device != "cpu":
        return _step_peak_mb(config, impl, tokens, device)
    code = f"from moelab.bench.layer import _step_peak_mb; print(_step_peak_mb({config!r}, {impl!r}, {tokens}, 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_rss_kb() -> int:
    """This process's peak resident set size (VmHWM). Unlike getrusage's ru_maxrss it is not
    inherited from the parent across exec, so a fresh child measures only itself."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _step_peak_mb(config: str, impl: str, tokens: int, device: str) -> float:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    step = build_impls(SHAPES[config], torch.float32, 0.0, device)[impl]
    x = torch.randn(tokens, SHAPES[config].dim, device=device)
    grad = torch.randn_like(x)
    if device == "cpu":
        before = _peak_rss_kb()
        time_step(step, x, grad, "fwdbwd")
        return (_peak_rss_kb() - before) / 1024
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    time_step(step, x, grad, "fwdbwd")
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run(options: BenchOptions, progress: Console | None = None) -> dict:
    """The whole benchmark: uniform routing for every (config, dtype, mode); where fp32 fwd+bwd is
    among them, a skewed-routing fp32 fwd+bwd pass and its peak memory; all beside `options.load`
    busy processes. Returns the JSON document."""
    jobs = [(c, d, m) for c in options.configs for d in options.dtypes for m in options.modes]
    doc: dict = {"format": JSON_FORMAT, "results": [], "skewed": [], "memory": []}
    fp32_step = "fp32" in options.dtypes and "fwdbwd" in options.modes  # the skewed and memory passes' step
    skew, memory = (options.skew, options.memory) if fp32_step else (0.0, False)
    with busy_processes(options.load), Progress(console=progress, transient=True, disable=progress is None) as bar:
        torch.set_num_threads(resolve_threads(options.threads))
        task = bar.add_task("bench layer", total=len(jobs) + len(options.configs) * (1 + memory))
        for config, dtype, mode in jobs:
            bar.update(task, description=f"{config} {dtype} {mode}")
            tokens = options.tokens_for(dtype)
            doc["results"] += measure(SHAPES[config], dtype, mode, tokens, options.rounds, device=options.device)
            bar.advance(task)
        for config in options.configs:
            if skew:
                bar.update(task, description=f"{config} skewed routing")
                imbalance = expert_load_imbalance(SHAPES[config], options.tokens, skew)
                rows = measure(
                    SHAPES[config], "fp32", "fwdbwd", options.tokens, options.rounds, skew, options.device
                )
                doc["skewed"] += [dict(row, max_over_mean_load=imbalance) for row in rows]
            bar.advance(task)
            if memory:
                bar.update(task, description=f"{config} peak memory")
                impls = dict.fromkeys(row["impl"] for row in doc["results"] if row["config"] == config)
                doc["memory"] += [
                    {"config": config, "dtype": "fp32", "mode": "fwdbwd", "impl": impl,
                     "peak_mb": peak_memory_mb(config, impl, options.tokens, options.device)}
                    for impl in impls
                ]
                bar.advance(task)
    doc["setup"] = {
        "tokens": options.tokens,
        "bf16_tokens": options.tokens_for("bf16"),
        "rounds": options.rounds,
        "threads": torch.get_num_threads(),
        "threads_option": options.threads,
        "device": options.device,
        "load": options.load,
        # the C allocator's settings: with glibc's defaults every large fresh buffer is page-faulted in
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "openmp_env": openmp_env(),
        "torch": torch.__version__,
    }
    return doc


def render_table(doc: dict) -> Table:
    """One row per (config, dtype, mode): tokens/s of each implementation and moelab's ratios."""
    table = Table(
        title="MoE layer throughput, tokens/s (ratios: medians of same-round ratios)"
        + (f", {doc['setup']['load']} busy process(es) beside" if doc["setup"].get("load") else ""),
        caption="fwdbwd*: skewed routing (max/mean expert load "
        + ", ".join(f"{r['config']} {r['max_over_mean_load']:.1f}" for r in doc["skewed"] if r["impl"] == "moelab")
        + ")" if doc["skewed"] else None,
    )
    for column in ("config", "dtype", "mode", *IMPLS, "x dense", "x serial", "x hf"):
        table.add_column(column, justify="right", no_wrap=True)
    groups: dict[tuple, dict[str, dict]] = {}
    for row in doc["results"] + [dict(r, mode=r["mode"] + "*") for r in doc["skewed"]]:
        groups.setdefault((row["config"], row["dtype"], row["mode"]), {})[row["impl"]] = row
    for key, rows in groups.items():
        speeds = [f"{rows[i]['tokens_per_s']:,.0f}" if i in rows else "-" for i in IMPLS]
        ratio = rows["moelab"]["ratio_vs_dense"]
        vs = [f"{rows[i]['moelab_speedup']:.2f}" if i in rows else "-" for i in ("serial", "hf")]
        table.add_row(*key, *speeds, f"{ratio:.2f}", *vs)
    return table


def render_memory(doc: dict) -> Table:
    """Extra peak memory of one fp32 forward+backward step, per implementation."""
    table = Table(title="Peak memory of one fp32 fwd+bwd step, MB above the memory in use before it")
    for column in ("config", *IMPLS):
        table.add_column(column, justify="right")
    for config in dict.fromkeys(row["config"] for row in doc["memory"]):
        peaks = {row["impl"]: row["peak_mb"] for row in doc["memory"] if row["config"] == config}
        table.add_row(config, *(f"{peaks[i]:,.0f}" if i in peaks else "-" for i in IMPLS))
    return table


def check_json_path(path: str | Path, overwrite: bool) -> Path:
    """`--json PATH` may be written: new, or (with `overwrite`) an earlier result of this benchmark."""
    return check_output_file(path, overwrite=overwrite, is_own=lambda p: has_json_format(p, JSON_FORMAT))


def write_json(doc: dict, path: str | Path, overwrite: bool) -> None:
    """Write the results to `path`, checked again as `check_json_path` checked it before the run."""
    data = json.dumps(doc, indent=2).encode()
    write_output_file(path, data, overwrite=overwrite, is_own=lambda p: has_json_format(p, JSON_FORMAT))
