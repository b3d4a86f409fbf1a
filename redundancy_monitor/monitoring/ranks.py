"""Sharing probe work across the ranks of a torch.distributed job (DDP-style).

Every rank holds the full model. Each measures its deterministic share of the pairs
(`probe(..., shard=(rank, world_size))`), and one `all_gather_object` gives every rank
the merged result, so every rank reaches the same decisions from the same numbers.
Under FSDP2 with a host snapshot, rank 0 measures every pair and the other ranks only
send it their shards (monitoring/sharded.py); the merge is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.probing.probe import merge_shards, probe
from redundancy_monitor.probing.result import ProbeResult


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


class RankGroup:
    """The ranks a `RedundancyMonitor` shares probe work with.

    Its collectives run on gloo groups of their own, so they work whatever backend the
    training uses (NCCL included) and need no device memory: `group` for the training
    thread's decisions, `transfer_group` for the probe threads' weight transfers (two
    threads must not share one group). Create it on every rank at the same point (it
    is a collective).
    """

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo")
        self.transfer_group = dist.new_group(backend="gloo")

    @staticmethod
    def world() -> int:
        return dist.get_world_size()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff `flag` is true on every rank."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def any_true(self, flags: list[bool]) -> list[bool]:
        """Element-wise: True on every rank where any rank's flag is true."""
        value = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in value.tolist()]

    def merge(self, record: ProbeRecord, memory: dict | None = None) -> ProbeRecord:
        """Every rank's record of one probe, merged into one (the same on every rank).

        A failure on any rank makes the whole probe a failure that names the rank. A rank
        with neither result nor error only helped (sent shards). `memory` is this rank's
        byte figures; the merged result carries the largest of each over the ranks and
        ``shadow_host_bytes_by_rank``.
        """
        mine = {
            "step": record.step,
            "result": None if record.result is None else record.result.to_dict(),
            "error": record.error,
            "probe_seconds": record.probe_seconds,
            "blocked_seconds": record.blocked_seconds,
            "memory": memory or {},
        }
        parts: list[Any] = [None] * self.world_size  # all_gather_object fills every slot
        dist.all_gather_object(parts, mine, group=self.group)
        step = parts[0]["step"]
        errors = [f"rank {r}: {p['error']}" for r, p in enumerate(parts) if p["error"] is not None]
        if len({p["step"] for p in parts}) != 1:
            errors.append(f"ranks probed different steps: {[p['step'] for p in parts]}")
        seconds = max(p["probe_seconds"] for p in parts)
        blocked = max(p["blocked_seconds"] for p in parts)
        results = [ProbeResult.from_dict(p["result"]) for p in parts if p["result"] is not None]
        if not results and not errors:
            errors.append("no rank produced a result")
        if errors:
            return ProbeRecord(step, None, "; ".join(errors), seconds, blocked)
        merged = merge_shards(results)
        memories = [p["memory"] for p in parts]
        if all(memories):
            figures = {key: max(m.get(key, 0) for m in memories) for key in memories[0]}
            by_rank = tuple(m.get("shadow_host_bytes", 0) for m in memories)
            merged.meta = dataclasses.replace(
                merged.meta, **figures, shadow_host_bytes_by_rank=by_rank
            )
        return ProbeRecord(step, merged, None, seconds, blocked)
