"""moelab's Triton grouped GEMM (`moelab.nn.triton_grouped`) run by Triton's interpreter on the
CPU (`TRITON_INTERPRET=1`): the kernels' grouping, tiling and masking against per-group matmuls
in float64, forward and backward, then the layer's training step on the "triton" backend against
the per-expert kernel. The interpreter runs the same kernel code as a GPU, not its compiler or its
tensor-core products; `benchmarks/gpu_check.py` checks those against float64 on a GPU."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.nn import MoEConfig, build_moe, triton_grouped
from moelab.nn import moe as moe_module
from moelab.nn.grouped import grouped_mlp
from moelab.nn.triton_grouped import grouped_mm

pytestmark = pytest.mark.skipif(
    not triton_grouped.runs_on(torch.device("cpu"), torch.float32),
    reason="needs Triton, in its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU)",
)


def per_group(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The reference: rows of each group times its matrix, in float64 (rows past the groups dropped)."""
    parts = [rows @ b[g] for g, rows in enumerate(a[: sum(counts)].double().split(counts))]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[2], dtype=torch.float64)


def _run(counts, extra, K, M, dtype, transposed, seed):
    """grouped_mm and its reference on random data whose rows past the groups are NaN (input and
    incoming gradient): -> ((out, grad_a, grad_b), (ref_out, ref_grad_a, ref_grad_b), routed rows)."""
    g = torch.Generator().manual_seed(seed)
    E, N = len(counts), sum(counts) + extra
    a = torch.randn(N, K, generator=g)
    a[sum(counts) :] = float("nan")
    b = torch.randn(E, M, K, generator=g).transpose(1, 2) if transposed else torch.randn(E, K, M, generator=g)
    grad = torch.randn(N, M, generator=g)
    grad[sum(counts) :] = float("nan")
    a, b, grad = a.to(dtype), b.to(dtype), grad.to(dtype)
    ends = torch.tensor(counts).cumsum(0)

    a1, b1 = a.clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    out = grouped_mm(a1, b1, ends)
    out.backward(grad)
    a2, b2 = a.double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ref = per_group(a2, b2, counts)
    ref.backward(grad[: sum(counts)].double())
    n = sum(counts)
    return (out[:n], a1.grad[:n], b1.grad), (ref, a2.grad[:n], b2.grad), n


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    extra=st.integers(0, 3),
    K=st.sampled_from([8, 20, 33]),
    M=st.sampled_from([8, 24, 40]),
    fp16=st.booleans(),
    transposed=st.booleans(),
)
def test_grouped_mm_matches_per_group_matmuls_forward_and_backward(counts, extra, K, M, fp16, transposed):
    """Any split over 1-5 groups (empty groups, one group holding every row, no routed row, groups
    of 1 row, groups across several 16-row tiles), K and M that are and are not multiples of the
    16-wide tiles, b in either memory layout, rows past the groups: the routed rows and b's gradient
    equal the float64 reference (an empty group's gradient exactly zero), and nothing the kernels
    compute reads the NaN rows past the groups."""
    dtype = torch.float16 if fp16 else torch.float32
    mine, ref, _ = _run(counts, extra, K, M, dtype, transposed, seed=sum(counts) * 31 + K + M)
    tol = {"rtol": 1e-2, "atol": 1e-2 * K**0.5} if fp16 else {"rtol": 1e-5, "atol": 1e-5}
    for name, got, want in zip(("out", "grad_a", "grad_b"), mine, ref):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, **tol, msg=name)
    for g, count in enumerate(counts):
        if count == 0:
            assert torch.equal(mine[2][g], torch.zeros_like(mine[2][g]))


