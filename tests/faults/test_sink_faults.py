"""Sink faults: the record file's disk full or folder removed, the TensorBoard writer
failing. Training goes on, the failure is counted and alerted once per outage, nothing
written before is damaged, and records written during a passing fault are not lost."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
from conftest import tiny_batch, tiny_model
from fault_fixtures import event_accumulator, scalar_steps

import redundancy_monitor.monitoring.jsonl as jsonl_module
from redundancy_monitor import AlertConfig, ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.errors import RecordFileLost
from redundancy_monitor.monitoring.jsonl import JsonlSink

QUIET = AlertConfig(
    gap_threshold=None, growth_factor=None, overlap_threshold=None, regime_change=False
)


def monitor(path, **kw):
    kw.setdefault("alerts", QUIET)
    return RedundancyMonitor(
        tiny_batch(2, 8)[0],
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        jsonl_path=path,
        **kw,
    )


class FullDisk:
    """os.write for one sink's file: half the first line, then ENOSPC, while `full`."""

    def __init__(self, monkeypatch, sink: JsonlSink):
        self.real, self.sink, self.full, self.calls = os.write, sink, False, 0
        monkeypatch.setattr(jsonl_module.os, "write", self)

    def __call__(self, fd, data):
        if not self.full or fd != self.sink._fd:
            return self.real(fd, data)
        self.calls += 1
        if self.calls == 1:  # a short write, as a disk filling up gives
            return self.real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def kinds(path, **kw):
    return [(r["type"], r["step"]) for r in read_records(path, **kw)]


def test_disk_full_is_counted_alerted_once_and_records_are_written_once_space_frees(
    tmp_path, monkeypatch
):
    path = tmp_path / "run" / "r.jsonl"
    mon = monitor(path)
    model = tiny_model("gpt_neox", 4)
    disk = FullDisk(monkeypatch, mon.sinks[0])
    mon.step(0, model)
    mon.step(1, model)
    before = path.read_bytes()
    disk.full = True
    mon.step(2, model)
    mon.step(3, model)
    assert path.read_bytes() == before  # the half line was cut away again
    assert mon.n_sink_errors >= 2
    assert [(a.rule, a.step) for a in mon.alerts] == [("sink_failure", 2)]
    assert "No space left on device" in mon.alerts[0].message
    assert mon.sinks[0].n_pending == 3  # probe 2, the alert, probe 3
    disk.full = False
    mon.step(4, model)
    mon.close()
    assert kinds(path) == [
        ("probe", 0),
        ("sample_size", 0),  # the precision of the probe batch, at the first probe
        ("baseline_state", 0),  # the level at the baseline, as information
        ("probe", 1),
        ("probe", 2),
        ("alert", 2),
        ("probe", 3),
        ("probe", 4),
    ]
    assert [h.step for h in mon.history] == [0, 1, 2, 3, 4]
    assert mon.state_dict()["n_sink_errors"] == mon.n_sink_errors


