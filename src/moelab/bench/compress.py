"""`moelab bench compress`: calibrate and REAP-prune a transformers checkpoint larger than the
memory it is allowed, and measure peak memory, time and calibration speed.

The checkpoint is generated: random bf16 weights of a Qwen3-MoE- or Mixtral-shaped model (the
family's own transformers class decides every tensor's name and shape), written shard by shard
(one tensor in memory at a time) with moelab's tokenizer, `--size-gb` in total; with `fp8`, the
same model as a block-wise FP8 release (its projection weights float8 e4m3 with a float32 scale per
128 x 128 block, as DeepSeek-V3 and Qwen3-FP8 ship them), about half the bytes. Each measured
job runs in a fresh process that reports its peak resident memory (VmHWM): `moelab compress`
(calibration layer by layer + REAP + the checked writer, without the whole-model transformers
reload postcondition, which would load the model), and, as the baseline measured in the same
run, transformers loading the same checkpoint (`from_pretrained`, bf16; it maps the shards
lazily) and running as many tokens through it (random ids, which bring every weight in).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from moelab.compress.bench import run_job
from moelab.hf.float8 import quantize
from moelab.io import atomic_write_text, save_safetensors

SHAPES = {
    # per layer: 64 experts x 3 x 1024 x 512 = 100.7 M parameters (201 MB in bf16)
    "qwen3_moe": dict(
        vocab_size=8192, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        intermediate_size=2048, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=4096,
    ),
    # per layer: 8 experts x 3 x 1024 x 4096 = 100.7 M parameters
    "mixtral": dict(
        vocab_size=8192, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=4096, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
    ),
}  # fmt: skip
JSON_FORMAT = "moelab-bench-compress/1"
FP8_BLOCK = (128, 128)


@dataclass(kw_only=True)
class BenchOptions:
    """family: qwen3_moe or mixtral; size_gb: the checkpoint's size (in bf16); tokens, seq_len: the
    calibration; ratio: experts removed; shard_mb: shard size; baseline: also measure
    transformers' from_pretrained; fp8: generate a block-wise FP8 release of the same model."""

    family: str = "qwen3_moe"
    size_gb: float = 4.0
    tokens: int = 2048
    seq_len: int = 256
    ratio: float = 0.25
    shard_mb: int = 256
    baseline: bool = True
    fp8: bool = False

    def __post_init__(self):
        if self.family not in SHAPES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {list(SHAPES)}")
        if not 0 < self.size_gb < math.inf:  # inf: no whole number of layers (an OverflowError, mid-way)
            raise ValueError(f"--size-gb must be a positive number of GB, got {self.size_gb}")
        if self.tokens < 1 or self.seq_len < 1 or self.shard_mb < 1:
            raise ValueError("tokens, seq_len and shard_mb must be positive")
        if self.fp8 and self.family != "qwen3_moe":
            raise ValueError("--fp8 generates Qwen3-MoE-shaped releases (as Qwen3-FP8 ships); use --family qwen3_moe")
        if self.tokens < self.seq_len:
            raise ValueError(
                f"--tokens {self.tokens} is less than one calibration window of {self.seq_len} tokens; "
                f"pass --tokens {self.seq_len} or more"
            )


