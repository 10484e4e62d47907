"""The MoE layer's step without host synchronisation (experts on `torch._grouped_mm`): a plan
whose counts stay on the device, experts that zero the rows past the last group whatever
`torch._grouped_mm` left there, a router whose finiteness check is left to the caller, and the
trainer that makes that check. A GPU is not needed: on the meta device any read back to the
host raises, which is what proves a step reads nothing back."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.models import ModelConfig, MoETransformer
from moelab.nn import MoEConfig, build_moe, plan_dispatch, triton_grouped
from moelab.nn import moe as moe_module
from moelab.nn.grouped import grouped_mlp
from moelab.nn.routers import deferred_logit_check
from moelab.train import TrainConfig
from moelab.train.trainer import train_step

# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

E, D, I = 4, 8, 4  # fp32 rows of 8 and 4 floats are 16-byte aligned: grouped_mm really runs
_TRITON = pytest.mark.skipif(
    not triton_grouped.runs_on(torch.device("cpu"), torch.float32), reason="needs Triton's interpreter"
)


@pytest.mark.parametrize("with_empty", [False, True])
def test_plan_without_host_counts_keeps_the_host_plans_rows_and_puts_empty_slots_last(with_empty):
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, E, (9, 3), generator=g)
    if with_empty:
        indices[[0, 4, 4, 8], [2, 0, 1, 2]] = -1
    host = plan_dispatch(indices, E)
    device = plan_dispatch(indices, E, host_counts=False)
    assert isinstance(device.counts, torch.Tensor) and device.counts.tolist() == list(host.counts)
    N = host.num_rows
    assert device.num_rows == 27 and not device.has_empty_slots and device.slot_mask(torch.float32) is None
    assert torch.equal(device.slots[:N], host.slots)  # the same stable order by expert
    assert (indices.reshape(-1)[device.slots[N:]] == -1).all()  # then the empty slots
    assert torch.equal(device.token_ids, device.slots // 3)
    assert torch.equal(device.slot_rows[device.slots], torch.arange(27))  # the inverse permutation


def test_plan_without_host_counts_refuses_capacity():
    with pytest.raises(ValueError, match="capacity dropping decides on the host.*host_counts=True"):
        plan_dispatch(torch.zeros(4, 2, dtype=torch.long), E, capacity_factor=1.0, host_counts=False)


class _UnsetRows(torch.autograd.Function):
    """torch._grouped_mm, except that the rows past the last group are NaN in the output and in
    the gradient of the rows: what unset memory may hold there."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        out = _REAL_GROUPED_MM(a, b, offs=offs).clone()
        out[int(offs[-1]) :] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a2, b2 = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            grad_a, grad_b = torch.autograd.grad(_REAL_GROUPED_MM(a2, b2, offs=offs), (a2, b2), grad)
        grad_a = grad_a.clone()
        grad_a[int(offs[-1]) :] = float("nan")
        return grad_a, grad_b, None


_REAL_GROUPED_MM = torch._grouped_mm


