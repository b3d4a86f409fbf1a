"""The record file across restarts and against hostile content: a restart from scratch
supersedes the attempt it redoes, a complete last record is never cut, a symbolic link
is never written through, and lines that are not records give a line number, never a
traceback. New-baseline segments are drawn apart in the report."""

from __future__ import annotations

import json
import os
import random
import warnings

import pytest
from conftest import tiny_batch, tiny_model
from run_folders import hand_result, write_records

from redundancy_monitor import AlertConfig, ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.errors import RedundancyMonitorError
from redundancy_monitor.monitoring.jsonl import JsonlSink
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.records import load_run
from redundancy_monitor.tools.report import summary_sentences

QUIET = AlertConfig(
    gap_threshold=None, growth_factor=None, overlap_threshold=None, regime_change=False
)
ALWAYS_ALERT = AlertConfig(
    gap_threshold=-10.0,
    hysteresis=1,
    growth_factor=None,
    overlap_threshold=None,
    regime_change=False,
)


def monitor(path, **kw):
    return RedundancyMonitor(
        tiny_batch(2, 8)[0],
        executor="inline",
        schedule=ProbeSchedule(2, log_spaced=False, at_train_end=False),
        jsonl_path=path,
        **kw,
    )


def test_a_run_restarted_from_scratch_reads_back_as_its_last_attempt(tmp_path):
    path = tmp_path / "redundancy.jsonl"
    model = tiny_model("gpt_neox", 4)
    killed = monitor(path, alerts=ALWAYS_ALERT)  # dies before its first checkpoint:
    for step in range(3):  # every line is fsynced, so what it wrote stays, unclosed
        killed.step(step, model)
    again = monitor(path, alerts=ALWAYS_ALERT)
    for step in range(5):
        again.step(step, model)
    again.close()
    assert [r["step"] for r in read_records(path) if r["type"] == "probe"] == [0, 2, 4]
    run = load_run(tmp_path)
    assert run.steps == [0, 2, 4]
    assert [(a.step, a.rule) for a in run.alerts] == [(0, "gap_threshold")]  # not twice
    assert "1 alert(s)" in summary_sentences(run)[0]
    raw = [(r["type"], r["step"]) for r in read_records(path, resolve_resumes=False)]
    assert [r for r in raw if r[0] == "start"] == [("start", 0), ("start", 0)]


def test_a_resumed_monitor_supersedes_what_the_dead_attempt_wrote_after_its_state(tmp_path):
    path = tmp_path / "r.jsonl"
    model = tiny_model("gpt_neox", 4)
    first = monitor(path)
    for step in range(3):
        first.step(step, model)
    state = json.loads(json.dumps(first.state_dict()))  # the checkpoint at step 2
    first.step(4, model)  # then it dies
    resumed = monitor(path)
    resumed.load_state_dict(state)
    resumed.start()
    resumed.step(4, model)
    resumed.close()
    assert [r["step"] for r in read_records(path) if r["type"] == "probe"] == [0, 2, 4]
    starts = [r for r in read_records(path, resolve_resumes=False) if r["type"] == "start"]
    assert [(m["step"], m["resumed"]) for m in starts] == [(0, False), (3, True)]


def test_a_complete_last_record_missing_its_newline_is_kept_by_the_next_writer(tmp_path):
    path = write_records(tmp_path, probes=[(0, hand_result([0.2, 0.3], [0.1, 0.1]))])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # e.g. a copy that lost it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the reader nor the writer warns
        assert [r["step"] for r in read_records(path)] == [0]
        sink = JsonlSink(path)
        sink.write_failure(1, "next")
        sink.close()
        assert [(r["type"], r["step"]) for r in read_records(path)] == [
            ("probe", 0),
            ("failure", 1),
        ]


def test_a_symlinked_record_file_is_refused_and_its_target_never_touched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"precious data without a final newline")
    link = tmp_path / "redundancy.jsonl"
    link.symlink_to(target)
    with pytest.raises(RedundancyMonitorError, match="symbolic link"):
        JsonlSink(link)
    with pytest.raises(RedundancyMonitorError, match="symbolic link"):
        monitor(link)
    # A link that appears after the sink was built is not followed either.
    real = tmp_path / "run" / "redundancy.jsonl"
    sink = JsonlSink(real)
    real.parent.mkdir()
    real.symlink_to(target)
    with pytest.raises((RedundancyMonitorError, OSError)):
        sink.write_failure(0, "x")
    assert target.read_bytes() == b"precious data without a final newline"
    assert sink.n_pending == 1  # kept for when the path is usable again


