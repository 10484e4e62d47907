"""moelab.offload: decoding with the routed experts read from the checkpoint into a cache of slots.

The reference is the model held in memory: offloaded decoding must produce its logits and tokens
at every cache size, eviction policy and predictor, for moelab's own models and transformers'
families. The cache's bookkeeping is checked on worked examples (LRU order, the reuse-distance
victim, hit/miss/prefetch counts) and by a property test (every slot handed out holds the expert
asked for, pinned slots survive, the pool never exceeds its size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hf_tiny import TINY, build, load
from hypothesis import given, settings
from hypothesis import strategies as st
from quantized_tiny import fp8_release
from safetensors.torch import load_file, save_file
from test_model import Recorder
from test_mxfp4 import _mxfp4
from transformers import AutoModelForCausalLM

from moelab.hf.checkpoint import CheckpointError
from moelab.hf.native import copy_expert, empty_experts
from moelab.models import MoETransformer, save_pretrained, tiny
from moelab.models.transformer import KVCache, Sampling, decode_cache_length
from moelab.offload import ExpertCache, ExpertStore, OffloadedExperts, RoutingPrior, load_offloaded
from moelab.offload.cache import RECENCY_DECAY, CacheStats
from moelab.offload.model import (
    generate_ids,
    kv_bytes_per_token,
    resident_slots,
    state_bytes_per_sequence,
    warm_start,
)
from moelab.offload.predict import _Counter, lookahead_scores
from moelab.trace import TraceOptions, trace_model


def _native(tmp_path, *, shared: int = 0, bias_free: bool = True, **moe):
    """A 3-layer moelab model, every layer MoE (4 experts, top-2; `moe`: other MoEConfig fields),
    saved to tmp_path / "m"."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        tiny(), n_layers=3, first_k_dense=0, moe=dataclasses.replace(tiny().moe, num_shared=shared, **moe)
    )
    model = MoETransformer(cfg).eval()
    save_pretrained(model, tmp_path / "m")
    return model, tmp_path / "m"


def _prior(model, vocab: int) -> RoutingPrior:
    torch.manual_seed(1)
    return RoutingPrior.measure(model, [torch.randint(0, vocab, (4, 32))])


# ----------------------------------------------------------------------------- equal to in memory


@pytest.mark.parametrize("resident", [0.17, 0.5, 1.0])
@pytest.mark.parametrize(
    "eviction,predictor", [("lru", None), ("reuse", None), ("reuse", "affinity"), ("reuse", "lookahead"), ("lru", "both"), ("reuse", "both")]
)  # fmt: skip
def test_offloaded_decoding_equals_the_model_in_memory(tmp_path, resident, eviction, predictor, one_thread):
    model, path = _native(tmp_path, shared=1)
    prior = _prior(model, model.config.vocab_size)
    offloaded = load_offloaded(path, resident=resident, eviction=eviction, predictor=predictor, prior=prior)
    try:
        ids = torch.randint(0, model.config.vocab_size, (2, 5))
        with torch.inference_mode():
            torch.testing.assert_close(offloaded.model.decode_step(ids), model.decode_step(ids), atol=1e-5, rtol=1e-5)
        assert torch.equal(offloaded.generate(ids[:1], 12), generate_ids(model, ids[:1], 12))
        stats = offloaded.cache.total()
        assert stats.requests == stats.hits + stats.late + stats.misses > 0
        if resident == 1.0:  # the warm start loads every expert: nothing to read or read ahead
            assert stats.misses == 0 and offloaded.cache.prefetch_stats.issued == 0
            assert all(offloaded.cache.holds_all(layer) for layer in range(3))
        elif predictor is not None and offloaded.cache.slots > 2:  # 2 slots: one token's experts, no room ahead
            assert offloaded.cache.prefetch_stats.issued > 0
    finally:
        offloaded.close()


@pytest.mark.parametrize(
    "predictor,fault", [(None, KeyboardInterrupt), (None, OSError), ("lookahead", OSError)]
)  # fmt: skip
def test_an_expert_read_that_fails_or_is_interrupted_leaves_nothing_wrong_behind(
    tmp_path, monkeypatch, predictor, fault, one_thread
):  # fmt: skip
    """A read on demand fails part-way (Ctrl-C, EIO), or every read-ahead on the background
    thread does: a slot left half written holds no expert afterwards and nothing stays pinned, so
    the same model decodes the in-memory tokens when asked again (before: a slot marked as holding
    an expert kept other weights, or the pins blocked every later call at the smallest cache, and
    a failed read-ahead's error surfaced at the fetch, its expert still marked resident). An expert
    whose read-ahead failed is read again on demand."""
    model, path = _native(tmp_path)
    offloaded = load_offloaded(path, resident=0.17, predictor=predictor, warm=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    load, reads = ExpertStore.load, []

    def failing(self, layer, expert, pool, slot):
        background = threading.current_thread() is not threading.main_thread()
        reads.append(background)
        if background or (predictor is None and len(reads) == 5):
            pool.down_proj[slot].fill_(7.0)  # the slot half written: the weights it held are gone
            raise fault("the read failed")
        return load(self, layer, expert, pool, slot)

    try:
        monkeypatch.setattr(ExpertStore, "load", failing)
        if predictor is None:
            with pytest.raises(fault, match="the read failed"):
                offloaded.generate(ids, 8)
            assert not offloaded.cache._pinned
        else:
            assert torch.equal(offloaded.generate(ids, 8), generate_ids(model, ids, 8)) and any(reads)
        monkeypatch.setattr(ExpertStore, "load", load)
        pool = offloaded.cache.pool
        for (layer, expert), slot in offloaded.cache._slot_of.items():
            assert torch.equal(pool.down_proj[slot], model.layers[layer].ffn.experts.down_proj[expert])
        assert torch.equal(offloaded.generate(ids, 8), generate_ids(model, ids, 8))
    finally:
        offloaded.close()


def test_a_model_with_aux_loss_free_balancing_and_a_tied_head_offloads(tmp_path, one_thread):
    """Its routers' load counters are in no checkpoint (before: left on the meta device, so
    load_offloaded failed with 'Cannot copy out of meta tensor'); the tied head stays the
    embedding's Parameter through decoding (before: two Parameters on one tensor, parted by the
    decode layout into two copies) and counts once in the memory budget."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        tiny(), moe=dataclasses.replace(tiny().moe, selection_bias=True), tie_embeddings=True
    )
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers.values():
            moe.router.selection_bias.normal_()
    save_pretrained(model, tmp_path / "m")
    offloaded = load_offloaded(tmp_path / "m", resident=0.5)
    try:
        ids = torch.randint(0, cfg.vocab_size, (1, 5))
        assert torch.equal(offloaded.generate(ids, 6), generate_ids(model, ids, 6))
        assert offloaded.model.lm_head.weight is offloaded.model.embed.weight
        counters = [m.tokens_per_expert for m in offloaded.model.modules() if hasattr(m, "tokens_per_expert")]
        assert counters and all(torch.equal(c, torch.zeros_like(c)) for c in counters)  # as in a new model
    finally:
        offloaded.close()
    dense = _held_bytes(offloaded.model)  # the head once, the rotary tables included
    one_layer = 2 * offloaded.cache.store.expert_bytes  # top-2: the fewest slots that run a token
    load_offloaded(tmp_path / "m", memory_budget=dense + one_layer).close()


@pytest.mark.parametrize("family", ["native", "mixtral"])
def test_offloaded_models_decode_a_left_padded_batch_as_in_memory_and_stream_it(tmp_path, family, one_thread):
    torch.manual_seed(0)
    if family == "native":
        model, path = _native(tmp_path, shared=1)
    else:
        model, path = build("mixtral").eval(), tmp_path
        model.save_pretrained(path)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    want = generate_ids(model, ids, 8, attention_mask=mask)
    offloaded = load_offloaded(path, resident=0.5)
    try:
        streamer = Recorder()
        assert torch.equal(offloaded.generate(ids, 8, attention_mask=mask, streamer=streamer), want)
        assert torch.equal(torch.stack([p.view(-1) for p in streamer.puts[1:]], dim=1), want[:, 6:])
        with pytest.raises(ValueError, match="pad after their tokens"):
            offloaded.generate(ids, 2, attention_mask=mask.flip(1))
    finally:
        offloaded.close()


def test_offloaded_bf16_decoding_equals_the_model_in_memory_in_bf16(tmp_path, one_thread):
    model, path = _native(tmp_path, shared=1)
    model = model.to(torch.bfloat16)
    offloaded = load_offloaded(path, resident=0.5, predictor="lookahead", dtype=torch.bfloat16)
    try:
        assert offloaded.cache.pool.dtype == torch.bfloat16
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        assert torch.equal(offloaded.generate(ids, 12), generate_ids(model, ids, 12))
    finally:
        offloaded.close()


def test_the_default_reads_no_expert_ahead_and_evicts_by_reuse(tmp_path, one_thread, monkeypatch):
    model, path = _native(tmp_path)
    calls = []
    monkeypatch.setattr(OffloadedExperts, "read_ahead", lambda self, hidden: calls.append(self.layer))
    offloaded = load_offloaded(path, resident=0.5)
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        assert torch.equal(offloaded.generate(ids, 8), generate_ids(model, ids, 8))
        assert offloaded.cache.eviction == "reuse" and offloaded.cache.total().misses > 0
        assert offloaded.cache.prefetch_stats.issued == 0 and calls == [], "no read-ahead, not even its hook"
    finally:
        offloaded.close()


def test_offloaded_sampling_draws_the_in_memory_tokens_and_hf_sampling_is_seeded(
    tmp_path, one_thread, monkeypatch
):
    """One seed, one text: an offloaded moelab model samples the tokens its in-memory model
    samples; transformers' sampling is seeded too, leaves torch's global generator as it was (and,
    without a GPU, seeds no GPU's for later), and with top-k 1 is greedy."""
    model, path = _native(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    sampling = Sampling(temperature=1.5, top_p=0.95, seed=3)
    want = generate_ids(model, ids, 10, sampling=sampling)
    assert not torch.equal(want, generate_ids(model, ids, 10)), "drawn, not greedy"
    offloaded = load_offloaded(path, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(ids, 10, sampling=sampling), want)
    finally:
        offloaded.close()
    torch.manual_seed(0)
    hf = build("mixtral").eval()
    state = torch.random.get_rng_state()
    seeded_gpus = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded_gpus.append)
    drawn = generate_ids(hf, ids % 64, 8, sampling=Sampling(temperature=1.5, seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert seeded_gpus == [] or torch.cuda.is_available()
    assert torch.equal(generate_ids(hf, ids % 64, 8, sampling=Sampling(temperature=1.5, seed=1)), drawn)
    assert not torch.equal(generate_ids(hf, ids % 64, 8, sampling=Sampling(temperature=1.5, seed=2)), drawn)
    greedy = generate_ids(hf, ids % 64, 8)
    assert torch.equal(generate_ids(hf, ids % 64, 8, sampling=Sampling(temperature=1.5, top_k=1)), greedy)


def test_transformers_sampling_draws_with_the_temperature_alone_from_the_seed():
    """Sampling(temperature, seed) on a transformers model: its `generate` drawing with that
    temperature and nothing else (top-k 0 for its default 50, top-p 1; EOS not stopping) from
    torch's generator seeded with `seed`."""
    hf = build("mixtral")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        want = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, eos_token_id=None, pad_token_id=0,
            do_sample=True, temperature=3.0, top_k=0, top_p=1.0,
        )  # fmt: skip
    assert torch.equal(generate_ids(hf, ids, 6, sampling=Sampling(temperature=3.0, seed=4)), want)
    # an int or numpy's float32, which transformers' sampler refuses, passed to it as a float
    for three in (3, np.float32(3.0)):
        assert torch.equal(generate_ids(hf, ids, 6, sampling=Sampling(temperature=three, seed=4)), want)


def test_a_transformers_model_decodes_by_moelab_s_settings_alone_not_its_generation_config(one_thread):
    """A checkpoint's generation_config.json (Qwen's carry repetition_penalty, do_sample, top_k...)
    changes neither the greedy tokens nor the draws (those of top-k 1 here, the greedy ones), as it
    changes nothing of a model that moelab runs itself; the model's generation_config is left as it was."""
    from transformers import GenerationConfig

    hf = build("mixtral")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = generate_ids(hf, ids, 6)
    stated = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=6, do_sample=True, top_k=3,
                  temperature=0.2, num_beams=2, eos_token_id=int(greedy[0, 6]), bad_words_ids=[[int(greedy[1, 5])]])  # fmt: skip
    hf.generation_config = GenerationConfig(**stated)
    assert torch.equal(generate_ids(hf, ids, 6), greedy)
    assert torch.equal(generate_ids(hf, ids, 6, sampling=Sampling(top_k=1, seed=1)), greedy)  # top-k 1: greedy
    assert hf.generation_config.to_diff_dict() == GenerationConfig(**stated).to_diff_dict()


def test_a_transformers_model_pads_a_sequence_that_ended_with_the_eos_token():
    """Greedy decoding of two prompts, the EOS token the second token of the first one's greedy
    continuation: that sequence is EOS from there on, the other one's tokens unchanged."""
    hf = build("mixtral")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = generate_ids(hf, ids, 8)
    eos = int(greedy[0, 6])
    assert eos not in greedy[1, 5:].tolist() and greedy[0, 7:].ne(eos).any()
    want = greedy.clone()
    want[0, 7:] = eos
    assert torch.equal(generate_ids(hf, ids, 8, eos_token_id=eos), want)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3", "axk1", "gemma4_text", "minimax_m3_vl_text", "bailing_hybrid", "hy_v4", "cohere2_moe", "jetmoe", "mistral4", "longcat_flash", "inkling2_text"])
def test_offloaded_transformers_checkpoint_decodes_like_transformers(tmp_path, family, one_thread):
    """Mixtral runs offloaded as a moelab model (`moelab.hf.conversion`), the others on transformers'
    modules with moelab's MoE blocks; the EOS token neither stops nor is forbidden on either side."""
    torch.manual_seed(0)
    model = build(family).eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (1, 6))
    want = generate_ids(model, ids, 8)
    for resident, predictor in ((0.5, "lookahead"), (1.0, None)):
        offloaded = load_offloaded(tmp_path, resident=resident, predictor=predictor)
        assert isinstance(offloaded.model, MoETransformer) == (family == "mixtral")
        try:
            assert torch.equal(offloaded.generate(ids, 8), want), (family, resident)
            with torch.inference_mode():
                expected = model(input_ids=ids).logits
                if isinstance(offloaded.model, MoETransformer):  # offloaded experts run `infer` alone
                    got, expected = offloaded.model.decode_step(ids), expected[:, -1]
                else:
                    got = offloaded.model(input_ids=ids).logits
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        finally:
            offloaded.close()


@pytest.mark.parametrize("family", ["native", "mixtral"])
def test_each_layer_reads_ahead_from_its_input_through_its_norm(tmp_path, monkeypatch, family, one_thread):
    """The read-ahead hook of each MoE layer sees its decoder layer's input, normalised by the norm
    before the MoE block (ffn_norm / post_attention_layernorm), and at a decode step the lookahead
    then reads that input's router choices."""
    if family == "native":
        path, norm_name = _native(tmp_path)[1], "ffn_norm"
    else:
        torch.manual_seed(0)
        build(family).save_pretrained(tmp_path)
        path, norm_name = tmp_path, "post_attention_layernorm"
    offloaded = load_offloaded(path, resident=0.5, predictor="lookahead", prefetch_factor=1.0)
    if isinstance(offloaded.model, MoETransformer):  # Mixtral runs as a moelab model (moelab.hf.conversion)
        norm_name = "ffn_norm"
    seen, inputs = [], []
    read_ahead = OffloadedExperts.read_ahead

    def spy(self, hidden, ids=None):
        seen.append((self.layer, hidden.clone()))
        read_ahead(self, hidden, ids)
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] == 1:  # a decode step: its router's choices are read ahead (or already there)
            chosen = self._links[0].forward(rows).indices.flatten().tolist()
            assert {(self.layer, e) for e in chosen} <= self.cache.resident()

    monkeypatch.setattr(OffloadedExperts, "read_ahead", spy)
    try:
        layers = [m for m in offloaded.model.modules() if hasattr(m, norm_name)]
        for layer in layers:
            layer.register_forward_pre_hook(
                lambda m, args, kwargs: inputs.append(getattr(m, norm_name)(args[0] if args else kwargs["hidden_states"])),
                with_kwargs=True,
            )  # fmt: skip
        offloaded.generate(torch.randint(0, 64, (1, 4)), 3)
        assert [layer for layer, _ in seen] == list(range(len(layers))) * 3
        for (_, hidden), expected in zip(seen, inputs, strict=True):
            torch.testing.assert_close(hidden, expected)
    finally:
        offloaded.close()


