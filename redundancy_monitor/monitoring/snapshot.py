"""The shadow: a private copy of the weights that a probe runs on while training goes on.

Where the copy lives is `shadow_device`:

- ``"host"`` (the default when training on CUDA): host memory, pinned when the weights
  are on CUDA. The probe streams block weights to the device slot by slot
  (probing/streaming.py), so the device holds the embeddings/head, a few blocks and the
  activations, and nothing at all between probes.
- ``"device"``: a full copy on the training device (fastest for small models).

`shadow_dtype` stores the copy in another floating dtype (bf16 halves host memory).

The copy's tensors are allocated once, then refilled in place at every snapshot, so no
memory is allocated per probe. On CUDA the refill runs on a side stream that first waits
for the work that produced the weights; `fence()` makes the training stream wait for
the copy before the next optimizer step changes the weights; the probe thread waits for
the copy (`Snapshot.wait`) before reading it. Neither side blocks the training thread.

A model sharded with FSDP2 is copied shard by shard in host mode (monitoring/sharded.py);
in device mode every rank gathers the full weights into a full copy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist
from torch import nn

from redundancy_monitor.errors import InvalidConfigError, UnsupportedModelError
from redundancy_monitor.monitoring.device_memory import DeviceBudget, device_peak, estimate_need
from redundancy_monitor.monitoring.sharded import GatheredWeights, HostShards, serve_shards
from redundancy_monitor.probing.blocks import find_blocks, unwrap_model
from redundancy_monitor.probing.streaming import block_list_path, nbytes

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

SHADOW_DEVICES = ("host", "device")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def check_shadow_device(value: str | None) -> str | None:
    if value is None or value in SHADOW_DEVICES:
        return value
    raise InvalidConfigError(
        f"shadow_device must be 'host', 'device' or None (host when training on CUDA), "
        f"got {value!r}"
    )


def check_shadow_dtype(value) -> torch.dtype | None:
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.lower().removeprefix("torch.")]
    raise InvalidConfigError(
        f"shadow_dtype must be a floating torch.dtype or one of {sorted(_DTYPES)}, got {value!r}"
    )


@dataclass
class Snapshot:
    """What one capture produced: what to probe, where, and what the copy holds."""

    model: nn.Module | None  # what to probe; None on a rank that only serves its shards
    device: torch.device  # where the probe runs (the training device)
    streamed: bool  # weights in host memory, blocks streamed to `device`
    host_bytes: int
    device_bytes: int
    copied: torch.cuda.Event | None = None  # CUDA event recorded after the copy
    shards: HostShards | None = None  # FSDP2 host mode: this rank's shards
    memory: dict = field(default_factory=dict)  # filled by the probe job

    @property
    def rank0_only(self) -> bool:
        """FSDP2 host mode: rank 0 probes every pair; the other ranks send shards."""
        return self.shards is not None

    def wait(self) -> None:
        """Block the calling (probe) thread until the copy is complete."""
        if self.copied is not None:
            self.copied.synchronize()


class ShadowModel:
    """Holds the probe's copy of a model and refreshes it from the training model.

    Args:
        where: ``"host"``, ``"device"`` or None (host when the weights are on CUDA).
        dtype: floating dtype of the copy (None: the training dtype).
    """

    def __init__(self, where: str | None = None, dtype: torch.dtype | None = None) -> None:
        self.where = check_shadow_device(where)
        self.dtype = check_shadow_dtype(dtype)
        self.shadow: nn.Module | None = None
        self.shards: HostShards | None = None
        self.stream: torch.cuda.Stream | None = None  # on CUDA; None on CPU
        self._copied: torch.cuda.Event | None = None  # recorded after the last refresh
        self._device: torch.device | None = None  # device of the stream and the event
        self._source_id: int | None = None
        self._shapes: list[tuple[torch.Size, torch.dtype, torch.device]] = []

    def mode(self, device: torch.device) -> str:
        """``"host"`` or ``"device"`` for weights on `device`."""
        return self.where or ("host" if device.type == "cuda" else "device")

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        # parameters() and buffers() keep registration order, which deepcopy preserves.
        return [p.data for p in module.parameters()] + list(module.buffers())

    def _matches(self, source: nn.Module, tensors: list[torch.Tensor]) -> bool:
        return id(source) == self._source_id and self._shapes == [
            (t.shape, t.dtype, t.device) for t in tensors
        ]

    def _empty(self, t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        return torch.empty(t.shape, dtype=dtype, device=device, pin_memory=pin)

    def _build(self, source: nn.Module, tensors: list[torch.Tensor], on: torch.device) -> None:
        """A copy of `source` whose weights are new, empty tensors on `on`.

        `deepcopy` with a memo that maps every parameter and buffer to its new tensor, so
        nothing of the training device is allocated for them. Other tensor attributes
        (not weights: cached constants) are shared with the training model.
        """
        self.shadow = None  # free the old copy before making the new one
        pin = on.type == "cpu" and tensors[0].device.type == "cuda"
        memo: dict[int, object] = {}
        for p in source.parameters():
            memo[id(p)] = nn.Parameter(self._empty(p, on, pin), requires_grad=False)
        for b in source.buffers():
            memo[id(b)] = self._empty(b, on, pin)
        for module in source.modules():
            for value in vars(module).values():
                if isinstance(value, torch.Tensor) and id(value) not in memo:
                    memo[id(value)] = value
        shadow = copy.deepcopy(source, memo)
        shadow.eval()
        self.shadow = shadow
        self._source_id = id(source)
        self._shapes = [(t.shape, t.dtype, t.device) for t in tensors]

    def capture(self, model: nn.Module, ranks=None) -> Snapshot:
        """Copy the current weights of `model` (unwrapped) into the shadow.

        For a model sharded with FSDP2 (`fully_shard`): in host mode each rank copies its
        own shards (no collective); in device mode the full parameters are gathered, a
        collective that every rank must call at the same step.
        """
        source = unwrap_model(model)
        first = next(source.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        mode = self.mode(device)
        if any(_is_dtensor(p) for p in source.parameters()):
            if mode == "host":
                return self._capture_shards(source, device, ranks)
            shadow = _capture_sharded_into(self, source)
            size = nbytes(self._tensors(shadow))
            return Snapshot(shadow, device, False, 0, size, self._copied)
        tensors = self._tensors(source)
        if self.shadow is None or not self._matches(source, tensors):
            self._build(source, tensors, torch.device("cpu") if mode == "host" else device)
            assert self.shadow is not None  # _build made it
            if mode == "device":
                self._used_on_side_stream(self._tensors(self.shadow), device)
        targets = self._tensors(self.shadow)
        self._copy(targets, tensors, device)
        size = nbytes(targets)
        if mode == "host":
            return Snapshot(self.shadow, device, True, size, 0, self._copied)
        return Snapshot(self.shadow, device, False, 0, size, self._copied)

    def _capture_shards(self, source: nn.Module, device: torch.device, ranks) -> Snapshot:
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if ranks is None and several:
            raise InvalidConfigError(
                "an FSDP2 host snapshot over several ranks gathers shards over the "
                "monitor's rank group, which distributed=False turns off; leave "
                "distributed unset, or pass shadow_device='device'"
            )
        if self.shards is None or self.shards.source_id != id(source):
            self.shards = None
            self.shards = HostShards(source, self.dtype, pin=device.type == "cuda")
            rank = 0 if ranks is None else ranks.rank
            self.shadow = _plain_copy(source, self.dtype, "meta") if rank == 0 else None
        self._copy(self.shards.targets, HostShards.sources(source), device)
        return Snapshot(
            self.shadow, device, True, self.shards.host_bytes, 0, self._copied, self.shards
        )

    def _copy(self, targets: list[torch.Tensor], sources: list[torch.Tensor], device) -> None:
        with torch.no_grad(), self._copy_stream(device):
            for dst, src in zip(targets, sources, strict=True):
                dst.copy_(src, non_blocking=device.type == "cuda")
            if device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record(self.stream)

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
        assert self.stream is not None  # _side_stream made it
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


def probe_snapshot(
    probe_fn,
    snap: Snapshot,
    input_ids,
    attention_mask,
    kwargs: dict,
    budget: DeviceBudget,
    context,
    group=None,
):
    """Run `probe_fn` on a snapshot (in the probe thread) and record its memory figures.

    Streamed snapshots check the free device memory first (`budget`). A rank that only
    serves FSDP2 shards returns None. The figures go to ``result.meta`` and to
    `snap.memory` (``shadow_host_bytes``, ``shadow_device_bytes``,
    ``probe_device_peak_bytes``).
    """
    snap.wait()
    snap.memory = {
        "shadow_host_bytes": snap.host_bytes,
        "shadow_device_bytes": snap.device_bytes,
        "probe_device_peak_bytes": 0,
    }
    if snap.model is None:
        assert snap.shards is not None  # a rank without a model serves its shards
        serve_shards(snap.shards, group)
        return None
    model = snap.model  # a Module from here on, in the lambdas too
    if not snap.streamed:  # the shadow is on the device already
        budget.check(snap.device, lambda: estimate_need(model, input_ids, kwargs, streamed=False))
        with context, device_peak(snap.device) as peak:
            result = probe_fn(snap.model, input_ids, attention_mask, **kwargs)
        return _with_memory(result, snap, peak.bytes)
    gathered = None
    try:
        if snap.shards is not None:
            blocks = find_blocks(snap.model, kwargs.get("blocks"))
            gathered = GatheredWeights(snap.shards, block_list_path(snap.model, blocks), group)
        budget.check(snap.device, lambda: estimate_need(model, input_ids, kwargs, streamed=True))
        with context, device_peak(snap.device) as peak:
            result = probe_fn(
                snap.model,
                input_ids,
                attention_mask,
                stream_to=snap.device,
                host_weights=gathered,
                **kwargs,
            )
    finally:
        if gathered is not None:
            gathered.finish()
    streamed = (result.meta.streamed or {}).get("device_weight_peak_bytes", 0)
    return _with_memory(result, snap, peak.bytes if peak.bytes is not None else streamed)


def _with_memory(result, snap: Snapshot, peak_bytes: int | None):
    snap.memory["probe_device_peak_bytes"] = int(peak_bytes or 0)
    result.meta = dataclasses.replace(result.meta, **snap.memory)
    return result


def _is_dtensor(tensor) -> TypeGuard[DTensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(tensor, DTensor)


def _unsharded_class(module: nn.Module) -> type:
    """The model's own class: `fully_shard` swaps in a subclass named FSDP<Class>."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _plain_copy(source: nn.Module, dtype=None, device=None) -> nn.Module:
    """A new, unsharded instance of a sharded Hugging Face model (weights filled later).

    Built with the generators forked: its random initialisation (overwritten at once)
    must not consume numbers that training would draw next. On the meta device (host
    mode) it holds no memory at all: a streamed probe brings every tensor.
    """
    config = getattr(source, "config", None)
    cls = _unsharded_class(source)
    if config is None or not hasattr(cls, "_from_config"):
        raise UnsupportedModelError(
            f"{cls.__name__} is sharded with FSDP2 and has no Hugging Face config, so the "
            "monitor cannot build an unsharded copy to probe; probe a Hugging Face model, "
            "or train with DDP"
        )
    first = next(source.parameters())
    dtype = dtype or first.dtype
    device = torch.device(device or first.device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        shadow = cls._from_config(config).to(dtype=dtype)
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
        holder.shadow = _plain_copy(source, holder.dtype)
        holder._source_id = id(source)
        holder._used_on_side_stream(holder._tensors(holder.shadow), device)
    targets: dict[str, torch.Tensor] = dict(holder.shadow.named_parameters())
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
