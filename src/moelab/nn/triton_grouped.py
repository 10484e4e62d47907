"""A grouped GEMM in Triton: `torch._grouped_mm`'s contract for the dtypes it lacks on CUDA.

`grouped_mm(a [N, K], b [E, K, M], ends [E]) -> [N, M]` multiplies rows
`ends[g-1]:ends[g]` of a (`ends[-1]` read as 0 for the first group) by b[g]. Rows past the last
group are left unset, as `torch._grouped_mm` leaves them. Differentiable in a and b. The ends are
read on the device, so a step never waits for the routing. It takes fp32 and fp16: bf16 on CUDA
has `torch._grouped_mm`'s CUTLASS kernel, which moelab keeps for it.

Two kernels, both accumulating in fp32:
- `rows_kernel`: a [BLOCK_M, BLOCK_N] tile of the output per program. Each group's rows are cut
  into tiles of BLOCK_M that never cross into the next group, so the grid holds at most
  cdiv(N, BLOCK_M) + E row tiles; a program finds its group from the tile counts, computed in
  the kernel from the ends, and spare programs return at once. It also gives a's gradient
  (b transposed, through its strides).
- `weights_kernel`: b's gradient, one [BLOCK_K, BLOCK_N] tile of one group's [K, M] per program,
  summing a[rows].T @ grad[rows] over the group's rows in steps of BLOCK_M; an empty group
  gets zeros.

fp32 products follow torch's matmul setting: TF32 only where torch's is TF32
(`torch.backends.cuda.matmul.fp32_precision`, or the legacy `allow_tf32`; off by default), else
full fp32 ("ieee").

The kernels are built at the first call. On a CPU they run under Triton's interpreter where
`TRITON_INTERPRET=1` was set before Triton was imported (how the tests check them; numpy, far too
slow to be of use otherwise).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float16)


def interpreting() -> bool:
    """Whether Triton runs its kernels in its numpy interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INSTALLED = importlib.util.find_spec("triton") is not None  # looked up once (and not under torch.compile)


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `grouped_mm` runs rows of this device and dtype: fp32 or fp16, with Triton
    installed, on CUDA, or on a CPU under the interpreter."""
    if dtype not in DTYPES or not INSTALLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# The autotuner's choices on a GPU: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
ROWS_CONFIGS = ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (32, 64, 32, 4, 4))
WEIGHTS_CONFIGS = ((32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 128, 8, 3))


@functools.cache
def _kernels():
    """(rows kernel, weights kernel), built at the first call: autotuned on a GPU, one
    configuration under the interpreter (which has no timer)."""
    import triton
    import triton.language as tl

    def tuned(table: tuple, key: list[str]):
        if interpreting():
            return lambda kernel: kernel
        configs = [triton.Config(dict(zip(TILE_NAMES, tiles)), num_warps=w, num_stages=s) for *tiles, w, s in table]
        return triton.autotune(configs, key=key)

    @tuned(ROWS_CONFIGS, key=["K", "M", "E"])
    @triton.jit
    def rows_kernel(
        a, b, out, ends, K, M,
        stride_an, stride_ak, stride_be, stride_bk, stride_bm, stride_on, stride_om,
        E: tl.constexpr, E_POW2: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        groups = tl.arange(0, E_POW2)
        group_end = tl.load(ends + groups, mask=groups < E, other=0)
        group_start = tl.load(ends + groups - 1, mask=(groups > 0) & (groups < E), other=0)
        tiles = tl.where(groups < E, tl.cdiv(group_end - group_start, BLOCK_M), 0)
        tiles_end = tl.cumsum(tiles, 0)
        tile = tl.program_id(0)
        g = tl.sum((tiles_end <= tile).to(tl.int32), 0)  # this tile's group; E: a spare program
        if g < E:
            first_tile = tl.sum(tl.where(groups == g, tiles_end - tiles, 0), 0)
            start = tl.sum(tl.where(groups == g, group_start, 0), 0)
            end = tl.sum(tl.where(groups == g, group_end, 0), 0)
            rows = (start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                a_tile = tl.load(
                    a + rows[:, None] * stride_an + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < end) & (ks[None, :] < K), other=0.0,
                )
                b_tile = tl.load(
                    b + g.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bm,
                    mask=(ks[:, None] < K) & (cols[None, :] < M), other=0.0,
                )
                acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
            tl.store(
                out + rows[:, None] * stride_on + cols[None, :] * stride_om,
                acc.to(out.dtype.element_ty),
                mask=(rows[:, None] < end) & (cols[None, :] < M),
            )

    @tuned(WEIGHTS_CONFIGS, key=["K", "M", "E"])
    @triton.jit
    def weights_kernel(
        a, grad, out, ends, K, M,
        stride_an, stride_ak, stride_gn, stride_gm, stride_oe, stride_ok, stride_om,
        E: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        g = tl.program_id(0)
        col_tiles = tl.cdiv(M, BLOCK_N)
        ks = ((tl.program_id(1) // col_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        cols = ((tl.program_id(1) % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        start = tl.load(ends + g - 1, mask=g > 0, other=0)
        end = tl.load(ends + g)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_M):
            rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            a_tile = tl.load(
                a + rows[None, :] * stride_an + ks[:, None] * stride_ak,
                mask=(rows[None, :] < end) & (ks[:, None] < K), other=0.0,
            )
            grad_tile = tl.load(
                grad + rows[:, None] * stride_gn + cols[None, :] * stride_gm,
                mask=(rows[:, None] < end) & (cols[None, :] < M), other=0.0,
            )
            acc = tl.dot(a_tile, grad_tile, acc, input_precision=PRECISION)
        tl.store(
            out + g.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + cols[None, :] * stride_om,
            acc.to(out.dtype.element_ty),
            mask=(ks[:, None] < K) & (cols[None, :] < M),
        )

    return rows_kernel, weights_kernel


def _tf32() -> bool:
    """Whether torch runs fp32 CUDA matmuls in TF32: its newer `fp32_precision` settings where set
    (reading the legacy flag after them raises), else the legacy `allow_tf32`."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and not interpreting() and _tf32() else "ieee"


