"""Calibration statistics on disk, and the typed per-layer view methods read.

Shape legend: H halves of the calibration data (2), S calibration sources, E routed experts,
B skip-ratio bins, N sampled tokens, D model dim.

A statistics directory (`moelab calibrate --out DIR`, or `moelab_calibration/` inside a
compressed checkpoint):

    calibration.json          model (path, family, fingerprint), mixture (spec, sources, digest),
                              observers, settings, finished layers, timings, stats_version
    layer-00003.safetensors   one MoE layer's statistics (`LayerStats` fields)
    resume.safetensors        while running: the hidden states after the last finished layer

The model fingerprint hashes config.json and every safetensors file's size, header, 16 evenly
spaced 64 KiB samples of its data, its routers and its tensors of at most 64 KiB, so statistics
are never applied to another model (a fine-tuned copy of the same architecture included, or one
with only its routers fine-tuned) without reading whole checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from moelab.compress.observers import EASY_EP_UNREADABLE
from moelab.io import atomic_write_text, save_safetensors

FORMAT = "moelab-calibration/1"
# calibration.json's "stats_version" (absent: 1). 2: the logit Gram per half and source (before: all data's),
# and EASY-EP's residual stream read where the layer computes it (before: its output minus the block's)
STATS_VERSION = 2
EASY_EP_SINCE = 2  # EASY-EP sums of statistics before this version are not read
INFO_NAME = "calibration.json"
RESUME_NAME = "resume.safetensors"
KIND = "calibration statistics"


@dataclass
class LayerStats:
    """The calibration statistics of one MoE layer.

    tokens [H, S]; counts, soft_counts, gate_sums, premoe_sums, ean_sums, reap_sums,
    easyep_sums [H, S, E] (see `moelab.compress.observers` for what each sums); max_output [E];
    shared_max [1]; skip_ratios [B]; logit_gram [H, S, E, E]; neuron_act_sums, neuron_grad_sums
    [H, S, E, I] (HEAPr's terms, from the backward sweep); inputs [N, D] (empty when not sampled),
    input_sources [N] the source of each and, where the router reads a per-token input
    (`Router.context_input`), router_inputs theirs: the token ids [N] in a hash-routed layer, the
    router states handed in [N, R] in an MLP router's (ZAYA's, but its first layer, which reads none)
    (else None; files of moelab before ZAYA store the token ids as "input_ids", read as router_inputs).
    whole_logit_gram [E, E]: the logit Gram of all the calibration data, as files of moelab before
    `STATS_VERSION` 2 store it instead of logit_gram (`gram` refuses to restrict it).
    Fields of observers that did not run are None.
    """

    layer: int
    sources: tuple[str, ...]
    tokens: Tensor
    counts: Tensor
    soft_counts: Tensor
    gate_sums: Tensor
    premoe_sums: Tensor
    skip_ratios: Tensor
    logit_gram: Tensor | None = None
    neuron_act_sums: Tensor | None = None
    neuron_grad_sums: Tensor | None = None
    ean_sums: Tensor | None = None
    reap_sums: Tensor | None = None
    max_output: Tensor | None = None
    shared_max: Tensor | None = None
    easyep_sums: Tensor | None = None
    inputs: Tensor | None = None
    input_sources: Tensor | None = None
    router_inputs: Tensor | None = None
    whole_logit_gram: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.counts.shape[-1]

    def total(self, name: str, sources: list[str] | None = None, halves: tuple[int, ...] = (0, 1)) -> Tensor:
        """[E] the statistic `name` summed over the given sources (default all) and halves."""
        value = getattr(self, name)
        if value is None:
            why = (
                f" ({EASY_EP_UNREADABLE}), or the statistics were made by a moelab before statistics version {EASY_EP_SINCE}, "
                "whose EASY-EP sums were wrong on such layers (calibrate again); else choose another method "
                "(reap, frequency, moelab, ...)"
            ) if name == "easyep_sums" else ""
            raise ValueError(
                f"the calibration statistics have no {name!r}: its observer did not run (calibrate again with "
                f"the default observers) or cannot read this layer{why}"
            )
        return value[list(halves)][:, self._source_index(sources)].sum((0, 1))

    def gram(self, halves: tuple[int, ...] = (0, 1)) -> Tensor:
        """[E, E] the router-logit Gram matrix summed over these statistics' sources and the given halves."""
        if self.logit_gram is not None:
            return self.total("logit_gram", halves=halves)
        if self.whole_logit_gram is not None and sorted(halves) == [0, 1]:
            return self.whole_logit_gram
        raise ValueError(
            "these calibration statistics have no router-logit Gram matrix per calibration source and half: an "
            "older moelab recorded it over all the calibration data only, which cannot be restricted to some "
            "domains (--domain) or to one half; calibrate again with this moelab"
        )

    def token_total(self, sources: list[str] | None = None, halves: tuple[int, ...] = (0, 1)) -> float:
        return float(self.tokens[list(halves)][:, self._source_index(sources)].sum())

    def _source_index(self, sources: list[str] | None) -> list[int]:
        if sources is None:
            return list(range(len(self.sources)))
        unknown = [s for s in sources if s not in self.sources]
        if unknown:
            raise ValueError(
                f"calibration sources {unknown} are not in these statistics; they have {list(self.sources)}"
            )
        return [self.sources.index(s) for s in sources]

    def restricted(self, sources: Sequence[str]) -> LayerStats:
        """These statistics on the calibration sources `sources` alone (their tokens' sums, logit
        Gram matrices and sampled inputs); the maxima and skip ratios stay the whole data's. An older
        file's whole-data logit Gram (`whole_logit_gram`) is dropped unless `sources` are all of them."""
        index = self._source_index(list(sources))
        cut = {n: getattr(self, n)[:, index] for n in PER_SOURCE if getattr(self, n) is not None}
        if set(sources) != set(self.sources):
            cut["whole_logit_gram"] = None
        inputs, input_sources, router_inputs = self.inputs, self.input_sources, self.router_inputs
        if self.inputs is not None and self.inputs.numel():
            if self.input_sources is None:
                raise ValueError(
                    "these statistics do not record which source each sampled input came from (an older "
                    "moelab's); calibrate again to score on some domains"
                )
            rows = torch.isin(self.input_sources, torch.tensor(index))
            renumber = torch.full((len(self.sources),), -1, dtype=torch.int64)
            renumber[index] = torch.arange(len(index))
            inputs, input_sources = self.inputs[rows], renumber[self.input_sources[rows]]
            router_inputs = None if router_inputs is None else router_inputs[rows]
        return dataclasses.replace(
            self, sources=tuple(sources), inputs=inputs, input_sources=input_sources, router_inputs=router_inputs,
            **cut,
        )  # fmt: skip

    def tensors(self) -> dict[str, Tensor]:
        names = [f.name for f in fields(self) if f.name not in ("layer", "sources")]
        return {n: getattr(self, n).contiguous() for n in names if getattr(self, n) is not None}


