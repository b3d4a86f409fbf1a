"""What the Lightning and HF Trainer adapters share: which ranks probe, and the default
outputs (a TensorBoard run and a JSON Lines record file)."""

from __future__ import annotations

import os
from typing import Any

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.files import RECORD_FILE
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.sidecar import SidecarAlerts, sidecar_from_kwargs
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink


def monitor_or_sidecar(
    probe_batch,
    log_dir: str | os.PathLike | None,
    jsonl_path: str | os.PathLike | bool | None,
    sidecar: str | os.PathLike | None,
    monitor_kwargs: dict[str, Any],
) -> tuple[RedundancyMonitor | None, SidecarAlerts | None]:
    """A callback's in-process monitor, or (with `sidecar`, the log folder of a `watch`
    process) the reader of that sidecar's alerts; the other one is None.

    Raises:
        InvalidConfigError: sinks passed to the callback, probing arguments with `sidecar`,
            or anything `RedundancyMonitor` refuses.
    """
    if "sinks" in monitor_kwargs or "jsonl_path" in monitor_kwargs:
        raise InvalidConfigError("pass jsonl_path to the callback; sinks are set up by it")
    if sidecar is not None:
        unused = {"probe_batch": probe_batch, "log_dir": log_dir, "jsonl_path": jsonl_path}
        return None, sidecar_from_kwargs(sidecar, unused, monitor_kwargs)
    return RedundancyMonitor(probe_batch, **monitor_kwargs), None


def probes_here(is_main: bool, world_size: int, monitor: RedundancyMonitor | None) -> bool:
    """Whether this rank runs the monitor: with several ranks every rank probes its share
    of the pairs, unless distributed probing is off, in which case the main rank probes
    alone. Without a monitor (None: a sidecar probes) no rank does."""
    if monitor is None:
        return False
    return is_main or (world_size > 1 and monitor.distributed is not False)


def add_default_sinks(
    monitor: RedundancyMonitor,
    log_dir: str | os.PathLike,
    jsonl_path: str | os.PathLike | bool | None,
    per_pair: bool,
    images: bool,
    writer=None,
) -> tuple[str, str | None]:
    """Give `monitor` a TensorBoard sink and, unless `jsonl_path` is False, a record file.

    Args:
        log_dir: the TensorBoard folder (of `writer` when one is given).
        jsonl_path: the record file (default ``<log_dir>/redundancy.jsonl``; False: none).
        writer: a framework's own ``SummaryWriter`` to share. Without one a writer is
            created in `log_dir`; after a resume it hides the interrupted run's events
            past the last probed step.

    Returns:
        The TensorBoard folder and the record file (None without one).
    """
    if writer is not None:
        sink = TensorBoardSink(writer=writer, per_pair=per_pair, images=images)
    else:
        resumed = monitor.last_step
        sink = TensorBoardSink(
            log_dir=log_dir,
            per_pair=per_pair,
            images=images,
            purge_step=None if resumed is None else resumed + 1,
        )
    monitor.sinks.append(sink)
    if jsonl_path is False:
        return sink.log_dir, None
    from redundancy_monitor.monitoring.jsonl import JsonlSink

    jsonl_file = str(jsonl_path or os.path.join(log_dir, RECORD_FILE))
    monitor.sinks.append(JsonlSink(jsonl_file))
    return sink.log_dir, jsonl_file
