"""TensorBoard output: scalars, heatmaps of d_repl / d_int / gap, a gap chart, alerts as text."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.heatmap_axes import framed, number
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.sinks import (
    BANDS,
    BY_SEPARATION,
    CHANGE,
    CHANGE_HEADLINE,
    GAP_CHART,
    MEMORY_FIELDS,
    PREFIX,
    PROBE_INFO,
    Sink,
    probe_scalars,
)
from redundancy_monitor.probing.result import ProbeResult

log = logging.getLogger("redundancy_monitor")
HEATMAPS = ("d_repl", "d_int", "gap")
LAYOUT_TAG = "custom_scalars__config__"
MISSING = np.array([64, 64, 64], dtype=np.float64)  # pairs not probed
# Anchors of matplotlib's viridis, enough for a faithful linear interpolation.
VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
DIVERGING = np.array([[33, 102, 172], [247, 247, 247], [178, 24, 43]], dtype=np.float64)


def pair_matrix(result: ProbeResult, field: str, zero_diagonal: bool = True) -> np.ndarray:
    """An L x L symmetric matrix of one pair field; NaN where the pair was not probed.

    With `zero_diagonal`, distances get 0 on the diagonal (R(i<-i) = d_int(i,i) = 0);
    gap's diagonal stays NaN either way.
    """
    n = result.n_layers
    m = np.full((n, n), np.nan)
    for r in result.pairs:
        v = getattr(r, field)
        if v is not None:
            m[r.i, r.j] = m[r.j, r.i] = v
    if zero_diagonal and field != "gap":
        np.fill_diagonal(m, 0.0)  # R(i<-i) = d_int(i,i) = 0 by definition
    return m


def _colorize(values: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB by linear interpolation between anchor colors."""
    pos = np.clip(values, 0.0, 1.0) * (len(anchors) - 1)
    low = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    frac = (pos - low)[..., None]
    return anchors[low] * (1 - frac) + anchors[low + 1] * frac


