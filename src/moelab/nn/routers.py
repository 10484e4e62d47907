"""Routers: decide which experts each token visits and with what weight.

Shape legend: T tokens, D model dim, E routed experts, K slots per token (the fixed top-k, or
the cap for routers that pick a variable number of experts per token).

Every router maps `x: [T, D]` to a `Routing` of plain tensors. Variable-k routers mark unused
slots with expert index -1 and weight 0; dispatch skips them. Router maths runs in float32
whatever the input dtype (but `MLPRouter`'s, which rounds as transformers' ZAYA router does).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from moelab.nn.hooks import forward_hooked
from moelab.validation import is_int, is_number, is_positive_finite

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORES = ("max", "top2")  # how a group-limited router scores a group (`group_scoring`)


class Routing(NamedTuple):
    """What a router decided, as plain tensors.

    indices: [T, K] int64 expert per slot; -1 marks an empty slot (variable-k routers).
    weights: [T, K] float32 combine weight per slot; 0 for empty slots.
    logits:  [T, E] float32 raw router logits (z-loss, traces).
    probs:   [T, E] float32 per-token distribution over experts (balance and entropy losses).
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor
    probs: Tensor


NON_FINITE_LOGITS = (
    "router logits contain NaN or Inf: the layer input or the router weight is not finite "
    "(check the previous layer, the learning rate, or use gradient clipping)"
)
_deferring = threading.local()


@contextlib.contextmanager
def deferred_logit_check() -> Iterator[list[Tensor]]:
    """Routers called inside (on this thread) do not check their logits on the host, a read back
    that on a GPU waits for the device at every layer: `router_logits` appends to the yielded
    list whether its logits (before any masking of experts) were all finite, a [] bool tensor,
    and the caller checks later (`MoELayer.forward` on its no-synchronisation path:
    `MoEResult.logits_finite`)."""
    previous = getattr(_deferring, "flags", None)
    _deferring.flags = flags = []
    try:
        yield flags
    finally:
        _deferring.flags = previous


def _float(t: Tensor) -> Tensor:
    """t in float32 (`t.float()`, whose call costs ~1 us of a decode step's router even where t
    already is float32, so it is skipped there)."""
    return t if t.dtype == torch.float32 else t.float()


def expert_scores(logits: Tensor, score_func: str) -> Tensor:
    """logits [T, E] -> scores [T, E]: softmax over the experts, or per expert sigmoid or
    sqrt(softplus) (DeepSeek-V4's "sqrtsoftplus")."""
    if score_func == "softmax":
        return logits.softmax(-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits).sqrt()


def _all_finite(logits: Tensor) -> bool:
    """Whether every logit is finite (read back to the host). On a CPU one float64 sum, which
    cannot overflow on float32 numbers, so it is finite iff every logit is: 2.7 against 6.1 us for
    `isfinite(logits).all()` on a decode step's [1, 8] logits."""
    if logits.device.type == "cpu":
        return math.isfinite((logits.detach() if logits.requires_grad else logits).sum(dtype=torch.float64))
    return bool(torch.isfinite(logits).all())


