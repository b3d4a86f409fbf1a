"""Reading back what the monitor (or `replay`) wrote into a run folder.

A run folder holds one JSON Lines record file (`redundancy.jsonl`, written by
`JsonlSink`) and, where `redundancy-monitor score` ran, a `result.json` with a removal
table. `load_run` turns them into typed objects that the report draws from. A
``new_baseline`` marker (the model, batch, pairs or protocols changed) starts a new
trajectory: probes are numbered by the trajectory they belong to. So does a probe of
another model (architecture or sizes, from its record's meta) in a file written
without such a marker (by a version that did not compare models).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from redundancy_monitor.errors import RunFolderError
from redundancy_monitor.files import RECORD_FILE
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.jsonl import RecordFileError, read_numbered_records
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.probing.result import describe_model

REMOVAL_FILES = ("result.json", "removal.json")


@dataclass
class Baseline:
    """A ``new_baseline`` marker: a new trajectory starts at `step` because of `reason`."""

    step: int
    reason: str


@dataclass
class RunRecords:
    """The records of one run, probes sorted by step.

    Attributes:
        source: the record file read.
        probes: one record per probed step (a step probed twice keeps its last record).
        alerts: every alert, in the order written.
        failures: every failed probe (records with an error).
        removal: a measured removal table (``rows``, ``verdicts``, ``base_perplexity``),
            or None when the run has none.
        removal_source: the file it came from.
        baselines: the new-baseline markers, in order.
        segment_of: the trajectory each probed step belongs to: 0, then +1 at each
            new-baseline marker (in the order written).
    """

    source: Path
    probes: list[ProbeRecord]
    alerts: list[Alert] = field(default_factory=list)
    failures: list[ProbeRecord] = field(default_factory=list)
    removal: dict[str, Any] | None = None
    removal_source: Path | None = None
    baselines: list[Baseline] = field(default_factory=list)
    segment_of: dict[int, int] = field(default_factory=dict)

    def segments(self) -> list[list[ProbeRecord]]:
        """The probes of each trajectory (separated by new baselines) that has any."""
        by_segment: dict[int, list[ProbeRecord]] = {}
        for p in self.probes:
            by_segment.setdefault(self.segment_of.get(p.step, 0), []).append(p)
        return [by_segment[k] for k in sorted(by_segment)]

    @property
    def current(self) -> list[ProbeRecord]:
        """The probes of the last trajectory: the one changes are measured within."""
        return self.segments()[-1]

    @property
    def first(self) -> ProbeRecord:
        """The first probe of the current trajectory."""
        return self.current[0]

    @property
    def last(self) -> ProbeRecord:
        return self.probes[-1]

    @property
    def steps(self) -> list[int]:
        return [p.step for p in self.probes]

    def trajectory(self, name: str) -> list[tuple[int, float | None]]:
        """``(step, value)`` of one summary scalar (a key of `ProbeSummary.scalars()`)."""
        return [
            (p.step, p.result.summary.scalars().get(name))
            for p in self.probes
            if p.result is not None  # every probe record holds its result
        ]

    def change_trajectory(
        self, name: str, since: str = "baseline"
    ) -> list[tuple[int, float | None, float | None, float | None]]:
        """``(step, change, low, high)`` of one summary scalar's change since the
        ``"baseline"`` probe of the current trajectory (or the ``"previous"`` probe), at
        each of its probes that carries one (records of older versions carry none; the
        baseline probe itself is ``(step, 0.0, 0.0, 0.0)``)."""
        out: list[tuple[int, float | None, float | None, float | None]] = []
        for p in self.current:
            change = None if p.change is None else getattr(p.change, since)
            if change is None:
                if since == "baseline" and not out and p.change is None:
                    out.append((p.step, 0.0, 0.0, 0.0))
                continue
            out.append((p.step, change.value(name), *change.interval(name)))
        return out if len(out) > 1 or since == "previous" else []


def find_record_file(run_dir: str | os.PathLike) -> Path:
    """The record file of a run: `run_dir` itself when it is a file, else the one
    `redundancy.jsonl` in it or below it.

    Raises:
        RunFolderError: nothing found, or several candidates.
    """
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise RunFolderError(f"{path} does not exist; pass the folder the monitor wrote into")
    if (path / RECORD_FILE).is_file():
        return path / RECORD_FILE
    found = sorted(path.rglob(RECORD_FILE)) or sorted(path.rglob("*.jsonl"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise RunFolderError(
            f"no {RECORD_FILE} in {path} or below it; pass the folder the monitor or "
            "`redundancy-monitor replay --out` wrote, or the .jsonl file itself"
        )
    listed = ", ".join(str(f.relative_to(path)) for f in found[:6])
    raise RunFolderError(
        f"{path} holds several record files ({listed}); pass the one you mean, or its folder"
    )


def _probe_record(line: dict[str, Any]) -> ProbeRecord:
    record = ProbeRecord.from_dict(line)
    result = record.result
    assert result is not None  # from_dict of a "probe" line always builds its result
    if result.meta.n_layers is None and result.pairs:  # files of early versions
        meta = replace(result.meta, n_layers=max(r.j for r in result.pairs) + 1)
        record = replace(record, result=replace(result, meta=meta))
    return record


def read_removal_table(path: Path) -> dict[str, Any] | None:
    """The removal table of a `redundancy-monitor score` result.json (its ``removal``
    entry: ``rows`` of measured cost per budget and selector, ``verdicts``, the base
    perplexity); None when the file holds none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"cannot read the removal table {path}: {exc}") from None
    table = data.get("removal") if isinstance(data, dict) else None
    if isinstance(table, list):  # a bare list of rows
        table = {"rows": table}
    rows = table.get("rows") if isinstance(table, dict) else None
    if not isinstance(table, dict) or not (
        isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    ):
        return None
    config = data.get("config") if isinstance(data, dict) else None
    checkpoint = config.get("path") if isinstance(config, dict) else None
    return {**table, "checkpoint": checkpoint}


