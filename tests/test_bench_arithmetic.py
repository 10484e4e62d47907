"""The benchmarks' arithmetic on fixed numbers: ratios taken within rounds, the bandwidth bound and
the bytes a decode step reads (a CLI run checks only that the numbers are there)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import moelab.bench.distributed as D
import moelab.bench.generate as G
import moelab.bench.layer as L
import moelab.bench.offload as O
import moelab.bench.skipping as skipping
from moelab.bench.distributed import _uniform_bytes
from moelab.bench.generate import bytes_per_step, distinct_experts_per_step
from moelab.bench.layer import SHAPES, expert_load_imbalance
from moelab.bench.rounds import bound_tokens_per_s, fraction_of_bound, speedup
from moelab.compress import CalibrationOptions, calibrate
from moelab.models import ModelConfig, MoETransformer, save_pretrained, tiny
from moelab.nn import MoEConfig
from moelab.offload import POLICIES, load_offloaded


def test_speedup_is_the_median_of_per_round_ratios():
    """The machine slowed 10x in rounds 2 and 3: within each round the fast side ran 2, 0.5 and 2.5
    times faster, median 2; the ratio of the two medians would say 2.5."""
    baseline, times = [1.0, 10.0, 10.0], [0.5, 20.0, 4.0]
    assert speedup(baseline, times) == 2.0
    assert speedup(times, baseline) == 0.5  # the other way round: slower
    with pytest.raises(ValueError, match="one time of each per round"):
        speedup([1.0], [1.0, 2.0])


def test_bound_and_fraction_of_bound():
    assert bound_tokens_per_s(10.0, 20e6) == pytest.approx(500.0)  # 10 GB/s over 20 MB a token
    # 64 tokens in 0.1 s and 0.2 s against bounds of 1,280 and 320 tokens/s: 0.5 and 1.0 -> median 0.75
    assert fraction_of_bound(64, [0.1, 0.2], [1280.0, 320.0]) == pytest.approx(0.75)


@pytest.mark.parametrize("tied", [False, True])
def test_bytes_a_decode_step_reads(tied):
    """Every weight but the routed experts, one embedding row per sequence (unless the head is the
    embedding), the distinct experts' share of the stacked expert weights, and the KV cache."""
    model = MoETransformer(dataclasses.replace(tiny(), tie_embeddings=tied))
    cfg, batch, context, distinct = model.config, 3, 10.0, 2.5
    experts = model.moe_layers[1].experts
    expert_bytes = sum(p.nbytes for p in experts.parameters())
    unique = {id(p): p for p in model.parameters()}.values()
    dense = sum(p.nbytes for p in unique) - expert_bytes
    embed = model.embed.weight
    rows = 0 if tied else embed.nbytes - batch * embed[0].nbytes  # an untied embedding reads its rows only
    kv = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * context * 4
    expected = dense - rows + distinct * expert_bytes / cfg.moe.num_experts + kv
    assert bytes_per_step(model, {1: distinct}, batch, context) == pytest.approx(expected)


def test_speedup_over_an_even_number_of_rounds_is_the_middle_pair_s_mean():
    """Per-round ratios 8, 1, 2, 3: the median is 2.5 (the mean 3.5, the first round's 8, the upper
    middle value 3)."""
    assert speedup([8.0, 1.0, 4.0, 6.0], [1.0, 1.0, 2.0, 2.0]) == 2.5


