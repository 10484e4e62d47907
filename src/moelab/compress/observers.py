"""What one calibration pass records in each MoE layer.

Shape legend: T tokens of one call, D model dim, E routed experts, K slots per token, H halves
of the calibration data (2), S calibration sources, B histogram bins, N sampled tokens.

The pass computes every MoE block the eager way (`eager_moe`): the router's choices, then each
chosen expert's output on its token, then the weighted sum. Observers see what the experts
really computed; nothing is divided back out. Every statistic is a sum, a maximum or a sample
at fixed global token positions, so statistics of two halves, of several sources or of several
processes combine exactly (`combine`).

Adding a statistic is one `Observer` subclass and one line in `OBSERVERS`; a compression
method names the observers it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.nn.dispatch import LocalDispatcher, plan_dispatch
from moelab.nn.moe import MoELayer, identity_output, router_inputs
from moelab.nn.routers import Routing

HALVES = 2
SKIP_BINS = 100  # histogram of w2 / w1 over [0, 1]


@dataclass
class MoECall:
    """One call of an MoE block, computed eagerly.

    x: [T, D] its input; routing: the router's output; outputs: [T, K, D] each slot's expert
    output f_e(x) (f_e(w x) for experts that take the weight on their input, Llama 4; in a latent
    block, up @ f_e(down @ x), the expert's share of the output), zeros in empty slots; shared:
    [T, D] the shared experts' output (None without), shared_down: [T, D] their down projection
    before any gate; scale_input: the experts took the weight on their input; routed_norm: the
    norm of the routed experts' weighted sum (Gemma 4: `MoELayer.routed_norm`), None without;
    token_ids: the router's per-token input where it reads one (`Router.context_input`): the tokens'
    ids [T] int64 (a hash router) or the router states handed in [T, R] (an MLP router, ZAYA's), else None;
    output_bias: [D] the block's output bias (JetMoE's `MoELayer.output_bias`), None without: part of
    `output`, not of any expert's contribution; identity: [T, D] what the block's identity experts
    added (LongCat-Flash's: their weights times the input; ZAYA's skip expert: zeros), None without:
    part of `routed`, not of any expert's contribution (their slots are empty in `routing`, whose
    logits and probs cover the E experts); residual: [T, D] the residual stream the decoder layer
    normed into x, where the calibration found it (`block_residuals`), else None.
    In the backward sweep (`eager_moe(..., keep_hidden=True)`) also hidden: [T, K, I] each slot's
    hidden activation (what its down projection sees) and grad_hidden: [T, K, I] the loss's
    gradient with respect to it, filled in when the backward pass reaches it; zeros in empty slots.
    """

    x: Tensor
    routing: Routing
    outputs: Tensor
    shared: Tensor | None
    shared_down: Tensor | None
    scale_input: bool = False
    hidden: Tensor | None = None
    grad_hidden: Tensor | None = None
    routed_norm: Callable[[Tensor], Tensor] | None = None
    token_ids: Tensor | None = None
    output_bias: Tensor | None = None
    identity: Tensor | None = None
    residual: Tensor | None = None

    @property
    def contributions(self) -> Tensor:
        """[T, K, D] what each slot adds to the block's output (w f_e(x); computed when asked)."""
        return (
            self.outputs
            if self.scale_input
            else self.outputs * self.routing.weights[..., None].to(self.outputs.dtype)
        )

    @property
    def routed(self) -> Tensor:
        """[T, D] the routed experts' weighted sum, identity experts' included (before the routed norm,
        where the block has one)."""
        routed = self.contributions.sum(1)
        return routed if self.identity is None else routed + self.identity.to(routed.dtype)

    @property
    def output(self) -> Tensor:
        """[T, D] the block's output."""
        out = self.routed if self.routed_norm is None else self.routed_norm(self.routed)
        out = out if self.shared is None else out + self.shared
        return out if self.output_bias is None else out + self.output_bias.to(out.dtype)


@dataclass
class Tokens:
    """Where the T tokens of a call come from: source, half: [T] int64; position: [T] int64
    global index in the calibration mixture."""

    source: Tensor
    half: Tensor
    position: Tensor