def heatmap_image(
    matrix: np.ndarray, diverging: bool = False, cell: int | None = None
) -> np.ndarray:
    """An ``H x W x 3`` uint8 image of `matrix` (row i = slot i), grey where NaN.

    Distances use viridis from 0 to the matrix max; a gap uses blue-white-red centred on
    0 and scaled by its largest magnitude, so its sign is visible.
    """
    finite = np.isfinite(matrix)
    scale = color_scale(matrix)
    if diverging:
        rgb = _colorize(np.where(finite, matrix / scale * 0.5 + 0.5, 0.5), DIVERGING)
    else:
        rgb = _colorize(np.where(finite, matrix / scale, 0.0), VIRIDIS)
    rgb[~finite] = MISSING
    cell = cell or max(4, 256 // max(1, matrix.shape[0]))
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return rgb.round().astype(np.uint8)


def exact(tag: str) -> str:
    """A custom-scalars Multiline pattern (a regular expression searched in each tag)
    that matches `tag` and nothing else: unanchored, ``redundancy/gap_median`` would
    also pull in ``redundancy/gap_median_low`` and ``_high``."""
    return f"^{re.escape(tag)}$"


def color_scale(matrix: np.ndarray) -> float:
    """The value the colour scale ends at: the largest finite magnitude (1 when none)."""
    finite = np.isfinite(matrix)
    scale = float(np.abs(matrix[finite]).max()) if finite.any() else 0.0
    return scale if scale > 0 else 1.0


def heatmap_with_axes(matrix: np.ndarray, diverging: bool = False) -> np.ndarray:
    """`heatmap_image` with its axes: slot numbers (row: slot i, column: block j), axis
    titles and a colour bar labelled with its scale (0 to the max; a gap from -max
    through 0 to +max)."""
    scale = color_scale(matrix)
    top_to_bottom = np.linspace(1.0, 0.0, 65)
    if diverging:
        bar = _colorize(top_to_bottom, DIVERGING)
        labels = [(0.0, number(scale)), (0.5, "0"), (1.0, number(-scale))]
    else:
        bar = _colorize(top_to_bottom, VIRIDIS)
        labels = [(0.0, number(scale)), (1.0, "0")]
    cells = heatmap_image(matrix, diverging)
    return framed(cells, matrix.shape[0], bar.round().astype(np.uint8), labels)


def custom_scalars_layout() -> dict:
    """One chart with the gap mean/median/p75/max, one with ir, one with both distances,
    one with the mean gap per pair separation, per `BANDS` scalar a margin chart (the
    point estimate with its interval as a band: TensorBoard's custom-scalars ``Margin``
    chart takes the tags [value, lower, upper]), one with the change since the baseline
    probe of the headline scalars, and a margin chart of the gap_median change with its
    paired interval. Multiline patterns are anchored (`exact`), so each chart holds
    exactly the tags it names."""
    tag = f"{PREFIX}/{{}}".format
    change = f"{CHANGE}/{{}}".format
    charts = {
        "protocol gap (nats)": ["Multiline", [exact(tag(k)) for k in GAP_CHART]],
        "interchange / replacement ratio": ["Multiline", [exact(tag("ir_median"))]],
        "distances (nats)": [
            "Multiline",
            [exact(tag("d_repl_mean")), exact(tag("d_int_mean"))],
        ],
        "gap by pair separation (nats)": [
            "Multiline",
            [rf"^{re.escape(BY_SEPARATION)}/d\d+/gap_mean$"],
        ],
    }
    for name in BANDS:
        charts[f"{name} with its interval (nats)"] = [
            "Margin",
            [tag(name), tag(f"{name}_low"), tag(f"{name}_high")],
        ]
    charts["change since the baseline probe (nats)"] = [
        "Multiline",
        [exact(change(k)) for k in CHANGE_HEADLINE if k != "ir_median"],
    ]
    for name in BANDS:
        charts[f"{name} change since the baseline, with its paired interval (nats)"] = [
            "Margin",
            [change(name), change(f"{name}_low"), change(f"{name}_high")],
        ]
    return {PREFIX: charts}


def merged_layout_summary(log_dir: str | os.PathLike | None):
    """Our custom-scalars layout merged into the one already in `log_dir`'s event files.

    A run has one layout (TensorBoard shows the last one written), so writing ours into a
    run someone else writes to (Lightning's or the HF Trainer's) would replace theirs.
    Their categories are kept; ours replaces only a category with our title.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard.summary import custom_scalars

    summary = custom_scalars(custom_scalars_layout())
    existing = _existing_layout(log_dir) if log_dir is not None else None
    if existing is None:
        return summary
    ours = layout_pb2.Layout.FromString(summary.value[0].tensor.string_val[0])
    titles = {c.title for c in ours.category}
    merged = layout_pb2.Layout(
        category=[c for c in existing.category if c.title not in titles] + list(ours.category)
    )
    summary.value[0].tensor.string_val[0] = merged.SerializeToString()
    return summary


def _existing_layout(log_dir: str | os.PathLike):
    """The last custom-scalars layout written to the event files directly in `log_dir`."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    latest = None
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        try:
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    if value.tag == LAYOUT_TAG:
                        latest = (event.wall_time, value.tensor.string_val[0])
        except Exception as exc:  # a file being written or damaged: use what was read
            log.debug("redundancy monitor: reading %s for a layout failed: %s", path, exc)
    return None if latest is None else layout_pb2.Layout.FromString(latest[1])


class TensorBoardSink(Sink):
    """Writes to a `SummaryWriter` of its own in `log_dir`, or to a given one. The
    callbacks use `beside` a framework's writer: sharing one is unsafe (see there).

    Headline scalars go to ``redundancy/``, the rest to sections of their own (see
    `redundancy_monitor.monitoring.sinks.scalar_tag`); a custom-scalars layout already in
    the run is merged with ours, not replaced.

    Args:
        writer: an existing ``torch.utils.tensorboard.SummaryWriter``, or a function that
            returns the current one (a trainer may close and re-open its writer); not
            closed here.
        log_dir: where to create a writer when `writer` is None.
        per_pair: also log ``redundancy/pair/i-j/{d_repl,d_int,gap,ir}``.
        images: log heatmaps of d_repl, d_int and gap at every probe.
        per_sequence: also log each pair's per-sequence distances as histograms
            (``redundancy_per_sequence/i-j/{repl_ij,repl_ji,d_int}``); off by default,
            they are in the JSON record either way.
        purge_step: passed to a writer created here; TensorBoard then hides events at
            or after this step from an earlier, interrupted run.
    """

    def __init__(
        self,
        writer=None,
        log_dir: str | os.PathLike | None = None,
        per_pair: bool = False,
        images: bool = True,
        purge_step: int | None = None,
        per_sequence: bool = False,
    ):
        if writer is None and log_dir is None:
            raise InvalidConfigError(
                "TensorBoardSink needs a writer or a log_dir; pass writer=SummaryWriter(...) "
                "or log_dir='runs/redundancy'"
            )
        self._writer, self._owns = writer, writer is None
        if log_dir is None:
            log_dir = (writer() if callable(writer) else writer).get_logdir()
        self.log_dir = str(log_dir)
        self.per_pair, self.images, self.purge_step = per_pair, images, purge_step
        self.per_sequence = per_sequence
        self._layout_written = False
        self._last_writer = None

    @classmethod
    def beside(
        cls, writer, subfolder: str = "redundancy", purge_step: int | None = None, **kwargs
    ) -> TensorBoardSink:
        """A sink with a writer of its own, in a run beside a framework's writer (in
        ``<its log dir>/<subfolder>``), rather than writing into that writer.

        A writer's background thread dies at its first failed write (a full disk, a file
        size limit) and every later call on it raises, the framework's own shutdown
        included: a sink sharing it would change how training ends. A run of its own
        keeps our failures ours (counted and alerted); TensorBoard shows both runs, and
        merges their custom-scalars layouts. `writer` may be a function returning it.
        """
        current = writer() if callable(writer) else writer
        log_dir = os.path.join(current.get_logdir(), subfolder)
        return cls(log_dir=log_dir, purge_step=purge_step, **kwargs)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.purge_step)
        writer = self._writer() if callable(self._writer) else self._writer
        self._last_writer = writer
        if not self._layout_written:
            writer.flush()  # a layout the run's owner wrote must be on disk to be merged
            file_writer = getattr(writer, "_get_file_writer", None)
            if file_writer is None:  # not torch's or tensorboardX's writer: ours only
                writer.add_custom_scalars(custom_scalars_layout())
            else:
                file_writer().add_summary(merged_layout_summary(writer.get_logdir()))
            self._layout_written = True
        return writer

    def write_probe(self, record: ProbeRecord) -> None:
        assert record.result is not None  # sinks get successful probes only (write_failure)
        w, step = self.writer, record.step
        for tag, value in probe_scalars(record.result, self.per_pair, record.change).items():
            w.add_scalar(tag, value, step)
        w.add_scalar(f"{PROBE_INFO}/probe_seconds", record.probe_seconds, step)
        w.add_scalar(f"{PROBE_INFO}/blocked_seconds", record.blocked_seconds, step)
        if record.skipped is not None:  # scheduled probes skipped since the previous one
            w.add_scalar(f"{PROBE_INFO}/skipped", record.skipped, step)
        w.add_scalar(f"{PROBE_INFO}/snapshot_step", record.step, step)
        for name in MEMORY_FIELDS:
            if getattr(record.result.meta, name) is not None:
                w.add_scalar(f"{PROBE_INFO}/{name}", getattr(record.result.meta, name), step)
        if record.result.summary.regime is not None:
            w.add_text(f"{PREFIX}/regime", record.result.summary.regime, step)
        if self.per_sequence and record.result.per_sequence is not None:
            per_seq = record.result.per_sequence
            for name in per_seq.tables:
                table = per_seq.table(name)
                assert table is not None  # a name of per_seq.tables
                for (i, j), row in zip(per_seq.pairs, table, strict=True):
                    finite = row[np.isfinite(row)]
                    if finite.size:
                        w.add_histogram(f"{PREFIX}_per_sequence/{i}-{j}/{name}", finite, step)
        if self.images:
            for name in HEATMAPS:
                matrix = pair_matrix(record.result, name)
                image = heatmap_with_axes(matrix, diverging=name == "gap")
                w.add_image(f"{PREFIX}/heatmap/{name}", image, step, dataformats="HWC")

    def write_alert(self, alert: Alert) -> None:
        self.writer.add_text(f"{PREFIX}/alerts", f"**{alert.rule}**: {alert.message}", alert.step)

    def write_failure(self, step: int, error: str) -> None:
        self.writer.add_text(f"{PREFIX}/failures", f"```\n{error}\n```", step)

    def write_marker(self, marker: dict) -> None:
        text = f"**{marker['type']}**: {marker.get('reason', '')}"
        self.writer.add_text(f"{PREFIX}/markers", text, marker["step"])

    def flush(self) -> None:
        # The writer last written to: flushing must not re-open one its owner closed.
        if self._last_writer is not None:
            self._last_writer.flush()

    def close(self) -> None:
        if self._writer is not None and self._owns:
            self._writer.close()
            self._writer = self._last_writer = None
        else:
            self.flush()
