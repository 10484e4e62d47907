"""Nemotron-H (NVIDIA Nemotron 3): plain relu² experts (up and down, no gate), a plain shared
expert, DeepSeek-V3's sigmoid router, and Mamba-2, attention, dense-MLP and MoE layers in one
stack, stored under `backbone.` by default `save_pretrained` and `model.` fused. Every piece of
moelab that reads a checkpoint runs on a tiny hybrid model here: the view against transformers'
own block, compression with every method through the layer-by-layer runner and transformers'
reload, and offloaded decoding."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from hf_tiny import TINY, block_output, build, load
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from moelab.compress import METHODS, CalibrationOptions, calibrate, compress
from moelab.compress.run import check_compression
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import open_checkpoint
from moelab.hf.adapters import FAMILIES
from moelab.hf.checkpoint import CheckpointError
from moelab.hf.edit import LayerEdit
from moelab.hf.layerwise import LayerwiseModel
from moelab.hf.native import moe_layer_from_view
from moelab.hf.view import MoELayerView
from moelab.hf.writer import drop_experts, write_checkpoint
from moelab.offload import OffloadedExperts, load_offloaded
from moelab.offload.model import generate_ids
from moelab.offload.store import ExpertStore

pytestmark = pytest.mark.usefixtures("one_thread")

# Mamba-2, MoE, attention, dense MLP, MoE: every kind of Nemotron-H layer
HYBRID = dict(
    TINY["nemotron_h"].config, layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "moe"]
)
MOE_LAYERS = [1, 4]
_SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=64)
EVERY = dataclasses.replace(_SMALL, observers=_SMALL.observers + ("neurons",))  # with the backward sweep


def hybrid(seed: int = 0, **overrides):
    """The hybrid model with unit-scale weights (as `hf_tiny.build`), selection biases in [0, 0.1]."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model("nemotron_h", **{**HYBRID, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" in name or "dt_bias" in name:
                continue  # Mamba's decay and step size keep their init: random ones blow the state up
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=[None, 16], ids=["plain", "latent"])
def saved(request, tmp_path_factory):
    """(model, {"original": backbone.-prefixed per-expert files, "fused": model.-prefixed stacked}),
    the experts in the model's space or (Nemotron 3 Super's latent MoE) in a latent space of 16."""
    model = hybrid(vocab_size=8192, moe_latent_size=request.param)
    root = tmp_path_factory.mktemp("nemotron_h")
    model.save_pretrained(root / "original")
    model.save_pretrained(root / "fused", save_original_format=False)
    for path in root.iterdir():
        PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return model, {"original": root / "original", "fused": root / "fused"}


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_the_view_reads_both_layouts_as_transformers_computes_them(saved, layout):
    model, paths = saved
    with safe_open(paths[layout] / "model.safetensors", "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()} - {"lm_head"}
    assert prefixes == {"backbone" if layout == "original" else "model"}
    view = open_checkpoint(paths[layout])
    layers = list(view.layers())
    assert [i for i, layer in enumerate(layers) if isinstance(layer, MoELayerView)] == MOE_LAYERS
    x = torch.randn(2, 7, HYBRID["hidden_size"])
    for i in MOE_LAYERS:
        layer = layers[i]
        assert not layer.experts.gated and layer.experts.activation == "relu2" and layer.shared.gate is None
        assert (
            layer.router.score_func == "sigmoid"
            and layer.router.n_group == 2
            and layer.router.route_scale == 2.5
        )
        latent = model.config.moe_latent_size
        assert (
            (layer.latent is None)
            if latent is None
            else layer.experts.dim == latent == layer.latent.down.shape[0]
        )
        want = block_output("nemotron_h", model, i, x)
        got = moe_layer_from_view(layer)(x.reshape(-1, x.shape[-1]))[0].reshape(x.shape)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_nvidias_config_keys_open_too(saved, tmp_path):
    """NVIDIA's config.json files give the layers as hybrid_override_pattern and num_hidden_layers."""
    _, paths = saved
    config = AutoConfig.from_pretrained(paths["original"]).to_dict()
    pattern = "".join({"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}[k]
                      for k in config.pop("layers_block_type"))  # fmt: skip
    shutil.copytree(paths["original"], tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(
        json.dumps(config | {"hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern)})
    )
    view = open_checkpoint(tmp_path / "m")
    assert [i for i, layer in enumerate(view.layers()) if isinstance(layer, MoELayerView)] == MOE_LAYERS


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mlp_bias": True}, "sets mlp_bias: its shared experts and latent projections have biases"),
        ({"mlp_hidden_act": "gelu_pytorch_tanh"}, "experts activation must be one of"),
    ],
)
def test_what_the_view_does_not_read_is_refused(saved, tmp_path, change, message):
    _, paths = saved
    shutil.copytree(paths["original"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | change))
    with pytest.raises((CheckpointError, ValueError), match=message):
        open_checkpoint(tmp_path / "m").layer(1)


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_plain_experts_are_refused_by_a_gated_layout_and_gated_ones_by_a_plain_layout(
    saved, tmp_path, layout
):
    """An edit of the right shape whose experts are of the other kind is refused by name before
    anything is written, in both directions; and each on-disk layout refuses to encode the other
    kind (the plain layouts have no gate to write, the gated ones need one)."""
    _, paths = saved
    nemotron = open_checkpoint(paths[layout]).layer(1)
    gated = dataclasses.replace(nemotron.experts, gate=nemotron.experts.up.flip(1), activation="silu")
    mixtral = open_checkpoint(_mixtral(tmp_path)).layer(0)
    plain = dataclasses.replace(mixtral.experts, gate=None, activation="relu2")
    cases = (
        (paths[layout], 1, dataclasses.replace(nemotron, experts=gated), "activation='silu' but the checkpoint's is 'relu2'"),
        (_mixtral(tmp_path), 0, dataclasses.replace(mixtral, experts=plain), "activation='relu2' but the checkpoint's is 'silu'"),
    )  # fmt: skip
    for i, (source, index, foreign, message) in enumerate(cases):
        edit = LayerEdit(tuple((e,) for e in range(foreign.router.num_experts)), view=foreign)
        with pytest.raises(ValueError, match=f"the edited experts has {message}"):
            write_checkpoint(source, tmp_path / str(i), {index: edit}, quiet=True)
        assert not (tmp_path / str(i)).exists()
    for family, experts, message in (("nemotron_h", gated, "gated .* holds plain"), ("mixtral", plain, "plain .* holds gated"),
                                     ("gpt_oss", plain, "plain .* holds gated")):  # fmt: skip
        for on_disk in FAMILIES[family].layouts:
            with pytest.raises(CheckpointError, match=f"the edited experts are {message}"):
                on_disk.experts.encode(experts, "model.layers.0.")


def _mixtral(tmp_path):
    path = tmp_path / "mixtral"
    if not path.exists():
        build("mixtral").save_pretrained(path)
    return path


# the fused layout's reading and writing are checked above and by test_hf_write; its whole run is slow
@pytest.mark.parametrize("layout", ["original", pytest.param("fused", marks=pytest.mark.slow)])
def test_every_method_compresses_the_hybrid_stack_and_transformers_reloads_it(saved, tmp_path, layout):
    """Calibration runs the Mamba, attention and dense layers layer by layer, forward and backward
    (`stored_renames`: the files say backbone., the modules model.); every method's output passes the writer's checks,
    which reload it with plain transformers and compare each edited layer."""
    _, paths = saved
    stats = calibrate(paths[layout], tmp_path / "stats", options=EVERY, quiet=True).directory
    for method in sorted(METHODS):
        domains = ["code"] if method == "premoe" else None
        report = compress(
            paths[layout],
            tmp_path / method,
            method=method,
            ratio=0.5,
            stats=stats,
            domains=domains,
            quiet=True,
        )
        assert report["complete"] and sorted(report["layers"]) == [str(i) for i in MOE_LAYERS], method
        narrows = METHODS[method].narrows or any(
            e["notes"].get("strategy") == "neurons" for e in report["layers"].values()
        )
        for entry in report["layers"].values():  # half the experts, or every expert at half its width
            assert len(entry["kept"]) + len(entry["merge_groups"]) == (8 if narrows else 4), method
        experts = load(tmp_path / method).model.layers[4].mixer.experts
        assert experts.up_proj.shape[0] == (8 if narrows else 4), method


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_offloaded_decoding_gives_transformers_tokens(saved, layout):
    model, paths = saved
    torch.manual_seed(1)
    ids = torch.randint(0, 8192, (1, 6))
    want = generate_ids(model, ids, 8)
    for resident, predictor in ((0.25, "lookahead"), (1.0, None)):
        offloaded = load_offloaded(paths[layout], resident=resident, predictor=predictor)
        try:
            assert torch.equal(offloaded.generate(ids, 8), want), (layout, resident)
        finally:
            offloaded.close()


def test_multi_token_prediction_layers_with_experts_are_left_out(saved, tmp_path):
    """NVIDIA stores Nemotron-H's multi-token prediction module as mtp.layers.N.* (transformers skips
    it on loading): its layer with routed experts would keep the old expert count, so the writer
    leaves the module out, with a warning (not half of it: its attention layer goes too)."""
    _, paths = saved
    src = tmp_path / "src"
    shutil.copytree(paths["original"], src)
    tensors = load_file(src / "model.safetensors")
    mtp = {
        k.replace("backbone.layers.1.", "mtp.layers.1."): v.clone()
        for k, v in tensors.items()
        if k.startswith("backbone.layers.1.")
    }
    mtp["mtp.layers.0.eh_proj.weight"] = torch.randn(HYBRID["hidden_size"], 2 * HYBRID["hidden_size"])
    mtp["mtp.norm.weight"] = torch.ones(HYBRID["hidden_size"])  # outside the layers: left out with them
    save_file(tensors | mtp, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    # moelab does not run Nemotron-H's MTP module: compress asks for the explicit choice to drop it
    with pytest.raises(ValueError, match=r"\(mtp.\) that moelab cannot calibrate.*--mtp drop"):
        check_compression(src, "reap", 0.5)
    with pytest.warns(
        UserWarning, match=r"stored layers mtp. \(.*Nemotron-H's mtp.* left out"
    ):
        drop_experts(src, tmp_path / "out", [0, 5], quiet=True)  # one of each router group of 4
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert (
        not [k for k in written if k.startswith("mtp.")] and "backbone.layers.1.mixer.gate.weight" in written
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_the_store_reads_an_expert_straight_into_its_slot_and_converts_to_bf16(saved, monkeypatch, layout):
    """Both layouts hold each expert as the plain pool lays it out (up [I, D], down [D, I]): a
    float32 store reads it straight into the slot, without a view; a bf16 one converts it. Either
    way the slot holds the expert the view reads."""
    _, paths = saved
    views = []
    read = ExpertStore.read
    monkeypatch.setattr(ExpertStore, "read", lambda self, *key: views.append(key) or read(self, *key))
    for dtype in (torch.float32, torch.bfloat16):
        store = ExpertStore(paths[layout], dtype=dtype)
        try:
            pool = store.empty(2)
            views.clear()
            store.load(4, 5, pool, 1)
            assert (not views) == (dtype == torch.float32), dtype
            want = read(store, 4, 5)
            assert torch.equal(pool.up_proj[1], want.up[0].to(dtype)) and torch.equal(
                pool.down_proj[1], want.down[0].to(dtype)
            )
        finally:
            store.close()


def test_a_bf16_checkpoint_keeps_what_transformers_keeps_in_float32(saved, tmp_path):
    """transformers loads Nemotron-H's router weight and correction bias in float32 whatever the
    dtype (`_keep_in_fp32_modules_strict`) and saves them so: offloaded decoding and bf16
    calibration route with the file's float32 values, not bf16 roundings of them."""
    _, paths = saved
    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(paths["original"], dtype=torch.bfloat16).save_pretrained(src)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(src)
    stored = load_file(src / "model.safetensors")
    assert stored["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32
    offloaded = load_offloaded(src, resident=0.5, dtype=torch.bfloat16)
    try:
        router = offloaded.model.model.layers[1].mixer.moe.router
        assert torch.equal(router.weight, stored["backbone.layers.1.mixer.gate.weight"])
        assert torch.equal(
            router.selection_bias, stored["backbone.layers.1.mixer.gate.e_score_correction_bias"]
        )
        assert offloaded.generate(torch.randint(0, 8192, (1, 4)), 4).shape == (1, 8)
    finally:
        offloaded.close()
    seen = []
    with LayerwiseModel(
        src, dtype=torch.bfloat16
    ) as runner:  # what calibration's layer-by-layer runner routes with
        states = runner.embed([torch.randint(0, 8192, (1, 4))])
        with runner.layer(1, run_moe=lambda moe, x, context=None: seen.append(moe.router.state_dict()) or moe(x)[0]) as run:
            assert run(0, states[0]).dtype == torch.bfloat16
    assert torch.equal(seen[0]["weight"], stored["backbone.layers.1.mixer.gate.weight"])
    assert torch.equal(
        seen[0]["selection_bias"], stored["backbone.layers.1.mixer.gate.e_score_correction_bias"]
    )
    options = dataclasses.replace(EVERY, dtype="bfloat16")
    assert calibrate(src, tmp_path / "stats", options=options, quiet=True).info["complete"]


def test_compact_sizes_count_the_two_matrices_of_a_plain_expert(saved, tmp_path):
    """HEAPr's padded layout and Sub-MoE's factored form report what their compact form would
    store: for experts without a gate, the up rows and down columns only."""
    model, paths = saved
    I, dim = HYBRID["moe_intermediate_size"], model.config.moe_latent_size or HYBRID["hidden_size"]
    stats = calibrate(paths["original"], tmp_path / "stats", options=EVERY, quiet=True).directory
    padded = compress(paths["original"], tmp_path / "heapr", method="heapr", ratio=0.5, stats=stats,
                      method_options={"layout": "padded"}, quiet=True)  # fmt: skip
    for entry in padded["layers"].values():
        assert entry["notes"]["compact_parameters"] == sum(entry["notes"]["kept_neurons"]) * 2 * dim
    factored = compress(paths["original"], tmp_path / "submoe", method="sub_moe", ratio=0.5, stats=stats,
                        method_options={"rank": 2}, quiet=True)  # fmt: skip
    for entry in factored["layers"].values():  # per group, rank 2: up (2 (I + dim)) and down (2 (dim + I))
        groups = len(entry["kept"]) + len(entry["merge_groups"])
        assert entry["notes"]["compact_parameters"] == groups * 4 * (I + dim)


def test_read_ahead_sees_the_moe_layers_input_through_its_norm(saved, monkeypatch):
    """A Nemotron-H block has one norm, before its mixer: the read-ahead predicts from what the
    router will see."""
    _, paths = saved
    offloaded = load_offloaded(paths["original"], resident=0.5, predictor="lookahead")
    seen, inputs = [], []
    read_ahead = OffloadedExperts.read_ahead

    def spy(self, hidden, ids=None):
        seen.append((self.layer, hidden.clone()))
        read_ahead(self, hidden, ids)

    monkeypatch.setattr(OffloadedExperts, "read_ahead", spy)
    try:
        for i in MOE_LAYERS:
            offloaded.model.model.layers[i].register_forward_pre_hook(
                lambda m, args, kwargs: inputs.append(m.norm(args[0] if args else kwargs["hidden_states"])),
                with_kwargs=True,
            )  # fmt: skip
        offloaded.generate(torch.randint(0, 8192, (1, 4)), 3)
        assert [layer for layer, _ in seen] == MOE_LAYERS * 3
        for (_, hidden), expected in zip(seen, inputs, strict=True):
            torch.testing.assert_close(hidden, expected)
    finally:
        offloaded.close()