def test_fraction_of_bound_is_the_median_of_per_round_fractions():
    """10 tokens in 1, 1 and 0.5 s against bounds of 100, 20 and 10 tokens/s: 0.1, 0.5 and 2.0,
    median 0.5 (the mean would say 0.867); a round without its bound is refused."""
    assert fraction_of_bound(10, [1.0, 1.0, 0.5], [100.0, 20.0, 10.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one time and one bound per round"):
        fraction_of_bound(10, [1.0, 1.0], [100.0])


def test_a_bf16_decode_step_reads_two_bytes_a_cached_value():
    """bf16 weights and a bf16 KV cache: half the fp32 bytes, the cache included."""
    model = MoETransformer(tiny()).to(torch.bfloat16)
    cfg, batch, context = model.config, 2, 6.0
    fp32 = MoETransformer(tiny())
    kv = lambda size: 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * context * size  # noqa: E731
    weights32 = bytes_per_step(fp32, {1: 1.0}, batch, context) - kv(4)
    assert bytes_per_step(model, {1: 1.0}, batch, context) == pytest.approx(weights32 / 2 + kv(2))


def test_memory_bandwidth_is_the_matrix_s_bytes_over_the_fastest_read_in_gb_s(monkeypatch):
    """An 8 MB (2**20 bytes) matrix read in 0.5, 0.25 and 0.4 s: 8 * 2**20 / 0.25 / 1e9 GB/s."""
    seconds = iter([0.5, 0.25, 0.4])
    monkeypatch.setattr(G, "_timed", lambda fn, device="cpu": next(seconds))
    assert G.memory_bandwidth_gb_s(megabytes=8, repeats=3) == pytest.approx(8 * 2**20 / 0.25 / 1e9)


def test_distinct_experts_counts_each_expert_once_per_decode_step():
    """A router of zero weights sends every token to the same top-2 experts: 2 distinct experts a
    step, however many sequences decode together (not 3 sequences x 2 slots)."""
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    with torch.no_grad():
        model.moe_layers[1].router.weight.zero_()
    prompts = torch.randint(0, model.config.vocab_size, (3, 4))
    assert distinct_experts_per_step(model, prompts, 4) == {1: 2.0}


def test_distinct_experts_leave_out_the_experts_dynamic_skipping_drops():
    """At β = 1 dynamic skipping keeps only each token's strongest expert: one sequence reads 1
    expert a step, not the router's top 2 (the router's output, before the MoE layer skips)."""
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    prompts = torch.randint(0, model.config.vocab_size, (1, 4))
    assert distinct_experts_per_step(model, prompts, 4) == {1: 2.0}
    G.apply_dynamic_skipping(model, {1: 1.0})
    assert distinct_experts_per_step(model, prompts, 4) == {1: 1.0}


def test_distinct_experts_leave_out_identity_experts():
    """Zero-computation (identity) experts read no weights: a selection bias that puts two of them
    in every token's top 2 leaves no routed expert to read (not 2 of the 4 experts' bytes)."""
    torch.manual_seed(0)
    config = tiny()
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, identity_experts=4, selection_bias=True))
    model = MoETransformer(config).eval()
    layer = model.moe_layers[1]
    with torch.no_grad():
        layer.router.selection_bias[layer.num_experts : layer.num_experts + 2] = 1e3
    prompts = torch.randint(0, config.vocab_size, (3, 4))
    assert distinct_experts_per_step(model, prompts, 4) == {1: 0.0}


