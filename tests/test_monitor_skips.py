"""No silent skips: a probe skipped because the previous one still runs is a warning
that says what would fit, counted in the records and TensorBoard; a `max_overhead`
schedule spaces probes by their measured cost; the train-end wait is logged."""

from __future__ import annotations

import logging
import math
import re
import threading
import time

import pytest
from conftest import tiny_batch, tiny_model

import redundancy_monitor.monitoring.monitor as monitor_module
from redundancy_monitor import ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.schedule import OverheadPacer


def held_probe(monkeypatch, seconds: float = 0.0):
    """Make probes wait for the returned event (and take at least `seconds`)."""
    release = threading.Event()
    real = monitor_module.probe

    def slow(*args, **kwargs):
        time.sleep(seconds)
        release.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", slow)
    return release


def test_the_first_skip_warns_with_the_measured_times_and_a_period_that_fits(
    monkeypatch, caplog, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from redundancy_monitor.monitoring.tensorboard import TensorBoardSink

    release = held_probe(monkeypatch, seconds=0.3)
    release.set()  # the first probe only takes its 0.3 s
    model = tiny_model("gpt_neox", 4)
    sink = TensorBoardSink(log_dir=tmp_path / "tb", images=False)
    mon = RedundancyMonitor(
        tiny_batch()[0],
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        jsonl_path=tmp_path / "r.jsonl",
        sinks=[sink],
    )
    mon.step(1, model)
    mon.drain()  # measured: about 0.3 s
    release.clear()
    caplog.set_level(logging.INFO, logger="redundancy_monitor")
    mon.step(2, model)  # held until released
    for step in (3, 4, 5):
        time.sleep(0.02)
        mon.step(step, model)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step 3 skipped" in warnings[0].getMessage()
    message = warnings[0].getMessage()
    last = float(re.search(r"last finished one took ([\d.]+) s", message).group(1))
    per_step = float(re.search(r"took ([\d.]+) s per step", message).group(1))
    fits = int(re.search(r"every_n_steps=(\d+)", message).group(1))
    assert last >= 0.3 and 0.015 <= per_step < 0.3
    # What the figures in the message give (they are rounded): a quarter to spare.
    assert fits == pytest.approx(math.ceil(1.25 * last / per_step), rel=0.15) and fits > 5
    skipped_info = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert [r.levelno for r in skipped_info] == [logging.WARNING, logging.INFO, logging.INFO]

    release.set()
    mon.drain()
    mon.step(6, model)
    mon.drain()
    assert mon.n_skipped_busy == 3
    mon.close()
    probes = [r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "probe"]
    assert [(r["step"], r["skipped"]) for r in probes] == [(1, 0), (2, 0), (6, 3)]
    events = EventAccumulator(str(sink.log_dir)).Reload()
    skipped = [(e.step, e.value) for e in events.Scalars("redundancy_probe/skipped")]
    assert skipped == [(1, 0.0), (2, 0.0), (6, 3.0)]


def test_a_max_overhead_schedule_keeps_probes_within_their_share_of_the_time(monkeypatch):
    starts: list[float] = []
    real = monitor_module.probe

    def slow(*args, **kwargs):
        starts.append(time.perf_counter())
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", slow)
    model = tiny_model("gpt_neox", 4)
    cap = 0.5
    mon = RedundancyMonitor(
        tiny_batch()[0],
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False, max_overhead=cap),
    )
    for step in range(200):
        mon.step(step, model)
        time.sleep(0.01)
    mon.close()
    records = mon.history
    assert 2 <= len(records) < 100 and mon.n_skipped_busy == 0  # 200 were due
    for (a, start_a), start_b in zip(zip(records, starts, strict=False), starts[1:], strict=False):
        cost = a.blocked_seconds  # inline: the training thread waited for the whole probe
        assert start_b - start_a >= cost / cap * 0.999  # never more than the cap


def test_the_overhead_pacer_lets_a_probe_start_once_its_share_allows():
    pacer = OverheadPacer(0.1)
    assert pacer.allows(100.0)  # nothing measured yet
    pacer.started(100.0)
    assert not pacer.allows(200.0)  # still running: its cost is not known
    pacer.finished(ProbeRecord(5, None, "x", probe_seconds=1.5, blocked_seconds=0.5))
    assert not pacer.allows(119.9) and pacer.allows(120.0)  # 2 s / 0.1 after its start
    pacer.started(200.0)  # inline: the wait holds the probe's own 1.5 s
    pacer.finished(ProbeRecord(6, None, "x", probe_seconds=1.5, blocked_seconds=1.6))
    assert not pacer.allows(215.9) and pacer.allows(216.0)
    assert OverheadPacer(None).allows(0.0)


@pytest.mark.parametrize("cap", [0, -0.1, 1.5, True, "10%"])
def test_a_max_overhead_outside_0_1_is_refused_with_an_example(cap):
    with pytest.raises(InvalidConfigError, match=r"max_overhead=0\.1"):
        ProbeSchedule(max_overhead=cap)


def test_train_end_logs_how_long_training_waited_for_the_final_probe(monkeypatch, caplog):
    held_probe(monkeypatch, seconds=0.2).set()
    model = tiny_model("gpt_neox", 4)
    mon = RedundancyMonitor(tiny_batch()[0], schedule=ProbeSchedule(10, log_spaced=False))
    caplog.set_level(logging.INFO, logger="redundancy_monitor")
    mon.step(3, model)
    mon.train_end(3, model)
    (line,) = [r.getMessage() for r in caplog.records if "at train end" in r.getMessage()]
    waited = float(re.search(r"waited ([\d.]+) s", line).group(1))
    assert waited >= 0.2 and "final weights, step 3, probed" in line
    mon.close()


def test_a_max_overhead_schedule_probes_the_same_steps_on_every_rank(tmp_path):
    import json

    from test_distributed_probe import torchrun
    from test_distributed_training import SCRIPTS

    torchrun(SCRIPTS / "paced_loop.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # rank 0's clock decides: no rank waits in a collective
    assert 2 <= len(ranks[0]["probed"]) < 60 and ranks[0]["skipped"] == 0