def test_each_moe_layer_reads_ahead_from_the_choices_of_the_one_before(tmp_path, monkeypatch, one_thread):
    """The affinity predictor of MoE layers 1 and 2 reads the choices of layers 0 and 1 (layer 0 has
    none before it)."""
    model, path = _native(tmp_path)
    offloaded = load_offloaded(path, resident=0.5, predictor="affinity", prior=_prior(model, model.config.vocab_size))
    seen = []
    scores = RoutingPrior.affinity_scores
    monkeypatch.setattr(
        RoutingPrior, "affinity_scores", lambda self, layer, indices: (seen.append(layer), scores(self, layer, indices))[1]
    )
    try:
        offloaded.generate(torch.randint(0, model.config.vocab_size, (1, 4)), 3)
    finally:
        offloaded.close()
    assert sorted(set(seen)) == [0, 1]


def test_generation_past_the_position_limit_is_refused(tmp_path):
    build("olmoe", max_position_embeddings=16).save_pretrained(tmp_path)
    offloaded = load_offloaded(tmp_path, resident=1.0, predictor=None)
    try:
        ids = torch.zeros(1, 4, dtype=torch.long)
        assert offloaded.generate(ids, 12).shape == (1, 16)  # up to the limit
        with pytest.raises(ValueError, match=r"\(4\) \+ max_new_tokens \(13\) exceed the model's max_position_embeddings"):
            offloaded.generate(ids, 13)
        with pytest.raises(TypeError, match=r"takes the module an OffloadedModel runs; call its own generate"):
            generate_ids(offloaded, ids, 1)  # it used to fail on the wrapper's missing .config
    finally:
        offloaded.close()


def test_a_prefill_larger_than_the_cache_runs_in_chunks(tmp_path, one_thread):
    """A prompt that needs every expert of a layer at once, through a pool of 2 slots."""
    model, path = _native(tmp_path)
    offloaded = load_offloaded(path, resident=2 / 12, predictor=None)
    try:
        assert offloaded.cache.slots == 2
        ids = torch.randint(0, model.config.vocab_size, (3, 20))
        with torch.inference_mode():
            torch.testing.assert_close(offloaded.model.decode_step(ids), model.decode_step(ids), atol=1e-5, rtol=1e-5)
    finally:
        offloaded.close()


def test_a_layer_call_fetched_in_chunks_is_one_visit_of_the_layer(tmp_path, one_thread):
    """A call asking for more experts than the pool holds fetches them in chunks, but counts as one
    visit: an expert read ahead and asked for in a later chunk counts as used, and each asked-for
    expert's recent use rises once (before: only the first chunk's counted as used, and the habit
    decayed once per chunk, the earlier chunks' experts weighing less)."""
    _, path = _native(tmp_path)
    offloaded = load_offloaded(path, resident=2 / 12, warm=False)
    cache, experts = offloaded.cache, offloaded.model.layers[0].ffn.experts
    try:
        cache.prefetch(0, torch.tensor([0, 0, 0, 1.0]), torch.tensor([0, 0, 0, 0.9]), limit=1)
        x = torch.randn(4, experts.dim)
        with torch.inference_mode():  # chunks [0, 1] and [2, 3], one token each
            experts.accumulated(x, torch.arange(4), [1, 1, 1, 1], torch.ones(4))
        assert (cache.prefetch_stats.issued, cache.prefetch_stats.used) == (1, 1)
        assert cache.habit(0).tolist() == pytest.approx([(1 - RECENCY_DECAY + 0.25) / 2] * 4)
    finally:
        offloaded.close()


def test_one_tokens_logits_equal_the_model_in_memory_for_every_expert_it_chooses(tmp_path, one_thread):
    """Single tokens (the gathered decode path, on the pool's slots): the in-memory logits, expert
    0 included."""
    model, path = _native(tmp_path)
    offloaded = load_offloaded(path, resident=0.5)
    try:
        with torch.inference_mode():
            for token in range(16):
                ids = torch.tensor([[token]])
                torch.testing.assert_close(offloaded.model.decode_step(ids), model.decode_step(ids), atol=1e-5, rtol=1e-5)
    finally:
        offloaded.close()


# ----------------------------------------------------------------------------- the cache


def _cache(tmp_path, slots: int, eviction: str = "lru", prior=None) -> ExpertCache:
    _, path = _native(tmp_path)
    return ExpertCache(ExpertStore(path), slots, eviction=eviction, prior=prior)


def test_lru_worked_example(tmp_path):
    cache = _cache(tmp_path, 3)
    for layer, experts in ((0, [0, 1]), (1, [2]), (0, [1]), (2, [3])):  # 2 evicts (0, 0), the LRU
        cache.fetch(layer, experts, tokens=1)
        cache.release()
    assert cache.resident() == {(0, 1), (1, 2), (2, 3)}
    stats = cache.stats[1]
    assert (stats.requests, stats.hits, stats.misses) == (5, 1, 4)
    cache.close()


def test_lru_counts_a_hit_as_a_use(tmp_path):
    """A hit makes its expert the most recently used: the next miss evicts the other one."""
    cache = _cache(tmp_path, 2)
    for layer, expert in ((0, 0), (0, 1), (0, 0), (1, 2)):  # (0, 0) hit, then (1, 2) evicts (0, 1)
        cache.fetch(layer, [expert], tokens=1)
        cache.release()
    assert cache.resident() == {(0, 0), (1, 2)} and (cache.stats[1].hits, cache.stats[1].misses) == (1, 3)
    cache.close()


def test_lru_counts_a_read_ahead_as_a_use(tmp_path):
    """An expert read ahead is the most recently used when it arrives: the next miss evicts the
    oldest expert fetched before it, not the read-ahead (whose slot was the least recently used)."""
    cache = _cache(tmp_path, 3)
    for expert in (0, 1, 2):
        cache.fetch(0, [expert], tokens=1)
        cache.release()
    cache.prefetch(1, torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.9, 0.0, 0.0]), limit=1)
    assert cache.resident() == {(1, 1), (0, 1), (0, 2)}  # took (0, 0)'s slot, the LRU
    cache.fetch(2, [3], tokens=1)  # evicts (0, 1), now the LRU
    cache.release()
    assert cache.resident() == {(1, 1), (0, 2), (2, 3)}
    cache.close()


def test_holds_all_counts_only_the_experts_the_pool_holds_after_a_failed_read(tmp_path, monkeypatch):
    """A read that fails frees its slot: the layer does not count as held whole until it is."""
    cache = _cache(tmp_path, 12)
    cache.fill([(0, 0), (0, 1), (0, 2)])

    def failing(*args):
        raise OSError("the read failed")

    with monkeypatch.context() as m:
        m.setattr(cache.store, "load", failing)
        with pytest.raises(OSError):
            cache.fetch(0, [3], tokens=1)
    assert not cache.holds_all(0) and (0, 3) not in cache.resident()
    cache.fetch(0, [3], tokens=1)
    cache.release()
    assert cache.holds_all(0)
    cache.close()


def test_reuse_evicts_the_expert_needed_furthest_ahead(tmp_path):
    """Layers 0, 1, 2 in a cycle; after running layer 2, layer 0 runs next (1 visit ahead), layer
    1 after it (2 ahead) and layer 2 itself last (3 ahead). With equal probabilities the victim is
    layer 2's expert; a lower probability pushes another layer's expert further."""
    _, path = _native(tmp_path)

    def victim(rare: float):
        frequency = {i: torch.full((4,), 0.5) for i in range(3)}
        frequency[1][1] = rare
        prior = RoutingPrior((0, 1, 2), frequency, {i: torch.full((4, 4), 0.25) for i in range(2)})
        cache = ExpertCache(ExpertStore(path), 3, eviction="reuse", prior=prior)
        for layer, expert in ((0, 0), (1, 1), (2, 2)):
            cache.fetch(layer, [expert], tokens=1)
            cache.release()
        cache._current = 2  # noqa: SLF001 - the cycle position after layer 2 ran
        cache._visited[:] = False  # noqa: SLF001 - probabilities from the prior alone
        cache._wait_known = [False] * 3  # noqa: SLF001
        try:
            return cache._owner[cache._victim()]  # noqa: SLF001
        finally:
            cache.close()

    assert victim(0.5) == (2, 2)
    assert victim(0.01) == (1, 1)  # (1, 1): 2 + 3 * 99 visits ahead


def test_prefetch_counts_and_late_hits(tmp_path):
    cache = _cache(tmp_path, 4)
    cache.fetch(0, [0, 1], tokens=1)
    cache.prefetch(1, torch.tensor([0.0, 3.0, 2.0, 1.0]), torch.tensor([0.0, 0.9, 0.6, 0.3]), limit=2)
    cache.release()
    assert cache.resident() == {(0, 0), (0, 1), (1, 1), (1, 2)}
    cache.fetch(1, [1, 3], tokens=1)  # 1 was prefetched (hit or late), 3 was not
    stats = cache.stats[1]
    assert stats.hits + stats.late == 1 and stats.misses == 3  # 0 and 1 at first, then 3
    assert (cache.prefetch_stats.issued, cache.prefetch_stats.used) == (2, 1)
    cache.release()
    cache.close()


def test_a_read_ahead_counts_as_used_once_however_often_its_layer_then_runs(tmp_path):
    """Prefetch accuracy: each expert read ahead counts as used at most once, at the layer's next
    fetch; later fetches of the layer, with no new read-ahead, add nothing."""
    cache = _cache(tmp_path, 6)
    cache.prefetch(1, torch.tensor([0.0, 3.0, 2.0, 0.0]), torch.tensor([0.0, 0.9, 0.6, 0.0]), limit=2)
    for _ in range(3):
        cache.fetch(1, [1, 3], tokens=1)  # 1 read ahead and used, 2 read ahead and not, 3 not read ahead
        cache.release()
    assert (cache.prefetch_stats.issued, cache.prefetch_stats.used) == (2, 1)
    assert cache.prefetch_stats.accuracy == 0.5
    cache.close()


def test_a_read_ahead_dropped_by_an_earlier_chunk_of_its_layers_call_is_not_counted_as_used(tmp_path, monkeypatch):
    """A layer call asking for more experts than the pool holds is fetched in chunks: a miss of the
    first chunk may take the slot of a read-ahead for a later chunk that has not started, which then
    read nothing (not issued) and is read on demand at its chunk: not used either (before: counted
    used at the call's first chunk, so used exceeded issued, an accuracy above 1)."""
    _, path = _native(tmp_path)
    frequency = {i: torch.full((4,), 0.5) for i in range(3)}
    frequency[1][3] = 0.01  # (1, 3) the least likely expert of layer 1: the first chunk's victim
    prior = RoutingPrior((0, 1, 2), frequency, {i: torch.full((4, 4), 0.25) for i in range(2)})
    cache = ExpertCache(ExpertStore(path), 3, eviction="reuse", prior=prior)
    events, release = _gate_reads(monkeypatch)
    try:
        cache.prefetch(1, torch.tensor([0, 3.0, 2.0, 1.0]), torch.tensor([0, 0.9, 0.9, 0.9]), limit=3)
        _wait_for(events, ("start", 1, 1))  # (1, 1) running, held at the gate; (1, 2), (1, 3) queued
        cache.fetch(1, [0], tokens=4, visit=[0, 1, 2, 3])  # the call's first chunk: (1, 0) takes (1, 3)'s slot
        cache.release()
        assert (1, 3) not in cache.resident() and cache.prefetch_stats.issued == 2
        release.set()
        cache.fetch(1, [1, 2, 3], tokens=4, visit=[])  # 1 and 2 read ahead, 3 read on demand
        cache.release()
        stats = cache.prefetch_stats
        assert (stats.issued, stats.used, stats.accuracy) == (2, 2, 1.0)
        assert (stats.needed, stats.foreseen) == (4, 3)
    finally:
        release.set()
        cache.close()


