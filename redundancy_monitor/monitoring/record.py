"""`ProbeRecord`: one probe, from the worker that ran it to the sinks and to the readers.

The executor (or `replay`) makes one per probe, the `Recorder` hands it to every sink and
keeps it in the history, the JSON Lines file stores its `to_dict()` as one line, and
`tools.records.load_run` reads it back with `from_dict()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from redundancy_monitor.probing.change import ProbeChange
from redundancy_monitor.probing.result import ProbeResult


@dataclass(frozen=True)
class ProbeRecord:
    """One probe at the optimizer step of its snapshot: what it measured, or why it failed.

    Attributes:
        step: the optimizer step of the snapshot.
        result: everything the probe measured; None when it failed (and on a rank that
            only served its FSDP2 shards to rank 0's probe: no result, no error).
        error: why it failed; None when it finished.
        probe_seconds: how long the probe ran (None when not known).
        blocked_seconds: how long the training thread waited for it (snapshot, start).
        wall_time: when it was recorded, in seconds since the epoch.
        skipped: scheduled probes skipped since the previous probe started, because it
            was still running (None: not known, e.g. offline probes and older files).
        change: from the second probe of a trajectory on, its paired change against the
            trajectory's baseline probe and the previous probe (the `Recorder` adds it).
    """

    step: int
    result: ProbeResult | None = None
    error: str | None = None
    probe_seconds: float | None = None
    blocked_seconds: float | None = None
    wall_time: float | None = None
    skipped: int | None = None
    change: ProbeChange | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def summary_only(self) -> ProbeRecord:
        """This record without the per-pair lists and per-sequence tables (what a history
        and a state keep); its change keeps the summary scalars only."""
        if self.result is None:
            return self
        lean = dataclasses.replace(
            self.result, pairs=[], skipped=[], deletion=[], per_sequence=None
        )
        change = None if self.change is None else self.change.without_pairs()
        return dataclasses.replace(self, result=lean, change=change)

    def to_dict(self) -> dict[str, Any]:
        """One JSON-safe line of the record file: ``type`` ``"probe"`` (with timings, the
        whole result and, from a trajectory's second probe on, ``change``) or
        ``"failure"`` (step and error)."""
        if self.result is None:
            return {"type": "failure", "step": self.step, "error": self.error}
        out = {
            "type": "probe",
            "step": self.step,
            "wall_time": self.wall_time,
            "probe_seconds": self.probe_seconds,
            "blocked_seconds": self.blocked_seconds,
            "skipped": self.skipped,
            "result": self.result.to_dict(),
        }
        if self.change is not None:
            out["change"] = self.change.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeRecord:
        """Read a ``probe`` or ``failure`` line (`to_dict()` of any version)."""
        if data.get("type") == "failure":
            return cls(int(data["step"]), error=str(data.get("error", "")))
        return cls(
            int(data["step"]),
            result=ProbeResult.from_dict(data["result"]),
            probe_seconds=data.get("probe_seconds"),
            blocked_seconds=data.get("blocked_seconds"),
            wall_time=data.get("wall_time"),
            skipped=data.get("skipped"),
            change=ProbeChange.from_dict(data["change"]) if data.get("change") else None,
        )
