"""Attaching the HF callback to a real Trainer: where the numbers go (report_to), the
order of fences, unsupported setups, and resume in a new process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hf_trainer import make_trainer
from training_fixtures import probe_ids

from redundancy_monitor import ProbeSchedule, read_records
from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback
from redundancy_monitor.monitoring.record import ProbeRecord

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
SCRIPTS = Path(__file__).parent / "dist_scripts"


def callback(**kw):
    kw = {"schedule": ProbeSchedule(2, log_spaced=False), **kw}
    return RedundancyMonitorTrainerCallback(probe_ids(), **kw)


class LogRecorder(transformers.TrainerCallback):
    """What a reporting integration sees: every on_log, and when training ended."""

    def __init__(self):
        self.events = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, dict(logs)))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", state.global_step, {}))


def test_report_to_none_writes_no_tensorboard_run_only_the_record_file(tmp_path):
    cb = callback(executor="inline")  # a busy background probe could skip a step
    make_trainer(tmp_path, [cb], max_steps=4, report_to="none").train()
    assert list(tmp_path.rglob("events.out.tfevents.*")) == []
    assert cb.tensorboard_dir is None
    assert [r["step"] for r in read_records(cb.jsonl_file) if r["type"] == "probe"] == [0, 2, 4]


def test_every_callback_gets_the_scalars_at_the_snapshot_step_before_training_ends(tmp_path):
    cb, recorder = callback(executor="inline"), LogRecorder()
    trainer = make_trainer(tmp_path, [recorder, cb], max_steps=6, report_to="none")
    trainer.train()
    probes = [(step, logs) for kind, step, logs in recorder.events if "redundancy/gap_mean" in logs]
    assert [step for step, _ in probes] == [h.step for h in cb.monitor.history] == [0, 2, 4, 6]
    for (step, logs), h in zip(probes, cb.monitor.history, strict=True):
        assert logs["redundancy/gap_mean"] == pytest.approx(h.result.summary.gap_mean)
        assert logs["redundancy_detail/spearman"] == pytest.approx(h.result.summary.spearman)
        assert logs["redundancy_probe/snapshot_step"] == step
    last_probe = max(i for i, e in enumerate(recorder.events) if "redundancy/gap_mean" in e[2])
    end = next(i for i, e in enumerate(recorder.events) if e[0] == "train_end")
    assert last_probe < end  # the final probe arrived while the integrations were open
    history = [e for e in trainer.state.log_history if "redundancy/gap_mean" in e]
    assert [e["step"] for e in history] == [0, 2, 4, 6]


def test_mlflow_with_a_local_store_gets_the_scalars(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "redundancy")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store, no server
    cb = callback(executor="inline")
    make_trainer(tmp_path / "out", [cb], max_steps=4, report_to=["mlflow"]).train()
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("redundancy").experiment_id])
    metric = client.get_metric_history(run.info.run_id, "redundancy/gap_mean")
    assert sorted((m.step, m.value) for m in metric) == pytest.approx(
        [(h.step, h.result.summary.gap_mean) for h in cb.monitor.history]
    )


def test_weights_are_fenced_before_the_first_forward_after_every_snapshot(tmp_path):
    cb = callback(executor="inline", schedule=ProbeSchedule(1, log_spaced=False))
    events = []
    real_fence, real_step = cb.monitor.before_weights_change, cb.monitor.step

    def fence():
        events.append("fence")
        real_fence()

    def step(n, model):
        launched = n not in cb.monitor.probed_steps and cb.monitor.schedule.is_due(n)
        control = real_step(n, model)
        if launched:
            events.append("snapshot")
        return control

    cb.monitor.before_weights_change, cb.monitor.step = fence, step
    trainer = make_trainer(tmp_path, [cb], max_steps=3, gradient_accumulation_steps=2)
    trainer.model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    trainer.train()
    assert events.count("snapshot") == 4  # steps 0..3
    for i, event in enumerate(events):
        if event == "snapshot" and "forward" in events[i:]:
            nxt = next(e for e in events[i + 1 :] if e in ("fence", "forward"))
            assert nxt == "fence", events


def test_fsdp1_is_refused_at_the_start_with_advice():
    from redundancy_monitor.integrations.hf import refuse_unsupported_setup

    args = type("Args", (), {"fsdp": True, "fsdp_plugin_args": {"fsdp_version": 1}})()
    with pytest.raises(InvalidConfigError, match="FSDP2"):
        refuse_unsupported_setup(args)
    FullyShardedDataParallel = type("FullyShardedDataParallel", (torch.nn.Module,), {})
    wrapped = torch.nn.Sequential(FullyShardedDataParallel())
    with pytest.raises(InvalidConfigError, match="FSDP1"):
        refuse_unsupported_setup(type("Args", (), {})(), wrapped)
    fsdp2 = type("Args", (), {"fsdp": True, "fsdp_plugin_args": {"fsdp_version": 2}})()
    refuse_unsupported_setup(fsdp2, torch.nn.Linear(2, 2))  # FSDP2 and DDP are fine


def run_phase(out: Path, phase: str, flag: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPTS / "hf_resume.py"), str(out), phase, str(int(flag))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("restore_flag", [False, True])
def test_a_run_resumed_in_a_new_process_equals_a_straight_run(tmp_path, restore_flag):
    run_phase(tmp_path / "straight", "straight", restore_flag)
    run_phase(tmp_path / "resumed", "crash", restore_flag)
    run_phase(tmp_path / "resumed", "resume", restore_flag)

    def outcome(folder):
        return json.loads((folder / "monitor.json").read_text())

    straight, resumed = outcome(tmp_path / "straight"), outcome(tmp_path / "resumed")
    assert resumed["probed_steps"] == straight["probed_steps"] == [0, 3, 6, 8]
    assert resumed["rebuilt"] is restore_flag  # the Trainer rebuilt the callback itself
    assert resumed["same_object"]  # as the very object passed in: nothing was copied
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        a, b = ProbeRecord.from_dict(a), ProbeRecord.from_dict(b)
        assert a.step == b.step
        assert a.result.summary.scalars() == pytest.approx(
            b.result.summary.scalars(), rel=1e-5, abs=1e-7
        )

    def summary(folder):
        records = read_records(folder / "out" / "redundancy" / "redundancy.jsonl")
        return [(r["type"], r["step"], r.get("rule")) for r in records]

    assert summary(tmp_path / "resumed") == summary(tmp_path / "straight")
