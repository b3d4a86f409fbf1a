"""redundancy-monitor: replacement vs interchange layer redundancy, during training and after.

The probe math lives in `probe`, `engine` and `result`; framework glue lives in
`redundancy_monitor.lightning` and `redundancy_monitor.hf`, imported only on demand.
"""

__version__ = "0.1.0"

from redundancy_monitor.baselines import (
    greedy_deletion,
    hidden_state_scores,
    random_sets,
)
from redundancy_monitor.batch import ProbeBatch, make_batch
from redundancy_monitor.blocks import find_blocks, find_head, unwrap_model
from redundancy_monitor.comparison import RemovalReport, compare_removal
from redundancy_monitor.engine import EngineOptions, VariantDistance, variant_distances
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
from redundancy_monitor.probe import probe
from redundancy_monitor.reference import reference_distances
from redundancy_monitor.removal import (
    RemovalCost,
    RemovalPlan,
    plan_removal,
    removability,
    removal_cost,
)
from redundancy_monitor.result import (
    DeletionRecord,
    PairRecord,
    ProbeResult,
    ProbeSummary,
    SkippedPair,
    Thresholds,
    summarize,
)
from redundancy_monitor.variants import PROTOCOLS, Variant, parse_pairs

# The training-time monitor is imported on first use: it pulls in threading and sinks
# that offline users never need. Neither path imports lightning or transformers.
_LAZY = {
    "RedundancyMonitor": "redundancy_monitor.monitor",
    "ProbeSchedule": "redundancy_monitor.schedule",
    "AlertConfig": "redundancy_monitor.alerts",
    "Alert": "redundancy_monitor.alerts",
    "read_records": "redundancy_monitor.jsonl",
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
