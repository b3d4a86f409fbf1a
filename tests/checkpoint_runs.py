"""Checkpoints saved by short real training runs (HF Trainer, Lightning) of tiny models,
with a word-level tokenizer built in memory (nothing downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

WORDS = [f"w{i}" for i in range(60)]
SEQ_LEN = 16
N_SEQ = 2  # sequences in the probe batch of `probe_ids`


def corpus(n_words: int = 2400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def _chunks(tokenizer, text: str, n: int) -> list[torch.Tensor]:
    ids = tokenizer(text)["input_ids"]
    return [torch.tensor(ids[k : k + SEQ_LEN]) for k in range(0, n * SEQ_LEN, SEQ_LEN)]


def hf_trainer_checkpoints(root: Path, max_steps: int = 12, save_steps: int = 4) -> Path:
    """Train a tiny Llama with the HF Trainer; `root` gets checkpoint-<step> folders."""
    from transformers import Trainer, TrainingArguments

    tokenizer = word_tokenizer()
    model = tiny_model("llama", n_layers=4, vocab=len(tokenizer)).train()
    data = [{"input_ids": x, "labels": x} for x in _chunks(tokenizer, corpus(seed=1), 64)]
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=max_steps,
        save_steps=save_steps,
        save_only_model=True,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        report_to=[],
        logging_steps=1000,
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    return root


def lightning_checkpoints(root: Path, max_steps: int = 8, every: int = 4) -> tuple[Path, Path]:
    """Train a LightningModule holding a tiny Llama as ``self.model``; returns the folder
    of ``epoch=..-step=..ckpt`` files and the model's saved ``config.json``."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class TinyLM(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    tokenizer = word_tokenizer()
    lm = tiny_model("llama", n_layers=4, vocab=len(tokenizer)).train()
    loader = torch.utils.data.DataLoader(_chunks(tokenizer, corpus(seed=2), 64), batch_size=4)
    folder = root / "checkpoints"
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1)],
    )
    trainer.fit(TinyLM(lm), loader)
    config = root / "config.json"
    lm.config.to_json_file(config)
    return folder, config


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """``(checkpoint root, probe text file)`` of a short HF Trainer run."""
    root = hf_trainer_checkpoints(tmp_path_factory.mktemp("hf") / "out")
    text = root.parent / "probe.txt"
    text.write_text(corpus(400, seed=7))
    return root, text


@pytest.fixture(scope="module")
def probe_ids(hf_run):
    """The probe batch cut from `hf_run`'s text with its own tokenizer."""
    from redundancy_monitor.tools.loading import load_tokenizer, probe_batch_from_text

    root, text = hf_run
    return probe_batch_from_text(
        load_tokenizer(root / "checkpoint-4"), text.read_text(), N_SEQ, SEQ_LEN
    )
