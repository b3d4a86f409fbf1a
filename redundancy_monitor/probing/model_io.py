"""How a probe talks to a model: building its inputs, computing its logits, and the
context that leaves it exactly as it was found (docs/definitions.md §2 invariants)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from redundancy_monitor.errors import InvalidBatchError, UnsupportedModelError
from redundancy_monitor.probing.batch import ProbeBatch


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def vocab_size_of(model: nn.Module) -> int | None:
    """The size of the embedding table, which bounds the valid token ids."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def call_model(model: nn.Module, batch: ProbeBatch, repeat: int = 1):
    """Run `model` on the batch, tiled `repeat` times along the batch dimension.

    Positions are counted over valid tokens so that left padding scores the same as no
    padding; `use_cache=False` keeps Hugging Face models from building a KV cache.
    """
    ids, mask = batch.input_ids, batch.attention_mask
    if repeat > 1:
        ids, mask = ids.repeat(repeat, 1), mask.repeat(repeat, 1)
    forward = model.forward
    kwargs: dict[str, Any] = {}
    if _accepts(forward, "attention_mask"):
        kwargs["attention_mask"] = mask
    elif batch.has_padding and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise InvalidBatchError(
            f"{type(model).__name__}.forward takes no attention_mask, so padding before a "
            "token would change its logits; pad on the right only, or pass unpadded ids"
        )
    if batch.has_padding and _accepts(forward, "position_ids"):
        positions = batch.position_ids()
        kwargs["position_ids"] = positions.repeat(repeat, 1) if repeat > 1 else positions
    if _accepts(forward, "use_cache"):
        kwargs["use_cache"] = False
    if _accepts(forward, "input_ids"):
        return model(input_ids=ids, **kwargs)
    return model(ids, **kwargs)


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a model output (HF ModelOutput, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedModelError(
        f"cannot find logits in a model output of type {type(output).__name__}; the model "
        "must return a logits tensor, a tuple starting with one, or an object with .logits"
    )


def block_hidden(output) -> torch.Tensor:
    """The hidden states a decoder block returns (a tensor, or the first of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def block_return_kinds(model: nn.Module, blocks: nn.ModuleList, batch: ProbeBatch) -> list[bool]:
    """Whether each block returns a tuple (older transformers) or a tensor, from a
    two-token forward of the batch's first sequence."""
    kinds = [False] * len(blocks)

    def recorder(slot):
        def hook(module, args, output):
            kinds[slot] = isinstance(output, (tuple, list))

        return hook

    mask = batch.attention_mask[:1, :2]
    short = ProbeBatch(batch.input_ids[:1, :2], mask, bool((mask == 0).any()), "")
    handles = [b.register_forward_hook(recorder(s)) for s, b in enumerate(blocks)]
    try:
        call_model(model, short)
    finally:
        for h in handles:
            h.remove()
    return kinds


def logit_transform(model: nn.Module):
    """What the model does to the head's output before returning logits (Gemma soft-capping)."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        return lambda z: torch.tanh(z / cap) * cap
    return None


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, no autocast; every module's mode restored after.

    The random number generators are left alone, neither saved nor restored: a probe may
    run in a thread beside training, and restoring the process-wide generator when it
    ends would rewind every number training drew meanwhile. In eval mode a model draws
    none (dropout is off), so the global RNG state is untouched all the same.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            model.eval()
            yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward) -> Iterator[None]:
    """Temporarily route `module(...)` to `forward`, restoring any instance-level forward."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.__dict__["forward"] = previous  # the instance attribute it was
        else:
            del module.forward


def final_hidden(
    model: nn.Module, head: nn.Module, batch: ProbeBatch, repeat: int = 1, *, advice: str
) -> torch.Tensor:
    """The head's input in one forward of `model` (the head itself is not run).

    Raises:
        UnsupportedModelError: the head ran more or less than once; `advice` says what to
            do instead.
    """
    captured: list[torch.Tensor] = []

    def record(hidden, *args, **kwargs):
        captured.append(hidden)
        return hidden.new_zeros((*hidden.shape[:-1], 1))

    with forward_replaced(head, record):
        call_model(model, batch, repeat)
    if len(captured) != 1:
        raise UnsupportedModelError(
            f"the output head of {type(model).__name__} ran {len(captured)} times in one "
            f"forward; {advice}"
        )
    return captured[0]


def same_logits(expected: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether logits computed from the head's input match the model's own: same shape,
    and no element further off than 1e-3 of the largest logit (of 1e-3 where all are
    below 1). NaN differences are not counted as off."""
    expected, got = expected.float(), got.float()
    scale = max(1.0, float(expected.abs().max()))
    return got.shape == expected.shape and not float((got - expected).abs().max()) > 1e-3 * scale


@contextlib.contextmanager
def blocks_replaced(blocks: nn.ModuleList, replacements: Mapping[int, nn.Module]) -> Iterator[None]:
    """Temporarily put other modules in some slots of the block list."""
    originals = {s: blocks[s] for s in replacements}
    try:
        for s, module in replacements.items():
            blocks[s] = module
        yield
    finally:
        for s, module in originals.items():
            blocks[s] = module


class SlotStandIn(nn.Module):
    """A module put in a slot for the duration of a probe.

    It answers attribute look-ups it cannot serve from the slot's own module, so model
    code that reads per-slot properties (``attention_type``, ``layer_idx``, ...) sees
    the slot unchanged: slot semantics, docs/definitions.md §1.
    """

    def __init__(self, slot_module: nn.Module):
        super().__init__()
        self.slot_module = slot_module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["slot_module"], name)


class SkippedSlot(SlotStandIn):
    """Stands in a slot that a variant skips: returns its input hidden states."""

    def __init__(self, slot_module: nn.Module, returns_tuple: bool):
        super().__init__(slot_module)
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


@contextlib.contextmanager
def slots_skipped(
    model: nn.Module, blocks: nn.ModuleList, layers: Iterable[int], batch: ProbeBatch
) -> Iterator[None]:
    """Run `model` with the given slots skipped (identity): the pruned model. Restored on exit.

    `batch` supplies two tokens for a forward that tells how each block returns.
    """
    layers = sorted(set(layers))
    kinds = block_return_kinds(model, blocks, batch)
    with blocks_replaced(blocks, {s: SkippedSlot(blocks[s], kinds[s]) for s in layers}):
        yield
