"""Alerts that reach people: `WebhookAlerts` posts each alert to a webhook (a Slack
incoming webhook, or any HTTP endpoint that takes JSON).

Delivery never runs on the training thread: `write_alert` only puts the alert in a
bounded queue, and a daemon thread posts it with a timeout, retrying a few times with
exponential backoff when the endpoint cannot be reached, times out, or answers 5xx/429.
Nothing raises into training; a delivery that fails for good is logged (one warning line
naming the rule, the step, the host and the reason) and counted.

The alert engine already emits an alert once per activation of a rule (a rule that stays
active is silent until it re-arms: monitoring/alerts.py), so one activation is one post;
an alert seen twice (the same rule at the same step: a sink registered twice, a resumed
run) is posted once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Mapping
from typing import Any

from redundancy_monitor._version import __version__
from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.alerts import RULES, Alert
from redundancy_monitor.monitoring.sinks import Sink

log = logging.getLogger("redundancy_monitor")

FORMATS = ("slack", "json")
#: HTTP answers worth another try: the endpoint is overloaded or briefly broken.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_STOP = object()  # tells the worker to finish


def redact(url: str) -> str:
    """The part of a webhook URL that is safe to log: scheme, host and port. A Slack
    webhook's path is its secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = parts.port
    except ValueError:  # not a number: left out
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def alert_payload(alert: Alert, format: str, run: str | None = None) -> dict[str, Any]:
    """The JSON body posted for one alert.

    ``"slack"``: ``{"text": ...}``, what a Slack incoming webhook (and Mattermost,
    Discord's ``/slack`` endpoint, ...) shows as a message. ``"json"``: the alert's own
    fields (``step``, ``rule``, ``value``, ``threshold``, ``message``, as in the record
    file) with ``text``, ``run`` and ``source`` added.
    """
    where = f" in {run}" if run else ""
    text = f"redundancy monitor alert ({alert.rule}){where}: {alert.message}"  # names the step
    if format == "slack":
        return {"text": text}
    return {
        **alert.to_dict(),
        "text": text,
        "run": run,
        "source": f"redundancy-monitor {__version__}",
    }


