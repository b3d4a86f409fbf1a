"""FSDP2 (`fully_shard`) on 2 CPU ranks (gloo), a plain training loop, the core monitor.

torchrun --nproc_per_node 2 fsdp2_loop.py OUT_DIR [SHADOW_DEVICE [EXECUTOR [FAIL]]]

SHADOW_DEVICE: "default" (device on CPU) or "host"; EXECUTOR: "background" or "inline";
FAIL: "snapshot:RANK" or "shards:RANK" makes that rank's second snapshot, or its shards
sent for the second snapshot's probe, fail once.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from training_fixtures import fsdp2_tiny_model, probe_ids, token_loader

from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor
from redundancy_monitor.monitoring.sharded import HostShards


def inject_failure(monitor, what: str, rank: int) -> None:
    """Make `rank`'s second snapshot (or its shards for that snapshot's probe) fail."""
    captures = [0]
    capture = monitor._shadow.capture

    def counting_capture(*args, **kwargs):
        captures[0] += 1
        if what == "snapshot" and captures[0] == 2 and dist.get_rank() == rank:
            raise RuntimeError(f"injected snapshot failure on rank {rank}")
        return capture(*args, **kwargs)

    monitor._shadow.capture = counting_capture
    part = HostShards.part

    def failing_part(self, *args, **kwargs):
        if what == "shards" and captures[0] == 2 and dist.get_rank() == rank:
            raise RuntimeError(f"injected shard failure on rank {rank}")
        return part(self, *args, **kwargs)

    HostShards.part = failing_part


def main() -> None:
    out = Path(sys.argv[1])
    shadow_device = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "default" else None
    executor = sys.argv[3] if len(sys.argv) > 3 else "background"
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = fsdp2_tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = RedundancyMonitor(
        probe_ids(),
        schedule=ProbeSchedule(3, log_spaced=False),
        probe_config=ProbeConfig(pairs="window:2"),
        jsonl_path=out / "redundancy.jsonl",
        shadow_device=shadow_device,
        executor=executor,
    )
    if len(sys.argv) > 4:
        what, rank = sys.argv[4].split(":")
        inject_failure(monitor, what, int(rank))
    monitor.start()
    before = torch.get_rng_state()
    monitor.step(0, model)  # builds the unsharded copy: its init must not draw for training
    rng_untouched = torch.equal(before, torch.get_rng_state())
    step = 0
    for (ids,) in token_loader(n_seq=64):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monitor.before_weights_change()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        monitor.step(step, model)
        if step == 7:
            break
    monitor.train_end(step, model)
    monitor.close()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "probes": monitor.n_probes,
                "failures": monitor.n_failures,
                "rng_untouched": rng_untouched,
            }
        )
    )
    if rank == 0:
        torch.save(full, out / "final.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
