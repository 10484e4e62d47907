"""GLM-5's sparse attention (glm_moe_dsa): a "shared" layer reuses the top-k tokens the full layer
before it chose, which the model hands from layer to layer. The layer-by-layer run carries it
(`LayerwiseModel.carry`), forward and backward, and calibration snapshots and tapes it, so that an
interrupted run resumes to the same statistics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hf_tiny import DEEPSEEK, build, load
from test_layerwise import assert_layers_are_transformers
from transformers import PreTrainedTokenizerFast

from moelab.compress import Calibration, CalibrationOptions, calibrate, compress
from moelab.compress.calibration import run_calibration
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf.layerwise import LayerwiseModel

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=32)
GLM5 = {
    **DEEPSEEK, "vocab_size": 8192, "q_lora_rank": 16, "index_n_heads": 2, "index_head_dim": 8, "index_topk": 8,
    "num_hidden_layers": 4, "index_topk_pattern": "FSFS",
}  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("glm5") / "src"
    build("glm_moe_dsa", **GLM5).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["indexer_types"] == [
        "full",
        "shared",
        "full",
        "shared",
    ]
    return path


def test_every_layer_s_output_is_transformers_with_the_top_k_carried(source):
    """Short windows (8 tokens) keep the top-k (8) from covering every token, so a shared layer
    given no or other indices would compute something else."""
    batches = [torch.randint(0, 8192, (2, 8)), torch.randint(0, 8192, (1, 12))]
    assert_layers_are_transformers(source, load(source), batches)


def run_layers_in_order(runner, ids, num_layers: int):
    """`runner`'s (a LayerwiseModel's) first `num_layers` layers run in order on the one batch `ids`:
    (the last layer's output states, each layer's input, the carried value each layer read)."""
    states = runner.embed([ids])
    inputs, carried = [], []
    for index in range(num_layers):
        inputs.append(states[0])
        carried.append(runner.carry[0])
        with runner.layer(index) as run:
            states = [run(0, states[0])]
    return states, inputs, carried


def test_the_backward_run_is_autograd_through_the_whole_model(source):
    """The layers' vector-Jacobian products from the head down, each reading the top-k the layer
    before handed it in the forward run, against autograd through transformers' model."""
    ids = torch.randint(0, 8192, (1, 12))
    runner = LayerwiseModel(source)
    states, inputs, carried = run_layers_in_order(runner, ids, 4)
    grads = runner.head_gradients([ids], states, 1.0)
    for index in reversed(range(4)):
        runner.carry = [carried[index]]
        with runner.layer_backward(index) as vjp:
            grads = [vjp(0, inputs[index], grads[0])]
    model = load(source)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[0, :-1]
    (expected,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"), embeds
    )
    torch.testing.assert_close(grads[0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "killed_at",
    [pytest.param(at, marks=pytest.mark.slow) for at in ([1, 2], [1, 2, 3])] + [[1, 2, 3, 3, 2]],
)  # the default suite keeps the kill in the backward sweep, after the forward sweep's snapshots
def test_an_interrupted_calibration_resumes_to_the_same_statistics(source, tmp_path, monkeypatch, killed_at):
    """Killed while writing a layer's statistics (the layers written so far: `killed_at`), before
    its snapshot: in the forward sweep at layer 2 (a full layer) or 3 (a shared one, which reads
    the top-k layer 2 handed on from the snapshot taken after layer 2), or in the backward sweep
    at layer 2 (layer 1, a shared one, then reads layer 0's top-k from its tape). The rerun gives
    the uninterrupted run's statistics."""
    options = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",), snapshot_seconds=0.0)
    assert_resumes_to_the_same_statistics(source, tmp_path, monkeypatch, options, killed_at, (1, 2, 3))


def assert_resumes_to_the_same_statistics(source, tmp_path, monkeypatch, options, killed_at, layers) -> None:
    """A calibration of `source` killed once it has written the statistics of `killed_at` (layer
    indices in order, the backward sweep's after the forward's), then run again, gives every layer
    of `layers` the statistics of an uninterrupted run."""
    import moelab.compress.calibration as calibrate_module
    import moelab.compress.gradients as gradients_module

    whole = calibrate(source, tmp_path / "whole", options=options, quiet=True).directory
    real, written = calibrate_module.write_layer, []

    def dies_in_layer(directory, stats):
        real(directory, stats)
        written.append(stats.layer)
        if written == killed_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_module, "write_layer", dies_in_layer)
    monkeypatch.setattr(gradients_module, "write_layer", dies_in_layer)  # the backward sweep's
    directory = tmp_path / "partial"
    directory.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_calibration(source, directory, "corpus", options, quiet=True)
    monkeypatch.setattr(calibrate_module, "write_layer", real)
    monkeypatch.setattr(gradients_module, "write_layer", real)
    run_calibration(source, directory, "corpus", options, quiet=True)
    for index in layers:
        a, b = Calibration(directory).layer(index).tensors(), Calibration(whole).layer(index).tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), index


