"""Baseline selectors and the measured comparison that recommends a removal set."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_batch, tiny_model

from redundancy_monitor import InvalidConfigError, make_batch, plan_removal, probe, removal_cost
from redundancy_monitor.errors import InvalidBudgetError
from redundancy_monitor.probing.blocks import find_blocks
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.variants import Variant
from redundancy_monitor.removal.baselines import greedy_deletion, hidden_state_scores, random_sets
from redundancy_monitor.removal.table import compare_removal


def test_greedy_deletion_takes_the_cheapest_deletion_at_each_step():
    model = tiny_model("llama", n_layers=5)
    ids, _ = tiny_batch(3, 12)
    steps = greedy_deletion(model, ids, budget=2)
    blocks, batch = find_blocks(model), make_batch(ids)
    singles = reference_distances(
        model, blocks, batch, [Variant.deletion(5, [s]) for s in range(5)]
    )
    first = min(range(5), key=lambda s: singles[s].mean)
    assert steps[0].layer == first
    assert steps[0].d_del == pytest.approx(singles[first].mean, rel=1e-4)
    rest = [s for s in range(5) if s != first]
    pairs = reference_distances(
        model, blocks, batch, [Variant.deletion(5, [first, s]) for s in rest]
    )
    second = min(range(4), key=lambda k: pairs[k].mean)
    assert steps[1].layer == rest[second]
    assert steps[1].d_del == pytest.approx(pairs[second].mean, rel=1e-4)


def test_block_influence_and_angular_use_block_outputs_not_the_final_norm():
    model = tiny_model("llama", n_layers=4)
    with torch.no_grad():  # a non-uniform norm weight, so that the norm changes cosines
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.model.norm.weight.numel()))
    ids, mask = tiny_batch(3, 12, padding="right")
    scores = hidden_state_scores(model, ids, mask, run_lengths=(1, 2))
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    with torch.no_grad():
        hs = list(model(ids, attention_mask=mask, output_hidden_states=True).hidden_states)
    handle.remove()
    # hidden_states[-1] is after the final norm; the last block's output is the norm's input.
    states = [*hs[:-1], captured["x"]]
    valid = mask.bool()

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a[valid], b[valid], dim=-1)

    for s in range(4):
        expected = float((1 - cos(states[s], states[s + 1])).mean())
        assert scores.block_influence[s] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    for n in (1, 2):
        for s in range(4 - n + 1):
            angle = torch.arccos(cos(states[s], states[s + n]).clamp(-1, 1)) / math.pi
            expected = float(angle.mean())
            assert scores.angular[n][s] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    wrong = float((1 - cos(hs[3], hs[4])).mean())
    assert scores.block_influence[3] != pytest.approx(wrong, rel=1e-3)


def test_block_influence_and_angular_selection_rules():
    from redundancy_monitor.removal.baselines import HiddenStateScores

    scores = HiddenStateScores((0.5, 0.1, 0.1, 0.3, 0.2), {2: (0.4, 0.3, 0.2, 0.25)})
    assert scores.block_influence_set(1) == (1,)
    assert scores.block_influence_set(3) == (1, 2, 4)  # adjacent allowed; tie -> lower index
    assert scores.angular_set(2) == (2, 3)  # the cheapest run of two consecutive blocks


def test_random_sets_are_seeded_distinct_and_independent_of_other_budgets():
    a = random_sets(10, 3, draws=6, seed=7)
    assert a == random_sets(10, 3, draws=6, seed=7)
    assert a != random_sets(10, 3, draws=6, seed=8)
    assert all(len(set(s)) == 3 and all(0 <= x < 10 for x in s) for s in a)
    assert len(set(a)) > 1
    with pytest.raises(InvalidBudgetError):
        random_sets(4, 4, draws=2)


@pytest.fixture(scope="module")
def compared():
    model = tiny_model("llama", n_layers=7)
    ids, _ = tiny_batch(3, 12)
    held = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(2))
    result = probe(model, ids)
    report = compare_removal(model, result, ids, held, budgets=(1, 2), window=24, random_draws=3)
    return model, ids, held, result, report


def test_report_costs_are_the_measured_removal_costs(compared):
    model, ids, held, result, report = compared
    plan = plan_removal(result, (1, 2))
    for budget in (1, 2):
        for protocol in ("interchange", "replacement"):
            row = report.row(budget, protocol)
            assert row.layers == plan.layers(protocol, budget)
            cost = removal_cost(model, row.layers, ids, heldout_ids=held, window=24)
            assert row.perplexity == pytest.approx(cost.perplexity, rel=1e-9)
            assert row.d_del == pytest.approx(cost.d_del, rel=1e-6)
        random = report.row(budget, "random")
        draws = [removal_cost(model, d, ids, heldout_ids=held, window=24) for d in random.draws]
        assert len(draws) == 3
        assert random.perplexity == pytest.approx(sum(c.perplexity for c in draws) / 3)
    assert report.base_perplexity == pytest.approx(cost.base_perplexity)
    assert (report.window, report.stride, report.heldout_tokens) == (24, 12, 120)


def test_recommendation_is_the_lowest_measured_heldout_perplexity(compared):
    _, _, _, _, report = compared
    for v in report.verdicts:
        rows = [r for r in report.rows if r.budget == v.budget and r.selector != "random"]
        best = min(r.perplexity for r in rows)
        assert v.recommended_perplexity == best
        assert v.recommended in [r.layers for r in rows if r.perplexity == best]
        assert set(v.recommended_by) == {r.selector for r in rows if r.layers == v.recommended}
        inter, repl = report.row(v.budget, "interchange"), report.row(v.budget, "replacement")
        base = report.base_perplexity
        if inter.perplexity > base:
            expected = (repl.perplexity - base) / (inter.perplexity - base)
            assert v.increase_ratio == pytest.approx(expected)
        assert v.perplexity_ratio == pytest.approx(repl.perplexity / inter.perplexity)
        a, b = set(inter.layers), set(repl.layers)
        assert v.jaccard == pytest.approx(len(a & b) / len(a | b))
    assert {r.selector for r in report.rows} == {
        "interchange",
        "replacement",
        "greedy",
        "block_influence",
        "angular",
        "random",
    }
    assert "n=1: recommend remove" in report.to_table()


def test_compare_removal_bad_input(compared):
    model, ids, held, result, _ = compared
    with pytest.raises(InvalidConfigError, match="unknown baseline"):
        compare_removal(model, result, ids, held, baselines=("shortgpt",))
    with pytest.raises(InvalidConfigError, match="seed >= 0"):
        compare_removal(model, result, ids, held, seed=-1)
    with pytest.raises(InvalidConfigError, match="heldout"):
        compare_removal(model, result, ids, None)
    with pytest.raises(InvalidBudgetError):
        compare_removal(model, result, ids, held, budgets=(5,))
