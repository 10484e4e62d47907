"""A transformers checkpoint as a moelab model: the inverse of `moelab.hf.export`.

moelab's decoder computes exactly what a Mixtral checkpoint computes, and a Qwen2-MoE one whose
attention biases are zero (as `moelab export --family qwen2_moe` writes them). Such a checkpoint
becomes a `MoETransformer`, weight for weight, and then decodes on moelab's own path (KV cache,
column-major one-row products, the compiled static step: `docs/benchmarks.md`), which runs
transformers' own model of the same weights several times slower at batch 1.

    model = moelab_model("path/to/mixtral")                # in memory
    import_checkpoint("path/to/mixtral", "runs/mixtral-moelab")   # a moelab checkpoint directory

Anything else (another family, sliding-window attention, scaled RoPE, a head width other than
D / H, nonzero attention biases, other activations or routers) is refused with the reasons
(`conversion_problems`). As in transformers, an output head stored apart from the embedding stays
apart even where config.json ties them. The zero shared expert, or zero shared-expert gate, that
`moelab export` writes for a model without a (gated) one comes back as what it was (`_exported_shared`),
so that a moelab checkpoint exported and imported again is the same checkpoint. `import_checkpoint` checks what it wrote: moelab's logits
equal transformers' to 1e-4, on the layers up to the second MoE layer and the first of every other
kind (every later layer's tensors convert by the same names as the first of its kind), so the
check needs memory for those layers only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from moelab.files import read_json_object
from moelab.hf.adapters import FAMILIES, NATIVE, resolve
from moelab.hf.checkpoint import Checkpoint, CheckpointError, side_files
from moelab.hf.export import hf_aux_loss_coef, renamed
from moelab.hf.layouts import Config
from moelab.hf.view import MoELayerView, SharedView
from moelab.io import StagedOutput, check_output_dir, copy_side_file
from moelab.models.config import ModelConfig
from moelab.models.pretrained import CHECKPOINT_KIND, load_state, write_model_files
from moelab.models.transformer import MoETransformer
from moelab.nn.config import MoEConfig
from moelab.nn.rope import rope_tables

CONVERTIBLE_FAMILIES = ("mixtral", "qwen2_moe")
_ATTENTION_BIAS = re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias")


def conversion_problems(path: str | os.PathLike, checkpoint: Checkpoint | None = None) -> list[str]:
    """Why the transformers checkpoint at `path` cannot become a moelab model exactly (empty: it
    can); reads config.json and, for Qwen2-MoE, the attention biases (through `checkpoint` where
    it is open already)."""
    if checkpoint is not None:
        return _problems(path, checkpoint, checkpoint_family(path))
    if _is_moelab(path):  # refused before it is opened: `resolve` opens none without MoE layers
        return _problems(path, None, None)
    config, ckpt, family = resolve(path)
    try:
        return _problems(path, ckpt, family.name)
    finally:
        ckpt.close()


def checkpoint_family(path: str | os.PathLike) -> str | None:
    """config.json's model_type."""
    return read_json_object(Path(path) / "config.json", "a model config").get("model_type")


def _is_moelab(path: str | os.PathLike) -> bool:
    """Whether `path` holds a config.json without a model_type (a moelab checkpoint's)."""
    return (Path(path) / "config.json").is_file() and checkpoint_family(path) is None


def moelab_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> MoETransformer:
    """The transformers checkpoint at `path` as a moelab `MoETransformer` (eval mode; in the
    checkpoint's dtype, config.json's, unless `dtype` is given); refuses what does not convert
    exactly. Built around the checkpoint's tensors: no second copy of the weights."""
    if _is_moelab(path):
        _refuse(path, _problems(path, None, None))
    config, ckpt, family = resolve(path)
    try:
        model_config = moelab_config(path, ckpt)
        tensors = moelab_tensors(ckpt, config, family, model_config.n_layers)
    finally:
        ckpt.close()
    if model_config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return _assembled(model_config, tensors).to(dtype or _stored_dtype(tensors)).eval()


