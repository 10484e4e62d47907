"""Inkling 2's attention residuals: each decoder layer reads block_states [B, S, K, D], the inputs of
the K block-boundary layers before it, and the final norm reads them through the model's final_input.
The layer-by-layer run carries them (`LayerwiseModel.carry`), forward and backward (the gradient of a
boundary layer's input gathers what every later layer and the final input read of it:
`LayerwiseModel.carry_grad`), and calibration snapshots and tapes them, so that an interrupted run
resumes to the same statistics. Inkling 2 Loop runs its looped layers once a pass (`LayerwiseModel.schedule`),
their statistics gathered over the passes; its backward sweep is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hf_tiny import TINY, build, load
from safetensors.torch import load_file, save_file
from test_dsa import (
    assert_backward_sweep_is_autograd,
    assert_resumes_to_the_same_statistics,
    run_layers_in_order,
)
from test_layerwise import assert_layers_are_transformers
from transformers import PreTrainedTokenizerFast

from moelab.compress import Calibration, CalibrationOptions, calibrate, compress
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import CheckpointError
from moelab.hf.layerwise import LayerwiseModel

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=32)
BACKWARD = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",), snapshot_seconds=0.0)
# 4 layers, blocks of 2: layers 0 and 2 are block boundaries; layer 3 reads 2 block states
INKLING2 = dict(
    TINY["inkling2_text"].config, vocab_size=8192, unpadded_vocab_size=8192, num_hidden_layers=4,
    n_layers_per_attn_res_block=2, layer_types=["hybrid_sliding", "hybrid"] * 2,
)  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inkling2") / "src"
    build("inkling2_text", **INKLING2).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def test_every_layer_s_output_is_transformers_with_block_states_carried(source):
    batches = [torch.randint(0, 8192, (2, 9)), torch.randint(0, 8192, (1, 12))]
    assert_layers_are_transformers(source, load(source), batches)


def test_the_recorded_inputs_hold_no_block_states(source):
    """The block_states the model loop hands the stand-ins are built from their pass-through states
    (wrong) and, one tensor per block, would hold 0 + 1 + ... + K copies of the states beside the carried
    ones: the layers' recorded inputs keep none (the run hands the carried value)."""
    runner = LayerwiseModel(source)
    runner.embed([torch.randint(0, 8192, (2, 9)), torch.randint(0, 8192, (1, 12))])
    recorded = [kwargs for calls in runner._calls for _, kwargs in calls]
    assert len(recorded) == 8 and not [kwargs["block_states"].shape for kwargs in recorded if "block_states" in kwargs]


def test_the_backward_run_is_autograd_through_the_whole_model(source):
    """The head's gradients (the final input reading the carried block_states) and the layers'
    vector-Jacobian products from the top down, each reading the block_states of its forward run,
    against autograd through transformers' model: the gradient with respect to every layer's input and
    the last layer's output."""
    carried = assert_backward_is_autograd(source, 4)
    assert [c.shape[-2] for c in carried] == [0, 1, 1, 2, 2]


def assert_backward_is_autograd(source, num_layers: int) -> list[torch.Tensor]:
    """The check of the test above on `source` (`num_layers` decoder layers); returns the block_states
    each layer read and the final input's."""
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    runner = LayerwiseModel(source)
    states, inputs, carried = run_layers_in_order(runner, ids, num_layers)
    final = runner.carry
    grads = {num_layers: runner.head_gradients([ids], states, 1.0)[0]}
    for index in reversed(range(num_layers)):
        runner.carry = [carried[index]]
        with runner.layer_backward(index) as vjp:
            grads[index] = vjp(0, inputs[index], grads[index + 1])
    model = load(source)
    modules = [*model.model.layers, model.model.final_input]
    seen = autograd_input_gradients(model, ids, modules, lambda i: 0 if i < num_layers else 1)
    for index in range(num_layers + 1):
        torch.testing.assert_close(grads[index], seen[index], atol=1e-6, rtol=1e-4, msg=f"layer {index}")
    return carried + final


def autograd_input_gradients(model, ids, modules, position=lambda index: 0) -> dict[int, torch.Tensor]:
    """{i: the gradient of transformers' summed next-token cross-entropy of `model` on ids with respect to
    the input of modules[i]}, by autograd through the whole model; position(i): which positional input."""
    seen = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[position(i)]))
        for i, module in enumerate(modules)
    ]
    logits = model(input_ids=ids).logits[:, :-1]
    for hook in hooks:
        hook.remove()
    for t in seen.values():
        t.retain_grad()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    return {i: t.grad for i, t in seen.items()}


