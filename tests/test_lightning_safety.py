"""Attaching the Lightning callback to a real run: several monitors, resumes with other
settings, fast_dev_run, and a TensorBoard run shared with the user."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_batch
from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

from redundancy_monitor import ProbeConfig, ProbeSchedule
from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

pytest.importorskip("lightning")


def callback(probe_batch=None, **kw):
    kw = {"schedule": ProbeSchedule(2, log_spaced=False), "executor": "inline", **kw}
    return RedundancyMonitorCallback(probe_batch, **kw)


def fit_and_save(tmp_path, callbacks, **kw):
    trainer = lightning_trainer(tmp_path, callbacks, **kw)
    trainer.fit(lightning_module(), token_loader())
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    return path


def resume(tmp_path, callbacks, ckpt, loader=None, **kw):
    trainer = lightning_trainer(tmp_path, callbacks, **kw)
    trainer.fit(lightning_module(), loader or token_loader(), ckpt_path=str(ckpt))
    return trainer


def test_two_monitors_keep_their_own_state_through_a_checkpoint(tmp_path):
    other = tiny_batch(n_seq=2, seq_len=16, seed=5)[0]
    first = [callback(probe_ids()), callback(other)]
    ckpt = fit_and_save(tmp_path / "a", first, max_steps=4)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert len([k for k in saved if k.startswith("RedundancyMonitorCallback")]) == 2
    assert first[0].state_key != first[1].state_key

    again = [callback(other), callback(probe_ids())]  # order does not matter
    resume(tmp_path / "a", again, ckpt, max_steps=6)
    for before, after in ((first[0], again[1]), (first[1], again[0])):
        assert after.monitor.batch_sha256 == before.monitor.batch_sha256
        assert [h.step for h in after.monitor.history] == [0, 2, 4, 6]
        assert after.monitor.history[:3] == before.monitor.history
        assert "resume_change" not in [a.rule for a in after.monitor.alerts]


def test_resuming_with_other_pairs_alerts_and_training_goes_on(tmp_path):
    ckpt = fit_and_save(tmp_path, [callback(probe_ids())], max_steps=4)
    changed = callback(probe_ids(), probe_config=ProbeConfig(pairs="all"))
    trainer = resume(tmp_path, [changed], ckpt, max_steps=6)
    assert trainer.global_step == 6
    assert [h.step for h in changed.monitor.history] == [6]  # step 4 was in the checkpoint
    assert [[h.step for h in t] for t in changed.monitor.earlier_trajectories] == [[0, 2, 4]]
    assert "resume_change" in [a.rule for a in changed.monitor.alerts]


def test_a_fallback_batch_is_probed_again_on_resume_even_if_the_loader_changed(tmp_path):
    first = callback(max_sequences=3)
    ckpt = fit_and_save(tmp_path, [first], max_steps=4)
    resumed = callback(max_sequences=3)
    other_data = token_loader(seed=11)  # its first rows differ from the first run's
    assert next(iter(other_data))[0][:3].tolist() != first.monitor._ids.tolist()
    trainer = resume(tmp_path, [resumed], ckpt, loader=other_data, max_steps=6)
    assert trainer.global_step == 6
    assert resumed.monitor.batch_sha256 == first.monitor.batch_sha256
    assert [h.step for h in resumed.monitor.history] == [0, 2, 4, 6]


def test_fast_dev_run_probes_but_writes_nothing(tmp_path):
    cb = callback(
        probe_ids(), schedule=ProbeSchedule(1, log_spaced=False), checkpoint_on_alert=True
    )
    trainer = lightning_trainer(tmp_path, [cb], fast_dev_run=2)
    trainer.fit(lightning_module(), token_loader())
    assert [h.step for h in cb.monitor.history] == [0, 1, 2]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def layout_categories(log_dir) -> dict[str, list[str]]:
    """Category -> chart titles of the last custom-scalars layout written to the run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    written = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    written.append((event.wall_time, value.tensor.string_val[0]))
    layout = layout_pb2.Layout.FromString(max(written)[1])
    return {c.title: [chart.title for chart in c.chart] for c in layout.category}


def test_the_headline_section_holds_only_the_headline_scalars(tmp_path):
    cb = callback(probe_ids(), per_pair=True)
    lightning_trainer(tmp_path, [cb], max_steps=2).fit(lightning_module(), token_loader())
    scalars = event_accumulator(cb.tensorboard_dir).Tags()["scalars"]
    sections = {tag.split("/", 1)[0] for tag in scalars if tag.startswith("redundancy")}
    assert sections == {
        "redundancy",
        "redundancy_separation",
        "redundancy_since_baseline",  # since the baseline probe, with paired intervals
        "redundancy_since_previous",
        "redundancy_detail",
        "redundancy_pairs",
        "redundancy_probe",
    }
    assert {t for t in scalars if t.startswith("redundancy/")} == {
        f"redundancy/{name}"
        for name in (
            *("gap_mean", "gap_median", "gap_p75", "gap_max"),
            *("ir_median", "d_repl_mean", "d_int_mean"),
            *("gap_median_low", "gap_median_high"),  # the band of the median gap (intervals)
        )
    }


def test_a_custom_scalars_layout_of_the_user_is_merged_not_replaced(tmp_path):
    from lightning.pytorch import Callback

    class UserLayout(Callback):
        def on_fit_start(self, trainer, pl_module):
            trainer.logger.experiment.add_custom_scalars(
                {"mine": {"loss chart": ["Multiline", ["train_loss"]]}}
            )

    cb = callback(probe_ids())
    lightning_trainer(tmp_path, [UserLayout(), cb], max_steps=2).fit(
        lightning_module(), token_loader()
    )
    # Ours is in our own run beside the logger's; theirs stays as it was. TensorBoard's
    # custom-scalars plugin merges the layouts of all runs (by category title).
    assert layout_categories(Path(cb.tensorboard_dir).parent) == {"mine": ["loss chart"]}
    assert "protocol gap (nats)" in layout_categories(cb.tensorboard_dir)["redundancy"]
