"""Progress of long removal work, phase by phase, on stderr.

``"bars"``: a tqdm bar per phase, with its rate and ETA where the amount of work is
known. ``"lines"``: one line per phase when it starts, saying what it will do (for logs
and for ``--no-progress``). ``"off"``: nothing (the library's default).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from redundancy_monitor.errors import InvalidConfigError

MODES = ("bars", "lines", "off")


class _Quiet:
    """Stands in for a tqdm bar where none is shown."""

    def __init__(self, total: int | None = None):
        self.total = total
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def refresh(self) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class Phases:
    """Shows the phases of one run (load, probe, baselines, greedy, held-out, ...)."""

    def __init__(self, mode: str = "off", stream: TextIO | None = None):
        if mode not in MODES:
            raise InvalidConfigError(f"progress must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.stream = stream
        self.started = time.monotonic()

    @classmethod
    def of(cls, progress: Any) -> Phases:
        """True: bars; False or None: off; a mode name; or a `Phases` as it is."""
        if isinstance(progress, Phases):
            return progress
        if progress is None or progress is False:
            return cls("off")
        if progress is True:
            return cls("bars")
        return cls(str(progress))

    @property
    def bars(self) -> bool:
        return self.mode == "bars"

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def announce(self, name: str, detail: str = "") -> None:
        """The phase's line in ``"lines"`` mode (for phases that show their own bar)."""
        if self.mode == "lines":
            elapsed = time.monotonic() - self.started
            line = f"[{elapsed:7.1f}s] {name}" + (f": {detail}" if detail else "")
            print(line, file=self._out(), flush=True)

    @contextlib.contextmanager
    def phase(
        self,
        name: str,
        detail: str = "",
        total: int | None = None,
        unit: str = "it",
        at_end: bool = False,
    ) -> Iterator[Any]:
        """A bar for the phase (or a stand-in); `total` may be changed inside.

        `at_end`: for a phase that checks the user's input (loading), show nothing if it
        fails, so that the error is the only line: its line comes when it is done, and
        its bar only once it has run a second.
        """
        started = time.monotonic()
        if not at_end:
            self.announce(name, detail)
        if self.mode != "bars":
            yield _Quiet(total)
            if at_end:
                self.announce(name, f"{detail} ({time.monotonic() - started:.1f}s)")
            return
        from tqdm import tqdm

        bar = tqdm(
            desc=name,
            total=total,
            unit=unit,
            file=self._out(),
            dynamic_ncols=True,
            delay=1.0 if at_end else 0.0,
        )
        if detail:
            bar.set_postfix_str(detail, refresh=not at_end)
        try:
            yield bar
        finally:
            bar.close()
