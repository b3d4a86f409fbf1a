"""Pretrain a small Pythia-style GPT-NeoX with Lightning and watch its layer redundancy.

The corpus is the Python standard library's own source and docstrings (present wherever
Python is), the tokenizer a byte-level BPE trained on it on the spot: nothing downloads.

    python examples/pretrain_lightning.py            # a few minutes on 2 CPU cores
    tensorboard --logdir runs/demo_lightning          # the printed folder
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import lightning.pytorch as L
import torch
from transformers import AutoModelForCausalLM

from redundancy_monitor import AlertConfig, ProbeConfig, ProbeSchedule
from redundancy_monitor.demo import demo_data, pythia_config, trajectory_table
from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback


class CausalLM(L.LightningModule):
    def __init__(self, config, lr: float, warmup: int, steps: int):
        super().__init__()
        self.model = AutoModelForCausalLM.from_config(config)
        self.lr, self.warmup, self.steps = lr, warmup, steps

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / self.warmup) * max(0.1, 1 - s / self.steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--every", type=int, default=40, help="probe every N steps")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default="runs/demo_lightning")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    started = time.perf_counter()
    data = demo_data(seq_len=args.seq_len)
    print(
        f"corpus: {len(data.train_ids)} rows of {args.seq_len} tokens, tokenizer "
        f"vocab {data.vocab_size} ({time.perf_counter() - started:.1f}s)"
    )
    config = pythia_config(data.vocab_size, args.layers, args.width, args.seq_len)
    module = CausalLM(config, args.lr, warmup=max(1, args.steps // 20), steps=args.steps)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.train_ids),
        batch_size=args.batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    monitor = RedundancyMonitorCallback(
        data.probe_ids,
        schedule=ProbeSchedule(every_n_steps=args.every),
        probe_config=ProbeConfig(pairs="window:2"),
        alerts=AlertConfig(),  # the defaults: alerts on change since the first probe
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        default_root_dir=args.out,
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    mon = monitor.monitor
    print(
        f"\ntrained {trainer.global_step} steps in {time.perf_counter() - started:.0f}s; "
        f"{mon.n_probes} probes, {mon.n_skipped_busy} skipped while busy, "
        f"{mon.n_failures} failed, {len(mon.alerts)} alerts"
    )
    print("\nprotocol gap trajectory (nats; gap = d_repl - d_int over pairs |i-j| <= 2):")
    print(trajectory_table(mon.history, every=max(1, len(mon.history) // 12)))
    for alert in mon.alerts:
        print(f"alert [{alert.rule}] {alert.message}")
    print(f"\nTensorBoard logs: {os.path.abspath(monitor.tensorboard_dir)}")
    print(f"  view with: tensorboard --logdir {os.path.abspath(monitor.tensorboard_dir)}")
    print(f"JSON Lines records: {os.path.abspath(monitor.jsonl_file)}")


if __name__ == "__main__":
    main()
