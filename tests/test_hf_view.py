"""moelab.hf: open transformers MoE checkpoints as per-layer views, lazily, with clear errors.

Every family: a tiny random transformers model is saved (default per-expert format and, where
it differs, fused `save_original_format=False`), opened through the view, and the layer built
by `moe_layer_from_view` must match transformers' own MoE block on random hidden states.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from hf_tiny import TINY, D, block_output, build, load
from reference import gelu_tanh, silu
from safetensors.torch import load_file, save_file

from moelab import files as files_module
from moelab.hf import (
    FAMILIES,
    CheckpointError,
    DenseLayerView,
    ExpertsView,
    LatentView,
    MoELayerView,
    RouterView,
    SharedView,
    moe_layer_from_view,
    open_checkpoint,
)
from moelab.hf.checkpoint import Checkpoint, side_files
from moelab.hf.native import empty_experts, experts_from_view, router_from_view
from moelab.nn import GateClampedSwiGLU, GeluTanhGLU, SoftcappedSwiGLU

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(family, True) for family in TINY] + [(family, False) for family, tiny in TINY.items() if tiny.fused]


def _save(family: str, path, original: bool = True, **kwargs) -> None:
    build(family).save_pretrained(path, save_original_format=original, **kwargs)


def _assert_matches_transformers(view, family: str, model, dense: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 7, D)
    for layer in view.layers():
        if layer.index in dense:
            assert isinstance(layer, DenseLayerView), f"layer {layer.index} should be dense"
            continue
        assert isinstance(layer, MoELayerView)
        expected = block_output(family, model, layer.index, x)
        with torch.no_grad():
            got, _ = moe_layer_from_view(layer)(x)
        assert expected.abs().max() > 0.1, "outputs too small for the tolerance to mean anything"
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family,original", CASES, ids=[f"{f}-{'per_expert' if o else 'fused'}" for f, o in CASES]
)
def test_view_matches_transformers(tmp_path, family, original):
    _save(family, tmp_path, original)
    with open_checkpoint(tmp_path) as view:
        assert view.family == family
        assert view.num_layers == 2
        _assert_matches_transformers(view, family, load(tmp_path), TINY[family].dense)


@pytest.mark.parametrize(
    "family,original", CASES, ids=[f"{f}-{'per_expert' if o else 'fused'}" for f, o in CASES]
)
def test_reading_some_experts_equals_slicing_the_whole_layer(tmp_path, family, original):
    """view.experts(i, range(a, b)) reads experts a..b-1 alone, in every family and layout."""
    _save(family, tmp_path, original)
    with open_checkpoint(tmp_path) as view:
        for whole in view.layers():
            if not isinstance(whole, MoELayerView):
                continue
            E = whole.experts.num_experts
            for experts in (range(0, 1), range(E - 1, E), range(1, E - 1)):
                part = view.experts(whole.index, experts)
                assert part.num_experts == len(experts)
                for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                    full = getattr(whole.experts, name)
                    if full is None:
                        assert getattr(part, name) is None
                    else:
                        assert torch.equal(getattr(part, name), full[experts.start : experts.stop]), name
            with pytest.raises(CheckpointError):
                view.experts(whole.index, range(E, E + 1))


def test_checkpoint_rewritten_while_in_use_is_refused(tmp_path):
    _save("qwen2_moe", tmp_path)
    with open_checkpoint(tmp_path) as view:
        list(view.layers())
        [shard] = tmp_path.glob("*.safetensors")
        tensors = load_file(shard)
        save_file(tensors | {"extra": torch.zeros(3)}, shard, metadata={"format": "pt"})  # rewritten in place
        with pytest.raises(CheckpointError, match="changed on disk while moelab was reading it"):
            list(view.layers())
    with open_checkpoint(tmp_path) as view:  # the same size, rewritten in place, its time set back
        list(view.layers())
        before = shard.stat()
        with open(shard, "r+b") as f:
            f.seek(before.st_size - 4)
            f.write(b"\x00\x00\x80\x7f")  # a tensor's last number: now +inf
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        with pytest.raises(CheckpointError, match="changed on disk while moelab was reading it"):
            list(view.layers())


def test_a_tensor_first_read_after_its_shard_was_rewritten_is_refused(tmp_path):
    """One tensor of a shard was read, then the shard rewritten in place: reading another tensor
    of it is refused too (the checkpoint would mix two versions of the model)."""
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, path)
    with Checkpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.get("a"), torch.zeros(4))
        save_file({"a": torch.ones(4), "b": torch.ones(4)}, path)
        with pytest.raises(CheckpointError, match="changed on disk while moelab was reading it"):
            ckpt.get("b")


def _read_w(ckpt, read: str) -> None:
    """Read tensor "w" [8, 8] the way `read` names: Checkpoint.get or read_into."""
    if read == "get":
        ckpt.get("w")
    else:
        ckpt.read_into("w", torch.empty(8, 8))


@pytest.mark.parametrize("read", ["get", "read_into"])
def test_a_shard_truncated_after_it_was_opened_is_refused(tmp_path, read):
    """The shard's header was read (and its handle opened) before the file lost its tail: reading
    a tensor that ends past the new end is refused, not returned with zeros in place of its tail."""
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.shape("w") == (8, 8)  # opens the shard
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate((tmp_path / "model.safetensors").stat().st_size - 16)
    with pytest.raises(CheckpointError, match="truncated"):
        _read_w(ckpt, read)
    ckpt.close()


def test_a_shard_that_links_to_nothing_is_refused_at_opening_as_such_not_as_removed(tmp_path):
    """A dangling link among the shards (a Hub cache whose blob is gone) was never there: refused
    when the checkpoint opens, naming the link, not as a shard removed while in use."""
    save_file({"w": torch.zeros(8, 8)}, tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "blob-gone")
    with pytest.raises(CheckpointError, match=r"b\.safetensors links to .*blob-gone, which does not exist") as refused:
        Checkpoint(tmp_path)
    assert "removed while" not in str(refused.value)


@pytest.mark.parametrize("read", ["get", "read_into", "header"])
def test_a_shard_removed_after_the_checkpoint_was_opened_is_refused_clearly(tmp_path, read):
    """The index was checked when the checkpoint opened; a shard deleted since is a CheckpointError
    naming it and the fix, not FileNotFoundError (offloading reads experts long after opening)."""
    save_file({"w": torch.zeros(8, 8)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    if read != "header":
        ckpt.shape("w")  # the header read: the shard's identity recorded
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors was removed while moelab was using the checkpoint"):
        _read_w(ckpt, "get" if read == "header" else read)
    ckpt.close()


@pytest.mark.parametrize("read", ["get", "read_into"])
def test_a_shard_rewritten_while_a_tensor_is_read_is_refused(tmp_path, monkeypatch, read):
    """A writer rewrites the shard in place (same size, finite numbers) after the read's check and
    before its bytes arrive: refused (before: the new bytes came back as the tensor, a model mixing
    two versions; offloading reads its experts so, long after the checkpoint was opened)."""
    from moelab.hf import checkpoint as checkpoint_module

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(8, 8)}, path)
    ckpt = Checkpoint(tmp_path)
    ckpt.shape("w")  # the header read: the shard's identity recorded

    def rewrite_first():
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size - 4)
            f.write(torch.tensor([1.0]).numpy().tobytes())  # the last number: 0 -> 1
        written = path.stat()  # its time moved on, past the clock's granularity however fast this ran
        os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns + 10**9))

    preadv, file_open = os.preadv, open

    def rewriting_preadv(fd, buffers, offset):
        rewrite_first()
        return preadv(fd, buffers, offset)

    class RewritingFile:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readinto(self, data):
            rewrite_first()
            return self.f.readinto(data)

    monkeypatch.setattr(os, "preadv", rewriting_preadv)
    monkeypatch.setattr(checkpoint_module, "open", lambda *a: RewritingFile(file_open(*a)), raising=False)
    with pytest.raises(CheckpointError, match="changed on disk while moelab was reading it"):
        _read_w(ckpt, read)
    ckpt.close()


@pytest.mark.parametrize("shapes_only", [False, True], ids=["tensors", "shapes_only"])
def test_checkpoint_reads_rows_of_the_first_dim_only(tmp_path, shapes_only):
    """get(name, rows) is the step-1 range's entries of the first dim; a range with another step,
    past the end of the dim, or of a 0-d tensor is refused (never the next tensor's bytes)."""
    w = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    save_file({"w": w, "after": torch.ones(8), "scalar": torch.tensor(1.0)}, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path, shapes_only=shapes_only) as ckpt:
        part = ckpt.get("w", range(2, 5))
        assert part.shape == (3, 8)
        if not shapes_only:
            assert torch.equal(part, w[2:5])
        for name, rows in [("w", range(0, 9)), ("w", range(7, 9)), ("w", range(0, 8, 2)), ("scalar", range(0, 1))]:
            with pytest.raises(CheckpointError, match="expected a step-1 range"):
                ckpt.get(name, rows)


@pytest.mark.parametrize("shapes_only", [False, True], ids=["tensors", "shapes_only"])
def test_a_tensor_of_a_dtype_moelab_does_not_read_is_named(tmp_path, shapes_only):
    save_file({"u": torch.zeros(4, dtype=torch.uint16)}, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path, shapes_only=shapes_only) as ckpt:
        with pytest.raises(CheckpointError, match="'u' .* has the unsupported dtype U16"):
            ckpt.get("u")


def test_side_files_are_neither_weights_nor_indexes_code_or_config(tmp_path):
    names = [
        "config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
        "pytorch_model.bin", "consolidated.pth", "model.gguf", "modeling_evil.py", ".gitattributes",
        "tokenizer.json", "generation_config.json", "LICENSE", "chat_template.jinja",
    ]  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("{}")
    (tmp_path / "original").mkdir()
    assert [p.name for p in side_files(tmp_path)] == [
        "LICENSE", "chat_template.jinja", "generation_config.json", "tokenizer.json"
    ]


def test_view_layouts_and_settings(tmp_path):
    """Spot checks of what the view reports: GPT-OSS de-interleaved and transposed with biases
    and its clamped activation; DeepSeek-V3 sigmoid routing with groups and correction bias."""
    model = build("gpt_oss")
    model.save_pretrained(tmp_path / "gpt_oss")
    layer = open_checkpoint(tmp_path / "gpt_oss").layer(0)
    experts = model.model.layers[0].mlp.experts
    torch.testing.assert_close(
        layer.experts.gate, experts.gate_up_proj[..., ::2].transpose(1, 2), atol=0, rtol=0
    )
    torch.testing.assert_close(layer.experts.up_bias, experts.gate_up_proj_bias[:, 1::2], atol=0, rtol=0)
    torch.testing.assert_close(layer.experts.down, experts.down_proj.transpose(1, 2), atol=0, rtol=0)
    assert (layer.experts.activation, layer.experts.swiglu_limit) == ("clamped_swiglu", 0.5)
    assert layer.router.bias is not None and layer.router.renormalize

    _save("deepseek_v3", tmp_path / "v3")
    router = open_checkpoint(tmp_path / "v3").layer(1).router
    assert (router.score_func, router.n_group, router.topk_group, router.route_scale) == (
        "sigmoid",
        2,
        1,
        2.5,
    )
    assert router.selection_bias.shape == (8,) and router.renormalize


def test_sharded_checkpoint_is_read_one_layer_and_one_shard_at_a_time(tmp_path, monkeypatch):
    _save("mixtral", tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2

    open_now, most_open = [0], [0]
    real_safe_open = files_module.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self._handle = real_safe_open(*args, **kwargs)
            open_now[0] += 1
            most_open[0] = max(most_open[0], open_now[0])

        def __enter__(self):
            return self

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self._handle.__exit__(*exc)

    monkeypatch.setattr(files_module, "safe_open", CountingHandle)
    view = open_checkpoint(tmp_path)
    read = []
    real_get = view._checkpoint.get
    monkeypatch.setattr(view._checkpoint, "get", lambda name: read.append(name) or real_get(name))
    view.layer(1)
    assert read and all(".layers.1." in name for name in read)
    _assert_matches_transformers(view, "mixtral", load(tmp_path), ())
    assert most_open[0] == 1
    view.close()
    assert open_now[0] == 0


@pytest.mark.parametrize("family,original", [("qwen2_moe", True), ("deepseek_v3", False)])
def test_unknown_model_type_uses_structural_fallback(tmp_path, family, original):
    """qwen2_moe per-expert (shared expert + sigmoid gate, softmax) and deepseek_v3 fused
    (correction bias -> sigmoid, groups, scaling) renamed to an unknown model_type."""
    model = build(family)
    model.save_pretrained(tmp_path, save_original_format=original)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "my_new_moe"}))
    view = open_checkpoint(tmp_path)
    assert view.family == "my_new_moe (structural)"
    _assert_matches_transformers(view, family, model, TINY[family].dense)


