"""DeepSeek-V4's hash-routed layers ("hash_moe": experts fixed per token id by the table tid2eid,
weighted by the learned gate's sqrt(softplus) scores), end to end against transformers: the view,
what pruning and merging do to the table (`remapped_token_experts`), the written checkpoint,
layer-by-layer and offloaded runs, tracing and every compression method. The learned layers go
through every family-wide test (tests/hf_tiny.py's TINY["deepseek_v4"])."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from hf_tiny import D, build, load
from safetensors.torch import load_file, save_file
from test_compress import EVERY, SMALL, hf_model
from test_layerwise import assert_layers_are_transformers

from moelab.compress import METHODS, calibrate, compress
from moelab.compress.run import check_compression
from moelab.hf import CheckpointError, LayerEdit, open_checkpoint, write_checkpoint
from moelab.hf.edit import apply_edit, moe_output, remapped_token_experts
from moelab.hf.native import moe_layer_from_view
from moelab.hf.view import RouterView
from moelab.offload import load_offloaded
from moelab.offload.model import (
    _deepseek_v4_bytes,
    _deepseek_v4_sequence_bytes,
    kv_bytes_per_token,
    kv_cache_room,
)
from moelab.trace import RoutingCapture

pytestmark = pytest.mark.usefixtures("one_thread")
HASH = {"mlp_layer_types": ["hash_moe", "moe"]}  # layer 0 hash-routed, layer 1 routed by its gate


def _hash_model(path, **overrides):
    model = build("deepseek_v4", **(HASH | overrides))
    model.save_pretrained(path)
    return model


def _as_released(path) -> None:
    """Store the checkpoint at `path` as DeepSeek's release does: no "model." prefix, the embedding,
    final norm and head's hyper-connection under their release names, the table in int32."""
    tensors = load_file(path / "model.safetensors")
    renamed = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    renamed |= {f"model.hc_head.hc_{p}": f"hc_head_{p}" for p in ("base", "fn", "scale")}
    out = {}
    for key, t in tensors.items():
        out[renamed.get(key, key.removeprefix("model."))] = t.int() if key.endswith("tid2eid") else t
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})


def _block(model, index, x, ids):
    with torch.no_grad():
        return model.model.layers[index].mlp(x, input_ids=ids)


@pytest.mark.parametrize("stored", ["original", "fused", "release"])
def test_hash_and_learned_layers_match_transformers(tmp_path, stored):
    """Each layer's view computes transformers' block on the same tokens, at unit scale and where
    the clamps bite (x20), whichever way the checkpoint is stored."""
    model = build("deepseek_v4", **HASH)
    model.save_pretrained(tmp_path, save_original_format=stored != "fused")
    if stored == "release":
        _as_released(tmp_path)
        with torch.no_grad():  # transformers reads the release's names
            torch.testing.assert_close(load(tmp_path)(torch.arange(9)[None]).logits, model(torch.arange(9)[None]).logits)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 7))
    with open_checkpoint(tmp_path) as view:
        assert view.family == "deepseek_v4"
        hash_layer, learned = view.layer(0), view.layer(1)
        assert hash_layer.router.hash_routed and not learned.router.hash_routed
        assert hash_layer.router.score_func == "sqrtsoftplus" and learned.router.selection_bias is not None
        assert hash_layer.router.token_experts.dtype == (torch.int32 if stored == "release" else torch.int64)
        for layer in (hash_layer, learned):
            for scale in (1.0, 20.0):
                x = torch.randn(2, 7, D) * scale
                expected = _block(model, layer.index, x, ids)
                got = moe_output(layer, x.reshape(-1, D), ids=ids.reshape(-1)).float().view_as(x)
                torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)
                with torch.no_grad():
                    native, _ = moe_layer_from_view(layer)(x, context={"input_ids": ids})
                torch.testing.assert_close(native, expected, atol=1e-5 * scale, rtol=1e-5)


def _router(table, weight) -> RouterView:
    return RouterView(weight=weight, score_func="sqrtsoftplus", top_k=2, renormalize=True,
                      token_experts=torch.tensor(table))  # fmt: skip


