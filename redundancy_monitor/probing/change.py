"""The paired change between two probes of one probe batch (docs/intervals.md, "Change").

The monitor probes the same batch at every step, so the change of a value between two
probes can be judged far more precisely than either level: a hard sequence is hard at
both steps. The paired bootstrap draws the sequences once (the seed, replicate count and
number of sequences fix the draw, `intervals.resample_counts`), applies the same draw to
both probes' per-sequence tables, jointly over pairs, recomputes each probe's pair values
and docs/definitions.md §4 summary in every replicate, and takes the interval of the
later-minus-earlier difference (the same expanded percentile interval as a level's). The
point value of a change is exactly the later point value minus the earlier one.

Pure numpy: no model runs again, and no torch is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from redundancy_monitor.formatting import finite_or_none, fmt
from redundancy_monitor.probing.intervals import (
    IntervalConfig,
    Replicates,
    SampleSizeAdvice,
    bootstrap_replicates,
    bounds,
    sequences_needed,
)
from redundancy_monitor.probing.result import PairRecord, ProbeResult, Thresholds

#: The summary scalars whose change every change record carries.
CHANGE_SCALARS = (
    "gap_mean",
    "gap_median",
    "gap_p75",
    "gap_max",
    "ir_mean",
    "ir_median",
    "d_repl_mean",
    "d_repl_median",
    "d_int_mean",
    "d_int_median",
)
#: The per-pair values whose change every change record carries.
PAIR_FIELDS = PairRecord.INTERVAL_FIELDS  # d_repl, d_int, gap, ir


def _delta(later: float | None, earlier: float | None) -> float | None:
    if later is None or earlier is None:
        return None
    return finite_or_none(later - earlier)


@dataclass(frozen=True)
class PairChange:
    """The change of one pair's values (later minus earlier), each with its paired
    interval (None where undefined or not computed)."""

    i: int
    j: int
    d_repl: float | None = None
    d_repl_low: float | None = None
    d_repl_high: float | None = None
    d_int: float | None = None
    d_int_low: float | None = None
    d_int_high: float | None = None
    gap: float | None = None
    gap_low: float | None = None
    gap_high: float | None = None
    ir: float | None = None
    ir_low: float | None = None
    ir_high: float | None = None

    def interval(self, name: str) -> tuple[float | None, float | None]:
        return getattr(self, f"{name}_low"), getattr(self, f"{name}_high")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairChange:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Change:
    """The change of a probe against an earlier probe of the same trajectory.

    Attributes:
        step: the earlier probe's step (None when unknown: two checkpoints without one).
        values: ``name -> later - earlier`` of each summary scalar (None if undefined).
        intervals: ``name -> (low, high)``: the paired bootstrap interval of the change.
        pairs: the change of each pair finite in both probes.
        n_seq: the sequences resampled (None: no intervals).
        skipped: why the change has no intervals (None when it has them).
    """

    step: int | None
    values: dict[str, float | None]
    intervals: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    pairs: list[PairChange] = field(default_factory=list)
    n_seq: int | None = None
    skipped: str | None = None

    def value(self, name: str) -> float | None:
        return self.values.get(name)

    def interval(self, name: str) -> tuple[float | None, float | None]:
        """``(low, high)`` of a scalar's change; ``(None, None)`` when not computed."""
        return self.intervals.get(name, (None, None))

    def pair(self, i: int, j: int) -> PairChange | None:
        for p in self.pairs:
            if (p.i, p.j) == (min(i, j), max(i, j)):
                return p
        return None

    def without_pairs(self) -> Change:
        return dataclasses.replace(self, pairs=[])

    def to_dict(self) -> dict[str, Any]:
        """``{"step", "<scalar>", "<scalar>_low", "<scalar>_high", ..., "pairs": [...],
        "n_seq"}`` (and ``"skipped"`` when there are no intervals)."""
        out: dict[str, Any] = {"step": self.step}
        for name, value in self.values.items():
            low, high = self.interval(name)
            out[name] = finite_or_none(value)
            out[f"{name}_low"], out[f"{name}_high"] = finite_or_none(low), finite_or_none(high)
        out["pairs"] = [p.to_dict() for p in self.pairs]
        out["n_seq"] = self.n_seq
        if self.skipped is not None:
            out["skipped"] = self.skipped
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Change:
        rest = {k: v for k, v in data.items() if k not in ("step", "pairs", "n_seq", "skipped")}
        values, intervals = {}, {}
        for key, value in rest.items():
            if key.endswith(("_low", "_high")) or not (
                value is None or isinstance(value, float | int)
            ):
                continue
            values[key] = None if value is None else float(value)
            low, high = rest.get(f"{key}_low"), rest.get(f"{key}_high")
            if low is not None or high is not None:
                intervals[key] = (low, high)
        return cls(
            None if data.get("step") is None else int(data["step"]),
            values,
            intervals,
            [PairChange.from_dict(p) for p in data.get("pairs", [])],
            data.get("n_seq"),
            data.get("skipped"),
        )

    def text(self, name: str) -> str:
        """``+0.0123 [+0.0101, +0.0150]`` (the interval when there is one)."""
        value, (low, high) = self.value(name), self.interval(name)
        if value is None:
            return "null"
        band = "" if low is None or high is None else f" [{low:+.4f}, {high:+.4f}]"
        return f"{value:+.4f}{band}"