@pytest.mark.parametrize("norm", [None, 1.0])
def test_dbrx_null_normalize_expert_weights_means_no_normalisation(tmp_path, norm):
    """transformers' DBRX router divides the top-k weights by their norm only if
    moe_normalize_expert_weights is not None: an explicit null is not the default 1.0."""
    ffn = {**TINY["dbrx"].config["ffn_config"], "moe_normalize_expert_weights": norm}
    model = build("dbrx", ffn_config=ffn)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["ffn_config"].items() >= ffn.items()
    with open_checkpoint(tmp_path) as view:
        assert view.layer(0).router.renormalize is (norm is not None)
        _assert_matches_transformers(view, "dbrx", model, ())


@pytest.mark.parametrize("family", ["deepseek_v3"])  # (Qwen3-MoE's config refuses a null)
def test_a_null_norm_topk_prob_is_false_as_in_transformers(tmp_path, family):
    """transformers' routers test `if config.norm_topk_prob:`, so an explicit null does not
    renormalise; moelab read it as unset, i.e. DeepSeek-V3's default True."""
    model = build(family)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"norm_topk_prob": None}))
    model = build(family, norm_topk_prob=None)
    with open_checkpoint(tmp_path) as view:
        assert {layer.router.renormalize for layer in view.layers() if isinstance(layer, MoELayerView)} == {False}
        _assert_matches_transformers(view, family, model, TINY[family].dense)


# ----------------------------------------------------------------------------- errors


def test_a_dense_model_is_refused_as_one_and_an_unknown_moe_type_lists_the_supported_families(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    for dense in ({}, {"num_experts": 0}):
        (tmp_path / "config.json").write_text(json.dumps({**config_json, **dense}))
        with pytest.raises(CheckpointError, match=r"\(model_type 'llama'\) describes a model without MoE layers: none of "
                           r"its settings names experts \(num_experts, num_local_experts, \.\.\.\)"):
            open_checkpoint(tmp_path)
    # but no experts stored; an unknown family's count may be nested or named otherwise (DBRX's)
    for named in ({"num_local_experts": 4}, {"ffn_config": {"moe_num_experts": 4}}, {"num_experts_per_tok": 2}):
        (tmp_path / "config.json").write_text(json.dumps({**config_json, "num_experts": 0, **named}))
        with pytest.raises(
            CheckpointError, match=r"'llama' .* not a supported MoE family.*Supported families: afmoe, aria_text, axk1, "
        ):
            open_checkpoint(tmp_path)
    assert {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "phimoe",
        "gpt_oss",
        "granitemoe",
        "granitemoeshared",
        "llama4_text",
        "dbrx",
        "exaone_moe",
        "afmoe",
        "lfm2_moe",
        "minimax_m2",
        "hunyuan_v1_moe",
        "jamba",
        "ernie4_5_moe",
        "granitemoehybrid",
        "hy_v3",
        "laguna",
        "kolibri1",
        "mistral4",
    } <= FAMILIES.keys()


def test_missing_shard(tmp_path):
    _save("mixtral", tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) {shard.name}, missing from .*re-download"):
        open_checkpoint(tmp_path)


def _router_reads(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer 0's router weight as the view reads it, as transformers loads it) of a Mixtral checkpoint."""
    with open_checkpoint(path) as view:
        return view.layer(0).router.weight, load(path).model.layers[0].mlp.gate.weight


@pytest.mark.parametrize("sharded", [False, True], ids=["backup-beside", "index-beside"])
def test_model_safetensors_is_read_alone_as_transformers_does(tmp_path, sharded):
    """transformers reads model.safetensors alone when it is there: other weights beside it (a
    backup with the same tensor names, no index; or shards with their index) are ignored by both."""
    _save("mixtral", tmp_path)
    build("mixtral", seed=1).save_pretrained(tmp_path / "other", max_shard_size="20KB" if sharded else "50GB")
    for file in (tmp_path / "other").iterdir():
        if file.name != "config.json" and file.name.endswith((".safetensors", ".json")):
            name = "model_backup.safetensors" if file.name == "model.safetensors" else file.name
            (tmp_path / name).write_bytes(file.read_bytes())
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    view_weight, hf_weight = _router_reads(tmp_path)
    assert torch.equal(hf_weight, build("mixtral").model.layers[0].mlp.gate.weight)
    assert torch.equal(view_weight, hf_weight)


def test_config_transformers_weights_names_the_file_read(tmp_path):
    """config.json's transformers_weights makes transformers read that file instead."""
    _save("mixtral", tmp_path)
    build("mixtral", seed=1).save_pretrained(tmp_path / "other")
    (tmp_path / "a_weights.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["transformers_weights"] = "a_weights.safetensors"
    (tmp_path / "config.json").write_text(json.dumps(config))
    view_weight, hf_weight = _router_reads(tmp_path)
    assert torch.equal(hf_weight, build("mixtral", seed=1).model.layers[0].mlp.gate.weight)
    assert torch.equal(view_weight, hf_weight)


@pytest.mark.parametrize("name", ["gone.safetensors", "gone.safetensors.index.json"])
def test_config_transformers_weights_naming_a_missing_file_is_refused(tmp_path, name):
    """Not read as the directory's other weights (model.safetensors here) instead."""
    _save("mixtral", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "transformers_weights": name}))
    with pytest.raises(CheckpointError, match="not a file in"):
        Checkpoint(tmp_path)


def test_shards_without_index_holding_one_name_twice_are_refused(tmp_path):
    """No model.safetensors and no index (transformers loads neither): every *.safetensors is
    read, and a tensor name in two of them has no rule to pick one."""
    _save("mixtral", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    build("mixtral", seed=1).save_pretrained(tmp_path / "other")
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"tensor '.+' is in both a\.safetensors and b\.safetensors"):
        open_checkpoint(tmp_path)


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    _save("mixtral", tmp_path, max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.0.block_sparse_moe.gate.weight"
    index["weight_map"][key] = next(
        s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][key]
    )
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"maps .*gate.weight.* but that shard has no such tensor"):
        open_checkpoint(tmp_path).layer(0)


