"""The shipped multi-domain text corpus: one gzipped JSON-lines file per (domain, split).

Layout of ``assets/corpus/`` (written by ``scripts/build_corpus.py``):

    manifest.json               domains, per-split counts, sources, package versions, sha256 per file
    {domain}.{split}.jsonl.gz   one JSON object per document: {"text": str, "domain": str, "source": str}
    LICENSES.md                 the licence of every source

Every file is checked against the sha256 in the manifest when it is read, so a damaged or
hand-edited file fails loudly instead of silently changing the data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moelab.files import read_json_object

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
SPLITS = ("train", "validation", "test")
REBUILD_HINT = "rebuild it with `python scripts/build_corpus.py`"


class CorpusIntegrityError(RuntimeError):
    """A corpus file is missing or does not match the sha256 recorded in the manifest."""


@dataclass(frozen=True)
class Document:
    """One document: a Bible chapter, a fortune, or a Python source file (or a chunk of one)."""

    text: str
    domain: str
    source: str  # where it came from, e.g. "fortunes-de:witze" or "python-stdlib:json/decoder.py"


def read_manifest(corpus_dir: Path = CORPUS_DIR) -> dict:
    """The parsed ``manifest.json`` of ``corpus_dir``."""
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise CorpusIntegrityError(f"corpus manifest {path} not found; {REBUILD_HINT}")
    return read_json_object(path, "the corpus manifest")


def list_domains(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """Names of the corpus domains, in manifest order (e.g. ``["code", "bible", "english", ...]``)."""
    return list(read_manifest(corpus_dir)["domains"])


def check_choice(domain: str | None, split: str, domains: list[str]) -> None:
    """Raise ``ValueError`` naming the valid choices if ``domain`` or ``split`` is unknown."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if domain is not None and domain not in domains:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(domains)} (or None for all)")


def split_entry(domain: str, split: str, corpus_dir: Path = CORPUS_DIR) -> dict:
    """The manifest record of one (domain, split): file name, sha256, docs/chars/bytes/tokens counts."""
    manifest = read_manifest(corpus_dir)
    check_choice(domain, split, list(manifest["domains"]))
    return manifest["domains"][domain]["splits"][split]


def verified_bytes(path: Path, sha256: str) -> bytes:
    """Contents of ``path``, after checking them against the manifest's ``sha256``."""
    if not path.is_file():
        raise CorpusIntegrityError(f"corpus file {path} is missing; {REBUILD_HINT}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CorpusIntegrityError(
            f"corpus file {path} does not match the sha256 in manifest.json (corrupt or edited); {REBUILD_HINT}"
        )
    return data


def load_documents(domain: str | None, split: str, corpus_dir: Path = CORPUS_DIR) -> list[Document]:
    """Documents of one domain's split, or of every domain (in manifest order) when ``domain`` is None."""
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    check_choice(domain, split, list(manifest["domains"]))
    docs: list[Document] = []
    for name in [domain] if domain is not None else manifest["domains"]:
        entry = manifest["domains"][name]["splits"][split]
        data = verified_bytes(corpus_dir / entry["file"], entry["sha256"])
        # records end at "\n" only: build_corpus.py writes U+2028, U+2029 and U+0085 raw (ensure_ascii=False),
        # and splitlines() split a record at them
        for line in filter(None, gzip.decompress(data).decode("utf-8").split("\n")):
            record = json.loads(line)
            docs.append(Document(record["text"], record["domain"], record["source"]))
    return docs