def test_a_dropped_experts_slots_go_to_the_nearest_kept_expert_not_already_in_the_row():
    """Worked example: router rows of experts 0-3 point along e0, e0 + 0.1 e1, e1, -e0. Dropping
    expert 1 sends its slots to expert 0 (nearest), or where the token already has 0, to expert 2;
    dropping 3 sends its slot to 2 (cosine 0 beats -1 for 0)."""
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    router = _router([[1, 2], [0, 1], [3, 1], [2, 3]], weight)
    keep = (0, 2)
    table = remapped_token_experts(router, tuple((e,) for e in keep), weight[list(keep)])
    assert table.tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]  # new ids: 0 is expert 0, 1 is expert 2
    edited = apply_edit(dataclasses_view(router), LayerEdit.keep(keep))
    assert edited.router.token_experts.tolist() == table.tolist()


def test_a_merge_sends_its_members_slots_to_the_merged_expert():
    """Experts 0 and 1 merged into new expert 0, 2 kept as new 1, 3 dropped: a token that had 0 and 1
    visits the merged expert twice (each slot with its own weight); 3's slot goes to the nearest new
    row not in the token's row."""
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    router = _router([[0, 1], [3, 2], [1, 3]], weight)
    new_weight = torch.tensor([[1.0, 0.05], [0.0, 1.0]])
    table = remapped_token_experts(router, ((0, 1), (2,)), new_weight)
    assert table.tolist() == [[0, 0], [0, 1], [0, 1]]


def dataclasses_view(router: RouterView):
    """A one-layer view around `router`: experts of width 1 over the router's dim."""
    from moelab.hf.view import ExpertsView, MoELayerView

    E, dim = router.weight.shape
    experts = ExpertsView(gate=torch.ones(E, 1, dim), up=torch.ones(E, 1, dim), down=torch.ones(E, dim, 1))
    return MoELayerView(0, router, experts)


