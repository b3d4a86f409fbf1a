"""An HF Trainer run whose own code raises (a collator that fails on the first batch),
with the monitor attached (for test_adapter_faults.py).

    PYTHONPATH=tests python tests/faults/hf_bad_collator_child.py OUT EXECUTOR|none

The process must end as the same run without the monitor does: the traceback and exit 1.
"""

from __future__ import annotations

import logging
import sys

import torch
import transformers
from conftest import tiny_model
from training_fixtures import TokenDataset, probe_ids

from redundancy_monitor import ProbeSchedule
from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback


def bad_collator(rows):
    raise ValueError("the user's collator failed")


def main() -> None:
    out, executor = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    callbacks = []
    if executor != "none":
        # A big enough probe batch that the step-0 probe is still running when the first
        # batch's collator raises.
        ids = probe_ids().repeat(16, 4)
        callbacks.append(
            RedundancyMonitorTrainerCallback(
                ids, schedule=ProbeSchedule(1), executor=executor, jsonl_path=False
            )
        )
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_steps=4,
    )
    trainer = transformers.Trainer(
        model=tiny_model("llama", 8).train(),
        args=args,
        train_dataset=TokenDataset(),
        data_collator=bad_collator,
        callbacks=callbacks,
    )
    trainer.train()


if __name__ == "__main__":
    main()
