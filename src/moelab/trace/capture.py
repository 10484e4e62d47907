"""Capture routing with forward hooks: which experts each token chose, with what weight.

Shape legend: T tokens of one forward call (B*S, flattened row-major), D model dim, E routed
experts, K slots per token.

    with RoutingCapture(model, view) as capture:   # view: a moelab.hf ModelView (HF models only)
        model(ids)                                 # or model.generate(...): hooks fire every step
        routing = capture.pop()                    # {layer: LayerRouting} of the calls since the last pop

moelab models: a hook on each MoE layer's router returns its `Routing` as computed.
transformers models: a hook on each MoE block's router input recomputes the routing with the
family's rule from the checkpoint view (`moelab.hf.moe_layer_from_view(...).router`: logits,
score function, top-k, groups, correction bias, renormalisation, scale), and a hook on the
experts module reads what the block actually used (`experts(hidden, top_k_index,
top_k_weights)`; Llama 4 style routers that return dense scores `[T, E]` instead). The recorded
choice is what the block used; `checks` counts the tokens where the recomputation disagrees.

With `expert_stats`, each expert's largest |down-projection output| over the tokens routed to
it is kept (`expert_max`, and `shared_max` for shared experts): the Super Experts statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.hf import ModelView, MoELayerView, moe_layer_from_view, open_checkpoint
from moelab.hf.edit import route_tokens
from moelab.hf.modules import decoder_layers, find_moe_modules, is_transformers_model
from moelab.hf.native import experts_from_view
from moelab.hf.view import ExpertsView
from moelab.nn import MoELayer
from moelab.nn.routers import Router, Routing


@dataclass
class LayerRouting:
    """What one MoE layer did on T tokens.

    indices: [T, K] int64 chosen experts (-1 = empty slot); weights: [T, K] float32 combine
    weights; entropy: [T] float32 entropy in bits of the router's distribution over experts;
    logits: [T, E] float32 raw router logits, or None when not recorded.
    """

    indices: Tensor
    weights: Tensor
    entropy: Tensor
    logits: Tensor | None = None

    @classmethod
    def from_routing(cls, routing: Routing) -> LayerRouting:
        return cls(
            routing.indices.detach().long(),
            routing.weights.detach().float(),
            entropy_bits(routing.probs.detach().float()),
            routing.logits.detach().float(),
        )

    @classmethod
    def cat(cls, parts: list[LayerRouting]) -> LayerRouting:
        """Concatenate along tokens (parts in call order)."""
        logits = None if any(p.logits is None for p in parts) else torch.cat([p.logits for p in parts])
        indices, weights, entropy = (
            torch.cat([getattr(p, name) for p in parts]) for name in ("indices", "weights", "entropy")
        )
        return cls(indices, weights, entropy, logits)


@dataclass
class RoutingCheck:
    """Recomputed routing (from the view) against what a transformers block used.

    tokens: tokens compared; mismatched: tokens whose set of chosen experts differs;
    max_weight_error: largest |weight difference| over the tokens that agree.
    """

    tokens: int = 0
    mismatched: int = 0
    max_weight_error: float = 0.0

    def update(self, recomputed: LayerRouting, used: LayerRouting) -> None:
        a_idx, a_order = recomputed.indices.sort(-1)
        b_idx, b_order = used.indices.sort(-1)
        same = (a_idx == b_idx).all(-1)
        self.tokens += same.numel()
        self.mismatched += int((~same).sum())
        if same.any():
            error = recomputed.weights.gather(-1, a_order) - used.weights.gather(-1, b_order)
            self.max_weight_error = max(self.max_weight_error, float(error[same].abs().max()))


def entropy_bits(probs: Tensor) -> Tensor:
    """probs: [T, E] rows summing to 1 -> [T] entropy in bits (0 log 0 = 0)."""
    return torch.special.entr(probs).sum(-1) / math.log(2)


@dataclass
class _LayerTap:
    """The hooks' state for one MoE layer."""

    index: int
    num_experts: int
    top_k: int
    has_shared: bool = False
    identity: int = 0  # the last `identity` of the num_experts choices are identity experts (no weights, no statistic)
    identity_returns: str = "input"  # what a slot on one returns: its input, or nothing (ZAYA's skip expert)
    # whose slots the block hands its experts as expert 0 with weight 0 (transformers' ZAYA)
    identity_masked: bool = False
    parts: list[LayerRouting] = field(default_factory=list)
    pending: LayerRouting | None = None  # recomputed by the router hook, waiting for the experts hook
    dense_scores: Tensor | None = None  # [T, E] from a router that returns dense scores
    sorted_choice: tuple[Tensor, Tensor] | None = None  # (indices, weights) [T, K] a sorting router handed on
    check: RoutingCheck = field(default_factory=RoutingCheck)
    expert_max: Tensor | None = None
    shared_max: Tensor | None = None

    def __post_init__(self):
        self.expert_max = torch.zeros(self.num_experts)
        self.shared_max = torch.zeros(1)

    def record_expert_max(self, experts: Tensor, values: Tensor) -> None:
        """experts: [N] expert of each row (-1 = none); values: [N] the row's max |output|."""
        keep = experts >= 0
        self.expert_max.scatter_reduce_(0, experts[keep].cpu(), values[keep].float().cpu(), "amax")

    def record_shared(self, output: Tensor) -> None:
        self.shared_max = torch.maximum(
            self.shared_max, output.detach().float().abs().amax().cpu().reshape(1)
        )


