"""One attempt of a Lightning run with the monitor at its default paths, killed with
SIGKILL at a chosen moment (for test_lightning_restarts.py).

    PYTHONPATH=tests python tests/faults/lightning_restart_child.py ROOT CKPT|- KILL_STEP|- HOOK

HOOK is where the kill lands once ``global_step`` reaches KILL_STEP: ``batch_end``
(after the monitor's hook of that step), ``before_optimizer_step`` (inside the next
step, before the weights change), ``mid_record`` (halfway through writing the next
probe record, leaving a cut line) or ``train_end_probe`` (inside the probe of the final
weights that the monitor takes when training ends).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from training_fixtures import lightning_module, lightning_trainer, probe_ids

from redundancy_monitor import AlertConfig, ProbeSchedule
from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

BATCHES_PER_EPOCH = 4
EPOCHS = 6


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Killer(Callback):
    """SIGKILL this process at `hook` once the step reaches `step`."""

    def __init__(self, step: int, hook: str):
        self.step, self.hook, self.armed = step, hook, False

    def on_train_batch_start(self, trainer, *args):
        if self.hook == "mid_record" and trainer.global_step + 1 >= self.step and not self.armed:
            self.armed = True
            arm_mid_record_kill()

    def on_before_optimizer_step(self, trainer, *args):
        if self.hook == "before_optimizer_step" and trainer.global_step + 1 >= self.step:
            die()

    def on_train_batch_end(self, trainer, *args):
        if self.hook == "batch_end" and trainer.global_step >= self.step:
            die()

    def on_train_end(self, trainer, *args):  # runs before the monitor's (listed first)
        if self.hook == "train_end_probe" and trainer.global_step >= self.step:
            import redundancy_monitor.monitoring.monitor as monitor_module

            def dying_probe(*args, **kwargs):
                die()

            monitor_module.probe = dying_probe


def arm_mid_record_kill() -> None:
    """The next probe record gets half written, then the process dies."""
    real = os.write

    def dying(fd, data):
        if bytes(data[:16]).startswith(b'{"type":"probe"'):
            real(fd, bytes(data[: len(data) // 2]))
            die()
        return real(fd, data)

    os.write = dying


def callback(every: int = 2) -> RedundancyMonitorCallback:
    return RedundancyMonitorCallback(
        probe_ids(),
        schedule=ProbeSchedule(every, log_spaced=False),
        executor="inline",
        alerts=AlertConfig(gap_threshold=0.0, hysteresis=2, growth_factor=1.5),
    )


def run(
    root: str, ckpt: str | None = None, kill: tuple[int, str] | None = None, every: int = 2
) -> None:
    """Train (or resume from `ckpt`) under `root` with every path at its default, probing
    every `every` steps."""
    from training_fixtures import token_loader

    torch.set_num_threads(1)
    monitor, killer = callback(every), [Killer(*kill)] if kill else []
    # The train-end kill arms itself in on_train_end, so it must come before the monitor's.
    first = kill is not None and kill[1] == "train_end_probe"
    callbacks = [*killer, monitor] if first else [monitor, *killer]
    trainer = lightning_trainer(root, callbacks, max_steps=-1, max_epochs=EPOCHS)
    trainer.fit(
        lightning_module(), token_loader(n_seq=4 * BATCHES_PER_EPOCH, batch_size=4), ckpt_path=ckpt
    )


def attempt(
    root: Path, ckpt: Path | None = None, kill: tuple[int, str] | None = None, every: int = 2
) -> int:
    """One attempt in a child process (forked, so it starts without re-importing torch
    and Lightning); returns its exit code."""
    args = (str(root), None if ckpt is None else str(ckpt), kill, every)
    child = multiprocessing.get_context("fork").Process(target=run, args=args)
    child.start()
    child.join(timeout=300)
    if child.exitcode is None:
        child.kill()
        pytest.fail(f"the attempt {kill} did not finish in 300 s")
    return child.exitcode


if __name__ == "__main__":
    root, ckpt, kill_step, hook = sys.argv[1:5]
    run(
        root,
        None if ckpt == "-" else ckpt,
        None if kill_step == "-" else (int(kill_step), hook),
    )
