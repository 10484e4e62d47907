"""moelab.hf.writer: write-back of edited MoE checkpoints, checked against transformers.

For every family and on-disk layout, half the experts of every MoE layer are dropped; the
result must load strictly in transformers, have exactly the keys and shapes transformers itself
writes for the smaller model, differ from config.json only in the expert count, and give the
logits of the original model whose MoE blocks route with the dropped experts masked out
(router logits -inf before top-k).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from hf_tiny import TINY, D, add_mtp_layer, block_output, build, load
from safetensors import safe_open
from transformers import AutoConfig

from moelab.hf import (
    CheckpointError,
    LayerEdit,
    MoELayerView,
    WriteCheckError,
    apply_edit,
    drop_experts,
    masked_moe_layer,
    open_checkpoint,
    write_checkpoint,
)
from moelab.hf import layouts as layouts_module
from moelab.hf.adapters import FAMILIES
from moelab.hf.edit import moe_output
from moelab.hf.layerwise import install_moe, language_model_class
from moelab.hf.modules import decoder_layers, find_moe_modules
from moelab.hf.native import moe_layer_from_view
from moelab.hf.writer import EXPERT_MAP_NAME
from moelab.models import MoETransformer, load_pretrained, save_pretrained, tiny
from moelab.nn import MoEConfig

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(family, True) for family in TINY] + [
    (family, False) for family, tiny_ in TINY.items() if tiny_.fused
]
IDS = [f"{f}-{'per_expert' if o else 'fused'}" for f, o in CASES]


def _drop(family: str, index: int) -> list[int]:
    """Half the experts, different per layer; 8 experts in 2 groups (DeepSeek, EXAONE-MoE) lose 2 per group."""
    if TINY[family].config.get("n_group", 1) > 1:
        return [1, 2, 4, 7]
    return [0, 2] if index % 2 else [1, 2]


def _masked_model(family: str, path, drop: dict[int, list[int]]):
    """The original transformers model whose MoE blocks route with the `drop` experts masked (moelab's
    stand-in for a block, which keeps the family's output norm; Gemma 4's for its inline router and
    experts)."""
    model = load(path)
    with open_checkpoint(path) as view:
        _, layers = decoder_layers(model, view.num_layers)
        for layer in view.layers():
            if isinstance(layer, MoELayerView):
                keep = [e for e in range(layer.router.num_experts) if e not in drop[layer.index]]
                found = find_moe_modules(layers[layer.index], layer.index, layer.router.num_choices, layer.router.weight.shape[1])
                layer = layer if found.shared_in_block else dataclasses.replace(layer, shared=None)
                install_moe(layers[layer.index], layer.index, found, masked_moe_layer(layer, keep), None, FAMILIES[family])
    return model


def _tensors(path) -> dict[str, tuple[int, ...]]:
    index = path / "model.safetensors.index.json"
    shards = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    out = {}
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            out |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family,original", CASES, ids=IDS)
def test_drop_half_the_experts(tmp_path, family, original):
    src, out = tmp_path / "src", tmp_path / "out"
    build(family).save_pretrained(src, save_original_format=original)
    moe_layers = [i for i in range(2) if i not in TINY[family].dense]
    drop = {i: _drop(family, i) for i in moe_layers}
    shared_with = FAMILIES[family].expert_count_shared_with  # JetMoE's: test_jetmoe_keeps_its_expert_count
    if shared_with is not None:  # the expert count sizes other experts too: no count can change
        with pytest.raises(ValueError, match=f"{family}'s .* also sizes {re.escape(shared_with)}"):
            drop_experts(src, out, drop, quiet=True)
        assert not out.exists()
        return
    drop_experts(src, out, drop, quiet=True)

    cls, config = language_model_class(AutoConfig.from_pretrained(out))  # Mistral 4: not an AutoModelForCausalLM
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    # config.json: only the expert count changed, at JSON level
    before, after = (json.loads((p / "config.json").read_text()) for p in (src, out))
    changed = {k for k in before | after if before.get(k) != after.get(k)}
    assert len(changed) == 1, changed
    (key,) = changed
    E = before[key]["moe_num_experts"] if key == "ffn_config" else before[key]
    new_E = E - len(drop[moe_layers[0]])
    assert (after[key]["moe_num_experts"] if key == "ffn_config" else after[key]) == new_E

    # the layout transformers itself writes for the smaller model, key for key and shape for shape
    fresh = cls._from_config(config)
    fresh.save_pretrained(tmp_path / "fresh", save_original_format=original)
    assert _tensors(out) == _tensors(tmp_path / "fresh")

    # outputs: the masked-router simulation on the original model
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = _logits(_masked_model(family, src, drop), ids)
    got = _logits(load(out), ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (expected - _logits(load(src), ids)).abs().max() > 1e-3, "dropping experts changed nothing"

    expert_map = json.loads((out / EXPERT_MAP_NAME).read_text())
    for i in moe_layers:
        kept = [e for e in range(E) if e not in drop[i]]
        assert expert_map["layers"][str(i)] == {
            "sources": [[e] for e in kept],
            "kept": kept,
            "merge_groups": [],
            "tensors_replaced": False,
        }


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_masked_simulation_is_the_original_where_kept_experts_were_chosen(tmp_path, family):
    """Independent of the writer: for renormalised softmax routing, a token whose top-k experts
    are all kept gets exactly the original block's output from the masked simulation."""
    model = build(family)
    model.save_pretrained(tmp_path)
    index = 1
    layer = open_checkpoint(tmp_path).layer(index)
    keep = [0, 1, 3]
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked, _ = masked_moe_layer(layer, keep)(x)
        chosen = layer.router.weight @ x.T  # [E, T] logits; softmax is monotone
    untouched = (chosen.topk(2, dim=0).indices != 2).all(0)
    assert 10 < untouched.sum() < 64
    original = block_output(family, model, index, x[None])[0]
    torch.testing.assert_close(masked[untouched], original[untouched], atol=1e-5, rtol=0)
    assert (masked[~untouched] - original[~untouched]).abs().max() > 1e-3