class RoutingCapture:
    """Forward hooks on every MoE layer of a moelab `MoETransformer` or a transformers model.

    model: the model to watch; view: its checkpoint view (transformers models only; default:
    opened from `model.name_or_path`). expert_stats: also keep each expert's max |down output|
    (costs one extra pass through the experts for transformers models). Use as a context
    manager, or call `close()` to remove the hooks.

    layers: MoE layer indices; num_experts, top_k: per MoE layer; family: "moelab" or the
    transformers model_type.
    """

    def __init__(self, model: nn.Module, view: ModelView | None = None, *, expert_stats: bool = True):
        self.expert_stats = expert_stats
        self._handles: list = []
        self._taps: dict[int, _LayerTap] = {}
        try:
            if is_transformers_model(model):
                view = view or open_checkpoint(model.name_or_path)
                self.family = view.family
                self._hook_transformers(model, view)
            else:
                self.family = "moelab"
                self._hook_moelab(model)
        except BaseException:
            self.close()
            raise
        if not self._taps:
            raise ValueError(
                f"{type(model).__name__} has no MoE layers to trace (every layer is dense); "
                "pass a model with at least one MoE layer"
            )

    @property
    def layers(self) -> list[int]:
        return sorted(self._taps)

    @property
    def num_experts(self) -> dict[int, int]:
        return {i: tap.num_experts for i, tap in sorted(self._taps.items())}

    @property
    def identity_experts(self) -> dict[int, int]:
        """{layer: the identity experts among its num_experts choices, the last ones}."""
        return {i: tap.identity for i, tap in sorted(self._taps.items())}

    @property
    def identity_returns(self) -> str:
        """What a slot on an identity expert returns in this model: "input", or "zero" (a skip expert)."""
        return "zero" if any(tap.identity_returns == "zero" for tap in self._taps.values()) else "input"

    @property
    def top_k(self) -> dict[int, int]:
        return {i: tap.top_k for i, tap in sorted(self._taps.items())}

    @property
    def checks(self) -> dict[int, RoutingCheck]:
        return {i: tap.check for i, tap in sorted(self._taps.items())}

    @property
    def expert_max(self) -> dict[int, Tensor]:
        """{layer: [E] max |down-projection output| per routed expert} (zeros without expert_stats)."""
        return {i: tap.expert_max for i, tap in sorted(self._taps.items())}

    @property
    def shared_max(self) -> dict[int, Tensor]:
        """{layer: [1] max |down-projection output| of the shared experts}, layers that have them."""
        return {i: tap.shared_max for i, tap in sorted(self._taps.items()) if tap.has_shared}

    def pop(self) -> dict[int, LayerRouting]:
        """The routing recorded since the last pop, {layer: LayerRouting over those tokens}."""
        missing = [i for i, tap in self._taps.items() if not tap.parts]
        if missing and len(missing) < len(self._taps):
            raise RuntimeError(f"MoE layers {missing} recorded nothing while others did; were hooks removed?")
        out = {i: LayerRouting.cat(tap.parts) for i, tap in sorted(self._taps.items()) if tap.parts}
        for tap in self._taps.values():
            tap.parts = []
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RoutingCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ moelab models

    def _hook_moelab(self, model: nn.Module) -> None:
        blocks = getattr(model, "layers", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(
                f"cannot trace {type(model).__name__}: expected a moelab MoETransformer (blocks in "
                "`.layers`) or a transformers model"
            )
        # {experts module: [the tap whose router ran last]}: ReXMoE's layers share one pool of experts,
        # whose calls belong to the layer that routed them, not to every layer hooked on it
        routed_last: dict[nn.Module, list[_LayerTap]] = {}
        for i, block in enumerate(blocks):
            layer = next((m for m in block.modules() if isinstance(m, MoELayer)), None)
            if layer is None:
                continue
            tap = self._taps[i] = _LayerTap(  # the router's choices: identity experts recorded as experts past E
                i, layer.router.num_experts, layer.router.top_k, layer.shared is not None, layer.identity_experts,
                identity_returns=layer.identity_returns,
            )
            current = routed_last.get(layer.experts)
            if current is None:
                current = routed_last[layer.experts] = [tap]
                if self.expert_stats:
                    self._handles.append(layer.experts.register_forward_hook(_on_moelab_experts(current)))
            self._handles.append(layer.router.register_forward_hook(_on_moelab_routing(tap, current)))
            if self.expert_stats and layer.shared is not None:
                self._handles.append(layer.shared.down_proj.register_forward_hook(_on_shared(tap)))

    # ------------------------------------------------------------------ transformers models

    def _hook_transformers(self, model: nn.Module, view: ModelView) -> None:
        _, blocks = decoder_layers(model, view.num_layers)
        for i in range(view.num_layers):
            layer_view = view.layer(i)
            if not isinstance(layer_view, MoELayerView):
                continue
            router = moe_layer_from_view(layer_view).router  # the family's rule, with the view's weights
            # identity experts: choices past the experts; D: what the router's rows read (its MLP's width, ZAYA's)
            E, D = layer_view.router.num_choices, layer_view.router.weight.shape[1]
            found = find_moe_modules(blocks[i], i, E, D, view.moe_block)
            router_module, experts_module = (
                blocks[i].get_submodule(found.router),
                blocks[i].get_submodule(found.experts),
            )
            shared_down = None if found.shared_down is None else blocks[i].get_submodule(found.shared_down)
            returns = "input" if layer_view.router.identity is None else layer_view.router.identity.returns
            tap = self._taps[i] = _LayerTap(
                i, E, router.top_k, shared_down is not None, layer_view.router.identity_experts,
                identity_returns=returns, identity_masked=returns == "zero",
            )  # fmt: skip
            self._handles.append(
                router_module.register_forward_hook(_on_hf_router(tap, router), with_kwargs=True)
            )
            scale = router.route_scale if layer_view.router.scaled_after_experts else 1.0
            # a block whose experts are no module of their own (JetMoE's mlp runs input_linear / output_linear
            # itself), or whose experts module cannot run one slot a token (LongCat-Flash's squeezes a
            # single slot away): the view's experts give the statistic
            own = found.experts == found.block or layer_view.router.identity is not None
            viewed = layer_view.experts if own else None
            self._handles.append(
                experts_module.register_forward_hook(
                    _on_hf_experts(tap, experts_module, self.expert_stats, scale, viewed), with_kwargs=True
                )
            )
            if self.expert_stats and shared_down is not None:
                self._handles.append(shared_down.register_forward_hook(_on_shared(tap)))


# ---------------------------------------------------------------------- hook functions


def _on_moelab_routing(tap: _LayerTap, current: list[_LayerTap]):
    """Record the routing, and make `tap` the one its experts' next call (`current[0]`) belongs to."""

    def hook(module: Router, args, routing: Routing) -> None:
        tap.parts.append(LayerRouting.from_routing(routing))
        current[0] = tap

    return hook


def _on_moelab_experts(current: list[_LayerTap]):
    """Experts see rows grouped by expert, `(xs [N, D], counts, row_weights [N])`, and return
    each row's output times its routing weight; the statistic wants what each expert computed,
    so the rows are run again without the weights (never divided back out: a tiny weight would
    blow the quotient up). Experts that take the weight on their input (Llama 4) keep it. The
    maxima go to `current[0]`, the layer whose router ran last (layers may share the experts)."""

    def hook(module: nn.Module, args, ys: Tensor) -> None:
        tap = current[0]
        xs, counts = args[0], args[1]
        row_weights = args[2] if len(args) > 2 else None
        if isinstance(counts, Tensor):  # a training step's plan kept on the device: rows past the sum are empty slots
            counts = counts.tolist()
            xs, ys = xs[: sum(counts)], ys[: sum(counts)]
            row_weights = None if row_weights is None else row_weights[: sum(counts)]
        counts = list(counts)
        experts = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))
        if row_weights is not None and not getattr(module, "scale_input", False):
            with torch.no_grad():
                ys = module.forward(xs.detach(), counts)  # .forward: no hooks
            experts = experts.masked_fill(row_weights.detach().cpu() == 0, -1)  # padded or dropped rows
        tap.record_expert_max(experts, ys.detach().float().abs().amax(-1).cpu())

    return hook


