"""Shutdown with a probe still running: at train end (joined, result kept), on close,
at an exception and at KeyboardInterrupt (cancelled or abandoned within a bound). The
interpreter always exits. Bounds here are hang checks, tens of times the expected time."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from conftest import subprocess_env, tiny_batch, tiny_model
from fault_fixtures import ROOT, slow_engine

import redundancy_monitor.monitoring.monitor as monitor_module
from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, read_records

IDS = tiny_batch(3, 16)[0]
SLOW = ProbeConfig(batch_tokens=48)  # one variant per group, 9 groups


def slow_monitor(at_train_end=True, **kw):
    schedule = ProbeSchedule.explicit([0], at_train_end=at_train_end)
    return RedundancyMonitor(IDS, schedule=schedule, probe_config=SLOW, **kw)


def test_close_cancels_a_long_probe_between_variant_groups(monkeypatch):
    started = threading.Event()
    slow_engine(monkeypatch, 0.5, started)  # 9 groups: about 5 s if left to finish
    model = tiny_model("gpt_neox", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mon = slow_monitor(at_train_end=False)
    mon.step(0, model)
    assert started.wait(30)
    t0 = time.monotonic()
    mon.close(timeout=0.1)
    assert time.monotonic() - t0 < 4  # 0.1 s + the group in flight + 1 s grace
    executor = mon._executor
    assert (executor.n_cancelled, executor.n_abandoned) == (1, 0)
    assert not executor.busy() and mon.history == [] and mon.n_failures == 0
    assert all((before[k] == v).all() for k, v in model.state_dict().items())


def test_close_abandons_a_probe_that_cannot_be_interrupted(monkeypatch):
    release, entered = threading.Event(), threading.Event()

    def stuck_probe(*args, **kwargs):  # one long kernel: no group boundary to stop at
        entered.set()
        release.wait(60)
        raise RuntimeError("released")

    monkeypatch.setattr(monitor_module, "probe", stuck_probe)
    mon = slow_monitor(close_timeout=0.1)
    mon.step(0, tiny_model("gpt_neox", 4))
    assert entered.wait(30)
    t0 = time.monotonic()
    mon.close()  # close_timeout from the constructor
    assert time.monotonic() - t0 < 5
    assert mon._executor.n_abandoned == 1 and not mon._executor.busy()
    assert mon._shadow.shadow is None  # a fresh copy next time, not the one still in use
    release.set()


def test_close_waits_for_a_probe_that_finishes_within_the_timeout(monkeypatch):
    slow_engine(monkeypatch, 0.05)
    mon = slow_monitor(at_train_end=False)
    mon.step(0, tiny_model("gpt_neox", 4))
    mon.close(timeout=60)
    assert [h.step for h in mon.history] == [0]
    assert mon._executor.n_cancelled == 0


def test_train_end_joins_the_running_probe_and_records_both(monkeypatch, tmp_path):
    slow_engine(monkeypatch, 0.05)
    model = tiny_model("gpt_neox", 4)
    mon = slow_monitor(jsonl_path=tmp_path / "r.jsonl")
    mon.step(0, model)
    assert mon._executor.busy()
    mon.train_end(5, model)
    mon.close()
    assert [h.step for h in mon.history] == [0, 5]
    records = read_records(tmp_path / "r.jsonl")
    assert [r["step"] for r in records if r["type"] == "probe"] == [0, 5]
    assert not mon._executor.busy()


def test_a_crash_in_lightning_training_stops_the_probe_within_the_bound(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    from lightning.pytorch import Callback
    from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    class Crash(Exception):
        pass

    class CrashAtStep2(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise Crash("simulated crash")

    slow_engine(monkeypatch, 0.5)
    cb = RedundancyMonitorCallback(
        probe_ids(), schedule=ProbeSchedule.explicit([1]), probe_config=SLOW, close_timeout=0.1
    )
    trainer = lightning_trainer(tmp_path, [cb, CrashAtStep2()], max_steps=10)
    t0 = time.monotonic()
    with pytest.raises(Crash):
        trainer.fit(lightning_module(), token_loader())
    assert time.monotonic() - t0 < 30  # a hang check; the run itself takes seconds
    assert cb.monitor._executor.n_cancelled == 1 and not cb.monitor._executor.busy()


KEYBOARD_INTERRUPT_IN_LIGHTNING = """
import sys, time
from fault_fixtures import Engine
from lightning.pytorch import Callback
from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader
from redundancy_monitor import ProbeConfig, ProbeSchedule
from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

real = Engine._token_kl
def slow(self, finals, k):
    time.sleep(0.5)
    return real(self, finals, k)
Engine._token_kl = slow

class CtrlC(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            raise KeyboardInterrupt

cb = RedundancyMonitorCallback(probe_ids(), schedule=ProbeSchedule.explicit([1]),
                               probe_config=ProbeConfig(batch_tokens=48), close_timeout=0.2)
trainer = lightning_trainer(sys.argv[1], [cb, CtrlC()], max_steps=10)
try:
    trainer.fit(lightning_module(), token_loader())
finally:
    print("cancelled", cb.monitor._executor.n_cancelled, flush=True)
"""

INTERRUPTED_PLAIN_LOOP = """
import sys, time
from conftest import tiny_batch, tiny_model
from fault_fixtures import Engine
from redundancy_monitor import ProbeSchedule, RedundancyMonitor

def stuck(self, finals, k):
    time.sleep(600)
Engine._token_kl = stuck
mon = RedundancyMonitor(tiny_batch(3, 16)[0], schedule=ProbeSchedule(None, steps=(0,)))
mon.step(0, tiny_model("gpt_neox", 4))
time.sleep(0.5)
print("probe running:", mon._executor.busy(), flush=True)
raise KeyboardInterrupt  # no close(): an HF Trainer has no hook for this
"""


def run_script(code: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT / "tests"),
    )
    return proc, time.monotonic() - t0


def test_keyboard_interrupt_in_lightning_cancels_the_probe_and_exits(tmp_path):
    pytest.importorskip("lightning")
    proc, _ = run_script(KEYBOARD_INTERRUPT_IN_LIGHTNING, str(tmp_path))
    assert proc.returncode == 1, proc.stderr[-2000:]  # Lightning's graceful shutdown
    assert "cancelled 1" in proc.stdout, proc.stderr[-2000:]


def test_interpreter_exits_at_keyboard_interrupt_while_a_probe_runs_without_close():
    proc, elapsed = run_script(INTERRUPTED_PLAIN_LOOP)
    assert "probe running: True" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert elapsed < 100  # the probe would sleep 600 s; a joined worker would hang here