PER_SOURCE = (  # the fields laid out [H, S, ...]
    "tokens", "counts", "soft_counts", "gate_sums", "premoe_sums", "ean_sums", "reap_sums", "easyep_sums",
    "neuron_act_sums", "neuron_grad_sums", "logit_gram",
)


class Calibration:
    """A statistics directory opened for reading: `info` (calibration.json) and `layer(i)`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / INFO_NAME
        if not path.is_file():
            raise ValueError(
                f"{self.directory} holds no calibration statistics (no {INFO_NAME}); make them with "
                "`moelab calibrate MODEL --out DIR`"
            )
        try:
            self.info = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); calibrate again") from None
        if not isinstance(self.info, dict) or self.info.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file; calibrate again with this moelab")
        if not self.info.get("complete"):
            raise ValueError(f"the calibration in {self.directory} did not finish; run it again to resume it")
        _check_info(self.info, path)

    @property
    def layers(self) -> list[int]:
        return list(self.info["moe_layers"])

    @property
    def mtp_layers(self) -> list[int]:
        """The multi-token prediction layer with statistics, if the model has one (calibrations
        made before moelab ran it have none)."""
        return list(self.info.get("mtp_layers", []))

    @property
    def sources(self) -> list[str]:
        return [s["domain"] for s in self.info["mixture"]["sources"]]

    @property
    def version(self) -> int:
        """The statistics version (`STATS_VERSION`) they were made with."""
        return self.info.get("stats_version", 1)

    def layer(self, index: int) -> LayerStats:
        if index not in (have := self.layers + self.mtp_layers):
            raise ValueError(f"{self.directory} has no statistics for layer {index}; it has {have}")
        stats = read_layer(self.directory, index, tuple(self.sources))
        if self.version < EASY_EP_SINCE:  # its EASY-EP sums took out - block output for h (`total`)
            stats = dataclasses.replace(stats, easyep_sums=None)
        return stats

    def layers_without(self, name: str) -> list[int]:
        """The layers (MTP's included) whose statistics have no `name`, as `layer` reads them, from
        the files' headers alone."""
        if name == "easyep_sums" and self.version < EASY_EP_SINCE:
            return self.layers + self.mtp_layers
        return [i for i in self.layers + self.mtp_layers if name not in layer_names(self.directory, i)]

    def check_model(self, fingerprint: str, model: str | os.PathLike) -> None:
        """Raise unless these statistics were made on the model with this fingerprint."""
        check_fingerprint_version(self.info["model"]["fingerprint"], self.directory)
        if self.info["model"]["fingerprint"] != fingerprint:
            made_on = self.info["model"]["path"]
            if Path(made_on).resolve() == Path(model).resolve():
                raise ValueError(
                    f"the statistics in {self.directory} were made on {made_on} before its weights changed (their "
                    "fingerprints differ); calibrate it again instead of reusing them"
                )
            raise ValueError(
                f"the statistics in {self.directory} were made on {made_on}, not on {model} "
                "(their fingerprints differ); calibrate this model instead of reusing them"
            )

    def windows(self) -> tuple[int, int]:
        """(token budget, window length) the statistics were calibrated with."""
        _check_info(self.info, self.directory / INFO_NAME, MIXTURE_FIELDS)
        return self.info["settings"]["tokens"], self.info["settings"]["seq_len"]

    def check_mixture(self, digest: str, spec: str) -> None:
        _check_info(self.info, self.directory / INFO_NAME, MIXTURE_FIELDS)
        if self.info["mixture"]["digest"] != digest:
            raise ValueError(
                f"the statistics in {self.directory} were made on the calibration data "
                f"{self.info['mixture']['spec']!r}, not on {spec!r} (their digests differ); calibrate again"
            )


INFO_FIELDS = (  # (keys, type) of what every reader takes from calibration.json
    (("model", "path"), str),
    (("model", "fingerprint"), str),
    (("mixture", "spec"), str),
    (("mixture", "sources"), list),
    (("moe_layers",), list),
    (("settings", "observers"), list),
)
MIXTURE_FIELDS = (  # what checking the statistics against calibration data takes besides
    (("mixture", "digest"), str),
    (("settings", "tokens"), int),
    (("settings", "seq_len"), int),
)


def _check_info(info: dict[str, Any], path: Path, fields: tuple = INFO_FIELDS) -> None:
    """Raise a ValueError naming the first of `fields` of calibration.json that is missing or of
    the wrong type (an edited or foreign file), instead of a KeyError or TypeError later."""
    for keys, kind in fields:
        value: Any = info
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"{path}: {'.'.join(keys)} must be {kind.__name__}, got {value!r}; the file was edited or is "
                "not moelab's: calibrate again"
            )
    if fields is not INFO_FIELDS:
        return
    if not all(isinstance(s, dict) and isinstance(s.get("domain"), str) for s in info["mixture"]["sources"]):
        raise ValueError(f"{path}: mixture.sources must be records with a 'domain' name; calibrate again")
    for key in ("moe_layers", "mtp_layers"):  # mtp_layers: absent from calibrations made before it
        layers = info.get(key, [])
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"{path}: {key} must be layer numbers, got {layers!r}; calibrate again")


