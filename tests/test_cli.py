"""The `moelab` command line: verbs exist, help reads, and the benchmark keeps its JSON contract."""

import dataclasses
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from moelab.bench import machine
from moelab.cli import app
from moelab.models.reference import reference_model_dir

runner = CliRunner()
# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread); a
# command given --threads sets its own
pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("bench", "demo", "version"):
        assert verb in result.output


def test_the_command_list_gives_each_summary_without_its_docstring_line_breaks():
    """`moelab --help` kept the line breaks of each docstring's first paragraph in its command list:
    "...per-domain perplexity, its" then "routing report" on the next line, at any terminal width."""
    result = runner.invoke(app, ["--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "its routing report, and its compression" in result.output
    result = runner.invoke(app, ["bench", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert "the bytes they move against the count" in result.output


def test_bench_skip_help_offers_only_the_models_it_runs():
    """`bench skip`'s model argument said it took a transformers checkpoint, which it refuses
    (dynamic skipping runs in moelab's runtime)."""
    result = runner.invoke(app, ["bench", "skip", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "A moelab checkpoint directory" in result.output and "transformers checkpoint" not in result.output


def test_every_model_argument_names_the_model_it_defaults_to():
    """compress-bench's said "the shipped reference model", of which there are two."""
    for verb in ("trace", "analyze", "calibrate", "compress", "compress-bench", "eval"):
        result = runner.invoke(app, [verb, "--help"], terminal_width=400, env={"COLUMNS": "400"})
        assert "ref-8e-top2 (the default)" in result.output, verb


def test_bench_layer_json_contract(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "layer", "--config", "e8k2", "--dtype", "fp32", "--mode", "fwd", "--mode", "fwdbwd",
            "--tokens", "64", "--rounds", "1", "--skew", "0", "--no-memory", "--json", str(out),
            "--plot", str(tmp_path / "bench.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    _assert_drawn(out, tmp_path / "bench.png")
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert {(r["mode"], r["impl"]) for r in rows} >= {(m, i) for m in ("fwd", "fwdbwd") for i in ("moelab", "serial", "dense", "loop")}
    for row in rows:
        assert set(row) == {"config", "dtype", "mode", "impl", "tokens_per_s", "ratio_vs_dense", "moelab_speedup"}
        assert row["config"] == "e8k2" and row["dtype"] == "fp32"
        assert row["tokens_per_s"] > 0 and row["ratio_vs_dense"] > 0
    assert all(r["ratio_vs_dense"] == 1.0 for r in rows if r["impl"] == "dense")
    assert all(r["moelab_speedup"] == 1.0 for r in rows if r["impl"] == "moelab")


def test_bench_layer_runs_its_skewed_and_memory_passes_only_with_fp32_fwdbwd(tmp_path):
    """Those passes time the fp32 training step: a run asked for the forward alone runs neither."""
    out = tmp_path / "bench.json"
    args = ["bench", "layer", "--config", "e8k2", "--mode", "fwd", "--tokens", "64", "--rounds", "1", "--json", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    doc = json.loads(out.read_text())
    assert doc["skewed"] == [] and doc["memory"] == [] and {r["mode"] for r in doc["results"]} == {"fwd"}


def test_bench_layer_rejects_unknown_config():
    result = runner.invoke(app, ["bench", "layer", "--config", "e9k3", "--tokens", "8", "--rounds", "1"])
    assert result.exit_code != 0
    assert "unknown config 'e9k3'" in str(result.exception) + result.output


def test_info_json_matches_the_instantiated_model(tmp_path):
    from moelab.models import MoETransformer, tiny

    path = tmp_path / "model.yaml"
    tiny().save(path)
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["total_params"] == sum(p.numel() for p in MoETransformer(tiny()).parameters())
    assert 0 < summary["active_params"] < summary["total_params"]
    assert summary["flops_per_token"] > 2 * summary["active_non_embedding_params"]


def test_main_prints_user_errors_without_traceback(monkeypatch, capsys):
    import pytest

    from moelab import cli

    monkeypatch.setattr("sys.argv", ["moelab", "info", "no-such-preset"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: unknown preset 'no-such-preset'") and captured.err.count("\n") == 1


def test_piped_output_gets_room_for_its_tables():
    """Redirected to a file, rich would cut tables to 80 columns ("ref-8e-to…"): moelab's console
    takes 160 there, unless COLUMNS says otherwise."""
    import os
    import subprocess
    import sys

    code = "from moelab.cli import console; print(console.width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    width = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert width.stdout.strip() == "160"
    narrow = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env | {"COLUMNS": "100"})
    assert narrow.stdout.strip() == "100"


def test_busy_processes_run_during_the_block_and_end_with_it():
    from moelab.bench.load import busy_processes

    with busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs)
    try:
        with busy_processes(1) as procs:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert procs[0].returncode is not None, "an interrupted benchmark leaves no busy process behind"


def test_busy_processes_started_before_one_that_fails_to_start_are_ended(monkeypatch):
    """The third Popen fails (or Ctrl-C arrives while it starts): the two started are terminated,
    not left spinning beside a parent that lives on (a notebook, a script that catches the error)."""
    import subprocess

    import moelab.bench.load as load

    started, popen = [], subprocess.Popen

    def third_fails(*args, **kwargs):
        if len(started) == 2:
            raise OSError("fork failed")
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(load.subprocess, "Popen", third_fails)
    try:
        with load.busy_processes(3):
            raise AssertionError("the block must not run")
    except OSError:
        pass
    assert len(started) == 2 and all(p.returncode is not None for p in started), "a busy process left spinning"


def test_a_busy_process_ends_when_the_benchmark_is_killed_outright():
    """SIGKILL skips the block's cleanup: the busy loop notices its parent is gone and ends."""
    import os
    import subprocess
    import sys
    import time

    from moelab.bench.load import _SPIN

    code = (
        f"import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {_SPIN!r}, "
        "str(os.getpid())]); print(p.pid, flush=True); time.sleep(60)"
    )
    benchmark = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    spinner = int(benchmark.stdout.readline())
    benchmark.kill()
    benchmark.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{spinner}"):
        if open(f"/proc/{spinner}/status").read().split("State:")[1].split()[0] == "Z":
            break  # ended, not yet reaped
        time.sleep(0.1)
    else:
        assert not os.path.exists(f"/proc/{spinner}"), "the busy loop outlived the benchmark"


def _assert_drawn(result: Path, drawn: Path) -> None:
    """`--plot` wrote moelab's PNG, the one `moelab bench plot` draws from the --json file."""
    from moelab.bench.figures import is_own_png

    assert is_own_png(drawn)
    again = drawn.with_name("again.png")
    assert runner.invoke(app, ["bench", "plot", str(result), "--out", str(again)]).exit_code == 0
    assert again.read_bytes() == drawn.read_bytes()


def test_bench_generate_json_contract(tmp_path):
    import dataclasses

    import torch

    from moelab.models import MoETransformer, save_pretrained, tiny

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_pretrained(MoETransformer(dataclasses.replace(tiny(), vocab_size=8192, init_std=0.2)), model_dir)
    out = tmp_path / "generate.json"
    args = ["bench", "generate", str(model_dir), "--batch", "1", "--batch", "3", "--new-tokens", "4",
            "--rounds", "1", "--skip", "0.5", "--skip", "1", "--json", str(out), "--plot", str(tmp_path / "g.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    _assert_drawn(out, tmp_path / "g.png")
    doc = json.loads(out.read_text())
    assert doc["format"] == "moelab-bench-generate/1" and doc["setup"]["memory_bandwidth_gb_s"] > 0
    assert doc["setup"]["openmp_env"] == machine.openmp_env()  # the spin of OpenMP's idle threads moves timings
    assert [r["batch"] for r in doc["results"]] == [1, 3]
    for row in doc["results"]:
        assert row["family"] == "qwen2_moe"  # tiny() has a dense first layer, which Mixtral cannot express
        assert set(row["tokens_per_s"]) == {"moelab", "transformers", "moelab_skip0.5", "moelab_skip1"}
        assert row["same_greedy_tokens"]["moelab"] == 1.0, "the same weights decode the same greedy tokens"
        assert row["ratio_vs_transformers"]["transformers"] == 1.0 and row["speedup_vs_moelab"]["moelab"] == 1.0
        assert set(row["speedup_vs_moelab"]) == set(row["tokens_per_s"])
        variant_bytes = row["routing_variant_bytes_per_token"]  # skipping reads fewer experts: a higher bound
        assert set(variant_bytes) == {"moelab_skip0.5", "moelab_skip1"}
        assert variant_bytes["moelab_skip1"] < row["bytes_per_token"]
        for impl, speed in row["tokens_per_s"].items():
            per_token = variant_bytes.get(impl, row["bytes_per_token"])
            bound = row["memory_bandwidth_gb_s"] * 1e9 / per_token  # one round: its own bandwidth
            assert 0 < row["fraction_of_bound"][impl] == pytest.approx(speed / bound)
        assert 1 <= row["distinct_experts_per_layer"] <= row["batch"] * tiny().moe.top_k
    quality = doc["routing_quality"][str(model_dir)]
    assert list(quality) == ["none", "skip0.5", "skip1"]
    assert quality["none"]["experts_per_token"] == pytest.approx(2.0)  # top-2, every slot used
    assert quality["skip1"]["experts_per_token"] == pytest.approx(1.0)  # beta = 1 keeps the top expert alone
    assert quality["none"]["perplexity"] != quality["skip1"]["perplexity"]
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in str(again.exception) + again.output
    half = tmp_path / "generate_bf16.json"
    bf16 = runner.invoke(app, [*args[:3], "--batch", "1", "--new-tokens", "4", "--rounds", "1", "--dtype", "bf16",
                               "--json", str(half)])  # fmt: skip
    assert bf16.exit_code == 0, bf16.output
    row = json.loads(half.read_text())["results"][0]
    assert json.loads(half.read_text())["setup"]["dtype"] == "bf16"
    assert row["bytes_per_token"] < 0.6 * doc["results"][0]["bytes_per_token"], "bf16 weights and cache: half the bytes"
    assert set(row["tokens_per_s"]) == {"moelab", "transformers"}
    bad = runner.invoke(app, [*args[:3], "--dtype", "fp16"])
    assert bad.exit_code != 0 and "dtype must be one of" in str(bad.exception) + bad.output
    one = runner.invoke(app, [*args[:3], "--new-tokens", "1"])  # no decode step: its bound would leave the experts out
    assert one.exit_code != 0 and "greater than or equal to 2" in str(one.exception) + one.output


@pytest.mark.slow  # moved out of the default run, which must stay under 10 minutes (`make test-slow` runs it)
def test_bench_offload_json_contract(tmp_path):
    import dataclasses

    import torch

    from moelab.models import MoETransformer, save_pretrained, tiny

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    cfg = dataclasses.replace(tiny(), vocab_size=8192, n_layers=3, first_k_dense=0, init_std=0.2)
    save_pretrained(MoETransformer(cfg), model_dir)
    out = tmp_path / "offload.json"
    args = ["bench", "offload", str(model_dir), "--resident", "0.5", "--resident", "1", "--prompts", "2",
            "--new-tokens", "6", "--rounds", "1", "--json", str(out), "--plot", str(tmp_path / "o.png")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    _assert_drawn(out, tmp_path / "o.png")
    doc = json.loads(out.read_text())
    assert doc["format"] == "moelab-bench-offload/1"
    assert doc["device_name"] and "commit" in doc  # what ran it: the machine, moelab's commit (None outside git)
    assert doc["openmp_env"] == machine.openmp_env()
    [model] = doc["models"]
    assert model["experts"] == 12 and model["in_memory_tokens_per_s"] > 0
    policies = ["lru", "reuse", "affinity", "lookahead-x1", "lookahead", "both"]
    assert [(r["resident"], r["policy"]) for r in model["rows"]] == [(f, p) for f in (0.5, 1.0) for p in policies]
    for row in model["rows"]:
        assert row["same_tokens"], "offloaded decoding must produce the in-memory model's tokens"
        assert 0 <= row["hit_rate"] <= 1 and row["slots"] == round(row["resident"] * 12)
        if row["resident"] == 1.0:
            assert row["hit_rate"] == 1.0 and row["reads_per_token"] == 0, "every expert resident from the warm start"
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in str(again.exception) + again.output


def test_bench_offload_runs_a_convertible_checkpoint_against_its_converted_model(tmp_path):
    """A Mixtral checkpoint offloads as a moelab model: the bench times it against that model in
    memory (before: against transformers' model of it, 2x slower, whose tokens may differ in
    bf16); fewer than 2 new tokens leave no decode step to measure and are refused."""
    from moelab.bench.offload import OffloadOptions, measure_model
    from moelab.hf.export import export_checkpoint

    export_checkpoint(reference_model_dir(), tmp_path / "mixtral", "mixtral", quiet=True)
    options = OffloadOptions(resident=(1.0,), prompts=1, prompt_tokens=8, new_tokens=3, rounds=1, calibration_tokens=512)
    result = measure_model(tmp_path / "mixtral", options)
    assert all(row["same_tokens"] for row in result["rows"]) and result["rows"][0]["hit_rate"] == 1.0
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        OffloadOptions(new_tokens=1)


def test_generate_in_memory_and_offloaded_give_the_same_text():
    args = ["generate", "The king said", "--max-new-tokens", "12"]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    offloaded = runner.invoke(app, [*args, "--resident", "0.25"])
    assert offloaded.exit_code == 0, offloaded.output
    text, speed = plain.output.rstrip("\n").rsplit("\n", 1)
    assert text.startswith("The king said") and len(text) > len("The king said")
    assert re.fullmatch(r"12 tokens in .* tokens/s after the first two, \d+ threads?, float32", speed)
    assert offloaded.output.startswith(text + "\n12 tokens in ")
    assert "expert cache: 12 slots, decode hit rate" in offloaded.output
    prefetching = runner.invoke(app, [*args, "--resident", "0.25", "--policy", "lookahead"])
    assert prefetching.exit_code == 0, prefetching.output
    assert prefetching.output.startswith(text + "\n12 tokens in "), "a policy changes the speed, never the text"
    unknown = runner.invoke(app, [*args, "--resident", "0.25", "--policy", "lookahed"])
    assert unknown.exit_code != 0 and "did you mean 'lookahead'" in str(unknown.exception) + unknown.output
    refused = runner.invoke(app, [*args, "--resident", "0.25", "--policy", "lookahead", "--compile"])
    assert refused.exit_code != 0 and "cannot read ahead (policy 'lookahead')" in str(refused.exception) + refused.output


def test_generate_refuses_a_checkpoint_directory_given_as_the_first_prompt():
    """`moelab generate DIR "text"` decoded both as prompts of the default model; the directory is
    named as what it is, with the option that takes it."""
    model = str(reference_model_dir("ref-8e-top2"))
    result = runner.invoke(app, ["generate", model, "The king said", "--max-new-tokens", "2"])
    assert result.exit_code != 0
    assert f"the first prompt {model!r} is a checkpoint directory, not text: give the model as --model" in str(result.exception) + result.output


def test_generate_continues_a_first_prompt_too_long_to_be_a_path():
    """A first prompt longer than a file name may be (255 bytes) is text, not a directory: the
    check for `moelab generate DIR "text"` raised the OS's 'File name too long' for it."""
    prompt = " ".join(["word"] * 60)  # 299 bytes, no slash: one path component
    result = runner.invoke(app, ["generate", prompt, "--max-new-tokens", "1"])
    assert result.exit_code == 0, f"{result.exception!r} {result.output}"
    assert result.output.startswith(prompt) and "\n1 token in " in result.output


def test_generate_prints_a_batch_verbatim_and_its_decode_hit_rate():
    """Several prompts: each text as decoded (no wrapping at the console's width), and the expert
    cache's hit rate over the decode steps (a step of B prompts reads B tokens' experts)."""
    long = "And it came to pass in those days, that there went out a decree from Caesar Augustus, that all"
    result = runner.invoke(app, ["generate", long, "Hi", "--max-new-tokens", "4", "--resident", "0.25"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith(long)
    assert "decode hit rate -" not in result.output and "decode hit rate " in result.output


def test_generate_texts_reports_the_decode_steps_hit_rate_and_every_expert_read(tmp_path, monkeypatch):
    """With two prompts a decode step calls each layer with 2 tokens: decode_hit_rate is the cache's
    hit rate over those calls (the prompts' pass left out); experts_read counts the reads on demand
    (misses) and the read-aheads."""
    import dataclasses

    import moelab.generate as generate
    from moelab.models import MoETransformer, save_pretrained, tiny

    torch.manual_seed(0)
    save_pretrained(MoETransformer(dataclasses.replace(tiny(), vocab_size=8192)), tmp_path / "m")  # moelab's tokenizer
    loaded, load = [], generate.load_offloaded
    monkeypatch.setattr(generate, "load_offloaded", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    prompts = ["The king said", "Once upon a time there was"]
    _, stats = generate.generate_texts(tmp_path / "m", prompts, max_new_tokens=4, resident=0.5, policy="lookahead")
    cache = loaded[0].cache
    assert stats["decode_hit_rate"] == cache.stats[2].hit_rate and len(cache.stats) == 2  # steps, prompts
    assert cache.prefetch_stats.issued > 0
    assert stats["experts_read"] == cache.total().misses + cache.prefetch_stats.issued
    assert stats["prefetch_accuracy"] == cache.prefetch_stats.used / cache.prefetch_stats.issued


def test_generate_samples_with_a_seed_and_top_k_1_is_greedy():
    args = ["generate", "The king said", "--max-new-tokens", "12"]
    text = lambda result: result.output.rsplit("\n12 tokens in ", 1)[0]  # noqa: E731
    greedy = text(runner.invoke(app, args))
    assert text(runner.invoke(app, [*args, "--top-k", "1", "--temperature", "3"])) == greedy
    drawn = [text(runner.invoke(app, [*args, "--temperature", "1.5", "--seed", s])) for s in ("1", "1", "2")]
    assert drawn[0] == drawn[1] != drawn[2] and greedy not in drawn
    refused = runner.invoke(app, [*args, "--temperature", "0"])
    assert refused.exit_code != 0 and "temperature must be > 0" in str(refused.exception) + refused.output


def test_the_rate_after_the_first_two_steps_counts_only_their_tokens(monkeypatch):
    """generate_texts' "later_tokens_per_s": batch x (steps - 2) over the time from the second
    step's tokens to the last's (the prompts' pass and the first one-token step, where a compiled
    step is traced, left out); None below 3 steps; the tokens still reach the caller's streamer."""
    import torch

    import moelab.generate as G
    from moelab.generate import generate_text

    clock_times = iter([0.0, 5.0, 20.0, 21.0, 21.5, 22.0])  # prompt, then steps 1..5
    monkeypatch.setattr(G.time, "perf_counter", lambda: next(clock_times))
    seen = []

    class Inner:
        def put(self, value):
            seen.append(value.shape)

        def end(self):
            seen.append("end")

    clock = G._StepClock(Inner())
    for shape in [(3, 4), (3,), (3,), (3,), (3,), (3,)]:
        clock.put(torch.zeros(shape))
    clock.end()
    assert clock.later_rate() == {"later_tokens_per_s": 3 * 3 / (22.0 - 20.0)}
    assert seen[0] == (3, 4) and len(seen) == 7 and seen[-1] == "end"
    monkeypatch.undo()
    short = G._StepClock(None)
    for _ in range(3):  # the prompts and two steps
        short.put(torch.zeros(1, 2))
    assert short.later_rate() == {"later_tokens_per_s": None}
    _, stats = generate_text(reference_model_dir(), "The king said", max_new_tokens=5)
    assert stats["later_tokens_per_s"] > 0


def test_a_text_ends_at_the_end_of_text_token_unless_ignore_eos():
    """The shipped model ends "Amen." after 5 greedy tokens (its 6th is <|endoftext|>): the text
    stops there, unprinted, in memory, offloaded and in a batch whose other prompt goes on;
    --ignore-eos decodes every token, the end-of-text token included (transformers' engine:
    tests/test_hf_conversion.py)."""
    from moelab.generate import generate_texts

    args = ["generate", "Amen.", "--max-new-tokens", "12"]
    ended = runner.invoke(app, args)
    assert ended.exit_code == 0, ended.output
    text, speed = ended.output.rstrip("\n").rsplit("\n", 1)
    assert speed.startswith("6 tokens in ") and "<|endoftext|>" not in text
    offloaded = runner.invoke(app, [*args, "--resident", "0.25"])
    assert offloaded.output.startswith(text + "\n6 tokens in "), offloaded.output
    full = runner.invoke(app, [*args, "--ignore-eos"])
    assert full.output.startswith(text + "<|endoftext|>") and "\n12 tokens in " in full.output, full.output
    texts, stats = generate_texts(reference_model_dir(), ["Amen.", "The king said"], max_new_tokens=12)
    assert stats["steps"] == 12 and texts[0] == text.removeprefix("Amen.") and len(texts[1]) > 12


def test_generate_decodes_several_prompts_as_one_batch_each_as_alone():
    """Prompts of different lengths decode as one left-padded batch, in memory and offloaded: each
    continuation is the one it gets alone."""
    prompts = ["The king said", "Once upon a time there was"]
    alone = []
    for prompt in prompts:
        result = runner.invoke(app, ["generate", prompt, "--max-new-tokens", "10"])
        assert result.exit_code == 0, result.output
        alone.append(result.output.rstrip("\n").rsplit("\n", 1)[0])
    for extra in ([], ["--resident", "0.25"]):
        batch = runner.invoke(app, ["generate", *prompts, "--max-new-tokens", "10", *extra])
        assert batch.exit_code == 0, batch.output
        assert batch.output.startswith("\n".join(alone) + "\n2 x 10 tokens in "), batch.output
    from moelab.generate import generate_texts

    with pytest.raises(TypeError, match="a list of strings"):
        generate_texts(reference_model_dir(), "The king said")
    with pytest.raises(ValueError, match=r"prompts \[1\] \(from 0\) are empty"):
        generate_texts(reference_model_dir(), ["The king said", ""])
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of `moelab generate $'caf\xe9'`
    with pytest.raises(ValueError, match=r"prompt 1 \(from 0\) is not UTF-8 text \(byte '\\udce9' at position 3\)"):
        generate_texts(reference_model_dir(), ["The king said", latin1])


def test_generate_text_runs_the_policy_it_is_given():
    from moelab.generate import generate_text

    path = reference_model_dir()
    _, default = generate_text(path, "The king said", max_new_tokens=4, resident=0.25)
    _, lookahead = generate_text(path, "The king said", max_new_tokens=4, resident=0.25, policy="lookahead")
    assert default["prefetch_accuracy"] != default["prefetch_accuracy"], "the default reads nothing ahead (NaN)"
    assert 0 <= lookahead["prefetch_accuracy"] <= 1
    with pytest.raises(ValueError, match="give a prior"):
        generate_text(path, "The king said", max_new_tokens=4, resident=0.25, policy="affinity")


def test_generate_texts_refuses_zero_new_tokens():
    """max_new_tokens < 1 is refused before anything loads (the CLI's --max-new-tokens has min=1)."""
    from moelab.generate import generate_texts

    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate_texts(reference_model_dir(), ["The king said"], max_new_tokens=0)


@pytest.mark.parametrize("native", [True, False])
def test_generate_computes_in_the_checkpoints_dtype_where_the_cpu_multiplies_in_it(tmp_path, monkeypatch, native):
    """dtype "auto" (the default): a bf16 checkpoint decodes in bf16 on a CPU with a native bf16
    matmul, in memory and offloaded (the text of dtype=torch.bfloat16), else in float32; the
    shipped float32 model (moelab's: no dtype in config.json, its tensors' dtype) in float32."""
    from hf_tiny import build

    import moelab.generate as generating

    monkeypatch.setattr(generating, "cpu_multiplies_bf16", lambda: native)
    build("olmoe", vocab_size=8192).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    want = torch.bfloat16 if native else torch.float32
    text, stats = generating.generate_text(tmp_path / "bf16", "The king said", max_new_tokens=4)
    assert stats["dtype"] == want and text == generating.generate_text(tmp_path / "bf16", "The king said", max_new_tokens=4, dtype=want)[0]
    offloaded = generating.generate_text(tmp_path / "bf16", "The king said", max_new_tokens=4, resident=0.5)
    assert offloaded[1]["dtype"] == want and offloaded[0] == text
    assert generating.generate_text(reference_model_dir(), "The king said", max_new_tokens=1)[1]["dtype"] == torch.float32
    from moelab.models import MoETransformer, save_pretrained, tiny

    save_pretrained(MoETransformer(tiny()).to(torch.bfloat16), tmp_path / "moelab-bf16")
    assert generating.decode_dtype(tmp_path / "moelab-bf16", {}, "cpu") == want  # its tensors' dtype
    assert generating.decode_dtype(tmp_path / "bf16", {"dtype": "bfloat16"}, "cuda") == torch.bfloat16  # a GPU
    assert generating.decode_dtype(tmp_path / "bf16", {"torch_dtype": "float16"}, "cuda") == torch.float32  # fp16: fp32
    fp8 = {"quantization_config": {"quant_method": "fp8"}}  # dequantized as bf16 where the config states no dtype
    assert generating.decode_dtype(tmp_path / "bf16", fp8, "cpu") == want
    assert generating.decode_dtype(tmp_path / "no-weights", {}, "cpu") == torch.float32  # loading says why
    with pytest.raises(ValueError, match="dtype is 'auto' or a torch.dtype"):
        generating.generate_text(tmp_path / "bf16", "The king said", dtype="bf16")


def test_a_tokenizer_config_alone_is_the_checkpoints_own_tokenizer(tmp_path):
    """A checkpoint with tokenizer_config.json but no tokenizer.json has a tokenizer of its own:
    it is read (a broken one refused), never swapped for moelab's."""
    from moelab.generate import load_tokenizer_of

    (tmp_path / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(ValueError, match=f"cannot read the tokenizer in {tmp_path} "):
        load_tokenizer_of(tmp_path)


def test_prompts_are_left_padded_with_a_mask_only_where_lengths_differ():
    """Shorter prompts get token 0 on the left and a mask; equally long ones no mask (None)."""
    from moelab.generate import _left_padded

    batch, mask = _left_padded([[5, 6, 7], [8]], ["a", "b"], "cpu")
    assert batch.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert _left_padded([[5], [8]], ["a", "b"], "cpu")[1] is None
    with pytest.raises(ValueError, match="the prompt 'b' encodes to no tokens"):
        _left_padded([[5], []], ["a", "b"], "cpu")


def test_parse_size():
    from moelab.generate import parse_size

    assert parse_size("2GiB") == 2 * 2**30 and parse_size("800MB") == 800 * 10**6 and parse_size("1234") == 1234
    with pytest.raises(ValueError, match="cannot read '2 parsecs' as a size"):
        parse_size("2 parsecs")


def test_bench_generate_top_p_thresholds_on_a_top_p_model(tmp_path, monkeypatch):
    import dataclasses

    import torch

    from moelab.bench import skipping
    from moelab.models import MoETransformer, save_pretrained, tiny

    torch.manual_seed(0)
    moe = dataclasses.replace(tiny().moe, router="topp", top_p=0.6)
    save_pretrained(MoETransformer(dataclasses.replace(tiny(), vocab_size=8192, init_std=0.2, moe=moe)), tmp_path / "m")
    out = tmp_path / "g.json"
    args = ["bench", "generate", str(tmp_path / "m"), "--batch", "1", "--new-tokens", "4", "--rounds", "1",
            "--top-p", "0.2", "--top-p", "0.95", "--json", str(out), "--quiet"]  # fmt: skip
    tokenized, tokenize_split = [], skipping.tokenize_split
    monkeypatch.setattr(skipping, "tokenize_split", lambda *a, quiet: tokenized.append(quiet) or tokenize_split(*a))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert tokenized and set(tokenized) == {True}, "--quiet: no tokenizing bars for the perplexity's test split"
    doc = json.loads(out.read_text())
    quality = doc["routing_quality"][str(tmp_path / "m")]
    assert list(quality) == ["none", "topp0.2", "topp0.95"]
    k = {name: q["experts_per_token"] for name, q in quality.items()}
    assert 1.0 <= k["topp0.2"] < k["none"] < k["topp0.95"] <= 4.0  # adaptive k: the threshold sets k
    row = doc["results"][0]
    assert set(row["tokens_per_s"]) == {"moelab", "moelab_topp0.2", "moelab_topp0.95"}  # no transformers family
    assert row["family"] is None and row["ratio_vs_transformers"] is None and row["same_greedy_tokens"]["moelab"] == 1.0
    plain = runner.invoke(app, ["bench", "generate", str(tmp_path / "m"), "--batch", "1", "--new-tokens", "2",
                                "--rounds", "1", "--top-p", "0.5"])  # fmt: skip
    assert plain.exit_code == 0, plain.output


def test_bench_generate_top_p_needs_top_p_routers(tmp_path):
    import dataclasses

    from moelab.models import MoETransformer, save_pretrained, tiny

    save_pretrained(MoETransformer(dataclasses.replace(tiny(), vocab_size=8192)), tmp_path / "m")
    result = runner.invoke(app, ["bench", "generate", str(tmp_path / "m"), "--batch", "1", "--new-tokens", "2",
                                 "--rounds", "1", "--top-p", "0.5"])  # fmt: skip
    assert result.exit_code != 0
    assert "this model has none" in str(result.exception) + result.output


def test_bench_distributed_refuses_a_model_the_parallel_path_cannot_run_before_any_cell():
    """ReXMoE cannot run under torchrun: refused in one line before the one-process cell, where a
    worker's traceback used to come after it."""
    result = runner.invoke(app, ["bench", "distributed", "configs/models/rexmoe.yaml", "--procs", "1", "--procs", "2",
                                 "--steps", "1", "--rounds", "1", "--batch-size", "2", "--seq-len", "16"])  # fmt: skip
    assert result.exit_code != 0
    assert "ReXMoE's shared expert pools" in str(result.exception) + result.output


@pytest.mark.slow
def test_bench_distributed_json_contract(tmp_path):
    """1 and 2 gloo processes: EP bytes measured equal the uniform-routing count within the
    routing's imbalance; no exchange without EP."""
    import yaml

    model = dict(vocab_size=8192, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64,
                 moe=dict(num_experts=4, hidden_dim=32, top_k=2))  # fmt: skip
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model))
    out = tmp_path / "bench.json"
    args = ["bench", "distributed", str(tmp_path / "model.yaml"), "--procs", "1", "--procs", "2", "--batch-size", "4",
            "--seq-len", "32", "--steps", "1", "--rounds", "1", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "moelab-bench-distributed/1"
    cells = {(c["procs"], c["layout"]): c for c in doc["cells"]}
    assert list(cells) == [(1, "one"), (2, "dp"), (2, "ep")]
    assert cells[(1, "one")]["vs_one_process"] == 1.0
    assert cells[(2, "dp")]["ep_bytes_per_step"] == 0 and cells[(2, "dp")]["ep_exchange_share"] == 0
    ep = cells[(2, "ep")]
    assert ep["ep_exchange_share"] > 0 and ep["fsdp_share"] > 0
    # 128 tokens x 2 experts x 2 layers x 1/2 crossing x (2*32+1) x 4 bytes x 2 (backward)
    assert ep["ep_bytes_uniform"] == 2 * 128 * 2 * 2 * 0.5 * 65 * 4
    assert 0.5 < ep["ep_bytes_per_step"] / ep["ep_bytes_uniform"] < 1.5


def test_benchmarks_record_the_machine_and_the_commit(monkeypatch):
    """`moelab.bench.machine`: the CPU's model name and cores; moelab's commit in its own checkout
    (with "+changes" when its files differ), None where moelab's files are not in a git checkout."""
    import re
    import subprocess

    assert re.fullmatch(r".+, \d+ cores", machine.device_name("cpu"))
    commit = machine.source_commit()
    if commit is not None:  # run from moelab's checkout (CI's clean clone is one)
        assert re.fullmatch(r"[0-9a-f]{7,}(\+changes)?", commit)

    def outside_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(machine.subprocess, "run", outside_git)
    assert machine.source_commit() is None


def test_every_model_argument_takes_a_shipped_models_name():
    """A shipped model's name stands for its directory where no such path exists (CLI and
    `load_pretrained`); anything else that is no path is refused with the names."""
    from moelab.models import load_pretrained
    from moelab.models.reference import model_dir

    assert model_dir("ref-32e-top4-shared") == reference_model_dir("ref-32e-top4-shared")
    assert model_dir(None) == reference_model_dir() and model_dir("runs/x") == Path("runs/x")
    assert load_pretrained("ref-32e-top4-shared").config.moe.num_experts == 32
    result = runner.invoke(app, ["generate", "The king said", "--model", "ref-32e-top4-shared", "--max-new-tokens", "2"])
    assert result.exit_code == 0 and "2 tokens in" in result.output, result.output
    for args in (["eval", "ref-32x"], ["calibrate", "ref-32x", "--out", "nowhere"], ["generate", "hi", "--model", "ref-32x"]):
        refused = runner.invoke(app, args)
        message = str(refused.exception) + refused.output
        assert refused.exit_code != 0 and "no model at ref-32x" in message and "ref-32e-top4-shared" in message, args


class _Called(Exception):
    """Raised by `_record_first_argument`'s stand-ins: the call got as far as them."""


def _record_first_argument(monkeypatch, targets) -> list:
    """Replace each (module, function name) of targets by a stand-in that records its first
    argument in the returned list and raises _Called."""
    seen = []

    def record(*args, **kwargs):
        seen.append(args[0])
        raise _Called

    for module, function in targets:
        monkeypatch.setattr(module, function, record)
    return seen


def test_the_python_entry_points_take_a_shipped_models_name(monkeypatch, tmp_path):
    """compress, calibrate, evaluate (model and base), load_offloaded, export_checkpoint,
    open_checkpoint, the tracer's load_model and demo read a shipped model's name as its directory,
    as the CLI and load_pretrained do."""
    from importlib import import_module

    from moelab.hf import open_checkpoint
    from moelab.hf.export import export_checkpoint
    from moelab.offload import load_offloaded
    from moelab.trace import load_model

    run, calibration, evaluate, demo = (import_module(f"moelab.{m}") for m in
                                        ("compress.run", "compress.calibration", "eval.evaluate", "demo"))  # fmt: skip
    name, directory = "ref-32e-top4-shared", reference_model_dir("ref-32e-top4-shared")
    assert open_checkpoint(name).path == directory
    assert load_model(name).model.config.moe.num_experts == 32
    assert load_offloaded(name, resident=0.5).model.config.moe.num_experts == 32
    export_checkpoint(name, tmp_path / "hf", "qwen2_moe", quiet=True)
    assert (tmp_path / "hf" / "config.json").is_file()
    seen = _record_first_argument(monkeypatch, ((run, "_mtp_layers"), (calibration, "run_calibration"),
                                                (evaluate, "LoadedLM"), (demo, "load_pretrained")))  # fmt: skip
    calls = (lambda: run.compress(name, tmp_path / "c"), lambda: calibration.calibrate(name, tmp_path / "s"),
             lambda: evaluate.evaluate(name), lambda: demo.run_demo(tmp_path / "d", model_dir=name))  # fmt: skip
    for call in calls:
        with pytest.raises(_Called):
            call()
    assert seen == [directory] * 4
    monkeypatch.setattr(evaluate, "LoadedLM", lambda path: seen.append(path) or SimpleNamespace(native=True, vocab_size=1))
    with pytest.raises(Exception):
        evaluate.evaluate(tmp_path, base=name)
    assert seen[-2:] == [tmp_path, directory]


def test_the_tracer_analyze_compress_bench_and_generate_take_a_shipped_models_name(monkeypatch, tmp_path):
    """trace_from_files, analyze, run_bench and generate_texts read a shipped model's name as its
    directory; the tracer and analyze keep their output out of it, named or the default (None)."""
    from importlib import import_module

    from moelab.io import OutputError

    tracer, analysis, bench, generating = (import_module(f"moelab.{m}") for m in
                                           ("trace.tracer", "analyze.run", "compress.bench", "generate"))  # fmt: skip
    name, directory = "ref-32e-top4-shared", reference_model_dir("ref-32e-top4-shared")
    seen = _record_first_argument(monkeypatch, ((tracer, "load_model"), (analysis, "trace_from_files"),
                                                (bench, "_check_cells"), (generating, "_check_vocabulary")))  # fmt: skip
    for call in (tracer.trace_from_files, analysis.analyze, bench.run_bench):
        with pytest.raises(_Called):
            call(name, tmp_path / call.__name__)
    with pytest.raises(_Called):  # the checks that read the model's config.json see it (they saw none before)
        generating.generate_texts(name, ["The king said"])
    assert seen == [directory] * 4
    for model, inside in ((name, directory), (None, reference_model_dir())):  # nothing is created there
        for call in (tracer.trace_from_files, analysis.analyze):
            with pytest.raises(OutputError, match="inside the input"):
                call(model, inside / "out")


def test_generate_keeps_room_for_its_kv_cache_in_a_memory_budget(monkeypatch):
    """The KV cache that decoding fills (every prompt's positions, the prompt's and the new
    tokens', compiled rounded up to 64) comes out of a memory budget: generate_texts tells
    load_offloaded its size."""
    import moelab.generate as generate
    asked = {}

    def load_offloaded(path, **options):
        asked.update(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(generate, "load_offloaded", load_offloaded)
    prompts = ["The king said", "Once upon a time there was"]
    tokenizer = generate.load_tokenizer_of(reference_model_dir())
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    with pytest.raises(RuntimeError, match="stop here"):
        generate.generate_texts(reference_model_dir(), prompts, max_new_tokens=10, memory_budget=2**30)
    assert asked["memory_budget"] == 2**30 and asked["kv_cache_tokens"] == 2 * (longest + 10)
    assert asked["kv_cache_sequences"] == 2  # room for each prompt's recurrent state (where the model keeps one)
    assert asked["kv_cache_prompt_tokens"] == longest  # the padded prompt (DeepSeek-V4's room depends on it)
    with pytest.raises(RuntimeError, match="stop here"):  # a compiled step's cache: 64 positions
        generate.generate_texts(reference_model_dir(), prompts, max_new_tokens=10, memory_budget=2**30, compile=True)
    assert asked["kv_cache_tokens"] == 2 * 64
    with pytest.raises(RuntimeError, match="stop here"):  # at most the context (512): longer fails as it starts
        generate.generate_texts(reference_model_dir(), prompts, max_new_tokens=600, memory_budget=2**30)
    assert asked["kv_cache_tokens"] == 2 * 512
    config = {"model_type": "olmoe", "max_position_embeddings": 4096}  # transformers runs it: no compiled step
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert generate._kv_cache_tokens(config, ids, 10, compile=True) == 2 * 15
    assert generate._kv_cache_tokens(config | {"model_type": "mixtral"}, ids, 10, compile=True) == 2 * 64
    assert generate._kv_cache_tokens(config | {"max_position_embeddings": 12}, ids, 10, compile=False) == 2 * 12


def test_sizes_read_in_decimal_and_binary_units():
    from moelab.generate import parse_size

    texts = ("123456", "2KiB", "2 kb", "1.5GiB", "800MB")
    assert [parse_size(t) for t in texts] == [123456, 2048, 2000, 3 * 2**29, 800 * 10**6]


def test_a_prompt_token_id_of_the_vocabulary_size_is_refused(tmp_path):
    from moelab.generate import _check_vocabulary

    _check_vocabulary(tmp_path, {"vocab_size": 64}, [[0, 63]])  # the largest id there is
    with pytest.raises(ValueError, match="token id 64 .* vocabulary of 64 tokens"):
        _check_vocabulary(tmp_path, {"vocab_size": 64}, [[5], [64]])


def test_the_speed_counts_every_prompts_tokens(monkeypatch):
    """3 prompts, 4 steps in 2 s: 6 tokens/s."""
    from types import SimpleNamespace

    import torch

    import moelab.generate as G

    monkeypatch.setattr(G, "time", SimpleNamespace(perf_counter=lambda: 12.0))  # this module's clock only
    speed = G._speed(10.0, torch.zeros(3, 9, dtype=torch.long), 4)
    assert speed == {"steps": 4, "seconds": 2.0, "tokens_per_s": 6.0, "threads": torch.get_num_threads()}


# ------------------------------------------------------------- flags reach the library call


def _record(monkeypatch, target: str, result=None) -> list:
    """Replace `target` ("module.attr") by a stand-in that records each call's (args, kwargs)."""
    calls = []
    monkeypatch.setattr(target, lambda *a, **k: calls.append((a, k)) or result)
    return calls


def _ok(args: list) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def test_trace_and_analyze_pass_every_option_on(monkeypatch, tmp_path):
    """Each flag of trace / analyze reaches trace_from_files / analyze, unswapped; no flag: the defaults."""
    from types import SimpleNamespace

    import moelab.analyze  # noqa: F401  (before the stand-ins: its module binds trace_from_files when imported)
    from moelab.trace import TraceOptions

    info = SimpleNamespace(num_tokens=5, layers=[1], settings={"tokens_per_second": 2.0})
    traced = _record(monkeypatch, "moelab.trace.trace_from_files", SimpleNamespace(info=info))
    analyzed = _record(monkeypatch, "moelab.analyze.analyze", tmp_path / "report.html")
    flags = ["--data", "d.txt", "--domain", "code", "--domain", "german", "--max-tokens", 11,
             "--seq-len", 12, "--batch-size", 13, "--overwrite", "--quiet"]  # fmt: skip
    _ok(["trace", "ref-8e-top2", "--out", tmp_path / "t", *flags, "--logits"])
    _ok(["analyze", "ref-8e-top2", "--out", tmp_path / "a", *flags])
    _ok(["trace"])
    _ok(["analyze"])
    _ok(["trace", "--split", "test"])  # a split of the shipped corpus (refused beside --data of one's own)
    _ok(["analyze", "--split", "test"])
    given = dict(data="d.txt", split="validation", domains=["code", "german"], overwrite=True, quiet=True)
    default = dict(data="corpus", split="validation", domains=None, options=TraceOptions(), overwrite=False, quiet=False)
    model = reference_model_dir()
    assert traced == [((model, tmp_path / "t"), dict(given, options=TraceOptions(max_tokens=11, seq_len=12, batch_size=13, logits=True))),
                      ((model, Path("runs/trace")), default), ((model, Path("runs/trace")), dict(default, split="test"))]  # fmt: skip
    assert analyzed == [((model, tmp_path / "a"), dict(given, options=TraceOptions(max_tokens=11, seq_len=12, batch_size=13))),
                        ((model, Path("runs/analysis")), default),
                        ((model, Path("runs/analysis")), dict(default, split="test"))]  # fmt: skip


def test_calibrate_and_compress_pass_every_option_on(monkeypatch, tmp_path):
    """Each flag of calibrate / compress reaches the library call, unswapped; no flag: the defaults."""
    from types import SimpleNamespace

    from moelab.compress import CalibrationOptions
    from moelab.compress.observers import DEFAULT_OBSERVERS
    from moelab.compress.router_fit import RouterFit

    stats = SimpleNamespace(info={"coverage": {"0": 1}, "mixture": {"tokens": 5}, "moe_layers": [0], "tokens_per_second": 1.0})
    calibrated = _record(monkeypatch, "moelab.compress.calibrate", stats)
    sizes = {"before": {"routed_experts": 8, "total": 10}, "after": {"routed_experts": 4, "total": 6}}
    compressed = _record(monkeypatch, "moelab.compress.compress", {"parameters": sizes, "stability_jaccard": None})
    window = ["--calib-tokens", 21, "--seq-len", 22, "--batch-size", 23, "--sample-tokens", 24]
    # no statistics at --stats here; the check of the window against them has its own test
    monkeypatch.setattr("moelab.cli._check_reused_settings", lambda ctx, stats: None)
    _ok(["calibrate", "ref-8e-top2", "--out", tmp_path / "c", "--calib", "corpus:code", "--calib", "x.txt", *window,
         "--backward", "--no-mtp", "--overwrite", "--quiet"])  # fmt: skip
    _ok(["calibrate"])
    _ok(["compress", "ref-8e-top2", "--method", "frequency", "--ratio", 0.5, "--option", "a=1", "--option", "b=x",
         "--out", tmp_path / "o", "--calib", "c.txt", "--stats", tmp_path / "s", "--domain", "code",
         "--protect-super-experts", "--budget", "global", "--recalibrate-router", 5, "--router-lr", 0.01, *window,
         "--keep-quantized", "--mtp", "drop", "--no-reload", "--overwrite", "--quiet"])  # fmt: skip
    _ok(["compress"])
    model, options = reference_model_dir(), CalibrationOptions(tokens=21, seq_len=22, batch_size=23, sample_tokens=24)
    backward = dataclasses.replace(options, observers=DEFAULT_OBSERVERS + ("neurons",))
    assert calibrated == [
        ((model, tmp_path / "c"), dict(calib=["corpus:code", "x.txt"], options=backward, mtp=False, overwrite=True,
                                       quiet=True)),
        ((model, Path("runs/calibration")), dict(calib="corpus", options=CalibrationOptions(), mtp=True, overwrite=False,
                                            quiet=False)),
    ]
    assert compressed == [
        ((model, tmp_path / "o"), dict(
            method="frequency", ratio=0.5, calib=["c.txt"], stats=tmp_path / "s", calib_options=options,
            protect_super_experts=True, domains=["code"], budget="global", method_options={"a": 1, "b": "x"},
            router_fit=RouterFit(5, 0.01), keep_quantized=True, mtp="drop", reload=False, overwrite=True, quiet=True)),
        ((model, Path("runs/compressed")), dict(
            method="reap", ratio=0.25, calib=None, stats=None, calib_options=CalibrationOptions(),
            protect_super_experts=False, domains=None, budget="layer", method_options={}, router_fit=RouterFit(),
            keep_quantized=False, mtp="prune", reload=None, overwrite=False, quiet=False)),
    ]  # fmt: skip


def test_method_options_read_json_values_and_refuse_a_pair_without_a_key():
    """--option KEY=VALUE: JSON where the value parses, else the string; a missing '=' or key is refused."""
    from moelab.cli import _method_options

    pairs = ["a=1", "b=true", " c =x y", "d=null", "e=1=2", "f=", "g=0.5", 'h="q"']
    assert _method_options(pairs) == {"a": 1, "b": True, "c": "x y", "d": None, "e": "1=2", "f": "", "g": 0.5, "h": "q"}
    assert _method_options(None) == {} and _method_options([]) == {}
    for bad in ("layout", "=3", " =3"):
        with pytest.raises(ValueError, match=f"--option takes KEY=VALUE .*got {bad!r}"):
            _method_options(["a=1", bad])


def test_eval_export_import_consolidate_pass_every_option_on(monkeypatch, tmp_path):
    """Each flag of eval / export / import / consolidate reaches the library call; eval writes its --json."""
    import importlib

    from moelab.eval.evaluate import EvalOptions

    module = importlib.import_module("moelab.eval.evaluate")  # the package's `evaluate` is the function
    evaluated = []
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: evaluated.append((a, k)) or {"n": 1})
    monkeypatch.setattr(module, "render_report", lambda report: "table")
    exported = _record(monkeypatch, "moelab.hf.export.export_checkpoint", tmp_path / "e")
    imported = _record(monkeypatch, "moelab.hf.conversion.import_checkpoint", tmp_path / "i")
    consolidated = _record(monkeypatch, "moelab.train.checkpoint.consolidate_checkpoint", tmp_path / "m")
    _ok(["eval", "ref-8e-top2", "--base", "ref-32e-top4-shared", "--data", "d.txt",
         "--domain", "code", "--eval-tokens", 41, "--seq-len", 42, "--batch-size", 43, "--prompts", 5,
         "--prompt-tokens", 6, "--new-tokens", 7, "--dynamic-skip", tmp_path / "s", "--json", tmp_path / "r.json",
         "--quiet"])  # fmt: skip
    _ok(["eval"])
    _ok(["eval", "--split", "validation"])  # a split of the shipped corpus (refused beside --data of one's own)
    assert json.loads((tmp_path / "r.json").read_text()) == {"n": 1}
    options = EvalOptions(data="d.txt", domains=["code"], eval_tokens=41, seq_len=42, batch_size=43,
                          prompts=5, prompt_tokens=6, gen_tokens=7, dynamic_skip=str(tmp_path / "s"))
    model = reference_model_dir()
    assert evaluated == [((model,), dict(base=reference_model_dir("ref-32e-top4-shared"), options=options, quiet=True)),
                         ((model,), dict(base=None, options=EvalOptions(), quiet=False)),
                         ((model,), dict(base=None, options=EvalOptions(split="validation"), quiet=False))]  # fmt: skip
    _ok(["export", "ref-8e-top2", "--family", "mixtral", "--out", tmp_path / "x", "--tokenizer", tmp_path / "tok",
         "--overwrite", "--quiet"])  # fmt: skip
    _ok(["export", "ref-8e-top2", "--family", "qwen2_moe", "--out", tmp_path / "y", "--no-tokenizer"])
    _ok(["export", "ref-8e-top2", "--family", "mixtral", "--out", tmp_path / "z"])
    assert exported == [
        ((model, tmp_path / "x", "mixtral"), dict(tokenizer=tmp_path / "tok", overwrite=True, quiet=True)),
        ((model, tmp_path / "y", "qwen2_moe"), dict(tokenizer=None, overwrite=False, quiet=False)),
        ((model, tmp_path / "z", "mixtral"), dict(tokenizer="auto", overwrite=False, quiet=False)),
    ]
    _ok(["import", tmp_path / "hf", "--out", tmp_path / "i", "--overwrite", "--quiet"])
    _ok(["import", tmp_path / "hf", "--out", tmp_path / "j"])
    assert imported == [((tmp_path / "hf", tmp_path / "i"), dict(overwrite=True, quiet=True)),
                        ((tmp_path / "hf", tmp_path / "j"), dict(overwrite=False, quiet=False))]  # fmt: skip
    _ok(["consolidate", tmp_path / "ck", "--out", tmp_path / "m", "--overwrite"])
    _ok(["consolidate", tmp_path / "ck", "--out", tmp_path / "n"])
    assert consolidated == [((tmp_path / "ck", tmp_path / "m"), dict(overwrite=True)),
                            ((tmp_path / "ck", tmp_path / "n"), dict(overwrite=False))]  # fmt: skip


def test_train_compare_demo_and_compress_bench_pass_every_option_on(monkeypatch, tmp_path):
    """Each flag of train / compare / demo / compress-bench reaches the library call; train refuses
    --resume with --overwrite, and --expert-parallel replaces the run file's expert degree and its data degree;
    train and compare keep freed memory unless --no-keep-memory."""
    from types import SimpleNamespace

    from moelab.compress.bench import BenchOptions
    from moelab.distributed import ParallelConfig
    from moelab.train import RunConfig

    runs, parallel = [], ParallelConfig(expert=4, data=2, timeout_s=5.0)  # the run file's
    monkeypatch.setattr(RunConfig, "load", lambda path: runs.append(SimpleNamespace(parallel=parallel)) or runs[-1])
    result = SimpleNamespace(steps=1, tokens=2, tokens_per_second=3.0, eval_loss={"all": 1.0})
    trained = _record(monkeypatch, "moelab.train.train", result)
    kept = _record(monkeypatch, "moelab.memory.keep_freed_memory", True)
    config = tmp_path / "run.yaml"
    _ok(["train", config, "--out", tmp_path / "r", "--resume", "--quiet", "--expert-parallel", 2])
    assert len(kept) == 1
    _ok(["train", config, "--overwrite", "--no-keep-memory"])
    assert len(kept) == 1
    assert runs[0].parallel == ParallelConfig(expert=2, data=None, timeout_s=5.0) and runs[1].parallel == parallel
    assert trained == [((runs[0], tmp_path / "r"), dict(resume=True, overwrite=False, inputs=[config], quiet=True)),
                       ((runs[1], Path("runs/run")), dict(resume=False, overwrite=True, inputs=[config], quiet=False))]
    refused = runner.invoke(app, ["train", str(config), "--resume", "--overwrite"])
    assert refused.exit_code != 0 and "pass one of them" in str(refused.exception) and len(trained) == 2

    monkeypatch.setattr("moelab.train.compare.load_recipe", lambda path: ("recipe", path))
    compared = _record(monkeypatch, "moelab.train.compare.compare", tmp_path / "report.md")
    _ok(["compare", "a.yaml", "tiny", "--train", tmp_path / "t.yaml", "--out", tmp_path / "c", "--seeds", 3,
         "--overwrite", "--quiet"])  # fmt: skip
    _ok(["compare", "a.yaml", "--train", tmp_path / "t.yaml", "--out", tmp_path / "d", "--no-keep-memory"])
    assert len(kept) == 2
    recipe = ("recipe", tmp_path / "t.yaml")
    assert compared == [
        ((["a.yaml", "tiny"], recipe, tmp_path / "c"), dict(seeds=3, overwrite=True, inputs=[tmp_path / "t.yaml"], quiet=True)),
        ((["a.yaml"], recipe, tmp_path / "d"), dict(seeds=1, overwrite=False, inputs=[tmp_path / "t.yaml"], quiet=False)),
    ]  # fmt: skip

    from moelab import cli

    demos = _record(monkeypatch, "moelab.demo.run_demo")
    _ok(["demo", "--out", tmp_path / "demo", "--model", "ref-32e-top4-shared", "--prune", 3, "--quick", "--overwrite",
         "--quiet"])  # fmt: skip
    _ok(["demo"])
    assert demos == [
        ((tmp_path / "demo",), dict(model_dir=reference_model_dir("ref-32e-top4-shared"), prune=3, overwrite=True,
                                    console=cli.console, quiet=True, eval_tokens=4096, trace_tokens=8000)),
        ((Path("runs/demo"),), dict(model_dir=None, prune=2, overwrite=False, console=cli.console, quiet=False)),
    ]  # fmt: skip

    benched = _record(monkeypatch, "moelab.compress.bench.run_bench")
    _ok(["compress-bench", "ref-32e-top4-shared", "--out", tmp_path / "b", "--method", "reap", "--method", "frequency",
         "--ratio", 0.3, "--router-fit", 4, "--domain", "code", "--llmcompressor-python", sys.executable,
         "--calib-tokens", 51, "--eval-tokens", 52, "--prompts", 3, "--overwrite", "--quiet"])  # fmt: skip
    _ok(["compress-bench"])
    options = BenchOptions(methods=("reap", "frequency"), ratios=(0.3,), router_fit=4, calib_tokens=51, eval_tokens=52,
                           prompts=3, domain="code", llmcompressor_python=sys.executable)
    assert benched == [
        ((reference_model_dir("ref-32e-top4-shared"), tmp_path / "b", options), dict(overwrite=True, quiet=True)),
        ((reference_model_dir(), Path("runs/compress-bench"), BenchOptions()), dict(overwrite=False, quiet=False)),
    ]



def test_compute_commands_run_on_their_threads_and_put_torch_s_back(monkeypatch, tmp_path):
    """Every command that runs a model runs its library call on --threads N intra-op threads, or with
    'auto' (the default) on the free cores, and puts torch's count back afterwards; where
    OMP_NUM_THREADS is set (torchrun's workers), 'auto' leaves torch's count as it is."""
    import importlib
    from types import SimpleNamespace

    from moelab.train import RunConfig, TrainConfig

    seen, trained = [], []

    def stand_in(target, result=None, name=None):  # target: "module.attr", or a module and name
        record = lambda *a, **k: seen.append(torch.get_num_threads()) or result  # noqa: E731
        monkeypatch.setattr(target, *(() if name is None else (name,)), record)

    info = SimpleNamespace(num_tokens=5, layers=[1], settings={"tokens_per_second": 2.0})
    stand_in("moelab.trace.trace_from_files", SimpleNamespace(info=info))
    stand_in("moelab.analyze.analyze", tmp_path / "report.html")
    stats = SimpleNamespace(info={"coverage": {"0": 1}, "mixture": {"tokens": 5}, "moe_layers": [0], "tokens_per_second": 1.0})
    stand_in("moelab.compress.calibrate", stats)
    sizes = {"before": {"routed_experts": 8, "total": 10}, "after": {"routed_experts": 4, "total": 6}}
    stand_in("moelab.compress.compress", {"parameters": sizes, "stability_jaccard": None})
    stand_in("moelab.compress.bench.run_bench")
    stand_in("moelab.demo.run_demo")
    evaluate = importlib.import_module("moelab.eval.evaluate")
    stand_in(evaluate, {"n": 1}, "evaluate")  # the package's `evaluate` is the function
    monkeypatch.setattr(evaluate, "render_report", lambda report: "table")
    recipe = TrainConfig(steps=1, threads=2)  # a run file's threads: --threads replaces them, else they hold
    monkeypatch.setattr(RunConfig, "load", lambda path: SimpleNamespace(parallel=None, train=recipe))
    done = SimpleNamespace(steps=1, tokens=2, tokens_per_second=3.0, eval_loss={"all": 1.0})
    monkeypatch.setattr("moelab.train.train", lambda run, *a, **k: trained.append(run.train.threads) or seen.append(torch.get_num_threads()) or done)
    monkeypatch.setattr("moelab.train.compare.load_recipe", lambda path: recipe)
    compared = lambda configs, config, *a, **k: trained.append(config.threads) or seen.append(torch.get_num_threads()) or tmp_path  # noqa: E731
    monkeypatch.setattr("moelab.train.compare.compare", compared)
    decoded = {"steps": 1, "seconds": 1.0, "tokens_per_s": 1.0, "later_tokens_per_s": None, "threads": 1, "dtype": torch.float32}
    stand_in("moelab.generate.generate_texts", (["a", "b"], decoded))
    commands = [["trace"], ["analyze"], ["calibrate"], ["compress"], ["compress-bench"], ["demo"], ["eval"],
                ["train", tmp_path / "run.yaml"], ["compare", "a.yaml", "--train", "t.yaml", "--out", tmp_path / "c"],
                ["generate", "one", "two"]]  # fmt: skip
    monkeypatch.setattr("moelab.threads.free_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set where the tests run, 'auto' would keep torch's count
    before = torch.get_num_threads()
    try:
        for args in commands:
            torch.set_num_threads(2)
            _ok([*args, "--threads", 1])
            assert torch.get_num_threads() == 2, args
            torch.set_num_threads(1)
            _ok(args)  # auto: the 2 free cores
            assert torch.get_num_threads() == 1, args
        assert seen == [1, 2] * len(commands)
        assert trained == [1, 2, 1, 2]  # train's, then compare's: --threads 1, then the run file's 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        _ok(["eval"])
        assert seen[-1] == 1
        for bad, shown in (("0", "0"), ("two", "'two'"), ("²", "'²'")):  # refused before the library call
            refused = runner.invoke(app, ["eval", "--threads", bad])
            assert f"threads must be an integer >= 1 or 'auto' (the free cores), got {shown}" in str(refused.exception)
        assert len(seen) == 2 * len(commands) + 1
    finally:
        torch.set_num_threads(before)

def test_bench_commands_pass_every_option_on(monkeypatch, tmp_path):
    """Each flag of bench layer / generate / offload / distributed / skip / compress reaches its options,
    unswapped; --threads N is a number, auto stays a word; --quiet leaves out every progress display."""
    from moelab import cli
    from moelab.bench import compress, distributed, layer, offload, skipping
    from moelab.bench import generate as bench_generate

    created, progressed = [], []
    monkeypatch.setattr(layer.BenchOptions, "create", lambda **k: created.append(k))
    monkeypatch.setattr(layer, "run", lambda options, progress: progressed.append(progress) or {"memory": []})
    monkeypatch.setattr(layer, "render_table", lambda doc: "table")
    _ok(["bench", "layer", "--quick", "--config", "e8k2", "--dtype", "bf16", "--mode", "fwd", "--tokens", 7, "--rounds",
         3, "--skew", 0.5, "--no-memory", "--load", 2, "--threads", 3, "--device", "cuda"])  # fmt: skip
    _ok(["bench", "layer"])
    _ok(["bench", "layer", "--quiet"])
    assert progressed == [cli.console, cli.console, None]
    assert created[2] == created[1]
    del created[2]
    assert created == [
        dict(quick=True, configs=["e8k2"], dtypes=["bf16"], modes=["fwd"], tokens=7, rounds=3, skew=0.5, memory=False,
             load=2, threads=3, device="cuda"),
        dict(quick=False, configs=None, dtypes=None, modes=None, tokens=None, rounds=None, skew=2.0, memory=True,
             load=0, threads="auto", device="cpu"),
    ]  # fmt: skip

    runs, kwargs = [], []
    for module in (bench_generate, offload):
        monkeypatch.setattr(module, "check_device", lambda device: None)  # --device cuda on a CPU-only machine
    for module in (bench_generate, offload, distributed, skipping):
        monkeypatch.setattr(module, "run", lambda *a, **k: runs.append(a) or kwargs.append(k) or {"routing_quality": []})
        monkeypatch.setattr(module, "render", lambda doc: "table")
    model = reference_model_dir("ref-32e-top4-shared")
    _ok(["bench", "generate", "ref-32e-top4-shared", "--batch", 2, "--batch", 4, "--new-tokens", 5, "--prompt-tokens",
         6, "--rounds", 7, "--threads", 8, "--load", 9, "--skip", 0.1, "--top-p", 0.8, "--compile", "--dtype", "bf16",
         "--device", "cuda"])  # fmt: skip
    _ok(["bench", "generate"])
    assert runs.pop(0) == ({"ref-32e-top4-shared": model}, bench_generate.GenerateOptions(
        batch_sizes=(2, 4), prompt_tokens=6, new_tokens=5, rounds=7, threads=8, load=9, skip=(0.1,), top_p=(0.8,),
        compile=True, dtype="bf16", device="cuda"))  # fmt: skip
    assert runs.pop(0) == ({name: reference_model_dir(name) for name in ("ref-8e-top2", "ref-32e-top4-shared")},
                           bench_generate.GenerateOptions())  # fmt: skip
    _ok(["bench", "offload", "ref-32e-top4-shared", "--resident", 0.5, "--prompts", 2, "--new-tokens", 3, "--threads",
         4, "--rounds", 5, "--read-gbps", 1.5, "--no-page-cache", "--compile", "--dtype", "bf16", "--device", "cuda",
         "--host-memory"])  # fmt: skip
    _ok(["bench", "offload"])
    assert runs.pop(0) == ({"ref-32e-top4-shared": model}, offload.OffloadOptions(
        resident=(0.5,), prompts=2, new_tokens=3, threads=4, rounds=5, read_gbps=1.5, page_cache=False, compile=True,
        dtype="bf16", device="cuda", host_memory=True))  # fmt: skip
    assert runs.pop(0)[1] == offload.OffloadOptions()
    assert [k["quiet"] for k in kwargs] == [False] * 4 and all(k["progress"] is not None for k in kwargs)
    for verb in ("generate", "offload"):  # --quiet: no spinner, no tokenizing bars
        _ok(["bench", verb, "--quiet"])
        assert runs.pop(0)[1] == (bench_generate.GenerateOptions() if verb == "generate" else offload.OffloadOptions())
    assert kwargs[4:] == [dict(progress=None, quiet=True)] * 2
    kwargs.clear()
    monkeypatch.setattr("moelab.train.config.load_model_config", lambda model: ("config", model))
    _ok(["bench", "distributed", "tiny", "--procs", 2, "--batch-size", 6, "--seq-len", 4, "--steps", 5, "--rounds", 6,
         "--load", 7])  # fmt: skip
    _ok(["bench", "distributed", "tiny"])
    assert runs.pop(0) == (("config", "tiny"), distributed.DistributedOptions(
        procs=(2,), batch_size=6, seq_len=4, steps=5, rounds=6, load=7))  # fmt: skip
    assert runs.pop(0) == (("config", "tiny"), distributed.DistributedOptions())
    _ok(["bench", "skip", "ref-32e-top4-shared", "--stats", tmp_path / "s", "--tokens", 61, "--rounds", 62])
    _ok(["bench", "skip", "--stats", tmp_path / "s"])
    _ok(["bench", "distributed", "tiny", "--quiet"])
    _ok(["bench", "skip", "--stats", tmp_path / "s", "--quiet"])
    assert runs == [(model, tmp_path / "s", skipping.SkipOptions(tokens=61, rounds=62)),
                    (reference_model_dir(), tmp_path / "s", skipping.SkipOptions()),
                    (("config", "tiny"), distributed.DistributedOptions()),
                    (reference_model_dir(), tmp_path / "s", skipping.SkipOptions())]  # fmt: skip
    assert [k["progress"] is None for k in kwargs[:2]] == [False, False] and kwargs[4]["progress"] is None
    assert kwargs[2:4] == [dict(quiet=False)] * 2 and kwargs[5] == dict(quiet=True)
    compressed = []
    monkeypatch.setattr(compress, "run", lambda options, work, progress: compressed.append(progress) or {})
    monkeypatch.setattr(compress, "render", lambda doc: "table")
    for flags in ([], ["--quiet"]):
        _ok(["bench", "compress", "--work", tmp_path / f"w{len(flags)}", *flags])
    assert compressed == [cli.console, None]


def test_generate_passes_every_option_on(monkeypatch, tmp_path):
    """Each flag of generate reaches generate_texts; a sampling flag alone samples at temperature 1, seed 0."""
    import torch

    from moelab.models.transformer import Sampling

    calls = []
    stats = {"steps": 2, "seconds": 1.0, "tokens_per_s": 2.0, "later_tokens_per_s": None, "threads": 2, "dtype": torch.bfloat16}
    monkeypatch.setattr("moelab.generate.generate_texts", lambda *a, **k: calls.append((a, k)) or (["!", "?"], stats))
    monkeypatch.setattr("moelab.offload.RoutingPrior.from_trace", lambda path: ("prior", path))
    out = _ok(["generate", "one", "two", "--model", "ref-32e-top4-shared", "--max-new-tokens", 5, "--memory-budget",
               "1KiB", "--prior", tmp_path / "t", "--policy", "lru", "--compile", "--dtype", "bf16", "--device", "cuda",
               "--host-memory", "--temperature", 0.5, "--top-p", 0.9, "--top-k", 3, "--seed", 4, "--ignore-eos"])
    assert "one!" in out and "two?" in out and "2 x 2 tokens" in out and out.rstrip().endswith(", 2 threads, bfloat16")
    _ok(["generate", "one", "two", "--top-k", 2])
    _ok(["generate", "one", "two", "--resident", 0.5])
    given = dict(max_new_tokens=5, resident=None, memory_budget=1024, prior=("prior", tmp_path / "t"), policy="lru",
                 compile=True, dtype=torch.bfloat16, device="cuda", host_memory=True, streamer=None,
                 sampling=Sampling(temperature=0.5, top_p=0.9, top_k=3, seed=4), ignore_eos=True)  # fmt: skip
    default = dict(max_new_tokens=64, resident=None, memory_budget=None, prior=None, policy="reuse", compile=False,
                   dtype="auto", device="cpu", host_memory=False, streamer=None, sampling=None, ignore_eos=False)
    prompts = ["one", "two"]
    assert calls == [((reference_model_dir("ref-32e-top4-shared"), prompts), given),
                     ((reference_model_dir(), prompts), dict(default, sampling=Sampling(temperature=1.0, top_k=2))),
                     ((reference_model_dir(), prompts), dict(default, resident=0.5))]  # fmt: skip
    for flags, message in ((["--seed", "1"], "--seed seeds sampling"), (["--policy", "lru"], "--policy: for offloaded"),
                           (["--host-memory", "--prior", "p"], "--prior, --host-memory: for offloaded")):
        refused = runner.invoke(app, ["generate", "one", "two", *flags])
        assert refused.exit_code != 0 and message in str(refused.exception), flags
    assert len(calls) == 3


def test_ctrl_c_in_a_resumable_job_says_how_to_resume(monkeypatch, capsys, tmp_path):
    """calibrate, compress and compress-bench keep what they did for the next run into --out; after
    Ctrl-C they used to exit 130 without a word. Other commands say nothing more."""
    from moelab import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moelab.compress.calibrate", interrupted)
    monkeypatch.setattr("moelab.compress.compress", interrupted)
    monkeypatch.setattr("moelab.compress.bench.run_bench", interrupted)
    monkeypatch.setattr("moelab.models.model_info", interrupted)
    out = tmp_path / "out"
    hint = f"interrupted: run the same command again to resume (what is done is kept for {out})"
    # compress-bench --overwrite run again would clear its cells (calibrate's and compress's staging stays)
    again = f"interrupted: run the same command again without --overwrite to resume (what is done is kept for {out})"
    for args, said in ((["calibrate"], hint), (["compress"], hint), (["compress", "--overwrite"], hint),
                       (["compress-bench", "--method", "reap"], hint), (["compress-bench", "--overwrite"], again),
                       (["info", "tiny"], None)):  # fmt: skip
        monkeypatch.setattr("sys.argv", ["moelab", *args, *(["--out", str(out)] if args[0] != "info" else [])])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 130
        err = capsys.readouterr().err
        assert (said in err if said else "interrupted" not in err), (args, err)


def test_ctrl_c_in_train_and_compare_names_their_own_way_to_continue(monkeypatch, capsys, tmp_path):
    """compare, interrupted mid-variant, said the trainer's "continue with --resume", an option
    compare does not have (it resumes when run again); train's hint now also fits the flags given."""
    from moelab import cli
    from moelab.train import RunConfig

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moelab.train.train", interrupted)
    monkeypatch.setattr("moelab.train.compare.compare", interrupted)
    monkeypatch.setattr(RunConfig, "load", lambda path: RunConfig.from_dict({"model": "tiny", "train": {"steps": 5, "seq_len": 16}}))
    (tmp_path / "recipe.yaml").write_text("steps: 5\n")
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "step-000004"
    compare_args = ["compare", "tiny", "--train", str(tmp_path / "recipe.yaml")]
    for args, checkpointed, said in (
        (["train", "run.yaml"], True, f"interrupted: run the same command with --resume to continue the run in {out}"),
        (["train", "run.yaml", "--resume"], True, f"interrupted: run the same command again to continue the run in {out}"),
        (["train", "run.yaml", "--overwrite"], True, "run the same command with --resume instead of --overwrite to continue"),
        (["train", "run.yaml"], False, f"interrupted before the first checkpoint in {out}: run the same command again to start"),
        (compare_args, False, f"interrupted: run the same command again to resume (what is done is kept for {out})"),
        ([*compare_args, "--overwrite"], False, "interrupted: run the same command again without --overwrite to resume"),
    ):
        monkeypatch.setattr("moelab.train.checkpoint.latest_checkpoint", lambda run_dir, c=checkpointed: checkpoint if c else None)
        monkeypatch.setattr("sys.argv", ["moelab", *args, "--out", str(out)])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 130
        err = capsys.readouterr().err
        assert said in err and "--resume" not in err.replace(said, ""), (args, err)


def test_ctrl_c_in_train_before_its_first_checkpoint_names_a_command_that_starts_it(monkeypatch, capsys, tmp_path):
    """Interrupted after claiming --out (its config written) and before a checkpoint, the same
    command is refused (the run is there): the hint says --resume, which starts it; interrupted
    before the claim, or with --resume or --overwrite, the same command starts it. Each hint's flags
    pass the trainer's check of --out."""
    from moelab import cli
    from moelab.io import output_dir
    from moelab.train import RunConfig
    from moelab.train.trainer import KIND, RUN_ENTRIES, _check_output

    def interrupted(run, out, *, claims, **kwargs):
        if claims:
            with output_dir(out, KIND, entries=RUN_ENTRIES, overwrite=kwargs["overwrite"], resume=kwargs["resume"]):
                (out / "config.yaml").write_text("model: tiny\n")
                raise KeyboardInterrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(RunConfig, "load", lambda path: RunConfig.from_dict({"model": "tiny", "train": {"steps": 5, "seq_len": 16}}))
    for flags, claims, again in (
        ([], True, "with --resume"), ([], False, "again"), (["--overwrite"], True, "again"), (["--resume"], True, "again")
    ):  # fmt: skip
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        if flags:  # a run to resume or replace
            with pytest.raises(KeyboardInterrupt):
                interrupted(None, out, claims=True, overwrite=False, resume=False)
        monkeypatch.setattr("moelab.train.train", lambda run, out, claims=claims, **kwargs: interrupted(run, out, claims=claims, **kwargs))
        monkeypatch.setattr("sys.argv", ["moelab", "train", "run.yaml", "--out", str(out), *flags])
        with pytest.raises(SystemExit):
            cli.main()
        err = capsys.readouterr().err
        assert f"interrupted before the first checkpoint in {out}: run the same command {again} to start" in err, (flags, claims, err)
        hinted = [*flags, *again.split()[1:]]
        _check_output(out, [], resume="--resume" in hinted, overwrite="--overwrite" in hinted)


def test_compress_refuses_calibration_settings_that_its_statistics_were_not_made_with(tmp_path, monkeypatch, capsys):
    """`compress --stats S --calib-tokens N` reused S as it was and ignored N without a word; a
    setting the statistics were made with, or none, goes through."""
    from moelab import cli
    from moelab.compress import CalibrationOptions, calibrate
    from moelab.models import MoETransformer, save_pretrained, tiny

    model = save_pretrained(MoETransformer(dataclasses.replace(tiny(), vocab_size=8192)), tmp_path / "m")
    calibrate(model, tmp_path / "stats", options=CalibrationOptions(tokens=128, seq_len=32), quiet=True)
    class Compressed(Exception):
        pass

    def compress(*args, **kwargs):
        compressed.append(kwargs)
        raise Compressed

    compressed = []
    monkeypatch.setattr("moelab.compress.compress", compress)
    for flags, refused in ((["--calib-tokens", "64"], "--calib-tokens 64: the statistics in"),
                           (["--seq-len", "16"], "--seq-len 16: the statistics in"),
                           (["--calib-tokens", "128", "--seq-len", "32", "--batch-size", "2"], None),
                           ([], None)):  # fmt: skip  # the defaults (16384 tokens of 256) differ, but were not typed
        argv = ["moelab", "compress", str(model), "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "o")]
        monkeypatch.setattr("sys.argv", argv + flags)
        with pytest.raises((SystemExit, Compressed)):
            cli.main()
        err = capsys.readouterr().err
        if refused:
            assert refused in err and "drop " in err and not compressed, err
    assert len(compressed) == 2
    info = json.loads((tmp_path / "stats" / "calibration.json").read_text())
    del info["settings"]["seq_len"]  # an edited file is named, not a KeyError
    (tmp_path / "stats" / "calibration.json").write_text(json.dumps(info))
    monkeypatch.setattr("sys.argv", argv + ["--seq-len", "16"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "calibration.json: settings.seq_len must be int, got None" in capsys.readouterr().err


def test_bench_compress_names_the_token_count_it_needs(monkeypatch, capsys, tmp_path):
    """It asked for "one window of seq_len (256)", an option the command does not have."""
    from moelab import cli

    monkeypatch.setattr("sys.argv", ["moelab", "bench", "compress", "--tokens", "64", "--work", str(tmp_path / "w")])
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err
    assert "less than one calibration window of 256 tokens; pass --tokens 256 or more" in err, err
    assert not (tmp_path / "w").exists()


def test_bench_compress_announces_the_size_it_generates(monkeypatch, tmp_path):
    """Whole layers, at least one: --size-gb 0.01 announced a 0.01 GB checkpoint and wrote 0.24 GB."""
    from moelab.bench import compress as bench

    def stop(*args, **kwargs):
        raise RuntimeError("stop before generating")

    monkeypatch.setattr(bench, "make_checkpoint", stop)
    for size_gb, said in (("0.01", "a 0.24 GB qwen3_moe checkpoint of 1 layer (the least there is: --size-gb 0.01 asks for less)"),
                          ("0.3", "a 0.45 GB qwen3_moe checkpoint of 2 layers in")):  # fmt: skip
        result = runner.invoke(app, ["bench", "compress", "--size-gb", size_gb, "--work", str(tmp_path / "w")])
        assert isinstance(result.exception, RuntimeError) and f"generating {said}" in " ".join(result.output.split())
    config, size = bench.checkpoint_plan("qwen3_moe", 0.3)
    assert config.num_hidden_layers == 2 and round(size / 1e9, 2) == 0.45


def test_main_exit_codes_and_one_line_errors(monkeypatch, capsys):
    """main(): a usage error and a user mistake exit 2 with one `error:` line (a usage error names
    the command's --help; an OSError its file and the system's reason); typer's own exit code (130
    after Ctrl-C) passes through."""
    import typer

    from moelab import cli

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.argv", ["moelab", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") <= 1
        return exit_info.value.code, captured.err

    code, err = run("trace", "--seq-len", "lots")
    assert code == 2 and err.startswith("error: ") and err.endswith(" trace --help')\n") and "(see '" in err, err

    def fail(error):
        def model_info(*args, **kwargs):
            raise error

        monkeypatch.setattr("moelab.models.model_info", model_info)
        return run("info", "tiny")

    assert fail(FileNotFoundError(2, "No such file or directory", "/x/y.yaml")) == (
        2, "error: /x/y.yaml: No such file or directory\n")  # fmt: skip
    assert fail(ValueError("a long\n   message,  wrapped")) == (2, "error: a long message, wrapped\n")
    assert fail(typer.Exit(130)) == (130, "")


def test_bench_model_arguments_are_all_checked_before_the_first_is_timed(monkeypatch, tmp_path):
    """bench generate / offload refuse a directory without config.json, even after a good model,
    before any timing starts."""
    from moelab.bench import generate as bench_generate
    from moelab.bench import offload

    runs = []
    for module in (bench_generate, offload):
        monkeypatch.setattr(module, "run", lambda *a, **k: runs.append(a))
    for verb in ("generate", "offload"):
        refused = runner.invoke(app, ["bench", verb, "ref-8e-top2", str(tmp_path)])
        assert refused.exit_code != 0 and f"{tmp_path} is not a checkpoint (no config.json)" in str(refused.exception)
    assert runs == []


def test_info_pass_every_option_on():
    """info --seq-len sets the sequence length of the attention FLOPs (default: the model's max_seq_len)."""
    from moelab.models import model_info, tiny

    for flags, seq_len in (([], None), (["--seq-len", "7"], 7)):
        result = runner.invoke(app, ["info", "tiny", "--json", *flags])
        assert result.exit_code == 0 and json.loads(result.output) == json.loads(json.dumps(model_info(tiny(), seq_len=seq_len))), flags
    assert json.loads(result.output)["seq_len"] == 7


def test_bench_compress_refuses_a_size_that_is_not_a_positive_number_of_gb(tmp_path):
    """--size-gb inf stopped with an OverflowError's traceback once --work was claimed; 0 and nan
    were refused as "size_gb, tokens, seq_len and shard_mb must be positive", options it does not have."""
    for size_gb in ("inf", "0", "-1", "nan"):
        result = runner.invoke(app, ["bench", "compress", "--size-gb", size_gb, "--work", str(tmp_path / "w")])
        assert isinstance(result.exception, ValueError), (size_gb, result.exception)
        assert str(result.exception).startswith("--size-gb must be a positive number of GB, got "), result.exception
        assert not (tmp_path / "w").exists()
    # finite but more than the disk holds: 1e300 was an OverflowError's traceback, 1e6 minutes of planning
    for size_gb in ("1e300", "1e6"):
        result = runner.invoke(app, ["bench", "compress", "--size-gb", size_gb, "--work", str(tmp_path / "w")])
        assert isinstance(result.exception, ValueError), (size_gb, result.exception)
        assert f"--size-gb {float(size_gb):g} needs about" in str(result.exception) and "GB are free there" in str(result.exception)
        assert not (tmp_path / "w").exists()


def test_bench_compress_with_overwrite_counts_the_kept_checkpoints_it_replaces_as_free(tmp_path, monkeypatch):
    """A --work whose earlier run kept its checkpoints (--keep) run again with --overwrite: they are
    replaced, so a disk that holds one run's but not two's is enough (their bytes counted as used,
    the rerun was refused); without --overwrite they stay, and count."""
    import shutil

    from moelab.bench import compress as bench

    work = tmp_path / "w"
    (work / "source").mkdir(parents=True)
    (work / "source" / "model.safetensors").write_bytes(bytes(3000))
    disk = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk._replace(free=1000))
    bench.check_disk_space(work, 1.5e-6, overwrite=True)  # 3000 bytes: 1000 free and 3000 replaced
    with pytest.raises(ValueError, match="needs about 3e-06 GB under"):
        bench.check_disk_space(work, 1.5e-6)


@pytest.mark.parametrize("verb", ["trace", "analyze", "eval"])
def test_split_beside_data_of_ones_own_is_refused(tmp_path, verb):
    """--split picks a split of the shipped corpus; with --data FILE it was ignored without a word.
    Left at its default it stays quiet: the file is read whole."""
    data = tmp_path / "notes.txt"
    data.write_text("some text of my own\n")
    out = ["--json", str(tmp_path / "out")] if verb == "eval" else ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, [verb, "--data", str(data), "--split", "validation", *out])
    assert isinstance(result.exception, ValueError), result.output
    assert str(result.exception) == f"--split picks a split of the shipped corpus, and --data {data} is read whole; leave --split out"
    assert not (tmp_path / "out").exists()
