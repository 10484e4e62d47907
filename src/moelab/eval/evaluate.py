"""`moelab eval`: how good a (compressed) model is, and how far it moved from its base.

    report = evaluate("pruned/", base="original/")
    report["domains"]["german"]["perplexity"], report["agreement"]["all"]["kl"], report["generation"]

On the same token windows of every domain (by default the shipped corpus' test split; the
model's own tokenizer): perplexity per domain and overall; with a base model, KL(base || model)
per token and top-1 agreement; on fixed prompts (the start of evenly spaced windows of each
domain), the rate of degenerate greedy continuations (an n-gram repeated in a loop) for both;
parameters, active parameters per token and forward tokens/s. Both models run with the same
windows, batch size, dtype and threads.

moelab checkpoints run in moelab, transformers checkpoints in transformers (strict loading: a
checkpoint transformers cannot load exactly is an error, not a randomly initialised model).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from tqdm.auto import tqdm

from moelab.data import IGNORE_INDEX, eval_batches
from moelab.hf.adapters import NATIVE, resolve
from moelab.hf.layouts import PerExpert
from moelab.hf.view import ModelView, MoELayerView
from moelab.models.reference import model_dir
from moelab.trace.data import load_streams
from moelab.trace.model import checkpoint_encoder, hf_max_len
from moelab.validation import check_field_types, check_not_str

ALL = "all"
EVAL_FORMAT = "moelab-eval/1"
LOOP_NGRAM = 4  # a continuation is degenerate when one of its 4-grams occurs LOOP_REPEATS times
LOOP_REPEATS = 3
# prompts decoded together: on the shipped models and five compressed transformers exports, 32
# prompts each, batch 16 gave batch 1's greedy tokens, 6-13x faster (where routing looks across the
# batch, `MoETransformer.generate` recomputes each prompt on its own)
GENERATION_BATCH = 16


@dataclass(kw_only=True)
class EvalOptions:
    """data: a data spec (`moelab.trace.data`); split: the corpus split; eval_tokens: test tokens per domain;
    seq_len, batch_size: the windows; prompts: per domain, for the generation check (0: skip);
    prompt_tokens, gen_tokens: their length and the greedy continuation's; dynamic_skip:
    calibration statistics whose NAEE skip ratios the model (a moelab one) runs with."""

    data: str | os.PathLike = "corpus"
    split: str = "test"
    domains: Sequence[str] | None = None
    eval_tokens: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    prompts: int = 4
    prompt_tokens: int = 32
    gen_tokens: int = 48
    dynamic_skip: str | os.PathLike | None = None

    def __post_init__(self):
        for name in ("data", "dynamic_skip"):  # paths as str: the report's options are JSON
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_not_str("EvalOptions.domains", self.domains, "domain names")
        check_field_types(self)
        for name in ("eval_tokens", "seq_len", "batch_size", "prompt_tokens", "gen_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval {name} must be >= 1, got {getattr(self, name)}")
        if self.prompts < 0:
            raise ValueError(f"eval prompts must be >= 0, got {self.prompts}")


class LoadedLM:
    """A checkpoint ready to score: logits(ids [B, S]) -> [B, S, V]; generate(ids, n) greedily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config, checkpoint, family = resolve(self.path)
        self.native = family is NATIVE
        if self.native:
            checkpoint.close()
            from moelab.models import load_pretrained

            self.model = load_pretrained(self.path).eval()
            self.encoder = checkpoint_encoder(self.path, native=True)
            self.max_len = self.model.config.max_seq_len
        else:
            from moelab.hf.loading import load_causal_lm

            with ModelView(checkpoint, config, family, family.layer_count(config)) as view:
                view.check()  # every MoE layer against config.json (top_k, shapes, dtypes), from the shard headers
            self.model = load_causal_lm(self.path, quiet=True, allow_unexpected=True)
            self.encoder = checkpoint_encoder(self.path)
            self.max_len = hf_max_len(self.model.config)
            if self.encoder is None:
                raise ValueError(
                    f"{self.path} has no tokenizer files; save the model's tokenizer beside its weights"
                )
        self.vocab_size = int(config.get("vocab_size") or self.model.config.vocab_size)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.model(ids) if self.native else self.model(input_ids=ids, use_cache=False)).logits.float()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """ids: [B, S] prompts of equal length -> [B, n] greedy continuations (never stopped early,
        so loops show)."""
        if self.native:
            return self.model.generate(ids, n, greedy=True)[:, ids.shape[1] :]
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
        return out[:, ids.shape[1] :]


