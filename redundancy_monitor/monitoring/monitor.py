"""`RedundancyMonitor`: the framework-agnostic training-time monitor (docs/definitions.md §6).

It owns the probe batch, the schedule, the shadow snapshot, the executor and the ranks;
what becomes of a finished probe (sinks, alerts, history, resume state) is its
`Recorder`'s job. A training-framework adapter calls four methods from the training
thread: `start()`, `step()` after each optimizer step, `before_weights_change()` before
each optimizer step, and `train_end()`; everything else happens here. `step()` and
`train_end()` return a `MonitorControl` (stop, save, reason), the same on every rank,
that the adapter copies into its framework's flags.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from redundancy_monitor.errors import InvalidConfigError, MonitorUsageError
from redundancy_monitor.monitoring.alerts import Alert, AlertConfig
from redundancy_monitor.monitoring.control import CONTINUE, MonitorControl, RankAgreement
from redundancy_monitor.monitoring.device_memory import DeviceBudget
from redundancy_monitor.monitoring.executor import make_executor
from redundancy_monitor.monitoring.probe_config import ProbeConfig, pairs_spec
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.recorder import Recorder
from redundancy_monitor.monitoring.schedule import OverheadPacer, ProbeSchedule
from redundancy_monitor.monitoring.sinks import Sink
from redundancy_monitor.monitoring.snapshot import (
    ShadowModel,
    Snapshot,
    check_shadow_device,
    check_shadow_dtype,
    probe_snapshot,
)
from redundancy_monitor.probing.batch import batch_sha256, make_batch
from redundancy_monitor.probing.inputs import from_dataloader, from_texts, ids_and_mask
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.probing.result import ProbeResult

if TYPE_CHECKING:
    from redundancy_monitor.monitoring.ranks import RankGroup

log = logging.getLogger("redundancy_monitor")
#: Seconds `close()` waits for a running probe before cancelling it (then abandoning it).
DEFAULT_CLOSE_TIMEOUT = 5.0
#: Probe batches up to this many ids are kept in the monitor's state, so that a resumed
#: run probes the very same batch even when its loader would now give another one.
MAX_SAVED_BATCH_TOKENS = 65536


@dataclass
class DeferredProbe:
    """A probe snapshotted before the first optimizer step: it starts after that step."""

    step: int
    job: Callable[[], ProbeResult | None]
    blocked: float
    device: torch.device


@dataclass
class UngatheredProbe:
    """With several ranks: a probe whose ranks' shares are not gathered yet."""

    step: int
    failure: ProbeRecord | None  # this rank's, known before the probe ran
    snapshot: Snapshot | None


@dataclass
class Attempt:
    """This process's attempt at the run: what happened since the monitor started, or
    since a saved state was loaded (a loaded state starts a new attempt)."""

    optimizer_stepped: bool = False  # an optimizer step has run in this process
    step_announced: bool = False  # before_weights_change() was called
    start_marked: bool = False  # the start marker is written
    closed: bool = False
    #: ranks that shared the probe when the loaded state was saved
    saved_world_size: int | None = None
    #: the loaded state was saved while this step's probe ran: probe it again
    redo_step: int | None = None


@dataclass
class Skips:
    """Scheduled probes not taken because the previous probe still ran."""

    total: int = 0  # over the whole run (kept in the state)
    since_last: int = 0  # since the last probe started: that probe's record carries it
    warned: bool = False  # the first skip is a warning, later ones are counted
    by_step: dict[int, int] = field(default_factory=dict)  # probe step -> skips before it


@dataclass
class RunningProbe:
    """When the latest probe started, to tell what a skip would need (and pace probes)."""

    step: int
    started: float  # time.perf_counter()


