"""The trackers teams watch, for real: MLflow (a local file store) and W&B (offline),
through the HF Trainer's ``report_to`` and Lightning's ``MLFlowLogger`` /
``WandbLogger``. The scalars and the alert text are read back from each tracker's own
client or run file and compared with the record file. Nothing is sent over the network.

One training run per route feeds both trackers (a W&B run takes seconds to start)."""

from __future__ import annotations

import pytest
from tracker_files import (
    mlflow_alerts,
    wandb_alerts,
    wandb_history,
    wandb_records,
    wandb_run_file,
    wandb_summary,
)
from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

from redundancy_monitor import ProbeSchedule, read_records
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.trackers import MLFLOW_TAG, WANDB_SUMMARY_KEY

#: gap_threshold fires at the first probe and stays active: one alert per run, and the
#: same probe-by-probe behaviour on every machine (the condition holds for any gap).
ALERT_AT_FIRST_PROBE = AlertConfig(
    gap_threshold=-1.0,
    hysteresis=1,
    use_intervals=False,
    growth_factor=None,
    overlap_threshold=None,
    regime_change=False,
)
pytest_plugins = ["tracker_files"]  # trackers_offline: W&B offline, MLflow to a file store
SCALARS = ("gap_mean", "gap_median", "d_repl_mean", "d_int_mean")


def from_record_file(path):
    """(probe records, alert lines) of a record file."""
    lines = read_records(path)
    probes = [ProbeRecord.from_dict(r) for r in lines if r["type"] == "probe"]
    alerts = [{k: v for k, v in r.items() if k != "type"} for r in lines if r["type"] == "alert"]
    return probes, alerts


def expected(probes, name):
    return [(p.step, p.result.summary.scalars()[name]) for p in probes]


def check_mlflow(client, run_id, probes, alerts, tmp_path):
    for name in SCALARS:
        history = client.get_metric_history(run_id, f"redundancy/{name}")
        assert sorted((m.step, m.value) for m in history) == pytest.approx(expected(probes, name))
    assert mlflow_alerts(client, run_id, tmp_path / "artifacts") == alerts
    tag = client.get_run(run_id).data.tags[MLFLOW_TAG]
    assert alerts[-1]["message"] in tag and alerts[-1]["rule"] in tag


def check_wandb(records, probes, alerts, step_key, prefix=""):
    rows = [r for r in wandb_history(records) if f"{prefix}redundancy/gap_mean" in r]
    for name in SCALARS:
        logged = sorted((int(r[step_key]), r[f"{prefix}redundancy/{name}"]) for r in rows)
        assert logged == pytest.approx(expected(probes, name))
    stored = wandb_alerts(records)
    assert [text for _, text, _ in stored] == [a["message"] for a in alerts]
    for (title, _, level), a in zip(stored, alerts, strict=True):
        assert a["rule"] in title and f"step {a['step']}" in title and level == "WARN"
    assert alerts[-1]["message"] in wandb_summary(records)[WANDB_SUMMARY_KEY]


def test_hf_report_to_mlflow_and_wandb_hold_the_record_files_scalars_and_alerts(
    trackers_offline,
):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    import mlflow
    import wandb
    from test_hf_trainer import make_trainer

    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

    tmp_path = trackers_offline
    cb = RedundancyMonitorTrainerCallback(
        probe_ids(),
        schedule=ProbeSchedule(2, log_spaced=False),
        executor="inline",
        alerts=ALERT_AT_FIRST_PROBE,
    )
    try:
        make_trainer(tmp_path / "out", [cb], max_steps=4, report_to=["mlflow", "wandb"]).train()
    finally:
        wandb.finish()  # writes the run file out; the Trainer leaves the run open
        mlflow.end_run()  # nothing left active for the next test
    probes, alerts = from_record_file(cb.jsonl_file)
    assert [p.step for p in probes] == [0, 2, 4] and [a["step"] for a in alerts] == [0]

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("redundancy").experiment_id])
    check_mlflow(client, run.info.run_id, probes, alerts, tmp_path)

    # the Trainer's W&B integration files every on_log key under train/
    records = wandb_records(wandb_run_file(tmp_path / "wandb_dir"))
    check_wandb(records, probes, alerts, "train/redundancy_probe/snapshot_step", "train/")


def test_lightning_mlflow_and_wandb_loggers_hold_the_record_files_scalars_and_alerts(
    trackers_offline,
):
    pytest.importorskip("lightning")
    import wandb
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    tmp_path = trackers_offline
    mlflow_logger = MLFlowLogger(
        experiment_name="redundancy", tracking_uri=(tmp_path / "mlruns").as_uri()
    )
    wandb_logger = WandbLogger(
        project="redundancy-test", save_dir=str(tmp_path / "wandb_dir"), offline=True
    )
    cb = RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule(2, log_spaced=False),
        executor="inline",
        alerts=ALERT_AT_FIRST_PROBE,
    )
    trainer = lightning_trainer(
        tmp_path / "pl", [cb], max_steps=4, logger=[mlflow_logger, wandb_logger]
    )
    try:
        trainer.fit(lightning_module(), token_loader())
    finally:
        wandb.finish()
    probes, alerts = from_record_file(cb.jsonl_file)
    assert [p.step for p in probes] == [0, 2, 4] and [a["step"] for a in alerts] == [0]

    check_mlflow(mlflow_logger.experiment, mlflow_logger.run_id, probes, alerts, tmp_path)

    # WandbLogger logs the step we pass as trainer/global_step (W&B's own step must grow)
    records = wandb_records(wandb_run_file(tmp_path / "wandb_dir"))
    check_wandb(records, probes, alerts, "trainer/global_step")
