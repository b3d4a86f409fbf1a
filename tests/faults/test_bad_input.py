"""Bad input through the training-time monitor (the engine's cases, caught when the
monitor is built rather than at every probe), and property tests of the docs/definitions.md §5 removal
selection, which the alert rules share with `plan_removal`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor
from redundancy_monitor.errors import (
    InvalidBatchError,
    InvalidBudgetError,
    InvalidConfigError,
    InvalidPairsError,
    InvalidProtocolError,
    RedundancyMonitorError,
)
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.probing.result import PairRecord, ProbeMeta, ProbeResult, summarize
from redundancy_monitor.removal.selection import (
    greedy_non_adjacent,
    plan_removal,
    removability,
    removal_overlap,
)

IDS = torch.ones(2, 4, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "error", "says", "advice"),
    [
        ({"probe_batch": torch.zeros(5, dtype=torch.long)}, InvalidBatchError, "2-D", "unsqueeze(0)"),
        ({"probe_batch": torch.zeros(2, 3)}, InvalidBatchError, "integer", "pass token ids"),
        ({"probe_batch": torch.zeros(0, 4, dtype=torch.long)}, InvalidBatchError, "empty", "pass at least one token"),
        ({"probe_batch": (IDS, torch.zeros(2, 4))}, InvalidBatchError, "all padding", "pass a mask with 1"),
        ({"probe_batch": {"input_ids": IDS, "attention_mask": torch.ones(2, 5)}}, InvalidBatchError, "same shape", "pass a mask of the same shape"),
        ({"probe_config": {"pairs": "window:0"}}, InvalidPairsError, "window", "e.g. 'window:3'"),
        ({"probe_config": {"pairs": "neighbours"}}, InvalidPairsError, "adjacent", "pass 'adjacent', 'window:k', 'all'"),
        ({"probe_config": {"pairs": [(1, 1)]}}, InvalidPairsError, "same slot", "use i != j"),
        ({"probe_config": {"protocols": ("replacement", "swap")}}, InvalidProtocolError, "interchange", "choose from"),
        ({"executor": "thread"}, InvalidConfigError, "background", "one of ('background', 'inline')"),
        ({"on_mismatch": "ignore"}, InvalidConfigError, "new_baseline", "one of ('refuse', 'new_baseline')"),
        ({"stop_on_alert": ["gap_too_big"]}, InvalidConfigError, "known", "known: ('gap_threshold'"),
        ({"checkpoint_on_alert": ["nope"]}, InvalidConfigError, "known", "known: ('gap_threshold'"),
        ({"probe_config": {"blocks": torch.nn.ModuleList()}}, InvalidConfigError, "dotted path", "must be a dotted path string"),
        ({"texts": ["a b c"]}, InvalidConfigError, "tokenizer", "pass tokenizer="),
    ],
)  # fmt: skip
def test_bad_monitor_input_is_refused_when_the_monitor_is_built(kwargs, error, says, advice):
    kwargs = {"probe_batch": IDS, **kwargs}
    if "texts" in kwargs:
        kwargs.pop("probe_batch")
    with pytest.raises(error, match=says) as info:
        if "probe_config" in kwargs:  # the settings are checked where they are grouped
            kwargs["probe_config"] = ProbeConfig(**kwargs["probe_config"])
        RedundancyMonitor(**kwargs)
    assert advice in str(info.value)  # it says what to pass instead


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hysteresis": 0},
        {"cooldown_steps": -1},
        {"growth_factor": 1.0},
        {"overlap_threshold": 0.0},
        {"overlap_budget": 0},
        {"growth_floor": 0.0},
    ],
)
def test_bad_alert_config_is_refused(kwargs):
    with pytest.raises(InvalidConfigError):
        AlertConfig(**kwargs)


def test_a_pair_out_of_range_for_the_model_is_a_failure_record_not_a_crash(tmp_path):
    from conftest import tiny_model

    mon = RedundancyMonitor(
        IDS,
        probe_config=ProbeConfig(pairs=[(0, 9)]),
        executor="inline",
        schedule=ProbeSchedule(None, steps=(0,)),
    )
    mon.step(0, tiny_model("gpt_neox", 4))
    assert mon.n_failures == 1 and "InvalidPairsError" in mon.alerts[0].message


# -- the removal selection ---------------------------------------------------------------

distance = st.one_of(
    st.floats(0, 5, allow_nan=False), st.just(math.nan), st.just(math.inf), st.none()
)


@st.composite
def adjacent_results(draw):
    n = draw(st.integers(2, 14))
    records = []
    for i in range(n - 1):
        if draw(st.booleans()) or n < 4:  # some adjacent pairs not probed
            repl = draw(distance)
            records.append(PairRecord.build(i, i + 1, repl, repl, draw(distance)))
    return ProbeResult(records, summarize(records), meta=ProbeMeta(n_layers=n))


@given(result=adjacent_results(), protocol=st.sampled_from(["interchange", "replacement"]))
@settings(max_examples=300, deadline=None)
def test_selection_is_never_adjacent_respects_the_budget_and_is_deterministic(result, protocol):
    field = "d_int" if protocol == "interchange" else "d_repl"
    scores = removability(result, protocol)
    for layer, score in scores.items():  # the min rule over finite adjacent pairs
        near = [getattr(r, field) for r in result.pairs if layer in (r.i, r.j)]
        finite = [d for d in near if d is not None and math.isfinite(d)]
        assert score == (min(finite) if finite else None)
    order = greedy_non_adjacent(scores)
    assert order == greedy_non_adjacent(dict(reversed(list(scores.items()))))
    assert all(scores[layer] is not None for layer in order)
    if order:
        best = min(s for s in scores.values() if s is not None)
        assert order[0] == min(k for k, s in scores.items() if s == best)
    budgets = range(1, min(len(order), result.n_layers - 1) + 1)
    if not budgets:
        return
    plan = plan_removal(result, budgets, (protocol,))
    for b in budgets:
        chosen = plan.layers(protocol, b)
        assert len(chosen) == b
        assert all(abs(x - y) > 1 for x in chosen for y in chosen if x != y)
        assert set(plan.layers(protocol, b - 1) if b > 1 else ()) <= set(chosen)
    again = plan_removal(result, budgets, (protocol,))
    assert again.to_dict() == plan.to_dict()


@given(result=adjacent_results(), budget=st.integers(1, 20))
@settings(max_examples=200, deadline=None)
def test_a_budget_above_what_can_be_picked_is_refused_and_the_alert_rule_agrees(result, budget):
    order = {
        p: greedy_non_adjacent(removability(result, p)) for p in ("replacement", "interchange")
    }
    jaccard, by_repl, by_int = removal_overlap(result, budget)
    assert by_repl == set(order["replacement"][:budget])
    assert by_int == set(order["interchange"][:budget])
    if budget > min(len(o) for o in order.values()) and budget < result.n_layers:
        with pytest.raises(InvalidBudgetError, match="non-adjacent"):
            plan_removal(result, [budget])
    union = by_repl | by_int
    assert jaccard == (len(by_repl & by_int) / len(union) if union else None)


# -- errors outside the constructors ------------------------------------------------------


def _unprobed_pair():
    from conftest import tiny_batch, tiny_model

    from redundancy_monitor.probing.probe import probe

    probe(tiny_model("llama", 4), tiny_batch()[0], pairs="adjacent").pair(0, 3)


def _report_without_budget():
    from redundancy_monitor.removal.selection import RemovalPlan
    from redundancy_monitor.removal.table import RemovalReport

    RemovalReport(1.0, 4, 2, 8, (1,), [], [], RemovalPlan({}, {}, {})).verdict(2)


def _tensorboard_sink_without_a_destination():
    from redundancy_monitor.monitoring.tensorboard import TensorBoardSink

    TensorBoardSink()


def _output_without_logits():
    from redundancy_monitor.probing.model_io import logits_of

    logits_of({"hidden": torch.zeros(1)})


@pytest.mark.parametrize(
    ("call", "builtin", "advice"),
    [
        (_unprobed_pair, KeyError, "pairs='all'"),
        (_report_without_budget, KeyError, "the table has budgets [1]"),
        (_tensorboard_sink_without_a_destination, ValueError, "log_dir="),
        (_output_without_logits, TypeError, "with .logits"),
    ],
)
def test_errors_a_user_can_hit_are_library_errors_of_the_builtin_kind(call, builtin, advice):
    with pytest.raises(builtin) as info:
        call()
    assert isinstance(info.value, RedundancyMonitorError), type(info.value).__mro__
    assert advice in str(info.value)
