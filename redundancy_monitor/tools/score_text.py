"""The text `score` measures on: a probe batch drawn from the whole text, and held-out
pieces disjoint from it and away from it.

Each ``--text`` file is tokenized on its own (a document). Its tokens are cut into
aligned slots of ``seq_len``; the slots of all documents, in order, are split into
``n`` equal strata and one slot is drawn (seeded) from each, so the sequences come from
every part of the text and from every file in proportion to its length. Without
``--heldout``, the held-out text is what remains of the documents once each probe
sequence and a guard of ``seq_len`` tokens on either side of it are taken out: no
held-out token continues or precedes a probe sequence directly. The probe batch and its
guards take at most half the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from redundancy_monitor.errors import CheckpointError
from redundancy_monitor.tools.loading import check_batch_shape, tokenize


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of text source `source` (an index into `sources`)."""

    source: int
    start: int
    end: int


@dataclass(frozen=True)
class ScoreText:
    """The probe batch and the held-out pieces, with where each came from."""

    probe_ids: torch.Tensor  # [n_seq, seq_len]
    heldout_ids: list[torch.Tensor]  # pieces, in text order
    text_tokens: int
    heldout_source: str  # "split" (what the probe batch leaves of --text) or "file"
    sources: tuple[str, ...]  # the --text files, then the --heldout file if any
    sequences: tuple[Span, ...]
    heldout_spans: tuple[Span, ...]
    seed: int
    guard: int

    @property
    def heldout_tokens(self) -> int:
        return sum(int(x.numel()) for x in self.heldout_ids)

    def to_dict(self) -> dict[str, Any]:
        def span(s: Span) -> dict[str, Any]:
            return {"source": s.source, "file": self.sources[s.source], "start": s.start,
                    "end": s.end}  # fmt: skip

        return {
            "n_seq": int(self.probe_ids.shape[0]),
            "seq_len": int(self.probe_ids.shape[1]),
            "text_tokens": self.text_tokens,
            "heldout_tokens": self.heldout_tokens,
            "heldout_source": self.heldout_source,
            "sampling": "stratified",
            "seed": self.seed,
            "guard_tokens": self.guard,
            "sources": list(self.sources),
            "sequences": [span(s) for s in self.sequences],
            "heldout_pieces": [span(s) for s in self.heldout_spans],
        }


def draw_slots(lengths: Sequence[int], n_seq: int, seq_len: int, seed: int) -> list[Span]:
    """`n_seq` (or fewer, if there are fewer) aligned slots, one from each of `n_seq` equal
    strata of all slots in text order; sorted by (source, start)."""
    slots = [(d, p) for d, n in enumerate(lengths) for p in range(0, n - seq_len + 1, seq_len)]
    n = min(n_seq, len(slots))
    if n == 0:
        return []
    rng = np.random.default_rng([seed, n, seq_len])
    edges = [round(k * len(slots) / n) for k in range(n + 1)]
    picks = [slots[int(rng.integers(edges[k], edges[k + 1]))] for k in range(n)]
    return [Span(d, p, p + seq_len) for d, p in sorted(picks)]


def remaining_pieces(lengths: Sequence[int], taken: Sequence[Span], guard: int) -> list[Span]:
    """What is left of each source once every taken span, widened by `guard` tokens on
    each side, is removed; pieces shorter than 2 tokens (nothing to score) are dropped."""
    out = []
    for d, n in enumerate(lengths):
        cuts = sorted(
            (max(0, s.start - guard), min(n, s.end + guard)) for s in taken if s.source == d
        )
        at = 0
        for a, b in [*cuts, (n, n)]:
            if a - at >= 2:
                out.append(Span(d, at, a))
            at = max(at, b)
    return out


def draw_text(
    tokenizer,
    texts: Sequence[tuple[str, str]],
    n_seq: int,
    seq_len: int,
    seed: int = 0,
    heldout: tuple[str, str] | None = None,
) -> ScoreText:
    """Draw the probe batch from `texts` (name, content) and cut the held-out pieces.

    Raises:
        CheckpointError: bad sizes, or too little text for one sequence or for held-out text.
    """
    check_batch_shape(n_seq, seq_len)
    docs = [tokenize(tokenizer, content) for _, content in texts]
    lengths = [int(d.numel()) for d in docs]
    total = sum(lengths)
    guard = 0 if heldout is not None else seq_len
    if heldout is None:  # the sequences and their guards take at most half the tokens
        n_seq = min(n_seq, total // (2 * (seq_len + 2 * guard)))
    spans = draw_slots(lengths, n_seq, seq_len, seed) if n_seq > 0 else []
    if not spans:
        need = seq_len if heldout is not None else 2 * (seq_len + 2 * guard)
        raise CheckpointError(
            f"the text has {total} tokens, too short for one sequence of --seq-len {seq_len} "
            f"(needs {need}"
            + ("" if heldout is not None else ", with held-out text away from it")
            + " in one file); pass more text, a smaller --seq-len, or --heldout FILE"
        )
    probe_ids = torch.stack([docs[s.source][s.start : s.end] for s in spans])
    names = tuple(name for name, _ in texts)
    if heldout is None:
        pieces = remaining_pieces(lengths, spans, guard)
        heldout_ids = [docs[s.source][s.start : s.end] for s in pieces]
        source = "split"
    else:
        held = tokenize(tokenizer, heldout[1])
        names += (heldout[0],)
        pieces = [Span(len(texts), 0, int(held.numel()))] if held.numel() >= 2 else []
        heldout_ids = [held] if pieces else []
        source = "file"
    if not heldout_ids:
        raise CheckpointError(
            "the held-out text has fewer than 2 tokens; perplexity needs at least 2: pass "
            "more text or --heldout FILE"
        )
    return ScoreText(
        probe_ids, heldout_ids, total, source, names, tuple(spans), tuple(pieces), seed, guard
    )
