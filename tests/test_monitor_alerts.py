"""Alert rules (docs/definitions.md §6) on hand-built probe results: hysteresis, cooldown, each rule."""

from __future__ import annotations

import pytest

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.alerts import AlertConfig, AlertEngine
from redundancy_monitor.probing.result import PairRecord, ProbeMeta, ProbeResult, summarize
from redundancy_monitor.removal.selection import removal_overlap

ONLY_GAP = dict(growth_factor=None, overlap_threshold=None, regime_change=False)
ONLY_CHANGE = dict(overlap_threshold=None, regime_change=False, hysteresis=1)


def result_from(pairs, n_layers=None):
    """A ProbeResult from (i, j, R(i<-j), R(j<-i), d_int) tuples."""
    records = [PairRecord.build(i, j, a, b, c) for i, j, a, b, c in pairs]
    n = n_layers or max(j for _, j, *_ in pairs) + 1
    return ProbeResult(records, summarize(records), meta=ProbeMeta(n_layers=n))


def gap_result(gap):
    """Three adjacent pairs whose gap is `gap` each (d_int = 0.02)."""
    return result_from([(k, k + 1, 0.02 + gap, 0.02, 0.02) for k in range(3)])


def rules_fired(engine, step, result):
    return [a.rule for a in engine.observe(step, result)]


def test_threshold_needs_k_consecutive_probes_and_fires_once_while_active():
    engine = AlertEngine(AlertConfig(gap_threshold=0.1, hysteresis=2, **ONLY_GAP))
    fired = [
        rules_fired(engine, s, gap_result(g)) for s, g in enumerate([0.2, 0.05, 0.2, 0.2, 0.3, 0.3])
    ]
    assert fired == [[], [], [], ["gap_threshold"], [], []]


def test_threshold_rearms_after_k_clear_probes():
    engine = AlertEngine(AlertConfig(gap_threshold=0.1, hysteresis=2, **ONLY_GAP))
    gaps = [0.2, 0.2, 0.0, 0.2, 0.2, 0.0, 0.0, 0.2, 0.2]
    fired = [s for s, g in enumerate(gaps) if rules_fired(engine, s, gap_result(g))]
    assert fired == [1, 8]  # one clear probe at 2 does not re-arm; two (5, 6) do


def test_cooldown_blocks_refiring_within_the_window():
    engine = AlertEngine(
        AlertConfig(gap_threshold=0.1, hysteresis=1, cooldown_steps=100, **ONLY_GAP)
    )
    steps_gaps = [(0, 0.2), (10, 0.0), (20, 0.2), (150, 0.0), (160, 0.2)]
    fired = [s for s, g in steps_gaps if rules_fired(engine, s, gap_result(g))]
    assert fired == [0, 160]


def test_alert_carries_step_rule_value_threshold_and_a_sentence():
    engine = AlertEngine(AlertConfig(gap_threshold=0.1, hysteresis=1, **ONLY_GAP))
    (alert,) = engine.observe(42, gap_result(0.25))
    assert (alert.step, alert.rule, alert.threshold) == (42, "gap_threshold", 0.1)
    assert alert.value == pytest.approx(0.25)
    assert "gap_median" in alert.message and "42" in alert.message


def test_growth_is_measured_against_the_baseline_probe():
    config = AlertConfig(
        gap_threshold=None,
        growth_factor=3.0,
        baseline_step=10,
        overlap_threshold=None,
        regime_change=False,
        hysteresis=1,
    )
    engine = AlertEngine(config)
    assert rules_fired(engine, 0, gap_result(0.5)) == []  # before the baseline step
    assert rules_fired(engine, 10, gap_result(0.05)) == []  # the baseline
    assert rules_fired(engine, 20, gap_result(0.14)) == []  # 2.8x
    (alert,) = engine.observe(30, gap_result(0.2))  # 4x: the change 0.15 > (3 - 1) x 0.05
    assert alert.rule == "gap_growth" and alert.value == pytest.approx(0.15)
    assert alert.threshold == pytest.approx(0.1)
    assert engine.baseline_at == 10


def test_removal_sets_follow_the_spec_rule_and_never_hold_adjacent_layers():
    # d_repl per adjacent pair: (0,1)=0.01 (1,2)=0.02 (2,3)=0.5 (3,4)=0.03; d_int reversed
    res = result_from(
        [
            (0, 1, 0.01, 0.0, 0.4),
            (1, 2, 0.02, 0.0, 0.3),
            (2, 3, 0.5, 0.0, 0.02),
            (3, 4, 0.03, 0.0, 0.01),
        ]
    )
    jaccard, by_repl, by_int = removal_overlap(res, budget=2)
    # replacement removability: 0:.01 1:.01 2:.02 3:.03 4:.03 -> 0, then 2 (1 is adjacent)
    assert by_repl == {0, 2}
    # interchange removability: 3:.01 4:.01 2:.02 1:.3 0:.4 -> 3, then 1 (2, 4 adjacent)
    assert by_int == {1, 3}
    assert jaccard == 0.0


