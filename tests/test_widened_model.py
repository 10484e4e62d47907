"""benchmarks/widened_model.py: a model whose experts are padded to a larger hidden size computes
and routes as the original (the offloading benchmark at real expert sizes relies on it)."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from moelab.models import MoETransformer, tiny

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "widened_model.py"


def _widened():
    spec = importlib.util.spec_from_file_location("widened_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.widened


@pytest.mark.parametrize("num_shared", [0, 1])
def test_widened_experts_compute_and_route_as_the_original(num_shared):
    torch.manual_seed(0)
    config = tiny()
    config = dataclasses.replace(config, init_std=0.2, moe=dataclasses.replace(config.moe, num_shared=num_shared))
    model = MoETransformer(config).eval()
    wide = _widened()(model, hidden_dim=96)
    assert wide.config.moe.hidden_dim == 96
    for name, layer in wide.moe_layers.items():
        assert layer.experts.gate_up_proj.shape == (4, 192, 32)
        assert layer.experts.gate_up_proj[:, 32:96].abs().sum() > 0, "the padded gate rows are random, not zero"
        layer.trace = model.moe_layers[name].trace = True
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        small, big = model(ids), wide(ids)
    torch.testing.assert_close(big.logits, small.logits, atol=1e-5, rtol=1e-5)
    for index, result in small.moe_results.items():
        assert torch.equal(big.moe_results[index].routing.indices, result.routing.indices)


def test_widening_to_fewer_units_or_other_experts_is_refused():
    model = MoETransformer(tiny())
    with pytest.raises(ValueError, match="at least the model's 32"):
        _widened()(model, hidden_dim=16)
    config = tiny()
    biased = MoETransformer(dataclasses.replace(config, moe=dataclasses.replace(config.moe, expert_mlp_bias=True)))
    with pytest.raises(ValueError, match="SwiGLU experts without biases"):
        _widened()(biased, hidden_dim=64)
