"""Which layers to remove, decided by measured cost (docs/definitions.md §5).

`compare_removal` measures, at each budget, the removal sets chosen by interchange and
replacement removability and by the baselines, and recommends the set with the lowest
held-out perplexity. The regime of the probe is never consulted: on real checkpoints the
protocol with the smaller distances is not always the one whose removals cost less.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from redundancy_monitor.errors import InvalidConfigError, NotInResultError
from redundancy_monitor.formatting import finite_or_none, fmt, json_safe
from redundancy_monitor.probing.result import ProbeResult
from redundancy_monitor.removal.baselines import (
    greedy_deletion_steps,
    hidden_state_scores_on,
    random_sets,
)
from redundancy_monitor.removal.cost import CostMeter
from redundancy_monitor.removal.heldout import HeldoutOptions, measure_heldout
from redundancy_monitor.removal.progress import Phases
from redundancy_monitor.removal.selection import (
    GUIDED_PROTOCOLS,
    RemovalPlan,
    check_budgets,
    jaccard,
    plan_removal,
)

GUIDED = GUIDED_PROTOCOLS
BASELINES = ("greedy", "block_influence", "angular", "random")


@dataclass(frozen=True)
class SelectorCost:
    """Cost of one selector's removal set at one budget (random: mean and spread)."""

    budget: int
    selector: str
    layers: tuple[int, ...] | None
    d_del: float
    perplexity: float
    perplexity_change: float
    d_del_std: float | None = None
    perplexity_std: float | None = None
    draws: tuple[tuple[int, ...], ...] = ()
    # Interval of perplexity_change (random: the mean of the draws' bounds), the held-out
    # tokens it was measured on (random: the fewest of any draw), and whether racing
    # stopped the set (random: the number of draws stopped) before the end of the text.
    change_low: float | None = None
    change_high: float | None = None
    heldout_tokens: int | None = None
    stopped_early: bool = False
    draws_stopped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class BudgetVerdict:
    """Per budget: how the two protocols compare and the recommended removal set."""

    budget: int
    increase_ratio: float | None  # (ppl_repl - base) / (ppl_int - base)
    perplexity_ratio: float | None  # ppl_repl / ppl_int
    d_del_ratio: float | None  # d_del_repl / d_del_int
    jaccard: float | None  # overlap of the two protocols' sets
    recommended: tuple[int, ...]
    recommended_by: tuple[str, ...]  # every selector that chose the recommended set
    recommended_perplexity: float
    recommended_change: float | None = None
    recommended_interval: tuple[float | None, float | None] = (None, None)
    # Other contenders whose interval of Δppl overlaps the recommended set's: the data
    # cannot tell them apart at this confidence.
    tied_with: tuple[tuple[int, ...], ...] = ()
    tied_selectors: tuple[tuple[str, ...], ...] = ()

    @property
    def statistically_tied(self) -> bool:
        return bool(self.tied_with)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({**asdict(self), "statistically_tied": self.statistically_tied})

    def sentence(self) -> str:
        """The tie, in words (empty when the recommendation stands alone)."""
        if not self.tied_with:
            return ""
        others = "; ".join(
            f"{list(layers)} ({', '.join(by)})"
            for layers, by in zip(self.tied_with, self.tied_selectors, strict=True)
        )
        return f"statistically tied with {others}: their Δppl intervals overlap"


