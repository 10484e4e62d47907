"""SwiGLU and the routing weight in one Triton kernel each way, for the "triton" experts backend.

`swiglu(pre [N, 2I], row_weights [N] | None, valid [1]) -> [N, I]`:
h = silu(gate) * up * w, gate = pre[:, :I], up = pre[:, I:], w the row's routing weight (1 when
None); rows at or past `valid[0]` (the rows past the last group, left unset by the grouped GEMM)
give zeros and zero gradients, so nothing unset reaches the routing weights' gradient.

Unfused, this is five or more passes over [N, I]-sized tensors each way (silu, two products,
their backward and the concatenation of the gate's and up's gradients), the largest share of the
GPU step after the GEMMs (`docs/results/gpu_profile_h200_e64k8.txt`). Here the forward reads
pre once and writes h; the backward reads the incoming gradient and pre once, recomputes the
activation, and writes pre's gradient and, summed over each row, the routing weight's.
Computed in fp32 whatever the storage dtype.

Runs where `triton_grouped.runs_on` runs kernels (CUDA, or the interpreter on a CPU), in fp32,
fp16 and bf16.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from moelab.nn import triton_grouped

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_ROWS = 16
BLOCK_COLS = 128


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `swiglu` runs rows of this device and dtype."""
    return dtype in DTYPES and triton_grouped.runs_on(device, torch.float32)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(pre, weights, valid, out, N, I, stride_p, stride_o,
                       HAS_WEIGHTS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        live = rows < tl.load(valid)
        inside = (rows[:, None] < N) & (cols[None, :] < I)
        at = rows[:, None] * stride_p + cols[None, :]
        gate = tl.load(pre + at, mask=inside & live[:, None], other=0.0).to(tl.float32)
        up = tl.load(pre + at + I, mask=inside & live[:, None], other=0.0).to(tl.float32)
        h = gate * tl.sigmoid(gate) * up
        if HAS_WEIGHTS:
            h = h * tl.load(weights + rows, mask=live & (rows < N), other=0.0).to(tl.float32)[:, None]
        tl.store(out + rows[:, None] * stride_o + cols[None, :], h.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def backward_kernel(grad, pre, weights, valid, grad_pre, grad_weights, N, I, stride_g, stride_p, stride_gp,
                        HAS_WEIGHTS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        live = (rows < tl.load(valid)) & (rows < N)
        w = tl.full((BLOCK_ROWS,), 1.0, tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights + rows, mask=live, other=0.0).to(tl.float32)
        row_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for c0 in range(0, I, BLOCK_COLS):
            cols = c0 + tl.arange(0, BLOCK_COLS)
            inside = (rows[:, None] < N) & (cols[None, :] < I)
            use = inside & live[:, None]
            at = rows[:, None] * stride_p + cols[None, :]
            gate = tl.load(pre + at, mask=use, other=0.0).to(tl.float32)
            up = tl.load(pre + at + I, mask=use, other=0.0).to(tl.float32)
            g = tl.load(grad + rows[:, None] * stride_g + cols[None, :], mask=use, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            row_sum += tl.sum(g * silu * up, 1)
            g = g * w[:, None]
            out_at = grad_pre + rows[:, None] * stride_gp + cols[None, :]
            tl.store(out_at, (g * up * sig * (1 + gate * (1 - sig))).to(grad_pre.dtype.element_ty), mask=inside)
            tl.store(out_at + I, (g * silu).to(grad_pre.dtype.element_ty), mask=inside)
        if HAS_WEIGHTS:
            tl.store(grad_weights + rows, row_sum.to(grad_weights.dtype.element_ty), mask=rows < N)

    return forward_kernel, backward_kernel


def _blocks() -> dict:
    return {"BLOCK_ROWS": BLOCK_ROWS, "BLOCK_COLS": 16 if triton_grouped.interpreting() else BLOCK_COLS}


def _launch(kernel, grid, *args, **constants) -> None:
    with triton_grouped.on_device(args[0]):
        kernel[grid](*args, **constants, **_blocks())


# Custom ops, as in `triton_grouped`: opaque to torch.compile. The backward returns an empty
# routing-weight gradient where there are no routing weights.
@torch.library.custom_op("moelab::triton_swiglu", mutates_args=())
def _forward_op(pre: Tensor, weights: Tensor | None, valid: Tensor) -> Tensor:
    import triton

    N, I = pre.shape[0], pre.shape[1] // 2
    out = pre.new_empty(N, I)
    grid = (triton.cdiv(N, BLOCK_ROWS), triton.cdiv(I, _blocks()["BLOCK_COLS"]))
    _launch(_kernels()[0], grid, pre, weights, valid, out, N, I, pre.stride(0), out.stride(0),
            HAS_WEIGHTS=weights is not None)  # fmt: skip
    return out


@_forward_op.register_fake
def _(pre: Tensor, weights: Tensor | None, valid: Tensor) -> Tensor:
    return pre.new_empty(pre.shape[0], pre.shape[1] // 2)


@torch.library.custom_op("moelab::triton_swiglu_backward", mutates_args=())
def _backward_op(grad: Tensor, pre: Tensor, weights: Tensor | None, valid: Tensor) -> tuple[Tensor, Tensor]:
    import triton

    grad = grad.contiguous()
    N, I = grad.shape
    grad_pre = torch.empty_like(pre)
    grad_weights = pre.new_empty(0) if weights is None else torch.empty_like(weights)
    _launch(
        _kernels()[1], (triton.cdiv(N, BLOCK_ROWS),), grad, pre, weights, valid, grad_pre,
        None if weights is None else grad_weights, N, I, grad.stride(0), pre.stride(0), grad_pre.stride(0),
        HAS_WEIGHTS=weights is not None,
    )  # fmt: skip
    return grad_pre, grad_weights


@_backward_op.register_fake
def _(grad: Tensor, pre: Tensor, weights: Tensor | None, valid: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(pre), pre.new_empty(0) if weights is None else torch.empty_like(weights)


def _save(ctx, inputs, output) -> None:
    pre, weights, valid = inputs
    ctx.has_weights = weights is not None
    ctx.save_for_backward(pre, weights, valid)


def _backward(ctx, grad: Tensor):
    pre, weights, valid = ctx.saved_tensors
    grad_pre, grad_weights = _backward_op(grad, pre, weights if ctx.has_weights else None, valid)
    return grad_pre, grad_weights if ctx.has_weights else None, None


_forward_op.register_autograd(_backward, setup_context=_save)


def swiglu(pre: Tensor, row_weights: Tensor | None, valid: Tensor) -> Tensor:
    """pre: [N, 2I] (gate columns, then up), rows contiguous; row_weights: [N] or None; valid: [1]
    int on pre's device, the rows at or past it give zeros -> [N, I] in pre's dtype (see the
    module docstring)."""
    if pre.dim() != 2 or pre.shape[1] % 2 or pre.stride(1) != 1:
        raise ValueError(f"swiglu takes pre-activations [N, 2I] with contiguous rows, got {list(pre.shape)}")
    if row_weights is not None and (row_weights.shape != (pre.shape[0],) or row_weights.dtype != pre.dtype):
        raise ValueError(f"row_weights must be [{pre.shape[0]}] in {pre.dtype}, got {list(row_weights.shape)}")
    if not runs_on(pre.device, pre.dtype):
        raise ValueError(f"swiglu runs fp32, fp16 or bf16 on CUDA with Triton installed; got {pre.dtype} on {pre.device}")
    if valid.numel() != 1 or valid.device != pre.device or valid.is_floating_point():
        raise ValueError(f"valid must be one integer on {pre.device}, got {valid.dtype} {list(valid.shape)} on {valid.device}")
    return _forward_op(pre, None if row_weights is None else row_weights.contiguous(), valid.reshape(1))