def test_the_backward_sweep_hands_each_layer_the_block_states_of_its_forward_run(source, tmp_path, monkeypatch):
    """The calibration's backward sweep reads each layer's block_states from its tape and the final
    input's from the last one: the gradient it carries down to the embeddings is autograd's through
    transformers' model, per batch."""
    assert_backward_sweep_is_autograd(source, tmp_path, monkeypatch, BACKWARD)


def test_the_tapes_keep_the_block_states_once(source, tmp_path, monkeypatch):
    """Each layer's block_states are the first K slots of the final input's: only the last tape keeps
    them, so the tapes weigh the states once a layer plus the final block_states (here 4 + (1 + 2) times
    the states, not 1 + 2 + 2 + 3 + 3: each tape 1 + K)."""
    import moelab.compress.calibration as calibrate_module
    from moelab.compress.gradients import tape_file
    from moelab.files import load_safetensors

    real, weighs = calibrate_module.save_tape, {}

    def tape(directory, rank, world, index, states, carry=()):
        real(directory, rank, world, index, states, carry)
        saved = load_safetensors(tape_file(directory, rank, world, index))
        weighs[index] = sum(t.nbytes for t in saved.values()) / sum(s.nbytes for s in states)

    monkeypatch.setattr(calibrate_module, "save_tape", tape)
    calibrate(source, tmp_path / "stats", options=BACKWARD, quiet=True)
    assert weighs == {0: 1, 1: 1, 2: 1, 3: 1, 4: 3}


@pytest.mark.parametrize(
    "killed_at", [pytest.param([0, 1, 2], marks=pytest.mark.slow), [0, 1, 2, 3, 3, 2]]
)  # the default suite keeps the kill in the backward sweep, after the forward sweep's snapshots
def test_an_interrupted_calibration_resumes_to_the_same_statistics(source, tmp_path, monkeypatch, killed_at):
    """Killed while writing a layer's statistics (the layers written so far: `killed_at`), before its
    snapshot: in the forward sweep at layer 2 (layer 2, a boundary, reads the block_states of the snapshot
    taken after layer 1), or in the backward sweep at layer 2 (resumed from the snapshot after layer 3: its
    gradients and those of the block_states, two slots, that layer 2's input gets one of)."""
    assert_resumes_to_the_same_statistics(source, tmp_path, monkeypatch, BACKWARD, killed_at, range(4))


@pytest.mark.parametrize("method", ["reap", "heapr"])
def test_inkling2_compresses(source, tmp_path, method):
    """REAP, and HEAPr with its backward sweep; the writer's checks reload the output in transformers."""
    report = compress(source, tmp_path / "out", method=method, ratio=0.5, calib_options=SMALL, quiet=True)
    assert set(report["layers"]) == {"0", "1", "2", "3"} and report["reload_checked"]


def test_a_backward_run_out_of_order_is_refused(source):
    """A layer's vjp needs the block_states' gradients of the layers above: without head_gradients it is
    refused, not computed without them."""
    ids = torch.randint(0, 8192, (1, 6))
    runner = LayerwiseModel(source)
    states = runner.embed([ids])
    with runner.layer(0) as run:
        states = [run(0, states[0])]
    runner.carry = [runner.carry[0][..., :0, :]]
    with pytest.raises(RuntimeError, match="call head_gradients"), runner.layer_backward(0) as vjp:
        vjp(0, states[0], torch.ones_like(states[0]))


def test_a_layer_run_twice_or_out_of_order_is_refused(source):
    """Each layer reads as many block states as block-boundary layers run below it: a boundary layer run
    twice on a batch appends its input twice, and a layer run before those below it would read too few;
    either is refused, not run on the wrong block_states."""
    runner = LayerwiseModel(source)
    states = runner.embed([torch.randint(0, 8192, (1, 6))])
    with runner.layer(0) as run:
        run(0, states[0])
        with pytest.raises(RuntimeError, match=r"layer 0 reads the inputs of the 0 block-boundary .* holds 1: run"):
            run(0, states[0])
    with runner.layer(3) as run, pytest.raises(RuntimeError, match=r"layer 3 reads .* 2 block-boundary .* holds 1"):
        run(0, states[0])


