"""The trainer: schedule, config validation, gradient accumulation, aux-free bias updates, and
bit-identical resume after `kill -9`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moelab.models import ModelConfig, MoETransformer
from moelab.train import RunConfig, TrainConfig, build_optimizer, lr_factor, read_log, train
from moelab.train.trainer import train_step

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = {
    "vocab_size": 8192,
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "max_seq_len": 32,
    "moe": {"num_experts": 4, "hidden_dim": 32, "top_k": 2},
}
TRAIN = {
    "steps": 8,
    "batch_size": 2,
    "seq_len": 16,
    "warmup_steps": 2,
    "eval_every": 4,
    "eval_tokens": 64,
    "checkpoint_every": 2,
    "keep_checkpoints": 10,
    "log_every": 1,
    "threads": 1,
    "domains": ["code", "german"],
}


def write_run(path: Path, **train_overrides) -> Path:
    path.write_text(yaml.safe_dump({"model": MODEL, "train": {**TRAIN, **train_overrides}}))
    return path


def test_lr_schedule_worked_values():
    cfg = TrainConfig(steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(6, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(10, cfg) == pytest.approx(0.1)  # the last step reaches the floor


def test_lr_schedule_short_runs():
    """A run one step longer than its warmup has one cosine step, at the peak; a one-step run
    (default warmup 0) trains at the peak; warmup = steps never decays."""
    assert [lr_factor(s, TrainConfig(steps=3, warmup_steps=2)) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(0, TrainConfig(steps=1)) == 1.0
    assert [lr_factor(s, TrainConfig(steps=2, warmup_steps=2)) for s in range(2)] == [0.5, 1.0]
    assert TrainConfig(steps=25).warmup_steps == 2  # the default: a tenth of the steps
    assert lr_factor(24, TrainConfig(steps=25)) == pytest.approx(0.1)  # the default floor


def test_optimizer_uses_the_configured_adamw_settings():
    model = MoETransformer(ModelConfig.from_dict(MODEL))
    cfg = TrainConfig(steps=1, lr=2e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    optimizer = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (2e-3, (0.8, 0.9), 1e-6)


@pytest.mark.parametrize(
    ("train_fields", "message"),
    [
        ({"steps": 0}, "TrainConfig.steps must be >= 1"),
        ({"steps": 5, "warmup_steps": 6}, "warmup_steps must lie in"),
        ({"steps": 5, "warmup_steps": 2.5}, "warmup_steps must be int"),
        ({"steps": 5, "eps": "1e-8"}, "YAML reads"),
        ({"steps": 5, "lr": True}, "lr must be float"),
        ({"steps": 5, "seed": -1}, "seed must be >= 0"),
        ({"steps": 5, "lr": "3e-3"}, "YAML reads"),
        ({"steps": 5, "dtype": "fp16"}, "unknown train.dtype 'fp16'"),
        ({"steps": 5, "domains": ["klingon"]}, "unknown train.domain 'klingon'"),
        ({"steps": 5, "setps": 3}, "did you mean 'steps'"),
        ({"steps": 5, "seq_len": 64}, "exceeds model.max_seq_len"),
        ({"steps": 5, "min_lr_ratio": 1.5}, "min_lr_ratio must lie in"),
        ({"lr": 1.0}, "steps"),
    ],
)
def test_bad_run_configs_name_the_problem(train_fields, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"model": MODEL, "train": train_fields})


def test_run_config_sections_checked_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'train'"):
        RunConfig.from_dict({"model": MODEL, "trian": {"steps": 1}})
    with pytest.raises(ValueError, match="no 'train' section"):
        RunConfig.from_dict({"model": MODEL})
    run = RunConfig.from_dict({"model": "tiny", "train": {"steps": 3, "seq_len": 16}})
    assert RunConfig.from_dict({"model": MODEL, "train": {"steps": 3, "seq_len": 32}}).train.seq_len == 32  # = max
    run.save(tmp_path / "run.yaml")
    assert RunConfig.load(tmp_path / "run.yaml").to_dict() == run.to_dict()


def test_weight_decay_skips_embeddings_norms_and_biases():
    model = MoETransformer(ModelConfig.from_dict(MODEL))
    optimizer = build_optimizer(model, TrainConfig(steps=1, weight_decay=0.1))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert "embed.weight" not in names
    assert not any("norm" in name for name in names)
    assert any("gate_up_proj" in name for name in names) and any("router" in name for name in names)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_weight_decay_skips_the_experts_stacked_biases(activation):
    """expert_mlp_bias: each expert's biases are stored as one [E, n] tensor, 2-D like a matrix, but
    biases all the same: no decay on them, the expert matrices still decayed."""
    moe = {**MODEL["moe"], "expert_mlp_bias": True, "activation": activation}
    model = MoETransformer(ModelConfig.from_dict({**MODEL, "moe": moe}))
    optimizer = build_optimizer(model, TrainConfig(steps=1, weight_decay=0.1))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    biases = [name for name, _ in model.named_parameters() if "experts" in name and name.endswith("_bias")]
    assert len(biases) == 2 * MODEL["n_layers"]  # gate_up (or up) and down, per layer
    assert not names & set(biases)
    assert any(name.endswith("experts.down_proj") for name in names)


class FixedBatches:
    def __init__(self, batches):
        self.batches = iter(batches)

    def __next__(self):
        return next(self.batches)


def test_gradient_accumulation_equals_the_full_batch():
    """Two micro-batches of 2 rows give the gradient of one batch of 4 (balance loss off: it is
    defined per micro-batch)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**MODEL, "moe": {**MODEL["moe"], "balance_coef": 0.0}})
    inputs = torch.randint(0, 8192, (4, 16))
    targets = torch.randint(0, 8192, (4, 16))
    grads = []
    for accum, rows in ((1, 4), (2, 2)):
        torch.manual_seed(1)
        model = MoETransformer(cfg).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loader = FixedBatches([(inputs[i : i + rows], targets[i : i + rows]) for i in range(0, 4, rows)])
        train_step(
            model,
            optimizer,
            loader,
            TrainConfig(steps=1, grad_accum=accum),
            torch.device("cpu"),
            torch.autocast("cpu", enabled=False),
        )
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # rtol covers the router, which computes its logits in float32 even in a float64 model
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def test_a_capacity_limit_reports_what_it_dropped():
    """With capacity dropping the step reports the fraction of assignments dropped (counted here
    from the plan the layer used), and the load stays the routers' choice, before the drop."""
    from moelab.nn.dispatch import expert_capacity

    torch.manual_seed(0)
    moe = {**MODEL["moe"], "capacity_factor": 0.5, "balance_coef": 0.0}
    model = MoETransformer(ModelConfig.from_dict({**MODEL, "moe": moe, "allow_noncausal_routing": True}))
    inputs = torch.randint(0, 8192, (4, 16))
    loader = FixedBatches([(inputs, torch.randint(0, 8192, (4, 16)))])
    stats = train_step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), loader, TrainConfig(steps=1), torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
    )  # fmt: skip
    E, K, T = moe["num_experts"], moe["top_k"], inputs.numel()
    capacity = expert_capacity(T * K, E, 0.5)
    dropped = [float((load - load.clamp(max=capacity)).sum()) / (T * K) for load in stats["load"].values()]
    assert all(float(load.sum()) == T * K for load in stats["load"].values())
    assert stats["scalars"]["dropped_fraction"] == pytest.approx(sum(dropped) / len(dropped))
    assert sum(dropped) > 0


