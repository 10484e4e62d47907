"""Where a run's metrics go: one JSON object per line in `log.jsonl`, and TensorBoard.

On resume, `RunLog` drops every record past the checkpoint's step (from the JSONL file and, via
`purge_step`, from TensorBoard), so the logs of a resumed run read as if it never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from moelab.io import atomic_write_text

LOG_NAME = "log.jsonl"


class RunLog:
    """Append records `{"step": ..., "kind": "train" | "eval", ...}`; numbers also go to
    TensorBoard as `<kind>/<name>` scalars (nested dicts become `<kind>/<name>/<key>`)."""

    def __init__(self, out_dir: Path, resume_step: int | None = None):
        self.path = out_dir / LOG_NAME
        if resume_step is not None and self.path.exists():
            kept = [json.dumps(r) for r in _records(self.path.read_text()) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        self.file = open(self.path, "a")

    def write(self, step: int, kind: str, record: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, "kind": kind, **record}) + "\n")
        self.file.flush()
        for name, value in _scalars(record):
            self.writer.add_scalar(f"{kind}/{name}", value, step)

    def flush(self) -> None:
        """Write out what TensorBoard's background thread still holds (before a checkpoint: a run
        killed after it resumes past these records and would not write them again)."""
        self.writer.flush()

    def close(self) -> None:
        self.file.close()
        self.writer.close()


def _scalars(record: dict[str, Any], prefix: str = ""):
    for name, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{name}", value


def read_log(out_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's `log.jsonl`, in order."""
    path = Path(out_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {out_dir} a moelab training run?")
    return _records(path.read_text())


def _records(text: str) -> list[dict[str, Any]]:
    """The records of a log; a line torn by a killed process (only ever the last) is skipped."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
