"""moelab.compress end to end: calibration mixtures, the resumable calibration pass, compress
with every method on moelab models and every transformers family, its report and its errors.
The statistics and methods themselves are checked against naive references in
tests/test_compress_reference.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_tiny import COMPRESS_SLOW, TINY, build
from layer_views import make_view
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from moelab.compress import METHODS, Calibration, CalibrationOptions, build_mixture, calibrate, compress
from moelab.compress.calibration import calibration_mixture, run_calibration
from moelab.compress.mixture import parse_sources
from moelab.compress.router_fit import RouterFit
from moelab.compress.run import REPORT_NAME, STATS_DIR, check_compression
from moelab.compress.stats import fingerprint, layer_file
from moelab.data.tokenizer import TOKENIZER_DIR
from moelab.hf import open_checkpoint
from moelab.hf.adapters import FAMILIES
from moelab.models import ModelConfig, MoETransformer, load_pretrained, save_pretrained
from moelab.nn import MoEConfig
from moelab.threads import intra_op_threads

SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL = CalibrationOptions(tokens=512, seq_len=32, batch_size=4, sample_tokens=64)
EVERY = dataclasses.replace(SMALL, observers=SMALL.observers + ("neurons",))  # with the backward sweep
# tiny models: a second intra-op thread only adds synchronisation (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def moelab_model(
    path: Path,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    hidden_dim: int = 32,
    seed: int = 0,
    tie_embeddings: bool = False,
    n_layers: int = 2,
    **moe,
) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=8192, dim=32, n_layers=n_layers, n_heads=4, max_seq_len=64, tie_embeddings=tie_embeddings,
        moe=MoEConfig(dim=32, num_experts=num_experts, hidden_dim=hidden_dim, top_k=top_k, **moe),
    )  # fmt: skip
    return save_pretrained(MoETransformer(cfg), path)


def hf_model(path: Path, family: str) -> Path:
    """A tiny transformers checkpoint of `family` that reads the shipped corpus (its tokenizer)."""
    build(family, vocab_size=8192).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return moelab_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def stats_dir(model_dir, tmp_path_factory) -> Path:
    # on one thread, as the tests that compare their statistics with these run (one_thread): MKL's
    # sums on Intel CPUs depend on the thread count (a module fixture is set up before one_thread)
    with intra_op_threads(1):
        return calibrate(model_dir, tmp_path_factory.mktemp("stats") / "s", options=EVERY, quiet=True).directory


# ----------------------------------------------------------------------------- mixtures


def test_mixture_specs_parse_into_weighted_sources():
    assert parse_sources("corpus") == [("corpus", None, 1.0)]
    assert parse_sources("corpus:code,german") == [("corpus", {"code": 1.0, "german": 1.0}, 1.0)]
    assert parse_sources(["corpus:code=3,german=1", "notes.txt=0.5"]) == [
        ("corpus", {"code": 3.0, "german": 1.0}, 1.0),
        ("notes.txt", None, 0.5),
    ]
    for bad, message in [
        ("corpus:code=abc", "weight 'abc' is not a number"),
        ("corpus:code=-1", "weights must be positive"),
        ("corpus:,german", "empty domain name"),
        ("corpus:code,code", "names domain 'code' twice"),
        ([], "no calibration data given"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_sources(bad)


def test_mixture_splits_the_budget_by_weight_and_alternates_halves():
    mixture = build_mixture("corpus:code=3,german=1", tokens=400, seq_len=50)
    assert mixture.source_names == ["code", "german"]
    assert [s.weight for s in mixture.sources] == [0.75, 0.25]
    per_source = [sum(w.ids.numel() for w in mixture.windows if w.source == s) for s in (0, 1)]
    assert per_source == [300, 100]
    assert [w.half for w in mixture.windows if w.source == 0] == [0, 1, 0, 1, 0, 1]
    assert [w.start for w in mixture.windows] == list(range(0, 400, 50))
    other = build_mixture("corpus:code=3,german=1", tokens=401, seq_len=50)
    assert (
        other.digest != mixture.digest
        and build_mixture("corpus:code=3,german=1", tokens=400, seq_len=50).digest == mixture.digest
    )
    with pytest.raises(ValueError, match="unknown domain 'klingon'"):
        build_mixture("corpus:klingon", tokens=10, seq_len=5)


def test_a_text_file_is_one_source(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world " * 200)
    mixture = build_mixture([str(path), "corpus:code"], tokens=200, seq_len=20)
    assert mixture.source_names == ["notes", "code"] and mixture.num_tokens == 200


# ----------------------------------------------------------------------------- calibration


def test_calibration_records_every_moe_layer(stats_dir, model_dir):
    stats = Calibration(stats_dir)
    assert stats.layers == [0, 1] and stats.info["complete"]
    assert stats.info["mixture"]["tokens"] == 512 and len(stats.sources) == 8
    layer = stats.layer(1)
    assert layer.counts.shape == (2, 8, 8) and float(layer.counts.sum()) == 512 * 2  # top-2
    assert layer.inputs.shape == (64, 32) and layer.reap_sums is not None
    assert not (stats_dir / "resume.safetensors").exists()
    assert stats.info["tokens_per_second"] == pytest.approx(512 / stats.info["seconds"], rel=0.01)


def test_sampled_inputs_are_spread_evenly_over_the_calibration_data(stats_dir, model_dir):
    """The 64 sampled MoE inputs sit at the global positions floor(i * 512 / 64) of the 512
    calibration tokens (positions run on across windows): each is a real input, from the source
    of the window holding that position."""
    mixture = calibration_mixture(model_dir, "corpus", EVERY)
    source_at = torch.cat([torch.full((w.ids.numel(),), w.source) for w in mixture.windows])
    layer = Calibration(stats_dir).layer(0)
    assert layer.input_sources.tolist() == source_at[torch.arange(64) * 512 // 64].tolist()
    assert bool((layer.inputs.abs().sum(1) > 0).all())


def test_statistics_count_every_token_in_its_windows_half_and_source(stats_dir, model_dir):
    """tokens [H, S] are the mixture's windows' tokens by half and source, and each token's top-2
    choices are counted in its cell: counts summed over experts = 2 x tokens, cell by cell."""
    mixture = calibration_mixture(model_dir, "corpus", EVERY)
    expected = torch.zeros(2, len(mixture.sources), dtype=torch.float64)
    for w in mixture.windows:
        expected[w.half, w.source] += w.ids.numel()
    assert (expected[0] > 0).any() and (expected[1] > 0).any()
    for index in (0, 1):
        layer = Calibration(stats_dir).layer(index)
        assert torch.equal(layer.tokens, expected)
        assert torch.equal(layer.counts.sum(-1), 2 * expected)


def test_an_interrupted_calibration_resumes_to_the_same_files(tmp_path, model_dir, stats_dir, monkeypatch):
    """Kill the pass after layer 0 (its hidden states saved), start it again: same statistics."""
    import moelab.compress.calibration as calibrate_module

    options = dataclasses.replace(EVERY, snapshot_seconds=0.0)
    real = calibrate_module.write_layer
    calls = []

    def dies_after_first_layer(directory, stats):
        real(directory, stats)
        calls.append(stats.layer)
        if stats.layer == 1 and len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_module, "write_layer", dies_after_first_layer)
    directory = calibrated_until_interrupted(tmp_path, model_dir, options)
    info = json.loads((directory / "calibration.json").read_text())
    assert info["done"] == 0 and not info["complete"] and (directory / "resume.safetensors").is_file()
    (directory / "calibration.json").write_text(json.dumps(info | {"seconds": 1000.0}))  # time spent so far
    monkeypatch.setattr(calibrate_module, "write_layer", real)
    resumed = run_calibration(model_dir, directory, "corpus", options, quiet=True)
    assert_same_statistics(directory, stats_dir)
    assert resumed["seconds"] > 1000, "the time spent before the interruption counts"
    assert info["coverage"].keys() == {"0"} and resumed["coverage"].keys() == {"0", "1"}
    assert not (directory / "resume.safetensors").exists()


def test_an_interrupted_calibration_resumes_on_the_thread_count_it_ran_on(tmp_path, model_dir, monkeypatch, capsys):
    """Killed after layer 0 on 2 intra-op threads and resumed where torch has 1 (the CLI's "auto" on
    a busier machine): the remaining layers run on 2, as the uninterrupted run's did (a matmul's
    sums depend on the count), a line says so, and torch's count is put back after."""
    import moelab.compress.calibration as calibrate_module

    options = dataclasses.replace(EVERY, snapshot_seconds=0.0)
    real_write, real_layer = calibrate_module.write_layer, calibrate_module._calibrate_layer

    def dies_in_layer_1(directory, stats):
        if stats.layer == 1:
            raise KeyboardInterrupt
        real_write(directory, stats)

    monkeypatch.setattr(calibrate_module, "write_layer", dies_in_layer_1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        directory = calibrated_until_interrupted(tmp_path, model_dir, options)
        assert json.loads((directory / "calibration.json").read_text())["threads"] == 2
        counts = []
        monkeypatch.setattr(calibrate_module, "write_layer", real_write)
        monkeypatch.setattr(calibrate_module, "_calibrate_layer", lambda *a, **k: counts.append(torch.get_num_threads()) or real_layer(*a, **k))
        torch.set_num_threads(1)
        run_calibration(model_dir, directory, "corpus", options)
        assert counts == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "resuming on 2 intra-op threads, as the run ran (not 1): its statistics then match" in capsys.readouterr().err


def test_a_calibration_an_older_moelab_left_unfinished_starts_again(tmp_path, model_dir, stats_dir, monkeypatch):
    """Killed after layer 0 under a moelab that kept the logit Gram of all the data ([E, E], no
    stats_version in calibration.json): resumed, the run starts again, so no layer keeps the old
    layout (which a restriction to some domains cannot use)."""
    import moelab.compress.calibration as calibrate_module

    options = dataclasses.replace(EVERY, snapshot_seconds=0.0)
    real = calibrate_module.write_layer

    def dies_in_layer_1(directory, stats):
        if stats.layer == 1:
            raise KeyboardInterrupt
        real(directory, stats)

    monkeypatch.setattr(calibrate_module, "write_layer", dies_in_layer_1)
    directory = calibrated_until_interrupted(tmp_path, model_dir, options)
    info = json.loads((directory / "calibration.json").read_text())
    assert info.pop("stats_version") == 2 and info["done"] == 0
    (directory / "calibration.json").write_text(json.dumps(info))
    layer = load_file(layer_file(directory, 0))
    save_file(layer | {"logit_gram": layer["logit_gram"].sum((0, 1))}, layer_file(directory, 0))
    monkeypatch.setattr(calibrate_module, "write_layer", real)
    run_calibration(model_dir, directory, "corpus", options, quiet=True)
    assert_same_statistics(directory, stats_dir)


def test_m_smoe_on_some_domains_refuses_statistics_with_the_whole_data_gram(tmp_path, model_dir, stats_dir):
    """Statistics of an older moelab (the logit Gram of all the data, [E, E]) still compress whole
    with M-SMoE; restricted to some domains they are refused, naming the fix."""
    old = tmp_path / "old"
    shutil.copytree(stats_dir, old)
    for index in Calibration(old).layers:
        layer = load_file(layer_file(old, index))
        save_file(layer | {"logit_gram": layer["logit_gram"].sum((0, 1))}, layer_file(old, index))
    domain = Calibration(old).sources[:1]
    with pytest.raises(ValueError, match="all the calibration data only.*calibrate again"):
        compress(model_dir, tmp_path / "part", method="m_smoe", stats=old, domains=domain, quiet=True)
    whole = compress(model_dir, tmp_path / "whole", method="m_smoe", stats=old, quiet=True)
    again = compress(model_dir, tmp_path / "again", method="m_smoe", stats=stats_dir, quiet=True)
    assert whole["layers"] == again["layers"]


@pytest.mark.parametrize("sweep", ["forward", "backward"])
def test_a_calibration_killed_between_its_snapshot_and_its_record_starts_that_pass_again(
    tmp_path, monkeypatch, sweep
):
    """Killed after a snapshot was saved and before calibration.json recorded it (4 layers, a
    snapshot after every layer): the snapshot holds a later step than the record names. Resumed,
    the run starts that pass again (the forward pass from layer 0, the backward sweep from the top)
    and every layer's statistics are the uninterrupted run's; resuming from the snapshot ran layers
    again on states that had passed them (or the next layer on the wrong gradients)."""
    import moelab.compress.calibration as calibrate_module
    import moelab.compress.gradients as gradients_module

    model = moelab_model(tmp_path / "m", n_layers=4)
    options = dataclasses.replace(EVERY, snapshot_seconds=0.0)
    expected = calibrate(model, tmp_path / "whole", options=options, quiet=True).directory
    module, key = (calibrate_module, "done") if sweep == "forward" else (gradients_module, "backward_next")
    real = module.write_info

    def dies_before_recording_step_1(directory, info):
        if info.get(key) == 1 and (sweep == "backward" or not info.get("backward_next")):
            raise KeyboardInterrupt
        real(directory, info)

    monkeypatch.setattr(module, "write_info", dies_before_recording_step_1)
    directory = calibrated_until_interrupted(tmp_path, model, options)
    recorded = json.loads((directory / "calibration.json").read_text())
    assert recorded.get(key) == 2 if sweep == "backward" else recorded["done"] == 0
    assert gradients_module.snapshot_step(directory / "resume.safetensors", key) == 1  # ahead of the record
    monkeypatch.setattr(module, "write_info", real)
    run_calibration(model, directory, "corpus", options, quiet=True)
    names = sorted(p.name for p in expected.glob("layer-*.safetensors"))
    assert len(names) == 4 and names == sorted(p.name for p in directory.glob("layer-*.safetensors"))
    assert_same_statistics(directory, expected, tuple(names))


def calibrated_until_interrupted(tmp_path: Path, model_dir: Path, options: CalibrationOptions) -> Path:
    """tmp_path/partial, holding what a calibration left when it was interrupted."""
    directory = tmp_path / "partial"
    directory.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_calibration(model_dir, directory, "corpus", options, quiet=True)
    return directory


def assert_same_statistics(
    directory: Path, expected: Path, names: tuple[str, ...] = ("layer-00000.safetensors", "layer-00001.safetensors")
) -> None:
    for name in names:
        a, b = load_file(directory / name), load_file(expected / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("snapshot_seconds", [0.0, 1e9])
def test_a_calibration_interrupted_in_its_backward_sweep_resumes_there(
    tmp_path, model_dir, stats_dir, monkeypatch, snapshot_seconds
):
    """Killed after the backward sweep's first layer, with its gradients saved or not: the
    forward pass is not run again and the statistics are the uninterrupted run's."""
    import moelab.compress.calibration as calibrate_module
    import moelab.compress.gradients as gradients_module

    options = dataclasses.replace(EVERY, snapshot_seconds=snapshot_seconds)
    real = gradients_module._add_to_layer

    def dies_after_top_layer(directory, index, *args):
        real(directory, index, *args)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(gradients_module, "_add_to_layer", dies_after_top_layer)
    directory = calibrated_until_interrupted(tmp_path, model_dir, options)
    monkeypatch.setattr(gradients_module, "_add_to_layer", real)
    monkeypatch.setattr(calibrate_module, "_calibrate_layer", lambda *a: pytest.fail("forward pass again"))
    run_calibration(model_dir, directory, "corpus", options, quiet=True)
    assert_same_statistics(directory, stats_dir)


def test_a_calibration_killed_after_removing_its_tapes_completes(tmp_path, model_dir, stats_dir, monkeypatch):
    """Killed after the backward sweep removed its tapes and before calibration.json recorded the
    run complete: resumed, it finishes with the uninterrupted statistics. Before, the record still
    named the sweep unfinished and the resumed sweep failed on a tape it had removed."""
    import moelab.compress.calibration as calibrate_module

    real = calibrate_module.clear_staging

    def dies_before_recording_complete(directory, only=None):
        if only is not None and "resume.safetensors" in only:  # the tapes are gone by now
            raise KeyboardInterrupt
        real(directory, only)

    monkeypatch.setattr(calibrate_module, "clear_staging", dies_before_recording_complete)
    directory = calibrated_until_interrupted(tmp_path, model_dir, EVERY)
    assert not list(directory.glob("tape-*")) and not json.loads((directory / "calibration.json").read_text())["complete"]
    monkeypatch.setattr(calibrate_module, "clear_staging", real)
    run_calibration(model_dir, directory, "corpus", EVERY, quiet=True)
    assert json.loads((directory / "calibration.json").read_text())["complete"]
    assert_same_statistics(directory, stats_dir)


def test_a_killed_calibrate_command_is_taken_over(tmp_path, model_dir):
    """kill -9 in the middle of `calibrate`, run it again into the same --out: it finishes."""
    code = (
        "import os, sys\n"
        "import moelab.compress.calibration as c\n"
        "real = c.write_layer\n"
        "def die(d, s):\n"
        "    real(d, s)\n"
        "    os.kill(os.getpid(), 9)\n"
        "c.write_layer = die\n"
        "c.calibrate(sys.argv[1], sys.argv[2], options=c.CalibrationOptions(tokens=256, seq_len=32), quiet=True)\n"
    )
    out = tmp_path / "stats"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(out)], env={**os.environ, "PYTHONPATH": SRC}
    )
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    calibrate(model_dir, out, options=CalibrationOptions(tokens=256, seq_len=32), quiet=True)
    assert Calibration(out).info["complete"] and not any(
        p.name.startswith(".stats") for p in tmp_path.iterdir()
    )


