"""Float8 releases read directly (`moelab.hf.float8.Float8Checkpoint`): a block-wise FP8 checkpoint
reads, calibrates, compresses and offloads exactly as its dequantized copy does, its weights are
the ones transformers dequantizes, and the reader's slices, shapes and refusals hold on hand-made
files."""

from __future__ import annotations

import json

import pytest
import torch
from float8_tiny import BLOCK, fp8_release, per_block, quantized
from hf_tiny import build
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from moelab.compress import CalibrationOptions, calibrate, compress
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.eval.evaluate import parameter_counts
from moelab.hf import CheckpointError, MoELayerView, drop_experts, open_checkpoint
from moelab.hf.dequantize import dequantize_checkpoint
from moelab.hf.float8 import Float8Checkpoint, float8_scheme
from moelab.hf.loading import load_causal_lm
from moelab.offload import load_offloaded

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = [
    "qwen3_moe",
    "deepseek_v3",
]  # experts one module each; DeepSeek-V3's float32 router, shared experts


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """{family: (its FP8 release, which states bf16 as the real ones do; the release dequantized by
    `moelab dequantize`)}, with the shipped tokenizer."""
    root, out = tmp_path_factory.mktemp("float8"), {}
    for family in FAMILIES:
        build(family, vocab_size=8192).save_pretrained(root / family)
        PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(root / family)
        fp8_release(root / family, root / f"{family}_fp8", dtype="bfloat16")
        plain = dequantize_checkpoint(root / f"{family}_fp8", root / f"{family}_plain", quiet=True)
        out[family] = root / f"{family}_fp8", plain
    return out


def _tensors(directory):
    return {k: v for shard in sorted(directory.glob("*.safetensors")) for k, v in load_file(shard).items()}


def _same_files(a, b):
    x, y = _tensors(a), _tensors(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_release_reads_as_its_dequantized_copy(releases, family):
    """Every layer's tensors, the keys (no scales), shapes and dtypes from the headers alone, and
    the parameter counts."""
    fp8, plain = releases[family]
    a, b = open_checkpoint(fp8), open_checkpoint(plain)
    try:
        assert a._checkpoint.keys() == sorted(b._checkpoint.keys()) or set(a._checkpoint.keys()) == set(
            b._checkpoint.keys()
        )
        assert not any(k.endswith("_scale_inv") for k in a._checkpoint.keys())
        moe = 0
        for la, lb in zip(a.layers(), b.layers()):
            assert type(la) is type(lb)
            if isinstance(la, MoELayerView):
                moe += 1
                assert la.experts.up.dtype == torch.bfloat16
                for part in ("gate", "up", "down"):
                    assert torch.equal(getattr(la.experts, part), getattr(lb.experts, part)), part
                assert torch.equal(la.router.weight, lb.router.weight)
                if la.shared is not None:
                    assert torch.equal(la.shared.down, lb.shared.down)
        assert moe > 0
        shapes = a._checkpoint.with_shapes_only()
        for key in b._checkpoint.keys():
            want = b._checkpoint.get(key)
            assert shapes.get(key).dtype == want.dtype and shapes.get(key).shape == want.shape, key
        shapes.close()
    finally:
        a.close(), b.close()
    assert parameter_counts(fp8) == parameter_counts(plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_dequantizes_the_release_to_the_same_weights(releases, family):
    """The reference: transformers' own FP8 loading (accelerate, dequantized on a CPU) gives every
    weight of the model equal to moelab's reading of it, in bf16."""
    fp8, plain = releases[family]
    theirs = load_causal_lm(fp8, quiet=True, dtype=torch.bfloat16).state_dict()
    ours = load_causal_lm(plain, quiet=True, dtype=torch.bfloat16).state_dict()
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key


SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=64)


@pytest.mark.parametrize("family", FAMILIES)
def test_compressing_a_release_writes_what_its_dequantized_copy_gives(releases, tmp_path, family):
    """Calibration, pruning (REAP), merging (HC-SMoE) and narrowing (HEAPr, with the backward sweep)
    on the float8 files give the plain copy's bf16 checkpoints tensor for tensor, config.json (no
    quantization_config) included; each passed the writer's checks and transformers' reload."""
    import dataclasses

    options = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",))
    results = {}
    for name, source in zip(("fp8", "plain"), releases[family]):
        stats = calibrate(source, tmp_path / f"stats_{name}", options=options, quiet=True).directory
        for method in ("reap", "hc_smoe", "heapr"):
            compress(source, tmp_path / f"{method}_{name}", method=method, ratio=0.5, stats=stats, quiet=True)
        results[name] = stats
    for method in ("reap", "hc_smoe", "heapr"):
        _same_files(tmp_path / f"{method}_fp8", tmp_path / f"{method}_plain")
        assert "quantization_config" not in json.loads(
            (tmp_path / f"{method}_fp8" / "config.json").read_text()
        )


def test_dropping_experts_of_a_release(releases, tmp_path):
    fp8, plain = releases["qwen3_moe"]
    _same_files(
        drop_experts(fp8, tmp_path / "a", [0, 1], quiet=True),
        drop_experts(plain, tmp_path / "b", [0, 1], quiet=True),
    )
    assert {t.dtype for t in _tensors(tmp_path / "a").values()} <= {torch.bfloat16, torch.float32}


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_decoding_of_a_release(releases, family):
    """Experts read from the float8 files, half of them resident, give the plain copy's tokens."""
    ids = torch.randint(0, 8192, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = []
    for source in releases[family]:
        model = load_offloaded(source, resident=0.5, dtype=torch.bfloat16)
        try:
            tokens.append(model.generate(ids, 6))
        finally:
            model.close()
    assert torch.equal(*tokens)


# ----------------------------------------------------------------------------- the reader on hand-made files


def _checkpoint(directory, tensors, quantization, **config):
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"quantization_config": quantization, **config}))
    return directory


