"""Float8 releases read directly (`moelab.hf.float8.Float8Checkpoint`): a block-wise FP8 checkpoint
reads, calibrates, compresses and offloads exactly as its dequantized copy does, its weights are
the ones transformers dequantizes, and the reader's slices, shapes and refusals hold on hand-made
files."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import build
from hypothesis import given, settings
from hypothesis import strategies as st
from quantized_tiny import (
    BLOCK,
    compressed_tensors_release,
    fp8_release,
    offloaded_tokens,
    per_block,
    quantized,
)
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from moelab.compress import CalibrationOptions, calibrate, compress
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.eval.evaluate import parameter_counts
from moelab.hf import (
    CheckpointError,
    LayerEdit,
    MoELayerView,
    drop_experts,
    open_checkpoint,
    write_checkpoint,
)
from moelab.hf.dequantize import dequantize_checkpoint
from moelab.hf.edit import apply_edit
from moelab.hf.float8 import Float8Checkpoint, dequantized, float8_scheme, quantize
from moelab.hf.loading import load_causal_lm

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
        wider = (
            {"moe_intermediate_size": 32} if family == "qwen3_moe" else {}
        )  # narrowed to whole blocks below
        build(family, vocab_size=8192, **wider).save_pretrained(root / family)
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
        assert set(a._checkpoint.keys()) == set(b._checkpoint.keys())  # the same names, in any order
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


@pytest.mark.parametrize(
    "family", [f if f == "deepseek_v3" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)  # the other releases' layouts: with the slow tests
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
    assert torch.equal(*offloaded_tokens(releases[family]))


def test_importing_an_fp8_mixtral(tmp_path):
    """`moelab import` of a Mixtral FP8 release: the moelab checkpoint holds the bf16 weights the
    dequantized copy holds, and its check against transformers' reading of the release passes."""
    from moelab.hf.conversion import import_checkpoint

    build("mixtral", intermediate_size=32).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    fp8_release(tmp_path / "plain", tmp_path / "fp8", dtype="bfloat16")
    dequantize_checkpoint(tmp_path / "fp8", tmp_path / "dequantized", quiet=True)
    import_checkpoint(tmp_path / "fp8", tmp_path / "a", quiet=True)
    import_checkpoint(tmp_path / "dequantized", tmp_path / "b", quiet=True)
    _same_files(tmp_path / "a", tmp_path / "b")
    assert {t.dtype for t in _tensors(tmp_path / "a").values()} == {torch.bfloat16}


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
    for quantization, message in (
        (
            {"quant_method": "gptq", "bits": 4},
            "describes a quantized checkpoint .*moelab reads plain weights, float8 ones",
        ),
        ("fp8", "quantization_config is 'fp8'; transformers and moelab read an object with a quant_method"),
    ):
        (tmp_path / "plain" / "config.json").write_text(
            json.dumps(config | {"quantization_config": quantization})
        )
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(tmp_path / "plain")


def test_a_scale_that_cannot_be_read_is_refused_by_name_when_the_checkpoint_opens(tmp_path):
    """A scale of another shape than the weight's blocks, or of an integer dtype other than ue8m0
    bytes, is refused from the headers (shapes_only too), naming the weight and its scale: not
    when the weight is first decoded, hours into a calibration. One scale for a whole weight reads
    as [1], [] or [1, 1]; stacked weights take one grid per matrix."""
    q, s = quantized(torch.randn(20, 12), BLOCK)  # scales [2, 2]
    cases = {
        "rows": ({"w.weight": q, "w.weight_scale_inv": s[:1]}, r"\[1, 2\] do not tile w.weight \[20, 12\] .*expected \[2, 2\]"),
        "columns": ({"w.weight": q, "w.weight_scale_inv": s[:, :1].contiguous()}, r"\[2, 1\] do not tile"),
        "stacked": ({"w.weight": torch.stack([q, q]), "w.weight_scale_inv": s}, r"\[2, 2\] do not tile w.weight \[2, 20, 12\]"),
        "int": ({"w.weight": q, "w.weight_scale_inv": s.to(torch.int32)}, "w.weight_scale_inv is torch.int32"),
        "vector": ({"w.weight": q[0], "w.weight_scale_inv": s[0, :1]}, r"w.weight is a float8 tensor of shape \[12\]"),
    }
    for name, (tensors, message) in cases.items():
        directory = _checkpoint(tmp_path / name, tensors, FP8)
        for shapes_only in (True, False):
            with pytest.raises(CheckpointError, match=message):
                _open(directory, shapes_only=shapes_only)
    one = quantized(torch.randn(12, 6), BLOCK)  # a single block
    for i, stored in enumerate((one[1].reshape(1), one[1].reshape(()), one[1])):
        with _open(_checkpoint(tmp_path / f"one{i}", {"w.weight": one[0], "w.weight_scale_inv": stored}, FP8)) as ckpt:
            assert torch.equal(ckpt.get("w.weight"), per_block(*one, BLOCK))
    stacked = {"w.weight": torch.stack([q, q]), "w.weight_scale_inv": torch.stack([s, 2 * s])}
    with _open(_checkpoint(tmp_path / "stacked_ok", stacked, FP8)) as ckpt:
        assert torch.equal(ckpt.get("w.weight", range(1, 2))[0], per_block(q, 2 * s, BLOCK))


