"""Multi-token prediction layers (DeepSeek-V3's and GLM-4.5's draft module, stored as decoder layer
`num_hidden_layers`): calibrated on what a drafter hands them, checked against the layer computed
with transformers' own modules; compressed with the other layers and written back, or left out
with mtp="drop"."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import COMMON, DEEPSEEK, add_mtp_layer, build, load
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from moelab.compress import METHODS, Calibration, CalibrationOptions, calibrate, compress
from moelab.compress.calibration import calibration_mixture
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import open_checkpoint
from moelab.hf.layerwise import LayerwiseModel
from moelab.hf.writer import drop_experts

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = CalibrationOptions(tokens=384, seq_len=32, batch_size=4, sample_tokens=48)
GLM = dict(
    {k: v for k, v in DEEPSEEK.items() if not k.startswith(("kv_", "qk_", "v_head"))},
    head_dim=8, num_key_value_heads=2, use_qk_norm=True, routed_scaling_factor=1.5,
)  # fmt: skip
QWEN = dict(
    COMMON, num_hidden_layers=4, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2, linear_num_value_heads=4,
    linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
)  # fmt: skip
CONFIGS = {"deepseek_v3": {}, "glm4_moe": GLM, "qwen3_next": QWEN}  # glm4_moe, qwen3_next: read structurally


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where the tiny models' MTP layer keeps its tensors (tests/hf_tiny.py's add_mtp_layer), and
    the decoder layer of the same kind transformers builds for it."""

    block: str
    embed_norm: str
    hidden_norm: str
    proj: str
    final_norm: str
    head: str
    embedding: str
    zero_first: bool
    like_layer: int


DEEPSEEK_STYLE = Stored(
    "model.layers.2.", "model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.2.eh_proj.weight",
    "model.layers.2.shared_head.norm.weight", "model.layers.2.shared_head.head.weight",
    "model.layers.2.embed_tokens.weight", zero_first=True, like_layer=2,
)  # fmt: skip
QWEN_STYLE = Stored(
    "mtp.layers.0.", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.fc.weight",
    "mtp.norm.weight", "lm_head.weight", "model.embed_tokens.weight", zero_first=False, like_layer=3,
)  # fmt: skip
STYLES = {"deepseek_v3": DEEPSEEK_STYLE, "glm4_moe": DEEPSEEK_STYLE, "qwen3_next": QWEN_STYLE}


def mtp_model(path: Path, family: str) -> Path:
    """A tiny checkpoint of `family` with a multi-token prediction layer (layer 2), reading the
    shipped corpus."""
    build(family, **{**CONFIGS[family], "vocab_size": 8192}).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    add_mtp_layer(path)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def source(request, tmp_path_factory) -> Path:
    return mtp_model(tmp_path_factory.mktemp(request.param) / "src", request.param)


def family_of(source: Path) -> str:
    return json.loads((source / "config.json").read_text())["model_type"]


def norm_with(model, weight):
    """transformers' own RMSNorm of the family (Qwen3-Next's scales by 1 + weight) with `weight`."""
    norm = type(model.model.norm)(weight.shape[0], eps=model.config.rms_norm_eps)
    norm.weight.data.copy_(weight)
    return norm


