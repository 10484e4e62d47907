"""Tiny quantized checkpoints for the tests: block-wise FP8 as DeepSeek-V3 and Qwen3-FP8 ship it
(float8 e4m3 weights, one float32 scale per block, `<name>_scale_inv`, quant_method "fp8") and
llm-compressor's FP8 and DeepSeek-V4's release (FP8 weights with `<module>.scale`, FP4 experts),
made from a saved plain checkpoint; the per-block loop that is the
reference for reading them; and offloaded decoding of any quantized release."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = (16, 8)


def per_block(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference: every block of q [O, I], one at a time, times its scale (float32)."""
    bo, bi = block
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            rows, cols = slice(i * bo, (i + 1) * bo), slice(j * bi, (j + 1) * bi)
            out[rows, cols] = q[rows, cols].float() * scales[i, j]
    return out


def quantized(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] as float8 e4m3 with per-block scales (amax / 448), the way FP8 releases store it."""
    (O, I), (bo, bi) = w.shape, block
    scales = torch.empty(-(-O // bo), -(-I // bi))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            scales[i, j] = w[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi].abs().max().clamp(min=1e-12) / 448
    expanded = scales.repeat_interleave(bo, 0)[:O].repeat_interleave(bi, 1)[:, :I]
    return (w / expanded).to(torch.float8_e4m3fn), scales


def released(plain: Path, out: Path, tensors: dict[str, torch.Tensor] | None, config: dict) -> None:
    """`out`, a new directory: `tensors` as its model.safetensors (None: the caller writes its
    weights), the other files of the saved checkpoint `plain` copied, and plain's config.json with
    the entries `config` set."""
    out.mkdir()
    if tensors is not None:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for path in plain.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            (out / path.name).write_bytes(path.read_bytes())
    settings = json.loads((plain / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(settings | config))


def fp8_release(plain: Path, out: Path, **config) -> dict[str, torch.Tensor]:
    """Write the one-file checkpoint `plain` (config.json and model.safetensors) into `out` as a
    block-wise FP8 release in two shards with an index: its 2-D projection weights float8 with
    scales (embedding, norms, routers and head as stored, as the releases keep them in bf16), the
    other files copied, `config` entries set. Returns the stored tensors."""
    stored = {}
    for key, w in load_file(plain / "model.safetensors").items():
        if key.endswith("proj.weight") and w.dim() == 2:
            stored[key], stored[key + "_scale_inv"] = quantized(w.float(), BLOCK)
        else:
            stored[key] = w
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
    released(plain, out, None, {"quantization_config": quantization} | config)
    keys = sorted(stored)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, names in shards.items():
        save_file({k: stored[k] for k in names}, out / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return stored


def compressed_tensors_release(
    plain: Path, out: Path, strategy: str, *, block: tuple[int, int] = BLOCK, kv_cache: bool = False
) -> Path:
    """Write the one-file checkpoint `plain` into `out` as llm-compressor's float-quantized FP8 with
    the "tensor" (one scale stored as [1]), "channel" or "block" (`block`) strategy: its 2-D projection
    weights float8 with `<module>.weight_scale` (block weights padded to whole blocks, with
    `weight_shape_original`, where they are not); kv_cache: static kv cache scales on every attention
    module (`kv_cache_scheme`)."""
    stored = {}
    for key, w in load_file(plain / "model.safetensors").items():
        if key.endswith("proj.weight") and w.dim() == 2:
            tiles = {"tensor": tuple(w.shape), "channel": (1, w.shape[1]), "block": block}[strategy]
            (O, I), (bo, bi) = w.shape, tiles
            if O % bo or I % bi:
                stored[key.removesuffix("weight") + "weight_shape_original"] = torch.tensor([O, I])
                w = torch.nn.functional.pad(w, (0, -I % bi, 0, -O % bo))
            q, s = quantized(w.float(), tiles)
            stored[key], stored[key + "_scale"] = q, s.reshape(1) if strategy == "tensor" else s
        else:
            stored[key] = w
        if kv_cache and key.endswith("self_attn.o_proj.weight"):
            for name in ("k_scale", "v_scale"):
                stored[key.removesuffix("o_proj.weight") + name] = torch.tensor(1.5)
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True}
    weights |= {"block_structure": list(block)} if strategy == "block" else {}
    quantization = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }
    if kv_cache:
        quantization["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}
    released(plain, out, stored, {"quantization_config": quantization})
    return out


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
V4_BF16 = ("compressor.wkv.weight", "compressor.wgate.weight", "indexer.weights_proj.weight")  # shipped unscaled


def _power_of_two(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x (x > 0): a ue8m0 scale."""
    return torch.exp2(torch.ceil(torch.log2(x)))