def evaluate(
    model: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    options: EvalOptions | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """The evaluation report of `model` (and its distance from `base`); see the module docstring.
    Either may be a shipped model's name."""
    model, base = model_dir(model), None if base is None else model_dir(base)
    options = options or EvalOptions()
    lm = LoadedLM(model)
    if options.dynamic_skip is not None:
        if not lm.native:
            raise ValueError(
                f"dynamic skipping runs in moelab's runtime; {model} is a transformers checkpoint (evaluate it "
                "without --dynamic-skip)"
            )
        from moelab.compress.skipping import apply_dynamic_skipping, check_skip_statistics, skip_ratios
        from moelab.compress.stats import Calibration

        calibration = Calibration(options.dynamic_skip)
        check_skip_statistics(calibration, model)
        apply_dynamic_skipping(lm.model, skip_ratios(calibration))
    ref = LoadedLM(base) if base is not None else None
    if ref is not None and ref.vocab_size != lm.vocab_size:
        raise ValueError(
            f"{model} has {lm.vocab_size} tokens and the base {base} has {ref.vocab_size}; they cannot be "
            "compared token by token (pass the model this one was made from)"
        )
    context = min(m.max_len for m in (lm, ref) if m is not None)
    asked = options.seq_len
    options = dataclasses.replace(options, seq_len=min(options.seq_len, context))  # as analyze, calibrate do
    if options.prompts and options.prompt_tokens + options.gen_tokens > context:
        raise ValueError(
            f"prompt_tokens + gen_tokens ({options.prompt_tokens} + {options.gen_tokens}) exceed the context "
            f"of {context} tokens; lower --prompt-tokens or --new-tokens, or skip the check (--prompts 0)"
        )
    streams = load_streams(
        options.data, split=options.split, domains=options.domains, encoder=lm.encoder, quiet=quiet
    )
    streams = {name: s[: options.eval_tokens + 1] for name, s in streams.items() if len(s) >= 2}
    if not streams:
        raise ValueError(f"the evaluation data {options.data!r} has no domain with at least 2 tokens")
    top = max(int(s.max()) for s in streams.values())
    if top >= lm.vocab_size:
        raise ValueError(
            f"token id {top} is outside {model}'s vocabulary ({lm.vocab_size}); use its tokenizer"
        )
    report: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "model": str(model),
        "base": None if base is None else str(base),
        "options": _describe(options) | ({"seq_len_asked": asked} if asked != options.seq_len else {}),
    }
    targets = sum(len(stream) - 1 for stream in streams.values())
    with tqdm(total=targets, desc=f"score {lm.path.name}", unit="tok", disable=quiet, leave=False) as bar:
        scored = {name: _score(lm, ref, stream, options, bar) for name, stream in streams.items()}
    report["domains"] = {name: s["model"] for name, s in scored.items()}
    report["domains"][ALL] = _pool([s["model"] for s in scored.values()])
    report["tokens_per_second"] = _speed(scored, "model")
    report["parameters"] = parameter_counts(model)
    if ref is not None:
        report["base_domains"] = {name: s["base"] for name, s in scored.items()}
        report["base_domains"][ALL] = _pool([s["base"] for s in scored.values()])
        report["agreement"] = {name: s["agreement"] for name, s in scored.items()}
        report["agreement"][ALL] = _pool([s["agreement"] for s in scored.values()])
        report["base_tokens_per_second"] = _speed(scored, "base")
        report["base_parameters"] = parameter_counts(base)
    prompts = _prompts(streams, options) if options.prompts else []
    if prompts:
        report["generation"] = {"prompts": len(prompts), "model": _degeneration(lm, prompts, options, quiet)}
        if ref is not None:
            report["generation"]["base"] = _degeneration(ref, prompts, options, quiet)
    elif options.prompts:  # not a rate of 0 %: nothing was checked
        report["generation"] = {
            "prompts": 0,
            "skipped": f"no domain has the {options.prompt_tokens} tokens a prompt takes",
        }
    return report


