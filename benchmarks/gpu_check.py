"""GPU check: the MoE layer on CUDA against float64 on the CPU (forward and backward, every
backend, fp32, bf16 and bf16 autocast); the "triton" backend (fp32 and fp16 on moelab's Triton
grouped GEMM) against float64, reading nothing back and benchmarked; its bf16 training step on
`torch._grouped_mm` reading nothing back to the host; `moelab bench layer` on CUDA (against dense and transformers'
grouped_mm) with a profile of the e64k8 step; `moelab bench generate --device cuda --compile` on
the shipped models (fp32 and bf16) and, in bf16, on `ref-8e-top2` widened to 25 MB experts (the
dispatch path past `gpu_gather_bytes`); `moelab bench offload --device cuda` (the expert cache in GPU
memory, copies on a copy stream) on `ref-8e-top2` and its widened copy; and `moelab train` under torchrun with one process (the NCCL
path: process group, FSDP2, DCP checkpoints) against the one-process run's losses.

Run on a machine with a CUDA GPU:  python benchmarks/gpu_check.py --out DIR [--budget S] [--only SECTION ...]
Each section's result (or its error) and its seconds go to DIR/results.json as soon as it ends; a
section still running when the budget (counted from the script's start) ends is stopped, and later
ones are skipped. Not part of the test suite (the project's machines have no GPU).

On a lent device machine (15 minutes of device time, its start included; at most 600 s a command;
the working tree travels in 64 MiB; moelab is not installed there and transformers is the image's,
5.17 when last seen, which runs these sections: moelab's pin 5.24's wheel, 13 MiB, does not fit):

    # here, first: the tree is 97 MiB, 55 with the shipped weights rounded to bf16 (fp32 sections then
    # run bf16-representable weights); afterwards `git checkout -- src/moelab/assets/models`
    python -c "import glob; from safetensors.torch import load_file, save_file; [save_file({k: v.bfloat16() for k, v in load_file(f).items()}, f, metadata={'format': 'pt'}) for f in glob.glob('src/moelab/assets/models/*/model.safetensors')]"
    # the device command, with timeout_s 540 (the budget, and a minute for imports and the stop):
    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --budget 480
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml
from rich.console import Console

from moelab.bench.layer import BenchOptions, render_table, run
from moelab.nn import MoEConfig, build_moe

CASES = {
    "topk softmax": dict(router="topk", top_k=2),
    "topk sigmoid groups + aux-free bias + shared": dict(
        router="topk", top_k=4, score_func="sigmoid", n_group=4, topk_group=2, selection_bias=True, num_shared=1,
        shared_gate=True, route_scale=2.5,
    ),
    "top-p": dict(router="topp", top_p=0.5),
    "expert choice": dict(router="expert_choice"),
    "relu (BlockFFN), gelu experts": dict(router="relu", activation="gelu"),
    "capacity 1.0 + expert biases": dict(router="topk", top_k=2, capacity_factor=1.0, selection_bias=True),
    # empty slots inside a fixed k: the rows torch._grouped_mm leaves unset on the no-sync path
    "topk 3 + dynamic skipping + expert biases": dict(router="topk", top_k=3, expert_mlp_bias=True, skip_ratio=0.4),
}


def check_case(
    name: str, overrides: dict, backend: str, dtype: torch.dtype, device: str = "cuda", autocast: bool = False
) -> dict:
    """One layer's output and gradients on the device against float64 on the CPU; `autocast`: an
    fp32 layer under bf16 autocast (how `moelab train --dtype bf16` runs)."""
    torch.manual_seed(0)
    overrides = dict(overrides)
    skip_ratio = overrides.pop("skip_ratio", None)
    cfg = MoEConfig(dim=64, num_experts=16, hidden_dim=32, backend=backend, **overrides)
    layer = build_moe(cfg)
    layer.skip_ratio = skip_ratio
    with torch.no_grad():
        for param_name, param in layer.named_parameters():
            if "bias" in param_name:
                param.normal_(std=0.1)
    layer = layer.to(device, dtype)
    # The reference sees the same (rounded) weights and input, in float64 on the CPU, so that
    # routing decisions agree and the error is the arithmetic's alone. Under autocast the router's
    # logits are bf16, which float64 (or another device's bf16) would route differently (a flipped
    # token is an O(1) error), so there the reference is the per-expert loop on the same device
    # under the same autocast; the loop itself is checked against float64 in the other cases.
    reference = copy.deepcopy(layer)
    if autocast:
        reference.experts.backend = "loop"
    else:
        reference = reference.to("cpu", torch.float64)
    x = torch.randn(257, 64).to(dtype).double()
    grad = torch.randn_like(x)

    def run_layer(module, inp):
        inp = inp.detach().requires_grad_(True)
        out, _ = module(inp)
        out.backward(grad.to(out.device, out.dtype))
        return out.detach().double().cpu(), inp.grad.double().cpu(), {
            n: p.grad.double().cpu() for n, p in module.named_parameters() if p.grad is not None
        }

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y_ref, gx_ref, g_ref = run_layer(reference, x.to(device, dtype) if autocast else x)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y, gx, g = run_layer(layer, x.to(device, dtype))
    scale = lambda t: t.abs().max().item() + 1e-12  # noqa: E731
    errors = {"y": (y - y_ref).abs().max().item() / scale(y_ref), "grad_x": (gx - gx_ref).abs().max().item() / scale(gx_ref)}
    for n in g_ref:
        errors[f"grad_{n}"] = (g[n] - g_ref[n]).abs().max().item() / scale(g_ref[n])
    return {"case": name, "backend": backend, "dtype": f"{dtype}{' + bf16 autocast' if autocast else ''}",
            "max_rel_error": max(errors.values()), "worst": max(errors, key=errors.get)}


def check_no_host_sync(
    device: str = "cuda", autocast: bool = False, backend: str = "auto", dtype: torch.dtype = torch.bfloat16
) -> dict:
    """A training step of the layer on a one-kernel grouped GEMM (`auto`: `torch._grouped_mm`, the
    default for bf16 products on CUDA: bf16 weights, or fp32 ones under bf16 autocast; `triton`:
    its kernels for `dtype`'s weights) with the aux-free selection bias, expert biases, a
    gated shared expert and dynamic skipping, under CUDA's sync debug mode "error": any read back
    to the host raises, naming the op."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=512, num_experts=64, hidden_dim=352, top_k=8, balance_coef=0.01, z_coef=1e-3,
                    selection_bias=True, expert_mlp_bias=True, num_shared=1, shared_gate=True,
                    backend=backend)  # fmt: skip
    dtype = torch.float32 if autocast else dtype
    layer = build_moe(cfg).to(device, dtype)
    layer.skip_ratio = 0.3
    x = torch.randn(4096, 512, device=device, dtype=dtype)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y, result = layer(x.detach().requires_grad_(True))
        (y.float().square().mean() + result.loss).backward()
        assert result.logits_finite is not None, "the step took the host plan"

    step()  # warm-up: first-call allocations, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        error = None
    except RuntimeError as err:
        error = str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    what = "fp32 under bf16 autocast" if autocast else str(dtype).removeprefix("torch.")
    return {"layer": f"e64k8 {what}, {backend} backend, 4096 tokens", "host_syncs": error or "none"}