def layer_file(directory: Path, index: int) -> Path:
    return directory / f"layer-{index:05d}.safetensors"


def layer_names(directory: Path, index: int) -> set[str]:
    """The names of the tensors layer `index`'s statistics file holds (its header only)."""
    path = layer_file(directory, index)
    try:
        with safe_open(path, "pt") as f:
            return set(f.keys())
    except Exception as err:  # a missing, truncated or foreign file
        raise ValueError(f"{path} is not a readable statistics file ({err}); calibrate again") from None


def write_layer(directory: Path, stats: LayerStats) -> None:
    save_safetensors(stats.tensors(), layer_file(directory, stats.layer), metadata={"format": FORMAT})


LEGACY_ROUTER_INPUTS = "input_ids"  # router_inputs' name in statistics files before ZAYA's router states


def read_layer(directory: Path, index: int, sources: tuple[str, ...]) -> LayerStats:
    path = layer_file(directory, index)
    if not path.is_file():
        raise ValueError(f"{path} is missing; calibrate again")
    try:
        tensors = load_file(path)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable statistics file ({err}); calibrate again") from None
    known = {f.name for f in fields(LayerStats)}
    if LEGACY_ROUTER_INPUTS in tensors:  # a hash-routed layer's token ids, as moelab stored them before ZAYA
        tensors.setdefault("router_inputs", tensors.pop(LEGACY_ROUTER_INPUTS))
    if "logit_gram" in tensors and tensors["logit_gram"].dim() == 2:  # all data's, before STATS_VERSION 2
        tensors["whole_logit_gram"] = tensors.pop("logit_gram")
    try:
        stats = LayerStats(index, sources, **{k: v for k, v in tensors.items() if k in known})
    except TypeError as err:
        raise ValueError(f"{path} lacks statistics ({err}); calibrate again") from None
    problem = _layout_problem(stats)
    if problem:
        raise ValueError(f"{path}: {problem}; the file was edited or is not moelab's: calibrate again")
    return stats


