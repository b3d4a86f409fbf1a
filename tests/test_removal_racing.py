"""Held-out perplexity of many removal sets: the shared computation against the
straightforward path (one full forward of each pruned model), racing, bootstrap
intervals, ties, and the probe batch drawn from the whole text."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model
from score_fixtures import make_text, make_tokenizer

from redundancy_monitor.errors import CheckpointError, InvalidConfigError
from redundancy_monitor.probing.probe import prepare
from redundancy_monitor.removal.cost import heldout_windows
from redundancy_monitor.removal.heldout import (
    HeldoutOptions,
    HeldoutScores,
    SharedHeldout,
    _race_step,
    change_interval,
    measure_heldout,
)
from redundancy_monitor.removal.table import CandidateCost, SelectorCost, _verdict
from redundancy_monitor.tools.score_text import draw_text

CANDIDATES = [(0,), (2,), (5,), (1, 4), (2, 5), (0, 3), (3, 5)]


def pieces(seed: int = 3, lengths=(150, 61, 40, 9)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g) for n in lengths]


def measured(arch: str, evaluation: str, candidates=CANDIDATES, contenders=(), **options):
    model = tiny_model(arch, n_layers=6)
    root, blocks, head, batch = prepare(model, tiny_batch()[0], None, None, None)
    opts = HeldoutOptions(evaluation=evaluation, **options)
    return measure_heldout(
        root, blocks, head, pieces(), 24, 12, batch, candidates, contenders, opts
    )


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2", "mistral"])
def test_shared_computation_equals_one_full_forward_per_pruned_model(arch):
    reference = measured(arch, "reference")
    # A tiny cache bound: one window per forward, and still the same numbers.
    for shared in (measured(arch, "full"), measured(arch, "full", cache_bytes=1)):
        np.testing.assert_allclose(shared.base, reference.base, rtol=1e-6)
        for c in CANDIDATES:
            np.testing.assert_allclose(shared.nll[c], reference.nll[c], rtol=1e-6)
            assert shared.stats(c).perplexity == pytest.approx(
                reference.stats(c).perplexity, rel=1e-6
            )
        assert shared.base_perplexity == pytest.approx(reference.base_perplexity, rel=1e-6)
    # The windows: every piece of 2+ tokens, each position scored once.
    assert len(reference.windows) == len(heldout_windows(pieces(), 24, 12))
    assert int(reference.count.sum()) == sum(n - 1 for n in (150, 61, 40, 9))


def test_the_cache_stays_within_its_bound():
    model = tiny_model("llama", n_layers=6)
    root, blocks, head, batch = prepare(model, tiny_batch()[0], None, None, None)
    rows = [torch.arange(400) % 97]
    hidden, itemsize = 32, 4
    for cache_bytes in (1, 24 * hidden * itemsize * 3, 1 << 30):
        windows = heldout_windows(rows, 24, 12)
        shared = SharedHeldout(
            root, blocks, head, rows, windows, batch, HeldoutOptions(cache_bytes=cache_bytes)
        )
        for n_slots in (1, 3, 5):
            for part in shared.forward_batches(list(range(len(shared.windows))), n_slots):
                tokens = sum(shared.windows[k][2] - shared.windows[k][1] for k in part)
                kept = n_slots * tokens * hidden * itemsize
                assert kept <= cache_bytes or len(part) == 1


def test_change_interval_is_a_paired_percentile_bootstrap_over_windows():
    rng = np.random.default_rng(0)
    count = rng.integers(5, 12, 30)
    base = rng.normal(40, 3, 30)
    nll = base + rng.normal(2, 1, 30)
    est, low, high = change_interval(nll, base, count, 500, 0.9, seed=4)
    assert est == pytest.approx(math.expm1((nll.sum() - base.sum()) / count.sum()))
    picks = np.random.default_rng([4, 30]).integers(0, 30, size=(500, 30))
    boot = [math.expm1((nll[p] - base[p]).sum() / count[p].sum()) for p in picks]
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.05, 0.95])))
    assert low < est < high
    assert change_interval(base, base, count, 200, 0.95, 0) == (0.0, 0.0, 0.0)
    _, low, high = change_interval(nll[:1], base[:1], count[:1], 200, 0.95, 0)
    assert math.isnan(low) and math.isnan(high)


def synthetic(nll_by_set: dict, n: int = 40) -> HeldoutScores:
    count = np.full(n, 10)
    base = np.full(n, 30.0)
    rng = np.random.default_rng(1)
    nll = {c: base + shift + rng.normal(0, 0.5, n) for c, shift in nll_by_set.items()}
    return HeldoutScores([(0, 0, 0, 0)] * n, count, base, nll, HeldoutOptions(n_boot=300))


def test_a_set_stops_only_when_its_interval_lies_above_the_best_contenders():
    scores = synthetic({(1,): 0.1, (2,): 0.2, (3,): 5.0, (4,): 6.0, (1, 3): 3.0, (2, 4): 9.0})
    alive = list(scores.nll)
    # (4,) is random (not a contender); budget 2 has one contender, so nothing to beat it.
    stopped = _race_step(scores, alive, {(1,), (2,), (3,), (1, 3)}, 40)
    assert set(stopped) == {(3,), (4,), (2, 4)}
    best = scores.stats((1,))
    for c in stopped:
        if len(c) == 1:
            assert scores.stats(c).change_low > best.change_high
    assert scores.stats((2,)).change_low <= best.change_high  # overlapping: kept racing
    assert _race_step(scores, alive, set(), 40) == []  # no contender, no race


def test_racing_stops_sets_clearly_worse_than_the_best_and_keeps_the_rest_exact():
    model = tiny_model("llama", n_layers=6)
    with torch.no_grad():  # block 3 adds nothing: removing it costs exactly 0
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    root, blocks, head, batch = prepare(model, tiny_batch()[0], None, None, None)
    # Periodic text: every window alike, so intervals are narrow and racing decides early.
    rows = [torch.tensor([5, 17, 3, 42, 8, 91, 23, 60, 11]).repeat(70)[:600]]
    candidates = [(s,) for s in range(6)]
    run = {
        ev: measure_heldout(
            root, blocks, head, rows, 24, 12, batch, candidates, [(3,)],
            HeldoutOptions(evaluation=ev, min_windows=8),
        )
        for ev in ("race", "reference")
    }  # fmt: skip
    race, ref = run["race"], run["reference"]
    n_windows = len(race.windows)
    assert race.stopped_at and (3,) not in race.stopped_at
    assert race.stats((3,)).perplexity_change == 0.0
    for c in candidates:
        stats = race.stats(c)
        assert np.isfinite(race.nll[c]).sum() == stats.windows
        if c in race.stopped_at:  # above the best's [0, 0], on its share and on all the text
            assert stats.stopped_early and stats.windows == race.stopped_at[c] < n_windows
            assert stats.heldout_tokens < int(race.count.sum())
            assert stats.change_low > 0 and ref.stats(c).change_low > 0
        else:
            assert stats.windows == n_windows and not stats.stopped_early
            np.testing.assert_allclose(race.nll[c], ref.nll[c], rtol=1e-6)


def cost(layers, change, low, high, stopped=False) -> CandidateCost:
    return CandidateCost(layers, ("x",), 0.1, 0.1, 10 * (1 + change), change, low, high, 99, 9,
                         stopped)  # fmt: skip


def row(selector, layers, change, low, high, stopped=False) -> SelectorCost:
    return SelectorCost(2, selector, layers, 0.1, 10 * (1 + change), change, change_low=low,
                        change_high=high, stopped_early=stopped)  # fmt: skip


def test_the_verdict_names_the_sets_statistically_tied_with_the_recommendation():
    from redundancy_monitor.removal.selection import RemovalPlan

    costs = {
        (1, 3): cost((1, 3), 0.05, 0.02, 0.08),
        (2, 4): cost((2, 4), 0.07, 0.04, 0.10),
        (0, 5): cost((0, 5), 0.30, 0.20, 0.40),
        (2, 5): cost((2, 5), 0.01, -0.5, 0.6, stopped=True),  # stopped: never recommended
    }
    rows = [
        row("interchange", (1, 3), 0.05, 0.02, 0.08),
        row("replacement", (2, 4), 0.07, 0.04, 0.10),
        row("greedy", (0, 5), 0.30, 0.20, 0.40),
        row("angular", (2, 5), 0.01, -0.5, 0.6, stopped=True),
    ]
    plan = RemovalPlan({"interchange": {2: (1, 3)}, "replacement": {2: (2, 4)}}, {}, {})
    v = _verdict(2, rows, plan, 10.0, costs)
    assert v.recommended == (1, 3) and v.recommended_interval == (0.02, 0.08)
    assert v.tied_with == ((2, 4), (2, 5)) and v.statistically_tied
    assert v.tied_selectors == (("replacement",), ("angular",))
    assert "statistically tied with [2, 4] (replacement)" in v.sentence()
    alone = _verdict(2, [*rows[:1], row("replacement", (0, 5), 0.3, 0.2, 0.4)], plan, 10.0, costs)
    assert alone.tied_with == () and alone.sentence() == ""
    assert alone.to_dict()["statistically_tied"] is False


def test_bad_options_are_refused():
    for bad in [dict(evaluation="fast"), dict(shares=(0.0, 1.0)), dict(min_windows=1),
                dict(confidence=1.0), dict(cache_bytes=0)]:  # fmt: skip
        with pytest.raises(InvalidConfigError):
            HeldoutOptions(**bad)


# -- the probe batch drawn from the whole text ----------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(make_text(3000, seed=0))


def texts():
    return [(f"part{k}.txt", make_text(n, seed=k)) for k, n in enumerate((2500, 900, 1600))]


def test_probe_sequences_come_from_all_over_the_text_and_are_recorded(tokenizer):
    split = draw_text(tokenizer, texts(), 8, 32, seed=0)
    docs = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in texts()]
    assert split.probe_ids.shape == (8, 32)
    assert {s.source for s in split.sequences} == {0, 1, 2}  # every file
    first = [s.start for s in split.sequences if s.source == 0]
    assert max(first) - min(first) > docs[0].numel() // 3  # spread over the file
    for ids, s in zip(split.probe_ids, split.sequences, strict=True):
        assert torch.equal(ids, docs[s.source][s.start : s.end])
    for ids, s in zip(split.heldout_ids, split.heldout_spans, strict=True):
        assert torch.equal(ids, docs[s.source][s.start : s.end])
        for q in split.sequences:  # disjoint, and a guard of seq_len tokens away
            if q.source == s.source:
                assert s.end + split.guard <= q.start or q.end + split.guard <= s.start
    taken = 8 * 32 * 3
    assert split.heldout_tokens >= split.text_tokens - taken >= split.text_tokens // 2
    record = split.to_dict()
    assert record["sequences"][0]["file"] == texts()[split.sequences[0].source][0]
    assert record["heldout_tokens"] == split.heldout_tokens and record["guard_tokens"] == 32
    assert record["heldout_source"] == "split" and record["seed"] == 0
    again = draw_text(tokenizer, texts(), 8, 32, seed=0)
    assert torch.equal(again.probe_ids, split.probe_ids)
    other = draw_text(tokenizer, texts(), 8, 32, seed=1)
    assert other.sequences != split.sequences


def test_probe_batch_with_a_heldout_file_and_too_little_text(tokenizer):
    held = ("held.txt", make_text(300, seed=9))
    split = draw_text(tokenizer, texts()[:1], 4, 32, seed=0, heldout=held)
    assert split.heldout_source == "file" and split.sources[-1] == "held.txt"
    assert split.guard == 0 and len(split.heldout_ids) == 1
    with pytest.raises(CheckpointError, match="too short for one sequence"):
        draw_text(tokenizer, [("short.txt", "the cat sees a dog .")], 4, 32)


# -- progress ------------------------------------------------------------------------------


def test_progress_shows_each_phase_as_a_bar_or_one_line_and_nothing_when_off():
    import io

    from redundancy_monitor.removal.progress import Phases

    def run(mode: str, fail: bool = False) -> str:
        out = io.StringIO()
        phases = Phases(mode, stream=out)
        expected = pytest.raises(ValueError) if fail else contextlib.nullcontext()
        with expected, phases.phase("load", "ckpt", 1, at_end=True) as bar:
            if fail:
                raise ValueError("bad checkpoint")
            bar.update(1)
        with phases.phase("held-out perplexity", "9 sets", 20, "window") as bar:
            bar.update(5)
            bar.total -= 5  # racing stopped a set
            bar.update(10)
        phases.announce("probe", "adjacent pairs")
        return out.getvalue()

    lines = run("lines").splitlines()
    assert [x.split("] ", 1)[1].split(":")[0] for x in lines] == [
        "load", "held-out perplexity", "probe"
    ]  # fmt: skip
    assert lines[0].endswith("s)") and "9 sets" in lines[1]
    bars = run("bars")
    assert "held-out perplexity" in bars and "15/15" in bars and "probe" not in bars
    assert run("off") == ""
    # A failing load shows nothing, so that its error is the only line.
    assert "load" not in run("lines", fail=True) and "load" not in run("bars", fail=True)
    assert Phases.of(True).mode == "bars" and Phases.of(False).mode == "off"
    with pytest.raises(InvalidConfigError):
        Phases("loud")
