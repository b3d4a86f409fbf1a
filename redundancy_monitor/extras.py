"""Optional dependencies: which extra installs each, and the error when one is missing.

The probe needs only torch, numpy, tensorboard and tqdm. Lightning, transformers (with
accelerate), matplotlib and gguf are imported only by the modules that need them, through
`require`, so a missing one is a `MissingDependencyError` naming the ``pip install`` line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from redundancy_monitor.errors import MissingDependencyError

#: top-level module -> the extra of ``redundancy-monitor`` that installs it
EXTRA = {
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
    "transformers": "hf",
    "accelerate": "hf",
    "matplotlib": "plots",
    "gguf": "gguf",
}


def require(module: str, feature: str) -> ModuleType:
    """Import `module`; if it (or a package it needs) is missing, say which extra to install.

    Args:
        module: dotted module name, e.g. ``"lightning.pytorch"``.
        feature: what needs it, for the message, e.g. ``"RedundancyMonitorCallback"``.

    Raises:
        MissingDependencyError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise missing(exc.name or module, feature, EXTRA[module.split(".")[0]]) from None


def missing(module: str, feature: str, extra: str | None = None) -> MissingDependencyError:
    """The error for `feature` when `module` is not installed (`extra` installs it)."""
    top = module.split(".")[0]
    extra = extra or EXTRA[top]
    return MissingDependencyError(
        f"{feature} needs {top}, which is not installed; install it with: "
        f"pip install 'redundancy-monitor[{extra}]'"
    )
