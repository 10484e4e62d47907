"""Routed experts as stacked weights (the transformers 5 layout).

Shape legend: N routed rows grouped by expert, E experts, D model dim, I expert hidden dim.

Experts take `xs: [N, D]` whose rows are grouped by expert, `counts`: E python ints (rows per
expert; or an [E] tensor where `takes_device_counts`) and optionally `row_weights: [N]` (each
row's routing weight, which scales its output), and return `[N, D]` in the same row order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.grouped import (
    ACTIVATIONS,
    BACKENDS,
    Activation,
    GatedActivation,
    accumulated_mlp,
    every_expert_mlp,
    gathered_mlp,
    grouped_gemm,
    grouped_mlp,
)
from moelab.nn.linear import Linear
from moelab.validation import is_positive_finite


class Experts(nn.Module):
    """Common checks and the backend switch (see `moelab.nn.grouped`).

    reads_routing_on_host: whether even `gathered` reads the routing back to the host (offloaded
    experts fetch what was chosen), so a compiled step must call them through the opaque op.
    """

    reads_routing_on_host = False
    runs_every_expert = False  # whether `every_expert` runs (`MoELayer.every_expert_work`)

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, backend: str):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown experts backend {backend!r}; choose one of {sorted(BACKENDS)}")
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.backend = backend

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the experts compute in (their weights'). Read from the module's own first
        parameter where it has one: walking `parameters()` costs a decode step ~5 us per layer."""
        own = next((p for p in self._parameters.values() if p is not None), None)
        return (own if own is not None else next(self.parameters())).dtype

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (what `gathered` copies per routed row)."""
        return sum(p.nbytes for p in self.parameters()) // self.num_experts

    def _stacked_weights(self) -> tuple[Tensor, Tensor] | None:
        """(w_in [E, H, D], w_out [E, D, I]) where `forward` runs `grouped_mlp` on them, else None."""
        return None

    def every_expert(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """x: [T, D], indices, weights: [T, K] -> [T, D], every expert run on every token and the
        outputs weighted by the routing (`every_expert_mlp`); where `runs_every_expert`."""
        raise NotImplementedError(f"{type(self).__name__} does not run every expert on every token")

    def takes_device_counts(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether `forward(xs, counts, ...)` on rows of this device and dtype may take counts as
        an [E] tensor there (`moelab.nn.dispatch.DispatchPlan.counts`: no host synchronisation)."""
        weights = self._stacked_weights()
        return weights is not None and grouped_gemm(self.backend, device, dtype, *weights) is not None

    def runs_grouped_mm(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether `forward(..., backend="grouped_mm")` runs rows of this device and dtype on
        `torch._grouped_mm` (else it falls back to the per-expert kernel)."""
        weights = self._stacked_weights()
        return weights is not None and grouped_gemm("grouped_mm", device, dtype, *weights) is not None

    def _check(self, xs: Tensor) -> None:
        if xs.dim() != 2 or xs.shape[1] != self.dim:
            raise ValueError(f"experts expect rows of shape [N, {self.dim}], got {list(xs.shape)}")


def _init_stacked(*weights: Tensor, fan_in: int) -> None:
    for w in weights:
        nn.init.normal_(w, std=fan_in**-0.5)


class SwiGLUExperts(Experts):
    """E SwiGLU MLPs: y = down(silu(gate(x)) * up(x)), or with `clamped`, a two-input `GatedActivation`
    (GPT-OSS's `ClampedSwiGLU`, Step 3.7's `CappedSwiGLU`, Gemma 4's `GeluTanhGLU`, Hunyuan 4's and
    DeepSeek-V4's `GateClampedSwiGLU`), down(clamped(gate(x), up(x))).

    gate_up_proj: [E, 2I, D], gate rows first then up rows; down_proj: [E, D, I];
    optional gate_up_bias: [E, 2I] and down_bias: [E, D].
    scale_input: the routing weight w scales the expert's input, y = expert(w * x) (Llama 4),
    instead of its output, y = w * expert(x).
    output_norm: a module every expert's output passes through before its weight scales it,
    y = w * output_norm(expert(x)), one for all experts (Muse Spark's post_expert_norm, a
    `ScaledRMSNorm` with scale_first); not with scale_input.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        bias: bool = False,
        backend: str = "auto",
        clamped: GatedActivation | None = None,
        scale_input: bool = False,
        output_norm: nn.Module | None = None,
    ):
        super().__init__(num_experts, dim, hidden_dim, backend)
        if scale_input and output_norm is not None:
            raise ValueError("experts whose weight scales their input take no output_norm; give one or the other")
        self.clamped = clamped
        self.scale_input = scale_input
        self.output_norm = output_norm
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.gate_up_bias = nn.Parameter(torch.zeros(num_experts, 2 * hidden_dim)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        _init_stacked(self.gate_up_proj, fan_in=dim)
        _init_stacked(self.down_proj, fan_in=hidden_dim)

    def _stacked_weights(self) -> tuple[Tensor, Tensor]:
        return self.gate_up_proj, self.down_proj

    def forward(
        self, xs: Tensor, counts: Sequence[int] | Tensor, row_weights: Tensor | None = None, *,
        backend: str | None = None, rows_past_counts: bool = True,
    ) -> Tensor:  # fmt: skip
        """backend: this call's (`moelab.nn.grouped`), default the experts' own; rows_past_counts:
        see `grouped_mlp`."""
        self._check(xs)
        if self.scale_input and row_weights is not None:
            xs, row_weights = xs * row_weights[:, None].to(xs.dtype), None
        return grouped_mlp(
            xs, counts, row_weights, self.gate_up_proj, self.gate_up_bias, self.down_proj, self.down_bias,
            activation=self.clamped or "silu", gated=True, backend=backend or self.backend,
            rows_past_counts=rows_past_counts, output_norm=self.output_norm,
        )

    def gathered(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """x: [T, D], indices, weights: [T, K] -> [T, D], each token's K experts run on their
        gathered weights (`gathered_mlp`, the decode path); index -1 = empty slot."""
        self._check(x)
        if self.scale_input:  # y = expert(w * x): scale each slot's input, not its output
            T, K = indices.shape
            rows = x.repeat_interleave(K, dim=0) * weights.reshape(-1, 1).to(x.dtype)
            ones = (indices >= 0).reshape(-1, 1).to(weights.dtype)
            ys = gathered_mlp(
                rows, indices.reshape(-1, 1), ones, self.gate_up_proj, self.gate_up_bias, self.down_proj,
                self.down_bias, activation=self.clamped or "silu", gated=True,
            )
            return ys.view(T, K, ys.shape[-1]).sum(1)
        return gathered_mlp(
            x, indices, weights, self.gate_up_proj, self.gate_up_bias, self.down_proj, self.down_bias,
            activation=self.clamped or "silu", gated=True, output_norm=self.output_norm,
        )

    @property
    def runs_every_expert(self) -> bool:
        return not self.scale_input  # its weights scale the inputs: not a weighted sum of outputs

    def every_expert(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        if not self.runs_every_expert:
            return super().every_expert(x, indices, weights)
        self._check(x)
        return every_expert_mlp(
            x, indices, weights, self.gate_up_proj, self.gate_up_bias, self.down_proj, self.down_bias,
            activation=self.clamped or "silu", gated=True, output_norm=self.output_norm,
        )

    def accumulated(
        self, x: Tensor, token_ids: Tensor, counts: Sequence[int], row_weights: Tensor,
        weight_rows: Sequence[int] | None = None,
    ) -> Tensor:  # fmt: skip
        """x: [T, D]; token_ids, row_weights: [N] per routed row, grouped by expert -> [T, D], the
        weighted outputs summed per token (`accumulated_mlp`, inference for many tokens; group g
        runs on expert weight_rows[g], default g)."""
        self._check(x)
        weights = (self.gate_up_proj, self.gate_up_bias, self.down_proj, self.down_bias)
        options = {
            "activation": self.clamped or "silu", "gated": True, "weight_rows": weight_rows, "output_norm": self.output_norm,
        }  # fmt: skip
        if self.scale_input:  # y = expert(w * x): each row scaled before the MLP, outputs summed as they are
            rows = x.index_select(0, token_ids) * row_weights[:, None].to(x.dtype)
            ones = torch.ones_like(row_weights)
            ys = accumulated_mlp(rows, torch.arange(len(rows), device=x.device), counts, ones, *weights, **options)
            return torch.zeros_like(x).index_add_(0, token_ids, ys)
        return accumulated_mlp(x, token_ids, counts, row_weights, *weights, **options)

    def hidden(self, xs: Tensor, counts: Sequence[int], row_weights: Tensor | None = None) -> Tensor:
        """[N, I] what each row's down projection sees (the gated activation), expert by expert
        under plain autograd, weights cast to xs's dtype one expert at a time; row_weights only
        matter with scale_input. `project(hidden(xs, counts), counts)` is `forward(xs, counts)`."""
        self._check(xs)
        if self.scale_input and row_weights is not None:
            xs = xs * row_weights[:, None].to(xs.dtype)
        act = Activation(self.clamped or "silu", gated=True)
        return _hidden_rows(xs, counts, self.gate_up_proj, self.gate_up_bias, act)

    def project(self, hidden: Tensor, counts: Sequence[int]) -> Tensor:
        """[N, D] the down projection of hidden [N, I] (rows grouped by expert), expert by expert,
        through the output norm where the experts have one."""
        ys = _project_rows(hidden, counts, self.down_proj, self.down_bias)
        return ys if self.output_norm is None else self.output_norm(ys)


class MLPExperts(Experts):
    """E two-layer MLPs: y = down(act(up(x))), act in {gelu, silu, relu, relu2} (BlockFFN uses silu;
    Nemotron-H relu2 = relu(x)²).

    up_proj: [E, I, D]; down_proj: [E, D, I]; optional up_bias: [E, I], down_bias: [E, D].
    """

    runs_every_expert = True

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        *,
        activation: str = "gelu",
        bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__(num_experts, dim, hidden_dim, backend)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        _init_stacked(self.up_proj, fan_in=dim)
        _init_stacked(self.down_proj, fan_in=hidden_dim)

    def _stacked_weights(self) -> tuple[Tensor, Tensor]:
        return self.up_proj, self.down_proj

    def forward(
        self, xs: Tensor, counts: Sequence[int] | Tensor, row_weights: Tensor | None = None, *,
        backend: str | None = None, rows_past_counts: bool = True,
    ) -> Tensor:  # fmt: skip
        """backend: this call's (`moelab.nn.grouped`), default the experts' own; rows_past_counts:
        see `grouped_mlp`."""
        self._check(xs)
        return grouped_mlp(
            xs, counts, row_weights, self.up_proj, self.up_bias, self.down_proj, self.down_bias,
            activation=self.activation, gated=False, backend=backend or self.backend,
            rows_past_counts=rows_past_counts,
        )

    def accumulated(
        self, x: Tensor, token_ids: Tensor, counts: Sequence[int], row_weights: Tensor,
        weight_rows: Sequence[int] | None = None,
    ) -> Tensor:  # fmt: skip
        """x: [T, D]; token_ids, row_weights: [N] -> [T, D] (`accumulated_mlp`, inference for many
        tokens; group g runs on expert weight_rows[g], default g)."""
        self._check(x)
        return accumulated_mlp(
            x, token_ids, counts, row_weights, self.up_proj, self.up_bias, self.down_proj, self.down_bias,
            activation=self.activation, gated=False, weight_rows=weight_rows,
        )

    def gathered(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """x: [T, D], indices, weights: [T, K] -> [T, D] (`gathered_mlp`, the decode path)."""
        self._check(x)
        return gathered_mlp(
            x, indices, weights, self.up_proj, self.up_bias, self.down_proj, self.down_bias,
            activation=self.activation, gated=False,
        )

    def every_expert(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        self._check(x)
        return every_expert_mlp(
            x, indices, weights, self.up_proj, self.up_bias, self.down_proj, self.down_bias,
            activation=self.activation, gated=False,
        )

    def hidden(self, xs: Tensor, counts: Sequence[int], row_weights: Tensor | None = None) -> Tensor:
        """[N, I] what each row's down projection sees (the activation), expert by expert under
        plain autograd, weights cast to xs's dtype one expert at a time (row_weights: unused).
        `project(hidden(xs, counts), counts)` is `forward(xs, counts)`."""
        self._check(xs)
        return _hidden_rows(xs, counts, self.up_proj, self.up_bias, Activation(self.activation, gated=False))

    def project(self, hidden: Tensor, counts: Sequence[int]) -> Tensor:
        """[N, D] the down projection of hidden [N, I] (rows grouped by expert), expert by expert."""
        return _project_rows(hidden, counts, self.down_proj, self.down_bias)


def _hidden_rows(xs: Tensor, counts: Sequence[int], w_in: Tensor, b_in: Tensor | None, act: Activation) -> Tensor:
    """[N, I]: act(x @ w_in[e].T + b_in[e]) for each expert's rows of xs [N, D]."""
    parts = []
    for e, rows in enumerate(xs.split(list(counts))):
        bias = None if b_in is None else b_in[e].to(xs.dtype)
        parts.append(act.forward(F.linear(rows, w_in[e].to(xs.dtype), bias)))
    return torch.cat(parts)


def _project_rows(hidden: Tensor, counts: Sequence[int], w_out: Tensor, b_out: Tensor | None) -> Tensor:
    """[N, D]: hidden @ w_out[e].T + b_out[e] for each expert's rows of hidden [N, I]."""
    parts = []
    for e, rows in enumerate(hidden.split(list(counts))):
        bias = None if b_out is None else b_out[e].to(hidden.dtype)
        parts.append(F.linear(rows, w_out[e].to(hidden.dtype), bias))
    return torch.cat(parts)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP: down(silu(gate(x)) * up(x)).

    gate_proj, up_proj: Linear(D, H); down_proj: Linear(H, D).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=False)
        self.up_proj = Linear(dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]"""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeekMoE: n_shared experts fused into one MLP of width n_shared * I),
    optionally scaled by a per-token sigmoid gate (Qwen2-MoE `shared_expert_gate`) and by a fixed
    output_scale (Cohere2-MoE's "average" of the routed and shared outputs: 0.5, its routed half in the
    router's route_scale).

    activation "swiglu": down(silu(gate_proj(x)) * up_proj(x)), or with `clamped` (Step 3.7's
    `CappedSwiGLU`, Gemma 4's `GeluTanhGLU`, Hunyuan 4's / DeepSeek-V4's `GateClampedSwiGLU`)
    down(clamped(gate_proj(x), up_proj(x))); a name in
    ACTIVATIONS (Nemotron-H: relu2): the plain MLP down(act(up_proj(x))), no gate_proj.
    gate_proj (SwiGLU only), up_proj: Linear(D, H); down_proj: Linear(H, D); gate: Linear(D, 1) or None.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        gated: bool = False,
        activation: str = "swiglu",
        clamped: GatedActivation | None = None,
        output_scale: float = 1.0,
    ):
        super().__init__()
        if not is_positive_finite(output_scale):
            raise ValueError(f"shared experts: output_scale must be a positive finite number, got {output_scale!r}")
        if activation != "swiglu" and activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown shared-expert activation {activation!r}; choose swiglu or one of {sorted(ACTIVATIONS)}"
            )
        if clamped is not None and activation != "swiglu":
            raise ValueError(f"a clamped gated activation needs activation 'swiglu', got {activation!r}")
        self.activation = activation
        self.clamped = clamped
        self.output_scale = output_scale
        self.gate_proj = Linear(dim, hidden_dim, bias=False) if activation == "swiglu" else None
        self.up_proj = Linear(dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1, bias=False) if gated else None

    def mlp(self, x: Tensor) -> Tensor:
        """x: [T, D] -> [T, D], the MLP before the sigmoid gate."""
        if self.gate_proj is None:
            return self.down_proj(ACTIVATIONS[self.activation][0](self.up_proj(x)))
        if self.clamped is not None:
            return self.down_proj(self.clamped(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: Tensor) -> Tensor:
        """x: [T, D] -> [T, D]"""
        return self.weigh(x, self.mlp(x))

    def weigh(self, x: Tensor, y: Tensor) -> Tensor:
        """The MLP's output y [T, D] on x [T, D] -> the experts' output: times the sigmoid gate on x
        and the output scale, where set."""
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y if self.output_scale == 1.0 else y * self.output_scale
