"""`watch` beside a run that saves with ``save_pretrained`` alone (a plain loop,
accelerate): no ``trainer_state.json`` is ever written, so a folder's completeness comes
from its weights (the safetensors header, the sharded index)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from conftest import tiny_batch, tiny_model

from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.tools.replay import ModelLoader
from redundancy_monitor.tools.watch import (
    CheckpointFolder,
    hf_folder_complete,
    safetensors_complete,
    watch,
)

FAST = dict(settle_seconds=0.2, poll_seconds=0.05)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model saved twice with save_pretrained: whole, and sharded (several files)."""
    base = tmp_path_factory.mktemp("save_pretrained")
    model = tiny_model("llama", n_layers=4)
    model.save_pretrained(base / "whole")
    model.save_pretrained(base / "sharded", max_shard_size="20KB")
    return base


def test_a_safetensors_file_is_complete_only_with_all_the_data_its_header_announces(
    saved, tmp_path
):
    data = (saved / "whole" / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert safetensors_complete(path)
    header_len = int.from_bytes(data[:8], "little")
    for cut in (0, 4, 8, 8 + header_len // 2, 8 + header_len, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        assert not safetensors_complete(path), cut
    path.write_bytes(b"\xff" * 8 + data[8:])  # a header length larger than any real one
    assert not safetensors_complete(path)
    assert not safetensors_complete(tmp_path / "absent.safetensors")


def test_a_sharded_save_is_complete_once_every_listed_shard_is(saved, tmp_path):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(saved / "sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert hf_folder_complete(folder)
    last = folder / shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 10])
    assert not hf_folder_complete(folder)  # a shard cut short
    last.unlink()
    assert not hf_folder_complete(folder)  # a shard missing
    last.write_bytes(data)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x"}}')
    assert not hf_folder_complete(folder)  # a shard outside the folder


def test_trainer_state_stays_a_sufficient_marker_and_a_half_written_one_means_wait(saved, tmp_path):
    folder = tmp_path / "checkpoint-5"
    shutil.copytree(saved / "whole", folder)
    assert hf_folder_complete(folder)
    (folder / "trainer_state.json").write_text('{"global_step": 5')
    assert not hf_folder_complete(folder)
    (folder / "trainer_state.json").write_text('{"global_step": 5}')
    assert hf_folder_complete(folder)


def test_watch_of_save_pretrained_folders_without_trainer_state_probes_them(saved, tmp_path):
    ckpts = tmp_path / "ckpts"
    shutil.copytree(saved / "whole", ckpts / "checkpoint-2")
    # checkpoint-4 mid-save: config there, the weights file half written.
    part = ckpts / "checkpoint-4"
    shutil.copytree(saved / "sharded", part)
    index = json.loads((part / "model.safetensors.index.json").read_text())
    shard = part / sorted(set(index["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    folder = CheckpointFolder(ckpts, settle_seconds=0.0)
    assert [(c.ref.step, c.complete) for c in folder.scan()] == [(2, True), (4, False)]

    def finish_the_save():
        time.sleep(1.0)  # several settle periods: settled but incomplete, so waited for
        shard.write_bytes(data)

    writer = threading.Thread(target=finish_the_save)
    writer.start()
    ids = tiny_batch(2, 8)[0]
    done = watch(
        ckpts, ModelLoader(), (ids, None), log_dir=tmp_path / "w", until_step=4,
        exit_when_idle=30, **FAST,
    )  # fmt: skip
    writer.join()
    assert done.probed == [2, 4] and done.failed == [] and done.skipped == []
    records = read_records(tmp_path / "w" / "redundancy.jsonl")
    assert [r["step"] for r in records if r["type"] == "probe"] == [2, 4]
    assert not [r for r in records if r["type"] == "failure"]
