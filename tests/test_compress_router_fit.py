"""Router re-calibration (`moelab.compress.router_fit`) against direct computations: its loss is
the relative squared error of the edited layer against the original on the sampled inputs, it
recovers a router that was perturbed, it trains the router only, never worsens the held-out
loss, and `compress(..., router_fit=...)` writes a checkpoint whose router is the fitted one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from layer_views import make_view
from reference import F64
from test_compress import SMALL, hf_model

from moelab.compress import calibrate, compress
from moelab.compress.router_fit import HOLDOUT_EVERY, RouterFit, refit_router
from moelab.hf import open_checkpoint
from moelab.hf.edit import LayerEdit, moe_output


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny layers: one intra-op thread is faster on the project's 2-core machine."""


def _inputs(n: int = 64, D: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("renormalize", [True, False])
def test_loss_is_the_relative_squared_error_of_the_edited_layer(renormalize):
    layer = make_view(E=6, top_k=2, renormalize=renormalize, shared=True)
    x = _inputs()
    keep = [0, 2, 3, 5]
    edit, notes = refit_router(layer, LayerEdit.keep(keep), x, RouterFit(steps=0))
    base, pruned = moe_output(layer, x), moe_output(layer, x, keep=keep)
    held = torch.arange(len(x)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    error, scale = (base - pruned).pow(2).sum(-1), base.pow(2).sum(-1)
    expected = float(error[held].sum() / scale[held].sum())
    assert notes["heldout_before"] == pytest.approx(expected, rel=1e-4)
    assert notes["train_before"] == pytest.approx(float(error[~held].sum() / scale[~held].sum()), rel=1e-4)
    assert notes["best_step"] == 0 and notes["heldout_after"] == notes["heldout_before"]
    torch.testing.assert_close(edit.view.router.weight, layer.router.weight[keep])  # nothing trained


@pytest.mark.parametrize("score_func, left", [("softmax", 0.01), ("sigmoid", 0.9)])
def test_fit_recovers_a_perturbed_router(score_func, left):
    """Every expert kept, the router's weight disturbed: the softmax router goes back almost all
    the way; the sigmoid one (its renormalised top-2 weights depend on the logits' scale only
    weakly, and the top-k choice is not differentiable) only part of it."""
    layer = make_view(E=6, top_k=2, score_func=score_func, router_bias={1: 0.3})
    noise = torch.randn(layer.router.weight.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    noisy = dataclasses.replace(layer.router, weight=layer.router.weight + 0.3 * noise)
    edit = LayerEdit(tuple((e,) for e in range(6)), dataclasses.replace(layer, router=noisy))
    fitted, notes = refit_router(layer, edit, _inputs(256), RouterFit(steps=300, lr=1e-2))
    assert notes["heldout_after"] < left * notes["heldout_before"]
    assert notes["heldout_after"] == pytest.approx(
        float(_relative_error(layer, fitted, _inputs(256))[1]), rel=1e-3
    )
    # experts, shared experts and the correction bias are not trained
    for name in ("gate", "up", "down"):
        torch.testing.assert_close(getattr(fitted.view.experts, name), getattr(layer.experts, name))
    assert not torch.equal(fitted.view.router.bias, layer.router.bias)  # the router bias trains


def _relative_error(layer, edit, x):
    """(train, held-out) relative squared error of `edit`'s layer against `layer`, in float64."""
    from moelab.hf.edit import apply_edit

    base, got = moe_output(layer, x), moe_output(apply_edit(layer, edit), x)
    held = torch.arange(len(x)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    error, scale = (base - got).pow(2).sum(-1), base.pow(2).sum(-1)
    return error[~held].sum() / scale[~held].sum(), error[held].sum() / scale[held].sum()


def test_held_out_loss_never_worsens_and_selection_bias_stays():
    layer = make_view(E=8, top_k=2, score_func="sigmoid", selection_bias=True, shared=True, seed=4)
    x = _inputs(32)  # few tokens: a large step size overfits the 24 training tokens
    edit, notes = refit_router(layer, LayerEdit.keep([0, 1, 2, 4, 6, 7]), x, RouterFit(steps=40, lr=0.5))
    assert notes["heldout_after"] <= notes["heldout_before"]
    torch.testing.assert_close(
        edit.view.router.selection_bias, layer.router.selection_bias[[0, 1, 2, 4, 6, 7]]
    )


def test_a_tie_with_the_edits_own_router_keeps_it():
    """Top-1 renormalised: every combine weight is 1, so the loss changes only where a choice does.
    Steps too small to change one (Adam moves a weight at most lr a step: 3 x 1e-5 x |x|_1 <= 4e-4
    against the tokens' smallest top-1 margin, 0.026) all tie the held-out loss of the edit's own
    router, which is kept: best_step 0, its rows as they were, not a float32 copy."""
    layer = make_view(E=6, top_k=1, renormalize=True, seed=2)
    keep = [0, 2, 3, 5]
    x = _inputs()
    top = (x @ layer.router.weight[keep].T).topk(2, dim=1).values
    assert float((top[:, 0] - top[:, 1]).min()) > 3 * 1e-5 * float(x.abs().sum(1).max())
    edit, notes = refit_router(layer, LayerEdit.keep(keep), x, RouterFit(steps=3, lr=1e-5))
    assert notes["best_step"] == 0 and notes["heldout_after"] == notes["heldout_before"] > 0
    assert torch.equal(edit.view.router.weight, layer.router.weight[keep])


def test_refit_needs_sampled_inputs():
    layer = make_view()
    with pytest.raises(ValueError, match="needs sampled layer inputs"):
        refit_router(layer, LayerEdit.keep([0, 1, 2]), None, RouterFit(steps=5))
    with pytest.raises(ValueError, match=f"fewer than {HOLDOUT_EVERY} .*sample_tokens >= {HOLDOUT_EVERY}"):
        refit_router(layer, LayerEdit.keep([0, 1, 2]), _inputs(HOLDOUT_EVERY - 1), RouterFit(steps=5))
    with pytest.raises(ValueError, match="steps >= 0"):
        RouterFit(steps=-1)
    with pytest.raises(ValueError, match="learning rate > 0"):
        RouterFit(steps=1, lr=0.0)


def test_compress_writes_the_fitted_router(tmp_path):
    """Qwen2-MoE without top-k renormalisation: pruning shifts the combine weights; the fit
    lowers the held-out error in every layer, the checkpoint holds the fitted router (the
    writer's postconditions compare it with the edited layer) and a rerun gives the same bytes."""
    model = hf_model(tmp_path / "m", "qwen2_moe")
    stats = calibrate(model, tmp_path / "s", options=SMALL, quiet=True).directory
    fit = RouterFit(steps=20, lr=1e-2)
    runs = [
        compress(
            model,
            tmp_path / f"out{i}",
            method="frequency",
            ratio=0.25,
            stats=stats,
            router_fit=fit,
            quiet=True,
        )
        for i in range(2)
    ]
    report = runs[0]
    assert report["router_fit"] == {"steps": 20, "lr": 1e-2} and "router_fit_s" in report["timings"]
    with open_checkpoint(model) as base, open_checkpoint(tmp_path / "out0") as out:
        for index, entry in report["layers"].items():
            notes = entry["notes"]["router_fit"]
            assert notes["heldout_after"] < notes["heldout_before"]
            original = base.layer(int(index)).router.weight[entry["kept"]]
            assert not torch.equal(out.layer(int(index)).router.weight, original)
    a, b = ((tmp_path / f"out{i}" / "model.safetensors").read_bytes() for i in range(2))
    assert a == b
