"""moelab.trace at its edges: what the manifest records, data files read in a fixed order and
line by line, shard boundaries, index widths, and outputs that must leave nothing behind."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import build

from moelab.hf import open_checkpoint
from moelab.io import OutputError
from moelab.models import MoETransformer, save_pretrained, tiny
from moelab.trace import (
    LayerRouting,
    RoutingCapture,
    TraceInfo,
    TraceOptions,
    TraceWriter,
    batches,
    load_model,
    load_streams,
    open_trace,
    trace_from_files,
    trace_model,
    wrap_model,
)

# ---------------------------------------------------------------------- trace_model


def test_trace_manifest_keeps_the_streams_order_and_the_models_layers_experts_and_top_k(tmp_path):
    """Domains are numbered in the order of the streams (not sorted); num_layers counts every
    decoder layer (here dense, MoE, dense); top_k is the router's, not the number of experts."""
    torch.manual_seed(0)
    cfg = tiny()
    cfg = dataclasses.replace(cfg, n_layers=3, moe_every=2, moe=dataclasses.replace(cfg.moe, top_k=1))
    model = MoETransformer(cfg)
    streams = {"zeta": np.arange(0, 40), "alpha": np.arange(50, 90)}
    trace = trace_model(model, streams, tmp_path / "t", TraceOptions(max_tokens=64, seq_len=16), quiet=True)
    info = trace.info
    assert info.domains == ["zeta", "alpha"]
    assert (info.num_layers, info.layers, info.num_experts, info.top_k) == (3, [1], [4], [1])
    (shard,) = trace.shards()
    assert shard.token_ids[shard.domain == 0].tolist() == list(range(0, 32))


def test_trace_records_its_speed_in_tokens_per_second(tmp_path, monkeypatch):
    """Tokens (not batches) over the seconds the trace took, here a clock that says 2 s."""
    from types import SimpleNamespace

    from moelab.trace import tracer

    monkeypatch.setattr(tracer, "time", SimpleNamespace(perf_counter=iter([10.0, 12.0]).__next__))
    torch.manual_seed(0)
    streams = {"a": np.arange(60)}
    options = TraceOptions(max_tokens=60, seq_len=16, batch_size=2)
    trace = trace_model(MoETransformer(tiny()), streams, tmp_path / "t", options, quiet=True)
    assert (trace.info.settings["seconds"], trace.info.settings["tokens_per_second"]) == (2.0, 30.0)


def test_trace_runs_a_model_left_in_training_mode_in_eval_mode(tmp_path):
    """Mixtral jitters its router input in training mode: the trace must record the
    deterministic (eval) routing."""
    model = build("mixtral", router_jitter_noise=0.5)
    model.save_pretrained(tmp_path / "m")
    view = open_checkpoint(tmp_path / "m")
    ids = torch.randint(0, 64, (1, 32))
    with RoutingCapture(model, view) as capture, torch.no_grad():
        model(input_ids=ids, use_cache=False)
        expected = capture.pop()
    model.train()
    trace = trace_model(wrap_model(model, view), {"a": ids[0].numpy()}, tmp_path / "t",
                        TraceOptions(max_tokens=32, seq_len=32), quiet=True)
    (shard,) = trace.shards()
    for i, routing in expected.items():
        assert torch.equal(shard.layers[i].indices, routing.indices)


def test_trace_from_files_records_a_data_files_path_and_no_split(tmp_path):
    """The split applies to the shipped corpus only."""
    model = save_pretrained(MoETransformer(dataclasses.replace(tiny(), vocab_size=8192)), tmp_path / "m")
    (tmp_path / "notes.txt").write_text("roses are red " * 20)
    options = TraceOptions(max_tokens=32, seq_len=16)
    trace = trace_from_files(model, tmp_path / "t", data=tmp_path / "notes.txt", options=options, quiet=True)
    assert trace.info.settings["data"] == str(tmp_path / "notes.txt") and "split" not in trace.info.settings


