"""GPT-OSS's MXFP4 experts read directly (`moelab.hf.mxfp4`): the values transformers' own
dequantization gives, and a release calibrates, compresses, offloads and dequantizes as its plain
copy does."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hf_tiny import build
from hypothesis import given, settings
from hypothesis import strategies as st
from quantized_tiny import offloaded_tokens, released
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moelab.compress import CalibrationOptions, calibrate, compress
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import CheckpointError, LayerEdit, drop_experts, open_checkpoint, write_checkpoint
from moelab.hf.dequantize import dequantize_checkpoint
from moelab.hf.loading import load_causal_lm
from moelab.hf.mxfp4 import FP4_VALUES, Mxfp4Checkpoint, dequantized_mxfp4, quantized_mxfp4

pytestmark = pytest.mark.usefixtures("one_thread")
QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                "model.embed_tokens", "lm_head"]}  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=1),
    rows=st.integers(1, 12),
    groups=st.integers(1, 3),
    low=st.integers(100, 140),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    seed=st.integers(0, 99),
)
def test_the_values_are_transformers_dequantization(lead, rows, groups, low, dtype, seed):
    """Every nibble of the e2m1 table, low nibble first, times 2 ** (scale - 127), transposed."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(low, low + 8, (*lead, rows, groups), dtype=torch.uint8, generator=g)
    ours = dequantized_mxfp4(blocks, scales, dtype)
    if lead:
        assert torch.equal(ours, convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype))
    one = torch.tensor([[[0x21] + [0] * 15]], dtype=torch.uint8)  # 0.5 then 1.0, scale 2 ** 1
    assert dequantized_mxfp4(one, torch.tensor([[128]], dtype=torch.uint8), torch.float32)[
        :2, 0
    ].tolist() == [1.0, 2.0]


def _mxfp4(plain, out):
    """`plain` (a saved GPT-OSS) with its experts' weights replaced by random MXFP4 blocks and scales."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, w in load_file(plain / "model.safetensors").items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, I, O = w.shape  # [E, in, out], as GPT-OSS holds them
            tensors[key + "_blocks"] = torch.randint(
                0, 256, (E, O, I // 32, 16), dtype=torch.uint8, generator=g
            )
            tensors[key + "_scales"] = torch.randint(
                120, 128, (E, O, I // 32), dtype=torch.uint8, generator=g
            )
        else:
            tensors[key] = w
    released(plain, out, tensors, {"quantization_config": QUANTIZATION, "dtype": "bfloat16"})
    return out, tensors


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny GPT-OSS MXFP4 release (experts 32 wide: whole groups of 32), and its dequantized copy."""
    root = tmp_path_factory.mktemp("mxfp4")
    build("gpt_oss", vocab_size=8192, intermediate_size=32).save_pretrained(root / "f32")
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(root / "f32")
    src, tensors = _mxfp4(root / "f32", root / "mxfp4")
    return src, dequantize_checkpoint(src, root / "plain", quiet=True), tensors


def test_a_release_reads_as_transformers_loads_it(release):
    """transformers (accelerate, on a CPU) dequantizes the experts on loading: every weight of its
    model equals moelab's reading of the files, which lists no blocks or scales."""
    src, _, _ = release
    theirs = load_causal_lm(src, quiet=True, dtype=torch.bfloat16).state_dict()
    with Mxfp4Checkpoint(src) as ours:
        assert set(ours.keys()) == set(theirs)
        for key in ours.keys():
            assert torch.equal(ours.get(key).to(torch.bfloat16), theirs[key]), key
        name = "model.layers.1.mlp.experts.gate_up_proj"
        assert torch.equal(ours.get(name, range(1, 3)), ours.get(name)[1:3])
        assert ours.shape(name) == (4, 32, 64) and ours.with_shapes_only().get(name, range(2, 4)).shape == (
            2,
            32,
            64,
        )
        assert ours.shard(name) == "model.safetensors"


SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=64)


