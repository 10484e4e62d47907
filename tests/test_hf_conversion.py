"""moelab.hf.conversion: transformers Mixtral and (zero attention bias) Qwen2-MoE checkpoints as
moelab models: transformers' logits and greedy tokens, a moelab checkpoint that round-trips
through `moelab export` bit for bit, and clear refusals of everything else."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hf_tiny import build
from safetensors.torch import load_file, save_file
from test_hf_export import _model

from moelab.hf.checkpoint import CheckpointError
from moelab.hf.conversion import conversion_problems, import_checkpoint, moelab_model
from moelab.hf.export import export_checkpoint
from moelab.models import MoETransformer, load_pretrained, save_pretrained, tiny
from moelab.nn import UoEConfig
from moelab.offload import load_offloaded
from moelab.offload.model import generate_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(tmp_path, family: str, **overrides):
    """A tiny random transformers model of `family`, saved; Qwen2-MoE's attention biases zeroed."""
    model = build(family, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.zero_()
    model.save_pretrained(tmp_path / family)
    return model, tmp_path / family


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("mixtral", {}),
        ("mixtral", {"tie_word_embeddings": True, "rope_theta": 321.0}),
        ("qwen2_moe", {}),  # layer 0 dense (decoder_sparse_step 2), a gated shared expert
        ("qwen2_moe", {"norm_topk_prob": True, "mlp_only_layers": [1], "decoder_sparse_step": 1}),
        ("qwen2_moe", {"shared_expert_intermediate_size": 0}),  # a shared expert of no width: adds 0, its gate alone
    ],
)
def test_a_converted_checkpoint_computes_what_transformers_computes(tmp_path, family, overrides):
    reference, path = _saved(tmp_path, family, **overrides)
    assert conversion_problems(path) == []
    model = moelab_model(path)
    assert isinstance(model, MoETransformer) and not model.training
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    free = generate_ids(reference, ids, 6)
    assert torch.equal(generate_ids(model, ids, 6), free)
    eos = free[0, 11].item()  # row 0 ends after its third new token: both engines stop it and pad it alike
    ended = generate_ids(reference, ids, 6, eos_token_id=eos)
    assert torch.equal(generate_ids(model, ids, 6, eos_token_id=eos), ended) and (ended[0, 12:] == eos).all()
    dense = set(overrides.get("mlp_only_layers", [0] if family == "qwen2_moe" else []))
    assert model.config.layer_kinds == ["dense" if i in dense else "moe" for i in range(2)]


def test_a_moelab_checkpoint_exported_and_imported_is_the_same_checkpoint(tmp_path):
    """moelab -> export (mixtral, qwen2_moe) -> import: every tensor bit for bit; the import writes
    the checkpoint's dtype and refuses to replace a directory without overwrite. Qwen2-MoE always
    has a sigmoid-gated shared expert: the zero one an export writes for a model without any, and
    the zero gate (with a doubled down projection) for an ungated one, come back as what they were,
    not as extra tensors (before, both came back gated). Dense layers come back as first_k_dense
    (before: a layer_types list)."""
    original = _model(tmp_path / "m", moe={"renormalize": True}, first_k_dense=0)
    ungated = _model(tmp_path / "shared", moe={"num_shared": 1})
    for source, model, family in (("m", original, "mixtral"), ("m", original, "qwen2_moe"), ("shared", ungated, "qwen2_moe")):
        exported = tmp_path / f"{source}-{family}"
        export_checkpoint(tmp_path / source, exported, family, tokenizer=None, quiet=True)
        back = load_pretrained(import_checkpoint(exported, tmp_path / f"back-{source}-{family}", quiet=True))
        pattern = ("layer_types", "first_k_dense", "moe_every")  # said as the config said it, not as a list
        assert [getattr(back.config, f) for f in pattern] == [getattr(model.config, f) for f in pattern], family
        assert (back.config.moe.num_shared, back.config.moe.shared_gate) == (model.config.moe.num_shared, False)
        expected, got = model.state_dict(), back.state_dict()
        assert got.keys() == expected.keys(), family
        for name, t in expected.items():
            assert torch.equal(got[name], t), (family, name)
    with pytest.raises(ValueError, match="pass --overwrite"):
        import_checkpoint(tmp_path / "m-mixtral", tmp_path / "back-m-mixtral", quiet=True)
    _, path = _saved(tmp_path, "mixtral")
    half = moelab_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


