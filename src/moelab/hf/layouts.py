"""How a family lays out its MoE tensors on disk, as small decoders over key patterns.

Shape legend: E experts, D model dim, I expert hidden dim, Is shared-expert hidden dim.

Key patterns are relative to a layer's prefix (e.g. "model.layers.3."); "{e}" stands for the
expert index. Every decoder turns what it finds into the view's layout: gate/up `[E, I, D]`,
down `[E, D, I]`, and back: `keys` lists a layer's on-disk keys and `encode` turns view tensors
into them (the writer's half). A `Family` holds the patterns and config keys of one model_type
(the tables are in `moelab.hf.adapters`) and reads one layer at a time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.hf.mtp import MTPModule, find_mtp_modules
from moelab.hf.multimodal import language_renames, language_stem
from moelab.hf.view import (
    DenseLayerView,
    ExpertsView,
    IdentityRows,
    LatentView,
    LayerView,
    MoELayerView,
    NormView,
    RouterMLP,
    RouterView,
    SharedView,
)
from moelab.validation import is_int

Config = dict[str, Any]
_REQUIRED = object()


def config_entry(config: Config, keys: tuple[str, ...], default: Any = _REQUIRED) -> tuple[str, Any]:
    """(key, value) for the first of `keys` in config.json ("a.b" reads a nested dict, "a.0" a list's
    first entry); the default (key "default") if none is set; a CheckpointError if none is set and there
    is no default."""
    for key in keys:
        value = config
        for part in key.split("."):
            value = _entry(value, part)
        if value is not None:
            return key, value
    if default is _REQUIRED:
        raise CheckpointError(f"config.json sets none of {', '.join(keys)}; add the right one for this model")
    return "default", default


def _entry(value: Any, part: str) -> Any:
    """value[part] of a dict, value[int(part)] of a list, None where there is none."""
    if isinstance(value, list) and part.isdigit():
        return value[int(part)] if int(part) < len(value) else None
    return value.get(part) if isinstance(value, dict) else None


def config_value(config: Config, *keys: str, default: Any = _REQUIRED) -> Any:
    return config_entry(config, keys, default)[1]


def config_flag(config: Config, key: str, default: bool) -> bool:
    """A top-level boolean setting as transformers' modules read it (`if config.key:`): its class
    default where absent, false where config.json says null."""
    return bool(config.get(key, default))


def every_layer(config: Config, index: int) -> bool:
    """The default: every decoder layer is sparse."""
    return True


def swiglu(config: Config) -> dict[str, Any]:
    """The default expert settings: gated experts with config.json's hidden_act (silu: SwiGLU)."""
    return {"activation": config_value(config, "hidden_act", default="silu")}


# ----------------------------------------------------------------------------- routers


@dataclass(frozen=True)
class RouterKeys:
    """The router's weight [E, D], and its logit bias [E] / selection-only correction bias [E] /
    per-expert weight scale [E] (Gemma 4) / hash-routing table [V, K] (DeepSeek-V4's tid2eid, integers)
    where the family has one. `optional`: these are on disk only where a model or layer has them
    (moelab's own checkpoints; DeepSeek-V4's correction bias in its learned layers, its table in its
    hash layers); otherwise every named key must be there. `selection_bias_row`: the selection bias
    is stored as one row [1, E] (ERNIE 4.5); `selection_bias_rows`: as the first of that many rows
    [R, E], the others other routers' (ERNIE-4.5-VL's: its text router's, then its vision router's),
    written back as stored. `transposed`: the weight is stored as [D, E] (ERNIE-4.5-VL's releases)."""

    weight: str
    bias: str | None = None
    selection_bias: str | None = None
    optional: bool = False
    selection_bias_row: bool = False
    expert_scale: str | None = None
    token_experts: str | None = None
    selection_bias_rows: int = 1
    transposed: bool = False

    def _named(self) -> dict[str, str | None]:
        return {
            "weight": self.weight, "bias": self.bias, "selection_bias": self.selection_bias,
            "expert_scale": self.expert_scale, "token_experts": self.token_experts,
        }  # fmt: skip

    def _keys(self, ckpt: Checkpoint, prefix: str) -> dict[str, str]:
        return {
            name: key
            for name, key in self._named().items()
            if key is not None and (name == "weight" or not self.optional or prefix + key in ckpt)
        }

    def read(self, ckpt: Checkpoint, prefix: str) -> dict[str, Tensor]:
        out = {name: ckpt.get(prefix + key) for name, key in self._keys(ckpt, prefix).items()}
        if self.transposed:
            out["weight"] = out["weight"].T
        if self.selection_bias_row and "selection_bias" in out:
            rows = out["selection_bias"]
            if rows.dim() != 2 or rows.shape[0] != self.selection_bias_rows:
                raise CheckpointError(
                    f"{ckpt.directory}: {prefix}{self.selection_bias} has shape {list(rows.shape)}, expected "
                    f"{self.selection_bias_rows} row(s) [{self.selection_bias_rows}, experts]"
                )
            out["selection_bias"] = rows[0]
        return out

    def keys(self, ckpt: Checkpoint, prefix: str) -> list[str]:
        return [prefix + key for key in self._keys(ckpt, prefix).values()]

    def encode(self, router: RouterView, prefix: str, stored: Checkpoint | None = None) -> dict[str, Tensor]:
        """router -> on-disk tensors; a bias key the view has no tensor for gets zeros, an
        expert-scale key ones. stored: the source checkpoint, whose other routers' selection-bias rows
        are written back beside the router's (`selection_bias_rows`)."""
        for name in ("bias", "selection_bias", "expert_scale", "token_experts"):
            if getattr(router, name) is not None and getattr(self, name) is None:
                raise CheckpointError(
                    f"the edited router has a {name}, but this family's router has none on disk; "
                    f"set the view's {name} to None (or fold it away) before writing"
                )
        ones = router.weight.new_ones(router.num_experts)
        out = {
            prefix + key: (
                ones if name == "expert_scale" and router.expert_scale is None
                else _or_zeros(router.with_identity_rows(name), router.weight, router.num_choices)
            )
            for name, key in self._named().items()
            if key is not None and (not self.optional or getattr(router, name) is not None)
        }
        if self.transposed:
            out[prefix + self.weight] = out[prefix + self.weight].T.contiguous()
        if self.selection_bias_row and prefix + self.selection_bias in out:
            row = out[prefix + self.selection_bias][None]
            if self.selection_bias_rows > 1:
                if stored is None:
                    raise CheckpointError(
                        f"{prefix}{self.selection_bias} holds other routers' rows too; pass the source checkpoint"
                    )
                others = stored.get(prefix + self.selection_bias)[1:]
                row = torch.cat([row.to(others.dtype), others])
            out[prefix + self.selection_bias] = row
        return out


