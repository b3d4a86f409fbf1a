"""Property-based tests (hypothesis) of the pair sets and of the KL distances."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redundancy_monitor.errors import InvalidPairsError
from redundancy_monitor.probing.engine import variant_distances
from redundancy_monitor.probing.probe import prepare
from redundancy_monitor.probing.variants import Variant, parse_pairs

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(n_layers=st.integers(2, 40), k=st.integers(1, 45))
@settings(max_examples=200, deadline=None)
def test_pair_sets_are_sorted_unique_in_range_with_the_right_size(n_layers, k):
    adjacent = parse_pairs("adjacent", n_layers)
    everything = parse_pairs("all", n_layers)
    window = parse_pairs(f"window:{k}", n_layers)
    for pairs in (adjacent, everything, window):
        assert pairs == sorted(set(pairs))
        assert all(0 <= i < j < n_layers for i, j in pairs)
    assert len(adjacent) == n_layers - 1
    assert len(everything) == n_layers * (n_layers - 1) // 2
    assert set(window) == {(i, j) for i, j in everything if j - i <= k}
    assert set(adjacent) <= set(window) <= set(everything)


@given(pairs=st.lists(st.tuples(st.integers(-3, 12), st.integers(-3, 12)), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_explicit_pairs_are_normalised_or_refused(pairs):
    n_layers = 8
    bad = any(not (0 <= x < n_layers) for p in pairs for x in p) or any(i == j for i, j in pairs)
    if bad:
        with pytest.raises(InvalidPairsError):
            parse_pairs(pairs, n_layers)
    else:
        assert parse_pairs(pairs, n_layers) == sorted({(min(p), max(p)) for p in pairs})


@functools.lru_cache(maxsize=1)
def _model():
    return tiny_model("llama", n_layers=4, vocab=53)


variants = st.one_of(
    st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda p: Variant.replacement(4, *p)),
    st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda p: Variant.interchange(4, *p)),
    st.sets(st.integers(0, 3), max_size=3).map(lambda s: Variant.deletion(4, s)),
)


@given(
    variant=variants,
    seed=st.integers(0, 2**16),
    n_seq=st.integers(1, 3),
    seq_len=st.integers(2, 9),
)
@FAST
def test_distance_is_non_negative_and_zero_for_the_unmodified_model(variant, seed, n_seq, seq_len):
    model = _model()
    ids = torch.randint(0, 53, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))
    root, blocks, head, batch = prepare(model, ids)
    d, same = variant_distances(root, blocks, head, batch, [variant, Variant.identity(4)])
    assert d.mean >= 0 and d.last >= 0 and all(x >= 0 for x in d.per_seq)
    assert same.mean == 0.0
    if not variant.changed_slots:
        assert d.mean == 0.0


@given(
    variant=variants,
    seed=st.integers(0, 2**16),
    seq_len=st.integers(2, 8),
    pad=st.integers(1, 4),
    side=st.sampled_from(["left", "right"]),
)
@FAST
def test_distance_is_invariant_to_padding(variant, seed, seq_len, pad, side):
    model = _model()
    ids = torch.randint(0, 53, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    filler = torch.zeros(1, pad, dtype=ids.dtype)
    padded = torch.cat([filler, ids] if side == "left" else [ids, filler], dim=1)
    mask = torch.ones_like(padded)
    if side == "left":
        mask[:, :pad] = 0
    else:
        mask[:, seq_len:] = 0
    root, blocks, head, plain = prepare(model, ids)
    _, _, _, with_pad = prepare(model, padded, mask)
    a = variant_distances(root, blocks, head, plain, [variant])[0]
    b = variant_distances(root, blocks, head, with_pad, [variant])[0]
    assert b.mean == pytest.approx(a.mean, rel=1e-4, abs=1e-6)
    assert b.last == pytest.approx(a.last, rel=1e-4, abs=1e-6)
