"""`RedundancyMonitor`: the framework-agnostic training-time monitor (docs/definitions.md §6).

It owns the schedule, the shadow snapshot, the executor, the sinks, the alert rules and
the history. A training-framework adapter calls four methods from the training thread:
`start()`, `step()` after each optimizer step, `before_weights_change()` before each
optimizer step, and `train_end()`; everything else happens here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from redundancy_monitor import __version__
from redundancy_monitor.errors import InvalidConfigError, MonitorStateError, MonitorUsageError
from redundancy_monitor.monitoring.alerts import RULES, Alert, AlertConfig, AlertEngine
from redundancy_monitor.monitoring.device_memory import DeviceBudget
from redundancy_monitor.monitoring.executor import ProbeOutcome, make_executor
from redundancy_monitor.monitoring.guard import (
    TrajectoryGuard,
    check_policy,
    protocols_identity,
    same_pair_set,
)
from redundancy_monitor.monitoring.schedule import DEFAULT_EVERY_N_STEPS, ProbeSchedule
from redundancy_monitor.monitoring.sinks import ProbeRecord, Sink, SinkHealth
from redundancy_monitor.monitoring.snapshot import (
    ShadowModel,
    check_shadow_device,
    check_shadow_dtype,
    probe_snapshot,
)
from redundancy_monitor.probing.batch import batch_sha256, make_batch
from redundancy_monitor.probing.engine import DEFAULT_BATCH_TOKENS, EngineOptions
from redundancy_monitor.probing.inputs import from_dataloader, from_texts, ids_and_mask
from redundancy_monitor.probing.intervals import IntervalConfig, sample_size_advice
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.probing.result import ProbeResult, Thresholds
from redundancy_monitor.probing.variants import check_protocols, materialise_pairs, parse_pairs

log = logging.getLogger("redundancy_monitor")
STATE_VERSION = 1
#: Seconds `close()` waits for a running probe before cancelling it (then abandoning it).
DEFAULT_CLOSE_TIMEOUT = 5.0
#: Probe batches up to this many ids are kept in the monitor's state, so that a resumed
#: run probes the very same batch even when its loader would now give another one.
MAX_SAVED_BATCH_TOKENS = 65536


@dataclasses.dataclass(frozen=True)
class _BatchSource:
    """Where the probe batch comes from, as given to the monitor."""

    probe_batch: Any = None
    attention_mask: Any = None
    texts: Sequence[str] | None = None
    tokenizer: Any = None
    max_length: int = 128
    dataloader: Any = None
    max_sequences: int | None = 8


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
        attention_mask: mask for `probe_batch` when it is a plain tensor.
        texts, tokenizer, max_length: probe texts and the tokenizer to encode them.
        dataloader: take the first batch of this loader (first `max_sequences` rows).
        max_sequences: cap on rows taken from a dataloader batch (default 8).
        every_n_steps, log_spaced, steps, at_train_end: the `ProbeSchedule` (or pass
            `schedule`).
        pairs, protocols, thresholds, blocks, head, batch_tokens: passed to `probe()`;
            `blocks` and `head` must be dotted paths (the probe runs on a copy).
        intervals: passed to `probe()`: bootstrap intervals (default on) that the alert
            rules judge by; an `IntervalConfig` also sets the `target_halfwidth` of the
            sample-size advice logged (and recorded) at the first probe.
        executor: ``"background"`` (default; a worker thread, on CUDA a side stream) or
            ``"inline"`` (synchronous, for debugging and tests).
        alerts: an `AlertConfig` (defaults as documented there); None for the defaults.
        on_alert: callables that receive each `Alert`.
        stop_on_alert: True, or the rule names that should ask the trainer to stop.
        checkpoint_on_alert: True, or the rule names that should ask for a checkpoint.
        jsonl_path: the JSON Lines record file (None: no file).
        sinks: extra `Sink` objects.
        distributed: share each probe's pairs across the ranks of an initialised
            torch.distributed job (None: whenever one with several ranks is running).
            Every rank must then call the hooks; rank 0 alone writes sinks and calls
            `on_alert`; every rank reaches the same alert decisions.
        probe_threads: CPU threads the background probe uses (default: half of
            `torch.get_num_threads()`, at least 1), so that it does not oversubscribe
            the cores training uses; no effect on GPU kernels.
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
        InvalidConfigError: an unknown executor, rule name or mismatch policy, a
            non-string blocks/head, a `batch_tokens` that is not a positive int.
        InvalidBatchError: a probe batch that cannot be used.
        InvalidPairsError, InvalidProtocolError: a malformed pair set or protocol name.

    Example:
        >>> monitor = RedundancyMonitor(probe_ids, every_n_steps=200, jsonl_path="r.jsonl")
        >>> for step in range(n_steps):
        ...     monitor.before_weights_change(); optimizer.step()
        ...     monitor.step(step + 1, model)
        >>> monitor.train_end(n_steps, model)
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        attention_mask=None,
        texts: Sequence[str] | None = None,
        tokenizer=None,
        max_length: int = 128,
        dataloader=None,
        max_sequences: int | None = 8,
        schedule: ProbeSchedule | None = None,
        every_n_steps: int | None = DEFAULT_EVERY_N_STEPS,
        log_spaced: bool = True,
        steps: Sequence[int] = (),
        at_train_end: bool = True,
        pairs="adjacent",
        protocols: Sequence[str] = ("replacement", "interchange"),
        thresholds: Thresholds | None = None,
        blocks: str | None = None,
        head: str | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        intervals: bool | IntervalConfig = True,
        executor: str = "background",
        alerts: AlertConfig | None = None,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] = (),
        stop_on_alert: bool | Collection[str] = False,
        checkpoint_on_alert: bool | Collection[str] = False,
        jsonl_path: str | os.PathLike | None = None,
        sinks: Sequence[Sink] = (),
        distributed: bool | None = None,
        probe_threads: int | None = None,
        on_mismatch: str = "refuse",
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        shadow_device: str | None = None,
        shadow_dtype: torch.dtype | str | None = None,
    ):
        for name, value in (("blocks", blocks), ("head", head)):
            if value is not None and not isinstance(value, str):
                raise InvalidConfigError(
                    f"{name} must be a dotted path string: the probe runs on a copy of the "
                    f"model, so a module object of the original cannot be used; got "
                    f"{type(value).__name__}"
                )
        self.on_mismatch = check_policy(on_mismatch)
        self.schedule = schedule or ProbeSchedule(
            every_n_steps, log_spaced, tuple(steps), at_train_end
        )
        pairs = materialise_pairs(pairs)  # a generator is read once, here
        parse_pairs(pairs, 2 if isinstance(pairs, str) else 1 << 20)  # fail here, not per probe
        if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool):
            raise InvalidConfigError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        EngineOptions(batch_tokens=batch_tokens)  # range checked here, not at every probe
        self.probe_kwargs = dict(
            pairs=pairs,
            protocols=check_protocols(protocols),
            thresholds=thresholds,
            blocks=blocks,
            head=head,
            batch_tokens=batch_tokens,
            intervals=IntervalConfig.of(intervals) or False,
        )
        self.executor_kind = executor
        if probe_threads is not None and probe_threads < 1:
            raise InvalidConfigError(f"probe_threads must be >= 1, got {probe_threads}")
        self._executor = make_executor(executor, probe_threads)
        self.alert_engine = AlertEngine(alerts or AlertConfig())
        self.on_alert = [on_alert] if callable(on_alert) else list(on_alert)
        self.stop_rules = _rule_set(stop_on_alert, "stop_on_alert")
        self.checkpoint_rules = _rule_set(checkpoint_on_alert, "checkpoint_on_alert")
        self.sinks: list[Sink] = list(sinks)
        self.jsonl_path = jsonl_path
        if jsonl_path is not None:
            from redundancy_monitor.monitoring.jsonl import JsonlSink

            self.sinks.append(JsonlSink(jsonl_path))
        self._ids = self._mask = None
        self._batch_origin: str | None = None  # "given", "texts", "dataloader", "checkpoint"
        self._expected_sha: str | None = None
        self._start_marked = False
        self._closed = False
        self._lenient_resume = False  # set by load_state_dict(strict=False)
        self._resume_reasons: list[str] = []  # why the next probe starts a new trajectory
        self._saved_world_size: int | None = None
        # The checkpoint was saved while this step's probe ran: probe again on resume.
        self._saved_pending: int | None = None
        self._source = _BatchSource(
            probe_batch, attention_mask, texts, tokenizer, max_length, dataloader, max_sequences
        )
        if probe_batch is not None or texts is not None or dataloader is not None:
            self._resolve_batch()
        self._shadow_options = (
            check_shadow_device(shadow_device),
            check_shadow_dtype(shadow_dtype),
        )
        self._shadow = ShadowModel(*self._shadow_options)
        #: Checks a probe's estimated device memory against the free memory first.
        self.device_budget = DeviceBudget()
        self._deferred = None  # (step, job, blocked, device): waits for an optimizer step
        self._optimizer_stepped = False  # an optimizer step has run in this process
        self._step_announced = False  # before_weights_change() was called
        self.distributed = distributed
        self._ranks = None  # a RankGroup once start() finds a multi-rank job
        # (step, local failure, snapshot) of the probe whose shares are not gathered yet
        self._pending: tuple | None = None
        self.history: list[dict[str, Any]] = []
        self.alerts: list[Alert] = []
        self.last_step: int | None = None
        self.probed_steps: list[int] = []
        self.n_probes = self.n_failures = self.n_skipped_busy = 0
        self.stop_requested = False
        self.checkpoint_requested = False
        self.close_timeout = close_timeout
        self.trajectory_guard = TrajectoryGuard()
        self.earlier_trajectories: list[list[dict[str, Any]]] = []
        self.sink_health = SinkHealth()
        self.sample_size: dict[str, Any] | None = None  # advice from the first probe
        self.config_key = self._make_config_key()

    def _make_config_key(self) -> dict[str, Any]:
        """What tells two monitors of one run apart (the probe batch and what they probe),
        fixed at construction; adapters name their checkpoint state after it."""
        given = self._batch_origin in ("given", "texts")
        return {
            "batch": self.batch_sha256[:16] if given else self._batch_origin or "fallback",
            "pairs": _pairs_spec(self.probe_kwargs["pairs"]),
            "protocols": list(self.probe_kwargs["protocols"]),
            "blocks": self.probe_kwargs["blocks"],
            "head": self.probe_kwargs["head"],
        }

    # ----- the probe batch -------------------------------------------------------------

    @property
    def has_probe_batch(self) -> bool:
        return self._ids is not None

    @property
    def batch_sha256(self) -> str | None:
        return None if self._ids is None else batch_sha256(self._ids, self._mask)

    def set_probe_batch(self, probe_batch=None, *, attention_mask=None, dataloader=None) -> None:
        """Fix the probe batch unless one is fixed already (adapters fall back to a
        dataloader batch this way)."""
        if self._ids is not None:
            return
        self._source = dataclasses.replace(
            self._source,
            probe_batch=probe_batch,
            attention_mask=attention_mask,
            dataloader=dataloader,
        )
        self._resolve_batch()

    def _resolve_batch(self) -> None:
        source = self._source
        if source.probe_batch is not None:
            ids, mask = ids_and_mask(source.probe_batch)
            if source.attention_mask is not None:
                mask = torch.as_tensor(source.attention_mask)
        elif source.texts is not None:
            if source.tokenizer is None:
                raise InvalidConfigError("texts need a tokenizer: pass tokenizer=...")
            ids, mask = from_texts(source.texts, source.tokenizer, source.max_length)
        elif source.dataloader is not None:
            ids, mask = from_dataloader(source.dataloader, source.max_sequences)
        else:
            return
        checked = make_batch(ids.detach().cpu(), None if mask is None else mask.detach().cpu())
        self._ids, self._mask = checked.input_ids, checked.attention_mask
        self._batch_origin = (
            "given"
            if source.probe_batch is not None
            else "texts"
            if source.texts is not None
            else "dataloader"
        )
        self._check_sha()

    def _check_sha(self) -> None:
        if self._ids is None or self._expected_sha in (None, self.batch_sha256):
            return
        if self._lenient_resume:
            self._resume_reasons.append(
                f"another probe batch (sha256 {self.batch_sha256[:12]}..., the checkpoint's "
                f"is {self._expected_sha[:12]}...)"
            )
            self._expected_sha = None  # noted once
            return
        if self.on_mismatch == "new_baseline":
            return  # the first probe with the new batch starts a new trajectory
        raise MonitorStateError(
            "the restored monitor state was recorded with another probe batch "
            f"(sha256 {self._expected_sha[:12]}..., now {self.batch_sha256[:12]}...); "
            "trajectories would not be comparable. Pass the same probe batch when "
            "resuming, pass on_mismatch='new_baseline' to start a new trajectory, or "
            "start a new monitor without loading the state."
        )

    # ----- the hooks adapters call -----------------------------------------------------

    def start(self) -> None:
        """Call once when training starts (after any `load_state_dict`).

        In a multi-rank job this is a collective (it creates the monitor's gloo group).
        """
        if self._ranks is None and self.distributed is not False:
            from redundancy_monitor.monitoring.ranks import RankGroup, is_distributed

            if is_distributed() and RankGroup.world() > 1:
                self._ranks = RankGroup()
                # Ranks may have found different batches (each reads its own data shard):
                # every rank probes rank 0's, so shares of one probe fit together.
                ids, mask = self._ranks.broadcast((self._ids, self._mask))
                if ids is not None:
                    self._ids, self._mask = ids, mask
                    self._check_sha()
            elif self.distributed:
                raise InvalidConfigError(
                    "distributed=True but torch.distributed is not initialised with several "
                    "ranks; call start() after the process group is set up"
                )
        saved, self._saved_world_size = self._saved_world_size, None
        if saved is not None and saved != self.probe_world_size:
            self._resume_reasons.append(
                f"{self.probe_world_size} rank(s) share the probe (the checkpoint was written "
                f"with {saved})"
            )
        self._check_open("start")
        if self.last_step is not None:  # resumed: the first step of this attempt is known
            self._mark_start(self.last_step + 1)

    def _mark_start(self, step: int) -> None:
        """Write a ``start`` marker before this monitor's first record: readers drop the
        records earlier attempts wrote from the first step this attempt covers."""
        if self._start_marked:
            return
        self._start_marked = True
        resumed = self.last_step is not None
        first = self.last_step + 1 if resumed else step
        if self._saved_pending is not None:  # its result is not in the state: redone
            first = min(first, self._saved_pending)
        marker = {
            "type": "start",
            "step": first,
            "resumed": resumed,
            "reason": f"monitor started at step {first}; "
            f"{'resumed from saved state' if resumed else 'no saved state'}; records of "
            f"earlier attempts from step {first} on are superseded",
        }
        self._emit("write_marker", marker)

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise MonitorUsageError(
                f"{method}() was called after close(); a closed monitor has stopped its "
                "probe worker and closed its sinks. Create a new RedundancyMonitor (load "
                "this one's state_dict() into it to continue the trajectory)"
            )

    @property
    def closed(self) -> bool:
        """Whether `close()` was called (the hooks then refuse to run)."""
        return self._closed

    @property
    def probe_world_size(self) -> int:
        """How many ranks share each probe (1 when this process probes alone)."""
        return 1 if self._ranks is None else self._ranks.world_size

    def step(self, step: int, model: nn.Module) -> None:
        """Call after every optimizer step with the number of steps done (0 before any).

        Collects finished probes and starts a new one if `step` is due. Steps already
        seen (gradient-accumulation micro-batches, a resumed run) are ignored.

        Raises:
            MonitorUsageError: called after `close()`.
        """
        self._check_open("step")
        self._mark_start(step)
        self.poll()
        self._optimizer_stepped |= self._step_announced or (
            self.last_step is not None and step > self.last_step
        )
        if self._release_deferred():
            self.poll()
        if self._saved_pending is not None:  # saved while a probe ran: probe what it holds
            self._saved_pending = None
            if (self.last_step is None or step >= self.last_step) and step not in self.probed_steps:
                self.last_step = step
                self._launch(step, model)
                self.poll()
                return
        if self.last_step is not None and step <= self.last_step:
            return
        self.last_step = step
        if self.schedule.is_due(step):
            if self._pending is not None and not self._gather(wait=False):
                self.n_skipped_busy += 1  # every rank sees the same reduced answer
                log.info("redundancy probe at step %d skipped: a rank is still probing", step)
                return
            self._launch(step, model)
            self.poll()  # an inline probe is done already

    def before_weights_change(self) -> None:
        """Call before the optimizer step; on CUDA the step then waits for the last copy."""
        self._step_announced = True
        self._shadow.fence()

    def train_end(self, step: int, model: nn.Module) -> None:
        """Probe the final weights (if scheduled and not probed yet), wait, flush.

        Raises:
            MonitorUsageError: `step` is behind the last step seen, or called after `close()`.
        """
        self._check_open("train_end")
        if self.last_step is not None and step < self.last_step:
            raise MonitorUsageError(
                f"train_end({step}) after step({self.last_step}): the final weights cannot be "
                "from an earlier step than weights already seen; pass the number of optimizer "
                "steps done (the last step() value or later)"
            )
        self._mark_start(step)
        self._optimizer_stepped = True  # training is over: the device is the probe's
        self._release_deferred()
        self.poll()
        self.drain()
        if self.schedule.at_train_end and step not in self.probed_steps:
            self.last_step = max(step, self.last_step if self.last_step is not None else step)
            self._launch(step, model)
        self.drain()
        self._emit("flush")

    def poll(self) -> None:
        """Log probes that finished since the last call (never waits).

        With several ranks a probe is only logged once every rank's share is gathered,
        which happens at scheduled steps (see `step`), never here.
        """
        if self._ranks is not None:
            return
        for outcome in self._executor.poll():
            self._handle(outcome)

    def drain(self) -> None:
        """Wait for the running probe, if any, and log it (a collective with several ranks)."""
        if self._ranks is not None:
            if self._pending is not None:
                self._gather(wait=True)
            return
        for outcome in self._executor.drain():
            self._handle(outcome)

    def _gather(self, wait: bool) -> bool:
        """Merge every rank's share of the pending probe and log it on every rank.

        A collective at a schedule-determined step. Without `wait` it first asks whether
        every rank has finished, and gathers nothing (returns False) if one has not.
        """
        step, failure, snap = self._pending
        if failure is None and self._deferred is not None:
            return False  # not started yet; deferred alike on every rank, so no collective
        if not wait and not self._ranks.all_true(failure is not None or not self._executor.busy()):
            return False
        local = self._executor.drain()
        outcome = failure or (local[0] if local else None)
        if outcome is None:
            outcome = ProbeOutcome(
                step, None, "the probe produced no outcome on this rank", 0.0, 0.0
            )
        self._pending = None
        self._handle(self._ranks.merge(outcome, snap.memory if snap is not None else None))
        return True

    @property
    def n_sink_errors(self) -> int:
        """How many sink calls raised (each is logged; a sink's first failure is alerted)."""
        return self.sink_health.n_errors

    def close(self, timeout: float | None = None) -> None:
        """Shut down within a bound: wait up to `timeout` seconds (default
        `close_timeout`) for a running probe and log it; otherwise cancel it, and abandon
        it if it does not stop within a second more. Then close the sinks. Never hangs."""
        if self._closed:
            return
        self._closed = True
        timeout = self.close_timeout if timeout is None else timeout
        outcomes = self._executor.close(timeout)
        # With several ranks a share not gathered yet is dropped: close() may run on one
        # rank only (after an exception), so it must not enter a collective.
        for outcome in outcomes if self._ranks is None else ():
            self._handle(outcome)
        self._deferred = None  # a probe that never started is dropped
        if getattr(self._executor, "n_abandoned", 0):
            # The abandoned thread may still read the old copy.
            self._shadow = ShadowModel(*self._shadow_options)
        self._emit("close")

    # ----- probing -----------------------------------------------------------------------

    def _launch(self, step: int, model: nn.Module) -> None:
        if self._executor.busy() or self._deferred is not None:
            self.n_skipped_busy += 1
            log.info(
                "redundancy probe at step %d skipped: the previous probe is still running", step
            )
            return
        started = time.perf_counter()
        snap, error = None, None
        try:
            if self._ids is None:
                raise InvalidConfigError(
                    "no probe batch: pass probe_batch=, texts= + tokenizer=, or dataloader="
                )
            snap = self._shadow.capture(model, self._ranks)
        except Exception as exc:  # a snapshot failure must not stop training either
            error = f"{type(exc).__name__}: {exc}"
        # Every rank learns whether every snapshot worked before any goes on, so no rank
        # waits in a probe's collective for one that is not coming.
        if self._ranks is not None and not self._ranks.all_true(error is None):
            self.probed_steps.append(step)  # logged when gathered, alike on every rank
            self._pending = (step, ProbeOutcome(step, None, error, 0.0, 0.0), None)
            return
        if error is not None:
            self._handle(ProbeOutcome(step, None, error, 0.0, 0.0))
            return
        self.probed_steps.append(step)
        kwargs = dict(self.probe_kwargs)
        if self._ranks is not None:
            if not snap.rank0_only:
                kwargs["shard"] = (self._ranks.rank, self._ranks.world_size)
            self._pending = (step, None, snap)
        ids, mask, context = self._ids, self._mask, self._shadow.probe_context()
        budget = self.device_budget
        group = None if self._ranks is None else self._ranks.transfer_group

        def job() -> ProbeResult | None:
            return probe_snapshot(probe, snap, ids, mask, kwargs, budget, context, group)

        blocked = time.perf_counter() - started
        if not self._optimizer_stepped and (snap.streamed or snap.device.type == "cuda"):
            # started after the first optimizer step
            self._deferred = (step, job, blocked, snap.device)
            return
        self._executor.submit(step, job, blocked, snap.device)

    def _release_deferred(self) -> bool:
        """Start a probe that waited for the first optimizer step, once one has run."""
        if self._deferred is None or not self._optimizer_stepped:
            return False
        step, job, blocked, device = self._deferred
        self._deferred = None
        self._executor.submit(step, job, blocked, device)
        return True

    def record_outcome(self, outcome: ProbeOutcome) -> None:
        """Log a probe computed outside the monitor (offline replay of saved checkpoints)
        exactly as if it had run here: sinks, alert rules, history and resume state."""
        self._check_open("record_outcome")
        self._mark_start(outcome.step)
        self.last_step = max(outcome.step, self.last_step if self.last_step is not None else -1)
        self.probed_steps.append(outcome.step)
        self._handle(outcome)

    def _handle(self, outcome: ProbeOutcome) -> None:
        try:
            if outcome.error is not None:
                self._failed(outcome.step, outcome.error)
            elif self._resume_reasons:
                reason, self._resume_reasons = "; ".join(self._resume_reasons), []
                self._new_trajectory(outcome, f"resumed with {reason}", alert=True)
            elif (change := self.trajectory_guard.check(outcome.result)) is not None:
                self._mismatched(outcome, change)
            else:
                self._record(outcome)
        except Exception:  # a broken sink or callback is logged, never raised into training
            log.exception("redundancy monitor: handling the probe at step %d failed", outcome.step)

    def _failed(self, step: int, error: str) -> None:
        self.n_failures += 1
        if self.is_writer:
            log.error("redundancy probe at step %d failed: %s", step, error)
        self._emit("write_failure", step, error)
        self._deliver(self.alert_engine.observe_failure(step, error))

    def _mismatched(self, outcome: ProbeOutcome, change: str) -> None:
        """A probe not comparable with the trajectory: refuse it, or start a new one."""
        if self.on_mismatch == "refuse":
            self._failed(
                outcome.step,
                f"MonitorStateError: the probe at step {outcome.step} measured {change}; it "
                "is not comparable with the earlier probes and was not recorded. Probe the "
                "same model depth with the same batch and pairs, or pass "
                "on_mismatch='new_baseline' to start a new trajectory from such a probe.",
            )
            return
        self._new_trajectory(outcome, change)

    def _new_trajectory(self, outcome: ProbeOutcome, reason: str, alert: bool = False) -> None:
        """Start a new trajectory (and alert state) from this probe, with a marker record."""
        old = self.trajectory_guard.restart(outcome.result)
        log.warning("redundancy monitor: new baseline at step %d: %s", outcome.step, reason)
        if self.history:
            self.earlier_trajectories.append(self.history)
        self.history = []
        self.alert_engine = AlertEngine(self.alert_engine.config)
        marker = {
            "type": "new_baseline",
            "step": outcome.step,
            "reason": reason,
            "previous": old,
            "current": self.trajectory_guard.identity,
        }
        self._emit("write_marker", marker)
        if alert:  # news, not a verdict on the model: it never stops or checkpoints the run
            self._deliver(self.alert_engine.observe_resume_change(outcome.step, reason), act=False)
        self._record(outcome)

    def _record(self, outcome: ProbeOutcome) -> None:
        result = outcome.result
        self.n_probes += 1
        self.history.append(
            {
                "step": outcome.step,
                "regime": result.summary.regime,
                "scalars": result.summary.scalars(),
                "probe_seconds": outcome.probe_seconds,
                "blocked_seconds": outcome.blocked_seconds,
            }
        )
        record = ProbeRecord(outcome.step, result, outcome.probe_seconds, outcome.blocked_seconds)
        self._emit("write_probe", record)
        if len(self.history) == 1:
            self._advise_sample_size(outcome.step, result)
        self._deliver(self.alert_engine.observe(outcome.step, result))

    def _advise_sample_size(self, step: int, result: ProbeResult) -> None:
        """At the first probe of a trajectory: how precise the alerts' gap metric is with
        this probe batch, and how many sequences would reach the target half-width."""
        config = self.probe_kwargs["intervals"]
        if not config:
            return
        advice = sample_size_advice(
            result, self.alert_engine.config.gap_metric, config.target_halfwidth
        )
        self.sample_size = {"type": "sample_size", "step": step, **advice.to_dict()}
        if self.is_writer:
            log.info("redundancy monitor: probe batch precision: %s", advice.sentence())
        self._emit("write_marker", self.sample_size)

    def _deliver(self, alerts: list[Alert], act: bool = True) -> None:
        for alert in alerts:
            self.alerts.append(alert)
            if self.is_writer:
                log.warning("redundancy alert [%s] %s", alert.rule, alert.message)
            self._emit("write_alert", alert)
            for callback in self.on_alert if self.is_writer else ():
                try:
                    callback(alert)
                except Exception:
                    log.exception("redundancy monitor: on_alert callback %r failed", callback)
            if act:
                self.stop_requested |= alert.rule in self.stop_rules
                self.checkpoint_requested |= alert.rule in self.checkpoint_rules

    @property
    def is_writer(self) -> bool:
        """Whether this process writes records and calls `on_alert` (rank 0, or alone)."""
        return self._ranks is None or self._ranks.rank == 0

    def _emit(self, method: str, *args) -> None:
        if not self.is_writer:
            return
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                self._sink_failed(sink, method, exc)
            else:
                self.sink_health.ok(sink, method)

    def _sink_failed(self, sink: Sink, method: str, exc: Exception) -> None:
        """Count and log a sink error; alert when a working sink starts failing."""
        name = f"{type(sink).__name__}.{method}"
        if not self.sink_health.failed(sink, method):
            log.warning("redundancy monitor: sink %s failed again: %s", name, exc)
            return
        log.error("redundancy monitor: sink %s failed", name, exc_info=exc)
        step = self.last_step if self.last_step is not None else 0
        # Only rank 0 writes, so only it sees this: with several ranks it must not stop or
        # checkpoint the run, which every rank has to do together.
        alerts = self.alert_engine.observe_sink_failure(step, name, exc)
        self._deliver(alerts, act=self._ranks is None)

    # ----- trajectories and resume -------------------------------------------------------

    def trajectory(self, name: str = "gap_mean") -> list[tuple[int, float | None]]:
        """``(step, value)`` of one summary scalar over the probes so far, by step."""
        return sorted((h["step"], h["scalars"].get(name)) for h in self.history)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state. Never waits for a running probe (a checkpoint save must not
        idle the accelerators): a probe not finished yet is left out and saved as
        ``pending_step``; a run resumed from this state probes its first step again.
        """
        if self._ranks is None:
            self.poll()  # a finished probe is logged now; a running one is not waited for
        pending = self._pending_step()
        return {
            "state_version": STATE_VERSION,
            "library_version": __version__,
            "batch_sha256": self.batch_sha256 or self._expected_sha,
            "probe_batch": self._saved_batch(),
            "world_size": self.probe_world_size,
            "last_step": self.last_step,
            "pending_step": pending,
            "probed_steps": [s for s in self.probed_steps if s != pending],
            "n_probes": self.n_probes,
            "n_failures": self.n_failures,
            "n_skipped_busy": self.n_skipped_busy,
            "n_sink_errors": self.n_sink_errors,
            "pairs_spec": _pairs_spec(self.probe_kwargs["pairs"]),
            "trajectory": self.trajectory_guard.identity,
            "earlier_trajectories": [[dict(h) for h in t] for t in self.earlier_trajectories],
            "history": [dict(h) for h in self.history],
            "alerts": [a.to_dict() for a in self.alerts],
            "alert_engine": self.alert_engine.state_dict(),
        }

    def _pending_step(self) -> int | None:
        """The step of a probe started but not logged yet (its result is not in the state)."""
        if self._ranks is not None:
            return None if self._pending is None else self._pending[0]
        if self._deferred is not None:  # snapshotted, waiting for an optimizer step
            return self._deferred[0]
        return self._executor.running_step

    def _saved_batch(self) -> dict[str, Any] | None:
        if self._ids is None or self._ids.numel() > MAX_SAVED_BATCH_TOKENS:
            return None
        return {"input_ids": self._ids.tolist(), "attention_mask": self._mask.tolist()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore the schedule position, history, baseline, alert state and probe batch.

        A probe batch saved in the state replaces one taken from a dataloader (a shuffled
        loader gives another batch on resume), so the resumed run probes the same batch.

        Args:
            state: what `state_dict()` returned.
            strict: raise when the state cannot be continued. With ``strict=False`` (the
                framework adapters: a hook must never raise) another probe batch, pair
                set or number of ranks, or a state this version cannot read, starts a
                new trajectory at the first probe after the resume instead: a
                ``new_baseline`` marker record and a ``resume_change`` alert.

        Raises:
            MonitorStateError: (strict only) the state is from a newer format, or from
                another probe batch or pair set while ``on_mismatch="refuse"``.
        """
        self._lenient_resume = not strict
        if state.get("state_version", 0) > STATE_VERSION:
            message = (
                f"monitor state version {state.get('state_version')} is newer than this "
                f"library understands ({STATE_VERSION}); upgrade redundancy-monitor"
            )
            if strict:
                raise MonitorStateError(message)
            log.error("redundancy monitor: %s; the state is ignored", message)
            self._resume_reasons.append("a monitor state this version cannot read (ignored)")
            return
        self._expected_sha = state.get("batch_sha256")
        self._restore_batch(state.get("probe_batch"))
        self._check_sha()
        identity = state.get("trajectory") or (
            {"batch_sha256": self._expected_sha} if self._expected_sha else None
        )
        self._check_pairs(state.get("pairs_spec"), (identity or {}).get("n_layers"))
        self._check_protocols((identity or {}).get("protocols"))
        self.trajectory_guard = TrajectoryGuard(identity)
        self.earlier_trajectories = [list(t) for t in state.get("earlier_trajectories", [])]
        self.sink_health.n_errors = state.get("n_sink_errors", 0)
        self.last_step = state.get("last_step")
        self.probed_steps = list(state.get("probed_steps", []))
        self.n_probes = state.get("n_probes", 0)
        self.n_failures = state.get("n_failures", 0)
        self.n_skipped_busy = state.get("n_skipped_busy", 0)
        self.history = [dict(h) for h in state.get("history", [])]
        self.alerts = [Alert(**a) for a in state.get("alerts", [])]
        self.alert_engine.load_state_dict(state.get("alert_engine", {}))
        self._start_marked = False  # a restored state is a new attempt: mark where it starts
        self._saved_world_size = state.get("world_size")
        self._saved_pending = state.get("pending_step")

    def _restore_batch(self, saved: dict[str, Any] | None) -> None:
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
        if self._expected_sha not in (None, checked.sha256):
            log.warning("redundancy monitor: the saved probe batch does not match its hash")
            return
        self._ids, self._mask = checked.input_ids, checked.attention_mask
        self._batch_origin = "checkpoint"

    def _check_pairs(self, saved, n_layers: int | None) -> None:
        """Refuse another pair set; specs naming the same pairs ("adjacent", "window:1",
        the explicit list) are the same set."""
        now = _pairs_spec(self.probe_kwargs["pairs"])
        if saved is None or same_pair_set(saved, now, n_layers):
            return
        if self._lenient_resume:
            self._resume_reasons.append(f"pairs={now!r} (the checkpoint has pairs={saved!r})")
        elif self.on_mismatch == "refuse":
            raise MonitorStateError(
                f"the restored monitor state was recorded with pairs={saved!r}, this monitor "
                f"probes pairs={now!r}; trajectories would not be comparable. Pass the same "
                "pairs when resuming, or on_mismatch='new_baseline' to start a new trajectory."
            )

    def _check_protocols(self, saved: list[str] | None) -> None:
        now = protocols_identity(self.probe_kwargs["protocols"])
        if saved is None or saved == now:
            return
        if self._lenient_resume:
            self._resume_reasons.append(f"protocols {now} (the checkpoint has {saved})")
        elif self.on_mismatch == "refuse":
            raise MonitorStateError(
                f"the restored monitor state was recorded with protocols {saved}, this "
                f"monitor probes {now}; trajectories would not be comparable (a missing "
                "protocol leaves the gap undefined). Pass the same protocols when resuming, "
                "or on_mismatch='new_baseline' to start a new trajectory."
            )


def _pairs_spec(pairs) -> str | list[list[int]]:
    """The pair-set spec as JSON (a name, or sorted [i, j] lists)."""
    if isinstance(pairs, str):
        return pairs.strip().lower()
    return sorted(sorted(int(x) for x in p) for p in pairs)


def _rule_set(value: bool | Collection[str], name: str) -> frozenset[str]:
    if value is True:
        return frozenset(RULES)
    if value is False or value is None:
        return frozenset()
    rules = frozenset(value)
    unknown = rules - set(RULES)
    if unknown:
        raise InvalidConfigError(f"{name} names unknown rules {sorted(unknown)}; known: {RULES}")
    return rules
