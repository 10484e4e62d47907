"""The benchmarks' arithmetic on fixed numbers: ratios taken within rounds, the bandwidth bound and
the bytes a decode step reads (a CLI run checks only that the numbers are there)."""

from __future__ import annotations

import dataclasses

import pytest

from moelab.bench.generate import bytes_per_step
from moelab.bench.rounds import bound_tokens_per_s, fraction_of_bound, speedup
from moelab.models import MoETransformer, tiny


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
