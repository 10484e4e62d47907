"""Training under torchrun (2 gloo processes, expert parallelism x FSDP2) equals one process.

One optimizer step of the trainer's `train_step` on a fixed global batch: the parallel run's
loss, gradients (after clipping), updated weights and aux-loss-free biases, gathered whole,
equal the one-process step to 1e-5 in fp32 for every routing option. "Global" means: token
choice and the balance loss see the whole batch (the one-process reference trains on it in one
micro-batch); expert choice and capacity dropping choose among each rank's own tokens (the
reference trains on the ranks' slices as micro-batches, with gradient accumulation).
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from processes import spawn

from moelab.distributed import free_port
from moelab.models import ModelConfig, MoETransformer
from moelab.nn import attach_selection_bias_update
from moelab.train import TrainConfig
from moelab.train.trainer import build_optimizer, train_step

WORLD = 2
BASE = dict(vocab_size=8192, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=32, tie_embeddings=True)
MOE = dict(num_experts=4, hidden_dim=32, top_k=2, balance_coef=0.01)
# name -> (model config fields, routing per rank's tokens)
VARIANTS = {
    "topk softmax + z": (dict(moe=dict(MOE, z_coef=1e-3)), False),
    "sigmoid group-limited + aux-free bias + shared": (
        dict(moe=dict(MOE, score_func="sigmoid", selection_bias=True, n_group=2, topk_group=1, num_shared=1)),
        False,
    ),
    "top-p": (dict(moe=dict(MOE, router="topp", top_p=0.5, max_k=3, entropy_coef=1e-3)), False),
    "relu (BlockFFN)": (
        dict(moe=dict(MOE, router="relu", activation="silu", balance_coef=0.0, locality_coef=2e-3, chunk_sparsity_coef=5e-2, chunk_len=8)),
        False,
    ),
    "chain-of-experts": (dict(moe=dict(MOE, top_k=1, renormalize=False, chain_iterations=2)), False),
    "union-of-experts": (
        dict(dense_hidden_dim=64, first_k_dense=0, uoe=dict(attn_top_k=1, mlp_experts=4, mlp_top_k=2, balance_coef=0.01)),
        False,
    ),
    "union-of-experts, reference selection": (
        dict(dense_hidden_dim=64, first_k_dense=0, allow_noncausal_routing=True,
             uoe=dict(attn_top_k=1, mlp_experts=4, mlp_top_k=2, selection="reference", gate="none")),
        True,  # normalises over the batch, so per rank; gate="none": the routers get no gradient
    ),  # fmt: skip
    "graph router + expert biases": (dict(moe=dict(MOE, router="graph_sim", expert_mlp_bias=True)), False),
    "hash layers (token ids through expert parallelism)": (
        dict(moe=dict(MOE, router="hash", score_func="sqrtsoftplus", route_scale=1.5, balance_coef=0.0)), False
    ),
    "all tokens to experts 0 and 1 (EP rank 1 gets no rows) + expert biases": (
        dict(moe=dict(MOE, score_func="sigmoid", selection_bias=True, expert_mlp_bias=True)),
        False,
    ),
    "expert choice": (
        dict(allow_noncausal_routing=True, moe=dict(MOE, router="expert_choice", ec_capacity_factor=2.0, balance_coef=0.0)),
        True,
    ),
    "capacity dropping": (dict(allow_noncausal_routing=True, moe=dict(MOE, capacity_factor=1.0, balance_coef=0.0)), True),
}
TRAIN = dict(steps=10, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, grad_clip=0.5, device="cpu")


def _config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(dict(BASE, **VARIANTS[name][0]))


def _model(name: str) -> MoETransformer:
    """The variant's model as built with seed 0 (before any parallelization)."""
    torch.manual_seed(0)
    model = MoETransformer(_config(name))
    if name.startswith("all tokens to experts 0 and 1"):
        with torch.no_grad():
            for layer in model.moe_layers.values():
                layer.router.selection_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 8192, (TRAIN["batch_size"], TRAIN["seq_len"] + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _step(model: MoETransformer, cfg: TrainConfig, batches, parallel=None) -> dict:
    optimizer = build_optimizer(model, cfg)
    if any(getattr(m, "selection_bias", None) is not None for m in model.modules()):
        group = None if parallel is None else parallel.world_group
        attach_selection_bias_update(optimizer, model, rate=0.01, group=group)
    stats = train_step(model, optimizer, iter(batches), cfg, torch.device("cpu"), contextlib.nullcontext(), parallel)
    keys = ("load", "experts_per_token")
    return {"loss": stats["scalars"]["loss"], "grad_norm": stats["scalars"]["grad_norm"]} | {k: stats[k] for k in keys}


def _reference(name: str, world: int = WORLD) -> dict:
    model = _model(name)
    inputs, targets = _batch()
    per_rank = VARIANTS[name][1]
    if per_rank:  # each rank's slice is a micro-batch
        b = len(inputs) // world
        batches = [(inputs[r * b : (r + 1) * b], targets[r * b : (r + 1) * b]) for r in range(world)]
        cfg = TrainConfig(**dict(TRAIN, batch_size=b, grad_accum=world))
    else:
        batches, cfg = [(inputs, targets)], TrainConfig(**TRAIN)
    out = _step(model, cfg, batches)
    out["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    out["state"] = {n: t.clone() for n, t in model.state_dict().items()}
    return out


def _worker(rank: int, port: int, names: list[str], expert: int, world: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from moelab.distributed import ParallelConfig, exit_process, init_parallel
    from moelab.distributed.parallelize import expert_parameter_names, parallelize
    from moelab.distributed.state import full_model_state
    from moelab.models import use_decode_layout

    parallel = init_parallel(ParallelConfig(expert=expert, timeout_s=120), torch.device("cpu"))
    try:
        # the degrees asked for (data parallelism alone would give the same results as EP 2)
        data = world // expert
        assert (parallel.ep, parallel.config.data, parallel.mesh["dp"].size()) == (expert, data, data)
        for name in names:
            model = _model(name)
            if world == 1:  # as a model that decoded on the CPU leaves them (FSDP takes contiguous ones)
                use_decode_layout(model)
            model = parallelize(model, parallel)
            result = _step(model, TrainConfig(**TRAIN), [_batch()], parallel)
            experts = expert_parameter_names(model)
            grads = {}
            for pname, p in model.named_parameters():
                if p.grad is None:  # the same on every rank
                    grads[pname] = None
                    continue
                g = p.grad.full_tensor()
                if pname in experts and parallel.ep > 1:
                    pieces = [torch.empty_like(g) for _ in range(parallel.ep)]
                    dist.all_gather(pieces, g, group=parallel.ep_group)
                    g = torch.cat(pieces)
                grads[pname] = g
            result["grads"] = grads
            result["state"] = full_model_state(model, parallel)
            if rank == 0:
                out[name] = result
    finally:
        dist.destroy_process_group()
    exit_process(0)



def _run(names: list[str], expert: int, world: int = WORLD) -> dict:
    out = mp.Manager().dict()
    spawn(_worker, args=(free_port(), names, expert, world, out), nprocs=world)
    return dict(out)


def _check(name: str, got: dict, world: int = WORLD) -> None:
    want = _reference(name, world)
    tol = dict(atol=1e-5, rtol=1e-5)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), name
    # torch's clip_grad_norm_ sums each tensor's squares in fp32 (1.4e-5 off on the embedding's
    # 262k entries here); the parallel norm sums the shards in fp64
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), name
    for layer, load in want["load"].items():
        torch.testing.assert_close(got["load"][layer], load, msg=lambda m: f"{name} load {layer}: {m}")
    assert got["experts_per_token"] == pytest.approx(want["experts_per_token"], rel=1e-6), name  # the mean over ranks
    for pname, grad in want["grads"].items():
        if grad is None:
            assert got["grads"][pname] is None, f"{name}: {pname} got a gradient"
            continue
        torch.testing.assert_close(got["grads"][pname], grad, **tol, msg=lambda m: f"{name} grad {pname}: {m}")
    for key, value in want["state"].items():
        grad = want["grads"].get("embed.weight" if key == "lm_head.weight" else key)  # tied embeddings
        if grad is not None:
            # AdamW's first step moves an entry by lr * g / (|g| + eps): where |g| is rounding noise
            # (near eps = 1e-8) that is rounding noise times lr, so such entries are only held to
            # the size of a step (within which they moved alike) and the rest to 1e-5
            noise = grad.abs() <= 1e-6
            step = (got["state"][key] - value)[noise].abs()
            assert step.numel() == 0 or step.max() <= 2 * TRAIN["lr"], f"{name} {key}: {step.max()}"
            got_key, value = got["state"][key][~noise], value[~noise]
        else:
            got_key = got["state"][key]
        torch.testing.assert_close(got_key, value, **tol, msg=lambda m: f"{name} {key}: {m}")


def test_expert_parallel_step_equals_one_process():
    """EP 2 (each rank half the experts), every routing option: one spawn for all of them."""
    got = _run(list(VARIANTS), expert=2)
    for name in VARIANTS:
        _check(name, got[name])


@pytest.mark.slow
def test_four_processes_ep2_dp2_step_equals_one_process():
    """World 4 = EP 2 x DP 2 (4 processes on this 2-core machine: slow, so not in the default suite)."""
    got = _run(list(VARIANTS), expert=2, world=4)
    for name in VARIANTS:
        _check(name, got[name], world=4)


@pytest.mark.parametrize("world", [1, 2])
def test_data_parallel_step_equals_one_process(world):
    """EP 1, DP 2: experts replicated and FSDP-sharded over both ranks; and torchrun with one
    process, which takes the parallel path (how one GPU checks NCCL), on a model whose matrices
    decoding left column-major (`use_decode_layout`)."""
    names = ["topk softmax + z", "sigmoid group-limited + aux-free bias + shared"]
    got = _run(names, expert=1, world=world)
    for name in names:
        _check(name, got[name], world=world)



def test_expert_gradients_are_divided_by_the_expert_parallel_degree_not_the_world():
    """EP 2 x DP 2: FSDP averaged them over "dp" already; the other gradients are left alone."""
    from types import SimpleNamespace

    from moelab.distributed.parallelize import expert_parameter_names, scale_expert_gradients

    model = _model("topk softmax + z")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    scale_expert_gradients(model, SimpleNamespace(ep=2, world=4))
    experts = expert_parameter_names(model)
    assert experts
    for name, p in model.named_parameters():
        assert torch.all(p.grad == (0.5 if name in experts else 1.0)), name


@pytest.mark.parametrize("max_norm", [0.5, 100.0, float("inf")])
def test_clipping_equals_torchs_on_one_rank(monkeypatch, max_norm):
    """One rank (the all-reduce the identity): the norm and clipped gradients are torch's, and a
    norm below max_norm leaves the gradients as they were."""
    from types import SimpleNamespace

    from moelab.distributed.parallelize import clip_grad_norm_

    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: None)
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 7)]
    reference = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 7)]
    for p, q in zip(params, reference):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    total = clip_grad_norm_(params, max_norm, SimpleNamespace(world_group=None))
    want = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    torch.testing.assert_close(total, want)
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad)


