"""moelab.trace: hook-based routing capture (moelab and every transformers family), streaming
safetensors storage, calibration data, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hf_tiny import TINY, block_choices, build

from moelab.analyze import analyze_trace
from moelab.hf import open_checkpoint
from moelab.models import MoETransformer, reference, save_pretrained, tiny
from moelab.trace import (
    LayerRouting,
    RoutingCapture,
    TraceInfo,
    TraceOptions,
    TraceWriter,
    batches,
    load_model,
    load_streams,
    open_trace,
    trace_model,
)
from moelab.trace.capture import RoutingCheck
from moelab.trace.data import count_tokens
from moelab.trace.model import wrap_model
from moelab.trace.store import ShardInfo

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _native(seed: int = 0, **moe) -> MoETransformer:
    torch.manual_seed(seed)
    cfg = tiny()
    if moe:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))
    return MoETransformer(cfg).eval()


def _streams(vocab: int, sizes=(300, 200)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"d{i}": rng.integers(0, vocab, n) for i, n in enumerate(sizes)}


# ---------------------------------------------------------------------- moelab models


def test_native_capture_matches_the_layers_own_routing():
    model = _native(num_shared=1)
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    for layer in model.moe_layers.values():
        layer.trace = True
    with RoutingCapture(model) as capture, torch.no_grad():
        out = model(ids)
        recorded = capture.pop()
    assert capture.layers == sorted(model.moe_layers) and capture.family == "moelab"
    for i, result in out.moe_results.items():
        routing = result.routing
        torch.testing.assert_close(recorded[i].indices, routing.indices, atol=0, rtol=0)
        torch.testing.assert_close(recorded[i].weights, routing.weights, atol=0, rtol=0)
        torch.testing.assert_close(recorded[i].logits, routing.logits, atol=0, rtol=0)
        p = routing.probs
        torch.testing.assert_close(recorded[i].entropy, -(p * p.log2()).sum(-1))
    assert capture.pop() == {}  # popped: nothing left
    handles_gone = [len(layer.router._forward_hooks) for layer in model.moe_layers.values()]
    assert handles_gone == [0] * len(handles_gone)


def test_native_expert_max_is_the_unweighted_down_output():
    """expert_max[e] = max |expert_e(x_t)| over the tokens routed to e, computed here directly
    from the layer input and the recorded choices."""
    model = _native(num_shared=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    (index, layer), = model.moe_layers.items()
    inputs = []
    layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with RoutingCapture(model) as capture, torch.no_grad():
        model(ids)
        chosen = capture.pop()[index].indices
    with torch.no_grad():
        x = inputs[0]
        E = layer.num_experts
        expected = torch.zeros(E)
        for e in range(E):
            rows = x[(chosen == e).any(-1)]
            counts = [rows.shape[0] if j == e else 0 for j in range(E)]
            if rows.shape[0]:
                expected[e] = layer.experts(rows, counts).abs().max()
        torch.testing.assert_close(capture.expert_max[index], expected, rtol=1e-5, atol=1e-7)
        shared = layer.shared.down_proj(torch.nn.functional.silu(layer.shared.gate_proj(x)) * layer.shared.up_proj(x))
        torch.testing.assert_close(capture.shared_max[index], shared.abs().max().reshape(1))
    assert (expected > 0).all()


def test_native_expert_max_of_layers_sharing_one_pool_is_each_layers_own():
    """ReXMoE: MoE layers 1 and 2 route over one shared pool of experts; each layer's expert_max
    is over the tokens it routed, not the maximum over both layers' calls."""
    torch.manual_seed(0)
    cfg = tiny()
    model = MoETransformer(dataclasses.replace(cfg, n_layers=3, moe=dataclasses.replace(cfg.moe, reuse_layers=2))).eval()
    layers = model.moe_layers
    assert layers[1].experts is layers[2].experts
    inputs = {}
    for i, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1])))
    with RoutingCapture(model) as capture, torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 16)))
        chosen = {i: r.indices for i, r in capture.pop().items()}
    for i, layer in layers.items():
        E = layer.router.num_experts  # the pool
        expected = torch.zeros(E)
        for e in range(E):
            rows = inputs[i][(chosen[i] == e).any(-1)]
            if rows.shape[0]:
                expected[e] = layer.experts(rows, [rows.shape[0] if j == e else 0 for j in range(E)]).abs().max()
        torch.testing.assert_close(capture.expert_max[i], expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(capture.expert_max[1], capture.expert_max[2])


def test_native_capture_during_generate():
    model = _native()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    with RoutingCapture(model) as capture:
        model.generate(prompt, 4, greedy=True)
        recorded = capture.pop()
    # the prompt, then one token per step except the last generated one
    assert all(r.indices.shape[0] == 5 + 3 for r in recorded.values())


def test_trace_model_round_trip_across_shards(tmp_path):
    model = _native()
    streams = _streams(model.config.vocab_size)
    options = TraceOptions(max_tokens=400, seq_len=32, batch_size=2, shard_tokens=50, logits=True)
    trace = trace_model(model, streams, tmp_path / "trace", options, quiet=True)
    info = trace.info
    assert len(info.shards) > 3 and info.num_tokens == 400 and info.domains == ["d0", "d1"]
    # Recompute the routing batch by batch and compare with the shards, token for token.
    expected = []
    with RoutingCapture(model) as capture, torch.no_grad():
        for batch in batches(streams, max_tokens=400, seq_len=32, batch_size=2):
            model(batch.token_ids)
            expected.append((batch, capture.pop()))
    shards = list(trace.shards())
    got_ids = torch.cat([s.token_ids for s in shards])
    assert torch.equal(got_ids, torch.cat([b.token_ids.reshape(-1) for b, _ in expected]))
    domains = torch.cat([torch.full((b.token_ids.numel(),), b.domain) for b, _ in expected])
    assert torch.equal(torch.cat([s.domain for s in shards]), domains)
    positions = torch.cat([s.positions for s in shards])
    assert positions[:32].tolist() == list(range(32)) and positions.max() == 31
    for i in info.layers:
        want = LayerRouting.cat([r[i] for _, r in expected])
        got = LayerRouting.cat([s.layers[i] for s in shards])
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.weights, want.weights, atol=0, rtol=0)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-2, rtol=1e-3)  # float16 on disk
        torch.testing.assert_close(got.entropy, want.entropy, atol=1e-2, rtol=1e-3)
    sequences = torch.cat([s.sequence for s in shards])
    assert sequences.unique().numel() == info.num_sequences == sum(s.sequences for s in info.shards)
    routed, _ = trace.expert_stats()
    assert set(routed) == set(info.layers) and all((t > 0).all() for t in routed.values())
    assert info.checks == {}  # a moelab model's routing is recorded as computed: nothing to check