@pytest.mark.parametrize("backend", ["grouped_mm", pytest.param("triton", marks=_TRITON)])
@pytest.mark.parametrize("gated, out_bias", [(True, True), (False, True), (True, False)])
def test_rows_past_the_groups_are_zero_and_pass_zero_gradients(monkeypatch, backend, gated, out_bias):
    """Counts as a tensor summing to 7 of 10 rows: the 7 rows equal the host-count path's, the 3
    others are exactly 0 and get exactly 0 gradient, and no NaN reaches any weight's gradient,
    although the product leaves NaN there (forward and backward). On the triton backend (fp32:
    moelab's GEMM, unset memory past the groups) the routing weight runs inside the fused
    SwiGLU where no output bias follows, after the projection where one does."""
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: _UnsetRows.apply(a, b, offs))
    g = torch.Generator().manual_seed(0)
    H = 2 * I if gated else I
    leaves = {
        "xs": torch.randn(10, D, generator=g),
        "row_weights": torch.rand(10, generator=g),
        "w_in": torch.randn(E, H, D, generator=g) / D**0.5,
        "b_in": torch.randn(E, H, generator=g),
        "w_out": torch.randn(E, D, I, generator=g) / I**0.5,
        "b_out": torch.randn(E, D, generator=g) if out_bias else None,
    }
    counts = [2, 0, 4, 1]
    results = []
    for run_backend, rows, split in ((backend, 10, torch.tensor(counts)), ("grouped", 7, counts)):
        t = {n: None if v is None else v.clone().requires_grad_(True) for n, v in leaves.items()}
        t["xs"] = leaves["xs"][:rows].clone().requires_grad_(True)
        t["row_weights"] = leaves["row_weights"][:rows].clone().requires_grad_(True)
        ys = grouped_mlp(
            t["xs"], split, t["row_weights"], t["w_in"], t["b_in"], t["w_out"], t["b_out"],
            activation="silu", gated=gated, backend=run_backend,
        )  # fmt: skip
        ys.backward(torch.ones_like(ys))
        results.append((ys.detach(), {n: v.grad for n, v in t.items() if v is not None}))
    (ys, grads), (ref_ys, ref_grads) = results
    assert torch.equal(ys[7:], torch.zeros(3, D))
    torch.testing.assert_close(ys[:7], ref_ys)
    for name in ("xs", "row_weights"):
        assert torch.equal(grads[name][7:], torch.zeros_like(grads[name][7:])), name
        torch.testing.assert_close(grads[name][:7], ref_grads[name])
    for name in ("w_in", "b_in", "w_out", "b_out")[: 4 if out_bias else 3]:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 5), min_size=E, max_size=E),
    empty=st.integers(0, 4),
    gated=st.booleans(),
    biases=st.booleans(),
    bf16=st.booleans(),
)
def test_device_counts_property(counts, empty, gated, biases, bf16):
    """Any split of the rows over the experts (experts with no rows, all rows on one, no routed
    row at all) plus `empty` rows past the counts, which torch._grouped_mm leaves NaN: the routed
    rows equal the host-count path's forward and backward, the rows past the counts are exactly
    zero with zero gradients, and no weight or bias gradient sees a NaN; with no rows past the
    counts, rows_past_counts=False gives the same, and so does the "triton" backend (where
    Triton's interpreter runs)."""
    real = torch._grouped_mm
    torch._grouped_mm = lambda a, b, offs=None: _UnsetRows.apply(a, b, offs)
    try:
        dtype = torch.bfloat16 if bf16 else torch.float32
        width = 8 if bf16 else I  # grouped_mm needs 16-byte aligned rows
        routed = sum(counts)
        g = torch.Generator().manual_seed(routed * 7 + empty)
        H = 2 * width if gated else width
        leaves = {
            "xs": torch.randn(routed + empty, D, generator=g),
            "row_weights": torch.rand(routed + empty, generator=g),
            "w_in": torch.randn(E, H, D, generator=g) / D**0.5,
            "b_in": torch.randn(E, H, generator=g) if biases else None,
            "w_out": torch.randn(E, D, width, generator=g) / width**0.5,
            "b_out": torch.randn(E, D, generator=g) if biases else None,
        }
        modes = [("grouped_mm", routed + empty, torch.tensor(counts), True), ("grouped", routed, counts, True)]
        if triton_grouped.runs_on(torch.device("cpu"), torch.float32):  # Triton's interpreter (tests/conftest.py):
            # fp32 on moelab's GEMM, bf16 on the NaN-leaving torch._grouped_mm, both with the fused SwiGLU
            modes.append(("triton", routed + empty, torch.tensor(counts), True))
        if empty == 0:
            modes.append(("grouped_mm", routed, torch.tensor(counts), False))
        runs = []
        for backend, rows, given_counts, past in modes:
            t = {n: None if v is None else v.to(dtype).clone().requires_grad_(True) for n, v in leaves.items()}
            t["xs"] = leaves["xs"][:rows].to(dtype).clone().requires_grad_(True)
            t["row_weights"] = leaves["row_weights"][:rows].to(dtype).clone().requires_grad_(True)
            if rows == 0 and backend == "grouped":
                continue  # no routed row: nothing to compare against
            ys = grouped_mlp(
                t["xs"], given_counts, t["row_weights"], t["w_in"], t["b_in"], t["w_out"], t["b_out"],
                activation="silu", gated=gated, backend=backend, rows_past_counts=past,
            )  # fmt: skip
            ys.float().square().sum().backward()
            runs.append((rows, ys.detach(), {n: v.grad for n, v in t.items() if v is not None}))
        for rows, run_ys, run_grads in runs:  # the runs with rows past the counts
            if rows > routed:
                assert torch.equal(run_ys[routed:], torch.zeros_like(run_ys[routed:]))
                for name in ("xs", "row_weights"):
                    assert torch.equal(run_grads[name][routed:], torch.zeros_like(run_grads[name][routed:])), name
                for name, grad in run_grads.items():
                    assert torch.isfinite(grad).all(), name

        def close(mine, ref, name):  # bf16: within its rounding of the largest value
            tol = {"rtol": 2e-2, "atol": 2e-2 * ((float(ref.abs().max()) if ref.numel() else 0.0) + 1)} if bf16 else {}
            torch.testing.assert_close(mine, ref, **tol, msg=name)

        def routed_part(name, grad):
            return grad[:routed] if name in ("xs", "row_weights") else grad

        (_, ys, grads), *references = runs
        for _, ref_ys, ref_grads in references:
            close(ys[:routed], ref_ys[:routed], "ys")
            for name, grad in ref_grads.items():
                close(routed_part(name, grads[name]), routed_part(name, grad), name)
    finally:
        torch._grouped_mm = real


