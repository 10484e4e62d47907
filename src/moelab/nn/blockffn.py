"""BlockFFN (Song et al. 2025, arXiv 2507.08771): sparsity metrics and chunk-level objectives.

Shape legend: B sequences, S positions, T = B*S tokens, E experts. The router itself is
`moelab.nn.routers.ReLURouter` (ReLU then RMSNorm over experts).

- Token-level sparsity TLS = fraction of (token, expert) router entries that are exactly 0.
- Chunk-level sparsity CLS_L = 1 - fraction of (chunk of L consecutive tokens, expert) pairs in
  which the expert fires for any token of the chunk. CLS_1 = TLS; the paper reports L = 8.
- Activation locality loss L_AL pulls each token's activation pattern toward the previous
  token's; chunk sparsification loss L_CS penalises the probability that an expert fires
  anywhere in a chunk. `AdaptiveCoefficient` is the paper's schedule for L_CS's weight.

The reference code multiplies the router distribution in place inside the chunk loss after
another term has used it, which can break autograd; everything here is out of place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def active_experts(indices: Tensor, num_experts: int) -> Tensor:
    """indices: [T, K] chosen experts (-1 = empty slot) -> active: [T, E] bool."""
    slots = indices.masked_fill(indices < 0, num_experts)  # empty slots go to a spare column
    active = torch.zeros(indices.shape[0], num_experts + 1, dtype=torch.bool, device=indices.device)
    return active.scatter_(1, slots, True)[:, :num_experts]


def token_level_sparsity(active: Tensor) -> Tensor:
    """active: [..., E] bool (expert fires for the token) -> TLS in [0, 1], a 0-dim tensor."""
    return 1.0 - active.float().mean()


def chunk_level_sparsity(active: Tensor, chunk_len: int) -> Tensor:
    """active: [T, E] or [B, S, E] bool -> CLS for chunks of `chunk_len` consecutive tokens (within
    each sequence for [B, S, E]); a final partial chunk is dropped. A 0-dim tensor."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    seqs = active.reshape(-1, *active.shape[-2:]) if active.dim() >= 3 else active[None]
    num_chunks = seqs.shape[1] // chunk_len
    if num_chunks == 0:
        raise ValueError(f"need at least chunk_len={chunk_len} tokens per sequence, got {seqs.shape[1]}")
    chunks = seqs[:, : num_chunks * chunk_len].reshape(seqs.shape[0], num_chunks, chunk_len, -1)
    return 1.0 - chunks.any(dim=2).float().mean()


def sparsity_metrics(active: Tensor, sequences: Tensor | None, chunk_len: int) -> dict[str, Tensor]:
    """{"tls": TLS of active [T, E]} plus {"cls": CLS_chunk_len} when the tokens form sequences
    [B, S, E] of at least chunk_len tokens."""
    if active.numel() == 0:
        return {}
    metrics = {"tls": token_level_sparsity(active)}
    if sequences is not None and sequences.shape[1] >= chunk_len:
        metrics["cls"] = chunk_level_sparsity(sequences, chunk_len)
    return metrics


def activation_locality_loss(logits: Tensor, steepness: float = 100.0) -> Tensor:
    """L_AL = mean over (t, e) of BCE-with-logits(steepness * r[t-1, e], sigmoid(steepness * r[t, e])).

    logits: [B, S, E] pre-ReLU router logits (0 if S < 2). The target is not detached: both tokens
    of a pair get gradient, as in the reference. Every consecutive pair of a window counts: the
    reference skips pairs across a document boundary of its packed sequences, which a layer does
    not see here (a window of S tokens holding n documents has n - 1 such pairs among its S - 1).
    """
    if logits.dim() != 3:
        raise ValueError(f"activation locality needs logits [batch, seq, experts], got {list(logits.shape)}")
    if logits.shape[1] < 2:  # no (t-1, t) pair, e.g. one decoding step
        return logits.new_zeros((), dtype=torch.float32)
    prev, cur = steepness * logits[:, :-1].float(), steepness * logits[:, 1:].float()
    return F.binary_cross_entropy_with_logits(prev, torch.sigmoid(cur))


def chunk_sparsification_loss(probs: Tensor, chunk_len: int = 64) -> Tensor:
    """L_CS = 1 - mean over (chunk, expert) of prod_{t in chunk} (1 - p[t, e]).

    probs: [B, S, E] per-token router distribution (`Routing.probs` of the ReLU router). Chunks
    are consecutive within each sequence; a final partial chunk counts its own tokens (the
    reference requires S to be a multiple of chunk_len). Computed in log space as
    exp(sum log(1 - p + 1e-5)), out of place.
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    B, S, E = probs.shape
    num_chunks = -(-S // chunk_len)
    log_silent = torch.log1p(-probs.float() + 1e-5)
    log_silent = F.pad(log_silent, (0, 0, 0, num_chunks * chunk_len - S))  # padding: log 1 = 0
    silent = log_silent.view(B, num_chunks, chunk_len, E).sum(dim=2).exp()  # P(expert fires nowhere in the chunk)
    return 1.0 - silent.mean()


class AdaptiveCoefficient:
    """The chunk-loss weight schedule of BlockFFN (`AdaptiveLinearScheduler`).

    The losses are averaged over windows of `window` steps, counted from the first step. At the
    end of every window from step `warmup` on (the coefficient is `initial` until then), the ratio
    r = mean(L_CS over this window) / mean(L_CS over the window before) sets a target
    coefficient * (max(1.025, r) if r > 1 else r), capped at `max_factor * initial`, and the
    coefficient moves linearly to it over the next window, reaching it at that window's last step.
    Call `step(loss_value)` once per optimizer step: it returns the coefficient of that step.
    """

    def __init__(self, initial: float = 5e-2, warmup: int = 1000, window: int = 100, max_factor: float = 4.0):
        if initial <= 0 or warmup < 0 or window < 1:
            raise ValueError("AdaptiveCoefficient needs initial > 0, warmup >= 0 and window >= 1")
        self.initial, self.warmup, self.window, self.cap = initial, warmup, window, max_factor * initial
        self.value = initial
        self.steps = 0
        self._losses: list[float] = []
        self._previous_mean: float | None = None
        self._start = self._target = initial
        self._moved_at = 0  # the step the coefficient started moving from _start to _target

    def step(self, loss: float) -> float:
        self.steps += 1
        self._losses.append(float(loss))
        moved = min((self.steps - self._moved_at) / self.window, 1.0)
        self.value = self._start + (self._target - self._start) * moved
        if self.steps % self.window == 0:
            mean = sum(self._losses) / self.window
            if self._previous_mean and self.steps >= self.warmup:
                ratio = mean / self._previous_mean
                factor = max(1.025, ratio) if ratio > 1 else ratio
                self._start, self._target = self.value, min(self.value * factor, self.cap)
                self._moved_at = self.steps
            self._previous_mean, self._losses = mean, []
        return self.value

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.__dict__):
            raise ValueError(
                "the adaptive chunk-sparsity schedule's saved state does not match this moelab's schedule "
                f"(saved: {sorted(state)}); resume with the moelab that wrote it, or train from the start"
            )
        self.__dict__.update(state)
