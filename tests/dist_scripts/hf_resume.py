"""One phase of an HF Trainer run that is interrupted and resumed in a new process.

    python hf_resume.py FOLDER PHASE FLAG     (PHASE: straight | crash | resume; FLAG: 0 | 1)

`straight` trains 8 steps; `crash` saves at step 4 and dies at step 7; `resume` starts
from checkpoint-4 in this new process, with `restore_callback_states_from_checkpoint`
= FLAG. Each phase that ends writes the monitor's steps and history to monitor.json.
"""

import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_model
from training_fixtures import TokenDataset, probe_ids

from redundancy_monitor import AlertConfig, ProbeSchedule
from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback


class CrashAt(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise SystemExit(0)  # the process dies; the checkpoint at step 4 remains


REBUILDS: list[str] = []  # restore tokens the Trainer rebuilt the callback from
_real_new = RedundancyMonitorTrainerCallback.__new__


def _counting_new(cls, *args, **kwargs):
    if "restore_token" in kwargs:
        REBUILDS.append(kwargs["restore_token"])
    return _real_new(cls, *args, **kwargs)


RedundancyMonitorTrainerCallback.__new__ = staticmethod(_counting_new)


def main() -> None:
    folder, phase, flag = Path(sys.argv[1]), sys.argv[2], bool(int(sys.argv[3]))
    torch.set_num_threads(1)
    callback = RedundancyMonitorTrainerCallback(
        probe_ids(),
        schedule=ProbeSchedule(3, log_spaced=False),
        executor="inline",
        alerts=AlertConfig(gap_threshold=0.0, hysteresis=2),
    )
    args = transformers.TrainingArguments(
        output_dir=str(folder / "out"),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no" if phase == "straight" else "steps",
        save_steps=4,
        restore_callback_states_from_checkpoint=flag,
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        max_steps=8,
    )
    callbacks = [callback, CrashAt()] if phase == "crash" else [callback]
    trainer = transformers.Trainer(
        model=tiny_model("llama", 4).train(),
        args=args,
        train_dataset=TokenDataset(),
        callbacks=callbacks,
    )
    if phase == "resume":
        trainer.train(resume_from_checkpoint=str(folder / "out" / "checkpoint-4"))
    else:
        trainer.train()
    used = next(
        cb
        for cb in trainer.callback_handler.callbacks
        if isinstance(cb, RedundancyMonitorTrainerCallback)
    )
    (folder / "monitor.json").write_text(
        json.dumps(
            {
                "probed_steps": used.monitor.probed_steps,
                "history": [r.to_dict() for r in used.monitor.history],
                "rebuilt": bool(REBUILDS),
                "same_object": used is callback,
            }
        )
    )


if __name__ == "__main__":
    main()
