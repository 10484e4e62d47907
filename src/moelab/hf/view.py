"""One view of any MoE checkpoint: per layer, a router, stacked routed experts and shared experts.

Shape legend: E routed experts, D model dim, I expert hidden dim, Is shared-expert hidden dim.

Views hold tensors in one layout whatever the file format: gate/up `[E, I, D]`, down `[E, D, I]`
(the `nn.Linear` weight convention, per expert). Only adapters know file keys; analysis and
compression read views. A `ModelView` reads one layer's tensors when asked for that layer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.nn.moe import IDENTITY_RETURNS
from moelab.nn.routers import check_groups, check_top_k, min_group_size
from moelab.validation import is_int, is_positive_finite

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus", "sparsemixer")
# act(gate, up), of routed experts and of shared experts with a gate
GATED_ACTIVATIONS = (
    "silu", "clamped_swiglu", "capped_swiglu", "gelu_tanh_glu", "gate_clamped_swiglu", "softcapped_swiglu",
)
SWIGLU_LIMIT_ACTIVATIONS = ("clamped_swiglu", "capped_swiglu", "gate_clamped_swiglu")  # take swiglu_limit
PLAIN_ACTIVATIONS = ("relu2", "gelu", "relu", "silu")  # act(up), experts with no gate: Nemotron-H, moelab's
ACTIVATIONS = tuple(dict.fromkeys(GATED_ACTIVATIONS + PLAIN_ACTIVATIONS))


@dataclass(frozen=True, eq=False)
class NormView:
    """An RMS norm around a layer's router or experts (Gemma 4's; `moelab.nn.norms.ScaledRMSNorm`):
    x / sqrt(mean(x^2) + eps) * weight * multiplier, computed in float32; scale_first: x * weight *
    multiplier (cast back to x's dtype) RMS-normalised, nothing after (Muse Spark's post_expert_norm;
    eps > 0). weight: [D]."""

    weight: Tensor
    eps: float
    multiplier: float = 1.0
    scale_first: bool = False

    def __post_init__(self):
        _check_shape("norm weight", self.weight, (None,))
        if self.scale_first and not self.eps > 0:
            raise ValueError(f"a norm that scales first needs eps > 0 (a zero row must stay zero), got {self.eps!r}")


@dataclass(frozen=True, eq=False)
class IdentityRows:
    """The router's rows for its Z zero-computation experts (the choices after the E experts), kept
    apart from the experts' rows so that pruning and merging edit those alone. returns: what a slot
    on one adds, "input": the block's input times its weight (LongCat-Flash's identity experts),
    "zero": nothing (ZAYA's skip expert).

    weight: [Z, D] ([Z, R] for an MLP router); bias, selection_bias: [Z] | None, where the router
    has them for its experts.
    """

    weight: Tensor
    bias: Tensor | None = None
    selection_bias: Tensor | None = None
    returns: str = "input"

    def __post_init__(self):
        if self.returns not in IDENTITY_RETURNS:
            raise ValueError(f"identity rows return one of {IDENTITY_RETURNS}, got {self.returns!r}")

    @property
    def count(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True, eq=False)
class RouterMLP:
    """The MLP a router reads x [D] through (ZAYA's router, `moelab.nn.mlp_router.MLPRouter`):
    r = down @ x + down_bias, plus state * state_scale where the layer reads the r of the layer
    before (`state`, ZAYA's EDA: every layer but the first), features = gelu(fc2 @ gelu(fc1 @ norm(r)
    + fc1_bias) + fc2_bias) (exact gelu), the router's logits features @ weight.T ([E, R] rows,
    which pruning and merging edit); the block hands r on to the next layer's router.

    down: [R, D]; down_bias: [R]; state_scale: [R] | None (None: the layer reads no state); norm:
    RMS norm over R; fc1, fc2: [R, R]; fc1_bias, fc2_bias: [R].
    """

    down: Tensor
    down_bias: Tensor
    norm: NormView
    fc1: Tensor
    fc1_bias: Tensor
    fc2: Tensor
    fc2_bias: Tensor
    state_scale: Tensor | None = None

    def __post_init__(self):
        _check_shape("router MLP down", self.down, (None, None))
        R = self.width
        for name in ("down_bias", "fc1_bias", "fc2_bias", "state_scale"):
            _check_shape(f"router MLP {name}", getattr(self, name), (R,))
        _check_shape("router MLP fc1", self.fc1, (R, R))
        _check_shape("router MLP fc2", self.fc2, (R, R))
        _check_shape("router MLP norm weight", self.norm.weight, (R,))

    @property
    def width(self) -> int:
        """R, what the router's rows read."""
        return self.down.shape[0]

    @property
    def dim(self) -> int:
        """D, the block's input width."""
        return self.down.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        """{name: tensor} as `MLPRouter` holds them."""
        state = {
            "down_proj.weight": self.down, "down_proj.bias": self.down_bias, "norm.weight": self.norm.weight,
            "fc1.weight": self.fc1, "fc1.bias": self.fc1_bias, "fc2.weight": self.fc2, "fc2.bias": self.fc2_bias,
        }  # fmt: skip
        return state if self.state_scale is None else {**state, "state_scale": self.state_scale}


