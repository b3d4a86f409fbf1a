"""The shadow model: a private copy of the weights that a probe runs on while training goes on.

The copy is built once (``deepcopy``) and then refreshed in place with ``copy_`` at every
snapshot, so no memory is allocated per probe. On CUDA the refresh runs on a side stream
that first waits for the work that produced the weights; `fence()` makes the training
stream wait for the copy before the next optimizer step changes the weights. Neither
side blocks the host.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from redundancy_monitor.errors import UnsupportedModelError
from redundancy_monitor.probing.blocks import unwrap_model


class ShadowModel:
    """Holds the probe's copy of a model and refreshes it from the training model."""

    def __init__(self) -> None:
        self.shadow: nn.Module | None = None
        self.stream = None  # torch.cuda.Stream on CUDA, None on CPU
        self._copied = None  # torch.cuda.Event recorded after the last refresh
        self._device: torch.device | None = None  # device of the stream and the event
        self._source_id: int | None = None
        self._shapes: list[tuple[torch.Size, torch.dtype, torch.device]] = []

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        # parameters() and buffers() keep registration order, which deepcopy preserves.
        return [p.data for p in module.parameters()] + list(module.buffers())

    def _matches(self, source: nn.Module, tensors: list[torch.Tensor]) -> bool:
        return id(source) == self._source_id and self._shapes == [
            (t.shape, t.dtype, t.device) for t in tensors
        ]

    def _build(self, source: nn.Module, tensors: list[torch.Tensor]) -> None:
        self.shadow = None  # free the old copy before making the new one
        shadow = copy.deepcopy(source)
        for p in shadow.parameters():
            p.grad = None
            p.requires_grad_(False)
        shadow.eval()
        self.shadow = shadow
        self._source_id = id(source)
        self._shapes = [(t.shape, t.dtype, t.device) for t in tensors]

    def capture(self, model: nn.Module) -> nn.Module:
        """Copy the current weights of `model` (unwrapped) into the shadow and return it.

        For a model sharded with FSDP2 (`fully_shard`) this gathers the full parameters:
        a collective that every rank must call at the same step.
        """
        source = unwrap_model(model)
        if any(_is_dtensor(p) for p in source.parameters()):
            return self._capture_sharded(source)
        tensors = self._tensors(source)
        device = tensors[0].device if tensors else torch.device("cpu")
        if self.shadow is None or not self._matches(source, tensors):
            self._build(source, tensors)
            self._used_on_side_stream(self._tensors(self.shadow), device)
        targets = self._tensors(self.shadow)
        with torch.no_grad(), self._copy_stream(device):
            for dst, src in zip(targets, tensors, strict=True):
                dst.copy_(src, non_blocking=device.type == "cuda")
            if device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record(self.stream)
        return self.shadow

    def _side_stream(self, device: torch.device):
        if self.stream is None or self._device != device:
            self.stream = torch.cuda.Stream(device=device)
            self._device = device
        return self.stream

    def _used_on_side_stream(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        """Tell the caching allocator that `tensors` (allocated on the training stream) are
        used on the side stream: when they are freed (a rebuilt shadow, an abandoned
        probe's copy, gathered FSDP2 weights) their memory is not handed back to the
        training stream before the side stream's queued kernels are done with it."""
        if device.type != "cuda":
            return
        stream = self._side_stream(device)
        for tensor in tensors:
            tensor.record_stream(stream)

    @contextlib.contextmanager
    def _copy_stream(self, device: torch.device):
        if device.type != "cuda":
            yield
            return
        self._side_stream(device)
        # The side stream must see the weights the last optimizer step wrote.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            yield

    def _capture_sharded(self, source: nn.Module) -> nn.Module:
        return _capture_sharded_into(self, source)

    def fence(self) -> None:
        """Make the training stream wait for the last copy (call before weights change).

        A device-side wait: it enqueues a dependency and returns at once.
        """
        if self._copied is not None:
            torch.cuda.current_stream(self._device).wait_event(self._copied)
            self._copied = None

    def probe_context(self):
        """The stream context a probe of the shadow should run in (a no-op on CPU)."""
        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(tensor, DTensor)


def _unsharded_class(module: nn.Module) -> type:
    """The model's own class: `fully_shard` swaps in a subclass named FSDP<Class>."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _plain_copy(source: nn.Module) -> nn.Module:
    """A new, unsharded instance of a sharded Hugging Face model (weights filled later).

    Built with the generators forked: its random initialisation (overwritten at once)
    must not consume numbers that training would draw next."""
    config = getattr(source, "config", None)
    cls = _unsharded_class(source)
    if config is None or not hasattr(cls, "_from_config"):
        raise UnsupportedModelError(
            f"{cls.__name__} is sharded with FSDP2 and has no Hugging Face config, so the "
            "monitor cannot build an unsharded copy to probe; probe a Hugging Face model, "
            "or train with DDP"
        )
    first = next(source.parameters())
    dtype = first.dtype
    devices = [first.device] if first.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        shadow = cls._from_config(config).to(dtype=dtype, device=first.device)
    for p in shadow.parameters():
        p.requires_grad_(False)
    return shadow.eval()


def _capture_sharded_into(holder: ShadowModel, source: nn.Module) -> nn.Module:
    full = {
        name: (p.full_tensor() if _is_dtensor(p) else p).detach()
        for name, p in source.named_parameters()
    }
    buffers = {
        name: (b.full_tensor() if _is_dtensor(b) else b).detach()
        for name, b in source.named_buffers()
    }
    device = next(iter(full.values())).device if full else torch.device("cpu")
    if holder.shadow is None or holder._source_id != id(source):
        holder.shadow = None
        holder.shadow = _plain_copy(source)
        holder._source_id = id(source)
        holder._used_on_side_stream(holder._tensors(holder.shadow), device)
    targets = dict(holder.shadow.named_parameters())
    targets.update(holder.shadow.named_buffers())
    missing = sorted(set(full) - set(targets))
    if missing:
        raise UnsupportedModelError(
            f"the unsharded copy has no parameters named {missing[:3]}; the sharded model's "
            "names must match its Hugging Face class"
        )
    # The gathered weights are copied on the side stream, like an unsharded capture, so
    # the probe runs there too; they are freed when this returns, after that copy.
    holder._used_on_side_stream(list(full.values()) + list(buffers.values()), device)
    with torch.no_grad(), holder._copy_stream(device):
        for name, tensor in [*full.items(), *buffers.items()]:
            if name in targets:
                targets[name].copy_(tensor, non_blocking=device.type == "cuda")
        if device.type == "cuda":
            holder._copied = torch.cuda.Event()
            holder._copied.record(holder.stream)
    return holder.shadow
