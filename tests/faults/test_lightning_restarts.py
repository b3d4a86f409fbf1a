"""A Lightning run killed with SIGKILL five times at seeded moments, each restart resuming
from the last checkpoint, every path at its default: the monitor's records read back
(and `report` draws them) as one trajectory equal to a straight run's."""

from __future__ import annotations

import random
import re
import signal
import sys
from pathlib import Path

import pytest
from lightning_restart_child import BATCHES_PER_EPOCH, EPOCHS, attempt

from redundancy_monitor.tools.cli import main
from redundancy_monitor.tools.records import load_run

pytest.importorskip("lightning")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")

HOOKS = ("batch_end", "before_optimizer_step", "mid_record")
LAST_STEP = BATCHES_PER_EPOCH * EPOCHS


def last_checkpoint(root: Path) -> tuple[int, Path] | None:
    """The checkpoint with the highest step anywhere under `root` (Lightning writes each
    attempt's into that attempt's own version_N/checkpoints)."""
    found = [(int(re.search(r"step=(\d+)", p.name).group(1)), p) for p in root.rglob("*.ckpt")]
    return max(found, default=None)


def test_five_kills_and_resumes_with_default_paths_read_back_as_the_straight_run(tmp_path):
    straight = tmp_path / "straight"
    assert attempt(straight) == 0

    rng = random.Random(12)
    root = tmp_path / "killed"
    ckpt, kills = None, []
    for _ in range(5):
        start = 0 if ckpt is None else ckpt[0]
        # The first kill lands after the first checkpoint (epoch 0 ends at step 4), so
        # every restart has one to resume from.
        low = BATCHES_PER_EPOCH + 1 if ckpt is None else start + 1
        kill = (rng.randint(low, min(start + 2 * BATCHES_PER_EPOCH, LAST_STEP)), rng.choice(HOOKS))
        kills.append(kill)
        assert attempt(root, None if ckpt is None else ckpt[1], kill) == -signal.SIGKILL, kill
        ckpt = last_checkpoint(root)
        assert ckpt is not None and ckpt[0] >= start
    assert attempt(root, ckpt[1]) == 0

    versions = sorted(p.name for p in (root / "lightning_logs").iterdir())
    assert versions == [f"version_{k}" for k in range(6)]  # a new logger folder per attempt
    record_files = list(root.rglob("*.jsonl"))
    assert record_files == [root / "lightning_logs" / "version_0" / "redundancy.jsonl"], kills

    assert main(["report", str(root), "--out", str(tmp_path / "report.html")]) == 0
    resumed, expected = load_run(root), load_run(straight)
    assert resumed.steps == expected.steps == list(range(0, LAST_STEP + 1, 2))
    assert resumed.baselines == [] and len(resumed.segments()) == 1
    for got, want in zip(resumed.probes, expected.probes, strict=True):
        assert got.result.summary.scalars() == pytest.approx(
            want.result.summary.scalars(), rel=1e-5, abs=1e-7
        ), got.step
    assert [(a.step, a.rule) for a in resumed.alerts] == [(a.step, a.rule) for a in expected.alerts]
    assert resumed.alerts  # the rules fired, so a double count would show
    assert resumed.failures == expected.failures == []
