"""ZAYA (`zaya`): each MoE block's router reads x through an MLP, whose input r = down_proj(x) adds the
previous layer's r times a scale (every layer but the first), and chooses among E experts and a skip
expert, whose slot adds nothing. The block takes and returns that router state; the layer-by-layer run
carries it (`LayerwiseModel.carry`), forward and backward (`LayerwiseModel.carry_grad`).

The family-wide tests (tests/hf_tiny.py's TINY) check the view against transformers' block (with no
state), the writer, compression, layer-by-layer and offloaded runs on a model whose tokens rarely skip;
here, on three layers whose tokens do, what is ZAYA's own: the block with the state handed in, gradients
through the carried state (layer by layer and in the calibration's backward sweep, resumed), the router
states sampled with the layer inputs, every method (merging's 'fit' rule and router re-fitting on the MLP's
features), the skip expert's row kept last, an edit of the MLP refused, traces of skipped slots, offloaded
decoding and its per-sequence state, and the skip expert's bias transformers resets on loading.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import TINY, D, build, load
from safetensors.torch import load_file, save_file
from test_block_states import autograd_input_gradients
from test_dsa import (
    assert_backward_sweep_is_autograd,
    assert_resumes_to_the_same_statistics,
    run_layers_in_order,
)
from test_hf_write import _logits, _masked_model
from test_layerwise import assert_layers_are_transformers
from test_offload import assert_state_is_what_transformers_holds
from transformers import PreTrainedTokenizerFast

from moelab.analyze import analyze_trace
from moelab.compress import METHODS, Calibration, CalibrationOptions, calibrate, compress
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import CheckpointError, drop_experts, open_checkpoint
from moelab.hf.layerwise import LayerwiseModel
from moelab.hf.native import moe_layer_from_view
from moelab.offload import load_offloaded
from moelab.offload.model import generate_ids
from moelab.threads import intra_op_threads
from moelab.trace import RoutingCapture, TraceOptions, load_model, trace_model

pytestmark = pytest.mark.usefixtures("one_thread")

E, R = 4, 12  # the tiny model's experts (and one skip expert) and its router MLP's width
SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=32)
BACKWARD = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",), snapshot_seconds=0.0)
ZAYA = dict(TINY["zaya"].config, vocab_size=8192, num_hidden_layers=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zaya") / "src"
    build("zaya", seed=1, **ZAYA).save_pretrained(path)  # its tokens route to experts and skip in every layer
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def test_the_block_is_transformers_with_the_router_state_handed_in_and_on(source):
    """moelab's layer from the view, given the previous layer's router state, computes transformers'
    block output, and its router the state the block hands on; tokens choose experts and the skip
    expert (whose slot adds nothing); the first layer reads no state."""
    model = load(source)
    generator = torch.Generator().manual_seed(0)
    x, state = torch.randn(2, 16, D, generator=generator), torch.randn(2, 16, R, generator=generator)
    skips = 0
    with open_checkpoint(source) as view:
        for index in range(3):
            layer = view.layer(index)
            router = layer.router
            assert (router.num_experts, router.identity_experts, router.identity.returns) == (E, 1, "zero")
            assert (layer.router.mlp.state_scale is None) == (index == 0)
            moe = moe_layer_from_view(layer)
            with torch.no_grad():
                expected, handed_on = model.model.layers[index].mlp(x, state)
                got = moe(x, context={"router_states": state})[0]
                chosen = moe.router(x.reshape(-1, D), state.reshape(-1, R)).indices
                ours = moe.router.next_state(x.reshape(-1, D), state.reshape(-1, R)).view_as(handed_on)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours, handed_on, atol=1e-5, rtol=0)
            skipped = (chosen == E).view(2, 16)
            assert (got[skipped] == 0).all()  # the skip expert adds nothing, not its weight times x
            skips += int(skipped.sum())
            if index > 0:  # the state changes the routing
                without = moe(x, context={"router_states": torch.zeros_like(state)})[0]
                assert not torch.allclose(without, got, atol=1e-3)
    assert 0 < skips < 3 * 32, "the tiny model should route to both kinds"


def test_a_bf16_router_rounds_as_transformers_computes_in_bf16(tmp_path):
    """transformers' ZayaRouter computes its MLP, logits and softmax in the model's dtype and selects on
    the bf16 probabilities: on a bf16 model moelab's router (bf16, or float32 as the layer-by-layer and
    offloaded runs hold it) chooses the same experts (float32 maths flipped ~1% of tokens), with the
    same weights, and hands on the same state, bit for bit; the block's output to bf16's rounding."""
    build("zaya", **ZAYA).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load(tmp_path, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, D, generator=generator).bfloat16()
    state = torch.randn(1, 4096, R, generator=generator).bfloat16()
    with open_checkpoint(tmp_path) as view:
        for index in range(3):
            moe = moe_layer_from_view(view.layer(index))
            block = model.model.layers[index].mlp
            with torch.no_grad():
                _, weights, indices, handed_on = block.gate(x, router_states=state)
                expected = block(x, state)[0]
                got = moe(x, context={"router_states": state})[0]
                for router in (moe.router, copy.deepcopy(moe.router).float()):
                    routing = router(x[0], state[0])
                    skipped = routing.indices == E
                    assert torch.equal(routing.indices.masked_fill(skipped, 0), indices), index
                    assert torch.equal(routing.weights.masked_fill(skipped, 0), weights.float()), index
                    assert torch.equal(router.next_state(x[0], state[0]), handed_on[0]), index
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_every_layer_s_output_is_transformers_with_the_router_state_carried(source):
    """Every layer's tokens route to experts and to the skip expert (a layer whose tokens all skip
    outputs zero, whatever state it reads), so that each state handed on changes what is compared."""
    batches = [torch.randint(0, 8192, (2, 9)), torch.randint(0, 8192, (1, 12))]
    model = load(source)
    assert_layers_are_transformers(source, model, batches)
    chosen = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, args, out, i=i: chosen.__setitem__(i, out[0].argmax(-1)))
        for i, layer in enumerate(model.model.layers)
    ]  # the top-1 of the logits: the balancing biases are about equal
    with torch.no_grad():
        model(input_ids=torch.cat([b.flatten() for b in batches])[None])
    for hook in hooks:
        hook.remove()
    assert all(0 < int((c == E).sum()) < c.numel() for c in chosen.values()), chosen


def test_the_backward_run_is_autograd_through_the_whole_model(source):
    """The layers' vector-Jacobian products from the head down, each reading the router state of its
    forward run and handed the gradient of the state it passed on, against autograd through transformers'
    model: the gradient with respect to every layer's input."""
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    runner = LayerwiseModel(source)
    states, inputs, carried = run_layers_in_order(runner, ids, 3)
    assert carried[0] is None and all(c.shape == (2, 9, R) for c in carried[1:])
    grads = {3: runner.head_gradients([ids], states, 1.0)[0]}
    for index in reversed(range(3)):
        runner.carry = [carried[index]]
        with runner.layer_backward(index) as vjp:
            grads[index] = vjp(0, inputs[index], grads[index + 1])
    assert runner.carry_grad == [None]  # the first layer reads no state
    model = load(source)
    seen = autograd_input_gradients(model, ids, model.model.layers)
    for index in range(3):
        torch.testing.assert_close(grads[index], seen[index], atol=1e-6, rtol=1e-4, msg=f"layer {index}")


