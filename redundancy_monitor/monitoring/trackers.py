"""Alerts into the experiment trackers teams watch: MLflow and Weights & Biases.

The probe scalars reach the trackers through the frameworks' own paths (Lightning's
``logger.log_metrics``, the HF Trainer's ``on_log``); alerts are text, which those paths
do not carry, so these sinks write them with each tracker's own API:

- `MlflowAlerts`: the run's ``redundancy_alerts.jsonl`` artifact (one JSON object per
  alert, the fields of the record file's alert lines) and the tag
  ``redundancy.last_alert``.
- `WandbAlerts`: ``run.alert(...)`` (W&B notifies by e-mail or Slack as the user's W&B
  settings say; an offline run keeps the alert in its run file), and the summary key
  ``redundancy/last_alert``.

The adapters add them on their own when the run reports to these trackers. Like every
sink they are called from the training thread; an error is counted and alerted by the
monitor (``sink_failure``), never raised into training.
"""

from __future__ import annotations

import json
from typing import Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.sinks import Sink

MLFLOW_ARTIFACT = "redundancy_alerts.jsonl"
MLFLOW_TAG = "redundancy.last_alert"
WANDB_SUMMARY_KEY = "redundancy/last_alert"


def alert_title(alert: Alert) -> str:
    return f"redundancy monitor: {alert.rule} (step {alert.step})"


class MlflowAlerts(Sink):
    """Alerts of one MLflow run into its ``redundancy_alerts.jsonl`` artifact.

    Args:
        client: an ``MlflowClient`` and `run_id` (Lightning's ``MLFlowLogger`` gives
            ``logger.experiment`` and ``logger.run_id``); None: the active run of the
            ``mlflow`` module at each alert (the HF Trainer's ``report_to=["mlflow"]``),
            skipped when none is active.
    """

    def __init__(self, client: Any = None, run_id: str | None = None):
        self.client, self.run_id = client, run_id
        self._lines: dict[str, list[str]] = {}  # run id -> the alert lines so far

    def _target(self) -> tuple[Any, str] | None:
        if self.client is not None and self.run_id is not None:
            return self.client, self.run_id
        import mlflow

        active = mlflow.active_run()
        if active is None:
            return None
        # The HF integration logs metrics asynchronously; reading the run (to find its
        # artifact folder) while a metric file is half-written fails on a file store.
        flush = getattr(mlflow, "flush_async_logging", None)
        if flush is not None:
            flush()
        return mlflow.MlflowClient(), active.info.run_id

    def write_alert(self, alert: Alert) -> None:
        target = self._target()
        if target is None:
            return
        client, run_id = target
        lines = self._lines.setdefault(run_id, [])
        lines.append(json.dumps(alert.to_dict(), sort_keys=True))
        # An artifact is written whole: the file keeps every alert of this run so far.
        client.log_text(run_id, "\n".join(lines) + "\n", MLFLOW_ARTIFACT)
        client.set_tag(run_id, MLFLOW_TAG, f"step {alert.step}: {alert.rule}: {alert.message}")


class WandbAlerts(Sink):
    """Alerts of one W&B run through ``run.alert`` and the run summary.

    Args:
        run: a ``wandb`` run (Lightning's ``WandbLogger.experiment``); None: ``wandb.run``
            at each alert (the HF Trainer's ``report_to=["wandb"]``), skipped when no
            run is active.
        level: the W&B alert level (``"INFO"``, ``"WARN"``, ``"ERROR"``).
    """

    def __init__(self, run: Any = None, level: str = "WARN"):
        if level not in ("INFO", "WARN", "ERROR"):
            raise InvalidConfigError(f"W&B alert level must be INFO, WARN or ERROR, got {level!r}")
        self.run, self.level = run, level

    def write_alert(self, alert: Alert) -> None:
        run = self.run
        if run is None:
            import wandb

            run = wandb.run
        if run is None:
            return
        # wait_duration: W&B drops an alert with the same title within this window; the
        # title names the step, and the engine alerts once per activation anyway.
        run.alert(title=alert_title(alert), text=alert.message, level=self.level, wait_duration=1)
        run.summary[WANDB_SUMMARY_KEY] = f"step {alert.step}: {alert.rule}: {alert.message}"


def logger_alert_sinks(logger: Any) -> list[Sink]:
    """The alert sinks for one Lightning logger: MLflow and W&B loggers get one, others
    none (their scalars go through `MetricsSink`)."""
    names = {cls.__name__ for cls in type(logger).__mro__}
    if "MLFlowLogger" in names:
        return [MlflowAlerts(logger.experiment, logger.run_id)]
    if "WandbLogger" in names:
        return [WandbAlerts(logger.experiment)]
    return []


def report_to_alert_sinks(report_to: list[str] | str | None) -> list[Sink]:
    """The alert sinks for an HF Trainer's ``report_to``: each finds the run that the
    Trainer's own integration opened, when it writes."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    sinks: list[Sink] = []
    if "mlflow" in names:
        sinks.append(MlflowAlerts())
    if "wandb" in names:
        sinks.append(WandbAlerts())
    return sinks
