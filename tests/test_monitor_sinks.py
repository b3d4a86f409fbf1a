"""The JSON Lines record file and the TensorBoard heatmaps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from redundancy_monitor.errors import RecordFileError
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.jsonl import JsonlSink, read_records
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.tensorboard import MISSING, VIRIDIS, heatmap_image, pair_matrix
from redundancy_monitor.probing.result import PairRecord, ProbeMeta, ProbeResult, summarize


def small_result(gap=0.1):
    records = [PairRecord.build(0, 1, 0.2 + gap, 0.1, 0.2), PairRecord.build(1, 2, 0.3, 0.3, 0.1)]
    return ProbeResult(records, summarize(records), meta=ProbeMeta(n_layers=3))


def write(sink, step):
    sink.write_probe(ProbeRecord(step, small_result(), probe_seconds=0.5, blocked_seconds=0.01))


def test_each_record_is_on_disk_when_the_call_returns(tmp_path):
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path)
    write(sink, 0)
    sink.write_alert(Alert(0, "gap_threshold", float("nan"), 0.1, "msg"))
    lines = path.read_text().splitlines()  # read while the sink is still open
    assert [json.loads(x)["type"] for x in lines] == ["probe", "alert"]
    assert json.loads(lines[1])["value"] is None  # NaN stored as null
    back = ProbeResult.from_dict(json.loads(lines[0])["result"])
    assert back.summary == small_result().summary
    sink.close()


def test_a_partial_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path)
    write(sink, 0)
    write(sink, 5)
    sink.close()
    with open(path, "a") as f:
        f.write('{"type": "probe", "step": 9, "res')  # a crash mid-write
    with pytest.warns(UserWarning, match="partial last line"):
        records = read_records(path)
    assert [r["step"] for r in records] == [0, 5]


def test_appending_after_a_crash_first_removes_the_partial_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"type": "probe", "step": 0}\n{"type": "pro')
    with pytest.warns(UserWarning, match="partial last line"):
        write(JsonlSink(path), 3)
    assert [r["step"] for r in read_records(path)] == [0, 3]


def test_a_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(RecordFileError, match="line 2"):
        read_records(path)


def test_resume_marker_drops_records_the_checkpoint_does_not_contain(tmp_path):
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path)
    for step in (0, 4, 8, 12):
        write(sink, step)
    sink.write_resume(8)  # restarted from a checkpoint at step 8
    write(sink, 12)
    sink.close()
    assert [r["step"] for r in read_records(path)] == [0, 4, 8, 12]
    raw = read_records(path, resolve_resumes=False)
    assert [(r["type"], r["step"]) for r in raw][-3:] == [
        ("probe", 12),
        ("resume", 8),
        ("probe", 12),
    ]


def test_pair_matrix_is_symmetric_with_unprobed_pairs_missing():
    m = pair_matrix(small_result(), "d_repl")
    assert m[0, 1] == m[1, 0] == pytest.approx(0.3)
    assert np.isnan(m[0, 2]) and m[1, 1] == 0.0


def test_heatmap_pixels_follow_the_values():
    m = np.array([[0.0, 1.0], [np.nan, 0.5]])
    img = heatmap_image(m, cell=3)
    assert img.shape == (6, 6, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == VIRIDIS[0].tolist()  # 0 -> the low end
    assert img[0, 3].tolist() == VIRIDIS[-1].tolist()  # max -> the high end
    assert img[3, 0].tolist() == MISSING.tolist()  # NaN -> grey


def test_diverging_heatmap_shows_the_sign_of_the_gap():
    img = heatmap_image(np.array([[-1.0, 1.0]]), diverging=True, cell=1)
    blue, red = img[0, 0], img[0, 1]
    assert blue[2] > blue[0] and red[0] > red[2]
