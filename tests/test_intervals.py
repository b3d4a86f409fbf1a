"""Bootstrap intervals over sequences (docs/intervals.md): the vectorised per-replicate
summary against `summarize`, coverage of a known mean, determinism, zero width for a
constant, the 1/sqrt(n) sample-size extrapolation, and what `probe` keeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model

from redundancy_monitor import ProbeResult, probe
from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.probing.intervals import (
    REGIMES,
    IntervalConfig,
    from_per_sequence,
    predicted_halfwidth,
    quantile_levels,
    resample_counts,
    sample_size_advice,
    sequences_needed,
    summary_replicates,
    t_quantile,
)
from redundancy_monitor.probing.result import (
    PairRecord,
    PerSequence,
    Thresholds,
    regime_of,
    summarize,
)

TABLES = ("repl_ij", "repl_ji", "d_int")


def synthetic(means: dict[str, np.ndarray], n: int, rng, shape: float = 4.0) -> PerSequence:
    """Per-sequence distances with known means: mean x (sequence effect x noise), both
    gamma with mean 1, so sequences are correlated across pairs as real text makes them."""
    n_pairs = len(means["d_int"])
    effect = rng.gamma(shape, 1 / shape, size=(1, n))
    tables = {
        k: tuple(map(tuple, m[:, None] * effect * rng.gamma(shape, 1 / shape, (n_pairs, n))))
        for k, m in means.items()
    }
    return PerSequence(tuple((k, k + 1) for k in range(n_pairs)), tables)


def known_means(n_pairs: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(0.02, 0.4, n_pairs) for k in TABLES}


def truth_of(means: dict[str, np.ndarray]) -> list[PairRecord]:
    return [
        PairRecord.build(k, k + 1, means["repl_ij"][k], means["repl_ji"][k], means["d_int"][k])
        for k in range(len(means["d_int"]))
    ]


# ----- the vectorised summary is `summarize`, replicate by replicate ----------------------


def replicate_records(d_repl_ij, d_repl_ji, d_int, separations) -> list[PairRecord]:
    return [
        PairRecord.build(0, int(d), a, b, c)
        for a, b, c, d in zip(d_repl_ij, d_repl_ji, d_int, separations, strict=True)
    ]


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_summary_equals_summarize_on_every_replicate(seed):
    rng = np.random.default_rng(seed)
    n_boot, n_pairs = 40, 9
    repl_ij = rng.uniform(0, 0.3, (n_boot, n_pairs))
    repl_ji = rng.uniform(0, 0.3, (n_boot, n_pairs))
    d_int = rng.uniform(0, 0.3, (n_boot, n_pairs))
    repl_ij[:3, 0] = repl_ji[:3, 0] = 0.0  # d_repl = 0: ir undefined there
    d_int[5:8, 2] = d_int[5:8, 3]  # ties for Spearman's average ranks
    repl_ij[5:8, 2] = repl_ji[5:8, 2] = repl_ij[5:8, 3] = repl_ji[5:8, 3]
    separations = np.array([1, 1, 1, 2, 2, 3, 1, 2, 1])
    thresholds = Thresholds(regime_distance=0.12)
    d_repl = np.maximum(repl_ij, repl_ji)
    reps, codes = summary_replicates(d_repl, d_int, separations, thresholds, n_nonfinite=2)
    for b in range(n_boot):
        records = replicate_records(repl_ij[b], repl_ji[b], d_int[b], separations)
        want = summarize(records, thresholds).scalars()
        want["n_pairs"] += 2
        want["n_nonfinite"] += 2
        assert sorted(reps) == sorted(want)
        for name, value in want.items():
            got = reps[name][b]
            if value is None:
                assert math.isnan(got), name
            else:
                assert got == pytest.approx(value, rel=1e-12, abs=1e-14), name
        assert REGIMES[codes[b]] == summarize(records, thresholds).regime


def test_vectorised_regime_matches_regime_of_on_every_branch():
    t = Thresholds()
    cases = [(0.4, 0.2, 0.02), (0.7, 0.05, 0.02), (0.4, 0.2, 0.2), (0.7, 0.2, 0.02)]
    cases += [(math.nan, 0.2, 0.02), (0.4, math.nan, 0.2), (0.5, 0.1, 0.0999)]
    ir, repl, inter = (np.array(c, dtype=float) for c in zip(*cases, strict=True))
    reps, _ = summary_replicates(None, None, np.array([], dtype=int), t)  # no pairs at all
    for name, value in summarize([], t).scalars().items():
        assert math.isnan(reps[name][0]) if value is None else reps[name][0] == value, name
    from redundancy_monitor.probing.intervals import regime_codes

    got = [REGIMES[c] for c in regime_codes(ir, repl, inter, t)]
    want = [
        regime_of(None if math.isnan(a) else a, None if math.isnan(b) else b, c, t)
        for a, b, c in cases
    ]
    assert got == want


def test_one_protocol_only_gives_the_scalars_summarize_gives():
    rng = np.random.default_rng(3)
    d_int = rng.uniform(0, 0.3, (5, 4))
    separations = np.array([1, 1, 2, 3])
    reps, _ = summary_replicates(None, d_int, separations, Thresholds())
    for b in range(5):
        records = [
            PairRecord.build(0, int(d), None, None, x)
            for x, d in zip(d_int[b], separations, strict=True)
        ]
        for name, value in summarize(records).scalars().items():
            assert (
                math.isnan(reps[name][b])
                if value is None
                else reps[name][b] == pytest.approx(value)
            )


# ----- coverage, determinism, constants ----------------------------------------------------


def test_intervals_cover_a_known_mean_about_95_percent_of_the_time():
    means = known_means(n_pairs=7)
    truth = truth_of(means)
    truth_summary = summarize(truth).scalars()
    rng = np.random.default_rng(11)
    hits: dict[str, list[bool]] = {}
    for trial in range(150):
        result = from_per_sequence(synthetic(means, 16, rng), config=IntervalConfig(seed=trial))
        for got, want in zip(result.pairs, truth, strict=True):
            for name in ("d_int", "d_repl", "gap", "ir"):
                low, high = got.interval(name)
                hits.setdefault(f"pair {name}", []).append(low <= getattr(want, name) <= high)
        for name in ("d_int_mean", "d_repl_mean", "gap_mean"):
            low, high = result.summary.interval(name)
            hits.setdefault(name, []).append(low <= truth_summary[name] <= high)
    coverage = {k: float(np.mean(v)) for k, v in hits.items()}
    # A 95% interval of a mean: 0.90..0.99 allows for the skewed data and 150-1050 trials.
    assert all(0.90 <= c <= 0.99 for c in coverage.values()), coverage


def test_expansion_widens_the_small_sample_interval_toward_student_t():
    low, high = quantile_levels(8, 0.95, expanded=True)
    assert (low, high) == pytest.approx((1 - high, high))
    assert low < 0.025  # wider than the plain percentile interval
    assert quantile_levels(8, 0.95, expanded=False) == pytest.approx((0.025, 0.975))
    # For large n the expansion vanishes: sqrt(n/(n-1)) t_{n-1} -> z.
    assert quantile_levels(100_000, 0.95)[0] == pytest.approx(0.025, rel=1e-3)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 8, 15, 31, 63, 199, 201, 1000, 100_000):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-6)


def test_bootstrap_is_deterministic_under_a_seed_and_moves_with_it():
    per_seq = synthetic(known_means(6), 12, np.random.default_rng(0))
    a = from_per_sequence(per_seq, config=IntervalConfig(seed=5))
    b = from_per_sequence(per_seq, config=IntervalConfig(seed=5))
    c = from_per_sequence(per_seq, config=IntervalConfig(seed=6))
    assert a.pairs == b.pairs and a.summary == b.summary
    assert a.summary.intervals != c.summary.intervals
    assert np.array_equal(resample_counts(12, 50, 5), resample_counts(12, 50, 5))
    assert resample_counts(12, 50, 5).sum(axis=1).tolist() == [12.0] * 50


def test_intervals_of_a_constant_are_zero_width():
    rng = np.random.default_rng(2)
    values = {k: rng.uniform(0.01, 0.3, 5) for k in TABLES}
    per_seq = PerSequence(
        tuple((k, k + 1) for k in range(5)),
        {k: tuple((float(v),) * 9 for v in values[k]) for k in TABLES},
    )
    result = from_per_sequence(per_seq)
    for r in result.pairs:
        for name in PairRecord.INTERVAL_FIELDS:
            low, high = r.interval(name)
            assert low == high == pytest.approx(getattr(r, name), rel=1e-12)
    for name, (low, high) in result.summary.intervals.items():
        assert low == high, name
    assert result.summary.regime_stability == 1.0 and not result.summary.regime_uncertain


def test_an_unstable_regime_is_reported_uncertain():
    # Every pair's d_repl is 0.10 on average, the divergent/mixed boundary, with
    # symmetric per-sequence noise: resampling lands on either side about half the time.
    noise = np.array([0.04, -0.04, 0.02, -0.02, 0.03, -0.03, 0.01, -0.01])
    rows = [tuple(0.1 + np.roll(noise, k)) for k in range(5)]
    per_seq = PerSequence(
        tuple((k, k + 1) for k in range(5)),
        {"repl_ij": tuple(rows), "repl_ji": ((0.05,) * 8,) * 5, "d_int": ((0.03,) * 8,) * 5},
    )
    result = from_per_sequence(per_seq)
    s = result.summary
    assert 0.3 < s.regime_stability < 0.7 and s.regime_uncertain
    assert "uncertain" in s.regime_text() and s.to_dict()["regime_uncertain"] is True
    assert "uncertain" in result.to_table()


def test_a_rank_correlation_that_never_changes_has_its_point_inside_its_interval():
    # Replacement and interchange order the 5 pairs alike in every replicate, so the
    # Spearman rho is the same in each: the interval must hold the point estimate exactly
    # (np.corrcoef's 0.9999999999999999 against replicates' 1.0 once missed it).
    rng = np.random.default_rng(8)
    level = np.array([0.3, 0.1, 0.03, 0.01, 0.003])[:, None]
    tables = {k: tuple(map(tuple, level * rng.uniform(0.9, 1.1, (5, 8)))) for k in TABLES}
    result = from_per_sequence(PerSequence(tuple((k, k + 1) for k in range(5)), tables))
    low, high = result.summary.interval("spearman")
    assert low <= result.summary.spearman <= high and low == high


def test_a_single_sequence_gets_no_interval_and_says_why():
    ids, _ = tiny_batch(n_seq=1)
    result = probe(tiny_model("llama", 3), ids)
    assert result.summary.interval("gap_median") == (None, None)
    assert result.pairs[0].interval("gap") == (None, None)
    assert "at least 2 sequences" in result.meta.intervals["skipped"]
    assert sample_size_advice(result).halfwidth is None


def test_a_non_finite_pair_gets_no_interval_and_stays_out_of_the_summary():
    per_seq = synthetic(known_means(4), 6, np.random.default_rng(3))
    tables = dict(per_seq.tables)
    tables["d_int"] = ((*tables["d_int"][0][:-1], math.inf), *tables["d_int"][1:])
    result = from_per_sequence(PerSequence(per_seq.pairs, tables))
    bad, *good = result.pairs
    assert not bad.is_finite() and bad.interval("gap") == (None, None)
    assert all(r.interval("gap")[0] is not None for r in good)
    assert result.summary.n_nonfinite == 1
    low, high = result.summary.interval("gap_mean")
    finite_only = from_per_sequence(
        PerSequence(per_seq.pairs[1:], {k: v[1:] for k, v in per_seq.tables.items()})
    )
    assert (low, high) == pytest.approx(finite_only.summary.interval("gap_mean"))


def test_an_end_needs_half_of_the_replicates_defined():
    from redundancy_monitor.probing.intervals import bounds

    reps = np.tile(np.arange(10.0), (2, 1)).T  # two columns, 10 replicates
    reps[:6, 0] = np.nan  # first column: only 4 of 10 replicates defined
    low, high = bounds(reps, (0.0, 1.0))
    assert math.isnan(low[0]) and math.isnan(high[0])
    assert (low[1], high[1]) == (0.0, 9.0)


def test_summary_interval_names_and_errors():
    result = from_per_sequence(synthetic(known_means(4), 6, np.random.default_rng(1)))
    s = result.summary
    low, high = s.interval("d1/gap_mean")
    assert low <= s.by_separation[1].gap_mean <= high
    data = s.to_dict()
    assert data["gap_median_low"] == s.interval("gap_median")[0]
    assert data["by_separation"]["1"]["gap_mean_high"] == high
    with pytest.raises(KeyError, match="not a summary scalar"):
        s.interval("gap_medain")
    with pytest.raises(InvalidConfigError, match="n_boot"):
        IntervalConfig(n_boot=5)
    bare = from_per_sequence(result.per_sequence, intervals=False)
    assert bare.summary.interval("gap_median") == (None, None)
    assert bare.pairs[0].interval("gap") == (None, None)


def test_the_bootstrap_never_runs_the_reference_summary_per_replicate():
    # Not a timing assertion: it guards the vectorised path (1000 replicates x 30 pairs
    # in milliseconds) against a per-replicate Python loop over `summarize`.
    import redundancy_monitor.probing.intervals as intervals

    calls = []
    original = intervals.summarize
    intervals.summarize = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        from_per_sequence(synthetic(known_means(30), 32, np.random.default_rng(0)))
    finally:
        intervals.summarize = original
    assert len(calls) == 1  # the point estimate only


# ----- sample size -------------------------------------------------------------------------


def halfwidth(per_seq: PerSequence, metric: str, seed: int = 0) -> float:
    low, high = from_per_sequence(per_seq, config=IntervalConfig(seed=seed)).summary.interval(
        metric
    )
    return (high - low) / 2


def test_halfwidth_extrapolates_as_one_over_sqrt_n():
    """Predict the half-width at 64 sequences from the first 16, measure it on all 64."""
    means = known_means(8, seed=3)
    ratios = {"gap_mean": [], "d_int_mean": []}
    for trial in range(40):
        full = synthetic(means, 64, np.random.default_rng(100 + trial))
        for metric, found in ratios.items():
            at_16 = halfwidth(full.subset(range(16)), metric, trial)
            found.append(predicted_halfwidth(at_16, 16, 64) / halfwidth(full, metric, trial))
    for metric, found in ratios.items():
        # One prediction is off by the noise of a 16-sequence spread (~20%); their median
        # is within 10% of the measurement.
        assert 0.9 <= float(np.median(found)) <= 1.1, (metric, np.median(found))


def test_sequences_needed_is_the_fewest_that_reach_the_target():
    n = sequences_needed(0.05, 8, 0.02)
    assert predicted_halfwidth(0.05, 8, n) <= 0.02 < predicted_halfwidth(0.05, 8, n - 1)
    assert sequences_needed(0.01, 8, 0.02) < 8  # already precise enough: fewer would do
    assert sequences_needed(0.0, 8, 0.02) == 2


def test_sample_size_advice_reads_the_interval_of_the_metric():
    result = from_per_sequence(synthetic(known_means(6), 8, np.random.default_rng(9)))
    advice = sample_size_advice(result, "gap_median", target_halfwidth=0.005)
    low, high = result.summary.interval("gap_median")
    assert advice.halfwidth == pytest.approx((high - low) / 2) and advice.n_seq == 8
    assert advice.n_seq_needed == sequences_needed(advice.halfwidth, 8, 0.005)
    assert f"n_seq={advice.n_seq_needed}" in advice.sentence()
    json.dumps(advice.to_dict(), allow_nan=False)
    bare = from_per_sequence(result.per_sequence, intervals=False)
    assert sample_size_advice(bare).halfwidth is None


# ----- what probe() keeps ------------------------------------------------------------------


def test_probe_keeps_per_sequence_distances_whose_mean_is_each_distance():
    ids, mask = tiny_batch(n_seq=5, padding="right")
    result = probe(tiny_model("llama", 4), ids, mask, pairs="all")
    per_seq = result.per_sequence
    assert per_seq.n_seq == 5 and list(per_seq.pairs) == [(r.i, r.j) for r in result.pairs]
    for k, r in enumerate(result.pairs):
        assert np.mean(per_seq.tables["repl_ij"][k]) == pytest.approx(r.repl_ij, rel=1e-12)
        assert np.mean(per_seq.tables["repl_ji"][k]) == pytest.approx(r.repl_ji, rel=1e-12)
        assert np.mean(per_seq.tables["d_int"][k]) == pytest.approx(r.d_int, rel=1e-12)
        for name in PairRecord.INTERVAL_FIELDS:
            low, high = r.interval(name)
            assert low is not None and low <= high
    assert result.meta.intervals["n_boot"] == 1000 and result.meta.intervals["n_seq"] == 5
    assert set(result.summary.intervals) == {
        k for k, v in result.summary.scalars().items() if v is not None
    }
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert len(data["per_sequence"]["d_int"]) == len(result.pairs)
    again = ProbeResult.from_dict(data)
    assert again.per_sequence == per_seq and again.summary == result.summary


def test_probe_without_intervals_skips_the_bootstrap_but_keeps_per_sequence_values():
    ids, _ = tiny_batch(n_seq=4)
    result = probe(tiny_model("gpt_neox", 3), ids, intervals=False)
    assert result.summary.intervals == {} and result.summary.regime_stability is None
    assert result.meta.intervals is None and result.per_sequence.n_seq == 4


def test_the_bootstrap_leaves_global_rng_state_untouched():
    ids, _ = tiny_batch(n_seq=4)
    model = tiny_model("llama", 3)
    np.random.seed(7)
    torch.manual_seed(7)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    probe(model, ids)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