class Router(nn.Module):
    """Base class: a linear gate `weight: [E, D]` (optional bias) evaluated in float32, on the
    input as given or, where the router has an `input_norm` (Gemma 4's: `ScaledRMSNorm`), normed.

    Subclasses set `top_k` (slots per token), `variable_k` (slots may be empty), `causal`
    (the routing of token t depends on tokens <= t only, so it is safe in a causal language
    model), `needs_sequences` (forward takes `x: [B, S, D]` and a `context` dict instead of
    `x: [T, D]`, for routers that look at other tokens of the sequence) and `context_input`
    (the name of a per-token input forward takes beside x, from an MoE layer's `context`:
    "input_ids", `forward(x [T, D], token_ids [T])`, hash routing; "router_states",
    `forward(x [T, D], states [T, R] | None)`, a router MLP's carried state, `MLPRouter`).
    """

    variable_k: bool = False
    causal: bool = True
    needs_sequences: bool = False
    context_input: str | None = None

    @property
    def reads_token_ids(self) -> bool:
        """Whether forward takes the tokens' ids beside x (hash routing)."""
        return self.context_input == "input_ids"

    def __init__(self, dim: int, num_experts: int, *, bias: bool = False):
        super().__init__()
        _check_positive(dim=dim, num_experts=num_experts)
        self.dim = dim
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.input_norm: nn.Module | None = None
        self.logit_softcap: float | None = None
        self.logit_scale = 1.0
        nn.init.normal_(self.weight, std=dim**-0.5)

    def unscaled_logits(self, x: Tensor, *inputs: Tensor | None) -> Tensor:
        """x: [T, D] (and the `context_input` where the router reads one) -> x @ weight.T + bias [T, E]
        in float32, x through `input_norm` where set: the logits before `logit_scale` and the cap."""
        if self.input_norm is not None:
            x = self.input_norm(x)
        bias = None if self.bias is None else _float(self.bias)
        return F.linear(_float(x), _float(self.weight), bias)

    def router_logits(self, x: Tensor, *inputs: Tensor | None, check: bool = True) -> Tensor:
        """x: [T, D] (and the `context_input` where the router reads one) -> logits [T, E] in float32,
        times `logit_scale` (Muse Spark's output_multiplier), soft-capped to cap * tanh(logits / cap)
        where the router has a `logit_softcap` (Laguna's); rejects bad shapes and (check) non-finite
        logits (`check_finite_logits`)."""
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"router expects x of shape [tokens, {self.dim}], got {list(x.shape)}; "
                "flatten leading dims with x.reshape(-1, dim)"
            )
        if not x.is_floating_point():
            raise ValueError(f"router expects a floating-point input, got {x.dtype}")
        logits = self.unscaled_logits(x, *inputs)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if check:
            check_finite_logits(logits)  # before capping: tanh would turn an inf logit into the cap
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def choose(self, x: Tensor, *args) -> tuple[Tensor, Tensor]:
        """The inference path's routing: x: [T, D] (and what `forward` takes besides: a hash
        router's token ids) -> (indices, weights) [T, K] of `forward(x, ...)`, where a router may
        skip what only training and traces use (the logits' other uses)."""
        routing = self(x, *args)
        return routing.indices, routing.weights


def check_finite_logits(logits: Tensor) -> None:
    """Raise if `logits` are not all finite; inside `deferred_logit_check`, leave it to the caller;
    skipped where compiled."""
    deferred = getattr(_deferring, "flags", None)
    if deferred is not None:
        deferred.append(torch.isfinite(logits).all())
    elif not torch.compiler.is_compiling() and not _all_finite(logits):
        raise ValueError(NON_FINITE_LOGITS)


BALANCING_BUFFERS = ("selection_bias", "tokens_per_expert")  # float32 whatever the router's dtype


@dataclass(frozen=True)
class ComputeBudget:
    """LongCat-Flash's computation budget for a router whose choices past its first `num_experts`
    are zero-computation experts: the selection bias steers the experts' average count per token
    to `target` (the paper's K_e) instead of balancing every choice (`TopKRouter.update_selection_bias`)."""

    num_experts: int
    target: float