@pytest.mark.parametrize(
    "family,original,key", [("mixtral", True, "num_local_experts"), ("olmoe", False, "num_experts")]
)
def test_config_expert_count_differs_from_disk(tmp_path, family, original, key):
    _save(family, tmp_path, original)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: 8}))
    with pytest.raises(CheckpointError, match=rf"config says 8 experts \({key}\), checkpoint layer 0 has 4"):
        open_checkpoint(tmp_path).layer(0)


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_gap_in_expert_numbering(tmp_path):
    _save("qwen3_moe", tmp_path)
    _rewrite(tmp_path, lambda t: [t.pop(k) for k in list(t) if ".layers.1.mlp.experts.2." in k])
    with pytest.raises(CheckpointError, match=r"numbered \[0, 1, 3\]; expected 0..E-1"):
        open_checkpoint(tmp_path).layer(1)


def test_wrong_tensor_shape(tmp_path):
    _save("olmoe", tmp_path)
    _rewrite(
        tmp_path, lambda t: t.update({"model.layers.0.mlp.experts.1.up_proj.weight": torch.zeros(16, D + 1)})
    )
    with pytest.raises(
        CheckpointError, match=r"experts.1.up_proj.weight has shape \[16, 33\], but .*experts.0.up_proj"
    ):
        open_checkpoint(tmp_path).layer(0)


@pytest.mark.parametrize(
    "family,edit,index,message",
    [
        ("deepseek_v3", {"first_k_dense_replace": 0}, 0, "layer 0 an MoE layer, but the checkpoint has no"),
        ("qwen3_moe", {"mlp_only_layers": [0, 1]}, 1, "layer 1 dense, but the checkpoint has MoE tensors"),
    ],
)
def test_config_dense_layers_disagree_with_disk(tmp_path, family, edit, index, message):
    _save(family, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path).layer(index)


