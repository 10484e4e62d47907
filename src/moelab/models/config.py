"""`ModelConfig`: one serialisable description of a decoder-only MoE language model, and presets.

Presets are plain functions that return a config (`tiny()`, `small()`); `PRESETS` maps their
names to them and `preset(name)` looks one up.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moelab.files import read_config_file
from moelab.io import atomic_write_text
from moelab.nn import MoEConfig, UoEConfig
from moelab.validation import check_field_types, check_known_fields, did_you_mean

LAYER_TYPES = ("dense", "moe", "uoe")


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder: pre-RMSNorm blocks of causal GQA attention with RoPE, then a dense
    SwiGLU FFN or an MoE layer. Validated on construction; round-trips through
    `to_dict`/`from_dict` and `save`/`load` (JSON or YAML, chosen by the file suffix).

    vocab_size: V. dim: model width D. n_layers: L. n_heads: query heads H; head_dim = D / H
        (must be even for RoPE). n_kv_heads: key/value heads (grouped-query attention; must divide
        n_heads; None = n_heads, plain multi-head attention).
    max_seq_len: longest sequence (prompt + generated tokens); sizes the RoPE tables.
    rope_theta: RoPE base. norm_eps: RMSNorm epsilon.
    dense_hidden_dim: width of the dense SwiGLU FFN layers; None derives Llama's 8/3 * D rounded
        up to a multiple of 64.
    moe: the MoE layer (its `dim` must equal `dim`; in a config file it may be left out and is
        inherited). None makes every layer dense.
    uoe: Union-of-Experts (`moelab.nn.uoe.UoEConfig`): a "uoe" layer replaces the attention by
        selective multi-head attention (heads as experts; needs n_kv_heads == n_heads) and the
        dense FFN by its tensor-parallel slices as routed experts.

    Architectures are config options. Each layer has a kind: "dense", "moe" (an FFN built from
    `moe`) or "uoe". The `moe` section selects the rest:
        plain top-k, DeepSeekMoE (many narrow experts + num_shared), aux-loss-free balancing
        (selection_bias, sigmoid scores, groups): router="topk" and its fields;
        dynamic top-p with its entropy loss: router="topp", entropy_coef;
        hash layers (each token id's experts fixed by a table, DeepSeek-V4's first layers): router="hash";
        expert choice: router="expert_choice" (non-causal: needs allow_noncausal_routing);
        BlockFFN: router="relu", activation="silu", locality_coef, chunk_sparsity_coef (TLS and
            CLS come back in ModelOutput.metrics);
        Chain-of-Experts: chain_iterations = C (residual_from_norm = the reference's block);
        graph-of-tokens routing: router="graph_sim" or "graph_attn";
        Mixture of Latent Experts: latent_dim; ReXMoE: reuse_layers (the number of MoE layers
            must be a multiple of it).
    Which layers are sparse (0-based layer i), when `moe` or `uoe` is set:
        layer_types: an explicit list of "dense"/"moe"/"uoe", one per layer; overrides the two
            below (and is required when both moe and uoe are set).
        first_k_dense: the first k layers are dense (DeepSeek's `first_k_dense_replace`).
        moe_every: from layer first_k_dense on, every n-th layer is MoE, counting from that layer:
            i >= first_k_dense and (i - first_k_dense) % moe_every == 0 (Dynamic-MoE's
            `expert_frequency`: moe_every=2 puts MoE in layers 0, 2, 4, ...). These layers are
            "moe" if `moe` is set, else "uoe".
    tie_embeddings: the LM head shares the token embedding's weight.
    init_std: std of every weight matrix at init (the output projections o_proj and down_proj get
        init_std / sqrt(2 L), as GPT-2 does); norms start at 1 and biases at 0.
    allow_noncausal_routing: let a model whose router sees other tokens (expert choice, capacity
        dropping, UoE's reference selection) run as a causal LM anyway, although position t then
        depends on later tokens.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dense_hidden_dim: int | None = None
    moe: MoEConfig | None = None
    uoe: UoEConfig | None = None
    layer_types: list[str] | None = None
    first_k_dense: int = 0
    moe_every: int = 1
    tie_embeddings: bool = False
    init_std: float = 0.02
    allow_noncausal_routing: bool = False

    def __post_init__(self):
        check_field_types(self)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "moe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), since "
                f"head_dim = dim / n_heads; change dim or n_heads"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE; change dim or n_heads"
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): each "
                f"key/value head serves n_heads / n_kv_heads query heads"
            )
        if self.dense_hidden_dim is None:
            self.dense_hidden_dim = 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.dense_hidden_dim < 1:
            raise ValueError(f"ModelConfig.dense_hidden_dim must be >= 1, got {self.dense_hidden_dim}")
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(
                f"ModelConfig.moe.dim ({self.moe.dim}) must equal ModelConfig.dim ({self.dim}); build "
                f"MoEConfig(dim={self.dim}, ...), or leave dim out of the moe section of a config file"
            )
        self._check_layer_pattern()
        self._check_architectures()

    def _check_architectures(self) -> None:
        kinds = self.layer_kinds
        if self.uoe is not None and "uoe" in kinds:
            if self.n_kv_heads != self.n_heads:
                raise ValueError(
                    f"UoE layers treat each attention head as an expert with its own keys and values; set "
                    f"n_kv_heads ({self.n_kv_heads}) equal to n_heads ({self.n_heads}) or leave it out"
                )
            try:
                self.uoe.check_heads(self.n_heads)
            except ValueError as err:
                raise ValueError(f"ModelConfig.uoe: {err} (n_heads={self.n_heads})") from None
            if self.dense_hidden_dim % self.uoe.mlp_experts:
                raise ValueError(
                    f"ModelConfig.dense_hidden_dim ({self.dense_hidden_dim}) must be divisible by uoe.mlp_experts "
                    f"({self.uoe.mlp_experts}): each UoE MLP expert is an equal slice of the dense FFN"
                )
        n_moe = kinds.count("moe")
        if self.moe is not None and n_moe and n_moe % self.moe.reuse_layers:
            raise ValueError(
                f"ModelConfig.moe.reuse_layers ({self.moe.reuse_layers}) must divide the number of MoE layers "
                f"({n_moe}): ReXMoE groups consecutive MoE layers"
            )

    def _check_layer_pattern(self) -> None:
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(
                    f"ModelConfig.layer_types has {len(self.layer_types)} entries but n_layers is "
                    f"{self.n_layers}; give one 'dense', 'moe' or 'uoe' per layer"
                )
            for kind in self.layer_types:
                if kind not in LAYER_TYPES:
                    raise ValueError(
                        f"ModelConfig.layer_types: unknown kind {kind!r}{did_you_mean(kind, LAYER_TYPES)}; "
                        "each entry is 'dense', 'moe' or 'uoe'"
                    )
            for kind in ("moe", "uoe"):
                if kind in self.layer_types and getattr(self, kind) is None:
                    config = "MoEConfig" if kind == "moe" else "UoEConfig"
                    raise ValueError(
                        f"ModelConfig.layer_types has {kind!r} layers but {kind} is None; set {kind}={config}(...)"
                    )
                if kind not in self.layer_types and getattr(self, kind) is not None:
                    raise ValueError(
                        f"ModelConfig.{kind} is set but layer_types has no {kind!r} layer, so it has no effect; "
                        f"add {kind!r} layers or leave {kind} out"
                    )
        elif self.moe is not None and self.uoe is not None:
            raise ValueError("ModelConfig has both moe and uoe; set layer_types to say which layers are which")
        elif self.first_k_dense < 0 or (self.sparse_kind != "dense" and self.first_k_dense >= self.n_layers):
            raise ValueError(
                f"ModelConfig.first_k_dense ({self.first_k_dense}) must lie in [0, n_layers={self.n_layers}) "
                f"so that some layer is MoE; for a dense model set moe=None"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def sparse_kind(self) -> str:
        """The kind first_k_dense/moe_every place: "moe" if moe is set, else "uoe" if uoe is, else "dense"."""
        return "moe" if self.moe is not None else "uoe" if self.uoe is not None else "dense"

    @property
    def layer_kinds(self) -> list[str]:
        """The kind of each layer, in order: "dense", "moe" or "uoe"."""
        if self.layer_types is not None:
            return list(self.layer_types)
        k, n, sparse = self.first_k_dense, self.moe_every, self.sparse_kind
        return [sparse if i >= k and (i - k) % n == 0 else "dense" for i in range(self.n_layers)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The inverse of `to_dict`. Unknown keys are rejected; the `moe` section may omit `dim`."""
        check_known_fields(cls, data)
        data = dict(data)
        if isinstance(data.get("moe"), dict):
            moe = dict(data["moe"])
            if "dim" in data:
                moe.setdefault("dim", data["dim"])
            try:
                data["moe"] = MoEConfig.from_dict(moe)
            except (TypeError, ValueError) as err:
                raise ValueError(f"ModelConfig.moe: {err}") from None
        if isinstance(data.get("uoe"), dict):
            try:
                data["uoe"] = UoEConfig.from_dict(data["uoe"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"ModelConfig.uoe: {err}") from None
        try:
            return cls(**data)
        except TypeError as err:  # a required field is missing
            raise ValueError(f"ModelConfig: {err}") from None

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (.json) or YAML (.yaml/.yml), atomically."""
        path = Path(path)
        data = self.to_dict()
        if _format(path) == "json":
            atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        else:
            atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a config written by `save` (or by hand) from a .json, .yaml or .yml file."""
        data = read_config_file(path)
        check_not_transformers(data, path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of ModelConfig fields, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def check_not_transformers(data: Any, path: str | Path) -> None:
    """Refuse a transformers config.json (it has a model_type or architectures) where a moelab
    config is expected, saying so (rather than 'unknown field')."""
    if isinstance(data, dict) and "model_type" not in data and "architectures" in data:
        raise ValueError(
            f"{path} is a transformers model config without its model_type (architectures "
            f"{data['architectures']!r}), which transformers and moelab read to tell what model it is: add "
            f"{_model_type_of(data['architectures'])} to it (moelab takes a config.json without one for its own)"
        )
    if isinstance(data, dict) and "model_type" in data:
        raise ValueError(
            f"{path} is a transformers model config (model_type {data.get('model_type')!r}); expected a moelab "
            "config (a ModelConfig file, a run file, or the config.json of a moelab checkpoint written by "
            "save_pretrained or moelab train). A transformers checkpoint is read as it is by trace, analyze, "
            "calibrate, compress, eval and generate; moelab import converts a Mixtral or Qwen2-MoE one to moelab's"
        )


def _model_type_of(architectures: Any) -> str:
    """'"model_type": "mixtral"' for architectures ["MixtralForCausalLM"]: the model_type of the
    transformers class's own config ("llama4_text" for Llama4ForCausalLM, not the multimodal
    "llama4" that maps to it too), else a placeholder."""
    import transformers

    for name in architectures if isinstance(architectures, list) else []:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
        if isinstance(model_type, str) and model_type:
            return f'"model_type": "{model_type}"'
    return "its family's model_type (e.g. \"model_type\": \"mixtral\")"


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValueError(f"{path}: unknown config format {suffix!r}; use a .json, .yaml or .yml file")


# ----------------------------------------------------------------------------- presets


def tiny() -> ModelConfig:
    """For tests: 2 layers (dense, then MoE), D = 32, GQA 4/2 heads, 4 experts top-2, vocab 128
    (~33k parameters)."""
    return ModelConfig(
        vocab_size=128,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        dense_hidden_dim=64,
        moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2),
        first_k_dense=1,
    )


def small() -> ModelConfig:
    """A CPU-trainable MoE: 8 layers, D = 256, 8 experts top-2 of width 384, tied embeddings,
    vocab 8192 (the shipped tokenizer); ~23M parameters, ~8M active per token."""
    return ModelConfig(
        vocab_size=8192,
        dim=256,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        max_seq_len=512,
        moe=MoEConfig(dim=256, num_experts=8, hidden_dim=384, top_k=2),
        tie_embeddings=True,
    )


PRESETS = {"tiny": tiny, "small": small}


def preset(name: str) -> ModelConfig:
    """The config of a named preset (see `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; choose one of {list(PRESETS)}"
        )
    return PRESETS[name]()