class TopKRouter(Router):
    """Token-choice top-k (Switch, GShard, Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2/V3/V4).

    scores = softmax(logits), sigmoid(logits) or sqrt(softplus(logits)) (`expert_scores`). Selection uses `scores + selection_bias` (the
    aux-loss-free balancing bias, a buffer moved by `update_selection_bias`, never by gradients),
    or with `select_on_logits` `logits + selection_bias` (Kolibri1 biases the logits it picks from),
    optionally limited to the best `topk_group` of `n_group` expert groups, each scored by
    `group_score` (`group_scoring`: its best expert, or the sum of its two best). The combine
    weights are the un-biased scores of the chosen experts, renormalised to sum to one if
    `renormalize`, times `route_scale`, and, with `expert_scale`, times the chosen expert's own
    scale (a parameter [E], Gemma 4's per_expert_scale). input_norm: a module the router reads its
    input through (`Router`). logit_scale: the logits are first multiplied by it (Muse Spark's
    output_multiplier); logit_softcap: then cap * tanh(logits / cap), before all of this (Laguna's
    moe_router_logit_softcapping). budget: how `update_selection_bias` moves the bias where some
    choices are zero-computation experts (`ComputeBudget`), None: toward equal loads.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        renormalize: bool = True,
        route_scale: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        group_score: str | None = None,
        selection_bias: bool = False,
        select_on_logits: bool = False,
        bias: bool = False,
        expert_scale: bool = False,
        input_norm: nn.Module | None = None,
        logit_softcap: float | None = None,
        logit_scale: float = 1.0,
        budget: ComputeBudget | None = None,
    ):
        super().__init__(dim, num_experts, bias=bias)
        check_top_k(top_k, num_experts)
        if budget is not None:
            _check_budget(budget, num_experts, top_k, selection_bias)
        if logit_softcap is not None and not is_positive_finite(logit_softcap):
            raise ValueError(f"logit_softcap must be a positive finite number (or None), got {logit_softcap!r}")
        if not is_positive_finite(logit_scale):
            raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
        check_route_scale(route_scale)
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        check_groups(num_experts, top_k, n_group, topk_group)
        if select_on_logits and n_group > 1:
            raise ValueError(
                "select_on_logits with expert groups is not defined (groups are scored on the scores); "
                "use n_group=1 or select on the scores"
            )
        self.top_k = top_k
        self.score_func = score_func
        self.renormalize = renormalize
        self.route_scale = route_scale
        self.n_group = n_group
        self.topk_group = topk_group
        self.group_score = group_scoring(score_func, group_score)
        self.select_on_logits = select_on_logits
        self.expert_scale = nn.Parameter(torch.ones(num_experts)) if expert_scale else None
        self.input_norm = input_norm
        self.logit_softcap = logit_softcap
        self.logit_scale = logit_scale
        self.budget = budget
        # Aux-loss-free balancing (DeepSeek-V3): the bias changes which experts are chosen, not
        # the combine weights. tokens_per_expert counts load in training forwards (training mode, with
        # gradients) for the update.
        self.register_buffer("selection_bias", torch.zeros(num_experts) if selection_bias else None)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts) if selection_bias else None, persistent=False
        )

    @property
    def masked(self) -> Tensor | None:
        """[E] bool, the experts this router may choose where some may not (ReXMoE's progressive
        scaling, `moelab.nn.rexmoe`), else None."""
        return None

    def forward(self, x: Tensor, *inputs: Tensor | None) -> Routing:
        logits = self.router_logits(x, *inputs)
        masked = self.masked
        if masked is not None:  # ReXMoE's progressive scaling: masked experts score 0
            logits = logits.masked_fill(~masked, float("-inf"))
        scores = self.scores(logits, x)
        choice = logits if self.select_on_logits else scores
        choice = choice if self.selection_bias is None else choice + self.selection_bias
        if masked is not None:
            choice = choice.masked_fill(~masked, float("-inf"))
        if self.n_group > 1:
            choice = self._limit_to_groups(choice)
        if choice is scores:  # the chosen scores come with the choice
            weights, indices = scores.topk(self.top_k, dim=-1)
        else:
            indices = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        if self.expert_scale is not None:
            weights = weights * _float(self.expert_scale)[indices]
        if self.selection_bias is not None and self.training and torch.is_grad_enabled():
            with torch.no_grad():  # a scatter-add, not bincount: no read back to the host
                flat = indices.flatten()
                self.tokens_per_expert.index_add_(0, flat, torch.ones_like(flat, dtype=self.tokens_per_expert.dtype))
        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        return Routing(indices, weights, logits, probs)

    def scores(self, logits: Tensor, x: Tensor) -> Tensor:
        """logits [T, E] of x [T, D] -> the scores [T, E] in float32 the router selects and weighs by
        (`expert_scores`)."""
        return expert_scores(logits, self.score_func)

    def choose(self, x: Tensor, *inputs: Tensor | None) -> tuple[Tensor, Tensor]:
        """`Router.choose`. Softmax scores renormalised over the top k (Mixtral, Qwen-MoE, OLMoE),
        without a selection bias, groups or hooks: the top k of the logits and a softmax over just
        those (p_i / sum of the chosen p_j = exp(l_i) / sum of the chosen exp(l_j)), 2 operations
        instead of 5, and only they are checked (a NaN or +inf logit ranks first in `topk`; a -inf
        one outside the top k weighs 0 either way; logits one float32 step apart whose softmax
        rounds to one value may rank otherwise than `forward`'s probabilities do). A decode step of
        the shipped models ran 1.04-1.07x faster (docs/benchmarks.md)."""
        plain = self.score_func == "softmax" and self.renormalize and self.n_group == 1
        replaced = "router_logits" in vars(self)  # an instance's own logits (`moelab.hf.edit`'s masks)
        others = (  # an or-chain, no tuple or generator: a decode step asks at every layer
            replaced or self.selection_bias is not None or self.masked is not None or self.expert_scale is not None
            or self.logit_softcap is not None  # its cap would hide an inf logit from the check of the top k
        )
        if not plain or others or inputs or forward_hooked([self]):
            return super().choose(x, *inputs)
        values, indices = self.router_logits(x, check=False).topk(self.top_k, dim=-1)
        check_finite_logits(values)
        weights = values.softmax(-1)
        return indices, weights if self.route_scale == 1.0 else weights * self.route_scale

    def _limit_to_groups(self, choice: Tensor) -> Tensor:
        """Keep the `topk_group` best groups (group score: the sum of its best min(2, size) for
        "top2", its best for "max") and mask the other groups' experts to -inf. transformers' Mistral 4
        router masks them to 0.0: the same choice, as `check_groups` keeps top_k <= the kept groups'
        experts and a softmax's scores are > 0 (one that underflows to 0 may tie with a masked
        expert there, chosen with weight 0 either way)."""
        T, E = choice.shape
        grouped = choice.view(T, self.n_group, E // self.n_group)
        if self.group_score == "top2":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(-1)
        keep = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(choice.shape)

    @torch.no_grad()
    def update_selection_bias(self, rate: float, group: ProcessGroup | None = None) -> None:
        """b_e += rate * sign(mean load - load_e), then reset the load counter (DeepSeek-V3). With a
        `budget` (LongCat-Flash), b_i += rate * (K_e / (K N) - load_i / (K T)) for the N experts, the
        zero-computation experts' bias held, so that the N experts take K_e of a token's K slots on
        average, evenly (T: the tokens counted; the step is the gap in shares, not its sign).
        group: data-parallel ranks whose summed load decides (every rank then moves alike)."""
        if self.selection_bias is None:
            raise ValueError("update_selection_bias needs a router built with selection_bias=True")
        check_bias_rate(rate)
        load = self.tokens_per_expert
        if group is not None:
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            mask = self.masked
            if self.budget is not None:
                N, share = self.budget.num_experts, load[: self.budget.num_experts] / load.sum()
                self.selection_bias[:N] += rate * (self.budget.target / (self.top_k * N) - share)
            elif mask is None:
                self.selection_bias += rate * torch.sign(load.mean() - load)
            else:  # ReXMoE's masked experts take no load and keep their bias: the mean is the candidates'
                mean = load.sum() / mask.sum()
                self.selection_bias += rate * torch.sign(mean - load) * mask
        load.zero_()

    def _apply(self, fn, recurse=True):
        """`nn.Module._apply` (what `.to()` runs), but the balancing bias and its load counter keep at
        least float32 whatever the cast: a bf16 counter stops at 256 and a bf16 bias near 0.5 cannot
        take a step of 1e-3."""
        kept = {name: self._buffers[name] for name in BALANCING_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.is_floating_point() and after.element_size() < 4:  # cast to bf16 or fp16
                self._buffers[name] = (before if before.element_size() >= 4 else before.float()).to(after.device)
        return self


class HashRouter(Router):
    """Hash routing (DeepSeek-V4's first layers, "hash_moe"): a fixed table `token_experts` [V, K]
    (int64 or int32, a buffer) names the K experts of each token id; the learned gate only weighs them:
    weights = the chosen experts' `expert_scores` of the logits, divided by their sum if
    `renormalize`, times `route_scale`. The table may name an expert twice in a row (after a
    merge); such an expert then runs twice, each time with its own slot's weight.

    Reads the token ids (`reads_token_ids`): forward(x [T, D], token_ids [T]) -> a `Routing` of the T
    tokens (an `MoELayer` hands them on from its `context["input_ids"]`).
    """

    context_input = "input_ids"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        vocab_size: int,
        top_k: int,
        *,
        score_func: str = "sqrtsoftplus",
        renormalize: bool = True,
        route_scale: float = 1.0,
        bias: bool = False,
    ):
        super().__init__(dim, num_experts, bias=bias)
        check_top_k(top_k, num_experts)
        _check_positive(vocab_size=vocab_size)
        check_route_scale(route_scale)
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        self.top_k = top_k
        self.score_func = score_func
        self.renormalize = renormalize
        self.route_scale = route_scale
        # a random table of K distinct experts per token id (Roller et al.'s random hash), drawn from torch's
        # generator as the weights are; a checkpoint's table replaces it
        self.register_buffer("token_experts", torch.rand(vocab_size, num_experts).argsort(-1)[:, :top_k].contiguous())

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        indices = self._chosen(x, token_ids, check_range=True)
        logits = self.router_logits(x)
        scores = expert_scores(logits, self.score_func)
        weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        return Routing(indices, weights, logits, probs)

    def choose(self, x: Tensor, token_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`Router.choose`: the chosen experts' scores alone, from their logits (sqrt-softplus and
        sigmoid score each logit alone; a softmax renormalised over the chosen experts is a softmax
        over their logits), only they checked, and the ids' range left to the model (its embedding, or
        moelab's own prompt check: a read back per layer costs a decode step). Through `forward` where
        the router is hooked (traces), has its own `router_logits` (`moelab.hf.edit`'s masks) or its
        softmax is not renormalised."""
        if forward_hooked([self]) or "router_logits" in vars(self) or (self.score_func == "softmax" and not self.renormalize):
            return super().choose(x, token_ids)
        indices = self._chosen(x, token_ids, check_range=False)
        chosen = self.router_logits(x, check=False).gather(-1, indices)
        check_finite_logits(chosen)
        if self.score_func == "softmax":
            weights = chosen.softmax(-1)
        else:
            weights = expert_scores(chosen, self.score_func)
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) if self.renormalize else weights
        return indices, weights if self.route_scale == 1.0 else weights * self.route_scale

    def _chosen(self, x: Tensor, token_ids: Tensor | None, check_range: bool) -> Tensor:
        """The table's experts [T, K] (int64) of the T tokens of x [T, D] with ids token_ids [T]; the
        ids checked (their range too, on a CPU, with check_range)."""
        if token_ids is None or token_ids.shape != x.shape[:1]:
            got = "none" if token_ids is None else list(token_ids.shape)
            raise ValueError(
                f"hash routing picks experts by token id: pass the {x.shape[0]} tokens' ids (token_ids [tokens]; "
                f"to an MoE layer, context={{'input_ids': ids}} shaped as its input without the last dim), got {got}"
            )
        if token_ids.is_floating_point():
            raise ValueError(f"hash routing needs integer token ids, got {token_ids.dtype}")
        vocab = self.token_experts.shape[0]
        if check_range and token_ids.device.type == "cpu" and not torch.compiler.is_compiling() and token_ids.numel():
            low, high = token_ids.aminmax()  # read back on a CPU only: a GPU's index check asserts instead
            if low < 0 or high >= vocab:
                raise ValueError(f"token id {int(high if high >= vocab else low)} is outside the hash table's vocabulary 0..{vocab - 1}")
        return self.token_experts[token_ids].long()


