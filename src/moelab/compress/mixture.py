"""Calibration data: named, weighted, hashed mixtures of token windows.

A mixture is one or more sources, each written `DATA[:DOMAIN[=WEIGHT],...][=WEIGHT]`:

    corpus                     the shipped corpus' validation split, every domain, equal weights
    corpus:code,german         two of its domains
    corpus:code=3,german=1     weighted (weights are normalised over the whole mixture)
    notes.txt=0.5              a text file (one domain named after it), or a .jsonl file / directory
                               of them ({"text": ..., "domain": ...} per line); `:` picks domains

Each domain is one calibration source. The token budget is split over the sources by weight,
and each source gives consecutive windows of `seq_len` tokens from its start. Every window
belongs to one of two halves (even and odd windows of its source), so that statistics can be
compared between halves (how stable the kept experts are). `Mixture.digest` hashes the sources,
weights and every token id used: statistics record it, and a method given statistics of another
mixture refuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moelab.trace.data import Encoder, load_streams

DEFAULT_SPEC = "corpus"
MIN_SOURCE_TOKENS = 16  # fewer is no calibration (an empty file still tokenises to its separators)


@dataclass(frozen=True)
class Source:
    """One calibration source: a domain of a data spec ("corpus" or a path), with its weight."""

    data: str
    domain: str
    weight: float

    @property
    def name(self) -> str:
        return self.domain


@dataclass(frozen=True)
class Window:
    """ids: [S] token ids; source: the source's number; half: 0 or 1; start: the index of its
    first token in the whole mixture (windows in order)."""

    ids: torch.Tensor
    source: int
    half: int
    start: int


@dataclass(frozen=True)
class Mixture:
    """Calibration windows cut from `sources` (see the module docstring). spec: as given."""

    spec: str
    sources: tuple[Source, ...]
    windows: tuple[Window, ...]
    seq_len: int

    @property
    def num_tokens(self) -> int:
        return sum(w.ids.numel() for w in self.windows)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def digest(self) -> str:
        """sha256 of the sources, their weights and every token id used."""
        h = hashlib.sha256(json.dumps([[s.data, s.domain, s.weight] for s in self.sources]).encode())
        for w in self.windows:
            h.update(f"{w.source}:{w.half}:".encode())
            h.update(w.ids.to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def batches(self, batch_size: int) -> list[list[Window]]:
        """Windows grouped into batches of at most `batch_size`, each of one length."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        out: list[list[Window]] = []
        for window in self.windows:
            if out and len(out[-1]) < batch_size and out[-1][0].ids.numel() == window.ids.numel():
                out[-1].append(window)
            else:
                out.append([window])
        return out

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "sources": [{"data": s.data, "domain": s.domain, "weight": s.weight} for s in self.sources],
            "tokens": self.num_tokens,
            "windows": len(self.windows),
            "seq_len": self.seq_len,
            "digest": self.digest,
        }


def parse_sources(specs: str | Sequence[str]) -> list[tuple[str, dict[str, float] | None, float]]:
    """[(data, {domain: weight} or None for all domains, weight of the whole source)]."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("no calibration data given; pass --calib corpus, a text/JSONL file or a directory")
    parsed = []
    for spec in specs:
        spec = spec.strip()
        data, sep, rest = spec.partition(":")
        if not sep:
            data, weight = _split_weight(data, spec)
            parsed.append((data, None, weight))
            continue
        domains: dict[str, float] = {}
        for item in rest.split(","):
            name, weight = _split_weight(item.strip(), spec)
            if not name:
                raise ValueError(
                    f"calibration source {spec!r} has an empty domain name; write DATA:domain1,domain2"
                )
            if name in domains:
                raise ValueError(f"calibration source {spec!r} names domain {name!r} twice")
            domains[name] = weight
        parsed.append((data, domains, 1.0))
    return parsed


def build_mixture(
    specs: str | Sequence[str],
    *,
    tokens: int,
    seq_len: int,
    encoder: Encoder | None = None,
    split: str = "validation",
    quiet: bool = False,
) -> Mixture:
    """Tokenise the sources of `specs` (see the module docstring) with `encoder` (None: moelab's
    tokenizer) and cut `tokens` tokens of windows of `seq_len` from them, split by weight."""
    if tokens < 1 or seq_len < 1:
        raise ValueError(f"calibration tokens and seq_len must be >= 1, got {tokens} and {seq_len}")
    sources: list[Source] = []
    streams: list[np.ndarray] = []
    for data, domains, weight in parse_sources(specs):
        chosen = list(domains) if domains else None
        found = load_streams(data, split=split, domains=chosen, encoder=encoder, quiet=quiet)
        for domain, stream in found.items():
            share = weight / len(found) if domains is None else domains[domain]
            if any(s.data == str(data) and s.domain == domain for s in sources):
                raise ValueError(f"calibration domain {domain!r} of {data} is given twice")
            sources.append(Source(str(data), domain, share))
            streams.append(stream)
    total = sum(s.weight for s in sources)
    sources = [Source(s.data, s.domain, s.weight / total) for s in sources]
    windows: list[Window] = []
    start = 0
    for number, (source, stream) in enumerate(zip(sources, streams)):
        budget = min(len(stream), max(1, round(tokens * source.weight)))
        ids = torch.from_numpy(np.asarray(stream[:budget], dtype=np.int64))
        if len(stream) < MIN_SOURCE_TOKENS:
            raise ValueError(
                f"calibration source {source.data} (domain {source.domain!r}) has no tokens to speak of "
                f"({len(stream)}; at least {MIN_SOURCE_TOKENS} needed): give it text, or leave it out"
            )
        for k, offset in enumerate(range(0, ids.numel(), seq_len)):
            window = ids[offset : offset + seq_len]
            windows.append(Window(window, number, k % 2, start))
            start += window.numel()
    spec = ",".join(specs) if not isinstance(specs, str) else specs
    return Mixture(spec, tuple(sources), tuple(windows), seq_len)


def _split_weight(item: str, spec: str) -> tuple[str, float]:
    name, sep, weight = item.rpartition("=") if "=" in item else (item, "", "")
    if not sep:
        return item, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"calibration source {spec!r}: weight {weight!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"calibration source {spec!r}: weights must be positive numbers, got {weight}")
    return name, value