def _step(model, batches, **train_fields):
    """One `train_step` on `batches` with a frozen model (SGD at lr 0, no clipping)."""
    return train_step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), FixedBatches(batches),
        TrainConfig(steps=1, grad_clip=0.0, **train_fields), torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
    )  # fmt: skip


def test_accumulated_step_reports_the_mean_over_its_micro_batches():
    """A step's loss, experts per token and dropped fraction are the means of its micro-batches'
    (each of which, alone, is a grad_accum=1 step), not their sums."""
    torch.manual_seed(0)
    moe = {**MODEL["moe"], "capacity_factor": 0.5, "balance_coef": 0.0}
    model = MoETransformer(ModelConfig.from_dict({**MODEL, "moe": moe, "allow_noncausal_routing": True}))
    batches = [(torch.randint(0, 8192, (2, 16)), torch.randint(0, 8192, (2, 16))) for _ in range(2)]
    alone = [_step(model, [batch]) for batch in batches]
    both = _step(model, batches, grad_accum=2)
    for name in ("loss", "experts_per_token", "dropped_fraction"):
        expected = (alone[0]["scalars"][name] + alone[1]["scalars"][name]) / 2
        assert both["scalars"][name] == pytest.approx(expected, rel=1e-5), name
    assert both["scalars"]["dropped_fraction"] > 0 and both["scalars"]["experts_per_token"] > 0
    for layer, k in both["experts_per_token"].items():
        mean = (alone[0]["experts_per_token"][layer] + alone[1]["experts_per_token"][layer]) / 2
        assert k == pytest.approx(mean)
    for layer, load in both["load"].items():  # the load is a count: summed over micro-batches
        torch.testing.assert_close(load, alone[0]["load"][layer] + alone[1]["load"][layer])


