"""Faults inside the probe engine: out of memory, NaN weights, unusable models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_config, tiny_model

from redundancy_monitor import probe
from redundancy_monitor.errors import UnsupportedModelError
from redundancy_monitor.probing.engine import Engine


def test_out_of_memory_is_retried_with_smaller_chunks(monkeypatch):
    model = tiny_model("llama", n_layers=4)
    ids, mask = tiny_batch(padding="left")
    want = probe(model, ids, mask)
    real = Engine._token_kl
    chunks = []

    def tight(self, finals, k):
        chunks.append((self._chunk, k))
        if k > 2:  # too many variants at once "does not fit"
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(self, finals, k)

    monkeypatch.setattr(Engine, "_token_kl", tight)
    got = probe(model, ids, mask, batch_tokens=400)  # 11 variants per forward at first
    assert got.meta.oom_retries >= 1
    assert max(k for _, k in chunks[-3:]) <= 2
    assert [r.d_int for r in got.pairs] == pytest.approx([r.d_int for r in want.pairs], abs=1e-6)


def test_out_of_memory_that_persists_is_raised_not_looped(monkeypatch):
    def never(self, finals, k):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(Engine, "_token_kl", never)
    with pytest.raises(torch.OutOfMemoryError):
        probe(tiny_model("llama", 3), tiny_batch()[0])


def test_nan_weights_give_non_finite_distances_counted_in_the_summary():
    model = tiny_model("gpt_neox", n_layers=4)
    with torch.no_grad():
        model.gpt_neox.layers[2].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
    result = probe(model, tiny_batch()[0], pairs="adjacent")
    assert result.summary.n_nonfinite >= 1
    assert result.summary.n_finite + result.summary.n_nonfinite == 3
    d = result.to_dict()
    assert all(
        v is None or math.isfinite(v)
        for r in d["pairs"]
        for v in r.values()
        if isinstance(v, float)
    )


def test_meta_device_model_is_refused_with_advice():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama", 3))
    with pytest.raises(UnsupportedModelError, match="meta device"):
        probe(model, torch.ones(1, 4, dtype=torch.long))


def test_quantized_blocks_are_refused_because_weights_cannot_move():
    model = tiny_model("llama", n_layers=3)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(UnsupportedModelError, match="quantized"):
        probe(quantized, torch.ones(1, 4, dtype=torch.long))


def test_frozen_model_is_probed_like_a_trainable_one():
    model = tiny_model("qwen3", n_layers=3)
    want = probe(model, tiny_batch()[0])
    model.requires_grad_(False)
    got = probe(model, tiny_batch()[0])
    assert got.pairs == want.pairs


def _logits_changed_after_the_head(model):
    """A model that scales its logits after its head ran (as a soft-cap would)."""

    def scale(module, args, output):
        output.logits.mul_(2.0)

    model.register_forward_hook(scale)
    return model


def _head_run_twice(model):
    """A model whose forward runs its output head a second time."""

    def again(module, args, output):
        module.lm_head(torch.zeros(1, 1, module.config.hidden_size))

    model.register_forward_hook(again)
    return model


@pytest.mark.parametrize(
    ("change", "engine_error", "heldout_error"),
    [
        (_logits_changed_after_the_head, "pass head= naming", "not its output head"),
        (_head_run_twice, "ran 2 times in one forward; pass head=", "ran 2 times"),
    ],
)
def test_a_head_that_is_not_the_logits_is_refused_by_the_engine_and_the_shared_heldout(
    change, engine_error, heldout_error
):
    """Both fast paths compute logits from the head's input; where that is not what the
    model returns they refuse, each saying what to use instead."""
    from redundancy_monitor.probing.probe import prepare
    from redundancy_monitor.removal.heldout import HeldoutOptions, measure_heldout

    model = change(tiny_model("llama", n_layers=3))
    ids = tiny_batch()[0]
    with pytest.raises(UnsupportedModelError, match=engine_error):
        probe(model, ids)
    root, blocks, head, batch = prepare(model, ids, None, None, None)
    held = [torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(UnsupportedModelError, match=heldout_error) as refused:
        measure_heldout(
            root, blocks, head, held, 24, 12, batch, [(1,)], [(1,)], HeldoutOptions("full")
        )
    assert "evaluation='reference'" in str(refused.value)
    # The reference path runs the model as it is, and so measures it.
    scores = measure_heldout(
        root, blocks, head, held, 24, 12, batch, [(1,)], [(1,)], HeldoutOptions("reference")
    )
    assert np.isfinite(scores.base).all() and np.isfinite(scores.nll[(1,)]).all()
