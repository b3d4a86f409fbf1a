"""Faults inside a probe during a real Lightning Trainer run: training finishes, the
failure or alert is in the JSONL file and in TensorBoard, and the counts are right."""

from __future__ import annotations

import math

import pytest
import torch
from fault_fixtures import event_accumulator, scalar_steps, text_steps
from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

import redundancy_monitor.monitoring.monitor as monitor_module
from redundancy_monitor import AlertConfig, ProbeConfig, ProbeSchedule, read_records
from redundancy_monitor.probing.engine import Engine

pytest.importorskip("lightning")
QUIET = AlertConfig(
    gap_threshold=None, growth_factor=None, overlap_threshold=None, regime_change=False
)


def run(tmp_path, callbacks, max_steps=6, **kw):
    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    kw.setdefault("executor", "inline")
    schedule = ProbeSchedule(2, log_spaced=False)
    cb = RedundancyMonitorCallback(probe_ids(), schedule=schedule, alerts=QUIET, **kw)
    trainer = lightning_trainer(tmp_path, [*callbacks, cb], max_steps=max_steps)
    trainer.fit(lightning_module(), token_loader())
    return trainer, cb


def test_an_exception_inside_one_probe_is_a_failure_record_and_one_alert(tmp_path, monkeypatch):
    real, calls = monitor_module.probe, []

    def probe_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated bug inside the probe")
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", probe_failing_once)
    trainer, cb = run(tmp_path, [])
    assert trainer.global_step == 6
    mon = cb.monitor
    assert (mon.n_probes, mon.n_failures) == (3, 1)
    assert [h.step for h in mon.history] == [0, 4, 6]
    records = read_records(cb.jsonl_file)
    failures = [r for r in records if r["type"] == "failure"]
    alerts = [r for r in records if r["type"] == "alert"]
    assert [f["step"] for f in failures] == [2]
    assert "ValueError: simulated bug inside the probe" in failures[0]["error"]
    assert [(a["rule"], a["step"]) for a in alerts] == [("probe_failure", 2)]
    acc = event_accumulator(cb.tensorboard_dir)
    assert list(text_steps(acc, "redundancy/failures")) == [2]
    assert "probe_failure" in text_steps(acc, "redundancy/alerts")[2]
    assert scalar_steps(acc, "redundancy/gap_mean") == [0, 4, 6]


def test_an_exception_in_a_background_probe_is_recorded_the_same_way(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the worker thread")

    monkeypatch.setattr(monitor_module, "probe", broken)
    trainer, cb = run(tmp_path, [], executor="background")
    mon = cb.monitor
    assert trainer.global_step == 6
    assert mon.n_probes == 0 and mon.n_failures == len(mon.probed_steps) >= 2
    failures = [r for r in read_records(cb.jsonl_file) if r["type"] == "failure"]
    assert [f["step"] for f in failures] == mon.probed_steps
    assert all("simulated failure in the worker thread" in f["error"] for f in failures)


def poison_at(step: int, value: float):
    from lightning.pytorch import Callback

    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == step:
                with torch.no_grad():
                    pl_module.model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight.fill_(value)

    return Poison()


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_weights_mid_run_raise_the_nonfinite_alert_once(tmp_path, value):
    trainer, cb = run(tmp_path, [poison_at(2, value)])
    assert trainer.global_step == 6
    probes = [r for r in read_records(cb.jsonl_file) if r["type"] == "probe"]
    bad = {p["step"]: p["result"]["summary"]["n_nonfinite"] for p in probes}
    assert bad[0] == 0 and bad[2] >= 1 and bad[4] >= 1  # the poison stays in the weights
    alerts = [r for r in read_records(cb.jsonl_file) if r["type"] == "alert"]
    assert [(a["rule"], a["step"]) for a in alerts] == [("nonfinite", 2)]
    assert alerts[0]["value"] == bad[2]
    first = probes[0]["result"]["summary"]
    assert first["gap_mean"] is not None and math.isfinite(first["gap_mean"])
    acc = event_accumulator(cb.tensorboard_dir)
    assert "nonfinite" in text_steps(acc, "redundancy/alerts")[2]


def test_out_of_memory_in_a_probe_is_retried_at_smaller_chunks_and_recorded(tmp_path, monkeypatch):
    real, sizes = Engine._token_kl, []

    def tight(self, finals, k):
        sizes.append(k)
        if k > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(self, finals, k)

    monkeypatch.setattr(Engine, "_token_kl", tight)
    # 8 variants per forward at first
    trainer, cb = run(tmp_path, [], probe_config=ProbeConfig(batch_tokens=400))
    assert trainer.global_step == 6
    assert cb.monitor.n_failures == 0 and cb.monitor.n_probes == 4
    records = read_records(cb.jsonl_file)
    probes = [r for r in records if r["type"] == "probe"]
    assert [p["result"]["meta"]["oom_retries"] for p in probes] == [1, 1, 1, 1]
    assert not [r for r in records if r["type"] in ("failure", "alert")]
    assert max(sizes) > 2 and sizes[-1] <= 2
    acc = event_accumulator(cb.tensorboard_dir)
    assert scalar_steps(acc, "redundancy/gap_mean") == [0, 2, 4, 6]


def test_out_of_memory_that_persists_fails_each_probe_and_training_finishes(tmp_path, monkeypatch):
    def never(self, finals, k):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(Engine, "_token_kl", never)
    trainer, cb = run(tmp_path, [])
    assert trainer.global_step == 6
    assert (cb.monitor.n_probes, cb.monitor.n_failures) == (0, 4)
    records = read_records(cb.jsonl_file)
    assert [r["step"] for r in records if r["type"] == "failure"] == [0, 2, 4, 6]
    assert all("OutOfMemoryError" in r["error"] for r in records if r["type"] == "failure")
    assert [a.rule for a in cb.monitor.alerts] == ["probe_failure"] * 4
