"""FSDP2 without a full copy on any rank: host shards, gathered block by block for rank 0.

The snapshot (`HostShards`) is each rank's own shards, copied to host memory: no
collective, nothing gathered on the device. The probe then runs on rank 0 alone, off the
training path: in the probe thread rank 0 asks for one block (or the non-block weights)
at a time and every rank sends its shards of it over the monitor's own gloo group
(`GatheredWeights` on rank 0, `serve_shards` on the others). Rank 0 reassembles the
block in host memory and streams it to its device; the other ranks hold only their
shards and use no device memory for the probe.

Every request is one small broadcast (what rank 0 wants), one agreement (did every
rank build its part?) and one gather. A rank that fails to build its part makes the
agreement fail on every rank, so no rank is left waiting in the gather; when rank 0's
probe stops for any other reason it sends a stop request, which ends the others' loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from redundancy_monitor.errors import UnsupportedModelError
from redundancy_monitor.probing.streaming import HostWeights, nbytes


@dataclass
class ShardEntry:
    """One parameter or buffer of the model, as this rank holds it in host memory."""

    name: str
    host: torch.Tensor  # this rank's shard (or the whole tensor when not sharded)
    shape: tuple[int, ...]  # the full tensor's shape
    dim: int | None  # the dimension FSDP2 shards along; None: every rank holds it whole
    is_param: bool

    def chunk(self, rank: int, world: int) -> int:
        """Rows (along `dim`) that `rank` holds: `torch.chunk` sizes, as FSDP2 shards."""
        assert self.dim is not None  # asked of sharded entries only
        size = math.ceil(self.shape[self.dim] / world)
        return max(0, min(self.shape[self.dim], (rank + 1) * size) - rank * size)

    def slot_bytes(self, world: int) -> int:
        """Bytes every rank sends for this entry: its shard, padded to the largest shard
        and to a multiple of 8 (so every entry's bytes can be viewed as its dtype)."""
        assert self.dim is not None  # asked of sharded entries only
        rest = math.prod(self.shape) // max(1, self.shape[self.dim])
        size = math.ceil(self.shape[self.dim] / world) * rest * self.host.element_size()
        return -(-size // 8) * 8


def shard_layout(tensor) -> tuple[torch.Tensor, int | None]:
    """(this rank's local tensor, the sharded dim or None) of a parameter or buffer."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        return tensor.detach(), None
    placements = tuple(tensor.placements)
    if tensor.device_mesh.ndim != 1:
        raise UnsupportedModelError(
            "the model is sharded over a 2-D device mesh (HSDP); the host snapshot handles "
            "one FSDP2 mesh dimension. Pass shadow_device='device' (gathers full weights "
            "on every rank) or shard over one mesh dimension"
        )
    if isinstance(placements[0], Replicate):
        return tensor.to_local().detach(), None
    if not isinstance(placements[0], Shard):
        raise UnsupportedModelError(
            f"a parameter is placed as {placements[0]!r}; the host snapshot handles FSDP2's "
            "Shard(dim) placements. Pass shadow_device='device'"
        )
    mesh = tensor.device_mesh.mesh.flatten().tolist()
    if mesh != list(range(len(mesh))) or len(mesh) != _world(None):
        raise UnsupportedModelError(
            f"the FSDP2 mesh spans ranks {mesh}, not every rank of the job in order; the "
            "host snapshot needs a mesh over all ranks. Pass shadow_device='device'"
        )
    return tensor.to_local().detach(), placements[0].dim


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class HostShards:
    """This rank's shards of every parameter and buffer, in host memory.

    Built once (`entries`, with empty host tensors) and refilled at every snapshot by the
    caller's copy (`targets`/`sources` line up).
    """

    def __init__(self, source: nn.Module, dtype: torch.dtype | None, pin: bool):
        self.entries: list[ShardEntry] = []
        self.source_id = id(source)
        params = [(n, t, True) for n, t in source.named_parameters()]
        for name, tensor, is_param in params + [(n, t, False) for n, t in source.named_buffers()]:
            local, dim = shard_layout(tensor)
            wanted = dtype if dtype is not None and local.is_floating_point() else local.dtype
            host = torch.empty(local.shape, dtype=wanted, pin_memory=pin)
            self.entries.append(ShardEntry(name, host, tuple(tensor.shape), dim, is_param))

    @staticmethod
    def sources(source: nn.Module) -> list[torch.Tensor]:
        return [
            shard_layout(t)[0] for t in [*source.parameters(), *source.buffers()]
        ]  # same order as the entries

    @property
    def targets(self) -> list[torch.Tensor]:
        return [e.host for e in self.entries]

    @property
    def host_bytes(self) -> int:
        return nbytes(self.targets)

    def part(self, indices: list[int], rank: int, world: int) -> torch.Tensor:
        """This rank's bytes of the sharded entries in `indices`, each padded to its slot."""
        chunks = []
        for i in indices:
            entry = self.entries[i]
            assert entry.dim is not None  # `indices` name sharded entries
            flat = entry.host.movedim(entry.dim, 0).contiguous().view(-1).view(torch.uint8)
            pad = entry.slot_bytes(world) - flat.numel()
            chunks.append(flat if pad == 0 else torch.cat([flat, flat.new_zeros(pad)]))
        if not chunks:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat(chunks)

    def assemble(self, indices: list[int], parts: list[torch.Tensor], world: int) -> dict:
        """The full tensors of `indices` from every rank's part (rank order)."""
        out, offset = {}, 0
        for i in indices:
            entry = self.entries[i]
            slot = entry.slot_bytes(world)
            assert entry.dim is not None  # `indices` name sharded entries
            moved = list(entry.shape)
            moved.insert(0, moved.pop(entry.dim))
            pieces = []
            for rank, part in enumerate(parts):
                rows = entry.chunk(rank, world)
                length = rows * math.prod(moved[1:]) * entry.host.element_size()
                raw = part[offset : offset + length]
                pieces.append(raw.view(entry.host.dtype).view(rows, *moved[1:]))
            out[entry.name] = torch.cat(pieces).movedim(0, entry.dim).contiguous()
            offset += slot
        return out


def _agree(flag: bool, group) -> bool:
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


class GatheredWeights(HostWeights):
    """Rank 0's view of the sharded snapshot: full tensors, gathered when asked for.

    Call `finish()` when the probe is over (in ``finally``): it releases the other ranks.
    """

    def __init__(self, shards: HostShards, block_prefix: str, group=None):
        self.shards, self.group = shards, group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.root = dist.get_global_rank(group, 0) if self.world > 1 else 0
        self.prefix = block_prefix + "."
        self._open = self.world > 1

    def _select(self, keep) -> list[int]:
        return [i for i, e in enumerate(self.shards.entries) if keep(e)]

    def _fetch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        entries = self.shards.entries
        whole = {entries[i].name: entries[i].host for i in indices}  # complete where world 1
        sharded = [i for i in indices if entries[i].dim is not None]
        if not sharded or self.world == 1:
            return whole
        dist.broadcast_object_list([sharded], src=self.root, group=self.group)
        ok, mine, parts = True, None, None
        try:
            mine = self.shards.part(sharded, 0, self.world)
            parts = [torch.empty_like(mine) for _ in range(self.world)]
        except Exception:
            ok = False
            raise
        finally:
            if not _agree(ok, self.group):
                self._open = False
        if not self._open:
            raise RuntimeError(
                "another rank could not send its shards of the snapshot (see its error)"
            )
        dist.gather(mine, parts, dst=self.root, group=self.group)
        whole.update(self.shards.assemble(sharded, parts, self.world))
        return whole

    def skeleton(self) -> dict[str, torch.Tensor]:
        """Every buffer and every parameter outside the block list."""
        return self._fetch(
            self._select(lambda e: not (e.is_param and e.name.startswith(self.prefix)))
        )

    def block(self, index: int) -> dict[str, torch.Tensor]:
        start = f"{self.prefix}{index}."
        tensors = self._fetch(self._select(lambda e: e.is_param and e.name.startswith(start)))
        return {n[len(start) :]: t for n, t in tensors.items()}

    def finish(self) -> None:
        """Tell the other ranks the probe is over (unless a failed agreement ended it)."""
        if self._open:
            self._open = False
            dist.broadcast_object_list([None], src=self.root, group=self.group)


def serve_shards(shards: HostShards, group) -> None:
    """On a rank other than 0: send shards as rank 0 asks, until it says stop.

    Raises the error that kept this rank from building its part (after telling rank 0,
    through the agreement, so that it stops too).
    """
    root = dist.get_global_rank(group, 0)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=root, group=group)
        if box[0] is None:
            return
        ok, mine = True, None
        try:
            mine = shards.part(box[0], rank, world)
        except Exception:
            ok = False
            raise
        finally:
            if not _agree(ok, group) and ok:
                raise RuntimeError("rank 0 or another rank failed while gathering the snapshot")
        dist.gather(mine, None, dst=root, group=group)