def test_a_pruned_hash_layer_is_what_transformers_computes_from_the_written_table(tmp_path):
    """Half the experts of both layers dropped: transformers' blocks of the written checkpoint (loaded
    strictly) compute the masked original, whose hash table names the kept experts standing in for
    the dropped ones; every row keeps two distinct experts."""
    model = _hash_model(tmp_path / "src")
    keep = {0: [1, 2, 5, 6], 1: [0, 3, 4, 7]}
    write_checkpoint(tmp_path / "src", tmp_path / "out", {i: LayerEdit.keep(k) for i, k in keep.items()}, quiet=True)
    written = load(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_routed_experts"] == 4
    table = written.model.layers[0].mlp.gate.tid2eid
    assert table.max() < 4 and (table[:, 0] != table[:, 1]).all()
    ids = torch.randint(0, 64, (2, 9))
    x = torch.randn(2, 9, D)
    with open_checkpoint(tmp_path / "src") as view:
        for index, kept in keep.items():
            expected = moe_output(view.layer(index), x.reshape(-1, D), keep=kept, ids=ids.reshape(-1))
            got = _block(written, index, x, ids).reshape(-1, D)
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    del model


def test_the_releases_multi_token_prediction_module_is_left_out_of_a_pruned_checkpoint(tmp_path):
    """DeepSeek's release stores its MTP module as mtp.0.* (transformers skips it): its routed experts
    would keep the old count, so compress asks for --mtp drop and the writer leaves all of mtp. out."""
    _hash_model(tmp_path / "src")
    _as_released(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    mtp = {k.replace("layers.1.", "mtp.0.", 1): v.clone() for k, v in tensors.items() if k.startswith("layers.1.")}
    mtp["mtp.0.e_proj.weight"] = torch.randn(D, D)
    save_file(tensors | mtp, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    with pytest.raises(ValueError, match=r"\(mtp.\) that moelab cannot calibrate.*--mtp drop"):
        check_compression(tmp_path / "src", "reap", 0.5)
    with pytest.warns(UserWarning, match=r"stored layers mtp. .* left out"):
        write_checkpoint(tmp_path / "src", tmp_path / "out", {i: LayerEdit.keep(range(4)) for i in (0, 1)}, quiet=True)
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not [k for k in written if k.startswith("mtp.")] and "layers.1.ffn.gate.weight" in written
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_config_and_checkpoint_must_agree_on_the_hash_layers(tmp_path):
    _hash_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for kinds, match in ((["moe", "moe"], "makes layer 0 routed by its gate, but the checkpoint has a token table"),
                         (["hash_moe", "hash_moe"], "makes layer 1 hash-routed, but the checkpoint has no token table")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps(config | {"mlp_layer_types": kinds}))
        with open_checkpoint(tmp_path) as view, pytest.raises(CheckpointError, match=match):
            view.check()


def test_hash_layers_run_layer_by_layer_offloaded_and_traced(tmp_path):
    """The layer-by-layer runner hands each hash layer its token ids (transformers' decoder layer's
    input_ids); offloaded decoding gives transformers' greedy tokens; a trace records the table's
    experts for each token, and recomputes them (with their weights) from the router's inputs."""
    model = _hash_model(tmp_path)
    batches = [torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (1, 5))]
    assert_layers_are_transformers(tmp_path, model, batches)
    prompt = torch.randint(3, 64, (1, 6))
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    offloaded = load_offloaded(tmp_path, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(prompt, 6), expected)
    finally:
        offloaded.close()
    loaded = load(tmp_path)
    ids = torch.randint(0, 64, (2, 8))
    with RoutingCapture(loaded) as capture, torch.no_grad():
        loaded(input_ids=ids, use_cache=False)
        recorded = capture.pop()
    assert torch.equal(recorded[0].indices, loaded.model.layers[0].mlp.gate.tid2eid[ids.reshape(-1)])
    check = capture.checks[0]  # the view's routing, recomputed from the block's input and ids, is what it used
    assert check.tokens == 16 and check.mismatched == 0 and check.max_weight_error < 1e-6


def test_offloading_reads_a_hash_layers_experts_ahead_from_the_token_ids(tmp_path):
    """A hash layer's experts follow from the token ids alone: read ahead at the decoder layer's entry,
    every one read is used and a decode step finds them all resident (a quarter of the experts kept,
    both layers hash-routed); the tokens are transformers'."""
    _hash_model(tmp_path, mlp_layer_types=["hash_moe", "hash_moe"], n_routed_experts=16)
    prompt = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = load(tmp_path).generate(prompt, max_new_tokens=12, do_sample=False)
    offloaded = load_offloaded(tmp_path, resident=0.25, predictor="lookahead", warm=False)
    try:
        assert torch.equal(offloaded.generate(prompt, 12), expected)
        prefetched, decode = offloaded.cache.prefetch_stats, offloaded.cache.stats[1]
    finally:
        offloaded.close()
    assert prefetched.issued > 0 and prefetched.used == prefetched.issued
    assert decode.requests == 11 * 2 * 2 and decode.hit_rate == 1.0


def test_reap_compresses_hash_and_learned_layers(tmp_path):
    """REAP through `compress` (calibration records each hash layer's token ids with its sampled
    inputs); the writer's checks pass (each layer against the masked original, strict reload)."""
    source = hf_model(tmp_path / "src", "deepseek_v4")
    config = json.loads((source / "config.json").read_text())
    _hash_model(source, vocab_size=8192)
    assert json.loads((source / "config.json").read_text())["mlp_layer_types"] != config["mlp_layer_types"]
    report = compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["complete"] and sorted(report["layers"]) == ["0", "1"]
    with open_checkpoint(tmp_path / "out") as view:
        assert view.layer(0).router.token_experts.max() < 4


@pytest.mark.slow
def test_every_method_on_hash_layers(tmp_path):
    """Each method on a checkpoint whose layer 0 is hash-routed; the methods that re-run the layer
    on its sampled inputs (NAEE, moelab's recipe, router re-calibration) route them by their ids."""
    source = hf_model(tmp_path / "src", "deepseek_v4")
    _hash_model(source, vocab_size=8192)
    stats = calibrate(source, tmp_path / "stats", options=EVERY, quiet=True)
    assert stats.layer(0).router_inputs is not None and stats.layer(1).router_inputs is None
    for method in sorted(METHODS):
        if method == "easy_ep":  # two residual streams (hyper-connections)
            continue
        domains = ["code"] if method == "premoe" else None
        report = compress(source, tmp_path / method, method=method, ratio=0.5, stats=stats.directory, domains=domains, quiet=True)
        assert report["complete"], method


def test_a_scoring_func_transformers_does_not_score_with_is_refused(tmp_path):
    """transformers scores DeepSeek-V4's routers with ACT2FN[scoring_func], which has no "softmax":
    such a config builds no model there, so moelab must not read it as a softmax router."""
    _hash_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"scoring_func": "sigmoid"}))
    with open_checkpoint(tmp_path) as view:
        assert view.layer(0).router.score_func == view.layer(1).router.score_func == "sigmoid"
    (tmp_path / "config.json").write_text(json.dumps(config | {"scoring_func": "softmax"}))
    with open_checkpoint(tmp_path) as view, pytest.raises(CheckpointError, match="scoring_func='softmax'"):
        view.layer(1)


