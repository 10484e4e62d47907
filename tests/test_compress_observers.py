"""Calibration observers and statistics: cases the naive-loop comparisons of
`test_compress_reference.py` do not reach (found by mutation testing)."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from hf_tiny import build, load
from layer_views import make_view
from reference import F64, silu
from safetensors.torch import load_file, save_file
from test_compress import SMALL, moelab_model
from test_compress_reference import SOURCES, hand_stats, params
from transformers import PreTrainedTokenizerFast

from moelab.compress import calibrate
from moelab.compress.calibration import calibration_mixture
from moelab.compress.observers import (
    ContributionObserver,
    MoECall,
    Tokens,
    added_scale,
    block_residuals,
    eager_moe,
    per_expert,
)
from moelab.compress.stats import (
    FORMAT,
    INFO_NAME,
    STATS_VERSION,
    Calibration,
    fingerprint,
    layer_file,
    layer_stats,
    read_info,
    write_info,
    write_layer,
)
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import open_checkpoint
from moelab.hf.native import moe_layer_from_view
from moelab.nn.routers import Routing


def test_kept_hidden_activations_are_detached_and_are_each_slots_activation():
    """The backward sweep's hidden [T, K, I] is each slot's silu(gate) * up, and holds no autograd
    graph (it is kept for the whole layer's calls; only its gradient hook sees the graph)."""
    layer = moe_layer_from_view(make_view(seed=4))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    call = eager_moe(layer, x, keep_hidden=True)
    assert call.output.requires_grad
    assert not call.hidden.requires_grad and call.hidden.grad_fn is None
    p, I = params(layer), layer.experts.hidden_dim
    for t in range(5):
        for k in range(call.routing.indices.shape[1]):
            W = p["experts.gate_up_proj"][int(call.routing.indices[t, k])]
            expected = silu(W[:I] @ x[t].detach()) * (W[I:] @ x[t].detach())
            torch.testing.assert_close(call.hidden[t, k], expected, rtol=1e-12, atol=1e-12)


def test_easy_ep_importance_is_never_negative_when_float32_rounds_cos_above_one():
    """max(0, 1 - cos): a routed output tiny beside the residual turns it by less than float32
    resolves, and cos(h, h + y) rounds to just above 1 for some tokens; those add 0, not a
    negative importance. One expert per token, so each token is its own cell."""
    T, D = 64, 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=g) * 1e5
    y = torch.randn(T, 1, D, generator=g)
    cos = torch.nn.functional.cosine_similarity(h, h + y[:, 0], dim=-1)
    assert (cos > 1).any(), "the case needs tokens whose cos rounds above 1"
    routing = Routing(torch.arange(T)[:, None], torch.ones(T, 1), torch.zeros(T, T), torch.zeros(T, T))
    call = MoECall(torch.zeros(T, D), routing, y, None, None)
    observer = ContributionObserver(T, 1, D, {})
    zeros = torch.zeros(T, dtype=torch.int64)
    observer.update(call, Tokens(zeros, zeros, torch.arange(T)), h + y[:, 0])
    sums = observer.result()["easyep_sums"][0, 0]
    assert (sums >= 0).all(), sums.min()
    assert not sums[cos > 1].any()


# ----------------------------------------------------------------------------- stats.py


def test_a_source_list_selects_those_sources_and_an_unknown_one_is_refused():
    """sources=None is every source; an empty list none (zeros, not everything); an unknown
    source is named in the error."""
    stats = hand_stats()
    assert stats.total("counts", []).tolist() == [0, 0, 0, 0] and stats.token_total([]) == 0
    assert stats.total("counts").tolist() == [11, 0, 20, 25] and stats.token_total() == 28
    with pytest.raises(ValueError, match=r"\['poetry'\] are not in these statistics"):
        stats.total("counts", ["math", "poetry"])
    with pytest.raises(ValueError, match="have no 'easyep_sums'"):
        hand_stats(easyep_sums=None).total("easyep_sums")


