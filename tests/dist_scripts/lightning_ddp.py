"""A 2-rank Lightning run on CPU (gloo) with the monitor attached.

    python lightning_ddp.py OUT_DIR STRATEGY

Lightning starts the second rank itself (ddp: a subprocess; ddp_spawn: a spawned
process, hence module-level classes). Rank 0 saves the final weights and the monitor's
counts at train end. With RM_TEST_FAIL=RANK,N the N-th probe on that rank raises. With
RM_TEST_MODE=rank0-alerts rank 0 probes alone (distributed=False), an alert asks for a
stop and a checkpoint, and every rank writes what it saw to rank<r>.json.
"""

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from conftest import tiny_model
from training_fixtures import probe_ids, token_loader

import redundancy_monitor.monitoring.monitor as monitor_module
from redundancy_monitor import AlertConfig, ProbeConfig, ProbeSchedule
from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

FAIL = tuple(int(x) for x in os.environ.get("RM_TEST_FAIL", "-1,-1").split(","))
_real_probe = monitor_module.probe
_calls = [0]


def sometimes_failing(*args, **kwargs):
    _calls[0] += 1
    rank = torch.distributed.get_rank()
    if rank == FAIL[0] and _calls[0] == FAIL[1]:
        raise RuntimeError(f"injected probe failure on rank {rank}")
    return _real_probe(*args, **kwargs)


monitor_module.probe = sometimes_failing  # in every process, spawned ones included


class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_model("gpt_neox", 4).train()

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class SaveAtEnd(L.Callback):
    def __init__(self, out: Path, monitor_callback: RedundancyMonitorCallback):
        self.out, self.monitor_callback = out, monitor_callback

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.model.state_dict(), self.out / "final.pt")
            m = self.monitor_callback.monitor
            counts = {"probes": m.n_probes, "failures": m.n_failures, "world": trainer.world_size}
            (self.out / "summary.json").write_text(json.dumps(counts))


class ReportEveryRank(L.Callback):
    """Counts the collectives the monitor makes to agree on its decisions (the trainer's
    boolean reductions and the monitor's own agreements)."""

    def __init__(self, out: Path, monitor_callback: RedundancyMonitorCallback):
        self.out, self.monitor_callback, self.reductions = out, monitor_callback, 0

    def setup(self, trainer, pl_module, stage):
        from redundancy_monitor.monitoring.control import RankAgreement

        real, real_agree = trainer.strategy.reduce_boolean_decision, RankAgreement.agree

        def counted(*args, **kwargs):
            self.reductions += 1
            return real(*args, **kwargs)

        def counted_agree(agreement, local):
            self.reductions += agreement.group is not None
            return real_agree(agreement, local)

        trainer.strategy.reduce_boolean_decision = counted
        RankAgreement.agree = counted_agree

    def on_train_end(self, trainer, pl_module):
        report = {
            "global_step": trainer.global_step,
            "reductions": self.reductions,
            "alert_dir": self.monitor_callback._alert_dir,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main() -> None:
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    extra = {}
    if os.environ.get("RM_TEST_MODE") == "rank0-alerts":
        extra = dict(
            executor="inline",
            distributed=False,
            alerts=AlertConfig(gap_threshold=-10.0, hysteresis=2),
            stop_on_alert=["gap_threshold"],
            checkpoint_on_alert=["gap_threshold"],
        )
    monitor = RedundancyMonitorCallback(
        probe_ids(),
        **{
            "schedule": ProbeSchedule(4, log_spaced=False),
            "executor": "background",
            "probe_config": ProbeConfig(pairs="window:2"),
            "log_dir": str(out / "tb"),
            "jsonl_path": str(out / "redundancy.jsonl"),
            **extra,
        },
    )
    trainer = L.Trainer(
        default_root_dir=str(out),
        callbacks=[monitor, SaveAtEnd(out, monitor), ReportEveryRank(out, monitor)],
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    torch.manual_seed(0)
    trainer.fit(TinyLM(), token_loader())


if __name__ == "__main__":
    main()
