"""The shared demo pieces: real stdlib text, an on-the-spot BPE, a Pythia-style config."""

from __future__ import annotations

import pytest

from redundancy_monitor import ProbeResult, ProbeSummary, probe
from redundancy_monitor.demo import (
    demo_data,
    pythia_config,
    stdlib_corpus,
    trajectory_table,
)
from redundancy_monitor.monitoring.record import ProbeRecord

pytest.importorskip("tokenizers")


def test_corpus_is_real_python_text_with_a_held_out_part():
    train, held = stdlib_corpus(max_bytes=300_000)
    assert len(train) > 200_000 and len(held) > 10_000
    assert "def " in train and '"""' in train
    assert held[:2000] not in train


def test_demo_model_trains_on_demo_tokens_and_probes():
    from transformers import AutoModelForCausalLM

    data = demo_data(seq_len=32, vocab_size=512, probe_rows=4, max_bytes=300_000)
    assert data.vocab_size == 512
    assert data.probe_ids.shape == (4, 32) and data.train_ids.shape[1] == 32
    assert int(data.train_ids.max()) < data.vocab_size
    model = AutoModelForCausalLM.from_config(pythia_config(data.vocab_size, 3, 64, 32))
    result = probe(model, data.probe_ids)
    assert result.meta.n_layers == 3 and len(result.pairs) == 2


def test_trajectory_table_lists_every_step_kept():
    history = [
        ProbeRecord(s, ProbeResult([], ProbeSummary(gap_mean=0.01 * s, regime="tied")))
        for s in (0, 10, 20, 30)
    ]
    lines = trajectory_table(history, every=2).splitlines()
    assert [int(x.split()[0]) for x in lines[2:]] == [0, 20, 30]
    assert "null" in lines[2] and "0.2000" in lines[3]
