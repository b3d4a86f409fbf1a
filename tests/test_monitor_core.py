"""The framework-agnostic monitor driven by a plain training loop."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_batch, tiny_model

import redundancy_monitor.monitoring.executor as executor_module
import redundancy_monitor.monitoring.monitor as monitor_module
from redundancy_monitor import (
    AlertConfig,
    ProbeConfig,
    ProbeSchedule,
    RedundancyMonitor,
    probe,
    read_records,
)
from redundancy_monitor.errors import InvalidConfigError, MonitorStateError


def sgd_loop(model, monitor, n_steps, keep=(), end=True):
    """Train with SGD on random tokens; return deep copies of the model at steps in `keep`."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(5)
    kept = {}
    model.train()
    monitor.step(0, model)
    for step in range(1, n_steps + 1):
        ids = torch.randint(0, 97, (4, 12), generator=g).to(next(model.parameters()).device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monitor.before_weights_change()
        opt.step()
        opt.zero_grad()
        monitor.step(step, model)
        if step in keep:
            kept[step] = copy.deepcopy(model)
    if end:
        monitor.train_end(n_steps, model)
    return kept


def test_import_does_not_load_lightning_or_transformers():
    code = (
        "import sys, redundancy_monitor as rm; rm.RedundancyMonitor; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'transformers', 'tensorboard'}))"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_results_come_from_the_snapshot_weights_not_later_ones(monkeypatch):
    # The probe of step 3 is held until training has gone on to step 8, so the training
    # model changes under it; it must still measure the step-3 weights.
    release = threading.Event()
    real_probe = monitor_module.probe

    def held_probe(*args, **kwargs):
        release.wait(timeout=30)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", held_probe)
    model = tiny_model("gpt_neox", 4)
    ids = tiny_batch(3, 12)[0]
    mon = RedundancyMonitor(ids, schedule=ProbeSchedule.explicit([3], at_train_end=False))
    kept = sgd_loop(model, mon, 8, keep=(3,), end=False)
    assert mon.history == []  # still running
    release.set()
    mon.close()
    assert [h.step for h in mon.history] == [3]
    expected = probe(kept[3], ids).summary.scalars()
    assert mon.history[0].result.summary.scalars() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    later = probe(model, ids).summary.gap_mean
    assert later != pytest.approx(mon.history[0].result.summary.gap_mean, rel=1e-3)


def test_inline_and_background_executors_record_the_same_trajectory():
    ids = tiny_batch(3, 12)[0]
    runs = []
    for executor in ("inline", "background"):
        mon = RedundancyMonitor(ids, executor=executor, schedule=ProbeSchedule(3, log_spaced=False))
        sgd_loop(tiny_model("gpt_neox", 4), mon, 7)
        mon.close()
        runs.append(mon.trajectory("gap_mean"))
    # background may skip a due step while busy; compare the steps both probed
    common = dict(runs[0]).keys() & dict(runs[1]).keys()
    assert 7 in common and len(common) >= 2
    for step in common:
        assert dict(runs[0])[step] == pytest.approx(dict(runs[1])[step], rel=1e-6)


def test_a_probe_due_while_one_runs_is_skipped_and_counted(monkeypatch):
    release = threading.Event()
    real_probe = monitor_module.probe

    def slow_probe(*args, **kwargs):
        release.wait(timeout=30)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", slow_probe)
    model = tiny_model("gpt_neox", 4)
    mon = RedundancyMonitor(
        tiny_batch()[0], schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False)
    )
    mon.step(1, model)
    mon.step(2, model)
    mon.step(3, model)
    release.set()
    mon.drain()
    assert mon.n_skipped_busy == 2
    assert [h.step for h in mon.history] == [1]
    mon.close()


def test_micro_batches_and_repeated_steps_never_trigger_twice():
    model = tiny_model("gpt_neox", 4)
    mon = RedundancyMonitor(
        tiny_batch()[0], executor="inline", schedule=ProbeSchedule(2, log_spaced=False)
    )
    for step in (0, 0, 1, 1, 1, 2, 2, 3, 4, 4):
        mon.step(step, model)
    mon.train_end(4, model)  # step 4 already probed: no second probe
    assert mon.probed_steps == [0, 2, 4]
    assert [h.step for h in mon.history] == [0, 2, 4]


def test_probe_failure_is_counted_alerted_and_the_next_probe_runs(monkeypatch, tmp_path):
    real_probe = monitor_module.probe
    calls = []

    def flaky_probe(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", flaky_probe)
    seen = []
    path = tmp_path / "r.jsonl"
    mon = RedundancyMonitor(
        tiny_batch()[0],
        schedule=ProbeSchedule(2, log_spaced=False, at_train_end=False),
        jsonl_path=path,
        executor="inline",
        on_alert=seen.append,
        alerts=AlertConfig(
            gap_threshold=None, growth_factor=None, overlap_threshold=None, regime_change=False
        ),
    )
    sgd_loop(tiny_model("gpt_neox", 4), mon, 4)
    mon.close()
    assert mon.n_failures == 1
    assert [h.step for h in mon.history] == [2, 4]
    assert [a.rule for a in seen] == ["probe_failure"]
    assert "out of memory" in seen[0].message
    kinds = [(r["type"], r["step"]) for r in read_records(path)]
    assert kinds[:2] == [("failure", 0), ("alert", 0)]


def test_nonfinite_weights_raise_the_nonfinite_alert():
    model = tiny_model("gpt_neox", 4)
    with torch.no_grad():
        model.gpt_neox.layers[2].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
    mon = RedundancyMonitor(
        tiny_batch()[0], executor="inline", schedule=ProbeSchedule.explicit([0])
    )
    mon.step(0, model)
    assert "nonfinite" in [a.rule for a in mon.alerts]
    json.dumps(mon.state_dict(), allow_nan=False)  # still JSON-safe


def test_the_probe_never_changes_the_training_model():
    model = tiny_model("gpt_neox", 4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mon = RedundancyMonitor(tiny_batch()[0], executor="inline", schedule=ProbeSchedule(1))
    mon.step(0, model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shadow = mon._shadow.shadow
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(shadow.parameters(), model.parameters(), strict=True)
    )


def test_state_dict_is_json_and_round_trips():
    model = tiny_model("gpt_neox", 4)
    ids = tiny_batch()[0]
    mon = RedundancyMonitor(ids, executor="inline", schedule=ProbeSchedule(2))
    sgd_loop(model, mon, 5)
    state = json.loads(json.dumps(mon.state_dict(), allow_nan=False))
    other = RedundancyMonitor(ids, executor="inline", schedule=ProbeSchedule(2))
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.trajectory() == mon.trajectory()


def test_restoring_state_recorded_with_another_batch_is_refused():
    mon = RedundancyMonitor(tiny_batch(seed=1)[0], executor="inline")
    state = mon.state_dict()
    other = RedundancyMonitor(tiny_batch(seed=2)[0], executor="inline")
    with pytest.raises(MonitorStateError, match="another probe batch"):
        other.load_state_dict(state)


def test_module_objects_for_blocks_are_refused_with_a_hint():
    model = tiny_model("gpt_neox", 4)
    with pytest.raises(InvalidConfigError, match="dotted path"):
        ProbeConfig(blocks=model.gpt_neox.layers)


def test_probe_batch_from_texts_and_tokenizer():
    class CharTokenizer:  # the interface the monitor uses: __call__ -> input_ids/attention_mask
        pad_token = "_"

        def __call__(self, texts, return_tensors, padding, truncation, max_length):
            n = min(max(len(t) for t in texts), max_length)
            ids = torch.zeros(len(texts), n, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, t in enumerate(texts):
                codes = [ord(c) % 97 for c in t[:n]]
                ids[r, : len(codes)] = torch.tensor(codes)
                mask[r, : len(codes)] = 1
            return {"input_ids": ids, "attention_mask": mask}

    mon = RedundancyMonitor(
        texts=["hello world", "hi"], tokenizer=CharTokenizer(), max_length=8, executor="inline"
    )
    mon.step(0, tiny_model("gpt_neox", 4))
    assert mon.history and mon._mask.tolist()[1] == [1, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_snapshot_matches_the_weights_at_the_step():
    model = tiny_model("gpt_neox", 4).cuda()
    ids = tiny_batch(3, 12)[0]
    mon = RedundancyMonitor(ids, schedule=ProbeSchedule.explicit([3], at_train_end=False))
    kept = sgd_loop(model, mon, 6, keep=(3,))
    mon.close()
    assert mon._shadow.stream is not None  # the side-stream path ran
    expected = probe(kept[3], ids).summary.scalars()
    assert mon.history[0].result.summary.scalars() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_monitor_pickles_for_spawned_ranks_and_its_copy_keeps_its_own_clock():
    # Lightning's ddp_spawn pickles the callback, monitor included, into each rank.
    mon = RedundancyMonitor(tiny_batch()[0], executor="inline", schedule=ProbeSchedule(1))
    copy_ = pickle.loads(pickle.dumps(mon))
    copy_.step(5, tiny_model("gpt_neox", 4))
    assert copy_.recorder._clock() == 5 and mon.recorder._clock() is None
    assert [h.step for h in copy_.history] == [5] and mon.history == []


def test_a_probe_thread_that_cannot_start_is_a_failed_probe_not_a_crash(monkeypatch):
    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(executor_module, "threading", SimpleNamespace(Thread=NoThread))
    model = tiny_model("gpt_neox", 4)
    mon = RedundancyMonitor(
        tiny_batch()[0], schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False)
    )
    mon.step(0, model)  # must not raise into the training loop
    assert mon.n_failures == 1 and "can't start new thread" in mon.alerts[0].message
    monkeypatch.undo()
    mon.step(1, model)
    mon.drain()
    assert [h.step for h in mon.history] == [1] and mon.n_failures == 1
    mon.close()
