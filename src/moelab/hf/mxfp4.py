"""GPT-OSS's MXFP4 experts (`quant_method: "mxfp4"`, as openai/gpt-oss-20b and -120b ship) read as
plain weights.

Each expert weight `<name>` is stored as `<name>_blocks` [..., O, G, 16] (two FP4 e2m1 values a
byte, the low nibble first: 32 values per group) and `<name>_scales` [..., O, G] (one power of two
per group, 2 ** (byte - 127)); the plain weight is [..., G * 32, O], transposed as GPT-OSS's experts
hold it (gate_up [E, D, 2I], down [E, I, D]), the same values transformers' dequantization gives.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from moelab.hf.checkpoint import Checkpoint, CheckpointError
from moelab.hf.quantized import DequantizedCheckpoint

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"
GROUP_BYTES = 16  # 32 FP4 values


def e2m1_values(packed: Tensor) -> Tensor:
    """Bytes [..., n] (uint8 or int8), two FP4 e2m1 codes each, the low nibble first -> their values
    [..., 2n] in float32: GPT-OSS's blocks and DeepSeek-V4's FP4 experts (`moelab.hf.float8`) alike."""
    codes = packed.view(torch.uint8).long()
    lut = torch.tensor(FP4_VALUES)
    return torch.stack((lut[codes & 0x0F], lut[codes >> 4]), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantized_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """blocks [..., O, G, 16] uint8, scales [..., O, G] uint8 -> the weight [..., G * 32, O] in `dtype`
    (see the module docstring), one matrix at a time."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP_BYTES or blocks.dim() < 3:
        raise CheckpointError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not fit: expected blocks "
            f"[..., rows, groups, {GROUP_BYTES}] and scales [..., rows, groups]"
        )
    *lead, O, G, _ = blocks.shape
    out = torch.empty(*lead, G * 2 * GROUP_BYTES, O, dtype=dtype)
    matrices, groups, outs = (
        blocks.reshape(-1, O, G, GROUP_BYTES),
        scales.reshape(-1, O, G),
        out.view(-1, G * 32, O),
    )
    for m in range(matrices.shape[0]):
        values = e2m1_values(matrices[m]).reshape(O, G, 32)
        values = torch.ldexp(values, groups[m].int()[..., None] - 127)
        outs[m] = values.reshape(O, G * 32).T.to(dtype)
    return out


MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between FP4_VALUES' magnitudes
TIES_UP = torch.tensor([0.75, 1.75, 3.5])  # the midpoints whose even neighbour (code) is the larger one