def _find_removal_table(folders: list[Path]) -> tuple[dict[str, Any] | None, Path | None]:
    for folder in folders:
        for name in REMOVAL_FILES:
            path = folder / name
            if path.is_file():
                table = read_removal_table(path)
                if table is not None:
                    return table, path
    return None, None


def load_run(run_dir: str | os.PathLike, removal: str | os.PathLike | None = None) -> RunRecords:
    """Read a run folder (or record file) into `RunRecords`.

    Args:
        run_dir: the folder (or its ``.jsonl`` record file).
        removal: a ``result.json`` of `redundancy-monitor score` whose removal table to
            include; by default one found beside the records is used.

    Raises:
        RunFolderError: no record file, or one without a single probe record.
        RecordFileError: a line that is not a record (before the last record), or a
            record that lacks what its type needs (a probe without its summary); the
            message names the line.
    """
    source = find_record_file(run_dir)
    by_step: dict[int, ProbeRecord] = {}
    segment_of: dict[int, int] = {}
    alerts, failures, baselines = [], [], []
    model: dict[str, Any] | None = None  # the model of the current trajectory's probes
    for n, line in read_numbered_records(source):
        kind = line.get("type")
        try:
            if kind == "probe":
                record = _probe_record(line)
                now = None if record.result is None else record.result.meta.model_identity()
                if model is not None and now is not None and now != model:
                    reason = f"another model, {describe_model(now)} (was {describe_model(model)})"
                    baselines.append(Baseline(record.step, reason))
                model = now if now is not None else model
                by_step[record.step] = record
                segment_of[record.step] = len(baselines)
            elif kind == "alert":
                alerts.append(Alert(**{k: v for k, v in line.items() if k != "type"}))
            elif kind == "failure":
                failures.append(ProbeRecord.from_dict(line))
            elif kind == "new_baseline":
                baselines.append(Baseline(int(line["step"]), str(line.get("reason", ""))))
                model = None  # the next probe starts the new trajectory's model
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise RecordFileError(
                f"{source}: line {n} is a {kind!r} record that cannot be read ({detail}); the "
                "file was edited or written by something else. Delete that line to read the rest."
            ) from None
    if not by_step:
        what = f"{len(failures)} failed probe(s)" if failures else "no probe records"
        raise RunFolderError(
            f"{source} holds {what}; a report needs at least one finished probe. Let the "
            "run reach its first scheduled probe (step 0 by default), then try again"
        )
    probes = [by_step[s] for s in sorted(by_step)]
    table_source: Path | None
    if removal is not None:
        table, table_source = read_removal_table(Path(removal)), Path(removal)
        if table is None:
            raise RunFolderError(
                f"{removal} holds no removal table; pass the result.json that "
                "`redundancy-monitor score --out DIR` wrote"
            )
    else:
        folders = [source.parent] + ([Path(run_dir)] if Path(run_dir).is_dir() else [])
        table, table_source = _find_removal_table(folders)
    return RunRecords(source, probes, alerts, failures, table, table_source, baselines, segment_of)
