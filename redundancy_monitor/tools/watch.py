"""`redundancy-monitor watch`: a sidecar that probes a run's checkpoints as they appear.

It follows a checkpoint folder (Hugging Face ``checkpoint-<step>`` folders, Lightning
``.ckpt`` files, torch.distributed.checkpoint folders), waits until each new checkpoint
is completely written, and probes each once, in step order, through the same
`ReplayRun` as `replay`: the run's log folder gets the JSON Lines, TensorBoard
trajectories and alerts of the in-process monitor, at each checkpoint's step. Its state
file makes it resumable: stopped and started again, it probes nothing twice. A training
process acts on its alerts with ``sidecar=LOG_DIR`` in the callbacks.

A checkpoint is complete once nothing in it has changed in size or modification time
for `settle_seconds` and its files say it is whole: a DCP folder is only recognised by
its ``.metadata`` (renamed into place after the data files); a ``save_pretrained``
folder is whole once the HF Trainer's ``trainer_state.json`` (written last) parses, or,
without one (a plain loop, accelerate), once its weights are: a safetensors file states
its data size in its header, a sharded save lists its shards in its index.
Steps are read from names and ``trainer_state.json`` only: no checkpoint is unpickled
to find its step, and Lightning files are loaded weights-only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from redundancy_monitor.errors import CheckpointError, CheckpointVanished
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.probe_config import ProbeConfig
from redundancy_monitor.monitoring.sinks import Sink
from redundancy_monitor.probing.result import Thresholds
from redundancy_monitor.tools.replay import (
    CheckpointRef,
    ReplayOutcome,
    ReplayRun,
    checkpoint_step,
    checkpoints_in,
    make_run_folder,
    probe_config_of,
)

log = logging.getLogger("redundancy_monitor")

STATE_FILE = "watch_state.json"
DEFAULT_SETTLE_SECONDS = 2.0
DEFAULT_POLL_SECONDS = 1.0
_TRAINER_FOLDER = re.compile(r"checkpoint-\d+")

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def default_log_dir(ckpt_dir: str | os.PathLike) -> Path:
    """Where the in-process callbacks write for this layout: beside a Lightning
    ``checkpoints`` folder (``<logger version folder>/redundancy``) or a torchtitan
    ``checkpoint`` folder of DCP saves (``outputs/redundancy``), else in a Trainer output
    folder (``<output_dir>/runs/redundancy``)."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.name in ("checkpoints", "checkpoint"):
        return ckpt_dir.parent / "redundancy"
    return ckpt_dir / "runs" / "redundancy"


# ----- which checkpoints are there, and which are complete ------------------------------


def _fingerprint(path: Path) -> tuple | None:
    """Size and modification time of every file of a checkpoint (None once it is gone)."""
    try:
        if not path.is_dir():
            st = path.stat()
            return ((".", st.st_size, st.st_mtime_ns),)
        entries = []
        for root, _, files in os.walk(path):  # does not follow links
            for name in files:
                full = os.path.join(root, name)
                st = os.lstat(full)
                entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
        return tuple(sorted(entries))
    except FileNotFoundError:
        return None


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def has_completion_marker(ref: CheckpointRef) -> bool:
    """Whether `ref` is completely written as far as its files tell (see the module
    docstring); True for formats that have no marker (a Lightning file: settling only)."""
    if ref.kind == "hf":
        return hf_folder_complete(ref.path)
    folders = (ref.path, ref.path.parent) if ref.kind == "dcp" else (ref.path,)
    return all(
        _parses(f / "trainer_state.json")
        for f in folders
        if ref.kind != "lightning" and _TRAINER_FOLDER.fullmatch(f.name)
    )


