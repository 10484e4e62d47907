"""moelab's recipe (`--method moelab`) against direct computations on a tiny model: each
candidate's error is the relative squared error of the layer with only that kept set routed,
the chosen candidate is the lowest, folds only ever lower the error and the written layer has
the error the report states; super experts stay; the router fit runs last."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from layer_views import OneLayerModel, make_view, stats_with
from reference import F64, silu
from test_compress import EVERY, moelab_model
from test_compress_reference import observed_stats

from moelab.compress import calibrate, compress
from moelab.compress.merging import expert_features, merged_layer
from moelab.compress.methods import Target
from moelab.compress.methods.base import super_expert_ids
from moelab.compress.methods.heapr import narrowed
from moelab.compress.methods.recipe import NAEE_SKIP, MoelabRecipe, _layer_error, compensated
from moelab.compress.stats import Calibration
from moelab.hf import open_checkpoint
from moelab.hf.edit import LayerEdit, moe_output
from moelab.hf.native import router_from_view
from moelab.hf.view import NormView


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is faster on the project's 2-core machine."""


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    model = moelab_model(root / "m", num_experts=8, top_k=2)
    return model, calibrate(model, root / "s", options=EVERY, quiet=True).directory


def _error(base_layer, layer, x) -> float:
    y = moe_output(base_layer, x)
    return float((y - moe_output(layer, x)).pow(2).sum() / y.pow(2).sum())


def test_recipe_picks_the_lowest_error_and_folds_only_what_helps(calibrated, tmp_path):
    model, stats = calibrated
    options = {"strategy": "experts", "fit_steps": 0}
    report = compress(
        model, tmp_path / "o", method="moelab", ratio=0.5, stats=stats, method_options=options, quiet=True
    )
    kept_by = {
        name: compress(model, tmp_path / name, method=name, ratio=0.5, stats=stats, quiet=True)["layers"]
        for name in ("reap", "frequency", "naee")
    }
    calibration = Calibration(stats)
    supers = super_expert_ids({i: calibration.layer(i) for i in calibration.layers})
    with open_checkpoint(model) as base, open_checkpoint(tmp_path / "o") as out:
        for index, entry in report["layers"].items():
            i = int(index)
            layer, x = base.layer(i), calibration.layer(i).inputs.double()
            notes = entry["notes"]
            for name, layers in kept_by.items():  # the candidates' errors, computed here
                y = moe_output(layer, x)
                masked = moe_output(layer, x, keep=layers[index]["kept"])
                expected = float((y - masked).pow(2).sum() / y.pow(2).sum())
                assert notes["candidate_errors"][name] == pytest.approx(expected, rel=1e-9)
            errors = notes["candidate_errors"]
            assert errors[notes["chosen"]] == min(errors.values())
            assert notes["error"] <= errors[notes["chosen"]]
            assert (notes["error"] < errors[notes["chosen"]]) == bool(notes["folded"])
            assert notes["error"] == pytest.approx(_error(layer, out.layer(i), x), rel=1e-4)
            leaders = entry["kept"] + [g[0] for g in entry["merge_groups"]]
            assert len(leaders) == 4 and set(notes["protected"]) <= set(leaders)
            assert notes["protected"] == supers.get(i, [])


def test_recipe_options_and_router_fit(calibrated, tmp_path):
    model, stats = calibrated
    plain = compress(
        model, tmp_path / "a", method="moelab", ratio=0.25, stats=stats,
        method_options={"strategy": "experts", "fold": False, "fit_steps": 0}, quiet=True,
    )  # fmt: skip
    fitted = compress(
        model,
        tmp_path / "b",
        method="moelab",
        ratio=0.25,
        stats=stats,
        method_options={"strategy": "experts", "fold": False},
        quiet=True,
    )
    assert plain["options"] == {
        "strategy": "experts",
        "fold": False,
        "fit_steps": 0,
        "fit_lr": 1e-3,
        "protect_super": True,
    }
    for index, entry in fitted["layers"].items():
        assert entry["merge_groups"] == [] and entry["kept"] == plain["layers"][index]["kept"]
        fit = entry["notes"]["router_fit"]
        assert fit["steps"] == 50 and fit["heldout_after"] <= fit["heldout_before"]
    with open_checkpoint(tmp_path / "a") as a, open_checkpoint(tmp_path / "b") as b:
        changed = [not torch.equal(a.layer(i).router.weight, b.layer(i).router.weight) for i in (0, 1)]
    assert any(changed) == any(e["notes"]["router_fit"]["best_step"] > 0 for e in fitted["layers"].values())


