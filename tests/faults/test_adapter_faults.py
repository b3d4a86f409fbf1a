"""Faults at the framework adapters: a run killed inside its train-end probe and refit,
training code that raises while a background probe runs, two monitors on one trainer."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from redundancy_monitor.monitoring.jsonl import read_records
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.tools.records import load_run

pytest.importorskip("lightning")
FAULTS = Path(__file__).resolve().parent


def attempt(root: Path, ckpt: Path | None, kill: tuple[int, str] | None, every: int) -> int:
    """One Lightning attempt in a forked child (see lightning_restart_child.py)."""
    from lightning_restart_child import run

    args = (str(root), None if ckpt is None else str(ckpt), kill, every)
    child = multiprocessing.get_context("fork").Process(target=run, args=args)
    child.start()
    child.join(timeout=300)
    if child.exitcode is None:
        child.kill()
        pytest.fail(f"the attempt {kill} did not finish in 300 s")
    return child.exitcode


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_sigkill_during_the_train_end_probe_then_a_refit_probes_the_final_weights(tmp_path):
    from lightning_restart_child import BATCHES_PER_EPOCH, EPOCHS
    from training_fixtures import lightning_module, probe_ids

    last = BATCHES_PER_EPOCH * EPOCHS  # 24: not a multiple of 5, so only train end probes it
    root = tmp_path / "run"
    assert attempt(root, None, (last, "train_end_probe"), every=5) == -signal.SIGKILL
    ckpt = max(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert f"step={last}" in ckpt.name  # saved at the last epoch's end, before train end
    assert load_run(root).steps == [0, 5, 10, 15, 20]  # the killed attempt's record file

    assert attempt(root, ckpt, None, every=5) == 0  # the fit ends at once (max_epochs reached)
    run = load_run(root)
    assert run.steps == [0, 5, 10, 15, 20, last] and run.failures == []
    module = lightning_module()
    module.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    expected = probe(module.model.eval(), probe_ids()).summary.scalars()
    assert run.last.result.summary.scalars() == pytest.approx(expected, rel=1e-5, abs=1e-7)

    # Refit once more: the final probe is taken again, and it supersedes the earlier one.
    assert attempt(root, ckpt, None, every=5) == 0
    (record_file,) = root.rglob("redundancy.jsonl")
    probes = [r["step"] for r in read_records(record_file) if r["type"] == "probe"]
    assert probes == [0, 5, 10, 15, 20, last]


def test_an_hf_run_whose_collator_raises_exits_1_with_the_background_monitor(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    env = {"PYTHONPATH": f"{FAULTS.parents[1]}:{FAULTS.parent}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(FAULTS / "hf_bad_collator_child.py"), str(tmp_path), "background"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-2000:]  # as without the monitor (not 134)
    assert "ValueError: the user's collator failed" in done.stderr
    assert "terminate called" not in done.stderr
    # The probe was still running at exit (else this test would prove nothing).
    assert "exiting while the probe of step 0 runs" in done.stderr
