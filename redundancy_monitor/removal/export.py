"""Pruned checkpoints: delete blocks from the stack and keep the model consistent.

A pruned model computes what the original computes with those slots skipped: every
kept block keeps its own per-layer settings (its `layer_types` entry), is renumbered
(`layer_idx`, so a KV cache indexes it correctly), and the config counts the new depth.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from redundancy_monitor.errors import UnsupportedModelError
from redundancy_monitor.probing.blocks import find_blocks, unwrap_model
from redundancy_monitor.removal.selection import check_removal_set

#: Per-layer config lists (one entry per block) that shrink with the stack.
PER_LAYER_CONFIG_LISTS = ("layer_types",)


def prune_model(
    model: nn.Module,
    layers: Iterable[int],
    blocks: str | nn.ModuleList | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Return `model` with the blocks in `layers` deleted (a copy unless `inplace`).

    Fixes ``config.num_hidden_layers``, per-layer config lists such as
    ``config.layer_types``, and every ``layer_idx`` attribute inside the kept blocks.

    Raises:
        InvalidBudgetError: a layer out of range, or no layer / every layer removed.
    """
    root = unwrap_model(model)
    n_layers = len(find_blocks(root, blocks))
    removed = list(check_removal_set(layers, n_layers))
    if not inplace:
        root = copy.deepcopy(root)
    block_list = find_blocks(root, blocks if isinstance(blocks, str) else None)
    for s in reversed(removed):
        del block_list[s]
    for k, block in enumerate(block_list):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                # torch types Module attributes as Tensor | Module; this one is a plain int
                module.layer_idx = k  # type: ignore[assignment]
    config = getattr(root, "config", None)
    if config is not None:
        _prune_config(config, removed, n_layers)
    return root


def _prune_config(config, removed: list[int], n_layers: int) -> None:
    config.num_hidden_layers = n_layers - len(removed)
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n_layers:
            setattr(config, name, [v for k, v in enumerate(values) if k not in removed])


def export_pruned(
    model: nn.Module,
    layers: Iterable[int],
    out_dir: str | Path,
    tokenizer=None,
    inplace: bool = False,
) -> dict[str, Any]:
    """Write a pruned Hugging Face checkpoint that `from_pretrained` reloads.

    Args:
        model: a Hugging Face `PreTrainedModel`.
        layers: 0-based layers to delete.
        out_dir: the folder to write (created).
        tokenizer: saved next to the weights when given.
        inplace: prune `model` itself instead of a copy (saves memory).

    Returns:
        What was written: the folder, removed layers and the new depth.
    """
    if not hasattr(unwrap_model(model), "save_pretrained"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no save_pretrained; export needs a Hugging Face model"
        )
    removed = sorted(set(int(s) for s in layers))
    pruned: Any = prune_model(model, removed, inplace=inplace)  # a Hugging Face model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {
        "dir": str(out),
        "removed": removed,
        "num_hidden_layers": int(pruned.config.num_hidden_layers),
    }