# ---------------------------------------------------------------------- transformers models


@pytest.mark.parametrize("family", list(TINY))
def test_transformers_trace_records_what_the_block_chose(tmp_path, family):
    build(family).save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    seen, handles = block_choices(loaded.model, family)
    ids = torch.randint(0, 64, (2, 12))
    with RoutingCapture(loaded.model, loaded.view) as capture, torch.no_grad():
        loaded.model(input_ids=ids, use_cache=False)
        recorded = capture.pop()
    for h in handles:
        h.remove()
    assert sorted(recorded) == sorted(seen) and recorded, "every MoE layer, no dense layer"
    for i, r in recorded.items():
        (index, weights), = seen[i]
        router = loaded.view.layer(i).router  # Laguna's, MiniMax-M3's scale: applied after their experts
        scale = router.route_scale if router.scaled_after_experts else 1
        indices, recorded_weights = r.indices, r.weights
        if router.identity is not None and router.identity.returns == "zero":  # ZAYA's block hands its experts a
            skipped = indices >= router.num_experts  # skipped slot as expert 0 with weight 0; the trace records the skip
            indices, recorded_weights = indices.masked_fill(skipped, 0), recorded_weights.masked_fill(skipped, 0)
        assert torch.equal(indices, index.long())
        torch.testing.assert_close(recorded_weights, weights.float() * scale, atol=0, rtol=0)
        check = capture.checks[i]  # JetMoE's: against the choices its gating handed on, sorted by expert
        assert (check.tokens, check.mismatched) == (24, 0) and check.max_weight_error < 1e-5
        assert (r.entropy > 0).all() and r.logits.shape == (24, capture.num_experts[i])
    # The whole path: a trace on disk, then its statistics.
    options = TraceOptions(max_tokens=64, seq_len=16)
    trace = trace_model(loaded, _streams(64), tmp_path / "trace", options, quiet=True)
    summary = analyze_trace(trace, chunk_lens=(1, 8))
    assert sorted(map(int, summary["layers"])) == sorted(recorded) and summary["tokens"] == 64
    assert all(c["mismatched"] == 0 for c in summary["checks"].values())