@dataclass(frozen=True, eq=False)
class RouterView:
    """How a layer picks experts: logits = x @ weight.T (+ bias), then

    - "softmax" / "sigmoid" / "sqrtsoftplus" (DeepSeek-V4: sqrt(softplus)): scores = f(logits);
      the top_k experts by `scores + selection_bias` (the correction bias steers selection only), optionally limited to the best `topk_group`
      of `n_group` expert groups, each scored by `group_score` ("max": its best expert, "top2": the
      sum of its two best; None: by score_func, `moelab.nn.routers.group_scoring`); weights = the
      chosen scores, divided by their sum if `renormalize`, times `route_scale`; with
      `select_on_logits` the top_k by `logits + selection_bias` instead (Kolibri1). Families that
      take the top-k of the logits and then a softmax over the k (GPT-OSS, Granite, DBRX with L1
      norm) are "softmax" with `renormalize=True`: the two are equal.
    - "sparsemixer" (PhiMoE, inference): two rounds; each picks the best remaining logit m and
      weights it by a softmax over the logits l with (m - l) / max(|l|, m) <= 2 * jitter_eps.

    weight: [E, D]; bias: [E] | None (added to the logits); selection_bias: [E] | None.
    scaled_after_experts: transformers' block multiplies the experts' summed output by
    `route_scale` instead of their weights (Laguna): the same output, but the weights its experts
    module is handed leave the scale out.
    expert_scale: [E] | None, each chosen expert's weight is multiplied by its entry last (Gemma 4's
    per_expert_scale). input_norm: the router reads x through this norm (Gemma 4's), its weight
    and multiplier applied after the cast back to x's dtype, as Gemma 4's router applies its scale.
    token_experts: [V, top_k] int64 or int32 (as stored) | None, hash routing (DeepSeek-V4's
    "hash_moe" layers, moelab's router="hash"): token id v visits the experts token_experts[v],
    whatever the logits, which only weigh them (the scores, renormalised, times route_scale); no
    selection bias, groups or expert scale then. logit_scale: the logits are first multiplied by it
    (Muse Spark's output_multiplier); logit_softcap: then logit_softcap * tanh(logits / logit_softcap)
    (Laguna's moe_router_logit_softcapping).
    identity: the rows of Z zero-computation experts the router also chooses among (`IdentityRows`;
    LongCat-Flash, ZAYA), None without: top_k, the softmax and the groups then span all E + Z choices.
    mlp: the MLP the router reads x through (`RouterMLP`, ZAYA's), None for a linear router: weight
    [E, R] then reads its features, and the router reads the state the layer before hands on.
    """

    weight: Tensor
    score_func: str
    top_k: int
    renormalize: bool
    route_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str | None = None
    bias: Tensor | None = None
    selection_bias: Tensor | None = None
    jitter_eps: float = 0.0
    select_on_logits: bool = False
    scaled_after_experts: bool = False
    expert_scale: Tensor | None = None
    input_norm: NormView | None = None
    token_experts: Tensor | None = None
    logit_softcap: float | None = None
    identity: IdentityRows | None = None
    logit_scale: float = 1.0
    mlp: RouterMLP | None = None

    def __post_init__(self):
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"router score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        _check_shape("router weight", self.weight, (None, None))
        E, D = self.weight.shape
        for name in ("bias", "selection_bias", "expert_scale"):
            _check_shape(f"router {name}", getattr(self, name), (E,))
        if self.input_norm is not None:
            _check_shape("router input norm weight", self.input_norm.weight, (D,))
        if self.mlp is not None:
            self._check_mlp()
        if self.score_func == "sparsemixer" and (self.expert_scale is not None or self.input_norm is not None):
            raise ValueError("a sparsemixer router takes no expert_scale or input_norm")
        if self.logit_softcap is not None:  # moelab's sparsemixer and hash routers would drop it (`native._router`)
            if not is_positive_finite(self.logit_softcap):
                raise ValueError(f"router logit_softcap must be a positive finite number (or None), got {self.logit_softcap!r}")
            if self.score_func == "sparsemixer":
                raise ValueError("a sparsemixer router takes no logit_softcap")
        if not is_positive_finite(self.logit_scale):
            raise ValueError(f"router logit_scale must be a positive finite number, got {self.logit_scale!r}")
        if self.logit_scale != 1.0 and self.score_func == "sparsemixer":
            raise ValueError("a sparsemixer router takes no logit_scale")
        if self.identity is not None:
            self._check_identity()
        check_top_k(self.top_k, self.num_choices)
        check_groups(self.num_choices, self.top_k, self.n_group, self.topk_group, self.min_group_size)
        if self.token_experts is not None:
            self._check_token_experts()

    def _check_identity(self) -> None:
        D, rows = self.weight.shape[1], self.identity
        _check_shape("router identity rows", rows.weight, (None, D))
        for name in ("bias", "selection_bias"):
            if (getattr(rows, name) is None) != (getattr(self, name) is None):
                raise ValueError(f"the router's identity rows must have a {name} where its experts' rows have one, and only there")
            _check_shape(f"router identity {name}", getattr(rows, name), (rows.count,))
        others = [name for name, on in (
            ("expert_scale", self.expert_scale is not None), ("token_experts", self.token_experts is not None),
            ("sparsemixer", self.score_func == "sparsemixer"),
        ) if on]  # fmt: skip
        if others:
            raise ValueError(f"a router with identity experts takes no {', '.join(others)}")

    def _check_mlp(self) -> None:
        if self.mlp.width != self.weight.shape[1]:
            raise ValueError(
                f"router weight {list(self.weight.shape)} reads its MLP's features, {self.mlp.width} wide (down "
                f"{list(self.mlp.down.shape)})"
            )
        others = [name for name, on in (
            ("input_norm", self.input_norm is not None), ("token_experts", self.token_experts is not None),
            ("sparsemixer", self.score_func == "sparsemixer"),
        ) if on]  # fmt: skip
        if others:
            raise ValueError(f"a router that reads x through an MLP takes no {', '.join(others)}")

    def _check_token_experts(self) -> None:
        table, E = self.token_experts, self.num_experts
        if table.dtype not in (torch.int64, torch.int32) or table.dim() != 2 or table.shape[1] != self.top_k:
            raise ValueError(
                f"router token_experts (hash routing) must be an int64 or int32 table [vocab, top_k={self.top_k}], got "
                f"{table.dtype} {list(table.shape)}"
            )
        if table.device.type != "meta" and table.numel() and not 0 <= int(table.min()) <= int(table.max()) < E:
            raise ValueError(f"router token_experts names experts outside 0..{E - 1}")
        others = [name for name, on in (
            ("selection_bias", self.selection_bias is not None), ("expert_scale", self.expert_scale is not None),
            ("n_group", self.n_group > 1), ("select_on_logits", self.select_on_logits),
            ("sparsemixer", self.score_func == "sparsemixer"), ("input_norm", self.input_norm is not None),
            ("logit_softcap", self.logit_softcap is not None), ("logit_scale", self.logit_scale != 1.0),
        ) if on]  # fmt: skip
        if others:
            raise ValueError(f"a hash-routed router (token_experts) takes no {', '.join(others)}")

    @property
    def num_experts(self) -> int:
        """E, the experts with weights (the rows of `weight`)."""
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """D, the width of the block's input the router reads (through its MLP where it has one)."""
        return self.weight.shape[1] if self.mlp is None else self.mlp.dim

    @property
    def identity_experts(self) -> int:
        """Z, the zero-computation experts it also chooses among (0 without)."""
        return 0 if self.identity is None else self.identity.count

    @property
    def num_choices(self) -> int:
        """E + Z, what top_k is taken among."""
        return self.num_experts + self.identity_experts

    def with_identity_rows(self, name: str) -> Tensor | None:
        """The router's tensor `name` over every choice: for "weight", "bias" and "selection_bias" the
        experts' rows, then the identity experts' ([E + Z, ...]); the tensor itself for the others
        (which a router with identity experts does not have); None where it has none."""
        rows, extra = getattr(self, name), getattr(self.identity, name, None)
        return rows if rows is None or extra is None else torch.cat([rows, extra.to(rows.dtype)])

    def with_rows(self, weight: Tensor, bias: Tensor | None) -> RouterView:
        """This router with new rows over every choice (`with_identity_rows`'s layout): weight
        [E + Z, D], bias [E + Z] or None, the last Z the identity experts'."""
        E = self.num_experts
        identity = self.identity
        if identity is not None:
            identity = dataclasses.replace(identity, weight=weight[E:], bias=None if bias is None else bias[E:])
        return dataclasses.replace(self, weight=weight[:E], bias=None if bias is None else bias[:E], identity=identity)

    @property
    def hash_routed(self) -> bool:
        """Whether the experts come from the token ids (`token_experts`), not from the logits."""
        return self.token_experts is not None

    @property
    def min_group_size(self) -> int:
        """Experts every group must hold (`moelab.nn.routers.min_group_size`)."""
        return min_group_size(self.score_func, self.n_group, self.group_score)


