"""One clear line for every bad input (issue 9).

CLI: every case exits with status 2 and prints exactly one line on stderr, `error: ...`, naming
the offending file or option and the problem; no traceback; every input file keeps its sha256.
Python API: a ValueError (CheckpointError for checkpoints) whose message names the file.

The cases are tables: `CLI_CASES` (one builder per bad input; it returns the arguments, the
inputs to fingerprint and the fragments the error line must contain) and one parametrised test
per API entry point. Inputs are tiny models and traces built once per module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import build
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from moelab import cli
from moelab import files as files_module
from moelab.bench.layer import BenchOptions
from moelab.compress import CalibrationOptions
from moelab.compress.router_fit import RouterFit
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.eval import EvalOptions
from moelab.files import file_inside, read_config_file, read_text
from moelab.hf import CheckpointError, open_checkpoint
from moelab.hf.expert_map import read_expert_map
from moelab.models import MoETransformer, load_pretrained, model_info, save_pretrained, tiny
from moelab.models.reference import reference_model_dir
from moelab.nn import MoEConfig
from moelab.trace import TraceOptions, load_model, load_streams, open_trace, trace_model
from moelab.train import RunConfig
from moelab.validation import check_field_types, non_finite_names

MIXTRAL_ROUTER = "model.layers.0.block_sparse_moe.gate.weight"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Pristine inputs, copied by each case: moelab/ (tiny(), one file), mixtral/ (one file),
    sharded/ (mixtral with an index and several shards), olmoe/ and mixtral8k/ (moelab's
    vocabulary), trace/ (of moelab/)."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    save_pretrained(MoETransformer(tiny()), root / "moelab")
    model = build("mixtral")
    model.save_pretrained(root / "mixtral")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    build("olmoe", vocab_size=8192).save_pretrained(root / "olmoe")
    build("mixtral", vocab_size=8192).save_pretrained(root / "mixtral8k")
    streams = {"a": np.arange(96) % 128, "b": np.arange(96)[::-1] % 128}
    trace_model(load_model(root / "moelab"), streams, root / "trace", TraceOptions(max_tokens=64, seq_len=16))
    return root


# ----------------------------------------------------------------------------- helpers


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file at or under `paths`."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def run_cli(monkeypatch, capsys, args: list) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `moelab *args`, run in-process."""
    monkeypatch.setattr("sys.argv", ["moelab", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def copy(sources: Path, name: str, tmp: Path) -> Path:
    return Path(shutil.copytree(sources / name, tmp / name))


def edit_json(path: Path, **changes) -> Path:
    """Set keys of the JSON object in `path` (a value of `...` deletes the key)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def hf(sources: Path, tmp: Path, **config) -> Path:
    """A copy of the mixtral checkpoint with config.json keys changed."""
    ckpt = copy(sources, "mixtral", tmp)
    edit_json(ckpt / "config.json", **config)
    return ckpt


def hf_tensors(sources: Path, tmp: Path, edit) -> Path:
    """A copy of the mixtral checkpoint with its tensors dict changed in place by `edit`."""
    ckpt = copy(sources, "mixtral", tmp)
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


def sharded(sources: Path, tmp: Path, shard_name) -> Path:
    """A copy of the sharded checkpoint whose index maps the first tensor to `shard_name(ckpt)`."""
    ckpt = copy(sources, "sharded", tmp)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard_name(ckpt)
    index_path.write_text(json.dumps(index))
    return ckpt


def symlinked_shard(sources: Path, tmp: Path) -> Path:
    """The sharded checkpoint with one shard replaced by a symlink to a copy outside it."""
    ckpt = copy(sources, "sharded", tmp)
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    outside = tmp / "elsewhere"
    outside.mkdir()
    shard.rename(outside / shard.name)
    shard.symlink_to(outside / shard.name)
    return ckpt


def truncated(sources: Path, tmp: Path) -> Path:
    """A copy of the moelab checkpoint with its weights cut to a third."""
    model = copy(sources, "moelab", tmp)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    return model


def weights_directory(sources: Path, tmp: Path) -> Path:
    model = copy(sources, "moelab", tmp)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    return model


def moelab_tensors(sources: Path, tmp: Path, change) -> Path:
    """A copy of the moelab checkpoint with its embedding changed by `change`."""
    model = copy(sources, "moelab", tmp)
    tensors = load_file(model / "model.safetensors")
    tensors["embed.weight"] = change(tensors["embed.weight"]).contiguous()
    save_file(tensors, model / "model.safetensors")
    return model


def text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def trace(sources: Path, tmp: Path, **manifest) -> Path:
    """A copy of the trace with manifest.json keys changed."""
    path = copy(sources, "trace", tmp)
    edit_json(path / "manifest.json", **manifest)
    return path


def trace_shard(sources: Path, tmp: Path, edit) -> Path:
    """A copy of the trace whose first shard's tensors are changed in place by `edit`."""
    path = copy(sources, "trace", tmp)
    shard = path / json.loads((path / "manifest.json").read_text())["shards"][0]["file"]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    return path


MODEL_YAML = "model:\n  vocab_size: 64\n  dim: 32\n  n_layers: 1\n  n_heads: 4\n"
RUN_YAML = """\
model: tiny
train:
  steps: 2
  batch_size: 2
  seq_len: 16
"""


# ----------------------------------------------------------------------------- CLI cases

CLI_CASES = {}


def case(fn):
    """Register a CLI case: fn(tmp, sources) -> (args, inputs, fragments of the error line)."""
    CLI_CASES[fn.__name__] = fn
    return fn


# trace: transformers checkpoints are checked through moelab's view before transformers loads them


@case
def trace_expert_count_differs(tmp, src):
    ckpt = hf(src, tmp, num_local_experts=3)
    return ["trace", ckpt, "--out", tmp / "out", "--quiet"], [ckpt], [str(ckpt), "config says 3 experts"]


@case
def analyze_transformers_checkpoint_without_tokenizer(tmp, src):
    ckpt = copy(src, "mixtral8k", tmp)  # its ids fit moelab's vocabulary, but its text is not moelab's
    args = ["analyze", ckpt, "--out", tmp / "out", "--max-tokens", "64", "--quiet"]
    return args, [ckpt], [str(ckpt), "has no tokenizer files", "tokenizer.save_pretrained"]


@case
def analyze_trace_with_data_options(tmp, src):
    trace = copy(src, "trace", tmp)
    args = ["analyze", trace, "--out", tmp / "out", "--domain", "code", "--quiet"]
    return args, [trace], [str(trace), "is a trace", "do not apply"]


@case
def trace_negative_expert_count(tmp, src):
    ckpt = hf(src, tmp, num_local_experts=-4)
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt), "config says -4 experts (num_local_experts)"]


@case
def trace_non_integer_top_k(tmp, src):
    ckpt = hf(src, tmp, num_experts_per_tok=1.5)
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt), "top_k must be an integer, got float 1.5"]


@case
def trace_negative_layer_count(tmp, src):
    ckpt = hf(src, tmp, num_hidden_layers=-1)
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt), "gives -1 as the number of layers"]


@case
def trace_transposed_expert_tensor(tmp, src):
    def transpose_down(tensors):
        for key in [k for k in tensors if ".layers.0." in k and k.endswith(".w2.weight")]:
            tensors[key] = tensors[key].T.contiguous()

    ckpt = hf_tensors(src, tmp, transpose_down)
    return ["trace", ckpt, "--quiet"], [ckpt], [f"{ckpt}, layer 0", "experts down has shape [4, 16, 32]"]


@case
def trace_integer_router_tensor(tmp, src):
    ckpt = hf_tensors(src, tmp, lambda t: t.update({MIXTRAL_ROUTER: t[MIXTRAL_ROUTER].long()}))
    return ["trace", ckpt, "--quiet"], [ckpt], [f"{ckpt}, layer 0", "router weight has dtype torch.int64"]


MIXTRAL_EXPERT_W1 = "model.layers.1.block_sparse_moe.experts.{e}.w1.weight"  # gate


@case
def trace_integer_expert_among_float_ones(tmp, src):
    """Stacking an expert's int64 matrix with its siblings' float32 ones promoted it: read as its cast."""
    name = MIXTRAL_EXPERT_W1.format(e=2)
    ckpt = hf_tensors(src, tmp, lambda t: t.update({name: t[name].long()}))
    return ["trace", ckpt, "--quiet"], [ckpt], [f"{name} has dtype torch.int64", "must hold floating-point weights"]


@case
def trace_stray_tensor_of_an_expert_past_the_last(tmp, src):
    """A gate matrix of an expert 4 with no up or down (4 experts): transformers' own error pointed at
    a load report moelab mutes."""
    stray = MIXTRAL_EXPERT_W1.format(e=4)
    ckpt = hf_tensors(src, tmp, lambda t: t.update({stray: t[MIXTRAL_EXPERT_W1.format(e=0)].clone()}))
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt), f"{stray} is stored but", "remove the stray tensor"]


@case
def trace_integer_attention_weight(tmp, src):
    """A weight transformers loads outside the view: it cast int32 to float32 and traced on."""
    name = "model.layers.1.self_attn.q_proj.weight"
    ckpt = hf_tensors(src, tmp, lambda t: t.update({name: t[name].int()}))
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt), f"{name} stored as integers", "re-download it"]


@case
def trace_width_differs_from_the_config(tmp, src):
    """The view checks the experts' width against intermediate_size, before transformers would."""
    ckpt = hf(src, tmp, intermediate_size=8)
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt), "config says the experts are 8 wide (intermediate_size)"]


@case
def trace_config_is_a_list(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    text(ckpt / "config.json", "[1, 2]")
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt / "config.json"), "holds a JSON list"]


