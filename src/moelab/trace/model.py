"""Load the model to trace: a moelab checkpoint or a local transformers checkpoint directory.

Never a hub download, never remote code: transformers models load with
`local_files_only=True`, safetensors only, and their own (in-library) modeling code. Their MoE
layers are checked through moelab's checkpoint view first, and any key transformers finds
missing or of the wrong shape is an error, not a randomly initialised weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from moelab.data.tokenizer import load_tokenizer
from moelab.files import read_json_object
from moelab.hf import ModelView, open_checkpoint
from moelab.hf.loading import check_transformers_knows, load_causal_lm
from moelab.hf.modules import is_transformers_model
from moelab.models.reference import model_dir
from moelab.trace.data import Encoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    """A model ready to trace. view: the checkpoint view (transformers models); encoder: its
    tokenizer (None: moelab's shipped tokenizer); max_seq_len: the longest window it takes."""

    model: nn.Module
    name: str
    view: ModelView | None
    encoder: Encoder | None
    vocab_size: int
    max_seq_len: int


def load_model(
    path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, quiet: bool = False
) -> LoadedModel:
    """Load `path` (default: the shipped reference model) for tracing, in eval mode (quiet: no
    transformers progress bar)."""
    path = model_dir(path)  # a directory, or a shipped model's name
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"no model at {path} (no config.json); pass a moelab checkpoint (save_pretrained) or a "
            "local transformers checkpoint directory"
        )
    config = read_json_object(config_path, "a model config")
    if "model_type" not in config:
        from moelab.models import load_pretrained

        model = load_pretrained(path).to(dtype).eval()
        encoder = checkpoint_encoder(path, native=True)
        return LoadedModel(model, str(path), None, encoder, model.config.vocab_size, model.config.max_seq_len)
    return _load_transformers(path, dtype, quiet)


def wrap_model(model: nn.Module, view: ModelView | None = None, name: str | None = None) -> LoadedModel:
    """A model already in memory: a moelab `MoETransformer` or a transformers model (whose view
    defaults to its `name_or_path` checkpoint)."""
    if not is_transformers_model(model):
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "max_seq_len"):
            raise ValueError(
                f"cannot trace {type(model).__name__}: pass a moelab MoETransformer or a transformers model"
            )
        return LoadedModel(model, name or type(model).__name__, None, None, config.vocab_size, config.max_seq_len)
    view = view or open_checkpoint(model.name_or_path)
    vocab, max_len = model.config.get_text_config().vocab_size, hf_max_len(model.config)
    return LoadedModel(model, name or str(view.path), view, None, vocab, max_len)


def _load_transformers(path: Path, dtype: torch.dtype, quiet: bool) -> LoadedModel:
    view = open_checkpoint(path)  # refuses quantized and non-MoE checkpoints with a clear error
    view.check()  # every MoE layer's tensors against config.json, from the shard headers
    model = load_causal_lm(path, dtype=dtype, quiet=quiet, allow_unexpected=True)
    encoder = checkpoint_encoder(path)
    vocab = model.config.get_text_config().vocab_size  # a vision-language model's: its language model's
    return LoadedModel(model, str(path), view, encoder, vocab, hf_max_len(model.config))


def checkpoint_encoder(path: str | os.PathLike, *, native: bool = False) -> Encoder | None:
    """The tokenizer saved in a local checkpoint directory as an `Encoder`, or None if it has no
    tokenizer files (never a download, never remote code). native (a checkpoint in moelab's
    format): None also where its tokenizer is moelab's shipped one, whose own encoding (documents
    between end-of-text tokens) then applies; an imported model's tokenizer is its own."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    if native and _is_shipped_tokenizer(path / "tokenizer.json"):
        return None
    if not native:  # before transformers reads config.json for the tokenizer (and warns of an unknown model_type)
        check_transformers_knows(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError) as err:  # a truncated tokenizer.json, a lone tokenizer_config.json, ...
        found = ", ".join(name for name in TOKENIZER_FILES if (path / name).is_file())
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        fallback = ", or remove them to use moelab's" if native else ""
        raise ValueError(
            f"{path}: its tokenizer files ({found}) could not be read ({reason}); save the model's tokenizer "
            f"there again (tokenizer.save_pretrained){fallback}"
        ) from None
    return _hf_encoder(tokenizer)


def _is_shipped_tokenizer(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return Tokenizer.from_file(str(path)).to_str() == load_tokenizer().to_str()
    except Exception:  # not a tokenizer the tokenizers library reads: not moelab's
        return False


def _hf_encoder(tokenizer) -> Encoder:
    """Texts -> ids, each document followed by the tokenizer's eos token (if it has one); special
    tokens' text inside a document is encoded as text, as `moelab.data.tokenize_texts` does."""
    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(texts: list[str]) -> np.ndarray:
        ids: list[int] = []
        for text in texts:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + end
        return np.asarray(ids, dtype=np.int64)

    return encode


def hf_max_len(config) -> int:
    """The longest sequence a transformers config allows (2,048 where it names none); a
    vision-language model's config: its language model's."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 2048