def test_corrupt_safetensors_file(tmp_path):
    _save("mixtral", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        open_checkpoint(tmp_path)


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    build("mixtral").to(torch.bfloat16).save_pretrained(tmp_path)
    layer = open_checkpoint(tmp_path).layer(0)
    assert layer.router.weight.dtype == layer.experts.gate.dtype == torch.bfloat16
    moe = moe_layer_from_view(layer)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 7, D, dtype=torch.bfloat16)
    with torch.no_grad():
        got, _ = moe(x)
    expected = block_output("mixtral", load(tmp_path, dtype=torch.bfloat16), 0, x)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "quantization,message",
    [
        ({"quant_method": "awq"}, r"quantized checkpoint \(quant_method 'awq'\).*Dequantize it first"),
        ({"quant_method": "mxfp4"}, r"describes MXFP4 weights, but no <name>_blocks tensors are stored"),
        ({"quant_method": "fp8", "weight_block_size": [8, 8]}, r"describes float8 weights, but no tensor is stored"),
    ],
)
def test_quantized_checkpoint_is_refused(tmp_path, quantization, message):
    """A quantization moelab does not read (reading its raw blocks would be silently wrong), and a
    config.json whose quantization the stored weights do not have."""
    _save("gpt_oss", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = quantization
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: moelab must not try to load it")
    with pytest.raises(
        CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles.*safetensors"
    ):
        open_checkpoint(tmp_path)


def test_missing_config_and_layer_index(tmp_path):
    """A path that is no checkpoint directory is named once, with what it is ("no config.json in
    X (X)" named it twice, and said "no config.json in" a file)."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for path, said in ((tmp_path, f"no config.json in {tmp_path};"), (tmp_path / "x", f"no such directory {tmp_path / 'x'};"),
                       (tmp_path / "notes.txt", f"{tmp_path / 'notes.txt'} is a file, not a directory;")):  # fmt: skip
        with pytest.raises(CheckpointError) as refused:
            open_checkpoint(path)
        assert str(refused.value).startswith(said) and str(refused.value).count(str(path)) == 1, refused.value
    _save("mixtral", tmp_path)
    with pytest.raises(IndexError, match="has 2 layers"):
        open_checkpoint(tmp_path).layer(2)


def test_experts_view_checks_shapes():
    E, I = 4, 8
    with pytest.raises(ValueError, match=r"experts down has shape \[4, 8, 32\], expected \[4, 32, 8\]"):
        ExpertsView(torch.zeros(E, I, D), torch.zeros(E, I, D), torch.zeros(E, I, D))



def test_native_experts_with_only_some_biases_keep_them():
    """A view with a down bias alone: the native experts hold it, with zero gate and up biases."""
    E, I = 4, 8
    down_bias = torch.randn(E, D)
    view = ExpertsView(torch.randn(E, I, D), torch.randn(E, I, D), torch.randn(E, D, I), down_bias=down_bias)
    experts = experts_from_view(view)
    assert experts.down_bias is not None and torch.equal(experts.down_bias, down_bias)
    assert experts.gate_up_bias.shape == (E, 2 * I) and not experts.gate_up_bias.any()


def test_gelu_tanh_glu_views_build_gemma4s_gated_experts():
    """"gelu_tanh_glu" (Gemma 4) names a gated activation of routed and gated shared experts, with no
    swiglu_alpha or swiglu_limit: the native layer computes down @ (gelu_tanh(gate @ x) * (up @ x)),
    `GeluTanhGLU`, in both."""
    torch.manual_seed(0)
    routed = {"gate": torch.randn(4, 8, D), "up": torch.randn(4, 8, D), "down": torch.randn(4, D, 8)}
    shared = {"gate": torch.randn(6, D), "up": torch.randn(6, D), "down": torch.randn(D, 6)}
    routed, shared = ({n: 0.2 * t for n, t in part.items()} for part in (routed, shared))
    glu_tanh = {"activation": "gelu_tanh_glu"}
    layer = moe_layer_from_view(_views(experts=routed | glu_tanh, shared=shared | glu_tanh))
    assert layer.experts.clamped == GeluTanhGLU() and layer.shared.clamped == GeluTanhGLU()
    x = torch.randn(3, D, dtype=torch.float64)

    def glu(w):  # w: gate, up [H, D] and down [D, H]
        return (gelu_tanh(x @ w["gate"].double().T) * (x @ w["up"].double().T)) @ w["down"].double().T

    with torch.no_grad():
        expert_1 = {n: t[1] for n, t in routed.items()}
        torch.testing.assert_close(layer.experts.double()(x, [0, 3, 0, 0]), glu(expert_1))
        torch.testing.assert_close(layer.shared.double().mlp(x), glu(shared))


def test_gate_clamped_swiglu_views_build_hunyuan4s_and_deepseek_v4s_gated_experts():
    """"gate_clamped_swiglu" (Hunyuan 4, DeepSeek-V4) names a gated activation of routed and gated
    shared experts, with swiglu_limit L and no swiglu_alpha: the native layer computes
    down @ (silu(min(gate @ x, L)) * clamp(up @ x, -L, L)), `GateClampedSwiGLU(L)`, in both, on data
    where both clamps act."""
    torch.manual_seed(0)
    L = 0.5
    routed = {"gate": torch.randn(4, 8, D), "up": torch.randn(4, 8, D), "down": torch.randn(4, D, 8)}
    shared = {"gate": torch.randn(6, D), "up": torch.randn(6, D), "down": torch.randn(D, 6)}
    routed, shared = ({n: 0.2 * t for n, t in part.items()} for part in (routed, shared))
    gate_clamped = {"activation": "gate_clamped_swiglu", "swiglu_limit": L}
    layer = moe_layer_from_view(_views(experts=routed | gate_clamped, shared=shared | gate_clamped))
    assert layer.experts.clamped == GateClampedSwiGLU(L) and layer.shared.clamped == GateClampedSwiGLU(L)
    x = torch.randn(3, D, dtype=torch.float64)

    def glu(w):  # w: gate, up [H, D] and down [D, H]
        gate, up = x @ w["gate"].double().T, x @ w["up"].double().T
        assert (gate > L).any() and (gate < L).any() and (up.abs() > L).any() and (up.abs() < L).any()
        hidden = silu(torch.where(gate > L, L, gate)) * torch.where(up.abs() > L, L * up.sign(), up)
        return hidden @ w["down"].double().T

    with torch.no_grad():
        expert_1 = {n: t[1] for n, t in routed.items()}
        torch.testing.assert_close(layer.experts.double()(x, [0, 3, 0, 0]), glu(expert_1))
        torch.testing.assert_close(layer.shared.double().mlp(x), glu(shared))


def test_softcapped_swiglu_views_build_inkling2s_gated_experts():
    """"softcapped_swiglu" (Inkling 2) names a gated activation of routed and gated shared experts, with
    gate_softcap Cg and up_softcap Cu: the native layer computes
    down @ (softcap(gate @ x, Cg) * sigmoid(gate @ x) * softcap(up @ x, Cu)), `SoftcappedSwiGLU(Cg, Cu)`,
    in both, on data where both caps act."""
    torch.manual_seed(0)
    Cg, Cu = 0.5, 0.75
    routed = {"gate": torch.randn(4, 8, D), "up": torch.randn(4, 8, D), "down": torch.randn(4, D, 8)}
    shared = {"gate": torch.randn(6, D), "up": torch.randn(6, D), "down": torch.randn(D, 6)}
    routed, shared = ({n: 0.2 * t for n, t in part.items()} for part in (routed, shared))
    softcapped = {"activation": "softcapped_swiglu", "gate_softcap": Cg, "up_softcap": Cu}
    layer = moe_layer_from_view(_views(experts=routed | softcapped, shared=shared | softcapped))
    assert layer.experts.clamped == SoftcappedSwiGLU(Cg, Cu) and layer.shared.clamped == SoftcappedSwiGLU(Cg, Cu)
    x = torch.randn(3, D, dtype=torch.float64)

    def glu(w):  # w: gate, up [H, D] and down [D, H]
        gate, up = x @ w["gate"].double().T, x @ w["up"].double().T
        assert (gate.abs() > Cg).any() and (up.abs() > Cu).any()
        hidden = Cg * torch.tanh(gate / Cg) * torch.sigmoid(gate) * Cu * torch.tanh(up / Cu)
        return hidden @ w["down"].double().T

    with torch.no_grad():
        expert_1 = {n: t[1] for n, t in routed.items()}
        torch.testing.assert_close(layer.experts.double()(x, [0, 3, 0, 0]), glu(expert_1))
        torch.testing.assert_close(layer.shared.double().mlp(x), glu(shared))


def test_gemma4_router_reads_its_input_rounded_as_transformers_rounds_it(tmp_path):
    """Gemma 4's router norms x in float32, casts back to x's dtype, then multiplies by its scale and
    hidden_size^-0.5 in that dtype (`Gemma4TextRouter`): moelab's router (float32, as the layer-by-layer
    and offloaded runs hold it) projects the same bf16 values."""
    torch.manual_seed(0)
    model = build("gemma4_text").to(torch.bfloat16)
    router = model.model.layers[0].router
    with torch.no_grad():
        router.scale.copy_(torch.rand(D) * 2)
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        ours = router_from_view(view.layer(0).router).float()
    x = torch.randn(256, D, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        expected = router.norm(x) * router.scale * router.scalar_root_size
        assert torch.equal(ours.input_norm(x), expected)


def test_native_experts_take_a_fused_gate_up_as_it_is():
    """gate and up that are the two halves of one [E, 2I, D] tensor become the experts' gate_up_proj
    itself (no copy); halves of a tensor of more experts than the view's are copied."""
    E, I = 4, 8
    fused = torch.randn(E, 2 * I, D)
    experts = experts_from_view(ExpertsView(fused[:, :I], fused[:, I:], torch.randn(E, D, I)))
    assert experts.gate_up_proj.data_ptr() == fused.data_ptr()
    some = experts_from_view(ExpertsView(fused[:2, :I], fused[:2, I:], torch.randn(2, D, I)))
    assert torch.equal(some.gate_up_proj, fused[:2])


def test_native_router_buffers_start_at_zero_and_groups_are_kept():
    """A buffer the view does not give (the aux-free load counts) starts at 0; n_group, topk_group
    and group_score reach the router."""
    view = _views(router={"selection_bias": torch.ones(4), "n_group": 2, "topk_group": 2, "group_score": "top2"})
    router = router_from_view(view.router)
    assert torch.equal(router.selection_bias, torch.ones(4))
    assert not router.tokens_per_expert.is_meta and not router.tokens_per_expert.any()
    assert (router.n_group, router.topk_group, router.group_score) == (2, 2, "top2")


def test_empty_experts_are_slots_on_the_device_and_dtype_asked_for():
    """empty_experts: num_experts slots like the view's, in dtype, on device (meta to size them)."""
    view = ExpertsView(torch.randn(4, 8, D), torch.randn(4, 8, D), torch.randn(4, D, 8))
    slots = empty_experts(view, 3, dtype=torch.bfloat16, device="meta")
    assert slots.gate_up_proj.shape == (3, 16, D) and slots.gate_up_proj.is_meta
    assert {(p.dtype, p.requires_grad) for p in slots.parameters()} == {(torch.bfloat16, False)}