def _ue8m0(scales: torch.Tensor, stored: str) -> torch.Tensor:
    """Power-of-two scales as float8_e8m0fnu ("e8m0"), bytes b = log2 + 127 ("bytes") or float32."""
    if stored == "e8m0":
        return scales.to(torch.float8_e8m0fnu)
    return (torch.log2(scales) + 127).round().to(torch.uint8) if stored == "bytes" else scales


def fp4_quantized(w: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] (I a multiple of 32) as DeepSeek-V4's FP4 experts: int8 [O, I / 2], two e2m1 codes a
    byte (the low nibble first), each the nearest e2m1 value of w over its scale (a tie to the even
    code), one scale per row per 32 columns (float32 [O, I / 32]: a power of two if ue8m0, else amax / 6)."""
    O, I = w.shape
    groups = w.float().reshape(O, I // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=1e-12)
    scales = _power_of_two(amax / 6) if ue8m0 else amax / 6
    x = groups / scales[..., None]
    distance = (x.reshape(O, I, 1) - E2M1).abs()
    nearest = distance == distance.amin(-1, keepdim=True)
    even = nearest & (torch.arange(len(E2M1)) % 2 == 0)  # of two nearest codes one is even; 0 and -0 tie: code 0
    codes = torch.where(even.any(-1), even.int().argmax(-1), nearest.int().argmax(-1)).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scales


def deepseek_v4_fp4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference for reading `fp4_quantized`'s output: every value, one at a time, in float32."""
    O, half = packed.shape
    out = torch.empty(O, 2 * half)
    codes = packed.view(torch.uint8)
    for i in range(O):
        for j in range(2 * half):
            code = (int(codes[i, j // 2]) >> (4 * (j % 2))) & 0xF
            out[i, j] = E2M1[code] * scales[i, j // 32].float()
    return out


def deepseek_v4_release(
    plain: Path, out: Path, scales: str = "e8m0", fp8_scales: str | None = None, experts: str = "fp4"
) -> dict:
    """Write the one-file checkpoint `plain` (stored with DeepSeek-V4's release names) into `out` as
    DeepSeek-V4-Flash ships: its 2-D projection weights float8 e4m3 in blocks of BLOCK with the
    scale under `<module>.scale` (the compressor's and indexer's V4_BF16 ones as stored, no scale),
    its routed experts (`ffn.experts.E.w1/w2/w3`) FP4 (`fp4_quantized`) with `<module>.scale`; the
    routers, norms, embedding, head, tid2eid and hyper-connection tensors as stored. scales: "e8m0"
    (scale_fmt "ue8m0", float8_e8m0fnu), "bytes" (ue8m0 as uint8) or "float" (float32 amax / max);
    fp8_scales: the FP8 weights' when other. experts: "fp8" stores the routed experts as the other
    projections are (expert_dtype "fp8"). expert_dtype is set beside quantization_config, as V4's
    config.json has it. Returns the stored tensors."""
    ue8m0, fp8_stored = scales != "float", fp8_scales or scales
    stored = {}
    for key, w in load_file(plain / "model.safetensors").items():
        module = key.removesuffix("weight")
        if ".ffn.experts." in key and key.endswith(".weight") and experts == "fp4":
            stored[key], s = fp4_quantized(w, ue8m0)
            stored[module + "scale"] = _ue8m0(s, scales)
        elif key.startswith("layers.") and key.endswith(".weight") and w.dim() == 2 and not key.endswith((".gate.weight", *V4_BF16)):
            (O, I), (bo, bi) = w.shape, BLOCK
            blocks = w.float().reshape(O // bo, bo, I // bi, bi)
            amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
            s = _power_of_two(amax / 448) if fp8_stored != "float" else amax / 448
            stored[key] = (blocks / s[:, None, :, None]).reshape(O, I).to(torch.float8_e4m3fn)
            stored[module + "scale"] = _ue8m0(s, fp8_stored)
        else:
            stored[key] = w
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": list(BLOCK)} | ({"scale_fmt": "ue8m0"} if ue8m0 else {})  # fmt: skip
    released(plain, out, stored, {"quantization_config": quantization, "expert_dtype": experts})
    return stored


def offloaded_tokens(sources: list[Path], new_tokens: int = 6) -> list[torch.Tensor]:
    """Greedy continuations of two fixed prompts by each checkpoint, offloaded with half its routed
    experts resident, in bf16."""
    from moelab.offload import load_offloaded

    ids = torch.randint(0, 8192, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = []
    for source in sources:
        model = load_offloaded(source, resident=0.5, dtype=torch.bfloat16)
        try:
            tokens.append(model.generate(ids, new_tokens))
        finally:
            model.close()
    return tokens