def check_triton() -> dict:
    """The "triton" experts backend (fp32 and fp16 products on moelab's Triton grouped GEMM, bf16
    ones on torch._grouped_mm, SwiGLU fused in a Triton kernel for all three; compiled and
    autotuned here, the tests run the kernels in Triton's interpreter): every case against
    float64, its fp32 and bf16 training steps reading nothing back, and `moelab bench layer` at
    16,384 tokens (its `triton` row against moelab's default, dense and transformers)."""
    checks = []
    for name, overrides in CASES.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            try:
                checks.append(check_case(name, overrides, "triton", dtype))
            except Exception as err:  # noqa: BLE001 - reported per case, the others still run
                checks.append({"case": name, "backend": "triton", "dtype": str(dtype),
                               "error": f"{type(err).__name__}: {err}"[:400]})  # fmt: skip
            print(checks[-1], flush=True)
    sync = [check_no_host_sync(backend="triton", dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
    print(sync, flush=True)
    compiled = [check_compiles_whole("triton", dtype) for dtype in (torch.float32, torch.bfloat16)]
    print(compiled, flush=True)
    doc = run(BenchOptions.create(device="cuda", memory=False, rounds=5, tokens=16384))
    Console(width=160).print(render_table(doc))
    return {"correctness": checks, "no_host_sync": sync, "compiles_whole": compiled, "bench_layer_16384": doc}


def check_compiles_whole(backend: str, dtype: torch.dtype, tokens: int = 4096) -> dict:
    """An e64k8 training step compiled with fullgraph=True against the eager step: the loss and
    the input's gradient, relative to their scale (or the error that stopped the compile)."""
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=512, num_experts=64, hidden_dim=352, top_k=8, balance_coef=0.01,
                                backend=backend)).to("cuda", dtype)  # fmt: skip
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)

    def step(inp):
        y, result = layer(inp)
        return y.float().square().mean() + result.loss

    runs = []
    try:
        for fn in (torch.compile(step, fullgraph=True), step):
            inp = x.clone().requires_grad_(True)
            loss = fn(inp)
            loss.backward()
            runs.append((loss.detach().float(), inp.grad.float()))
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return {"backend": backend, "dtype": str(dtype), "error": f"{type(err).__name__}: {err}"[:600]}
    (loss_c, grad_c), (loss_e, grad_e) = runs
    return {"backend": backend, "dtype": str(dtype),
            "loss_rel_diff": float((loss_c - loss_e).abs() / loss_e.abs().clamp_min(1e-12)),
            "grad_rel_diff": float((grad_c - grad_e).abs().max() / grad_e.abs().max().clamp_min(1e-12))}  # fmt: skip


