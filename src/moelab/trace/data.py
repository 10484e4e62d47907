"""Calibration data for traces: labelled token streams and the batches cut from them.

A data spec is "corpus" (the shipped corpus, one domain per corpus domain) or a path: a
.txt file (one domain, named after the file), a .jsonl file (one {"text": ..., "domain": ...}
object per line; the domain defaults to the file name) or a directory of such files; blank texts
are left out. Texts are tokenised with the model's tokenizer (`Encoder`), or with moelab's when the
model has none.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.data import list_domains, load_documents, load_tokenizer, tokenize_split, tokenize_texts
from moelab.files import parse_json, read_text
from moelab.validation import check_not_str, did_you_mean

Encoder = Callable[[list[str]], np.ndarray]  # texts -> one flat id array, documents separated
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Batch:
    """token_ids: [B, S] int64 windows of one domain (number `domain`)."""

    token_ids: torch.Tensor
    domain: int


def load_streams(
    data: str | os.PathLike = "corpus",
    *,
    split: str = "validation",
    domains: Sequence[str] | None = None,
    encoder: Encoder | None = None,
    quiet: bool = False,
) -> dict[str, np.ndarray]:
    """{domain: flat token ids [n]} for a data spec (see the module docstring); `split` applies to
    the corpus; `domains` keeps only those (in that order); quiet: no tokenizing progress bar."""
    check_not_str("domains", domains, "domain names")
    if str(data) == "corpus":
        names = list_domains()
        texts = None
    else:
        texts = _read_texts(Path(data))
        names = list(texts)
    if domains:
        for name in domains:
            if name not in names:
                raise ValueError(f"unknown domain {name!r}{did_you_mean(name, names)} in {data}; choose from {names}")
        names = list(domains)
    if texts is None and encoder is None:
        return {name: tokenize_split(name, split, quiet=quiet) for name in names}
    if texts is None:
        texts = {name: [doc.text for doc in load_documents(name, split)] for name in names}
    elif blank := [name for name in names if not texts[name]]:
        raise ValueError(
            f"{data} has no text in domain {', '.join(map(repr, blank))} (empty or blank documents only): "
            "give it text, or leave it out"
        )
    encode = encoder or (lambda t: tokenize_texts(t, load_tokenizer(), quiet=quiet))
    return {name: encode(texts[name]) for name in names}


def _read_texts(path: Path) -> dict[str, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no .txt or .jsonl files; pass 'corpus' or a text file")
    elif path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:  # NOTES.TXT too
        files = [path]
    else:
        raise ValueError(
            f"data {str(path)!r} is not 'corpus', a .txt/.jsonl file or a directory of them"
            + ("" if path.exists() else " (it does not exist)")
        )
    texts: dict[str, list[str]] = {}

    def add(domain: str, text: str) -> None:  # a blank document is no document: it added EOT -> EOT targets
        texts.setdefault(domain, []).extend([text] if text.strip() else [])

    for file in files:
        if file.suffix.lower() == ".txt":
            add(file.stem, read_text(file))
            continue
        for n, line in enumerate(read_text(file).split("\n"), 1):  # splitlines would split at U+2028 too
            if line.strip():
                add(*_record(parse_json(line, file, first_line=n), f"{file}:{n}", file.stem))
    if not texts:
        raise ValueError(f"{path} has no text (no JSON line with a text); give it some")
    return texts


def _record(record: object, where: str, default_domain: str) -> tuple[str, str]:
    """(domain, text) of one JSON line, {"text": str, "domain": str (optional)}."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        example = '{"text": "...", "domain": "news"}'
        raise ValueError(f"{where}: a JSON line needs a 'text' field holding a string, e.g. {example}")
    domain = record.get("domain", default_domain)
    if not isinstance(domain, str) or not domain:
        raise ValueError(
            f"{where}: 'domain' must be a non-empty string, got {domain!r}; leave it out to use the file name"
        )
    try:  # JSON's "\ud83d" escape alone is a lone surrogate: no text, and the tokenizer raised a TypeError
        record["text"].encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: 'text' holds a lone surrogate \\u{ord(record['text'][err.start]):04x} at character "
            f"{err.start} (half of a \\uXXXX\\uXXXX pair); complete the pair or remove the escape"
        ) from None
    return domain, record["text"]


def batches(
    streams: dict[str, np.ndarray], *, max_tokens: int, seq_len: int, batch_size: int
) -> Iterator[Batch]:
    """Consecutive windows of `seq_len` tokens from the start of each stream, `max_tokens`
    split evenly over the domains (a domain's last window may be shorter), `batch_size`
    windows of one length per batch. Domain numbers follow the order of `streams`."""
    for name, value in (("max_tokens", max_tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not streams or all(len(s) == 0 for s in streams.values()):
        raise ValueError("the data has no tokens; pass a non-empty corpus, text file or directory")
    if max_tokens < len(streams):
        raise ValueError(f"max_tokens ({max_tokens}) must be at least the number of domains ({len(streams)})")
    for d, stream in enumerate(streams.values()):
        budget = max_tokens // len(streams) + (d < max_tokens % len(streams))
        tokens = torch.from_numpy(np.asarray(stream[:budget], dtype=np.int64))
        full = tokens.shape[0] // seq_len
        windows = tokens[: full * seq_len].view(full, seq_len)
        for start in range(0, full, batch_size):
            yield Batch(windows[start : start + batch_size], d)
        if tokens.shape[0] > full * seq_len:
            yield Batch(tokens[full * seq_len :][None], d)


def count_tokens(streams: dict[str, np.ndarray], max_tokens: int) -> int:
    """How many tokens `batches` yields."""
    n = len(streams)
    return sum(min(len(s), max_tokens // n + (d < max_tokens % n)) for d, s in enumerate(streams.values()))