def test_bench_generate_rows_from_injected_timings(tmp_path, monkeypatch):
    """measure_model's arithmetic on scripted timings (rounds in a fixed order: moelab,
    transformers, moelab at skip 0.5, then the bandwidth), batch 2 x 3 new tokens after 4 prompt
    tokens: 2 x 2 tokens from the timed decode steps (the first comes from the prompt pass), which
    read a mean context of 4 + 3 / 2 = 5.5 positions; 2 distinct experts a step, 1 under skipping,
    whose fraction is of its own bound (it was of plain routing's, which reads more)."""
    torch.manual_seed(0)
    save_pretrained(MoETransformer(tiny()), tmp_path / "m")
    model = G.load_pretrained(tmp_path / "m").eval()
    #          moelab transformers skip   GB/s
    rounds = [(1.0, 2.0, 0.5, 10.0), (4.0, 4.0, 1.0, 40.0), (2.0, 6.0, 4.0, 20.0)]  # the decode steps' seconds
    seconds = iter(t for r in rounds for t in r[:3])
    prompt = iter([0.5, 1.5, 0.25, 3.0, 3.0, 0.5, 1.5, 0.5, 3.0])  # the prompt passes', in the same order
    bandwidths = iter(r[3] for r in rounds)
    monkeypatch.setattr(G.random, "shuffle", lambda order: None)
    monkeypatch.setattr(G, "_timed_decode", lambda generate, prompts, device="cpu": (next(prompt), next(seconds)))
    monkeypatch.setattr(G, "memory_bandwidth_gb_s", lambda **kwargs: next(bandwidths))
    monkeypatch.setattr(  # counted under the variant's setting
        G, "distinct_experts_per_step", lambda model, prompts, new_tokens: {1: 1.0 if model.moe_layers[1].skip_ratio else 2.0}
    )
    options = G.GenerateOptions(batch_sizes=(2,), prompt_tokens=4, new_tokens=3, rounds=3, skip=(0.5,))
    (row,) = G.measure_model("m", tmp_path / "m", model, options)
    assert next(seconds, None) is None and next(bandwidths, None) is None, "3 rounds, no more"
    per_token = bytes_per_step(model, {1: 2.0}, 2, 5.5) / 2
    assert row["bytes_per_token"] == pytest.approx(per_token)
    assert row["memory_bandwidth_gb_s"] == 20.0  # median of 10, 40, 20
    assert row["bound_tokens_per_s"] == pytest.approx(20e9 / per_token)
    assert row["tokens_per_s"] == {"moelab": 2 * 2 / 2.0, "transformers": 2 * 2 / 4.0, "moelab_skip0.5": 2 * 2 / 1.0}
    assert row["prompt_s"] == {"moelab": 1.5, "transformers": 1.5, "moelab_skip0.5": 0.5}  # medians of the passes
    # transformers' time over moelab's per round: 2, 1, 3 -> 2; over skip's: 4, 4, 1.5 -> 4
    assert row["ratio_vs_transformers"] == {"moelab": 2.0, "transformers": 1.0, "moelab_skip0.5": 4.0}
    # moelab's over skip's: 2, 4, 0.5 -> 2
    assert row["speedup_vs_moelab"] == {"moelab": 1.0, "transformers": 0.5, "moelab_skip0.5": 2.0}
    # moelab: 4 tokens / 1, 4, 2 s against bounds 10, 40, 20 GB/s over per_token bytes
    fractions = [4 / t / (gb * 1e9 / per_token) for t, gb in [(1.0, 10.0), (4.0, 40.0), (2.0, 20.0)]]
    assert row["fraction_of_bound"]["moelab"] == pytest.approx(sorted(fractions)[1])
    skip_per_token = bytes_per_step(model, {1: 1.0}, 2, 5.5) / 2
    assert row["routing_variant_bytes_per_token"] == {"moelab_skip0.5": pytest.approx(skip_per_token)}
    fractions = [4 / t / (gb * 1e9 / skip_per_token) for t, gb in [(0.5, 10.0), (1.0, 40.0), (4.0, 20.0)]]
    assert row["fraction_of_bound"]["moelab_skip0.5"] == pytest.approx(sorted(fractions)[1])


