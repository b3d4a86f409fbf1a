"""Small real training setups shared by the monitor tests (tiny GPT-NeoX, random tokens)."""

from __future__ import annotations

import torch
from conftest import VOCAB, tiny_batch, tiny_model


def token_loader(n_seq: int = 32, seq_len: int = 16, batch_size: int = 8, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n_seq, seq_len), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences as the HF Trainer wants them (labels = inputs)."""

    def __init__(self, n_seq=64, seq_len=16, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, VOCAB, (n_seq, seq_len), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def probe_ids():
    return tiny_batch(n_seq=3, seq_len=16)[0]


def lightning_module(base="lightning.pytorch"):
    import importlib

    L = importlib.import_module(base)

    class TinyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("gpt_neox", 4).train()

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    torch.manual_seed(0)
    return TinyLM()


def lightning_trainer(tmp_path, callbacks, base="lightning.pytorch", **kw):
    import importlib

    L = importlib.import_module(base)
    kw.setdefault("max_steps", 8)
    return L.Trainer(
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


def fsdp2_tiny_model():
    """A tiny GPT-NeoX sharded with FSDP2 (`fully_shard`, each block then the root) over
    every rank of the initialised process group, in training mode (CPU, gloo)."""
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (get_world_size(),))
    model = tiny_model("gpt_neox", 4).train()
    for block in model.gpt_neox.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
