"""Every compression method on random tiny layers and the routing edge cases (all tokens to one
expert, an expert no token chooses, a single token, k up to E - 1 (k = E for the methods that
narrow: no other allows it), group-limited routing, bf16 weights): each decision keeps what the
target asks, names distinct experts, spares the protected ones, and its edit gives a layer with the
asked expert count whose output is finite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from layer_views import OneLayerModel, make_view
from test_compress_reference import observed_stats

from moelab.compress.methods import METHODS, Target, get_method, plan_target
from moelab.compress.methods.base import check_protected, share_kept
from moelab.hf.edit import apply_edit, moe_output

PROPERTY = settings(
    settings.get_profile("ci"),
    max_examples=8,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
OPTIONS = {"moelab": {"fit_steps": 0}}  # the router fit is checked in test_compress_router_fit.py


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny layers: one intra-op thread is faster on the project's 2-core machine."""


@st.composite
def cases(draw, every_expert: bool = False):
    """(view keyword arguments, experts kept, token counts per call, a protected expert or None).
    every_expert: k = E, which no pruning or merging allows (`plan_target` refuses it): only methods that narrow."""
    n_group = 1 if every_expert else draw(st.sampled_from([1, 1, 2]))
    E = draw(st.sampled_from([4, 6, 8] if n_group == 2 else [3, 4, 5, 6, 8]))
    k = E if every_expert else draw(st.integers(1, E - 1 if n_group == 1 else E // 2 - 1 or 1))
    kw = {
        "E": E,
        "D": 6,
        "I": 4,
        "top_k": k,
        "score_func": draw(st.sampled_from(["softmax", "sigmoid"])),
        "renormalize": draw(st.booleans()),
        "shared": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }
    if n_group == 2:
        kw |= {"n_group": 2, "topk_group": draw(st.integers(1, 2))}
        if kw["score_func"] == "sigmoid":
            kw["score_func"] = "softmax"  # sigmoid group routing needs 2 per group: fewer cases to plan
    edge = draw(st.sampled_from(["none", "one expert takes all", "one expert never chosen"]))
    if edge != "none":
        kw["router_bias"] = {draw(st.integers(0, E - 1)): 30.0 if edge == "one expert takes all" else -30.0}
    view = make_view(**kw)
    ratio = draw(st.sampled_from([0.25, 0.5, 0.75]))
    if every_expert:
        keep = share_kept(E, ratio)  # what `compress` asks of a method that narrows
    else:
        try:
            keep = plan_target(view.router, ratio)
        except ValueError:
            keep = E - n_group  # the smallest removal every router here allows
    sizes = draw(st.sampled_from([[1], [3, 2], [12, 9]]))
    protect = draw(st.one_of(st.none(), st.integers(0, E - 1))) if keep >= 1 else None  # a whole expert kept
    return kw, keep, sizes, protect


@pytest.mark.parametrize("name", sorted(METHODS))
@PROPERTY
@given(case=cases())
def test_every_method_keeps_a_valid_layer_on_edge_case_routing(name, case):
    check_valid_decision(name, case)


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if cls.narrows))
@PROPERTY
@given(case=cases(every_expert=True))
def test_methods_that_narrow_keep_a_valid_layer_where_the_router_picks_every_expert(name, case):
    """k = E: every expert stays (narrower), so the router still picks all of them."""
    check_valid_decision(name, case)


@PROPERTY
@given(case=cases())
def test_the_fit_merge_rule_keeps_a_valid_layer_on_edge_case_routing(case):
    """hc_smoe's router_rule 'fit' (M-SMoE merges by 'dominant', hc_smoe's default is 'weighted'):
    a least squares on the sampled inputs, one token's among them; softmax routers only."""
    assume(case[0]["score_func"] == "softmax")
    check_valid_decision("hc_smoe", case, {"router_rule": "fit"})


def check_valid_decision(name: str, case, options: dict | None = None) -> None:
    """`name`'s decision (built with `options`, else OPTIONS') on the view of `case` (see `cases`)
    is valid, and so is the layer it edits."""
    kw, keep, sizes, protect = case
    view, E = make_view(**kw), kw["E"]
    stats = observed_stats(view, sizes, kw["dtype"], kw["seed"])
    options = OPTIONS.get(name, {}) if options is None else options
    if name == "heapr" and protect is not None:
        options = {"layout": "padded"}  # the uniform layout narrows every expert alike: it spares none
    method = get_method(name, **options)
    method.settle(width_fixed=False)
    if method.narrows:
        try:
            method.check_width(kw["I"], E, keep)
        except ValueError:
            return  # refused before calibrating (`compress`), as test_compress_heapr.py checks
    target = Target(keep, frozenset() if protect is None else {protect})
    check_protected(view.router, keep, target.protect)  # what `compress` checks first: always feasible here
    method.prepare(OneLayerModel(view), {0: stats}, {0: target})
    decision = method.decide(view, stats, target)

    ids = [e for group in decision.edit.sources for e in group]
    assert len(ids) == len(set(ids)) and all(0 <= e < E for e in ids)
    assert decision.kept == sorted(decision.kept) and set(decision.kept) <= set(ids)
    if method.narrows or decision.notes.get("strategy") == "neurons":  # every expert stays, narrower
        assert sorted(ids) == list(range(E))
        narrowed = apply_edit(view, decision.edit).experts
        assert narrowed.gate.shape[1] <= kw["I"]
        for e in target.protect:  # a protected expert keeps every neuron
            j = ids.index(e)
            assert torch.equal(narrowed.gate[j], view.experts.gate[e]) and torch.equal(narrowed.down[j], view.experts.down[e])
    else:
        assert len(decision.edit.sources) == keep, decision.notes
        assert target.protect <= set(decision.kept) | {g[0] for g in decision.merge_groups}
    if not method.merges and not method.narrows and name != "moelab":
        assert decision.kept == ids  # pruning: the kept experts themselves
    if decision.scores is not None:
        assert len(decision.scores) == E and all(map(torch.isfinite, torch.tensor(decision.scores)))
    edited = apply_edit(view, decision.edit)
    if kw.get("n_group", 1) == 2:  # merges stay within a routing group, and each group keeps as many
        size = E // 2
        assert all(len({e // size for e in group}) == 1 for group in decision.edit.sources)
        assert sum(group[0] < size for group in decision.edit.sources) * 2 == len(decision.edit.sources)
    x = stats.inputs.double()  # every token's input
    y = moe_output(edited, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