@dataclass(frozen=True, eq=False)
class ExpertsView:
    """E MLPs. Gated (gate set): y_e(x) = down_e @ act(gate_e @ x + gate_bias_e, up_e @ x + up_bias_e)
    + down_bias_e; plain (gate None): y_e(x) = down_e @ act(up_e @ x + up_bias_e) + down_bias_e.

    Gated activations: "silu": act(g, u) = silu(g) * u (SwiGLU). "clamped_swiglu" (GPT-OSS):
    g' = min(g, swiglu_limit), u' = clamp(u, -swiglu_limit, swiglu_limit),
    act = g' * sigmoid(swiglu_alpha * g') * (u' + 1). "capped_swiglu" (Step 3.7's bounded layers):
    act = min(silu(g), swiglu_limit) * clamp(u, -swiglu_limit, swiglu_limit). "gelu_tanh_glu" (Gemma 4):
    act = gelu_tanh(g) * u, GELU's tanh approximation (transformers' "gelu_pytorch_tanh").
    "gate_clamped_swiglu" (Hunyuan 4, DeepSeek-V4): act = silu(min(g, swiglu_limit)) *
    clamp(u, -swiglu_limit, swiglu_limit), the gate clamped before a plain SiLU. "softcapped_swiglu"
    (Inkling 2): act = softcap(g, gate_softcap) * sigmoid(g) * softcap(u, up_softcap),
    softcap(x, c) = c * tanh(x / c), in at least float32. Plain ones:
    "relu2" (Nemotron-H): act(u) = relu(u)²; "gelu" (exact, erf), "relu", "silu" (moelab's `MLPExperts`).
    scale_input: the routing weight w scales the expert's input, y = y_e(w * x) (Llama 4),
    instead of its output, y = w * y_e(x) (everyone else). output_norm: every expert's output is
    normed before its weight scales it, y = w * output_norm(y_e(x)) (Muse Spark's post_expert_norm,
    one norm for all experts: pruning and merging keep it as it is); gated experts only, not with
    scale_input.

    gate (None for a plain activation), up: [E, I, D]; down: [E, D, I]; gate_bias, up_bias: [E, I] |
    None; down_bias: [E, D] | None; output_norm weight: [D].
    """

    gate: Tensor | None
    up: Tensor
    down: Tensor
    gate_bias: Tensor | None = None
    up_bias: Tensor | None = None
    down_bias: Tensor | None = None
    activation: str = "silu"
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    gate_softcap: float | None = None
    up_softcap: float | None = None
    scale_input: bool = False
    output_norm: NormView | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"experts activation must be one of {ACTIVATIONS}, got {self.activation!r} (config.json's "
                "hidden_act); other activations are not supported yet"
            )
        _check_swiglu_settings("", self)
        kind, allowed = ("gated", GATED_ACTIVATIONS) if self.gated else ("plain", PLAIN_ACTIVATIONS)
        if self.activation not in allowed:
            raise ValueError(
                f"{kind} experts ({'with' if self.gated else 'no'} gate projection) take one of {allowed}, got "
                f"activation {self.activation!r}; other activations are not supported yet"
            )
        _check_shape("experts up", self.up, (None, None, None))
        E, I, D = self.up.shape
        _check_shape("experts gate", self.gate, (E, I, D))
        _check_shape("experts down", self.down, (E, D, I))
        if self.gate is None and self.gate_bias is not None:
            raise ValueError("plain experts (no gate projection) have no gate_bias")
        _check_shape("experts gate_bias", self.gate_bias, (E, I))
        _check_shape("experts up_bias", self.up_bias, (E, I))
        _check_shape("experts down_bias", self.down_bias, (E, D))
        if self.output_norm is not None:
            _check_shape("experts output norm weight", self.output_norm.weight, (D,))
            if not self.gated or self.scale_input:
                raise ValueError("an output norm is read for gated experts whose weight scales their output only")

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def matrices(self) -> tuple[str, ...]:
        """The names of the weight matrices the experts hold: gate (gated only), up, down."""
        return ("gate", "up", "down") if self.gated else ("up", "down")

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    @property
    def dim(self) -> int:
        return self.up.shape[2]

    @property
    def hidden_dim(self) -> int:
        return self.up.shape[1]


