"""Block weights for the engine: resident where the probe runs, or streamed from host memory.

The engine asks for a block's parameters each time a slot runs a block
(`get(block)`), after announcing the order of the blocks one forward will ask for
(`plan(uses)`). `ResidentWeights` hands out the blocks' own parameters. `BlockStreamer`
copies a block from host memory to the probe's device when it is needed, keeps at most
`capacity` blocks there, and copies the next planned blocks ahead of use (on CUDA on a
copy stream of its own, so copies overlap the probe's compute). `streamed_model` puts the
rest of the model (embeddings, head, norms and every buffer) on the device for the
duration of a probe and gives a streamer for the blocks, so the device holds those, a
few blocks and the activations, never the whole model.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from redundancy_monitor.errors import UnsupportedModelError

#: Blocks a streamer keeps on the device at most: the one in use and the next two planned.
DEFAULT_CAPACITY = 3


class ResidentWeights:
    """The blocks' own parameters, already where the probe runs (no copies)."""

    streamed = False

    def __init__(self, blocks: nn.ModuleList):
        self._params: list[dict[str, torch.Tensor]] = [dict(b.named_parameters()) for b in blocks]

    def plan(self, uses: Iterable[int]) -> None:
        pass

    def get(self, block: int) -> dict[str, torch.Tensor]:
        return self._params[block]


