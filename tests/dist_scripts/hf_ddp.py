"""A 2-rank Hugging Face Trainer run on CPU (gloo), launched with torchrun.

    torchrun --nproc_per_node 2 hf_ddp.py OUT_DIR MODE     (MODE: plain | stop | stop-rank0)

Rank 0 writes the final weights and, per rank, the global step reached; `stop` asks
every rank to stop on the first alert (a rank that did not stop would hang DDP);
`stop-rank0` does the same with rank 0 probing alone (distributed=False). The Trainer
reports to TensorBoard in OUT_DIR/runs.
"""

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from conftest import tiny_model
from training_fixtures import TokenDataset, probe_ids

from redundancy_monitor import AlertConfig, ProbeConfig, ProbeSchedule
from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    extra = {}
    if mode.startswith("stop"):
        extra = dict(
            alerts=AlertConfig(gap_threshold=-10.0, growth_factor=None, hysteresis=2),
            stop_on_alert=True,
        )
    if mode == "stop-rank0":
        extra.update(distributed=False, executor="inline")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "runs")
    callback = RedundancyMonitorTrainerCallback(
        probe_ids(),
        schedule=ProbeSchedule(2, log_spaced=False),
        probe_config=ProbeConfig(pairs="window:2"),
        log_dir=str(out / "tb"),
        **extra,
    )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        report_to=["tensorboard"],
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        max_steps=8,
    )
    model = tiny_model("gpt_neox", 4).train()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(n_seq=96), callbacks=[callback]
    )
    trainer.train()
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "global_step": trainer.state.global_step,
                "probes": callback.monitor.n_probes,
                "alerts": [a.rule for a in callback.monitor.alerts],
            }
        )
    )
    if rank == 0:
        torch.save(model.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main()