# ----------------------------------------------------------------------------- writing float8 (keep_quantized)


@settings(max_examples=25, deadline=None)
@given(O=st.integers(1, 40), I=st.integers(1, 40), bo=st.integers(1, 16), bi=st.integers(1, 16), seed=st.integers(0, 99),
       zero=st.booleans())  # fmt: skip
def test_quantize_equals_the_per_block_loop(O, I, bo, bi, seed, zero):
    """amax / 448 per block, as the releases' quantizers (the loop in quantized_tiny); an all-zero block
    gets scale 1, and dequantizing gives w back to float8's precision."""
    w = torch.randn(O, I, generator=torch.Generator().manual_seed(seed))
    if zero:
        w[:bo, :bi] = 0
    q, scales = quantize(w, (bo, bi))
    want_q, want_scales = quantized(w, (bo, bi))
    if zero:
        assert scales[0, 0] == 1 and not q[:bo, :bi].float().any()
        want_scales[0, 0] = 1
    assert torch.equal(scales, want_scales) and torch.equal(q.float(), want_q.float())
    back = dequantized(q, scales, (bo, bi))
    step = (
        scales.repeat_interleave(bo, 0)[:O].repeat_interleave(bi, 1)[:, :I] * 2**-9
    )  # e4m3's subnormal step
    assert ((back - w).abs() <= w.abs() * 2**-4 + step).all()  # 3 mantissa bits, or a subnormal step


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_quantize_divides_by_the_scale_it_stores_rounded_up(scale_dtype):
    """A bf16/fp16 scale (as some releases store them) is amax / 448 rounded UP to that dtype, and
    every entry is its float8 rounding of w / the stored scale (a per-entry loop): so dequantizing
    the stored bytes gives w back to float8's precision, with no block biased by the scale's own
    rounding (up to 2 ** -9 in bf16, before: the scale was rounded after quantizing), none past
    448, and fp16 scales that do not underflow to 0 (a block of 1e-9s). Overflow is refused."""
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 3
    w[4:, :4] = 1e-9
    q, scales = quantize(w, (2, 4), scale_dtype=scale_dtype)
    assert scales.dtype == scale_dtype and (scales > 0).all()
    amax = w.abs().reshape(3, 2, 2, 4).amax(dim=(1, 3))
    smaller = torch.nextafter(scales, scales.new_tensor(0.0)).float()
    assert (scales.float() >= amax / 448).all() and (smaller < amax / 448).all()
    for o in range(6):
        for i in range(8):
            want = (w[o, i] / scales[o // 2, i // 4].float()).to(torch.float8_e4m3fn)
            assert q[o, i].float() == want.float(), (o, i)
    back = dequantized(q, scales, (2, 4))
    assert ((back - w).abs() <= w.abs() * 2**-4 + 1e-12).all()
    with pytest.raises(ValueError, match="needs a scale beyond torch.float16's range"):
        quantize(torch.full((2, 2), 1e9), (2, 2), scale_dtype=torch.float16)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_gives_a_block_of_subnormal_entries_a_positive_scale_and_refuses_nan(scale_dtype):
    """A block whose largest |entry| is under 448 * 2 ** -149 (float32 subnormals, as bf16 weights
    can hold) needs a scale below float32's: it gets the smallest normal one (its entries round to
    about 0), not 0 (before: amax / 448 underflowed to 0, and 0 / 0 wrote NaN weights). A
    non-finite entry is named as such, not as a scale out of range."""
    w = torch.zeros(2, 8)
    w[0, 0], w[1, 1], w[0, 5] = 1e-44, -2e-43, 1.0
    q, scales = quantize(w, (2, 4), scale_dtype=scale_dtype)
    assert (scales > 0).all() and torch.isfinite(scales).all() and not q.float().isnan().any()
    assert q.float()[:, 4:].abs().max() == 448  # the block beside it as before
    assert (dequantized(q, scales, (2, 4)) - w).abs().max() <= 2**-4
    w[1, 6] = float("nan")  # before: its block got the scale 1 (nan > 0 is false) and NaN weights
    with pytest.raises(ValueError, match="a non-finite entry"):
        quantize(w, (2, 4), scale_dtype=scale_dtype)


def _stored(directory):
    """{name: (safetensors dtype, its bytes)}: what the files hold."""
    from moelab.hf.checkpoint import Checkpoint

    with Checkpoint(directory) as ckpt:
        return {k: (ckpt.raw(k).dtype, ckpt.get(k).reshape(-1).view(torch.uint8)) for k in ckpt.keys()}


def test_pruning_with_keep_quantized_copies_the_kept_experts_bytes_and_scales(releases, tmp_path):
    """Dropped experts go with their scales; each kept expert's float8 weights and scales are the
    source's bytes under its new number; every other tensor (scales included) is copied; config.json
    keeps its quantization_config; and the output reads as the plain output does."""
    fp8, _ = releases["qwen3_moe"]
    kept = drop_experts(fp8, tmp_path / "kept", {1: [0, 2]}, keep_quantized=True, quiet=True)
    plain = drop_experts(fp8, tmp_path / "plain", {1: [0, 2]}, quiet=True)
    source, written = _stored(fp8), _stored(kept)
    renumber = {"experts.0.": "experts.1.", "experts.1.": "experts.3."}  # new -> original, in layer 1
    for key, (dtype, data) in written.items():
        original = key
        if key.startswith("model.layers.1.mlp.experts."):
            original = next(key.replace(new, old) for new, old in renumber.items() if new in key)
        if key != "model.layers.1.mlp.gate.weight":
            assert source[original][0] == dtype and torch.equal(source[original][1], data), key
    experts = [k for k in written if k.startswith("model.layers.1.mlp.experts.")]
    assert len(experts) == 2 * 3 * 2 and sum(k.endswith("_scale_inv") for k in experts) == 2 * 3
    assert json.loads((kept / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    a, b = open_checkpoint(kept), open_checkpoint(plain)
    try:
        for part in ("gate", "up", "down"):
            assert torch.equal(getattr(a.layer(1).experts, part), getattr(b.layer(1).experts, part))
    finally:
        a.close(), b.close()


def test_merging_and_narrowing_with_keep_quantized_quantize_the_new_experts(releases, tmp_path):
    """HC-SMoE's merged experts and HEAPr's narrowed ones are quantized in the source's 16 x 8 blocks:
    what the output reads is the plain output's weights to float8's precision, each layer passed
    the writer's check against the quantized weights and transformers reloaded the float8 files; a
    ratio whose width is not whole blocks narrows to the nearest width that is (16 x 8 blocks: 16)."""
    import dataclasses

    fp8, _ = releases["qwen3_moe"]
    options = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",))
    stats = calibrate(fp8, tmp_path / "stats", options=options, quiet=True).directory
    for method, ratio in (("hc_smoe", 0.5), ("heapr", 0.5)):
        kept = tmp_path / f"{method}_kept"
        compress(fp8, kept, method=method, ratio=ratio, stats=stats, keep_quantized=True, quiet=True)
        compress(fp8, tmp_path / method, method=method, ratio=ratio, stats=stats, quiet=True)
        files = _tensors(kept)
        experts = [k for k in files if ".mlp.experts." in k and k.endswith("proj.weight")]
        assert experts and all(
            files[k].dtype == torch.float8_e4m3fn and k + "_scale_inv" in files for k in experts
        )
        a, b = open_checkpoint(kept), open_checkpoint(tmp_path / method)
        try:
            for part in ("gate", "up", "down"):
                got, want = (
                    getattr(a.layer(1).experts, part).float(),
                    getattr(b.layer(1).experts, part).float(),
                )
                assert got.shape == want.shape and not torch.equal(got, want), (method, part)
                assert ((got - want).abs() <= want.abs() * 2**-3 + 1e-3 * want.abs().max()).all(), (
                    method,
                    part,
                )
        finally:
            a.close(), b.close()
    report = compress(
        fp8, tmp_path / "odd", method="heapr", ratio=0.25, stats=stats, keep_quantized=True, quiet=True
    )
    assert {entry["notes"]["width"] for entry in report["layers"].values()} == {
        16
    }  # 24 asked for, 32 keeps all
    with open_checkpoint(tmp_path / "odd") as view:
        assert view.layer(1).experts.down.shape[-1] == 16


def test_keep_quantized_refusals(releases, tmp_path, monkeypatch):
    """A plain source; experts stacked in one tensor (read, but written as plain weights only); new
    experts from power-of-two scales. compress refuses them before it calibrates."""
    fp8, plain = releases["qwen3_moe"]
    with pytest.raises(ValueError, match="is not one .its weights are plain, or quantized otherwise"):
        drop_experts(plain, tmp_path / "a", [0], keep_quantized=True, quiet=True)
    stacked = tmp_path / "stacked"
    model = build("qwen3_moe", vocab_size=8192)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    tensors = {}
    for key, w in load_file(tmp_path / "fused" / "model.safetensors").items():
        if key.endswith(("gate_up_proj", "down_proj")) and w.dim() == 3:
            parts = [quantized(m, BLOCK) for m in w]
            tensors[key], tensors[key + "_scale_inv"] = (
                torch.stack([p[0] for p in parts]),
                torch.stack([p[1] for p in parts]),
            )
        else:
            tensors[key] = w
    stacked.mkdir()
    save_file(tensors, stacked / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    (stacked / "config.json").write_text(json.dumps(config | {"quantization_config": FP8}))
    with pytest.raises(ValueError, match="stores its experts stacked"):
        drop_experts(stacked, tmp_path / "b", [0], keep_quantized=True, quiet=True)
    import moelab.compress.run

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before refusing keep_quantized")

    monkeypatch.setattr(moelab.compress.run, "_statistics", no_calibration)
    for source, message in (
        (plain, "is not one .its weights are plain"),
        (stacked, "stores its experts stacked"),
    ):
        with pytest.raises(ValueError, match=message):  # before calibrating, which may take hours
            compress(source, tmp_path / "d", method="reap", ratio=0.5, keep_quantized=True, quiet=True)
        assert not list(tmp_path.glob("*d.moelab-staging*")) and not (tmp_path / "d").exists()
    out = drop_experts(
        stacked, tmp_path / "c", [0], quiet=True
    )  # read per expert from the stacked float8 tensor
    view = open_checkpoint(out)
    want = dequantized(
        tensors["model.layers.1.mlp.experts.down_proj"][1:],
        tensors["model.layers.1.mlp.experts.down_proj_scale_inv"][1:],
        BLOCK,
    )
    assert torch.equal(view.layer(1).experts.down, want)
    view.close()


def _variant(release, out, change):
    """A copy of `release` with `change(tensors)` applied to its stored tensors (one file)."""
    from moelab.hf.checkpoint import Checkpoint

    with Checkpoint(release) as ckpt:
        tensors = {k: ckpt.get(k).clone() for k in ckpt.keys()}
    out.mkdir()
    save_file(change(tensors), out / "model.safetensors", metadata={"format": "pt"})
    for path in release.iterdir():
        if path.suffix != ".safetensors" and not path.name.endswith(".index.json"):
            (out / path.name).write_bytes(path.read_bytes())
    return out


def test_merged_experts_take_the_largest_activation_scale_and_need_float_scales(releases, tmp_path):
    """Static activation scales (`activation_scale` beside each float8 weight): a merged expert sees all
    its sources' tokens, so it gets the largest of theirs. Power-of-two scales (F8_E8M0) are copied
    for kept experts, but new experts are refused."""
    fp8, _ = releases["qwen3_moe"]

    def with_input_scales(tensors):
        weights = [k for k in tensors if k.endswith("_scale_inv")]
        for i, key in enumerate(weights):
            tensors[key.removesuffix("weight_scale_inv") + "activation_scale"] = torch.tensor([0.5 + i])
        return tensors

    static = _variant(fp8, tmp_path / "static", with_input_scales)
    config = json.loads((static / "config.json").read_text())
    config["quantization_config"]["activation_scheme"] = "static"
    (static / "config.json").write_text(json.dumps(config))
    stats = calibrate(static, tmp_path / "stats", options=SMALL, quiet=True).directory
    out = tmp_path / "merged"
    compress(static, out, method="hc_smoe", ratio=0.5, stats=stats, keep_quantized=True, quiet=True)
    groups = json.loads((out / "moelab_expert_map.json").read_text())["layers"]["1"]["sources"]
    source, written = load_file(static / "model.safetensors"), _tensors(out)
    assert any(len(g) > 1 for g in groups)
    for j, group in enumerate(groups):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            scales = [source[f"model.layers.1.mlp.experts.{e}.{proj}.activation_scale"] for e in group]
            assert torch.equal(
                written[f"model.layers.1.mlp.experts.{j}.{proj}.activation_scale"], max(scales)
            ), (j, proj)

    def power_of_two_scales(tensors):
        return {k: v.to(torch.float8_e8m0fnu) if k.endswith("_scale_inv") else v for k, v in tensors.items()}

    e8m0 = _variant(fp8, tmp_path / "e8m0", power_of_two_scales)
    drop_experts(e8m0, tmp_path / "pruned", [0], keep_quantized=True, quiet=True)
    stats = calibrate(e8m0, tmp_path / "stats_e8m0", options=SMALL, quiet=True).directory
    with pytest.raises(ValueError, match=r"scales are F8_E8M0 \(powers of two\)"):
        compress(
            e8m0, tmp_path / "m", method="hc_smoe", ratio=0.5, stats=stats, keep_quantized=True, quiet=True
        )


def test_keep_quantized_leaves_out_a_multi_token_prediction_layer_whole(tmp_path):
    """A stored layer past the layer count (DeepSeek-V3's MTP module) is left out with all its
    tensors: weights, their scales, and the kv cache scales on its attention (which the reader
    hides, as no weight's companions); the built layers keep theirs."""
    build("deepseek_v3").to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    ct = compressed_tensors_release(tmp_path / "plain", tmp_path / "ct", "channel", kv_cache=True)

    def with_mtp(tensors):
        layer = {k: v for k, v in tensors.items() if k.startswith("model.layers.1.")}
        return tensors | {
            k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in layer.items()
        }

    source = _variant(ct, tmp_path / "mtp", with_mtp)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    with pytest.warns(UserWarning, match="stored layers model.layers.2. "):
        out = drop_experts(source, tmp_path / "out", [0, 4], keep_quantized=True, reload=False, quiet=True)
    written = _tensors(out)
    assert not [k for k in written if k.startswith("model.layers.2.")]
    kept = {f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("k_scale", "v_scale")}
    assert kept <= written.keys()


def test_keep_quantized_refuses_new_experts_of_padded_weights_naming_the_way_out(tmp_path):
    """llm-compressor's block weights padded to whole blocks (`weight_shape_original`): kept experts
    are copied with it, a merged expert is refused with what to do instead."""
    build("qwen3_moe", moe_intermediate_size=24).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    source = compressed_tensors_release(tmp_path / "plain", tmp_path / "ct", "block", block=(16, 16))
    out = drop_experts(source, tmp_path / "kept", {1: [0, 2]}, keep_quantized=True, reload=False, quiet=True)
    assert torch.equal(
        _tensors(out)["model.layers.1.mlp.experts.0.down_proj.weight_shape_original"], torch.tensor([32, 24])
    )
    # transformers loads compressed-tensors only with that package, which this environment lacks: the
    # reload check says so, rather than blaming the source
    with pytest.raises(CheckpointError, match=r"reload check cannot run here: .*ImportError.*reload=False"):
        drop_experts(source, tmp_path / "checked", [0], keep_quantized=True, quiet=True)
    assert not (tmp_path / "checked").exists()
    with open_checkpoint(source) as view:
        layer = view.layer(1)
    edit = LayerEdit(((0, 1), (2,), (3,)), view=apply_edit(layer, LayerEdit.keep([0, 2, 3])))
    with pytest.raises(
        ValueError, match=r"weight_shape_original.*write plain weights \(without keep_quantized\)"
    ):
        write_checkpoint(
            source, tmp_path / "merged", {1: edit}, keep_quantized=True, reload=False, quiet=True
        )


def test_opening_reads_each_shard_header_once_however_the_index_interleaves_them(tmp_path, monkeypatch):
    """DeepSeek-V3's release has 163 shards and the index lists names alphabetically, not by shard:
    finding the float8 weights and scales reads the shard headers, never a shard per name."""
    import moelab.hf.checkpoint as module

    q, s = quantized(torch.randn(16, 8), BLOCK)
    shards = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    for i, shard in enumerate(shards):  # expert e's weight in shard e % 4, its scale in the next one
        tensors = {f"e.{e}.weight": q.clone() for e in range(i, 40, 4)}
        tensors |= {f"e.{e}.weight_scale_inv": s.clone() for e in range((i - 1) % 4, 40, 4)}
        save_file(tensors, src / shard)
        weight_map |= dict.fromkeys(tensors, shard)
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict(sorted(weight_map.items()))})
    )
    (src / "config.json").write_text(json.dumps({"quantization_config": FP8}))
    opened = []
    safe_open = module._safe_open
    monkeypatch.setattr(module, "_safe_open", lambda path: opened.append(path) or safe_open(path))
    ckpt = _open(src)
    assert len(ckpt.keys()) == 40 and len(opened) <= len(shards)
    # a shapes-only twin (the offloaded model makes one per layer) reads no shard or header again
    headers = []
    read_header = module._read_header
    monkeypatch.setattr(module, "_read_header", lambda path: headers.append(path) or read_header(path))
    ckpt.get("e.3.weight")
    twin, opened[:] = ckpt.with_shapes_only(), []
    assert [twin.get(k).shape for k in twin.keys()] == [(16, 8)] * 40 and opened == headers == []
    twin.close()
    assert torch.equal(ckpt.get("e.3.weight"), per_block(q, s, BLOCK))


def test_the_benchmark_generates_an_fp8_release_of_the_same_model(tmp_path, monkeypatch):
    """`moelab bench compress --fp8`: the same random model as the bf16 checkpoint, its projections
    float8 with 128 x 128 block scales (here on a small shape), read back within float8's precision."""
    from moelab.bench import compress as bench

    small = dict(bench.SHAPES["qwen3_moe"], hidden_size=256, moe_intermediate_size=64, num_experts=4,
                 num_experts_per_tok=2, intermediate_size=128, num_attention_heads=4, head_dim=64)  # fmt: skip
    monkeypatch.setitem(bench.SHAPES, "qwen3_moe", small)
    plain = bench.make_checkpoint(tmp_path / "bf16", "qwen3_moe", 0.01)
    fp8 = bench.make_checkpoint(tmp_path / "fp8", "qwen3_moe", 0.01, fp8=True)
    assert fp8["layers"] == plain["layers"] and fp8["bytes"] < plain["bytes"]
    assert plain["bytes"] == bench.checkpoint_plan("qwen3_moe", 0.01)[1], "the size announced is the size written"
    a, b = open_checkpoint(tmp_path / "fp8"), open_checkpoint(tmp_path / "bf16")
    try:
        assert isinstance(
            a._checkpoint, Float8Checkpoint
        )  # experts one module each, as the releases store them
        stored = _tensors(tmp_path / "fp8")
        assert stored["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
        assert stored["model.layers.0.mlp.experts.0.up_proj.weight_scale_inv"].shape == (
            1,
            2,
        )  # [64, 256] in 128 x 128
        got, want = a.layer(0).experts.up.float(), b.layer(0).experts.up.float()
        assert ((got - want).abs() <= want.abs() * 2**-3 + 2**-9 * want.abs().max()).all()
    finally:
        a.close(), b.close()


def test_the_width_keep_quantized_narrows_in_is_every_edited_layer_s_block(tmp_path):
    """The narrowed width must be whole blocks in every MoE layer whose experts are float8, not
    only in the first one (before: a release whose first MoE layer kept its experts in bf16, as an
    llm-compressor ignore list does, got no alignment, and the writer refused the width after
    calibrating)."""
    from moelab.hf.requantize import check_keep_quantized

    build("qwen3_moe", num_hidden_layers=3, moe_intermediate_size=32).save_pretrained(tmp_path / "plain")
    stored = fp8_release(tmp_path / "plain", tmp_path / "fp8")
    assert check_keep_quantized(tmp_path / "fp8") == 16  # gate and up rows: blocks of 16; down columns: 8

    def first_layer_plain(tensors):
        experts = "model.layers.1.mlp.experts."
        out = {k: v for k, v in tensors.items() if not (k.startswith(experts) and k.endswith("_scale_inv"))}
        for key in out:
            if key.startswith(experts):
                out[key] = per_block(stored[key], stored[key + "_scale_inv"], BLOCK).to(torch.bfloat16)
        return out

    mixed = _variant(tmp_path / "fp8", tmp_path / "mixed", first_layer_plain)
    assert check_keep_quantized(mixed) == 16
    assert check_keep_quantized(mixed, [1]) == 1  # the bf16 layer alone: any width


@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_keep_quantized_checks_no_expert_was_left_plain(releases, tmp_path, monkeypatch, family):
    """The postcondition against a quantizer that silently skips experts: were the edited layer's
    experts written plain (here, the quantizing step stood in for by one that does nothing), the
    write fails naming them, and nothing is published."""
    import moelab.hf.writer as writer

    monkeypatch.setattr(writer, "quantized_experts", lambda ckpt, layout, prefix, edited, edit: (edited, {}))
    with pytest.raises(
        CheckpointError, match=r"layer 1's expert weights .*experts.0.gate_proj.weight.* are stored plain"
    ):
        drop_experts(
            releases[family][0], tmp_path / "out", [0], keep_quantized=True, reload=False, quiet=True
        )
    assert not (tmp_path / "out").exists()


def test_keep_quantized_refuses_a_layer_whose_experts_are_stored_in_two_formats(releases, tmp_path):
    """A layer with some experts float8 and others plain (transformers loads neither that source nor
    such an output: it stacks a layer's experts in one format), or one expert without the activation
    scale the others have: keep_quantized refuses it up front, naming the weights, whether the odd
    expert is kept or dropped (not a postcondition failure blamed on moelab after the work, a merged
    expert written plain because its first source was, or one without an activation scale); plain
    writing reads it as it is."""
    fp8, _ = releases["qwen3_moe"]
    with open_checkpoint(releases["qwen3_moe"][1]) as view:
        plain_down = view.layer(1).experts.down[2].clone()

    def expert_2_plain(tensors):
        del tensors["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"]
        return tensors | {"model.layers.1.mlp.experts.2.down_proj.weight": plain_down}

    mixed = _variant(fp8, tmp_path / "mixed", expert_2_plain)
    for dropped in ([0], [2]):
        with pytest.raises(
            ValueError,
            match=r"layer 1 stores .*experts.0.down_proj.weight quantized but .*experts.2.down_proj.weight plain",
        ):
            drop_experts(mixed, tmp_path / "out", {1: dropped}, keep_quantized=True, reload=False, quiet=True)
        assert not (tmp_path / "out").exists()
    out = drop_experts(mixed, tmp_path / "plain", {1: [0, 3]}, reload=False, quiet=True)
    with open_checkpoint(out) as view:
        assert torch.equal(view.layer(1).experts.down[1], plain_down)

    def one_activation_scale_missing(tensors):
        for key in [k for k in tensors if k.endswith("_scale_inv") and k != "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]:
            tensors[key.removesuffix("weight_scale_inv") + "activation_scale"] = torch.tensor([0.5])
        return tensors

    static = _variant(fp8, tmp_path / "static", one_activation_scale_missing)
    with pytest.raises(
        ValueError, match=r"experts.3.up_proj.weight is stored with \['weight', 'weight_scale_inv'\], but .*experts.0"
    ):
        drop_experts(static, tmp_path / "out", {1: [0]}, keep_quantized=True, reload=False, quiet=True)