@dataclass(frozen=True)
class ProbeChange:
    """What a probe record carries from the second probe of a trajectory on: its change
    against the trajectory's baseline probe and against the previous recorded probe."""

    baseline: Change | None = None
    previous: Change | None = None

    def without_pairs(self) -> ProbeChange:
        return ProbeChange(
            None if self.baseline is None else self.baseline.without_pairs(),
            None if self.previous is None else self.previous.without_pairs(),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {}
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
        if self.previous is not None:
            out["previous"] = self.previous.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeChange:
        return cls(
            None if data.get("baseline") is None else Change.from_dict(data["baseline"]),
            None if data.get("previous") is None else Change.from_dict(data["previous"]),
        )


def paired_change(
    earlier: ProbeResult,
    later: ProbeResult,
    step: int | None,
    config: IntervalConfig | bool | None = None,
    thresholds: Thresholds | None = None,
    names: tuple[str, ...] = CHANGE_SCALARS,
    earlier_replicates: Replicates | None = None,
    later_replicates: Replicates | None = None,
) -> Change:
    """The change from `earlier` (a probe at `step`) to `later`, with paired intervals.

    Args:
        earlier, later: two probes of one probe batch and pair set.
        step: the earlier probe's step (recorded in the change; None when unknown).
        config: the bootstrap (seed, replicates, confidence); False: point values only.
        thresholds: regime thresholds for the summaries (default: the results').
        names: the summary scalars to report.
        earlier_replicates, later_replicates: replicates already computed with `config`
            (`bootstrap_replicates`), to save recomputing them.

    The point value of each change is exactly later minus earlier. Intervals need the
    per-sequence tables of both probes on the same number of sequences; otherwise the
    change has point values only and `skipped` says why.
    """
    e_scalars, l_scalars = earlier.summary.scalars(), later.summary.scalars()
    values = {name: _delta(l_scalars.get(name), e_scalars.get(name)) for name in names}
    e_pairs = {(r.i, r.j): r for r in earlier.pairs if r.is_finite()}
    common = [r for r in later.pairs if r.is_finite() and (r.i, r.j) in e_pairs]
    points = {
        (r.i, r.j): {f: _delta(getattr(r, f), getattr(e_pairs[(r.i, r.j)], f)) for f in PAIR_FIELDS}
        for r in common
    }
    if config is False:
        return _assemble(step, values, {}, points, {}, None, "intervals are off")
    config = config if isinstance(config, IntervalConfig) else IntervalConfig()
    e_boot = earlier_replicates or bootstrap_replicates(earlier, config, thresholds)
    l_boot = later_replicates or bootstrap_replicates(later, config, thresholds)
    if e_boot is None or l_boot is None:
        reason = "needs the per-sequence distances of at least 2 sequences at both probes"
        return _assemble(step, values, {}, points, {}, None, reason)
    if e_boot.n_seq != l_boot.n_seq:
        reason = f"the probes measured {e_boot.n_seq} and {l_boot.n_seq} sequences"
        return _assemble(step, values, {}, points, {}, None, reason)
    levels = l_boot.levels
    scalar_bounds: dict[str, tuple[float | None, float | None]] = {}
    defined = [n for n in names if values[n] is not None and n in l_boot.summary]
    if defined:
        diffs = np.stack([l_boot.summary[n] - e_boot.summary[n] for n in defined], axis=1)
        low, high = bounds(diffs, levels)
        scalar_bounds = {
            n: (finite_or_none(lo), finite_or_none(hi))
            for n, lo, hi in zip(defined, low, high, strict=True)
        }
    pair_bounds: dict[tuple[int, int], dict[str, tuple[float | None, float | None]]] = {}
    cols: list[tuple[int, int, int, int]] = []
    for r in common:
        e_col, l_col = e_boot.column(r.i, r.j), l_boot.column(r.i, r.j)
        if e_col is not None and l_col is not None:
            cols.append((r.i, r.j, e_col, l_col))
    for name in PAIR_FIELDS:
        e_reps, l_reps = e_boot.pairs.get(name), l_boot.pairs.get(name)
        if e_reps is None or l_reps is None or not cols:
            continue
        diffs = l_reps[:, [c[3] for c in cols]] - e_reps[:, [c[2] for c in cols]]
        low, high = bounds(diffs, levels)
        for k, (i, j, _, _) in enumerate(cols):
            if points[(i, j)][name] is not None:
                pair_bounds.setdefault((i, j), {})[name] = (
                    finite_or_none(low[k]),
                    finite_or_none(high[k]),
                )
    return _assemble(step, values, scalar_bounds, points, pair_bounds, l_boot.n_seq, None)


def _assemble(step, values, scalar_bounds, points, pair_bounds, n_seq, skipped) -> Change:
    pairs = []
    for (i, j), deltas in sorted(points.items()):
        fields_: dict[str, float | None] = {}
        for name in PAIR_FIELDS:
            low, high = pair_bounds.get((i, j), {}).get(name, (None, None))
            fields_[name], fields_[f"{name}_low"], fields_[f"{name}_high"] = deltas[name], low, high
        pairs.append(PairChange(i, j, **fields_))
    return Change(step, values, scalar_bounds, pairs, n_seq, skipped)


@dataclass
class ChangeReference:
    """An earlier probe the later ones are compared with (a trajectory's baseline, or the
    previous probe): its step, pairs, summary and per-sequence tables, and its bootstrap
    replicates once computed. It round-trips through `to_dict` (the monitor's state), so
    a resumed run measures change against the same probe."""

    step: int
    result: ProbeResult
    _replicates: Replicates | None = field(default=None, repr=False, compare=False)
    _replicates_of: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, step: int, result: ProbeResult) -> ChangeReference:
        """What of `result` a change needs (pairs, summary, per-sequence tables)."""
        lean = dataclasses.replace(result, skipped=[], deletion=[])
        return cls(step, lean)

    def replicates(
        self, config: IntervalConfig, thresholds: Thresholds | None
    ) -> Replicates | None:
        key = (config, thresholds)
        if self._replicates_of != key:
            self._replicates = bootstrap_replicates(self.result, config, thresholds)
            self._replicates_of = key
        return self._replicates

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "result": self.result.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChangeReference:
        return cls(int(data["step"]), ProbeResult.from_dict(data["result"]))


