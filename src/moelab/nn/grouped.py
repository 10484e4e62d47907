"""Grouped expert MLPs: every expert's MLP applied to its contiguous block of rows.

Shape legend: N routed rows (grouped by expert), E experts, D model dim, I expert hidden dim,
H = 2I for gated (SwiGLU) experts, else I.

`grouped_mlp(xs [N, D], counts, row_weights [N] | None, w_in [E, H, D], b_in [E, H] | None,
w_out [E, D, I], b_out [E, D] | None, activation, gated, backend) -> [N, D]` runs rows
`counts[0]` of xs through expert 0, the next `counts[1]` rows through expert 1, and so on, and
scales each output row by its routing weight. A gated MLP splits the first projection into gate
rows then up rows: act(gate) * up, or a two-input gated activation (`GatedActivation`: GPT-OSS's
`ClampedSwiGLU`(gate, up), Step 3.7's `CappedSwiGLU`, Gemma 4's `GeluTanhGLU`, Hunyuan 4's and
DeepSeek-V4's `GateClampedSwiGLU`, Inkling 2's `SoftcappedSwiGLU`). Applying the routing weight here,
on cache-sized slices, is cheaper than in the [N, D] combine.

Backends, chosen by name ("auto", the default, picks "grouped" on CPU and "grouped_mm" for
bf16 on CUDA):
- "grouped": one custom autograd function that runs expert by expert, forward and
  backward, on cache-sized slices: no [N, H] intermediate is ever materialised, no per-expert
  autograd nodes, the activation is recomputed from the saved pre-activation in backward.
  Fastest on CPU (`moelab bench layer`).
- "loop": `W.unbind(0)` then plain `F.linear` per expert under autograd. The readable reference.
- "grouped_mm": `torch._grouped_mm` for both projections (one CUTLASS kernel on recent NVIDIA
  GPUs, bf16 only; a loop of GEMMs on CPU). Needs 16-byte aligned rows; otherwise, and for
  non-bf16 CUDA tensors, runs "grouped".
- "triton": fp32 and fp16 products on CUDA on moelab's Triton grouped GEMM
  (`moelab.nn.triton_grouped`, the dtypes `torch._grouped_mm` lacks there), bf16 ones on
  `torch._grouped_mm`, and between the projections SwiGLU and the routing weight in one Triton
  kernel each way (`moelab.nn.triton_swiglu`). Without Triton on the device (a CPU, Triton not
  installed) it is "grouped_mm".
"grouped_mm", "triton" and "auto" on bf16 CUDA run one kernel per projection and take the counts
as a device tensor, so that `MoELayer` plans its dispatch without reading the routing back to the
host (`plan_dispatch(host_counts=False)`): a GPU step with no host synchronisation (`grouped_gemm`).

None of them indexes stacked weights `W[e]` under autograd, which would give every expert a
full-size zero gradient (`SelectBackward`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.nn import triton_grouped, triton_swiglu
from moelab.nn.expert_threads import expert_workers, for_each_expert
from moelab.nn.grad_buffers import empty_gradient_like
from moelab.nn.linear import one_row_linear
from moelab.validation import is_positive_finite

# activation name -> (forward, backward(grad_out, pre_activation) -> grad_pre_activation)
ACTIVATIONS = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (F.gelu, torch.ops.aten.gelu_backward),
    "relu": (F.relu, lambda grad, x: grad * (x > 0)),
    "relu2": (lambda x: F.relu(x).square(), lambda grad, x: grad * 2 * F.relu(x)),  # Nemotron-H, Primer
}


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's gated activation of (gate, up), both [n, I]: g = min(gate, limit),
    u = clamp(up, -limit, limit), act = g * sigmoid(alpha * g) * (u + 1)."""

    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        if self.limit <= 0:
            raise ValueError(f"ClampedSwiGLU.limit must be > 0, got {self.limit}")

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        gate = gate.clamp(max=self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (up.clamp(-self.limit, self.limit) + 1)

    def backward(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """(d/d gate, d/d up) of `grad`-weighted act; clamps pass gradient inside their range
        (bounds included), as torch.clamp does."""
        g = gate.clamp(max=self.limit)
        u = up.clamp(-self.limit, self.limit)
        s = torch.sigmoid(self.alpha * g)
        grad_gate = grad * (u + 1) * (s + self.alpha * g * s * (1 - s)) * (gate <= self.limit)
        grad_up = grad * g * s * ((up >= -self.limit) & (up <= self.limit))
        return grad_gate, grad_up


@dataclass(frozen=True)
class CappedSwiGLU:
    """Step 3.7's gated activation of (gate, up), both [n, I], on the layers its config bounds:
    act = min(silu(gate), limit) * clamp(up, -limit, limit) (capped after the SiLU, where
    `ClampedSwiGLU` clamps before its own)."""

    limit: float

    def __post_init__(self):
        if not self.limit > 0:
            raise ValueError(f"CappedSwiGLU.limit must be > 0, got {self.limit}")

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        return F.silu(gate).clamp(max=self.limit) * up.clamp(-self.limit, self.limit)

    def backward(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """(d/d gate, d/d up) of `grad`-weighted act; the caps pass gradient inside their range
        (bounds included), as torch.clamp does."""
        s = torch.sigmoid(gate)
        silu = gate * s
        u = up.clamp(-self.limit, self.limit)
        grad_gate = grad * u * (s + silu * (1 - s)) * (silu <= self.limit)
        grad_up = grad * silu.clamp(max=self.limit) * ((up >= -self.limit) & (up <= self.limit))
        return grad_gate, grad_up


@dataclass(frozen=True)
class GeluTanhGLU:
    """Gemma 4's gated activation of (gate, up), both [n, I]: act = gelu_tanh(gate) * up, gelu_tanh
    being GELU's tanh approximation (`F.gelu(approximate="tanh")`, transformers' "gelu_pytorch_tanh")."""

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        return F.gelu(gate, approximate="tanh") * up

    def backward(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """(d/d gate, d/d up) of `grad`-weighted act."""
        grad_gate = torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh")
        return grad_gate, grad * F.gelu(gate, approximate="tanh")


@dataclass(frozen=True)
class GateClampedSwiGLU:
    """Hunyuan 4's and DeepSeek-V4's gated activation of (gate, up), both [n, I]:
    act = silu(min(gate, limit)) * clamp(up, -limit, limit) (the gate clamped before the SiLU, as
    `ClampedSwiGLU` does, but a plain SiLU and no +1 on up; `CappedSwiGLU` caps after the SiLU)."""

    limit: float

    def __post_init__(self):
        if not self.limit > 0:
            raise ValueError(f"GateClampedSwiGLU.limit must be > 0, got {self.limit}")

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        return F.silu(gate.clamp(max=self.limit)) * up.clamp(-self.limit, self.limit)

    def backward(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """(d/d gate, d/d up) of `grad`-weighted act; the clamps pass gradient inside their range
        (bounds included), as torch.clamp does."""
        g = gate.clamp(max=self.limit)
        s = torch.sigmoid(g)
        u = up.clamp(-self.limit, self.limit)
        grad_gate = grad * u * (s + g * s * (1 - s)) * (gate <= self.limit)
        grad_up = grad * g * s * ((up >= -self.limit) & (up <= self.limit))
        return grad_gate, grad_up


@dataclass(frozen=True)
class SoftcappedSwiGLU:
    """Inkling 2's gated activation of (gate, up), both [n, I]: act = softcap(gate, gate_cap) *
    sigmoid(gate) * softcap(up, up_cap), softcap(x, c) = c * tanh(x / c) (the sigmoid sees the raw
    gate); computed in at least float32, as transformers' `Inkling2SoftcappedSwiGLU` is, and
    returned in the inputs' dtype."""

    gate_cap: float
    up_cap: float

    def __post_init__(self):
        if not (is_positive_finite(self.gate_cap) and is_positive_finite(self.up_cap)):
            raise ValueError(
                f"SoftcappedSwiGLU caps must be positive finite numbers, got gate_cap={self.gate_cap!r}, "
                f"up_cap={self.up_cap!r}"
            )

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        g, u = _at_least_float32(gate, up)
        capped_g, capped_u = self.gate_cap * torch.tanh(g / self.gate_cap), self.up_cap * torch.tanh(u / self.up_cap)
        return (capped_g * torch.sigmoid(g) * capped_u).to(gate.dtype)

    def backward(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """(d/d gate, d/d up) of `grad`-weighted act, in the inputs' dtype."""
        g, u, grad_act = _at_least_float32(gate, up, grad)
        tanh_g, tanh_u, s = torch.tanh(g / self.gate_cap), torch.tanh(u / self.up_cap), torch.sigmoid(g)
        capped_g, capped_u = self.gate_cap * tanh_g, self.up_cap * tanh_u
        grad_gate = grad_act * capped_u * s * ((1 - tanh_g.square()) + capped_g * (1 - s))
        grad_up = grad_act * capped_g * s * (1 - tanh_u.square())
        return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


def _at_least_float32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in float32, or in their own dtype where it is wider (float64)."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


# two-input activations of (gate, up)
GatedActivation = ClampedSwiGLU | CappedSwiGLU | GeluTanhGLU | GateClampedSwiGLU | SoftcappedSwiGLU


class Activation:
    """The hidden activation as (forward(h), backward(grad_hidden, h) -> grad_h) of the first
    projection's output h: [n, H]. Gated: h = [gate | up]. A backward that recomputes the forward
    calls `recompute(h)`, which also returns act(gate) for `backward` to reuse."""

    def __init__(self, activation: str | GatedActivation, gated: bool):
        self.activation, self.gated = activation, gated

    def forward(self, h: Tensor) -> Tensor:
        if not self.gated:
            return ACTIVATIONS[self.activation][0](h)
        gate, up = h.chunk(2, dim=-1)
        if not isinstance(self.activation, str):
            return self.activation(gate, up)
        return ACTIVATIONS[self.activation][0](gate) * up

    def recompute(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """(forward(h), act(gate) [n, I] where the activation is a named gated one, else None): what
        a backward that recomputes the forward passes on to `backward`, which would compute act(gate)
        again (about a fifth of the backward's element-wise work on an expert's rows: 505 against 395 us
        for 512 rows of e64k8's width in bf16, one thread)."""
        if not self.gated or not isinstance(self.activation, str):
            return self.forward(h), None
        gate, up = h.chunk(2, dim=-1)
        gate_act = ACTIVATIONS[self.activation][0](gate)
        return gate_act * up, gate_act

    def backward(self, grad: Tensor, h: Tensor, gate_act: Tensor | None = None) -> Tensor:
        """grad: [n, I] of the hidden rows -> [n, H] of h; gate_act: `recompute`'s act(gate), if at hand."""
        if not self.gated:
            return ACTIVATIONS[self.activation][1](grad, h)
        gate, up = h.chunk(2, dim=-1)
        if not isinstance(self.activation, str):
            return torch.cat(self.activation.backward(grad, gate, up), dim=-1)
        act, act_backward = ACTIVATIONS[self.activation]
        gate_act = act(gate) if gate_act is None else gate_act
        return torch.cat([act_backward(grad * up, gate), grad * gate_act], dim=-1)


def _offsets(counts: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """out = x @ weight.T (+ bias), written in place."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _grouped_forward(xs, row_weights, w_in, b_in, w_out, b_out, counts, activation, gated, keep_pre, workers=None):
    """The expert-by-expert forward, on `workers` threads (default: `expert_workers`, see
    `moelab.nn.expert_threads`). Returns ys [N, D] and, if keep_pre, each expert's
    pre-activation [n_e, H] (what the backward needs)."""
    act = Activation(activation, gated)
    ys = xs.new_empty(xs.shape[0], w_out.shape[1])
    bounds = _offsets(counts)
    pre = [xs.new_empty(0, w_in.shape[1]) for _ in counts]
    cast = xs.dtype  # weights stored in another precision are cast one expert at a time

    def expert(e: int, worker: int) -> None:
        start, end = bounds[e]
        h = xs.new_empty(end - start, w_in.shape[1])
        _linear_into(h, xs[start:end], w_in[e].to(cast), None if b_in is None else b_in[e].to(cast))
        hidden = act.forward(h)
        w = None if row_weights is None else row_weights[start:end, None]
        # Scaling the hidden rows by the routing weight scales the output (the projection is
        # linear); the output bias is scaled separately below.
        torch.mm(hidden if w is None else hidden.mul_(w), w_out[e].to(cast).t(), out=ys[start:end])
        if b_out is not None:
            ys[start:end].add_(b_out[e].to(cast) if w is None else w * b_out[e].to(cast))
        if keep_pre:
            pre[e] = h

    for_each_expert(expert, counts, expert_workers(counts, xs.device) if workers is None else workers)
    return ys, pre


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, row_weights, w_in, b_in, w_out, b_out, counts, activation, gated):
        workers = expert_workers(counts, xs.device)  # the backward uses as many
        ys, pre = _grouped_forward(xs, row_weights, w_in, b_in, w_out, b_out, counts, activation, gated, True, workers)
        ctx.save_for_backward(xs, row_weights, w_in, b_in, w_out, b_out, *pre)
        ctx.counts, ctx.activation, ctx.gated, ctx.workers = counts, activation, gated, workers
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        xs, row_weights, w_in, b_in, w_out, b_out, *pre = ctx.saved_tensors
        act = Activation(ctx.activation, ctx.gated)
        grad_ys = grad_ys.contiguous()  # e.g. the zero-stride gradient of ys.sum()
        need_x, need_rw, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:6]
        grad_xs = torch.empty_like(xs) if need_x else None
        grad_rw = torch.empty_like(row_weights) if need_rw else None
        # empty, not zeros: every expert's slice is written below (zeroed if it had no rows); on a
        # CPU, large ones on memory kept from the last step (`moelab.nn.grad_buffers`)
        grad_w_in = empty_gradient_like(w_in) if need_w_in else None
        grad_w_out = empty_gradient_like(w_out) if need_w_out else None
        grad_b_in = torch.empty_like(b_in) if need_b_in else None
        grad_b_out = torch.empty_like(b_out) if need_b_out else None
        bounds = _offsets(ctx.counts)
        for e, n in enumerate(ctx.counts):
            if not n:
                for grad in (grad_w_in, grad_w_out, grad_b_in, grad_b_out):
                    if grad is not None:
                        grad[e].zero_()

        def expert(e: int, worker: int) -> None:
            start, end = bounds[e]
            h, g, x = pre[e], grad_ys[start:end], xs[start:end]
            hidden, gate_act = act.recompute(h)
            grad_hidden = g @ w_out[e]  # [n_e, I], before the routing weight
            if row_weights is not None:
                w = row_weights[start:end, None]
                if need_rw:
                    grad_rw[start:end] = (grad_hidden * hidden).sum(-1)
                    if b_out is not None:
                        grad_rw[start:end] += g @ b_out[e]
                hidden.mul_(w)
                grad_hidden.mul_(w)
            if need_w_out:
                torch.mm(g.t(), hidden, out=grad_w_out[e])
            if need_b_out:
                torch.sum(g if row_weights is None else g * w, 0, out=grad_b_out[e])
            grad_h = act.backward(grad_hidden, h, gate_act)
            if need_w_in:
                torch.mm(grad_h.t(), x, out=grad_w_in[e])
            if need_b_in:
                torch.sum(grad_h, 0, out=grad_b_in[e])
            if need_x:
                torch.mm(grad_h, w_in[e], out=grad_xs[start:end])

        for_each_expert(expert, ctx.counts, ctx.workers)
        return grad_xs, grad_rw, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def _grouped(xs, row_weights, counts, w_in, b_in, w_out, b_out, activation, gated):
    tensors = (xs, row_weights, w_in, b_in, w_out, b_out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _GroupedMLP.apply(*tensors, tuple(counts), activation, gated)
    return _grouped_forward(*tensors, counts, activation, gated, keep_pre=False)[0]


def _loop(xs, row_weights, counts, w_in, b_in, w_out, b_out, activation, gated):
    act = Activation(activation, gated)
    E = w_in.shape[0]
    b_ins = [None] * E if b_in is None else b_in.unbind(0)
    b_outs = [None] * E if b_out is None else b_out.unbind(0)
    parts = [
        F.linear(act.forward(F.linear(x, wi, bi)), wo, bo)
        for x, wi, bi, wo, bo in zip(xs.split(list(counts)), w_in.unbind(0), b_ins, w_out.unbind(0), b_outs)
    ]
    ys = torch.cat(parts)
    return ys if row_weights is None else ys * row_weights[:, None]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (`_grouped_mm`'s backward rejects
    zero-stride gradients such as those of `y.sum()`)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul of rows of this device and dtype runs in: autocast's lower precision
    where autocast is on for the device and the rows are fp32, else the rows' own."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _torch_grouped_mm(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    return torch._grouped_mm(a, b, offs=ends)


def _torch_grouped_mm_runs(device: torch.device, matmul: torch.dtype, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether `torch._grouped_mm` takes products in this dtype on this device (bf16 only on
    CUDA) through these weights: rows of 16-byte aligned widths."""
    widths = (w_in.shape[2], w_in.shape[1], w_out.shape[1], w_out.shape[2])
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16, torch.float16)
    return hasattr(torch, "_grouped_mm") and matmul in dtypes and not any(w * matmul.itemsize % 16 for w in widths)


def grouped_gemm(
    backend: str, device: torch.device, dtype: torch.dtype, w_in: Tensor, w_out: Tensor
) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """The one-kernel grouped GEMM `(a [N, K], b [E, K, M], ends [E] int32) -> [N, M]` that
    `grouped_mlp(..., backend=backend)` runs rows of this device and dtype on, or None where it
    runs the per-expert kernels. It is the one path that also takes the counts as a tensor (no
    host synchronisation). The weights must be in the rows' dtype; products run in `_matmul_dtype`
    (autocast's, if on).
    - "grouped_mm": `torch._grouped_mm` where it runs;
    - "triton": moelab's Triton kernel for fp32 and fp16 products (`moelab.nn.triton_grouped`),
      `torch._grouped_mm` for the others where it runs;
    - "auto": `torch._grouped_mm` for bf16 products on CUDA."""
    if w_in.dtype != dtype or w_out.dtype != dtype:
        return None
    matmul = _matmul_dtype(device, dtype)
    if backend == "triton" and triton_grouped.runs_on(device, matmul):
        return functools.partial(triton_grouped.grouped_mm, check_ends=False)  # ends: a cumsum of counts
    bf16_on_cuda = device.type == "cuda" and matmul == torch.bfloat16
    if backend in ("grouped_mm", "triton") or (backend == "auto" and bf16_on_cuda):
        return _torch_grouped_mm if _torch_grouped_mm_runs(device, matmul, w_in, w_out) else None
    return None


def _one_kernel(xs, row_weights, counts, w_in, b_in, w_out, b_out, activation, gated, rows_past_counts=True, *,
                backend: str):  # fmt: skip
    """Both projections on `grouped_gemm(backend, ...)`'s kernel; where there is none, "grouped"."""
    gemm = grouped_gemm(backend, xs.device, xs.dtype, w_in, w_out)
    if gemm is None:
        return _grouped(xs, row_weights, counts, w_in, b_in, w_out, b_out, activation, gated)
    matmul = _matmul_dtype(xs.device, xs.dtype)
    if matmul != xs.dtype:  # under autocast, as its F.linear would: rows and weights cast, the output in its dtype
        xs, row_weights, w_in, b_in, w_out, b_out = (
            None if t is None else t.to(matmul) for t in (xs, row_weights, w_in, b_in, w_out, b_out)
        )
    act = Activation(activation, gated)
    on_device = isinstance(counts, Tensor)
    ends = (counts if on_device else torch.tensor(list(counts), device=xs.device)).cumsum(0)
    offs = ends.to(torch.int32)
    # Rows past the last group (the empty slots of a plan made without host counts) come out of
    # the grouped GEMM unset, forward and backward, and stay there: a product reads only its
    # groups' rows. So only what leaves is masked: the output (zeros) and the gradient of the
    # input rows (zeros); a bias past the last group is a zero row whose gradient is dropped.
    masked = on_device and rows_past_counts
    if on_device and not rows_past_counts:  # the caller's promise, checked on the device (no sync on a GPU)
        torch._assert_async(ends[-1] == xs.shape[0], "device counts must cover every row with rows_past_counts=False")
    has_bias = b_in is not None or b_out is not None
    row = torch.arange(xs.shape[0], device=xs.device) if masked or has_bias else None
    if masked:
        valid = (row < ends[-1])[:, None]
        xs = _MaskGrad.apply(xs, valid)
    expert_of_row = torch.searchsorted(ends, row, right=True) if has_bias else None  # E (the zero row) past the last group

    def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        out = gemm(x, w.transpose(-2, -1), offs)
        return out if b is None else out + F.pad(b, (0, 0, 0, 1)).index_select(0, expert_of_row)

    pre = linear(xs, w_in, b_in)
    if backend == "triton" and gated and activation == "silu" and triton_swiglu.runs_on(pre.device, pre.dtype):
        # SwiGLU in one kernel each way, with the routing weight unless an output bias (which it
        # would scale too) comes after it; rows past the last group come out zero.
        scaled = row_weights is not None and b_out is None
        hidden = triton_swiglu.swiglu(pre, row_weights if scaled else None, ends[-1:])
        row_weights = None if scaled else row_weights
    else:
        hidden = act.forward(pre)
    ys = _ContiguousGrad.apply(linear(_ContiguousGrad.apply(hidden), w_out, b_out))
    if masked:
        ys = torch.where(valid, ys, 0)
    return ys if row_weights is None else ys * row_weights[:, None]


class _MaskGrad(torch.autograd.Function):
    """Identity whose backward zeroes the gradient where `keep` ([N, 1] bool) is False."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0), None


BACKENDS = {
    "auto": functools.partial(_one_kernel, backend="auto"),
    "grouped": _grouped,
    "loop": _loop,
    "grouped_mm": functools.partial(_one_kernel, backend="grouped_mm"),
    "triton": functools.partial(_one_kernel, backend="triton"),
}


def gathered_mlp(
    x: Tensor,
    indices: Tensor,
    weights: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    *,
    activation: str | GatedActivation = "silu",
    gated: bool = True,
    output_norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The decode path: x: [T, D]; indices, weights: [T, K] (index -1: an empty slot, its weight ignored)
    -> [T, D] = sum over k of weights[t, k] * expert_{indices[t, k]}(x[t]); output_norm: each
    expert's output is normed before its weight scales it (Muse Spark's post_expert_norm).

    Each slot's expert weights are gathered ([T*K, H, D] and [T*K, D, I]) and applied as two
    batched matmuls: a fixed number of operations whatever the routing, no host synchronisation
    and no loop over experts, so it suits a few tokens (on a CPU T*K up to about E, beyond which
    the gathered copies outweigh the grouped path's per-expert loop; on a GPU while the copies are
    small: `MoELayer.gpu_gather_bytes`). Inference only. One token run
    eagerly on a CPU skips the copies (`_one_token_mlp`)."""
    T, K = indices.shape
    if T == 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        act = Activation(activation, gated)
        return _one_token_mlp(x, indices, weights, w_in, b_in, w_out, b_out, act, output_norm)
    slots = indices.reshape(-1)
    experts = slots.clamp(min=0)
    slot_weights = weights.reshape(-1).to(x.dtype).masked_fill(slots < 0, 0.0)[:, None]  # [T*K, 1]
    # Rows as [T*K, 1, D] times transposed weights: CPU BLAS runs these as GEMMs (the
    # column-vector form [T*K, H, D] @ [T*K, D, 1] takes a path ~15x slower).
    rows = x.repeat_interleave(K, dim=0)[:, None, :]  # [T*K, 1, D]
    h = torch.bmm(rows, _transposed_matrices(w_in, experts).to(x.dtype))[:, 0]  # [T*K, H]
    if b_in is not None:
        h = h + b_in.index_select(0, experts).to(x.dtype)
    hidden = Activation(activation, gated).forward(h)  # [T*K, I]
    if output_norm is None:  # the weight scales the (smaller) hidden rows; the output bias apart
        hidden = hidden * slot_weights
    ys = torch.bmm(hidden[:, None, :], _transposed_matrices(w_out, experts).to(x.dtype))[:, 0]  # [T*K, D]
    if output_norm is not None:
        ys = output_norm(ys if b_out is None else ys + b_out.index_select(0, experts).to(x.dtype)) * slot_weights
    elif b_out is not None:
        ys = ys + slot_weights * b_out.index_select(0, experts).to(x.dtype)
    return ys.view(T, K, ys.shape[-1]).sum(1)


def every_expert_mlp(
    x: Tensor,
    indices: Tensor,
    weights: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    *,
    activation: str | GatedActivation = "silu",
    gated: bool = True,
    output_norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """x: [T, D]; indices, weights: [T, K] (index -1: an empty slot) -> [T, D], as `gathered_mlp`
    (output_norm too):
    every one of the E experts run on every token as two batched products over [E, T, ...], each
    output weighted by the token's routing weight for it (0 where it did not choose it) and the
    E summed. E/K times the products a token needs, but no loop over experts and no copies: for a
    few tokens that choose most of a few small experts (`MoELayer._runs_every_expert`). Inference only
    (an expert a token did not choose still runs on it: a non-finite output there would turn its
    zero weight into NaN)."""
    T, E = x.shape[0], w_in.shape[0]
    chosen = torch.where(indices < 0, E, indices)  # empty slots to a column past the experts
    # [E, T, 1]: each token's weight for each expert (summed where it chose one twice, as gathered_mlp)
    dense = x.new_zeros(T, E + 1).scatter_add_(1, chosen, weights.to(x.dtype))[:, :E].T[:, :, None]
    h = torch.matmul(x, w_in.mT.to(x.dtype))  # [E, T, H]
    if b_in is not None:
        h = h + b_in[:, None].to(x.dtype)
    hidden = Activation(activation, gated).forward(h)
    if output_norm is not None:
        y = torch.matmul(hidden, w_out.mT.to(x.dtype))  # [E, T, D]
        return (output_norm(y if b_out is None else y + b_out[:, None].to(x.dtype)) * dense).sum(0)
    y = torch.matmul(hidden * dense, w_out.mT.to(x.dtype))  # [E, T, D]
    if b_out is not None:
        y = y + dense * b_out[:, None].to(x.dtype)
    return y.sum(0)


def _transposed_matrices(w: Tensor, experts: Tensor) -> Tensor:
    """w: [E, out, in]; experts: [n] -> the chosen experts' matrices transposed, [n, in, out],
    copied from w in its own memory order (column-major matrices, `moelab.models.decode_layout`,
    copy straight: a transposing copy of them cost ref-32e-top4-shared's batch 8 a third of its
    tokens/s)."""
    if w.mT.is_contiguous():
        return w.mT.index_select(0, experts)
    return w.index_select(0, experts).mT


def _one_token_mlp(
    x: Tensor, indices: Tensor, weights: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor,
    b_out: Tensor | None, act: Activation, output_norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """`gathered_mlp` for one token (x: [1, D]; indices, weights: [1, K]), eagerly on a CPU: each
    of its K experts applied where its weights lie (2-D products: a 1-D one took 10.7 against 8.8
    us), summed in slot order. On a CPU the gathered copies cost as much as the products
    (ref-8e-top2's layer: 47 against 107 us)."""
    cast, y = x.dtype, None
    slot_weights = _as(weights, cast)
    # plain numbers are cheaper; tensors keep the router's gradient
    slot_weights = slot_weights[0] if slot_weights.requires_grad else slot_weights.tolist()[0]
    for e, w in zip(indices.tolist()[0], slot_weights):
        if e < 0:
            continue
        h = one_row_linear(x, _as(w_in[e], cast), None if b_in is None else _as(b_in[e], cast))
        if output_norm is not None:
            bias = None if b_out is None else _as(b_out[e], cast)
            out = output_norm(one_row_linear(act.forward(h), _as(w_out[e], cast), bias)) * w
        else:
            bias = None if b_out is None else w * _as(b_out[e], cast)
            out = one_row_linear(act.forward(h) * w, _as(w_out[e], cast), bias)
        y = out if y is None else y.add_(out)
    return torch.zeros_like(x) if y is None else y


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a call to `Tensor.to` where it already is (~1 us each, several per
    decode step and layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def accumulated_mlp(
    x: Tensor,
    token_ids: Tensor,
    counts: Sequence[int],
    row_weights: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    *,
    activation: str | GatedActivation = "silu",
    gated: bool = True,
    weight_rows: Sequence[int] | None = None,
    output_norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The inference path for many tokens: x: [T, D]; token_ids: [N] the token of each routed
    row, grouped by expert (counts: one python int per group); row_weights: [N] -> [T, D], each
    token's weighted expert outputs summed (each normed by output_norm before its weight, where given). Group g runs on the stacked weights' entry
    weight_rows[g] (default g: groups are the experts; offloaded experts name cache slots).

    Expert by expert, its rows are gathered from x, run through its MLP and added into the output
    at their tokens (`index_add_`, in expert order), so neither the [N, D] dispatched rows nor
    the [N, D] expert outputs are ever materialised: on CPU that memory traffic is what keeps the
    dispatch path behind a dense layer at inference. Sums in expert order (the training path
    sums in slot order; with experts on W threads, `moelab.nn.expert_threads`, each worker into
    a [T, D] output of its own, added in worker order): equal to it up to rounding,
    deterministic on CPU."""
    if weight_rows is not None and len(weight_rows) != len(counts):
        raise ValueError(f"weight_rows names {len(weight_rows)} groups, counts {len(counts)}")
    act = Activation(activation, gated)
    row_weights, cast = row_weights.to(x.dtype), x.dtype
    weight_rows = range(len(counts)) if weight_rows is None else weight_rows
    bounds = _offsets(counts)
    workers = expert_workers(counts, x.device)
    # One output per worker (index_add_ into a shared one would race), summed in worker order.
    ys = [torch.zeros(x.shape[0], w_out.shape[1], dtype=x.dtype, device=x.device) for _ in range(workers)]

    def expert(g: int, worker: int) -> None:
        (start, end), e = bounds[g], weight_rows[g]
        tokens = token_ids[start:end]
        h = F.linear(x.index_select(0, tokens), w_in[e].to(cast), None if b_in is None else b_in[e].to(cast))
        w = row_weights[start:end, None]
        if output_norm is not None:
            out = output_norm(F.linear(act.forward(h), w_out[e].to(cast), None if b_out is None else b_out[e].to(cast))) * w
        else:
            out = F.linear(act.forward(h) * w, w_out[e].to(cast))
            if b_out is not None:
                out.add_(w * b_out[e].to(cast))
        ys[worker].index_add_(0, tokens, out)

    for_each_expert(expert, counts, workers)
    for other in ys[1:]:
        ys[0].add_(other)
    return ys[0]


def grouped_mlp(
    xs: Tensor,
    counts: Sequence[int] | Tensor,
    row_weights: Tensor | None,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    *,
    activation: str | GatedActivation = "silu",
    gated: bool = True,
    backend: str = "auto",
    rows_past_counts: bool = True,
    output_norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """xs: [N, D] rows grouped by expert; counts: E python ints summing to N, or (the grouped_mm
    paths only, `grouped_gemm`) an [E] tensor summing to at most N, rows past its sum giving
    zeros (`moelab.nn.dispatch.DispatchPlan.counts`; rows_past_counts=False: the caller knows
    that the tensor sums to N, and nothing is masked); row_weights: [N]
    routing weight that scales each row's output, or None; w_in: [E, H, D]; b_in: [E, H];
    w_out: [E, D, I]; b_out: [E, D]; activation: a name in ACTIVATIONS, or (gated only) a
    two-input `GatedActivation`. Weights in another floating dtype than xs (inference only) are
    cast one expert at a time; output_norm: each row's output is normed before its routing weight
    scales it (Muse Spark's post_expert_norm; the backends that fold the weight into the hidden rows
    run without it, and it is applied after the norm). Returns [N, D] in xs's dtype."""
    if output_norm is not None:
        ys = grouped_mlp(
            xs, counts, None, w_in, b_in, w_out, b_out, activation=activation, gated=gated, backend=backend,
            rows_past_counts=rows_past_counts,
        )  # fmt: skip
        ys = output_norm(ys)  # rows past a tensor's counts are zeros, and stay so (the norm's eps > 0)
        return ys if row_weights is None else ys * row_weights[:, None].to(ys.dtype)
    if backend not in BACKENDS:
        raise ValueError(f"unknown experts backend {backend!r}; choose one of {sorted(BACKENDS)}")
    if not isinstance(activation, str):
        if not gated:
            raise ValueError(f"{type(activation).__name__} is a gated activation of (gate, up); pass gated=True")
    elif activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if isinstance(counts, Tensor):
        if grouped_gemm(backend, xs.device, xs.dtype, w_in, w_out) is None:
            raise ValueError(
                "counts as a tensor (no host synchronisation) need a one-kernel grouped GEMM: backend "
                "'grouped_mm' (torch._grouped_mm: bf16 on CUDA, 16-byte aligned widths), 'triton' (fp32 or "
                "fp16 on CUDA, with Triton installed) or 'auto' (bf16 on CUDA), weights in the rows' dtype; "
                "otherwise pass counts as python ints"
            )
        if counts.shape != (w_in.shape[0],):
            raise ValueError(f"counts must be a [{w_in.shape[0]}] tensor (one per expert), got {list(counts.shape)}")
    elif len(counts) != w_in.shape[0] or sum(counts) != xs.shape[0]:
        raise ValueError(
            f"counts must have one entry per expert ({w_in.shape[0]}) summing to the {xs.shape[0]} rows, "
            f"got {len(counts)} entries summing to {sum(counts)}"
        )
    if xs.shape[0] == 0:
        # The output still depends on every input: each weight gets a (zero) gradient, so
        # data-parallel ranks reduce the same set, and gradients flow back to the (empty) rows and
        # row weights, so an expert-parallel rank that received no rows still runs the backward
        # of the exchange that delivered them, as the other ranks do.
        inputs = [t for t in (xs, row_weights, w_in, b_in, w_out, b_out) if t is not None]
        return xs.new_zeros(0, w_out.shape[1]) + 0 * sum(t.sum() for t in inputs)
    if row_weights is not None:
        row_weights = row_weights.to(xs.dtype)
    if w_in.dtype != xs.dtype:  # inference over weights kept in their stored precision (calibration)
        if torch.is_grad_enabled() and (xs.requires_grad or w_in.requires_grad or w_out.requires_grad):
            raise ValueError(
                f"rows are {xs.dtype} but the expert weights {w_in.dtype}; mixed precision is for inference "
                "(torch.no_grad()); cast the layer or the input"
            )
        return _grouped_forward(xs, row_weights, w_in, b_in, w_out, b_out, counts, activation, gated, False)[
            0
        ]
    if isinstance(counts, Tensor):  # checked above: a one-kernel path
        return _one_kernel(
            xs, row_weights, counts, w_in, b_in, w_out, b_out, activation, gated, rows_past_counts, backend=backend
        )
    return BACKENDS[backend](xs, row_weights, counts, w_in, b_in, w_out, b_out, activation, gated)