def test_statistics_of_another_model_are_refused(tmp_path, stats_dir):
    other = moelab_model(tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="were made on .* not on .*fingerprints differ"):
        compress(other, tmp_path / "out", stats=stats_dir, quiet=True)


def test_statistics_of_a_router_only_fine_tune_are_refused(tmp_path, model_dir, stats_dir):
    """The fingerprint reads the routers whole: a copy whose routers alone moved is another model
    (the samples are made too small here to cover the router by chance)."""
    tuned = Path(shutil.copytree(model_dir, tmp_path / "tuned"))
    tensors = load_file(tuned / "model.safetensors")
    tensors["layers.1.ffn.router.weight"][3, 5] += 1e-3
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        save_file(tensors, tuned / "model.safetensors", metadata=f.metadata())  # the same header
    assert fingerprint(tuned, samples=1, sample_bytes=16) != fingerprint(model_dir, samples=1, sample_bytes=16)
    with pytest.raises(ValueError, match="fingerprints differ"):
        compress(tuned, tmp_path / "out", stats=stats_dir, quiet=True)


# ----------------------------------------------------------------------------- compress


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_compresses_a_moelab_model(tmp_path, model_dir, stats_dir, method):
    domains = ["code"] if method == "premoe" else None
    report = compress(
        model_dir, tmp_path / "out", method=method, ratio=0.25, stats=stats_dir, domains=domains, quiet=True
    )
    model = load_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved == report and report["complete"] and report["method"] == method
    assert report["parameters"]["after"]["total"] < report["parameters"]["before"]["total"]
    narrowed = method == "moelab" and report["layers"]["0"]["notes"]["strategy"] == "neurons"
    if METHODS[method].narrows or narrowed:  # every expert stays, 3/4 of the width
        assert (model.config.moe.num_experts, model.config.moe.hidden_dim) == (8, 24)
        return
    assert model.config.moe.num_experts == 6
    for layer in ("0", "1"):
        entry = report["layers"][layer]
        groups = entry["merge_groups"]
        assert len(entry["kept"]) + len(groups) == 6
        assert sorted(entry["kept"] + entry["dropped"] + [e for g in groups for e in g]) == list(range(8))
        if method != "moelab":  # the recipe prunes and folds some dropped experts into kept ones
            assert bool(groups) == METHODS[method].merges and (not groups or not entry["dropped"])
        if entry["scores"] is not None:  # the kept experts are the best scored
            worst_kept = min(entry["scores"][e] for e in entry["kept"])
            assert all(entry["scores"][e] <= worst_kept for e in entry["dropped"])
    expert_map = json.loads((tmp_path / "out" / "moelab_expert_map.json").read_text())
    assert expert_map["layers"]["0"]["kept"] == report["layers"]["0"]["kept"]
    assert expert_map["layers"]["0"]["merge_groups"] == [
        sorted(g) for g in report["layers"]["0"]["merge_groups"]
    ]


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f in COMPRESS_SLOW else f for f in sorted(TINY)]
)
def test_every_transformers_family_compresses_and_loads(tmp_path, family):
    """REAP on a tiny checkpoint of each family; the writer's postconditions load it strictly in
    transformers and compare every edited layer with the masked original."""
    source = hf_model(tmp_path / "src", family)
    if FAMILIES[family].expert_count_shared_with is not None:  # the count sizes other experts too (JetMoE's)
        with pytest.raises(ValueError, match=f"reap removes or merges experts, but {family}'s .* also sizes"):
            compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
        report = compress(source, tmp_path / "out", method="heapr", ratio=0.5, calib_options=SMALL, quiet=True)
        after = open_checkpoint(tmp_path / "out").layer(1).experts.hidden_dim
        assert after == open_checkpoint(source).layer(1).experts.hidden_dim // 2
        return
    report = compress(source, tmp_path / "out", method="reap", ratio=0.5, calib_options=SMALL, quiet=True)
    view = open_checkpoint(tmp_path / "out")
    before = open_checkpoint(source)
    for index, entry in report["layers"].items():
        assert view.layer(int(index)).router.num_experts == before.layer(int(index)).router.num_experts // 2
    assert (tmp_path / "out" / STATS_DIR / "calibration.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_moelab_recipe_on_deepseek_needs_no_backward_sweep(tmp_path):
    """DeepSeek's shared experts take their width from the routed experts' key, so the recipe
    removes experts and must not ask for the neuron statistics only narrowing reads."""
    source = hf_model(tmp_path / "src", "deepseek_v3")
    report = compress(source, tmp_path / "out", method="moelab", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["options"]["strategy"] == "experts"
    assert "neurons" not in report["calibration"]["settings"]["observers"]


def test_jamba_s_experts_keep_their_width_because_its_dense_layers_share_it(tmp_path, monkeypatch):
    """Jamba's dense layers' MLPs take their width from intermediate_size, the experts' key: a
    method that narrows experts is refused by name before calibrating, HEAPr's `auto` layout
    becomes the padded one (full width), and the recipe removes whole experts."""
    import moelab.compress.run as run_module

    source = hf_model(tmp_path / "src", "jamba")
    monkeypatch.setattr(run_module, "run_calibration", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(ValueError, match="heapr with these options makes the routed experts narrower, but jamba's "
                                         "dense layers' MLPs take their width from the same config key"):  # fmt: skip
        compress(source, tmp_path / "o", method="heapr", method_options={"layout": "uniform"}, quiet=True)
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    report = compress(source, tmp_path / "out", method="moelab", ratio=0.5, calib_options=SMALL, quiet=True)
    assert report["options"]["strategy"] == "experts"


def test_heapr_removes_the_ratio_of_neurons_not_whole_experts_worth(tmp_path, model_dir, stats_dir):
    """The paper's budget: 20 % of 8 experts of 32 neurons is 6.4 experts' worth, every expert 26
    neurons wide (round(32 x 0.8)); rounding to whole experts kept 28 (12.5 % removed)."""
    report = compress(model_dir, tmp_path / "out", method="heapr", ratio=0.2, stats=stats_dir, quiet=True)
    assert {e["notes"]["width"] for e in report["layers"].values()} == {26}
    assert load_pretrained(tmp_path / "out").config.moe.hidden_dim == 26
    with pytest.raises(ValueError, match="keeps all of them; raise the ratio to at least 0.0312"):
        compress(model_dir, tmp_path / "none", method="heapr", ratio=0.01, stats=stats_dir, quiet=True)
    for ratio, message in ((0.01, "keeps all of them"), (0.99, "keeps none")):  # refused before calibrating
        with pytest.raises(ValueError, match=f"^layer 0: keeping .* neurons {message}"):
            check_compression(model_dir, "heapr", ratio)


def test_compress_takes_over_a_killed_run(tmp_path, model_dir, monkeypatch):
    """Killed after deciding layer 0: the rerun keeps that decision and the statistics."""
    import moelab.compress.run as run_module

    real = run_module.write_edited
    monkeypatch.setattr(
        run_module, "write_edited", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        compress(model_dir, tmp_path / "out", method="naee", calib_options=SMALL, quiet=True)
    staging = [p for p in tmp_path.iterdir() if ".moelab-staging-" in p.name]
    assert len(staging) == 1 and (staging[0] / REPORT_NAME).is_file() and not (tmp_path / "out").exists()
    calls = []
    monkeypatch.setattr(run_module, "write_edited", real)
    monkeypatch.setattr(run_module, "run_calibration", lambda *a, **k: calls.append("calibrated"))
    monkeypatch.setattr(METHODS["naee"], "decide", lambda *a: calls.append("decided"))
    report = compress(model_dir, tmp_path / "out", method="naee", calib_options=SMALL, quiet=True)
    assert calls == ["calibrated"]  # the call resumes (finds everything done); no layer is decided again
    assert report["complete"] and load_pretrained(tmp_path / "out").config.moe.num_experts == 6
    assert report["reload_checked"]  # a tiny model: the whole-model reload ran


def test_a_killed_run_of_a_method_that_rewrites_experts_resumes_to_the_same_model(
    tmp_path, model_dir, stats_dir, monkeypatch
):
    """HEAPr keeps every expert and narrows them: a decision kept from a killed run cannot be
    written as a subset of the old experts (that would publish the uncompressed widths); the rerun
    writes what an uninterrupted run writes."""
    import moelab.compress.run as run_module

    real = run_module.write_edited
    kwargs = dict(method="heapr", ratio=0.2, stats=stats_dir, reload=False, quiet=True)
    assert compress(model_dir, tmp_path / "whole", **kwargs)["reload_checked"] is False
    with monkeypatch.context() as m:
        m.setattr(run_module, "write_edited", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            compress(model_dir, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and run_module.write_edited is real
    compress(model_dir, tmp_path / "out", **kwargs)
    assert load_pretrained(tmp_path / "out").config.moe.hidden_dim == 26
    shards = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    for name in shards:
        whole, resumed = (load_file(tmp_path / run / name) for run in ("whole", "out"))
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("change", [dict(ratio=0.5), dict(domains=["code"])])
def test_a_killed_run_of_another_job_is_not_taken_as_decided(tmp_path, model_dir, stats_dir, monkeypatch, change):
    """Killed after deciding every layer at 25 % by frequency: a rerun into the same output with
    another ratio or other calibration sources decides again (it must not publish the old
    decisions)."""
    import moelab.compress.run as run_module

    kwargs = dict(method="frequency", ratio=0.25, stats=stats_dir, reload=False, quiet=True)
    with monkeypatch.context() as m:
        m.setattr(run_module, "write_edited", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            compress(model_dir, tmp_path / "out", **kwargs)
    report = compress(model_dir, tmp_path / "out", **(kwargs | change))
    fresh = compress(model_dir, tmp_path / "fresh", **(kwargs | change))
    assert {i: e["kept"] for i, e in report["layers"].items()} == {i: e["kept"] for i, e in fresh["layers"].items()}
    assert report["method"] == fresh["method"] and report["ratio"] == fresh["ratio"]
    kept = 4 if change.get("ratio") == 0.5 else 6
    assert load_pretrained(tmp_path / "out").config.moe.num_experts == kept


def test_a_finished_output_is_replaced_only_with_overwrite_and_never_inside_the_statistics(
    tmp_path, model_dir, stats_dir
):
    kwargs = dict(method="frequency", stats=stats_dir, reload=False, quiet=True)
    compress(model_dir, tmp_path / "out", ratio=0.25, **kwargs)
    written = (tmp_path / "out" / REPORT_NAME).read_text()
    with pytest.raises(ValueError, match="already holds moelab's .*pass --overwrite"):
        compress(model_dir, tmp_path / "out", ratio=0.5, **kwargs)
    assert (tmp_path / "out" / REPORT_NAME).read_text() == written
    assert compress(model_dir, tmp_path / "out", ratio=0.5, overwrite=True, **kwargs)["ratio"] == 0.5
    with pytest.raises(ValueError, match="lies inside the input"):
        compress(model_dir, stats_dir / "pruned", ratio=0.25, **kwargs)
    assert not (stats_dir / "pruned").exists()


def test_a_refused_compress_keeps_its_calibration_and_a_new_job_starts_clean(
    tmp_path, model_dir, stats_dir
):
    """Refused after calibrating (a global budget no format can store): the staging stays and
    the next run reuses its calibration; what a killed write left there is not published, nor,
    under --stats, the staging's own calibration."""
    out = tmp_path / "out"
    kwargs = dict(method="frequency", ratio=0.5, calib_options=SMALL, quiet=True)
    with pytest.raises(ValueError, match="keeps different numbers of experts per layer"):
        compress(model_dir, out, budget="global", **kwargs)
    (staging,) = [p for p in tmp_path.iterdir() if ".moelab-staging-" in p.name]
    calibrated = (staging / STATS_DIR / "calibration.json").read_text()
    (staging / "model-00002-of-00002.safetensors").write_bytes(b"a killed write's shard")
    with pytest.raises(ValueError, match="holds no calibration statistics"):
        compress(model_dir, out, stats=tmp_path / "typo", **kwargs)  # refused: the kept calibration stays
    compress(model_dir, out, **kwargs)
    assert (out / STATS_DIR / "calibration.json").read_text() == calibrated  # not calibrated again
    assert not (out / "model-00002-of-00002.safetensors").exists()
    with pytest.raises(ValueError, match="keeps different numbers of experts per layer"):
        compress(model_dir, tmp_path / "again", budget="global", **kwargs)
    report = compress(model_dir, tmp_path / "again", stats=stats_dir, **kwargs)
    assert report["complete"] and not (tmp_path / "again" / STATS_DIR).exists()


def test_unknown_domains_are_refused_before_calibrating(tmp_path, model_dir, monkeypatch):
    import moelab.compress.run as run_module

    monkeypatch.setattr(run_module, "run_calibration", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(ValueError, match="--domain \\['klingon'\\] are not among the calibration sources"):
        compress(model_dir, tmp_path / "out", domains=["klingon"], calib_options=SMALL, quiet=True)
    with pytest.raises(ValueError, match="domains is a list of calibration sources, got the str 'code'"):
        compress(model_dir, tmp_path / "out", domains="code", calib_options=SMALL, quiet=True)
    assert not list(tmp_path.iterdir())


def test_methods_that_rerun_layers_on_sampled_inputs_need_sampled_inputs(tmp_path, model_dir, monkeypatch):
    """NAEE re-runs each layer on sampled MoE inputs: asked to calibrate without any
    (sample_tokens=0) it is refused before calibrating, as is the router re-calibration with fewer
    than the 4 it needs (asked for, or the recipe's own); given statistics made without any, NAEE is refused naming the missing
    'inputs', not later inside the method."""
    import moelab.compress.run as run_module

    no_inputs = dataclasses.replace(SMALL, sample_tokens=0)
    stats = calibrate(model_dir, tmp_path / "stats", options=no_inputs, quiet=True).directory
    monkeypatch.setattr(run_module, "run_calibration", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(ValueError, match="'naee' .* calibrate with sample_tokens > 0"):
        compress(model_dir, tmp_path / "out", method="naee", calib_options=no_inputs, quiet=True)
    for sample_tokens in (0, 3):  # the router fit holds out one in 4 sampled inputs: it needs at least 4
        few = dataclasses.replace(SMALL, sample_tokens=sample_tokens)
        with pytest.raises(ValueError, match=f"router re-calibration .*sample_tokens >= 4, got {sample_tokens}"):
            compress(model_dir, tmp_path / "out", router_fit=RouterFit(steps=5), calib_options=few, quiet=True)
    few = dataclasses.replace(SMALL, sample_tokens=3)  # moelab's recipe fits its routers itself (fit_steps)
    with pytest.raises(ValueError, match=r"the router re-calibration of 'moelab' \(its fit_steps option\) .*>= 4, got 3"):
        compress(model_dir, tmp_path / "out", method="moelab", calib_options=few, quiet=True)
    options = {"method": "moelab", "calib_options": few, "quiet": True, "method_options": {"fit_steps": 0}}
    with pytest.raises(pytest.fail.Exception, match="calibrated"):  # without its fit: calibrates as asked
        compress(model_dir, tmp_path / "out", **options)
    with pytest.raises(ValueError, match=r"'naee' .* needs the \['inputs'\] statistics"):
        compress(model_dir, tmp_path / "out", method="naee", stats=stats, quiet=True)
    assert compress(model_dir, tmp_path / "reap", stats=stats, quiet=True)["complete"]  # REAP needs none


def test_what_a_method_cannot_do_is_refused_before_calibrating(tmp_path, model_dir, monkeypatch):
    """HEAPr's uniform layout (its `auto` on this family) and the recipe's neuron path narrow every
    expert alike, so they cannot protect super experts: asked to, they are refused before
    calibrating (they used to calibrate first and fail only where a layer had a super expert), as
    is a recipe neuron path whose uniform width keeps every neuron (3 neurons, 7 of 8 experts'
    worth: round(2.625) = 3). The padded layout and the recipe's `auto` protect, and calibrate."""
    import moelab.compress.run as run_module

    monkeypatch.setattr(run_module, "run_calibration", lambda *a, **k: pytest.fail("calibrated"))
    protecting = {"protect_super_experts": True, "calib_options": SMALL, "quiet": True}
    padded = "layout='padded' \\(--option layout=padded\\)"  # the command's words too, not only Python's
    refused = [("heapr", {}, padded), ("heapr", {"layout": "uniform"}, padded)]
    refused += [("moelab", {"strategy": "neurons"}, "strategy 'experts' or 'auto' \\(--option strategy=auto")]
    for method, options, fix in refused:
        with pytest.raises(ValueError, match=f"cannot spare protected \\(super\\) experts; use {fix}"):
            compress(model_dir, tmp_path / "out", method=method, method_options=options, **protecting)
    for method, options in [("heapr", {"layout": "padded"}), ("moelab", {}), ("moelab", {"strategy": "experts"})]:
        with pytest.raises(pytest.fail.Exception, match="calibrated"):
            compress(model_dir, tmp_path / "out", method=method, method_options=options, overwrite=True, **protecting)
    narrow = moelab_model(tmp_path / "narrow", hidden_dim=3)
    with pytest.raises(ValueError, match="layer 0: keeping 87.5% of each expert's 3 neurons keeps all of them"):
        compress(narrow, tmp_path / "out", method="moelab", ratio=0.125, method_options={"strategy": "neurons"})
    assert not (tmp_path / "out").exists()


def test_statistics_with_too_few_sampled_inputs_are_refused_before_deciding(tmp_path, model_dir, monkeypatch):
    """Given statistics with 3 sampled inputs, a router re-calibration (which holds out one in 4)
    is refused before any method decides, not after."""
    import moelab.compress.run as run_module

    stats = calibrate(model_dir, tmp_path / "stats", options=dataclasses.replace(SMALL, sample_tokens=3), quiet=True)
    monkeypatch.setattr(run_module, "_decide", lambda *a, **k: pytest.fail("decided"))
    with pytest.raises(ValueError, match="router re-calibration .*sample_tokens >= 4, got 3"):
        compress(model_dir, tmp_path / "out", stats=stats.directory, router_fit=RouterFit(steps=5), quiet=True)
    with pytest.raises(ValueError, match=r"the router re-calibration of 'moelab' \(its fit_steps option\) .*>= 4, got 3"):
        compress(model_dir, tmp_path / "out2", method="moelab", method_options={"strategy": "experts"},
                 stats=stats.directory, quiet=True)  # fmt: skip


def test_domains_restrict_the_statistics_and_the_sampled_inputs(tmp_path, model_dir, stats_dir, monkeypatch):
    """The sampled inputs know their source (from the mixture's windows, independently); a
    restriction keeps those sources' sums and inputs; NAEE, which re-runs the layer on the inputs,
    sees only the chosen domains'."""
    stats = Calibration(stats_dir)
    layer = stats.layer(0)
    mixture = calibration_mixture(model_dir, "corpus", EVERY)
    source_at = [w.source for w in mixture.windows for _ in range(len(w.ids))]
    N, total = layer.inputs.shape[0], len(source_at)
    assert layer.input_sources.tolist() == [source_at[i * total // N] for i in range(N)]
    chosen = [stats.sources[3], stats.sources[1]]
    part = layer.restricted(chosen)
    assert part.sources == tuple(chosen) and torch.equal(part.counts, layer.counts[:, [3, 1]])
    assert torch.equal(part.neuron_grad_sums, layer.neuron_grad_sums[:, [3, 1]])
    rows = [i for i, s in enumerate(layer.input_sources.tolist()) if s in (1, 3)]
    assert 0 < len(rows) < N and torch.equal(part.inputs, layer.inputs[rows])
    assert part.input_sources.tolist() == [{3: 0, 1: 1}[s] for s in layer.input_sources[rows].tolist()]
    seen, real = [], METHODS["naee"].decide

    def decide(self, view, layer_stats, target):
        seen.append(layer_stats.inputs)
        return real(self, view, layer_stats, target)

    monkeypatch.setattr(METHODS["naee"], "decide", decide)
    compress(model_dir, tmp_path / "out", method="naee", stats=stats_dir, domains=chosen, quiet=True)
    assert torch.equal(seen[0], part.inputs)


def test_super_experts_are_protected(tmp_path, model_dir):
    """Give one rarely chosen expert of layer 0 a huge output: plain frequency pruning drops it,
    with protection it stays (and the report says so)."""
    model = load_pretrained(model_dir)
    stats = calibrate(model_dir, tmp_path / "stats", options=SMALL, quiet=True)
    rare = int(stats.layer(0).total("counts").argmin())
    with torch.no_grad():
        model.layers[0].ffn.experts.down_proj[rare] *= 1000
    source = save_pretrained(model, tmp_path / "super")
    stats = calibrate(source, tmp_path / "stats2", options=SMALL, quiet=True)
    assert int(stats.layer(0).max_output.argmax()) == rare
    plain = compress(
        source, tmp_path / "plain", method="frequency", ratio=0.75, stats=stats.directory, quiet=True
    )
    kept = compress(
        source,
        tmp_path / "kept",
        method="frequency",
        ratio=0.75,
        stats=stats.directory,
        protect_super_experts=True,
        quiet=True,
    )
    assert rare in plain["layers"]["0"]["dropped"] and not plain["protected"]
    assert kept["protected"] == {"0": [rare]} and rare in kept["layers"]["0"]["kept"]


def test_global_budget_is_refused_when_layers_would_differ(tmp_path, stats_dir, model_dir):
    with pytest.raises(ValueError, match="keeps different numbers of experts per layer .* cannot be written"):
        compress(
            model_dir,
            tmp_path / "out",
            method="frequency",
            ratio=0.5,
            stats=stats_dir,
            budget="global",
            quiet=True,
        )
    with pytest.raises(ValueError, match="does not score experts"):
        compress(model_dir, tmp_path / "out", method="naee", stats=stats_dir, budget="global", quiet=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, r"must lie in \(0, 1\)"),
        ({"ratio": 0.05}, "removes none"),
        ({"ratio": 0.9}, "fewer than the 2 the router picks"),
        ({"method": "reapp"}, "unknown compression method 'reapp' \\(did you mean 'reap'\\?\\)"),
        ({"method": "naee", "method_options": {"beam": 3}}, "does not take these options"),
        ({"method": "random", "method_options": {"seed": "abc"}}, "random option seed='abc' must be int"),
        ({"method": "m_smoe", "method_options": {"align": "False"}}, "option align='False' must be bool"),
        ({"method": "sub_moe", "method_options": {"rank": 2.5}}, "option rank=2.5 must be int or null"),
        ({"budget": "per-model"}, "budget must be one of"),
        ({"domains": ["klingon"]}, "--domain \\['klingon'\\] are not among the calibration sources"),
    ],
)
def test_bad_requests_fail_before_anything_is_written(tmp_path, stats_dir, model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress(model_dir, tmp_path / "out", stats=stats_dir, quiet=True, **kwargs)
    assert not (tmp_path / "out").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".out")
    ]


def test_group_limited_routing_keeps_every_group_equal(tmp_path):
    source = hf_model(tmp_path / "src", "deepseek_v3")  # 8 experts in 2 groups
    with pytest.raises(
        ValueError, match=r"must be a multiple of 2; remove 2 or 4 experts \(ratio 0.25 or 0.5\)"
    ):
        compress(source, tmp_path / "bad", ratio=0.375, calib_options=SMALL, quiet=True)
    report = compress(source, tmp_path / "out", method="naee", ratio=0.5, calib_options=SMALL, quiet=True)
    kept = report["layers"]["1"]["kept"]
    assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept) == 2


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close_statistics(directory: Path, expected: Path) -> None:
    """The two calibrations' layer statistics agree up to the order of sums (several processes)."""
    for name in ("layer-00000.safetensors", "layer-00001.safetensors"):
        a, b = load_file(directory / name), load_file(expected / name)
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-9, msg=f"{name}: {key}")


def _calibrate_as_rank(rank: int, port: int, model: str, out: str, options: CalibrationOptions) -> None:
    """One process of a 2-process calibration; rank 0 clears the staging directory half a second
    late, so that rank 1 would write into it first unless it waits for the clearing."""
    import moelab.compress.calibration as calibration

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    clear = calibration.clear_staging
    calibration.clear_staging = lambda directory, **only: time.sleep(0.5) or clear(directory, **only)
    try:
        calibrate(model, out, options=options, quiet=True)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.mark.slow  # moved out of the default run, which must stay under 10 minutes (`make test-slow` runs it)
def test_data_parallel_calibration_equals_one_process(tmp_path, model_dir):
    """torchrun-style: 2 gloo processes split the batches and sum the statistics (the backward
    sweep's included). Rank 1 writes nothing before rank 0 has cleared the directory (rank 1's
    first tape was removed under it, a crash in one slow-suite run)."""
    from processes import spawn

    options = EVERY
    port = _free_port()
    spawn(_calibrate_as_rank, args=(port, str(model_dir), str(tmp_path / "dp"), options), nprocs=2)
    two = Calibration(tmp_path / "dp")
    one = calibrate(model_dir, tmp_path / "one", options=options, quiet=True)
    assert two.info["processes"] == 2 and two.info["mixture"] == one.info["mixture"]
    for index in one.layers:
        a, b = two.layer(index).tensors(), one.layer(index).tensors()
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-9, msg=name)
    assert not [p for p in (tmp_path / "dp").iterdir() if p.name.startswith(("resume", "tape"))]


def _calibrate_until_rank0_dies(
    rank: int, port: int, model: str, directory: str, options: CalibrationOptions, moment: str | None
) -> None:
    """One process of a 2-process `run_calibration` into `directory` that stops at `moment` as if
    killed: rank 1 writes (or removes) its file of that moment half a second late, rank 0 dies
    (exit 1) right after it records the moment in calibration.json. moment: "forward" (the
    forward pass done: rank 1's tape of the last layer's output), "backward" (the backward sweep's
    snapshot: rank 1's gradients), "complete" (rank 1's forward snapshot removed); None: no kill."""
    import moelab.compress.calibration as calibration
    import moelab.compress.gradients as gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    recorded = {  # calibration.json's content at the moment (model_dir has 2 layers)
        "forward": lambda info: info["done"] == 1 and "backward_next" not in info and not info["complete"],
        "backward": lambda info: "backward_next" in info,
        "complete": lambda info: info["complete"],
    }
    if moment is not None and rank == 0:
        for module in (calibration, gradients):
            write = module.write_info
            module.write_info = lambda d, info, write=write: write(d, info) or (
                recorded[moment](info) and os._exit(1)
            )
    elif moment == "complete":
        clear = calibration.clear_staging
        calibration.clear_staging = lambda directory, only=None: time.sleep(0.5) or clear(directory, only)
    elif moment is not None:
        late = "-00002.safetensors" if moment == "forward" else "resume-1-of-2.safetensors"
        save = gradients.save_safetensors
        gradients.save_safetensors = lambda tensors, path, **metadata: (
            Path(path).name.endswith(late) and time.sleep(0.5)
        ) or save(tensors, path, **metadata)
    try:
        run_calibration(model, Path(directory), "corpus", options, quiet=True)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.mark.slow  # 2 x 2 processes
@pytest.mark.parametrize("moment", ["forward", "backward", "complete"])
def test_a_data_parallel_calibration_killed_as_rank_0_records_resumes_to_the_same_files(
    tmp_path, model_dir, stats_dir, moment
):
    """Rank 0 records a step in calibration.json only once every process has written (or removed)
    its files of that step: killed right after, the run resumes to the uninterrupted statistics and
    leaves no snapshot or tape behind. Before, rank 0 recorded at once: the forward pass done
    without rank 1's last tape (its resumed backward sweep could not read it), the backward
    snapshot without rank 1's gradients (it read its forward snapshot as gradients), the run
    complete with rank 1's forward snapshot still there (published with the statistics)."""
    import torch.multiprocessing as mp
    from processes import spawn

    options = dataclasses.replace(EVERY, snapshot_seconds=0.0)
    directory = tmp_path / "partial"
    directory.mkdir()
    for kill in (moment, None):
        port = _free_port()
        args = (port, str(model_dir), str(directory), options, kill)
        if kill is None:
            spawn(_calibrate_until_rank0_dies, args=args, nprocs=2)
        else:
            with pytest.raises(mp.ProcessExitedException, match="process 0 terminated with exit code 1"):
                spawn(_calibrate_until_rank0_dies, args=args, nprocs=2)
    assert json.loads((directory / "calibration.json").read_text())["complete"]
    assert_close_statistics(directory, stats_dir)
    assert not [p.name for p in directory.iterdir() if p.name.startswith(("resume", "tape"))]


@pytest.mark.slow  # 2 processes
@pytest.mark.parametrize("moment", ["forward", "backward"])
def test_a_data_parallel_calibration_resumed_by_one_process_starts_again(tmp_path, model_dir, stats_dir, moment):
    """Killed with 2 processes after the forward pass or in the backward sweep, then resumed by one:
    the files on disk are the 2 processes' (tape-r-of-2, resume-r-of-2), so the run starts again and
    gives the uninterrupted statistics (before, the resumed sweep failed on tape-0-of-1)."""
    import torch.multiprocessing as mp
    from processes import spawn

    options = dataclasses.replace(EVERY, snapshot_seconds=0.0)
    directory = tmp_path / "partial"
    directory.mkdir()
    port = _free_port()
    with pytest.raises(mp.ProcessExitedException, match="process 0 terminated with exit code 1"):
        spawn(_calibrate_until_rank0_dies, args=(port, str(model_dir), str(directory), options, moment), nprocs=2)
    assert json.loads((directory / "calibration.json").read_text())["processes"] == 2
    run_calibration(model_dir, directory, "corpus", options, quiet=True)
    info = json.loads((directory / "calibration.json").read_text())
    assert info["complete"] and info["processes"] == 1
    assert not [p for p in directory.iterdir() if p.name.startswith(("resume", "tape"))]
    assert_close_statistics(directory, stats_dir)


def test_one_token_windows_are_refused_for_the_backward_sweep(tmp_path, model_dir):
    """No next token to predict: the backward sweep divided by zero predicted tokens (a traceback)."""
    options = dataclasses.replace(EVERY, tokens=8, seq_len=1)
    with pytest.raises(ValueError, match="these calibration windows are one token long"):
        calibrate(model_dir, tmp_path / "s", options=options, quiet=True)
    calibrate(model_dir, tmp_path / "fwd", options=dataclasses.replace(SMALL, tokens=8, seq_len=1), quiet=True)


def test_more_processes_than_batches_are_refused(tmp_path, model_dir, monkeypatch):
    """A process without a batch crashed in its first layer ("call embed() first") and left the
    others waiting; now every process refuses the run in one line before any layer."""
    import moelab.compress.calibration as calibration

    monkeypatch.setattr(calibration, "join_torchrun", lambda: (1, 64))
    with pytest.raises(ValueError, match=r"batch\(es\) of up to 4 windows, fewer than the 64 processes: run at most"):
        calibration.run_calibration(model_dir, tmp_path, "corpus", SMALL, quiet=True)


def test_calibration_options_are_checked_and_the_snapshot_period_is_no_setting():
    """Counts below 1 (sample_tokens below 0), unknown observers and dtypes are refused; the
    settings a calibration is matched on leave out how often it snapshots."""
    for name in ("tokens", "seq_len", "batch_size"):
        with pytest.raises(ValueError, match=f"calibration {name} must be >= 1, got 0"):
            CalibrationOptions(**{name: 0})
    with pytest.raises(ValueError, match="sample_tokens must be >= 0, got -1"):
        CalibrationOptions(sample_tokens=-1)
    assert CalibrationOptions(tokens=1, seq_len=1, batch_size=1, sample_tokens=0).sample_tokens == 0
    with pytest.raises(ValueError, match="unknown observer 'nope'"):
        CalibrationOptions(observers=("nope",))
    with pytest.raises(ValueError, match="unknown calibration dtype 'float16'"):
        CalibrationOptions(dtype="float16")
    settings = SMALL.settings()
    assert settings == dataclasses.replace(SMALL, snapshot_seconds=1.0).settings()
    assert "snapshot_seconds" not in settings and settings["dtype"] == "float32"
    assert settings["observers"] == list(SMALL.observers) and settings["sample_tokens"] == 64


def test_windows_are_capped_at_the_models_length(tmp_path, model_dir):
    """seq_len above the model's max_seq_len (64) calibrates windows of 64, and the settings
    record 64; a config without a positive length caps at 2048; a multimodal config's length is
    its text_config's, as its vocabulary is."""
    from moelab.compress.calibration import _max_positions

    options = dataclasses.replace(SMALL, tokens=128, seq_len=1000)
    assert {w.ids.numel() for w in calibration_mixture(model_dir, "corpus:code", options).windows} == {64}
    info = run_calibration(model_dir, tmp_path, "corpus:code", options, quiet=True)
    assert info["settings"]["seq_len"] == 64 and info["complete"]
    assert _max_positions({"max_seq_len": 0, "n_positions": 128}) == 128
    assert _max_positions({"max_position_embeddings": None}) == 2048
    assert _max_positions({"text_config": {"max_position_embeddings": 4096}, "max_position_embeddings": 77}) == 4096


def test_a_finished_calibration_is_reused_only_for_the_same_job(tmp_path, model_dir, monkeypatch):
    """Run again on the same model, data and settings, a finished calibration is returned as it is
    (no layer runs again, nothing is rewritten); other settings calibrate again."""
    import moelab.compress.calibration as calibration

    options = dataclasses.replace(SMALL, tokens=64, seq_len=16)
    first = run_calibration(model_dir, tmp_path, "corpus:code", options, quiet=True)
    real = calibration._calibrate_layer
    real_info = calibration.write_info
    monkeypatch.setattr(calibration, "_calibrate_layer", lambda *a: pytest.fail("calibrated again"))
    monkeypatch.setattr(calibration, "write_info", lambda *a: pytest.fail("rewritten"))
    assert run_calibration(model_dir, tmp_path, "corpus:code", options, quiet=True).items() >= first.items()
    monkeypatch.setattr(calibration, "_calibrate_layer", real)
    monkeypatch.setattr(calibration, "write_info", real_info)
    other = dataclasses.replace(options, sample_tokens=8)
    again = run_calibration(model_dir, tmp_path, "corpus:code", other, quiet=True)
    assert again["settings"]["sample_tokens"] == 8 and again["complete"]


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, model_dir):
    """Calibration text tokenised for a larger vocabulary (8192 here): id 8192 is refused in one
    line before any layer runs; 8191, the last id, calibrates."""
    mixture = build_mixture("corpus:code", tokens=32, seq_len=16)
    for top in (8191, 8192):
        ids = mixture.windows[0].ids.clone()
        ids[3] = top
        windows = (dataclasses.replace(mixture.windows[0], ids=ids), *mixture.windows[1:])
        calib = dataclasses.replace(mixture, windows=windows)
        (tmp_path / str(top)).mkdir()
        if top == 8191:
            assert run_calibration(model_dir, tmp_path / str(top), calib, SMALL, quiet=True)["complete"]
            continue
        with pytest.raises(ValueError, match=r"calibration token id 8192 is outside .*vocabulary \(8192\)"):
            run_calibration(model_dir, tmp_path / str(top), calib, SMALL, quiet=True)


def test_as_many_processes_as_batches_calibrate(tmp_path, model_dir, monkeypatch):
    """The refusal above starts at one process more than batches: 2 processes for 2 batches run,
    each its own batch, and the statistics say how many processes made them."""
    import moelab.compress.calibration as calibration

    monkeypatch.setattr(calibration, "join_torchrun", lambda: (0, 2))
    monkeypatch.setattr(calibration, "agreed", lambda value, world, how: value)
    monkeypatch.setattr(calibration, "reduce_statistics", lambda results, world: None)
    monkeypatch.setattr(calibration, "barrier", lambda world: None)
    options = dataclasses.replace(SMALL, tokens=64, seq_len=16, batch_size=2)  # 4 windows: 2 batches
    info = calibration.run_calibration(model_dir, tmp_path, "corpus:code", options, quiet=True)
    assert info["complete"] and info["processes"] == 2
    counts = load_file(tmp_path / "layer-00000.safetensors")["counts"]
    assert float(counts.sum()) == 32 * 2  # its own batch: 2 windows of 16 tokens, top-2


def test_coverage_counts_the_experts_routed_fewer_than_8_tokens(tmp_path, model_dir):
    """A router of zeros sends all 8 calibration tokens to the same two experts: those have
    exactly 8 (enough), the other 6 none; a sample size of 0 stores no inputs."""
    from moelab.compress.calibration import COVERAGE_MIN_TOKENS

    model = load_pretrained(model_dir)
    with torch.no_grad():
        model.layers[0].ffn.router.weight.zero_()
    zero = save_pretrained(model, tmp_path / "zero")
    options = dataclasses.replace(SMALL, tokens=8, seq_len=8, sample_tokens=0)
    stats = calibrate(zero, tmp_path / "stats", calib="corpus:code", options=options, quiet=True)
    assert sorted(stats.layer(0).counts.sum((0, 1)).tolist()) == [0] * 6 + [8, 8] and COVERAGE_MIN_TOKENS == 8
    assert stats.info["coverage"]["0"] == 6 and stats.layer(0).inputs is None


# families whose decoder layer adds to its residual stream something other than m x the MoE block's
# output (a norm, gate or convolution after the block, another module's output with it)
EASY_EP_UNREAD = ("afmoe", "axk1", "cohere2_moe", "granitemoehybrid", "granitemoeshared", "inkling2_text", "kolibri1",
                  "longcat_flash")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_every_method_on_every_transformers_family(tmp_path, family):
    """Each method through `compress` on a tiny checkpoint of each family, from one calibration;
    every output passes the writer's checks (strict transformers reload included)."""
    source = hf_model(tmp_path / "src", family)
    stats = calibrate(source, tmp_path / "stats", options=EVERY, quiet=True).directory
    for method in sorted(METHODS):
        domains = ["code"] if method == "premoe" else None
        if method == "easy_ep" and family in ("gemma4_text", "hy_v4", "deepseek_v4"):  # routed sum normed again; 2 streams
            with pytest.raises(ValueError, match="layer [01]: EASY-EP weighs each expert by how far"):
                compress(source, tmp_path / method, method=method, stats=stats, domains=domains, quiet=True)
            continue
        if method == "easy_ep" and family in EASY_EP_UNREAD:  # seen by the calibration: no statistic
            with pytest.raises(ValueError, match="no 'easyep_sums'.*EASY-EP weighs each expert by how far"):
                compress(source, tmp_path / method, method=method, stats=stats, domains=domains, quiet=True)
            continue
        options = None
        if FAMILIES[family].expert_count_shared_with is not None and not METHODS[method].narrows:  # JetMoE's
            with pytest.raises(ValueError, match=f"{method} removes or merges experts, but {family}'s .* also sizes"):
                compress(source, tmp_path / method, method=method, stats=stats, domains=domains, quiet=True)
            if method != "moelab":
                continue
            options = {"strategy": "neurons"}  # the recipe's neuron path keeps every expert
        report = compress(
            source, tmp_path / method, method=method, ratio=0.5, stats=stats, domains=domains, quiet=True,
            method_options=options,
        )
        narrowed = (
            METHODS[method].narrows
            or report["layers"]["0" if "0" in report["layers"] else next(iter(report["layers"]))][
                "notes"
            ].get("strategy")
            == "neurons"
        )
        kept = 2 if narrowed else 1  # narrowing keeps every expert
        assert report["complete"] and all(
            (len(e["kept"]) + len(e["merge_groups"])) * 2 == e["experts"] * kept
            for e in report["layers"].values()
        )


def test_a_hash_routed_moelab_model_compresses_and_reloads(tmp_path):
    """moelab's own hash layers (router='hash'), read through the view with their token table: REAP
    and a merge through `compress` pass the writer's checks (each layer against the masked
    original, the output reloaded by moelab), the written table naming the new experts."""
    source = moelab_model(tmp_path / "src", router="hash", score_func="sqrtsoftplus")
    for method in ("reap", "m_smoe"):
        report = compress(source, tmp_path / method, method=method, ratio=0.5, calib_options=SMALL, quiet=True)
        router = load_pretrained(tmp_path / method).layers[1].ffn.router
        assert report["complete"] and router.num_experts == 4 and router.token_experts.max() == 3


@pytest.mark.parametrize(
    "activation,bias,latent",
    [("gelu", True, None), pytest.param("relu2", False, None, marks=pytest.mark.slow), ("swiglu", False, 16)],
)
def test_every_method_on_moelab_models_with_plain_or_latent_experts(tmp_path, activation, bias, latent):
    """moelab's MLPExperts (up and down, no gate; with biases or not) and latent experts (MoLAE:
    experts in a shared latent space) through every method; each output passes the writer's checks
    (reloaded by moelab, each edited layer compared)."""
    source = moelab_model(tmp_path / "src", activation=activation, expert_mlp_bias=bias, latent_dim=latent)
    stats = calibrate(source, tmp_path / "stats", options=EVERY, quiet=True).directory
    for method in sorted(METHODS):
        domains = ["code"] if method == "premoe" else None
        report = compress(source, tmp_path / method, method=method, ratio=0.5, stats=stats, domains=domains, quiet=True)
        ffn = load_pretrained(tmp_path / method).layers[1].ffn
        experts = ffn.experts
        assert report["complete"] and getattr(experts, "activation", "swiglu") == activation
        assert (getattr(experts, "up_bias", None) is not None) == bias and (ffn.latent is not None) == bool(latent)
        assert experts.num_experts * experts.hidden_dim == 8 * 32 // 2 or report["layers"]["1"]["notes"].get(
            "compact_parameters"
        ), method  # half the experts, half their width, or zeroed neurons (padded)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(TINY) - {"jetmoe"}))  # JetMoE's expert count cannot change: no pruning
def test_router_fit_on_every_transformers_family(tmp_path, family):
    """Router re-calibration after pruning, on every family: the fitted routers pass the
    writer's checks (the edited layer reproduced, strict transformers reload)."""
    source = hf_model(tmp_path / "src", family)
    report = compress(
        source,
        tmp_path / "out",
        method="reap",
        ratio=0.5,
        calib_options=SMALL,
        router_fit=RouterFit(5, 1e-2),
        quiet=True,
    )
    assert report["complete"] and all("router_fit" in e["notes"] for e in report["layers"].values())


def test_statistics_of_other_calibration_data_are_refused(tmp_path, model_dir, stats_dir):
    with pytest.raises(ValueError, match=r"made on the calibration data 'corpus', not on 'corpus:code'"):
        compress(model_dir, tmp_path / "out", stats=stats_dir, calib="corpus:code", quiet=True)
    report = compress(model_dir, tmp_path / "out", stats=stats_dir, calib="corpus", quiet=True)
    assert report["complete"]


def test_mixture_windows_batches_and_source_weights(tmp_path):
    """Partial last windows: starts are cumulative sizes, and batches hold at most batch_size
    windows of one length. A whole source's weight is split over its domains. Weights must be
    positive; '=' in a file name stays in the name; a file of a few tokens is refused."""
    mixture = build_mixture("corpus:code=3,german=1", tokens=420, seq_len=50)  # 315 + 105 tokens
    sizes = [w.ids.numel() for w in mixture.windows]
    assert sizes == [50] * 6 + [15] + [50, 50, 5]
    assert [w.start for w in mixture.windows] == [sum(sizes[:i]) for i in range(len(sizes))]
    batches = [[w.ids.numel() for w in b] for b in mixture.batches(4)]
    assert batches == [[50] * 4, [50] * 2, [15], [50] * 2, [5]]
    path = tmp_path / "notes.txt"
    path.write_text("hello world " * 200)
    both = build_mixture([str(path), "corpus"], tokens=200, seq_len=20)
    assert both.sources[0].weight == pytest.approx(0.5) and len(both.sources) > 2
    assert sum(s.weight for s in both.sources[1:]) == pytest.approx(0.5)
    assert parse_sources("my=notes.txt=0.5") == [("my=notes.txt", None, 0.5)]
    with pytest.raises(ValueError, match="weights must be positive"):
        parse_sources("corpus:code=0")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    with pytest.raises(ValueError, match="no tokens to speak of"):
        build_mixture(str(tiny), tokens=100, seq_len=10)


# ----------------------------------------------------------------------------- the report's numbers


def _stats(counts: list[list[float]], soft: list[list[float]], tokens: tuple[float, float]):
    """LayerStats of one source: counts and soft counts [2 halves][E], tokens per half."""
    from moelab.compress.stats import LayerStats

    counts_t, soft_t = torch.tensor(counts, dtype=torch.float64)[:, None], torch.tensor(soft, dtype=torch.float64)[:, None]
    zeros = torch.zeros_like(counts_t)
    return LayerStats(
        0, ("code",), torch.tensor(tokens, dtype=torch.float64)[:, None], counts_t, soft_t, zeros, zeros,
        torch.zeros(1),
    )  # fmt: skip


def test_stability_is_the_jaccard_of_the_halves_kept_sets_for_data_driven_methods_only():
    """Frequency keeps 2 of 4: {0, 1} on half 0, {0, 2} on half 1, so |a & b| / |a | b| = 1/3 (not
    |a & b| / |a| = 1/2); a method whose scores do not come from the data (random) reports none."""
    from moelab.compress.methods import Target, get_method
    from moelab.compress.run import _stability

    stats = _stats([[9, 8, 1, 0], [9, 0, 8, 1]], [[1] * 4, [1] * 4], (10, 10))
    assert _stability(get_method("frequency"), make_view(4), stats, Target(2)) == pytest.approx(1 / 3)
    assert _stability(get_method("random"), make_view(4), stats, Target(2)) is None


def test_dropped_probability_mass_is_the_dropped_experts_mean_probability_per_token():
    """Experts 2 and 3 dropped: their soft counts over both halves, (1 + 1) + (3 + 1), over the
    20 calibration tokens."""
    from moelab.compress.methods import LayerDecision, Target
    from moelab.compress.run import _layer_entry
    from moelab.hf.edit import LayerEdit

    stats = _stats([[5, 3, 1, 1], [4, 2, 3, 1]], [[5, 3, 1, 1], [4, 2, 3, 1]], (10, 10))
    entry = _layer_entry(make_view(4), LayerDecision(LayerEdit.keep([0, 1]), [0, 1]), stats, Target(2))
    assert entry["dropped"] == [2, 3] and entry["dropped_probability_mass"] == pytest.approx(6 / 20)


def test_the_compact_count_subtracts_what_the_compact_form_saves(tmp_path, monkeypatch):
    """Stored at full width 50 + 40 parameters in two layers whose compact form holds 30 + 10: the
    compact total is the written total less 20 + 30."""
    import moelab.compress.run as run

    monkeypatch.setattr(run, "parameter_counts", lambda path: {"total": 1000})
    notes = [{"stored_parameters": 50, "compact_parameters": 30}, {"stored_parameters": 40, "compact_parameters": 10}]
    report = {"layers": {str(i): {"notes": n} for i, n in enumerate(notes)} | {"2": {"notes": {}}}}
    assert run._after(tmp_path, report) == {"total": 1000, "total_compact": 950}
    assert run._after(tmp_path, {"layers": {"0": {"notes": {}}}}) == {"total": 1000}


def test_the_global_budget_ranks_scores_normalised_within_each_layer():
    """Keeping 1 expert per layer: normalised, the best two overall are layer 0's 0.6 and layer
    1's 0.4, one per layer, so it passes; raw scores (60 and 30, both layer 0's) or the worst two
    (both layer 0's 0.05) would refuse it."""
    from types import SimpleNamespace

    from moelab.compress.methods import ScoringMethod, Target
    from moelab.compress.run import _check_global_budget

    raw = {0: [60.0, 30.0, 5.0, 5.0], 1: [4.0, 3.0, 2.0, 1.0]}

    class Given(ScoringMethod):
        name = "given"

        def score(self, layer, stats, target):
            return torch.tensor(raw[layer.index])

    view = SimpleNamespace(layer=lambda index: make_view(4, index=index))
    _check_global_budget(Given(), view, {0: None, 1: None}, {0: Target(1), 1: Target(1)})
    raw[1] = [400.0, 300.0, 200.0, 100.0]  # the same normalised scores: still one each
    _check_global_budget(Given(), view, {0: None, 1: None}, {0: Target(1), 1: Target(1)})
    raw[0] = [2.5, 45.0, 2.5, 50.0]  # now layer 0's two best (0.5, 0.45) beat layer 1's 0.4
    with pytest.raises(ValueError, match=r"layer 0: 2, layer 1: 0"):
        _check_global_budget(Given(), view, {0: None, 1: None}, {0: Target(1), 1: Target(1)})
    # signed scores (PreMoe's mean logits) start at 0 first: [3, 2, 1, 0] / 6, whose 0.5 comes first and
    # layer 1's 0.4 second, one each (left raw, their negative sum put layer 1's 0.4 and 0.3 first)
    raw[0], raw[1] = [-1.0, -2.0, -3.0, -4.0], [4.0, 3.0, 2.0, 1.0]
    _check_global_budget(Given(), view, {0: None, 1: None}, {0: Target(1), 1: Target(1)})


def test_the_reports_stability_is_the_mean_over_layers(tmp_path, model_dir, stats_dir, monkeypatch):
    """Layers of stability 0.5 and 1.0 (stubbed) report 0.75 for the model."""
    import moelab.compress.run as run

    monkeypatch.setattr(run, "_stability", lambda method, layer, stats, target: 0.5 if layer.index == 0 else 1.0)
    report = compress(model_dir, tmp_path / "out", method="frequency", ratio=0.25, stats=stats_dir, quiet=True)
    assert [report["layers"][i]["stability_jaccard"] for i in ("0", "1")] == [0.5, 1.0]
    assert report["stability_jaccard"] == 0.75


def test_a_moelab_checkpoint_calibrates_in_bfloat16(tmp_path):
    """Its rotary tables, which no checkpoint holds, are made in the run's dtype: in float32 beside
    bf16 weights they made float32 queries and keys against bf16 values, which attention refuses."""
    model = moelab_model(tmp_path / "m")
    stats = calibrate(model, tmp_path / "s", options=dataclasses.replace(SMALL, dtype="bfloat16"), quiet=True)
    for index in stats.layers:
        counts = stats.layer(index).counts
        assert counts.sum() == 2 * stats.layer(index).tokens.sum()  # top-2 of every token
