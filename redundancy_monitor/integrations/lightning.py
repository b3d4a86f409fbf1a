"""Lightning adapter: `RedundancyMonitorCallback`, a thin shell over `RedundancyMonitor`.

Works with ``lightning.pytorch`` and, when only that is installed, ``pytorch_lightning``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.extras import missing
from redundancy_monitor.monitoring.adapters import (
    add_default_sinks,
    check_distinct_record_files,
    monitor_label,
    monitor_or_sidecar,
    probes_here,
)
from redundancy_monitor.monitoring.control import ControlSource, MonitorControl
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.sidecar import SidecarAlerts
from redundancy_monitor.monitoring.sinks import MetricsSink
from redundancy_monitor.monitoring.trackers import logger_alert_sinks

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError:
    try:  # only the standalone package is installed
        # the same class in the standalone package (one of the two is bound at run time)
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ModuleNotFoundError:
        raise missing("lightning", "RedundancyMonitorCallback") from None

log = logging.getLogger("redundancy_monitor")


def _is_tensorboard_logger(logger) -> bool:
    # Both lightning.pytorch and pytorch_lightning name their class TensorBoardLogger.
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def refuse_unsupported_strategy(strategy) -> None:
    """Fail at setup, not mid-run, for strategies whose snapshot we cannot take."""
    name = type(strategy).__name__
    stage = (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage")
    if "DeepSpeed" in name and stage == 3:
        raise InvalidConfigError(
            "DeepSpeed ZeRO-3 partitions every parameter and the redundancy probe needs whole "
            "blocks; use ZeRO stage 1/2, DDP, or FSDP2 (ModelParallelStrategy / fully_shard)"
        )
    if name == "FSDPStrategy":
        raise InvalidConfigError(
            "Lightning's strategy='fsdp' (FSDP1 flat parameters) is not supported by the "
            "redundancy monitor; shard with FSDP2 instead (ModelParallelStrategy with "
            "fully_shard in configure_model), or use strategy='ddp'"
        )


def find_language_model(pl_module: nn.Module, model: str | None = None) -> nn.Module:
    """The causal LM inside a LightningModule: `model` (an attribute path), the module
    itself when it has an output head, or its only child that has one."""
    if model is not None:
        try:
            return pl_module.get_submodule(model)
        except AttributeError:
            raise InvalidConfigError(
                f"model={model!r} names nothing in {type(pl_module).__name__}; pass the "
                "attribute path of the language model, e.g. model='model'"
            ) from None
    if callable(getattr(pl_module, "get_output_embeddings", None)):
        return pl_module
    found = [
        (name, child)
        for name, child in pl_module.named_children()
        if callable(getattr(child, "get_output_embeddings", None))
    ]
    if len(found) == 1:
        return found[0][1]
    names = [name for name, _ in found] or [name for name, _ in pl_module.named_children()]
    raise InvalidConfigError(
        f"could not tell which submodule of {type(pl_module).__name__} is the language model "
        f"(candidates: {names}); pass model='attribute.path' to RedundancyMonitorCallback"
    )


class RedundancyMonitorCallback(Callback):
    """Probe layer redundancy while a Lightning `Trainer` trains.

    Args:
        probe_batch: token ids (or ``(ids, mask)`` or a dict with ``input_ids``); when
            None and no `texts`/`dataloader` is given, the first batch of the validation
            loader (else the training loader) is used, cut to `max_sequences` rows.
        model: attribute path of the language model inside the LightningModule, when
            it is not found alone.
        log_dir: folder for our own TensorBoard writer when the trainer has no
            `TensorBoardLogger` (default ``<default_root_dir>/redundancy``).
        jsonl_path: the JSON Lines record file (default ``<log dir>/redundancy.jsonl`` of
            the run's first attempt: a run resumed from a checkpoint goes on writing the
            file its checkpoint names, though the logger starts a new ``version_N``
            folder, so one run keeps one record file; False for none).
        per_pair: also log every pair's d_repl, d_int, gap and ir as scalars.
        images: log heatmaps of d_repl, d_int and gap.
        sidecar: the log folder of a ``redundancy-monitor watch`` sidecar that probes
            this run's checkpoints. Nothing is probed in this process: at scheduled
            steps the sidecar's new alerts are read and `stop_on_alert` /
            `checkpoint_on_alert` applied on every rank (see `SidecarAlerts`).
        **monitor_kwargs: schedule, probe_config, executor, alerts, on_alert,
            stop_on_alert, checkpoint_on_alert, shadow_device, shadow_dtype, ...: see
            `RedundancyMonitor` (``shadow_device="host"``, the default on CUDA, keeps the
            snapshot in host memory: docs/big-models.md); with `sidecar` only the
            schedule and the alert actions apply.

    Its checkpoint state is kept under a `state_key` made of the probe batch and what is
    probed, so several monitors can be attached to one trainer; each then writes its
    TensorBoard run and record file into a folder of its own,
    ``<log dir>/redundancy-<8 hex digits of its configuration>`` (two given the same
    `jsonl_path` are refused). With ``fast_dev_run``
    it probes but writes nothing (no record file, no TensorBoard events, no checkpoint).

    Raises:
        InvalidConfigError, InvalidBatchError: as `RedundancyMonitor`; probing
            arguments given with `sidecar`.

    Example:
        >>> schedule = ProbeSchedule(every_n_steps=200)
        >>> cb = RedundancyMonitorCallback(probe_ids, schedule=schedule)
        >>> Trainer(callbacks=[cb]).fit(module, loader)
        >>> cb.monitor.trajectory("gap_mean")
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        model: str | None = None,
        log_dir: str | os.PathLike | None = None,
        jsonl_path: str | os.PathLike | bool | None = None,
        per_pair: bool = False,
        images: bool = True,
        sidecar: str | os.PathLike | None = None,
        **monitor_kwargs: Any,
    ):
        self.monitor: RedundancyMonitor | None
        self.sidecar: SidecarAlerts | None
        self.monitor, self.sidecar = monitor_or_sidecar(
            probe_batch, log_dir, jsonl_path, sidecar, monitor_kwargs
        )
        # What the hooks drive: the monitor, or the sidecar reader in its place.
        self._source: ControlSource = self.monitor or self.sidecar  # type: ignore[assignment]
        self.model_path, self.log_dir, self.jsonl_path = model, log_dir, jsonl_path
        self.per_pair, self.images = per_pair, images
        self._attached = False
        self._lm: nn.Module | None = None
        self._root: str | None = None  # the trainer's default_root_dir
        self._saved_jsonl: str | None = None  # the record file a restored checkpoint names
        self._alert_dir: str | None = None  # where alert checkpoints go, the same on every rank
        self._trained = False  # on_train_start ran in this fit

    @property
    def state_key(self) -> str:
        if self.monitor is None:  # a sidecar keeps its own state
            return super().state_key
        return self._generate_state_key(**self.monitor.config_key, model=self.model_path)

    @property
    def _probing(self) -> RedundancyMonitor:
        """The monitor, where this process probes (never reached with a sidecar)."""
        assert self.monitor is not None
        return self.monitor

    # ----- setup -------------------------------------------------------------------------

    def _siblings(self, trainer) -> list[RedundancyMonitorCallback]:
        return [
            cb
            for cb in trainer.callbacks
            if isinstance(cb, RedundancyMonitorCallback) and cb.monitor is not None
        ]

    def _attach_sinks(self, trainer) -> None:
        tensorboard = None
        for logger in trainer.loggers:
            if _is_tensorboard_logger(logger) and tensorboard is None:
                tensorboard = logger
            else:
                self._probing.sinks.append(MetricsSink(logger.log_metrics, self.per_pair))
                self._probing.sinks.extend(logger_alert_sinks(logger))  # MLflow, W&B: alert text
        if tensorboard is not None:
            log_dir, writer = tensorboard.log_dir, tensorboard.experiment
        else:
            log_dir = str(self.log_dir or os.path.join(trainer.default_root_dir, "redundancy"))
            writer = None
        self._root, self._run_dir = str(trainer.default_root_dir), log_dir  # alert checkpoints
        saved = self._saved_jsonl and os.path.join(self._root, self._saved_jsonl)
        jsonl = False if self.jsonl_path is False else self.jsonl_path or saved
        if len(self._siblings(trainer)) > 1:
            # Several monitors: each writes a folder of its own (TensorBoard run and record
            # file), so neither their records nor their scalars mix.
            log_dir, writer = os.path.join(log_dir, self._label), None
        self.tensorboard_dir, self.jsonl_file = add_default_sinks(
            self._probing, log_dir, jsonl, self.per_pair, self.images, writer
        )

    @property
    def _label(self) -> str:
        return monitor_label({**self._probing.config_key, "model": self.model_path})

    def _fallback_batch(self, trainer) -> None:
        if self._probing.has_probe_batch:
            return
        loaders = trainer.val_dataloaders or trainer.train_dataloader
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is not None:
            self._probing.set_probe_batch(dataloader=loaders)

    # ----- hooks -------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        refuse_unsupported_strategy(trainer.strategy)
        if stage == "fit" and self.monitor is not None and self.monitor.closed:
            raise InvalidConfigError(
                "this RedundancyMonitorCallback watched a fit already and is closed; pass a "
                "new callback to each Trainer.fit (resuming from a checkpoint restores its state)"
            )
        if stage == "fit" and self.monitor is not None:
            explicit = [
                None if isinstance(cb.jsonl_path, bool) else cb.jsonl_path
                for cb in self._siblings(trainer)
            ]
            check_distinct_record_files(explicit, "RedundancyMonitorCallback")
        self._trained = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._begin(trainer, pl_module)
        self._apply(trainer, self._source.step(trainer.global_step, self._lm))

    def _begin(self, trainer, pl_module) -> None:
        self._trained = True
        writes = not trainer.fast_dev_run
        if probes_here(trainer.is_global_zero, trainer.world_size, self.monitor):
            self._lm = find_language_model(pl_module, self.model_path)
            self._fallback_batch(trainer)
            if not self._attached and trainer.is_global_zero and writes:
                self._attach_sinks(trainer)
                self._attached = True
        folder = getattr(self, "_run_dir", None) or trainer.default_root_dir
        # A collective: a sharded checkpoint needs one path on every rank.
        self._alert_dir = trainer.strategy.broadcast(str(folder)) if writes else None
        self._source.start()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._source.before_weights_change()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._apply(trainer, self._source.step(trainer.global_step, self._lm))

    def on_train_end(self, trainer, pl_module) -> None:
        self._apply(trainer, self._source.train_end(trainer.global_step, self._lm))

    def on_fit_end(self, trainer, pl_module) -> None:
        # Resumed from the checkpoint of a run's last step, the fit ends at once without
        # on_train_start / on_train_end; the final weights may still be owed their probe
        # (the attempt that saved the checkpoint died during it).
        if not self._trained and self.monitor is not None and self.monitor.final_probe_owed:
            self._begin(trainer, pl_module)
            self.on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Also reached on KeyboardInterrupt. Bounded: a running probe gets close_timeout
        # seconds, is then cancelled, and abandoned if it still runs a second later.
        self._source.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # a validate or test run before fit leaves the monitor open
            self._source.close()

    def _apply(self, trainer, control: MonitorControl) -> None:
        """Copy the monitor's control (the same on every rank) into the trainer."""
        if control.stop:
            trainer.should_stop = True
        if control.save and self._alert_dir is not None:
            name = f"redundancy-alert-step{trainer.global_step}.ckpt"
            trainer.save_checkpoint(os.path.join(self._alert_dir, name))

    # ----- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.monitor is None:  # a sidecar keeps its own state
            return {}
        state = self.monitor.state_dict()
        path = getattr(self, "jsonl_file", None)
        if path is not None:  # relative to the root, so a moved run folder still resumes
            inside = self._root is not None and not os.path.relpath(path, self._root).startswith(
                ".."
            )
            state["jsonl_file"] = os.path.relpath(path, self._root) if inside else path
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is None:  # a sidecar keeps its own state
            return
        state = dict(state_dict)
        self._saved_jsonl = state.pop("jsonl_file", None)
        # A hook: another batch, pair set or world size starts a new trajectory with an
        # alert instead of raising.
        self.monitor.load_state_dict(state, strict=False)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Resumed with another configuration, the state is under another key: take the
        one monitor state no attached monitor claims (its changes are then alerted)."""
        states = checkpoint.get("callbacks") or {}
        if self.monitor is None or self.state_key in states:
            return  # Lightning hands it to load_state_dict
        claimed = {cb.state_key for cb in trainer.callbacks if isinstance(cb, type(self))}
        prefix = type(self).__qualname__
        orphans = [k for k in states if str(k).startswith(prefix) and k not in claimed]
        if len(orphans) == 1:
            self.load_state_dict(states[orphans[0]])
        elif orphans:
            log.warning(
                "redundancy monitor: the checkpoint holds %d monitor states and none matches "
                "this monitor's configuration; starting a fresh trajectory",
                len(orphans),
            )