@dataclass(frozen=True)
class RouterMLPKeys:
    """The MLP a router reads x through (ZAYA's, `RouterMLP`), under `stem`: down_proj.weight [R, D]
    and .bias, the state scale (`state_scale`, [R]; stored in the layers that read the state, every
    ZAYA layer but the first), the norm's weight [R], fc1 and fc2 weights [R, R] and biases; the
    norm's eps from config.json (`eps`, `config_value` keys). The writer copies them unchanged."""

    stem: str
    state_scale: str
    norm: str
    fc1: str
    fc2: str
    eps: tuple[str, ...] = ("rms_norm_eps",)

    def read(self, ckpt: Checkpoint, prefix: str, config: Config) -> RouterMLP:
        root = prefix + self.stem
        get = lambda key: ckpt.get(root + key)  # noqa: E731
        scale = root + self.state_scale
        return RouterMLP(
            down=get("down_proj.weight"), down_bias=get("down_proj.bias"),
            norm=NormView(get(self.norm + ".weight"), config_value(config, *self.eps, default=1e-5)),
            fc1=get(self.fc1 + ".weight"), fc1_bias=get(self.fc1 + ".bias"),
            fc2=get(self.fc2 + ".weight"), fc2_bias=get(self.fc2 + ".bias"),
            state_scale=ckpt.get(scale) if scale in ckpt else None,
        )  # fmt: skip


# ----------------------------------------------------------------------------- routed experts


@dataclass(frozen=True)
class ExpertPart:
    """One stored tensor of an expert, or entry `row` of a stacked one, that holds `part` of it
    in `SwiGLUExperts`' layout (plain experts: `MLPExperts`'), same orientation: "gate", "up" ([I, D]
    each), "gate_up" ([2I, D], gate rows first) or "down" ([D, I]). A layout whose experts are stored this way (no
    transposes, no interleaving, no biases) offers `parts(ckpt, prefix, expert)`, so that an expert
    can be read straight into a slot of stacked experts (`moelab.offload`)."""

    name: str
    row: int | None
    part: str


