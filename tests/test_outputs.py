"""Nothing lost: the output-directory contract of `moelab.io` and every command that writes.

An output is new, or moelab's own output of the same kind replaced only with overwrite; never an
input or a directory above one; never a directory moelab did not write; locked while in use;
and what a killed run left behind is cleaned by the next run into the same output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hf_tiny import build

from moelab import cli, io
from moelab.hf.writer import drop_experts
from moelab.io import (
    MARKER,
    OutputError,
    OutputInUseError,
    RawTensor,
    StagedOutput,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    clean_leftovers,
    clear_staging,
    copy_side_file,
    is_output,
    output_dir,
    remove_output,
    save_safetensors_stream,
)
from moelab.models import ModelConfig, MoETransformer, save_pretrained
from moelab.nn import MoEConfig
from moelab.trace import TraceOptions, trace_from_files
from moelab.train import RunConfig, train
from moelab.train.checkpoint import list_checkpoints

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (and the targets of links, by name)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            digest[key] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[key] = "dir"
    return digest


def publish(out: Path, kind: str = "thing", files: dict[str, str] | None = None, **kw) -> Path:
    with StagedOutput(out, kind, **kw) as staging:
        for name, text in (files or {"a.txt": "a"}).items():
            (staging / name).write_text(text)
    return out


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != MARKER)


# ----------------------------------------------------------------------------- the contract


def test_staged_output_appears_whole_with_its_marker(tmp_path):
    out = tmp_path / "out"
    with StagedOutput(out, "thing") as staging:
        (staging / "a.txt").write_text("a")
        assert not out.exists(), "nothing appears before the block ends"
    assert json.loads((out / MARKER).read_text()) == {
        "format": "moelab-output/1",
        "kind": "thing",
        "entries": ["a.txt"],
    }
    assert is_output(out, "thing") and not is_output(out, "other")
    assert hidden(tmp_path) == [], "no lock, staging or trash left beside it"
    with pytest.raises(RuntimeError), StagedOutput(tmp_path / "failed", "thing") as staging:
        (staging / "a.txt").write_text("a")
        raise RuntimeError("the writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_directory_counts_as_new(tmp_path):
    (tmp_path / "out").mkdir()
    publish(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_moelab_did_not_write_is_never_replaced(tmp_path, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / "manifest.json").write_text("{}")
    before = tree_digest(out)
    with pytest.raises(OutputError, match="mine exists and was not written by moelab"):
        publish(out, overwrite=overwrite)
    with pytest.raises(OutputError, match="mine exists and was not written by moelab"):
        with output_dir(out, "thing", entries=["a.txt"], overwrite=overwrite):
            pass
    assert tree_digest(out) == before and hidden(tmp_path) == []


def test_replacing_needs_overwrite_the_same_kind_and_no_foreign_files(tmp_path):
    out = publish(tmp_path / "out", files={"a.txt": "1"})
    with pytest.raises(OutputError, match="already holds moelab's thing; pass --overwrite"):
        publish(out, files={"a.txt": "2"})
    with pytest.raises(OutputError, match=r"holds another kind of moelab output \(thing, not trace\)"):
        publish(out, "trace", overwrite=True)
    (out / "README.md").write_text("the user's")
    with pytest.raises(OutputError, match=r"README.md was not written by moelab; move it out"):
        publish(out, files={"a.txt": "2"}, overwrite=True)
    assert (out / "a.txt").read_text() == "1" and (out / "README.md").read_text() == "the user's"
    (out / "README.md").unlink()
    publish(out, files={"b.txt": "2"}, overwrite=True)
    assert sorted(os.listdir(out)) == [MARKER, "b.txt"] and hidden(tmp_path) == []


def test_foreign_files_inside_nested_outputs_block_an_overwrite(tmp_path):
    out = tmp_path / "demo"
    with output_dir(out, "demo", entries=["analysis", "summary.json"]) as claimed:
        publish(claimed.path / "analysis", "analysis")
        (claimed.path / "summary.json").write_text("{}")
    (out / "analysis" / "mine.txt").write_text("the user's")
    with pytest.raises(OutputError, match="mine.txt was not written by moelab"):
        with output_dir(out, "demo", entries=["analysis"], overwrite=True):
            pass
    assert (out / "analysis" / "a.txt").is_file() and (out / "summary.json").is_file()
    (out / "analysis" / "mine.txt").unlink()
    with output_dir(out, "demo", entries=["summary.json"], overwrite=True):
        assert sorted(os.listdir(out)) == [MARKER], "overwrite clears what moelab wrote"



def test_files_added_deep_in_a_staged_outputs_directories_block_an_overwrite(tmp_path):
    """The marker lists the files of every directory in the output, at any depth (a report's plots/sub/)."""
    out = tmp_path / "out"
    with StagedOutput(out, "thing") as staging:
        (staging / "plots" / "sub").mkdir(parents=True)
        (staging / "plots" / "sub" / "p.png").write_text("plot")
    (out / "plots" / "sub" / "mine.txt").write_text("the user's")
    with pytest.raises(OutputError, match="mine.txt was not written by moelab"):
        publish(out, overwrite=True)
    assert (out / "plots" / "sub" / "mine.txt").read_text() == "the user's"


def test_clearing_a_claimed_output_refuses_a_users_file_among_its_entries(tmp_path):
    """A resumed run that starts again clears what it wrote; a user's file in one of its directories stops it."""
    out, entries, patterns = tmp_path / "run", ["tensorboard", "log"], {"tensorboard": r"events\.out\..+"}
    with output_dir(out, "run", entries=entries, patterns=patterns):
        (out / "tensorboard").mkdir()
        (out / "tensorboard" / "events.out.1").write_text("events")
        (out / "log").write_text("step 1")
    (out / "tensorboard" / "notes.md").write_text("the user's")
    with output_dir(out, "run", entries=entries, resume=True, patterns=patterns) as claimed:
        with pytest.raises(OutputError, match="notes.md was not written by moelab"):
            claimed.clear()
        assert (out / "tensorboard" / "notes.md").read_text() == "the user's" and (out / "log").is_file()
        (out / "tensorboard" / "notes.md").unlink()
        claimed.clear()
        assert os.listdir(out) == [MARKER]


def test_a_users_link_named_as_moelab_names_its_directories_is_not_moelabs(tmp_path):
    """checkpoints/step-N/ names a directory: a link of that name (to a directory) is the user's."""
    patterns = {"checkpoints": r"step-\d+/"}
    out = tmp_path / "run"
    with output_dir(out, "run", entries=["checkpoints"], patterns=patterns):
        publish(out / "checkpoints" / "step-000001", "checkpoint")
    (tmp_path / "elsewhere").mkdir()
    (out / "checkpoints" / "step-000002").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="step-000002 was not written by moelab"):
        with output_dir(out, "run", entries=["checkpoints"], overwrite=True, patterns=patterns):
            pass
    assert (out / "checkpoints" / "step-000002").is_symlink()


