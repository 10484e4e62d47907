"""Routing traces on disk: safetensors shards of whole sequences plus a JSON manifest.

Shape legend: N tokens in a shard, K slots per token, E experts of a layer.

Layout of a trace directory:

    manifest.json                  `TraceInfo`: model, MoE layers, experts, top-k, domains, shards
    shard-00000.safetensors        token_ids, positions, sequence, domain: [N];
                                   layer{l}.indices [N, K] int16/int32 (-1 = empty slot),
                                   layer{l}.weights [N, K] float32, layer{l}.entropy [N] float16,
                                   layer{l}.logits [N, E] float16 (only if recorded)
    expert_stats.safetensors       layer{l}.expert_max [E], layer{l}.shared_max [1] (float32)

`TraceWriter` streams: it holds at most one shard of tokens in memory and writes everything
into a staging directory beside the target, which becomes the target in one rename on
`close()` (`moelab.io.StagedOutput`). `Trace` (from `open_trace`) reads the manifest and iterates shards one at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.files import file_inside, load_safetensors, read_json_object
from moelab.io import StagedOutput, atomic_write_text, save_safetensors
from moelab.nn.moe import IDENTITY_RETURNS
from moelab.trace.capture import LayerRouting, RoutingCheck
from moelab.validation import check_choice, check_field_types, check_known_fields

FORMAT = "moelab-trace"
KIND = "routing trace"
VERSION = 1
MANIFEST = "manifest.json"
STATS = "expert_stats.safetensors"
TOKEN_FIELDS = ("token_ids", "positions", "sequence", "domain")


@dataclass
class ShardInfo:
    file: str
    tokens: int
    sequences: int

    def __post_init__(self):
        check_field_types(self)
        if self.tokens < 0 or self.sequences < 0:
            raise ValueError(f"shard {self.file!r}: tokens and sequences must be >= 0")


@dataclass(kw_only=True)
class TraceInfo:
    """The manifest. layers: MoE layer indices (decoder layer numbers); num_experts, top_k: one
    per MoE layer, aligned with `layers`; domains: the names behind a token's domain id;
    checks: {layer: RoutingCheck fields} for transformers models; settings: how it was made.
    identity_experts: one per MoE layer (or empty: none), how many of its num_experts choices, the
    last ones, are identity experts (LongCat-Flash's zero-computation experts: no weights, no
    max statistic); identity_returns: what a slot on one returns, "input" (LongCat-Flash's) or
    "zero" (ZAYA's skip expert, `MoELayer.identity_returns`)."""

    model: str
    family: str
    num_layers: int
    layers: list[int]
    num_experts: list[int]
    top_k: list[int]
    domains: list[str]
    logits: bool = False
    shards: list[ShardInfo] = field(default_factory=list)
    num_tokens: int = 0
    num_sequences: int = 0
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    identity_experts: list[int] = field(default_factory=list)
    identity_returns: str = "input"
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self):
        check_field_types(self)
        n = len(self.layers)
        if not n or len(self.num_experts) != n or len(self.top_k) != n:
            raise ValueError("TraceInfo needs at least one MoE layer and one num_experts/top_k entry per layer")
        if self.layers != sorted(set(self.layers)) or not all(0 <= i < self.num_layers for i in self.layers):
            raise ValueError(  # in order: the analysis pairs each MoE layer with the next in the list
                f"TraceInfo.layers must be distinct layer numbers in increasing order in [0, num_layers="
                f"{self.num_layers}), got {self.layers}"
            )
        if not all(1 <= k <= e for k, e in zip(self.top_k, self.num_experts)):
            raise ValueError(f"TraceInfo.top_k {self.top_k} must lie in [1, num_experts {self.num_experts}]")
        if self.identity_experts and (
            len(self.identity_experts) != n or not all(0 <= z < e for z, e in zip(self.identity_experts, self.num_experts))
        ):
            raise ValueError(
                f"TraceInfo.identity_experts {self.identity_experts} must hold one count in [0, num_experts) per layer "
                f"(num_experts {self.num_experts}), or none"
            )
        check_choice("TraceInfo.identity_returns", self.identity_returns, IDENTITY_RETURNS)

    def experts_of(self, layer: int) -> int:
        return self.num_experts[self.layers.index(layer)]

    def identity_of(self, layer: int) -> int:
        """The identity experts among the layer's `experts_of` choices (the last ones)."""
        return self.identity_experts[self.layers.index(layer)] if self.identity_experts else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceInfo:
        """The inverse of `asdict`: field names, types and shard entries are checked."""
        shards = data.get("shards", [])
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise ValueError(f"TraceInfo.shards must be a list of {{file, tokens, sequences}} objects, got {shards}")
        check_known_fields(cls, data)
        for shard in shards:
            check_known_fields(ShardInfo, shard)
        try:
            return cls(**{**data, "shards": [ShardInfo(**s) for s in shards]})
        except TypeError as err:  # a required field is missing
            raise ValueError(str(err)) from None


@dataclass
class TraceShard:
    """One shard: token_ids, positions, sequence (global sequence number), domain (index into
    `TraceInfo.domains`): [N] int64 each; layers: {layer: LayerRouting over the N tokens}."""

    token_ids: Tensor
    positions: Tensor
    sequence: Tensor
    domain: Tensor
    layers: dict[int, LayerRouting]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


class TraceWriter:
    """Write a trace to `directory`, streaming (see the module docstring).

    info: the manifest so far (shards and counts are filled in here). shard_tokens: a shard is
    written once it holds at least this many tokens (shards hold whole sequences). `directory`
    is claimed through `moelab.io.StagedOutput`: it must be new, or a previous trace to replace
    with `overwrite` (on `close()`), and must not be or contain any of `inputs`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        info: TraceInfo,
        *,
        shard_tokens: int = 65536,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike | None] = (),
    ):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.info = info
        self.shard_tokens = shard_tokens
        self._output = StagedOutput(directory, KIND, inputs=inputs, overwrite=overwrite)
        self._staging = self._output.open()
        self._buffer: list[dict[str, Tensor]] = []
        self._buffered = 0
        self._index_dtype = (
            torch.int16 if max(info.num_experts) <= torch.iinfo(torch.int16).max else torch.int32
        )

    def add(self, token_ids: Tensor, domain: int, routing: dict[int, LayerRouting]) -> None:
        """token_ids: [B, S] one batch of sequences from domain number `domain`; routing: {layer:
        LayerRouting of its B*S tokens, row-major}. Positions are 0..S-1."""
        if token_ids.dim() != 2:
            raise ValueError(f"token_ids must be [batch, seq], got {list(token_ids.shape)}")
        if not 0 <= domain < len(self.info.domains):
            raise ValueError(f"domain {domain} out of range for {len(self.info.domains)} domains")
        if sorted(routing) != self.info.layers:
            raise ValueError(f"routing covers layers {sorted(routing)}, the trace expects {self.info.layers}")
        B, S = token_ids.shape
        top_k = dict(zip(self.info.layers, self.info.top_k))
        for layer, r in routing.items():
            if r.indices.shape[0] != B * S:
                raise ValueError(f"layer {layer} routed {r.indices.shape[0]} tokens, the batch has {B * S}")
            if list(r.indices.shape) != [B * S, top_k[layer]] or r.weights.shape != r.indices.shape:
                raise ValueError(
                    f"layer {layer} gave indices {list(r.indices.shape)} and weights {list(r.weights.shape)}, the "
                    f"trace expects [{B * S}, {top_k[layer]}] each (its top_k)"
                )
        if B * S == 0:  # nothing to record (a shard of 0 tokens would follow)
            return
        first = self.info.num_sequences
        tensors = {
            "token_ids": token_ids.reshape(-1).to(torch.int32),
            "positions": torch.arange(S, dtype=torch.int32).repeat(B),
            "sequence": torch.arange(first, first + B, dtype=torch.int32).repeat_interleave(S),
            "domain": torch.full((B * S,), domain, dtype=torch.int16),
        }
        for layer, r in routing.items():
            tensors[f"layer{layer}.indices"] = r.indices.to(self._index_dtype)
            tensors[f"layer{layer}.weights"] = r.weights.float()
            tensors[f"layer{layer}.entropy"] = r.entropy.half()
            if self.info.logits:
                if r.logits is None:
                    raise ValueError(f"layer {layer} has no logits but the trace records them")
                tensors[f"layer{layer}.logits"] = r.logits.half()
        self._buffer.append({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        self._buffered += B * S
        self.info.num_sequences += B
        if self._buffered >= self.shard_tokens:
            self._flush()

    def close(
        self,
        expert_max: dict[int, Tensor] | None = None,
        shared_max: dict[int, Tensor] | None = None,
        checks: dict[int, RoutingCheck] | None = None,
    ) -> Trace:
        """Write the last shard, the expert statistics and the manifest, then publish."""
        if self.info.num_sequences == 0:
            self.abort()
            raise ValueError("no tokens were traced: the data is empty; pass data with at least one token")
        self._flush()
        stats = {f"layer{i}.expert_max": t.float().contiguous() for i, t in (expert_max or {}).items()}
        stats |= {
            f"layer{i}.shared_max": t.float().reshape(1).contiguous() for i, t in (shared_max or {}).items()
        }
        save_safetensors(stats, self._staging / STATS)
        self.info.checks = {str(i): asdict(c) for i, c in (checks or {}).items() if c.tokens}
        atomic_write_text(self._staging / MANIFEST, self.info.to_json())
        return Trace(self._output.publish())

    def abort(self) -> None:
        self._output.abort()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()

    def _flush(self) -> None:
        if not self._buffer:
            return
        tensors = {key: torch.cat([part[key] for part in self._buffer]) for key in self._buffer[0]}
        name = f"shard-{len(self.info.shards):05d}.safetensors"
        save_safetensors(tensors, self._staging / name)
        sequences = int(tensors["sequence"].unique().numel())
        self.info.shards.append(ShardInfo(name, self._buffered, sequences))
        self.info.num_tokens += self._buffered
        self._buffer, self._buffered = [], 0


class Trace:
    """A trace directory opened for reading: `info` (the manifest), `shards()`, expert stats."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.exists():
            raise ValueError(f"{self.directory} is not a routing trace (no {MANIFEST}); make one with `moelab trace`")
        data = read_json_object(path, "a trace manifest")
        found = (data.get("format"), data.get("version"))
        if found != (FORMAT, VERSION):
            raise ValueError(
                f"{path}: format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} version {VERSION}; "
                "re-create the trace with this moelab"
            )
        try:
            self.info = TraceInfo.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}; re-create the trace with `moelab trace`") from None
        for shard in self.info.shards:
            file_inside(self.directory, shard.file, path)
        info = self.info
        tokens, sequences = sum(s.tokens for s in info.shards), sum(s.sequences for s in info.shards)
        if (info.num_tokens, info.num_sequences) != (tokens, sequences):
            raise ValueError(
                f"{path}: num_tokens {info.num_tokens} and num_sequences {info.num_sequences}, but its shards hold "
                f"{tokens} tokens in {sequences} sequences; re-create the trace with `moelab trace`"
            )

    def shards(self) -> Iterator[TraceShard]:
        """Yield the shards in order, one in memory at a time."""
        for shard in self.info.shards:
            path = self.directory / shard.file
            if not path.is_file():
                raise ValueError(f"trace shard {path} is missing; re-create the trace with `moelab trace`")
            tensors = load_safetensors(path)
            self._check_shard(path, shard, tensors)
            layers = {
                i: LayerRouting(
                    tensors[f"layer{i}.indices"].long(),
                    tensors[f"layer{i}.weights"],
                    tensors[f"layer{i}.entropy"].float(),
                    tensors[f"layer{i}.logits"].float() if self.info.logits else None,
                )
                for i in self.info.layers
            }
            yield TraceShard(*(tensors[name].long() for name in TOKEN_FIELDS), layers)

    def _check_shard(self, path: Path, shard: ShardInfo, tensors: dict[str, Tensor]) -> None:
        """Every tensor the manifest promises, of its shape (N = shard.tokens: token fields and
        entropy [N], indices and weights [N, K] with K the layer's top_k, logits [N, E]), integer
        ids, with expert indices and domain numbers in range."""
        info = self.info
        N = shard.tokens
        shapes = {name: [N] for name in TOKEN_FIELDS}
        for i, K, E in zip(info.layers, info.top_k, info.num_experts):
            shapes |= {f"layer{i}.indices": [N, K], f"layer{i}.weights": [N, K], f"layer{i}.entropy": [N]}
            if info.logits:
                shapes[f"layer{i}.logits"] = [N, E]
        problems = []
        for name, shape in shapes.items():
            if name not in tensors:
                problems.append(f"no {name}")
            elif list(tensors[name].shape) != shape:
                problems.append(f"{name} has shape {list(tensors[name].shape)}, expected {shape}")
            elif (name in TOKEN_FIELDS or name.endswith(".indices")) and tensors[name].is_floating_point():
                problems.append(f"{name} holds {tensors[name].dtype}, not integers")
        if not problems and shard.tokens:
            if not 0 <= int(tensors["domain"].min()) <= int(tensors["domain"].max()) < len(info.domains):
                problems.append(f"domain numbers outside [0, {len(info.domains)})")
            for i in info.layers:
                indices = tensors[f"layer{i}.indices"]
                if not -1 <= int(indices.min()) <= int(indices.max()) < info.experts_of(i):
                    problems.append(f"layer{i}.indices outside [-1, {info.experts_of(i)})")
        if problems:
            raise ValueError(
                f"trace shard {path} does not match {MANIFEST}: {'; '.join(problems[:3])}; re-create the trace "
                "with `moelab trace`"
            )

    def expert_stats(self) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """({layer: [E] max |down output| per expert}, {layer: [1] same for the shared experts})."""
        path = self.directory / STATS
        if not path.is_file():
            raise ValueError(f"{path} is missing; re-create the trace with `moelab trace`")
        tensors = load_safetensors(path)
        routed = {i: tensors.pop(f"layer{i}.expert_max", None) for i in self.info.layers}
        shared = {i: tensors.pop(f"layer{i}.shared_max") for i in self.info.layers if f"layer{i}.shared_max" in tensors}
        problems = [f"unexpected {name}" for name in sorted(tensors)]
        for i, t in routed.items():
            if t is None:
                problems.append(f"no layer{i}.expert_max")
            elif t.shape != (self.info.experts_of(i),):
                problems.append(f"layer{i}.expert_max has shape {list(t.shape)}, expected [{self.info.experts_of(i)}]")
        problems += [f"layer{i}.shared_max has shape {list(t.shape)}, expected [1]" for i, t in shared.items() if t.shape != (1,)]
        if problems:
            raise ValueError(
                f"{path} does not match {MANIFEST}: {'; '.join(problems[:3])}; re-create the trace with `moelab trace`"
            )
        return routed, shared


def open_trace(directory: str | os.PathLike) -> Trace:
    """Open a trace directory written by `TraceWriter` / `moelab trace`."""
    return Trace(directory)


def is_trace(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()