class RedundancyMonitor:
    """Probe a model's layer redundancy during training without blocking it.

    At each scheduled optimizer step the weights are copied into a shadow model and
    `probe()` runs on the copy (in a background thread by default) on one fixed probe
    batch. Finished results are logged at the step of their snapshot, checked against
    the alert rules and kept in `history`.

    Args:
        probe_batch: token ids ``[n_seq, seq_len]``, ``(ids, mask)`` or a dict with
            ``input_ids`` (and ``attention_mask``). Or give `texts` + `tokenizer`, or
            `dataloader`; adapters fall back to the first evaluation or training batch.
        texts, tokenizer, max_length: probe texts and the tokenizer to encode them.
        dataloader: take the first batch of this loader (first `max_sequences` rows).
        max_sequences: cap on rows taken from a dataloader batch (default 8).
        schedule: when to probe, a `ProbeSchedule` (default: every 500 steps, log-spaced
            below that, and at train end).
        probe_config: what each probe measures, a `ProbeConfig` (pairs, protocols,
            thresholds, blocks, head, batch_tokens, intervals; default: adjacent pairs,
            both protocols, bootstrap intervals that the alert rules judge by).
        executor: ``"background"`` (default; a worker thread, on CUDA a side stream) or
            ``"inline"`` (synchronous, for debugging and tests).
        probe_threads: CPU threads the background probe uses (default: half of
            `torch.get_num_threads()`, at least 1), so that it does not oversubscribe
            the cores training uses; no effect on GPU kernels.
        alerts: an `AlertConfig` (defaults as documented there); None for the defaults.
        on_alert: callables that receive each `Alert`.
        stop_on_alert: True, or the rule names that should ask the trainer to stop.
        checkpoint_on_alert: True, or the rule names that should ask for a checkpoint.
        jsonl_path: the JSON Lines record file (None: no file).
        sinks: extra `Sink` objects.
        distributed: share each probe's pairs across the ranks of an initialised
            torch.distributed job (None: whenever one with several ranks is running).
            Every rank must then call the hooks; rank 0 alone writes sinks and calls
            `on_alert`; every rank reaches the same alert decisions. False: rank 0
            probes alone; when a rule may stop or checkpoint, the other ranks must call
            the hooks too, to get rank 0's decisions at scheduled steps.
        on_mismatch: a probe that measured another probe batch, model depth or pair set
            than the trajectory so far (after a resume, or a model that changed) is
            ``"refuse"``-d (recorded as a failure; default) or starts a
            ``"new_baseline"`` (a marker record, a fresh trajectory and alert state).
        close_timeout: seconds `close()` waits for a running probe before cancelling it.
        shadow_device: where the snapshot lives: ``"host"`` (host memory, pinned on
            CUDA; the probe streams block weights to the device a few at a time) or
            ``"device"`` (a full copy on the training device; fastest for small
            models). None (default): ``"host"`` when training on CUDA, else
            ``"device"``. Under FSDP2, ``"host"`` copies each rank's own shards and rank
            0 probes alone (docs/big-models.md).
        shadow_dtype: floating dtype of the snapshot (``torch.bfloat16`` or ``"bf16"``
            halves an fp32 model's copy); None keeps the training dtype.

    With a streamed (host) snapshot, or on CUDA, a probe taken before the first
    optimizer step starts after it, so the monitor never allocates device memory
    before training's optimizer has allocated its state; and a probe whose estimated
    need exceeds the device's free memory is recorded as a failure instead of started.

    Raises:
        InvalidConfigError: an unknown executor, rule name, mismatch policy or shadow
            device or dtype, a schedule or probe config of another type.
        InvalidBatchError: a probe batch that cannot be used.

    Example:
        >>> monitor = RedundancyMonitor(
        ...     probe_ids, schedule=ProbeSchedule(every_n_steps=200), jsonl_path="r.jsonl"
        ... )
        >>> for step in range(n_steps):
        ...     monitor.before_weights_change(); optimizer.step()
        ...     monitor.step(step + 1, model)
        >>> monitor.train_end(n_steps, model)
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        texts: Sequence[str] | None = None,
        tokenizer=None,
        max_length: int = 128,
        dataloader=None,
        max_sequences: int | None = 8,
        schedule: ProbeSchedule | None = None,
        probe_config: ProbeConfig | None = None,
        executor: str = "background",
        probe_threads: int | None = None,
        alerts: AlertConfig | None = None,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] = (),
        stop_on_alert: bool | Collection[str] = False,
        checkpoint_on_alert: bool | Collection[str] = False,
        jsonl_path: str | os.PathLike | None = None,
        sinks: Sequence[Sink] = (),
        distributed: bool | None = None,
        on_mismatch: str = "refuse",
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        shadow_device: str | None = None,
        shadow_dtype: torch.dtype | str | None = None,
    ):
        self.schedule = _checked(schedule, ProbeSchedule, "schedule", "ProbeSchedule(...)")
        self.probe_config = _checked(probe_config, ProbeConfig, "probe_config", "ProbeConfig(...)")
        if probe_threads is not None and probe_threads < 1:
            raise InvalidConfigError(f"probe_threads must be >= 1, got {probe_threads}")
        self._executor = make_executor(executor, probe_threads)
        sinks = list(sinks)
        if jsonl_path is not None:
            from redundancy_monitor.monitoring.jsonl import JsonlSink

            sinks.append(JsonlSink(jsonl_path))
        self.recorder = Recorder(
            sinks,
            alerts=alerts,
            on_alert=on_alert,
            stop_on_alert=stop_on_alert,
            checkpoint_on_alert=checkpoint_on_alert,
            on_mismatch=on_mismatch,
            probe_config=self.probe_config,
            clock=self._current_step,  # a method, not a lambda: ddp_spawn pickles the monitor
        )
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._batch_origin: str | None = None  # "given", "texts", "dataloader", "checkpoint"
        self._max_sequences = max_sequences
        if probe_batch is None and texts is not None:
            if tokenizer is None:
                raise InvalidConfigError("texts need a tokenizer: pass tokenizer=...")
            self._use(*from_texts(texts, tokenizer, max_length), "texts")
        else:
            self.set_probe_batch(probe_batch, dataloader=dataloader)
        self._shadow_options = (
            check_shadow_device(shadow_device),
            check_shadow_dtype(shadow_dtype),
        )
        self._shadow = ShadowModel(*self._shadow_options)
        #: Checks a probe's estimated device memory against the free memory first.
        self.device_budget = DeviceBudget()
        self._deferred: DeferredProbe | None = None
        self._attempt = Attempt()
        self.distributed = distributed
        self._ranks: RankGroup | None = None  # the ranks sharing each probe, from start()
        self._ungathered: UngatheredProbe | None = None
        # Who decides stop / checkpoint: this process, or rank 0 for every rank when it
        # probes alone (distributed=False in a multi-rank job; start() sets the group).
        self._agreement = RankAgreement(None, self.schedule)
        self._follows = False
        self._pacer = OverheadPacer(self.schedule.max_overhead)
        self._running: RunningProbe | None = None
        self._skips = Skips()
        self.last_step: int | None = None
        self.probed_steps: list[int] = []
        self.close_timeout = close_timeout
        self.config_key = self._make_config_key()

    def _make_config_key(self) -> dict[str, Any]:
        """What tells two monitors of one run apart (the probe batch and what they probe),
        fixed at construction; adapters name their checkpoint state after it."""
        sha = self.batch_sha256
        given = self._batch_origin in ("given", "texts") and sha is not None
        config = self.probe_config
        return {
            "batch": sha[:16] if given and sha else self._batch_origin or "fallback",
            "pairs": pairs_spec(config.pairs),
            "protocols": list(config.protocols),
            "blocks": config.blocks,
            "head": config.head,
        }

    def _current_step(self) -> int | None:
        return self.last_step

    # ----- what the recorder keeps -------------------------------------------------------

    @property
    def sinks(self) -> list[Sink]:
        return self.recorder.sinks

    @property
    def history(self) -> list[ProbeRecord]:
        """The probes of the current trajectory, oldest first (see `Recorder.history`)."""
        return self.recorder.history

    @property
    def earlier_trajectories(self) -> list[list[ProbeRecord]]:
        """Histories ended by a new baseline (``on_mismatch="new_baseline"``)."""
        return self.recorder.earlier_trajectories

    @property
    def alerts(self) -> list[Alert]:
        return self.recorder.alerts

    @property
    def sample_size(self) -> dict[str, Any] | None:
        """The sample-size advice of the current trajectory's first probe (its record)."""
        return self.recorder.sample_size

    @property
    def n_probes(self) -> int:
        return self.recorder.n_probes

    @property
    def n_failures(self) -> int:
        return self.recorder.n_failures

    @property
    def n_sink_errors(self) -> int:
        """How many sink calls raised (each is logged; a sink's first failure is alerted)."""
        return self.recorder.n_sink_errors

    @property
    def stop_rules(self) -> frozenset[str]:
        return self.recorder.stop_rules

    @property
    def checkpoint_rules(self) -> frozenset[str]:
        return self.recorder.checkpoint_rules

    @property
    def stop_requested(self) -> bool:
        """An alert of a `stop_on_alert` rule fired: the trainer should stop."""
        return self.recorder.stop_requested

    @property
    def checkpoint_requested(self) -> bool:
        """An alert of a `checkpoint_on_alert` rule fired; the adapter clears it once saved."""
        return self.recorder.checkpoint_requested

    @checkpoint_requested.setter
    def checkpoint_requested(self, value: bool) -> None:
        self.recorder.checkpoint_requested = value

    def trajectory(self, name: str = "gap_mean") -> list[tuple[int, float | None]]:
        """``(step, value)`` of one summary scalar over the probes so far, by step."""
        return self.recorder.trajectory(name)

    # ----- the probe batch -------------------------------------------------------------

    @property
    def has_probe_batch(self) -> bool:
        return self._ids is not None

    @property
    def batch_sha256(self) -> str | None:
        if self._ids is None or self._mask is None:  # make_batch always gives a mask
            return None
        return batch_sha256(self._ids, self._mask)

    def set_probe_batch(self, probe_batch=None, *, dataloader=None) -> None:
        """Fix the probe batch unless one is fixed already (adapters fall back to a
        dataloader batch this way)."""
        if self._ids is not None:
            return
        if probe_batch is not None:
            self._use(*ids_and_mask(probe_batch), "given")
        elif dataloader is not None:
            self._use(*from_dataloader(dataloader, self._max_sequences), "dataloader")

    def _use(self, ids: torch.Tensor, mask: torch.Tensor | None, origin: str) -> None:
        checked = make_batch(ids.detach().cpu(), None if mask is None else mask.detach().cpu())
        self._ids, self._mask = checked.input_ids, checked.attention_mask
        self._batch_origin = origin
        self.recorder.use_batch(checked.sha256)

    # ----- the hooks adapters call -----------------------------------------------------

    @property
    def n_skipped_busy(self) -> int:
        """Scheduled probes skipped because the previous probe still ran (whole run)."""
        return self._skips.total

    @property
    def follows(self) -> bool:
        """Whether this rank only follows rank 0, which probes alone (``distributed=False``
        in a multi-rank job, known from `start()`)."""
        return self._follows

    def start(self) -> None:
        """Call once when training starts (after any `load_state_dict`), on every rank.

        In a multi-rank job this is a collective (it creates the monitor's gloo groups):
        with ``distributed=False`` rank 0 probes alone and, when a rule may stop or
        checkpoint the run, tells every other rank its decisions at scheduled steps.
        """
        if self.distributed is False:
            from redundancy_monitor.monitoring.ranks import (
                RankGroup,
                is_distributed,
                rank_and_world,
            )

            rank, world = rank_and_world()
            self._follows = rank != 0
            self.recorder.writer = not self._follows
            # Only rank 0 knows the alerts: the others learn what they ask at scheduled steps.
            if world > 1 and self._acts and self._agreement.group is None and is_distributed():
                self._agreement = RankAgreement(RankGroup(), self.schedule)
        if self._ranks is None and self.distributed is not False:
            from redundancy_monitor.monitoring.ranks import RankGroup, is_distributed

            if is_distributed() and RankGroup.world() > 1:
                self._ranks = RankGroup()
                self.recorder.writer = self._ranks.rank == 0
                self.recorder.single_rank = False
                # Ranks may have found different batches (each reads its own data shard):
                # every rank probes rank 0's, so shares of one probe fit together.
                ids, mask = self._ranks.broadcast((self._ids, self._mask))
                if ids is not None:
                    self._ids, self._mask = ids, mask
                    self.recorder.use_batch(self.batch_sha256)
            elif self.distributed:
                raise InvalidConfigError(
                    "distributed=True but torch.distributed is not initialised with several "
                    "ranks; call start() after the process group is set up"
                )
        saved, self._attempt.saved_world_size = self._attempt.saved_world_size, None
        if saved is not None and saved != self.probe_world_size:
            self.recorder.note_resume_change(
                f"{self.probe_world_size} rank(s) share the probe (the checkpoint was written "
                f"with {saved})"
            )
        self._check_open("start")
        # Resumed: the first step of this attempt is known, unless the final weights may
        # still be owed a probe (train_end then marks the start at their step).
        if self.last_step is not None and not self.final_probe_owed:
            self._mark_start(self.last_step + 1)

    @property
    def _acts(self) -> bool:
        return bool(self.recorder.stop_rules or self.recorder.checkpoint_rules)

    @property
    def final_probe_owed(self) -> bool:
        """Whether the weights of the last step seen were not probed, though the schedule
        probes the final weights: after a resume from a checkpoint of a run's last step
        (saved before its train-end probe, which may never have finished), a fit that
        ends at once still owes that probe (`train_end` takes it)."""
        return (
            self.schedule.at_train_end
            and self.last_step is not None
            and self.last_step not in self.probed_steps
        )

    def _mark_start(self, step: int, redo: int | None = None) -> None:
        """Have a ``start`` marker written before this monitor's first record: readers drop
        the records earlier attempts wrote from the first step this attempt covers
        (`redo`: an earlier step this attempt probes again)."""
        if self._attempt.start_marked or self.follows:
            return
        self._attempt.start_marked = True
        resumed = self.last_step is not None
        first = self.last_step + 1 if self.last_step is not None else step
        for again in (self._attempt.redo_step, redo):
            if again is not None:  # its result is not in the state: redone
                first = min(first, again)
        self.recorder.mark_start(first, resumed)

    def _check_open(self, method: str) -> None:
        if self._attempt.closed:
            raise MonitorUsageError(
                f"{method}() was called after close(); a closed monitor has stopped its "
                "probe worker and closed its sinks. Create a new RedundancyMonitor (load "
                "this one's state_dict() into it to continue the trajectory)"
            )

    @property
    def closed(self) -> bool:
        """Whether `close()` was called (the hooks then refuse to run)."""
        return self._attempt.closed

    @property
    def probe_world_size(self) -> int:
        """How many ranks share each probe (1 when this process probes alone)."""
        return 1 if self._ranks is None else self._ranks.world_size

    def step(self, step: int, model: nn.Module | None) -> MonitorControl:
        """Call after every optimizer step with the number of steps done (0 before any).

        Collects finished probes and starts a new one if `step` is due. Steps already
        seen (gradient-accumulation micro-batches, a resumed run) are ignored.

        Returns:
            What the alerts ask of the training loop, the same on every rank (when rank
            0 probes alone, its decisions reach the other ranks at scheduled steps).

        Raises:
            MonitorUsageError: called after `close()`.
        """
        self._check_open("step")
        agree = self._agreement.due(step)
        if not self.follows:
            self._advance(step, model)
        return self._control(agree)

    def _advance(self, step: int, model: nn.Module | None) -> None:
        self._mark_start(step)
        self.poll()
        attempt = self._attempt
        attempt.optimizer_stepped |= attempt.step_announced or (
            self.last_step is not None and step > self.last_step
        )
        if self._release_deferred():
            self.poll()
        if attempt.redo_step is not None:  # saved while a probe ran: probe what it holds
            attempt.redo_step = None
            if (self.last_step is None or step >= self.last_step) and step not in self.probed_steps:
                self.last_step = step
                self._launch(step, model)
                self.poll()
                return
        if self.last_step is not None and step <= self.last_step:
            return
        self.last_step = step
        if not self.schedule.is_due(step):
            return
        if self._ungathered is not None and not self._gather(wait=False):
            # Every rank sees the same answer. A max_overhead schedule holds the probe back
            # anyway while the previous one runs: that is pacing, not a skip.
            if self._pacer.max_overhead is None:
                self._skip(step, "a rank is still probing")
            else:
                self._pacer.held(step, self.recorder.writer)
            return
        if self._paced(step):
            self._launch(step, model)
            self.poll()  # an inline probe is done already

    def before_weights_change(self) -> None:
        """Call before the optimizer step; on CUDA the step then waits for the last copy."""
        self._attempt.step_announced = True
        self._shadow.fence()

    def train_end(self, step: int, model: nn.Module | None) -> MonitorControl:
        """Probe the final weights (if scheduled and not probed yet), wait, flush.

        The seconds training waited here for the running and final probes are logged
        (INFO).

        Returns:
            What the alerts ask of the training loop, agreed by every rank.

        Raises:
            MonitorUsageError: `step` is behind the last step seen, or called after `close()`.
        """
        self._check_open("train_end")
        if self.follows:
            return self._control(agree=True)
        if self.last_step is not None and step < self.last_step:
            raise MonitorUsageError(
                f"train_end({step}) after step({self.last_step}): the final weights cannot be "
                "from an earlier step than weights already seen; pass the number of optimizer "
                "steps done (the last step() value or later)"
            )
        owed = self.final_probe_owed and step == self.last_step
        self._mark_start(step, redo=step if owed else None)
        started = time.perf_counter()
        self._attempt.optimizer_stepped = True  # training is over: the device is the probe's
        self._release_deferred()
        self.poll()
        self.drain()
        final = self.schedule.at_train_end and step not in self.probed_steps
        if final:
            self.last_step = max(step, self.last_step if self.last_step is not None else step)
            self._launch(step, model)
        self.drain()
        if self.recorder.writer:
            log.info(
                "redundancy monitor: training waited %.2f s at train end for the probes%s",
                time.perf_counter() - started,
                f" (the final weights, step {step}, probed)" if final else "",
            )
        self.recorder.flush()
        return self._control(agree=True)

    # ----- stop and checkpoint requests ------------------------------------------------

    def _control(self, agree: bool) -> MonitorControl:
        """The control to hand out now. Alone, or when the ranks share each probe (every
        rank then reaches the same decisions), it is this rank's own; when rank 0 probes
        alone, rank 0's at the steps where ranks agree, and an agreed stop between."""
        if self._agreement.group is None:
            return self._own_control()
        return self._agreement.agree(self._own_control) if agree else self._agreement.held()

    def _own_control(self) -> MonitorControl:
        recorder = self.recorder
        stop, save = recorder.stop_requested, recorder.checkpoint_requested
        if not (stop or save):
            return CONTINUE
        recorder.checkpoint_requested = False  # a checkpoint request is handed out once
        rules = recorder.stop_rules | recorder.checkpoint_rules
        why = next((a for a in reversed(recorder.alerts) if a.rule in rules), None)
        return MonitorControl(stop, save, None if why is None else f"[{why.rule}] {why.message}")

    # ----- finished probes -------------------------------------------------------------

    def poll(self) -> None:
        """Log probes that finished since the last call (never waits).

        With several ranks a probe is only logged once every rank's share is gathered,
        which happens at scheduled steps (see `step`), never here.
        """
        if self._ranks is not None:
            return
        for record in self._executor.poll():
            self._record(record)

    def drain(self) -> None:
        """Wait for the running probe, if any, and log it (a collective with several ranks)."""
        if self._ranks is not None:
            if self._ungathered is not None:
                self._gather(wait=True)
            return
        for record in self._executor.drain():
            self._record(record)

    def _record(self, record: ProbeRecord) -> None:
        """Hand a finished probe to the recorder, with the skips before it."""
        self._pacer.finished(record)
        skipped = self._skips.by_step.pop(record.step, 0)
        self.recorder.record(replace(record, skipped=skipped))

    def _gather(self, wait: bool) -> bool:
        """Merge every rank's share of the ungathered probe and log it on every rank.

        A collective at a schedule-determined step. Without `wait` it first asks whether
        every rank has finished, and gathers nothing (returns False) if one has not.
        """
        assert self._ranks is not None and self._ungathered is not None
        pending = self._ungathered
        if pending.failure is None and self._deferred is not None:
            return False  # not started yet; deferred alike on every rank, so no collective
        finished = pending.failure is not None or not self._executor.busy()
        if not wait and not self._ranks.all_true(finished):
            return False
        local = self._executor.drain()
        record = pending.failure or (local[0] if local else None)
        if record is None:
            record = ProbeRecord(
                pending.step, None, "the probe produced no outcome on this rank", 0.0, 0.0
            )
        self._ungathered = None
        memory = pending.snapshot.memory if pending.snapshot is not None else None
        self._record(self._ranks.merge(record, memory))
        return True

    def close(self, timeout: float | None = None) -> None:
        """Shut down within a bound: wait up to `timeout` seconds (default
        `close_timeout`) for a running probe and log it; otherwise cancel it, and abandon
        it if it does not stop within a second more. Then close the sinks. Never hangs."""
        if self._attempt.closed:
            return
        self._attempt.closed = True
        timeout = self.close_timeout if timeout is None else timeout
        records = self._executor.close(timeout)
        # With several ranks a share not gathered yet is dropped: close() may run on one
        # rank only (after an exception), so it must not enter a collective.
        for record in records if self._ranks is None else ():
            self._record(record)
        self._deferred = None  # a probe that never started is dropped
        if getattr(self._executor, "n_abandoned", 0):
            # The abandoned thread may still read the old copy.
            self._shadow = ShadowModel(*self._shadow_options)
        self.recorder.close()

    # ----- probing -----------------------------------------------------------------------

    def _skip(self, step: int, why: str) -> None:
        """A due probe not taken because the previous one still runs: counted (the next
        probe record carries the count); the first one is a warning that says what fits."""
        skips = self._skips
        skips.total += 1
        skips.since_last += 1
        if skips.warned or not self.recorder.writer:
            log.info("redundancy probe at step %d skipped: %s", step, why)
            return
        skips.warned = True
        log.warning(
            "redundancy probe at step %d skipped: %s. %s", step, why, self._fit_advice(step)
        )

    def _fit_advice(self, step: int) -> str:
        """What the measured probe and step times say would fit (for the first skip)."""
        later = (
            "Later skips are counted (monitor.n_skipped_busy, the `skipped` field of the next "
            "probe record, TensorBoard redundancy_probe/skipped)."
        )
        running = self._running
        if running is None or step <= running.step:
            return later
        elapsed = time.perf_counter() - running.started
        per_step = elapsed / (step - running.step)
        probe_seconds = max(elapsed, self._pacer.last_cost or 0.0)
        fits = max(1, math.ceil(1.25 * probe_seconds / per_step))  # a quarter to spare
        return (
            f"The probe started at step {running.step} has run {elapsed:.2f} s so far "
            f"(the last finished one took {self._pacer.last_cost or 0.0:.2f} s) while training "
            f"took {per_step:.3f} s per step: a probe every {fits} steps or more would fit "
            f"(ProbeSchedule(every_n_steps={fits})), or ProbeSchedule(max_overhead=0.1) "
            f"spaces probes by their measured cost. {later}"
        )

    def _paced(self, step: int) -> bool:
        """Whether a `max_overhead` schedule lets the probe at `step` start (rank 0 decides
        for every rank that shares the probe: the measured times differ between ranks)."""
        if self._pacer.max_overhead is None:
            return True
        allowed = self._pacer.allows(time.perf_counter())
        if self._ranks is not None:
            allowed = self._ranks.broadcast(allowed)
        if not allowed:
            self._pacer.held(step, self.recorder.writer)
        return allowed

    def _started(self, step: int) -> None:
        """Book-keeping of a probe that has started (or will, after the first step)."""
        self.probed_steps.append(step)
        if self._skips.since_last:
            self._skips.by_step[step] = self._skips.since_last
            self._skips.since_last = 0
        now = time.perf_counter()
        self._running = RunningProbe(step, now)
        self._pacer.started(now)

    def _launch(self, step: int, model: nn.Module | None) -> None:
        if self._executor.busy() or self._deferred is not None:
            self._skip(step, "the previous probe is still running")
            return
        started = time.perf_counter()
        snap, error = None, None
        try:
            if self._ids is None:
                raise InvalidConfigError(
                    "no probe batch: pass probe_batch=, texts= + tokenizer=, or dataloader="
                )
            if model is None:
                raise InvalidConfigError("no model to probe: pass the model to step()")
            snap = self._shadow.capture(model, self._ranks)
        except Exception as exc:  # a snapshot failure must not stop training either
            error = f"{type(exc).__name__}: {exc}"
        # Every rank learns whether every snapshot worked before any goes on, so no rank
        # waits in a probe's collective for one that is not coming.
        if self._ranks is not None and not self._ranks.all_true(error is None):
            self._started(step)  # logged when gathered, alike on every rank
            failure = ProbeRecord(step, None, error, 0.0, 0.0)  # no error: another rank's
            self._ungathered = UngatheredProbe(step, failure, None)
            return
        if error is not None or snap is None:
            self._record(ProbeRecord(step, None, error, 0.0, 0.0))
            return
        self._started(step)
        kwargs = self.probe_config.probe_kwargs()
        if self._ranks is not None:
            if not snap.rank0_only:
                kwargs["shard"] = (self._ranks.rank, self._ranks.world_size)
            self._ungathered = UngatheredProbe(step, None, snap)
        ids, mask, context = self._ids, self._mask, self._shadow.probe_context()
        budget = self.device_budget
        group = None if self._ranks is None else self._ranks.transfer_group

        def job() -> ProbeResult | None:
            return probe_snapshot(probe, snap, ids, mask, kwargs, budget, context, group)

        blocked = time.perf_counter() - started
        if not self._attempt.optimizer_stepped and (snap.streamed or snap.device.type == "cuda"):
            # started after the first optimizer step
            self._deferred = DeferredProbe(step, job, blocked, snap.device)
            return
        self._submit(step, job, blocked, snap.device)

    def _release_deferred(self) -> bool:
        """Start a probe that waited for the first optimizer step, once one has run."""
        deferred = self._deferred
        if deferred is None or not self._attempt.optimizer_stepped:
            return False
        self._deferred = None
        self._submit(deferred.step, deferred.job, deferred.blocked, deferred.device)
        return True

    def _submit(self, step: int, job: Callable, blocked: float, device: torch.device) -> None:
        """Hand a probe to the executor; a worker that cannot start is a failed probe."""
        try:
            self._executor.submit(step, job, blocked, device)
        except Exception as exc:  # e.g. no thread can be started: training goes on
            failure = ProbeRecord(step, None, f"{type(exc).__name__}: {exc}", 0.0, 0.0)
            if self._ungathered is None:
                self._record(failure)
            else:  # logged when gathered, so that every rank logs the same thing
                self._ungathered = replace(self._ungathered, failure=failure)

    # ----- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state. Never waits for a running probe (a checkpoint save must not
        idle the accelerators): a probe not finished yet is left out and saved as
        ``pending_step``; a run resumed from this state probes its first step again.
        """
        if self._ranks is None:
            self.poll()  # a finished probe is logged now; a running one is not waited for
        pending = self._pending_step()
        return {
            **self.recorder.state_dict(),
            "probe_batch": self._saved_batch(),
            "world_size": self.probe_world_size,
            "last_step": self.last_step,
            "pending_step": pending,
            "probed_steps": [s for s in self.probed_steps if s != pending],
            "n_skipped_busy": self._skips.total,
        }

    def _pending_step(self) -> int | None:
        """The step of a probe started but not logged yet (its result is not in the state)."""
        if self._ranks is not None:
            return None if self._ungathered is None else self._ungathered.step
        if self._deferred is not None:  # snapshotted, waiting for an optimizer step
            return self._deferred.step
        return self._executor.running_step

    def _saved_batch(self) -> dict[str, Any] | None:
        if self._ids is None or self._mask is None or self._ids.numel() > MAX_SAVED_BATCH_TOKENS:
            return None
        return {"input_ids": self._ids.tolist(), "attention_mask": self._mask.tolist()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore the schedule position, history, baseline, alert state and probe batch.

        A probe batch saved in the state replaces one taken from a dataloader (a shuffled
        loader gives another batch on resume), so the resumed run probes the same batch.

        Args:
            state: what `state_dict()` returned (of this version or an earlier one).
            strict: raise when the state cannot be continued. With ``strict=False`` (the
                framework adapters: a hook must never raise) another probe batch, pair
                set or number of ranks, or a state this version cannot read, starts a
                new trajectory at the first probe after the resume instead: a
                ``new_baseline`` marker record and a ``resume_change`` alert.

        Raises:
            MonitorStateError: (strict only) the state is from a newer format, or from
                another probe batch, pair set or protocols while ``on_mismatch="refuse"``.
        """
        if not self.recorder.check_version(state, strict):
            return  # lenient: a state this version cannot read is ignored
        self._restore_batch(state.get("probe_batch"), state.get("batch_sha256"))
        self.recorder.load_state_dict(state, strict)
        self.last_step = state.get("last_step")
        self.probed_steps = list(state.get("probed_steps", []))
        self._skips.total = state.get("n_skipped_busy", 0)
        # A restored state is a new attempt: mark where it starts.
        self._attempt.start_marked = False
        self._attempt.saved_world_size = state.get("world_size")
        self._attempt.redo_step = state.get("pending_step")

    def _restore_batch(self, saved: dict[str, Any] | None, sha256: str | None) -> None:
        """Probe the checkpoint's batch unless the user gave one (ids or texts)."""
        if not saved or self._batch_origin in ("given", "texts"):
            return
        try:
            mask = saved.get("attention_mask")
            checked = make_batch(
                torch.tensor(saved["input_ids"]), None if mask is None else torch.tensor(mask)
            )
        except Exception as exc:  # a damaged state: fall back to the batch found now
            log.warning("redundancy monitor: the saved probe batch is unusable: %s", exc)
            return
        if sha256 not in (None, checked.sha256):
            log.warning("redundancy monitor: the saved probe batch does not match its hash")
            return
        self._ids, self._mask = checked.input_ids, checked.attention_mask
        self._batch_origin = "checkpoint"
        self.recorder.use_batch(checked.sha256)


def _checked(value, cls: type, name: str, example: str):
    """`value`, or the default `cls()` for None; anything else is refused with a hint."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise InvalidConfigError(
            f"{name} must be a {cls.__name__}, got {type(value).__name__}; pass {name}={example}"
        )
    return value