@dataclass(frozen=True, eq=False)
class SharedView:
    """Always-on expert(s), fused into one MLP of width Is, added to the routed output:
    y = down @ (silu(gate @ x) * (up @ x)) (SwiGLU; "clamped_swiglu": MiniMax-M3's, GPT-OSS's form,
    "capped_swiglu": Step 3.7's bounded form, "gelu_tanh_glu": Gemma 4's GELU-gated form,
    "gate_clamped_swiglu": Hunyuan 4's / DeepSeek-V4's gate-clamped form, "softcapped_swiglu": Inkling 2's
    softcapped form, see `ExpertsView`),
    or down @ act(up @ x) where gate
    is None and `activation` names a plain one (Nemotron-H: relu2); times sigmoid(sigmoid_gate @ x)
    if that is set (Qwen2-MoE); times output_scale (Cohere2-MoE's "average" strategy: 0.5).

    gate (or None), up: [Is, D]; down: [D, Is]; sigmoid_gate: [1, D] | None.
    """

    gate: Tensor | None
    up: Tensor
    down: Tensor
    sigmoid_gate: Tensor | None = None
    activation: str = "silu"
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    gate_softcap: float | None = None
    up_softcap: float | None = None
    output_scale: float = 1.0

    def __post_init__(self):
        if not is_positive_finite(self.output_scale):
            raise ValueError(f"shared experts: output_scale must be a positive finite number, got {self.output_scale!r}")
        if self.activation not in (PLAIN_ACTIVATIONS if self.gate is None else GATED_ACTIVATIONS):
            raise ValueError(
                f"shared experts: a gate projection with one of {GATED_ACTIVATIONS}, or none with one "
                f"of {PLAIN_ACTIVATIONS}; got activation {self.activation!r} and "
                f"{'no gate' if self.gate is None else 'a gate'}"
            )
        _check_swiglu_settings("shared experts: ", self)
        _check_shape("shared up", self.up, (None, None))
        Is, D = self.up.shape
        _check_shape("shared gate", self.gate, (Is, D))
        _check_shape("shared down", self.down, (D, Is))
        _check_shape("shared sigmoid_gate", self.sigmoid_gate, (1, D))