@pytest.mark.parametrize(
    "family", ["mixtral", "gpt_oss", "qwen2_moe", "llama4_text", "dbrx", "granitemoeshared", "jetmoe", "longcat_flash"]
)
def test_transformers_expert_max_matches_the_view(tmp_path, family):
    """Max |down output| per expert (and of the shared experts) against the view's native layer
    run on the block's input for the recorded choices; identity experts (LongCat-Flash's, recorded
    as choices past the experts) have none."""
    from moelab.hf import moe_layer_from_view
    from moelab.nn.experts import SwiGLU

    build(family).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    layers = loaded.model.transformer.blocks if family == "dbrx" else loaded.model.model.layers
    inputs = {}
    for i, layer in enumerate(layers):
        block = TINY[family].block(loaded.model, i)
        module = block if isinstance(block, torch.nn.Module) else layer.block_sparse_moe
        module.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
    with RoutingCapture(loaded.model, loaded.view) as capture, torch.no_grad():
        loaded.model(input_ids=torch.randint(0, 64, (2, 10)), use_cache=False)
        recorded = capture.pop()
        for i, r in recorded.items():
            view_layer = loaded.view.layer(i)
            native = moe_layer_from_view(view_layer)
            expected = torch.zeros(capture.num_experts[i])
            E = view_layer.experts.num_experts
            assert len(expected) == E + view_layer.router.identity_experts
            for e in range(E):
                token, slot = (r.indices == e).nonzero(as_tuple=True)
                if token.numel():
                    counts = [token.numel() if j == e else 0 for j in range(E)]
                    w = r.weights[token, slot] if view_layer.experts.scale_input else None
                    expected[e] = native.experts(inputs[i][token], counts, w).abs().max()
            torch.testing.assert_close(capture.expert_max[i], expected, rtol=1e-4, atol=1e-6)
            if native.shared is not None:
                shared = SwiGLU.forward(native.shared, inputs[i])
                torch.testing.assert_close(capture.shared_max[i], shared.abs().max().reshape(1), rtol=1e-4, atol=1e-6)
    assert any((t > 0).any() for t in capture.expert_max.values())


def test_a_trace_marks_identity_experts_and_the_report_ranks_experts_with_weights_alone(tmp_path):
    """LongCat-Flash's identity experts are recorded as choices past the experts, and the manifest
    says how many: the Super Experts statistic ranks the experts with weights (an identity expert's
    max |output| of 0 would lower the median and the threshold)."""
    build("longcat_flash").save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    trace = trace_model(loaded, _streams(64), tmp_path / "trace", TraceOptions(max_tokens=64, seq_len=16), quiet=True)
    assert trace.info.identity_experts == [2, 2] and trace.info.num_experts == [6, 6]
    assert trace.info.identity_returns == "input"  # LongCat-Flash's return their input
    summary = analyze_trace(trace, chunk_lens=(1, 8))
    assert all(s["identity_experts"] == 2 and s["num_experts"] == 6 for s in summary["layers"].values())
    assert all(len(v) == 4 for v in summary["expert_max_output"].values())
    manifest = tmp_path / "trace" / "manifest.json"  # as a trace made before identity_returns: read as "input"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "identity_returns"}))
    assert open_trace(tmp_path / "trace").info.identity_returns == "input"
    with pytest.raises(ValueError, match=r"identity_experts \[3\] must hold one count in \[0, num_experts\)"):
        _info(identity_experts=[3])
    with pytest.raises(ValueError, match=r"unknown TraceInfo.identity_returns 'nothing'"):
        _info(identity_returns="nothing")


def test_transformers_capture_during_generate(tmp_path):
    build("qwen3_moe").save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    prompt = torch.randint(2, 64, (1, 6))
    with RoutingCapture(loaded.model, loaded.view) as capture:
        loaded.model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        recorded = capture.pop()
    assert {i: r.indices.shape for i, r in recorded.items()} == {1: (6 + 3, 2)}
    assert capture.checks[1].mismatched == 0


