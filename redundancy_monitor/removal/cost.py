"""The measured cost of a removal set (docs/definitions.md §5); which set to remove is
chosen in `redundancy_monitor.removal.selection`.

A removal set is a set of slots to skip. Its cost is measured two ways: `d_del` on the
probe batch (the same engine as every other distance) and the perplexity of the pruned
model on held-out text with a sliding window. The pruned model is the original model
with those slots skipped (slot semantics: every other slot keeps its position, mask and
attention type), which is also what an exported pruned checkpoint computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.formatting import finite_or_none
from redundancy_monitor.probing.batch import make_batch
from redundancy_monitor.probing.engine import EngineOptions, variant_distances
from redundancy_monitor.probing.model_io import (
    call_model,
    logits_of,
    slots_skipped,
    untouched,
    vocab_size_of,
)
from redundancy_monitor.probing.probe import prepare
from redundancy_monitor.probing.variants import Variant
from redundancy_monitor.removal.selection import check_removal_set

DEFAULT_WINDOW = 512


# -- held-out perplexity of the pruned model -----------------------------------------


def _heldout_rows(heldout_ids, vocab_size: int | None) -> torch.Tensor:
    ids = torch.as_tensor(heldout_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[-1] < 2:
        raise InvalidConfigError(
            f"held-out text has {ids.shape[-1]} token(s); perplexity needs at least 2"
        )
    return make_batch(ids, None, vocab_size).input_ids


def window_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each sliding window over n tokens.

    Windows of `window` tokens end `stride` apart; each scores the positions after the
    previous window's end, so every position 1..n-1 is scored exactly once with at least
    ``window - stride`` tokens of context. Needs ``1 <= stride < window``.
    """
    plan, prev_end, end = [], 1, min(window, n_tokens)
    while True:
        begin = max(0, end - window)
        if prev_end < end:
            plan.append((begin, end, prev_end))
        if end == n_tokens:
            return plan
        prev_end, end = end, min(end + stride, n_tokens)


