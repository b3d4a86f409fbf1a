"""Which layers to remove, decided by measured cost (docs/definitions.md §5).

`compare_removal` measures, at each budget, the removal sets chosen by interchange and
replacement removability and by the baselines, and recommends the set with the lowest
held-out perplexity. The regime of the probe is never consulted: on real checkpoints the
protocol with the smaller distances is not always the one whose removals cost less.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
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
from redundancy_monitor.removal.cost import CostMeter, RemovalCost
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
            **self.extras,
        }

    def to_table(self) -> str:
        """Fixed-width removal table: one line per budget and selector, then verdicts."""
        head = f"{'n':>2} {'selector':<16} {'layers':<16} {'d_del':>8} {'ppl':>10} {'Δppl':>9}"
        lines = [
            f"base perplexity {self.base_perplexity:.4f} (window {self.window}, stride "
            f"{self.stride}, {self.heldout_tokens} held-out tokens)",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            layers = "random" if r.layers is None else ",".join(map(str, r.layers))
            ppl = f"{r.perplexity:.4f}"
            if r.perplexity_std is not None:
                ppl += f"±{r.perplexity_std:.2f}"
            lines.append(
                f"{r.budget:>2} {r.selector:<16} {layers:<16} {r.d_del:>8.4f} {ppl:>10} "
                f"{100 * r.perplexity_change:>+8.1f}%"
            )
        for v in self.verdicts:
            lines.append(
                f"n={v.budget}: recommend remove {list(v.recommended)} "
                f"({', '.join(v.recommended_by)}; ppl {v.recommended_perplexity:.4f})  "
                f"repl/int Δppl ratio {fmt(v.increase_ratio, 3)}  "
                f"Jaccard(int, repl) {fmt(v.jaccard, 3)}"
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
    progress: bool = False,
) -> RemovalReport:
    """Measure every selector's removal set per budget and recommend the cheapest.

    Args:
        model: the probed causal LM (left unchanged).
        result: its `ProbeResult` (adjacent pairs needed for removability).
        input_ids, attention_mask: the probe batch `result` was computed on.
        heldout_ids: held-out token ids (1-D or ``[n_docs, n_tokens]``) for perplexity.
        budgets: numbers of layers to remove.
        baselines: any of ``"greedy"``, ``"block_influence"``, ``"angular"``, ``"random"``.
        window, stride: the perplexity sliding window (reported).
        random_draws, seed: the random baseline's draws per budget and its seed.
        progress: show a progress bar over the removal evaluations.

    Returns:
        A `RemovalReport`; per budget the recommendation is the deterministic selector's
        set with the lowest held-out perplexity (ties: lower d_del, then selector order).

    Raises:
        InvalidBudgetError, InvalidConfigError, InvalidProtocolError.
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InvalidConfigError(
            f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}"
        )
    if "random" in baselines and (random_draws < 1 or seed < 0):
        raise InvalidConfigError(
            f"the random baseline needs random_draws >= 1 and seed >= 0, got "
            f"random_draws={random_draws}, seed={seed}"
        )
    if heldout_ids is None:
        raise InvalidConfigError(
            "compare_removal needs heldout_ids: removal is judged on held-out text"
        )
    budgets = check_budgets(budgets, result.n_layers)
    plan = plan_removal(result, budgets, GUIDED)
    meter = CostMeter(model, input_ids, attention_mask, heldout_ids, window, stride, blocks, head)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="removal evaluations", unit="eval")
    try:
        candidates = _candidates(meter, plan, budgets, baselines, random_draws, seed, bar)
        unique = list(dict.fromkeys(s for sets in candidates.values() for s in sets))
        if bar is not None:
            bar.total = (bar.total or 0) + len(unique) + 1
            bar.refresh()
        meter.base_perplexity  # noqa: B018 -- measured once, before the pruned models
        if bar is not None:
            bar.update(1)
        costs = dict(zip(unique, meter.costs(unique, progress=bar), strict=True))
    finally:
        if bar is not None:
            bar.close()
    # compare_removal requires heldout_ids, so the meter measured perplexity
    assert meter.base_perplexity is not None
    assert meter.window is not None and meter.stride is not None
    rows = [
        _row(budget, selector, [costs[s] for s in sets], meter.base_perplexity)
        for (budget, selector), sets in candidates.items()
    ]
    verdicts = [_verdict(b, [r for r in rows if r.budget == b], plan, meter) for b in budgets]
    return RemovalReport(
        meter.base_perplexity,
        meter.window,
        meter.stride,
        meter.heldout_tokens,
        budgets,
        rows,
        verdicts,
        plan,
    )


def _candidates(meter, plan, budgets, baselines, random_draws, seed, bar):
    """(budget, selector) -> removal sets to measure (one, or several random draws)."""
    out: dict[tuple[int, str], list[tuple[int, ...]]] = {}
    greedy = scores = None
    if "greedy" in baselines:
        if bar is not None:
            bar.total = max(budgets)
            bar.refresh()
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
    if "block_influence" in baselines or "angular" in baselines:
        scores = hidden_state_scores_on(meter.root, meter.block_list, meter.batch, budgets)
    for b in budgets:
        for protocol in GUIDED:
            out[(b, protocol)] = [plan.layers(protocol, b)]
        if greedy is not None:
            out[(b, "greedy")] = [tuple(sorted(greedy[:b]))]
        if "block_influence" in baselines:
            out[(b, "block_influence")] = [scores.block_influence_set(b)]
        if "angular" in baselines:
            out[(b, "angular")] = [scores.angular_set(b)]
        if "random" in baselines:
            out[(b, "random")] = random_sets(meter.n_layers, b, random_draws, seed)
    return out


def _row(budget: int, selector: str, costs: list[RemovalCost], base: float) -> SelectorCost:
    if selector != "random":
        c = costs[0]
        assert c.perplexity is not None and c.perplexity_change is not None  # held-out text
        return SelectorCost(budget, selector, c.layers, c.d_del, c.perplexity, c.perplexity_change)
    d = np.array([c.d_del for c in costs])
    p = np.array([c.perplexity for c in costs])
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
    )


def _verdict(budget, rows: list[SelectorCost], plan: RemovalPlan, meter) -> BudgetVerdict:
    by = {r.selector: r for r in rows}
    inter, repl = by["interchange"], by["replacement"]
    base = meter.base_perplexity
    deterministic = [r for r in rows if r.selector != "random"]
    best = min(deterministic, key=lambda r: (r.perplexity, r.d_del, deterministic.index(r)))
    assert best.layers is not None  # deterministic selectors name their layers
    return BudgetVerdict(
        budget=budget,
        increase_ratio=_ratio(repl.perplexity - base, inter.perplexity - base),
        perplexity_ratio=_ratio(repl.perplexity, inter.perplexity),
        d_del_ratio=_ratio(repl.d_del, inter.d_del),
        jaccard=jaccard(plan.layers("interchange", budget), plan.layers("replacement", budget)),
        recommended=best.layers,
        recommended_by=tuple(r.selector for r in deterministic if r.layers == best.layers),
        recommended_perplexity=best.perplexity,
    )