def test_output_dir_resumes_or_refuses(tmp_path):
    out = tmp_path / "run"
    with output_dir(out, "run", entries=["log"]) as claimed:
        assert not claimed.resumed
        (out / "log").write_text("1")
    with pytest.raises(
        OutputError, match=r"already holds moelab's run; pass --overwrite .*replace it and go on"
    ):
        with output_dir(out, "run", entries=["log"], resume_hint=" and go on"):
            pass
    with output_dir(out, "run", entries=["other"], resume=True) as claimed:
        assert claimed.resumed and (out / "log").read_text() == "1"
    assert json.loads((out / MARKER).read_text())["entries"] == ["log", "other"]


@pytest.mark.parametrize("where", ["is", "above", "inside"])
def test_an_output_never_is_contains_or_lies_inside_an_input(tmp_path, where):
    source = tmp_path / "A" / "ckpt"
    source.mkdir(parents=True)
    (source / "w.bin").write_text("weights")
    out = {"is": source, "above": tmp_path / "A", "inside": source / "sub"}[where]
    pattern = {"is": "is the input", "above": "contains the input", "inside": "lies inside the input"}[where]
    for claim in (
        lambda: publish(out, inputs=[source], overwrite=True),
        lambda: output_dir(out, "thing", entries=[], inputs=[source], overwrite=True).__enter__(),
    ):
        with pytest.raises(OutputError, match=pattern):
            claim()
    assert tree_digest(tmp_path / "A") == {
        "ckpt": "dir",
        "ckpt/w.bin": hashlib.sha256(b"weights").hexdigest(),
    }


def test_output_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file; the output must be a directory"):
        publish(tmp_path / "file")
    with pytest.raises(OutputError, match=r"file is a file, not a directory"):
        publish(tmp_path / "file" / "out")
    with pytest.raises(OutputError, match="cannot create|not writable"):
        publish(Path("/proc/moelab-test/out"))
    assert (tmp_path / "file").read_text() == "x"


def test_single_output_files(tmp_path):
    path = tmp_path / "bench.json"
    own = lambda p: json.loads(p.read_text()).get("format") == "mine"  # noqa: E731
    assert check_output_file(path, overwrite=False, is_own=own) == path
    path.write_text('{"format": "mine"}')
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        check_output_file(path, overwrite=False, is_own=own)
    check_output_file(path, overwrite=True, is_own=own)
    path.write_text('{"someone": "else"}')
    for overwrite in (False, True):  # never advised to pass --overwrite, which could not replace it
        with pytest.raises(OutputError, match="exists and was not written by moelab"):
            check_output_file(path, overwrite=overwrite, is_own=own)
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path, overwrite=True, is_own=own)
    os.mkfifo(tmp_path / "fifo")  # refused, not read (which would wait for a writer)
    with pytest.raises(OutputError, match="is not a regular file"):
        check_output_file(tmp_path / "fifo", overwrite=False, is_own=own)



def test_single_output_files_never_go_inside_or_replace_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "stats.json").write_text('{"format": "mine"}')
    for path, source, pattern in (
        (model / "r.json", model, "lies inside the input"),
        (model / "stats.json", model / "stats.json", "is the input"),
    ):
        with pytest.raises(OutputError, match=pattern):
            check_output_file(path, overwrite=True, is_own=lambda p: True, inputs=[None, source])
    assert os.listdir(model) == ["stats.json"]


