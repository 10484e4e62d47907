"""A naive, obviously-correct reference for moelab's MoE layer, written from the definitions.

The reference (everything above the "comparison harness" section at the end) imports nothing from
moelab and never calls the code under test. Every rule is applied per token (and
per expert) with plain Python loops; decisions (which experts, which tokens, what gets dropped)
are made on Python floats, numbers are float64 torch scalars/vectors so that autograd gives the
reference gradients. The layer's parameters are only *read* (by their public names, the
transformers-5 stacked layout) and cloned into float64 leaf tensors.

Every routing function returns a `RefRouting`, whose `margin` is the smallest gap of any discrete
decision it made (the k-th vs (k+1)-th score, a cumulative mass vs top_p, a logit vs 0, ...).
A float32 implementation may legitimately decide differently when that margin is ~1e-6, so the
tests check that their data has no near-tie (and the property tests skip such examples).
`order_margin` is the same for the order of a token's chosen experts (its slots), which only
matters for exact slot comparisons and for capacity priority.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

F64 = torch.float64


# ----------------------------------------------------------------------------- elementwise maths


def sigmoid(z: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-z))


def sqrt_softplus(z: Tensor) -> Tensor:  # DeepSeek-V4's router scores
    return torch.sqrt(torch.log(1.0 + torch.exp(z)))


def softmax(z: Tensor) -> Tensor:
    ex = torch.exp(z - float(z.detach().max()))
    return ex / ex.sum()


def silu(z: Tensor) -> Tensor:
    return z * sigmoid(z)


def gelu(z: Tensor) -> Tensor:  # the exact (erf) GELU
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def gelu_tanh(z: Tensor) -> Tensor:  # GELU's tanh approximation (Gemma's "gelu_pytorch_tanh")
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def relu(z: Tensor) -> Tensor:
    return torch.where(z > 0, z, torch.zeros_like(z))


def relu2(z: Tensor) -> Tensor:  # Nemotron-H's squared ReLU
    return relu(z) * relu(z)


ACT = {"silu": silu, "gelu": gelu, "relu": relu, "relu2": relu2}


def logsumexp(z: Tensor) -> Tensor:
    m = float(z.detach().max())
    return m + torch.log(torch.exp(z - m).sum())


# ----------------------------------------------------------------------------- routing


@dataclass
class RefRouting:
    """choices[t]: list of (slot, expert, weight) for token t, in slot order; weight is a 0-d
    float64 tensor (differentiable). logits, probs: [T, E]. num_slots: K."""

    choices: list[list[tuple[int, int, Tensor]]]
    logits: Tensor
    probs: Tensor
    num_slots: int
    margin: float = math.inf  # smallest gap of a decision about *which* experts a token gets
    order_margin: float = math.inf  # smallest gap of a decision about the *slot order* of them
    # ReLU router only: the smallest rms(a) of a token with an active expert. When it nears
    # sqrt(eps) = 1e-3, d a_hat / d a grows to 1/sqrt(eps) and float32 gradients lose digits.
    min_rms: float = math.inf

    def safe_margin(self, ordered: bool) -> float:
        """The margin that matters: with ordered (exact slots compared, or capacity priority),
        the slot order too."""
        return min(self.margin, self.order_margin) if ordered else self.margin

    def experts(self, t: int) -> list[int]:
        return [e for _, e, _ in self.choices[t]]

    def weight_of(self, t: int) -> dict[int, float]:
        return {e: float(w.detach()) for _, e, w in self.choices[t]}

    def num_assignments(self) -> int:
        return sum(len(c) for c in self.choices)


def _gaps(values: list[float]) -> list[float]:
    """|a - b| between neighbours of a list sorted in decreasing order."""
    return [abs(a - b) for a, b in zip(values, values[1:])]


def _token_logits(x_t: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return W @ x_t + (0.0 if b is None else b)


def _stack_rows(rows: list[Tensor], E: int, like: Tensor) -> Tensor:
    return torch.stack(rows) if rows else like.new_zeros(0, E)


def route_topk(
    x: Tensor,
    W: Tensor,
    b: Tensor | None = None,
    *,
    top_k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    route_scale: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str | None = None,
    selection_bias: Tensor | None = None,
    select_on_logits: bool = False,
    expert_scale: Tensor | None = None,
    input_norm: tuple[Tensor, float, float] | None = None,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
) -> RefRouting:
    """Token-choice top-k. With input_norm (g, eps, m) the logits read x_t / sqrt(mean(x_t^2) + eps)
    * g * m (Gemma 4). Scores = softmax, sigmoid or sqrt(softplus) of the logits. Selection ranks
    score + selection_bias (select_on_logits: logit + selection_bias); with n_group > 1 only the experts of the topk_group best groups (of
    E/n_group consecutive experts; group score = sum of the group's two best selection values with
    group_score "top2", its best with "max"; None: "max" for softmax, "top2" otherwise) compete; every logit is first times
    logit_scale (Muse Spark), then, with logit_softcap c, c * tanh(logit / c) (Laguna). Weights: the un-biased scores of the chosen experts,
    divided by their sum if renormalize, times route_scale, times expert_scale[e] where given. Slot j =
    the j-th best chosen expert."""
    T, E = x.shape[0], W.shape[0]
    bias = [0.0] * E if selection_bias is None else [float(v) for v in selection_bias]
    choices, logit_rows, prob_rows, margins, order_margins = [], [], [], [], []
    for t in range(T):
        x_t = x[t]
        if input_norm is not None:
            g, eps, m = input_norm
            x_t = x_t / torch.sqrt((x_t * x_t).sum() / x_t.shape[0] + eps) * g * m
        logits = _token_logits(x_t, W, b) * logit_scale
        if logit_softcap is not None:
            logits = torch.tanh(logits / logit_softcap) * logit_softcap
        scores = {"softmax": softmax, "sigmoid": sigmoid, "sqrtsoftplus": sqrt_softplus}[score_func](logits)
        ranked_values = (logits if select_on_logits else scores).detach().tolist()
        select = [ranked_values[e] + bias[e] for e in range(E)]
        candidates = list(range(E))
        if n_group > 1:
            size = E // n_group
            rule = group_score or ("max" if score_func == "softmax" else "top2")
            group_scores = []
            for g in range(n_group):
                members = sorted((select[e] for e in range(g * size, (g + 1) * size)), reverse=True)
                group_scores.append(sum(members[:2]) if rule == "top2" else members[0])
            ranked_groups = sorted(range(n_group), key=lambda g: -group_scores[g])
            kept_groups = set(ranked_groups[:topk_group])
            margins += _gaps(sorted(group_scores, reverse=True)[topk_group - 1 : topk_group + 1])
            candidates = [e for e in range(E) if e // size in kept_groups]
        ranked = sorted(candidates, key=lambda e: -select[e])
        chosen = ranked[:top_k]
        margins += _gaps([select[e] for e in ranked[top_k - 1 : top_k + 1]])
        order_margins += _gaps([select[e] for e in chosen])
        w = [scores[e] for e in chosen]
        if renormalize:
            total = sum(w)
            w = [wi / total for wi in w]
        w = [wi * route_scale for wi in w]
        if expert_scale is not None:
            w = [wi * expert_scale[e] for wi, e in zip(w, chosen)]
        choices.append([(j, e, w[j]) for j, e in enumerate(chosen)])
        logit_rows.append(logits)
        prob_rows.append(scores if score_func == "softmax" else scores / scores.sum())
    return RefRouting(
        choices, _stack_rows(logit_rows, E, W), _stack_rows(prob_rows, E, W), top_k,
        min(margins, default=math.inf), min(order_margins, default=math.inf),
    )


def route_hash(
    x: Tensor, W: Tensor, ids: list[int], table: list[list[int]], *, score_func: str, renormalize: bool,
    route_scale: float,
) -> RefRouting:
    """Hash routing: token t visits the experts table[ids[t]] (in that slot order, repeats allowed),
    weighted by their scores (softmax, sigmoid or sqrt(softplus) of W x_t), divided by their sum if
    renormalize, times route_scale."""
    T, E = x.shape[0], W.shape[0]
    act = {"softmax": softmax, "sigmoid": sigmoid, "sqrtsoftplus": sqrt_softplus}[score_func]
    choices, logit_rows, prob_rows = [], [], []
    for t in range(T):
        logits = _token_logits(x[t], W, None)
        scores = act(logits)
        chosen = table[ids[t]]
        w = [scores[e] for e in chosen]
        total = sum(w) if renormalize else 1.0
        choices.append([(j, e, w[j] / total * route_scale) for j, e in enumerate(chosen)])
        logit_rows.append(logits)
        prob_rows.append(scores if score_func == "softmax" else scores / scores.sum())
    return RefRouting(choices, _stack_rows(logit_rows, E, W), _stack_rows(prob_rows, E, W), len(table[0]))


def route_topp(
    x: Tensor, W: Tensor, b: Tensor | None = None, *, top_p: float, max_k: int | None = None, renormalize: bool = False
) -> RefRouting:
    """Dynamic top-p: sort the softmax probabilities in decreasing order; keep the expert in
    sorted position j iff the probability mass before it is < top_p and j < max_k. Weights: raw
    probabilities, or divided by their sum over the kept experts. Slot j = sorted position j."""
    T, E = x.shape[0], W.shape[0]
    K = E if max_k is None else max_k
    choices, logit_rows, prob_rows, margins, order_margins = [], [], [], [], []
    for t in range(T):
        logits = _token_logits(x[t], W, b)
        probs = softmax(logits)
        values = probs.detach().tolist()
        order = sorted(range(E), key=lambda e: -values[e])
        kept, before = [], 0.0
        for j, e in enumerate(order[:K]):
            margins.append(abs(before - top_p))
            if before < top_p:
                kept.append(e)
            before += values[e]
        n = len(kept)
        margins += _gaps([values[e] for e in order[n - 1 : n + 1]])  # the kept set is the n most probable
        order_margins += _gaps([values[e] for e in kept])
        w = [probs[e] for e in kept]
        if renormalize:
            total = sum(w)
            w = [wi / total for wi in w]
        choices.append([(j, e, w[j]) for j, e in enumerate(kept)])
        logit_rows.append(logits)
        prob_rows.append(probs)
    return RefRouting(
        choices, _stack_rows(logit_rows, E, W), _stack_rows(prob_rows, E, W), K,
        min(margins, default=math.inf), min(order_margins, default=math.inf),
    )


def route_expert_choice(x: Tensor, W: Tensor, b: Tensor | None = None, *, capacity_factor: float) -> RefRouting:
    """Expert choice: probs = softmax over experts per token; each expert e takes the
    C = min(T, ceil(T * c / E)) tokens with the highest probs[:, e], with weight probs[t, e].
    A token can get 0..E experts. Slot e = expert e."""
    T, E = x.shape[0], W.shape[0]
    logit_rows = [_token_logits(x[t], W, b) for t in range(T)]
    prob_rows = [softmax(l) for l in logit_rows]
    capacity = min(T, math.ceil(T * capacity_factor / E))
    values = [p.detach().tolist() for p in prob_rows]
    picked: list[list[int]] = [[] for _ in range(T)]
    margins = []
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: -values[t][e])
        for t in ranked[:capacity]:
            picked[t].append(e)
        margins += _gaps([values[t][e] for t in ranked[capacity - 1 : capacity + 1]] if capacity else [])
    choices = [[(e, e, prob_rows[t][e]) for e in sorted(picked[t])] for t in range(T)]
    return RefRouting(
        choices, _stack_rows(logit_rows, E, W), _stack_rows(prob_rows, E, W), E, min(margins, default=math.inf)
    )


def route_relu(
    x: Tensor, W: Tensor, b: Tensor | None = None, *, norm_weight: Tensor, eps: float = 1e-6
) -> RefRouting:
    """BlockFFN: a = relu(W x); a_hat = a / sqrt(mean_e a^2 + eps); gate = g * a_hat. Expert e
    is active iff a_e > 0, with weight gate_e. probs = a_hat / (sum a_hat + 1e-5). Slot e = e."""
    T, E = x.shape[0], W.shape[0]
    choices, logit_rows, prob_rows, margins = [], [], [], []
    min_rms = math.inf
    for t in range(T):
        logits = _token_logits(x[t], W, b)
        a = relu(logits)
        a_hat = a / torch.sqrt((a * a).mean() + eps)
        gate = norm_weight * a_hat
        logit_values = logits.detach().tolist()
        choices.append([(e, e, gate[e]) for e in range(E) if logit_values[e] > 0])
        margins += [abs(v) for v in logit_values]
        if any(v > 0 for v in logit_values):
            min_rms = min(min_rms, math.sqrt(float((a * a).mean().detach())))
        logit_rows.append(logits)
        prob_rows.append(a_hat / (a_hat.sum() + 1e-5))
    routing = RefRouting(
        choices, _stack_rows(logit_rows, E, W), _stack_rows(prob_rows, E, W), E, min(margins, default=math.inf)
    )
    routing.min_rms = min_rms
    return routing


# ----------------------------------------------------------------------------- capacity dropping


@dataclass
class Capacity:
    capacity: int | None
    kept: set[tuple[int, int]]  # (token, slot) pairs that survive
    dropped_fraction: float


def apply_capacity(routing: RefRouting, num_experts: int, capacity_factor: float | None) -> Capacity:
    """GShard priority: C = ceil(cf * (number of valid assignments) / E). Each expert accepts its
    assignments in the order (slot j, token t): every first choice before any second choice,
    earlier tokens first; the ones ranked >= C are dropped. Choices past the experts (identity
    experts) are no assignments."""
    assignments = [(slot, t, e) for t, ch in enumerate(routing.choices) for slot, e, _ in ch if e < num_experts]
    if capacity_factor is None:
        return Capacity(None, {(t, slot) for slot, t, _ in assignments}, 0.0)
    capacity = math.ceil(capacity_factor * len(assignments) / num_experts)
    taken = [0] * num_experts
    kept = set()
    for slot, t, e in sorted(assignments):
        if taken[e] < capacity:
            taken[e] += 1
            kept.add((t, slot))
    dropped = len(assignments) - len(kept)
    return Capacity(capacity, kept, dropped / len(assignments) if assignments else 0.0)


# ----------------------------------------------------------------------------- experts


def expert_ffn(x_t: Tensor, e: int, p: dict[str, Tensor], activation: str = "swiglu") -> Tensor:
    """One expert on one token, from the stacked weights.
    swiglu: gate_up_proj[e] is [2I, D] (gate rows, then up rows), down_proj[e] is [D, I];
    else: up_proj[e] [I, D], act, down_proj[e] [D, I]. Optional biases."""
    if activation == "swiglu":
        w_in, b_in = p["experts.gate_up_proj"][e], p.get("experts.gate_up_bias")
    else:
        w_in, b_in = p["experts.up_proj"][e], p.get("experts.up_bias")
    h = w_in @ x_t
    if b_in is not None:
        h = h + b_in[e]
    if activation == "swiglu":
        I = w_in.shape[0] // 2
        hidden = silu(h[:I]) * h[I:]
    else:
        hidden = ACT[activation](h)
    y = p["experts.down_proj"][e] @ hidden
    b_out = p.get("experts.down_bias")
    return y if b_out is None else y + b_out[e]


def shared_ffn(x_t: Tensor, p: dict[str, Tensor], gate_act=silu, up_act=None) -> Tensor:
    """A gated MLP from nn.Linear weights ([out, in]), gate_act(gate) * up_act(up) (SwiGLU by default;
    up_act None: up as it is); times sigmoid(gate . x) if gated."""
    up = p["shared.up_proj.weight"] @ x_t
    hidden = gate_act(p["shared.gate_proj.weight"] @ x_t) * (up if up_act is None else up_act(up))
    y = p["shared.down_proj.weight"] @ hidden
    if "shared.gate.weight" in p:
        y = y * sigmoid(p["shared.gate.weight"][0] @ x_t)
    return y


# ----------------------------------------------------------------------------- losses


def balance_loss(routing: RefRouting, num_experts: int) -> Tensor:
    """E * sum_e f_e * P_e; f_e = share of the valid assignments (before dropping) that chose e,
    P_e = mean over tokens of probs[:, e]."""
    counts = [0] * num_experts
    for t in range(len(routing.choices)):
        for e in routing.experts(t):
            counts[e] += 1
    total = max(sum(counts), 1)
    T = routing.probs.shape[0]
    loss = routing.probs.new_zeros(())
    for e in range(num_experts):
        P_e = sum(routing.probs[t, e] for t in range(T)) / max(T, 1)  # a mean over no tokens is 0
        loss = loss + (counts[e] / total) * P_e
    return num_experts * loss


def z_loss(routing: RefRouting) -> Tensor:
    T = routing.logits.shape[0]
    return sum((logsumexp(routing.logits[t]) ** 2 for t in range(T)), routing.logits.new_zeros(())) / max(T, 1)


def entropy_loss(routing: RefRouting) -> Tensor:
    T, E = routing.probs.shape
    total = routing.probs.new_zeros(())
    for t in range(T):
        for e in range(E):
            p = routing.probs[t, e]
            if float(p.detach()) > 0:  # 0 log 0 = 0
                total = total - p * torch.log(p)
    return total / max(T, 1)


# ----------------------------------------------------------------------------- the layer


@dataclass
class Spec:
    """What the layer is supposed to do (mirrors MoEConfig's fields; plain data)."""

    router: str = "topk"
    top_k: int = 2
    score_func: str = "softmax"
    renormalize: bool = True
    route_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str | None = None
    top_p: float = 0.4
    max_k: int | None = None
    ec_capacity_factor: float = 2.0
    relu_eps: float = 1e-6
    activation: str = "swiglu"
    capacity_factor: float | None = None
    coefs: dict[str, float] = field(default_factory=dict)
    norm_eps: float = 1e-6  # the norms around the router and experts, where p holds them (Gemma 4)
    router_norm_multiplier: float = 1.0
    logit_scale: float = 1.0  # the router's logits times it (Muse Spark's output_multiplier)
    identity_experts: int = 0  # the router's last Z choices return the expert input (LongCat-Flash)

    @classmethod
    def from_config(cls, cfg: Any) -> Spec:
        """Read the plain settings off a MoEConfig-like object (a dataclass of numbers/strings)."""
        names = [f for f in cls.__dataclass_fields__ if f not in ("coefs", "relu_eps", "norm_eps", "router_norm_multiplier", "logit_scale")]
        spec = cls(**{n: getattr(cfg, n) for n in names})
        if spec.renormalize is None:  # MoEConfig's documented default: renormalise top-k, not top-p
            spec.renormalize = spec.router == "topk"
        spec.coefs = {"balance": cfg.balance_coef, "z": cfg.z_coef, "entropy": cfg.entropy_coef}
        return spec


def route(x: Tensor, p: dict[str, Tensor], spec: Spec) -> RefRouting:
    W, b = p["router.weight"], p.get("router.bias")
    if spec.router == "topk":
        norm = p.get("router.input_norm.weight")
        return route_topk(
            x, W, b, top_k=spec.top_k, score_func=spec.score_func, renormalize=spec.renormalize,
            route_scale=spec.route_scale, n_group=spec.n_group, topk_group=spec.topk_group, group_score=spec.group_score,
            selection_bias=p.get("router.selection_bias"), expert_scale=p.get("router.expert_scale"),
            input_norm=None if norm is None else (norm, spec.norm_eps, spec.router_norm_multiplier),
            logit_scale=spec.logit_scale,
        )
    if spec.router == "topp":
        return route_topp(x, W, b, top_p=spec.top_p, max_k=spec.max_k, renormalize=spec.renormalize)
    if spec.router == "expert_choice":
        return route_expert_choice(x, W, b, capacity_factor=spec.ec_capacity_factor)
    if spec.router == "relu":
        return route_relu(x, W, b, norm_weight=p["router.norm_weight"], eps=spec.relu_eps)
    raise ValueError(spec.router)


@dataclass
class RefResult:
    y: Tensor  # [..., D]
    routing: RefRouting
    capacity: Capacity
    losses: dict[str, Tensor]
    tokens_per_expert: list[int]

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values(), self.y.new_zeros(()))