def quantized_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., I, O] (a weight as GPT-OSS's experts hold it, I a multiple of 32) -> (blocks
    [..., O, I / 32, 16], scales [..., O, I / 32]), the inverse of `dequantized_mxfp4`: each group of
    32 scaled by the smallest power of two that brings its largest |entry| within 6, every entry then
    the nearest e2m1 value, a tie to the even code (round half to even, IEEE's and the OCP MX spec's
    rule: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; ties toward zero
    shrank an equal-weight average of two experts by 8 % of its mean magnitude), one matrix at a time."""
    *lead, I, O = w.shape
    if I % (2 * GROUP_BYTES):
        raise ValueError(f"an MXFP4 weight's input dim is whole groups of 32; got {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight to quantize has NaN or Inf, which MXFP4 cannot store; fix the weight")
    if w.numel() and w.abs().max() >= 3.5 * 2.0**126:  # 3.5 x 2 ** 126 rounds (to even) to 2 ** 128: Inf
        raise ValueError(
            "the weight to quantize has entries of 3.5 * 2 ** 126 or more, which MXFP4 rounds to Inf; fix the weight"
        )
    blocks = torch.empty(*lead, O, I // 32, GROUP_BYTES, dtype=torch.uint8)
    scales = torch.empty(*lead, O, I // 32, dtype=torch.uint8)
    for m, matrix in enumerate(w.reshape(-1, I, O)):
        groups = matrix.T.float().contiguous().reshape(O, I // 32, 32)
        amax = groups.abs().amax(-1)
        exponent = torch.ceil(torch.log2(amax / 6)).nan_to_num(-127, -127, -127).clamp(-127, 127)
        exponent += (amax > 6 * torch.exp2(exponent)).float()  # log2's rounding, where it fell short
        x = groups / torch.exp2(exponent)[..., None]
        magnitude = x.abs()  # bucketize puts a midpoint in the lower bucket: the ties up move one code
        codes = torch.bucketize(magnitude, MIDPOINTS) + torch.isin(magnitude, TIES_UP)
        nibbles = codes | torch.where(x < 0, 8, 0)
        blocks.view(-1, O, I // 32, GROUP_BYTES)[m] = (nibbles[..., 0::2] | nibbles[..., 1::2] << 4).to(torch.uint8)
        scales.view(-1, O, I // 32)[m] = (exponent + 127).to(torch.uint8)
    return blocks, scales


class Mxfp4Checkpoint(DequantizedCheckpoint):
    """A GPT-OSS MXFP4 checkpoint read as plain weights (`DequantizedCheckpoint`): `<name>` for each
    `<name>_blocks` and `<name>_scales` pair, every other tensor as stored (a float one whose name
    ends so, without a partner, too: uint8 blocks or scales without theirs are refused)."""

    def __init__(
        self, directory: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, *, shapes_only: bool = False
    ):
        super().__init__(directory, dtype, shapes_only=shapes_only)
        for key in self.stored_keys():
            name = key.removesuffix(SCALES)
            if key.endswith(SCALES) and self._stores(name + BLOCKS):
                continue  # read with its blocks
            if key.endswith(SCALES) and self.entry(key)[0] == "U8":
                raise CheckpointError(
                    f"{self.directory}: {key} has no {name + BLOCKS}; the MXFP4 weight is incomplete "
                    "(re-download the checkpoint)"
                )
            name = key.removesuffix(BLOCKS)
            if not key.endswith(BLOCKS) or not (self._stores(name + SCALES) or self.entry(key)[0] == "U8"):
                self._lists(key)  # a plain tensor (a float one named <name>_blocks or _scales too)
                continue
            if not self._stores(name + SCALES):
                raise CheckpointError(
                    f"{self.directory}: {key} has no {name + SCALES}; the MXFP4 weight is incomplete "
                    "(re-download the checkpoint)"
                )
            (blocks_dtype, blocks), (scales_dtype, scales) = self.entry(key), self.entry(name + SCALES)
            if (
                (blocks_dtype, scales_dtype) != ("U8", "U8")
                or len(blocks) < 3
                or blocks[:-1] != scales
                or blocks[-1] != GROUP_BYTES
            ):
                raise CheckpointError(
                    f"{self.directory}: {key} ({blocks_dtype} {list(blocks)}) and {name + SCALES} ({scales_dtype} "
                    f"{list(scales)}) are not MXFP4 blocks and scales (uint8 [..., rows, groups, 16] and [..., rows, "
                    "groups]); the checkpoint does not match its quantization_config"
                )
            *lead, rows, groups, _ = blocks
            self._decodes(name, (*lead, groups * 2 * GROUP_BYTES, rows), key)
        if not self._shapes:
            raise CheckpointError(
                f"{self.directory / 'config.json'} describes MXFP4 weights, but no <name>{BLOCKS} tensors are stored: "
                "the checkpoint does not match its quantization_config (remove it if the weights are plain)"
            )

    def stored_parts(self, name: str) -> list[str]:
        return [name + BLOCKS, name + SCALES] if name in self._shapes else super().stored_parts(name)

    def _decode(self, name: str, rows: range | None) -> Tensor:
        stacked = len(self._shapes[name]) > 2  # rows are experts, in blocks and scales alike
        part = rows if stacked else None
        out = dequantized_mxfp4(
            Checkpoint.get(self, name + BLOCKS, part), Checkpoint.get(self, name + SCALES, part), self.dtype
        )
        return out if stacked or rows is None else out[rows.start : rows.stop].clone()