def test_prefetch_recall_counts_the_needed_experts_the_prediction_named_resident_or_not(tmp_path):
    """Recall (Mixtral-offloading's speculative-loading figure): of the experts a layer asks for
    after a prediction, the share it named, whether already resident (not read again) or read
    ahead; a visit without a prediction counts nowhere. Accuracy stays a precision of the reads."""
    cache = _cache(tmp_path, 6)
    cache.fetch(1, [0], tokens=1)  # no prediction yet: not counted
    cache.release()
    cache.prefetch(1, torch.tensor([4.0, 3.0, 2.0, 0.0]), torch.tensor([0.9, 0.8, 0.6, 0.0]), limit=3)  # 0 resident
    cache.fetch(1, [0, 1, 3], tokens=1)  # 0 (resident) and 1 (read ahead) named, 3 not
    cache.release()
    stats = cache.prefetch_stats
    assert (stats.needed, stats.foreseen, stats.recall) == (3, 2, 2 / 3)
    assert (stats.issued, stats.used, stats.accuracy) == (2, 1, 0.5)  # 1 and 2 read ahead, 1 used
    cache.fetch(1, [2], tokens=1)  # no new prediction: nothing added
    cache.release()
    assert (stats.needed, stats.foreseen) == (3, 2)
    cache.prefetch(1, torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.ones(4), limit=4)  # a prompt pass's: every expert
    cache.fetch(1, [0, 1, 2, 3], tokens=4)
    cache.release()
    assert (stats.needed, stats.foreseen) == (7, 6) and (cache.total().needed, cache.total().foreseen) == (7, 6)
    # counted by call size too: the one-token (decode) calls' recall apart from the prompt pass's
    assert (cache.stats[1].needed, cache.stats[1].foreseen, cache.stats[1].recall) == (3, 2, 2 / 3)
    assert (cache.stats[4].needed, cache.stats[4].foreseen, cache.stats[4].recall) == (4, 4, 1.0)
    cache.close()


def test_fetching_more_experts_than_the_unpinned_slots_is_refused(tmp_path):
    """Slots pinned by a fetch not yet released are not free: asking for more than the rest is
    refused, naming how many are free, and leaves the pinned slots and counts as they were."""
    cache = _cache(tmp_path, 3)
    held = cache.fetch(0, [0, 1], tokens=1)
    with pytest.raises(ValueError, match="2 experts asked for at once, but only 1 of 3 slots are free"):
        cache.fetch(1, [0, 1], tokens=1)
    assert cache._pinned == set(held)  # noqa: SLF001
    cache.fetch(1, [0], tokens=1)  # the one free slot serves
    cache.release()
    assert cache.resident() == {(0, 0), (0, 1), (1, 0)} and cache.stats[1].requests == 3
    cache.close()


def test_total_sums_every_count_over_the_call_sizes(tmp_path):
    """`total()`: each field of `stats` summed over the layer calls' token counts, late hits and
    late copies included (the benchmark's reads and hit rates come from it)."""
    cache = _cache(tmp_path, 3)
    cache.stats = {1: CacheStats(10, 5, 2, 3, 0.5, 1), 7: CacheStats(4, 1, 1, 2, 0.25, 3)}
    assert cache.total() == CacheStats(14, 6, 3, 5, 0.75, 4)
    assert cache.total().hit_rate == 9 / 14
    cache.close()


def test_prefetch_reads_no_expert_scored_zero(tmp_path):
    """Experts the prediction gives no chance are not read ahead, whatever the limit."""
    cache = _cache(tmp_path, 8)
    cache.prefetch(1, torch.tensor([0.0, 3.0, 0.0, 1.0]), torch.tensor([0.0, 0.9, 0.0, 0.3]), limit=4)
    assert cache.resident() == {(1, 1), (1, 3)} and cache.prefetch_stats.issued == 2
    cache.close()


def test_read_aheads_yield_to_reads_on_demand_and_queued_ones_are_dropped_when_evicted(tmp_path, monkeypatch):
    """A read-ahead waits while a read on demand runs; one still queued when its slot is chosen as
    a victim is cancelled (not waited for, not counted as read ahead), and the slot then holds
    what it was given."""

    cache = _cache(tmp_path, 3, "reuse")
    store, started, release = cache.store, [], threading.Event()
    load = ExpertStore.load

    def gated(self, layer, expert, pool, slot):
        started.append((layer, expert))
        if threading.current_thread() is not threading.main_thread():
            assert release.wait(10)
        load(self, layer, expert, pool, slot)

    monkeypatch.setattr(ExpertStore, "load", gated)
    try:
        cache.fetch(0, [0], tokens=1)  # on demand, main thread
        cache.release()
        cache._no_demand.clear()  # noqa: SLF001 - as if a read on demand were running
        cache.prefetch(1, torch.tensor([1.0, 2.0, 0, 0]), torch.tensor([0.001, 0.9, 0, 0]), limit=2)
        first, queued = cache._slot_of[1, 1], cache._slot_of[1, 0]  # noqa: SLF001 - (1, 1) submitted first
        time.sleep(0.05)
        assert started == [(0, 0)]  # the read-ahead waits for the read on demand
        cache._no_demand.set()  # noqa: SLF001
        for _ in range(200):
            if len(started) == 2:
                break
            time.sleep(0.01)
        assert started == [(0, 0), (1, 1)]  # running (held at the gate); (1, 0) queued behind it
        read = cache._loading[queued]  # noqa: SLF001
        cache.fetch(2, [3], tokens=1)  # victim: (1, 0), unlikely (p = 0.001), dropped without waiting
        assert read.cancelled() and cache._slot_of[2, 3] == queued  # noqa: SLF001
        assert cache.prefetch_stats.issued == 1  # the dropped read-ahead read nothing: not counted
        cache.release()
        release.set()
        cache.fetch(1, [1], tokens=1)  # the running one finishes and is a (late) hit
        assert started == [(0, 0), (1, 1), (2, 3)] and cache._slot_of[1, 1] == first  # noqa: SLF001
        for (layer, expert), slot in cache._slot_of.items():  # noqa: SLF001
            one = store.read(layer, expert)
            assert torch.equal(cache.pool.down_proj[slot], one.down[0])
        cache.release()
    finally:
        release.set()
        cache.close()


def test_read_aheads_are_held_back_exactly_while_a_read_on_demand_runs(tmp_path, monkeypatch):
    """A miss's read (and a warm start's) holds queued read-aheads back for as long as it runs,
    and lets them go once it ends, whether it succeeded or failed."""
    cache = _cache(tmp_path, 3)
    during = []
    load = ExpertStore.load

    def noting(self, layer, expert, pool, slot):
        during.append(cache._no_demand.is_set())  # noqa: SLF001
        if expert == 3:
            raise OSError("the read failed")
        load(self, layer, expert, pool, slot)

    monkeypatch.setattr(ExpertStore, "load", noting)
    try:
        cache.fill([(0, 0)])
        cache.fetch(1, [1, 2], tokens=1)
        cache.release()
        with pytest.raises(OSError):
            cache.fetch(2, [3], tokens=1)
        assert during == [False, False, False, False] and cache._no_demand.is_set()  # noqa: SLF001
    finally:
        cache.close()


def _gate_reads(monkeypatch) -> tuple[list[tuple[str, int, int]], threading.Event]:
    """Log every expert read's ("start" | "end", layer, expert) and hold the read of layer 1's
    expert 1 until the returned event is set."""
    events, release = [], threading.Event()
    load = ExpertStore.load

    def gated(self, layer, expert, pool, slot):
        events.append(("start", layer, expert))
        if (layer, expert) == (1, 1):
            assert release.wait(10)
        load(self, layer, expert, pool, slot)
        events.append(("end", layer, expert))

    monkeypatch.setattr(ExpertStore, "load", gated)
    return events, release


def _wait_for(events: list, event: tuple, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if event in events:
            return
        time.sleep(0.01)
    pytest.fail(f"{event} did not happen within {seconds} s")


def test_a_read_on_demand_waits_for_a_running_read_ahead_into_its_slot(tmp_path, monkeypatch):
    """A read-ahead still running into a slot that a later read-ahead took over (and that a miss
    then takes) ends before the miss writes the slot: else its bytes would land on the new expert."""

    cache = _cache(tmp_path, 3, "reuse")
    events, release = _gate_reads(monkeypatch)
    try:
        cache.fetch(0, [0], tokens=1)
        cache.release()
        cache.prefetch(1, torch.tensor([0, 2.0, 1.0, 0]), torch.tensor([0, 0.001, 0.9, 0]), limit=2)
        _wait_for(events, ("start", 1, 1))  # (1, 1) running, held at the gate; (1, 2) queued
        slot = cache._slot_of[1, 1]  # noqa: SLF001
        cache.prefetch(2, torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.001, 0, 0, 0]), limit=1)
        assert cache._slot_of[2, 0] == slot  # noqa: SLF001 - took the running read-ahead's slot
        threading.Timer(0.2, release.set).start()
        cache.fetch(0, [3], tokens=1)  # a miss whose victim is that slot again: waits for (1, 1)
        assert cache._slot_of[0, 3] == slot  # noqa: SLF001
        assert events.index(("end", 1, 1)) < events.index(("start", 0, 3))
        one = cache.store.read(0, 3)
        assert torch.equal(cache.pool.down_proj[slot], one.down[0])
        cache.release()
    finally:
        release.set()
        cache.close()


def test_a_read_ahead_that_fails_while_waited_for_is_a_miss_not_a_late_hit(tmp_path, monkeypatch):
    """fetch waits for a running read-ahead that then fails: its expert is read on demand, one
    miss, no late hit (before: counted late and a miss, so hits went to -1)."""
    cache = _cache(tmp_path, 3, "reuse")
    events, release = _gate_reads(monkeypatch)
    load = ExpertStore.load  # the gated one

    def failing_ahead(self, layer, expert, pool, slot):
        load(self, layer, expert, pool, slot)
        if threading.current_thread() is not threading.main_thread():
            raise OSError("the read failed")

    monkeypatch.setattr(ExpertStore, "load", failing_ahead)
    try:
        cache.prefetch(1, torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0.9, 0, 0]), limit=1)
        _wait_for(events, ("start", 1, 1))  # running, held at the gate
        threading.Timer(0.2, release.set).start()
        cache.fetch(1, [1], tokens=1)  # waits for it, then reads (1, 1) again on demand
        cache.release()
        stats = cache.stats[1]
        assert (stats.requests, stats.hits, stats.late, stats.misses) == (1, 0, 0, 1)
        assert events.count(("end", 1, 1)) == 2 and cache.resident() == {(1, 1)}
    finally:
        release.set()
        cache.close()


def test_read_aheads_still_queued_at_close_are_dropped_and_not_counted_as_read_ahead(tmp_path, monkeypatch):
    """close() drops the read-aheads not started, as a slot taken from one does: they read nothing,
    so `prefetch_stats.issued` (the bench's accuracy and reads per token, read after close) leaves
    them out (before: counted as read ahead, by how far the reader thread had got)."""
    cache = _cache(tmp_path, 3, "reuse")
    events, release = _gate_reads(monkeypatch)
    try:
        cache.prefetch(1, torch.tensor([0, 2.0, 1.0, 0]), torch.tensor([0, 0.9, 0.6, 0]), limit=2)
        _wait_for(events, ("start", 1, 1))  # (1, 1) running, held at the gate; (1, 2) queued
        assert cache.prefetch_stats.issued == 2
        threading.Timer(0.2, release.set).start()
    finally:
        cache.close()  # waits for (1, 1); drops (1, 2)
        release.set()
    assert ("start", 1, 2) not in events and ("end", 1, 1) in events
    assert cache.prefetch_stats.issued == 1 and cache.resident() == {(1, 1)}