def test_the_backward_sweep_hands_each_layer_the_router_state_of_its_forward_run(source, tmp_path, monkeypatch):
    """The calibration's backward sweep reads each layer's router state from its tape: the gradient it
    carries down to the embeddings is autograd's through transformers' model, per batch."""
    assert_backward_sweep_is_autograd(source, tmp_path, monkeypatch, BACKWARD)


def test_an_interrupted_calibration_resumes_to_the_same_statistics(source, tmp_path, monkeypatch):
    """Killed in the backward sweep at layer 1 (resumed from the snapshot after layer 2: its gradients
    and those of the router state layer 1 handed on)."""
    assert_resumes_to_the_same_statistics(source, tmp_path, monkeypatch, BACKWARD, [0, 1, 2, 2, 1], range(3))


@pytest.fixture(scope="module")
def stats(source, tmp_path_factory) -> Path:
    with intra_op_threads(1):  # as the tests run (one_thread): MKL's sums depend on the thread count
        return calibrate(source, tmp_path_factory.mktemp("stats") / "s", options=BACKWARD, quiet=True).directory


def test_the_sampled_inputs_keep_the_router_states_handed_to_them(source, stats):
    """The statistics' sampled layer inputs come with the router state each token's block read (the
    first layer's: none), which NAEE, the recipe and router re-fitting hand the layer again: against a
    layer-by-layer run over the calibration windows, position by position."""
    from moelab.compress.calibration import calibration_mixture

    mixture = calibration_mixture(source, "corpus", BACKWARD)
    runner = LayerwiseModel(source)
    windows = mixture.batches(BACKWARD.batch_size)
    states = runner.embed([torch.stack([w.ids for w in batch]) for batch in windows])
    sampled = Calibration(stats)
    assert sampled.layer(0).router_inputs is None
    for index in range(3):
        read = {}  # global position -> the router state layer `index` read there
        for b, batch in enumerate(windows):
            for row, window in enumerate(batch):
                for t in range(window.ids.numel()):
                    read[window.start + t] = None if runner.carry[b] is None else runner.carry[b][row, t]
        with runner.layer(index) as run:
            states = [run(b, h) for b, h in enumerate(states)]
        if index:
            ids, total = sampled.layer(index).router_inputs, mixture.num_tokens
            expected = torch.stack([read[i * total // len(ids)] for i in range(len(ids))])
            assert ids.shape == (BACKWARD.sample_tokens, R)
            torch.testing.assert_close(ids, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_compresses_zaya(source, stats, tmp_path, method):
    """Every method: pruning, merging (its router rows out_proj's, fitted on the router MLP's features
    where a method fits them), NAEE and the recipe re-running layers on sampled inputs and the router
    states handed to them, HEAPr's neurons (backward sweep); the writer's checks reload the output in
    transformers and compare every edited layer with what the edit should compute."""
    domains = ["code"] if method == "premoe" else None
    report = compress(source, tmp_path / "out", method=method, ratio=0.5, stats=stats, domains=domains, quiet=True)
    assert set(report["layers"]) == {"0", "1", "2"} and report["reload_checked"]


def test_router_re_fitting_trains_out_proj_s_rows_on_the_sampled_inputs_and_states(source, stats, tmp_path):
    """After pruning, re-fitting trains the router's rows (out_proj's, the skip expert's too) on the sampled
    inputs and the router states handed to them, the MLP frozen. The writer's checks pass on the fitted
    routers."""
    from moelab.compress.router_fit import RouterFit

    fit = RouterFit(5, 1e-2)
    report = compress(source, tmp_path / "out", method="reap", ratio=0.5, stats=stats, router_fit=fit, quiet=True)
    fits = {index: entry["notes"]["router_fit"] for index, entry in report["layers"].items()}
    assert report["reload_checked"] and fits.keys() == {"0", "1", "2"}
    for fit in fits.values():
        assert "skipped" in fit or fit["heldout_after"] <= fit["heldout_before"]
    assert any("skipped" not in fit and fit["best_step"] > 0 for fit in fits.values())


def test_router_re_fitting_keeps_the_edit_where_every_sampled_token_skips(source):
    """A layer whose sampled tokens all choose the skip expert outputs zero on them: nothing to fit (the
    loss would be 0/0), so re-fitting keeps the edit's router and says why."""
    from moelab.compress.router_fit import RouterFit, refit_router
    from moelab.hf.edit import LayerEdit, apply_edit

    with open_checkpoint(source) as view:
        layer = view.layer(1)
    skip = dataclasses.replace(layer.router.identity, selection_bias=torch.tensor([10.0]))  # every token skips
    layer = dataclasses.replace(layer, router=dataclasses.replace(layer.router, identity=skip))
    generator = torch.Generator().manual_seed(0)
    x, states = torch.randn(32, D, generator=generator), torch.randn(32, R, generator=generator)
    edit = LayerEdit.keep([0, 1, 3])
    fitted, notes = refit_router(layer, edit, x, RouterFit(5, 1e-2), states)
    assert notes["skipped"] == "the layer outputs zero"
    assert fitted.view.router.weight.equal(apply_edit(layer, edit).router.weight)


def test_pruning_keeps_the_skip_expert_s_row_and_bias_last(source, tmp_path):
    """Dropping experts 1 and 2: out_proj keeps rows [0, 3] and then the skip expert's, the balancing
    biases likewise, and the router MLP is copied unchanged; transformers' logits on the pruned model are
    those of the original with experts 1 and 2 masked out of routing (tokens skipping in both)."""
    out = tmp_path / "out"
    drop = {i: [1, 2] for i in range(3)}
    drop_experts(source, out, drop, quiet=True)
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = _logits(_masked_model("zaya", source, drop), ids)
    torch.testing.assert_close(_logits(load(out), ids), expected, atol=1e-4, rtol=0)
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    gate = "model.layers.1.mlp.gate."
    for name in ("router_mlp.out_proj.weight", "balancing_biases"):
        torch.testing.assert_close(after[gate + name], before[gate + name][[0, 3, 4]], atol=0, rtol=0)
    for name in ("down_proj.weight", "router_states_scale", "router_mlp.fc1.weight", "router_mlp.norm.weight"):
        assert torch.equal(after[gate + name], before[gate + name])


def test_a_skip_bias_transformers_would_reset_is_refused(source, tmp_path):
    """transformers sets the skip expert's balancing bias to -1 on loading whatever is stored: a checkpoint
    storing another would route otherwise in moelab than in transformers, and is refused by name."""
    path = tmp_path / "src"
    path.mkdir()
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.gate.balancing_biases"][-1] = 0.5
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text((source / "config.json").read_text())
    refused = r"transformers sets it to -1.0 when it loads zaya"
    with open_checkpoint(path) as view, pytest.raises(CheckpointError, match=refused):
        view.layer(1)


def test_a_trace_records_the_skip_expert_as_the_choice_past_the_experts(source, tmp_path):
    """transformers' block hands its experts a skipped slot as expert 0 with weight 0: the trace records
    the skip expert (choice E) with its probability, as the router chose it (no mismatch in the check),
    and the routing the block read with the state handed in, in every layer; `analyze` reads the trace."""
    loaded = load_model(source)
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    states = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: states.__setitem__(i, out))
        for i, layer in enumerate(loaded.model.model.layers)
    ]
    with RoutingCapture(loaded.model, loaded.view) as capture, torch.no_grad():
        loaded.model(input_ids=ids, use_cache=False)
        recorded = capture.pop()
    for hook in hooks:
        hook.remove()
    skips = 0
    for i, r in recorded.items():
        _, weights, indices, _ = states[i]  # transformers' router: the skip masked to expert 0, weight 0
        skipped = r.indices == E
        assert torch.equal(r.indices.masked_fill(skipped, 0), indices) and (weights[skipped] == 0).all()
        torch.testing.assert_close(r.weights.masked_fill(skipped, 0), weights, atol=1e-6, rtol=0)
        assert (r.weights[skipped] > 0).all() and capture.checks[i].mismatched == 0
        skips += int(skipped.sum())
    assert 0 < skips < 3 * 32 and capture.identity_experts == {0: 1, 1: 1, 2: 1}
    assert capture.identity_returns == "zero"
    streams = {"d0": np.arange(64) * 97 % 8192}
    trace = trace_model(loaded, streams, tmp_path / "trace", TraceOptions(max_tokens=64, seq_len=16), quiet=True)
    summary = analyze_trace(trace, chunk_lens=(1, 8))
    assert sorted(map(int, summary["layers"])) == [0, 1, 2] and summary["tokens"] == 64
    assert trace.info.identity_returns == summary["identity_returns"] == "zero"  # the report names them skip experts


def test_offloaded_decoding_is_transformers(source):
    """Greedy tokens and logits offloaded (half the experts resident, with read-ahead; all of them) are
    transformers': each block reads the router state handed in and hands its own on, and a skipped slot
    adds nothing."""
    model = load(source)
    ids = torch.randint(0, 8192, (1, 6), generator=torch.Generator().manual_seed(2))
    want = generate_ids(model, ids, 8)
    for resident, predictor in ((0.5, "lookahead"), (1.0, None)):
        offloaded = load_offloaded(source, resident=resident, predictor=predictor)
        try:
            assert torch.equal(offloaded.generate(ids, 8), want), resident
            with torch.inference_mode():
                torch.testing.assert_close(
                    offloaded.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
                )
        finally:
            offloaded.close()


def test_the_state_decoding_keeps_per_sequence_is_what_transformers_caches():
    """ZAYA's CCA keeps, per sequence and layer, its q/k convolutions' window and the last token's delayed
    value projection: counted for a memory budget's cache (`load_offloaded(kv_cache_tokens=...)`)."""
    state = assert_state_is_what_transformers_holds(build("zaya"))
    assert state == 2 * (48 * 2 + 8) * 4  # 2 layers: (4 + 2) heads x 8 channels, window (2 - 1) + (2 - 1); 2 x 8 / 2


def test_merging_s_fit_rule_fits_out_proj_rows_on_transformers_router_mlp_features(source):
    """A merged expert's row (the 'fit' rule) is the least-squares row over the features transformers'
    router MLP computes from the inputs and the router states handed in: their logit follows the
    log-sum-exp of the members' logits."""
    from moelab.compress.merging import merged_layer

    generator = torch.Generator().manual_seed(0)
    x, states = torch.randn(64, D, generator=generator), torch.randn(64, R, generator=generator)
    with open_checkpoint(source) as view:
        layer = view.layer(1)
    edit = merged_layer(layer, [[0, 1], [2], [3]], torch.ones(E), router_rule="fit", inputs=x, router_inputs=states)
    gate = load(source).model.layers[1].mlp.gate
    with torch.no_grad():
        mlp = gate.router_mlp
        r = gate.down_proj(x) + states * gate.router_states_scale
        features = mlp.act_fn(mlp.fc2(mlp.act_fn(mlp.fc1(mlp.norm(r))))).double()
        target = torch.logsumexp(features @ mlp.out_proj.weight[:2].double().T, dim=1)
    expected = torch.linalg.lstsq(features, target[:, None]).solution[:, 0]
    torch.testing.assert_close(edit.view.router.weight[0].double(), expected, atol=1e-4, rtol=1e-4)
    assert edit.view.router.identity.weight.equal(layer.router.identity.weight)  # the skip expert's row stays


def test_an_edit_that_changes_the_router_mlp_is_refused(source):
    """The writer copies the router's MLP unchanged (only out_proj's rows follow the experts): an edited
    view that changes it is refused by name, not written as if it had not."""
    from moelab.hf.edit import check_same_settings

    with open_checkpoint(source) as view:
        layer = view.layer(1)
    mlp = layer.router.mlp
    for changed in (
        dataclasses.replace(mlp, fc1=mlp.fc1 * 2),
        dataclasses.replace(mlp, norm=dataclasses.replace(mlp.norm, weight=mlp.norm.weight + 1)),
    ):
        edited = dataclasses.replace(layer, router=dataclasses.replace(layer.router, mlp=changed))
        with pytest.raises(ValueError, match="changes the router's MLP"):
            check_same_settings(layer, edited)
    same = dataclasses.replace(layer.router, mlp=dataclasses.replace(mlp))  # another view of the same tensors
    check_same_settings(layer, dataclasses.replace(layer, router=same))
