"""Pruned checkpoints: consistent config and blocks, reload, logits of the pruned model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_config, tiny_model

from redundancy_monitor import find_blocks, make_batch
from redundancy_monitor.errors import InvalidBudgetError
from redundancy_monitor.probing.model_io import slots_skipped
from redundancy_monitor.removal.export import export_pruned, prune_model


def mixed_attention_qwen3(n_layers: int = 6):
    """Qwen3 whose blocks alternate sliding-window and full attention (per-slot layer_types)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3", n_layers)
    config.layer_types = ["sliding_attention", "full_attention"] * (n_layers // 2)
    config.use_sliding_window, config.sliding_window = True, 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # as tiny_model: large weights so that blocks differ clearly
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name:
                p.mul_(4.0)
    return model.eval()


def skipped_logits(model, layers, ids):
    with torch.no_grad(), slots_skipped(model, find_blocks(model), layers, make_batch(ids)):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "mixed_qwen3"])
def test_exported_pruned_model_reloads_with_the_in_memory_pruned_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = mixed_attention_qwen3() if arch == "mixed_qwen3" else tiny_model(arch, n_layers=6)
    ids, _ = tiny_batch(2, 12)
    removed = [1, 4]
    info = export_pruned(model, removed, tmp_path / "pruned")
    assert info == {"dir": str(tmp_path / "pruned"), "removed": [1, 4], "num_hidden_layers": 4}
    assert len(find_blocks(model)) == 6  # the original is untouched

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True)
    reloaded.eval()
    in_memory = prune_model(model, removed)
    assert reloaded.config.num_hidden_layers == 4
    for k, block in enumerate(find_blocks(reloaded)):
        idx = [m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")]
        assert idx and all(i == k for i in idx)
    if arch == "mixed_qwen3":
        kept = [t for k, t in enumerate(model.config.layer_types) if k not in removed]
        assert reloaded.config.layer_types == kept
    with torch.no_grad():
        got = reloaded(ids, use_cache=False).logits
        want = in_memory(ids, use_cache=False).logits
    assert torch.equal(got, want)
    # The pruned model is the original with those slots skipped (what removal_cost measures).
    torch.testing.assert_close(got, skipped_logits(model, removed, ids), rtol=1e-5, atol=1e-5)


def test_layer_types_must_shrink_with_the_stack():
    model = mixed_attention_qwen3()
    ids, _ = tiny_batch(2, 12)
    pruned = prune_model(model, [2])
    wrong = prune_model(model, [2])
    wrong.config.layer_types = model.config.layer_types[:5]  # drops the last entry instead
    with torch.no_grad():
        right = pruned(ids, use_cache=False).logits
        bad = wrong(ids, use_cache=False).logits
    torch.testing.assert_close(right, skipped_logits(model, [2], ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bad, right, atol=1e-3)


def test_pruned_model_decodes_with_a_kv_cache():
    model = prune_model(tiny_model("llama", n_layers=5), [0, 2])
    ids, _ = tiny_batch(2, 10)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :7], use_cache=True)
        step = model(ids[:, 7:8], cache=first.cache, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, 7], rtol=1e-4, atol=1e-5)


def test_prune_bad_layers():
    model = tiny_model("llama", n_layers=4)
    with pytest.raises(InvalidBudgetError, match=r"layers 0\.\.3"):
        prune_model(model, [4])
    with pytest.raises(InvalidBudgetError):
        prune_model(model, [0, 1, 2, 3])
    with pytest.raises(InvalidBudgetError):
        prune_model(model, [])


def test_export_refuses_a_model_without_save_pretrained(tmp_path):
    from torch import nn

    from redundancy_monitor.errors import UnsupportedModelError

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(UnsupportedModelError, match="save_pretrained"):
        export_pruned(Plain(), [1], tmp_path / "x")