def _assembled(config: ModelConfig, tensors: dict[str, Tensor]) -> MoETransformer:
    """A `MoETransformer` of `config` whose parameters are `tensors` themselves (`load_state`'s
    checks; nothing initialised, nothing copied)."""
    with torch.device("meta"):
        model = MoETransformer(config)
    load_state(model, tensors, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    return model


def _stored_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """The floating dtype most of the weights are stored in (by count): a bf16 checkpoint with
    float32 routers stays bf16, and weights stored in float32 under a config.json that says bfloat16
    are not rounded (the conversion is exact; transformers would round them)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__)


def import_checkpoint(
    path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, quiet: bool = False
) -> Path:
    """Write the transformers checkpoint at `path` to the new directory `out` as a moelab
    checkpoint (`moelab.models.save_pretrained`'s files, in the checkpoint's dtype), with its
    tokenizer files; checked before it is reported: moelab's logits equal transformers' to 1e-4."""
    path = Path(path).resolve()
    check_output_dir(out, CHECKPOINT_KIND, inputs=[path], overwrite=overwrite)
    model = moelab_model(path)
    with StagedOutput(out, CHECKPOINT_KIND, inputs=[path], overwrite=overwrite) as staging:
        write_model_files(model, staging)
        for side in side_files(path):
            copy_side_file(side, staging / side.name, path)
        _check_logits(path, model, quiet)
    return Path(out)


def _transformers_config(path: str | os.PathLike):
    """transformers' config object of the checkpoint (its class defaults filled in; local files
    only, no remote code)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def _problems(path: str | os.PathLike, ckpt: Checkpoint | None, family: str | None) -> list[str]:
    if family in (None, NATIVE.name):  # config.json's model_type (None) or the adapter's name
        return ["no transformers model_type: it is a moelab checkpoint already (moelab.models.load_pretrained)"]
    if family not in CONVERTIBLE_FAMILIES:
        return [f"model_type {family!r}; moelab converts {' and '.join(CONVERTIBLE_FAMILIES)} checkpoints"]
    config, problems = _transformers_config(path), []
    dim, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * heads != dim:
        problems.append(f"a head width of {head_dim} where moelab's is hidden_size / heads = {dim // heads}")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"scaled RoPE ({rope['rope_type']})")
    if config.hidden_act not in ("silu", "swish"):
        problems.append(f"the activation {config.hidden_act!r} (moelab's experts are SwiGLU)")
    window = getattr(config, "sliding_window", None)
    if family == "qwen2_moe" and "sliding_attention" not in config.layer_types:
        window = None  # transformers' rule: only layers that layer_types names slide
    if window is not None and window < config.max_position_embeddings:
        problems.append(
            f"sliding-window attention ({window} positions, under max_position_embeddings "
            f"{config.max_position_embeddings}; moelab's attention sees every position)"
        )
    if family == "qwen2_moe" and config.decoder_sparse_step < 1:
        problems.append(f"decoder_sparse_step {config.decoder_sparse_step} (every how many layers one is MoE: >= 1)")
    elif family == "qwen2_moe" and "moe" not in _qwen2_layer_kinds(config):
        problems.append("no MoE layers (mlp_only_layers, decoder_sparse_step or num_experts 0 make every layer dense)")
    if family == "qwen2_moe":
        layers = range(config.num_hidden_layers)
        biases = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in layers for p in "qkv"]
        if any(key in ckpt and bool(ckpt.get(key).any()) for key in biases):
            problems.append("attention biases that are not zero (moelab's attention has none)")
    return problems


def _model_config(config, family: str, ckpt: Checkpoint, shared_form: str | None = None) -> ModelConfig:
    """moelab's config of the same decoder (see `moelab.hf.export._hf_config`, its inverse; the
    balance loss's coefficient is router_aux_loss_coef converted by `hf_aux_loss_coef`). The
    embedding ties to the output head where config.json says so and the checkpoint stores no other
    head (transformers' rule).
    shared_form: `_exported_shared`'s reading of Qwen2-MoE's shared experts."""
    common = dict(
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        max_seq_len=config.max_position_embeddings,
        rope_theta=float(config.rope_parameters["rope_theta"]),
        norm_eps=float(config.rms_norm_eps),
        tie_embeddings=bool(config.tie_word_embeddings) and not _stores_own_head(ckpt),
    )
    moe = dict(dim=config.hidden_size, router="topk", score_func="softmax", top_k=config.num_experts_per_tok)

    def moe_config(moe_layers: int) -> MoEConfig:
        """MoEConfig(**moe), checked before its balance_coef is converted (top_k 0 divides by zero)."""
        checked = MoEConfig(**moe)
        coef = hf_aux_loss_coef(float(config.router_aux_loss_coef), checked.top_k, moe_layers, inverse=True)
        return dataclasses.replace(checked, balance_coef=coef)

    if family == "mixtral":
        moe |= dict(num_experts=config.num_local_experts, hidden_dim=config.intermediate_size, renormalize=True)
        return ModelConfig(**common, moe=moe_config(common["n_layers"]))
    shared = 0 if shared_form == "none" else config.shared_expert_intermediate_size
    moe |= dict(
        num_experts=config.num_experts,
        hidden_dim=config.moe_intermediate_size,
        renormalize=bool(config.norm_topk_prob),
        num_shared=1 if shared else 0,
        shared_hidden_dim=shared or None,
        shared_gate=bool(shared) and shared_form != "ungated",
    )
    kinds = _qwen2_layer_kinds(config)
    return ModelConfig(
        **common, moe=moe_config(kinds.count("moe")), **_layer_pattern(kinds), dense_hidden_dim=config.intermediate_size
    )