def _views(**change):
    """A valid router, experts and shared expert of 4 experts, dim 32, hidden 8 (shared 6), with
    `change` applied as {"router"|"experts"|"shared": {field: value}}, built into an MoELayerView."""
    E, I = 4, 8
    router = {"weight": torch.zeros(E, D), "score_func": "softmax", "top_k": 2, "renormalize": True}
    experts = {"gate": torch.zeros(E, I, D), "up": torch.zeros(E, I, D), "down": torch.zeros(E, D, I)}
    shared = {"gate": torch.zeros(6, D), "up": torch.zeros(6, D), "down": torch.zeros(D, 6)}
    return MoELayerView(
        0,
        RouterView(**router | change.get("router", {})),
        ExpertsView(**experts | change.get("experts", {})),
        SharedView(**shared | change.get("shared", {})),
        LatentView(**change["latent"]) if "latent" in change else None,
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"router": {"score_func": "relu"}}, r"score_func must be one of"),
        ({"router": {"bias": torch.zeros(5)}}, r"router bias has shape \[5\], expected \[4\]"),
        ({"router": {"bias": torch.zeros(4, 1)}}, r"router bias has shape \[4, 1\], expected \[4\]"),
        ({"router": {"selection_bias": torch.zeros(3)}}, r"router selection_bias has shape \[3\], expected \[4\]"),
        ({"router": {"top_k": 5}}, r"top_k"),
        # moelab's sparsemixer and hash routers take no cap: refused, not dropped
        ({"router": {"score_func": "sparsemixer", "logit_softcap": 1.0}}, r"a sparsemixer router takes no logit_softcap"),
        ({"router": {"token_experts": torch.zeros(8, 2, dtype=torch.long), "logit_softcap": 1.0}},
         r"a hash-routed router \(token_experts\) takes no logit_softcap"),
        ({"router": {"logit_softcap": 0.0}}, r"router logit_softcap must be a positive finite number \(or None\), got 0\.0"),
        ({"router": {"n_group": 3}}, r"n_group \(3\) must be >= 1 and divide num_experts \(4\)"),
        # groups of one expert: a sigmoid router scores a group by its two best (a softmax one is fine, below)
        ({"router": {"score_func": "sigmoid", "top_k": 1, "n_group": 4}}, r"every group needs at least 2 experts"),
        ({"experts": {"activation": "tanh"}}, r"experts activation must be one of"),
        ({"experts": {"activation": "gelu"}}, r"gated experts \(with gate projection\) take one of .*got activation 'gelu'"),
        ({"experts": {"activation": "clamped_swiglu", "swiglu_alpha": 1.7}}, r"set exactly when activation is"),
        ({"experts": {"swiglu_alpha": 1.7, "swiglu_limit": 7.0}}, r"set exactly when activation is"),
        ({"experts": {"swiglu_alpha": 1.7}}, r"set exactly when activation is"),  # half the pair, on silu
        ({"experts": {"activation": "gelu_tanh_glu", "swiglu_limit": 7.0}}, r"set exactly when activation is"),
        ({"experts": {"gate": None, "activation": "gelu_tanh_glu"}},
         r"plain experts \(no gate projection\) take one of .*got activation 'gelu_tanh_glu'"),
        ({"experts": {"activation": "gate_clamped_swiglu"}},
         r"swiglu_limit exactly when it is 'clamped_swiglu', 'capped_swiglu' or 'gate_clamped_swiglu'"),
        ({"experts": {"activation": "gate_clamped_swiglu", "swiglu_limit": 7.0, "swiglu_alpha": 1.7}},
         r"swiglu_alpha is set exactly when activation is 'clamped_swiglu'"),
        ({"experts": {"gate": None, "activation": "gate_clamped_swiglu", "swiglu_limit": 7.0}},
         r"plain experts \(no gate projection\) take one of .*got activation 'gate_clamped_swiglu'"),
        ({"experts": {"activation": "softcapped_swiglu", "gate_softcap": 4.0}},
         r"gate_softcap and up_softcap are positive finite numbers exactly when activation is 'softcapped_swiglu', "
         r"got activation 'softcapped_swiglu' with gate_softcap=4.0, up_softcap=None"),
        ({"experts": {"activation": "softcapped_swiglu", "gate_softcap": 4.0, "up_softcap": 0.0}},
         r"positive finite numbers exactly when activation is 'softcapped_swiglu'"),
        ({"experts": {"gate_softcap": 4.0, "up_softcap": 25.0}},
         r"exactly when activation is 'softcapped_swiglu', got activation 'silu'"),
        ({"experts": {"activation": "softcapped_swiglu", "gate_softcap": 4.0, "up_softcap": 25.0, "swiglu_limit": 7.0}},
         r"swiglu_limit exactly when it is"),
        ({"shared": {"activation": "softcapped_swiglu", "up_softcap": 25.0}},
         r"shared experts: gate_softcap and up_softcap are positive finite numbers exactly when"),
        ({"experts": {"gate": torch.zeros(4, 8, 31)}}, r"experts gate has shape \[4, 8, 31\], expected \[4, 8, 32\]"),
        ({"experts": {"down": torch.zeros(4, D, 7)}}, r"experts down has shape \[4, 32, 7\], expected \[4, 32, 8\]"),
        ({"experts": {"gate": None, "activation": "clamped_swiglu", "swiglu_alpha": 1.7, "swiglu_limit": 7.0}},
         r"plain experts \(no gate projection\) take one of .*got activation 'clamped_swiglu'"),
        ({"experts": {"activation": "relu2"}}, r"gated experts \(with gate projection\) take one of .*'relu2'"),
        ({"experts": {"gate": None, "activation": "relu2", "gate_bias": torch.zeros(4, 8)}}, r"plain experts .* no gate_bias"),
        ({"experts": {"gate_bias": torch.zeros(4, 7)}}, r"experts gate_bias has shape \[4, 7\], expected \[4, 8\]"),
        ({"experts": {"up_bias": torch.zeros(3, 8)}}, r"experts up_bias has shape \[3, 8\], expected \[4, 8\]"),
        ({"experts": {"down_bias": torch.zeros(4, 8)}}, r"experts down_bias has shape \[4, 8\], expected \[4, 32\]"),
        ({"experts": {"gate": torch.zeros(4, 8, D, dtype=torch.int8)}}, r"experts gate has dtype torch.int8"),
        ({"shared": {"gate": torch.zeros(6, 31)}}, r"shared gate has shape \[6, 31\], expected \[6, 32\]"),
        ({"shared": {"gate": None, "activation": "clamped_swiglu"}}, r"got activation 'clamped_swiglu' and no gate"),
        ({"shared": {"activation": "relu2"}}, r"got activation 'relu2' and a gate"),
        ({"shared": {"activation": "clamped_swiglu"}}, r"shared experts: swiglu_alpha is set exactly when activation"),
        ({"shared": {"activation": "clamped_swiglu", "swiglu_alpha": 1.7}}, r"shared experts: swiglu_alpha is set exactly"),
        ({"shared": {"activation": "gelu_tanh_glu", "swiglu_limit": 7.0}}, r"shared experts: swiglu_alpha is set exactly"),
        ({"shared": {"gate": None, "activation": "gelu_tanh_glu"}}, r"got activation 'gelu_tanh_glu' and no gate"),
        ({"shared": {"activation": "gate_clamped_swiglu"}}, r"shared experts: swiglu_alpha is set exactly when"),
        ({"shared": {"activation": "gate_clamped_swiglu", "swiglu_limit": 7.0, "swiglu_alpha": 1.7}},
         r"shared experts: swiglu_alpha is set exactly when"),
        ({"shared": {"gate": None, "activation": "gate_clamped_swiglu", "swiglu_limit": 7.0}},
         r"got activation 'gate_clamped_swiglu' and no gate"),
        ({"shared": {"down": torch.zeros(D, 5)}}, r"shared down has shape \[32, 5\], expected \[32, 6\]"),
        ({"shared": {"sigmoid_gate": torch.zeros(2, D)}}, r"shared sigmoid_gate has shape \[2, 32\], expected \[1, 32\]"),
        ({"experts": {n: torch.zeros(3, *s) for n, s in (("gate", (8, D)), ("up", (8, D)), ("down", (D, 8)))}},
         r"router weight \[4, 32\] \(\[experts, dim\]\) and the model dim 32 do not match experts up \[3, 8, 32\]"),
        ({"experts": {n: torch.zeros(4, *s) for n, s in (("gate", (8, 16)), ("up", (8, 16)), ("down", (16, 8)))}},
         r"router weight \[4, 32\] \(\[experts, dim\]\) and the model dim 32 do not match experts up \[4, 8, 16\]"),
        ({"latent": {"down": torch.zeros(16, D), "up": torch.zeros(D, 16)}},
         r"and the latent dim 16 do not match experts up \[4, 8, 32\]"),
        ({"latent": {"down": torch.zeros(8, 16), "up": torch.zeros(16, 8)}}, r"latent down \[8, 16\] does not match the model dim 32"),
        ({"latent": {"down": torch.zeros(8, D), "up": torch.zeros(D, 7)}}, r"latent up has shape \[32, 7\], expected \[32, 8\]"),
        ({"shared": {"gate": torch.zeros(6, 16), "up": torch.zeros(6, 16), "down": torch.zeros(16, 6)}},
         r"shared up \[6, 16\] does not match the model dim 32"),
    ],
)  # fmt: skip
def test_layer_views_refuse_inconsistent_fields(change, message):
    """Every check a view makes of its own fields, one bad field at a time (the adapters build views
    from config.json and the tensors; these checks are what stops a bad pair of them)."""
    _views()  # valid as it stands
    with pytest.raises(ValueError, match=message):
        _views(**change)


def test_group_size_rule_is_the_group_score_s():
    """Groups of one expert: refused for a sigmoid router or group_score "top2" (transformers scores a
    group by its two best experts), fine for a softmax one by its best."""
    softmax = _views(router={"top_k": 1, "n_group": 4}).router
    assert (softmax.min_group_size, softmax.n_group) == (1, 4)
    assert _views(router={"score_func": "sigmoid", "n_group": 2, "topk_group": 1}).router.min_group_size == 2
    assert _views(router={"score_func": "sigmoid"}).router.min_group_size == 1
    top2 = {"n_group": 2, "topk_group": 1, "group_score": "top2"}  # a softmax router's groups scored as Mistral 4's
    assert _views(router={"top_k": 1, **top2}).router.min_group_size == 2
    with pytest.raises(ValueError, match=r"every group needs at least 2 experts; 4 experts in 4 groups leave 1"):
        _views(router={"top_k": 1, **top2, "n_group": 4})


