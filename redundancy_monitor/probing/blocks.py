"""Finding the decoder blocks (and the output head) of a model.

Discovery lives in one place so that every error about "where are the layers?" reads
the same and lists what was actually found.
"""

from __future__ import annotations

from typing import TypeGuard

from torch import nn

from redundancy_monitor.errors import BlockDiscoveryError

# Dotted paths of the decoder-block list in the architectures we know, tried in order
# after unwrapping. Anything else is found by search or given by the user.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "layers",
    "h",
    "blocks",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP (`.module`), `torch.compile` (`_orig_mod`) and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in {"DistributedDataParallel", "DataParallel"} or (
            hasattr(model, "module")
            and isinstance(getattr(model, "module", None), nn.Module)
            and type(model).__name__.endswith(
                ("DistributedDataParallel", "FullyShardedDataParallel")
            )
        ):
            model = model.module  # type: ignore[assignment]  # torch: Module.__getattr__ -> Tensor | Module
        elif hasattr(model, "get_base_model") and type(model).__name__.startswith("Peft"):
            model = model.get_base_model()  # type: ignore[operator]  # torch: Module.__getattr__ -> Tensor | Module
    return model


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """`root.get_submodule(path)` that returns None instead of raising."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_block_list(module: nn.Module | None) -> TypeGuard[nn.ModuleList]:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(True for _ in module[0].parameters())


def _search_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Homogeneous ModuleLists of parameterised modules not nested in another one."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not _is_block_list(module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def find_blocks(model: nn.Module, path: str | nn.ModuleList | None = None) -> nn.ModuleList:
    """Return the `nn.ModuleList` holding the decoder blocks of `model`.

    Args:
        model: a causal LM (Hugging Face or plain PyTorch), possibly wrapped by DDP,
            FSDP, `torch.compile` or PEFT.
        path: dotted path of the block list relative to the unwrapped model
            (e.g. ``"model.layers"``), or the `nn.ModuleList` itself.

    Raises:
        BlockDiscoveryError: when `path` does not name a ModuleList, or when no or
            several candidate lists are found; the message lists the candidates.

    Example:
        >>> blocks = find_blocks(model)             # Llama: model.model.layers
        >>> blocks = find_blocks(net, "trunk.blocks")
    """
    if isinstance(path, nn.ModuleList):
        return path
    root = unwrap_model(model)
    if path is not None:
        if not isinstance(path, str):
            raise BlockDiscoveryError(
                f"path must be a dotted string or an nn.ModuleList, got {type(path).__name__}"
            )
        found = get_submodule(root, path)
        if found is None:
            found = get_submodule(model, path)
        if not isinstance(found, nn.ModuleList):
            what = "nothing" if found is None else type(found).__name__
            raise BlockDiscoveryError(
                f"path={path!r} names {what} in {type(root).__name__}, not an nn.ModuleList; "
                f"candidates: {_describe(_search_block_lists(root))}"
            )
        return found
    for known in KNOWN_BLOCK_PATHS:
        found = get_submodule(root, known)
        if _is_block_list(found):
            return found
    candidates = _search_block_lists(root)
    if len(candidates) == 1:
        return candidates[0][1]
    raise BlockDiscoveryError(
        f"could not tell which nn.ModuleList of {type(root).__name__} holds the decoder "
        f"blocks; found {_describe(candidates)}. Pass blocks='dotted.path' (or path=...) "
        "naming the list, e.g. blocks='model.layers'."
    )


def _describe(candidates: list[tuple[str, nn.ModuleList]]) -> str:
    if not candidates:
        return "no homogeneous nn.ModuleList"
    return ", ".join(f"{name!r} ({len(m)} x {type(m[0]).__name__})" for name, m in candidates)


def find_head(model: nn.Module, path: str | nn.Module | None = None) -> nn.Module:
    """Return the output head (the module that maps final hidden states to logits)."""
    if isinstance(path, nn.Module):
        return path
    root = unwrap_model(model)
    if path is not None:
        found = get_submodule(root, path)
        if found is None:
            raise BlockDiscoveryError(
                f"head={path!r} names nothing in {type(root).__name__}; pass the dotted "
                "path of the module that maps final hidden states to logits (e.g. 'lm_head')"
            )
        return found
    getter = getattr(root, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        return head
    for name in ("lm_head", "embed_out", "head", "output"):
        found = get_submodule(root, name)
        if isinstance(found, nn.Module):
            return found
    raise BlockDiscoveryError(
        f"could not find the output head of {type(root).__name__}; pass head='dotted.path' "
        "naming the module that maps final hidden states to logits"
    )