@pytest.mark.parametrize("method", ["reap", "heapr"])
def test_glm_5_compresses(source, tmp_path, method):
    """REAP, and HEAPr with its backward sweep (at full width: GLM-5's shared experts take their
    width from the routed experts' key); the writer's checks reload the output in transformers."""
    report = compress(source, tmp_path / "out", method=method, ratio=0.5, calib_options=SMALL, quiet=True)
    assert set(report["layers"]) == {"1", "2", "3"} and report["reload_checked"]


def test_the_backward_sweep_hands_each_layer_the_top_k_of_its_forward_run(source, tmp_path, monkeypatch):
    """The calibration's backward sweep reads each layer's carried top-k from its tape: the
    gradient it carries down to the embeddings is autograd's through transformers' model, per batch
    (a shared layer recomputed with another layer's top-k would change it)."""
    options = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",))
    assert_backward_sweep_is_autograd(source, tmp_path, monkeypatch, options)


def assert_backward_sweep_is_autograd(source, tmp_path, monkeypatch, options) -> None:
    """The gradient the calibration's backward sweep carries down to the first layer's input (the
    embeddings, or what the model makes of them: ZAYA scales them) is autograd's through transformers'
    whole model, per batch."""
    import moelab.compress.gradients as gradients_module
    from moelab.compress.calibration import calibration_mixture

    real, captured = gradients_module.backward_layer, {}

    def spy(runner, index, states, grads, *args):
        result = real(runner, index, states, grads, *args)
        if index == 0:
            captured["grads"] = [g.clone() for g in grads]
        return result

    monkeypatch.setattr(gradients_module, "backward_layer", spy)
    calibrate(source, tmp_path / "stats", options=options, quiet=True)
    mixture = calibration_mixture(source, "corpus", options)
    predicted = sum(w.ids.numel() - 1 for w in mixture.windows)
    model = load(source)
    for b, batch in enumerate(mixture.batches(options.batch_size)):
        ids = torch.stack([w.ids for w in batch])
        seen = []
        hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        logits = model(input_ids=ids).logits[:, :-1]
        hook.remove()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 8192), ids[:, 1:].reshape(-1), reduction="sum"
        )
        (expected,) = torch.autograd.grad(loss / predicted, seen)
        torch.testing.assert_close(captured["grads"][b], expected, atol=1e-7, rtol=1e-4, msg=f"batch {b}")