def test_a_negative_layer_index_is_out_of_range(tmp_path):
    _save("mixtral", tmp_path)
    with pytest.raises(IndexError, match="layer index -1 out of range: the model has 2 layers"):
        open_checkpoint(tmp_path).layer(-1)


def test_a_zero_in_config_json_that_a_layer_divides_by_names_the_layer(tmp_path):
    """Qwen2-MoE's decoder_sparse_step of 0: a CheckpointError naming the layer and config.json,
    not a bare ZeroDivisionError."""
    _save("qwen2_moe", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_sparse_step": 0}))
    with pytest.raises(CheckpointError, match=r"layer 0: .*check the values in config.json"):
        open_checkpoint(tmp_path).layer(0)


def test_a_layer_without_its_routed_experts_reads_none_of_them(tmp_path):
    """layer(routed=False): the routed experts as meta tensors of their shapes and dtypes, the
    router and shared experts read as in layer()."""
    _save("qwen2_moe", tmp_path)
    with open_checkpoint(tmp_path) as view:
        index = next(layer.index for layer in view.layers() if isinstance(layer, MoELayerView))
        whole, light = view.layer(index), view.layer(index, routed=False)
    for name in ("gate", "up", "down"):
        full, meta = getattr(whole.experts, name), getattr(light.experts, name)
        assert meta.is_meta and not full.is_meta and (meta.shape, meta.dtype) == (full.shape, full.dtype)
    assert torch.equal(light.router.weight, whole.router.weight) and not light.router.weight.is_meta
    assert torch.equal(light.shared.gate, whole.shared.gate) and not light.shared.down.is_meta


@pytest.mark.parametrize(
    "family,key",
    [
        ("qwen3_moe", "norm_topk_prob"),
        ("olmoe", "norm_topk_prob"),
        ("deepseek_v3", "routed_scaling_factor"),
        ("deepseek_v3", "norm_topk_prob"),
        ("phimoe", "router_jitter_noise"),
        ("gpt_oss", "swiglu_alpha"),
    ],
)
def test_a_setting_missing_from_config_is_transformers_default(tmp_path, family, key):
    """save_pretrained writes every config key, so the adapters' defaults are only read for
    hand-written or older config.json files: with `key` deleted, the view must route and
    activate as transformers does with its class default."""
    _save(family, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert key in config
    del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load(tmp_path)
    assert getattr(model.config, key) == getattr(type(model.config)(), key)
    with open_checkpoint(tmp_path) as view:
        _assert_matches_transformers(view, family, model, TINY[family].dense)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("deepseek_v3", {"routed_scaling_factor": 1.5}),
        ("mistral4", {"norm_topk_prob": False}),
        ("dbrx", {"ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 3}}),
    ],
)
def test_a_setting_other_than_the_tiny_models_is_read_from_config(tmp_path, family, overrides):
    """The tiny configs use 2.5 (DeepSeek-V3's default), top-2 and renormalisation (Mistral 4's default):
    another value must reach the view."""
    model = build(family, **overrides)
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        _assert_matches_transformers(view, family, model, TINY[family].dense)


def test_a_moelab_checkpoint_s_router_settings_reach_the_view(tmp_path):
    """renormalize=False, sigmoid scores, groups scored by their best and a route scale, as the moelab
    config says."""
    import dataclasses

    from moelab.models import MoETransformer, save_pretrained, tiny

    base = tiny()
    moe = dataclasses.replace(
        base.moe, score_func="sigmoid", renormalize=False, route_scale=1.5, n_group=2, topk_group=1, group_score="max"
    )
    save_pretrained(MoETransformer(dataclasses.replace(base, moe=moe)), tmp_path)
    with open_checkpoint(tmp_path) as view:
        router = view.layer(1).router
    got = (router.score_func, router.top_k, router.renormalize, router.route_scale, router.n_group, router.topk_group,
           router.group_score)  # fmt: skip
    assert got == ("sigmoid", 2, False, 1.5, 2, 1, "max")


@pytest.mark.parametrize("top_k", [1, 3])
def test_phimoe_routes_two_experts_whatever_num_experts_per_tok_says(tmp_path, top_k):
    """transformers' sparsemixer always picks 2 experts (its top_k argument is unused)."""
    build("phimoe", num_experts_per_tok=top_k).save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.config.num_experts_per_tok == top_k
    with open_checkpoint(tmp_path) as view:
        assert view.layer(0).router.top_k == 2
        _assert_matches_transformers(view, "phimoe", model, ())


def test_hunyuan_top_k_per_layer_is_read_only_where_the_layers_agree(tmp_path):
    """Hunyuan-MoE's moe_topk may list one k per layer: one k for all is read, different ones refused."""
    model = build("hunyuan_v1_moe", moe_topk=[2, 2])
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        assert view.layer(0).router.top_k == 2
        _assert_matches_transformers(view, "hunyuan_v1_moe", model, ())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"moe_topk": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"moe_topk gives layers different top-k values \[1, 2\]"):
        open_checkpoint(tmp_path).layer(0)


def test_lfm2_routes_with_its_expert_bias_only_where_the_config_uses_it(tmp_path):
    """use_expert_bias false: no bias on disk, read and matched without one; a bias on disk that
    the config turns off (transformers would ignore it) is refused, not routed with."""
    model = build("lfm2_moe", use_expert_bias=False)
    model.save_pretrained(tmp_path / "plain")
    with open_checkpoint(tmp_path / "plain") as view:
        assert view.layer(0).router.selection_bias is None
        _assert_matches_transformers(view, "lfm2_moe", model, ())
    build("lfm2_moe").save_pretrained(tmp_path / "biased")
    config = json.loads((tmp_path / "biased" / "config.json").read_text())
    (tmp_path / "biased" / "config.json").write_text(json.dumps(config | {"use_expert_bias": False}))
    with pytest.raises(CheckpointError, match=r"feed_forward\.expert_bias, but config\.json sets use_expert_bias false"):
        open_checkpoint(tmp_path / "biased").layer(0)


def test_kimi_linear_settings_left_out_of_config_json_are_its_configs_defaults(tmp_path):
    """Without routed_scaling_factor, moe_renormalize and num_expert_group in config.json the view
    reads KimiLinearConfig's defaults (2.446, True, 1), as transformers does; a null
    moe_renormalize is false for both."""
    build("kimi_linear").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("routed_scaling_factor", "moe_renormalize", "num_expert_group"):
        del config[key]
    for renormalize in (None, False):
        if renormalize is not None:
            config["moe_renormalize"] = renormalize
        (tmp_path / "config.json").write_text(json.dumps(config))
        with open_checkpoint(tmp_path) as view:
            router = view.layer(1).router
            assert (router.route_scale, router.renormalize, router.n_group) == (2.446, renormalize is None, 1)
            _assert_matches_transformers(view, "kimi_linear", load(tmp_path), (0,))
    config["moe_renormalize"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open_checkpoint(tmp_path) as view:
        assert view.layer(1).router.renormalize is False
        _assert_matches_transformers(view, "kimi_linear", load(tmp_path), (0,))


def test_ernie_with_biased_shared_experts_is_refused(tmp_path):
    """ERNIE 4.5's use_bias gives its shared experts biases, which views do not read."""
    build("ernie4_5_moe", use_bias=True).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="sets use_bias: its shared experts have biases"):
        open_checkpoint(tmp_path).layer(1)


def test_ernie_with_a_floor_under_its_weight_sum_is_refused(tmp_path):
    """transformers divides ERNIE 4.5's routing weights by max(sum, moe_norm_min): the class
    default (1e-12) never binds, a floor above the sum would, and moelab's routers divide by the sum."""
    build("ernie4_5_moe", moe_norm_min=0.9).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"sets moe_norm_min 0\.9: transformers divides the routing weights"):
        open_checkpoint(tmp_path).layer(1)


