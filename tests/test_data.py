"""The shipped corpus, tokenizer and data loaders (moelab.data)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from moelab.data import (
    CORPUS_DIR,
    EOT,
    EOT_ID,
    IGNORE_INDEX,
    PAD,
    PAD_ID,
    SPLITS,
    TOKENIZER_DIR,
    CorpusIntegrityError,
    TokenWindows,
    eval_batches,
    list_domains,
    load_documents,
    load_tokenizer,
    mixture_weights,
    read_manifest,
    tokenize_split,
)
from moelab.data.tokenizer import tokenize_texts

EXPECTED_DOMAINS = {"code", "bible", "english", "german", "spanish", "italian", "polish", "russian"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# --- corpus -------------------------------------------------------------------------------------


def test_manifest_lists_every_domain_and_split_with_matching_sha256():
    manifest = read_manifest()
    assert set(manifest["domains"]) == EXPECTED_DOMAINS == set(list_domains())
    for domain, entry in manifest["domains"].items():
        assert set(entry["splits"]) == set(SPLITS), domain
        assert entry["sources"] and all(s["license"] for s in entry["sources"]), domain
        for split, info in entry["splits"].items():
            data = (CORPUS_DIR / info["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info["sha256"], info["file"]
            lines = gzip.decompress(data).decode("utf-8").splitlines()
            assert len(lines) == info["docs"] > 0, (domain, split)


def test_corpus_size_stays_within_budget():
    total = sum(p.stat().st_size for p in CORPUS_DIR.rglob("*") if p.is_file())
    assert 2_000_000 < total < 30_000_000


@pytest.mark.parametrize("split", SPLITS)
def test_every_domain_has_nonempty_documents(split):
    manifest = read_manifest()
    for domain in list_domains():
        docs = load_documents(domain, split)
        assert len(docs) == manifest["domains"][domain]["splits"][split]["docs"]
        assert all(doc.domain == domain and doc.text.strip() and doc.source for doc in docs)
        assert sum(len(doc.text) for doc in docs) == manifest["domains"][domain]["splits"][split]["chars"]


def test_all_domains_load_in_manifest_order():
    docs = load_documents(None, "validation")
    order = list(dict.fromkeys(doc.domain for doc in docs))
    assert order == list_domains()


def test_splits_are_disjoint_and_documents_unique():
    by_split = {split: load_documents(None, split) for split in SPLITS}
    for split, docs in by_split.items():
        keys = [(doc.domain, doc.text) for doc in docs]
        assert len(keys) == len(set(keys)), f"duplicate documents in {split}"
    train, val, test = ({(d.domain, d.text) for d in by_split[s]} for s in SPLITS)
    assert not train & val and not train & test and not val & test
    # roughly the intended 90/5/5 split of each domain's characters
    manifest = read_manifest()
    for domain, entry in manifest["domains"].items():
        chars = {s: entry["splits"][s]["chars"] for s in SPLITS}
        assert chars["train"] > 0.8 * sum(chars.values()), domain


def test_domains_are_distinguishable_by_script():
    def text(domain: str) -> str:
        return "".join(doc.text for doc in load_documents(domain, "validation"))

    assert sum("\u0400" <= c <= "\u04ff" for c in text("russian")) > 0.5 * len(text("russian"))
    assert "def " in text("code") and "self" in text("code")
    assert "LORD" in text("bible")
    assert any(c in text("polish") for c in "ąęłśżź")
    assert any(c in text("german") for c in "äöüß")


def test_corrupt_corpus_file_names_file_and_fix(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, corpus)
    target = corpus / "spanish.validation.jsonl.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(
        CorpusIntegrityError, match=r"spanish\.validation\.jsonl\.gz.*scripts/build_corpus\.py"
    ):
        load_documents("spanish", "validation", corpus_dir=corpus)
    assert load_documents("german", "validation", corpus_dir=corpus)  # other files are unaffected
    (corpus / "german.test.jsonl.gz").unlink()
    with pytest.raises(CorpusIntegrityError, match=r"german\.test\.jsonl\.gz is missing"):
        load_documents("german", "test", corpus_dir=corpus)


def test_a_cached_token_stream_does_not_outlive_its_corpus_file(tmp_path, monkeypatch):
    """The cache key holds the manifest's sha256, not the file's: an edited or deleted corpus file
    used to leave its cached tokens readable; the file is checked on every call."""
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, corpus)
    assert len(tokenize_split("german", "test", corpus_dir=corpus)) > 0  # cached now
    target = corpus / "german.test.jsonl.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CorpusIntegrityError, match=r"german\.test\.jsonl\.gz does not match the sha256"):
        tokenize_split("german", "test", corpus_dir=corpus)
    target.unlink()
    with pytest.raises(CorpusIntegrityError, match=r"german\.test\.jsonl\.gz is missing"):
        tokenize_split("german", "test", corpus_dir=corpus)


def test_a_rebuilt_corpus_file_is_tokenised_again(tmp_path, monkeypatch, tokenizer):
    """A corpus rebuilt with other text (its manifest's sha256 updated, as build_corpus.py writes
    it) is tokenised again, not served the old file's cached tokens."""
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, corpus)
    before = tokenize_split("spanish", "validation", corpus_dir=corpus)  # cached now
    record = {"text": "Un documento nuevo.", "domain": "spanish", "source": "test"}
    data = gzip.compress((json.dumps(record) + "\n").encode(), mtime=0)
    (corpus / "spanish.validation.jsonl.gz").write_bytes(data)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["domains"]["spanish"]["splits"]["validation"]["sha256"] = hashlib.sha256(data).hexdigest()
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    after = tokenize_split("spanish", "validation", corpus_dir=corpus)
    assert len(after) < len(before)
    assert tokenizer.decode(after[1:-1].tolist()) == record["text"]


