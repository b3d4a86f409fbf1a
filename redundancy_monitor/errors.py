"""Errors a user can hit. Every one says what was wrong and what to pass instead."""

from __future__ import annotations


class RedundancyMonitorError(Exception):
    """Base class of every error this library raises on purpose."""


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


class MonitorStateError(RedundancyMonitorError, ValueError):
    """A saved monitor state cannot be restored into this monitor (wrong batch, version...)."""


class InvalidBudgetError(RedundancyMonitorError, ValueError):
    """A removal budget or removal set cannot be satisfied by this model."""


class CheckpointError(RedundancyMonitorError, ValueError):
    """A checkpoint, tokenizer or text given to the command line cannot be used."""


class UnsafePathError(RedundancyMonitorError, ValueError):
    """A file the library would write is a symbolic link (writing would follow it)."""


class MonitorUsageError(RedundancyMonitorError, RuntimeError):
    """A monitor method was called out of order: a step behind the last one, or after close()."""
