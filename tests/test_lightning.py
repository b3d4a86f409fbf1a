"""Real Lightning Trainer runs on CPU with the callback attached."""

from __future__ import annotations

import csv

import pytest
from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

from redundancy_monitor import AlertConfig, ProbeConfig, ProbeSchedule, read_records
from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

pytest.importorskip("lightning")


def event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_match_the_jsonl_records(tmp_path):
    cb = RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule(2, log_spaced=False),
        per_pair=True,
        alerts=AlertConfig(gap_threshold=-10.0, hysteresis=1),
    )
    trainer = lightning_trainer(tmp_path, [cb], max_steps=6)
    trainer.fit(lightning_module(), token_loader())
    records = read_records(cb.jsonl_file)
    probes = [r for r in records if r["type"] == "probe"]
    assert probes and probes[0]["step"] == 0
    assert probes[0]["result"]["meta"]["batch_sha256"] == cb.monitor.batch_sha256

    acc = event_accumulator(cb.tensorboard_dir)
    tags = acc.Tags()
    tags_of = {
        "gap_mean": "redundancy/gap_mean",
        "gap_median": "redundancy/gap_median",
        "gap_p75": "redundancy/gap_p75",
        "gap_max": "redundancy/gap_max",
        "ir_median": "redundancy/ir_median",
        "d1/gap_mean": "redundancy_separation/d1/gap_mean",
        "d_repl_mean": "redundancy/d_repl_mean",
        "d_int_mean": "redundancy/d_int_mean",
        "spearman": "redundancy_detail/spearman",
    }
    for name, tag in tags_of.items():
        events = acc.Scalars(tag)
        by_step = {e.step: e.value for e in events}
        expected = {p["step"]: p["result"]["summary"] for p in probes}
        assert sorted(by_step) == sorted(expected), name
        for step, summary in expected.items():
            value = (
                summary["by_separation"]["1"]["gap_mean"]
                if name == "d1/gap_mean"
                else summary[name]
            )
            assert by_step[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, step)
    pair = probes[-1]["result"]["pairs"][0]
    pair_events = {
        e.step: e.value for e in acc.Scalars(f"redundancy_pairs/{pair['i']}-{pair['j']}/gap")
    }
    assert pair_events[probes[-1]["step"]] == pytest.approx(pair["gap"], rel=1e-6)
    for name in ("d_repl", "d_int", "gap"):
        assert len(acc.Images(f"redundancy/heatmap/{name}")) == len(probes)
    assert "redundancy/alerts/text_summary" in tags["tensors"]
    assert "custom_scalars__config__" in tags["tensors"]
    alerts = [r for r in records if r["type"] == "alert" and r["rule"] == "gap_threshold"]
    assert {a["step"] for a in alerts} == {probes[0]["step"]}  # fired once, stays active


def test_gradient_accumulation_probes_each_optimizer_step_once(tmp_path):
    cb = RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule.explicit([0, 1, 2, 3], at_train_end=False),
        executor="inline",
    )
    trainer = lightning_trainer(tmp_path, [cb], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(lightning_module(), token_loader(n_seq=64))
    assert cb.monitor.probed_steps == [0, 1, 2, 3]
    assert [h.step for h in cb.monitor.history] == [0, 1, 2, 3]


def test_every_lightning_logger_gets_the_scalars(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = RedundancyMonitorCallback(
        probe_ids(), schedule=ProbeSchedule(4, log_spaced=False), executor="inline"
    )
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = lightning_trainer(tmp_path, [cb], max_steps=4, logger=logger)
    trainer.fit(lightning_module(), token_loader())
    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    logged = {
        int(r["step"]): float(r["redundancy/gap_mean"])
        for r in rows
        if r.get("redundancy/gap_mean")
    }
    assert logged == pytest.approx(dict(cb.monitor.trajectory("gap_mean")))
    # no TensorBoardLogger: our own writer under default_root_dir
    assert cb.tensorboard_dir == str(tmp_path / "redundancy")
    assert event_accumulator(cb.tensorboard_dir).Scalars("redundancy/gap_mean")


def test_probe_batch_falls_back_to_the_first_training_batch(tmp_path):
    loader = token_loader()
    cb = RedundancyMonitorCallback(
        schedule=ProbeSchedule(None, log_spaced=False), executor="inline", max_sequences=3
    )
    lightning_trainer(tmp_path, [cb], max_steps=2).fit(lightning_module(), loader)
    first = next(iter(loader))[0][:3]
    assert cb.monitor._ids.tolist() == first.tolist()
    assert [h.step for h in cb.monitor.history] == [2]  # at train end


def test_stop_on_alert_stops_the_trainer(tmp_path):
    cb = RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule(1),
        executor="inline",
        alerts=AlertConfig(gap_threshold=-10.0, growth_factor=None, hysteresis=2),
        stop_on_alert=["gap_threshold"],
    )
    trainer = lightning_trainer(tmp_path, [cb], max_steps=50)
    trainer.fit(lightning_module(), token_loader(n_seq=512))
    assert trainer.global_step == 1  # probes at 0 and 1 held the condition: stop after step 1
    assert [a.rule for a in cb.monitor.alerts] == ["gap_threshold"]


def test_failing_probes_never_stop_training(tmp_path):
    cb = RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule(2, log_spaced=False),
        executor="inline",
        probe_config=ProbeConfig(blocks="no.such.layers"),
    )
    trainer = lightning_trainer(tmp_path, [cb], max_steps=4)
    trainer.fit(lightning_module(), token_loader())
    assert trainer.global_step == 4
    assert cb.monitor.n_failures == 3 and cb.monitor.history == []  # steps 0, 2, 4
    assert [a.rule for a in cb.monitor.alerts] == ["probe_failure"] * 3
    kinds = [r["type"] for r in read_records(cb.jsonl_file)]
    assert kinds.count("failure") == 3


