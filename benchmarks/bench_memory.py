"""The monitor's memory, side by side: device shadow, host shadow, FSDP2 host shards.

For one 12-layer GPT-NeoX (width 512, vocabulary 4096: the embeddings and head are a
tenth of the weights, as in large models; at 7B they are a few percent) it prints, for
``shadow_device="device"`` and ``"host"``: the bytes the shadow holds in host memory and
on the device, and the peak device bytes of one probe; then the host bytes each rank's
shadow holds under FSDP2 with 2 processes (gloo, host snapshot; rank 0 probes once).

    python benchmarks/bench_memory.py            # ~9 minutes on 2 shared CPU cores
    python benchmarks/bench_memory.py --quick    # a shorter probe batch

Device bytes: on CUDA the probe's peak is what its private allocator pool reserved
(weights it streamed, activations, logits); on CPU it is the streamer's own count of the
weights it held (activations not counted), and a device shadow holds its copy in the
training device's memory, which is the CPU. The last line is

    host_device_ratio=<x> fsdp2_rank_ratio=<y>

x: device bytes of the monitor with "host" (shadow + probe peak) / the model's bytes;
y: the largest per-rank shadow under FSDP2 / the model's bytes (goals: x <= 0.35,
y <= 0.6). The model's bytes are its parameters and buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

N_LAYERS = 12

WORKER = r"""
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from bench_memory import build, measure
dist.init_process_group("gloo")
torch.set_num_threads(1)
model = build()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for block in model.gpt_neox.layers:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
meta = measure(model, "host", int(sys.argv[3]))
out = {"rank": dist.get_rank(), "meta": meta}
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def build():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=4096,
        hidden_size=512,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure(model, shadow_device: str, seq_len: int) -> dict:
    """Snapshot at step 0, probe after one (empty) optimizer step; the probe record's meta."""
    from redundancy_monitor import ProbeSchedule, RedundancyMonitor
    from redundancy_monitor.monitoring.sinks import Sink

    kept: dict = {}

    class Keep(Sink):
        def write_probe(self, record) -> None:
            kept.update(record.result.meta.to_dict(), probe_seconds=record.probe_seconds)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (4, seq_len), generator=g)
    monitor = RedundancyMonitor(
        ids,
        executor="inline",
        schedule=ProbeSchedule(None, steps=(0,), at_train_end=False),
        shadow_device=shadow_device,
        sinks=[Keep()],
    )
    monitor.start()
    monitor.step(0, model)
    monitor.before_weights_change()  # (no weights change here)
    monitor.step(1, model)
    monitor.drain()  # with several ranks, gathers the outcome (a collective)
    monitor.close()
    if monitor.n_failures:
        raise RuntimeError(f"the {shadow_device} probe failed; see the log above")
    return kept


def fsdp2_probe_meta(seq_len: int) -> dict:
    here = Path(__file__).parent
    out = Path(tempfile.mkdtemp())
    script = out / "fsdp2_worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(script),
        str(here),
        str(out),
        str(seq_len),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads((out / "rank0.json").read_text())["meta"]  # rank 0 writes records


def mb(n: int) -> str:
    return f"{n / 1e6:8.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="probe 4 x 32 tokens, not 4 x 128")
    args = parser.parse_args()
    seq_len = 32 if args.quick else 128
    model = build()
    total = model_bytes(model)
    blocks = model.gpt_neox.layers
    one_block = model_bytes(blocks[0])
    non_block = total - model_bytes(blocks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"model: GPT-NeoX, {N_LAYERS} layers, {mb(total).strip()} (fp32) on {device}; "
        f"embeddings+head+norms {non_block / total:.1%}, one block {one_block / total:.1%}"
    )
    print(
        f"{'shadow_device':<14}{'shadow host':>12}{'shadow device':>15}"
        f"{'probe peak':>13}{'device/model':>14}{'probe s':>9}"
    )
    ratios = {}
    for where in ("device", "host"):
        meta = measure(build().to(device), where, seq_len)
        device_bytes = meta["shadow_device_bytes"] + meta["probe_device_peak_bytes"]
        ratios[where] = device_bytes / total
        print(
            f"{where:<14}{mb(meta['shadow_host_bytes'])}{mb(meta['shadow_device_bytes']):>15}"
            f"{mb(meta['probe_device_peak_bytes']):>13}{ratios[where]:>14.3f}"
            f"{meta['probe_seconds']:>9.1f}"
        )
    print(
        "  (probe peak: "
        + (
            "the probe's private allocator pool"
            if device == "cuda"
            else "weights the streamer held; activations not counted on CPU"
        )
        + ")"
    )
    fsdp2 = fsdp2_probe_meta(seq_len)
    by_rank = fsdp2["shadow_host_bytes_by_rank"]
    rank_ratio = max(by_rank) / total
    print(
        "FSDP2, 2 processes (CPU, gloo), host snapshot: shadow host bytes "
        + ", ".join(f"rank {r} {mb(b).strip()} ({b / total:.3f}x)" for r, b in enumerate(by_rank))
        + f"; rank 0 probe peak {mb(fsdp2['probe_device_peak_bytes']).strip()}, "
        f"{fsdp2['probe_seconds']:.1f} s"
    )
    print(f"host_device_ratio={ratios['host']:.3f} fsdp2_rank_ratio={rank_ratio:.3f}")


if __name__ == "__main__":
    main()
