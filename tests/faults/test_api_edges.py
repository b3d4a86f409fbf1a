"""Arguments and call orders that used to fail late or silently: each is refused at
the call that caused it, with what to do instead."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

from redundancy_monitor import ProbeConfig, RedundancyMonitor, read_records
from redundancy_monitor.errors import (
    InvalidBatchError,
    InvalidConfigError,
    InvalidPairsError,
    RedundancyMonitorError,
)
from redundancy_monitor.monitoring.schedule import ProbeSchedule
from redundancy_monitor.probing.probe import probe

IDS = tiny_batch(2, 8)[0]


def monitor(path=None, every_n_steps=2, **probe_settings):
    return RedundancyMonitor(
        IDS,
        executor="inline",
        schedule=ProbeSchedule(every_n_steps, log_spaced=False),
        probe_config=ProbeConfig(**probe_settings),
        jsonl_path=path,
    )


def test_a_pair_generator_is_read_once_and_every_probe_uses_all_its_pairs():
    mon = monitor(pairs=((i, i + 1) for i in range(3)))
    model = tiny_model("gpt_neox", 4)
    for step in (0, 2):
        mon.step(step, model)
    assert mon.n_failures == 0 and [h.step for h in mon.history] == [0, 2]
    assert all(h.result.summary.n_pairs == 3 for h in mon.history)


@pytest.mark.parametrize(
    "pairs", [[(0.5, 1.7)], [(0, 1.0)], [("0", "1")], [(True, 2)], [(0, 1, 2)], 5]
)
def test_pairs_that_are_not_integer_slots_are_refused(pairs):
    with pytest.raises(InvalidPairsError, match=r"integers|list of"):
        monitor(pairs=pairs)
    with pytest.raises(InvalidPairsError):
        probe(tiny_model("gpt_neox", 4), IDS, pairs=pairs)


def test_integer_like_slots_are_accepted():
    pairs = [(torch.tensor(0), torch.tensor(1)), tuple(torch.tensor([1, 2]))]
    result = probe(tiny_model("gpt_neox", 4), IDS, pairs=pairs)
    assert [(r.i, r.j) for r in result.pairs] == [(0, 1), (1, 2)]


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_a_batch_tokens_that_is_not_a_positive_int_is_refused_at_construction(value):
    with pytest.raises(InvalidConfigError, match="batch_tokens"):
        monitor(batch_tokens=value)


@pytest.mark.parametrize("value", [True, False, 0, 2.0])
def test_every_n_steps_that_is_not_a_positive_int_is_refused_at_construction(value):
    with pytest.raises(InvalidConfigError, match="every_n_steps"):
        monitor(every_n_steps=value)
    with pytest.raises(InvalidConfigError, match="every_n_steps"):
        ProbeSchedule(every_n_steps=value)


def test_train_end_behind_the_last_step_is_refused_and_records_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    mon = monitor(path)
    model = tiny_model("gpt_neox", 4)
    mon.step(8, model)
    with pytest.raises(RedundancyMonitorError, match=r"train_end\(5\) after step\(8\)"):
        mon.train_end(5, model)
    mon.train_end(8, model)  # the same step is fine: probed already, nothing more
    mon.close()
    assert [r["step"] for r in read_records(path) if r["type"] == "probe"] == [8]
    assert mon.probed_steps == [8]


def test_hooks_after_close_are_refused_and_write_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    mon = monitor(path)
    model = tiny_model("gpt_neox", 4)
    mon.step(0, model)
    mon.close()
    before = path.read_bytes()
    for call in (lambda: mon.step(2, model), lambda: mon.train_end(4, model), mon.start):
        with pytest.raises(RedundancyMonitorError, match=r"after close\(\)"):
            call()
    mon.close()  # closing twice is harmless
    assert path.read_bytes() == before and mon.probed_steps == [0]


def test_probe_of_gpt2_beyond_its_positions_is_refused_before_any_forward():
    model = tiny_model("gpt2", 4)  # n_positions = 64
    calls = []
    model.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidBatchError, match=r"needs 80 positions.*at most 64"):
        probe(model, ids)
    assert calls == []
    assert probe(model, ids[:, :64]).n_layers == 4  # the fix the message names works


def test_left_padding_counts_only_valid_tokens_against_the_position_limit():
    model = tiny_model("gpt2", 4)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, :6] = 0  # 64 valid tokens each, at positions 0..63
    assert probe(model, ids, mask).n_layers == 4


def test_a_lightning_callback_closed_by_its_fit_refuses_a_second_fit_at_setup(tmp_path):
    pytest.importorskip("lightning")
    from training_fixtures import lightning_module, lightning_trainer, probe_ids, token_loader

    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    cb = RedundancyMonitorCallback(probe_ids(), schedule=ProbeSchedule(1), executor="inline")
    module = lightning_module()
    module.validation_step = module.training_step
    lightning_trainer(tmp_path, [cb], max_steps=1).validate(module, token_loader())
    assert not cb.monitor.closed  # validating first leaves it open for the fit
    lightning_trainer(tmp_path, [cb], max_steps=1).fit(module, token_loader())
    assert cb.monitor.closed and [h.step for h in cb.monitor.history] == [0, 1]
    with pytest.raises(InvalidConfigError, match="new callback"):
        lightning_trainer(tmp_path, [cb], max_steps=2).fit(module, token_loader())
