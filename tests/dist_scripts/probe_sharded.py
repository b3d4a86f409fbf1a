"""Run under torchrun: every rank probes its share; rank 0 writes the merged result."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import tiny_batch, tiny_model

from redundancy_monitor.monitoring.ranks import probe_across_ranks

dist.init_process_group("gloo")
torch.set_num_threads(1)
model = tiny_model("llama", n_layers=6)
ids, mask = tiny_batch(padding="left")
result = probe_across_ranks(
    model, ids, mask, pairs="window:2", protocols=("replacement", "interchange", "deletion")
)
if dist.get_rank() == int(sys.argv[2]):
    Path(sys.argv[1]).write_text(json.dumps(result.to_dict()))
dist.barrier()
dist.destroy_process_group()
