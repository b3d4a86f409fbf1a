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
    monitor_or_sidecar,
    probes_here,
)
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.sidecar import SidecarAlerts
from redundancy_monitor.monitoring.sinks import MetricsSink

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError:
    try:  # only the standalone package is installed
        from pytorch_lightning import Callback
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
    probed, so several monitors can be attached to one trainer. With ``fast_dev_run``
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
        self.model_path, self.log_dir, self.jsonl_path = model, log_dir, jsonl_path
        self.per_pair, self.images = per_pair, images
        self._attached = False
        self._lm: nn.Module | None = None
        self._root: str | None = None  # the trainer's default_root_dir
        self._saved_jsonl: str | None = None  # the record file a restored checkpoint names
        self._alert_dir: str | None = None  # where alert checkpoints go, the same on every rank
        self._synced_step: int | None = None

    @property
    def state_key(self) -> str:
        if self.monitor is None:  # a sidecar keeps its own state
            return super().state_key
        return self._generate_state_key(**self.monitor.config_key, model=self.model_path)

    # ----- setup -------------------------------------------------------------------------

    def _attach_sinks(self, trainer) -> None:
        tensorboard = None
        for logger in trainer.loggers:
            if _is_tensorboard_logger(logger) and tensorboard is None:
                tensorboard = logger
            else:
                self.monitor.sinks.append(MetricsSink(logger.log_metrics, self.per_pair))
        if tensorboard is not None:
            log_dir, writer = tensorboard.log_dir, tensorboard.experiment
        else:
            log_dir = str(self.log_dir or os.path.join(trainer.default_root_dir, "redundancy"))
            writer = None
        self._root, self._run_dir = str(trainer.default_root_dir), log_dir  # alert checkpoints
        saved = self._saved_jsonl and os.path.join(self._root, self._saved_jsonl)
        jsonl = False if self.jsonl_path is False else self.jsonl_path or saved
        self.tensorboard_dir, self.jsonl_file = add_default_sinks(
            self.monitor, log_dir, jsonl, self.per_pair, self.images, writer
        )

    def _fallback_batch(self, trainer) -> None:
        if self.monitor.has_probe_batch:
            return
        loaders = trainer.val_dataloaders or trainer.train_dataloader
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is not None:
            self.monitor.set_probe_batch(dataloader=loaders)

    # ----- hooks -------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        refuse_unsupported_strategy(trainer.strategy)
        if stage == "fit" and self.monitor is not None and self.monitor.closed:
            raise InvalidConfigError(
                "this RedundancyMonitorCallback watched a fit already and is closed; pass a "
                "new callback to each Trainer.fit (resuming from a checkpoint restores its state)"
            )

    def _probes_here(self, trainer) -> bool:
        return probes_here(trainer.is_global_zero, trainer.world_size, self.monitor)

    def on_train_start(self, trainer, pl_module) -> None:
        writes = not trainer.fast_dev_run
        if self.sidecar is not None:
            folder = str(trainer.default_root_dir)
            self._alert_dir = trainer.strategy.broadcast(folder) if writes else None
            self.sidecar.start()
            self._read_sidecar(trainer)
            return
        if self._probes_here(trainer):
            self._lm = find_language_model(pl_module, self.model_path)
            self._fallback_batch(trainer)
            if not self._attached and trainer.is_global_zero and writes:
                self._attach_sinks(trainer)
                self._attached = True
        folder = getattr(self, "_run_dir", None) or trainer.default_root_dir
        # A collective: a sharded checkpoint needs one path on every rank.
        self._alert_dir = trainer.strategy.broadcast(folder) if writes else None
        if self._probes_here(trainer):
            self.monitor.start()
            self.monitor.step(trainer.global_step, self._lm)
        self._apply_requests(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._probes_here(trainer):
            self.monitor.before_weights_change()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sidecar is not None:
            self._read_sidecar(trainer)
            return
        if self._probes_here(trainer):
            self.monitor.step(trainer.global_step, self._lm)
        self._apply_requests(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._probes_here(trainer):
            self.monitor.train_end(trainer.global_step, self._lm)
        self._apply_requests(trainer, at_end=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Also reached on KeyboardInterrupt. Bounded: a running probe gets close_timeout
        # seconds, is then cancelled, and abandoned if it still runs a second later.
        if self.monitor is not None:
            self.monitor.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.monitor is not None and stage == "fit":
            # a validate or test run before fit leaves the monitor open
            self.monitor.close()

    def _read_sidecar(self, trainer) -> None:
        # Every rank reads at the same scheduled steps and gets rank 0's decision.
        if self.sidecar.step(trainer.global_step):
            save = self.sidecar.checkpoint_requested
            self.sidecar.checkpoint_requested = False
            self._act(trainer, self.sidecar.stop_requested, save)

    def _apply_requests(self, trainer, at_end: bool = False) -> None:
        if self.monitor is None:
            return
        stop, save = self.monitor.stop_requested, self.monitor.checkpoint_requested
        if trainer.world_size > 1 and self.monitor.distributed is False:
            # Rank 0 probes alone, so only it knows; it tells the others at scheduled
            # steps (the same on every rank), not at every batch. When all ranks share
            # the probe, each reaches the same decisions from the gathered result.
            if not (at_end or self._sync_due(trainer.global_step)):
                return
            if self.monitor.stop_rules:
                stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if self.monitor.checkpoint_rules:
                save = trainer.strategy.reduce_boolean_decision(save, all=False)
        if save:
            self.monitor.checkpoint_requested = False
        self._act(trainer, stop, save)

    def _act(self, trainer, stop: bool, save: bool) -> None:
        if stop:
            trainer.should_stop = True
        if save and self._alert_dir is not None:
            name = f"redundancy-alert-step{trainer.global_step}.ckpt"
            trainer.save_checkpoint(os.path.join(self._alert_dir, name))

    def _sync_due(self, step: int) -> bool:
        """Whether `step` is a scheduled step seen for the first time (micro-batches of
        one optimizer step share it)."""
        if step == self._synced_step or not self.monitor.schedule.is_due(step):
            return False
        self._synced_step = step
        return True

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