def test_a_dropped_expert_with_a_large_correction_bias_is_never_chosen(tmp_path):
    """DeepSeek-V3: masking a dropped expert masks its selection score too, so however large its
    correction bias, the masked simulation (and the writer's float64 check) computes what the layer
    with that expert removed computes."""
    build("deepseek_v3").save_pretrained(tmp_path)
    layer = open_checkpoint(tmp_path).layer(1)
    bias = layer.router.selection_bias.clone()
    bias[1] = 100.0  # dropped below: without its mask it would win every token
    layer = dataclasses.replace(layer, router=dataclasses.replace(layer.router, selection_bias=bias))
    keep = [0, 3, 5, 6]  # two per routing group
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        smaller = moe_layer_from_view(apply_edit(layer, LayerEdit.keep(keep))).double()(x)[0]
        masked = masked_moe_layer(layer, keep).double()(x)[0]
    torch.testing.assert_close(masked, smaller, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moe_output(layer, x, keep), smaller, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", sorted(TINY))
def test_moe_output_is_the_masked_layer_one_expert_at_a_time(tmp_path, family):
    """The writer's float64 check computes what masked_moe_layer computes, for every family."""
    build(family).save_pretrained(tmp_path)
    view = open_checkpoint(tmp_path)
    layer = next(layer for layer in view.layers() if isinstance(layer, MoELayerView))
    x = torch.randn(40, layer.experts.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    E, n_group = layer.router.num_experts, layer.router.n_group
    keep = list(range(E)) if n_group > 1 else list(range(1, E))  # group routing: every group must keep experts
    with torch.no_grad():
        expected = masked_moe_layer(layer, keep).double()(x)[0]
    torch.testing.assert_close(moe_output(layer, x, keep), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moe_output(layer, x), moe_layer_from_view(layer).double()(x)[0], rtol=1e-12, atol=1e-12)


def test_sharded_source_side_files_and_chained_edits(tmp_path):
    """A sharded source stays sharded (renumbered index), tokenizer-like side files are copied,
    weights in other formats and folders are not (stale copies of the unedited model), and a second
    edit's expert map refers to the first model's ids."""
    src = tmp_path / "src"
    build("mixtral").save_pretrained(src, max_shard_size="20KB")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"stale")
    for stale in ("tf_model.h5", "flax_model.msgpack", "model.gguf", "onnx/model.onnx", "original/consolidated.00.pth",
                  "original/model.safetensors"):  # fmt: skip
        (src / stale).parent.mkdir(exist_ok=True)
        (src / stale).write_bytes(b"stale weights of the unedited model")
    (src / "original" / "params.json").write_text("{}")
    drop_experts(src, tmp_path / "a", [1], quiet=True)  # keeps 0, 2, 3
    assert not [p.name for p in (tmp_path / "a").rglob("*") if p.suffix in (".h5", ".msgpack", ".gguf", ".onnx", ".pth")]
    assert not (tmp_path / "a" / "onnx").exists() and not (tmp_path / "a" / "original" / "model.safetensors").exists()
    assert (tmp_path / "a" / "original" / "params.json").is_file()
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((tmp_path / "a" / shard).is_file() for shard in index["weight_map"].values())
    assert (tmp_path / "a" / "tokenizer_config.json").is_file()
    assert not (tmp_path / "a" / "pytorch_model.bin").exists()
    drop_experts(tmp_path / "a", tmp_path / "b", [0], quiet=True)  # keeps 2, 3 of the first model
    layers = json.loads((tmp_path / "b" / EXPERT_MAP_NAME).read_text())["layers"]
    assert layers["0"]["kept"] == [2, 3] and layers["1"]["kept"] == [2, 3]


def _narrow_and_merge(layer: MoELayerView) -> MoELayerView:
    """Experts 0 and 1 merged (averaged), experts 2 and 3 kept; every expert narrowed to half
    its hidden units; the merged expert's router row is the mean of the two."""
    ex, router = layer.experts, layer.router
    half = ex.hidden_dim // 2

    def experts(t, hidden_dim: int | None):
        merged = torch.stack([t[:2].mean(0), t[2], t[3]])
        return merged if hidden_dim is None else merged.narrow(hidden_dim, 0, half)

    new_experts = dataclasses.replace(
        ex,
        gate=experts(ex.gate, 1),
        up=experts(ex.up, 1),
        down=experts(ex.down, 2),
        gate_bias=None if ex.gate_bias is None else experts(ex.gate_bias, 1),
        up_bias=None if ex.up_bias is None else experts(ex.up_bias, 1),
        down_bias=None if ex.down_bias is None else experts(ex.down_bias, None),
    )
    rows = lambda t: None if t is None else experts(t, None)  # noqa: E731
    new_router = dataclasses.replace(router, weight=rows(router.weight), bias=rows(router.bias))
    return dataclasses.replace(layer, router=new_router, experts=new_experts)


@pytest.mark.parametrize("family,original", [("qwen3_moe", True), ("gpt_oss", True), ("granitemoe", True)])
def test_merged_and_narrowed_experts(tmp_path, family, original):
    """Replacement tensors: transformers' block on the written checkpoint computes the edited view."""
    src, out = tmp_path / "src", tmp_path / "out"
    build(family).save_pretrained(src, save_original_format=original)
    moe_layers = [i for i in range(2) if i not in TINY[family].dense]
    views = {i: _narrow_and_merge(open_checkpoint(src).layer(i)) for i in moe_layers}
    edits = {i: LayerEdit(((0, 1), (2,), (3,)), view=views[i]) for i in moe_layers}
    write_checkpoint(src, out, edits, quiet=True)
    model = load(out)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(0))
    from moelab.hf import moe_layer_from_view

    for i in moe_layers:
        with torch.no_grad():
            expected, _ = moe_layer_from_view(views[i])(x)
        torch.testing.assert_close(block_output(family, model, i, x), expected, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    width = "moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"
    assert config[width] == 8
    layer_map = json.loads((out / EXPERT_MAP_NAME).read_text())["layers"][str(moe_layers[-1])]
    assert layer_map["merge_groups"] == [[0, 1]] and layer_map["kept"] == [2, 3]


def test_bf16_source_stays_bf16(tmp_path):
    build("olmoe").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    drop_experts(tmp_path / "src", tmp_path / "out", [3], quiet=True)
    layer = open_checkpoint(tmp_path / "out").layer(0)
    assert layer.router.weight.dtype == layer.experts.gate.dtype == torch.bfloat16
    assert layer.router.num_experts == 3


# ----------------------------------------------------------------------------- moelab's own format


def _native(tmp_path, **moe):
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        tiny(), moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2, **moe), tie_embeddings=True
    )
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
        for layer in model.moe_layers.values():
            if layer.router.selection_bias is not None:  # expert 1, dropped below, would win every selection
                layer.router.selection_bias.uniform_(0, 0.1)[1] = 2.0
    save_pretrained(model, tmp_path / "src")
    return model


@pytest.mark.parametrize(
    "moe",
    [
        {},
        {"num_shared": 1, "shared_gate": True},
        {"score_func": "sigmoid", "selection_bias": True, "router_bias": True},
        {"identity_experts": 2, "renormalize": False, "selection_bias": True, "router_bias": True},
    ],
    ids=["plain", "shared", "sigmoid_bias", "identity_experts"],
)
def test_native_checkpoint(tmp_path, moe):
    model = _native(tmp_path, **moe)
    drop_experts(tmp_path / "src", tmp_path / "out", [1], quiet=True)
    pruned = load_pretrained(tmp_path / "out").eval()
    assert pruned.config.moe.num_experts == 3
    with open_checkpoint(tmp_path / "src") as view:
        for i in model.moe_layers:
            model.layers[i].ffn = masked_moe_layer(view.layer(i), [0, 2, 3])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_a_native_computation_budget_above_the_experts_kept_is_capped_to_them(tmp_path):
    """LongCat-Flash's K_e (moe.computed_experts_target) of 2 with 1 expert kept: written as 1 (the
    config refused 2 on loading, so the write failed as 'config.json is not a valid moelab ModelConfig')."""
    model = _native(tmp_path, identity_experts=2, renormalize=False, selection_bias=True, computed_experts_target=2.0)
    with pytest.warns(UserWarning, match=r"computed_experts_target 2.0 .* more than the 1 experts .* written as 1.0"):
        drop_experts(tmp_path / "src", tmp_path / "out", [1, 2, 3], quiet=True)
    pruned = load_pretrained(tmp_path / "out").eval()
    assert (pruned.config.moe.num_experts, pruned.config.moe.computed_experts_target) == (1, 1.0)
    with open_checkpoint(tmp_path / "src") as view:
        for i in model.moe_layers:
            model.layers[i].ffn = masked_moe_layer(view.layer(i), [0])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), atol=1e-5, rtol=0)
    within = tmp_path / "within"
    _native(within, identity_experts=2, renormalize=False, selection_bias=True, computed_experts_target=1.0)
    drop_experts(within / "src", within / "out", [3], quiet=True)  # a budget within the experts kept stays
    assert load_pretrained(within / "out").config.moe.computed_experts_target == 1.0


def test_narrowing_native_experts_keeps_a_shared_expert_that_took_their_width(tmp_path):
    """shared_hidden_dim=None: the shared expert's width is num_shared * hidden_dim. Narrowing the
    routed experts writes that width out, so the shared expert keeps its own (before: the written
    config gave it the new width and the write failed its postcondition as "a moelab bug")."""
    _native(tmp_path, num_shared=1)
    with open_checkpoint(tmp_path / "src") as view:
        views = {layer.index: _narrow_and_merge(layer) for layer in view.layers() if isinstance(layer, MoELayerView)}
    write_checkpoint(tmp_path / "src", tmp_path / "out", {i: LayerEdit(((0, 1), (2,), (3,)), view=v) for i, v in views.items()}, quiet=True)
    narrowed = load_pretrained(tmp_path / "out").eval()
    assert (narrowed.config.moe.hidden_dim, narrowed.config.moe.shared_hidden_dim) == (16, 32)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    for i, layer in narrowed.moe_layers.items():
        with torch.no_grad():
            torch.testing.assert_close(layer(x)[0], moe_layer_from_view(views[i])(x)[0], atol=1e-5, rtol=0)