@case
def trace_config_is_not_json(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    text(ckpt / "config.json", '{\n  "model_type": "mixtral",\n  "hidden_size": 32,,\n}')
    return ["trace", ckpt, "--quiet"], [ckpt], [f"{ckpt / 'config.json'}:3: not valid JSON"]


@case
def trace_quantization_config_is_a_string(tmp, src):
    ckpt = hf(src, tmp, quantization_config="fp8")
    return (
        ["trace", ckpt, "--quiet"],
        [ckpt],
        [str(ckpt / "config.json"), "quantization_config is 'fp8'; transformers and moelab read an object with a quant_method"],
    )


@case
def trace_index_without_weight_map(tmp, src):
    ckpt = copy(src, "sharded", tmp)
    edit_json(ckpt / "model.safetensors.index.json", weight_map=...)
    return (
        ["trace", ckpt, "--quiet"],
        [ckpt],
        [str(ckpt / "model.safetensors.index.json"), "has no weight_map"],
    )


@case
def trace_index_shard_outside(tmp, src):
    text(tmp / "outside.safetensors", b"")
    ckpt = sharded(src, tmp, lambda c: "../outside.safetensors")
    index = ckpt / "model.safetensors.index.json"
    return ["trace", ckpt, "--quiet"], [ckpt], [str(index), "names the file '../outside.safetensors'"]


@case
def trace_index_shard_symlinked_outside(tmp, src):
    ckpt = symlinked_shard(src, tmp)
    index = ckpt / "model.safetensors.index.json"
    return ["trace", ckpt, "--quiet"], [ckpt], [str(index), "links out of the directory are refused"]


@case
def trace_safetensors_is_a_directory(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    return ["trace", ckpt, "--quiet"], [ckpt], [str(ckpt / "model.safetensors"), "is a directory"]


# trace and analyze: moelab checkpoints and data files


@case
def trace_truncated_moelab_checkpoint(tmp, src):
    model = truncated(src, tmp)
    return ["trace", model, "--quiet"], [model], [str(model / "model.safetensors"), "truncated or corrupt"]


@case
def trace_moelab_config_not_a_model_config(tmp, src):
    model = copy(src, "moelab", tmp)
    edit_json(model / "config.json", dimm=32)
    return (
        ["trace", model, "--quiet"],
        [model],
        [str(model / "config.json"), "unknown ModelConfig field 'dimm'"],
    )


@case
def trace_jsonl_bad_line(tmp, src):
    model = copy(src, "moelab", tmp)
    data = text(tmp / "data.jsonl", '{"text": "one"}\n\n{"text": "two",}\n')
    args = ["trace", model, "--data", data, "--quiet"]
    return args, [model, data], [f"{data}:3: not valid JSON"]


@case
def trace_jsonl_null_domain(tmp, src):
    model = copy(src, "moelab", tmp)
    data = text(tmp / "data.jsonl", '{"text": "a\u2028b"}\n{"text": "two", "domain": null}\n')
    args = ["trace", model, "--data", data, "--quiet"]
    return args, [model, data], [f"{data}:2: 'domain' must be a non-empty string, got None"]


@case
def trace_jsonl_record_without_text(tmp, src):
    model = copy(src, "moelab", tmp)
    data = text(tmp / "data" / "d.jsonl", '"just a string"\n')
    args = ["trace", model, "--data", tmp / "data", "--quiet"]
    return args, [model, data], [f"{data}:1: a JSON line needs a 'text' field"]


@case
def trace_text_not_utf8(tmp, src):
    model = copy(src, "moelab", tmp)
    data = text(tmp / "data.txt", b"caf\xe9")
    return ["trace", model, "--data", data, "--quiet"], [model, data], [str(data), "is not UTF-8 text"]


@case
def trace_seq_len_zero(tmp, src):
    model = copy(src, "moelab", tmp)
    return (
        ["trace", model, "--seq-len", "0", "--quiet"],
        [model],
        ["'--seq-len'", "greater than or equal to 1"],
    )


@case
def trace_max_tokens_not_a_number(tmp, src):
    model = copy(src, "moelab", tmp)
    return ["trace", model, "--max-tokens", "lots"], [model], ["'--max-tokens'", "valid integer"]


@case
def analyze_batch_size_negative(tmp, src):
    model = copy(src, "moelab", tmp)
    return ["analyze", model, "--batch-size", "-1"], [model], ["'--batch-size'", "greater than or equal to 1"]


@case
def analyze_truncated_moelab_checkpoint(tmp, src):
    model = truncated(src, tmp)
    return ["analyze", model, "--out", tmp / "out", "--quiet"], [model], [str(model / "model.safetensors")]


# analyze: traces


@case
def analyze_manifest_missing_field(tmp, src):
    path = trace(src, tmp, layers=...)
    return ["analyze", path, "--out", tmp / "out"], [path], [str(path / "manifest.json"), "'layers'"]


@case
def analyze_manifest_extra_field(tmp, src):
    path = trace(src, tmp, layer_names=["a"])
    return (
        ["analyze", path, "--out", tmp / "out"],
        [path],
        [str(path / "manifest.json"), "field 'layer_names'"],
    )


@case
def analyze_manifest_wrong_type(tmp, src):
    path = trace(src, tmp, num_experts=["4"])
    manifest = path / "manifest.json"
    return (
        ["analyze", path],
        [path],
        [str(manifest), "TraceInfo.num_experts must be list[int], got list ['4']"],
    )


@case
def analyze_manifest_not_json(tmp, src):
    path = copy(src, "trace", tmp)
    text(path / "manifest.json", (path / "manifest.json").read_text()[:-20])
    return ["analyze", path], [path], [f"{path / 'manifest.json'}:", "not valid JSON"]


@case
def analyze_shard_outside_the_trace(tmp, src):
    shutil.copy(next((src / "trace").glob("shard-*")), tmp / "stolen.safetensors")
    path = trace(src, tmp, shards=[{"file": "../stolen.safetensors", "tokens": 64, "sequences": 4}])
    return ["analyze", path], [path], [str(path / "manifest.json"), "'../stolen.safetensors'"]


@case
def analyze_shard_absolute_path(tmp, src):
    stolen = Path(shutil.copy(next((src / "trace").glob("shard-*")), tmp / "stolen.safetensors"))
    path = trace(src, tmp, shards=[{"file": str(stolen), "tokens": 64, "sequences": 4}])
    return ["analyze", path], [path], [str(path / "manifest.json"), f"names the file '{stolen}'"]


@case
def analyze_shard_symlinked_outside(tmp, src):
    path = copy(src, "trace", tmp)
    shard = next(path.glob("shard-*"))
    shard.rename(tmp / shard.name)
    shard.symlink_to(tmp / shard.name)
    return ["analyze", path], [path], [str(path / "manifest.json"), "links out of the directory are refused"]


@case
def analyze_truncated_shard(tmp, src):
    path = copy(src, "trace", tmp)
    shard = next(path.glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:100])
    return ["analyze", path, "--out", tmp / "out"], [path], [str(shard), "truncated or corrupt"]


@case
def analyze_shard_lacks_a_tensor(tmp, src):
    path = trace_shard(src, tmp, lambda t: t.pop("layer1.weights"))
    return ["analyze", path, "--out", tmp / "out"], [path], ["shard-00000.safetensors", "no layer1.weights"]


@case
def analyze_shard_expert_out_of_range(tmp, src):
    path = trace_shard(src, tmp, lambda t: t["layer1.indices"].__setitem__((0, 0), 9))
    return (
        ["analyze", path, "--out", tmp / "out"],
        [path],
        ["shard-00000.safetensors", "layer1.indices outside [-1, 4)"],
    )


# demo


@case
def demo_truncated_checkpoint(tmp, src):
    model = truncated(src, tmp)
    return (
        ["demo", "--model", model, "--out", tmp / "out", "--quiet"],
        [model],
        [str(model / "model.safetensors")],
    )


@case
def demo_transformers_checkpoint(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    args = ["demo", "--model", ckpt, "--out", tmp / "out", "--quiet"]
    return args, [ckpt], [str(ckpt / "config.json"), "is a transformers model config (model_type 'mixtral')"]


@case
def demo_config_is_a_list(tmp, src):
    model = copy(src, "moelab", tmp)
    text(model / "config.json", "[]")
    args = ["demo", "--model", model, "--out", tmp / "out", "--quiet"]
    return args, [model], [str(model / "config.json"), "expected a mapping of ModelConfig fields, got list"]


@case
def demo_prune_negative(tmp, src):
    return ["demo", "--prune", "-1", "--out", tmp / "out"], [], ["'--prune'", "greater than or equal to 0"]


# train, compare, info: config files


@case
def train_duplicate_yaml_key(tmp, src):
    run = text(tmp / "run.yaml", RUN_YAML + "  steps: 5\n")
    return ["train", run, "--out", tmp / "out", "--quiet"], [run], [f"{run}:6:", "duplicate key 'steps'"]


@case
def train_grad_clip_nan(tmp, src):
    run = text(tmp / "run.yaml", RUN_YAML + "  grad_clip: .nan\n")
    return (
        ["train", run, "--out", tmp / "out"],
        [run],
        [str(run), "TrainConfig.grad_clip must be a finite number"],
    )


@case
def train_moe_top_k_float(tmp, src):
    model = MODEL_YAML + "  moe: {num_experts: 4, hidden_dim: 8, top_k: 2.0}"
    run = text(tmp / "run.yaml", RUN_YAML.replace("model: tiny", model))
    return (
        ["train", run, "--out", tmp / "out"],
        [run],
        [str(run), "MoEConfig.top_k must be int, got float 2.0"],
    )


@case
def train_yaml_syntax_error(tmp, src):
    run = text(tmp / "run.yaml", RUN_YAML + "  lr: [1e-3\n")
    return ["train", run, "--out", tmp / "out"], [run], [f"{run}:", "not valid YAML"]


@case
def train_transformers_config(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    args = ["train", ckpt / "config.json", "--out", tmp / "out"]
    return args, [ckpt], [str(ckpt / "config.json"), "is a transformers model config"]


@case
def train_missing_config(tmp, src):
    return ["train"], [], ["Missing argument 'config'", "train --help"]


@case
def compare_rope_theta_nan(tmp, src):
    model = text(tmp / "m.yaml", "vocab_size: 64\ndim: 32\nn_layers: 1\nn_heads: 4\nrope_theta: .nan\n")
    recipe = text(tmp / "recipe.yaml", "steps: 2\n")
    args = ["compare", model, "--train", recipe, "--out", tmp / "out"]
    return args, [model, recipe], [str(model), "ModelConfig.rope_theta must be a finite number, got nan"]


@case
def compare_recipe_duplicate_key(tmp, src):
    recipe = text(tmp / "recipe.yaml", "steps: 2\nlr: 1.0e-3\nlr: 2.0e-3\n")
    args = ["compare", "tiny", "--train", recipe, "--out", tmp / "out"]
    return args, [recipe], [f"{recipe}:3:", "duplicate key 'lr'"]


@case
def compare_transformers_recipe(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    args = ["compare", "tiny", "--train", ckpt / "config.json", "--out", tmp / "out"]
    return args, [ckpt], [str(ckpt / "config.json"), "is a transformers model config"]


@case
def compare_missing_train_option(tmp, src):
    return ["compare", "tiny", "--out", tmp / "out"], [], ["Missing option '--train'"]


@case
def info_transformers_config(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    return ["info", ckpt / "config.json"], [ckpt], [str(ckpt / "config.json"), "expected a moelab config"]


@case
def info_json_error_line(tmp, src):
    config = text(tmp / "model.json", '{\n  "vocab_size": 64,\n  "dim": 32\n  "n_layers": 1\n}')
    return ["info", config], [config], [f"{config}:4: not valid JSON"]


@case
def info_seq_len_zero(tmp, src):
    return ["info", "tiny", "--seq-len", "0"], [], ["'--seq-len'", "greater than or equal to 1"]


# export


@case
def export_truncated_checkpoint(tmp, src):
    model = truncated(src, tmp)
    args = ["export", model, "--family", "qwen2_moe", "--out", tmp / "out", "--quiet"]  # mixtral: refused by config
    return args, [model], [str(model / "model.safetensors"), "truncated or corrupt"]


@case
def export_transformers_checkpoint(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    args = ["export", ckpt, "--family", "qwen2_moe", "--out", tmp / "out", "--quiet"]
    return args, [ckpt], [str(ckpt), "is not a moelab checkpoint"]


@case
def export_missing_family(tmp, src):
    model = copy(src, "moelab", tmp)
    return ["export", model, "--out", tmp / "out"], [model], ["Missing option '--family'"]


@case
def import_a_file(tmp, src):
    """A file where a checkpoint directory goes was told it had "no config.json in" it (its path twice)."""
    weights = copy(src, "mixtral", tmp) / "model.safetensors"
    args = ["import", weights, "--out", tmp / "out", "--quiet"]
    return args, [weights], [f"error: {weights} is a file, not a directory; pass a checkpoint directory"]


@case
def import_top_k_zero(tmp, src):
    """The balance loss's coefficient divided by top_k before the config was checked: ZeroDivisionError."""
    ckpt = hf(src, tmp, num_experts_per_tok=0)
    args = ["import", ckpt, "--out", tmp / "out", "--quiet"]
    return args, [ckpt], [str(ckpt / "config.json"), "top_k must lie in [1, num_experts=4], got 0"]


@case
def import_moelab_checkpoint(tmp, src):
    model = copy(src, "moelab", tmp)
    args = ["import", model, "--out", tmp / "out", "--quiet"]
    return args, [model], ["no transformers model_type: it is a moelab checkpoint already"]


# bench layer: 0 used to mean "the default"


@case
def bench_tokens_zero(tmp, src):
    return ["bench", "layer", "--tokens", "0"], [], ["'--tokens'", "greater than or equal to 1"]


@case
def bench_rounds_zero(tmp, src):
    return ["bench", "layer", "--rounds", "0"], [], ["'--rounds'", "greater than or equal to 1"]


@case
def bench_skew_nan(tmp, src):
    args = ["bench", "layer", "--skew", "nan", "--tokens", "8", "--rounds", "1"]
    return args, [], ["skew must be a finite number"]


@case
def bench_layer_load_negative(tmp, src):
    return ["bench", "layer", "--load", "-1"], [], ["'--load'", "greater than or equal to 0"]


@case
def bench_generate_batch_zero(tmp, src):
    return ["bench", "generate", "--batch", "0"], [], ["batch sizes must be integers >= 1"]


@case
def bench_offload_directory_without_config(tmp, src):
    (tmp / "empty").mkdir()
    args = ["bench", "offload", tmp / "empty", "--resident", "0.5", "--prompts", "1", "--new-tokens", "2"]
    return args, [], ["is not a checkpoint (no config.json)", "moelab's or a transformers family's"]


@case
def bench_generate_past_the_context(tmp, src):
    args = ["bench", "generate", "--batch", "1", "--rounds", "1", "--new-tokens", "600"]
    return args, [], ["--prompt-tokens 16 + --new-tokens 600 pass ref-8e-top2's context of 512 tokens"]


@case
def bench_offload_past_the_context(tmp, src):
    args = ["bench", "offload", "--resident", "0.5", "--rounds", "1", "--new-tokens", "600"]
    return args, [], ["--prompt-tokens 16 + --new-tokens 600 pass ref-8e-top2's context of 512 tokens"]


@case
def bench_generate_skip_zero(tmp, src):
    return ["bench", "generate", "--skip", "0"], [], ["dynamic-skipping ratios must lie in (0, 1]"]


@case
def bench_generate_unknown_device(tmp, src):
    return ["bench", "generate", "--device", "cuad"], [], ["unknown device 'cuad'", "did you mean 'cuda'"]


@case
def bench_layer_cuda_without_gpu(tmp, src):
    if torch.cuda.is_available():  # the case is a machine without one; elsewhere the same refusal for a typo
        return ["bench", "layer", "--device", "gpu"], [], ["unknown device 'gpu'"]
    return ["bench", "layer", "--device", "cuda"], [], ["no CUDA device is available"]


@case
def bench_offload_resident_zero(tmp, src):
    return ["bench", "offload", "--resident", "0"], [], ["resident fractions must lie in (0, 1]"]


@case
def bench_offload_model_of_a_smaller_vocabulary(tmp, src):
    """The bench decodes moelab's corpus in moelab's token ids: a transformers checkpoint of 64 tokens
    used to fail with an IndexError traceback after its calibration."""
    ckpt = copy(src, "mixtral", tmp)
    return ["bench", "offload", str(ckpt)], [ckpt], [str(ckpt), "vocabulary of 64 tokens", "moelab's tokenizer's 8192 ids"]


@case
def bench_offload_cuda_without_gpu(tmp, src):
    if torch.cuda.is_available():
        return ["bench", "offload", "--device", "gpu"], [], ["unknown device 'gpu'"]
    return ["bench", "offload", "--device", "cuda"], [], ["no CUDA device is available"]


@case
def generate_offloaded_on_cuda_without_gpu(tmp, src):
    if torch.cuda.is_available():
        return ["generate", "The king said", "--resident", "0.25", "--device", "gpu"], [], ["unknown device 'gpu'"]
    return ["generate", "The king said", "--resident", "0.25", "--device", "cuda"], [], ["no CUDA device is available"]


@case
def generate_unknown_dtype(tmp, src):
    return ["generate", "The king said", "--dtype", "fp16"], [], ["unknown dtype 'fp16'", "did you mean 'bf16'"]


@case
def generate_budget_below_minimum(tmp, src):
    return ["generate", "The king said", "--memory-budget", "1MB"], [], ["too small", "the minimum is"]


@case
def generate_compiled_transformers_checkpoint(tmp, src):
    ckpt = copy(src, "olmoe", tmp)  # stays on transformers (a Mixtral one runs as a moelab model)
    return ["generate", "The king said", "--model", ckpt, "--compile"], [ckpt], ["compile=True needs a moelab model", "drop compile"]


@case
def generate_a_tokenizer_past_the_vocabulary(tmp, src):
    ckpt = copy(src, "mixtral", tmp)  # 64 tokens, no tokenizer of its own: moelab's is used
    expected = ["encodes to token id", "vocabulary of 64 tokens", "save the model's own tokenizer"]
    return ["generate", "The king said", "--model", ckpt], [ckpt], expected


@case
def generate_offloaded_with_fewer_layers_in_config(tmp, src):
    ckpt = Path(shutil.copytree(reference_model_dir(), tmp / "ref"))  # moelab's vocabulary
    edit_json(ckpt / "config.json", n_layers=1)
    args = ["generate", "The king said", "--model", ckpt, "--resident", "0.5", "--max-new-tokens", "2"]
    return args, [ckpt], ["holds layers [1, 2, 3] ...", "config.json does not describe these weights"]


@case
def generate_offloaded_with_another_expert_width(tmp, src):
    ckpt = Path(shutil.copytree(reference_model_dir(), tmp / "ref"))  # moelab's vocabulary
    config = json.loads((ckpt / "config.json").read_text())
    edit_json(ckpt / "config.json", moe={**config["moe"], "hidden_dim": config["moe"]["hidden_dim"] + 8})
    args = ["generate", "The king said", "--model", ckpt, "--resident", "0.5", "--max-new-tokens", "2"]
    return args, [ckpt], ["config.json sets moe.hidden_dim", "config.json does not describe"]


@case
def generate_offloaded_transformers_checkpoint_with_other_heads(tmp, src):
    ckpt = copy(src, "mixtral8k", tmp)
    edit_json(ckpt / "config.json", num_key_value_heads=4)
    args = ["generate", "The king said", "--model", ckpt, "--resident", "0.5", "--max-new-tokens", "2"]
    return args, [ckpt], ["k_proj.weight is [16, 32] but config.json makes it [32, 32]"]


@case
def generate_non_finite_weights(tmp, src):
    ckpt = Path(shutil.copytree(reference_model_dir(), tmp / "ref"))  # moelab's vocabulary
    tensors = load_file(ckpt / "model.safetensors")
    tensors["norm.weight"][0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    return ["generate", "The king said", "--model", ckpt], [ckpt], ["NaN or Inf in norm.weight", "corrupt"]


@case
def generate_broken_tokenizer(tmp, src):
    ckpt = copy(src, "moelab", tmp)
    (ckpt / "tokenizer.json").write_text("{bad")
    expected = ["cannot read the tokenizer in", "never runs"]
    return ["generate", "The king said", "--model", ckpt], [ckpt], expected


@case
def generate_offload_options_in_memory(tmp, src):
    args = ["generate", "The king said", "--policy", "lru", "--host-memory"]
    return args, [], ["--policy, --host-memory: for offloaded experts", "add --resident"]


@case
def generate_with_the_prior_of_another_model(tmp, src):
    args = ["generate", "The king said", "--resident", "0.5", "--policy", "affinity", "--prior", src / "trace"]
    return args, [], ["the routing prior covers MoE layers [1] of 4 experts but", "measure the prior on this model"]


@case
def bench_generate_unknown_model(tmp, src):
    return ["bench", "generate", "ref-9e-top2", "--rounds", "1"], [], ["no model at ref-9e-top2", "'ref-8e-top2'"]


@case
def generate_seed_without_sampling(tmp, src):
    return ["generate", "The king said", "--seed", "3"], [], ["--seed seeds sampling", "add --temperature"]


@case
def generate_compiled_with_read_ahead(tmp, src):
    args = ["generate", "The king said", "--resident", "0.5", "--policy", "lookahead", "--compile"]
    return args, [], ["cannot read ahead (policy 'lookahead')", "'reuse' or 'lru' (--policy)"]


@case
def generate_empty_prompt(tmp, src):
    return ["generate", ""], [], ["the prompt is empty"]


# compress, calibrate, eval (issue 10 §6)


@case
def compress_ratio_outside(tmp, src):
    model = copy(src, "moelab", tmp)
    return ["compress", model, "--ratio", "1.5", "--out", tmp / "out", "--quiet"], [model], ["must lie in (0, 1), got 1.5"]


@case
def compress_leaves_fewer_than_top_k(tmp, src):
    model = copy(src, "moelab", tmp)
    args = ["compress", model, "--ratio", "0.9", "--out", tmp / "out", "--quiet"]
    return args, [model], ["layer 1: removing", "fewer than the 2 the router picks per token"]


@case
def compress_unknown_method(tmp, src):
    model = copy(src, "moelab", tmp)
    args = ["compress", model, "--method", "reep", "--out", tmp / "out", "--quiet"]
    return args, [model], ["unknown compression method 'reep'", "did you mean 'reap'"]


@case
def compress_out_is_the_source(tmp, src):
    model = copy(src, "moelab", tmp)
    return ["compress", model, "--out", model, "--overwrite", "--quiet"], [model], [str(model), "is the input"]


@case
def compress_out_inside_the_source(tmp, src):
    model = copy(src, "moelab", tmp)
    return ["compress", model, "--out", model / "pruned", "--quiet"], [model], ["lies inside the input"]


@case
def compress_without_tokenizer(tmp, src):
    ckpt = copy(src, "mixtral", tmp)
    return ["compress", ckpt, "--out", tmp / "out", "--quiet"], [ckpt], [str(ckpt), "has no tokenizer files"]


@case
def compress_quantized_source(tmp, src):
    ckpt = hf(src, tmp, quantization_config={"quant_method": "fp8"})  # read as float8 weights, but of what blocks?
    return ["compress", ckpt, "--out", tmp / "out", "--quiet"], [ckpt], ["reads block-wise FP8", "weight_block_size"]


@case
def compress_stats_of_another_model(tmp, src):
    model = copy(src, "moelab", tmp)
    stats = tmp / "stats"
    text(stats / "calibration.json", json.dumps({
        "format": "moelab-calibration/1", "complete": True, "moe_layers": [1], "settings": {"observers": ["routing"]},
        "model": {"path": "/elsewhere/model", "fingerprint": "2:" + "0" * 64}, "mixture": {"spec": "corpus", "sources": []},
    }))  # fmt: skip
    args = ["compress", model, "--stats", stats, "--out", tmp / "out", "--quiet"]
    return args, [model, stats], ["were made on /elsewhere/model", "fingerprints differ"]


def _compress_with_options(tmp: Path, src: Path, method: str, *options: str) -> tuple[list, list[Path]]:
    """moelab compress of a copy of the moelab checkpoint with `method` and each of `options` as an
    --option: (its arguments, its inputs)."""
    model = copy(src, "moelab", tmp)
    given = [arg for option in options for arg in ("--option", option)]
    return ["compress", model, "--method", method, *given, "--out", tmp / "out", "--quiet"], [model]


@case
def compress_option_without_value(tmp, src):
    return *_compress_with_options(tmp, src, "heapr", "layout"), ["--option takes KEY=VALUE", "got 'layout'"]


@case
def compress_option_the_method_lacks(tmp, src):
    return *_compress_with_options(tmp, src, "reap", "rank=4"), ["method 'reap' does not take these options"]


@case
def compress_option_of_the_wrong_type(tmp, src):
    return *_compress_with_options(tmp, src, "m_smoe", "align=False"), ["m_smoe option align='False' must be bool", "--option align=true"]


@case
def compress_heapr_unknown_layout(tmp, src):
    return *_compress_with_options(tmp, src, "heapr", "layout=ragged"), ["heapr layout must be one of", "got 'ragged'"]


@case
def compress_fitted_router_rows_need_softmax(tmp, src):
    model = copy(src, "moelab", tmp)
    config = json.loads((model / "config.json").read_text())
    config["moe"]["score_func"] = "sigmoid"
    text(model / "config.json", json.dumps(config))
    args = ["compress", model, "--method", "hc_smoe", "--option", "router_rule=fit", "--out", tmp / "out", "--quiet"]
    return args, [model], ["layer 1: hc_smoe's router_rule='fit'", "scores with sigmoid", "use router_rule=weighted"]


@case
def compress_bench_unknown_method(tmp, src):
    model = copy(src, "moelab", tmp)
    args = ["compress-bench", model, "--method", "reep", "--out", tmp / "out", "--quiet"]
    return args, [model], ["unknown compression method 'reep'"]


@case
def compress_bench_llmcompressor_on_a_moelab_model(tmp, src):
    model = copy(src, "moelab", tmp)
    args = ["compress-bench", model, "--llmcompressor-python", sys.executable, "--out", tmp / "out", "--quiet"]
    return args, [model], ["llm-compressor runs transformers checkpoints", "export it first"]


@case
def calibrate_empty_data(tmp, src):
    model = copy(src, "moelab", tmp)
    data = text(tmp / "empty.txt", "")
    args = ["calibrate", model, "--calib", data, "--out", tmp / "out", "--quiet"]
    return args, [model, data], [str(data), "has no text in domain 'empty'"]


@case
def calibrate_bad_weight(tmp, src):
    model = copy(src, "moelab", tmp)
    args = ["calibrate", model, "--calib", "corpus:code=lots", "--out", tmp / "out", "--quiet"]
    return args, [model], ["'corpus:code=lots'", "weight 'lots' is not a number"]


@case
def eval_base_with_another_vocabulary(tmp, src):
    model, ckpt = copy(src, "moelab", tmp), copy(src, "mixtral", tmp)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(ckpt)
    args = ["eval", model, "--base", ckpt, "--quiet"]
    return args, [model, ckpt], [f"{model} has 128 tokens and the base {ckpt} has 64"]


# output paths: an existing file, a path under a file, a directory moelab cannot create (issue 9)


def _writing_command(command: str, tmp: Path, src: Path, out: Path) -> tuple[list, list[Path]]:
    """The arguments of a writing command that would succeed but for its `out`, and its inputs."""
    model = copy(src, "moelab", tmp)
    if command == "train":
        run = text(tmp / "run.yaml", RUN_YAML)
        return ["train", run, "--out", out, "--quiet"], [run]
    if command == "compare":
        cfg = text(tmp / "m.yaml", "vocab_size: 64\ndim: 32\nn_layers: 1\nn_heads: 4\n")
        recipe = text(tmp / "recipe.yaml", "steps: 2\nbatch_size: 2\nseq_len: 16\n")
        return ["compare", cfg, "--train", recipe, "--out", out, "--quiet"], [cfg, recipe]
    if command == "export":
        return ["export", model, "--family", "qwen2_moe", "--no-tokenizer", "--out", out, "--quiet"], [model]
    if command == "bench":
        return ["bench", "layer", "--json", out, "--tokens", "8", "--rounds", "1"], []
    args = (
        ["demo", "--model", model, "--out", out, "--quiet"]
        if command == "demo"
        else [command, model, "--out", out, "--quiet"]
    )
    return args, [model]


for _command in ("train", "compare", "trace", "analyze", "export", "demo"):

    def _existing_file(tmp, src, command=_command):
        out = text(tmp / "taken.txt", "the user's notes")
        args, inputs = _writing_command(command, tmp, src, out)
        return args, [*inputs, out], [str(out), "is a file; the output must be a directory"]

    def _under_a_file(tmp, src, command=_command):
        parent = text(tmp / "notes.txt", "the user's notes")
        args, inputs = _writing_command(command, tmp, src, parent / "out")
        return args, [*inputs, parent], [str(parent), "is a file, not a directory"]

    def _not_writable(tmp, src, command=_command):
        args, inputs = _writing_command(command, tmp, src, Path("/proc/moelab-test/out"))
        return args, inputs, ["cannot write /proc/moelab-test/out", "choose another output path"]

    for _name, _fn in (
        ("existing_file", _existing_file),
        ("under_a_file", _under_a_file),
        ("not_writable", _not_writable),
    ):
        CLI_CASES[f"{_command}_out_{_name}"] = _fn


@case
def bench_json_is_a_directory(tmp, src):
    args, _ = _writing_command("bench", tmp, src, tmp)
    return args, [], [str(tmp), "is a directory; give a file name"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_bad_input_gives_one_line(name, sources, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    args, inputs, fragments = CLI_CASES[name](tmp_path, sources)
    before = digest(inputs)
    code, out, err = run_cli(monkeypatch, capsys, args)
    lines = err.splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0]
    assert digest(inputs) == before
    assert args[0] != "generate" or out == "", "the prompt is printed only once decoding starts"


def test_cli_help_and_success_still_work(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["moelab", "--help"])
    cli.main()
    assert "trace" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["moelab", "info", "tiny", "--json"])
    cli.main()
    captured = capsys.readouterr()
    assert json.loads(captured.out)["total_params"] > 0 and captured.err == ""


def test_cli_keeps_tracebacks_for_bugs(monkeypatch):
    """Only user mistakes become one line; anything else is a bug and must stay loud."""
    monkeypatch.setattr("moelab.models.model_info", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("sys.argv", ["moelab", "info", "tiny"])
    with pytest.raises(ZeroDivisionError):
        cli.main()


# ----------------------------------------------------------------------------- Python API


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda s, t: hf(s, t, quantization_config="int4"), r"config.json: quantization_config is .int4.; transformers and moelab read an object"),
        (lambda s, t: hf(s, t, model_type=["mixtral"]), r"config.json: model_type must be a string"),
        (
            lambda s, t: sharded(s, t, lambda c: "sub/../../x.safetensors"),
            r"index.json names the file 'sub/\.\./",
        ),
        (
            lambda s, t: sharded(s, t, lambda c: str(sorted(c.glob("model-*"))[0])),
            r"index.json names the file '/",
        ),
        (lambda s, t: sharded(s, t, lambda c: 3), r"index.json maps .* to 3, expected a shard file name"),
        (symlinked_shard, r"index.json names the file 'model-00001"),
        (
            lambda s, t: text(copy(s, "sharded", t) / "model.safetensors.index.json", "[]").parent,
            r"index.json holds",
        ),
    ],
    ids=["quantization", "model_type", "dotdot", "absolute", "not_a_name", "symlink", "index_list"],
)
def test_open_checkpoint(sources, tmp_path, make, message):
    ckpt = make(sources, tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(ckpt)
    assert str(ckpt) in str(info.value)


def test_view_check_reads_headers_only(sources, tmp_path, monkeypatch):
    real_safe_open = files_module.safe_open

    class HeadersOnly:
        def __init__(self, *args, **kwargs):
            self._handle = real_safe_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def __getattr__(self, name):
            assert name != "get_tensor", "check() read a tensor's data"
            return getattr(self._handle, name)

    monkeypatch.setattr(files_module, "safe_open", HeadersOnly)
    open_checkpoint(sources / "sharded").check()
    ckpt = hf(sources, tmp_path, num_local_experts=3)
    with pytest.raises(CheckpointError, match=r"config says 3 experts .* in .*mixtral"):
        open_checkpoint(ckpt).check()


@pytest.mark.parametrize(
    "make,file,message",
    [
        (truncated, "model.safetensors", "is not a readable safetensors file"),
        (
            lambda s, t: text(copy(s, "moelab", t) / "config.json", "{").parent,
            "config.json:1",
            "not valid JSON",
        ),
        (lambda s, t: copy(s, "mixtral", t), "config.json", "is a transformers model config"),
        (lambda s, t: moelab_tensors(s, t, lambda x: x.long()), "model.safetensors", "wrong dtype"),
        (lambda s, t: moelab_tensors(s, t, lambda x: x.T), "model.safetensors", "wrong shape"),
        (weights_directory, "model.safetensors", "is a directory, expected a safetensors file"),
    ],
    ids=["truncated", "config_json", "transformers", "int_tensor", "transposed", "weights_dir"],
)
def test_load_pretrained(sources, tmp_path, make, file, message):
    model = make(sources, tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        load_pretrained(model)
    assert str(model / file) in str(info.value)


@pytest.mark.parametrize(
    "manifest,message",
    [
        ({"top_k": ...}, r"missing 1 required keyword-only argument: 'top_k'"),
        ({"topk": [2]}, r"unknown TraceInfo field 'topk' \(did you mean 'top_k'\?\)"),
        ({"layers": [1.0]}, r"TraceInfo.layers must be list\[int\], got list \[1.0\]"),
        ({"layers": [5]}, r"distinct layer numbers in increasing order in \[0, num_layers=2\)"),
        ({"layers": [2]}, r"distinct layer numbers in increasing order in \[0, num_layers=2\)"),
        ({"layers": [0, 0], "num_experts": [4, 4], "top_k": [1, 1]}, r"must be distinct layer numbers"),
        ({"layers": [1, 0], "num_experts": [4, 4], "top_k": [1, 1], "identity_experts": [0, 0]}, r"in increasing order .*, got \[1, 0\]"),
        ({"layers": [], "num_experts": [], "top_k": []}, r"needs at least one MoE layer"),
        ({"top_k": [5]}, r"TraceInfo.top_k \[5\] must lie in \[1, num_experts \[4\]\]"),
        ({"top_k": [0]}, r"TraceInfo.top_k \[0\] must lie in \[1, num_experts \[4\]\]"),
        ({"shards": [{"file": "shard-00000.safetensors", "tokens": 64, "sequences": -1}]}, r"must be >= 0"),
        ({"shards": {"file": "x"}}, r"TraceInfo.shards must be a list"),
        ({"shards": ["shard-00000.safetensors"]}, r"TraceInfo.shards must be a list of \{file"),
        ({"shards": [{"file": "x.safetensors", "tokens": 1}]}, r"missing 1 required positional argument"),
        (
            {"shards": [{"file": "x.safetensors", "tokens": 1, "sequences": 1, "tokns": 1}]},
            r"unknown ShardInfo field 'tokns' \(did you mean 'tokens'\?\)",
        ),
        ({"shards": [{"file": "/etc/passwd", "tokens": 1, "sequences": 1}]}, r"names the file '/etc/passwd'"),
        ({"version": 2}, r"version 2, expected 'moelab-trace' version 1"),
        ({"format": "other-trace"}, r"format 'other-trace' version 1, expected 'moelab-trace' version 1"),
        ({"format": ..., "version": ...}, r"format None version None, expected 'moelab-trace' version 1"),
        ({"num_tokens": 63}, r"num_tokens 63 and num_sequences 4, but its shards hold 64 tokens in 4 sequences"),
        ({"num_sequences": 5}, r"num_tokens 64 and num_sequences 5, but its shards hold 64 tokens in 4 sequences"),
    ],
    ids=[
        "missing",
        "extra",
        "float_layer",
        "layer_range",
        "layer_is_num_layers",
        "layer_twice",
        "layers_out_of_order",
        "no_layers",
        "top_k_above_experts",
        "top_k_zero",
        "negative_sequences",
        "shards_dict",
        "shard_not_object",
        "shard_field",
        "shard_unknown_field",
        "shard_abs",
        "version",
        "format",
        "no_format_or_version",
        "num_tokens",
        "num_sequences",
    ],
)
def test_open_trace(sources, tmp_path, manifest, message):
    path = trace(sources, tmp_path, **manifest)
    with pytest.raises(ValueError, match=message) as info:
        open_trace(path)
    assert str(path / "manifest.json") in str(info.value)


@pytest.mark.parametrize(
    "content,message",
    [
        (RUN_YAML + "  steps: 3\n", r"run.yaml:6: not valid YAML: duplicate key 'steps'"),
        (
            RUN_YAML.replace("train:", "model: small\ntrain:"),
            r"run.yaml:2: not valid YAML: duplicate key 'model'",
        ),
        (
            RUN_YAML + "  grad_clip: .nan\n",
            r"run.yaml: TrainConfig.grad_clip must be a finite number, got nan",
        ),
        (RUN_YAML + "  lr: .inf\n", r"run.yaml: TrainConfig.lr must be a finite number, got inf"),
        (RUN_YAML + "  eval_every: 2.0\n", r"run.yaml: TrainConfig.eval_every must be int, got float 2.0"),
        (RUN_YAML + "  domains: [code, 7]\n", r"TrainConfig.domains must be list\[str\] or None, got list"),
        ('{"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}', r"is a transformers model config"),
        ('{"architectures": ["OlmoeForCausalLM"]}', r"is a transformers model config"),
    ],
    ids=["dup_key", "dup_section", "nan", "inf", "float_for_int", "list_item", "transformers", "architectures_only"],
)
def test_run_config_load(tmp_path, content, message):
    path = text(tmp_path / "run.yaml", content)
    with pytest.raises(ValueError, match=message) as info:
        RunConfig.load(path)
    assert str(path) in str(info.value)


def test_a_transformers_checkpoint_where_a_moelab_model_goes_is_told_which_commands_read_it(tmp_path):
    """load_pretrained on a transformers checkpoint said only trace and analyze work with one; calibrate,
    compress, eval and generate read it too, and moelab import converts it."""
    ckpt = tmp_path / "mixtral"
    text(ckpt / "config.json", '{"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}')
    save_file({"x": torch.zeros(1)}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="is a transformers model config") as info:
        load_pretrained(ckpt)
    for reader in ("trace", "analyze", "calibrate", "compress", "eval", "generate", "moelab import"):
        assert reader in str(info.value), reader


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("top_k", 2.0, r"MoEConfig.top_k must be int, got float 2.0"),
        ("top_k", True, r"MoEConfig.top_k must be int, got bool True"),
        ("dim", float("nan"), r"MoEConfig.dim must be int, got float nan"),
        ("balance_coef", float("nan"), r"MoEConfig.balance_coef must be a finite number, got nan"),
        ("route_scale", float("inf"), r"MoEConfig.route_scale must be a finite number, got inf"),
        ("capacity_factor", "1.25", r"MoEConfig.capacity_factor must be float or None, got str '1.25'"),
        ("balance_coef", True, r"MoEConfig.balance_coef must be float or None, got bool True"),
        ("renormalize", "yes", r"MoEConfig.renormalize must be bool or None"),
        ("shared_hidden_dim", 0, r"MoEConfig.shared_hidden_dim must be >= 1 or None"),
    ],
)
def test_moe_config_types(field, value, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{"dim": 16, "num_experts": 4, "hidden_dim": 8, field: value})


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: CalibrationOptions(seq_len=32.0), r"CalibrationOptions.seq_len must be int, got float 32.0"),
        (lambda: CalibrationOptions(batch_size=True), r"CalibrationOptions.batch_size must be int, got bool"),
        (lambda: CalibrationOptions(observers="routing"), r"CalibrationOptions.observers must be tuple\[str, \.\.\.\]"),
        (lambda: CalibrationOptions(snapshot_seconds=float("nan")), r"snapshot_seconds must be a finite number"),
        (lambda: EvalOptions(eval_tokens=100.5), r"EvalOptions.eval_tokens must be int, got float 100.5"),
        (lambda: EvalOptions(domains="german"), r"EvalOptions.domains is a list of domain names, got the str 'german'"),
        (lambda: RouterFit(steps=2.5), r"RouterFit.steps must be int, got float 2.5"),
        (lambda: RouterFit(lr="1e-3"), r"RouterFit.lr must be float, got str '1e-3'"),
        (lambda: TraceOptions(seq_len=16.0), r"TraceOptions.seq_len must be int, got float 16.0"),
        (lambda: TraceOptions(logits=1), r"TraceOptions.logits must be bool, got int 1"),
    ],
)
def test_option_types(make, message):
    """The options of calibrate, evaluate, trace and compress's router fit are checked as the
    configs are (a float seq_len failed deep in the calibration or trace, a str domain was read
    letter by letter)."""
    with pytest.raises(ValueError, match=message):
        make()


def test_one_domain_as_a_str_is_refused_not_read_letter_by_letter():
    """load_streams and domain_losses took domains="german" as the domains g, e, r, ... ("unknown
    domain 'g'")."""
    from moelab.eval import domain_losses

    for read in (lambda: load_streams(domains="german"), lambda: domain_losses(torch.nn.Linear(1, 1), "german")):
        with pytest.raises(ValueError, match=r"domains is a list of domain names, got the str 'german'; write \['german'\]"):
            read()


def test_options_take_lists_and_paths_as_given():
    assert CalibrationOptions(observers=["routing"]).observers == ("routing",)
    assert EvalOptions(data=Path("texts"), dynamic_skip=Path("stats")).data == "texts"
    assert EvalOptions(dynamic_skip=Path("stats")).dynamic_skip == "stats"


@dataclasses.dataclass
class Typed:
    pair: tuple[int, str] = (1, "a")
    sizes: tuple[int, ...] = ()
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(pair=(1,)), r"Typed.pair must be tuple\[int, str\], got tuple \(1,\)"),
        (dict(pair=(1, 2)), r"Typed.pair must be tuple\[int, str\]"),
        (dict(sizes=(1, "2")), r"Typed.sizes must be tuple\[int, \.\.\.\], got"),
        (dict(counts={1: 2}), r"Typed.counts must be dict\[str, int\]"),
    ],
)
def test_field_types_check_tuple_lengths_and_dict_keys(change, message):
    check_field_types(Typed(sizes=(1, 2, 3), counts={"a": 1}))
    with pytest.raises(ValueError, match=message):
        check_field_types(Typed(**change))


