"""A checkpoint run with its routed experts offloaded: everything else in memory, experts read
from the safetensors files into an `ExpertCache` as the routing asks for them.

    model = load_offloaded("path/to/checkpoint", resident=0.25, prior=RoutingPrior.from_trace(trace))
    ids = model.generate(prompt_ids, max_new_tokens=64)     # greedy (or sampling=Sampling(...)), [B, S + 64]
    model.cache.stats                                        # hits, misses, prefetch accuracy

Works for moelab checkpoints (the model's own MoE layers keep everything but their experts), for
the transformers checkpoints moelab's decoder represents exactly (Mixtral, zero-bias Qwen2-MoE:
run as a moelab model, converted as they load, `moelab.hf.conversion`) and for every other
transformers family the checkpoint view reads (each MoE block is computed by a moelab `MoELayer`
built from the view, as in `moelab.hf.layerwise`). Each MoE layer's experts are an
`OffloadedExperts`: with a predictor, when its decoder layer starts, a hook scores the layer's
likely experts from the layer's input and starts reading them on a background thread while the
attention runs; after routing it fetches the experts its tokens chose (reading a miss on the
spot), then computes on the pool's slots with the in-memory kernels, so the outputs equal the
model held in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moelab.hf.adapters import NATIVE
from moelab.hf.checkpoint import CheckpointError
from moelab.hf.conversion import CONVERTIBLE_FAMILIES, conversion_problems, moelab_config, moelab_tensors
from moelab.hf.layerwise import (
    float32_names,
    install_moe,
    load_tensors,
    native_skeleton,
    replaced_modules,
    set_tensor,
    skeleton,
    tied_names,
)
from moelab.hf.layouts import config_entry
from moelab.hf.modules import beside_language_model, decoder_layers, find_moe_modules
from moelab.hf.native import (
    identity_returns,
    latent_from_view,
    norm_from_view,
    router_from_view,
    shared_from_view,
    with_output_norm,
)
from moelab.hf.view import MoELayerView, NormView
from moelab.memory import available_memory
from moelab.models.reference import model_dir
from moelab.models.transformer import (
    MoETransformer,
    Sampling,
    TokenStreamer,
    decode_cache_length,
    left_padding,
)
from moelab.nn.dispatch import plan_dispatch
from moelab.nn.experts import Experts
from moelab.nn.moe import MoELayer
from moelab.nn.routers import HashRouter, Router
from moelab.offload.cache import ExpertCache
from moelab.offload.predict import PREDICTORS, RoutingPrior, lookahead_scores
from moelab.offload.store import ExpertStore
from moelab.validation import check_device, is_int, is_number, non_finite_names

POLICIES = {  # name: load_offloaded's (eviction, predictor, prefetch_factor)
    "lru": ("lru", None, 0.0),  # the Mixtral-offloading cache without its speculative loading
    "reuse": ("reuse", None, 0.0),  # load_offloaded's default: no read-ahead, fewest reads (see load_offloaded)
    "affinity": ("reuse", "affinity", 1.5),
    "lookahead-x1": ("reuse", "lookahead", 1.0),
    "lookahead": ("reuse", "lookahead", 1.5),  # the highest hit rates
    "both": ("reuse", "both", 1.5),
}

# A decoder layer's norm before its MoE block (moelab's, transformers', Nemotron-H's one norm before
# its mixer); without one the router reads the raw residual stream (the same choices when the
# norm's weight is uniform).
ROUTER_INPUT_NORMS = ("ffn_norm", "post_attention_layernorm", "norm")


class OffloadedExperts(Experts):
    """Layer `layer`'s routed experts, kept in `cache` (no weights of its own). Inference only:
    `gathered` and `accumulated`, the two paths of `MoELayer.infer`.

    predictor: how to score this layer's experts for reading ahead (`read_ahead`: "affinity",
    "lookahead", "both", see `moelab.offload.predict`) or None for no prefetching; top_k: experts
    per token; prefetch_factor: read ahead up to this many times the T*K experts the layer's T
    tokens can use (the best-scored ones; the eviction policy may refuse slots for the weaker ones).
    """

    reads_routing_on_host = True  # fetches the chosen experts: a compiled step calls it through an opaque op

    def __init__(
        self, cache: ExpertCache, layer: int, predictor: str | None, top_k: int, prefetch_factor: float = 1.5,
        output_norm: NormView | None = None,
    ):
        pool = cache.pool
        super().__init__(cache.store.num_experts, pool.dim, pool.hidden_dim, "auto")
        if predictor is not None and predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {predictor!r}; choose one of {PREDICTORS} or None")
        if predictor in ("affinity", "both") and cache.prior is None:
            raise ValueError(f"the {predictor!r} predictor needs a RoutingPrior (calibration statistics)")
        self.cache = cache
        self.layer = layer
        # (the cache's pool computing with this layer's gated activation and output norm,); not a submodule
        self._pool: tuple[Experts] = (with_output_norm(cache.store.computing(pool, layer), output_norm),)
        self.predictor = predictor
        self.top_k = top_k
        self.prefetch_factor = prefetch_factor
        # [T or N, K] this layer's latest choices (the next layer's affinity); [0, K] before any
        # (a tensor from the start: a compiled step's record of plain module settings ignores it)
        self.chosen = torch.empty(0, top_k, dtype=torch.long)
        # (this layer's router, the MoE layer before it in a token's pass); not submodules
        self._links: tuple[Router | None, OffloadedExperts | None] = (None, None)

    def link(self, router: Router | None, previous: OffloadedExperts | None) -> None:
        """Name this layer's router (None: predict by habit alone, as for a router that needs whole
        sequences; a hash router's experts follow from the token ids alone) and the MoE layer that
        runs before it within a token's pass (None for the first), whose choices the affinity
        predictor reads."""
        self._links = (router, previous)

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.pool.dtype

    @property
    def expert_bytes(self) -> int:
        return self.cache.store.expert_bytes

    def forward(self, xs: Tensor, counts: Sequence[int], row_weights: Tensor | None = None) -> Tensor:
        raise ValueError(
            "offloaded experts run inference only (MoELayer.infer, generate); training, capacity dropping "
            "and expert parallelism need the experts in memory"
        )

    def gathered(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """x: [T, D], indices, weights: [T, K] -> [T, D] on the experts' cache slots."""
        self._check(x)
        chosen = indices.tolist()  # the one host read: which experts to fetch
        needed = sorted({e for row in chosen for e in row if e >= 0})
        if len(needed) > self.cache.slots:  # more than the pool holds at once: expert by expert
            plan = plan_dispatch(indices, self.num_experts)
            row_weights = weights.reshape(-1).index_select(0, plan.slots)
            return self.accumulated(x, plan.token_ids, plan.counts, row_weights)
        self.chosen = indices.to("cpu", copy=True)  # a copy: inside a compiled step's op, indices' buffer may be reused
        try:
            slots = self.cache.fetch(self.layer, needed, tokens=x.shape[0])
            slot_of = dict(zip(needed, slots))
            in_slots = torch.tensor([[slot_of.get(e, -1) for e in row] for row in chosen], device=x.device)
            return self._pool[0].gathered(x, in_slots.view(indices.shape), weights)
        finally:
            self.cache.release()

    def accumulated(
        self, x: Tensor, token_ids: Tensor, counts: Sequence[int], row_weights: Tensor,
        weight_rows: Sequence[int] | None = None,
    ) -> Tensor:  # fmt: skip
        """x: [T, D]; token_ids, row_weights: [N] rows grouped by expert -> [T, D], the experts
        fetched as many at a time as the pool holds (one visit of the layer: `ExpertCache.fetch`)."""
        self._check(x)
        if weight_rows is not None:
            raise ValueError("offloaded experts choose their own weight rows (cache slots)")
        active = [e for e, n in enumerate(counts) if n]
        starts = torch.tensor([0, *counts]).cumsum(0).tolist()
        self.chosen = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(list(counts)))[:, None]
        y = torch.zeros_like(x)
        for first in range(0, len(active), self.cache.slots):
            chunk = active[first : first + self.cache.slots]
            try:
                slots = self.cache.fetch(self.layer, chunk, tokens=x.shape[0], visit=[] if first else active)
                rows = slice(starts[chunk[0]], starts[chunk[-1] + 1])
                part_counts = [counts[e] for e in chunk]
                y += self._pool[0].accumulated(x, token_ids[rows], part_counts, row_weights[rows], slots)
            finally:
                self.cache.release()
        return y

    def read_ahead(self, hidden: Tensor, ids: Tensor | None = None) -> None:
        """Start reading this layer's likely experts on the background thread, scored from its decoder
        layer's input hidden: [..., D] (normalised as the MoE input is), before the layer's attention
        runs, and from the previous MoE layer's choices (see `moelab.offload.predict`); a hash
        router's (DeepSeek-V4's first layers) are read from the tokens' ids [...] alone: exactly the
        experts the layer will ask for."""
        if self.predictor is None or self.cache.holds_all(self.layer):
            return
        router, previous = self._links
        if isinstance(router, HashRouter):
            if ids is not None:
                chosen = router.token_experts[ids.reshape(-1)].long().flatten().cpu()
                wanted = torch.bincount(chosen, minlength=self.num_experts).float()
                self.cache.prefetch(self.layer, wanted, (wanted > 0).float(), int((wanted > 0).sum()))
            return
        x = hidden.reshape(-1, hidden.shape[-1])
        E, T = self.num_experts, x.shape[0]
        limit = min(E, round(self.prefetch_factor * T * self.top_k))
        scores, most = torch.zeros(E), 0.0  # most: the largest score a token can give an expert
        if self.predictor in ("affinity", "both") and previous is not None and previous.chosen.numel():
            scores += self.cache.prior.affinity_scores(previous.layer, previous.chosen)[:E] / self.top_k
            most += 1.0
        if self.predictor in ("lookahead", "both") and router is not None and router.dim == x.shape[1]:
            routing = router.forward(x)  # .forward: no routing hooks fire; an MLP router (ZAYA's) reads no state here
            scores += lookahead_scores(routing.indices.cpu(), routing.probs.cpu())[:E]  # not its identity experts
            most += 2.0
        if most == 0:  # nothing to go on but habit
            habit = self.cache.habit(self.layer)
            self.cache.prefetch(self.layer, habit, habit, limit)
            return
        self.cache.prefetch(self.layer, scores, (scores / (T * most)).clamp(max=1.0), limit)


