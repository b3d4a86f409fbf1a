"""Real Hugging Face Trainer runs on CPU with the callback attached."""

from __future__ import annotations

import os

import pytest
from conftest import tiny_model
from training_fixtures import TokenDataset, probe_ids

from redundancy_monitor import AlertConfig, ProbeSchedule, read_records
from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")


def make_trainer(tmp_path, callbacks, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=kw.pop("report_to", []),
        use_cpu=True,
        save_strategy=kw.pop("save_strategy", "no"),
        logging_strategy=kw.pop("logging_strategy", "no"),
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    # llama, not gpt_neox: transformers 5.24 Trainer reloads a GPT-NeoX checkpoint without
    # its lm_head ("missing keys: lm_head.weight"), which would break the resume test.
    model = tiny_model("llama", 4).train()
    return transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks
    )


def test_hf_run_writes_a_tensorboard_run_beside_the_trainers_matching_the_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Inline, so no probe is skipped for being busy and the steps are exactly the schedule.
    cb = RedundancyMonitorTrainerCallback(
        probe_ids(), schedule=ProbeSchedule(2, log_spaced=False), executor="inline"
    )
    trainer = make_trainer(
        tmp_path,
        [cb],
        max_steps=6,
        report_to=["tensorboard"],
        logging_strategy="steps",
        logging_steps=1,
    )
    trainer.train()
    probes = [r for r in read_records(cb.jsonl_file) if r["type"] == "probe"]
    assert [p["step"] for p in probes] == [0, 2, 4, 6]
    assert cb.jsonl_file == str(tmp_path / "redundancy" / "redundancy.jsonl")
    tensorboard = next(
        c for c in trainer.callback_handler.callbacks if type(c).__name__ == "TensorBoardCallback"
    )
    # A run of our own beside the Trainer's, never its writer (a failed write of ours
    # would break the Trainer's writer for good: faults/test_disk_full_framework_writer.py).
    assert cb.tensorboard_dir == os.path.join(tensorboard.logging_dir, "redundancy")
    runs = {str(p.parent) for p in tmp_path.rglob("events.out.tfevents.*")}
    assert runs == {tensorboard.logging_dir, cb.tensorboard_dir}
    theirs = EventAccumulator(tensorboard.logging_dir, size_guidance={"scalars": 0})
    theirs.Reload()
    assert "train/loss" in theirs.Tags()["scalars"]
    assert not [t for t in theirs.Tags()["scalars"] if t.startswith("redundancy")]
    acc = EventAccumulator(cb.tensorboard_dir, size_guidance={"scalars": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("redundancy/gap_median")}
    assert logged == pytest.approx(
        {p["step"]: p["result"]["summary"]["gap_median"] for p in probes}
    )


def test_stop_on_alert_sets_should_training_stop(tmp_path):
    cb = RedundancyMonitorTrainerCallback(
        probe_ids(),
        schedule=ProbeSchedule(1),
        executor="inline",
        alerts=AlertConfig(gap_threshold=-10.0, hysteresis=2),
        stop_on_alert=True,
    )
    trainer = make_trainer(tmp_path, [cb], max_steps=20)
    trainer.train()
    assert trainer.state.global_step == 1


class Crash(Exception):
    pass


class CrashAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


@pytest.mark.parametrize("restore_flag", [False, True])
def test_hf_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, restore_flag):
    def callback(path):
        return RedundancyMonitorTrainerCallback(
            probe_ids(),
            schedule=ProbeSchedule(3, log_spaced=False),
            executor="inline",
            jsonl_path=path,
            alerts=AlertConfig(gap_threshold=0.0, hysteresis=2),
        )

    straight = callback(tmp_path / "straight.jsonl")
    make_trainer(tmp_path / "a", [straight], max_steps=8).train()

    first = callback(tmp_path / "resumed.jsonl")
    flags = dict(
        save_strategy="steps", save_steps=4, restore_callback_states_from_checkpoint=restore_flag
    )
    with pytest.raises(Crash):
        make_trainer(tmp_path / "b", [first, CrashAt(7)], max_steps=8, **flags).train()
    assert 6 in first.monitor.probed_steps
    second = callback(tmp_path / "resumed.jsonl")
    trainer = make_trainer(tmp_path / "b", [second], max_steps=8, **flags)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    monitor = next(
        cb
        for cb in trainer.callback_handler.callbacks
        if isinstance(cb, RedundancyMonitorTrainerCallback)
    ).monitor

    assert monitor.probed_steps == straight.monitor.probed_steps == [0, 3, 6, 8]
    for a, b in zip(monitor.history, straight.monitor.history, strict=True):
        assert a.step == b.step
        assert a.result.summary.scalars() == pytest.approx(
            b.result.summary.scalars(), rel=1e-5, abs=1e-7
        )
    assert (
        monitor.recorder.alert_engine.state_dict()["rules"]
        == (straight.monitor.recorder.alert_engine.state_dict()["rules"])
    )

    def summary(records):
        return [(r["type"], r["step"], r.get("rule")) for r in records]

    assert summary(read_records(tmp_path / "resumed.jsonl")) == summary(
        read_records(tmp_path / "straight.jsonl")
    )