def test_non_finite_names_finds_inf_as_well_as_nan():
    named = [("ok", torch.ones(2)), ("nan", torch.tensor([float("nan")])), ("inf", torch.tensor([-float("inf")]))]
    assert non_finite_names(named) == ["nan", "inf"]


def test_finite_values_whose_sum_overflows_are_finite():
    """The check sums first (finite only if every element is); an overflowing sum is checked element
    by element."""
    huge = torch.full((4,), 3e38)
    assert not torch.isfinite(huge.sum()) and non_finite_names([("huge", huge), ("half", huge.bfloat16())]) == []
    assert non_finite_names([("inf", torch.tensor([3e38, -float("inf"), float("inf")]))]) == ["inf"]


def test_non_finite_names_checks_a_large_tensor_a_slice_at_a_time(monkeypatch):
    """A layer's stacked experts are checked in slices along their first dimensions, so the
    boolean mask stays small (it was as large as the tensor: a gigabyte per billion elements);
    a NaN anywhere, the tensor non-contiguous too, is still found."""
    from moelab.validation import _all_finite

    real, seen = torch.isfinite, []
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real(t))
    clean = torch.zeros(5, 3, 4)
    assert _all_finite(clean, chunk=10) and _all_finite(clean.transpose(0, 2), chunk=10)
    for index in [(0, 0, 0), (4, 2, 3), (2, 1, 0), (3, 2, 1)]:
        bad = clean.clone()
        bad[index] = float("nan")
        assert not _all_finite(bad, chunk=10) and not _all_finite(bad.transpose(0, 2), chunk=10), index
    assert seen and max(seen) <= 10


