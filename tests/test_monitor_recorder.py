"""The `Recorder` on its own: what the monitor and `replay` share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_batch, tiny_model

from redundancy_monitor import AlertConfig, ProbeConfig, ProbeSchedule, RedundancyMonitor, probe
from redundancy_monitor.errors import InvalidConfigError, MonitorStateError
from redundancy_monitor.monitoring.jsonl import JsonlSink, read_records
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.recorder import STATE_VERSION, Recorder
from redundancy_monitor.monitoring.sinks import MEMORY_FIELDS

FIRING = AlertConfig(gap_threshold=-10.0, hysteresis=2)
IDS = tiny_batch(2, 8)[0]
DATA = Path(__file__).parent / "data"


def models():
    return [tiny_model("gpt_neox", 4, seed=s) for s in (0, 1, 2)]


def comparable(path):
    """The records of a file without what differs between two runs (times)."""
    out = []
    for r in read_records(path):
        r = {k: v for k, v in r.items() if k not in ("wall_time", "probe_seconds")}
        r.pop("blocked_seconds", None)
        r.pop("skipped", None)  # the monitor's scheduling, unknown to an offline recorder
        if "result" in r:  # the monitor's own figures: time and memory of its snapshot
            for key in ("elapsed_s", *MEMORY_FIELDS):
                r["result"]["meta"].pop(key, None)
        out.append(r)
    return out


def test_a_recorder_fed_outcomes_writes_what_the_monitor_writes(tmp_path):
    mon = RedundancyMonitor(
        IDS,
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        alerts=FIRING,
        jsonl_path=tmp_path / "monitor.jsonl",
    )
    recorder = Recorder([JsonlSink(tmp_path / "recorder.jsonl")], alerts=FIRING)
    for step, model in enumerate(models()):
        mon.step(step, model)
        recorder.record(ProbeRecord(step, probe(model, IDS)))
    mon.close()
    recorder.close()
    assert comparable(tmp_path / "recorder.jsonl") == comparable(tmp_path / "monitor.jsonl")
    assert recorder.trajectory("gap_max") == mon.trajectory("gap_max")
    assert [(a.step, a.rule) for a in recorder.alerts] == [(a.step, a.rule) for a in mon.alerts]
    assert recorder.alerts and recorder.n_probes == mon.n_probes == 3


def test_recorder_state_round_trips_and_refuses_another_batch():
    recorder = Recorder(alerts=FIRING)
    recorder.use_batch("ab" * 32)
    for step, model in enumerate(models()[:2]):
        recorder.record(ProbeRecord(step, probe(model, IDS)))
    recorder.record(ProbeRecord(2, error="RuntimeError: simulated"))
    state = json.loads(json.dumps(recorder.state_dict(), allow_nan=False))
    again = Recorder(alerts=FIRING)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert (again.n_probes, again.n_failures) == (2, 1)
    with pytest.raises(MonitorStateError, match="another probe batch"):
        again.use_batch("cd" * 32)


def test_a_failing_on_alert_callback_is_logged_and_the_next_one_still_runs():
    seen = []

    def broken(alert):
        raise RuntimeError("callback bug")

    recorder = Recorder(alerts=FIRING, on_alert=[broken, seen.append], stop_on_alert=True)
    for step, model in enumerate(models()[:2]):
        recorder.record(ProbeRecord(step, probe(model, IDS)))
    assert [a.rule for a in seen] == [a.rule for a in recorder.alerts] and seen
    assert recorder.stop_requested


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"schedule": 200}, r"schedule must be a ProbeSchedule, got int; pass schedule="),
        ({"probe_config": {"pairs": "all"}}, r"probe_config must be a ProbeConfig, got dict"),
    ],
)
def test_a_schedule_or_probe_config_of_another_type_is_refused_with_a_hint(kwargs, says):
    with pytest.raises(InvalidConfigError, match=says):
        RedundancyMonitor(IDS, **kwargs)


def test_the_probe_config_reaches_every_probe():
    mon = RedundancyMonitor(
        IDS,
        executor="inline",
        schedule=ProbeSchedule.explicit([0]),
        probe_config=ProbeConfig(pairs="all", protocols=("interchange",)),
    )
    mon.step(0, tiny_model("gpt_neox", 4))
    expected = probe(tiny_model("gpt_neox", 4), IDS, pairs="all", protocols="interchange")
    assert mon.history[0].result.summary.scalars() == pytest.approx(
        expected.summary.scalars(), rel=1e-6
    )
    assert expected.summary.n_pairs == 6 and expected.summary.d_repl_mean is None


def test_history_keeps_summary_meta_and_timings_but_not_the_pairs():
    recorder = Recorder()
    result = probe(tiny_model("gpt_neox", 4), IDS)
    recorder.record(ProbeRecord(0, result, probe_seconds=0.5, blocked_seconds=0.01))
    (kept,) = recorder.history
    assert kept.result.summary == result.summary and kept.result.meta == result.meta
    assert kept.result.pairs == [] and len(result.pairs) == 3
    assert (kept.probe_seconds, kept.blocked_seconds) == (0.5, 0.01) and kept.wall_time > 0


def test_a_state_written_by_version_1_loads_with_its_trajectory_and_goes_on():
    # Written by redundancy-monitor 0.1.0 (state_version 1): probes at steps 0, 1 of a
    # 4-block model, then a new baseline at step 2 (5 blocks), with alerts fired.
    old = json.loads((DATA / "monitor_state_v1.json").read_text())
    assert old["state_version"] == 1
    mon = RedundancyMonitor(
        IDS,
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        alerts=FIRING,
        on_mismatch="new_baseline",
    )
    mon.load_state_dict(old)
    for name in ("gap_mean", "ir_median", "d1/gap_max", "n_pairs", "repl_strong"):
        assert mon.trajectory(name) == [(h["step"], h["scalars"][name]) for h in old["history"]]
    assert [r.result.summary.regime for r in mon.history] == [h["regime"] for h in old["history"]]
    assert [[r.step for r in t] for t in mon.earlier_trajectories] == [[0, 1]]
    assert [r.blocked_seconds for r in mon.earlier_trajectories[0]] == [
        h["blocked_seconds"] for h in old["earlier_trajectories"][0]
    ]
    assert [a.to_dict() for a in mon.alerts] == old["alerts"]
    assert (mon.n_probes, mon.last_step) == (old["n_probes"], 3)
    mon.step(4, tiny_model("gpt_neox", 5))  # continues the 5-block trajectory
    assert [r.step for r in mon.history] == [2, 3, 4] and mon.n_failures == 0
    state = json.loads(json.dumps(mon.state_dict(), allow_nan=False))
    assert state["state_version"] == STATE_VERSION == 2
    again = RedundancyMonitor(IDS, on_mismatch="new_baseline")
    again.load_state_dict(state)
    assert again.trajectory("gap_max") == mon.trajectory("gap_max")
    assert again.state_dict() == state
