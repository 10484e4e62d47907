"""The committed equal-compute results still match the code: retraining a variant with the
experiment's recipe reproduces the first logged training losses of docs/experiments/equal_compute
(its seed-0 run).

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
    committed = COMMITTED[variant]
    if "per_seed" in committed:  # several seeds: the recipe's own seed is the first run
        first = committed["per_seed"][0]
        assert recipe.seed == 0 and first["run"].endswith("-seed0"), first["run"]
        curve = first["train_curve"]
    else:
        curve = committed["train_curve"]
    want = [tuple(point) for point in curve[:2]]
    assert [step for step, _ in got] == [step for step, _ in want] == [10, 20]
    for (step, loss), (_, committed) in zip(got, want):
        assert loss == pytest.approx(committed, abs=1e-5), f"{variant} step {step}: {loss} vs committed {committed}"


@pytest.mark.parametrize("name", ["ref-8e-top2", "ref-32e-top4-shared"])
def test_retraining_a_reference_model_reproduces_its_committed_log(tmp_path, monkeypatch, name):
    """The shipped reference models' run files still train them: the first 10 steps log the
    committed training loss (docs/results/reference/<name>.log.jsonl, the run that produced the
    shipped weights). The whole retraining, byte for byte, is `make reproduce-reference`."""
    import moelab.train.trainer as trainer

    run = RunConfig.load(ROOT / f"configs/reference/{name}.yaml")
    assert run.train.log_every == 10 and run.train.warmup_steps >= 10
    step = trainer.train_step
    calls = {"n": 0}

    def ten_steps(*args, **kwargs):  # the run is stopped after 10 of its steps, like a Ctrl-C
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", ten_steps)
    with pytest.raises(KeyboardInterrupt):
        train(run, tmp_path / "run", quiet=True)
    got = [r["loss"] for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    committed = (ROOT / f"docs/results/reference/{name}.log.jsonl").read_text().splitlines()
    want = [json.loads(line)["loss"] for line in committed[:1]]
    assert [json.loads(committed[0])["step"]] == [10] and len(got) == 1
    assert got[0] == pytest.approx(want[0], abs=1e-6), f"{name} step 10: {got[0]} vs committed {want[0]}"
