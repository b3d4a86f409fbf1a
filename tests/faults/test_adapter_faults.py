"""Faults at the framework adapters: a run killed inside its train-end probe and refit,
training code that raises while a background probe runs, two monitors on one trainer."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.tools.records import load_run

pytest.importorskip("lightning")
FAULTS = Path(__file__).resolve().parent


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_sigkill_during_the_train_end_probe_then_a_refit_probes_the_final_weights(tmp_path):
    from lightning_restart_child import BATCHES_PER_EPOCH, EPOCHS, attempt
    from training_fixtures import lightning_module, probe_ids

    last = BATCHES_PER_EPOCH * EPOCHS  # 24: not a multiple of 5, so only train end probes it
    root = tmp_path / "run"
    assert attempt(root, None, (last, "train_end_probe"), every=5) == -signal.SIGKILL
    ckpt = max(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert f"step={last}" in ckpt.name  # saved at the last epoch's end, before train end
    assert load_run(root).steps == [0, 5, 10, 15, 20]  # the killed attempt's record file

    assert attempt(root, ckpt, None, every=5) == 0  # the fit ends at once (max_epochs reached)
    run = load_run(root)
    assert run.steps == [0, 5, 10, 15, 20, last] and run.failures == []
    module = lightning_module()
    module.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    expected = probe(module.model.eval(), probe_ids()).summary.scalars()
    assert run.last.result.summary.scalars() == pytest.approx(expected, rel=1e-5, abs=1e-7)

    # Refit once more: the final probe is taken again, and it supersedes the earlier one.
    assert attempt(root, ckpt, None, every=5) == 0
    (record_file,) = root.rglob("redundancy.jsonl")
    probes = [r["step"] for r in read_records(record_file) if r["type"] == "probe"]
    assert probes == [0, 5, 10, 15, 20, last]


def test_an_hf_run_whose_collator_raises_exits_1_with_the_background_monitor(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    env = {"PYTHONPATH": f"{FAULTS.parents[1]}:{FAULTS.parent}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(FAULTS / "hf_bad_collator_child.py"), str(tmp_path), "background"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-2000:]  # as without the monitor (not 134)
    assert "ValueError: the user's collator failed" in done.stderr
    assert "terminate called" not in done.stderr
    # The probe was still running at exit (else this test would prove nothing).
    assert "exiting while the probe of step 0 runs" in done.stderr


def two_monitors(callback_class, **kwargs) -> list:
    from training_fixtures import probe_ids

    from redundancy_monitor import ProbeConfig, ProbeSchedule

    schedule = ProbeSchedule(2, log_spaced=False)
    return [
        callback_class(probe_ids(), schedule=schedule, executor="inline", **kwargs),
        callback_class(
            probe_ids(),
            schedule=schedule,
            executor="inline",
            probe_config=ProbeConfig(pairs="all"),
            **kwargs,
        ),
    ]


def assert_kept_apart(folders: list[Path], root: Path, n_pairs: list[int]) -> None:
    from redundancy_monitor.errors import RunFolderError

    assert len(set(folders)) == 2
    for folder, pairs in zip(folders, n_pairs, strict=True):
        records = [r for r in read_records(folder / "redundancy.jsonl") if r["type"] == "probe"]
        assert [r["step"] for r in records] == [0, 2, 4]  # each step once
        assert {len(r["result"]["pairs"]) for r in records} == {pairs}  # one monitor's probes
    with pytest.raises(RunFolderError, match="several record files"):
        load_run(root)  # a reader given both must be told which


def test_two_lightning_monitors_on_one_trainer_write_a_folder_each(tmp_path):
    from training_fixtures import lightning_module, lightning_trainer, token_loader

    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    callbacks = two_monitors(RedundancyMonitorCallback)
    trainer = lightning_trainer(tmp_path, list(callbacks), max_steps=4)
    trainer.fit(lightning_module(), token_loader())
    folders = [Path(cb.jsonl_file).parent for cb in callbacks]
    assert [f.name for f in folders] == [cb._label for cb in callbacks]
    assert all(list(f.glob("events.out.tfevents.*")) for f in folders)  # a TensorBoard run each
    assert_kept_apart(folders, tmp_path, [3, 6])


def test_two_hf_monitors_on_one_trainer_write_a_folder_each(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    import transformers
    from conftest import tiny_model
    from training_fixtures import TokenDataset

    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

    callbacks = two_monitors(RedundancyMonitorTrainerCallback)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_steps=4,
    )
    model = tiny_model("llama", 4).train()
    transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=list(callbacks)
    ).train()
    folders = [Path(cb.jsonl_file).parent for cb in callbacks]
    assert_kept_apart(folders, tmp_path, [3, 6])
    runs = [Path(cb.tensorboard_dir) for cb in callbacks]  # a TensorBoard run each
    assert len(set(runs)) == 2 and all(list(r.glob("events.out.tfevents.*")) for r in runs)


def test_two_monitors_given_one_record_file_are_refused_with_advice(tmp_path):
    from training_fixtures import lightning_module, lightning_trainer, token_loader

    from redundancy_monitor.errors import InvalidConfigError
    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    callbacks = two_monitors(RedundancyMonitorCallback, jsonl_path=tmp_path / "r.jsonl")
    trainer = lightning_trainer(tmp_path, list(callbacks), max_steps=2)
    with pytest.raises(InvalidConfigError, match="give each its own jsonl_path"):
        trainer.fit(lightning_module(), token_loader())
    assert not (tmp_path / "r.jsonl").exists()


def test_two_hf_monitors_rebuilt_from_a_checkpoint_are_the_ones_passed_with_their_own_state(
    tmp_path,
):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    import transformers
    from conftest import tiny_model
    from training_fixtures import TokenDataset

    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

    def trainer(callbacks, max_steps):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8,
            report_to=[],
            use_cpu=True,
            save_strategy="steps",
            save_steps=4,
            restore_callback_states_from_checkpoint=True,
            disable_tqdm=True,
            max_steps=max_steps,
        )
        model = tiny_model("llama", 4).train()
        return transformers.Trainer(
            model=model, args=args, train_dataset=TokenDataset(), callbacks=list(callbacks)
        )

    first = two_monitors(RedundancyMonitorTrainerCallback)
    trainer(first, max_steps=4).train()
    second = two_monitors(RedundancyMonitorTrainerCallback)
    resumed = trainer(second, max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    used = [
        cb
        for cb in resumed.callback_handler.callbacks
        if isinstance(cb, RedundancyMonitorTrainerCallback)
    ]
    assert sorted(map(id, used)) == sorted(map(id, second))  # nothing rebuilt or copied
    for new, old in zip(second, first, strict=True):
        assert new.monitor.probed_steps == [0, 2, 4, 6]
        assert new.monitor.n_probes == 4
        assert new.monitor.probe_config.pairs == old.monitor.probe_config.pairs
        assert {len(r.result.summary.scalars()) > 0 for r in new.monitor.history} == {True}
    assert [len(cb.monitor.history) for cb in second] == [4, 4]


def test_two_identical_hf_monitors_are_refused_at_train_begin(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    import transformers
    from conftest import tiny_model
    from training_fixtures import TokenDataset, probe_ids

    from redundancy_monitor.errors import InvalidConfigError
    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

    callbacks = [RedundancyMonitorTrainerCallback(probe_ids(), executor="inline") for _ in (1, 2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, max_steps=2
    )
    model = tiny_model("llama", 4).train()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks
    )
    with pytest.raises(InvalidConfigError, match="would write the same folder"):
        trainer.train()
    assert not list(tmp_path.rglob("*.jsonl"))
