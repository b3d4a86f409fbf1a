"""The paired change between two probes of one batch (docs/intervals.md, "Change"): the
vectorised paired bootstrap against a plain loop over replicates, exact point values,
zero width when nothing changed, coverage of a known change, JSON round trip, and the
change's sample-size advice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from redundancy_monitor.probing.change import (
    CHANGE_SCALARS,
    Change,
    ChangeReference,
    ProbeChange,
    change_sample_size_advice,
    change_table,
    paired_change,
)
from redundancy_monitor.probing.intervals import (
    IntervalConfig,
    from_per_sequence,
    quantile_levels,
)
from redundancy_monitor.probing.result import PairRecord, PerSequence, summarize

TABLES = ("repl_ij", "repl_ji", "d_int")


def two_probes(n_pairs=5, n=8, drift=0.02, seed=0):
    """Per-sequence tables at two steps of one batch: the same sequence effects (a hard
    sequence stays hard), the later one shifted by `drift` in replacement only."""
    rng = np.random.default_rng(seed)
    means = {k: rng.uniform(0.02, 0.3, n_pairs) for k in TABLES}
    effect = rng.gamma(4.0, 0.25, size=(1, n))
    noise = {k: rng.gamma(8.0, 1 / 8.0, (n_pairs, n)) for k in TABLES}
    small = {k: rng.normal(0, 0.003, (n_pairs, n)) for k in TABLES}
    pairs = tuple((k, k + 1) for k in range(n_pairs))
    early = {k: means[k][:, None] * effect * noise[k] for k in TABLES}
    late = {k: early[k] + small[k] + (drift * effect if k != "d_int" else 0.0) for k in TABLES}
    as_ps = lambda t: PerSequence(pairs, {k: tuple(map(tuple, v)) for k, v in t.items()})  # noqa: E731
    return as_ps(early), as_ps(late)


def reference_change(early: PerSequence, late: PerSequence, config: IntervalConfig):
    """The slow, obviously correct paired bootstrap: per replicate, draw sequence indices,
    rebuild both probes' pairs from the drawn columns by a plain loop, summarize each with
    `summarize`, subtract; then the same quantiles of the differences."""
    n = early.n_seq
    rng = np.random.default_rng(config.seed)
    draws = rng.integers(0, n, size=(config.n_boot, n))  # what resample_counts draws
    diffs = {name: [] for name in CHANGE_SCALARS}
    pair_diffs = {f: [] for f in ("d_repl", "d_int", "gap")}
    for idx in draws:
        summaries, pair_values = [], []
        for ps in (early, late):
            records = []
            for k, (i, j) in enumerate(ps.pairs):
                mean = {
                    name: float(np.mean([ps.tables[name][k][s] for s in idx])) for name in TABLES
                }
                records.append(
                    PairRecord.build(i, j, mean["repl_ij"], mean["repl_ji"], mean["d_int"])
                )
            summaries.append(summarize(records).scalars())
            pair_values.append(records)
        for name in CHANGE_SCALARS:
            diffs[name].append(summaries[1][name] - summaries[0][name])
        for f in pair_diffs:
            pair_diffs[f].append(
                [getattr(b, f) - getattr(a, f) for a, b in zip(*pair_values, strict=True)]
            )
    levels = quantile_levels(n, config.confidence, config.expanded)
    scal = {k: tuple(np.quantile(v, levels)) for k, v in diffs.items()}
    pairs = {f: np.quantile(np.asarray(v), levels, axis=0) for f, v in pair_diffs.items()}
    return scal, pairs


def test_paired_bootstrap_equals_a_plain_loop_over_replicates():
    early_ps, late_ps = two_probes(n_pairs=4, n=6)
    config = IntervalConfig(n_boot=60, seed=3)
    early, late = (
        from_per_sequence(early_ps, config=config),
        from_per_sequence(late_ps, config=config),
    )
    change = paired_change(early, late, step=10, config=config)
    scal, pairs = reference_change(early_ps, late_ps, config)
    for name in CHANGE_SCALARS:
        assert change.interval(name) == pytest.approx(scal[name], abs=1e-12), name
    for k, p in enumerate(change.pairs):
        for f in ("d_repl", "d_int", "gap"):
            assert p.interval(f) == pytest.approx((pairs[f][0][k], pairs[f][1][k]), abs=1e-12)


def test_point_change_is_exactly_later_minus_earlier():
    early_ps, late_ps = two_probes()
    early, late = from_per_sequence(early_ps), from_per_sequence(late_ps)
    change = paired_change(early, late, step=4)
    assert change.step == 4
    for name in CHANGE_SCALARS:
        assert change.value(name) == late.summary.scalars()[name] - early.summary.scalars()[name]
    for p in change.pairs:
        a, b = early.pair(p.i, p.j), late.pair(p.i, p.j)
        assert (p.gap, p.d_repl, p.d_int, p.ir) == (
            b.gap - a.gap,
            b.d_repl - a.d_repl,
            b.d_int - a.d_int,
            b.ir - a.ir,
        )


def test_no_change_gives_exactly_zero_with_a_zero_width_interval():
    early_ps, _ = two_probes()
    early, again = from_per_sequence(early_ps), from_per_sequence(early_ps)
    change = paired_change(early, again, step=0)
    for name in CHANGE_SCALARS:
        assert change.value(name) == 0.0 and change.interval(name) == (0.0, 0.0)
    assert all(p.interval("gap") == (0.0, 0.0) for p in change.pairs)


def test_the_paired_interval_is_much_narrower_than_the_level_and_covers_a_known_change():
    """Drift 0.02 nats in replacement: the interval of the mean gap's change is far
    narrower than the level's and covers the change measured on 256 other sequences."""
    hits, ratios = 0, []
    for seed in range(20):
        early_ps, late_ps = two_probes(n_pairs=5, n=8 + 256, drift=0.02, seed=seed)
        probe = lambda ps, cols: from_per_sequence(ps.subset(cols))  # noqa: E731
        small, big = range(8), range(8, 264)
        change = paired_change(probe(early_ps, small), probe(late_ps, small), step=0)
        truth = paired_change(
            probe(early_ps, big), probe(late_ps, big), step=0, config=False
        ).value("gap_mean")
        low, high = change.interval("gap_mean")
        hits += low <= truth <= high
        level_low, level_high = probe(late_ps, small).summary.interval("gap_mean")
        ratios.append((level_high - level_low) / (high - low))
    assert hits >= 17  # 95% intervals: 19 expected of 20, 17 leaves room for chance
    assert np.median(ratios) > 5


