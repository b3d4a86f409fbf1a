"""docs/definitions.md §4 summary scalars and regime, from hand-made pair records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from redundancy_monitor import PairRecord, Thresholds
from redundancy_monitor.probing.result import summarize


def rec(i, j, repl, inter, last=None):
    return PairRecord.build(i, j, repl, repl, inter, last=last)


def test_gap_and_ratio_follow_the_definitions():
    r = PairRecord.build(2, 3, 0.3, 0.1, 0.06)
    assert r.d_repl == 0.3 and r.repl_mean == pytest.approx(0.2)
    assert r.gap == pytest.approx(0.24) and r.ir == pytest.approx(0.2)


def test_ratio_is_null_not_inf_when_replacement_is_zero():
    r = rec(0, 1, 0.0, 0.02)
    assert r.ir is None and r.to_dict()["ir"] is None
    s = summarize([r, rec(1, 2, 0.1, 0.05)])
    assert s.ir_mean == pytest.approx(0.5)  # only the defined ratio counts


def test_summary_statistics_and_bands():
    pairs = [
        rec(0, 1, 0.2, 0.04),
        rec(1, 2, 0.08, 0.09),
        rec(2, 3, 0.03, 0.12),
        rec(0, 2, 0.5, 0.2),
    ]
    s = summarize(pairs)
    gaps = np.array([0.16, -0.01, -0.09, 0.3])
    assert s.gap_mean == pytest.approx(gaps.mean())
    assert s.gap_median == pytest.approx(np.median(gaps))
    assert s.gap_p75 == pytest.approx(np.percentile(gaps, 75))
    assert s.gap_max == pytest.approx(0.3)
    assert (s.repl_strong, s.repl_conditional, s.repl_not_similar) == (1, 1, 2)
    assert (s.int_strong, s.int_conditional, s.int_not_similar) == (1, 1, 2)
    assert s.frac_int_le_repl == pytest.approx(0.5)
    assert s.by_separation[1].n_pairs == 3 and s.by_separation[2].gap_max == pytest.approx(0.3)
    x, y = [0.2, 0.08, 0.03, 0.5], [0.04, 0.09, 0.12, 0.2]
    assert s.pearson == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert s.spearman == pytest.approx(np.corrcoef([2, 1, 0, 3], [0, 1, 2, 3])[0, 1])


@pytest.mark.parametrize(
    ("repl", "inter", "regime"),
    [
        ([0.4, 0.3, 0.5], [0.05, 0.06, 0.04], "divergent"),
        ([0.04, 0.03, 0.05], [0.03, 0.03, 0.04], "tied"),
        ([0.4, 0.3, 0.5], [0.2, 0.3, 0.15], "unreliable"),
        ([0.04, 0.03, 0.05], [0.01, 0.005, 0.01], "mixed"),
    ],
)
def test_regime(repl, inter, regime):
    pairs = [rec(k, k + 1, r, i) for k, (r, i) in enumerate(zip(repl, inter, strict=True))]
    assert summarize(pairs).regime == regime


def test_thresholds_are_parameters():
    pairs = [rec(0, 1, 0.04, 0.01), rec(1, 2, 0.03, 0.01)]
    assert summarize(pairs).regime == "mixed"
    assert summarize(pairs, Thresholds(regime_distance=0.02)).regime == "divergent"


def test_non_finite_pairs_are_counted_and_left_out():
    s = summarize([rec(0, 1, float("nan"), 0.1), rec(1, 2, 0.2, 0.1)])
    assert (s.n_pairs, s.n_finite, s.n_nonfinite) == (2, 1, 1)
    assert s.gap_mean == pytest.approx(0.1)
    json.dumps(s.to_dict(), allow_nan=False)
    assert all(v is None or math.isfinite(v) for v in s.scalars().values())