def check_torchrun_nccl() -> dict:
    """20 steps of a tiny run on CUDA, under torchrun (1 process, NCCL) and in one plain process."""
    with tempfile.TemporaryDirectory() as tmp:
        return _torchrun_against_one_process(Path(tmp))


def _torchrun_against_one_process(workdir: Path) -> dict:
    run = {
        "model": dict(vocab_size=8192, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64,
                      moe=dict(num_experts=8, hidden_dim=64, top_k=2, balance_coef=0.01)),
        "train": dict(steps=20, batch_size=8, seq_len=64, eval_every=20, eval_tokens=2048, checkpoint_every=10, device="cuda"),
    }  # fmt: skip
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    moelab = [sys.executable, "-m", "moelab", "train", str(path), "--quiet", "--overwrite"]
    subprocess.run([*moelab, "--out", str(workdir / "one")], check=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    subprocess.run([*torchrun, *moelab[1:], "--out", str(workdir / "nccl")], check=True)
    losses = [json.loads((workdir / d / "results.json").read_text())["eval_loss"]["all"] for d in ("one", "nccl")]
    return {"one_process": losses[0], "torchrun_nccl": losses[1], "abs_diff": abs(losses[0] - losses[1])}


def env_info() -> dict:
    """The GPU and the versions this run used."""
    import importlib.metadata

    import transformers

    props = torch.cuda.get_device_properties(0)
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "triton": triton, "sms": props.multi_processor_count,
            "memory_gb": props.total_memory / 1e9, "grouped_mm": hasattr(torch, "_grouped_mm")}  # fmt: skip


def profile_layer(dtype: torch.dtype = torch.bfloat16, tokens: int = 16384) -> str:
    """The kernels of one e64k8 forward+backward step, moelab's (default and "triton" backends)
    and transformers' (grouped_mm) experts, by GPU time: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from moelab.bench.layer import SHAPES, build_impls

    impls = build_impls(SHAPES["e64k8"], dtype, 0.0, "cuda")
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
    grad = torch.randn_like(x)
    tables = []
    for name in ("moelab", "triton", "dense", "hf"):
        if name not in impls:
            continue
        for _ in range(3):
            impls[name](x.detach().requires_grad_(True)).backward(grad)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                impls[name](x.detach().requires_grad_(True)).backward(grad)
            torch.cuda.synchronize()
        tables.append(f"=== {name} e64k8 {dtype} fwd+bwd x3, {tokens} tokens ===\n"
                      + prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    return "\n\n".join(tables)


def profile_in_child(path: Path, timeout: float) -> str:
    """`profile_layer` in a child process (a crash in the profiler leaves the other sections' results),
    in this process's working directory (a relative PYTHONPATH=src still finds moelab)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); from gpu_check import profile_layer; "
            f"open({str(path)!r}, 'w').write(profile_layer())")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout)
    return path.name


