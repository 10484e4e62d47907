"""moelab.hf.edit: what an edit of one MoE layer means, checked on tiny transformers checkpoints.

Cases found by mutation testing that tests/test_hf_write.py did not reach: the refusals of
`LayerEdit`, the dtype an edited tensor is stored in when the source mixes dtypes, and how
exactly an edited view must keep the shared experts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_tiny import build
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moelab.hf import LayerEdit, apply_edit, open_checkpoint, write_checkpoint
from moelab.hf.edit import check_edit, check_same_settings


@pytest.mark.parametrize(
    "sources,message",
    [
        ((), "needs at least one expert"),
        (((0,), ()), "every group at least one id"),
        (((-1,), (0,)), r"distinct expert ids >= 0, got \[\(-1,\), \(0,\)\]"),
        (((1,), (0, -2)), r"distinct expert ids >= 0"),
    ],
)
def test_an_edit_without_experts_or_with_a_negative_id_is_refused(sources, message):
    """No new experts, an empty group or a negative id (which would index from the end) is
    refused by LayerEdit itself, with its own message."""
    with pytest.raises(ValueError, match=message):
        LayerEdit(sources)


def test_a_float32_correction_bias_of_a_bf16_checkpoint_stays_float32(tmp_path):
    """DeepSeek-V3 as released: bf16 weights, e_score_correction_bias in float32. A merge edit
    (replacement tensors) stores each router tensor in the dtype the source stores it in, not
    the router weight's: the bias keeps its float32 values exactly."""
    src = tmp_path / "src"
    build("deepseek_v3").to(torch.bfloat16).save_pretrained(src)
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    tensors = load_file(src / "model.safetensors")
    bias = torch.randn(8, generator=torch.Generator().manual_seed(0)) * 1e-2  # not bf16-representable
    assert not torch.equal(bias, bias.bfloat16().float())
    save_file(tensors | {key: bias}, src / "model.safetensors", metadata={"format": "pt"})

    kept = [0, 1, 2, 4, 6, 7]
    with open_checkpoint(src) as view:
        layer = view.layer(1)
        assert layer.router.selection_bias.dtype == torch.float32
        six = apply_edit(layer, LayerEdit.keep(kept))
    edit = LayerEdit(((0, 3), (1,), (2,), (4,), (6,), (7,)), view=six)
    assert apply_edit(layer, edit).router.selection_bias.dtype == torch.float32
    write_checkpoint(src, tmp_path / "out", {1: edit}, reload=False, quiet=True)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor(key).dtype == torch.float32
        assert torch.equal(f.get_tensor(key), bias[kept])
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16


def test_a_shared_expert_changed_by_one_ulp_is_refused(tmp_path):
    """The writer copies shared experts unchanged, so an edited view must hold them bit for bit:
    a change of one unit in the last place of one weight (within any closeness tolerance) is
    refused; the same values in another dtype are not."""
    build("qwen2_moe").save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        layer = view.layer(1)
    shared = layer.shared
    check_same_settings(layer, dataclasses.replace(layer, shared=dataclasses.replace(
        shared, **{n: getattr(shared, n).double() for n in ("gate", "up", "down", "sigmoid_gate")})))  # fmt: skip
    for name in ("gate", "up", "down", "sigmoid_gate"):
        changed = getattr(shared, name).clone()
        changed[0, 0] = torch.nextafter(changed[0, 0], torch.tensor(float("inf")))
        edited = dataclasses.replace(layer, shared=dataclasses.replace(shared, **{name: changed}))
        with pytest.raises(ValueError, match="layer 1: the edited view changes the shared experts"):
            check_same_settings(layer, edited)


def test_groups_scored_by_their_two_best_need_two_experts_per_group_before_writing():
    """check_edit refuses, naming the layer, an edit that leaves one expert per routing group
    when the router scores groups by their two best scores (sigmoid ones: transformers' DeepSeek-V3;
    softmax ones with group_score "top2": Mistral 4); a softmax router by the best takes one per group."""
    settings = {"top_k": 2, "n_group": 2, "topk_group": 2}
    edit = LayerEdit.keep([0, 4])  # one expert from each group of 4
    check_edit(3, edit, 8, settings | {"score_func": "softmax"})
    for rule in ({"score_func": "sigmoid"}, {"score_func": "softmax", "group_score": "top2"}):
        with pytest.raises(ValueError, match=r"layer 3: after the edit, .*scores each group by its 2 best experts"):
            check_edit(3, edit, 8, settings | rule)
    check_edit(3, LayerEdit.keep([0, 1, 4, 5]), 8, settings | {"score_func": "sigmoid"})


def test_an_edited_view_is_the_layer_it_edits(tmp_path):
    """apply_edit returns the edited layer itself (its index and shared experts), whatever the
    view's own index: only the router and routed experts come from the view."""
    build("mixtral").save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        layer, other = view.layer(0), view.layer(1)
    edited = apply_edit(layer, LayerEdit(((0,), (1,), (2,), (3,)), view=other))
    assert edited.index == 0 and torch.equal(edited.experts.gate, other.experts.gate)


def test_moe_output_computes_in_float64_whatever_the_input_dtype(tmp_path):
    """moe_output takes x in any float dtype and computes (and returns) in float64."""
    from moelab.hf.edit import moe_output

    build("mixtral").save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        layer = view.layer(0)
    x = torch.randn(8, layer.experts.dim, generator=torch.Generator().manual_seed(0))
    y = moe_output(layer, x, keep=[0, 2, 3])
    assert y.dtype == torch.float64 and torch.equal(y, moe_output(layer, x.double(), keep=[0, 2, 3]))


def test_an_edit_that_changes_how_groups_are_scored_is_refused(tmp_path):
    """group_score lives in config.json (Mistral 4's family rule) like n_group: an edited view that
    scores the groups otherwise is refused by name, as the writer would not write it."""
    build("mistral4").save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as view:
        layer = view.layer(1)
    check_same_settings(layer, layer)
    by_best = dataclasses.replace(layer, router=dataclasses.replace(layer.router, group_score="max"))
    with pytest.raises(ValueError, match=r"layer 1: the edited router has group_score='max' but the checkpoint's is 'top2'"):
        check_same_settings(layer, by_best)