def test_transformers_trace_with_its_own_tokenizer(tmp_path):
    """A checkpoint that ships a tokenizer: texts are encoded with it (here moelab's, saved as HF)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from moelab.data import TOKENIZER_DIR

    config = AutoConfig.for_model("mixtral", **dict(TINY["mixtral"].config, vocab_size=8192))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.encoder is not None
    text = tmp_path / "notes.txt"
    text.write_text("Hello routing world. " * 20)
    streams = load_streams(text, encoder=loaded.encoder)
    trace = trace_model(loaded, streams, tmp_path / "trace", TraceOptions(max_tokens=64, seq_len=16), quiet=True)
    assert trace.info.domains == ["notes"] and trace.info.family == "mixtral"
    assert trace.info.checks["0"]["mismatched"] == 0 and trace.info.num_tokens == 64


def test_routing_check_compares_expert_sets_and_aligns_weights_by_expert():
    """Token 0: the same experts in another slot order (weight error 0.01 once aligned by
    expert); token 1: the same, error 0.02; token 2 shares one of its two experts and token 3
    none: both mismatched, and their weights are not compared."""

    def routing(indices, weights):
        return LayerRouting(torch.tensor(indices), torch.tensor(weights), torch.zeros(len(indices)))

    recomputed = routing([[0, 1], [2, 3], [0, 2], [0, 1]], [[0.7, 0.3], [0.5, 0.5], [0.6, 0.4], [0.9, 0.1]])
    used = routing([[1, 0], [2, 3], [0, 3], [2, 3]], [[0.3, 0.69], [0.5, 0.48], [0.6, 0.4], [0.1, 0.9]])
    check = RoutingCheck()
    check.update(recomputed, used)
    assert (check.tokens, check.mismatched) == (4, 2)
    assert check.max_weight_error == pytest.approx(0.02, abs=1e-6)
    check.update(routing([[3, 1]], [[0.5, 0.5]]), routing([[3, 1]], [[0.5, 0.499]]))
    assert (check.tokens, check.mismatched) == (5, 2)
    assert check.max_weight_error == pytest.approx(0.02, abs=1e-6), "the largest over every call"
    check.update(routing([[0, 2]], [[0.5, 0.5]]), routing([[2, 0]], [[0.53, 0.5]]))
    assert check.max_weight_error == pytest.approx(0.03, abs=1e-6), "|error|: the used weight may be the larger"



def test_native_shared_max_is_the_max_over_every_call():
    """shared_max keeps the largest |shared down output| over calls, for the layers that have
    shared experts only."""
    model = _native(num_shared=1)
    (index, layer), = model.moe_layers.items()
    shared = layer.shared
    inputs = []
    layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with RoutingCapture(model) as capture, torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 24)))
        model(torch.randint(0, model.config.vocab_size, (1, 1)))
        per_call = [shared.down_proj(torch.nn.functional.silu(shared.gate_proj(x)) * shared.up_proj(x)).abs().max()
                    for x in inputs]
    assert per_call[0] > per_call[1], "the first call holds the max"
    torch.testing.assert_close(capture.shared_max, {index: per_call[0].reshape(1)})
    with RoutingCapture(_native()) as capture:
        assert capture.shared_max == {}
    with RoutingCapture(model, expert_stats=False) as capture, torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 24)))
    assert capture.shared_max[index] == 0 and (capture.expert_max[index] == 0).all()



def test_pop_refuses_when_one_layer_recorded_nothing():
    torch.manual_seed(0)
    model = MoETransformer(dataclasses.replace(tiny(), first_k_dense=0)).eval()
    with RoutingCapture(model) as capture, torch.no_grad():
        model.moe_layers[0].router._forward_hooks.clear()
        model(torch.randint(0, model.config.vocab_size, (1, 4)))
        with pytest.raises(RuntimeError, match=r"MoE layers \[0\] recorded nothing while others did"):
            capture.pop()



def test_hf_experts_hook_marks_out_of_range_slots_empty():
    """Slots a block fills with -1 or with E (past the last expert) are empty in the record; the
    recomputed routing serves one experts call only, and is what is recorded (unchecked) when the
    experts get neither the choices nor dense scores."""
    from moelab.trace.capture import _LayerTap, _on_hf_experts

    tap = _LayerTap(0, 4, 2)
    tap.pending = LayerRouting(torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2), torch.zeros(2))
    hook = _on_hf_experts(tap, torch.nn.Identity(), expert_stats=False)
    args = (torch.zeros(2, 8), torch.tensor([[0, 4], [-1, 3]]), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    hook(None, args, {}, None)
    assert tap.parts[0].indices.tolist() == [[0, -1], [-1, 3]]
    with pytest.raises(RuntimeError, match="layer 0: the experts ran without the router hook firing first"):
        hook(None, args, {}, None)
    tap.pending = recomputed = LayerRouting(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.zeros(1))
    hook(None, (torch.zeros(1, 8),), {}, None)
    assert tap.parts[1] is recomputed and tap.check.tokens == 2


def test_transformers_capture_without_expert_stats_keeps_no_maxima(tmp_path):
    """expert_stats=False: the routing is recorded, but neither the routed experts' nor the
    shared experts' maxima are."""
    build("qwen2_moe").save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    with RoutingCapture(loaded.model, loaded.view, expert_stats=False) as capture, torch.no_grad():
        loaded.model(input_ids=torch.randint(0, 64, (2, 10)), use_cache=False)
        assert capture.pop()
    assert capture.shared_max, "qwen2_moe has shared experts"
    assert all((t == 0).all() for t in [*capture.expert_max.values(), *capture.shared_max.values()])