def test_accumulated_step_reports_the_mean_aux_losses_metrics_and_experts():
    """Every aux loss and architecture metric of an accumulated step (here BlockFFN's, with a
    balance loss too) is the mean of its micro-batches' values, not their sum or the last one;
    its experts per token is the mean over the MoE layers."""
    torch.manual_seed(0)
    moe = {**MODEL["moe"], **ARCHITECTURES["blockffn_adaptive"][0], "balance_coef": 0.01}
    model = MoETransformer(ModelConfig.from_dict({**MODEL, "moe": moe}))
    batches = [(torch.randint(0, 8192, (2, 16)), torch.randint(0, 8192, (2, 16))) for _ in range(2)]
    alone = [_step(model, [batch]) for batch in batches]
    both = _step(model, batches, grad_accum=2)
    names = [name for name in both["scalars"] if name.startswith(("aux/", "metrics/"))]
    assert {"aux/balance", "aux/chunk_sparsity", "metrics/tls", "metrics/cls"} <= set(names)
    for name in names:
        expected = (alone[0]["scalars"][name] + alone[1]["scalars"][name]) / 2
        assert both["scalars"][name] == pytest.approx(expected, rel=1e-5), name
    layers = both["experts_per_token"]  # the layers differ: the step's value is their mean
    assert len(set(layers.values())) == 2
    assert both["scalars"]["experts_per_token"] == pytest.approx(sum(layers.values()) / 2)


def test_accumulation_scales_the_aux_loss_like_the_lm_loss():
    """With a balance loss, two accumulated micro-batches give the gradient of
    sum_i (loss_i + aux_i) / 2, each micro-batch's aux loss weighted like its LM loss."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**MODEL, "moe": {**MODEL["moe"], "balance_coef": 0.5}})
    batches = [(torch.randint(0, 8192, (2, 16)), torch.randint(0, 8192, (2, 16))) for _ in range(2)]
    torch.manual_seed(1)
    model = MoETransformer(cfg)
    reference = MoETransformer(cfg)
    reference.load_state_dict(model.state_dict())
    _step(model, batches, grad_accum=2)
    for inputs, targets in batches:
        out = reference(inputs, targets=targets)
        assert float(out.aux_loss.detach()) > 0
        ((out.loss + out.aux_loss) / 2).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("bad, dtype", [(float("inf"), "fp32"), (float("nan"), "fp32"), (float("inf"), "bf16")])
def test_a_non_finite_gradient_at_a_finite_loss_stops_before_the_update(bad, dtype):
    """One gradient overflows while the loss stays finite: the step raises before AdamW moves
    anything (clipping by a non-finite norm would have made every weight NaN, and a checkpoint of
    that step would have kept them). Training in fp32 is suggested to a bf16 run only."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.from_dict(MODEL))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.norm.weight.register_hook(lambda grad: torch.full_like(grad, bad))
    optimizer = build_optimizer(model, TrainConfig(steps=1))
    batch = (torch.randint(0, 8192, (2, 16)), torch.randint(0, 8192, (2, 16)))
    with pytest.raises(ValueError, match=f"the gradient norm is {bad} at a finite loss") as err:
        train_step(model, optimizer, FixedBatches([batch]), TrainConfig(steps=1, dtype=dtype), torch.device("cpu"),
                   torch.autocast("cpu", enabled=False))  # fmt: skip
    assert ("train in fp32 (train.dtype: fp32)" in str(err.value)) == (dtype == "bf16"), str(err.value)
    assert not optimizer.state
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("grad_clip", [0.0, 0.01])
def test_gradients_are_clipped_to_grad_clip_and_the_norm_reported_before_clipping(grad_clip):
    """The step reports the global gradient norm before clipping; the optimizer sees gradients of
    norm grad_clip when it is exceeded, and untouched ones with grad_clip = 0 (no clipping)."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.from_dict(MODEL))
    batch = (torch.randint(0, 8192, (2, 16)), torch.randint(0, 8192, (2, 16)))
    stats = train_step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), FixedBatches([batch]),
        TrainConfig(steps=1, grad_clip=grad_clip), torch.device("cpu"), torch.autocast("cpu", enabled=False),
    )  # fmt: skip
    reported = stats["scalars"]["grad_norm"]
    seen = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert reported > 0.1
    assert seen == pytest.approx(grad_clip if grad_clip else reported, rel=1e-4)


def test_logged_window_means_imbalance_and_token_count(tmp_path, monkeypatch):
    """With log_every=2 each train record holds the mean loss of its two steps and the load
    imbalance (max / mean) of their summed load; the result counts every step's tokens."""
    from moelab.train import trainer

    steps = []

    def spy(*args, **kwargs):
        stats = train_step(*args, **kwargs)
        steps.append(stats)
        return stats

    monkeypatch.setattr(trainer, "train_step", spy)
    run = RunConfig.from_dict(
        {"model": MODEL, "train": {**TRAIN, "steps": 4, "log_every": 2, "eval_every": 4, "grad_accum": 2}}
    )
    result = train(run, tmp_path / "run", quiet=True)
    records = [r for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [2, 4] and len(steps) == 4
    for record, pair in zip(records, (steps[0:2], steps[2:4]), strict=True):
        assert record["loss"] == pytest.approx((pair[0]["scalars"]["loss"] + pair[1]["scalars"]["loss"]) / 2)
        ratios = []
        for layer, load in pair[0]["load"].items():
            total = load + pair[1]["load"][layer]
            ratios.append(float(total.max() / total.mean()))
        assert record["load_imbalance"] == pytest.approx(sum(ratios) / len(ratios))
        assert record["load_imbalance"] >= 1.0
    assert result.steps == 4
    assert result.tokens == 4 * 2 * 2 * 16 == 4 * run.train.tokens_per_step
    assert json.loads((tmp_path / "run" / "results.json").read_text())["tokens"] == result.tokens


def test_a_last_partial_window_is_logged_and_evaluated_on_its_own_steps(tmp_path, monkeypatch):
    """steps=3 with log_every=eval_every=2: step 3 ends the run, so it logs and evaluates a window
    of one step (its own loss and load, nothing carried over from steps 1-2), and the result's
    eval loss is that last evaluation's."""
    from moelab.train import trainer

    steps = []

    def spy(*args, **kwargs):
        steps.append(train_step(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(trainer, "train_step", spy)
    run = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 3, "log_every": 2, "eval_every": 2}})
    result = train(run, tmp_path / "run", quiet=True)
    records = read_log(tmp_path / "run")
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == [2, 3] and [r["step"] for r in evals] == [2, 3]
    assert train_records[1]["loss"] == pytest.approx(steps[2]["scalars"]["loss"])
    for record, window in zip(evals, (steps[0:2], steps[2:]), strict=True):
        for layer, share in record["load"].items():
            load = sum(s["load"][int(layer)] for s in window)
            assert share == pytest.approx((load / load.sum()).tolist())
    assert result.eval_loss == evals[1]["loss"] != evals[0]["loss"]


