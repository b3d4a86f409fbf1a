"""The model's architecture is part of a trajectory's identity: probes of a Llama and a
GPT-2 of equal depth (or of one class at other sizes) are never one trajectory."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_batch, tiny_model
from score_fixtures import make_text, make_tokenizer

from redundancy_monitor import AlertConfig, ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.monitoring.guard import TrajectoryGuard, trajectory_identity
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.records import load_run

QUIET = AlertConfig(
    gap_threshold=None, growth_factor=None, overlap_threshold=None, regime_change=False
)


def monitor(path, **kw):
    return RedundancyMonitor(
        tiny_batch(2, 8)[0],
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        jsonl_path=path,
        alerts=QUIET,
        **kw,
    )


def test_records_carry_the_models_class_and_sizes():
    result = probe(tiny_model("gpt2", 4), tiny_batch(2, 8)[0], intervals=False)
    assert result.meta.model_class == "GPT2LMHeadModel"
    assert result.meta.model_sizes["hidden_size"] == 32
    assert result.meta.model_sizes["vocab_size"] == 97
    identity = trajectory_identity(result)
    assert identity["model"]["class"] == "GPT2LMHeadModel"
    again = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.meta.model_sizes == result.meta.model_sizes


@pytest.mark.parametrize(
    "other, named",
    [
        (lambda: tiny_model("gpt2", 4), "GPT2LMHeadModel"),
        (lambda: tiny_model("llama", 4, width=64), "hidden_size 64"),
    ],
    ids=["gpt2-after-llama", "wider-llama"],
)
def test_a_model_of_another_architecture_and_equal_depth_is_not_the_same_trajectory(
    tmp_path, other, named
):
    path = tmp_path / "r.jsonl"
    mon = monitor(path)
    mon.step(0, tiny_model("llama", 4))
    mon.step(1, other())
    mon.step(2, tiny_model("llama", 4))
    mon.close()
    records = read_records(path)
    assert [r["step"] for r in records if r["type"] == "probe"] == [0, 2]
    failure = next(r for r in records if r["type"] == "failure")
    assert (
        failure["step"] == 1 and "another model" in failure["error"] and named in failure["error"]
    )


def test_new_baseline_on_another_architecture_starts_a_new_trajectory(tmp_path):
    path = tmp_path / "r.jsonl"
    mon = monitor(path, on_mismatch="new_baseline")
    mon.step(0, tiny_model("llama", 4))
    mon.step(1, tiny_model("gpt2", 4))
    mon.close()
    marker = next(r for r in read_records(path) if r["type"] == "new_baseline")
    assert marker["step"] == 1 and "GPT2LMHeadModel" in marker["reason"]
    assert marker["previous"]["model"]["class"] == "LlamaForCausalLM"
    assert len(load_run(path).segments()) == 2


def test_a_state_without_the_model_identity_continues_and_learns_it():
    llama = probe(tiny_model("llama", 4), tiny_batch(2, 8)[0], intervals=False)
    old = {k: v for k, v in trajectory_identity(llama).items() if k != "model"}
    guard = TrajectoryGuard(old)  # restored from a version that did not record the model
    assert guard.check(llama) is None and guard.identity["model"]["class"] == "LlamaForCausalLM"
    gpt2 = probe(tiny_model("gpt2", 4), tiny_batch(2, 8)[0], intervals=False)
    assert "another model" in guard.check(gpt2)


def test_readers_split_a_file_written_without_markers_where_the_model_changes(tmp_path):
    path = tmp_path / "r.jsonl"
    mon = monitor(path, on_mismatch="new_baseline")
    mon.step(0, tiny_model("llama", 4))
    mon.step(1, tiny_model("llama", 4))
    mon.step(2, tiny_model("gpt2", 4))
    mon.step(3, tiny_model("gpt2", 4))
    mon.close()
    # As an older version wrote it: the same probes, no new_baseline marker.
    lines = [x for x in path.read_text().splitlines() if '"type":"new_baseline"' not in x]
    older = tmp_path / "older.jsonl"
    older.write_text("\n".join(lines) + "\n")
    run = load_run(older)
    assert [[p.step for p in s] for s in run.segments()] == [[0, 1], [2, 3]]
    assert run.baselines[0].step == 2 and "GPT2LMHeadModel" in run.baselines[0].reason


def test_replay_of_a_folder_mixing_llama_and_gpt2_of_equal_depth_keeps_them_apart(tmp_path, capsys):
    tokenizer = make_tokenizer(make_text(3000, seed=0))
    root = tmp_path / "run"
    for step, arch in ((4, "llama"), (8, "gpt2"), (12, "llama")):
        model = tiny_model(arch, 4, vocab=len(tokenizer))
        model.save_pretrained(root / f"checkpoint-{step}")
        tokenizer.save_pretrained(root / f"checkpoint-{step}")
    (tmp_path / "text.txt").write_text(make_text(600, seed=2))
    out = tmp_path / "out"
    code = main(
        ["replay", str(root), "--text", str(tmp_path / "text.txt"), "--out", str(out),
         "--n-seq", "2", "--seq-len", "16", "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    records = read_records(out / "redundancy.jsonl")
    assert [r["step"] for r in records if r["type"] == "probe"] == [4, 12]
    failure = next(r for r in records if r["type"] == "failure")
    assert failure["step"] == 8 and "GPT2LMHeadModel" in failure["error"]
    assert "LlamaForCausalLM" in failure["error"]
    # The advice is for the command line: another folder, not a Python argument.
    assert "replay --out" in failure["error"] and "on_mismatch" not in failure["error"]