@pytest.mark.parametrize(
    "family,overrides,message",
    [
        ("laguna", dict(moe_router_logit_softcapping=-1.0), r"sets moe_router_logit_softcapping -1\.0; transformers reads"),
        ("laguna", dict(moe_router_logit_softcapping=True), r"sets moe_router_logit_softcapping True; transformers reads"),
        ("laguna", dict(moe_apply_router_weight_on_input=True), r"sets moe_apply_router_weight_on_input: the router"),
        ("hy_v3", dict(mlp_bias=True), r"Hunyuan 3 config sets mlp_bias: its shared experts have biases"),
        ("deepseek_v2", dict(mlp_bias=True), r"DeepSeek-V2 config sets mlp_bias: its shared experts have biases"),
    ],
    ids=["laguna-negative-softcap", "laguna-bool-softcap", "laguna-weight-on-input", "hy_v3-mlp-bias", "deepseek_v2-mlp-bias"],
)
def test_routing_options_moelab_does_not_compute_are_refused(tmp_path, family, overrides, message):
    """Laguna's negative logit cap and router weights on the experts' input (which
    transformers refuses to build) and Hunyuan 3's MLP biases are refused by name rather than read as
    what moelab computes (DeepSeek-V2's too, which Unlimited OCR's language model shares)."""
    build(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | overrides))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path).layer(1)


@pytest.mark.parametrize("family", ["hy_v3", "laguna", "hy_v4"])
def test_without_mlp_layer_types_only_layer_0_is_dense_whatever_first_k_dense_replace_says(tmp_path, family):
    """HY-V3's, Laguna's and Hunyuan 4's config classes make layer 0 alone dense where config.json lists
    no mlp_layer_types; a first_k_dense_replace beside it (which they never read) changes nothing."""
    layer_types = {"layer_types": ["full_attention"] * 4} if family == "laguna" else {}
    model = build(family, num_hidden_layers=4, mlp_layer_types=None, **layer_types)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("mlp_layer_types")
    (tmp_path / "config.json").write_text(json.dumps(config | {"first_k_dense_replace": 3}))
    with open_checkpoint(tmp_path) as view:
        assert [layer.index for layer in view.layers() if isinstance(layer, MoELayerView)] == [1, 2, 3]
        _assert_matches_transformers(view, family, load(tmp_path), (0,))


def test_mistral4_scores_its_expert_groups_by_their_two_best_softmax_scores(tmp_path):
    """Mistral 4 keeps the topk_group best of n_group expert groups, each scored by the sum of its two
    best softmax scores (where moelab's softmax routers take the best one by default): the view says so,
    and scored by the best one its layer would not be transformers' block. Groups of one expert, which
    transformers' router cannot score, are refused."""
    model = build("mistral4")
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        router = view.layer(1).router
        assert (router.n_group, router.topk_group, router.group_score, router.min_group_size) == (2, 1, "top2", 2)
        _assert_matches_transformers(view, "mistral4", model, (0,))
        by_best = dataclasses.replace(view.layer(1), router=dataclasses.replace(router, group_score="max"))
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(moe_layer_from_view(by_best)(x)[0], block_output("mistral4", model, 1, x), atol=1e-3)
    build("mistral4", n_group=8, topk_group=2).save_pretrained(tmp_path / "of_one")
    with pytest.raises(ValueError, match=r"scores each group by its 2 best experts, so every group needs at least 2"):
        open_checkpoint(tmp_path / "of_one").layer(1)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(expert_selection_fn="softmax", num_shared_experts=0),  # the class defaults
        dict(norm_topk_prob=False),
    ],
    ids=["softmax-no-shared", "sigmoid-not-renormalised"],
)
def test_cohere2_moes_routing_options_match_transformers(tmp_path, overrides):
    build("cohere2_moe", **overrides).save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        _assert_matches_transformers(view, "cohere2_moe", load(tmp_path), dense=(0,))


@pytest.mark.parametrize("strategy", ["average", "sum"])
def test_cohere2_moes_shared_experts_averaged_or_summed_match_transformers(tmp_path, strategy):
    """shared_expert_combination_strategy "average" (the class default) halves routed plus shared
    output (the router's route_scale and the shared experts' output_scale 0.5), "sum" adds them."""
    build("cohere2_moe", shared_expert_combination_strategy=strategy).save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        layer = view.layer(1)
        assert (layer.router.route_scale, layer.shared.output_scale) == ((0.5, 0.5) if strategy == "average" else (1.0, 1.0))
        _assert_matches_transformers(view, "cohere2_moe", load(tmp_path), dense=(0,))


def test_cohere2_moes_unknown_shared_expert_combination_is_refused(tmp_path):
    config = build("cohere2_moe").config.to_dict() | {"shared_expert_combination_strategy": "max"}
    build("cohere2_moe").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shared_expert_combination_strategy 'max'; transformers and moelab read"):
        open_checkpoint(tmp_path).layer(1)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("jamba", dict(expert_layer_period=3, expert_layer_offset=2)),
        ("jamba", dict(expert_layer_period=2, expert_layer_offset=0)),
        ("ernie4_5_moe", dict(moe_layer_interval=2, moe_layer_start_index=0)),
        ("ernie4_5_moe", dict(moe_layer_start_index=1, moe_layer_end_index=2)),
        ("exaone_moe", dict(mlp_layer_types=["sparse", "dense", "sparse", "dense"], n_group=1)),
        ("afmoe", dict(num_dense_layers=2)),
        ("hy_v3", dict(mlp_layer_types=["sparse", "dense", "dense", "sparse"])),
        ("laguna", dict(mlp_layer_types=["dense", "sparse", "dense", "sparse"], layer_types=["full_attention"] * 4)),
        ("lfm2_moe", dict(num_dense_layers=3, layer_types=["conv", "full_attention"] * 2)),
    ],
    ids=["jamba-period3", "jamba-offset0", "ernie-interval2", "ernie-end2", "exaone-types", "afmoe", "hy_v3",
         "laguna", "lfm2"],
)
def test_the_moe_layers_are_transformers(tmp_path, family, overrides):
    """Over 4 layers, the layers a config makes sparse are those transformers builds an MoE block in
    (experts), and those read match transformers' blocks."""
    model = build(family, num_hidden_layers=4, **overrides)
    model.save_pretrained(tmp_path)
    path = TINY[family].path
    sparse = [i for i in range(4) if hasattr(model.get_submodule(path.format(i=i)), "experts")]
    assert 0 < len(sparse) < 4
    with open_checkpoint(tmp_path) as view:
        assert [layer.index for layer in view.layers() if isinstance(layer, MoELayerView)] == sparse
        _assert_matches_transformers(view, family, model, tuple(i for i in range(4) if i not in sparse))


NEW_FAMILIES = ["exaone_moe", "afmoe", "lfm2_moe", "minimax_m2", "hunyuan_v1_moe", "jamba", "ernie4_5_moe",
                "granitemoehybrid", "hy_v3", "laguna", "kolibri1", "mistral4"]  # fmt: skip


@pytest.mark.parametrize(
    "family,overrides",
    [(family, {}) for family in NEW_FAMILIES]
    + [("exaone_moe", dict(n_group=1, topk_group=1))]
    + [("nemotron_h", dict(n_routed_experts=4)), ("nemotron_h", dict(n_routed_experts=4, n_group=1, topk_group=1, routed_scaling_factor=1.0))],
    ids=NEW_FAMILIES + ["exaone_moe-no-groups", "nemotron_h", "nemotron_h-no-groups-no-scale"],
)
def test_a_config_that_leaves_out_its_defaults_reads_as_transformers_does(tmp_path, family, overrides):
    """config.json with only the entries that differ from the config class's defaults (as a
    hand-written or older config may be): the adapter's defaults are transformers'. (The top-k,
    which moelab's adapters require written out, stays.)"""
    model = build(family, **overrides)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    defaults = type(model.config)().to_dict()
    required = ("model_type", "num_experts_per_tok")
    kept = {k: v for k, v in config.items() if k in required or k not in defaults or defaults[k] != v}
    assert len(kept) < len(config)
    (tmp_path / "config.json").write_text(json.dumps(kept))
    with open_checkpoint(tmp_path) as view:
        _assert_matches_transformers(view, family, load(tmp_path), TINY[family].dense)


