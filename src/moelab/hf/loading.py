"""Loading a local checkpoint with transformers, exactly: never a hub download, never remote
code, and never a model whose weights transformers quietly initialised at random.

`load_causal_lm(path)` returns transformers' `AutoModelForCausalLM` in eval mode, or raises a
CheckpointError naming `path` and the keys at fault: missing (they would be random), wrongly
shaped, and (unless `allow_unexpected`) present in the checkpoint but unused. Whatever else
transformers raises while loading becomes a CheckpointError too.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moelab.files import read_json_object
from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.validation import non_finite_names


def load_causal_lm(
    path: str | os.PathLike,
    *,
    quiet: bool = False,
    allow_unexpected: bool = False,
    unused_prefixes: Sequence[str] = (),
    **kwargs: Any,
):
    """The model of the local checkpoint `path` (see the module docstring); kwargs go to
    `from_pretrained` (dtype, ...). allow_unexpected: tolerate checkpoint tensors the model does
    not use (a real checkpoint's multi-token-prediction layers, say); unused_prefixes: tolerate
    those whose names start so."""
    path = Path(path)
    check_transformers_knows(path)
    with _transformers_loading(path, quiet):  # a config transformers refuses too: a CheckpointError
        cls, extra = _language_model(path)
        model, info = cls.from_pretrained(
            path,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
            **(extra | kwargs),
        )
    mismatched = [
        f"{key} (checkpoint {list(found)}, model {list(wanted)})"
        for key, found, wanted in info["mismatched_keys"]
    ]
    faults = [("missing", list(info["missing_keys"])), ("wrong shape", mismatched)]
    if not allow_unexpected:
        faults.append(("unused", [k for k in info["unexpected_keys"] if not k.startswith(tuple(unused_prefixes))]))
    problems = [
        f"{label}: {', '.join(sorted(keys)[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        for label, keys in faults
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"transformers cannot load {path} exactly ({'; '.join(problems)}); missing or wrongly shaped "
            "weights would be random: fix config.json or the weights"
        )
    if bad := non_finite_names(model.named_parameters()):
        raise CheckpointError(f"{path}: NaN or Inf in {_first_three(bad)}: the weights are corrupt")
    if bad := _stored_as_integers(path, model):
        raise CheckpointError(
            f"{path}: {_first_three(bad)} stored as integers where the model has floating-point weights "
            "(transformers would cast them: other weights); the checkpoint is corrupt, or quantized without a "
            "quantization_config in config.json: re-download it"
        )
    return model.eval()


def _first_three(names: list[str]) -> str:
    """The first three `names`, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _stored_as_integers(path: Path, model) -> list[str]:
    """The model's floating-point parameters whose checkpoint tensor of the same name is stored as an
    integer or bool one, in a checkpoint config.json does not call quantized (names stored otherwise,
    such as transformers' fused experts, are the view's to check)."""
    if "quantization_config" in read_json_object(path / "config.json", "a model config", error=CheckpointError):
        return []
    with Checkpoint(path) as ckpt:
        return [
            name for name, p in model.named_parameters()
            if p.is_floating_point() and name in ckpt and not ckpt.entry(name)[0].startswith(("F", "BF"))
        ]  # fmt: skip


_WARNED_OWN_CODE: set[tuple[Path, str, tuple[str, ...]]] = set()  # (config.json, model_type, auto_map's code)


def check_transformers_knows(path: Path) -> None:
    """Raise a CheckpointError where config.json's model_type is one the installed transformers has no
    class for, naming the checkpoint's own code (auto_map), which moelab never runs (transformers' own
    error suggests upgrading only, and where it may ask whether to run that code, moelab never lets it).
    Where transformers knows the model_type and config.json names code of its own as well, warn that
    transformers' class runs, not that code (a checkpoint whose code differs would compute otherwise),
    once a process for each checkpoint (a command loads it several times: tokenizer, layers, ...)."""
    import transformers
    from transformers import CONFIG_MAPPING

    config_path = path / "config.json"
    if not config_path.is_file():  # transformers' loading says so
        return
    config = read_json_object(config_path, "a model config", error=CheckpointError)
    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    code = sorted({str(ref) for ref in auto_map.values()}) if isinstance(auto_map, dict) else []
    if not isinstance(model_type, str):
        return
    if model_type in CONFIG_MAPPING:
        warned = (config_path.resolve(), model_type, tuple(code))
        if code and warned not in _WARNED_OWN_CODE:  # once a process: a command checks at each load
            _WARNED_OWN_CODE.add(warned)
            warnings.warn(
                f"{config_path} names the checkpoint's own code ({', '.join(code)}), which moelab never runs: "
                f"transformers' own {model_type!r} model runs instead; where that code differs from it, so do "
                "the outputs",
                stacklevel=2,
            )
        return
    own_code = (
        f"; its auto_map names the checkpoint's own code ({', '.join(code)}), which moelab never runs "
        "(no trust_remote_code)" if code else ""
    )
    raise CheckpointError(
        f"{config_path}: model_type {model_type!r} is not a model transformers {transformers.__version__} knows"
        f"{own_code}; install a transformers release that has {model_type!r}, or correct model_type if it is a typo"
    )


def _language_model(path: Path) -> tuple[Any, dict[str, Any]]:
    """(the class, from_pretrained's extra arguments) that load checkpoint `path`'s language model
    (`moelab.hf.layerwise.language_model_class`): AutoModelForCausalLM where transformers maps the
    checkpoint to a causal LM; for a multimodal release it maps to none, the text model's causal LM
    with its config and the stored names mapped to its own (Kimi-K2.5), or the vision-language model
    (Qwen3-VL-MoE; MiniMax-M3-VL, whose stored names only its conversion mapping reads:
    `Family.loads_multimodal`)."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
    )

    from moelab.hf.adapters import resolve
    from moelab.hf.layerwise import language_model_class, submodel_config

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        cls, settings = language_model_class(config)
    except (CheckpointError, ValueError, OSError):  # transformers' own loading says what is wrong
        return AutoModelForCausalLM, {}
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM, {}
    if settings is config:
        return cls, {}
    if settings is submodel_config(config):  # Qwen3-Omni-MoE's thinker: its conversion mapping reads the names
        return cls, {"config": settings}
    _, ckpt, family = resolve(path)
    ckpt.close()
    if family.loads_multimodal and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)], {}
    return cls, {"config": settings, "key_mapping": {"^" + re.escape(disk): mem for mem, disk in family.stored_renames}}


@contextmanager
def _transformers_loading(path: Path, quiet: bool) -> Iterator[None]:
    """transformers' own load report muted (the keys at fault become the error instead), its
    progress bar off if quiet, and whatever it raises a CheckpointError naming `path`."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if quiet:
        logging.disable_progress_bar()
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"transformers cannot load {path}: {type(err).__name__}: {err}") from err
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
