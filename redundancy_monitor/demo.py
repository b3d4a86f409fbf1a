"""Pieces the demo, the examples and the overhead benchmark share: a real-text corpus that
needs no download (the Python standard library's own source and docstrings), a byte-level
BPE trained on it on the spot, and a small Pythia-style GPT-NeoX built from a config."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def stdlib_corpus(max_bytes: int = 3_000_000) -> tuple[str, str]:
    """(train text, held-out text) from the standard library's ``.py`` files, in a fixed
    order; every tenth file is held out, so the probe batch is text the model never sees."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )
    train: list[str] = []
    held: list[str] = []
    size = 0
    for n, path in enumerate(files):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if n % 10 == 9 else train).append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n".join(train), "\n".join(held)


def train_tokenizer(text: str, vocab_size: int = 4096):
    """A byte-level BPE (GPT-2 style) trained on `text`; a few seconds for a few MB."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    chunks = (text[i : i + 100_000] for i in range(0, len(text), 100_000))
    tokenizer.train_from_iterator(
        chunks,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return tokenizer


def token_rows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """`text` tokenized and cut into ``[n_rows, seq_len]`` consecutive windows."""
    ids = tokenizer.encode(text).ids
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pythia_config(vocab_size: int, n_layers: int = 6, width: int = 128, seq_len: int = 128):
    """A small GPT-NeoX (Pythia architecture: parallel residual, rotary on 25% of dims)."""
    from transformers import GPTNeoXConfig

    # transformers 4.x names it rotary_pct; 5.x maps that name to partial_rotary_factor
    # (and its signature no longer lists it, hence a dict typed for any version)
    legacy: dict[str, Any] = {"rotary_pct": 0.25}
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=n_layers,
        num_attention_heads=max(1, width // 32),
        intermediate_size=4 * width,
        max_position_embeddings=seq_len,
        **legacy,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


@dataclass
class DemoData:
    """Everything a demo run needs: train rows, a held-out probe batch, the tokenizer."""

    train_ids: torch.Tensor
    probe_ids: torch.Tensor
    tokenizer: object
    vocab_size: int


def demo_data(
    seq_len: int = 128, vocab_size: int = 4096, probe_rows: int = 8, max_bytes: int = 3_000_000
) -> DemoData:
    train_text, held_text = stdlib_corpus(max_bytes)
    tokenizer = train_tokenizer(train_text, vocab_size)
    train = token_rows(tokenizer, train_text, seq_len)
    held = token_rows(tokenizer, held_text, seq_len)
    g = torch.Generator().manual_seed(0)
    probe = held[torch.randperm(len(held), generator=g)[:probe_rows]]
    return DemoData(train, probe, tokenizer, tokenizer.get_vocab_size())


def trajectory_table(history: list, every: int = 1) -> str:
    """A short text table of the gap trajectory from `RedundancyMonitor.history`."""
    cols = ("gap_mean", "gap_median", "gap_max", "ir_median", "d_repl_mean", "d_int_mean")
    head = f"{'step':>6} " + " ".join(f"{c:>11}" for c in cols) + f" {'regime':>10}"
    head += f"  {'gap_median change since the first probe [paired interval]'}"
    lines = [head, "-" * len(head)]
    rows = sorted(history, key=lambda r: r.step)
    keep = rows[::every] + ([rows[-1]] if rows and (len(rows) - 1) % every else [])
    for r in keep:
        scalars, regime = r.result.summary.scalars(), r.result.summary.regime
        values = " ".join(_cell(scalars.get(c)) for c in cols)
        change = getattr(r, "change", None)
        since = change.baseline if change is not None else None
        delta = "" if since is None else since.text("gap_median")
        lines.append(f"{r.step:>6} {values} {regime or '-':>10}  {delta}".rstrip())
    return "\n".join(lines)


def _cell(x: float | None) -> str:
    return f"{'null':>11}" if x is None else f"{x:>11.4f}"
