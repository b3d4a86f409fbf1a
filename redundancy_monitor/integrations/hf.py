"""Hugging Face Trainer adapter: `RedundancyMonitorTrainerCallback`, a thin shell over
`RedundancyMonitor`. Its state is saved in each checkpoint's ``trainer_state.json``."""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.extras import require
from redundancy_monitor.monitoring.adapters import (
    add_default_sinks,
    monitor_or_sidecar,
    probes_here,
)
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.sidecar import SidecarAlerts

_callbacks = require("transformers.trainer_callback", "RedundancyMonitorTrainerCallback")
TrainerCallback, ExportableState = _callbacks.TrainerCallback, _callbacks.ExportableState

# The Trainer rebuilds stateful callbacks as ``type(cb)(**args)`` when
# `restore_callback_states_from_checkpoint=True`; args must be JSON, so they carry a token
# naming the live callback whose configuration the rebuilt one takes over.
_LIVE: weakref.WeakValueDictionary[str, RedundancyMonitorTrainerCallback] = (
    weakref.WeakValueDictionary()
)
_TOKENS = itertools.count()


def refuse_deepspeed_zero3(args) -> None:
    """ZeRO-3 partitions every parameter; the probe needs whole blocks."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(args, "deepspeed", None) and is_deepspeed_zero3_enabled():
        raise InvalidConfigError(
            "DeepSpeed ZeRO-3 partitions every parameter and the redundancy probe needs "
            "whole blocks; use ZeRO stage 1/2, DDP, or FSDP2"
        )


class RedundancyMonitorTrainerCallback(TrainerCallback, ExportableState):
    """Probe layer redundancy while a `transformers.Trainer` trains.

    Args:
        probe_batch: token ids (or ``(ids, mask)`` or a dict with ``input_ids``); when
            None and no `texts`/`dataloader` is given, the first batch of the evaluation
            loader (else the training loader) is used, cut to `max_sequences` rows.
        log_dir: TensorBoard folder (default ``$TENSORBOARD_LOGGING_DIR/redundancy`` or
            ``<output_dir>/runs/redundancy``).
        jsonl_path: the JSON Lines file (default ``<log_dir>/redundancy.jsonl``; False: none).
        per_pair, images: as for the TensorBoard sink.
        sidecar: the log folder of a ``redundancy-monitor watch`` process that probes
            this run's saved checkpoints instead of this process; at scheduled steps
            the callback reads its new alerts and sets ``control.should_training_stop``
            / ``should_save`` on every rank as `stop_on_alert` / `checkpoint_on_alert`
            ask (see `SidecarAlerts`).
        **monitor_kwargs: schedule, pairs, executor, alerts, on_alert, stop_on_alert,
            checkpoint_on_alert, ...: see `RedundancyMonitor`; with `sidecar` only the
            schedule and the alert actions apply.

    On resume the monitor state is read back from the checkpoint's ``trainer_state.json``
    (whether or not ``restore_callback_states_from_checkpoint`` is set).

    The HF Trainer has no exception hook: when training raises (or Ctrl-C), nothing closes
    the monitor. A running probe is in a daemon thread, so the process still exits; to
    keep its result, call ``cb.monitor.close()`` in a ``finally`` around ``train()``.

    Example:
        >>> cb = RedundancyMonitorTrainerCallback(probe_ids, every_n_steps=200)
        >>> Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        log_dir: str | os.PathLike | None = None,
        jsonl_path: str | os.PathLike | bool | None = None,
        per_pair: bool = False,
        images: bool = True,
        restore_token: str | None = None,
        sidecar: str | os.PathLike | None = None,
        **monitor_kwargs: Any,
    ):
        if restore_token is not None:
            self._adopt(restore_token)
            return
        self.monitor: RedundancyMonitor | None
        self.sidecar: SidecarAlerts | None
        self.monitor, self.sidecar = monitor_or_sidecar(
            probe_batch, log_dir, jsonl_path, sidecar, monitor_kwargs
        )
        self.log_dir, self.jsonl_path = log_dir, jsonl_path
        self.per_pair, self.images = per_pair, images
        self._attached = self._restored = False
        self._token = f"rm-{os.getpid()}-{next(_TOKENS)}"
        _LIVE[self._token] = self

    def _adopt(self, token: str) -> None:
        original = _LIVE.get(token)
        if original is None:
            raise InvalidConfigError(
                "cannot rebuild RedundancyMonitorTrainerCallback from a checkpoint alone; pass "
                "the callback to the Trainer again (its state is then restored from the "
                "checkpoint)"
            )
        self.__dict__.update(original.__dict__)
        _LIVE[self._token] = self

    # ----- ExportableState ---------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {"restore_token": self._token},
            "attributes": {"monitor_state": self.monitor_state},
        }

    @property
    def monitor_state(self) -> dict:
        return {} if self.monitor is None else self.monitor.state_dict()

    @monitor_state.setter
    def monitor_state(self, value: dict) -> None:
        if self.monitor is not None:  # a sidecar keeps its own state
            self.monitor.load_state_dict(value)
        self._restored = True

    def _restore(self, state) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if self._restored or state.global_step == 0 or not saved:
            return
        self.monitor_state = saved["attributes"]["monitor_state"]

    # ----- setup -------------------------------------------------------------------------

    def _attach_sinks(self, args) -> None:
        default = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
        log_dir = str(self.log_dir or os.path.join(default, "redundancy"))
        self.tensorboard_dir, self.jsonl_file = add_default_sinks(
            self.monitor, log_dir, self.jsonl_path, self.per_pair, self.images
        )

    def _fallback_batch(self, kwargs) -> None:
        loader = kwargs.get("eval_dataloader") or kwargs.get("train_dataloader")
        if not self.monitor.has_probe_batch and loader is not None:
            self.monitor.set_probe_batch(dataloader=loader)

    # ----- events ------------------------------------------------------------------------

    def _probes_here(self, args, state) -> bool:
        return probes_here(state.is_world_process_zero, args.world_size, self.monitor)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_deepspeed_zero3(args)
        if self.sidecar is not None:
            self.sidecar.start()
            self._read_sidecar(state, control)
            return
        if not self._probes_here(args, state):
            return
        self._restore(state)
        self._fallback_batch(kwargs)
        if not self._attached and state.is_world_process_zero:
            self._attach_sinks(args)
            self._attached = True
        self.monitor.start()
        self.monitor.step(state.global_step, model)
        self._apply_requests(control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._probes_here(args, state):
            self.monitor.before_weights_change()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.sidecar is not None:
            self._read_sidecar(state, control)
        elif self._probes_here(args, state):
            self.monitor.step(state.global_step, model)
            self._apply_requests(control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._probes_here(args, state):
            self.monitor.train_end(state.global_step, model)
            self.monitor.close()

    def _read_sidecar(self, state, control) -> None:
        # Every process reads at the same scheduled steps and gets rank 0's decision.
        if self.sidecar.step(state.global_step):
            if self.sidecar.stop_requested:
                control.should_training_stop = True
            if self.sidecar.checkpoint_requested:
                self.sidecar.checkpoint_requested = False
                control.should_save = True

    def _apply_requests(self, control) -> None:
        # With several processes every rank reaches the same decisions from the same
        # gathered result, so each sets its own control flags.
        if self.monitor.stop_requested:
            control.should_training_stop = True
        if self.monitor.checkpoint_requested:
            self.monitor.checkpoint_requested = False
            control.should_save = True
