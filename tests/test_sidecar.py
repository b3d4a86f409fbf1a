"""The sidecar end to end: training processes that act on `watch`'s alerts, and `watch`
following real runs (Lightning beside it, FSDP2 ranks writing DCP folders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_runs import SEQ_LEN, corpus, word_tokenizer
from conftest import tiny_config, tiny_model
from test_distributed_probe import torchrun
from test_distributed_training import SCRIPTS, run_script
from test_watch import N_SEQ, assert_same_numbers, probes, raw_probe_steps
from training_fixtures import probe_ids

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.control import MonitorControl
from redundancy_monitor.monitoring.jsonl import JsonlSink, read_records
from redundancy_monitor.monitoring.probe_config import ProbeConfig
from redundancy_monitor.monitoring.schedule import ProbeSchedule
from redundancy_monitor.monitoring.sidecar import SidecarAlerts
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.tools.loading import probe_batch_from_text
from redundancy_monitor.tools.replay import ModelLoader, find_checkpoints, replay
from redundancy_monitor.tools.watch import watch

REPO = Path(__file__).resolve().parents[1]
ALWAYS_JSON = json.dumps(
    {
        "gap_metric": "gap_max",
        "gap_threshold": -1.0,
        "growth_factor": None,
        "overlap_threshold": None,
        "regime_change": False,
        "hysteresis": 1,
    }
)


def alert(step: int, rule: str = "gap_threshold") -> Alert:
    return Alert(step, rule, 0.5, 0.1, f"test alert at {step}")


# ----- reading the sidecar's alerts ------------------------------------------------------


def test_only_alerts_appended_after_start_are_acted_on_at_scheduled_steps(tmp_path):
    sink = JsonlSink(tmp_path / "redundancy.jsonl")
    sink.write_alert(alert(2))  # an earlier attempt's
    seen = []
    reader = SidecarAlerts(
        tmp_path,
        ProbeSchedule(every_n_steps=4, log_spaced=False),
        stop_on_alert=["gap_threshold"],
        checkpoint_on_alert=["removal_overlap"],
        on_alert=seen.append,
    )
    reader.start()
    assert reader.step(4) == MonitorControl()  # the old alert is not news
    sink.write_alert(alert(6, "removal_overlap"))
    assert reader.step(7) == MonitorControl()  # not a scheduled step: the file is not read
    assert seen == []
    control = reader.step(8)
    assert (control.save, control.stop) == (True, False)
    assert control.reason == "[removal_overlap] test alert at 6"
    assert reader.step(8) == reader.step(9) == MonitorControl()  # a save is handed out once
    with open(tmp_path / "redundancy.jsonl", "a") as f:
        f.write('{"type":"probe","step":9}\nnot json\n["a list"]\n{"type":"alert","step":10,')
    assert reader.step(12) == MonitorControl()  # bad lines skipped, partial waits
    with open(tmp_path / "redundancy.jsonl", "a") as f:
        f.write('"rule":"gap_threshold","value":1.0,"threshold":0.1,"message":"m"}\n')
    assert reader.step(16) == MonitorControl(stop=True, reason="[gap_threshold] m")
    assert reader.step(17).stop  # a stop stays set
    assert [(a.step, a.rule) for a in seen] == [(6, "removal_overlap"), (10, "gap_threshold")]


def test_callbacks_refuse_probing_arguments_with_a_sidecar(tmp_path):
    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback
    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    for callback in (RedundancyMonitorCallback, RedundancyMonitorTrainerCallback):
        with pytest.raises(InvalidConfigError, match="probe_batch, probe_config would have no"):
            ids = torch.zeros(2, 4, dtype=torch.long)
            callback(ids, sidecar=tmp_path, probe_config=ProbeConfig(pairs="all"))
        with pytest.raises(InvalidConfigError, match="unknown rules"):
            callback(sidecar=tmp_path, stop_on_alert=["gap_treshold"])
        cb = callback(sidecar=tmp_path, schedule=ProbeSchedule(3), stop_on_alert=True)
        assert cb.monitor is None and cb.sidecar.schedule.every_n_steps == 3


def test_hf_trainer_with_a_sidecar_stops_and_saves_at_the_next_scheduled_step(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    from training_fixtures import TokenDataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

    sidecar_log = tmp_path / "sidecar"
    sink = JsonlSink(sidecar_log / "redundancy.jsonl")
    sink.write_alert(alert(1))  # before training started: ignored

    class StandInSidecar(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                sink.write_alert(alert(2))

    cb = RedundancyMonitorTrainerCallback(
        sidecar=sidecar_log,
        schedule=ProbeSchedule(2, log_spaced=False),
        stop_on_alert=True,
        checkpoint_on_alert=True,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=20,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    model = tiny_model("gpt_neox", 4).train()
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=[StandInSidecar(), cb]
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")] == [
        "checkpoint-4"
    ]
    assert [(a.step, a.rule) for a in cb.sidecar.alerts] == [(2, "gap_threshold")]


def test_lightning_ddp_ranks_stop_together_on_a_sidecar_alert(tmp_path):
    tiny_config("llama", 4, vocab=62).to_json_file(tmp_path / "config.json")
    # The stand-in writes after step 3; the file is read at step 4 (every 2 steps).
    run_script("lightning_sidecar.py", str(tmp_path), "2", "40", "100", "0", "3")
    ranks = [json.loads((tmp_path / f"summary-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [4, 4]  # a lone stop would hang DDP
    assert ranks[0]["alerts"] == [[1, "gap_threshold"]] and ranks[1]["alerts"] == []
    assert (tmp_path / "redundancy-alert-step4.ckpt").is_file()


# ----- watch beside a real run ------------------------------------------------------------


def _python(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, text=True, **popen)


def test_watch_beside_a_lightning_run_equals_replay_and_its_alert_stops_training(tmp_path):
    """Two real processes: a Lightning run saving every 4 steps, and `watch` following it.
    The sidecar's first probe raises an alert (a threshold every gap exceeds); the run,
    reading the sidecar's alerts every step, stops."""
    tiny_config("llama", 4, vocab=62).to_json_file(tmp_path / "config.json")
    word_tokenizer().save_pretrained(tmp_path / "tokenizer")
    text = tmp_path / "probe.txt"
    text.write_text(corpus(400, seed=7))
    max_steps = 400
    with open(tmp_path / "train.log", "w") as train_log, open(tmp_path / "watch.log", "w") as log:
        training = _python(
            str(SCRIPTS / "lightning_sidecar.py"),
            str(tmp_path),
            "1",
            str(max_steps),
            "4",
            "0.25",
            stdout=train_log,
            stderr=subprocess.STDOUT,
        )
        sidecar = _python(
            "-m", "redundancy_monitor", "watch", str(tmp_path / "checkpoints"),
            "--text", str(text), "--tokenizer", str(tmp_path / "tokenizer"),
            "--model-config", str(tmp_path / "config.json"),
            "--n-seq", str(N_SEQ), "--seq-len", str(SEQ_LEN), "--alerts", ALWAYS_JSON,
            "--settle", "0.5", "--exit-when-idle", "4",
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
        try:
            assert training.wait(timeout=150) == 0, (tmp_path / "train.log").read_text()[-3000:]
            out, _ = sidecar.communicate(timeout=120)
            assert sidecar.returncode == 0, (tmp_path / "watch.log").read_text()[-3000:]
        finally:
            for process in (training, sidecar):
                if process.poll() is None:
                    process.kill()

    log_dir = tmp_path / "redundancy"  # watch's default beside a "checkpoints" folder
    saved = sorted(c.step for c in find_checkpoints([tmp_path / "checkpoints"]))
    summary = json.loads((tmp_path / "summary-rank0.json").read_text())
    # The sidecar's alert stopped the run, well before its end, after the alert's step.
    assert summary["alerts"] == [[4, "gap_threshold"]], summary
    assert 4 < summary["global_step"] < max_steps
    # Every checkpoint was probed once, in step order, and the numbers are replay's.
    assert raw_probe_steps(log_dir) == saved and saved[0] == 4
    tokenizer_batch = probe_batch_from_text(word_tokenizer(), text.read_text(), N_SEQ, SEQ_LEN)
    loader = ModelLoader(tmp_path / "config.json")
    replay(
        find_checkpoints([tmp_path / "checkpoints"]),
        tokenizer_batch,
        tmp_path / "r",
        loader,
        progress=False,
    )
    assert_same_numbers(probes(log_dir), probes(tmp_path / "r"))
    # The TensorBoard trajectory is there too, at the checkpoints' steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [s.step for s in events.Scalars("redundancy/gap_mean")] == saved
    assert f"probed {len(saved)} checkpoint(s)" in out
    assert "idle" in out


def test_watch_reads_dcp_folders_saved_by_fsdp2_ranks(tmp_path):
    torchrun(SCRIPTS / "fsdp2_dcp_save.py", str(tmp_path))
    config = tmp_path / "config.json"
    tiny_config("gpt_neox", 4).to_json_file(config)
    batch = probe_ids()
    done = watch(
        tmp_path / "checkpoint",
        ModelLoader(config, trust_checkpoints=False),
        (batch, None),
        log_dir=tmp_path / "w",
        settle_seconds=0.2,
        poll_seconds=0.05,
        until_step=4,
        exit_when_idle=10,
    )
    assert done.probed == [2, 4] and done.failed == []
    for record in probes(tmp_path / "w"):
        model = tiny_model("gpt_neox", 4)
        model.load_state_dict(torch.load(tmp_path / f"full-step-{record['step']}.pt"))
        want = probe(model, batch)
        got = record["result"]["pairs"]
        assert [g["d_repl"] for g in got] == pytest.approx([w.d_repl for w in want.pairs], rel=1e-5)
        assert [g["d_int"] for g in got] == pytest.approx([w.d_int for w in want.pairs], rel=1e-5)
    assert not [
        r for r in read_records(tmp_path / "w" / "redundancy.jsonl") if r["type"] == "failure"
    ]