def _checkpoint_file(path, tensors: dict[str, int]) -> None:
    """A safetensors file of float32 tensors named and sized (in bytes) by `tensors`, values 0..n."""
    save_file({n: torch.arange(size // 4, dtype=torch.float32) for n, size in tensors.items()}, path)


def _flip(path, name: str, at: float) -> None:
    """Change the byte at fraction `at` of tensor `name`'s data in the safetensors file `path`."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_len])[name]["data_offsets"]
    data[8 + header_len + begin + int((end - begin - 1) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tensors,name,at,changes",
    [
        # two samples of 64 bytes: the first and the last 64 bytes of the data
        ({"model.experts.weight": 4096}, "model.experts.weight", 1.0, True),  # the very last byte
        ({"model.experts.weight": 4096}, "model.experts.weight", 0.0, True),
        ({"model.experts.weight": 4096}, "model.experts.weight", 0.5, False),  # not sampled, not small
        # routing tensors are read whole, whatever their size
        ({"model.layers.0.mlp.gate.weight": 4096}, "model.layers.0.mlp.gate.weight", 0.5, True),
        ({"model.layers.0.mlp.router.weight": 4096}, "model.layers.0.mlp.router.weight", 0.5, True),
        ({"mlp.gate.e_score_correction_bias": 4096}, "mlp.gate.e_score_correction_bias", 0.5, True),
        ({"mlp.shared_expert_gate.weight": 4096}, "mlp.shared_expert_gate.weight", 0.5, True),
        ({"mlp.experts.0.gate_proj.weight": 4096}, "mlp.experts.0.gate_proj.weight", 0.5, False),
        ({"a.weight": 4096, "m.gate.weight": 4096, "z.weight": 4096}, "m.gate.weight", 1.0, True),  # its end
        # a tensor of exactly sample_bytes between two big ones is read whole; one byte more is not
        ({"a.weight": 4096, "m.norm.weight": 64, "z.weight": 4096}, "m.norm.weight", 0.5, True),
        ({"a.weight": 4096, "m.norm.weight": 68, "z.weight": 4096}, "m.norm.weight", 0.5, False),
    ],
)
def test_fingerprint_reads_the_samples_the_routers_and_the_small_tensors(tmp_path, tensors, name, at, changes):
    """fingerprint(samples=2, sample_bytes=64) on one safetensors file: which single-byte edits
    of the data it sees."""
    (tmp_path / "config.json").write_text("{}")
    file = tmp_path / "model.safetensors"
    _checkpoint_file(file, tensors)
    before = fingerprint(tmp_path, samples=2, sample_bytes=64)
    assert before.startswith("2:")
    _flip(file, name, at)
    assert (fingerprint(tmp_path, samples=2, sample_bytes=64) != before) == changes


def _calibration_dir(tmp_path, **info):
    """A finished statistics directory of layer 3 (the hand-made statistics, with a transposed,
    so non-contiguous, logit Gram matrix) and its info."""
    stats = dataclasses.replace(hand_stats(), layer=3, logit_gram=torch.arange(64, dtype=F64).view(2, 2, 4, 4).mT)
    assert not stats.logit_gram.is_contiguous()
    info = {
        "complete": True,
        "moe_layers": [3],
        "model": {"path": str(tmp_path / "model"), "fingerprint": "2:abc"},
        "mixture": {"spec": "corpus:code,corpus:math", "digest": "d1", "sources": [{"domain": s} for s in SOURCES]},
        "settings": {"observers": ["routing"], "tokens": 64, "seq_len": 16},
        "stats_version": STATS_VERSION,
        **info,
    }
    write_info(tmp_path, {k: v for k, v in info.items() if v is not None})
    write_layer(tmp_path, stats)
    return stats


def test_a_calibration_directory_round_trips_and_checks_its_model_and_data(tmp_path):
    """write_info/write_layer then Calibration: every tensor back, a missing layer named, and the
    model and mixture checks (same path with other weights, another path, other data)."""
    written = _calibration_dir(tmp_path)
    stats = Calibration(tmp_path)
    assert stats.layers == [3] and stats.sources == list(SOURCES) and read_info(tmp_path)["format"] == FORMAT
    layer = stats.layer(3)
    assert layer.layer == 3 and layer.sources == SOURCES
    for name, value in written.tensors().items():
        assert torch.equal(getattr(layer, name), value), name
    with pytest.raises(ValueError, match=r"no statistics for layer 2; it has \[3\]"):
        stats.layer(2)
    stats.check_model("2:abc", tmp_path / "model")
    stats.check_mixture("d1", "corpus:code,corpus:math")
    with pytest.raises(ValueError, match="before its weights changed"):
        stats.check_model("2:def", tmp_path / "model")
    with pytest.raises(ValueError, match="not on .*other.*fingerprints differ"):
        stats.check_model("2:def", tmp_path / "other")
    with pytest.raises(ValueError, match="not on 'corpus'"):
        stats.check_mixture("d2", "corpus")


def test_a_layer_file_with_statistics_of_a_later_moelab_still_reads(tmp_path):
    """Tensors LayerStats does not know (another moelab's observers) are left out, not refused."""
    _calibration_dir(tmp_path)
    file = layer_file(tmp_path, 3)
    save_file({**load_file(file), "future_sums": torch.ones(2, 2, 4)}, file)
    assert torch.equal(Calibration(tmp_path).layer(3).counts, hand_stats().counts)
    assert layer_stats(3, SOURCES, {**hand_stats().tensors(), "future_sums": torch.ones(1)}).layer == 3


def test_a_hash_layer_s_token_ids_stored_as_input_ids_read_as_router_inputs(tmp_path):
    """Statistics files of moelab before ZAYA store a hash-routed layer's sampled token ids as "input_ids":
    read as router_inputs, the router's per-token input (now also ZAYA's router states, floats)."""
    _calibration_dir(tmp_path)
    file, ids = layer_file(tmp_path, 3), torch.arange(6)
    sampled = {"inputs": torch.zeros(6, 8), "input_sources": torch.zeros(6, dtype=torch.int64)}  # one id per input
    save_file({**load_file(file), **sampled, "input_ids": ids}, file)
    assert torch.equal(Calibration(tmp_path).layer(3).router_inputs, ids)


def test_easy_ep_sums_of_statistics_before_version_2_are_not_read(tmp_path):
    """They took the residual stream as the layer's output minus the block's, wrong where a layer
    scales or norms the block's output (nothing in the files says which layers): dropped, and
    easy_ep's refusal says to calibrate again."""
    written = _calibration_dir(tmp_path, stats_version=None)
    assert written.easyep_sums is not None
    layer = Calibration(tmp_path).layer(3)
    assert layer.easyep_sums is None and torch.equal(layer.counts, written.counts)
    with pytest.raises(ValueError, match="before statistics version 2.*calibrate again"):
        layer.total("easyep_sums")


def test_layers_without_a_statistic_are_read_from_the_headers_as_layer_reads_them(tmp_path):
    """Current statistics: the layers whose file lacks it; before version 2, every layer for
    EASY-EP's sums (which `layer` drops), the files for the others."""
    written = _calibration_dir(tmp_path)
    assert Calibration(tmp_path).layers_without("easyep_sums") == []
    write_layer(tmp_path, dataclasses.replace(written, easyep_sums=None))
    assert Calibration(tmp_path).layers_without("easyep_sums") == [3]
    _calibration_dir(tmp_path, stats_version=None)
    old = Calibration(tmp_path)
    assert old.layers_without("easyep_sums") == [3] and old.layer(3).easyep_sums is None
    assert old.layers_without("counts") == []


def test_a_layer_file_with_the_whole_data_logit_gram_still_reads(tmp_path):
    """Statistics files of moelab before stats_version 2 store the logit Gram of all the data [E, E]:
    read as whole_logit_gram, M-SMoE's similarity on all the sources, refused restricted to some."""
    written = _calibration_dir(tmp_path)
    file, whole = layer_file(tmp_path, 3), written.logit_gram.sum((0, 1))
    save_file({**load_file(file), "logit_gram": whole}, file)
    layer = Calibration(tmp_path).layer(3)
    assert layer.logit_gram is None and torch.equal(layer.gram(), whole)
    assert torch.equal(layer.restricted(list(reversed(SOURCES))).gram(), whole)
    with pytest.raises(ValueError, match="over all the calibration data only.*calibrate again"):
        layer.restricted(SOURCES[:1]).gram()
    assert torch.equal(written.restricted(SOURCES[1:]).gram((1,)), written.logit_gram[1, 1])


@pytest.mark.parametrize(
    "text,message,ours",
    [
        (None, "holds no calibration statistics", False),
        ("{not json", "is not valid JSON", False),
        ('["moelab-calibration/1"]', "is not a moelab-calibration/1 file", False),
        ('{"format": "moelab-calibration/0", "complete": true}', "is not a moelab-calibration/1 file", False),
        ('{"format": "moelab-calibration/1"}', "did not finish", True),
        ('{"format": "moelab-calibration/1", "complete": false}', "did not finish", True),
    ],
)
def test_a_directory_that_is_not_finished_statistics_is_refused(tmp_path, text, message, ours):
    """Calibration refuses it; read_info (resuming) reads only a calibration.json of this format."""
    if text is not None:
        (tmp_path / INFO_NAME).write_text(text)
    with pytest.raises(ValueError, match=message):
        Calibration(tmp_path)
    assert (read_info(tmp_path) is not None) == ours


def test_statistics_fingerprinted_by_another_version_cannot_be_compared(tmp_path):
    """Even an equal hash: a version-1 fingerprint is another function's value."""
    _calibration_dir(tmp_path, model={"path": str(tmp_path), "fingerprint": "1:abc"})
    with pytest.raises(ValueError, match="another moelab version"):
        Calibration(tmp_path).check_model("1:abc", tmp_path)


# the module whose input is the residual stream h entering the MoE block, the block, the config's
# changes, and m where the layer adds m x the block's output (None: it norms the output first)
RESIDUAL_BEFORE_MOE = {
    "olmoe": ("post_attention_layernorm", "mlp", {}, 1.0),  # h + block(norm(h))
    "granitemoe": ("post_attention_layernorm", "block_sparse_moe", {"residual_multiplier": 0.25}, 0.25),  # h + m block
    "afmoe": ("pre_mlp_layernorm", "mlp", {}, None),  # h + post_mlp_layernorm(block(...))
    "kolibri1": ("post_attention_layernorm", "mlp", {}, None),  # the same (sandwich norms)
}


def test_compress_easy_ep_stops_calibrating_at_the_first_layer_it_cannot_read(tmp_path):
    """AFMoE norms the block's output before adding it: compress with easy_ep stops its calibration
    at the first MoE layer, saying why, instead of calibrating every layer and then refusing; the
    layers done stay for a later run into the same output (another method) to resume: moelab's
    recipe, which leaves EASY-EP out of its candidates where its statistic is missing, is not stopped."""
    from moelab.compress import compress

    path = tmp_path / "model"
    build("afmoe", vocab_size=8192).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"layer 1: calibration stopped here, where it could not read 'easyep_sums'.*norm"):
        compress(path, out, method="easy_ep", calib_options=SMALL, quiet=True)
    [staging] = tmp_path.glob(".out.moelab-staging*")
    info = json.loads((staging / "moelab_calibration" / "calibration.json").read_text())
    assert info["moe_layers"][0] == 1 and not info["complete"] and info["done"] < len(info["moe_layers"])
    recipe = {"strategy": "experts", "fit_steps": 0}
    report = compress(path, out, method="moelab", ratio=0.5, calib_options=SMALL, method_options=recipe, quiet=True)
    assert report["complete"]


@pytest.mark.parametrize("family", list(RESIDUAL_BEFORE_MOE))
def test_easy_ep_importance_of_a_calibration_uses_the_residual_entering_the_block(tmp_path, family):
    """End to end on a tiny transformers checkpoint: calibration's easyep_sums equal EASY-EP's
    definition, sum of w ||f|| max(0, 1 - cos(h, h + m y_routed)) over each expert's routed tokens,
    with h read where transformers' decoder layer computes it (the input of the norm before the
    MoE block) and m what the layer scales the block's output by; where the layer norms the
    block's output before adding it, no statistic (the output minus the block's is not h: the
    sums came out 28-43 % off when it was taken for h)."""
    norm_name, block_name, overrides, m = RESIDUAL_BEFORE_MOE[family]
    path = tmp_path / "model"
    build(family, vocab_size=8192, **overrides).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    options = dataclasses.replace(SMALL, tokens=128, dtype="float64")
    got = calibrate(path, tmp_path / "stats", options=options, quiet=True).layer(1).easyep_sums
    if m is None:
        assert got is None
        return
    mixture = calibration_mixture(path, "corpus", options)
    model = load(path, dtype=torch.float64)
    with open_checkpoint(path) as checkpoint:
        moe = moe_layer_from_view(checkpoint.layer(1)).double()
    layer, seen = model.model.layers[1], {}
    getattr(layer, norm_name).register_forward_pre_hook(lambda module, args: seen.__setitem__("h", args[0]))
    getattr(layer, block_name).register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    expected = torch.zeros_like(got)
    with torch.no_grad():
        for w in mixture.windows:
            model(w.ids[None])
            h, x = seen["h"][0], seen["x"][0]
            call = eager_moe(moe, x)
            turn = 1 - torch.nn.functional.cosine_similarity(h, h + m * call.routed, dim=-1)
            weight = call.contributions.norm(dim=-1) * turn.clamp(min=0)[:, None]
            expected[w.half, w.source] += per_expert(call.routing, weight, moe.num_experts).sum(0)
    assert float(expected.sum()) > 0
    # rtol: moelab's routers compute their weights in float32 in a float64 model, transformers' do not
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)


def test_block_residuals_finds_the_input_of_the_module_that_made_the_blocks_input():
    """The norm's input for its output or a view of it; None for a tensor no module made (or
    made by a module whose input has another shape), and for one whose call was forgotten."""
    norm, widen = torch.nn.LayerNorm(4), torch.nn.Linear(3, 4)
    h = torch.randn(2, 5, 4)
    with block_residuals(4) as residual:
        x = norm(h)
        assert residual(x.view(-1, 4)) is not None and torch.equal(residual(norm(h)), h)
        assert residual(x) is None  # forgotten by the lookup before
        assert residual(widen(torch.randn(2, 3))) is None  # [.., 3] -> [.., 4]: not a norm
        assert residual(h * 2) is None
    assert residual(norm(h)) is None  # closed: the hook is gone


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_added_scale_reads_m_up_to_rounding_and_refuses_a_normed_output(dtype):
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(64, 16, generator=g).to(dtype), torch.randn(64, 16, generator=g).to(dtype) * 0.3
    for m in (1.0, 0.25):
        total = h + m * y  # rounded to dtype
        got = added_scale(total.double() - h.double(), y.double(), total)
        assert got == pytest.approx(m, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
    normed = h + torch.nn.functional.rms_norm(y, (16,))
    assert added_scale(normed.double() - h.double(), y.double(), normed) is None


@pytest.mark.parametrize("residual_from_norm", [False, True])
def test_easy_ep_of_a_moelab_checkpoint_reads_the_stream_its_block_adds_to(tmp_path, monkeypatch, residual_from_norm):
    """moelab's block adds the MoE output to x (its norm's input) or, with residual_from_norm (the
    Chain-of-Experts reference block), to norm(x), the block's input: both are a residual stream
    plus the block's output, for which the layer's output minus the block's is exact. The statistic
    read with the residual found by the calibration's hook equals that one; the norm's input taken
    for h in a residual_from_norm layer fitted no m and the statistic was dropped."""
    model = moelab_model(tmp_path / "m", residual_from_norm=residual_from_norm)
    options = dataclasses.replace(SMALL, tokens=128, dtype="float64")
    found = calibrate(model, tmp_path / "found", options=options, quiet=True)

    @contextlib.contextmanager
    def not_found(dim):
        yield lambda x: None

    monkeypatch.setattr("moelab.compress.calibration.block_residuals", not_found)
    inferred = calibrate(model, tmp_path / "inferred", options=options, quiet=True)
    for i in found.info["moe_layers"]:
        got, expected = found.layer(i).easyep_sums, inferred.layer(i).easyep_sums
        assert got is not None and float(expected.sum()) > 0
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_statistic_one_process_could_not_record_is_dropped_by_every_process(monkeypatch):
    """EASY-EP's sums depend on a process's data (`added_scale`): where one process kept none, the
    others drop theirs before the sums, which would otherwise pair different statistics."""
    import torch.distributed as dist

    import moelab.compress.distributed as distributed

    summed = []
    monkeypatch.setattr(dist, "all_reduce", lambda value, op=None: summed.append(value))
    for everywhere in (True, False):
        summed.clear()
        monkeypatch.setattr(distributed, "agreed", lambda value, world, how: value and everywhere)
        results = {"counts": torch.ones(3), "easyep_sums": torch.ones(3)}
        distributed.reduce_statistics(results, world=2)
        assert ("easyep_sums" in results) is everywhere and len(summed) == len(results)


@pytest.mark.parametrize("cuda, backend", [(False, "gloo"), (True, "cpu:gloo,cuda:nccl")])
def test_a_torchrun_calibration_sums_its_statistics_over_gloo(monkeypatch, cuda, backend):
    """The statistics are CPU tensors, which plain NCCL refuses: on CUDA the group joined has gloo
    for them beside NCCL."""
    import torch.distributed as dist

    import moelab.compress.distributed as distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert distributed.join_torchrun() == (1, 2) and joined == [backend]