# ---------------------------------------------------------------- runs, checkpoints, resharding

RUN = {
    "model": dict(BASE, moe=dict(MOE, score_func="sigmoid", selection_bias=True)),
    # eval: 9 windows in batches of 4, 4, 1 (the last leaves rank 1 without a row)
    "train": dict(steps=4, batch_size=4, seq_len=16, eval_every=4, eval_tokens=144, eval_batch_size=4, checkpoint_every=2,
                  log_every=1, device="cpu"),  # fmt: skip
}


def _train_worker(rank: int, port: int, out: str, run: dict, resume: bool, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from moelab.distributed import exit_process
    from moelab.train import RunConfig, train

    try:
        train(RunConfig.from_dict(run), out, resume=resume, quiet=True)
    except (ValueError, OSError) as err:  # what `moelab` prints in one line
        if errors is None:
            raise
        errors[rank] = str(err)
    exit_process(0)  # as `moelab` does under torchrun


def _train(out, world: int, expert: int = 2, resume: bool = False, run: dict = RUN, errors=None) -> None:
    from moelab.train import RunConfig, train

    if world == 1:
        train(RunConfig.from_dict(run), out, resume=resume, quiet=True)
    else:
        run = dict(run, parallel=dict(dict(expert=expert, timeout_s=120), **run.get("parallel", {})))
        spawn(_train_worker, args=(free_port(), str(out), run, resume, errors), nprocs=WORLD)


def _errors(out, **kwargs) -> dict[int, str]:
    """Each rank's one-line error of a run that must fail (and not hang)."""
    errors = mp.Manager().dict()
    _train(out, world=2, errors=errors, **kwargs)
    assert sorted(errors) == list(range(WORLD)), dict(errors)
    return dict(errors)


def _interrupted_copy(run, to):
    """The run as if killed after its step-2 checkpoint."""
    import shutil

    shutil.copytree(run, to)
    for entry in ("checkpoints/step-000004", "model"):
        shutil.rmtree(to / entry)
    (to / "results.json").unlink()
    return to


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def _assert_same_model(a, b, exact=False):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow  # moved out of the default run, which must stay under 10 minutes (`make test-slow` runs it)
def test_runs_resume_under_other_degrees(tmp_path):
    """2 ranks EP 2 vs one process, and resumed across: 2 -> 1, 1 -> 2, EP 2 -> EP 1 (DP 2)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, world=1)
    _train(two, world=2)
    _assert_same_model(one / "model", two / "model")
    # validation split over the ranks gives the one-process losses
    losses = [json.loads((run / "results.json").read_text())["eval_loss"] for run in (one, two)]
    assert losses[0].keys() == losses[1].keys()
    for domain, loss in losses[0].items():
        assert losses[1][domain] == pytest.approx(loss, rel=1e-5), domain
    _train(_interrupted_copy(two, tmp_path / "2to1"), world=1, resume=True)
    _assert_same_model(one / "model", tmp_path / "2to1" / "model")
    _train(_interrupted_copy(one, tmp_path / "1to2"), world=2, resume=True)
    _assert_same_model(one / "model", tmp_path / "1to2" / "model")
    _train(_interrupted_copy(two, tmp_path / "ep2to1"), world=2, expert=1, resume=True)
    _assert_same_model(one / "model", tmp_path / "ep2to1" / "model")

    # a distributed checkpoint consolidates to exactly the weights the run gathered at its end
    from moelab.train.checkpoint import consolidate_checkpoint

    consolidate_checkpoint(two / "checkpoints" / "step-000004", tmp_path / "consolidated")
    _assert_same_model(two / "model", tmp_path / "consolidated", exact=True)


def test_degrees_that_do_not_fit_the_world_are_refused_before_any_rank_joins(monkeypatch):
    """Every rank makes these checks alike before the process group exists (none waits for another)."""
    from moelab.distributed.mesh import ParallelConfig, init_parallel

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"= 4 does not match the 2 process\(es\)"):
        init_parallel(ParallelConfig(expert=2, data=2), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"parallel.expert \(3\) must divide the 2 process\(es\)"):  # data left to moelab
        init_parallel(ParallelConfig(expert=3), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"= 3 does not match the 2 process\(es\)"):  # data given
        init_parallel(ParallelConfig(expert=3, data=1), torch.device("cpu"))
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(expert=0), r"parallel.expert and parallel.data must be >= 1, got 0 and None"),
        (dict(data=0), r"must be >= 1, got 1 and 0"),
        (dict(timeout_s=0.0), r"parallel.timeout_s must be > 0, got 0.0"),
    ],
)
def test_parallel_config_refuses_degrees_below_1_and_no_timeout(fields, message):
    from moelab.distributed.mesh import ParallelConfig

    with pytest.raises(ValueError, match=message):
        ParallelConfig.from_dict(fields)


def test_one_process_outside_torchrun_warns_that_the_degrees_do_not_apply(monkeypatch):
    """torchrun sets both RANK and WORLD_SIZE; either alone is not torchrun."""
    from moelab.distributed.mesh import ParallelConfig, init_parallel, torchrun_world

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun_world() is None
    for fields in (dict(expert=2), dict(data=2)):
        with pytest.warns(UserWarning, match="apply under torchrun only"):
            assert init_parallel(ParallelConfig(**fields), torch.device("cpu")) is None
    monkeypatch.setenv("RANK", "0")
    assert torchrun_world() == 2
    assert not dist.is_initialized()


def test_expert_parallelism_of_a_model_without_experts_is_refused():
    """parallel.expert > 1 on a dense model split nothing and ran data parallel, silently."""
    from moelab.distributed.parallelize import check_parallel_model

    with torch.device("meta"):
        dense = MoETransformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4))
    check_parallel_model(dense, 1)
    with pytest.raises(ValueError, match="parallel.expert = 2 splits routed experts, and this model has none"):
        check_parallel_model(dense, 2)


def test_bad_parallel_setups_fail_on_every_rank(tmp_path):
    def run_with(**changes):
        return {**RUN, **changes}

    odd = dict(RUN["model"], moe=dict(MOE, num_experts=3))
    errors = _errors(tmp_path / "b", run=run_with(model=odd))
    assert all("3 experts, not divisible by parallel.expert = 2" in e for e in errors.values())
    errors = _errors(tmp_path / "c", run=run_with(train=dict(RUN["train"], batch_size=3)))
    assert all("batch_size (3) is the global batch" in e for e in errors.values())


def test_bad_checkpoints_fail_on_every_rank(tmp_path):
    two = tmp_path / "two"
    _train(two, world=2)
    other = dict(RUN, model=dict(RUN["model"], dim=48))
    errors = _errors(_interrupted_copy(two, tmp_path / "other"), run=other, resume=True)
    assert "rank 0 stopped the run" in errors[1] and "model.dim: run 32, now 48" in errors[1], errors
    missing = _interrupted_copy(two, tmp_path / "missing")
    (missing / "checkpoints" / "step-000002" / "dcp" / "__1_0.distcp").unlink()
    errors = _errors(missing, resume=True)
    assert all("No such file or directory" in e and "__1_0.distcp" in e for e in errors.values()), errors


@pytest.mark.parametrize(
    "text",
    [
        "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 2500ms for recv operation",
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
        "[c10d] Connection reset by peer",
        "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=8, OpType=ALLREDUCE)",
        "[store] wait timed out after 2500ms",
    ],
)
def test_a_failed_collective_is_named_in_one_line(text):
    """The line names the rank, the collective's own message (without its source location) and the timeout."""
    from types import SimpleNamespace

    from moelab.distributed import ParallelConfig
    from moelab.train.collectives import collective_failure

    parallel = SimpleNamespace(rank=1, config=ParallelConfig(timeout_s=2.5))
    err = collective_failure(RuntimeError(text + "\nException raised from recvFromRank at ..."), parallel)
    detail = text.split("] ", 1)[1]
    assert str(err).startswith(f"rank 1: a collective failed ({detail}); another rank died"), str(err)
    assert "parallel.timeout_s = 2.5 s" in str(err)
    assert collective_failure(RuntimeError("[allocator] not enough memory"), parallel) is None


def _collectives_worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    from moelab.distributed import ParallelConfig, exit_process, init_parallel
    from moelab.train.collectives import agreed_flag, reduce_step_metrics, shared_from_rank0

    parallel = init_parallel(ParallelConfig(timeout_s=60), torch.device("cpu"))
    got = {"flags": [agreed_flag(rank == 1, parallel), agreed_flag(False, parallel)]}
    scalars = {"loss": 1.0 + rank, "aux/balance": 0.5 * rank}
    load = {0: torch.tensor([1.0, 2.0]) * (rank + 1), 3: torch.tensor([float(rank), 0.0, 4.0])}
    experts_per_token = {0: 2.0 + rank, 3: 1.0}
    reduce_step_metrics(scalars, load, experts_per_token, parallel)
    got.update(scalars=scalars, experts_per_token=experts_per_token)
    got["load"] = {i: t.tolist() for i, t in load.items()}
    got["shared"] = shared_from_rank0(parallel, f"rank {rank}'s", None)
    try:
        shared_from_rank0(parallel, None, OSError(28, "No space left on device") if rank == 0 else None)
    except Exception as err:
        got["error"] = f"{type(err).__name__}: {err}"
    out[rank] = got
    parallel.close()
    exit_process(0)


def test_ranks_agree_on_flags_metrics_and_rank_0s_value_and_error():
    """2 ranks: a flag set on one rank is set on both; scalars and experts per token are the means over
    the ranks and the loads their sums; rank 0's value, and its error (its own on rank 0)."""
    out = mp.Manager().dict()
    spawn(_collectives_worker, args=(free_port(), out), nprocs=WORLD)
    for rank in range(WORLD):
        got = out[rank]
        assert got["flags"] == [True, False]
        assert got["scalars"] == {"loss": 1.5, "aux/balance": 0.25}
        assert got["load"] == {0: [3.0, 6.0], 3: [1.0, 0.0, 8.0]}
        assert got["experts_per_token"] == {0: 2.5, 3: 1.0}
        assert got["shared"] == "rank 0's"
    assert out[0]["error"] == "OSError: [Errno 28] No space left on device"
    stopped = "ValueError: rank 0 stopped the run: OSError: [Errno 28] No space left on device"
    assert out[1]["error"] == stopped


def _hanging_worker(rank: int, port: int, out: str, errors) -> None:
    """Rank 1 stalls before its first step, longer than the collectives wait."""
    import time

    import moelab.train.trainer as trainer

    if rank == 1:
        step = trainer.train_step
        trainer.train_step = lambda *args: (time.sleep(8), step(*args))[1]
    _train_worker(rank, port, out, dict(RUN, parallel={"expert": 2, "timeout_s": 2}), False, errors)


@pytest.mark.slow  # waits out a stall (11 s)
def test_a_stalled_rank_fails_every_rank_with_the_timeout(tmp_path):
    errors = mp.Manager().dict()
    spawn(_hanging_worker, args=(free_port(), str(tmp_path / "run"), errors), nprocs=WORLD)
    assert sorted(errors) == [0, 1], dict(errors)
    for rank, message in errors.items():
        assert message.startswith(f"rank {rank}: a collective failed") and "parallel.timeout_s = 2 s" in message, message


def _full_disk_worker(rank: int, port: int, out: str, errors) -> None:
    """Rank 1's checkpoint shards do not fit on its disk."""
    import errno

    from torch.distributed.checkpoint import filesystem

    if rank == 1:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        filesystem._write_item = full
    _train_worker(rank, port, out, dict(RUN, parallel={"expert": 2, "timeout_s": 60}), False, errors)


@pytest.mark.slow
def test_a_shard_that_cannot_be_written_is_one_error_on_every_rank(tmp_path):
    """DCP wraps a rank's failed write in a CheckpointException (a BaseException) on every rank,
    which printed a traceback per rank; each rank raises the write's own error, and the staged
    checkpoint is gone (and with it checkpoints/, which the failed write made: the output lock
    removes the empty parents it made)."""
    errors = mp.Manager().dict()
    spawn(_full_disk_worker, args=(free_port(), str(tmp_path / "run"), errors), nprocs=WORLD)
    assert dict(errors) == {0: "[Errno 28] No space left on device", 1: "[Errno 28] No space left on device"}
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # moved out of the default run, which must stay under 10 minutes (`make test-slow` runs it)
def test_a_rank_that_never_starts_is_one_error(tmp_path):
    """Rank 0 of two, started alone, waits parallel.timeout_s for rank 1 to join, then says so in
    one line (it raised DistStoreError with a traceback)."""
    errors = mp.Manager().dict()
    run = dict(RUN, parallel={"expert": 2, "timeout_s": 2})
    spawn(_train_worker, args=(free_port(), str(tmp_path / "run"), run, False, errors), nprocs=1)
    assert errors[0].startswith("the processes did not all start within parallel.timeout_s = 2 s"), dict(errors)
    assert not (tmp_path / "run").exists()


def _timeout_worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4")
    from moelab.distributed import ParallelConfig, exit_process, init_parallel

    parallel = init_parallel(ParallelConfig(expert=2, timeout_s=7), torch.device("cpu"))
    groups = {"ep": parallel.ep_group, "dp": parallel.mesh.get_group("dp"), "world": parallel.world_group}
    out[rank] = {
        "timeouts": {
            name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for name, g in groups.items()
        },
        "ranks": {name: dist.get_process_group_ranks(g) for name, g in groups.items()},
        "config": (parallel.ep, parallel.ep_rank, parallel.config.data, parallel.config.timeout_s),
    }
    parallel.close()
    exit_process(0)


def test_every_group_waits_timeout_s():
    """EP 2 x DP 2: the expert and data groups are smaller than the world, so torch makes them new,
    with its default timeout of 30 minutes; a stalled rank then held the others that long. The
    mesh is rank = d * expert + e: an expert group is 2 consecutive ranks."""
    out = mp.Manager().dict()
    spawn(_timeout_worker, args=(free_port(), out), nprocs=4)
    assert {rank: got["timeouts"] for rank, got in out.items()} == {
        rank: {"ep": 7.0, "dp": 7.0, "world": 7.0} for rank in range(4)
    }
    for rank in range(4):
        d, e = divmod(rank, 2)
        assert out[rank]["ranks"] == {"ep": [2 * d, 2 * d + 1], "dp": [e, e + 2], "world": [0, 1, 2, 3]}, rank
        assert out[rank]["config"] == (2, e, 2, 7.0), rank  # EP degree and rank, data degree, timeout


@pytest.mark.slow  # the default suite resumes distributed runs in test_runs_resume_under_other_degrees
def test_resume_after_kill_9_of_one_rank(tmp_path):
    """torchrun, 2 ranks: SIGKILL one rank after the first checkpoint; --resume finishes the run
    with the weights of an uninterrupted one."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    run = dict(RUN, train=dict(RUN["train"], steps=30, checkpoint_every=10, eval_every=30), parallel={"expert": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moelab", "train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(out, *extra):
        return subprocess.Popen([*torchrun, str(tmp_path / "run.yaml"), "--out", str(out), "--quiet", *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    whole = launch(tmp_path / "whole")
    killed = launch(tmp_path / "killed")
    first = tmp_path / "killed" / "checkpoints" / "step-000010"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(killed.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    assert killed.wait(timeout=300) != 0
    assert not (tmp_path / "killed" / "model").exists()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    resumed = launch(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    _assert_same_model(tmp_path / "whole" / "model", tmp_path / "killed" / "model", exact=True)


class _Planted:
    """Unpickled with pickle's full power, it would leave a file behind."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_distributed_checkpoints_are_read_without_unpickling_code(tmp_path):
    """DCP keeps its index (.metadata) and non-tensor entries as pickles; moelab reads the index
    with an unpickler that builds only DCP's records and checks the entries weights-only, so a
    crafted checkpoint is refused and runs nothing, while a real one reads back."""
    import pickle
    import shutil

    import torch.distributed.checkpoint as dcp

    from moelab.distributed.state import read_checkpoint

    model = torch.nn.Linear(4, 3)
    saved = {"model": dict(model.state_dict()), "optim": {"lr": 0.25, "betas": (0.9, 0.95)}}
    dcp.save(saved, checkpoint_id=str(tmp_path / "real"))
    state = {"model": {k: torch.zeros_like(v) for k, v in saved["model"].items()}, "optim": {"lr": 0.0, "betas": ()}}
    read_checkpoint(state, tmp_path / "real")
    assert state["optim"] == saved["optim"]
    assert all(torch.equal(state["model"][k], v) for k, v in saved["model"].items())

    planted = tmp_path / "planted"
    shutil.copytree(tmp_path / "real", tmp_path / "index")
    (tmp_path / "index" / ".metadata").write_bytes(pickle.dumps(_Planted(str(planted))))
    with pytest.raises(ValueError, match="index.* is not a readable checkpoint index .* no place in a checkpoint"):
        read_checkpoint(state, tmp_path / "index")
    dcp.save({"optim": {"lr": _Planted(str(planted))}}, checkpoint_id=str(tmp_path / "entry"))
    with pytest.raises(ValueError, match="entry optim.lr is not plain data"):
        read_checkpoint({"optim": {"lr": 0.0}}, tmp_path / "entry")
    assert not planted.exists()


def test_training_state_round_trips_in_one_process_without_state_for_unused_parameters(tmp_path):
    """A DCP checkpoint of a model with a parameter that never had a gradient (no optimizer state)
    loads back into a fresh model and optimizer: the same weights and AdamW moments."""
    import torch.distributed.checkpoint as dcp

    from moelab.distributed.state import load_training_state, training_state

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 3)})
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = build(0)
    model["used"](torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    dcp.save(training_state(model, optimizer, None), checkpoint_id=str(tmp_path / "dcp"))
    fresh, fresh_optimizer = build(1)
    load_training_state(fresh, fresh_optimizer, tmp_path / "dcp", None)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    for p, q in zip(model["used"].parameters(), fresh["used"].parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_optimizer.state[q][key], optimizer.state[p][key]), key


def test_a_checkpoint_that_decayed_the_expert_biases_resumes_with_its_groups_settings(tmp_path):
    """A DCP checkpoint of a moelab that put the experts' [E, n] biases in the decayed group (before
    they were left undecayed): each group of today's grouping keeps its saved settings and every
    parameter its moments. torch gave the first group no settings at all (the step failed on 'betas')."""
    import torch.distributed.checkpoint as dcp

    from moelab.distributed.state import load_training_state, training_state

    config = ModelConfig.from_dict(dict(BASE, moe=dict(MOE, expert_mlp_bias=True)))
    torch.manual_seed(0)
    model = MoETransformer(config)
    embedding = {id(model.embed.weight)}
    old = [p.ndim >= 2 and id(p) not in embedding for p in model.parameters()]  # the experts' biases decayed
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p, d in zip(params, old) if d], "weight_decay": 0.1, "lr": 0.25},
         {"params": [p for p, d in zip(params, old) if not d], "weight_decay": 0.0, "lr": 0.5}],
        betas=(0.8, 0.9),
    )  # fmt: skip
    inputs, targets = _batch()
    model(inputs, targets=targets).loss.backward()
    optimizer.step()
    dcp.save(training_state(model, optimizer, None), checkpoint_id=str(tmp_path / "dcp"))

    fresh = MoETransformer(config)
    fresh_optimizer = build_optimizer(fresh, TrainConfig(steps=1))
    load_training_state(fresh, fresh_optimizer, tmp_path / "dcp", None)
    for group, saved in zip(fresh_optimizer.param_groups, optimizer.param_groups):
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in saved.items() if k != "params"}
    before = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(fresh_optimizer.state[p]["exp_avg"], optimizer.state[before[name]]["exp_avg"]), name
    fresh(inputs, targets=targets).loss.backward()
    fresh_optimizer.step()