def reference_mtp(source: Path, ids: torch.Tensor):
    """transformers' own modules on one window ids [S]: the MTP layer's input [S - 1, D] (the
    final-normed states and the next tokens' embeddings, zero at position 0 for DeepSeek's, through
    the two norms and the projection), its MoE block's input and its routed experts [S - 1, K]
    (transformers' router), and its output [S - 1, D]."""
    model, keys = load(source), STYLES[family_of(source)]
    tensors = load_file(source / "model.safetensors")
    layer = type(model.model.layers[-1])(model.config, keys.like_layer).eval()  # a full-attention MoE layer
    own = {k[len(keys.block) :]: v for k, v in tensors.items() if k.startswith(keys.block)}
    drafter = (
        "enorm.",
        "hnorm.",
        "eh_proj.",
        "shared_head.",
        "embed_tokens.",
    )  # DeepSeek's, beside its layer
    weights = {k: v for k, v in own.items() if not k.startswith(("mlp.experts.", *drafter))}
    expert = "mlp.experts.{}.{}_proj.weight".format
    E = model.config.num_experts if hasattr(model.config, "num_experts") else model.config.n_routed_experts
    weights["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([own[expert(e, "gate")], own[expert(e, "up")]]) for e in range(E)]
    )  # transformers' fused layout in memory
    weights["mlp.experts.down_proj"] = torch.stack([own[expert(e, "down")] for e in range(E)])
    layer.load_state_dict(weights, strict=True)
    captured = {}
    layer.mlp.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    layer.mlp.gate.register_forward_hook(lambda m, args, out: captured.update(indices=out[-1]))
    with torch.no_grad():
        h = model.model(input_ids=ids[None]).last_hidden_state[0, :-1]
        e = F.embedding(ids[1:], tensors[keys.embedding])
        if keys.zero_first:
            e[0] = 0
        x = torch.cat(
            [norm_with(model, tensors[keys.embed_norm])(e), norm_with(model, tensors[keys.hidden_norm])(h)],
            -1,
        )
        x = (x @ tensors[keys.proj].T)[None]
        positions = torch.arange(x.shape[1])[None]
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        out = layer(
            x, attention_mask=mask, position_ids=positions,
            position_embeddings=model.model.rotary_emb(x, positions),
        )  # fmt: skip
    out = out[0] if isinstance(out, tuple) else out
    return x[0], captured["x"].reshape(x.shape[1], -1), captured["indices"].reshape(x.shape[1], -1), out[0]


def moe_and_mtp_layers(source: Path) -> tuple[list[int], int]:
    """The tiny model's MoE layers and its MTP layer's number (its layer count)."""
    config = json.loads((source / "config.json").read_text())
    return ([1] if family_of(source) != "qwen3_next" else [0, 1, 2, 3]), config["num_hidden_layers"]


def compress_dropping_mtp(source: Path, out: Path, match: str = "left out of the output", **options):
    """compress(mtp="drop") with frequency at 0.5 (`options` override): the writer's warning that
    the module is left out (matching `match`), and the report."""
    options = {"method": "frequency", "ratio": 0.5, "calib_options": SMALL} | options
    with pytest.warns(UserWarning, match=match):
        return compress(source, out, mtp="drop", quiet=True, **options)


def test_the_mtp_layer_is_found_and_run_on_what_its_drafter_sees(source, tmp_path):
    """The runner's MTP input and output against transformers' modules computing the layer by
    hand, window by window."""
    mixture = calibration_mixture(source, "corpus", SMALL)
    windows = [w for w in mixture.windows if w.ids.numel() == SMALL.seq_len][:3]
    moe, mtp = moe_and_mtp_layers(source)
    with LayerwiseModel(source) as runner:
        assert runner.moe_layers == moe and runner.mtp_layers == [mtp]
        ids = [torch.stack([w.ids for w in windows])]
        states = runner.embed(ids)
        for index in range(runner.num_layers):
            with runner.layer(index) as run:
                states = [run(0, states[0])]
        inputs = runner.mtp_states(ids, states)
        with runner.layer(mtp) as run:
            outputs = [run(0, inputs[0])]
    for row, window in enumerate(windows):
        x, _, _, out = reference_mtp(source, window.ids)
        torch.testing.assert_close(inputs[0][row], x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs[0][row], out, atol=5e-5, rtol=1e-5)  # batched against one window


