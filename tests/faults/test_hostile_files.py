"""Files from users are hostile: a pickled checkpoint is never unpickled without
--trust-checkpoints (discovery reads names only), a --model-config never imports or calls
anything but an nn.Module class from a trusted package, and `score` refuses damaged
weights and unusable output folders in one line, before any work."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pytest
import torch
from checkpoint_runs import SEQ_LEN, corpus, word_tokenizer
from conftest import tiny_model
from score_fixtures import make_text, save_checkpoint

import redundancy_monitor.tools.score as score_module
from redundancy_monitor.errors import CheckpointError
from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.replay import (
    CheckpointRef,
    ModelLoader,
    build_module,
    find_checkpoints,
)


class Payload:
    """Unpickling this creates `path`: proof that code from the file ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def poisoned_ckpt(path, marker, step=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"state_dict": {}, "hyper_parameters": Payload(marker)}
    if step is not None:
        data["global_step"] = step
    torch.save(data, path)
    return path


@pytest.fixture
def lightning_run(tmp_path):
    """A folder with one good Lightning-style checkpoint of a tiny Llama (step 4), its
    config, a tokenizer and probe text."""
    tokenizer = word_tokenizer()
    lm = tiny_model("llama", n_layers=4, vocab=len(tokenizer))
    run = tmp_path / "run"
    run.mkdir()
    torch.save(
        {"global_step": 4, "state_dict": {f"model.{k}": v for k, v in lm.state_dict().items()}},
        run / "epoch=0-step=4.ckpt",
    )
    lm.config.to_json_file(tmp_path / "config.json")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "probe.txt").write_text(corpus(200, seed=5))
    return tmp_path


def replay_args(base, folder, out, *extra):
    return [
        "replay", str(folder), "--text", str(base / "probe.txt"), "--out", str(out),
        "--tokenizer", str(base / "tokenizer"), "--n-seq", "2", "--seq-len", str(SEQ_LEN),
        "--no-progress", *extra,
    ]  # fmt: skip


# -- checkpoints ----------------------------------------------------------------------


def test_discovery_never_unpickles_a_ckpt_found_in_a_sub_folder(tmp_path, caplog):
    marker = tmp_path / "PWNED"
    poisoned_ckpt(tmp_path / "run" / "sub" / "last.ckpt", marker, step=9)
    poisoned_ckpt(tmp_path / "run" / "sub" / "deeper" / "model.ckpt", marker)
    poisoned_ckpt(tmp_path / "run" / "sub" / "step=5.ckpt", marker)
    with caplog.at_level(logging.WARNING, logger="redundancy_monitor"):
        found = find_checkpoints([tmp_path / "run"])
    assert [(c.step, c.path.name) for c in found] == [(5, "step=5.ckpt")]  # by its name
    assert not marker.exists()
    assert "leaving out" in caplog.text and "last.ckpt" in caplog.text


def test_a_ckpt_named_directly_is_read_safely_unless_trusted(tmp_path):
    marker = tmp_path / "PWNED"
    path = poisoned_ckpt(tmp_path / "model.ckpt", marker, step=3)
    with pytest.raises(CheckpointError, match="--trust-checkpoints"):
        find_checkpoints([path])
    assert not marker.exists()
    assert [c.step for c in find_checkpoints([path], trust=True)] == [3]
    assert marker.exists()  # the flag, and only the flag, lets the file's code run


def test_loading_a_poisoned_ckpt_refuses_unless_trusted(tmp_path, lightning_run):
    marker = tmp_path / "PWNED"
    ref = CheckpointRef(5, poisoned_ckpt(tmp_path / "step=5.ckpt", marker), "lightning")
    with pytest.raises(CheckpointError, match=r"safe loader.*--trust-checkpoints"):
        ModelLoader(lightning_run / "config.json")(ref)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # unpickled now, but it holds no weights
        ModelLoader(lightning_run / "config.json", trust_checkpoints=True)(ref)
    assert marker.exists()


def test_replay_records_a_poisoned_ckpt_as_a_failure_without_running_it(
    tmp_path, lightning_run, capsys
):
    marker = tmp_path / "PWNED"
    poisoned_ckpt(lightning_run / "run" / "sub" / "epoch=1-step=8.ckpt", marker)
    poisoned_ckpt(lightning_run / "run" / "sub" / "last.ckpt", marker)
    out = tmp_path / "out"
    args = replay_args(
        lightning_run,
        lightning_run / "run",
        out,
        "--model-config",
        str(lightning_run / "config.json"),
    )
    assert main(args) == 0, capsys.readouterr().err
    assert not marker.exists()
    records = read_records(out / "redundancy.jsonl")
    assert [r["step"] for r in records if r["type"] == "probe"] == [4]
    failure = next(r for r in records if r["type"] == "failure")
    assert failure["step"] == 8 and "--trust-checkpoints" in failure["error"]