@dataclass(frozen=True)
class CandidateCost:
    """One distinct removal set, measured once however many selectors chose it."""

    layers: tuple[int, ...]
    selectors: tuple[str, ...]
    d_del: float
    d_del_last: float
    perplexity: float
    perplexity_change: float
    change_low: float | None
    change_high: float | None
    heldout_tokens: int
    windows: int
    stopped_early: bool

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass
class RemovalReport:
    """The removal table: every selector's cost at every budget, and the verdicts."""

    base_perplexity: float
    window: int
    stride: int
    heldout_tokens: int
    budgets: tuple[int, ...]
    rows: list[SelectorCost]
    verdicts: list[BudgetVerdict]
    plan: RemovalPlan
    extras: dict[str, Any] = field(default_factory=dict)
    candidates: list[CandidateCost] = field(default_factory=list)
    heldout: dict[str, Any] = field(default_factory=dict)  # how it was measured

    def row(self, budget: int, selector: str) -> SelectorCost:
        for r in self.rows:
            if (r.budget, r.selector) == (budget, selector):
                return r
        selectors = list(dict.fromkeys(r.selector for r in self.rows))
        raise NotInResultError(
            f"no row for budget {budget}, selector {selector!r}; the table has budgets "
            f"{list(self.budgets)} and selectors {selectors}"
        )

    def verdict(self, budget: int) -> BudgetVerdict:
        for v in self.verdicts:
            if v.budget == budget:
                return v
        raise NotInResultError(
            f"no verdict for budget {budget}; the table has budgets {list(self.budgets)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_perplexity": finite_or_none(self.base_perplexity),
            "window": self.window,
            "stride": self.stride,
            "heldout_tokens": self.heldout_tokens,
            "budgets": list(self.budgets),
            "rows": [r.to_dict() for r in self.rows],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "plan": self.plan.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "heldout": self.heldout,
            **self.extras,
        }

    def to_table(self) -> str:
        """Fixed-width removal table: one line per budget and selector, then verdicts."""
        level = self.heldout.get("confidence", 0.95)
        head = (
            f"{'n':>2} {'selector':<16} {'layers':<12} {'d_del':>8} {'ppl':>14} {'Δppl':>8} "
            f"{f'{100 * level:.0f}% interval':>18} {'tokens':>9}"
        )
        how = self.heldout.get("evaluation")
        lines = [
            f"base perplexity {self.base_perplexity:.4f} (window {self.window}, stride "
            f"{self.stride}, {self.heldout_tokens} held-out tokens"
            + (f", {how} evaluation" if how else "")
            + ")",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            layers = "random" if r.layers is None else ",".join(map(str, r.layers))
            ppl = f"{r.perplexity:.4f}"
            if r.perplexity_std is not None:
                ppl += f"±{r.perplexity_std:.2f}"
            interval = ""
            if r.change_low is not None and r.change_high is not None:
                interval = f"[{100 * r.change_low:+.1f}, {100 * r.change_high:+.1f}]%"
            tokens = "" if r.heldout_tokens is None else str(r.heldout_tokens)
            if r.selector == "random" and r.draws_stopped:
                tokens += f" ({r.draws_stopped}/{len(r.draws)} stopped)"
            elif r.stopped_early:
                tokens += " stopped"
            lines.append(
                f"{r.budget:>2} {r.selector:<16} {layers:<12} {r.d_del:>8.4f} {ppl:>14} "
                f"{100 * r.perplexity_change:>+7.1f}% {interval:>18} {tokens:>9}"
            )
        if any(r.stopped_early or r.draws_stopped for r in self.rows):
            lines.append(
                "stopped: racing stopped the set early on that many tokens, its Δppl interval "
                "lying entirely above the best contender's; ppl = base x (1 + Δppl there)"
            )
        for v in self.verdicts:
            tie = v.sentence()
            lines.append(
                f"n={v.budget}: recommend remove {list(v.recommended)} "
                f"({', '.join(v.recommended_by)}; ppl {v.recommended_perplexity:.4f})  "
                f"repl/int Δppl ratio {fmt(v.increase_ratio, 3)}  "
                f"Jaccard(int, repl) {fmt(v.jaccard, 3)}" + (f"\n     {tie}" if tie else "")
            )
        return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def compare_removal(
    model: nn.Module,
    result: ProbeResult,
    input_ids,
    heldout_ids,
    attention_mask=None,
    budgets: Iterable[int] = (1, 2, 3),
    baselines: Sequence[str] = BASELINES,
    window: int | None = None,
    stride: int | None = None,
    random_draws: int = 5,
    seed: int = 0,
    blocks: str | nn.ModuleList | None = None,
    head: str | nn.Module | None = None,
    progress: bool | str | Phases = False,
    evaluation: str = "race",
    heldout_options: HeldoutOptions | None = None,
) -> RemovalReport:
    """Measure every selector's removal set per budget and recommend the cheapest.

    Args:
        model: the probed causal LM (left unchanged).
        result: its `ProbeResult` (adjacent pairs needed for removability).
        input_ids, attention_mask: the probe batch `result` was computed on.
        heldout_ids: held-out token ids for perplexity: 1-D, ``[n_docs, n_tokens]``,
            or a list of 1-D pieces of any lengths.
        budgets: numbers of layers to remove.
        baselines: any of ``"greedy"``, ``"block_influence"``, ``"angular"``, ``"random"``.
        window, stride: the perplexity sliding window (reported).
        random_draws, seed: the random baseline's draws per budget and its seed (also
            the seed of the racing order and the bootstrap).
        progress: ``True``/``"bars"`` (a bar per phase on stderr), ``"lines"`` (one
            line per phase), ``False``/``"off"``, or a `Phases`.
        evaluation: ``"race"`` (shared computation, candidates stopped once clearly
            worse), ``"full"`` (shared computation, every set on all of the text) or
            ``"reference"`` (one full forward of each pruned model per window batch).
        heldout_options: the racing, bootstrap and memory knobs (`evaluation` and `seed`
            given here override its own).

    Returns:
        A `RemovalReport`; per budget the recommendation is the deterministic selector's
        set with the lowest held-out perplexity among those measured on all of the text
        (ties: lower d_del, then selector order), with the sets statistically tied to it.

    Raises:
        InvalidBudgetError, InvalidConfigError, InvalidProtocolError.
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InvalidConfigError(
            f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}"
        )
    if random_draws < 1 or seed < 0:
        raise InvalidConfigError(
            f"the random baseline needs random_draws >= 1 and seed >= 0, got "
            f"random_draws={random_draws}, seed={seed}"
        )
    if heldout_ids is None:
        raise InvalidConfigError(
            "compare_removal needs heldout_ids: removal is judged on held-out text"
        )
    options = replace(heldout_options or HeldoutOptions(), evaluation=evaluation, seed=seed)
    phases = Phases.of(progress)
    budgets = check_budgets(budgets, result.n_layers)
    plan = plan_removal(result, budgets, GUIDED)
    meter = CostMeter(model, input_ids, attention_mask, heldout_ids, window, stride, blocks, head)

    candidates = _candidates(meter, plan, budgets, baselines, random_draws, seed, phases)
    unique = list(dict.fromkeys(s for sets in candidates.values() for s in sets))
    chosen_by: dict[tuple[int, ...], list[str]] = {}
    for (_, selector), sets in candidates.items():
        for layers in sets:
            chosen_by.setdefault(layers, [])
            if selector not in chosen_by[layers]:
                chosen_by[layers].append(selector)
    contenders = [s for s in unique if any(x != "random" for x in chosen_by[s])]

    with phases.phase(
        "d_del", f"{len(unique)} distinct removal sets on the probe batch", len(unique), "set"
    ) as bar:
        distances = dict(zip(unique, meter.d_del(unique, progress=bar), strict=True))

    detail = (
        f"{len(unique)} removal sets + the unpruned model on {meter.heldout_tokens} tokens, "
        f"{evaluation} evaluation"
    )
    with phases.phase("held-out perplexity", detail, unit="window") as bar:
        held, held_window, held_stride = meter.heldout()
        scores = measure_heldout(
            meter.root,
            meter.block_list,
            meter.head_module,
            held,
            held_window,
            held_stride,
            meter.batch,
            unique,
            contenders,
            options,
            progress=bar,
        )
    base = scores.base_perplexity
    costs = {}
    for layers in unique:
        stats = scores.stats(layers)
        costs[layers] = CandidateCost(
            layers,
            tuple(chosen_by[layers]),
            distances[layers][0],
            distances[layers][1],
            stats.perplexity,
            stats.perplexity_change,
            finite_or_none(stats.change_low),
            finite_or_none(stats.change_high),
            stats.heldout_tokens,
            stats.windows,
            stats.stopped_early,
        )
    rows = [
        _row(budget, selector, [costs[s] for s in sets], base)
        for (budget, selector), sets in candidates.items()
    ]
    verdicts = [_verdict(b, [r for r in rows if r.budget == b], plan, base, costs) for b in budgets]
    heldout = {
        **options.to_dict(),
        "windows": len(scores.windows),
        "candidates": len(unique),
        "stopped_early": len(scores.stopped_at),
        "window_forwards": _window_forwards(scores),
    }
    return RemovalReport(
        base,
        held_window,
        held_stride,
        meter.heldout_tokens,
        budgets,
        rows,
        verdicts,
        plan,
        candidates=[costs[s] for s in unique],
        heldout=heldout,
    )


def _window_forwards(scores) -> int:
    """Window evaluations done (the base and every set, on the windows each saw)."""
    seen = sum(int(np.isfinite(v).sum()) for v in scores.nll.values())
    return int(len(scores.windows) + seen)


def _candidates(meter, plan, budgets, baselines, random_draws, seed, phases):
    """(budget, selector) -> removal sets to measure (one, or several random draws)."""
    out: dict[tuple[int, str], list[tuple[int, ...]]] = {}
    greedy = scores = None
    if "block_influence" in baselines or "angular" in baselines:
        with phases.phase("baselines", "Block Influence and angular distance", 1, "forward") as bar:
            scores = hidden_state_scores_on(meter.root, meter.block_list, meter.batch, budgets)
            bar.update(1)
    if "greedy" in baselines:
        steps_total = max(budgets)
        detail = f"{steps_total} steps of greedy deletion on the probe batch"
        with phases.phase("greedy", detail, steps_total, "step") as bar:
            steps = greedy_deletion_steps(
                meter.root,
                meter.block_list,
                meter.head_module,
                meter.batch,
                max(budgets),
                meter.options,
                progress=bar,
            )
        greedy = [s.layer for s in steps]
    for b in budgets:
        for protocol in GUIDED:
            out[(b, protocol)] = [plan.layers(protocol, b)]
        if greedy is not None:
            out[(b, "greedy")] = [tuple(sorted(greedy[:b]))]
        if scores is not None and "block_influence" in baselines:
            out[(b, "block_influence")] = [scores.block_influence_set(b)]
        if scores is not None and "angular" in baselines:
            out[(b, "angular")] = [scores.angular_set(b)]
        if "random" in baselines:
            out[(b, "random")] = random_sets(meter.n_layers, b, random_draws, seed)
    return out


def _mean_or_none(values: list[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    return float(np.mean([v for v in values if v is not None]))


def _row(budget: int, selector: str, costs: list[CandidateCost], base: float) -> SelectorCost:
    if selector != "random":
        c = costs[0]
        return SelectorCost(
            budget,
            selector,
            c.layers,
            c.d_del,
            c.perplexity,
            c.perplexity_change,
            change_low=c.change_low,
            change_high=c.change_high,
            heldout_tokens=c.heldout_tokens,
            stopped_early=c.stopped_early,
        )
    d = np.array([c.d_del for c in costs])
    p = np.array([c.perplexity for c in costs])
    stopped = sum(c.stopped_early for c in costs)
    return SelectorCost(
        budget,
        selector,
        None,
        float(d.mean()),
        float(p.mean()),
        float(p.mean() / base - 1),
        float(d.std()),
        float(p.std()),
        tuple(c.layers for c in costs),
        change_low=_mean_or_none([c.change_low for c in costs]),
        change_high=_mean_or_none([c.change_high for c in costs]),
        heldout_tokens=min(c.heldout_tokens for c in costs),
        stopped_early=stopped > 0,
        draws_stopped=stopped,
    )


def _overlap(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool:
    """Whether two intervals share a point (False when either is missing)."""
    if a[0] is None or a[1] is None or b[0] is None or b[1] is None:
        return False
    return a[0] <= b[1] and b[0] <= a[1]


def _verdict(
    budget: int,
    rows: list[SelectorCost],
    plan: RemovalPlan,
    base: float,
    costs: dict[tuple[int, ...], CandidateCost],
) -> BudgetVerdict:
    by = {r.selector: r for r in rows}
    inter, repl = by["interchange"], by["replacement"]
    deterministic = [r for r in rows if r.selector != "random"]
    # Racing never stops the best contender, so some set was measured on all the text.
    complete = [r for r in deterministic if not r.stopped_early] or deterministic
    best = min(complete, key=lambda r: (r.perplexity, r.d_del, deterministic.index(r)))
    low, high = best.change_low, best.change_high
    tied: list[tuple[int, ...]] = []
    for r in deterministic:
        layers = r.layers
        if layers is None or layers == best.layers or layers in tied:
            continue
        if _overlap((low, high), (costs[layers].change_low, costs[layers].change_high)):
            tied.append(layers)
    return BudgetVerdict(
        budget=budget,
        increase_ratio=_ratio(repl.perplexity - base, inter.perplexity - base),
        perplexity_ratio=_ratio(repl.perplexity, inter.perplexity),
        d_del_ratio=_ratio(repl.d_del, inter.d_del),
        jaccard=jaccard(plan.layers("interchange", budget), plan.layers("replacement", budget)),
        recommended=best.layers,  # type: ignore[arg-type]
        recommended_by=tuple(r.selector for r in deterministic if r.layers == best.layers),
        recommended_perplexity=best.perplexity,
        recommended_change=best.perplexity_change,
        recommended_interval=(low, high),
        tied_with=tuple(tied),
        tied_selectors=tuple(
            tuple(r.selector for r in deterministic if r.layers == t) for t in tied
        ),
    )