def test_a_token_table_must_cover_the_vocabulary(tmp_path):
    """transformers' tid2eid holds one row per token id (vocab_size rows): a table of another length
    does not load there, and token ids past its end have no experts."""
    _hash_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"vocab_size": 128}))
    with open_checkpoint(tmp_path) as view, pytest.raises(CheckpointError, match="64 rows.*vocab_size 128"):
        view.layer(0)


def _cache_bytes(cache) -> int:
    """Bytes of memory a DeepSeek-V4 cache keeps alive: the storage under each tensor it holds (a
    sliding window or a buffer kept as a view of a prompt-wide tensor keeps all of it), each once."""
    storages = {}
    for layer in cache.layers:
        states = [layer.keys, layer.values]
        for name in ("buffer_kv", "buffer_gate", "compressed_kv", "overlap_kv", "overlap_gate"):
            states += list(getattr(layer, name, {}).values())
        for t in states:
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("types", [None, ["sliding_attention", "compressed_sparse_attention"]])
def test_the_kv_estimate_holds_what_the_cache_keeps_at_every_step(tmp_path, dtype, types):
    """Per token, at most what transformers' cache keeps alive after any prompt (whole or in
    chunks, 2 sequences) and decoding step: right after the prompt its keys and compressor
    projections (views of prompt-wide tensors), later a window, buffers, the overlap state and the
    compressed entries. The bound is the most per token at any length, reached within 2 % here (a
    doubled count would fail). In bf16, as transformers loads it: the overlap's gate half is float32
    (the projection plus the float32 position_bias); a sliding layer caches a key and a value."""
    build("deepseek_v4", **({"layer_types": types} if types else {})).save_pretrained(tmp_path)
    model = load(tmp_path, dtype)
    per_token = kv_bytes_per_token(model, dtype)
    fractions = []
    with torch.no_grad():
        for chunks in ((1,), (2,), (3,), (4,), (5,), (8,), (9,), (16,), (3, 3), (2, 2, 1), (5, 3, 1)):
            cache, length = None, 0
            for chunk in chunks:
                cache = model(torch.randint(3, 64, (2, chunk)), use_cache=True, past_key_values=cache).past_key_values
                length += chunk
                fractions.append(_cache_bytes(cache) / (per_token * 2 * length))
            for step in range(1, 10):
                model(torch.randint(3, 64, (2, 1)), use_cache=True, past_key_values=cache)
                fractions.append(_cache_bytes(cache) / (per_token * 2 * (length + step)))
    assert 0.98 < max(fractions) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("types", [None, pytest.param(["sliding_attention", "compressed_sparse_attention"], marks=pytest.mark.slow)])
def test_the_prompt_aware_kv_room_holds_what_the_cache_keeps_at_every_step(tmp_path, dtype, types):
    """Given the prompt's length (kv_cache_prompt_tokens), the room for P prompt positions then
    decoding to T (1 and 2 sequences, 64 steps: past 8 sliding windows of 8 and 16 / 8 compressor
    windows of 4 / 8) is at least what transformers' cache keeps alive after the prompt and every
    step (`kv_cache_room`, step=False: between steps), within 6 % of the most it keeps over a long
    decode (exact for most prompts), and with one step's new window, buffers, overlap and entry
    beside, over 4 times smaller than the per-token peak for every token after a short prompt."""
    build("deepseek_v4", **({"layer_types": types} if types else {})).save_pretrained(tmp_path)
    model = load(tmp_path, dtype)
    with torch.no_grad():
        for B in (1, 2):
            for P in (1, 3, 4, 9, 16):
                cache = model(torch.randint(3, 64, (B, P)), use_cache=True).past_key_values
                kept = [_cache_bytes(cache)]
                assert kept[0] <= kv_cache_room(model, dtype, B * P, B, P, step=False)
                for L in range(P + 1, P + 65):
                    model(torch.randint(3, 64, (B, 1)), use_cache=True, past_key_values=cache)
                    kept.append(_cache_bytes(cache))
                    assert kept[-1] <= kv_cache_room(model, dtype, B * L, B, P, step=False), (B, P, L)
                held = kv_cache_room(model, dtype, B * L, B, P, step=False)
                room, today = kv_cache_room(model, dtype, B * L, B, P), kv_cache_room(model, dtype, B * L, B)
                assert held <= 1.06 * max(kept) and held < room < 2 * held
                assert today == B * L * kv_bytes_per_token(model, dtype)  # without a prompt: the per-token peak
                if P <= 4:
                    assert today > 4 * room