def test_checkpoints_every_n_steps_and_at_the_end_keeping_the_newest(tmp_path):
    """checkpoint_every=2 over 5 steps writes steps 2, 4 and 5 (the end); keep_checkpoints=2
    leaves the newest two."""
    from moelab.train.checkpoint import list_checkpoints

    train_fields = {**TRAIN, "steps": 5, "eval_every": 5, "log_every": 5, "keep_checkpoints": 2}
    train(RunConfig.from_dict({"model": MODEL, "train": train_fields}), tmp_path / "run", quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000004", "step-000005"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_rexmoe_pool_opens_linearly_from_zero(tmp_path, monkeypatch):
    """reuse_ramp_steps=4: the step after s optimizer steps trains at progress min(1, s / 4),
    so the first step sees only the layer's own experts and step 5 on the whole pool."""
    from moelab.train import trainer

    progress = []
    real = trainer.set_reuse_progress

    def spy(model, fraction):
        progress.append(fraction)
        real(model, fraction)

    monkeypatch.setattr(trainer, "set_reuse_progress", spy)
    model = {**MODEL, "moe": {**MODEL["moe"], "reuse_layers": 2}}
    run = RunConfig.from_dict(
        {"model": model, "train": {**TRAIN, "steps": 6, "reuse_ramp_steps": 4, "eval_every": 6}}
    )
    train(run, tmp_path / "run", quiet=True)
    assert progress == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_selection_bias_moves_during_training(tmp_path):
    moe = {**MODEL["moe"], "selection_bias": True, "balance_coef": 0.0, "bias_update_rate": 0.01}
    run = RunConfig.from_dict(
        {"model": {**MODEL, "moe": moe}, "train": {**TRAIN, "steps": 2, "eval_every": 2}}
    )
    train(run, tmp_path / "run", quiet=True)
    tensors = load_file(tmp_path / "run" / "model" / "model.safetensors")
    bias = tensors["layers.1.ffn.router.selection_bias"]
    assert bias.abs().max() > 0  # two updates of +-0.01 each (or 0 for a perfectly balanced expert)
    assert torch.allclose(bias.abs() * 100, (bias.abs() * 100).round(), atol=1e-4)


def test_run_outputs_and_logs(tmp_path):
    run = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 4}})
    result = train(run, tmp_path / "run", quiet=True)
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "log.jsonl",
        "tensorboard",
        "checkpoints",
        "model",
        "results.json",
    }
    assert (out / "model" / "tokenizer.json").is_file()
    records = read_log(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4] and set(evals[0]["loss"]) == {"code", "german", "all"}
    assert sum(evals[0]["load"]["1"]) == pytest.approx(1.0)
    assert result.eval_loss == evals[0]["loss"]
    with pytest.raises(ValueError, match=r"already holds moelab's training run; pass --overwrite .* \(or --resume"):
        train(run, out, quiet=True)
    with pytest.raises(ValueError, match="has finished; pass --overwrite to train it again"):
        train(run, out, resume=True, quiet=True)
    other = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 4, "lr": 1e-3}})
    with pytest.raises(ValueError, match="train.lr"):
        train(other, out, resume=True, quiet=True)
    with pytest.raises(ValueError, match="empty holds no training run; start the run without --resume"):
        train(run, tmp_path / "empty", resume=True, quiet=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training exited early with {process.returncode}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def _comparable(directory: Path) -> list[dict]:
    """The run's log records without wall-clock speed."""
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in read_log(directory)]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_interrupted_run_resumes_bit_identically(tmp_path, how):
    """Stop a training process right after its step-4 checkpoint, with kill -9 (no chance to
    react) or Ctrl-C (it finishes the step and checkpoints), resume it, and compare the final
    weights and every log record with an uninterrupted run of the same seed."""
    config = write_run(tmp_path / "run.yaml", steps=40, log_every=3, eval_every=6, checkpoint_every=4)
    run = RunConfig.load(config)
    train(run, tmp_path / "straight", quiet=True)

    cmd = [
        sys.executable,
        "-m",
        "moelab.cli",
        "train",
        str(config),
        "--out",
        str(tmp_path / "stopped"),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(tmp_path / "stopped" / "checkpoints" / "step-000004", process)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    assert not (tmp_path / "stopped" / "model").exists(), "the run finished before it was stopped"
    if how == "SIGINT":
        assert "interrupted at step" in stderr and process.returncode != 0
    train(run, tmp_path / "stopped", resume=True, quiet=True)

    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert _comparable(tmp_path / "stopped") == _comparable(tmp_path / "straight")


def _tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the run's TensorBoard scalars, as TensorBoard reads them (records
    a resumed run purged left out), without wall-clock speed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if "tokens_per_second" not in t]
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}


