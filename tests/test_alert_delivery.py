"""Alerts that reach people: `WebhookAlerts` against real HTTP servers on 127.0.0.1
(answering, hanging, refusing, failing with 500), once per activation of a rule, never
on or into the training thread; and ``watch --webhook``."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from checkpoint_runs import N_SEQ, SEQ_LEN
from test_monitor_alerts import ONLY_GAP, gap_result

from redundancy_monitor import read_records
from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.alerts import Alert, AlertConfig
from redundancy_monitor.monitoring.jsonl import JsonlSink
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.recorder import Recorder
from redundancy_monitor.monitoring.webhook import WebhookAlerts

pytest_plugins = ["checkpoint_runs"]  # hf_run: a short HF Trainer run's checkpoints


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours proxy variables; these tests talk to 127.0.0.1 directly."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


class Endpoint:
    """A real HTTP server on 127.0.0.1 (a free port) that records every POST and answers
    as `answer(n)` says for the n-th request (0-based): a status code, or "hang" (hold the
    connection until the test ends)."""

    def __init__(self, answer=lambda n: 200):
        self.requests: list[tuple[str, dict]] = []
        self.arrived: list[float] = []  # time.monotonic() of each request
        self.entered = threading.Event()  # a request arrived
        self.release = threading.Event()  # hanging requests may end
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                n = len(endpoint.requests)
                endpoint.requests.append((self.path, json.loads(body)))
                endpoint.arrived.append(time.monotonic())
                endpoint.entered.set()
                status = answer(n)
                if status == "hang":
                    endpoint.release.wait(30)
                    status = 200
                status, headers = status if isinstance(status, tuple) else (status, {})
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the client gave up (its timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint_factory():
    made: list[Endpoint] = []

    def make(answer=lambda n: 200) -> Endpoint:
        made.append(Endpoint(answer))
        return made[-1]

    yield make
    for e in made:
        e.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alert(step: int = 5, rule: str = "gap_threshold") -> Alert:
    return Alert(step, rule, 0.3, 0.1, f"step {step}: the protocols disagree")


def failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "webhook delivery" in r.getMessage()]


def test_one_post_per_activation_with_the_record_files_alert(endpoint_factory, tmp_path):
    endpoint = endpoint_factory()
    as_json = WebhookAlerts(endpoint.url("/json"), "json", run="run-7")
    as_slack = WebhookAlerts(endpoint.url("/slack"), "slack")
    jsonl = tmp_path / "redundancy.jsonl"
    recorder = Recorder(
        [JsonlSink(jsonl), as_json],
        alerts=AlertConfig(gap_threshold=0.1, hysteresis=2, **ONLY_GAP),
        on_alert=as_slack,
    )
    # active from step 1 to 4, clear at 5-6 (re-armed), active again from step 8
    gaps = [0.2, 0.2, 0.2, 0.3, 0.0, 0.0, 0.2, 0.2, 0.2, 0.3]
    for step, gap in enumerate(gaps):
        recorder.record(ProbeRecord(step, gap_result(gap), None, 0.0, 0.0))
    assert as_json.wait() and as_slack.wait()
    recorder.close()
    written = [r for r in read_records(jsonl) if r["type"] == "alert"]
    assert [r["step"] for r in written] == [1, 7]  # the engine's activations
    posted = [body for path, body in endpoint.requests if path == "/json"]
    assert len(posted) == 2 and as_json.n_sent == 2
    for body, record in zip(posted, written, strict=True):
        assert {k: body[k] for k in ("step", "rule", "value", "threshold", "message")} == {
            k: record[k] for k in ("step", "rule", "value", "threshold", "message")
        }
        assert body["run"] == "run-7" and body["source"].startswith("redundancy-monitor ")
    slack = [body for path, body in endpoint.requests if path == "/slack"]
    assert [set(b) for b in slack] == [{"text"}, {"text"}]
    for body, record in zip(slack, written, strict=True):
        assert record["message"] in body["text"] and record["rule"] in body["text"]


def test_a_monitored_model_posts_once_while_its_rule_stays_active(endpoint_factory, tmp_path):
    from conftest import tiny_batch, tiny_model

    from redundancy_monitor import ProbeSchedule, RedundancyMonitor

    endpoint = endpoint_factory()
    hook = WebhookAlerts(endpoint.url())
    # the condition holds at every probe (any gap exceeds -1): active from the first on
    always = AlertConfig(gap_threshold=-1.0, hysteresis=1, use_intervals=False, **ONLY_GAP)
    monitor = RedundancyMonitor(
        tiny_batch(n_seq=2, seq_len=8)[0],
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False),
        alerts=always,
        sinks=[JsonlSink(tmp_path / "redundancy.jsonl"), hook],
    )
    model = tiny_model("llama", 3)
    for step in range(4):
        monitor.step(step, model)
    monitor.close()  # closes the hook too: it waits (bounded) for the queued post
    assert [h.step for h in monitor.history] == [0, 1, 2, 3]
    written = [r for r in read_records(tmp_path / "redundancy.jsonl") if r["type"] == "alert"]
    assert [(r["rule"], r["step"]) for r in written] == [("gap_threshold", 0)]
    assert [(b["rule"], b["step"]) for _, b in endpoint.requests] == [("gap_threshold", 0)]


def test_the_same_alert_twice_is_posted_once_and_other_rules_can_be_left_out(endpoint_factory):
    endpoint = endpoint_factory()
    hook = WebhookAlerts(endpoint.url(), rules=["gap_threshold"])
    for a in (alert(5), alert(5), alert(6, "regime_change"), alert(9)):
        hook.write_alert(a)
    assert hook.wait()
    assert [(b["rule"], b["step"]) for _, b in endpoint.requests] == [
        ("gap_threshold", 5),
        ("gap_threshold", 9),
    ]


def test_a_hanging_endpoint_times_out_off_the_training_thread(endpoint_factory, caplog):
    endpoint = endpoint_factory(lambda n: "hang")
    hook = WebhookAlerts(endpoint.url(), timeout=0.5, retries=1, backoff=0.05)
    training = threading.current_thread()
    with caplog.at_level(logging.WARNING, logger="redundancy_monitor"):
        hook.write_alert(alert())  # returns before the server has even answered
        assert endpoint.entered.wait(10) and not endpoint.release.is_set()
        assert hook._thread is not None and hook._thread is not training
        assert hook.wait(30)
    assert (hook.n_sent, hook.n_failed) == (0, 1)
    # the first attempt and one retry (the server may read the retry's body after the
    # client gave up on it: wait for it, bounded)
    deadline = time.monotonic() + 10
    while len(endpoint.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(endpoint.requests) == 2
    (line,) = failures(caplog)
    assert "gap_threshold alert (step 5)" in line and "after 2 attempt(s)" in line
    assert "timed out" in line


def test_a_refused_connection_is_retried_then_logged(caplog):
    url = f"http://127.0.0.1:{closed_port()}/secret-token-path"
    hook = WebhookAlerts(url, retries=2, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="redundancy_monitor"):
        hook.write_alert(alert())
        assert hook.wait(30)
    assert (hook.n_sent, hook.n_failed) == (0, 1)
    (line,) = failures(caplog)
    assert "after 3 attempt(s)" in line and "refused" in line.lower()
    assert "secret-token-path" not in caplog.text  # a webhook's path is its secret


def test_http_500_is_retried_with_backoff_then_given_up(endpoint_factory, caplog):
    endpoint = endpoint_factory(lambda n: 500)
    hook = WebhookAlerts(endpoint.url(), retries=2, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="redundancy_monitor"):
        hook.write_alert(alert())
        assert hook.wait(30)
    assert len(endpoint.requests) == 3 and hook.n_failed == 1
    (line,) = failures(caplog)
    assert "HTTP 500" in line and "after 3 attempt(s)" in line
    assert hook.last_error is not None and "500" in hook.last_error


def test_a_server_that_recovers_gets_the_alert_and_4xx_is_not_retried(endpoint_factory):
    flaky = endpoint_factory(lambda n: 503 if n < 2 else 200)
    hook = WebhookAlerts(flaky.url(), retries=3, backoff=0.01)
    hook.write_alert(alert())
    assert hook.wait(30)
    assert (hook.n_sent, hook.n_failed, len(flaky.requests)) == (1, 0, 3)
    gone = endpoint_factory(lambda n: 404)
    hook = WebhookAlerts(gone.url(), retries=3, backoff=0.01)
    hook.write_alert(alert())
    assert hook.wait(30)
    assert (hook.n_failed, len(gone.requests)) == (1, 1)  # a wrong URL stays wrong


def test_a_rate_limited_endpoint_is_retried_after_the_time_it_asks_for(endpoint_factory):
    endpoint = endpoint_factory(lambda n: (429, {"Retry-After": "1"}) if n == 0 else 200)
    hook = WebhookAlerts(endpoint.url(), retries=2, backoff=0.01)
    hook.write_alert(alert())
    assert hook.wait(30)
    assert (hook.n_sent, len(endpoint.requests)) == (1, 2)
    # the retry waited the second the server asked for, not the 0.01 s backoff
    assert endpoint.arrived[1] - endpoint.arrived[0] >= 0.95


def test_a_full_queue_drops_and_counts_and_close_is_bounded(endpoint_factory, caplog):
    endpoint = endpoint_factory(lambda n: "hang")
    hook = WebhookAlerts(endpoint.url(), timeout=5, retries=0, max_queue=1)
    with caplog.at_level(logging.WARNING, logger="redundancy_monitor"):
        hook.write_alert(alert(1))
        assert endpoint.entered.wait(10)  # the worker holds alert 1 in its request
        hook.write_alert(alert(2))  # waits in the queue
        hook.write_alert(alert(3))  # no room: dropped
        hook.close(timeout=0.2)  # the training thread does not wait out the hang
    assert hook.n_dropped == 1
    assert "dropped the gap_threshold alert of step 3" in caplog.text
    assert "still undelivered at close" in caplog.text
    hook.write_alert(alert(4))  # after close: ignored, no error
    assert [b["step"] for _, b in endpoint.requests] == [1]


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("file:///etc/passwd", {}, "http:// or https://"),
        ("ftp://example.org/x", {}, "http:// or https://"),
        ("http:///no-host", {}, "http:// or https://"),
        ("http://127.0.0.1:port/x", {}, "http:// or https://"),
        ("http://127.0.0.1:9/x", {"format": "teams"}, "format"),
        ("http://127.0.0.1:9/x", {"rules": ["gap_treshold"]}, "gap_treshold"),
        ("http://127.0.0.1:9/x", {"timeout": 0}, "timeout"),
    ],
)
def test_bad_settings_are_clear_errors(url, kwargs, message):
    with pytest.raises(InvalidConfigError, match=message):
        WebhookAlerts(url, **kwargs)


def test_watch_posts_its_alerts_to_the_webhook(hf_run, endpoint_factory, tmp_path, capsys):
    from redundancy_monitor.tools.cli import main

    root, text = hf_run
    endpoint = endpoint_factory()
    alerts = {"gap_threshold": -1.0, "hysteresis": 1, **ONLY_GAP, "use_intervals": False}
    args = [
        root,
        "--text",
        text,
        "--n-seq",
        N_SEQ,
        "--seq-len",
        SEQ_LEN,
        "--log-dir",
        tmp_path / "w",
    ]
    args += ["--exit-when-idle", "0.5", "--settle", "0.2", "--alerts", json.dumps(alerts)]
    args += ["--webhook", endpoint.url("/watch"), "--webhook-format", "slack"]
    code = main(["watch", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 0, err
    written = [r for r in read_records(tmp_path / "w" / "redundancy.jsonl") if r["type"] == "alert"]
    assert [r["rule"] for r in written] == ["gap_threshold"]  # active from the first probe on
    (posted,) = [body for _, body in endpoint.requests]
    assert written[0]["message"] in posted["text"]
    assert "webhook: 1 alert(s) delivered, 0 failed, 0 dropped" in err
    code = main(["watch", str(root), "--text", str(text), "--webhook", "ftp://example.org/x"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "http://" in err, err
