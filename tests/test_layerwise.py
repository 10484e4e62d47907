"""moelab.hf.layerwise: a checkpoint run one decoder layer at a time computes what the whole
model computes, layer by layer, for every supported family and for moelab's own models."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from hf_tiny import TINY, block_choices, build, load
from safetensors.torch import load_file, save_file

from moelab.hf import CheckpointError
from moelab.hf.layerwise import LayerwiseModel
from moelab.hf.modules import decoder_layers
from moelab.models import MoETransformer, save_pretrained, tiny
from moelab.nn.moe import MoELayer


def layer_outputs(model, ids: torch.Tensor, num_layers: int, call) -> list[torch.Tensor]:
    """What the decoder layers of the in-memory `model` output on `ids`, in the order they run (each
    layer once, but Inkling 2 Loop's looped layers once a pass)."""
    _, layers = decoder_layers(model, num_layers)
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    with torch.no_grad():
        call(ids)
    for handle in handles:
        handle.remove()
    return outputs


def run_layerwise(path, batches, run_moe=None) -> list[list[torch.Tensor]]:
    """Per step of `LayerwiseModel.schedule` (per layer, but for a loop's), the outputs of every batch."""
    return run_steps(LayerwiseModel(path), batches, run_moe)


def run_steps(runner: LayerwiseModel, batches, run_moe=None, routing=None) -> list[list[torch.Tensor]]:
    """`run_layerwise` with `runner`; routing: a dict given {MoE layer: per batch, the (indices [T, K],
    weights [T, K]) its router computed}."""
    states = runner.embed(batches)
    per_layer = []
    for step, i in enumerate(runner.schedule):
        with runner.layer(i, run_moe=run_moe, step=step) as run:
            routers = [m.router for m in runner.model.modules() if isinstance(m, MoELayer) and routing is not None]
            hooks = [r.register_forward_hook(lambda m, a, out, i=i: routing.setdefault(i, []).append(out[:2])) for r in routers]
            states = [run(b, h) for b, h in enumerate(states)]
            for hook in hooks:
                hook.remove()
        per_layer.append(states)
        assert all(p.is_meta for p in runner.model.parameters()), "a layer's weights stayed in memory"
    return per_layer


def assert_layers_are_transformers(path, model, batches: list[torch.Tensor]) -> None:
    """Every decoder layer run layer by layer from checkpoint `path` outputs, on every batch of ids,
    what it outputs in transformers' full forward of `model` (atol, rtol 1e-5)."""
    got = run_layerwise(path, batches)
    for b, ids in enumerate(batches):
        expected = layer_outputs(model, ids, LayerwiseModel(path).num_layers, lambda x: model(input_ids=x))
        assert len(expected) == len(got)
        for i, out in enumerate(expected):
            torch.testing.assert_close(got[i][b], out, atol=1e-5, rtol=1e-5, msg=f"step {i}, batch {b}")


@pytest.mark.parametrize("family", list(TINY))
def test_every_family_layer_by_layer(tmp_path, family, one_thread):
    """On a batch of 36 tokens (past every tiny model's sliding window and Llama 4's 32-token chunks) and
    one of 5, every layer outputs what it outputs in transformers' forward, every MoE layer routes as
    transformers' block does (`block_choices`) and the output head's gradients are transformers' autograd's."""
    torch.manual_seed(0)
    model = build(family).eval()
    model.save_pretrained(tmp_path)
    batches = [torch.randint(0, 64, (2, 36)), torch.randint(0, 64, (1, 5))]
    runner, routing = LayerwiseModel(tmp_path), {}
    got = run_steps(runner, batches, routing=routing)
    head = runner.head_gradients(batches, got[-1], 1.0)
    for b, ids in enumerate(batches):
        used, hooks = block_choices(model, family)
        expected = layer_outputs(model, ids, runner.num_layers, lambda x: model(input_ids=x))
        for hook in hooks:
            hook.remove()
        for i, out in enumerate(expected):
            torch.testing.assert_close(got[i][b], out, atol=1e-5, rtol=1e-5, msg=f"layer {i}, batch {b}")
        assert sorted(used) == sorted(routing) == runner.moe_layers
        for i, ((index, weights),) in used.items():
            assert_routes_as(runner.view.layer(i).router, routing[i][b], index, weights, f"layer {i}, batch {b}")
        torch.testing.assert_close(head[b], head_gradients(model, ids, runner.num_layers), atol=1e-5, rtol=1e-5)


def assert_routes_as(router, routing, index: torch.Tensor, weights: torch.Tensor, msg: str) -> None:
    """moelab's routing (indices, weights [T, K]) chose, for each token, the experts transformers' block
    handed its experts (index [T, K]) with their weights (times the scale a block applies after its
    experts: `RouterView.scaled_after_experts`); a skipped slot (ZAYA's) is handed on as expert 0, weight 0."""
    indices, got = routing
    scale = router.route_scale if router.scaled_after_experts else 1
    if router.identity is not None and router.identity.returns == "zero":
        skipped = indices >= router.num_experts
        indices, got = indices.masked_fill(skipped, 0), got.masked_fill(skipped, 0)
    order, expected_order = indices.argsort(-1), index.long().argsort(-1)
    assert torch.equal(indices.gather(-1, order), index.long().gather(-1, expected_order)), msg
    expected = weights.float().gather(-1, expected_order) * scale
    torch.testing.assert_close(got.gather(-1, order), expected, atol=1e-6, rtol=1e-5, msg=msg)


def head_gradients(model, ids: torch.Tensor, num_layers: int) -> torch.Tensor:
    """transformers' gradient of the summed next-token cross-entropy of each sequence of ids [B, S]
    with respect to the last decoder layer's output [B, S, D] (`LayerwiseModel.head_gradients`)."""
    _, layers = decoder_layers(model, num_layers)
    grads = []
    for row in ids:
        held = []

        def leaf(module, args, out):
            held.append((out[0] if isinstance(out, tuple) else out).detach().requires_grad_(True))
            return (held[0], *out[1:]) if isinstance(out, tuple) else held[0]

        hook = layers[-1].register_forward_hook(leaf)
        logits = model(input_ids=row[None]).logits[0, :-1]
        hook.remove()
        loss = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
        grads.append(torch.autograd.grad(loss, held)[0])
    return torch.cat(grads)


@pytest.mark.parametrize("family", list(TINY))
def test_every_family_backward_sweep_is_transformers_autograd(tmp_path, family, one_thread):
    """head_gradients, then layer_backward from the top layer down, give the gradient of the summed
    cross-entropy with respect to every decoder layer's input that transformers' autograd gives (Gemma 4's
    embedding output also feeds its per-layer inputs, a path that is no layer's: cut in the reference)."""
    model = build(family)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    runner = LayerwiseModel(tmp_path)
    states = runner.embed([ids])
    taped = []
    for i in range(runner.num_layers):
        taped.append((states[0], list(runner.carry)))
        with runner.layer(i) as run:
            states[0] = run(0, states[0])
    grads = runner.head_gradients([ids], states, 1.0)
    ours = {}
    for i in reversed(range(runner.num_layers)):
        hidden, runner.carry = taped[i]
        with runner.layer_backward(i) as vjp:
            grads[0] = ours[i] = vjp(0, hidden, grads[0])
    _, layers = decoder_layers(model, runner.num_layers)
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs.update({i: kwargs.get("hidden_states", args[0] if args else None)}),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    projection = getattr(model.base_model, "per_layer_model_projection", None)
    if projection is not None:
        hooks.append(projection.register_forward_pre_hook(lambda m, args: (args[0].detach(),)))
    logits = model(input_ids=ids, use_cache=False).logits
    for hook in hooks:
        hook.remove()
    for x in inputs.values():
        x.retain_grad()
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    for i in range(runner.num_layers):
        torch.testing.assert_close(ours[i], inputs[i].grad, atol=1e-5, rtol=1e-5, msg=f"layer {i}")


@pytest.mark.parametrize("shared", [0, 1])
def test_moelab_models_layer_by_layer(tmp_path, shared, one_thread):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), moe=dataclasses.replace(tiny().moe, num_shared=shared))
    model = MoETransformer(cfg).eval()
    save_pretrained(model, tmp_path / "m")
    batches = [torch.randint(0, cfg.vocab_size, (2, 9))]
    got = run_layerwise(tmp_path / "m", batches)
    expected = layer_outputs(model, batches[0], cfg.n_layers, model)
    for i, out in enumerate(expected):
        torch.testing.assert_close(got[i][0], out, atol=1e-5, rtol=1e-5)