def test_a_run_killed_after_a_checkpoint_keeps_its_tensorboard_records(tmp_path):
    """kill -9 right after the step-4 checkpoint of a run whose TensorBoard writer thread lags
    (each event written 50 ms late), then resume: TensorBoard holds the straight run's scalars.
    Before, the records of steps up to 4 still queued in the writer died with the process, and the
    resumed run, which starts after step 4, never wrote them."""
    config = write_run(tmp_path / "run.yaml", steps=8, log_every=1, eval_every=6, checkpoint_every=4)
    run = RunConfig.load(config)
    train(run, tmp_path / "straight", quiet=True)
    lagging_writer = (
        "import sys, time\n"
        "from tensorboard.summary.writer import record_writer\n"
        "write = record_writer.RecordWriter.write\n"
        "record_writer.RecordWriter.write = lambda self, data: time.sleep(0.05) or write(self, data)\n"
        "sys.argv = ['moelab', 'train', sys.argv[1], '--out', sys.argv[2], '--quiet']\n"
        "from moelab.cli import main\n"
        "main()\n"
    )
    cmd = [sys.executable, "-c", lagging_writer, str(config), str(tmp_path / "stopped")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(tmp_path / "stopped" / "checkpoints" / "step-000004", process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
    assert not (tmp_path / "stopped" / "model").exists(), "the run finished before it was killed"
    train(run, tmp_path / "stopped", resume=True, quiet=True)
    assert _tensorboard_scalars(tmp_path / "stopped") == _tensorboard_scalars(tmp_path / "straight")


def test_logged_learning_rate_follows_the_schedule(tmp_path):
    run = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 6, "warmup_steps": 2, "lr": 1e-3}})
    train(run, tmp_path / "run", quiet=True)
    lrs = [r["lr"] for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert lrs == pytest.approx([1e-3 * lr_factor(s, run.train) for s in range(6)])
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[-1] == pytest.approx(1e-3 * run.train.min_lr_ratio)


ARCHITECTURES = {
    "blockffn_adaptive": (
        {
            "router": "relu",
            "activation": "silu",
            "locality_coef": 2e-3,
            "chunk_sparsity_coef": 5e-2,
            "chunk_len": 8,
        },
        {"adaptive_chunk_sparsity": True, "warmup_steps": 1, "chunk_sparsity_window": 1},
    ),
    "rexmoe_ramp": ({"reuse_layers": 2}, {"reuse_ramp_steps": 4}),
    "topp": ({"router": "topp", "top_p": 0.5, "entropy_coef": 1e-4}, {}),
    "coe": ({"chain_iterations": 2, "top_k": 1}, {}),
    # LongCat-Flash's computation budget: the selection bias it moves is saved and moved once a step on resuming
    "compute_budget": ({"identity_experts": 2, "renormalize": False, "selection_bias": True,
                        "computed_experts_target": 1.5, "bias_update_rate": 0.1}, {}),
}


def test_training_reads_the_train_split_and_evaluation_the_validation_split(tmp_path, monkeypatch):
    """The held-out splits stay held out: the training windows come from each domain's train
    split, the periodic evaluation reads the validation split, and nothing reads test."""
    import moelab.data.loader as loader_module
    import moelab.eval.perplexity as perplexity_module

    read = {"loader": [], "eval": []}

    def recording(kind, tokenize):
        def tokenize_and_record(domain, split, *args, **kwargs):
            read[kind].append((domain, split))
            return tokenize(domain, split, *args, **kwargs)

        return tokenize_and_record

    monkeypatch.setattr(loader_module, "tokenize_split", recording("loader", loader_module.tokenize_split))
    monkeypatch.setattr(perplexity_module, "tokenize_split", recording("eval", perplexity_module.tokenize_split))
    train(RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 4}}), tmp_path / "run", quiet=True)
    assert read["loader"] == [("code", "train"), ("german", "train")]
    assert read["eval"] and set(read["eval"]) == {("code", "validation"), ("german", "validation")}