def test_auto_strategy_takes_the_lower_summed_error(calibrated, tmp_path):
    """ "auto" sums each strategy's layer errors (computed here from each strategy's own
    checkpoint; the expert path before its folds) and writes the lower one."""
    model, stats = calibrated
    runs = {
        strategy: compress(
            model, tmp_path / strategy, method="moelab", ratio=0.5, stats=stats,
            method_options={"strategy": strategy, "fold": False, "fit_steps": 0}, quiet=True,
        )
        for strategy in ("auto", "experts", "neurons")
    }  # fmt: skip
    calibration = Calibration(stats)
    with open_checkpoint(model) as base, open_checkpoint(tmp_path / "neurons") as out:
        neurons = sum(
            _error(base.layer(i), out.layer(i), calibration.layer(i).inputs.double())
            for i in calibration.layers
        )
    layers = runs["experts"]["layers"].values()  # each candidate's error, NAEE's included
    scored = sum(min(v for k, v in e["notes"]["candidate_errors"].items() if k != "naee") for e in layers)
    searched = sum(min(e["notes"]["candidate_errors"].values()) for e in layers)
    summed = {"experts": scored if scored > NAEE_SKIP * neurons else searched, "neurons": neurons}
    for entry in runs["auto"]["layers"].values():
        got = entry["notes"]["strategy_errors"]
        assert got == pytest.approx(summed, rel=1e-4)
        assert entry["notes"]["strategy"] == min(summed, key=summed.get)
    with pytest.raises(ValueError, match="moelab strategy must be one of"):
        compress(
            model,
            tmp_path / "x",
            method="moelab",
            stats=stats,
            method_options={"strategy": "both"},
            quiet=True,
        )


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_neuron_path_keeps_the_refit_only_where_it_lowers_the_error(calibrated, tmp_path, monkeypatch, scale):
    """The neuron path writes the refitted down projections (scale 1: `compensated` itself)
    where they lower the layer's error, and HEAPr's own where the refit would raise it (scale 3: a
    refit tripled, which hurts); the report's error is then the written layer's."""
    import moelab.compress.methods.recipe as recipe_module

    model, stats = calibrated

    def refit(layer, narrowed, x, ids=None, ridge=1e-2):
        view = compensated(layer, narrowed, x, ids, ridge=ridge)
        return dataclasses.replace(view, experts=dataclasses.replace(view.experts, down=view.experts.down * scale))

    monkeypatch.setattr(recipe_module, "compensated", refit)
    options = {"strategy": "neurons", "fit_steps": 0}
    report = compress(
        model, tmp_path / "o", method="moelab", ratio=0.5, stats=stats, method_options=options, quiet=True
    )
    calibration = Calibration(stats)
    with open_checkpoint(model) as base, open_checkpoint(tmp_path / "o") as out:
        for index, entry in report["layers"].items():
            errors, layer = entry["notes"]["candidate_errors"], base.layer(int(index))
            assert (errors["compensated"] < errors["heapr"]) == (scale == 1.0)
            assert entry["notes"]["error"] == min(errors.values())
            x = calibration.layer(int(index)).inputs.double()
            assert _error(layer, out.layer(int(index)), x) == pytest.approx(min(errors.values()), rel=1e-4)