@dataclass(frozen=True, eq=False)
class LatentView:
    """The projections around a latent MoE block (Nemotron-H's moe_latent_size; moelab's
    `LatentProjection`): the router reads x, the routed experts run on down @ x, their weighted sum
    y is projected back as up @ y; the shared experts read x.

    down: [L, D]; up: [D, L].
    """

    down: Tensor
    up: Tensor

    def __post_init__(self):
        _check_shape("latent down", self.down, (None, None))
        L, D = self.down.shape
        _check_shape("latent up", self.up, (D, L))


@dataclass(frozen=True, eq=False)
class MoELayerView:
    """Decoder layer `index` has a sparse MoE feed-forward block; `latent`: its routed experts work
    in a projected latent space (`LatentView`); expert_norm, routed_norm: its routed experts read
    expert_norm(x) and their weighted sum is routed_norm(y) before the shared experts' output is
    added (Gemma 4); in a latent block they read expert_norm(down @ x) (Muse Spark's
    pre_expert_norm, [L]), and no routed_norm; output_bias: [D] | None, added to every token's block output last, whatever the
    routing (JetMoE's block bias: not per expert, so pruning and merging keep it as it is)."""

    index: int
    router: RouterView
    experts: ExpertsView
    shared: SharedView | None = None
    latent: LatentView | None = None
    expert_norm: NormView | None = None
    routed_norm: NormView | None = None
    output_bias: Tensor | None = None

    def __post_init__(self):
        E, D = self.router.num_experts, self.router.dim
        if self.output_bias is not None:
            try:
                _check_shape("block output bias", self.output_bias, (D,))
            except ValueError as err:
                raise ValueError(f"{err}: one entry per model dim, as the router's weight [{E}, {D}] reads") from None
        if self.latent is not None and self.routed_norm is not None:
            raise ValueError("a latent block with a norm of its experts' sum is not supported")
        if self.latent is not None and self.latent.down.shape[1] != D:
            raise ValueError(f"latent down {list(self.latent.down.shape)} does not match the model dim {D}")
        expert_dim = D if self.latent is None else self.latent.down.shape[0]
        for name, width in (("expert_norm", expert_dim), ("routed_norm", D)):
            if (norm := getattr(self, name)) is not None:
                _check_shape(f"{name} weight", norm.weight, (width,))
        if (self.experts.num_experts, self.experts.dim) != (E, expert_dim):
            where = "the model dim" if self.latent is None else "the latent dim"
            raise ValueError(
                f"router weight {list(self.router.weight.shape)} ([experts, dim]) and {where} {expert_dim} do not "
                f"match experts up {list(self.experts.up.shape)} ([experts, hidden, dim])"
            )
        if self.shared is not None and self.shared.up.shape[1] != D:
            raise ValueError(f"shared up {list(self.shared.up.shape)} does not match the model dim {D}")


