"""`moelab dequantize`: block-wise FP8 checkpoints (DeepSeek-V3, Qwen3-FP8: float8 weights and one
float32 scale per block, `<name>_scale_inv`) rewritten with plain weights, against a per-block
loop, end to end on a sharded tiny Qwen3-MoE, and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import build
from hypothesis import given, settings
from hypothesis import strategies as st
from quantized_tiny import BLOCK, fp8_release, per_block, quantized
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moelab.hf import CheckpointError, drop_experts, open_checkpoint
from moelab.hf.dequantize import dequantize_checkpoint
from moelab.hf.float8 import dequantized
from moelab.io import OutputError

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=25, deadline=None)
@given(
    O=st.integers(1, 40),
    I=st.integers(1, 40),
    bo=st.integers(1, 16),
    bi=st.integers(1, 16),
    seed=st.integers(0, 99),
)
def test_dequantized_equals_the_per_block_product(O, I, bo, bi, seed):
    """Blocks that do not divide the weight (the last row and column of blocks cut short) included."""
    g = torch.Generator().manual_seed(seed)
    q, scales = quantized(torch.randn(O, I, generator=g), (bo, bi))
    assert torch.equal(dequantized(q, scales, (bo, bi)), per_block(q, scales, (bo, bi)))


def test_stacked_weights_dequantize_matrix_by_matrix():
    g = torch.Generator().manual_seed(0)
    parts = [quantized(torch.randn(20, 12, generator=g), BLOCK) for _ in range(3)]
    q, scales = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    got = dequantized(q, scales, BLOCK)
    for e, (qe, se) in enumerate(parts):
        assert torch.equal(got[e], per_block(qe, se, BLOCK))


@pytest.fixture
def fp8(tmp_path):
    """A tiny Qwen3-MoE in two shards with an index, its 2-D projection weights in FP8 (the
    embedding, norms, router and head stay float32, as the releases keep them in bf16)."""
    build("qwen3_moe").save_pretrained(tmp_path / "f32")
    return tmp_path / "fp8", fp8_release(tmp_path / "f32", tmp_path / "fp8")


def test_a_sharded_fp8_checkpoint_dequantizes_tensor_by_tensor(fp8, tmp_path):
    src, stored = fp8
    out = dequantize_checkpoint(src, tmp_path / "bf16", quiet=True)
    written = {}
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(out / shard, "pt") as f:
            written |= {k: f.get_tensor(k) for k in f.keys()}
    assert written.keys() == {k for k in stored if not k.endswith("_scale_inv")}
    for key, t in written.items():
        if key + "_scale_inv" in stored:
            assert t.dtype == torch.bfloat16
            assert torch.equal(
                t, per_block(stored[key], stored[key + "_scale_inv"], BLOCK).to(torch.bfloat16)
            ), key
        else:
            assert torch.equal(t, stored[key]), key  # copied as stored
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == written.keys()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    view = open_checkpoint(out)  # what the views, compression and offloading read now
    assert view.layer(1).experts.up.dtype == torch.bfloat16
    drop_experts(out, tmp_path / "pruned", [0, 1], quiet=True)  # written and reloaded by transformers


@pytest.mark.parametrize(
    "change,message",
    [
        ({"quant_method": "awq"}, "quant_method 'awq'.*moelab reads plain weights, float8 ones"),
        ({"weight_block_size": None}, "reads block-wise FP8 checkpoints"),
        ({"weight_block_size": [128]}, "reads block-wise FP8 checkpoints"),
        ({"weight_block_size": [True, True]}, "reads block-wise FP8 checkpoints"),
    ],
)
def test_other_quantizations_are_refused_by_name(fp8, tmp_path, change, message):
    src, _ = fp8
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] |= change
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_source_that_is_no_checkpoint_directory_is_named_with_what_it_is(tmp_path):
    """A missing directory was the OS's 'config.json: No such file or directory'."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    for source, said in (("missing", "no such directory"), ("notes.txt", "is a file, not a directory"), ("empty", "no config.json in")):
        with pytest.raises(CheckpointError, match=f"{said}.*; pass a quantized checkpoint directory$"):
            dequantize_checkpoint(tmp_path / source, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_scales_that_do_not_tile_their_weight_are_refused(fp8, tmp_path):
    src, stored = fp8
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 8]  # the scales were made for 16 x 8
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"_scale_inv \[2, \d+\] do not tile .*\.weight \[\d+, \d+\] in blocks of 32 x 8"):
        dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_without_overwrite(fp8, tmp_path):
    src, _ = fp8
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    dequantize_checkpoint(src, tmp_path / "new", quiet=True)
    dequantize_checkpoint(src, tmp_path / "new", quiet=True, overwrite=True)  # its own output: replaced