def _layout_problem(stats: LayerStats) -> str | None:
    """What is wrong with the shapes of `stats` as read from a file (None: nothing): every [H, S, E, ...]
    field against tokens [H, S] and counts' E, the sampled inputs [N, D] against their sources [N], and
    the counts that cannot be negative or non-finite (tokens, counts, soft_counts)."""
    if stats.tokens.dim() != 2 or (stats.sources and stats.tokens.shape[1] != len(stats.sources)):
        return f"tokens has shape {list(stats.tokens.shape)}, expected [halves, {len(stats.sources) or 'sources'}]"
    halves, sources = stats.tokens.shape
    if stats.counts.dim() != 3:
        return f"counts has shape {list(stats.counts.shape)}, expected [{halves}, {sources}, experts]"
    experts = stats.num_experts
    per_source = [halves, sources, experts]
    expected = {name: per_source for name in PER_SOURCE if name != "tokens"}
    expected.update(
        logit_gram=[*per_source, experts], neuron_act_sums=[*per_source, "neurons"],
        neuron_grad_sums=[*per_source, "neurons"], max_output=[experts], whole_logit_gram=[experts, experts],
    )  # fmt: skip
    for name, shape in expected.items():
        value = getattr(stats, name)
        if value is not None and (
            value.dim() != len(shape) or any(want not in ("neurons", got) for want, got in zip(shape, value.shape))
        ):
            return f"{name} has shape {list(value.shape)}, expected {shape}"
    if stats.inputs is not None and stats.inputs.dim() != 2:
        return f"inputs has shape {list(stats.inputs.shape)}, expected [sampled tokens, model dim]"
    rows = 0 if stats.inputs is None else stats.inputs.shape[0]
    for name in ("input_sources", "router_inputs"):
        value = getattr(stats, name)
        if value is not None and (value.dim() == 0 or value.shape[0] != rows):
            return f"{name} has shape {list(value.shape)}, expected [{rows}, ...] (one per sampled input)"
    numbers = stats.input_sources
    if numbers is not None and rows and not 0 <= numbers.min() <= numbers.max() < sources:
        return f"input_sources holds source numbers outside [0, {sources})"
    for name in ("tokens", "counts", "soft_counts"):
        value = getattr(stats, name).double()
        if not bool(torch.isfinite(value).all() and (value >= 0).all()):
            return f"{name} holds negative or non-finite values (they count tokens)"
    return None


def write_info(directory: Path, info: dict[str, Any]) -> None:
    atomic_write_text(directory / INFO_NAME, json.dumps({"format": FORMAT, **info}, indent=1) + "\n")


def read_info(directory: Path) -> dict[str, Any] | None:
    path = directory / INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


FINGERPRINT_VERSION = "2"  # "2:<sha256>"; version 1 (a bare hash) did not read the routers whole


def check_fingerprint_version(recorded: str, where: str | os.PathLike) -> None:
    """Raise if `recorded` was made by another version of `fingerprint` (it cannot be compared)."""
    if not recorded.startswith(FINGERPRINT_VERSION + ":"):
        raise ValueError(
            f"{where} was made by another moelab version, whose model fingerprints this one cannot compare; "
            "calibrate again"
        )


def fingerprint(path: str | os.PathLike, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A hash of a checkpoint that changes with any of its weights' shapes or values (see the
    module docstring); reads config.json, the safetensors headers, a few samples, and whole the
    routers and every tensor of at most `sample_bytes` (norms, biases), which a fine-tune of the
    routing alone changes."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}:".encode())
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = f.read(min(header_len, size))
            h.update(header)
            start = 8 + header_len
            span = max(size - start - sample_bytes, 0)
            for k in range(samples):
                f.seek(start + span * k // max(samples - 1, 1))
                h.update(f.read(sample_bytes))
            for begin, end in _whole_tensors(header, sample_bytes):
                f.seek(start + begin)
                h.update(f.read(end - begin))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


_ROUTING = re.compile(r"(^|\.)(gate|router|[a-z_]*score_correction[a-z_]*|shared_expert_gate)(\.|$)")


def _whole_tensors(header: bytes, small: int) -> list[tuple[int, int]]:
    """The data offsets of the routing tensors and of the tensors of at most `small` bytes named
    in a safetensors header (nothing for a header that does not parse)."""
    try:
        entries = json.loads(header)
    except ValueError:
        return []
    spans = []
    for name, entry in sorted(entries.items()) if isinstance(entries, dict) else ():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            if _ROUTING.search(name) or offsets[1] - offsets[0] <= small:
                spans.append((offsets[0], offsets[1]))
    return spans


def layer_stats(index: int, sources: tuple[str, ...], results: dict[str, Tensor]) -> LayerStats:
    """A LayerStats from observer results (names as in `LayerStats`)."""
    known = {f.name for f in fields(LayerStats)}
    return LayerStats(index, sources, **{k: v for k, v in results.items() if k in known})
