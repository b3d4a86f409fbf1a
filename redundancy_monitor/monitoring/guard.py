"""Keeping one trajectory one trajectory: a probe is comparable with the earlier ones only
if it measured the same probe batch, the same model (architecture, sizes and depth), the
same pairs (as expanded for that depth, however the set was spelled) and the same
protocols.

A resumed run, a model that grew or shrank, or a changed pair set would otherwise mix two
trajectories in one series without a trace. `TrajectoryGuard` remembers what the first
probe of the current trajectory measured and tells the monitor, probe after probe, what
changed. The monitor then refuses the probe (policy ``"refuse"``) or starts a new
trajectory from it with a marker record (policy ``"new_baseline"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redundancy_monitor.errors import InvalidConfigError, InvalidPairsError
from redundancy_monitor.probing.result import ProbeResult, describe_model
from redundancy_monitor.probing.variants import parse_pairs

MISMATCH_POLICIES = ("refuse", "new_baseline")


def check_policy(policy: str) -> str:
    if policy not in MISMATCH_POLICIES:
        raise InvalidConfigError(
            f"on_mismatch must be one of {MISMATCH_POLICIES}, got {policy!r}: 'refuse' keeps "
            "probes of another batch, depth or pair set out of the trajectory; 'new_baseline' "
            "starts a new trajectory from them"
        )
    return policy


def protocols_identity(protocols: Iterable[str]) -> list[str]:
    """Protocols as a trajectory's identity holds them: the set, in a fixed order."""
    return sorted(set(protocols))


def trajectory_identity(result: ProbeResult) -> dict[str, Any]:
    """What makes two probes comparable: batch hash, the model (class and sizes), number
    of blocks, the requested pairs (expanded), the protocols."""
    pairs = [[r.i, r.j] for r in result.pairs] + [[s.i, s.j] for s in result.skipped]
    identity: dict[str, Any] = {
        "batch_sha256": result.meta.batch_sha256,
        "n_layers": result.n_layers,
        "pairs": sorted(pairs),
    }
    if result.meta.protocols is not None:
        identity["protocols"] = protocols_identity(result.meta.protocols)
    model = model_identity(result)
    if model is not None:
        identity["model"] = model
    return identity


def model_identity(result: ProbeResult) -> dict[str, Any] | None:
    """The architecture a probe measured (see `ProbeMeta.model_identity`)."""
    return result.meta.model_identity()


def same_pair_set(a, b, n_layers: int | None) -> bool:
    """Whether two pair specs (names or ``[i, j]`` lists; None: unknown, matches anything)
    name the same pairs of a model with `n_layers` blocks (None: not known yet, so only
    the spellings of one named set match, e.g. ``"adjacent"`` and ``"window:1"``)."""
    if a is None or b is None or a == b:
        return True
    if n_layers is None:
        name = _canonical_name(a)
        return name is not None and name == _canonical_name(b)
    try:
        return parse_pairs(a, n_layers) == parse_pairs(b, n_layers)
    except InvalidPairsError:
        return False


def _canonical_name(spec) -> str | None:
    if not isinstance(spec, str):
        return None
    name = spec.strip().lower()
    return "adjacent" if name == "window:1" else name


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A sentence naming what differs between two identities (keys both have), or None."""
    changes = []
    if old.get("model") is not None and new.get("model") not in (None, old["model"]):
        changes.append(
            f"another model, {describe_model(new['model'])} (the trajectory has "
            f"{describe_model(old['model'])})"
        )
    if old.get("n_layers") not in (None, new.get("n_layers")):
        changes.append(f"a {new['n_layers']}-block model (the trajectory has {old['n_layers']})")
    sha_old, sha_new = old.get("batch_sha256"), new.get("batch_sha256")
    if sha_old is not None and sha_new is not None and sha_old != sha_new:
        changes.append(f"another probe batch (sha256 {sha_new[:12]}..., was {sha_old[:12]}...)")
    if old.get("pairs") is not None and old["pairs"] != new.get("pairs"):
        changes.append(f"another pair set ({len(new['pairs'])} pairs, was {len(old['pairs'])})")
    if old.get("protocols") is not None and old["protocols"] != new.get("protocols"):
        changes.append(f"other protocols ({new.get('protocols')}, was {old['protocols']})")
    return "; ".join(changes) or None


class TrajectoryGuard:
    """Remembers the identity of the current trajectory and reports a probe that differs."""

    def __init__(self, identity: dict[str, Any] | None = None):
        self.identity = identity

    def check(self, result: ProbeResult) -> str | None:
        """None if `result` continues the trajectory (the first probe starts it)."""
        new = trajectory_identity(result)
        if self.identity is None:
            self.identity = new
            return None
        change = describe_change(self.identity, new)
        if change is None:
            self.identity = {**self.identity, **new}  # fill keys an older state lacked
        return change

    def restart(self, result: ProbeResult) -> dict[str, Any] | None:
        """Make `result` the start of a new trajectory; return the old identity."""
        old, self.identity = self.identity, trajectory_identity(result)
        return old