def test_llama4_interleaved_moe_layers_without_moe_layers_key(tmp_path):
    """Without `moe_layers`, Llama 4 makes every `interleave_moe_layer_step`-th layer sparse
    (layers step-1, 2*step-1, ...), as transformers' config computes them."""
    model = build(
        "llama4_text",
        num_hidden_layers=4,
        moe_layers=None,
        interleave_moe_layer_step=2,
        layer_types=["chunked_attention", "full_attention"] * 2,
        no_rope_layers=[1, 0, 1, 0],
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("moe_layers", None)
    (tmp_path / "config.json").write_text(json.dumps(config | {"interleave_moe_layer_step": 2}))
    model = load(tmp_path)
    assert list(model.config.moe_layers) == [1, 3]
    with open_checkpoint(tmp_path) as view:
        assert view.num_layers == 4
        _assert_matches_transformers(view, "llama4_text", model, (0, 2))


@pytest.mark.parametrize("original", [True, False], ids=["per_expert", "fused"])
def test_a_range_past_the_last_expert_is_refused(tmp_path, original):
    """A range that starts inside but runs past the experts is refused like one wholly outside
    (a fused tensor would otherwise slice it short without a word)."""
    build("qwen3_moe").save_pretrained(tmp_path, save_original_format=original)
    with open_checkpoint(tmp_path) as view:
        message = r"cannot read experts range\(3, 5\) of layer 1: config says 4 experts"
        with pytest.raises(CheckpointError, match=message):
            view.experts(1, range(3, 5))


def test_config_expert_width_differs_from_disk(tmp_path):
    """config.json's intermediate_size (what the writer edits when experts narrow) must be the
    experts' width on disk, as it is their count."""
    build("mixtral").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 8}))
    with open_checkpoint(tmp_path) as view:
        message = r"config says the experts are 8 wide \(intermediate_size\).* 16"
        with pytest.raises(CheckpointError, match=message):
            view.layer(0)


@pytest.mark.parametrize("activation,latent", [("gelu", None), ("relu2", 8)])
def test_native_plain_experts_with_biases_read_and_encode_as_stored(tmp_path, activation, latent):
    """moelab's MLPExperts with (nonzero) biases, in the model's space or a latent one: the view's
    layer computes the model's block (its activation and biases, projected through the latent
    projections), and the layout writes back the tensors it read."""
    from moelab.hf.adapters import NATIVE
    from moelab.hf.native import moe_layer_from_view
    from moelab.models import ModelConfig, MoETransformer, save_pretrained
    from moelab.nn import MoEConfig

    torch.manual_seed(0)
    moe = MoEConfig(dim=16, num_experts=4, hidden_dim=8, top_k=2, activation=activation, expert_mlp_bias=True,
                    latent_dim=latent)  # fmt: skip
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, max_seq_len=16, moe=moe)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_()
    path = save_pretrained(model, tmp_path / "m")
    stored = load_file(path / "model.safetensors")
    view = open_checkpoint(path)
    x = torch.randn(5, 16)
    for i in range(2):
        if not isinstance(layer := view.layer(i), MoELayerView):
            continue
        assert layer.experts.activation == activation and (layer.latent is None) == (latent is None)
        with torch.no_grad():
            torch.testing.assert_close(moe_layer_from_view(layer)(x)[0], model.layers[i].ffn(x)[0])
        prefix = f"layers.{i}."
        written = NATIVE.layouts[1].experts.encode(layer.experts, prefix)
        assert written.keys() == {k for k in stored if k.startswith(prefix + "ffn.experts.")}
        for key, t in written.items():
            assert torch.equal(t, stored[key]), key
        # biases on disk: no straight read of an expert into a pool slot, which holds weights only
        assert NATIVE.layouts[1].experts.parts(Checkpoint(path), prefix, 0) is None


def test_axk1_as_released_routes_without_a_correction_bias(tmp_path):
    """A.X K1's releases store no mlp.gate.e_score_correction_bias (transformers routes with zeros)
    and a post_mlp_layernorm beside each dense MLP too (which transformers ignores): both read as
    transformers reads them."""
    model = build("axk1")
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    tensors["model.layers.0.post_mlp_layernorm.weight"] = torch.ones(D)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(tmp_path) as view:
        assert view.layer(1).router.selection_bias is None
        _assert_matches_transformers(view, "axk1", load(tmp_path), dense=(0,))


@pytest.mark.parametrize(
    "family,freq,dense,overrides",
    [("axk1", 2, (0, 1, 3), {}),
     ("dots3_note_text", [1, 1, 0, 1], (0, 2), dict(layer_types=["sliding_attention", "indexed_attention"] * 2)),
     ("minimax_m3_vl_text", [1, 1, 0, 1], (2,), dict(layer_types=["full_attention", "minimax_m3_sparse"] * 2))],
    ids=["axk1", "dots3", "minimax_m3"],
)  # fmt: skip
def test_a_legacy_moe_layer_freq_makes_the_layers_transformers_does(tmp_path, family, freq, dense, overrides):
    """A.X K1's and dots3's config classes derive mlp_layer_types from first_k_dense_replace and
    moe_layer_freq (every freq-th layer, or dots3's list of flags) where config.json has none;
    MiniMax-M3's from moe_layer_freq's flags alone (it reads no first_k_dense_replace)."""
    model = build(family, num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=freq, mlp_layer_types=None,
                  **overrides)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert [i for i, kind in enumerate(config.pop("mlp_layer_types")) if kind == "dense"] == list(dense)
    (tmp_path / "config.json").write_text(json.dumps({**config, "first_k_dense_replace": 1, "moe_layer_freq": freq}))
    with open_checkpoint(tmp_path) as view:
        assert [layer.index for layer in view.layers() if not isinstance(layer, MoELayerView)] == list(dense)
        _assert_matches_transformers(view, family, model, dense)


def test_aria_s_routed_experts_are_swiglu_whatever_hidden_act_gates_its_shared_experts(tmp_path):
    """AriaExperts always gate with SiLU; hidden_act is the shared experts' (GELU's tanh form here)."""
    model = build("aria_text", hidden_act="gelu_pytorch_tanh")
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        assert (view.layer(0).experts.activation, view.layer(0).shared.activation) == ("silu", "gelu_tanh_glu")
        _assert_matches_transformers(view, "aria_text", model, ())
    build("aria_text", hidden_act="relu").save_pretrained(tmp_path / "relu")
    with pytest.raises(CheckpointError, match=r"Aria config sets hidden_act 'relu' for its shared experts"):
        open_checkpoint(tmp_path / "relu").layer(0)


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_jetmoe_reads_its_mlp_with_the_bias_on_its_output_not_its_attention_experts(tmp_path, activation):
    """JetMoE's MoE block is mlp: the router's top-k logits softmaxed, input_linear's first rows
    activated (silu, its class default, or gelu_pytorch_tanh) times the next, output_linear, and
    mlp.bias [D] added to every token's output; the view against transformers' block. Its attention
    (self_attention.experts, with a router and experts of its own) is not read."""
    build("jetmoe", activation_function=activation).save_pretrained(tmp_path)
    model = load(tmp_path)
    with open_checkpoint(tmp_path) as view:
        _assert_matches_transformers(view, "jetmoe", model, ())
        layer = view.layer(1)
        torch.testing.assert_close(layer.output_bias, model.model.layers[1].mlp.bias.detach(), atol=0, rtol=0)
        assert layer.output_bias.abs().max() > 0.1
        torch.testing.assert_close(layer.router.weight, model.model.layers[1].mlp.router.layer.weight.detach())
        assert layer.experts.activation == {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh_glu"}[activation]


def test_jetmoe_refuses_an_activation_it_cannot_read(tmp_path):
    build("jetmoe", activation_function="relu").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="activation_function='relu'; moelab reads its experts with 'silu' or"):
        open_checkpoint(tmp_path).layer(0)


def test_a_block_output_bias_must_be_as_wide_as_the_model():
    torch.manual_seed(0)
    E, I = 4, 8
    router = RouterView(torch.randn(E, D), "softmax", 2, True)
    experts = ExpertsView(torch.randn(E, I, D), torch.randn(E, I, D), torch.randn(E, D, I))
    with pytest.raises(ValueError, match=rf"block output bias has shape \[{D + 1}\], expected \[{D}\]: one entry"):
        MoELayerView(0, router, experts, output_bias=torch.zeros(D + 1))


@pytest.mark.parametrize("family", ["laguna", "afmoe", "ernie4_5_moe"])
def test_the_tiny_selection_biases_held_as_parameters_leave_every_expert_chosen(family):
    """transformers holds these families' selection bias as a parameter, not a buffer: hf_tiny draws it
    in [0, 0.1) as it draws the buffers, not N(0, 0.3) as the other 1-D parameters, which outweighed the
    scores (Laguna's capped sigmoids span under 0.5): every token chose the same experts, and the
    family tests dropped experts no token ever chose."""
    model = build(family)
    biases = [p for n, p in model.named_parameters() if n.endswith(("e_score_correction_bias", "expert_bias"))]
    assert biases and all(0 <= b.min() and b.max() < 0.1 for b in biases)
    if family == "laguna":
        x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, _, chosen = model.model.layers[1].mlp.gate(x)
        assert chosen.unique().numel() == model.config.num_experts
