"""Pretrain a small Pythia-style GPT-NeoX with the Hugging Face Trainer, monitor attached.

Same corpus and tokenizer as examples/pretrain_lightning.py (nothing downloads).

    python examples/pretrain_hf_trainer.py
    tensorboard --logdir runs/demo_hf/runs
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from redundancy_monitor import AlertConfig, ProbeConfig, ProbeSchedule
from redundancy_monitor.demo import demo_data, pythia_config, trajectory_table
from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default="runs/demo_hf")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    started = time.perf_counter()
    data = demo_data(seq_len=args.seq_len)
    model = AutoModelForCausalLM.from_config(
        pythia_config(data.vocab_size, args.layers, args.width, args.seq_len)
    )
    monitor = RedundancyMonitorTrainerCallback(
        data.probe_ids,
        schedule=ProbeSchedule(every_n_steps=args.every),
        probe_config=ProbeConfig(pairs="window:2"),
        alerts=AlertConfig(),  # the defaults: alerts on change since the first probe
    )
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="steps",
        save_steps=max(1, args.steps // 2),
        report_to=["tensorboard"],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=Rows(data.train_ids), callbacks=[monitor]
    )
    trainer.train()

    mon = monitor.monitor
    print(
        f"\ntrained {trainer.state.global_step} steps in {time.perf_counter() - started:.0f}s; "
        f"{mon.n_probes} probes, {mon.n_skipped_busy} skipped while busy, "
        f"{mon.n_failures} failed, {len(mon.alerts)} alerts"
    )
    print(trajectory_table(mon.history, every=max(1, len(mon.history) // 12)))
    print(f"\nTensorBoard logs: {os.path.abspath(monitor.tensorboard_dir)}")
    print(f"JSON Lines records: {os.path.abspath(monitor.jsonl_file)}")


if __name__ == "__main__":
    main()