def test_change_round_trips_through_json_and_the_contract_keys_are_there():
    early_ps, late_ps = two_probes()
    change = paired_change(from_per_sequence(early_ps), from_per_sequence(late_ps), step=8)
    both = ProbeChange(change, change)
    data = json.loads(json.dumps(both.to_dict()))
    assert set(data) == {"baseline", "previous"}
    c = data["baseline"]
    assert c["step"] == 8
    for name in ("gap_mean", "gap_median", "d_repl_mean", "d_int_mean", "ir_median"):
        assert {name, f"{name}_low", f"{name}_high"} <= set(c)
    assert {"i", "j", "gap", "gap_low", "gap_high", "d_repl", "d_int", "ir"} <= set(c["pairs"][0])
    back = ProbeChange.from_dict(data)
    assert back.baseline.values == pytest.approx(change.values)
    assert back.baseline.interval("gap_median") == pytest.approx(change.interval("gap_median"))
    assert back.baseline.pairs == change.pairs
    assert "gap_median" in change_table(change)


def test_without_per_sequence_tables_the_change_has_point_values_and_says_why():
    early_ps, late_ps = two_probes()
    early = from_per_sequence(early_ps)
    late = from_per_sequence(late_ps)
    late.per_sequence = None
    change = paired_change(early, late, step=0)
    assert change.value("gap_mean") is not None and change.interval("gap_mean") == (None, None)
    assert "per-sequence" in change.skipped
    assert paired_change(early, early, step=0, config=False).skipped == "intervals are off"


def test_a_reference_caches_its_replicates_and_round_trips():
    early_ps, late_ps = two_probes()
    ref = ChangeReference.of(3, from_per_sequence(early_ps))
    config = IntervalConfig()
    assert ref.replicates(config, None) is ref.replicates(config, None)
    back = ChangeReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    late = from_per_sequence(late_ps)
    a = paired_change(ref.result, late, 3, earlier_replicates=ref.replicates(config, None))
    b = paired_change(back.result, late, 3, earlier_replicates=back.replicates(config, None))
    assert a.interval("gap_median") == b.interval("gap_median")


def test_change_sample_size_advice_names_the_change_and_extrapolates():
    early_ps, late_ps = two_probes(n=16)
    change = paired_change(from_per_sequence(early_ps), from_per_sequence(late_ps), step=2)
    advice = change_sample_size_advice(change, "gap_mean", target_halfwidth=1e-4)
    assert advice.of == "change" and advice.since == 2 and advice.n_seq == 16
    assert advice.n_seq_needed > 16
    assert "change of gap_mean since step 2" in advice.sentence()
    assert "paired interval" in advice.sentence()
    roomy = change_sample_size_advice(change, "gap_mean", target_halfwidth=10.0)
    assert roomy.n_seq_needed <= 16
    assert Change.from_dict(change.to_dict()).n_seq == 16