def test_works_with_the_pytorch_lightning_package(tmp_path):
    pytest.importorskip("pytorch_lightning")
    cb = RedundancyMonitorCallback(
        probe_ids(), schedule=ProbeSchedule(2, log_spaced=False), executor="inline"
    )
    trainer = lightning_trainer(tmp_path, [cb], base="pytorch_lightning", max_steps=2)
    trainer.fit(lightning_module("pytorch_lightning"), token_loader())
    assert [h.step for h in cb.monitor.history] == [0, 2]


class Crash(Exception):
    pass


def crash_at(step):
    from lightning.pytorch import Callback

    class CrashCallback(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step:
                raise Crash(f"simulated crash at step {step}")

    return CrashCallback()


def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callback(path):
        return RedundancyMonitorCallback(
            probe_ids(),
            schedule=ProbeSchedule(3, log_spaced=False),
            executor="inline",
            jsonl_path=path,
            alerts=AlertConfig(gap_threshold=0.0, hysteresis=2, growth_factor=1.5),
        )

    # 4 batches per epoch, 3 epochs = 12 optimizer steps
    straight = callback(tmp_path / "straight.jsonl")
    lightning_trainer(tmp_path / "a", [straight], max_steps=-1, max_epochs=3).fit(
        lightning_module(), token_loader()
    )

    first = callback(tmp_path / "resumed.jsonl")
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_top_k=-1, every_n_epochs=1
    )
    with pytest.raises(Crash):
        lightning_trainer(
            tmp_path / "b", [first, ckpt, crash_at(10)], max_steps=-1, max_epochs=3
        ).fit(lightning_module(), token_loader())
    assert 9 in first.monitor.probed_steps  # a probe the checkpoint at step 8 does not hold
    second = callback(tmp_path / "resumed.jsonl")
    lightning_trainer(tmp_path / "b", [second], max_steps=-1, max_epochs=3).fit(
        lightning_module(), token_loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=8.ckpt")
    )

    assert second.monitor.probed_steps == straight.monitor.probed_steps == [0, 3, 6, 9, 12]
    for a, b in zip(second.monitor.history, straight.monitor.history, strict=True):
        assert a.step == b.step
        assert a.result.summary.scalars() == pytest.approx(
            b.result.summary.scalars(), rel=1e-5, abs=1e-7
        )
    resumed_alerts = second.monitor.recorder.alert_engine.state_dict()
    straight_alerts = straight.monitor.recorder.alert_engine.state_dict()
    assert resumed_alerts.pop("baseline") == pytest.approx(straight_alerts.pop("baseline"))
    assert resumed_alerts == straight_alerts
    assert [a.to_dict() for a in second.monitor.alerts] == [
        a.to_dict() for a in straight.monitor.alerts
    ]

    def summary(records):
        return [(r["type"], r["step"], r.get("rule")) for r in records]

    assert summary(read_records(tmp_path / "resumed.jsonl")) == summary(
        read_records(tmp_path / "straight.jsonl")
    )


def test_checkpoint_on_alert_saves_a_lightning_checkpoint(tmp_path):
    cb = RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule.explicit([2]),
        executor="inline",
        alerts=AlertConfig(gap_threshold=-10.0, hysteresis=1),
        checkpoint_on_alert=["gap_threshold"],
    )
    trainer = lightning_trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(lightning_module(), token_loader())
    saved = sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0").glob("*.ckpt"))
    assert saved == ["redundancy-alert-step2.ckpt"]
    assert trainer.global_step == 3  # a checkpoint request does not stop training