def test_reading_a_directory_as_a_text_file_names_it(tmp_path):
    with pytest.raises(ValueError, match="is a directory, expected a file"):
        read_text(tmp_path)


@pytest.mark.parametrize("name", ["run.yml", "run.YAML", "run.Json"])
def test_config_files_by_any_case_of_their_suffix(tmp_path, name):
    assert read_config_file(text(tmp_path / name, '{"steps": 2}')) == {"steps": 2}


def test_yaml_merge_keys_are_not_duplicate_keys(tmp_path):
    path = text(tmp_path / "run.yaml", "base: &base {steps: 2}\ntrain:\n  <<: *base\n  seq_len: 16\n")
    assert read_config_file(path)["train"] == {"steps": 2, "seq_len": 16}


def test_a_file_name_with_dotdot_is_refused_even_when_it_stays_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    text(tmp_path / "w.safetensors", "")
    with pytest.raises(ValueError, match=r"names the file 'sub/../w.safetensors', which is not a file inside"):
        file_inside(tmp_path, "sub/../w.safetensors", tmp_path / "index.json")



def test_a_file_inside_a_checkpoint_named_by_a_relative_path_or_a_link_is_inside(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    text(tmp_path / "ckpt" / "w.safetensors", "")
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    for directory in (Path("ckpt"), tmp_path / "link"):
        assert file_inside(directory, "w.safetensors", "index.json") == directory / "w.safetensors"


EXPERT_MAP = {
    "format": "moelab-expert-map/1",
    "source": "/models/original",
    "family": "mixtral",
    "layers": {
        "0": {
            "sources": [[0], [2, 3], [1]],
            "kept": [0, 1],
            "merge_groups": [[2, 3]],
            "tensors_replaced": True,
        },
        "1": {"sources": [[3], [1]], "kept": [3, 1], "merge_groups": [], "tensors_replaced": False},
    },
}


def _layer(**fields) -> dict:
    return {**EXPERT_MAP, "layers": {"0": {**EXPERT_MAP["layers"]["0"], **fields}}}


@pytest.mark.parametrize(
    "doc,message",
    [
        ([EXPERT_MAP], r"holds a JSON list, expected a moelab expert map"),
        ({**EXPERT_MAP, "format": "moelab-expert-map/2"}, r"format is 'moelab-expert-map/2'"),
        ({k: v for k, v in EXPERT_MAP.items() if k != "source"}, r"the map has no 'source'"),
        ({**EXPERT_MAP, "extra": 1}, r"the map has unknown 'extra'"),
        ({**EXPERT_MAP, "family": 3}, r"family must be a string, got 3"),
        ({**EXPERT_MAP, "source": None}, r"source must be a string, got None"),
        ({**EXPERT_MAP, "layers": []}, r"layers must be an object"),
        (
            {**EXPERT_MAP, "layers": {"one": EXPERT_MAP["layers"]["0"]}},
            r"layer key 'one' is not a layer number",
        ),
        (
            {**EXPERT_MAP, "layers": {"-1": EXPERT_MAP["layers"]["0"]}},
            r"layer key '-1' is not a layer number",
        ),
        (
            {**EXPERT_MAP, "layers": {"01": EXPERT_MAP["layers"]["0"]}},
            r"layer key '01' is not a layer number",
        ),
        (
            {**EXPERT_MAP, "layers": {"1x": EXPERT_MAP["layers"]["0"]}},
            r"layer key '1x' is not a layer number",
        ),
        ({**EXPERT_MAP, "layers": {"0": [[0]]}}, r"layer 0 must be an object"),
        (_layer(sources=[[0], [-2]]), r"layer 0: sources must be .* expert ids >= 0"),
        (_layer(sources=[[0], [1.0]]), r"layer 0: sources must be .* expert ids >= 0"),
        (_layer(sources=[[0], [True]]), r"layer 0: sources must be .* expert ids >= 0"),
        (_layer(sources=[[0], []]), r"layer 0: sources must be a non-empty list of non-empty lists"),
        (
            _layer(sources=[], kept=[], merge_groups=[]),
            r"layer 0: sources must be a non-empty list of non-empty lists",
        ),
        (_layer(sources=[[0], [2, 0]]), r"layer 0: sources name an expert twice"),
        (_layer(kept=[0, 2]), r"layer 0: kept is \[0, 2\], but sources .* make it \[0, 1\]"),
        (_layer(kept=[0, 1.0]), r"layer 0: kept is \[0, 1.0\]"),
        (_layer(merge_groups=[]), r"layer 0: merge_groups is \[\]"),
        (_layer(tensors_replaced="yes"), r"layer 0: tensors_replaced must be true or false"),
        (_layer(dropped=[4]), r"layer 0 has unknown 'dropped'"),
    ],
)
def test_read_expert_map_rejects(tmp_path, doc, message):
    path = text(tmp_path / "moelab_expert_map.json", json.dumps(doc))
    with pytest.raises(CheckpointError, match=message) as info:
        read_expert_map(path)
    assert str(path) in str(info.value)


def test_read_expert_map_accepts_the_writers_output(sources, tmp_path):
    from moelab.hf import drop_experts

    out = drop_experts(sources / "mixtral", tmp_path / "pruned", {0: [1], 1: [0]}, quiet=True)
    doc = read_expert_map(out / "moelab_expert_map.json")
    assert doc["layers"]["1"]["kept"] == [1, 2, 3]
    path = text(tmp_path / "map.json", json.dumps(EXPERT_MAP))
    assert read_expert_map(path) == EXPERT_MAP


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "d.jsonl",
            '{"text": "a"}\n{"text": "b\u2028c"}\n{"text": 3}\n',
            r"d.jsonl:3: a JSON line needs a 'text' field",
        ),
        ("d.jsonl", '{"text": "a"}\n\n\n[1,\n', r"d.jsonl:4: not valid JSON"),
        (
            "d.jsonl",
            '{"text": "a", "domain": null}\n',
            r"d.jsonl:1: 'domain' must be a non-empty string, got None",
        ),
        ("d.jsonl", '{"text": "a", "domain": ""}\n', r"d.jsonl:1: 'domain' must be a non-empty string"),
        (
            "d.jsonl",
            '{"text": "ok \\ud83d\\ude00"}\n{"text": "cut \\ud83d emoji"}\n',
            r"d.jsonl:2: 'text' holds a lone surrogate \\ud83d at character 4 .*; complete the pair or remove",
        ),
        ("d.txt", b"\xff\xfe", r"d.txt is not UTF-8 text"),
        ("d.txt", "", r"d.txt has no text in domain 'd' \(empty or blank documents only\)"),
        ("d.txt", " \n\t\n", r"d.txt has no text in domain 'd'"),
        ("d.jsonl", '{"text": "a", "domain": "x"}\n{"text": " ", "domain": "y"}\n', r"no text in domain 'y'"),
        ("d.jsonl", "\n\n", r"d.jsonl has no text \(no JSON line with a text\)"),
        ("d.csv", "text\nhello\n", r"'.*d.csv' is not 'corpus', a .txt/.jsonl file or a directory of them$"),
    ],
    ids=["text_number", "json_line", "domain_null", "domain_empty", "lone_surrogate", "utf8", "empty", "blank",
         "blank_domain", "no_lines", "csv"],
)
def test_data_loading(tmp_path, name, content, message):
    path = text(tmp_path / name, content)
    with pytest.raises(ValueError, match=message):
        load_streams(path)