def test_compensation_is_the_ridge_solution_and_exact_when_nothing_is_pruned():
    """compensated() against a token-by-token normal-equation build; with every neuron kept it
    returns the original down projections (the target is reached exactly)."""
    layer = make_view(E=4, I=6, top_k=2, seed=5)
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    same = compensated(layer, layer, x, ridge=1e-9)
    torch.testing.assert_close(same.experts.down, layer.experts.down, rtol=1e-6, atol=1e-8)
    keep = [[0, 2, 3], [1, 4, 5], [0, 1, 2], [3, 4, 5]]
    narrow = dataclasses.replace(layer, experts=narrowed(layer.experts, keep))
    got = compensated(layer, narrow, x, ridge=0.1)
    with torch.no_grad():
        routing = router_from_view(layer.router).double()(x)
    for e in range(4):
        gram, rhs = torch.zeros(3, 3, dtype=F64), torch.zeros(3, 8, dtype=F64)
        for t in range(200):
            for slot in range(2):
                if routing.indices[t, slot] == e:
                    g = routing.weights[t, slot].double()
                    h = silu(narrow.experts.gate[e] @ x[t]) * (narrow.experts.up[e] @ x[t])
                    y = layer.experts.down[e] @ (
                        silu(layer.experts.gate[e] @ x[t]) * (layer.experts.up[e] @ x[t])
                    )
                    gram += g**2 * torch.outer(h, h)
                    rhs += g**2 * torch.outer(h, y)
        lam = 0.1 * float(gram.diagonal().mean())
        expected = torch.linalg.solve(
            gram + lam * torch.eye(3, dtype=F64), rhs + lam * narrow.experts.down[e].T
        ).T
        torch.testing.assert_close(got.experts.down[e], expected, rtol=1e-8, atol=1e-10)


def test_super_experts_join_the_protected_set_where_they_fit():
    """The layer's super experts join the protected ids, unless they do not fit in what it keeps."""
    recipe, layer = MoelabRecipe(), make_view(E=4, top_k=1, index=3)
    recipe.protected = {3: [2]}
    assert recipe._with_super_experts(layer, Target(2, frozenset({0}))).protect == {0, 2}
    recipe.protected = {3: [1, 2]}
    assert recipe._with_super_experts(layer, Target(1)).protect == frozenset()


@pytest.mark.parametrize("case", ["protected", "every neuron kept"])
def test_auto_removes_experts_where_the_neuron_path_cannot_apply(case):
    """The neuron path narrows every expert alike, so it cannot spare protected (super) experts
    (`--protect-super-experts`), and at 7 of 8 experts' worth of 4 neurons its uniform width keeps
    all 4: "auto" then removes experts (keeping the protected one), and "neurons" is refused naming
    the fix. Both used to fail inside HEAPr, the first naming a layout option the recipe lacks."""
    view = make_view(E=6, D=6, I=4, top_k=2, seed=3) if case == "protected" else make_view(E=8, D=6, I=4, seed=3)
    stats = observed_stats(view, [16, 16], torch.float32, seed=3)
    rare = int(stats.total("counts").argmin())
    target = Target(3, frozenset({rare})) if case == "protected" else Target(7)
    models = OneLayerModel(view)
    recipe = MoelabRecipe(fit_steps=0)
    recipe.prepare(models, {0: stats}, {0: target})
    assert models.reads == ([] if case == "protected" else [(0, False)])  # shapes only, no expert weights
    decision = recipe.decide(view, stats, target)
    assert decision.notes["strategy"] == "experts" and len(decision.edit.sources) == target.keep
    assert target.protect <= {g[0] for g in decision.edit.sources}
    narrowing = MoelabRecipe(strategy="neurons", fit_steps=0)
    narrowing.prepare(models, {0: stats}, {0: target})
    fix = "use strategy 'experts'" if case == "protected" else "keeps all of them; raise the ratio"
    with pytest.raises(ValueError, match=fix):
        narrowing.decide(view, stats, target)


def test_compensation_subtracts_the_down_bias():
    """With a down bias (GPT-OSS) and nothing pruned, the refit reproduces the down projection:
    the bias is not part of what W h has to make."""
    layer = make_view(E=4, I=6, top_k=2, seed=5)
    bias = torch.randn(4, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    layer = dataclasses.replace(layer, experts=dataclasses.replace(layer.experts, down_bias=bias))
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    same = compensated(layer, layer, x, ridge=1e-9)
    torch.testing.assert_close(same.experts.down, layer.experts.down, rtol=1e-6, atol=1e-8)


def test_compensation_fits_what_the_experts_output_norm_reads():
    """With an output norm on every expert (Muse Spark's post_expert_norm, which the refit leaves as
    it is) and nothing pruned, the refit reproduces the down projection: W h has to make the
    expert's output before the norm (it was fitted to the normed output, a norm applied twice)."""
    layer = make_view(E=4, I=6, top_k=2, seed=5)
    weight = 1 + 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=F64)
    norm = NormView(weight, 1e-6, scale_first=True)
    layer = dataclasses.replace(layer, experts=dataclasses.replace(layer.experts, output_norm=norm))
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    same = compensated(layer, layer, x, ridge=1e-9)
    torch.testing.assert_close(same.experts.down, layer.experts.down, rtol=1e-6, atol=1e-8)


