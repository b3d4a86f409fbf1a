"""Where a probe runs: a background worker thread, or inline in the training thread.

Both executors take a job (a function returning a `ProbeResult`), run it at most one at
a time, catch anything it raises, and hand back a `ProbeOutcome` on `poll()`; the
training thread never waits unless asked to with `drain()`.
"""

from __future__ import annotations

import concurrent.futures
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.result import ProbeResult

EXECUTORS = ("background", "inline")


@dataclass
class ProbeOutcome:
    """What came of one probe: a result, or the error that stopped it."""

    step: int
    result: ProbeResult | None
    error: str | None
    probe_seconds: float
    blocked_seconds: float


def _run(step: int, job: Callable[[], ProbeResult], blocked: float) -> ProbeOutcome:
    started = time.perf_counter()
    try:
        result, error = job(), None
    except Exception as exc:  # a probe must never take training down
        result = None
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    return ProbeOutcome(step, result, error, time.perf_counter() - started, blocked)


class InlineExecutor:
    """Runs each probe synchronously in the caller's thread."""

    def __init__(self) -> None:
        self._done: list[ProbeOutcome] = []

    def busy(self) -> bool:
        return False

    def submit(self, step: int, job: Callable[[], ProbeResult], blocked: float) -> None:
        started = time.perf_counter()
        outcome = _run(step, job, blocked)
        outcome.blocked_seconds = blocked + (time.perf_counter() - started)
        self._done.append(outcome)

    def poll(self) -> list[ProbeOutcome]:
        done, self._done = self._done, []
        return done

    def drain(self) -> list[ProbeOutcome]:
        return self.poll()

    def close(self) -> None:
        self._done.clear()


class BackgroundExecutor:
    """Runs each probe in one worker thread; a new probe is refused while one runs."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future | None = None

    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def submit(self, step: int, job: Callable[[], ProbeResult], blocked: float) -> None:
        if self.busy():
            raise RuntimeError("a probe is already running; check busy() first")
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="redundancy-probe"
            )
        started = time.perf_counter()
        self._future = self._pool.submit(_run, step, job, blocked)
        self._submit_seconds = time.perf_counter() - started

    def _collect(self) -> list[ProbeOutcome]:
        outcome = self._future.result()
        outcome.blocked_seconds += self._submit_seconds
        self._future = None
        return [outcome]

    def poll(self) -> list[ProbeOutcome]:
        if self._future is None or not self._future.done():
            return []
        return self._collect()

    def drain(self) -> list[ProbeOutcome]:
        """Wait for the running probe, if any, and return its outcome."""
        if self._future is None:
            return []
        concurrent.futures.wait([self._future])
        return self._collect()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._future = None


def make_executor(kind: str) -> InlineExecutor | BackgroundExecutor:
    if kind == "background":
        return BackgroundExecutor()
    if kind == "inline":
        return InlineExecutor()
    raise InvalidConfigError(f"executor must be one of {EXECUTORS}, got {kind!r}")