def test_a_byte_order_mark_is_no_text(tmp_path):
    """A UTF-8 byte-order mark (Windows editors write one) before a .jsonl file's first record was
    "not valid JSON: Unexpected UTF-8 BOM", and before a .txt file's text it was scored as text."""
    bom = "\ufeff".encode()
    text(tmp_path / "bom" / "d.jsonl", bom + b'{"text": "hello world"}\r\n{"text": "again"}\r\n')
    text(tmp_path / "bom" / "t.txt", bom + b"hello world")
    text(tmp_path / "plain" / "t.txt", b"hello world")
    with_bom, plain = load_streams(tmp_path / "bom"), load_streams(tmp_path / "plain")
    assert len(with_bom["d"]) > 3
    assert np.array_equal(with_bom["t"], plain["t"])


def test_upper_case_suffixes_are_text_files(tmp_path):
    """NOTES.TXT and LOG.JSONL (files from Windows) were left out of a directory without a word, and
    refused when named."""
    text(tmp_path / "data" / "NOTES.TXT", "hello world")
    text(tmp_path / "data" / "LOG.JSONL", '{"text": "hello again"}\n')
    assert sorted(load_streams(tmp_path / "data")) == ["LOG", "NOTES"]
    assert list(load_streams(tmp_path / "data" / "NOTES.TXT")) == ["NOTES"]


