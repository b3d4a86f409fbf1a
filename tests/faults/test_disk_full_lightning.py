"""A full disk (here a file size limit: "File too large") while the monitor writes beside
Lightning's TensorBoardLogger never changes how the run ends: `trainer.fit()` returns as
it does without the monitor, and the monitor counts and alerts its own failed writes.

The monitor's TensorBoard events go to a run of their own (``<logger dir>/redundancy``):
a writer's background thread dies at its first failed write and every later call on it
raises, the logger's ``finalize()`` included, so a shared writer would carry our failure
into Lightning's shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fault_fixtures import event_accumulator

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
LIMIT = 30_000  # bytes per file: the monitor's heatmaps pass it within a few probes


def start(tmp_path: Path, mode: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "file_size_limit_child.py"),
            str(tmp_path / mode),
            str(LIMIT),
            mode,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_file_too_large_while_the_monitor_writes_never_changes_how_fit_ends(tmp_path):
    children = {mode: start(tmp_path, mode) for mode in ("monitor", "none")}  # side by side
    with_monitor, without = outcome(children["monitor"]), outcome(children["none"])
    assert without["ended"] == "ok"  # the limit alone does not break Lightning's run
    assert with_monitor["ended"] == "ok"  # ... and neither does the monitor under it
    # Our writes did fail, and that was counted and alerted, not raised.
    assert with_monitor["n_sink_errors"] > 0
    assert "sink_failure" in with_monitor["alerts"]
    assert with_monitor["n_probes"] == 7  # steps 0..6: every probe ran
    ours = Path(with_monitor["tensorboard_dir"])
    logger_dir = tmp_path / "monitor" / "tb" / "version_0"
    assert ours == logger_dir / "redundancy"  # a run of its own, beside the logger's
    assert max(p.stat().st_size for p in ours.glob("events.out.tfevents.*")) == LIMIT
    # Lightning's own event file is whole and readable; ours holds what fitted.
    assert event_accumulator(logger_dir).Tags() is not None
    assert event_accumulator(ours).Scalars("redundancy/gap_mean")