@pytest.mark.parametrize("engine", ["moelab", "transformers"])
def test_bench_generate_times_from_the_first_new_token(tmp_path, engine, monkeypatch):
    """The decode steps are timed from the first new token (the prompt pass's) to the last, on a
    clock that only the first layer's calls move: 0.2 s a prompt pass, 0.01 s a decode step. The
    prompt pass's 0.2 s are prompt_s and none of the decode time (before, tokens/s counted every
    new token over the whole call, prompt pass included)."""
    torch.manual_seed(0)
    save_pretrained(MoETransformer(tiny()), tmp_path / "m")
    model = G.load_pretrained(tmp_path / "m").eval()
    prompts = torch.randint(0, 64, (1, 4))
    hf = G.exported_model(tmp_path / "m", G.family_for(model))
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    generate = {
        "moelab": lambda ids, streamer=None: model.generate(ids, 8, greedy=True, streamer=streamer),
        "transformers": lambda ids, streamer=None: hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, streamer=streamer
        ),
    }[engine]
    layer = model.layers[0] if engine == "moelab" else hf.model.layers[0]
    now, steps = [0.0], []
    monkeypatch.setattr(G, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))  # this module's clock only

    def tick(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:  # the prompt's 4 positions
            now[0] += 0.2
        else:  # a decode step's one
            now[0] += 0.01
            steps.append(1)

    layer.register_forward_pre_hook(tick, with_kwargs=True)
    with torch.no_grad():
        prompt_s, decode_s = G._timed_decode(generate, prompts)
    assert prompt_s == pytest.approx(0.2) and decode_s == pytest.approx(0.01 * len(steps))
    assert len(steps) == 7  # 8 new tokens: the prompt pass's, then 7 steps


def test_bench_layer_rows_from_injected_timings(monkeypatch):
    """measure's arithmetic on scripted step times: one untimed warm-up step each, then 3 rounds;
    tokens/s over the median step, ratios the median of same-round ratios."""
    impls = {"moelab": lambda x: x, "dense": lambda x: x, "serial": lambda x: x}
    steps = {  # the warm-up's 100 s must count nowhere
        impls["moelab"]: iter([100.0, 1.0, 4.0, 2.0]),
        impls["dense"]: iter([100.0, 2.0, 4.0, 6.0]),
        impls["serial"]: iter([100.0, 4.0, 4.0, 3.0]),
    }
    monkeypatch.setattr(L, "build_impls", lambda shape, dtype, skew, device: impls)
    monkeypatch.setattr(L, "time_step", lambda fn, x, grad, mode: next(steps[fn]))
    rows = {r["impl"]: r for r in L.measure(L.SHAPES["e8k2"], "fp32", "fwd", tokens=12, rounds=3)}
    assert all(next(s, None) is None for s in steps.values()), "a warm-up and 3 rounds, no more"
    assert {i: r["tokens_per_s"] for i, r in rows.items()} == {"moelab": 6.0, "dense": 3.0, "serial": 3.0}
    # dense over moelab per round: 2, 1, 3 -> 2; over serial: 0.5, 1, 2 -> 1; serial over moelab: 4, 1, 1.5 -> 1.5
    assert rows["moelab"]["ratio_vs_dense"] == 2.0 and rows["serial"]["ratio_vs_dense"] == 1.0
    assert rows["serial"]["moelab_speedup"] == 1.5 and rows["moelab"]["moelab_speedup"] == 1.0


def _leaves(y: torch.Tensor) -> list[torch.Tensor]:
    """The tensors autograd would accumulate gradients into from y's graph (its AccumulateGrad nodes)."""
    leaves, seen, stack = [], set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def test_a_timed_training_step_starts_without_gradients():
    """Every forward+backward step of `moelab bench layer` gives its implementation's parameters
    that step's gradients alone, as a training step after zero_grad() does (not the sum over the
    warm-up and earlier rounds), for every implementation."""
    torch.manual_seed(0)
    impls = L.build_impls(L.SHAPES["e8k2"], torch.float32)
    assert {"moelab", "serial", "dense", "loop", "hf"} <= set(impls)
    x = torch.randn(16, 512)
    grad = torch.randn_like(x)
    for name, impl in impls.items():
        for p in impl.parameters:  # several share the router and experts
            p.grad = None
        y = impl(x)
        # the parameters listed are every leaf the step's autograd graph reaches
        assert {id(p) for p in impl.parameters} == {id(p) for p in _leaves(y)}, name
        y.backward(grad)
        once = [p.grad.clone() for p in impl.parameters]
        assert len(once) >= 2 and all(g.abs().sum() > 0 for g in once[1:]), name  # router + experts
        for _ in range(2):
            L.time_step(impl, x, grad, "fwdbwd")
        for p, g in zip(impl.parameters, once):
            torch.testing.assert_close(p.grad, g, msg=name)


def test_bench_layer_dense_baseline_has_the_active_width_and_bf16_tokens_are_capped(monkeypatch):
    shape = L.SHAPES["e64k8"]
    dense = L.build_impls(shape, torch.float32)["dense"].fn
    assert dense.down.in_features == shape.top_k * shape.hidden_dim  # the same active FLOPs per token
    options = L.BenchOptions.create(tokens=4096)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert options.tokens_for("bf16") == 512 and options.tokens_for("fp32") == 4096
    assert L.BenchOptions.create(tokens=100).tokens_for("bf16") == 100


def test_expert_load_imbalance_of_one_token_is_experts_over_k():
    """One token reaches k of E experts once each: max load 1 over a mean load of k / E."""
    assert expert_load_imbalance(SHAPES["e64k8"], 1, 0.0) == pytest.approx(64 / 8)


def test_peak_memory_on_a_cpu_is_the_rss_growth_in_mib(monkeypatch):
    peaks = iter([1000, 1000 + 3 * 1024])  # VmHWM, kB, before and after the step
    monkeypatch.setattr(L, "_peak_rss_kb", lambda: next(peaks))
    threads = torch.get_num_threads()
    try:
        assert L._step_peak_mb("e8k2", "moelab", 8, "cpu") == 3.0
    finally:
        torch.set_num_threads(threads)


def test_bench_distributed_cells_are_medians_over_rounds_and_ratios_to_one_process(monkeypatch):
    """run's arithmetic with the spawned cells replaced by scripted results: each number the
    median over 3 rounds; the ratio to one process the median of the ratios within each round
    (dp: 5, 1/3, 1.5 -> 1.5; ep: 0.5, 0.5, 2 -> 0.5, where the ratio of medians says 0.75)."""
    scripted = {
        (1, "one"): iter([100.0, 300.0, 200.0]),  # median 200
        (2, "dp"): iter([500.0, 100.0, 300.0]),  # median 300 (mean 300 too; the first round 500)
        (2, "ep"): iter([50.0, 150.0, 400.0]),  # median 150 (mean 200)
    }

    def cell(model, options, n, layout):
        return {"procs": n, "layout": layout, "tokens_per_second": next(scripted[(n, layout)])}

    monkeypatch.setattr(D, "_cell", cell)
    config = dataclasses.replace(tiny(), first_k_dense=0)
    doc = D.run(config, D.DistributedOptions(procs=(1, 2), batch_size=2, rounds=3))
    got = {(c["procs"], c["layout"]): (c["tokens_per_second"], c["vs_one_process"]) for c in doc["cells"]}
    assert got == {(1, "one"): (200.0, 1.0), (2, "dp"): (300.0, 1.5), (2, "ep"): (150.0, 0.5)}



def test_bench_distributed_names_each_cell_before_it_runs_or_nothing_when_quiet(monkeypatch):
    """progress: told each round's cell as it starts; None (`moelab bench distributed --quiet`)
    shows nothing and runs the same cells."""
    ran = []
    monkeypatch.setattr(D, "_cell", lambda model, options, n, layout: ran.append((n, layout)) or {"tokens_per_second": 1.0})
    config = dataclasses.replace(tiny(), first_k_dense=0)
    options = D.DistributedOptions(procs=(1, 2), batch_size=2, rounds=2)
    told = []
    D.run(config, options, progress=told.append)
    cells = ((1, "one"), (2, "dp"), (2, "ep"))
    assert told == [f"round {r}/2: {n} process(es), {layout}" for r in (1, 2) for n, layout in cells]
    D.run(config, options, progress=None)
    assert ran[6:] == ran[:6] == [(1, "one"), (2, "dp"), (2, "ep")] * 2

def test_uniform_expert_exchange_bytes():
    """2 (backward) x 64 tokens x 1.5 rows x 3 MoE layers x 3/4 crossing x (2 x 32 + 1) x 4 bytes;
    dense layers exchange nothing, and one expert-parallel rank sends nothing."""
    config = dataclasses.replace(tiny(), n_layers=4, first_k_dense=1)
    assert _uniform_bytes(config, 64, 1.5, 4) == pytest.approx(2 * 64 * 1.5 * 3 * 0.75 * 65 * 4)
    assert _uniform_bytes(config, 64, 1.5, 1) == 0.0


def test_bench_skip_speedup_is_the_median_of_per_round_ratios(tmp_path, monkeypatch):
    """`moelab bench skip` on scripted seconds: plain 1, 10, 10 and skipping 0.5, 20, 4 give
    per-round speed-ups 2, 0.5, 2.5 (median 2.0), not the ratio of the medians (10 / 4 = 2.5);
    experts per token are weighted by each batch's tokens."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=8192, dim=32, n_layers=2, n_heads=4, max_seq_len=64,
                         moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2))  # fmt: skip
    model = save_pretrained(MoETransformer(config), tmp_path / "m")
    stats = calibrate(model, tmp_path / "stats", options=CalibrationOptions(tokens=256, seq_len=32), quiet=True)
    # rounds alternate the order: plain, skipping | skipping, plain | plain, skipping
    durations = iter([1.0, 0.5, 20.0, 10.0, 10.0, 4.0])
    clock = [0.0]

    def perf_counter():
        clock.append(clock[-1] + (next(durations) if len(clock) % 2 == 0 else 0.0))
        return clock[-1]

    monkeypatch.setattr(skipping, "time", types.SimpleNamespace(perf_counter=perf_counter))
    doc = skipping.run(model, stats.directory, skipping.SkipOptions(tokens=96, seq_len=16, batch_size=4, rounds=3))
    assert doc["speedup"] == 2.0
    total = sum(int((t != -100).sum()) for _, t in skipping.test_batches(96, 16, 4))
    assert doc["plain"]["tokens_per_s"] == total / 10.0 and doc["skipping"]["tokens_per_s"] == total / 4.0
    assert doc["plain"]["experts_per_token"] == 2.0 and 1.0 <= doc["skipping"]["experts_per_token"] < 2.0


def test_bench_offload_rows_from_scripted_seconds_and_the_cache_s_own_counts(tmp_path, monkeypatch):
    """measure_model's arithmetic: the real decoding and the real cache (so hits, misses and
    read-aheads are counted for real), each decode's seconds scripted. 2 prompts x 3 new tokens =
    6 tokens; 3 rounds per cell, the in-memory run first in rounds 1 and 3, second in round 2.
    Every cell's in-memory seconds are (1, 10, 10) and offloaded ones (0.5, 20, 4) times its number
    (1..5): vs memory is the median of the per-round ratios 2, 0.5, 2.5 -> 2 (the ratio of medians
    says 2.5, inverted 0.5), tokens/s 6 over the median 4 (not round 1's 0.5). Each round's
    offloaded model is warmed up untimed first, as the model in memory is (its first call's one-time
    work, the decode layout, was timed before), and its cache restarted: the counts are the timed
    decoding's alone. The compiled cells
    decode eagerly here (the arithmetic does not depend on it; a compiled step sees the same hits).
    Recall, like the hit rate, is the decode steps' (this tiny model's lookahead names every expert
    needed, so one unnamed need is added to the decode steps'). No CPU decode has late hits for sure: after each timed decode one hit is made late and two
    copies late, to price late_rate over the requests (not the hits); one cell's last round gets
    one token wrong, which its same_tokens must say."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), n_layers=3, first_k_dense=0)
    save_pretrained(MoETransformer(cfg), tmp_path / "m")
    generator = torch.Generator().manual_seed(0)
    tokenized = []  # quiet, as each test_batches call got it
    monkeypatch.setattr(
        O, "test_batches", lambda tokens, seq_len, batch, split="test", quiet=False: tokenized.append(quiet) or [(torch.randint(0, 128, (batch, seq_len), generator=generator), None)]
    )  # fmt: skip
    monkeypatch.setattr(O, "POLICIES", {p: POLICIES[p] for p in ("lru", "reuse", "lookahead")})
    memory, offloaded = (1.0, 10.0, 10.0), (0.5, 20.0, 4.0)
    eager, compiled = (2.0, 8.0, 3.0), (1.0, 2.0, 6.0)  # the in-memory model's compiled rounds: e / c = 2, 4, 0.5
    untimed = 1000.0  # warm-up, reference and tracing decodes: counted nowhere
    expected = [("memory", False, 1, 2, untimed), ("memory", False, 2, 3, untimed)]  # (model, compile, prompts, new, s)
    cells = [("lru", False), ("reuse", False), ("lookahead", False), ("lru", True), ("reuse", True)]
    for n, (_, is_compiled) in enumerate(cells, start=1):
        for r in range(3):  # each round's offloaded model warmed up (a compiled one traced) as the one in memory was
            expected.append(("offloaded", True, 1, 3, untimed) if is_compiled else ("offloaded", False, 1, 2, untimed))
            pair = [("memory", False, 2, 3, n * memory[r]), ("offloaded", is_compiled, 2, 3, n * offloaded[r])]
            expected += pair[::-1] if r % 2 else pair
    expected.append(("memory", True, 1, 3, untimed))
    for r in range(3):
        pair = [("memory", False, 2, 3, eager[r]), ("memory", True, 2, 3, compiled[r])]
        expected += pair[::-1] if r % 2 else pair
    script, models, decode = iter(expected), [], O._decode

    def load(*args, **kwargs):
        models.append(load_offloaded(*args, **kwargs))
        return models[-1]

    def scripted(model, prompts, new_tokens, compile=False):
        who = "offloaded" if models and model is models[-1].model else "memory"
        *call, seconds = next(script)
        assert (who, compile, len(prompts), new_tokens) == tuple(call)
        out, _ = decode(model, prompts, new_tokens)  # eagerly
        if who == "offloaded" and len(prompts) == 2:
            if len(models) == 6:  # the "reuse" cell's last round: the second prompt's last token differs
                out[1] = torch.cat([out[1][:, :-1], (out[1][:, -1:] + 1) % 128], dim=1)
            step = models[-1].cache.stats[1]
            step.hits, step.late, step.late_copies = step.hits - 1, step.late + 1, step.late_copies + 2
            step.needed += step.needed > 0  # one decode-step need the prediction missed: below the total's recall
        return out, seconds

    monkeypatch.setattr(O, "load_offloaded", load)
    monkeypatch.setattr(O, "_decode", scripted)
    options = O.OffloadOptions(resident=(0.5,), prompts=2, prompt_tokens=4, new_tokens=3, rounds=3,
                               calibration_tokens=256, compile=True)  # fmt: skip
    result = O.measure_model(tmp_path / "m", options, quiet=True)
    assert next(script, None) is None and len(models) == 5 * 3
    assert tokenized == [True, True], "the calibration and the prompts tokenized without bars"
    # in memory: 6 tokens over the median of 1, 10, 10, 2, 20, 20, ... 5, 50, 50 = 20 (the mean is 21)
    assert result["in_memory_tokens_per_s"] == 6 / 20.0
    assert result["in_memory_compiled_tokens_per_s"] == 6 / 2.0  # median of 1, 2, 6
    assert result["in_memory_compiled_vs_memory"] == 2.0  # median of 2, 4, 0.5 (ratio of medians: 1.5)
    assert [(r["policy"], r["compiled"]) for r in result["rows"]] == cells
    assert [r["same_tokens"] for r in result["rows"]] == [True, False, True, True, True]
    assert result["experts"] == 3 * 4 and result["expert_bytes"] == 3 * 32 * 32 * 4  # gate, up, down in fp32
    some_prompt_misses = False
    for n, (row, model) in enumerate(zip(result["rows"], models[2::3]), start=1):  # each cell's last round
        step, total, prefetch = model.cache.stats[1], model.cache.total(), model.cache.prefetch_stats
        assert step.requests == 2 * (3 - 1) * 3 * 2  # 2 prompts x 2 one-token steps x 3 layers x top-2
        assert row["slots"] == 6
        assert row["tokens_per_s"] == 6 / (4.0 * n) and row["vs_memory"] == 2.0
        assert row["hit_rate"] == (step.hits + step.late) / step.requests
        assert row["late_rate"] == step.late / step.requests and row["late_copy_rate"] == step.late_copies / step.requests
        assert row["reads_per_token"] == (total.misses + prefetch.issued) / 6
        if prefetch.issued:
            assert row["prefetch_accuracy"] == prefetch.used / prefetch.issued
        else:
            assert row["prefetch_accuracy"] != row["prefetch_accuracy"]  # NaN: nothing read ahead
        if step.needed:  # the recall of the decode steps, as the hit rate (not of the prompt passes too)
            assert row["prefetch_recall"] == step.foreseen / step.needed
        else:
            assert row["prefetch_recall"] != row["prefetch_recall"] and prefetch.needed == 0  # NaN: nothing predicted
        some_prompt_misses |= total.misses > step.misses
    lookahead = result["rows"][2]
    assert models[8].cache.prefetch_stats.issued > 0 and lookahead["reads_per_token"] > 0
    # the prompt passes' predictions (every expert of a layer named) are in the total, not the decode recall
    total, decode = models[8].cache.prefetch_stats, models[8].cache.stats[1]
    assert total.needed > decode.needed > 0 and lookahead["prefetch_recall"] < total.recall
    assert some_prompt_misses, "the prompt pass must read experts, or decode and total stats would agree"


def test_bench_offload_refuses_one_token_prompts():
    """The decode hit rate is the cache's count for one-token layer calls: a one-token prompt's
    pass (its misses from a warm start) would be counted as a decode step."""
    from moelab.bench.offload import OffloadOptions

    with pytest.raises(ValueError, match="prompt_tokens must be >= 2"):
        OffloadOptions(prompt_tokens=1)
    assert OffloadOptions(prompt_tokens=2).prompt_tokens == 2


def test_bench_test_batches_refuse_more_tokens_than_every_domain_holds_a_share_of():
    """`moelab bench skip --tokens` past what the test split's smallest domain can give an equal
    share of was cut short without a word (a different, unequal sample than asked for)."""
    domains = ("code", "bible", "english", "german", "spanish", "italian", "polish", "russian")
    most = len(domains) * (min(len(skipping.tokenize_split(d, "test")) for d in domains) - 1)
    assert sum(int(x.numel()) for x, _ in skipping.test_batches(most, 256, 8)) >= most - 256 * 8
    with pytest.raises(ValueError, match=rf"at most {most:,} tokens come in equal shares .* not {most + 8:,}; ask for fewer"):
        skipping.test_batches(most + 8, 256, 8)