def test_moelab_experts_hook_skips_zero_weight_rows_and_keeps_scaled_inputs_as_computed():
    """The moelab experts hook reruns the rows unweighted, but rows of routing weight 0 (padded
    or dropped) count for no expert; experts that scale their input (Llama 4) keep their output."""
    from moelab.nn.experts import SwiGLUExperts
    from moelab.trace.capture import _LayerTap, _on_moelab_experts

    torch.manual_seed(0)
    xs, counts, w = torch.randn(3, 8), [2, 1], torch.tensor([0.5, 0.0, 0.25])
    xs[1] *= 10
    for scale_input in (False, True):
        experts, tap = SwiGLUExperts(2, 8, 16, scale_input=scale_input), _LayerTap(0, 2, 1)
        with torch.no_grad():
            ys, unweighted = experts(xs, counts, w), experts(xs, counts)
            _on_moelab_experts([tap])(experts, (xs, counts, w), ys)
        rows = (ys if scale_input else unweighted).abs().amax(-1)
        assert unweighted[1].abs().max() > unweighted[0].abs().max()
        torch.testing.assert_close(tap.expert_max, torch.stack([rows[0], rows[2]]))


# ---------------------------------------------------------------------- storage


def _info(**kw) -> TraceInfo:
    return TraceInfo(model="m", family="moelab", num_layers=2, layers=[1], num_experts=[3], top_k=[2],
                     domains=["a", "b"], **kw)


def _routing(T: int, seed: int = 0) -> dict[int, LayerRouting]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 3, (T, 2), generator=g)
    idx[::5, 1] = -1
    return {1: LayerRouting(idx, torch.rand(T, 2, generator=g), torch.rand(T, generator=g))}


def test_writer_streams_shards_and_replaces_atomically(tmp_path):
    out = tmp_path / "trace"
    parts = [(torch.randint(0, 9, (2, 5)), d % 2, _routing(10, d)) for d in range(5)]
    with TraceWriter(out, _info(), shard_tokens=15) as writer:
        for ids, d, r in parts:
            writer.add(ids, d, r)
            assert not out.exists(), "nothing appears before close"
        trace = writer.close({1: torch.tensor([1.0, 2.0, 3.0])}, {})
    assert [s.tokens for s in trace.info.shards] == [20, 20, 10]
    shards = list(open_trace(out).shards())
    torch.testing.assert_close(torch.cat([s.token_ids for s in shards]), torch.cat([p[0].reshape(-1) for p in parts]))
    indices = torch.cat([s.layers[1].indices for s in shards])
    torch.testing.assert_close(indices, torch.cat([p[2][1].indices for p in parts]))
    assert torch.cat([s.sequence for s in shards]).tolist() == [q for q in range(10) for _ in range(5)]
    assert torch.cat([s.domain for s in shards]).tolist() == [d % 2 for d in range(5) for _ in range(10)]
    assert trace.expert_stats()[0][1].tolist() == [1.0, 2.0, 3.0]
    # A second trace replaces the first (with overwrite); a failed one leaves it untouched and no
    # staging behind.
    with pytest.raises(ValueError, match="already holds moelab's routing trace; pass --overwrite"):
        TraceWriter(out, _info())
    with TraceWriter(out, _info(), overwrite=True) as writer:
        writer.add(*parts[0])
        writer.close()
    assert open_trace(out).info.num_tokens == 10
    with pytest.raises(RuntimeError), TraceWriter(out, _info(), overwrite=True) as writer:
        writer.add(*parts[0])
        raise RuntimeError("interrupted")
    assert open_trace(out).info.num_tokens == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]


