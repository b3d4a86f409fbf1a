"""When to probe: by optimizer step only (docs/definitions.md §6), so every rank makes the same decision."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redundancy_monitor.errors import InvalidConfigError

if TYPE_CHECKING:
    from redundancy_monitor.monitoring.record import ProbeRecord

log = logging.getLogger("redundancy_monitor")

# A probe of the demo model costs about as much as 10-30 training steps on CPU; one every
# 500 steps keeps the monitor near 1-3% of training (see benchmarks/bench_overhead.py).
DEFAULT_EVERY_N_STEPS = 500


@dataclass(frozen=True)
class ProbeSchedule:
    """The optimizer steps at which a snapshot is taken and probed.

    A step is due when any of these holds:

    - ``every_n_steps`` divides it (``None`` turns the periodic schedule off);
    - ``log_spaced`` and it is 0 or a power of two below ``every_n_steps`` (dense early
      probes, while redundancy changes fastest);
    - it is listed in ``steps``.

    ``at_train_end`` adds one probe of the final weights when training ends.

    ``max_overhead`` makes the schedule adapt to what a probe costs here: a due step is
    probed only when the time since the previous probe started is at least that probe's
    measured time divided by ``max_overhead`` (so probes run at most that fraction of
    the wall time); other due steps pass without a probe. Use it when you do not know
    what a probe costs beside your training (a bigger model, CPU training, a shared
    GPU): instead of probes skipped because the previous one still runs, you get probes
    as often as the budget allows. Which steps are probed then depends on timing and can
    differ between two runs (the weights never do); with several ranks rank 0 decides
    for all, so every rank probes the same steps. Leave it None to probe exactly the
    scheduled steps (comparable step by step across runs).

    Args:
        every_n_steps: probe period in optimizer steps (default 500).
        log_spaced: add steps 0, 1, 2, 4, 8, ... below the period (default True).
        steps: explicit extra steps.
        at_train_end: probe the final weights too (default True; never held back).
        max_overhead: the largest fraction of wall time probes may take, in (0, 1]
            (e.g. 0.1); None (default): every due step is probed.

    Raises:
        InvalidConfigError: a period that is not a positive int (a bool is not one), a
            negative explicit step, or a `max_overhead` outside (0, 1].

    Example:
        >>> ProbeSchedule(every_n_steps=10, max_overhead=0.1)  # at most 10% of the time
    """

    every_n_steps: int | None = DEFAULT_EVERY_N_STEPS
    log_spaced: bool = True
    steps: tuple[int, ...] = ()
    at_train_end: bool = True
    max_overhead: float | None = None

    def __post_init__(self):
        n = self.every_n_steps
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise InvalidConfigError(
                f"every_n_steps must be a positive int or None, got {n!r}"
                + (" (True is not a period: pass e.g. every_n_steps=1)" if n is True else "")
            )
        steps = tuple(sorted({int(s) for s in self.steps}))
        if steps and steps[0] < 0:
            raise InvalidConfigError(f"schedule steps must be >= 0, got {steps[0]}")
        object.__setattr__(self, "steps", steps)
        cap = self.max_overhead
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap <= 1
        ):
            raise InvalidConfigError(
                f"max_overhead must be a fraction in (0, 1] or None, got {cap!r}; pass e.g. "
                "max_overhead=0.1 to let probes take at most 10% of the wall time"
            )

    @classmethod
    def explicit(cls, steps: Iterable[int], at_train_end: bool = True) -> ProbeSchedule:
        """Probe exactly at `steps` (and at train end if asked)."""
        return cls(
            every_n_steps=None, log_spaced=False, steps=tuple(steps), at_train_end=at_train_end
        )

    def is_due(self, step: int) -> bool:
        if step < 0:
            return False
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if self.log_spaced and (step == 0 or (step & (step - 1)) == 0):
            return self.every_n_steps is None or step < self.every_n_steps
        return step in self.steps


class OverheadPacer:
    """Holds back due probes so that probing takes at most `max_overhead` of the wall
    time: the next probe may start once the time since the previous one started is at
    least its measured time (the training thread's wait plus the probe's run, each
    second counted once) / `max_overhead`.

    The monitor feeds it start times and finished records; a probe still running (its
    time not known yet) holds the next one back.
    """

    def __init__(self, max_overhead: float | None):
        self.max_overhead = max_overhead
        self.last_cost: float | None = None  # seconds the latest finished probe took
        self._started: float | None = None  # when the latest probe started
        self._finished = True
        self._told = False

    def started(self, now: float) -> None:
        self._started, self._finished = now, False

    def finished(self, record: ProbeRecord) -> None:
        probe, blocked = record.probe_seconds or 0.0, record.blocked_seconds or 0.0
        # An inline probe's wait already holds the probe; a background probe runs after
        # the training thread's wait (the snapshot).
        self.last_cost = blocked if blocked >= probe else blocked + probe
        self._finished = True

    def allows(self, now: float) -> bool:
        if self.max_overhead is None or self._started is None:
            return True
        if not self._finished:
            return False
        return now - self._started >= (self.last_cost or 0.0) / self.max_overhead

    def held(self, step: int, tell: bool) -> None:
        """Log the first probe held back (INFO; the rest at DEBUG)."""
        level = logging.INFO if tell and not self._told else logging.DEBUG
        self._told = self._told or tell
        log.log(
            level,
            "redundancy probe at step %d held back by max_overhead=%s: the last probe took "
            "%.2f s, so the next may start %.1f s after it started",
            step,
            self.max_overhead,
            self.last_cost or 0.0,
            (self.last_cost or 0.0) / (self.max_overhead or 1.0),
        )