def test_overlap_rule_fires_when_the_removal_sets_start_to_disagree_not_at_the_baseline():
    config = AlertConfig(
        gap_threshold=None,
        growth_factor=None,
        regime_change=False,
        overlap_budget=2,
        overlap_threshold=0.5,
        hysteresis=1,
    )
    disagree = result_from(
        [
            (0, 1, 0.01, 0.0, 0.4),
            (1, 2, 0.02, 0.0, 0.3),
            (2, 3, 0.5, 0.0, 0.02),
            (3, 4, 0.03, 0.0, 0.01),
        ]
    )
    agree = result_from([(i, j, a, b, a) for i, j, a, b, _ in [
        (0, 1, 0.01, 0.0, 0),
        (1, 2, 0.02, 0.0, 0),
        (2, 3, 0.5, 0.0, 0),
        (3, 4, 0.03, 0.0, 0),
    ]])  # fmt: skip
    # A checkpoint whose protocols disagree from the start: information, not an alert.
    engine = AlertEngine(config)
    assert [rules_fired(engine, s, disagree) for s in range(3)] == [[], [], []]
    assert engine.overlap_state == "disagree"
    # Agreeing at the baseline, then disagreeing: the state changed.
    engine = AlertEngine(config)
    assert rules_fired(engine, 0, agree) == []
    (alert,) = engine.observe(5, disagree)
    assert alert.rule == "removal_overlap" and alert.value == 0.0
    assert "[0, 2]" in alert.message and "[1, 3]" in alert.message and "step 0" in alert.message
    assert engine.overlap_state == "disagree"  # the new reference
    (back,) = engine.observe(6, agree)  # and back again is news too
    assert "now agree" in back.message


def test_change_rules_amount_factor_and_decline():
    both = AlertConfig(growth_amount=0.05, growth_factor=2.0, decline_amount=0.03, **ONLY_CHANGE)
    engine = AlertEngine(both)
    assert rules_fired(engine, 0, gap_result(0.02)) == []  # baseline 0.02: factor limit 0.02
    assert rules_fired(engine, 1, gap_result(0.06)) == []  # +0.04: above 0.02, not 0.05
    (alert,) = engine.observe(2, gap_result(0.08))  # +0.06 > max(0.05, 0.02)
    assert alert.rule == "gap_growth" and alert.threshold == pytest.approx(0.05)
    assert "growth_amount 0.05 and growth_factor 2.0" in alert.message
    engine = AlertEngine(both)
    engine.observe(0, gap_result(0.2))
    (alert,) = engine.observe(1, gap_result(0.16))  # -0.04 < -0.03
    assert alert.rule == "gap_decline" and alert.threshold == pytest.approx(-0.03)
    assert not AlertConfig(growth_factor=None).growth_on
    assert AlertConfig(growth_factor=None, growth_amount=0.1).growth_on


def test_default_rules_fire_nothing_on_an_unchanging_run_even_when_the_level_is_alarming():
    """A pretrained checkpoint: large gap, unreliable regime, removal sets disagreeing.
    Nothing changes, so the defaults raise nothing; the old level rule would have."""
    bad = result_from([(k, k + 1, 0.9, 0.8, 0.3 + 0.1 * (k % 2)) for k in range(6)])
    assert bad.summary.regime == "unreliable" and bad.summary.gap_median > 0.1
    engine = AlertEngine(AlertConfig())
    assert [a for s in range(6) for a in engine.observe(s, bad)] == []
    level = AlertEngine(AlertConfig(gap_threshold=0.1))
    assert [a.rule for s in range(6) for a in level.observe(s, bad)] == ["gap_threshold"]


def test_regime_change_needs_the_new_regime_to_persist():
    config = AlertConfig(
        gap_threshold=None, growth_factor=None, overlap_threshold=None, hysteresis=2
    )
    engine = AlertEngine(config)
    tied = result_from([(0, 1, 0.01, 0.01, 0.009), (1, 2, 0.01, 0.01, 0.009)])
    divergent = result_from([(0, 1, 0.5, 0.5, 0.05), (1, 2, 0.5, 0.5, 0.05)])
    assert (tied.summary.regime, divergent.summary.regime) == ("tied", "divergent")
    seq = [tied, divergent, tied, divergent, divergent, divergent]
    fired = [s for s, r in enumerate(seq) if rules_fired(engine, s, r)]
    assert fired == [4]
    assert engine.regime == "divergent"


def test_engine_state_round_trips_mid_streak():
    config = AlertConfig(gap_threshold=0.1, hysteresis=3, **ONLY_GAP)
    straight, first = AlertEngine(config), AlertEngine(config)
    gaps = [0.2, 0.2, 0.2, 0.2]
    for s, g in enumerate(gaps[:2]):
        straight.observe(s, gap_result(g))
        first.observe(s, gap_result(g))
    resumed = AlertEngine(config)
    resumed.load_state_dict(first.state_dict())
    assert rules_fired(resumed, 2, gap_result(0.2)) == rules_fired(straight, 2, gap_result(0.2))
    assert resumed.state_dict() == straight.state_dict()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hysteresis=0),
        dict(growth_factor=1.0),
        dict(overlap_threshold=0.0),
        dict(cooldown_steps=-1),
        dict(decline_factor=0.5),
        dict(growth_amount=-0.1),
        dict(change_hysteresis=0),
    ],
)
def test_bad_alert_config_is_a_clear_error(kwargs):
    with pytest.raises(InvalidConfigError):
        AlertConfig(**kwargs)