def test_a_blank_domain_left_out_is_not_read(tmp_path):
    text(tmp_path / "data" / "code.txt", "def f(): return 1\n" * 20)
    text(tmp_path / "data" / "notes.txt", "")
    assert list(load_streams(tmp_path / "data", domains=["code"])) == ["code"]
    with pytest.raises(ValueError, match="no text in domain 'notes'"):
        load_streams(tmp_path / "data")


def test_zero_counts_are_not_defaults():
    with pytest.raises(ValueError, match=r"tokens must be an integer >= 1, got 0"):
        BenchOptions.create(tokens=0)
    with pytest.raises(ValueError, match=r"rounds must be an integer >= 1, got 0"):
        BenchOptions.create(quick=True, rounds=0)
    with pytest.raises(ValueError, match=r"seq_len must be >= 1, got 0"):
        model_info(tiny(), seq_len=0)


def test_symlinked_shard_inside_the_directory_is_fine(sources, tmp_path):
    """Only links *out of* the checkpoint are refused."""
    ckpt = copy(sources, "sharded", tmp_path)
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    shard.rename(ckpt / "real.safetensors")
    os.symlink("real.safetensors", shard)
    open_checkpoint(ckpt).check()


# ----------------------------------------------------------------------------- CLI fuzzing (branch cli-fuzz)