def test_trace_from_files_refuses_an_output_inside_the_data_before_loading_the_model(tmp_path, monkeypatch):
    from moelab.trace import tracer

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(tracer, "load_model", load_model)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("roses are red")
    with pytest.raises(OutputError, match="lies inside the input"):
        trace_from_files(tmp_path / "m", tmp_path / "data" / "trace", data=tmp_path / "data", quiet=True)


# ---------------------------------------------------------------------- models and tokenizers


def test_load_model_gives_a_moelab_checkpoint_the_dtype_asked_for(tmp_path):
    """`moelab generate --dtype` loads a moelab checkpoint through load_model."""
    torch.manual_seed(0)
    path = save_pretrained(MoETransformer(tiny()), tmp_path / "m")
    model = load_model(path, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training


def test_transformers_windows_are_capped_at_the_configs_max_position_embeddings(tmp_path):
    build("mixtral", max_position_embeddings=24).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.max_seq_len == wrap_model(loaded.model, loaded.view).max_seq_len == 24


def test_hf_max_len_prefers_max_position_embeddings_to_max_seq_len():
    from types import SimpleNamespace

    from moelab.trace.model import hf_max_len

    assert hf_max_len(SimpleNamespace(max_seq_len=512, max_position_embeddings=4096)) == 4096


def test_a_checkpoint_with_a_slow_tokenizer_only_is_read_with_it(tmp_path):
    """vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json: the checkpoint's own
    tokenizer all the same (moelab format or not), not moelab's shipped one."""
    from moelab.trace.model import checkpoint_encoder

    vocab = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3, "Ġ": 4, "Ġa": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nĠ a\n")
    special = dict.fromkeys(("eos_token", "unk_token", "bos_token"), "<|endoftext|>")
    config = {"tokenizer_class": "GPT2Tokenizer", **special}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for native in (False, True):
        assert checkpoint_encoder(tmp_path, native=native)(["ab a"]).tolist() == [2, 5, 3]


def test_a_transformers_checkpoint_keeps_moelabs_tokenizer_as_its_own(tmp_path):
    """The shipped tokenizer means "moelab's own encoding" in a moelab-format checkpoint only; an
    imported checkpoint that carries it is read with it like with any other."""
    from moelab.data import TOKENIZER_DIR
    from moelab.trace.model import checkpoint_encoder

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    assert checkpoint_encoder(tmp_path, native=True) is None
    assert checkpoint_encoder(tmp_path)(["the"]).size > 0


def test_an_unreadable_tokenizer_is_not_replaced_by_moelabs_and_is_named(tmp_path):
    """A truncated tokenizer.json, or a tokenizer_config.json alone: one error naming the
    directory and its tokenizer files (moelab's own tokenizer offered for its own format only)."""
    import re

    from moelab.trace.model import checkpoint_encoder

    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    files = re.escape(f"{tmp_path}: its tokenizer files (tokenizer.json, tokenizer_config.json) could not be read")
    with pytest.raises(ValueError, match=files + r" \(.+\); save the model's tokenizer there again .*moelab's$"):
        checkpoint_encoder(tmp_path, native=True)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"files \(tokenizer_config.json\) could not be read .*save_pretrained\)$"):
        checkpoint_encoder(tmp_path)