class HostWeights:
    """Where a streamed probe reads weights: tensors in host memory, by name.

    `skeleton()` names tensors relative to the model root (every parameter outside the
    block list and every buffer); `block(b)` names block b's parameters relative to the
    block. A source may assemble them on request (FSDP2 shards gathered from the ranks).
    """

    def skeleton(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def block(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ModuleWeights(HostWeights):
    """The weights of a model that lives in host memory (the monitor's host shadow)."""

    def __init__(self, root: nn.Module, blocks: nn.ModuleList):
        # The block modules themselves: stand-ins take their places in the list mid-probe.
        self.root, self.blocks = root, list(blocks)

    def skeleton(self) -> dict[str, torch.Tensor]:
        block_params = {id(p) for b in self.blocks for p in b.parameters()}
        out: dict[str, torch.Tensor] = {
            n: p for n, p in self.root.named_parameters() if id(p) not in block_params
        }
        out.update(self.root.named_buffers())
        return out

    def block(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self.blocks[index].named_parameters())


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class BlockStreamer:
    """Copies block weights from host memory to `device` as the engine needs them.

    Holds at most `capacity` blocks on the device (the one returned by the last `get`
    and the next ones the plan asks for); a block that is needed again after being
    dropped is copied again. `peak_bytes` is the most block weight bytes held at once,
    `n_loads` the number of block copies made.

    On CUDA the copies run on a copy stream; the stream that asks for a block waits for
    its copy (an event, no host sync) and is recorded on the block's tensors so the
    allocator does not reuse them while queued kernels still read them. The host waits
    for the compute that used a dropped block before copying more than one block past
    it, so a host thread far ahead of the device cannot pile up dropped blocks.
    """

    streamed = True

    def __init__(
        self,
        load: Callable[[int], dict[str, torch.Tensor]],
        device: torch.device | str,
        capacity: int = DEFAULT_CAPACITY,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.load = load
        self.device = torch.device(device)
        self.capacity = capacity
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._held: dict[int, tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = {}
        self._dropped: deque = deque()  # CUDA events: compute done with a dropped block
        self._plan: list[int] = []
        self._cursor = 0
        self._current: int | None = None
        self.bytes_held = self.peak_bytes = self.n_loads = 0

    def plan(self, uses: Iterable[int]) -> None:
        """The blocks the next forward will ask for, in order; copying starts now."""
        self._plan, self._cursor, self._current = list(uses), 0, None
        self._settle()

    def get(self, block: int) -> dict[str, torch.Tensor]:
        """Block `block`'s parameters on the device, ready for the current stream."""
        # A block not in the plan (a model that calls its blocks in another order) is
        # copied when asked for.
        with contextlib.suppress(ValueError):
            self._cursor = self._plan.index(block, self._cursor) + 1
        self._current = block
        self._settle()
        tensors, ready = self._held[block]
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in tensors.values():
                t.record_stream(stream)
        return tensors

    def close(self) -> None:
        """Drop every block (the probe is over)."""
        for block in list(self._held):
            self._drop(block)
        self._dropped.clear()

    def _wanted(self) -> list[int]:
        wanted = [] if self._current is None else [self._current]
        for block in self._plan[self._cursor :]:
            if len(wanted) >= self.capacity:
                break
            if block not in wanted:
                wanted.append(block)
        return wanted

    def _settle(self) -> None:
        wanted = self._wanted()
        for block in [b for b in self._held if b not in wanted]:
            self._drop(block)
        for block in wanted:
            if block not in self._held:
                self._copy(block)

    def _drop(self, block: int) -> None:
        tensors, _ = self._held.pop(block)
        self.bytes_held -= nbytes(tensors.values())
        if self._cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._dropped.append(done)

    def _copy(self, block: int) -> None:
        while len(self._dropped) > 1:
            self._dropped.popleft().synchronize()
        host = self.load(block)
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                tensors = {n: t.to(self.device, non_blocking=True) for n, t in host.items()}
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
        else:
            tensors, ready = {n: t.to(self.device, copy=True) for n, t in host.items()}, None
        self._held[block] = (tensors, ready)
        self.n_loads += 1
        self.bytes_held += nbytes(tensors.values())
        self.peak_bytes = max(self.peak_bytes, self.bytes_held)


def block_list_path(root: nn.Module, blocks: nn.ModuleList) -> str:
    for name, module in root.named_modules():
        if module is blocks:
            return name
    raise UnsupportedModelError(
        f"the block list is not a submodule of {type(root).__name__}; pass blocks= as a "
        "dotted path inside the model"
    )


@contextlib.contextmanager
def streamed_model(
    root: nn.Module,
    blocks: nn.ModuleList,
    source: HostWeights,
    device: torch.device | str,
    capacity: int = DEFAULT_CAPACITY,
) -> Iterator[tuple[BlockStreamer, int]]:
    """Put `root`'s non-block tensors from `source` on `device`; yield a block streamer.

    Yields the streamer and the bytes the non-block tensors take on the device. Every
    parameter and buffer slot of `root` that was swapped is restored in ``finally``; the
    blocks' own parameters are never touched (the engine calls each block with the
    streamed tensors).
    """
    device = torch.device(device)
    skeleton = source.skeleton()
    prefix = block_list_path(root, blocks) + "."
    by_id = {id(t): n for n, t in root.named_parameters()}
    by_id.update({id(t): n for n, t in root.named_buffers()})
    placed: dict[str, torch.Tensor] = {}
    swapped: list[tuple[dict, str, object]] = []
    streamer = BlockStreamer(source.block, device, capacity)
    try:
        for module in root.modules():
            owned: list[tuple[dict[str, Any], bool]] = [
                (module._parameters, True),
                (module._buffers, False),
            ]
            for slots, is_param in owned:
                for key, tensor in list(slots.items()):
                    name = by_id.get(id(tensor)) if tensor is not None else None
                    if name is None or (is_param and name.startswith(prefix)):
                        continue
                    if name not in skeleton:
                        raise UnsupportedModelError(
                            f"the host weights have no tensor named {name!r}"
                        )
                    if name not in placed:
                        placed[name] = skeleton[name].to(device, copy=True)
                    new = placed[name]
                    swapped.append((slots, key, tensor))
                    slots[key] = nn.Parameter(new, requires_grad=False) if is_param else new
        yield streamer, nbytes(placed.values())
    finally:
        streamer.close()
        for slots, key, tensor in reversed(swapped):
            slots[key] = tensor
