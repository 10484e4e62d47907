"""Token-window batches for training (random, resumable) and evaluation (sequential, exhaustive).

Training: ``TokenWindows`` samples ``batch_size`` windows of ``seq_len + 1`` tokens per step.
Each row first picks a domain (mixture weights), then a uniformly random start in that
domain's token array; windows may span document boundaries (marked by ``<|endoftext|>``).
Step ``k`` draws from ``numpy.random.default_rng((seed, k))``, so the whole position in the data
stream is the step counter: ``state_dict()`` saves it and a loader restored with
``load_state_dict()`` yields exactly the batches an uninterrupted run would have seen.

Evaluation: ``eval_batches`` walks one array in consecutive non-overlapping windows, so every
token after the first is a target exactly once; the last window is padded, with padded
targets set to ``IGNORE_INDEX`` (what ``torch.nn.functional.cross_entropy`` ignores).

    val = tokenize_split("german", "validation")
    for inputs, targets in eval_batches(val, seq_len=256, batch_size=16):
        nll += F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    ppl = math.exp(nll / (len(val) - 1))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from moelab.data.corpus import CORPUS_DIR, list_domains
from moelab.data.tokenizer import PAD_ID, TOKENIZER_DIR, tokenize_split

IGNORE_INDEX = -100


def mixture_weights(sizes: Mapping[str, int], weights: str | Mapping[str, float]) -> np.ndarray:
    """Per-domain sampling probabilities, in the order of ``sizes``, summing to 1.

    ``"proportional"``: by token count (as if sampling the concatenated corpus);
    ``"uniform"``: every domain equally often; a mapping: those relative weights.
    """
    if weights == "proportional":
        raw = np.array([sizes[name] for name in sizes], dtype=np.float64)
    elif weights == "uniform":
        raw = np.ones(len(sizes))
    elif isinstance(weights, Mapping):
        if set(weights) != set(sizes):
            raise ValueError(
                f"mixture weights name {sorted(weights)}; give one weight for each of {list(sizes)}"
            )
        raw = np.array([weights[name] for name in sizes], dtype=np.float64)
        if not np.isfinite(raw).all() or (raw < 0).any() or not (raw > 0).any():  # NaN, inf: NaN probabilities
            raise ValueError(f"mixture weights must be finite, >= 0 and with a positive sum, got {dict(weights)}")
        with np.errstate(over="ignore"):  # numpy's overflow warning: handled here
            total = raw.sum()
        if not np.isfinite(total):  # finite weights whose sum overflows (1e308 twice): probabilities of 0
            raw /= raw.max()  # only then: other weights keep their bytes (a run's sampling depends on them)
    else:
        raise ValueError(
            f"weights must be 'proportional', 'uniform' or a {{domain: weight}} mapping, got {weights!r}"
        )
    return raw / raw.sum()


class TokenWindows:
    """Infinite iterator of ``(inputs, targets)`` int64 batches of shape [batch_size, seq_len].

    ``targets[:, t] == inputs[:, t + 1]`` within a window's ``seq_len + 1`` tokens.

    Args:
        tokens: one flat token array [n], or ``{domain: array}`` for a mixture.
        seq_len: tokens per row.
        batch_size: rows per batch.
        seed: the sampling seed; the same seed gives the same batches.
        weights: mixture weights, see ``mixture_weights`` (default ``"proportional"``).
    """

    def __init__(
        self,
        tokens: np.ndarray | Mapping[str, np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        weights: str | Mapping[str, float] = "proportional",
    ) -> None:
        self.arrays = dict(tokens) if isinstance(tokens, Mapping) else {"tokens": np.asarray(tokens)}
        if not self.arrays:
            raise ValueError("TokenWindows needs at least one token array")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        for name, array in self.arrays.items():
            if array.ndim != 1 or len(array) < seq_len + 1:
                raise ValueError(
                    f"{name!r}: need a 1-D array of at least seq_len + 1 = {seq_len + 1} tokens, "
                    f"got shape {array.shape}"
                )
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.sizes = {name: len(array) for name, array in self.arrays.items()}
        self.probs = mixture_weights(self.sizes, weights)
        self.step = 0

    @classmethod
    def from_corpus(
        cls,
        domains: str | Sequence[str] | None,
        split: str,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        weights: str | Mapping[str, float] = "proportional",
        corpus_dir: Path = CORPUS_DIR,
        tokenizer_dir: Path = TOKENIZER_DIR,
        quiet: bool = False,
    ) -> TokenWindows:
        """Windows over the shipped corpus: one domain, several, or all of them (None); quiet: no
        tokenizing bars where a split is not cached yet."""
        if domains is None:
            names = list_domains(corpus_dir)
        else:
            names = [domains] if isinstance(domains, str) else list(domains)
        tokens = {name: tokenize_split(name, split, corpus_dir, tokenizer_dir, quiet=quiet) for name in names}
        return cls(tokens, seq_len, batch_size, seed, weights)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.step))
        names = list(self.arrays)
        rows = rng.choice(len(names), size=self.batch_size, p=self.probs)
        highs = np.array([self.sizes[names[i]] - self.seq_len for i in rows])
        starts = rng.integers(0, highs)
        windows = np.stack(
            [self.arrays[names[i]][s : s + self.seq_len + 1] for i, s in zip(rows, starts, strict=True)]
        ).astype(np.int64)
        self.step += 1
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        """The exact data position (the step) plus the settings it is only valid with."""
        return {
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "sizes": dict(self.sizes),
            "probs": self.probs.tolist(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at ``state["step"]``; the other settings must match this loader's."""
        mine = self.state_dict()
        diffs = [
            f"{k}: checkpoint {state.get(k)!r}, loader {v!r}"
            for k, v in mine.items()
            if k != "step" and state.get(k) != v
        ]
        if diffs:
            raise ValueError(
                "loader state does not match this loader (build it with the checkpoint's data, seed, "
                "seq_len, batch_size and weights): " + "; ".join(diffs)
            )
        self.step = int(state["step"])


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, pad_id: int = PAD_ID
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over ``tokens`` [n]: every ``tokens[1:]`` is a target once.

    Yields int64 ``(inputs, targets)`` of shape [b, seq_len] with b <= batch_size (the last batch
    may be smaller). Window ``w`` has inputs ``tokens[w*seq_len : (w+1)*seq_len]`` and targets
    shifted by one; past the end, inputs are ``pad_id`` and targets ``IGNORE_INDEX``.
    """
    if seq_len < 1 or batch_size < 1:  # 0 divided by zero; a negative seq_len scored nothing
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) < 2:
        raise ValueError(f"need a 1-D array of at least 2 tokens, got shape {tokens.shape}")
    n_targets = len(tokens) - 1
    n_windows = -(-n_targets // seq_len)
    for first in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - first)
        inputs = np.full((rows, seq_len), pad_id, dtype=np.int64)
        targets = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        for r in range(rows):
            start = (first + r) * seq_len
            length = min(seq_len, n_targets - start)
            inputs[r, :length] = tokens[start : start + length]
            targets[r, :length] = tokens[start + 1 : start + 1 + length]
        yield torch.from_numpy(inputs), torch.from_numpy(targets)
