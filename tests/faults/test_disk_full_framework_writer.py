"""A full disk (here a file size limit: "File too large") while the monitor writes beside
Lightning's TensorBoardLogger or the HF Trainer's TensorBoard writer never changes how the
run ends: `trainer.fit()` / `trainer.train()` returns as it does without the monitor, and
the monitor counts and alerts its own failed writes.

The monitor's TensorBoard events go to a run of their own (``<logger dir>/redundancy``):
a writer's background thread dies at its first failed write and every later call on it
raises, the logger's ``finalize()`` included (the Trainer's next log, mid-run), so a
shared writer would carry our failure into the framework's run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fault_fixtures import event_accumulator

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
LIMIT = 30_000  # bytes per file: the monitor's heatmaps pass it within a few probes


def start(tmp_path: Path, mode: str, framework: str) -> subprocess.Popen:
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


@pytest.mark.parametrize("framework", ["lightning", "hf"])
def test_file_too_large_while_the_monitor_writes_never_changes_how_the_run_ends(
    tmp_path, framework
):
    children = {mode: start(tmp_path, mode, framework) for mode in ("monitor", "none")}
    with_monitor, without = outcome(children["monitor"]), outcome(children["none"])
    assert without["ended"] == "ok"  # the limit alone does not break the framework's run
    assert with_monitor["ended"] == "ok"  # ... and neither does the monitor under it
    # Our writes did fail, and that was counted and alerted, not raised.
    assert with_monitor["n_sink_errors"] > 0
    assert "sink_failure" in with_monitor["alerts"]
    assert with_monitor["n_probes"] == 7  # steps 0..6: every probe ran, training went on
    ours = Path(with_monitor["tensorboard_dir"])
    theirs = ours.parent  # a run of its own, beside the framework's
    if framework == "lightning":
        assert theirs == tmp_path / "monitor" / "tb" / "version_0"
    assert ours.name == "redundancy"
    assert max(p.stat().st_size for p in ours.glob("events.out.tfevents.*")) == LIMIT
    # The framework's own event file is whole and readable; ours holds what fitted.
    assert event_accumulator(theirs).Tags() is not None
    assert event_accumulator(ours).Scalars("redundancy/gap_mean")
