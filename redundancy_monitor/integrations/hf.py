"""Hugging Face Trainer adapter: `RedundancyMonitorTrainerCallback`, a thin shell over
`RedundancyMonitor`. Its state is saved in each checkpoint's ``trainer_state.json``."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.extras import require
from redundancy_monitor.files import RECORD_FILE
from redundancy_monitor.monitoring.adapters import (
    check_distinct_record_files,
    monitor_or_sidecar,
    probes_here,
)
from redundancy_monitor.monitoring.control import ControlSource, MonitorControl
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.sidecar import SidecarAlerts
from redundancy_monitor.monitoring.sinks import PROBE_INFO, Sink, probe_scalars
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink
from redundancy_monitor.monitoring.trackers import report_to_alert_sinks

if TYPE_CHECKING:
    from transformers.trainer_callback import CallbackHandler, ExportableState, TrainerCallback
else:  # a clear error naming the extra when transformers is missing
    _callbacks = require("transformers.trainer_callback", "RedundancyMonitorTrainerCallback")
    TrainerCallback, ExportableState = _callbacks.TrainerCallback, _callbacks.ExportableState
    CallbackHandler = _callbacks.CallbackHandler

log = logging.getLogger("redundancy_monitor")

# The Trainer rebuilds stateful callbacks as ``type(cb)(**args)`` when
# `restore_callback_states_from_checkpoint=True`; args must be JSON, so they carry a token
# naming the live callback to hand back (`__new__` returns that very object, so nothing
# is copied). In a new process that token is unknown: the live callback not started yet
# of the same configuration (the digest after the colon) is handed back, else the newest
# one not started yet.
_LIVE: weakref.WeakValueDictionary[str, RedundancyMonitorTrainerCallback] = (
    weakref.WeakValueDictionary()
)
_TOKENS = itertools.count()
#: Callbacks that only print logs to the console: they do not get the probe scalars.
_CONSOLE_CALLBACKS = ("ProgressCallback", "PrinterCallback")


def refuse_unsupported_setup(args, model=None) -> None:
    """Fail at the start of training, not mid-run, for setups whose snapshot we cannot take.

    Raises:
        InvalidConfigError: DeepSpeed ZeRO-3, or FSDP1 (set in the arguments, or a model
            already wrapped in ``FullyShardedDataParallel``).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(args, "deepspeed", None) and is_deepspeed_zero3_enabled():
        raise InvalidConfigError(
            "DeepSpeed ZeRO-3 partitions every parameter and the redundancy probe needs "
            "whole blocks; use ZeRO stage 1/2, DDP, or FSDP2"
        )
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    fsdp1 = getattr(args, "fsdp", None) and plugin.get("fsdp_version") == 1
    modules = model.modules() if model is not None else ()
    if fsdp1 or any(type(m).__name__ == "FullyShardedDataParallel" for m in modules):
        raise InvalidConfigError(
            "FSDP1 (flat parameters) is not supported by the redundancy monitor; shard with "
            "FSDP2 instead (fsdp_config={'version': 2}), or train with DDP"
        )


def _calling_handler() -> CallbackHandler | None:
    """The `CallbackHandler` of the Trainer that is calling us, found on the call stack.

    Why the stack: the Trainer hands a callback no reference to itself, its handler or its
    other callbacks, and the log sink needs them (``on_log`` of the integrations, the
    TensorBoard writer); with no handler found the probe scalars go to our own writer."""
    frame: Any = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        owner = getattr(owner, "callback_handler", owner)  # the Trainer itself
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