def _score(lm: LoadedLM, ref: LoadedLM | None, stream: np.ndarray, options: EvalOptions, bar: tqdm) -> dict:
    """Loss sums (and KL / agreement against `ref`) of one domain's windows; `bar` counts the
    scored tokens."""
    out = {"model": {"loss_sum": 0.0, "tokens": 0, "seconds": 0.0}}
    if ref is not None:
        out["base"] = {"loss_sum": 0.0, "tokens": 0, "seconds": 0.0}
        out["agreement"] = {"kl_sum": 0.0, "agree": 0, "tokens": 0}
    for inputs, targets in eval_batches(stream, options.seq_len, options.batch_size):
        mask = targets != IGNORE_INDEX
        logits = _timed(lm, inputs, out["model"])
        out["model"]["loss_sum"] += float(F.cross_entropy(logits[mask], targets[mask], reduction="sum"))
        out["model"]["tokens"] += int(mask.sum())
        if ref is not None:
            base_logits = _timed(ref, inputs, out["base"])
            out["base"]["loss_sum"] += float(
                F.cross_entropy(base_logits[mask], targets[mask], reduction="sum")
            )
            out["base"]["tokens"] += int(mask.sum())
            p = base_logits[mask].log_softmax(-1)
            q = logits[mask].log_softmax(-1)
            out["agreement"]["kl_sum"] += float((p.exp() * (p - q)).sum())
            out["agreement"]["agree"] += int((p.argmax(-1) == q.argmax(-1)).sum())
            out["agreement"]["tokens"] += int(mask.sum())
        bar.update(int(mask.sum()))
    return {k: _finish(v) for k, v in out.items()}


def _timed(lm: LoadedLM, inputs: torch.Tensor, into: dict) -> torch.Tensor:
    began = time.perf_counter()
    logits = lm.logits(inputs)
    into["seconds"] += time.perf_counter() - began
    return logits


def _finish(sums: dict) -> dict:
    tokens = max(sums["tokens"], 1)
    if "loss_sum" in sums:
        loss = sums["loss_sum"] / tokens
        return {**sums, "loss": loss, "perplexity": math.exp(min(loss, 700))}
    return {**sums, "kl": sums["kl_sum"] / tokens, "top1_agreement": sums["agree"] / tokens}


def _pool(parts: list[dict]) -> dict:
    keys = [k for k in parts[0] if k.endswith("_sum") or k in ("tokens", "seconds", "agree")]
    return _finish({k: sum(p[k] for p in parts) for k in keys})


def _speed(scored: dict, who: str) -> float:
    tokens = sum(s[who]["tokens"] for s in scored.values())
    seconds = sum(s[who]["seconds"] for s in scored.values())
    return tokens / max(seconds, 1e-9)


