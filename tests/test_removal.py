"""Removal guidance: removability rule, selection, d_del and held-out perplexity (docs/definitions.md §5)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import tiny_batch, tiny_model

from redundancy_monitor import (
    InvalidConfigError,
    PairRecord,
    ProbeResult,
    make_batch,
    plan_removal,
    probe,
    removal_cost,
)
from redundancy_monitor.errors import InvalidBudgetError, InvalidProtocolError
from redundancy_monitor.probing.blocks import find_blocks
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.result import ProbeMeta, summarize
from redundancy_monitor.probing.variants import Variant
from redundancy_monitor.removal.cost import window_plan
from redundancy_monitor.removal.selection import greedy_non_adjacent, jaccard, removability


def hand_result(n_layers: int, pairs: dict[tuple[int, int], tuple[float, float]]) -> ProbeResult:
    """A ProbeResult whose pair (i, j) has d_repl and d_int as given (both directions equal)."""
    records = [PairRecord.build(i, j, r, r, d) for (i, j), (r, d) in sorted(pairs.items())]
    return ProbeResult(records, summarize(records), meta=ProbeMeta(n_layers=n_layers))


def test_removability_is_min_over_adjacent_pairs_only():
    result = hand_result(
        5,
        {
            (0, 1): (0.5, 0.40),
            (1, 2): (0.3, 0.20),
            (2, 3): (0.6, 0.10),
            (3, 4): (0.2, 0.70),
            (0, 2): (0.01, 0.01),  # separation 2: never counts
        },
    )
    assert removability(result, "interchange") == {0: 0.40, 1: 0.20, 2: 0.10, 3: 0.10, 4: 0.70}
    assert removability(result, "replacement") == {0: 0.5, 1: 0.3, 2: 0.3, 3: 0.2, 4: 0.2}


def test_layer_without_probed_adjacent_pair_is_never_selected():
    result = hand_result(5, {(0, 1): (0.5, 0.4), (1, 2): (0.3, 0.2), (0, 3): (0.0, 0.0)})
    scores = removability(result, "interchange")
    assert scores[3] is None and scores[4] is None
    assert greedy_non_adjacent(scores) == [1]


def test_selection_never_takes_two_adjacent_layers_and_breaks_ties_by_index():
    # Layers 2 and 3 tie at 0.1 and are adjacent: 2 wins on index, 3 is skipped.
    result = hand_result(
        6,
        {(0, 1): (1, 0.9), (1, 2): (1, 0.5), (2, 3): (1, 0.1), (3, 4): (1, 0.6), (4, 5): (1, 0.3)},
    )
    plan = plan_removal(result, budgets=(1, 2, 3), protocols=("interchange",))
    assert plan.order["interchange"] == (2, 4, 0)
    assert plan.layers("interchange", 1) == (2,)
    assert plan.layers("interchange", 2) == (2, 4)
    assert plan.layers("interchange", 3) == (0, 2, 4)
    for layers in plan.sets["interchange"].values():
        assert all(b - a > 1 for a, b in itertools.pairwise(layers))


def test_budget_larger_than_non_adjacent_picks_is_refused_with_the_limit():
    result = hand_result(4, {(0, 1): (1, 0.1), (1, 2): (1, 0.2), (2, 3): (1, 0.3)})
    with pytest.raises(InvalidBudgetError, match="up to 2"):
        plan_removal(result, budgets=(3,))
    for bad in [(0,), (-1,), (1.5,), (), (4,)]:
        with pytest.raises(InvalidBudgetError):
            plan_removal(result, budgets=bad)
    with pytest.raises(InvalidProtocolError):
        plan_removal(result, protocols=("deletion",))


def test_jaccard():
    assert jaccard((1, 3), (3, 5)) == pytest.approx(1 / 3)
    assert jaccard((1,), (1,)) == 1.0
    assert jaccard((), ()) is None


@pytest.mark.parametrize(
    "n,window,stride", [(10, 4, 2), (10, 4, 3), (7, 10, 5), (33, 8, 3), (2, 2, 1)]
)
def test_sliding_windows_score_every_position_once(n, window, stride):
    scored = []
    for begin, end, first in window_plan(n, window, stride):
        assert end - begin <= window and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_d_del_matches_the_slow_reference(arch):
    model = tiny_model(arch, n_layers=5)
    ids, mask = tiny_batch(3, 12, padding="right")
    cost = removal_cost(model, [1, 3], ids, mask)
    (ref,) = reference_distances(
        model, find_blocks(model), make_batch(ids, mask), [Variant.deletion(5, [1, 3])]
    )
    assert cost.d_del == pytest.approx(ref.mean, rel=1e-4, abs=1e-6)
    assert cost.d_del_last == pytest.approx(ref.last, rel=1e-4, abs=1e-6)
    assert cost.d_del > 0 and cost.perplexity is None


def test_base_perplexity_equals_the_models_own_loss_in_one_window():
    model = tiny_model("llama", n_layers=4)
    held = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(5))
    ids, _ = tiny_batch()
    cost = removal_cost(model, [2], ids, heldout_ids=held, window=40, stride=20)
    with torch.no_grad():
        loss = model(held.unsqueeze(0), labels=held.unsqueeze(0)).loss
    assert cost.base_perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert (cost.window, cost.stride, cost.heldout_tokens) == (40, 20, 40)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pruned_perplexity_equals_a_model_with_the_blocks_deleted(arch):
    model = tiny_model(arch, n_layers=5)
    held = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(6))
    ids, _ = tiny_batch()
    cost = removal_cost(model, [1, 3], ids, heldout_ids=held, window=16, stride=8)

    pruned = copy.deepcopy(model)
    layers = find_blocks(pruned)
    for s in (3, 1):
        del layers[s]
    pruned.config.num_hidden_layers = 3
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [
            t for k, t in enumerate(pruned.config.layer_types) if k not in (1, 3)
        ]
    # Same windows by hand: 16 tokens, stride 8, score the tokens not scored before.
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in window_plan(50, 16, 8):
            logits = pruned(held[begin:end].unsqueeze(0), use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[first - 1 - begin : end - 1 - begin], -1)
            nll -= float(logp.gather(-1, held[first:end].unsqueeze(-1)).sum())
            count += end - first
    assert cost.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert cost.perplexity != pytest.approx(cost.base_perplexity, rel=1e-3)
    assert cost.perplexity_change == pytest.approx(cost.perplexity / cost.base_perplexity - 1)


def test_removal_cost_leaves_the_model_unchanged():
    model = tiny_model("llama", n_layers=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block_objects = list(find_blocks(model))
    ids, _ = tiny_batch()
    removal_cost(model, [1], ids, heldout_ids=torch.arange(30) % 97, window=8)
    assert model.training and all(m.training for m in model.modules())
    assert list(find_blocks(model)) == block_objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_removal_cost_bad_input():
    model = tiny_model("llama", n_layers=4)
    ids, _ = tiny_batch()
    with pytest.raises(InvalidBudgetError, match=r"layers 0\.\.3"):
        removal_cost(model, [7], ids)
    with pytest.raises(InvalidBudgetError):
        removal_cost(model, [0, 1, 2, 3], ids)
    with pytest.raises(InvalidConfigError, match="stride"):
        removal_cost(model, [1], ids, heldout_ids=torch.arange(20), window=8, stride=8)
    with pytest.raises(InvalidConfigError, match="max_position_embeddings"):
        removal_cost(model, [1], ids, heldout_ids=torch.arange(20), window=1000)
    with pytest.raises(InvalidConfigError, match="at least 2"):
        removal_cost(model, [1], ids, heldout_ids=torch.tensor([3]))


def test_plan_from_a_real_probe_picks_the_lowest_adjacent_distance_first():
    model = tiny_model("llama", n_layers=6)
    ids, _ = tiny_batch(3, 12)
    result = probe(model, ids)
    plan = plan_removal(result, budgets=(1, 2))
    for protocol, field in (("interchange", "d_int"), ("replacement", "d_repl")):
        best = min((getattr(r, field), layer) for r in result.pairs for layer in (r.i, r.j))
        assert plan.layers(protocol, 1) == (best[1],)
