"""Results of one probe: per-pair records (docs/definitions.md §2), the summary (docs/definitions.md §4), JSON and text.

Where the probe kept per-sequence distances (`PerSequence`), pairs and summary also carry
bootstrap intervals (`redundancy_monitor.probing.intervals`, docs/intervals.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from redundancy_monitor.errors import InvalidConfigError, NotInResultError
from redundancy_monitor.formatting import finite_or_none, fmt, json_safe


@dataclass(frozen=True)
class Thresholds:
    """Similarity bands and regime thresholds (docs/definitions.md §4), in nats.

    Args:
        strong: d below this is strongly swap-similar (paper: 0.05).
        conditional: d below this (and >= strong) is conditionally similar (0.10).
        regime_ir: median ir at or below this counts as the protocols disagreeing (0.5).
        regime_distance: median distance at or above this counts as large (0.10).
    """

    strong: float = 0.05
    conditional: float = 0.10
    regime_ir: float = 0.5
    regime_distance: float = 0.10

    def __post_init__(self):
        if not 0 <= self.strong <= self.conditional:
            raise InvalidConfigError(
                f"thresholds need 0 <= strong <= conditional, got strong={self.strong}, "
                f"conditional={self.conditional}"
            )


@dataclass(frozen=True)
class PairRecord:
    """Distances of one pair of slots (i < j). Fields are None where not computed/defined.

    `separation` is j - i, how far apart the slots are; every other field is a distance
    (a KL divergence in nats) or derived from distances.
    """

    i: int
    j: int
    separation: int
    repl_ij: float | None = None  # R(i <- j): slot i runs block j
    repl_ji: float | None = None  # R(j <- i)
    d_repl: float | None = None  # max of the two directions
    repl_mean: float | None = None
    d_int: float | None = None
    gap: float | None = None  # d_repl - d_int
    ir: float | None = None  # d_int / d_repl (None when d_repl == 0)
    repl_ij_last: float | None = None
    repl_ji_last: float | None = None
    d_repl_last: float | None = None
    repl_mean_last: float | None = None
    d_int_last: float | None = None
    gap_last: float | None = None
    ir_last: float | None = None
    # Bootstrap interval bounds (None where no interval was computed).
    d_repl_low: float | None = None
    d_repl_high: float | None = None
    d_int_low: float | None = None
    d_int_high: float | None = None
    gap_low: float | None = None
    gap_high: float | None = None
    ir_low: float | None = None
    ir_high: float | None = None

    INTERVAL_FIELDS: ClassVar[tuple[str, ...]] = ("d_repl", "d_int", "gap", "ir")

    @classmethod
    def build(cls, i, j, repl_ij=None, repl_ji=None, d_int=None, last=None) -> PairRecord:
        """Derive d_repl, gap and ir from the measured distances (and their _last twins)."""
        values = _derive(repl_ij, repl_ji, d_int)
        last_values = _derive(*(last or (None, None, None)))
        return cls(
            i=i, j=j, separation=j - i, **values, **{f"{k}_last": v for k, v in last_values.items()}
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairRecord:
        """Inverse of `to_dict`; also reads files that still call `separation` "distance"."""
        data = dict(data)
        if "distance" in data:
            data["separation"] = data.pop("distance")
        return cls(**data)

    def is_finite(self) -> bool:
        measured = [self.repl_ij, self.repl_ji, self.d_int]
        return all(x is None or math.isfinite(x) for x in measured)

    def interval(self, name: str) -> tuple[float | None, float | None]:
        """``(low, high)`` of d_repl, d_int, gap or ir; ``(None, None)`` when not computed."""
        if name not in self.INTERVAL_FIELDS:
            raise NotInResultError(f"pairs have intervals for {self.INTERVAL_FIELDS}, not {name!r}")
        return getattr(self, f"{name}_low"), getattr(self, f"{name}_high")

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _derive(repl_ij, repl_ji, d_int) -> dict[str, float | None]:
    d_repl = repl_mean = gap = ir = None
    if repl_ij is not None and repl_ji is not None:
        d_repl = max(repl_ij, repl_ji)
        repl_mean = (repl_ij + repl_ji) / 2
    if d_repl is not None and d_int is not None:
        gap = d_repl - d_int
        ir = d_int / d_repl if d_repl != 0 else None
    return {
        "repl_ij": repl_ij,
        "repl_ji": repl_ji,
        "d_repl": d_repl,
        "repl_mean": repl_mean,
        "d_int": d_int,
        "gap": gap,
        "ir": ir,
    }


@dataclass(frozen=True)
class SkippedPair:
    """A pair the probe could not compute (e.g. blocks of different shapes), and why."""

    i: int
    j: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeletionRecord:
    """d_del({slot}): the distance of the model with one slot skipped."""

    slot: int
    d_del: float
    d_del_last: float

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class PerSequence:
    """D per sequence of each pair's variants (docs/definitions.md §2: D is their mean).

    Row k of each table belongs to ``pairs[k]``; column s to sequence s of the probe
    batch. Tables are ``repl_ij`` (R(i<-j)), ``repl_ji`` (R(j<-i)) and ``d_int``, each
    present when its protocol ran. Values are kept exactly (the bootstrap reproduces the
    point estimates from them); NaN/inf are stored as None in JSON.
    """

    pairs: tuple[tuple[int, int], ...]
    tables: dict[str, tuple[tuple[float, ...], ...]]

    TABLES: ClassVar[tuple[str, ...]] = ("repl_ij", "repl_ji", "d_int")

    @property
    def n_seq(self) -> int:
        for rows in self.tables.values():
            if rows:
                return len(rows[0])
        return 0

    def table(self, name: str) -> np.ndarray | None:
        """``[n_pairs, n_seq]`` float64 array of one table (None when not measured)."""
        rows = self.tables.get(name)
        if rows is None:
            return None
        return np.asarray(rows, dtype=np.float64).reshape(len(self.pairs), self.n_seq)

    def subset(self, sequences) -> PerSequence:
        """The same pairs on a subset of the sequences (column indices)."""
        cols = [int(s) for s in sequences]
        return PerSequence(
            self.pairs,
            {k: tuple(tuple(row[c] for c in cols) for row in v) for k, v in self.tables.items()},
        )

    @classmethod
    def merge(cls, parts: list[PerSequence]) -> PerSequence:
        """Shards' tables in one, rows sorted by pair."""
        rows: dict[tuple[int, int], dict[str, tuple[float, ...]]] = {}
        for part in parts:
            for k, pair in enumerate(part.pairs):
                rows[pair] = {name: t[k] for name, t in part.tables.items()}
        pairs = tuple(sorted(rows))
        names = [n for n in cls.TABLES if all(n in rows[p] for p in pairs)] if pairs else []
        return cls(pairs, {n: tuple(rows[p][n] for p in pairs) for n in names})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_seq": self.n_seq, "pairs": [list(p) for p in self.pairs]}
        for name, rows in self.tables.items():
            out[name] = json_safe(rows)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerSequence:
        tables = {
            name: tuple(
                tuple(math.nan if x is None else float(x) for x in row) for row in data[name]
            )
            for name in cls.TABLES
            if name in data
        }
        return cls(tuple((int(i), int(j)) for i, j in data["pairs"]), tables)