def test_the_adaptive_chunk_schedule_sees_the_unweighted_chunk_loss(tmp_path, monkeypatch):
    """BlockFFN's schedule compares L_CS itself from window to window: the trainer hands it the
    step's weighted aux loss divided by the coefficient that weighted it, not the weighted loss."""
    import moelab.train.trainer as trainer_module
    from moelab.nn.blockffn import AdaptiveCoefficient

    moe_extra, train_extra = ARCHITECTURES["blockffn_adaptive"]
    model = {**MODEL, "moe": {**MODEL["moe"], **moe_extra}}
    run = RunConfig.from_dict({"model": model, "train": {**TRAIN, "steps": 4, **train_extra}})
    weighted, used, given = [], [], []

    def recorded_step(model, *args):
        used.append(next(m for m in model.modules() if hasattr(m, "coefs")).coefs["chunk_sparsity"])
        stats = train_step(model, *args)
        weighted.append(stats["scalars"]["aux/chunk_sparsity"])
        return stats

    def recorded_schedule(self, loss):
        given.append(loss)
        return schedule(self, loss)

    schedule = AdaptiveCoefficient.step
    monkeypatch.setattr(trainer_module, "train_step", recorded_step)
    monkeypatch.setattr(AdaptiveCoefficient, "step", recorded_schedule)
    train(run, tmp_path / "run", quiet=True)
    assert len(given) == 4 and len(set(used)) > 1  # the coefficient moved between steps
    assert given == pytest.approx([w / c for w, c in zip(weighted, used)], rel=1e-6)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_resume_is_bit_identical_for_stateful_architectures(tmp_path, name):
    """Resume from the step-2 checkpoint of a finished run: the adaptive chunk coefficient,
    ReXMoE's pool schedule and variable-k routers continue exactly."""
    import shutil

    moe_extra, train_extra = ARCHITECTURES[name]
    model = {**MODEL, "moe": {**MODEL["moe"], **moe_extra}}
    run = RunConfig.from_dict({"model": model, "train": {**TRAIN, "steps": 6, **train_extra}})
    straight = train(run, tmp_path / "straight", quiet=True)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    for later in ("checkpoints/step-000004", "checkpoints/step-000006", "model"):
        shutil.rmtree(resumed_dir / later)
    (resumed_dir / "results.json").unlink()
    resumed = train(run, resumed_dir, resume=True, quiet=True)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(resumed_dir / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.eval_loss == resumed.eval_loss
    records = [r for r in read_log(tmp_path / "straight") if r["kind"] == "train"]
    if name == "blockffn_adaptive":
        assert {"metrics/tls", "metrics/cls", "chunk_sparsity_coef"} <= records[-1].keys()
        assert len({r["chunk_sparsity_coef"] for r in records}) > 2  # the schedule moved it
    if name == "topp":
        assert 1.0 <= records[-1]["experts_per_token"] <= 4.0
    if name == "compute_budget":
        assert a["layers.1.ffn.router.selection_bias"][:4].abs().min() > 0  # the experts' biases moved
        assert not a["layers.1.ffn.router.selection_bias"][4:].any()  # the identity experts' held


@pytest.mark.parametrize("stopped_after", [4, 6])
def test_resume_from_a_later_or_the_last_checkpoint_reports_what_the_straight_run_did(
    tmp_path, monkeypatch, stopped_after
):
    """Resume a BlockFFN run (adaptive coefficient, variable experts per token) from step 4, inside
    a log window and an eval window and after the coefficient moved, or from its last checkpoint
    (killed before results.json): with a clock that ticks evenly, every log record, the weights
    and results.json (speed, measured experts per token) are the straight run's."""
    import shutil
    from types import SimpleNamespace

    from moelab.train import trainer

    now = [0.0]

    def tick():
        now[0] += 0.25
        return now[0]

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=tick, monotonic=time.monotonic))
    moe_extra, train_extra = ARCHITECTURES["blockffn_adaptive"]
    model = {**MODEL, "moe": {**MODEL["moe"], **moe_extra}}
    train_fields = {**TRAIN, **train_extra, "steps": 6, "log_every": 5, "eval_every": 3, "checkpoint_every": 2}
    run = RunConfig.from_dict({"model": model, "train": train_fields})
    straight = tmp_path / "straight"
    train(run, straight, quiet=True)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for later in [f"checkpoints/step-{s:06d}" for s in range(stopped_after + 2, 7, 2)] + ["model"]:
        shutil.rmtree(resumed / later)
    (resumed / "results.json").unlink()
    train(run, resumed, resume=True, quiet=True)
    assert read_log(resumed) == read_log(straight)
    a, b = (load_file(d / "model" / "model.safetensors") for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((d / "results.json").read_text()) for d in (straight, resumed)]
    assert [{k: v for k, v in r.items() if k != "out_dir"} for r in results] == [
        {k: v for k, v in results[0].items() if k != "out_dir"}
    ] * 2
    state = torch.load(straight / "checkpoints" / "step-000004" / "train_state.pt", weights_only=True)
    assert state["chunk_coef"]["value"] != moe_extra["chunk_sparsity_coef"], "it had moved by step 4"