def check_lm_loss(tokens: int = 4096, dim: int = 2048, vocab: int = 151_936) -> dict:
    """`moelab.nn.lm_loss.chunked_cross_entropy` against `F.cross_entropy` over the whole logits on
    CUDA, bf16 (Qwen's vocabulary): loss and gradients, peak memory and time of each."""
    import torch.nn.functional as F

    from moelab.nn.lm_loss import chunked_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, dim, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab, dim, device="cuda", generator=g) * dim**-0.5).bfloat16()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    targets[::7] = -100
    ways = {"whole": lambda h, w: F.cross_entropy(F.linear(h, w).float(), targets), "chunked": lambda h, w: chunked_cross_entropy(h, w, targets)}
    result = {}
    for name, loss_fn in ways.items():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = loss_fn(h, w)
        loss.backward()
        torch.cuda.synchronize()
        result[name] = {"loss": float(loss), "seconds": time.perf_counter() - start,
                        "peak_extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "grads": (h.grad, w.grad),
        }  # fmt: skip
    (gh, gw), (ch, cw) = result["whole"].pop("grads"), result["chunked"].pop("grads")
    result["max_rel_diff"] = {"hidden": float((gh - ch).abs().max() / gh.abs().max()), "weight": float((gw - cw).abs().max() / gw.abs().max())}
    return result


