"""The committed equal-compute results still match the code: retraining a variant with the
experiment's recipe reproduces the first logged training losses of docs/experiments/equal_compute.

The recipe warms up for 20 steps, and neither the data order (one RNG stream per step) nor the
learning rate during warmup depends on the total number of steps, so a 20-step run must log the
same losses at steps 10 and 20 as the committed 200-step run. A code change that alters training
(initialisation, data, the model's numerics) fails here the day it lands; regenerate the page
(`make experiment`) with it. The tolerance allows for float rounding only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moelab.train.compare import load_recipe, load_variants
from moelab.train.config import RunConfig
from moelab.train.logging import read_log
from moelab.train.trainer import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = json.loads((ROOT / "docs/experiments/equal_compute/summary.json").read_text())


@pytest.mark.parametrize("variant", ["dense", "moe_top2", "uoe"])
def test_retraining_reproduces_the_committed_loss_prefix(tmp_path, variant):
    recipe = load_recipe(ROOT / "experiments/equal_compute/recipe.yaml")
    assert recipe.warmup_steps == 20 and recipe.log_every == 10, "the prefix below assumes the recipe's warmup"
    short = dataclasses.replace(recipe, steps=20, eval_every=20, checkpoint_every=20)
    model = load_variants([str(ROOT / f"configs/models/{variant}.yaml")])[variant]
    train(RunConfig(model=model, train=short), tmp_path / "run", quiet=True)
    got = [(r["step"], r["loss"]) for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    want = [tuple(point) for point in COMMITTED[variant]["train_curve"][:2]]
    assert [step for step, _ in got] == [step for step, _ in want] == [10, 20]
    for (step, loss), (_, committed) in zip(got, want):
        assert loss == pytest.approx(committed, abs=1e-5), f"{variant} step {step}: {loss} vs committed {committed}"
