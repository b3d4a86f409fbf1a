"""How numbers leave the library: as JSON (NaN and inf become null) and as text."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(x: float | None) -> float | None:
    """A JSON-safe float: NaN and inf become None (null); numpy scalars become float."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def json_safe(value: Any) -> Any:
    """`value` with every float made finite-or-None and every tuple a list, through dicts
    and lists (what ``to_dict()`` methods return)."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def fmt(x: float | None, digits: int = 4, missing: str = "null") -> str:
    """`x` with `digits` decimals; `missing` for None; NaN and inf as ``nan`` / ``inf``."""
    return missing if x is None else f"{x:.{digits}f}"