@dataclass(frozen=True)
class PerExpert:
    """One matrix per expert and projection, as default `save_pretrained` writes them:
    gate, up: [I, D] each; down: [D, I]. gate None: plain experts (Nemotron-H: up and down only).
    padded: gate and up may also be stored for the router's identity experts, past the E experts
    (`stored_padding`; transformers' LongCat-Flash sizes its gate_up for E + Z and never reads those).
    blocks: how many MoE blocks' experts the stored list holds, in equal numbers one block after the
    other, this block's first (ERNIE-4.5-VL: its text experts 0..E-1, then its vision experts E..2E-1,
    as transformers splits them); the others are neither read nor written."""

    gate: str | None
    up: str
    down: str
    padded: bool = False
    blocks: int = 1

    def _patterns(self) -> tuple[tuple[str, str], ...]:
        named = (("gate", self.gate), ("up", self.up), ("down", self.down))
        return tuple((name, pattern) for name, pattern in named if pattern is not None)

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.up.format(e=0) in ckpt

    def read(self, ckpt: Checkpoint, prefix: str, config: Config, experts: range | None = None) -> dict[str, Tensor]:
        if experts is None:
            experts = self._own(ckpt, prefix)
        stacked = {
            name: _stack(ckpt, [prefix + pattern.format(e=e) for e in experts]) for name, pattern in self._patterns()
        }
        return {"gate": None, **stacked}

    def parts(self, ckpt: Checkpoint, prefix: str, expert: int) -> list[ExpertPart]:
        """Where expert `expert`'s weights lie, as the stacked experts lay them out (`ExpertPart`)."""
        return [ExpertPart(prefix + pattern.format(e=expert), None, part) for part, pattern in self._patterns()]

    def _own(self, ckpt: Checkpoint, prefix: str) -> range:
        """This block's experts among those stored (see `blocks`; `padded`: counted by their down
        projections, gate and up going on past them)."""
        counted = self.down if self.padded else self.up
        keys = [key for key in ckpt.keys() if key.startswith(prefix)]  # one pass over a checkpoint's 100k names
        found = expert_indices(ckpt, prefix + counted, keys)
        if found != list(range(len(found))) or len(found) % self.blocks:
            whose = "" if self.blocks == 1 else f" of {self.blocks} blocks, in equal numbers"
            raise CheckpointError(
                f"{ckpt.directory}: experts under {prefix}{counted} are numbered {found}; expected 0..E-1{whose} "
                "(renumber the experts and slice the router rows to match)"
            )
        # every matrix stored for the same experts (gate and up past them alike where padded)
        alike = [(self.up, self.gate)] + ([] if self.padded else [(self.up, self.down)])
        for pattern, other in [(one, two) for one, two in alike if two is not None]:
            ours, theirs = (set(expert_indices(ckpt, prefix + p, keys)) for p in (other, pattern))
            if ours != theirs:
                e = min(ours ^ theirs)
                has, lacks = (other, pattern) if e in ours else (pattern, other)
                raise CheckpointError(
                    f"{ckpt.directory}: {prefix}{has.format(e=e)} is stored but {prefix}{lacks.format(e=e)} is not: "
                    "a stray or missing tensor; re-download the checkpoint, or remove the stray tensor"
                )
        return range(len(found) // self.blocks)

    def other_block_keys(self, ckpt: Checkpoint, prefix: str) -> list[str]:
        """The stored tensors of the other blocks' experts (`blocks`: ERNIE-4.5-VL's vision experts),
        which this layout neither reads nor writes."""
        own = self._own(ckpt, prefix)
        return [prefix + pattern.format(e=e) for _, pattern in self._patterns() for e in range(len(own), self.blocks * len(own))]

    def keys(self, ckpt: Checkpoint, prefix: str) -> list[str]:
        own = self._own(ckpt, prefix)
        padding = range(len(own), len(own) + self.stored_padding(ckpt, prefix))  # the identity experts' gate and up
        return [
            prefix + pattern.format(e=e)
            for name, pattern in self._patterns()
            for e in (own if name == "down" else [*own, *padding])
        ]

    def stored_padding(self, ckpt: Checkpoint, prefix: str) -> int:
        """How many gate and up entries are stored past the experts' (0 unless `padded`)."""
        if not self.padded:
            return 0
        return len(expert_indices(ckpt, prefix + self.up)) - len(expert_indices(ckpt, prefix + self.down))

    def encode(self, experts: ExpertsView, prefix: str, padding: int = 0) -> dict[str, Tensor]:
        """experts -> on-disk tensors; padding: gate and up entries of zeros past them (`padded`)."""
        _no_biases(experts, "per-expert")
        _same_gating(experts, self.gate is not None)
        E = experts.num_experts
        pad = experts.up.new_zeros(experts.up.shape[1:]) if padding else None  # gate and up alike: [I, D]
        return {
            prefix + pattern.format(e=e): t.clone()  # clone: safetensors refuses views of one storage
            for name, pattern in self._patterns()
            for e, t in enumerate(getattr(experts, name))
        } | {
            prefix + pattern.format(e=E + j): pad
            for name, pattern in self._patterns() if name != "down"
            for j in range(padding)
        }  # fmt: skip


@dataclass(frozen=True)
class FusedGateUp:
    """transformers' in-memory layout (`save_original_format=False`; Granite on disk; moelab's
    own): gate_up: [E, 2I, D], gate rows first; down: [E, D, I]; optional gate_up_bias [E, 2I]
    (split the same way) and down_bias [E, D], where present on disk. padded: gate_up may hold
    entries past the E experts (see `PerExpert`), none read. interleaved: gate_up's rows alternate
    gate, up (Inkling 2's w13_weight as released)."""

    gate_up: str
    down: str
    gate_up_bias: str | None = None
    down_bias: str | None = None
    padded: bool = False
    interleaved: bool = False

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.gate_up in ckpt

    def read(self, ckpt: Checkpoint, prefix: str, config: Config, experts: range | None = None) -> dict[str, Tensor]:
        down = ckpt.get(prefix + self.down, experts)
        if self.padded and experts is None:
            experts = range(down.shape[0])
        gate, up = _halves(ckpt.get(prefix + self.gate_up, experts), dim=1, interleaved=self.interleaved)
        out = {"gate": gate, "up": up, "down": down}
        if self.gate_up_bias is not None and prefix + self.gate_up_bias in ckpt:
            out["gate_bias"], out["up_bias"] = _halves(ckpt.get(prefix + self.gate_up_bias, experts), 1, self.interleaved)
        if self.down_bias is not None and prefix + self.down_bias in ckpt:
            out["down_bias"] = ckpt.get(prefix + self.down_bias, experts)
        return out

    def parts(self, ckpt: Checkpoint, prefix: str, expert: int) -> list[ExpertPart] | None:
        """Where expert `expert`'s weights lie (`ExpertPart`); None where biases are stored too or gate_up
        is interleaved."""
        if self.interleaved or any(name is not None and prefix + name in ckpt for name in (self.gate_up_bias, self.down_bias)):
            return None
        return [ExpertPart(prefix + self.gate_up, expert, "gate_up"), ExpertPart(prefix + self.down, expert, "down")]

    def keys(self, ckpt: Checkpoint, prefix: str) -> list[str]:
        names = (self.gate_up, self.down, self.gate_up_bias, self.down_bias)
        return [prefix + name for name in names if name is not None and prefix + name in ckpt]

    def stored_padding(self, ckpt: Checkpoint, prefix: str) -> int:
        """How many gate_up entries are stored past the experts' (0 unless `padded`)."""
        if not self.padded:
            return 0
        return ckpt.shape(prefix + self.gate_up)[0] - ckpt.shape(prefix + self.down)[0]

    def encode(self, experts: ExpertsView, prefix: str, padding: int = 0) -> dict[str, Tensor]:
        """experts -> on-disk tensors; padding: gate_up entries of zeros past them (`padded`)."""
        _same_gating(experts, gated=True)
        gate_up = _join(experts.gate, experts.up, self.interleaved, dim=1)
        out = {
            prefix + self.gate_up: torch.cat([gate_up, gate_up.new_zeros(padding, *gate_up.shape[1:])]),
            prefix + self.down: experts.down.contiguous(),
        }
        if _has_bias(experts):
            if self.gate_up_bias is None:
                _no_biases(experts, "fused")
            gate_bias, up_bias, down_bias = _biases(experts)
            out[prefix + self.gate_up_bias] = _join(gate_bias, up_bias, self.interleaved, dim=1)
            out[prefix + self.down_bias] = down_bias
        return out


@dataclass(frozen=True)
class StackedUpDown:
    """Experts stacked one tensor per projection: plain ones (Nemotron-H's in-memory layout,
    `save_original_format=False`; moelab's `MLPExperts`): up: [E, I, D]; down: [E, D, I]; optional
    up_bias [E, I] and down_bias [E, D], where present on disk. With `gate` [E, I, D]: gated experts
    (Step 3.7 on disk)."""

    up: str
    down: str
    up_bias: str | None = None
    down_bias: str | None = None
    gate: str | None = None

    def _biases(self, ckpt: Checkpoint, prefix: str) -> dict[str, str]:
        names = {"up_bias": self.up_bias, "down_bias": self.down_bias}
        return {name: key for name, key in names.items() if key is not None and prefix + key in ckpt}

    def _projections(self) -> dict[str, str]:
        return {name: key for name, key in (("gate", self.gate), ("up", self.up), ("down", self.down)) if key}

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.up in ckpt

    def read(self, ckpt: Checkpoint, prefix: str, config: Config, experts: range | None = None) -> dict[str, Tensor]:
        names = self._projections() | self._biases(ckpt, prefix)
        return {"gate": None} | {name: ckpt.get(prefix + key, experts) for name, key in names.items()}

    def parts(self, ckpt: Checkpoint, prefix: str, expert: int) -> list[ExpertPart] | None:
        """Where expert `expert`'s weights lie (`ExpertPart`); None where biases are stored too."""
        if self._biases(ckpt, prefix):
            return None
        return [ExpertPart(prefix + key, expert, name) for name, key in self._projections().items()]

    def keys(self, ckpt: Checkpoint, prefix: str) -> list[str]:
        names = (*self._projections().values(), *self._biases(ckpt, prefix).values())
        return [prefix + key for key in names]

    def encode(self, experts: ExpertsView, prefix: str) -> dict[str, Tensor]:
        _same_gating(experts, gated=self.gate is not None)
        out = {prefix + key: getattr(experts, name).contiguous() for name, key in self._projections().items()}
        if _has_bias(experts):
            if self.up_bias is None or self.down_bias is None:
                _no_biases(experts, "stacked")
            _, up_bias, down_bias = _biases(experts)
            out |= {prefix + self.up_bias: up_bias, prefix + self.down_bias: down_bias}
        return out


@dataclass(frozen=True)
class TransposedGateUp:
    """Fused and transposed (GPT-OSS, Llama 4): gate_up: [E, D, 2I]; down: [E, I, D].
    `interleaved`: gate = [..., ::2], up = [..., 1::2] (GPT-OSS); else gate is the first half.
    Optional biases: gate_up_bias [E, 2I] (split the same way) and down_bias [E, D]."""

    gate_up: str
    down: str
    interleaved: bool
    gate_up_bias: str | None = None
    down_bias: str | None = None

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.gate_up in ckpt

    def read(self, ckpt: Checkpoint, prefix: str, config: Config, experts: range | None = None) -> dict[str, Tensor]:
        out = self.decode(ckpt.get(prefix + self.gate_up, experts), ckpt.get(prefix + self.down, experts))
        if self.gate_up_bias is not None:
            out["gate_bias"], out["up_bias"] = _halves(
                ckpt.get(prefix + self.gate_up_bias, experts), dim=1, interleaved=self.interleaved
            )
        if self.down_bias is not None:
            out["down_bias"] = ckpt.get(prefix + self.down_bias, experts)
        return out

    def decode(self, gate_up: Tensor, down: Tensor) -> dict[str, Tensor]:
        """gate_up [E, D, 2I] and down [E, I, D] as stored -> the view's gate, up [E, I, D] and down [E, D, I]."""
        gate, up = _halves(gate_up, dim=2, interleaved=self.interleaved)
        return {"gate": gate.transpose(1, 2), "up": up.transpose(1, 2), "down": down.transpose(1, 2)}

    def keys(self, ckpt: Checkpoint, prefix: str) -> list[str]:
        names = (self.gate_up, self.down, self.gate_up_bias, self.down_bias)
        return [prefix + name for name in names if name is not None]

    def encode(self, experts: ExpertsView, prefix: str) -> dict[str, Tensor]:
        _same_gating(experts, gated=True)
        gate_up = _join(experts.gate.transpose(1, 2), experts.up.transpose(1, 2), self.interleaved)
        out = {prefix + self.gate_up: gate_up, prefix + self.down: experts.down.transpose(1, 2).contiguous()}
        if self.gate_up_bias is None and self.down_bias is None:
            _no_biases(experts, "transposed")
            return out
        gate_bias, up_bias, down_bias = _biases(experts)
        out[prefix + self.gate_up_bias] = _join(gate_bias, up_bias, self.interleaved)
        out[prefix + self.down_bias] = down_bias
        return out


@dataclass(frozen=True)
class FlatExperts:
    """DBRX: gate, up and down each flattened to [E*I, D]; down is stored un-transposed
    (expert e's down matrix is rows e*I..(e+1)*I, transposed). I comes from `hidden_dim_key`."""

    gate: str
    up: str
    down: str
    hidden_dim_key: str

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.gate in ckpt

    def read(self, ckpt: Checkpoint, prefix: str, config: Config, experts: range | None = None) -> dict[str, Tensor]:
        I = config_value(config, self.hidden_dim_key)
        rows = None if experts is None else range(experts.start * I, experts.stop * I)
        out = {}
        for name, key in (("gate", self.gate), ("up", self.up), ("down", self.down)):
            flat = ckpt.get(prefix + key, rows)
            if flat.dim() != 2 or flat.shape[0] % I:
                raise CheckpointError(
                    f"{ckpt.directory}: {prefix}{key} has shape {list(flat.shape)}, expected "
                    f"[experts * {I}, dim] ({self.hidden_dim_key}={I} in config.json)"
                )
            out[name] = flat.view(-1, I, flat.shape[1])
        out["down"] = out["down"].transpose(1, 2)
        return out

    def keys(self, ckpt: Checkpoint, prefix: str) -> list[str]:
        return [prefix + name for name in (self.gate, self.up, self.down)]

    def encode(self, experts: ExpertsView, prefix: str) -> dict[str, Tensor]:
        _no_biases(experts, "flattened")
        _same_gating(experts, gated=True)
        E, I, D = experts.gate.shape
        return {
            prefix + self.gate: experts.gate.reshape(E * I, D).clone(),
            prefix + self.up: experts.up.reshape(E * I, D).clone(),
            prefix + self.down: experts.down.transpose(1, 2).reshape(E * I, D).clone(),
        }


ExpertsLayout = PerExpert | FusedGateUp | StackedUpDown | TransposedGateUp | FlatExperts


# ----------------------------------------------------------------------------- shared experts


@dataclass(frozen=True)
class SharedMLP:
    """gate, up: [Is, D]; down: [D, Is]; optional sigmoid_gate: [1, D] (Qwen2-MoE; on disk only
    where a model has one if `optional_gate`, as in moelab's own checkpoints). gate None: a plain
    MLP, up and down only (Nemotron-H)."""

    gate: str | None
    up: str
    down: str
    sigmoid_gate: str | None = None
    optional_gate: bool = False

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.up in ckpt

    def partly_present(self, ckpt: Checkpoint, prefix: str) -> bool:
        """Whether some but not all of gate, up and down are stored under these names (a layout of the
        same family that names them otherwise: Hunyuan 4's linear_gate on disk, gate_proj in memory)."""
        found = [prefix + key in ckpt for key in (self.gate, self.up, self.down) if key is not None]
        return any(found) and not all(found)

    def read(self, ckpt: Checkpoint, prefix: str) -> dict[str, Tensor]:
        keys = (("gate", self.gate), ("up", self.up), ("down", self.down))
        out = {name: None if key is None else ckpt.get(prefix + key) for name, key in keys}
        if self.sigmoid_gate is not None and (not self.optional_gate or prefix + self.sigmoid_gate in ckpt):
            out["sigmoid_gate"] = ckpt.get(prefix + self.sigmoid_gate)
        return out

    def encode(self, shared: SharedView, prefix: str) -> dict[str, Tensor]:
        if (shared.gate is None) != (self.gate is None):
            kinds = {True: "a plain MLP (no gate projection)", False: "a gated MLP"}
            raise CheckpointError(
                f"the shared experts are {kinds[shared.gate is None]}, but this family's are {kinds[self.gate is None]}"
            )
        out = {prefix + self.up: shared.up, prefix + self.down: shared.down}
        if self.gate is not None:
            out[prefix + self.gate] = shared.gate
        if shared.sigmoid_gate is not None:
            if self.sigmoid_gate is None:
                raise CheckpointError("the shared experts have a sigmoid gate, but this family's have none")
            out[prefix + self.sigmoid_gate] = shared.sigmoid_gate
        elif self.sigmoid_gate is not None and not self.optional_gate:
            raise CheckpointError("this family's shared experts have a sigmoid gate; the view has none")
        return {key: t.contiguous() for key, t in out.items()}


@dataclass(frozen=True)
class SharedFusedMLP:
    """Granite: gate_up: [2Is, D], gate rows first; down: [D, Is]."""

    gate_up: str
    down: str

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.gate_up in ckpt

    def read(self, ckpt: Checkpoint, prefix: str) -> dict[str, Tensor]:
        gate, up = _halves(ckpt.get(prefix + self.gate_up), dim=0, interleaved=False)
        return {"gate": gate, "up": up, "down": ckpt.get(prefix + self.down)}


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class LatentKeys:
    """A latent MoE block's projections (`LatentView`): down [L, D], up [D, L]."""

    down: str
    up: str

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return prefix + self.down in ckpt

    def read(self, ckpt: Checkpoint, prefix: str) -> dict[str, Tensor]:
        return {"down": ckpt.get(prefix + self.down), "up": ckpt.get(prefix + self.up)}


@dataclass(frozen=True)
class NormKeys:
    """The RMS norms around an MoE block's router and experts (`NormView`), those the family has:
    the weights of the router's input norm [D] (times D^-0.5: Gemma 4's router.scale), of the
    experts' input norm ([D], or [L] in a latent block: Muse Spark's pre_expert_norm), of their
    summed output's [D] (Gemma 4) and of each expert's output, before its weight ([D or L], scaled
    first: Muse Spark's post_expert_norm, `ExpertsView.output_norm`); eps, output_eps: the config
    keys of their epsilon (output_eps: the experts' output norm's), eps_default, output_eps_default:
    the family's class defaults where config.json leaves them out. unit_offset: the norms scale by
    1 + the stored weight (Muse Spark's; computed in the stored dtype, as transformers does). Written
    unchanged (not per expert)."""

    router: str | None = None
    experts: str | None = None
    routed: str | None = None
    expert_output: str | None = None
    eps: tuple[str, ...] = ("rms_norm_eps",)
    output_eps: tuple[str, ...] = ("post_norm_eps",)
    eps_default: float = 1e-6
    output_eps_default: float = 1e-8
    unit_offset: bool = False

    def read(self, ckpt: Checkpoint, prefix: str, config: Config) -> dict[str, NormView]:
        """{"router": its input norm, "experts": their input norm, "routed": the sum's norm,
        "expert_output": each expert's output norm}, those the family has."""
        eps = float(config_value(config, *self.eps, default=self.eps_default))
        out = {name: NormView(self._weight(ckpt, prefix + key), eps) for name, key in (
            ("experts", self.experts), ("routed", self.routed)) if key is not None}  # fmt: skip
        if self.router is not None:
            router = self._weight(ckpt, prefix + self.router)
            out["router"] = NormView(router, eps, multiplier=router.shape[0] ** -0.5)
        if self.expert_output is not None:
            out["expert_output"] = self.read_expert_output(ckpt, prefix, config)
        return out

    def read_expert_output(self, ckpt: Checkpoint, prefix: str, config: Config) -> NormView | None:
        """The experts' output norm (`ExpertsView.output_norm`), None where the family has none."""
        if self.expert_output is None:
            return None
        eps = float(config_value(config, *self.output_eps, default=self.output_eps_default))
        return NormView(self._weight(ckpt, prefix + self.expert_output), eps, scale_first=True)

    def _weight(self, ckpt: Checkpoint, key: str) -> Tensor:
        weight = ckpt.get(key)
        return weight + 1 if self.unit_offset else weight


@dataclass(frozen=True)
class Layout:
    """One on-disk layout of a family's MoE block. The shared experts and the latent projections
    are read where the checkpoint has them (a Granite-MoE-Shared config may set the shared width to
    0; a Nemotron-H one has latent projections where it sets moe_latent_size); norms: the norms
    around the router and experts, where the family has them (Gemma 4); output_bias: the block's
    bias [D] added to its output whatever the routing (JetMoE's mlp.bias), read as
    `MoELayerView.output_bias` and copied unchanged by the writer (it is not per expert);
    router_mlp: the MLP the router reads x through (ZAYA's, `RouterMLPKeys`), where it has one."""

    router: RouterKeys
    experts: ExpertsLayout
    shared: SharedMLP | SharedFusedMLP | None = None
    latent: LatentKeys | None = None
    norms: NormKeys | None = None
    output_bias: str | None = None
    router_mlp: RouterMLPKeys | None = None

    @property
    def padded(self) -> bool:
        """Whether the experts may be stored with gate and up past them for the router's identity
        experts (`PerExpert.padded`, `FusedGateUp.padded`)."""
        return isinstance(self.experts, (PerExpert, FusedGateUp)) and self.experts.padded

    def stored_padding(self, ckpt: Checkpoint, prefix: str) -> int:
        """Gate and up entries stored past the experts' for the router's identity experts (`padded`)."""
        return self.experts.stored_padding(ckpt, prefix) if self.padded else 0

    def encode(self, layer: MoELayerView, prefix: str, stored: Checkpoint, padding: int = 0) -> dict[str, Tensor]:
        """The block's router and routed experts -> on-disk tensors (stored: the source checkpoint,
        see `RouterKeys.encode`; padding: see `stored_padding`)."""
        experts = self.experts.encode(layer.experts, prefix, padding) if padding else self.experts.encode(layer.experts, prefix)
        return self.router.encode(layer.router, prefix, stored) | experts


@dataclass(frozen=True)
class Family:
    """Everything moelab knows about one model_type.

    layouts: the on-disk layouts, tried in order (the first whose experts are present wins).
    num_experts: config keys for E, first present wins.
    router_settings(config): the RouterView fields besides tensors (score_func, top_k, ...).
    is_moe_layer(config, i): whether the config makes layer i sparse (checked against the
        checkpoint); None: layers with a router on disk are sparse (the structural fallback).
    expert_settings(config): the ExpertsView fields besides tensors (activation, ...).
    layer_activations(config, i): where a layer's experts compute otherwise than the model's, the
        ExpertsView and SharedView settings of layer i (Step 3.7's bounded layers), else None.
    expert_width: config keys for the routed experts' hidden width I (what the writer edits
        when experts get narrower).
    shared_width_follows: the shared experts' width is computed from the same key (DeepSeek:
        n_shared_experts x moe_intermediate_size; Llama 4: intermediate_size), so routed experts
        cannot get narrower alone.
    dense_width_follows: the dense layers' MLPs take their width from the same key (Jamba:
        intermediate_size), so routed experts cannot get narrower alone in a model with dense layers.
    selection_bias_flag: the config flag without which the family's modules hold no selection
        bias (LFM2-MoE: use_expert_bias); a bias on disk with the flag false is refused, since
        transformers would not read it.
    stored_renames: (in memory, on disk) parts of the names of tensors outside the MoE blocks
        that transformers renames when it loads the family (its conversion mapping), for the
        runs that load them by name (layer by layer, offloaded).
    stored_splits: (in-memory name parts, the on-disk part) of tensors stored fused that
        transformers splits along their first dim on loading (Sarvam-MoE: attention.query_key_value
        into self_attn.q_proj, k_proj and v_proj), for the same runs: each part is read as its rows.
    stored_shards: (in-memory name part, the on-disk part with "*" for the shard number 0, 1, ..., or
        a tuple of the on-disk parts) of tensors stored as shards that transformers concatenates along
        their first dim on loading (Qwen4-Exp: ple_embedding.ngram_embedding.weight [V, d] from
        ngram_embedding.shard_{i}.weight [V / split_ngram_parts, d]; Kimi-Linear: self_attn.conv1d
        from self_attn.q_conv1d, k_conv1d and v_conv1d), for the same runs: read as the shards one
        after the other.
    mtp_prefix: where multi-token prediction layers may be stored that transformers does not build
        and moelab does not run (Nemotron-H's); the writer leaves out those with routed experts.
    mtp: the multi-token prediction layers with routed experts a checkpoint stores in a way moelab
        runs (`moelab.hf.mtp`; set per checkpoint by `with_mtp`), edited with the other layers.
    original_prefix: what default `save_pretrained` writes in place of the model's "model."
        (Nemotron-H: "backbone."; Mistral Large 4: "", its language model at the root); a
        checkpoint whose decoder layers are stored so gets it in layer_prefix and stored_renames
        (`stored_as`, after the family's own), one saved with `save_original_format=False` keeps "model.".
    block_returns: what the family's MoE block module returns in memory: "tensor" (y), "tuple"
        (y, router output: GPT-OSS, Llama 4), "moelab" (y, MoEResult), "flat" (y [T * D], router
        logits [T * E], both flattened, of x [..., D]: ERNIE-4.5-VL's text_moe) or "router_states"
        (y, the router state it hands the next layer: ZAYA's block(x, the previous layer's state)).
    block_output_norm: the module of transformers' MoE block that normalises the block's output
        (routed plus shared experts) before it returns it (A.X K1: post_mlp_layernorm). The view
        reads the block up to it (what compression scores); the runs that swap transformers'
        block for moelab's keep it (`moelab.hf.layerwise.MoEBlock`).
    layer_returns_tuple: its decoder layers return a tuple whose first item is the hidden states
        (moelab) rather than the hidden states alone (transformers 5).
    inline_routed_norm: the family's decoder layer holds its router and experts itself, with no MoE
        block module around them, and norms the experts' sum with this module of its own (Gemma 4:
        post_feedforward_layernorm_2); the runs that put moelab's layer in its place swap the
        router, the experts and that norm (`moelab.hf.layerwise.install_moe`).
    hash_routed(config, i): whether the config makes layer i hash-routed (DeepSeek-V4's "hash_moe"
        layers, whose router stores the table `RouterKeys.token_experts`); checked against the
        checkpoint. None: no layer is.
    loads_multimodal: transformers maps the names a multimodal release stores (MiniMax-M3-VL's
        block_sparse_moe, per-expert w1/w3/w2) only through the vision-language model's conversion
        mapping, so such a checkpoint loads as that model (`moelab.hf.loading`), not as its language
        model's causal LM (the layer-by-layer and offloaded runs read the names themselves).
    moe_block: the decoder layer's module that is its MoE block, where a search by name and shape
        (`moelab.hf.modules.find_moe_modules`) would also find another (JetMoE: mlp, beside its
        mixture of attention heads, self_attention.experts, with a router of its own).
    expert_count_shared_with: what else the config's expert count (`num_experts`) sizes, where
        something outside the MoE block reads it too (JetMoE's attention experts): the writer then
        refuses edits that change the count (pruning, merging) and writes those that keep it.
    vision_block: the decoder layer's module that runs its image and video tokens alone, beside the MoE
        block (ERNIE-4.5-VL's vision experts and router, mlp.vision_moe): the runs on text leave its
        tensors unread and put a stand-in that refuses to run in its place; the writer copies them.
    routed_elsewhere: tensors of a decoder layer (names under its prefix) that are another module's
        routed experts, [E, ...] of which each token runs the MoE block's top_k (JetMoE's attention
        experts): a parameter count takes top_k / E of them as active, as it takes the MoE block's.
    identity_experts(config): Z, the zero-computation experts the router also chooses among
        (LongCat-Flash's zero_expert_num): its last Z rows, read as `RouterView.identity`. None: none.
    identity_returns: what a slot on one of them adds (`IdentityRows.returns`): "input" (LongCat-Flash's
        identity experts), "zero" (ZAYA's skip expert).
    identity_selection_bias: the value transformers gives the identity experts' selection bias when
        it loads the family, whatever the checkpoint stores (ZAYA's skip expert: -1, set again by
        `ZayaPreTrainedModel._init_weights`); a checkpoint storing another is refused. None: as stored.
    """

    name: str
    layouts: tuple[Layout, ...]
    num_experts: tuple[str, ...]
    router_settings: Callable[[Config], dict[str, Any]]
    is_moe_layer: Callable[[Config, int], bool] | None = every_layer
    expert_settings: Callable[[Config], dict[str, Any]] = swiglu
    layer_activations: Callable[[Config, int], tuple[dict[str, Any], dict[str, Any]] | None] | None = None
    layer_prefix: str = "model.layers.{n}."
    num_layers: tuple[str, ...] = ("num_hidden_layers",)
    hidden_size: tuple[str, ...] = ("hidden_size",)
    expert_width: tuple[str, ...] = ("intermediate_size",)
    shared_width_follows: bool = False
    dense_width_follows: bool = False
    selection_bias_flag: str | None = None
    stored_renames: tuple[tuple[str, str], ...] = ()
    stored_splits: tuple[tuple[tuple[str, ...], str], ...] = ()
    stored_shards: tuple[tuple[str, str | tuple[str, ...]], ...] = ()
    mtp_prefix: str | None = "mtp.layers.{n}."
    mtp: tuple[MTPModule, ...] = ()
    original_prefix: str | None = None
    block_returns: str = "tensor"
    block_output_norm: str | None = None
    layer_returns_tuple: bool = False
    inline_routed_norm: str | None = None
    hash_routed: Callable[[Config, int], bool] | None = None
    loads_multimodal: bool = False
    moe_block: str | None = None
    expert_count_shared_with: str | None = None
    vision_block: str | None = None
    routed_elsewhere: tuple[str, ...] = ()
    identity_experts: Callable[[Config], int] | None = None
    identity_returns: str = "input"
    identity_selection_bias: float | None = None

    def layer_count(self, config: Config) -> int:
        """The number of decoder layers: the first of `num_layers` set, or the length of a
        per-layer list or pattern there (Nemotron-H's layers_block_type, hybrid_override_pattern)."""
        count = config_value(config, *self.num_layers)
        return len(count) if isinstance(count, (list, str)) else count

    def stored_as(self, ckpt: Checkpoint) -> Family:
        """This family with the names `ckpt` stores its tensors under (see `original_prefix`; a
        multimodal checkpoint's language model: `moelab.hf.multimodal.language_stem`)."""
        stem, n, rest = self.layer_prefix.partition("{n}")
        prefix = self.original_prefix
        if prefix is not None and any(key.startswith(stem.replace("model.", prefix, 1)) for key in ckpt.keys()):
            return dataclasses.replace(
                self,
                layer_prefix=self.layer_prefix.replace("model.", prefix, 1),
                stored_renames=(*self.stored_renames, ("model.", prefix)),
            )
        stored = language_stem(ckpt.keys(), stem)
        if stored == stem:
            return self
        return dataclasses.replace(
            self, layer_prefix=stored + n + rest, stored_renames=(*language_renames(stored), *self.stored_renames)
        )

    def moe_layers(self, ckpt: Checkpoint, config: Config) -> list[int]:
        """The indices of the layers with routed experts on disk."""
        return [i for i in range(self.layer_count(config)) if self.layout_of(ckpt, i) is not None]

    def with_mtp(self, ckpt: Checkpoint, config: Config) -> Family:
        """This family with `ckpt`'s multi-token prediction layers that have routed experts (`mtp`)."""
        found = find_mtp_modules(ckpt, self.layer_prefix, self.layer_count(config), config.get("num_nextn_predict_layers"))
        with_experts = tuple(m for m in found if self._layout_at(ckpt, m.block) is not None)
        return dataclasses.replace(self, mtp=with_experts) if with_experts else self

    @property
    def mtp_layers(self) -> list[int]:
        """The layer numbers of the multi-token prediction layers (`mtp`)."""
        return [module.index for module in self.mtp]

    def prefix(self, index: int) -> str:
        """The prefix of layer `index`'s tensors (a multi-token prediction layer's block)."""
        return next((m.block for m in self.mtp if m.index == index), None) or self.layer_prefix.format(n=index)

    def layout_of(self, ckpt: Checkpoint, index: int) -> Layout | None:
        """The layout layer `index`'s experts are stored in, None if it has no experts."""
        return self._layout_at(ckpt, self.prefix(index))

    def _layout_at(self, ckpt: Checkpoint, prefix: str) -> Layout | None:
        """The first layout whose experts are stored under `prefix` and whose shared experts' names, if
        any of them is stored, all are."""
        return next((lay for lay in self.layouts if lay.experts.present(ckpt, prefix) and not (
            isinstance(lay.shared, SharedMLP) and lay.shared.partly_present(ckpt, prefix))), None)  # fmt: skip

    def read_layer(
        self, ckpt: Checkpoint, config: Config, index: int, experts_from: Checkpoint | None = None
    ) -> LayerView:
        """Layer `index`'s view; experts_from: read the routed experts from this checkpoint instead
        (a shapes-only one: meta tensors, nothing read)."""
        prefix = self.prefix(index)
        layout = self.layout_of(ckpt, index)
        routers = [prefix + lay.router.weight for lay in self.layouts]
        sparse_on_disk = layout is not None or any(key in ckpt for key in routers)
        sparse = sparse_on_disk if self.is_moe_layer is None else self.is_moe_layer(config, index)
        if sparse != sparse_on_disk:
            if sparse:
                missing = " or ".join(routers)
                problem = f"makes layer {index} an MoE layer, but the checkpoint has no {missing}"
            else:
                problem = f"makes layer {index} dense, but the checkpoint has MoE tensors under {prefix}"
            raise CheckpointError(
                f"{ckpt.directory}: config.json {problem}; check the config's MoE layer settings "
                "(first_k_dense_replace, decoder_sparse_step, mlp_only_layers, moe_layers, ...)"
            )
        if not sparse:
            return DenseLayerView(index)
        if layout is None:
            raise CheckpointError(
                f"{ckpt.directory}: layer {index} has a router but no expert tensors under {prefix}"
            )
        router = layout.router.read(ckpt, prefix)
        hashed = None if self.hash_routed is None else self.hash_routed(config, index)
        if hashed is not None and ("token_experts" in router) != hashed:
            says, stored = ("hash-routed", "no") if hashed else ("routed by its gate", "a")
            raise CheckpointError(
                f"{ckpt.directory}: config.json makes layer {index} {says}, but the checkpoint has {stored} token "
                f"table {prefix}{layout.router.token_experts}; check mlp_layer_types (or num_hash_layers)"
            )
        vocab = config_value(config, "vocab_size", default=None)
        if "token_experts" in router and vocab is not None and router["token_experts"].shape[0] != vocab:
            raise CheckpointError(  # transformers' table holds one row per token id
                f"{ckpt.directory}: layer {index}'s token table {prefix}{layout.router.token_experts} has "
                f"{router['token_experts'].shape[0]} rows, but config.json says vocab_size {vocab} (one row per token id)"
            )
        flag = self.selection_bias_flag
        if flag is not None and router.get("selection_bias") is not None and not config_flag(config, flag, True):
            raise CheckpointError(
                f"{ckpt.directory}: layer {index} stores {prefix}{layout.router.selection_bias}, but config.json sets "
                f"{flag} false, so transformers would ignore it; set {flag} true to route with it, or drop the tensor"
            )
        routed = layout.experts.read(experts_from or ckpt, prefix, config)
        mlp = None if layout.router_mlp is None else layout.router_mlp.read(ckpt, prefix, config)
        self._check_counts(ckpt, config, index, router, routed, mlp)
        identity = self._identity_rows(ckpt, config, index, router, layout)
        shared = (
            layout.shared.read(ckpt, prefix)
            if layout.shared and layout.shared.present(ckpt, prefix)
            else None
        )
        routed_settings, shared_settings = self.activations(config, index)
        norms = {} if layout.norms is None else layout.norms.read(ckpt, prefix, config)
        experts = ExpertsView(**routed, **routed_settings, output_norm=norms.get("expert_output"))
        if shared is not None:  # plain shared experts take the routed experts' activation
            plain = {"activation": "silu" if shared["gate"] is not None else experts.activation}
            shared = SharedView(**shared, **(shared_settings or plain))
        latent = None
        if layout.latent is not None and layout.latent.present(ckpt, prefix):
            latent = LatentView(**layout.latent.read(ckpt, prefix))
        router = RouterView(
            **router, **self.router_settings(config), input_norm=norms.get("router"), identity=identity, mlp=mlp
        )
        output_bias = None if layout.output_bias is None else ckpt.get(prefix + layout.output_bias)
        return MoELayerView(
            index, router, experts, shared, latent, expert_norm=norms.get("experts"), routed_norm=norms.get("routed"),
            output_bias=output_bias,
        )

    def read_experts(self, ckpt: Checkpoint, config: Config, index: int, experts: range) -> ExpertsView:
        """Routed experts `experts` (a step-1 range) of MoE layer `index`, read alone."""
        layout = self.layout_of(ckpt, index)
        if layout is None:
            raise CheckpointError(f"{ckpt.directory}: layer {index} has no routed experts")
        key, E = config_entry(config, self.num_experts)
        if not 0 <= experts.start < experts.stop <= E or experts.step != 1:
            raise CheckpointError(
                f"cannot read experts {experts} of layer {index}: config says {E} experts ({key}); pass a "
                f"step-1 range inside range(0, {E})"
            )
        prefix = self.prefix(index)
        output_norm = None if layout.norms is None else layout.norms.read_expert_output(ckpt, prefix, config)
        return ExpertsView(
            **layout.experts.read(ckpt, prefix, config, experts), **self.activations(config, index)[0],
            output_norm=output_norm,
        )

    def activations(self, config: Config, index: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(ExpertsView settings, SharedView settings or None for the default) of layer `index`
        (what its views compute; offloading's pool, built like the first MoE layer's, reads it too)."""
        layer = self.layer_activations(config, index) if self.layer_activations else None
        return layer if layer is not None else (self.expert_settings(config), None)

    def identity_count(self, config: Config) -> int:
        """Z, the zero-computation experts the config gives each router (0 where the family has none)."""
        Z = 0 if self.identity_experts is None else self.identity_experts(config)
        if not is_int(Z) or Z < 0:
            raise CheckpointError(f"config.json gives {Z!r} zero-computation (identity) experts; expected an integer >= 0")
        return Z

    def _identity_rows(self, ckpt, config, index, router: dict[str, Tensor], layout: Layout) -> IdentityRows | None:
        """Split the router's last Z rows (weight, bias, selection bias) off `router` as the identity
        experts' (`RouterView.identity`); None where the config gives none. A layout storing gate and
        up entries past the experts (`PerExpert.padded`) must store Z of them."""
        Z = self.identity_count(config)
        padding = layout.stored_padding(ckpt, self.prefix(index))
        if padding not in (0, Z):
            raise CheckpointError(
                f"{ckpt.directory}: layer {index} stores gate and up projections for {padding} choices past its experts, "
                f"but config.json gives {Z} identity experts; fix the config or the checkpoint"
            )
        if not Z:
            return None
        E = router["weight"].shape[0] - Z
        rows = {name: router[name][E:] for name in ("weight", "bias", "selection_bias") if name in router}
        for name in rows:
            router[name] = router[name][:E]
        forced, stored = self.identity_selection_bias, rows.get("selection_bias")
        if forced is not None and stored is not None and not stored.is_meta and (stored != forced).any():
            raise CheckpointError(
                f"{ckpt.directory}: layer {index} stores {stored.tolist()} as its zero-computation experts' selection "
                f"bias, but transformers sets it to {forced} when it loads {self.name} whatever is stored, so the two "
                f"compute different routings and moelab will not pick one (where the model was trained with {forced}, "
                "store that)"
            )
        return IdentityRows(**rows, returns=self.identity_returns)

    def _check_counts(self, ckpt, config, index, router, experts, mlp: RouterMLP | None = None) -> None:
        key, E = config_entry(config, self.num_experts)
        Z = self.identity_count(config)
        for what, found, expected in (
            ("router rows", router["weight"].shape[0], E + Z),
            ("experts", experts["up"].shape[0], E),
        ):
            if found != expected:
                identity = f" and {Z} identity experts" if Z else ""
                raise CheckpointError(
                    f"config says {E!r} experts ({key}){identity}, checkpoint layer {index} has {found} ({what}) in "
                    f"{ckpt.directory}; fix {key} in config.json or the checkpoint"
                )
        key, D = config_entry(config, self.hidden_size)
        what, shape = ("router weight", router["weight"].shape) if mlp is None else ("router MLP's down", mlp.down.shape)
        if shape[-1] != D:
            raise CheckpointError(
                f"config says hidden size {D!r} ({key}), but layer {index}'s {what} has shape {list(shape)} in "
                f"{ckpt.directory}"
            )
        try:
            key, width = config_entry(config, self.expert_width)
        except ValueError:  # a family whose config may leave the width out
            return
        if experts["up"].shape[-2] != width:  # up: [E, I, D]
            raise CheckpointError(
                f"config says the experts are {width!r} wide ({key}), checkpoint layer {index}'s are "
                f"{experts['up'].shape[-2]} in {ckpt.directory}; fix {key} in config.json or the checkpoint"
            )


# ----------------------------------------------------------------------------- helpers


def expert_indices(ckpt: Checkpoint, pattern: str, keys: Iterable[str] | None = None) -> list[int]:
    """The sorted expert indices e for which `pattern.format(e=e)` is a key (of `keys`, some of the
    checkpoint's names that hold every match: default all)."""
    head, tail = pattern.split("{e}")
    regex = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    return sorted(
        int(m.group(1)) for key in (ckpt.keys() if keys is None else keys)
        if key.startswith(head) and (m := regex.fullmatch(key))
    )


def _stack(ckpt: Checkpoint, keys: list[str]) -> Tensor:
    """The tensors `keys`, which must share one shape, stacked along a new first dim. Their dtypes
    may differ only among floating-point ones (stacking promotes: an integer expert among float
    ones would be read as its cast, silently wrong)."""
    tensors = [ckpt.get(key) for key in keys]
    for key, tensor in zip(keys, tensors, strict=True):
        if tensor.shape != tensors[0].shape:
            raise CheckpointError(
                f"{ckpt.directory}: {key} has shape {list(tensor.shape)}, but {keys[0]} has "
                f"{list(tensors[0].shape)}; every expert of a layer must have the same shape"
            )
        if tensor.dtype != tensors[0].dtype and not (tensor.is_floating_point() and tensors[0].is_floating_point()):
            raise CheckpointError(
                f"{ckpt.directory}: {key} has dtype {tensor.dtype}, but {keys[0]} has {tensors[0].dtype}; every "
                "expert of a layer must hold floating-point weights (the checkpoint is corrupt: re-download it)"
            )
    return torch.stack(tensors)


def _join(gate: Tensor, up: Tensor, interleaved: bool, dim: int = -1) -> Tensor:
    """The inverse of `_halves` along `dim`: alternate gate/up entries, or gate then up."""
    if interleaved:
        dim %= gate.dim()
        return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)
    return torch.cat([gate, up], dim=dim)


def _has_bias(experts: ExpertsView) -> bool:
    return any(b is not None for b in (experts.gate_bias, experts.up_bias, experts.down_bias))


def _biases(experts: ExpertsView) -> tuple[Tensor, Tensor, Tensor]:
    """(gate_bias [E, I], up_bias [E, I], down_bias [E, D]), zeros where the view has none."""
    E, I, D = experts.up.shape
    return (
        _or_zeros(experts.gate_bias, experts.up, E, I),
        _or_zeros(experts.up_bias, experts.up, E, I),
        _or_zeros(experts.down_bias, experts.up, E, D),
    )


def _or_zeros(t: Tensor | None, like: Tensor, *shape: int) -> Tensor:
    return like.new_zeros(shape) if t is None else t.contiguous()


def _same_gating(experts: ExpertsView, gated: bool) -> None:
    if experts.gated != gated:
        kinds = {True: "gated (gate and up projections)", False: "plain (up projection only)"}
        raise CheckpointError(
            f"the edited experts are {kinds[experts.gated]}, but this family's on-disk layout holds "
            f"{kinds[gated]} experts; write them to a family of their kind"
        )


def _no_biases(experts: ExpertsView, layout: str) -> None:
    if _has_bias(experts):
        raise CheckpointError(
            f"the edited experts have biases, but this family's {layout} on-disk layout has no expert "
            "biases; drop the biases (fold them into the weights) or write to a family that has them"
        )


def _halves(t: Tensor, dim: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """Split `t` along `dim` into (gate, up): alternating entries if interleaved, else halves."""
    if interleaved:
        index = torch.arange(t.shape[dim])
        return t.index_select(dim, index[::2]), t.index_select(dim, index[1::2])
    gate, up = t.chunk(2, dim=dim)
    return gate, up