def test_writer_and_reader_errors(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="taken exists and was not written by moelab"):
        TraceWriter(tmp_path / "taken", _info())
    with TraceWriter(tmp_path / "t", _info()) as writer:
        with pytest.raises(ValueError, match="routing covers layers"):
            writer.add(torch.zeros(1, 4, dtype=torch.long), 0, {})
        with pytest.raises(ValueError, match="domain 2 out of range for 2 domains"):
            writer.add(torch.zeros(1, 4, dtype=torch.long), 2, _routing(4))
        with pytest.raises(ValueError, match=r"token_ids must be \[batch, seq\], got \[4\]"):
            writer.add(torch.zeros(4, dtype=torch.long), 0, _routing(4))
        with pytest.raises(ValueError, match="layer 1 routed 5 tokens, the batch has 4"):
            writer.add(torch.zeros(1, 4, dtype=torch.long), 0, _routing(5))
        three_slots = {1: LayerRouting(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3), torch.zeros(4))}
        with pytest.raises(ValueError, match=r"layer 1 gave indices \[4, 3\] and weights \[4, 3\], the trace expects \[4, 2\]"):
            writer.add(torch.zeros(1, 4, dtype=torch.long), 0, three_slots)
        with pytest.raises(ValueError, match="no tokens were traced"):
            writer.close()
    with pytest.raises(ValueError, match="is not a routing trace"):
        open_trace(tmp_path / "taken")
    with pytest.raises(ValueError, match="shard_tokens must be >= 1, got 0"):
        TraceWriter(tmp_path / "z", _info(), shard_tokens=0)
    with TraceWriter(tmp_path / "z", _info(logits=True)) as writer:
        with pytest.raises(ValueError, match="layer 1 has no logits but the trace records them"):
            writer.add(torch.zeros(1, 4, dtype=torch.long), 0, _routing(4))
    with pytest.raises(ValueError, match="tokens and sequences must be >= 0"):
        ShardInfo("shard-00000.safetensors", -1, 1)
    with TraceWriter(tmp_path / "t", _info()) as writer:
        writer.add(torch.zeros(1, 4, dtype=torch.long), 0, _routing(4))
        writer.close()
    (tmp_path / "t" / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="shard .* is missing"):
        list(open_trace(tmp_path / "t").shards())



def test_reader_refuses_a_shard_one_past_the_manifest(tmp_path):
    """A shard whose domain number equals the number of domains, whose expert index equals the
    number of experts or lies below -1 (the empty slot), whose tensor has one row too few, whose
    indices or weights have a slot more or less than the layer's top_k, or whose indices are not
    integers, does not match its manifest."""
    from safetensors.torch import load_file, save_file

    with TraceWriter(tmp_path / "t", _info()) as writer:
        writer.add(torch.zeros(1, 4, dtype=torch.long), 0, _routing(4))
        writer.close()
    shard = tmp_path / "t" / "shard-00000.safetensors"
    original = load_file(shard)
    edits = [
        ("domain numbers outside", lambda t: t["domain"].fill_(2)),
        (r"layer1.indices outside \[-1, 3\)", lambda t: t["layer1.indices"].fill_(3)),
        (r"layer1.indices outside \[-1, 3\)", lambda t: t["layer1.indices"].fill_(-2)),
        (r"positions has shape \[3\], expected \[4\]", lambda t: t.__setitem__("positions", t["positions"][:3])),
        (r"layer1.indices has shape \[4, 3\], expected \[4, 2\]",  # one slot more than the layer's top_k
         lambda t: t.__setitem__("layer1.indices", torch.cat([t["layer1.indices"], t["layer1.indices"][:, :1]], 1))),
        (r"layer1.weights has shape \[4, 1\], expected \[4, 2\]",
         lambda t: t.__setitem__("layer1.weights", t["layer1.weights"][:, :1].contiguous())),
        ("layer1.indices holds torch.float32, not integers", lambda t: t.__setitem__("layer1.indices", t["layer1.indices"].float())),
    ]
    for message, edit in edits:
        tensors = {k: v.clone() for k, v in original.items()}
        edit(tensors)
        save_file(tensors, shard)
        with pytest.raises(ValueError, match=message):
            list(open_trace(tmp_path / "t").shards())


# ---------------------------------------------------------------------- data and bad inputs


def test_batches_split_the_budget_evenly():
    streams = {"a": np.arange(100), "b": np.arange(100, 130)}
    got = list(batches(streams, max_tokens=81, seq_len=16, batch_size=2))
    per_domain = {d: sum(b.token_ids.numel() for b in got if b.domain == d) for d in (0, 1)}
    assert per_domain == {0: 41, 1: 30}  # 81 // 2 + 1 for the first; the second has only 30
    assert [tuple(b.token_ids.shape) for b in got if b.domain == 0] == [(2, 16), (1, 9)]
    assert got[0].token_ids[0].tolist() == list(range(16))


def test_text_and_jsonl_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "poems.txt").write_text("roses are red")
    (tmp_path / "data" / "mixed.jsonl").write_text(
        json.dumps({"text": "def f(): pass", "domain": "code"}) + "\n \t\n" + json.dumps({"text": "hallo"}) + "\n")
    streams = load_streams(tmp_path / "data", encoder=lambda texts: np.arange(len(" ".join(texts))))
    assert sorted(streams) == ["code", "mixed", "poems"]  # the blank line between the records is skipped
    assert len(load_streams(tmp_path / "data" / "poems.txt")["poems"]) > 2  # moelab's tokenizer
    with pytest.raises(ValueError, match="did you mean 'poems'"):
        load_streams(tmp_path / "data", domains=["poem"])
    with pytest.raises(ValueError, match="is not 'corpus'"):
        load_streams(tmp_path / "missing.csv")