def rms_normed(v: Tensor, g: Tensor, eps: float) -> Tensor:
    """v / sqrt(mean(v^2) + eps) * g, for one token v: [D]."""
    return v / torch.sqrt((v * v).sum() / v.shape[0] + eps) * g


def scaled_then_normed(v: Tensor, g: Tensor, eps: float) -> Tensor:
    """u / sqrt(mean(u^2) + eps) with u = v * g, for one token v: [D] (Muse Spark's post_expert_norm)."""
    return rms_normed(v * g, torch.ones_like(g), eps)


def moe_forward(x: Tensor, p: dict[str, Tensor], spec: Spec) -> RefResult:
    """y_t = sum over kept (expert e, weight w) of w * FFN_e(x_t), plus the shared expert. Where p
    holds the norms around the experts (Gemma 4): FFN_e reads rms_normed(x_t, expert_norm) and the
    sum is rms_normed(., routed_norm) before the shared expert is added. Where p holds a latent
    projection, the experts read (through expert_norm, if any) down @ x_t and the sum is up @ (.);
    where it holds an experts' output norm (Muse Spark), each FFN_e's output is
    scaled_then_normed before w weighs it. The router's last `spec.identity_experts` choices are
    identity experts: FFN_e(x_t) = x_t, and no load."""
    shape = x.shape
    D = shape[-1]
    xt = x.reshape(-1, D)
    T = xt.shape[0]
    E = p["router.weight"].shape[0] - spec.identity_experts  # the experts with weights
    routing = route(xt, p, spec)
    cap = apply_capacity(routing, E, spec.capacity_factor)
    rows = []
    for t in range(T):
        x_e = xt[t] if "latent.down_proj.weight" not in p else p["latent.down_proj.weight"] @ xt[t]
        if "expert_norm.weight" in p:
            x_e = rms_normed(x_e, p["expert_norm.weight"], spec.norm_eps)
        y_t = x_e.new_zeros(x_e.shape)
        for slot, e, w in routing.choices[t]:
            if e >= E:
                y_t = y_t + w * x_e
            elif (t, slot) in cap.kept:
                out = expert_ffn(x_e, e, p, spec.activation)
                if "experts.output_norm.weight" in p:
                    out = scaled_then_normed(out, p["experts.output_norm.weight"], spec.norm_eps)
                y_t = y_t + w * out
        if "latent.up_proj.weight" in p:
            y_t = p["latent.up_proj.weight"] @ y_t
        if "routed_norm.weight" in p:
            y_t = rms_normed(y_t, p["routed_norm.weight"], spec.norm_eps)
        if "shared.gate_proj.weight" in p:
            y_t = y_t + shared_ffn(xt[t], p)
        rows.append(y_t)
    y = torch.stack(rows) if rows else xt.new_zeros(0, D)
    load = [0] * E
    for t in range(T):
        for e in routing.experts(t):
            if e < E:
                load[e] += 1
    compute = {
        "balance": lambda: balance_loss(routing, E + spec.identity_experts),  # over every choice
        "z": lambda: z_loss(routing),
        "entropy": lambda: entropy_loss(routing),
    }
    losses = {name: coef * compute[name]() for name, coef in spec.coefs.items() if coef}
    return RefResult(y.reshape(shape), routing, cap, losses, load)


