"""Every error this library raises on purpose, in one place.

Each is a `RedundancyMonitorError` and says what was wrong and what to pass instead.
Most also subclass the builtin a caller would catch for that kind of mistake
(`ValueError`, `TypeError`, `KeyError`, `OSError`, `ImportError`).
"""

from __future__ import annotations


class RedundancyMonitorError(Exception):
    """Base class of every error this library raises on purpose."""


# ----- the probe ---------------------------------------------------------------------


class BlockDiscoveryError(RedundancyMonitorError, LookupError):
    """The decoder blocks of a model could not be found unambiguously."""


class InvalidBatchError(RedundancyMonitorError, ValueError):
    """The probe batch (token ids or attention mask) cannot be used."""


class InvalidPairsError(RedundancyMonitorError, ValueError):
    """A pair set is malformed or names a slot that does not exist."""


class InvalidProtocolError(RedundancyMonitorError, ValueError):
    """A protocol name is not one of the known protocols."""


class UnsupportedModelError(RedundancyMonitorError, TypeError):
    """The model cannot be probed as it is (too few blocks, unknown head, ...)."""


class InvalidConfigError(RedundancyMonitorError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class NotInResultError(RedundancyMonitorError, KeyError):
    """A result was asked for a pair, budget, selector or figure it does not hold."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class ProbeCancelled(RedundancyMonitorError):
    """The probe was asked to stop (the monitor is shutting down)."""


# ----- removal -------------------------------------------------------------------------


class InvalidBudgetError(RedundancyMonitorError, ValueError):
    """A removal budget or removal set cannot be satisfied by this model."""


# ----- the monitor and its files -------------------------------------------------------


class MonitorStateError(RedundancyMonitorError, ValueError):
    """A saved monitor state cannot be restored into this monitor (wrong batch, version...)."""


class RecordFileError(RedundancyMonitorError, ValueError):
    """A record file has a line that is not a record, before its last record."""


class RecordFileLost(RedundancyMonitorError, OSError):
    """The record file disappeared (its folder was removed) while the run was writing it."""


class UnsafePathError(RedundancyMonitorError, ValueError):
    """A file the library would write is a symbolic link (writing would follow it)."""


class MonitorUsageError(RedundancyMonitorError, RuntimeError):
    """A monitor method was called out of order: a step behind the last one, or after close()."""


class DeviceMemoryError(RedundancyMonitorError, RuntimeError):
    """A probe would not fit in the device's free memory, so it was not started."""


# ----- offline tools -------------------------------------------------------------------


class CheckpointError(RedundancyMonitorError, ValueError):
    """A checkpoint, tokenizer or text given to the command line cannot be used."""


class CheckpointVanished(CheckpointError):
    """A checkpoint was deleted (rotated away by the run) while it was being read."""


class MissingModelConfig(CheckpointError):
    """Weights-only checkpoints (Lightning, DCP) and no config to build the model from."""


class RunFolderError(RedundancyMonitorError, ValueError):
    """A run folder holds no record file, several, or one without probe records."""


class MissingDependencyError(RedundancyMonitorError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra."""