def test_check_output_dir_refuses_before_the_slow_work_and_claims_nothing(tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output_dir(source / "out", "thing", inputs=[source])
    out = publish(tmp_path / "out")
    with pytest.raises(OutputError, match=r"already holds moelab's thing; pass --overwrite .*replace it and go on"):
        check_output_dir(out, "thing", hint=" and go on")
    check_output_dir(out, "thing", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"] and os.listdir(source) == []


def test_inputs_and_outputs_are_compared_with_links_resolved(tmp_path):
    """An input named through a link, or an output through a linked parent, is still the same directory."""
    source = tmp_path / "A" / "ckpt"
    source.mkdir(parents=True)
    (source / "w.bin").write_text("weights")
    (tmp_path / "link-to-A").symlink_to(tmp_path / "A")
    (tmp_path / "link-to-ckpt").symlink_to(source)
    for out, given in (
        (tmp_path / "link-to-A" / "ckpt", source),  # the output through a linked parent
        (source, tmp_path / "link-to-ckpt"),  # the input through a link
    ):
        with pytest.raises(OutputError, match="is the input"):
            publish(out, inputs=[given], overwrite=True)
        with pytest.raises(OutputError, match="is the input"):
            check_output_file(out / "w.bin", overwrite=True, is_own=lambda p: True, inputs=[given / "w.bin"])
    assert tree_digest(tmp_path / "A") == {"ckpt": "dir", "ckpt/w.bin": hashlib.sha256(b"weights").hexdigest()}


@pytest.mark.parametrize(
    "marker",
    [
        '{"format": "moelab-output/1", "kind": "thing", "entries": ["../../etc"]}',
        '{"format": "moelab-output/1", "kind": "thing", "entries": [".."]}',  # out / ".." is its parent
        '{"format": "moelab-output/2", "kind": "thing", "entries": ["a.txt"]}',  # a future moelab's: not trusted
    ],
)
def test_a_damaged_marker_leaves_everything_alone(tmp_path, marker):
    out = publish(tmp_path / "out")
    (out / MARKER).write_text(marker)
    with pytest.raises(OutputError, match="is damaged"):
        publish(out, overwrite=True)
    assert (out / "a.txt").is_file()


def test_atomic_writes_are_synced_before_the_rename_and_get_the_usual_permissions(tmp_path, monkeypatch):
    """mkstemp makes 0600 files; the output gets 0666 less the umask, flushed before it replaces the old."""
    calls = []
    monkeypatch.setattr(io.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    old_mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old_mask)
    assert calls == ["fsync", "replace"]
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """A RawTensor copied from a truncated file fails the write; the target stays as it was."""
    source = tmp_path / "short.bin"
    source.write_bytes(b"\0" * 8)
    (tmp_path / "out.safetensors").write_text("old")
    raw = RawTensor(source, offset=0, nbytes=16, dtype="F32", shape=(4,))
    with pytest.raises(OSError, match="truncated"):
        save_safetensors_stream({"w": raw}, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "short.bin"]
    assert (tmp_path / "out.safetensors").read_text() == "old"


@pytest.mark.parametrize("name", ["a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh"])
def test_streamed_safetensors_headers_are_padded_to_eight_bytes(tmp_path, name):
    """The data then starts 8-byte aligned, as readers that map the file expect."""
    save_safetensors_stream({name: torch.ones(2)}, tmp_path / "w.safetensors")
    assert int.from_bytes((tmp_path / "w.safetensors").read_bytes()[:8], "little") % 8 == 0


def test_a_failed_run_keeps_a_users_empty_directory_and_what_it_wrote(tmp_path):
    """Only an output the failed run created, and left empty, is removed."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError), output_dir(tmp_path / "empty", "thing", entries=["log"]):
        raise RuntimeError("setup failed")
    assert (tmp_path / "empty").is_dir()
    with pytest.raises(RuntimeError), output_dir(tmp_path / "new", "thing", entries=["log"]):
        (tmp_path / "new" / "log").write_text("step 1")
        raise RuntimeError("failed after writing")
    assert (tmp_path / "new" / "log").read_text() == "step 1"


def test_a_failed_run_removes_the_empty_parents_it_created_and_only_those(tmp_path):
    """`moelab calibrate FILE` (a file, not a model) refused inside the lock and left the default
    output's parent, an empty `runs/`, behind; a parent that holds something, or was there before, stays."""
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "runs" / "calibration", tmp_path / "mine" / "a" / "b"):
        with pytest.raises(RuntimeError), output_dir(out, "thing", entries=["log"]):
            raise RuntimeError("refused: not a model")
        with pytest.raises(RuntimeError), StagedOutput(out, "thing"):
            raise RuntimeError("refused: not a model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not any((tmp_path / "mine").iterdir())
    with pytest.raises(RuntimeError), StagedOutput(tmp_path / "runs" / "calibration", "thing", resume=True) as staging:
        (staging / "layer-0").write_text("kept for the next run")
        raise RuntimeError("interrupted")
    assert hidden(tmp_path / "runs") == [staging.name], "a resumable job's staging keeps its parent"
    publish(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out" / "a.txt").is_file()


def test_a_failed_run_keeps_a_parent_another_process_made_as_it_made_its_own(tmp_path, monkeypatch):
    """A parent missing when the lock looked but made by another process before the lock's mkdir
    (a sibling run, the user) is not the run's: it stays when the run fails, empty or not."""
    theirs = tmp_path / "runs"
    mkdir = os.mkdir

    def made_first_by_another(path, *args, **kwargs):
        if Path(path) == theirs and not theirs.exists():
            mkdir(theirs)
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", made_first_by_another)
    for out in (theirs / "calibration", theirs / "deeper" / "calibration"):
        with pytest.raises(RuntimeError), output_dir(out, "thing", entries=["log"]):
            raise RuntimeError("refused: not a model")
        assert theirs.is_dir() and not any(theirs.iterdir()), "its own parent (deeper) went, runs/ stayed"
        theirs.rmdir()


def test_a_run_claims_its_output_where_a_failed_run_removes_an_existing_parent_meanwhile(tmp_path, monkeypatch):
    """`runs/` there when the lock looked, removed empty by the failed run that had made it before
    the lock's mkdir of `runs/deeper`: the run makes both, as its own (it stopped with 'cannot create
    runs/deeper (No such file or directory)', where mkdir(parents=True) had made runs/ again)."""
    theirs = tmp_path / "runs"
    theirs.mkdir()
    mkdir, removed = os.mkdir, []

    def removed_first_by_another(path, *args, **kwargs):
        if Path(path) == theirs / "deeper" and not removed:
            removed.append(theirs)
            theirs.rmdir()  # the failed run's `_lock` removing the parent it made
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", removed_first_by_another)
    with output_dir(theirs / "deeper" / "calibration", "thing", entries=["log"]) as claimed:
        (claimed.path / "log").write_text("step 1")
    assert removed and (theirs / "deeper" / "calibration" / "log").read_text() == "step 1"
    with pytest.raises(RuntimeError), output_dir(tmp_path / "runs2" / "deeper" / "calibration", "thing", entries=["log"]):
        raise RuntimeError("refused: not a model")
    assert not (tmp_path / "runs2").exists()


def test_a_file_written_into_a_parent_a_failed_run_removes_meanwhile_is_written(tmp_path, monkeypatch):
    """A concurrent run's result file (`--json runs/bench.json`, written without a lock) into the
    `runs/` a refused run had made: removed, empty, between the writer's mkdir and its temporary
    file, the result was lost to a FileNotFoundError; the writer makes the directory again."""
    import tempfile

    mkstemp, removed = tempfile.mkstemp, []

    def parent_removed_first(*args, dir, **kwargs):
        if not removed:
            removed.append(dir)
            Path(dir).rmdir()  # the failed run's `_lock` removing the parent it made
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", parent_removed_first)
    atomic_write_text(tmp_path / "runs" / "bench.json", "{}")
    assert removed == [tmp_path / "runs"] and (tmp_path / "runs" / "bench.json").read_text() == "{}"


def test_staged_output_refuses_an_existing_output_when_it_opens(tmp_path):
    """Before the slow work, not only when publishing."""
    out = publish(tmp_path / "out")
    with pytest.raises(OutputError, match="already holds moelab's thing"):
        StagedOutput(out, "thing").open()
    assert hidden(tmp_path) == []



def test_a_marker_that_is_not_a_file_is_no_marker(tmp_path):
    out = tmp_path / "mine"
    (out / MARKER).mkdir(parents=True)
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(OutputError, match="mine exists and was not written by moelab"):
        publish(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "the user's" and (out / MARKER).is_dir()


def test_clear_staging_removes_links_whose_target_is_gone(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    clear_staging(tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("existing", [True, False])
def test_files_added_to_the_output_while_it_was_built_stop_the_publish(tmp_path, existing):
    out = publish(tmp_path / "out") if existing else tmp_path / "out"
    staged = StagedOutput(out, "thing", overwrite=True)
    (staged.open() / "a.txt").write_text("new")
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(OutputError, match="not written by moelab" if existing else "changed while moelab wrote"):
        staged.publish()
    assert (out / "notes.txt").read_text() == "the user's" and hidden(tmp_path) == []


def test_an_output_that_is_not_yet_there_is_not_an_input_path(tmp_path):
    """An input that does not exist (a hub id such as org/name) cannot be replaced: it blocks nothing."""
    with output_dir(tmp_path, "thing", entries=[], inputs=[tmp_path / "org" / "name"]):
        pass


def test_only_the_nearest_existing_parent_must_be_writable(tmp_path, monkeypatch):
    """/home itself is not writable; /home/user/new/out still is a path moelab may create."""
    real = io.tempfile.TemporaryFile

    def writable_only_in_tmp_path(*args, dir, **kw):
        if not Path(dir).is_relative_to(tmp_path):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(io.tempfile, "TemporaryFile", writable_only_in_tmp_path)
    publish(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out" / "a.txt").is_file()



def test_an_output_whose_directory_cannot_be_written_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    """Tried, not read from permission bits (which do not stop root): a file made and removed there."""
    real = io.tempfile.TemporaryFile

    def read_only_parent(*args, dir, **kw):
        if Path(dir) == tmp_path / "ro":
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(io.tempfile, "TemporaryFile", read_only_parent)
    with pytest.raises(OutputError, match="ro is not writable"):
        publish(tmp_path / "ro" / "out")
    with pytest.raises(OutputError, match="ro is not writable"):
        check_output_file(tmp_path / "ro" / "r.json", overwrite=False, is_own=lambda p: True)
    assert os.listdir(tmp_path / "ro") == []


def test_an_existing_output_moelab_cannot_write_is_refused(tmp_path, monkeypatch):
    out = publish(tmp_path / "out")
    monkeypatch.setattr(io.os, "access", lambda path, mode: Path(path) != out)
    with pytest.raises(OutputError, match="out is not writable"):
        publish(out, overwrite=True)
    assert (out / "a.txt").read_text() == "a" and hidden(tmp_path) == []


# ----------------------------------------------------------------------------- one process at a time

HOLD = """
import os, sys, time
from moelab.io import StagedOutput
with StagedOutput(sys.argv[1], "thing") as staging:
    (staging / "big.bin").write_bytes(os.urandom(1 << 20))
    print("ready", flush=True)
    sys.stdin.readline()
"""


def hold(out: Path) -> subprocess.Popen:
    """A second process that claims `out` and waits, its staging directory half written."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_run_into_the_same_output_fails_with_in_use(tmp_path):
    out = tmp_path / "out"
    proc = hold(out)
    try:
        with pytest.raises(
            OutputInUseError, match=rf"out is in use by another moelab process \(pid {proc.pid}"
        ):
            publish(out)
        with pytest.raises(OutputInUseError, match="in use"):
            with output_dir(out, "thing", entries=[]):
                pass
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and (out / "big.bin").is_file()
    publish(out, overwrite=True)


CLAIM = """
import subprocess, sys
from moelab.io import output_dir
JOB = "import sys; from moelab.io import StagedOutput\\nwith StagedOutput(sys.argv[1], 'thing') as s: (s / 'a.txt').write_text('a')"
with output_dir(sys.argv[1], "thing", entries=["inner"]):
    subprocess.run([sys.executable, "-c", JOB, sys.argv[1] + "/inner"], check=True)  # a job it starts, as bench compress's
    print("ready", flush=True)
    sys.stdin.readline()
"""


def test_an_output_inside_another_moelab_output_is_refused_unless_that_one_is_being_written(tmp_path):
    """An analysis's trace/ (or anything else) written again into the analysis at rest would leave
    its report describing another trace: refused before anything is made, a stale lock file no
    excuse. The nesting the commands make themselves, while they write the outer output (in this
    process, or in a child as bench compress's), goes on; another command's, while that one
    writes, is refused (it would be taken for the running command's own)."""
    analysis = tmp_path / "analysis"
    with output_dir(analysis, "routing analysis", entries=["trace", "report.json"]):
        publish(analysis / "trace", "trace")
    (tmp_path / ".analysis.moelab-lock").write_text("")  # what a killed run may leave
    before = tree_digest(tmp_path)
    inside = rf"lies inside {analysis}, moelab's routing analysis: writing there would change what that routing analysis holds; choose an output path outside it"  # fmt: skip
    for claim in (
        lambda: publish(analysis / "trace", "trace", overwrite=True),
        lambda: check_output_dir(analysis / "trace", "trace", overwrite=True),
        lambda: output_dir(analysis / "plots" / "mine", "thing", entries=[]).__enter__(),
    ):
        with pytest.raises(OutputError, match=inside):
            claim()
    with pytest.raises(OutputError, match=rf"lies inside {analysis / 'trace'}, moelab's trace"):  # the nearest
        publish(analysis / "trace" / "deeper")
    assert tree_digest(tmp_path) == before
    outer = tmp_path / "scratch"
    proc = subprocess.Popen([sys.executable, "-c", CLAIM, str(outer)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(OutputError, match=rf"lies inside {outer}, which another moelab process is writing now \(pid {proc.pid}"):
            publish(outer / "mine")
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and (outer / "inner" / "a.txt").is_file()
    with pytest.raises(OutputError, match="lies inside"):
        publish(outer / "inner", overwrite=True)


def test_trace_refuses_to_replace_an_analysis_s_own_trace(tmp_path, monkeypatch, capsys):
    analysis = tmp_path / "analysis"
    with output_dir(analysis, "routing analysis", entries=["trace"]):
        publish(analysis / "trace", "trace")
    code, output = run_cli(monkeypatch, capsys, "trace", "--out", str(analysis / "trace"), "--overwrite")
    assert code == 2 and f"lies inside {analysis}, moelab's routing analysis" in output
    assert (analysis / "trace" / "a.txt").is_file()


def test_the_same_process_cannot_claim_one_output_twice(tmp_path):
    with output_dir(tmp_path / "a", "analysis", entries=["report.json"]):
        with pytest.raises(OutputInUseError):
            with output_dir(tmp_path / "a", "analysis", entries=["report.json"]):
                pass


def test_a_killed_run_leaves_nothing_the_next_run_does_not_clean(tmp_path):
    out = tmp_path / "out"
    proc = hold(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert any(".moelab-staging-" in name for name in hidden(tmp_path)), "the kill left a staging directory"
    publish(out)  # the lock died with its process; the staging directory is removed
    assert hidden(tmp_path) == [] and sorted(os.listdir(out)) == [MARKER, "a.txt"]


def test_an_output_moved_aside_for_a_replacement_is_put_back(tmp_path):
    """A kill between moving the old output aside and moving the new one in."""
    out = publish(tmp_path / "out", files={"a.txt": "old"})
    os.rename(out, tmp_path / ".out.moelab-old-1234abcd")
    staged = StagedOutput(out, "thing", overwrite=True)
    staged.open()
    assert (out / "a.txt").read_text() == "old", "the previous output is back before anything else"
    staged.abort()
    assert (out / "a.txt").read_text() == "old" and hidden(tmp_path) == []


def test_removed_outputs_vanish_at_once_and_half_deleted_ones_are_never_listed(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        publish(checkpoints / f"step-{step:06d}", "training checkpoint")
    (checkpoints / "step-000006").mkdir()  # no marker: not written (completely) by moelab
    os.rename(checkpoints / "step-000004", checkpoints / ".step-000004.moelab-trash-1a2b")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002"]
    with pytest.raises(OutputError, match="is not a moelab trace"):
        remove_output(checkpoints / "step-000002", "trace")
    remove_output(checkpoints / "step-000002", "training checkpoint")
    assert list_checkpoints(tmp_path / "run") == []



def test_an_interrupted_removal_leaves_no_half_deleted_output_in_view(tmp_path, monkeypatch):
    out = publish(tmp_path / "step-000002", "training checkpoint")
    monkeypatch.setattr(io.shutil, "rmtree", lambda path, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        remove_output(out, "training checkpoint")
    assert not out.exists() and [name.split("-trash-")[0] for name in hidden(tmp_path)] == [".step-000002.moelab"]
    monkeypatch.undo()
    publish(out, "training checkpoint")  # the next run into it removes the rest
    assert hidden(tmp_path) == []


def test_saving_a_checkpoint_keeps_the_newest_by_step_number(tmp_path):
    """keep=2 leaves the two highest steps, compared as numbers (by name step-1000000 comes first)."""
    from moelab.train.checkpoint import latest_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.from_dict(dict(TINY_RUN["model"], n_layers=1)))
    for step in (999_998, 999_999, 1_000_000):
        save_checkpoint(tmp_path, step, model, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-999999", "step-1000000"]
    assert latest_checkpoint(tmp_path).name == "step-1000000"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1000000", "step-999999"]



def test_a_resumed_staged_output_takes_over_the_newest_staging_of_its_own_output(tmp_path):
    """A resumable job continues from the work its last killed run left, never another output's."""
    for age, name in enumerate((".other.moelab-staging-3", ".out.moelab-staging-2", ".out.moelab-staging-1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text(name)
        os.utime(tmp_path / name, (1_000_000 - age, 1_000_000 - age))
    (tmp_path / ".out.moelab-staging-4").write_text("not a directory")
    with StagedOutput(tmp_path / "out", "thing", resume=True) as staging:
        assert staging.name == ".out.moelab-staging-2"
    assert (tmp_path / "out" / "a.txt").read_text() == ".out.moelab-staging-2"
    assert hidden(tmp_path) == [".other.moelab-staging-3"]
    with pytest.raises(RuntimeError), StagedOutput(tmp_path / "new", "thing", resume=True):
        raise RuntimeError("failed before writing anything")
    assert hidden(tmp_path) == [".other.moelab-staging-3"], "an empty staging directory is not kept"


def test_a_run_cleans_only_its_own_leftovers_and_never_a_live_runs(tmp_path):
    (tmp_path / ".other.moelab-staging-1").mkdir()  # another output's, cleaned by a run into it
    publish(tmp_path / "out")
    assert (tmp_path / ".other.moelab-staging-1").is_dir()
    with StagedOutput(tmp_path / "ckpt", "thing") as staging:
        (staging / "a.txt").write_text("a")
        clean_leftovers(tmp_path, lambda name: True)
        assert staging.is_dir(), "the staging directory of a run that holds its lock stays"


def test_a_lock_file_replaced_before_it_was_locked_is_locked_again(tmp_path, monkeypatch):
    """The previous holder removes its lock file on release; a lock taken on the removed file locks nothing."""
    real, lock = io.fcntl.flock, tmp_path / ".out.moelab-lock"
    raced = []

    def racing_flock(fd, op):
        if not raced:
            raced.append(lock.unlink())
            lock.touch()
        return real(fd, op)

    monkeypatch.setattr(io.fcntl, "flock", racing_flock)
    with output_dir(tmp_path / "out", "thing", entries=[]):
        with pytest.raises(OutputInUseError):
            with output_dir(tmp_path / "out", "thing", entries=[]):
                pass


def test_a_new_output_left_beside_its_old_one_by_a_kill_stays(tmp_path):
    """A kill after the new output moved in, before the old one was deleted: the old one goes."""
    out = publish(tmp_path / "out", files={"a.txt": "new"})
    old = publish(tmp_path / ".out.moelab-old-1234abcd", files={"a.txt": "old"})
    publish(out, files={"a.txt": "newer"}, overwrite=True)
    assert (out / "a.txt").read_text() == "newer" and not old.exists() and hidden(tmp_path) == []


def test_remove_output_refuses_an_output_holding_a_users_file(tmp_path):
    out = publish(tmp_path / "step-000002", "training checkpoint")
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(OutputError, match="notes.txt was not written by moelab"):
        remove_output(out, "training checkpoint")
    assert (out / "notes.txt").read_text() == "the user's" and (out / "a.txt").is_file()


# ----------------------------------------------------------------------------- side files


def test_links_out_of_a_checkpoint_are_copied_as_links_never_by_content(tmp_path):
    secret = tmp_path / "home" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("private")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "notes.txt").symlink_to(secret)
    (ckpt / "inside.json").symlink_to(ckpt / "tokenizer.json")
    out = tmp_path / "out"
    out.mkdir()
    note = copy_side_file(ckpt / "notes.txt", out / "notes.txt", ckpt)
    assert "copied as a link, not its content" in note
    assert (out / "notes.txt").is_symlink() and os.readlink(out / "notes.txt") == str(secret)
    assert copy_side_file(ckpt / "inside.json", out / "inside.json", ckpt) is None
    assert not (out / "inside.json").is_symlink() and (out / "inside.json").read_text() == "{}"


def test_a_link_loop_in_a_checkpoint_is_not_followed(tmp_path):
    """`sub/loop -> ..` (and `loop -> .`) would copy the checkpoint into itself level after level
    until the path is too long; they are left out with a note, once."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "sub" / "notes.txt").write_text("notes")
    (ckpt / "sub" / "loop").symlink_to("..")
    (ckpt / "loop").symlink_to(".")
    out = tmp_path / "out"
    out.mkdir()
    note = copy_side_file(ckpt / "sub", out / "sub", ckpt)
    assert "is a link back to" in note and "not followed" in note
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["sub", "sub/notes.txt"]
    assert "not followed" in copy_side_file(ckpt / "loop", out / "loop", ckpt)
    assert not (out / "loop").exists()


def test_skip_leaves_files_behind_at_any_depth_but_never_a_directory(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "onnx").mkdir(parents=True)
    (ckpt / "onnx" / "model.onnx").write_text("weights")
    (ckpt / "docs.onnx").mkdir()
    (ckpt / "docs.onnx" / "README.md").write_text("notes")
    skip = lambda path: path.suffix == ".onnx"  # noqa: E731
    for name in ("onnx", "docs.onnx"):
        assert copy_side_file(ckpt / name, tmp_path / name, ckpt, skip) is None
    assert not (tmp_path / "onnx").exists(), "a directory the skipped files leave empty is not made"
    assert (tmp_path / "docs.onnx" / "README.md").read_text() == "notes"


def test_hugging_face_cache_links_count_as_the_checkpoints_own(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text('{"tokenizer": 1}')
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to("../../blobs/abc123")
    assert copy_side_file(snapshot / "tokenizer.json", tmp_path / "tokenizer.json", snapshot) is None
    assert (tmp_path / "tokenizer.json").read_text() == '{"tokenizer": 1}'


def test_the_writer_does_not_copy_linked_side_files_by_content(tmp_path):
    source = tmp_path / "src"
    build("mixtral").save_pretrained(source)
    (tmp_path / "private").write_text("private")
    (source / "extra.txt").symlink_to(tmp_path / "private")
    with pytest.warns(UserWarning, match="extra.txt is a link to .*copied as a link"):
        drop_experts(source, tmp_path / "out", [0], quiet=True, reload=False)
    assert (tmp_path / "out" / "extra.txt").is_symlink()


# ----------------------------------------------------------------------------- the four data-loss cases


@pytest.fixture
def moe_dir(tmp_path):
    cfg = ModelConfig(
        vocab_size=8192, dim=32, n_layers=2, n_heads=4, max_seq_len=64,
        moe=MoEConfig(dim=32, num_experts=4, hidden_dim=32, top_k=2),
    )  # fmt: skip
    return save_pretrained(MoETransformer(cfg), tmp_path / "model")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["moelab", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, " ".join((captured.err + captured.out).split())


def test_case1_writing_above_the_source_never_deletes_it(tmp_path):
    source = tmp_path / "A" / "ckpt"
    build("mixtral").save_pretrained(source)
    before = tree_digest(tmp_path / "A")
    for out in (tmp_path / "A", tmp_path):
        with pytest.raises(OutputError, match="contains the input"):
            drop_experts(source, out, [0], overwrite=True, quiet=True)
    assert tree_digest(tmp_path / "A") == before


def test_case1_the_demo_never_replaces_its_own_model(tmp_path, moe_dir, monkeypatch, capsys):
    from moelab.demo import run_demo

    run_demo(tmp_path / "A", model_dir=moe_dir, prune=2, eval_tokens=32, trace_tokens=200, calib_tokens=256, quiet=True)
    model = tmp_path / "A" / "reap-2e"
    before = tree_digest(tmp_path / "A")
    code, output = run_cli(
        monkeypatch,
        capsys,
        "demo",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "A"),
        "--prune",
        "0",
        "--overwrite",
    )
    assert code == 2 and "contains the input" in output
    assert tree_digest(tmp_path / "A") == before


def test_case3_trace_never_replaces_a_users_directory_with_a_manifest(tmp_path, moe_dir, monkeypatch, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    before = tree_digest(out)
    options = TraceOptions(max_tokens=200, seq_len=32)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="mine exists and was not written by moelab"):
            trace_from_files(moe_dir, out, options=options, overwrite=overwrite, quiet=True)
    code, output = run_cli(monkeypatch, capsys, "analyze", str(moe_dir), "--out", str(out), "--overwrite")
    assert code == 2 and "was not written by moelab" in output
    assert tree_digest(out) == before
    trace_from_files(moe_dir, tmp_path / "trace", options=options, quiet=True)
    with pytest.raises(OutputError, match="already holds moelab's routing trace"):
        trace_from_files(moe_dir, tmp_path / "trace", options=options, quiet=True)
    trace_from_files(moe_dir, tmp_path / "trace", options=options, overwrite=True, quiet=True)


TINY_RUN = {
    "model": {
        "vocab_size": 8192, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
        "moe": {"num_experts": 4, "hidden_dim": 32, "top_k": 2},
    },
    "train": {
        "steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_tokens": 64, "log_every": 1,
        "checkpoint_every": 1, "domains": ["code"], "warmup_steps": 1,
    },
}  # fmt: skip


def test_case4_train_never_touches_a_directory_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events").write_text("someone else's")
    (out / "log.jsonl").write_text('{"mine": 1}\n')
    (out / "config.yaml").write_text("mine: true\n")
    before = tree_digest(out)
    run = RunConfig.from_dict(TINY_RUN)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputError, match="exp exists and was not written by moelab"):
            train(run, out, quiet=True, **flags)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(TINY_RUN))
    code, output = run_cli(
        monkeypatch, capsys, "train", str(config), "--out", str(out), "--overwrite", "--quiet"
    )
    assert code == 2 and "was not written by moelab" in output
    assert tree_digest(out) == before


def test_train_overwrite_starts_again_and_resume_cleans_what_a_kill_left(tmp_path):
    run = RunConfig.from_dict(TINY_RUN)
    out = tmp_path / "run"
    first = train(run, out, quiet=True)
    (out / "checkpoints" / ".step-000003.moelab-staging-dead").mkdir()  # a kill while checkpointing
    (out / "checkpoints" / ".notes.moelab-tmp-1a2b").write_text("the user's, named like a leftover")
    (out / "results.json").unlink()
    resumed = train(run, out, resume=True, quiet=True)
    assert hidden(out / "checkpoints") == [".notes.moelab-tmp-1a2b"] and resumed.eval_loss == first.eval_loss
    (out / "checkpoints" / ".notes.moelab-tmp-1a2b").unlink()
    again = train(run, out, overwrite=True, quiet=True)
    assert again.eval_loss == first.eval_loss
    assert [p.name for p in list_checkpoints(out)] == ["step-000001", "step-000002"]


def test_train_refuses_an_output_that_holds_its_run_file(tmp_path):
    out = tmp_path / "run"
    train(RunConfig.from_dict(TINY_RUN), out, quiet=True)
    config = out / "config.yaml"
    with pytest.raises(OutputError, match="contains the input"):
        train(RunConfig.load(config), out, overwrite=True, inputs=[config], quiet=True)
    assert config.is_file()


def test_two_analyses_into_one_directory_never_mix(tmp_path, moe_dir):
    from moelab.analyze import analyze

    options = TraceOptions(max_tokens=200, seq_len=32)
    with output_dir(
        tmp_path / "analysis", "routing analysis", entries=["report.json"]
    ):  # a first run, still busy
        with pytest.raises(OutputInUseError, match="analysis is in use by another moelab process"):
            analyze(moe_dir, tmp_path / "analysis", options=options, quiet=True)
    analyze(moe_dir, tmp_path / "analysis", options=options, domains=["code"], overwrite=True, quiet=True)
    with pytest.raises(OutputError, match="already holds moelab's routing analysis"):
        analyze(moe_dir, tmp_path / "analysis", options=options, quiet=True)
    analyze(moe_dir, tmp_path / "analysis", options=options, domains=["german"], overwrite=True, quiet=True)
    report = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert list(report["domains"]) == ["german"]


def test_a_failed_analysis_overwrite_keeps_the_old_one_and_plots_are_guarded(tmp_path, moe_dir):
    """The replacement is built beside the old analysis, which stays whole when it fails; a file
    the user put among the plots stops --overwrite."""
    from moelab.analyze import analyze

    options, out = TraceOptions(max_tokens=200, seq_len=32), tmp_path / "analysis"
    analyze(moe_dir, out, options=options, quiet=True)
    before = tree_digest(out)
    with pytest.raises(ValueError, match="nonexistent"):
        analyze(moe_dir, out, data=tmp_path / "nonexistent.txt", options=options, overwrite=True, quiet=True)
    assert tree_digest(out) == before and hidden(tmp_path) == []
    (out / "plots" / "load_annotated.png").write_bytes(b"the user's")
    with pytest.raises(OutputError, match="load_annotated.png"):
        analyze(moe_dir, out, options=options, overwrite=True, quiet=True)
    assert (out / "plots" / "load_annotated.png").read_bytes() == b"the user's"
    with pytest.raises(ValueError, match="is a trace: .* do not apply"):
        analyze(out / "trace", tmp_path / "again", domains=["code"], quiet=True)


# ----------------------------------------------------------------------------- the CLI


WRITING_COMMANDS = (
    ("demo",),
    ("train",),
    ("compare",),
    ("trace",),
    ("analyze",),
    ("export",),
    ("bench", "layer"),
)


@pytest.mark.parametrize("command", WRITING_COMMANDS, ids=" ".join)
def test_every_writing_command_has_overwrite(command):
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--overwrite" in result.output


def test_bench_json_is_not_replaced_without_overwrite(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bench.json"
    path.write_text('{"mine": true}')
    for flags in ([], ["--overwrite"]):
        code, output = run_cli(
            monkeypatch, capsys, "bench", "layer", "--json", str(path), "--tokens", "8", *flags
        )
        assert code == 2 and str(path) in output
    assert path.read_text() == '{"mine": true}'



@pytest.mark.parametrize("flag, theirs", [("--json", "a user's"), ("--json", "another run's"), ("--plot", "a user's")])
def test_a_result_file_that_appears_while_the_bench_runs_is_kept(tmp_path, monkeypatch, capsys, flag, theirs):
    """--json and --plot are checked before the run and again when they are written: a file that
    appeared there meanwhile (a user's, or a result of another run into the same path) stays."""
    from moelab.bench import layer as bench

    path = tmp_path / ("r.json" if flag == "--json" else "r.png")
    text = '{"mine": true}' if theirs == "a user's" else json.dumps({"format": bench.JSON_FORMAT})

    def fake_run(options, progress=None):
        path.write_text(text)
        return {"format": bench.JSON_FORMAT, "results": [], "skewed": [], "memory": []}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "render_table", lambda doc: "table")
    monkeypatch.setattr("moelab.bench.figures.png_of", lambda doc: b"png")
    code, output = run_cli(monkeypatch, capsys, "bench", "layer", flag, str(path), "--quick")
    assert code == 2 and f"{path}" in output and "appeared while this command ran" in output
    assert path.read_text() == text and hidden(tmp_path) == []


def test_bench_compress_claims_its_work_directory_and_its_generated_checkpoints_go(tmp_path, monkeypatch, capsys):
    """`bench compress --work W` (gigabytes of generated checkpoints, measured here by a stand-in):
    W is claimed as moelab's scratch, its checkpoints go however the run ends unless --keep, and the
    JSON is never written inside W (clearing W would take it along)."""
    from moelab.bench import compress as bench

    def fake_run(options, work, progress=None):
        (work / "source").mkdir()
        (work / "source" / "w.bin").write_text("weights")
        if options.tokens == 4096:
            raise RuntimeError("the compression job failed")
        return {"format": bench.JSON_FORMAT}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "render", lambda doc: "table")
    work, path = tmp_path / "work", tmp_path / "bench.json"

    def bench_compress(*flags: str) -> None:
        monkeypatch.setattr("sys.argv", ["moelab", "bench", "compress", "--work", str(work), *flags])
        cli.main()

    code, output = run_cli(monkeypatch, capsys, "bench", "compress", "--work", str(work), "--json", str(work / "r.json"))
    assert code == 2 and "lies inside --work" in output and not work.exists()
    bench_compress()
    assert os.listdir(work) == [MARKER] and hidden(tmp_path) == []
    code, output = run_cli(monkeypatch, capsys, "bench", "compress", "--work", str(work), "--keep")
    assert code == 2 and "already holds moelab's benchmark scratch; pass --overwrite" in output
    bench_compress("--keep", "--overwrite", "--json", str(path))
    assert (work / "source" / "w.bin").is_file() and json.loads(path.read_text())["format"] == bench.JSON_FORMAT
    (tmp_path / "notes.json").write_text("{}")  # a user's file: --json refuses it before --work is touched
    code, output = run_cli(monkeypatch, capsys, "bench", "compress", "--work", str(work), "--overwrite", "--json",
                           str(tmp_path / "notes.json"))  # fmt: skip
    assert code == 2 and "was not written by moelab" in output and (work / "source" / "w.bin").is_file()
    with pytest.raises(RuntimeError, match="failed"):
        bench_compress("--overwrite", "--tokens", "4096")
    assert os.listdir(work) == [MARKER], "a failed run's checkpoints go too"


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        from moelab.io import output_dir
        with output_dir(sys.argv[1], "thing", entries=[]):
            os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")], env={**os.environ, "PYTHONPATH": SRC}
    )
    assert proc.returncode == -9 and (tmp_path / ".out.moelab-lock").exists()
    with output_dir(tmp_path / "out", "thing", entries=[], resume=True) as claimed:
        assert claimed.resumed
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/moelab-abs-x.safetensors", "sub/../../x.safetensors"])
def test_case2_index_shard_names_never_leave_the_checkpoint(tmp_path, shard):
    source = tmp_path / "A" / "ckpt"
    build("mixtral").save_pretrained(source, max_shard_size="20KB")
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (shard if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    before = tree_digest(tmp_path)
    with pytest.raises(ValueError, match="not a file inside"):
        drop_experts(source, tmp_path / "out", [0], quiet=True)
    assert tree_digest(tmp_path) == before and not Path("/tmp/moelab-abs-x.safetensors").exists()


def test_a_hugging_face_cache_snapshot_with_linked_shards_opens_and_writes(tmp_path):
    """The hub cache keeps files in blobs/ and links them from snapshots/<rev>/."""
    plain = tmp_path / "plain"
    build("mixtral").save_pretrained(plain, max_shard_size="20KB")
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(plain.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.name.encode()).hexdigest()
        os.rename(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    drop_experts(snapshot, tmp_path / "out", [0], quiet=True)
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def test_train_refuses_to_lose_a_run(tmp_path, monkeypatch, capsys):
    """What a finished or interrupted run holds survives every refusal: a user's files among the
    checkpoints and TensorBoard events stop --overwrite; a checkpoint this moelab cannot read stops
    --resume (which used to start again from step 0, deleting it); a new config that cannot train
    is refused before the old run is cleared; --resume into a new directory creates nothing."""
    run = RunConfig.from_dict(TINY_RUN)
    out = tmp_path / "run"
    train(run, out, quiet=True)
    for extra in (out / "checkpoints" / "my_notes.txt", out / "tensorboard" / "other_run.tfevents"):
        extra.write_text("the user's")
        before = tree_digest(out)
        with pytest.raises(OutputError, match=extra.name):
            train(run, out, overwrite=True, quiet=True)
        assert tree_digest(out) == before
        extra.unlink()
    before = tree_digest(out)
    tiny_vocab = dict(TINY_RUN, model=dict(TINY_RUN["model"], vocab_size=128))
    with pytest.raises(ValueError, match=r"model.vocab_size \(128\) does not cover the training corpus"):
        train(RunConfig.from_dict(tiny_vocab), out, overwrite=True, quiet=True)
    assert tree_digest(out) == before
    (out / "results.json").unlink()  # as if killed before its end
    marker = out / "checkpoints" / "step-000002" / ".moelab-output.json"
    marker.write_text(marker.read_text().replace("moelab-output/1", "moelab-output/9"))
    before = tree_digest(out)
    with pytest.raises(ValueError, match="step-000002 are not checkpoints this moelab can read"):
        train(run, out, resume=True, quiet=True)
    assert tree_digest(out) == before
    with pytest.raises(ValueError, match="holds no training run; start the run without --resume"):
        train(run, tmp_path / "new", resume=True, quiet=True)
    assert not (tmp_path / "new").exists()


def test_a_diverged_run_stops_and_a_setup_failure_leaves_no_claimed_directory(tmp_path, monkeypatch):
    import moelab.train.trainer as trainer

    huge = dict(TINY_RUN, model=dict(TINY_RUN["model"], moe=None), train=dict(TINY_RUN["train"], lr=1e30))
    with pytest.raises(ValueError, match="the training loss is (nan|inf): the run diverged"):
        train(RunConfig.from_dict(huge), tmp_path / "diverged", quiet=True)
    monkeypatch.setattr(trainer, "_prepare_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(RunConfig.from_dict(TINY_RUN), tmp_path / "stopped", quiet=True)
    assert not (tmp_path / "stopped").exists()


def test_patterns_name_what_a_step_by_step_output_writes_in_its_directories(tmp_path):
    """compress-bench's cells/: a directory per cell holding cell.json and a model; a user's file
    there, or among a cell's files, stops --overwrite; a resumed run keeps the staging directories
    its nested jobs take over."""
    patterns = {"cells": r"[\w.+@-]+/", "cells/*": r"cell\.json|model/"}
    out, entries = tmp_path / "bench", ["cells", "calibration"]
    with output_dir(out, "bench", entries=entries, patterns=patterns) as claimed:
        (claimed.path / "cells" / "reap-25").mkdir(parents=True)
        (claimed.path / "cells" / "reap-25" / "cell.json").write_text("{}")
        (claimed.path / ".calibration.moelab-staging-1a2b").mkdir()  # a killed calibration's work
    with output_dir(out, "bench", entries=entries, resume=True, patterns=patterns):
        assert (out / ".calibration.moelab-staging-1a2b").is_dir()
    for extra in (out / "cells" / "notes.md", out / "cells" / "reap-25" / "notes.md"):
        extra.write_text("the user's")
        with pytest.raises(OutputError, match="notes.md"):
            with output_dir(out, "bench", entries=entries, overwrite=True, patterns=patterns):
                pass
        assert extra.read_text() == "the user's"
        extra.unlink()
    with output_dir(out, "bench", entries=entries, resume=True, overwrite=True, patterns=patterns):
        assert not (out / "cells").exists() and hidden(out) == []  # starting again: no staging to take over


@pytest.mark.parametrize("mine", ["checkpoints/step-000999/mine.txt", "cells/mine/model/weights.bin"])
def test_a_directory_named_as_moelab_names_its_outputs_but_without_a_marker_is_not_moelabs(tmp_path, mine):
    """checkpoints/step-N/ and cells/*/model/ are outputs moelab writes whole, with a marker: a
    user's directory of such a name is not moelab's, and --overwrite neither deletes nor enters it."""
    patterns = {"checkpoints": r"step-\d+/", "cells": r"[\w.+@-]+/", "cells/*": r"cell\.json|model/"}
    out = tmp_path / "run"
    with output_dir(out, "run", entries=["checkpoints", "cells"], patterns=patterns):
        publish(out / "checkpoints" / "step-000001", "checkpoint")
    (out / mine).parent.mkdir(parents=True)
    (out / mine).write_text("the user's")
    with pytest.raises(OutputError, match=f"{Path(mine).name} was not written by moelab"):
        with output_dir(out, "run", entries=["checkpoints", "cells"], overwrite=True, patterns=patterns):
            pass
    assert (out / mine).read_text() == "the user's" and (out / "checkpoints" / "step-000001" / "a.txt").is_file()


def test_a_named_entry_is_moelabs_whole_and_a_replaced_outputs_leftovers_go(tmp_path):
    """A directory moelab writes as a named entry needs no marker of its own (`bench compress
    --work`'s generated source); a killed run's leftovers of entries the replacement no longer
    writes, and of the marker itself, are cleaned, not left to stop the next --overwrite."""
    out = tmp_path / "work"
    with output_dir(out, "scratch", entries=["source", "pruned"]):
        (out / "source").mkdir()
        (out / "source" / "config.json").write_text("{}")
        (out / ".pruned.moelab-staging-1a2b").mkdir()  # a run killed while it wrote pruned/
        for leftover in (".pruned.moelab-lock", "..moelab-output.json.moelab-tmp-ab_1"):
            (out / leftover).write_text("a kill")
    for _ in range(2):
        with output_dir(out, "scratch", entries=["source"], overwrite=True):
            assert os.listdir(out) == [MARKER]
    with output_dir(out, "scratch", entries=["log"], resume=True):
        (out / "..moelab-output.json.moelab-tmp-cd_2").write_text("a kill while the marker was rewritten")
    with output_dir(out, "scratch", entries=["log"], resume=True):
        assert hidden(out) == []


def test_a_users_file_named_like_moelabs_leftovers_is_never_removed(tmp_path):
    """Only a hidden `.NAME.moelab-*` entry for a NAME moelab writes there, with the random suffix
    moelab gives it (a lock has none), is a killed run's leftover."""
    out = publish(tmp_path / "out")
    for name in (".mine.moelab-tmp", ".mine.moelab-tmp-1a2b", ".a.txt.moelab-staging"):
        (out / name).write_text("the user's")
        with pytest.raises(OutputError, match=f"{name} was not written by moelab"):
            publish(out, overwrite=True)
        (out / name).unlink()
    (out / ".a.txt.moelab-tmp-1a2b").write_text("a killed write")
    publish(out, overwrite=True)  # a leftover of a file moelab wrote there goes with the old output
    run = tmp_path / "run"
    with output_dir(run, "run", entries=["log"]):
        (run / ".mine.moelab-tmp-1a2b").write_text("the user's")
        (run / ".log.moelab-tmp-1a2b").write_text("a killed write")
    with output_dir(run, "run", entries=["log"], resume=True):
        assert hidden(run) == [".mine.moelab-tmp-1a2b"], "a resumed run cleans its own leftovers only"


def test_an_output_that_is_a_link_is_refused(tmp_path):
    """moelab writes where it is told, never through a link (its parents may be links)."""
    (tmp_path / "elsewhere").mkdir()
    for target in (tmp_path / "elsewhere", tmp_path / "nowhere" / "deep"):
        link = tmp_path / "link"
        link.symlink_to(target)
        for claim in (
            lambda: publish(link),
            lambda: output_dir(link, "thing", entries=[]).__enter__(),
            lambda: check_output_dir(link, "thing"),
            lambda: check_output_file(link, overwrite=True, is_own=lambda p: True),
        ):
            with pytest.raises(OutputError, match="is a link"):
                claim()
        link.unlink()
    assert os.listdir(tmp_path / "elsewhere") == [] and not (tmp_path / "nowhere").exists()
    (tmp_path / "parent").symlink_to(tmp_path / "elsewhere")
    assert (publish(tmp_path / "parent" / "out") / "a.txt").is_file()


def test_resume_names_what_changed_and_what_a_state_file_lacks(tmp_path):
    """A changed nested field is named as such; a state file without the loop's state, or with
    pickled objects, is refused in one line (torch's advice to unpickle anyway is not passed on)."""
    run = RunConfig.from_dict(TINY_RUN)
    out = tmp_path / "run"
    train(run, out, quiet=True)
    (out / "results.json").unlink()
    other = dict(TINY_RUN, model=dict(TINY_RUN["model"], moe=dict(TINY_RUN["model"]["moe"], top_k=1)))
    with pytest.raises(ValueError, match=r"model.moe.top_k: run 2, now 1\. Use the same config"):
        train(RunConfig.from_dict(other), out, resume=True, quiet=True)
    state = out / "checkpoints" / "step-000002" / "train_state.pt"
    saved = torch.load(state, weights_only=True)
    del saved["measured_experts"]
    torch.save(saved, state)
    with pytest.raises(ValueError, match=r"train_state.pt lacks \['measured_experts'\]"):
        train(run, out, resume=True, quiet=True)
    del saved["optimizer"]
    saved["measured_experts"] = {}
    torch.save(saved, state)
    with pytest.raises(ValueError, match=r"train_state.pt lacks \['optimizer'\]"):
        train(run, out, resume=True, quiet=True)
    torch.save({"step": 2}, state)
    with pytest.raises(ValueError, match=r"train_state.pt lacks \['scheduler', 'loader'"):
        train(run, out, resume=True, quiet=True)
    torch.save({"step": 2, "thing": OutputError("an object")}, state)
    with pytest.raises(ValueError, match="holds pickled objects other than tensors and plain data") as refused:
        train(run, out, resume=True, quiet=True)
    assert "weights_only=False" not in str(refused.value)
