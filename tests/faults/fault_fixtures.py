"""Shared pieces of the fault tests: paths, a slow engine, TensorBoard read-back."""

from __future__ import annotations

import time
from pathlib import Path

from redundancy_monitor.probing.engine import Engine

ROOT = Path(__file__).parents[2]


def slow_engine(monkeypatch, seconds_per_group: float, started=None):
    """Make every variant group of the engine take `seconds_per_group` longer."""
    real = Engine._token_kl

    def slow(self, finals, k):
        if started is not None:
            started.set()
        time.sleep(seconds_per_group)
        return real(self, finals, k)

    monkeypatch.setattr(Engine, "_token_kl", slow)


def event_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def text_steps(acc, tag: str) -> dict[int, str]:
    """Step -> text of a TensorBoard text summary (`add_text` stores a string tensor)."""
    name = f"{tag}/text_summary"
    if name not in acc.Tags()["tensors"]:
        return {}
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(name)}


def scalar_steps(acc, tag: str) -> list[int]:
    if tag not in acc.Tags()["scalars"]:
        return []
    return sorted(e.step for e in acc.Scalars(tag))