# ----------------------------------------------------------------------------- harness helpers


def f64_leaves(module: torch.nn.Module, *, buffers: bool = True) -> dict[str, Tensor]:
    """The module's parameters, by name, cloned into float64 leaves that require grad (and its
    buffers, cloned, without grad)."""
    leaves = {n: t.detach().to(F64).clone().requires_grad_(True) for n, t in module.named_parameters()}
    if buffers:
        for n, t in module.named_buffers():
            if t is not None and t.is_floating_point():
                leaves[n] = t.detach().to(F64).clone()
    return leaves


def f64_leaf(x: Tensor) -> Tensor:
    return x.detach().to(F64).clone().requires_grad_(True)


# ----------------------------------------------------------------------------- comparison harness
# (the only part that runs the code under test: it feeds the layer and the reference the same
# input and parameters and compares what comes out)


@dataclass
class Both:
    y: Tensor  # the layer's output
    result: Any  # the layer's MoEResult
    ref: RefResult
    x: Tensor  # the layer's input leaf (its .grad after backward)
    x_ref: Tensor
    leaves: dict[str, Tensor]


def run_both(layer: torch.nn.Module, spec: Spec, x: Tensor, *, backward: bool = True, seed: int = 0) -> Both:
    """Run layer(x) and the reference on float64 clones of x and the layer's parameters; with
    backward, backpropagate sum(y * G) + total aux loss (G random) through both."""
    leaves = f64_leaves(layer)
    x_ref = f64_leaf(x)
    x_l = x.detach().clone().requires_grad_(backward)
    layer.zero_grad(set_to_none=True)
    y, result = layer(x_l)
    ref = moe_forward(x_ref, leaves, spec)
    if backward:
        G = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        for objective in ((y.to(F64) * G).sum() + result.loss.to(F64), (ref.y * G).sum() + ref.loss):
            if objective.requires_grad:  # not when nothing was routed and there is no loss
                objective.backward()
    return Both(y, result, ref, x_l, x_ref, leaves)


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-5, rtol: float = 1e-5, what: str = "") -> None:
    """|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|, elementwise: the
    absolute tolerance is relative to the tensor's scale, because a float32 gradient that sums
    many O(1) terms to O(10) carries O(10) * 1e-6 of rounding error whatever the implementation."""
    expected = expected.detach().to(F64)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().to(F64), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def assert_no_near_tie(routing: RefRouting, *, ordered: bool, tol: float = 1e-5) -> None:
    """Fixed-seed tests call this so that they are not comparing a coin flip."""
    margin = routing.safe_margin(ordered)
    if margin <= tol:
        raise AssertionError(f"the test data has a near-tie (margin {margin:.2e} <= {tol}); change the seed")