def eager_moe(
    moe: MoELayer, x: Tensor, *, context: dict[str, Tensor] | None = None, keep_hidden: bool = False
) -> MoECall:
    """Compute `moe` on x [..., D] expert by expert (dropless), keeping each slot's output; with
    keep_hidden (under autograd, for the backward sweep) also each slot's hidden activation, and
    its gradient once the backward pass has run. context: what the router reads besides x (a hash
    router: the token ids, `context["input_ids"]`; an MLP router: the state, `context["router_states"]`)."""
    ids = router_inputs(moe.router, x, context)
    x = x.reshape(-1, x.shape[-1])
    routing = moe.router(x, *ids)
    indices, weights, identity = moe.split_identity(routing.indices, routing.weights)
    if identity is not None:  # the statistics see the E experts with weights
        E = moe.num_experts
        routing = Routing(indices, weights, routing.logits[:, :E], routing.probs[:, :E])
    T, K = routing.indices.shape
    plan = plan_dispatch(routing.indices, moe.num_experts)
    z = moe.expert_rows(x)  # what the experts read
    batch = LocalDispatcher().dispatch(z, routing.weights, plan)
    experts = moe.experts
    scale_input = getattr(experts, "scale_input", False)  # f(w x): the weight is the input's
    row_weights = batch.row_weights if scale_input else None
    hidden = grad_hidden = None
    if keep_hidden:
        rows_hidden = experts.hidden(batch.rows, batch.counts, row_weights)
        rows = experts.project(rows_hidden, batch.counts)
        hidden = x.new_zeros(T * K, rows_hidden.shape[1])
        hidden[plan.slots] = rows_hidden.detach()
        slot_grads = torch.zeros_like(hidden)

        def keep_grad(g: Tensor) -> None:  # returns nothing: the gradient flows on unchanged
            slot_grads.index_copy_(0, plan.slots, g)

        if rows_hidden.requires_grad:
            rows_hidden.register_hook(keep_grad)
        hidden, grad_hidden = hidden.view(T, K, -1), slot_grads.view(T, K, -1)
    else:
        rows = experts(batch.rows, batch.counts, row_weights)
    if moe.latent is not None:  # not a routed norm: that one is not linear, so it is applied to the sum (`output`)
        rows = moe.latent.up(rows)  # linear: the block's up @ (sum of w f_e) is the sum of these, weighted
    outputs = x.new_zeros(T * K, x.shape[-1])
    outputs[plan.slots] = rows
    del rows
    shared = shared_down = None
    if moe.shared is not None:
        shared_down = moe.shared.mlp(x)
        shared = moe.shared.weigh(x, shared_down)
    return MoECall(
        x, routing, outputs.view(T, K, -1), shared, shared_down, scale_input, hidden, grad_hidden, moe.routed_norm,
        ids[0] if ids else None, moe.output_bias, _identity_added(moe, identity, z),
    )


def _identity_added(moe: MoELayer, identity: Tensor | None, z: Tensor) -> Tensor | None:
    """[T, D] what the identity experts add (their weights `identity` [T, K] times the rows z [T, D] the
    experts read; zeros where they return nothing, `MoELayer.identity_returns`), None without them."""
    if identity is None:
        return None
    return identity_output(identity, z) if moe.identity_returns == "input" else torch.zeros_like(z)


