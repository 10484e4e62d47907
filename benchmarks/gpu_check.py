"""GPU check: the MoE layer on CUDA matches the CPU float64 result, its bf16 training step on
`torch._grouped_mm` reads nothing back to the host, and its speed vs dense; decoding on CUDA
(`moelab bench generate --device cuda`, fp32 and bf16); and `moelab train` under torchrun with
one process (the NCCL path: process group, FSDP2, DCP checkpoints) gives the one-process run's
losses.

Run on a machine with a CUDA GPU:  python benchmarks/gpu_check.py [--json out.json]
Not part of the test suite (the project's machines have no GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

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
    # routing decisions agree and the error is the arithmetic's alone.
    reference = copy.deepcopy(layer).to("cpu", torch.float64)
    x = torch.randn(257, 64).to(dtype).double()
    grad = torch.randn_like(x)

    def run_layer(module, inp):
        inp = inp.detach().requires_grad_(True)
        out, _ = module(inp)
        out.backward(grad.to(out.device, out.dtype))
        return out.detach().double().cpu(), inp.grad.double().cpu(), {
            n: p.grad.double().cpu() for n, p in module.named_parameters() if p.grad is not None
        }

    y_ref, gx_ref, g_ref = run_layer(reference, x)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y, gx, g = run_layer(layer, x.to(device, dtype))
    scale = lambda t: t.abs().max().item() + 1e-12  # noqa: E731
    errors = {"y": (y - y_ref).abs().max().item() / scale(y_ref), "grad_x": (gx - gx_ref).abs().max().item() / scale(gx_ref)}
    for n in g_ref:
        errors[f"grad_{n}"] = (g[n] - g_ref[n]).abs().max().item() / scale(g_ref[n])
    return {"case": name, "backend": backend, "dtype": f"{dtype}{' + bf16 autocast' if autocast else ''}",
            "max_rel_error": max(errors.values()), "worst": max(errors, key=errors.get)}


def check_no_host_sync(device: str = "cuda", autocast: bool = False) -> dict:
    """A training step of the layer on `torch._grouped_mm` (the default for bf16 products on
    CUDA: bf16 weights, or fp32 ones under bf16 autocast) with the aux-free selection bias,
    expert biases, a gated shared expert and dynamic skipping, under CUDA's sync debug mode
    "error": any read back to the host raises, naming the op."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=512, num_experts=64, hidden_dim=352, top_k=8, balance_coef=0.01, z_coef=1e-3,
                    selection_bias=True, expert_mlp_bias=True, num_shared=1, shared_gate=True)  # fmt: skip
    dtype = torch.float32 if autocast else torch.bfloat16
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
    what = "fp32 under bf16 autocast" if autocast else "bf16"
    return {"layer": f"e64k8 {what}, auto backend, 4096 tokens", "host_syncs": error or "none"}


def bench_generate_cuda(workdir: Path) -> dict:
    """`moelab bench generate --device cuda` on the shipped models, fp32 and bf16, the compiled
    step included: {dtype: its JSON document}."""
    docs = {}
    for dtype in ("fp32", "bf16"):
        path = workdir / f"generate_{dtype}.json"
        command = ["bench", "generate", "--device", "cuda", "--dtype", dtype, "--compile", "--rounds", "3"]
        subprocess.run([sys.executable, "-m", "moelab", *command, "--json", str(path)], check=True)
        docs[dtype] = json.loads(path.read_text())
    return docs


def check_torchrun_nccl(workdir: Path) -> dict:
    """20 steps of a tiny run on CUDA, under torchrun (1 process, NCCL) and in one plain process."""
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--no-generate", dest="generate", action="store_false", help="skip `moelab bench generate`")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    checks = [
        check_case(name, overrides, backend, dtype, autocast=autocast)
        for name, overrides in CASES.items()
        for backend in ("grouped", "loop", "grouped_mm")
        for dtype, autocast in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True))
    ]
    for c in checks:
        print(f"{c['case']:45s} {c['backend']:10s} {c['dtype']:30s} max rel err {c['max_rel_error']:.2e} ({c['worst']})")
    no_sync = [check_no_host_sync(autocast=autocast) for autocast in (False, True)]
    print("training step without host synchronisation:", no_sync)
    doc = run(BenchOptions.create(device="cuda", memory=True, rounds=10, tokens=16384))
    doc["correctness"] = checks
    doc["no_host_sync"] = no_sync
    doc["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        doc["torchrun_nccl"] = check_torchrun_nccl(Path(tmp))
        if args.generate:
            doc["generate"] = bench_generate_cuda(Path(tmp))
    print("torchrun (NCCL, 1 process) vs one process, val loss:", doc["torchrun_nccl"])
    from rich.console import Console

    Console(width=160).print(render_table(doc))
    print(json.dumps(doc["memory"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
