"""LongCat-Flash (`longcat_flash`): each MoE block's router chooses among E experts and Z identity
(zero-computation) experts, a slot on one of which adds its weight times the block's input.

The family-wide tests (tests/hf_tiny.py's TINY) check the view against transformers' block, the
writer, every method, layer-by-layer and offloaded runs; here what is LongCat's own: both kinds of
choice are made, the identity experts' router rows survive every edit, the release's layout (gate
and up stored for the E experts alone, which transformers 5.24 cannot load: it sizes gate_up for
E + Z) is read and written back as it is, and configs moelab cannot read are refused.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hf_tiny import D, build, load
from safetensors.torch import load_file, save_file

from moelab.compress.observers import RoutingObserver, Tokens, eager_moe
from moelab.hf import CheckpointError, drop_experts, open_checkpoint
from moelab.hf.edit import moe_output
from moelab.hf.native import moe_layer_from_view
from moelab.offload import load_offloaded
from moelab.offload.model import generate_ids

pytestmark = pytest.mark.usefixtures("one_thread")

E, Z = 4, 2  # the tiny model's experts and identity experts (top-2 of the 6)


def _saved(tmp_path, **overrides):
    path = tmp_path / "src"
    build("longcat_flash", **overrides).save_pretrained(path)
    return path


def _as_released(path) -> None:
    """Strip the gate and up projections transformers saves for the identity experts (entries E..E+Z-1):
    the layout the release stores."""
    tensors = load_file(path / "model.safetensors")
    save_file(
        {k: t for k, t in tensors.items() if not any(f"experts.{e}." in k for e in range(E, E + Z))},
        path / "model.safetensors",
        metadata={"format": "pt"},
    )


def test_the_router_spans_experts_and_identity_experts_and_tokens_choose_both(tmp_path):
    path = _saved(tmp_path)
    with open_checkpoint(path) as view:
        layer = view.layer(0)
    assert layer.router.num_experts == E and layer.router.identity_experts == Z and layer.experts.num_experts == E
    model = load(path)
    torch.testing.assert_close(  # the view's rows are the classifier's, the identity experts' last
        layer.router.with_identity_rows("weight"), model.model.layers[0].mlp.router.classifier.weight
    )
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    chosen = moe_layer_from_view(layer).router(x).indices
    assert (chosen >= E).any() and (chosen < E).any(), "the tiny model should route to both kinds"
    # a token whose slots all went to identity experts runs no expert: the block adds w * x alone
    assert ((chosen >= E).all(-1) | (chosen < E).any(-1)).all()


def test_soft_counts_leave_the_identity_experts_share_out(tmp_path):
    """S-prune's soft counts sum each expert's probability as the router gives it over the E + Z
    choices, not renormalised over the E experts: a token that sends mass to identity experts runs
    fewer experts, and its smaller share is that usage (as the top-k counts, which leave out its
    identity slots)."""
    with open_checkpoint(_saved(tmp_path)) as view:
        moe = moe_layer_from_view(view.layer(0))
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    probs = moe.router(x).probs  # [T, E + Z]
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    call = eager_moe(moe, x)
    observer = RoutingObserver(E, 1, D, {})
    first = torch.zeros(64, dtype=torch.int64)  # every token of source 0, half 0
    observer.update(call, Tokens(first, first, torch.arange(64)), x)
    soft = observer.result()["soft_counts"][0, 0]
    torch.testing.assert_close(soft, probs[:, :E].double().sum(0))
    assert float(soft.sum()) < 64 - 1  # the identity experts' share (a token's whole mass would be 1)


@pytest.mark.parametrize("layout", ["saved", "released"])
def test_pruning_keeps_the_identity_experts_rows_and_the_stored_layout(tmp_path, layout):
    """Dropping experts 1 and 2: the router keeps rows [0, 3] and then the identity experts' rows
    (with their correction bias) unchanged; gate and up are written for the identity experts too
    where the source stored them (transformers' save: it then reloads strictly), not where it did
    not (the release's layout)."""
    src, out = _saved(tmp_path), tmp_path / "out"
    if layout == "released":
        _as_released(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drop_experts(src, out, {0: [1, 2], 1: [1, 2]}, quiet=True)
    skipped = [w for w in caught if "reload check was skipped" in str(w.message)]
    assert len(skipped) == (layout == "released"), [str(w.message) for w in caught]
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    prefix = "model.layers.0.mlp."
    for name in ("router.classifier.weight", "router.e_score_correction_bias"):
        rows = before[prefix + name]
        assert torch.equal(after[prefix + name], torch.cat([rows[[0, 3]], rows[E:]]))
    gates = sorted(k for k in after if k.startswith(prefix + "experts.") and k.endswith("gate_proj.weight"))
    padded = layout == "saved"
    assert len(gates) == 2 + (Z if padded else 0)
    assert not any(k.endswith(f"experts.{2 + Z if padded else 2}.gate_proj.weight") for k in gates)
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 2
    assert json.loads((out / "config.json").read_text())["zero_expert_num"] == Z
    if padded:
        torch.testing.assert_close(after[prefix + "experts.2.gate_proj.weight"], torch.zeros(16, D))
        load(out)  # strictly: the identity experts' gate and up are there, as transformers sizes them
    with open_checkpoint(out) as view:
        layer = view.layer(0)
    assert layer.router.num_experts == 2 and layer.router.identity_experts == Z


def test_the_released_layout_reads_as_the_saved_one(tmp_path):
    saved = _saved(tmp_path)
    released = tmp_path / "released"
    build("longcat_flash").save_pretrained(released)
    _as_released(released)
    x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with open_checkpoint(saved) as a, open_checkpoint(released) as b:
        for index in range(2):
            torch.testing.assert_close(moe_output(a.layer(index), x), moe_output(b.layer(index), x), rtol=0, atol=0)


def test_parameter_counts_leave_out_the_identity_experts_unused_gate_and_up(tmp_path):
    """transformers' save stores gate and up for the identity experts, which nothing reads: the
    counts are the release layout's, and a token's active routed experts are at most top_k of them."""
    from moelab.eval.evaluate import parameter_counts

    saved, released = _saved(tmp_path), tmp_path / "released"
    build("longcat_flash").save_pretrained(released)
    _as_released(released)
    counts = parameter_counts(saved)
    assert counts == parameter_counts(released)
    stored = load_file(saved / "model.safetensors")
    unused = sum(t.numel() for k, t in stored.items() if any(f"experts.{e}." in k for e in range(E, E + Z)))
    assert unused == 2 * Z * 2 * 16 * D and counts["total"] == sum(t.numel() for t in stored.values()) - unused
    assert counts["routed_experts"] == 2 * E * 3 * 16 * D
    assert counts["active"] == counts["total"] - counts["routed_experts"] // 2  # top-2 of the 4


def test_offloaded_decoding_in_a_memory_budget_with_its_two_attention_caches(tmp_path):
    """Decoding offloaded within a budget that keeps room for the KV cache of both attention
    sublayers of every layer gives transformers' greedy tokens."""
    path = _saved(tmp_path)
    model = load(path)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    want = generate_ids(model, ids, 8)
    offloaded = load_offloaded(path, memory_budget=10**9, kv_cache_tokens=14)
    try:
        assert torch.equal(offloaded.generate(ids, 8), want)
    finally:
        offloaded.close()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(zero_expert_type="zero"), "zero_expert_type 'zero'; moelab reads identity"),
        (dict(norm_topk_prob=True), "sets norm_topk_prob: the release's own code renormalises"),
        # transformers' router computes x @ classifier.weight alone, whatever router_bias says
        (dict(router_bias=True), "sets router_bias: the release's own code adds the classifier's bias"),
    ],
)
def test_configs_moelab_cannot_read_are_refused(tmp_path, change, message):
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(CheckpointError, match=message), open_checkpoint(path) as view:
        view.layer(0)


