"""A Lightning run with a TensorBoardLogger (or an HF Trainer run reporting to
TensorBoard) whose files may not grow past a limit (RLIMIT_FSIZE, "File too large" as on
a full disk), with or without the monitor (for test_disk_full_framework_writer.py).

    PYTHONPATH=tests python tests/faults/file_size_limit_child.py ROOT LIMIT monitor|none [hf]

Prints one JSON line: how fit() ended (``"ok"`` or the exception), and the monitor's
counters.
"""

from __future__ import annotations

import json
import resource
import signal
import sys

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

from redundancy_monitor import AlertConfig, ProbeSchedule
from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback


class LimitFileSizes(Callback):
    """From the start of training on, no file of this process may grow past `limit`
    bytes: a write past it fails with EFBIG (SIGXFSZ ignored), as a full disk fails
    with ENOSPC. Set after setup, so that imports and the first files are written."""

    def __init__(self, limit: int):
        self.limit = limit

    def on_train_start(self, trainer, pl_module):
        limit_file_sizes(self.limit)


def limit_file_sizes(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def hf_main(root: str, limit: int, with_monitor: bool) -> None:
    import transformers
    from conftest import tiny_model
    from training_fixtures import TokenDataset

    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

    class Limit(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            limit_file_sizes(limit)

    callbacks: list = [Limit()]
    monitor = None
    if with_monitor:
        monitor = RedundancyMonitorTrainerCallback(
            probe_ids(),
            schedule=ProbeSchedule(1, log_spaced=False),
            executor="inline",
            alerts=AlertConfig(gap_threshold=None, growth_factor=None, overlap_threshold=None),
        )
        callbacks.append(monitor)
    args = transformers.TrainingArguments(
        output_dir=root,
        max_steps=6,
        per_device_train_batch_size=8,
        report_to=["tensorboard"],
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=tiny_model("llama", 4).train(),
        args=args,
        train_dataset=TokenDataset(),
        callbacks=callbacks,
    )
    try:
        trainer.train()
        ended = "ok"
    except BaseException as exc:
        ended = f"{type(exc).__name__}: {exc}"
    report(ended, monitor)


def report(ended: str, monitor) -> None:
    out: dict = {"ended": ended}
    if monitor is not None:
        m = monitor.monitor
        out.update(n_probes=m.n_probes, n_sink_errors=m.n_sink_errors)
        out["alerts"] = [a.rule for a in m.alerts]
        out["tensorboard_dir"] = monitor.tensorboard_dir
    print(json.dumps(out), flush=True)


def main(root: str, limit: int, with_monitor: bool) -> None:
    callbacks: list = [LimitFileSizes(limit)]
    monitor = None
    if with_monitor:
        monitor = RedundancyMonitorCallback(
            probe_ids(),
            schedule=ProbeSchedule(1, log_spaced=False),
            executor="inline",
            alerts=AlertConfig(gap_threshold=None, growth_factor=None, overlap_threshold=None),
        )
        callbacks.append(monitor)
    trainer = lightning_trainer(
        root,
        callbacks,
        max_steps=6,
        logger=TensorBoardLogger(root, name="tb"),
        enable_checkpointing=False,
    )
    try:
        trainer.fit(lightning_module(), token_loader())
        ended = "ok"
    except BaseException as exc:  # what the run's owner would see
        ended = f"{type(exc).__name__}: {exc}"
    report(ended, monitor)


if __name__ == "__main__":
    run = hf_main if sys.argv[4:] == ["hf"] else main
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "monitor")
