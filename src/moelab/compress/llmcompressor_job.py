"""Run llm-compressor's REAPPruningModifier on a transformers checkpoint, on given calibration
windows; print time and peak memory as JSON. Runs in llm-compressor's own environment
(benchmarks/llmcompressor_reap/setup.sh), never imported by moelab: `moelab compress-bench
--llmcompressor-python` and benchmarks/llmcompressor_reap/compare.py start it as a script.

    .venv-llmc/bin/python llmcompressor_job.py MODEL WINDOWS.npy SPARSITY OUT REPORT.json
"""

import json
import sys
import time

import numpy as np
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, windows, sparsity, out, report = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
ids = np.load(windows)
began = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
oneshot(
    model=model,
    tokenizer=tokenizer,
    dataset=data,
    recipe=[REAPPruningModifier(sparsity=sparsity, report_path=report)],
    num_calibration_samples=len(ids),
    max_seq_length=ids.shape[1],
    output_dir=out,
)
seconds = time.perf_counter() - began
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024}))
