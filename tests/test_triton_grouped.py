"""moelab's Triton kernels, the grouped GEMM (`moelab.nn.triton_grouped`) and the fused SwiGLU
(`moelab.nn.triton_swiglu`), run by Triton's interpreter on the CPU (`TRITON_INTERPRET=1`): their
grouping, tiling and masking against per-group matmuls and the activation in float64, forward and
backward, then the layer's training step on the "triton" backend against the per-expert kernel. The interpreter runs the same kernel code as a GPU, not its compiler or its
tensor-core products; `benchmarks/gpu_check.py` checks those against float64 on a GPU."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.nn import MoEConfig, build_moe, triton_grouped
from moelab.nn import grouped as grouped_module
from moelab.nn import moe as moe_module
from moelab.nn.grouped import grouped_mlp
from moelab.nn.triton_grouped import grouped_mm
from moelab.nn.triton_swiglu import swiglu

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


@pytest.mark.slow  # moved out of the default run, which must stay under 10 minutes (`make test-slow` runs it)
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
    equal the float64 reference (an empty group's gradient exactly zero), and b's gradient never
    reads the NaN rows past the groups (the rows themselves are independent of each other; the
    test of the rows past the groups below checks that they are never written)."""
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


def test_rows_past_the_groups_are_never_written():
    """The interpreter runs one program after another, so a tile writing a row of the next group
    would be overwritten by that group's own tile and go unseen; past the last group nothing
    overwrites it. An output filled beforehand must keep those rows (and the GEMM every row of
    every group), with every tile shape the GPU's autotuner may pick."""
    g = torch.Generator().manual_seed(3)
    counts = [7, 0, 13, 1, 40]
    a, b = torch.randn(70, 24, generator=g), torch.randn(5, 24, 40, generator=g)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    for tiles in sorted({tuple(c[:3]) for c in triton_grouped.ROWS_CONFIGS + triton_grouped.WEIGHTS_CONFIGS}):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(triton_grouped, "INTERPRETER_TILES", tiles)
            out = triton_grouped._rows(a, b, ends, out=torch.full((70, 40), 7.0))
            grad_b = triton_grouped._weights(a, out, ends)
        torch.testing.assert_close(out[:61].double(), per_group(a, b.double(), counts), rtol=1e-5, atol=1e-5, msg=str(tiles))
        assert torch.equal(out[61:], torch.full((9, 40), 7.0)), tiles
        want = torch.stack([a[s:e].double().T @ out[s:e].double() for s, e in zip([0, 7, 7, 20, 21], [7, 7, 20, 21, 61])])
        torch.testing.assert_close(grad_b.double(), want, rtol=1e-5, atol=1e-4, msg=str(tiles))


def test_tf32_follows_torchs_setting_through_either_api():
    """TF32 for fp32 products only where torch's own matmuls use it, set through the legacy flag
    or the newer fp32_precision (after which reading the legacy flag raises). In a fresh process:
    the settings are global."""
    code = """
import torch
from moelab.nn.triton_grouped import _tf32
assert not _tf32()
torch.backends.cuda.matmul.allow_tf32 = True
assert _tf32()
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cuda.matmul.fp32_precision = "tf32"
assert _tf32()
torch.backends.cuda.matmul.fp32_precision = "ieee"
assert not _tf32()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_strided_routing_weights_scale_the_right_rows():
    """Routing weights that are a column of a wider tensor (stride 2): the per-expert kernel's result."""
    g = torch.Generator().manual_seed(4)
    xs, weights = torch.randn(9, 8, generator=g), torch.rand(9, 2, generator=g)
    w_in, w_out = torch.randn(3, 12, 8, generator=g), torch.randn(3, 8, 6, generator=g)
    ys = [grouped_mlp(xs, [4, 0, 5], weights[:, 0], w_in, None, w_out, None, backend=backend)
          for backend in ("triton", "grouped")]  # fmt: skip
    torch.testing.assert_close(*ys)


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
        (torch.randn(4, 8), torch.randn(2, 8, 5), torch.tensor([2, 4], device="meta"), "on one device"),
    ],
)
def test_grouped_mm_bad_input(a, b, ends, match):
    with pytest.raises(ValueError, match=match):
        grouped_mm(a, b, ends)


@pytest.mark.parametrize("ends", [[3, 2], [2, 5], [-1, 4]])
def test_grouped_mm_refuses_ends_out_of_order_or_past_the_rows(ends):
    with pytest.raises(RuntimeError, match="ends must be non-decreasing"):
        grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 5), torch.tensor(ends))