@dataclass(frozen=True)
class DenseLayerView:
    """Decoder layer `index` has a dense feed-forward block (no experts)."""

    index: int


LayerView = MoELayerView | DenseLayerView


class LayerReader(Protocol):
    """What a `ModelView` needs from an adapter."""

    name: str

    def read_layer(
        self, checkpoint: Checkpoint, config: dict[str, Any], index: int, experts_from: Checkpoint | None = None
    ) -> LayerView: ...

    def read_experts(
        self, checkpoint: Checkpoint, config: dict[str, Any], index: int, experts: range
    ) -> ExpertsView: ...


class ModelView:
    """A checkpoint directory seen as `num_layers` layer views; `layer(i)` reads layer i's
    tensors only, `layers()` yields them one at a time. Use `moelab.hf.open_checkpoint` to make one.

    config: the parsed config.json; family: the adapter's name (a model_type, or
    "<model_type> (structural)" for the fallback); mtp_layers: the indices past `num_layers` of
    the multi-token prediction layers with routed experts (`Family.mtp_layers`), which `layer`
    reads too; moe_block: the decoder layer's module that is its MoE block, where the family names
    one (`Family.moe_block`: JetMoE's mlp).
    """

    def __init__(self, checkpoint: Checkpoint, config: dict[str, Any], adapter: LayerReader, num_layers: int):
        if not is_int(num_layers) or num_layers < 1:
            raise CheckpointError(
                f"config.json in {checkpoint.directory} gives {num_layers!r} as the number of layers; expected an "
                "integer >= 1 (num_hidden_layers or the family's equivalent)"
            )
        check_no_layers_beyond(checkpoint, config, adapter, num_layers)
        self.path = checkpoint.directory
        self.config = config
        self.family = adapter.name
        self.num_layers = num_layers
        self.mtp_layers: list[int] = list(getattr(adapter, "mtp_layers", []))
        self.moe_block: str | None = getattr(adapter, "moe_block", None)  # `Family.moe_block`
        self._adapter = adapter
        self._checkpoint = checkpoint

    def layer(self, index: int, *, routed: bool = True) -> LayerView:
        """Layer `index`; routed=False: its routed experts as meta tensors (shapes and dtypes, nothing
        read), the router and shared experts read (e.g. to keep the experts elsewhere)."""
        if routed:
            return self._read(index, self._adapter.read_layer)
        meta = self._checkpoint.with_shapes_only()
        try:
            return self._read(index, lambda ckpt, config, i: self._adapter.read_layer(ckpt, config, i, meta))
        finally:
            meta.close()

    def experts(self, index: int, experts: range) -> ExpertsView:
        """Routed experts `experts` (a step-1 range) of MoE layer `index`, read alone (the rest of
        the layer and the other experts are not read): loading one expert at a time."""
        return self._read(index, lambda ckpt, config, i: self._adapter.read_experts(ckpt, config, i, experts))

    def _read(self, index: int, read):
        if not 0 <= index < self.num_layers and index not in self.mtp_layers:
            mtp = f" and the multi-token prediction layers {self.mtp_layers}" if self.mtp_layers else ""
            raise IndexError(f"layer index {index} out of range: the model has {self.num_layers} layers{mtp}")
        try:
            return read(self._checkpoint, self.config, index)
        except CheckpointError:
            raise
        except ValueError as err:
            raise CheckpointError(f"{self.path}, layer {index}: {err}") from err
        except (TypeError, ArithmeticError) as err:  # a config.json value of the wrong type, a zero step, ...
            raise CheckpointError(
                f"{self.path}, layer {index}: {err}; check the values in config.json"
            ) from err

    def layers(self) -> Iterator[LayerView]:
        for index in range(self.num_layers):
            yield self.layer(index)

    def check(self) -> None:
        """Read every layer with shapes and dtypes only (shard headers, no weights), so that a
        checkpoint whose tensors do not match its config.json fails here with a CheckpointError
        naming the layer, before anything loads the weights."""
        with ModelView(
            self._checkpoint.with_shapes_only(), self.config, self._adapter, self.num_layers
        ) as meta:
            for _ in meta.layers():
                pass
            for index in meta.mtp_layers:
                meta.layer(index)

    def close(self) -> None:
        self._checkpoint.close()

    def __enter__(self) -> ModelView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelView({str(self.path)!r}, family={self.family!r}, num_layers={self.num_layers})"


