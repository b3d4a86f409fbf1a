"""FSDP2 (`fully_shard`) on 2 CPU ranks (gloo) saving torch.distributed.checkpoint folders.

torchrun --nproc_per_node 2 fsdp2_dcp_save.py OUT_DIR

Trains a tiny GPT-NeoX and saves ``{"model": sharded state dict, "step": n}`` with DCP at
steps 2 and 4 into OUT_DIR/checkpoint/step-<n> (torchtitan's layout); rank 0 also saves
the gathered full weights of each to OUT_DIR/full-step-<n>.pt, for reference.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from training_fixtures import fsdp2_tiny_model, token_loader


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = fsdp2_tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step, (ids,) in enumerate(token_loader(n_seq=32), start=1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (2, 4):
            state = {"model": get_model_state_dict(model), "step": step}
            dcp.save(state, checkpoint_id=out / "checkpoint" / f"step-{step}")
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            if dist.get_rank() == 0:
                torch.save(full, out / f"full-step-{step}.pt")
        if step == 4:
            break
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
