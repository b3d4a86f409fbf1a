"""Unusual models through the training-time monitor: heterogeneous, frozen, quantized,
on the meta device. The probe records what it could not do; training never stops."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_config, tiny_model
from test_probe_api import ToyLM

from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, probe, read_records


def monitor(path, ids=None, **kw):
    return RedundancyMonitor(
        tiny_batch(2, 8)[0] if ids is None else ids,
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        jsonl_path=path,
        **kw,
    )


def test_heterogeneous_blocks_are_skipped_with_the_reason_in_the_record_file(tmp_path):
    torch.manual_seed(0)
    model = ToyLM(inners=(24, 24, 32, 24))
    ids = torch.randint(0, 50, (2, 7))
    config = ProbeConfig(blocks="trunk.stack", head="out", pairs="all")
    mon = monitor(tmp_path / "r.jsonl", ids, probe_config=config)
    mon.step(0, model)
    mon.close()
    (record,) = [r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "probe"]
    skipped = {(s["i"], s["j"]): s["reason"] for s in record["result"]["skipped"]}
    assert set(skipped) == {(0, 2), (1, 2), (2, 3)}
    assert all("shape" in reason for reason in skipped.values())
    assert len(record["result"]["pairs"]) == 3 and mon.n_failures == 0


def test_frozen_model_is_monitored_like_a_trainable_one(tmp_path):
    model = tiny_model("gpt_neox", 4)
    want = probe(model, tiny_batch(2, 8)[0]).summary.scalars()
    model.requires_grad_(False)
    mon = monitor(tmp_path / "r.jsonl")
    mon.step(0, model)
    assert mon.history[0].result.summary.scalars() == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert not any(p.requires_grad for p in model.parameters())


def test_quantized_model_is_a_failure_record_and_later_steps_still_run(tmp_path):
    model = torch.ao.quantization.quantize_dynamic(
        tiny_model("gpt_neox", 4), {torch.nn.Linear}, dtype=torch.qint8
    )
    mon = monitor(tmp_path / "r.jsonl")
    for step in range(3):
        model(input_ids=tiny_batch(2, 8)[0])  # "training" goes on
        mon.step(step, model)
    mon.close()
    assert (mon.n_failures, mon.n_probes) == (3, 0)
    failures = [r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "failure"]
    assert [f["step"] for f in failures] == [0, 1, 2]
    assert all("quantized" in f["error"] for f in failures)


def test_meta_device_model_is_a_failure_record_with_advice(tmp_path):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("gpt_neox", 3))
    mon = monitor(tmp_path / "r.jsonl")
    mon.step(0, model)
    mon.close()
    (failure,) = [r for r in read_records(tmp_path / "r.jsonl") if r["type"] == "failure"]
    assert "meta device" in failure["error"] and "load the weights" in failure["error"]
    assert [a.rule for a in mon.alerts] == ["probe_failure"]