def check_window(model: nn.Module, window: int | None, stride: int | None) -> tuple[int, int]:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window is None:
        window = min(DEFAULT_WINDOW, limit) if isinstance(limit, int) else DEFAULT_WINDOW
    if stride is None:
        stride = max(1, window // 2)
    if window < 2 or not 1 <= stride < window:
        raise InvalidConfigError(
            f"need window >= 2 and 1 <= stride < window (a window must overlap the "
            f"previous one to give its first token context), got window={window}, "
            f"stride={stride}"
        )
    if isinstance(limit, int) and window > limit:
        raise InvalidConfigError(
            f"window={window} exceeds the model's max_position_embeddings={limit}; pass "
            f"window <= {limit}"
        )
    return window, stride


def sliding_perplexity(
    model: nn.Module, rows: torch.Tensor, window: int, stride: int, max_tokens: int = 1 << 12
) -> float:
    """exp(mean next-token NLL) over every row, scored with a sliding window, in fp32.

    Windows of equal length run together, up to `max_tokens` tokens per forward.
    """
    nll, count = 0.0, 0
    for row in rows:
        plan = window_plan(int(row.shape[0]), window, stride)
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for w in plan:
            by_length.setdefault(w[1] - w[0], []).append(w)
        for length, windows in by_length.items():
            per_forward = max(1, max_tokens // length)
            for k in range(0, len(windows), per_forward):
                part = windows[k : k + per_forward]
                ids = torch.stack([row[b:e] for b, e, _ in part])
                logits = logits_of(call_model(model, make_batch(ids)))
                for n, (begin, end, first) in enumerate(part):
                    rows_ = logits[n, first - 1 - begin : end - 1 - begin]
                    logp = torch.log_softmax(rows_.float(), dim=-1)
                    targets = row[first:end].to(logp.device)
                    nll -= float(logp.gather(-1, targets.unsqueeze(-1)).double().sum())
                    count += end - first
    return math.exp(nll / count)


# -- cost of one removal set ----------------------------------------------------------


@dataclass(frozen=True)
class RemovalCost:
    """Measured cost of removing `layers` (docs/definitions.md §5)."""

    layers: tuple[int, ...]
    d_del: float
    d_del_last: float
    perplexity: float | None = None
    base_perplexity: float | None = None
    window: int | None = None
    stride: int | None = None
    heldout_tokens: int = 0

    @property
    def perplexity_change(self) -> float | None:
        """Relative perplexity increase over the unpruned model (0.1 = +10 %)."""
        if self.perplexity is None or not self.base_perplexity:
            return None
        return self.perplexity / self.base_perplexity - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "d_del": finite_or_none(self.d_del),
            "d_del_last": finite_or_none(self.d_del_last),
            "perplexity": finite_or_none(self.perplexity),
            "base_perplexity": finite_or_none(self.base_perplexity),
            "perplexity_change": finite_or_none(self.perplexity_change),
            "window": self.window,
            "stride": self.stride,
            "heldout_tokens": self.heldout_tokens,
        }


@dataclass
class CostMeter:
    """Measures removal sets of one model on one probe batch and one held-out text.

    The base perplexity is computed once; `d_del` of many sets goes through the engine
    in one call. Used by `removal_cost` and by the comparison of selectors.
    """

    model: nn.Module
    input_ids: Any
    attention_mask: Any = None
    heldout_ids: Any = None
    window: int | None = None
    stride: int | None = None
    blocks: Any = None
    head: Any = None
    options: EngineOptions | None = None
    _base_ppl: float | None = field(default=None, init=False)

    def __post_init__(self):
        self.root, self.block_list, self.head_module, self.batch = prepare(
            self.model, self.input_ids, self.attention_mask, self.blocks, self.head
        )
        self.n_layers = len(self.block_list)
        self.rows = None
        if self.heldout_ids is not None:
            self.window, self.stride = check_window(self.root, self.window, self.stride)
            rows = _heldout_rows(self.heldout_ids, vocab_size_of(self.root))
            self.rows = rows.to(self.batch.input_ids.device)

    @property
    def heldout_tokens(self) -> int:
        return 0 if self.rows is None else int(self.rows.numel())

    def check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        return check_removal_set(layers, self.n_layers)

    def d_del(self, sets: Sequence[tuple[int, ...]], progress=None) -> list[tuple[float, float]]:
        variants = [Variant.deletion(self.n_layers, s) for s in sets]
        out = variant_distances(
            self.root,
            self.block_list,
            self.head_module,
            self.batch,
            variants,
            self.options,
            progress=progress,
        )
        return [(d.mean, d.last) for d in out]

    def perplexity(self, layers: tuple[int, ...] = ()) -> float | None:
        if self.rows is None:
            return None
        assert self.window is not None and self.stride is not None  # set with rows
        with untouched(self.root), slots_skipped(self.root, self.block_list, layers, self.batch):
            return sliding_perplexity(self.root, self.rows, self.window, self.stride)

    @property
    def base_perplexity(self) -> float | None:
        if self._base_ppl is None and self.rows is not None:
            self._base_ppl = self.perplexity(())
        return self._base_ppl

    def costs(self, sets: Sequence[Iterable[int]], progress=None) -> list[RemovalCost]:
        """Cost of each removal set; `progress` (a tqdm bar) advances per evaluation."""
        checked = [self.check_layers(s) for s in sets]
        distances = self.d_del(checked)
        base = self.base_perplexity
        out = []
        for layers, (mean, last) in zip(checked, distances, strict=True):
            out.append(
                RemovalCost(
                    layers,
                    mean,
                    last,
                    self.perplexity(layers),
                    base,
                    self.window,
                    self.stride,
                    self.heldout_tokens,
                )
            )
            if progress is not None:
                progress.update(1)
        return out


def removal_cost(
    model: nn.Module,
    layers: Iterable[int],
    input_ids,
    attention_mask=None,
    heldout_ids=None,
    window: int | None = None,
    stride: int | None = None,
    blocks: str | nn.ModuleList | None = None,
    head: str | nn.Module | None = None,
) -> RemovalCost:
    """Measured cost of removing `layers`: d_del on the probe batch, held-out perplexity.

    Args:
        model: the causal LM; it is left unchanged.
        layers: 0-based slots to remove.
        input_ids, attention_mask: the probe batch (as for `probe`).
        heldout_ids: token ids of held-out text, 1-D or ``[n_docs, n_tokens]``; without
            it only d_del is measured.
        window: tokens per perplexity window (default min(512, max_position_embeddings)).
        stride: step between windows (default window // 2); both are reported.

    Raises:
        InvalidBudgetError: a layer out of range, or no layer/every layer removed.
        InvalidConfigError: a bad window/stride or held-out text shorter than 2 tokens.

    Example:
        >>> cost = removal_cost(model, [5, 9], probe_ids, heldout_ids=held)
        >>> cost.d_del, cost.perplexity, cost.base_perplexity
    """
    meter = CostMeter(model, input_ids, attention_mask, heldout_ids, window, stride, blocks, head)
    return meter.costs([layers])[0]
