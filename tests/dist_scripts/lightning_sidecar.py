"""A Lightning run that saves a checkpoint every EVERY steps and acts on a sidecar's alerts.

    python lightning_sidecar.py OUT_DIR DEVICES MAX_STEPS EVERY SLEEP [WRITE_ALERT_AT]

OUT_DIR holds the model's config.json beforehand. Checkpoints go to OUT_DIR/checkpoints;
the sidecar's log folder is OUT_DIR/redundancy (watch's default for that layout). Each
step sleeps SLEEP seconds, a run slow enough for a sidecar to keep up with. With
WRITE_ALERT_AT, rank 0 appends an alert to the sidecar's record file after that step,
standing in for the sidecar. Every rank writes summary-rank<r>.json at train end.
"""

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoConfig, AutoModelForCausalLM

from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback
from redundancy_monitor.monitoring.alerts import Alert
from redundancy_monitor.monitoring.jsonl import JsonlSink
from redundancy_monitor.monitoring.schedule import ProbeSchedule

OUT = Path(sys.argv[1])
DEVICES, MAX_STEPS, EVERY = (int(x) for x in sys.argv[2:5])
SLEEP = float(sys.argv[5])
WRITE_ALERT_AT = int(sys.argv[6]) if len(sys.argv) > 6 else None


class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(OUT))

    def training_step(self, batch, batch_idx):
        time.sleep(SLEEP)
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class StandInSidecar(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and trainer.global_step == WRITE_ALERT_AT:
            sink = JsonlSink(OUT / "redundancy" / "redundancy.jsonl")
            sink.write_alert(Alert(1, "gap_threshold", 0.5, 0.1, "written by the stand-in"))
            sink.close()


class Summary(L.Callback):
    def __init__(self, monitor: RedundancyMonitorCallback):
        self.monitor = monitor

    def on_train_end(self, trainer, pl_module):
        summary = {
            "global_step": trainer.global_step,
            "should_stop": trainer.should_stop,
            "alerts": [[a.step, a.rule] for a in self.monitor.sidecar.alerts],
        }
        (OUT / f"summary-rank{trainer.global_rank}.json").write_text(json.dumps(summary))


def main() -> None:
    torch.set_num_threads(1)
    vocab = AutoConfig.from_pretrained(OUT).vocab_size
    data = torch.randint(0, vocab, (4 * MAX_STEPS, 16), generator=torch.Generator().manual_seed(1))
    monitor = RedundancyMonitorCallback(
        sidecar=OUT / "redundancy",
        schedule=ProbeSchedule(2 if WRITE_ALERT_AT else 1, log_spaced=False),
        stop_on_alert=True,
        checkpoint_on_alert=["gap_threshold"],
    )
    callbacks = [StandInSidecar()] if WRITE_ALERT_AT else []
    callbacks += [
        monitor,
        Summary(monitor),
        ModelCheckpoint(dirpath=OUT / "checkpoints", every_n_train_steps=EVERY, save_top_k=-1),
    ]
    trainer = L.Trainer(
        default_root_dir=str(OUT),
        callbacks=callbacks,
        accelerator="cpu",
        devices=DEVICES,
        strategy="ddp" if DEVICES > 1 else "auto",
        max_steps=MAX_STEPS,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(TinyLM(), torch.utils.data.DataLoader(data, batch_size=4))


if __name__ == "__main__":
    main()
