"""Sharing probe work across the ranks of a torch.distributed job (DDP-style).

Every rank holds the full model. Each measures its deterministic share of the pairs
(`probe(..., shard=(rank, world_size))`), and one `all_gather_object` gives every rank
the merged result, so every rank reaches the same decisions from the same numbers.
"""

from __future__ import annotations

import torch.distributed as dist

from redundancy_monitor.probe import merge_shards, probe
from redundancy_monitor.result import ProbeResult


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group=None) -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_shards(part: ProbeResult, group=None) -> ProbeResult:
    """All-gather every rank's shard and merge them (a collective: all ranks must call)."""
    _, world_size = rank_and_world(group)
    if world_size == 1:
        return merge_shards([part])
    parts: list[dict | None] = [None] * world_size
    dist.all_gather_object(parts, part.to_dict(), group=group)
    return merge_shards([ProbeResult.from_dict(p) for p in parts if p is not None])


def probe_across_ranks(model, input_ids, attention_mask=None, group=None, **kwargs) -> ProbeResult:
    """`probe()` with the pairs split across the ranks of `group`; same result on every rank.

    A collective: every rank of `group` must call it with the same batch and arguments.
    Without an initialised process group it is plain `probe()`.
    """
    rank, world_size = rank_and_world(group)
    if world_size == 1:
        return probe(model, input_ids, attention_mask, **kwargs)
    part = probe(model, input_ids, attention_mask, shard=(rank, world_size), **kwargs)
    return gather_shards(part, group)
