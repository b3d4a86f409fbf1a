"""Bootstrap intervals over the probe batch's sequences (docs/intervals.md).

A probe batch is a sample of text, so every distance is an estimate. D(V) is a mean over
sequences (docs/definitions.md §2), so resampling whole sequences with replacement,
jointly for every pair (which keeps the correlation between pairs), gives a replicate of
every pair's distances; the docs/definitions.md §4 summary computed on each replicate
gives replicates of every summary scalar and of the regime. Only the per-sequence numbers
the engine already has are resampled, with numpy, vectorised over replicates: no model
runs again.

The interval is the *expanded* percentile interval (Hesterberg 2015, "What teachers
should know about the bootstrap", §4.2): the percentile interval taken at the level
whose normal quantile is ``sqrt(n/(n-1)) * t_{n-1}``, so that for a mean it is as wide as
the Student-t interval. The plain percentile interval is too narrow with the 8-32
sequences of a probe batch (its coverage of a mean is about 89% at n = 8).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.probing.result import (
    GapStats,
    PairRecord,
    PerSequence,
    ProbeMeta,
    ProbeResult,
    Thresholds,
    _ranks,
    pearson_rows,
    summarize,
)

METHOD = "bootstrap over sequences, expanded percentile"
REGIMES = (None, "unreliable", "divergent", "tied", "mixed")  # index = regime code


@dataclass(frozen=True)
class IntervalConfig:
    """How `probe` computes intervals.

    Args:
        n_boot: bootstrap replicates (with 1000 the interval ends vary by 1-4% of the
            width from one seed to another).
        confidence: coverage the interval aims at.
        seed: the resampling seed; the same seed and batch give the same intervals.
        expanded: widen the percentile interval for small n (see the module doc); False
            gives the plain percentile interval.
        target_halfwidth: the half-width (nats) the sample-size advice of a level aims at.
        target_change_halfwidth: the half-width (nats) the sample-size advice of a change
            (between two probes of one batch, docs/intervals.md) aims at.
    """

    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0
    expanded: bool = True
    target_halfwidth: float = 0.02
    target_change_halfwidth: float = 0.005

    def __post_init__(self):
        if not isinstance(self.n_boot, int) or self.n_boot < 20:
            raise InvalidConfigError(f"n_boot must be an int >= 20, got {self.n_boot!r}")
        if not 0 < self.confidence < 1:
            raise InvalidConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        for name in ("target_halfwidth", "target_change_halfwidth"):
            if not getattr(self, name) > 0:
                raise InvalidConfigError(f"{name} must be > 0 nats, got {getattr(self, name)}")

    @classmethod
    def of(cls, intervals: bool | IntervalConfig | None) -> IntervalConfig | None:
        """The config for a ``probe(intervals=...)`` argument (None: no intervals)."""
        if intervals is None or intervals is False:
            return None
        if intervals is True:
            return cls()
        if isinstance(intervals, cls):
            return intervals
        raise InvalidConfigError(
            f"intervals must be True, False or an IntervalConfig, got {type(intervals).__name__}"
        )


# ----- Student t, for the expansion and the sample-size extrapolation ---------------------


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(2, df, 2):  # 1 + (1/2)c^2 + (1.3)/(2.4)c^4 + ...
            term *= c2 * (k - 1) / k
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(3, df, 2):  # cos + (2/3)cos^3 + (2.4)/(3.5)cos^5 + ...
        term *= c2 * (k - 1) / k
        total += term
    return 2 / math.pi * (theta + s * total)


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (p > 0.5) of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise InvalidConfigError(f"t quantile needs df >= 1, got {df}")
    z = NormalDist().inv_cdf(p)
    if df > 200:  # Cornish-Fisher: error below 1e-7 here, and the series would be long
        return (
            z
            + (z**3 + z) / (4 * df)
            + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        )
    target = 2 * p - 1
    low, high = 0.0, max(1.0, z)
    while _t_two_sided(high, df) < target:
        low, high = high, 2 * high
    for _ in range(100):
        mid = (low + high) / 2
        if _t_two_sided(mid, df) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def quantile_levels(n: int, confidence: float, expanded: bool = True) -> tuple[float, float]:
    """The replicate quantiles that bound the interval from `n` sequences."""
    alpha = 1 - confidence
    if not expanded or n < 2:
        return alpha / 2, 1 - alpha / 2
    z = math.sqrt(n / (n - 1)) * t_quantile(1 - alpha / 2, n - 1)
    tail = NormalDist().cdf(-z)
    return tail, 1 - tail


# ----- resampling ----------------------------------------------------------------------


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]``: how often each sequence is drawn in each replicate (rows sum to n).

    A local generator: the global numpy and torch RNG states are not touched.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    flat = (draws + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def replicate_means(table: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[n_boot, rows]``: each row's mean over the resampled sequences.

    Shifted by each row's first value, so a row whose values are all equal gives exactly
    that value in every replicate (a zero-width interval, not float noise).
    """
    shift = table[:, :1]
    return shift.T + counts @ (table - shift).T / table.shape[1]


