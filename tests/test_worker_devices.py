"""What the probe's worker thread does to the process's devices (CUDA mocked on CPU)."""

from __future__ import annotations

import threading

import torch
from conftest import tiny_batch, tiny_model

import redundancy_monitor.probing.probe as probe_module
from redundancy_monitor import ProbeSchedule, RedundancyMonitor, probe
from redundancy_monitor.monitoring.executor import BackgroundExecutor


def test_the_worker_makes_the_training_device_current_before_the_probe_runs(monkeypatch):
    calls = []

    def set_device(index):
        calls.append(("set_device", index, threading.current_thread().name))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)

    def job():  # stands for the probe, whose first CUDA use is entering its stream
        calls.append(("probe", threading.current_thread().name))
        return "done"

    executor = BackgroundExecutor()
    executor.submit(5, job, 0.0, torch.device("cuda", 3))
    (outcome,) = executor.drain()
    assert outcome.error is None and outcome.result == "done"
    assert calls == [("set_device", 3, "redundancy-probe-5"), ("probe", "redundancy-probe-5")]


def test_a_cpu_probe_never_touches_the_cuda_device(monkeypatch):
    touched = []
    monkeypatch.setattr(torch.cuda, "set_device", touched.append)
    executor = BackgroundExecutor()
    executor.submit(0, lambda: "done", 0.0, torch.device("cpu"))
    executor.drain()
    assert touched == []


def test_the_monitor_hands_the_worker_the_training_models_device(monkeypatch):
    mon = RedundancyMonitor(tiny_batch()[0], schedule=ProbeSchedule.explicit([0]))
    seen = []
    real_submit = mon._executor.submit

    def submit(step, job, blocked, device=None):
        seen.append(device)
        return real_submit(step, job, blocked, device)

    monkeypatch.setattr(mon._executor, "submit", submit)
    mon.step(0, tiny_model("gpt_neox", 4))
    mon.close()
    assert seen == [torch.device("cpu")] and mon.n_probes == 1


def test_an_out_of_memory_retry_in_the_worker_leaves_the_cuda_cache_alone(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: emptied.append(threading.current_thread().name)
    )
    real = probe_module.variant_distances
    calls = []

    def out_of_memory_once(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) % 2 == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "variant_distances", out_of_memory_once)
    model, ids = tiny_model("gpt_neox", 4), tiny_batch()[0]
    mon = RedundancyMonitor(ids, schedule=ProbeSchedule.explicit([0]))
    mon.step(0, model)
    mon.close()
    assert mon.n_probes == 1 and calls[0].startswith("redundancy-probe")
    assert emptied == []  # the worker retried without emptying training's cache
    assert probe(model, ids).meta.oom_retries == 1  # the same retry, in this thread...
    assert emptied == [threading.current_thread().name]  # ...still frees the cache