def test_native_per_layer_counts_are_refused(tmp_path):
    model = _native(tmp_path)
    cfg = dataclasses.replace(model.config, first_k_dense=0)
    save_pretrained(MoETransformer(cfg), tmp_path / "two")
    with pytest.raises(ValueError, match=r"layer 0: 3 x as before, layer 1: 2 x .*single MoEConfig"):
        drop_experts(tmp_path / "two", tmp_path / "out", {0: [1], 1: [1, 2]}, quiet=True)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def mixtral(tmp_path):
    build("mixtral").save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_fewer_experts_than_top_k(mixtral, tmp_path):
    with pytest.raises(
        ValueError, match=r"leaves 1 experts but the router picks top_k=2 per token; keep at least 2"
    ):
        drop_experts(mixtral, tmp_path / "out", [0, 1, 2], quiet=True)
    assert not (tmp_path / "out").exists()


def test_per_layer_counts_are_refused(mixtral, tmp_path):
    with pytest.raises(ValueError, match=r"layer 0: 3 x .*layer 1: 2 x .*cannot build per-layer counts"):
        drop_experts(mixtral, tmp_path / "out", {0: [1], 1: [1, 2]}, quiet=True)
    with pytest.raises(ValueError, match=r"layer 0: 3 x as before, layer 1: 4 x as before"):
        drop_experts(mixtral, tmp_path / "out", {0: [1]}, quiet=True)


@pytest.mark.parametrize(
    "drop,message",
    [
        ([3], r"new count 7 must be a multiple of 2"),
        ([0, 1, 2, 3], r"every group to keep 2 experts of its own.*keeps \[0, 4\] per group.*Prune equally"),
        ([0, 1, 2, 4, 5, 6], r"after the edit, top_k \(2\) exceeds the 1 experts in the topk_group=1 kept groups"),
        (
            [0, 1, 2, 4, 5, 6, "topk_group=2"],
            r"scores each group by its 2 best experts, so every group needs at least 2",
        ),
    ],
)
def test_group_limited_routing(tmp_path, drop, message):
    build("deepseek_v3").save_pretrained(tmp_path / "src")
    if drop[-1] == "topk_group=2":
        drop = drop[:-1]
        config = json.loads((tmp_path / "src" / "config.json").read_text())
        (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "topk_group": 2}))
    with pytest.raises(ValueError, match=message):
        drop_experts(tmp_path / "src", tmp_path / "out", drop, quiet=True)


def test_bad_edits(mixtral, tmp_path):
    with pytest.raises(ValueError, match=r"expert ids \[4\] out of range"):
        write_checkpoint(mixtral, tmp_path / "out", {0: LayerEdit.keep([0, 4])}, quiet=True)
    with pytest.raises(ValueError, match=r"layers \[5\] are not MoE layers"):
        write_checkpoint(mixtral, tmp_path / "out", {5: LayerEdit.keep([0, 1])}, quiet=True)
    with pytest.raises(ValueError, match="distinct expert ids"):
        LayerEdit(((0,), (0,)))
    with pytest.raises(ValueError, match="merged experts .* need their new tensors"):
        LayerEdit(((0, 1), (2,)))
    four = open_checkpoint(mixtral).layer(0)
    with pytest.raises(ValueError, match="LayerEdit.view has 4 experts but sources lists 3"):
        LayerEdit(((0,), (1,), (2, 3)), view=four)
    with pytest.raises(ValueError, match="names no experts"):
        drop_experts(mixtral, tmp_path / "out", [], quiet=True)
    layer = open_checkpoint(mixtral).layer(0)
    wrong = dataclasses.replace(layer, router=dataclasses.replace(layer.router, top_k=1))
    with pytest.raises(ValueError, match=r"edited router has top_k=1 but the checkpoint's is 2"):
        write_checkpoint(
            mixtral, tmp_path / "out", {0: LayerEdit(((0,), (1,), (2,), (3,)), view=wrong)}, quiet=True
        )


@pytest.mark.parametrize("bad", [1.7, 1.0, True, "1", torch.tensor(1.0)])
def test_expert_ids_must_be_integers(mixtral, tmp_path, bad):
    with pytest.raises(ValueError, match="expert ids are integers, got"):
        drop_experts(mixtral, tmp_path / "out", [bad], quiet=True)
    with pytest.raises(ValueError, match="expert ids are integers, got"):
        LayerEdit(((0,), (bad,)))
    assert not (tmp_path / "out").exists()


def test_output_directory_is_checked(mixtral, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="busy exists and was not written by moelab"):
            drop_experts(mixtral, tmp_path / "busy", [0], quiet=True, overwrite=overwrite)
    assert (tmp_path / "busy" / "x").is_file()
    before = sorted(mixtral.rglob("*"))
    for inside in (mixtral / "pruned", mixtral / "a" / "b" / "pruned"):
        with pytest.raises(ValueError, match="lies inside the input"):
            drop_experts(mixtral, inside, [0], quiet=True)
    assert sorted(mixtral.rglob("*")) == before  # refused before the lock file or a parent was made
    drop_experts(mixtral, tmp_path / "pruned", [0], quiet=True)
    with pytest.raises(ValueError, match="already holds moelab's checkpoint; pass --overwrite"):
        drop_experts(mixtral, tmp_path / "pruned", [1], quiet=True)
    drop_experts(mixtral, tmp_path / "pruned", [1], quiet=True, overwrite=True)
    assert json.loads((tmp_path / "pruned" / EXPERT_MAP_NAME).read_text())["layers"]["0"]["kept"] == [0, 2, 3]


def test_corrupt_sources(mixtral, tmp_path):
    config = json.loads((mixtral / "config.json").read_text())
    (mixtral / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    with pytest.raises(
        CheckpointError, match=r"config says 8 experts \(num_local_experts\), checkpoint layer 0 has 4"
    ):
        drop_experts(mixtral, tmp_path / "out", [0], quiet=True)
    (mixtral / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    with pytest.raises(CheckpointError, match=r"config says the experts are \d+ wide \(intermediate_size\), checkpoint layer 0's are"):
        drop_experts(mixtral, tmp_path / "out", [0], quiet=True)
    sharded = tmp_path / "sharded"
    build("mixtral").save_pretrained(sharded, max_shard_size="20KB")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["lm_head.weight"]  # still in its shard: transformers loads it, the index drops it
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"holds 1 tensor\(s\) that model.safetensors.index.json does not list \(lm_head"):
        drop_experts(sharded, tmp_path / "out", [0], quiet=True)
    sorted(sharded.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(CheckpointError, match="missing from"):
        drop_experts(sharded, tmp_path / "out", [0], quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["nan", "layers"])
def test_a_source_that_does_not_load_is_blamed_not_moelab(mixtral, tmp_path, fault):
    """Faults the writer copies through (a NaN in a tensor it never edits, a config.json with more
    layers than the weights) fail the reload check; the source fails it too, so the error names the
    source's problem instead of "a moelab bug"."""
    from safetensors.torch import load_file, save_file

    if fault == "nan":
        tensors = load_file(mixtral / "model.safetensors")
        tensors["model.norm.weight"][0] = float("nan")
        save_file(tensors, mixtral / "model.safetensors", metadata={"format": "pt"})
    else:
        config = json.loads((mixtral / "config.json").read_text())
        (mixtral / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    message = "NaN or Inf in model.norm.weight" if fault == "nan" else "missing: model.layers.2"
    with pytest.raises(CheckpointError, match=rf"the source checkpoint {mixtral} does not load either \(.*{message}") as err:
        drop_experts(mixtral, tmp_path / "out", [0], quiet=True)
    assert "moelab bug" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_broken_layout_encoder_fails_the_postconditions(mixtral, tmp_path, monkeypatch):
    """The checks can fail: an encoder that swaps gate and up writes a loadable checkpoint that
    computes something else; the writer refuses it and leaves no output."""
    real = layouts_module.PerExpert.encode

    def swapped(self, experts, prefix):
        return real(self, dataclasses.replace(experts, gate=experts.up, up=experts.gate), prefix)

    monkeypatch.setattr(layouts_module.PerExpert, "encode", swapped)
    with pytest.raises(WriteCheckError, match=r"layer 0 differs from the edit applied to the original"):
        drop_experts(mixtral, tmp_path / "out", [0], quiet=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_each_postcondition_refuses_what_it_checks(mixtral, tmp_path):
    """check_written and reload_problem on a correct written checkpoint, then on one fault each:
    an output off by 1e-3 (far above the 1e-5 tolerance on O(1) outputs), NaN weights, a
    config.json that disagrees with the router rows or the expert width, logits that overflow."""
    from safetensors.torch import load_file, save_file

    from moelab.hf.postconditions import LayerCheck, check_written, reload_problem

    out = drop_experts(mixtral, tmp_path / "out", [1], quiet=True)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with open_checkpoint(out) as view:
        expected = moe_output(view.layer(0), x)
    assert 0.1 < expected.abs().max() < 10
    check_written(out, {0: LayerCheck(x, expected)})
    with pytest.raises(WriteCheckError, match=r"layer 0 differs from the edit applied to the original .* by 0.001"):
        check_written(out, {0: LayerCheck(x, expected + 1e-3)})
    family = open_checkpoint(out).family  # moelab's mixtral family, as the writer resolves it
    assert reload_problem(out, family, quiet=True) is None
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"num_local_experts": 4}))
    with pytest.raises(WriteCheckError, match="layer 0 has 3 router rows but config.json says 4 experts"):
        check_written(out, {})
    (out / "config.json").write_text(json.dumps(config | {"intermediate_size": 32}))
    with pytest.raises(WriteCheckError, match="the written checkpoint does not read back: .*intermediate_size"):
        check_written(out, {0: LayerCheck(x, expected)})
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    good = dict(tensors)
    w2 = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    tensors[w2] = torch.full_like(tensors[w2], float("nan"))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WriteCheckError, match="layer 0 outputs NaN or Inf"):
        check_written(out, {0: LayerCheck(x, expected)})
    overflow = {"model.norm.weight": 3e38, "lm_head.weight": 3e38}  # finite weights, logits of +-inf and NaN
    save_file(good | {k: good[k] * f for k, f in overflow.items()}, out / "model.safetensors", metadata={"format": "pt"})
    assert reload_problem(out, family, quiet=True) == "the reloaded model's logits contain NaN or Inf"