def test_a_second_outage_alerts_again_and_a_continuing_one_does_not(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    mon = monitor(path)
    model = tiny_model("gpt_neox", 4)
    disk = FullDisk(monkeypatch, mon.sinks[0])
    for step, full in enumerate([False, True, True, True, False, True, False]):
        disk.full, disk.calls = full, 0
        mon.step(step, model)
    mon.close()
    assert [(a.rule, a.step) for a in mon.alerts] == [("sink_failure", 1), ("sink_failure", 5)]
    assert [r["step"] for r in read_records(path) if r["type"] == "probe"] == list(range(7))


def test_cooldown_spaces_sink_failure_alerts(tmp_path, monkeypatch):
    alerts = AlertConfig(**{**QUIET.__dict__, "cooldown_steps": 10})
    mon = monitor(tmp_path / "r.jsonl", alerts=alerts)
    model = tiny_model("gpt_neox", 4)
    disk = FullDisk(monkeypatch, mon.sinks[0])
    for step, full in enumerate([True, False, True, False]):
        disk.full, disk.calls = full, 0
        mon.step(step, model)
    mon.close()
    assert [(a.rule, a.step) for a in mon.alerts] == [("sink_failure", 0)]
    assert mon.n_sink_errors >= 2


def test_removed_folder_is_recreated_and_the_loss_is_reported(tmp_path):
    folder = tmp_path / "logs"
    path = folder / "r.jsonl"
    mon = monitor(path)
    model = tiny_model("gpt_neox", 4)
    mon.step(0, model)
    mon.step(1, model)
    shutil.rmtree(folder)  # the open file now has no name: writes would vanish silently
    mon.step(2, model)
    mon.step(3, model)
    mon.close()
    assert mon.n_sink_errors == 1
    assert [a.rule for a in mon.alerts] == ["sink_failure"]
    assert "was removed while the run was writing it" in mon.alerts[0].message
    assert kinds(path) == [("probe", 2), ("alert", 2), ("probe", 3)]


def test_records_wait_while_the_folder_cannot_be_created_and_follow_when_it_can(tmp_path):
    folder = tmp_path / "logs"
    path = folder / "r.jsonl"
    mon = monitor(path)
    model = tiny_model("gpt_neox", 4)
    mon.step(0, model)
    shutil.rmtree(folder)
    folder.write_text("a file where the folder was")  # mkdir fails until it is gone
    mon.step(1, model)
    mon.step(2, model)
    assert mon.sinks[0].n_pending >= 2 and mon.n_sink_errors >= 2
    assert [a.rule for a in mon.alerts] == ["sink_failure"]
    folder.unlink()
    mon.step(3, model)
    mon.close()
    assert kinds(path) == [("probe", 1), ("alert", 1), ("probe", 2), ("probe", 3)]


def test_pending_records_beyond_the_cap_are_dropped_counted_and_reported_at_close(
    tmp_path, monkeypatch
):
    sink = JsonlSink(tmp_path / "r.jsonl", max_pending=2)
    sink.write_failure(0, "written")
    disk = FullDisk(monkeypatch, sink)
    disk.full = True
    for step in (1, 2, 3):
        with pytest.raises(OSError, match="No space left"):
            sink.write_failure(step, "pending")
    assert (sink.n_pending, sink.n_dropped) == (2, 1)
    disk.full = False
    with pytest.raises(RecordFileLost, match="1 record"):
        sink.close()
    assert [r["step"] for r in read_records(tmp_path / "r.jsonl")] == [0, 2, 3]


def test_tensorboard_writer_failing_mid_run_is_counted_alerted_and_training_goes_on(
    tmp_path, monkeypatch
):
    pytest.importorskip("lightning")
    from lightning.pytorch import Callback
    from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    class BreakWriter(Callback):
        """The writer's add_scalar raises for our tags while the step is in 2..3."""

        def on_train_batch_end(self, trainer, *args):
            writer_cls = type(trainer.logger.experiment)
            real = getattr(writer_cls, "_real_add_scalar", writer_cls.add_scalar)
            monkeypatch.setattr(writer_cls, "_real_add_scalar", real, raising=False)
            broken = 2 <= trainer.global_step <= 3

            def add_scalar(writer, tag, *a, **kw):
                if broken and tag.startswith("redundancy/"):
                    raise OSError(errno.EIO, "simulated: TensorBoard event file write failed")
                return real(writer, tag, *a, **kw)

            monkeypatch.setattr(writer_cls, "add_scalar", add_scalar)

    cb = RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule(1, log_spaced=False),
        executor="inline",
        alerts=QUIET,
    )
    trainer = lightning_trainer(tmp_path, [BreakWriter(), cb], max_steps=5)
    trainer.fit(lightning_module(), token_loader())
    mon = cb.monitor
    assert trainer.global_step == 5
    assert mon.n_sink_errors >= 2  # steps 2 and 3
    assert [(a.rule, a.step) for a in mon.alerts] == [("sink_failure", 2)]
    assert "TensorBoardSink.write_probe" in mon.alerts[0].message
    records = read_records(cb.jsonl_file)
    assert [r["step"] for r in records if r["type"] == "probe"] == [0, 1, 2, 3, 4, 5]
    assert [r["rule"] for r in records if r["type"] == "alert"] == ["sink_failure"]
    acc = event_accumulator(cb.tensorboard_dir)
    assert scalar_steps(acc, "redundancy/gap_mean") == [0, 1, 4, 5]


def test_records_written_before_a_fault_are_byte_identical_after_it(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path)
    for step in range(3):
        sink.write_failure(step, "before")
    before = path.read_bytes()
    disk = FullDisk(monkeypatch, sink)
    disk.full = True
    with pytest.raises(OSError):
        sink.write_failure(3, "x" * 10_000)
    assert path.read_bytes() == before
    assert [json.loads(x)["step"] for x in before.decode().splitlines()] == [0, 1, 2]
