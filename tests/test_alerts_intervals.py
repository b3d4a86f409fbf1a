"""Alerts judged on bootstrap intervals (docs/intervals.md), the TensorBoard band, and the
sample-size advice the monitor records at its first probe."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import tiny_batch, tiny_model

from redundancy_monitor import probe
from redundancy_monitor.monitoring.alerts import AlertConfig, AlertEngine
from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.schedule import ProbeSchedule
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink
from redundancy_monitor.probing.change import Change
from redundancy_monitor.probing.result import PairRecord, ProbeResult, summarize

ONLY_GAP = dict(growth_factor=None, overlap_threshold=None, regime_change=False, hysteresis=2)
ONLY_GROWTH = dict(gap_threshold=None, overlap_threshold=None, regime_change=False, hysteresis=1)
ONLY_REGIME = dict(gap_threshold=None, growth_factor=None, overlap_threshold=None, hysteresis=2)


def gap_result(gap, low=None, high=None, stability=None, d_int=0.02):
    """Three adjacent pairs whose gap is `gap` each, with a hand-set gap_median interval."""
    records = [PairRecord.build(k, k + 1, d_int + gap, d_int, d_int) for k in range(3)]
    summary = summarize(records)
    intervals = {} if low is None else {"gap_median": (low, high)}
    summary = dataclasses.replace(summary, intervals=intervals, regime_stability=stability)
    return ProbeResult(records, summary, meta={"n_layers": 4})


def fired(engine, results) -> list[int]:
    return [s for s, r in enumerate(results) if engine.observe(s, r)]


def test_threshold_fires_when_the_lower_bound_is_above_not_the_point():
    noisy = gap_result(0.15, low=0.08, high=0.22)  # point above 0.10, interval straddles it
    clear = gap_result(0.15, low=0.11, high=0.19)
    on = AlertEngine(AlertConfig(gap_threshold=0.1, **ONLY_GAP))
    off = AlertEngine(AlertConfig(gap_threshold=0.1, use_intervals=False, **ONLY_GAP))
    assert fired(on, [noisy, noisy, noisy, clear, clear]) == [4]
    assert fired(off, [noisy, noisy, noisy, clear, clear]) == [1]
    (alert,) = AlertEngine(AlertConfig(gap_threshold=0.1, **{**ONLY_GAP, "hysteresis": 1})).observe(
        7, clear
    )
    assert alert.value == 0.11 and alert.threshold == 0.1
    assert "[0.1100, 0.1900]" in alert.message and "lower bound" in alert.message


def change_of(delta, low=None, high=None, step=0):
    """A hand-made change since the baseline of the gap metric."""
    intervals = {} if low is None else {"gap_median": (low, high)}
    return Change(step, {"gap_median": delta}, intervals)


def test_growth_needs_the_change_above_the_limit_and_its_interval_above_half_of_it():
    baseline = gap_result(0.005)  # limit: (3 - 1) x the 0.01 floor = 0.02
    noisy = change_of(0.03, low=0.005, high=0.055)  # point above 0.02, could be < 0.01
    sure = change_of(0.03, low=0.012, high=0.048)  # point above, surely above 0.01
    below = change_of(0.019, low=0.015, high=0.023)  # surely > 0.01, point below 0.02
    on = AlertEngine(AlertConfig(growth_factor=3.0, **ONLY_GROWTH))
    strict = AlertEngine(AlertConfig(growth_factor=3.0, interval_fraction=1.0, **ONLY_GROWTH))
    off = AlertEngine(AlertConfig(growth_factor=3.0, use_intervals=False, **ONLY_GROWTH))
    for engine in (on, strict, off):
        engine.observe(0, baseline)
    level = gap_result(0.035)
    assert [a.rule for a in on.observe(1, level, noisy)] == []
    assert [a.rule for a in on.observe(2, level, below)] == []
    assert [a.rule for a in off.observe(1, level, noisy)] == ["gap_growth"]
    assert [a.rule for a in strict.observe(1, level, sure)] == []  # low 0.012 < 0.02
    (alert,) = on.observe(3, level, sure)
    assert alert.value == 0.03 and alert.threshold == pytest.approx(0.02)
    assert "[+0.0120, +0.0480]" in alert.message and "lower end is beyond +0.0100" in alert.message
    (alert,) = strict.observe(2, level, change_of(0.03, low=0.021, high=0.04))


def test_without_a_change_the_growth_rule_uses_the_point_change_since_its_baseline():
    engine = AlertEngine(AlertConfig(growth_factor=3.0, **ONLY_GROWTH))
    engine.observe(0, gap_result(0.005))
    assert engine.observe(1, gap_result(0.02)) == []  # +0.015
    (alert,) = engine.observe(2, gap_result(0.03))  # +0.025 > 0.02
    assert alert.value == pytest.approx(0.025)


def test_change_rule_state_round_trips():
    config = AlertConfig(growth_factor=3.0, **{**ONLY_GROWTH, "change_hysteresis": 2})
    engine = AlertEngine(config)
    engine.observe(0, gap_result(0.05))
    engine.observe(1, gap_result(0.3), change_of(0.25, 0.2, 0.3))  # the first of 2
    resumed = AlertEngine(config)
    resumed.load_state_dict(engine.state_dict())
    assert resumed.baseline == 0.05 and resumed.baseline_at == 0
    far = gap_result(0.3)
    assert (
        [a.rule for a in resumed.observe(2, far, change_of(0.25, 0.2, 0.3))]
        == [a.rule for a in engine.observe(2, far, change_of(0.25, 0.2, 0.3))]
        == ["gap_growth"]
    )


def test_a_probe_without_intervals_is_judged_on_its_point_value():
    engine = AlertEngine(AlertConfig(gap_threshold=0.1, **ONLY_GAP))
    assert fired(engine, [gap_result(0.15), gap_result(0.15)]) == [1]


def regime_result(regime: str, stability: float):
    tied = [(0.01, 0.009), (0.01, 0.009)]
    divergent = [(0.5, 0.05), (0.5, 0.05)]
    rows = tied if regime == "tied" else divergent
    records = [PairRecord.build(k, k + 1, r, r, i) for k, (r, i) in enumerate(rows)]
    summary = dataclasses.replace(summarize(records), regime_stability=stability)
    assert summary.regime == regime
    return ProbeResult(records, summary, meta={"n_layers": 3})


def test_regime_change_fires_only_for_a_stable_new_regime():
    seq = [regime_result("tied", 0.95)] + [regime_result("divergent", 0.6)] * 3
    seq += [regime_result("divergent", 0.9)] * 2
    on = AlertEngine(AlertConfig(**ONLY_REGIME))
    off = AlertEngine(AlertConfig(use_intervals=False, **ONLY_REGIME))
    assert fired(on, seq) == [5]
    assert fired(off, seq) == [2]
    assert on.regime == "divergent"


def test_an_uncertain_first_regime_is_not_the_reference():
    seq = [regime_result("divergent", 0.55), regime_result("tied", 0.9)]
    seq += [regime_result("tied", 0.9)] * 3
    engine = AlertEngine(AlertConfig(**ONLY_REGIME))
    assert fired(engine, seq) == [] and engine.regime == "tied"


# ----- the null run: weights never change, only the text sample does ----------------------


def test_alerts_with_intervals_never_fire_when_the_weights_never_change():
    """One model, probed on 12 disjoint batches as if they were a trajectory. The gap
    threshold is set to the value measured on all 72 sequences, so only noise can push a
    batch over it. Judged on intervals, no gap, growth or regime alert fires; judged on
    point estimates, the same probes do fire (the test can fail)."""
    model = tiny_model("llama", n_layers=5, seed=3)
    ids, _ = tiny_batch(n_seq=72, seq_len=12, seed=5)
    pooled = probe(model, ids, intervals=False).summary.gap_median
    results = [probe(model, ids[6 * k : 6 * (k + 1)]) for k in range(12)]
    config = dict(gap_threshold=pooled, overlap_threshold=None, hysteresis=2)
    with_intervals = AlertEngine(AlertConfig(**config))
    point_only = AlertEngine(AlertConfig(use_intervals=False, **config))
    fired_with = [a for s, r in enumerate(results) for a in with_intervals.observe(s, r)]
    fired_without = [a for s, r in enumerate(results) for a in point_only.observe(s, r)]
    assert fired_with == []
    assert len(fired_without) >= 1


# ----- TensorBoard band and the monitor's sample-size advice --------------------------------


def test_tensorboard_gets_the_band_and_a_margin_chart(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    ids, _ = tiny_batch(n_seq=6)
    results = [probe(tiny_model("llama", 4, seed=s), ids) for s in (0, 1)]
    sink = TensorBoardSink(log_dir=tmp_path, images=False)
    for step, result in zip((0, 10), results, strict=True):
        sink.write_probe(ProbeRecord(step, result, probe_seconds=0.1, blocked_seconds=0.0))
    sink.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    for bound, index in (("low", 0), ("high", 1)):
        got = [s.value for s in events.Scalars(f"redundancy/gap_median_{bound}")]
        want = [r.summary.interval("gap_median")[index] for r in results]
        assert got == pytest.approx(want, rel=1e-6)
    assert "redundancy_per_sequence/0-1/d_int" not in events.Tags()["histograms"]
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    margins = [c.margin for cat in layout.category for c in cat.chart if c.HasField("margin")]
    (series,) = margins[0].series
    assert (series.value, series.lower, series.upper) == (
        "redundancy/gap_median",
        "redundancy/gap_median_low",
        "redundancy/gap_median_high",
    )


def test_per_sequence_histograms_are_opt_in(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ids, _ = tiny_batch(n_seq=5)
    sink = TensorBoardSink(log_dir=tmp_path, images=False, per_sequence=True)
    sink.write_probe(
        ProbeRecord(0, probe(tiny_model("llama", 3), ids), probe_seconds=0.1, blocked_seconds=0.0)
    )
    sink.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    (h,) = events.Histograms("redundancy_per_sequence/0-1/d_int")
    assert h.histogram_value.num == 5


def test_monitor_logs_and_records_sample_size_advice_for_the_level_and_the_change(tmp_path, caplog):
    ids, _ = tiny_batch(n_seq=6)
    model = tiny_model("llama", 4)
    monitor = RedundancyMonitor(
        ids,
        schedule=ProbeSchedule.explicit([0, 2, 4]),
        executor="inline",
        jsonl_path=tmp_path / "r.jsonl",
    )
    with caplog.at_level(logging.INFO, logger="redundancy_monitor"):
        monitor.start()
        for step in range(5):
            if step == 3:  # the weights move only after step 2: no change before
                with torch.no_grad():
                    model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
            monitor.step(step, model)
        monitor.close()
    advice = [r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "sample_size"]
    assert [(a["step"], a["of"]) for a in advice] == [(0, "level"), (4, "change")]
    first = monitor.history[0]
    assert advice[0]["metric"] == "gap_median" and advice[0]["n_seq"] == 6
    assert advice[0]["value"] == first.result.summary.gap_median
    assert advice[0]["n_seq_needed"] >= 2 and advice[0]["target_halfwidth"] == 0.02
    change = monitor.history[2].change.baseline
    assert advice[1]["since"] == 0 and advice[1]["value"] == change.value("gap_median")
    assert advice[1]["halfwidth"] == pytest.approx(
        (change.interval("gap_median")[1] - change.interval("gap_median")[0]) / 2
    )
    assert advice[1]["target_halfwidth"] == 0.005
    assert any("probe batch precision: gap_median" in m for m in caplog.messages)
    assert any("change of gap_median since step 0" in m for m in caplog.messages)
    assert any("level at the baseline probe (step 0)" in m for m in caplog.messages)


def test_the_model_is_unchanged_by_a_probe_with_intervals():
    model = tiny_model("gpt_neox", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe(model, tiny_batch(n_seq=4)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
