"""Where a probe runs: a background worker thread, or inline in the training thread.

Both executors take a job (a function returning a `ProbeResult`), run it at most one at
a time, catch anything it raises, and hand back a `ProbeRecord` on `poll()`; the
training thread never waits unless asked to with `drain()`.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable

import torch

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.probing.cancel import CancelToken, set_current_token
from redundancy_monitor.probing.result import ProbeResult

EXECUTORS = ("background", "inline")
log = logging.getLogger("redundancy_monitor")


def _run(step: int, job: Callable[[], ProbeResult], blocked: float) -> ProbeRecord:
    started = time.perf_counter()
    try:
        result, error = job(), None
    except Exception as exc:  # a probe must never take training down
        result = None
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    return ProbeRecord(step, result, error, time.perf_counter() - started, blocked)


class InlineExecutor:
    """Runs each probe synchronously in the caller's thread."""

    def __init__(self) -> None:
        self._done: list[ProbeRecord] = []

    def busy(self) -> bool:
        return False

    @property
    def running_step(self) -> int | None:
        return None

    def submit(
        self,
        step: int,
        job: Callable[[], ProbeResult],
        blocked: float,
        device: torch.device | None = None,
    ) -> None:
        started = time.perf_counter()
        record = _run(step, job, blocked)
        waited = blocked + (time.perf_counter() - started)
        self._done.append(dataclasses.replace(record, blocked_seconds=waited))

    def poll(self) -> list[ProbeRecord]:
        done, self._done = self._done, []
        return done

    def drain(self, timeout: float | None = None) -> list[ProbeRecord]:
        return self.poll()

    def close(self, timeout: float | None = None) -> list[ProbeRecord]:
        return self.poll()


class BackgroundExecutor:
    """Runs each probe in a daemon worker thread; a new probe is refused while one runs.

    A daemon thread (not a thread pool, whose workers the interpreter joins at exit) so
    that a probe still running when the process ends can never keep it alive.
    `close(timeout)` waits a bounded time, then cancels, then abandons.
    """

    #: seconds `close` waits after cancelling before it abandons the worker.
    CANCEL_GRACE = 1.0
    #: seconds the interpreter's exit waits for a cancelled worker (a probe checks for
    #: cancellation after each group of variants, seconds apart on a big model).
    EXIT_WAIT = 10.0

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._thread: threading.Thread | None = None
        self._token: CancelToken | None = None
        self._step: int | None = None
        self._submit_seconds = 0.0
        self.n_cancelled = self.n_abandoned = 0

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def running_step(self) -> int | None:
        """The step of the probe submitted and not collected yet (running or just done)."""
        return None if self._thread is None else self._step

    def submit(
        self,
        step: int,
        job: Callable[[], ProbeResult],
        blocked: float,
        device: torch.device | None = None,
    ) -> None:
        """Start `job` in a new worker thread.

        `device` is the training device: on CUDA the worker makes it its current device
        before the job runs, so that entering the probe's stream does not create a CUDA
        context on device 0 (a new thread starts on device 0 whatever training uses).
        """
        if self.busy():
            raise RuntimeError("a probe is already running; check busy() first")
        started = time.perf_counter()
        token = CancelToken()
        box: list[ProbeRecord] = []

        # CPU kernels of the probe use their own, smaller share of the cores (the setting
        # is per thread), so the probe does not oversubscribe the cores training uses.
        threads = self.threads or max(1, torch.get_num_threads() // 2)

        def on_device() -> ProbeResult:
            if device is not None and device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device.index)
            return job()

        def work() -> None:
            torch.set_num_threads(threads)
            set_current_token(token)
            try:
                box.append(_run(step, on_device, blocked))
            finally:
                set_current_token(None)

        thread = threading.Thread(target=work, name=f"redundancy-probe-{step}", daemon=True)
        thread.start()  # may raise (no thread can be started): then nothing is left half-set
        self._thread, self._token, self._box, self._step = thread, token, box, step
        _WORKERS.add(self)
        self._submit_seconds = time.perf_counter() - started

    def _collect(self) -> list[ProbeRecord]:
        if self._box:
            record = self._box[0]
        else:
            step = -1 if self._step is None else self._step
            record = ProbeRecord(step, None, "the probe thread died", 0.0, 0.0)
        self._thread = self._token = None
        waited = (record.blocked_seconds or 0.0) + self._submit_seconds
        return [dataclasses.replace(record, blocked_seconds=waited)]

    def poll(self) -> list[ProbeRecord]:
        if self._thread is None or self._thread.is_alive():
            return []
        return self._collect()

    def drain(self, timeout: float | None = None) -> list[ProbeRecord]:
        """Wait (at most `timeout` seconds; None: until done) for the running probe."""
        if self._thread is None:
            return []
        self._thread.join(timeout)
        return self.poll()

    def close(self, timeout: float | None = None) -> list[ProbeRecord]:
        """Stop the worker within about ``timeout + CANCEL_GRACE`` seconds.

        Waits up to `timeout` for the running probe to finish (its outcome is returned),
        then cancels it and waits `CANCEL_GRACE` more; a probe that still runs (stuck in
        one long kernel) is abandoned: its daemon thread ends with the process and its
        result is dropped.
        """
        done = self.drain(timeout)
        if self._thread is None or self._token is None:
            return done
        if self._token is not None:  # set with the thread
            self._token.cancel()
        self._thread.join(self.CANCEL_GRACE)
        if self._thread.is_alive():
            self.n_abandoned += 1
            log.warning(
                "redundancy monitor: abandoned a probe that did not stop within %.1f s of "
                "being cancelled; its result is dropped",
                self.CANCEL_GRACE,
            )
        else:
            self.n_cancelled += 1
            log.info("redundancy monitor: cancelled the running probe at shutdown")
        self._thread = self._token = None
        return []

    def stop_at_exit(self) -> None:
        """Cancel a probe still running when the interpreter exits and wait for its thread
        to end (up to `EXIT_WAIT` seconds); its result is dropped."""
        thread, token = self._thread, self._token
        if thread is None or token is None or not thread.is_alive():
            return
        log.warning(
            "redundancy monitor: the process is exiting while the probe of step %s runs "
            "(nothing closed the monitor); cancelling it first (up to %.0f s)",
            self._step,
            self.EXIT_WAIT,
        )
        token.cancel()
        thread.join(self.EXIT_WAIT)


#: Executors that started a worker; weak, so a monitor that is gone is not kept alive.
_WORKERS: weakref.WeakSet[BackgroundExecutor] = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    # A worker still inside torch when the interpreter tears down (training raised and
    # nothing closed the monitor: the HF Trainer has no exception event) aborts the
    # process ("terminate called without an active exception", exit 134) instead of the
    # exit status the training's own error gives. atexit runs before that teardown.
    for executor in list(_WORKERS):
        executor.stop_at_exit()


def make_executor(kind: str, threads: int | None = None) -> InlineExecutor | BackgroundExecutor:
    if kind == "background":
        return BackgroundExecutor(threads)
    if kind == "inline":
        return InlineExecutor()
    raise InvalidConfigError(f"executor must be one of {EXECUTORS}, got {kind!r}")