def test_the_tapes_keep_the_top_k_only_for_the_layers_that_read_it(source, tmp_path, monkeypatch):
    """A full DSA layer computes its own top-k: the tape of the states entering it, and the resume
    snapshot before it, hold no carried indices (at real lengths they weigh as much as the states);
    a shared layer's hold the top-k of the full layer before it."""
    from safetensors import safe_open

    import moelab.compress.calibration as calibrate_module
    from moelab.compress.gradients import tape_file

    def carried(keys) -> int:
        return sum(k.startswith("carry") for k in keys)

    snapshots, tapes = [], {}
    real_save, real_tape = calibrate_module.save_snapshot, calibrate_module.save_tape

    def save(tensors, path, *args, **kwargs):
        snapshots.append(carried(tensors))
        return real_save(tensors, path, *args, **kwargs)

    def tape(directory, rank, world, index, states, carry=()):
        real_tape(directory, rank, world, index, states, carry)
        with safe_open(tape_file(directory, rank, world, index), "pt") as f:
            tapes[index] = carried(f.keys())

    monkeypatch.setattr(calibrate_module, "save_snapshot", save)
    monkeypatch.setattr(calibrate_module, "save_tape", tape)
    options = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",), snapshot_seconds=0.0)
    calibrate(source, tmp_path / "stats", options=options, quiet=True)
    batches = tapes[1]
    assert batches > 0 and tapes == {0: 0, 1: batches, 2: 0, 3: batches, 4: 0}
    assert snapshots == [batches, 0, batches]  # after layers 0, 1 and 2: entering 1 (shared), 2 (full), 3


def test_glm_5_s_mtp_layer_runs_its_own_indexer_or_is_refused(tmp_path):
    """The MTP layer reads windows one token shorter than any layer before it, so it cannot reuse
    their top-k: one that stores its own indexer runs it; one that does not is refused by name."""
    from hf_tiny import add_mtp_layer

    from moelab.hf.checkpoint import CheckpointError

    for pattern, indexed in (("FSSF", True), ("FSFS", False)):
        source = tmp_path / pattern / "src"
        build("glm_moe_dsa", **{**GLM5, "index_topk_pattern": pattern}).save_pretrained(source)
        PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(source)
        add_mtp_layer(source)  # a copy of the last layer's tensor names: with an indexer where it is full
        if indexed:
            report = compress(
                source, tmp_path / pattern / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True
            )
            assert report["mtp"] == {"policy": "prune", "layers": [4]}
        else:
            with pytest.raises(CheckpointError, match="layer 4 stores no DSA indexer.*--mtp drop"):
                compress(
                    source,
                    tmp_path / pattern / "out",
                    method="reap",
                    ratio=0.5,
                    calib_options=SMALL,
                    quiet=True,
                )
            # what the refusal offers works: the layer left out of the calibration and the output
            stats = calibrate(source, tmp_path / pattern / "stats", options=SMALL, quiet=True, mtp=False)
            assert stats.mtp_layers == [] and stats.layers == [1, 2, 3]
            with pytest.warns(UserWarning, match="left out of the output"):
                report = compress(
                    source, tmp_path / pattern / "dropped", method="reap", ratio=0.5, calib_options=SMALL, quiet=True,
                    mtp="drop",
                )  # fmt: skip
            assert report["mtp"] == {"policy": "drop", "layers": []}


def test_an_mtp_layer_after_a_shared_layer_runs_the_indexer_it_stores(tmp_path):
    """The last layer shares the top-k of the one before it, but the MTP layer stores an indexer
    of its own: it is built as a full layer (not as the shared one whose settings it takes) and
    runs it."""
    from hf_tiny import add_mtp_layer
    from safetensors.torch import load_file, save_file

    source = tmp_path / "src"
    build("glm_moe_dsa", **GLM5).save_pretrained(source)  # FSFS: layer 3 is shared
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(source)
    add_mtp_layer(source)
    tensors = load_file(source / "model.safetensors")
    indexer = "self_attn.indexer."
    tensors |= {
        k.replace("layers.2.", "layers.4."): torch.randn_like(v) * v.shape[-1] ** -0.5
        for k, v in tensors.items()
        if k.startswith("model.layers.2." + indexer)
    }
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    report = compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["mtp"] == {"policy": "prune", "layers": [4]}
