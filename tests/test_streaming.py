"""Streamed block weights: the streamer's bookkeeping, and probes that equal the resident ones."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model
from test_engine import _close, _variants

from redundancy_monitor import probe
from redundancy_monitor.probing.engine import variant_distances
from redundancy_monitor.probing.probe import prepare
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.streaming import BlockStreamer, ModuleWeights, streamed_model

BLOCK_BYTES = 4 * 10 * 4  # four fp32 tensors of 10 elements


def fake_blocks(n: int):
    """A loader of n blocks (block b's tensors are filled with b) that logs each load."""
    loads: list[int] = []

    def load(b: int) -> dict[str, torch.Tensor]:
        loads.append(b)
        return {f"w{k}": torch.full((10,), float(b)) for k in range(4)}

    return load, loads


def test_streamer_copies_ahead_in_plan_order_and_holds_at_most_capacity_blocks():
    load, loads = fake_blocks(6)
    streamer = BlockStreamer(load, "cpu", capacity=3)
    streamer.plan(range(6))
    assert loads == [0, 1, 2]  # copied ahead, before any block is asked for
    for b in range(6):
        got = streamer.get(b)
        assert all(torch.equal(t, torch.full((10,), float(b))) for t in got.values())
        assert streamer.bytes_held <= 3 * BLOCK_BYTES
    assert loads == [0, 1, 2, 3, 4, 5]  # each block copied once for a plain forward
    assert streamer.peak_bytes == 3 * BLOCK_BYTES
    assert streamer.n_loads == 6
    streamer.close()
    assert streamer.bytes_held == 0


def test_streamer_keeps_a_block_needed_again_soon_and_recopies_one_dropped_earlier():
    load, loads = fake_blocks(6)
    streamer = BlockStreamer(load, "cpu", capacity=2)
    # One slot runs blocks 1 then 0, the next 1 again: 1 stays; 0 comes back after 3.
    uses = [1, 0, 1, 2, 3, 0]
    streamer.plan(uses)
    for b in uses:
        assert streamer.get(b)["w0"][0].item() == b
        assert streamer.bytes_held <= 2 * BLOCK_BYTES
    assert loads == [1, 0, 2, 3, 0]
    assert streamer.peak_bytes == 2 * BLOCK_BYTES


def test_a_block_outside_the_plan_is_copied_when_asked_for():
    load, loads = fake_blocks(4)
    streamer = BlockStreamer(load, "cpu", capacity=2)
    streamer.plan([0, 1])
    streamer.get(0)
    assert streamer.get(3)["w0"][0].item() == 3
    assert 3 in loads and streamer.bytes_held <= 2 * BLOCK_BYTES


@pytest.mark.parametrize("padding", [None, "left"])
def test_streamed_engine_equals_resident_engine_and_reference(arch, padding):
    model = tiny_model(arch, n_layers=4)
    ids, mask = tiny_batch(padding=padding)
    root, blocks, head, batch = prepare(model, ids, mask)
    variants = _variants(4, "all")
    resident = variant_distances(root, blocks, head, batch, variants)
    with streamed_model(root, blocks, ModuleWeights(root, blocks), "cpu", 2) as (weights, _):
        streamed = variant_distances(root, blocks, head, batch, variants, weights=weights)
        assert weights.peak_bytes <= 2 * max(
            sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks
        )
    _close(streamed, reference_distances(root, blocks, batch, variants))
    _close(streamed, resident)


def test_streamed_probe_with_small_forwards_equals_the_resident_probe():
    model = tiny_model("llama", n_layers=6)
    ids, mask = tiny_batch(n_seq=4, seq_len=10, padding="left")
    kwargs = dict(pairs="all", protocols=("replacement", "interchange", "deletion"))
    resident = probe(model, ids, mask, **kwargs)
    streamed = probe(model, ids, mask, stream_to="cpu", batch_tokens=40, logit_rows=8, **kwargs)
    for got, want in zip(streamed.pairs, resident.pairs, strict=True):
        assert got.d_repl == pytest.approx(want.d_repl, abs=1e-5, rel=1e-4)
        assert got.d_int == pytest.approx(want.d_int, abs=1e-5, rel=1e-4)
    assert [d.slot for d in streamed.deletion] == [d.slot for d in resident.deletion]
    assert streamed.summary.regime == resident.summary.regime
    assert streamed.meta.streamed["capacity_blocks"] == 3
    assert resident.meta.streamed is None


def test_streamed_probe_holds_non_block_weights_and_at_most_three_blocks():
    model = tiny_model("gpt_neox", n_layers=8)
    ids, _ = tiny_batch()

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    blocks = model.gpt_neox.layers
    block_bytes = size(blocks[0].parameters())
    non_block = size(model.parameters()) - size(blocks.parameters()) + size(model.buffers())
    result = probe(model, ids, stream_to="cpu")
    peak = result.meta.streamed["device_weight_peak_bytes"]
    assert peak == non_block + 3 * block_bytes
    assert peak < size(model.parameters())


def test_a_streamed_probe_leaves_the_model_as_it_was():
    model = tiny_model("qwen3", n_layers=4)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as many LMs are
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    probe(model, *tiny_batch(padding="right"), stream_to="cpu", pairs="all")
    for name, p in model.named_parameters():
        same, before = params[name]
        assert p is same and torch.equal(p, before)
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_streaming_onto_cpu_copies_the_weights_rather_than_sharing_them():
    model = tiny_model("llama", n_layers=3)
    root, blocks, _, _ = prepare(model, *tiny_batch())
    embedding = model.model.embed_tokens.weight
    with streamed_model(root, blocks, ModuleWeights(root, blocks), "cpu") as (weights, skeleton):
        placed = model.model.embed_tokens.weight
        assert placed is not embedding and placed.data_ptr() != embedding.data_ptr()
        assert torch.equal(placed, embedding)
        got = weights.get(0)
        assert all(got[n].data_ptr() != p.data_ptr() for n, p in blocks[0].named_parameters())
        assert skeleton == sum(
            t.numel() * t.element_size() for t in [*ModuleWeights(root, blocks).skeleton().values()]
        )
    assert model.model.embed_tokens.weight is embedding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_to_cuda_from_pinned_host_weights_equals_the_cuda_probe():
    model = tiny_model("llama", n_layers=4)
    ids, mask = tiny_batch(padding="left")
    on_device = probe(model.cuda(), ids, mask, pairs="all")
    host = model.cpu()
    for p in host.parameters():
        p.data = p.data.pin_memory()
    streamed = probe(host, ids, mask, pairs="all", stream_to="cuda")
    for got, want in zip(streamed.pairs, on_device.pairs, strict=True):
        assert got.d_repl == pytest.approx(want.d_repl, abs=1e-5, rel=1e-4)
        assert got.d_int == pytest.approx(want.d_int, abs=1e-5, rel=1e-4)
    assert next(host.parameters()).device.type == "cpu"