def change_sample_size_advice(
    change: Change,
    metric: str = "gap_median",
    target_halfwidth: float = 0.005,
    confidence: float = 0.95,
    expanded: bool = True,
) -> SampleSizeAdvice:
    """The half-width of `metric`'s paired change interval at this batch size, and the
    number of sequences that would reach `target_halfwidth` (the same 1/sqrt(n) law with
    the t factor as the level's advice, `intervals.sample_size_advice`)."""
    low, high = change.interval(metric)
    n = int(change.n_seq or 0)
    halfwidth = needed = None
    if low is not None and high is not None and n >= 2:
        halfwidth = (high - low) / 2
        needed = sequences_needed(halfwidth, n, target_halfwidth, confidence, expanded)
    return SampleSizeAdvice(
        metric,
        n,
        change.value(metric),
        low,
        high,
        halfwidth,
        target_halfwidth,
        needed,
        confidence,
        of="change",
        since=change.step,
    )


def change_table(change: Change, names: tuple[str, ...] = CHANGE_SCALARS) -> str:
    """A fixed-width text table: each scalar's change with its paired interval, then each
    pair's gap, d_repl and d_int change."""
    lines = [f"{'scalar':<14} {'change':>9} {'low':>9} {'high':>9}"]
    for name in names:
        low, high = change.interval(name)
        lines.append(f"{name:<14} {fmt(change.value(name)):>9} {fmt(low):>9} {fmt(high):>9}")
    lines.append("")
    head = f"{'i':>3} {'j':>3} {'gap':>9} {'gap_low':>9} {'gap_high':>9} {'d_repl':>9} {'d_int':>9}"
    lines.append(head)
    for p in change.pairs:
        lines.append(
            f"{p.i:>3} {p.j:>3} {fmt(p.gap):>9} {fmt(p.gap_low):>9} {fmt(p.gap_high):>9} "
            f"{fmt(p.d_repl):>9} {fmt(p.d_int):>9}"
        )
    return "\n".join(lines)
