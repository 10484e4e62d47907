"""The writer's postconditions: a written checkpoint reads back with the new expert counts,
every edited layer computes what the edit means, and the library that owns the format loads it
strictly. A failed postcondition is an error (`WriteCheckError`), never a warning.

Shape legend: T tokens, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moelab.files import read_json_object
from moelab.hf.adapters import NATIVE, resolve
from moelab.hf.checkpoint import CheckpointError
from moelab.hf.edit import moe_output
from moelab.hf.layouts import Family, config_entry
from moelab.hf.loading import load_causal_lm
from moelab.hf.multimodal import TEXT, language_renames
from moelab.hf.view import ModelView
from moelab.memory import release_freed_memory


@dataclass
class LayerCheck:
    """x [T, D] (float64) and what the edited layer must output on it; ids: the router's per-token
    input where it reads one (token ids [T] for a hash router, router states [T, R] for ZAYA's)."""

    x: Tensor
    expected: Tensor
    ids: Tensor | None = None


class WriteCheckError(CheckpointError):
    """The written checkpoint failed a postcondition; nothing was written to `out`."""


def postcondition_error(what: str) -> WriteCheckError:
    return WriteCheckError(
        f"write-back postcondition failed, nothing was written: {what}. This is a moelab bug or an edit "
        "this family cannot express; please report it with the edit"
    )


def check_written(staging: Path, checks: dict[int, LayerCheck]) -> None:
    """The output reads back through the view, with the new count in every MoE layer, and every
    edited layer computes what its check expects."""
    config, ckpt, family = resolve(staging)
    try:
        view = ModelView(ckpt, config, family, family.layer_count(config))
        E, Z = config_entry(config, family.num_experts)[1], family.identity_count(config)
        for index in family.moe_layers(ckpt, config) + family.mtp_layers:
            router = family.layout_of(ckpt, index).router
            rows = ckpt.shape(family.prefix(index) + router.weight)[1 if router.transposed else 0]
            if rows != E + Z:
                identity = f" and {Z} identity experts" if Z else ""
                raise postcondition_error(f"layer {index} has {rows} router rows but config.json says {E} experts{identity}")
        for index, check in checks.items():
            layer = view.layer(index)  # also checks the experts on disk against config.json
            got = moe_output(layer, check.x, ids=check.ids)
            del layer
            release_freed_memory()
            scale = max(1.0, check.expected.abs().max().item())
            if not torch.isfinite(got).all():
                raise postcondition_error(f"layer {index} outputs NaN or Inf")
            error = (got - check.expected).abs().max().item()
            if error > 1e-5 * scale:
                raise postcondition_error(
                    f"layer {index} differs from the edit applied to the original (masked-router simulation "
                    f"for selected experts) by {error:.3g} (max |output| {scale:.3g})"
                )
    except WriteCheckError:
        raise
    except CheckpointError as err:
        raise postcondition_error(f"the written checkpoint does not read back: {err}") from err
    finally:
        ckpt.close()


def check_reload(staging: Path, family: Family, quiet: bool, source: Path | None = None) -> None:
    """Strict load with the library that owns the format, then a finite forward pass. source: the
    checkpoint the output was written from; where the output fails, the source is tried the same
    way, and a source that fails too is blamed (a CheckpointError naming its problem), not moelab."""
    problem = reload_problem(staging, family, quiet)
    if problem is None:
        return
    if source is not None and (own := reload_problem(source, family, quiet)) is not None:
        raise CheckpointError(
            f"the source checkpoint {source} does not load either ({own}); nothing was written: fix or "
            "re-create the source (its config.json, index and weights must agree, with finite weights)"
        )
    raise postcondition_error(problem)


def unbuilt_by_transformers(path: Path) -> list[str]:
    """Prefixes of the checkpoint's tensors that transformers' text causal LM does not build: its
    multi-token prediction modules (`Family.mtp`) and, in a multimodal checkpoint, every tensor
    outside the language model (vision tower, projector; dots3's beside a language model stored as a
    text model's)."""
    _, ckpt, family = resolve(path)
    ckpt.close()
    unbuilt = [module.root for module in family.mtp]
    stem = family.layer_prefix.partition("{n}")[0]
    renames = language_renames(stem)
    if renames or TEXT in read_json_object(path / "config.json", "a model config", error=CheckpointError):
        language = (*(disk for _, disk in renames), stem.removesuffix("layers."), "lm_head.", *unbuilt)
        unbuilt += [key for key in ckpt.keys() if not key.startswith(language)]
    return unbuilt


def reload_problem(path: Path, family: Family, quiet: bool) -> str | None:
    """Why the checkpoint at `path` does not load strictly, or gives non-finite logits; None if it
    loads and runs."""
    try:
        if family is NATIVE:
            from moelab.models import load_pretrained

            model = load_pretrained(path)
            vocab = model.config.vocab_size
        else:
            model = load_causal_lm(path, quiet=quiet, unused_prefixes=unbuilt_by_transformers(path))
            vocab = model.config.get_text_config().vocab_size
    except ValueError as err:  # CheckpointError included: load_causal_lm says what transformers refused
        if isinstance(err.__cause__, ImportError):  # this environment lacks a package, not a fault of the files
            raise CheckpointError(
                f"the reload check cannot run here: {err}. Install what it names, or write with reload=False "
                "(--no-reload; every edited layer is still checked through moelab's reader)"
            ) from err
        return f"moelab.models.load_pretrained refuses it: {err}" if family is NATIVE else str(err)
    with torch.no_grad():
        logits = model.eval()(torch.arange(8)[None] % vocab).logits
    if not torch.isfinite(logits).all():
        return "the reloaded model's logits contain NaN or Inf"
    return None