def _qwen2_layer_kinds(config) -> list[str]:
    """"dense" or "moe" for each layer of a Qwen2-MoE config (transformers' rule: MoE where there are
    experts, the layer is not in mlp_only_layers and its 1-based number is a multiple of
    decoder_sparse_step >= 1)."""
    dense, step = set(config.mlp_only_layers or []), config.decoder_sparse_step
    sparse = [config.num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(config.num_hidden_layers)]
    return ["moe" if is_sparse else "dense" for is_sparse in sparse]


def _layer_pattern(kinds: list[str]) -> dict:
    """ModelConfig's fields for the layer kinds ("dense"/"moe" per layer): first_k_dense and
    moe_every where they place them (as a moelab config would say it), else layer_types."""
    if "moe" in kinds:
        first = kinds.index("moe")
        step = next((i - first for i in range(first + 1, len(kinds)) if kinds[i] == "moe"), 1)
        placed = ["moe" if i >= first and (i - first) % step == 0 else "dense" for i in range(len(kinds))]
        if placed == kinds:
            return dict(first_k_dense=first, moe_every=step)
    return dict(layer_types=kinds)


def _stores_own_head(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint stores an output head other than its embedding."""
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    return head in ckpt and embedding in ckpt and not torch.equal(ckpt.get(head), ckpt.get(embedding))


def moelab_config(path: str | os.PathLike, checkpoint: Checkpoint | None = None) -> ModelConfig:
    """moelab's config of the transformers checkpoint at `path` (read through `checkpoint` where it
    is open already); refuses what does not convert exactly (`conversion_problems`)."""
    if checkpoint is None:
        _, checkpoint, _ = resolve(path)
        try:
            return moelab_config(path, checkpoint)
        finally:
            checkpoint.close()
    if problems := conversion_problems(path, checkpoint):
        _refuse(path, problems)
    family, config = checkpoint_family(path), _transformers_config(path)
    shared_form = None
    if family == "qwen2_moe":
        raw = read_json_object(Path(path) / "config.json", "a model config")
        shared_form = _exported_shared(checkpoint, raw, config.num_hidden_layers)
    try:
        return _model_config(config, family, checkpoint, shared_form)
    except ValueError as err:
        raise ValueError(f"{path}/config.json: {err}") from None


def _refuse(path: str | os.PathLike, problems: list[str]) -> None:
    """Raise the ValueError that says why the checkpoint at `path` does not convert (`problems`)."""
    raise ValueError(f"{path} cannot run as a moelab model exactly: it has " + "; ".join(problems))


def moelab_tensors(
    ckpt: Checkpoint, config: Config, family, n_layers: int, *, routed: bool = True
) -> dict[str, Tensor]:
    """Every tensor of the checkpoint under its moelab name: MoE blocks through their views into
    moelab's layout, the rest renamed (`moelab.hf.export.NAME_PAIRS`); Qwen2-MoE's zero attention
    biases dropped. routed=False: without the routed experts (none of them read: an offloaded
    model reads them one at a time)."""
    native = NATIVE.layouts[0]
    tensors, read = {}, set()
    shared_form = _exported_shared(ckpt, config, n_layers) if family.name == "qwen2_moe" else None
    meta = None if routed else ckpt.with_shapes_only()
    try:
        for index in range(n_layers):
            layer = family.read_layer(ckpt, config, index, meta)
            if not isinstance(layer, MoELayerView):
                continue
            prefix, source = NATIVE.layer_prefix.format(n=index), family.layer_prefix.format(n=index)
            tensors |= native.router.encode(layer.router, prefix)
            if routed:
                tensors |= native.experts.encode(layer.experts, prefix)
            layout = family.layout_of(ckpt, index)
            read |= set(layout.router.keys(ckpt, source) + layout.experts.keys(ckpt, source))
            if layer.shared is not None:
                if shared_form != "none":
                    tensors |= native.shared.encode(_as_moelab_shared(layer.shared, shared_form), prefix)
                names = (layout.shared.gate, layout.shared.up, layout.shared.down, layout.shared.sigmoid_gate)
                read |= {source + name for name in names if name is not None}
    finally:
        if meta is not None:
            meta.close()
    for key in ckpt.keys():
        if key in read or (family.name == "qwen2_moe" and _ATTENTION_BIAS.fullmatch(key)):
            continue  # Qwen2-MoE's attention biases: zero (`_problems`)
        if key.endswith(".rotary_emb.inv_freq"):
            continue  # older checkpoints store RoPE's frequencies, which both models compute (transformers skips them)
        name = renamed(key, to_transformers=False)
        if name is None:
            raise CheckpointError(
                f"the checkpoint tensor {key!r} has no counterpart in a moelab model of its config.json (a layer "
                "past num_hidden_layers, or a module moelab's decoder lacks): check that config.json belongs to "
                "these weights"
            )
        tensors[name] = ckpt.get(key)
    return tensors


def _exported_shared(ckpt: Checkpoint, config: Config, n_layers: int) -> str | None:
    """How a Qwen2-MoE checkpoint's sigmoid-gated shared experts read in moelab, undoing what
    `moelab export` writes for a model without a gated one (`moelab.hf.export._qwen2_shared`), so that
    the round trip gives that model back bit for bit: "none" where every MoE layer's shared expert
    is all zero and 1 wide (it adds 0), "ungated" where every layer's gate is zero and its down
    projection halves exactly (sigmoid(0) = 1/2 times down is down / 2 without the gate), else None
    (as stored). A shared expert of no width (shared_expert_intermediate_size 0) adds 0 whatever its
    gate: "none" for it. Reads the shared experts only while the layers seen so far allow one of the two."""
    family = FAMILIES["qwen2_moe"]
    forms = {"none", "ungated"}
    meta = ckpt.with_shapes_only()
    try:
        for index in range(n_layers):
            if not forms:
                return None
            layer = family.read_layer(ckpt, config, index, meta)
            if not isinstance(layer, MoELayerView):
                continue
            shared = layer.shared
            if shared is not None and shared.up.shape[0] == 0:
                forms -= {"ungated"}
                continue
            if shared is None or shared.sigmoid_gate is None or shared.sigmoid_gate.any():
                return None
            zero = shared.up.shape[0] == 1 and not any(t is not None and t.any() for t in (shared.gate, shared.up, shared.down))
            forms -= set() if zero else {"none"}
            forms -= set() if torch.equal(shared.down / 2 * 2, shared.down) else {"ungated"}
    finally:
        meta.close()
    return "none" if "none" in forms else next(iter(forms), None)


def _as_moelab_shared(shared: SharedView, form: str | None) -> SharedView:
    """A Qwen2-MoE shared expert as moelab's: as stored, or ungated ("ungated": its zero gate's
    sigmoid(0) = 1/2 moved into the down projection, see `_exported_shared`)."""
    if form != "ungated":
        return shared
    return dataclasses.replace(shared, down=shared.down / 2, sigmoid_gate=None)


def _check_logits(path: Path, model: MoETransformer, quiet: bool) -> None:
    """moelab's logits equal transformers' to 1e-4 (relative to their scale), in float32, on the
    first `_checked_layers` layers (both models cut there; see the module docstring)."""
    from moelab.hf.loading import load_causal_lm
    from moelab.hf.postconditions import postcondition_error

    layers = _checked_layers(model.config)
    # a float8 source: transformers dequantizes in the dtype it loads, moelab in the model's (bf16)
    quantized = read_json_object(path / "config.json", "a model config").get("quantization_config")
    reference = load_causal_lm(
        path,
        quiet=quiet,
        dtype=torch.float32 if quantized is None else next(model.parameters()).dtype,
        num_hidden_layers=layers,
        allow_unexpected=True,
    ).float()
    kinds = model.config.layer_types
    cfg = dataclasses.replace(model.config, n_layers=layers, layer_types=None if kinds is None else kinds[:layers])
    kept = {n: t.float() for n, t in model.state_dict().items() if _layer_index(n) < layers}
    if cfg.tie_embeddings:
        del kept["lm_head.weight"]
    cut = _assembled(cfg, kept)
    ids = torch.randint(
        0, cfg.vocab_size, (2, min(cfg.max_seq_len, 16)), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
        got = cut(ids).logits
    scale = max(1.0, expected.abs().max().item())
    error = (got - expected).abs().max().item()
    if not torch.isfinite(got).all() or error > 1e-4 * scale:
        raise postcondition_error(
            f"the converted model's logits differ from transformers' by {error:.3g} (max |logit| {scale:.3g})"
        )


def _checked_layers(config: ModelConfig) -> int:
    """How many of the first layers `_check_logits` runs: up to the second MoE layer, and at least
    to the first layer of every kind the model has (each kind converts by its own names)."""
    kinds = config.layer_kinds
    moe = [i for i, kind in enumerate(kinds) if kind == "moe"]
    firsts = [kinds.index(kind) for kind in set(kinds)]
    return max([*firsts, *moe[1:2]]) + 1


def _layer_index(name: str) -> int:
    """The decoder layer of a moelab tensor name (-1 outside the layers)."""
    return int(name.split(".")[1]) if name.startswith("layers.") else -1
