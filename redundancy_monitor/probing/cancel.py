"""Cooperative cancellation of a running probe.

A background probe cannot be killed from outside its thread, so it is asked to stop: the
executor gives each worker thread a `CancelToken`, and the probe checks it after every
group of variants (the engine's progress callback). A cancelled probe raises
`ProbeCancelled`, leaves the model as it was (the engine restores it in ``finally``) and
lets its thread end.
"""

from __future__ import annotations

import threading

from redundancy_monitor.errors import ProbeCancelled


class CancelToken:
    """A flag the training thread sets and the probe thread checks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise ProbeCancelled("the probe was cancelled: the monitor is shutting down")


_local = threading.local()


def current_token() -> CancelToken | None:
    """The token of the probe running in this thread (None outside a monitor worker)."""
    return getattr(_local, "token", None)


def set_current_token(token: CancelToken | None) -> None:
    _local.token = token


class CancellableProgress:
    """Progress callback for the engine: advances an optional bar, then checks the token."""

    def __init__(self, bar, token: CancelToken):
        self.bar, self.token = bar, token

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
        self.token.check()

    def reset(self) -> None:
        if self.bar is not None:
            self.bar.reset()
        self.token.check()