def test_bad_inputs_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "nowhere")
    monkeypatch.setattr(reference, "MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="moelab train configs/reference/ref-8e-top2.yaml"):
        load_model(None)
    dense = MoETransformer(dataclasses.replace(tiny(), moe=None))
    with pytest.raises(ValueError, match="no MoE layers"):
        RoutingCapture(dense)
    model = _native()
    with pytest.raises(ValueError, match="the data has no tokens"):
        trace_model(model, {"a": np.array([], dtype=np.int64)}, tmp_path / "t", quiet=True)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        trace_model(model, {"a": np.array([5, 10_000])}, tmp_path / "t", quiet=True)
    save_pretrained(model, tmp_path / "native")
    assert isinstance(load_model(tmp_path / "native").model, MoETransformer)
    assert not (tmp_path / "t").exists()


def test_count_tokens_is_what_batches_yields():
    """Budgets that do not split evenly, and a domain shorter than its share."""
    streams = {"a": np.arange(100), "b": np.arange(30), "c": np.arange(50)}
    for max_tokens in (3, 7, 80, 100, 181, 1000):
        got = list(batches(streams, max_tokens=max_tokens, seq_len=16, batch_size=2))
        assert count_tokens(streams, max_tokens) == sum(b.token_ids.numel() for b in got)


def test_batches_refuse_bad_sizes_and_keep_an_empty_domain():
    streams = {"a": np.arange(10), "b": np.arange(10)}
    for name in ("max_tokens", "seq_len", "batch_size"):
        sizes = dict(max_tokens=8, seq_len=4, batch_size=1) | {name: 0}
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            list(batches(streams, **sizes))
    with pytest.raises(ValueError, match=r"max_tokens \(1\) must be at least the number of domains \(2\)"):
        list(batches(streams, max_tokens=1, seq_len=4, batch_size=1))
    got = list(batches({"empty": np.arange(0), "b": np.arange(10)}, max_tokens=8, seq_len=4, batch_size=1))
    assert [(b.domain, b.token_ids.tolist()) for b in got] == [(1, [[0, 1, 2, 3]])]


def test_load_streams_domains_in_the_order_asked_and_blank_text_refused(tmp_path):
    for name in ("x", "y", "z"):
        (tmp_path / f"{name}.txt").write_text(f"text of {name}")
    encode = lambda texts: np.array([len(texts[0])])  # noqa: E731
    assert list(load_streams(tmp_path, domains=["z", "x"], encoder=encode)) == ["z", "x"]
    (tmp_path / "blank.txt").write_text(" \n\t ")
    with pytest.raises(ValueError, match="has no text in domain 'blank'"):
        load_streams(tmp_path, encoder=encode)
    (tmp_path / "blank.txt").unlink()
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "t", "domain": ""}) + "\n")
    with pytest.raises(ValueError, match="d.jsonl:1: 'domain' must be a non-empty string, got ''"):
        load_streams(tmp_path, encoder=encode)


def test_hf_max_len_reads_the_first_length_key_and_defaults_to_2048():
    from types import SimpleNamespace

    from moelab.trace.model import hf_max_len

    assert hf_max_len(SimpleNamespace(max_position_embeddings=4096, n_positions=1024)) == 4096
    assert hf_max_len(SimpleNamespace(max_seq_len=512)) == 512
    assert hf_max_len(SimpleNamespace(n_positions=1024, max_position_embeddings=None)) == 1024
    assert hf_max_len(SimpleNamespace()) == 2048


def test_hf_encoder_ends_each_document_with_eos_and_reads_special_text_as_text():
    from transformers import PreTrainedTokenizerFast

    from moelab.data import TOKENIZER_DIR
    from moelab.trace.model import _hf_encoder

    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    eos = tokenizer.eos_token_id
    one, two = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("one doc", "two"))
    assert _hf_encoder(tokenizer)(["one doc", "two"]).tolist() == one + [eos] + two + [eos]
    assert eos not in _hf_encoder(tokenizer)([tokenizer.eos_token]).tolist()[:-1]


def test_model_without_moe_blocks_in_a_moe_config(tmp_path):
    """A transformers checkpoint whose config makes every layer dense has nothing to trace."""
    cfg = dict(TINY["qwen3_moe"].config, mlp_only_layers=[0, 1])
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **cfg)).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    with pytest.raises(ValueError, match="no MoE layers"):
        RoutingCapture(loaded.model, open_checkpoint(tmp_path))


