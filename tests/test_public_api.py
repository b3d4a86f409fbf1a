"""The top-level package exports what the docs use: every error class a public call
raises, the configuration and record types, the sinks, and one record file name."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import redundancy_monitor as rm
from redundancy_monitor import errors

ROOT = Path(__file__).resolve().parent.parent


def test_every_error_class_is_exported_from_the_package():
    classes = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.RedundancyMonitorError)
    }
    assert len(classes) > 10  # the scan sees the hierarchy
    missing = sorted(classes - set(rm.__all__))
    assert not missing, f"add to redundancy_monitor/__init__.py (import and __all__): {missing}"
    for name in classes:
        assert getattr(rm, name) is getattr(errors, name)


def test_every_public_name_resolves_to_the_defining_modules_object():
    from redundancy_monitor.monitoring.jsonl import JsonlSink
    from redundancy_monitor.monitoring.record import ProbeRecord
    from redundancy_monitor.monitoring.sinks import MetricsSink, Sink
    from redundancy_monitor.monitoring.tensorboard import TensorBoardSink
    from redundancy_monitor.probing.intervals import IntervalConfig

    for name in rm.__all__:
        assert getattr(rm, name) is not None, name
    assert rm.IntervalConfig is IntervalConfig
    assert rm.ProbeRecord is ProbeRecord
    assert (rm.Sink, rm.MetricsSink, rm.JsonlSink) == (Sink, MetricsSink, JsonlSink)
    assert rm.TensorBoardSink is TensorBoardSink
    assert issubclass(rm.TensorBoardSink, rm.Sink)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        _ = rm.NoSuchName


def test_a_result_that_does_not_know_its_depth_raises_a_library_error():
    from conftest import tiny_batch, tiny_model

    result = rm.probe(tiny_model(n_layers=3), tiny_batch()[0], intervals=False)
    assert result.n_layers == 3
    blind = dataclasses.replace(result, meta=rm.ProbeMeta())
    with pytest.raises(rm.NotInResultError, match="n_layers") as caught:
        _ = blind.n_layers
    assert isinstance(caught.value, KeyError)  # what callers caught before


def test_the_record_file_name_is_written_once():
    assert rm.RECORD_FILE == "redundancy.jsonl"
    literal = re.compile(r"""["']redundancy\.jsonl["']""")
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "redundancy_monitor").rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if literal.search(line)
    ]
    assert found == ["redundancy_monitor/files.py:" + str(_line_of_constant())], found


def _line_of_constant() -> int:
    lines = (ROOT / "redundancy_monitor" / "files.py").read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.startswith("RECORD_FILE ="))