class TrainerLogSink(Sink):
    """Sends each probe's scalars down the Trainer's own log path: the ``on_log`` event
    of the other callbacks (every ``report_to`` integration: W&B, MLflow, ...; and the
    user's), and ``state.log_history``, at the step of the probe's snapshot.

    TensorBoard is written separately, beside the Trainer's own run, so that the tags
    keep their sections (its ``on_log`` would file them all under ``train/``).
    """

    def __init__(self, owner: RedundancyMonitorTrainerCallback, handler, per_pair: bool):
        self.owner, self.handler, self.per_pair = owner, handler, per_pair

    def _receivers(self) -> list:
        skip = (*_CONSOLE_CALLBACKS, "TensorBoardCallback")
        return [
            cb
            for cb in self.handler.callbacks
            if cb is not self.owner and type(cb).__name__ not in skip
        ]

    def write_probe(self, record: ProbeRecord) -> None:
        args, state, control = self.owner._args, self.owner._state, self.owner._control
        assert record.result is not None  # sinks get finished probes only
        logs = probe_scalars(record.result, self.per_pair, record.change)
        logs[f"{PROBE_INFO}/snapshot_step"] = float(record.step)
        at_snapshot = copy.copy(state)  # logged at the step of the snapshot (§6)
        at_snapshot.global_step = record.step
        state.log_history.append({**logs, "step": record.step})
        h = self.handler
        for callback in self._receivers():
            callback.on_log(
                args,
                at_snapshot,
                control,
                logs=dict(logs),
                model=h.model,
                processing_class=h.processing_class,
                optimizer=h.optimizer,
                lr_scheduler=h.lr_scheduler,
                train_dataloader=h.train_dataloader,
                eval_dataloader=h.eval_dataloader,
            )


def _tensorboard_writer(tensorboard_callback, args):
    """The Trainer's writer; it closes it at train end, so re-open it as its on_log does."""

    def writer():
        if tensorboard_callback.tb_writer is None:
            tensorboard_callback._init_summary_writer(args)
        return tensorboard_callback.tb_writer

    return writer


