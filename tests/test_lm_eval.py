"""lm-evaluation-harness on a compressed checkpoint, offline, with a local multiple-choice task
(runs when the optional extra is installed: `pip install 'moelab[eval]'`, or `make test-eval`)."""

from __future__ import annotations

import json
import os

import pytest
from hf_tiny import build
from transformers import AutoConfig, PreTrainedTokenizerFast

from moelab.compress import CalibrationOptions, compress
from moelab.data.tokenizer import TOKENIZER_DIR

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install 'moelab[eval]'")

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("Two plus two equals", ["three", "four", "five"], 1),
    ("Water freezes at zero degrees", ["Fahrenheit", "Kelvin", "Celsius"], 2),
    ("The opposite of hot is", ["cold", "warm", "loud"], 0),
]


def test_lm_eval_scores_a_compressed_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = tmp_path / "source"
    build("mixtral", vocab_size=8192).save_pretrained(source)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(source)
    out = tmp_path / "pruned"
    compress(source, out, method="reap", ratio=0.5, calib_options=CalibrationOptions(tokens=256, seq_len=32), quiet=True)
    assert AutoConfig.from_pretrained(out).num_local_experts == 2

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n"
    )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.chdir(tmp_path)
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},dtype=float32",
        tasks=["local_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=4,
    )
    scores = results["results"]["local_mc"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and results["n-samples"]["local_mc"]["effective"] == len(QUESTIONS)
