"""The paired change between two checkpoints on one probe batch (``redundancy-monitor
compare``; docs/cli.md).

Both checkpoints are probed on the same token ids, so the change of every pair value and
summary scalar from A to B gets a paired bootstrap interval
(`redundancy_monitor.probing.change`): far narrower than either level's, because a
sequence that is hard for one checkpoint is hard for the other. The models are loaded
one after the other, so only one is in memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from redundancy_monitor import __version__
from redundancy_monitor.errors import CheckpointError
from redundancy_monitor.formatting import fmt, json_safe
from redundancy_monitor.probing.change import (
    Change,
    change_sample_size_advice,
    change_table,
    paired_change,
)
from redundancy_monitor.probing.intervals import IntervalConfig, sample_size_advice
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.probing.result import ProbeResult
from redundancy_monitor.probing.variants import parse_pairs
from redundancy_monitor.tools.loading import load_checkpoint, probe_batch_from_text, read_text

FORMAT = "redundancy-monitor/compare/1"
HEADLINE = "gap_median"


@dataclass(frozen=True)
class CompareConfig:
    """One comparison of two checkpoints.

    Args:
        a, b: the earlier and the later checkpoint (Hugging Face folders or .gguf files).
        text: text files (``-`` = stdin) the probe batch is cut from.
        tokenizer: folder to take the tokenizer from (default: checkpoint A's).
        n_seq, seq_len: shape of the probe batch (fewer sequences if the text is short).
        pairs: ``adjacent``, ``window:k`` or ``all``.
        dtype, device: how to load the models.
        target_halfwidth: the half-width (nats) of the median gap's change that the
            sample-size advice computes the number of sequences for.
        progress: progress bars on stderr.
    """

    a: str
    b: str
    text: tuple[str, ...]
    tokenizer: str | None = None
    n_seq: int = 32
    seq_len: int = 128
    pairs: str = "adjacent"
    dtype: str = "auto"
    device: str = "cpu"
    target_halfwidth: float = 0.005
    progress: bool = True

    def check(self) -> None:
        if not self.text:
            raise CheckpointError("no text given; pass --text FILE (or - for stdin)")
        if not self.target_halfwidth > 0:
            raise CheckpointError(
                f"--target-halfwidth must be a positive number of nats, got {self.target_halfwidth}"
            )
        parse_pairs(self.pairs, 3)


@dataclass
class Comparison:
    """Both probes and the paired change from A to B."""

    config: CompareConfig
    a: ProbeResult
    b: ProbeResult
    step_a: int | None
    step_b: int | None
    change: Change

    def to_dict(self) -> dict[str, Any]:
        level = sample_size_advice(self.b, HEADLINE, IntervalConfig().target_halfwidth)
        advice = change_sample_size_advice(self.change, HEADLINE, self.config.target_halfwidth)
        return json_safe(
            {
                "format": FORMAT,
                "version": __version__,
                "config": {
                    k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(self.config).items()
                },
                "batch_sha256": self.b.meta.batch_sha256,
                "a": {"path": self.config.a, "step": self.step_a, "probe": self.a.to_dict()},
                "b": {"path": self.config.b, "step": self.step_b, "probe": self.b.to_dict()},
                "change": self.change.to_dict(),
                "sample_size": {"level": level.to_dict(), "change": advice.to_dict()},
            }
        )

    def text(self) -> str:
        """The terminal table: both levels, the change with its paired intervals, and
        the sample-size advice of the level and of the change."""
        n_seq = self.b.meta.n_seq
        lines = [
            f"A: {self.config.a} (step {self.step_a})",
            f"B: {self.config.b} (step {self.step_b})",
            f"probe batch: {n_seq} x {self.b.meta.seq_len} tokens, sha256 "
            f"{str(self.b.meta.batch_sha256)[:12]}..., pairs {self.config.pairs}",
            "",
        ]
        for name, result in (("A", self.a), ("B", self.b)):
            sm = result.summary
            low, high = sm.interval(HEADLINE)
            lines.append(
                f"{name}: gap_median {fmt(sm.gap_median)} [{fmt(low)}, {fmt(high)}]  "
                f"gap_mean {fmt(sm.gap_mean)}  regime {sm.regime_text()}"
            )
        lines += [
            "",
            "Change B - A (paired: the same sequences resampled together at both):",
            change_table(self.change),
            "",
            "sample size: " + sample_size_advice(self.b, HEADLINE).sentence(),
            "sample size: "
            + change_sample_size_advice(
                self.change, HEADLINE, self.config.target_halfwidth
            ).sentence(),
        ]
        return "\n".join(lines)


def checkpoint_step_or_none(path: str) -> int | None:
    """The optimizer step of a checkpoint folder (its trainer_state.json, else a number
    in its name), None when neither tells."""
    from redundancy_monitor.tools.replay import _step_from_name, _trainer_state_step

    folder = Path(path)
    if folder.is_dir():
        step = _trainer_state_step(folder)
        if step is not None:
            return step
    return _step_from_name(folder.name)


def compare_checkpoints(config: CompareConfig) -> Comparison:
    """Probe A, then B, on one batch cut from the text; their paired change.

    Raises:
        RedundancyMonitorError: bad input (with what to pass instead), or checkpoints of
            different depths.
    """
    config.check()
    text = read_text(list(config.text))
    model, tokenizer = load_checkpoint(config.a, config.tokenizer, config.dtype, config.device)
    ids = probe_batch_from_text(tokenizer, text, config.n_seq, config.seq_len)
    result_a = probe(model, ids, pairs=config.pairs, progress=config.progress)
    del model
    gc.collect()
    model, _ = load_checkpoint(config.b, config.tokenizer or config.a, config.dtype, config.device)
    result_b = probe(model, ids, pairs=config.pairs, progress=config.progress)
    del model
    if result_a.meta.n_layers != result_b.meta.n_layers:
        raise CheckpointError(
            f"{config.a} has {result_a.meta.n_layers} layers and {config.b} has "
            f"{result_b.meta.n_layers}; a change needs the same pairs in both. Compare "
            "checkpoints of one model"
        )
    step_a, step_b = checkpoint_step_or_none(config.a), checkpoint_step_or_none(config.b)
    change = paired_change(result_a, result_b, step_a)
    return Comparison(config, result_a, result_b, step_a, step_b, change)
