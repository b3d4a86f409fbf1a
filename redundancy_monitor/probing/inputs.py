"""Turning what a user has (ids, texts + tokenizer, a dataloader) into one fixed probe batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from redundancy_monitor.errors import InvalidBatchError


def ids_and_mask(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids and mask from a tensor, an ``(ids, mask)`` pair or a mapping with
    ``input_ids`` (a tokenizer's BatchEncoding, a collator's dict)."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise InvalidBatchError(
                f"the probe batch is a mapping without 'input_ids' (keys: {sorted(batch)[:8]}); "
                "pass token ids, or a dict with 'input_ids' and optionally 'attention_mask'"
            )
        return torch.as_tensor(batch["input_ids"]), _maybe(batch.get("attention_mask"))
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        mask = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        if mask is not None and mask.shape != batch[0].shape:
            mask = None  # (inputs, labels) of another shape: not a mask
        return batch[0], mask
    try:
        return torch.as_tensor(batch), None
    except (TypeError, ValueError, RuntimeError):
        raise InvalidBatchError(
            f"cannot read token ids from a probe batch of type {type(batch).__name__}; pass "
            "a [n_seq, seq_len] tensor, (ids, mask), or a dict with 'input_ids'"
        ) from None


def _maybe(x) -> torch.Tensor | None:
    return None if x is None else torch.as_tensor(x)


def from_texts(
    texts: Sequence[str], tokenizer, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize `texts` with a Hugging Face tokenizer, padded and truncated to `max_length`."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise InvalidBatchError("texts is empty; pass at least one probe text")
    if getattr(tokenizer, "pad_token", "x") is None:
        raise InvalidBatchError(
            "the tokenizer has no pad token, which probe texts of unequal length need; set "
            "tokenizer.pad_token = tokenizer.eos_token (padding is masked out of the probe)"
        )
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    return enc["input_ids"], enc.get("attention_mask")


def from_dataloader(loader, max_sequences: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first rows of `loader`'s data (at most `max_sequences`), moved to the CPU.

    Read so that training does not notice: a map-style dataset is indexed directly (rows
    0.. put together by the loader's ``collate_fn``), because iterating the loader would
    draw a seed from the global generator (changing the run's data order and dropout),
    start worker processes, and, for accelerate's loaders, register with the
    gradient-accumulation bookkeeping and synchronise generators across ranks. Other
    loaders (iterable datasets, plain iterables) give their first batch. Either way the
    CPU generator is restored afterwards, in case a dataset or collator draws numbers.
    """
    with torch.random.fork_rng(devices=[]):
        first = _first_rows(loader, max_sequences)
    ids, mask = ids_and_mask(first)
    if max_sequences is not None:
        ids = ids[:max_sequences]
        mask = None if mask is None else mask[:max_sequences]
    return ids.detach().cpu(), None if mask is None else mask.detach().cpu()


def _first_rows(loader, max_sequences: int | None):
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    limits = [n for n in (max_sequences, getattr(loader, "batch_size", None)) if n]
    indexable = (
        dataset is not None
        and not isinstance(dataset, torch.utils.data.IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )
    if indexable and dataset is not None and callable(collate) and limits:
        n_rows = min(len(dataset), *limits)
        if n_rows == 0:
            raise InvalidBatchError("the probe dataloader's dataset is empty; pass one with rows")
        return collate([dataset[i] for i in range(n_rows)])
    try:
        return next(iter(loader))
    except StopIteration:
        raise InvalidBatchError("the probe dataloader is empty; pass one with a batch") from None
