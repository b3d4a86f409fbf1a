"""`redundancy-monitor replay`: trajectories from checkpoints saved by real training runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoint_runs import (
    N_SEQ,
    SEQ_LEN,
    lightning_checkpoints,
)
from run_folders import run_cli

from redundancy_monitor.errors import CheckpointError, MonitorStateError
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.records import load_run
from redundancy_monitor.tools.replay import (
    ModelLoader,
    find_checkpoints,
    replay,
)
from redundancy_monitor.tools.report import write_report

# Always-true gap condition with hysteresis 2: it fires at the second probe of a series,
# the module-scoped fixtures hf_run (an HF Trainer run's checkpoints) and probe_ids
pytest_plugins = ["checkpoint_runs"]

# so an alert engine that forgot its state over a resume would fire one probe later.
STATEFUL_ALERTS = AlertConfig(
    gap_metric="gap_max",
    gap_threshold=-1.0,
    growth_factor=None,
    overlap_threshold=None,
    regime_change=False,
    hysteresis=2,
)


@pytest.fixture(scope="module")
def cli_replay(hf_run, tmp_path_factory):
    root, text = hf_run
    out = tmp_path_factory.mktemp("replayed") / "run"
    args = [str(root), "--text", str(text), "--out", str(out)]
    done = run_cli("replay", *args, "--n-seq", str(N_SEQ), "--seq-len", str(SEQ_LEN))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def probe_records(out):
    return [r for r in read_records(out / "redundancy.jsonl") if r["type"] == "probe"]


def test_replay_probes_hf_trainer_checkpoints_in_step_order_on_one_batch(
    hf_run, cli_replay, probe_ids
):
    root, _ = hf_run
    out, done = cli_replay
    records = probe_records(out)
    assert [r["step"] for r in records] == [4, 8, 12]
    assert {r["result"]["meta"]["batch_sha256"] for r in records} == {
        probe(_load(root / "checkpoint-4"), probe_ids).meta.batch_sha256
    }
    assert "replay:" in done.stderr and "ckpt" in done.stderr  # the tqdm bar
    # The numbers are the probe of that checkpoint, loaded on its own.
    expected = probe(_load(root / "checkpoint-8"), probe_ids)
    got = records[1]["result"]["pairs"]
    assert len(got) == len(expected.pairs) == 3
    for g, e in zip(got, expected.pairs, strict=True):
        assert (g["i"], g["j"]) == (e.i, e.j)
        assert g["d_repl"] == pytest.approx(e.d_repl, rel=1e-5, abs=1e-8)
        assert g["d_int"] == pytest.approx(e.d_int, rel=1e-5, abs=1e-8)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def test_replay_writes_tensorboard_scalars_like_the_live_monitor(cli_replay):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = cli_replay
    events = EventAccumulator(str(out))
    events.Reload()
    scalars = events.Scalars("redundancy/gap_mean")
    records = probe_records(out)
    assert [s.step for s in scalars] == [4, 8, 12]
    for s, r in zip(scalars, records, strict=True):
        assert s.value == pytest.approx(r["result"]["summary"]["gap_mean"], rel=1e-6)
    assert "redundancy/heatmap/gap" in events.Tags()["images"]


def test_report_builds_from_a_replayed_run(cli_replay, tmp_path):
    out, _ = cli_replay
    report = write_report(out, tmp_path / "report.html")
    assert "3 probe(s) of a 4-layer model from step 4 to step 12" in report.summary[0]
    assert len(report.images) == 6  # with the change since the baseline


def test_interrupted_replay_resumes_with_the_alert_state_it_had(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    checkpoints = find_checkpoints([root])
    reference = replay(
        checkpoints,
        probe_ids,
        tmp_path / "whole",
        ModelLoader(),
        alerts=STATEFUL_ALERTS,
        progress=False,
    )
    assert reference.probed == [4, 8, 12]

    def interrupt_at_step_8(ref):
        if ref.step == 8:
            raise KeyboardInterrupt
        return ModelLoader()(ref)

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        replay(
            checkpoints, probe_ids, out, interrupt_at_step_8, alerts=STATEFUL_ALERTS, progress=False
        )
    resumed = replay(
        checkpoints, probe_ids, out, ModelLoader(), alerts=STATEFUL_ALERTS, progress=False
    )
    assert resumed.already_done == [4] and resumed.probed == [8, 12]
    whole, again = load_run(tmp_path / "whole"), load_run(out)
    assert again.steps == [4, 8, 12]
    assert [r["step"] for r in probe_records(out)] == [4, 8, 12]  # nothing probed twice
    assert [(a.step, a.rule) for a in again.alerts] == [(a.step, a.rule) for a in whole.alerts]
    assert [(a.step, a.rule) for a in whole.alerts] == [(8, "gap_threshold")]
    for a, b in zip(whole.probes, again.probes, strict=True):
        assert a.result.summary.gap_mean == pytest.approx(b.result.summary.gap_mean, rel=1e-6)


def test_a_broken_checkpoint_is_a_failed_probe_and_the_replay_goes_on(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    copy = tmp_path / "ckpts"
    shutil.copytree(root, copy)
    (copy / "checkpoint-8" / "model.safetensors").write_bytes(b"not a safetensors file")
    done = replay(
        find_checkpoints([copy]), probe_ids, tmp_path / "run", ModelLoader(), progress=False
    )
    assert done.probed == [4, 12] and done.failed == [8]
    run = load_run(tmp_path / "run")
    assert run.steps == [4, 12]
    assert [f.step for f in run.failures] == [8] and "checkpoint-8" in run.failures[0].error
    assert [(a.step, a.rule) for a in run.alerts if a.rule == "probe_failure"] == [
        (8, "probe_failure")
    ]


def test_replay_of_lightning_ckpt_files_with_a_model_config(hf_run, tmp_path, probe_ids, capsys):
    root, text = hf_run
    folder, config = lightning_checkpoints(tmp_path / "lightning")
    out = tmp_path / "run"
    code = main(
        [
            "replay",
            str(folder),
            "--text",
            str(text),
            "--out",
            str(out),
            "--model-config",
            str(config),
            "--tokenizer",
            str(root / "checkpoint-4"),
            "--n-seq",
            str(N_SEQ),
            "--seq-len",
            str(SEQ_LEN),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    records = probe_records(out)
    assert [r["step"] for r in records] == [4, 8]
    # Reference: the same weights put into the LM by hand.
    from transformers import AutoConfig, AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
    state = torch.load(folder / "epoch=0-step=8.ckpt", weights_only=False)["state_dict"]
    lm.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    expected = probe(lm.eval(), probe_ids)
    got = records[1]["result"]["pairs"]
    assert [g["d_int"] for g in got] == pytest.approx([e.d_int for e in expected.pairs], rel=1e-5)


def test_step_comes_from_trainer_state_then_the_name(tmp_path):
    def fake_hf(name, global_step=None):
        folder = tmp_path / "suite" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        if global_step is not None:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": global_step}))

    fake_hf("step1000")  # Pythia-style revision folder
    fake_hf("checkpoint-500")
    fake_hf("final", global_step=1500)
    (tmp_path / "suite" / "epoch=1-step=250.ckpt").write_bytes(b"")
    (tmp_path / "suite" / "notes.txt").write_text("not a checkpoint")
    found = find_checkpoints([tmp_path / "suite"])
    assert [(c.step, c.path.name, c.kind) for c in found] == [
        (250, "epoch=1-step=250.ckpt", "lightning"),
        (500, "checkpoint-500", "hf"),
        (1000, "step1000", "hf"),
        (1500, "final", "hf"),
    ]
    (tmp_path / "suite" / "step1000" / "empty-folder").mkdir()
    fake_hf("no-number-here")
    with pytest.raises(CheckpointError, match="rename it like checkpoint-<step>"):
        find_checkpoints([tmp_path / "suite" / "no-number-here"])
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoints([tmp_path / "absent"])
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_checkpoints([tmp_path / "suite" / "step1000" / "empty-folder"])


def test_resume_with_other_settings_or_an_earlier_step_is_refused(hf_run, probe_ids, tmp_path):
    root, _ = hf_run
    late = [c for c in find_checkpoints([root]) if c.step == 12]
    early = [c for c in find_checkpoints([root]) if c.step == 4]
    replay(late, probe_ids, tmp_path, ModelLoader(), progress=False)
    with pytest.raises(CheckpointError, match="other settings"):
        replay(late, probe_ids, tmp_path, ModelLoader(), pairs="all", progress=False)
    with pytest.raises(CheckpointError, match="out of order"):
        replay(early, probe_ids, tmp_path, ModelLoader(), progress=False)
    with pytest.raises(MonitorStateError, match="another probe batch"):
        replay(late, probe_ids[:1], tmp_path, ModelLoader(), progress=False)


def test_command_line_errors_say_what_to_pass(hf_run, tmp_path, capsys):
    root, text = hf_run
    (tmp_path / "step=3.ckpt").write_bytes(b"")
    cases = [
        ([str(tmp_path / "absent")], "does not exist"),
        ([str(tmp_path / "step=3.ckpt")], "pass --model-config"),
        ([str(root), "--seq-len", "100000"], "pass --seq-len 64 or less"),  # checked up front
    ]
    for args, message in cases:
        out = ["--text", str(text), "--out", str(tmp_path / "out"), "--no-progress"]
        code = main(["replay", *args, *out])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    with pytest.raises(SystemExit) as bad_option:  # argparse rejects it before any work
        main(["replay", str(root), "--pairs", "diagonal", *out])
    assert bad_option.value.code == 2 and "unknown pair set" in capsys.readouterr().err


def test_a_record_written_after_the_last_saved_state_is_replaced_on_resume(
    hf_run, probe_ids, tmp_path
):
    root, _ = hf_run
    checkpoints = find_checkpoints([root])
    replay(checkpoints[:2], probe_ids, tmp_path, ModelLoader(), progress=False)
    state_after_8 = (tmp_path / "replay_state.json").read_text()
    replay(checkpoints, probe_ids, tmp_path, ModelLoader(), progress=False)
    # A crash between writing step 12's record and saving the state leaves this behind.
    (tmp_path / "replay_state.json").write_text(state_after_8)
    resumed = replay(checkpoints, probe_ids, tmp_path, ModelLoader(), progress=False)
    assert resumed.already_done == [4, 8] and resumed.probed == [12]
    assert [r["step"] for r in probe_records(tmp_path)] == [4, 8, 12]
    raw = (tmp_path / "redundancy.jsonl").read_text().count('"type":"probe"')
    assert raw == 4  # the orphan is still in the file, dropped by the resume marker