# -- --model-config -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["os:system", "builtins:exec", "subprocess:run", "os.path:join", "posix:system"]
)
def test_a_model_config_naming_a_callable_outside_trusted_packages_is_never_called(
    tmp_path, monkeypatch, name
):
    marker = tmp_path / "PWNED"
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append((a, k)) or 0)
    config = tmp_path / "evil.json"
    config.write_text(json.dumps({"class": name, "kwargs": {"command": f"touch {marker}"}}))
    with pytest.raises(CheckpointError, match=r"not trusted.*--trust-module"):
        build_module(config)
    assert calls == [] and not marker.exists()


@pytest.mark.parametrize("name", ["torch:load", "torch.nn.init:zeros_", "transformers:pipeline"])
def test_a_trusted_package_name_that_is_not_a_module_class_is_refused(tmp_path, name):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"class": name, "kwargs": {}}))
    with pytest.raises(CheckpointError, match=r"not an nn\.Module class"):
        build_module(config)


def test_a_users_own_module_class_needs_trust_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "class TwoBlocks(torch.nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"class": "my_models:TwoBlocks", "kwargs": {"width": 3}}))
    with pytest.raises(CheckpointError, match="--trust-module my_models"):
        build_module(config)
    module, prefix = build_module(config, trusted_modules=("my_models",))
    assert type(module).__name__ == "TwoBlocks" and len(module.blocks) == 2 and prefix is None


def test_replay_with_an_untrusted_model_config_exits_2_before_any_work(
    tmp_path, lightning_run, capsys, monkeypatch
):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    config = tmp_path / "evil.json"
    config.write_text(json.dumps({"class": "os:system", "kwargs": {"command": "true"}}))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(
        replay_args(lightning_run, lightning_run / "run", out, "--model-config", str(config))
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not trusted" in err and len(err.splitlines()) == 1, err
    assert calls == [] and not out.exists()


# -- score ----------------------------------------------------------------------------

ARGS = ["--n-seq", "2", "--seq-len", "16", "--budgets", "1", "--random-draws", "1",
        "--window", "32", "--stride", "16", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_score")
    save_checkpoint(d / "ckpt", n_layers=4)
    (d / "text.txt").write_text(make_text(300, seed=1))
    return d


def score(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(["score", *args, *ARGS])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_weights_exit_2_in_one_line(scoring, tmp_path, capsys, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(scoring / "ckpt", ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "random": random.Random(0).randbytes(len(data)),
            "empty": b"",
        }[damage]
    )
    code, err = score(capsys, str(ckpt), "--text", str(scoring / "text.txt"))
    assert code == 2 and "cannot load weights" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


class Reached(Exception):
    """The scoring started: the check came too late."""


def outputs_cases(base):
    (base / "a_file").write_text("x")
    return {
        "out-is-a-file": (["--out", str(base / "a_file")], "is a file, not a folder"),
        "out-under-a-file": (["--out", str(base / "a_file" / "out")], "cannot be created"),
        "export-is-a-file": (
            ["--export-pruned", str(base / "a_file"), "--remove", "1"],
            "is a file, not a folder",
        ),
        "export-under-a-file": (
            ["--export-pruned", str(base / "a_file" / "x"), "--remove", "1"],
            "cannot be created",
        ),
        "export-over-the-checkpoint": (
            ["--export-pruned", str(base / "ckpt"), "--remove", "1"],
            "is the checkpoint being scored",
        ),
        "export-over-the-checkpoint-spelled-otherwise": (
            ["--export-pruned", str(base / "ckpt" / ".." / "ckpt") + "/", "--remove", "1"],
            "is the checkpoint being scored",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "out-is-a-file",
        "out-under-a-file",
        "export-is-a-file",
        "export-under-a-file",
        "export-over-the-checkpoint",
        "export-over-the-checkpoint-spelled-otherwise",
    ],
)
def test_unusable_output_folders_exit_2_before_any_work(
    scoring, tmp_path, capsys, monkeypatch, case
):
    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(score_module, "load_checkpoint", reached)
    shutil.copytree(scoring / "ckpt", tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    extra, says = outputs_cases(tmp_path)[case]
    code, err = score(capsys, str(tmp_path / "ckpt"), "--text", str(scoring / "text.txt"), *extra)
    assert code == 2 and says in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
