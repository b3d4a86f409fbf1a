"""Baseline layer selectors that removal guidance is compared against (docs/definitions.md §5).

- Iterative greedy deletion (SLEB-style): remove the layer whose deletion costs least
  on the probe batch given the layers already removed, then repeat. All candidates of
  one step are one call of the engine.
- Block Influence (ShortGPT): 1 - cos(block input, block output), mean over valid tokens;
  the n lowest are removed.
- Angular distance (Gromov et al.): arccos(cos)/pi between the hidden state before
  block l and after block l+n-1; the run of n consecutive blocks with the smallest is
  removed (for n = 1: the distance before and after one block).
- Random: seeded uniform draws of n layers; costs are reported as mean and spread.

Hidden states come from hooks on the blocks, never `output_hidden_states` (whose last
entry is taken after the final norm).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from redundancy_monitor.errors import InvalidBudgetError
from redundancy_monitor.probing.batch import ProbeBatch
from redundancy_monitor.probing.engine import EngineOptions, variant_distances
from redundancy_monitor.probing.model_io import block_hidden, call_model, untouched
from redundancy_monitor.probing.probe import prepare
from redundancy_monitor.probing.variants import Variant


@dataclass(frozen=True)
class GreedyStep:
    """One step of iterative greedy deletion: the layer added and d_del of the set so far."""

    layer: int
    d_del: float


def greedy_deletion_steps(
    root: nn.Module,
    blocks: nn.ModuleList,
    head: nn.Module,
    batch: ProbeBatch,
    budget: int,
    options: EngineOptions | None = None,
    progress=None,
) -> list[GreedyStep]:
    """SLEB-style greedy deletion on a prepared batch; ties go to the lower layer."""
    n_layers = len(blocks)
    if not 1 <= budget < n_layers:
        raise InvalidBudgetError(
            f"greedy deletion budget must be in 1..{n_layers - 1}, got {budget}"
        )
    chosen: list[int] = []
    steps = []
    for _ in range(budget):
        candidates = [s for s in range(n_layers) if s not in chosen]
        variants = [Variant.deletion(n_layers, [*chosen, s]) for s in candidates]
        distances = variant_distances(root, blocks, head, batch, variants, options)
        best = min(range(len(candidates)), key=lambda k: (distances[k].mean, candidates[k]))
        chosen.append(candidates[best])
        steps.append(GreedyStep(candidates[best], distances[best].mean))
        if progress is not None:
            progress.update(1)
    return steps


def greedy_deletion(
    model: nn.Module,
    input_ids,
    attention_mask=None,
    budget: int = 3,
    blocks: str | nn.ModuleList | None = None,
    head: str | nn.Module | None = None,
) -> list[GreedyStep]:
    """Iterative greedy deletion; the set at budget n is the first n steps' layers.

    Example:
        >>> steps = greedy_deletion(model, probe_ids, budget=3)
        >>> sorted(s.layer for s in steps[:2])  # the budget-2 removal set
    """
    root, block_list, head_module, batch = prepare(model, input_ids, attention_mask, blocks, head)
    return greedy_deletion_steps(root, block_list, head_module, batch, budget)


@dataclass(frozen=True)
class HiddenStateScores:
    """Per-token cosine statistics of block inputs/outputs, from hooks on the blocks.

    Attributes:
        block_influence: per layer, 1 - cos(input, output), mean over valid tokens.
        angular: ``angular[n][l]`` = arccos(cos(input of l, output of l+n-1))/pi, mean
            over valid tokens, for each run length n computed.
    """

    block_influence: tuple[float, ...]
    angular: dict[int, tuple[float, ...]]

    def block_influence_set(self, budget: int) -> tuple[int, ...]:
        ranked = sorted(
            range(len(self.block_influence)), key=lambda s: (self.block_influence[s], s)
        )
        return tuple(sorted(ranked[:budget]))

    def angular_set(self, budget: int) -> tuple[int, ...]:
        scores = self.angular[budget]
        start = min(range(len(scores)), key=lambda s: (scores[s], s))
        return tuple(range(start, start + budget))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def hidden_state_scores_on(
    root: nn.Module, blocks: nn.ModuleList, batch: ProbeBatch, run_lengths: Iterable[int] = (1,)
) -> HiddenStateScores:
    """Block Influence and angular distance from one forward with hooks on the blocks."""
    n_layers = len(blocks)
    valid = batch.attention_mask.bool()
    # Every block's hooks fill its slot during the one forward below.
    inputs: list[Any] = [None] * n_layers
    outputs: list[Any] = [None] * n_layers

    def pre_hook(slot):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[slot] = hidden[valid]

        return hook

    def post_hook(slot):
        def hook(module, args, output):
            outputs[slot] = block_hidden(output)[valid]

        return hook

    handles = []
    for s, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(s), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(s)))
    try:
        with untouched(root):
            call_model(root, batch)
    finally:
        for h in handles:
            h.remove()
    ins = [x for x in inputs if x is not None]
    outs = [x for x in outputs if x is not None]
    bi = tuple(float((1 - _cosine(ins[s], outs[s])).mean()) for s in range(n_layers))
    angular = {}
    for n in sorted(set(run_lengths)):
        if not 1 <= n < n_layers:
            raise InvalidBudgetError(f"run length must be in 1..{n_layers - 1}, got {n}")
        angular[n] = tuple(
            float((torch.arccos(_cosine(ins[s], outs[s + n - 1]).clamp(-1, 1)) / math.pi).mean())
            for s in range(n_layers - n + 1)
        )
    return HiddenStateScores(bi, angular)


def hidden_state_scores(
    model: nn.Module,
    input_ids,
    attention_mask=None,
    run_lengths: Iterable[int] = (1,),
    blocks: str | nn.ModuleList | None = None,
) -> HiddenStateScores:
    """Block Influence and angular distance of `model` on the probe batch."""
    root, block_list, _, batch = prepare(model, input_ids, attention_mask, blocks, None)
    return hidden_state_scores_on(root, block_list, batch, run_lengths)


def random_sets(n_layers: int, budget: int, draws: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`draws` uniform random sets of `budget` distinct layers, reproducible from `seed`.

    The generator is seeded from (seed, budget), so each budget's draws do not depend on
    which other budgets are evaluated.
    """
    if not 1 <= budget < n_layers:
        raise InvalidBudgetError(f"random budget must be in 1..{n_layers - 1}, got {budget}")
    rng = np.random.default_rng([seed, budget])
    return [
        tuple(sorted(int(x) for x in rng.choice(n_layers, size=budget, replace=False)))
        for _ in range(draws)
    ]
