"""Which layers to remove, from probe distances alone (docs/definitions.md §5).

Pure functions of a `ProbeResult`: removability, the greedy non-adjacent selection, the
removal plan per budget, and the overlap of two protocols' sets. No torch: the alert rules
and the report use these without loading a model; measuring what a removal costs lives
in `redundancy_monitor.removal.cost`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redundancy_monitor.errors import InvalidBudgetError, InvalidProtocolError
from redundancy_monitor.probing.result import ProbeResult

#: The pair distance each guiding protocol ranks layers by.
PROTOCOL_DISTANCE = {"interchange": "d_int", "replacement": "d_repl"}
GUIDED_PROTOCOLS = tuple(PROTOCOL_DISTANCE)


def _distance_field(protocol: str) -> str:
    try:
        return PROTOCOL_DISTANCE[protocol]
    except KeyError:
        raise InvalidProtocolError(
            f"removal is guided by 'interchange' or 'replacement', got {protocol!r}"
        ) from None


def removability(result: ProbeResult, protocol: str) -> dict[int, float | None]:
    """Removability of every layer under `protocol` (docs/definitions.md §5); lower = safer to remove.

    Layer l scores the minimum of the protocol's distance over the probed pairs
    ``(l-1, l)`` and ``(l, l+1)``. A layer with no finite adjacent pair scores None and
    is never selected.

    Raises:
        InvalidProtocolError: `protocol` is not ``"interchange"`` or ``"replacement"``.
    """
    name = _distance_field(protocol)
    by_pair = {(r.i, r.j): getattr(r, name) for r in result.pairs if r.separation == 1}
    scores: dict[int, float | None] = {}
    for layer in range(result.n_layers):
        values = [by_pair.get((layer - 1, layer)), by_pair.get((layer, layer + 1))]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        scores[layer] = min(finite) if finite else None
    return scores


def greedy_non_adjacent(scores: dict[int, float | None]) -> list[int]:
    """Layers in order of removability, skipping any adjacent to one already taken.

    Ties are broken by the lower layer index, so the order is deterministic.
    """
    ranked = sorted((s, layer) for layer, s in scores.items() if s is not None)
    chosen: list[int] = []
    for _, layer in ranked:
        if all(abs(layer - c) > 1 for c in chosen):
            chosen.append(layer)
    return chosen


def default_budget(n_layers: int) -> int:
    """The budget the overlap alert and the report use unless told: a quarter of the
    layers, at least 1."""
    return max(1, n_layers // 4)


def check_budgets(budgets: Iterable[int], n_layers: int) -> tuple[int, ...]:
    """Sorted distinct budgets; raises InvalidBudgetError for a non-positive one, one that
    would remove every block, or none."""
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidBudgetError(f"budgets must be positive integers, got {b!r}")
        if b >= n_layers:
            raise InvalidBudgetError(
                f"budget {b} would remove every block of a {n_layers}-block model; "
                f"pass budgets below {n_layers}"
            )
        if b not in out:
            out.append(b)
    if not out:
        raise InvalidBudgetError("no budget given; pass e.g. budgets=(1, 2, 3)")
    return tuple(sorted(out))


def check_removal_set(layers: Iterable[int], n_layers: int) -> tuple[int, ...]:
    """Sorted distinct layers; raises InvalidBudgetError if out of range, none or all."""
    layers = tuple(sorted(set(int(s) for s in layers)))
    bad = [s for s in layers if not 0 <= s < n_layers]
    if bad:
        raise InvalidBudgetError(
            f"cannot remove layer {bad[0]}: the model has layers 0..{n_layers - 1} (0-based)"
        )
    if not layers or len(layers) >= n_layers:
        raise InvalidBudgetError(
            f"remove between 1 and {n_layers - 1} of the {n_layers} layers, got {list(layers)}"
        )
    return layers


@dataclass(frozen=True)
class RemovalPlan:
    """Layers to remove per protocol and budget, with the removability behind them."""

    sets: dict[str, dict[int, tuple[int, ...]]]
    removability: dict[str, dict[int, float | None]]
    order: dict[str, tuple[int, ...]]

    def layers(self, protocol: str, budget: int) -> tuple[int, ...]:
        return self.sets[protocol][budget]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sets": {p: {str(b): list(s) for b, s in d.items()} for p, d in self.sets.items()},
            "removability": {
                p: {str(k): v for k, v in d.items()} for p, d in self.removability.items()
            },
            "order": {p: list(o) for p, o in self.order.items()},
        }


def plan_removal(
    result: ProbeResult,
    budgets: Iterable[int] = (1, 2, 3),
    protocols: Sequence[str] = GUIDED_PROTOCOLS,
) -> RemovalPlan:
    """Per protocol and budget n: the n most removable layers, never two adjacent.

    Raises:
        InvalidBudgetError: a budget is not a positive integer, or is larger than the
            number of non-adjacent layers the protocol can pick.
        InvalidProtocolError: a protocol other than interchange or replacement.
    """
    if isinstance(protocols, str):
        protocols = (protocols,)
    budgets = check_budgets(budgets, result.n_layers)
    sets, scores, orders = {}, {}, {}
    for protocol in protocols:
        scores[protocol] = removability(result, protocol)
        order = greedy_non_adjacent(scores[protocol])
        too_big = [b for b in budgets if b > len(order)]
        if too_big:
            raise InvalidBudgetError(
                f"budget {too_big[0]} is larger than the {len(order)} non-adjacent layers "
                f"{protocol} can pick from the probed adjacent pairs of this "
                f"{result.n_layers}-block model; pass budgets up to {len(order)}"
            )
        orders[protocol] = tuple(order)
        sets[protocol] = {b: tuple(sorted(order[:b])) for b in budgets}
    return RemovalPlan(sets, scores, orders)


def jaccard(a: Iterable[int], b: Iterable[int]) -> float | None:
    """|a & b| / |a | b|; None when both are empty."""
    a, b = set(a), set(b)
    union = a | b
    return len(a & b) / len(union) if union else None


def removal_overlap(result: ProbeResult, budget: int) -> tuple[float | None, set[int], set[int]]:
    """Jaccard overlap of the replacement- and interchange-guided removal sets at `budget`,
    with the two sets. Unlike `plan_removal` it never refuses a budget: a protocol that
    can pick fewer layers contributes the ones it can."""
    by_repl = set(greedy_non_adjacent(removability(result, "replacement"))[:budget])
    by_int = set(greedy_non_adjacent(removability(result, "interchange"))[:budget])
    return jaccard(by_repl, by_int), by_repl, by_int