def _stats_info(**changes) -> str:
    """A complete calibration.json of another model, with top-level keys changed (`...` deletes)."""
    info = {
        "format": "moelab-calibration/1", "complete": True, "moe_layers": [1],
        "settings": {"observers": ["routing"], "tokens": 64, "seq_len": 16},
        "model": {"path": "/elsewhere/model", "fingerprint": "2:" + "0" * 64},
        "mixture": {"spec": "corpus", "sources": [], "digest": "0"},
    }  # fmt: skip
    for key, value in changes.items():
        info.pop(key) if value is ... else info.__setitem__(key, value)
    return json.dumps(info)


@case
def compress_stats_info_without_model(tmp, src):
    model = copy(src, "moelab", tmp)
    stats = tmp / "stats"
    text(stats / "calibration.json", _stats_info(model=...))
    args = ["compress", model, "--stats", stats, "--out", tmp / "out", "--quiet"]
    return args, [model, stats], [f"{stats / 'calibration.json'}: model.path must be str, got None", "calibrate again"]


@case
def compress_stats_info_sources_not_records(tmp, src):
    model = copy(src, "moelab", tmp)
    stats = tmp / "stats"
    text(stats / "calibration.json", _stats_info(mixture={"spec": "corpus", "sources": ["code"]}))
    args = ["compress", model, "--stats", stats, "--out", tmp / "out", "--quiet"]
    return args, [model, stats], ["mixture.sources must be records with a 'domain' name"]


@case
def compress_m_smoe_mc_sparse_outside(tmp, src):
    return *_compress_with_options(tmp, src, "m_smoe", "mc_sparse=2"), ["m_smoe mc_sparse must lie in [0, 1]", "got 2"]


@case
def compress_m_smoe_mc_rank_that_saves_nothing(tmp, src):
    return *_compress_with_options(tmp, src, "m_smoe", "mc_rank=100000"), ["layer 1: mc_rank=100000 saves nothing on experts of 32 x 32", "choose mc_rank <= 14"]


@case
def compress_m_smoe_mc_sparse_that_keeps_every_row(tmp, src):
    return *_compress_with_options(tmp, src, "m_smoe", "mc_rank=1", "mc_sparse=1"), ["mc_rank=1 saves nothing", "lower mc_sparse"]


@case
def compress_sub_moe_rank_that_saves_nothing(tmp, src):
    return *_compress_with_options(tmp, src, "sub_moe", "rank=100000"), ["rank=100000 saves nothing on experts of", "choose rank <= "]


@case
def compress_option_given_twice(tmp, src):
    return *_compress_with_options(tmp, src, "random", "seed=1", "seed=2"), ["--option seed is given twice", "give each option once"]


def _fewer_layers_in_config(tmp: Path, src: Path) -> Path:
    """A copy of the moelab checkpoint whose config.json has one layer fewer than its weights."""
    model = copy(src, "moelab", tmp)
    edit_json(model / "config.json", n_layers=json.loads((model / "config.json").read_text())["n_layers"] - 1)
    return model


@case
def calibrate_config_with_fewer_layers_than_the_weights(tmp, src):
    model = _fewer_layers_in_config(tmp, src)
    args = ["calibrate", model, "--out", tmp / "out", "--quiet"]
    return args, [model], [f"{model}: the checkpoint holds layers", "config.json does not describe these weights"]


@case
def compress_config_with_fewer_layers_than_the_weights(tmp, src):
    model = _fewer_layers_in_config(tmp, src)
    args = ["compress", model, "--method", "frequency", "--out", tmp / "out", "--quiet"]
    return args, [model], ["the checkpoint holds layers", "config.json does not describe these weights"]


@case
def consolidate_out_inside_the_checkpoint(tmp, src):
    ckpt = tmp / "run" / "checkpoints" / "step-000002"
    text(ckpt / "train_state.pt", b"")  # the check comes before anything is read
    args = ["consolidate", ckpt, "--out", ckpt / "model2"]
    return args, [ckpt], [f"{ckpt / 'model2'} lies inside the input {ckpt}", "choose an output path outside it"]


@case
def consolidate_a_run_instead_of_its_checkpoint(tmp, src):
    run = tmp / "run"
    text(run / "checkpoints" / "step-000002" / "train_state.pt", b"")
    args = ["consolidate", run, "--out", tmp / "model"]
    return args, [run], [f"{run} is a training run, not one of its checkpoints", "checkpoints/step-N"]


@case
def bench_skip_stats_of_another_model(tmp, src):
    model = copy(src, "moelab", tmp)
    stats = tmp / "stats"
    text(stats / "calibration.json", _stats_info())
    args = ["bench", "skip", model, "--stats", stats, "--tokens", "64", "--rounds", "1"]
    return args, [model, stats], ["were made on /elsewhere/model", "fingerprints differ", "calibrate this model"]


def _mixtral8k_with_tokenizer(tmp: Path, src: Path, edit=None) -> Path:
    """A copy of the mixtral8k checkpoint (moelab's vocabulary) with moelab's tokenizer beside it and its
    tensors changed in place by `edit`."""
    ckpt = copy(src, "mixtral8k", tmp)
    if edit is not None:
        tensors = load_file(ckpt / "model.safetensors")
        edit(tensors)
        save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(ckpt)
    return ckpt


@case
def eval_top_k_above_the_expert_count(tmp, src):
    """eval loaded transformers checkpoints unchecked by the view: torch.topk's RuntimeError mid-scoring."""
    ckpt = _mixtral8k_with_tokenizer(tmp, src)
    edit_json(ckpt / "config.json", num_experts_per_tok=5)
    args = ["eval", ckpt, "--eval-tokens", "64", "--seq-len", "16", "--domain", "code", "--quiet"]
    return args, [ckpt], [f"{ckpt}, layer 0: top_k must lie in [1, num_experts=4], got 5"]


@case
def calibrate_embedding_of_another_vocabulary(tmp, src):
    """The layer-by-layer run read the tensors outside the decoder layers unchecked: an IndexError once a
    token id passed the embedding's 4096 rows."""
    embedding = "model.embed_tokens.weight"
    ckpt = _mixtral8k_with_tokenizer(tmp, src, lambda t: t.update({embedding: t[embedding][:4096].clone()}))
    args = ["calibrate", ckpt, "--calib-tokens", "256", "--seq-len", "32", "--out", tmp / "out", "--quiet"]
    return args, [ckpt], [f"{ckpt}: {embedding} is [4096, 32] but config.json makes it [8192, 32]"]


@case
def calibrate_integer_attention_weight(tmp, src):
    """The layer-by-layer run cast an int32 weight to float32 and calibrated on."""
    name = "model.layers.1.self_attn.q_proj.weight"
    ckpt = _mixtral8k_with_tokenizer(tmp, src, lambda t: t.update({name: t[name].int()}))
    args = ["calibrate", ckpt, "--calib-tokens", "256", "--seq-len", "32", "--out", tmp / "out", "--quiet"]
    return args, [ckpt], [f"{ckpt}: {name} has dtype torch.int32 where the model has floating-point weights"]