def _prompts(streams: dict[str, np.ndarray], options: EvalOptions) -> list[tuple[str, torch.Tensor]]:
    """`options.prompts` prompts per domain: `prompt_tokens` tokens at evenly spaced offsets, each offset
    once (a domain of fewer offsets than prompts gives fewer: a prompt counted twice is no second sample)."""
    prompts = []
    for name, stream in streams.items():
        span = len(stream) - options.prompt_tokens
        if span < 0:
            continue
        for start in sorted({span * k // max(options.prompts, 1) for k in range(options.prompts)}):
            ids = torch.as_tensor(np.asarray(stream[start : start + options.prompt_tokens], dtype=np.int64))
            prompts.append((name, ids[None]))
    return prompts


def _degeneration(lm: LoadedLM, prompts, options: EvalOptions, quiet: bool) -> dict:
    """The share of greedy continuations stuck in a loop, with a 95 % Wilson interval. The prompts
    (all `prompt_tokens` long) decode `GENERATION_BATCH` at a time."""
    loops = 0
    by_domain: dict[str, list[int]] = {}
    with tqdm(total=len(prompts), desc=f"generate {lm.path.name}", unit="prompt", disable=quiet, leave=False) as bar:
        for first in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[first : first + GENERATION_BATCH]
            continuations = lm.generate(torch.cat([ids for _, ids in batch]), options.gen_tokens)
            for (name, _), tokens in zip(batch, continuations.tolist()):
                looped = is_degenerate(tokens)
                loops += looped
                by_domain.setdefault(name, []).append(int(looped))
            bar.update(len(batch))
    n = len(prompts)
    low, high = wilson_interval(loops, n)
    return {
        "degenerate": loops,
        "rate": loops / max(n, 1),
        "ci95": [low, high],
        "by_domain": {name: sum(v) / len(v) for name, v in by_domain.items()},
    }


def is_degenerate(tokens: list[int], n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Whether some n-gram occurs at least `repeats` times in `tokens` (a repetition loop)."""
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= repeats:
            return True
    return False


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ((0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def parameter_counts(path: str | os.PathLike) -> dict[str, int]:
    """{"total": every weight (a hash router's table of token ids, no weight, left out, and the gate
    and up stored for identity experts, which nothing reads: `Layout.stored_padding`),
    "routed_experts": the routed experts', "active": what one token uses (everything but the routed
    experts, plus top_k / E of each MoE layer's, at most all of them where the router also chooses
    identity experts, and of another module's routed experts in that layer: JetMoE's attention
    experts, `Family.routed_elsewhere`; ERNIE-4.5-VL's vision experts, as transformers names them or
    stored beside the text experts, `PerExpert.other_block_keys`)}, from the shard headers."""
    config, checkpoint, family = resolve(path)
    checkpoint.close()
    shapes = checkpoint.with_shapes_only()
    elsewhere = getattr(family, "routed_elsewhere", ())
    names = set(shapes.keys()) if elsewhere else set()
    with ModelView(shapes, config, family, family.layer_count(config)) as view:
        total = sum(math.prod(shapes.shape(k)) for k in shapes.keys())
        routed = active_routed = inactive_elsewhere = 0
        for layer in view.layers():
            if isinstance(layer, MoELayerView):
                if layer.router.token_experts is not None:
                    total -= layer.router.token_experts.numel()
                e = layer.experts
                n = sum(
                    t.numel()
                    for t in (e.gate, e.up, e.down, e.gate_bias, e.up_bias, e.down_bias)
                    if t is not None
                )
                routed += n
                active_routed += n * min(layer.router.top_k, layer.router.num_experts) // layer.router.num_experts
                layout, prefix = family.layout_of(shapes, layer.index), family.prefix(layer.index)
                if layer.router.identity is not None:  # LongCat-Flash as transformers saves it
                    total -= layout.stored_padding(shapes, prefix) * sum(t[0].numel() for t in (e.gate, e.up) if t is not None)
                if isinstance(layout.experts, PerExpert):  # another block's experts, as many (ERNIE-4.5-VL's vision ones)
                    n = sum(math.prod(shapes.shape(key)) for key in layout.experts.other_block_keys(shapes, prefix))
                    inactive_elsewhere += n - n * layer.router.top_k // layer.router.num_experts
                for name in elsewhere:
                    key = family.layer_prefix.format(n=layer.index) + name
                    if key in names:
                        shape = shapes.shape(key)
                        n = math.prod(shape)
                        inactive_elsewhere += n - n * layer.router.top_k // shape[0]
    return {"total": total, "routed_experts": routed,
            "active": total - routed + active_routed - inactive_elsewhere}  # fmt: skip


def _describe(options: EvalOptions) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(options).items()}


def render_report(report: dict[str, Any]) -> Table:
    """The report as a table: one row per domain (perplexity, and against the base: its
    perplexity, the change, KL and top-1 agreement), then size, speed and degeneration."""
    has_base = report.get("base") is not None
    skipping = report["options"].get("dynamic_skip")
    table = Table(
        title=f"{report['model']}"
        + (f" with dynamic skipping (ratios from {skipping})" if skipping else "")
        + (f" vs base {report['base']}" if has_base else "")
    )
    columns = ["domain", "perplexity"] + (
        ["base", "change", "KL(base||model) (nats/token)", "top-1 agree"] if has_base else []
    )
    for column in columns:
        table.add_column(column, justify="right" if column != "domain" else "left")
    for name, scores in report["domains"].items():
        row = [name, f"{scores['perplexity']:.2f}"]
        if has_base:
            base = report["base_domains"][name]["perplexity"]
            agreement = report["agreement"][name]
            row += [
                f"{base:.2f}",
                f"{scores['perplexity'] / base - 1:+.1%}",
                f"{agreement['kl']:.4f}",
                f"{agreement['top1_agreement']:.1%}",
            ]
        table.add_row(*row)
    params = report["parameters"]
    caption = [
        f"parameters {params['total']:,} (active {params['active']:,}); {report['tokens_per_second']:,.0f} tokens/s"
    ]
    if has_base:
        caption.append(
            f"base {report['base_parameters']['total']:,} (active {report['base_parameters']['active']:,}); "
            f"{report['base_tokens_per_second']:,.0f} tokens/s"
        )
    if "seq_len_asked" in report["options"]:
        options = report["options"]
        caption.append(f"windows of {options['seq_len']} tokens, the context ({options['seq_len_asked']} asked)")
    if "skipped" in report.get("generation", {}):
        caption.append(f"degenerate generations not checked: {report['generation']['skipped']}")
    elif "generation" in report:
        for who in ("model", "base"):
            if who in report["generation"]:
                g = report["generation"][who]
                caption.append(
                    f"{who}: {g['degenerate']}/{report['generation']['prompts']} greedy continuations loop "
                    f"({g['rate']:.0%}, 95% CI {g['ci95'][0]:.0%}-{g['ci95'][1]:.0%})"
                )
    table.caption = "\n".join(caption)
    table.min_width = max(len(line) for line in [table.title, *caption])  # a model's path, unbroken
    return table