def test_hf_encoder_adds_no_bos_token():
    """Documents are joined by eos only, also with a tokenizer whose template adds a bos token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from moelab.trace.model import _hf_encoder

    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3, "<unk>": 4}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert tokenizer("a b")["input_ids"] == [0, 2, 3], "the template adds <s>"
    assert _hf_encoder(tokenizer)(["a b", "b"]).tolist() == [2, 3, 1, 3, 1]


# ---------------------------------------------------------------------- capture


def test_a_capture_that_fails_to_hook_a_later_layer_removes_the_hooks_it_placed(tmp_path):
    build("mixtral").save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    first, second = loaded.model.model.layers
    second.mlp = torch.nn.Identity()  # no router or experts to find in layer 1
    with pytest.raises(ValueError, match="layer 1: expected one router module"):
        RoutingCapture(loaded.model, loaded.view)
    assert [len(m._forward_hooks) for m in (first.mlp.gate, first.mlp.experts)] == [0, 0]


def test_hf_expert_max_runs_each_slot_and_skips_a_slot_no_token_fills():
    """Slot 1 is empty for every token (-1, or E = past the last expert): only slot 0's experts
    run, with unit weights, and each keeps the max |output| of its own tokens."""
    from moelab.trace.capture import _LayerTap, _on_hf_experts

    class Experts(torch.nn.Module):
        def forward(self, hidden, index, weights):  # expert e scales its rows by e + 1
            return hidden * (index.float() + 1) * weights

    tap = _LayerTap(0, 4, 2)
    tap.pending = LayerRouting(torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2), torch.zeros(2))
    hidden = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    args = (hidden, torch.tensor([[0, 4], [2, -1]]), torch.tensor([[0.7, 0.3], [1.0, 0.0]]))
    _on_hf_experts(tap, Experts(), expert_stats=True)(None, args, {}, None)
    assert tap.expert_max.tolist() == [2.0, 0.0, 1.5, 0.0]


def test_hf_dense_scores_give_top_k_experts_per_token():
    """A router that returns dense scores [T, E] (Llama 4): the top_k best experts, here 2."""
    from moelab.trace.capture import _LayerTap, _on_hf_experts

    tap = _LayerTap(0, 4, 2)
    tap.pending = LayerRouting(torch.tensor([[1, 3]]), torch.tensor([[0.7, 0.2]]), torch.zeros(1))
    tap.dense_scores = torch.tensor([[0.0, 0.7, 0.1, 0.2]])
    _on_hf_experts(tap, torch.nn.Identity(), expert_stats=False)(None, (torch.zeros(4, 8),), {}, None)
    (used,) = tap.parts
    assert used.indices.tolist() == [[1, 3]] and torch.equal(used.weights, torch.tensor([[0.7, 0.2]]))
    assert (tap.check.tokens, tap.check.mismatched) == (1, 0)


# ---------------------------------------------------------------------- calibration data


def test_batches_are_int64_whatever_the_streams_dtype():
    """The shipped corpus comes as uint16 token ids; a batch is int64 (what embeddings take)."""
    (batch,) = batches({"a": np.arange(8, dtype=np.uint16)}, max_tokens=8, seq_len=8, batch_size=1)
    assert batch.token_ids.dtype == torch.int64 and batch.token_ids.tolist() == [list(range(8))]


def test_a_directorys_files_are_read_in_name_order(tmp_path, monkeypatch):
    """Domain numbers follow the file names, not the order the file system lists them in."""
    for name in ("b.txt", "c.txt", "a.txt"):
        (tmp_path / name).write_text(f"text of {name}")
    listed = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listed(self), reverse=True)))
    assert list(load_streams(tmp_path, encoder=lambda texts: np.arange(3))) == ["a", "b", "c"]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028 or U+2029 unescaped; they do not end the line."""
    text = "one\u2028two\u2029three"
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    seen = []
    load_streams(tmp_path / "d.jsonl", encoder=lambda texts: seen.extend(texts) or np.arange(3))
    assert seen == [text]


