"""redundancy-monitor: replacement vs interchange layer redundancy, during training and after.

The probe math lives in `probe`, `engine` and `result`; framework glue lives in
`redundancy_monitor.integrations.lightning` and `redundancy_monitor.integrations.hf`, imported only on demand.
"""

__version__ = "0.1.0"

from redundancy_monitor.errors import (
    BlockDiscoveryError,
    CheckpointError,
    InvalidBatchError,
    InvalidBudgetError,
    InvalidConfigError,
    InvalidPairsError,
    InvalidProtocolError,
    RedundancyMonitorError,
    UnsupportedModelError,
)
from redundancy_monitor.probing.batch import ProbeBatch, make_batch
from redundancy_monitor.probing.blocks import find_blocks, find_head, unwrap_model
from redundancy_monitor.probing.engine import EngineOptions, VariantDistance, variant_distances
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.probing.reference import reference_distances
from redundancy_monitor.probing.result import (
    DeletionRecord,
    PairRecord,
    ProbeResult,
    ProbeSummary,
    SkippedPair,
    Thresholds,
    summarize,
)
from redundancy_monitor.probing.variants import PROTOCOLS, Variant, parse_pairs
from redundancy_monitor.removal.baselines import (
    greedy_deletion,
    hidden_state_scores,
    random_sets,
)
from redundancy_monitor.removal.cost import (
    RemovalCost,
    RemovalPlan,
    plan_removal,
    removability,
    removal_cost,
)
from redundancy_monitor.removal.table import RemovalReport, compare_removal

# The training-time monitor is imported on first use: it pulls in threading and sinks
# that offline users never need. Neither path imports lightning or transformers.
_LAZY = {
    "RedundancyMonitor": "redundancy_monitor.monitoring.monitor",
    "ProbeSchedule": "redundancy_monitor.monitoring.schedule",
    "AlertConfig": "redundancy_monitor.monitoring.alerts",
    "Alert": "redundancy_monitor.monitoring.alerts",
    "read_records": "redundancy_monitor.monitoring.jsonl",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'redundancy_monitor' has no attribute {name!r}")


__all__ = [
    "PROTOCOLS",
    "Alert",
    "AlertConfig",
    "BlockDiscoveryError",
    "CheckpointError",
    "DeletionRecord",
    "EngineOptions",
    "InvalidBatchError",
    "InvalidBudgetError",
    "InvalidConfigError",
    "InvalidPairsError",
    "InvalidProtocolError",
    "PairRecord",
    "ProbeBatch",
    "ProbeResult",
    "ProbeSchedule",
    "ProbeSummary",
    "RedundancyMonitor",
    "RedundancyMonitorError",
    "RemovalCost",
    "RemovalPlan",
    "RemovalReport",
    "SkippedPair",
    "Thresholds",
    "UnsupportedModelError",
    "Variant",
    "VariantDistance",
    "__version__",
    "compare_removal",
    "find_blocks",
    "find_head",
    "greedy_deletion",
    "hidden_state_scores",
    "make_batch",
    "parse_pairs",
    "plan_removal",
    "probe",
    "random_sets",
    "read_records",
    "reference_distances",
    "removability",
    "removal_cost",
    "summarize",
    "unwrap_model",
    "variant_distances",
]