@pytest.mark.parametrize("policy", ["lookahead", "both"])
def test_read_aheads_at_random_speeds_change_neither_the_tokens_nor_the_hits(tmp_path, monkeypatch, policy, one_thread):
    """A stress test of the reader thread against the compute: 7 MoE layers of 8 experts sharing 3
    to 14 slots (prefills larger than the pool fetched in chunks), every read-ahead held for a random
    0-3 ms. Twice, at different speeds: the in-memory tokens each time, every resident slot holding
    its expert, the same hits (late ones included) and misses, and no more read-aheads used than read."""
    torch.manual_seed(0)
    base = tiny()
    config = dataclasses.replace(base, n_layers=8, first_k_dense=1, moe=dataclasses.replace(base.moe, num_experts=8, num_shared=1))
    model = MoETransformer(config).eval()
    save_pretrained(model, tmp_path / "m")
    prior = _prior(model, config.vocab_size)
    ids = torch.randint(0, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[1, :2] = 0
    want = generate_ids(model, ids, 6, attention_mask=mask)
    load, speed = ExpertStore.load, random.Random(0)

    def jittered(self, layer, expert, pool, slot):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(speed.random() * 0.003)
        load(self, layer, expert, pool, slot)

    monkeypatch.setattr(ExpertStore, "load", jittered)
    for resident in (0.05, 0.25):
        counts = set()
        for _ in range(2):
            offloaded = load_offloaded(tmp_path / "m", resident=resident, predictor=policy, prior=prior)
            try:
                assert torch.equal(offloaded.generate(ids, 6, attention_mask=mask), want)
                cache = offloaded.cache
                for read in cache._loading.values():  # noqa: SLF001
                    read.result()
                for (layer, expert), slot in cache._slot_of.items():  # noqa: SLF001
                    assert torch.equal(cache.pool.down_proj[slot], model.layers[layer].ffn.experts.down_proj[expert])
                total, prefetch = cache.total(), cache.prefetch_stats
                assert 0 < prefetch.used <= prefetch.issued
                counts.add((total.hits + total.late, total.misses))
            finally:
                offloaded.close()
        assert len(counts) == 1, counts


@settings(max_examples=25, deadline=None)
@given(
    calls=st.lists(st.tuples(st.integers(0, 2), st.sets(st.integers(0, 3), min_size=1, max_size=3)), min_size=1, max_size=12),
    slots=st.integers(3, 12),
    eviction=st.sampled_from(["lru", "reuse"]),
)  # fmt: skip
def test_every_slot_handed_out_holds_its_expert(tmp_path_factory, calls, slots, eviction):
    cache = _cache(tmp_path_factory.mktemp("c"), slots, eviction)
    store = cache.store
    try:
        for layer, experts in calls:
            experts = sorted(experts)
            got = cache.fetch(layer, experts, tokens=len(experts))
            cache.prefetch((layer + 1) % 3, torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.full((4,), 0.5), limit=2)
            assert len(set(got)) == len(experts) and len(cache.resident()) <= slots
            for expert, slot in zip(experts, got):
                cache._loading.pop(slot).result() if slot in cache._loading else None  # noqa: SLF001
                one = store.read(layer, expert)
                assert torch.equal(cache.pool.gate_up_proj[slot], torch.cat([one.gate[0], one.up[0]]))
                assert torch.equal(cache.pool.down_proj[slot], one.down[0])
            cache.release()
    finally:
        cache.close()


def _victim_slot_by_slot(cache: ExpertCache, predicted: dict, instead_of=None):
    """`ExpertCache._victim`'s choice written slot by slot, in plain Python floats: the least
    recently used unpinned slot ("lru"), or the one whose expert is expected furthest ahead,
    d + L (1 - p) / p visits, ties to the least recently used ("reuse"); p: the layer's last
    prediction (`predicted`) or its habit."""
    if None in cache._owner:  # noqa: SLF001
        return cache._owner.index(None)  # noqa: SLF001
    order = sorted(range(cache.slots), key=lambda s: int(cache._used_at[s]))  # noqa: SLF001 - LRU first
    candidates = [s for s in order if s not in cache._pinned]  # noqa: SLF001
    if not candidates:
        return None
    if cache.eviction == "lru":
        return candidates[0]
    layers = cache.store.moe_layers
    L = len(layers)

    def next_use(layer, expert):
        ahead = (layers.index(layer) - layers.index(cache._current)) % L or L  # noqa: SLF001
        p = predicted[layer][expert] if layer in predicted else cache.habit(layer).tolist()[expert]
        p = min(max(p, 1e-3), 1.0)
        return ahead + L * (1 - p) / p

    victim = max(candidates, key=lambda s: next_use(*cache._owner[s]))  # noqa: SLF001 - first of the ties
    if instead_of is not None and cache._owner[victim][0] == instead_of[0]:  # noqa: SLF001
        if next_use(*cache._owner[victim]) <= next_use(*instead_of):  # noqa: SLF001
            return None
    return victim


@settings(max_examples=40, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.integers(0, 2), st.sets(st.integers(0, 3), min_size=1, max_size=3),
            st.lists(st.sampled_from([0.0, 0.005, 0.1, 0.25, 0.5, 1.0]), min_size=4, max_size=4),
        ),
        min_size=1, max_size=12,
    ),
    slots=st.integers(3, 12),
    eviction=st.sampled_from(["lru", "reuse"]),
    with_prior=st.booleans(),
)  # fmt: skip
def test_eviction_equals_the_policy_written_slot_by_slot(tmp_path_factory, calls, slots, eviction, with_prior):
    """The vectorised victim choice against `_victim_slot_by_slot`, before and after every fetch and
    prefetch of a random sequence, with equal chances (ties) common."""
    prior = None
    if with_prior:
        frequency = {i: torch.tensor([0.5, 0.25, 0.25, 1.0]) for i in range(3)}
        prior = RoutingPrior((0, 1, 2), frequency, {i: torch.full((4, 4), 0.25) for i in range(2)})
    cache = _cache(tmp_path_factory.mktemp("c"), slots, eviction, prior)
    predicted = {}
    try:
        for layer, experts, chances in calls:
            cache.fetch(layer, sorted(experts), tokens=1)
            predicted.pop(layer, None)
            assert cache._victim() == _victim_slot_by_slot(cache, predicted)  # noqa: SLF001 - pinned ones excluded
            cache.release()
            following = (layer + 1) % 3
            probability = torch.tensor(chances)
            cache.prefetch(following, probability + 0.01, probability, limit=2)
            predicted[following] = probability.tolist()
            for key in (None, (following, 0), (layer, 3)):
                assert cache._victim(key) == _victim_slot_by_slot(cache, predicted, key)  # noqa: SLF001
    finally:
        cache.close()


def test_routing_prior_worked_example():
    """Two tokens over layers 0 and 1 (3 experts): token a picks {0, 1} then {2}; token b picks {0}
    then {1}."""
    counter = _Counter({0: 3, 1: 3})
    counter.add({0: torch.tensor([[0, 1], [0, -1]]), 1: torch.tensor([[2, -1], [1, -1]])})
    prior = counter.prior("two tokens")
    torch.testing.assert_close(prior.frequency[0], torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(prior.frequency[1], torch.tensor([0.0, 0.5, 0.5]))
    # expert 0 at layer 0 was followed by 2 (token a) and 1 (token b); expert 1 by 2; expert 2 never seen
    expected = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(prior.affinity[0], expected)
    torch.testing.assert_close(prior.affinity_scores(0, torch.tensor([[0, 1]])), torch.tensor([0.0, 0.5, 1.5]))


def test_lookahead_scores_worked_example():
    """Each token's scores normalised to sum to 1, plus 1 for each of its choices (-1: empty)."""
    indices = torch.tensor([[0, -1], [2, -1]])
    probs = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 3.0, 0.0]])  # unnormalised, as sigmoid scores are
    torch.testing.assert_close(lookahead_scores(indices, probs), torch.tensor([1.5, 0.5, 2.0, 0.0]))


@pytest.mark.parametrize("predictor", ["lookahead", "both"])
def test_read_ahead_worked_example(tmp_path, monkeypatch, predictor):
    """Layer 1 reading ahead for T=2 tokens (4 experts, top-2, prefetch_factor 1.5): up to
    min(4, round(1.5 * 2 * 2)) = 4 experts; scores: the affinity's expected choices / K (the
    previous layer chose {0, 1} and {2}) plus the lookahead's (worked example above); the chance
    each is needed: scores / (T * the most a token gives: 1 by affinity + 2 by lookahead)."""
    affinity = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.25] * 4])
    prior = RoutingPrior((0, 1, 2), {i: torch.full((4,), 0.5) for i in range(3)}, {0: affinity, 1: affinity})
    cache = _cache(tmp_path, 4, eviction="reuse", prior=prior)
    calls = []
    monkeypatch.setattr(cache, "prefetch", lambda *args: calls.append(args))
    previous = OffloadedExperts(cache, 0, None, 2)
    previous.chosen = torch.tensor([[0, 1], [2, -1]])
    routing = dataclasses.make_dataclass("Routing", ["indices", "probs"])(
        torch.tensor([[0, -1], [2, -1]]), torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 3.0, 0.0]])
    )
    router = dataclasses.make_dataclass("Router", ["dim", "forward"])(cache.pool.dim, lambda x: routing)
    experts = OffloadedExperts(cache, 1, predictor, 2, prefetch_factor=1.5)
    experts.link(router, previous)
    try:
        experts.read_ahead(torch.zeros(1, 2, cache.pool.dim))
        [(layer, scores, probability, limit)] = calls
        lookahead = torch.tensor([1.5, 0.5, 2.0, 0.0])
        if predictor == "both":  # affinity: rows 0 + 1 + 2 = [0.5, 0.5, 1, 1], over K = 2
            expected, most = lookahead + torch.tensor([0.25, 0.25, 0.5, 0.5]), 3.0
        else:
            expected, most = lookahead, 2.0
        assert (layer, limit) == (1, 4)
        torch.testing.assert_close(scores, expected)
        torch.testing.assert_close(probability, expected / (2 * most))
        experts.prefetch_factor = 0.5  # round(0.5 * 2 * 2) = 2 experts
        experts.read_ahead(torch.zeros(2, 1, cache.pool.dim))
        assert calls[1][3] == 2
    finally:
        cache.close()


def test_habit_averages_recent_use_with_the_prior_frequency(tmp_path):
    """The mean of the decayed record of a layer's choices and its prior frequency; the frequency
    alone for a layer not yet visited."""
    frequency = {i: torch.tensor([0.4, 0.3, 0.2, 0.1]) for i in range(3)}
    prior = RoutingPrior((0, 1, 2), frequency, {i: torch.full((4, 4), 0.25) for i in range(2)})
    cache = _cache(tmp_path, 4, eviction="reuse", prior=prior)
    for experts in ([0, 1], [1]):
        cache.fetch(0, experts, tokens=1)
        cache.release()
    d = RECENCY_DECAY
    recent = torch.tensor([d * (1 - d), d * (1 - d) + (1 - d), 0.0, 0.0])
    torch.testing.assert_close(cache.habit(0), (recent + frequency[0]) / 2)
    torch.testing.assert_close(cache.habit(1), frequency[1])
    cache.close()


def test_the_warm_start_takes_each_layers_most_frequent_experts_first(tmp_path):
    """Round-robin over the MoE layers, each layer's experts by decreasing prior frequency (ties in
    expert order)."""
    _, path = _native(tmp_path)
    frequency = {
        0: torch.tensor([0.1, 0.9, 0.5, 0.5]), 1: torch.tensor([0.8, 0.2, 0.3, 0.7]), 2: torch.tensor([0.0, 0.0, 1.0, 1.0])
    }
    store = ExpertStore(path)
    expected = [(0, 1), (1, 0), (2, 2), (0, 2), (1, 3), (2, 3), (0, 3)]
    assert warm_start(store, RoutingPrior((0, 1, 2), frequency, {}), 7) == expected
    store.close()


# ----------------------------------------------------------------------------- bad input