def test_blank_documents_are_left_out(tmp_path):
    """An empty or blank "text" (datasets hold many) is no document: each one added separators
    whose EOT -> EOT targets any model predicts, lowering the perplexity; a domain of blank
    documents only is still refused."""
    lines = [{"text": "a"}, {"text": ""}, {"text": " \n"}, {"text": "b"}, {"text": "", "domain": "empty"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    seen = []
    encoder = lambda texts: seen.extend(texts) or np.arange(3)  # noqa: E731
    streams = load_streams(tmp_path / "d.jsonl", domains=["d"], encoder=encoder)
    assert seen == ["a", "b"] and list(streams) == ["d"]
    with pytest.raises(ValueError, match=r"no text in domain 'empty' \(empty or blank documents only\)"):
        load_streams(tmp_path / "d.jsonl")


# ---------------------------------------------------------------------- storage


def _info(num_experts: int = 3, **kw) -> TraceInfo:
    return TraceInfo(
        model="m", family="moelab", num_layers=2, layers=[1], num_experts=[num_experts], top_k=[2],
        domains=["a", "b"], **kw
    )


def _routing(indices: torch.Tensor) -> dict[int, LayerRouting]:
    T = indices.shape[0]
    return {1: LayerRouting(indices, torch.full((T, 2), 0.5), torch.zeros(T))}


def test_expert_indices_past_int16_are_stored_exactly(tmp_path):
    """Indices are int16 on disk only while every expert number fits."""
    indices = torch.tensor([[0, 39_999], [32_767, 32_768]])
    with TraceWriter(tmp_path / "t", _info(num_experts=40_000)) as writer:
        writer.add(torch.zeros(1, 2, dtype=torch.long), 0, _routing(indices))
        trace = writer.close()
    (shard,) = trace.shards()
    assert shard.layers[1].indices.tolist() == indices.tolist()


def test_a_shard_is_written_once_it_holds_shard_tokens(tmp_path):
    with TraceWriter(tmp_path / "t", _info(), shard_tokens=4) as writer:
        for _ in range(3):
            writer.add(torch.zeros(1, 4, dtype=torch.long), 0, _routing(torch.zeros(4, 2, dtype=torch.long)))
        trace = writer.close()
    assert [s.tokens for s in trace.info.shards] == [4, 4, 4]


def test_an_empty_batch_adds_no_sequence_and_no_shard(tmp_path):
    """A [0, S] batch right after a full shard: no 0-token shard at close, no sequence counted."""
    with TraceWriter(tmp_path / "t", _info(), shard_tokens=4) as writer:
        writer.add(torch.zeros(1, 4, dtype=torch.long), 0, _routing(torch.zeros(4, 2, dtype=torch.long)))
        writer.add(torch.zeros(0, 4, dtype=torch.long), 1, _routing(torch.zeros(0, 2, dtype=torch.long)))
        trace = writer.close()
    assert [s.tokens for s in trace.info.shards] == [4] and trace.info.num_sequences == 1


def test_an_empty_batch_with_routed_tokens_is_refused(tmp_path):
    """Routing of 2 tokens for a batch of none is the caller's mistake, empty batch or not."""
    with TraceWriter(tmp_path / "t", _info()) as writer:
        with pytest.raises(ValueError, match="layer 1 routed 2 tokens, the batch has 0"):
            writer.add(torch.zeros(0, 4, dtype=torch.long), 0, _routing(torch.zeros(2, 2, dtype=torch.long)))


def test_closing_an_empty_trace_leaves_nothing_behind(tmp_path):
    writer = TraceWriter(tmp_path / "t", _info())
    with pytest.raises(ValueError, match="no tokens were traced"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_a_scalar_tensor_where_the_manifest_promises_rows(tmp_path):
    """A mismatch to report, not an IndexError."""
    from safetensors.torch import load_file, save_file

    with TraceWriter(tmp_path / "t", _info()) as writer:
        writer.add(torch.zeros(1, 4, dtype=torch.long), 0, _routing(torch.zeros(4, 2, dtype=torch.long)))
        writer.close()
    shard = tmp_path / "t" / "shard-00000.safetensors"
    save_file(load_file(shard) | {"positions": torch.tensor(0, dtype=torch.int32)}, shard)
    with pytest.raises(ValueError, match=r"positions has shape \[\], expected \[4\]"):
        list(open_trace(tmp_path / "t").shards())


def test_a_directory_named_manifest_json_makes_no_trace(tmp_path):
    from moelab.trace import is_trace

    (tmp_path / "manifest.json").mkdir()
    assert not is_trace(tmp_path)
