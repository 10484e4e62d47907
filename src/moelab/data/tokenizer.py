"""The shipped byte-level BPE tokenizer, and corpus splits tokenised into flat uint16 arrays (cached).

``load_tokenizer()`` returns a ``tokenizers.Tokenizer``: it is fast to import, has no
transformers dependency, and ``encode``/``decode`` are lossless for any UTF-8 text (byte-level
BPE, no normaliser). The same directory also loads as a Hugging Face tokenizer, with eos/bos/pad
set, for code that wants one:

    transformers.PreTrainedTokenizerFast.from_pretrained(moelab.data.TOKENIZER_DIR)

Token stream layout of a split (``tokenize_split``): every document is preceded and followed by
``<|endoftext|>``, i.e. ``EOT d1 EOT d2 EOT ... dn EOT``, so the first token of every document
is predicted from the separator alone.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moelab.data.corpus import CORPUS_DIR, REBUILD_HINT, load_documents, split_entry, verified_bytes
from moelab.io import atomic_write_bytes

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
EOT = "<|endoftext|>"  # document separator; also the bos/eos/unk token of the HF config
PAD = "<|pad|>"  # padding only; never appears in a token stream
EOT_ID = 0
PAD_ID = 1
CACHE_FORMAT = 1  # bump when the token stream layout changes, to invalidate old cache files


def tokenizer_file(tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    """``tokenizer_dir/tokenizer.json``, which must exist."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found; {REBUILD_HINT}")
    return path


def load_tokenizer(tokenizer_dir: Path = TOKENIZER_DIR) -> Tokenizer:
    """The byte-level BPE tokenizer in ``tokenizer_dir`` (``tokenizer.json``)."""
    path = tokenizer_file(tokenizer_dir)
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(EOT) != EOT_ID or tokenizer.token_to_id(PAD) != PAD_ID:
        raise ValueError(f"{path}: expected {EOT} to have id {EOT_ID} and {PAD} id {PAD_ID}")
    return tokenizer


def cache_dir() -> Path:
    """Where tokenised splits are cached: ``$MOELAB_CACHE``, default ``~/.cache/moelab``."""
    return Path(os.environ.get("MOELAB_CACHE", "~/.cache/moelab")).expanduser()


def tokenize_texts(
    texts: Sequence[str], tokenizer: Tokenizer, desc: str = "tokenizing", quiet: bool = False
) -> np.ndarray:
    """``EOT t1 EOT t2 ... EOT`` as one flat uint16 array of shape [n_tokens] (a progress bar for
    many texts, unless `quiet`). Texts are text: a literal "<|endoftext|>" or "<|pad|>" in one is
    encoded as its characters, so only moelab's separators are EOT and PAD never appears."""
    if tokenizer.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab size {tokenizer.get_vocab_size()} does not fit uint16 token ids")
    pieces = [np.array([EOT_ID], dtype=np.uint16)]
    batch = 512
    starts = range(0, len(texts), batch)
    literal, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    try:
        for i in tqdm(starts, desc=desc, unit="batch", leave=False, disable=quiet or len(texts) <= batch):
            for encoding in tokenizer.encode_batch(list(texts[i : i + batch]), add_special_tokens=False):
                pieces.append(np.array(encoding.ids, dtype=np.uint16))
                pieces.append(np.array([EOT_ID], dtype=np.uint16))
    finally:
        tokenizer.encode_special_tokens = literal
    return np.concatenate(pieces)


def tokenize_split(
    domain: str,
    split: str,
    corpus_dir: Path = CORPUS_DIR,
    tokenizer_dir: Path = TOKENIZER_DIR,
    quiet: bool = False,
) -> np.ndarray:
    """All documents of ``domain``'s ``split`` as one flat uint16 token array of shape [n_tokens].

    Cached in ``cache_dir()/tokens/`` under a key that hashes the tokenizer file and the corpus
    file's sha256, so a rebuilt corpus or tokenizer never reuses stale tokens; the corpus file is
    checked against its manifest on every call (an edited or missing file raises
    CorpusIntegrityError, as `load_documents` does).
    """
    entry = split_entry(domain, split, corpus_dir)
    verified_bytes(corpus_dir / entry["file"], entry["sha256"])  # a cached stream too: the file must match
    tokenizer_sha = hashlib.sha256(tokenizer_file(tokenizer_dir).read_bytes()).hexdigest()
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{entry['sha256']}\0{tokenizer_sha}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokens" / f"{domain}.{split}.{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (ValueError, OSError, EOFError):  # a damaged cache file (moelab's own): made again below
            pass
    tokens = tokenize_texts(
        [doc.text for doc in load_documents(domain, split, corpus_dir)],
        load_tokenizer(tokenizer_dir),
        desc=f"tokenizing {domain}.{split}",
        quiet=quiet,
    )
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:  # "<cache>/tokens: Not a directory" did not say which setting to change
        raise ValueError(
            f"cannot write the token cache {path} ({err.strerror}); set MOELAB_CACHE to a writable directory "
            "(default ~/.cache/moelab)"
        ) from None
    return tokens
