"""Alert rules for "the gaps diverge" (docs/definitions.md §6), with hysteresis and cooldown.

Each rule looks at one probe and says whether its condition holds. A rule fires when
its condition has held for `hysteresis` consecutive probes, it is not already active,
and at least `cooldown_steps` optimizer steps have passed since it last fired. An active
rule re-arms once its condition has been false for `hysteresis` consecutive probes.
Non-finite distances and probe failures fire at once (no hysteresis), cooldown still
applies. The regime rule fires when a new regime has persisted for `hysteresis` probes.

With `use_intervals` (the default) the gap and regime rules judge a probe by its
bootstrap intervals (docs/intervals.md), so noise from the probe batch does not fire
them: a probe counts toward `gap_threshold` when the interval's lower bound is above the
threshold, toward `gap_growth` when the lower bound is above factor x the baseline's upper
bound, and toward `regime_change` only when its regime is stable (not `uncertain`). A
probe without intervals (``probe(intervals=False)``) is judged on its point values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.formatting import fmt, json_safe
from redundancy_monitor.probing.result import ProbeResult, ProbeSummary
from redundancy_monitor.removal.selection import default_budget, removal_overlap

RULES = (
    "gap_threshold",
    "gap_growth",
    "removal_overlap",
    "regime_change",
    "nonfinite",
    "probe_failure",
    "sink_failure",
    "resume_change",
)


@dataclass(frozen=True)
class Alert:
    """One alert: which rule, at which step, the value against the threshold, and why."""

    step: int
    rule: str
    value: float | None
    threshold: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class AlertConfig:
    """Which rules run and their thresholds. Set a rule's threshold to None to turn it off.

    Args:
        gap_metric: summary scalar the gap rules watch (any key of
            `ProbeSummary.scalars()`, e.g. ``"gap_median"``, ``"gap_max"``, ``"d1/gap_mean"``).
        gap_threshold: fire when the metric exceeds this many nats.
        growth_factor: fire when the metric exceeds this multiple of its baseline value.
        baseline_step: the first probe at or after this step is the baseline.
        growth_floor: baseline magnitudes below this count as this (a gap near 0 at
            initialisation would otherwise make any growth look infinite).
        overlap_budget: size of the removal sets compared (None: a quarter of the layers,
            at least 1); the rule is off when `overlap_threshold` is None.
        overlap_threshold: fire when the Jaccard overlap of the replacement-guided and
            interchange-guided removal sets is below this.
        regime_change: fire when the regime (docs/definitions.md §4) changes.
        nonfinite: fire when a probe measures a non-finite distance.
        probe_failure: fire when a probe raises.
        sink_failure: fire when a sink (record file, TensorBoard, a logger) that worked
            starts failing; once per outage of each sink, cooldown applies.
        resume_change: fire when a run resumes with another probe batch, pair set or
            number of ranks than its checkpoint (a new trajectory starts); this rule
            never stops or checkpoints the run.
        hysteresis: consecutive probes a condition must hold (and then fail) for.
        cooldown_steps: minimum optimizer steps between two firings of one rule.
        use_intervals: judge the gap and regime rules on the probes' bootstrap intervals
            (see the module doc); False: on point estimates alone.

    Raises:
        InvalidConfigError: a non-positive hysteresis, a negative cooldown, a growth factor
            not above 1 or an overlap threshold outside (0, 1].
    """

    gap_metric: str = "gap_median"
    gap_threshold: float | None = 0.10
    growth_factor: float | None = 3.0
    baseline_step: int = 0
    growth_floor: float = 0.01
    overlap_budget: int | None = None
    overlap_threshold: float | None = 0.5
    regime_change: bool = True
    nonfinite: bool = True
    probe_failure: bool = True
    sink_failure: bool = True
    resume_change: bool = True
    hysteresis: int = 2
    cooldown_steps: int = 0
    use_intervals: bool = True

    def __post_init__(self):
        if not isinstance(self.hysteresis, int) or self.hysteresis < 1:
            raise InvalidConfigError(f"hysteresis must be an int >= 1, got {self.hysteresis!r}")
        if self.cooldown_steps < 0:
            raise InvalidConfigError(f"cooldown_steps must be >= 0, got {self.cooldown_steps}")
        if self.growth_factor is not None and self.growth_factor <= 1:
            raise InvalidConfigError(
                f"growth_factor must be > 1 (or None: rule off), got {self.growth_factor}"
            )
        if self.overlap_threshold is not None and not 0 < self.overlap_threshold <= 1:
            raise InvalidConfigError(
                f"overlap_threshold must be in (0, 1] (or None), got {self.overlap_threshold}"
            )
        if self.overlap_budget is not None and self.overlap_budget < 1:
            raise InvalidConfigError(f"overlap_budget must be >= 1, got {self.overlap_budget}")
        if self.growth_floor <= 0:
            raise InvalidConfigError(f"growth_floor must be > 0, got {self.growth_floor}")


@dataclass
class RuleState:
    streak: int = 0
    clear_streak: int = 0
    active: bool = False
    last_fired: int | None = None


@dataclass
class AlertEngine:
    """Evaluates the rules probe after probe; its state round-trips through `state_dict()`."""

    config: AlertConfig = field(default_factory=AlertConfig)
    rules: dict[str, RuleState] = field(default_factory=lambda: {r: RuleState() for r in RULES})
    baseline: float | None = None
    baseline_at: int | None = None
    baseline_interval: tuple[float, float] | None = None
    regime: str | None = None
    regime_candidate: str | None = None

    def _cooled(self, rule: str, step: int) -> bool:
        last = self.rules[rule].last_fired
        return last is None or step - last >= self.config.cooldown_steps

    def _update(self, rule, step, holds, value, threshold, message, hysteresis=None):
        """Advance one rule's hysteresis state; return an Alert if it fires now."""
        k = self.config.hysteresis if hysteresis is None else hysteresis
        state = self.rules[rule]
        if not holds:
            state.streak = 0
            state.clear_streak += 1
            if state.clear_streak >= k:
                state.active = False
            return None
        state.clear_streak = 0
        state.streak += 1
        if state.streak < k or state.active or not self._cooled(rule, step):
            return None
        state.active = True
        state.last_fired = step
        return Alert(step, rule, value, threshold, message)

    def observe(self, step: int, result: ProbeResult) -> list[Alert]:
        """Evaluate every enabled rule on one probe result."""
        c, alerts = self.config, []
        scalars = result.summary.scalars()
        value = scalars.get(c.gap_metric)
        interval = self._interval(result.summary)
        if c.gap_threshold is not None:
            alerts.append(self._threshold(step, value, interval))
        if c.growth_factor is not None:
            alerts.append(self._growth(step, value, interval))
        if c.overlap_threshold is not None:
            alerts.append(self._overlap(step, result))
        if c.regime_change:
            alerts.append(self._regime(step, result.summary))
        if c.nonfinite:
            n_bad = result.summary.n_nonfinite
            alerts.append(
                self._update(
                    "nonfinite",
                    step,
                    n_bad > 0,
                    float(n_bad),
                    0.0,
                    f"step {step}: {n_bad} pair(s) have a non-finite distance (NaN/inf logits "
                    "in the snapshot); the model may be diverging",
                    hysteresis=1,
                )
            )
        return [a for a in alerts if a is not None]

    def observe_failure(self, step: int, error: str) -> list[Alert]:
        if not self.config.probe_failure:
            return []
        first_line = error.strip().splitlines()[0] if error.strip() else "unknown error"
        alert = self._update(
            "probe_failure",
            step,
            True,
            None,
            None,
            f"step {step}: the probe failed ({first_line}); training continues and the "
            "next scheduled probe will be tried",
            hysteresis=1,
        )
        # A failure is an event, not a level: re-arm at once so the next one reports too.
        self.rules["probe_failure"].active = False
        return [alert] if alert else []

    def observe_sink_failure(self, step: int, sink: str, error: BaseException) -> list[Alert]:
        """A sink that worked has started failing (the monitor reports each outage once)."""
        if not self.config.sink_failure:
            return []
        alert = self._update(
            "sink_failure",
            step,
            True,
            None,
            None,
            f"step {step}: {sink} failed ({type(error).__name__}: {error}); training and "
            "probing continue, records that could not be written are retried or counted "
            "in n_sink_errors",
            hysteresis=1,
        )
        self.rules["sink_failure"].active = False  # an event, like a probe failure
        return [alert] if alert else []

    def observe_resume_change(self, step: int, reason: str) -> list[Alert]:
        """The run resumed with another configuration; a new trajectory starts here."""
        if not self.config.resume_change:
            return []
        alert = self._update(
            "resume_change",
            step,
            True,
            None,
            None,
            f"step {step}: a new trajectory starts: the run was {reason}; earlier probes "
            "are kept as a separate trajectory and not compared with the new ones",
            hysteresis=1,
        )
        self.rules["resume_change"].active = False  # an event
        return [alert] if alert else []

    def _interval(self, summary: ProbeSummary) -> tuple[float, float] | None:
        """The gap metric's interval, when rules use intervals and the probe has one."""
        if not self.config.use_intervals:
            return None
        try:
            low, high = summary.interval(self.config.gap_metric)
        except KeyError:
            return None
        return None if low is None or high is None else (low, high)

    def _threshold(self, step, value, interval) -> Alert | None:
        c = self.config
        what = f"{c.gap_metric} = {fmt(value)} nats"
        if interval is None:
            holds, compared = value is not None and value > c.gap_threshold, value
            reason = f"{what} is above the threshold {c.gap_threshold}"
        else:
            holds, compared = interval[0] > c.gap_threshold, interval[0]
            reason = (
                f"{what}, interval {_interval_text(interval)}: even its lower bound is above "
                f"the threshold {c.gap_threshold}"
            )
        return self._update(
            "gap_threshold",
            step,
            holds,
            compared,
            c.gap_threshold,
            f"step {step}: {reason}: replacement and interchange disagree on which layers "
            "are redundant",
        )

    def _growth(self, step: int, value: float | None, interval=None) -> Alert | None:
        c = self.config
        if self.baseline is None and step >= c.baseline_step and value is not None:
            self.baseline, self.baseline_at = value, step
            self.baseline_interval = None if interval is None else tuple(interval)
        if self.baseline is None or value is None:
            return self._update("gap_growth", step, False, None, None, "")
        if interval is not None and self.baseline_interval is not None:
            ratio, message = self._growth_of_interval(step, value, interval)
        else:
            ratio = value / max(abs(self.baseline), c.growth_floor)
            message = (
                f"step {step}: {c.gap_metric} = {fmt(value)} nats is {ratio:.1f}x its value "
                f"{fmt(self.baseline)} at the baseline probe (step {self.baseline_at}); "
                f"the protocols are diverging"
            )
        assert c.growth_factor is not None  # called only when the rule is on
        return self._update(
            "gap_growth", step, ratio > c.growth_factor, ratio, c.growth_factor, message
        )

    def _growth_of_interval(self, step, value, interval) -> tuple[float, str]:
        """Lower bound now against factor x the baseline's upper bound (its magnitude):
        the ratio and the alert's sentence."""
        c = self.config
        assert self.baseline_interval is not None  # called only with a baseline interval
        reference = max(abs(self.baseline_interval[0]), abs(self.baseline_interval[1]))
        ratio = interval[0] / max(reference, c.growth_floor)
        return ratio, (
            f"step {step}: {c.gap_metric} = {fmt(value)} nats, interval "
            f"{_interval_text(interval)}: its lower bound is {ratio:.1f}x the upper bound "
            f"{fmt(reference)} of the interval {_interval_text(self.baseline_interval)} at the "
            f"baseline probe (step {self.baseline_at}); the protocols are diverging"
        )

    def _overlap(self, step: int, result: ProbeResult) -> Alert | None:
        c = self.config
        budget = c.overlap_budget or default_budget(result.n_layers)
        jaccard, by_repl, by_int = removal_overlap(result, budget)
        holds = (
            jaccard is not None
            and c.overlap_threshold is not None
            and jaccard < c.overlap_threshold
        )
        return self._update(
            "removal_overlap",
            step,
            holds,
            jaccard,
            c.overlap_threshold,
            f"step {step}: at budget {budget} replacement would remove layers "
            f"{sorted(by_repl)} and interchange layers {sorted(by_int)} (Jaccard "
            f"{fmt(jaccard, 2)} < {c.overlap_threshold}); measure removal cost before pruning",
        )

    def _regime(self, step: int, summary: ProbeSummary) -> Alert | None:
        regime = summary.regime
        if regime is None:
            return None
        if self.config.use_intervals and summary.regime_uncertain:
            # An uncertain regime is no evidence of a change (nor a reference to change from).
            self.regime_candidate = None
            self.rules["regime_change"].streak = 0
            return None
        if self.regime is None:
            self.regime = regime
            return None
        if regime == self.regime:
            self.regime_candidate = None
            self.rules["regime_change"].streak = 0
            return None
        if regime != self.regime_candidate:
            self.regime_candidate = regime
            self.rules["regime_change"].streak = 0
        old = self.regime
        alert = self._update(
            "regime_change",
            step,
            True,
            None,
            None,
            f"step {step}: the regime changed from {old} to {summary.regime_text()}",
        )
        if self.rules["regime_change"].streak >= self.config.hysteresis:
            self.regime, self.regime_candidate = regime, None
            self.rules["regime_change"].streak = 0
            self.rules["regime_change"].active = False
        return alert

    def state_dict(self) -> dict[str, Any]:
        return {
            "rules": {name: asdict(s) for name, s in self.rules.items()},
            "baseline": self.baseline,
            "baseline_at": self.baseline_at,
            "baseline_interval": None
            if self.baseline_interval is None
            else list(self.baseline_interval),
            "regime": self.regime,
            "regime_candidate": self.regime_candidate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rules = {r: RuleState() for r in RULES}
        for name, s in state.get("rules", {}).items():
            if name in self.rules:
                self.rules[name] = RuleState(**s)
        self.baseline = state.get("baseline")
        self.baseline_at = state.get("baseline_at")
        interval = state.get("baseline_interval")
        self.baseline_interval = None if interval is None else tuple(interval)
        self.regime = state.get("regime")
        self.regime_candidate = state.get("regime_candidate")


def _interval_text(interval: tuple[float, float]) -> str:
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"