class WebhookAlerts(Sink):
    """Post each alert to `url`, off the training thread, with a timeout and retries.

    Use it as a sink (``RedundancyMonitor(..., sinks=[WebhookAlerts(url)])``), as an
    `on_alert` callable (``on_alert=WebhookAlerts(url)``), or from the command line with
    ``redundancy-monitor watch --webhook URL``.

    Args:
        url: an ``http://`` or ``https://`` address (a Slack incoming webhook, a pager's
            or chat tool's webhook, your own endpoint).
        format: ``"slack"`` (``{"text": ...}``) or ``"json"`` (the alert's fields).
        rules: send only these rules (default: every rule).
        run: a name for the run, put in the message (e.g. the run's log folder).
        timeout: seconds one attempt may take (connect + answer).
        retries: further attempts after the first fails (unreachable, timeout, 5xx, 429).
        backoff: seconds before the first retry, doubled each time (capped at 60 s).
        max_queue: alerts waiting at most; more are dropped (counted, logged).
        headers: extra HTTP headers (e.g. an ``Authorization`` token).
        close_timeout: seconds `close` (the end of training) waits for queued alerts.

    Attributes:
        n_sent, n_failed, n_dropped: alerts delivered, given up on, and dropped because
            the queue was full.
        last_error: the reason of the last failed delivery (None when none failed).

    Raises:
        InvalidConfigError: a URL that is not http(s), an unknown format or rule, or a
            non-positive timeout.
    """

    def __init__(
        self,
        url: str,
        format: str = "json",
        *,
        rules: Collection[str] | None = None,
        run: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_queue: int = 100,
        headers: Mapping[str, str] | None = None,
        close_timeout: float = 10.0,
    ):
        parts = urllib.parse.urlsplit(str(url))
        try:
            parts.port  # noqa: B018 -- raises on a port that is not a number
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidConfigError(
                f"webhook URL must be an http:// or https:// address, got {redact(str(url))!r}"
            )
        if format not in FORMATS:
            raise InvalidConfigError(f"webhook format must be one of {FORMATS}, got {format!r}")
        unknown = sorted(set(rules or ()) - set(RULES))
        if unknown:
            raise InvalidConfigError(f"unknown alert rule(s) {unknown}; known: {list(RULES)}")
        if not timeout > 0 or retries < 0 or backoff < 0 or max_queue < 1:
            raise InvalidConfigError(
                "webhook timeout must be > 0, retries and backoff >= 0, max_queue >= 1"
            )
        self.url, self.format, self.run = str(url), format, run
        self.rules = None if rules is None else frozenset(rules)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.close_timeout = float(close_timeout)
        self.headers = {"Content-Type": "application/json", **dict(headers or {})}
        self.headers.setdefault("User-Agent", f"redundancy-monitor/{__version__}")
        self.n_sent = self.n_failed = self.n_dropped = 0
        self.last_error: str | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()  # the counters, from both threads
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()  # close(): no more waiting between retries
        self._sleep: Callable[[float], bool] = self._closed.wait

    # ----- the training thread: never blocks, never raises -----------------------------

    def __call__(self, alert: Alert) -> None:
        """As an `on_alert` callback."""
        self.write_alert(alert)

    def write_alert(self, alert: Alert) -> None:
        try:
            self._enqueue(alert)
        except Exception:  # a delivery problem must never reach training
            log.exception("redundancy monitor: could not queue the alert for %s", redact(self.url))

    def _enqueue(self, alert: Alert) -> None:
        if self.rules is not None and alert.rule not in self.rules:
            return
        key = (alert.rule, alert.step)
        if key in self._seen or self._closed.is_set():
            return
        self._seen.add(key)
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            with self._lock:
                self.n_dropped += 1
            log.warning(
                "redundancy monitor: webhook %s is behind (%d alerts queued); dropped the "
                "%s alert of step %d",
                redact(self.url),
                self._queue.qsize(),
                alert.rule,
                alert.step,
            )
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="redundancy-webhook", daemon=True
            )
            self._thread.start()

    def flush(self) -> None:
        """Nothing to do on the training thread: delivery runs on its own."""

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued, waiting at most `timeout` seconds (default
        `close_timeout`); what is still undelivered then is abandoned (the worker is a
        daemon thread) and logged."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._closed.set()
            return
        with contextlib.suppress(queue.Full):  # a full queue: the join below still bounds
            self._queue.put(_STOP, timeout=1.0)
        thread.join(self.close_timeout if timeout is None else timeout)
        self._closed.set()  # no further backoff waits
        if thread.is_alive():
            log.warning(
                "redundancy monitor: webhook %s: %d alert(s) still undelivered at close",
                redact(self.url),
                self._queue.qsize(),
            )

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until every queued alert was delivered or given up on (tests, scripts);
        True if the queue emptied within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    # ----- the delivery thread -------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._deliver(item)
            except Exception:  # never let the worker die on one alert
                log.exception("redundancy monitor: webhook delivery crashed")
            finally:
                self._queue.task_done()

    def _deliver(self, alert: Alert) -> None:
        body = json.dumps(alert_payload(alert, self.format, self.run)).encode("utf-8")
        reason, tried, asked = "not tried", 0, 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                # doubling backoff, or longer when the server said how long (Retry-After)
                delay = min(60.0, max(self.backoff * 2 ** (attempt - 1), asked))
                if self._sleep(delay):  # closing: give up now rather than later
                    reason += "; gave up at close"
                    break
            retry, failure, asked = self._post(body)
            tried += 1
            if failure is None:
                with self._lock:
                    self.n_sent += 1
                return
            reason = failure
            if not retry:
                break
        with self._lock:
            self.n_failed += 1
            self.last_error = reason
        log.warning(
            "redundancy monitor: webhook delivery of the %s alert (step %d) to %s failed "
            "after %d attempt(s): %s",
            alert.rule,
            alert.step,
            redact(self.url),
            tried,
            reason,
        )

    def _post(self, body: bytes) -> tuple[bool, str | None, float]:
        """One attempt: (worth retrying, the reason it failed or None, the seconds the
        server asked to wait before the next try, 0 when it did not say)."""
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read(65536)
            return False, None, 0.0
        except urllib.error.HTTPError as exc:
            after = (exc.headers.get("Retry-After") or "").strip() if exc.headers else ""
            wait = float(after) if after.isdigit() else 0.0  # an HTTP date is not followed
            return exc.code in _RETRY_STATUS, f"HTTP {exc.code} {exc.reason}", wait
        except urllib.error.URLError as exc:  # refused, unknown host, TLS, timeout
            return True, f"{type(exc.reason).__name__}: {exc.reason}", 0.0
        except (TimeoutError, OSError) as exc:  # a timeout while reading the answer
            return True, f"{type(exc).__name__}: {exc or 'timed out'}", 0.0
