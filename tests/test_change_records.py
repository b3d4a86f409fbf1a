"""Change records (docs/intervals.md, "Change"): what the Recorder adds to each probe
record, that a run whose weights do not change raises no default alert (a checkpoint
whose level already looks alarming included), resume, and new baselines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model

from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.probe_config import ProbeConfig
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.recorder import Recorder
from redundancy_monitor.monitoring.schedule import ProbeSchedule
from redundancy_monitor.probing.change import CHANGE_SCALARS, paired_change
from redundancy_monitor.probing.intervals import from_per_sequence
from redundancy_monitor.probing.result import PerSequence


def alarming_model():
    """A random init whose level looks alarming: regime `unreliable`, gap_median > 0.10
    with its whole interval, as on a real pretrained checkpoint."""
    model = tiny_model("llama", 5, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name:
                p.mul_(3.0)
    return model


def train(model, monitor, steps: int, lr: float, ids):
    """A real training loop (SGD on next-token loss); lr=0 leaves the weights as they are."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    monitor.start()
    monitor.step(0, model)
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monitor.before_weights_change()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step, model)
    monitor.train_end(steps, model)
    monitor.close()


@pytest.mark.parametrize("make", [lambda: tiny_model("gpt_neox", 4), alarming_model])
def test_default_alerts_fire_nothing_when_the_weights_do_not_change(tmp_path, make):
    probe_ids, _ = tiny_batch(n_seq=6, seq_len=12, seed=2)
    train_ids, _ = tiny_batch(n_seq=4, seq_len=12, seed=3)
    runs = {}
    for name, alerts in (("default", AlertConfig()), ("level", AlertConfig(gap_threshold=0.1))):
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        monitor = RedundancyMonitor(
            probe_ids,
            schedule=ProbeSchedule(every_n_steps=2, log_spaced=False),
            executor="inline",
            alerts=alerts,
            jsonl_path=tmp_path / f"{name}.jsonl",
        )
        train(model, monitor, steps=8, lr=0.0, ids=train_ids)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        runs[name] = (monitor, read_records(tmp_path / f"{name}.jsonl"))
    monitor, records = runs["default"]
    assert monitor.alerts == []
    assert not [r for r in records if r["type"] == "alert"]
    probes = [r for r in records if r["type"] == "probe"]
    assert [p["step"] for p in probes] == [0, 2, 4, 6, 8]
    assert "change" not in probes[0]
    for p in probes[1:]:
        assert p["change"]["baseline"]["step"] == 0
        assert p["change"]["previous"]["step"] == p["step"] - 2
        for name in CHANGE_SCALARS:
            c = p["change"]["baseline"]
            if c[name] is not None:
                assert (c[name], c[f"{name}_low"], c[f"{name}_high"]) == (0.0, 0.0, 0.0)
    (state,) = [r for r in records if r["type"] == "baseline_state"]
    assert state["step"] == 0 and state["regime"] == probes[0]["result"]["summary"]["regime"]
    if make is alarming_model:  # the level rule, opted into, fires on the same run
        assert state["regime"] == "unreliable" and state["low"] > 0.1
        assert [a.rule for a in runs["level"][0].alerts] == ["gap_threshold"]


def test_change_records_of_a_training_run_and_the_history(tmp_path):
    probe_ids, _ = tiny_batch(n_seq=6, seq_len=12, seed=2)
    train_ids, _ = tiny_batch(n_seq=4, seq_len=12, seed=3)
    model = tiny_model("gpt_neox", 4)
    monitor = RedundancyMonitor(
        probe_ids,
        schedule=ProbeSchedule(every_n_steps=3, log_spaced=False),
        executor="inline",
        jsonl_path=tmp_path / "r.jsonl",
    )
    train(model, monitor, steps=6, lr=0.5, ids=train_ids)
    probes = [r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "probe"]
    last = ProbeRecord.from_dict(probes[-1])
    first, middle = (ProbeRecord.from_dict(p) for p in probes[:2])
    since_base, since_prev = last.change.baseline, last.change.previous
    assert (since_base.step, since_prev.step) == (0, 3)
    # The record equals the paired change computed from the two records themselves.
    direct = paired_change(first.result, last.result, 0)
    assert since_base.values == pytest.approx(direct.values, abs=0)
    assert since_base.interval("gap_median") == pytest.approx(direct.interval("gap_median"))
    assert since_base.pairs == direct.pairs
    gap_change = last.result.summary.gap_mean - first.result.summary.gap_mean
    assert since_base.value("gap_mean") == gap_change != 0
    # The history keeps each change's scalars, not its pairs.
    assert monitor.history[-1].change.baseline.values == since_base.values
    assert monitor.history[-1].change.baseline.pairs == []
    assert middle.change.previous.step == 0