def pair_replicates(
    repl_ij: np.ndarray | None, repl_ji: np.ndarray | None, d_int: np.ndarray | None
) -> dict[str, np.ndarray | None]:
    """d_repl, d_int, gap and ir (docs/definitions.md §2) per replicate and pair, from the
    replicate means of the three measured tables (each ``[n_boot, pairs]`` or None)."""
    d_repl = None if repl_ij is None or repl_ji is None else np.maximum(repl_ij, repl_ji)
    gap = ir = None
    if d_repl is not None and d_int is not None:
        gap = d_repl - d_int
        ir = np.divide(d_int, d_repl, out=np.full_like(d_int, np.nan), where=d_repl != 0)
    return {"d_repl": d_repl, "d_int": d_int, "gap": gap, "ir": ir}


# ----- the summary of many replicates at once (docs/definitions.md §4) ---------------------


def _percentile_sorted(s: np.ndarray, k: np.ndarray, q: float) -> np.ndarray:
    """Linear-interpolated q-quantile of each row of `s` (sorted, NaN last; k finite)."""
    pos = q * np.maximum(k - 1, 0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(k - 1, 0))
    rows = np.arange(s.shape[0])
    a, b = s[rows, lo], s[rows, hi]
    out = a + (b - a) * (pos - lo)
    return np.where(k > 0, out, np.nan)


