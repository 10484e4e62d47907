"""moelab.hf.export: moelab checkpoints written as Qwen2-MoE / Mixtral load in transformers with
moelab's logits (the exporter checks 1e-4 itself; the tests check again, independently)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from moelab.data import TOKENIZER_DIR
from moelab.hf import WriteCheckError
from moelab.hf import export as export_module
from moelab.hf.export import export_checkpoint
from moelab.models import MoETransformer, save_pretrained, tiny
from moelab.nn import MoEConfig, UoEConfig


def _model(path, *, vocab_size=128, moe=None, **fields) -> MoETransformer:
    """tiny() (dense layer 0, MoE layer 1) with unit-scale random weights, saved to `path`."""
    torch.manual_seed(0)
    moe = MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2, **(moe or {}))
    model = MoETransformer(dataclasses.replace(tiny(), vocab_size=vocab_size, moe=moe, **fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
    save_pretrained(model, path)
    return model


CASES = {
    "qwen2_moe-plain": ("qwen2_moe", {}, {}),
    "qwen2_moe-shared-tied-theta": (
        "qwen2_moe",
        {"num_shared": 1},
        {"tie_embeddings": True, "rope_theta": 1234.0},
    ),
    "qwen2_moe-gated-raw-first2dense": (
        "qwen2_moe",
        {"num_shared": 2, "shared_gate": True, "renormalize": False},
        {"n_layers": 4, "first_k_dense": 2, "norm_eps": 1e-3},
    ),
    "qwen2_moe-moe_every2": ("qwen2_moe", {}, {"n_layers": 4, "first_k_dense": 0, "moe_every": 2}),
    "mixtral-tied": ("mixtral", {}, {"first_k_dense": 0, "tie_embeddings": True, "n_kv_heads": 1}),
}


@pytest.mark.parametrize("case", CASES)
def test_export_matches_moelab_logits(tmp_path, case):
    family, moe, fields = CASES[case]
    model = _model(tmp_path / "src", moe=moe, **fields)
    export_checkpoint(tmp_path / "src", tmp_path / "out", family, tokenizer=None, quiet=True)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.model_type == family
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids).logits, hf.eval()(ids).logits
    assert expected.abs().max() > 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # greedy generation with the KV cache agrees too
    with torch.no_grad():
        ours = model.generate(ids[:1, :5], 6, greedy=True)
        theirs = hf.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(ours, theirs)
    # and so does a left-padded batch: positions from each prompt's first token, padding unseen
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        ours = model.generate(ids[:, :7], 6, attention_mask=mask, greedy=True)
        options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        theirs = hf.generate(ids[:, :7], attention_mask=mask, **options)
    assert torch.equal(ours, theirs)


def test_export_with_the_shipped_tokenizer(tmp_path):
    _model(tmp_path / "src", vocab_size=8192, moe={"num_shared": 1})
    export_checkpoint(tmp_path / "src", tmp_path / "out", "qwen2_moe", quiet=True)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_token_id == 0 and config["pad_token_id"] == tok.pad_token_id == 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    assert torch.isfinite(hf(ids).logits).all()


@pytest.mark.parametrize(
    "family,moe,fields,message",
    [
        ("mixtral", {}, {}, r"dense layers \(Mixtral has MoE in every layer; use qwen2_moe\)"),
        ("mixtral", {"num_shared": 1}, {"first_k_dense": 0}, "a shared expert"),
        (
            "qwen2_moe",
            {"score_func": "sigmoid", "selection_bias": True},
            {},
            r"score_func='sigmoid' \(only 'softmax'\); the aux-loss-free selection bias",
        ),
        ("qwen2_moe", {"router": "topp"}, {}, r"router='topp'"),
        ("qwen2_moe", {"capacity_factor": 1.0}, {}, "capacity dropping"),
        ("qwen2_moe", {"latent_dim": 16}, {}, r"latent experts \(latent_dim=16\)"),
        ("qwen2_moe", {"identity_experts": 2}, {}, r"identity \(zero-computation\) experts \(identity_experts=2\)"),
    ],
)
def test_models_that_do_not_map_are_refused(tmp_path, family, moe, fields, message):
    _model(tmp_path / "src", moe=moe, **fields)
    with pytest.raises(ValueError, match=rf"cannot be exported exactly as {family}: it has .*{message}"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", family, tokenizer=None, quiet=True)
    assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path):
    _model(tmp_path / "src")
    with pytest.raises(ValueError, match=r"unknown export family 'qwen2moe' \(did you mean 'qwen2_moe'\?\)"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", "qwen2moe")
    with pytest.raises(ValueError, match=r"has no tokenizer and its vocabulary \(128\) is not that of moelab's shipped"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", "qwen2_moe")
    with pytest.raises(ValueError, match=r"tokenizer .* has 8192 tokens but the model's vocab_size is 128"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", "qwen2_moe", tokenizer=TOKENIZER_DIR)


def test_a_wrong_mapping_fails_the_logit_check(tmp_path, monkeypatch):
    """The exporter's own check can fail: forgetting to double an ungated shared expert's down
    projection (Qwen2-MoE gates it by sigmoid(0) = 1/2) loads fine but computes something else."""
    _model(tmp_path / "src", moe={"num_shared": 1})
    real = export_module._qwen2_shared

    def halved(layer):
        shared = real(layer)
        return dataclasses.replace(shared, down=shared.down / 2)

    monkeypatch.setattr(export_module, "_qwen2_shared", halved)
    with pytest.raises(WriteCheckError, match="logits differ from moelab's"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", "qwen2_moe", tokenizer=None, quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path):
    from typer.testing import CliRunner

    from moelab.cli import app

    _model(tmp_path / "src")
    args = [
        "export",
        str(tmp_path / "src"),
        "--family",
        "qwen2_moe",
        "--out",
        str(tmp_path / "out"),
        "--no-tokenizer",
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "out" / "config.json").is_file()
    result = CliRunner().invoke(app, [*args[:3], "mixtral", "--out", str(tmp_path / "out2")])
    assert result.exit_code != 0 and "cannot be exported exactly as mixtral" in str(result.exception)
    result = CliRunner().invoke(app, [*args[:5], str(tmp_path / "out3"), "--tokenizer", str(TOKENIZER_DIR)])  # vocab 128
    assert result.exit_code != 0 and "has 8192 tokens but the model's vocab_size is 128" in str(result.exception)
    result = CliRunner().invoke(app, [*args, "--tokenizer", str(TOKENIZER_DIR)])
    assert result.exit_code != 0 and "exclude each other" in str(result.exception)


@pytest.mark.parametrize(
    "family,moe,fields,message",
    [
        ("qwen2_moe", {"route_scale": 2.0}, {}, r"route_scale=2\.0"),
        ("qwen2_moe", {"router_bias": True}, {}, "a router bias"),
        ("qwen2_moe", {"expert_mlp_bias": True}, {}, "expert biases"),
        ("mixtral", {"renormalize": False}, {"first_k_dense": 0}, r"renormalize=False \(Mixtral always"),
    ],
)
def test_settings_that_change_the_logits_are_refused_not_exported(tmp_path, family, moe, fields, message):
    """Settings with no Qwen2-MoE / Mixtral counterpart besides those above: the export would load
    in transformers but compute something else, so it is refused up front, naming the setting."""
    _model(tmp_path / "src", moe=moe, **fields)
    with pytest.raises(ValueError, match=rf"cannot be exported exactly as {family}: it has .*{message}"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", family, tokenizer=None, quiet=True)
    assert not (tmp_path / "out").exists()


def test_bf16_model_is_exported_in_bf16(tmp_path):
    """The weights keep the dtype they are stored in, and config.json says so, as save_pretrained
    would write it for a bf16 model (transformers loads dtype="auto" from it)."""
    from safetensors import safe_open

    model = _model(tmp_path / "fp32", moe={"num_shared": 1})
    save_pretrained(model.to(torch.bfloat16), tmp_path / "src")
    export_checkpoint(tmp_path / "src", tmp_path / "out", "qwen2_moe", tokenizer=None, quiet=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert hf.dtype == torch.bfloat16


def test_config_carries_the_settings_that_do_not_show_in_logits(tmp_path):
    """Context length and the balance-loss coefficient: read back by transformers from the
    export, they are moelab's own (a wrong value would not change the logit check); the
    coefficient converted to transformers' loss, × MoE layers / top_k (`hf_aux_loss_coef`)."""
    for family, fields, coef in (("qwen2_moe", {}, 0.0185), ("mixtral", {"first_k_dense": 0}, 0.037)):
        src = tmp_path / f"src-{family}"
        model = _model(src, moe={"balance_coef": 0.037}, max_seq_len=96, **fields)
        export_checkpoint(src, tmp_path / family, family, tokenizer=None, quiet=True)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / family).config
        assert hf.max_position_embeddings == model.config.max_seq_len == 96
        assert model.config.moe.balance_coef == 0.037 and hf.router_aux_loss_coef == coef
        assert hf.num_experts_per_tok == model.config.moe.top_k == 2