def test_counts_known_to_cover_every_row_mask_nothing(monkeypatch):
    """rows_past_counts=False (the layer's promise that the device counts sum to every row):
    the same output and gradients as the masked path, with no masking op run."""
    g = torch.Generator().manual_seed(0)
    xs, rw = torch.randn(7, D, generator=g), torch.rand(7, generator=g)
    w_in, b_in = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, 2 * I, generator=g)
    w_out, b_out = torch.randn(E, D, I, generator=g), torch.randn(E, D, generator=g)
    counts = torch.tensor([2, 0, 4, 1])
    runs = []
    for rows_past_counts in (True, False):
        t = [v.clone().requires_grad_(True) for v in (xs, rw, w_in, b_in, w_out, b_out)]
        wheres = []
        real_where = torch.where
        monkeypatch.setattr(torch, "where", lambda *a: wheres.append(1) or real_where(*a))
        ys = grouped_mlp(t[0], counts, t[1], *t[2:], backend="grouped_mm", rows_past_counts=rows_past_counts)
        ys.backward(torch.ones_like(ys))
        monkeypatch.setattr(torch, "where", real_where)
        runs.append((ys.detach(), [v.grad for v in t], len(wheres)))
    (ys, grads, masks), (ys_unmasked, grads_unmasked, no_masks) = runs
    assert masks == 2 and no_masks == 0  # the output forward, the input's gradient backward
    torch.testing.assert_close(ys_unmasked, ys)
    for a, b in zip(grads_unmasked, grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("skip_ratio", [None, 0.6])
def test_the_layer_masks_exactly_when_slots_may_be_empty(monkeypatch, skip_ratio):
    """A training step on the sync-free path with torch._grouped_mm leaving NaN past the last
    group: with dynamic skipping (empty slots) the layer asks for masking and everything stays
    finite; without it the counts cover every row and the layer asks for none."""
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: _UnsetRows.apply(a, b, offs))
    asked = []
    real = grouped_mlp
    monkeypatch.setattr(
        "moelab.nn.experts.grouped_mlp", lambda *a, **kw: asked.append(kw["rows_past_counts"]) or real(*a, **kw)
    )
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, top_k=3, backend="grouped_mm", expert_mlp_bias=True))
    layer.skip_ratio = skip_ratio
    x = torch.randn(16, D, requires_grad=True)
    y, result = layer(x)
    y.square().sum().backward()
    assert asked == [skip_ratio is not None]
    assert (result.experts_per_token < 3).item() == (skip_ratio is not None)  # skipped slots: rows past the counts
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_tensor_counts_need_the_grouped_mm_path():
    xs, w_in, w_out = torch.randn(5, D), torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    with pytest.raises(ValueError, match="counts as a tensor.*grouped_mm.*python ints"):
        grouped_mlp(xs, torch.tensor([2, 1, 1, 1]), None, w_in, None, w_out, None, backend="grouped")
    with pytest.raises(ValueError, match=r"counts must be a \[4\] tensor"):
        grouped_mlp(xs, torch.tensor([2, 3]), None, w_in, None, w_out, None, backend="grouped_mm")


