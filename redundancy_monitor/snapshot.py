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

from redundancy_monitor.blocks import unwrap_model


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
        """Copy the current weights of `model` (unwrapped) into the shadow and return it."""
        source = unwrap_model(model)
        tensors = self._tensors(source)
        if self.shadow is None or not self._matches(source, tensors):
            self._build(source, tensors)
        targets = self._tensors(self.shadow)
        device = tensors[0].device if tensors else torch.device("cpu")
        with torch.no_grad(), self._copy_stream(device):
            for dst, src in zip(targets, tensors, strict=True):
                dst.copy_(src, non_blocking=device.type == "cuda")
            if device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record(self.stream)
        return self.shadow

    @contextlib.contextmanager
    def _copy_stream(self, device: torch.device):
        if device.type != "cuda":
            yield
            return
        if self.stream is None or self._device != device:
            self.stream = torch.cuda.Stream(device=device)
            self._device = device
        # The side stream must see the weights the last optimizer step wrote.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            yield

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
