"""Held-out perplexity of many removal sets at once (docs/definitions.md §5).

Three ways to get the same numbers, from slow and obvious to fast:

- ``"reference"``: every removal set is a full forward of the pruned model over every
  sliding window (`redundancy_monitor.removal.cost.window_nll`). This is the ground
  truth the other two are tested against, and what ``score --exhaustive`` runs.
- ``"full"``: shared computation. Per batch of windows the unpruned model runs once and
  the hidden state entering each slot where some candidate's first removed layer sits is
  kept; a candidate whose first removed slot is f then starts there: slots before f-1
  pass their input through untouched (no block runs) and slot f-1 hands on the kept
  state, so only the blocks from f on run. Logits are computed for the scored positions
  of each window only. Every candidate still sees every window.
- ``"race"`` (the default): the shared computation on growing shares of the windows
  (taken in a seeded random order). After each share, every candidate gets a bootstrap
  interval of its perplexity change; a candidate whose interval lies entirely above the
  interval of the best contender of the same budget (the lowest estimate among the sets
  a deterministic selector chose) is stopped there. The rest go on to the next share.

Intervals are percentile bootstrap intervals over windows (each window scores `stride`
new tokens), resampling the base and candidate NLL of the same windows together.

Memory of the shared path: the kept hidden states are ``n_slots x tokens_per_forward x
hidden x bytes`` with ``n_slots`` the number of distinct first removed layers (>= 1),
held for one batch of windows at a time; ``cache_bytes`` bounds it by choosing how
many windows go into one forward (at least one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from redundancy_monitor.errors import InvalidConfigError, UnsupportedModelError
from redundancy_monitor.probing.batch import ProbeBatch, make_batch
from redundancy_monitor.probing.model_io import (
    SkippedSlot,
    SlotStandIn,
    block_hidden,
    block_return_kinds,
    blocks_replaced,
    call_model,
    final_hidden,
    logit_transform,
    logits_of,
    same_logits,
    slots_skipped,
    untouched,
)
from redundancy_monitor.removal.cost import heldout_windows, window_nll

EVALUATIONS = ("race", "full", "reference")
#: Default bound on the hidden states kept per batch of windows (bytes).
DEFAULT_CACHE_BYTES = 1 << 30
#: Logit elements (rows x vocabulary) alive at once when scoring final hidden states.
LOGIT_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class HeldoutOptions:
    """How held-out perplexity of many removal sets is measured.

    Args:
        evaluation: ``"race"``, ``"full"`` or ``"reference"`` (see the module docstring).
        shares: fractions of the windows after which racing may stop candidates; the
            last is always 1.
        min_windows: no candidate is stopped on fewer windows than this.
        n_boot, confidence: the bootstrap intervals (replicates, two-sided level).
        seed: seeds the window order and the bootstrap.
        cache_bytes: bound on the hidden states the shared path keeps at once.
        max_tokens: tokens per forward (fewer when `cache_bytes` asks for it).
    """

    evaluation: str = "race"
    shares: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    min_windows: int = 8
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_tokens: int = 1 << 12

    def __post_init__(self):
        if self.evaluation not in EVALUATIONS:
            raise InvalidConfigError(
                f"unknown evaluation {self.evaluation!r}; choose from {', '.join(EVALUATIONS)}"
            )
        if not self.shares or any(not 0 < s <= 1 for s in self.shares):
            raise InvalidConfigError(f"shares must be fractions in (0, 1], got {self.shares}")
        if self.min_windows < 2 or self.n_boot < 10 or not 0 < self.confidence < 1:
            raise InvalidConfigError(
                "need min_windows >= 2, n_boot >= 10 and 0 < confidence < 1, got "
                f"{self.min_windows}, {self.n_boot}, {self.confidence}"
            )
        if self.cache_bytes < 1 or self.max_tokens < 1 or self.seed < 0:
            raise InvalidConfigError("cache_bytes, max_tokens must be >= 1 and seed >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluation": self.evaluation,
            "shares": list(self.shares),
            "min_windows": self.min_windows,
            "n_boot": self.n_boot,
            "confidence": self.confidence,
            "seed": self.seed,
            "cache_bytes": self.cache_bytes,
            "max_tokens": self.max_tokens,
        }


# -- bootstrap --------------------------------------------------------------------------


def change_interval(
    nll: np.ndarray,
    base: np.ndarray,
    count: np.ndarray,
    n_boot: int,
    confidence: float,
    seed: int,
) -> tuple[float, float, float]:
    """(estimate, low, high) of exp((sum nll - sum base) / sum count) - 1.

    Percentile bootstrap over windows: each replicate draws as many windows as there are,
    with replacement, and takes the candidate's and the base's NLL of the same windows.
    The generator is seeded from (seed, number of windows), so the same windows give the
    same interval whichever path measured them.
    """
    n = int(nll.shape[0])
    estimate = math.expm1((float(nll.sum()) - float(base.sum())) / float(count.sum()))
    if n < 2:
        return estimate, math.nan, math.nan
    rng = np.random.default_rng([seed, n])
    picks = rng.integers(0, n, size=(n_boot, n))
    diff = (nll - base)[picks].sum(1) / count[picks].sum(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(np.expm1(diff), [alpha, 1 - alpha])
    return estimate, float(low), float(high)


# -- results ----------------------------------------------------------------------------


@dataclass
class HeldoutScores:
    """Per-window NLL of the unpruned model and of each removal set.

    `nll[c][w]` is NaN where candidate c was not evaluated on window w (stopped early).
    """

    windows: list[tuple[int, int, int, int]]
    count: np.ndarray
    base: np.ndarray
    nll: dict[tuple[int, ...], np.ndarray]
    options: HeldoutOptions
    stopped_at: dict[tuple[int, ...], int] = field(default_factory=dict)  # windows seen

    @property
    def base_perplexity(self) -> float:
        return math.exp(float(self.base.sum()) / float(self.count.sum()))

    def stats(self, layers: tuple[int, ...]) -> CandidateStats:
        seen = np.isfinite(self.nll[layers])
        nll, base, count = self.nll[layers][seen], self.base[seen], self.count[seen]
        estimate, low, high = change_interval(
            nll, base, count, self.options.n_boot, self.options.confidence, self.options.seed
        )
        return CandidateStats(
            layers=layers,
            # On the windows seen; for a stopped set, the base perplexity of all of the
            # text scaled by the change measured on its share.
            perplexity=self.base_perplexity * (1 + estimate),
            perplexity_change=estimate,
            change_low=low,
            change_high=high,
            heldout_tokens=int(count.sum()),
            windows=int(seen.sum()),
            stopped_early=layers in self.stopped_at,
        )


@dataclass(frozen=True)
class CandidateStats:
    """Held-out result of one removal set: perplexity change with its interval."""

    layers: tuple[int, ...]
    perplexity: float
    perplexity_change: float
    change_low: float
    change_high: float
    heldout_tokens: int
    windows: int
    stopped_early: bool


# -- the shared path ----------------------------------------------------------------------


class _Replay(SlotStandIn):
    """Slot f-1 of a candidate whose first removed slot is f: hands on the unpruned
    model's output of this slot, recorded in the base forward of the same windows."""

    def __init__(self, slot_module: nn.Module, recorded: torch.Tensor, returns_tuple: bool):
        super().__init__(slot_module)
        self.recorded = recorded
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.recorded.clone()  # blocks after it may update their input in place
        return (out,) if self.returns_tuple else out