@pytest.mark.parametrize(
    "family,overrides,tolerance",
    [
        ("mixtral", dict(num_hidden_layers=1, num_experts_per_tok=3), 1e-6),  # one layer: the same formula
        ("mixtral", dict(num_hidden_layers=3, num_experts_per_tok=1), 0.1),
        ("qwen2_moe", dict(num_hidden_layers=4, num_experts_per_tok=3), 0.1),  # 2 MoE layers of 4
    ],
)
def test_an_imported_model_weighs_the_balance_loss_as_transformers_does(tmp_path, family, overrides, tolerance):
    """transformers averages f_e and P_e over the MoE layers and counts f_e per token; moelab sums
    the layers' losses with f_e a share of the assignments. The import converts the coefficient
    (balance_coef = router_aux_loss_coef * K / L), so a fine-tuned import gets the balance
    loss transformers would give it: equal for one layer, close where layers route alike (random
    routers at init). Before, it was L / K times as heavy (16x for Mixtral-8x7B)."""
    reference, path = _saved(tmp_path, family, router_aux_loss_coef=0.05, **overrides)
    model = moelab_model(path).train()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    expected = 0.05 * reference.train()(ids, output_router_logits=True).aux_loss
    got = model(ids).aux_loss
    assert abs(got.item() / expected.item() - 1) < tolerance


def test_export_converts_the_balance_coefficient_and_import_gives_it_back(tmp_path):
    """router_aux_loss_coef = balance_coef * MoE layers / top_k (top-2: 3 MoE layers for Mixtral,
    1 of 2 for Qwen2-MoE), and back to the digit."""
    _model(tmp_path / "m3", moe={"balance_coef": 0.003}, n_layers=3, first_k_dense=0)
    _model(tmp_path / "m1", moe={"balance_coef": 0.003})
    for source, family, exported, coef in (("m3", "mixtral", "x", 0.0045), ("m1", "qwen2_moe", "q", 0.0015)):
        export_checkpoint(tmp_path / source, tmp_path / exported, family, tokenizer=None, quiet=True)
        assert json.loads((tmp_path / exported / "config.json").read_text())["router_aux_loss_coef"] == coef
    for exported in ("x", "q"):
        assert moelab_model(tmp_path / exported).config.moe.balance_coef == 0.003


