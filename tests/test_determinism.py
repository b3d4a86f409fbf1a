"""The monitor is invisible to the run it watches: same random numbers, same data order,
same weights bit for bit as an unmonitored run (CPU, fixed seed, dropout on)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import VOCAB, tiny_batch, tiny_config
from training_fixtures import TokenDataset

import redundancy_monitor.probing.engine as engine_module
from redundancy_monitor import ProbeConfig, ProbeSchedule, RedundancyMonitor, probe
from redundancy_monitor.probing.inputs import from_dataloader

EVERY_2 = ProbeSchedule(2, log_spaced=False)
ALL_PAIRS = ProbeConfig(pairs="all")


def dropout_model(arch: str = "gpt_neox", seed: int = 0):
    """A tiny model whose training forward draws random numbers (dropout 0.1)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, 4)
    for name in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).train()


def shuffled_loader(n_seq: int = 64, batch_size: int = 8):
    data = torch.randint(0, VOCAB, (n_seq, 16), generator=torch.Generator().manual_seed(3))
    dataset = torch.utils.data.TensorDataset(data)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True), data


def test_training_draws_during_a_background_probe_are_not_drawn_again(monkeypatch):
    # The probe is held inside the engine (where the model is in eval mode) while the
    # training thread draws; after it ends, training's generator must go on, not rewind.
    inside, release = threading.Event(), threading.Event()
    real_run = engine_module.Engine.run

    def held_run(self, *args, **kwargs):
        inside.set()
        release.wait(timeout=30)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "run", held_run)
    mon = RedundancyMonitor(
        tiny_batch()[0], schedule=ProbeSchedule.explicit([0], at_train_end=False)
    )
    model = dropout_model()
    torch.manual_seed(123)
    mon.step(0, model)
    assert inside.wait(timeout=30)
    during = torch.rand(4)
    release.set()
    mon.drain()
    after = torch.rand(4)
    mon.close()
    assert [h.step for h in mon.history] == [0]
    torch.manual_seed(123)
    assert torch.equal(torch.cat([during, after]), torch.rand(8))


def test_a_probe_of_a_model_in_train_mode_draws_nothing_and_runs_in_eval_mode():
    model = dropout_model()
    ids = tiny_batch()[0]
    torch.manual_seed(7)
    before = torch.get_rng_state()
    in_train = probe(model, ids)
    assert torch.equal(before, torch.get_rng_state())
    assert model.training and all(m.training for m in model.modules())
    in_eval = probe(model.eval(), ids)
    assert in_train.summary.scalars() == in_eval.summary.scalars()  # dropout was off


def test_the_fallback_batch_of_a_shuffled_loader_draws_nothing_from_the_global_generator():
    loader, data = shuffled_loader()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    ids, mask = from_dataloader(loader, max_sequences=3)
    assert torch.equal(before, torch.get_rng_state())
    assert ids.tolist() == data[:3].tolist() and mask is None


def test_the_fallback_batch_keeps_the_loaders_batch_size_and_collate():
    data = TokenDataset(n_seq=10)
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
    ids, _ = from_dataloader(loader, max_sequences=8)
    assert ids.tolist() == data.data[:2].tolist()  # dict rows collated, one batch's rows


def test_an_iterable_loader_gives_its_first_batch_and_the_generator_is_restored():
    batches = [torch.arange(12).reshape(3, 4), torch.zeros(3, 4, dtype=torch.long)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    ids, _ = from_dataloader(iter(batches), max_sequences=2)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(before, torch.get_rng_state())


# ----- whole runs: with the monitor == without, bit for bit -------------------------------


def lightning_weights(tmp_path, with_monitor: bool) -> dict[str, torch.Tensor]:
    import lightning.pytorch as L

    from redundancy_monitor.integrations.lightning import RedundancyMonitorCallback

    class DropoutLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = dropout_model()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    callbacks = []
    if with_monitor:  # no probe batch: the fallback reads the shuffled training loader
        callbacks.append(RedundancyMonitorCallback(schedule=EVERY_2, probe_config=ALL_PAIRS))
    L.seed_everything(0, verbose=False)
    module = DropoutLM()
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, shuffled_loader()[0])
    if with_monitor:
        assert [h.step for h in callbacks[0].monitor.history][-1] == 8
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_lightning_run_with_a_background_monitor_has_bitwise_the_same_weights(tmp_path):
    pytest.importorskip("lightning")
    plain = lightning_weights(tmp_path / "plain", with_monitor=False)
    watched = lightning_weights(tmp_path / "watched", with_monitor=True)
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[k], watched[k]) for k in plain)


def hf_weights(tmp_path, with_monitor: bool) -> dict[str, torch.Tensor]:
    import transformers

    from redundancy_monitor.integrations.hf import RedundancyMonitorTrainerCallback

    callbacks = []
    if with_monitor:
        callbacks.append(RedundancyMonitorTrainerCallback(schedule=EVERY_2, probe_config=ALL_PAIRS))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        max_steps=8,
    )
    model = dropout_model("llama")
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks
    )
    trainer.train()
    if with_monitor:
        assert [h.step for h in callbacks[0].monitor.history][-1] == 8
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_hf_run_with_a_background_monitor_has_bitwise_the_same_weights(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    plain = hf_weights(tmp_path / "plain", with_monitor=False)
    watched = hf_weights(tmp_path / "watched", with_monitor=True)
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
