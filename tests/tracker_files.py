"""Reading back what the trackers stored, from their own files: an offline W&B run file
(``run-<id>.wandb``) and an MLflow file store; and the environment that keeps both
local (nothing is sent over the network)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

#: The W&B run file is a LevelDB-style log: a 7-byte header (":W&B", a 2-byte magic, a
#: version byte), then 32 KiB blocks of chunks, each with a 7-byte header (CRC, length,
#: type: full, first, middle, last) and a piece of one serialized `Record` protobuf.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_trackers(monkeypatch, tmp_path: Path) -> None:
    """W&B offline in `tmp_path` (no telemetry, no console capture), MLflow tracking to a
    local file store there."""
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_PROJECT": "redundancy-test",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_META": "true",
        "WANDB_LOG_MODEL": "false",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_EXPERIMENT_NAME": "redundancy",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "HF_MLFLOW_LOG_ARTIFACTS": "false",
        "DISABLE_MLFLOW_INTEGRATION": "false",
    }.items():
        monkeypatch.setenv(name, value)


def wandb_run_file(wandb_dir: Path) -> Path:
    (path,) = sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
    return path


def wandb_records(path: Path) -> list:
    """Every `Record` of an offline W&B run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pieces, raw = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            raw.append(chunk)
        elif kind == _FIRST:
            pieces = chunk
        elif kind == _MIDDLE:
            pieces += chunk
        elif kind == _LAST:
            raw.append(pieces + chunk)
    out = []
    for blob in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        out.append(record)
    return out


def wandb_history(records) -> list[dict]:
    """The logged rows (``run.log``), each as ``{key: value}``."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in r.history.item
                }
            )
    return rows


def wandb_alerts(records) -> list[tuple[str, str, str]]:
    """``(title, text, level)`` of every ``run.alert``."""
    return [
        (r.alert.title, r.alert.text, r.alert.level)
        for r in records
        if r.WhichOneof("record_type") == "alert"
    ]


def wandb_summary(records) -> dict:
    """The last value of each summary key."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def mlflow_alerts(client, run_id: str, tmp_path: Path) -> list[dict]:
    """The ``redundancy_alerts.jsonl`` artifact of an MLflow run, parsed."""
    from redundancy_monitor.monitoring.trackers import MLFLOW_ARTIFACT

    local = client.download_artifacts(run_id, MLFLOW_ARTIFACT, str(tmp_path))
    return [json.loads(line) for line in Path(local).read_text().splitlines()]


@pytest.fixture
def trackers_offline(monkeypatch, tmp_path):
    """`offline_trackers` for one test; afterwards no run is left open and MLflow's global
    tracking URI (which Lightning's MLFlowLogger sets) is unset, so a later test's
    store is not this one."""
    mlflow = pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    offline_trackers(monkeypatch, tmp_path)
    yield tmp_path
    wandb.finish()
    mlflow.end_run()
    mlflow.set_tracking_uri(None)
