"""Run folders for report tests: one written by a short real training run with the
monitor attached, and hand-made ones for the edge cases (one probe, failures, NaN)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import VOCAB, tiny_batch, tiny_model

from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.jsonl import JsonlSink
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.schedule import ProbeSchedule
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink
from redundancy_monitor.probing.result import PairRecord, ProbeMeta, ProbeResult, summarize

REPO = Path(__file__).resolve().parents[1]


def train_with_monitor(run_dir: Path, steps: int = 24, n_layers: int = 5) -> RedundancyMonitor:
    """A few real AdamW steps of a tiny Llama with the monitor (inline executor) attached."""
    model = tiny_model("llama", n_layers=n_layers).train()
    ids, _ = tiny_batch(n_seq=2, seq_len=16)
    monitor = RedundancyMonitor(
        ids,
        schedule=ProbeSchedule(every_n_steps=8),
        executor="inline",
        jsonl_path=run_dir / "redundancy.jsonl",
        sinks=[TensorBoardSink(log_dir=run_dir)],
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    monitor.start()
    monitor.step(0, model)
    for step in range(1, steps + 1):
        x = torch.randint(0, VOCAB, (4, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        monitor.before_weights_change()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step, model)
    monitor.train_end(steps, model)
    monitor.close()
    return monitor


def hand_result(d_repl: list[float | None], d_int: list[float | None]) -> ProbeResult:
    """A probe of adjacent pairs (k, k+1) with the given distances (R(i<-j) = R(j<-i))."""
    pairs = [
        PairRecord.build(k, k + 1, r, r, i)
        for k, (r, i) in enumerate(zip(d_repl, d_int, strict=True))
    ]
    meta = ProbeMeta(n_layers=len(d_repl) + 1, model_class="HandMade", batch_sha256="ab" * 32)
    return ProbeResult(pairs, summarize(pairs), meta=meta)


def write_records(run_dir: Path, probes=(), alerts=(), failures=()) -> Path:
    """Write records through the real `JsonlSink`; probes are ``(step, ProbeResult)``."""
    sink = JsonlSink(run_dir / "redundancy.jsonl")
    for step, result in probes:
        sink.write_probe(ProbeRecord(step, result, probe_seconds=0.5, blocked_seconds=0.01))
    for alert in alerts:
        sink.write_alert(alert)
    for step, error in failures:
        sink.write_failure(step, error)
    sink.close()
    return run_dir / "redundancy.jsonl"


def an_alert(step: int) -> Alert:
    return Alert(step, "gap_threshold", 0.2, 0.1, f"step {step}: gap_median is above 0.1")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``redundancy-monitor args`` (the installed console script) in a subprocess, with
    this worktree first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    script = shutil.which("redundancy-monitor")
    command = [script] if script else [sys.executable, "-m", "redundancy_monitor.tools.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=240)
