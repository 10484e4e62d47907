"""moelab's REAP against llm-compressor's REAPPruningModifier (0.14) on the same exported models
and the same calibration tokens: kept experts, perplexity after pruning, time, peak memory, and
whether transformers loads each output exactly.

    bash benchmarks/llmcompressor_reap/setup.sh          # once: .venv-llmc with llm-compressor
    .venv/bin/python benchmarks/llmcompressor_reap/compare.py [--work runs/llmc-compare]

The shipped reference models are exported to transformers formats (ref-8e-top2 as Mixtral,
ref-32e-top4-shared as Qwen2-MoE); calibration is 64 windows of 256 tokens of the corpus
validation split (8 per domain), given to both tools; evaluation is moelab eval on 4,096 test
tokens per domain against the export. Each compression runs in a fresh process that reports its
peak resident memory. Writes docs/results/compression/llmcompressor_reap.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from moelab.compress.calibration import CalibrationOptions, calibration_mixture
from moelab.eval.evaluate import EvalOptions, evaluate
from moelab.hf import CheckpointError, open_checkpoint
from moelab.hf.export import export_checkpoint
from moelab.hf.loading import load_causal_lm
from moelab.io import atomic_write_text
from moelab.models.reference import reference_model_dir

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "compression"
MODELS = {"ref-8e-top2": "mixtral", "ref-32e-top4-shared": "qwen2_moe"}
SPARSITIES = (0.25, 0.5)
MOELAB_METHODS = ("reap", "naee")  # the same method as llm-compressor's, and moelab's best on these models
CALIB = CalibrationOptions(tokens=64 * 256, seq_len=256)

_MOELAB_JOB = """
import json, sys, time
from moelab.compress import compress
from moelab.compress.calibration import CalibrationOptions, calibration_mixture
began = time.perf_counter()
options = CalibrationOptions(tokens=64 * 256, seq_len=256)
mixture = calibration_mixture(sys.argv[1], "corpus", options)
report = compress(sys.argv[1], sys.argv[2], method=sys.argv[4], ratio=float(sys.argv[3]), calib=mixture,
                  calib_options=options, overwrite=True, quiet=True)
seconds = time.perf_counter() - began
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
kept = {k: v["kept"] for k, v in report["layers"].items()}
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "kept": kept}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "llmc-compare")
    parser.add_argument("--llmc-python", type=Path, default=ROOT / ".venv-llmc" / "bin" / "python")
    args = parser.parse_args()
    if not args.llmc_python.is_file():
        raise SystemExit(f"{args.llmc_python} not found: run benchmarks/llmcompressor_reap/setup.sh first")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, family in MODELS.items():
        export = args.work / f"{name}-{family}"
        if not export.exists():
            export_checkpoint(reference_model_dir(name), export, family, quiet=True)
        mixture = calibration_mixture(export, "corpus", CALIB)
        windows = np.stack([w.ids.numpy() for w in mixture.windows])
        np.save(args.work / f"{name}-windows.npy", windows)
        for sparsity in SPARSITIES:
            tag = f"{name}-{int(sparsity * 100)}"
            llmc_out, report = args.work / f"llmc-{tag}", args.work / f"llmc-{tag}.json"
            llmc = _job([str(args.llmc_python), str(ROOT / "src" / "moelab" / "compress" / "llmcompressor_job.py"), str(export),
                         str(args.work / f"{name}-windows.npy"), str(sparsity), str(llmc_out), str(report)], args.work)  # fmt: skip
            retained = json.loads(report.read_text())
            llmc["kept"] = {k.split(".")[2]: v for k, v in retained.items()}
            ours = {}
            for method in MOELAB_METHODS:
                out = args.work / f"moelab-{method}-{tag}"
                ours[method] = _job([sys.executable, "-c", _MOELAB_JOB, str(export), str(out), str(sparsity), method], args.work)
                ours[method] |= _quality(out, export, ours[method]["kept"])
            llmc |= _quality(llmc_out, export, llmc["kept"])
            moelab = ours["reap"]
            jaccard = np.mean([len(set(llmc["kept"][k]) & set(moelab["kept"][k])) / len(set(llmc["kept"][k]) | set(moelab["kept"][k]))
                               for k in moelab["kept"]])  # fmt: skip
            rows.append({"model": name, "family": family, "sparsity": sparsity, "jaccard": float(jaccard),
                         "llm-compressor": llmc} | {f"moelab {m}": r for m, r in ours.items()})  # fmt: skip
            print(json.dumps({k: ({i: j for i, j in v.items() if i != "kept"} if isinstance(v, dict) else v)
                              for k, v in rows[-1].items()}))  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "llmcompressor_reap.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(RESULTS / "llmcompressor_reap.md", markdown(rows))


def _job(command: list[str], cwd: Path) -> dict:
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{command[1]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _quality(out: Path, base: Path, kept: dict) -> dict:
    """Whether transformers loads `out` exactly (strictly, and with the kept experts' weights),
    and its perplexity and KL against `base` when it does."""
    try:
        load_causal_lm(out, quiet=True)
    except CheckpointError as err:
        return {"loads_exactly": False, "load_problem": str(err)[:300]}
    same = _experts_match(out, base, kept)
    if not same:
        return {"loads_exactly": False, "load_problem": "the kept experts' weights differ from the source's"}
    report = evaluate(out, base=base, options=EvalOptions(eval_tokens=4096, prompts=0), quiet=True)
    return {
        "loads_exactly": True,
        "perplexity": report["domains"]["all"]["perplexity"],
        "base_perplexity": report["base_domains"]["all"]["perplexity"],
        "kl": report["agreement"]["all"]["kl"],
        "top1_agreement": report["agreement"]["all"]["top1_agreement"],
    }


def _experts_match(out: Path, base: Path, kept: dict) -> bool:
    """Every MoE layer of `out` holds the source's experts `kept[layer]`, in order."""
    with open_checkpoint(out) as pruned, open_checkpoint(base) as source:
        for layer in pruned.layers():
            ids = kept.get(str(layer.index))
            if ids is None or not hasattr(layer, "experts"):
                continue
            original = source.layer(layer.index).experts
            if not torch.equal(layer.experts.gate, original.gate[ids]) or not torch.equal(layer.experts.down, original.down[ids]):
                return False
    return True


def markdown(rows: list[dict]) -> str:
    lines = ["| model (format) | removed | tool | perplexity | change | KL | top-1 | loads exactly | time (s) | peak RSS (MB) | REAP kept-set Jaccard |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for who in ["llm-compressor", *(f"moelab {m}" for m in MOELAB_METHODS)]:
            m = r[who]
            quality = (f"{m['perplexity']:.1f} | {m['perplexity'] / m['base_perplexity'] - 1:+.1%} | {m['kl']:.3f} | "
                       f"{m['top1_agreement']:.1%}" if m["loads_exactly"] else "- | - | - | -")  # fmt: skip
            lines.append(f"| {r['model']} ({r['family']}) | {r['sparsity']:.0%} | {who} | {quality} | "
                         f"{'yes' if m['loads_exactly'] else _problem(m['load_problem'])} | {m['seconds']:.1f} | "
                         f"{m['peak_rss_mb']:,.0f} | {r['jaccard']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _problem(text: str) -> str:
    return "no: experts missing" if "missing:" in text else "no (see the JSON)"


if __name__ == "__main__":
    main()