# Inkling 2 Loop: 5 layers in blocks of 2, layers 2 and 3 looped 3 times a forward pass
LOOP = dict(INKLING2, num_hidden_layers=5, layer_types=["hybrid_sliding", "hybrid"] * 2 + ["hybrid"],
            loop_layer_index_start=2, loop_layer_index_end=4, loop_num_passes=3)  # fmt: skip
LOOP_SCHEDULE = [0, 1, 2, 3, 2, 3, 2, 3, 4]


@pytest.fixture(scope="module")
def loop_source(tmp_path_factory) -> Path:
    """Saved under transformers' names: as released, its message queries are two tensors transformers merges."""
    path = tmp_path_factory.mktemp("inkling2_loop") / "src"
    build("inkling2_loop_text", **LOOP).save_pretrained(path, save_original_format=False)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def test_inkling2_loop_s_every_step_is_transformers(loop_source):
    """The looped layers run once a pass, the later passes restarting from the states that entered the loop
    and reading the messages of the pass before: each step's output is what the layer outputs in that call
    of transformers' forward. A looped layer run at another step than its own is refused."""
    runner = LayerwiseModel(loop_source)
    assert runner.schedule == LOOP_SCHEDULE
    with pytest.raises(ValueError, match=r"layer 2 runs at steps \[2, 4, 6\] of a forward pass, not at 3: give one"):
        runner.layer(2, step=3).__enter__()
    batches = [torch.randint(0, 8192, (2, 9)), torch.randint(0, 8192, (1, 12))]
    assert_layers_are_transformers(loop_source, load(loop_source), batches)


@pytest.mark.parametrize("released", [False, True], ids=["transformers-names", "released"])
def test_a_loop_of_several_blocks_reads_messages_from_the_block_states_its_pass_appended(tmp_path, released):
    """As released, the loop spans several blocks (12 layers in blocks of 6): a pass appends a block state
    past the loop's first (its restart, skipped), which the next pass's messages read; with LOOP's loop of
    one block they read none. Here layers 2..5 in blocks of 2, looped twice; layer 6 reads the last pass's.
    As released, its message queries are read from the two tensors transformers merges them from."""
    config = dict(LOOP, num_hidden_layers=7, layer_types=["hybrid_sliding", "hybrid"] * 3 + ["hybrid"],
                  loop_layer_index_end=6, loop_num_passes=2)  # fmt: skip
    build("inkling2_loop_text", **config).save_pretrained(tmp_path, save_original_format=released)
    assert LayerwiseModel(tmp_path).schedule == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6]
    assert_layers_are_transformers(tmp_path, load(tmp_path), [torch.randint(0, 8192, (2, 9))])


