"""Stacked experts and every grouped-matmul backend against per-row expert MLPs computed from the
stacked weights (tests/reference.py), forward and backward."""

import functools

import pytest
import torch
from reference import F64, assert_close, expert_ffn, f64_leaf, f64_leaves, gelu_tanh, shared_ffn, silu

from moelab.nn import (
    GateClampedSwiGLU,
    GeluTanhGLU,
    MLPExperts,
    SharedExperts,
    SoftcappedSwiGLU,
    SwiGLUExperts,
    grouped_mlp,
)

BACKENDS = ["auto", "grouped", "loop", "grouped_mm", "triton"]
# D, I multiples of 4: fp32 rows are 16-byte aligned, so "grouped_mm" really runs torch._grouped_mm
D, I, E = 16, 8, 5
COUNTS = (3, 0, 6, 1, 0)  # experts 1 and 4 get no rows


def _experts(kind: str, bias: bool, backend: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "swiglu":
        m = SwiGLUExperts(E, D, I, bias=bias, backend=backend)
    else:
        m = MLPExperts(E, D, I, activation=kind, bias=bias, backend=backend)
    if bias:  # biases start at zero; make them matter
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "bias" in name:
                    p.normal_(0, 0.3)
    return m


def _reference_rows(xs, counts, row_weights, p, activation):
    """y_r = w_r * FFN_e(x_r), with e the expert whose block holds row r."""
    out, r = [], 0
    for e, n in enumerate(counts):
        for _ in range(n):
            y = expert_ffn(xs[r], e, p, activation)
            out.append(y if row_weights is None else row_weights[r] * y)
            r += 1
    return torch.stack(out) if out else xs.new_zeros(0, D)


def _check(module, kind, counts, *, row_weights, grad="random", tol=1e-5):
    N = sum(counts)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(N, D, generator=g).requires_grad_(True)
    rw = (torch.rand(N, generator=g) + 0.1).requires_grad_(True) if row_weights else None
    leaves = {f"experts.{n}": t for n, t in f64_leaves(module).items()}
    xr, rwr = f64_leaf(xs), (None if rw is None else f64_leaf(rw))
    module.zero_grad(set_to_none=True)
    ys = module(xs, list(counts), rw)
    ref = _reference_rows(xr, counts, rwr, leaves, kind)
    assert ys.shape == (N, D)
    assert_close(ys, ref, tol, tol, "ys")
    if grad == "sum":  # the zero-stride gradient of ys.sum()
        ys.sum().backward()
        ref.sum().backward()
    else:
        G = torch.randn(N, D, generator=g, dtype=F64)
        (ys.double() * G).sum().backward()
        (ref * G).sum().backward()
    assert_close(xs.grad, xr.grad, tol, tol, "grad xs")
    if rw is not None:
        assert_close(rw.grad, rwr.grad, tol, tol, "grad row_weights")
    for name, p in module.named_parameters():
        expected = leaves[f"experts.{name}"].grad
        assert p.grad is not None, name
        assert_close(p.grad, expected, tol, tol, f"grad {name}")
        for e, n in enumerate(counts):
            if n == 0:
                assert torch.all(p.grad[e] == 0), f"{name}[{e}] got no rows: its gradient must be exactly 0"
    return ys, xs.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["swiglu", "gelu", "silu", "relu", "relu2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("row_weights", [False, True])
def test_experts_match_reference(backend, kind, bias, row_weights):
    _check(_experts(kind, bias, backend), kind, COUNTS, row_weights=row_weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_zero_stride_gradient_of_sum(backend, kind):
    """ys.sum().backward() hands the backends an expanded (stride-0) gradient."""
    _check(_experts(kind, True, backend), kind, COUNTS, row_weights=True, grad="sum")


@pytest.mark.parametrize("counts", [(0, 0, 10, 0, 0), (1, 1, 1, 1, 1), (0, 0, 0, 0, 1), (7, 0, 0, 0, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_skewed_counts(counts, backend):
    _check(_experts("swiglu", True, backend), "swiglu", counts, row_weights=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_each_other(backend):
    """Same numbers as the readable "loop" backend, forward and backward, to fp32 rounding."""
    base = _check(_experts("swiglu", True, "loop"), "swiglu", COUNTS, row_weights=True)
    other = _check(_experts("swiglu", True, backend), "swiglu", COUNTS, row_weights=True)
    torch.testing.assert_close(other[0], base[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(other[1], base[1], atol=1e-6, rtol=1e-6)
    for name in base[2]:
        torch.testing.assert_close(other[2][name], base[2][name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_at_all(backend):
    """N = 0 (e.g. every assignment dropped, or an expert-parallel rank that receives no rows): an
    empty output, and zero (not missing) gradients for every weight and bias, so data-parallel
    ranks reduce the same set of gradients."""
    m = _experts("swiglu", True, backend)
    xs = torch.zeros(0, D, requires_grad=True)
    row_weights = torch.zeros(0, requires_grad=True)
    ys = m(xs, [0] * E, row_weights)
    assert ys.shape == (0, D)
    ys.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name
    # the (empty) gradient reaches the rows and their weights: an expert-parallel rank that
    # received no rows must still run the backward of the exchange that delivered them
    assert xs.grad is not None and xs.grad.shape == (0, D) and row_weights.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_widths_fall_back(backend):
    """Widths that are not 16-byte aligned (D=6, I=3) make "grouped_mm" fall back; same results."""
    torch.manual_seed(0)
    m = SwiGLUExperts(3, 6, 3, bias=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(7, 6, generator=g, requires_grad=True)
    leaves = {f"experts.{n}": t for n, t in f64_leaves(m).items()}
    xr = f64_leaf(xs)
    ys = m(xs, [2, 0, 5])
    ref = _reference_rows(xr, (2, 0, 5), None, leaves, "swiglu")
    assert_close(ys, ref, what="ys")
    ys.sum().backward()
    ref.sum().backward()
    assert_close(xs.grad, xr.grad, what="grad xs")
    assert_close(m.gate_up_proj.grad, leaves["experts.gate_up_proj"].grad, what="grad gate_up_proj")
    assert torch.all(m.gate_up_proj.grad[1] == 0)


def test_grouped_mm_is_really_used_on_aligned_fp32(monkeypatch):
    """Guard against the backend tests passing only because "grouped_mm" silently fell back."""
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    _experts("swiglu", False, "grouped_mm")(torch.randn(10, D), [3, 0, 6, 1, 0])
    assert calls, "torch._grouped_mm was not called for aligned fp32 rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_experts_within_tolerance(backend):
    """bf16 weights and rows vs the float64 reference on the same (bf16-rounded) values: within
    3e-2 absolute on outputs of magnitude ~1 (bf16 keeps 8 significant bits, ~4e-3 per rounding)."""
    m = _experts("swiglu", True, backend).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(10, D, generator=g).to(torch.bfloat16)
    rw = torch.rand(10, generator=g).to(torch.bfloat16)
    leaves = {f"experts.{n}": t for n, t in f64_leaves(m).items()}
    ys = m(xs, list(COUNTS), rw)
    assert ys.dtype == torch.bfloat16
    ref = _reference_rows(xs.to(F64), COUNTS, rw.to(F64), leaves, "swiglu")
    torch.testing.assert_close(ys.to(F64), ref.detach(), atol=3e-2, rtol=3e-2)


def test_stacked_layout():
    m = SwiGLUExperts(E, D, I, bias=True)
    assert m.gate_up_proj.shape == (E, 2 * I, D) and m.down_proj.shape == (E, D, I)
    assert m.gate_up_bias.shape == (E, 2 * I) and m.down_bias.shape == (E, D)
    m = MLPExperts(E, D, I, bias=True)
    assert m.up_proj.shape == (E, I, D) and m.down_proj.shape == (E, D, I)
    assert m.up_bias.shape == (E, I) and m.down_bias.shape == (E, D)


@pytest.mark.parametrize(
    "name, gated",
    [(n, g) for n in ("silu", "gelu", "relu", "relu2") for g in (False, True)]
    + [(GeluTanhGLU(), True), (GateClampedSwiGLU(limit=1.0), True), (SoftcappedSwiGLU(2.0, 3.0), True)],
)
def test_the_recomputed_gate_activation_gives_the_same_bits_as_computing_it_again(name, gated):
    """The grouped backward recomputes the hidden rows with `Activation.recompute` and hands its
    act(gate) to `backward`: the same numbers, to the bit, as `forward` and a `backward` that
    computes act(gate) itself; and those are autograd's of act(gate) * up (or act(h)). A two-input
    `GatedActivation` hands nothing on (its own backward recomputes what it needs)."""
    from moelab.nn.grouped import Activation

    act = Activation(name, gated)
    h = torch.randn(5, 2 * I if gated else I, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, I, dtype=torch.float64)
    hidden, gate_act = act.recompute(h.detach())
    assert (gate_act is not None) == (gated and isinstance(name, str))
    assert torch.equal(hidden, act.forward(h.detach()))
    assert torch.equal(act.backward(grad, h.detach(), gate_act), act.backward(grad, h.detach()))
    (expected,) = torch.autograd.grad(act.forward(h), h, grad)
    assert_close(act.backward(grad, h.detach(), gate_act), expected)


def test_gate_rows_come_first():
    """silu(gate) * up is linear in the up half (rows I..2I of gate_up_proj) and not in the gate
    half (rows 0..I): doubling the up rows doubles the output, doubling the gate rows does not."""
    m = SwiGLUExperts(1, D, I)
    xs = torch.randn(4, D)
    base = m(xs, [4]).detach()
    with torch.no_grad():
        m.gate_up_proj[0, I:] *= 2
    torch.testing.assert_close(m(xs, [4]).detach(), 2 * base)
    with torch.no_grad():
        m.gate_up_proj[0, I:] /= 2
        m.gate_up_proj[0, :I] *= 2
    assert not torch.allclose(m(xs, [4]).detach(), 2 * base, atol=1e-3)


@pytest.mark.parametrize("output_scale", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["swiglu", "gelu_tanh_glu", "gate_clamped_swiglu"])
@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_match_reference(gated, kind, output_scale):
    """SwiGLU, Gemma 4's `GeluTanhGLU` (gelu_tanh(gate) * up) or Hunyuan 4's / DeepSeek-V4's
    `GateClampedSwiGLU` (silu(min(gate, L)) * clamp(up, -L, L), both clamps acting) against the
    float64 formula, times an output scale (Cohere2-MoE's averaged shared experts: 0.5)."""
    torch.manual_seed(0)
    L = 0.5
    clamped = {"gelu_tanh_glu": GeluTanhGLU(), "gate_clamped_swiglu": GateClampedSwiGLU(L)}.get(kind)
    m = SharedExperts(D, 12, gated=gated, clamped=clamped, output_scale=output_scale)
    x = (2 * torch.randn(9, D)).requires_grad_(True)
    leaves = {f"shared.{n}": t for n, t in f64_leaves(m).items()}
    xr = f64_leaf(x)
    y = m(x)
    gate_act, up_act = {
        "gelu_tanh_glu": (gelu_tanh, None),
        "gate_clamped_swiglu": (
            lambda g: silu(torch.where(g > L, L, g)),  # silu(min(g, L))
            lambda u: torch.where(u.abs() > L, L * u.sign(), u),  # clamp(u, -L, L)
        ),
    }.get(kind, (silu, None))
    ref = output_scale * torch.stack([shared_ffn(xr[t], leaves, gate_act, up_act) for t in range(9)])
    assert_close(y, ref, what="shared y")
    if kind == "gate_clamped_swiglu":
        with torch.no_grad():
            gate, up = m.gate_proj(x), m.up_proj(x)
        assert (gate > L).any() and (gate < L).any(), "the gate clamp must matter"
        assert (up.abs() > L).any() and (up.abs() < L).any(), "the up clamp too"
    G = torch.randn(9, D, dtype=F64)
    (y.double() * G).sum().backward()
    (ref * G).sum().backward()
    assert_close(x.grad, xr.grad, what="grad x")
    for name, p in m.named_parameters():
        assert_close(p.grad, leaves[f"shared.{name}"].grad, what=f"grad {name}")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_shared_experts_refuse_an_output_scale_that_is_not_positive_and_finite(scale):
    with pytest.raises(ValueError, match="output_scale must be a positive finite number"):
        SharedExperts(D, 12, output_scale=scale)


def test_grouped_mlp_functional_matches_module():
    m = _experts("gelu", True, "grouped")
    xs = torch.randn(10, D)
    out = grouped_mlp(
        xs, list(COUNTS), None, m.up_proj, m.up_bias, m.down_proj, m.down_bias, activation="gelu", gated=False
    )
    torch.testing.assert_close(out, m(xs, list(COUNTS)))


def _gpt_oss_act(gate, up, limit, alpha=1.702):
    """GPT-OSS: g = min(g, limit), u = clamp(u, -limit, limit), act = g sigmoid(alpha g) (u + 1)."""
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _step_act(gate, up, limit):
    """Step 3.7's bounded layers: act = min(silu(g), limit) clamp(u, -limit, limit)."""
    return torch.minimum(gate * torch.sigmoid(gate), torch.tensor(limit, dtype=gate.dtype)) * up.clamp(-limit, limit)


def _gate_clamped_act(gate, up, limit):
    """Hunyuan 4, DeepSeek-V4: g = min(g, limit), act = silu(g) clamp(u, -limit, limit) (no alpha, no +1)."""
    gate = torch.minimum(gate, torch.tensor(limit, dtype=gate.dtype))
    return gate * torch.sigmoid(gate) * up.clamp(-limit, limit)


def _softcapped_act(gate, up, gate_cap, up_cap):
    """Inkling 2: act = softcap(g, gate_cap) sigmoid(g) softcap(u, up_cap), softcap(x, c) = c tanh(x / c)."""
    return gate_cap * torch.tanh(gate / gate_cap) * torch.sigmoid(gate) * up_cap * torch.tanh(up / up_cap)


def _gated_reference(xs, counts, row_weights, p, act, scale_input=False):
    """A two-input gated expert per row, written from its definition in float64: [g, u] = W_in x + b_in,
    y = W_out act(g, u) + b_out;
    the routing weight scales y (or x, with scale_input)."""
    out, r = [], 0
    for e, n in enumerate(counts):
        for _ in range(n):
            w = row_weights[r]
            x = xs[r] * w if scale_input else xs[r]
            h = p["gate_up_proj"][e] @ x + p["gate_up_bias"][e]
            y = p["down_proj"][e] @ act(h[:I], h[I:]) + p["down_bias"][e]
            out.append(y if scale_input else w * y)
            r += 1
    return torch.stack(out)


def _assert_same_forward_and_backward(m, ys, ref, xs_pair, rw_pair, leaves, g) -> None:
    """The experts' output ys equals the float64 reference ref, and so do the gradients of a random
    projection of it: the inputs', the routing weights' (each pair: (m's, the reference's)) and every
    parameter of m's (the reference's `leaves`)."""
    assert_close(ys, ref, what="ys")
    G = torch.randn(ys.shape, generator=g, dtype=F64)
    (ys.double() * G).sum().backward()
    (ref * G).sum().backward()
    for what, (got, want) in (("xs", xs_pair), ("row_weights", rw_pair)):
        assert_close(got.grad, want.grad, what=f"grad {what}")
    for name, param in m.named_parameters():
        assert_close(param.grad, leaves[name].grad, what=f"grad {name}")


def _check_gated(m, act, scale_input):
    """Experts m (with biases, m.clamped set) against `_gated_reference` with act(g, u), forward and
    backward (inputs, routing weights, every parameter). Returns the rows' pre-activations h [N, 2I]."""
    g = torch.Generator().manual_seed(1)
    N = sum(COUNTS)
    xs = (2 * torch.randn(N, D, generator=g)).requires_grad_(True)
    rw = (torch.rand(N, generator=g) + 0.5).requires_grad_(True)
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in m.named_parameters()}
    xr, rwr = f64_leaf(xs), f64_leaf(rw)
    ys = m(xs, list(COUNTS), rw)
    ref = _gated_reference(xr, COUNTS, rwr, leaves, act, scale_input)
    _assert_same_forward_and_backward(m, ys, ref, (xs, xr), (rw, rwr), leaves, g)
    with torch.no_grad():
        row_expert = torch.repeat_interleave(torch.arange(E), torch.tensor(COUNTS))
        x_in = xs * rw[:, None] if scale_input else xs
        return torch.einsum("nhd,nd->nh", m.gate_up_proj[row_expert], x_in) + m.gate_up_bias[row_expert]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "scale_input,kind",
    [(False, "gpt-oss"), (True, "gpt-oss"), (False, "step"), (False, "gate-clamped"), (True, "gate-clamped"),
     (False, "softcapped"), (True, "softcapped")],
)  # fmt: skip
def test_clamped_swiglu_experts_match_reference(backend, scale_input, kind):
    """Forward and backward (inputs, routing weights, every parameter) with both clamps active:
    GPT-OSS's `ClampedSwiGLU`, Step 3.7's `CappedSwiGLU`, Hunyuan 4's / DeepSeek-V4's `GateClampedSwiGLU`,
    Inkling 2's `SoftcappedSwiGLU` (caps 0.5: the tanh far from linear past them)."""
    from moelab.nn import CappedSwiGLU, ClampedSwiGLU

    m = _experts("swiglu", True, backend)
    act, m.clamped = {
        "gpt-oss": (functools.partial(_gpt_oss_act, limit=0.5), ClampedSwiGLU(alpha=1.702, limit=0.5)),
        "step": (functools.partial(_step_act, limit=0.5), CappedSwiGLU(0.5)),
        "gate-clamped": (functools.partial(_gate_clamped_act, limit=0.5), GateClampedSwiGLU(0.5)),
        "softcapped": (functools.partial(_softcapped_act, gate_cap=0.5, up_cap=0.5), SoftcappedSwiGLU(0.5, 0.5)),
    }[kind]
    m.scale_input = scale_input
    h = _check_gated(m, act, scale_input)
    gate = torch.nn.functional.silu(h[:, :I]) if kind == "step" else h[:, :I]  # what each clamps
    assert (gate > 0.5).any() and (gate < 0.5).any(), "the gate clamp must matter"
    assert (h[:, I:].abs() > 0.5).any() and (h[:, I:].abs() < 0.5).any(), "the up clamp too"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_input", [False, True])
def test_gelu_tanh_glu_experts_match_reference(backend, scale_input):
    """Gemma 4's `GeluTanhGLU`, forward and backward, against gelu_tanh(g) * u from its formula, on
    gates where the tanh approximation and the exact GELU differ beyond the tolerance."""
    m = _experts("swiglu", True, backend)
    m.clamped, m.scale_input = GeluTanhGLU(), scale_input
    h = _check_gated(m, lambda gate, up: gelu_tanh(gate) * up, scale_input)
    gate = h[:, :I].double()
    approximation = (torch.nn.functional.gelu(gate) - gelu_tanh(gate)).abs().max()
    assert approximation > 1e-4, "the data must tell the tanh approximation from the exact GELU"


def test_clamped_swiglu_needs_gated():
    from moelab.nn import ClampedSwiGLU

    with pytest.raises(ValueError, match="gated activation of \\(gate, up\\); pass gated=True"):
        grouped_mlp(torch.zeros(1, D), [1], None, torch.zeros(1, I, D), None, torch.zeros(1, D, I), None,
                    activation=ClampedSwiGLU(), gated=False)
    with pytest.raises(ValueError, match="limit must be > 0"):
        ClampedSwiGLU(limit=0)
    for limit in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="GateClampedSwiGLU.limit must be > 0"):
            GateClampedSwiGLU(limit)


@pytest.mark.parametrize("kind", ["gpt-oss", "step", "gate-clamped"])
def test_clamped_swiglu_backward_passes_gradient_at_the_clamp_bounds(kind):
    """The hand-written backward against autograd through torch.clamp, with gate and up exactly at
    the limits (torch.clamp passes the gradient at its bounds, included) and on either side (Step
    3.7's caps silu(gate): its limit is silu of the first gate)."""
    from moelab.nn import CappedSwiGLU, ClampedSwiGLU

    first = 0.75 if kind == "step" else 0.5
    limit = torch.nn.functional.silu(torch.tensor(first, dtype=F64)).item() if kind == "step" else 0.5
    act = {"gpt-oss": ClampedSwiGLU(alpha=1.702, limit=limit), "step": CappedSwiGLU(limit)}.get(kind)
    act = act or GateClampedSwiGLU(limit)
    gate = torch.tensor([[first, 0.25, 1.5, -0.5, first]], dtype=F64, requires_grad=True)
    up = torch.tensor([[limit, -limit, 0.25, 0.75, -0.75]], dtype=F64, requires_grad=True)
    grad = torch.tensor([[1.0, -2.0, 0.5, 1.5, 3.0]], dtype=F64)
    want = torch.autograd.grad(act(gate, up), (gate, up), grad)
    got = act.backward(grad, gate.detach(), up.detach())
    assert_close(got[0], want[0], what="grad gate")
    assert_close(got[1], want[1], what="grad up")
    assert got[0][0, 0] != 0 and got[1][0, 0] != 0 and got[1][0, 1] != 0  # the bounds pass gradient


def test_softcapped_swiglu_backward_is_autograd_of_its_formula():
    """SoftcappedSwiGLU's forward against softcap(gate, Cg) sigmoid(gate) softcap(up, Cu) written out
    (float64 stays float64), and its hand-written backward against autograd through it: gates and ups
    around 0, inside and well past each cap (the sigmoid sees the raw gate)."""
    gate_cap, up_cap = 0.5, 2.0
    gate = torch.tensor([[0.0, -6.0, -0.4, 0.3, 0.5, 1.5, 6.0]], dtype=F64, requires_grad=True)
    up = torch.tensor([[1.0, -2.0, 0.5, 9.0, -0.1, 2.0, -30.0]], dtype=F64, requires_grad=True)
    grad = torch.tensor([[1.0, -2.0, 0.5, 1.5, 3.0, 0.25, -1.0]], dtype=F64)
    act, expected = SoftcappedSwiGLU(gate_cap, up_cap), _softcapped_act(gate, up, gate_cap, up_cap)
    torch.testing.assert_close(act(gate, up), expected)
    want = torch.autograd.grad(expected, (gate, up), grad)
    torch.testing.assert_close(act.backward(grad, gate.detach(), up.detach()), want)


def test_softcapped_swiglu_computes_in_float32_on_bf16():
    """On bf16 (gate, up) the activation is computed in float32 and rounded once, bit for bit as
    transformers' `Inkling2SoftcappedSwiGLU` computes it (bf16 products throughout round differently);
    its backward too."""
    from transformers.models.inkling2.configuration_inkling2 import Inkling2TextConfig
    from transformers.models.inkling2.modeling_inkling2 import Inkling2SoftcappedSwiGLU

    torch.manual_seed(0)
    act = SoftcappedSwiGLU(4.0, 25.0)
    theirs = Inkling2SoftcappedSwiGLU(Inkling2TextConfig(mlp_gate_softcap=4.0, mlp_up_softcap=25.0))
    gate, up, grad = (4 * torch.randn(4096, dtype=torch.bfloat16) for _ in range(3))
    assert act(gate, up).dtype == torch.bfloat16 and torch.equal(act(gate, up), theirs(gate, up))
    want = act.backward(grad.float(), gate.float(), up.float())
    got = act.backward(grad, gate, up)
    assert all(g.dtype == torch.bfloat16 and torch.equal(g, w.to(torch.bfloat16)) for g, w in zip(got, want))


@pytest.mark.parametrize("caps", [(0.0, 1.0), (1.0, -1.0), (float("nan"), 1.0), (1.0, float("inf")), (None, 1.0)])
def test_softcapped_swiglu_refuses_caps_that_are_not_positive_and_finite(caps):
    with pytest.raises(ValueError, match="SoftcappedSwiGLU caps must be positive finite numbers"):
        SoftcappedSwiGLU(*caps)


def test_gelu_tanh_glu_backward_is_autograd_of_its_formula():
    """GeluTanhGLU's forward and hand-written backward against gelu_tanh(gate) * up from its formula
    and autograd through it, at gates across GELU's range: 0, both tails, the curved middle."""
    gate = torch.tensor([[0.0, -6.0, -1.5, -0.5, 0.3, 1.0, 2.5, 6.0]], dtype=F64, requires_grad=True)
    up = torch.tensor([[1.0, -2.0, 0.5, 1.5, 3.0, -0.75, 0.25, 2.0]], dtype=F64, requires_grad=True)
    grad = torch.tensor([[1.0, -2.0, 0.5, 1.5, 3.0, 0.25, -1.0, 0.75]], dtype=F64)
    act, expected = GeluTanhGLU(), gelu_tanh(gate) * up
    torch.testing.assert_close(act(gate, up), expected)  # float64 throughout: to its precision
    want = torch.autograd.grad(expected, (gate, up), grad)
    got = act.backward(grad, gate.detach(), up.detach())
    torch.testing.assert_close(got, want)


def test_gate_clamped_swiglu_backward_is_autograd_of_its_formula():
    """GateClampedSwiGLU's forward against silu(min(gate, L)) * clamp(up, -L, L) written out, and its
    hand-written backward against autograd through torch.clamp: gate and up exactly at L and -L (the
    bounds pass gradient, as torch.clamp's do), beyond them (none), and inside."""
    L = 0.5
    gate = torch.tensor([[L, 1.5, 0.25, -0.5, -4.0, L, 0.0, 3.0, L - 1e-3]], dtype=F64, requires_grad=True)
    up = torch.tensor([[L, -L, 0.75, -0.75, 0.25, -2.0, 1.0, 0.1, L + 1e-3]], dtype=F64, requires_grad=True)
    grad = torch.tensor([[1.0, -2.0, 0.5, 1.5, 3.0, 0.25, -1.0, 0.75, 2.0]], dtype=F64)
    g = torch.where(gate > L, L, gate)
    written = g / (1 + torch.exp(-g)) * torch.where(up.abs() > L, L * up.sign(), up)
    act = GateClampedSwiGLU(L)
    torch.testing.assert_close(act(gate, up), written)  # float64 throughout: to its precision
    g = gate.clamp(max=L)
    want = torch.autograd.grad(g * torch.sigmoid(g) * up.clamp(-L, L), (gate, up), grad)
    got = act.backward(grad, gate.detach(), up.detach())
    torch.testing.assert_close(got, want)
    gate_passes, up_passes = (got[0] != 0)[0].tolist(), (got[1] != 0)[0].tolist()
    assert gate_passes == [True, False, True, True, True, True, True, False, True]  # 0 only above L
    assert up_passes == [True, True, False, False, True, False, False, True, False]  # 0 beyond ±L, or silu = 0


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_stacked_weights_start_at_fan_in_scale(kind):
    """Each projection starts with std fan_in**-0.5: the first over the model dim (64 -> 0.125),
    the down projection over the expert width (4 -> 0.5)."""
    torch.manual_seed(0)
    m = SwiGLUExperts(16, 64, 4) if kind == "swiglu" else MLPExperts(16, 64, 4)
    w_in = m.gate_up_proj if kind == "swiglu" else m.up_proj
    assert abs(w_in.std().item() - 64**-0.5) < 0.01
    assert abs(m.down_proj.std().item() - 4**-0.5) < 0.03


def _output_normed(m) -> None:
    """Give experts m an output norm scaling first (Muse Spark's post_expert_norm), its weight drawn away from 1."""
    from moelab.nn.norms import ScaledRMSNorm

    m.output_norm = ScaledRMSNorm(D, 1e-6, scale_first=True)
    with torch.no_grad():
        m.output_norm.weight.copy_(1 + 0.5 * torch.randn(D, generator=torch.Generator().manual_seed(3)))


def _norm64(weight):
    """The output norm's formula in float64: y [D] -> (y * weight) / sqrt(mean((y * weight)^2) + 1e-6)."""
    return lambda y: (y * weight) / ((y * weight).pow(2).mean() + 1e-6).sqrt()


def _normed_reference(x, indices, weights, p, norm):
    """[T, D] sum over a token's slots of w * norm(expert(x)), in float64 from the definition (-1: empty)."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(D)
        for e, w in zip(indices[t].tolist(), weights[t]):
            if e >= 0:
                h = p["gate_up_proj"][e] @ x[t] + p["gate_up_bias"][e]
                y = y + w * norm(p["down_proj"][e] @ (silu(h[:I]) * h[I:]) + p["down_bias"][e])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_norm_comes_before_the_routing_weight_on_every_backend(backend):
    """Each expert's output normed, then weighted (the backends that scale the hidden rows by the weight
    leave it to after the norm): forward and backward against the float64 formula, and the
    hidden-then-project split (HEAPr's) is the forward unweighted."""
    m = _experts("swiglu", True, backend)
    _output_normed(m)
    g = torch.Generator().manual_seed(1)
    N = sum(COUNTS)
    xs = (2 * torch.randn(N, D, generator=g)).requires_grad_(True)
    rw = (torch.rand(N, generator=g) + 0.5).requires_grad_(True)
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in m.named_parameters()}
    norm = _norm64(leaves["output_norm.weight"])
    xr, rwr = f64_leaf(xs), f64_leaf(rw)
    row_expert = torch.repeat_interleave(torch.arange(E), torch.tensor(COUNTS))
    ref = _normed_reference(xr, row_expert[:, None], rwr[:, None], leaves, norm)
    ys = m(xs, list(COUNTS), rw)
    _assert_same_forward_and_backward(m, ys, ref, (xs, xr), (rw, rwr), leaves, g)
    with torch.no_grad():
        split = m.project(m.hidden(xs, list(COUNTS)), list(COUNTS))
        assert_close(split * rw[:, None], ref, what="project(hidden)")


@pytest.mark.parametrize("scale_input", [False, True])
def test_hidden_then_project_takes_the_routing_weight_on_the_input_where_it_scales_it(scale_input):
    """project(hidden(xs, counts, row_weights), counts) (the split the compression observers run)
    against the float64 gated reference: with scale_input (Llama 4) each row's input is scaled by its
    weight, y = expert(w x); without it the split is the expert unweighted (row_weights unused)."""
    m = _experts("swiglu", True, "grouped")
    m.scale_input = scale_input
    g = torch.Generator().manual_seed(1)
    N = sum(COUNTS)
    xs, rw = 2 * torch.randn(N, D, generator=g), torch.rand(N, generator=g) + 0.5
    leaves = {n: t.detach().double() for n, t in m.named_parameters()}
    ref = _gated_reference(xs.double(), COUNTS, rw.double(), leaves, lambda gate, up: silu(gate) * up, scale_input)
    with torch.no_grad():
        split = m.project(m.hidden(xs, list(COUNTS), rw), list(COUNTS))
    assert_close(split if scale_input else split * rw[:, None], ref, what="project(hidden)")


@pytest.mark.parametrize("tokens", [1, 3])
def test_an_output_norm_comes_before_the_routing_weight_on_the_inference_paths(tokens):
    """gathered (one token: in place), accumulated and every_expert with an output norm against the
    float64 formula, an empty slot included."""
    from moelab.nn.dispatch import plan_dispatch

    m = _experts("swiglu", True, "auto")
    _output_normed(m)
    p = {n: t.detach().double() for n, t in m.named_parameters()}
    norm = _norm64(p["output_norm.weight"])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, D, generator=g)
    indices = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(tokens)])
    indices[0, 2] = -1
    weights = torch.rand(tokens, 3, generator=g) + 0.5
    ref = _normed_reference(x.double(), indices, weights.double(), p, norm)
    plan = plan_dispatch(indices, E)
    with torch.no_grad():
        assert_close(m.gathered(x, indices, weights), ref, what="gathered")
        assert_close(m.every_expert(x, indices, weights), ref, what="every_expert")
        row_weights = weights.reshape(-1).index_select(0, plan.slots)
        assert_close(m.accumulated(x, plan.token_ids, plan.counts, row_weights), ref, what="accumulated")


def test_an_output_norm_is_not_taken_with_scale_input():
    from moelab.nn.norms import ScaledRMSNorm

    with pytest.raises(ValueError, match="take no output_norm"):
        SwiGLUExperts(E, D, I, scale_input=True, output_norm=ScaledRMSNorm(D, scale_first=True))
    with pytest.raises(ValueError, match="eps must be > 0 with scale_first"):
        ScaledRMSNorm(D, 0.0, scale_first=True)