def test_the_reference_check_fails_on_a_kernel_that_crosses_a_group_boundary(monkeypatch):
    """The test above can fail: a kernel whose tiles run 1 row into the next group's rows (the
    end of the first group read one too far) no longer matches."""
    real = triton_grouped._rows

    def shifted(a, b, ends):
        return real(a, b, ends + torch.tensor([1] + [0] * (len(ends) - 1), dtype=ends.dtype))

    monkeypatch.setattr(triton_grouped, "_rows", shifted)
    mine, ref, _ = _run([5, 7], 0, 8, 8, torch.float32, False, seed=0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(mine[0].double(), ref[0])


def test_grouped_mm_is_torch_grouped_mm_where_both_run():
    """The same contract as torch._grouped_mm (2-D rows, 3-D weights, int32 group ends, which it
    runs on a CPU in fp32): equal outputs and gradients on the groups' rows."""
    g = torch.Generator().manual_seed(1)
    counts = [3, 0, 9, 4]
    a, b = torch.randn(16, 8, generator=g), torch.randn(4, 12, 8, generator=g).transpose(1, 2)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    runs = []
    for fn in (grouped_mm, lambda x, w, e: torch._grouped_mm(x, w, offs=e)):
        a1, b1 = a.clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
        out = fn(a1, b1, ends)
        out.square().sum().backward()
        runs.append((out, a1.grad, b1.grad))
    for mine, theirs in zip(*runs):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize(
    "a, b, ends, match",
    [
        (torch.randn(4, 8), torch.randn(2, 6, 5), torch.tensor([2, 4]), r"a \[N, K\], b \[E, K, M\]"),
        (torch.randn(4, 8), torch.randn(2, 8, 5), torch.tensor([4]), r"ends \[E\]"),
        (torch.randn(4, 8).bfloat16(), torch.randn(2, 8, 5).bfloat16(), torch.tensor([2, 4]), "fp32 or fp16"),
        (torch.randn(4, 8), torch.randn(2, 8, 5).half(), torch.tensor([2, 4]), "fp32 or fp16"),
    ],
)
def test_grouped_mm_bad_input(a, b, ends, match):
    with pytest.raises(ValueError, match=match):
        grouped_mm(a, b, ends)


def test_grouped_mm_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_grouped.runs_on(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="on CUDA with Triton installed"):
        grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 5), torch.tensor([2, 4]))


@pytest.mark.parametrize("gated", [True, False])
def test_grouped_mlp_on_triton_equals_the_per_expert_kernel(gated):
    """Both projections, biases and routing weights, with host counts and with device counts
    whose rows past the groups give zeros: the per-expert kernel's output and gradients."""
    g = torch.Generator().manual_seed(2)
    E, D, I = 4, 12, 6
    H = 2 * I if gated else I
    leaves = {
        "xs": torch.randn(13, D, generator=g),
        "row_weights": torch.rand(13, generator=g),
        "w_in": torch.randn(E, H, D, generator=g) / D**0.5,
        "b_in": torch.randn(E, H, generator=g),
        "w_out": torch.randn(E, D, I, generator=g) / I**0.5,
        "b_out": torch.randn(E, D, generator=g),
    }
    counts = [4, 0, 6, 1]
    probe = torch.linspace(-1, 1, 13 * D).view(13, D)  # the gradient each output row receives
    runs = []
    for backend, rows, split in (("triton", 13, torch.tensor(counts)), ("triton", 11, counts), ("grouped", 11, counts)):
        t = {n: v.clone().requires_grad_(True) for n, v in leaves.items()}
        t["xs"] = leaves["xs"][:rows].clone().requires_grad_(True)
        t["row_weights"] = leaves["row_weights"][:rows].clone().requires_grad_(True)
        ys = grouped_mlp(t["xs"], split, t["row_weights"], t["w_in"], t["b_in"], t["w_out"], t["b_out"],
                         activation="silu", gated=gated, backend=backend)  # fmt: skip
        (ys * probe[:rows]).sum().backward()
        runs.append((ys.detach(), {n: v.grad for n, v in t.items()}))
    (device_ys, device_grads), *host_runs = runs
    assert torch.equal(device_ys[11:], torch.zeros(2, D))
    assert torch.equal(device_grads["xs"][11:], torch.zeros(2, D))
    for ys, grads in host_runs[:1] + [(device_ys[:11], device_grads)]:
        ref_ys, ref_grads = host_runs[1]
        torch.testing.assert_close(ys[:11], ref_ys, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad[: len(ref_grads[name])], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("skip_ratio", [None, 0.6])
def test_layer_training_step_on_triton_plans_on_the_device_and_equals_the_per_expert_kernel(monkeypatch, skip_ratio):
    """A fp32 training step of the layer with the "triton" backend plans its dispatch without
    host counts (what makes it sync-free on a GPU) and gives the per-expert kernel's output and
    gradients, with dynamic skipping's empty slots too."""
    seen = []
    real = moe_module.plan_dispatch
    monkeypatch.setattr(moe_module, "plan_dispatch", lambda *a, **kw: seen.append(kw["host_counts"]) or real(*a, **kw))
    runs = []
    for backend in ("triton", "grouped"):
        torch.manual_seed(0)
        layer = build_moe(MoEConfig(dim=16, num_experts=4, hidden_dim=8, top_k=3, backend=backend,
                                    expert_mlp_bias=True, balance_coef=0.01, num_shared=1))  # fmt: skip
        layer.skip_ratio = skip_ratio
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, result = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(result.loss).backward()
        runs.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    assert seen == [False, True]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