def test_the_mtp_layer_s_statistics_are_its_block_s_on_the_drafter_s_inputs(source, tmp_path):
    """Calibration records the MTP layer's expert counts (transformers' router on transformers'
    layer input) and samples its block's inputs, over every window but each one's last token."""
    stats = calibrate(source, tmp_path / "stats", options=SMALL, quiet=True)
    moe, mtp = moe_and_mtp_layers(source)
    assert stats.layers == moe and stats.mtp_layers == [mtp]
    mixture = calibration_mixture(source, "corpus", SMALL)
    counts = torch.zeros(8, dtype=torch.int64)
    block_inputs = []
    for window in mixture.windows:
        _, x, indices, _ = reference_mtp(source, window.ids)
        counts += torch.bincount(indices.flatten(), minlength=8)
        block_inputs.append(x)
    layer = stats.layer(mtp)
    assert torch.equal(layer.counts.sum((0, 1)).long(), counts)
    total = sum(w.ids.numel() - 1 for w in mixture.windows)
    assert int(counts.sum()) == 2 * total
    every = torch.cat(block_inputs)
    N = layer.inputs.shape[0]
    expected = every[[i * total // N for i in range(N)]]
    torch.testing.assert_close(layer.inputs, expected, atol=1e-5, rtol=1e-5)


def test_its_draft_loss_gradient_is_the_one_autograd_gives(source):
    """mtp_head_gradients: the gradient of the drafts' summed cross-entropy (position i against
    token i + 2, through the module's final norm and head), scaled, against autograd on the
    formula with transformers' norm."""
    ids = torch.randint(0, 8192, (2, 12))
    states = [torch.randn(2, 11, 32)]
    tensors, keys = load_file(source / "model.safetensors"), STYLES[family_of(source)]
    with LayerwiseModel(source) as runner:
        (grad,) = runner.mtp_head_gradients([ids], states, 0.25)
    h = states[0].clone().requires_grad_(True)
    logits = norm_with(load(source), tensors[keys.final_norm])(h) @ tensors[keys.head].T
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 8192), ids[:, 2:].reshape(-1), reduction="sum") * 0.25
    (expected,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


# one of each kind in the default suite (scores, merging, narrowing, re-running layers); the rest slow
DEFAULT_METHODS = {"reap", "hc_smoe", "heapr", "naee"}


@pytest.mark.parametrize(
    "method", [m if m in DEFAULT_METHODS else pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHODS)]
)
def test_every_method_compresses_the_mtp_layer_with_the_others(tmp_path, method):
    """The MTP layer gets the method's decision on its own statistics (HEAPr's from its own
    draft loss): the output keeps it with the new expert count (or width), num_nextn_predict_layers
    1, and passes the writer's checks (each edited layer against the edit applied to the
    original; transformers' strict reload, which does not build the layer)."""
    source = mtp_model(tmp_path / "src", "deepseek_v3")
    report = compress(source, tmp_path / "out", method=method, ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["mtp"] == {"policy": "prune", "layers": [2]} and set(report["layers"]) == {"1", "2"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with open_checkpoint(tmp_path / "out") as view:
        main, mtp = view.layer(1), view.layer(2)
    assert (mtp.router.num_experts, mtp.experts.hidden_dim) == (
        main.router.num_experts,
        main.experts.hidden_dim,
    )
    written = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(source / "model.safetensors")
    for name in ("eh_proj.weight", "enorm.weight", "shared_head.head.weight"):
        assert torch.equal(written[f"model.layers.2.{name}"], original[f"model.layers.2.{name}"])


def test_drop_leaves_the_mtp_layer_out(source, tmp_path):
    """The whole module goes (Qwen3-Next's mtp.fc and norms too, not only its layer)."""
    root = {"qwen3_next": "mtp."}.get(family_of(source), "model.layers.2.")
    report = compress_dropping_mtp(source, tmp_path / "out")
    assert report["mtp"] == {"policy": "drop", "layers": []}
    assert set(report["layers"]) == {str(i) for i in moe_and_mtp_layers(source)[0]}
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written.get("num_nextn_predict_layers", 0) == written.get("mtp_num_hidden_layers", 0) == 0
    assert not [k for k in load_file(tmp_path / "out" / "model.safetensors") if k.startswith(root)]
    with pytest.raises(ValueError, match="mtp policy"):
        compress(source, tmp_path / "bad", method="frequency", ratio=0.5, mtp="keep", quiet=True)


def test_statistics_without_the_mtp_layer_are_refused_unless_it_is_dropped(source, tmp_path):
    """Statistics calibrated before moelab ran MTP layers have none for it: prune asks for a new
    calibration or the explicit drop."""
    stats = calibrate(source, tmp_path / "stats", options=SMALL, quiet=True).directory
    info = json.loads((stats / "calibration.json").read_text())
    del info["mtp_layers"]
    (stats / "calibration.json").write_text(json.dumps(info))
    with pytest.raises(
        ValueError,
        match=rf"none for the multi-token prediction layer \[{moe_and_mtp_layers(source)[1]}\].*--mtp drop",
    ):
        compress(source, tmp_path / "out", method="reap", ratio=0.5, stats=stats, quiet=True)
    compress_dropping_mtp(source, tmp_path / "out", method="reap", stats=stats, calib_options=None)


def test_windows_of_one_token_give_the_mtp_layer_nothing_to_read(source, tmp_path):
    with pytest.raises(
        ValueError, match=r"every calibration window is one token long.*--seq-len.*--mtp drop"
    ):
        calibrate(
            source, tmp_path / "stats", options=dataclasses.replace(SMALL, seq_len=1, tokens=64), quiet=True
        )


def test_a_calibration_killed_in_the_mtp_layer_resumes_to_the_same_files(source, tmp_path, monkeypatch):
    """Killed after the last decoder layer, in the MTP layer: the rerun starts from the saved
    output of the last layer and gives the uninterrupted run's statistics."""
    import moelab.compress.calibration as calibrate_module

    options = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",))
    whole = calibrate(source, tmp_path / "whole", options=options, quiet=True).directory
    real = LayerwiseModel.mtp_states
    runs = []

    def killed(self, *args):
        runs.append(1)
        if len(runs) == 1:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(LayerwiseModel, "mtp_states", killed)
    directory = tmp_path / "partial"
    directory.mkdir()
    with pytest.raises(KeyboardInterrupt):
        calibrate_module.run_calibration(source, directory, "corpus", options, quiet=True)
    info = json.loads((directory / "calibration.json").read_text())
    moe, mtp = moe_and_mtp_layers(source)
    assert info["done"] == mtp - 1 and not info["mtp_done"] and (directory / "resume.safetensors").is_file()
    calibrate_module.run_calibration(source, directory, "corpus", options, quiet=True)
    assert len(runs) == 2
    for index in (*moe, mtp):
        a, b = Calibration(directory).layer(index).tensors(), Calibration(whole).layer(index).tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), index


def test_an_fp8_release_keeps_its_mtp_layer_quantized(tmp_path):
    """A block-wise FP8 release (DeepSeek-V3's format) with its MTP layer: calibrated through the
    dequantizing reader, and with keep_quantized the MTP layer's merged experts are written in
    float8 with their scales, like the other layers'."""
    from quantized_tiny import fp8_release

    plain = mtp_model(tmp_path / "plain", "deepseek_v3")
    fp8 = tmp_path / "fp8"
    fp8_release(plain, fp8)
    compress(
        fp8,
        tmp_path / "out",
        method="hc_smoe",
        ratio=0.5,
        calib_options=SMALL,
        keep_quantized=True,
        quiet=True,
    )
    written = {k: v for path in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(path).items()}
    experts = [
        k for k in written if k.startswith("model.layers.2.mlp.experts.") and k.endswith("proj.weight")
    ]
    assert len(experts) == 4 * 3 and all(
        written[k].dtype == torch.float8_e4m3fn and k + "_scale_inv" in written for k in experts
    )
    assert written["model.layers.2.eh_proj.weight"].dtype == torch.float8_e4m3fn


def test_keep_quantized_refuses_an_mtp_layer_it_cannot_write_before_calibrating(tmp_path, monkeypatch):
    """An FP8 release whose MTP layer's router is float8 (moelab edits plain routers only): compress
    with keep_quantized refuses it before calibrating, which may take hours, unless the MTP layer is
    dropped (left out whole, not edited)."""
    from quantized_tiny import BLOCK, fp8_release, quantized

    import moelab.compress.run

    fp8 = tmp_path / "fp8"
    fp8_release(mtp_model(tmp_path / "plain", "deepseek_v3"), fp8)
    router = "model.layers.2.mlp.gate.weight"
    shard = fp8 / json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"][router]
    tensors = load_file(shard)
    tensors[router], scale = quantized(tensors[router].float(), BLOCK)
    save_file(tensors | {router + "_scale_inv": scale}, shard, metadata={"format": "pt"})
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())
    index["weight_map"][router + "_scale_inv"] = shard.name
    (fp8 / "model.safetensors.index.json").write_text(json.dumps(index))

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before refusing keep_quantized")

    monkeypatch.setattr(moelab.compress.run, "_statistics", no_calibration)
    with pytest.raises(ValueError, match=r"layer 2's router weight is float8"):
        compress(fp8, tmp_path / "out", method="reap", ratio=0.5, keep_quantized=True, quiet=True)
    assert not list(tmp_path.glob("*out.moelab-staging*")) and not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="calibrated before"):  # dropped: nothing to refuse
        compress(fp8, tmp_path / "out", method="reap", ratio=0.5, keep_quantized=True, mtp="drop", quiet=True)