def test_the_command_line(fp8, tmp_path):
    from typer.testing import CliRunner

    from moelab.cli import app

    src, _ = fp8
    result = CliRunner().invoke(
        app, ["dequantize", str(src), "--out", str(tmp_path / "out"), "--dtype", "fp32", "--quiet"]
    )
    assert result.exit_code == 0 and "wrote" in result.output, result.output
    with safe_open(tmp_path / "out" / "model-00001-of-00002.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    bad = CliRunner().invoke(app, ["dequantize", str(src), "--out", str(tmp_path / "x"), "--dtype", "int8"])
    assert bad.exit_code != 0 and "--dtype must be one of" in (bad.output + str(bad.exception))


def test_computed_tensors_are_made_as_they_are_written(tmp_path):
    """`LazyTensor`s: each made only when its turn to be written comes (a shard of dequantized
    experts never sits in memory whole), and held to the dtype and shape it promised."""
    from moelab.io import LazyTensor, save_safetensors_stream

    made = []

    def make(i):
        def tensor():
            made.append(i)
            return torch.full((4, 4), float(i))

        return tensor

    lazy = {f"t{i}": LazyTensor(torch.float32, (4, 4), make(i)) for i in range(3)}
    assert made == []
    save_safetensors_stream(lazy, tmp_path / "x.safetensors")
    assert made == [0, 1, 2]
    assert [load_file(tmp_path / "x.safetensors")[f"t{i}"][0, 0].item() for i in range(3)] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"promised torch.float32 \[4, 4\], made torch.float32 \[2, 2\]"):
        save_safetensors_stream(
            {"t": LazyTensor(torch.float32, (4, 4), lambda: torch.zeros(2, 2))}, tmp_path / "y.safetensors"
        )
    assert not (tmp_path / "y.safetensors").exists()


def _write_fp8(directory, tensors, **config):
    """A one-file FP8 checkpoint of these tensors (blocks of BLOCK) with a config.json."""
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt", "note": "kept"})
    quantization = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    (directory / "config.json").write_text(json.dumps({"quantization_config": quantization, **config}))
    return directory


def test_e5m2_weights_are_dequantized_too(tmp_path):
    q = torch.randn(20, 12, generator=torch.Generator().manual_seed(1)).to(torch.float8_e5m2)
    scales = torch.rand(2, 2) + 0.5
    src = _write_fp8(tmp_path / "src", {"w.weight": q, "w.weight_scale_inv": scales})
    out = dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert torch.equal(
        load_file(out / "model.safetensors")["w.weight"], per_block(q, scales, BLOCK).bfloat16()
    )


def test_a_torch_dtype_config_and_the_side_files(tmp_path):
    """DeepSeek-V3's config.json names `torch_dtype` (not `dtype`): it takes the output's dtype; the
    tokenizer and generation config come along."""
    q, scales = quantized(torch.randn(20, 12, generator=torch.Generator().manual_seed(2)), BLOCK)
    src = _write_fp8(tmp_path / "src", {"w.weight": q, "w.weight_scale_inv": scales}, torch_dtype="bfloat16")
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text('{"do_sample": true}')
    out = dequantize_checkpoint(src, tmp_path / "out", dtype=torch.float16, quiet=True)
    assert json.loads((out / "config.json").read_text()) == {"torch_dtype": "float16"}
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "generation_config.json").read_text() == '{"do_sample": true}'


def test_the_index_total_size_and_the_shard_metadata(fp8, tmp_path):
    src, _ = fp8
    save_file(
        load_file(src / "model-00001-of-00002.safetensors"),
        src / "model-00001-of-00002.safetensors",
        metadata={"format": "pt", "note": "kept"},
    )
    out = dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    size = 0
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(out / shard, "pt") as f:
            size += sum(f.get_tensor(k).nbytes for k in f.keys())
            if shard.startswith("model-00001"):
                assert f.metadata() == {"format": "pt", "note": "kept"}
    assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"] == {"total_size": size}


def test_float8_weights_reach_the_writer_unmade(fp8, tmp_path, monkeypatch):
    """No shard's dequantized weights sit in memory whole: the writer gets stored bytes and
    LazyTensors only."""
    import moelab.hf.dequantize as module
    from moelab.io import LazyTensor, RawTensor

    src, _ = fp8
    write, kinds = module.save_safetensors_stream, set()

    def checked(tensors, *args, **kwargs):
        kinds.update(type(t) for t in tensors.values())
        return write(tensors, *args, **kwargs)

    monkeypatch.setattr(module, "save_safetensors_stream", checked)
    dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert kinds == {LazyTensor, RawTensor}