def _naive_fold(layer, counts, kept, x, error, best):
    """The recipe's fold from its description: dropped experts, most used first, each tried in its
    nearest kept expert of its routing group (mean outputs, Euclidean), aligned to it (merged_layer's align),
    with weight = its usage or a 10 % / 30 % share of the pair, times router rule dominant / fit;
    the best trial stays when it lowers the error."""
    features = expert_features(layer, x).double()
    groups, weights, folded = {e: [e] for e in kept}, counts.clone(), []
    dropped = sorted((e for e in range(len(counts)) if e not in kept), key=lambda e: (-float(counts[e]), e))
    size = len(counts) // layer.router.n_group  # routing groups: consecutive experts
    for d in dropped:
        same_group = [e for e in kept if e // size == d // size]
        j = min(same_group, key=lambda e: (float((features[e] - features[d]).norm()), e))
        trial_groups = {e: members + [d] if e == j else members for e, members in groups.items()}
        trials = []
        for share in ("usage", 0.1, 0.3):
            w = weights.clone()
            w[d] = counts[d] if share == "usage" else share / (1 - share) * weights[j]
            if share != "usage":
                assert float(w[d] / (w[d] + weights[j])) == pytest.approx(share)
            for rule in ("dominant", "fit"):
                members = list(trial_groups.values())
                edit = merged_layer(layer, members, w, router_rule=rule, align=True, inputs=x)
                trials.append((error(edit), f"{share}/{rule}", w))
        trial_error, variant, w = min(trials, key=lambda t: t[0])
        if trial_error < best:
            groups, weights, best = trial_groups, w, trial_error
            folded.append([j, d, variant])
    return tuple(tuple(g) for g in groups.values()), best, folded


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_fold_follows_its_description(seed):
    layer = make_view(E=5, I=5, top_k=2, seed=seed)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)
    counts = torch.tensor([9.0, 7, 3, 5, 2], dtype=F64)
    stats = stats_with(counts.tolist(), inputs=x.float())
    error = _layer_error(layer, stats)
    best = error(LayerEdit.keep([0, 1]))
    edit, got_error, folded = MoelabRecipe()._fold(layer, stats, [0, 1], x, error, best)
    sources, expected_error, expected_folded = _naive_fold(layer, counts, [0, 1], x, error, best)
    assert folded == expected_folded and edit.sources == sources
    assert got_error == pytest.approx(expected_error, rel=1e-9)
    assert got_error == pytest.approx(error(edit), rel=1e-12)


@pytest.mark.parametrize("seed", [2, 10])
def test_fold_stays_within_the_routing_group(seed):
    """With group-limited routing (2 groups of 3) a dropped expert folds into the nearest kept
    expert of its own group, even where one of the other group is nearer (these seeds)."""
    layer = make_view(E=6, I=5, top_k=2, n_group=2, topk_group=2, seed=seed)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)
    counts = torch.tensor([9.0, 7, 3, 8, 5, 2], dtype=F64)
    stats = stats_with(counts.tolist(), inputs=x.float())
    error = _layer_error(layer, stats)
    best = error(LayerEdit.keep([0, 3]))
    edit, got_error, folded = MoelabRecipe()._fold(layer, stats, [0, 3], x, error, best)
    sources, expected_error, expected_folded = _naive_fold(layer, counts, [0, 3], x, error, best)
    assert folded and folded == expected_folded and edit.sources == sources
    assert all(kept // 3 == dropped // 3 for kept, dropped, _ in folded)
    assert got_error == pytest.approx(expected_error, rel=1e-9)