class SharedHeldout:
    """Sliding-window NLL of the unpruned model and of removal sets, sharing the prefix.

    The model must be in a state where running it is allowed (inside `untouched`).
    """

    def __init__(
        self,
        root: nn.Module,
        blocks: nn.ModuleList,
        head: nn.Module,
        rows: Sequence[torch.Tensor],
        windows: list[tuple[int, int, int, int]],
        kinds_batch: ProbeBatch,
        options: HeldoutOptions,
    ):
        self.root, self.blocks, self.head = root, blocks, head
        self.slot_modules = list(blocks)
        self.rows = list(rows)
        self.windows = windows  # heldout_windows(rows, window, stride), made by the caller
        self.options = options
        self.kinds = block_return_kinds(root, blocks, kinds_batch)
        self.transform = logit_transform(root)
        self._checked = False
        param = next(root.parameters())
        getter: Any = getattr(root, "get_input_embeddings", None)
        emb = getter() if callable(getter) else None
        self.hidden_size: int | None = getattr(emb, "embedding_dim", None)
        self.itemsize = param.element_size()

    # -- forwards ---------------------------------------------------------------------
    def _final_hidden(self, batch: ProbeBatch) -> torch.Tensor:
        return final_hidden(self.root, self.head, batch, advice="use evaluation='reference'")

    def _check_head(self, batch: ProbeBatch) -> None:
        """Logits from the head's input must be the model's logits (once per run)."""
        short = make_batch(batch.input_ids[:1, : min(16, batch.seq_len)])
        expected = logits_of(call_model(self.root, short)).float()
        got = self._logits(self._final_hidden(short))
        if not same_logits(expected, got):
            raise UnsupportedModelError(
                f"{type(self.root).__name__}'s logits are not its output head applied to "
                "the head's input; use evaluation='reference' (score --exhaustive)"
            )
        self._checked = True

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.head(hidden)
        return self.transform(z) if self.transform else z

    def _base_forward(self, batch: ProbeBatch, slots: Iterable[int]) -> tuple:
        recorded: dict[int, torch.Tensor] = {}

        def recorder(slot):
            def hook(module, args, output):
                recorded[slot] = block_hidden(output).detach()

            return hook

        handles = [self.blocks[s].register_forward_hook(recorder(s)) for s in slots]
        try:
            final = self._final_hidden(batch)
        finally:
            for h in handles:
                h.remove()
        return final, recorded

    def _candidate_forward(
        self, batch: ProbeBatch, layers: tuple[int, ...], recorded: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        first = layers[0]
        stand_ins: dict[int, nn.Module] = {}
        for s in range(first - 1):
            stand_ins[s] = SkippedSlot(self.slot_modules[s], self.kinds[s])  # runs nothing
        if first >= 1:
            stand_ins[first - 1] = _Replay(
                self.slot_modules[first - 1], recorded[first - 1], self.kinds[first - 1]
            )
        for s in layers:
            stand_ins[s] = SkippedSlot(self.slot_modules[s], self.kinds[s])
        with blocks_replaced(self.blocks, stand_ins):
            return self._final_hidden(batch)

    def _window_nll(self, final: torch.Tensor, part: list[int]) -> np.ndarray:
        """Summed NLL of each window's scored positions, from the final hidden states."""
        index, targets, owner = [], [], []
        length = final.shape[1]
        for n, k in enumerate(part):
            r, begin, end, first = self.windows[k]
            start = n * length + first - 1 - begin
            index.append(torch.arange(start, start + end - first))
            targets.append(self.rows[r][first:end])
            owner.append(torch.full((end - first,), n))
        flat_index = torch.cat(index).to(final.device)
        flat_targets = torch.cat(targets).to(final.device)
        flat_owner = torch.cat(owner).to(final.device)
        hidden = final.reshape(-1, final.shape[-1])
        out = torch.zeros(len(part), dtype=torch.float64, device=final.device)
        a, chunk, total = 0, 64, flat_index.numel()  # the first chunk tells the vocabulary
        while a < total:
            rows = hidden.index_select(0, flat_index[a : a + chunk])
            logp = torch.log_softmax(self._logits(rows).float(), dim=-1)
            picked = logp.gather(-1, flat_targets[a : a + chunk].unsqueeze(-1)).squeeze(-1)
            out.index_add_(0, flat_owner[a : a + chunk], -picked.double())
            a += chunk
            chunk = max(64, LOGIT_ELEMENTS // logp.shape[-1])
        return out.cpu().numpy()

    def forward_batches(self, windows: list[int], n_slots: int) -> list[list[int]]:
        """Windows of equal length grouped for one forward each, within the memory bound."""
        by_length: dict[int, list[int]] = {}
        for k in windows:
            _, begin, end, _ = self.windows[k]
            by_length.setdefault(end - begin, []).append(k)
        out = []
        for length, members in by_length.items():
            tokens = self.options.max_tokens
            if self.hidden_size:
                per_token = max(1, n_slots) * self.hidden_size * self.itemsize
                tokens = min(tokens, self.options.cache_bytes // per_token)
            per_forward = max(1, tokens // length)
            out += [members[a : a + per_forward] for a in range(0, len(members), per_forward)]
        return out

    def evaluate(
        self,
        windows: list[int],
        candidates: Sequence[tuple[int, ...]],
        base: np.ndarray,
        nll: dict[tuple[int, ...], np.ndarray],
        tick: Callable[[int], None] | None = None,
    ) -> None:
        """Fill `base` and `nll[c]` on `windows` for every candidate c."""
        slots = sorted({c[0] - 1 for c in candidates if c[0] >= 1})
        for part in self.forward_batches(windows, len(slots)):
            ids = torch.stack([self.rows[r][b:e] for r, b, e, _ in (self.windows[k] for k in part)])
            batch = make_batch(ids)
            if not self._checked:
                self._check_head(batch)
            final, recorded = self._base_forward(batch, slots)
            base[part] = self._window_nll(final, part)
            del final
            for c in candidates:
                final = self._candidate_forward(batch, c, recorded)
                nll[c][part] = self._window_nll(final, part)
                del final
            del recorded
            if tick is not None:
                tick(len(part) * (1 + len(candidates)))


# -- the three evaluations ----------------------------------------------------------------


def checkpoints(n_windows: int, options: HeldoutOptions) -> list[int]:
    """Numbers of windows after which racing looks at the intervals (the last: all)."""
    if options.evaluation != "race":
        return [n_windows]
    points = {
        min(n_windows, max(options.min_windows, math.ceil(s * n_windows))) for s in options.shares
    }
    return sorted(points | {n_windows})


def measure_heldout(
    root: nn.Module,
    blocks: nn.ModuleList,
    head: nn.Module,
    rows: Sequence[torch.Tensor],
    window: int,
    stride: int,
    kinds_batch: ProbeBatch,
    candidates: Sequence[tuple[int, ...]],
    contenders: Iterable[tuple[int, ...]],
    options: HeldoutOptions | None = None,
    progress=None,
) -> HeldoutScores:
    """Per-window NLL of the unpruned model and of every candidate removal set.

    Args:
        candidates: distinct removal sets (sorted tuples of slots).
        contenders: the candidates that may be recommended; racing stops a candidate only
            against the best contender of its budget (its number of layers).
        progress: a tqdm-like bar; its total is set here (window-forwards) and lowered
            when racing stops candidates.
    """
    options = options or HeldoutOptions()
    candidates = list(dict.fromkeys(candidates))
    contenders = set(contenders)
    windows = heldout_windows(rows, window, stride)
    n_windows = len(windows)
    count = np.array([e - f for _, _, e, f in windows], dtype=np.int64)
    base = np.full(n_windows, np.nan)
    nll = {c: np.full(n_windows, np.nan) for c in candidates}
    scores = HeldoutScores(windows, count, base, nll, options)
    if progress is not None:
        progress.total = n_windows * (1 + len(candidates))
        progress.refresh()
    tick = progress.update if progress is not None else None

    with untouched(root):
        if options.evaluation == "reference":
            for k, layers in enumerate([(), *candidates]):
                if progress is not None:
                    what = f"removing {list(layers)}" if layers else "the unpruned model"
                    progress.set_postfix_str(f"set {k}/{len(candidates)}: {what}")
                with slots_skipped(root, blocks, layers, kinds_batch):
                    values, _ = window_nll(root, rows, window, stride, options.max_tokens)
                (base if not layers else nll[layers])[:] = values
                if tick is not None:
                    tick(n_windows)
            return scores

        shared = SharedHeldout(root, blocks, head, rows, windows, kinds_batch, options)
        order = np.random.default_rng([options.seed, n_windows]).permutation(n_windows)
        alive, done = list(candidates), 0
        points = checkpoints(n_windows, options)
        for share, point in enumerate(points, 1):
            if progress is not None:
                progress.set_postfix_str(
                    f"share {share}/{len(points)}: {point} of {n_windows} windows, "
                    f"{len(alive)}/{len(candidates)} sets"
                )
            part = sorted(int(k) for k in order[done:point])
            shared.evaluate(part, alive, base, nll, tick)
            done = point
            if point == n_windows:
                break
            stopped = _race_step(scores, alive, contenders, done)
            for c in stopped:
                alive.remove(c)
                scores.stopped_at[c] = done
            if progress is not None and stopped:
                progress.total -= len(stopped) * (n_windows - done)
                progress.refresh()
    return scores


def _race_step(
    scores: HeldoutScores,
    alive: list[tuple[int, ...]],
    contenders: set[tuple[int, ...]],
    done: int,
) -> list[tuple[int, ...]]:
    """The candidates whose interval lies entirely above their budget's best contender's."""
    stats = {c: scores.stats(c) for c in alive}
    stopped = []
    for budget in sorted({len(c) for c in alive}):
        mine = [c for c in alive if len(c) == budget]
        rivals = [c for c in mine if c in contenders]
        if not rivals:
            continue
        best = min(rivals, key=lambda c: (stats[c].perplexity_change, c))
        ceiling = stats[best].change_high
        if not math.isfinite(ceiling):
            continue
        stopped += [c for c in mine if c != best and stats[c].change_low > ceiling]
    return stopped