@dataclass
class OffloadedModel:
    """model: the causal LM (moelab's `MoETransformer` or a transformers model) whose routed experts
    live in `cache`; predictor: how they are read ahead (`load_offloaded`), None for not;
    kv_cache_tokens: the KV cache's tokens (sequences × positions) its memory budget keeps room
    for, None where the budget does not count the KV cache or there is no budget;
    kv_cache_sequences: the sequences whose recurrent state (`state_bytes_per_sequence`, `state_bytes`
    each) the budget keeps room for beside (counted only where state_bytes > 0, or where
    kv_cache_prompt_tokens is given); kv_cache_prompt_tokens: the longest prompt the budget kept
    room for (`kv_cache_bytes`: then kv_cache_sequences sequences of kv_cache_tokens //
    kv_cache_sequences positions each), None for any."""

    model: nn.Module
    cache: ExpertCache
    predictor: str | None = None
    kv_cache_tokens: int | None = None
    kv_cache_sequences: int = 1
    state_bytes: int = 0
    kv_cache_prompt_tokens: int | None = None

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        attention_mask: Tensor | None = None,
        compile: bool = False,
        streamer: TokenStreamer | None = None,
        sampling: Sampling | None = None,
        eos_token_id: int | None = None,
    ) -> Tensor:
        """Decoding with a KV cache (`generate_ids`): input_ids [B, S] -> [B, S + max_new_tokens];
        attention_mask [B, S]: 0 for the left padding of a batch of prompts; streamer: told each
        step's tokens (`MoETransformer.generate`); sampling: draw the tokens (default: greedy);
        eos_token_id: stop a sequence there (`generate_ids`). compile:
        decode with moelab's compiled static step (`MoETransformer.generate(compile=True)`; a
        moelab checkpoint without read-ahead), the experts fetched and run inside it by an
        opaque op (`moelab.nn.opaque`)."""
        if compile and self.predictor is not None:
            raise ValueError(
                f"compile=True cannot read ahead (the {self.predictor!r} predictor runs Python hooks at every "
                "layer); use the policy 'reuse' or 'lru', or drop compile"
            )
        self._check_kv_cache(input_ids, max_new_tokens, compile)
        return generate_ids(
            self.model, input_ids, max_new_tokens, attention_mask=attention_mask, compile=compile,
            streamer=streamer, sampling=sampling, eos_token_id=eos_token_id,
        )  # fmt: skip

    def _check_kv_cache(self, input_ids: Tensor, max_new_tokens: int, compile: bool) -> None:
        """Refuse a call whose KV cache, or its sequences' recurrent state, would not fit in the room
        the memory budget kept for it."""
        if self.kv_cache_tokens is None:
            return
        ours = isinstance(self.model, MoETransformer)
        B, S = input_ids.shape
        prompt = self.kv_cache_prompt_tokens
        if (self.state_bytes or prompt is not None) and B > self.kv_cache_sequences:
            each = f", each keeping {self.state_bytes} bytes of recurrent state," if self.state_bytes else ""
            raise ValueError(
                f"this call decodes {B} sequences{each} but the "
                f"memory budget kept room for {self.kv_cache_sequences}: load with kv_cache_sequences >= {B}"
            )
        # at most the context (as `generate`'s budget counts it): a longer call is refused by the context check
        # that decoding makes (`generate_ids`, `MoETransformer.generate`), naming the context
        config = self.model.config if ours else self.model.config.get_text_config()
        max_len = getattr(config, "max_seq_len" if ours else "max_position_embeddings", None)
        length = decode_cache_length(S, max_new_tokens, compile and ours, max_len)
        positions = self.kv_cache_tokens // self.kv_cache_sequences
        if prompt is not None and prompt < S <= length:  # a prompt past the context: refused naming the context
            raise ValueError(
                f"this call's prompt has {S} positions but the memory budget kept room for a prompt of {prompt}: "
                f"load with kv_cache_prompt_tokens >= {S}"
            )
        if prompt is not None and length > positions:
            raise ValueError(
                f"this call's KV cache holds {length} positions per sequence but the memory budget kept room for "
                f"{self.kv_cache_sequences} sequence(s) of {positions}: load with kv_cache_tokens >= "
                f"{self.kv_cache_sequences * length}"
            )
        if B * length > self.kv_cache_tokens:
            raise ValueError(
                f"this call's KV cache holds {B * length} tokens ({B} sequence(s) x {length} positions) but the "
                f"memory budget kept room for {self.kv_cache_tokens}: load with kv_cache_tokens >= {B * length}"
            )

    def close(self) -> None:
        self.cache.close()
        self.cache.store.close()


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    compile: bool = False,
    streamer: TokenStreamer | None = None,
    sampling: Sampling | None = None,
    eos_token_id: int | None = None,
) -> Tensor:
    """Decoding with a KV cache by moelab's `MoETransformer.generate` (compile: its compiled
    static step) or transformers' `generate`: [B, S] -> [B, S + max_new_tokens], or fewer where
    every sequence has emitted eos_token_id (each padded with it after its own; None: EOS neither
    stops nor is forbidden, by either); attention_mask [B, S]: 0 for the left padding of a batch
    of prompts; streamer: told the prompts, each step's tokens and the end, by either. Greedy, or sampling's
    draws (transformers' draws come from torch's global generator, seeded inside and then put
    back as it was; transformers' default top-k of 50 is not applied, nor anything of the model's
    generation_config: repetition_penalty, num_beams, its EOS...)."""
    if isinstance(model, OffloadedModel):
        raise TypeError("generate_ids takes the module an OffloadedModel runs; call its own generate(...), which also "
                        "checks the KV cache against its memory budget")
    if isinstance(model, MoETransformer):
        draws = {"greedy": True} if sampling is None else {
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "generator": sampling.generator(input_ids.device),
        }  # fmt: skip
        return model.generate(
            input_ids, max_new_tokens, attention_mask=attention_mask, compile=compile, streamer=streamer,
            eos_token_id=eos_token_id, **draws,
        )  # fmt: skip
    from transformers import GenerationConfig

    if compile:
        raise ValueError(
            f"compile=True needs a moelab model; this is transformers' {type(model).__name__}, which decodes "
            "eagerly (drop compile)"
        )
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)  # a VLM's: its text model's
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceed the model's "
            f"max_position_embeddings ({limit}); shorten one of them"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    left_padding(attention_mask, input_ids)  # moelab's checks and errors for transformers' models too
    draws = {"do_sample": False} if sampling is None else {
        "do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or 0,
        "top_p": 1.0 if sampling.top_p is None else sampling.top_p,
    }  # fmt: skip
    # transformers draws from the default generator of the logits' device: seed the CPU's and every
    # GPU's (a model may span several), and put them all back afterwards
    sampling_on_gpus = sampling is not None and torch.cuda.is_available()
    gpus = list(range(torch.cuda.device_count())) if sampling_on_gpus else []
    # the checkpoint's generation_config (repetition_penalty, num_beams, ...) would fill in what is
    # not passed: decode by these settings alone, as a model moelab runs itself does
    stated, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.random.fork_rng(devices=gpus, enabled=sampling is not None):
            if sampling is not None:
                torch.random.default_generator.manual_seed(sampling.seed)
                if gpus:
                    torch.cuda.manual_seed_all(sampling.seed)
            return model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id, pad_token_id=0 if eos_token_id is None else eos_token_id,
                streamer=streamer, **draws,
            )  # fmt: skip
    finally:
        model.generation_config = stated