def _row_stats(v: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean, median, p75 and max of each row, ignoring NaN (an undefined ir)."""
    b = v.shape[0]
    if v.shape[1] == 0:
        empty = np.full(b, np.nan)
        return empty, empty, empty, empty
    s = np.sort(v, axis=1)
    k = np.isfinite(v).sum(axis=1)
    mean = np.divide(np.nansum(v, axis=1), k, out=np.full(b, np.nan), where=k > 0)
    top = np.where(k > 0, s[np.arange(b), np.maximum(k - 1, 0)], np.nan)
    return mean, _percentile_sorted(s, k, 0.5), _percentile_sorted(s, k, 0.75), top


def _rank_rows(x: np.ndarray) -> np.ndarray:
    """Average ranks of each row; rows with ties go through the reference `_ranks`."""
    b, p = x.shape
    order = np.argsort(x, axis=1, kind="mergesort")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(p, dtype=np.float64), (b, p)), 1)
    tied = (np.diff(np.take_along_axis(x, order, axis=1), axis=1) == 0).any(axis=1)
    for row in np.flatnonzero(tied):
        ranks[row] = _ranks(x[row])
    return ranks


def regime_codes(ir_median, d_repl_median, d_int_median, t: Thresholds) -> np.ndarray:
    """`regime_of` for arrays of medians, as indices into `REGIMES`."""
    b = len(ir_median)
    codes = np.full(b, REGIMES.index("mixed"))
    codes[np.isnan(ir_median) | np.isnan(d_repl_median)] = REGIMES.index(None)
    defined = ~(np.isnan(ir_median) | np.isnan(d_repl_median))
    with np.errstate(invalid="ignore"):
        divergent = defined & (ir_median <= t.regime_ir) & (d_repl_median >= t.regime_distance)
        tied = defined & (ir_median > t.regime_ir) & (d_repl_median < t.regime_distance)
        unreliable = d_int_median >= t.regime_distance
    codes[divergent] = REGIMES.index("divergent")
    codes[tied] = REGIMES.index("tied")
    codes[unreliable] = REGIMES.index("unreliable")
    return codes


def summary_replicates(
    d_repl: np.ndarray | None,
    d_int: np.ndarray | None,
    separations: np.ndarray,
    thresholds: Thresholds,
    n_nonfinite: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The docs/definitions.md §4 summary of every replicate at once.

    Args:
        d_repl, d_int: ``[n_boot, pairs]`` over the finite pairs (None: not measured).
        separations: ``[pairs]`` each pair's separation |i-j|.
        thresholds: similarity bands and regime thresholds.
        n_nonfinite: pairs left out because a distance was not finite.

    Returns:
        ``name -> [n_boot]`` for every key of `ProbeSummary.scalars()` (NaN where
        undefined), and the regime codes (indices into `REGIMES`). Row by row this
        equals `summarize` on the same pairs (tests check it).
    """
    some = d_repl if d_repl is not None else d_int
    b, p = some.shape if some is not None else (1, 0)
    nan = np.full(b, np.nan)
    gap = d_repl - d_int if d_repl is not None and d_int is not None else np.empty((b, 0))
    ir = (
        np.divide(d_int, d_repl, out=np.full_like(d_int, np.nan), where=d_repl != 0)
        if d_repl is not None and d_int is not None and gap.shape[1]
        else np.empty((b, 0))
    )
    out: dict[str, np.ndarray] = {
        "n_pairs": np.full(b, float(p + n_nonfinite)),
        "n_finite": np.full(b, float(p)),
        "n_nonfinite": np.full(b, float(n_nonfinite)),
    }
    out["gap_mean"], out["gap_median"], out["gap_p75"], out["gap_max"] = _row_stats(gap)
    out["ir_mean"], out["ir_median"], _, _ = _row_stats(ir)
    for name, values in (("d_repl", d_repl), ("d_int", d_int)):
        mean, median = _row_stats(values)[:2] if values is not None else (nan, nan)
        out[f"{name}_mean"], out[f"{name}_median"] = mean, median
    # gap has columns only when both were measured; the `is not None` tests narrow types
    both = d_repl is not None and d_int is not None and gap.shape[1] > 0
    out["pearson"] = (
        pearson_rows(d_repl, d_int) if both and d_repl is not None and d_int is not None else nan
    )
    out["spearman"] = (
        pearson_rows(_rank_rows(d_repl), _rank_rows(d_int))
        if both and d_repl is not None and d_int is not None and p >= 2
        else nan
    )
    for prefix, values in (("repl", d_repl), ("int", d_int)):
        v = values if values is not None else np.empty((b, 0))
        strong = (v < thresholds.strong).sum(axis=1)
        conditional = ((v >= thresholds.strong) & (v < thresholds.conditional)).sum(axis=1)
        out[f"{prefix}_strong"] = strong.astype(np.float64)
        out[f"{prefix}_conditional"] = conditional.astype(np.float64)
        out[f"{prefix}_not_similar"] = (v.shape[1] - strong - conditional).astype(np.float64)
    out["frac_int_le_repl"] = (
        (d_int <= d_repl).mean(axis=1) if both and d_repl is not None and d_int is not None else nan
    )
    for d in sorted(set(separations.tolist())):
        cols = separations == d
        g, r = (gap[:, cols], ir[:, cols]) if both else (np.empty((b, 0)),) * 2
        stats = dict(
            zip(("gap_mean", "gap_median", "gap_p75", "gap_max"), _row_stats(g), strict=True)
        )
        stats["ir_mean"], stats["ir_median"] = _row_stats(r)[:2]
        stats["n_pairs"] = np.full(b, float(cols.sum()))
        for f in dataclasses.fields(GapStats):
            out[f"d{d}/{f.name}"] = stats[f.name]
    codes = regime_codes(out["ir_median"], out["d_repl_median"], out["d_int_median"], thresholds)
    return out, codes


# ----- intervals from replicates --------------------------------------------------------


def bounds(replicates: np.ndarray, levels: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles `levels` of each column of ``[n_boot, k]`` replicates, over the finite
    values; NaN for a column where fewer than half of the replicates are defined."""
    b = replicates.shape[0]
    s = np.sort(replicates, axis=0).T  # [k, n_boot], NaN last
    k = np.isfinite(replicates).sum(axis=0)
    low, high = (_percentile_sorted(s, k, q) for q in levels)
    enough = k >= b / 2
    return np.where(enough, low, np.nan), np.where(enough, high, np.nan)


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class Replicates:
    """The bootstrap replicates of one probe: what its intervals, and the paired change
    between two probes of the same batch (`redundancy_monitor.probing.change`), come from.

    Attributes:
        finite: the finite pairs that were resampled, in row order.
        pairs: ``name -> [n_boot, len(finite)]`` for d_repl, d_int, gap and ir (None
            where the protocol did not run).
        summary: ``name -> [n_boot]`` for every docs/definitions.md §4 scalar.
        regime_codes: ``[n_boot]`` indices into `REGIMES`.
        n_seq, levels: the sequences resampled and the quantile levels of the interval.
    """

    finite: list[PairRecord]
    pairs: dict[str, np.ndarray | None]
    summary: dict[str, np.ndarray]
    regime_codes: np.ndarray
    n_seq: int
    levels: tuple[float, float]

    def column(self, i: int, j: int) -> int | None:
        """The column of pair (i, j) in `pairs`, None when it was not resampled."""
        for k, r in enumerate(self.finite):
            if (r.i, r.j) == (i, j):
                return k
        return None


def bootstrap_replicates(
    result: ProbeResult, config: IntervalConfig | None = None, thresholds: Thresholds | None = None
) -> Replicates | None:
    """Resample `result`'s sequences (the draw is fixed by `config`'s seed, `n_boot` and
    the number of sequences, so two probes of one batch get the same draw); None without
    the per-sequence distances of at least 2 sequences."""
    config = config or IntervalConfig()
    thresholds = thresholds or result.meta.thresholds or Thresholds()
    per_seq = result.per_sequence
    if per_seq is None or per_seq.n_seq < 2:
        return None
    n = per_seq.n_seq
    row_of = {pair: k for k, pair in enumerate(per_seq.pairs)}
    finite = [r for r in result.pairs if r.is_finite() and (r.i, r.j) in row_of]
    rows = [row_of[(r.i, r.j)] for r in finite]
    counts = resample_counts(n, config.n_boot, config.seed)
    means = {}
    for name in PerSequence.TABLES:
        table = per_seq.table(name)
        means[name] = None if table is None else replicate_means(table[rows], counts)
    per_pair = pair_replicates(means["repl_ij"], means["repl_ji"], means["d_int"])
    separations = np.asarray([r.separation for r in finite], dtype=np.int64)
    reps, codes = summary_replicates(
        per_pair["d_repl"],
        per_pair["d_int"],
        separations,
        thresholds,
        n_nonfinite=len(result.pairs) - len(finite),
    )
    levels = quantile_levels(n, config.confidence, config.expanded)
    return Replicates(finite, per_pair, reps, codes, n, levels)


def add_intervals(
    result: ProbeResult, config: IntervalConfig | None = None, thresholds: Thresholds | None = None
) -> ProbeResult:
    """`result` with bootstrap intervals on its pairs and summary and the regime's stability.

    Needs `result.per_sequence` with at least 2 sequences; otherwise the result comes back
    without intervals and ``meta["intervals"]["skipped"]`` says why.
    """
    config = config or IntervalConfig()
    thresholds = thresholds or result.meta.thresholds or Thresholds()
    info: dict[str, Any] = {
        "method": METHOD,
        "n_boot": config.n_boot,
        "confidence": config.confidence,
        "seed": config.seed,
        "expanded": config.expanded,
    }
    per_seq = result.per_sequence
    if per_seq is None or per_seq.n_seq < 2:
        info["skipped"] = "needs the per-sequence distances of at least 2 sequences"
        return dataclasses.replace(result, meta=dataclasses.replace(result.meta, intervals=info))
    n = per_seq.n_seq
    levels = quantile_levels(n, config.confidence, config.expanded)
    info["n_seq"], info["levels"] = n, [float(levels[0]), float(levels[1])]
    boot = bootstrap_replicates(result, config, thresholds)
    assert boot is not None  # per_seq checked above
    pairs = _pairs_with_intervals(result.pairs, boot.finite, boot.pairs, levels)
    reps, codes = boot.summary, boot.regime_codes
    scalars = result.summary.scalars()
    names = [k for k, v in scalars.items() if v is not None and k in reps]
    low, high = bounds(np.stack([reps[k] for k in names], axis=1), levels)
    intervals = {k: (_num(lo), _num(hi)) for k, lo, hi in zip(names, low, high, strict=True)}
    stability = None
    if result.summary.regime is not None:
        stability = float(np.mean(codes == REGIMES.index(result.summary.regime)))
    summary = dataclasses.replace(result.summary, intervals=intervals, regime_stability=stability)
    return dataclasses.replace(
        result,
        pairs=pairs,
        summary=summary,
        meta=dataclasses.replace(result.meta, intervals=info),
    )


def _pairs_with_intervals(all_pairs, finite, per_pair, levels) -> list[PairRecord]:
    found: dict[tuple[int, int], dict[str, float | None]] = {}
    for name in PairRecord.INTERVAL_FIELDS:
        reps = per_pair[name]
        if reps is None:
            continue
        low, high = bounds(reps, levels)
        for k, r in enumerate(finite):
            if getattr(r, name) is None:
                continue
            found.setdefault((r.i, r.j), {})[f"{name}_low"] = _num(low[k])
            found[(r.i, r.j)][f"{name}_high"] = _num(high[k])
    return [dataclasses.replace(r, **found.get((r.i, r.j), {})) for r in all_pairs]


def from_per_sequence(
    per_seq: PerSequence,
    thresholds: Thresholds | None = None,
    config: IntervalConfig | None = None,
    intervals: bool = True,
) -> ProbeResult:
    """The result a probe of these sequences gives (pairs, summary, intervals), built from
    per-sequence distances alone: for synthetic data, and for subsets of a batch."""
    thresholds = thresholds or Thresholds()
    records = []
    for k, (i, j) in enumerate(per_seq.pairs):
        mean = {
            name: (float(np.mean(per_seq.tables[name][k])) if name in per_seq.tables else None)
            for name in PerSequence.TABLES
        }
        records.append(PairRecord.build(i, j, mean["repl_ij"], mean["repl_ji"], mean["d_int"]))
    meta = ProbeMeta(
        n_layers=max((j for _, j in per_seq.pairs), default=0) + 1,
        n_seq=per_seq.n_seq,
        thresholds=thresholds,
    )
    result = ProbeResult(records, summarize(records, thresholds), meta=meta, per_sequence=per_seq)
    return add_intervals(result, config, thresholds) if intervals else result


# ----- how many sequences ---------------------------------------------------------------


@dataclass(frozen=True)
class SampleSizeAdvice:
    """How precise one summary scalar is at this batch size, and what would reach a target.

    The half-width at n' sequences is extrapolated from the one measured at n as
    ``halfwidth * sqrt(n / n') * t(n'-1) / t(n-1)`` (the 1/sqrt(n) law of a mean with the
    small-sample t factor the expanded interval carries).
    """

    metric: str
    n_seq: int
    value: float | None
    low: float | None
    high: float | None
    halfwidth: float | None
    target_halfwidth: float
    n_seq_needed: int | None
    confidence: float
    of: str = "level"
    since: int | None = None

    @property
    def what(self) -> str:
        """``gap_median``, or ``change of gap_median since step 0`` for a change."""
        if self.of == "change":
            return f"change of {self.metric} since step {self.since}"
        return self.metric

    def sentence(self) -> str:
        if self.halfwidth is None:
            return (
                f"{self.what}: no interval at n_seq={self.n_seq} (intervals off, fewer "
                "than 2 sequences, or the scalar is undefined), so no sample-size advice"
            )
        pct = f"{100 * self.confidence:.0f}%"
        kind = "paired interval" if self.of == "change" else "interval"
        head = (
            f"{self.what} = {self.value:.4f} nats, {pct} {kind} [{self.low:.4f}, "
            f"{self.high:.4f}] (half-width {self.halfwidth:.4f}) from n_seq={self.n_seq}"
        )
        if self.n_seq_needed is None:
            return f"{head}; no batch size reaches half-width {self.target_halfwidth}"
        if self.halfwidth <= self.target_halfwidth:
            return (
                f"{head}: within the target half-width {self.target_halfwidth} nats "
                f"(n_seq={self.n_seq_needed} would already do)"
            )
        return (
            f"{head}; n_seq={self.n_seq_needed} would reach the target half-width "
            f"{self.target_halfwidth} nats"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def predicted_halfwidth(
    halfwidth: float, n: int, n_new: int, confidence: float = 0.95, expanded: bool = True
) -> float:
    """The half-width at `n_new` sequences, from the one measured at `n`."""
    factor = math.sqrt(n / n_new)
    if expanded:
        q = 1 - (1 - confidence) / 2
        factor *= t_quantile(q, n_new - 1) / t_quantile(q, n - 1)
    return halfwidth * factor


def sequences_needed(
    halfwidth: float,
    n: int,
    target: float,
    confidence: float = 0.95,
    expanded: bool = True,
    limit: int = 10**7,
) -> int | None:
    """The fewest sequences (>= 2) whose predicted half-width is at most `target`."""
    if halfwidth <= 0:
        return 2

    def ok(m: int) -> bool:
        return predicted_halfwidth(halfwidth, n, m, confidence, expanded) <= target

    if not ok(limit):
        return None
    low, high = 2, limit  # ok(high); find the smallest
    if ok(low):
        return low
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            high = mid
        else:
            low = mid
    return high


def sample_size_advice(
    result: ProbeResult, metric: str = "gap_median", target_halfwidth: float = 0.02
) -> SampleSizeAdvice:
    """Half-width of `metric`'s interval at this batch size and the n_seq for a target.

    Raises:
        KeyError: `metric` is not a summary scalar.
    """
    info = result.meta.intervals or {}
    confidence = float(info.get("confidence", 0.95))
    expanded = bool(info.get("expanded", True))
    n = int(result.meta.n_seq or info.get("n_seq") or 0)
    low, high = result.summary.interval(metric)
    value = result.summary.scalars().get(metric)
    halfwidth = needed = None
    if low is not None and high is not None and n >= 2:
        halfwidth = (high - low) / 2
        needed = sequences_needed(halfwidth, n, target_halfwidth, confidence, expanded)
    return SampleSizeAdvice(
        metric, n, value, low, high, halfwidth, target_halfwidth, needed, confidence
    )