class Observer:
    """Accumulates statistics of one MoE layer over calibration calls. `fields` names what
    `result` returns; `update` sees each call with the decoder layer's output [T, D]."""

    name: str = ""
    fields: tuple[str, ...] = ()
    backward: bool = False  # sees the backward sweep's calls (with hidden and grad_hidden)

    def __init__(self, num_experts: int, num_sources: int, dim: int, options: dict):
        self.E, self.S, self.D = num_experts, num_sources, dim

    def update(self, call: MoECall, tokens: Tokens, layer_output: Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _per_group(self, values: Tensor, tokens: Tokens) -> Tensor:
        """values [T, E] summed into [H, S, E] by each token's half and source."""
        out = torch.zeros(HALVES * self.S, values.shape[1], dtype=torch.float64)
        out.index_add_(0, tokens.half * self.S + tokens.source, values.double().cpu())
        return out.view(HALVES, self.S, -1)


@contextlib.contextmanager
def block_residuals(dim: int) -> Iterator[Callable[[Tensor], Tensor | None]]:
    """While open, every module call that maps a [..., dim] input to an output of its shape (a
    norm) is remembered by its output's memory; yields residual(x) -> the input of the call whose
    output x is (x itself or a view of it: the MoE block's input, the norm's output), else None,
    and forgets every call before it (one decoder layer's calls at a time). The outputs are held
    until then, so their memory cannot be reused by a tensor no module made."""
    made: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def remember(module, args, output) -> None:
        if (
            isinstance(output, Tensor) and args and isinstance(args[0], Tensor)
            and output.shape[-1:] == (dim,) and args[0].shape == output.shape
        ):  # fmt: skip
            made[(output.data_ptr(), output.numel())] = (output, args[0])

    def residual(x: Tensor) -> Tensor | None:
        found = made.get((x.data_ptr(), x.numel()))
        made.clear()
        return None if found is None else found[1].detach()

    handle = torch.nn.modules.module.register_module_forward_hook(remember)
    try:
        yield residual
    finally:
        handle.remove()
        made.clear()


def added_scale(added: Tensor, output: Tensor, total: Tensor) -> float | None:
    """m where the decoder layer added m x the block's output to its residual stream: `added` [T, D]
    (its output minus the residual) against `output` [T, D] (the block's), up to the rounding of
    `total` [T, D] (the layer's output); None where no m does (a norm, gate or convolution of the
    block's output first: AFMoE, Kolibri1, A.X K1)."""
    added, output = added.detach().double(), output.detach().double()
    m = float((added * output).sum() / (output * output).sum().clamp(min=1e-300))
    rounding = 4 * torch.finfo(total.dtype).eps * float(total.double().norm())
    return m if float((added - m * output).norm()) <= rounding else None


def per_expert(routing: Routing, values: Tensor, num_experts: int) -> Tensor:
    """values [T, K] of each slot -> [T, E] on the slot's expert (empty slots add nothing)."""
    chosen = routing.indices >= 0
    out = values.new_zeros(values.shape[0], num_experts)
    return out.scatter_add_(1, routing.indices.clamp(min=0), values * chosen)


class RoutingObserver(Observer):
    """tokens [H, S]; counts: top-k selections; soft_counts: router probabilities of all tokens;
    gate_sums: combine weights of the chosen experts; premoe_sums: raw router logits of the
    chosen experts (PreMoe's task-conditioned score with k = the model's top-k), all [H, S, E];
    skip_ratios [B]: tokens by the ratio of their second to their first combine weight;
    logit_gram [H, S, E, E]: sum over tokens of z z^T of the router logits (M-SMoE's similarity)."""

    name = "routing"
    fields = ("tokens", "counts", "soft_counts", "gate_sums", "premoe_sums", "skip_ratios", "logit_gram")

    def __init__(self, num_experts: int, num_sources: int, dim: int, options: dict):
        super().__init__(num_experts, num_sources, dim, options)
        self.sums = {f: torch.zeros(HALVES, self.S, self.E, dtype=torch.float64) for f in self.fields[1:5]}
        self.tokens = torch.zeros(HALVES, self.S, dtype=torch.float64)
        self.skip = torch.zeros(SKIP_BINS, dtype=torch.float64)
        self.gram = torch.zeros(HALVES * self.S, self.E, self.E, dtype=torch.float64)

    def update(self, call: MoECall, tokens: Tokens, layer_output: Tensor) -> None:
        r = call.routing
        chosen = (r.indices >= 0).to(r.weights.dtype)
        self.tokens.view(-1).index_add_(
            0, tokens.half * self.S + tokens.source, torch.ones(len(tokens.half), dtype=torch.float64)
        )
        self.sums["counts"] += self._per_group(per_expert(r, chosen, self.E), tokens)
        self.sums["soft_counts"] += self._per_group(r.probs.float(), tokens)
        self.sums["gate_sums"] += self._per_group(per_expert(r, r.weights.float(), self.E), tokens)
        chosen_logits = r.logits.float().gather(1, r.indices.clamp(min=0)) * chosen
        self.sums["premoe_sums"] += self._per_group(per_expert(r, chosen_logits, self.E), tokens)
        if r.weights.shape[1] >= 2:
            top = r.weights.float().abs().topk(2, dim=1).values
            ratio = torch.where(
                top[:, 0] > 0, top[:, 1] / top[:, 0].clamp(min=1e-30), torch.zeros_like(top[:, 0])
            )
            self.skip += torch.histc(ratio.double().cpu(), bins=SKIP_BINS, min=0.0, max=1.0)
        z, group = r.logits.double().cpu(), (tokens.half * self.S + tokens.source).cpu()
        for g in group.unique().tolist():
            zg = z[group == g]
            self.gram[g] += zg.T @ zg

    def result(self) -> dict[str, Tensor]:
        return {"tokens": self.tokens, **self.sums, "skip_ratios": self.skip, "logit_gram": self.gram.view(HALVES, self.S, self.E, self.E)}


class OutputObserver(Observer):
    """ean_sums: the chosen experts' output norms ||f_e(x)||; reap_sums: the norms of what they
    add to the output (router weight times output norm, REAP's saliency numerator), both
    [H, S, E]; max_output [E]: each expert's largest |output| entry over the tokens routed to it,
    shared_max [1]: the same for the shared experts' down projection (Super Experts)."""

    name = "outputs"
    fields = ("ean_sums", "reap_sums", "max_output", "shared_max")

    def __init__(self, num_experts: int, num_sources: int, dim: int, options: dict):
        super().__init__(num_experts, num_sources, dim, options)
        self.ean = torch.zeros(HALVES, self.S, self.E, dtype=torch.float64)
        self.reap = torch.zeros(HALVES, self.S, self.E, dtype=torch.float64)
        self.max_output = torch.zeros(self.E, dtype=torch.float64)
        self.shared_max = torch.zeros(1, dtype=torch.float64)

    def update(self, call: MoECall, tokens: Tokens, layer_output: Tensor) -> None:
        r = call.routing
        self.ean += self._per_group(per_expert(r, call.outputs.float().norm(dim=-1), self.E), tokens)
        self.reap += self._per_group(per_expert(r, call.contributions.float().norm(dim=-1), self.E), tokens)
        peak = torch.linalg.vector_norm(call.outputs.float(), ord=float("inf"), dim=-1)  # [T, K] max |entry|
        chosen = r.indices >= 0
        self.max_output.scatter_reduce_(0, r.indices[chosen].cpu(), peak[chosen].double().cpu(), "amax")
        if call.shared_down is not None:
            self.shared_max = torch.maximum(
                self.shared_max, call.shared_down.float().abs().amax().double().cpu().reshape(1)
            )

    def result(self) -> dict[str, Tensor]:
        return {
            "ean_sums": self.ean,
            "reap_sums": self.reap,
            "max_output": self.max_output,
            "shared_max": self.shared_max,
        }


# why a layer has no easyep_sums
EASY_EP_UNREADABLE = (
    "EASY-EP weighs each expert by how far the routed output turns the residual stream, which is read only "
    "where the decoder layer adds the MoE block's output to one residual stream as it is or times a number; "
    "this model's layer changes it first (a norm, gate or convolution after the block: AFMoE, Kolibri1, A.X K1, Muse Spark, "
    "Inkling 2), adds another module's output with it (GraniteMoeShared's shared MLP, Cohere2-MoE's parallel "
    "attention, LongCat-Flash), carries several residual streams (Qwen4-Exp, Hunyuan 4) or norms the routed sum "
    "(Gemma 4)"
)


class ContributionObserver(Observer):
    """easyep_sums [H, S, E]: EASY-EP's importance, the chosen experts' contribution norms
    weighted by how much the routed output turns the token's residual stream,
    max(0, 1 - cos(h, h + m y_routed)): h the residual stream before the block (`MoECall.residual`,
    the input of the norm that made the block's input, or that norm's output, the block's input, for
    a layer that adds the block's output to it: moelab's residual_from_norm; where the calibration
    did not find it, the decoder layer's output minus the block's), m what the layer scales the
    block's output by before adding it (1; Granite's residual_multiplier), read from h, the block's
    output and the layer's.
    Where the layer's update is not m times the block's output (a norm, gate or convolution after
    the block: AFMoE, Kolibri1, A.X K1, Inkling 2; another module's output added with it: a shared
    MLP beside the block, GraniteMoeShared's, or attention in parallel, Cohere2-MoE's), m is not
    read and none is kept (`EASY_EP_UNREADABLE`); nor where the layer carries several residual
    streams (hyper-connections: Qwen4-Exp's [B, S, hc_count * D], Hunyuan 4's [B, S, hc_mult, D],
    each mixed with the block's output by its own weight) or norms the routed experts' sum (Gemma 4)."""

    name = "contribution"
    fields = ("easyep_sums",)

    def __init__(self, num_experts: int, num_sources: int, dim: int, options: dict):
        super().__init__(num_experts, num_sources, dim, options)
        self.sums: Tensor | None = torch.zeros(HALVES, self.S, self.E, dtype=torch.float64)

    def update(self, call: MoECall, tokens: Tokens, layer_output: Tensor) -> None:
        streams = layer_output.numel() != call.output.numel()  # hyper-connections: several residual streams
        if self.sums is None or streams or call.routed_norm is not None:
            self.sums = None
            return
        out = layer_output.reshape(-1, self.D)
        dtype = torch.promote_types(out.dtype, torch.float32)  # float64 calibrations keep their digits
        total, block = out.to(dtype), call.output.to(dtype)
        if call.residual is None:
            residual, scale = total - block, 1.0
        else:  # the norm's input, or its output where the layer adds the block to that (residual_from_norm)
            for stream in (call.residual, call.x):
                residual = stream.reshape(-1, self.D).to(dtype)
                scale = added_scale(total - residual, block, out)
                if scale is not None:
                    break
            else:
                self.sums = None
                return
        turn = 1 - torch.nn.functional.cosine_similarity(residual, residual + scale * call.routed.to(dtype), dim=-1)
        weight = call.contributions.to(dtype).norm(dim=-1) * turn.clamp(min=0)[:, None]
        self.sums += self._per_group(per_expert(call.routing, weight, self.E), tokens)

    def result(self) -> dict[str, Tensor]:
        return {} if self.sums is None else {"easyep_sums": self.sums}


class InputSample(Observer):
    """inputs [N, D]: the block's inputs at N global token positions spread evenly over the
    calibration data (position floor(i * total / N) for i < N), for methods that re-run a layer
    (NAEE), input_sources [N] their sources and, where the router reads a per-token input
    (`MoECall.token_ids`: a hash router's token ids, an MLP router's states), router_inputs [N, ...]
    theirs. options: sample_tokens (N), total_tokens (of the mixture)."""

    name = "inputs"
    fields = ("inputs", "input_sources", "router_inputs")

    def __init__(self, num_experts: int, num_sources: int, dim: int, options: dict):
        super().__init__(num_experts, num_sources, dim, options)
        self.total = options["total_tokens"]
        self.size = min(options["sample_tokens"], self.total)
        self.inputs = torch.zeros(self.size, dim, dtype=torch.float32)
        self.sources = torch.zeros(self.size, dtype=torch.int64)  # summed over processes: 0 where not sampled
        self.ids: Tensor | None = None

    def update(self, call: MoECall, tokens: Tokens, layer_output: Tensor) -> None:
        slot = (
            tokens.position * self.size + self.total - 1
        ) // self.total  # the first i with floor(i total / N) >= p
        pick = (slot < self.size) & (slot * self.total // self.size == tokens.position)
        self.inputs[slot[pick]] = call.x[pick.to(call.x.device)].float().cpu()
        self.sources[slot[pick]] = tokens.source[pick].cpu()
        if (read := call.token_ids) is not None:
            if self.ids is None:  # ids as they are, states in float32 as the inputs
                dtype = torch.float32 if read.is_floating_point() else read.dtype
                self.ids = torch.zeros(self.size, *read.shape[1:], dtype=dtype)
            self.ids[slot[pick]] = read[pick.to(read.device)].to(self.ids.dtype).cpu()

    def result(self) -> dict[str, Tensor]:
        ids = {} if self.ids is None else {"router_inputs": self.ids}
        return {"inputs": self.inputs, "input_sources": self.sources, **ids}


class NeuronObserver(Observer):
    """HEAPr's per-neuron terms, from the backward sweep (the gradient of the mean next-token loss
    over the calibration tokens): neuron_act_sums [H, S, E, I] sums each routed token's squared
    hidden activation h_j^2, neuron_grad_sums [H, S, E, I] the squared gradient (dL/dh_j)^2 =
    (w_j . g)^2, g the gradient at the expert's output (w_j: column j of its down projection).
    options: hidden_dim (I)."""

    name = "neurons"
    fields = ("neuron_act_sums", "neuron_grad_sums")
    backward = True

    def __init__(self, num_experts: int, num_sources: int, dim: int, options: dict):
        super().__init__(num_experts, num_sources, dim, options)
        shape = (HALVES * self.S * self.E, options["hidden_dim"])
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name in self.fields}

    def update(self, call: MoECall, tokens: Tokens, layer_output: Tensor) -> None:
        r = call.routing
        chosen = (r.indices >= 0).flatten().cpu()
        group = tokens.half * self.S + tokens.source  # [T]
        cell = (group[:, None] * self.E + r.indices.clamp(min=0).cpu()).flatten()[
            chosen
        ]  # half/source/expert
        for name, values in (("neuron_act_sums", call.hidden), ("neuron_grad_sums", call.grad_hidden)):
            squares = values.reshape(-1, values.shape[-1]).double().cpu()[chosen].square()
            self.sums[name].index_add_(0, cell, squares)

    def result(self) -> dict[str, Tensor]:
        return {name: total.view(HALVES, self.S, self.E, -1) for name, total in self.sums.items()}


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls
    for cls in (RoutingObserver, OutputObserver, ContributionObserver, InputSample, NeuronObserver)
}
DEFAULT_OBSERVERS = tuple(name for name, cls in OBSERVERS.items() if not cls.backward)


MAXIMA = ("max_output", "shared_max")  # every other statistic is a sum (samples: zeros where not taken)
PARTIAL = ("easyep_sums",)  # a process's data decides whether it is kept (`added_scale`)


def combine(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """The statistics of two disjoint parts of the data as one."""
    return {name: torch.maximum(x, b[name]) if name in MAXIMA else x + b[name] for name, x in a.items()}