def test_a_symlinked_record_file_never_stops_training(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    path = tmp_path / "redundancy.jsonl"
    mon = monitor(path, alerts=QUIET)
    path.symlink_to(target)  # created behind the monitor's back
    model = tiny_model("gpt_neox", 4)
    for step in range(3):
        mon.step(step, model)
    mon.close()
    assert [h.step for h in mon.history] == [0, 2] and mon.n_sink_errors >= 1
    assert [a.rule for a in mon.alerts] == ["sink_failure"]
    assert target.read_text() == "keep"


def report(capsys, run_dir) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["report", str(run_dir)])
    return code, capsys.readouterr().err.strip()


def two_probes(run_dir):
    result = hand_result([0.2, 0.3, 0.25], [0.1, 0.15, 0.1])
    return write_records(run_dir, probes=[(0, result), (8, result)])


def test_a_random_binary_tail_is_skipped_with_a_warning_naming_its_lines(tmp_path, capsys):
    path = two_probes(tmp_path)
    tail = random.Random(3).randbytes(4000)
    with open(path, "ab") as f:
        f.write(tail.replace(b"\n", b"") + b"\n" + tail)  # several lines of junk
    n_good = 2
    with pytest.warns(
        UserWarning, match=rf"damaged line\(s\) after the last record \(lines {n_good + 1}-"
    ):
        assert load_run(tmp_path).steps == [0, 8]
    code, err = report(capsys, tmp_path)
    assert code == 0 and "Traceback" not in err


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"\xff\xfe\x00garbage", "line 2 is not UTF-8 text"),
        (b"[1, 2, 3]", "line 2 holds a JSON list, not a record object"),
        (b'"just a string"', "line 2 holds a JSON str"),
        (b'{"type": "probe", "step": "eight"}', "line 2 has a step that is not an integer"),
        (b'{"type": "probe", "step": 4, "result": {"pairs": []}}', "line 2 is a 'probe' record"),
        (b'{"type": "probe", "step": 4}', "line 2 is a 'probe' record"),
        (b'{"type": "alert", "step": 4, "nonsense": 1}', "line 2 is a 'alert' record"),
        (b'{"type": "failure"}', "line 2 is a 'failure' record"),
        (b"[" * 100_000, "line 2 is not valid JSON"),
    ],
    ids=[
        "binary",
        "list",
        "string",
        "step-not-int",
        "probe-without-summary",
        "probe-without-result",
        "alert-with-unknown-field",
        "failure-without-step",
        "nested-too-deep",
    ],
)
def test_a_line_that_is_not_a_record_exits_2_naming_the_line(tmp_path, capsys, line, says):
    path = two_probes(tmp_path)
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first + line + b"\n" + second)
    code, err = report(capsys, tmp_path)
    assert code == 2, err
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_a_record_that_is_not_an_object_as_the_last_line_is_skipped(tmp_path, capsys):
    path = two_probes(tmp_path)
    with open(path, "ab") as f:
        f.write(b"[1, 2]\n")
    with pytest.warns(UserWarning, match="partial last line"):
        assert load_run(tmp_path).steps == [0, 8]


def test_report_draws_new_baseline_segments_apart(tmp_path):
    path = tmp_path / "redundancy.jsonl"
    mon = monitor(path, on_mismatch="new_baseline")
    four, six = tiny_model("gpt_neox", 4), tiny_model("gpt_neox", 6, seed=1)
    for step, model in ((0, four), (2, four), (4, six), (6, six)):
        mon.step(step, model)
    mon.close()
    run = load_run(tmp_path)
    assert [[p.step for p in s] for s in run.segments()] == [[0, 2], [4, 6]]
    assert [b.step for b in run.baselines] == [4] and "6-block model" in run.baselines[0].reason
    assert run.first.step == 4 and run.first.result.n_layers == 6
    sentences = summary_sentences(run)
    assert sentences[0].startswith("2 probe(s) of a 6-layer model from step 4 to step 6")
    assert "2 separate trajectories" in sentences[1]
    assert any(s.startswith("Since step 4:") for s in sentences)

    from matplotlib.figure import Figure

    from redundancy_monitor.tools.figures import _plot_by_segment

    ax = Figure().subplots()
    _plot_by_segment(ax, run, "gap_mean", "mean", {})
    lines = [list(line.get_xdata()) for line in ax.lines]
    assert lines == [[0, 2], [4, 6]]  # no line joins the 4-block and 6-block probes
    assert ax.lines[0].get_color() == ax.lines[1].get_color()
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<th>trajectory</th>" in page


def test_sink_refusal_of_a_link_names_the_fix(tmp_path):
    link = tmp_path / "r.jsonl"
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(RedundancyMonitorError) as info:
        JsonlSink(link)
    assert "jsonl_path" in str(info.value) and not (tmp_path / "elsewhere.jsonl").exists()
    assert os.path.islink(link)
