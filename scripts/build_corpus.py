#!/usr/bin/env python3
"""Rebuild moelab's shipped multi-domain corpus and its byte-level BPE tokenizer, offline.

Sources, all installable on Debian without network access beyond the package mirror:

    code     Python standard-library source (.py) of the running interpreter   PSF-2.0
    bible    King James Bible, one document per chapter (bible-kjv)            public domain
    english  English fortune cookies (fortunes, fortunes-min)                  BSD-style
    german   fortunes-de          spanish  fortunes-es      italian  fortunes-it
    polish   fortunes-pl          russian  fortunes-ru                         GPL-2+ / PD

Steps: read every source, clean it (NFC, no control characters or overstrike, no trailing
spaces), drop duplicate documents, keep a hash-ordered subset of at most --max-chars
characters per domain, split each document by a stable hash of its text into train (90%),
validation (5%) and test (5%), write ``{domain}.{split}.jsonl.gz``, train the tokenizer on the
train split, count tokens, and write ``manifest.json`` last. Every file is written atomically.
The same inputs give byte-identical outputs. ``LICENSES.md`` is maintained by hand.

    apt-get update && apt-get install -y bible-kjv fortunes fortunes-min fortunes-de \\
        fortunes-es fortunes-it fortunes-pl fortunes-ru     # or pass --install
    python scripts/build_corpus.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import sysconfig
import unicodedata
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # build into this checkout's assets, installed or not

from moelab.data.corpus import SPLITS
from moelab.data.tokenizer import EOT, EOT_ID, PAD, PAD_ID, tokenize_texts
from moelab.io import atomic_write_bytes, atomic_write_text

FORTUNE_DOMAINS = {  # domain -> Debian packages of fortune files
    "english": ("fortunes", "fortunes-min"),
    "german": ("fortunes-de",),
    "spanish": ("fortunes-es",),
    "italian": ("fortunes-it",),
    "polish": ("fortunes-pl",),
    "russian": ("fortunes-ru",),
}
PACKAGES = ("bible-kjv", "bible-kjv-text") + tuple(p for ps in FORTUNE_DOMAINS.values() for p in ps)
LICENSES = {  # from /usr/share/doc/<package>/copyright; details in assets/corpus/LICENSES.md
    "python-stdlib": "PSF-2.0",
    "bible-kjv-text": "public domain (KJV text; see LICENSES.md for the UK Crown patent)",
    "fortunes": "BSD-3-Clause (fortune-mod, Regents of the University of California)",
    "fortunes-min": "BSD-3-Clause (fortune-mod, Regents of the University of California)",
    "fortunes-de": "GPL-2+",
    "fortunes-es": "GPL-2+ (texts presumed public domain)",
    "fortunes-it": "public domain (declared by the fortune-it authors)",
    "fortunes-pl": "GPL-2+",
    "fortunes-ru": "GPL-2",
}
DESCRIPTIONS = {
    "code": "Python standard-library source code: files, or chunks of about 4000 characters cut at statements",
    "bible": "King James Version of the Bible (1611, English), one document per chapter",
    "english": "English fortune cookies: quotes, jokes, poems, definitions",
    "german": "German fortune cookies (Sprüche, Zitate, Witze)",
    "spanish": "Spanish fortune cookies (refranes, frases, proverbios)",
    "italian": "Italian fortune cookies (citazioni, leggi, battute)",
    "polish": "Polish fortune cookies (dowcipy, cytaty)",
    "russian": "Russian fortune cookies (анекдоты, цитаты)",
}
SKIP_FORTUNE_FILES = {"ascii-art", "asciiart", "banner", "cows"}  # pictures, not prose
SKIP_FORTUNE_DIRS = {"off"}  # fortunes-es ships its offensive files under es/off/
SKIP_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data"}
CODE_CHUNK_CHARS = 4_000
SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}
FORMAT = 1


def clean(text: str) -> str:
    """NFC text without CRs, overstrike (x<BS>x), ANSI escapes, control characters or trailing spaces."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r".\x08", "", text)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def dpkg(*args: str) -> str:
    """stdout of `dpkg-query *args`; exits with the apt-get command when the package is missing."""
    package = args[-1]
    result = subprocess.run(["dpkg-query", *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"Debian package {package} is not installed; run `apt-get update && apt-get install -y "
            f"{' '.join(PACKAGES)}` (or pass --install)"
        )
    return result.stdout


def package_version(package: str) -> str:
    return dpkg("--showformat=${Version}", "--show", package).strip()


def read_fortunes(package: str) -> list[tuple[str, str]]:
    """(text, source) of every fortune (``%``-separated) in ``package``'s fortune files."""
    base = Path("/usr/share/games/fortunes")
    docs = []
    for line in sorted(dpkg("--listfiles", package).splitlines()):
        path = Path(line)
        if base not in path.parents or path.is_symlink() or not path.is_file():
            continue
        rel = path.relative_to(base)
        if (
            path.suffix in (".dat", ".u8")
            or rel.name in SKIP_FORTUNE_FILES
            or SKIP_FORTUNE_DIRS & set(rel.parts)
        ):
            continue
        for text in re.split(r"^%$", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
            docs.append((clean(text), f"{package}:{rel}"))
    return docs


def read_bible() -> list[tuple[str, str]]:
    """(text, source) of every KJV chapter: ``"Genesis 1\\n\\n1 In the beginning ..."``."""
    out = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], capture_output=True, text=True, check=True)
    chapters: list[tuple[str, list[str]]] = []
    for line in out.stdout.splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            chapters[-1][1].append(line.strip())
        else:
            chapters.append((line.strip(), []))
    if len(chapters) != 1189:
        raise SystemExit(f"expected 1189 KJV chapters from `bible`, got {len(chapters)}")
    return [(clean(f"{title}\n\n" + "\n".join(verses)), f"bible-kjv:{title}") for title, verses in chapters]


