"""The JSON Lines record file: one full record per probe, alert or failure.

Every line is appended, flushed and fsynced before the call returns, so a crash loses
at most the line being written; `read_records` skips such a partial last line.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from redundancy_monitor.alerts import Alert
from redundancy_monitor.errors import RedundancyMonitorError
from redundancy_monitor.sinks import ProbeRecord, Sink


class RecordFileError(RedundancyMonitorError, ValueError):
    """A record file has a malformed line that is not the last one."""


class JsonlSink(Sink):
    """Appends records to `path` (created with its parent folders on first write)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None

    def _append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_last_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        line = json.dumps(record, allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def write_probe(self, record: ProbeRecord) -> None:
        self._append(record.to_dict())

    def write_alert(self, alert: Alert) -> None:
        self._append({"type": "alert", **alert.to_dict()})

    def write_failure(self, step: int, error: str) -> None:
        self._append({"type": "failure", "step": step, "error": error})

    def write_resume(self, step: int) -> None:
        self._append({"type": "resume", "step": step})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line a crash left unfinished, so the next record starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
    warnings.warn(f"{path}: removed a partial last line left by an interrupted run", stacklevel=3)


def read_records(path: str | os.PathLike, resolve_resumes: bool = True) -> list[dict[str, Any]]:
    """Read a record file written by `JsonlSink`.

    Args:
        path: the ``.jsonl`` file.
        resolve_resumes: at each ``resume`` marker (written when a run restarts from a
            checkpoint at step s), drop the earlier records with a step after s: they came
            from the part of the interrupted run that the checkpoint does not contain.
            The markers themselves are dropped too.

    Raises:
        RecordFileError: a line other than the last is not valid JSON.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                warnings.warn(
                    f"{path}: skipping a partial last line (line {n}); the run was probably "
                    "interrupted while writing it",
                    stacklevel=2,
                )
                break
            raise RecordFileError(
                f"{path}: line {n} is not valid JSON; the file was edited or corrupted. "
                "Delete that line to read the rest."
            ) from None
        if resolve_resumes and record.get("type") == "resume":
            records = [r for r in records if r.get("step", -1) <= record["step"]]
            continue
        records.append(record)
    return records
