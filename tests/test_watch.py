"""`redundancy-monitor watch`: checkpoints of real training runs, probed as they appear."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
import warnings

import pytest
import torch
from checkpoint_runs import (
    N_SEQ,
    SEQ_LEN,
    lightning_checkpoints,
)
from conftest import tiny_config, tiny_model

from redundancy_monitor.errors import CheckpointError
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.dcp import read_metadata
from redundancy_monitor.tools.replay import ModelLoader, find_checkpoints, replay
from redundancy_monitor.tools.watch import CheckpointFolder, default_log_dir, watch

# the module-scoped fixtures hf_run (an HF Trainer run's checkpoints) and probe_ids
pytest_plugins = ["checkpoint_runs"]

FAST = dict(settle_seconds=0.3, poll_seconds=0.05)
# Fires at every series' first probe (hysteresis 1, a threshold every gap exceeds).
ALWAYS = AlertConfig(
    gap_metric="gap_max",
    gap_threshold=-1.0,
    growth_factor=None,
    overlap_threshold=None,
    regime_change=False,
    hysteresis=1,
)


def safe_loader(**kw):
    return ModelLoader(trust_checkpoints=False, **kw)


def probes(log_dir):
    return [r for r in read_records(log_dir / "redundancy.jsonl") if r["type"] == "probe"]


def raw_probe_steps(log_dir):
    lines = (log_dir / "redundancy.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if '"type":"probe"' in x]


def assert_same_numbers(got: list[dict], want: list[dict]):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["result"]["meta"]["batch_sha256"] == w["result"]["meta"]["batch_sha256"]
        for gp, wp in zip(g["result"]["pairs"], w["result"]["pairs"], strict=True):
            assert (gp["i"], gp["j"]) == (wp["i"], wp["j"])
            assert gp["d_repl"] == pytest.approx(wp["d_repl"], rel=1e-6, abs=1e-9)
            assert gp["d_int"] == pytest.approx(wp["d_int"], rel=1e-6, abs=1e-9)


def copy_checkpoint(src, dst, skip=()):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy2(f, dst / f.name)


def test_watch_probes_each_checkpoint_once_in_step_order_like_replay(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    done = watch(
        root, safe_loader(), (probe_ids, None), log_dir=tmp_path / "w", exit_when_idle=0.5, **FAST
    )
    assert done.probed == [4, 8, 12] and done.failed == [] and done.already_done == []
    assert "idle" in done.reason
    replayed = replay(
        find_checkpoints([root]), probe_ids, tmp_path / "r", ModelLoader(), progress=False
    )
    assert replayed.probed == [4, 8, 12]
    assert_same_numbers(probes(tmp_path / "w"), probes(tmp_path / "r"))


def test_restarted_watch_probes_nothing_twice(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    ckpts, log_dir = tmp_path / "ckpts", tmp_path / "log"
    copy_checkpoint(root / "checkpoint-4", ckpts / "checkpoint-4")
    args = dict(log_dir=log_dir, alerts=ALWAYS, **FAST)
    first = watch(ckpts, safe_loader(), (probe_ids, None), until_step=4, **args)
    assert first.probed == [4] and "until-step" in first.reason and first.n_alerts == 1
    for step in (8, 12):
        copy_checkpoint(root / f"checkpoint-{step}", ckpts / f"checkpoint-{step}")
    second = watch(ckpts, safe_loader(), (probe_ids, None), exit_when_idle=0.5, **args)
    assert second.already_done == [4] and second.probed == [8, 12]
    third = watch(ckpts, safe_loader(), (probe_ids, None), exit_when_idle=0.3, **args)
    assert third.already_done == [4, 8, 12] and third.probed == []
    assert raw_probe_steps(log_dir) == [4, 8, 12]  # in the file once each, not just after reading
    # The alert state carried over: the always-true rule fired once, at the first probe.
    alerts = [r for r in read_records(log_dir / "redundancy.jsonl") if r["type"] == "alert"]
    assert [(a["step"], a["rule"]) for a in alerts] == [(4, "gap_threshold")]


def test_a_checkpoint_still_being_written_is_waited_for_not_read_torn(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    ckpts = tmp_path / "ckpts"
    copy_checkpoint(root / "checkpoint-4", ckpts / "checkpoint-4")
    # checkpoint-8 as the Trainer leaves it mid-save: config, half the weights, no state.
    part = ckpts / "checkpoint-8"
    copy_checkpoint(root / "checkpoint-8", part, skip=("model.safetensors", "trainer_state.json"))
    weights = (root / "checkpoint-8" / "model.safetensors").read_bytes()
    (part / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    def finish_the_save():
        time.sleep(1.5)  # several settle periods: the torn folder is settled, not complete
        (part / "model.safetensors").write_bytes(weights)
        shutil.copy2(root / "checkpoint-8" / "trainer_state.json", part)

    writer = threading.Thread(target=finish_the_save)
    writer.start()
    done = watch(
        ckpts,
        safe_loader(),
        (probe_ids, None),
        log_dir=tmp_path / "w",
        until_step=8,
        exit_when_idle=20,
        **FAST,
    )
    writer.join()
    assert done.probed == [4, 8] and done.failed == [] and "until-step" in done.reason
    records = read_records(tmp_path / "w" / "redundancy.jsonl")
    assert not [r for r in records if r["type"] == "failure"]
    replay(find_checkpoints([root]), probe_ids, tmp_path / "r", ModelLoader(), progress=False)
    assert_same_numbers(probes(tmp_path / "w"), probes(tmp_path / "r")[:2])


def test_a_growing_lightning_file_is_read_only_once_it_stops_changing(hf_run, probe_ids, tmp_path):
    """Lightning moves a finished file from the temp folder; across file systems that is
    a copy that grows in place."""
    folder, config = lightning_checkpoints(tmp_path / "pl", max_steps=4, every=4)
    data = (folder / "epoch=0-step=4.ckpt").read_bytes()
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    target = ckpts / "epoch=0-step=4.ckpt"

    def copy_slowly():
        with open(target, "wb") as f:
            for k in range(8):
                f.write(data[k * len(data) // 8 : (k + 1) * len(data) // 8])
                f.flush()
                time.sleep(0.1)  # below the settle time

    writer = threading.Thread(target=copy_slowly)
    writer.start()
    done = watch(
        ckpts,
        safe_loader(model_config=config),
        (probe_ids, None),
        log_dir=tmp_path / "w",
        until_step=4,
        exit_when_idle=20,
        **FAST,
    )
    writer.join()
    assert done.probed == [4] and done.failed == []
    lm = tiny_model("llama", n_layers=4, vocab=62)
    state = torch.load(folder / "epoch=0-step=4.ckpt", weights_only=True)["state_dict"]
    lm.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    want = probe(lm.eval(), probe_ids)
    got = probes(tmp_path / "w")[0]["result"]["pairs"]
    assert [g["d_int"] for g in got] == pytest.approx([w.d_int for w in want.pairs], rel=1e-5)


def test_an_interrupted_save_that_a_later_checkpoint_overtakes_is_skipped(
    hf_run, probe_ids, tmp_path
):
    root, _ = hf_run
    ckpts = tmp_path / "ckpts"
    torn = ckpts / "checkpoint-4"  # killed mid-save: half the weights, no trainer state
    copy_checkpoint(root / "checkpoint-4", torn, skip=("trainer_state.json", "model.safetensors"))
    weights = (root / "checkpoint-4" / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    copy_checkpoint(root / "checkpoint-8", ckpts / "checkpoint-8")
    done = watch(
        ckpts, safe_loader(), (probe_ids, None), log_dir=tmp_path / "w", exit_when_idle=0.6, **FAST
    )
    assert done.skipped == [4] and done.probed == [8]
    assert [r["step"] for r in probes(tmp_path / "w")] == [8]


def test_a_checkpoint_older_than_the_last_probed_one_is_skipped(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    ckpts = tmp_path / "ckpts"
    copy_checkpoint(root / "checkpoint-8", ckpts / "checkpoint-8")
    args = dict(log_dir=tmp_path / "w", exit_when_idle=0.5, **FAST)
    assert watch(ckpts, safe_loader(), (probe_ids, None), **args).probed == [8]
    late = ckpts / "checkpoint-4"  # e.g. a run restarted from an earlier checkpoint
    copy_checkpoint(root / "checkpoint-4", late)
    told = []
    done = watch(ckpts, safe_loader(), (probe_ids, None), notice=told.append, **args)
    assert done.probed == [] and done.already_done == [8]
    assert any("checkpoint-4 (step 4) appeared after step 8" in line for line in told), told
    assert raw_probe_steps(tmp_path / "w") == [8]


def test_a_checkpoint_rotated_away_while_read_is_skipped_not_a_failure(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    ckpts = tmp_path / "ckpts"
    for step in (4, 8):
        copy_checkpoint(root / f"checkpoint-{step}", ckpts / f"checkpoint-{step}")
    loader = safe_loader()

    def rotated_while_loading(ref):
        if ref.step == 4:
            shutil.rmtree(ref.path)  # save_total_limit deleted it under the sidecar
        return loader(ref)

    done = watch(
        ckpts,
        rotated_while_loading,
        (probe_ids, None),
        log_dir=tmp_path / "w",
        alerts=ALWAYS,
        exit_when_idle=0.6,
        **FAST,
    )
    assert done.skipped == [4] and done.probed == [8] and done.failed == []
    records = read_records(tmp_path / "w" / "redundancy.jsonl")
    assert not [r for r in records if r["type"] == "failure" or r.get("rule") == "probe_failure"]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_lightning_file_with_pickled_code_is_a_failed_probe_and_never_runs(
    hf_run, probe_ids, tmp_path
):
    folder, config = lightning_checkpoints(tmp_path / "pl", max_steps=4, every=4)
    data = torch.load(folder / "epoch=0-step=4.ckpt", weights_only=True)
    marker = tmp_path / "pwned"
    data["hyper_parameters"] = {"x": _Exploit(marker)}
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save(data, ckpts / "epoch=0-step=4.ckpt")
    done = watch(
        ckpts,
        safe_loader(model_config=config),
        (probe_ids, None),
        log_dir=tmp_path / "w",
        until_step=4,
        exit_when_idle=5,
        **FAST,
    )
    assert done.failed == [4] and not marker.exists()
    failure = [
        r for r in read_records(tmp_path / "w" / "redundancy.jsonl") if r["type"] == "failure"
    ]
    assert "safe loader" in failure[0]["error"]


def test_dcp_metadata_that_would_run_code_is_refused_unread(tmp_path):
    folder = tmp_path / "step-2"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"(posix|os)\.system"):
        read_metadata(folder)
    assert not marker.exists()


def test_dcp_folder_loads_into_the_model_built_from_its_config(probe_ids, tmp_path):
    """A single-process DCP save; the FSDP2 (sharded, two ranks) one is in test_sidecar."""
    import torch.distributed.checkpoint as dcp

    model = tiny_model("llama", n_layers=4, vocab=62, seed=5)
    ckpts = tmp_path / "ckpts"
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "step": 6}, checkpoint_id=ckpts / "step-6")
    config = tmp_path / "config.json"
    tiny_config("llama", 4, vocab=62).to_json_file(config)
    done = watch(
        ckpts,
        safe_loader(model_config=config),
        (probe_ids, None),
        log_dir=tmp_path / "w",
        until_step=6,
        exit_when_idle=5,
        **FAST,
    )
    assert done.probed == [6]
    want = probe(model, probe_ids)
    got = probes(tmp_path / "w")[0]["result"]["pairs"]
    assert [g["d_repl"] for g in got] == pytest.approx([w.d_repl for w in want.pairs], rel=1e-6)
    # The non-tensor entry ("step", pickled by DCP) was never unpickled: only tensors are read.


def test_default_log_dir_follows_lightning_and_trainer_layouts(tmp_path):
    assert (
        default_log_dir(tmp_path / "version_0" / "checkpoints")
        == tmp_path / "version_0" / "redundancy"
    )
    assert default_log_dir(tmp_path / "out") == tmp_path / "out" / "runs" / "redundancy"


def test_folder_scan_needs_markers_and_settling(tmp_path):
    now = [100.0]
    folder = CheckpointFolder(tmp_path, settle_seconds=2.0, clock=lambda: now[0])
    hf = tmp_path / "checkpoint-4"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    (tmp_path / "last.ckpt").write_bytes(b"x")  # no step in its name: never guessed
    [c] = folder.scan()
    assert (c.ref.step, c.settled, c.complete) == (4, False, False)
    now[0] += 2.0
    [c] = folder.scan()
    assert (c.settled, c.complete) == (True, False)  # no trainer_state.json yet
    (hf / "trainer_state.json").write_text('{"global_step": 4')  # half written
    now[0] += 2.0
    folder.scan()
    now[0] += 2.0
    assert not folder.scan()[0].complete
    (hf / "trainer_state.json").write_text('{"global_step": 4}')
    now[0] += 1.0
    assert not folder.scan()[0].complete  # changed: settles again from now
    now[0] += 2.0
    assert folder.scan()[0].complete
    assert [p.name for p in folder.no_step] == ["last.ckpt"]


def run_watch_cli(*args, capsys):
    code = main(["watch", *map(str, args)])
    return code, capsys.readouterr()


def test_command_line_bad_input_exits_2_with_one_line(hf_run, tmp_path, capsys):
    root, text = hf_run
    pl = tmp_path / "pl"
    pl.mkdir()
    shutil.copy2(root / "checkpoint-4" / "config.json", tmp_path / "config.json")
    (pl / "epoch=0-step=2.ckpt").write_bytes(b"")
    bad_batch = tmp_path / "batch.pt"
    torch.save({"input_ids": _Exploit(tmp_path / "pwned")}, bad_batch)
    fast = ["--exit-when-idle", "5", "--settle", "0.2"]
    cases = [
        ([tmp_path / "config.json", "--text", text], "is a file"),
        ([root, "--text", tmp_path / "absent.txt"], "cannot read text file"),
        ([pl, "--text", text, *fast], "pass --tokenizer"),
        ([pl, "--text", text, "--tokenizer", root / "checkpoint-4", *fast], "pass --model-config"),
        ([root, "--probe-batch", bad_batch], "weights-only loader"),
        (
            [root, "--text", text, "--model-config", tmp_path / "absent.json"],
            "cannot read --model-config",
        ),
        ([root, "--text", text, "--device", "nonsense"], "unknown device"),
    ]
    for args, message in cases:
        code, out = run_watch_cli(*args, capsys=capsys)
        assert code == 2, out.err
        error_lines = [x for x in out.err.splitlines() if "error:" in x]
        assert len(error_lines) == 1 and message in error_lines[0], out.err
    assert not (tmp_path / "pwned").exists()
    for args, message in [
        ([root], "one of the arguments --text --probe-batch is required"),
        ([root, "--text", text, "--alerts", '{"gap_treshold": 0.1}'], "gap_treshold"),
        ([root, "--text", text, "--exit-when-idle", "soon"], "number of seconds"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(["watch", *map(str, args)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_command_line_watch_of_a_trainer_folder_reports_progress(hf_run, tmp_path, capsys):
    root, text = hf_run
    code, out = run_watch_cli(
        root,
        "--text",
        text,
        "--n-seq",
        N_SEQ,
        "--seq-len",
        SEQ_LEN,
        "--log-dir",
        tmp_path / "w",
        "--exit-when-idle",
        "0.5",
        "--settle",
        "0.2",
        capsys=capsys,
    )
    assert code == 0, out.err
    assert "probed 3 checkpoint(s)" in out.out and out.out.count("\n") == 1
    progress = [line.split(":")[1] for line in out.err.splitlines() if "probed checkpoint-" in line]
    assert progress == [" step 4", " step 8", " step 12"]
    assert [r["step"] for r in probes(tmp_path / "w")] == [4, 8, 12]


def test_a_sidecar_killed_with_sigkill_and_restarted_probes_nothing_again(hf_run, tmp_path):
    import signal
    import subprocess
    import sys

    root, text = hf_run
    log_dir = tmp_path / "w"
    cmd = [
        sys.executable, "-m", "redundancy_monitor", "watch", str(root), "--text", str(text),
        "--n-seq", str(N_SEQ), "--seq-len", str(SEQ_LEN), "--log-dir", str(log_dir),
        "--settle", "0.2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    state = log_dir / "watch_state.json"
    while not (state.is_file() and json.loads(state.read_text())["monitor"]["last_step"] == 12):
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "the sidecar did not probe 3 checkpoints in 120 s"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # no chance to close anything
    first.wait(timeout=30)
    again = subprocess.run(
        [*cmd, "--exit-when-idle", "0.5"], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert "probed 0 checkpoint(s)" in again.stdout and "3 already done" in again.stdout
    assert raw_probe_steps(log_dir) == [4, 8, 12]