def chunk_python(text: str, max_chars: int = CODE_CHUNK_CHARS) -> list[str]:
    """``text`` cut before module- or class-level statements that follow a blank line, packed to ``max_chars``."""
    chunks, current = [], ""
    for block in re.split(r"\n\n(?=(?:    )?\S)", text):
        if current and len(current) + 2 + len(block) > max_chars:
            chunks.append(current)
            current = block
        else:
            current = f"{current}\n\n{block}" if current else block
    return chunks + [current]


def read_stdlib(stdlib: Path) -> list[tuple[str, str]]:
    """(text, source) of the Python standard library's ``.py`` files, tests and data tables excluded."""
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_STDLIB_DIRS & set(rel.parts[:-1]):
            continue
        try:
            text = clean(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        docs.extend((chunk, f"python-stdlib:{rel.as_posix()}") for chunk in chunk_python(text))
    return docs


def split_of(digest: bytes) -> str:
    """train/validation/test by the first 8 bytes of the document hash (90/5/5)."""
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def select(domain: str, docs: list[tuple[str, str]], max_chars: int) -> dict[str, list[dict]]:
    """Deduplicate, cap at ``max_chars`` (a subset in hash order) and split; source order is kept.

    Documents containing a special token's text are dropped: the tokenizer would encode it as
    that token, breaking the one-separator-per-document layout of token streams.
    """
    seen: set[str] = set()
    keyed = []
    for index, (text, source) in enumerate(docs):
        if text and text not in seen and EOT not in text and PAD not in text:
            seen.add(text)
            keyed.append((hashlib.sha256(f"{domain}\0{text}".encode()).digest(), index, text, source))
    kept, total = [], 0
    for item in sorted(keyed, key=lambda k: k[0][8:16]):
        if total + len(item[2]) > max_chars:
            break
        kept.append(item)
        total += len(item[2])
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for digest, _, text, source in sorted(kept, key=lambda k: k[1]):
        splits[split_of(digest)].append({"text": text, "domain": domain, "source": source})
    return splits


def jsonl_gz(records: list[dict]) -> bytes:
    """Deterministic gzip (no file name, mtime 0) of one JSON object per line."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return buffer.getvalue()


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenisation, no normaliser: lossless) with EOT=0 and PAD=1."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tokenizer.token_to_id(EOT) == EOT_ID and tokenizer.token_to_id(PAD) == PAD_ID
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """``tokenizer.json`` plus the Hugging Face configs that make it a ``PreTrainedTokenizerFast``."""
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", type=Path, default=ROOT / "src" / "moelab" / "assets")
    parser.add_argument("--max-chars", type=int, default=2_000_000, help="characters kept per domain")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--install", action="store_true", help="apt-get install the Debian sources first")
    args = parser.parse_args()
    if args.install:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True)
    versions = {package: package_version(package) for package in PACKAGES}

    sources: dict[str, list[tuple[str, str]]] = {"code": read_stdlib(args.stdlib), "bible": read_bible()}
    for domain, packages in tqdm(FORTUNE_DOMAINS.items(), desc="reading fortunes"):
        sources[domain] = [doc for package in packages for doc in read_fortunes(package)]
    provenance = {
        "code": [{"name": "python-stdlib", "version": sys.version.split()[0], "path": str(args.stdlib)}],
        "bible": [{"name": "bible-kjv-text", "version": versions["bible-kjv-text"]}],
    } | {d: [{"name": p, "version": versions[p]} for p in ps] for d, ps in FORTUNE_DOMAINS.items()}

    corpus_dir = args.assets / "corpus"
    atomic_write_bytes(corpus_dir / "GPL-2.txt", Path("/usr/share/common-licenses/GPL-2").read_bytes())
    atomic_write_bytes(corpus_dir / "PSF-LICENSE.txt", (args.stdlib / "LICENSE.txt").read_bytes())
    manifest: dict = {
        "format": FORMAT,
        "split_percent": SPLIT_PERCENT,
        "max_chars_per_domain": args.max_chars,
        "domains": {},
    }
    splits_by_domain = {}
    for domain, docs in tqdm(sources.items(), desc="writing corpus"):
        splits_by_domain[domain] = select(domain, docs, args.max_chars)
        entry = {
            "description": DESCRIPTIONS[domain],
            "sources": [s | {"license": LICENSES[s["name"]]} for s in provenance[domain]],
            "splits": {},
        }
        for split, records in splits_by_domain[domain].items():
            name = f"{domain}.{split}.jsonl.gz"
            data = jsonl_gz(records)
            atomic_write_bytes(corpus_dir / name, data)
            entry["splits"][split] = {
                "file": name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "file_bytes": len(data),
                "docs": len(records),
                "chars": sum(len(r["text"]) for r in records),
                "bytes": sum(len(r["text"].encode("utf-8")) for r in records),
            }
        manifest["domains"][domain] = entry
    written = {
        corpus_dir / entry["file"] for e in manifest["domains"].values() for entry in e["splits"].values()
    }
    for stale in set(corpus_dir.glob("*.jsonl.gz")) - written:
        stale.unlink()

    train_texts = [r["text"] for splits in splits_by_domain.values() for r in splits["train"]]
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    save_tokenizer(tokenizer, args.assets / "tokenizer")
    for domain, splits in splits_by_domain.items():
        for split, records in splits.items():
            tokens = tokenize_texts(
                [r["text"] for r in records], tokenizer, desc=f"counting {domain}.{split}"
            )
            manifest["domains"][domain]["splits"][split]["tokens"] = len(tokens)
    manifest["tokenizer"] = {
        "vocab_size": tokenizer.get_vocab_size(),
        "sha256": hashlib.sha256((args.assets / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest(),
    }
    atomic_write_text(corpus_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    for domain, entry in manifest["domains"].items():
        counts = ", ".join(f"{s} {e['docs']} docs {e['tokens']} tok" for s, e in entry["splits"].items())
        print(f"{domain:8s} {counts}")


if __name__ == "__main__":
    main()