FP8 = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}


def _open(directory, **kwargs):
    config = json.loads((directory / "config.json").read_text())
    return Float8Checkpoint(directory, float8_scheme(config, directory), torch.float32, **kwargs)


def test_rows_of_stacked_and_single_weights(tmp_path):
    """get(name, rows): experts of a stacked [E, O, I] weight with their own scales, rows of one
    matrix (dequantized whole, since blocks span rows); both equal the per-block reference."""
    g = torch.Generator().manual_seed(0)
    parts = [quantized(torch.randn(20, 12, generator=g), BLOCK) for _ in range(4)]
    stacked, scales = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    src = _checkpoint(tmp_path / "src", {"e.weight": stacked, "e.weight_scale_inv": scales,
                                         "w.weight": parts[0][0], "w.weight_scale_inv": parts[0][1]}, FP8)  # fmt: skip
    ckpt = _open(src)
    assert ckpt.keys() == ["e.weight", "w.weight"] and "e.weight_scale_inv" not in ckpt
    for rows in (range(1, 3), range(0, 4), range(3, 4)):
        got = ckpt.get("e.weight", rows)
        for i, e in enumerate(rows):
            assert torch.equal(got[i], per_block(*parts[e], BLOCK)), (rows, e)
    assert torch.equal(ckpt.get("w.weight", range(5, 17)), per_block(*parts[0], BLOCK)[5:17])
    assert ckpt.get("e.weight", range(1, 3)).shape == (2, 20, 12)
    with pytest.raises(CheckpointError, match="cannot read rows"):
        ckpt.get("e.weight", range(2, 6))
    with pytest.raises(CheckpointError, match="is not in the checkpoint"):
        ckpt.get("e.weight_scale_inv")
    meta = ckpt.with_shapes_only()
    assert (
        meta.get("e.weight", range(1, 3)).shape == (2, 20, 12) and meta.get("e.weight").dtype == torch.float32
    )
    assert meta.get("e.weight").device.type == "meta"


def test_a_padded_compressed_tensors_weight_has_its_original_shape_from_the_headers_too(tmp_path):
    """llm-compressor stores block weights padded to whole blocks, with `weight_shape_original`:
    the plain shape is that one, read, dequantized and from a shapes-only checkpoint alike."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=g)
    q, s = quantized(w, BLOCK)
    quantization = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": list(BLOCK)}}}}  # fmt: skip
    src = _checkpoint(tmp_path / "src", {"w.weight": q, "w.weight_scale": s,
                                         "w.weight_shape_original": torch.tensor([27, 13])}, quantization)  # fmt: skip
    ckpt = _open(src)
    assert ckpt.keys() == ["w.weight"] and ckpt.shape("w.weight") == (27, 13)
    assert torch.equal(ckpt.get("w.weight"), per_block(q, s, BLOCK)[:27, :13])
    assert ckpt.with_shapes_only().get("w.weight").shape == (27, 13)


def test_what_would_be_misread_is_refused_when_the_checkpoint_opens(tmp_path):
    """Packed FP4 (an int8 weight with a scale), a float8 weight without scales, nonzero zero points:
    refused by name before anything is read; other quantizations are refused by open_checkpoint."""
    q, s = quantized(torch.randn(20, 12), BLOCK)
    cases = [
        ({"w.weight": torch.zeros(20, 6, dtype=torch.int8), "w.weight_scale_inv": s}, "stored as torch.int8"),
        ({"w.weight": q}, "float8 but has no w.weight_scale_inv"),
    ]
    for i, (tensors, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            _open(_checkpoint(tmp_path / str(i), tensors, FP8))
    channel = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}  # fmt: skip
    qc, sc = quantized(torch.randn(20, 12), (1, 12))
    zero = _checkpoint(
        tmp_path / "zero",
        {"w.weight": qc, "w.weight_scale": sc, "w.weight_zero_point": torch.ones(20, 1)},
        channel,
    )
    with pytest.raises(CheckpointError, match="nonzero w.weight_zero_point"):
        _open(zero, shapes_only=True)
    build("qwen3_moe").save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    for quantization in ({"quant_method": "gptq", "bits": 4}, "fp8"):
        (tmp_path / "plain" / "config.json").write_text(
            json.dumps(config | {"quantization_config": quantization})
        )
        with pytest.raises(
            CheckpointError, match="describes a quantized checkpoint .*moelab reads plain weights and float8"
        ):
            open_checkpoint(tmp_path / "plain")