def test_routing_check_flags_a_view_that_disagrees_with_the_model(tmp_path):
    """The view is read from disk; a router changed in memory afterwards makes the recomputed
    routing disagree with what the block does, and the check counts it."""
    build("mixtral").save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.gate.weight.mul_(-1)
    with RoutingCapture(loaded.model, loaded.view) as capture, torch.no_grad():
        loaded.model(input_ids=torch.randint(0, 64, (2, 16)), use_cache=False)
    assert capture.checks[0].mismatched > 0 and capture.checks[1].mismatched == 0


def test_a_moelab_checkpoint_is_read_with_its_own_tokenizer(tmp_path):
    """An imported model keeps its own tokenizer beside moelab-format weights: tracing, evaluation
    and calibration must read text with it (here: moelab's with two ids swapped), not with the
    shipped one; the shipped one (or none) keeps moelab's own encoding."""
    from transformers import AutoTokenizer

    from moelab.compress.calibration import CalibrationOptions, calibration_mixture
    from moelab.data.tokenizer import TOKENIZER_DIR, load_tokenizer
    from moelab.eval.evaluate import LoadedLM
    from moelab.trace.model import checkpoint_encoder

    model = save_pretrained(_native(), tmp_path / "m")
    assert checkpoint_encoder(model, native=True) is None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    assert checkpoint_encoder(model, native=True) is None and load_model(model).encoder is None
    shipped = load_tokenizer()
    a, b = shipped.token_to_id("Ġthe"), shipped.token_to_id("Ġand")
    doc = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    doc["model"]["vocab"]["Ġthe"], doc["model"]["vocab"]["Ġand"] = b, a
    (model / "tokenizer.json").write_text(json.dumps(doc))
    text = "the cat and the dog"
    own = AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"]
    assert b in own and own != shipped.encode(text).ids
    encoders = (load_model(model).encoder, LoadedLM(model).encoder, checkpoint_encoder(model, native=True))
    for encoder in encoders:
        assert encoder([text]).tolist()[: len(own)] == own
    (tmp_path / "calib.txt").write_text("the cat and the dog " * 40)
    options = CalibrationOptions(tokens=64, seq_len=16)
    ids = calibration_mixture(model, str(tmp_path / "calib.txt"), options).windows[0].ids.tolist()
    assert ids[: len(own)] == own


def test_trace_windows_are_capped_at_the_models_length_and_logits_stored_only_if_asked(tmp_path):
    """seq_len above the model's max_seq_len (tiny: 64) traces windows of 64; logits=False stores
    no logits, logits=True stores them."""
    model = _native()
    streams = _streams(model.config.vocab_size, sizes=(300,))
    for logits in (False, True):
        options = TraceOptions(max_tokens=256, seq_len=1024, batch_size=2, logits=logits)
        trace = trace_model(model, streams, tmp_path / f"t{logits}", options, quiet=True)
        assert trace.info.settings["seq_len"] == 64 and trace.info.logits is logits
        shards = list(trace.shards())
        assert int(torch.cat([s.positions for s in shards]).max()) == 63
        assert all((s.layers[i].logits is not None) is logits for s in shards for i in trace.info.layers)


def test_wrap_model_reads_the_models_own_length_and_vocabulary():
    model = MoETransformer(dataclasses.replace(tiny(), max_seq_len=48, vocab_size=100))
    loaded = wrap_model(model)
    assert (loaded.max_seq_len, loaded.vocab_size) == (48, 100)


def test_a_token_id_equal_to_the_vocabulary_size_is_refused(tmp_path):
    model = _native()
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {V} is outside the model's vocabulary"):
        trace_model(model, {"a": np.array([0, V - 1, V])}, tmp_path / "t", quiet=True)
    assert trace_model(model, {"a": np.array([0, V - 1])}, tmp_path / "ok", quiet=True).info.num_tokens == 2


def test_a_directory_named_like_a_text_file_is_not_read(tmp_path):
    (tmp_path / "data" / "notes.txt").mkdir(parents=True)
    (tmp_path / "data" / "poems.txt").write_text("roses are red")
    assert list(load_streams(tmp_path / "data", encoder=lambda texts: np.arange(3))) == ["poems"]


def test_wrap_model_refuses_a_model_that_is_neither_moelabs_nor_transformers():
    model = torch.nn.Linear(2, 2)
    model.config = dataclasses.make_dataclass("Config", [("vocab_size", int)])(8)  # no max_seq_len
    with pytest.raises(ValueError, match="cannot trace Linear: pass a moelab MoETransformer or a transformers model"):
        wrap_model(model)