def stored_layers(checkpoint: Checkpoint, layer_prefix: str) -> dict[int, list[str]]:
    """{decoder layer index: its tensor names} of the tensors stored under `layer_prefix`
    ("model.layers.{n}."), in checkpoint order."""
    head, _, tail = layer_prefix.partition("{n}")
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    found: dict[int, list[str]] = {}
    for key in checkpoint.keys():
        if match := pattern.match(key):
            found.setdefault(int(match[1]), []).append(key)
    return found


def check_no_layers_beyond(
    checkpoint: Checkpoint, config: dict[str, Any], adapter: LayerReader, num_layers: int
) -> None:
    """Refuse a checkpoint that stores decoder layers past config.json's layer count (a DeepSeek
    checkpoint's next-token-prediction layers, num_nextn_predict_layers, aside): config.json does
    not describe these weights, and reading only its first layers would give another model."""
    prefix = getattr(adapter, "layer_prefix", None)
    if prefix is None or "{n}" not in prefix:
        return
    nextn = config.get("num_nextn_predict_layers")
    limit = num_layers + (nextn if is_int(nextn) and nextn > 0 else 0)
    extra = sorted(i for i in stored_layers(checkpoint, prefix) if i >= limit)
    if extra:
        raise CheckpointError(
            f"{checkpoint.directory}: the checkpoint holds layers {extra[:3]}{' ...' if len(extra) > 3 else ''} but "
            f"config.json has {num_layers}; config.json does not describe these weights (fix its layer count)"
        )