class TopPRouter(Router):
    """Dynamic top-p (An et al., "Harder Tasks Need More Experts"): per token, the experts in
    decreasing probability until their cumulative probability first reaches `top_p` (the expert
    that crosses it included), at most `max_k`. Weights are the raw softmax probabilities
    (`renormalize=False`, as in the paper's code) or renormalised over the chosen experts."""

    variable_k = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_p: float,
        *,
        max_k: int | None = None,
        renormalize: bool = False,
        bias: bool = False,
    ):
        super().__init__(dim, num_experts, bias=bias)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        max_k = num_experts if max_k is None else max_k
        check_top_k(max_k, num_experts, name="max_k")
        self.top_p = top_p
        self.top_k = max_k
        self.renormalize = renormalize

    def forward(self, x: Tensor) -> Routing:
        logits = self.router_logits(x)
        probs = logits.softmax(-1)
        sorted_probs, order = probs.topk(self.top_k, dim=-1)  # [T, K], descending
        if self.top_p < 1.0:
            mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability mass of earlier experts
            keep = mass_before < self.top_p  # slot 0 is always kept
        else:
            # Every softmax probability is > 0, so the mass before any expert is < 1 and all
            # max_k slots are kept, even where float32 rounds the cumulative sum to 1.
            keep = torch.ones_like(sorted_probs, dtype=torch.bool)
        indices = order.masked_fill(~keep, -1)
        weights = sorted_probs * keep
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(indices, weights, logits, probs)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert picks its `capacity = ceil(T * c / E)`
    highest-scoring tokens, so a token may get zero or several experts. Non-causal: an expert's
    choice of token t depends on the other tokens in the batch."""

    variable_k = True
    causal = False

    def __init__(self, dim: int, num_experts: int, *, capacity_factor: float = 2.0, bias: bool = False):
        super().__init__(dim, num_experts, bias=bias)
        if not 0.0 < capacity_factor <= num_experts:
            raise ValueError(
                f"capacity_factor (average experts per token) must lie in (0, {num_experts}], "
                f"got {capacity_factor}"
            )
        self.capacity_factor = capacity_factor
        self.top_k = num_experts

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(num_tokens * self.capacity_factor / self.num_experts))

    def forward(self, x: Tensor) -> Routing:
        logits = self.router_logits(x)
        probs = logits.softmax(-1)
        T, E = probs.shape
        gates, tokens = probs.t().topk(self.capacity(T), dim=-1)  # [E, C] each
        weights = probs.new_zeros(E, T).scatter(1, tokens, gates).t()  # [T, E]
        chosen = torch.zeros(E, T, dtype=torch.bool, device=x.device).scatter_(1, tokens, True).t()
        experts = torch.arange(E, device=x.device).expand(T, E)
        return Routing(experts.masked_fill(~chosen, -1), weights, logits, probs)


class ReLURouter(Router):
    """BlockFFN router: ReLU then RMSNorm over the expert dimension.

    a = relu(W x); gate = g * a / sqrt(mean_e a^2 + eps) with a learnable `g: [E]` (init 1).
    An expert is active where a > 0, so the number of experts per token varies and the gate is
    differentiable. `probs` = a_hat / (sum a_hat + 1e-5) feeds the chunk-sparsity regulariser.
    """

    variable_k = True

    def __init__(self, dim: int, num_experts: int, *, eps: float = 1e-6, bias: bool = False):
        super().__init__(dim, num_experts, bias=bias)
        if not is_positive_finite(eps):
            raise ValueError(
                f"eps must be a positive finite number (a token with no active expert is normed by 0 / sqrt(eps)), got {eps!r}"
            )
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(num_experts))
        self.top_k = num_experts

    def forward(self, x: Tensor) -> Routing:
        logits = self.router_logits(x)
        active = F.relu(logits)
        normed = active * torch.rsqrt(active.pow(2).mean(-1, keepdim=True) + self.eps)
        weights = normed * self.norm_weight.float()
        probs = normed / (normed.sum(-1, keepdim=True) + 1e-5)
        experts = torch.arange(self.num_experts, device=x.device).expand_as(logits)
        return Routing(experts.masked_fill(active <= 0, -1), weights, logits, probs)


def dynamic_skip(routing: Routing, ratio: float, num_experts: int | None = None) -> Routing:
    """NAEE's dynamic skipping (Lu et al., 2024): drop every chosen expert whose combine weight is
    below `ratio` times the token's largest, then rescale the kept weights to the same total, so
    a token whose second expert is weak uses its first alone. indices of dropped slots become -1.
    num_experts: E where the choices past it are identity experts (`MoELayer.identity_experts`):
    their slots are neither skipped nor weighed (the ratio and the total are the experts')."""
    indices, weights = skip_weak_experts(routing.indices, routing.weights, ratio, num_experts)
    return Routing(indices, weights, routing.logits, routing.probs)


def skip_weak_experts(
    indices: Tensor, weights: Tensor, ratio: float, num_experts: int | None = None
) -> tuple[Tensor, Tensor]:
    """`dynamic_skip` on indices, weights: [T, K] alone."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"the dynamic-skipping ratio must lie in [0, 1], got {ratio}")
    experts = indices >= 0 if num_experts is None else (indices >= 0) & (indices < num_experts)
    expert_weights = weights.masked_fill(~experts, 0.0)
    top = expert_weights.abs().amax(-1, keepdim=True)
    skip = (expert_weights.abs() < ratio * top) & experts
    kept_weights = expert_weights.masked_fill(skip, 0.0)
    total, kept = expert_weights.sum(-1, keepdim=True), kept_weights.sum(-1, keepdim=True)
    kept_weights = torch.where(
        kept != 0, kept_weights * (total / kept.where(kept != 0, torch.ones_like(kept))), kept_weights
    )
    return indices.masked_fill(skip, -1), kept_weights.where(experts, weights)


def attach_selection_bias_update(
    optimizer: torch.optim.Optimizer, model: nn.Module, rate: float = 1e-3, group: ProcessGroup | None = None
):
    """After every `optimizer.step()`, move the aux-loss-free bias of each balancing router in
    `model` from the load it saw since the last step (summed over `group`'s ranks). Returns the
    hook handle."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.selection_bias is not None]
    if not routers:
        raise ValueError("model has no TopKRouter built with selection_bias=True; nothing to update")
    check_bias_rate(rate)

    def hook(*_):
        for router in routers:
            router.update_selection_bias(rate, group)

    return optimizer.register_step_post_hook(hook)


def _check_budget(budget: ComputeBudget, num_choices: int, top_k: int, selection_bias: bool) -> None:
    N, target = budget.num_experts, budget.target
    if not selection_bias:
        raise ValueError("a computation budget steers the selection bias: build the router with selection_bias=True")
    if not is_int(N) or not 1 <= N < num_choices:
        raise ValueError(
            f"a computation budget's num_experts must be an int in [1, {num_choices}) (the router's choices past "
            f"it are its zero-computation experts), got {N!r}"
        )
    if not (is_positive_finite(target) and target <= min(top_k, N)):
        raise ValueError(
            f"a computation budget's target (experts computed per token) must lie in (0, min(top_k, num_experts)"
            f" = {min(top_k, N)}], got {target!r}"
        )


def check_route_scale(route_scale: float) -> None:
    if not is_positive_finite(route_scale):
        raise ValueError(
            f"route_scale must be a positive finite number (it multiplies the routed output), got {route_scale!r}"
        )


def check_bias_rate(rate: float) -> None:
    if not (is_number(rate) and math.isfinite(rate) and rate >= 0):
        raise ValueError(f"the selection bias update rate must be a finite number >= 0 (0 leaves the bias), got {rate!r}")


def check_top_k(k: int, num_experts: int, name: str = "top_k") -> None:
    if not is_int(k):
        raise ValueError(f"{name} must be an integer, got {type(k).__name__} {k!r}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"{name} must lie in [1, num_experts={num_experts}], got {k}")


def group_scoring(score_func: str, group_score: str | None = None) -> str:
    """How a group-limited router scores a group: `group_score` where given, "max" (its best
    expert's score, DeepSeek-V2) or "top2" (the sum of its two best, DeepSeek-V3, Mistral 4); None:
    the rule of `score_func`'s families, "max" for softmax, "top2" for sigmoid and sqrt-softplus."""
    if group_score is None:
        return "max" if score_func == "softmax" else "top2"
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES} (or None: by score_func), got {group_score!r}")
    return group_score


def min_group_size(score_func: str, n_group: int, group_score: str | None = None) -> int:
    """Experts every group of a group-limited router must hold: transformers' routers that score a
    group by the sum of its two best experts ("top2", `group_scoring`) need two; "max" one."""
    return 2 if group_scoring(score_func, group_score) == "top2" and n_group > 1 else 1


def check_groups(
    num_experts: int, top_k: int, n_group: int, topk_group: int, min_group_size: int = 1
) -> None:
    """Group-limited routing (DeepSeek `n_group`) must split the experts evenly and keep enough of
    them for top-k; `min_group_size`: what a group must hold at least (2 for transformers' routers
    that score a group by its two best experts, DeepSeek-V3's, Mistral 4's; moelab's router takes
    the best min(2, size)). The one statement of these rules: routers, configs, views, the checkpoint
    writer and the compression planner all ask it."""
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        if not is_int(value):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group ({n_group}) must be >= 1 and divide num_experts ({num_experts})")
    if n_group > 1:
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must lie in [1, n_group={n_group}], got {topk_group}")
        kept = topk_group * (num_experts // n_group)
        if top_k > kept:
            raise ValueError(
                f"top_k ({top_k}) exceeds the {kept} experts in the topk_group={topk_group} kept groups; "
                "raise topk_group or lower top_k"
            )
        if num_experts // n_group < min_group_size:
            raise ValueError(
                f"this router scores each group by its {min_group_size} best experts, so every group needs at "
                f"least {min_group_size} experts; {num_experts} experts in {n_group} groups leave "
                f"{num_experts // n_group}"
            )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
