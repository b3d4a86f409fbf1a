"""`MonitorControl`: what the training loop should do after a monitor hook.

The monitor's hooks (`RedundancyMonitor.step` / `train_end`, and the sidecar reader's)
return one, already the same on every rank; a framework adapter only copies it into its
framework's flags (Lightning ``trainer.should_stop`` and an alert checkpoint, HF
``control.should_training_stop`` / ``should_save``), as HF's own `TrainerControl` works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from redundancy_monitor.monitoring.ranks import RankGroup
    from redundancy_monitor.monitoring.schedule import ProbeSchedule


@dataclass(frozen=True)
class MonitorControl:
    """What the alerts ask of the training loop, the same on every rank.

    Attributes:
        stop: an alert of a `stop_on_alert` rule fired: stop training (stays set).
        save: an alert of a `checkpoint_on_alert` rule fired: save a checkpoint now
            (handed out once per request).
        reason: the latest alert behind the request, ``"[rule] message"``; None when
            nothing is asked.
    """

    stop: bool = False
    save: bool = False
    reason: str | None = None


#: Nothing to do.
CONTINUE = MonitorControl()


class RankAgreement:
    """Rank 0 decides, and every rank gets its control at scheduled steps only.

    For when rank 0 alone knows the alerts (it probes alone, or reads a sidecar's file):
    one broadcast per scheduled step (the same steps on every rank, so no rank waits for
    one that is not coming), none between. Without a group (one process) every due step
    hands out the local control. A stop, once agreed, is held until the run ends.

    Args:
        group: the ranks (None: this process alone).
        schedule: the steps at which ranks agree (its `is_due`).
    """

    def __init__(self, group: RankGroup | None, schedule: ProbeSchedule):
        self.group, self.schedule = group, schedule
        self._agreed_step: int | None = None
        self._stop: MonitorControl | None = None

    @property
    def decides(self) -> bool:
        """Whether this rank is the one that decides (rank 0, or a lone process)."""
        return self.group is None or self.group.rank == 0

    def due(self, step: int) -> bool:
        """Whether ranks agree at `step`: scheduled, and not seen just before (micro-batches
        of one optimizer step share it)."""
        if step == self._agreed_step or not self.schedule.is_due(step):
            return False
        self._agreed_step = step
        return True

    def agree(self, local: Callable[[], MonitorControl]) -> MonitorControl:
        """Rank 0's `local()` on every rank (a collective with several ranks); `local` is
        only called where this rank decides."""
        control = local() if self.decides else CONTINUE
        if self.group is not None:
            control = self.group.broadcast(control)
        if control.stop:
            self._stop = MonitorControl(stop=True, reason=control.reason)
        return control

    def held(self) -> MonitorControl:
        """The control between agreements: an agreed stop, else nothing."""
        return self._stop or CONTINUE


class ControlSource(Protocol):
    """What a framework adapter drives: a `RedundancyMonitor`, or a `SidecarAlerts` when
    another process probes. Every rank calls every hook."""

    def start(self) -> None: ...

    def step(self, step: int, model: Any) -> MonitorControl: ...

    def before_weights_change(self) -> None: ...

    def train_end(self, step: int, model: Any) -> MonitorControl: ...

    def close(self) -> None: ...
