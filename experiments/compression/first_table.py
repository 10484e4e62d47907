"""The first compression table (issue 10): every pruning method at 25 % and 50 % of the routed
experts removed, on both shipped reference models, on one calibration and one evaluation.

    .venv/bin/python experiments/compression/first_table.py [--out runs/compression] [--eval-tokens 4096]

Calibration: the corpus validation split, all eight domains, 16,384 tokens (one pass per model,
reused by every method and ratio). Evaluation: the corpus test split, 4,096 tokens per domain,
against the uncompressed model (perplexity per domain, KL(base || model), top-1 agreement).
Writes docs/results/compression/first_table.json and .md (the table in docs/compress.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moelab.compress import METHODS, CalibrationOptions, calibrate, compress
from moelab.eval import EvalOptions, evaluate
from moelab.io import atomic_write_text
from moelab.models.reference import REFERENCE_MODELS, reference_model_dir

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "compression"
RATIOS = (0.25, 0.5)
DOMAIN = "code"  # the domain-specific table: experts scored on code tokens only
DOMAIN_METHODS = ("premoe", "easy_ep", "reap", "frequency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    args = parser.parse_args()
    rows = []
    for name in REFERENCE_MODELS:
        model = reference_model_dir(name)
        began = time.perf_counter()
        stats = calibrate(model, args.out / name / "calibration", options=CalibrationOptions(tokens=args.calib_tokens),
                          overwrite=True, quiet=True)  # fmt: skip
        calib_s = time.perf_counter() - began
        options = EvalOptions(max_tokens=args.eval_tokens, prompts=0)
        for ratio in RATIOS:
            for method in METHODS:
                if method == "premoe":
                    continue  # domain-specific: see the domain table
                out = args.out / name / f"{method}-{int(ratio * 100)}"
                began = time.perf_counter()
                report = compress(model, out, method=method, ratio=ratio, stats=stats.directory, overwrite=True, quiet=True)
                seconds = time.perf_counter() - began
                result = evaluate(out, base=model, options=options, quiet=True)
                rows.append(_row(name, method, ratio, report, result, seconds, calib_s))
                print(f"{name} {method} {ratio:.0%}: ppl {rows[-1]['perplexity']['all']:.1f} "
                      f"(base {rows[-1]['base_perplexity']['all']:.1f}), KL {rows[-1]['kl']:.3f}, {seconds:.1f} s")  # fmt: skip
        for method in DOMAIN_METHODS:  # domain-specific pruning at 50 %: keep what code needs
            out = args.out / name / f"{method}-{DOMAIN}-50"
            report = compress(model, out, method=method, ratio=0.5, stats=stats.directory, domains=[DOMAIN],
                              overwrite=True, quiet=True)  # fmt: skip
            result = evaluate(out, base=model, options=options, quiet=True)
            rows.append(_row(name, method, 0.5, report, result, 0.0, calib_s) | {"domain": DOMAIN})
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "first_table.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(RESULTS / "first_table.md", markdown([r for r in rows if "domain" not in r]) + "\n" + domain_table(rows))


def _row(model, method, ratio, report, result, seconds, calib_s) -> dict:
    return {
        "model": model,
        "method": method,
        "ratio": ratio,
        "experts_kept": len(next(iter(report["layers"].values()))["kept"]),
        "parameters": report["parameters"]["after"]["total"],
        "perplexity": {d: v["perplexity"] for d, v in result["domains"].items()},
        "base_perplexity": {d: v["perplexity"] for d, v in result["base_domains"].items()},
        "kl": result["agreement"]["all"]["kl"],
        "top1_agreement": result["agreement"]["all"]["top1_agreement"],
        "stability_jaccard": report["stability_jaccard"],
        "compress_seconds": round(seconds, 2),
        "calibration_seconds": round(calib_s, 2),
    }


def markdown(rows: list[dict]) -> str:
    domains = [d for d in rows[0]["perplexity"] if d != "all"]
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next(r for r in rows if r["model"] == model)["base_perplexity"]
        lines += [f"### {model}", "", "| removed | method | ppl all | change | " + " | ".join(domains)
                  + " | KL | top-1 | stability | time (s) |", "|" + "---|" * (len(domains) + 8)]  # fmt: skip
        lines.append(
            "| 0 % | (uncompressed) | " + f"{base['all']:.1f} | | " + " | ".join(f"{base[d]:.1f}" for d in domains) + " | | | | |"
        )
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: (r["ratio"], r["perplexity"]["all"])):
            change = r["perplexity"]["all"] / base["all"] - 1
            stability = "" if r["stability_jaccard"] is None else f"{r['stability_jaccard']:.2f}"
            lines.append(
                f"| {r['ratio']:.0%} | {r['method']} | {r['perplexity']['all']:.1f} | {change:+.1%} | "
                + " | ".join(f"{r['perplexity'][d]:.1f}" for d in domains)
                + f" | {r['kl']:.3f} | {r['top1_agreement']:.1%} | {stability} | {r['compress_seconds']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def domain_table(rows: list[dict]) -> str:
    """Domain-specific pruning: perplexity on the chosen domain and on the others."""
    lines = [f"### Domain-specific: experts scored on `{DOMAIN}` tokens only, 50 % removed", "",
             f"| model | method | {DOMAIN} ppl (change) | other domains ppl (change) |", "|---|---|---|---|"]  # fmt: skip
    for r in (r for r in rows if r.get("domain")):
        base, ppl = r["base_perplexity"], r["perplexity"]
        others = [d for d in ppl if d not in (DOMAIN, "all")]
        mean = sum(ppl[d] for d in others) / len(others)
        base_mean = sum(base[d] for d in others) / len(others)
        lines.append(f"| {r['model']} | {r['method']} | {ppl[DOMAIN]:.1f} ({ppl[DOMAIN] / base[DOMAIN] - 1:+.1%}) | "
                     f"{mean:.1f} ({mean / base_mean - 1:+.1%}) |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