def _on_shared(tap: _LayerTap):
    def hook(module: nn.Module, args, output: Tensor) -> None:
        tap.record_shared(output)

    return hook


def _on_hf_router(tap: _LayerTap, router: Router):
    """Recompute the routing from the router's input with the view's rule (a router that reads a
    per-token input, `Router.context_input`, from its second: a hash router's token ids, DeepSeek-V4's;
    an MLP router's state handed in, ZAYA's, None in its first layer); keep dense scores `[T, E]` when
    the router returns them (Llama 4: `(scores, logits)`)."""

    def hook(module: nn.Module, args, kwargs, output) -> None:
        inputs = [*args, *kwargs.values()]
        x = inputs[0].detach().reshape(-1, router.dim)
        extra = inputs[1] if router.context_input and len(inputs) > 1 else None
        ids = None if extra is None else extra.detach().reshape(len(x), *(() if router.reads_token_ids else (-1,)))
        with torch.no_grad():
            tap.pending = LayerRouting.from_routing(route_tokens(router, x, ids))
        tap.dense_scores = None
        if isinstance(output, tuple) and len(output) == 2 and output[0].shape == output[1].shape:
            tap.dense_scores = output[0].detach().reshape(-1, tap.num_experts).float()
        tap.sorted_choice = _sorted_choice(output, tap.top_k)

    return hook