# The interpreter's tiles (no autotuner there): (BLOCK_M, BLOCK_N, BLOCK_K); the tests set the GPU's too.
INTERPRETER_TILES = (16, 16, 16)


def _tiles() -> dict:
    """The tile sizes to pass at launch: none on a GPU (the autotuner's), the interpreter's there."""
    if not interpreting():
        return {}
    return dict(zip(TILE_NAMES, INTERPRETER_TILES))


def on_device(t: Tensor):
    """A context in which Triton launches on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(a: Tensor, b: Tensor, ends: Tensor, out: Tensor | None = None) -> Tensor:
    """a [N, K] @ b[g] per group -> out [N, M] (new if None; rows past ends[-1] not written)."""
    import triton

    (N, K), (E, _, M) = a.shape, b.shape
    out = a.new_empty(N, M) if out is None else out
    rows_kernel, _ = _kernels()

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) + E, triton.cdiv(M, meta["BLOCK_N"]))

    with on_device(a):
        rows_kernel[grid](
            a, b, out, ends, K, M, *a.stride(), *b.stride(), *out.stride(),
            E=E, E_POW2=triton.next_power_of_2(E), PRECISION=_precision(a.dtype), **_tiles(),
        )  # fmt: skip
    return out


def _weights(a: Tensor, grad: Tensor, ends: Tensor) -> Tensor:
    """Per group g: a[rows of g].T @ grad[rows of g] -> [E, K, M] (zeros for an empty group)."""
    import triton

    (_, K), M, E = a.shape, grad.shape[1], ends.shape[0]
    out = a.new_empty(E, K, M)
    _, weights_kernel = _kernels()

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(M, meta["BLOCK_N"]))

    with on_device(a):
        weights_kernel[grid](
            a, grad, out, ends, K, M, *a.stride(), *grad.stride(), *out.stride(),
            E=E, PRECISION=_precision(a.dtype), **_tiles(),
        )  # fmt: skip
    return out


# Custom ops: a compiled step (torch.compile, fullgraph) calls them like any kernel instead of
# tracing Triton's launch machinery.
@torch.library.custom_op("moelab::triton_grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    return _rows(a, b, ends)


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("moelab::triton_grouped_weights", mutates_args=())
def _weights_op(a: Tensor, grad: Tensor, ends: Tensor) -> Tensor:
    return _weights(a, grad, ends)


@_weights_op.register_fake
def _(a: Tensor, grad: Tensor, ends: Tensor) -> Tensor:
    return a.new_empty(ends.shape[0], a.shape[1], grad.shape[1])


def _save(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor):
    a, b, ends = ctx.saved_tensors
    grad_a = _grouped_mm_op(grad, b.transpose(1, 2), ends) if ctx.needs_input_grad[0] else None
    grad_b = _weights_op(a, grad, ends) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_save)


def grouped_mm(a: Tensor, b: Tensor, ends: Tensor, *, check_ends: bool = True) -> Tensor:
    """a: [N, K]; b: [E, K, M] (any strides); ends: [E] integers on a's device, non-decreasing,
    at most N (checked on the device, without a host synchronisation on a GPU; check_ends=False
    for ends known to be so, a cumulative sum of counts, which saves a few launches a call) ->
    [N, M] in a's dtype, rows past ends[-1] unset (see the module docstring)."""
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[1] or ends.shape != (b.shape[0],):
        raise ValueError(
            f"grouped_mm takes a [N, K], b [E, K, M] and ends [E]; got {list(a.shape)}, {list(b.shape)}, "
            f"{list(ends.shape)}"
        )
    if a.dtype != b.dtype or not runs_on(a.device, a.dtype):
        raise ValueError(
            f"grouped_mm runs fp32 or fp16 on CUDA with Triton installed; got {a.dtype} x {b.dtype} on {a.device}"
        )
    if b.device != a.device or ends.device != a.device:
        raise ValueError(f"grouped_mm needs a, b and ends on one device, got {a.device}, {b.device}, {ends.device}")
    ends = ends.to(torch.int32)
    if check_ends and ends.numel():
        ordered = (ends[0] >= 0) & (ends[-1] <= a.shape[0]) & (ends[1:] >= ends[:-1]).all()
        torch._assert_async(ordered, "grouped_mm: ends must be non-decreasing, from 0 up to the rows of a")
    return _grouped_mm_op(a, b, ends)
