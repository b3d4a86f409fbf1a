"""Tiny models built from configs in memory (nothing downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).parents[1]
ARCHITECTURES = ("gpt_neox", "llama", "qwen3", "mistral", "gpt2")
VOCAB = 97


def tiny_config(arch: str, n_layers: int = 4, vocab: int = VOCAB, width: int = 32):
    from transformers import AutoConfig

    if arch == "gpt2":
        kwargs = dict(
            n_embd=width, n_layer=n_layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    else:
        kwargs = dict(
            hidden_size=width,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=2 * width,
            max_position_embeddings=64,
        )
        if arch != "gpt_neox":
            kwargs.update(num_key_value_heads=2, head_dim=width // 4)
        if arch == "mistral":
            kwargs["sliding_window"] = 5
    return AutoConfig.for_model(arch, vocab_size=vocab, **kwargs)


def tiny_model(arch: str = "llama", n_layers: int = 4, dtype=torch.float32, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers, **kw))
    # Random init leaves blocks nearly interchangeable; scale the weights up so the
    # distances are large enough to compare engines meaningfully.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name and "wte" not in name:
                p.mul_(4.0)
    return model.to(dtype).eval()


def tiny_batch(
    n_seq: int = 3, seq_len: int = 12, vocab: int = VOCAB, padding: str | None = None, seed: int = 1
):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :4] = 0
        mask[-1, :1] = 0
    elif padding == "right":
        mask[0, -4:] = 0
        mask[-1, -2:] = 0
    return ids, (mask if padding else None)


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that imports this checkout and the test helpers,
    as pytest's ``pythonpath = ["tests"]`` lets the tests themselves."""
    folders = (ROOT, ROOT / "tests", ROOT / "tests" / "faults")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, folders)), **extra}
