"""A process killed (SIGKILL) while it writes a record: the file still parses, the
partial line is skipped with a warning, and the next writer appends cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
from fault_fixtures import ROOT

from redundancy_monitor.monitoring.jsonl import JsonlSink, read_records

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

DIES_MID_LINE = """
import os, signal, sys
import redundancy_monitor.monitoring.jsonl as jsonl
sink = jsonl.JsonlSink(sys.argv[1])
for step in range(3):
    sink.write_failure(step, "complete")
real = os.write
def dying(fd, data):
    real(fd, bytes(data[: len(data) // 2]))
    os.kill(os.getpid(), signal.SIGKILL)
jsonl.os.write = dying
sink.write_failure(3, "x" * 2_000_000)
"""

WRITES_FOREVER = """
import sys
from redundancy_monitor.monitoring.jsonl import JsonlSink
sink = JsonlSink(sys.argv[1])
step = 0
while True:
    sink.write_failure(step, "y" * 300_000)
    if step == 2:
        print("ready", flush=True)
    step += 1
"""


def child(code: str, path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE, text=True
    )


def test_killed_in_the_middle_of_a_line_leaves_a_file_that_parses(tmp_path):
    path = tmp_path / "r.jsonl"
    proc = child(DIES_MID_LINE, path)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not path.read_bytes().endswith(b"\n")  # the kill really cut a line
    with pytest.warns(UserWarning, match="partial last line"):
        records = read_records(path)
    assert [(r["step"], r["error"]) for r in records] == [(s, "complete") for s in range(3)]
    with pytest.warns(UserWarning, match="removed a partial last line"):
        JsonlSink(path).write_failure(4, "after restart")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no partial line any more
        assert [r["step"] for r in read_records(path)] == [0, 1, 2, 4]


def test_killed_at_an_arbitrary_moment_of_large_writes_loses_at_most_one_line(tmp_path):
    path = tmp_path / "r.jsonl"
    proc = child(WRITES_FOREVER, path)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        records = read_records(path)
    steps = [r["step"] for r in records]
    assert steps == list(range(len(steps))) and len(steps) >= 3
    assert all(len(r["error"]) == 300_000 for r in records)
    sink = JsonlSink(path)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        sink.write_failure(len(steps), "next run")
    sink.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_records(path)] == list(range(len(steps) + 1))
