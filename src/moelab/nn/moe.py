"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.nn.blockffn import (
    activation_locality_loss,
    active_experts,
    chunk_sparsification_loss,
    sparsity_metrics,
)
from moelab.nn.dispatch import DispatchPlan, LocalDispatcher, plan_dispatch
from moelab.nn.expert_threads import expert_workers
from moelab.nn.experts import Experts, SharedExperts
from moelab.nn.latent import LatentProjection
from moelab.nn.losses import load_balancing_loss, router_entropy_loss, router_z_loss
from moelab.nn.opaque import register, routed_experts
from moelab.nn.routers import Router, Routing, deferred_logit_check, dynamic_skip, skip_weak_experts
from moelab.validation import is_int, is_positive_finite


@dataclass
class MoEResult:
    """What a forward pass reports besides its output.

    losses: coefficient-weighted auxiliary losses by name ("balance", "z", "entropy",
        "locality", "chunk_sparsity"), only
        those with a non-zero coefficient; `loss` is their sum (0 if none).
    tokens_per_expert: [E] assignments per expert (the load, before capacity dropping).
    dropped_fraction: [] fraction of assignments dropped by the capacity limit (0 if dropless).
    experts_per_token: [] mean number of experts a token was sent to.
    routing: the router's full output when the layer was asked to trace, else None.
    metrics: detached scalar diagnostics by name; routers with a variable number of experts per
        token report BlockFFN's sparsity: "tls" (token-level) and "cls" (chunk-level, chunks of
        the layer's `sparsity_window` consecutive tokens of a sequence; input [B, S, D] only).
    logits_finite: [] bool, whether the router logits were finite, where a training step ran
        without a host synchronisation (its experts on `torch._grouped_mm`) and so left that
        check to the caller (moelab's trainer checks it after each micro-batch); None where the
        router checked them itself and would have raised.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    tokens_per_expert: Tensor | None = None
    dropped_fraction: Tensor | None = None
    experts_per_token: Tensor | None = None
    routing: Routing | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    logits_finite: Tensor | None = None

    @classmethod
    def merge(cls, results: list[MoEResult]) -> MoEResult:
        """Combine the results of several routed passes over the same tokens (e.g. the iterations
        of a Chain-of-Experts layer): losses and loads add up, experts per token add up, the
        dropped fraction and the metrics are averaged, routings are dropped."""
        return cls(
            losses=sum_by_name([r.losses for r in results]),
            tokens_per_expert=torch.stack([r.tokens_per_expert for r in results]).sum(0),
            dropped_fraction=torch.stack([r.dropped_fraction for r in results]).mean(),
            experts_per_token=torch.stack([r.experts_per_token for r in results]).sum(),
            routing=None,
            metrics=mean_by_name([r.metrics for r in results]),
            logits_finite=all_finite([r.logits_finite for r in results]),
        )

    @property
    def loss(self) -> Tensor:
        if not self.losses:
            device = None if self.tokens_per_expert is None else self.tokens_per_expert.device
            return torch.zeros((), device=device)
        return torch.stack(list(self.losses.values())).sum()


def all_finite(flags: list[Tensor | None]) -> Tensor | None:
    """The `logits_finite` of several passes: [] bool, all of the given flags; None if none."""
    given = [f for f in flags if f is not None]
    return torch.stack(given).all() if given else None


def sum_by_name(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """{name: sum of the values of that name} over the dicts that have it."""
    total: dict[str, Tensor] = {}
    for d in dicts:
        for name, value in d.items():
            total[name] = total[name] + value if name in total else value
    return total


def mean_by_name(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """{name: mean of the values of that name} over the dicts that have it."""
    counts: dict[str, int] = {}
    for d in dicts:
        for name in d:
            counts[name] = counts.get(name, 0) + 1
    return {name: value / counts[name] for name, value in sum_by_name(dicts).items()}


def router_inputs(router: Router, x: Tensor, context: dict[str, Tensor] | None) -> tuple[Tensor | None, ...]:
    """What a router that reads a per-token input from the block's context (`Router.context_input`:
    a hash router's token ids, an `MLPRouter`'s state) takes beside x [..., D]: (context[name] with
    x's leading dims flattened: ids [T], states [T, R],), or (None,) where the context has none (a
    hash router then names what is missing, an MLP router reads no state); () for other routers."""
    name = router.context_input
    if name is None:
        return ()
    value, ids = (context or {}).get(name), router.reads_token_ids
    if value is not None and (value.shape != x.shape[:-1] if ids else value.shape[: x.dim() - 1] != x.shape[:-1]):
        want = "ids of shape " + str(list(x.shape[:-1])) if ids else f"the leading shape {list(x.shape[:-1])}"
        raise ValueError(
            f"context[{name!r}] has shape {list(value.shape)}; the router reads one entry per token of the "
            f"input {list(x.shape)}: give {want}"
        )
    return (None if value is None else value.reshape(-1, *value.shape[x.dim() - 1 :]),)


IDENTITY_RETURNS = ("input", "zero")  # what a slot on a zero-computation expert returns (`MoELayer`)


def identity_output(identity: Tensor, rows: Tensor) -> Tensor:
    """What identity experts add: their weights identity [T, K] (0 in the other slots), summed in
    float32 or finer, times the rows the experts read [T, D] -> [T, D]."""
    return identity.to(torch.promote_types(identity.dtype, rows.dtype)).sum(-1, keepdim=True) * rows


class MoELayer(nn.Module):
    """A sparse FFN: `forward(x [..., D]) -> (y [..., D], MoEResult)`.

    router: any `moelab.nn.routers.Router`; experts: stacked experts (`SwiGLUExperts`,
    `MLPExperts`); shared: optional always-on `SharedExperts` added to the routed output.
    capacity_factor: None for dropless dispatch (the default), else each expert keeps at most
    ceil(capacity_factor * T*K / E) assignments and the rest are dropped (Switch/GShard).
    balance_coef, z_coef, entropy_coef: weights of the auxiliary losses in `MoEResult.losses`.
    locality_coef, chunk_sparsity_coef, chunk_len: BlockFFN's activation-locality and chunk
        sparsification losses (`moelab.nn.blockffn`); they need input [B, S, D].
    trace: if True, every forward pass also returns its `Routing` in `MoEResult.routing`.
    latent: Mixture of Latent Experts (`moelab.nn.latent`): the router sees x, the experts work
        in the shared latent space (their dim is the latent rank) and the combined output is
        projected back to D.
    expert_norm, routed_norm: norms around the routed experts (Gemma 4's, `ScaledRMSNorm`): the
        experts read expert_norm(x) while the router reads x (through its own `input_norm`), and
        their combined output is routed_norm(y) before the shared experts' output is added. In a
        latent layer the experts read expert_norm(down(x)) (Muse Spark's pre_expert_norm); no
        routed_norm there.
    output_bias: optional [D] added to every token's output last, whatever the routing (JetMoE's
        block bias); a parameter of the layer, added once on every path (`_finish`).
    identity_experts: Z zero-computation experts (LongCat-Flash's; MoE++'s copy experts): the
        router chooses among E + Z, and a slot given to one of the last Z returns its input
        (what the routed experts read) times its weight, with no weights of its own; with
        identity_returns="zero" it returns nothing (ZAYA's skip expert). `num_experts` counts the
        E experts with weights; the dispatch, loads and `experts_per_token` see those.
    sparsity_window: chunk length L of the "cls" metric of variable-k routers (BlockFFN: 8).
    dispatcher: how rows reach the experts; `LocalDispatcher` (default) or an expert-parallel
        one (`moelab.distributed`), in which case `experts` holds this rank's experts only.
    skip_ratio (an attribute, default None): NAEE dynamic skipping at inference, a chosen expert
        whose weight is below skip_ratio times the token's largest is dropped (`dynamic_skip`).
    gather_rows (an attribute, default E): `infer` on a CPU runs the experts on gathered weights
        when T*K is at most this (the gathered copies then hold no more than the E experts' weights),
    gather_bytes (an attribute, default 256 KiB): and, run eagerly on a CPU with more than one
        token, when an expert's weights are at most this: copying a larger expert costs more than
        the per-expert loop's overhead, and going expert by expert over the weights in place is
        faster (1.8-10x at 2-35 MB experts, measured). One token's experts are applied in place by
        `gathered_mlp` itself, whatever the size.
    compiled_gather_bytes (an attribute, default 8 MiB): the same bound for a compiled step on a
        CPU, where the gathered form reads the weights in place but reads an expert two tokens
        share twice, and the alternative (the opaque op `routed_experts`, expert by expert) reads
        each once: at 2-4 tokens of 8 experts top-2, gathered was 1.2-1.9x faster for experts of
        0.6-3 MB, 0.9-1.2x at 6-13 MB, 0.75-0.8x at 25-35 MB (measured).
    every_expert_work, every_expert_share (attributes, default 2^24 and 0.75): past the gathered
        path and the grouped call, `infer` on a CPU runs every expert on every token where at
        least that share of the experts have rows and it adds at most this many multiply-adds
        (`_runs_every_expert`: few tokens on small experts, faster than a loop over experts).
    gpu_gather_bytes (an attribute, default 64 MiB): on a GPU, `infer` gathers the T*K rows'
        experts when their copies take at most this: no host synchronisation (the dispatch
        plan's counts), few kernels, so a compiled decode step can be captured in a CUDA graph;
        larger experts are read in place through the dispatch, with its counts kept on the device
        where `torch._grouped_mm` takes them (bf16; `_routes_on_device`), so that it too stays
        capturable; else (fp32 on CUDA) planned on the host.
    stats_group (an attribute, default None): the data-parallel process group whose ranks' tokens
        form one batch; the balance loss then counts the load of the whole batch
        (`load_balancing_loss`).
    """

    def __init__(
        self,
        router: Router,
        experts: Experts,
        shared: SharedExperts | None = None,
        *,
        capacity_factor: float | None = None,
        balance_coef: float = 0.0,
        z_coef: float = 0.0,
        entropy_coef: float = 0.0,
        locality_coef: float = 0.0,
        chunk_sparsity_coef: float = 0.0,
        chunk_len: int = 64,
        trace: bool = False,
        latent: LatentProjection | None = None,
        sparsity_window: int = 8,
        dispatcher: LocalDispatcher | None = None,
        expert_norm: nn.Module | None = None,
        routed_norm: nn.Module | None = None,
        output_bias: Tensor | None = None,
        identity_experts: int = 0,
        identity_returns: str = "input",
    ):
        super().__init__()
        if identity_returns not in IDENTITY_RETURNS:
            raise ValueError(f"identity_returns must be one of {IDENTITY_RETURNS}, got {identity_returns!r}")
        dispatcher = dispatcher or LocalDispatcher()
        if not is_int(identity_experts) or not 0 <= identity_experts < router.num_experts:
            raise ValueError(
                f"identity_experts must be an int in [0, {router.num_experts}) (the router's {router.num_experts} "
                f"choices hold them and at least one expert with weights), got {identity_experts!r}"
            )
        if identity_experts and latent is not None:
            raise ValueError("identity experts in a latent layer would return the latent rows; give one or the other")
        local = dispatcher.num_local_experts(router.num_experts - identity_experts)
        expert_dim = router.dim if latent is None else latent.rank
        if latent is not None and latent.dim != router.dim:
            raise ValueError(f"latent projection dim {latent.dim} does not match the router's dim {router.dim}")
        if local != experts.num_experts or expert_dim != experts.dim:
            raise ValueError(
                f"router ({router.num_experts - identity_experts} experts"
                f"{f' and {identity_experts} identity experts' if identity_experts else ''}, {local} on this rank, dim {router.dim}"
                f"{'' if latent is None else f', latent rank {latent.rank}'}) does not match "
                f"experts ({experts.num_experts} experts, dim {experts.dim})"
            )
        if latent is not None and routed_norm is not None:
            raise ValueError("a latent layer with a norm of its experts' sum is not supported; give one or the other")
        if output_bias is not None and tuple(output_bias.shape) != (router.dim,):
            raise ValueError(
                f"output_bias has shape {list(output_bias.shape)}; the layer's output is {router.dim} wide: "
                f"give [{router.dim}]"
            )
        if sparsity_window < 1:
            raise ValueError(f"sparsity_window must be >= 1, got {sparsity_window}")
        if capacity_factor is not None and not is_positive_finite(capacity_factor):
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless) and finite, got {capacity_factor}")
        self.router = router
        self.experts = experts
        self.shared = shared
        self.capacity_factor = capacity_factor
        self.coefs = {
            "balance": balance_coef,
            "z": z_coef,
            "entropy": entropy_coef,
            "locality": locality_coef,
            "chunk_sparsity": chunk_sparsity_coef,
        }
        self.chunk_len = chunk_len
        self.trace = trace
        self.latent = latent
        self.expert_norm = expert_norm
        self.routed_norm = routed_norm
        if output_bias is None:
            self.register_parameter("output_bias", None)
        else:
            self.output_bias = output_bias if isinstance(output_bias, nn.Parameter) else nn.Parameter(output_bias)
        self.sparsity_window = sparsity_window
        self.dispatcher = dispatcher
        self.identity_experts = identity_experts
        self.identity_returns = identity_returns
        self.skip_ratio: float | None = None  # NAEE dynamic skipping, an inference-time option (`dynamic_skip`)
        self.gather_rows = self.num_experts  # `infer` gathers expert weights up to this many T*K rows
        self.gather_bytes = 2**18  # ... and, eagerly on a CPU, experts of up to this many bytes
        self.compiled_gather_bytes = 2**23  # ... and, compiled on a CPU, of up to this many
        self.gpu_gather_bytes = 2**26  # on a GPU: T*K experts' copies of up to this many bytes
        self.small_expert_work = 2**25  # `infer` on a CPU: one torch._grouped_mm call up to this much work per expert
        self.small_expert_count = 16  # ... where at least this many experts have rows (`_small_experts`)
        self.every_expert_work = 2**24  # `infer` on a CPU: every expert on every token up to this extra work
        self.every_expert_share = 0.75  # ... where at least this share of the experts have rows
        self.stats_group = None  # data-parallel ranks whose load the balance loss counts
        register(self)  # a compiled step calls `run_experts` through the opaque op, by id

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        register(self)  # a copy (copy.deepcopy, pickle) is another layer

    @property
    def num_experts(self) -> int:
        """E, the experts with weights (the router chooses among E + `identity_experts`)."""
        return self.router.num_experts - self.identity_experts

    @property
    def causal(self) -> bool:
        """Whether a token's output depends on that token alone (safe in a causal LM): the router
        must be causal, and capacity dropping must be off (who is dropped depends on the batch)."""
        return self.router.causal and self.capacity_factor is None

    def forward(
        self, x: Tensor, router: Router | None = None, *, context: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, MoEResult]:
        """x: [..., D] -> (y [..., D], MoEResult). `router` replaces the layer's own for this call
        (Chain-of-Experts routes each iteration with its own router over the same experts);
        `context` goes to routers that need whole sequences, and its entry `router.context_input`
        to routers that read one (the token ids, an MLP router's state: see `_route`)."""
        router = self.router if router is None else router
        shape = x.shape
        # A training step on experts on torch._grouped_mm: the counts stay on the device and the
        # router's logits are checked by the caller (the trainer), so the step never waits for
        # the routing (a GPU runs ahead). Not for variable-k routers (without the counts each of
        # their T*K slots, K up to E, needs a row), nor outside training, where nobody would check.
        sync_free = (
            self.training
            and torch.is_grad_enabled()
            and self._local_dropless
            and not router.variable_k
            and self.experts.takes_device_counts(x.device, x.dtype)
        )
        with deferred_logit_check() if sync_free else contextlib.nullcontext() as finite:
            routing, x = self._route(router, x, context)
        indices, weights, identity = self.split_identity(routing.indices, routing.weights)
        plan = plan_dispatch(indices, self.num_experts, self.capacity_factor, host_counts=not sync_free)
        rows = self.expert_rows(x)
        # Only dynamic skipping and identity experts empty slots of a fixed-k router: without them
        # the device counts cover every row, and the experts mask nothing.
        fixed = self.skip_ratio is None and not self.identity_experts
        options = {"rows_past_counts": False} if sync_free and fixed else {}
        y = self._finish(x, self._dispatched(rows, weights, plan, **options), rows, identity)
        result = MoEResult(
            losses=self._losses(routing, shape[:-1]),
            tokens_per_expert=plan.tokens_per_expert,
            dropped_fraction=plan.dropped_fraction,
            experts_per_token=(indices >= 0).sum() / max(x.shape[0], 1),
            routing=routing if self.trace else None,
            metrics=self._metrics(router, routing, shape[:-1]),
            logits_finite=all_finite(finite or []),
        )
        return y.view(shape), result

    def infer(self, x: Tensor, router: Router | None = None, *, context: dict[str, Tensor] | None = None) -> Tensor:
        """The inference path: `forward`'s output alone (no losses, loads or metrics), x: [..., D]
        -> [..., D]. A few tokens (on a CPU T*K <= `gather_rows`, and one token or experts of at
        most `gather_bytes`, compiled `compiled_gather_bytes`; on a GPU T*K experts' copies of at
        most `gpu_gather_bytes`) run their experts on gathered
        weights (`gathered_mlp`): a fixed sequence of operations, no host synchronisation, no loop
        over experts. The others run `routed`, which plans the dispatch on the host (on a GPU in
        bf16, on the device: `_routes_on_device`). Compiled,
        everything but the gathered path (and experts that read the routing on the host, as
        offloaded ones do) runs inside the opaque op `routed_experts`, so the step stays one
        graph. Capacity dropping and expert parallelism run `forward`."""
        router = self.router if router is None else router
        if not self._local_dropless:
            return self(x, router, context=context)[0]  # who is dropped, or where rows go, depends on the batch
        shape = x.shape
        indices, weights, x = self._choose(router, x, context)
        indices, weights, identity = self.split_identity(indices, weights)
        rows = self.expert_rows(x)
        if torch.compiler.is_compiling() and (
            self.experts.reads_routing_on_host or not self._gathers_rows(indices.numel(), x.device)
        ):
            y = routed_experts(rows, indices, weights, id(self))
        else:
            y = self.run_experts(rows, indices, weights)
        return self._finish(x, y, rows, identity).view(shape)

    def split_identity(self, indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """indices, weights: [T, K] over E + Z choices -> (indices with the identity experts' slots
        emptied (-1), weights with theirs 0, the identity experts' weights [T, K] (0 in the other
        slots)), or (indices, weights, None) in a layer without identity experts."""
        if not self.identity_experts:
            return indices, weights, None
        identity = indices >= self.num_experts
        return indices.masked_fill(identity, -1), weights.masked_fill(identity, 0.0), weights.masked_fill(~identity, 0.0)

    def run_experts(self, rows: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """`infer`'s routed experts: rows [T, D or latent rank] with their routing (indices,
        weights: [T, K]) -> the combined [T, ...], on gathered weights where `_gathers_rows`
        says so, else through `routed`. What the opaque op `routed_experts` runs."""
        if self._gathers_rows(indices.numel(), rows.device):
            return self.experts.gathered(rows, indices, weights)
        return self.routed(rows, indices, weights)

    def routed(self, rows: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The routed experts beyond the gathered path (see `run_experts`). On a CPU expert by
        expert, each expert gathering its rows and adding its outputs into the result
        (`accumulated_mlp`: no [N, D] buffers, the weights read in place), or, where each expert
        has little work (`small_expert_work`), through the dispatch and one `torch._grouped_mm`
        call per projection, or, for a few tokens that choose most of a few small experts, every
        expert on every token (`_runs_every_expert`); on a GPU the training path's dispatch, its
        counts on the device where `_routes_on_device` (offloaded experts, which fetch their
        weights into cache slots, go expert by expert there too: each expert adds into distinct
        tokens, so its `index_add_` is deterministic)."""
        if self._routes_on_device(rows.device, rows.dtype):  # masked past the counts: any slot may be empty
            return self._dispatched(rows, weights, plan_dispatch(indices, self.num_experts, host_counts=False))
        if self._runs_every_expert(indices, rows):
            return self.experts.every_expert(rows, indices, weights)
        plan = plan_dispatch(indices, self.num_experts)
        if rows.device.type != "cpu" and not self.experts.reads_routing_on_host:
            return self._dispatched(rows, weights, plan)  # index_add_ of repeated tokens is not deterministic on GPUs
        if self._small_experts(plan.counts, rows):
            return self._dispatched(rows, weights, plan, backend="grouped_mm")
        row_weights = weights.reshape(-1).index_select(0, plan.slots)
        return self.experts.accumulated(rows, plan.token_ids, plan.counts, row_weights)

    def _runs_every_expert(self, indices: Tensor, rows: Tensor) -> bool:
        """Whether `routed` runs every expert on every one of the T tokens (`every_expert_mlp`: two
        batched products, no dispatch, no loop over experts): on a CPU, where the products this
        adds, (E*T - T*K) experts' weights in multiply-adds, are at most `every_expert_work`, and
        the tokens chose at least `every_expert_share` of the experts (so that it reads about the
        weights a loop over them would) but fewer than `small_expert_count` (from there one grouped
        call, `_small_experts`, runs them without the extra products). Few tokens on few small
        experts, where a loop's per-expert overhead (~30-50 us each) costs more than the products
        it saves: `ref-8e-top2`'s layer (8 experts of 147k weights, top-2) at 4 / 8 / 16 tokens in
        238 / 336 / 533 against 375 / 491 / 672 us (caches warm), at 32 tokens (28M extra) 947
        against 852; decoding 2 tokens (3-4 of the 8 chosen, all 8 read) it lost 18 %. With 32
        experts of 37k weights, top-4, at 16 tokens the grouped call was as fast (611 against
        626 us) and decoded 1.05x faster."""
        E, least = self.num_experts, self.every_expert_share * self.num_experts
        if rows.device.type != "cpu" or not self.experts.runs_every_expert or not least <= indices.numel():
            return False  # the cheap checks first: a decode step of one or two tokens asks at every layer
        if least >= self.small_expert_count:
            return False
        weights_per_expert = self.experts.expert_bytes / rows.element_size()
        if (E * indices.shape[0] - indices.numel()) * weights_per_expert > self.every_expert_work:
            return False
        slots = torch.where(indices < 0, E, indices).flatten()  # empty slots to a column past the experts
        chosen = int(torch.zeros(E + 1, dtype=torch.bool).index_fill_(0, slots, True)[:E].sum())
        return least <= chosen < self.small_expert_count

    def _small_experts(self, counts: tuple[int, ...], rows: Tensor) -> bool:
        """Whether `infer` on a CPU runs its routed rows (`counts` per expert) as one
        `torch._grouped_mm` call per projection (its loop over experts in C++) rather than expert
        by expert in Python: where an expert's work (its rows times its weights, in multiply-adds)
        is at most `small_expert_work`, the per-expert Python costs more than the [N, D] copies
        it saves (measured on one layer, 1-2 threads: 1.2-1.6x faster at 4-64 rows per expert of
        32 experts of 37k weights, 1.07-1.26x at 32 rows of 64 experts of 540k weights, even at 128
        rows, 0.6-0.75x at 512-1,024; `ref-32e-top4-shared` decoding batch 32, 1.15x), where at
        least `small_expert_count` experts have rows (`ref-8e-top2`'s 8: 0.96-0.99x end to end),
        and only where the experts would run one after another on this thread anyway: with
        one busy process beside 2 threads, the experts on worker threads
        (`moelab.nn.expert_threads`) kept 3.4x the speed of the grouped call's 2-thread GEMMs."""
        weights_per_expert = self.experts.expert_bytes / rows.element_size()
        work = sum(counts) / self.num_experts * weights_per_expert
        return (
            work <= self.small_expert_work
            and sum(1 for n in counts if n) >= self.small_expert_count
            and expert_workers(counts, rows.device) == 1
            and self.experts.runs_grouped_mm(rows.device, rows.dtype)
        )

    def compiled_infer_syncs(self, tokens: int, device: torch.device) -> bool:
        """Whether `infer`, compiled, over `tokens` tokens on `device` reads anything back to the
        host (the dispatch plan's counts, or offloaded experts' routing; eagerly the router's
        finiteness check reads back too): else a compiled step of it can be captured in a CUDA
        graph."""
        if self.experts.reads_routing_on_host:
            return True
        gathers = self._gathers_rows(tokens * self.router.top_k, device)
        return not (gathers or self._routes_on_device(device, self.experts.dtype))

    def _routes_on_device(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether `routed` keeps the dispatch plan's counts on the device (no host synchronisation):
        on a GPU, where the experts run on `torch._grouped_mm` (bf16 on CUDA) and the router has a
        fixed k (a variable-k router's T*K slots, K up to E, would each need a row)."""
        return device.type != "cpu" and not self.router.variable_k and self.experts.takes_device_counts(device, dtype)

    @property
    def compiles_infer(self) -> bool:
        """Whether `infer` compiles as one graph (no break): dropless on one rank, where its
        routed experts run on gathered weights or inside the opaque op `routed_experts`."""
        return self._local_dropless

    def _gathers_rows(self, rows: int, device: torch.device) -> bool:
        """Whether `infer` runs `rows` routed rows (T*K) on gathered weights (see the class docstring)."""
        if device.type != "cpu":
            return rows * self.experts.expert_bytes <= self.gpu_gather_bytes
        if rows > self.gather_rows:
            return False
        if rows <= self.router.top_k:
            return True
        limit = self.compiled_gather_bytes if torch.compiler.is_compiling() else self.gather_bytes
        return self.experts.expert_bytes <= limit

    @property
    def _local_dropless(self) -> bool:
        return self.capacity_factor is None and type(self.dispatcher) is LocalDispatcher

    def _route(self, router: Router, x: Tensor, context: dict[str, Tensor] | None) -> tuple[Routing, Tensor]:
        """Check x: [..., D] and route it (with dynamic skipping if set) -> (Routing over [T] tokens,
        x as [T, D]). Routers that need whole sequences (`router.needs_sequences`) get x as [B, S, D]
        and the block's `context` (e.g. the attention's queries and keys for attention-aware routing);
        routers that read a per-token input (`router.context_input`: the token ids, an MLP router's
        state) get that entry of the context ([..., ...], x's leading dims) flattened beside x
        (`router_inputs`)."""
        self._check_input(router, x)
        if router.needs_sequences:
            routing, x = router(x, context=context or {}), x.reshape(-1, router.dim)
        else:
            ids = router_inputs(router, x, context)
            x = x.reshape(-1, router.dim)
            routing = router(x, *ids)
        return (routing if self.skip_ratio is None else dynamic_skip(routing, self.skip_ratio, self.num_experts)), x

    def _choose(
        self, router: Router, x: Tensor, context: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`_route` for the inference path: (indices, weights [T, K], x as [T, D]), by the router's
        `choose` where it routes one token at a time."""
        if router.needs_sequences:
            routing, x = self._route(router, x, context)
            return routing.indices, routing.weights, x
        self._check_input(router, x)
        ids = router_inputs(router, x, context)
        x = x.reshape(-1, router.dim)
        indices, weights = router.choose(x, *ids)
        if self.skip_ratio is not None:
            indices, weights = skip_weak_experts(indices, weights, self.skip_ratio, self.num_experts)
        return indices, weights, x

    def _check_input(self, router: Router, x: Tensor) -> None:
        """x: [..., D] in the parameters' floating dtype; [B, S, D] for routers that need sequences."""
        dim = router.dim
        if x.dim() == 0 or x.shape[-1] != dim:
            raise ValueError(f"MoE layer expects input [..., {dim}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE layer expects a floating-point input, got {x.dtype}")
        param_dtype = self.experts.dtype
        if x.dtype != param_dtype:
            raise ValueError(
                f"input dtype {x.dtype} differs from the layer's parameters ({param_dtype}); "
                f"cast one of them (x.to({param_dtype}) or layer.to({x.dtype}))"
            )
        if router.needs_sequences and x.dim() != 3:
            raise ValueError(
                f"{type(router).__name__} routes whole sequences; it needs input [batch, seq, dim], "
                f"got {list(x.shape)}"
            )

    def _dispatched(self, rows: Tensor, weights: Tensor, plan: DispatchPlan, **options) -> Tensor:
        """rows: [T, D or latent rank] with their routing weights [T, K] through the dispatcher and
        the experts (with `options` for their forward: backend, rows_past_counts) -> the combined [T, ...]."""
        batch = self.dispatcher.dispatch(rows, weights, plan)
        return self.dispatcher.combine(self.experts(batch.rows, batch.counts, batch.row_weights, **options), plan, batch)

    def expert_rows(self, x: Tensor) -> Tensor:
        """x: [T, D] -> what the routed experts read: x, or down(x) in a latent layer, through
        expert_norm where the layer has one."""
        if self.latent is not None:
            x = self.latent.down(x)
        return x if self.expert_norm is None else self.expert_norm(x)

    def routed_output(self, y: Tensor) -> Tensor:
        """The routed experts' combined output y: [T, D or latent rank] -> their part of the layer's
        output [T, D]: projected up from the latent space, or routed_norm(y)."""
        if self.latent is not None:
            return self.latent.up(y)
        return y if self.routed_norm is None else self.routed_norm(y)

    def _finish(self, x: Tensor, y: Tensor, rows: Tensor, identity: Tensor | None) -> Tensor:
        """The routed experts' combined output y: [T, D or latent rank] -> [T, D]: plus the identity
        experts' (their weights `identity` [T, K], summed in float32 or finer, times the rows the
        experts read; nothing where they return zero, `identity_returns`), then `routed_output`, plus
        the shared experts' output on x: [T, D], plus
        `output_bias`. Every path (`forward`, `infer`, compiled or not) ends here, so each is added once."""
        if identity is not None and self.identity_returns == "input":
            y = y + identity_output(identity, rows).to(y.dtype)
        y = self.routed_output(y)
        if self.shared is not None:
            y = y + self.shared(x)
        return y if self.output_bias is None else y + self.output_bias

    def _metrics(self, router: Router, routing: Routing, token_shape: torch.Size) -> dict[str, Tensor]:
        """BlockFFN's TLS and CLS for routers with a variable number of experts per token, over the
        experts with weights (an identity expert computes nothing)."""
        if not router.variable_k:
            return {}
        with torch.no_grad():
            computed = self.split_identity(routing.indices, routing.weights)[0]
            active = active_experts(computed, self.num_experts)  # [T, E]
            seqs = active.view(*token_shape, self.num_experts) if len(token_shape) == 2 else None
            return sparsity_metrics(active, seqs, self.sparsity_window)

    def _losses(self, routing: Routing, token_shape: torch.Size) -> dict[str, Tensor]:
        """The weighted auxiliary losses; token_shape is the input's shape without D ([B, S] for
        sequences), which the sequence-level BlockFFN losses need."""
        if (self.coefs["locality"] or self.coefs["chunk_sparsity"]) and len(token_shape) != 2:
            raise ValueError("the locality and chunk-sparsity losses need input of shape [batch, seq, dim]")
        compute = {
            "balance": lambda: load_balancing_loss(routing.probs, routing.indices, self.stats_group),
            "z": lambda: router_z_loss(routing.logits),
            "entropy": lambda: router_entropy_loss(routing.probs),
            "locality": lambda: activation_locality_loss(routing.logits.view(*token_shape, -1)),
            "chunk_sparsity": lambda: chunk_sparsification_loss(routing.probs.view(*token_shape, -1), self.chunk_len),
        }
        return {name: coef * compute[name]() for name, coef in self.coefs.items() if coef}