def test_the_prompt_aware_room_at_v4_flash_sizes():
    """V4-Flash's sizes (head_dim 512, index_head_dim 128, sliding_window 128, rates 4 / 128), bf16
    (position_bias float32), a prompt of 100 then 32,768 positions: per sequence and layer, the
    per-token peak for every token is 64 MiB (sliding), 322 MiB (CSA) and 96.25 MiB (HCA); the room
    after the prompt 0.5, 10.3 and 1.0 MiB (128, 31 and 96 times less)."""
    config = SimpleNamespace(
        head_dim=512, index_head_dim=128, sliding_window=128,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    )  # fmt: skip
    wide = re.compile("position_bias")
    kinds = ("sliding_attention", *config.compress_rates)
    room = {t: _deepseek_v4_sequence_bytes(config, t, 2, wide, 100, 32768, 2 * 512) for t in kinds}
    today = {t: 32768 * _deepseek_v4_bytes(config, t, 2, wide) for t in config.compress_rates}
    today["sliding_attention"] = 32768 * 2 * 512 * 2
    assert {t: today[t] / 2**20 for t in today} == {
        "sliding_attention": 64, "compressed_sparse_attention": 322, "heavily_compressed_attention": 96.25
    }  # fmt: skip
    assert {t: round(today[t] / room[t]) for t in room} == {
        "sliding_attention": 128, "compressed_sparse_attention": 31, "heavily_compressed_attention": 96
    }  # fmt: skip


def test_an_offloaded_v4_keeps_room_for_its_prompt_and_refuses_calls_past_it(tmp_path):
    """load_offloaded(kv_cache_prompt_tokens=P): the budget keeps the prompt-aware room (more experts
    fit than with the per-token peak), decoding fits, and a call with a longer prompt, more sequences
    or more positions per sequence is refused naming the option; P is checked as it loads."""
    build("deepseek_v4").save_pretrained(tmp_path)
    budget = 10**9
    plain = load_offloaded(tmp_path, memory_budget=budget, kv_cache_tokens=2 * 40, kv_cache_sequences=2)
    aware = load_offloaded(
        tmp_path, memory_budget=budget, kv_cache_tokens=2 * 40, kv_cache_sequences=2, kv_cache_prompt_tokens=4
    )  # fmt: skip
    try:
        assert aware.kv_cache_prompt_tokens == 4 and plain.kv_cache_prompt_tokens is None
        room = kv_cache_room(aware.model, torch.float32, 80, 2, 4)
        assert room < kv_cache_room(aware.model, torch.float32, 80, 2) // 2
        ids = torch.randint(3, 64, (2, 4))
        assert aware.generate(ids, 36).shape == (2, 40)
        with pytest.raises(ValueError, match=r"prompt has 5 positions .* load with kv_cache_prompt_tokens >= 5"):
            aware.generate(torch.randint(3, 64, (2, 5)), 10)
        with pytest.raises(ValueError, match=r"decodes 3 sequences but .* load with kv_cache_sequences >= 3"):
            aware.generate(torch.randint(3, 64, (3, 4)), 10)
        with pytest.raises(ValueError, match=r"holds 41 positions per sequence .* 40: load with kv_cache_tokens >= 82"):
            aware.generate(torch.randint(3, 64, (1, 4)), 37)  # one sequence: within 80 tokens, past 40 positions
        assert plain.generate(torch.randint(3, 64, (1, 4)), 37).shape == (1, 41)  # without P: tokens only
    finally:
        aware.close()
        plain.close()
    for bad in (0, 41, 2.0, True):
        with pytest.raises(ValueError, match=r"kv_cache_prompt_tokens counts a prompt's positions: .* = 40\), got"):
            load_offloaded(
                tmp_path, memory_budget=budget, kv_cache_tokens=80, kv_cache_sequences=2, kv_cache_prompt_tokens=bad
            )  # fmt: skip
    with pytest.raises(ValueError, match="kv_cache_prompt_tokens sizes the room kv_cache_tokens keeps"):
        load_offloaded(tmp_path, memory_budget=budget, kv_cache_prompt_tokens=4)
