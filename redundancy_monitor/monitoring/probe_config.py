"""What each scheduled probe measures: the `probe()` settings of a monitor or a replay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.probing.engine import DEFAULT_BATCH_TOKENS, EngineOptions
from redundancy_monitor.probing.intervals import IntervalConfig
from redundancy_monitor.probing.result import Thresholds
from redundancy_monitor.probing.variants import (
    PairSpec,
    check_protocols,
    materialise_pairs,
    parse_pairs,
)


@dataclass(frozen=True)
class ProbeConfig:
    """The `probe()` settings used at every probe of one trajectory.

    Args:
        pairs: ``"adjacent"`` (default), ``"window:k"``, ``"all"`` or a list of ``(i, j)``.
        protocols: any of ``"replacement"``, ``"interchange"``, ``"deletion"``.
        thresholds: similarity bands and regime thresholds (None: the defaults).
        blocks, head: dotted paths of the block list and the output head, when they are
            not found alone. Paths, not modules: the probe runs on a copy of the model.
        batch_tokens: tokens run through the stack per forward.
        intervals: bootstrap intervals (default on) that the alert rules judge by: True,
            an `IntervalConfig` (which also sets the `target_halfwidth` of the
            sample-size advice recorded at a trajectory's first probe), or False.

    Raises:
        InvalidConfigError: a module object for `blocks` or `head`, a `batch_tokens` that
            is not a positive int.
        InvalidPairsError, InvalidProtocolError: a malformed pair set or protocol name.

    Example:
        >>> RedundancyMonitor(probe_ids, probe_config=ProbeConfig(pairs="window:2"))
    """

    pairs: PairSpec = "adjacent"
    protocols: tuple[str, ...] = ("replacement", "interchange")
    thresholds: Thresholds | None = None
    blocks: str | None = None
    head: str | None = None
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    intervals: bool | IntervalConfig = True

    def __post_init__(self):
        for name in ("blocks", "head"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidConfigError(
                    f"{name} must be a dotted path string: the probe runs on a copy of the "
                    f"model, so a module object of the original cannot be used; got "
                    f"{type(value).__name__}"
                )
        pairs = materialise_pairs(self.pairs)  # a generator is read once, here
        parse_pairs(pairs, 2 if isinstance(pairs, str) else 1 << 20)  # fail here, not per probe
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "protocols", check_protocols(self.protocols))
        tokens = self.batch_tokens
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise InvalidConfigError(f"batch_tokens must be a positive int, got {tokens!r}")
        EngineOptions(batch_tokens=tokens)  # range checked here, not at every probe
        object.__setattr__(self, "intervals", IntervalConfig.of(self.intervals) or False)

    def probe_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `probe()` these settings stand for."""
        return {
            "pairs": self.pairs,
            "protocols": self.protocols,
            "thresholds": self.thresholds,
            "blocks": self.blocks,
            "head": self.head,
            "batch_tokens": self.batch_tokens,
            "intervals": self.intervals,
        }


def pairs_spec(pairs: PairSpec) -> str | list[list[int]]:
    """A pair set as JSON (a name, or sorted [i, j] lists), to compare two of them."""
    if isinstance(pairs, str):
        return pairs.strip().lower()
    return sorted(sorted(int(x) for x in p) for p in pairs)