def test_inkling2_loop_s_looped_layers_gather_statistics_over_their_passes(loop_source, tmp_path):
    """A looped layer's statistics sum those of each pass (its tokens counted once a pass): its routing
    counts and combine weights are those of transformers' router, every call of it, over the calibration
    windows; its sampled inputs come from all passes."""
    from moelab.compress.calibration import calibration_mixture

    mixture = calibration_mixture(loop_source, "corpus", SMALL, quiet=True)
    stats = Calibration(calibrate(loop_source, tmp_path / "stats", calib="corpus", options=SMALL, quiet=True).directory)
    model, seen, rows = load(loop_source), {i: [] for i in range(5)}, {i: {} for i in range(5)}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out))
    with torch.no_grad():
        for batch in mixture.batches(SMALL.batch_size):
            positions = torch.cat([w.start + torch.arange(w.ids.numel()) for w in batch])
            for i, layer in enumerate(model.model.layers):  # the block's input, at pass p's positions
                layer.mlp.register_forward_pre_hook(
                    lambda m, a, i=i, calls=iter(range(3)): rows[i].update(
                        zip((positions + next(calls) * mixture.num_tokens).tolist(), a[0].flatten(0, 1))
                    )
                )
            model(input_ids=torch.stack([w.ids for w in batch]))
            for layer in model.model.layers:
                layer.mlp._forward_pre_hooks.clear()
    for i in range(5):
        got = stats.layer(i)
        total = LOOP_SCHEDULE.count(i) * mixture.num_tokens
        sampled = torch.stack([rows[i][j * total // SMALL.sample_tokens] for j in range(SMALL.sample_tokens)])
        torch.testing.assert_close(got.inputs, sampled, rtol=1e-5, atol=1e-5)
        indices = torch.cat([indices for _, _, indices in seen[i]])
        weights = torch.cat([weights for _, weights, _ in seen[i]])
        assert len(seen[i]) == LOOP_SCHEDULE.count(i) * len(mixture.batches(SMALL.batch_size))
        assert got.tokens.sum() == LOOP_SCHEDULE.count(i) * mixture.num_tokens
        def per_expert(values):
            return torch.zeros(4, dtype=torch.float64).index_add_(0, indices.flatten(), values.flatten().double())

        assert torch.equal(got.counts.sum((0, 1)), per_expert(torch.ones(indices.shape))), i
        gates = per_expert(weights)
        torch.testing.assert_close(got.gate_sums.sum((0, 1)), gates, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("killed_at", [[0, 1, 2], [0, 1, 2, 3, 4]], ids=["inside", "after"])
def test_an_interrupted_inkling2_loop_calibration_resumes_to_the_same_statistics(
    loop_source, tmp_path, monkeypatch, killed_at
):
    """Killed inside the loop (layer 2's statistics written at its last pass, step 6: the run resumes from
    the snapshot before the loop, after step 1, and runs all three passes again) and after it (in layer 4,
    step 8: it resumes from the snapshot after the loop's last step)."""
    options = dataclasses.replace(SMALL, snapshot_seconds=0.0)
    assert_resumes_to_the_same_statistics(loop_source, tmp_path, monkeypatch, options, killed_at, range(5))


@pytest.mark.parametrize("method, options", [("reap", {}), ("naee", {}), ("moelab", {"strategy": "experts"})])
def test_inkling2_loop_compresses(loop_source, tmp_path, method, options):
    """REAP, NAEE (which re-runs each layer on its sampled inputs: a looped layer's, from its passes) and
    moelab's recipe on its expert path; the writer's checks reload the output in transformers."""
    report = compress(
        loop_source, tmp_path / "out", method=method, method_options=options, ratio=0.5, calib_options=SMALL, quiet=True
    )
    assert set(report["layers"]) == {"0", "1", "2", "3", "4"} and report["reload_checked"]


@pytest.mark.parametrize("method", ["heapr", "moelab"])
def test_inkling2_loop_s_backward_sweep_is_refused_by_name(loop_source, tmp_path, method):
    """The backward sweep does not carry gradients through the loop's passes: HEAPr, and moelab's recipe
    choosing its path (strategy auto, which weighs the neuron path), are refused, not computed as if each
    layer ran once; the error names the recipe's expert path, which needs no backward sweep."""
    refused = r"looped decoder layers \(2..3\) 3 times .*another method, or moelab's recipe .*strategy=experts"
    with pytest.raises(CheckpointError, match=refused):
        compress(loop_source, tmp_path / "out", method=method, ratio=0.5, calib_options=SMALL, quiet=True)


def test_inkling2_loop_of_one_pass_runs_each_layer_once_forward_and_backward(tmp_path):
    """loop_num_passes 1 reads no messages: the run is Inkling 2's, its backward sweep autograd's."""
    build("inkling2_loop_text", **dict(LOOP, loop_num_passes=1)).save_pretrained(tmp_path, save_original_format=False)
    assert LayerwiseModel(tmp_path).schedule == list(range(5))
    assert_layers_are_transformers(tmp_path, load(tmp_path), [torch.randint(0, 8192, (2, 9))])
    assert_backward_is_autograd(tmp_path, 5)


def test_inkling2_loop_s_released_queries_that_do_not_merge_into_config_json_s_are_refused(tmp_path):
    """As released (and saved by default), its message queries are two tensors transformers merges on loading
    (read so: the test above): parts that do not fit together, or merge into another shape than config.json's,
    are refused by name."""
    build("inkling2_loop_text", **LOOP).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    kv, q = "model.llm.middle_cycle_cross_pass_kv_queries", "model.llm.middle_cycle_cross_pass_queries"
    for shortened, refused in (({kv: tensors[kv][:2]}, "cannot be merged from the tensors it is stored as"),
                               ({kv: tensors[kv][:2], q: tensors[q][:2]}, r"merged from the tensors it is stored as, is "
                                                                          r"\[1, 4, 32\] .* config.json makes it a finite \[2, 4, 32\]")):
        save_file({**tensors, **shortened}, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=r"message_input.query.*" + refused):
            LayerwiseModel(tmp_path).embed([torch.randint(0, 8192, (1, 6))])
