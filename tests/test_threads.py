"""Thread counts that match the free cores (`moelab.threads`) and the settings that use them."""

import os
import subprocess
import sys

import pytest
import torch

from moelab.bench.load import busy_processes
from moelab.threads import available_cores, check_threads, free_cores, intra_op_threads, resolve_threads


@pytest.mark.parametrize(("running", "expected"), [("1/80", 4), ("2/80", 3), ("4/80", 1), ("9/80", 1)])
def test_free_cores_subtracts_the_other_runnable_tasks(tmp_path, monkeypatch, running, expected):
    monkeypatch.setattr("moelab.threads.available_cores", lambda: 4)
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.50 0.40 0.30 {running} 1234\n")
    assert free_cores(samples=2, interval=0, loadavg=str(loadavg)) == expected


def test_free_cores_without_loadavg_is_every_core(tmp_path):
    assert free_cores(loadavg=str(tmp_path / "missing")) == available_cores()


def test_busy_processes_take_cores_away():
    cores = available_cores()
    assert 1 <= free_cores() <= cores
    with busy_processes(2):
        assert free_cores() <= max(1, cores - 2)


@pytest.mark.parametrize("bad", [0, -1, "two", True, 1.5])
def test_bad_thread_settings_are_refused(bad):
    with pytest.raises(ValueError, match="threads must be an integer >= 1 or 'auto'"):
        check_threads(bad)


def test_resolve_threads():
    assert resolve_threads(None) is None and resolve_threads(3) == 3
    assert 1 <= resolve_threads("auto") <= available_cores()


def test_intra_op_threads_set_the_count_for_the_block_and_put_it_back(monkeypatch):
    """An int and "auto" (the free cores) set torch's count inside the block, None leaves it; the
    count is put back on leaving, also after an error; a bad setting changes nothing."""
    before = torch.get_num_threads()
    monkeypatch.setattr("moelab.threads.free_cores", lambda: 2)
    try:
        torch.set_num_threads(1)
        for setting, inside in ((2, 2), ("auto", 2), (None, 1)):
            with intra_op_threads(setting) as count:
                assert count == torch.get_num_threads() == inside
            assert torch.get_num_threads() == 1
        with pytest.raises(KeyError), intra_op_threads(2):
            raise KeyError
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="got 0"), intra_op_threads(0):
            pass
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_config_takes_auto_and_refuses_zero():
    from moelab.train.config import TrainConfig

    assert TrainConfig(steps=1, threads="auto").threads == "auto"
    with pytest.raises(ValueError, match="TrainConfig.threads must be an integer >= 1"):
        TrainConfig(steps=1, threads=0)


@pytest.mark.parametrize(
    "code, given, expected",
    [
        ("import moelab", None, "30000"),  # the `moelab` command and python -m moelab import moelab first
        ("import moelab", "7", "7"),  # a value set is kept
        ("import torch, moelab", None, None),  # libgomp has read its settings already: nothing to set
    ],
)
def test_importing_moelab_before_torch_shortens_openmp_s_idle_spin(code, given, expected):
    """GOMP_SPINCOUNT, which libgomp reads once as torch loads it: set where moelab comes first."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": given} if given else {})
    script = f"{code}; import os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)



def test_libgomp_reads_the_spin_count_moelab_sets_as_torch_loads():
    """What OpenMP itself read, not just os.environ: libgomp prints its settings as it loads with
    OMP_DISPLAY_ENV=verbose. 30000 where moelab came first; its own default where torch did."""
    drop = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_DISPLAY_ENV": "verbose"}
    read = {}
    for code in ("import moelab, torch", "import torch, moelab"):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        if "GOMP_SPINCOUNT = " not in out.stderr:
            pytest.skip("torch's OpenMP runtime here is not libgomp")
        read[code] = out.stderr.split("GOMP_SPINCOUNT = ")[1].split()[0]
    assert read["import moelab, torch"] == "'30000'" and read["import torch, moelab"] != "'30000'"

def test_bench_layer_reports_the_threads_and_allocator_settings_it_ran_on(monkeypatch):
    from moelab.bench.layer import BenchOptions, run

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    threads = torch.get_num_threads()
    options = BenchOptions.create(
        configs=["e8k2"], dtypes=["fp32"], modes=["fwd"], tokens=16, rounds=1, skew=0, memory=False, threads=1
    )
    try:
        setup = run(options)["setup"]
        assert setup["threads"] == 1 and setup["allocator_env"]["MALLOC_TRIM_THRESHOLD_"] == "1073741824"
        assert setup["openmp_env"]["GOMP_SPINCOUNT"] == "123"
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="threads must be"):
        BenchOptions.create(threads=0)