def check_disk_space(work: Path, size_gb: float, overwrite: bool = False) -> None:
    """Refuse a size whose checkpoint and compressed copy (about twice `size_gb` GB) would not fit
    the disk that holds `work` (--size-gb 1e6 planned a million layers for minutes first).
    overwrite: the copies an earlier run kept in `work` (--keep) are replaced, so their bytes count as free."""
    existing = next(path for path in (work.absolute(), *work.absolute().parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if overwrite and work.is_dir():
        kept = [work / name for name in ("source", "pruned") if (work / name).is_dir() and not (work / name).is_symlink()]
        free += sum(f.lstat().st_size for d in kept for f in d.rglob("*") if f.is_file() and not f.is_symlink())
    if 2 * size_gb * 1e9 > free:
        raise ValueError(
            f"--size-gb {size_gb:g} needs about {2 * size_gb:g} GB under {work} (the checkpoint and its compressed "
            f"copy), and {free / 1e9:.1f} GB are free there; pass a smaller --size-gb or another --work"
        )


def checkpoint_plan(family: str, size_gb: float):
    """The transformers config of the `family` checkpoint `make_checkpoint` generates for `size_gb`
    (whole layers, at least one: a smaller size gets one) and the bytes it holds in bf16."""
    from transformers import AutoConfig

    from moelab.hf.layerwise import transformers_skeleton

    one = AutoConfig.for_model(family, num_hidden_layers=1, **SHAPES[family])
    per_layer = 2 * sum(
        p.numel() for n, p in transformers_skeleton(one).named_parameters() if ".layers.0." in n
    )
    layers = max(1, math.ceil(size_gb * 1e9 / per_layer))
    config = AutoConfig.for_model(family, num_hidden_layers=layers, dtype="bfloat16", **SHAPES[family])
    return config, 2 * sum(t.numel() for t in transformers_skeleton(config).state_dict().values())


def make_checkpoint(
    directory: Path, family: str, size_gb: float, shard_mb: int = 256, seed: int = 0, fp8: bool = False
) -> dict:
    """Write a random bf16 `family` checkpoint of about `size_gb` GB (`checkpoint_plan`) into the
    new `directory`; fp8: its projection weights as block-wise FP8 (`FP8_BLOCK`), with their scales."""
    from transformers import PreTrainedTokenizerFast

    from moelab.data.tokenizer import TOKENIZER_DIR
    from moelab.hf.layerwise import transformers_skeleton

    config, _ = checkpoint_plan(family, size_gb)
    layers = config.num_hidden_layers
    if fp8:
        config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(FP8_BLOCK)}  # fmt: skip
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(directory)
    skeleton = transformers_skeleton(config)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total = 0
    names = []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_safetensors(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
        shard.clear()

    for key, param in skeleton.state_dict().items():
        if param.dim() == 1:
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)  # norms
        else:
            tensor = (torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5).to(
                torch.bfloat16
            )
        for name, part in _as_released(key, tensor) if fp8 else [(key, tensor)]:
            if fp8 and name.endswith("proj.weight"):
                part, shard[name + "_scale_inv"] = quantize(part, FP8_BLOCK)
                total += shard[name + "_scale_inv"].nbytes
            shard[name] = part
            total += part.numel() * part.element_size()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= shard_mb * 2**20:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(directory / "model.safetensors.index.json", json.dumps(index, indent=1))
    return {"layers": layers, "bytes": total, "shards": len(names)}


def _as_released(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Qwen3-MoE's stacked experts (transformers' in-memory layout: gate_up [E, 2I, D], gate rows
    first; down [E, D, I]) as its FP8 releases store them: one gate, up and down weight per expert."""
    prefix, _, name = key.rpartition("experts.")
    if name == "gate_up_proj":
        gate, up = tensor.chunk(2, dim=1)
        return [(f"{prefix}experts.{e}.{proj}.weight", w[e].clone()) for e in range(len(tensor))
                for proj, w in (("gate_proj", gate), ("up_proj", up))]  # fmt: skip
    if name == "down_proj":
        return [(f"{prefix}experts.{e}.down_proj.weight", tensor[e].clone()) for e in range(len(tensor))]
    return [(key, tensor)]


_COMPRESS_JOB = """
import json, sys, time
from moelab.compress import CalibrationOptions, compress
began = time.perf_counter()
report = compress(sys.argv[1], sys.argv[2], method="reap", ratio=float(sys.argv[3]), reload=False, quiet=True,
                  calib_options=CalibrationOptions(tokens=int(sys.argv[4]), seq_len=int(sys.argv[5]), sample_tokens=0))
seconds = time.perf_counter() - began
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "timings": report["timings"],
                  "calibration_tokens": report["calibration"]["mixture"]["tokens"]}))
