"""What the Lightning and HF Trainer adapters share: the monitor (or sidecar reader) they
drive, which ranks prepare a probe, and the default outputs (a TensorBoard run and a JSON
Lines record file, one folder per monitor when a trainer has several)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
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
    """Whether this rank probes, so needs the model, a probe batch and (the main rank)
    sinks: with several ranks every rank probes its share of the pairs, unless
    distributed probing is off, in which case the main rank probes alone (the others
    still call the monitor's hooks, to learn its decisions). Without a monitor (None: a
    sidecar probes) no rank does."""
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
        writer: a framework's own ``SummaryWriter``: our events then go to a run of our
            own beside it (``<its log dir>/redundancy``), never into it, so that a failed
            write of ours (a full disk) cannot break the framework's writer and its
            shutdown. Without one a writer is created in `log_dir`. After a resume our
            writer hides the interrupted run's events past the last probed step.

    Returns:
        The TensorBoard folder (ours) and the record file (None without one).
    """
    resumed = monitor.last_step
    purge_step = None if resumed is None else resumed + 1
    if writer is not None:  # a run of our own beside theirs: our write errors stay ours
        sink = TensorBoardSink.beside(
            writer, per_pair=per_pair, images=images, purge_step=purge_step
        )
    else:
        sink = TensorBoardSink(
            log_dir=log_dir, per_pair=per_pair, images=images, purge_step=purge_step
        )
    monitor.sinks.append(sink)
    if jsonl_path is False:
        return sink.log_dir, None
    from redundancy_monitor.monitoring.jsonl import JsonlSink

    jsonl_file = str(jsonl_path or os.path.join(log_dir, RECORD_FILE))
    monitor.sinks.append(JsonlSink(jsonl_file))
    return sink.log_dir, jsonl_file


def monitor_label(config: dict[str, Any]) -> str:
    """A short stable name for a monitor's configuration (its probe batch and what it
    probes), the same in every process: names its folder when a trainer has several."""
    key = repr(sorted(config.items())).encode()
    return "redundancy-" + hashlib.sha256(key).hexdigest()[:8]


def check_distinct_record_files(paths: Sequence[str | os.PathLike | None], kind: str) -> None:
    """Refuse two monitors of one trainer writing one record file (their probes would mix).

    Raises:
        InvalidConfigError: two of `paths` (None: no file) name the same file.
    """
    seen: set[Path] = set()
    for path in paths:
        if path is None:
            continue
        resolved = Path(path).absolute()
        if resolved in seen:
            raise InvalidConfigError(
                f"two {kind}s on one trainer would write the same record file {path}, and "
                "their probes would mix into one trajectory; give each its own jsonl_path= "
                "(or leave jsonl_path unset: several monitors then each get a folder of "
                "their own, named after their configuration)"
            )
        seen.add(resolved)
