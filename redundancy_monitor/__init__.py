"""redundancy-monitor: replacement vs interchange layer redundancy, during training and after.

The public API is the names in `__all__` (with every error class a public call raises,
and `RECORD_FILE`, the record file's name); everything else is importable from its module
(`redundancy_monitor.probing.engine`, `redundancy_monitor.removal.cost`, ...). Names are
loaded on first use, so ``import redundancy_monitor`` is cheap and never imports a
training framework: the Lightning and HF Trainer callbacks need their extras
(``pip install 'redundancy-monitor[lightning]'`` / ``'[hf]'``) only when touched.
"""

from __future__ import annotations

import importlib

from redundancy_monitor._version import __version__
from redundancy_monitor.errors import (
    BlockDiscoveryError,
    CheckpointError,
    CheckpointVanished,
    DeviceMemoryError,
    InvalidBatchError,
    InvalidBudgetError,
    InvalidConfigError,
    InvalidPairsError,
    InvalidProtocolError,
    MissingDependencyError,
    MissingModelConfig,
    MonitorStateError,
    MonitorUsageError,
    NotInResultError,
    ProbeCancelled,
    RecordFileError,
    RecordFileLost,
    RedundancyMonitorError,
    RunFolderError,
    UnsafePathError,
    UnsupportedModelError,
)
from redundancy_monitor.files import RECORD_FILE

#: public name -> the module that defines it
_LAZY = {
    "probe": "redundancy_monitor.probing.probe",
    "make_batch": "redundancy_monitor.probing.batch",
    "find_blocks": "redundancy_monitor.probing.blocks",
    "PairRecord": "redundancy_monitor.probing.result",
    "ProbeResult": "redundancy_monitor.probing.result",
    "ProbeSummary": "redundancy_monitor.probing.result",
    "Thresholds": "redundancy_monitor.probing.result",
    "ProbeMeta": "redundancy_monitor.probing.result",
    "IntervalConfig": "redundancy_monitor.probing.intervals",
    "plan_removal": "redundancy_monitor.removal.selection",
    "removal_cost": "redundancy_monitor.removal.cost",
    "compare_removal": "redundancy_monitor.removal.table",
    "RedundancyMonitor": "redundancy_monitor.monitoring.monitor",
    "ProbeSchedule": "redundancy_monitor.monitoring.schedule",
    "ProbeConfig": "redundancy_monitor.monitoring.probe_config",
    "AlertConfig": "redundancy_monitor.monitoring.alerts",
    "Alert": "redundancy_monitor.monitoring.alerts",
    "ProbeRecord": "redundancy_monitor.monitoring.record",
    "Sink": "redundancy_monitor.monitoring.sinks",
    "MetricsSink": "redundancy_monitor.monitoring.sinks",
    "JsonlSink": "redundancy_monitor.monitoring.jsonl",
    "TensorBoardSink": "redundancy_monitor.monitoring.tensorboard",
    "read_records": "redundancy_monitor.monitoring.jsonl",
    "RedundancyMonitorCallback": "redundancy_monitor.integrations.lightning",
    "RedundancyMonitorTrainerCallback": "redundancy_monitor.integrations.hf",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'redundancy_monitor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "RECORD_FILE",
    "Alert",
    "AlertConfig",
    "BlockDiscoveryError",
    "CheckpointError",
    "CheckpointVanished",
    "DeviceMemoryError",
    "IntervalConfig",
    "InvalidBatchError",
    "InvalidBudgetError",
    "InvalidConfigError",
    "InvalidPairsError",
    "InvalidProtocolError",
    "JsonlSink",
    "MetricsSink",
    "MissingDependencyError",
    "MissingModelConfig",
    "MonitorStateError",
    "MonitorUsageError",
    "NotInResultError",
    "PairRecord",
    "ProbeCancelled",
    "ProbeConfig",
    "ProbeMeta",
    "ProbeRecord",
    "ProbeResult",
    "ProbeSchedule",
    "ProbeSummary",
    "RecordFileError",
    "RecordFileLost",
    "RedundancyMonitor",
    "RedundancyMonitorCallback",
    "RedundancyMonitorError",
    "RedundancyMonitorTrainerCallback",
    "RunFolderError",
    "Sink",
    "TensorBoardSink",
    "Thresholds",
    "UnsafePathError",
    "UnsupportedModelError",
    "__version__",
    "compare_removal",
    "find_blocks",
    "make_batch",
    "plan_removal",
    "probe",
    "read_records",
    "removal_cost",
]
