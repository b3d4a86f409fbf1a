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
from types import FrameType
from typing import TYPE_CHECKING, Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.extras import require
from redundancy_monitor.monitoring.adapters import (
    monitor_or_sidecar,
    probes_here,
)
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.sidecar import SidecarAlerts
from redundancy_monitor.monitoring.sinks import PROBE_INFO, Sink, probe_scalars
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink
from redundancy_monitor.monitoring.trackers import report_to_alert_sinks

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, ExportableState, TrainerCallback
else:  # a clear error naming the extra when transformers is missing
    _callbacks = require("transformers.trainer_callback", "RedundancyMonitorTrainerCallback")
    TrainerCallback, ExportableState = _callbacks.TrainerCallback, _callbacks.ExportableState
    CallbackHandler = _callbacks.CallbackHandler

log = logging.getLogger("redundancy_monitor")

# The Trainer rebuilds stateful callbacks as ``type(cb)(**args)`` when
# `restore_callback_states_from_checkpoint=True`; args must be JSON, so they carry a token
# naming the live callback whose configuration the rebuilt one takes over. In a new
# process that token is unknown: the rebuilt callback then takes over the live one of the
# same configuration (the digest after the colon), else the first one not taken yet.
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
    """The `CallbackHandler` of the Trainer that is calling us (an event, or the rebuild
    of callbacks on resume), found on the call stack: the Trainer hands callbacks no
    reference to itself or its handler."""
    frame: FrameType | None = sys._getframe(1)
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

    TensorBoard is written separately, into the Trainer's own writer, so that the tags
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
        assert state is not None and record.result is not None  # bound at train begin; a probe
        logs = probe_scalars(record.result, self.per_pair)
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
    the monitor. A running probe is in a daemon thread, so the process still exits; to
    keep its result, call ``cb.monitor.close()`` in a ``finally`` around ``train()``.

    Example:
        >>> schedule = ProbeSchedule(every_n_steps=200)
        >>> cb = RedundancyMonitorTrainerCallback(probe_ids, schedule=schedule)
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
        sidecar: str | os.PathLike | None = None,
        restore_token: str | None = None,
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
        self._attached = self._restored = self._ended = False
        self.tensorboard_dir: str | None = None
        self._args: TrainingArguments | None = None
        self._state: TrainerState | None = None
        self._control: TrainerControl | None = None
        self._decisions = None  # a RankGroup when rank 0 probes alone among several
        self._synced_step: int | None = None
        config = {"sidecar": str(sidecar)} if self.monitor is None else self.monitor.config_key
        key = json.dumps(config, sort_keys=True, default=str)
        self._digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._token = f"rm-{os.getpid()}-{next(_TOKENS)}:{self._digest}"
        _LIVE[self._token] = self

    def _adopt(self, token: str) -> None:
        original = _LIVE.get(token)
        if original is None:  # a new process: the same configuration, else the first
            handler = _calling_handler()
            live = [
                cb
                for cb in (handler.callbacks if handler is not None else list(_LIVE.values()))
                if isinstance(cb, type(self)) and _LIVE.get(cb._token) is cb
            ]
            digest = token.rpartition(":")[2]
            same = [cb for cb in live if cb._digest == digest]
            original = same[0] if same else live[0] if live else None
        if original is None:
            raise InvalidConfigError(
                "cannot rebuild RedundancyMonitorTrainerCallback from a checkpoint alone; pass "
                "the callback to the Trainer again (its state is then restored from the "
                "checkpoint)"
            )
        self.__dict__.update(original.__dict__)
        _LIVE[self._token] = self  # the original is taken: another rebuild skips it

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
        # Set by the Trainer while it resumes: never raise (another batch, pair set or
        # world size starts a new trajectory with an alert).
        if self.monitor is not None:  # a sidecar keeps its own state
            self.monitor.load_state_dict(value, strict=False)
        self._restored = True

    def _restore(self, state) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            mine = [s for s in saved if self._digest in str(s.get("args", {}))]
            saved = (mine or saved or [None])[0]
        if self._restored or state.global_step == 0 or not saved:
            return
        self.monitor_state = saved["attributes"]["monitor_state"]

    # ----- setup -------------------------------------------------------------------------

    def _attach_sinks(self, args, handler) -> None:
        assert self.monitor is not None  # called where this process probes
        report_to = args.report_to or []
        self.monitor.sinks.extend(report_to_alert_sinks(report_to))  # MLflow, W&B: alert text
        tensorboard = None
        if handler is not None:
            self.monitor.sinks.append(TrainerLogSink(self, handler, self.per_pair))
            tensorboard = next(
                (cb for cb in handler.callbacks if type(cb).__name__ == "TensorBoardCallback"),
                None,
            )
        if tensorboard is not None:
            sink = TensorBoardSink(
                writer=_tensorboard_writer(tensorboard, args),
                per_pair=self.per_pair,
                images=self.images,
            )
            self.monitor.sinks.append(sink)
            self.tensorboard_dir = sink.log_dir
        elif "tensorboard" in report_to:  # the Trainer's writer was not reachable
            log.warning(
                "redundancy monitor: the Trainer's TensorBoard writer was not found; "
                "writing a TensorBoard run of its own"
            )
            root = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(
                args.output_dir, "runs"
            )
            resumed = self.monitor.last_step
            sink = TensorBoardSink(
                log_dir=os.path.join(root, "redundancy"),
                per_pair=self.per_pair,
                images=self.images,
                purge_step=None if resumed is None else resumed + 1,
            )
            self.monitor.sinks.append(sink)
            self.tensorboard_dir = sink.log_dir
        if self.jsonl_path is not False:
            from redundancy_monitor.monitoring.jsonl import JsonlSink

            folder = self.log_dir or os.path.join(args.output_dir, "redundancy")
            self.jsonl_file = str(self.jsonl_path or os.path.join(folder, "redundancy.jsonl"))
            self.monitor.sinks.append(JsonlSink(self.jsonl_file))

    def _fallback_batch(self, kwargs) -> None:
        assert self.monitor is not None  # called where this process probes
        loader = kwargs.get("eval_dataloader") or kwargs.get("train_dataloader")
        if not self.monitor.has_probe_batch and loader is not None:
            self.monitor.set_probe_batch(dataloader=loader)

    # ----- events ------------------------------------------------------------------------

    def _probes_here(self, args, state) -> bool:
        return probes_here(state.is_world_process_zero, args.world_size, self.monitor)

    def _bind(self, args, state, control) -> None:
        self._args, self._state, self._control = args, state, control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_unsupported_setup(args, model)
        self._bind(args, state, control)
        if self.sidecar is not None:
            self.sidecar.start()
            self._read_sidecar(state, control)
            return
        solo = args.world_size > 1 and self.monitor.distributed is False
        if solo and self._decisions is None:
            from redundancy_monitor.monitoring.ranks import RankGroup

            self._decisions = RankGroup()  # a collective: every rank is here
        if self._probes_here(args, state):
            self._restore(state)
            self._fallback_batch(kwargs)
            if not self._attached and state.is_world_process_zero:
                self._attach_sinks(args, _calling_handler())
                self._attached = True
            self.monitor.start()
            self.monitor.step(state.global_step, model)
        self._apply_requests(args, state, control)

    def on_step_begin(self, args, state, control, **kwargs):
        # Before the first forward of the step: under DeepSpeed the weights change inside
        # backward, after which on_pre_optimizer_step would come too late.
        if self._probes_here(args, state):
            self.monitor.before_weights_change()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._probes_here(args, state):
            self.monitor.before_weights_change()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._bind(args, state, control)
        if self.sidecar is not None:
            self._read_sidecar(state, control)
            return
        if self._probes_here(args, state):
            self.monitor.step(state.global_step, model)
        self._apply_requests(args, state, control)
        if control.should_training_stop:  # the last step: probe and deliver now, while
            self._end(args, state, model)  # the integrations are still open

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._bind(args, state, control)
        self._end(args, state, model)
        if self._probes_here(args, state):
            self.monitor.close()

    def _end(self, args, state, model) -> None:
        if not self._ended and self._probes_here(args, state):
            self._ended = True
            assert self.monitor is not None  # probes_here: a monitor
            self.monitor.train_end(state.global_step, model)

    def _read_sidecar(self, state, control) -> None:
        # Every process reads at the same scheduled steps and gets rank 0's decision.
        assert self.sidecar is not None  # called with a sidecar only
        if self.sidecar.step(state.global_step):
            if self.sidecar.stop_requested:
                control.should_training_stop = True
            if self.sidecar.checkpoint_requested:
                self.sidecar.checkpoint_requested = False
                control.should_save = True

    def _apply_requests(self, args, state, control) -> None:
        assert self.monitor is not None  # called with a monitor only
        stop, save = self.monitor.stop_requested, self.monitor.checkpoint_requested
        if self._decisions is not None:
            # Rank 0 probes alone, so only it knows: it tells the others at scheduled
            # steps (the same on every rank). Otherwise every rank reaches the same
            # decisions from the same gathered result.
            if not self._sync_due(state.global_step):
                return
            stop, save = self._decisions.any_true([stop, save])
        if stop:
            control.should_training_stop = True
        if save:
            self.monitor.checkpoint_requested = False
            control.should_save = True

    def _sync_due(self, step: int) -> bool:
        assert self.monitor is not None  # called with a monitor only
        if step == self._synced_step or not self.monitor.schedule.is_due(step):
            return False
        self._synced_step = step
        return True
