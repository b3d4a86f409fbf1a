"""Where users see change: TensorBoard scalars and charts (read back from the event
file), the report's change figure, and `redundancy-monitor compare`."""

from __future__ import annotations

import re

import pytest
from test_change_records import _result

from redundancy_monitor.monitoring.probe_config import ProbeConfig
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.recorder import Recorder
from redundancy_monitor.monitoring.tensorboard import LAYOUT_TAG, TensorBoardSink


def recorded(tmp_path, sinks):
    recorder = Recorder(sinks, probe_config=ProbeConfig())
    for step, seed in ((0, 0), (10, 1), (20, 2)):
        recorder.record(
            ProbeRecord(step, _result(seed, "a" * 64), probe_seconds=1.0, blocked_seconds=0.0)
        )
    recorder.close()
    return recorder


def test_tensorboard_gets_the_change_with_its_band_and_charts_match_exactly_their_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    recorder = recorded(tmp_path, [TensorBoardSink(log_dir=tmp_path, images=False)])
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    last = recorder.history[-1].change
    for suffix, index in (("", None), ("_low", 0), ("_high", 1)):
        got = [
            (e.step, e.value)
            for e in events.Scalars(f"redundancy_since_baseline/gap_median{suffix}")
        ]
        want = [
            (r.step, r.change.baseline.value("gap_median") if index is None
             else r.change.baseline.interval("gap_median")[index])
            for r in recorder.history[1:]
        ]  # fmt: skip
        assert [s for s, _ in got] == [10, 20]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert last.previous.step == 10
    assert events.Scalars("redundancy_since_previous/gap_mean")[-1].value == pytest.approx(
        last.previous.value("gap_mean"), rel=1e-6
    )
    (config,) = events.Tensors(LAYOUT_TAG)
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    matched = {
        title: {t for t in scalars for pattern in c.multiline.tag if re.search(pattern, t)}
        for title, c in charts.items()
        if c.HasField("multiline")
    }
    assert matched["protocol gap (nats)"] == {
        f"redundancy/gap_{k}" for k in ("mean", "median", "p75", "max")
    }  # not gap_median_low / _high
    assert matched["interchange / replacement ratio"] == {"redundancy/ir_median"}
    assert matched["gap by pair separation (nats)"] == {"redundancy_separation/d1/gap_mean"}
    assert matched["change since the baseline probe (nats)"] == {
        f"redundancy_since_baseline/{k}"
        for k in ("gap_mean", "gap_median", "d_repl_mean", "d_int_mean")
    }
    band = charts["gap_median change since the baseline, with its paired interval (nats)"]
    (series,) = band.margin.series
    assert (series.value, series.lower, series.upper) == (
        "redundancy_since_baseline/gap_median",
        "redundancy_since_baseline/gap_median_low",
        "redundancy_since_baseline/gap_median_high",
    )
    assert {series.value, series.lower, series.upper} <= set(scalars)