ROUTERS = {
    "topk": dict(router="topk", top_k=2),
    "topk sigmoid, groups, selection bias, shared": dict(
        router="topk", top_k=2, score_func="sigmoid", n_group=2, topk_group=1, selection_bias=True, num_shared=1,
        shared_gate=True,
    ),
    "topk, k = E": dict(router="topk", top_k=E),
}


def _meta_step(backend: str, overrides: dict, skip_ratio: float | None = None) -> None:
    """A bf16 training step of a layer on the meta device, where reading any value back to the
    host raises (`Tensor.item() cannot be called on meta tensors`)."""
    cfg = MoEConfig(dim=16, num_experts=E, hidden_dim=8, backend=backend, balance_coef=0.01, z_coef=1e-3,
                    expert_mlp_bias=True, **overrides)  # fmt: skip
    with torch.device("meta"):
        layer = build_moe(cfg).to(torch.bfloat16).train()
        x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    layer.skip_ratio = skip_ratio
    y, result = layer(x)
    (y.float().sum() + result.loss).backward()
    assert x.grad is not None and result.logits_finite is not None


@pytest.mark.parametrize("name", ROUTERS)
def test_training_step_reads_nothing_back_to_the_host(name):
    _meta_step("grouped_mm", ROUTERS[name])


def test_dynamic_skipping_reads_nothing_back_either():
    """NAEE's skipping empties slots (index -1) inside a fixed k: their rows stay, masked."""
    _meta_step("grouped_mm", ROUTERS["topk"], skip_ratio=0.5)


def test_the_meta_device_catches_a_read_back():
    """The per-expert backend reads the counts back (a python loop over experts): the same step
    must fail on the meta device, or the test above proves nothing."""
    with pytest.raises(RuntimeError, match="meta"):
        _meta_step("grouped", ROUTERS["topk"])


def test_grouped_mm_layer_plans_without_host_counts(monkeypatch):
    """The reference tests of the grouped_mm backend (test_moe_layer, test_properties) run the
    no-synchronisation path on aligned fp32 rows; capacity dropping keeps the host plan."""
    seen = []
    real = moe_module.plan_dispatch
    monkeypatch.setattr(moe_module, "plan_dispatch", lambda *a, **kw: seen.append(kw["host_counts"]) or real(*a, **kw))
    for capacity, backend, router, mode in (
        (None, "grouped_mm", "topk", "train"),
        (1.0, "grouped_mm", "topk", "train"),
        (None, "grouped_mm", "topp", "train"),  # variable k: a row for each of T*E slots would cost more than a sync
        (None, "grouped", "topk", "train"),
        (None, "auto", "topk", "train"),  # auto picks the per-expert kernel on a CPU
        (None, "grouped_mm", "topk", "eval"),  # outside training nobody would check the logits later
        (None, "grouped_mm", "topk", "no_grad"),
    ):
        layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, top_k=2, router=router, backend=backend,
                                    capacity_factor=capacity))  # fmt: skip
        layer.train(mode != "eval")
        with torch.set_grad_enabled(mode != "no_grad"):
            layer(torch.randn(6, D))
    assert seen == [False, True, True, True, True, True, True]


