"""The fast engine against the one-forward-per-variant reference, and docs/definitions.md §2 invariants."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHITECTURES, tiny_batch, tiny_model

from redundancy_monitor import probe
from redundancy_monitor.probing.engine import EngineOptions, variant_distances
from redundancy_monitor.probing.probe import plan_variants, prepare
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.variants import Variant, parse_pairs

ATOL, RTOL = 1e-5, 1e-4


def _close(fast, ref):
    for f, r in zip(fast, ref, strict=True):
        assert f.mean == pytest.approx(r.mean, abs=ATOL, rel=RTOL)
        assert f.last == pytest.approx(r.last, abs=ATOL, rel=RTOL)
        for a, b in zip(f.per_seq, r.per_seq, strict=True):
            assert a == pytest.approx(b, abs=ATOL, rel=RTOL)


def _variants(n_layers, pairs, with_deletion=True):
    protocols = ["replacement", "interchange"] + (["deletion"] if with_deletion else [])
    found = list(plan_variants(n_layers, parse_pairs(pairs, n_layers), protocols))
    if with_deletion:
        found.append(Variant.deletion(n_layers, [0, 2]))
    return found


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_engine_matches_reference_on_every_architecture(arch, padding):
    model = tiny_model(arch, n_layers=4)
    ids, mask = tiny_batch(padding=padding)
    root, blocks, head, batch = prepare(model, ids, mask)
    variants = _variants(4, "all")
    fast = variant_distances(root, blocks, head, batch, variants)
    ref = reference_distances(root, blocks, batch, variants)
    _close(fast, ref)
    assert min(r.mean for r in ref) > 1e-4  # the comparison is not between zeros


@pytest.mark.parametrize("pairs", ["adjacent", "window:3", "all"])
@pytest.mark.parametrize(
    "options",
    [EngineOptions(), EngineOptions(logit_rows=8, batch_tokens=40)],
    ids=["default", "chunked"],
)
def test_engine_matches_reference_for_each_pair_set(pairs, options):
    model = tiny_model("llama", n_layers=6)
    ids, mask = tiny_batch(n_seq=4, seq_len=10, padding="left")
    root, blocks, head, batch = prepare(model, ids, mask)
    variants = _variants(6, pairs)
    fast = variant_distances(root, blocks, head, batch, variants, options)
    _close(fast, reference_distances(root, blocks, batch, variants))


def test_probe_records_match_reference_distances():
    model = tiny_model("gpt_neox", n_layers=5)
    ids, mask = tiny_batch(padding="right")
    result = probe(model, ids, mask, pairs="window:2")
    root, blocks, _, batch = prepare(model, ids, mask)
    for rec in result.pairs:
        r_ij, r_ji, d_int = reference_distances(
            root,
            blocks,
            batch,
            [
                Variant.replacement(5, rec.i, rec.j),
                Variant.replacement(5, rec.j, rec.i),
                Variant.interchange(5, rec.i, rec.j),
            ],
        )
        assert rec.repl_ij == pytest.approx(r_ij.mean, abs=ATOL, rel=RTOL)
        assert rec.repl_ji == pytest.approx(r_ji.mean, abs=ATOL, rel=RTOL)
        assert rec.d_repl == pytest.approx(max(r_ij.mean, r_ji.mean), abs=ATOL, rel=RTOL)
        assert rec.d_int == pytest.approx(d_int.mean, abs=ATOL, rel=RTOL)
        assert rec.gap == pytest.approx(rec.d_repl - rec.d_int, abs=1e-12)
        assert rec.ir == pytest.approx(rec.d_int / rec.d_repl, rel=1e-9)
        assert rec.d_int_last == pytest.approx(d_int.last, abs=ATOL, rel=RTOL)
        assert rec.separation == rec.j - rec.i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_variants_are_zero_in_reference_and_engine(arch, dtype):
    model = tiny_model(arch, n_layers=3, dtype=dtype)
    ids, mask = tiny_batch(padding="left")
    root, blocks, head, batch = prepare(model, ids, mask)
    same = [Variant.identity(3), Variant.replacement(3, 1, 1), Variant.interchange(3, 2, 2)]
    for d in reference_distances(root, blocks, batch, same):
        assert abs(d.mean) < 1e-6 and abs(d.last) < 1e-6
    for d in variant_distances(root, blocks, head, batch, same):
        assert d.mean == 0.0 and d.last == 0.0


def test_bf16_model_kl_is_fp32_and_agrees_with_reference():
    model = tiny_model("llama", n_layers=4, dtype=torch.bfloat16)
    ids, mask = tiny_batch(padding="left")
    root, blocks, head, batch = prepare(model, ids, mask)
    variants = _variants(4, "adjacent")
    fast = variant_distances(root, blocks, head, batch, variants)
    ref = reference_distances(root, blocks, batch, variants)
    for f, r in zip(fast, ref, strict=True):
        assert math.isfinite(f.mean) and f.mean > 0
        # bf16 blocks see a differently sized batch than the reference; allow bf16 noise.
        assert f.mean == pytest.approx(r.mean, rel=2e-2, abs=1e-4)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_probe_leaves_model_bitwise_unchanged_in_its_mode_without_graph():
    model = tiny_model("qwen3", n_layers=4)
    model.train()
    model.model.layers[1].eval()  # a mixed-mode model must come back mixed
    blocks_before = list(model.model.layers)
    state = _snapshot(model)
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    ids, mask = tiny_batch(padding="right")
    probe(model, ids, mask, pairs="all", protocols=("replacement", "interchange", "deletion"))
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert torch.equal(rng, torch.get_rng_state())
    assert list(model.model.layers) == blocks_before
    assert "forward" not in model.lm_head.__dict__
    assert all(p.grad is None for p in model.parameters())


def test_left_padding_gives_the_same_distance_as_the_unpadded_sequence():
    model = tiny_model("llama", n_layers=3)
    ids, _ = tiny_batch(n_seq=1, seq_len=8)
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    plain = probe(model, ids, pairs="adjacent")
    left = probe(model, padded, mask, pairs="adjacent")
    for a, b in zip(plain.pairs, left.pairs, strict=True):
        assert b.d_int == pytest.approx(a.d_int, rel=1e-4, abs=1e-6)
        assert b.repl_ij == pytest.approx(a.repl_ij, rel=1e-4, abs=1e-6)


def test_logit_memory_is_bounded_by_rows_whatever_the_number_of_variants():
    model = tiny_model("llama", n_layers=6)
    ids, _ = tiny_batch(n_seq=4, seq_len=12)
    root, blocks, head, batch = prepare(model, ids)
    widest = []
    vocab = model.config.vocab_size

    def record(module, args, out):
        if out.shape[-1] == vocab:  # the recorder stand-in returns one column, not logits
            widest.append(out[..., 0].numel())

    hook = head.register_forward_hook(record)
    try:
        for pairs in ("adjacent", "all"):
            widest.clear()
            variant_distances(
                root, blocks, head, batch, _variants(6, pairs), EngineOptions(logit_rows=40)
            )
            assert max(widest) <= 40 // 4
    finally:
        hook.remove()


def test_fast_engine_evaluates_fewer_blocks_than_the_reference():
    """Slots before a variant's first change are never recomputed."""
    model = tiny_model("gpt_neox", n_layers=6)
    ids, _ = tiny_batch()
    root, blocks, head, batch = prepare(model, ids)
    variants = _variants(6, "adjacent", with_deletion=False)
    rows = [0]

    def count(module, args, output):
        rows[0] += output.shape[0] if isinstance(output, torch.Tensor) else output[0].shape[0]

    handles = [b.register_forward_hook(count) for b in blocks]
    try:
        variant_distances(root, blocks, head, batch, variants)
    finally:
        for h in handles:
            h.remove()
    n = batch.n_seq
    floor = 6 * n + sum((6 - v.first_changed) * n for v in variants)
    head_check = 2 * 6  # two one-sequence forwards that check the head reproduces the logits
    assert rows[0] == floor + head_check  # one base pass plus exactly each variant's suffix
    assert rows[0] < 0.75 * len(variants) * 6 * n  # the reference runs all 6 slots each time


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_probe_of_compiled_wrapper_equals_probe_of_model(arch):
    model = tiny_model(arch, n_layers=3)
    ids, _ = tiny_batch()
    direct = probe(model, ids)
    wrapped = probe(torch.compile(model), ids)  # unwrapped via _orig_mod, never compiled
    assert [r.d_int for r in direct.pairs] == [r.d_int for r in wrapped.pairs]
