"""`Recorder`: what happens to a finished probe, and the state to resume it.

Each `ProbeRecord` (live from `RedundancyMonitor`, or offline from `replay`) goes through
one `Recorder`: the trajectory guard decides whether it continues the trajectory, the
sinks get the record, the alert rules see it, `on_alert` callbacks and stop/checkpoint
requests follow, and the history keeps it. `state_dict()` holds all of that, so a
resumed run (or replay) goes on exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from redundancy_monitor import __version__
from redundancy_monitor.errors import InvalidConfigError, MonitorStateError
from redundancy_monitor.monitoring.alerts import (
    AFTER_FAILURE,
    RULES,
    Alert,
    AlertConfig,
    AlertEngine,
    level_state,
)
from redundancy_monitor.monitoring.guard import (
    TrajectoryGuard,
    check_policy,
    protocols_identity,
    same_pair_set,
)
from redundancy_monitor.monitoring.probe_config import ProbeConfig, pairs_spec
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.sinks import Sink, SinkHealth
from redundancy_monitor.probing.change import (
    CHANGE_SCALARS,
    ChangeReference,
    ProbeChange,
    change_sample_size_advice,
    paired_change,
)
from redundancy_monitor.probing.intervals import (
    IntervalConfig,
    bootstrap_replicates,
    sample_size_advice,
)
from redundancy_monitor.probing.result import GapStats, ProbeResult, ProbeSummary

log = logging.getLogger("redundancy_monitor")
#: What a refusal of a probe that does not continue the trajectory advises (replay: its own).
MISMATCH_HINT = (
    "Probe the same model with the same batch and pairs, or pass "
    "on_mismatch='new_baseline' to start a new trajectory from such a probe."
)
#: 2: history entries are `ProbeRecord.to_dict()` without the per-pair lists (1: a dict of
#: step, regime, summary scalars and timings; still read).
STATE_VERSION = 2


class Recorder:
    """Records finished probes: trajectory guard, sinks, alerts, history, resume state.

    Args:
        sinks: where records go (JSON Lines file, TensorBoard, loggers); more may be
            appended to `sinks` before the first record.
        alerts: an `AlertConfig` (None: the defaults).
        on_alert: callables that receive each `Alert`.
        stop_on_alert: True, or the rule names that should ask the trainer to stop.
        checkpoint_on_alert: True, or the rule names that should ask for a checkpoint.
        on_mismatch: a probe of another probe batch, model depth, pair set or protocols
            than the trajectory is ``"refuse"``-d (recorded as a failure) or starts a
            ``"new_baseline"``.
        probe_config: what every probe measures (None: the defaults); a restored state
            of other pairs or protocols is refused (unless ``on_mismatch="new_baseline"``).
        clock: the optimizer step the caller is at, to date sink-failure alerts (None:
            the step of the latest record).

    Raises:
        InvalidConfigError: an unknown rule name or mismatch policy.

    Only the writer (`writer`: rank 0 of a multi-rank job, or a lone process) writes to
    the sinks and calls `on_alert`; every rank keeps the same history and alert state
    (`single_rank` is False then: a sink failure, seen by the writer alone, is alerted
    but does not ask to stop or checkpoint). Sink and callback errors are logged and
    counted, never raised.

    Attributes:
        history: the records of the current trajectory, oldest first, each without its
            per-pair lists (the sinks got those): summary, meta and timings.
        earlier_trajectories: histories ended by a new baseline.
        alerts: every alert so far.
        sample_size: the sample-size advice of the alerts' gap metric at the trajectory's
            first probe (its level), and `change_sample_size` at its first change since
            the baseline (docs/intervals.md).
        baseline_state: the level state at the baseline probe (`alerts.level_state`),
            reported once as information.
        stop_requested, checkpoint_requested: an alert of a `stop_on_alert` /
            `checkpoint_on_alert` rule fired (the adapter clears a checkpoint request
            once it saved).
    """

    def __init__(
        self,
        sinks: Sequence[Sink] = (),
        *,
        alerts: AlertConfig | None = None,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] = (),
        stop_on_alert: bool | Collection[str] = False,
        checkpoint_on_alert: bool | Collection[str] = False,
        on_mismatch: str = "refuse",
        probe_config: ProbeConfig | None = None,
        clock: Callable[[], int | None] | None = None,
    ):
        self.sinks: list[Sink] = list(sinks)
        self.alert_engine = AlertEngine(alerts or AlertConfig())
        self.on_alert = [on_alert] if callable(on_alert) else list(on_alert)
        self.stop_rules = _rule_set(stop_on_alert, "stop_on_alert")
        self.checkpoint_rules = _rule_set(checkpoint_on_alert, "checkpoint_on_alert")
        self.on_mismatch = check_policy(on_mismatch)
        self.probe_config = probe_config or ProbeConfig()
        self._clock = clock
        self.writer = True
        self.single_rank = True
        self.lenient = False  # set by load_state_dict(strict=False)
        self.after_failure = AFTER_FAILURE  # what a probe_failure alert says happens next
        self.mismatch_hint = MISMATCH_HINT  # what to do about a refused, mismatched probe
        self._resume_reasons: list[str] = []  # why the next probe starts a new trajectory
        self.trajectory_guard = TrajectoryGuard()
        self.sink_health = SinkHealth()
        self.history: list[ProbeRecord] = []
        self.earlier_trajectories: list[list[ProbeRecord]] = []
        self.alerts: list[Alert] = []
        self.n_probes = self.n_failures = 0
        self.stop_requested = self.checkpoint_requested = False
        self.sample_size: dict[str, Any] | None = None  # advice from a first probe
        self.change_sample_size: dict[str, Any] | None = None  # from its first change
        self.baseline_state: dict[str, Any] | None = None
        # The probes later ones are compared with (docs/intervals.md, "Change"): the
        # trajectory's baseline and the previous recorded probe, with their tables.
        self._change_baseline: ChangeReference | None = None
        self._change_previous: ChangeReference | None = None
        self._latest: int | None = None  # the step of the latest record
        self._batch_sha: str | None = None  # the probe batch in use
        self._restored_sha: str | None = None  # the probe batch of a restored state

    @property
    def n_sink_errors(self) -> int:
        """How many sink calls raised (each is logged; a sink's first failure is alerted)."""
        return self.sink_health.n_errors

    # ----- recording ---------------------------------------------------------------------

    def record(self, record: ProbeRecord) -> None:
        """Record one finished probe: sinks, alert rules, history (or a failure)."""
        self._latest = max(record.step, -1 if self._latest is None else self._latest)
        if record.failed:
            self._failed(record.step, record.error or "unknown error")
        elif self._resume_reasons:
            reason, self._resume_reasons = "; ".join(self._resume_reasons), []
            self._new_trajectory(record, f"resumed with {reason}", alert=True)
        elif (
            record.result is not None  # not failed: it has a result
            and (change := self.trajectory_guard.check(record.result)) is not None
        ):
            self._mismatched(record, change)
        else:
            self._record(record)

    def note_resume_change(self, reason: str) -> None:
        """The run resumed with something else than its state (`reason`): the next probe
        starts a new trajectory, with a ``resume_change`` alert."""
        self._resume_reasons.append(reason)

    def mark_start(self, step: int, resumed: bool) -> None:
        """Write a ``start`` marker before this attempt's first record: readers drop the
        records earlier attempts wrote from `step` (the first step this one covers) on."""
        marker = {
            "type": "start",
            "step": step,
            "resumed": resumed,
            "reason": f"monitor started at step {step}; "
            f"{'resumed from saved state' if resumed else 'no saved state'}; records of "
            f"earlier attempts from step {step} on are superseded",
        }
        self._emit("write_marker", marker)

    def flush(self) -> None:
        self._emit("flush")

    def close(self) -> None:
        self._emit("close")

    def _failed(self, step: int, error: str) -> None:
        self.n_failures += 1
        if self.writer:
            log.error("redundancy probe at step %d failed: %s", step, error)
        self._emit("write_failure", step, error)
        self._deliver(self.alert_engine.observe_failure(step, error, self.after_failure))

    def _mismatched(self, record: ProbeRecord, change: str) -> None:
        """A probe not comparable with the trajectory: refuse it, or start a new one."""
        if self.on_mismatch == "refuse":
            self._failed(
                record.step,
                f"MonitorStateError: the probe at step {record.step} measured {change}; it "
                f"is not comparable with the earlier probes and was not recorded. {self.mismatch_hint}",
            )
            return
        self._new_trajectory(record, change)

    def _new_trajectory(self, record: ProbeRecord, reason: str, alert: bool = False) -> None:
        """Start a new trajectory (and alert state) from this probe, with a marker record."""
        assert record.result is not None  # a successful probe starts a trajectory
        old = self.trajectory_guard.restart(record.result)
        log.warning("redundancy monitor: new baseline at step %d: %s", record.step, reason)
        if self.history:
            self.earlier_trajectories.append(self.history)
        self.history = []
        self.alert_engine = AlertEngine(self.alert_engine.config)
        self._change_baseline = self._change_previous = None  # change starts afresh
        self.change_sample_size = None
        marker = {
            "type": "new_baseline",
            "step": record.step,
            "reason": reason,
            "previous": old,
            "current": self.trajectory_guard.identity,
        }
        self._emit("write_marker", marker)
        if alert:  # news, not a verdict on the model: it never stops or checkpoints the run
            self._deliver(self.alert_engine.observe_resume_change(record.step, reason), act=False)
        self._record(record)

    def _record(self, record: ProbeRecord) -> None:
        if record.wall_time is None:
            record = dataclasses.replace(record, wall_time=time.time())
        had_baseline = self._change_baseline is not None
        record = self._with_change(record)
        self.n_probes += 1
        self.history.append(record.summary_only())
        assert record.result is not None  # failures go to _failed
        self._emit("write_probe", record)
        result = record.result
        assert result is not None  # a failure never gets here
        if len(self.history) == 1:
            self._advise_sample_size(record.step, result)
        if not had_baseline and self._change_baseline is not None:
            self._report_level_state(record.step, result)
        since_baseline = record.change.baseline if record.change is not None else None
        if since_baseline is not None and self.change_sample_size is None:
            self._advise_change_sample_size(record.step, since_baseline)
        self._deliver(self.alert_engine.observe(record.step, result, since_baseline))

    def _with_change(self, record: ProbeRecord) -> ProbeRecord:
        """`record` with its paired change against the trajectory's baseline probe and the
        previous probe (none at the first probe); this probe becomes the previous one."""
        result = record.result
        assert result is not None  # failures are not recorded here
        config = self._interval_config()
        names: tuple[str, ...] = CHANGE_SCALARS
        if self.alert_engine.config.gap_metric not in names:
            names = (*names, self.alert_engine.config.gap_metric)
        boot = bootstrap_replicates(result, config) if config else None
        change = None
        base, prev = self._change_baseline, self._change_previous
        if prev is not None:

            def against(ref: ChangeReference):
                ref_boot = ref.replicates(config, None) if config else None
                return paired_change(
                    ref.result, result, ref.step, config, None, names, ref_boot, boot
                )

            since_previous = against(prev)
            since_baseline = None
            if base is not None:
                since_baseline = since_previous if base is prev else against(base)
            change = ProbeChange(since_baseline, since_previous)
        ref = ChangeReference.of(record.step, result)
        if config:
            ref._replicates, ref._replicates_of = boot, (config, None)
        if base is None and record.step >= self.alert_engine.config.baseline_step:
            self._change_baseline = ref
        self._change_previous = ref
        return record if change is None else dataclasses.replace(record, change=change)

    def _interval_config(self) -> IntervalConfig | None:
        config = self.probe_config.intervals
        return config if isinstance(config, IntervalConfig) else None

    def _report_level_state(self, step: int, result: ProbeResult) -> None:
        """The level at the baseline probe, once, as information (never an alert)."""
        self.baseline_state = level_state(step, result, self.alert_engine.config)
        if self.writer:
            log.info("redundancy monitor: %s", self.baseline_state["reason"])
        self._emit("write_marker", self.baseline_state)

    def _advise_change_sample_size(self, step: int, change) -> None:
        """At the first probe whose change since the baseline has an interval of non-zero
        width (the weights moved): how precise that change of the alerts' gap metric is,
        and how many sequences would reach the target."""
        config = self._interval_config()
        if config is None:
            return
        advice = change_sample_size_advice(
            change,
            self.alert_engine.config.gap_metric,
            config.target_change_halfwidth,
            config.confidence,
            config.expanded,
        )
        if not advice.halfwidth:  # nothing changed yet: no precision to speak of
            return
        self.change_sample_size = {"type": "sample_size", "step": step, **advice.to_dict()}
        if self.writer:
            log.info("redundancy monitor: probe batch precision: %s", advice.sentence())
        self._emit("write_marker", self.change_sample_size)

    def _advise_sample_size(self, step: int, result: ProbeResult) -> None:
        """At the first probe of a trajectory: how precise the alerts' gap metric is with
        this probe batch, and how many sequences would reach the target half-width."""
        config = self._interval_config()
        if config is None:
            return
        advice = sample_size_advice(
            result, self.alert_engine.config.gap_metric, config.target_halfwidth
        )
        self.sample_size = {"type": "sample_size", "step": step, **advice.to_dict()}
        if self.writer:
            log.info("redundancy monitor: probe batch precision: %s", advice.sentence())
        self._emit("write_marker", self.sample_size)

    def _deliver(self, alerts: list[Alert], act: bool = True) -> None:
        for alert in alerts:
            self.alerts.append(alert)
            if self.writer:
                log.warning("redundancy alert [%s] %s", alert.rule, alert.message)
            self._emit("write_alert", alert)
            for callback in self.on_alert if self.writer else ():
                try:
                    callback(alert)
                except Exception:  # a user's callback must not stop training
                    log.exception("redundancy monitor: on_alert callback %r failed", callback)
            if act:
                self.stop_requested |= alert.rule in self.stop_rules
                self.checkpoint_requested |= alert.rule in self.checkpoint_rules

    def _emit(self, method: str, *args) -> None:
        if not self.writer:
            return
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # a broken sink is counted and alerted, never raised
                self._sink_failed(sink, method, exc)
            else:
                self.sink_health.ok(sink, method)

    def _sink_failed(self, sink: Sink, method: str, exc: Exception) -> None:
        """Count and log a sink error; alert when a working sink starts failing."""
        name = f"{type(sink).__name__}.{method}"
        if not self.sink_health.failed(sink, method):
            log.warning("redundancy monitor: sink %s failed again: %s", name, exc)
            return
        log.error("redundancy monitor: sink %s failed", name, exc_info=exc)
        step = self._clock() if self._clock is not None else self._latest
        alerts = self.alert_engine.observe_sink_failure(step or 0, name, exc)
        # With several ranks only the writer sees this: it must not stop or checkpoint
        # the run, which every rank has to do together.
        self._deliver(alerts, act=self.single_rank)

    # ----- trajectory and resume ---------------------------------------------------------

    def trajectory(self, name: str = "gap_mean") -> list[tuple[int, float | None]]:
        """``(step, value)`` of one summary scalar over the probes so far, by step."""
        return sorted(
            (r.step, r.result.summary.scalars().get(name))
            for r in self.history
            if r.result is not None  # the history holds successful probes
        )

    def use_batch(self, sha256: str | None) -> None:
        """Note the hash of the probe batch in use (it goes into the state).

        Raises:
            MonitorStateError: the restored state was recorded with another probe batch
                (unless ``on_mismatch="new_baseline"``: its first probe then starts a new
                trajectory).
        """
        self._batch_sha = sha256
        self._check_batch()

    def _check_batch(self) -> None:
        if None in (self._batch_sha, self._restored_sha) or self._batch_sha == self._restored_sha:
            return
        assert self._batch_sha is not None and self._restored_sha is not None  # both known
        if self.lenient:
            self.note_resume_change(
                f"another probe batch (sha256 {self._batch_sha[:12]}..., the checkpoint's "
                f"is {self._restored_sha[:12]}...)"
            )
            self._restored_sha = None  # noted once
            return
        if self.on_mismatch != "new_baseline":  # new_baseline: its first probe starts one
            raise MonitorStateError(
                "the restored monitor state was recorded with another probe batch "
                f"(sha256 {self._restored_sha[:12]}..., now {self._batch_sha[:12]}...); "
                "trajectories would not be comparable. Pass the same probe batch when "
                "resuming, pass on_mismatch='new_baseline' to start a new trajectory, or "
                "start a new monitor without loading the state."
            )

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state of the trajectory, history, counters and alert rules."""
        return {
            "state_version": STATE_VERSION,
            "library_version": __version__,
            "batch_sha256": self._batch_sha or self._restored_sha,
            "n_probes": self.n_probes,
            "n_failures": self.n_failures,
            "n_sink_errors": self.n_sink_errors,
            "pairs_spec": pairs_spec(self.probe_config.pairs),
            "trajectory": self.trajectory_guard.identity,
            "earlier_trajectories": [[r.to_dict() for r in t] for t in self.earlier_trajectories],
            "history": [r.to_dict() for r in self.history],
            "alerts": [a.to_dict() for a in self.alerts],
            "alert_engine": self.alert_engine.state_dict(),
            "change_baseline": _ref_dict(self._change_baseline),
            "change_previous": _ref_dict(self._change_previous),
            "change_sample_size": self.change_sample_size,
            "baseline_state": self.baseline_state,
        }

    def check_version(self, state: dict[str, Any], strict: bool = True) -> bool:
        """Whether this version can read `state`; with ``strict=False`` a state it cannot
        read is logged and noted as a resume change instead of raising (and False).

        Raises:
            MonitorStateError: (strict only) the state is from a newer format.
        """
        self.lenient = not strict
        if state.get("state_version", 1) <= STATE_VERSION:
            return True
        message = (
            f"monitor state version {state.get('state_version')} is newer than this "
            f"library understands ({STATE_VERSION}); upgrade redundancy-monitor"
        )
        if strict:
            raise MonitorStateError(message)
        log.error("redundancy monitor: %s; the state is ignored", message)
        self.note_resume_change("a monitor state this version cannot read (ignored)")
        return False

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what `state_dict` saved (keys it does not know are ignored).

        With ``strict=False`` a state of another probe batch, pair set or protocols, or
        one this version cannot read, does not raise: the next probe starts a new
        trajectory with a ``resume_change`` alert (see `RedundancyMonitor.load_state_dict`).

        Raises:
            MonitorStateError: (strict only) the state is from a newer format, another
                probe batch, pair set or protocols while ``on_mismatch="refuse"``.
        """
        if not self.check_version(state, strict):
            return
        version = state.get("state_version", 1)
        self._restored_sha = state.get("batch_sha256")
        self._check_batch()
        identity = state.get("trajectory") or (
            {"batch_sha256": self._restored_sha} if self._restored_sha else None
        )
        self._check_pairs(state.get("pairs_spec"), (identity or {}).get("n_layers"))
        self._check_protocols((identity or {}).get("protocols"))
        self.trajectory_guard = TrajectoryGuard(identity)
        read = ProbeRecord.from_dict if version >= 2 else _record_from_v1
        self.earlier_trajectories = [
            [read(h) for h in t] for t in state.get("earlier_trajectories", [])
        ]
        self.sink_health.n_errors = state.get("n_sink_errors", 0)
        self.n_probes = state.get("n_probes", 0)
        self.n_failures = state.get("n_failures", 0)
        self.history = [read(h) for h in state.get("history", [])]
        self.alerts = [Alert(**a) for a in state.get("alerts", [])]
        self.alert_engine.load_state_dict(state.get("alert_engine", {}))
        self._change_baseline = _ref_from(state.get("change_baseline"))
        self._change_previous = _ref_from(state.get("change_previous"))
        self.change_sample_size = state.get("change_sample_size")
        self.baseline_state = state.get("baseline_state")

    def _check_pairs(self, saved, n_layers: int | None) -> None:
        """Refuse another pair set; specs naming the same pairs ("adjacent", "window:1",
        the explicit list) are the same set."""
        now = pairs_spec(self.probe_config.pairs)
        if saved is None or same_pair_set(saved, now, n_layers):
            return
        self._setting_changed(
            f"pairs={now!r} (the checkpoint has pairs={saved!r})",
            f"the restored monitor state was recorded with pairs={saved!r}, this monitor "
            f"probes pairs={now!r}; trajectories would not be comparable. Pass the same "
            "pairs when resuming, or on_mismatch='new_baseline' to start a new trajectory.",
        )

    def _check_protocols(self, saved: list[str] | None) -> None:
        now = protocols_identity(self.probe_config.protocols)
        if saved is None or saved == now:
            return
        self._setting_changed(
            f"protocols {now} (the checkpoint has {saved})",
            f"the restored monitor state was recorded with protocols {saved}, this "
            f"monitor probes {now}; trajectories would not be comparable (a missing "
            "protocol leaves the gap undefined). Pass the same protocols when resuming, "
            "or on_mismatch='new_baseline' to start a new trajectory.",
        )

    def _setting_changed(self, change: str, refusal: str) -> None:
        """A setting differs from the restored state's: noted as a resume change when
        lenient (the callbacks), refused under on_mismatch='refuse', else left to the
        trajectory guard to start a new baseline."""
        if self.lenient:
            self.note_resume_change(change)
        elif self.on_mismatch == "refuse":
            raise MonitorStateError(refusal)


def _ref_dict(ref: ChangeReference | None) -> dict[str, Any] | None:
    return None if ref is None else ref.to_dict()


def _ref_from(data: dict[str, Any] | None) -> ChangeReference | None:
    return None if data is None else ChangeReference.from_dict(data)


def _rule_set(value: bool | Collection[str], name: str) -> frozenset[str]:
    if value is True:
        return frozenset(RULES)
    if value is False or value is None:
        return frozenset()
    rules = frozenset(value)
    unknown = rules - set(RULES)
    if unknown:
        raise InvalidConfigError(f"{name} names unknown rules {sorted(unknown)}; known: {RULES}")
    return rules


def _record_from_v1(entry: dict[str, Any]) -> ProbeRecord:
    """A history entry of a version-1 state (step, regime, summary scalars, timings)."""
    summary = _summary_from_scalars(entry["scalars"], entry.get("regime"))
    return ProbeRecord(
        int(entry["step"]),
        ProbeResult([], summary),
        probe_seconds=entry.get("probe_seconds"),
        blocked_seconds=entry.get("blocked_seconds"),
    )


def _summary_from_scalars(scalars: dict[str, Any], regime: str | None) -> ProbeSummary:
    """The summary whose `scalars()` are `scalars` (``d<k>/<name>``: pairs with |i-j| = k)."""
    overall: dict[str, Any] = {}
    by_separation: dict[int, dict[str, Any]] = {}
    for key, value in scalars.items():
        prefix, _, name = key.rpartition("/")
        (by_separation.setdefault(int(prefix[1:]), {}) if prefix else overall)[name] = value
    return ProbeSummary(
        **_typed(ProbeSummary, overall),
        regime=regime,
        by_separation={d: GapStats(**_typed(GapStats, v)) for d, v in by_separation.items()},
    )


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` for the fields of `cls` that scalars() holds; counts back to int."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            out[f.name] = int(value) if f.type == "int" and value is not None else value
    return out
