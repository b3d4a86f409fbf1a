"""Offline scoring of a saved checkpoint (docs/definitions.md §5): probe, measure removals, export.

`score_checkpoint` is what ``redundancy-monitor score`` runs; the command line only
parses its arguments into a `ScoreConfig`.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from redundancy_monitor import __version__
from redundancy_monitor.errors import CheckpointError
from redundancy_monitor.probing.blocks import find_blocks
from redundancy_monitor.probing.intervals import SampleSizeAdvice, sample_size_advice
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.probing.result import ProbeResult
from redundancy_monitor.probing.variants import parse_pairs
from redundancy_monitor.removal.progress import Phases
from redundancy_monitor.removal.selection import GUIDED_PROTOCOLS, check_removal_set, plan_removal
from redundancy_monitor.removal.table import RemovalReport, compare_removal
from redundancy_monitor.tools.loading import _location as checkpoint_location
from redundancy_monitor.tools.loading import check_output_folder, load_checkpoint, read_text
from redundancy_monitor.tools.score_text import ScoreText, draw_text

FORMAT = "redundancy-monitor/score/1"


@dataclass(frozen=True)
class ScoreConfig:
    """Everything one scoring run needs; recorded in result.json.

    Args:
        path: Hugging Face checkpoint folder or .gguf file.
        text: text files (``-`` = stdin) the probe batch (and held-out part) come from.
        tokenizer: folder to take the tokenizer from instead of `path`.
        heldout: text file held out for perplexity (default: the text after the batch).
        n_seq, seq_len: shape of the probe batch (fewer sequences if the text is short).
        pairs: ``adjacent``, ``window:k`` or ``all``.
        budgets: numbers of layers to remove in the removal table.
        dtype, device: how to load the model.
        window, stride: the perplexity sliding window (default min(512, max positions)
            and half of it).
        random_draws: the random baseline's draws per budget.
        seed: seeds the probe-batch draw, the random baseline, the racing order and the
            bootstrap intervals of the perplexity changes.
        export_pruned: folder for a pruned checkpoint, with `remove` (explicit layers)
            or `budget` and `protocol` (the protocol's removal set at that budget).
        progress: a progress bar per phase on stderr (else one line per phase).
        exhaustive: measure every removal set on all of the held-out text with one full
            forward of each pruned model per window batch (today's reference path), instead
            of the shared computation with racing.
        target_halfwidth: the interval half-width (nats) of the median gap that the
            sample-size advice computes the number of sequences for.
    """

    path: str
    text: tuple[str, ...]
    tokenizer: str | None = None
    heldout: str | None = None
    n_seq: int = 32
    seq_len: int = 128
    pairs: str = "adjacent"
    budgets: tuple[int, ...] = (1, 2, 3)
    dtype: str = "auto"
    device: str = "cpu"
    window: int | None = None
    stride: int | None = None
    random_draws: int = 5
    seed: int = 0
    export_pruned: str | None = None
    remove: tuple[int, ...] | None = None
    budget: int | None = None
    protocol: str = "interchange"
    progress: bool = True
    target_halfwidth: float = 0.02
    exhaustive: bool = False

    def check(self) -> None:
        """Fail fast, before any model is loaded, on options that cannot work together."""
        if not self.text:
            raise CheckpointError("no text given; pass --text FILE (or - for stdin)")
        if self.seed < 0:
            raise CheckpointError(f"need --seed >= 0, got {self.seed}")
        if not self.target_halfwidth > 0:
            raise CheckpointError(
                f"--target-halfwidth must be a positive number of nats, got {self.target_halfwidth}"
            )
        parse_pairs(self.pairs, 3)  # the spelling only; slot ranges are checked later
        if self.protocol not in GUIDED_PROTOCOLS:
            raise CheckpointError(
                f"unknown protocol {self.protocol!r}; choose interchange or replacement"
            )
        if self.export_pruned is None:
            if self.remove is not None or self.budget is not None:
                raise CheckpointError("--remove/--budget choose what --export-pruned DIR writes")
            return
        if (self.remove is None) == (self.budget is None):
            raise CheckpointError(
                "--export-pruned needs exactly one of --remove 5,9 or --budget n [--protocol P]"
            )
        check_output_folder(self.export_pruned, "--export-pruned")
        scored = Path(self.path)
        scored = scored.parent if scored.is_file() else scored  # a .gguf: its folder
        if Path(self.export_pruned).resolve() == scored.resolve():
            raise CheckpointError(
                f"--export-pruned {self.export_pruned!r} is the checkpoint being scored; "
                "writing there would overwrite it. Pass another folder"
            )


@dataclass
class ScoreRun:
    """What a scoring run measured, ready to be printed or written."""

    config: ScoreConfig
    split: ScoreText
    result: ProbeResult
    report: RemovalReport
    export: dict[str, Any] | None

    #: The scalar the sample-size advice is about (the alerts' default gap metric).
    HEADLINE = "gap_median"

    @property
    def sample_size(self) -> SampleSizeAdvice:
        """Precision of the median gap at this n_seq, and the n_seq for the target."""
        return sample_size_advice(self.result, self.HEADLINE, self.config.target_halfwidth)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()
            },
            "versions": versions(),
            "batch_sha256": self.result.meta.batch_sha256,
            "text": self.split.to_dict(),
            "probe": self.result.to_dict(),
            "removal": self.report.to_dict(),
            "export": self.export,
            "sample_size": self.sample_size.to_dict(),
        }


def versions() -> dict[str, str]:
    import transformers

    return {
        "redundancy_monitor": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def score_checkpoint(config: ScoreConfig) -> ScoreRun:
    """Load, probe, measure the removal table and (optionally) export a pruned model.

    Raises:
        RedundancyMonitorError: any bad input, with what to pass instead.
    """
    config.check()
    # The inputs a typo breaks are checked before any progress is shown, so that their
    # error is the only line on stderr. One text file at a time: each is a document the
    # probe batch is drawn from.
    texts = [(name, read_text([name])) for name in config.text]
    heldout_text = (config.heldout, read_text([config.heldout])) if config.heldout else None
    checkpoint_location(config.path)
    phases = Phases("bars" if config.progress else "lines")
    with phases.phase("load", f"{config.path}", 1, "checkpoint", at_end=True) as bar:
        model, tokenizer = load_checkpoint(
            config.path, config.tokenizer, config.dtype, config.device
        )
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and config.seq_len > limit:
            raise CheckpointError(
                f"--seq-len {config.seq_len} exceeds the model's max_position_embeddings {limit}"
            )
        if config.remove is not None:  # fail before the long part, not after it
            check_removal_set(config.remove, len(find_blocks(model)))
        split = draw_text(tokenizer, texts, config.n_seq, config.seq_len, config.seed, heldout_text)
        bar.update(1)
    n_seq, seq_len = split.probe_ids.shape
    # The probe shows its own bar over its variants; without bars, one line.
    phases.announce("probe", f"{config.pairs} pairs on {n_seq} x {seq_len} tokens")
    result = probe(model, split.probe_ids, pairs=config.pairs, progress=phases.bars)
    report = compare_removal(
        model,
        result,
        split.probe_ids,
        split.heldout_ids,
        budgets=config.budgets,
        window=config.window,
        stride=config.stride,
        random_draws=config.random_draws,
        seed=config.seed,
        progress=phases,
        evaluation="reference" if config.exhaustive else "race",
    )
    export = None
    if config.export_pruned is not None:
        from redundancy_monitor.removal.export import export_pruned

        if config.remove is not None:
            layers, chosen_by = tuple(config.remove), "--remove"
        else:
            assert config.budget is not None  # config.check(): --remove or --budget
            plan = plan_removal(result, (config.budget,), (config.protocol,))
            layers = plan.layers(config.protocol, config.budget)
            chosen_by = f"{config.protocol} removability at budget {config.budget}"
        # Last use of the model: prune it in place rather than holding two copies.
        with phases.phase("export", f"removing {list(layers)} into {config.export_pruned}"):
            export = export_pruned(model, layers, config.export_pruned, tokenizer, inplace=True)
        export["chosen_by"] = chosen_by
    return ScoreRun(config, split, result, report, export)
