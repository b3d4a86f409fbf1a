"""The JSON Lines record file: one full record per probe, alert or failure.

Every line is appended and fsynced before the call returns, so a crash loses at most
the line being written; `read_records` skips such a partial last line (with a warning)
and the next writer cuts it before appending. A write that fails (disk full, folder
removed) is retried with the next record, so a passing fault loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from redundancy_monitor.errors import RedundancyMonitorError
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.sinks import ProbeRecord, Sink


class RecordFileError(RedundancyMonitorError, ValueError):
    """A record file has a malformed line that is not the last one."""


class RecordFileLost(RedundancyMonitorError, OSError):
    """The record file disappeared (its folder was removed) while the run was writing it."""


class JsonlSink(Sink):
    """Appends records to `path` (created with its parent folders on first write).

    A record that cannot be written (disk full, folder gone, read-only) is kept in
    memory, in order, and written before the next record once writing works again; the
    call that failed raises, so the monitor counts and alerts it. A failed write never
    leaves a partial line behind (it is truncated away). Up to `max_pending` records are
    kept; older ones are then dropped and counted in `n_dropped`.
    """

    def __init__(self, path: str | os.PathLike, max_pending: int = 10_000):
        self.path = Path(path)
        self.max_pending = max_pending
        self._fd: int | None = None
        self._pending: deque[bytes] = deque()
        self.n_dropped = 0

    @property
    def n_pending(self) -> int:
        """Records waiting in memory because writing failed."""
        return len(self._pending)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _file_is_gone(self) -> bool:
        """True when the open file is no longer the one at `path` (removed or replaced)."""
        try:
            return os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return True

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _write_pending(self) -> None:
        lost = self._fd is not None and self._file_is_gone()
        if lost:
            self._close_fd()
        if self._fd is None:
            self._open()
        while self._pending:
            line = self._pending[0]
            size = os.fstat(self._fd).st_size
            try:
                _write_all(self._fd, line)
                os.fsync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):  # never leave half a line behind
                    os.ftruncate(self._fd, size)
                self._close_fd()
                raise
            self._pending.popleft()
        if lost:
            raise RecordFileLost(
                f"{self.path} was removed while the run was writing it; the records written "
                "before are gone with it, later ones go to a new file at the same path"
            )

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.n_dropped += 1
        self._pending.append(line.encode("utf-8"))
        self._write_pending()

    def write_probe(self, record: ProbeRecord) -> None:
        self._append(record.to_dict())

    def write_alert(self, alert: Alert) -> None:
        self._append({"type": "alert", **alert.to_dict()})

    def write_failure(self, step: int, error: str) -> None:
        self._append({"type": "failure", "step": step, "error": error})

    def write_resume(self, step: int) -> None:
        self._append({"type": "resume", "step": step})

    def write_marker(self, marker: dict) -> None:
        self._append(marker)

    def flush(self) -> None:
        """Retry records kept in memory after a failed write."""
        if self._pending:
            self._write_pending()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._close_fd()
        if self.n_dropped:
            raise RecordFileLost(
                f"{self.n_dropped} record(s) for {self.path} were dropped: writing failed "
                f"for longer than {self.max_pending} records"
            )


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be short, e.g. near a full disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
