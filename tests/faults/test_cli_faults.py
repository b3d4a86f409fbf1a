"""The command-line tools on bad input: `replay`, `watch` and `score` exit 2 with one line
saying what to pass (never a traceback, never exit 0 when nothing was done), before any
work where the problem can be seen up front."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from score_fixtures import make_text, make_tokenizer, save_checkpoint

from redundancy_monitor.errors import CheckpointError, InvalidConfigError
from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.monitoring.probe_config import ProbeConfig
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.loading import read_text
from redundancy_monitor.tools.replay import (
    ModelLoader,
    ReplayRun,
    find_checkpoints,
    replay,
)
from redundancy_monitor.tools.watch import default_log_dir, watch

ROOT = Path(__file__).parents[2]
SEQ = ["--n-seq", "2", "--seq-len", "16", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An HF checkpoint folder (tiny Llama, 64 positions, with its tokenizer) at step 4,
    probe text, text that is not UTF-8, and binary junk."""
    base = tmp_path_factory.mktemp("cli_faults")
    save_checkpoint(base / "run" / "checkpoint-4", n_layers=4)
    (base / "text.txt").write_text(make_text(600, seed=3), encoding="utf-8")
    (base / "latin1.txt").write_bytes(
        make_text(600, seed=3).replace("the", "th\xe9").encode("latin-1")
    )
    (base / "junk.bin").write_bytes(bytes(range(256)) * 20)
    return base


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def python_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m redundancy_monitor ...` in a child with this tree on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "redundancy_monitor", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )


# -- replay --out FILE ----------------------------------------------------------------


def test_replay_out_exists_as_a_file_exits_2_in_one_line(run, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, _, err = cli(
        capsys, "replay", run / "run", "--text", run / "text.txt", "--out", target, *SEQ
    )
    assert code == 2
    assert "is a file" in one_error_line(err)
    assert target.read_text() == "not a folder"
    code, _, err = cli(
        capsys, "replay", run / "run", "--text", run / "text.txt", "--out", target / "sub", *SEQ
    )
    assert code == 2 and "is a file" in one_error_line(err)
    with pytest.raises(CheckpointError, match="is a file"):  # the library says it too
        ReplayRun(target, torch.zeros(1, 4, dtype=torch.long), ProbeConfig())


def test_watch_log_dir_that_is_a_file_exits_2_before_watching(run, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    code, _, err = cli(
        capsys, "watch", run / "run", "--text", run / "text.txt", "--log-dir", target, *SEQ[:4]
    )
    assert code == 2 and "--log-dir" in one_error_line(err)


# -- a replay whose only checkpoint is refused ----------------------------------------


class Payload:
    """Unpickling this creates `path`: proof that code from the file ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_replay_of_only_refused_checkpoints_exits_2_with_one_line_per_file(run, tmp_path):
    folder = tmp_path / "pl"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    for step in (5, 9):
        torch.save(
            {"state_dict": {}, "hyper_parameters": Payload(marker)}, folder / f"step={step}.ckpt"
        )
    result = python_cli(
        "replay", folder, "--text", run / "text.txt", "--out", tmp_path / "out",
        "--model-config", run / "run" / "checkpoint-4" / "config.json",
        "--tokenizer", run / "run" / "checkpoint-4", *SEQ,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    refusals = [x for x in result.stderr.splitlines() if "failed: CheckpointError" in x]
    assert len(refusals) == 2 and all("--trust-checkpoints" in x for x in refusals), result.stderr
    assert "none of the 2 checkpoint(s) could be probed" in one_error_line(result.stderr)
    records = read_records(tmp_path / "out" / "redundancy.jsonl")
    assert [r["step"] for r in records if r["type"] == "failure"] == [5, 9]  # kept for report


def test_replay_with_one_refused_and_one_good_checkpoint_still_exits_0(run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "checkpoint-4").symlink_to(run / "run" / "checkpoint-4")
    broken = folder / "checkpoint-8"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"junk")
    code, out, err = cli(
        capsys, "replay", folder, "--text", run / "text.txt", "--out", tmp_path / "o", *SEQ
    )
    assert code == 0, err
    assert "replayed 1 checkpoint(s)" in out and "1 failed" in out


# -- text that is not UTF-8 -----------------------------------------------------------


@pytest.mark.parametrize("name, message", [("latin1.txt", "not UTF-8"), ("junk.bin", "binary")])
def test_text_that_is_not_utf8_exits_2_naming_the_file(run, tmp_path, capsys, name, message):
    bad = run / name
    code, _, err = cli(capsys, "replay", run / "run", "--text", bad, "--out", tmp_path / "r", *SEQ)
    assert code == 2 and message in one_error_line(err) and name in err
    assert not (tmp_path / "r" / "redundancy.jsonl").exists()
    code, _, err = cli(
        capsys, "score", run / "run" / "checkpoint-4", "--text", run / "text.txt", bad, *SEQ
    )
    assert code == 2 and message in one_error_line(err)


def test_text_that_is_not_utf8_on_stdin_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n")))
    with pytest.raises(CheckpointError, match="standard input is not UTF-8"):
        read_text(["-"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeffcafé\n".encode())))
    assert read_text(["-"]) == "café\n"  # a byte-order mark is not text


# -- watch --trust-module -------------------------------------------------------------


def test_watch_accepts_trust_module_for_a_users_own_model_class(run, tmp_path, capsys, monkeypatch):
    (tmp_path / "cli_fault_models.py").write_text(
        textwrap.dedent(
            """
            from transformers import LlamaConfig, LlamaForCausalLM

            class MyLM(LlamaForCausalLM):
                def __init__(self, **kwargs):
                    super().__init__(LlamaConfig(**kwargs))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = make_tokenizer(make_text(3000, seed=0))
    lm = tiny_model("llama", n_layers=4, vocab=len(tokenizer))
    kwargs = {k: getattr(lm.config, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
    )}  # fmt: skip
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps({"class": "cli_fault_models:MyLM", "kwargs": kwargs}))
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 2, "state_dict": lm.state_dict()}, ckpts / "step=2.ckpt")
    args = [
        "watch", ckpts, "--text", run / "text.txt", "--tokenizer", run / "run" / "checkpoint-4",
        "--model-config", spec, "--until-step", "2", "--settle", "0.1", *SEQ[:4],
    ]  # fmt: skip
    code, _, err = cli(capsys, *args)
    assert code == 2 and "--trust-module cli_fault_models" in one_error_line(err)
    code, out, err = cli(capsys, *args, "--trust-module", "cli_fault_models")
    assert code == 0, err
    assert "probed 1 checkpoint(s)" in out
    assert [
        r["step"]
        for r in read_records(tmp_path / "redundancy" / "redundancy.jsonl")
        if r["type"] == "probe"
    ] == [2]


# -- replay --seq-len, --device, wording ----------------------------------------------


def test_replay_seq_len_beyond_the_models_positions_exits_2_before_any_work(run, tmp_path, capsys):
    out_dir = tmp_path / "r"
    code, _, err = cli(
        capsys, "replay", run / "run", "--text", run / "text.txt", "--out", out_dir,
        "--n-seq", "2", "--seq-len", "100", "--no-progress",
    )  # fmt: skip
    line = one_error_line(err)
    assert code == 2 and "--seq-len 100" in line and "--seq-len 64 or less" in line
    assert not (out_dir / "redundancy.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_replay_on_cuda_without_a_gpu_exits_2_up_front(run, tmp_path, capsys):
    code, _, err = cli(
        capsys, "replay", run / "run", "--text", run / "text.txt", "--out", tmp_path / "r",
        "--device", "cuda", *SEQ,
    )  # fmt: skip
    assert code == 2 and "CUDA is not available" in one_error_line(err)


def test_replay_hints_name_command_line_flags_and_its_alerts_do_not_speak_of_training(
    run, tmp_path, capsys
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "checkpoint-4").symlink_to(run / "run" / "checkpoint-4")
    broken = folder / "checkpoint-8"
    broken.mkdir()
    (broken / "config.json").write_text((run / "run" / "checkpoint-4" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"junk")
    out_dir = tmp_path / "r"
    code, _, err = cli(capsys, "replay", folder, "--text", run / "text.txt", "--out", out_dir, *SEQ)
    assert code == 0, err
    alert = next(r for r in read_records(out_dir / "redundancy.jsonl") if r["type"] == "alert")
    assert alert["rule"] == "probe_failure"
    assert "training" not in alert["message"] and "next one is probed" in alert["message"]
    # Resuming with another batch: the hint names flags, not a Python argument.
    code, _, err = cli(
        capsys, "replay", folder, "--text", run / "text.txt", "--out", out_dir,
        "--n-seq", "1", "--seq-len", "16", "--no-progress",
    )  # fmt: skip
    line = one_error_line(err)
    assert code == 2 and "--seq-len" in line and "--out" in line and "on_mismatch" not in line


# -- watch's log folder for DCP saves -------------------------------------------------


def test_watch_log_folder_for_dcp_saves_is_the_documented_one(tmp_path):
    assert (
        default_log_dir(tmp_path / "outputs" / "checkpoint") == tmp_path / "outputs" / "redundancy"
    )
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    assert "torchtitan's `outputs/checkpoint` of DCP saves: `outputs/redundancy`" in cli_doc


# -- replay() and watch() take a ProbeConfig ------------------------------------------


def test_replay_and_watch_take_a_probe_config_like_the_monitor(run, tmp_path):
    tokenizer = make_tokenizer(make_text(3000, seed=0))
    ids = torch.tensor(tokenizer(make_text(200, seed=4))["input_ids"][:32]).reshape(2, 16)
    refs = find_checkpoints([run / "run"])
    done = replay(
        refs, ids, tmp_path / "a", ModelLoader(), config=ProbeConfig(pairs="all"), progress=False
    )
    assert done.probed == [4]
    probe = next(
        r for r in read_records(tmp_path / "a" / "redundancy.jsonl") if r["type"] == "probe"
    )
    assert len(probe["result"]["pairs"]) == 6  # all pairs of 4 blocks
    old = replay(refs, ids, tmp_path / "b", ModelLoader(), pairs="all", progress=False)
    assert old.probed == [4]  # the older keywords still work
    with pytest.raises(InvalidConfigError, match="not both"):
        replay(refs, ids, tmp_path / "c", ModelLoader(), config=ProbeConfig(), pairs="all")
    with pytest.raises(InvalidConfigError, match="not both"):
        watch(run / "run", ModelLoader(), (ids, None), config=ProbeConfig(), pairs="all")
    outcome = watch(
        run / "run", ModelLoader(), (ids, None), log_dir=tmp_path / "w",
        config=ProbeConfig(pairs="all"), until_step=4, settle_seconds=0.1, poll_seconds=0.05,
    )  # fmt: skip
    assert outcome.probed == [4]
    with pytest.raises(CheckpointError):  # the same folder with other settings
        watch(
            run / "run", ModelLoader(), (ids, None), log_dir=tmp_path / "w",
            config=ProbeConfig(pairs="adjacent", protocols=("replacement",)),
            until_step=4, settle_seconds=0.1, poll_seconds=0.05,
        )  # fmt: skip