def test_a_float8_weight_without_its_scale_is_refused_by_name(tmp_path):
    q, _ = quantized(torch.randn(20, 12), BLOCK)
    src = _write_fp8(tmp_path / "src", {"w.weight": q})
    with pytest.raises(CheckpointError, match=r"w.weight is float8 but has no w.weight_scale_inv"):
        dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_ue8m0_byte_scales_are_powers_of_two_and_packed_weights_are_refused(tmp_path):
    """MXFP8 scales stored as uint8 exponents mean 2 ** (byte - 127) (transformers' Fp8Dequantize),
    not the byte's value; an int8 weight with a scale (packed FP4) is not copied without it."""
    q, _ = quantized(torch.randn(20, 12, generator=torch.Generator().manual_seed(3)), BLOCK)
    exponents = torch.tensor([[126, 127], [128, 130]], dtype=torch.uint8)
    powers = torch.tensor([[0.5, 1.0], [2.0, 8.0]])
    assert torch.equal(dequantized(q, exponents, BLOCK), per_block(q, powers, BLOCK))
    # the same scales as safetensors' F8_E8M0 (torch.float8_e8m0fnu), read from a file
    e8m0 = _write_fp8(
        tmp_path / "e8m0", {"w.weight": q, "w.weight_scale_inv": powers.to(torch.float8_e8m0fnu)}
    )
    out = dequantize_checkpoint(e8m0, tmp_path / "e8m0_out", dtype=torch.float32, quiet=True)
    assert torch.equal(load_file(out / "model.safetensors")["w.weight"], per_block(q, powers, BLOCK))
    src = _write_fp8(
        tmp_path / "src", {"w.weight": torch.zeros(20, 6, dtype=torch.int8), "w.weight_scale_inv": exponents}
    )
    with pytest.raises(CheckpointError, match=r"w.weight is stored as torch.int8 with a w.weight_scale_inv"):
        dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_stray_and_activation_scales_are_dropped_with_the_shards_they_empty(tmp_path):
    """As DeepSeek-V3's fp8_cast_bf16 (every `*_scale_inv`) and transformers (activation scales):
    no scale outlives the dequantization, and a shard that held only scales is not written."""
    q, scales = quantized(torch.randn(20, 12, generator=torch.Generator().manual_seed(4)), BLOCK)
    src = tmp_path / "src"
    src.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {
            "w.weight": q,
            "w.activation_scale": torch.tensor(2.0),
            "n.input_scale": torch.tensor(3.0),
        },
        "model-00002-of-00002.safetensors": {
            "w.weight_scale_inv": scales,
            "gone.weight_scale_inv": torch.ones(1, 1),
        },
    }
    for name, tensors in shards.items():
        save_file(tensors, src / name, metadata={"format": "pt"})
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": list(BLOCK)}})
    )
    out = dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert load_file(out / "model-00001-of-00002.safetensors").keys() == {
        "w.weight",
        "n.input_scale",
    }  # n has no float8 weight
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() == {
        "w.weight",
        "n.input_scale",
    }


def _compressed_tensors(directory, tensors, weights: dict, fmt="float-quantized"):
    """A one-file llm-compressor checkpoint: these tensors, one config group of these weights."""
    group = {"format": fmt, "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", **weights}}
    quantization = {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group}}
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"quantization_config": quantization}))
    return directory


@pytest.mark.parametrize("fmt", ["float-quantized", "naive-quantized"])  # the older name of the same tensors
@pytest.mark.parametrize(
    "weights,block,scale_shape",
    [
        ({"strategy": "tensor"}, (20, 12), (1,)),
        ({"strategy": "channel"}, (1, 12), (20, 1)),
        ({"strategy": "group", "group_size": 4}, (1, 4), (20, 3)),
        ({"strategy": "block", "block_structure": [16, 8]}, (16, 8), (2, 2)),
    ],
)
def test_compressed_tensors_float8_weights_dequantize_by_their_strategy(
    tmp_path, weights, block, scale_shape, fmt
):
    """llm-compressor's FP8 (`weight_scale` beside each float8 weight): one scale per tensor, per
    output channel, per group of input columns or per block; the scales and input scales dropped."""
    g = torch.Generator().manual_seed(5)
    q, scales = quantized(torch.randn(20, 12, generator=g), block)
    tensors = {"w.weight": q, "w.weight_scale": scales.reshape(scale_shape), "w.input_scale": torch.tensor([2.0]),
               "norm.weight": torch.ones(12)}  # fmt: skip
    src = _compressed_tensors(tmp_path / "src", tensors, weights, fmt)
    out = load_file(
        dequantize_checkpoint(src, tmp_path / "out", dtype=torch.float32, quiet=True) / "model.safetensors"
    )
    assert out.keys() == {"w.weight", "norm.weight"}
    assert torch.equal(out["w.weight"], per_block(q, scales, block)) and torch.equal(
        out["norm.weight"], torch.ones(12)
    )


