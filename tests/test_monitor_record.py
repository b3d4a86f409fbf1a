"""One record per probe: from the executor to the sinks, the record file and its readers."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_batch, tiny_model

from redundancy_monitor import probe
from redundancy_monitor.monitoring.jsonl import JsonlSink, read_records
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.probing.probe import merge_shards
from redundancy_monitor.probing.result import ProbeMeta, Thresholds
from redundancy_monitor.tools.records import load_run

OLD_FILE = Path(__file__).parent / "data" / "records_v0_1_0.jsonl"


def line(record: dict) -> str:
    return json.dumps(record, allow_nan=False, separators=(",", ":"))


def test_a_record_survives_its_json_line():
    protocols = ("replacement", "interchange", "deletion")
    result = probe(tiny_model("gpt_neox", 4), tiny_batch(2, 8)[0], protocols=protocols)
    record = ProbeRecord(7, result, probe_seconds=0.25, blocked_seconds=0.001, wall_time=1.5e9)
    assert ProbeRecord.from_dict(json.loads(line(record.to_dict()))) == record
    failure = ProbeRecord(8, error="RuntimeError: boom")
    assert failure.to_dict() == {"type": "failure", "step": 8, "error": "RuntimeError: boom"}
    assert ProbeRecord.from_dict(failure.to_dict()) == failure


def renamed(line: dict) -> dict:
    """A 0.1.0 line with |i-j| under its later name (``separation``), as writers now say."""
    line = json.loads(json.dumps(line))
    if "result" in line:
        for pair in line["result"]["pairs"]:
            pair["separation"] = pair.pop("distance")
        summary = line["result"]["summary"]
        summary["by_separation"] = summary.pop("by_distance")
    return line


def assert_keeps(new, old, where="line"):
    """`new` holds every value of `old`; keys only `new` has are null (unknown then)."""
    if isinstance(old, dict):
        assert set(old) <= set(new), (where, sorted(set(old) - set(new)))
        for key in new:
            if key in old:
                assert_keeps(new[key], old[key], f"{where}.{key}")
            else:
                assert new[key] is None, (where, key, new[key])
    elif isinstance(old, list):
        assert len(new) == len(old), where
        for k, (n, o) in enumerate(zip(new, old, strict=True)):
            assert_keeps(n, o, f"{where}[{k}]")
    else:
        assert new == old, (where, new, old)


def test_lines_written_by_version_0_1_0_read_and_write_back_the_same(tmp_path):
    lines = [json.loads(x) for x in OLD_FILE.read_text().splitlines()]
    kinds = [x["type"] for x in lines]
    assert kinds.count("probe") == 3 and "failure" in kinds
    sink = JsonlSink(tmp_path / "again.jsonl")
    for raw in read_records(OLD_FILE, resolve_resumes=False):
        if raw["type"] == "probe":
            sink.write_probe(ProbeRecord.from_dict(raw))
        elif raw["type"] == "failure":
            failure = ProbeRecord.from_dict(raw)
            sink.write_failure(failure.step, failure.error)
    sink.close()
    kept = [renamed(x) for x in lines if x["type"] in ("probe", "failure")]
    again = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert len(again) == len(kept) == 4
    for new, old in zip(again, kept, strict=True):
        assert_keeps(new, old)  # every value of 0.1.0 kept; fields added later are null
    run = load_run(OLD_FILE)
    assert run.steps == [0, 1, 3] and [f.step for f in run.failures] == [2]
    assert run.last.result.deletion and run.last.result.meta.protocols == (
        "replacement",
        "interchange",
        "deletion",
    )


def test_probe_meta_is_typed_and_its_json_is_the_dict_it_was():
    ids = tiny_batch(2, 8)[0]
    model = tiny_model("gpt_neox", 4)
    shards = [probe(model, ids, shard=(r, 2)) for r in range(2)]
    assert shards[1].meta.shard == (1, 2)
    merged = merge_shards(shards)
    meta = merged.meta
    assert (meta.shard, meta.world_size, meta.n_layers) == (None, 2, 4)
    assert meta.thresholds == Thresholds() and meta.protocols == ("replacement", "interchange")
    data = meta.to_dict()
    assert "shard" not in data and data["world_size"] == 2
    assert list(data)[:5] == ["version", "model_class", "dtype", "device", "n_layers"]
    assert data["thresholds"] == {
        "strong": 0.05,
        "conditional": 0.10,
        "regime_ir": 0.5,
        "regime_distance": 0.10,
    }
    assert ProbeMeta.from_dict(json.loads(json.dumps(data))) == meta
    assert ProbeMeta.from_dict({"n_layers": 3, "added_later": 1}).to_dict() == {"n_layers": 3}
