"""A tiny saved checkpoint with a tokenizer, for end-to-end tests of `score`."""

from __future__ import annotations

import random
from pathlib import Path

_VOCABULARY = (
    "the a model layer block token swap slot weight loss train step data text small large "
    "deep net head norm early late mid low high fast slow good bad new old red blue green "
    "cat dog runs sees eats makes takes gives finds keeps moves holds"
)
WORDS = tuple(_VOCABULARY.split())


def make_text(n_words: int, seed: int) -> str:
    """Word salad with some structure (pairs of words recur), one sentence per line."""
    rng = random.Random(seed)
    out, line = [], []
    for _ in range(n_words):
        word = rng.choice(WORDS)
        line.append(word)
        if rng.random() < 0.3:
            line.append(WORDS[(WORDS.index(word) + 1) % len(WORDS)])
        if len(line) >= 12:
            out.append(" ".join(line) + " .")
            line = []
    return "\n".join(out) + "\n"


def make_tokenizer(text: str):
    """A WordLevel tokenizer trained on `text`, wrapped for `AutoTokenizer`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def save_checkpoint(folder: Path, n_layers: int = 6, with_tokenizer: bool = True):
    """Save a tiny Llama (vocabulary = the tokenizer's) and its tokenizer in `folder`."""
    from conftest import tiny_model

    tokenizer = make_tokenizer(make_text(3000, seed=0))
    model = tiny_model("llama", n_layers=n_layers, vocab=len(tokenizer), width=32)
    model.config.max_position_embeddings = 64
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return model, tokenizer
