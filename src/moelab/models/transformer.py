"""The decoder-only MoE language model.

Shape legend: B sequences, S positions in this call, P = start_pos + S positions seen so far,
D model dim, H query heads, G key/value heads, Dh head dim, V vocabulary, L layers.

    x = embed(ids)                                     # [B, S, D]
    for each block:  x = x + attn(norm(x))            # causal GQA attention with RoPE
                     x = x + ffn(norm(x))             # dense SwiGLU, or an MoE layer
    logits = lm_head(norm(x))                          # [B, S, V]

A "uoe" block uses selective multi-head attention and the dense FFN's slices as experts
(`moelab.nn.uoe`). Blocks whose routing looks at other tokens of the sequence (graph-of-tokens
routers, UoE) cannot decode from a KV cache; `generate` recomputes the prefix for them.
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.models.config import ModelConfig
from moelab.models.decode_graph import DecodeGraph
from moelab.models.decode_layout import (
    plain_projections,
    side_by_side,
    store_apart,
    use_decode_layout,
    use_row_major_layout,
)
from moelab.nn import (
    ChainOfExperts,
    MoELayer,
    MoEResult,
    SelectiveAttention,
    SwiGLU,
    SwiGLUExperts,
    build_moe,
)
from moelab.nn.config import build_experts
from moelab.nn.experts import Experts
from moelab.nn.hooks import forward_hooked
from moelab.nn.linear import Linear, one_row_linear
from moelab.nn.lm_loss import chunked_cross_entropy
from moelab.nn.moe import mean_by_name, sum_by_name
from moelab.nn.rope import apply_rope, rope_tables
from moelab.validation import is_int, is_number


@dataclass
class ModelOutput:
    """What `MoETransformer.forward` returns.

    logits: [B, S, V]; None where forward was called with return_logits=False.
    loss: [] mean cross-entropy over the targets that are not -100; None without targets.
    aux_loss: [] the MoE layers' weighted auxiliary losses, summed (0 for a dense model); train on
        loss + aux_loss.
    aux_losses: each auxiliary loss by name ("balance", "z", "entropy", ...), summed over layers.
    moe_results: each MoE layer's `MoEResult` (load, experts per token, routing trace) by layer index
        (for a "uoe" layer: its MLP experts).
    attn_results: each "uoe" layer's selective attention `MoEResult` (heads are its experts).
    metrics: detached scalars averaged over the layers that report them: "experts_per_token" (MoE
        FFNs), and BlockFFN's "tls" and "cls" for routers with a variable number of experts.
    """

    logits: Tensor | None
    loss: Tensor | None
    aux_loss: Tensor
    aux_losses: dict[str, Tensor]
    moe_results: dict[int, MoEResult]
    attn_results: dict[int, MoEResult] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)


# Each model's compiled decode step and the state it was traced with (`MoETransformer._compiled_step`).
_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Each model's last captured decode step, for the next `generate` of the same shapes: (the
# compiled step, batch, cache length, device, dtype), the `DecodeGraph` and its `KVCache`.
_decode_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _CompiledStep:
    """A compiled decode step and what it was traced with: each parameter and buffer (identity,
    storage), their in-place versions, every module's plain settings; frozen: the weights folded
    into the graph (else read as inputs at every call, so in-place updates need no new trace)."""

    step: Callable
    tensors: tuple
    versions: tuple
    settings: tuple
    frozen: bool
    first_lengths: dict[int, int] = field(default_factory=dict)  # batch size -> first cache length traced

    def mark_cache(self, cache: KVCache) -> None:
        """On a CPU, a batch size's first cache length is traced with static shapes; a call of
        another length marks its cache's length dynamic, so that one more trace serves every
        length (each new length used to cost a trace: 13-17 s on `ref-8e-top2`; the dynamic
        graph decodes at 0.91-1.00x the static one's speed)."""
        first = self.first_lengths.setdefault(cache.batch_size, cache.max_len)
        if cache.max_len != first and cache.k[0].device.type == "cpu":
            for t in cache.k + cache.v:
                torch._dynamo.mark_dynamic(t, 2)


def decode_step_settings(device: torch.device, frozen: bool = True):
    """Inductor's settings for the compiled decode step: frozen, the weights folded into the graph
    as constants (linear weights prepacked for the CPU's GEMM, the q, k, v projections of a layer
    concatenated into one); on the CPU, the graph's calls made from C++ (`cpp_wrapper`: 12-15 %
    faster at batch 1 than Inductor's Python wrapper on an Intel Xeon, compiling takes twice as long)."""
    cpu = device.type == "cpu"
    return torch._inductor.config.patch(
        {"freezing": frozen, "cpp.enable_concat_linear": frozen, "cpp_wrapper": cpu}
    )


def decode_cache_length(prompt_len: int, max_new_tokens: int, compile: bool, max_seq_len: int | None = None) -> int:
    """Positions of the KV cache `MoETransformer.generate` allocates for a prompt of prompt_len and
    max_new_tokens; compiled, rounded up to a multiple of 64 (fewer distinct shapes to trace); at
    most max_seq_len (None: not capped; a longer call is refused when it starts)."""
    length = prompt_len + max_new_tokens
    if compile:
        length = -(-length // 64) * 64
    return length if max_seq_len is None else min(max_seq_len, length)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for `max_len` positions.

    k, v: L tensors [B, G, max_len, Dh], one per layer (separate tensors, so that a compiled step
    writing one layer's position does not copy the others). `model(ids, kv_cache=cache,
    start_pos=p)` stores positions p .. p+S-1 and attends to positions 0 .. p+S-1.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if not 1 <= max_len <= config.max_seq_len:
            raise ValueError(
                f"KVCache max_len must lie in [1, max_seq_len={config.max_seq_len}], got {max_len}"
            )
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, start_pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v: [B, G, S, Dh] at start_pos; return every key and value so far, [B, G, P, Dh].
        A tensor start_pos (a 0-d position, the static decode step) returns the whole cache,
        [B, G, max_len, Dh], whose unwritten positions the caller masks out: shapes that do not
        change from step to step, so that a compiled step is traced once."""
        if isinstance(start_pos, Tensor):
            where = start_pos + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, where, k)
            self.v[layer].index_copy_(2, where, v)
            return self.k[layer], self.v[layer]
        end = start_pos + k.shape[2]
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE: H query heads share G key/value heads."""

    # stored side by side for decoding (`moelab.models.decode_layout`): then one product serves all three
    side_by_side_projections = ("q_proj", "k_proj", "v_proj")

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache | None,
        start_pos: int,
        mask: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """x: [B, S, D]; cos, sin: [S, Dh] (per sequence: [B, 1, S, Dh]); mask: [S, P] or
        [B, 1, S, P] (True = attend), or None for causal attention over these S positions (and
        every cached one) -> ([B, S, D], {"q": [B, H, S, Dh], "k": [B, G, P, Dh]}, the rotated
        queries and keys, which attention-aware routing reuses)"""
        B, S, _ = x.shape
        qkv_weight = self._qkv_weight()
        if qkv_weight is None:
            q = self._heads(self.q_proj(x), self.n_heads)  # [B, H, S, Dh]
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))  # [B, G, S, Dh]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # one product, and the queries and keys rotated together
            H, G = self.n_heads, self.n_kv_heads
            qkv = one_row_linear(x, qkv_weight)  # [B, S, (H + 2G) * Dh]
            qk = apply_rope(self._heads(qkv[..., : (H + G) * self.head_dim], H + G), cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], self._heads(qkv[..., (H + G) * self.head_dim :])
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, start_pos, k, v)  # [B, G, P, Dh]
        if isinstance(start_pos, Tensor):  # the static decode step: explicit math, which Inductor fuses
            y = masked_attention(q, k, v, mask)
        else:
            causal = mask is None and S > 1  # a single position attends to every key (cached or its own)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        y = y.view(B, 1, -1) if S == 1 else y.transpose(1, 2).reshape(B, S, -1)  # [B, S, H * Dh]
        return self.o_proj(y), {"q": q, "k": k}

    def _qkv_weight(self) -> Tensor | None:
        """The [(H + 2G) * Dh, D] matrix of the query, key and value projections, where they are
        stored side by side (`moelab.models.decode_layout.side_by_side`), are plain projections
        and no gradient flows to them; else None. Where a gradient flows, they get their own
        storage again first (`store_apart`)."""
        if torch.compiler.is_compiling():
            return None
        modules = [self._modules[name] for name in self.side_by_side_projections]  # plain lookups: every step
        if not plain_projections(modules):
            return None
        weights = [module._parameters["weight"] for module in modules]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            store_apart(weights)
            return None
        return side_by_side(weights)

    def _heads(self, projected: Tensor, heads: int | None = None) -> Tensor:
        """A projection [B, S, heads * Dh] -> [B, heads, S, Dh] (default heads: the G key/value
        heads); one position is viewed as such directly (a decode step: 1 operation, not 2)."""
        B, S, _ = projected.shape
        heads = self.n_kv_heads if heads is None else heads
        if S == 1:
            return projected.view(B, heads, 1, self.head_dim)
        return projected.view(B, S, heads, self.head_dim).transpose(1, 2)


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)). kind "dense": a `SwiGLU` FFN; "moe": an `MoELayer`
    or `ChainOfExperts` (experts: a ReXMoE pool shared with other blocks); "uoe": selective
    attention and the dense FFN's slices as routed experts."""

    def __init__(
        self, config: ModelConfig, layer_id: int, kind: str, experts: Experts | None = None, reuse_position: int = 0
    ):
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        if kind == "uoe":
            uoe, E = config.uoe, config.uoe.mlp_experts
            self.attn = SelectiveAttention(config.dim, config.n_heads, uoe)
            experts = SwiGLUExperts(E, config.dim, config.dense_hidden_dim // E)
            self.ffn = MoELayer(uoe.router(config.dim, E, "mlp"), experts, balance_coef=uoe.balance_coef)
        else:
            self.attn = Attention(config, layer_id)
            self.ffn = (
                build_moe(config.moe, experts=experts, reuse_position=reuse_position, vocab_size=config.vocab_size)
                if kind == "moe"
                else SwiGLU(config.dim, config.dense_hidden_dim)
            )
        self.residual_from_norm = kind == "moe" and config.moe.residual_from_norm
        self.reads_token_ids = self.moe is not None and self.moe.router.reads_token_ids  # a hash router

    @property
    def moe(self) -> MoELayer | None:
        """The block's MoE layer (a chain's shared layer), or None for a dense FFN."""
        if isinstance(self.ffn, ChainOfExperts):
            return self.ffn.layer
        return self.ffn if isinstance(self.ffn, MoELayer) else None

    @property
    def causal(self) -> bool:
        """Whether position t's output depends on positions <= t only."""
        routed = [m for m in (self.moe, self.attn) if hasattr(m, "causal")]
        return all(m.causal for m in routed)

    @property
    def needs_sequences(self) -> bool:
        """Whether routing looks at other tokens of the sequence (then no KV-cache decoding)."""
        return self.kind == "uoe" or (self.moe is not None and self.moe.router.needs_sequences)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache | None,
        start_pos: int,
        mask: Tensor | None,
        *,
        infer: bool = False,
        input_ids: Tensor | None = None,
    ) -> tuple[Tensor, MoEResult | None, MoEResult | None]:
        """x: [B, S, D] -> ([B, S, D], the FFN's MoEResult or None, the attention's or None).
        infer: the decode path, the routed FFN through `infer` and no MoEResults; input_ids: [B, S]
        the tokens' ids, which a hash router reads."""
        attn_result = None
        if self.kind == "uoe":
            a, attn_result = self.attn(self.attn_norm(x), cos, sin)
            context = {}
        else:
            a, context = self.attn(self.attn_norm(x), cos, sin, kv_cache, start_pos, mask)
        if self.reads_token_ids:
            context = {**context, "input_ids": input_ids}
        x = x + a
        h = self.ffn_norm(x)
        if isinstance(self.ffn, SwiGLU):
            return x + self.ffn(h), None, None
        if infer:
            y, result, attn_result = self.ffn.infer(h, context=context), None, None
        else:
            y, result = self.ffn(h, context=context)
        return (h if self.residual_from_norm else x) + y, result, attn_result


class MoETransformer(nn.Module):
    """A decoder-only language model built from a `ModelConfig`. See the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(self._blocks(config))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()
        self.decode_layout = True  # whether generate on a CPU may store the weights for its products (see generate)
        self.decode_layout_in_use = False  # set by use_decode_layout: forward undoes it before training

    @staticmethod
    def _blocks(config: ModelConfig) -> list[Block]:
        """One block per layer; ReXMoE groups of `reuse_layers` consecutive MoE layers share one
        pool of reuse_layers * num_experts experts (one module, so one set of weights)."""
        blocks, n_moe = [], 0
        reuse = config.moe.reuse_layers if config.moe is not None else 1
        pool = None
        for i, kind in enumerate(config.layer_kinds):
            position = n_moe % reuse
            if kind == "moe" and reuse > 1 and position == 0:
                pool = build_experts(config.moe, config.moe.num_router_experts)
            blocks.append(Block(config, i, kind, pool if reuse > 1 else None, position))
            n_moe += kind == "moe"
        return blocks

    def _init_weights(self) -> None:
        """Every weight matrix ~ N(0, init_std); output projections (o_proj, down_proj) ~
        N(0, init_std / sqrt(2L)) (GPT-2). Norm gains, router gains, biases and the graph
        router's similarity (identity) keep their init."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2 or "bias" in name.rsplit(".", 1)[-1] or name.endswith("similarity.weight"):
                continue
            is_output = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
            nn.init.normal_(p, std=out_std if is_output else std)

    def _apply(self, fn, recurse=True):
        """`nn.Module._apply` (what `.to()`, `.cuda()`, `.half()` run), then every weight matrix
        that decoding on a CPU left column-major and that is now off the CPU or neither float32 nor
        bf16 stored row-major again: the layout is for CPU float32 and bf16 products only
        (`moelab.models.decode_layout`)."""
        super()._apply(fn, recurse)
        use_row_major_layout(self, keep_decode_layout=True)
        return self

    @property
    def moe_layers(self) -> dict[int, MoELayer]:
        """The MoE layers by layer index (set `.trace = True` on one to record its routing); for a
        Chain-of-Experts block, the layer its iterations share."""
        return {i: block.moe for i, block in enumerate(self.layers) if block.moe is not None}

    @property
    def needs_sequences(self) -> bool:
        """Whether some block routes over whole sequences, so decoding cannot use a KV cache."""
        return any(block.needs_sequences for block in self.layers)

    @property
    def decodes_from_cache(self) -> bool:
        """Whether a token's routing depends on that token alone, so `generate` may decode one token
        at a time from a KV cache; else (whole-sequence routers, and non-causal routing: expert
        choice, capacity dropping, whose one-token steps would route as no full forward does) it
        recomputes the whole prefix at every step, as `model(ids)` computes it."""
        return not self.needs_sequences and all(block.causal for block in self.layers)

    @torch.compiler.disable  # moves parameters: run eagerly, also under a compiled training forward
    def _store_row_major(self) -> None:
        use_row_major_layout(self)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        return_logits: bool = True,
    ) -> ModelOutput:
        """input_ids: [B, S] token ids at positions start_pos .. start_pos+S-1; targets: [B, S]
        next-token ids (-100 = ignore). With a `kv_cache`, attends to the cached positions too.
        return_logits=False (with targets, as training calls it): the loss is computed a chunk of
        rows at a time without the [B, S, V] logits (`moelab.nn.lm_loss`), and `logits` is None.
        Where a gradient flows, the weights go back to their row-major layout first if decoding
        moved them (`moelab.models.decode_layout`: an optimizer's state keeps the layout the weights
        had when it was made, and torch's fused optimizers step them as flat blocks)."""
        if self.decode_layout_in_use and torch.is_grad_enabled():
            self._store_row_major()
        self._check_call(input_ids, targets, kv_cache, start_pos)
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: without them the logits are all forward returns")
        if input_ids.device.type == "cpu":
            self._check_prompt(input_ids)
        positions = self._rope_and_mask(input_ids.shape[1], kv_cache, start_pos)
        x = self.embed(input_ids)
        moe_results, attn_results = {}, {}
        for i, layer in enumerate(self.layers):
            x, result, attn_result = layer(x, *positions, input_ids=input_ids)
            if result is not None:
                moe_results[i] = result
            if attn_result is not None:
                attn_results[i] = attn_result
        x = self.norm(x)
        logits = self.lm_head(x) if return_logits else None
        loss = None
        if logits is not None and targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        elif targets is not None:
            loss = chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        results = [*moe_results.values(), *attn_results.values()]
        aux_losses = sum_by_name([r.losses for r in results])
        aux_loss = torch.stack(list(aux_losses.values())).sum() if aux_losses else x.new_zeros(())
        metrics = mean_by_name(
            [{"experts_per_token": r.experts_per_token.detach(), **r.metrics} for r in moe_results.values()]
        )
        return ModelOutput(logits, loss, aux_loss, aux_losses, moe_results, attn_results, metrics)

    @torch.inference_mode()
    def decode_step(self, input_ids: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """The decode path: input_ids [B, S] at positions start_pos .. start_pos+S-1 -> logits of
        the last position [B, V], the KV cache updated. MoE layers run `MoELayer.infer` (no
        losses, loads or traces; a few tokens on gathered expert weights) and the output head
        only the last position. Equals `forward(...).logits[:, -1]`. On a CPU it runs faster on
        column-major weights (`moelab.models.use_decode_layout(model)`, which `generate` applies)."""
        self._check_call(input_ids, None, kv_cache, start_pos)
        return self._decode(input_ids, kv_cache, start_pos)

    def _decode(
        self, input_ids: Tensor, kv_cache: KVCache | None, start_pos: int, pads: Tensor | None = None
    ) -> Tensor:
        """decode_step without its checks (generate checks once, not at every token); pads: [B]
        the padding slots before each sequence of a left-padded batch (`generate`'s attention_mask)."""
        positions = self._rope_and_mask(input_ids.shape[1], kv_cache, start_pos, pads)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, *positions, infer=True, input_ids=input_ids)[0]
        return self.lm_head(self.norm(x[:, -1]))

    def _recomputed(self, tokens: Tensor, starts: list[int] | None) -> Tensor:
        """The last position's logits [B, V] of the whole prefix tokens [B, P], recomputed: the batch as
        one (starts None), or each sequence b alone from its slot starts[b] (after its padding)."""
        if starts is None:
            return self._decode(tokens, None, 0)
        return torch.cat([self._decode(tokens[b : b + 1, start:], None, 0) for b, start in enumerate(starts)])

    def _compiled_step(self) -> _CompiledStep:
        """`_decode` compiled, to run under `decode_step_settings(device, frozen)`; its step is called
        as `step(model, input_ids, kv_cache, start_pos, pads=None)`. The first step of a model is frozen: the
        weights folded in as constants, linear weights prepacked for the CPU's GEMM, each layer's
        q, k, v projections concatenated. Once its weights have changed in place (an optimizer
        step, a loaded state), the step is traced again with the weights as the graph's inputs and
        stays so: a frozen step would be traced again at every change (on `ref-8e-top2`, 14 s and
        ~26 MB that torch keeps for the process's life, each time), an unfrozen one never (it
        decodes at ~0.6x a frozen one's speed on a CPU at batch 1; docs/benchmarks.md).
        The graph keeps no guards on the modules (checking them at every token cost ~10 % of a
        batch-1 step), so each model compiles its own copy of `_decode`'s code (dynamo keeps its
        graphs per code object: one model's never serve another), and a fresh one whenever
        `_step_state` changes beyond what the step reads at each call: another weight tensor or
        storage, another module setting (a skip ratio, a router threshold), or, for a frozen step,
        an in-place update; the old copy and its graphs are dropped with it. The step must compile
        whole (`fullgraph`): without the module guards, the code after a graph break inside a layer
        would be shared by every layer (the first layer's, for all)."""
        tensors, versions, settings = self._step_state()
        held = _compiled_steps.get(self)
        if held is not None and (held.tensors, held.settings) == (tensors, settings):
            if not held.frozen or held.versions == versions:
                return held
            frozen = False  # updated in place since it was traced: read the weights as inputs from now on
        else:
            frozen = held is None or held.frozen
        decode = type(self)._decode
        code = decode.__code__.replace()  # a new code object, equal to the original
        step = types.FunctionType(code, decode.__globals__, "_decode", decode.__defaults__, decode.__closure__)
        guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        compiled = torch.compile(step, dynamic=False, fullgraph=True, options=guards)
        held = _compiled_steps[self] = _CompiledStep(compiled, tensors, versions, settings, frozen)
        return held

    def release_decode_cache(self) -> None:
        """Drop what `generate(compile=True)` keeps for its next call: the compiled decode step and,
        on a GPU, the captured graph with its KV cache (their memory goes once nothing else holds
        them; torch keeps each trace's frozen weights while the process lives, see docs). The next
        call compiles a frozen step again (after weights changed for good, or were written through
        `.data`, which no version counter sees)."""
        _compiled_steps.pop(self, None)
        _decode_graphs.pop(self, None)

    def _graphs_decode(self, batch: int, device: torch.device) -> bool:
        """Whether the compiled decode step of `batch` tokens on `device` runs as a CUDA graph
        (`DecodeGraph`): on a GPU, where no MoE layer's compiled `infer` reads anything back to
        the host."""
        return device.type == "cuda" and not any(
            moe.compiled_infer_syncs(batch, device) for moe in self.moe_layers.values()
        )

    def _decode_graph(self, step, ids: Tensor, cache: KVCache, position: int) -> DecodeGraph | None:
        """The compiled step captured at `position` (`DecodeGraph`), or None with a warning where
        the capture fails: e.g. once dynamo stops compiling (its recompile limit) and runs the step
        eagerly, whose router checks read back to the host. Decoding then goes on uncaptured."""
        try:
            return DecodeGraph(step, self, ids, cache, position)
        except RuntimeError as err:
            warnings.warn(f"decoding without a CUDA graph: capturing the compiled step failed ({err})", stacklevel=3)
            return None

    def _step_state(self) -> tuple[tuple, tuple, tuple]:
        """What a compiled decode graph depends on besides its inputs: every parameter and buffer
        (identity and storage; their in-place versions apart, which only a frozen graph depends on),
        which module objects the model holds (the graph names MoE layers by id for the opaque op)
        and every module's plain Python settings."""
        everything = (*self.parameters(), *self.buffers())
        tensors = tuple((id(t), t.data_ptr()) for t in everything)
        versions = tuple(t._version for t in everything)
        plain = (bool, int, float, str, type(None))
        settings = tuple(
            (name, id(module), tuple((key, value) for key, value in vars(module).items() if isinstance(value, plain)))
            for name, module in self.named_modules()
        )
        return tensors, versions, settings

    def _check_call(self, input_ids: Tensor, targets: Tensor | None, kv_cache: KVCache | None, start_pos: int) -> None:
        self._check_routing_is_causal()
        self._check_inputs(input_ids, targets, kv_cache, start_pos)
        if kv_cache is not None and not self.decodes_from_cache:
            raise ValueError(
                "this model's routing looks at other tokens of the sequence (graph-of-tokens, UoE, expert choice "
                "or capacity dropping), so it cannot decode from a KV cache; call it on the full sequence "
                "(generate() does so by itself)"
            )

    def _rope_and_mask(
        self, S: int, kv_cache: KVCache | None, start_pos: int | Tensor, pads: Tensor | None = None
    ) -> tuple[Tensor, Tensor, KVCache | None, int | Tensor, Tensor | None]:
        """What every block takes besides x: (cos, sin: [S, Dh], kv_cache, start_pos, mask: [S, P]
        or None, for causal attention over the S positions (and everything cached before them)).
        A tensor start_pos (the static decode step) masks the whole cache: mask [S, max_len].
        pads: [B] a left-padded batch's padding slots per sequence (`_padded_rope_and_mask`)."""
        if pads is not None:
            return self._padded_rope_and_mask(S, kv_cache, start_pos, pads)
        if isinstance(start_pos, Tensor):
            here = start_pos + torch.arange(S, device=start_pos.device)  # [S]
            cached = torch.arange(kv_cache.max_len, device=start_pos.device)
            mask = cached <= here[:, None]  # [S, max_len]
            return self.rope_cos[here], self.rope_sin[here], kv_cache, start_pos, mask
        cos = self.rope_cos[start_pos : start_pos + S]
        sin = self.rope_sin[start_pos : start_pos + S]
        mask = None  # is_causal is enough unless earlier positions sit in the cache
        if kv_cache is not None and start_pos > 0 and S > 1:  # one position attends to all: no mask
            positions = torch.arange(start_pos + S, device=cos.device)
            mask = positions <= positions[start_pos:, None]  # [S, P]
        return cos, sin, kv_cache, start_pos, mask

    def _padded_rope_and_mask(
        self, S: int, kv_cache: KVCache | None, start_pos: int | Tensor, pads: Tensor
    ) -> tuple[Tensor, Tensor, KVCache | None, int | Tensor, Tensor]:
        """`_rope_and_mask` for slots start_pos .. start_pos+S-1 of a batch whose sequence b starts
        after pads[b] padding slots: its positions count from its first token (cos, sin:
        [B, 1, S, Dh]) and its queries never attend to its padding (mask [B, 1, S, P]). A padding
        slot attends to itself alone, so that its activations, never read, stay finite."""
        slots = start_pos + torch.arange(S, device=pads.device)  # [S]
        cached = kv_cache.max_len if isinstance(start_pos, Tensor) else start_pos + S
        keys = torch.arange(cached, device=pads.device)  # [P]
        # [B, S, P]: its own tokens up to the query, or itself alone while it is padding
        mask = (keys <= slots[:, None]) & (keys >= pads[:, None, None]) | (keys == slots[:, None])
        positions = (slots - pads[:, None]).clamp(min=0)  # [B, S]
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        return cos, sin, kv_cache, start_pos, mask[:, None]

    def _check_routing_is_causal(self) -> None:
        if self.config.allow_noncausal_routing:
            return
        leaky = {i: block for i, block in enumerate(self.layers) if not block.causal}
        if leaky:
            kinds = ", ".join(sorted({_leak_name(block) for block in leaky.values()}))
            raise ValueError(
                f"MoE layers {sorted(leaky)} route non-causally ({kinds}): a token's output depends on other "
                "tokens, later ones included, so a causal language model would see the future. Use "
                "router='topk', 'topp' or 'relu' without capacity_factor (or UoE selection='causal'), or set "
                "ModelConfig.allow_noncausal_routing=True to accept the leak"
            )

    def _check_inputs(
        self, input_ids: Tensor, targets: Tensor | None, kv_cache: KVCache | None, start_pos: int
    ) -> tuple[int, int]:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            got = f"{input_ids.dtype} {list(input_ids.shape)}"
            raise ValueError(f"input_ids must be integer token ids [batch, seq], got {got}")
        B, S = input_ids.shape
        if S == 0:
            raise ValueError("input_ids hold no tokens ([batch, 0]); give at least one token per sequence")
        if B == 0:
            raise ValueError("input_ids hold no sequences ([0, seq]); give at least one sequence")
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets must have input_ids' shape {[B, S]}, got {list(targets.shape)}")
        limit = self.config.max_seq_len if kv_cache is None else kv_cache.max_len
        if start_pos < 0 or start_pos + S > limit:
            where = "ModelConfig.max_seq_len" if kv_cache is None else "the KV cache's max_len"
            raise ValueError(f"positions {start_pos}..{start_pos + S - 1} exceed {where} ({limit})")
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"the KV cache holds {kv_cache.batch_size} sequences but input_ids has {B}")
        return B, S

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        attention_mask: Tensor | None = None,
        temperature: float = 1.0,
        top_p: float | None = None,
        top_k: int | None = None,
        greedy: bool = False,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
        streamer: TokenStreamer | None = None,
    ) -> Tensor:
        """input_ids: [B, S] prompts -> [B, S + n] with n <= max_new_tokens new tokens, decoded with a
        KV cache (`decodes_from_cache`; else the whole prefix recomputed at every step, as the full
        forward computes it, and `compile` does nothing). attention_mask: [B, S], 1 for the prompts'
        tokens and 0 for padding, which must come before them (left padding, transformers' convention
        for decoder-only generation): each sequence then decodes as it would alone, its positions
        counted from its first token and its padding never attended to (on a GPU a padded batch's
        compiled step runs without a CUDA graph). Where the prefix is recomputed, a padded batch
        recomputes each sequence on its own without its padding, and so does any batch of a model
        whose routing is non-causal (expert choice, capacity dropping, UoE's reference selection
        route the tokens of a whole batch together, as `model(ids)` does): each sequence decodes as
        it would alone.
        greedy: argmax; else sample from softmax(logits / temperature), restricted to the top_k
        most likely tokens and then to the nucleus of mass top_p, where given
        (`sample_next_token`). A sequence that emits eos_token_id is padded with it; generation
        stops early once all have. streamer: told the prompts (`put(input_ids)`), each step's new tokens
        (`put(ids [B])`) and the end (`end()`), as transformers' `generate` tells it: its
        `TextStreamer(tokenizer, skip_prompt=True)` prints a batch of one as it decodes. Runs in the
        model's current mode (call `.eval()`). compile: run the one-token steps as a `torch.compile`d
        static step (the position a tensor, the whole KV cache, its length rounded up to a multiple of
        64, attended under a mask: the same shapes at every step, one trace per batch size and cache
        length; the weights frozen into the graph until they first change in place, then read as the
        graph's inputs, see `_compiled_step`); the prompt runs eagerly. Where an MoE layer does not
        gather its experts' weights (more than a few tokens, or large experts), its experts run inside
        the graph as one opaque op (`moelab.nn.opaque`). Models with a layer that drops by capacity or
        splits experts over ranks decode eagerly (`MoELayer.compiles_infer`). On a GPU, where no MoE
        layer reads anything back to the host (`MoELayer.compiled_infer_syncs`), the step runs as a
        CUDA graph (`DecodeGraph`), captured at the first one-token step and kept with its KV cache
        for the next call with the same batch size and cache length (one per model: a call of other
        shapes, or after the weights changed, frees the one held and captures anew;
        `release_decode_cache` frees it; not for concurrent calls on one model). On a CPU an eager
        call stores the weight matrices column-major, in place (`moelab.models.decode_layout`: same
        values, shapes and parameters, 1.04-1.2x faster eager decoding; `state_dict()` tensors are
        then transposed views), and a compiling call row-major (what Inductor's products run fastest
        on); while the model holds a compiled step (until `release_decode_cache`) neither moves them,
        nor does any call once `model.decode_layout = False`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {list(input_ids.shape)}")
        B, S = input_ids.shape
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0 (0: the prompts back), got {max_new_tokens!r}")
        if S + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"{'prompt' if B == 1 else 'the prompts, padded to one length,'} ({S} tokens) + max_new_tokens ({max_new_tokens}) "
                f"must fit ModelConfig.max_seq_len "
                f"({self.config.max_seq_len}); shorten one of them"
            )
        ignored = [name for name, given in (("temperature", temperature != 1.0), ("top_p", top_p is not None),
                                            ("top_k", top_k is not None), ("generator", generator is not None)) if given]  # fmt: skip
        if greedy and ignored:
            raise ValueError(f"greedy=True takes the argmax, so {', '.join(ignored)} would be ignored; drop them or greedy")
        if not greedy:
            check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, greedy_hint="use greedy=True for argmax")
        self._check_inputs(input_ids, None, None, 0)
        self._check_prompt(input_ids)
        pads = left_padding(attention_mask, input_ids)
        # recomputing the prefix: each sequence alone from its first token where the padding or the batch
        # would change its routing (expert choice, capacity dropping route a batch's tokens together)
        noncausal = not all(block.causal for block in self.layers)
        recompute_from = None
        if not self.decodes_from_cache and (pads is not None or (B > 1 and noncausal)):
            recompute_from = [0] * B if pads is None else pads.tolist()
        cache, compiled, static_step, graphed, shapes = None, None, None, False, None
        if self.decodes_from_cache:  # else recompute the whole prefix at every step
            length = S + max_new_tokens
            compiling = compile and all(moe.compiles_infer for moe in self.moe_layers.values())
            if compiling and forward_hooked(self.modules()):
                raise ValueError(
                    "compile=True runs each decode step as one compiled graph, which calls no forward hooks, "
                    "and modules of this model have some (a routing capture's, say): remove them, or drop "
                    "compile"
                )
            if input_ids.device.type == "cpu" and self.decode_layout and self not in _compiled_steps:
                # eager one-token products run faster on column-major weights, Inductor's on row-major
                # ones; never moved under a compiled step the model holds (it would trace again)
                if compiling:
                    use_row_major_layout(self)
                else:
                    use_decode_layout(self, B)
            if compiling:
                length = decode_cache_length(S, max_new_tokens, compiling, self.config.max_seq_len)
                compiled = self._compiled_step()
                static_step = compiled.step
                graphed = pads is None and self._graphs_decode(B, input_ids.device)
            shapes = (static_step, B, length, input_ids.device, self.embed.weight.dtype)
            held = _decode_graphs.get(self)
            if graphed and held is not None and held[0] == shapes:  # the last call's graph and cache serve
                graphed, cache = held[1], held[2]
            else:
                if graphed:
                    _decode_graphs.pop(self, None)  # the graph held before, and its memory, go first
                cache = KVCache(self.config, B, length, device=input_ids.device, dtype=self.embed.weight.dtype)
                if compiled is not None:
                    compiled.mark_cache(cache)
        tokens, step_ids, pos = input_ids, input_ids, 0
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        # the logits' running sum: NaN or Inf once any step's are (checked after the loop, no per-step wait)
        checksum = torch.zeros((), dtype=torch.float64, device=input_ids.device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        self._check_call(input_ids, None, cache, 0)  # the longest call fits: checked above
        # Inductor reads these settings when it traces (not from torch.compile's options); entered
        # once for the whole loop, not at every token.
        settings = contextlib.nullcontext() if compiled is None else decode_step_settings(input_ids.device, compiled.frozen)
        with settings:
            for _ in range(max_new_tokens):
                if graphed is True and pos > 0:  # the first one-token step: capture it
                    graphed = self._decode_graph(static_step, step_ids, cache, pos)
                    if graphed is not None:
                        _decode_graphs[self] = (shapes, graphed, cache)
                if cache is None:
                    logits = self._recomputed(tokens, recompute_from)
                elif graphed and pos > 0:
                    logits = graphed(step_ids, pos)
                elif static_step is not None and pos > 0:
                    position = torch.tensor(pos, device=input_ids.device)
                    logits = static_step(self, step_ids, cache, position, pads)
                else:
                    logits = self._decode(step_ids, cache, pos, pads)
                pos += step_ids.shape[1]
                checksum.add_(logits.sum(dtype=torch.float64))
                next_ids = sample_next_token(
                    logits, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                    generator=generator,
                )
                if eos_token_id is not None:
                    next_ids = next_ids.masked_fill(done, eos_token_id)
                    done |= next_ids == eos_token_id
                step_ids = next_ids[:, None]
                tokens = torch.cat([tokens, step_ids], dim=1)
                if streamer is not None:
                    streamer.put(next_ids.cpu())
                if eos_token_id is not None and done.all():
                    break
        if streamer is not None:
            streamer.end()
        if not math.isfinite(checksum.item()):
            raise ValueError(
                "the logits held NaN or Inf while decoding, so these tokens are not the model's: its weights "
                "or inputs hold non-finite values (check the checkpoint, or the dtype's range)"
            )
        if self.decode_layout_in_use and torch.distributed.is_available() and torch.distributed.is_initialized():
            use_row_major_layout(self)  # a DDP wrapper made now records the weights' layout: the training one
        return tokens

    def _check_prompt(self, input_ids: Tensor) -> None:
        """Every id in the vocabulary (a read back to the host: `generate` once per call, `forward`
        on a CPU only)."""
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.config.vocab_size:
            raise ValueError(
                f"input_ids hold token ids outside the vocabulary [0, {self.config.vocab_size}): "
                f"{int(input_ids.min())}..{int(input_ids.max())}; encode the prompts with this model's tokenizer"
            )


class TokenStreamer(Protocol):
    """What `generate` tells as it decodes (transformers' streamers, e.g. `TextStreamer`, are ones):
    put(the prompts' ids [B, S]) first, then put(each step's new ids [B]), then end()."""

    def put(self, value: Tensor) -> None: ...

    def end(self) -> None: ...


def left_padding(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
    """[B] how many padding slots come before each prompt of a left-padded batch (attention_mask
    [B, S]: 1 for the prompts' tokens, 0 for padding), or None where nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        shapes = f"{list(input_ids.shape)}, got {list(attention_mask.shape)}"
        raise ValueError(f"attention_mask must have input_ids' shape {shapes}")
    if attention_mask.is_complex() or not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold 1 for the prompts' tokens and 0 for padding, nothing else")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    after = (mask[:, 1:] < mask[:, :-1]).any(1).nonzero().flatten().tolist()
    if after:
        raise ValueError(
            f"attention_mask rows {after} pad after their tokens: generation needs the padding before each "
            "prompt (left padding; with a transformers tokenizer, padding_side='left')"
        )
    pads = (mask == 0).sum(1)
    empty = (pads == mask.shape[1]).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all padding: each prompt needs a token")
    return pads if bool(pads.any()) else None


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh), masked) v with grouped keys: q [B, H, S, Dh], k, v [B, G, P, Dh],
    mask [S, P] or [B, 1, S, P] (True = attend) -> [B, H, S, Dh]; head h reads key group h // (H / G), as
    `scaled_dot_product_attention(..., enable_gqa=True)`. Written out for the compiled decode step,
    where Inductor fuses it (the CPU's SDPA kernel costs tens of microseconds for one query)."""
    B, H, S, Dh = q.shape
    G = k.shape[1]
    grouped = q.reshape(B, G, (H // G) * S, Dh)  # the H / G heads of a group share its keys
    scores = (grouped @ k.transpose(-1, -2)).view(B, G, H // G, S, -1) * (1.0 / math.sqrt(Dh))
    if mask.dim() == 4:  # one mask per sequence: [B, 1, 1, S, P] against the scores' [B, G, H / G, S, P]
        mask = mask.unsqueeze(2)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).view(B, G, (H // G) * S, -1)
    return (probs @ v).view(B, H, S, Dh)


def _leak_name(block: Block) -> str:
    """Why a block is non-causal, for the error message."""
    if block.kind == "uoe":
        return "UoE reference selection"
    router = block.moe.router
    return type(router).__name__ if not router.causal else "capacity dropping"


@dataclass(frozen=True)
class Sampling:
    """How to draw each next token instead of taking the argmax (`sample_next_token`): softmax of
    the logits / temperature, the top_k most likely tokens, then the nucleus of mass top_p, where
    given; `seed` seeds the draws, so one seed gives one text for the same prompts (a batch
    draws for all its sequences from one generator)."""

    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self):
        check_sampling(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            greedy_hint="for the most likely token at every step decode greedily (no temperature, top-p or top-k)",
        )  # fmt: skip
        if not is_int(self.seed) or not -(2**63) <= self.seed < 2**64:  # torch.Generator's seeds
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        # Python's float and int: transformers' samplers refuse 2 or numpy's float32 as a temperature
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", float(self.top_p))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", int(self.top_k))

    def generator(self, device: torch.device | str) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def check_sampling(
    *, temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None, greedy_hint: str = ""
) -> None:
    """Refuse a temperature that is not a finite number > 0 (`greedy_hint` says how to take the
    argmax instead), a nucleus mass outside (0, 1] and a top_k below 1, with what to give instead;
    True/False are refused where a number is meant (True would pass as 1.0)."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and not is_number(value):  # a tensor, a string, a bool
            raise ValueError(f"{name} must be a Python number (float), got {type(value).__name__} {value!r}")
    if temperature is None or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be > 0 and finite when sampling, got {temperature!r}; {greedy_hint}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (1: greedy), got {top_k!r}")


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits: [B, V] -> next token ids [B]: the argmax if greedy, else a sample from
    softmax(logits / temperature), keeping only the tokens of the top_k largest logits (and any
    equal to the k-th) if top_k is given, then, renormalised, only the smallest set of most likely tokens
    whose mass reaches top_p (the token that crosses it included; of tokens of equal probability
    at the boundary, whichever the sort puts first; top_p 1.0 keeps every token) if top_p is given:
    transformers' order and boundaries (temperature, top-k, top-p).

    A sample is one uniform draw per row, found in the cumulative probabilities (`_draw`)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        # on the logits, ordered as the tempered ones: their probabilities may round equal (logits
        # 1e-6 apart at temperature 100), which would keep more than k
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    # shifted first, so that a tiny temperature tends to the argmax instead of inf / inf
    probs = ((logits - logits.amax(-1, keepdim=True)) / temperature).softmax(-1)
    if top_p is not None and top_p < 1.0:  # 1.0: every token (float32's sums reach 1 before the tail)
        sorted_probs, order = probs.sort(-1, descending=True)
        # float64 sums, as a fraction of their total (float32's softmax sums to 1 within about 1e-6):
        # float32's, from the largest down, moved the boundary by a token in 5 % of rows (V = 8,192)
        cdf = sorted_probs.double().cumsum(-1)
        mass_before = cdf - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p * cdf[..., -1:], 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return _draw(probs, generator)


NOT_DRAWABLE = (
    "cannot sample: a row of logits has no finite maximum (NaN, or every token -inf), so its "
    "probabilities are not a distribution; check the model's weights and inputs, or the logits processors"
)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """probs: [B, V] (each row's sum > 0) -> [B] token ids, token i drawn with probability
    probs[i] / sum: the token whose interval of the cumulative sum holds u * sum, u uniform in [0, 1).
    `torch.multinomial` draws an exponential per token instead: 138 against 23 us a row at V = 8,192,
    2.4 against 0.12 ms at V = 151,936 (one CPU thread). A token of probability 0 is never drawn:
    the first sum above u * sum (right=True) lies past every empty interval, and where rounding
    makes u * sum the total itself, the token whose interval reaches the total is taken. The sums and
    u are float64: in float32 (steps of 2**-24 near 1) a token of probability below about 6e-8 got
    an interval of 0 or 6e-8 (V = 151,936, logits 3 * randn: 35 % of the tokens, 5e-4 of the mass, never
    drawn). A row whose sum is not a positive finite number (NaN logits, or every token's -inf) is
    refused, as `torch.multinomial` refused it."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:].contiguous()  # searchsorted warns of (and copies) non-contiguous values
    drawable = (total.isfinite() & (total > 0)).all()
    if probs.device.type != "cpu":
        torch._assert_async(drawable, NOT_DRAWABLE)  # no wait for the device
    elif not drawable:
        raise ValueError(NOT_DRAWABLE)
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    drawn = torch.searchsorted(cdf, u * total, right=True)
    return torch.minimum(drawn, torch.searchsorted(cdf, total)).squeeze(-1)
