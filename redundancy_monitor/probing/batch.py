"""The probe batch: fixed token ids with an optional mask, validated and hashed (docs/definitions.md §1)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from redundancy_monitor.errors import InvalidBatchError


@dataclass(frozen=True)
class ProbeBatch:
    """Validated probe inputs. `attention_mask` is always present (ones when none given)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    has_padding: bool
    sha256: str

    @property
    def n_seq(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def position_ids(self) -> torch.Tensor:
        """Positions counted over valid tokens only, so left padding does not shift them."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> ProbeBatch:
        return ProbeBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.has_padding, self.sha256
        )


def batch_sha256(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """SHA-256 over the int64 ids, then the int8 mask, both row-major, plus the shape."""
    h = hashlib.sha256()
    h.update(repr(tuple(input_ids.shape)).encode())
    h.update(input_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    h.update(attention_mask.detach().to("cpu", torch.int8).contiguous().numpy().tobytes())
    return h.hexdigest()


def make_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> ProbeBatch:
    """Check the ids and mask and return a `ProbeBatch`.

    Raises:
        InvalidBatchError: not a 2-D integer tensor, empty, a sequence with no valid
            token, an id outside ``[0, vocab_size)``, or a mask of another shape or with
            values other than 0/1.
    """
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidBatchError(
                f"input_ids must be a 2-D integer tensor [n_seq, seq_len], got "
                f"{type(input_ids).__name__}"
            ) from None
    if (
        input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
        or input_ids.dtype == torch.bool
    ):
        raise InvalidBatchError(
            f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; "
            "pass token ids (e.g. tokenizer(...)['input_ids']), not embeddings"
        )
    if input_ids.dim() != 2:
        raise InvalidBatchError(
            f"input_ids must be 2-D [n_seq, seq_len], got shape {tuple(input_ids.shape)}; "
            "use input_ids.unsqueeze(0) for a single sequence"
        )
    if input_ids.numel() == 0:
        raise InvalidBatchError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token"
        )
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.long)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InvalidBatchError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass a mask of the same shape (1 = token, 0 = pad)"
            )
        values = torch.unique(attention_mask.detach().cpu())
        if not bool(((values == 0) | (values == 1)).all()):
            raise InvalidBatchError(
                "attention_mask must hold only 0 (pad) and 1 (token); got values "
                f"{values.tolist()[:6]}"
            )
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    per_seq = mask.sum(-1)
    if int(per_seq.sum()) == 0:
        raise InvalidBatchError(
            "the batch is all padding (attention_mask is all 0); pass a mask with 1 at "
            "every real token"
        )
    empty = (per_seq == 0).nonzero().flatten().tolist()
    if empty:
        raise InvalidBatchError(
            f"sequences {empty[:8]} have no valid token (mask all 0); drop them from the batch"
        )
    valid_ids = input_ids[mask.bool()]
    low, high = int(valid_ids.min()), int(valid_ids.max())
    if low < 0:
        raise InvalidBatchError(
            f"input_ids holds a negative token id ({low}); pass the tokenizer's ids, with "
            "padding marked in attention_mask rather than by a negative id"
        )
    if vocab_size is not None and high >= vocab_size:
        raise InvalidBatchError(
            f"input_ids holds token id {high}, but the model's vocabulary has {vocab_size} "
            "entries; tokenize with the model's own tokenizer"
        )
    ids = input_ids.long()
    if vocab_size is not None:
        # Pad positions are never scored; keep their ids inside the embedding table.
        ids = ids.masked_fill((mask == 0) & ((ids < 0) | (ids >= vocab_size)), 0)
    return ProbeBatch(ids, mask, bool((mask == 0).any()), batch_sha256(ids, mask))