def test_non_finite_logits_are_flagged_not_raised_on_the_sync_free_path():
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, top_k=2, backend="grouped_mm"))
    x = torch.randn(6, D)
    assert bool(layer(x)[1].logits_finite)
    x[2, 1] = float("nan")
    assert not bool(layer(x)[1].logits_finite)  # the caller checks; a router called on its own still raises
    with pytest.raises(ValueError, match="router logits contain NaN or Inf"):
        layer.router(x)


def test_experts_masked_out_of_the_router_are_not_non_finite_logits():
    """ReXMoE's progressive scaling masks experts' logits to -inf after the router computed them:
    the deferred check looks at the logits as computed, as the router's own check does."""
    from moelab.nn.rexmoe import set_reuse_progress

    cfg = ModelConfig.from_dict(
        {"vocab_size": 64, "dim": D, "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
         "moe": {"num_experts": E, "hidden_dim": I, "top_k": 2, "backend": "grouped_mm", "reuse_layers": 2}}
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    set_reuse_progress(model, 0.0)  # part of the pool closed: -inf logits
    out = model(torch.randint(0, 64, (2, 8)))
    assert all(bool(r.logits_finite) for r in out.moe_results.values())


def test_expert_statistics_of_a_training_step_with_skipped_slots():
    """The tracer's expert hook gets the device counts and the empty slots' rows of a training
    step; it records what the host plan's step records."""
    from moelab.trace.capture import RoutingCapture

    recorded = []
    for backend in ("grouped_mm", "grouped"):
        cfg = ModelConfig.from_dict(
            {"vocab_size": 64, "dim": D, "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
             "moe": {"num_experts": E, "hidden_dim": I, "top_k": 3, "backend": backend}}
        )  # fmt: skip
        torch.manual_seed(0)
        model = MoETransformer(cfg).train()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(5.0)
        for moe in model.moe_layers.values():
            moe.skip_ratio = 0.6
        with RoutingCapture(model, None, expert_stats=True) as capture:
            out = model(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)))
            capture.pop()
        assert (out.moe_results[0].logits_finite is not None) == (backend == "grouped_mm")
        recorded.append(capture.expert_max[0])
    torch.testing.assert_close(recorded[0], recorded[1])


