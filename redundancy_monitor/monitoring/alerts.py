"""Alert rules for "the gaps diverge" (docs/definitions.md §6), with hysteresis and cooldown.

Each rule looks at one probe and says whether its condition holds. A rule fires when
its condition has held for `hysteresis` consecutive probes, it is not already active,
and at least `cooldown_steps` optimizer steps have passed since it last fired. An active
rule re-arms once its condition has been false for `hysteresis` consecutive probes.
Non-finite distances and probe failures fire at once (no hysteresis), cooldown still
applies.

The default rules judge **change**, not level: the monitor probes one batch at every
step, so the change of the gap since the trajectory's baseline probe is measured far more
precisely than the gap itself (its paired bootstrap interval,
`redundancy_monitor.probing.change`). `gap_growth` (and the opt-in `gap_decline`) fire
when the change is beyond the rule's limit and its paired interval is beyond half of it
(`interval_fraction`);
`removal_overlap` and `regime_change` fire when the state they watch (do the protocols'
removal sets agree; the regime) differs from the state at the baseline, so a checkpoint
whose protocols already disagree when monitoring starts raises nothing until that
changes (the state at the baseline is reported once as information, `level_state`). The
level rule `gap_threshold` is off by default. With the defaults, a run whose weights do
not change raises no alert.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.formatting import fmt, json_safe
from redundancy_monitor.probing.change import Change
from redundancy_monitor.probing.result import ProbeResult, ProbeSummary
from redundancy_monitor.removal.selection import default_budget, removal_overlap

RULES = (
    "gap_threshold",
    "gap_growth",
    "gap_decline",
    "removal_overlap",
    "regime_change",
    "nonfinite",
    "probe_failure",
    "sink_failure",
    "resume_change",
)


#: What a `probe_failure` alert says happens next during training (replay says its own).
AFTER_FAILURE = "training continues and the next scheduled probe will be tried"


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
        gap_threshold: (level rule, off by default) fire when the metric exceeds this
            many nats (with intervals: the lower end of its interval).
        growth_factor: fire when the metric has grown to this multiple of its value at the
            baseline probe: its change since the baseline exceeds
            ``(growth_factor - 1) x max(|baseline value|, growth_floor)``.
        growth_amount: fire when the change since the baseline exceeds this many nats.
            With both set, the change must exceed both; with neither, the rule is off.
        decline_factor, decline_amount: (off by default) the same for a decline: fire when
            the metric has fallen below ``1 / decline_factor`` of its baseline value
            (a change below ``-(1 - 1/decline_factor) x max(|baseline|, growth_floor)``)
            and/or by more than `decline_amount` nats.
        baseline_step: the first probe at or after this step is the baseline.
        growth_floor: baseline magnitudes below this count as this (a gap near 0 at
            initialisation would otherwise make any growth look infinite).
        overlap_budget: size of the removal sets compared (None: a quarter of the layers,
            at least 1); the rule is off when `overlap_threshold` is None.
        overlap_threshold: the protocols' removal sets disagree when their Jaccard overlap
            is below this; fire when that state (agree or disagree) changes from the
            baseline's.
        regime_change: fire when the regime (docs/definitions.md §4) changes from the
            baseline's (the first stable regime).
        nonfinite: fire when a probe measures a non-finite distance.
        probe_failure: fire when a probe raises.
        sink_failure: fire when a sink (record file, TensorBoard, a logger) that worked
            starts failing; once per outage of each sink, cooldown applies.
        resume_change: fire when a run resumes with another probe batch, pair set or
            number of ranks than its checkpoint (a new trajectory starts); this rule
            never stops or checkpoints the run.
        hysteresis: consecutive probes a condition must hold (and then fail) for.
        change_hysteresis: the same for `gap_growth` and `gap_decline`, whose paired
            interval already keeps the probe batch's noise out (1: fire at the first
            probe that meets the condition).
        interval_fraction: with intervals, a change rule holds when the change is beyond
            its limit and the near end of its paired interval is beyond this fraction of
            the limit: the change is then surely at least that large, so noise around a
            change of less than that fraction does not fire, while a change that crosses
            the limit is caught at the probe where it crosses. 1.0: the whole interval
            must be beyond the limit (surer, later).
        cooldown_steps: minimum optimizer steps between two firings of one rule.
        use_intervals: judge the gap rules on intervals (the change rules on the paired
            change interval, `gap_threshold` on the level's) and the regime rule on stable
            regimes only; False: on point estimates alone.

    Raises:
        InvalidConfigError: a non-positive hysteresis, a negative cooldown or amount, a
            growth or decline factor not above 1 or an overlap threshold outside (0, 1].
    """

    gap_metric: str = "gap_median"
    gap_threshold: float | None = None
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
    growth_amount: float | None = None
    decline_factor: float | None = None
    decline_amount: float | None = None
    change_hysteresis: int = 1
    interval_fraction: float = 0.5

    def __post_init__(self):
        for name in ("hysteresis", "change_hysteresis"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.cooldown_steps < 0:
            raise InvalidConfigError(f"cooldown_steps must be >= 0, got {self.cooldown_steps}")
        for name in ("growth_factor", "decline_factor"):
            value = getattr(self, name)
            if value is not None and value <= 1:
                raise InvalidConfigError(f"{name} must be > 1 (or None: off), got {value}")
        for name in ("growth_amount", "decline_amount"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidConfigError(f"{name} must be >= 0 nats (or None: off), got {value}")
        if not 0 <= self.interval_fraction <= 1:
            raise InvalidConfigError(
                f"interval_fraction must be in [0, 1], got {self.interval_fraction}"
            )
        if self.overlap_threshold is not None and not 0 < self.overlap_threshold <= 1:
            raise InvalidConfigError(
                f"overlap_threshold must be in (0, 1] (or None), got {self.overlap_threshold}"
            )
        if self.overlap_budget is not None and self.overlap_budget < 1:
            raise InvalidConfigError(f"overlap_budget must be >= 1, got {self.overlap_budget}")
        if self.growth_floor <= 0:
            raise InvalidConfigError(f"growth_floor must be > 0, got {self.growth_floor}")

    @property
    def growth_on(self) -> bool:
        return self.growth_factor is not None or self.growth_amount is not None

    @property
    def decline_on(self) -> bool:
        return self.decline_factor is not None or self.decline_amount is not None

    def growth_limit(self, baseline: float) -> float:
        """The change (nats) above which `gap_growth` holds, for a baseline value."""
        parts = [] if self.growth_amount is None else [self.growth_amount]
        if self.growth_factor is not None:
            parts.append((self.growth_factor - 1) * max(abs(baseline), self.growth_floor))
        return max(parts)

    def decline_limit(self, baseline: float) -> float:
        """The fall (nats, positive) beyond which `gap_decline` holds."""
        parts = [] if self.decline_amount is None else [self.decline_amount]
        if self.decline_factor is not None:
            parts.append((1 - 1 / self.decline_factor) * max(abs(baseline), self.growth_floor))
        return max(parts)


@dataclass
class RuleState:
    streak: int = 0
    clear_streak: int = 0
    active: bool = False
    last_fired: int | None = None


@dataclass
class AlertEngine:
    """Evaluates the rules probe after probe; its state round-trips through `state_dict()`.

    Attributes:
        baseline, baseline_at: the gap metric's value at the baseline probe, and its step.
        regime: the reference regime (the first stable one, then each new regime once it
            has persisted).
        overlap_state: the reference state of the removal sets: ``"agree"`` or
            ``"disagree"`` (Jaccard overlap at or above / below `overlap_threshold`).
    """

    config: AlertConfig = field(default_factory=AlertConfig)
    rules: dict[str, RuleState] = field(default_factory=lambda: {r: RuleState() for r in RULES})
    baseline: float | None = None
    baseline_at: int | None = None
    regime: str | None = None
    regime_candidate: str | None = None
    overlap_state: str | None = None
    overlap_candidate: str | None = None
    overlap_at: int | None = None

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

    def observe(self, step: int, result: ProbeResult, change: Change | None = None) -> list[Alert]:
        """Evaluate every enabled rule on one probe result.

        Args:
            step: the probe's step.
            result: what it measured.
            change: its paired change since the trajectory's baseline probe (the
                `Recorder` passes it); None: the change rules use the point change of the
                gap metric since the engine's own baseline probe.
        """
        c, alerts = self.config, []
        scalars = result.summary.scalars()
        value = scalars.get(c.gap_metric)
        if self.baseline is None and step >= c.baseline_step and value is not None:
            self.baseline, self.baseline_at = value, step
        if c.gap_threshold is not None:
            alerts.append(self._threshold(step, value, self._interval(result.summary)))
        if c.growth_on or c.decline_on:
            alerts.extend(self._change_rules(step, value, change))
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

    def observe_failure(self, step: int, error: str, after: str = AFTER_FAILURE) -> list[Alert]:
        """A failed probe (`after`: what happens next, said in the alert)."""
        if not self.config.probe_failure:
            return []
        first_line = error.strip().splitlines()[0] if error.strip() else "unknown error"
        alert = self._update(
            "probe_failure",
            step,
            True,
            None,
            None,
            f"step {step}: the probe failed ({first_line}); {after}",
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

    def _change_since_baseline(self, value, change):
        """The gap metric's change since the baseline: ``(point, interval or None)``."""
        c = self.config
        if change is not None and change.value(c.gap_metric) is not None:
            low, high = change.interval(c.gap_metric)
            interval = (low, high) if c.use_intervals and None not in (low, high) else None
            return change.value(c.gap_metric), interval
        if self.baseline is None or value is None:
            return None, None
        return value - self.baseline, None

    def _change_rules(self, step: int, value, change: Change | None) -> list[Alert | None]:
        c = self.config
        delta, interval = self._change_since_baseline(value, change)
        out: list[Alert | None] = []
        baseline = self.baseline if self.baseline is not None else 0.0
        defined = delta is not None and self.baseline is not None
        since = f"since the baseline probe (step {self.baseline_at})"
        if c.growth_on:
            if not defined:
                out.append(
                    self._update("gap_growth", step, False, None, None, "", c.change_hysteresis)
                )
            else:
                limit = c.growth_limit(baseline)
                how = _limit_text(c.growth_amount, c.growth_factor, baseline, c.growth_floor)
                holds, guard = _beyond(delta, interval, limit, c.interval_fraction, +1)
                out.append(
                    self._update(
                        "gap_growth",
                        step,
                        holds,
                        delta,
                        limit,
                        f"step {step}: {c.gap_metric} rose by {delta:+.4f} nats {since}, "
                        f"above the rule's limit {limit:.4f} nats ({how}){guard}; "
                        "the protocols are diverging",
                        c.change_hysteresis,
                    )
                )
        if c.decline_on:
            if not defined:
                out.append(
                    self._update("gap_decline", step, False, None, None, "", c.change_hysteresis)
                )
            else:
                limit = c.decline_limit(baseline)
                how = _limit_text(
                    c.decline_amount, c.decline_factor, baseline, c.growth_floor, decline=True
                )
                holds, guard = _beyond(delta, interval, limit, c.interval_fraction, -1)
                out.append(
                    self._update(
                        "gap_decline",
                        step,
                        holds,
                        delta,
                        -limit,
                        f"step {step}: {c.gap_metric} changed by {delta:+.4f} nats {since}, "
                        f"below the rule's limit {-limit:.4f} nats ({how}){guard}; "
                        "the protocols are converging",
                        c.change_hysteresis,
                    )
                )
        return out

    def _overlap(self, step: int, result: ProbeResult) -> Alert | None:
        c = self.config
        assert c.overlap_threshold is not None  # the rule is on
        budget = c.overlap_budget or default_budget(result.n_layers)
        jaccard, by_repl, by_int = removal_overlap(result, budget)
        if jaccard is None:
            return None
        state = "disagree" if jaccard < c.overlap_threshold else "agree"
        if self.overlap_state is None:  # the baseline's state: information, not an alert
            self.overlap_state, self.overlap_at = state, step
            return None
        if state == self.overlap_state:
            self.overlap_candidate = None
            self.rules["removal_overlap"].streak = 0
            return None
        if state != self.overlap_candidate:
            self.overlap_candidate = state
            self.rules["removal_overlap"].streak = 0
        since = f"step {self.overlap_at}" if self.overlap_at is not None else "the baseline"
        if state == "disagree":
            what = (
                f"the protocols' removal sets now disagree: at budget {budget} replacement "
                f"would remove layers {sorted(by_repl)} and interchange layers "
                f"{sorted(by_int)} (Jaccard {fmt(jaccard, 2)} < {c.overlap_threshold}); "
                f"they agreed since {since}. Measure removal cost before pruning"
            )
        else:
            what = (
                f"the protocols' removal sets now agree: at budget {budget} replacement "
                f"would remove layers {sorted(by_repl)} and interchange layers "
                f"{sorted(by_int)} (Jaccard {fmt(jaccard, 2)} >= {c.overlap_threshold}); "
                f"they disagreed since {since}"
            )
        alert = self._update(
            "removal_overlap", step, True, jaccard, c.overlap_threshold, f"step {step}: {what}"
        )
        if self.rules["removal_overlap"].streak >= c.hysteresis:
            self.overlap_state, self.overlap_candidate, self.overlap_at = state, None, step
            self.rules["removal_overlap"].streak = 0
            self.rules["removal_overlap"].active = False
        return alert

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
            "regime": self.regime,
            "regime_candidate": self.regime_candidate,
            "overlap_state": self.overlap_state,
            "overlap_candidate": self.overlap_candidate,
            "overlap_at": self.overlap_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rules = {r: RuleState() for r in RULES}
        for name, s in state.get("rules", {}).items():
            if name in self.rules:
                self.rules[name] = RuleState(**s)
        self.baseline = state.get("baseline")
        self.baseline_at = state.get("baseline_at")
        self.regime = state.get("regime")
        self.regime_candidate = state.get("regime_candidate")
        self.overlap_state = state.get("overlap_state")
        self.overlap_candidate = state.get("overlap_candidate")
        self.overlap_at = state.get("overlap_at")


def level_state(step: int, result: ProbeResult, config: AlertConfig) -> dict[str, Any]:
    """The level state at a trajectory's baseline probe, reported once as information
    (a ``baseline_state`` record and a log line, never an alert): the gap metric with its
    interval, the regime with its stability, and the protocols' removal sets. The change
    rules and the state rules (`removal_overlap`, `regime_change`) judge later probes
    against it."""
    summary = result.summary
    value = summary.scalars().get(config.gap_metric)
    try:
        low, high = summary.interval(config.gap_metric)
    except KeyError:
        low = high = None
    out: dict[str, Any] = {
        "type": "baseline_state",
        "step": step,
        "gap_metric": config.gap_metric,
        "value": value,
        "low": low,
        "high": high,
        "regime": summary.regime,
        "regime_stability": summary.regime_stability,
    }
    parts = [f"{config.gap_metric} = {fmt(value)} nats"]
    if low is not None and high is not None:
        parts[0] += f" {_interval_text((low, high))}"
    if summary.regime is not None:
        parts.append(f"regime {summary.regime_text()}")
    if config.overlap_threshold is not None and result.pairs and result.meta.n_layers:
        budget = config.overlap_budget or default_budget(result.n_layers)
        jaccard, by_repl, by_int = removal_overlap(result, budget)
        out["removal_overlap"] = {
            "budget": budget,
            "jaccard": jaccard,
            "replacement": sorted(by_repl),
            "interchange": sorted(by_int),
            "threshold": config.overlap_threshold,
        }
        if jaccard is not None:
            verdict = "disagree" if jaccard < config.overlap_threshold else "agree"
            parts.append(
                f"removal sets at budget {budget} {verdict} (replacement {sorted(by_repl)}, "
                f"interchange {sorted(by_int)}, Jaccard {fmt(jaccard, 2)})"
            )
    out["reason"] = (
        f"level at the baseline probe (step {step}), for information: {'; '.join(parts)}. "
        "Alerts judge the change from here"
    )
    return json_safe(out)


def _beyond(delta: float, interval, limit: float, fraction: float, sign: int) -> tuple[bool, str]:
    """Whether a change `delta` is beyond `limit` (``sign`` +1: above, -1: below minus it)
    and, with an interval, the interval's near end beyond ``fraction x limit`` (the change
    is surely at least that fraction of the limit, not noise); and the sentence saying so."""
    point = sign * delta > limit
    if interval is None:
        return point, ""
    near = interval[0] if sign > 0 else interval[1]
    guard = fraction * limit
    sure = sign * near > guard
    side = "lower" if sign > 0 else "upper"
    return point and sure, (
        f", paired interval {_interval_text(interval, signed=True)} whose {side} end is "
        f"{'beyond' if sure else 'not beyond'} {sign * guard:+.4f} ({fraction:g} of the limit)"
    )


def _limit_text(amount, factor, baseline, floor, decline: bool = False) -> str:
    """How a change rule's limit was set, e.g. ``growth_factor 3.0 x baseline 0.0040
    (floor 0.01)``."""
    prefix = "decline" if decline else "growth"
    parts = [] if amount is None else [f"{prefix}_amount {amount}"]
    if factor is not None:
        parts.append(f"{prefix}_factor {factor} of the baseline {fmt(baseline)} (floor {floor})")
    return " and ".join(parts)


def _interval_text(interval: tuple[float, float], signed: bool = False) -> str:
    if signed:
        return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"