def test_compressing_a_release_writes_what_its_plain_copy_gives(release, tmp_path):
    """REAP and HC-SMoE on the MXFP4 files give the plain copy's checkpoints tensor for tensor (no
    quantization_config), each checked by the writer and reloaded by transformers."""
    outputs = {}
    for name, source in (("mxfp4", release[0]), ("plain", release[1])):
        stats = calibrate(source, tmp_path / f"stats_{name}", options=SMALL, quiet=True).directory
        for method in ("reap", "hc_smoe"):
            compress(source, tmp_path / f"{method}_{name}", method=method, ratio=0.5, stats=stats, quiet=True)
            outputs[method, name] = tmp_path / f"{method}_{name}"
    for method in ("reap", "hc_smoe"):
        a, b = (
            load_file(outputs[method, "mxfp4"] / "model.safetensors"),
            load_file(outputs[method, "plain"] / "model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
        config = json.loads((outputs[method, "mxfp4"] / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == "bfloat16"
        assert config == json.loads((outputs[method, "plain"] / "config.json").read_text())


def test_offloaded_decoding_of_a_release(release):
    """Experts read from the MXFP4 files, half of them resident, give the plain copy's tokens."""
    assert torch.equal(*offloaded_tokens(release[:2]))


def test_blocks_without_scales_or_of_other_shapes_are_refused(release, tmp_path):
    """Scales without blocks too (listed as a plain tensor, `moelab dequantize` would write a uint8 one
    transformers cannot load)."""
    src, _, tensors = release
    name = "model.layers.1.mlp.experts.down_proj"
    cases = [
        ({k: v for k, v in tensors.items() if k != name + "_scales"}, f"{name}_blocks has no {name}_scales"),
        (
            tensors | {name + "_scales": tensors[name + "_scales"][:, :, :0]},
            "are not MXFP4 blocks and scales",
        ),
        (
            tensors | {name + "_blocks": tensors[name + "_blocks"].view(torch.int8)},
            "are not MXFP4 blocks and scales",
        ),
        ({k: v for k, v in tensors.items() if k != name + "_blocks"}, f"{name}_scales has no {name}_blocks"),
    ]
    for i, (stored, message) in enumerate(cases):
        bad = tmp_path / str(i)
        bad.mkdir()
        save_file(stored, bad / "model.safetensors")
        (bad / "config.json").write_text((src / "config.json").read_text())
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(bad)


def test_plain_tensors_named_like_blocks_or_scales_read_as_stored(tmp_path):
    """Only uint8 `_blocks` and `_scales` are MXFP4 parts (transformers dequantizes GPT-OSS's experts
    only): a float tensor that ends so, with no partner, is a plain tensor."""
    blocks = torch.randint(
        0, 256, (2, 4, 1, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    stored = {
        "w_blocks": blocks,
        "w_scales": torch.full((2, 4, 1), 127, dtype=torch.uint8),
        "norm_blocks": torch.ones(3, dtype=torch.bfloat16),
        "layer_scales": torch.ones(3, dtype=torch.bfloat16),
    }
    save_file(stored, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": QUANTIZATION}))
    with Mxfp4Checkpoint(tmp_path) as ckpt:
        assert sorted(ckpt.keys()) == ["layer_scales", "norm_blocks", "w"]
        assert torch.equal(ckpt.get("norm_blocks"), stored["norm_blocks"])
        assert torch.equal(ckpt.get("w"), dequantized_mxfp4(blocks, stored["w_scales"]))


def test_opening_reads_each_shard_header_once_however_the_index_interleaves_them(tmp_path, monkeypatch):
    """gpt-oss-120b's index lists names alphabetically, not by shard: finding the blocks and scales
    reads the shard headers, never a shard per name."""
    import moelab.hf.checkpoint as module

    shards = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    weight_map = {}
    for i, shard in enumerate(shards):  # weight e's blocks in shard e % 4, its scales in the next one
        tensors = {f"e.{e}.w_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8) for e in range(i, 40, 4)}
        tensors |= {
            f"e.{e}.w_scales": torch.zeros(2, 4, 1, dtype=torch.uint8) for e in range((i - 1) % 4, 40, 4)
        }
        save_file(tensors, tmp_path / shard)
        weight_map |= dict.fromkeys(tensors, shard)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict(sorted(weight_map.items()))})
    )
    opened = []
    safe_open = module._safe_open
    monkeypatch.setattr(module, "_safe_open", lambda path: opened.append(path) or safe_open(path))
    ckpt = Mxfp4Checkpoint(tmp_path)
    assert len(ckpt.keys()) == 40 and len(opened) <= len(shards)


@settings(max_examples=30, deadline=None)
@given(
    lead=st.integers(1, 3),
    groups=st.integers(1, 3),
    rows=st.integers(1, 6),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 99),
)
def test_quantizing_picks_each_groups_smallest_power_of_two_and_the_nearest_values(
    lead, groups, rows, scale, seed
):
    """The inverse of the reading, against a search over all 16 values at the chosen power of two:
    every group's largest |entry| within 6 x its scale (and above 3 x: no smaller power fits), every
    entry the nearest value; quantizing what was read back gives the same values; zeros stay zeros."""
    w = torch.randn(lead, groups * 32, rows, generator=torch.Generator().manual_seed(seed)) * scale
    w[0, :32, 0] = 0  # an all-zero group
    blocks, scales = quantized_mxfp4(w)
    back = dequantized_mxfp4(blocks, scales, torch.float32)
    lut = torch.tensor(FP4_VALUES)
    power = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1).transpose(1, 2)  # [lead, I, O]
    nearest = (w[..., None] - lut * power[..., None]).abs().amin(-1)
    assert torch.equal((back - w).abs(), nearest)
    amax = w.abs().reshape(lead, groups, 32, rows).amax(2)  # [lead, G, O]
    group_power = torch.exp2(scales.float() - 127).transpose(1, 2)
    assert (amax <= 6 * group_power).all() and ((amax > 3 * group_power) | (amax == 0)).all()
    assert torch.equal(dequantized_mxfp4(*quantized_mxfp4(back), torch.float32), back)
    assert not back[0, :32, 0].any()


def test_keep_quantized_writes_gpt_oss_in_mxfp4(release, tmp_path):
    """Pruning copies the kept experts' blocks and scales byte for byte; merging quantizes the merged
    experts (each layer checked against those values, transformers reloading the MXFP4 files); a
    width that is not whole groups of 32 is refused before anything is written."""
    src, _, tensors = release
    pruned = drop_experts(src, tmp_path / "pruned", [0, 2], keep_quantized=True, quiet=True)
    written = load_file(pruned / "model.safetensors")
    for name in [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]:
        for part in ("_blocks", "_scales"):
            assert torch.equal(written[name + part], tensors[name + part][[1, 3]]), name + part
    assert json.loads((pruned / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert not [k for k in written if k.endswith("gate_up_proj") or k.endswith("down_proj")]
    backward = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",))  # HEAPr's too
    stats = calibrate(src, tmp_path / "stats", options=backward, quiet=True).directory
    merged = tmp_path / "merged"
    compress(src, merged, method="hc_smoe", ratio=0.5, stats=stats, keep_quantized=True, quiet=True)
    compress(src, tmp_path / "plain", method="hc_smoe", ratio=0.5, stats=stats, quiet=True)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    with Mxfp4Checkpoint(merged) as ckpt:
        for i in (0, 1):
            groups = json.loads((merged / "moelab_expert_map.json").read_text())["layers"][str(i)]["sources"]
            for name in (
                f"model.layers.{i}.mlp.experts.gate_up_proj",
                f"model.layers.{i}.mlp.experts.down_proj",
            ):
                got, want = ckpt.get(name), plain[name]
                for j, group in enumerate(
                    groups
                ):  # a merged expert: the MXFP4 quantization of the plain merge
                    expected = (
                        want[j]
                        if len(group) == 1
                        else dequantized_mxfp4(*quantized_mxfp4(want[j]), want.dtype)
                    )
                    assert torch.equal(got[j], expected), (name, j)
    with pytest.raises(
        ValueError, match="32 neurons cannot be narrowed in whole blocks of 32"
    ):  # before calibrating
        compress(
            src, tmp_path / "narrow", method="heapr", ratio=0.5, stats=stats, keep_quantized=True, quiet=True
        )
    assert not (tmp_path / "narrow").exists()


def test_values_beyond_the_dtype_are_refused_by_name(release, tmp_path):
    """Large MXFP4 scales overflow float16 (transformers' dequantization gives Inf there too): the
    read, and `moelab dequantize --dtype fp16`, refuse it naming the weight; bf16 reads it."""
    src, _, tensors = release
    name = "model.layers.1.mlp.experts.down_proj"
    big = tmp_path / "big"
    big.mkdir()
    save_file(
        tensors | {name + "_scales": torch.full_like(tensors[name + "_scales"], 127 + 16)},
        big / "model.safetensors",
    )
    (big / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(
        CheckpointError, match=f"{name} holds NaN or Inf once dequantized to float16: read it in a wider"
    ):
        dequantize_checkpoint(big, tmp_path / "fp16", dtype=torch.float16, quiet=True)
    assert not (tmp_path / "fp16").exists()
    assert torch.isfinite(Mxfp4Checkpoint(big).get(name)).all()


def test_keep_quantized_blames_an_edit_whose_new_experts_hold_nan(release, tmp_path):
    """MXFP4 has no NaN or Inf: an edit's non-finite expert is refused as the edit's fault, as the plain
    writing refuses it, not quantized into finite values that pass the writer's checks."""
    src, _, _ = release
    with open_checkpoint(src) as view:
        layer = view.layer(0)
    for bad_value in (float("nan"), float("inf")):
        down = layer.experts.down.clone()
        down[1, 0, 0] = bad_value
        bad = dataclasses.replace(layer, experts=dataclasses.replace(layer.experts, down=down))
        edits = {0: LayerEdit(((0,), (1,), (2,), (3,)), view=bad)}
        with pytest.raises(
            CheckpointError, match=r"layer 0: the edited tensor .*down_proj has NaN or Inf; fix the edit"
        ):
            write_checkpoint(src, tmp_path / "out", edits, keep_quantized=True, quiet=True, reload=False)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantized_mxfp4(torch.full((32, 1), float("nan")))
    w = torch.zeros(32, 1)
    w[0] = torch.nextafter(torch.tensor(3.5 * 2.0**126), torch.tensor(0.0))  # the largest that stays finite: 3 x 2 ** 126
    assert torch.isfinite(dequantized_mxfp4(*quantized_mxfp4(w), torch.float32)).all()
    for big in (3.5 * 2.0**126, 3.2e38):  # the tie goes to the even 4 x 2 ** 126 = 2 ** 128
        w[0] = big
        with pytest.raises(ValueError, match="MXFP4 rounds to Inf"):
            quantized_mxfp4(w)


def test_keep_quantized_checks_no_expert_was_left_plain(release, tmp_path, monkeypatch):
    """As for float8: experts written plain where MXFP4 was asked for fail the write, naming them
    (layer 0 rewritten with its experts as they are, layer 1 untouched and still MXFP4); where no
    layer is left MXFP4 the reader refuses the output first."""
    import moelab.hf.writer as writer

    monkeypatch.setattr(writer, "quantized_experts", lambda ckpt, layout, prefix, edited, edit: (edited, {}))
    same = {0: LayerEdit.keep([0, 1, 2, 3])}
    with pytest.raises(
        CheckpointError, match=r"layer 0's expert weights .*experts.gate_up_proj are stored plain"
    ):
        write_checkpoint(release[0], tmp_path / "out", same, keep_quantized=True, reload=False, quiet=True)
    with pytest.raises(
        CheckpointError, match=r"describes MXFP4 weights, but no <name>_blocks tensors are stored"
    ):
        drop_experts(release[0], tmp_path / "out", [0], keep_quantized=True, reload=False, quiet=True)
    assert not (tmp_path / "out").exists()