def test_a_run_on_automatic_threads_resumes_on_the_count_it_trained_on(tmp_path, monkeypatch):
    """A run file without train.threads trains on the count the machine gives (`--threads auto`):
    checkpointed on 2 threads and resumed where the machine gives 1, the run goes on with 2 and its
    weights are the straight run's. Before, it went on with 1: other weights, without a word."""
    import shutil

    from moelab.train import trainer

    run = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 4, "threads": None}})
    torch.set_num_threads(2)  # the machine's count when the run started (one_thread puts 1 back)
    train(run, tmp_path / "straight", quiet=True)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    for later in ("checkpoints/step-000004", "model"):
        shutil.rmtree(resumed / later)
    (resumed / "results.json").unlink()
    counts, real_step = [], trainer.train_step

    def counted_step(*args, **kwargs):
        counts.append(torch.get_num_threads())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", counted_step)
    torch.set_num_threads(1)  # the machine's count at the resume
    train(run, resumed, resume=True, quiet=True)
    assert counts == [2, 2] and torch.get_num_threads() == 1  # the resumed steps; the count is put back after
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "straight", resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_on_automatic_threads_resumed_on_fewer_cores_warns(tmp_path, monkeypatch):
    """Checkpointed on 2 threads, resumed on a machine of 1 core: 2 threads there would slow every
    step, so the run goes on with 1 and warns that its weights will differ from the straight run's."""
    import shutil

    from moelab import threads

    run = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 4, "threads": None}})
    torch.set_num_threads(2)
    train(run, tmp_path / "run", quiet=True)
    shutil.rmtree(tmp_path / "run" / "model")
    (tmp_path / "run" / "results.json").unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    torch.set_num_threads(1)
    monkeypatch.setattr(threads, "available_cores", lambda: 1)
    with pytest.warns(UserWarning, match="ran on 2 intra-op threads and this machine has 1 cores: it goes on with 1, so its weights"):
        train(run, tmp_path / "run", resume=True, quiet=True)