def check_sampler_zero_width(vocab: int = 151_936, draws: int = 1 << 20) -> dict:
    """The sampler's float64 cumulative sum on CUDA (a parallel scan) against zero-probability
    tokens: intervals of width > 0 they got, and how many of `draws` draws picked one."""
    from moelab.models.transformer import _draw

    g = torch.Generator(device="cuda").manual_seed(0)
    probs = torch.rand(1, vocab, device="cuda", generator=g)
    probs[:, torch.randperm(vocab, device="cuda", generator=g)[: vocab // 2]] = 0
    cdf = probs.double().cumsum(-1)
    zero = probs[0] == 0
    widened = int((zero[1:] & (cdf[0, 1:] != cdf[0, :-1])).sum()) + int(zero[0] and cdf[0, 0] != 0)
    drawn = torch.cat([_draw(probs.expand(4096, -1), g) for _ in range(draws // 4096)])
    return {"zero_probability_tokens": int(zero.sum()), "with_width": widened, "drawn_of_them": int(zero[drawn].sum())}


def correctness() -> list[dict]:
    """`check_case` for every case, backend and dtype; a case that raises is reported as such."""
    checks = []
    for name, overrides in CASES.items():
        for backend in ("grouped", "loop", "grouped_mm"):
            for dtype, autocast in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
                if autocast and backend == "loop":
                    continue  # under autocast the reference is the loop itself
                try:
                    checks.append(check_case(name, overrides, backend, dtype, autocast=autocast))
                except Exception as err:  # noqa: BLE001 - reported per case, the others still run
                    checks.append({"case": name, "backend": backend, "dtype": f"{dtype} autocast={autocast}",
                                   "error": f"{type(err).__name__}: {err}"[:400]})  # fmt: skip
                print(checks[-1], flush=True)
    return checks


def bench_layer() -> dict:
    """`moelab bench layer --device cuda` at 4,096 and 16,384 tokens: {tokens: its JSON document}."""
    docs = {}
    for tokens in (4096, 16384):
        doc = run(BenchOptions.create(device="cuda", memory=tokens == 16384, rounds=10, tokens=tokens))
        Console(width=160).print(render_table(doc))
        docs[str(tokens)] = doc
    return docs


def bench_generate(model: str, dtype: str, timeout: float) -> dict:
    """`moelab bench generate --device cuda --compile` on one shipped model: its JSON document."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generate.json"
        command = ["bench", "generate", model, "--device", "cuda", "--dtype", dtype, "--compile", "--rounds", "3"]
        subprocess.run([sys.executable, "-m", "moelab", *command, "--json", str(path)], check=True, timeout=timeout)
        return json.loads(path.read_text())


def bench_generate_wide(timeout: float) -> dict:
    """`bench_generate` in bf16 on `ref-8e-top2` widened to 25 MB experts (`widened_model.py`, built
    here): past `MoELayer.gpu_gather_bytes` at batch 8 and 32, so decoding takes the dispatch with
    its counts on the device (a CUDA graph of the compiled step), against transformers."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        script = Path(__file__).with_name("widened_model.py")
        subprocess.run([sys.executable, str(script), str(Path(tmp) / "wide")], check=True, timeout=timeout)
        return bench_generate(str(Path(tmp) / "wide"), "bf16", max(timeout - (time.monotonic() - started), 1))


def offload_same_tokens(prompts: int = 4, new_tokens: int = 32) -> dict:
    """`ref-8e-top2` offloaded on CUDA in bf16 at 25 % resident with each policy, against a run of
    "lookahead" whose every copy is waited for on the host as soon as it is queued (no asynchrony:
    nothing can race). Every run computes with the same kernels on the same weights (only which
    slot holds an expert, and when its copy runs, differ), so all must give the reference's tokens
    bit for bit. Also against the model in memory (whose prompt pass runs other kernels: equal up
    to rounding, so a differing token there alone is not a race)."""
    from moelab.models import load_pretrained
    from moelab.models.reference import reference_model_dir
    from moelab.offload import POLICIES, RoutingPrior, load_offloaded
    from moelab.offload.copier import SlotCopier

    path = reference_model_dir("ref-8e-top2")
    model = load_pretrained(path).eval()
    ids = torch.randint(0, model.config.vocab_size, (prompts, 16), generator=torch.Generator().manual_seed(0))
    prior = RoutingPrior.measure(model, [ids])
    model = model.to("cuda", torch.bfloat16)
    ids = ids.cuda()
    want = [model.generate(ids[i : i + 1], new_tokens, greedy=True) for i in range(prompts)]
    tokens, stats = {}, {}
    load = SlotCopier.load

    def load_and_wait(self, *args):
        load(self, *args)
        torch.cuda.synchronize()

    cells = [("lookahead", False, True)] + [(policy, False, False) for policy in POLICIES] + [("lookahead", True, False)]
    for policy, host, synchronous in cells:
        eviction, predictor, factor = POLICIES[policy]
        SlotCopier.load = load_and_wait if synchronous else load
        try:
            offloaded = load_offloaded(
                path, resident=0.25, eviction=eviction, predictor=predictor, prefetch_factor=factor, prior=prior,
                dtype=torch.bfloat16, device="cuda", host_memory=host,
            )  # fmt: skip
            policy += " host-memory" if host else " synchronous" if synchronous else ""
            tokens[policy] = [offloaded.generate(ids[i : i + 1], new_tokens) for i in range(prompts)]
            stats[policy] = offloaded.cache.total().to_dict() | {"prefetched": offloaded.cache.prefetch_stats.issued}
            offloaded.close()
        finally:
            SlotCopier.load = load
    first = tokens["lookahead synchronous"]
    return {
        "same_as_synchronous": {p: all(torch.equal(a, b) for a, b in zip(first, t)) for p, t in tokens.items()},
        "same_as_in_memory": {p: all(torch.equal(a, b) for a, b in zip(want, t)) for p, t in tokens.items()},
        "cache": stats,
    }


def bench_offload(timeout: float) -> dict:
    """`moelab bench offload --device cuda --dtype bf16` on `ref-8e-top2` and on it widened to 25 MB
    experts (`widened_model.py`, built here): the cache in GPU memory, experts copied from pinned
    host buffers on a copy stream (`moelab.offload.copier`), and the widened one again with every
    expert in pinned host memory (`--host-memory`); `offload_same_tokens` first.
    {model: its JSON document}."""
    started = time.monotonic()
    left = lambda: max(timeout - (time.monotonic() - started), 1)  # noqa: E731
    docs = {"same_tokens": offload_same_tokens()}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(__file__).with_name("widened_model.py")
        runs = [("ref-8e-top2", False), (str(Path(tmp) / "wide"), False), (str(Path(tmp) / "wide"), True)]
        for model, host in runs:  # each run's failure (or timeout) is its result; the others' stay
            name = Path(model).name + (" host-memory" if host else "")
            path = Path(tmp) / "offload.json"
            command = ["bench", "offload", model, "--device", "cuda", "--dtype", "bf16", "--prompts", "4",
                       "--new-tokens", "32", "--resident", "0.25", "--resident", "1", "--rounds", "1"]  # fmt: skip
            command += ["--host-memory"] if host else []
            try:
                if model != "ref-8e-top2" and not (Path(tmp) / "wide").exists():
                    subprocess.run([sys.executable, str(script), str(Path(tmp) / "wide")], check=True, timeout=left())
                subprocess.run([sys.executable, "-m", "moelab", *command, "--json", str(path)], check=True, timeout=left())
                docs[name] = json.loads(path.read_text())
                path.unlink()
            except (subprocess.SubprocessError, OSError) as err:
                docs[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    return docs


class PastBudget(BaseException):
    """Raised in a section still running when the budget ends: a BaseException, so that the
    sections' per-case `except Exception` does not swallow it."""


def _raise_past_budget(signum, frame) -> None:
    raise PastBudget


def sections(out: Path, left) -> dict:
    """Section name -> its function, in the order they run (the ones never run on a GPU yet
    first); `left()`: seconds left of the budget, the subprocesses' timeouts."""
    return {
        "env": env_info,
        "triton": check_triton,
        "lm_loss": check_lm_loss,
        "sampler_zero_width": check_sampler_zero_width,
        "offload_bf16": lambda: bench_offload(min(max(left(), 1), 200)),
        "correctness": correctness,
        "no_host_sync": lambda: [check_no_host_sync(autocast=autocast) for autocast in (False, True)],
        "layer": bench_layer,
        "generate_bf16_ref-8e-top2": lambda: bench_generate("ref-8e-top2", "bf16", max(left(), 1)),
        "generate_bf16_ref-32e-top4-shared": lambda: bench_generate("ref-32e-top4-shared", "bf16", max(left(), 1)),
        "generate_fp32_ref-32e-top4-shared": lambda: bench_generate("ref-32e-top4-shared", "fp32", max(left(), 1)),
        "profile": lambda: profile_in_child(out / "profile.txt", left()),
        "generate_bf16_wide-8e-top2": lambda: bench_generate_wide(max(left(), 1)),
        "generate_fp32_ref-8e-top2": lambda: bench_generate("ref-8e-top2", "fp32", max(left(), 1)),
        "torchrun_nccl": check_torchrun_nccl,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="The GPU checks of moelab (see the module docstring).")
    parser.add_argument("--out", default="gpu_results", help="folder for results.json, profile.txt")
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds from this script's start: a section still running then is stopped, later ones skipped")  # fmt: skip
    parser.add_argument("--only", nargs="*", help="run only these sections")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR/results.json and DIR/profile.txt")
    args = parser.parse_args()
    start = time.monotonic()
    left = lambda: args.budget - (time.monotonic() - start)  # noqa: E731
    out = Path(args.out)
    todo = sections(out, left)
    unknown = sorted(set(args.only or ()) - set(todo))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(todo)}")
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if (out / "results.json").exists() and not args.overwrite:
        sys.exit(f"{out / 'results.json'} exists; pass --overwrite to replace it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, _raise_past_budget)
    results: dict = {}

    def save() -> None:
        (out / "results.json.tmp").write_text(json.dumps(results, indent=1, default=str))
        (out / "results.json.tmp").replace(out / "results.json")

    for name, fn in todo.items():
        if args.only and name not in args.only:
            continue
        if left() < 10:
            results[name] = {"skipped": "out of budget"}
            save()
            continue
        print(f"--- {name} ({left():.0f} s left)", flush=True)
        t0 = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, left())  # the alarm fires inside the section alone
            try:
                results[name] = fn()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except PastBudget:
            results[name] = {"error": f"stopped: past the budget of {args.budget:.0f} s", "traceback": traceback.format_exc()[-4000:]}
        except Exception as err:  # noqa: BLE001 - a section's failure is its result; the rest still run
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(results[name]["traceback"], flush=True)
        results.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
        print(f"--- {name} took {time.monotonic() - t0:.1f} s", flush=True)
        save()


if __name__ == "__main__":
    main()
