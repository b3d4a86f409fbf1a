"""The JSON Lines record file: one full record per probe, alert or failure.

Every line is appended and fsynced before the call returns, so a crash loses at most
the line being written; `read_records` skips such a partial last line (with a warning)
and the next writer cuts it before appending (a complete last record that only lacks its
newline is kept). A write that fails (disk full, folder removed) is retried with the next
record, so a passing fault loses nothing. The file is never written through a symbolic
link.

Each start of a monitor writes a ``start`` marker: the records that follow supersede the
earlier attempts' records from its step on, so a run restarted (from a checkpoint, or from
scratch after dying before its first one) reads back as one trajectory.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from redundancy_monitor.errors import RecordFileError, RecordFileLost, UnsafePathError
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.sinks import Sink


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
        _refuse_symlink(self.path)
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
        _refuse_symlink(self.path)
        _repair_last_line(self.path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW  # no race with a new link
        self._fd = os.open(self.path, flags, 0o644)

    def _file_is_gone(self) -> bool:
        """True when the open file is no longer the one at `path` (removed or replaced)."""
        assert self._fd is not None  # asked while the file is open
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
        assert self._fd is not None  # _open sets it or raises
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
        self._append(ProbeRecord(step, error=error).to_dict())

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


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise UnsafePathError(
            f"the record file {path} is a symbolic link (to {os.readlink(path)}); records are "
            "never written through a link. Pass the real file's path as jsonl_path, or remove "
            "the link"
        )


def _repair_last_line(path: Path) -> None:
    """Make the file end with a newline before appending: an unfinished line a crash left
    behind is cut; a complete record that only lacks its newline is kept and finished."""
    try:
        fd = os.open(path, os.O_RDWR | _NOFOLLOW)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        if _parse_line(data[start:])[0] is not None:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            return
        f.truncate(start)
    warnings.warn(f"{path}: removed a partial last line left by an interrupted run", stacklevel=3)


def _parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The record on one line, or None and why the line is not one."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except (json.JSONDecodeError, RecursionError):
        return None, "is not valid JSON"
    if not isinstance(record, dict):
        return None, f"holds a JSON {type(record).__name__}, not a record object"
    step = record.get("step")
    if "step" in record and (not isinstance(step, int) or isinstance(step, bool)):
        return None, f"has a step that is not an integer ({step!r})"
    if not isinstance(record.get("type", ""), str):
        return None, "has a record type that is not a string"
    return record, ""


def read_records(path: str | os.PathLike, resolve_resumes: bool = True) -> list[dict[str, Any]]:
    """Read a record file written by `JsonlSink`.

    Args:
        path: the ``.jsonl`` file.
        resolve_resumes: keep one trajectory per file. At each ``start`` marker (written
            when a monitor starts; its step is the first step that attempt covers) drop
            the earlier records from that step on: the new attempt redoes them. At each
            ``resume`` marker of older files (a restart from a checkpoint at step s) drop
            the earlier records after step s. The markers themselves are dropped too.

    Raises:
        RecordFileError: a line that is not a JSON record object (not UTF-8, not JSON,
            not an object, a step that is not an integer) before the last record. Such
            lines after the last record (a damaged tail, e.g. a line cut by a crash) are
            skipped with a warning.
    """
    return [record for _, record in read_numbered_records(path, resolve_resumes)]


def read_numbered_records(
    path: str | os.PathLike, resolve_resumes: bool = True
) -> list[tuple[int, dict[str, Any]]]:
    """`read_records` with each record's line number (1-based), for error messages."""
    lines = Path(path).read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    parsed = [(n, *_parse_line(raw)) for n, raw in enumerate(lines, start=1)]
    last_good = max((n for n, record, _ in parsed if record is not None), default=0)
    bad = [(n, why) for n, record, why in parsed if record is None]
    for n, why in bad:
        if n < last_good:
            raise RecordFileError(
                f"{path}: line {n} {why}; the file was edited or corrupted. Delete that line "
                "to read the rest."
            )
    if len(bad) == 1 and bad[0][0] == len(lines):
        warnings.warn(
            f"{path}: skipping a partial last line (line {len(lines)}); the run was probably "
            "interrupted while writing it",
            stacklevel=3,
        )
    elif bad:
        warnings.warn(
            f"{path}: skipping {len(bad)} damaged line(s) after the last record (lines "
            f"{bad[0][0]}-{bad[-1][0]}; line {bad[0][0]} {bad[0][1]})",
            stacklevel=3,
        )
    records: list[tuple[int, dict[str, Any]]] = []
    for n, record, _ in parsed:
        if record is None:
            continue
        kind = record.get("type")
        if resolve_resumes and kind in ("start", "resume") and "step" in record:
            first_redone = record["step"] + (1 if kind == "resume" else 0)
            records = [(m, r) for m, r in records if r.get("step", -1) < first_redone]
            continue
        records.append((n, record))
    return records
