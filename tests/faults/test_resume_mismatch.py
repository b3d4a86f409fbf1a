"""Resuming or going on with another probe batch, pair set or model depth: a clear
refusal, or (opt-in) a new baseline with a marker record; never a silently mixed
trajectory."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_batch, tiny_model

from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.errors import InvalidConfigError, MonitorStateError


def monitor(ids=None, path=None, **kw):
    return RedundancyMonitor(
        tiny_batch(2, 8)[0] if ids is None else ids,
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        jsonl_path=path,
        **kw,
    )


def saved_state(**kw):
    mon = monitor(**kw)
    mon.step(0, tiny_model("gpt_neox", 4))
    mon.step(1, tiny_model("gpt_neox", 4))
    return json.loads(json.dumps(mon.state_dict()))


def test_resuming_with_another_pair_set_is_refused_with_what_to_do():
    state = saved_state()
    with pytest.raises(MonitorStateError, match=r"pairs='adjacent'.*on_mismatch='new_baseline'"):
        monitor(probe_config=ProbeConfig(pairs="all")).load_state_dict(state)


def test_resuming_with_another_probe_batch_is_refused_and_names_the_opt_in():
    state = saved_state()
    with pytest.raises(MonitorStateError, match=r"another probe batch.*new_baseline"):
        monitor(ids=tiny_batch(2, 8, seed=7)[0]).load_state_dict(state)


def test_resuming_a_deeper_model_is_refused_at_its_first_probe(tmp_path):
    mon = monitor(path=tmp_path / "r.jsonl")
    mon.load_state_dict(saved_state())
    mon.step(2, tiny_model("gpt_neox", 6))
    assert mon.n_failures == 1 and [h.step for h in mon.history] == [0, 1]
    failure = next(r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "failure")
    assert "MonitorStateError" in failure["error"] and "6-block model" in failure["error"]
    assert "on_mismatch='new_baseline'" in failure["error"]
    assert [a.rule for a in mon.alerts][-1] == "probe_failure"


@pytest.mark.parametrize(
    ("change", "says"),
    [("batch", "another probe batch"), ("pairs", "another pair set")],
)
def test_new_baseline_on_resume_writes_a_marker_and_starts_a_fresh_trajectory(
    tmp_path, change, says
):
    state = saved_state()
    window = {"probe_config": ProbeConfig(pairs="window:2")}
    kw = {"ids": tiny_batch(2, 8, seed=7)[0]} if change == "batch" else window
    mon = monitor(path=tmp_path / "r.jsonl", on_mismatch="new_baseline", **kw)
    mon.load_state_dict(state)
    mon.step(2, tiny_model("gpt_neox", 4))
    mon.step(3, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [2, 3]
    assert [[h.step for h in t] for t in mon.earlier_trajectories] == [[0, 1]]
    markers = [r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "new_baseline"]
    assert [m["step"] for m in markers] == [2] and says in markers[0]["reason"]
    again = monitor(on_mismatch="new_baseline", **kw)
    again.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert again.trajectory() == mon.trajectory() and again.earlier_trajectories == [
        mon.earlier_trajectories[0]
    ]


def test_depth_changing_mid_run_is_refused_and_the_old_depth_goes_on(tmp_path):
    mon = monitor(path=tmp_path / "r.jsonl")
    four, five = tiny_model("gpt_neox", 4), tiny_model("gpt_neox", 5)
    mon.step(0, four)
    mon.step(1, five)
    mon.step(2, four)
    assert [h.step for h in mon.history] == [0, 2] and mon.n_failures == 1
    kinds = [(r["type"], r["step"]) for r in read_records(tmp_path / "r.jsonl")]
    assert ("failure", 1) in kinds and ("probe", 1) not in kinds


def test_depth_changing_mid_run_with_new_baseline_resets_the_alert_baseline(tmp_path):
    mon = monitor(path=tmp_path / "r.jsonl", on_mismatch="new_baseline")
    mon.step(0, tiny_model("gpt_neox", 4))
    mon.step(1, tiny_model("gpt_neox", 5))
    assert mon.recorder.alert_engine.baseline_at == 1
    assert [h.step for h in mon.history] == [1]
    marker = next(r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "new_baseline")
    assert "5-block model (the trajectory has 4)" in marker["reason"]
    assert (marker["previous"]["n_layers"], marker["current"]["n_layers"]) == (4, 5)


def test_an_unknown_mismatch_policy_is_a_clear_error():
    with pytest.raises(InvalidConfigError, match="on_mismatch must be one of"):
        monitor(on_mismatch="ignore")
