"""Qwen4-Exp (qwen4_exp_text), read by the structural fallback: its per-layer embedding (PLE) layers
hold an n-gram embedding table that the releases store as `split_ngram_parts` shards,
`ngram_embedding.shard_{i}.weight`, which transformers concatenates along dim 0 on loading
(`Family.stored_shards`, from transformers' conversion mapping). The layer-by-layer run and offloaded
decoding read them so; the writer copies them as stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_tiny import WIDTHS, build, load
from safetensors import safe_open
from test_layerwise import assert_layers_are_transformers
from transformers import PreTrainedTokenizerFast

from moelab.compress import CalibrationOptions, compress
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import open_checkpoint
from moelab.offload import load_offloaded
from moelab.offload.model import kv_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = CalibrationOptions(tokens=256, seq_len=32, batch_size=4, sample_tokens=32)
SHARDS = 12  # more than 10: shard_10 comes after shard_9, not after shard_1
QWEN4_EXP = dict(
    WIDTHS, vocab_size=8192, head_dim=8, num_experts=4, shared_expert_intermediate_size=24,
    layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8, hc_count=2, hc_lowrank=8, ple_layer_ids=[1], ple_embed_dim=16,
    heads_per_ngram=2, ngram_vocab_size_base=100, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=SHARDS,
    indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4,
    eos_token_id=2, pad_token_id=0,
)  # fmt: skip
TABLE = "model.layers.0.ple.ple_embedding.ngram_embedding"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen4_exp") / "src"
    build("qwen4_exp_text", **QWEN4_EXP).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    with safe_open(path / "model.safetensors", "pt") as f:
        stored = {k for k in f.keys() if k.startswith(TABLE)}
    assert stored == {f"{TABLE}.shard_{i}.weight" for i in range(SHARDS)}
    return path


def test_every_layer_s_output_is_transformers(source):
    """Layer 0 (PLE) reads the n-gram table from its shards, and its integer buffers (the n-gram
    heads' vocabulary sizes and offsets) as stored."""
    with open_checkpoint(source) as view:
        assert view.family == "qwen4_exp_text (structural)"
    batches = [torch.randint(0, 8192, (2, 7)), torch.randint(0, 8192, (1, 5))]
    assert_layers_are_transformers(source, load(source), batches)


def test_reap_compresses_and_transformers_reloads_the_output(source, tmp_path):
    report = compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    assert set(report["layers"]) == {"0", "1"} and report["reload_checked"]
    with open_checkpoint(tmp_path / "out") as view:
        assert view.layer(1).router.num_experts == 2


def test_offloaded_decoding_gives_transformers_tokens(source):
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    want = load(source).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    offloaded = load_offloaded(source, resident=0.5)
    try:
        assert torch.equal(offloaded.generate(ids, 6), want)
    finally:
        offloaded.close()


def test_kv_bytes_per_token_count_the_indexer_key_its_indexed_layers_cache():
    """Qwen4-Exp's indexed attention layers cache their QSA indexer's key (indexer_head_dim wide, one
    per token: DynamicIndexedLayer.indexer_keys) beside their keys and values, and its first indexed
    layer the indexers' 3-D positions (indexer_position_ids: 3 int64 a token)."""
    model = build("qwen4_exp_text", **QWEN4_EXP).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 32, (2, 5)), use_cache=True).past_key_values
    held = sum(
        sum(getattr(layer, name).nbytes for name in ("keys", "values", "indexer_keys"))
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
    )
    positions = [layer.indexer_position_ids for layer in cache.layers if getattr(layer, "indexer_position_ids", None) is not None]
    assert len(positions) == 1 and positions[0].shape == (3, 2, 5) and positions[0].dtype == torch.long
    assert held and kv_bytes_per_token(model, torch.float32) * 2 * 5 == held + positions[0].nbytes


def test_easy_ep_is_refused_naming_the_hyper_connections(source, tmp_path):
    """EASY-EP's residual is the layer's output minus the block's: Qwen4-Exp's layers output hc_count
    streams, so calibration keeps no easyep_sums and EASY-EP says why."""
    with pytest.raises(ValueError, match="hyper-connections"):
        compress(source, tmp_path / "out", method="easy_ep", ratio=0.5, calib_options=SMALL, quiet=True)


def test_shards_that_differ_past_their_first_dim_are_refused(tmp_path):
    from safetensors.torch import save_file

    from moelab.hf import CheckpointError
    from moelab.hf.checkpoint import Checkpoint
    from moelab.hf.layerwise import read_shards, shard_keys

    save_file({"t.shard_0.w": torch.zeros(2, 3), "t.shard_1.w": torch.ones(1, 3), "u.shard_0.w": torch.zeros(2, 3),
               "u.shard_1.w": torch.zeros(2, 4)}, tmp_path / "model.safetensors")  # fmt: skip
    with Checkpoint(tmp_path) as ckpt:
        keys = shard_keys(ckpt, "t.w", (("w", "shard_*.w"),), ())
        assert keys == ["t.shard_0.w", "t.shard_1.w"]
        torch.testing.assert_close(read_shards(ckpt, keys), torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3]))
        with pytest.raises(CheckpointError, match="differ past their first dim"):
            read_shards(ckpt, shard_keys(ckpt, "u.w", (("w", "shard_*.w"),), ()))
