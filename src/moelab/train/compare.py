"""`moelab compare`: train several model variants on one recipe and compare them.

    moelab compare configs/models/dense.yaml configs/models/moe_top2.yaml --train recipe.yaml --out runs/cmp

Every variant trains with the same `TrainConfig` (same data, seed, steps and tokens), so the
comparison is at an equal token budget. Compute is matched by the variants' configs (see
`configs/models/`, built to equal active FLOPs), not rescaled here: active FLOPs per token are
computed for each variant
(at its measured experts per token for data-dependent routers) and reported next to the losses;
variants more than `FLOPS_TOLERANCE` away from the first variant's FLOPs are flagged as not
compute-matched. Each variant is an ordinary training run in `out/<name>`, so an interrupted
comparison resumes where it stopped. Once all have finished, their training throughput is
measured side by side (`moelab.train.throughput`: interleaved steps of fresh models, so that one
machine load is behind every ratio) into throughput.json; the report (report.md, summary.json,
PNG plots) is written by `moelab.train.report`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from moelab.io import atomic_write_text, is_output, output_dir
from moelab.models import ModelConfig
from moelab.models.config import check_not_transformers
from moelab.train.config import (
    RunConfig,
    TrainConfig,
    is_run_config,
    load_model_config,
    read_config_file,
    train_config_from_dict,
)
from moelab.train.report import REPORT_FILES, THROUGHPUT_NAME, write_report
from moelab.train.throughput import interleaved_throughput
from moelab.train.trainer import KIND as TRAIN_KIND
from moelab.train.trainer import RESULTS_NAME, check_same_run, train

KIND = "comparison"


def variant_name(spec: str) -> str:
    """A variant's name: the config file's stem, or the preset name."""
    return Path(spec).stem if Path(spec).suffix else spec


def load_variants(specs: Sequence[str]) -> dict[str, ModelConfig]:
    """Model configs by name from model config files (.yaml/.json) or preset names; names must be
    unique. Run files are refused: every variant trains with the one shared recipe."""
    if not specs:
        raise ValueError("compare needs at least one model config")
    variants: dict[str, ModelConfig] = {}
    for spec in specs:
        name = variant_name(spec)
        if name in variants:
            raise ValueError(f"two variants are named {name!r}; give the config files different names")
        if Path(spec).suffix and is_run_config(read_config_file(spec)):
            raise ValueError(
                f"{spec} is a run file with its own train section; compare trains every variant with the "
                "one --train recipe, so pass model config files (or move its model section into one)"
            )
        variants[name] = load_model_config(spec)
    return variants


def load_recipe(path: str | Path) -> TrainConfig:
    """A training recipe: a YAML/JSON file of TrainConfig fields, or a run file's `train` section."""
    data = read_config_file(path)
    check_not_transformers(data, path)
    if isinstance(data, dict) and "train" in data:
        data = data["train"]
    try:
        return train_config_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def compare(
    specs: Sequence[str],
    recipe: TrainConfig,
    out_dir: str | Path,
    *,
    seeds: int = 1,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    quiet: bool = False,
) -> Path:
    """Train every variant in `specs` with `recipe` into `out_dir/<name>` (finished runs are kept,
    interrupted ones resumed; `overwrite` starts every variant again), then write the report.
    seeds: train each variant with this many seeds (recipe.seed, recipe.seed + 1, ...: the
    initialisation and the data order) into `out_dir/<name>-seed<s>`; the report gives means and
    spreads. inputs: the recipe file, which `out_dir` must not contain (the config files in `specs`
    are inputs too). Returns the report's path."""
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    runs: dict[str, RunConfig] = {}
    groups: dict[str, list[str]] = {}
    for name, model in load_variants(specs).items():
        groups[name] = []
        for seed in range(recipe.seed, recipe.seed + seeds):
            run_name = name if seeds == 1 else f"{name}-seed{seed}"
            try:
                runs[run_name] = RunConfig(model=model, train=dataclasses.replace(recipe, seed=seed))
            except ValueError as err:
                raise ValueError(f"variant {name!r}: {err}") from None
            groups[name].append(run_name)
    files = [spec for spec in specs if Path(spec).suffix]
    with output_dir(
        out_dir,
        KIND,
        entries=[*runs, *REPORT_FILES],
        inputs=[*files, *inputs],
        overwrite=overwrite,
        resume=True,
    ) as claimed:
        for i, (name, run) in enumerate(runs.items(), 1):
            run_dir = claimed.path / name
            check_same_run(run, run_dir)
            if (run_dir / RESULTS_NAME).exists():
                if not quiet:
                    print(f"[{i}/{len(runs)}] {name}: finished earlier, kept")
                continue
            if not quiet:
                print(f"[{i}/{len(runs)}] {name}")
            train(run, run_dir, resume=is_output(run_dir, TRAIN_KIND), quiet=quiet)
        speeds = claimed.path / THROUGHPUT_NAME
        if _measured_variants(speeds) != list(groups):  # once all have finished; again for other variants
            if not quiet:
                print("training throughput, side by side")
            firsts = {name: runs[run_names[0]] for name, run_names in groups.items()}
            atomic_write_text(speeds, json.dumps(interleaved_throughput(firsts), indent=2) + "\n")
        return write_report(claimed.path, groups)


def _measured_variants(path: Path) -> list[str] | None:
    """The variants, in order, whose throughput `path` holds (None: none measured)."""
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