def test_a_document_holding_a_unicode_line_separator_is_one_record(tmp_path):
    """build_corpus.py writes records with ensure_ascii=False, so U+2028, U+2029 and U+0085 stay raw
    inside a line; records end at "\\n" only (splitlines() cut them and json.loads raised)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, corpus)
    texts = [f"one{sep}two" for sep in ("\u2028", "\u2029", "\x85")] + ["last, no newline after it"]
    lines = [json.dumps({"text": t, "domain": "spanish", "source": "test"}, ensure_ascii=False) for t in texts]
    data = gzip.compress("\n".join(lines).encode(), mtime=0)
    (corpus / "spanish.validation.jsonl.gz").write_bytes(data)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["domains"]["spanish"]["splits"]["validation"]["sha256"] = hashlib.sha256(data).hexdigest()
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    assert [doc.text for doc in load_documents("spanish", "validation", corpus_dir=corpus)] == texts


def test_unknown_domain_or_split_names_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown domain 'klingon'; choose one of code, bible, .*russian"):
        load_documents("klingon", "train")
    with pytest.raises(ValueError, match=r"unknown split 'val'; choose one of train, validation, test"):
        load_documents("german", "val")
    with pytest.raises(ValueError, match=r"unknown domain 'klingon'"):
        TokenWindows.from_corpus(["german", "klingon"], "train", seq_len=8, batch_size=2)


# --- tokenizer ----------------------------------------------------------------------------------

ROUND_TRIP_EXTRAS = [
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "def f(x: int) -> int:\n\tif x:  \n        return x ** 2  # trailing spaces kept\r\n",
    "Zażółć gęślą jaźń — «ñandú» 🐍 中文 \x00\x7f",
    "   leading and trailing whitespace   \n\n\n",
]


def test_tokenizer_round_trips_every_domain(tokenizer):
    samples = list(ROUND_TRIP_EXTRAS)
    for domain in list_domains():
        docs = load_documents(domain, "test")
        samples += [doc.text for doc in docs[:: max(1, len(docs) // 20)]]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_vocab_specials_and_compression(tokenizer):
    assert tokenizer.get_vocab_size() == 8192 == read_manifest()["tokenizer"]["vocab_size"]
    assert tokenizer.token_to_id(EOT) == EOT_ID and tokenizer.token_to_id(PAD) == PAD_ID
    assert (
        hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
        == read_manifest()["tokenizer"]["sha256"]
    )
    # The BPE merges learned every domain: well above 1 character per token on each.
    for domain in list_domains():
        text = "\n".join(doc.text for doc in load_documents(domain, "test")[:200])
        assert len(text) / len(tokenizer.encode(text).ids) > 2.0, domain


def test_tokenizer_loads_in_transformers_with_eos_and_pad(tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for hf in (
        PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR),
        AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)),
    ):
        assert (hf.eos_token, hf.eos_token_id, hf.bos_token_id) == (EOT, EOT_ID, EOT_ID)
        assert (hf.pad_token, hf.pad_token_id) == (PAD, PAD_ID)
        assert len(hf) == 8192
        text = ROUND_TRIP_EXTRAS[0] + ROUND_TRIP_EXTRAS[1]
        ids = hf(text)["input_ids"]
        assert ids == tokenizer.encode(text).ids
        assert hf.decode(ids) == text


def test_tokenize_split_layout_and_cache(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    tokens = tokenize_split("spanish", "validation")
    entry = read_manifest()["domains"]["spanish"]["splits"]["validation"]
    assert tokens.dtype == np.uint16 and len(tokens) == entry["tokens"]
    assert tokens[0] == tokens[-1] == EOT_ID
    assert (tokens == EOT_ID).sum() == entry["docs"] + 1
    assert PAD_ID not in tokens
    first_doc = load_documents("spanish", "validation")[0].text
    end = int(np.flatnonzero(tokens == EOT_ID)[1])
    assert tokenizer.decode(tokens[1:end].tolist()) == first_doc
    cached = list((tmp_path / "tokens").glob("spanish.validation.*.npy"))
    assert len(cached) == 1 and not list((tmp_path / "tokens").glob("*.tmp"))

    def no_reads(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr("moelab.data.tokenizer.load_documents", no_reads)
    np.testing.assert_array_equal(tokenize_split("spanish", "validation"), tokens)
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # a damaged cache file is made again, not an error
    monkeypatch.undo()
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    np.testing.assert_array_equal(tokenize_split("spanish", "validation"), tokens)


def test_a_token_cache_that_cannot_be_written_names_moelab_cache(tmp_path, monkeypatch):
    """MOELAB_CACHE set to a file: one error naming the setting, and the file left as it was."""
    (tmp_path / "notes").write_text("mine")
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "notes"))
    with pytest.raises(ValueError, match=r"cannot write the token cache .*notes/tokens/.*; set MOELAB_CACHE"):
        tokenize_split("spanish", "validation")
    assert (tmp_path / "notes").read_text() == "mine"


def test_quiet_tokenizing_shows_no_progress_bar(tokenizer, capfd):
    texts = ["a short document"] * 1200  # more than one batch of 512: a bar unless quiet
    tokenize_texts(texts, tokenizer, quiet=True)
    assert capfd.readouterr().err == ""
    tokenize_texts(texts, tokenizer)
    assert "tokenizing" in capfd.readouterr().err


# --- training windows ---------------------------------------------------------------------------


def ramp(n: int, offset: int = 0) -> np.ndarray:
    return (np.arange(n) + offset).astype(np.uint16)


def take(loader: TokenWindows, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_windows_are_contiguous_slices_with_shifted_targets():
    loader = TokenWindows(ramp(5000), seq_len=16, batch_size=8, seed=3)
    for inputs, targets in take(loader, 20):
        assert inputs.shape == targets.shape == (8, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(targets, inputs + 1)  # a ramp: the next token is always +1
        assert torch.equal(inputs[:, 1:] - inputs[:, :1], torch.arange(1, 16).expand(8, -1))
        assert inputs.min() >= 0 and targets.max() <= 4999


def test_windows_reach_both_ends_of_the_array():
    loader = TokenWindows(ramp(40), seq_len=8, batch_size=64, seed=0)
    starts = torch.cat([inputs[:, 0] for inputs, _ in take(loader, 10)])
    assert starts.min() == 0 and starts.max() == 40 - 8 - 1


def test_windows_deterministic_under_seed():
    a = take(TokenWindows(ramp(10_000), 32, 4, seed=7), 5)
    b = take(TokenWindows(ramp(10_000), 32, 4, seed=7), 5)
    c = take(TokenWindows(ramp(10_000), 32, 4, seed=8), 5)
    assert_same_batches(a, b)
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c, strict=True))
    assert not torch.equal(a[0][0], a[1][0]), "every step draws new windows"
    assert not torch.equal(a[1][0], c[0][0]), "seed 8 is not seed 7 one step later"


def test_resume_from_state_dict_matches_uninterrupted_run():
    data = {"a": ramp(3000), "b": ramp(5000, offset=10_000)}
    uninterrupted = take(TokenWindows(data, 24, 6, seed=11, weights="uniform"), 12)

    first = TokenWindows(data, 24, 6, seed=11, weights="uniform")
    assert_same_batches(take(first, 5), uninterrupted[:5])
    buffer = io.BytesIO()
    torch.save({"loader": first.state_dict()}, buffer)  # as a training checkpoint would
    buffer.seek(0)
    state = torch.load(buffer)["loader"]
    json.dumps(state)  # plain Python values only

    resumed = TokenWindows(data, 24, 6, seed=11, weights="uniform")
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 7), uninterrupted[5:])


def test_load_state_dict_rejects_a_different_setup():
    state = TokenWindows(ramp(1000), 16, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"seq_len: checkpoint 16, loader 32"):
        TokenWindows(ramp(1000), 32, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"sizes"):
        TokenWindows(ramp(999), 16, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed: checkpoint 1, loader 2"):
        TokenWindows(ramp(1000), 16, 4, seed=2).load_state_dict(state)


def test_mixture_weights_pick_rows_from_whole_domains():
    data = {"a": ramp(1000), "b": ramp(1000, offset=20_000)}
    only_b = TokenWindows(data, 8, 32, seed=0, weights={"a": 0.0, "b": 1.0})
    for inputs, _ in take(only_b, 5):
        assert (inputs >= 20_000).all()
    rows_from_a = 0
    for inputs, _ in take(TokenWindows(data, 8, 100, seed=0, weights="uniform"), 10):
        from_a = (inputs < 20_000).all(dim=1)
        assert torch.equal(from_a, (inputs < 20_000).any(dim=1))  # a row never mixes domains
        rows_from_a += int(from_a.sum())
    assert 400 < rows_from_a < 600


def test_mixture_weight_modes():
    sizes = {"a": 100, "b": 300}
    np.testing.assert_allclose(mixture_weights(sizes, "proportional"), [0.25, 0.75])
    np.testing.assert_allclose(mixture_weights(sizes, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(mixture_weights(sizes, {"a": 3, "b": 1}), [0.75, 0.25])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor numpy's overflow warning for the sum it handles
        np.testing.assert_allclose(mixture_weights(sizes, {"a": 1e308, "b": 1e308}), [0.5, 0.5])  # an infinite sum
    with pytest.raises(ValueError, match="one weight for each of"):
        mixture_weights(sizes, {"a": 1})
    for bad in ({"a": 0, "b": 0}, {"a": -1, "b": 2}, {"a": float("nan"), "b": 1}, {"a": float("inf"), "b": 1}):
        with pytest.raises(ValueError, match="must be finite, >= 0 and with a positive sum"):
            mixture_weights(sizes, bad)
    with pytest.raises(ValueError, match="'proportional', 'uniform'"):
        mixture_weights(sizes, "balanced")


def test_mixture_weights_are_read_by_domain_name():
    """A mapping's weights go to the domains they name, in the order of `sizes`, whatever the
    order of its keys (here neither sizes' nor alphabetical)."""
    sizes = {"zeta": 100, "alpha": 100, "mid": 100}
    weights = {"mid": 1.0, "zeta": 2.0, "alpha": 5.0}
    np.testing.assert_allclose(mixture_weights(sizes, weights), [2 / 8, 5 / 8, 1 / 8])
    data = {name: ramp(100, offset=1000 * i) for i, name in enumerate(sizes)}
    np.testing.assert_allclose(TokenWindows(data, 8, 4, weights=weights).probs, [2 / 8, 5 / 8, 1 / 8])
    only_mid = TokenWindows(data, 8, 16, weights={"mid": 1.0, "alpha": 0.0, "zeta": 0.0})
    inputs, _ = next(only_mid)
    assert ((inputs >= 2000) & (inputs < 3000)).all()  # every row from "mid" (offset 2000)


def test_too_short_array_is_rejected():
    with pytest.raises(ValueError, match=r"'tokens': need a 1-D array of at least seq_len \+ 1 = 9"):
        TokenWindows(ramp(8), seq_len=8, batch_size=1)


def test_from_corpus_mixes_real_domains(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    loader = TokenWindows.from_corpus(["spanish", "russian"], "validation", seq_len=64, batch_size=4, seed=0)
    assert list(loader.sizes) == ["spanish", "russian"]
    inputs, targets = next(loader)
    assert inputs.shape == (4, 64) and torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(inputs.max()) < 8192


# --- evaluation windows -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 17, 64, 65, 1000])
def test_eval_batches_score_every_token_once(n):
    tokens = ramp(n, offset=5)
    seq_len, batch_size = 16, 3
    scored, batches = [], list(eval_batches(tokens, seq_len, batch_size))
    for inputs, targets in batches:
        assert inputs.shape == targets.shape and inputs.shape[1] == seq_len and inputs.shape[0] <= batch_size
        mask = targets != IGNORE_INDEX
        assert torch.equal(targets[mask], inputs[mask] + 1)  # each target follows its input
        assert (inputs[~mask] == PAD_ID).all()
        scored.append(targets[mask])
    np.testing.assert_array_equal(torch.cat(scored).numpy(), tokens[1:].astype(np.int64))
    n_windows = -(-(n - 1) // seq_len)
    assert sum(len(x) for x, _ in batches) == n_windows


@pytest.mark.parametrize("seq_len,batch_size", [(0, 2), (-1, 2), (16, 0)])
def test_eval_batches_refuse_an_empty_window_or_batch(seq_len, batch_size):
    """seq_len 0 divided by zero, a negative one yielded no batch (a loss of 0 / 0 tokens), batch_size 0
    stopped in range()."""
    with pytest.raises(ValueError, match=rf"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}"):
        next(eval_batches(ramp(100), seq_len, batch_size))


def test_special_token_text_in_a_document_is_text(tokenizer):
    """A literal "<|endoftext|>" or "<|pad|>" in user data used to become the separator (mid-document)
    or PAD; it is encoded as its characters, and the tokenizer is left as it was."""
    text = "a <|endoftext|> b <|pad|>"
    tokens = tokenize_texts([text], tokenizer)
    assert (tokens == EOT_ID).sum() == 2 and PAD_ID not in tokens  # the two separators only
    assert tokenizer.decode(tokens[1:-1].tolist()) == text
    assert tokenizer.encode(text, add_special_tokens=False).ids.count(EOT_ID) == 1  # left as it was
    from transformers import AutoTokenizer

    from moelab.data import TOKENIZER_DIR
    from moelab.trace.model import _hf_encoder

    ids = _hf_encoder(AutoTokenizer.from_pretrained(TOKENIZER_DIR))([text])  # a checkpoint's own tokenizer
    assert ids.tolist() == tokens[1:].tolist()