def _held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors `module` holds (parameters and buffers, each storage once)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("family", ["native", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_loaded_at_its_minimum_budget_holds_no_more(tmp_path, family, dtype):
    """At the minimum budget the refusal names, the model's tensors and the pool fit in it: the
    rotary tables, buffers no checkpoint holds, are counted (before: left out, moelab's model
    held 4 KiB past the budget here; at a 32k context and head_dim 128, 16 MiB in fp32)."""
    if family == "native":
        path = _native(tmp_path)[1]
    else:
        path = tmp_path
        build(family).save_pretrained(path)
    with pytest.raises(ValueError, match="is too small") as refused:
        load_offloaded(path, memory_budget=1000, dtype=dtype)
    minimum = int(re.search(r"the minimum is [\d.]+ MiB \((\d+) bytes\)", str(refused.value))[1])
    offloaded = load_offloaded(path, memory_budget=minimum, dtype=dtype)
    try:
        assert _held_bytes(offloaded.model) + _held_bytes(offloaded.cache.pool) <= minimum
    finally:
        offloaded.close()


def test_memory_budget_too_small_names_the_minimum(tmp_path):
    _, path = _native(tmp_path)
    with pytest.raises(ValueError, match=r"memory budget 0\.0 MiB \(10000 bytes\) is too small: the dense parts take .* the minimum is"):
        load_offloaded(path, memory_budget=10_000)
    for bad, message in ((dict(prefetch_factor=-1), "prefetch_factor must be a finite number >= 0"),
                         (dict(prefetch_factor=True), "prefetch_factor must be a finite number >= 0"),
                         (dict(prefetch_factor=0, predictor="lookahead"), r"\(> 0 with a predictor\), got 0"),
                         (dict(dtype=torch.int32), "dtype must be a floating-point torch.dtype"),
                         (dict(device="foo"), "unknown device 'foo'; choose 'cpu' or 'cuda'")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_offloaded(path, resident=0.5, **bad)
    roomy = load_offloaded(path, memory_budget=10**9, predictor=None, kv_cache_tokens=0)
    dense, expert = _held_bytes(roomy.model), roomy.cache.store.expert_bytes
    roomy.close()
    minimum = dense + 100 * kv_bytes_per_token(roomy.model, torch.float32) + 2 * expert  # the KV cache, top-2
    with pytest.raises(ValueError, match=rf"the minimum is [\d.]+ MiB \({minimum} bytes\)") as refused:
        load_offloaded(path, memory_budget=minimum - 1, kv_cache_tokens=100)
    shown = float(re.search(r"the minimum is ([\d.]+) MiB", str(refused.value))[1])
    assert shown * 2**20 >= minimum > (shown - 0.1) * 2**20  # rounded up: a budget of the MiB shown works
    load_offloaded(path, memory_budget=minimum, kv_cache_tokens=100, predictor=None).close()  # the minimum works
    with pytest.raises(ValueError, match="fewer than the 2 one token needs at one layer"):
        load_offloaded(path, resident=0.05)
    with pytest.raises(ValueError, match=r"exactly one of resident \(--resident: .*memory_budget \(--memory-budget"):
        load_offloaded(path)


def test_a_budget_in_bytes_sets_the_slots(tmp_path):
    _, path = _native(tmp_path)
    roomy = load_offloaded(path, memory_budget=10**9, predictor=None)
    assert roomy.cache.slots == 12  # every expert fits
    expert = roomy.cache.store.expert_bytes
    dense = _held_bytes(roomy.model)
    roomy.close()
    tight = load_offloaded(path, memory_budget=dense + 3 * expert + expert // 2, predictor=None)
    assert tight.cache.slots == 3
    tight.close()


def test_resident_keeps_the_nearest_whole_number_of_the_routed_experts(tmp_path):
    _, path = _native(tmp_path)
    for resident, slots in ((0.3, 4), (0.29, 3)):  # of 12: 3.6 and 3.48
        offloaded = load_offloaded(path, resident=resident, warm=False)
        offloaded.close()
        assert offloaded.cache.slots == slots


@pytest.mark.parametrize("layers,experts,top_k", [(3, 4, 2), (6, 8, 2), (58, 256, 8), (60, 384, 8), (48, 128, 1)])
def test_the_minimum_resident_fraction_a_refusal_names_keeps_one_tokens_experts(layers, experts, top_k):
    """The fraction a too-small `resident` is told to reach keeps top_k experts when given back
    (before: top_k / total to 4 decimals, rounded down where it fell so: DeepSeek-V3's 8 of 58 x 256
    showed 0.0005, which keeps 7)."""
    store = SimpleNamespace(moe_layers=list(range(layers)), num_experts=experts, expert_bytes=1)
    with pytest.raises(ValueError, match="the minimum is") as refused:
        resident_slots(store, 1 / (layers * experts * 4), None, 0, top_k)
    minimum = float(re.search(r"the minimum is ([\d.]+)$", str(refused.value))[1])
    assert resident_slots(store, minimum, None, 0, top_k) == top_k


def test_a_transformers_models_budget_counts_its_moe_blocks_routers_and_shared_experts(tmp_path):
    """Qwen2-MoE with attention biases (run by transformers, each MoE block rebuilt as a moelab
    `MoELayer`): the budget's dense part is every tensor the loaded model holds, the blocks'
    routers and shared experts and its rotary buffers included."""
    build("qwen2_moe").save_pretrained(tmp_path)
    roomy = load_offloaded(tmp_path, resident=1.0)
    assert not isinstance(roomy.model, MoETransformer)
    dense = _held_bytes(roomy.model)
    expert = roomy.cache.store.expert_bytes
    roomy.close()
    for spare, slots in ((0, 3), (-1, 2)):
        offloaded = load_offloaded(tmp_path, memory_budget=dense + 3 * expert + spare)
        offloaded.close()
        assert offloaded.cache.slots == slots


def test_a_budget_keeps_room_for_the_kv_cache(tmp_path):
    """kv_cache_tokens (sequences × positions) of keys and values come out of the budget before
    the experts' slots; one expert's worth more of them costs one slot."""
    model, path = _native(tmp_path)
    per_token = kv_bytes_per_token(model, torch.float32)
    roomy = load_offloaded(path, resident=1.0)
    expert, dense = roomy.cache.store.expert_bytes, _held_bytes(roomy.model)
    roomy.close()
    budget = dense + 3 * per_token * 10 + 3 * expert + expert // 2

    def slots(kv_cache_tokens: int) -> int:
        offloaded = load_offloaded(path, memory_budget=budget, kv_cache_tokens=kv_cache_tokens)
        offloaded.close()
        return offloaded.cache.slots

    assert slots(30) == 3 and slots(0) == (30 * per_token + 3 * expert + expert // 2) // expert  # 4 here
    tokens = 30 + -(-expert // per_token)  # one expert's bytes more of keys and values
    assert slots(tokens) == 2
    with pytest.raises(ValueError, match=r"the KV cache 0\.\d MiB .* the minimum is"):
        load_offloaded(path, memory_budget=budget, kv_cache_tokens=tokens + 2 * -(-expert // per_token))
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="kv_cache_tokens .* an integer >= 0"):
            load_offloaded(path, memory_budget=budget, kv_cache_tokens=bad)
    for bad in (True, float("nan"), float("inf"), "1GiB"):  # True was a budget of 1 byte, NaN failed inside int()
        with pytest.raises(ValueError, match="memory_budget counts bytes: a finite number"):
            load_offloaded(path, memory_budget=bad)
    with pytest.raises(ValueError, match=r"resident must be a fraction in \(0, 1\] .* got True"):  # was every expert
        load_offloaded(path, resident=True)
    with pytest.raises(ValueError, match="kv_cache_tokens keeps room .* in a memory_budget"):
        load_offloaded(path, resident=0.5, kv_cache_tokens=0)


def test_a_call_whose_kv_cache_outgrows_the_budgets_room_is_refused(tmp_path):
    """Loaded with room for 30 tokens: 2 prompts of 5 + 10 new tokens fit, 11 do not, and neither
    does a compiled call of 1 x (5 + 10), whose cache is rounded up to 64 positions (refused
    before anything is compiled)."""
    model, path = _native(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    uncounted = load_offloaded(path, memory_budget=10**9)  # the budget leaves the KV cache out: no check
    try:
        assert uncounted.kv_cache_tokens is None and torch.equal(uncounted.generate(ids, 11), generate_ids(model, ids, 11))
    finally:
        uncounted.close()
    offloaded = load_offloaded(path, memory_budget=10**9, kv_cache_tokens=30)
    try:
        assert torch.equal(offloaded.generate(ids, 10), generate_ids(model, ids, 10))
        with pytest.raises(ValueError, match=r"holds 32 tokens \(2 sequence\(s\) x 16 positions\) .* room for 30"):
            offloaded.generate(ids, 11)
        with pytest.raises(ValueError, match=r"holds 64 tokens \(1 sequence\(s\) x 64 positions\)"):
            offloaded.generate(ids[:1], 10, compile=True)
    finally:
        offloaded.close()


def test_a_call_past_the_context_is_refused_naming_the_context_not_the_budget(tmp_path):
    """generate's budget keeps room for at most the context's positions (`_kv_cache_tokens`): a
    transformers model's call past its max_position_embeddings is refused as such, not as a KV
    cache that outgrew the room (kv_cache_tokens, which `moelab generate` does not take)."""
    build("olmoe", max_position_embeddings=16).save_pretrained(tmp_path / "hf")
    offloaded = load_offloaded(tmp_path / "hf", memory_budget=10**9, kv_cache_tokens=2 * 16)
    try:
        ids = torch.randint(3, 32, (2, 5))
        assert offloaded.generate(ids, 11).shape == (2, 16)
        with pytest.raises(ValueError, match=r"prompt \(5\) \+ max_new_tokens \(12\) exceed the model's max_position_embeddings"):
            offloaded.generate(ids, 12)
    finally:
        offloaded.close()


def test_a_budget_keeps_room_for_each_sequences_recurrent_state(tmp_path):
    """Jamba (a Mamba layer): kv_cache_sequences sequences' state comes out of the budget beside the
    KV cache (one expert's worth of it costs a slot), the refusal names it, and a call with more
    sequences than the room kept is refused; a model without recurrent state is not."""
    reference = build("jamba")
    reference.save_pretrained(tmp_path / "hf")
    roomy = load_offloaded(tmp_path / "hf", resident=1.0)
    dense = _held_bytes(roomy.model)
    expert, model = roomy.cache.store.expert_bytes, roomy.model
    roomy.close()
    state, per_token = state_bytes_per_sequence(model, torch.float32), kv_bytes_per_token(model, torch.float32)
    assert state == 64 * 4 * 4 + 64 * 16 * 4  # a window of 4 over 64 channels, 64 x 16 float32 state
    budget = dense + 20 * per_token + 4 * expert + expert // 2

    def slots(sequences: int) -> int:
        offloaded = load_offloaded(tmp_path / "hf", memory_budget=budget, kv_cache_tokens=20, kv_cache_sequences=sequences)
        offloaded.close()
        return offloaded.cache.slots

    one = (4 * expert + expert // 2 - state) // expert  # 3 here
    assert slots(1) == one and slots(1 + -(-expert // state)) == one - 1
    with pytest.raises(ValueError, match=r"the KV cache 0\.\d MiB, the recurrent state 0\.\d MiB and .* the minimum is"):
        load_offloaded(tmp_path / "hf", memory_budget=budget, kv_cache_tokens=20, kv_cache_sequences=10)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match=r"kv_cache_sequences counts the sequences .* >= 1, got"):
            load_offloaded(tmp_path / "hf", memory_budget=budget, kv_cache_tokens=20, kv_cache_sequences=bad)
    ids = torch.randint(3, 32, (2, 5))
    offloaded = load_offloaded(tmp_path / "hf", memory_budget=10**9, kv_cache_tokens=20)
    try:
        assert offloaded.state_bytes == state and offloaded.generate(ids[:1], 3).shape == (1, 8)
        with pytest.raises(ValueError, match=r"decodes 2 sequences, each keeping 5120 bytes .* room for 1: load with kv_cache_sequences >= 2"):
            offloaded.generate(ids, 3)
    finally:
        offloaded.close()
    offloaded = load_offloaded(tmp_path / "hf", memory_budget=10**9, kv_cache_tokens=20, kv_cache_sequences=2)
    try:
        assert torch.equal(offloaded.generate(ids, 3), generate_ids(reference, ids, 3))
    finally:
        offloaded.close()
    _, path = _native(tmp_path)  # no recurrent state: sequences are not counted
    offloaded = load_offloaded(path, memory_budget=10**9, kv_cache_tokens=20)
    try:
        assert offloaded.state_bytes == 0 and offloaded.generate(ids, 3).shape == (2, 8)
    finally:
        offloaded.close()


def test_a_compiled_calls_kv_cache_is_counted_as_moelab_compiles_it(tmp_path):
    """A moelab model's compiled call holds its positions rounded up to 64 but not past the
    context (1 x (5 + 90) -> min(128, max_seq_len 100)); a transformers model's, never compiled
    by moelab, holds them unrounded: refused for compile=True, not for its KV cache (both refused
    before anything is compiled)."""
    torch.manual_seed(0)
    save_pretrained(MoETransformer(dataclasses.replace(tiny(), max_seq_len=100)).eval(), tmp_path / "m")
    ids = torch.zeros(1, 5, dtype=torch.long)
    offloaded = load_offloaded(tmp_path / "m", memory_budget=10**9, kv_cache_tokens=99)
    try:
        with pytest.raises(ValueError, match=r"holds 100 tokens \(1 sequence\(s\) x 100 positions\) .* room for 99"):
            offloaded.generate(ids, 90, compile=True)
    finally:
        offloaded.close()
    build("olmoe").save_pretrained(tmp_path / "hf")
    offloaded = load_offloaded(tmp_path / "hf", memory_budget=10**9, kv_cache_tokens=20)
    try:
        with pytest.raises(ValueError, match="compile=True needs a moelab model"):
            offloaded.generate(ids, 10, compile=True)
    finally:
        offloaded.close()


def test_decode_cache_length_is_the_prompts_and_new_tokens_compiled_rounded_up_to_64():
    assert decode_cache_length(3, 8, False) == 11 and decode_cache_length(3, 8, True) == 64
    assert decode_cache_length(60, 4, True) == 64 and decode_cache_length(60, 5, True) == 128
    assert decode_cache_length(60, 5, True, max_seq_len=100) == 100


@pytest.mark.parametrize("family", sorted(set(TINY) - {"deepseek_v4"}))  # its own test: test_deepseek_v4.py
def test_kv_bytes_per_token_are_what_transformers_caches(family):
    """Against the keys and values transformers' own cache holds after 2 sequences of 5 tokens
    (DeepSeek's latent attention caches a compressed latent, not per-head keys and values; LFM2-MoE's
    convolution layers cache none; MiniMax-M3's sparse layers cache their indexer's key beside, as do
    the indexed attention layers of dots3 and Hunyuan 4 that run an indexer)."""
    model = build(family).eval()
    held = _cached_kv_bytes(model)
    assert kv_bytes_per_token(model, torch.float32) * 2 * 5 == held
    assert kv_bytes_per_token(model, torch.bfloat16) * 2 * 5 == held // 2


def _cached_kv_bytes(model) -> int:
    """Bytes of keys and values (and indexer keys) transformers' cache holds after 2 sequences of 5 tokens."""
    with torch.no_grad():
        cache = model(torch.randint(0, 32, (2, 5)), use_cache=True).past_key_values
    # LFM2-MoE's convolution layers hold a fixed-size state, no keys or values; Nemotron-H's MoE layers none;
    # MiniMax-M3's sparse layers and DSA's DynamicIndexedLayer an indexer key beside
    tensors = {
        t.data_ptr(): t
        for layer in cache.layers
        for name in ("keys", "values", "idx_keys", "indexer_keys")
        if (t := getattr(layer, name, None)) is not None and t.numel()
    }
    return sum(t.nbytes for t in tensors.values())


INKLING2_LOOP_LAYERS = dict(
    TINY["inkling2_text"].config, num_hidden_layers=3, layer_types=["hybrid_sliding"] * 2 + ["hybrid"]
)
# Inkling 2 Loop: 3 passes through layer 1 of 3
INKLING2_LOOP = dict(INKLING2_LOOP_LAYERS, loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=3)


def test_kv_bytes_per_token_count_each_pass_of_inkling2_loops_looped_layers():
    """Inkling 2 Loop keeps a cache of its own for each pass through its looped layers (here layer 1 of
    3, 3 passes: 5 layer caches), its sliding layers with their own sizes (1 KV head, the full layer 2)."""
    model = build("inkling2_loop_text", **INKLING2_LOOP)
    held = _cached_kv_bytes(model.eval())
    assert held == (4 * 2 * 1 * 8 + 2 * 2 * 8) * 4 * 2 * 5  # 4 sliding layer caches, 1 full one, fp32
    assert kv_bytes_per_token(model, torch.float32) * 2 * 5 == held


def test_kv_bytes_per_token_leave_out_the_indexer_key_of_layers_that_share_one():
    """A Hunyuan 4 layer whose indexer_types entry is "shared" reuses the previous layer's selection and
    caches no indexer key."""
    model = build(
        "hy_v4", num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"], indexer_types=["full", "shared", "full"]
    ).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 32, (2, 5)), use_cache=True).past_key_values
    assert [layer.indexer_keys is not None for layer in cache.layers] == [True, False, True]
    held = sum(
        layer.keys.nbytes + layer.values.nbytes + (0 if layer.indexer_keys is None else layer.indexer_keys.nbytes)
        for layer in cache.layers
    )
    assert kv_bytes_per_token(model, torch.float32) * 2 * 5 == held


# the recurrent families: hf_tiny's hybrids, Nemotron-H with a Mamba-2 layer (test_nemotron_h's kinds), and the
# structural ones (Qwen3-Next's Gated DeltaNet, test_mtp's config; MiniMax's lightning attention, Lara-Mini's
# Gated DeltaNet, test_hf_fallback's; Qwen4-Exp's, with its dilated PLE convolution and n-gram history)
QWEN3_NEXT = dict(
    TINY["mixtral"].config, num_hidden_layers=4, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2, linear_num_value_heads=4,
    linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
)  # fmt: skip
RECURRENT = {
    "jamba": {}, "granitemoehybrid": {}, "kimi_linear": {}, "bailing_hybrid": {}, "lfm2_moe": {},
    "nemotron_h": dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "moe"]),
    "qwen3_next": QWEN3_NEXT,
    "minimax": dict(
        TINY["mixtral"].config, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"],
    ),
    "lara_mini": dict(
        QWEN3_NEXT, num_hidden_layers=2, num_experts=4, shared_expert_intermediate_size=24, sliding_window=16,
        layer_types=["linear_attention", "sliding_attention"],
    ),
}  # fmt: skip


def held_state(cache) -> int:
    """Bytes of the fixed-size state transformers' cache holds: its LinearAttentionLayers' convolution
    and recurrent states, MiniMax's linear_cache."""
    states = [getattr(layer, name, None) or {} for layer in cache.layers for name in ("conv_states", "recurrent_states")]
    tensors = [t for state in states for t in state.values()]
    tensors += list(getattr(cache, "linear_cache", []))
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def assert_state_is_what_transformers_holds(model) -> int:
    """state_bytes_per_sequence(model, dtype) x sequences is what the cache holds after a prompt of 5
    and after 2 decoding steps, for 1 and 2 sequences, in fp32 and bf16 (recurrent states stay float32
    in bf16, convolution windows do not); the fp32 count."""
    counts = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        counts[dtype] = state_bytes_per_sequence(model, dtype)
        for B in (1, 2):
            with torch.no_grad():
                cache = model(torch.randint(3, 32, (B, 5)), use_cache=True).past_key_values
                held = [held_state(cache)]
                for _ in range(2):
                    model(torch.randint(3, 32, (B, 1)), cache=cache, use_cache=True)
                    held.append(held_state(cache))
            assert held == [B * counts[dtype]] * 3, (dtype, B)
    assert 0 < counts[torch.bfloat16] < counts[torch.float32]
    return counts[torch.float32]


@pytest.mark.parametrize("family", sorted(RECURRENT))
def test_state_bytes_per_sequence_are_what_transformers_caches(family):
    assert_state_is_what_transformers_holds(build(family, **RECURRENT[family]))


def test_state_bytes_per_sequence_count_qwen4_exps_convolutions_and_ngram_history():
    from test_qwen4_exp import QWEN4_EXP

    state = assert_state_is_what_transformers_holds(build("qwen4_exp_text", **QWEN4_EXP))
    # its Gated DeltaNet: a window of 4 over q, k, v (64 channels) and 4 heads' 8 x 8 float32 state;
    # its PLE: a dilated window of (4 - 1) x 3 over 2 streams x 32 channels; 2 previous token ids
    assert state == 64 * 4 * 4 + 4 * 8 * 8 * 4 + 64 * 9 * 4 + 2 * 8


@pytest.mark.parametrize("released", [True, False], ids=["released", "transformers-names"])
def test_inkling2_loop_decodes_offloaded_as_transformers(tmp_path, one_thread, released):
    """Inkling 2 Loop decodes offloaded as transformers does, as released (and saved by default: its message
    queries stored as two tensors, merged as transformers merges them on loading) and under transformers'
    names. Its loop spans two blocks, so that the messages read a block state past the restart and so the
    queries matter."""
    torch.manual_seed(0)
    config = dict(INKLING2_LOOP, num_hidden_layers=4, layer_types=["hybrid_sliding"] * 3 + ["hybrid"],
                  loop_layer_index_end=3, loop_num_passes=2)  # fmt: skip
    model = build("inkling2_loop_text", **config).eval()
    model.save_pretrained(tmp_path, save_original_format=released)
    ids = torch.randint(0, 64, (1, 6))
    offloaded = load_offloaded(tmp_path, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(ids, 8), generate_ids(model, ids, 8))
    finally:
        offloaded.close()


@pytest.mark.parametrize("loop", [False, True])
def test_state_bytes_per_sequence_count_inkling2s_short_convolutions(tmp_path, loop):
    """Inkling 2's four short convolutions a layer (key and value: static in sliding layers, dynamic in
    full ones; after attention; after the MLP) keep a float32 window of 4 per channel, in bf16 too, and
    Inkling 2 Loop's looped layers one a pass (layer 1 of 3, 3 passes); a memory budget counts them."""
    model = build("inkling2_loop_text", **INKLING2_LOOP) if loop else build("inkling2_text", **INKLING2_LOOP_LAYERS)
    model.save_pretrained(tmp_path, save_original_format=not loop)  # see the next test
    for dtype in (torch.float32, torch.bfloat16):
        model = load(tmp_path, dtype)
        with torch.no_grad():
            cache = model(torch.randint(3, 32, (2, 5)), use_cache=True).past_key_values
        # channels: a sliding layer's key and value 1 x 8 each, the full one's 2 x 8; after attention and MLP 32
        sliding, full = 2 * 8 + 2 * 32, 2 * 16 + 2 * 32
        assert state_bytes_per_sequence(model, dtype) == (sliding * (4 if loop else 2) + full) * 4 * 4
        assert held_state(cache) == 2 * state_bytes_per_sequence(model, dtype)
    offloaded = load_offloaded(tmp_path, memory_budget=2**26, kv_cache_tokens=16, kv_cache_sequences=2)
    assert offloaded.state_bytes == state_bytes_per_sequence(model, torch.float32)
    offloaded.close()


def test_models_without_recurrent_layers_keep_no_state():
    assert state_bytes_per_sequence(MoETransformer(tiny()), torch.float32) == 0
    for family in ("mixtral", "deepseek_v3", "gpt_oss"):
        assert state_bytes_per_sequence(build(family), torch.float32) == 0


def test_a_recurrent_mixer_it_cannot_size_is_an_error():
    model = build("jamba")
    del model.model.layers[1].mamba.ssm_state_size  # a Mamba it does not recognise: a convolution and what else?
    with pytest.raises(ValueError, match="cannot size the state that layer 1's JambaMambaMixer keeps"):
        state_bytes_per_sequence(model, torch.float32)


def test_kv_bytes_per_token_are_what_moelabs_cache_holds():
    config = dataclasses.replace(tiny(), n_kv_heads=1)
    cache = KVCache(config, batch_size=2, max_len=5)
    held = sum(t.nbytes for t in cache.k + cache.v)
    assert kv_bytes_per_token(MoETransformer(config), torch.float32) * 2 * 5 == held


def test_compiled_decoding_refuses_read_ahead_and_transformers_models(tmp_path):
    """compile=True runs the step as one graph: read-ahead hooks (Python at every layer) and
    transformers models cannot; both refused before anything is compiled."""
    model, path = _native(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    offloaded = load_offloaded(path, resident=0.5, predictor="lookahead")
    try:
        with pytest.raises(ValueError, match="cannot read ahead .*'lookahead'"):
            offloaded.generate(ids, 2, compile=True)
    finally:
        offloaded.close()
    hf_model = build("mixtral", seed=0)
    with pytest.raises(ValueError, match="compile=True needs a moelab model"):
        generate_ids(hf_model, ids, 2, compile=True)


def test_a_restarted_cache_behaves_as_a_new_one(tmp_path, one_thread):
    """`ExpertCache.restart(warm)` after some decoding: the next decoding makes the same hits,
    misses and evictions as on a freshly loaded model with that warm start."""

    model, path = _native(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    counts = []
    for restart in (False, True):
        offloaded = load_offloaded(path, resident=0.34)
        try:
            if restart:
                offloaded.generate(ids.flip(1), 7)
                cache = offloaded.cache
                cache.restart(warm_start(cache.store, None, cache.slots))
            offloaded.generate(ids, 9)
            counts.append(({n: (s.requests, s.hits, s.misses) for n, s in offloaded.cache.stats.items()}, offloaded.cache.resident()))
        finally:
            offloaded.close()
    assert counts[0] == counts[1] and counts[0][0][1][2] > 0, counts


def test_restart_waits_for_a_running_read_ahead_before_refilling(tmp_path, monkeypatch):
    """A read-ahead still running when the cache restarts ends before the warm start's reads write
    the emptied pool: else its bytes would land on whatever expert the slot is given."""
    cache = _cache(tmp_path, 3, "reuse")
    events, release = _gate_reads(monkeypatch)
    try:
        cache.prefetch(1, torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0.9, 0, 0]), limit=1)
        _wait_for(events, ("start", 1, 1))
        slot = cache._slot_of[1, 1]  # noqa: SLF001
        threading.Timer(0.2, release.set).start()
        cache.restart([(2, 3)])
        assert events.index(("end", 1, 1)) < events.index(("start", 2, 3)) and cache._slot_of[2, 3] == slot  # noqa: SLF001
        torch.testing.assert_close(cache.pool.down_proj[slot], cache.store.read(2, 3).down[0], rtol=0, atol=0)
    finally:
        release.set()
        cache.close()


def test_bad_options_and_mismatched_prior(tmp_path):
    model, path = _native(tmp_path)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        load_offloaded(path, resident=0.5, eviction="fifo")
    with pytest.raises(ValueError, match="needs a RoutingPrior"):
        load_offloaded(path, resident=0.5, predictor="affinity")
    with pytest.raises(ValueError, match="unknown predictor"):
        load_offloaded(path, resident=0.5, predictor="oracle")
    other = RoutingPrior((0, 1), {0: torch.ones(4), 1: torch.ones(4)}, {0: torch.ones(4, 4)})
    with pytest.raises(ValueError, match="covers MoE layers"):
        load_offloaded(path, resident=0.5, prior=other)


@pytest.mark.parametrize("family,direct", [("native", True), ("mixtral", True), ("qwen2_moe", True), ("gpt_oss", False)])
def test_load_reads_an_expert_straight_into_its_slot_where_the_files_allow(tmp_path, monkeypatch, family, direct):
    """`ExpertStore.load` fills a slot with what reading the view and copying gives, and reads
    straight into the slot (no view) where the files hold the expert as the pool lays it out:
    not for GPT-OSS (transposed, interleaved, biases) nor in another dtype than stored."""
    if family == "native":
        path = _native(tmp_path)[1]
    else:
        torch.manual_seed(0)
        build(family).save_pretrained(tmp_path)
        path = tmp_path
    views = []
    read = ExpertStore.read
    monkeypatch.setattr(ExpertStore, "read", lambda self, *key: views.append(key) or read(self, *key))
    for dtype in (torch.float32, torch.bfloat16):
        store = ExpertStore(path, dtype=dtype)
        try:
            layer, expert = store.moe_layers[-1], store.num_experts - 1
            pool, reference = store.empty(2), store.empty(2)
            unregistered = empty_experts(store._template, 2, dtype=dtype)  # no byte views made by `empty`
            views.clear()
            store.load(layer, expert, pool, 1)
            assert (not views) == (direct and dtype == torch.float32), (family, dtype)
            store.checkpoint.close()  # the shards reopen on the next read
            store.load(layer, expert, unregistered, 1)
            store.load(layer, 0, pool, 0)
            copy_expert(read(store, layer, expert), reference, 1)
            copy_expert(read(store, layer, 0), reference, 0)
            for got, want, other in zip(pool.parameters(), reference.parameters(), unregistered.parameters(), strict=True):
                assert torch.equal(got, want)
                assert torch.equal(other[1], want[1])
        finally:
            store.close()


def test_a_pool_in_another_dtype_than_the_stores_is_filled_by_converting(tmp_path):
    """A float32 store loading into a bf16 pool (not from its `empty`) converts the expert, also
    after a float32 pool of the same shape read that expert straight from the files."""
    store = ExpertStore(_native(tmp_path)[1])
    try:
        layer = store.moe_layers[0]
        same, other = store.empty(1), empty_experts(store._template, 1, dtype=torch.bfloat16)
        store.load(layer, 2, same, 0)
        store.load(layer, 2, other, 0)
        for got, want in zip(other.parameters(), same.parameters(), strict=True):
            assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    finally:
        store.close()


def test_a_store_names_one_experts_width_and_bytes_and_reads_that_one_expert(tmp_path):
    """Mixtral's tiny experts (I = 16, D = 32): expert_width is I, expert_bytes three I x D matrices
    in the store's dtype, and a read holds the one expert asked for."""
    torch.manual_seed(0)
    build("mixtral").save_pretrained(tmp_path)
    I, D = TINY["mixtral"].config["intermediate_size"], TINY["mixtral"].config["hidden_size"]
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        store = ExpertStore(tmp_path, dtype=dtype)
        try:
            assert (store.expert_width, store.expert_bytes) == (I, 3 * I * D * size) and I != D
            layer = store.moe_layers[0]
            one, whole = store.read(layer, 2), store.view.experts(layer, range(store.num_experts))
            assert one.gate.shape[0] == 1 and torch.equal(one.gate[0], whole.gate[2])
        finally:
            store.close()


def test_a_store_keeps_no_experts_weights_outside_the_pool(tmp_path):
    """The first expert, read to learn the experts' shapes, is not kept: a memory budget counts the
    pool's slots, and a store holding an expert beside them held one expert (in the files' dtype)
    past it. Its shapes still build pools and check later layers' experts."""
    _, path = _native(tmp_path)
    store = ExpertStore(path)
    try:
        held = [t for t in vars(store._template).values() if isinstance(t, torch.Tensor)]  # noqa: SLF001
        assert held and all(t.is_meta for t in held)
        pool = store.empty(2)
        store.load(1, 3, pool, 0)
        assert torch.equal(pool.down_proj[0], store.read(1, 3).down[0])
    finally:
        store.close()


def test_read_into_refuses_a_target_of_another_dtype_or_shape(tmp_path):
    store = ExpertStore(_native(tmp_path)[1])
    try:
        name = "layers.0.ffn.experts.down_proj"
        D, I = store.empty(1).dim, store.empty(1).hidden_dim
        with pytest.raises(ValueError, match="into a torch.bfloat16"):
            store.checkpoint.read_into(name, torch.empty(D, I, dtype=torch.bfloat16), row=0)
        with pytest.raises(ValueError, match=r"into a torch.float32 \[3, 3\] tensor"):
            store.checkpoint.read_into(name, torch.empty(3, 3), row=0)
        with pytest.raises(ValueError, match="got a non-contiguous one on cpu"):
            store.checkpoint.read_into(name, torch.empty(I, D).t(), row=0)
        with pytest.raises(CheckpointError, match="cannot read rows"):
            store.checkpoint.read_into(name, torch.empty(D, I), row=store.num_experts)
    finally:
        store.close()


def test_an_expert_past_the_stored_ones_is_refused(tmp_path):
    """A config that claims more experts than the stacked tensors hold: reading one past them is a
    clear error, not the neighbouring tensor's bytes."""
    import json

    _, path = _native(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["moe"]["num_experts"] += 1
    (path / "config.json").write_text(json.dumps(config))
    store = ExpertStore(path)
    try:
        with pytest.raises(CheckpointError, match="holds 4 experts, but expert 4 was asked for.*does not match its config"):
            store.load(store.moe_layers[0], 4, store.empty(2), 0)
    finally:
        store.close()
    store = ExpertStore(_native(tmp_path / "fits")[1])  # a config that fits: E is past the last expert
    try:
        for expert in (-1, store.num_experts):
            with pytest.raises(ValueError, match=f"expert {expert} out of range: the layers have 4 experts"):
                store.read(store.moe_layers[0], expert)
            with pytest.raises(ValueError, match=f"expert {expert} out of range"):
                store.load(store.moe_layers[0], expert, store.empty(2), 0)
        with pytest.raises(ValueError, match=r"layer 3 has no routed experts; the MoE layers are \[0, 1, 2\]"):
            store.read(3, 0)
    finally:
        store.close()


def test_experts_of_another_width_at_a_later_layer_are_refused(tmp_path):
    """One pool holds every layer's experts: a layer whose experts are narrower than the first MoE
    layer's is named, by read and by load."""
    from safetensors.torch import load_file, save_file

    _, path = _native(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["layers.1.ffn.experts.gate_up_proj"] = tensors["layers.1.ffn.experts.gate_up_proj"][:, :48].clone()
    tensors["layers.1.ffn.experts.down_proj"] = tensors["layers.1.ffn.experts.down_proj"][..., :24].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})  # layer 1: I = 24, not 32
    store = ExpertStore(path)
    try:
        message = r"layer 1's experts have up \[24, 32\] but layer 0's have \[32, 32\]; offloading needs one"
        with pytest.raises(CheckpointError, match=message):
            store.read(1, 0)
        with pytest.raises(CheckpointError, match=message):
            store.load(1, 0, store.empty(2), 0)
        assert store.read(2, 0).gate.shape[1:] == (32, 32)  # the other layers still read
    finally:
        store.close()


def test_emulated_storage_bandwidth(tmp_path):
    """read_bandwidth makes each read last at least an expert's bytes over it (a floor, not a speed)."""
    import time

    _, path = _native(tmp_path)
    with pytest.raises(ValueError, match="read_bandwidth must be > 0"):
        ExpertStore(path, read_bandwidth=0)
    store = ExpertStore(path, read_bandwidth=1.0)
    store.read_bandwidth = store.expert_bytes / 0.05  # 50 ms per expert
    start = time.perf_counter()
    store.read(1, 2)
    assert time.perf_counter() - start >= 0.05
    store.close()


def test_emulated_storage_bandwidth_sleeps_only_what_a_read_left_of_its_floor(tmp_path, monkeypatch):
    """On a scripted clock: a read that took 20 ms of a 50 ms floor sleeps the other 30 ms, one that
    took 80 ms sleeps none."""
    import types

    import moelab.offload.store as store_module

    _, path = _native(tmp_path)
    store = ExpertStore(path)
    store.read_bandwidth = store.expert_bytes / 0.05
    ticks, slept = iter([10.0, 10.02, 20.0, 20.08]), []  # each read: its start, its end
    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks), sleep=slept.append))
    store.read(1, 2)
    store.read(1, 3)
    assert slept == [pytest.approx(0.03), 0.0]
    store.close()


def _cached(path, offset: int, nbytes: int, preadv=None) -> bool:
    """Whether these bytes of a file are all in the OS page cache: a read that may not wait for the
    device (RWF_NOWAIT) gets them all."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # looking must not read ahead
        return (preadv or os.preadv)(fd, [bytearray(nbytes)], offset, os.RWF_NOWAIT) == nbytes
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_store_past_the_page_cache_reads_every_expert_from_the_device(tmp_path, monkeypatch):
    """page_cache=False (the benchmarks' real-storage mode): each read's bytes are dropped from the
    page cache before the read (other reads, and the kernel's read-ahead, may have brought them
    in) and after it, so the read went to the device and left nothing cached; the experts are
    those a cached store reads, and offloaded decoding gives the in-memory tokens."""
    import os

    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("needs RWF_NOWAIT reads (Linux) to see what the page cache holds")
    model, path = _native(tmp_path)
    shard = path / "model.safetensors"
    fd = os.open(shard, os.O_RDONLY)
    os.fsync(fd)  # dirty pages (the file was just written) cannot be dropped
    os.close(fd)
    cached, uncached = ExpertStore(path), ExpertStore(path, page_cache=False)
    try:
        layer, expert = uncached.moe_layers[-1], uncached.num_experts - 1
        got, want = uncached.empty(1), cached.empty(1)
        cached.load(layer, expert, want, 0)  # the expert's bytes now in the page cache
        reads = uncached._reads(layer, expert, got)
        sizes = {"gate_up": got.gate_up_proj[0].nbytes, "down": got.down_proj[0].nbytes}
        if not all(_cached(shard, r.offset, sizes[r.part]) for r in reads):
            pytest.skip("this filesystem does not keep read pages cached the way the test expects")
        device_reads, real = [], os.preadv

        def preadv(fd, buffers, offset, *flags):
            device_reads.append(not _cached(shard, offset, sum(len(b) for b in buffers), real))
            return real(fd, buffers, offset, *flags)

        # the kernel's read-ahead from the cached load may still be filling pages when the store drops
        # them (seen once in a full run): each try caches the expert again first, so a store that did not
        # drop before reading would fail every try
        for _ in range(3):
            cached.load(layer, expert, want, 0)
            device_reads.clear()
            monkeypatch.setattr(os, "preadv", preadv)
            uncached.load(layer, expert, got, 0)
            monkeypatch.undo()
            if all(device_reads):
                break
        assert device_reads == [True] * len(reads), "every byte read from the device, none from the cache"
        assert not any(_cached(shard, r.offset, sizes[r.part]) for r in reads), "and left out of the cache"
        for a, b in zip(got.parameters(), want.parameters(), strict=True):
            assert torch.equal(a, b)
    finally:
        cached.close()
        uncached.close()
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    offloaded = load_offloaded(path, resident=0.5, page_cache=False)
    try:
        assert torch.equal(generate_ids(offloaded.model, ids, 6), model.generate(ids, 6, greedy=True))
    finally:
        offloaded.close()


def test_offloaded_experts_refuse_training(tmp_path):
    model, path = _native(tmp_path)
    offloaded = load_offloaded(path, resident=0.5, predictor=None)
    try:
        experts = offloaded.model.layers[0].ffn.experts
        assert isinstance(experts, OffloadedExperts)
        with pytest.raises(ValueError, match="inference only"):
            offloaded.model(torch.randint(0, 128, (1, 4)))
    finally:
        offloaded.close()


@pytest.mark.parametrize(
    ("moe", "named"),
    [
        (dict(chain_iterations=2), "chain_iterations=2"),
        (dict(reuse_layers=3), "reuse_layers=3"),
        (dict(router="topp", top_p=0.5), "router='topp'"),
    ],
)
def test_architectures_the_view_does_not_cover_are_named(tmp_path, moe, named):
    """Chain-of-Experts was refused as "no layers with routed experts", ReXMoE as a wrong expert
    count in config.json; each is named, with what to do."""
    cfg = dataclasses.replace(tiny(), n_layers=3, first_k_dense=0, moe=dataclasses.replace(tiny().moe, **moe))
    path = save_pretrained(MoETransformer(cfg), tmp_path / "m")
    with pytest.raises(CheckpointError, match=f"{named}.* covers top-k and hash-routed MoE layers .* run this model in"):
        load_offloaded(path, resident=0.5, predictor=None)


@pytest.mark.parametrize("activation,bias,latent", [("gelu", True, None), ("relu2", False, None), ("swiglu", False, 8)])
def test_plain_and_latent_experts_decode_offloaded_as_in_memory(tmp_path, activation, bias, latent, one_thread):
    """moelab's MLPExperts (no gate projection): read straight into the pool's up/down slots, or,
    with biases, through the view; latent experts (MoLAE) behind their shared projections."""
    model, path = _native(tmp_path, shared=1, activation=activation, expert_mlp_bias=bias, latent_dim=latent)
    offloaded = load_offloaded(path, resident=0.5, predictor="lookahead")
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        assert torch.equal(offloaded.generate(ids, 8), generate_ids(model, ids, 8))
        assert (offloaded.cache.store._reads(0, 1, offloaded.cache.pool) is None) == bias
    finally:
        offloaded.close()


def test_a_checkpoint_with_a_layer_past_its_configs_count_is_refused(tmp_path):
    _, path = _native(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_layers": 2}))  # the checkpoint has 3
    with pytest.raises(CheckpointError, match=r"holds layers \[2\] but config.json has 2"):
        load_offloaded(path, resident=0.5)


def test_a_checkpoint_rewritten_under_the_cache_is_refused(tmp_path):
    model, path = _native(tmp_path)
    offloaded = load_offloaded(path, resident=2 / 12, predictor=None)
    try:
        [shard] = path.glob("*.safetensors")
        shard.write_bytes(shard.read_bytes() + b" ")  # rewritten: one byte longer
        with pytest.raises(CheckpointError, match="changed on disk while moelab was reading it"):
            offloaded.generate(torch.randint(0, 128, (1, 4)), 4)
    finally:
        offloaded.close()


def _rewrite(directory, change) -> None:
    """Rewrite every tensor of the checkpoint's shards as change(name, tensor) gives it."""
    for shard in directory.glob("*.safetensors"):
        tensors = {name: change(name, tensor) for name, tensor in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})


def _spoil(spoilt: dict[str, tuple[int, float]]):
    """A `_rewrite` change: {tensor name: (an entry of its first dim, the value its first element gets)}."""
    def change(name, tensor):
        if name in spoilt:
            row, value = spoilt[name]
            tensor[row].view(-1)[0] = value
        return tensor
    return change


@pytest.mark.parametrize(  # read straight into the slot, read and converted, bf16 straight
    "stored,dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
)
def test_an_expert_holding_inf_or_nan_is_refused_by_name_when_it_loads(tmp_path, stored, dtype, one_thread):
    """A corrupt expert is refused naming its tensor at its first load from the files: in the warm
    start for one decoding never chooses (before: no error), on demand for one it chooses (before:
    the router's NaN message). One never loaded is never read, so it cannot reach the tokens."""
    model, path = _native(tmp_path)
    _rewrite(path, lambda name, tensor: tensor.to(stored))
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    clean = load_offloaded(path, resident=1.0, warm=False, dtype=dtype)
    try:
        want = clean.generate(ids, 1)
        chosen = clean.cache.resident()
    finally:
        clean.close()
    everyone = {(i, e) for i in range(3) for e in range(4)} - {(0, 0)}  # (0, 0): read when the store opens
    (layer, unchosen), (layer_b, picked) = min(everyone - chosen), max(chosen)
    name, name_b = f"layers.{layer}.ffn.experts.down_proj", f"layers.{layer_b}.ffn.experts.gate_up_proj"
    _rewrite(path, _spoil({name: (unchosen, float("inf"))}))
    never_read = load_offloaded(path, resident=1.0, warm=False, dtype=dtype)
    try:
        assert torch.equal(never_read.generate(ids, 1), want)
    finally:
        never_read.close()
    refused = f"{name}[{unchosen}:{unchosen + 1}] holds Inf/NaN: the checkpoint is corrupt"
    with pytest.raises(CheckpointError, match=re.escape(refused)):
        load_offloaded(path, resident=1.0, dtype=dtype)
    _rewrite(path, _spoil({name_b: (picked, float("nan"))}))
    offloaded = load_offloaded(path, resident=1.0, warm=False, dtype=dtype)
    refused = f"{name_b}[{picked}:{picked + 1}] holds Inf/NaN: the checkpoint is corrupt"
    try:
        with pytest.raises(CheckpointError, match=re.escape(refused)):
            offloaded.generate(ids, 1)
    finally:
        offloaded.close()


@pytest.mark.parametrize(
    "source,spoilt",
    [
        ("gpt_oss", "model.layers.1.mlp.experts.gate_up_proj"),  # read through the view (transposed, biases)
        ("gpt_oss", "model.layers.1.mlp.router.weight"),  # held in memory, read through the view
        ("fp8", "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"),  # dequantized on read
        ("mxfp4", "model.layers.1.mlp.experts.down_proj_scales"),
    ],
)
def test_transformers_and_quantized_checkpoints_holding_inf_or_nan_are_refused(tmp_path, source, spoilt):
    """The warm start loads every expert here; the routers a transformers family's MoE blocks hold
    are checked as they load, as its other dense weights are. Quantized weights are checked once
    dequantized (an E8M0 scale of 255 is NaN), their float scales as read."""
    torch.manual_seed(0)
    plain = tmp_path / "plain"
    if source == "fp8":  # whole blocks of 16 x 8
        build("qwen3_moe", moe_intermediate_size=32).save_pretrained(plain)
        fp8_release(plain, path := tmp_path / "fp8")
    else:  # MXFP4: whole groups of 32
        build("gpt_oss", intermediate_size=32).save_pretrained(plain)
        path = _mxfp4(plain, tmp_path / "mxfp4")[0] if source == "mxfp4" else plain
    value = 255 if source == "mxfp4" else float("inf")
    _rewrite(path, _spoil({spoilt: (1, value)}))
    named = re.escape(spoilt.removesuffix("_scales")) + r".* holds (Inf/NaN|NaN or Inf)"  # MXFP4: dequantized
    with pytest.raises(CheckpointError, match=named):
        load_offloaded(path, resident=1.0, dtype=torch.bfloat16).close()


def test_every_tiny_family_is_covered():
    assert {"mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"} <= TINY.keys()


# ----------------------------------------------------------------------------- a pool on an accelerator


class _Streams:
    """A stand-in for `torch.cuda`'s streams and events that runs every copy at once (CPU tensors)
    but checks the order a GPU, which runs them later, would need. Each stream and the host keep a
    vector clock of the work they know has run (an event carries its stream's clock, a wait merges
    it, `synchronize` merges it into the host's, and work queued by the host knows what the host
    knows); an access that is not ordered after a conflicting one is recorded in `races`."""

    def __init__(self):
        self.host: dict[str, int] = {}
        self.compute = self.Stream(None, "compute")
        self._local = threading.local()  # each thread's current stream, as in CUDA
        self.races: list[str] = []
        self.slot_writes: dict[int, tuple[str, int]] = {}  # slot -> its last copy in (stream, position)
        self.slot_reads: dict[int, tuple[str, int]] = {}  # slot -> its last read by the compute stream
        self.buffer_reads: dict[int, tuple[str, int]] = {}  # id(buffer) -> its last copy out

    def Stream(self, device, name: str = "copy"):  # noqa: N802 - torch.cuda's name
        return _Stream(self, name)

    def Event(self, blocking: bool = False):  # noqa: N802
        return _Event(self)

    @contextlib.contextmanager
    def stream(self, stream):
        previous = self.current_stream()
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = previous

    def current_stream(self, device=None):
        return getattr(self._local, "stream", self.compute)

    def knows(self, clock: dict[str, int], done: tuple[str, int] | None) -> bool:
        return done is None or clock.get(done[0], 0) >= done[1]


class _Stream:
    def __init__(self, streams: _Streams, name: str):
        self.streams, self.name, self.clock = streams, name, {}

    def queue(self) -> tuple[str, int]:
        """Queue one operation: it follows what the host knows. Returns its (stream, position)."""
        for name, n in self.streams.host.items():
            self.clock[name] = max(self.clock.get(name, 0), n)
        self.clock[self.name] = self.clock.get(self.name, 0) + 1
        return self.name, self.clock[self.name]

    def wait_event(self, event):
        for name, n in event.clock.items():
            self.clock[name] = max(self.clock.get(name, 0), n)

    def synchronize(self):
        for name, n in self.clock.items():
            self.streams.host[name] = max(self.streams.host.get(name, 0), n)


class _Event:
    def __init__(self, streams: _Streams):
        self.streams, self.clock = streams, {}

    def record(self, stream):
        stream.queue()
        self.clock = dict(stream.clock)

    def synchronize(self):
        for name, n in self.clock.items():
            self.streams.host[name] = max(self.streams.host.get(name, 0), n)

    def query(self):
        """Whether the host knows the work before this event has run (the stand-in runs nothing
        later, so a copy counts as running until something waited for it)."""
        return all(self.streams.host.get(name, 0) >= n for name, n in self.clock.items())


def _checked_copier(monkeypatch, streams: _Streams):
    """SlotCopier's copies and host reads, checked against `streams`' clocks."""
    from moelab.offload.copier import SlotCopier

    copy_in, load = SlotCopier._copy_in, ExpertStore.load  # noqa: SLF001

    def checked_copy_in(self, slot, source, index):
        stream = streams.current_stream()
        at = stream.queue()
        if not streams.knows(stream.clock, streams.slot_reads.get(slot)):
            streams.races.append(f"copy into slot {slot} before the compute stream's last read of it")
        streams.slot_writes[slot] = streams.buffer_reads[id(source), index] = at
        copy_in(self, slot, source, index)

    def checked_load(self, layer, expert, pool, slot):
        if not streams.knows(streams.host, streams.buffer_reads.get((id(pool), slot))):
            streams.races.append("a host buffer refilled before its last copy out ran")
        load(self, layer, expert, pool, slot)

    monkeypatch.setattr(SlotCopier, "_copy_in", checked_copy_in)
    monkeypatch.setattr(ExpertStore, "load", checked_load)


def _compute_reads(streams: _Streams, slots: list[int]) -> None:
    """The compute stream's kernels reading `slots`, checked against their copies."""
    at = streams.compute.queue()
    for slot in slots:
        if not streams.knows(streams.compute.clock, streams.slot_writes.get(slot)):
            streams.races.append(f"the compute stream read slot {slot} before its copy")
        streams.slot_reads[slot] = at


@settings(max_examples=30, deadline=None)
@given(
    calls=st.lists(st.tuples(st.integers(0, 2), st.sets(st.integers(0, 3), min_size=1, max_size=3)), min_size=1, max_size=12),
    slots=st.integers(3, 12),
    eviction=st.sampled_from(["lru", "reuse"]),
    host_memory=st.booleans(),
)  # fmt: skip
def test_an_accelerator_pool_orders_every_copy_against_the_compute_stream(
    tmp_path_factory, calls, slots, eviction, host_memory
):
    """Random fetches and read-aheads into a pool behind `SlotCopier` (through host buffers, or from
    a host copy of every expert): no copy into a slot before the compute stream's last read of its
    previous expert, no read before its copy, no host buffer refilled before its copy out ran; and
    every slot handed out holds its expert."""
    streams = _Streams()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _checked_copier(monkeypatch, streams)
        _, path = _native(tmp_path_factory.mktemp("c"))
        cache = ExpertCache(ExpertStore(path), slots, eviction=eviction, streams=streams, host_memory=host_memory)
        try:
            for layer, experts in calls:
                experts = sorted(experts)
                got = cache.fetch(layer, experts, tokens=len(experts))
                _compute_reads(streams, got)
                cache.prefetch((layer + 1) % 3, torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.full((4,), 0.5), limit=2)
                cache.release()
                for expert, slot in zip(experts, got):
                    one = cache.store.read(layer, expert)
                    assert torch.equal(cache.pool.down_proj[slot], one.down[0])
        finally:
            cache.close()
    assert streams.races == []


@pytest.mark.parametrize("read_ahead", [False, True])
@pytest.mark.parametrize("mutation", ["no ready", "no used", "no synchronize"])
def test_the_copy_order_checker_catches_each_missing_wait(tmp_path, monkeypatch, mutation, read_ahead):
    """Each of the three waits removed in turn: the fetch sequence below, with or without reads
    ahead between the fetches, then races."""
    from moelab.offload.copier import SlotCopier

    streams = _Streams()
    _checked_copier(monkeypatch, streams)
    if mutation == "no ready":
        monkeypatch.setattr(SlotCopier, "ready", lambda self, slots: [])
    elif mutation == "no used":
        monkeypatch.setattr(SlotCopier, "used", lambda self, slots: None)
    else:
        monkeypatch.setattr(_Event, "synchronize", lambda self: None)
    _, path = _native(tmp_path)
    cache = ExpertCache(ExpertStore(path), 4, eviction="reuse", streams=streams)
    try:
        for layer, experts in ((0, [0, 1]), (1, [2]), (2, [0, 3]), (0, [2, 3]), (1, [0, 1])):
            got = cache.fetch(layer, experts, tokens=1)
            _compute_reads(streams, got)
            if not read_ahead:
                cache.release()
                continue
            cache.prefetch((layer + 1) % 3, torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.full((4,), 0.5), limit=2)
            cache.release()
            for read in list(cache._loading.values()):  # noqa: SLF001 - the read-aheads' copies queued
                read.result()
    finally:
        cache.close()
    assert streams.races


def test_an_offloaded_model_on_an_accelerator_stand_in_decodes_as_in_memory(tmp_path, monkeypatch, one_thread):
    """`load_offloaded` with its cache behind `SlotCopier` (the stand-in streams on the CPU), reading
    ahead: the model in memory's tokens, every copy ordered."""
    streams = _Streams()
    _checked_copier(monkeypatch, streams)
    init, fetch = ExpertCache.__init__, ExpertCache.fetch

    def fetch_and_compute(self, layer, experts, tokens, **visit):
        slots = fetch(self, layer, experts, tokens, **visit)
        _compute_reads(streams, slots)  # what the layer's kernels then do
        return slots

    monkeypatch.setattr(ExpertCache, "__init__", lambda self, *a, **k: init(self, *a, **k, streams=streams))
    monkeypatch.setattr(ExpertCache, "fetch", fetch_and_compute)
    model, path = _native(tmp_path, shared=1)
    offloaded = load_offloaded(path, resident=0.5, predictor="lookahead")
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        assert torch.equal(offloaded.generate(ids, 12), generate_ids(model, ids, 12))
        assert offloaded.cache.prefetch_stats.issued > 0 and offloaded.cache.total().misses > 0
    finally:
        offloaded.close()
    assert streams.races == []


def test_host_memory_copies_from_a_host_copy_of_every_expert(tmp_path, monkeypatch):
    """host_memory: every expert read once at the start (nothing read from the files afterwards),
    each load a copy from the host copy, and slots hold their experts."""
    streams = _Streams()
    _checked_copier(monkeypatch, streams)
    _, path = _native(tmp_path)
    store = ExpertStore(path)
    loads = []
    load = ExpertStore.load
    monkeypatch.setattr(ExpertStore, "load", lambda self, *args: (loads.append(args[:2]), load(self, *args))[1])
    cache = ExpertCache(store, 3, eviction="lru", streams=streams, host_memory=True)
    try:
        assert sorted(loads) == [(layer, e) for layer in range(3) for e in range(4)]  # each once, at the start
        for layer, experts in ((0, [0, 1]), (1, [2]), (2, [0, 3]), (0, [2, 3])):
            got = cache.fetch(layer, experts, tokens=1)
            _compute_reads(streams, got)
            for expert, slot in zip(experts, got):
                assert torch.equal(cache.pool.down_proj[slot], store.read(layer, expert).down[0])
            cache.release()
        assert len(loads) == 12 and cache.total().misses > 3
        cache.prefetch(1, torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.full((4,), 0.5), limit=2)
        assert cache.prefetch_stats.issued == 2 and not cache._loading  # noqa: SLF001 - queued here, no thread
        got = cache.fetch(1, [0, 1, 2], tokens=1)
        _compute_reads(streams, got)
        cache.release()
    finally:
        cache.close()
    assert streams.races == []


def test_host_memory_is_refused_on_a_cpu_and_where_it_does_not_fit(tmp_path, monkeypatch):
    from moelab.offload import model as offload_model

    _, path = _native(tmp_path)
    with pytest.raises(ValueError, match=r"host_memory=True \(--host-memory\) .*device='cuda'.*resident=1.0 \(--resident 1\)"):
        load_offloaded(path, resident=0.5, host_memory=True)
    with pytest.raises(ValueError, match="a CPU's cache is in host memory already"):
        ExpertCache(ExpertStore(path), 3, host_memory=True)
    import moelab.memory

    monkeypatch.setattr(moelab.memory.Path, "read_text", lambda self: "MemTotal: 100 kB\nMemAvailable: 1 kB\n")
    with pytest.raises(ValueError, match=r"needs 0\.0 GiB of pinned host memory .* only 0\.0 GiB is available"):
        offload_model.check_host_memory(2**20)


def test_hits_whose_copy_still_runs_are_counted_as_late_copies(tmp_path, monkeypatch):
    streams = _Streams()
    _checked_copier(monkeypatch, streams)
    _, path = _native(tmp_path)
    cache = ExpertCache(ExpertStore(path), 4, eviction="reuse", streams=streams)
    try:
        cache.fetch(0, [0, 1], tokens=1)  # misses: their copies are waited for on the device, not counted
        cache.release()
        cache.prefetch(1, torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.9, 0.0]), limit=1)
        cache._loading[cache._slot_of[1, 2]].result()  # noqa: SLF001 - read and its copy queued
        cache.fetch(1, [2], tokens=1)  # a hit whose copy nothing has waited for yet: still running
        cache.release()
        assert (cache.stats[1].hits, cache.stats[1].late_copies) == (1, 1)
        cache._copier.close()  # noqa: SLF001 - the host waits for every copy
        cache.fetch(1, [2], tokens=1)
        cache.release()
        assert (cache.stats[1].hits, cache.stats[1].late_copies) == (2, 1)
    finally:
        cache.close()


def test_a_bf16_pool_allocates_no_float32_copy_of_its_slots(tmp_path):
    """The pool of slots is allocated in its dtype directly: on a GPU with a tight budget a float32
    copy beside it (3x the bf16 pool at the peak) could run out of memory."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            allocates = func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like)
            if allocates and out.device.type != "meta":  # the module is built on the meta device first
                self.dtypes.append(out.dtype)
            return out

    _, path = _native(tmp_path)
    store = ExpertStore(path, dtype=torch.bfloat16)
    with Allocations() as allocations:
        pool = store.empty(3)
    assert pool.gate_up_proj.dtype == torch.bfloat16
    assert allocations.dtypes and set(allocations.dtypes) == {torch.bfloat16}, allocations.dtypes
    store.close()


def test_an_unavailable_device_is_refused(tmp_path):
    _, path = _native(tmp_path)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        load_offloaded(path, resident=0.5, device="cuda")


def test_a_closed_offloaded_model_refuses_to_run(tmp_path, one_thread):
    """After close() (its files closed, its reader stopped): a one-line error, not a reopened file
    or the executor's 'cannot schedule new futures after shutdown'."""
    model, path = _native(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    for predictor in (None, "lookahead"):
        offloaded = load_offloaded(path, resident=0.17, predictor=predictor)
        offloaded.generate(ids, 2)
        offloaded.close()
        with pytest.raises(ValueError, match=r"was closed \(close\(\)\); open it again with load_offloaded"):
            offloaded.generate(ids, 2)


def test_a_prior_from_a_trace_directory_is_the_prior_measured_on_its_tokens(tmp_path):
    """`moelab trace`'s directory, opened or given as a path, gives the counts that measuring the
    model on the same windows gives."""
    model, _ = _native(tmp_path)
    windows = torch.randint(0, model.config.vocab_size, (4, 32))
    streams = {"d": windows.reshape(-1).numpy()}
    options = TraceOptions(max_tokens=128, seq_len=32, batch_size=4, expert_stats=False)
    trace = trace_model(model, streams, tmp_path / "trace", options, quiet=True)
    measured = RoutingPrior.measure(model, [windows])
    for prior in (RoutingPrior.from_trace(trace), RoutingPrior.from_trace(tmp_path / "trace")):
        assert prior.layers == measured.layers and prior.affinity.keys() == measured.affinity.keys()
        for i in measured.layers:
            torch.testing.assert_close(prior.frequency[i], measured.frequency[i], atol=0, rtol=0)
        for i in measured.affinity:  # every MoE layer but the last
            torch.testing.assert_close(prior.affinity[i], measured.affinity[i], atol=0, rtol=0)


def test_an_offloaded_model_keeps_in_float32_what_transformers_keeps(tmp_path, one_thread):
    """GPT-OSS's norms stay float32 in a float16 model (`_keep_in_fp32_modules`), as transformers'
    from_pretrained keeps them; the other weights take the dtype asked for."""
    build("gpt_oss").save_pretrained(tmp_path)
    offloaded = load_offloaded(tmp_path, resident=0.5, dtype=torch.float16)
    try:
        dtypes = {name: p.dtype for name, p in offloaded.model.named_parameters()}
        want = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
        assert dtypes["model.norm.weight"] == dtypes["model.layers.0.input_layernorm.weight"] == torch.float32
        assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.float16
        assert {n: d for n, d in dtypes.items() if "mlp" not in n} == {
            n: p.dtype for n, p in want.named_parameters() if "mlp" not in n
        }
    finally:
        offloaded.close()