@pytest.mark.parametrize("method", ["reap", pytest.param("heapr", marks=pytest.mark.slow)])
def test_qwen3_next_s_mtp_module_is_compressed_in_place(tmp_path, method):
    """Qwen3-Next keeps its MTP layer under mtp.layers.0. and its drafter's tensors under mtp.:
    the layer is edited there (filed as layer 4), the rest of the module copied; dropping
    experts "in every MoE layer" reaches it too."""
    source = mtp_model(tmp_path / "src", "qwen3_next")
    report = compress(source, tmp_path / "out", method=method, ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["mtp"] == {"policy": "prune", "layers": [4]} and "4" in report["layers"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    written, original = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(source / "model.safetensors"),
    )
    with open_checkpoint(tmp_path / "out") as view:
        main, mtp = view.layer(3), view.layer(4)
    assert (mtp.router.num_experts, mtp.experts.hidden_dim) == (
        main.router.num_experts,
        main.experts.hidden_dim,
    )
    assert torch.equal(mtp.router.weight, written["mtp.layers.0.mlp.gate.weight"])
    for name in ("mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(written[name], original[name])
    drop_experts(source, tmp_path / "dropped", [0, 1], quiet=True)
    assert load_file(tmp_path / "dropped" / "model.safetensors")["mtp.layers.0.mlp.gate.weight"].shape[0] == 6


def test_super_experts_of_the_main_layers_do_not_depend_on_the_mtp_layer(tmp_path):
    """The Super Experts rule ranks the main model's layers (a quantile over their experts, the
    first 3/4 of them searched): the MTP layer's statistics, on other inputs, must not move what
    it flags there (with --mtp drop the layer is not even edited)."""
    from moelab.compress.methods.base import super_expert_ids
    from moelab.compress.run import _protected
    from moelab.compress.stats import write_layer

    source = mtp_model(tmp_path / "src", "deepseek_v3")
    stats = calibrate(source, tmp_path / "stats", options=SMALL, quiet=True)
    alone = super_expert_ids({1: stats.layer(1)})
    assert alone.get(1)
    mtp = stats.layer(2)
    write_layer(stats.directory, dataclasses.replace(mtp, max_output=mtp.max_output * 1000))
    assert _protected(Calibration(stats.directory)).get(1) == alone[1]


def test_drop_needs_no_mtp_calibration(source, tmp_path):
    """With --mtp drop the MTP layer is not calibrated: windows too short for it (one token; two
    with the draft loss's backward sweep) are no reason to refuse."""
    for seq_len, observers in ((1, ()), (2, ("neurons",))):
        options = dataclasses.replace(
            SMALL, seq_len=seq_len, tokens=96, observers=SMALL.observers + observers
        )
        report = compress_dropping_mtp(source, tmp_path / f"out{seq_len}", calib_options=options)
        assert set(report["layers"]) == {str(i) for i in moe_and_mtp_layers(source)[0]}
        assert Calibration(tmp_path / f"out{seq_len}" / "moelab_calibration").mtp_layers == []


def test_windows_too_short_for_the_mtp_layer_are_refused_before_any_layer_runs(source, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the layers ran")

    monkeypatch.setattr(LayerwiseModel, "layer", never)
    options = dataclasses.replace(SMALL, seq_len=2, tokens=96, observers=SMALL.observers + ("neurons",))
    with pytest.raises(ValueError, match=r"shorter than 3 tokens.*--mtp drop"):
        calibrate(source, tmp_path / "stats", options=options, quiet=True)
    with pytest.raises(ValueError, match=r"one token long.*--mtp drop"):
        calibrate(
            source, tmp_path / "stats1", options=dataclasses.replace(SMALL, seq_len=1, tokens=64), quiet=True
        )


def test_a_chain_of_mtp_layers_is_refused_for_prune_and_left_out_with_drop(tmp_path):
    """Two MTP layers (num_nextn_predict_layers 2): moelab runs one, so prune is refused before
    calibrating, and drop calibrates the main layers and leaves both out, as the refusal advises."""
    from safetensors.torch import save_file

    source = mtp_model(tmp_path / "src", "deepseek_v3")
    tensors = load_file(source / "model.safetensors")
    second = {
        k.replace("model.layers.2.", "model.layers.3."): v.clone()
        for k, v in tensors.items()
        if k.startswith("model.layers.2.")
    }
    save_file(tensors | second, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 2}))
    refused = r"model.layers.2., model.layers.3.\) that moelab cannot calibrate.*--mtp drop"
    with pytest.raises(ValueError, match=refused):
        compress(source, tmp_path / "bad", method="frequency", ratio=0.5, calib_options=SMALL, quiet=True)
    report = compress_dropping_mtp(
        source, tmp_path / "out", match=r"layers model.layers.2., model.layers.3. .* left out of the output"
    )
    assert set(report["layers"]) == {"1"}


def test_a_calibration_made_before_mtp_layers_ran_is_still_the_same_job_without_one(tmp_path, monkeypatch):
    """A model without an MTP layer: calibration.json written before moelab recorded mtp_layers
    (and mtp_done) is the same job as now, so it is kept (or resumed), not recomputed."""
    import moelab.compress.calibration as calibrate_module

    source = tmp_path / "src"
    build("deepseek_v3", vocab_size=8192).save_pretrained(source)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(source)
    directory = tmp_path / "stats"
    directory.mkdir()
    calibrate_module.run_calibration(source, directory, "corpus", SMALL, quiet=True)
    info = json.loads((directory / "calibration.json").read_text())
    assert info["mtp_layers"] == []
    old = {k: v for k, v in info.items() if k not in ("mtp_layers", "mtp_done")}
    (directory / "calibration.json").write_text(json.dumps(old))
    monkeypatch.setattr(LayerwiseModel, "layer", lambda *a, **k: pytest.fail("recomputed"))
    assert calibrate_module.run_calibration(source, directory, "corpus", SMALL, quiet=True) == old


@pytest.mark.parametrize("family", ["deepseek_v32", "glm4_moe_lite"])
def test_the_mtp_layer_of_a_config_with_per_layer_settings_is_built_like_the_last_layer(tmp_path, family):
    """DeepSeek-V3.2 and GLM-4.7-Flash list each layer's MLP kind (mlp_layer_types, one entry per
    decoder layer): the MTP layer, numbered past them, is built as the last layer is (sparse)."""
    source = tmp_path / "src"
    build(
        family, **{**DEEPSEEK, "vocab_size": 8192, "q_lora_rank": 16, "index_n_heads": 2, "index_head_dim": 8}
    ).save_pretrained(source)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(source)
    add_mtp_layer(source)
    report = compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["mtp"] == {"policy": "prune", "layers": [2]} and set(report["layers"]) == {"1", "2"}
