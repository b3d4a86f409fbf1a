"""FSDP2 (`fully_shard`) on 2 CPU ranks (gloo), a plain training loop, the core monitor.

torchrun --nproc_per_node 2 fsdp2_loop.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import tiny_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from training_fixtures import probe_ids, token_loader

from redundancy_monitor import RedundancyMonitor


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = tiny_model("gpt_neox", 4).train()
    for block in model.gpt_neox.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = RedundancyMonitor(
        probe_ids(),
        every_n_steps=3,
        log_spaced=False,
        pairs="window:2",
        jsonl_path=out / "redundancy.jsonl",
    )
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
