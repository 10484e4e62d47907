"""`TrainConfig` and `RunConfig`: what a training run does, read from one YAML/JSON file.

A run file has two sections, the model and the training recipe, and optionally a third, how
the processes of a torchrun launch split the work (`moelab.distributed.ParallelConfig`):

    model: small                  # a preset name, a path to a ModelConfig file, or its fields
    train:
      steps: 2000
      batch_size: 16
      seq_len: 256
      lr: 3.0e-3
    parallel:                     # only read under torchrun
      expert: 2

Paths in `model:` are relative to the run file. Every field is validated on load; unknown keys
are rejected with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moelab.data import list_domains
from moelab.distributed.mesh import ParallelConfig
from moelab.files import read_config_file
from moelab.io import atomic_write_text
from moelab.models import ModelConfig, preset
from moelab.models.config import PRESETS, check_not_transformers
from moelab.threads import check_threads
from moelab.validation import check_choice, check_field_types, check_known_fields, did_you_mean

SECTIONS = ("model", "train", "parallel")
DTYPES = ("fp32", "bf16")
MIXTURES = ("proportional", "uniform")


@dataclass(kw_only=True)
class TrainConfig:
    """The training recipe.

    steps: optimizer steps. batch_size x seq_len tokens per micro-batch, grad_accum micro-batches
        per step (tokens per step = batch_size * seq_len * grad_accum).
    lr: peak learning rate; linear warmup over warmup_steps (default: a tenth of the steps), then
        cosine decay to lr * min_lr_ratio at the last step. weight_decay: AdamW decay on matrices (not on norms, biases, embeddings).
    betas, eps: AdamW's. grad_clip: max global gradient norm (0 = no clipping).
    dtype: "fp32", or "bf16" autocast (fast on GPUs; on CPUs without bf16 matmul it is slower).
    domains: corpus domains to train on (None = all); mixture: "proportional" or "uniform".
    seed: model init and data order.
    eval_every: validate on every domain every n steps (and at the end); eval_tokens: at most
        this many validation tokens per domain. eval_batch_size: rows per validation batch.
    checkpoint_every: write a resumable checkpoint every n steps (and at the end); keep_checkpoints:
        how many of the newest to keep.
    log_every: steps between log lines (JSONL, TensorBoard, progress bar).
    adaptive_chunk_sparsity: scale BlockFFN's chunk-sparsity loss coefficient with the paper's
        adaptive schedule (`moelab.nn.blockffn.AdaptiveCoefficient`, warmup = warmup_steps,
        updated every chunk_sparsity_window steps; the paper uses 100).
    reuse_ramp_steps: ReXMoE's progressive scaling: the shared expert pool opens linearly over
        this many steps (0 = the whole pool from the start).
    chunked_loss: compute the LM loss a chunk of rows at a time, never holding the [tokens, vocab]
        logits (`moelab.nn.lm_loss`; the same loss up to float rounding); false: through the whole
        logits, as the shipped reference models and the equal-compute comparison were trained
        (their run files say so, which keeps their retraining byte for byte).
    threads: torch intra-op threads: a count, "auto" (the cores no other process is using when
        the run starts, `moelab.threads.free_cores`), or None (torch's default).
    device: "auto" (CUDA if available), "cpu" or "cuda".
    """

    steps: int
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "fp32"
    domains: list[str] | None = None
    mixture: str = "proportional"
    seed: int = 0
    eval_every: int = 200
    eval_tokens: int = 16384
    eval_batch_size: int = 16
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    adaptive_chunk_sparsity: bool = False
    chunk_sparsity_window: int = 100
    reuse_ramp_steps: int = 0
    chunked_loss: bool = True
    threads: int | str | None = None
    device: str = "auto"

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        check_field_types(self)
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_every",
            "eval_tokens",
            "eval_batch_size",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "chunk_sparsity_window",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}; "
                "the learning rate would never reach its peak"
            )
        if not 0 <= self.reuse_ramp_steps < self.steps:
            raise ValueError(
                f"TrainConfig.reuse_ramp_steps must lie in [0, steps={self.steps}), got {self.reuse_ramp_steps}; "
                "the last steps must train on the whole expert pool the saved model uses"
            )
        if self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be >= 0, got {self.seed}")
        if self.lr <= 0 or self.eps <= 0:
            raise ValueError(f"TrainConfig.lr and eps must be > 0, got {self.lr} and {self.eps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {list(self.betas)}")
        check_choice("train.dtype", self.dtype, DTYPES)
        check_choice("train.mixture", self.mixture, MIXTURES)
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        if self.domains is not None:
            known = list_domains()
            if not self.domains:
                raise ValueError("TrainConfig.domains is empty; list some domains or leave it out for all")
            for domain in self.domains:
                check_choice("train.domain", domain, tuple(known))
        try:
            check_threads(self.threads)
        except ValueError as err:
            raise ValueError(f"TrainConfig.{err}") from None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


@dataclass(kw_only=True)
class RunConfig:
    """A model and how to train it: the content of a run file."""

    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig | None = None

    def __post_init__(self):
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                "shorten seq_len or raise max_seq_len"
            )
        if self.model.uoe is not None:
            self.model.uoe.check_trains()

    def to_dict(self) -> dict[str, Any]:
        data = {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}
        if self.parallel is not None:
            data["parallel"] = dataclasses.asdict(self.parallel)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path = Path(".")) -> RunConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a run config is a mapping with 'model' and 'train', got {type(data).__name__}")
        for key in data:
            if key not in SECTIONS:
                raise ValueError(
                    f"unknown run config section {key!r}{did_you_mean(key, list(SECTIONS))}; "
                    "a run file has 'model', 'train' and optionally 'parallel'"
                )
        for key in ("model", "train"):
            if key not in data:
                raise ValueError(f"run config has no {key!r} section")
        parallel = data.get("parallel")
        return cls(
            model=_model_config(data["model"], base_dir),
            train=train_config_from_dict(data["train"]),
            parallel=None if parallel is None else ParallelConfig.from_dict(parallel),
        )

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        data = read_config_file(path)
        check_not_transformers(data, path)
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        """The resolved config (model fields spelled out), as YAML or JSON by suffix, atomically."""
        path = Path(path)
        data = self.to_dict()
        data["train"]["betas"] = list(data["train"]["betas"])
        text = (
            json.dumps(data, indent=2) + "\n"
            if path.suffix == ".json"
            else yaml.safe_dump(data, sort_keys=False)
        )
        atomic_write_text(path, text)


def train_config_from_dict(data: Any) -> TrainConfig:
    """A TrainConfig from a mapping of its fields; unknown or missing fields are named."""
    if not isinstance(data, dict):
        raise ValueError(f"'train' must be a mapping of TrainConfig fields, got {data!r}")
    check_known_fields(TrainConfig, data, label="train")
    try:
        return TrainConfig(**data)
    except TypeError as err:  # a required field (steps) is missing
        raise ValueError(f"train: {err}") from None


def is_run_config(data: Any) -> bool:
    """Whether parsed config content is a run file (model + train sections) rather than a model config."""
    return isinstance(data, dict) and "model" in data and "train" in data


def load_model_config(spec: str | Path) -> ModelConfig:
    """A model config from a preset name, a ModelConfig file, or a run file (its model section)."""
    path = Path(spec)
    if not path.suffix and str(spec) not in PRESETS and path.is_dir():
        hint = f" (its config.json: {path / 'config.json'})" if (path / "config.json").is_file() else ""
        raise ValueError(f"{path} is a directory; give a model or run config file{hint} or a preset name")
    if not path.suffix:
        return preset(str(spec))
    data = read_config_file(path)
    if is_run_config(data):
        return RunConfig.load(path).model
    return ModelConfig.load(path)


def _model_config(spec: Any, base_dir: Path) -> ModelConfig:
    """`model:` is a preset name, a ModelConfig file (relative to the run file) or its fields."""
    if isinstance(spec, dict):
        return ModelConfig.from_dict(spec)
    if isinstance(spec, str):
        return load_model_config(base_dir / spec if Path(spec).suffix else spec)
    raise ValueError(f"'model' must be a preset name, a config file path or a mapping, got {spec!r}")