@dataclass(frozen=True)
class GapStats:
    """Gap and ir statistics over one set of pairs (all pairs, or one separation |i-j|)."""

    n_pairs: int = 0
    gap_mean: float | None = None
    gap_median: float | None = None
    gap_p75: float | None = None
    gap_max: float | None = None
    ir_mean: float | None = None
    ir_median: float | None = None


#: A regime that holds in fewer bootstrap replicates than this is reported as uncertain.
STABLE_REGIME = 0.8
_NOT_SCALARS = ("regime", "by_separation", "regime_stability", "intervals")


@dataclass(frozen=True)
class ProbeSummary(GapStats):
    """The docs/definitions.md §4 scalars of one probe; these form the trajectories.

    The gap and ir statistics it inherits are over the finite pairs; `n_pairs` counts
    every computed pair. With intervals (the default of `probe`), `interval(name)` gives
    each scalar's bootstrap interval and `regime_stability` the share of bootstrap
    replicates in which `regime` holds; below `STABLE_REGIME` the regime is reported as
    uncertain.
    """

    n_finite: int = 0
    n_nonfinite: int = 0
    d_repl_mean: float | None = None
    d_repl_median: float | None = None
    d_int_mean: float | None = None
    d_int_median: float | None = None
    pearson: float | None = None
    spearman: float | None = None
    repl_strong: int = 0
    repl_conditional: int = 0
    repl_not_similar: int = 0
    int_strong: int = 0
    int_conditional: int = 0
    int_not_similar: int = 0
    frac_int_le_repl: float | None = None
    regime: str | None = None
    by_separation: dict[int, GapStats] = field(default_factory=dict)
    regime_stability: float | None = None
    intervals: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def scalars(self) -> dict[str, float | None]:
        """Flat name -> number map (regime excluded), for logging trajectories."""
        out: dict[str, float | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _NOT_SCALARS:
                continue
            out[f.name] = finite_or_none(value)
        for d, stats in sorted(self.by_separation.items()):  # d1/...: pairs with |i-j| = 1
            for f in fields(stats):
                value = getattr(stats, f.name)
                out[f"d{d}/{f.name}"] = finite_or_none(value)
        return out

    def interval(self, name: str) -> tuple[float | None, float | None]:
        """``(low, high)`` of the bootstrap interval of one scalar (a key of `scalars()`,
        e.g. ``"gap_median"`` or ``"d1/gap_mean"``); ``(None, None)`` when the probe
        computed no interval (``intervals=False``) or the scalar is undefined.

        Raises:
            NotInResultError: `name` is not a summary scalar.
        """
        if name in self.intervals:
            return self.intervals[name]
        if name not in self.scalars():
            raise NotInResultError(
                f"{name!r} is not a summary scalar; choose one of {sorted(self.scalars())}"
            )
        return None, None

    @property
    def regime_uncertain(self) -> bool | None:
        """True when the regime holds in fewer than `STABLE_REGIME` of the replicates."""
        if self.regime_stability is None:
            return None
        return self.regime_stability < STABLE_REGIME

    def stability_text(self) -> str:
        """``uncertain: 62% of replicates`` / ``stable: ...``; empty without intervals."""
        if self.regime_stability is None or self.regime is None:
            return ""
        word = "uncertain" if self.regime_uncertain else "stable"
        return f"{word}: {100 * self.regime_stability:.0f}% of replicates"

    def regime_text(self) -> str:
        """The regime with its stability, e.g. ``divergent (uncertain: 62% of replicates)``."""
        stability = self.stability_text()
        return f"{self.regime} ({stability})" if stability else str(self.regime)

    def to_dict(self) -> dict[str, Any]:
        out = json_safe({f.name: getattr(self, f.name) for f in fields(self)})
        out.pop("intervals")
        out["regime_uncertain"] = self.regime_uncertain
        out["by_separation"] = {
            str(d): json_safe(asdict(s)) for d, s in sorted(self.by_separation.items())
        }
        for name, (low, high) in self.intervals.items():
            target, key = out, name
            if "/" in name:  # "d1/gap_mean" lives in by_separation["1"]
                d, key = name.split("/", 1)
                target = out["by_separation"].setdefault(d[1:], {})
            target[f"{key}_low"], target[f"{key}_high"] = json_safe([low, high])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeSummary:
        """Inverse of `to_dict`; also reads files that still say "by_distance"."""
        data = dict(data)
        data.pop("regime_uncertain", None)
        intervals: dict[str, tuple[float | None, float | None]] = {}
        for name in [k for k in data if k.endswith("_low")]:
            key = name[: -len("_low")]
            intervals[key] = (data.pop(name), data.pop(f"{key}_high", None))
        old = data.pop("by_distance", {})
        by = {}
        for d, stats in data.pop("by_separation", old).items():
            stats = dict(stats)
            for name in [k for k in stats if k.endswith("_low")]:
                key = name[: -len("_low")]
                intervals[f"d{d}/{key}"] = (stats.pop(name), stats.pop(f"{key}_high", None))
            by[int(d)] = GapStats(**stats)
        return cls(**data, by_separation=by, intervals=intervals)


def _stats(values: list[float]) -> tuple[float | None, ...]:
    if not values:
        return None, None, None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(np.median(a)), float(np.percentile(a, 75)), float(a.max())


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``[b, p]`` arrays; NaN where a row is constant or p < 2.

    The summary and its bootstrap replicates both compute r here, so equal data give
    equal bits (a rank correlation's interval then contains its own point estimate).
    """
    b, p = x.shape
    if p < 2:
        return np.full(b, np.nan)
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    ok = (x.std(axis=1) != 0) & (y.std(axis=1) != 0)
    sxx, syy = (xc * xc).sum(axis=1), (yc * yc).sum(axis=1)
    denom = np.sqrt(np.where(ok, sxx * syy, 1.0))
    r = np.clip((xc * yc).sum(axis=1) / denom, -1.0, 1.0)
    return np.where(ok, r, np.nan)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    r = pearson_rows(x[None, :], y[None, :])[0]
    return None if math.isnan(r) else float(r)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _bands(values: list[float], t: Thresholds) -> tuple[int, int, int]:
    strong = sum(v < t.strong for v in values)
    conditional = sum(t.strong <= v < t.conditional for v in values)
    return strong, conditional, len(values) - strong - conditional


def regime_of(ir_median, d_repl_median, d_int_median, t: Thresholds) -> str | None:
    """docs/definitions.md §4 regime; None when the medians it needs are undefined."""
    if d_int_median is not None and d_int_median >= t.regime_distance:
        return "unreliable"
    if ir_median is None or d_repl_median is None:
        return None
    if ir_median <= t.regime_ir and d_repl_median >= t.regime_distance:
        return "divergent"
    if ir_median > t.regime_ir and d_repl_median < t.regime_distance:
        return "tied"
    return "mixed"


def _gap_stats(records: list[PairRecord]) -> GapStats:
    gaps = [r.gap for r in records if r.gap is not None]
    irs = [r.ir for r in records if r.ir is not None]
    mean, median, p75, top = _stats(gaps)
    ir_mean, ir_median, _, _ = _stats(irs)
    return GapStats(len(records), mean, median, p75, top, ir_mean, ir_median)


def summarize(pairs: list[PairRecord], thresholds: Thresholds | None = None) -> ProbeSummary:
    """docs/definitions.md §4 summary over the finite pairs."""
    t = thresholds or Thresholds()
    finite = [r for r in pairs if r.is_finite()]
    overall = _gap_stats(finite)
    repl = [r.d_repl for r in finite if r.d_repl is not None]
    inter = [r.d_int for r in finite if r.d_int is not None]
    d_repl_mean, d_repl_median, _, _ = _stats(repl)
    d_int_mean, d_int_median, _, _ = _stats(inter)
    both = [r for r in finite if r.d_repl is not None and r.d_int is not None]
    # (d_int, d_repl) of those pairs, typed as floats
    both_values = [
        (r.d_int, r.d_repl) for r in both if r.d_int is not None and r.d_repl is not None
    ]
    x = np.asarray([r.d_repl for r in both], dtype=np.float64)
    y = np.asarray([r.d_int for r in both], dtype=np.float64)
    by_separation: dict[int, list[PairRecord]] = {}
    for r in finite:
        by_separation.setdefault(r.separation, []).append(r)
    rs, rc, rn = _bands(repl, t)
    is_, ic, in_ = _bands(inter, t)
    return ProbeSummary(
        n_pairs=len(pairs),
        n_finite=len(finite),
        n_nonfinite=len(pairs) - len(finite),
        gap_mean=overall.gap_mean,
        gap_median=overall.gap_median,
        gap_p75=overall.gap_p75,
        gap_max=overall.gap_max,
        ir_mean=overall.ir_mean,
        ir_median=overall.ir_median,
        d_repl_mean=d_repl_mean,
        d_repl_median=d_repl_median,
        d_int_mean=d_int_mean,
        d_int_median=d_int_median,
        pearson=_pearson(x, y),
        spearman=_pearson(_ranks(x), _ranks(y)) if len(both) >= 2 else None,
        repl_strong=rs,
        repl_conditional=rc,
        repl_not_similar=rn,
        int_strong=is_,
        int_conditional=ic,
        int_not_similar=in_,
        frac_int_le_repl=(
            (sum(i <= r for i, r in both_values) / len(both_values)) if both_values else None
        ),
        regime=regime_of(overall.ir_median, d_repl_median, d_int_median, t),
        by_separation={d: _gap_stats(rs_) for d, rs_ in sorted(by_separation.items())},
    )


@dataclass(frozen=True)
class ProbeMeta:
    """How a probe was run: library version, model, probe batch, pair set, protocols, cost.

    A field is None where it is unknown (records of older versions, hand-made results)
    and is then left out of `to_dict()`.

    Attributes:
        pairs: the pair-set name (``"adjacent"``, ``"window:k"``, ``"all"``), or
            ``"explicit"`` for a list of pairs.
        shard: ``(rank, world_size)`` of a result that holds one rank's share.
        streamed: for a probe that streamed block weights from host memory, its
            ``device_weight_peak_bytes``, ``block_loads`` and ``capacity_blocks``.
        intervals: how the bootstrap intervals were computed (replicates, confidence,
            seed; or why they were skipped); on a shard, the request `merge_shards`
            carries out.
        shadow_host_bytes, shadow_device_bytes, probe_device_peak_bytes: the monitor's
            memory figures for this probe (snapshot in host and device memory, the
            probe's device peak); the largest over the ranks for a merged result.
        world_size: how many shares a merged result was made of.
        shadow_host_bytes_by_rank: each rank's host snapshot bytes (merged results).
        oom_retries: how often the probe ran out of memory and retried smaller.
        model_sizes: the sizes that, with `model_class` and `n_layers`, identify the
            model's architecture (hidden size, vocabulary, ...; see `model_identity`).
    """

    version: str | None = None
    model_class: str | None = None
    dtype: str | None = None
    device: str | None = None
    n_layers: int | None = None
    n_seq: int | None = None
    seq_len: int | None = None
    n_tokens: int | None = None
    batch_sha256: str | None = None
    pairs: str | None = None
    protocols: tuple[str, ...] | None = None
    thresholds: Thresholds | None = None
    n_variants: int | None = None
    oom_retries: int | None = None
    elapsed_s: float | None = None
    shard: tuple[int, int] | None = None
    streamed: dict[str, int] | None = None
    intervals: dict[str, Any] | None = None
    shadow_host_bytes: int | None = None
    shadow_device_bytes: int | None = None
    probe_device_peak_bytes: int | None = None
    world_size: int | None = None
    shadow_host_bytes_by_rank: tuple[int, ...] | None = None
    model_sizes: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = asdict(value) if isinstance(value, Thresholds) else value
        return json_safe(out)

    def model_identity(self) -> dict[str, Any] | None:
        """The architecture probed: its class and sizes (None when unknown: records of
        older versions, hand-made results). Part of a trajectory's identity."""
        if self.model_class is None:
            return None
        return {"class": self.model_class, **(self.model_sizes or {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeMeta:
        """Read `to_dict()` output; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("thresholds"), dict):
            values["thresholds"] = Thresholds(**values["thresholds"])
        for key in ("protocols", "shard", "shadow_host_bytes_by_rank"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def describe_model(model: dict[str, Any]) -> str:
    """``LlamaForCausalLM (hidden_size 32, ...)`` for a `ProbeMeta.model_identity`."""
    sizes = ", ".join(f"{k} {v}" for k, v in model.items() if k != "class")
    return f"{model.get('class')}" + (f" ({sizes})" if sizes else "")


@dataclass
class ProbeResult:
    """Everything one probe measured.

    Attributes:
        pairs: one `PairRecord` per computed pair, sorted by (i, j).
        summary: the docs/definitions.md §4 scalars and the regime.
        skipped: pairs not computed, each with the reason.
        deletion: d_del of each single slot, when the "deletion" protocol ran.
        meta: batch hash and shape, model class, dtype, pair set, protocols, timing.
        per_sequence: D per sequence of every pair's variants (what the intervals are
            computed from), or None.
    """

    pairs: list[PairRecord]
    summary: ProbeSummary
    skipped: list[SkippedPair] = field(default_factory=list)
    deletion: list[DeletionRecord] = field(default_factory=list)
    meta: ProbeMeta = field(default_factory=ProbeMeta)
    per_sequence: PerSequence | None = None

    @property
    def n_layers(self) -> int:
        """The probed model's depth, from `meta.n_layers`.

        Raises:
            NotInResultError: the meta does not hold it (a result built by hand).
        """
        if self.meta.n_layers is None:
            raise NotInResultError(
                "this result does not say how many layers the model has (its meta has no "
                "n_layers); build it with ProbeMeta(n_layers=...), e.g. "
                "dataclasses.replace(result, meta=dataclasses.replace(result.meta, n_layers=L))"
            )
        return int(self.meta.n_layers)

    def pair(self, i: int, j: int) -> PairRecord:
        i, j = min(i, j), max(i, j)
        for r in self.pairs:
            if (r.i, r.j) == (i, j):
                return r
        raise NotInResultError(
            f"pair {(i, j)} was not probed; probe with pairs='all' (or a list holding it) "
            "to measure it"
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "meta": self.meta.to_dict(),
            "summary": self.summary.to_dict(),
            "pairs": [r.to_dict() for r in self.pairs],
            "skipped": [s.to_dict() for s in self.skipped],
            "deletion": [d.to_dict() for d in self.deletion],
        }
        if self.per_sequence is not None:
            out["per_sequence"] = self.per_sequence.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        per_sequence = data.get("per_sequence")
        return cls(
            pairs=[PairRecord.from_dict(r) for r in data["pairs"]],
            summary=ProbeSummary.from_dict(data["summary"]),
            skipped=[SkippedPair(**s) for s in data.get("skipped", [])],
            deletion=[DeletionRecord(**d) for d in data.get("deletion", [])],
            meta=ProbeMeta.from_dict(data.get("meta", {})),
            per_sequence=None if per_sequence is None else PerSequence.from_dict(per_sequence),
        )

    def to_table(self, max_rows: int | None = None) -> str:
        """A fixed-width text table of the pairs, then the summary line."""
        head = f"{'i':>3} {'j':>3} {'|i-j|':>5} {'R(i<-j)':>9} {'R(j<-i)':>9} {'d_repl':>9} {'d_int':>9} {'gap':>9} {'ir':>7}"
        lines = [head, "-" * len(head)]
        rows = self.pairs if max_rows is None else self.pairs[:max_rows]
        for r in rows:
            lines.append(
                f"{r.i:>3} {r.j:>3} {r.separation:>5} {fmt(r.repl_ij):>9} {fmt(r.repl_ji):>9} "
                f"{fmt(r.d_repl):>9} {fmt(r.d_int):>9} {fmt(r.gap):>9} {fmt(r.ir, 3):>7}"
            )
        if max_rows is not None and len(self.pairs) > max_rows:
            lines.append(f"... {len(self.pairs) - max_rows} more pairs")
        for s in self.skipped:
            lines.append(f"{s.i:>3} {s.j:>3}  skipped: {s.reason}")
        sm = self.summary
        low, high = sm.interval("gap_median")
        band = "" if low is None or high is None else f" [{fmt(low)}, {fmt(high)}]"
        lines.append(
            f"regime={sm.regime_text()}  gap mean={fmt(sm.gap_mean)} median="
            f"{fmt(sm.gap_median)}{band} max={fmt(sm.gap_max)}  ir median={fmt(sm.ir_median, 3)}  "
            f"d_repl mean={fmt(sm.d_repl_mean)}  d_int mean={fmt(sm.d_int_mean)}"
        )
        return "\n".join(lines)