"""

_LOAD_JOB = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
began = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, local_files_only=True)
ids = torch.randint(0, model.config.vocab_size, (int(sys.argv[2]) // int(sys.argv[3]), int(sys.argv[3])))
with torch.no_grad():
    for batch in ids.split(8):
        model(input_ids=batch, use_cache=False)
seconds = time.perf_counter() - began
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024}))
"""


def run(options: BenchOptions, work: Path, *, progress=None) -> dict:
    """Generate the checkpoint in `work`/source, compress it into `work`/pruned in a child
    process (and load it with transformers in another), and return the measurements."""
    say = progress.print if progress is not None else (lambda *a: None)
    config, size = checkpoint_plan(options.family, options.size_gb)
    layers = config.num_hidden_layers
    asked_less = layers == 1 and size > options.size_gb * 1e9
    least = f" (the least there is: --size-gb {options.size_gb:g} asks for less)" if asked_less else ""
    say(f"generating a {size / 1e9:.2f} GB{' (in bf16; written as FP8)' if options.fp8 else ''} {options.family} "
        f"checkpoint of {layers} layer{'s' if layers > 1 else ''}{least} in {work / 'source'}")
    began = time.perf_counter()
    made = make_checkpoint(work / "source", options.family, options.size_gb, options.shard_mb, fp8=options.fp8)
    doc = {
        "format": JSON_FORMAT,
        "options": asdict(options),
        "checkpoint": made | {"seconds": round(time.perf_counter() - began, 1)},
    }
    say("compressing (calibration + REAP + writer) in a fresh process")
    args = [
        str(work / "source"),
        str(work / "pruned"),
        str(options.ratio),
        str(options.tokens),
        str(options.seq_len),
    ]
    doc["compress"] = run_job("compress", _COMPRESS_JOB, args)
    doc["compress"]["calibration_tokens_per_s"] = (
        doc["compress"]["calibration_tokens"] / doc["compress"]["timings"]["calibration_s"]
    )
    doc["compress"]["peak_rss_over_checkpoint"] = doc["compress"]["peak_rss_mb"] * 2**20 / made["bytes"]
    if options.baseline:
        say("baseline: transformers loads the same checkpoint and runs the calibration tokens through it")
        args = [str(work / "source"), str(options.tokens), str(options.seq_len)]
        doc["transformers_load"] = run_job("transformers baseline", _LOAD_JOB, args)
        doc["compress"]["peak_rss_vs_transformers_load"] = (
            doc["compress"]["peak_rss_mb"] / doc["transformers_load"]["peak_rss_mb"]
        )
    return doc


def render(doc: dict) -> Table:
    made, comp = doc["checkpoint"], doc["compress"]
    fp8 = " block-wise FP8" if doc["options"].get("fp8") else ""
    table = Table(title=f"moelab compress on a {made['bytes'] / 1e9:.2f} GB{fp8} {doc['options']['family']} checkpoint "
                  f"({made['layers']} layers, {made['shards']} shards)")  # fmt: skip
    table.add_column("job")
    for column in ("peak RSS (MB)", "RSS / checkpoint", "time (s)", "calibration tokens/s"):
        table.add_column(column, justify="right")
    table.add_row("moelab compress (REAP)", f"{comp['peak_rss_mb']:,.0f}", f"{comp['peak_rss_over_checkpoint']:.2f}",
                  f"{comp['seconds']:.0f}", f"{comp['calibration_tokens_per_s']:,.0f}")  # fmt: skip
    if "transformers_load" in doc:
        load = doc["transformers_load"]
        table.add_row("transformers: load + forward (baseline)", f"{load['peak_rss_mb']:,.0f}",
                      f"{load['peak_rss_mb'] * 2**20 / made['bytes']:.2f}", f"{load['seconds']:.0f}", "-")  # fmt: skip
    return table