class RedundancyMonitorTrainerCallback(TrainerCallback, ExportableState):
    """Probe layer redundancy while a `transformers.Trainer` trains.

    The scalars go where the Trainer reports (``report_to``): into the Trainer's own
    TensorBoard run (with heatmaps and alerts), and through its log event to every other
    integration (W&B, MLflow, ...) and callback; with ``report_to="none"`` only the
    record file is written.

    Args:
        probe_batch: token ids (or ``(ids, mask)`` or a dict with ``input_ids``); when
            None and no `texts`/`dataloader` is given, the first rows of the evaluation
            loader's (else the training loader's) data are used, at most `max_sequences`.
        log_dir: folder of the record file (default ``<output_dir>/redundancy``).
        jsonl_path: the JSON Lines file (default ``<log_dir>/redundancy.jsonl``; False: none).
        per_pair, images: as for the TensorBoard sink.
        sidecar: the log folder of a ``redundancy-monitor watch`` process that probes
            this run's saved checkpoints instead of this process; at scheduled steps
            the callback reads its new alerts and sets ``control.should_training_stop``
            / ``should_save`` on every rank as `stop_on_alert` / `checkpoint_on_alert`
            ask (see `SidecarAlerts`).
        **monitor_kwargs: schedule, probe_config, executor, alerts, on_alert,
            stop_on_alert, checkpoint_on_alert, shadow_device, shadow_dtype, ...: see
            `RedundancyMonitor` (``shadow_device="host"``, the default on CUDA, keeps the
            snapshot in host memory: docs/big-models.md); with `sidecar` only the
            schedule and the alert actions apply.

    On resume the monitor state is read back from the checkpoint's ``trainer_state.json``
    (whether or not ``restore_callback_states_from_checkpoint`` is set, in the same or a
    new process). Weights are fenced at the start of each optimizer step, before any
    forward: under DeepSpeed ZeRO-1/2 they change inside ``backward``.

    The HF Trainer has no exception hook: when training raises (or Ctrl-C), nothing closes
    the monitor. At interpreter exit a running probe is cancelled and waited for (a few
    seconds at most), so the process ends with the training error's own exit status; to
    keep the probe's result, call ``cb.monitor.close()`` in a ``finally`` around ``train()``.

    Several callbacks on one Trainer each write a folder of their own,
    ``<output_dir>/redundancy-<8 hex digits of the configuration>/`` (and a TensorBoard run
    of that name); two given the same `jsonl_path` are refused.

    Example:
        >>> schedule = ProbeSchedule(every_n_steps=200)
        >>> cb = RedundancyMonitorTrainerCallback(probe_ids, schedule=schedule)
        >>> Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    """

    def __new__(cls, *args: Any, restore_token: str | None = None, **kwargs: Any):
        if restore_token is None:
            return super().__new__(cls)
        # The Trainer rebuilding us from a checkpoint: hand back the live callback the
        # token names (the Trainer then sets its state and puts it back in its list).
        live = _LIVE.get(restore_token)
        if live is None or live._begun or live._claimed:  # another process, or taken
            digest = restore_token.rpartition(":")[2]
            fresh = [cb for cb in reversed(list(_LIVE.values())) if not (cb._begun or cb._claimed)]
            live = next((cb for cb in fresh if cb._digest == digest), None) or next(
                iter(fresh), None
            )
        if live is None:
            raise InvalidConfigError(
                "cannot rebuild RedundancyMonitorTrainerCallback from a checkpoint alone; pass "
                "the callback to the Trainer again (its state is then restored from the "
                "checkpoint)"
            )
        live._claimed = True  # a second rebuild in this restore takes another one
        return live

    def __init__(
        self,
        probe_batch=None,
        *,
        log_dir: str | os.PathLike | None = None,
        jsonl_path: str | os.PathLike | bool | None = None,
        per_pair: bool = False,
        images: bool = True,
        sidecar: str | os.PathLike | None = None,
        restore_token: str | None = None,
        **monitor_kwargs: Any,
    ):
        if restore_token is not None:
            return  # `__new__` handed back a live, configured callback
        self.monitor: RedundancyMonitor | None
        self.sidecar: SidecarAlerts | None
        self.monitor, self.sidecar = monitor_or_sidecar(
            probe_batch, log_dir, jsonl_path, sidecar, monitor_kwargs
        )
        # What the events drive: the monitor, or the sidecar reader in its place.
        self._source: ControlSource = self.monitor or self.sidecar  # type: ignore[assignment]
        self.log_dir, self.jsonl_path = log_dir, jsonl_path
        self.per_pair, self.images = per_pair, images
        self._attached = self._restored = self._ended = self._begun = self._claimed = False
        self.tensorboard_dir: str | None = None
        self._args: Any = None
        self._state: Any = None
        self._control: Any = None
        config = {"sidecar": str(sidecar)} if self.monitor is None else self.monitor.config_key
        key = json.dumps(config, sort_keys=True, default=str)
        self._digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._token = f"rm-{os.getpid()}-{next(_TOKENS)}:{self._digest}"
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
        # Set by the Trainer's own restore (restore_callback_states_from_checkpoint). With
        # several callbacks of this class it can hand over an out-of-date entry (the
        # checkpoint's list grows by one entry per callback at every save), so the state
        # is read in on_train_begin instead, from the latest entry of this configuration.
        del value

    def _restore(self, state) -> None:
        """Load this callback's state from the checkpoint the Trainer resumed from (its
        ``trainer_state.json``). Never raises: another batch, pair set or world size
        starts a new trajectory with an alert."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            mine = [s for s in saved if self._digest in str(s.get("args", {}))]
            saved = (mine or saved or [None])[-1]  # the latest save's
        if self._restored or state.global_step == 0 or self.monitor is None:
            return
        attributes = saved.get("attributes") if isinstance(saved, dict) else None
        monitor_state = attributes.get("monitor_state") if isinstance(attributes, dict) else None
        if isinstance(monitor_state, dict) and monitor_state:
            self.monitor.load_state_dict(monitor_state, strict=False)
            self._restored = True

    @property
    def _probing(self) -> RedundancyMonitor:
        """The monitor, where this process probes (never reached with a sidecar)."""
        assert self.monitor is not None
        return self.monitor

    # ----- setup -------------------------------------------------------------------------

    def _attach_sinks(self, args, handler) -> None:
        report_to = args.report_to or []
        self._probing.sinks.extend(report_to_alert_sinks(report_to))  # MLflow, W&B: alert text
        tensorboard = None
        siblings = [] if handler is None else _monitors(handler.callbacks)
        # Several monitors: each writes a folder of its own (record file, TensorBoard run).
        own = f"redundancy-{self._digest[:8]}" if len(siblings) > 1 else None
        if handler is not None:
            self._probing.sinks.append(TrainerLogSink(self, handler, self.per_pair))
            tensorboard = next(
                (cb for cb in handler.callbacks if type(cb).__name__ == "TensorBoardCallback"),
                None,
            )
        if tensorboard is not None and own is None:
            sink = TensorBoardSink.beside(  # never into the Trainer's writer: see beside()
                _tensorboard_writer(tensorboard, args),
                per_pair=self.per_pair,
                images=self.images,
            )
            self._probing.sinks.append(sink)
            self.tensorboard_dir = sink.log_dir
        elif "tensorboard" in report_to:  # not the Trainer's writer: a run of its own
            if own is None:
                log.warning(
                    "redundancy monitor: the Trainer's TensorBoard writer was not found; "
                    "writing a TensorBoard run of its own"
                )
            root = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(
                args.output_dir, "runs"
            )
            resumed = self._probing.last_step
            sink = TensorBoardSink(
                log_dir=os.path.join(root, own or "redundancy"),
                per_pair=self.per_pair,
                images=self.images,
                purge_step=None if resumed is None else resumed + 1,
            )
            self._probing.sinks.append(sink)
            self.tensorboard_dir = sink.log_dir
        if self.jsonl_path is not False:
            from redundancy_monitor.monitoring.jsonl import JsonlSink

            folder = self.log_dir or os.path.join(args.output_dir, own or "redundancy")
            self.jsonl_file = str(self.jsonl_path or os.path.join(folder, RECORD_FILE))
            self._probing.sinks.append(JsonlSink(self.jsonl_file))

    def _fallback_batch(self, kwargs) -> None:
        loader = kwargs.get("eval_dataloader") or kwargs.get("train_dataloader")
        if not self._probing.has_probe_batch and loader is not None:
            self._probing.set_probe_batch(dataloader=loader)

    # ----- events ------------------------------------------------------------------------

    def _bind(self, args, state, control) -> None:
        self._args, self._state, self._control = args, state, control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_unsupported_setup(args, model)
        self._bind(args, state, control)
        self._begun = True
        if probes_here(state.is_world_process_zero, args.world_size, self.monitor):
            self._restore(state)
            self._fallback_batch(kwargs)
            if not self._attached and state.is_world_process_zero:
                handler = _calling_handler()
                if handler is not None:
                    _check_siblings(_monitors(handler.callbacks))
                self._attach_sinks(args, handler)
                self._attached = True
        self._source.start()
        self._apply(control, self._source.step(state.global_step, model))

    def on_step_begin(self, args, state, control, **kwargs):
        # Before the first forward of the step: under DeepSpeed the weights change inside
        # backward, after which on_pre_optimizer_step would come too late.
        self._source.before_weights_change()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._source.before_weights_change()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._bind(args, state, control)
        self._apply(control, self._source.step(state.global_step, model))
        if control.should_training_stop:  # the last step: probe and deliver now, while
            self._end(control, state, model)  # the integrations are still open

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._bind(args, state, control)
        self._end(control, state, model)
        self._source.close()

    def _end(self, control, state, model) -> None:
        if not self._ended:
            self._ended = True
            self._apply(control, self._source.train_end(state.global_step, model))

    @staticmethod
    def _apply(control, decision: MonitorControl) -> None:
        """Copy the monitor's control (the same on every rank) into the Trainer's."""
        if decision.stop:
            control.should_training_stop = True
        if decision.save:
            control.should_save = True


def _check_siblings(monitors: list[RedundancyMonitorTrainerCallback]) -> None:
    """Refuse monitors of one Trainer that would write the same files.

    Raises:
        InvalidConfigError: two given one `jsonl_path`, or two of one configuration left
            at the default paths (their folders are named after the configuration).
    """
    name = RedundancyMonitorTrainerCallback.__name__
    explicit = [None if isinstance(cb.jsonl_path, bool) else cb.jsonl_path for cb in monitors]
    check_distinct_record_files(explicit, name)
    defaults = [cb._digest for cb in monitors if cb.jsonl_path is None and cb.log_dir is None]
    if len(defaults) > len(set(defaults)):
        raise InvalidConfigError(
            f"two {name}s on one Trainer probe the same batch with the same settings and "
            "would write the same folder; drop one, or give each its own jsonl_path= and "
            "log_dir="
        )


def _monitors(callbacks) -> list[RedundancyMonitorTrainerCallback]:
    """The in-process monitors among a Trainer's callbacks."""
    return [
        cb
        for cb in callbacks
        if isinstance(cb, RedundancyMonitorTrainerCallback) and cb.monitor is not None
    ]