def hf_folder_complete(folder: Path) -> bool:
    """Whether a ``save_pretrained`` folder is completely written.

    The HF Trainer's ``trainer_state.json`` (written last) is enough when it is there; a
    half-written one means the save goes on. Without it (a plain loop or accelerate
    calling ``save_pretrained``) the weights say it themselves: a safetensors file states
    its data size in its header, a sharded save lists its shards in its index (written
    after them), and a ``torch.save`` zip ends with its central directory.
    """
    state = folder / "trainer_state.json"
    if state.exists():
        return _parses(state)
    if not _parses(folder / "config.json"):
        return False
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            return _shards_complete(folder, folder / index)
    if (folder / "model.safetensors").exists():
        return safetensors_complete(folder / "model.safetensors")
    return _weights_file_complete(folder / "pytorch_model.bin")


#: A safetensors header larger than this is not believed (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file holds all the data its header announces: 8 bytes of
    header length, the JSON header, then tensor data up to the largest ``data_offsets``
    end. A file cut short, or with a header still being written, is not complete."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):  # a short or damaged header (UnicodeDecodeError included)
        return False
    if not isinstance(header, dict):
        return False
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        ):
            return False
        end = max(end, offsets[1])
    return size >= 8 + n + end


def _weights_file_complete(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return safetensors_complete(path)
    try:  # torch.save's zip format: the central directory at the end is written last
        return path.is_file() and zipfile.is_zipfile(path)
    except OSError:
        return False


def _shards_complete(folder: Path, index: Path) -> bool:
    """Whether the index parses and every shard it lists is there and complete."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(weight_map, dict) or not weight_map:
        return False
    shards = set(weight_map.values())
    if not all(isinstance(s, str) and s == Path(s).name for s in shards):
        return False  # a shard outside the folder is not this checkpoint's
    return all(_weights_file_complete(folder / s) for s in shards)


@dataclass(frozen=True)
class Candidate:
    """A checkpoint found in the folder: `settled` once unchanged for the settle time,
    `complete` once also marked complete."""

    ref: CheckpointRef
    settled: bool
    complete: bool


@dataclass
class _Seen:
    fingerprint: tuple | None
    since: float


class CheckpointFolder:
    """The checkpoints under a run's checkpoint folder, and which are completely written.

    Args:
        root: the folder the run saves its checkpoints into (it may not exist yet).
        settle_seconds: how long a checkpoint must stay unchanged to count as written.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.root, self.settle_seconds, self.clock = Path(root), settle_seconds, clock
        self.last_change: float | None = None  # when a checkpoint last appeared or changed
        self.no_step: list[Path] = []  # found, but with no step in name or trainer state
        self._seen: dict[Path, _Seen] = {}

    def scan(self) -> list[Candidate]:
        """The checkpoints there now, by step (one per step: the first by path)."""
        if not self.root.is_dir():
            return []
        now = self.clock()
        refs: dict[int, CheckpointRef] = {}
        for path, kind, _ in checkpoints_in(self.root):
            try:
                step = checkpoint_step(path, kind, read_file=False)
            except CheckpointError:
                if path not in self.no_step:
                    self.no_step.append(path)
                continue
            refs.setdefault(step, CheckpointRef(step, path, kind))
        seen, found = {}, []
        for step in sorted(refs):
            ref = refs[step]
            fingerprint = _fingerprint(ref.path)
            entry = self._seen.get(ref.path)
            if entry is None or entry.fingerprint != fingerprint:
                entry = _Seen(fingerprint, now)
                self.last_change = now
            seen[ref.path] = entry
            settled = fingerprint is not None and now - entry.since >= self.settle_seconds
            found.append(Candidate(ref, settled, settled and has_completion_marker(ref)))
        self._seen = seen
        return found


# ----- the sidecar ----------------------------------------------------------------------


@dataclass
class WatchOutcome(ReplayOutcome):
    """What one `watch` call did (as a replay does), what it skipped, and why it ended."""

    skipped: list[int] = field(default_factory=list)
    reason: str = ""

    @property
    def log_dir(self) -> Path:
        """The run folder written (the replay's `out_dir`)."""
        return self.out_dir


class _Sidecar:
    """One `watch` call's state: the folder, the run folder once the batch is known."""

    def __init__(self, folder, load_model, probe_batch, run_kwargs, outcome, notice):
        self.folder, self.load_model, self.probe_batch = folder, load_model, probe_batch
        self.run_kwargs, self.outcome, self.notice = run_kwargs, outcome, notice
        self.run: ReplayRun | None = None
        self.last_probe = folder.clock()
        self._told: set[tuple[str, Path]] = set()
        self._n_alerts = 0
        self._earlier: set[int] = set()  # steps an earlier session probed

    def tell_once(self, what: str, path: Path, message: str) -> None:
        if (what, path) not in self._told:
            self._told.add((what, path))
            self.notice(message)

    def open_run(self, complete: Sequence[CheckpointRef]) -> None:
        ids, mask = self.probe_batch(complete) if callable(self.probe_batch) else self.probe_batch
        self.run = ReplayRun(self.outcome.log_dir, ids, attention_mask=mask, **self.run_kwargs)
        self._n_alerts = len(self.run.alerts)
        self._earlier = self.run.probed_steps
        if self.run.last_step is not None:
            self.notice(
                f"resuming {self.outcome.log_dir}: {len(self.run.probed_steps)} checkpoint(s) "
                f"already probed, up to step {self.run.last_step}"
            )

    def advance(self, candidates: list[Candidate], until_step: int | None) -> None:
        """Probe the complete checkpoints not probed yet, in step order; stop at the
        first one still being written (a later one waits for it)."""
        assert self.run is not None  # open_run came first
        done = self.run.probed_steps
        for k, c in enumerate(candidates):
            ref = c.ref
            if ref.step in done:
                if ref.step in self._earlier and ref.step not in self.outcome.already_done:
                    self.outcome.already_done.append(ref.step)
                continue
            if self.run.last_step is not None and ref.step <= self.run.last_step:
                self.tell_once(
                    "order",
                    ref.path,
                    f"{ref.path.name} (step {ref.step}) appeared after step "
                    f"{self.run.last_step} was probed; skipped (probes are kept in step order)",
                )
                continue
            if not c.complete:
                if c.settled and any(d.complete for d in candidates[k + 1 :]):
                    self.tell_once(
                        "torn",
                        ref.path,
                        f"{ref.path.name} (step {ref.step}) lacks its completion marker and "
                        "stopped changing while a later checkpoint was completed: an "
                        "interrupted save; skipped",
                    )
                    if ref.step not in self.outcome.skipped:
                        self.outcome.skipped.append(ref.step)
                    continue
                self.tell_once(
                    "wait", ref.path, f"waiting for {ref.path.name} to be completely written"
                )
                return
            self._probe(ref)
            if until_step is not None and ref.step >= until_step:
                return

    def _probe(self, ref: CheckpointRef) -> None:
        assert self.run is not None  # open_run came first
        try:
            result = self.run.record(ref, self.load_model)
        except CheckpointVanished as exc:
            self.notice(f"{exc}; skipped (deleted by the run's checkpoint rotation?)")
            self.outcome.skipped.append(ref.step)
            return
        self.last_probe = self.folder.clock()
        if result.error is not None:
            self.outcome.failed.append(ref.step)
            self.outcome.errors[ref.step] = result.error.strip().splitlines()[0]
            self.notice(f"step {ref.step}: {ref.path.name} failed: {self.outcome.errors[ref.step]}")
        else:
            self.outcome.probed.append(ref.step)
            assert result.result is not None  # no error: a result
            gap = result.result.summary.scalars().get("gap_median")
            gap_text = "n/a" if gap is None else f"{gap:.4g}"
            self.notice(
                f"step {ref.step}: probed {ref.path.name} in {result.probe_seconds:.1f} s "
                f"(gap_median {gap_text})"
            )
        self.outcome.n_alerts += len(self.run.alerts) - self._n_alerts
        self._n_alerts = len(self.run.alerts)


def watch(
    ckpt_dir: str | os.PathLike,
    load_model: Callable[[CheckpointRef], nn.Module],
    probe_batch: Batch | Callable[[Sequence[CheckpointRef]], Batch],
    *,
    log_dir: str | os.PathLike | None = None,
    config: ProbeConfig | None = None,
    alerts: AlertConfig | None = None,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    exit_when_idle: float | None = None,
    until_step: int | None = None,
    notice: Callable[[str], None] = log.info,
    sinks: Sequence[Sink] = (),
    pairs: str | None = None,
    protocols: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    batch_tokens: int | None = None,
) -> WatchOutcome:
    """Follow `ckpt_dir` and probe each checkpoint once it is completely written.

    Args:
        ckpt_dir: the folder the run saves checkpoints into (it may not exist yet).
        load_model: builds the model of one checkpoint (a `ModelLoader` that does not
            trust pickles).
        probe_batch: ``(ids, mask)``, or a function that makes it from the complete
            checkpoints found first (to take the tokenizer from one of them).
        log_dir: the run folder to write (default `default_log_dir(ckpt_dir)`).
        config: what each probe measures, as for the monitor (None: the defaults).
        alerts: the alert rules, evaluated over the checkpoints as during training.
        settle_seconds: how long a checkpoint must stay unchanged to count as written.
        poll_seconds: pause between two looks at the folder.
        exit_when_idle: return once, after the first checkpoint appeared, nothing was
            probed and nothing in the folder changed for this many seconds (None:
            never). Waiting for the first checkpoint has no time limit.
        until_step: return once a checkpoint at or after this step is probed.
        notice: receives one line of progress at a time.
        sinks: more outputs for the records and alerts (e.g. a `WebhookAlerts`).
        pairs, protocols, thresholds, batch_tokens: the older spelling of `config`
            (kept working); not together with `config`.

    Raises:
        CheckpointError: `ckpt_dir` is a file, the folder holds a run with other
            settings, or a checkpoint cannot be loaded for a reason every other one
            shares (no model config, no tokenizer); the log folder is a file.
        InvalidConfigError: `config` together with its older keywords.
        MonitorStateError: resuming with another probe batch.
    """
    root = Path(ckpt_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(
            f"{root} is a file; pass the folder the run saves its checkpoints into"
        )
    outcome = WatchOutcome(Path(log_dir) if log_dir is not None else default_log_dir(root))
    config = probe_config_of(config, pairs, protocols, thresholds, batch_tokens)
    make_run_folder(outcome.log_dir)  # a file there fails now, not at the first checkpoint
    run_kwargs = dict(config=config, alerts=alerts, state_file=STATE_FILE, sinks=sinks)
    folder = CheckpointFolder(root, settle_seconds)
    sidecar = _Sidecar(folder, load_model, probe_batch, run_kwargs, outcome, notice)
    notice(f"following {root}, writing to {outcome.log_dir}")
    if not root.exists():
        notice(f"waiting for {root} to appear")
    try:
        if not callable(probe_batch):
            sidecar.open_run([])
        while True:
            candidates = folder.scan()
            for path in folder.no_step:
                sidecar.tell_once(
                    "step", path, f"{path.name}: no step in its name or trainer state; skipped"
                )
            complete = [c.ref for c in candidates if c.complete]
            if sidecar.run is None and complete:
                sidecar.open_run(complete)
            if sidecar.run is not None:
                sidecar.advance(candidates, until_step)
                last = sidecar.run.last_step
                if until_step is not None and last is not None and last >= until_step:
                    outcome.reason = f"step {last} probed (--until-step {until_step})"
                    break
            seen = folder.last_change
            idle = 0.0 if seen is None else folder.clock() - max(seen, sidecar.last_probe)
            if exit_when_idle is not None and seen is not None and idle >= exit_when_idle:
                outcome.reason = f"idle for {idle:.0f} s (--exit-when-idle {exit_when_idle:g})"
                break
            time.sleep(poll_seconds)
    finally:
        if sidecar.run is not None:
            sidecar.run.close()
    return outcome