def test_the_balance_coefficient_comes_back_for_any_layer_count_and_top_k():
    """Export then import gives back moelab's balance_coef, and import then export transformers'
    router_aux_loss_coef, whatever MoE layers / top_k is (before, where it is no short decimal,
    as 7 / 3, rounding both ways lost the last digit: 0.01 came back 0.00999999999999)."""
    convert = export_module.hf_aux_loss_coef
    for top_k in range(1, 9):
        for layers in range(1, 65):
            for coef in (0.01, 0.001, 0.003, 0.037, 1e-4, 0.0123):
                assert convert(convert(coef, top_k, layers), top_k, layers, inverse=True) == coef, (coef, top_k, layers)
                assert convert(convert(coef, top_k, layers, inverse=True), top_k, layers) == coef, (coef, top_k, layers)
    assert convert(0.02, 2, 32, inverse=True) == 0.00125  # Mixtral-8x7B's, as a short decimal


@pytest.mark.parametrize("case", ["qwen2_moe-shared-tied-theta", "mixtral-tied"])
def test_exported_model_in_memory_is_the_moelab_model(tmp_path, case):
    """`exported_model` (the fused in-memory layout, used by `moelab bench generate`) computes
    moelab's logits, like the checkpoint export does."""
    family, moe, fields = CASES[case]
    model = _model(tmp_path / "src", moe=moe, **fields)
    hf = export_module.exported_model(tmp_path / "src", family)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids).logits, hf(ids).logits
    assert expected.abs().max() > 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    tensors, _ = export_module.export_state(tmp_path / "src", family, tokenizer=None, fused=True)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in tensors), "not the fused layout"
    tensors, _ = export_module.export_state(tmp_path / "src", family, tokenizer=None)
    assert not any("gate_up" in k for k in tensors), "not the per-expert layout save_pretrained writes"


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"moe": None, "first_k_dense": 0}, r"no MoE layers \(moelab exports MoE models only\)"),
        (
            {"moe": None, "uoe": UoEConfig(attn_top_k=2), "n_kv_heads": None, "first_k_dense": 0},
            r"Union-of-Experts layers and no MoE layers \(moelab exports MoE models only\)",
        ),
    ],
    ids=["dense", "uoe"],
)
def test_a_model_without_moe_layers_is_refused_by_what_it_has(tmp_path, fields, message):
    """A dense or UoE-only model is refused by its config, as the others are: before, the checkpoint
    reader refused it first, a UoE model as 'model_type None ... is not a supported MoE family'
    followed by the 40 families moelab reads."""
    torch.manual_seed(0)
    save_pretrained(MoETransformer(dataclasses.replace(tiny(), **fields)), tmp_path / "src")
    for family in ("qwen2_moe", "mixtral"):
        with pytest.raises(ValueError, match=rf"cannot be exported exactly as {family}: it has {message}$"):
            export_checkpoint(tmp_path / "src", tmp_path / "out", family, tokenizer=None, quiet=True)
    assert not (tmp_path / "out").exists()
