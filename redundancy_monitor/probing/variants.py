"""Variants (slot -> block maps) and the pair sets they are built from (docs/definitions.md §1, 3)."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from redundancy_monitor.errors import InvalidPairsError, InvalidProtocolError

PROTOCOLS = ("replacement", "interchange", "deletion")
PairSpec = str | Iterable[tuple[int, int]]


@dataclass(frozen=True)
class Variant:
    """A map slot -> block; ``None`` means the slot is skipped (identity).

    ``slots[k] == k`` for every slot the variant leaves alone.
    """

    slots: tuple[int | None, ...]

    @classmethod
    def identity(cls, n_layers: int) -> Variant:
        return cls(tuple(range(n_layers)))

    @classmethod
    def replacement(cls, n_layers: int, slot: int, block: int) -> Variant:
        """Slot `slot` runs block `block`: the variant behind R(slot <- block)."""
        slots = list(range(n_layers))
        slots[slot] = block
        return cls(tuple(slots))

    @classmethod
    def interchange(cls, n_layers: int, i: int, j: int) -> Variant:
        """Slot i runs block j and slot j runs block i."""
        slots = list(range(n_layers))
        slots[i], slots[j] = j, i
        return cls(tuple(slots))

    @classmethod
    def deletion(cls, n_layers: int, skipped: Iterable[int]) -> Variant:
        slots: list[int | None] = list(range(n_layers))
        for s in skipped:
            slots[s] = None
        return cls(tuple(slots))

    @property
    def n_layers(self) -> int:
        return len(self.slots)

    @property
    def changed_slots(self) -> tuple[int, ...]:
        return tuple(s for s, b in enumerate(self.slots) if b != s)

    @property
    def first_changed(self) -> int:
        """First slot whose computation differs from the unmodified model (L if none)."""
        changed = self.changed_slots
        return changed[0] if changed else self.n_layers


def parse_pairs(spec: PairSpec, n_layers: int) -> list[tuple[int, int]]:
    """Expand a pair-set spec into sorted, de-duplicated ``(i, j)`` with ``i < j``.

    `spec` is ``"adjacent"``, ``"window:k"``, ``"all"`` or an iterable of pairs.
    """
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == "adjacent":
            return [(i, i + 1) for i in range(n_layers - 1)]
        if name == "all":
            return [(i, j) for i in range(n_layers) for j in range(i + 1, n_layers)]
        if name.startswith("window:"):
            try:
                k = int(name.split(":", 1)[1])
            except ValueError:
                k = 0
            if k < 1:
                raise InvalidPairsError(
                    f"pair set {spec!r}: window needs a positive integer, e.g. 'window:3'"
                )
            return [
                (i, j) for i in range(n_layers) for j in range(i + 1, min(i + k, n_layers - 1) + 1)
            ]
        raise InvalidPairsError(
            f"unknown pair set {spec!r}; pass 'adjacent', 'window:k', 'all' or a list of (i, j)"
        )
    pairs = set()
    for item in materialise_pairs(spec):
        i, j = _slot_pair(item)
        for k in (i, j):
            if not 0 <= k < n_layers:
                raise InvalidPairsError(
                    f"pair {(i, j)} names slot {k}, but the model has {n_layers} blocks "
                    f"(valid slots are 0..{n_layers - 1}, 0-based)"
                )
        if i == j:
            raise InvalidPairsError(f"pair {(i, j)} names the same slot twice; use i != j")
        pairs.add((min(i, j), max(i, j)))
    if not pairs:
        raise InvalidPairsError("the pair list is empty; pass at least one (i, j)")
    return sorted(pairs)


def materialise_pairs(spec: PairSpec) -> str | list[tuple]:
    """A pair-set spec that can be read more than once: a name as it is, any other
    iterable (a generator, a tensor) as a list of its items.

    Raises:
        InvalidPairsError: `spec` is neither a name nor iterable.
    """
    if isinstance(spec, str):
        return spec
    try:
        return [tuple(item) if isinstance(item, Iterable) else item for item in spec]
    except TypeError:
        raise InvalidPairsError(
            f"pairs must be 'adjacent', 'window:k', 'all' or a list of (i, j), got "
            f"{type(spec).__name__}"
        ) from None


def _slot_pair(item) -> tuple[int, int]:
    """Two slot indices, refusing anything that is not an integer (0.5 is not slot 0)."""
    try:
        i, j = item
        if isinstance(i, bool) or isinstance(j, bool):
            raise TypeError
        return operator.index(i), operator.index(j)
    except (TypeError, ValueError):
        raise InvalidPairsError(
            f"pair {item!r} is not two integers; pass a list like [(0, 1), (2, 5)]"
        ) from None


def check_protocols(protocols: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(protocols, str):
        protocols = (protocols,)
    out = []
    for p in protocols:
        if p not in PROTOCOLS:
            raise InvalidProtocolError(
                f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}"
            )
        if p not in out:
            out.append(p)
    if not out:
        raise InvalidProtocolError(f"no protocol given; choose from {', '.join(PROTOCOLS)}")
    return tuple(out)


def exchange_mismatch(blocks: nn.ModuleList, i: int, j: int) -> str | None:
    """Why the weights of blocks i and j cannot stand in for each other, or None."""
    a = {n: tuple(p.shape) for n, p in blocks[i].named_parameters()}
    b = {n: tuple(p.shape) for n, p in blocks[j].named_parameters()}
    if type(blocks[i]) is not type(blocks[j]):
        return f"block types differ ({type(blocks[i]).__name__} vs {type(blocks[j]).__name__})"
    if a.keys() != b.keys():
        diff = sorted(a.keys() ^ b.keys())
        return f"parameter names differ: {', '.join(diff[:4])}"
    for name in a:
        if a[name] != b[name]:
            return f"parameter {name} has shape {a[name]} in block {i} but {b[name]} in block {j}"
    return None
