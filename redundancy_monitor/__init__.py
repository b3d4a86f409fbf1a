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

__all__ = [
    "PROTOCOLS",
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
    "ProbeSummary",
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
    "reference_distances",
    "removability",
    "removal_cost",
    "summarize",
    "unwrap_model",
    "variant_distances",
]
