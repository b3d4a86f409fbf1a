"""The monitor's host snapshot: streamed probes, memory figures, the free-memory check,
and no device work before the first optimizer step (on CPU, where the "device" is the CPU
and the streamer's own count gives the device bytes)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model
from test_monitor_core import sgd_loop

import redundancy_monitor.monitoring.monitor as monitor_module
from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, probe, read_records
from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.device_memory import DeviceBudget, estimate_need
from redundancy_monitor.monitoring.sinks import Sink
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink


class Collect(Sink):
    def __init__(self):
        self.records = []

    def write_probe(self, record) -> None:
        self.records.append(record)


def size(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def monitor(shadow_device, every_n_steps=2, steps=(), at_train_end=True, batch_tokens=None, **kw):
    schedule = ProbeSchedule(every_n_steps, False, tuple(steps), at_train_end)
    config = ProbeConfig() if batch_tokens is None else ProbeConfig(batch_tokens=batch_tokens)
    kw.setdefault("executor", "inline")
    return RedundancyMonitor(
        tiny_batch()[0], shadow_device=shadow_device, schedule=schedule, probe_config=config, **kw
    )


def test_host_shadow_probes_equal_device_shadow_probes_and_a_direct_probe():
    runs = {}
    for where in ("host", "device"):
        model = tiny_model("gpt_neox", 4)
        mon = monitor(where)
        kept = sgd_loop(model, mon, 4, keep=(2,))
        runs[where] = {h.step: h.result.summary.scalars() for h in mon.history}
    assert sorted(runs["host"]) == [0, 2, 4]
    for step in (0, 2, 4):
        assert runs["host"][step] == pytest.approx(runs["device"][step], rel=1e-4, abs=1e-6)
    direct = probe(kept[2], tiny_batch()[0]).summary.scalars()
    assert runs["host"][2] == pytest.approx(direct, rel=1e-4, abs=1e-6)


def test_the_host_shadow_is_refilled_in_place_and_never_shares_the_training_weights():
    model = tiny_model("gpt_neox", 4)
    mon = monitor("host")
    sgd_loop(model, mon, 2)
    shadow = mon._shadow.shadow
    pointers = [p.data_ptr() for p in shadow.parameters()]
    mon.step(3, model)
    mon.step(4, model)
    assert [p.data_ptr() for p in mon._shadow.shadow.parameters()] == pointers
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(shadow.parameters(), model.parameters(), strict=True)
    )
    assert all(p.device.type == "cpu" for p in shadow.parameters())


def test_every_probe_record_carries_the_memory_figures(tmp_path):
    model = tiny_model("gpt_neox", 8)
    mon = monitor(
        "host", jsonl_path=tmp_path / "r.jsonl", sinks=[TensorBoardSink(log_dir=tmp_path)]
    )
    sgd_loop(model, mon, 2)
    mon.close()
    blocks = model.gpt_neox.layers
    non_block = size(model.parameters()) - size(blocks.parameters()) + size(model.buffers())
    whole = size(model.parameters()) + size(model.buffers())
    metas = [
        r["result"]["meta"] for r in read_records(tmp_path / "r.jsonl") if r["type"] == "probe"
    ]
    assert len(metas) == 2
    for meta in metas:
        assert meta["shadow_host_bytes"] == whole
        assert meta["shadow_device_bytes"] == 0
        # On CPU: the streamer's count of what it held: non-block weights + 3 blocks.
        assert meta["probe_device_peak_bytes"] == non_block + 3 * size(blocks[0].parameters())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    for name in ("shadow_host_bytes", "shadow_device_bytes", "probe_device_peak_bytes"):
        values = [e.value for e in events.Scalars(f"redundancy_probe/{name}")]
        assert values == [float(metas[0][name])] * 2


def test_device_shadow_records_its_bytes_as_device_bytes():
    model = tiny_model("gpt_neox", 4)
    mon = monitor("device", steps=(0,), every_n_steps=None, at_train_end=False)
    collect = Collect()
    mon.sinks.append(collect)
    mon.step(0, model)
    meta = collect.records[0].result.meta
    assert meta.shadow_device_bytes == size(model.parameters()) + size(model.buffers())
    assert meta.shadow_host_bytes == 0


def test_shadow_dtype_bf16_halves_the_host_copy():
    model = tiny_model("gpt_neox", 4)
    mon = monitor("host", shadow_dtype="bf16")
    sgd_loop(model, mon, 2)
    shadow = mon._shadow.shadow
    assert {p.dtype for p in shadow.parameters()} == {torch.bfloat16}
    assert size(shadow.parameters()) * 2 == size(model.parameters())
    assert [h.step for h in mon.history] == [0, 2]
    assert mon.n_failures == 0


def test_a_host_probe_starts_only_after_the_first_optimizer_step(monkeypatch):
    calls = []
    real = monitor_module.probe

    def counting(*args, **kwargs):
        calls.append(kwargs.get("stream_to"))
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "probe", counting)
    model = tiny_model("gpt_neox", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mon = monitor("host")
    mon.step(0, model)
    assert calls == [] and mon.history == []  # snapshot taken, probe not started
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # the optimizer step changes the weights
    mon.before_weights_change()
    mon.step(1, model)
    assert len(calls) == 1 and calls[0] == torch.device("cpu")
    assert [h.step for h in mon.history] == [0]
    unchanged = tiny_model("gpt_neox", 4)
    unchanged.load_state_dict(before)
    want = probe(unchanged, tiny_batch()[0]).summary.scalars()
    assert mon.history[0].result.summary.scalars() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_a_device_shadow_on_cpu_probes_at_once():
    mon = monitor("device")
    mon.step(0, tiny_model("gpt_neox", 4))
    assert [h.step for h in mon.history] == [0]


def test_a_probe_waiting_for_an_optimizer_step_runs_at_train_end():
    mon = monitor("host", steps=(0,), every_n_steps=None, at_train_end=True)
    model = tiny_model("gpt_neox", 4)
    mon.step(0, model)
    assert mon.history == []
    mon.train_end(0, model)
    assert [h.step for h in mon.history] == [0]


def test_a_probe_that_does_not_fit_in_free_memory_is_a_recorded_failure_not_started(
    monkeypatch, tmp_path
):
    calls = []
    monkeypatch.setattr(monitor_module, "probe", lambda *a, **k: calls.append(1))
    mon = monitor("host", jsonl_path=tmp_path / "r.jsonl")
    mon.device_budget = DeviceBudget(lambda device: (1000, 80 << 30))
    sgd_loop(tiny_model("gpt_neox", 4), mon, 2)
    mon.close()
    assert calls == []
    records = read_records(tmp_path / "r.jsonl")
    failures = [r for r in records if r["type"] == "failure"]
    assert [f["step"] for f in failures] == [0, 2]
    assert "DeviceMemoryError: not enough free device memory: need " in failures[0]["error"]
    assert "free 1000 B; lower batch_tokens" in failures[0]["error"]
    assert any(r["type"] == "alert" and r["rule"] == "probe_failure" for r in records)


def test_the_memory_check_compares_the_estimate_with_the_free_memory():
    model = tiny_model("gpt_neox", 4)
    ids = tiny_batch()[0]
    need = estimate_need(model, ids, {"batch_tokens": 64}, streamed=True)
    resident = estimate_need(model, ids, {"batch_tokens": 64}, streamed=False)
    blocks = model.gpt_neox.layers
    assert need - resident == (
        size(model.parameters())
        - size(blocks.parameters())
        + size(model.buffers())
        + 3 * size(blocks[0].parameters())
    )
    seen = []
    mon = monitor("host", steps=(0,), every_n_steps=None, at_train_end=True, batch_tokens=64)
    mon.device_budget = DeviceBudget(lambda device: (seen.append(device) or need, need))
    mon.step(0, model)
    mon.before_weights_change()
    mon.step(1, model)
    assert seen == [torch.device("cpu")]
    assert mon.n_failures == 0 and [h.step for h in mon.history] == [0]  # need == free fits
    mon.device_budget = DeviceBudget(lambda device: (need - 1, need))
    mon.train_end(1, model)
    assert mon.n_failures == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [({"shadow_device": "gpu"}, "shadow_device"), ({"shadow_dtype": torch.int8}, "shadow_dtype")],
)
def test_bad_shadow_options_are_refused_with_what_to_pass(kwargs, message):
    with pytest.raises(InvalidConfigError, match=message):
        RedundancyMonitor(tiny_batch()[0], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_host_shadow_uses_no_device_memory_between_probes_and_equals_device_shadow():
    runs, metas = {}, {}
    for where in (None, "device"):  # None: host, the default on CUDA
        model = tiny_model("gpt_neox", 4).cuda()
        mon = monitor(where)
        collect = Collect()
        mon.sinks.append(collect)
        sgd_loop(model, mon, 4)
        runs[where] = {h.step: h.result.summary.scalars() for h in mon.history}
        metas[where] = collect.records[-1].result.meta
        if where is None:
            assert all(p.is_pinned() for p in mon._shadow.shadow.parameters())
    assert sorted(runs[None]) == sorted(runs["device"]) == [0, 2, 4]
    for step in runs["device"]:
        assert runs[None][step] == pytest.approx(runs["device"][step], rel=1e-4, abs=1e-6)
    assert metas[None].shadow_device_bytes == 0
    assert metas[None].probe_device_peak_bytes > 0  # the probe's private pool
    assert metas["device"].shadow_device_bytes == metas[None].shadow_host_bytes


def test_uneven_shards_of_any_dim_and_dtype_reassemble_exactly():
    from redundancy_monitor.monitoring.sharded import HostShards, ShardEntry

    world = 3
    g = torch.Generator().manual_seed(0)
    full = {
        "half": (torch.randn(3, 3, generator=g).to(torch.bfloat16), 0),  # 6 bytes per rank
        "rows": (torch.randn(7, 5, generator=g), 0),  # 3, 3, 1 rows; fp32 after 6 bytes
        "columns": (torch.randn(2, 5, generator=g), 1),  # sharded along dim 1
        "few": (torch.randn(2, generator=g), 0),  # fewer rows than ranks: rank 2 holds none
    }
    ranks = []
    for rank in range(world):
        shards = HostShards.__new__(HostShards)
        shards.entries = []
        for name, (tensor, dim) in full.items():
            chunks = list(torch.chunk(tensor, world, dim))  # how FSDP2 shards
            chunks += [tensor.narrow(dim, 0, 0)] * (world - len(chunks))
            local = chunks[rank].clone()
            shards.entries.append(ShardEntry(name, local, tuple(tensor.shape), dim, True))
        ranks.append(shards)
    indices = list(range(len(full)))
    parts = [shards.part(indices, rank, world) for rank, shards in enumerate(ranks)]
    assert len({p.numel() for p in parts}) == 1  # every rank sends the same number of bytes
    assembled = ranks[0].assemble(indices, parts, world)
    for name, (tensor, _) in full.items():
        assert assembled[name].dtype == tensor.dtype
        assert torch.equal(assembled[name], tensor), name


@pytest.mark.parametrize("shadow_device", ["host", "device"])
def test_training_with_the_monitor_ends_with_the_weights_of_an_unmonitored_run(shadow_device):
    def train(monitor) -> dict:
        model = tiny_model("gpt_neox", 4)
        torch.manual_seed(3)  # the same data and dropout draws in both runs
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        if monitor:
            monitor.step(0, model)
        for step in range(1, 5):
            ids = torch.randint(0, 97, (4, 12))
            model(input_ids=ids, labels=ids).loss.backward()
            if monitor:
                monitor.before_weights_change()
            opt.step()
            opt.zero_grad()
            if monitor:
                monitor.step(step, model)
        if monitor:
            monitor.train_end(4, model)
            assert [h.step for h in monitor.history] == [0, 2, 4]
        return model.state_dict()

    plain = train(None)
    watched = train(monitor(shadow_device))
    assert all(torch.equal(plain[k], v) for k, v in watched.items())
