"""The shipped multi-domain corpus, its BPE tokenizer, and token-window data loaders.

    from moelab.data import TokenWindows, eval_batches, list_domains, tokenize_split

    train = TokenWindows.from_corpus(None, "train", seq_len=256, batch_size=32, seed=0)
    inputs, targets = next(train)                    # int64 [32, 256] each
    for domain in list_domains():                    # per-domain validation perplexity
        for inputs, targets in eval_batches(tokenize_split(domain, "validation"), 256, 32):
            ...

See docs/data.md for what the corpus contains and how to rebuild it.
"""

from moelab.data.corpus import (
    CORPUS_DIR,
    SPLITS,
    CorpusIntegrityError,
    Document,
    list_domains,
    load_documents,
    read_manifest,
)
from moelab.data.loader import IGNORE_INDEX, TokenWindows, eval_batches, mixture_weights
from moelab.data.tokenizer import (
    EOT,
    EOT_ID,
    PAD,
    PAD_ID,
    TOKENIZER_DIR,
    cache_dir,
    load_tokenizer,
    tokenize_split,
    tokenize_texts,
)

__all__ = [
    "CORPUS_DIR",
    "EOT",
    "EOT_ID",
    "IGNORE_INDEX",
    "PAD",
    "PAD_ID",
    "SPLITS",
    "TOKENIZER_DIR",
    "CorpusIntegrityError",
    "Document",
    "TokenWindows",
    "cache_dir",
    "eval_batches",
    "list_domains",
    "load_documents",
    "load_tokenizer",
    "mixture_weights",
    "read_manifest",
    "tokenize_split",
    "tokenize_texts",
]