def assert_matches(
    both: Both,
    layer: torch.nn.Module,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    grads: bool = True,
    grad_tol: float | None = None,
):
    """Output, aux losses, load, dropped fraction and (with grads) the gradient of x and of every
    parameter equal the reference's (gradients within grad_tol, default atol/rtol)."""
    ref, result = both.ref, both.result
    assert both.y.shape == ref.y.shape
    assert_close(both.y, ref.y, atol, rtol, "output y")
    assert set(result.losses) == set(ref.losses), (sorted(result.losses), sorted(ref.losses))
    for name, value in ref.losses.items():
        assert_close(result.losses[name], value, atol, rtol, f"loss {name}")
    assert result.tokens_per_expert.tolist() == ref.tokens_per_expert, "tokens_per_expert"
    dropped = float(result.dropped_fraction)
    assert abs(dropped - ref.capacity.dropped_fraction) < 1e-7, (
        f"dropped_fraction {dropped} != reference {ref.capacity.dropped_fraction} "
        f"({ref.routing.num_assignments()} assignments, capacity {ref.capacity.capacity})"
    )
    if not grads:
        return
    if grad_tol is not None:
        atol = rtol = grad_tol
    zeros = torch.zeros_like(both.x_ref)
    assert_close(
        zeros if both.x.grad is None else both.x.grad, zeros if both.x_ref.grad is None else both.x_ref.grad,
        atol, rtol, "grad x",
    )
    for name, param in layer.named_parameters():
        expected = both.leaves[name].grad
        if expected is None:
            expected = torch.zeros_like(both.leaves[name])
        actual = param.grad if param.grad is not None else torch.zeros_like(param)
        assert_close(actual, expected, atol, rtol, f"grad {name}")
