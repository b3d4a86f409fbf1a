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


def finite_floats(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every float made JSON-safe by `finite_or_none`; other values as they are."""
    return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in values.items()}


def fmt(x: float | None, digits: int = 4, missing: str = "null") -> str:
    """`x` with `digits` decimals; `missing` for None; NaN and inf as ``nan`` / ``inf``."""
    return missing if x is None else f"{x:.{digits}f}"
