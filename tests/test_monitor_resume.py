"""Resume never kills a run: a save never waits for a probe, the probe batch travels in
the state, and a changed configuration starts a new trajectory with an alert."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import tiny_batch, tiny_model

import redundancy_monitor.monitoring.monitor as monitor_module
from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.errors import MonitorStateError

EVERY_STEP = ProbeSchedule(1, log_spaced=False, at_train_end=False)


def monitor(ids=None, **kw):
    defaults = dict(executor="inline", schedule=EVERY_STEP)
    return RedundancyMonitor(ids, **{**defaults, **kw})


def saved_state(**kw):
    mon = monitor(tiny_batch(2, 8)[0], **kw)
    model = tiny_model("gpt_neox", 4)
    mon.step(0, model)
    mon.step(1, model)
    return json.loads(json.dumps(mon.state_dict(), allow_nan=False))


@pytest.fixture
def held_probe(monkeypatch):
    """Probes wait for `release` before they run."""
    release = threading.Event()
    real_probe = monitor_module.probe

    def held(*args, **kwargs):
        release.wait(timeout=60)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", held)
    yield release
    release.set()


def test_a_save_during_a_probe_does_not_wait_and_marks_the_step_pending(held_probe, tmp_path):
    model = tiny_model("gpt_neox", 4)
    mon = monitor(
        tiny_batch(2, 8)[0],
        executor="background",
        schedule=ProbeSchedule.explicit([3], at_train_end=False),
    )
    mon.step(3, model)
    state = mon.state_dict()  # would block until the probe is released if it waited
    assert mon._executor.busy()
    assert state["pending_step"] == 3 and state["probed_steps"] == [] and state["history"] == []
    json.dumps(state, allow_nan=False)
    held_probe.set()
    mon.close()
    assert [h.step for h in mon.history] == [3]  # the live run still logs it


def test_a_run_resumed_from_a_save_made_mid_probe_probes_that_step_once(held_probe, tmp_path):
    path = tmp_path / "r.jsonl"
    model = tiny_model("gpt_neox", 4)
    first = monitor(tiny_batch(2, 8)[0], executor="background", jsonl_path=path)
    first.step(0, model)
    first.drain()
    first.step(1, model)  # running when the checkpoint is saved
    state = json.loads(json.dumps(first.state_dict()))
    held_probe.set()
    first.close()  # the interrupted run still wrote its step-1 record after the save
    assert [r["step"] for r in read_records(path) if r["type"] == "probe"] == [0, 1]

    resumed = monitor(tiny_batch(2, 8)[0], executor="inline", jsonl_path=path)
    resumed.load_state_dict(state)
    resumed.start()
    resumed.step(1, model)  # the resume step: probed again from the checkpoint's weights
    resumed.step(2, model)
    resumed.close()
    assert resumed.probed_steps == [0, 1, 2]
    assert [h.step for h in resumed.history] == [0, 1, 2]
    assert [r["step"] for r in read_records(path) if r["type"] == "probe"] == [0, 1, 2]


def test_the_probe_batch_travels_in_the_state_and_wins_over_a_loader_on_resume():
    first_loader = [torch.arange(24).reshape(3, 8) % 97]
    mon = monitor()
    mon.set_probe_batch(dataloader=first_loader)
    mon.step(0, tiny_model("gpt_neox", 4))
    state = json.loads(json.dumps(mon.state_dict()))
    assert state["probe_batch"]["input_ids"] == first_loader[0].tolist()

    other_loader = [torch.arange(24).reshape(3, 8).flip(1) % 97]  # a shuffled loader, resumed
    for strict in (True, False):
        resumed = monitor()
        resumed.load_state_dict(state, strict=strict)
        resumed.set_probe_batch(dataloader=other_loader)  # what an adapter falls back to
        assert resumed.batch_sha256 == mon.batch_sha256
    given_loader = monitor(dataloader=other_loader)  # a loader passed by the user
    given_loader.load_state_dict(state)
    assert given_loader.batch_sha256 == mon.batch_sha256


def test_a_given_batch_that_differs_from_the_checkpoint_starts_a_new_trajectory(tmp_path):
    state = saved_state()
    other = tiny_batch(2, 8, seed=7)[0]
    with pytest.raises(MonitorStateError, match="another probe batch"):
        monitor(other).load_state_dict(state)  # strict: a library user is told
    mon = monitor(other, jsonl_path=tmp_path / "r.jsonl")
    mon.load_state_dict(state, strict=False)  # an adapter: never raises
    mon.start()
    mon.step(2, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [2]
    assert [[h.step for h in t] for t in mon.earlier_trajectories] == [[0, 1]]
    assert [a.rule for a in mon.alerts][-1] == "resume_change"
    assert "another probe batch" in mon.alerts[-1].message
    records = read_records(tmp_path / "r.jsonl")
    assert [(r["type"], r["step"]) for r in records if r["type"] != "alert"] == [
        ("new_baseline", 2),
        ("probe", 2),
        ("sample_size", 2),  # the new batch's precision, at the new trajectory's first probe
        ("baseline_state", 2),  # its level, once, as information
    ]


@pytest.mark.parametrize("policy", ["refuse", "new_baseline"])
def test_resuming_with_other_pairs_from_a_hook_starts_a_new_trajectory_with_an_alert(policy):
    state = saved_state()
    seen = []
    mon = monitor(
        tiny_batch(2, 8)[0],
        probe_config=ProbeConfig(pairs="window:2"),
        on_mismatch=policy,
        on_alert=seen.append,
    )
    mon.load_state_dict(state, strict=False)
    mon.start()
    mon.step(2, tiny_model("gpt_neox", 4))
    mon.step(3, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [2, 3] and mon.n_failures == 0
    assert [a.rule for a in seen].count("resume_change") == 1 and seen[0].rule == "resume_change"
    assert "pairs='window:2' (the checkpoint has pairs='adjacent')" in seen[0].message


def test_a_resume_change_alert_never_stops_or_checkpoints_the_run():
    state = saved_state()
    mon = monitor(
        tiny_batch(2, 8)[0],
        probe_config=ProbeConfig(pairs="all"),
        stop_on_alert=True,
        checkpoint_on_alert=True,
    )
    mon.load_state_dict(state, strict=False)
    mon.step(2, tiny_model("gpt_neox", 4))
    assert "resume_change" in [a.rule for a in mon.alerts]
    assert not mon.stop_requested and not mon.checkpoint_requested


def test_another_number_of_ranks_on_resume_starts_a_new_trajectory():
    state = saved_state()
    state["world_size"] = 2  # written by a 2-rank run; this process probes alone
    mon = monitor(tiny_batch(2, 8)[0])
    mon.load_state_dict(state, strict=False)
    mon.start()
    mon.step(2, tiny_model("gpt_neox", 4))
    assert [a.rule for a in mon.alerts][-1] == "resume_change"
    assert "1 rank(s) share the probe (the checkpoint was written with 2)" in (
        mon.alerts[-1].message
    )
    assert [h.step for h in mon.history] == [2]


def test_same_number_of_ranks_on_resume_continues_the_trajectory():
    state = saved_state()
    mon = monitor(tiny_batch(2, 8)[0])
    mon.load_state_dict(state, strict=False)
    mon.start()
    mon.step(2, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [0, 1, 2]
    assert "resume_change" not in [a.rule for a in mon.alerts]


def test_a_state_from_a_newer_version_is_ignored_from_a_hook_and_refused_otherwise():
    state = saved_state()
    state["state_version"] = 99
    with pytest.raises(MonitorStateError, match="upgrade"):
        monitor(tiny_batch(2, 8)[0]).load_state_dict(state)
    mon = monitor(tiny_batch(2, 8)[0])
    mon.load_state_dict(state, strict=False)
    mon.step(5, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [5]
    assert [a.rule for a in mon.alerts] == ["resume_change"]
