"""Every Python and shell block of README.md and docs/*.md runs as written.

A fenced block tagged ``python`` runs with `exec` in a fresh namespace; one tagged
``bash``, ``sh``, ``shell`` or ``console`` runs with ``bash -euo pipefail``. Each block
runs on its own (blocks of a page do not build on each other), in a fresh copy of a
working folder that holds what the docs call "your ...". A block whose first line is a
comment starting with ``# excerpt`` (``# excerpt: inside your training_step``) is a
fragment shown for reading; it is reported as skipped. In a ``console`` block only
the lines after a ``$ `` prompt (and their continuations) run; the rest is output. Every other fence must name its
language (``text`` for output, ``json``, ...), so a command cannot hide in a bare fence.

What a block may assume (the docs' "your model", "your checkpoint", ...):

Python names, built fresh for each block that uses them:
    model         a tiny Hugging Face Llama (8 layers, hidden 32, 128 positions),
                  vocabulary = the tokenizer's; random weights
    tokenizer     its word-level tokenizer (``PreTrainedTokenizerFast``)
    probe_ids     held-out token ids, a ``[8, 32]`` int64 tensor
    heldout_ids   more held-out ids, ``[1, 600]``, for perplexity
    train_loader  a ``DataLoader`` of ``[4, 32]`` id tensors (8 batches)
    module        a ``LightningModule`` holding `model` as ``module.model``; its
                  ``training_step`` takes a batch of `train_loader`
    ds            a map-style dataset of ``{"input_ids", "labels"}`` rows (HF Trainer)
    args          ``transformers.TrainingArguments``: output_dir ``out``, 4 steps,
                  CPU, ``report_to="none"``, no saving

Files in the working folder (also for shell blocks):
    my-checkpoint/             `model` and `tokenizer` saved with ``save_pretrained``
    corpus.txt, heldout.txt,   word text in the tokenizer's vocabulary
    probe.txt
    output/checkpoint-500/,    an HF Trainer output folder: two checkpoints with
    output/checkpoint-1000/    ``trainer_state.json`` and the tokenizer
    lightning_logs/version_0/  a monitored run: ``redundancy.jsonl`` (probes at steps
                               0..4) and ``checkpoints/epoch=0-step=2.ckpt``,
                               ``epoch=0-step=4.ckpt`` (Lightning files of a module
                               holding the LM as ``self.model``)
    runs/demo_lightning/       the same run where the demo writes its own
    llama-config.json,         the Llama config and the tokenizer alone
    tokenizer/
    examples/, benchmarks/     links to the repository's folders

``redundancy-monitor`` and ``python`` in shell blocks run this checkout's code
(``PYTHONPATH`` is the checkout, and a ``redundancy-monitor`` shim on ``PATH`` runs
``python -m redundancy_monitor``). Identical blocks (the quick starts in README.md and
docs/) run once. Keep blocks small: all of them together should take about a minute.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
BLOCK_TIMEOUT_S = 180
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the first line of code (after the opening fence)
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def excerpt(self) -> bool:
        first = self.code.lstrip("\n").splitlines()[0] if self.code.strip() else ""
        return first.strip().lower().startswith("# excerpt")

    def head(self, n: int = 4) -> str:
        lines = self.code.splitlines()
        more = f"\n    ... ({len(lines) - n} more lines)" if len(lines) > n else ""
        return "\n".join("    " + s for s in lines[:n]) + more


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the line their code starts on."""
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        out.append(Block(page, i + 2, lang.lower(), "\n".join(body) + "\n"))
        i = j + 1
    return out