def _sorted_choice(output, top_k: int) -> tuple[Tensor, Tensor] | None:
    """JetMoE's gating output (each slot's place in expert order, its token, its gate, the slots
    per expert as a list, the logits) -> the chosen (indices, weights) [T, K] in slot order; None for
    other routers' outputs."""
    if not (isinstance(output, tuple) and len(output) == 5 and isinstance(output[3], list)):
        return None
    order, _, gates, counts, _ = output
    experts = torch.repeat_interleave(torch.arange(len(counts), device=order.device), torch.tensor(counts, device=order.device))
    index = torch.empty_like(order).index_put_((order,), experts)
    weights = torch.empty(order.shape, dtype=torch.float32, device=order.device).index_put_((order,), gates.detach().float())
    return index.view(-1, top_k), weights.view(-1, top_k)


def _on_hf_experts(
    tap: _LayerTap, experts: nn.Module, expert_stats: bool, scale: float = 1.0, viewed: ExpertsView | None = None
):
    """Read what the block used: `experts(hidden [T, D], top_k_index [T, K], top_k_weights [T, K])`
    (times `scale` where the block scales the experts' sum afterwards), or the router's dense scores
    when the experts get pre-scaled rows (Llama 4); else (`experts` the whole block, its input the
    block's) the recomputed routing, and with expert_stats the experts `viewed` (the layer's view's,
    built as moelab's on first use) run on the block's input for it."""
    native: list[nn.Module] = []

    def viewed_experts(device: torch.device) -> nn.Module:
        if not native:
            native.append(experts_from_view(viewed).to(device))
        return native[0]

    def hook(module: nn.Module, args, kwargs, output: Tensor) -> None:
        recomputed, tap.pending = tap.pending, None
        if recomputed is None:
            raise RuntimeError(f"layer {tap.index}: the experts ran without the router hook firing first")
        inputs = [*args, *kwargs.values()]
        if len(inputs) >= 3:
            hidden, index, weights = (t.detach() for t in inputs[:3])
            index = index.reshape(-1, index.shape[-1]).long()
            index = index.masked_fill((index < 0) | (index >= tap.num_experts), -1)
            weights = weights.reshape(index.shape).float() * scale
            if tap.identity_masked:  # a slot the recomputed routing gives the skip expert: that, not expert 0
                skipped = (recomputed.indices >= tap.num_experts - tap.identity) & (weights == 0)
                index = torch.where(skipped, recomputed.indices, index)
                weights = torch.where(skipped, recomputed.weights, weights)
            used = LayerRouting(index, weights, recomputed.entropy, recomputed.logits)
            if expert_stats:
                computed = index.masked_fill(index >= tap.num_experts - tap.identity, -1)
                if viewed is None:
                    _slotwise_expert_max(tap, experts, hidden.reshape(-1, hidden.shape[-1]), computed)
                else:
                    _viewed_expert_max(tap, viewed_experts(hidden.device), hidden, computed)
        elif tap.dense_scores is not None:
            weights, index = tap.dense_scores.topk(tap.top_k, dim=-1)
            used = LayerRouting(index, weights, recomputed.entropy, recomputed.logits)
            if expert_stats:  # output: [E * T, D], expert-major; rows of unchosen experts are 0
                per_expert = output.detach().reshape(tap.num_experts, -1).abs().amax(-1)
                tap.record_expert_max(torch.arange(tap.num_experts), per_expert)
        else:
            if expert_stats and viewed is not None:
                _viewed_expert_max(tap, viewed_experts(inputs[0].device), inputs[0].detach(), recomputed.indices)
            if tap.sorted_choice is None:  # nothing says what the block chose: the recomputed routing
                tap.parts.append(recomputed)
                return
            index, weights = tap.sorted_choice
            used = LayerRouting(index, weights * scale, recomputed.entropy, recomputed.logits)
        tap.check.update(recomputed, used)
        tap.parts.append(used)

    return hook