@case
def calibrate_inf_in_an_expert(tmp, src):
    ckpt = copy(src, "mixtral8k", tmp)  # moelab's vocabulary: the corpus calibrates it
    tensors = load_file(ckpt / "model.safetensors")
    name = next(k for k in sorted(tensors) if ".experts." in k and k.startswith("model.layers.1."))
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(ckpt)
    args = ["calibrate", ckpt, "--calib-tokens", "256", "--seq-len", "32", "--out", tmp / "out", "--quiet"]
    return args, [ckpt], [f"{ckpt}: NaN or Inf in layer 1's MoE block (experts.", "weights are corrupt"]


@case
def generate_infinite_temperature(tmp, src):
    args = ["generate", "hi", "--max-new-tokens", "2", "--temperature", "inf"]
    return args, [], ["temperature must be > 0 and finite when sampling, got inf"]


@case
def info_checkpoint_directory(tmp, src):
    model = copy(src, "moelab", tmp)
    return ["info", model], [model], [f"{model} is a directory", f"its config.json: {model / 'config.json'}"]


def test_non_finite_names_reads_parameters_and_float8_without_complaint():
    """A parameter that needs a gradient is summed with no autograd graph (nor torch's warning about
    reading a scalar off one), and float8 tensors, which torch sums (and for e4m3fn checks) on no CPU,
    are checked too."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert non_finite_names([("weight", torch.nn.Parameter(torch.ones(3)))]) == []
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        clean = torch.tensor([448.0, -2.0, 0.0]).to(dtype)
        bad = torch.tensor([1.0, float("nan")]).to(dtype)
        assert non_finite_names([("clean", clean), ("bad", bad), ("cols", clean.expand(2, 3).t())]) == ["bad"], dtype


def test_generate_ends_the_streamed_line_before_an_error_mid_decoding(tmp_path, monkeypatch, capsys, one_thread):
    """An offloaded expert found corrupt once the prompt is printed: the error comes on a line of
    its own (it was appended to the prompt, "The king saiderror: ...")."""
    ckpt = Path(shutil.copytree(reference_model_dir(), tmp_path / "ref"))
    tensors = load_file(ckpt / "model.safetensors")
    tensors["layers.5.ffn.experts.gate_up_proj"][2:] = float("inf")  # the warm start holds experts 0 and 1
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    args = ["generate", "The king said", "--model", ckpt, "--resident", "0.25", "--max-new-tokens", "2"]
    code, out, err = run_cli(monkeypatch, capsys, args)
    assert code == 2 and err.startswith("error: ") and "holds Inf/NaN" in err, (out, err)
    assert out == "The king said\n"


def _layer_stats_file(directory: Path) -> Path:
    """A statistics file of layer 1 as calibrate writes it: 2 halves, 2 sources, 4 experts, 3 sampled inputs
    of width 8, HEAPr's sums over 5 neurons."""
    from moelab.compress.stats import LayerStats, layer_file, write_layer

    def per_source():
        return torch.rand(2, 2, 4, dtype=torch.float64)

    stats = LayerStats(
        1, ("a", "b"), tokens=torch.full((2, 2), 8.0, dtype=torch.float64), counts=per_source() * 8,
        soft_counts=per_source(), gate_sums=per_source(), premoe_sums=per_source(), skip_ratios=torch.zeros(10),
        logit_gram=torch.rand(2, 2, 4, 4, dtype=torch.float64), reap_sums=per_source(), max_output=torch.ones(4),
        neuron_act_sums=torch.rand(2, 2, 4, 5), inputs=torch.randn(3, 8), input_sources=torch.tensor([0, 1, 1]),
    )  # fmt: skip
    directory.mkdir()
    write_layer(directory, stats)
    return layer_file(directory, 1)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update(reap_sums=t["reap_sums"][:, :, :3].contiguous()), "reap_sums has shape [2, 2, 3], expected [2, 2, 4]"),
        (lambda t: t.update(logit_gram=t["logit_gram"][..., :3].contiguous()), "logit_gram has shape [2, 2, 4, 3]"),
        (lambda t: t.update(neuron_act_sums=t["neuron_act_sums"][0]), "neuron_act_sums has shape [2, 4, 5]"),
        (lambda t: t.update(max_output=torch.ones(5)), "max_output has shape [5], expected [4]"),
        (lambda t: t.update(tokens=torch.ones(2, 3, dtype=torch.float64)), "tokens has shape [2, 3], expected [halves, 2]"),
        (lambda t: t.update(counts=t["counts"][0]), "counts has shape [2, 4]"),
        (lambda t: t.update(inputs=t["inputs"][0]), "inputs has shape [8]"),
        (lambda t: t.update(input_sources=torch.tensor([0, 1])), "input_sources has shape [2], expected [3, ...]"),
        (lambda t: t["input_sources"].__setitem__(0, 2), "input_sources holds source numbers outside [0, 2)"),
        (lambda t: t["counts"].view(-1).__setitem__(0, -1.0), "counts holds negative or non-finite values"),
        (lambda t: t["tokens"].view(-1).__setitem__(0, float("nan")), "tokens holds negative or non-finite values"),
    ],
)
def test_read_layer_refuses_statistics_of_the_wrong_layout(tmp_path, edit, message):
    """An edited or foreign statistics file is refused naming the file and the tensor (a reap_sums one expert
    short ended compress in a RuntimeError traceback; negative counts or out-of-range input sources were read
    as they were)."""
    from moelab.compress.stats import read_layer

    path = _layer_stats_file(tmp_path / "stats")
    assert read_layer(path.parent, 1, ("a", "b")).num_experts == 4
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="calibrate again") as err:
        read_layer(path.parent, 1, ("a", "b"))
    assert str(path) in str(err.value) and message in str(err.value)


def _own_code_checkpoint(src: Path, tmp: Path, name: str = "mixtral") -> Path:
    """A copy of a checkpoint whose model_type transformers lacks and whose auto_map names its own code,
    code that would write ran.txt beside it (a new file there: the inputs' digest changes)."""
    ckpt = copy(src, name, tmp)
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    edit_json(ckpt / "config.json", model_type="xmoe", auto_map=auto_map)
    for module in ("configuration_x", "modeling_x"):
        text(ckpt / f"{module}.py", "import pathlib\n(pathlib.Path(__file__).parent / 'ran.txt').write_text('ran')\n")
    return ckpt


OWN_CODE = ["model_type 'xmoe' is not a model transformers", "configuration_x.XConfig", "which moelab never runs"]


def test_a_known_model_type_with_code_of_its_own_warns_that_transformers_class_runs(sources, tmp_path):
    """config.json's model_type is one transformers has ('mixtral') and its auto_map names the
    checkpoint's own code: transformers' class runs, never that code, and a warning says so (a
    checkpoint whose code differs would compute otherwise, silently), once for the command's loads."""
    from moelab.hf.adapters import resolve
    from moelab.hf.layerwise import skeleton
    from moelab.hf.loading import load_causal_lm

    ckpt = _own_code_checkpoint(sources, tmp_path)
    edit_json(ckpt / "config.json", model_type="mixtral")
    with pytest.warns(UserWarning, match=r"configuration_x.XConfig, modeling_x.XForCausalLM\), which moelab never runs: "
                      r"transformers' own 'mixtral' model runs instead") as caught:  # fmt: skip
        load_causal_lm(ckpt, quiet=True)
        config, checkpoint, family = resolve(ckpt)
        checkpoint.close()
        skeleton(ckpt, config, family)  # calibrate's second load (its tokenizer's was the first)
    assert len([w for w in caught if "which moelab never runs" in str(w.message)]) == 1, "once, not once per load"
    assert not (ckpt / "ran.txt").exists()


@case
def trace_model_type_transformers_lacks_with_its_own_code(tmp, src):
    ckpt = _own_code_checkpoint(src, tmp)
    return ["trace", ckpt, "--out", tmp / "out", "--quiet"], [ckpt], [str(ckpt / "config.json"), *OWN_CODE]


@case
def calibrate_model_type_transformers_lacks_with_its_own_code(tmp, src):
    ckpt = _own_code_checkpoint(src, tmp, "mixtral8k")
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(ckpt)
    return ["calibrate", ckpt, "--out", tmp / "out", "--quiet"], [ckpt], [str(ckpt / "config.json"), *OWN_CODE]


@case
def generate_model_type_transformers_lacks(tmp, src):
    ckpt = hf(src, tmp, model_type="nosuchmoe")
    args = ["generate", "The king said", "--model", ckpt, "--max-new-tokens", "2"]
    return args, [ckpt], ["model_type 'nosuchmoe' is not a model transformers", "correct model_type if it is a typo"]


@case
def trace_transformers_checkpoint_without_model_type(tmp, src):
    ckpt = hf(src, tmp, model_type=...)  # read as a moelab config, which it is not
    args = ["trace", ckpt, "--out", tmp / "out", "--quiet"]
    return args, [ckpt], [str(ckpt / "config.json"), "without its model_type", 'add "model_type": "mixtral"']


@pytest.mark.parametrize(
    "architecture, model_type",
    [
        ("MixtralForCausalLM", "mixtral"),
        ("Llama4ForCausalLM", "llama4_text"),  # not "llama4", the multimodal config that maps to it too
        ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
        ("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe"),  # a multimodal release's
    ],
)
def test_a_config_without_model_type_is_told_its_class_s_model_type(architecture, model_type):
    """The model_type to add is the one of the architecture's own config class (the first causal LM
    name in sorted order told Llama4ForCausalLM's text config to become "llama4", and named nothing for
    a multimodal class)."""
    from moelab.models.config import check_not_transformers

    with pytest.raises(ValueError, match="without its model_type") as err:
        check_not_transformers({"architectures": [architecture]}, "ckpt/config.json")
    assert f'add "model_type": "{model_type}" to it' in str(err.value)
    with pytest.raises(ValueError, match=r'add its family\'s model_type \(e.g. "model_type": "mixtral"\)'):
        check_not_transformers({"architectures": ["NoSuchForCausalLM", 3]}, "ckpt/config.json")