def test_apply_edit_selects_rows():
    from moelab.hf.view import ExpertsView, RouterView

    E, I = 4, 3
    w = torch.arange(E * D, dtype=torch.float32).view(E, D)
    layer = MoELayerView(
        0,
        RouterView(w, "softmax", 2, True, selection_bias=torch.arange(E, dtype=torch.float32)),
        ExpertsView(
            torch.randn(E, I, D), torch.randn(E, I, D), torch.randn(E, D, I), down_bias=torch.randn(E, D)
        ),
    )
    edited = apply_edit(layer, LayerEdit.drop([1], E))
    torch.testing.assert_close(edited.router.weight, w[[0, 2, 3]])
    torch.testing.assert_close(edited.router.selection_bias, torch.tensor([0.0, 2.0, 3.0]))
    torch.testing.assert_close(edited.experts.down_bias, layer.experts.down_bias[[0, 2, 3]])


def test_keep_renumbers_in_increasing_order_and_drop_checks_every_id():
    """keep: new expert j is the j-th smallest kept id, whatever order the ids come in (a set of
    ids 8, 1, 3 iterates as 8, 1, 3); drop: an id past the layer's last expert is an error, not
    silently ignored (dropping nothing)."""
    assert LayerEdit.keep([8, 1, 3, 1]).sources == ((1,), (3,), (8,))
    assert LayerEdit.keep(iter([8, 1, 3])).selection == [1, 3, 8]
    assert LayerEdit.drop([2, 0], 4).selection == [1, 3]
    for bad in (4, -1):
        with pytest.raises(ValueError, match=rf"cannot drop experts \[{bad}\]: the layer has experts 0..3"):
            LayerEdit.drop([1, bad], 4)


def test_an_edit_with_other_expert_dim_or_shared_experts_is_refused():
    """An edited view whose experts read another model dim, or whose shared expert differs in any
    tensor (or is missing), is refused by name; the same shared expert in another dtype is fine."""
    from moelab.hf.edit import check_same_settings
    from moelab.hf.view import ExpertsView, RouterView, SharedView

    E, I = 4, 3

    def layer(dim=D, with_shared=True, **shared):
        g = torch.Generator().manual_seed(0)
        experts = (torch.randn(E, I, dim, generator=g) for _ in range(2))
        own = dict(zip(("gate", "up", "down", "sigmoid_gate"), (torch.randn(s, generator=g) for s in
                   ((5, D), (5, D), (D, 5), (1, D)))))  # fmt: skip
        return MoELayerView(
            0,
            RouterView(torch.randn(E, dim, generator=g), "softmax", 2, True),
            ExpertsView(*experts, torch.randn(E, dim, I, generator=g)),
            SharedView(**(own | shared)) if with_shared else None,
        )

    original = layer()
    check_same_settings(original, layer())
    check_same_settings(original, dataclasses.replace(original, shared=SharedView(
        *(t.double() for t in (original.shared.gate, original.shared.up, original.shared.down,
                               original.shared.sigmoid_gate)))))  # fmt: skip
    with pytest.raises(ValueError, match=rf"layer 0: the edited experts have dim {D + 1}, expected {D}"):
        check_same_settings(layer(with_shared=False), layer(D + 1, with_shared=False))
    for name in ("gate", "up", "down", "sigmoid_gate"):
        changed = getattr(original.shared, name).clone()
        changed[0, 0] += 1
        with pytest.raises(ValueError, match="the edited view changes the shared experts"):
            check_same_settings(original, layer(**{name: changed}))
    for edited in (layer(sigmoid_gate=None), dataclasses.replace(original, shared=None)):
        with pytest.raises(ValueError, match="the edited view changes the shared experts"):
            check_same_settings(original, edited)


def test_an_edit_that_changes_a_latent_blocks_projections_is_refused():
    """The writer copies a latent block's projections (Nemotron-H's fc1/fc2_latent_proj) as they
    are: an edit that changes, adds or drops them is refused; the same ones in another dtype pass."""
    from moelab.hf.edit import check_same_settings
    from moelab.hf.view import ExpertsView, LatentView, RouterView

    E, I, L = 4, 3, 8
    g = torch.Generator().manual_seed(0)
    latent = LatentView(torch.randn(L, D, generator=g), torch.randn(D, L, generator=g))
    experts = ExpertsView(None, torch.randn(E, I, L, generator=g), torch.randn(E, L, I, generator=g), activation="relu2")
    original = MoELayerView(0, RouterView(torch.randn(E, D, generator=g), "sigmoid", 2, True), experts, latent=latent)
    check_same_settings(original, dataclasses.replace(original, latent=LatentView(latent.down.double(), latent.up.double())))
    changed = latent.up.clone()
    changed[0, 0] += 1
    with pytest.raises(ValueError, match="the edited view changes the latent projections"):
        check_same_settings(original, dataclasses.replace(original, latent=LatentView(latent.down, changed)))
    square = LatentView(torch.randn(D, D, generator=g), torch.randn(D, D, generator=g))  # L = D: dropping it keeps the dims
    experts = ExpertsView(None, torch.randn(E, I, D, generator=g), torch.randn(E, D, I, generator=g), activation="relu2")
    original = MoELayerView(0, original.router, experts, latent=square)
    with pytest.raises(ValueError, match="the edited view changes the latent projections"):
        check_same_settings(original, dataclasses.replace(original, latent=None))
    with pytest.raises(ValueError, match="the edited view changes the latent projections"):
        check_same_settings(dataclasses.replace(original, latent=None), original)