def _check_swiglu_settings(where: str, view: ExpertsView | SharedView) -> None:
    """swiglu_alpha is set exactly for "clamped_swiglu", swiglu_limit for it, "capped_swiglu" and
    "gate_clamped_swiglu" (SWIGLU_LIMIT_ACTIVATIONS), gate_softcap and up_softcap for "softcapped_swiglu"."""
    activation, softcapped = view.activation, view.activation == "softcapped_swiglu"
    if (view.swiglu_alpha is not None) != (activation == "clamped_swiglu") or (view.swiglu_limit is not None) != (
        activation in SWIGLU_LIMIT_ACTIVATIONS
    ):
        raise ValueError(
            f"{where}swiglu_alpha is set exactly when activation is 'clamped_swiglu', swiglu_limit exactly when it "
            "is 'clamped_swiglu', 'capped_swiglu' or 'gate_clamped_swiglu'"
        )
    caps = (view.gate_softcap, view.up_softcap)
    if any((cap is not None) != softcapped for cap in caps) or softcapped and not all(map(is_positive_finite, caps)):
        raise ValueError(
            f"{where}gate_softcap and up_softcap are positive finite numbers exactly when activation is "
            f"'softcapped_swiglu', got activation {activation!r} with gate_softcap={view.gate_softcap!r}, "
            f"up_softcap={view.up_softcap!r}"
        )


def _check_shape(name: str, tensor: Tensor | None, expected: tuple[int | None, ...]) -> None:
    """tensor is None, or floating point with len(expected) dims matching every non-None entry."""
    if tensor is None:
        return
    if not tensor.is_floating_point():
        raise ValueError(
            f"{name} has dtype {tensor.dtype}, expected floating-point weights (integer or quantized "
            "weights need dequantizing first)"
        )
    shape = tuple(tensor.shape)
    matches = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not matches:
        want = ", ".join("?" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} has shape {list(shape)}, expected [{want}]")
