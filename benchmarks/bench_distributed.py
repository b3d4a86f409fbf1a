"""Probe wall time with 1 and with 2 processes (gloo) on the same model and batch.

    python benchmarks/bench_distributed.py          # ~2 minutes on 2 CPU cores

Each process uses one thread, so the 2-process run uses the same cores as two
single-thread probes would. Prints the median of 3 timed probes per setting and the
ratio (goal: 2 processes <= 0.6x the time of 1). The single-process run with 2 threads
is printed too, for reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from bench_probe import build, batch
from redundancy_monitor.monitoring.ranks import probe_across_ranks
threads, layers = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
if "RANK" in __import__("os").environ:
    dist.init_process_group("gloo")
model = build(layers)
ids = batch(4, 128)
probe_across_ranks(model, ids[:, :16])  # warm-up
times = []
for _ in range(3):
    if dist.is_initialized():
        dist.barrier()
    t = time.perf_counter()
    probe_across_ranks(model, ids, pairs="adjacent")
    times.append(time.perf_counter() - t)
if not dist.is_initialized() or dist.get_rank() == 0:
    print("RESULT", json.dumps(sorted(times)[1]))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, threads: int, layers: int) -> float:
    here = Path(__file__).parent
    script = Path(tempfile.mkdtemp()) / "dist_worker.py"
    script.write_text(WORKER)
    try:
        if nproc == 1:
            cmd = [sys.executable, str(script)]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1",
                f"--master_port={free_port()}",
                str(script),
            ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(
            [*cmd, str(here), str(threads), str(layers)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=True,
        )
    finally:
        script.unlink(missing_ok=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.split(" ", 1)[1])


def main() -> None:
    layers = 12
    one = run(1, 1, layers)
    two = run(2, 1, layers)
    one_two_threads = run(1, 2, layers)
    print(f"model: GPT-NeoX {layers} layers, hidden 384, batch 4 x 128, adjacent pairs")
    print(f"1 process  x 1 thread : {one:7.2f} s")
    print(f"2 processes x 1 thread: {two:7.2f} s   ratio {two / one:.2f} (goal <= 0.6)")
    print(
        f"1 process  x 2 threads: {one_two_threads:7.2f} s   2 processes / this: {two / one_two_threads:.2f}"
    )


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"(benchmark took {time.perf_counter() - t:.0f} s)")