def test_a_multi_token_prediction_layer_is_edited_with_the_others_or_left_out_whole(tmp_path):
    """DeepSeek-V3 stores its multi-token prediction module as `model.layers.<num_hidden_layers>.*`,
    a layer with routed experts that transformers does not build. Dropping experts "in every MoE
    layer" drops them there too (its tensors outside the experts copied, num_nextn_predict_layers
    kept, transformers' reload tolerating the layer it does not build); an edit that does not reach
    it leaves it out whole (num_nextn_predict_layers 0) rather than written with the old expert count."""
    from safetensors.torch import load_file

    src = tmp_path / "src"
    build("deepseek_v3", num_hidden_layers=2, first_k_dense_replace=1).save_pretrained(src)
    mtp = add_mtp_layer(src)
    config = json.loads((src / "config.json").read_text())
    drop_experts(src, tmp_path / "both", [1, 5], quiet=True)  # one of each group of 4
    written = load_file(tmp_path / "both" / "model.safetensors")
    assert json.loads((tmp_path / "both" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    kept = [0, 2, 3, 4, 6, 7]
    assert torch.equal(written["model.layers.2.mlp.gate.weight"], mtp["model.layers.2.mlp.gate.weight"][kept])
    for new, old in enumerate(kept):
        name = "model.layers.2.mlp.experts.{}.down_proj.weight"
        assert torch.equal(written[name.format(new)], mtp[name.format(old)])
    assert torch.equal(written["model.layers.2.eh_proj.weight"], mtp["model.layers.2.eh_proj.weight"])
    assert json.loads((tmp_path / "both" / EXPERT_MAP_NAME).read_text())["layers"]["2"]["kept"] == kept

    with pytest.warns(UserWarning, match=r"stored layers model.layers.2. \(.* past num_hidden_layers .* left out of the output"):
        drop_experts(src, tmp_path / "out", {1: [1, 5]}, quiet=True)
    assert not [key for key in _tensors(tmp_path / "out") if key.startswith("model.layers.2.")]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_nextn_predict_layers"] == 0 and written["n_routed_experts"] == config["n_routed_experts"] - 2
    drop_experts(tmp_path / "out", tmp_path / "again", [0, 3], quiet=True)  # nothing left to warn about


def test_an_expert_map_that_does_not_match_the_weights_is_refused_before_writing(mixtral, tmp_path):
    """Weights replaced after moelab pruned them, the pruned model's map left beside them: the map
    names 3 experts a layer, the weights hold 4 (before: an IndexError after the whole write)."""
    import shutil

    drop_experts(mixtral, tmp_path / "pruned", [1], quiet=True)
    mixed = tmp_path / "mixed"
    shutil.copytree(mixtral, mixed)
    shutil.copy(tmp_path / "pruned" / EXPERT_MAP_NAME, mixed)
    with pytest.raises(ValueError, match=r"lists 3 experts for layer 0, but the checkpoint holds 4: the map does not"):
        drop_experts(mixed, tmp_path / "out", [0], quiet=True)
    assert not (tmp_path / "out").exists()


def test_weights_linked_from_elsewhere_and_a_named_index(tmp_path):
    """A weights file that is a link to outside the checkpoint (a --local-dir download, a hand-made
    directory) is read through and never linked into the output, nor is a pickle linked from
    elsewhere; an index that config.json's transformers_weights names is rewritten under that name."""
    import os

    src, blobs = tmp_path / "src", tmp_path / "blobs"
    blobs.mkdir()
    build("mixtral").save_pretrained(src)
    for name, data in [("model.safetensors", None), ("pytorch_model.bin", b"stale")]:
        if data is None:
            (src / name).rename(blobs / name)
        else:
            (blobs / name).write_bytes(data)
        os.symlink(blobs / name, src / name)
    drop_experts(src, tmp_path / "out", [1], quiet=True)
    out = tmp_path / "out"
    assert not [p.name for p in out.iterdir() if p.is_symlink()] and not (out / "pytorch_model.bin").exists()
    assert load(out).config.num_local_experts == 3

    named = tmp_path / "named"
    build("mixtral").save_pretrained(named, max_shard_size="20KB")
    (named / "model.safetensors.index.json").rename(named / "custom.safetensors.index.json")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps(config | {"transformers_weights": "custom.safetensors.index.json"}))
    drop_experts(named, tmp_path / "named_out", [1], quiet=True)
    out = tmp_path / "named_out"
    index = json.loads((out / "custom.safetensors.index.json").read_text())
    assert all((out / shard).is_file() for shard in index["weight_map"].values())
    assert not (out / "model.safetensors.index.json").exists()
    assert load(out).config.num_local_experts == 3


def test_native_checkpoint_without_renormalisation_reads_as_the_model(tmp_path):
    """A moelab checkpoint with renormalize=False: the view's layer computes the model's own."""
    model = _native(tmp_path, renormalize=False)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    with open_checkpoint(tmp_path / "src") as view:
        for i, layer in model.moe_layers.items():
            assert view.layer(i).router.renormalize is False
            with torch.no_grad():
                expected, _ = layer(x)
                got, _ = moe_layer_from_view(view.layer(i))(x)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


_CHANGED_SETTINGS = [
    ("deepseek_v3", "router", "score_func", "softmax"),
    ("deepseek_v3", "router", "top_k", 1),
    ("deepseek_v3", "router", "renormalize", False),
    ("deepseek_v3", "router", "route_scale", 1.0),
    ("deepseek_v3", "router", "n_group", 4),
    ("deepseek_v3", "router", "topk_group", 2),
    ("phimoe", "router", "jitter_eps", 0.5),
    ("mixtral", "experts", "activation", "clamped_swiglu"),
    ("gpt_oss", "experts", "swiglu_alpha", 1.0),
    ("gpt_oss", "experts", "swiglu_limit", 3.0),
    ("gpt_oss", "experts", "scale_input", True),
]


@pytest.mark.parametrize(
    "family,part,name,value", _CHANGED_SETTINGS, ids=[f"{f}-{n}" for f, _, n, _ in _CHANGED_SETTINGS]
)
def test_an_edit_that_changes_a_setting_is_refused(tmp_path, family, part, name, value):
    """Routing and activation settings live in config.json, which the writer keeps: an edited view
    whose setting differs from the checkpoint's is refused, naming that setting."""
    from moelab.hf.edit import check_same_settings

    src = tmp_path / "src"
    build(family).save_pretrained(src)
    with open_checkpoint(src) as view:
        layer = next(layer for layer in view.layers() if isinstance(layer, MoELayerView))
    changes = {name: value}
    if name == "activation":
        changes |= {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
    assert getattr(getattr(layer, part), name) != value
    edited = dataclasses.replace(layer, **{part: dataclasses.replace(getattr(layer, part), **changes)})
    message = rf"the edited {part} has {name}={value!r} but the checkpoint's is"
    with pytest.raises(ValueError, match=message):
        check_same_settings(layer, edited)
    E = layer.router.num_experts
    with pytest.raises(ValueError, match=message):
        write_checkpoint(
            src, tmp_path / "out", {layer.index: LayerEdit(tuple((e,) for e in range(E)), view=edited)}, quiet=True
        )
    assert not (tmp_path / "out").exists()


def test_an_fp32_edit_of_a_bf16_source_is_written_in_bf16(tmp_path):
    """Merged and narrowed tensors given in float32 are stored in the source's dtype."""
    src, out = tmp_path / "src", tmp_path / "out"
    build("qwen3_moe").to(torch.bfloat16).save_pretrained(src)
    with open_checkpoint(src) as view:
        layer = _narrow_and_merge(view.layer(1))
    fp32 = lambda t: None if t is None else t.float()  # noqa: E731
    edited = dataclasses.replace(
        layer,
        router=dataclasses.replace(layer.router, weight=fp32(layer.router.weight)),
        experts=dataclasses.replace(layer.experts, gate=fp32(layer.experts.gate), up=fp32(layer.experts.up),
                                    down=fp32(layer.experts.down)),
    )
    assert edited.experts.gate.dtype == edited.router.weight.dtype == torch.float32
    write_checkpoint(src, out, {1: LayerEdit(((0, 1), (2,), (3,)), view=edited)}, quiet=True)
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(dtypes.values()) == {"BF16"}, {k: d for k, d in dtypes.items() if d != "BF16"}
    written = open_checkpoint(out).layer(1)
    assert written.router.weight.dtype == written.experts.gate.dtype == torch.bfloat16
    assert torch.equal(written.experts.gate, edited.experts.gate.to(torch.bfloat16))


def test_a_merge_across_routing_groups_is_refused(tmp_path):
    """DeepSeek group-limited routing (8 experts, 2 groups of 4): a merged expert placed in group 0
    may not take an expert of group 1, even as its second id."""
    src = tmp_path / "src"
    build("deepseek_v3").save_pretrained(src)
    with open_checkpoint(src) as view:
        six = apply_edit(view.layer(1), LayerEdit.keep([0, 1, 2, 4, 6, 7]))  # 3 + 3 experts, tensors only
    edit = LayerEdit(((0, 5), (1,), (2,), (4,), (6,), (7,)), view=six)
    with pytest.raises(ValueError, match=r"needs every group to keep 3 experts of its own.*new expert 0 comes from \[0, 5\]"):
        write_checkpoint(src, tmp_path / "out", {1: edit}, quiet=True)
    assert not (tmp_path / "out").exists()
    write_checkpoint(src, tmp_path / "out", {1: LayerEdit(((0, 3), (1,), (2,), (4,), (6,), (7,)), view=six)}, quiet=True)


def test_a_sharded_output_index_counts_the_bytes_written(tmp_path):
    """metadata.total_size of the rewritten index is the size of every tensor in its shards."""
    from safetensors.torch import load_file

    build("mixtral").save_pretrained(tmp_path / "src", max_shard_size="20KB")
    drop_experts(tmp_path / "src", tmp_path / "out", {0: [1], 1: [2]}, quiet=True)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    tensors = {k: v for shard in shards for k, v in load_file(tmp_path / "out" / shard).items()}
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_native_checkpoint_with_expert_biases(tmp_path):
    """moelab's fused layout stores expert biases too (gate_up_bias [E, 2I], gate half first;
    down_bias [E, D]): a pruned model with them computes the masked original, bias for bias."""
    model = _native(tmp_path, expert_mlp_bias=True)
    for layer in model.moe_layers.values():  # unequal gate and up halves: swapping them shows
        assert layer.experts.gate_up_bias.abs().min() > 0
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    drop_experts(tmp_path / "src", tmp_path / "out", [1], quiet=True)
    pruned = load_pretrained(tmp_path / "out").eval()
    assert pruned.config.moe.num_experts == 3 and pruned.config.moe.expert_mlp_bias
    with open_checkpoint(tmp_path / "src") as view:
        for i in model.moe_layers:
            model.layers[i].ffn = masked_moe_layer(view.layer(i), [0, 1, 2, 3])
    # the view reads the biases as the model has them (nothing masked: the model itself)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=0)
    with open_checkpoint(tmp_path / "src") as view:
        for i in model.moe_layers:
            model.layers[i].ffn = masked_moe_layer(view.layer(i), [0, 2, 3])
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_a_family_shared_expert_gate_is_never_left_out():
    """Qwen2-MoE's shared expert always has its sigmoid gate on disk: a view without one is refused
    (written without it, transformers would load a randomly initialised gate); moelab's own
    checkpoints, where the gate is optional, write the three projections alone."""
    from moelab.hf.adapters import FAMILIES, NATIVE
    from moelab.hf.view import SharedView

    g = torch.Generator().manual_seed(0)
    shared = SharedView(*(torch.randn(*shape, generator=g) for shape in ((3, 8), (3, 8), (8, 3))))
    qwen2 = FAMILIES["qwen2_moe"].layouts[0].shared
    with pytest.raises(CheckpointError, match="shared experts have a sigmoid gate; the view has none"):
        qwen2.encode(shared, "model.layers.0.")
    gate = torch.randn(1, 8, generator=g)
    written = qwen2.encode(SharedView(shared.gate, shared.up, shared.down, gate), "model.layers.0.")
    assert torch.equal(written["model.layers.0.mlp.shared_expert_gate.weight"], gate)
    assert torch.equal(written["model.layers.0.mlp.shared_expert.down_proj.weight"], shared.down)
    native = NATIVE.layouts[0].shared.encode(shared, "layers.0.")
    assert sorted(native) == [f"layers.0.ffn.shared.{p}_proj.weight" for p in ("down", "gate", "up")]


def test_experts_with_biases_are_not_offered_as_bare_parts(tmp_path):
    """`parts` (stacked-expert slots for offloading) describes weights alone: where expert biases
    are on disk too it offers nothing, so that no reader drops them; without biases, expert e is
    row e of the fused tensors, gate rows first."""
    from moelab.hf.adapters import NATIVE
    from moelab.hf.checkpoint import Checkpoint

    experts = NATIVE.layouts[0].experts
    for bias in (True, False):
        model = _native(tmp_path / str(bias), expert_mlp_bias=bias)
        (i,) = model.moe_layers
        ckpt = Checkpoint(tmp_path / str(bias) / "src")
        try:
            parts = experts.parts(ckpt, f"layers.{i}.", 2)
        finally:
            ckpt.close()
        if bias:
            assert parts is None
            continue
        assert [(p.name, p.row, p.part) for p in parts] == [
            (f"layers.{i}.ffn.experts.gate_up_proj", 2, "gate_up"),
            (f"layers.{i}.ffn.experts.down_proj", 2, "down"),
        ]


def test_per_layer_widths_are_refused_before_writing(tmp_path):
    """Experts narrowed in one layer but not the other leave config.json no single width to hold:
    refused up front, like per-layer counts, with each layer's count x width."""
    build("mixtral").save_pretrained(tmp_path / "src")
    narrowed = _narrow_and_merge(open_checkpoint(tmp_path / "src").layer(0))
    edits = {0: LayerEdit(((0, 1), (2,), (3,)), view=narrowed), 1: LayerEdit.drop([1], 4)}
    with pytest.raises(ValueError, match=r"\(layer 0: 3 x 8, layer 1: 3 x 16; experts x width\)"):
        write_checkpoint(tmp_path / "src", tmp_path / "out", edits, quiet=True)
    assert not (tmp_path / "out").exists()


def _reshard(directory, shards: list[tuple[list[str], dict[str, str] | None]]) -> list[str]:
    """Rewrite directory's model.safetensors as shards part-i.safetensors holding the given keys
    (every other key goes to the first), each with the given header metadata; -> the shard names."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = [f"part-{i}.safetensors" for i in range(1, len(shards) + 1)]
    rest = set(tensors) - {key for keys, _ in shards for key in keys}
    weight_map = {}
    for name, (keys, metadata) in zip(names, shards):
        keys = keys + sorted(rest) if name == names[0] else keys
        save_file({key: tensors[key] for key in keys}, directory / name, metadata=metadata)
        weight_map |= dict.fromkeys(keys, name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


@pytest.mark.parametrize("second_shard", ["expert 3", "lm_head"])
def test_shard_names_and_metadata_are_the_sources_unless_a_shard_empties(mixtral, tmp_path, second_shard):
    """The output keeps each shard's header metadata (a shard without any gets {"format": "pt"}),
    and the shards' names while every shard keeps tensors; a shard left empty (one that held only
    edited experts: their new tensors go to the router's shard) is not written and the rest are
    renumbered -0000i-of-0000n."""
    from safetensors.torch import load_file

    keys = load_file(mixtral / "model.safetensors")
    second = [key for key in keys if ".experts.3." in key] if second_shard == "expert 3" else ["lm_head.weight"]
    names = _reshard(mixtral, [([], {"format": "pt", "producer": "test"}), (second, None)])
    out = drop_experts(mixtral, tmp_path / "out", [2], quiet=True)
    written = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    metadata = []
    for name in written:
        with safe_open(out / name, "pt") as f:
            metadata.append(f.metadata())
    if second_shard == "expert 3":
        assert written == ["model-00001-of-00001.safetensors"] and metadata == [{"format": "pt", "producer": "test"}]
    else:
        assert written == names and metadata == [{"format": "pt", "producer": "test"}, {"format": "pt"}]
    assert sorted(p.name for p in out.glob("*.safetensors")) == written


@pytest.mark.parametrize(
    "family,what,key",
    [("deepseek_v3", "shared experts", "moe_intermediate_size"), ("jamba", "dense layers' MLPs", "intermediate_size")],
)
def test_narrowing_experts_whose_width_the_shared_experts_share_is_refused(tmp_path, family, what, key):
    """DeepSeek computes its shared experts' width from moe_intermediate_size, the routed experts'
    key (Jamba: its dense layers' MLPs, from intermediate_size): narrower routed experts would
    narrow them in config.json too, so the edit is refused by name before anything is written;
    the same experts at full width are written."""
    src = tmp_path / "src"
    build(family).save_pretrained(src)
    with open_checkpoint(src) as view:
        layer = view.layer(1)
    ex, E = layer.experts, layer.router.num_experts
    half = ex.hidden_dim // 2
    narrow = dataclasses.replace(
        layer, experts=dataclasses.replace(ex, gate=ex.gate[:, :half], up=ex.up[:, :half], down=ex.down[..., :half])
    )
    same = tuple((e,) for e in range(E))
    with pytest.raises(ValueError, match=rf"{family}'s {what} take their width from {key} "
                                         rf"too.*\({ex.hidden_dim} -> {half}\)"):  # fmt: skip
        write_checkpoint(src, tmp_path / "out", {1: LayerEdit(same, view=narrow)}, quiet=True)
    assert not (tmp_path / "out").exists()
    write_checkpoint(src, tmp_path / "out", {1: LayerEdit(same, view=layer)}, reload=False, quiet=True)


def test_narrowing_native_experts_pins_the_width_of_every_shared_expert(tmp_path):
    """shared_hidden_dim=None with two shared experts: their width was 2 x hidden_dim, and the
    written config keeps that (not one hidden_dim) when the routed experts are narrowed."""
    _native(tmp_path, num_shared=2)
    with open_checkpoint(tmp_path / "src") as view:
        views = {layer.index: _narrow_and_merge(layer) for layer in view.layers() if isinstance(layer, MoELayerView)}
    edits = {i: LayerEdit(((0, 1), (2,), (3,)), view=v) for i, v in views.items()}
    write_checkpoint(tmp_path / "src", tmp_path / "out", edits, reload=False, quiet=True)
    moe = json.loads((tmp_path / "out" / "config.json").read_text())["moe"]
    assert (moe["hidden_dim"], moe["num_shared"], moe["shared_hidden_dim"]) == (16, 2, 64)


def test_an_edited_layer_stays_in_the_shard_that_held_it(mixtral, tmp_path):
    """A layer's new router and expert tensors go to the shard its router was in (one shard plus
    one layer in memory, and the index keeps pointing where the source did), not to the first."""
    from safetensors.torch import load_file

    moved = [key for key in load_file(mixtral / "model.safetensors") if ".1.block_sparse_moe." in key]
    names = _reshard(mixtral, [([], None), (moved + ["lm_head.weight"], None)])
    out = drop_experts(mixtral, tmp_path / "out", [2], quiet=True, reload=False)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    layer_1 = {shard for key, shard in weight_map.items() if ".1.block_sparse_moe." in key}
    layer_0 = {shard for key, shard in weight_map.items() if ".0.block_sparse_moe." in key}
    assert (layer_0, layer_1) == ({names[0]}, {names[1]})


def test_the_postcondition_checks_a_selection_against_the_original_not_the_edited_view(mixtral, tmp_path, monkeypatch):
    """Dropping experts is checked against the original layer with their routing masked, so a
    selection that picks the wrong experts is refused, however consistent the tensors it writes."""
    import moelab.hf.writer as writer_module

    real = writer_module.apply_edit
    monkeypatch.setattr(writer_module, "apply_edit", lambda layer, edit: real(layer, LayerEdit.keep([0, 1, 2])))
    with pytest.raises(WriteCheckError, match=r"layer 0 differs from the edit applied to the original"):
        drop_experts(mixtral, tmp_path / "out", [0], quiet=True, reload=False)
    assert not (tmp_path / "out").exists()


def test_a_dense_layer_stored_beyond_the_layer_count_is_copied(tmp_path):
    """Only layers past num_hidden_layers that hold routed experts are left out (their expert
    count would disagree with config.json); a dense one stored there is copied like any other
    tensor the edit does not touch, without a warning and with num_nextn_predict_layers kept."""
    import warnings

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    build("deepseek_v3", num_hidden_layers=2, first_k_dense_replace=1).save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    extra = {k.replace("model.layers.0.", "model.layers.2."): v.clone() for k, v in tensors.items() if k.startswith("model.layers.0.")}
    save_file(tensors | extra, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_experts(src, tmp_path / "out", [1, 5], quiet=True, reload=False)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in extra.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_the_expert_map_lists_merged_ids_in_increasing_order(tmp_path):
    """A merge group given as (1, 0) is recorded as [0, 1] in sources and merge_groups (the
    order of a group's ids means nothing; compress's report lists them sorted too)."""
    src = tmp_path / "src"
    build("qwen3_moe").save_pretrained(src)
    with open_checkpoint(src) as view:
        moe_layers = [i for i in range(2) if i not in TINY["qwen3_moe"].dense]
        edits = {i: LayerEdit(((1, 0), (2,), (3,)), view=_narrow_and_merge(view.layer(i))) for i in moe_layers}
    write_checkpoint(src, tmp_path / "out", edits, reload=False, quiet=True)
    layer = json.loads((tmp_path / "out" / EXPERT_MAP_NAME).read_text())["layers"][str(moe_layers[-1])]
    assert (layer["sources"], layer["merge_groups"], layer["kept"]) == ([[0, 1], [2], [3]], [[0, 1]], [2, 3])


def test_a_second_edit_of_some_layers_keeps_the_record_of_the_others(mixtral, tmp_path):
    """The expert map of an edit of layer 1 alone (of a checkpoint moelab edited before) still
    records layer 0's earlier edit, and composes layer 1's with it."""
    drop_experts(mixtral, tmp_path / "a", [1], quiet=True, reload=False)  # keeps 0, 2, 3
    first = json.loads((tmp_path / "a" / EXPERT_MAP_NAME).read_text())["layers"]
    write_checkpoint(tmp_path / "a", tmp_path / "b", {1: LayerEdit.keep([0, 1, 2])}, quiet=True, reload=False)
    layers = json.loads((tmp_path / "b" / EXPERT_MAP_NAME).read_text())["layers"]
    assert layers["0"] == first["0"] and layers["0"]["kept"] == [0, 2, 3]
    assert layers["1"]["kept"] == [0, 2, 3] and layers["1"]["tensors_replaced"] is False


def test_a_chained_edit_s_expert_map_names_the_original_checkpoint(mixtral, tmp_path):
    """The map's ids are the original checkpoint's after any number of edits, so its "source" is
    that checkpoint too, not the intermediate one the last edit read."""
    drop_experts(mixtral, tmp_path / "a", [1], quiet=True, reload=False)  # keeps 0, 2, 3
    drop_experts(tmp_path / "a", tmp_path / "b", [0], quiet=True, reload=False)  # keeps 2, 3 of the original
    doc = json.loads((tmp_path / "b" / EXPERT_MAP_NAME).read_text())
    assert doc["layers"]["0"]["kept"] == [2, 3]
    assert doc["source"] == str(mixtral.resolve())


def test_the_expert_map_records_whether_an_edit_replaced_the_tensors(mixtral, tmp_path):
    """tensors_replaced is true for an edit that brings its own tensors (view), even one that
    only selects experts, and false for a plain selection."""
    with open_checkpoint(mixtral) as view:
        edits = {i: LayerEdit(((0,), (2,), (3,)), view=apply_edit(view.layer(i), LayerEdit.keep([0, 2, 3]))) for i in (0, 1)}
    write_checkpoint(mixtral, tmp_path / "out", edits, quiet=True, reload=False)
    layers = json.loads((tmp_path / "out" / EXPERT_MAP_NAME).read_text())["layers"]
    assert [(layer["kept"], layer["tensors_replaced"]) for layer in layers.values()] == [([0, 2, 3], True)] * 2


def test_moelab_files_about_the_source_are_not_copied(mixtral, tmp_path):
    """The source's own compression report and calibration statistics describe the source, not
    the output: they are left behind (the expert map is remade), other side files are copied."""
    (mixtral / "moelab_compression.json").write_text('{"stale": true}')
    (mixtral / "moelab_calibration").mkdir()
    (mixtral / "moelab_calibration" / "stats.json").write_text("{}")
    (mixtral / "notes.md").write_text("kept")
    out = drop_experts(mixtral, tmp_path / "out", [1], quiet=True, reload=False)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("moelab_")) == [EXPERT_MAP_NAME]
    assert (out / "notes.md").read_text() == "kept"


def test_an_edit_whose_tensors_hold_nan_is_blamed_before_anything_is_written(mixtral, tmp_path):
    """A NaN or Inf in an edit's own tensors is refused as the edit's fault, by layer and tensor
    name, before the shard is written (not left to the postconditions to report as moelab's)."""
    with open_checkpoint(mixtral) as view:
        layer = view.layer(0)
    down = layer.experts.down.clone()
    down[1, 0, 0] = float("inf")
    bad = dataclasses.replace(layer, experts=dataclasses.replace(layer.experts, down=down))
    edits = {0: LayerEdit(((0,), (1,), (2,), (3,)), view=bad)}
    with pytest.raises(CheckpointError, match=r"layer 0: the edited tensor .*experts\.1\.w2\.weight has NaN or Inf; fix the edit"):
        write_checkpoint(mixtral, tmp_path / "out", edits, quiet=True, reload=False)
    assert not (tmp_path / "out").exists()


def test_a_shard_that_held_only_an_edited_layer_is_written_with_its_new_tensors(mixtral, tmp_path):
    """Every tensor of a shard that held only layer 1's router and experts is replaced by the
    edit; the shard still receives the layer's new tensors under its own name."""
    from safetensors.torch import load_file

    moved = [key for key in load_file(mixtral / "model.safetensors") if ".1.block_sparse_moe." in key]
    names = _reshard(mixtral, [([], None), (moved, None)])
    out = drop_experts(mixtral, tmp_path / "out", [2], quiet=True, reload=False)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {shard for key, shard in weight_map.items() if ".1.block_sparse_moe." in key} == {names[1]}
    assert sorted(p.name for p in out.glob("*.safetensors")) == names


def test_an_edit_that_would_make_jamba_s_moe_layers_dense_is_refused(tmp_path):
    """Jamba builds a layer of one expert as a plain MLP: top-1 routing pruned to one expert per
    layer is refused by name before anything is written; two experts are written."""
    src = tmp_path / "src"
    build("jamba", num_experts_per_tok=1).save_pretrained(src)
    with pytest.raises(ValueError, match=r"with 1 expert\(s\) per layer, jamba's config.json would make MoE layers \[1\] dense"):
        drop_experts(src, tmp_path / "out", [1, 2, 3], quiet=True)
    assert not (tmp_path / "out").exists()
    drop_experts(src, tmp_path / "out", [2, 3], quiet=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 2


def test_the_reload_check_runs_where_the_model_fits_and_is_skipped_with_a_warning_elsewhere(
    mixtral, tmp_path, monkeypatch
):
    """reload=None (the default): transformers' whole-model reload runs where the output's weights
    (x RELOAD_MARGIN) fit in what the kernel reports available, else it is skipped with a warning
    that says so (the per-layer checks ran); True runs it regardless, False never."""
    from safetensors.torch import load_file

    import moelab.hf.writer as writer

    loaded = []
    monkeypatch.setattr(writer, "check_reload", lambda path, *args, **kwargs: loaded.append(path.name))
    size = sum(t.nbytes for t in load_file(mixtral / "model.safetensors").values())
    for available, reload, runs in [(None, None, True), (10 * size, None, True), (size, None, False),
                                    (size, True, True), (10 * size, False, False)]:  # fmt: skip
        monkeypatch.setattr(writer, "available_memory", lambda: available)
        loaded.clear()
        out = tmp_path / f"out-{available}-{reload}"
        if runs or reload is False:
            drop_experts(mixtral, out, [0], reload=reload, quiet=True)
        else:
            with pytest.warns(UserWarning, match=r"reload check was skipped: loading .* takes about .* GiB and"):
                drop_experts(mixtral, out, [0], reload=reload, quiet=True)
        assert bool(loaded) == runs and (out / "config.json").is_file(), (available, reload)


def test_the_reload_estimate_of_a_moelab_checkpoint_counts_the_float32_model_it_builds(tmp_path, monkeypatch):
    """moelab.models.load_pretrained builds the model in float32 and copies the file's tensors in:
    a bf16 checkpoint loads as twice its bytes, so it needs what its float32 twin does (before:
    half that, and the reload ran where it would not fit)."""
    from safetensors.torch import load_file

    import moelab.hf.writer as writer

    save_pretrained(_native(tmp_path).to(torch.bfloat16), tmp_path / "bf16")
    loaded = sum(t.numel() * 4 for t in load_file(tmp_path / "src" / "model.safetensors").values())  # float32
    for directory in ("src", "bf16"):
        monkeypatch.setattr(writer, "available_memory", lambda: int(loaded * writer.RELOAD_MARGIN))
        assert writer.reload_fits(tmp_path / directory), directory
        monkeypatch.setattr(writer, "available_memory", lambda: int(loaded * writer.RELOAD_MARGIN) - 1)
        with pytest.warns(UserWarning, match="reload check was skipped"):
            assert not writer.reload_fits(tmp_path / directory), directory


def test_the_skipped_reload_s_warning_names_the_output_not_its_staging_directory(mixtral, tmp_path, monkeypatch):
    import moelab.hf.writer as writer

    monkeypatch.setattr(writer, "available_memory", lambda: 1)
    with pytest.warns(UserWarning, match=r"reload check was skipped: loading pruned takes about"):
        drop_experts(mixtral, tmp_path / "pruned", [0], quiet=True)


def test_the_source_is_loaded_to_blame_only_where_it_fits(mixtral, tmp_path, monkeypatch):
    """Where the output fails its reload, the writer loads the source the same way to tell a broken
    source from a moelab bug: only where the source fits in memory too (else the output's failure
    is reported as it is)."""
    from safetensors.torch import load_file

    import moelab.hf.writer as writer

    sources = []
    monkeypatch.setattr(writer, "check_reload", lambda path, *args, source=None, **kwargs: sources.append(source))
    needed = writer.RELOAD_MARGIN * sum(t.nbytes for t in load_file(mixtral / "model.safetensors").values())
    for available, blamed in [(int(needed), True), (int(needed) - 1, False)]:
        monkeypatch.setattr(writer, "available_memory", lambda: available)
        sources.clear()
        drop_experts(mixtral, tmp_path / f"out{available}", [0], reload=True, quiet=True)
        assert sources == [mixtral.resolve() if blamed else None], available


def test_an_mtp_layer_edited_to_another_expert_count_or_a_dense_layer_edited_is_refused(tmp_path):
    """config.json holds one expert count, which the MTP layer reads too: an edit leaving it with
    another count than the other MoE layers is refused, and so is one naming a dense layer."""
    src = tmp_path / "src"
    build("deepseek_v3", num_hidden_layers=2, first_k_dense_replace=1).save_pretrained(src)
    add_mtp_layer(src)
    with pytest.raises(ValueError, match=r"different expert counts.*layer 1: 6 x .*layer 2: 4 x"):
        drop_experts(src, tmp_path / "counts", {1: [1, 5], 2: [1, 2, 5, 6]}, quiet=True)
    with pytest.raises(ValueError, match=r"layers \[0\] are not MoE layers.*multi-token prediction layers \[2\]"):
        drop_experts(src, tmp_path / "dense", {0: [1, 5], 1: [1, 5], 2: [1, 5]}, quiet=True)


def test_jetmoe_keeps_its_expert_count_narrows_its_experts_and_copies_its_block_bias(tmp_path):
    """JetMoE's num_local_experts also sizes its attention's experts (self_attention.experts), so
    the writer refuses to change the count (test_drop_half_the_experts) but writes narrower experts:
    transformers reloads the output strictly, its mlp computes the narrowed view (the bias
    included), and mlp.bias and the attention's tensors are the source's, byte for byte."""
    src, out = tmp_path / "src", tmp_path / "out"
    build("jetmoe").save_pretrained(src)
    with open_checkpoint(src) as view:
        layers = {i: view.layer(i) for i in range(2)}
    edits = {}
    for i, layer in layers.items():
        e = layer.experts
        narrow = dataclasses.replace(e, gate=e.gate[:, :8].clone(), up=e.up[:, :8].clone(), down=e.down[:, :, :8].clone())
        edits[i] = LayerEdit(tuple((j,) for j in range(4)), dataclasses.replace(layer, experts=narrow))
    write_checkpoint(src, out, edits, reload=True, quiet=True)
    cls, _ = language_model_class(AutoConfig.from_pretrained(out))
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 8
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))
    for i, edit in edits.items():
        expected = moe_output(edit.view, x.reshape(-1, D)).float().view_as(x)
        torch.testing.assert_close(block_output("jetmoe", model.eval(), i, x), expected, atol=1e-5, rtol=0)
    with safe_open(src / "model.safetensors", "pt") as before, safe_open(out / "model.safetensors", "pt") as after:
        kept = [k for k in before.keys() if k.endswith("mlp.bias") or ".self_attention." in k]
        assert any(k.endswith("mlp.bias") for k in kept) and any("self_attention.experts.router" in k for k in kept)
        for key in kept:
            assert torch.equal(before.get_tensor(key), after.get_tensor(key)), key


def test_native_groups_spanning_identity_experts_keep_every_expert(tmp_path):
    """6 choices (4 experts, 2 identity experts) in 2 groups of 3: an edit changing the experts' count
    would move the identity experts into other groups; refused by name."""
    _native(tmp_path, identity_experts=2, n_group=2, topk_group=1)
    with pytest.raises(ValueError, match="groups span its 2 identity experts"):
        drop_experts(tmp_path / "src", tmp_path / "out", [1], quiet=True)
    assert not (tmp_path / "out").exists()