def _load_converted(model: MoETransformer, store: ExpertStore, dtype: torch.dtype, skip: list[str]) -> None:
    """Give the moelab skeleton of a convertible transformers checkpoint its tensors, the routed
    experts left out (`moelab.hf.conversion.moelab_tensors`); the tied output head shares the
    embedding's."""
    view, layers = store.view, model.config.n_layers
    tensors = moelab_tensors(store.checkpoint, view.config, store.family, layers, routed=False)
    if model.config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    loaded: dict[int, Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if any(name.startswith(s + ".") for s in skip):
            continue
        if name not in tensors:
            raise CheckpointError(f"{store.path}: {name} is not in the checkpoint; the model cannot be run")
        if tensors[name].shape != param.shape:
            raise CheckpointError(
                f"{store.path}: {name} is {list(tensors[name].shape)} but config.json makes it "
                f"{list(param.shape)}; config.json does not describe these weights"
            )
        tensor = loaded.setdefault(id(tensors[name]), tensors[name].to(dtype))
        if non_finite_names([(name, tensor)]):
            raise CheckpointError(f"{store.path}: NaN or Inf in {name}: the weights are corrupt")
        set_tensor(model, name, tensor)


def _check_config_fits(store: ExpertStore) -> None:
    """config.json describes the weights where the offloaded model does not check by itself (its
    dense tensors' shapes are checked as they load, and the store's `ModelView` refuses layers
    stored past the layer count): the routed experts' width."""
    view, family = store.view, store.family
    key, width = config_entry(view.config, family.expert_width, default=None)
    if width is not None and width != store.expert_width:
        raise CheckpointError(
            f"{store.path}: config.json sets {key} = {width} but the checkpoint's experts are "
            f"{store.expert_width} wide; config.json does not describe these weights"
        )


def resident_slots(
    store: ExpertStore, resident: float | None, memory_budget: int | None, dense_bytes: int, top_k: int,
    kv_cache_bytes: int = 0, state_bytes: int = 0,
) -> int:
    """Pool slots for a fraction of the routed experts (`resident`) or a total memory budget in
    bytes (the dense parts, the KV cache and the recurrent layers' state of every sequence,
    `state_bytes`, included). At least `top_k` (one token's experts at one layer)."""
    if (resident is None) == (memory_budget is None):
        raise ValueError(
            "give exactly one of resident (--resident: the fraction of the routed experts kept in memory) and "
            "memory_budget (--memory-budget: bytes)"
        )
    total = len(store.moe_layers) * store.num_experts
    if resident is not None:
        if not 0 < resident <= 1:
            raise ValueError(f"resident must be a fraction in (0, 1] of the routed experts, got {resident}")
        slots = round(resident * total)
        if slots < top_k:
            # top_k / total rounded up to 4 significant digits: the fraction shown keeps top_k (at 4 decimals,
            # DeepSeek-V3's 8 of 14,848 showed 0.0005, which keeps 7)
            digits = 3 - math.floor(math.log10(top_k / total))
            shown = math.ceil(top_k / total * 10**digits) / 10**digits
            raise ValueError(
                f"resident={resident} keeps {slots} of the {total} routed experts, fewer than the {top_k} one token "
                f"needs at one layer; the minimum is {shown:.{digits}f}"
            )
        return slots
    slots = min((memory_budget - dense_bytes - kv_cache_bytes - state_bytes) // store.expert_bytes, total)
    if slots < top_k:
        minimum = dense_bytes + kv_cache_bytes + state_bytes + top_k * store.expert_bytes
        state = f", the recurrent state {state_bytes / 2**20:.1f} MiB" if state_bytes else ""
        shown = math.ceil(minimum / 2**20 * 10) / 10  # rounded up: a budget of the MiB shown works
        raise ValueError(
            f"memory budget {memory_budget / 2**20:.1f} MiB ({memory_budget} bytes) is too small: the dense parts take "
            f"{dense_bytes / 2**20:.1f} MiB, the KV cache {kv_cache_bytes / 2**20:.1f} MiB{state} and one layer's "
            f"routed experts ({top_k} per token) {top_k * store.expert_bytes / 2**20:.1f} MiB; the minimum is "
            f"{shown:.1f} MiB ({minimum} bytes)"
        )
    return int(slots)


def load_offloaded(
    path: str | os.PathLike,
    *,
    resident: float | None = None,
    memory_budget: int | None = None,
    kv_cache_tokens: int | None = None,
    kv_cache_sequences: int = 1,
    kv_cache_prompt_tokens: int | None = None,
    eviction: str = "reuse",
    predictor: str | None = None,
    prior: RoutingPrior | None = None,
    prefetch_factor: float = 1.5,
    dtype: torch.dtype = torch.float32,
    warm: bool = True,
    read_bandwidth: float | None = None,
    page_cache: bool = True,
    device: torch.device | str = "cpu",
    host_memory: bool = False,
) -> OffloadedModel:
    """The checkpoint at `path` with its routed experts offloaded (see the module docstring).

    resident: the fraction of all routed experts the cache holds, or memory_budget: bytes for the
    whole model: dense parts + the KV cache of kv_cache_tokens tokens (sequences × positions; a
    `generate` call whose cache holds more is refused; `decode_cache_length` gives a call's
    positions; None: the budget does not count the KV cache) and, where the model has recurrent
    layers (Mamba, Gated DeltaNet, KDA, LFM2's convolutions, MiniMax's lightning attention), the
    fixed-size state of kv_cache_sequences sequences (`state_bytes_per_sequence`; a call with more
    sequences is refused) + cache; kv_cache_prompt_tokens: the longest prompt (positions, a batch's
    padded length) of the calls to come, where the caller knows it: DeepSeek-V4's layers then keep
    room for what kv_cache_sequences sequences of kv_cache_tokens // kv_cache_sequences positions
    hold at most after such a prompt (`kv_cache_bytes`; far less than its per-token peak for every
    token when decoding long past a short prompt), and a call with a longer prompt, more sequences
    or more positions per sequence is refused; other models' counts are the same (None, the default:
    the per-token peak for every token, any prompt) + cache (working memory comes on top: the
    activations, and where the files hold experts in another form than the pool's (another dtype,
    quantized, biased) the one expert being read and converted); eviction: "reuse" or "lru"
    (`ExpertCache`); predictor: reading ahead ("affinity", "lookahead", "both"; None, the default:
    experts are read when the routing asks for them) and prefetch_factor (read ahead up to this many times the experts the
    next layer's tokens use). `POLICIES` names the combinations `moelab bench offload` compares:
    "lookahead" has the highest hit rates, but on the CPUs measured no read-ahead ("lru",
    "reuse") gave the most tokens/s in every cell, and "reuse" reads the fewest experts
    (docs/benchmarks.md); prior: calibration statistics
    (`RoutingPrior`) for the affinity predictor and the reuse policy (optional for the others);
    warm: fill the cache at the start with each layer's most frequent experts (by the prior, else
    expert order); read_bandwidth: emulate storage of this many bytes/s, page_cache=False: every
    expert read from the storage device, past the OS page cache (`ExpertStore`; benchmarks); device:
    where the model runs and the cache lives ("cuda": the dense parts and the pool in GPU memory,
    a memory_budget counting GPU bytes; experts copied from pinned host buffers on a copy stream,
    `moelab.offload.copier`); host_memory: on a GPU, keep every routed expert in pinned host memory
    as well (read once, with a progress bar; refused where it does not fit) and copy from there,
    with no file read per miss (Mixtral-offloading's layout).

    Weights holding Inf or NaN (a corrupt checkpoint) are a `CheckpointError` naming the tensor:
    the dense parts as they load, a routed expert at each load from the files into the cache (the
    warm start's here, so with resident=1.0 every expert), never per use of a resident one. An
    expert that is never loaded, or only read ahead and not chosen, is never computed with and
    cannot change the tokens; finding it would mean reading every expert, which offloading avoids.
    `path` may be a shipped model's name.
    """
    path = model_dir(path)
    try:
        check_device(torch.device(device).type)
    except RuntimeError:  # not a device torch knows
        raise ValueError(f"unknown device {device!r}; choose 'cpu' or 'cuda'") from None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16), got {dtype!r}")
    factor_ok = is_number(prefetch_factor) and math.isfinite(prefetch_factor) and prefetch_factor >= 0
    if not factor_ok or (predictor is not None and prefetch_factor == 0):  # without a predictor: unused (POLICIES' 0)
        raise ValueError(
            f"prefetch_factor must be a finite number >= 0 of times the experts used (> 0 with a predictor), got "
            f"{prefetch_factor!r}"
        )
    if kv_cache_tokens is not None and not (is_int(kv_cache_tokens) and kv_cache_tokens >= 0):
        raise ValueError(
            f"kv_cache_tokens counts the tokens the KV cache will hold: an integer >= 0, got {kv_cache_tokens!r}"
        )
    if resident is not None and not is_number(resident):  # a bool is no fraction or byte count
        raise ValueError(f"resident must be a fraction in (0, 1] of the routed experts, got {resident!r}")
    if memory_budget is not None and not (is_number(memory_budget) and math.isfinite(memory_budget)):
        raise ValueError(f"memory_budget counts bytes: a finite number, got {memory_budget!r}")
    if not (is_int(kv_cache_sequences) and kv_cache_sequences >= 1):
        raise ValueError(
            f"kv_cache_sequences counts the sequences decoded at once (a batch's prompts): an integer >= 1, got "
            f"{kv_cache_sequences!r}"
        )
    if kv_cache_prompt_tokens is not None:
        if kv_cache_tokens is None:
            raise ValueError(
                "kv_cache_prompt_tokens sizes the room kv_cache_tokens keeps for the KV cache; give kv_cache_tokens, "
                "or drop kv_cache_prompt_tokens"
            )
        positions = kv_cache_tokens // kv_cache_sequences
        if not (is_int(kv_cache_prompt_tokens) and 1 <= kv_cache_prompt_tokens <= positions):
            raise ValueError(
                f"kv_cache_prompt_tokens counts a prompt's positions: an integer from 1 to the positions per sequence "
                f"(kv_cache_tokens // kv_cache_sequences = {positions}), got {kv_cache_prompt_tokens!r}"
            )
    if kv_cache_tokens is not None and memory_budget is None:
        raise ValueError(
            "kv_cache_tokens keeps room for the KV cache in a memory_budget; give one, or drop kv_cache_tokens"
        )
    if host_memory and torch.device(device).type == "cpu":
        raise ValueError(
            "host_memory=True (--host-memory) keeps every expert in host memory for a cache on a GPU "
            "(device='cuda'); on a CPU the cache is in host memory already: hold every expert with resident=1.0 "
            "(--resident 1)"
        )
    if predictor in ("affinity", "both") and prior is None:  # checked before any file is opened
        raise ValueError(f"the {predictor!r} predictor needs a RoutingPrior (routing statistics): give a prior (prior=, --prior TRACE)")
    store = ExpertStore(path, dtype=dtype, read_bandwidth=read_bandwidth, page_cache=page_cache)
    view, native = store.view, store.family is NATIVE
    identity = store.family.identity_count(view.config)  # recorded as choices past the experts, never fetched
    prior_experts = {len(f) for f in prior.frequency.values()} if prior is not None else {store.num_experts}
    if prior is not None and identity and prior_experts == {store.num_experts + identity}:
        prior, prior_experts = prior.for_experts(store.num_experts), {store.num_experts}
    if prior is not None and (list(prior.layers) != store.moe_layers or prior_experts != {store.num_experts}):
        counts = " or ".join(str(n) for n in sorted(prior_experts))
        raise ValueError(
            f"the routing prior covers MoE layers {list(prior.layers)} of {counts} experts but "
            f"the checkpoint's are {store.moe_layers} of {store.num_experts}; measure the prior on this model"
        )
    _check_config_fits(store)
    # a transformers checkpoint that moelab's decoder represents exactly runs as a moelab model
    # (`moelab.hf.conversion`: it decodes faster so); either way only the routed experts move out
    convertible = store.family.name in CONVERTIBLE_FAMILIES
    converted = not native and convertible and not conversion_problems(store.path, store.checkpoint)
    own = native or converted
    if converted:
        model = native_skeleton(moelab_config(store.path, store.checkpoint).to_dict())
    else:
        model = skeleton(store.path, view.config, store.family)
    layers_name, layers = decoder_layers(model, view.num_layers)
    views, found = {}, {}
    for index in store.moe_layers:
        views[index] = view.layer(index, routed=False)
        assert isinstance(views[index], MoELayerView)
        router = views[index].router
        found[index] = find_moe_modules(layers[index], index, router.num_choices, router.weight.shape[1], store.family.moe_block)
    moved = {i: [found[i].experts] if own else replaced_modules(i, found[i], store.family) for i in store.moe_layers}
    skip = [f"{layers_name}.{i}.{name}" for i, names in moved.items() for name in names]
    for name in beside_language_model(model):  # a vision-language model decodes text without its vision tower
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    if converted:
        _load_converted(model, store, dtype, skip)
    else:
        renames = store.family.stored_renames
        stored_as = tied_names(model, store.checkpoint, renames)
        load_tensors(
            model, store.checkpoint, dtype, skip=skip, stored_as=stored_as, renames=renames,
            splits=store.family.stored_splits, shards=store.family.stored_shards,
            keep_float32=float32_names(model, dtype),
        )  # fmt: skip
    _zero_load_counters(model)
    _tie_output_head(model)
    # a tied head once; the buffers no checkpoint holds too (moelab's rotary tables, context x head_dim),
    # a moelab model's floating-point ones in `dtype`, as `model.to` below leaves them
    size = torch.empty((), dtype=dtype).element_size()
    held = {
        t.data_ptr(): t.numel() * size if own and t.is_floating_point() else t.nbytes
        for t in [*model.state_dict().values(), *model.buffers()] if not t.is_meta
    }  # fmt: skip
    dense_bytes = sum(held.values())
    if not own:  # the routers and shared experts the MoE blocks will hold
        dense_bytes += sum(_view_bytes(views[i], dtype, found[i].shared_in_block) for i in store.moe_layers)
    top_k = max(v.router.top_k for v in views.values())
    if host_memory:
        check_host_memory(len(store.moe_layers) * store.num_experts * store.expert_bytes)
    kv_cache_bytes = kv_cache_room(model, dtype, kv_cache_tokens or 0, kv_cache_sequences, kv_cache_prompt_tokens)
    state_bytes = 0 if kv_cache_tokens is None else state_bytes_per_sequence(model, dtype, view.num_layers)
    slots = resident_slots(
        store, resident, memory_budget, dense_bytes, top_k, kv_cache_bytes, kv_cache_sequences * state_bytes
    )
    cache = ExpertCache(
        store, slots, eviction=eviction, prior=prior, device=device, host_memory=host_memory,
        progress=partial(tqdm, desc="experts to host memory", leave=False),
    )  # fmt: skip
    moes: dict[int, MoELayer] = {}
    for index in store.moe_layers:
        experts = OffloadedExperts(
            cache, index, predictor, views[index].router.top_k, prefetch_factor, views[index].experts.output_norm
        )
        if own:  # moelab's own MoE layer stays; only its experts move out
            moes[index] = layers[index].get_submodule(found[index].block)
            moes[index].experts = experts
        else:
            shared = views[index].shared if found[index].shared_in_block else None
            norms = {name: norm_from_view(getattr(views[index], name)) for name in ("expert_norm", "routed_norm")}
            moes[index] = MoELayer(
                router_from_view(views[index].router).float(),  # the file's values, as the layer-by-layer runner
                experts,
                None if shared is None else shared_from_view(shared).to(dtype),
                latent=None if views[index].latent is None else latent_from_view(views[index].latent).to(dtype),
                **{name: None if norm is None else norm.to(dtype) for name, norm in norms.items()},
                output_bias=None if views[index].output_bias is None else views[index].output_bias.to(dtype),
                identity_experts=views[index].router.identity_experts,
                identity_returns=identity_returns(views[index].router),
            )
            install_moe(layers[index], index, found[index], moes[index], MoELayer.infer, store.family)
            block = layers[index].get_submodule(found[index].block or found[index].experts)
            if getattr(block, "output_norm", None) is not None:  # the family's norm after its block (skipped above)
                load_tensors(
                    block, store.checkpoint, dtype, prefix=f"{layers_name}.{index}.{found[index].block}.",
                    skip=("moe",), renames=store.family.stored_renames,
                )  # fmt: skip
    previous = None
    for index in store.moe_layers:
        experts = moes[index].experts
        experts.link(None if moes[index].router.needs_sequences else moes[index].router, previous)
        previous = experts
        if predictor is not None:
            norm = next((getattr(layers[index], n) for n in ROUTER_INPUT_NORMS if hasattr(layers[index], n)), None)
            if isinstance(norm, nn.ModuleList):  # LongCat-Flash: one a sublayer, the first one's output feeds the MoE block
                norm = norm[0]
            norm = None if moes[index].router.input_norm is not None else norm  # a router that norms its own input
            layers[index].register_forward_pre_hook(partial(_read_ahead, experts, norm), with_kwargs=True)
    # moelab's model computes in `dtype` throughout (its rotary tables too, as `load_pretrained(...).to(dtype)`);
    # a transformers skeleton keeps the buffers `from_pretrained` keeps. The offloaded experts hold no tensors.
    if own:
        model.to(device, dtype)
    else:
        model.to(device)
    if warm:
        cache.fill(warm_start(store, prior, cache.slots))
    return OffloadedModel(
        model.eval(), cache, predictor, kv_cache_tokens, kv_cache_sequences, state_bytes, kv_cache_prompt_tokens
    )


def kv_cache_room(
    model: nn.Module, dtype: torch.dtype, tokens: int, sequences: int = 1, prompt_tokens: int | None = None,
    step: bool = True,
) -> int:
    """Bytes of keys and values `load_offloaded` keeps room for: `tokens` (sequences × positions) x
    `kv_bytes_per_token`, or, given the longest prompt (`prompt_tokens`, P) of a DeepSeek-V4 model,
    its layers' (`_deepseek_v4_sequence_bytes`) for `sequences` sequences of T = tokens // sequences
    positions each: the most one holds over a decoding of P prompt positions then T - P new tokens,
    beside the other layers' `tokens` x their bytes per token (as without prompt_tokens). step=False
    (a test's): without what a decoding step makes while holding the previous."""
    if prompt_tokens is None or isinstance(model, MoETransformer):
        return tokens * kv_bytes_per_token(model, dtype)
    config = model.config.get_text_config()
    if not getattr(config, "compress_rates", None):  # other families' caches grow linearly: today's count
        return tokens * kv_bytes_per_token(model, dtype)
    size, types, wide = torch.empty((), dtype=dtype).element_size(), _layer_types(config), float32_names(model, dtype)
    positions = tokens // sequences
    total = 0
    for i in _attention_layers(types):
        layer_config = config.per_layer_config[i]
        total += sequences * _deepseek_v4_sequence_bytes(
            layer_config, types[i], size, wide, prompt_tokens, positions, _kv_entries(layer_config, types[i], i), step
        )
    return total


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of keys and values that decoding caches per token (one position of one sequence),
    over every layer: moelab's KV cache, or transformers' (where DeepSeek's multi-head latent
    attention caches the compressed latent and the shared rotary key, not per-head keys and values,
    a hybrid model's recurrent layers cache none (their fixed-size state per sequence:
    `state_bytes_per_sequence`), and a layer's own settings (per_layer_config:
    dots3's sliding layers) give its sizes; MiniMax-M3's sparse layers and the indexed attention layers
    that run their own indexer (dots3, Hunyuan 4, Qwen4-Exp, GLM-5-Next: its key beside a pool gate
    score and a flag) cache their indexer's key too; DeepSeek-V4's layers: `_deepseek_v4_bytes`;
    Qwen4-Exp's cache keeps its indexers' 3-D positions beside, once: 3 int64 a token; Inkling 2's
    "hybrid" and "hybrid_sliding" layers, the latter with its swa_ sizes, Inkling 2 Loop's looped
    layers once a pass).
    A sliding-window layer is counted at every position: transformers' cache holds a prompt's keys
    whole until the first decoding step."""
    size, config = torch.empty((), dtype=dtype).element_size(), model.config
    if isinstance(model, MoETransformer):
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * size
    config = config.get_text_config()  # a vision-language model's: its language model's
    types, wide = _layer_types(config), float32_names(model, dtype)
    total = 0
    for i in _attention_layers(types):
        layer_config = config.per_layer_config[i]
        if types[i] in (getattr(layer_config, "compress_rates", None) or {}):
            total += _deepseek_v4_bytes(layer_config, types[i], size, wide)
        else:
            total += _kv_entries(layer_config, types[i], i) * size * _cached_passes(config, i)
    if str(config.model_type).startswith("qwen4_exp") and INDEXED in types:  # its first indexed layer's
        total += 3 * torch.empty((), dtype=torch.long).element_size()  # indexer_position_ids [3, B, S]
    return total


def state_bytes_per_sequence(model: nn.Module, dtype: torch.dtype, num_layers: int | None = None) -> int:
    """Bytes of the fixed-size state that decoding keeps per sequence (whatever its length) over
    every recurrent layer of transformers' model computing in `dtype` (its cache's
    `LinearAttentionLayer`s, MiniMax's `linear_cache`), read from the layers' own modules: a
    causal convolution's window, channels x its kernel (Mamba's, Gated DeltaNet's, KDA's, LFM2's
    short convolutions; Qwen4-Exp's dilated one, (kernel - 1) x dilation), in `dtype`; Mamba-1's
    state (its A_log, channels x state size), Mamba-2's (heads x head_dim x state size), Gated
    DeltaNet's (value heads x key x value head_dim) and KDA's (heads x head_dim²), in float32
    (their PyTorch paths and kernels keep it so in bf16 too); MiniMax's lightning attention's
    (heads x head_dim², in `dtype`); Qwen4-Exp's n-gram context (its previous token ids, int64);
    Inkling 2's short convolutions (four a layer, static or dynamic: channels x kernel, in float32 whatever
    `dtype`; Inkling 2 Loop's looped layers once a pass); ZAYA's CCA (its q/k convolutions' window,
    channels x (kernel - 1 of each), and the last token's delayed value projection, in `dtype`).
    0 for moelab's models and those without recurrent layers. A recurrent mixer it cannot size is
    an error, not a count that leaves it out. num_layers: the decoder layers, where the config's
    num_hidden_layers counts otherwise (LongCat-Flash's: its attention sublayers, two a layer)."""
    if isinstance(model, MoETransformer):
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    config = model.config.get_text_config()
    _, layers = decoder_layers(model, num_layers or config.num_hidden_layers)
    return sum(
        _state_bytes(module, size, index) * _cached_passes(config, index)
        for index, layer in enumerate(layers) for module in layer.modules()
    )  # fmt: skip


def _state_bytes(module: nn.Module, size: int, index: int) -> int:
    """Bytes per sequence `module` (of decoder layer `index`) keeps itself (see
    `state_bytes_per_sequence`), its entries `size` bytes in the compute dtype."""
    if isinstance(getattr(module, "slope_rate", None), Tensor):  # MiniMax's lightning attention: K^T V per head
        return module.num_attention_heads * module.head_dim**2 * size
    if hasattr(module, "context_len") and hasattr(module, "ngram_size"):  # Qwen4-Exp's n-gram token history
        return module.context_len * torch.empty((), dtype=torch.long).element_size()
    if hasattr(module, "v_proj_delayed"):  # ZAYA's CCA: the q/k convolutions' window, the last token's delayed v
        window = module.conv_qk_depthwise.in_channels * module.conv_kernel_size
        return (window + module.v_proj_delayed.out_features) * size
    if type(module).__name__.endswith("ShortConvolution"):  # Inkling 2's, static or dynamic: a float32 window
        channels = module.conv1d.in_channels if hasattr(module, "conv1d") else module.static_weight.shape[1]
        return channels * module.conv_kernel_size * 4
    convs = [c for c in module.children() if isinstance(c, nn.Conv1d)]
    if not convs:
        return 0
    window = getattr(module, "short_conv_state_len", None)  # Qwen4-Exp's dilated convolution
    conv = sum(c.in_channels * (window or c.kernel_size[0]) for c in convs) * size
    if hasattr(module, "ssm_state_size"):  # Mamba
        A_log = module.A_log
        entries = A_log.numel() if A_log.dim() == 2 else module.num_heads * module.head_dim * module.ssm_state_size
    elif all(hasattr(module, n) for n in ("num_v_heads", "head_k_dim", "head_v_dim")):  # Gated DeltaNet
        entries = module.num_v_heads * module.head_k_dim * module.head_v_dim
    elif all(hasattr(module, n) for n in ("num_heads", "head_dim", "qkv_dim")):  # KDA: a key x value state per head
        entries = module.num_heads * module.head_dim**2
    elif window is not None or type(module).__name__.endswith("ShortConv"):  # a convolution alone (LFM2's)
        entries = 0
    else:
        raise ValueError(
            f"cannot size the state that layer {index}'s {type(module).__name__} keeps per sequence (a convolution "
            "beside a recurrent state moelab does not know); load without kv_cache_tokens (the budget then counts "
            "no cache)"
        )
    return conv + entries * 4


def _kv_entries(config, layer_type: str, index: int) -> int:
    """Entries layer `index` of `config`, of kind `layer_type`, caches per token."""
    indexers = getattr(config, "indexer_types", None)  # "shared": the layer reuses the previous one's selection
    indexed = layer_type == INDEXED and not (isinstance(indexers, list) and indexers[index] == "shared")
    # one key per token: index_head_dim wide (DSA's), indexer_head_dim (Qwen4-Exp's QSA, one key head)
    keyed = layer_type == MINIMAX_M3_SPARSE or indexed
    width = getattr(config, "index_head_dim", None) or getattr(config, "indexer_head_dim", None) or 0
    if getattr(config, "index_kpool", None):  # GLM-5-Next's pooled indexer: key, pool gate score and a valid flag
        width = 2 * width + 1
    indexer = width if keyed else 0
    if getattr(config, "kv_lora_rank", None):
        return config.kv_lora_rank + config.qk_rope_head_dim + indexer
    if layer_type == INKLING2_ATTENTION[1]:  # Inkling 2's sliding layers: sizes of their own
        return 2 * config.swa_num_key_value_heads * config.swa_head_dim
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim + indexer


def _deepseek_v4_bytes(config, layer_type: str, size: int, wide) -> int:
    """Bytes per token a DeepSeek-V4 compressed-attention layer holds at most, at any point of a
    decoding (its cache, `DeepseekV4HCACache` / `DeepseekV4CSACache`, holds one tensor for its keys
    and values), its keys `size` bytes an entry. The most is right after the prompt: transformers
    keeps the prompt's keys and its compressors' projections (a key and a gate per token, 2 x
    head_dim wide each for CSA's overlapping windows, beside the indexer's at 2 x index_head_dim)
    as views of the prompt-wide tensors until the first decoding step; CSA's overlap state adds a
    window of key and gate halves (2 x (head_dim + index_head_dim) per token once a window is
    full); each window of compress_rate tokens one compressed entry. A per-token count safe at
    every length is the most per token at any length (a CSA layer's, at one full window). Decoding
    long past a short prompt holds far less (a sliding window, the unfinished window, the overlap
    and the compressed entries): per token at long lengths, V4-Flash's sizes give 160 entries where
    this counts 4,512 (CSA) and 4 where it counts 1,540 (HCA): given the prompt's length,
    `_deepseek_v4_sequence_bytes` counts that.

    The compressor's states are held in the dtype transformers keeps its tensors in (`wide`, the
    names kept in float32: `float32_names`): its projections' (float32 in fp16, their
    `_keep_in_fp32_modules`), the overlap's gate half that of the projection plus the float32
    position_bias (float32 in bf16 too)."""
    rate, projection, overlap, entry = _compressor_bytes(config, layer_type, size, wide)
    return config.head_dim * size + projection + overlap + -(-entry // rate)


def _compressor_bytes(config, layer_type: str, size: int, wide) -> tuple[int, int, int, int]:
    """A DeepSeek-V4 compressed-attention layer's (compress_rate, bytes of one token's compressor
    projections (a key and a gate: head_dim wide each for HCA, 2 x head_dim for CSA, beside its
    indexer's at 2 x index_head_dim), bytes of CSA's overlap state per window position (a key and a
    gate half; 0 for HCA), bytes of one compressed entry (the indexer's beside)), each tensor in the
    dtype transformers keeps it in (`_deepseek_v4_bytes`)."""

    def width(name: str) -> int:  # bytes an entry of the tensors `name` computes
        return 4 if wide is not None and wide.search(name) else size

    rate, head_dim, bias = config.compress_rates[layer_type], config.head_dim, width("compressor.position_bias")
    proj = width("self_attn.compressor.kv_proj.weight")
    if layer_type != "compressed_sparse_attention":
        return rate, 2 * head_dim * proj, 0, head_dim * proj
    index_dim, index_proj = config.index_head_dim, width("self_attn.compressor.indexer.kv_proj.weight")
    projection = 4 * head_dim * proj + 4 * index_dim * index_proj
    overlap = head_dim * (proj + max(proj, bias)) + index_dim * (index_proj + max(index_proj, bias))
    return rate, projection, overlap, head_dim * proj + index_dim * index_proj


def _deepseek_v4_sequence_bytes(
    config, layer_type: str, size: int, wide, prompt: int, positions: int, sliding_entries: int, step: bool = True
) -> int:
    """Bytes one sequence's DeepSeek-V4 layer (of kind `layer_type`) holds at most over a decoding
    of `prompt` positions (P) then new tokens up to `positions` (T), an upper bound at every step:
    the most of what it holds right after the prompt (the prompt's keys and its compressors'
    projections, views of prompt-wide tensors, beside the overlap state and floor(P / compress_rate)
    compressed entries) and while decoding (never more than T x its most per token,
    `_deepseek_v4_bytes`, which holds at every length), plus what one decoding step allocates
    before it lets the previous go. Decoding, transformers' cache (`DeepseekV4HCACache`,
    `DeepseekV4CSACache`) holds the sliding window (min(T, sliding_window) keys: the storage of the
    step's concatenation, of which the window is a view), each compressor's buffer of unfinished-window projections (at most compress_rate tokens,
    a key and a gate: head_dim wide each for HCA, 2 x head_dim for CSA and 2 x index_head_dim for its
    indexer; an emptied buffer is a view that keeps the last window's storage), CSA's overlap state
    (a window of key and gate halves, the gate's in float32: the projection plus the float32
    position_bias) and floor(T / compress_rate) compressed entries (the indexer's beside). A step
    makes a new window, buffer, overlap state, compressed entry and the token's projections while the
    previous are held: one more of each. Not counted, as for every family's growing cache
    (`kv_bytes_per_token`): the step that closes a window concatenates the compressed entries into a
    new tensor, briefly holding them twice (one layer at a time). A sliding layer
    (`sliding_entries` a token: a key and a value) holds the prompt, then a window, plus the next
    window a step makes. Each in the dtype transformers keeps it in (`_deepseek_v4_bytes`).
    step=False: without the step's, what the cache keeps between steps."""
    window = min(positions, config.sliding_window)
    if layer_type not in (getattr(config, "compress_rates", None) or {}):  # a sliding layer: two tensors
        return (max(prompt, window) + step * window) * sliding_entries * size
    per_token = _deepseek_v4_bytes(config, layer_type, size, wide)
    rate, projection, overlap, entry = _compressor_bytes(config, layer_type, size, wide)
    head_dim = config.head_dim
    overlap = rate * overlap if positions >= rate else 0  # a window of it, once a window is full
    keys, buffers = window * head_dim * size, min(rate, positions) * projection
    prompted = prompt * (head_dim * size + projection) + (overlap if prompt >= rate else 0) + prompt // rate * entry
    decoding = keys + buffers + overlap + positions // rate * entry
    made = keys + buffers + overlap + entry + projection  # by a step, while the previous are held
    return min(max(prompted, decoding), positions * per_token) + step * made


MINIMAX_M3_SPARSE = "minimax_m3_sparse"  # MiniMax-M3's block-sparse attention layers (an indexer beside)
INDEXED = "indexed_attention"  # DeepSeek sparse attention's layers (dots3, Hunyuan 4): an indexer beside
INKLING2_ATTENTION = ("hybrid", "hybrid_sliding")  # Inkling 2's full and sliding-window attention layers


def _layer_types(config) -> list[str]:
    """Each layer's kind as config.layer_types names it ("attention" for all where it names none)."""
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) != config.num_hidden_layers:
        return ["attention"] * config.num_hidden_layers
    return [str(t) for t in types]


def _attention_layers(types: list[str]) -> list[int]:
    """The layers that cache keys and values per token: attention layers, not LFM2's short convolutions
    or linear attention (a fixed-size state per sequence)."""
    return [
        i for i, t in enumerate(types)
        if (t.endswith("attention") and t != "linear_attention") or t in (MINIMAX_M3_SPARSE, *INKLING2_ATTENTION)
    ]  # fmt: skip


def _cached_passes(config, index: int) -> int:
    """How many caches of its own layer `index` keeps: loop_num_passes for Inkling 2 Loop's looped
    layers (loop_layer_index_start to loop_layer_index_end - 1: each pass its own), else 1."""
    start, end = getattr(config, "loop_layer_index_start", None), getattr(config, "loop_layer_index_end", None)
    return config.loop_num_passes if start is not None and start <= index < end else 1


def _tie_output_head(model: nn.Module) -> None:
    """Where the output head and the embedding were loaded as one tensor (a tied checkpoint), make
    them one Parameter, as in memory (two Parameters on one tensor would part at the first in-place
    move of the decode layout, which then holds both)."""
    if isinstance(model, MoETransformer):
        head, embedding = model.lm_head, model.embed
    else:
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is embedding.weight or head.weight.is_meta:
        return
    if head.weight.shape == embedding.weight.shape and head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = embedding.weight


def _zero_load_counters(model: nn.Module) -> None:
    """The routers' load counters (`tokens_per_expert` of aux-loss-free balancing: not in a
    checkpoint, zero in a new model) made real; the skeleton built them on the meta device."""
    for module in model.modules():
        counter = module._buffers.get("tokens_per_expert")
        if counter is not None and counter.is_meta:
            module._buffers["tokens_per_expert"] = torch.zeros(counter.shape, dtype=counter.dtype)


def check_host_memory(nbytes: int) -> None:
    """Refuse to pin `nbytes` of host memory where the kernel reports less available (Linux's
    MemAvailable; elsewhere not checked)."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise ValueError(
            f"host_memory needs {nbytes / 2**30:.1f} GiB of pinned host memory for every routed expert, but "
            f"only {available / 2**30:.1f} GiB is available; drop host_memory (experts are then read from "
            "the files) or free memory"
        )


def _read_ahead(experts: OffloadedExperts, norm: nn.Module | None, layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """A decoder layer's forward pre-hook: its MoE layer reads ahead from the layer's input (and the
    token ids the layer is handed, which a hash router reads)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    experts.read_ahead(hidden if norm is None else norm(hidden), kwargs.get("input_ids"))


def _view_bytes(layer: MoELayerView, dtype: torch.dtype, shared: bool) -> int:
    """Bytes of a layer view's router (held in float32) and its latent projections, norms, output
    bias (and shared experts) in `dtype`."""
    router = [layer.router.with_identity_rows(name) for name in ("weight", "bias", "selection_bias", "expert_scale")]
    table = layer.router.token_experts  # a hash router's, kept as stored (integers)
    router += [] if layer.router.input_norm is None else [layer.router.input_norm.weight]
    router += [] if layer.router.mlp is None else list(layer.router.mlp.tensors().values())  # ZAYA's, in float32 too
    tensors = [] if layer.latent is None else [layer.latent.down, layer.latent.up]
    norms = (layer.expert_norm, layer.routed_norm, layer.experts.output_norm)
    tensors += [norm.weight for norm in norms if norm is not None]
    tensors += [layer.output_bias]
    if shared and layer.shared is not None:
        tensors += [layer.shared.gate, layer.shared.up, layer.shared.down, layer.shared.sigmoid_gate]
    size = torch.empty((), dtype=dtype).element_size()
    table_bytes = 0 if table is None else table.numel() * table.element_size()
    return sum(t.numel() * size for t in tensors if t is not None) + sum(t.numel() * 4 for t in router if t is not None) + table_bytes


def warm_start(store: ExpertStore, prior: RoutingPrior | None, slots: int) -> list[tuple[int, int]]:
    """The (layer, expert) pairs to load first: round-robin over the MoE layers, each layer's
    experts by decreasing prior frequency (expert order without a prior)."""
    ranked = {}
    for layer in store.moe_layers:
        order = range(store.num_experts)
        if prior is not None:
            order = torch.argsort(prior.frequency[layer], descending=True, stable=True).tolist()
        ranked[layer] = list(order)
    pairs = [(layer, ranked[layer][r]) for r in range(store.num_experts) for layer in store.moe_layers]
    return pairs[:slots]
