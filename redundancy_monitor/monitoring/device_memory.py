"""The device memory of a probe: checked before it starts, measured while it runs.

Before a probe allocates anything on the device, its need is estimated (weights it will
put there + activations bounded by `batch_tokens` + the chunked logits) and compared
with the device's free memory (`torch.cuda.mem_get_info`: memory that no process holds,
so never memory training's allocator keeps cached for its next step). A probe that does
not fit is not started: it is recorded as a failure that says what to lower.

On CUDA the probe's own allocations go to a private allocator pool
(`torch.cuda.use_mem_pool`, this thread only), so what the probe reserved can be read
without counting training's memory: that is `probe_device_peak_bytes`. Elsewhere the
figure comes from the streamer's count of the weights it held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from redundancy_monitor.errors import DeviceMemoryError
from redundancy_monitor.probing.blocks import find_blocks, unwrap_model
from redundancy_monitor.probing.engine import DEFAULT_BATCH_TOKENS, DEFAULT_LOGIT_ELEMENTS
from redundancy_monitor.probing.model_io import vocab_size_of
from redundancy_monitor.probing.streaming import DEFAULT_CAPACITY, nbytes

#: Activations alive in one block's forward, in multiples of the hidden states it maps
#: (input, output, attention projections, the MLP's wider intermediate): a generous
#: round figure for the estimate, not a measurement.
ACTIVATION_FACTOR = 16


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def estimate_need(model: nn.Module, input_ids, kwargs: dict, streamed: bool) -> int:
    """Bytes a probe of `model` may allocate on its device (an upper estimate).

    Streamed: the non-block weights and `DEFAULT_CAPACITY` of the largest block, plus
    activations; resident: activations only (the weights are there already).
    Activations: every slot's recorded output for the batch, `ACTIVATION_FACTOR` x the
    hidden states of one forward of up to `batch_tokens` tokens, and the logits chunk.
    """
    root = unwrap_model(model)
    blocks = find_blocks(root, kwargs.get("blocks"))
    floats = [p for p in root.parameters() if p.is_floating_point()]
    element = floats[0].element_size() if floats else 4
    hidden = _hidden_size(root)
    n_tokens = int(input_ids.numel())
    batch_tokens = max(n_tokens, int(kwargs.get("batch_tokens") or DEFAULT_BATCH_TOKENS))
    need = len(blocks) * n_tokens * hidden * element
    need += ACTIVATION_FACTOR * batch_tokens * hidden * element
    need += min(DEFAULT_LOGIT_ELEMENTS, 4 * n_tokens * (vocab_size_of(root) or 1)) * 4
    if streamed:
        block_ids = {id(p) for p in blocks.parameters()}
        skeleton = [p for p in root.parameters() if id(p) not in block_ids]
        largest = max(nbytes(b.parameters()) for b in blocks)
        need += nbytes(skeleton) + nbytes(root.buffers()) + DEFAULT_CAPACITY * largest
    return need


def _hidden_size(root: nn.Module) -> int:
    getter = getattr(root, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if isinstance(embedding, nn.Embedding):
        return embedding.embedding_dim
    size = getattr(getattr(root, "config", None), "hidden_size", None)
    return size if isinstance(size, int) else 0


class DeviceBudget:
    """Refuses a probe that would not fit in the device's free memory.

    Args:
        mem_get_info: ``device -> (free, total)`` bytes; None: `torch.cuda.mem_get_info`
            on CUDA and no check elsewhere. Tests pass their own to exercise the check.
    """

    def __init__(self, mem_get_info: Callable[[torch.device], tuple[int, int]] | None = None):
        self.mem_get_info = mem_get_info

    def free(self, device: torch.device) -> int | None:
        if self.mem_get_info is not None:
            return int(self.mem_get_info(device)[0])
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        return None

    def check(self, device: torch.device, need: Callable[[], int]) -> None:
        """Raise `DeviceMemoryError` when ``need()`` bytes exceed the free memory."""
        free = self.free(device)
        if free is None:
            return
        wanted = need()
        if wanted > free:
            raise DeviceMemoryError(
                f"not enough free device memory: need {format_bytes(wanted)}, free "
                f"{format_bytes(free)}; lower batch_tokens (or use shadow_device='host', "
                "or probe less often)"
            )


@dataclass
class PeakBox:
    bytes: int | None = None  # set when the measured block ends (None: not measured)


@contextlib.contextmanager
def device_peak(device: torch.device):
    """Route this thread's CUDA allocations to a private pool; yield a `PeakBox` that
    holds the bytes the pool reserved once the block ends (its high-water mark: the
    caching allocator does not give segments back mid-probe). No-op off CUDA."""
    box = PeakBox()
    if device.type != "cuda" or not hasattr(torch.cuda, "use_mem_pool"):
        yield box
        return
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool, device):
        try:
            yield box
        finally:
            # A figure that cannot be read (an older torch) must not fail the probe.
            with contextlib.suppress(Exception):
                index = device.index if device.index is not None else torch.cuda.current_device()
                segments = torch.cuda.memory_snapshot(pool.id)
                box.bytes = sum(s["total_size"] for s in segments if s.get("device") == index)