ALL_BLOCKS = [b for page in PAGES for b in blocks_of(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in PYTHON | SHELL]


# ----- the working folder ---------------------------------------------------------------

N_LAYERS, WIDTH, POSITIONS = 8, 32, 128


def _text(n_words: int, seed: int) -> str:
    from score_fixtures import make_text

    return make_text(n_words, seed)


def _tokenizer():
    from score_fixtures import make_tokenizer

    return make_tokenizer(_text(3000, seed=0))


def _model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _ids(tokenizer, text: str, n_seq: int, seq_len: int):
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    assert len(ids) >= n_seq * seq_len, "fixture text too short"
    return ids[: n_seq * seq_len].reshape(n_seq, seq_len).to(torch.long)


def _monitored_run(folder: Path, model, probe_ids) -> None:
    """A real monitor's record file: probes at steps 0..4, weights nudged between them."""
    import torch

    from redundancy_monitor import AlertConfig, ProbeSchedule, RedundancyMonitor

    monitor = RedundancyMonitor(
        probe_ids,
        schedule=ProbeSchedule.explicit(range(5)),
        executor="inline",
        alerts=AlertConfig(hysteresis=1),
        jsonl_path=folder / "redundancy.jsonl",
    )
    monitor.start()
    try:
        for step in range(5):
            if step:
                with torch.no_grad():
                    for p in model.model.layers[step].parameters():
                        p.mul_(1.5)
            monitor.step(step, model)
        monitor.train_end(4, model)
    finally:
        monitor.close()


def _build_world(folder: Path) -> None:
    import torch

    tokenizer = _tokenizer()
    model = _model(tokenizer)
    (folder / "corpus.txt").write_text(_text(1000, seed=1))
    (folder / "heldout.txt").write_text(_text(2000, seed=2))
    (folder / "probe.txt").write_text(_text(600, seed=3))
    model.save_pretrained(folder / "my-checkpoint")
    tokenizer.save_pretrained(folder / "my-checkpoint")
    tokenizer.save_pretrained(folder / "tokenizer")
    model.config.to_json_file(folder / "llama-config.json")
    for step in (500, 1000):
        ckpt = folder / "output" / f"checkpoint-{step}"
        nudged = _model(tokenizer, seed=step)
        nudged.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    run = folder / "lightning_logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        state = {f"model.{k}": v for k, v in _model(tokenizer, seed=step).state_dict().items()}
        torch.save(
            {"state_dict": state, "global_step": step, "epoch": 0},
            run / "checkpoints" / f"epoch=0-step={step}.ckpt",
        )
    probe_ids = _ids(tokenizer, _text(600, seed=4), 8, 32)
    _monitored_run(run, _model(tokenizer), probe_ids)
    demo = folder / "runs" / "demo_lightning" / "lightning_logs" / "version_0"
    demo.mkdir(parents=True)
    shutil.copy(run / "redundancy.jsonl", demo / "redundancy.jsonl")
    for name in ("examples", "benchmarks"):
        (folder / name).symlink_to(ROOT / name)


def _lightning_module(model):
    import lightning
    import torch

    class LanguageModel(lightning.LightningModule):
        def __init__(self, lm):
            super().__init__()
            self.model = lm

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return LanguageModel(model)


class _RowDataset:
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _namespace(names: set[str]) -> dict[str, Any]:
    """The documented names `names` asks for, built fresh (a block may train the model)."""
    import torch

    out: dict[str, Any] = {}
    tokenizer = _tokenizer()
    model = _model(tokenizer)
    train_ids = _ids(tokenizer, _text(2400, seed=5), 32, 32)
    builders = {
        "model": lambda: model,
        "tokenizer": lambda: tokenizer,
        "probe_ids": lambda: _ids(tokenizer, _text(600, seed=4), 8, 32),
        "heldout_ids": lambda: _ids(tokenizer, _text(1200, seed=2), 1, 600),
        "train_loader": lambda: torch.utils.data.DataLoader(train_ids, batch_size=4),
        "module": lambda: _lightning_module(model),
        "ds": lambda: _RowDataset(train_ids),
        "args": lambda: __import__("transformers").TrainingArguments(
            output_dir="out",
            max_steps=4,
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        ),
    }
    for name in sorted(names & builders.keys()):
        out[name] = builders[name]()
    return out


FIXTURE_NAMES = {
    "model",
    "tokenizer",
    "probe_ids",
    "heldout_ids",
    "train_loader",
    "module",
    "ds",
    "args",
}


@pytest.fixture(scope="session")
def docs_world(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")  # the docs' model; the dev extras install it
    folder = tmp_path_factory.mktemp("docs_world")
    _build_world(folder)
    return folder


@pytest.fixture(scope="session")
def shim(tmp_path_factory) -> Path:
    """A folder to put first on PATH: `redundancy-monitor` and `python` run this checkout."""
    folder = tmp_path_factory.mktemp("docs_bin")
    script = folder / "redundancy-monitor"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m redundancy_monitor "$@"\n')
    script.chmod(0o755)
    for name in ("python", "python3"):  # a script, not a link: a venv's python needs its path
        (folder / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def workdir(docs_world, tmp_path) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(docs_world, folder, symlinks=True)
    return folder


# ----- running a block ------------------------------------------------------------------

_OUTCOMES: dict[tuple[str, str], str | None] = {}  # identical blocks run once


def _names_used(code: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}


@contextlib.contextmanager
def _process_state_kept(folder: Path):
    """Run in `folder`, and leave the process as found: the working folder, the
    environment (Lightning and accelerate set variables), torch's thread count and the
    random generators (the HF Trainer seeds them), so later tests see no trace."""
    import random

    import numpy as np
    import torch

    cwd, env, threads = os.getcwd(), dict(os.environ), torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _run_python(block: Block, folder: Path) -> str | None:
    try:
        tree = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
    except SyntaxError as exc:
        return f"does not parse: {exc}"
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    # A block that hangs is stopped by pytest-timeout (pyproject.toml), with its stack.
    with _process_state_kept(folder):
        namespace.update(_namespace(_names_used(block.code) & FIXTURE_NAMES))
        try:
            exec(tree, namespace)
        except (Exception, SystemExit) as exc:  # every failure is the block's
            frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
            text = "".join(frames)[-4000:]
            if isinstance(exc, NameError):
                text += f"\n(names a block may assume: {', '.join(sorted(FIXTURE_NAMES))})"
            return text
    return None


def console_commands(code: str) -> str:
    """The commands of a ``console`` block: lines after a ``$ `` prompt and their
    backslash continuations (the other lines are output). Line numbers are kept."""
    out, continued = [], False
    for line in code.splitlines():
        if line.startswith("$ "):
            out.append(line[2:])
            continued = line.endswith("\\")
        elif continued:
            out.append(line)
            continued = line.endswith("\\")
        else:
            out.append("")
    return "\n".join(out) + "\n"


def _run_shell(block: Block, folder: Path, shim: Path) -> str | None:
    code = console_commands(block.code) if block.lang == "console" else block.code
    env = {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
    }
    # Trace each command to stderr, named by its line in the page (bash takes no PS4 from
    # the environment when run as root, so the script sets it; the code starts on line 2).
    trace = f"PS4='+ {block.page.relative_to(ROOT)}:$((LINENO + {block.line - 2})): '; set -x\n"
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", trace + code],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"still running after {BLOCK_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    return f"exit code {done.returncode}\n--- stderr (tail) ---\n{done.stderr[-3000:]}" + (
        f"\n--- stdout (tail) ---\n{done.stdout[-1000:]}" if done.stdout.strip() else ""
    )


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_docs_block_runs(block: Block, request):
    if block.excerpt:
        pytest.skip(f"{block.where}: {block.code.strip().splitlines()[0]}")
    key = ("shell" if block.lang in SHELL else "python", block.code)
    if key not in _OUTCOMES:
        folder = request.getfixturevalue("workdir")
        if block.lang in PYTHON:
            _OUTCOMES[key] = _run_python(block, folder)
        else:
            _OUTCOMES[key] = _run_shell(block, folder, request.getfixturevalue("shim"))
    failure = _OUTCOMES[key]
    if failure is not None:
        pytest.fail(
            f"{block.where}: this {block.lang} block fails as written (mark a fragment with a "
            f"first line '# excerpt: ...', or see the names a block may assume in docs/layout.md "
            f"and tests/test_docs_run.py)\n{block.head()}\n{failure}",
            pytrace=False,
        )


def test_every_fence_names_its_language():
    bare = [b.where for b in ALL_BLOCKS if not b.lang]
    assert not bare, (
        "fenced blocks without a language (tag commands bash/python, output text): "
        + ", ".join(bare)
    )


def test_json_blocks_parse():
    broken = []
    for block in ALL_BLOCKS:
        if block.lang == "json":
            try:
                json.loads(block.code)
            except ValueError as exc:
                broken.append(f"{block.where}: {exc}")
    assert not broken, "json blocks that do not parse: " + "; ".join(broken)


def test_blocks_are_found():
    # The runner is only as good as its parser: it must see the blocks we know of.
    wheres = {b.where.split(":")[0] for b in RUNNABLE}
    assert {"README.md", "docs/engine.md", "docs/cli.md", "docs/monitor.md"} <= wheres
    engine = next(b for b in RUNNABLE if b.where.startswith("docs/engine.md"))
    assert engine.code.startswith("import torch") and not engine.excerpt
    assert Block(ROOT, 1, "bash", "\n# excerpt: inside a loop\nx\n").excerpt
    console = "$ echo a \\\n  b\nwritten output\n$ ls\n"
    assert console_commands(console) == "echo a \\\n  b\n\nls\n"


def test_every_command_line_option_is_in_its_cli_md_section():
    import argparse

    from redundancy_monitor.tools.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    missing = []
    for name, parser in subparsers.choices.items():
        start = text.index(f"\n## {name}\n")
        end = text.find("\n## ", start + 1)
        section = text[start : end if end >= 0 else len(text)]
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and option not in section:
                    missing.append(f"{name} {option}")
    assert not missing, "options missing from their section of docs/cli.md: " + ", ".join(missing)