def test_a_resumed_monitor_measures_change_against_the_same_baseline(tmp_path):
    probe_ids, _ = tiny_batch(n_seq=5, seq_len=12, seed=2)
    model = tiny_model("llama", 4)
    weights = []
    for k in range(4):  # the weights at steps 0, 2, 4, 6
        with torch.no_grad():
            model.model.layers[k % 4].mlp.down_proj.weight.mul_(1.3)
        weights.append({n: v.clone() for n, v in model.state_dict().items()})

    def monitor(path):
        return RedundancyMonitor(
            probe_ids,
            schedule=ProbeSchedule(every_n_steps=2, log_spaced=False, at_train_end=False),
            executor="inline",
            jsonl_path=path,
        )

    def drive(mon, steps):
        mon.start()
        for step in steps:
            model.load_state_dict(weights[step // 2])
            mon.step(step, model)

    straight = monitor(tmp_path / "straight.jsonl")
    drive(straight, [0, 2, 4, 6])
    straight.close()
    first = monitor(tmp_path / "resumed.jsonl")
    drive(first, [0, 2])
    state = first.state_dict()
    first.close()
    second = monitor(tmp_path / "resumed.jsonl")
    second.load_state_dict(state)
    drive(second, [4, 6])
    second.close()
    a = [r for r in read_records(tmp_path / "straight.jsonl") if r["type"] == "probe"]
    b = [r for r in read_records(tmp_path / "resumed.jsonl") if r["type"] == "probe"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 4, 6]
    assert [r.get("change") for r in a] == [r.get("change") for r in b]
    assert b[3]["change"]["baseline"]["step"] == 0 and b[2]["change"]["previous"]["step"] == 2


def _result(seed: int, sha: str, n_pairs: int = 3, n: int = 6):
    rng = np.random.default_rng(seed)
    tables = {
        k: tuple(map(tuple, rng.uniform(0.01, 0.2, (n_pairs, n))))
        for k in ("repl_ij", "repl_ji", "d_int")
    }
    result = from_per_sequence(PerSequence(tuple((k, k + 1) for k in range(n_pairs)), tables))
    result.meta = dataclasses.replace(result.meta, batch_sha256=sha)
    return result


def test_a_new_baseline_starts_change_afresh():
    recorder = Recorder(
        alerts=AlertConfig(hysteresis=1), on_mismatch="new_baseline", probe_config=ProbeConfig()
    )
    for step, seed, sha in (
        (0, 0, "a" * 64),
        (5, 1, "a" * 64),
        (10, 2, "b" * 64),
        (15, 3, "b" * 64),
    ):
        recorder.record(ProbeRecord(step, _result(seed, sha)))
    (old,) = recorder.earlier_trajectories
    assert old[0].change is None and old[1].change.baseline.step == 0
    now = recorder.history
    assert now[0].step == 10 and now[0].change is None
    assert now[1].change.baseline.step == 10 and now[1].change.previous.step == 10
    assert recorder.baseline_state["step"] == 10
    assert recorder.state_dict()["change_baseline"]["step"] == 10


def test_definitions_section_6_lists_every_rule_with_the_defaults_of_alert_config():
    """docs/definitions.md §6's rule table states AlertConfig()'s defaults exactly."""
    import ast
    import re
    from pathlib import Path

    from redundancy_monitor.monitoring.alerts import RULES

    text = (Path(__file__).parents[1] / "docs" / "definitions.md").read_text()
    section = text[text.index("## 6.") : text.index("## 7.")]
    rows = [line for line in section.splitlines() if re.match(r"\| `\w+` \|", line)]
    config, stated, on = AlertConfig(), {}, {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        if len(cells) == 3:  # the shared settings' table: | `name` | `value` | meaning |
            stated[cells[0].strip("`")] = ast.literal_eval(cells[1].strip("`"))
            continue
        rule, _, default, settings = cells
        on[rule.strip("`")] = default == "on"
        for name, value in re.findall(r"`(\w+)=([^`]+)`", settings):
            stated[name] = ast.literal_eval(value)
    assert set(on) == set(RULES)
    assert stated == {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    assert on["gap_growth"] == config.growth_on and on["gap_decline"] == config.decline_on
    assert on["gap_threshold"] == (config.gap_threshold is not None)
    assert on["removal_overlap"] == (config.overlap_threshold is not None)


def test_a_state_without_change_tables_loads_and_the_next_probe_becomes_the_baseline():
    first = Recorder(probe_config=ProbeConfig())
    for step, seed in ((0, 0), (5, 1)):
        first.record(ProbeRecord(step, _result(seed, "a" * 64)))
    state = first.state_dict()
    for key in ("change_baseline", "change_previous", "change_sample_size", "baseline_state"):
        del state[key]  # what an earlier version saved
    resumed = Recorder(probe_config=ProbeConfig())
    resumed.load_state_dict(state)
    for step, seed in ((10, 2), (15, 3)):
        resumed.record(ProbeRecord(step, _result(seed, "a" * 64)))
    assert [h.step for h in resumed.history] == [0, 5, 10, 15]
    assert resumed.history[2].change is None
    assert resumed.history[3].change.baseline.step == 10