@pytest.mark.parametrize(
    "weights,fmt,message",
    [
        ({"strategy": "channel"}, "pack-quantized", "whose weights are all float-quantized 8-bit floats"),
        ({"strategy": "channel", "num_bits": 4}, "float-quantized", "4 bits"),
        ({"strategy": "tensor_group", "group_size": 16}, "float-quantized", "strategy 'tensor_group'"),
        ({"strategy": "group"}, "float-quantized", "the group strategy's size is None"),
    ],
)
def test_other_compressed_tensors_schemes_are_refused_by_name(tmp_path, weights, fmt, message):
    q, scales = quantized(torch.randn(20, 12, generator=torch.Generator().manual_seed(6)), (1, 12))
    src = _compressed_tensors(tmp_path / "src", {"w.weight": q, "w.weight_scale": scales}, weights, fmt)
    with pytest.raises(CheckpointError, match=message):
        dequantize_checkpoint(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_groups_of_other_sizes_padding_g_idx_and_leftovers(tmp_path):
    """Review of 1e4006b: groups differing only in block size are refused (they were read with the
    first group's); activation-ordered groups (weight_g_idx) are refused (they were dequantized by
    runs of columns); a block weight stored padded is cut to weight_shape_original; zero points,
    output scales and the kv cache's scales are not left in the plain checkpoint; a group's null
    format is the top-level one."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(20, 12, generator=g)
    qa, sa = quantized(w, (16, 12))
    src = _compressed_tensors(
        tmp_path / "two",
        {"a.weight": qa, "a.weight_scale": sa},
        {"strategy": "block", "block_structure": [16, 12]},
    )
    config = json.loads((src / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    groups["group_1"] = json.loads(json.dumps(groups["group_0"]))
    groups["group_1"]["weights"]["block_structure"] = [11, 12]  # the same [2, 1] grid of scales on 20 rows
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="block structures"):
        dequantize_checkpoint(src, tmp_path / "two_out", quiet=True)
    q, s = quantized(w, (1, 4))
    g_idx = (torch.arange(12) // 4)[torch.randperm(12, generator=g)].int()
    src = _compressed_tensors(
        tmp_path / "act",
        {"a.weight": q, "a.weight_scale": s, "a.weight_g_idx": g_idx},
        {"strategy": "group", "group_size": 4, "actorder": "group"},
    )
    with pytest.raises(CheckpointError, match="weight_g_idx"):
        dequantize_checkpoint(src, tmp_path / "act_out", quiet=True)
    qp, sp = quantized(torch.randn(32, 16, generator=g), (16, 8))
    q, s = quantized(w, (1, 12))
    tensors = {"p.weight": qp, "p.weight_scale": sp, "p.weight_shape_original": torch.tensor([20, 12]),
               "a.weight": q, "a.weight_scale": s, "a.weight_zero_point": torch.zeros(20, 1), "a.input_zero_point": torch.zeros(1),
               "a.output_scale": torch.ones(1), "attn.k_scale": torch.tensor(1.0), "attn.v_scale": torch.tensor(1.0)}  # fmt: skip
    src = _compressed_tensors(tmp_path / "pad", tensors, {"strategy": "channel"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = None
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}
    (src / "config.json").write_text(json.dumps(config))
    # the padded weight's own scheme is block [16, 8]: check the cut against a one-weight checkpoint
    pad = _compressed_tensors(
        tmp_path / "pad1",
        {k: v for k, v in tensors.items() if k.startswith("p.")},
        {"strategy": "block", "block_structure": [16, 8]},
    )
    out = load_file(
        dequantize_checkpoint(pad, tmp_path / "pad1_out", dtype=torch.float32, quiet=True)
        / "model.safetensors"
    )
    assert out.keys() == {"p.weight"} and torch.equal(out["p.weight"], per_block(qp, sp, (16, 8))[:20, :12])
    del tensors["p.weight"], tensors["p.weight_scale"], tensors["p.weight_shape_original"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = load_file(
        dequantize_checkpoint(src, tmp_path / "pad_out", dtype=torch.float32, quiet=True)
        / "model.safetensors"
    )
    assert out.keys() == {"a.weight"} and torch.equal(out["a.weight"], per_block(q, s, (1, 12)))
    tensors["a.weight_zero_point"] = torch.ones(20, 1)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="nonzero"):
        dequantize_checkpoint(src, tmp_path / "zp_out", quiet=True)
