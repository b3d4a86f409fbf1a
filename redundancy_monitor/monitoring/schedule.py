"""When to probe: by optimizer step only (docs/definitions.md §6), so every rank makes the same decision."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from redundancy_monitor.errors import InvalidConfigError

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

    Args:
        every_n_steps: probe period in optimizer steps (default 500).
        log_spaced: add steps 0, 1, 2, 4, 8, ... below the period (default True).
        steps: explicit extra steps.
        at_train_end: probe the final weights too (default True).

    Raises:
        InvalidConfigError: a period that is not a positive int (a bool is not one), or a
            negative explicit step.
    """

    every_n_steps: int | None = DEFAULT_EVERY_N_STEPS
    log_spaced: bool = True
    steps: tuple[int, ...] = ()
    at_train_end: bool = True

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
