"""Multimodal checkpoints (Qwen3.5, Qwen3-VL-MoE, GLM-4.5V, Kimi-K2.5, ...): config.json keeps the
language model's settings in `text_config`, beside the vision tower's; Qwen3-Omni-MoE keeps them one
level further down, in its thinker's config (`SUBMODELS`: thinker_config.text_config, beside the
talker's and code2wav's configs).

moelab reads such a config through `language_config`: text_config's keys over the others (its
model_type the text model's, so the families of text models read it), and writes an edited one
back through `nested_config`, each key where the file had it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

Config = dict[str, Any]
TEXT = "text_config"

# releases whose language model transformers runs inside a sub-model of theirs, config.json keeping its
# settings in that sub-model's config (a multimodal config of its own, with a text_config): model_type ->
# (the sub-model config's key, the transformers class that runs the sub-model on text, whose conversion
# mapping names the tensors it reads). Qwen3-Omni-MoE: the thinker (audio and vision encoders and the
# MoE language model, stored under thinker.); its talker (another MoE) and code2wav are left as they are.
SUBMODELS = {"qwen3_omni_moe": ("thinker_config", "Qwen3OmniMoeThinkerForConditionalGeneration")}


def submodel(config: Config) -> tuple[str, Config] | None:
    """(the key, the config) of the sub-model whose language model a release of `SUBMODELS` runs (its
    model_type the one transformers gives it where config.json leaves it out); None for others."""
    model_type = config.get("model_type")
    key, _ = SUBMODELS.get(model_type, (None, None)) if isinstance(model_type, str) else (None, None)
    inner = config.get(key) if key else None
    if not isinstance(inner, dict):
        return None
    if "model_type" not in inner and (implied := _sub_config_type(config.get("model_type"), key)):
        inner = {"model_type": implied, **inner}
    return key, inner


def loaded_as(config: Config) -> str | None:
    """What transformers names the multimodal model that holds the language model of a multimodal
    config.json `config`: its model_type, or the class that runs its sub-model (`SUBMODELS`), whose
    conversion mapping renames the stored tensors."""
    model_type = config.get("model_type")
    return SUBMODELS[model_type][1] if submodel(config) is not None else model_type


def language_config(config: Config) -> Config:
    """The settings of the language model: a multimodal config's text_config over its own keys
    (text_config itself left out), its model_type the one transformers gives the text_config where
    config.json leaves it out (`text_model_type`); a text model's config as it is. A release of
    `SUBMODELS`: its sub-model's language config over the release's own keys."""
    if (found := submodel(config)) is not None:
        key, inner = found
        return {**{k: v for k, v in config.items() if k != key}, **language_config(inner)}
    text = config.get(TEXT)
    if not isinstance(text, dict):
        return config
    implied = {} if "model_type" in text else {"model_type": text_model_type(config.get("model_type"))}
    return {**{k: v for k, v in config.items() if k != TEXT}, **{k: v for k, v in implied.items() if v}, **copy.deepcopy(text)}


def text_model_type(model_type: Any) -> str | None:
    """The model_type of the text_config transformers builds for a multimodal `model_type` whose
    config.json gives none ("qwen3_vl_moe" -> "qwen3_vl_moe_text"); None where its config class
    takes any text config (Kimi-K2.5's, Mistral 3's) or transformers does not know the type."""
    return _sub_config_type(model_type, TEXT)


def _sub_config_type(model_type: Any, key: str) -> str | None:
    """The model_type of the sub-config `key` transformers builds for `model_type`, None where it
    does not know it."""
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    sub = getattr(CONFIG_MAPPING[model_type], "sub_configs", {}).get(key)
    return getattr(sub, "model_type", None) or None


def nested_config(edited: Config, original: Config) -> Config:
    """`edited` (a changed `language_config(original)`) in `original`'s shape: its text keys back in
    text_config, the others at the top (a key in both: changed in both where the edit changed it);
    keys it dropped (a quantization_config) dropped there too, keys it added put in text_config
    (settings of the language model). A release of `SUBMODELS`: its sub-model's config written back
    so, the release's own keys as above."""
    read = language_config(original)
    if (found := submodel(original)) is not None:
        key, inner = found
        # the sub-model's share: what it reads, and keys the edit added (settings of the language model)
        edited_inner = {k: v for k, v in edited.items() if k in language_config(inner) or k not in original}
        nested_inner = nested_config(edited_inner, inner)
        if "model_type" not in original[key]:  # implied on reading, not written
            nested_inner.pop("model_type", None)
        return {
            k: nested_inner if k == key else (original[k] if edited[k] == read.get(k) else edited[k])
            for k in original
            if k == key or k in edited
        }
    text = original.get(TEXT)
    if not isinstance(text, dict):
        return edited
    added = {k: v for k, v in edited.items() if k not in text and k not in original}
    nested = {}
    for key, value in original.items():
        if key == TEXT:
            nested[TEXT] = {k: edited[k] for k in text if k in edited} | added
        elif key in edited:  # as it was, unless the edit changed it (a key in both places: the text one)
            nested[key] = value if edited[key] == read.get(key) else edited[key]
    return nested


# where multimodal checkpoints keep the language model's `model.` (and its output head)
LANGUAGE_ROOTS = {
    "model.language_model.": (("model.", "model.language_model."),),  # Qwen3.5, Qwen3-VL, GLM-4.5V
    "language_model.model.": (
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ),  # Llama 4
    "thinker.model.": (("model.", "thinker.model."), ("lm_head.", "thinker.lm_head.")),  # Qwen3-Omni-MoE
    # Qwen3-Omni-MoE saved by transformers with save_original_format=False: the thinker's own names
    "thinker.model.language_model.": (("model.", "thinker.model.language_model."), ("lm_head.", "thinker.lm_head.")),
}


def runs_whole(wrapper: str, text: str) -> bool:
    """Whether transformers runs the language model of a multimodal model_type `wrapper` (language
    model_type `text`) only inside the multimodal model (Hunyuan 4 VL, Qwen3-VL-MoE: no causal LM of
    the language model's own; Gemma 4: the multimodal model is the causal LM), as moelab's
    skeletons do (`moelab.hf.layerwise.language_model_class`), rather than as a causal LM of its own
    (Kimi-K2.5's DeepSeek-V3)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    return wrapper in causal or text not in causal


def language_renames(stem: str) -> tuple[tuple[str, str], ...]:
    """(in memory, on disk) renames of a text causal LM's tensors for a checkpoint whose decoder
    layers are stored under `stem` ("model.language_model.layers."): none for "model.layers."."""
    return next((renames for root, renames in LANGUAGE_ROOTS.items() if stem == root + "layers."), ())


def language_stem(keys: Iterable[str], stem: str) -> str:
    """The stem the decoder layers a text model holds under `stem` ("model.layers.") are stored
    under among `keys`: `stem` itself, or its place inside a multimodal checkpoint."""
    keys = list(keys)
    if not stem.startswith("model.") or any(key.startswith(stem) for key in keys):
        return stem
    inside = (root + stem.removeprefix("model.") for root in LANGUAGE_ROOTS)
    return next((s for s in inside if any(key.startswith(s) for key in keys)), stem)