def test_a_count_of_identity_experts_the_checkpoint_does_not_store_is_refused(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"zero_expert_num": 1}))
    with pytest.raises(CheckpointError, match=r"config says 4 experts \(n_routed_experts\) and 1 identity experts.* 6 \(router rows\)"):
        with open_checkpoint(path) as view:
            view.layer(0)
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")  # one identity expert's gate and up lost
    save_file({k: t for k, t in tensors.items() if "experts.5." not in k}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="gate and up projections for 1 choices past its experts, but config.json gives 2"):
        with open_checkpoint(path) as view:
            view.layer(0)


def test_the_writer_takes_top_k_among_the_experts_and_the_identity_experts(tmp_path):
    """top_k = 4 of 4 experts and 2 identity experts: keeping 2 experts still leaves 4 choices; 1 does not."""
    src = _saved(tmp_path, moe_topk=4)
    drop_experts(src, tmp_path / "two", {0: [1, 2], 1: [1, 2]}, quiet=True)
    with open_checkpoint(tmp_path / "two") as view:
        assert view.layer(0).router.num_choices == 4
    with pytest.raises(ValueError, match=r"leaves 1 experts beside its 2 identity experts .* keep at least 2 experts"):
        drop_experts(src, tmp_path / "one", {0: [1, 2, 3], 1: [1, 2, 3]}, quiet=True)

