"""Inkling 2 read through its vision-language wrapper, and what moelab refuses of its router."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import TINY, D, build, build_multimodal

from moelab.hf import CheckpointError, moe_layer_from_view, open_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("original", [True, False], ids=["released", "transformers-names"])
def test_inkling2_vision_language_model_is_read_through_its_language_model(tmp_path, original):
    """The inkling2 release (model.llm. beside model.visual.) read as its inkling2_text language model:
    every layer's view computes transformers' MoE block."""
    text = dict(TINY["inkling2_text"].config, model_type="inkling2_text")
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=4, projection_hidden_dim=16,
                  text_hidden_size=D, posemb_grid_size=4)  # fmt: skip
    model = build_multimodal("inkling2", text, vision).eval()
    model.save_pretrained(tmp_path, save_original_format=original)
    torch.manual_seed(1)
    x = torch.randn(2, 7, D)
    with open_checkpoint(tmp_path) as view:
        assert view.family == "inkling2_text" and len(list(view.layers())) == 2
        for layer in view.layers():
            with torch.no_grad():
                expected = model.model.language_model.layers[layer.index].mlp(x)
                got, _ = moe_layer_from_view(layer)(x)
            assert expected.abs().max() > 0.1, "outputs too small for the tolerance to mean anything"
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_inkling2_router_with_another_scoring_func_is_refused_by_name(tmp_path):
    build("inkling2_text").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"scoring_func": "softmax"}))
    with open_checkpoint(tmp_path) as view, pytest.raises(
        CheckpointError, match="scoring_func='softmax'; moelab reads Inkling 2's router with 'sigmoid' only"
    ):
        view.layer(0)
