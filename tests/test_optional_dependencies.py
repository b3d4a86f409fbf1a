"""The probe needs only torch, numpy, tensorboard and tqdm: Lightning, transformers,
accelerate and matplotlib are extras. Each test runs a fresh interpreter in which a
`sys.meta_path` finder makes those packages impossible to import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

BLOCKER = """
import sys

BLOCKED = {"lightning", "pytorch_lightning", "transformers", "accelerate", "matplotlib"}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""

PLAIN_MODEL = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.mlp(x)


class PlainLM(nn.Module):
    def __init__(self, vocab=40, width=16, n_layers=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.stack = nn.ModuleList(Block(width) for _ in range(n_layers))
        self.out = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.stack:
            h = block(h)
        return self.out(h)


torch.manual_seed(0)
model = PlainLM()
ids = torch.randint(0, 40, (2, 6))
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def test_probe_and_monitor_work_without_lightning_transformers_or_matplotlib():
    done = run_blocked(
        PLAIN_MODEL
        + """
import redundancy_monitor as rm

result = rm.probe(model, ids, blocks="stack", head="out", pairs="all")
print("pairs", len(result.pairs), "finite", result.summary.n_finite)
monitor = rm.RedundancyMonitor(
    ids,
    probe_config=rm.ProbeConfig(blocks="stack", head="out"),
    executor="inline",
    schedule=rm.ProbeSchedule(None, steps=(0,)),
)
monitor.step(0, model)
monitor.close()
print("monitor probes", monitor.n_probes, "failures", monitor.n_failures)
print("loaded", sorted({m.split(".")[0] for m in sys.modules} & BLOCKED))
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "pairs 6 finite 6",
        "monitor probes 1 failures 0",
        "loaded []",
    ]


def test_a_callback_without_its_framework_names_the_extra_to_install():
    done = run_blocked(
        """
import redundancy_monitor as rm

for name in ("RedundancyMonitorCallback", "RedundancyMonitorTrainerCallback"):
    try:
        getattr(rm, name)
    except rm.RedundancyMonitorError as exc:
        print(type(exc).__name__, isinstance(exc, ImportError), exc)
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "MissingDependencyError True RedundancyMonitorCallback needs lightning, which is not "
        "installed; install it with: pip install 'redundancy-monitor[lightning]'",
        "MissingDependencyError True RedundancyMonitorTrainerCallback needs transformers, "
        "which is not installed; install it with: pip install 'redundancy-monitor[hf]'",
    ]


def test_score_without_transformers_exits_2_naming_the_extra(tmp_path):
    done = run_blocked(
        f"""
from redundancy_monitor.tools.cli import main

raise SystemExit(main(["score", {str(tmp_path)!r}, "--text", "-"]))
"""
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "redundancy-monitor score: error: redundancy-monitor score needs transformers, which "
        "is not installed; install it with: pip install 'redundancy-monitor[hf]'"
    ]


def test_selection_alerts_and_report_import_without_torch():
    """The removal selection is pure: the alert rules and the report reach it without
    loading torch (or the engine)."""
    done = run_blocked(
        """
import redundancy_monitor.monitoring.alerts
import redundancy_monitor.removal.selection
import redundancy_monitor.tools.report

print(sorted(m for m in ("torch", "redundancy_monitor.probing.engine") if m in sys.modules))
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