def test_run_moe_computes_the_block(tmp_path, one_thread):
    """A caller's run_moe replaces the block's computation: its result is what the layer adds."""
    torch.manual_seed(0)
    build("mixtral").save_pretrained(tmp_path)
    batches = [torch.randint(0, 64, (2, 7))]
    seen = []

    def run_moe(moe, x, context=None):
        seen.append((type(moe).__name__, tuple(x.shape)))
        return torch.zeros_like(x)

    zeroed = run_layerwise(tmp_path, batches, run_moe)
    plain = run_layerwise(tmp_path, batches)
    assert seen == [("MoELayer", (2, 7, 32))] * 2
    assert not torch.allclose(zeroed[0][0], plain[0][0])


def test_layer_needs_embed_first(tmp_path):
    build("mixtral").save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="call embed"):
        with LayerwiseModel(tmp_path).layer(0):
            pass


@pytest.mark.parametrize("stores_head", [True, False], ids=["own-head", "no-head"])
def test_config_tied_head_is_read_as_transformers_reads_it(tmp_path, stores_head, one_thread):
    """config.json ties the embeddings: transformers keeps a stored output head that differs from
    the embedding (and ties a head that is not stored to it); the head gradients follow it."""
    build("mixtral").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    if not stores_head:
        tensors = load_file(tmp_path / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reference = load(tmp_path)
    assert torch.equal(reference.lm_head.weight, reference.model.embed_tokens.weight) != stores_head
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    runner = LayerwiseModel(tmp_path)
    states = runner.embed([ids])
    for i in range(runner.num_layers):
        with runner.layer(i) as run:
            states = [run(0, h) for h in states]
    got = runner.head_gradients([ids], states, 1.0)[0]
    h = states[0].detach().clone().requires_grad_(True)
    logits = reference.lm_head(reference.model.norm(h))[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    (expected,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "value,message",
    [
        (torch.ones(1), r"input_layernorm\.weight is \[1\] but config\.json makes it \[32\]"),
        (torch.full((32,), float("nan")), r"NaN or Inf in model\.layers\.1\.input_layernorm\.weight"),
    ],
    ids=["shape", "nan"],
)
def test_a_layer_tensor_config_json_does_not_describe_or_corrupt_is_refused(tmp_path, value, message):
    """A decoder layer's norm stored as [1] (it would broadcast) or holding NaN is named, not run."""
    build("mixtral").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.input_layernorm.weight"] = value
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    runner = LayerwiseModel(tmp_path)
    runner.embed([torch.randint(0, 64, (1, 5))])
    with pytest.raises(CheckpointError, match=message):
        with runner.layer(1):
            pass


def test_a_fused_tensor_config_json_does_not_describe_is_refused(tmp_path):
    """Sarvam-MoE's fused attention.query_key_value (q, k and v rows, split on loading) one row short:
    named, not read off by one."""
    build("sarvam_moe").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.attention.query_key_value.weight"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    runner = LayerwiseModel(tmp_path)
    runner.embed([torch.randint(0, 64, (1, 5))])
    message = rf"{key} has 63 rows but config\.json makes its parts self_attn\.q_proj\., .* 64"
    with pytest.raises(CheckpointError, match=message):
        with runner.layer(1):
            pass


def test_float16_runs_keep_in_float32_what_transformers_keeps(tmp_path):
    """GPT-OSS in float16: the norms transformers keeps in float32 (`_keep_in_fp32_modules`) load so
    in the layers and outside them (the final norm the output head's gradient goes through)."""
    build("gpt_oss").save_pretrained(tmp_path)
    want = {n: p.dtype for n, p in load(tmp_path, dtype=torch.float16).named_parameters()}
    with LayerwiseModel(tmp_path, dtype=torch.float16) as runner:
        runner.embed([torch.randint(0, 64, (1, 6))])
        with runner._outside_layers(head=True):
            assert {n: p.dtype for n, p in runner.model.named_parameters() if ".layers." not in n} == {
                n: d for n, d in want.items() if ".layers." not in n
            }
        with runner.layer(0):
            layer = runner.model.model.layers[0]
            assert layer.input_layernorm.weight.dtype == torch.float32 == want["model.layers.0.input_layernorm.weight"]
            assert layer.self_attn.q_proj.weight.dtype == torch.float16


def test_buffers_take_the_dtype_transformers_gives_them(tmp_path):
    """transformers casts each stored tensor to the dtype of the tensor it fills (the run's dtype for
    floating ones, their own for integer and bool buffers: Qwen4-Exp's n-gram sizes), whatever the
    checkpoint stores it as: a float buffer stored as integers runs as floats, an int64 buffer stored
    as int32 stays int64, a bool mask stored as uint8 stays bool."""
    from moelab.hf.checkpoint import Checkpoint
    from moelab.hf.layerwise import load_tensors

    module = torch.nn.Module()
    module.register_buffer("scale", torch.zeros(3))
    module.register_buffer("sizes", torch.zeros(3, dtype=torch.int64))
    module.register_buffer("mask", torch.zeros(3, dtype=torch.bool))
    save_file(
        {"scale": torch.tensor([1, 2, 3], dtype=torch.int32), "sizes": torch.tensor([5, 7, 11], dtype=torch.int32),
         "mask": torch.tensor([1, 0, 1], dtype=torch.uint8)}, tmp_path / "model.safetensors",
    )  # fmt: skip
    with Checkpoint(tmp_path) as ckpt:
        load_tensors(module, ckpt, torch.bfloat16)
    assert module.scale.dtype == torch.bfloat16 and module.scale.tolist() == [1, 2, 3]
    assert module.sizes.dtype == torch.int64 and module.sizes.tolist() == [5, 7, 11]
    assert module.mask.dtype == torch.bool and module.mask.tolist() == [True, False, True]


def test_a_stored_tensor_may_hold_more_rows_than_the_skeleton_and_no_other_shape():
    """A vocabulary padded past the skeleton's (Inkling 2's unembedding: 8192 rows for a text
    vocabulary of 64) is read as stored; fewer rows (an embedding of another vocabulary: token ids
    past it were an IndexError) or another width are refused, naming both shapes."""
    from types import SimpleNamespace

    from moelab.hf.layerwise import _cast

    checkpoint, like = SimpleNamespace(directory="ckpt"), torch.empty(6, 4, device="meta")
    assert _cast(checkpoint, "unembed", torch.ones(8, 4), like, torch.float32, weight=True).shape == (8, 4)
    for shape in ((4, 4), (6, 5), (6, 4, 1)):
        with pytest.raises(CheckpointError, match=re.escape(f"ckpt: w is {list(shape)} but config.json makes it [6, 4]")):
            _cast(checkpoint, "w", torch.ones(shape), like, torch.float32, weight=True)
