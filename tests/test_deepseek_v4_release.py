"""DeepSeek-V4's releases as shipped (DeepSeek-V4-Flash): FP8 weights with their scales under
`<module>.scale` (ue8m0 or float32), FP4-packed routed experts (`expert_dtype: "fp4"`), the
compressor's and indexer's unscaled projections; read as plain weights (`Float8Checkpoint`) and
checked against what transformers computes after its own dequantization on the CPU: each MoE
layer's view, the layer-by-layer run, REAP through `compress` and offloaded decoding; and written
back with keep_quantized (FP4 experts kept as FP4, new ones quantized by `quantize_fp4`)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from hf_tiny import D, build, load
from quantized_tiny import BLOCK, deepseek_v4_fp4, deepseek_v4_release, fp4_quantized, per_block
from safetensors.torch import load_file, save_file
from test_compress import SMALL, TOKENIZER_DIR
from test_deepseek_v4 import _as_released
from test_layerwise import assert_layers_are_transformers
from transformers import PreTrainedTokenizerFast

from moelab.compress import calibrate, compress
from moelab.hf import CheckpointError, LayerEdit, open_checkpoint, write_checkpoint
from moelab.hf.adapters import resolve
from moelab.hf.dequantize import dequantize_checkpoint
from moelab.hf.edit import moe_output
from moelab.hf.float8 import Float8Checkpoint, dequantized, fp4_scales, quantize_fp4
from moelab.hf.requantize import check_keep_quantized, quantized_experts
from moelab.offload import load_offloaded

pytestmark = pytest.mark.usefixtures("one_thread")
EXPERT = "layers.1.ffn.experts.3.w2.weight"  # [hidden, moe_intermediate_size]: 32 columns, one FP4 group


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny DeepSeek-V4 (layer 0 hash-routed, layer 1 routed by its gate; experts 32 wide, as FP4
    needs whole groups of 32 columns) saved with the release's names, and its tokenizer."""
    path = tmp_path_factory.mktemp("v4") / "plain"
    build("deepseek_v4", mlp_layer_types=["hash_moe", "moe"], moe_intermediate_size=32, vocab_size=8192).save_pretrained(path)
    _as_released(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def releases(plain, tmp_path_factory):
    """{scales: (release directory, its stored tensors, transformers' model of it)}, made once each."""
    made = {}

    def release(scales: str):
        if scales not in made:
            out = tmp_path_factory.mktemp("release") / scales
            stored = deepseek_v4_release(plain, out, scales)
            made[scales] = (out, stored, load(out))
        return made[scales]

    return release


def test_fp4_and_fp8_weights_decode_as_stored(plain, tmp_path):
    """The checkpoint lists plain names only (no `.scale`); an FP4 expert reads as the per-value
    reference of its nibbles (the low one first) times its ue8m0 scale, an FP8 weight as its
    blocks times theirs; the compressor's unscaled weights as stored."""
    out = tmp_path / "release"
    stored = deepseek_v4_release(plain, out, "bytes", fp8_scales="e8m0")
    config = json.loads((out / "config.json").read_text())
    _, ckpt, _ = resolve(out)
    with ckpt:
        assert isinstance(ckpt, Float8Checkpoint) and ckpt.scheme.fp4
        assert not [k for k in ckpt.keys() if k.endswith(".scale")] and "hc_head_scale" in ckpt.keys()
        assert ckpt.is_fp4(EXPERT) and ckpt.shape(EXPERT) == (D, 32) and ckpt.block(EXPERT) == (1, 32)
        scales = (stored[EXPERT.removesuffix("weight") + "scale"].float() - 127).exp2()
        torch.testing.assert_close(ckpt.get(EXPERT), deepseek_v4_fp4(stored[EXPERT], scales), atol=0, rtol=0)
        wq = "layers.0.attn.wq_a.weight"
        expected = per_block(stored[wq], stored["layers.0.attn.wq_a.scale"].float(), BLOCK)
        torch.testing.assert_close(ckpt.get(wq), expected, atol=0, rtol=0)
        plain_weight = "layers.1.attn.indexer.compressor.wkv.weight"
        assert torch.equal(ckpt.get(plain_weight), stored[plain_weight])
    assert config["expert_dtype"] == "fp4" and "expert_dtype" not in config["quantization_config"]


def test_fp4_packing_round_trips_the_representable_values():
    """Every e2m1 value times a power of two comes back exactly, in rows of whole groups."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, 6.0])
    w = torch.cat([values, values.flip(0)]).repeat(3, 2) * torch.tensor([[0.25], [1.0], [8.0]])
    packed, scales = fp4_quantized(w, ue8m0=True)
    assert packed.dtype == torch.int8 and packed.shape == (3, 32)
    torch.testing.assert_close(dequantized(packed, scales, (1, 32)), w, atol=0, rtol=0)


def _block(model, index, x, ids):
    with torch.no_grad():
        return model.model.layers[index].mlp(x, input_ids=ids)


@pytest.mark.parametrize("scales", ["e8m0", "float"])
def test_the_release_reads_as_transformers_dequantizes_it(releases, scales):
    """transformers loads the release on the CPU (dequantized); each MoE layer's view computes its
    block on the same tokens, the layer-by-layer run its decoder layers."""
    path, _, model = releases(scales)
    torch.manual_seed(1)
    ids = torch.randint(0, 8192, (2, 7))
    with open_checkpoint(path) as view:
        for index in (0, 1):
            layer = view.layer(index)
            x = torch.randn(2, 7, D)
            got = moe_output(layer, x.reshape(-1, D), ids=ids.reshape(-1)).float().view_as(x)
            torch.testing.assert_close(got, _block(model, index, x, ids), atol=1e-5, rtol=1e-5)
    assert_layers_are_transformers(path, model, [ids, torch.randint(0, 8192, (1, 5))])


def test_offloaded_decoding_is_transformers(releases):
    path, _, model = releases("e8m0")
    prompt = torch.randint(3, 8192, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    offloaded = load_offloaded(path, resident=0.5, dtype=torch.float32)
    try:
        assert torch.equal(offloaded.generate(prompt, 6), expected)
    finally:
        offloaded.close()


def test_reap_writes_the_release_plain(releases, tmp_path):
    """REAP through `compress`: the writer's checks pass (each layer against the masked original,
    strict reload); the output is plain (no quantization_config, no scales)."""
    path, _, _ = releases("e8m0")
    report = compress(path, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["complete"] and sorted(report["layers"]) == ["0", "1"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and "expert_dtype" not in config
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert not [k for k in tensors if k.endswith(".scale")] and tensors[EXPERT].dtype == torch.float32


def test_dequantize_writes_what_transformers_dequantizes(releases, tmp_path):
    """`moelab dequantize`'s plain copy is what transformers loads from the release (its logits)."""
    path, _, model = releases("float")
    dequantize_checkpoint(path, tmp_path / "plain", dtype=torch.float32, quiet=True)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config and "expert_dtype" not in config
    ids = torch.randint(0, 8192, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "plain")(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1's, codes 0-7; the sign is bit 3


def naive_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for `quantize_fp4`, one value at a time in Python floats: per row per 32 columns
    the exponent e of the smallest power of two with amax / 2 ** e <= 6 (from 2 ** -127 up), each
    value the nearest e2m1 magnitude of |w| / 2 ** e, a tie to the even code, the sign bit set
    where w < 0 (so a small negative value is -0, code 8); codes packed two a byte, low nibble first.
    Returns (packed uint8 [O, I / 2], exponents + 127 uint8 [O, I / 32])."""
    O, I = w.shape
    codes, exponents = [[0] * I for _ in range(O)], [[0] * (I // 32) for _ in range(O)]
    for i in range(O):
        for g in range(I // 32):
            group = [float(v) for v in w[i, 32 * g : 32 * (g + 1)]]
            e = -127
            while max(abs(v) for v in group) > 6 * 2.0**e:
                e += 1
            exponents[i][g] = e + 127
            for k, v in enumerate(group):
                x = abs(v) / 2.0**e
                code = min(range(8), key=lambda c: (abs(x - MAGNITUDES[c]), c % 2))
                codes[i][32 * g + k] = code | (8 if v < 0 else 0)
    packed = [[codes[i][2 * b] | codes[i][2 * b + 1] << 4 for b in range(I // 2)] for i in range(O)]
    return torch.tensor(packed, dtype=torch.uint8), torch.tensor(exponents, dtype=torch.uint8)


@pytest.mark.parametrize("seed", range(3))
def test_quantize_fp4_is_the_per_value_reference(seed):
    """`quantize_fp4` (GPT-OSS's MXFP4 quantizer on the transposed weight) gives `naive_fp4`'s bytes
    and exponents: random rows over a wide range of magnitudes; a row of exact ties (0.25, 0.75, ...,
    5 times the scale, both signs), one whose amax is exactly 6 times a power of two and one just
    above it, an all-zero group, and tiny negative values (-0); and each scale dtype a release stores
    holds 2 ** (b - 127) exactly (float16 refused)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 64, generator=generator) * torch.exp2(torch.randint(-30, 30, (8, 1), generator=generator).float())
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    w[0] = torch.cat([ties, -ties, ties / 2, -ties / 4] * 2) * 2.0 ** (seed - 3)
    w[1, :32] = torch.linspace(-6, 6, 32) * 2.0**-5  # amax exactly 6 * 2 ** -5: the scale 2 ** -5
    w[1, 32:] = torch.linspace(-1, 1, 32) * torch.nextafter(torch.tensor(6.0), torch.tensor(7.0))
    w[2, :32] = 0
    w[2, 32:] = torch.randn(32, generator=generator).abs() * -1e-3
    w[2, 32] = 5.0
    packed, exponents = quantize_fp4(w)
    want_packed, want_exponents = naive_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (8, 32) and exponents.shape == (8, 2)
    assert torch.equal(exponents, want_exponents)
    assert torch.equal(packed.view(torch.uint8), want_packed)
    assert exponents[1].tolist() == [127 - 5, 127 + 1] and exponents[2, 0] == 0  # 6 * 2 ** -5; just above 6; zeros
    back = dequantized(packed, exponents, (1, 32))
    assert ((back - w).abs() <= torch.exp2(exponents.float() - 127).repeat_interleave(32, 1)).all()  # half of e2m1's widest step, 4 to 6
    for dtype in (torch.uint8, torch.float8_e8m0fnu, torch.float32, torch.bfloat16):
        scales = fp4_scales(exponents, dtype)
        assert scales.dtype == dtype and torch.equal(dequantized(packed, scales, (1, 32)), back), dtype
    with pytest.raises(ValueError, match="cannot hold every FP4 scale"):
        fp4_scales(torch.tensor([[0, 127]], dtype=torch.uint8), torch.float16)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _expert_map(out) -> dict[int, list[list[int]]]:
    layers = json.loads((out / "moelab_expert_map.json").read_text())["layers"]
    return {int(i): layer["sources"] for i, layer in layers.items()}


def _source_name(key: str, sources: dict[int, list[list[int]]]) -> tuple[str, list[int]]:
    """A written tensor's name in the source: an expert's (`layers.N.ffn.experts.J.*`) is named
    after its new expert's first source; with the new expert's sources ([] for other tensors)."""
    if match := re.fullmatch(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(.+)", key):
        layer, j, rest = int(match[1]), int(match[2]), match[3]
        group = sources[layer][j]
        return f"layers.{layer}.ffn.experts.{group[0]}.{rest}", group
    return key, []


def _transformers_blocks_are(model, expected, seed: int = 4) -> None:
    """transformers' MoE block of each layer of `model` computes, on random tokens, what
    expected(index, x [T, D], ids [T]) gives (float64)."""
    generator = torch.Generator().manual_seed(seed)
    for index in (0, 1):
        x, ids = torch.randn(2, 7, D, generator=generator), torch.randint(0, 8192, (2, 7), generator=generator)
        want = expected(index, x.reshape(-1, D), ids.reshape(-1)).float().view_as(x)
        torch.testing.assert_close(_block(model, index, x, ids), want, atol=1e-5, rtol=1e-5, msg=f"layer {index}")


ROUTERS = {f"layers.{i}.ffn.gate.{name}" for i in (0, 1) for name in ("weight", "bias", "tid2eid")}


@pytest.mark.parametrize("scales", ["e8m0", "bytes", "float"])
def test_reap_with_keep_quantized_copies_the_kept_fp4_experts(releases, scales, tmp_path):
    """REAP through `compress` with keep_quantized: each kept expert's FP4 weights and scales are the
    source's bytes (its scale dtype: float8_e8m0fnu, ue8m0 bytes or float32) under its new number,
    every other tensor but the routers' (FP8 weights and their scales, shared experts, norms) is
    copied byte for byte; config.json keeps quantization_config and expert_dtype; the writer's
    checks and transformers' strict reload ran, and transformers' MoE blocks of the output are the
    source's with the dropped experts masked out of routing."""
    path, stored, _ = releases(scales)
    out = tmp_path / "out"
    report = compress(path, out, method="reap", ratio=0.5, calib_options=SMALL, keep_quantized=True, quiet=True)
    assert report["complete"] and report["keep_quantized"] and report["reload_checked"]
    config, source_config = (json.loads((p / "config.json").read_text()) for p in (out, path))
    assert config["quantization_config"] == source_config["quantization_config"] and config["expert_dtype"] == "fp4"
    sources = _expert_map(out)
    assert all(len(group) == 1 for groups in sources.values() for group in groups)
    written = load_file(out / "model.safetensors")
    experts = [k for k in written if ".ffn.experts." in k]
    assert len(experts) == 2 * 4 * 3 * 2  # layers, experts kept, w1/w2/w3, weight and scale
    assert {written[k].dtype for k in experts if k.endswith(".weight")} == {torch.int8}
    assert {written[k].dtype for k in experts if k.endswith(".scale")} == {stored[EXPERT.removesuffix("weight") + "scale"].dtype}
    for key, value in written.items():
        if key not in ROUTERS:
            original, _ = _source_name(key, sources)
            assert value.dtype == stored[original].dtype and torch.equal(_bytes(value), _bytes(stored[original])), key
    with open_checkpoint(path) as view:
        layers = [view.layer(i) for i in (0, 1)]
    kept = {i: [group[0] for group in sources[i]] for i in (0, 1)}
    _transformers_blocks_are(load(out), lambda i, x, ids: moe_output(layers[i], x, kept[i], ids))


@pytest.mark.parametrize("scales", ["e8m0", "bytes", "float"])
def test_merging_with_keep_quantized_quantizes_the_new_fp4_experts(releases, scales, tmp_path):
    """HC-SMoE with keep_quantized and without, from the same statistics: a merged expert's FP4
    weight reads as DeepSeek's FP4 of the plain output's (quantized_tiny's `fp4_quantized` with
    power-of-two scales, a quantizer of its own), its scales those powers of two in the source's
    scale dtype; an expert kept alone is the source's bytes; the FP8 weights are the source's.
    transformers reloads the output (strictly, in the writer) and its MoE blocks compute what
    moelab reads of it, its logits those of moelab's dequantized copy."""
    path, stored, _ = releases(scales)
    stats = calibrate(path, tmp_path / "stats", options=SMALL, quiet=True).directory
    out, plain = tmp_path / "kept", tmp_path / "plain"
    report = compress(path, out, method="hc_smoe", ratio=0.5, stats=stats, keep_quantized=True, quiet=True)
    assert report["complete"] and report["keep_quantized"] and report["reload_checked"]
    compress(path, plain, method="hc_smoe", ratio=0.5, stats=stats, quiet=True)
    sources = _expert_map(out)
    assert sources == _expert_map(plain) and any(len(g) > 1 for groups in sources.values() for g in groups)
    written, plain_tensors = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    scale_dtype = stored[EXPERT.removesuffix("weight") + "scale"].dtype
    merged = 0
    for key, value in written.items():
        original, group = _source_name(key, sources)
        if len(group) < 2:
            if key not in ROUTERS:  # kept experts, their scales and every other tensor: the source's bytes
                assert value.dtype == stored[original].dtype and torch.equal(_bytes(value), _bytes(stored[original])), key
            continue
        if key.endswith(".scale"):
            continue  # with its weight
        scale = written[key.removesuffix("weight") + "scale"]
        want, want_scales = fp4_quantized(plain_tensors[key], ue8m0=True)
        assert value.dtype == torch.int8 and scale.dtype == scale_dtype, key
        assert torch.equal(dequantized(value, scale, (1, 32)), deepseek_v4_fp4(want, want_scales)), key
        assert torch.equal(scale.float() if scale_dtype != torch.uint8 else (scale.float() - 127).exp2(), want_scales), key
        merged += 1
    assert merged and merged % 3 == 0
    model = load(out)
    with open_checkpoint(out) as view:
        layers = [view.layer(i) for i in (0, 1)]
    _transformers_blocks_are(model, lambda i, x, ids: moe_output(layers[i], x, ids=ids))
    dequantize_checkpoint(out, tmp_path / "dequantized", dtype=torch.float32, quiet=True)
    ids = torch.randint(0, 8192, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load(tmp_path / "dequantized")(ids).logits, atol=1e-5, rtol=1e-5)


def test_merging_fp8_experts_with_keep_quantized_keeps_their_scale_names(plain, tmp_path):
    """A DeepSeek-V4 release whose routed experts are FP8 (expert_dtype "fp8", float scales under
    `<module>.scale`): HC-SMoE with keep_quantized quantizes each merged expert as float8 with its
    scale under the source's name (`.scale`, no `weight_scale_inv`); transformers reloads the output
    (strictly, in the writer) and its blocks compute what moelab reads of it."""
    path = tmp_path / "release"
    deepseek_v4_release(plain, path, "float", experts="fp8")
    stats = calibrate(path, tmp_path / "stats", options=SMALL, quiet=True).directory
    report = compress(path, tmp_path / "out", method="hc_smoe", ratio=0.5, stats=stats, keep_quantized=True, quiet=True)
    assert report["complete"] and report["keep_quantized"] and report["reload_checked"]
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not [k for k in written if k.endswith("_scale_inv")]
    experts = [k for k in written if ".ffn.experts." in k and k.endswith(".weight")]
    assert experts and all(written[k].dtype == torch.float8_e4m3fn and k.removesuffix("weight") + "scale" in written for k in experts)
    model = load(tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as view:
        layers = [view.layer(i) for i in (0, 1)]
    _transformers_blocks_are(model, lambda i, x, ids: moe_output(layers[i], x, ids=ids))


def test_heapr_with_keep_quantized_zeroes_fp4_neurons_and_a_narrower_width_is_refused(releases, tmp_path):
    """DeepSeek-V4's shared experts take their width from the routed ones', so HEAPr zeroes neurons
    at full width (layout 'padded'): with keep_quantized the requantized experts hold exact FP4 zeros
    there and the writer's checks pass. A width that is not whole FP4 groups of 32 (w2's columns
    share a scale per 32) is one keep_quantized narrows to (check_keep_quantized: 32), and an edit
    narrowing the experts to 16 is refused (by the writer, as DeepSeek-V4's shared experts cannot
    follow; by the FP4 writing itself, naming the way out); nothing is written."""
    path, stored, _ = releases("e8m0")
    assert check_keep_quantized(path) == 32
    options = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",))
    report = compress(path, tmp_path / "heapr", method="heapr", ratio=0.5, calib_options=options, keep_quantized=True, quiet=True)
    written = load_file(tmp_path / "heapr" / "model.safetensors")
    assert report["complete"] and written[EXPERT].dtype == torch.int8 and written[EXPERT].shape == stored[EXPERT].shape
    with open_checkpoint(tmp_path / "heapr") as view:
        down = view.layer(1).experts.down  # [E, D, I]
    zeroed = (down == 0).all(dim=1)
    assert zeroed.any() and not zeroed.all()
    narrow = lambda t, dim: t.narrow(dim, 0, 16)  # noqa: E731
    edits = {}
    with open_checkpoint(path) as view:
        for index in (0, 1):
            layer = view.layer(index)
            experts = dataclasses.replace(layer.experts, gate=narrow(layer.experts.gate, 1), up=narrow(layer.experts.up, 1),
                                          down=narrow(layer.experts.down, 2))  # fmt: skip
            all_experts = tuple((e,) for e in range(layer.router.num_experts))
            edits[index] = LayerEdit(all_experts, view=dataclasses.replace(layer, experts=experts))
    with pytest.raises(ValueError, match=r"shared experts take their width .* cannot get narrower \(32 -> 16\)"):
        write_checkpoint(path, tmp_path / "narrow", edits, keep_quantized=True, quiet=True)
    assert not (tmp_path / "narrow").exists()
    _, ckpt, family = resolve(path)  # the FP4 writing itself, were a family's width its routed experts' own
    with ckpt, pytest.raises(ValueError, match=r"w2.weight is \[\d+, 16\], its input dim not whole FP4 groups of 32.*multiple of 32"):
        quantized_experts(ckpt, family.layout_of(ckpt, 1).experts, family.prefix(1), edits[1].view, edits[1])


def test_keep_quantized_checks_no_fp4_expert_was_left_plain(releases, tmp_path, monkeypatch):
    """The postcondition against a quantizer that silently skips experts holds for FP4 experts:
    written plain, the write fails naming them."""
    import moelab.hf.writer as writer

    monkeypatch.setattr(writer, "quantized_experts", lambda ckpt, layout, prefix, edited, edit: (edited, {}))
    with pytest.raises(CheckpointError, match=r"layer 0's expert weights layers.0.ffn.experts.0.w1.weight.* are stored plain"):
        write_checkpoint(releases("e8m0")[0], tmp_path / "out", {i: LayerEdit.keep([1, 2, 4, 6]) for i in (0, 1)},
                         keep_quantized=True, quiet=True)  # fmt: skip
    assert not (tmp_path / "out").exists()


def _edited(path, tmp_path, edit) -> None:
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file(edit(tensors), tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_what_moelab_cannot_read_is_refused(releases, tmp_path):
    """Packed int8 experts without expert_dtype "fp4"; a `.scale` beside a weight that is not
    quantized (transformers would multiply it in); an unknown expert_dtype."""
    path, _, _ = releases("e8m0")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "a").mkdir()
    shutil.copytree(path, tmp_path / "a", dirs_exist_ok=True)
    (tmp_path / "a" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "expert_dtype"}))
    with pytest.raises(CheckpointError, match="expert_dtype is not 'fp4'"):
        open_checkpoint(tmp_path / "a")
    _edited(path, tmp_path / "b", lambda t: t | {"layers.0.attn.compressor.wkv.scale": torch.ones(1, 4)})
    with pytest.raises(CheckpointError, match="compressor.wkv.scale, which transformers .* multiplies in"):
        open_checkpoint(tmp_path / "b")
    (tmp_path / "c").mkdir()
    shutil.copytree(path, tmp_path / "c", dirs_exist_ok=True)
    (tmp_path / "c" / "config.json").write_text(json.dumps(config | {"expert_dtype": "fp2"}))
    with pytest.raises(CheckpointError, match="expert_dtype 'fp2'"):
        open_checkpoint(tmp_path / "c")
