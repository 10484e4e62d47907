"""Union-of-Experts (Yang et al. 2025, arXiv 2503.02495): a dense block cut into experts the way
tensor parallelism cuts it, with routing deciding which tokens each expert processes.

Shape legend: B sequences, S positions, T = B*S tokens, D model dim, E experts, H heads (the
attention's experts), Dh head dim, L' tokens gathered per (sequence, expert), F dense MLP width.

- Selective multi-head attention (SMHA, `SelectiveAttention`): the experts are the heads. Each
  head attends among the tokens routed to it only (gathered, in position order, causally
  masked), and its output projection gives a full D-vector per token; the union (sum over heads)
  is scattered back to the tokens. A token no head selects gets 0 from attention.
- Union of MLP experts (UoME): expert e is the e-th tensor-parallel slice of a dense SwiGLU
  (gate/up rows e*F/E .. (e+1)*F/E, the matching down columns); summing all experts gives the
  dense MLP. Built as an `MoELayer` with a `UoERouter` (see `split_dense_mlp`).
- Routing (`UoERouter`) is hierarchical: optional *expert selection* (each sequence keeps its
  `expert_top_k` best experts, scored from the mean of the sequence) and patch-wise *data
  selection* (which tokens an expert processes).

Two behaviours, chosen by `selection` and `gate`:

- default, `selection="causal"`, `gate="router"`: data selection is token choice (each token
  picks its top-k experts among the allowed ones), expert selection scores the mean of the
  prefix (tokens <= t), so token t's routing never sees later tokens. Gate values scale the
  expert outputs, gate_e = n * s_e / sum_chosen s (s = token probability times the sequence-level
  probability, n = experts chosen), so the router trains and the gates average 1 over a token's
  experts: with every expert chosen and a uniform router the block is exactly the dense block.
  With one expert per token that gate is 1, so `UoEConfig` asks for a balance loss there.
- reference code (`selection="reference"`, `gate="none"`): scores are normalised across the
  batch dimension after a top-k mask, each (sequence, expert) then takes its top L' tokens, L'
  the largest number of routed tokens of any (sequence, expert) (attention) or a fixed
  fraction of S (MLP, `token_fraction`), so tokens not routed to an expert can fill its slots;
  expert selection scores the mean of the whole sequence (the reference flattens a fixed-length
  sequence into one linear layer; the mean accepts any length). This is non-causal. With
  `gate="none"` the gate values are not applied, so the router gets no gradient and stays at its
  initialisation, as in the reference. Heads see compacted RoPE positions 0..L'-1 with
  `positions="compact"` (the reference); the default uses the tokens' real positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.experts import SwiGLU
from moelab.nn.losses import load_balancing_loss
from moelab.nn.moe import MoEResult
from moelab.nn.rope import apply_rope
from moelab.nn.routers import Router, Routing, check_top_k
from moelab.validation import check_choice, check_field_types, check_known_fields

SELECTIONS = ("causal", "reference")
GATES = ("router", "none")
POSITIONS = ("real", "compact")


@dataclass(kw_only=True)
class UoEConfig:
    """The Union-of-Experts part of a `ModelConfig` (layer kind "uoe"); see the module docstring.

    attn_top_k: heads per token (reference: H // 2). mlp_experts: E slices of the dense MLP
        (must divide ModelConfig.dense_hidden_dim); mlp_top_k: slices per token (reference 2 of 4).
    attn_expert_top_k, mlp_expert_top_k: expert selection, experts each sequence (prefix) keeps;
        None = off. Must lie in [top_k, experts].
    selection: "causal" (default) or "reference"; gate: "router" (default) or "none".
    positions: RoPE positions inside a head, "real" (default) or "compact" (reference).
    token_fraction: reference MLP data selection, tokens per (sequence, expert) = fraction * S.
    balance_coef: Switch balance loss on both routers (the reference has none).
    router_bias: a bias on the router logits (the reference's nn.Linear has one).
    """

    attn_top_k: int = 2
    mlp_experts: int = 4
    mlp_top_k: int = 2
    attn_expert_top_k: int | None = None
    mlp_expert_top_k: int | None = None
    selection: str = "causal"
    gate: str = "router"
    positions: str = "real"
    token_fraction: float = 0.5
    balance_coef: float = 0.0
    router_bias: bool = False

    def __post_init__(self):
        check_field_types(self)
        check_choice("UoEConfig.selection", self.selection, SELECTIONS)
        check_choice("UoEConfig.gate", self.gate, GATES)
        check_choice("UoEConfig.positions", self.positions, POSITIONS)
        if self.mlp_experts < 1:
            raise ValueError(f"UoEConfig.mlp_experts must be >= 1, got {self.mlp_experts}")
        check_top_k(self.mlp_top_k, self.mlp_experts, name="UoEConfig.mlp_top_k")
        if self.mlp_expert_top_k is not None:
            check_expert_top_k(self.mlp_expert_top_k, self.mlp_top_k, self.mlp_experts, part="mlp_")
        if not 0.0 < self.token_fraction <= 1.0:
            raise ValueError(f"UoEConfig.token_fraction must lie in (0, 1], got {self.token_fraction}")
        if self.selection != "reference" and self.token_fraction != UoEConfig.token_fraction:
            raise ValueError(
                f"UoEConfig.token_fraction={self.token_fraction} has no effect with selection={self.selection!r} "
                "(only the reference selection reads it); set selection='reference' or leave it out"
            )

    def check_trains(self) -> None:
        """Refuse to train routers that would get no gradient: a causal router choosing one expert
        per token gates it by n * s / sum s = 1 exactly, so gate='router' alone leaves it untrained
        (as gate='none' does, silently). Such a model still runs (`RunConfig` calls this)."""
        for part in ("attn", "mlp"):
            top_k = getattr(self, f"{part}_top_k")
            if top_k == 1 and self.gate == "router" and self.selection == "causal" and not self.balance_coef:
                raise ValueError(
                    f"UoEConfig.{part}_top_k=1 with gate='router': a token's one gate is n * s / sum s = 1, so the "
                    f"router gets no gradient in training; use {part}_top_k >= 2, a balance_coef > 0 (the router "
                    "then learns from the balance loss), or gate='none' (the reference's untrained router)"
                )

    def check_heads(self, n_heads: int) -> None:
        """Validate the attention settings against the model's H heads."""
        check_top_k(self.attn_top_k, n_heads, name="UoEConfig.attn_top_k")
        if self.attn_expert_top_k is not None:
            check_expert_top_k(self.attn_expert_top_k, self.attn_top_k, n_heads, part="attn_")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UoEConfig:
        check_known_fields(cls, data)
        return cls(**data)

    def router(self, dim: int, num_experts: int, part: str) -> UoERouter:
        """The router of the "attn" or "mlp" part."""
        attn = part == "attn"
        return UoERouter(
            dim,
            num_experts,
            self.attn_top_k if attn else self.mlp_top_k,
            selection=self.selection,
            gate=self.gate,
            expert_top_k=self.attn_expert_top_k if attn else self.mlp_expert_top_k,
            token_fraction=None if attn else self.token_fraction,
            bias=self.router_bias,
        )


def check_expert_top_k(value: int, top_k: int, num_experts: int, part: str = "") -> None:
    """Expert selection keeps `value` experts per sequence; a token then picks its top_k among them.
    part: "attn_" or "mlp_" for UoEConfig's names, "" for the router's own."""
    if not top_k <= value <= num_experts:
        where = f"UoEConfig.{part}" if part else ""
        raise ValueError(
            f"{where}expert_top_k ({value}) must lie in [{part}top_k={top_k}, {num_experts} experts]: "
            "a token picks its top-k among the experts its sequence keeps"
        )


class UoERouter(Router):
    """Hierarchical UoE routing: `forward(x [B, S, D], context) -> Routing` with one slot per
    expert (indices [T, E], -1 where the expert does not process the token; weights [T, E]).

    weight: [E, D] token-level gate; expert_weight: [E, D] sequence-level gate (expert selection).
    """

    needs_sequences = True
    variable_k = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        selection: str = "causal",
        gate: str = "router",
        expert_top_k: int | None = None,
        token_fraction: float | None = None,
        bias: bool = False,
    ):
        super().__init__(dim, num_experts, bias=bias)
        check_top_k(top_k, num_experts)
        check_choice("selection", selection, SELECTIONS)
        check_choice("gate", gate, GATES)
        if expert_top_k is not None:
            check_expert_top_k(expert_top_k, top_k, num_experts)
        if token_fraction is not None and not 0.0 < token_fraction <= 1.0:
            raise ValueError(f"token_fraction must lie in (0, 1] or be None, got {token_fraction}")
        self.k, self.top_k = top_k, num_experts
        self.selection, self.gate = selection, gate
        self.expert_top_k, self.token_fraction = expert_top_k, token_fraction
        self.causal = selection == "causal"
        self.expert_weight = None
        if expert_top_k is not None:
            self.expert_weight = nn.Parameter(torch.empty(num_experts, dim))
            nn.init.normal_(self.expert_weight, std=dim**-0.5)

    def forward(self, x: Tensor, context: dict[str, Tensor] | None = None) -> Routing:
        B, S, D = x.shape
        E = self.num_experts
        logits = self.router_logits(x.reshape(B * S, D))
        probs = logits.softmax(-1)
        scores = probs.view(B, S, E)
        allowed = None
        if self.expert_weight is not None:
            if self.causal:  # the mean of the prefix: tokens <= t
                pooled = x.float().cumsum(1) / torch.arange(1, S + 1, device=x.device)[:, None]
            else:
                pooled = x.float().mean(1, keepdim=True)
            sequence_probs = F.linear(pooled, self.expert_weight.float()).softmax(-1)  # [B, S or 1, E]
            top = sequence_probs.topk(self.expert_top_k, dim=-1).indices
            allowed = torch.zeros_like(sequence_probs, dtype=torch.bool).scatter_(-1, top, True)
            scores = scores * sequence_probs
        token_choice = scores if allowed is None else scores.masked_fill(~allowed, -1.0)
        top = token_choice.topk(self.k, dim=-1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)  # [B, S, E]
        if not self.causal:
            chosen = self._reference_selection(scores, chosen)
        if self.gate == "router":
            kept = scores * chosen
            weights = kept * chosen.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=1e-20)
        else:
            weights = chosen.float()
        experts = torch.arange(E, device=x.device).expand(B * S, E)
        indices = experts.masked_fill(~chosen.view(B * S, E), -1)
        return Routing(indices, weights.reshape(B * S, E), logits, probs)

    def _reference_selection(self, scores: Tensor, chosen: Tensor) -> Tensor:
        """The reference's per-(sequence, expert) token pick: scores masked to the token choice,
        normalised across the batch, then the top L' tokens of each (sequence, expert)."""
        if chosen.numel() == 0:  # no sequence or no position: nothing to pick
            return chosen
        masked = scores * chosen
        normalised = masked / (masked.sum(0, keepdim=True) + 1e-8)
        S = scores.shape[1]
        if self.token_fraction is None:
            count = int((normalised > 0).sum(1).max())
        else:
            count = int(self.token_fraction * S)
        count = max(1, min(count, S))
        top = normalised.topk(count, dim=1).indices  # [B, L', E]
        return torch.zeros_like(chosen).scatter_(1, top, True)


