"""The reference MoE models shipped in the package (`src/moelab/assets/models/`).

Both were trained on the shipped corpus by `moelab train` with the run files in
`configs/reference/`; each directory holds model.safetensors, config.json and the tokenizer.

    ref-8e-top2           8 experts, top-2 (the default for `moelab demo` and `moelab analyze`)
    ref-32e-top4-shared   32 narrow experts, top-4, plus one shared expert (DeepSeekMoE-style)
"""

from __future__ import annotations

import os
from pathlib import Path

from moelab.validation import check_choice

MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
REFERENCE_MODELS = ("ref-8e-top2", "ref-32e-top4-shared")
DEFAULT_REFERENCE = "ref-8e-top2"


def retrain_command(name: str = DEFAULT_REFERENCE) -> str:
    return (
        f"moelab train configs/reference/{name}.yaml --out runs/{name} "
        f"&& mkdir -p {MODELS_DIR / name} && cp runs/{name}/model/* {MODELS_DIR / name}/"
    )


def model_dir(model: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory a user names: `model` itself where such a path exists, else the
    shipped reference model of that name; None: the default one (`DEFAULT_REFERENCE`)."""
    if model is None:
        return reference_model_dir()
    if not Path(model).exists() and str(model) in REFERENCE_MODELS:
        return reference_model_dir(str(model))
    return Path(model)


def reference_model_dir(name: str = DEFAULT_REFERENCE) -> Path:
    """The directory of a shipped reference model; a clear error if it is missing."""
    check_choice("reference model", name, REFERENCE_MODELS)
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped reference model {name} is missing ({path}); rebuild it with: {retrain_command(name)}"
        )
    return path