def test_resume_refuses_a_changed_model(tmp_path):
    train_fields = {**TRAIN, "steps": 1, "warmup_steps": 0}
    train(RunConfig.from_dict({"model": MODEL, "train": train_fields}), tmp_path / "run", quiet=True)
    other = RunConfig.from_dict({"model": {**MODEL, "moe": {**MODEL["moe"], "top_k": 1}}, "train": train_fields})
    with pytest.raises(ValueError, match=r"model.moe.top_k: run 2, now 1"):
        train(other, tmp_path / "run", resume=True, quiet=True)


def test_resuming_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 2 of a run whose first checkpoint is at step 4: the line says there is no
    checkpoint (it named a "last checkpoint at step 0", which never exists), --resume trains it
    from the start, and its log is the straight run's (nothing of the stopped attempt left in it)."""
    from moelab.train import trainer

    run = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "steps": 4, "checkpoint_every": 4}})
    train(run, tmp_path / "straight", quiet=True)
    calls = []

    def stop_at_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", stop_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        train(run, tmp_path / "stopped", quiet=True)
    assert "interrupted at step 1 (no checkpoint yet: the run starts again)" in capsys.readouterr().err
    assert [r["step"] for r in read_log(tmp_path / "stopped")] == [1]
    monkeypatch.setattr(trainer, "train_step", train_step)
    train(run, tmp_path / "stopped", resume=True, quiet=True)
    assert _comparable(tmp_path / "stopped") == _comparable(tmp_path / "straight")


def test_training_options_checked_against_the_model(tmp_path):
    run = RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "adaptive_chunk_sparsity": True}})
    with pytest.raises(ValueError, match="chunk_sparsity_coef > 0"):
        train(run, tmp_path / "run", quiet=True)
    with pytest.raises(ValueError, match="reuse_ramp_steps must lie in"):
        RunConfig.from_dict({"model": MODEL, "train": {**TRAIN, "reuse_ramp_steps": TRAIN["steps"]}})


def test_union_of_experts_model_trains_and_reports(tmp_path):
    """UoE layers report experts per token but are not "moe" layers for the accounting."""
    model = {k: v for k, v in MODEL.items() if k != "moe"}
    model.update(dense_hidden_dim=64, uoe={"attn_top_k": 2, "mlp_experts": 4, "mlp_top_k": 2})
    run = RunConfig.from_dict({"model": model, "train": {**TRAIN, "steps": 2, "eval_every": 2}})
    train(run, tmp_path / "run", quiet=True)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model_info"]["active_params"] < results["model_info"]["total_params"]


def _decaying_expert_biases(model, cfg):
    """build_optimizer as it was before expert biases were left undecayed: every 2-D parameter
    but the embedding decayed, the [E, n] expert biases included."""
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p.ndim >= 2 and id(p) not in embedding for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decayed) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def test_a_run_checkpointed_when_expert_biases_were_decayed_resumes(tmp_path, monkeypatch):
    """A run with expert_mlp_bias checkpointed by a moelab that decayed the experts' biases resumes
    (AdamW refused the saved groups, of other sizes): each parameter gets its own moments back."""
    import shutil

    from moelab.train import trainer

    model = {**MODEL, "moe": {**MODEL["moe"], "expert_mlp_bias": True}}
    run = RunConfig.from_dict({"model": model, "train": {**TRAIN, "steps": 4, "checkpoint_every": 2}})
    with monkeypatch.context() as old:
        old.setattr(trainer, "build_optimizer", _decaying_expert_biases)
        train(run, tmp_path / "run", quiet=True)
    for later in ("checkpoints/step-000004", "model"):
        shutil.rmtree(tmp_path / "run" / later)
    (tmp_path / "run" / "results.json").unlink()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "train_state.pt", weights_only=True)
    fresh = MoETransformer(ModelConfig.from_dict(model))
    names = {id(p): name for name, p in fresh.named_parameters()}
    old_order = [names[id(p)] for g in _decaying_expert_biases(fresh, run.train).param_groups for p in g["params"]]
    saved_ids = [i for g in saved["optimizer"]["param_groups"] for i in g["params"]]
    want = {name: saved["optimizer"]["state"][i]["exp_avg"] for name, i in zip(old_order, saved_ids, strict=True)}
    restored = {}
    restore = trainer.restore_checkpoint

    def recording(path, model, optimizer, *args):
        out = restore(path, model, optimizer, *args)
        restored.update({name: optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters()})
        return out

    monkeypatch.setattr(trainer, "restore_checkpoint", recording)
    train(run, tmp_path / "run", resume=True, quiet=True)
    assert restored.keys() == want.keys() and all(torch.equal(restored[k], want[k]) for k in want)