class SelectiveAttention(nn.Module):
    """SMHA: `forward(x [B, S, D], cos, sin) -> (y [B, S, D], MoEResult)`; heads are experts.

    q_proj, k_proj, v_proj: Linear(D, H*Dh); o_proj: Linear(H*Dh, D), the layout of the dense
    attention (so its weights load unchanged); router: a `UoERouter` over the H heads.
    cos, sin: [S, Dh] RoPE tables of the positions 0..S-1.
    """

    def __init__(self, dim: int, n_heads: int, config: UoEConfig):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        config.check_heads(n_heads)
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.router = config.router(dim, n_heads, "attn")
        self.compact_positions = config.positions == "compact"
        self.balance_coef = config.balance_coef
        self.stats_group = None  # data-parallel ranks whose load the balance loss counts (`load_balancing_loss`)

    @property
    def causal(self) -> bool:
        return self.router.causal

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, MoEResult]:
        B, S, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        routing = self.router(x)
        chosen = (routing.indices >= 0).view(B, S, H).transpose(1, 2)  # [B, H, S]
        gates = routing.weights.view(B, S, H).transpose(1, 2).to(x.dtype)
        counts = chosen.sum(-1)  # [B, H]
        most = int(counts.max()) if counts.numel() else 0
        width = min(max(most, 1), S)  # L' (heads that took no token keep one padded slot; none where S = 0)
        positions = torch.arange(S, device=x.device)
        # [B, H, L']: the chosen tokens first, in position order, then padding
        order = torch.where(chosen, positions, positions + S).argsort(-1)[..., :width]
        valid = torch.arange(width, device=x.device) < counts[..., None]
        rows = x.unsqueeze(1).expand(B, H, S, D).gather(2, order[..., None].expand(-1, -1, -1, D))  # [B, H, L', D]
        q, k, v = (self._per_head(rows, proj) for proj in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, L', Dh]
        if self.compact_positions:
            c, s = cos[:width], sin[:width]
        else:
            c, s = cos[order], sin[order]
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        # padded slots sit after every chosen token, so the causal mask keeps them out of real queries
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        w_o = self.o_proj.weight.view(D, H, Dh).transpose(0, 1)  # [H, D, Dh]
        out = torch.einsum("bhle,hde->bhld", heads, w_o)
        out = out * (gates.gather(2, order) * valid)[..., None]
        flat = (order + torch.arange(B, device=x.device)[:, None, None] * S).reshape(-1)
        y = x.new_zeros(B * S, D).index_add(0, flat, out.reshape(-1, D)).view(B, S, D)
        losses = {}
        if self.balance_coef:
            losses["balance"] = self.balance_coef * load_balancing_loss(routing.probs, routing.indices, self.stats_group)
        result = MoEResult(
            losses=losses,
            tokens_per_expert=counts.sum(0),
            dropped_fraction=x.new_zeros(()),
            experts_per_token=chosen.sum() / max(B * S, 1),
        )
        return y, result

    def _per_head(self, rows: Tensor, proj: nn.Linear) -> Tensor:
        """rows: [B, H, L', D] -> each head's projection of its own rows, [B, H, L', Dh]."""
        return torch.einsum("bhld,hed->bhle", rows, proj.weight.view(self.n_heads, self.head_dim, -1))


def split_dense_mlp(mlp: SwiGLU, num_experts: int) -> dict[str, Tensor]:
    """The UoME experts that sum to a dense SwiGLU: {"gate_up_proj": [E, 2F/E, D],
    "down_proj": [E, D, F/E]} (SwiGLUExperts layout; expert e = rows e*F/E .. of gate and up)."""
    F_, D = mlp.gate_proj.weight.shape
    if F_ % num_experts:
        raise ValueError(f"the dense MLP width {F_} must be divisible by the {num_experts} experts")
    width = F_ // num_experts
    gate = mlp.gate_proj.weight.view(num_experts, width, D)
    up = mlp.up_proj.weight.view(num_experts, width, D)
    down = mlp.down_proj.weight.view(D, num_experts, width).transpose(0, 1)
    return {"gate_up_proj": torch.cat([gate, up], dim=1), "down_proj": down.contiguous()}