def test_grouped_mm_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_grouped.runs_on(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="on CUDA with Triton installed"):
        grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 5), torch.tensor([2, 4]))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_training_step_on_triton_in_each_dtype(monkeypatch, dtype):
    """fp32 and fp16 run moelab's GEMM, bf16 torch._grouped_mm's (the GPU's path), all three the
    fused SwiGLU: the per-expert kernel's output and gradients, within fp16's and bf16's rounding."""
    ran = []
    for module, name in ((triton_grouped, "grouped_mm"), (grouped_module, "_torch_grouped_mm"),
                         (grouped_module.triton_swiglu, "swiglu")):  # fmt: skip
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: ran.append(_name) or _real(*a, **kw))
    runs = []
    for backend in ("triton", "grouped"):
        torch.manual_seed(0)
        layer = build_moe(MoEConfig(dim=16, num_experts=4, hidden_dim=8, top_k=2, backend=backend)).to(dtype)
        x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
        y, result = layer(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(result.loss).backward()
        runs.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    gemm = "_torch_grouped_mm" if dtype == torch.bfloat16 else "grouped_mm"
    assert sorted(set(ran)) == sorted({gemm, "swiglu"}) and ran.count(gemm) == 2
    for a, b in zip(*runs):
        tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2 * float(b.abs().max())}
        torch.testing.assert_close(a, b, **tol)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    I=st.sampled_from([1, 5, 16, 45]),
    valid_fraction=st.floats(0, 1),
    weighted=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_swiglu_matches_float64_and_zeroes_the_rows_past_valid(rows, I, valid_fraction, weighted, dtype):
    """silu(gate) * up * w against float64 autograd, forward and backward (pre-activations and
    routing weights), for widths below, at and across the kernel's column blocks; the rows at or
    past `valid` hold NaN (unset memory), in the input and in the incoming gradient, and come out
    exactly zero, with zero gradients."""
    g = torch.Generator().manual_seed(rows * 7 + I)
    valid = int(rows * valid_fraction)
    pre = torch.randn(rows, 2 * I, generator=g) * 3
    pre[valid:] = float("nan")
    weights = torch.rand(rows, generator=g) if weighted else None
    grad = torch.randn(rows, I, generator=g)
    grad[valid:] = float("nan")
    pre = pre.to(dtype).requires_grad_(True)
    weights = None if weights is None else weights.to(dtype).requires_grad_(True)
    h = swiglu(pre, weights, torch.tensor([valid]))
    h.backward(grad.to(dtype))

    p64 = pre.detach()[:valid].double().requires_grad_(True)
    w64 = None if weights is None else weights.detach()[:valid].double().requires_grad_(True)
    ref = torch.nn.functional.silu(p64[:, :I]) * p64[:, I:] * (1 if w64 is None else w64[:, None])
    ref.backward(grad[:valid].double())
    pairs = [(h[:valid], ref), (pre.grad[:valid], p64.grad)] + ([] if w64 is None else [(weights.grad[:valid], w64.grad)])
    for got, want in pairs:
        assert got.dtype == dtype
        scale = float(want.detach().abs().max()) if want.numel() else 0.0
        tol = {"rtol": 1e-5, "atol": 1e-5 * (scale + 1)} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2 * (scale + 1)}
        torch.testing.assert_close(got.double(), want, **tol)
    for past in (h[valid:], pre.grad[valid:]) + (() if weights is None else (weights.grad[valid:],)):
        assert torch.equal(past, torch.zeros_like(past))


@pytest.mark.parametrize(
    "pre, weights, match",
    [
        (torch.randn(4, 5), None, r"\[N, 2I\]"),
        (torch.randn(4, 6).t(), None, r"\[N, 2I\] with contiguous rows"),
        (torch.randn(4, 6), torch.rand(3), r"row_weights must be \[4\]"),
        (torch.randn(4, 6), torch.rand(4).double(), r"row_weights must be \[4\] in torch.float32"),
        (torch.randn(4, 6).double(), None, "fp32, fp16 or bf16"),
    ],
)
def test_swiglu_bad_input(pre, weights, match):
    with pytest.raises(ValueError, match=match):
        swiglu(pre, weights, torch.tensor([4]))
    with pytest.raises(ValueError, match="valid must be one integer"):
        swiglu(torch.randn(4, 6), None, torch.tensor([4.0]))