def test_trainer_raises_on_non_finite_logits_the_layer_left_to_it():
    cfg = ModelConfig.from_dict(
        {"vocab_size": 64, "dim": D, "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
         "moe": {"num_experts": E, "hidden_dim": I, "top_k": 2, "backend": "grouped_mm"}}
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))

    def step():
        return train_step(model, optimizer, iter([batch]), TrainConfig(steps=1), torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))  # fmt: skip

    assert step()["scalars"]["loss"] > 0  # finite: trains as before
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.layers[1].ffn.router.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="MoE layer 1: router logits contain NaN or Inf"):
        step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(changed) == 1  # only the weight set to NaN above: no optimizer step was taken


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend, dtype, biases",
    [("grouped_mm", torch.bfloat16, True)]
    + [pytest.param("triton", dtype, biases, marks=_TRITON)
       for dtype in (torch.float32, torch.bfloat16) for biases in (False, True)],  # fmt: skip
)
def test_training_step_compiles_whole(backend, dtype, biases):
    """No read back also means no graph break: forward+backward of a layer on grouped_mm (bf16)
    or on the triton backend (its kernels are custom ops; without biases the routing weight runs
    inside the fused SwiGLU, with them after the projection) compiles with fullgraph=True and
    matches eager, in bf16 within its rounding (relative to each tensor's scale; measured worst
    2e-2 of the loss scale on this example)."""
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=16, num_experts=E, hidden_dim=8, top_k=2, backend=backend,
                                balance_coef=0.01, expert_mlp_bias=biases)).to(dtype)  # fmt: skip
    x = torch.randn(12, 16).to(dtype)

    def step(inp):
        y, result = layer(inp)
        return (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + result.loss

    runs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        layer.zero_grad()
        inp = x.clone().requires_grad_(True)
        loss = fn(inp)
        loss.backward()
        runs.append([loss.detach(), inp.grad] + [p.grad for p in layer.parameters()])
    for compiled, eager in zip(*runs):
        scale = float(eager.float().abs().max()) + 1e-6
        assert float((compiled.float() - eager.float()).abs().max()) <= (5e-2 if dtype == torch.bfloat16 else 1e-5) * scale


def test_skipped_slots_on_the_sync_free_path_match_the_host_path():
    """Dynamic skipping empties some slots: their rows, kept and masked on the sync-free path,
    change nothing against the per-expert kernel on the host plan (output and every gradient)."""
    runs = []
    for backend in ("grouped_mm", "grouped"):
        torch.manual_seed(0)
        layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, top_k=3, backend=backend,
                                    expert_mlp_bias=True, balance_coef=0.01))  # fmt: skip
        layer.skip_ratio = 0.6
        x = torch.randn(16, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, result = layer(x)
        assert (result.experts_per_token < 3).item()  # some slots were skipped
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(result.loss).backward()
        runs.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_over_fp32_weights_takes_the_sync_free_path():
    """moelab's trainer runs bf16 as autocast over fp32 parameters: the experts then run
    torch._grouped_mm on bf16 casts (as autocast's F.linear would), the plan stays on the device,
    and output and gradients agree with the per-expert kernel under the same autocast within bf16
    rounding (relative to each tensor's scale; measured worst about 1e-2)."""
    runs = []
    for backend in ("grouped_mm", "grouped"):
        torch.manual_seed(0)
        layer = build_moe(MoEConfig(dim=16, num_experts=E, hidden_dim=8, top_k=2, backend=backend,
                                    expert_mlp_bias=True, num_shared=1, balance_coef=0.01))  # fmt: skip
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, result = layer(x)
        assert (result.logits_finite is not None) == (backend == "grouped_mm")
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(result.loss).backward()
        assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
        runs.append([y.detach().float(), x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*runs):
        scale = float(b.abs().max()) + 1e-6
        assert float((a - b).abs().max()) <= 3e-2 * scale


def test_under_autocast_the_products_run_in_its_dtype(monkeypatch):
    dtypes = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: dtypes.append((a.dtype, b.dtype)) or real(a, b, offs=offs))
    layer = build_moe(MoEConfig(dim=16, num_experts=E, hidden_dim=8, top_k=2, backend="grouped_mm"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(torch.randn(6, 16))
    assert y.dtype == torch.bfloat16 and dtypes == [(torch.bfloat16, torch.bfloat16)] * 2


def test_autocast_leaves_float64_rows_in_float64():
    """Autocast lowers only fp32 rows (as its F.linear does): float64 experts under bf16 autocast
    compute in float64, the same numbers as without autocast, not on bf16 casts."""
    torch.manual_seed(0)
    # widths of 8: bf16 rows of them are 16-byte aligned, so bf16 casts could run torch._grouped_mm
    w_in, w_out = torch.randn(E, 16, D, dtype=torch.float64), torch.randn(E, D, 8, dtype=torch.float64)
    xs, counts = torch.randn(7, D, dtype=torch.float64), [3, 0, 4, 0]
    want = grouped_mlp(xs, counts, None, w_in, None, w_out, None, backend="grouped_mm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_mlp(xs, counts, None, w_in, None, w_out, None, backend="grouped_mm")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_auto_picks_grouped_mm_for_bf16_products_on_cuda(monkeypatch):
    """The decision alone (no GPU here): bf16 weights, or fp32 ones under bf16 autocast, on CUDA."""
    from moelab.nn.grouped import grouped_gemm

    cuda = torch.device("cuda")
    w_in, w_out = torch.empty(E, 16, 16), torch.empty(E, 16, 8)
    assert grouped_gemm("auto", cuda, torch.bfloat16, w_in.bfloat16(), w_out.bfloat16()) is not None
    assert grouped_gemm("auto", cuda, torch.float32, w_in, w_out) is None
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    assert grouped_gemm("auto", cuda, torch.float32, w_in, w_out) is not None
    assert grouped_gemm("auto", torch.device("cpu"), torch.float32, w_in, w_out) is None


def test_triton_picks_its_kernel_for_fp32_and_fp16_and_grouped_mm_for_bf16_on_cuda(monkeypatch):
    """The decision alone: with Triton installed, fp32 and fp16 on its kernel, bf16 on
    torch._grouped_mm; without it, fp32 on the per-expert kernels (None)."""
    from moelab.nn import triton_grouped
    from moelab.nn.grouped import _torch_grouped_mm, grouped_gemm

    cuda = torch.device("cuda")
    w_in, w_out = torch.empty(E, 16, 16), torch.empty(E, 16, 8)
    monkeypatch.setattr(triton_grouped, "INSTALLED", True)
    assert grouped_gemm("triton", cuda, torch.float32, w_in, w_out).func is triton_grouped.grouped_mm
    assert grouped_gemm("triton", cuda, torch.float16, w_in.half(), w_out.half()).func is triton_grouped.grouped_mm
    assert grouped_gemm("triton", cuda, torch.bfloat16, w_in.bfloat16(), w_out.bfloat16()) is _torch_grouped_mm
    assert grouped_gemm("triton", cuda, torch.float32, w_in.half(), w_out.half()) is None  # weights in another dtype
    monkeypatch.setattr(triton_grouped, "INSTALLED", False)
    assert grouped_gemm("triton", cuda, torch.float32, w_in, w_out) is None


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("skip_ratio", [None, 0.5])
def test_inference_beyond_the_gathered_path_reads_nothing_back_on_a_gpu(name, skip_ratio):
    """`infer` past the gathered path (gpu_gather_bytes=0: experts too large to copy), bf16 on
    torch._grouped_mm, off the CPU: the dispatch keeps its counts on the device, so the step (its
    router's check deferred, as a compiled step skips it) reads nothing back; on the meta device
    any read back raises."""
    cfg = MoEConfig(dim=16, num_experts=E, hidden_dim=8, backend="grouped_mm", expert_mlp_bias=True, **ROUTERS[name])
    with torch.device("meta"):
        layer = build_moe(cfg).to(torch.bfloat16).eval()
        x = torch.randn(3, 16, dtype=torch.bfloat16)
    layer.skip_ratio, layer.gpu_gather_bytes = skip_ratio, 0
    assert layer._routes_on_device(x.device, x.dtype)
    with torch.no_grad(), deferred_logit_check():
        y = layer.infer(x)
    assert y.shape == (3, 16) and y.device.type == "meta"


@pytest.mark.parametrize("skip_ratio", [None, 0.6])
def test_inference_with_device_counts_equals_the_host_planned_path(monkeypatch, skip_ratio):
    """The same routed rows with the counts on the device (forced here on the CPU) and planned on
    the host: equal outputs, also where dynamic skipping empties slots whose rows torch._grouped_mm
    leaves NaN (they are masked)."""
    torch.manual_seed(0)
    layer = build_moe(MoEConfig(dim=D, num_experts=E, hidden_dim=I, top_k=3, backend="grouped_mm")).eval()
    layer.skip_ratio = skip_ratio
    x = torch.randn(16, D)
    with torch.no_grad():
        planned = layer.routed(x, *_routing(layer, x))
        monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: _UnsetRows.apply(a, b, offs))
        monkeypatch.setattr(type(layer), "_routes_on_device", lambda self, device, dtype: True)
        on_device = layer.routed(x, *_routing(layer, x))
    torch.testing.assert_close(on_device, planned)
    assert ((_routing(layer, x)[0] < 0).any()).item() == (skip_ratio is not None)


def _routing(layer, x):
    routing = layer._route(layer.router, x, None)[0]
    return routing.indices, routing.weights
