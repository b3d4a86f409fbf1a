"""Where the monitor's records go. A sink gets every probe, alert and failure, in order.

Sinks are called from the training thread only (results are polled there), so a sink
never needs a lock and framework loggers are never touched from the probe thread.
"""

from __future__ import annotations

from collections.abc import Callable

from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.probing.change import ProbeChange
from redundancy_monitor.probing.result import ProbeResult

PREFIX = "redundancy"
GAP_CHART = ("gap_mean", "gap_median", "gap_p75", "gap_max")
#: The summary scalars kept in the ``redundancy/`` section, the first screen of a
#: dashboard; the others go to sections of their own (`scalar_tag`).
HEADLINE = (*GAP_CHART, "ir_median", "d_repl_mean", "d_int_mean")
#: Section names. TensorBoard's SCALARS tab orders sections by their first tag, comparing
#: "/", "_" and digits as equal: a section name must not sort before the headline tags
#: (``redundancy/d_int_mean`` first), so per-separation scalars are not "_by_separation".
BY_SEPARATION, DETAIL, PAIRS, PROBE_INFO = (
    f"{PREFIX}_separation",
    f"{PREFIX}_detail",
    f"{PREFIX}_pairs",
    f"{PREFIX}_probe",
)
#: Byte figures every probe record carries in ``result.meta`` (monitoring/snapshot.py).
MEMORY_FIELDS = ("shadow_host_bytes", "shadow_device_bytes", "probe_device_peak_bytes")
#: Summary scalars whose interval bounds are logged as ``<name>_low`` / ``<name>_high``.
BANDS = ("gap_median",)
#: The change of these scalars since the trajectory's baseline probe is logged as
#: ``redundancy_since_baseline/<name>`` (since the previous probe: ``redundancy_since_previous/``),
#: each with its paired interval as ``<name>_low`` / ``<name>_high``.
# Sections named so that TensorBoard, which sorts "/" and "_" alike, still lists `redundancy` first.
CHANGE, CHANGE_PREVIOUS = f"{PREFIX}_since_baseline", f"{PREFIX}_since_previous"
CHANGE_HEADLINE = ("gap_mean", "gap_median", "ir_median", "d_repl_mean", "d_int_mean")


def scalar_tag(name: str) -> str:
    """The logged name of a summary scalar: ``redundancy/<name>`` for the headline ones,
    ``redundancy_separation/d<k>/<name>`` per pair separation, else
    ``redundancy_detail/<name>``. Dashboards group tags by the part before the first
    slash, so the headline section stays one screen."""
    if name in HEADLINE:
        return f"{PREFIX}/{name}"
    if name.startswith("d") and name.split("/", 1)[0][1:].isdigit():
        return f"{BY_SEPARATION}/{name}"
    return f"{DETAIL}/{name}"


def probe_scalars(
    result: ProbeResult, per_pair: bool = False, change: ProbeChange | None = None
) -> dict[str, float]:
    """Every summary scalar under its `scalar_tag`, the interval bounds of the `BANDS`
    scalars (``redundancy/gap_median_low`` / ``_high``) and the regime's stability when
    the probe computed intervals, the `change_scalars` of `change`, and optionally
    ``redundancy_pairs/i-j/<field>``.

    Undefined values (None) are left out rather than logged as NaN.
    """
    summary = result.summary
    out = {scalar_tag(k): v for k, v in summary.scalars().items() if v is not None}
    for name in BANDS:
        low, high = summary.interval(name)
        if low is not None and high is not None:
            out[f"{scalar_tag(name)}_low"], out[f"{scalar_tag(name)}_high"] = low, high
    if summary.regime_stability is not None:
        out[f"{DETAIL}/regime_stability"] = summary.regime_stability
    out.update(change_scalars(change))
    if per_pair:
        for r in result.pairs:
            for name in ("d_repl", "d_int", "gap", "ir"):
                v = getattr(r, name)
                if v is not None:
                    out[f"{PAIRS}/{r.i}-{r.j}/{name}"] = v
    return out


def change_scalars(change: ProbeChange | None) -> dict[str, float]:
    """``redundancy_since_baseline/<name>`` (since the baseline probe) and
    ``redundancy_since_previous/<name>`` (since the previous probe) of each
    `CHANGE_HEADLINE` scalar, with ``_low`` / ``_high`` where the change has an interval;
    empty at a trajectory's first probe."""
    out: dict[str, float] = {}
    if change is None:
        return out
    for section, c in ((CHANGE, change.baseline), (CHANGE_PREVIOUS, change.previous)):
        if c is None:
            continue
        for name in CHANGE_HEADLINE:
            value, (low, high) = c.value(name), c.interval(name)
            if value is None:
                continue
            out[f"{section}/{name}"] = value
            if low is not None and high is not None:
                out[f"{section}/{name}_low"], out[f"{section}/{name}_high"] = low, high
    return out


class Sink:
    """Base class: every hook is optional."""

    def write_probe(self, record: ProbeRecord) -> None:
        pass

    def write_alert(self, alert: Alert) -> None:
        pass

    def write_failure(self, step: int, error: str) -> None:
        pass

    def write_resume(self, step: int) -> None:
        pass

    def write_marker(self, marker: dict) -> None:
        """A JSON-safe event record with at least ``type`` and ``step`` (a new baseline)."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class SinkHealth:
    """Which sinks are failing now, and how many sink calls have failed in all.

    A sink's first failure after it worked is news (the monitor alerts); further failures
    are only counted until the call that failed first succeeds again (another call
    succeeding proves little: a TensorBoard writer may take text but not scalars).
    """

    def __init__(self) -> None:
        self.n_errors = 0
        self._failing: dict[int, str] = {}  # id(sink) -> the method that failed first

    def failed(self, sink: Sink, method: str) -> bool:
        """Count a failure; True if `sink` was working until now."""
        self.n_errors += 1
        new = id(sink) not in self._failing
        self._failing.setdefault(id(sink), method)
        return new

    def ok(self, sink: Sink, method: str) -> None:
        if self._failing.get(id(sink)) == method:
            del self._failing[id(sink)]


class MetricsSink(Sink):
    """Sends the probe scalars to any ``log_metrics(metrics: dict, step: int)`` function
    (every Lightning logger has one: CSV, W&B, MLflow, ...).

    Results arrive at the step of their snapshot, which can be earlier than the step the
    logger last saw; ``redundancy_probe/snapshot_step`` is logged too, for loggers that need a
    monotonic step and let you pick the x-axis.
    """

    def __init__(self, log_metrics: Callable[[dict, int], None], per_pair: bool = False):
        self.log_metrics = log_metrics
        self.per_pair = per_pair

    def write_probe(self, record: ProbeRecord) -> None:
        assert record.result is not None  # sinks get successful probes only (write_failure)
        metrics = probe_scalars(record.result, self.per_pair, record.change)
        metrics[f"{PROBE_INFO}/snapshot_step"] = float(record.step)
        self.log_metrics(metrics, record.step)
