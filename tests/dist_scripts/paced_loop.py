"""A plain DDP-style loop on 2 CPU ranks (gloo) with a `max_overhead` schedule: the
ranks' own clocks differ (rank 1 sleeps longer per step), rank 0 decides for both.

torchrun --nproc_per_node 2 paced_loop.py OUT_DIR

Each rank writes its probed steps and skip count to OUT_DIR/rank<r>.json.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import tiny_model
from training_fixtures import probe_ids

from redundancy_monitor import ProbeSchedule, RedundancyMonitor


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model = tiny_model("gpt_neox", 4)
    schedule = ProbeSchedule(1, log_spaced=False, at_train_end=False, max_overhead=0.3)
    monitor = RedundancyMonitor(probe_ids(), schedule=schedule, executor="background")
    monitor.start()
    for step in range(60):
        monitor.step(step, model)
        time.sleep(0.01 * (1 + 2 * rank))  # rank 1's steps look three times as long
    monitor.train_end(60, model)
    monitor.close()
    report = {"probed": monitor.probed_steps, "skipped": monitor.n_skipped_busy}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