def test_what_does_not_convert_exactly_is_refused_with_the_reasons(tmp_path):
    model = build("qwen2_moe")  # random attention biases
    model.save_pretrained(tmp_path / "biased")
    (problem,) = conversion_problems(tmp_path / "biased")
    assert problem == "attention biases that are not zero (moelab's attention has none)"
    with pytest.raises(ValueError, match="cannot run as a moelab model exactly: it has attention biases"):
        moelab_model(tmp_path / "biased")
    build("olmoe").save_pretrained(tmp_path / "olmoe")
    assert "model_type 'olmoe'" in conversion_problems(tmp_path / "olmoe")[0]
    _, path = _saved(tmp_path, "mixtral")
    config = json.loads((path / "config.json").read_text())
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0}
    for change, problem in [
        ({"head_dim": 16}, "a head width of 16"),
        ({"rope_parameters": linear}, "scaled RoPE (linear)"),
        ({"hidden_act": "gelu"}, "the activation 'gelu'"),
        ({"hidden_act": "relu"}, "the activation 'relu'"),  # an allow-list of SiLU, not a deny-list of GELU
    ]:
        (path / "config.json").write_text(json.dumps(config | change))
        assert any(p.startswith(problem) for p in conversion_problems(path)), change
    for change, problem in [
        ({"sliding_window": 24}, "sliding-window attention (24 positions, under max_position_embeddings"),
        ({"sliding_window": 24, "max_position_embeddings": 24}, None),  # the window is the whole context
        ({"hidden_act": "swish"}, None),  # transformers' name for SiLU too
    ]:
        (path / "config.json").write_text(json.dumps(config | change))
        problems = conversion_problems(path)
        assert problems == [] if problem is None else problems[0].startswith(problem), change
    (path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="a layer past num_hidden_layers.*check that config.json belongs"):
        moelab_model(path)
    _, qwen = _saved(tmp_path, "qwen2_moe")
    qwen_config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(qwen_config | {"decoder_sparse_step": 0}))
    assert conversion_problems(qwen)[0].startswith("decoder_sparse_step 0")
    # every layer dense: said so (before, moelab's own 'ModelConfig.moe is set but layer_types has no moe layer')
    for change in ({"mlp_only_layers": [0, 1]}, {"decoder_sparse_step": 3}, {"num_experts": 0}):
        (qwen / "config.json").write_text(json.dumps(qwen_config | change))
        assert conversion_problems(qwen) == [
            "no MoE layers (mlp_only_layers, decoder_sparse_step or num_experts 0 make every layer dense)"
        ], change
    # Qwen2-MoE's window counts only in the layers that layer_types makes slide (transformers' rule:
    # from use_sliding_window and max_window_layers where config.json gives no layer_types)
    del qwen_config["layer_types"]
    for change, slides in [
        ({"use_sliding_window": True}, True),
        ({"use_sliding_window": False}, False),
        ({"use_sliding_window": True, "max_window_layers": 0}, False),  # no layer below 0 slides
        ({"use_sliding_window": True, "layer_types": ["full_attention"] * 2}, False),
        ({"use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]}, True),
    ]:
        (qwen / "config.json").write_text(json.dumps(qwen_config | {"sliding_window": 4} | change))
        problems = conversion_problems(qwen)
        assert problems[0].startswith("sliding-window attention (4 positions") if slides else problems == [], change
    (native := tmp_path / "native").mkdir()
    _model(native / "m")
    assert "a moelab checkpoint already" in conversion_problems(native / "m")[0]
    # one without MoE layers too (before: 'model_type None ... is not a supported MoE family' and every family's name)
    uoe = dict(moe=None, uoe=UoEConfig(attn_top_k=2), n_kv_heads=None, first_k_dense=0)
    save_pretrained(MoETransformer(dataclasses.replace(tiny(), **uoe)), native / "uoe")
    assert "a moelab checkpoint already" in conversion_problems(native / "uoe")[0]
    with pytest.raises(ValueError, match="it has no transformers model_type: it is a moelab checkpoint already"):
        import_checkpoint(native / "uoe", tmp_path / "out", quiet=True)


def test_one_nonzero_attention_bias_anywhere_is_refused_and_a_mixtral_one_is_not_dropped(tmp_path):
    """Qwen2-MoE: zero biases everywhere but layer 1's v_proj is still refused (moelab's attention
    would compute something else there). Mixtral has no attention biases: a checkpoint that stores
    some does not match its config.json and is refused, not converted without them."""
    _, qwen = _saved(tmp_path, "qwen2_moe")
    tensors = load_file(qwen / "model.safetensors")
    assert all(not t.any() for k, t in tensors.items() if k.endswith("_proj.bias"))
    tensors["model.layers.1.self_attn.v_proj.bias"][3] = 0.5
    save_file(tensors, qwen / "model.safetensors", metadata={"format": "pt"})
    assert conversion_problems(qwen) == ["attention biases that are not zero (moelab's attention has none)"]
    _, mixtral = _saved(tmp_path, "mixtral")
    tensors = load_file(mixtral / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.full((32,), 0.5)
    save_file(tensors, mixtral / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.q_proj.bias' has no counterpart"):
        moelab_model(mixtral)


def test_the_config_maps_field_for_field_and_a_stored_tied_head_is_the_embedding(tmp_path):
    """moelab's config carries config.json's context length, RoPE base, norm epsilon and head
    counts; config.json ties the head and the checkpoint stores a head equal to the embedding (as
    some writers do): it converts tied, with transformers' logits."""
    overrides = dict(max_position_embeddings=40, rope_theta=321.0, rms_norm_eps=0.25, tie_word_embeddings=True)
    reference, path = _saved(tmp_path, "mixtral", **overrides)
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = moelab_model(path)
    c = model.config
    assert (c.max_seq_len, c.rope_theta, c.norm_eps, c.n_heads, c.n_kv_heads) == (40, 321.0, 0.25, 4, 2)
    assert c.tie_embeddings and model.lm_head.weight is model.embed.weight
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_checkpoint_decides_the_head_the_dtype_and_the_files_that_come_along(tmp_path):
    """config.json ties the head but the checkpoint stores another one: transformers keeps it, so
    does the conversion. A bf16 checkpoint with float32 router weights converts to bf16 (the dtype of
    most of its weights, not the first tensor's); float32 weights under a config.json that says
    bfloat16 stay float32 (before, they were rounded and the import refused itself as a moelab bug). Stored RoPE frequencies are skipped. The import copies the chat template, generation config and
    license with the tokenizer, never weights or code, and converts the balance coefficient."""
    reference, path = _saved(tmp_path, "mixtral", router_aux_loss_coef=0.05)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    for name in ("chat_template.jinja", "LICENSE", "tokenizer.json", "modeling_evil.py"):
        (path / name).write_text("{}")
    tensors = load_file(path / "model.safetensors")  # as older checkpoints stored them: RoPE's frequencies too
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = moelab_model(path)
    assert not model.config.tie_embeddings and model.config.moe.balance_coef == 0.05
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    offloaded = load_offloaded(path, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(ids, 4), generate_ids(reference, ids, 4))
    finally:
        offloaded.close()
    out = import_checkpoint(path, tmp_path / "back", quiet=True)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "LICENSE", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json",
    ]  # fmt: skip
    mixed = build("mixtral").to(torch.bfloat16)
    for layer in mixed.model.layers:
        layer.mlp.gate.float()
    mixed.save_pretrained(tmp_path / "mixed")
    assert moelab_model(tmp_path / "mixed").embed.weight.dtype == torch.bfloat16
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    assert moelab_model(path).embed.weight.dtype == torch.float32
    import_checkpoint(path, tmp_path / "stored", quiet=True)


def test_the_import_check_catches_a_wrong_tensor_in_the_layers_it_runs(tmp_path, monkeypatch):
    """The written checkpoint is checked against transformers on its layers up to the second MoE
    layer and the first of every other kind: a conversion that got layer 1's expert weights, or a
    late dense layer's, wrong is not written."""
    from moelab.hf import conversion
    from moelab.hf.postconditions import WriteCheckError

    convert = conversion.moelab_tensors

    def scaled(name: str, factor: float, *more: str):
        """moelab_tensors with tensor `name` (and `more`) multiplied by `factor`: a wrong conversion."""

        def wrong(*args, **kwargs):
            tensors = convert(*args, **kwargs)
            for key in (name, *more):
                tensors[key] = tensors[key] * factor
            return tensors

        return wrong

    _, path = _saved(tmp_path, "mixtral")
    monkeypatch.setattr(conversion, "moelab_tensors", scaled("layers.1.ffn.experts.down_proj", 1.01))
    with pytest.raises(WriteCheckError, match="logits differ from transformers'"):
        import_checkpoint(path, tmp_path / "back", quiet=True)
    assert not (tmp_path / "back").exists()
    # finite weights whose logits overflow to +-inf and NaN: refused too (a NaN error passes any tolerance)
    monkeypatch.setattr(conversion, "moelab_tensors", scaled("norm.weight", 3e38, "lm_head.weight"))
    with pytest.raises(WriteCheckError, match="logits differ from transformers'"):
        import_checkpoint(path, tmp_path / "back", quiet=True)
    assert not (tmp_path / "back").exists()
    # Qwen2-MoE, 4 layers: moe, moe, moe, dense. The check cuts after the dense one (the first of its
    # kind), so a wrong dense layer is caught too (the cut keeps the layer kinds it runs)
    _, qwen = _saved(tmp_path, "qwen2_moe", num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[3])
    monkeypatch.setattr(conversion, "moelab_tensors", convert)
    assert load_pretrained(import_checkpoint(qwen, tmp_path / "qwen-back", quiet=True)).config.n_layers == 4
    monkeypatch.setattr(conversion, "moelab_tensors", scaled("layers.3.ffn.gate_proj.weight", 1.5))
    with pytest.raises(WriteCheckError, match="logits differ from transformers'"):
        import_checkpoint(qwen, tmp_path / "qwen-wrong", quiet=True)


def test_generate_runs_a_convertible_transformers_checkpoint_on_moelab_and_the_cli_imports_it(tmp_path):
    """`generate_text` on an exported Mixtral decodes as moelab with the moelab checkpoint's text;
    an OLMoE checkpoint stays on transformers; `moelab import` writes the checkpoint."""
    from typer.testing import CliRunner

    from moelab.cli import app
    from moelab.generate import generate_text
    from moelab.models.reference import reference_model_dir

    export_checkpoint(reference_model_dir(), tmp_path / "mixtral", "mixtral", quiet=True)
    native, stats = generate_text(reference_model_dir(), "The king said", max_new_tokens=6)
    converted, converted_stats = generate_text(tmp_path / "mixtral", "The king said", max_new_tokens=6)
    assert converted == native and stats["engine"] == converted_stats["engine"] == "moelab"
    model = build("olmoe", vocab_size=8192)
    model.save_pretrained(tmp_path / "olmoe")
    assert generate_text(tmp_path / "olmoe", "The king said", max_new_tokens=2)[1]["engine"] == "transformers"
    args = ["import", str(tmp_path / "mixtral"), "--out", str(tmp_path / "back"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    assert load_pretrained(tmp_path / "back").config.n_layers == 6


def test_an_imported_model_exports_with_its_own_tokenizer_dtype_and_generation_config(tmp_path):
    """import then export gives the source's tokenizer (and its bos/eos ids in config.json), its
    generation config and its dtype back; before, export wrote moelab's shipped tokenizer (whose
    8,192 tokens were refused only where the vocabulary is smaller) and declared float32."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(58)} | {"<unk>": 58, "<s>": 59, "</s>": 60}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    source = tmp_path / "source"
    build("mixtral", bos_token_id=59, eos_token_id=60).to(torch.bfloat16).save_pretrained(source)
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(source)
    import_checkpoint(source, tmp_path / "moelab", quiet=True)
    export_checkpoint(tmp_path / "moelab", tmp_path / "back", "mixtral", quiet=True)
    back = tmp_path / "back"
    assert (back / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == 60
    config = json.loads((back / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["dtype"]) == (59, 60, "bfloat16")
    assert AutoModelForCausalLM.from_pretrained(back).dtype == torch.bfloat16
