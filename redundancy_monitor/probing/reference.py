"""The obviously correct reference: one full model forward per variant, weights moved.

Slow on purpose. The fast engine is tested against it; nothing here is shared with the
engine except how the model is called, so a bug in one does not hide in the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from redundancy_monitor.probing.batch import ProbeBatch
from redundancy_monitor.probing.engine import VariantDistance
from redundancy_monitor.probing.model_io import (
    SkippedSlot,
    block_return_kinds,
    blocks_replaced,
    call_model,
    logits_of,
    untouched,
)
from redundancy_monitor.probing.variants import Variant


@contextlib.contextmanager
def applied(
    model: nn.Module, blocks: nn.ModuleList, variant: Variant, returns_tuple: Sequence[bool]
) -> Iterator[None]:
    """Make `model` compute `variant`: slot s gets block b's parameter tensors."""
    original = {
        s: {name: p.data for name, p in blocks[s].named_parameters()} for s in range(len(blocks))
    }
    skipped = {
        s: SkippedSlot(blocks[s], returns_tuple[s])
        for s, b in enumerate(variant.slots)
        if b is None
    }
    try:
        for s, b in enumerate(variant.slots):
            if b is not None and b != s:
                for name, p in blocks[s].named_parameters():
                    p.data = original[b][name]
        with blocks_replaced(blocks, skipped):
            yield
    finally:
        for s in range(len(blocks)):
            for name, p in blocks[s].named_parameters():
                p.data = original[s][name]


def reference_distances(
    model: nn.Module, blocks: nn.ModuleList, batch: ProbeBatch, variants: Sequence[Variant]
) -> list[VariantDistance]:
    """D(V) and D_last(V) by one full forward per variant, token by token in Python."""
    results = []
    with untouched(model):
        base = torch.log_softmax(logits_of(call_model(model, batch)).float(), dim=-1)
        kinds = block_return_kinds(model, blocks, batch)
        for variant in variants:
            with applied(model, blocks, variant, kinds):
                logq = torch.log_softmax(logits_of(call_model(model, batch)).float(), dim=-1)
            per_seq, last = [], []
            for row in range(batch.n_seq):
                positions = batch.attention_mask[row].nonzero().flatten().tolist()
                kls = [
                    float((base[row, t].exp() * (base[row, t] - logq[row, t])).sum())
                    for t in positions
                ]
                per_seq.append(sum(kls) / len(kls))
                last.append(kls[-1])
            results.append(
                VariantDistance(sum(per_seq) / len(per_seq), sum(last) / len(last), tuple(per_seq))
            )
    return results
