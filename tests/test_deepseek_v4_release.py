"""DeepSeek-V4's releases as shipped (DeepSeek-V4-Flash): FP8 weights with their scales under
`<module>.scale` (ue8m0 or float32), FP4-packed routed experts (`expert_dtype: "fp4"`), the
compressor's and indexer's unscaled projections; read as plain weights (`Float8Checkpoint`) and
checked against what transformers computes after its own dequantization on the CPU: each MoE
layer's view, the layer-by-layer run, REAP through `compress` and offloaded decoding."""

from __future__ import annotations

import json
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

from moelab.compress import compress
from moelab.hf import CheckpointError, LayerEdit, open_checkpoint, write_checkpoint
from moelab.hf.adapters import resolve
from moelab.hf.dequantize import dequantize_checkpoint
from moelab.hf.edit import moe_output
from moelab.hf.float8 import Float8Checkpoint, dequantized
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


def test_keep_quantized_refuses_fp4_experts_before_any_work(releases, tmp_path):
    """keep_quantized cannot write FP4 experts back: refused, by the writer and by `compress` before
    it calibrates, naming the fix."""
    path, _, _ = releases("e8m0")
    with pytest.raises(ValueError, match="FP4"):
        write_checkpoint(path, tmp_path / "out", {i: LayerEdit.keep([0, 1, 2, 3]) for i in (0, 1)}, keep_quantized=True, quiet=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="FP4"):  # compress refuses before it calibrates
        compress(path, tmp_path / "c", method="reap", ratio=0.5, calib_options=SMALL, keep_quantized=True, quiet=True)
    assert not (tmp_path / "c").exists()


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