@torch.no_grad()
def _viewed_expert_max(tap: _LayerTap, experts: nn.Module, hidden: Tensor, index: Tensor) -> None:
    """Run moelab's `experts` (a layer's view's) on the rows hidden [..., D] sends them (index [T, K],
    -1 or an identity expert: none), unweighted; keep the max |value| per expert."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    flat = index.reshape(-1)
    tokens = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    computed = (flat >= 0) & (flat < experts.num_experts)
    chosen, tokens = flat[computed], tokens[computed]
    order = chosen.argsort(stable=True)
    chosen, tokens = chosen[order], tokens[order]
    counts = torch.bincount(chosen, minlength=experts.num_experts).tolist()
    dtype = next(experts.parameters()).dtype
    with torch.no_grad():
        ys = experts.forward(hidden[tokens].to(dtype), counts)  # .forward: no hooks
    tap.record_expert_max(chosen, ys.float().abs().amax(-1))


def _slotwise_expert_max(tap: _LayerTap, experts: nn.Module, hidden: Tensor, index: Tensor) -> None:
    """Run the experts once per slot with unit weights, so each token's output is exactly its
    slot expert's down projection; keep the max |value| per expert."""
    for k in range(index.shape[1]):
        slot = index[:, k]
        rows = (slot >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        ones = torch.ones(rows.numel(), 1, dtype=hidden.dtype, device=hidden.device)
        out = experts.forward(hidden[rows], slot[rows, None], ones)  # .forward: no hooks
        tap.record_expert_max(slot[rows], out.reshape(rows.numel(), -1).abs().amax(-1))
