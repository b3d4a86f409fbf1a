"""Protocols are part of a trajectory's identity; pair sets are compared as the pairs
they expand to, however they are spelled."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_batch, tiny_model

from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.errors import MonitorStateError
from redundancy_monitor.monitoring.guard import TrajectoryGuard
from redundancy_monitor.probing.probe import probe

IDS = tiny_batch(2, 8)[0]


def monitor(path=None, on_mismatch="refuse", **probe_settings):
    return RedundancyMonitor(
        IDS,
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        probe_config=ProbeConfig(**probe_settings),
        jsonl_path=path,
        on_mismatch=on_mismatch,
    )


def saved_state(**kw):
    mon = monitor(**kw)
    model = tiny_model("gpt_neox", 4)
    mon.step(0, model)
    mon.step(1, model)
    return json.loads(json.dumps(mon.state_dict()))


def test_resuming_with_fewer_protocols_is_refused_with_what_to_do():
    state = saved_state()
    with pytest.raises(MonitorStateError, match=r"protocols.*on_mismatch='new_baseline'"):
        monitor(protocols=("replacement",)).load_state_dict(state)


def test_protocols_in_another_order_are_the_same_trajectory():
    state = saved_state()
    mon = monitor(protocols=("interchange", "replacement"))
    mon.load_state_dict(state)
    mon.step(2, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [0, 1, 2] and mon.n_failures == 0


def test_new_baseline_on_fewer_protocols_starts_a_new_trajectory_without_false_alerts(tmp_path):
    state = saved_state()
    mon = monitor(tmp_path / "r.jsonl", protocols=("replacement",), on_mismatch="new_baseline")
    mon.load_state_dict(state)
    mon.step(2, tiny_model("gpt_neox", 4))
    marker = next(r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "new_baseline")
    assert marker["step"] == 2 and "other protocols" in marker["reason"]
    assert [h.step for h in mon.history] == [2]
    assert [a.rule for a in mon.alerts if a.step == 2] == []  # no removal_overlap from a gap


def test_the_guard_names_a_protocol_change():
    model = tiny_model("gpt_neox", 4)
    both = probe(model, IDS)
    guard = TrajectoryGuard()
    assert guard.check(both) is None
    change = guard.check(probe(model, IDS, protocols=("replacement",)))
    assert change is not None and "other protocols" in change


@pytest.mark.parametrize(
    "pairs", ["window:1", "Adjacent", [(0, 1), (1, 2), (2, 3)], [(2, 3), (1, 0), (1, 2)]]
)
def test_resuming_with_another_spelling_of_the_same_pairs_continues_the_trajectory(pairs):
    state = saved_state()
    mon = monitor(pairs=pairs)
    mon.load_state_dict(state)
    mon.step(2, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [0, 1, 2] and mon.n_failures == 0


def test_an_explicit_list_resumed_as_its_name_continues_the_trajectory():
    state = saved_state(pairs=[(0, 1), (1, 2), (2, 3)])
    mon = monitor(pairs="adjacent")
    mon.load_state_dict(state)
    mon.step(2, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [0, 1, 2]


@pytest.mark.parametrize("pairs", ["window:2", "all", [(0, 1), (1, 2)]])
def test_resuming_with_other_pairs_is_still_refused(pairs):
    state = saved_state()
    with pytest.raises(MonitorStateError, match="pairs="):
        monitor(pairs=pairs).load_state_dict(state)
