"""Acting on a `redundancy-monitor watch` sidecar's alerts from inside the training run.

The sidecar probes the run's checkpoints in another process and appends its alerts to
``LOG_DIR/redundancy.jsonl``. `SidecarAlerts` reads the alerts appended since training
started, at scheduled optimizer steps only, and turns them into the stop / checkpoint
`MonitorControl` that `stop_on_alert` / `checkpoint_on_alert` ask for. With several
ranks, rank 0 reads and its control is broadcast, so every rank acts at the same step.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.files import RECORD_FILE
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.control import CONTINUE, MonitorControl, RankAgreement
from redundancy_monitor.monitoring.recorder import _rule_set
from redundancy_monitor.monitoring.schedule import ProbeSchedule

log = logging.getLogger("redundancy_monitor")
_ALERT_ARGS = ("stop_on_alert", "checkpoint_on_alert", "on_alert")


class SidecarAlerts:
    """The alerts a `watch` sidecar writes, read at scheduled steps: the callbacks' stand-in
    for a `RedundancyMonitor` when another process probes (the same hooks, each
    returning a `MonitorControl`; nothing is probed here).

    Alerts already in the file when `start()` runs belong to an earlier attempt and are
    not acted on; each alert appended after is acted on at the next scheduled step.

    Args:
        log_dir: the sidecar's log folder (its ``redundancy.jsonl`` is read).
        schedule: the optimizer steps at which the file is read.
        stop_on_alert: True, or the rule names that should ask the trainer to stop.
        checkpoint_on_alert: True, or the rule names that should ask for a checkpoint.
        on_alert: callables that receive each new `Alert` (on rank 0).

    Raises:
        InvalidConfigError: an unknown rule name.

    Example:
        >>> reader = SidecarAlerts("runs/watch", ProbeSchedule(50), stop_on_alert=True)
        >>> reader.start()
        >>> if reader.step(global_step).stop: ...
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        schedule: ProbeSchedule,
        *,
        stop_on_alert: bool | Collection[str] = False,
        checkpoint_on_alert: bool | Collection[str] = False,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] = (),
    ):
        self.path = Path(log_dir) / RECORD_FILE
        self.schedule = schedule
        self.stop_rules = _rule_set(stop_on_alert, "stop_on_alert")
        self.checkpoint_rules = _rule_set(checkpoint_on_alert, "checkpoint_on_alert")
        self.on_alert = [on_alert] if callable(on_alert) else list(on_alert)
        self.alerts: list[Alert] = []
        self._offset = 0
        self._agreement = RankAgreement(None, schedule)
        self._stop = self._save = False  # asked by alerts read on this rank
        self._reason: str | None = None

    def start(self) -> None:
        """Call once when training starts, on every rank (a collective with several)."""
        from redundancy_monitor.monitoring.ranks import RankGroup, is_distributed

        if self._agreement.group is None and is_distributed() and RankGroup.world() > 1:
            self._agreement = RankAgreement(RankGroup(), self.schedule)
        self._offset = self._size()

    def step(self, step: int, model: object = None) -> MonitorControl:
        """At a scheduled `step`, read new alerts; every rank gets rank 0's control."""
        if not self._agreement.due(step):
            return self._agreement.held()
        return self._agreement.agree(self._read)

    def train_end(self, step: int, model: object = None) -> MonitorControl:
        """A last read when training ends (every rank gets rank 0's control)."""
        return self._agreement.agree(self._read)

    def before_weights_change(self) -> None:
        """Nothing to fence: no snapshot is taken in this process."""

    def close(self) -> None:
        """Nothing to close: the file is opened only while read."""

    def _read(self) -> MonitorControl:
        for alert in self._read_new():
            self._deliver(alert)
            stop, save = alert.rule in self.stop_rules, alert.rule in self.checkpoint_rules
            if stop or save:
                self._stop, self._save = self._stop or stop, self._save or save
                self._reason = f"[{alert.rule}] {alert.message}"
        if not (self._stop or self._save):
            return CONTINUE
        control = MonitorControl(self._stop, self._save, self._reason)
        self._save = False  # a checkpoint request is handed out once
        return control

    def _deliver(self, alert: Alert) -> None:
        self.alerts.append(alert)
        log.warning("redundancy alert from the sidecar [%s] %s", alert.rule, alert.message)
        for callback in self.on_alert:
            try:
                callback(alert)
            except Exception:
                log.exception("redundancy monitor: on_alert callback %r failed", callback)

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def _read_new(self) -> list[Alert]:
        """Alerts on the complete lines appended since the last read. Never raises: a
        line that is not an alert record is skipped."""
        if self._size() < self._offset:
            self._offset = 0  # the file was replaced: read the new one from its start
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        data = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        self._offset += len(data)
        alerts = []
        for line in data.splitlines():
            try:
                record = json.loads(line)
                if isinstance(record, dict) and record.get("type") == "alert":
                    fields = {k: record[k] for k in ("step", "rule", "value", "threshold")}
                    alerts.append(Alert(message=str(record.get("message", "")), **fields))
            except (ValueError, KeyError, TypeError):
                log.warning("redundancy monitor: skipped a malformed line in %s", self.path)
        return alerts


def sidecar_from_kwargs(
    log_dir: str | os.PathLike, unused: dict[str, Any], monitor_kwargs: dict[str, Any]
) -> SidecarAlerts:
    """The `SidecarAlerts` of a callback given ``sidecar=log_dir`` and the monitor
    arguments; `unused` are the callback's own arguments that only probing uses.

    Raises:
        InvalidConfigError: a probing argument, which would have no effect.
    """
    allowed = ("schedule", *_ALERT_ARGS)
    given = [k for k, v in unused.items() if v is not None]
    given += [k for k in monitor_kwargs if k not in allowed]
    if given:
        raise InvalidConfigError(
            f"with sidecar= nothing is probed in this process, so {', '.join(given)} would "
            "have no effect; give probing settings to `redundancy-monitor watch`, or drop "
            "sidecar= to probe in-process"
        )
    schedule = monitor_kwargs.get("schedule") or ProbeSchedule()
    alert_args = {k: monitor_kwargs[k] for k in _ALERT_ARGS if k in monitor_kwargs}
    return SidecarAlerts(log_dir, schedule, **alert_args)
